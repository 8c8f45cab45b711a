"""The engine's kernels (polyak._engine.kernel) through every caller: chunked sums against
numpy, and NaN/Inf found in any chunk of a tensor longer than one chunk."""

from __future__ import annotations

import re

import numpy as np
import pytest

import polyak
from _helpers import tutorial_weights, write_members
from polyak._engine.kernel import (
    CHUNK,
    PARALLEL_MIN,
    Buffers,
    WriteBehind,
    accumulate,
    accumulate_all,
    check_cast,
    chunks,
    member_chunks,
    widen,
)

N = CHUNK * 2 + 7  # three chunks, the last a short one


def _members(n: int = 3, size: int = N, dtype: type = np.float32) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [{"w": rng.standard_normal(size).astype(dtype), "b": rng.standard_normal(3).astype(dtype)}
            for _ in range(n)]


def test_chunks_cover_a_tensor_once() -> None:
    assert list(chunks(0)) == []
    assert list(chunks(1)) == [(0, 1)]
    assert list(chunks(CHUNK)) == [(0, CHUNK)]
    assert list(chunks(N)) == [(0, CHUNK), (CHUNK, 2 * CHUNK), (2 * CHUNK, N)]


def test_widen_copies_only_what_it_must() -> None:
    scratch = np.zeros(8, np.float32)
    x16 = np.arange(4, dtype=np.float16)
    out = widen(x16, np.dtype(np.float32), scratch)
    assert out.dtype == np.float32 and out.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert np.shares_memory(out, scratch) and out.size == 4
    x32 = np.arange(4, dtype=np.float32)
    assert widen(x32, np.dtype(np.float32), scratch) is x32


@pytest.mark.parametrize("first", [True, False])
def test_accumulate_is_the_weighted_sum_in_every_chunk(first: bool) -> None:
    members = _members()
    w = np.array([0.2, 0.3, 0.5])
    acc = np.full(N, 10.0, np.float32)
    total = accumulate([m["w"] for m in members], w, acc, Buffers(), first=first)
    want = np.sum([wi * m["w"].astype(np.float64) for wi, m in zip(w, members, strict=True)], axis=0)
    if not first:
        want += 10.0
    np.testing.assert_allclose(acc, want, rtol=1e-5, atol=1e-5)
    assert total == pytest.approx(float(np.sum(want)), rel=1e-4, abs=1e-2)  # the probe of every chunk


@pytest.mark.parametrize("where", [0, CHUNK, N - 1], ids=["first-chunk", "second-chunk", "last-element"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_average_finds_nan_or_inf_in_any_chunk(tmp_path, where: int, bad: float) -> None:
    members = _members()
    members[1]["w"][where] = bad  # the middle member
    paths = write_members(tmp_path, members)
    with pytest.raises(polyak.NonFiniteError, match=f'^tensor "w" has NaN or Inf values in: {re.escape(str(paths[1]))}\\. '):
        polyak.average(paths, out=tmp_path / "avg.safetensors")
    with pytest.raises(polyak.NonFiniteError, match='^tensor "w" has NaN or Inf values in: member 1\\. '):
        polyak.average(members)  # in memory: one member at a time
    assert not (tmp_path / "avg.safetensors").exists()


@pytest.mark.parametrize("where", [0, CHUNK, N - 1], ids=["first-chunk", "second-chunk", "last-element"])
def test_member_chunks_find_nan_in_any_chunk(where: int) -> None:
    x = np.ones(N, np.float16)
    x[where] = np.nan
    scratch = np.empty(CHUNK, np.float32)
    message = ('m.safetensors: tensor "w" has NaN or Inf values. They would spread into every average that '
               "contains this member; drop it (e.g. with last=) or repair it first")
    with pytest.raises(polyak.NonFiniteError, match=f"^{re.escape(message)}$"):
        for _ in member_chunks(x, np.dtype(np.float32), scratch, label="m.safetensors", name="w"):
            pass
    got = [(a, b, c.dtype.name, c.size) for a, b, c in member_chunks(np.ones(N, np.float16), np.dtype(np.float32),
                                                                        scratch, label="m", name="w")]
    assert got == [(0, CHUNK, "float32", CHUNK), (CHUNK, 2 * CHUNK, "float32", CHUNK), (2 * CHUNK, N, "float32", 7)]


def test_soup_of_tensors_of_any_rank() -> None:
    rng = np.random.default_rng(2)
    members = [{"m": rng.standard_normal((3, 4, 5)).astype(np.float32), "s": np.array(float(i), np.float32),
                "h": rng.standard_normal((6, 2)).astype(np.float16)} for i in range(3)]
    soup = polyak.greedy_soup(members, lambda s: {"validation": {"x": -float(np.sum(np.abs(s["m"])))}}, "x")
    kept = [members[i] for i in soup.indices]
    for name in ("m", "s", "h"):
        want = np.mean([m[name].astype(np.float64) for m in kept], axis=0)
        assert soup.state[name].shape == want.shape and soup.state[name].dtype == members[0][name].dtype
        np.testing.assert_allclose(soup.state[name], want, rtol=2e-3 if name == "h" else 1e-6, atol=1e-3)


def test_sweep_and_soup_find_nan_in_the_first_chunk() -> None:
    members = _members(3)
    members[0]["w"][0] = np.nan
    with pytest.raises(polyak.NonFiniteError, match='^member 0: tensor "w" has NaN or Inf values'):
        polyak.sweep(members, lambda s: {"x": 0.0}, schemes=["equal"], baselines=())
    with pytest.raises(polyak.NonFiniteError, match='^member 0: tensor "w" has NaN or Inf values'):
        polyak.greedy_soup(members, lambda s: {"x": 0.0}, "x")


def test_large_sums_that_overflow_the_probe_are_not_nan(tmp_path) -> None:
    # float16 members near its maximum: the float32 accumulator holds them, and the probe
    # (a chunk's sum) is finite; the result is the plain average.
    big = [{"w": np.full(N, 60000.0, np.float16)}, {"w": np.full(N, 60000.0, np.float16)}]
    got = polyak.average(big)["w"]
    assert got.dtype == np.float16 and np.all(got == 60000.0)


@pytest.mark.parametrize("scheme", ["equal", "linear", "exponential"])
def test_threaded_parts_match_numpy(tmp_path, scheme: str) -> None:
    n = PARALLEL_MIN * 2 + 3  # two threads' parts, each spanning chunks
    members = _members(4, n)
    paths = write_members(tmp_path, members)
    got = polyak.average(paths, scheme=scheme, alpha=1.5)
    want = np.average(np.stack([m["w"].astype(np.float64) for m in members]), axis=0,
                      weights=tutorial_weights(scheme, 4, 1.5))
    np.testing.assert_allclose(got["w"], want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.complex64])
def test_a_probe_overflowed_by_finite_values_is_not_nan(dtype: type) -> None:
    # Each chunk's sum overflows (a float32 or float64 chunk of values near max / 8), every
    # element is finite, and so is every average: the element-by-element check (in the
    # tensor's own dtype: float64 values do not fit float32) lets them pass, with no warning
    # from numpy (which -W error would turn into an exception), also in worker threads.
    big = np.finfo(dtype).max / 8
    x = np.full(N, big, dtype)
    scratch = np.empty(CHUNK, x.dtype)
    assert [b for _, b, _ in member_chunks(x, x.dtype, scratch, label="m", name="w")] == [CHUNK, 2 * CHUNK, N]
    members = [{"w": x}, {"w": x.copy()}]

    def value(state: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        return {"validation": {"x": float(np.real(state["w"][0]))}}

    rows = polyak.sweep(members, value, schemes=["equal"], baselines=()).rows
    assert [r.value("x", "validation") for r in rows] == [pytest.approx(float(big), rel=1e-6)] * 2
    assert polyak.greedy_soup(members, value, "x").score == pytest.approx(float(big), rel=1e-6)
    assert polyak.average(members)["w"][0] == pytest.approx(big, rel=1e-6)


def _nonfinite(who: str, name: str = "w") -> str:
    return (f'^tensor "{name}" has NaN or Inf values in: {re.escape(who)}\\. Averaging would spread them into the '
            "result; drop that member \\(e\\.g\\. with --last\\) or repair it first$")


def test_the_nonfinite_error_names_every_culprit_and_only_them() -> None:
    # float64 values beyond float32's range are finite: only the NaN and the Inf are named.
    members = [{"w": np.full(4, 1e300)} for _ in range(4)]
    members[1]["w"][2] = np.nan
    members[3]["w"][0] = -np.inf
    with pytest.raises(polyak.NonFiniteError, match=_nonfinite("member 1, member 3")):
        polyak.average(members)
    with pytest.raises(polyak.NonFiniteError, match=_nonfinite("member 1")):
        polyak.average(members[:3])


def test_an_overflow_of_finite_members_is_named_as_such() -> None:
    # Normalised in float32, the weights 2/11, 5/11, 4/11 sum to a little more than 1, so
    # three members at float32's maximum overflow while averaging.
    big = [{"w": np.full(3, np.finfo(np.float32).max, np.float32)} for _ in range(3)]
    with pytest.raises(polyak.NonFiniteError, match=_nonfinite("none of the members (overflow while averaging)")):
        polyak.average(big, weights=[2, 5, 4])


def _cast(acc: np.ndarray, dtype: object) -> np.ndarray:
    with np.errstate(all="ignore"):
        return acc.astype(dtype)


def test_check_cast_every_kind_of_range() -> None:
    import ml_dtypes

    from polyak import NonFiniteError

    fine = np.array([1.0, -65504.0, 2.0], np.float32)  # the end of float16's range is finite
    check_cast(fine, _cast(fine, np.float16), name="w")
    # a negative value beyond the range, in the middle
    acc = np.array([1.0, -3e38, 2.0], np.float32)
    with pytest.raises(NonFiniteError, match=re.escape(
            'tensor "w": its average reaches 3e+38, beyond the range of float16 (largest finite value 65504); '
            "written as float16 it would be Inf. ")):
        check_cast(acc, _cast(acc, np.float16), name="w")
    # complex: the magnitude decides, and the imaginary part alone can overflow
    acc = np.array([1 + 0j, 1 + 1e300j, 2 + 0j], np.complex128)
    with pytest.raises(NonFiniteError, match=re.escape(
            'tensor "c": its average reaches 1e+300, beyond the range of complex64 (largest finite value 3.40282e+38); '
            "written as complex64 it would be Inf. ")):
        check_cast(acc, _cast(acc, np.complex64), name="c")
    small = np.array([1 + 1j, -3e38 - 3e38j], np.complex128)  # |x| > float32's max, parts within it
    check_cast(small, _cast(small, np.complex64), name="c")
    # an unsigned format (no negative values, no Inf): its range starts at its smallest value
    acc = np.array([1.0, 3e38, 2.0], np.float32)
    with pytest.raises(NonFiniteError, match=re.escape(
            'tensor "u": its average reaches 3e+38, beyond the range of float8_e8m0fnu (finite values from '
            "5.87747e-39 to 1.70141e+38); written as float8_e8m0fnu it would be NaN. ")):
        check_cast(acc, _cast(acc, ml_dtypes.float8_e8m0fnu), name="u")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("with_pool", [True, False])
def test_accumulate_all_is_numpy_with_or_without_threads(threads: int, with_pool: bool) -> None:
    from concurrent.futures import ThreadPoolExecutor

    n = PARALLEL_MIN + 1000  # large enough to be split
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(n).astype(np.float16) for _ in range(3)]
    weights = np.array([0.2, 0.3, 0.5])
    want = np.average(np.stack([a.astype(np.float64) for a in arrays]), axis=0, weights=weights)
    acc = np.empty(n, np.float16)  # a narrow destination: summed in float32, written in float16
    with ThreadPoolExecutor(max_workers=3) as pool:
        total = accumulate_all(arrays, weights, acc, Buffers(), pool if with_pool else None, threads,
                               np.dtype(np.float32))
    assert np.isfinite(total)
    np.testing.assert_allclose(acc.astype(np.float64), want, rtol=2e-3, atol=2e-3)


class _Recorder:
    def __init__(self, fail_on: str | None = None) -> None:
        self.seen: list[tuple[str, list[int], str]] = []
        self.fail_on = fail_on

    def write(self, name: str, array: np.ndarray) -> None:
        import threading

        if name == self.fail_on:
            raise OSError(f"disk full at {name}")
        self.seen.append((name, array.tolist(), threading.current_thread().name))


def test_write_behind_writes_in_order_in_its_own_named_thread_and_stops_it() -> None:
    import threading

    log = _Recorder()
    with WriteBehind(log) as behind:
        for k in range(4):
            out = behind.buffers().get("out", np.dtype(np.int64), 2)
            out[:] = k
            behind.put(f"t{k}", out)
    assert [(n, v) for n, v, _ in log.seen] == [(f"t{k}", [k, k]) for k in range(4)]
    assert all(t.startswith("polyak-write") for _, _, t in log.seen)  # what a py-spy dump shows
    assert not [t for t in threading.enumerate() if t.name.startswith("polyak-write")]  # joined on close


def test_write_behind_raises_a_failed_write_unless_another_error_is_on_its_way_out() -> None:
    with pytest.raises(OSError, match="^disk full at t1$"), WriteBehind(_Recorder(fail_on="t1")) as behind:
        behind.put("t0", np.zeros(1))
        behind.put("t1", np.zeros(1))
    # the user's interrupt wins over the write's error
    with pytest.raises(KeyboardInterrupt, match="^stop$"), WriteBehind(_Recorder(fail_on="t1")) as behind:
        behind.put("t1", np.zeros(1))
        raise KeyboardInterrupt("stop")


def test_accumulate_into_a_destination_of_another_dtype_sums_in_the_dtype_asked() -> None:
    from polyak._engine.kernel import accumulate_into

    # summed in float32, written into float64: 1e8 + 1 rounds to 1e8 in float32 (its spacing there is 8)
    dest = np.empty((2, 2), np.float64)
    arrays = [np.full((2, 2), 1e8, np.float32), np.ones((2, 2), np.float32)]
    accumulate_into(arrays, [1.0, 1.0], dest, np.dtype(np.float32), Buffers())
    assert dest.tolist() == [[1e8, 1e8], [1e8, 1e8]]
    # tensors of any rank, longer than a chunk, into a narrow destination
    rng = np.random.default_rng(0)
    big = [rng.standard_normal((3, CHUNK // 3 + 5)).astype(np.float32) for _ in range(2)]
    narrow = np.empty((3, CHUNK // 3 + 5), np.float16)
    accumulate_into(big, [0.25, 0.75], narrow, np.dtype(np.float32), Buffers())
    np.testing.assert_array_equal(narrow, (0.25 * big[0] + 0.75 * big[1]).astype(np.float16))
    with pytest.raises(ValueError, match="^accumulate_into: a destination of another dtype takes the whole sum at once$"):
        accumulate_into(arrays, [1.0, 1.0], dest, np.dtype(np.float32), Buffers(), first=False)


def test_add_scaled_is_dst_plus_w_times_x_for_any_w() -> None:
    from polyak._engine.kernel import add_scaled

    x = np.array([1.0, -2.0, 3.5], np.float32)
    for w in (1.0, 2.0, 0.5, -1.0, 0.0):
        dst = np.array([10.0, 20.0, 30.0], np.float32)
        add_scaled(dst, x, w, np.empty(3, np.float32))
        np.testing.assert_array_equal(dst, np.array([10.0, 20.0, 30.0], np.float32) + np.float32(w) * x)


@pytest.mark.parametrize("where", [0, CHUNK + 3, N - 1])  # the first, a middle and the last chunk
def test_accumulate_into_a_narrow_destination_reports_nan_in_any_chunk(where: int) -> None:
    from polyak._engine.kernel import accumulate_into

    arrays = [np.ones(N, np.float32), np.ones(N, np.float32)]
    arrays[1][where] = np.nan
    total = accumulate_into(arrays, [0.5, 0.5], np.empty(N, np.float16), np.dtype(np.float32), Buffers())
    assert not np.isfinite(total)
    assert np.isfinite(accumulate_into(arrays[:1], [1.0], np.empty(N, np.float16), np.dtype(np.float32), Buffers()))


def test_threads_summing_into_a_narrow_destination_never_share_scratch() -> None:
    from concurrent.futures import ThreadPoolExecutor

    # long enough that the two parts run at the same time: a shared scratch buffer (one part's
    # w·x added into the other's sum) gives errors of the order of the values themselves
    n = PARALLEL_MIN * 16 + 1000
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(n).astype(np.float16) for _ in range(3)]
    weights = np.array([0.2, 0.3, 0.5])
    want = np.average(np.stack([a.astype(np.float64) for a in arrays]), axis=0, weights=weights)
    acc = np.empty(n, np.float16)
    with ThreadPoolExecutor(max_workers=2) as pool:
        accumulate_all(arrays, weights, acc, Buffers(), pool, 2, np.dtype(np.float32))
    np.testing.assert_allclose(acc.astype(np.float64), want, rtol=2e-3, atol=2e-3)


def test_accumulate_raises_no_numpy_warning_on_overflow_or_inf(recwarn: pytest.WarningsRecorder) -> None:
    # overflow and inf - inf are found by the finiteness check and reported as polyak's own
    # error; numpy's RuntimeWarnings (an exception under -W error) must not come first
    import warnings

    big = [np.full(4, 3e38, np.float32), np.full(4, 3e38, np.float32)]
    infs = [np.full(4, np.inf, np.float32), np.full(4, -np.inf, np.float32)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for arrays in (big, infs):
            total = accumulate(arrays, [1.0, 1.0], np.empty(4, np.float32), Buffers(), first=True)
            assert not np.isfinite(total)
        from polyak._engine.kernel import probe

        for xs in (np.array([np.inf, -np.inf], np.float32), np.array([3e38, 3e38], np.float32),
                   np.array([complex(np.inf, 1), complex(-np.inf, 1)], np.complex64)):
            assert not np.isfinite(probe(xs))
    assert len(recwarn) == 0
