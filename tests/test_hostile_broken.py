"""Broken inputs of every format: one clear error naming the file, exit 2, no output.

Parametrised over the sample registry (``_formats_samples.SAMPLES``), so a new format is
covered by registering its sample maker.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import polyak
from _formats_samples import SAMPLES, SampleFormat, available, sample_state
from _hostile import leftovers, one_line_error, run_cli
from polyak.cli import main as cli_main

SAMPLE_IDS = sorted(SAMPLES)


def _sample(name: str) -> SampleFormat:
    sample = SAMPLES[name]
    if not available(sample):
        pytest.skip(f"{name} needs {', '.join(sample.needs)}")
    return sample


def _truncate(b: bytes) -> bytes:
    return b[: len(b) // 2]


def _empty(b: bytes) -> bytes:
    return b""


def _wrong_magic(b: bytes) -> bytes:
    return b"NOTMAGIC" + b[8:]


def _corrupt_header(b: bytes) -> bytes:
    return b[:8] + b"\xff" * 32 + b[40:]


def _tail_cut(b: bytes) -> bytes:
    return b[:-12]


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "truncated": _truncate,
    "zero-length": _empty,
    "wrong-magic": _wrong_magic,
    "corrupted-header": _corrupt_header,
    "tail-cut": _tail_cut,
}


def _members(tmp_path: Path, sample: SampleFormat, n: int = 2) -> list[Path]:
    paths = []
    for i in range(n):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        path, _files = sample.make(folder, sample_state(i))
        paths.append(path)
    return paths


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_broken_file_one_clear_error(tmp_path: Path, name: str, damage: str, capsys: pytest.CaptureFixture[str]) -> None:
    sample = _sample(name)
    good, bad = _members(tmp_path, sample)
    files = sorted((tmp_path / "m1").iterdir())
    for victim in [f for f in files if f.is_file()]:
        original = victim.read_bytes()
        victim.write_bytes(DAMAGES[damage](original))
        with pytest.raises(polyak.PolyakError, match=re.escape(str(bad))):
            polyak.open_source(bad)
        out = tmp_path / "out" / "avg.safetensors"
        out.parent.mkdir(exist_ok=True)
        status = cli_main(["average", str(good), str(bad), "-o", str(out), "--order", "given", "-q"])
        assert status == 2
        assert str(bad) in one_line_error(capsys.readouterr().err)
        assert not out.exists() and leftovers(tmp_path) == []
        victim.write_bytes(original)


@pytest.mark.parametrize("name", [n for n in SAMPLE_IDS if SAMPLES[n].format != "safetensors-index"])
def test_wrong_suffix_names_file_and_fix(tmp_path: Path, name: str) -> None:
    sample = _sample(name)
    (path,) = _members(tmp_path, sample, 1)
    wrong = ".npz" if sample.format != "npz" else ".safetensors"
    renamed = path.with_name("renamed" + wrong)
    shutil.copy(path, renamed)
    with pytest.raises(polyak.FormatError, match=f"(?s){re.escape(str(renamed))}.*--format {sample.format}"):
        polyak.open_source(renamed)
    # The fix works: naming the format reads it.
    assert polyak.open_source(renamed, format=sample.format).keys()


def test_unknown_suffix_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "weights.data"
    np.savez(tmp_path / "x.npz", w=np.ones(2))
    shutil.copy(tmp_path / "x.npz", path)
    with pytest.raises(polyak.FormatError, match=r"weights\.data.*--format npz"):
        polyak.open_source(path)
    with pytest.raises(polyak.FormatError, match="no such file"):
        polyak.open_source(tmp_path / "nope.safetensors")
    assert cli_main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors" in one_line_error(capsys.readouterr().err)
    (tmp_path / "folder.safetensors").mkdir()
    assert cli_main(["inspect", str(tmp_path / "folder.safetensors")]) == 2
    one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("kind", ["keys", "shape", "dtype"])
@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_mismatched_members_one_error_naming_files(
    tmp_path: Path, name: str, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = _sample(name)
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    state = sample_state(0)
    other = dict(sample_state(1))
    if kind == "keys":
        other["extra.weight"] = other.pop("layer.0.bias")
    elif kind == "shape":
        other["layer.0.weight"] = np.zeros((5, 3), np.float32)
    else:
        other["layer.0.weight"] = other["layer.0.weight"].astype(np.float64)
    pa, _ = sample.make(a, state)
    pb, _ = sample.make(b, other)
    with pytest.raises(polyak.MismatchError, match=f"(?s)^(?=.*{re.escape(str(pa))})(?=.*{re.escape(str(pb))})"):
        polyak.average([pa, pb], order="given")
    out = tmp_path / "avg.safetensors"
    assert cli_main(["average", str(pa), str(pb), "-o", str(out), "--order", "given", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polyak: error:") and "Traceback" not in err and str(pa) in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_broken_member_via_real_subprocess(tmp_path: Path) -> None:
    """The installed entry point, not just main(): exit 2, one line, nothing written."""
    sample = _sample("safetensors")
    good, bad = _members(tmp_path, sample)
    bad.write_bytes(_truncate(bad.read_bytes()))
    out = tmp_path / "avg.safetensors"
    proc = run_cli(["average", str(good), str(bad), "-o", str(out), "--order", "given"])
    assert proc.returncode == 2
    assert str(bad) in one_line_error(proc.stderr)
    assert not out.exists() and leftovers(tmp_path) == []
