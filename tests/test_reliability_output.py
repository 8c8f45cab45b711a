"""Output safety: disk full, read-only folders, output = input, existing outputs, shards.

Every refusal must come before any averaging work, name the path and the fix, and leave
no output and no temporary file behind.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import polyak
import polyak._atomic as atomic
from _formats_samples import SAMPLES, available, sample_state
from _hostile import leftovers, one_line_error
from polyak.cli import main as cli_main


def _members(folder: Path, n: int = 3, *, size: int = 1000) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        path = folder / f"ckpt_{i + 1}.safetensors"
        polyak.save({"a": rng.standard_normal(size).astype(np.float32), "b": rng.standard_normal((size, 4)).astype(np.float32)}, path)
        paths.append(path)
    return paths


class _Enospc:
    """Make file writes fail with ENOSPC after ``budget`` bytes (a disk that fills up)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def wrap(self, f: Any) -> Any:
        outer = self
        real_write = f.write

        def write(data: Any) -> int:
            n = memoryview(data).nbytes
            if n > outer.budget:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            outer.budget -= n
            return int(real_write(data))

        f.write = write
        return f


@pytest.mark.parametrize("budget", [0, 100, 5000, 20_000])
@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt", "sharded"])
def test_disk_full_leaves_nothing_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str, budget: int) -> None:
    if suffix == ".pt":
        pytest.importorskip("torch")
    members = _members(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    name = "avg.safetensors" if suffix == "sharded" else f"avg{suffix}"
    out = out_dir / name
    disk = _Enospc(budget)
    real_open = open

    def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if "x" in mode and atomic.TEMP_MARK in str(file):
            return disk.wrap(f)
        return f

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)
    extra = {"shard_size": 10_000} if suffix == "sharded" else {}
    with pytest.raises(polyak.OutputError, match="no space left") as info:
        polyak.average(members, out=out, **extra)  # type: ignore[arg-type]
    assert str(out_dir) in str(info.value)
    assert sorted(p.name for p in out_dir.iterdir()) == []
    assert leftovers(tmp_path) == []


def test_disk_full_in_fsync_or_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = _members(tmp_path / "in")
    out = tmp_path / "avg.safetensors"

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_space)
    with pytest.raises(polyak.OutputError, match="no space left"):
        polyak.average(members, out=out)
    monkeypatch.undo()
    assert not out.exists() and leftovers(tmp_path) == []

    def no_rename(a: Any, b: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(atomic.os, "replace", no_rename)
    with pytest.raises(polyak.OutputError, match=r"avg\.safetensors"):
        polyak.average(members, out=out)
    monkeypatch.undo()
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_refused_up_front(tmp_path: Path) -> None:
    members = _members(tmp_path / "in")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(polyak.OutputError, match="not writable"):
            polyak.average(members, out=ro / "avg.safetensors")
    finally:
        ro.chmod(0o755)


def test_read_only_folder_refused_up_front_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root may write anywhere, so the check is exercised through os.access."""
    members = _members(tmp_path / "in")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(atomic.os, "access", lambda p, m: False if Path(p) == ro else real_access(p, m))
    opened: list[Any] = []
    monkeypatch.setattr(polyak._engine.average, "open_members", lambda *a, **k: opened.append(a))  # type: ignore[attr-defined]
    with pytest.raises(polyak.OutputError, match="not writable"):
        polyak.average(members, out=ro / "avg.safetensors")
    assert opened == []  # refused before any member was opened


def _spellings(members: list[Path], tmp_path: Path) -> list[Path]:
    target = members[-1]
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    hard = tmp_path / "hard.safetensors"
    os.link(target, hard)
    dotted = target.parent / ".." / target.parent.name / "." / target.name
    return [target, link, hard, dotted]


def test_output_equal_to_an_input_refused_under_any_spelling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    members = _members(tmp_path / "in")
    before = members[-1].read_bytes()
    opened: list[Any] = []
    real = polyak._engine.average.open_members  # type: ignore[attr-defined]
    monkeypatch.setattr(polyak._engine.average, "open_members", lambda *a, **k: opened.append(a) or real(*a, **k))  # type: ignore[attr-defined]
    for spelling in _spellings(members, tmp_path):
        with pytest.raises(polyak.OutputError, match="is also one of the inputs"):
            polyak.average(members, out=spelling, force=True)
    monkeypatch.chdir(members[-1].parent)
    with pytest.raises(polyak.OutputError, match="is also one of the inputs"):
        polyak.average(members, out=members[-1].name, force=True)
    assert opened == []
    assert members[-1].read_bytes() == before


def test_output_over_an_input_shard_refused(tmp_path: Path) -> None:
    st = pytest.importorskip("safetensors.numpy")
    del st
    sample = SAMPLES["safetensors-index"]
    folders = [tmp_path / "a", tmp_path / "b"]
    indexes = []
    for i, f in enumerate(folders):
        f.mkdir()
        indexes.append(sample.make(f, sample_state(i))[0])
    shard = sorted(folders[0].glob("model-*.safetensors"))[0]
    before = shard.read_bytes()
    with pytest.raises(polyak.OutputError, match="is also one of the inputs"):
        polyak.average(indexes, out=shard, force=True)
    # A sharded output whose index would replace an input index (the 88 bytes of tensors
    # make 3 shards of at most 40 bytes; a single file would not touch the index).
    with pytest.raises(polyak.OutputError, match="is also one of the inputs"):
        polyak.average(indexes, out=folders[0] / "model.safetensors", shard_size="40B", force=True)
    assert shard.read_bytes() == before
    assert leftovers(tmp_path) == []
    polyak.open_source(indexes[0]).close()


def test_existing_output_refused_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    members = _members(tmp_path / "in")
    out = tmp_path / "avg.safetensors"
    out.write_bytes(b"precious")
    assert cli_main(["average", *map(str, members), "-o", str(out), "-q"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(out) in line and "--force" in line
    assert out.read_bytes() == b"precious"
    assert cli_main(["average", *map(str, members), "-o", str(out), "-q", "--force"]) == 0
    assert polyak.inspect(out).parameters == 5000


def test_existing_sharded_output_refused_without_force_and_replaced_cleanly(tmp_path: Path) -> None:
    members = _members(tmp_path / "in", size=2000)
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    first = polyak.average(members, out=out, shard_size="10KB")
    index = out.parent / "model.safetensors.index.json"
    assert index in first.files and len(first.files) > 2
    with pytest.raises(polyak.OutputError, match="already exists"):
        polyak.average(members, out=out, shard_size="10KB")
    # Replace with fewer, larger shards: the old shards the new index does not use are gone.
    second = polyak.average(members[1:], out=out, shard_size="30KB", force=True)
    on_disk = sorted(p.name for p in out.parent.iterdir())
    assert on_disk == sorted(p.name for p in second.files)
    wmap = json.loads(index.read_text())["weight_map"]
    assert set(wmap.values()) <= set(on_disk)
    expected = polyak.average(members[1:])
    got = polyak.average([index, index.with_name("x")][:1])
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_sharded_replace_with_same_names_never_mixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash after the first shard rename: no index (no output), never old index + new shard."""
    members = _members(tmp_path / "in", size=2000)
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    polyak.average(members, out=out, shard_size="20KB")
    index = out.parent / "model.safetensors.index.json"
    real_replace = os.replace
    calls = {"n": 0}

    def crash_after_first(a: Any, b: Any) -> None:
        if calls["n"] == 1:
            raise KeyboardInterrupt("a crash between two renames")
        calls["n"] += 1
        real_replace(a, b)

    monkeypatch.setattr(atomic.os, "replace", crash_after_first)
    with pytest.raises(KeyboardInterrupt, match="a crash between two renames"):
        polyak.average(members[1:], out=out, shard_size="20KB", force=True)
    monkeypatch.undo()
    assert not index.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("name", sorted(n for n, s in SAMPLES.items() if s.writable))
def test_save_and_average_round_trip_every_writable_format(tmp_path: Path, name: str) -> None:
    sample = SAMPLES[name]
    if not available(sample):
        pytest.skip(f"{name} needs {', '.join(sample.needs)}")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    pa, _ = sample.make(a, sample_state(0))
    pb, _ = sample.make(b, sample_state(1))
    out = tmp_path / "out" / f"avg{sample.suffix}"
    out.parent.mkdir()
    result = polyak.average([pa, pb], out=out, order="given")
    expected = polyak.average([pa, pb], order="given")
    got = polyak.average([result.files[-1] if name != "safetensors-index" else out], order="given")
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    assert leftovers(tmp_path) == []


def test_parallel_sharded_replace_and_overlap(tmp_path: Path) -> None:
    """The --workers path commits like the single-process writer (no mixed shards)."""
    members = _members(tmp_path / "in", size=2000)
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    polyak.average(members, out=out, shard_size="10KB", workers=2)
    second = polyak.average(members[1:], out=out, shard_size="30KB", workers=2, force=True)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(p.name for p in second.files)
    index = out.parent / "model.safetensors.index.json"
    with pytest.raises(polyak.OutputError, match="is also one of the inputs"):
        polyak.average([index, members[0]], out=index, workers=2, force=True, order="given")
    assert leftovers(tmp_path) == []
