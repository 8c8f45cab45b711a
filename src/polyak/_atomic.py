"""Crash-safe file output: temporary file in the target folder, fsync, rename.

A reader never sees a half-written output under the final name: bytes go to
``.<name>.polyak-tmp-<pid>-<random>`` beside the target, are flushed and fsynced, and only
then renamed over the target with :func:`os.replace` (atomic on POSIX), after which the
folder itself is fsynced so that the rename survives a power cut. A temporary file left by
a killed process is named so that it is recognisable and is removed by the next run
(:func:`cleanup_stale_temps`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ._errors import OutputError

__all__ = [
    "TEMP_MARK",
    "AtomicFile",
    "atomic_write_bytes",
    "check_output_path",
    "cleanup_stale_temps",
    "fsync_dir",
    "temp_path_for",
]

TEMP_MARK = ".polyak-tmp-"


def temp_path_for(target: Path) -> Path:
    """A fresh, recognisable temporary path beside ``target``."""
    return target.with_name(f".{target.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


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


def _describe_os_error(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; free some space and retry"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded while writing {path}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied or read-only file system"
    return f"cannot write {path}: {exc.strerror or exc}"


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
            self.file: BinaryIO = open(self.tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        except OSError as exc:
            raise OutputError(_describe_os_error(exc, self.target)) from exc
        self._done = False

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


def cleanup_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files that killed polyak processes left in ``directory``."""
    removed = []
    for entry in iter_stale_temps(Path(directory)):
        with contextlib.suppress(OSError):
            if entry.is_dir():
                for child in entry.iterdir():
                    child.unlink()
                entry.rmdir()
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def check_output_path(
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Refuse an output up front: existing without ``force``, equal to an input, unwritable.

    Raises:
        OutputError: With the reason and the fix.
    """
    path = Path(out)
    resolved = path.resolve()
    for item in inputs:
        try:
            same = Path(item).resolve() == resolved or (
                path.exists() and os.path.samefile(item, path)
            )
        except OSError:
            same = False
        if same:
            raise OutputError(
                f"the output {path} is also one of the inputs; write to a new file "
                "(polyak never overwrites a member it is reading)"
            )
    if path.is_dir():
        raise OutputError(f"the output {path} is a folder; give a file name such as {path / 'avg.safetensors'}")
    if path.exists() and not force:
        raise OutputError(f"the output {path} already exists; pass --force (force=True) to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"the output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"the output folder {parent} is not writable")
    return path
