"""Crash-safe file output: temporary file in the target folder, fsync, rename.

A reader never sees a half-written output under the final name: bytes go to
``.<name>.polyak-tmp-<pid>-<random>`` beside the target, are flushed and fsynced, and only
then renamed over the target with :func:`os.replace` (atomic on POSIX), after which the
folder itself is fsynced so that the rename survives a power cut. A folder output
(:class:`AtomicFolder`) is built the same way: as a temporary sibling folder with the same
kind of name, renamed into place when complete. A temporary file or folder left by a
killed process is named so that it is recognisable and is removed by the next run
(:func:`cleanup_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ._errors import OutputError

__all__ = [
    "TEMP_MARK",
    "AtomicFile",
    "AtomicFolder",
    "atomic_write_bytes",
    "check_folder_output",
    "check_output_folder",
    "check_output_path",
    "check_outputs",
    "cleanup_stale_temps",
    "fsync_dir",
    "fsync_file",
    "is_one_of",
    "refuse_overlap",
    "temp_path_for",
]

TEMP_MARK = ".polyak-tmp-"


def temp_path_for(target: Path, suffix: str = "") -> Path:
    """A fresh, recognisable temporary path beside ``target``.

    With ``suffix`` (which ``target``'s name must end in) the temporary name still ends in
    it, for writers that pick the file type from the suffix (Keras' ``model.save``).
    """
    stem = target.name[: len(target.name) - len(suffix)]
    return target.with_name(f".{stem}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def fsync_dir(directory: Path) -> None:
    """fsync a folder so that renames in it are durable (best effort where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a finished file by path (for files a library wrote and closed itself)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe_os_error(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; free some space and retry"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {path}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied or read-only file system"
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return f"cannot write {path}: too many open files; raise the limit with `ulimit -n`"
    return f"cannot write {path}: {exc.strerror or exc}"


#: Start writing a file's dirty pages to disk every this many bytes (see _Writeback).
WRITEBACK_BYTES = 64 << 20


class _Writeback:
    """Starts the disk write of already-written bytes early, so that the final fsync is short.

    An fsync at the end must wait for every byte of a large output to reach the disk; asking
    the kernel to start writing each finished stretch (Linux ``sync_file_range`` with
    ``SYNC_FILE_RANGE_WRITE``: start, do not wait, keep the pages cached) overlaps that disk
    time with the averaging of the next tensors. Elsewhere, or if the call is unavailable,
    this does nothing and the fsync does all the work, as before.
    """

    _fn: Any = None
    _loaded = False

    @classmethod
    def _sync_file_range(cls) -> Any:
        if not cls._loaded:
            cls._loaded = True
            if sys.platform.startswith("linux"):
                try:
                    import ctypes

                    fn = ctypes.CDLL(None).sync_file_range
                    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                    cls._fn = fn
                except (OSError, AttributeError):
                    cls._fn = None
        return cls._fn

    def __init__(self) -> None:
        self.started = 0  # bytes already handed to the kernel's writeback

    def after_write(self, raw: Any, position: int) -> None:
        if position - self.started < WRITEBACK_BYTES:
            return
        fn = self._sync_file_range()
        if fn is None:
            return
        raw.flush()
        fn(raw.fileno(), self.started, position - self.started, 2)  # 2 = SYNC_FILE_RANGE_WRITE
        self.started = position


class _RecordingFile:
    """The temporary file, remembering the first OSError a write raised.

    Writers that hand the file to a library (``torch.save``, ``zipfile``) often see that
    library turn "no space left on device" into its own error; the recorded OSError lets
    polyak still report the real cause.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.error: OSError | None = None
        self._position = 0
        self._writeback = _Writeback()

    def write(self, data: Any) -> int:
        try:
            n = self._raw.write(data)
        except OSError as exc:
            if self.error is None:
                self.error = exc
            raise
        self._position += n
        self._writeback.after_write(self._raw, self._position)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class AtomicFile:
    """A binary file that appears under its final name only on :meth:`commit`.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> with AtomicFile(d / "x.bin") as f:
        ...     _ = f.file.write(b"data")
        ...     _ = f.commit()
        >>> (d / "x.bin").read_bytes()
        b'data'
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        self.tmp = temp_path_for(self.target)
        try:
            raw = open(self.tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        except OSError as exc:
            raise OutputError(_describe_os_error(exc, self.target)) from exc
        self.file: Any = _RecordingFile(raw)
        self._done = False

    def fail(self, exc: BaseException) -> OutputError:
        """Abort and describe why writing failed (the recorded OSError when there is one)."""
        self.abort()
        cause = self.file.error if self.file.error is not None else exc
        if isinstance(cause, OSError):
            return OutputError(_describe_os_error(cause, self.target))
        return OutputError(f"cannot write {self.target}: {cause}")

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.file.write(data)
        except OSError as exc:
            self.abort()
            raise OutputError(_describe_os_error(exc, self.target)) from exc

    def finish(self) -> Path:
        """Flush and fsync the temporary file, leaving it in place (for multi-file commits)."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as exc:
            self.abort()
            raise OutputError(_describe_os_error(exc, self.target)) from exc
        return self.tmp

    def commit(self) -> Path:
        """Flush, fsync and rename into place; returns the final path."""
        self.finish()
        try:
            os.replace(self.tmp, self.target)
        except OSError as exc:
            self.abort()
            raise OutputError(_describe_os_error(exc, self.target)) from exc
        self._done = True
        fsync_dir(self.target.parent)
        return self.target

    def abort(self) -> None:
        """Close and delete the temporary file; the target is left untouched."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically."""
    with AtomicFile(target) as f:
        f.write(data)
        return f.commit()


def commit_many(temps: Iterable[tuple[Path, Path]]) -> None:
    """Rename finished temporary files into place, in the given order, then fsync the folders."""
    folders = set()
    for tmp, target in temps:
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise OutputError(_describe_os_error(exc, target)) from exc
        folders.add(target.parent)
    for folder in folders:
        fsync_dir(folder)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def iter_stale_temps(directory: Path) -> Iterator[Path]:
    """Temporary files in ``directory`` left by polyak processes that no longer run."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if TEMP_MARK not in name or not name.startswith("."):
            continue
        tail = name.rsplit(TEMP_MARK, 1)[1]
        pid_text = tail.split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            yield entry


def cleanup_stale_temps(
    directory: str | os.PathLike[str], *, keep: Iterable[str | os.PathLike[str]] = ()
) -> list[Path]:
    """Remove temporary files that killed polyak processes left in ``directory``.

    Files in ``keep`` (the inputs of the run that cleans up) are never removed, whatever
    their names.
    """
    kept = [Path(k) for k in keep]
    removed = []
    for entry in iter_stale_temps(Path(directory)):
        if kept and is_one_of(entry, kept):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)  # a folder output's temporary (it holds temporaries too)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _same_file(a: Path, b: Path) -> bool:
    """Same file under any spelling: symlinks, ``..``, hard links (samefile)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        return False


def is_one_of(path: str | os.PathLike[str], others: Iterable[str | os.PathLike[str]]) -> bool:
    """Whether ``path`` is (under any spelling: symlink, ``..``, hard link) one of ``others``.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> (d / "a").write_bytes(b"x") and (d / "b").symlink_to(d / "a")
        >>> is_one_of(d / "b", [d / "sub" / ".." / "a"]), is_one_of(d / "b", [d / "c"])
        (True, False)
    """
    p = Path(path)
    return any(_same_file(p, Path(o)) for o in others)


def refuse_overlap(
    outputs: Iterable[str | os.PathLike[str]], inputs: Iterable[str | os.PathLike[str]]
) -> None:
    """Refuse an output file that is (under any spelling) a file being read.

    Raises:
        OutputError: Naming the output and the fix.
    """
    ins = [Path(i) for i in inputs]
    for out in outputs:
        o = Path(out)
        for i in ins:
            if _same_file(o, i):
                raise OutputError(
                    f"the output {o} is also one of the inputs ({i}); write to a new file "
                    "(polyak never overwrites a file it is reading)"
                )


def _what_is(path: Path) -> str | None:
    """What sits at ``path``: ``None`` (nothing), ``"file"``, ``"link"`` (a symbolic link to a
    regular file, or a dangling one: replaced as a link, never written through) or the name
    of anything else (``"folder"``, ``"FIFO"``...), which an output may never replace."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot look at the output {path}: {exc.strerror or exc}") from exc
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        try:
            target = path.stat().st_mode
        except FileNotFoundError:
            return "link"  # dangling: replacing the link touches nothing else
        except OSError as exc:  # a symlink loop, a folder we may not look into
            raise OutputError(f"cannot look at the output {path}: {exc.strerror or exc}") from exc
        if stat.S_ISREG(target):
            return "link"
        return f"symbolic link to a {_kind_name(target)}"
    return _kind_name(mode)


def _kind_name(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def check_outputs(
    targets: Iterable[str | os.PathLike[str]],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> list[Path]:
    """The one rule for every file an output will create or replace, applied before any write.

    Every target is refused when it is (under any spelling) one of ``inputs``; when
    something exists there that is not a regular file (a folder, a device such as
    ``/dev/null``, a FIFO, a socket, a link to one of these); when a file exists there and
    ``force`` is not set; or when its folder is missing or not writable. A symbolic link to
    a regular file counts as an existing file: ``force`` replaces the link itself (the file
    it points to is never written). Sharded outputs pass every shard and the index, so one
    rule holds for every mode.

    Returns:
        The targets, as paths.

    Raises:
        OutputError: Naming the target, the reason and the fix.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> (d / "taken.npz").write_bytes(b"mine")
        4
        >>> check_outputs([d / "new.npz", d / "taken.npz"])
        Traceback (most recent call last):
        ...
        polyak._errors.OutputError: the output .../taken.npz already exists; pass --force (force=True) to replace it
    """
    paths = [Path(t) for t in targets]
    ins = [Path(i) for i in inputs]
    refuse_overlap(paths, ins)
    folders: dict[Path, None] = {}
    for path in paths:
        kind = _what_is(path)
        if kind is None:
            pass
        elif kind == "folder":
            raise OutputError(
                f"the output {path} is a folder; give a file name such as {path / 'avg.safetensors'}"
            )
        elif kind not in ("file", "link"):
            raise OutputError(
                f"the output {path} exists and is a {kind}, not a regular file; polyak replaces "
                "only regular files: choose another output name"
            )
        elif not force:
            raise OutputError(f"the output {path} already exists; pass --force (force=True) to replace it")
        folders[path.parent] = None
    for parent in folders:
        check_output_folder(parent)
    return paths


def check_output_folder(folder: str | os.PathLike[str]) -> Path:
    """Refuse an output folder that is missing or not writable.

    Raises:
        OutputError: Naming the folder and the fix.
    """
    parent = Path(folder)  # Path("") is Path(".")
    if not parent.is_dir():
        raise OutputError(f"the output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {parent} is not writable")
    return parent


def check_output_path(
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Refuse an output up front: existing without ``force``, not a regular file, equal to an
    input, unwritable (:func:`check_outputs` for one file).

    Raises:
        OutputError: With the reason and the fix.
    """
    return check_outputs([out], force=force, inputs=inputs)[0]


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies somewhere below it (symlinks resolved)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


def check_folder_output(
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Refuse a folder output up front: one that is or holds an input (or the current
    folder), something other than a folder, a folder with files in it without ``force``,
    or a missing or unwritable parent.

    An empty folder may be replaced without ``force``: nothing in it is lost.

    Raises:
        OutputError: With the reason and the fix.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> (d / "ck").mkdir(); (d / "ck" / "model.safetensors").write_bytes(b"x")
        1
        >>> check_folder_output(d, inputs=[d / "ck" / "model.safetensors"])
        Traceback (most recent call last):
        ...
        polyak._errors.OutputError: the output folder ... holds the input .../ck/model.safetensors; polyak replaces a folder output as a whole: choose a folder outside the inputs
    """
    path = Path(out)
    for i in inputs:
        if _inside(Path(i), path):
            raise OutputError(
                f"the output folder {path} {'is' if _same_file(Path(i), path) else 'holds'} the input {i}; polyak "
                "replaces a folder output as a whole: choose a folder outside the inputs"
            )
    if _inside(Path.cwd(), path):
        raise OutputError(f"the output folder {path} holds the current folder; choose another output folder")
    if path.is_symlink():
        raise OutputError(f"the output {path} is a symbolic link; give the folder's own path or a new name")
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"the output {path} exists and is not a folder; choose another output name")
        if any(path.iterdir()) and not force:
            raise OutputError(
                f"the output folder {path} already exists and is not empty; pass --force (force=True) to replace it"
            )
    check_output_folder(path.parent)
    return path


#: ``renameat2`` flag: swap two paths atomically (Linux ≥ 3.15).
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step where the system can (Linux ``renameat2``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        fn = ctypes.CDLL(None).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


class AtomicFolder:
    """A folder that appears under its final name only on :meth:`commit`.

    Files are written into :attr:`tmp`, a hidden sibling named like every polyak temporary
    (:func:`temp_path_for`), which :meth:`commit` fsyncs and renames into place. An existing
    folder at the target (allowed by :func:`check_folder_output`) is replaced: swapped with
    the new one in one atomic step where the system allows (Linux), otherwise moved aside
    under a temporary name first; then it is deleted. A killed run leaves only temporary
    folders, which the next run in that folder removes (:func:`cleanup_stale_temps`).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> f = AtomicFolder(d / "avg")
        >>> _ = (f.tmp / "config.json").write_text("{}")
        >>> sorted(p.name for p in f.commit().iterdir())
        ['config.json']
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        self.tmp = temp_path_for(self.target)
        try:
            self.tmp.mkdir()
        except OSError as exc:
            raise OutputError(_describe_os_error(exc, self.target)) from exc
        self._done = False

    def commit(self) -> Path:
        """fsync the folder and rename it into place; returns the final path.

        Every file and folder under :attr:`tmp` is fsynced first: libraries that write into
        it (``save_pretrained``, ``torch.distributed.checkpoint``) close their files without.
        """
        for folder, _, files in os.walk(self.tmp, topdown=False):
            for name in files:
                fsync_file(Path(folder) / name)
            fsync_dir(Path(folder))
        try:
            old = self._replace()
        except OSError as exc:
            self.abort()
            raise OutputError(_describe_os_error(exc, self.target)) from exc
        self._done = True
        fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target

    def _replace(self) -> Path | None:
        """Put :attr:`tmp` at the target; returns where the replaced folder now is, if any."""
        try:
            os.rename(self.tmp, self.target)  # no target, or an empty folder: one atomic rename
            return None
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.target.is_dir():
                raise
        if _exchange(self.tmp, self.target):
            return self.tmp  # now holds the old folder
        aside = temp_path_for(self.target)
        os.rename(self.target, aside)
        try:
            os.rename(self.tmp, self.target)
        except OSError:
            os.rename(aside, self.target)  # put the old one back
            raise
        return aside

    def abort(self) -> None:
        """Delete the temporary folder; the target is left untouched."""
        if self._done:
            return
        self._done = True
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> AtomicFolder:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()
