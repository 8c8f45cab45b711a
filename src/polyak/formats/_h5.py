"""HDF5 machinery shared by the Keras formats: safe traversal, reading, template writing.

h5py is imported inside functions only: the format registry imports every format module
to sniff magic bytes, and reading a safetensors file must not import h5py.

Safety (as Keras' own ``safe_get_h5_group`` / ``safe_get_h5_dataset``): soft and external
links, datasets with external raw storage and virtual datasets are refused with
:class:`UnsafeFileError` before anything is read, and a dataset that declares far more
bytes than it stores (a shape/decompression bomb) is refused.

Tensors are keyed by their HDF5 path relative to the file root (``layers/dense/vars/0``,
legacy ``model_weights/dense/dense/kernel:0``). The writer copies the newest member's whole
tree (groups, datasets and every attribute) and replaces only the averaged datasets, so
that Keras-specific structure survives without polyak having to understand it.
"""

from __future__ import annotations

import contextlib
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .._atomic import commit_many, fsync_file, temp_path_for
from .._dtypes import dtype_from_name
from .._errors import FormatError, OutputError, PolyakError, UnsafeFileError
from ._base import SourceTemplate, TensorInfo, TensorSource, TensorWriter

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: A dataset declaring more than this many bytes must store at least 1/_MAX_EXPANSION of them.
_BOMB_FLOOR = 1 << 32
_MAX_EXPANSION = 1000


#: What h5py, zipfile and the decoders raise for a damaged file (HDF5's C library reports
#: corruption as OSError, RuntimeError, KeyError or ValueError depending on where it hits).
CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    RuntimeError,
    KeyError,
    ValueError,
    TypeError,
    IndexError,
    EOFError,
    NotImplementedError,
    OverflowError,
    struct.error,
    zlib.error,
    zipfile.BadZipFile,
)


@contextlib.contextmanager
def corrupt_file_errors(label: str, what: str = "corrupt or unreadable file") -> Iterator[None]:
    """Turn the errors a damaged file raises inside h5py/zipfile into one FormatError."""
    try:
        yield
    except PolyakError:
        raise
    except CORRUPT_ERRORS as exc:
        raise FormatError(f"{label}: {what} ({type(exc).__name__}: {exc})") from None


def h5py_module(label: str) -> Any:
    """Import h5py, or explain how to get it."""
    try:
        import h5py
    except ImportError:
        raise FormatError(
            f"{label}: Keras HDF5 files need h5py; install it with `pip install h5py` "
            "(or `pip install polyak[keras]`)"
        ) from None
    return h5py


def open_h5(path_or_file: Any, label: str, mode: str = "r") -> Any:
    """Open an HDF5 file (path or binary file object) with a FormatError on failure."""
    h5py = h5py_module(label)
    try:
        return h5py.File(path_or_file, mode)
    except OSError as exc:
        raise FormatError(f"{label}: not a readable HDF5 file ({exc})") from None


def read_attr_list(group: Any, name: str) -> list[str] | None:
    """A string-list attribute, joining Keras' numbered chunks (``name0``, ``name1``...).

    Keras 2 splits attributes larger than the 64 KiB HDF5 object-header limit into
    numbered chunks (``load_attributes_from_hdf5_group``). Returns ``None`` if absent.
    """
    if name in group.attrs:
        raw = [group.attrs[name]]
    elif f"{name}0" in group.attrs:
        raw = []
        i = 0
        while f"{name}{i}" in group.attrs:
            raw.append(group.attrs[f"{name}{i}"])
            i += 1
    else:
        return None
    out: list[str] = []
    for chunk in raw:
        for item in np.atleast_1d(np.asarray(chunk, dtype=object)).tolist():
            if isinstance(item, bytes):
                out.append(item.decode("utf-8"))
            elif isinstance(item, str):
                out.append(item)
            # an empty list is stored as a float64 array of length 0: nothing to add
    return out


def has_attr_list(group: Any, name: str) -> bool:
    return name in group.attrs or f"{name}0" in group.attrs


def _link_kind(group: Any, name: str) -> str | None:
    h5py = h5py_module("")
    link = group.get(name, getlink=True)
    if isinstance(link, h5py.SoftLink):
        return "soft link"
    if isinstance(link, h5py.ExternalLink):
        return "external link"
    return None


def check_dataset(ds: Any, label: str, path: str) -> None:
    """Refuse datasets whose data lives outside the file or that are shape bombs."""
    if ds.external:
        raise UnsafeFileError(
            f"{label}: dataset {path!r} keeps its data in external files {ds.external}; "
            "polyak (like Keras) refuses HDF5 data outside the checkpoint"
        )
    if ds.is_virtual:
        raise UnsafeFileError(f"{label}: dataset {path!r} is a virtual dataset; polyak refuses them")
    declared = int(np.prod(ds.shape, dtype=np.int64)) * ds.dtype.itemsize if ds.shape else ds.dtype.itemsize
    if declared > _BOMB_FLOOR and declared > _MAX_EXPANSION * ds.id.get_storage_size():
        raise UnsafeFileError(
            f"{label}: dataset {path!r} declares {declared} bytes but stores "
            f"{ds.id.get_storage_size()}; refusing a likely decompression bomb"
        )


def walk(group: Any, label: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, object) under ``group`` in HDF5 order, refusing links and unsafe data."""
    h5py = h5py_module(label)
    for name in group:
        path = f"{prefix}{name}"
        kind = _link_kind(group, name)
        if kind is not None:
            raise UnsafeFileError(
                f"{label}: {path!r} is an HDF5 {kind}; polyak (like Keras) refuses links, "
                "which can point outside the checkpoint"
            )
        obj = group[name]
        if isinstance(obj, h5py.Dataset):
            check_dataset(obj, label, path)
            yield path, obj
        elif isinstance(obj, h5py.Group):
            yield path, obj
            yield from walk(obj, label, path + "/")
        else:  # pragma: no cover - named datatypes
            yield path, obj


def dataset_dtype(ds: Any) -> np.dtype | None:
    """The numpy dtype a dataset holds, or ``None`` if it is not a numeric tensor.

    Keras stores bfloat16 as a 2-byte opaque type with the attribute ``dtype="bfloat16"``.
    """
    dt = ds.dtype
    if dt.kind == "V":
        tag = ds.attrs.get("dtype")
        if isinstance(tag, bytes):
            tag = tag.decode()
        if isinstance(tag, str):
            try:
                real = dtype_from_name(tag)
            except Exception:
                return None
            if real.itemsize == dt.itemsize:
                return real
        return None
    if dt.kind in "biufc":
        return np.dtype(dt)
    return None


@dataclass(frozen=True)
class H5Template(SourceTemplate):
    """An HDF5 member's whole tree, to be copied into the output around the averaged data.

    Attributes:
        h5: The member's open ``h5py.File`` (or group).
        names: The tensor name of each averaged dataset, by dataset path (the same unless
            names were rewritten, e.g. by ``strip_prefix``).
    """

    h5: Any
    names: Mapping[str, str]

    def renamed(self, names: Mapping[str, str]) -> H5Template:
        return H5Template(self.h5, {path: names[name] for path, name in self.names.items() if name in names})


class H5Source(TensorSource):
    """Tensors of an HDF5 file keyed by path; subclasses choose which datasets are tensors.

    Args:
        h5: An open ``h5py.File`` (closed by :meth:`close`).
        path: The file on disk (for messages and templates).
        label: How the member is named in messages.
        names: Dataset paths that are tensors, in order (default: every numeric dataset
            outside the excluded groups).
        excluded: Top-level groups whose datasets are never tensors (optimizer state).
    """

    def __init__(
        self,
        h5: Any,
        path: Path | None,
        *,
        label: str | None = None,
        names: Sequence[str] | None = None,
        excluded: Sequence[str] = (),
        owned: Sequence[Any] = (),
    ) -> None:
        super().__init__(path, label)
        self.h5 = h5
        self.excluded = tuple(excluded)
        self._owned = list(owned)
        self._infos: dict[str, TensorInfo] = {}
        self._datasets: dict[str, Any] = {}
        with corrupt_file_errors(self.label):
            self._scan(names)

    def _scan(self, names: Sequence[str] | None) -> None:
        h5py = h5py_module(self.label)
        found: dict[str, Any] = {}
        for p, obj in walk(self.h5, self.label):
            if isinstance(obj, h5py.Dataset):
                found[p] = obj
        if names is None:
            names = [p for p in found if not self.is_excluded(p)]
        for name in names:
            ds = found.get(name)
            if ds is None:
                raise FormatError(
                    f"{self.label}: the layout lists the weight {name!r} but the file has no such "
                    "dataset; the file is corrupt or was edited"
                )
            dt = dataset_dtype(ds)
            if dt is None:
                continue  # strings and other non-numeric data are copied, never averaged
            self._infos[name] = TensorInfo(name, tuple(int(d) for d in ds.shape), dt)
            self._datasets[name] = ds

    def is_excluded(self, path: str) -> bool:
        return any(path == g or path.startswith(g + "/") for g in self.excluded)

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        info = self._infos[name]
        with corrupt_file_errors(self.label, f"cannot read dataset {name!r}"):
            arr = np.asarray(self._datasets[name][()])
            if arr.dtype != info.dtype:
                arr = arr.view(info.dtype)
            return arr.reshape(info.shape)

    def layout(self) -> H5Template:
        """The file's tree, with every tensor at its own path."""
        return H5Template(self.h5, {name: name for name in self._infos})

    def template(self) -> SourceTemplate | None:
        return self.layout()

    def metadata(self) -> dict[str, str]:
        with corrupt_file_errors(self.label):
            value = self.h5.attrs.get("polyak")
            if isinstance(value, bytes):
                value = value.decode("utf-8")
        return {"polyak": value} if isinstance(value, str) else {}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.h5.close()
        for obj in self._owned:
            with contextlib.suppress(Exception):
                obj.close()


def copy_attrs(src: Any, dst: Any) -> None:
    """Copy every attribute with its stored HDF5 type (str vs bytes, vlen vs fixed)."""
    for key in src.attrs:
        try:
            dtype = src.attrs.get_id(key).dtype
            dst.attrs.create(key, src.attrs[key], dtype=dtype)
        except (TypeError, ValueError):
            dst.attrs[key] = src.attrs[key]


class H5TemplateWriter(TensorWriter):
    """Writes an HDF5 file shaped like the template (an :class:`H5Template`): every group,
    dataset and attribute of the newest member is copied, averaged datasets are replaced,
    the :attr:`excluded` groups (optimizer state) are dropped unless
    ``options.keep_optimizer`` says otherwise. Without a template the tensors are written as
    datasets named after them.

    The file is written under a temporary name in the target folder and renamed on
    :meth:`commit` (``publish=False`` leaves it there for a container format to pick up).
    """

    #: Top-level groups of the template that hold no averaged tensors (optimizer state).
    excluded: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        path: Path,
        infos: Sequence[TensorInfo],
        *,
        publish: bool = True,
        tmp: Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, infos, **kwargs)
        self._publish = publish
        self.tmp = tmp if tmp is not None else temp_path_for(self.path)
        self._h5: Any = None
        label = str(path)
        h5py = h5py_module(label)
        try:
            self._h5 = h5py.File(self.tmp, "x")
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc}") from exc
        self._order: list[str] = []
        self._paths: dict[str, str] = {}  # tensor name -> dataset path
        try:
            if isinstance(self.template, H5Template):
                self._copy_tree(self.template, self.options.keep_optimizer)
            for name, info in self.infos.items():  # tensors the template lacks
                if name not in self._paths and name not in self._h5:
                    self._create(name, info, None)
                    self._paths[name] = name
                    self._order.append(name)
            meta = self.metadata.get("polyak")
            if meta is not None:
                self._h5.attrs["polyak"] = meta
        except BaseException:
            self.abort()
            raise

    def _create(self, path: str, info: TensorInfo, src: Any | None) -> None:
        dt = np.dtype(info.dtype)
        stored = dt
        if dt.kind not in "biufc":  # ml_dtypes (bfloat16, float8): opaque bytes + dtype attr
            stored = np.dtype(f"V{dt.itemsize}")
        ds = self._h5.create_dataset(path, shape=info.shape, dtype=stored)
        if src is not None:
            copy_attrs(src, ds)
        if stored != dt:
            ds.attrs["dtype"] = dt.name if hasattr(dt, "name") else str(dt)
        elif "dtype" in ds.attrs and src is not None and src.dtype.kind == "V":
            del ds.attrs["dtype"]  # e.g. --dtype float32 on a bfloat16 member

    def _copy_tree(self, template: H5Template, keep: bool) -> None:
        h5py = h5py_module(str(self.path))
        src = template.h5
        copy_attrs(src, self._h5)
        label = getattr(src, "filename", str(self.path))

        def dropped(p: str) -> bool:
            return not keep and any(p == g or p.startswith(g + "/") for g in self.excluded)

        for p, obj in walk(src, label):
            if dropped(p):
                continue
            name = template.names.get(p)
            if isinstance(obj, h5py.Group):
                grp = self._h5.require_group(p)
                copy_attrs(obj, grp)
            elif name is not None and name in self.infos:
                self._create(p, self.infos[name], obj)
                self._paths[name] = p
                self._order.append(name)
            else:  # optimizer state kept, non-numeric data: copied byte for byte
                parent, _, leaf = p.rpartition("/")
                dst = self._h5[parent] if parent else self._h5
                src.copy(obj, dst, name=leaf)

    @property
    def order(self) -> list[str]:
        return list(self._order)

    def write(self, name: str, array: np.ndarray) -> None:
        ds = self._h5[self._paths[name]]
        arr = np.asarray(array)
        if ds.dtype.kind == "V" and arr.dtype.kind != "V":
            arr = np.ascontiguousarray(arr).view(ds.dtype)
        try:
            if arr.shape == ():
                ds[()] = arr
            else:
                ds[...] = arr
        except (OSError, RuntimeError) as exc:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {exc}") from exc

    def close_file(self) -> Path:
        """Close and fsync the temporary file; returns its path."""
        try:
            self._h5.close()
            fsync_file(self.tmp)
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {exc}") from exc
        return self.tmp

    def commit(self) -> list[Path]:
        self.close_file()
        if not self._publish:
            return [self.tmp]
        try:
            commit_many([(self.tmp, self.path)])
        except OutputError:
            self.abort()
            raise
        return [self.path]

    def abort(self) -> None:
        if self._h5 is not None:
            with contextlib.suppress(Exception):
                self._h5.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def sniff_hdf5(path: Path, head: bytes, check: Callable[[Any], bool]) -> bool:
    """HDF5 magic, then ``check(h5file)`` on the structure (h5py imported only here)."""
    if not head.startswith(HDF5_MAGIC):
        return False
    try:
        import h5py
    except ImportError:
        return True  # cannot look inside; the opener explains that h5py is needed
    try:
        with h5py.File(path, "r") as f:
            return bool(check(f))
    except (OSError, RuntimeError, ValueError, KeyError):
        return False


def is_legacy_layout(f: Any) -> bool:
    """Keras 2 layout: ``layer_names`` on the root (weights-only) or on ``model_weights``."""
    if has_attr_list(f, "layer_names"):
        return True
    mw = f.get("model_weights", getclass=True) if "model_weights" in f else None
    if mw is None or _link_kind(f, "model_weights") is not None:
        return False
    return has_attr_list(f["model_weights"], "layer_names")
