"""The averaging engine against numpy.average, and its validation."""

import json

import ml_dtypes
import numpy as np
import pytest

import polyak
from _helpers import (
    random_state,
    read_safetensors,
    reference_average,
    tutorial_weights,
    write_members,
)
from polyak import ConfigError, MismatchError, NonFiniteError, OutputError

TOL = {  # relative-to-scale tolerances per dtype: float32 accumulation, then rounding
    np.dtype(np.float64): 1e-12,
    np.dtype(np.float32): 1e-6,
    np.dtype(np.float16): 1e-3,
    np.dtype(ml_dtypes.bfloat16): 8e-3,
}


def assert_close_state(got, want):
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        if w.dtype.kind in "biu":
            np.testing.assert_array_equal(g, w)
        else:
            tol = TOL[w.dtype]
            np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), rtol=tol, atol=tol, err_msg=name)


@pytest.mark.parametrize("scheme", ["equal", "linear", "exponential"])
@pytest.mark.parametrize("n", [1, 2, 5])
def test_in_memory_matches_numpy_average(scheme, n):
    rng = np.random.default_rng(n)
    states = [random_state(rng) for _ in range(n)]
    got = polyak.average(states, scheme=scheme)
    assert_close_state(got, reference_average(states, tutorial_weights(scheme, n)))


@pytest.mark.parametrize("scheme", ["equal", "linear", "exponential"])
def test_files_match_numpy_average(tmp_path, scheme):
    rng = np.random.default_rng(7)
    states = [random_state(rng) for _ in range(6)]
    paths = write_members(tmp_path, states)
    out = tmp_path / "avg.safetensors"
    res = polyak.average(paths, scheme=scheme, alpha=3.0, out=out)
    got = read_safetensors(out)  # read back by the safetensors package
    want = reference_average(states, tutorial_weights(scheme, 6, 3.0))
    assert_close_state({k: got[k] for k in want}, want)
    assert res.files == [out]
    assert res.averaged == 6 and res.copied == 2


def test_float32_is_exact_to_accumulator_precision():
    rng = np.random.default_rng(0)
    states = [{"w": rng.normal(size=1000).astype(np.float32)} for _ in range(10)]
    w = tutorial_weights("exponential", 10)
    got = polyak.average(states, scheme="exponential")["w"]
    want = np.average(np.stack([s["w"] for s in states]).astype(np.float64), axis=0, weights=w)
    assert np.max(np.abs(got - want)) < 1e-6


def test_bfloat16_accumulates_in_float32():
    # 20 bf16 members close together: summing in bf16 loses the spread, float32 does not.
    rng = np.random.default_rng(1)
    base = rng.normal(0, 0.02, size=10_000)
    members = [{"w": (base + rng.normal(0, 1e-3, size=base.size)).astype(ml_dtypes.bfloat16)} for _ in range(20)]
    got = polyak.average(members)["w"]
    assert got.dtype == ml_dtypes.bfloat16
    exact = np.mean([m["w"].astype(np.float64) for m in members], axis=0)
    err = np.abs(got.astype(np.float64) - exact)
    # float32 accumulation then one rounding to bf16: within half a bf16 spacing,
    # which is at most |x|·2^-8 (8 significant bits).
    assert np.all(err <= np.abs(exact) * 2.0**-8 * 1.0001 + 1e-9)
    # a bf16 running sum (fairseq-style) is far worse on the same data
    acc = members[0]["w"].copy()
    for m in members[1:]:
        acc = (acc + m["w"]).astype(ml_dtypes.bfloat16)
    naive = np.abs((acc.astype(np.float64) / 20) - exact)
    assert naive.max() > 3 * err.max()


def test_float64_precision_kept():
    a = {"w": np.array([1.0 + 1e-15, 1e300])}
    b = {"w": np.array([1.0 - 1e-15, 1e300])}
    got = polyak.average([a, b])["w"]
    assert got.dtype == np.float64
    assert got[0] == 1.0 and got[1] == 1e300


def test_integers_and_bools_copied_from_newest():
    states = [{"n": np.array(i, np.int64), "b": np.array([i % 2 == 0]), "w": np.full(2, float(i), np.float32)} for i in range(4)]
    got = polyak.average(states)
    assert got["n"] == 3 and got["b"].tolist() == [False]
    assert got["w"].tolist() == [1.5, 1.5]


def test_int_policy_error():
    states = [{"n": np.array(1), "w": np.zeros(2)}] * 2
    with pytest.raises(MismatchError, match="int_policy is 'error'"):
        polyak.average([dict(s) for s in states], int_policy="error")


def test_dtype_override():
    states = [{"w": np.ones(3, np.float16), "n": np.array(1)}, {"w": np.zeros(3, np.float16), "n": np.array(2)}]
    got = polyak.average(states, dtype="float32")
    assert got["w"].dtype == np.float32 and got["n"].dtype == np.int64


def test_mismatches_listed_all_at_once(tmp_path):
    a = {"x": np.zeros((2, 2), np.float32), "y": np.zeros(3, np.float32), "z": np.zeros(1, np.float32)}
    b = {"x": np.zeros((2, 3), np.float32), "y": np.zeros(3, np.float64), "extra": np.zeros(1, np.float32)}
    c = dict(a)
    pa, pb, pc = write_members(tmp_path, [b, a, c], stem="m")
    with pytest.raises(MismatchError, match=r"^the 3 members do not match \(4 problem\(s\)\):\n") as info:
        polyak.average([pa, pb, pc])
    msg = str(info.value)
    assert "m_0.safetensors" in msg and "m_2.safetensors" in msg
    assert '"z"' in msg and '"extra"' in msg
    assert "shape (2, 3)" in msg and "float64" in msg
    assert "4 problem(s)" in msg


def test_prefix_hint_and_strip():
    a = {"module.w": np.ones(2, np.float32)}
    b = {"w": np.zeros(2, np.float32)}
    with pytest.raises(MismatchError, match="--strip-prefix module."):
        polyak.average([a, b])
    got = polyak.average([a, b], strip_prefix=["module."])
    assert got["w"].tolist() == [0.5, 0.5]


def test_nan_member_named(tmp_path):
    states = [{"ok": np.zeros(3, np.float32), "w": np.ones(3, np.float32)} for _ in range(3)]
    states[1]["w"] = np.array([1.0, np.nan, 1.0], np.float32)
    paths = write_members(tmp_path, states)
    out = tmp_path / "avg.safetensors"
    with pytest.raises(NonFiniteError, match='^tensor "w" has NaN or Inf values in: ') as info:
        polyak.average(paths, out=out)
    assert "ckpt_1.safetensors" in str(info.value) and '"w"' in str(info.value)
    assert "ckpt_0" not in str(info.value)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "polyak-tmp" in p.name]


def test_last_and_order(tmp_path):
    states = [{"w": np.full(1, float(i), np.float32)} for i in range(12)]
    paths = write_members(tmp_path, states, stem="model")
    # shuffled input order; number ordering must put model_9 before model_10
    shuffled = [paths[i] for i in (10, 2, 9, 11, 0, 1, 3, 4, 5, 6, 7, 8)]
    got = polyak.average(shuffled, last=3)
    assert got["w"].tolist() == [10.0]  # mean of 9, 10, 11
    got = polyak.average(shuffled, last=2, order="name")  # model_8 < model_9 by plain name
    assert got["w"].tolist() == [8.5]
    got = polyak.average(shuffled, last=1, order="given")
    assert got["w"].tolist() == [8.0]
    with pytest.raises(ConfigError, match="only 12 members"):
        polyak.average(paths, last=13)


def test_metadata_recorded(tmp_path):
    rng = np.random.default_rng(3)
    paths = write_members(tmp_path, [random_state(rng, dtypes=False) for _ in range(3)])
    out = tmp_path / "avg.safetensors"
    polyak.average(paths, scheme="linear", out=out, checksum=True)
    rec = json.loads(polyak.inspect(out).metadata["polyak"])
    assert rec["scheme"] == "linear"
    assert rec["weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert [m["file"] for m in rec["members"]] == [p.name for p in paths]
    assert all(len(m["sha256"]) == 64 and m["bytes"] > 0 for m in rec["members"])


def test_refuses_existing_output_and_input_as_output(tmp_path):
    paths = write_members(tmp_path, [{"w": np.zeros(2, np.float32)}] * 2)
    out = tmp_path / "avg.safetensors"
    polyak.average(paths, out=out)
    with pytest.raises(OutputError, match="--force"):
        polyak.average(paths, out=out)
    polyak.average(paths, out=out, force=True)
    with pytest.raises(OutputError, match="also one of the inputs"):
        polyak.average(paths, out=paths[0], force=True)


def test_large_tensors_split_across_threads_match_numpy(tmp_path):
    # above polyak._engine.kernel.PARALLEL_MIN elements the sum runs in parallel parts
    from polyak._engine.kernel import PARALLEL_MIN

    rng = np.random.default_rng(11)
    n = PARALLEL_MIN * 3 + 12345
    states = [{"big": rng.normal(size=n).astype(np.float32), "half": rng.normal(size=n).astype(np.float16)} for _ in range(4)]
    paths = write_members(tmp_path, states)
    out = tmp_path / "avg.safetensors"
    polyak.average(paths, scheme="linear", out=out)
    assert_close_state(read_safetensors(out), reference_average(states, tutorial_weights("linear", 4)))
    states[2]["big"][n - 5] = np.inf  # in the last part
    bad = write_members(tmp_path, states, stem="bad")
    with pytest.raises(NonFiniteError, match="bad_2.safetensors"):
        polyak.average(bad, out=tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
