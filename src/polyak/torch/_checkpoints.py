"""Capture checkpoints during training (:class:`CheckpointSaver`)."""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .._atomic import AtomicFile, cleanup_stale_temps
from .._errors import ConfigError, MismatchError, whole_number
from .._retention import Retention
from ..formats import open_writer
from ..formats._base import TensorInfo
from ..formats.torch_pt import tensor_to_numpy
from ._common import WRAPPER_PREFIXES, canonical_name, is_writer_rank

__all__ = ["CheckpointSaver"]

_FORMATS = (".safetensors", ".pt")
_UNITS = ("epoch", "step")


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with canonical names, detached."""
    state: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict().items():
        key = canonical_name(name)
        if key in state:
            raise MismatchError(f"two state_dict entries are named {key!r} once {list(WRAPPER_PREFIXES)} are removed")
        state[key] = t.detach()
    return state


class CheckpointSaver:
    """Save a module's ``state_dict`` every k epochs or steps, keeping the newest K files.

    Files are named ``<prefix>_<unit>_<n><format>`` (``ckpt_epoch_490.safetensors``): the
    number is not zero-padded, and ``polyak average`` orders members by the numbers in
    their names. Every file is written atomically (temporary file, fsync, rename) with the
    step, epoch and wall time in its metadata (safetensors ``__metadata__``; for ``.pt`` the
    file holds ``{"state_dict": ..., "polyak": {...}}``). With ``keep_last`` the oldest
    files are deleted only after the new one is safely on disk, so early stopping needs no
    epoch count known in advance. Which files are this saver's and which to delete is the
    policy shared with Keras' ``CheckpointCallback`` (:class:`polyak._retention.Retention`):
    files of earlier runs in the folder count (a restarted run still keeps the newest K),
    other files are never touched. Only rank 0 writes when ``torch.distributed`` runs.

    Args:
        directory: Folder for the checkpoints (created if missing).
        every: Save every ``every`` epochs (or steps).
        unit: ``"epoch"`` or ``"step"``: which counter decides and names the file.
        start: First epoch (step) to save; saves at ``start``, ``start + every``, ...
        keep_last: Keep only the newest this many files named like this saver's, earlier
            runs' included (None: keep all); the file just written is never deleted.
        format: ``".safetensors"`` (default) or ``".pt"``.
        prefix: File name prefix.

    Raises:
        ConfigError: An unknown ``unit`` or ``format``, a ``start`` below 0, an ``every``
            or ``keep_last`` below 1, or a ``prefix`` with a path separator.

    Example:
        >>> import torch, tempfile
        >>> from polyak.torch import CheckpointSaver
        >>> saver = CheckpointSaver(tempfile.mkdtemp(), start=2, keep_last=2)
        >>> m = torch.nn.Linear(2, 2)
        >>> [saver.maybe_save(m, epoch=e) is not None for e in range(5)]
        [False, False, True, True, True]
        >>> [p.name for p in saver.files()]
        ['ckpt_epoch_3.safetensors', 'ckpt_epoch_4.safetensors']
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every: int = 1,
        unit: str = "epoch",
        start: int = 0,
        keep_last: int | None = None,
        format: str = ".safetensors",
        prefix: str = "ckpt",
    ) -> None:
        if unit not in _UNITS:
            raise ConfigError(f"unit must be one of {list(_UNITS)}, got {unit!r}")
        fmt = format if format.startswith(".") else "." + format
        if fmt not in _FORMATS:
            raise ConfigError(f"format must be one of {list(_FORMATS)}, got {format!r}")
        self._retention = Retention(prefix, fmt, unit=unit, start=start, every=every, keep_last=keep_last)
        self.directory = Path(directory)
        self.every, self.unit, self.start, self.keep_last = every, unit, start, keep_last
        self.format, self.prefix = fmt, prefix
        if is_writer_rank():
            self.directory.mkdir(parents=True, exist_ok=True)
            cleanup_stale_temps(self.directory)

    def path_for(self, number: int) -> Path:
        """The file name used for epoch (step) ``number``."""
        return self.directory / self._retention.name_for(number)

    def _number(self, step: int | None, epoch: int | None) -> int:
        value = epoch if self.unit == "epoch" else step
        if value is None:
            raise ConfigError(f"this saver counts {self.unit}s: pass {self.unit}=")
        return whole_number(value, self.unit, 0)

    def due(self, *, step: int | None = None, epoch: int | None = None) -> bool:
        """Whether :meth:`maybe_save` would save at this step/epoch."""
        return self._retention.due(self._number(step, epoch))

    def maybe_save(self, module: torch.nn.Module, *, step: int | None = None, epoch: int | None = None) -> Path | None:
        """Save if this epoch (step) is due; returns the path written, else ``None``."""
        if not self.due(step=step, epoch=epoch):
            return None
        return self.save(module, step=step, epoch=epoch)

    def save(self, module: torch.nn.Module, *, step: int | None = None, epoch: int | None = None) -> Path | None:
        """Save now (replacing a file of the same number); ``None`` on ranks other than 0."""
        target = self.path_for(self._number(step, epoch))
        if not is_writer_rank():
            return None
        record: dict[str, Any] = {
            "step": step,
            "epoch": epoch,
            "wall_time": time.time(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        state = _cpu_state(module)
        if self.format == ".pt":
            self._write_pt(target, state, record)
        else:
            meta = {k: json.dumps(v) for k, v in record.items() if k != "created"}
            meta.update(created=record["created"], format="pt")
            arrays = {k: tensor_to_numpy(t) for k, t in state.items()}
            infos = [TensorInfo(k, tuple(a.shape), a.dtype) for k, a in arrays.items()]
            writer = open_writer(target, infos, format="safetensors", metadata=meta)
            with writer:
                for name in writer.order:
                    writer.write(name, arrays[name])
                writer.commit()
        self._prune(target)
        return target

    @staticmethod
    def _write_pt(target: Path, state: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
        cpu = {}
        for k, t in state.items():
            t = t.cpu()
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a view would drag its whole storage into the file
            cpu[k] = t
        f = AtomicFile(target)
        try:
            torch.save({"state_dict": cpu, "polyak": record}, f.file)
        except (OSError, RuntimeError) as exc:
            raise f.fail(exc) from exc  # the real cause (e.g. no space left), not torch's
        except BaseException:
            f.abort()
            raise
        f.commit()

    def files(self) -> list[Path]:
        """This saver's checkpoints on disk (also those of earlier runs), oldest first."""
        return self._retention.files(self.directory)

    def _prune(self, written: Path) -> None:
        self._retention.prune(self.directory, keep=written)
