"""The torch shell of the online averagers (:class:`~polyak.torch.EMA`, ``SWA``).

What an update does, with which weight and when, and the saved layout live in the
framework-free core (:mod:`polyak._online`); the tensor work in its torch kernels
(:class:`polyak._online_torch.TorchOps`). This shell binds them to a module: it finds the
module's tensors by canonical name (wrapper prefixes ignored, slots cached), decides which
are averaged (floating parameters; floating buffers unless ``include_buffers=False``),
and saves/loads files. Subclasses only choose the weights and which settings they save.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from .._errors import ConfigError, FormatError
from .._json import json_object
from .._layout import compare_layouts
from .._online import (
    AveragerState,
    Cadence,
    OnlineAverage,
    Weights,
    check_saved_tensors,
    read_record,
)
from .._online_torch import TorchOps
from ._common import (
    META_KEY,
    Slot,
    is_averaged,
    is_writer_rank,
    local_tensor,
    named_slots,
    named_tensors,
)

__all__ = ["AveragerState", "read_averager_file"]

A = TypeVar("A", bound="_Averager")


class _Averager:
    """Shared machinery of :class:`EMA` and :class:`SWA`."""

    kind: ClassVar[str] = "?"
    """The averager's kind (``"ema"``, ``"swa"``), saved as ``state_dict()["kind"]``."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        weights: Weights,
        start: int,
        every: int,
        include_buffers: bool,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"expected a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.include_buffers = bool(include_buffers)
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            raise ConfigError(f"dtype must be a floating dtype such as torch.float32, got {dtype}")
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self._core: OnlineAverage[torch.Tensor, torch.Tensor] = OnlineAverage(
            weights, Cadence(start, every), TorchOps(dtype=dtype, device=self.device))
        self._params: set[str] = set()
        names, live = [], []
        for name, t, is_param in named_tensors(module):
            if is_param:
                self._params.add(name)
            names.append(name)
            live.append(t)
        self._core.reset(names, live, [self._averages(n, t) for n, t in zip(names, live, strict=True)])
        self._slots: tuple[weakref.ref[torch.nn.Module], list[Slot]] | None = None

    # -- settings and state (held by the core) -------------------------------------------
    @property
    def state(self) -> AveragerState[torch.Tensor]:
        """The plain-data state: ``step``, ``count`` and the averaged ``tensors``."""
        return self._core.state

    @property
    def start(self) -> int:
        """First averaged step; before it the average copies the weights."""
        return int(self._core.cadence.start or 0)

    @property
    def every(self) -> int:
        """Steps between averaged updates."""
        return self._core.cadence.every

    # -- what is averaged --------------------------------------------------------------
    def _averages(self, name: str, t: torch.Tensor) -> bool:
        return is_averaged(t) and (name in self._params or self.include_buffers)

    def _config(self) -> dict[str, Any]:
        return self._core.config(include_buffers=self.include_buffers)

    # -- updating ------------------------------------------------------------------------
    def _current(self, module: torch.nn.Module | None) -> list[torch.Tensor]:
        """The live tensors of ``module``, in the order of ``state.tensors``."""
        target = module if module is not None else self.module
        cached = self._slots
        if cached is not None and cached[0]() is target:
            try:
                current = [local_tensor(container[key]) for container, key in cached[1]]
            except KeyError:
                current = []
            if len(current) == len(cached[1]) and all(t is not None for t in current):
                return current
        # Walk the module once; later steps re-read the same slots (a few µs per tensor).
        found = {name: slot for name, slot, _ in named_slots(target)}
        names = self.state.tensors
        live = {name: local_tensor(container[key]) for name, (container, key) in found.items()}
        # Names and shapes must match; dtypes need not (a bf16 module feeds a float32 average).
        compare_layouts(names, live, ("the average", "the module"), dtypes=False).raise_if_any(
            "the module's tensors do not match the averaged ones",
            fix="average the same architecture (wrapper prefixes module./_orig_mod. are ignored)")
        slots = [found[n] for n in names]
        self._slots = (weakref.ref(target), slots)
        return [local_tensor(container[key]) for container, key in slots]

    def update(self, module: torch.nn.Module | None = None, *, step: int | None = None) -> None:
        """Fold the module's current weights into the average; call after each optimizer step.

        Args:
            module: The module to read (default: the one given at construction). Wrapped
                modules (DDP ``module.``, ``torch.compile`` ``_orig_mod.``) match by name.
            step: The training step just completed (default: one more than the last).
                Before ``start`` the average follows the weights (copy); from ``start`` on,
                the steps ``start``, ``start + every``, ... are averaged and the first such
                update copies. A ``step=`` that jumps over some of those steps stands in
                for all of them (weighing as that many updates: decays stay in steps).
        """
        self._core.update(lambda: self._current(module), step=step)

    # -- using the average ---------------------------------------------------------------
    def copy_to(self, module: torch.nn.Module | None = None) -> None:
        """Write the average into ``module`` (default: the followed one), in its dtypes."""
        self._core.ops.assign(self._current(module), self._core.averages())

    @contextlib.contextmanager
    def average_parameters(self, module: torch.nn.Module | None = None) -> Iterator[torch.nn.Module]:
        """Swap the average into ``module`` for the block; the raw weights come back on exit.

        The tensors are overwritten in place (the same ``Parameter`` objects), so optimizers
        stay valid. The raw weights are restored also when the block raises.

        Example:
            >>> import torch
            >>> from polyak.torch import EMA
            >>> m = torch.nn.Linear(2, 1)
            >>> ema = EMA(m, decay=0.9)
            >>> with ema.average_parameters():
            ...     pass
        """
        target = module if module is not None else self.module
        current = self._current(target)
        ops = self._core.ops
        backup = ops.backup(current)
        ops.assign(current, self._core.averages())
        try:
            yield target
        finally:
            ops.assign(current, backup)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"kind", "step", "count", "config", "tensors"}``; tensors are not copied.

        The layout of :mod:`polyak._online`, shared with ``polyak.keras.EMACallback``:
        ``config`` holds ``start``, ``every``, the ``schedule`` (EMA) or ``weighting``
        (SWA) and ``include_buffers``.
        """
        return self._core.record(self._config(), self.state.tensors)

    def _load_config(self, config: Mapping[str, Any]) -> None:
        self._core.configure(config)
        self.include_buffers = bool(config.get("include_buffers", self.include_buffers))

    def load_state_dict(self, state: Mapping[str, Any] | str | os.PathLike[str]) -> None:
        """Restore a :meth:`state_dict` (or a file written by :meth:`save`) exactly.

        Settings (schedule, start, every) come from the state, so a resumed run continues
        where it stopped. An average is never downcast: a float32 average loaded into an
        averager that would keep bfloat16 stays float32.

        Raises:
            ConfigError: The state belongs to another kind of averager.
            FormatError: A file not written by :meth:`save`, or a state without tensors.
            MismatchError: Tensor names or shapes differ (all differences listed).
        """
        if isinstance(state, (str, os.PathLike)):
            state = read_averager_file(state)
        record = read_record(state, kind=self.kind)
        if "tensors" not in record:
            raise FormatError(f"the saved {self.kind} state has no 'tensors'; save it with state_dict() or save()")
        tensors = record["tensors"]
        ours = self.state.tensors
        check_saved_tensors(ours, tensors, what="the saved averaged tensors do not match this averager's",
                            fix="load the state of an averager of the same model")
        self._load_config(record["config"])
        with torch.no_grad():
            for name, mine in list(ours.items()):
                saved = tensors[name]
                wider = (saved.dtype != mine.dtype and is_averaged(saved) and is_averaged(mine)
                         and saved.dtype.itemsize > mine.dtype.itemsize)
                if wider:  # never downcast a saved average: keep its precision
                    ours[name] = saved.detach().to(device=mine.device, copy=True)
                else:
                    mine.copy_(saved)
        self.state.step, self.state.count = record["step"], record["count"]
        self._core.set_tensors(ours, [self._averages(n, t) for n, t in ours.items()])

    def save(self, path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None) -> Path | None:
        """Write the average to a standalone safetensors file, settings in its metadata.

        The file can be inspected and averaged with the CLI (``polyak inspect``,
        ``polyak average``) and restored with :meth:`load` or :meth:`load_state_dict`.
        Written atomically, on rank 0 only (returns ``None`` on other ranks).

        Args:
            path: A ``.safetensors`` file (replaced if it exists).
            metadata: More string entries for the file's metadata (the averager's own
                record and ``format`` win over entries of the same name).

        Returns:
            ``path`` on rank 0, ``None`` on other ranks.

        Raises:
            ConfigError: ``path`` does not end in ``.safetensors``, or the averager follows
                a sharded (FSDP2) module, whose full average :func:`polyak.torch.export`
                writes.
            OutputError: The file cannot be written.
        """
        from .._engine.inspect import save as save_state

        out = Path(path)
        if out.suffix != ".safetensors":
            raise ConfigError(f"averagers are saved as .safetensors files, got {out}; for torch.save use state_dict()")
        from ._dist import is_sharded

        if is_sharded(self.module):  # rank 0 holds only its shards: the file would be wrong
            raise ConfigError(
                "this averager follows a sharded (FSDP2/DTensor) module and holds only this rank's shards; "
                "use polyak.torch.export(averager, path) for the full model or save_sharded(averager, folder)"
            )
        if not is_writer_rank():
            return None
        record = self._core.record(self._config())
        meta = {**(metadata or {}), META_KEY: json.dumps(record), "format": "pt"}
        save_state(dict(self.state.tensors), out, metadata=meta, force=True)
        return out

    @classmethod
    def load(cls: type[A], path: str | os.PathLike[str], module: torch.nn.Module, *,
             device: torch.device | str | None = None) -> A:
        """Rebuild an averager saved with :meth:`save` for ``module``."""
        state = read_averager_file(path)
        obj = cls._from_config(module, state.get("config", {}), device=device)
        obj.load_state_dict(state)
        return obj

    @classmethod
    def _from_config(cls: type[A], module: torch.nn.Module, config: Mapping[str, Any], *,
                     device: torch.device | str | None) -> A:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(step={self.state.step}, count={self.state.count}, tensors={len(self.state.tensors)})"


def read_averager_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The :meth:`~_Averager.state_dict` stored in a file written by ``save``."""
    from ..formats import open_source
    from ..formats.torch_pt import numpy_to_tensor

    src = open_source(path)
    try:
        raw = src.metadata().get(META_KEY)
        if raw is None:
            raise FormatError(f"{path}: no {META_KEY!r} record in the metadata; it was not written by EMA/SWA.save()")
        record = json_object(raw, str(path), f"{META_KEY!r} metadata")
        record["tensors"] = {name: numpy_to_tensor(src.read(name)) for name in src.infos()}
    finally:
        src.close()
    return dict(record)
