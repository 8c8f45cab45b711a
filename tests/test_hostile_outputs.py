"""Outputs never destroy what polyak did not write: the output policy in every mode.

One policy (``polyak._atomic.check_outputs``, asked by the engine for every file an average
will write) holds for every mode: a single file, ``shard_size``, an ``.index.json`` name,
``workers``, ``distributed``. Each mode is run here against the same hostile folder:

* an input that sits (under any spelling: the same path, a symbolic link, a hard link, a
  ``..`` path, a link at the output name) where the output would write one of its files;
* a file of someone else at one of those names (replaced only with ``force``);
* an old index that lists inputs, strangers' files and itself (only stale shards of this
  output may be removed);
* something that is not a regular file at an output name (FIFO, socket, folder, device,
  symbolic link to one of these).
"""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import polyak
from _hostile import leftovers, one_line_error
from polyak.cli import main as cli_main

# name -> (average() keywords, CLI flags, output name)
MODES: dict[str, tuple[dict[str, Any], list[str], str]] = {
    "single": ({}, [], "avg.safetensors"),
    "shard-size": ({"shard_size": "10KB"}, ["--shard-size", "10KB"], "avg.safetensors"),
    "index-name": ({}, [], "avg.safetensors.index.json"),
    "workers": ({"workers": 2}, ["--workers", "2"], "avg.safetensors"),
    "workers+shard-size": ({"workers": 2, "shard_size": "10KB"}, ["--workers", "2", "--shard-size", "10KB"], "avg.safetensors"),
    "distributed": ({"distributed": True}, ["--distributed"], "avg.safetensors"),
}
SHARDED = [m for m in MODES if m != "single"]


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # 4 kB + 16 kB: two shards of at most 10 kB, or one per worker.
    return {"a": rng.standard_normal(1000).astype(np.float32), "b": rng.standard_normal((1000, 4)).astype(np.float32)}


@pytest.fixture
def dist_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A one-rank gloo group in this process: ``distributed=True`` joins it (as under torchrun)."""
    torch = pytest.importorskip("torch")
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    store = tmp_path_factory.mktemp("store") / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mode(request: pytest.FixtureRequest, mode: str) -> tuple[dict[str, Any], list[str], str]:
    if mode == "distributed":
        request.getfixturevalue("dist_group")
    return MODES[mode]


def _planned_names(tmp_path: Path, mode: str) -> list[str]:
    """The names a run of ``mode`` writes, from a run in a folder of its own."""
    kwargs, _flags, out_name = MODES[mode]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    members = [scratch / "m_1.safetensors", scratch / "m_2.safetensors"]
    for i, m in enumerate(members):
        polyak.save(_state(i), m)
    result = polyak.average(members, out=scratch / out_name, **kwargs)
    return [f.name for f in result.files]


def _member_at(path: Path, seed: int) -> Path:
    """A valid member whose file (an index for ``*.index.json``) is ``path``."""
    if path.name.endswith(".safetensors.index.json"):
        shard = path.with_name(f"part_{seed}.safetensors")
        polyak.save(_state(seed), shard)
        path.write_text(json.dumps({"metadata": {}, "weight_map": {"a": shard.name, "b": shard.name}}))
    else:
        polyak.save(_state(seed), path)
    return path


SPELLINGS = ["same-path", "symlink-input", "hard-link", "dotdot", "link-at-output"]


def _input_at(folder: Path, name: str, spelling: str) -> tuple[Path, Path]:
    """An input that is the file ``folder/name`` under ``spelling``: (member path, file to watch)."""
    target = folder / name
    if spelling == "same-path":
        return _member_at(target, 5), target
    if spelling == "dotdot":
        _member_at(target, 5)
        return folder / ".." / folder.name / "." / name, target
    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    if spelling == "symlink-input":  # the input is given through a link to the output name
        _member_at(target, 5)
        link = elsewhere / ("link" + (".safetensors.index.json" if name.endswith(".json") else ".safetensors"))
        link.symlink_to(target)
        if name.endswith(".json"):  # an index finds its shards beside the name it is opened by
            (elsewhere / "part_5.safetensors").symlink_to(folder / "part_5.safetensors")
        return link, target
    real = _member_at(elsewhere / ("real" + (".safetensors.index.json" if name.endswith(".json") else ".safetensors")), 5)
    if spelling == "hard-link":
        os.link(real, target)
    else:  # link-at-output: the output name is a symbolic link to an input
        target.symlink_to(real)
    return real, real


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("mode", list(MODES))
def test_no_mode_writes_over_an_input(tmp_path: Path, request: pytest.FixtureRequest, mode: str, spelling: str) -> None:
    kwargs, _flags, out_name = _mode(request, mode)
    names = _planned_names(tmp_path, mode)
    assert (names == [out_name]) if mode == "single" else (len(names) >= 2 and names[-1] == "avg.safetensors.index.json")
    for k, name in enumerate(names):
        folder = tmp_path / f"run{k}"
        folder.mkdir()
        other = folder / "m_1.safetensors"
        polyak.save(_state(1), other)
        member, watched = _input_at(folder, name, spelling)
        before = watched.read_bytes()
        with pytest.raises(polyak.OutputError, match=r"is also one of the inputs.*never overwrites a file it is reading"):
            polyak.average([other, member], out=folder / out_name, force=True, order="given", **kwargs)
        assert watched.read_bytes() == before
        assert sorted(p.name for p in folder.iterdir() if p.name.startswith("avg") and p.name not in names[k:k + 1]) == []
        assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_needs_force_to_replace_any_of_its_files(
    tmp_path: Path, request: pytest.FixtureRequest, mode: str
) -> None:
    kwargs, _flags, out_name = _mode(request, mode)
    names = _planned_names(tmp_path, mode)
    members = [tmp_path / "m_1.safetensors", tmp_path / "m_2.safetensors"]
    for i, m in enumerate(members):
        polyak.save(_state(i + 10), m)
    for name in names:  # someone else's file at each name the output would write
        folder = tmp_path / f"stranger-{name}"
        folder.mkdir()
        (folder / name).write_bytes(b"not polyak's")
        with pytest.raises(polyak.OutputError, match=rf"{name}.*already exists; pass --force"):
            polyak.average(members, out=folder / out_name, **kwargs)
        assert (folder / name).read_bytes() == b"not polyak's"
        assert sorted(p.name for p in folder.iterdir()) == [name]
    # A second run over the first one's output (mode by mode, the same rule).
    out = tmp_path / "out"
    out.mkdir()
    first = polyak.average(members, out=out / out_name, **kwargs)
    stamps = {f: f.read_bytes() for f in first.files}
    with pytest.raises(polyak.OutputError, match="already exists; pass --force"):
        polyak.average(members[1:], out=out / out_name, **kwargs)
    assert {f: f.read_bytes() for f in first.files} == stamps
    second = polyak.average(members[1:], out=out / out_name, force=True, **kwargs)
    got = polyak.average([second.files[-1]])  # the file, or the index of the shards
    np.testing.assert_array_equal(got["a"], _state(11)["a"])
    assert leftovers(tmp_path) == []


def test_workers_run_refused_without_force_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    members = [tmp_path / "m_1.safetensors", tmp_path / "m_2.safetensors"]
    for i, m in enumerate(members):
        polyak.save(_state(i), m)
    args = ["average", *map(str, members), "-o", str(tmp_path / "avg.safetensors"), "--workers", "2", "-q"]
    assert cli_main(args) == 0
    index = tmp_path / "avg.safetensors.index.json"
    before = index.read_bytes()
    assert cli_main(args) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "already exists" in line and "--force" in line
    assert index.read_bytes() == before


def _old_index(folder: Path, out_name: str, inputs: list[Path]) -> dict[str, Path]:
    """An existing index at the output's index name listing everything but its own shards."""
    index = folder / "avg.safetensors.index.json"
    notes = folder / "notes.txt"
    notes.write_text("my notes")
    outside = folder.parent / "outside.safetensors"
    polyak.save(_state(7), outside)
    stale = folder / "avg-00001-of-00009.safetensors"  # a stale shard of this output
    polyak.save(_state(8), stale)
    wmap = {
        "x.input": inputs[0].name, "x.notes": "notes.txt", "x.self": index.name,
        "x.outside": "../outside.safetensors", "x.stale": stale.name, "x.input_shard": inputs[1].name,
    }
    index.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wmap}))
    return {"notes": notes, "outside": outside, "stale": stale, "index": index}


@pytest.mark.parametrize("mode", SHARDED)
def test_an_old_index_decides_nothing(tmp_path: Path, request: pytest.FixtureRequest, mode: str) -> None:
    kwargs, _flags, out_name = _mode(request, mode)
    folder = tmp_path / "run"
    folder.mkdir()
    # The second input is named like a stale shard of this output: still an input.
    inputs = [folder / "ck_1.safetensors", folder / "avg-00003-of-00009.safetensors"]
    for i, m in enumerate(inputs):
        polyak.save(_state(i), m)
    files = _old_index(folder, out_name, inputs)
    kept = {p: p.read_bytes() for p in [*inputs, files["notes"], files["outside"]]}
    with pytest.warns(polyak.PolyakWarning, match=r"(?s)also listed.*'notes\.txt'.*left them alone") as caught:
        result = polyak.average(inputs, out=folder / out_name, force=True, order="given", **kwargs)
    text = str(caught[0].message)
    assert "ck_1.safetensors" in text and "avg-00003-of-00009.safetensors" in text and "../outside.safetensors" in text
    assert "avg.safetensors.index.json'" not in text  # itself: replaced, not "left alone"
    assert {p: p.read_bytes() for p in kept} == kept  # inputs, notes, the outside file intact
    assert not files["stale"].exists()  # the one file that was provably this output's
    assert files["index"].exists() and files["index"] in result.files
    got = polyak.average([files["index"]])
    expected = {k: (_state(0)[k] + _state(1)[k]) / 2 for k in ("a", "b")}
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6)
    assert leftovers(tmp_path) == []


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    # Bound by its name from its folder: a socket's path is limited to ~108 bytes, which the
    # test's temporary folder can exceed.
    here = os.getcwd()
    os.chdir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path.name)
    finally:
        os.chdir(here)


def _device(path: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # like /dev/null
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here (needs CAP_MKNOD)")


def _folder(path: Path) -> None:
    path.mkdir()


def _link_to_device(path: Path) -> None:
    path.symlink_to("/dev/null")


def _link_to_folder(path: Path) -> None:
    (path.parent / "a-folder").mkdir()
    path.symlink_to(path.parent / "a-folder")


NOT_REGULAR = {
    "fifo": (_fifo, "FIFO"),
    "socket": (_socket, "socket"),
    "device": (_device, "device"),
    "folder": (_folder, "folder"),
    "link-to-device": (_link_to_device, "symbolic link to a device"),
    "link-to-folder": (_link_to_folder, "symbolic link to a folder"),
}


@pytest.mark.parametrize("kind", list(NOT_REGULAR))
@pytest.mark.parametrize("mode", ["single", "workers", "shard-size"])
def test_non_regular_outputs_refused_even_with_force(tmp_path: Path, mode: str, kind: str) -> None:
    kwargs, _flags, out_name = MODES[mode]
    names = _planned_names(tmp_path, mode)
    members = [tmp_path / "m_1.safetensors", tmp_path / "m_2.safetensors"]
    for i, m in enumerate(members):
        polyak.save(_state(i), m)
    make, what = NOT_REGULAR[kind]
    victim = names[len(names) // 2]  # a shard in the middle of a sharded output
    folder = tmp_path / "run"
    folder.mkdir()
    make(folder / victim)
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(polyak.OutputError, match=rf"{victim}.*(is a folder|is a {what}.*, not a regular file)"):
        polyak.average(members, out=folder / out_name, force=True, **kwargs)
    assert sorted(p.name for p in folder.iterdir()) == before
    assert stat.S_ISREG((folder / victim).lstat().st_mode) is False
    assert leftovers(tmp_path) == []


def test_link_to_dev_null_refused_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's ``-o /dev/null --out-format safetensors --force``, through a link so that a
    regression replaces the link, never the system's /dev/null (the rule is the same:
    ``test_non_regular_outputs_refused_even_with_force`` covers a device node itself)."""
    members = [tmp_path / "m_1.safetensors", tmp_path / "m_2.safetensors"]
    for i, m in enumerate(members):
        polyak.save(_state(i), m)
    out = tmp_path / "null"
    out.symlink_to("/dev/null")
    status = cli_main(["average", *map(str, members), "-o", str(out), "--out-format", "safetensors", "--force", "-q"])
    assert status == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(out) in line and "symbolic link to a device, not a regular file" in line
    assert out.is_symlink() and stat.S_ISCHR(out.stat().st_mode)


@pytest.mark.parametrize("mode", ["single", "workers"])
def test_symlink_output_replaced_as_a_link_never_written_through(tmp_path: Path, mode: str) -> None:
    kwargs, _flags, out_name = MODES[mode]
    names = _planned_names(tmp_path, mode)
    members = [tmp_path / "m_1.safetensors", tmp_path / "m_2.safetensors"]
    for i, m in enumerate(members):
        polyak.save(_state(i), m)
    folder = tmp_path / "run"
    folder.mkdir()
    victim = names[0]
    theirs = tmp_path / "theirs.bin"
    theirs.write_bytes(b"someone's file")
    (folder / victim).symlink_to(theirs)
    dangling = names[-1] if len(names) > 1 else None
    if dangling is not None:
        (folder / dangling).symlink_to(tmp_path / "nowhere")
    with pytest.raises(polyak.OutputError, match=r"avg[-.0-9a-z]*\.safetensors(\.index\.json)? already exists; pass --force"):
        polyak.average(members, out=folder / out_name, **kwargs)
    result = polyak.average(members, out=folder / out_name, force=True, **kwargs)
    assert theirs.read_bytes() == b"someone's file"  # the link was replaced, not written through
    for f in result.files:
        assert not f.is_symlink() and stat.S_ISREG(f.lstat().st_mode)
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.filterwarnings("default::polyak.PolyakWarning")
def test_old_index_files_left_alone_said_in_one_line_via_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's command: `-o avg.safetensors.index.json --force` over an index naming an input."""
    inputs = [tmp_path / "ck_1.safetensors", tmp_path / "ck_2.safetensors"]
    for i, m in enumerate(inputs):
        polyak.save(_state(i), m)
    index = tmp_path / "avg.safetensors.index.json"
    (tmp_path / "notes.txt").write_text("mine")
    index.write_text(json.dumps({"weight_map": {"a": "ck_1.safetensors", "b": "notes.txt", "c": index.name}}))
    before = inputs[0].read_bytes()
    assert cli_main(["average", *map(str, inputs), "-o", str(index), "--force"]) == 0
    captured = capsys.readouterr()
    warning = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert warning == [
        f"polyak: warning: {index}: the index it replaced also listed 'ck_1.safetensors', 'notes.txt', "
        "which are not stale shards of this output; left them alone"
    ]
    assert f"wrote {index}" in captured.out
    assert inputs[0].read_bytes() == before and (tmp_path / "notes.txt").read_text() == "mine"
    assert polyak.average([index])["a"].shape == (1000,)


def test_an_input_named_like_a_stale_temporary_is_not_cleaned_up(tmp_path: Path) -> None:
    """The stale-temp cleanup of the output folder spares the inputs, whatever their names."""
    good = tmp_path / "m_1.safetensors"
    polyak.save(_state(1), good)
    dead_pid = 4_194_305  # above Linux's largest pid: no process has it
    odd = tmp_path / f".avg.safetensors.polyak-tmp-{dead_pid}-abcd"
    polyak.save(_state(2), tmp_path / "x.safetensors")
    (tmp_path / "x.safetensors").rename(odd)
    stale = tmp_path / f".avg.safetensors.polyak-tmp-{dead_pid}-ef01"
    stale.write_bytes(b"left by a killed run")
    before = odd.read_bytes()
    result = polyak.average([good, odd], out=tmp_path / "avg.safetensors", format="safetensors", order="given")
    assert odd.read_bytes() == before  # an input: kept
    assert not stale.exists()  # a real leftover: removed
    expected = (_state(1)["a"] + _state(2)["a"]) / 2
    np.testing.assert_allclose(polyak.average([result.out])["a"], expected, rtol=1e-6)


def test_workers_never_write_over_an_input_named_like_a_shard_via_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's command: `polyak average avg-00001-of-00002.safetensors x_2.safetensors -o
    avg.safetensors --workers 2` (0.1 exited 0 with the average in the first input)."""
    monkeypatch.chdir(tmp_path)
    polyak.save(_state(1), tmp_path / "avg-00001-of-00002.safetensors")
    polyak.save(_state(2), tmp_path / "x_2.safetensors")
    before = (tmp_path / "avg-00001-of-00002.safetensors").read_bytes()
    args = ["average", "avg-00001-of-00002.safetensors", "x_2.safetensors", "-o", "avg.safetensors", "--workers", "2"]
    for force in ([], ["--force"]):
        assert cli_main([*args, *force]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert "avg-00001-of-00002.safetensors is also one of the inputs" in line
        assert (tmp_path / "avg-00001-of-00002.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg-00001-of-00002.safetensors", "x_2.safetensors"]
