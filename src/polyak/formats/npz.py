"""numpy ``.npz`` archives (``numpy.savez``), read without pickle, one array at a time.

Arrays of ml_dtypes types (bfloat16, float8) have no ``.npy`` type code; polyak stores them
as unsigned integers of the same width and records the real dtype in a member named
``__polyak__.json`` (also holding the string metadata), which its reader applies. Other
npz files are read as they are; object arrays (pickles) are refused.
"""

from __future__ import annotations

import ast
import json
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .._atomic import AtomicFile
from .._dtypes import dtype_from_name, dtype_name, is_float, is_integer_like
from .._errors import ConfigError, FormatError, UnsafeFileError
from .._json import json_object
from ._base import FormatImpl, TensorInfo, TensorSource, TensorWriter, contiguous
from ._common import check_zip, reject_key

META_MEMBER = "__polyak__.json"
#: Refuse members (above 16 MiB) whose uncompressed size is this many times their
#: compressed size (:func:`~._common.check_zip`). Genuine weights never compress 1000×;
#: only constant tensors come close.
MAX_RATIO = 1000
_NPY_MAGIC = b"\x93NUMPY"
#: numpy refuses .npy headers above 10000 bytes by default (``max_header_size``); a
#: little slack for files written with a raised limit, but never an unbounded literal_eval.
MAX_NPY_HEADER = 100_000
#: What a corrupt archive can raise from zipfile and its decompressors. NotImplementedError:
#: an unknown compression method; zlib.error: a damaged deflate stream.
_ZIP_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zlib.error,
    NotImplementedError,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    struct.error,
    UnicodeDecodeError,
    RuntimeError,
)


def sniff_npz(path: Path, head: bytes) -> bool:
    if not head.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except _ZIP_ERRORS:
        return False
    return bool(names) and all(n.endswith(".npy") or n == META_MEMBER for n in names)


def _read_npy_header(fp: object, label: str, member: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    read = fp.read  # type: ignore[attr-defined]
    magic = read(8)
    if len(magic) < 8 or magic[:6] != _NPY_MAGIC:
        raise FormatError(f"{label}: member {member} is not a .npy array")
    major = magic[6]
    if major == 1:
        (hlen,) = np.frombuffer(read(2), dtype="<u2")
        start = 10
    elif major in (2, 3):
        (hlen,) = np.frombuffer(read(4), dtype="<u4")
        start = 12
    else:
        raise FormatError(f"{label}: member {member} has unsupported .npy version {major}")
    if hlen > MAX_NPY_HEADER:
        raise UnsafeFileError(
            f"{label}: member {member} claims a {hlen}-byte .npy header (numpy itself refuses "
            f"headers above 10000 bytes); the file is corrupt or hostile"
        )
    try:
        header = ast.literal_eval(read(int(hlen)).decode("latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
        dtype = np.lib.format.descr_to_dtype(descr)
    except Exception as exc:
        raise FormatError(f"{label}: member {member} has a corrupted .npy header ({exc})") from None
    if dtype.hasobject:
        raise UnsafeFileError(
            f"{label}: array {member[:-4]!r} holds Python objects (a pickle); polyak never unpickles "
            "npz members. Save numeric arrays only."
        )
    if not isinstance(fortran, bool) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise FormatError(f"{label}: member {member} has an invalid shape {shape}")
    return shape, dtype, bool(fortran), start + int(hlen)


def _string_map(value: object, label: str, what: str) -> dict[str, str]:
    """An entry of ``__polyak__.json`` that must map strings to strings."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise FormatError(f"{label}: corrupted {META_MEMBER}: {what!r} must map names to strings")
    return dict(value)


class NpzSource(TensorSource):
    format_name = "npz"

    def __init__(self, path: Path, *, label: str | None = None) -> None:
        super().__init__(path, label)
        try:
            self._zf = zipfile.ZipFile(path)
        except _ZIP_ERRORS as exc:
            raise FormatError(f"{self.label}: not a readable .npz archive ({exc})") from None
        self._infos: dict[str, TensorInfo] = {}
        self._members: dict[str, tuple[str, bool, np.dtype]] = {}
        self._meta: dict[str, str] = {}
        dtypes: dict[str, str] = {}
        try:
            zinfos = self._zf.infolist()
            check_zip(self._zf, self.label, max_ratio=MAX_RATIO)
            if META_MEMBER in self._zf.namelist():
                with self._zf.open(META_MEMBER) as fp:
                    meta_raw = fp.read(10_000_001)
                if len(meta_raw) > 10_000_000:
                    raise UnsafeFileError(f"{self.label}: {META_MEMBER} is implausibly large")
                meta = json_object(meta_raw, self.label, META_MEMBER)
                dtypes = _string_map(meta.get("dtypes", {}), self.label, "dtypes")
                self._meta = _string_map(meta.get("metadata", {}), self.label, "metadata")
            for zi in zinfos:
                member = zi.filename
                if member == META_MEMBER:
                    continue
                if not member.endswith(".npy"):
                    raise FormatError(f"{self.label}: unexpected member {member} (not a .npy array)")
                with self._zf.open(zi) as fp:
                    shape, dtype, fortran, header_len = _read_npy_header(fp, self.label, member)
                name = member[:-4]
                stored = dtype
                if name in dtypes:
                    try:
                        real = dtype_from_name(dtypes[name])
                    except ConfigError:
                        real = None
                    if real is None or not (is_float(real) or is_integer_like(real)):
                        raise FormatError(
                            f"{self.label}: {META_MEMBER} records the dtype {dtypes[name]!r} for {name!r}, "
                            "which is not a numeric dtype; the file is corrupt"
                        )
                    if real.itemsize != stored.itemsize:
                        raise FormatError(f"{self.label}: dtype record for {name!r} does not match the array")
                    dtype = real
                info = TensorInfo(name, shape, dtype)
                if zi.file_size != header_len + info.nbytes:
                    raise FormatError(
                        f"{self.label}: array {name!r} should hold {info.nbytes} bytes for shape {shape} "
                        f"{dtype_name(dtype)}, the archive member holds {zi.file_size - header_len}; "
                        "the file is truncated or corrupt"
                    )
                self._infos[name] = info
                self._members[name] = (member, fortran, stored)
        except _ZIP_ERRORS as exc:
            self._zf.close()
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"{self.label}: corrupt .npz archive ({type(exc).__name__}: {exc})") from None

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        info = self._infos[name]
        member, fortran, stored = self._members[name]
        try:
            with self._zf.open(member) as fp:
                _read_npy_header(fp, self.label, member)
                data = fp.read(info.nbytes)
        except _ZIP_ERRORS as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"{self.label}: cannot read array {name!r} ({type(exc).__name__}: {exc})") from None
        if len(data) != info.nbytes:
            raise FormatError(f"{self.label}: array {name!r} is truncated")
        arr = np.frombuffer(data, dtype=stored)
        if stored != info.dtype:
            arr = arr.view(info.dtype)
        return arr.reshape(info.shape, order="F" if fortran else "C")

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def close(self) -> None:
        self._zf.close()


def open_npz(path: Path, *, key: str | None = None, label: str | None = None) -> NpzSource:
    reject_key(key, path, "npz")
    return NpzSource(path, label=label)


def _member_info(name: str) -> zipfile.ZipInfo:
    # A fixed timestamp: the same tensors give the same bytes (zipfile stamps the clock).
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


class NpzWriter(TensorWriter):
    """Writes a ``.npz`` (uncompressed, like ``numpy.savez``) one array at a time."""

    def __init__(self, path: Path, infos: Sequence[TensorInfo], **kwargs: object) -> None:
        super().__init__(path, infos, **kwargs)  # type: ignore[arg-type]
        self._file = AtomicFile(self.path)
        self._zf = zipfile.ZipFile(self._file.file, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._dtypes: dict[str, str] = {}

    def write(self, name: str, array: np.ndarray) -> None:
        info = self.infos[name]
        arr = contiguous(array)
        if arr.dtype.kind == "V" or (arr.dtype.kind not in "biufc"):
            # ml_dtypes types: store the bits, record the type.
            self._dtypes[name] = dtype_name(arr.dtype)
            arr = arr.view(f"u{arr.dtype.itemsize}")
        try:
            with self._zf.open(_member_info(name + ".npy"), "w", force_zip64=True) as fp:
                np.lib.format.write_array(fp, arr, allow_pickle=False)
        except (OSError, RuntimeError, ValueError) as exc:
            self.abort()
            raise self._file.fail(exc) from exc
        del info

    def commit(self) -> list[Path]:
        try:
            meta = {"dtypes": self._dtypes, "metadata": self.metadata}
            self._zf.writestr(_member_info(META_MEMBER), json.dumps(meta, ensure_ascii=False))
            self._zf.close()
        except (OSError, RuntimeError, ValueError) as exc:
            self.abort()
            raise self._file.fail(exc) from exc
        return [self._file.commit()]

    def abort(self) -> None:
        try:
            self._zf.close()
        except Exception:
            pass
        self._file.abort()


NPZ = FormatImpl(sniff=sniff_npz, open=open_npz, writer=NpzWriter)
