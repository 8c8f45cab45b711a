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
    """A registered checkpoint format: its name, the suffixes that select it, and its implementation.

    Attributes:
        name: Used by ``--format`` and in messages.
        suffixes: File-name endings that select this format (longest match wins).
        provider: The format's :class:`FormatImpl`, or where to find it:
            ``"package.module:NAME"`` (a leading ``.`` is relative to this package),
            imported on first use.
        description: One line for ``--help``.
        directory: The "file" is a folder (e.g. a torch.distributed checkpoint).

    Example:
        >>> from polyak.formats import get_format
        >>> fmt = get_format("safetensors")
        >>> fmt.suffixes, fmt.writable, fmt.impl().writer is not None
        (('.safetensors',), True, True)
        >>> get_format("dcp").directory, get_format("dcp").writable  # read-only folders
        (True, False)
    """

    name: str
    suffixes: tuple[str, ...]
    provider: str | FormatImpl
    description: str
    directory: bool = False

    def impl(self) -> FormatImpl:
        """The format's implementation (its module is imported now if it was not yet).

        Raises:
            ConfigError: ``provider`` does not name a :class:`FormatImpl`.
        """
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
"""The format registry: name → :class:`Format`, the built-in formats first.

Filled by :func:`register_format`; read by :func:`get_format`, :func:`detect_format`,
:func:`suffix_format` and the command line's ``--format`` choices.
"""


def register_format(fmt: Format) -> Format:
    """Add a checkpoint format to the registry, so that ``polyak.average``, ``inspect`` and the CLI read it.

    A later registration of the same name replaces the earlier one. Where two formats
    claim a suffix, the longer suffix wins; the content (the format's ``sniff``) must
    then confirm it.

    Args:
        fmt: The format: its name, suffixes, implementation (or where to import it from)
            and a description.

    Returns:
        ``fmt``.

    Example:
        >>> from polyak.formats import FORMATS, Format, get_format, register_format, suffix_format
        >>> st = get_format("safetensors")
        >>> _ = register_format(Format("st-weights", (".st",), st.provider, "safetensors files named *.st"))
        >>> suffix_format("model_10.st").name
        'st-weights'
        >>> del FORMATS["st-weights"]  # leave the registry as it was

        :class:`FormatImpl` shows a format of one's own.
    """
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
    """The names of the registered checkpoint formats: what ``format=`` and ``--format`` accept.

    Returns:
        The names, sorted.

    Example:
        >>> from polyak.formats import format_names
        >>> format_names()
        ['dcp', 'hf-folder', 'keras', 'keras-weights', 'keras2-h5', 'npz', 'safetensors', 'safetensors-index', 'torch', 'torch-index']
    """
    return sorted(FORMATS)


def get_format(name: str) -> Format:
    """Look a registered checkpoint format up by name.

    Args:
        name: A registered name (see :func:`format_names`).

    Returns:
        The :class:`Format`.

    Raises:
        ConfigError: No format has that name; the message lists the known ones.

    Example:
        >>> from polyak.formats import get_format
        >>> get_format("npz").description
        'numpy .npz archive'
    """
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
    """The format a file name's suffix selects, without looking at the file.

    Args:
        path: A file name or path (it need not exist); case is ignored.

    Returns:
        The :class:`Format` whose suffix matches the name's end (the longest match), or
        ``None`` when none does.

    Example:
        >>> from polyak.formats import suffix_format
        >>> suffix_format("out/model.safetensors.index.json").name, suffix_format("epoch_9.CKPT").name
        ('safetensors-index', 'torch')
        >>> suffix_format("notes.txt") is None
        True
    """
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
    """Choose the format of an existing checkpoint: ``format`` if given, else its suffix, checked by content.

    A file's suffix selects a format (:func:`suffix_format`), whose magic bytes or structure
    must then match the content; a folder is the one folder format that recognises it.

    Args:
        path: The checkpoint file (or folder).
        format: A registered format name to use instead of the suffix (still checked
            against the content).

    Returns:
        The :class:`Format`.

    Raises:
        ConfigError: ``format`` names no registered format.
        FormatError: The file is missing or empty, its suffix is unknown, or its content
            does not match its suffix or ``format`` (the message names the format the
            content looks like and the ``--format`` fix); a folder that no folder format
            (or more than one) recognises.

    Example:
        >>> import numpy as np, os, tempfile, polyak
        >>> from polyak.formats import detect_format
        >>> d = tempfile.mkdtemp()
        >>> _ = polyak.save({"w": np.arange(3.0)}, os.path.join(d, "m.npz"))
        >>> detect_format(os.path.join(d, "m.npz")).name
        'npz'
        >>> os.rename(os.path.join(d, "m.npz"), os.path.join(d, "m.safetensors"))
        >>> detect_format(os.path.join(d, "m.safetensors"))
        Traceback (most recent call last):
        ...
        polyak._errors.FormatError: /.../m.safetensors: the name says safetensors but the content looks like npz; rename the file or pass --format npz
        >>> detect_format(os.path.join(d, "m.safetensors"), "npz").name
        'npz'
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
    """Open a checkpoint lazily as a :class:`TensorSource`: names, shapes and dtypes now, tensors on demand.

    The format is detected as :func:`detect_format` does. Only the header is read when the
    source opens; each :meth:`TensorSource.read` reads one tensor. Close the source (or use
    it as a context manager) to release files and memory maps.

    Args:
        path: The checkpoint file (or folder for folder formats).
        format: Force a format by name instead of detecting it.
        key: For nested checkpoints (``{"model": {...}}``), the key holding the tensors.
        label: How the member is named in messages (default: the path).

    Returns:
        The open :class:`TensorSource`.

    Raises:
        ConfigError: ``format`` names no registered format; ``key`` is given for a format
            without nesting, or names no entry of the checkpoint.
        FormatError: Unreadable, corrupt or truncated file, or content that does not match
            its suffix.
        UnsafeFileError: A file that would need code execution (a pickle beyond
            ``torch.load(weights_only=True)``), links outside itself or unbounded resources.

    Example:
        >>> import numpy as np, os, tempfile, polyak
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> _ = polyak.save({"w": np.arange(6.0, dtype=np.float32).reshape(2, 3)}, p)
        >>> with polyak.open_source(p) as src:
        ...     src.format_name, list(src), src.infos()["w"].shape, src.read("w")[1].tolist()
        ('safetensors', ['w'], (2, 3), [3.0, 4.0, 5.0])
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
    """Create the atomic :class:`TensorWriter` for an output: its format from ``format`` or the suffix.

    Nothing appears under ``path`` before the writer's :meth:`~TensorWriter.commit`; use it
    as a context manager so that an error aborts it. Check the output files first with
    :func:`output_files` (the engine refuses existing outputs and inputs before it opens a
    writer; the writer itself replaces what is there).

    Args:
        path: The output file.
        infos: The tensors to write (name, shape, output dtype), in the caller's order.
        format: Force the output format by name (default: from the suffix).
        metadata: String metadata to store where the format allows.
        template: The newest member: when it has the output's format, the writer receives
            its :meth:`TensorSource.template` (the structure to carry over).
        aliases: Tied tensors ``{name: canonical name}`` (written once where the format
            can share storage).
        options: :class:`WriteOptions` (shard size, inputs never to replace...).

    Returns:
        The writer; call :meth:`~TensorWriter.write` for each name of its
        :attr:`~TensorWriter.order`, then :meth:`~TensorWriter.commit`.

    Raises:
        ConfigError: The format cannot be told from the suffix, or polyak cannot write it.
        FormatError: A tensor name or metadata entry cannot be stored (not valid Unicode).

    Example:
        >>> import numpy as np, os, tempfile, polyak
        >>> from polyak.formats import TensorInfo, open_writer
        >>> p = os.path.join(tempfile.mkdtemp(), "out.safetensors")
        >>> with open_writer(p, [TensorInfo("w", (2,), np.dtype("float32"))], metadata={"epoch": "9"}) as writer:
        ...     for name in writer.order:
        ...         writer.write(name, np.ones(2, np.float32))
        ...     files = writer.commit()
        >>> [f.name for f in files], polyak.inspect(p).metadata
        (['out.safetensors'], {'epoch': '9'})
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
    """Every file an output will create or replace, known before any is written.

    The file itself, or every shard and the index of a sharded output: what
    :func:`open_writer` with the same arguments will create or replace, so that all of them
    can be checked first (nothing is read or written here).

    Args:
        path: The output file.
        infos: The tensors to write (their sizes decide the shards).
        format: Force the output format by name (default: from the suffix).
        template: The newest member, as for :func:`open_writer`.
        options: :class:`WriteOptions` (``shard_size`` splits a safetensors output).

    Returns:
        The final paths.

    Raises:
        ConfigError: The format cannot be told from the suffix, or polyak cannot write it.

    Example:
        >>> import numpy as np
        >>> from polyak.formats import TensorInfo, WriteOptions, output_files
        >>> infos = [TensorInfo(f"w{i}", (256,), np.dtype("float32")) for i in range(4)]  # 1 KiB each
        >>> [p.name for p in output_files("avg.safetensors", infos)]
        ['avg.safetensors']
        >>> [p.name for p in output_files("avg.safetensors", infos, options=WriteOptions(shard_size=2048))]
        ['avg-00001-of-00002.safetensors', 'avg-00002-of-00002.safetensors', 'avg.safetensors.index.json']
    """
    fmt = _writer_format(path, format, template)
    _writer(fmt)
    return fmt.impl().output_files(Path(path), infos, options or WriteOptions())
