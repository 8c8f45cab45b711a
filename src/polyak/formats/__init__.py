"""Checkpoint formats: a registry keyed by suffix and checked by magic bytes.

Each format gives a lazy, name-keyed :class:`TensorSource` and (where it can be written) a
:class:`TensorWriter`. Format modules are imported only when their format is used, so
reading a safetensors file never imports torch, h5py or keras.

Adding a format: write a module that defines the format's :class:`TensorSource` (and, if
polyak should write it, a :class:`TensorWriter`) and declares them in one
:class:`FormatImpl` (``sniff``, ``open``, ``writer``); then register a :class:`Format`
that names it, either as the object itself or lazily as ``"package.module:NAME"``::

    from polyak.formats import Format, FormatImpl, register_format

    TOY = FormatImpl(sniff=sniff_toy, open=ToySource, writer=ToyWriter)
    register_format(Format("toy", (".toy",), "mypackage.toy:TOY", "toy checkpoints"))

``polyak.average``, ``polyak.inspect`` and the CLI then read ``*.toy`` files (and write
them, with a writer). A writer that carries structure over from the newest member (a
file layout, a config) gets it from that member's :meth:`TensorSource.template`: the
source returns a :class:`SourceTemplate` of its own design, renamed through
:meth:`SourceTemplate.renamed` when ``strip_prefix`` changes tensor names on the way.
The built-in formats below are registered the same way.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._errors import ConfigError, FormatError
from ._base import (
    FormatImpl,
    SourceTemplate,
    SourceView,
    TensorInfo,
    TensorSource,
    TensorWriter,
    WriteOptions,
    WriterFactory,
    check_storable,
)

__all__ = [
    "FORMATS",
    "Format",
    "FormatImpl",
    "SourceTemplate",
    "SourceView",
    "TensorInfo",
    "TensorSource",
    "TensorWriter",
    "WriteOptions",
    "check_storable",
    "detect_format",
    "format_names",
    "get_format",
    "open_source",
    "open_writer",
    "output_files",
    "register_format",
    "suffix_format",
]

@dataclass(frozen=True)
class Format:
    """A registered checkpoint format.

    Attributes:
        name: Used by ``--format`` and in messages.
        suffixes: File-name endings that select this format (longest match wins).
        provider: The format's :class:`FormatImpl`, or where to find it:
            ``"package.module:NAME"`` (a leading ``.`` is relative to this package),
            imported on first use.
        description: One line for ``--help``.
        directory: The "file" is a folder (e.g. a torch.distributed checkpoint).
    """

    name: str
    suffixes: tuple[str, ...]
    provider: str | FormatImpl
    description: str
    directory: bool = False

    def impl(self) -> FormatImpl:
        """The format's implementation (its module is imported now if it was not yet)."""
        if isinstance(self.provider, FormatImpl):
            return self.provider
        module, _, attr = self.provider.partition(":")
        impl = getattr(importlib.import_module(module, __name__), attr, None)
        if not isinstance(impl, FormatImpl):
            raise ConfigError(f"format {self.name!r}: {self.provider!r} does not name a polyak.formats.FormatImpl")
        return impl

    @property
    def writable(self) -> bool:
        """Whether polyak can write this format."""
        return self.impl().writer is not None


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format to the registry (a later registration of the same name replaces it)."""
    FORMATS[fmt.name] = fmt
    return fmt


for _fmt in (
    Format("safetensors", (".safetensors",), ".safetensors:SAFETENSORS", "safetensors, one file"),
    Format(
        "safetensors-index",
        (".safetensors.index.json",),
        ".safetensors:SAFETENSORS_INDEX",
        "Hugging Face sharded safetensors (model.safetensors.index.json + shards)",
    ),
    Format("npz", (".npz",), ".npz:NPZ", "numpy .npz archive"),
    Format(
        "torch",
        (".pt", ".pth", ".bin", ".ckpt", ".pt.tar", ".pth.tar"),
        ".torch_pt:TORCH",
        "PyTorch state dict (torch.save), loaded with weights_only=True",
    ),
    Format(
        "torch-index",
        (".bin.index.json",),
        ".torch_pt:TORCH_INDEX",
        "Hugging Face sharded PyTorch checkpoint (pytorch_model.bin.index.json + .bin shards), loaded with weights_only=True",
    ),
    Format("keras-weights", (".weights.h5",), ".keras_weights:KERAS_WEIGHTS", "Keras 3 weights (model.save_weights), via h5py"),
    Format("keras", (".keras",), ".keras_archive:KERAS", "Keras 3 model archive (model.save), via h5py"),
    Format(
        "keras2-h5",
        (".h5", ".hdf5"),
        ".keras2_h5:KERAS2_H5",
        "legacy Keras 2 HDF5, full model or weights only (layer_names layout), via h5py",
    ),
    Format(
        "dcp",
        (),
        ".dcp:DCP",
        "torch.distributed.checkpoint folder (.metadata + *.distcp), read one tensor at a time",
        directory=True,
    ),
    Format(
        "hf-folder",
        (),
        ".hf_folder:HF_FOLDER",
        "Hugging Face save_pretrained/Trainer or Accelerate save_state folder (model.safetensors, "
        "its sharded index or pytorch_model.bin inside); written as a folder from_pretrained opens",
        directory=True,
    ),
):
    register_format(_fmt)


#: A suffix shared by several layouts: the content decides between them (a Keras 3 weights
#: file saved as ``w.h5`` is read, and written, as Keras 3 weights).
CONTENT_DECIDES: dict[str, tuple[str, ...]] = {"keras2-h5": ("keras-weights",)}


def format_names() -> list[str]:
    return sorted(FORMATS)


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown format {name!r}; known formats: {', '.join(format_names())}") from None


def _by_suffix(path: Path) -> Format | None:
    name = path.name.lower()
    best: tuple[int, Format] | None = None
    for fmt in FORMATS.values():
        for suffix in fmt.suffixes:
            if name.endswith(suffix) and (best is None or len(suffix) > best[0]):
                best = (len(suffix), fmt)
    return None if best is None else best[1]


def suffix_format(path: str | os.PathLike[str]) -> Format | None:
    """The format a file name's suffix selects (longest match), or ``None``."""
    return _by_suffix(Path(path))


def _read_head(path: Path, size: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        return b""
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def _sniff(path: Path) -> list[Format]:
    """Every registered format whose magic bytes / structure match the file."""
    head = b"" if path.is_dir() else _read_head(path)
    found = []
    for fmt in FORMATS.values():
        if fmt.directory != path.is_dir():
            continue
        try:
            if fmt.impl().sniff(path, head):
                found.append(fmt)
        except Exception:  # a sniffer must never decide for another format by crashing
            continue
    return found


def detect_format(path: str | os.PathLike[str], format: str | None = None) -> Format:
    """Choose the format of an existing file: ``format`` if given, else suffix, checked by content.

    Raises:
        FormatError: The file is missing or empty, or its content does not match its suffix
            (the message names the format the content looks like and the ``--format`` fix).
    """
    p = Path(path)
    if not p.exists():
        raise FormatError(f"{p}: no such file")
    if p.is_file() and p.stat().st_size == 0:
        raise FormatError(f"{p}: the file is empty (0 bytes); it was probably not written completely")
    if format is not None:
        fmt = get_format(format)
        if fmt not in _sniff(p):
            raise FormatError(
                f"{p}: the content is not {fmt.name} ({fmt.description}); check --format"
            )
        return fmt
    if p.is_dir():
        return _detect_folder(p)
    by_suffix = _by_suffix(p)
    sniffed = _sniff(p)
    if by_suffix is not None and by_suffix in sniffed:
        return by_suffix
    if by_suffix is not None and len(sniffed) == 1 and sniffed[0].name in CONTENT_DECIDES.get(by_suffix.name, ()):
        return sniffed[0]
    if by_suffix is None:
        hint = (
            f"; its content looks like {sniffed[0].name}, pass --format {sniffed[0].name}"
            if len(sniffed) == 1
            else ""
        )
        raise FormatError(
            f"{p}: unknown checkpoint suffix{hint}. Known formats: {', '.join(format_names())}"
        )
    if sniffed:
        raise FormatError(
            f"{p}: the name says {by_suffix.name} but the content looks like {sniffed[0].name}; "
            f"rename the file or pass --format {sniffed[0].name}"
        )
    raise FormatError(
        f"{p}: not a valid {by_suffix.name} file (wrong magic bytes or corrupted header); "
        "the file may be truncated or not a checkpoint"
    )


def _detect_folder(p: Path) -> Format:
    """The folder format a folder member has: exactly one must recognise it."""
    sniffed = _sniff(p)
    if len(sniffed) == 1:
        return sniffed[0]
    if sniffed:
        names = ", ".join(f.name for f in sniffed)
        raise FormatError(f"{p}: the folder looks like several checkpoint formats ({names}); pass --format NAME")
    kinds = "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values() if f.directory)
    raise FormatError(f"{p}: a folder that holds no checkpoint polyak knows ({kinds}); give the checkpoint file inside it")


def output_format(path: str | os.PathLike[str], format: str | None = None) -> Format:
    """The format to write ``path`` in: ``format`` if given, else by suffix."""
    if format is not None:
        fmt = get_format(format)
    else:
        found = _by_suffix(Path(path))
        if found is None:
            writable = sorted({s for f in FORMATS.values() if f.writable for s in f.suffixes})
            raise ConfigError(
                f"cannot tell the output format from {Path(path).name!r}; use one of the "
                f"suffixes {', '.join(writable)} or pass --out-format"
            )
        fmt = found
    _writer(fmt)
    return fmt


def _writer(fmt: Format) -> WriterFactory:
    writer = fmt.impl().writer
    if writer is None:
        raise ConfigError(f"polyak cannot write {fmt.name} files; choose another output suffix")
    return writer


def open_source(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    key: str | None = None,
    label: str | None = None,
) -> TensorSource:
    """Open a checkpoint lazily as a :class:`TensorSource`.

    Args:
        path: The checkpoint file (or folder for folder formats).
        format: Force a format by name instead of detecting it.
        key: For nested checkpoints (``{"model": {...}}``), the key holding the tensors.
        label: How the member is named in messages (default: the path).

    Raises:
        FormatError: Unreadable, corrupt or unsafe file.
    """
    fmt = detect_format(path, format)
    return fmt.impl().open(Path(path), key=key, label=label)


def open_writer(
    path: str | os.PathLike[str],
    infos: list[TensorInfo],
    *,
    format: str | None = None,
    metadata: dict[str, str] | None = None,
    template: TensorSource | None = None,
    aliases: dict[str, str] | None = None,
    options: WriteOptions | None = None,
) -> TensorWriter:
    """Create the writer for ``path`` (format from ``format`` or the suffix).

    ``template`` is the newest member: when it has the output's format, the writer receives
    its :meth:`TensorSource.template` (the structure to carry over).
    """
    fmt = _writer_format(path, format, template)
    writer = _writer(fmt)
    carried = template.template() if template is not None and template.format_name == fmt.name else None
    return writer(Path(path), infos, metadata=metadata or {}, template=carried, aliases=aliases, options=options)


def _writer_format(path: str | os.PathLike[str], format: str | None, template: TensorSource | None) -> Format:
    fmt = output_format(path, format)
    if template is not None and format is None and template.format_name in CONTENT_DECIDES.get(fmt.name, ()):
        fmt = get_format(template.format_name)  # e.g. Keras 3 weights written as ``avg.h5``
    return fmt


def output_files(
    path: str | os.PathLike[str],
    infos: Sequence[TensorInfo],
    *,
    format: str | None = None,
    template: TensorSource | None = None,
    options: WriteOptions | None = None,
) -> list[Path]:
    """Every final path that :func:`open_writer` with the same arguments will create or
    replace (the file itself; every shard and the index of a sharded output), known before
    the writer is opened so that all of them can be checked first."""
    fmt = _writer_format(path, format, template)
    _writer(fmt)
    return fmt.impl().output_files(Path(path), infos, options or WriteOptions())
