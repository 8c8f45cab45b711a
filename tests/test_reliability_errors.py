"""Every error path leaves nothing behind, in every output kind; what is written is finite.

Each error below is raised at a different moment of an average (options checked first;
a NaN or a cast overflow in the middle of the tensors, after the output's temporary file
exists; a mismatch in a middle member), and each output kind is written differently
(one file, shards, worker threads, zip, ``torch.save``, HDF5). For every pair the error is
one :class:`polyak.PolyakError` that names the problem, and no output and no temporary
file are left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import polyak
from _hostile import leftovers, one_line_error
from polyak.cli import main as cli_main

# name -> (suffix, average() keywords, modules needed)
OUTPUTS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "safetensors": (".safetensors", {}, ()),
    "sharded": (".safetensors", {"shard_size": "1KB"}, ()),
    "workers": (".safetensors", {"workers": 2}, ()),
    "npz": (".npz", {}, ()),
    "pt": (".pt", {}, ("torch",)),
    "weights.h5": (".weights.h5", {}, ("h5py",)),
}


def _members(folder: Path, big: float = 1.0, *, nan: bool = False, shape: bool = False) -> list[Path]:
    """Three members; the tensor "m" sits between "a" and "z" in every file's order."""
    folder.mkdir()
    paths = []
    for i in range(3):
        state = {
            "a": np.full(300, i, np.float32),
            "m": np.full(400, big * (1 + i / 100), np.float32),
            "z": np.full(300, -i, np.float32),
        }
        if i == 1 and nan:
            state["m"][123] = np.nan
        if i == 1 and shape:
            state["m"] = np.ones(401, np.float32)
        p = folder / f"ck_{i}.safetensors"
        polyak.save(state, p)
        paths.append(p)
    return paths


# name -> (member keywords, average() keywords, error, match)
ERRORS: dict[str, tuple[dict[str, Any], dict[str, Any], type[Exception], str]] = {
    "dtype-object": ({}, {"dtype": "object"}, polyak.ConfigError, r"--dtype must be a floating-point dtype .*got 'object'"),
    "dtype-U4": ({}, {"dtype": "U4"}, polyak.ConfigError, r"--dtype must be a floating-point dtype .*got 'U4'"),
    "dtype-V4": ({}, {"dtype": "V4"}, polyak.ConfigError, r"--dtype must be a floating-point dtype .*got 'V4'"),
    "dtype-unknown": ({}, {"dtype": "float99"}, polyak.ConfigError, r"unknown dtype 'float99'"),
    "cast-float16-inf": (
        {"big": 3e38}, {"dtype": "float16"}, polyak.NonFiniteError,
        r'tensor "m": its average reaches 3.0\d*e\+38, beyond the range of float16 \(largest finite value 65504\); written as float16 it would be Inf',
    ),
    "cast-float8_e4m3fn-nan": (
        {"big": 1000.0}, {"dtype": "float8_e4m3fn"}, polyak.NonFiniteError,
        r'tensor "m": its average reaches 1010, beyond the range of float8_e4m3fn \(largest finite value 448\); written as float8_e4m3fn it would be NaN',
    ),
    "nan-in-middle-member": (
        {"nan": True}, {}, polyak.NonFiniteError, r'tensor "m" has NaN or Inf values in: .*ck_1\.safetensors',
    ),
    "shape-in-middle-member": (
        {"shape": True}, {}, polyak.MismatchError, r'ck_1\.safetensors: tensor "m" has shape \(401,\), .*ck_2\.safetensors has \(400,\)',
    ),
}


@pytest.mark.parametrize("error", list(ERRORS))
@pytest.mark.parametrize("output", list(OUTPUTS))
def test_every_error_leaves_no_output_and_no_temp(tmp_path: Path, output: str, error: str) -> None:
    suffix, out_kwargs, needs = OUTPUTS[output]
    for module in needs:
        pytest.importorskip(module)
    member_kwargs, kwargs, exc, match = ERRORS[error]
    if output == "weights.h5" and kwargs.get("dtype", "").startswith("float8"):
        kwargs = {"dtype": "float16"}  # h5 stores float8 as opaque bytes; the overflow is the same class
        member_kwargs, match = {"big": 3e38}, ERRORS["cast-float16-inf"][3]
    members = _members(tmp_path / "in", **member_kwargs)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"avg{suffix}"
    with pytest.raises(exc, match=match):
        polyak.average(members, out=out, **out_kwargs, **kwargs)
    assert sorted(out_dir.iterdir()) == []
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("dtype", "value", "became", "top"),
    [
        ("float16", 3e38, "Inf", "65504"),
        ("bfloat16", 3.4e38, "Inf", r"3.38953e\+38"),
        ("float8_e4m3fn", 1000.0, "NaN", "448"),
        ("float8_e5m2", 1e5, "Inf", "57344"),
    ],
)
def test_what_is_written_is_finite_after_the_cast(tmp_path: Path, dtype: str, value: float, became: str, top: str) -> None:
    """The issue's cases: finite float32 averages that the cast to --dtype turns into Inf/NaN."""
    members = [{"ok": np.ones(5, np.float32), "w": np.array([1.0, value, -value], np.float32)} for _ in range(2)]
    # Independent reference: the cast really gives a non-finite value here.
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.array([value], np.float32).astype(ml_dtypes.finfo(getattr(ml_dtypes, dtype, np.float16)).dtype)
    assert not np.isfinite(cast.astype(np.float32)).all()
    with pytest.raises(polyak.NonFiniteError, match=rf'tensor "w": .*range of {dtype} \(largest finite value {top}\); written as {dtype} it would be {became}'):
        polyak.average(members, dtype=dtype)
    # Just inside the range: written, and equal to numpy's own cast.
    inside = float(ml_dtypes.finfo(cast.dtype).max)
    members = [{"w": np.array([inside, -inside], np.float32)} for _ in range(2)]
    got = polyak.average(members, dtype=dtype)["w"]
    np.testing.assert_array_equal(got.astype(np.float32), np.array([inside, -inside], np.float32))


def test_bad_dtype_and_cast_overflow_via_cli_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = _members(tmp_path / "in", big=3e38)
    out = tmp_path / "x.safetensors"
    for dtype, expect in [("object", "floating-point dtype"), ("U4", "floating-point dtype"), ("float16", "would be Inf")]:
        assert cli_main(["average", *map(str, members), "-o", str(out), "--dtype", dtype, "-q"]) == 2
        assert expect in one_line_error(capsys.readouterr().err)
        assert not out.exists() and leftovers(tmp_path) == []
