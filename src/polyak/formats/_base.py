"""The neutral currency of polyak: lazy, name-keyed tensor sources and atomic writers.

A :class:`TensorSource` is one checkpoint seen as an ordered mapping from tensor name to
numpy array. It knows every tensor's shape and dtype up front (:meth:`TensorSource.infos`)
and reads one tensor at a time (:meth:`TensorSource.read`), so the engine never holds more
than a few tensors. A :class:`TensorWriter` receives tensors one at a time, in the order it
asks for (:attr:`TensorWriter.order`), and makes the output appear only on
:meth:`TensorWriter.commit`. What a writer carries over from the newest member beyond its
tensors (an HDF5 layout, a Keras model config, a ``.pt`` nesting key) is that member's
:meth:`TensorSource.template`, a :class:`SourceTemplate`. A format is these pieces
declared in one :class:`FormatImpl`.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from .._dtypes import dtype_name
from .._errors import FormatError

__all__ = [
    "FormatImpl",
    "SourceOpener",
    "SourceTemplate",
    "SourceView",
    "TensorInfo",
    "TensorSource",
    "TensorWriter",
    "WriteOptions",
    "WriterFactory",
    "check_storable",
    "contiguous",
]


def contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous array, without a copy when it already is; unlike
    ``np.ascontiguousarray`` a 0-d array stays 0-d."""
    return array if array.flags.c_contiguous else np.array(array, order="C")


@dataclass(frozen=True)
class TensorInfo:
    """The name, shape and dtype of one tensor: what a checkpoint's header tells without reading data.

    Attributes:
        name: The tensor's name in the checkpoint (``"encoder.layer.0.weight"``).
        shape: Its shape (``()`` for a scalar).
        dtype: Its numpy dtype (``ml_dtypes.bfloat16`` for bfloat16 tensors).

    Example:
        >>> import numpy as np
        >>> from polyak.formats import TensorInfo
        >>> info = TensorInfo("w", (2, 3), np.dtype("float16"))
        >>> info.size, info.nbytes, info.dtype_name
        (6, 12, 'float16')
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        """Number of elements."""
        # Python integers: a hostile header's shape must not wrap around in int64.
        return math.prod(int(d) for d in self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def dtype_name(self) -> str:
        """The dtype's name as checkpoints spell it (``"float32"``, ``"bfloat16"``)."""
        return dtype_name(self.dtype)


class SourceTemplate:
    """Format-specific structure a writer carries over from the newest member into the output.

    A source returns one from :meth:`TensorSource.template` (an HDF5 file's tree, a Keras
    archive's config, a ``.pt`` file's nesting key); the writer of the same format receives
    it as ``template``. Subclasses are usually frozen dataclasses.

    Example:
        >>> from dataclasses import dataclass
        >>> from polyak.formats import SourceTemplate
        >>> @dataclass(frozen=True)
        ... class Layout(SourceTemplate):  # the newest member's tensor order, to write the output in it
        ...     order: tuple
        ...     def renamed(self, names):
        ...         return Layout(tuple(names.get(n, n) for n in self.order))
        >>> Layout(("module.w", "module.b")).renamed({"module.w": "w", "module.b": "b"})
        Layout(order=('w', 'b'))
    """

    def renamed(self, names: Mapping[str, str]) -> SourceTemplate:
        """This template for a view of the source that calls its tensor ``old`` ``names[old]``.

        Used when names are rewritten between source and writer (``strip_prefix``). A
        template that refers to tensors by name must override this; the default (for
        templates that name no tensors) returns the template unchanged.
        """
        return self


class TensorSource(ABC):
    """One checkpoint as lazy, name-keyed tensors: shapes and dtypes up front, data one tensor at a time.

    :func:`polyak.open_source` opens one for any registered format. Subclasses (a format's
    reader, see :class:`FormatImpl`) implement :meth:`infos` and :meth:`read`, and
    override the other methods where the format has more to tell. A source iterates over
    its tensor names and is a context manager that closes it.

    Args:
        path: The checkpoint (``None`` for a source without a file).
        label: How the member is named in error messages (default: the path).

    Attributes:
        path: The checkpoint as a :class:`~pathlib.Path` (``None`` without a file).
        label: The member's name in error messages.

    Example:
        >>> import numpy as np, os, tempfile, polyak
        >>> p = os.path.join(tempfile.mkdtemp(), "m.npz")
        >>> _ = polyak.save({"w": np.arange(3.0), "step": np.array(7)}, p)
        >>> with polyak.open_source(p) as src:
        ...     src.keys(), src.infos()["w"].dtype_name, src.read("w").tolist(), src.nbytes
        (['w', 'step'], 'float64', [0.0, 1.0, 2.0], 32)
    """

    format_name: ClassVar[str] = "?"
    """The registry name of the source's format (``"safetensors"``, ``"npz"``...)."""
    zero_copy: ClassVar[bool] = False
    """True when :meth:`read` returns views of memory-mapped data (no copy per read), so
    that the engine may hold one tensor of every member at once."""

    def __init__(self, path: str | os.PathLike[str] | None, label: str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.label = label if label is not None else str(path)

    @abstractmethod
    def infos(self) -> Mapping[str, TensorInfo]:
        """Every tensor's info, in the checkpoint's own order."""

    @abstractmethod
    def read(self, name: str) -> np.ndarray:
        """The tensor ``name``. The caller must not write into the returned array."""

    def metadata(self) -> dict[str, str]:
        """String metadata stored with the checkpoint (empty if the format has none)."""
        return {}

    def aliases(self) -> dict[str, str]:
        """Tied tensors: ``{name: canonical name}`` for names that share another's storage."""
        return {}

    def extras(self) -> dict[str, Any]:
        """Format-specific details worth reporting (``polyak inspect``)."""
        return {}

    def template(self) -> SourceTemplate | None:
        """What a writer of this format carries over when this is the newest member.

        ``None`` (the default) when the format has nothing beyond the tensors.
        """
        return None

    def close(self) -> None:
        """Release file handles and mappings."""

    def files(self) -> list[Path]:
        """Every file this source reads (a sharded checkpoint's index and shards)."""
        return [] if self.path is None else [self.path]

    def keys(self) -> list[str]:
        """The tensor names, in the checkpoint's own order."""
        return list(self.infos())

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos())

    def __len__(self) -> int:
        return len(self.infos())

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(i.nbytes for i in self.infos().values())

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label!r}: {len(self)} tensors>"


class SourceView(TensorSource):
    """Another source seen through a wrapper: everything is the inner source's unless overridden.

    What wrappers share (``strip_prefix``'s renaming view, a checkpoint folder that opens
    the weights file inside it): they change how a source is named or found, never how
    its tensors are read. Its ``format_name`` and ``zero_copy`` are the inner source's;
    closing the view closes the inner source.

    Args:
        inner: The source seen through the view.
        path: The view's path (default: the inner source's).
        label: The view's label (default: the inner source's).

    Attributes:
        inner: The source seen through the view.

    Example:
        >>> import numpy as np, os, tempfile, polyak
        >>> from polyak.formats import SourceView
        >>> p = os.path.join(tempfile.mkdtemp(), "m.npz")
        >>> _ = polyak.save({"w": np.arange(3.0)}, p)
        >>> with SourceView(polyak.open_source(p), label="epoch 3") as view:
        ...     view.label, view.format_name, view.read("w").tolist()
        ('epoch 3', 'npz', [0.0, 1.0, 2.0])
    """

    def __init__(self, inner: TensorSource, path: str | os.PathLike[str] | None = None, label: str | None = None) -> None:
        super().__init__(inner.path if path is None else path, inner.label if label is None else label)
        self.inner = inner
        self.format_name = inner.format_name  # type: ignore[misc]
        self.zero_copy = inner.zero_copy  # type: ignore[misc]

    def infos(self) -> Mapping[str, TensorInfo]:
        return self.inner.infos()

    def read(self, name: str) -> np.ndarray:
        return self.inner.read(name)

    def metadata(self) -> dict[str, str]:
        return self.inner.metadata()

    def aliases(self) -> dict[str, str]:
        return self.inner.aliases()

    def extras(self) -> dict[str, Any]:
        return self.inner.extras()

    def template(self) -> SourceTemplate | None:
        return self.inner.template()

    def files(self) -> list[Path]:
        return self.inner.files()

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class WriteOptions:
    """Options every writer understands; a writer ignores what its format cannot express.

    Attributes:
        shard_size: Largest shard in bytes, or ``None`` for one file (safetensors only).
        keep_optimizer: Keras archives: copy optimizer variables from the template.
        inputs: The files being read. A writer never replaces or deletes them (the engine
            has already refused an output that is one of them; a sharded writer also
            spares them when it removes the shards of the output it replaces).

    Example:
        >>> import numpy as np
        >>> from polyak.formats import TensorInfo, WriteOptions, output_files
        >>> infos = [TensorInfo(f"w{i}", (256,), np.dtype("float32")) for i in range(4)]  # 1 KiB each
        >>> [p.name for p in output_files("avg.safetensors", infos, options=WriteOptions(shard_size=3000))]
        ['avg-00001-of-00002.safetensors', 'avg-00002-of-00002.safetensors', 'avg.safetensors.index.json']
    """

    shard_size: int | None = None
    keep_optimizer: bool = False
    inputs: tuple[Path, ...] = ()


def _not_unicode(text: object) -> str | None:
    """Why ``text`` cannot be stored as UTF-8 (``None`` when it can)."""
    if not isinstance(text, str):
        return f"a {type(text).__name__}, not a string"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        return f"not valid Unicode (it holds the lone surrogate U+{ord(bad):04X})"
    return None


def check_storable(infos: Sequence[TensorInfo], metadata: Mapping[str, str], path: Path) -> None:
    """Refuse tensor names and metadata that no checkpoint format can store.

    Every file format stores names and metadata as UTF-8 strings; a lone surrogate
    (``"a\\ud800"``, which a JSON ``\\ud800`` escape or a Python string can hold) has no
    UTF-8 form. Every :class:`TensorWriter` calls this before it creates any file, and the
    engine calls it before it plans an output, so nothing is left behind.

    Args:
        infos: The tensors to be written.
        metadata: The string metadata to be written.
        path: The output, for the message.

    Raises:
        FormatError: Naming the tensor (or metadata key) and the fix.

    Example:
        >>> check_storable([TensorInfo("w\\ud800", (1,), np.dtype("float32"))], {}, Path("avg.npz"))
        Traceback (most recent call last):
        ...
        polyak._errors.FormatError: avg.npz: cannot store the tensor name 'w\\ud800': not valid Unicode (it holds the lone surrogate U+D800); rename the tensor (e.g. with --strip-prefix or in the source checkpoint)
    """
    for info in infos:
        why = _not_unicode(info.name)
        if why is not None:
            raise FormatError(
                f"{path}: cannot store the tensor name {info.name!r}: {why}; rename the tensor "
                "(e.g. with --strip-prefix or in the source checkpoint)"
            )
    for key, value in metadata.items():
        why = _not_unicode(key)
        if why is not None:
            raise FormatError(f"{path}: cannot store the metadata key {key!r}: {why}; drop or rename it")
        why = _not_unicode(value)
        if why is not None:
            raise FormatError(f"{path}: cannot store the metadata value of {key!r}: {why}; drop or fix it")


class TensorWriter(ABC):
    """Writes one output atomically: nothing appears under the final name before commit.

    :func:`polyak.formats.open_writer` creates the writer of an output's format. A format's
    writer subclasses this and implements :meth:`write`, :meth:`commit` and :meth:`abort`
    (the constructor checks that the names and metadata can be stored before any file is
    created). Used as a context manager, an exception aborts it.

    Args:
        path: The output path.
        infos: The tensors to write (name, shape, output dtype), in the caller's order.
        metadata: String metadata to store where the format allows.
        template: The newest member's :meth:`TensorSource.template` when that member has
            the output's format, so that format-specific structure (HDF5 attributes, Keras
            configs, a ``.pt`` nesting key) can be carried over; ``None`` otherwise.
        aliases: Tied tensors ``{name: canonical}``; formats that can share storage write
            the data once.
        options: :class:`WriteOptions`.

    Attributes:
        notes: Lines for the summary about what the writer did beyond the tensors (files
            copied along, a format chosen for the user); filled by the time :meth:`commit`
            returns.

    Raises:
        FormatError: A tensor name or metadata entry cannot be stored (:func:`check_storable`).

    Example:
        >>> import numpy as np, os, tempfile, polyak
        >>> from polyak.formats import TensorInfo, open_writer
        >>> p = os.path.join(tempfile.mkdtemp(), "out.npz")
        >>> with open_writer(p, [TensorInfo("w", (2,), np.dtype("float32"))]) as writer:
        ...     writer.write("w", np.array([1.0, 2.0], np.float32))
        ...     os.path.exists(p)  # nothing under the final name yet
        ...     files = writer.commit()
        False
        >>> [f.name for f in files], polyak.open_source(p).read("w").tolist()
        (['out.npz'], [1.0, 2.0])
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        infos: Sequence[TensorInfo],
        *,
        metadata: Mapping[str, str],
        template: SourceTemplate | None = None,
        aliases: Mapping[str, str] | None = None,
        options: WriteOptions | None = None,
    ) -> None:
        self.path = Path(path)
        check_storable(infos, metadata, self.path)  # before any subclass creates a file
        self.infos = {i.name: i for i in infos}
        self.metadata = dict(metadata)
        self.template = template
        self.aliases = dict(aliases or {})
        self.options = options or WriteOptions()
        self.notes: list[str] = []

    @property
    def order(self) -> list[str]:
        """The order in which :meth:`write` must be called (default: the caller's)."""
        return list(self.infos)

    @property
    def targets(self) -> list[Path]:
        """Every final path :meth:`commit` will create or replace."""
        return [self.path]

    def target(self, name: str) -> np.ndarray | None:
        """Where the tensor ``name`` may be computed in place, or ``None`` (the default).

        A writer whose destination is memory (a module's own tensors) returns a writable,
        C-contiguous array of the output's shape; the engine then accumulates the result
        straight into it, and :meth:`write` is not called for that tensor.
        """
        return None

    @abstractmethod
    def write(self, name: str, array: np.ndarray) -> None:
        """Write one tensor. ``array`` may be a reused buffer: copy it if it must outlive the call."""

    @abstractmethod
    def commit(self) -> list[Path]:
        """Finish and make the output appear; returns every file written."""

    @abstractmethod
    def abort(self) -> None:
        """Delete everything written so far; the target is left untouched."""

    def __enter__(self) -> TensorWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


class SourceOpener(Protocol):
    """``open(path, *, key, label) -> TensorSource`` (a :class:`TensorSource` class is one)."""

    def __call__(self, path: Path, *, key: str | None = None, label: str | None = None) -> TensorSource: ...


class WriterFactory(Protocol):
    """``writer(path, infos, *, metadata, template, aliases, options) -> TensorWriter``.

    A :class:`TensorWriter` subclass that keeps the base constructor's signature is one.
    """

    def __call__(
        self,
        path: Path,
        infos: Sequence[TensorInfo],
        *,
        metadata: Mapping[str, str],
        template: SourceTemplate | None = None,
        aliases: Mapping[str, str] | None = None,
        options: WriteOptions | None = None,
    ) -> TensorWriter: ...


@dataclass(frozen=True)
class FormatImpl:
    """What a format module provides to polyak: how to recognise, read and write the format.

    One of these, named in the format's registry entry (:class:`Format`), is a format.

    Attributes:
        sniff: ``sniff(path, head) -> bool``: whether the file looks like this format
            (``head``: its first 4096 bytes; empty for a folder). Must not import a
            framework, and should answer ``False`` rather than raise.
        open: Opens a file (or folder) of this format as a lazy :class:`TensorSource`.
            ``key`` selects a nested state dict (formats without nesting refuse it);
            ``label`` names the member in messages.
        writer: Creates the :class:`TensorWriter` for an output of this format; ``None``
            when polyak cannot write it.
        targets: ``targets(path, infos, options) -> [paths]``: every final path the writer
            will create or replace, when that is more than ``path`` itself (shards and an
            index, the files of a folder). The engine checks all of them against the inputs
            and the overwrite rule (:func:`polyak._atomic.check_outputs`) before any writer
            is opened.

    Example:
        A read-only format of JSON files (``{"name": [numbers]}``), registered and averaged:

        >>> import json, tempfile, numpy as np, polyak
        >>> from pathlib import Path
        >>> from polyak.formats import FORMATS, Format, FormatImpl, TensorInfo, TensorSource, register_format
        >>> class JsonSource(TensorSource):
        ...     format_name = "toy-json"
        ...     def __init__(self, path, *, key=None, label=None):
        ...         super().__init__(path, label)
        ...         self.data = {k: np.asarray(v, np.float32) for k, v in json.loads(Path(path).read_text()).items()}
        ...     def infos(self):
        ...         return {k: TensorInfo(k, a.shape, a.dtype) for k, a in self.data.items()}
        ...     def read(self, name):
        ...         return self.data[name]
        >>> TOY = FormatImpl(sniff=lambda path, head: head.lstrip().startswith(b"{"), open=JsonSource)
        >>> _ = register_format(Format("toy-json", (".toy.json",), TOY, "JSON lists of numbers"))
        >>> d = Path(tempfile.mkdtemp())
        >>> for i in (1, 2):
        ...     _ = (d / f"m{i}.toy.json").write_text(json.dumps({"w": [i, 2 * i]}))
        >>> polyak.average(sorted(d.glob("*.toy.json")))["w"].tolist()
        [1.5, 3.0]
        >>> del FORMATS["toy-json"]  # leave the registry as it was
    """

    sniff: Callable[[Path, bytes], bool]
    open: SourceOpener
    writer: WriterFactory | None = None
    targets: Callable[[Path, Sequence[TensorInfo], WriteOptions], list[Path]] | None = None

    def output_files(self, path: Path, infos: Sequence[TensorInfo], options: WriteOptions) -> list[Path]:
        """Every final path the writer will create or replace for ``path`` (``[path]`` unless
        the format declares ``targets``), so that all of them are checked before writing."""
        return [path] if self.targets is None else list(self.targets(path, infos, options))
