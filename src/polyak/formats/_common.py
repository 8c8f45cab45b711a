"""Helpers shared by the format modules."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import weakref
import zipfile
from pathlib import Path
from typing import Any

from .._errors import ConfigError, FormatError, UnsafeFileError


def reject_key(key: str | None, path: Path, format_name: str) -> None:
    """``--key`` selects a nested dict inside a ``.pt`` file; other formats are flat."""
    if key is not None:
        raise ConfigError(
            f"{path}: --key {key!r} applies to nested PyTorch checkpoints; "
            f"{format_name} files hold their tensors at the top level, so drop --key"
        )


#: Members larger than this may compress well (JSON, constant tensors) without being bombs.
RATIO_FLOOR = 1 << 24
#: deflate cannot expand more than 1032× (RFC 1951 block limits); a larger claim is a lie.
DEFLATE_MAX_RATIO = 1100
#: 1 TiB of claimed content is not a checkpoint.
MAX_ARCHIVE_TOTAL = 1 << 40


def check_zip(zf: zipfile.ZipFile, label: str, *, max_ratio: int, archive_size: int | None = None) -> None:
    """Refuse a zip archive whose directory lies or that would inflate into a bomb.

    The sizes come from the archive's directory, which whoever made the file controls, so
    they are checked against the archive itself before any member is inflated: a member's
    bytes must lie inside the archive, a stored member must hold what it claims, a deflated
    one cannot claim more than deflate can produce, no member above :data:`RATIO_FLOOR`
    may expand more than ``max_ratio`` times, and the total claimed must stay below
    :data:`MAX_ARCHIVE_TOTAL`. Used by every zip-based format (``.npz``, ``.keras``,
    ``.pt``).

    Args:
        zf: The open archive.
        label: The file, for messages.
        max_ratio: Largest expansion accepted for members above :data:`RATIO_FLOOR`.
        archive_size: The archive's size in bytes (default: read from ``zf``'s file).

    Raises:
        FormatError: The directory contradicts the archive (truncated or corrupt).
        UnsafeFileError: A likely zip bomb.
    """
    if archive_size is None:
        fp = zf.fp
        archive_size = os.fstat(fp.fileno()).st_size if fp is not None else 0
    total = 0
    for zi in zf.infolist():
        total += zi.file_size
        if zi.header_offset + zi.compress_size > archive_size:
            raise FormatError(
                f"{label}: member {zi.filename} claims {zi.compress_size} bytes beyond "
                f"the end of the {archive_size}-byte archive; the file is truncated or corrupt"
            )
        if zi.compress_type == zipfile.ZIP_STORED and zi.file_size != zi.compress_size:
            raise FormatError(
                f"{label}: stored member {zi.filename} claims {zi.file_size} bytes of "
                f"content in {zi.compress_size} bytes; the archive is corrupt"
            )
        if zi.compress_type == zipfile.ZIP_DEFLATED and zi.file_size > DEFLATE_MAX_RATIO * zi.compress_size + 1024:
            raise UnsafeFileError(
                f"{label}: member {zi.filename} claims to inflate {zi.compress_size} bytes "
                f"to {zi.file_size}, more than deflate can; refusing a corrupt or hostile archive"
            )
        if zi.file_size > RATIO_FLOOR and zi.file_size > max_ratio * max(zi.compress_size, 1):
            raise UnsafeFileError(
                f"{label}: member {zi.filename} declares {zi.file_size} bytes but stores "
                f"{zi.compress_size} (expands {zi.file_size // max(zi.compress_size, 1)}×); refusing a likely zip bomb"
            )
    if total > MAX_ARCHIVE_TOTAL:
        raise UnsafeFileError(f"{label}: the archive claims {total} bytes of content; refusing it")


class ReadOnlyMap:
    """A read-only memory map of a whole file that does not keep its file descriptor.

    Python's :class:`mmap.mmap` keeps a duplicate of the descriptor for as long as the map
    lives (until Python 3.13's ``trackfd=False``), so averaging 200 memory-mapped members
    held 200 descriptors and failed under ``ulimit -n 64``. A map stays valid after its
    descriptor is closed, so here the file is mapped with the C library's ``mmap`` (through
    ctypes) and the descriptor is closed by the caller at once; the map is released when
    the last array viewing it is gone. Where that call is unavailable, :class:`mmap.mmap`
    is used as before.

    Attributes:
        buffer: The mapped bytes (a buffer for :func:`numpy.frombuffer`; arrays made from it
            must be marked read-only, the pages are).
    """

    def __init__(self, fd: int, size: int) -> None:
        self._mm: mmap.mmap | None = None
        libc = _libc_mmap()
        if libc is None or size == 0:
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            self.buffer: Any = self._mm
            return
        map_, unmap = libc
        ctypes.set_errno(0)
        addr = map_(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        mapped: Any = type("_Mapped", (ctypes.c_char * size,), {})  # a subclass: weakref-able
        buffer = mapped.from_address(addr)
        weakref.finalize(buffer, unmap, addr, size)  # when the last view is gone
        self.buffer = buffer

    def close(self) -> None:
        """Release the map now if nothing views it (else when the last view is gone)."""
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # arrays handed out still view it
                self._mm.close()
        self.buffer = None


_LIBC: Any = None


def _libc_mmap() -> tuple[Any, Any] | None:
    """The C library's ``mmap``/``munmap`` through ctypes (POSIX), or ``None``."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if os.name == "posix" and ctypes.sizeof(ctypes.c_void_p) == 8:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                map_, unmap = libc.mmap, libc.munmap
            except (OSError, AttributeError):
                return None
            map_.restype = ctypes.c_void_p
            map_.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
            unmap.restype = ctypes.c_int
            unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            _LIBC = (map_, unmap)
    return _LIBC or None


def open_files_limit() -> int | None:
    """This process's limit on open files (``ulimit -n``), where the platform says."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def too_many_open_files(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is EMFILE/ENFILE: out of descriptors."""
    seen: set[int] = set()
    node: BaseException | None = exc
    text = os.strerror(errno.EMFILE)
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, OSError) and node.errno in (errno.EMFILE, errno.ENFILE):
            return True
        if text in str(node):  # readers that re-raise with the OS's text `from None`
            return True
        node = node.__cause__ or node.__context__
    return False


def describe_read_error(exc: OSError) -> str:
    """Why a file could not be read, with the fix when the open-files limit was reached."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        limit = open_files_limit()
        at = f" (the limit is {limit})" if limit is not None else ""
        return f"too many open files{at}; raise it with `ulimit -n` or average fewer members at once"
    return exc.strerror or str(exc)
