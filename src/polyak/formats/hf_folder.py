"""Hugging Face checkpoint folders: ``save_pretrained``/``Trainer`` and Accelerate ``save_state``.

Reading. A folder is a member when it holds a model's weights under the names Hugging Face
uses, taken in the order ``from_pretrained`` takes them (:data:`WEIGHT_FILES`):
``model.safetensors``, ``model.safetensors.index.json`` (shards), ``pytorch_model.bin``,
``pytorch_model.bin.index.json`` (shards). A ``Trainer``'s ``checkpoint-N/`` and a
``save_pretrained`` folder hold one of them; Accelerate's ``save_state`` folder holds
``model.safetensors`` (or ``pytorch_model.bin``) for its first model and ``model_1...`` for
further ones, which are refused as ambiguous (name the file you mean). The weights are read
by the existing readers (:class:`~polyak.formats.safetensors.SafetensorsSource`, the
sharded index, :class:`~polyak.formats.torch_pt.TorchSource` with ``weights_only=True``):
this module only finds them.

Writing. A folder output is what ``from_pretrained`` opens: the averaged weights in the
newest member's layout (one ``model.safetensors``, or shards of the newest member's largest
shard size with ``model.safetensors.index.json``; ``pytorch_model.bin`` members are written
as safetensors, which ``from_pretrained`` prefers), plus the newest member's files that
describe the model (``config.json``, ``generation_config.json``, tokenizer and processor
files, custom code), never its training state or other weights (:func:`model_files`). Tied
tensors are stored once, as ``save_pretrained`` stores them. The folder is built as a
temporary sibling and renamed into place (:class:`polyak._atomic.AtomicFolder`).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import AtomicFolder, fsync_file
from .._errors import FormatError, OutputError
from ._base import (
    FormatImpl,
    SourceTemplate,
    SourceView,
    TensorInfo,
    TensorSource,
    TensorWriter,
    WriteOptions,
)
from .safetensors import (
    DEFAULT_SHARD_SIZE,
    SafetensorsIndexSource,
    open_safetensors,
    open_safetensors_index,
    safetensors_writer,
)
from .torch_pt import TorchSource, open_torch_index

__all__ = [
    "HF_FOLDER",
    "TRAINING_STATE",
    "WEIGHT_FILES",
    "FolderTemplate",
    "FolderWriter",
    "HFFolderSource",
    "find_weights",
    "model_files",
]


def _open_torch(path: Path, *, key: str | None = None, label: str | None = None) -> TensorSource:
    return TorchSource(path, key=key, label=label)


#: The weights files of a checkpoint folder, in the order ``from_pretrained`` looks for them
#: (the first one present is the one read), with the reader of each.
WEIGHT_FILES: tuple[tuple[str, Callable[..., TensorSource]], ...] = (
    ("model.safetensors", open_safetensors),
    ("model.safetensors.index.json", open_safetensors_index),
    ("pytorch_model.bin", _open_torch),
    ("pytorch_model.bin.index.json", open_torch_index),
)
#: Accelerate names the weights of the second, third... prepared model ``model_1.safetensors``,
#: ``pytorch_model_2.bin``.
_MORE_MODELS = re.compile(r"(?:model|pytorch_model)_\d+\.(?:safetensors|bin)")

#: Never copied into a folder output: weights of any kind (the average replaces them) ...
_WEIGHT_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npz", ".npy", ".h5", ".hdf5",
    ".keras", ".msgpack", ".distcp", ".gguf", ".onnx", ".tar", ".index.json",
)
#: ... and the training state a Trainer or Accelerate keeps beside them (most of it is
#: caught by its suffix: ``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``,
#: ``training_args.bin``, ``random_states_*.pkl``, ``optimizer.bin``).
TRAINING_STATE = ("trainer_state.json",)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def find_weights(folder: Path, label: str | None = None) -> str | None:
    """The weights file a checkpoint folder holds (the first of :data:`WEIGHT_FILES`), or
    ``None`` when it holds none.

    Raises:
        FormatError: The folder holds the weights of several models (Accelerate's
            ``model_1.safetensors``...): which one to average is the user's call.
    """
    found = next((name for name, _ in WEIGHT_FILES if _is_file(folder / name)), None)
    if found is None:
        return None
    try:
        more = sorted(e.name for e in folder.iterdir() if _MORE_MODELS.fullmatch(e.name))
    except OSError as exc:
        raise FormatError(f"{label or folder}: cannot list the folder: {exc.strerror or exc}") from exc
    if more:
        raise FormatError(
            f"{label or folder}: the folder holds the weights of {len(more) + 1} models ({found}, "
            f"{', '.join(more)}); give the file to average instead of the folder, e.g. {folder / found}"
        )
    return found


def sniff_hf_folder(path: Path, head: bytes) -> bool:
    """A folder with a Hugging Face weights file in it (checked by name; nothing is read)."""
    return path.is_dir() and any(_is_file(path / name) for name, _ in WEIGHT_FILES)


def model_files(folder: Path, weights: str) -> tuple[list[str], list[str]]:
    """Which of a checkpoint folder's entries a folder output copies, and which it leaves out.

    Copied: every regular file at the top of the folder that describes the model
    (``config.json``, ``generation_config.json``, tokenizer, processor and chat-template
    files, custom modelling code, a model card), i.e. everything except hidden files,
    weights of any format (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``,
    shard indexes...) and the training state (``trainer_state.json``, ``optimizer.pt``,
    ``scheduler.pt``, ``rng_state*.pth``, ``training_args.bin``, Accelerate's
    ``optimizer.bin`` and ``random_states_*.pkl``). Left out: those, and every subfolder.

    Returns:
        ``(copied, left_out)``: file names, sorted.
    """
    copied: list[str] = []
    left_out: list[str] = []
    try:
        entries = sorted(folder.iterdir(), key=lambda e: e.name)
    except OSError as exc:
        raise FormatError(f"{folder}: cannot list the folder: {exc.strerror or exc}") from exc
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue  # hidden: polyak's own temporaries, editor and VCS files
        lower = name.lower()
        if not _is_file(entry):
            left_out.append(name + "/" if entry.is_dir() else name)
        elif lower.endswith(_WEIGHT_SUFFIXES) or lower in TRAINING_STATE:
            if name != weights:
                left_out.append(name)
        else:
            copied.append(name)
    return copied, left_out


@dataclass(frozen=True)
class FolderTemplate(SourceTemplate):
    """What a folder output takes from the newest member.

    Attributes:
        folder: The newest member's folder.
        weights: Its weights file (one of :data:`WEIGHT_FILES`).
        shard_size: For sharded weights, the tensor bytes of its largest shard (the output
            is sharded to the same size); ``None`` for one file.
        copied: The files a folder output copies (:func:`model_files`).
        left_out: The entries it does not copy.
    """

    folder: Path
    weights: str
    shard_size: int | None
    copied: tuple[str, ...]
    left_out: tuple[str, ...]


class HFFolderSource(SourceView):
    """A checkpoint folder, read through the weights file inside it (:func:`find_weights`)."""

    format_name = "hf-folder"

    def __init__(self, path: Path, *, key: str | None = None, label: str | None = None) -> None:
        label = str(path) if label is None else label
        weights = find_weights(path, label)
        if weights is None:
            raise FormatError(
                f"{label}: no weights in this folder (none of {', '.join(n for n, _ in WEIGHT_FILES)}); "
                "give the checkpoint file itself"
            )
        opener = dict(WEIGHT_FILES)[weights]
        super().__init__(opener(path / weights, key=key, label=f"{label.rstrip('/')}/{weights}"), path, label)
        self.format_name = "hf-folder"  # type: ignore[misc]
        self.weights = weights

    def template(self) -> FolderTemplate:
        folder = Path(self.label) if self.path is None else self.path
        shard_size = None
        if isinstance(self.inner, SafetensorsIndexSource):
            shard_size = max(self.inner.shard_bytes().values(), default=0) or None
        copied, left_out = model_files(folder, self.weights)
        return FolderTemplate(folder, self.weights, shard_size, tuple(copied), tuple(left_out))

    def extras(self) -> dict[str, object]:
        tpl = self.template()
        return {**self.inner.extras(), "weights": self.weights, "model_files": list(tpl.copied)}


def open_hf_folder(path: Path, *, key: str | None = None, label: str | None = None) -> HFFolderSource:
    return HFFolderSource(path, key=key, label=label)


#: The weights file of a folder output: one file, or the index of its shards.
OUT_WEIGHTS = "model.safetensors"
OUT_INDEX = "model.safetensors.index.json"


class FolderWriter(TensorWriter):
    """Writes a folder ``from_pretrained`` opens: weights, then the newest member's model files.

    The tensors go to ``model.safetensors`` (or shards with ``model.safetensors.index.json``)
    inside a temporary sibling folder through the safetensors writer; :meth:`commit` finishes
    them, copies the model files of the newest member (``template``, when it is a checkpoint
    folder) and renames the folder into place. Tied tensors (``aliases``) are stored once,
    under the name they are tied to, as ``save_pretrained`` does; safetensors metadata gets
    ``format: pt`` when the members' has none (``from_pretrained`` requires it).
    """

    def __init__(self, path: Path, infos: Sequence[TensorInfo], **kwargs: Any) -> None:
        super().__init__(path, infos, **kwargs)
        tpl = self.template if isinstance(self.template, FolderTemplate) else None
        self._tpl = tpl
        stored = [i for i in infos if i.name not in self.aliases]
        # The layout: --shard-size decides when given, else the newest member's.
        shard_size = self.options.shard_size
        if shard_size is not None:
            sharded = sum(i.nbytes for i in stored) > shard_size
        else:
            shard_size = None if tpl is None else tpl.shard_size
            sharded = shard_size is not None
        weights = OUT_INDEX if sharded else OUT_WEIGHTS
        meta = {"format": "pt", **self.metadata}
        self._folder = AtomicFolder(self.path)
        try:
            self._inner = safetensors_writer(
                self._folder.tmp / weights, stored, metadata=meta,
                options=WriteOptions(
                    shard_size=(shard_size or DEFAULT_SHARD_SIZE) if sharded else None, inputs=self.options.inputs
                ),
            )
        except BaseException:
            self._folder.abort()
            raise
        if tpl is not None and not tpl.weights.startswith("model.safetensors"):
            self.notes.append(
                f"the members hold {tpl.weights}; the average is written as safetensors ({weights}), "
                "which from_pretrained prefers"
            )
        if self.aliases:
            tied = ", ".join(f"{a} (= {c})" for a, c in sorted(self.aliases.items()))
            self.notes.append(f"tied tensors stored once, as save_pretrained does: {tied}")

    @property
    def order(self) -> list[str]:
        return self._inner.order

    @property
    def targets(self) -> list[Path]:
        return [self.path]

    def write(self, name: str, array: np.ndarray) -> None:
        self._inner.write(name, array)

    def commit(self) -> list[Path]:
        try:
            written = self._inner.commit()
            copied = []
            if self._tpl is not None:
                for name in self._tpl.copied:
                    dst = self._folder.tmp / name
                    try:
                        shutil.copyfile(self._tpl.folder / name, dst)
                        fsync_file(dst)
                    except OSError as exc:
                        raise OutputError(
                            f"cannot copy {self._tpl.folder / name} into the output folder {self.path}: "
                            f"{exc.strerror or exc}"
                        ) from exc
                    copied.append(name)
            final = self._folder.commit()
        except BaseException:
            self.abort()
            raise
        if self._tpl is not None:
            src = self._tpl.folder.name
            self.notes.append(f"copied from {src}: {', '.join(copied) if copied else 'nothing (no model files)'}")
            if self._tpl.left_out:
                self.notes.append(f"left out of {src} (training state, other weights): {', '.join(self._tpl.left_out)}")
        return [final / p.name for p in written] + [final / n for n in copied]

    def abort(self) -> None:
        self._inner.abort()
        self._folder.abort()


HF_FOLDER = FormatImpl(sniff=sniff_hf_folder, open=open_hf_folder, writer=FolderWriter)
