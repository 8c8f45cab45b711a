"""Numerical safety: 0-d, empty and large tensors, strides, unicode names, float64, NaN/Inf."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import polyak
from _helpers import tutorial_weights
from _hostile import leftovers, one_line_error
from polyak.cli import main as cli_main

SUFFIXES = [".safetensors", ".npz", ".pt"]


def _needs(suffix: str) -> None:
    if suffix == ".pt":
        pytest.importorskip("torch")


def _save_members(tmp_path: Path, states: list[dict[str, np.ndarray]], suffix: str) -> list[Path]:
    paths = []
    for i, state in enumerate(states):
        p = tmp_path / f"m_{i}{suffix}"
        polyak.save(state, p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_zero_d_and_empty_tensors_keep_their_shapes(tmp_path: Path, suffix: str) -> None:
    _needs(suffix)
    states = [
        {
            "scalar": np.array(float(i), np.float32),
            "empty": np.zeros((0,), np.float32),
            "empty2d": np.zeros((3, 0), np.float16),
            "count": np.array(10 * i, np.int64),
            "w": np.full((2, 2), float(i), np.float32),
        }
        for i in range(3)
    ]
    paths = _save_members(tmp_path, states, suffix)
    out = tmp_path / f"avg{suffix}"
    polyak.average(paths, out=out)
    with polyak.open_source(out) as src:
        got = {k: np.array(src.read(k)) for k in src.infos()}
    assert got["scalar"].shape == () and got["scalar"] == np.float32(1.0)
    assert got["empty"].shape == (0,) and got["empty2d"].shape == (3, 0) and got["empty2d"].dtype == np.float16
    assert got["count"].shape == () and got["count"] == 20  # copied from the newest
    np.testing.assert_array_equal(got["w"], np.ones((2, 2), np.float32))


def test_large_tensor_streams_and_matches_numpy(tmp_path: Path) -> None:
    n = 50 * 2**20 // 4  # 50 MB of float32 per member
    rng = np.random.default_rng(0)
    a = rng.standard_normal(n, dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    paths = _save_members(tmp_path, [{"big": a}, {"big": b}], ".safetensors")
    out = tmp_path / "avg.safetensors"
    polyak.average(paths, out=out, scheme="linear")
    with polyak.open_source(out) as src:
        got = src.read("big")
        expected = (np.float32(1 / 3) * a + np.float32(2 / 3) * b).astype(np.float32)
        np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-7)
        del got


def test_non_contiguous_numpy_members(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    bases = [rng.standard_normal((6, 8)).astype(np.float32) for _ in range(3)]
    views = [
        {"t": x.T, "s": x[::2, 1::3], "f": np.asfortranarray(x), "neg": x[::-1, ::-1]}
        for x in bases
    ]
    assert not views[0]["t"].flags.c_contiguous and not views[0]["s"].flags.c_contiguous
    got = polyak.average(views)
    for k in views[0]:
        expected = np.mean(np.stack([np.ascontiguousarray(v[k]) for v in views]), axis=0)
        np.testing.assert_allclose(got[k], expected, rtol=1e-6, atol=1e-6)
    for suffix in (".safetensors", ".npz"):
        p = tmp_path / f"nc{suffix}"
        polyak.save(views[0], p)
        with polyak.open_source(p) as src:
            for k, v in views[0].items():
                np.testing.assert_array_equal(src.read(k), v)


def test_strided_torch_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    bases = [torch.randn(6, 8, generator=gen) for _ in range(3)]
    members = [{"t": x.t(), "s": x[:, ::2], "bf": x.to(torch.bfloat16).t()} for x in bases]
    assert not members[0]["t"].is_contiguous()
    got = polyak.average(members, scheme="linear")
    w = tutorial_weights("linear", 3)
    for k in ("t", "s"):
        expected = sum(wi * m[k].double().numpy() for wi, m in zip(w, members, strict=True))
        np.testing.assert_allclose(got[k], expected, rtol=1e-6, atol=1e-7)
    exp_bf = sum(wi * m["bf"].float().numpy().astype(np.float64) for wi, m in zip(w, members, strict=True))
    np.testing.assert_allclose(got["bf"].astype(np.float32), exp_bf, rtol=1e-2, atol=1e-2)
    p = tmp_path / "strided.pt"
    polyak.save(members[0], p)
    with polyak.open_source(p) as src:
        np.testing.assert_array_equal(src.read("t"), members[0]["t"].numpy())
        np.testing.assert_array_equal(src.read("s"), members[0]["s"].numpy())


UNICODE_NAMES = ["层.权重", "naïve.bias", "emoji🙂.weight", "quote\"and\\slash", "space name", "ключ"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_unicode_tensor_names_round_trip_and_average(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    _needs(suffix)
    states = [{n: np.full(3, float(i + j), np.float32) for j, n in enumerate(UNICODE_NAMES)} for i in range(2)]
    paths = _save_members(tmp_path, states, suffix)
    out = tmp_path / f"avg{suffix}"
    assert cli_main(["average", *map(str, paths), "-o", str(out), "-q"]) == 0
    with polyak.open_source(out) as src:
        assert sorted(src.infos()) == sorted(UNICODE_NAMES)
        for j, n in enumerate(UNICODE_NAMES):
            np.testing.assert_array_equal(src.read(n), np.full(3, 0.5 + j, np.float32))
    assert cli_main(["inspect", str(out), "--all"]) == 0
    assert "层.权重" in capsys.readouterr().out


@pytest.mark.parametrize("scheme", ["equal", "linear", "exponential"])
def test_float64_precision_kept(tmp_path: Path, scheme: str) -> None:
    rng = np.random.default_rng(7)
    members = [{"x": 1.0 + rng.random(1000), "y": rng.standard_normal(1000) * 1e6} for _ in range(5)]
    w = tutorial_weights(scheme, 5, 2.0)
    got = polyak.average(members, scheme=scheme)
    paths = _save_members(tmp_path, members, ".safetensors")
    out = tmp_path / "avg.safetensors"
    polyak.average(paths, out=out, scheme=scheme, order="given")
    with polyak.open_source(out) as src:
        on_disk = {k: np.array(src.read(k)) for k in ("x", "y")}
    for k in ("x", "y"):
        stack = np.stack([m[k] for m in members])
        expected = np.average(stack, axis=0, weights=w)
        assert got[k].dtype == np.float64 and on_disk[k].dtype == np.float64
        scale = np.max(np.abs(stack), axis=0)
        # 1e-15 of the members' magnitude (a few float64 ulps): no float32 step anywhere.
        assert np.all(np.abs(got[k] - expected) <= 1e-15 * scale), np.max(np.abs(got[k] - expected) / scale)
        np.testing.assert_array_equal(on_disk[k], got[k])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_member_reported_with_member_and_tensor(tmp_path: Path, bad: float, capsys: pytest.CaptureFixture[str]) -> None:
    states = [{"ok": np.ones(4, np.float32), "layer.w": np.ones(4, np.float32)} for _ in range(3)]
    states[1]["layer.w"] = np.array([1.0, bad, 1.0, 1.0], np.float32)
    paths = _save_members(tmp_path, states, ".safetensors")
    with pytest.raises(polyak.NonFiniteError, match=f'^tensor "layer.w" has NaN or Inf values in: {re.escape(str(paths[1]))}\\. ') as info:
        polyak.average(paths)
    assert str(paths[0]) not in str(info.value)
    out = tmp_path / "avg.safetensors"
    assert cli_main(["average", *map(str, paths), "-o", str(out), "-q"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "layer.w" in line and str(paths[1]) in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_overflow_while_averaging_reported(tmp_path: Path) -> None:
    big = np.finfo(np.float16).max
    states = [{"w": np.full(4, big, np.float16)} for _ in range(2)]
    # float16 members are accumulated in float32, so their average does not overflow.
    got = polyak.average(states)
    assert np.all(np.isfinite(got["w"])) and got["w"][0] == big
    f32 = [{"w": np.full(4, np.finfo(np.float32).max, np.float32)} for _ in range(2)]
    got32 = polyak.average(f32, weights=[1.0, 1.0])
    assert np.all(np.isfinite(got32["w"]))
