"""polyak._atomic, the crash-safe writer every output goes through, piece by piece:
temporary names, cleanup on every way out, the OSError → message mapping, early writeback
of large files, which leftover temporaries the next run removes (and which it keeps), and
the output checks with their messages in full."""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest

from polyak import OutputError
from polyak import _atomic as atomic
from polyak._atomic import (
    TEMP_MARK,
    AtomicFile,
    AtomicFolder,
    atomic_write_bytes,
    check_folder_output,
    check_output_folder,
    check_output_path,
    check_outputs,
    cleanup_stale_temps,
    commit_many,
    is_one_of,
    iter_stale_temps,
    temp_path_for,
)

#: Beyond the largest pid Linux can hand out (2**22): never a running process.
DEAD_PID = 2**22 + 7


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _esc(text: str) -> str:
    return f"^{re.escape(text)}$"


def test_temporary_names_are_hidden_marked_and_unique(tmp_path: Path) -> None:
    t = temp_path_for(tmp_path / "avg.safetensors")
    assert t.parent == tmp_path
    assert re.fullmatch(rf"\.avg\.safetensors\.polyak-tmp-{os.getpid()}-[0-9a-f]{{8}}", t.name), t.name
    k = temp_path_for(tmp_path / "model.weights.h5", ".weights.h5")
    assert re.fullmatch(rf"\.model\.polyak-tmp-{os.getpid()}-[0-9a-f]{{8}}\.weights\.h5", k.name), k.name
    assert len({temp_path_for(tmp_path / "x").name for _ in range(50)}) == 50


def test_a_file_appears_only_on_commit_and_every_other_way_out_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with AtomicFile(target) as f:
        f.write(b"abc")
        assert f.tmp.exists() and not target.exists()
    assert _names(tmp_path) == []  # left without commit: removed
    with pytest.raises(RuntimeError, match="^boom$"), AtomicFile(target) as f:
        f.write(b"abc")
        raise RuntimeError("boom")
    assert _names(tmp_path) == []  # left by an error: removed
    with AtomicFile(target) as f:
        f.write(b"abc")
        f.write(memoryview(b"def"))
        assert f.commit() == target
        f.abort()  # after commit: nothing to undo
    assert _names(tmp_path) == ["out.bin"] and target.read_bytes() == b"abcdef"
    assert atomic_write_bytes(target, b"new") == target and target.read_bytes() == b"new"
    f = AtomicFile(target)
    f.write(b"never")
    f.abort()
    f.abort()
    assert _names(tmp_path) == ["out.bin"] and target.read_bytes() == b"new"


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.ENOSPC, "no space left on the device while writing {t}; free some space and retry"),
        (errno.EDQUOT, "disk quota exceeded while writing {t}"),
        (errno.EACCES, "cannot write {t}: permission denied or read-only file system"),
        (errno.EPERM, "cannot write {t}: permission denied or read-only file system"),
        (errno.EROFS, "cannot write {t}: permission denied or read-only file system"),
        (errno.EMFILE, "cannot write {t}: too many open files; raise the limit with `ulimit -n`"),
        (errno.ENFILE, "cannot write {t}: too many open files; raise the limit with `ulimit -n`"),
        (errno.EIO, "cannot write {t}: Input/output error"),
    ],
)
def test_os_errors_are_told_in_words_and_the_temporary_file_goes(tmp_path: Path, code: int, message: str) -> None:
    target = tmp_path / "out.bin"
    f = AtomicFile(target)

    class Failing:
        def write(self, data: Any) -> int:
            raise OSError(code, os.strerror(code))

        def close(self) -> None:
            pass

    f.file._raw.close()
    f.file._raw = Failing()
    with pytest.raises(OutputError, match=_esc(message.format(t=target))):
        f.write(b"x")
    assert _names(tmp_path) == []
    assert str(atomic.AtomicFile(target).fail(OSError(code, os.strerror(code)))) == message.format(t=target)
    assert _names(tmp_path) == []
    bare = OSError("no errno, no strerror")  # described by the error itself
    assert str(atomic.AtomicFile(target).fail(bare)) == f"cannot write {target}: no errno, no strerror"


def test_fail_reports_the_first_os_error_a_library_hid(tmp_path: Path) -> None:
    target = tmp_path / "out.pt"
    f = AtomicFile(target)
    f.file.error = OSError(errno.ENOSPC, "No space left on device")  # recorded by the file
    err = f.fail(RuntimeError("enforce fail at inline_container.cc: unexpected pos"))
    assert str(err) == f"no space left on the device while writing {target}; free some space and retry"
    g = AtomicFile(target)
    assert str(g.fail(ValueError("bad header"))) == f"cannot write {target}: bad header"
    assert _names(tmp_path) == []
    f = AtomicFile(target)
    f.write(b"x")
    assert f.file.error is None
    f.abort()


def test_an_unwritable_folder_is_told_when_the_temporary_file_cannot_be_made(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "out.bin"
    with pytest.raises(OutputError, match=_esc(f"cannot write {missing}: No such file or directory")):
        AtomicFile(missing)


def test_fsync_or_rename_failures_remove_the_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "out.bin"

    def enospc(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    for step in ("fsync", "replace"):
        monkeypatch.setattr(atomic.os, step, enospc)
        f = AtomicFile(target)
        f.write(b"x")
        with pytest.raises(OutputError, match="^no space left on the device while writing"):
            f.commit()
        assert _names(tmp_path) == []
        monkeypatch.undo()


def test_commit_many_renames_in_order_and_names_the_target_that_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = []
    for name in ("b", "a", "c"):
        t = temp_path_for(tmp_path / name)
        t.write_text(name)
        pairs.append((t, tmp_path / name))
    order: list[str] = []
    real = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (order.append(Path(b).name), real(a, b)))
    synced: list[Path] = []
    monkeypatch.setattr(atomic, "fsync_dir", synced.append)
    commit_many(pairs)
    assert order == ["b", "a", "c"] and _names(tmp_path) == ["a", "b", "c"] and synced == [tmp_path]
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    t = temp_path_for(tmp_path / "d")
    t.write_text("d")
    with pytest.raises(OutputError, match=_esc(f"cannot write {tmp_path / 'd'}: permission denied or read-only file system")):
        commit_many([(t, tmp_path / "d")])


def test_large_files_are_handed_to_the_disk_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Above WRITEBACK_BYTES of new bytes the finished stretch is flushed and handed to
    # sync_file_range (start writing, do not wait); the bytes on disk are unchanged.
    calls: list[tuple[Any, ...]] = []

    class Raw:
        def __init__(self) -> None:
            self.data = bytearray()
            self.flushed = 0

        def write(self, data: Any) -> int:
            self.data += bytes(data)
            return len(data)

        def flush(self) -> None:
            self.flushed = len(self.data)
            calls.append(("flush", self.flushed))

        def fileno(self) -> int:
            return 99

    def fake_range(fd: int, start: int, length: int, flags: int) -> int:
        calls.append(("range", fd, start, length, flags))
        return 0

    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", 100)
    monkeypatch.setattr(atomic._Writeback, "_sync_file_range", classmethod(lambda cls: fake_range))
    raw = Raw()
    rec = atomic._RecordingFile(raw)  # type: ignore[arg-type]
    for size in (60, 39, 1, 150, 99, 1):
        rec.write(b"x" * size)
    assert calls == [("flush", 100), ("range", 99, 0, 100, 2), ("flush", 250), ("range", 99, 100, 150, 2),
                     ("flush", 350), ("range", 99, 250, 100, 2)]
    assert len(raw.data) == 350
    # Without sync_file_range (not Linux): nothing is flushed early.
    calls.clear()
    monkeypatch.setattr(atomic._Writeback, "_sync_file_range", classmethod(lambda cls: None))
    rec = atomic._RecordingFile(Raw())  # type: ignore[arg-type]
    rec.write(b"x" * 500)
    assert calls == []


def test_the_real_early_writeback_keeps_every_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", 1 << 16)
    data = os.urandom(5 * (1 << 16) + 123)
    with AtomicFile(tmp_path / "big.bin") as f:
        for i in range(0, len(data), 40_000):
            f.write(data[i:i + 40_000])
        if os.uname().sysname == "Linux":  # sync_file_range ran: the stretch it started ends on a write
            assert atomic._Writeback._sync_file_range() is not None
            assert f.file._writeback.started == 320_000
        f.commit()
    assert (tmp_path / "big.bin").read_bytes() == data


def test_only_temporaries_of_processes_that_are_gone_are_removed(tmp_path: Path) -> None:
    mine = f".a.safetensors{TEMP_MARK}{os.getpid()}-0a0a0a0a"
    dead = f".a.safetensors{TEMP_MARK}{DEAD_PID}-0b0b0b0b"
    init = f".a.safetensors{TEMP_MARK}1-0c0c0c0c"  # pid 1 runs (another user's, as non-root)
    keep = [
        mine, init, "a.safetensors", f"a.safetensors{TEMP_MARK}{DEAD_PID}-0d",  # not hidden
        f".a.safetensors{TEMP_MARK}x{DEAD_PID}-0e",  # no pid
        f".a.polyak-tmp{DEAD_PID}-0f",  # no mark
    ]
    for name in [*keep, dead]:
        (tmp_path / name).write_text(name)
    dead_dir = tmp_path / f".avg{TEMP_MARK}{DEAD_PID}-10101010"  # a folder output's temporary
    (dead_dir / "sub").mkdir(parents=True)
    (dead_dir / "sub" / "model.safetensors").write_text("x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept.txt").write_text("x")
    link = tmp_path / f".l{TEMP_MARK}{DEAD_PID}-11111111"
    link.symlink_to(outside, target_is_directory=True)
    assert sorted(p.name for p in iter_stale_temps(tmp_path)) == sorted([dead, dead_dir.name, link.name])
    removed = cleanup_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead, dead_dir.name, link.name])
    assert _names(tmp_path) == sorted([*keep, "outside"])
    assert (outside / "kept.txt").exists()  # a link is removed, never followed
    assert cleanup_stale_temps(tmp_path / "missing") == [] and list(iter_stale_temps(tmp_path / "missing")) == []


def test_a_stale_looking_input_is_kept(tmp_path: Path) -> None:
    name = f".ckpt{TEMP_MARK}{DEAD_PID}-12121212"
    (tmp_path / name).write_text("an input that looks like a leftover")
    (tmp_path / "sub").mkdir()
    assert cleanup_stale_temps(tmp_path, keep=[tmp_path / "sub" / ".." / name]) == []
    assert cleanup_stale_temps(tmp_path, keep=[tmp_path / "other"]) == [tmp_path / name]


def test_a_pid_of_another_user_counts_as_running(monkeypatch: pytest.MonkeyPatch) -> None:
    def kill(pid: int, sig: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "kill", kill)
    assert atomic._pid_alive(12345) is True
    monkeypatch.setattr(atomic.os, "kill", lambda pid, sig: None)
    assert atomic._pid_alive(12345) is True
    monkeypatch.undo()
    assert atomic._pid_alive(os.getpid()) is True and atomic._pid_alive(DEAD_PID) is False


def test_is_one_of_any_spelling(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    os.link(tmp_path / "a", tmp_path / "hard")
    (tmp_path / "soft").symlink_to(tmp_path / "a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for spelling in ("a", "hard", "soft", "sub/../a"):
        assert is_one_of(tmp_path / spelling, [tmp_path / "x", tmp_path / "a"])
    assert not is_one_of(tmp_path / "a", [tmp_path / "x", tmp_path / "missing"])
    assert not is_one_of(tmp_path / "loop", [tmp_path / "a"])
    assert not is_one_of(tmp_path / "a", [])


def test_output_checks_say_what_and_how(tmp_path: Path) -> None:
    (tmp_path / "in.npz").write_text("input")
    (tmp_path / "taken.npz").write_text("mine")
    (tmp_path / "dir").mkdir()
    (tmp_path / "to_file").symlink_to(tmp_path / "taken.npz")
    (tmp_path / "to_dir").symlink_to(tmp_path / "dir")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    os.mkfifo(tmp_path / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "sock"))
    try:
        cases = {
            "in.npz": f"the output {tmp_path / 'in.npz'} is also one of the inputs ({tmp_path / 'in.npz'}); write to "
                      "a new file (polyak never overwrites a file it is reading)",
            "taken.npz": f"the output {tmp_path / 'taken.npz'} already exists; pass --force (force=True) to replace it",
            "to_file": f"the output {tmp_path / 'to_file'} already exists; pass --force (force=True) to replace it",
            "dir": f"the output {tmp_path / 'dir'} is a folder; give a file name such as {tmp_path / 'dir' / 'avg.safetensors'}",
            "to_dir": f"the output {tmp_path / 'to_dir'} exists and is a symbolic link to a folder, not a regular file; "
                      "polyak replaces only regular files: choose another output name",
            "fifo": f"the output {tmp_path / 'fifo'} exists and is a FIFO (named pipe), not a regular file; polyak "
                    "replaces only regular files: choose another output name",
            "sock": f"the output {tmp_path / 'sock'} exists and is a socket, not a regular file; polyak replaces only "
                    "regular files: choose another output name",
        }
        for name, message in cases.items():
            with pytest.raises(OutputError, match=_esc(message)):
                check_outputs([tmp_path / "new.npz", tmp_path / name], inputs=[tmp_path / "in.npz"])
        with pytest.raises(OutputError, match=_esc(f"the output {Path('/dev/null')} exists and is a device, not a "
                                                   "regular file; polyak replaces only regular files: choose another "
                                                   "output name")):
            check_output_path("/dev/null", force=True)
        ok = check_outputs([tmp_path / "taken.npz", tmp_path / "to_file", tmp_path / "dangling", tmp_path / "n"],
                           force=True, inputs=[tmp_path / "in.npz"])
        assert ok == [tmp_path / "taken.npz", tmp_path / "to_file", tmp_path / "dangling", tmp_path / "n"]
        assert check_output_path(str(tmp_path / "new.npz")) == tmp_path / "new.npz"
    finally:
        sock.close()
    with pytest.raises(OutputError, match=_esc(f"the output folder {tmp_path / 'nope'} does not exist; create it first")):
        check_output_path(tmp_path / "nope" / "x.npz")
    assert check_output_folder("") == Path(".")


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(atomic.os, "access", lambda p, m: m != os.W_OK | os.X_OK)
    with pytest.raises(OutputError, match=_esc(f"the output folder {tmp_path} is not writable")):
        check_output_folder(tmp_path)


def test_folder_output_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    model = tmp_path / "ck" / "model.safetensors"
    tail = "polyak replaces a folder output as a whole: choose a folder outside the inputs"
    with pytest.raises(OutputError, match=_esc(f"the output folder {tmp_path / 'ck'} holds the input {model}; {tail}")):
        check_folder_output(tmp_path / "ck", inputs=[model])
    with pytest.raises(OutputError, match=_esc(f"the output folder {tmp_path / 'ck'} is the input {tmp_path / 'ck'}; {tail}")):
        check_folder_output(tmp_path / "ck", inputs=[tmp_path / "ck"])
    monkeypatch.chdir(tmp_path / "full")
    with pytest.raises(OutputError, match=_esc(f"the output folder {tmp_path} holds the current folder; choose another "
                                               "output folder")):
        check_folder_output(tmp_path)
    monkeypatch.chdir(tmp_path / "ck")
    with pytest.raises(OutputError, match=_esc(f"the output {tmp_path / 'link'} is a symbolic link; give the folder's own "
                                               "path or a new name")):
        check_folder_output(tmp_path / "link")
    with pytest.raises(OutputError, match=_esc(f"the output {tmp_path / 'file'} exists and is not a folder; choose "
                                               "another output name")):
        check_folder_output(tmp_path / "file", force=True)
    with pytest.raises(OutputError, match=_esc(f"the output folder {tmp_path / 'full'} already exists and is not empty; "
                                               "pass --force (force=True) to replace it")):
        check_folder_output(tmp_path / "full", inputs=[model])
    assert check_folder_output(tmp_path / "full", force=True) == tmp_path / "full"
    assert check_folder_output(tmp_path / "empty") == tmp_path / "empty"  # nothing in it is lost
    assert check_folder_output(str(tmp_path / "new")) == tmp_path / "new"
    with pytest.raises(OutputError, match="^the output folder .*/nope does not exist; create it first$"):
        check_folder_output(tmp_path / "nope" / "out")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "move-aside"])
def test_a_folder_appears_whole_and_replaces_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "avg"
    with AtomicFolder(target) as f:
        (f.tmp / "a.json").write_text("1")
        assert f.commit() == target
    assert _names(tmp_path) == ["avg"] and _names(target) == ["a.json"]
    with AtomicFolder(target) as f:
        (f.tmp / "b.json").write_text("2")
        f.commit()
    assert _names(tmp_path) == ["avg"] and _names(target) == ["b.json"]  # the old folder is gone
    with AtomicFolder(target) as f:
        (f.tmp / "c.json").write_text("3")
    assert _names(tmp_path) == ["avg"] and _names(target) == ["b.json"]  # left without commit
    with pytest.raises(OutputError, match=_esc(f"cannot write {tmp_path / 'no' / 'avg'}: No such file or directory")):
        AtomicFolder(tmp_path / "no" / "avg")


def test_exchange_swaps_two_folders_in_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a", tmp_path / "b b"
    a.mkdir()
    b.mkdir()
    (a / "from_a").write_text("a")
    (b / "from_b").write_text("b")
    if os.uname().sysname == "Linux":
        assert atomic._exchange(a, b) is True
        assert _names(a) == ["from_b"] and _names(b) == ["from_a"]
        assert atomic._exchange(a, tmp_path / "missing") is False  # renameat2 fails: False, nothing moved
        assert _names(a) == ["from_b"]
    monkeypatch.setattr(atomic.sys, "platform", "darwin")
    assert atomic._exchange(a, b) is False
    assert _names(a) == (["from_b"] if os.uname().sysname == "Linux" else ["from_a"])


def test_aborting_a_folder_never_raises(tmp_path: Path) -> None:
    f = AtomicFolder(tmp_path / "avg")
    (f.tmp / "x").write_text("x")
    shutil.rmtree(f.tmp)  # already gone (removed by someone else)
    f.abort()
    f.abort()
    assert _names(tmp_path) == []


def test_a_failed_folder_rename_puts_the_old_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "avg"
    target.mkdir()
    (target / "old.json").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real = os.rename
    calls = {"n": 0}

    def rename(a: Any, b: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # tmp → target, after the old one was moved aside
            raise OSError(errno.EIO, "Input/output error")
        real(a, b)

    monkeypatch.setattr(atomic.os, "rename", rename)
    f = AtomicFolder(target)
    (f.tmp / "new.json").write_text("new")
    with pytest.raises(OutputError, match=_esc(f"cannot write {target}: Input/output error")):
        f.commit()
    assert _names(tmp_path) == ["avg"] and _names(target) == ["old.json"]


def test_fsync_helpers(tmp_path: Path) -> None:
    atomic.fsync_dir(tmp_path / "missing")  # best effort: no error
    (tmp_path / "f").write_text("x")
    atomic.fsync_file(tmp_path / "f")
    with pytest.raises(FileNotFoundError, match="missing"):
        atomic.fsync_file(tmp_path / "missing")


def test_a_folder_is_swapped_in_one_step_by_a_relative_path_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.uname().sysname != "Linux":
        pytest.skip("renameat2 is Linux's")
    monkeypatch.chdir(tmp_path)
    Path("avg").mkdir()
    Path("avg", "old.json").write_text("old")
    renames: list[tuple[str, str]] = []
    real = os.rename

    def rename(a: Any, b: Any) -> None:
        renames.append((str(a), str(b)))
        real(a, b)

    monkeypatch.setattr(atomic.os, "rename", rename)
    f = AtomicFolder("avg")
    (f.tmp / "new.json").write_text("new")
    assert f.commit() == Path("avg")
    # one rename tried (and refused: the target is not empty), then one atomic swap: the old
    # folder is never moved aside, so no moment exists without a folder at "avg"
    assert renames == [(str(f.tmp), "avg")]
    assert _names(tmp_path) == ["avg"] and _names(tmp_path / "avg") == ["new.json"]


def test_without_renameat2_the_old_folder_is_moved_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    class NoSuchCalls:
        def __getattr__(self, name: str) -> Any:
            raise AttributeError(f"undefined symbol: {name}")

    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: NoSuchCalls())
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert atomic._exchange(tmp_path / "a", tmp_path / "b") is False  # an old C library: no swap
    target = tmp_path / "avg"
    target.mkdir()
    (target / "old.json").write_text("old")
    with AtomicFolder(target) as f:
        (f.tmp / "new.json").write_text("new")
        f.commit()
    assert _names(target) == ["new.json"] and _names(tmp_path) == ["a", "avg", "b"]
    # the early writeback is skipped the same way: a large write still goes through
    monkeypatch.setattr(atomic._Writeback, "_loaded", False)
    monkeypatch.setattr(atomic._Writeback, "_fn", None)
    with AtomicFile(tmp_path / "big.bin") as out:
        out.file.write(b"\0" * (atomic.WRITEBACK_BYTES + 1))
        out.commit()
    assert atomic._Writeback._fn is None and (tmp_path / "big.bin").stat().st_size == atomic.WRITEBACK_BYTES + 1


def test_early_writeback_takes_offsets_beyond_4_gib(tmp_path: Path) -> None:
    # sync_file_range takes 64-bit offsets; declared as C ints they would overflow past 2 GiB
    with (tmp_path / "f").open("wb") as raw:
        raw.write(b"x")
        w = atomic._Writeback()
        w.started = 5 << 30
        w.after_write(raw, w.started + atomic.WRITEBACK_BYTES)  # a range past the end: a no-op hint
        assert w.started == (5 << 30) + atomic.WRITEBACK_BYTES or atomic._Writeback._sync_file_range() is None


def test_a_folder_rename_refused_for_another_reason_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "avg"
    target.mkdir()
    (target / "old.json").write_text("old")
    real = os.rename

    def rename(a: Any, b: Any) -> None:
        if Path(b) == target:
            raise OSError(errno.EACCES, "Permission denied")
        real(a, b)

    monkeypatch.setattr(atomic.os, "rename", rename)
    f = AtomicFolder(target)
    (f.tmp / "new.json").write_text("new")
    message = f"cannot write {target}: permission denied or read-only file system"
    with pytest.raises(OutputError, match=_esc(message)):
        f.commit()  # not swapped in some other way: the refusal is the answer
    assert _names(tmp_path) == ["avg"] and _names(target) == ["old.json"]


def test_an_old_folder_that_cannot_be_deleted_does_not_fail_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "avg"
    target.mkdir()
    (target / "old.json").write_text("old")
    real = os.unlink

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if os.fspath(path) == "old.json":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", unlink)
    f = AtomicFolder(target)
    (f.tmp / "new.json").write_text("new")
    assert f.commit() == target  # the new folder is in place; the old one is only litter now
    assert _names(target) == ["new.json"]


def test_a_file_rename_that_fails_names_the_target(tmp_path: Path) -> None:
    target = tmp_path / "avg.bin"
    f = AtomicFile(target)
    f.write(b"new")
    target.mkdir()  # something took the name after the checks
    (target / "x").write_text("x")
    with pytest.raises(OutputError, match=_esc(f"cannot write {target}: Is a directory")):
        f.commit()
    assert _names(tmp_path) == ["avg.bin"]  # the temporary file is gone


def test_abort_survives_a_close_that_fails(tmp_path: Path) -> None:
    f = AtomicFile(tmp_path / "out.bin")
    f.write(b"x")

    def close() -> None:
        raise OSError(errno.EIO, "Input/output error")

    f.file._raw.close()
    f.file._raw.close = close
    f.abort()
    assert _names(tmp_path) == []


def test_inside_is_false_when_a_path_cannot_be_resolved(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "out").mkdir()
    assert atomic._inside(tmp_path / "out" / "x", tmp_path / "out") is True
    assert atomic._inside(tmp_path / "loop", tmp_path / "out") is False


def test_kind_names() -> None:
    import stat

    assert [atomic._kind_name(m) for m in (stat.S_IFDIR, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK, 0)] == [
        "folder", "device", "device", "FIFO (named pipe)", "socket", "special file"]


def test_asking_whether_a_pid_is_alive_sends_it_no_signal() -> None:
    import signal

    received: list[int] = []
    old = signal.signal(signal.SIGHUP, lambda sig, frame: received.append(sig))
    try:
        assert atomic._pid_alive(os.getpid()) is True
        sum(range(1000))  # Python runs a pending handler between bytecodes
    finally:
        signal.signal(signal.SIGHUP, old)
    assert received == []  # signal 0 only asks; any other would have reached the process


def test_check_output_path_passes_force_and_inputs_on(tmp_path: Path) -> None:
    (tmp_path / "taken.npz").write_text("mine")
    with pytest.raises(OutputError, match=_esc(f"the output {tmp_path / 'taken.npz'} already exists; pass --force "
                                               "(force=True) to replace it")):
        check_output_path(tmp_path / "taken.npz")
    assert check_output_path(tmp_path / "taken.npz", force=True) == tmp_path / "taken.npz"
    with pytest.raises(OutputError, match="is also one of the inputs"):
        check_output_path(tmp_path / "taken.npz", force=True, inputs=[tmp_path / "taken.npz"])


def test_an_output_that_cannot_be_looked_at_is_named_with_the_reason(tmp_path: Path) -> None:
    too_long = tmp_path / ("x" * 300 + ".npz")
    with pytest.raises(OutputError, match=_esc(f"cannot look at the output {too_long}: File name too long")):
        check_outputs([too_long])
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(OutputError, match=_esc(f"cannot look at the output {tmp_path / 'loop'}: Too many levels of "
                                               "symbolic links")):
        check_outputs([tmp_path / "loop"], force=True)


def test_temporaries_are_told_by_their_last_mark_and_a_suffix_may_hold_dashes(tmp_path: Path) -> None:
    me = os.getpid()
    names = {
        # a target whose own name holds the mark: only the last one says whose temporary it is
        f".a{TEMP_MARK}{me}-0a.npz{TEMP_MARK}{DEAD_PID}-0b0b0b0b": True,
        f".a{TEMP_MARK}{DEAD_PID}-0a.npz{TEMP_MARK}{me}-0c0c0c0c": False,  # a running process's: kept
        f".m{TEMP_MARK}{DEAD_PID}-0d0d0d0d.pre-trained.weights.h5": True,  # a suffix (temp_path_for) with dashes
    }
    for name in names:
        (tmp_path / name).write_text("x")
    assert sorted(p.name for p in iter_stale_temps(tmp_path)) == sorted(n for n, stale in names.items() if stale)


def test_a_failed_fsync_names_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def eio(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "fsync", eio)
    f = AtomicFile(tmp_path / "out.bin")
    f.write(b"x")
    with pytest.raises(OutputError, match=_esc(f"cannot write {tmp_path / 'out.bin'}: Input/output error")):
        f.finish()
    assert _names(tmp_path) == []


def test_cleanup_goes_past_a_kept_input_and_a_temporary_that_vanished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept, gone, stale = (tmp_path / f".{n}{TEMP_MARK}{DEAD_PID}-0a0a0a0a" for n in ("kept", "gone", "stale"))
    kept.write_text("an input")
    stale.write_text("left by a killed run")
    # in this order: a kept input, one that another process removed first, then a stale one
    monkeypatch.setattr(atomic, "iter_stale_temps", lambda directory: iter([kept, gone, stale]))
    assert cleanup_stale_temps(tmp_path, keep=[kept]) == [stale]
    assert _names(tmp_path) == [kept.name]
