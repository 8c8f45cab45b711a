"""The machinery shared by the online averagers (:class:`~polyak.torch.EMA`, ``SWA``).

State is plain data (:class:`AveragerState`: step, count, averaged tensors); the averager
objects hold it together with their settings and the module they follow. Subclasses only
say how much weight an update gets (``_weight``) and which settings they save.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from .._errors import ConfigError, FormatError
from .._layout import compare_layouts
from ._common import (
    META_KEY,
    Slot,
    is_averaged,
    is_writer_rank,
    local_tensor,
    named_slots,
    named_tensors,
)
from ._plan import UpdatePlan, build_plan

__all__ = ["AveragerState", "read_averager_file"]

#: Key of the averager record in a saved file's safetensors metadata.
_LOW_PRECISION = (torch.bfloat16, torch.float16)
A = TypeVar("A", bound="_Averager")


@dataclass
class AveragerState:
    """The state of an online averager (plain data).

    Attributes:
        step: Training steps seen (``update()`` calls, or the last ``step=`` given).
        count: Averaging updates applied since ``start`` (0: nothing averaged yet).
        tensors: Canonical name → stored tensor: the average of floating tensors (in the
            accumulator dtype) and a copy of integer/bool ones.
    """

    step: int = 0
    count: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def _whole(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be a whole number ≥ {minimum}, got {value!r}")
    return value


class _Averager:
    """Shared machinery of :class:`EMA` and :class:`SWA`."""

    kind: ClassVar[str] = "?"

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        start: int,
        every: int,
        include_buffers: bool,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"expected a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.start = _whole(start, "start", 0)
        self.every = _whole(every, "every", 1)
        self.include_buffers = bool(include_buffers)
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            raise ConfigError(f"dtype must be a floating dtype such as torch.float32, got {dtype}")
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self._params: set[str] = set()
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, t, is_param in named_tensors(module):
                if is_param:
                    self._params.add(name)
                dev = self.device or t.device
                target = self._target_dtype(t) if self._averages(name, t) else t.dtype
                tensors[name] = t.detach().to(device=dev, dtype=target, copy=True)
        self.state = AveragerState(tensors=tensors)
        self._plan: UpdatePlan | None = None
        self._slots: tuple[weakref.ref[torch.nn.Module], list[Slot]] | None = None

    # -- what is averaged --------------------------------------------------------------
    def _averages(self, name: str, t: torch.Tensor) -> bool:
        return is_averaged(t) and (name in self._params or self.include_buffers)

    def _target_dtype(self, t: torch.Tensor) -> torch.dtype:
        if t.is_complex():
            return t.dtype
        if self.dtype is not None:
            return self.dtype
        return torch.float32 if t.dtype in _LOW_PRECISION else t.dtype

    def _weight(self, count: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        return {"start": self.start, "every": self.every, "include_buffers": self.include_buffers}

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

    @torch.no_grad()
    def update(self, module: torch.nn.Module | None = None, *, step: int | None = None) -> None:
        """Fold the module's current weights into the average; call after each optimizer step.

        Args:
            module: The module to read (default: the one given at construction). Wrapped
                modules (DDP ``module.``, ``torch.compile`` ``_orig_mod.``) match by name.
            step: The training step just completed (default: one more than the last).
                Before ``start`` the average follows the weights (copy); from ``start`` on,
                every ``every``-th step is averaged and the first such update copies.
        """
        st = self.state
        now = st.step + 1 if step is None else _whole(step, "step", 0)
        averaging = now >= self.start
        if averaging and (now - self.start) % self.every != 0:
            st.step = now
            return
        # Before start the average follows the weights (weight 1 copies exactly).
        weight = self._weight(st.count) if averaging else 1.0
        current = self._current(module)
        plan = self._plan
        if plan is None or not plan.fits(current):
            stored = list(st.tensors.values())
            flags = [self._averages(n, t) for n, t in st.tensors.items()]
            plan = self._plan = build_plan(current, stored, flags)
        plan.apply(weight)
        st.step = now
        st.count += averaging

    # -- using the average ---------------------------------------------------------------
    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module | None = None) -> None:
        """Write the average into ``module`` (default: the followed one), in its dtypes."""
        for dst, src in zip(self._current(module), self.state.tensors.values(), strict=True):
            dst.copy_(src)

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
        with torch.no_grad():
            backup = [t.detach().clone() for t in current]
            for dst, src in zip(current, self.state.tensors.values(), strict=True):
                dst.copy_(src)
        try:
            yield target
        finally:
            with torch.no_grad():
                for dst, raw in zip(current, backup, strict=True):
                    dst.copy_(raw)

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"kind", "step", "count", "config", "tensors"}``; tensors are not copied."""
        return {
            "kind": self.kind,
            "step": self.state.step,
            "count": self.state.count,
            "config": self._config(),
            "tensors": dict(self.state.tensors),
        }

    def _load_config(self, config: Mapping[str, Any]) -> None:
        self.start = _whole(config.get("start", self.start), "start", 0)
        self.every = _whole(config.get("every", self.every), "every", 1)
        self.include_buffers = bool(config.get("include_buffers", self.include_buffers))

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any] | str | os.PathLike[str]) -> None:
        """Restore a :meth:`state_dict` (or a file written by :meth:`save`) exactly.

        Settings (schedule, start, every) come from the state, so a resumed run continues
        where it stopped. An average is never downcast: a float32 average loaded into an
        averager that would keep bfloat16 stays float32.

        Raises:
            ConfigError: The state belongs to another kind of averager.
            MismatchError: Tensor names or shapes differ (all differences listed).
        """
        if isinstance(state, (str, os.PathLike)):
            state = read_averager_file(state)
        kind = state.get("kind")
        if kind != self.kind:
            raise ConfigError(f"this state is from a {kind!r} averager, not {self.kind!r}; load it with that class")
        tensors = state["tensors"]
        ours = self.state.tensors
        # Dtypes may differ: a saved average is cast into ours, or kept when it is wider (below).
        compare_layouts(ours, tensors, ("this averager", "the saved state"), dtypes=False).raise_if_any(
            "the saved averaged tensors do not match this averager's", fix="load the state of an averager of the same model")
        self._load_config(state.get("config", {}))
        for name, mine in list(ours.items()):
            saved = tensors[name]
            wider = (saved.dtype != mine.dtype and is_averaged(saved) and is_averaged(mine)
                     and saved.dtype.itemsize > mine.dtype.itemsize)
            if wider:  # never downcast a saved average: keep its precision
                ours[name] = saved.detach().to(device=mine.device, copy=True)
            else:
                mine.copy_(saved)
        self.state.step = _whole(int(state.get("step", 0)), "step", 0)
        self.state.count = _whole(int(state.get("count", 0)), "count", 0)
        self._plan = None

    def save(self, path: str | os.PathLike[str]) -> Path | None:
        """Write the average to a standalone safetensors file, settings in its metadata.

        The file can be inspected and averaged with the CLI (``polyak inspect``,
        ``polyak average``) and restored with :meth:`load` or :meth:`load_state_dict`.
        Written atomically, on rank 0 only (returns ``None`` on other ranks).
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
        record = {"kind": self.kind, "step": self.state.step, "count": self.state.count, "config": self._config()}
        meta = {META_KEY: json.dumps(record), "format": "pt"}
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
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}: corrupt {META_KEY!r} metadata ({exc})") from None
        record["tensors"] = {name: numpy_to_tensor(src.read(name)) for name in src.infos()}
    finally:
        src.close()
    return dict(record)
