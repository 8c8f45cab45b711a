"""Online weight averagers for PyTorch: :class:`EMA` and :class:`SWA` (one interface).

State is plain data (:class:`AveragerState`: step, count, averaged tensors); the averager
objects hold it together with their settings and the module they follow.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from ._errors import ConfigError, FormatError, MismatchError
from ._schedules import DecaySchedule, make_schedule
from ._torch_common import is_averaged, is_writer_rank, match_names, named_tensors
from ._torch_plan import UpdatePlan, build_plan, signature

__all__ = ["EMA", "SWA", "AveragerState"]

#: Key of the averager record in a saved file's safetensors metadata.
META_KEY = "polyak_averager"
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
        live = {name: t for name, t, _ in named_tensors(module if module is not None else self.module)}
        names = self.state.tensors
        if len(live) != len(names) or any(n not in live for n in names):
            match_names(names, live, what="the module's tensors and the averaged ones", where="the module",
                        fix="average the same architecture (wrapper prefixes module./_orig_mod. are ignored)")
        return [live[n] for n in names]

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
        if plan is None or plan.signature != signature(current):
            stored = list(st.tensors.values())
            flags = [self._averages(n, t) for n, t in st.tensors.items()]
            plan = self._plan = build_plan(current, stored, flags)
        plan.apply(current, weight)
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
        match_names(ours, tensors, what="the saved averaged tensors and this averager's", where="the saved state",
                    fix="load the state of an averager of the same model")
        bad = [f"{n!r}: saved {tuple(tensors[n].shape)}, model {tuple(t.shape)}"
               for n, t in ours.items() if tuple(tensors[n].shape) != tuple(t.shape)]
        if bad:
            raise MismatchError(f"shape differences between the saved state and this averager: {'; '.join(bad)}")
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
        from ._inspect import save as save_state

        out = Path(path)
        if out.suffix != ".safetensors":
            raise ConfigError(f"averagers are saved as .safetensors files, got {out}; for torch.save use state_dict()")
        from ._torch_dist import is_sharded

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
    from .formats import open_source
    from .formats.torch_pt import numpy_to_tensor

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


class EMA(_Averager):
    """Exponential moving average of a module's weights, updated after optimizer steps.

    ``avg ← d·avg + (1 − d)·current`` with the decay ``d`` of a schedule (constant,
    timm-style warmup, TF warmup or a half-life); the first averaged update copies. With
    ``decay=`` alone it matches ``AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(d),
    use_buffers=True)`` step for step. Floating buffers (BatchNorm statistics) are averaged
    unless ``include_buffers=False`` (then copied); integer buffers are copied.

    Args:
        module: The model to follow (a DDP/compiled wrapper works too).
        decay: The decay once warm, in ``[0, 1)``. Give this or ``half_life``.
        half_life: Steps after which an update's weight has halved.
        warmup: ``None``, ``"timm"`` (``1 − (1 + n/γ)^(−p)`` clamped to
            ``[min_decay, decay]``) or ``"tf"`` (``min(decay, (1 + n)/(10 + n))``), where
            ``n`` counts earlier averaging updates.
        min_decay: Lower clamp of the timm warmup.
        warmup_gamma: ``γ`` of the timm warmup.
        warmup_power: ``p`` of the timm warmup.
        every: Average every ``every``-th step (default 1).
        start: First averaged step; before it the average copies the weights.
        include_buffers: Average floating buffers (True) or copy them (False).
        dtype: Accumulator dtype for floating tensors. Default: float32 for bfloat16 and
            float16 tensors (a bf16 average with decay 0.9999 would never move), else the
            tensor's own dtype.
        device: Keep the average on this device (e.g. ``"cpu"`` for a large GPU model).
        schedule: A ready :class:`polyak.DecaySchedule` instead of the decay options.

    Example:
        >>> import torch
        >>> from polyak.torch import EMA
        >>> model = torch.nn.Linear(4, 2)
        >>> ema = EMA(model, decay=0.999)
        >>> ema.update()  # after optimizer.step()
        >>> round(ema.half_life)
        693
    """

    kind = "ema"

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        decay: float | None = None,
        half_life: float | None = None,
        warmup: str | None = None,
        min_decay: float = 0.0,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2.0 / 3.0,
        every: int | None = None,
        start: int = 0,
        include_buffers: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        schedule: DecaySchedule | None = None,
    ) -> None:
        if schedule is not None:
            if decay is not None or half_life is not None or warmup is not None:
                raise ConfigError("give either schedule= or decay=/half_life=/warmup=, not both")
            if every is not None and every != schedule.every:
                raise ConfigError(f"every={every} differs from the schedule's every={schedule.every}")
            self.schedule = schedule
        else:
            self.schedule = make_schedule(decay, half_life=half_life, warmup=warmup, min_decay=min_decay,
                                          warmup_gamma=warmup_gamma, warmup_power=warmup_power,
                                          every=1 if every is None else every)
        super().__init__(module, start=start, every=self.schedule.every, include_buffers=include_buffers,
                         dtype=dtype, device=device)

    def _weight(self, count: int) -> float:
        return 1.0 - self.schedule(count)

    @property
    def decay(self) -> float:
        """The decay the next averaging update will use."""
        return self.schedule(self.state.count)

    @property
    def half_life(self) -> float:
        """Training steps after which an update's weight has halved, once warm."""
        return self.schedule.half_life

    @property
    def window(self) -> float:
        """Effective averaging window in training steps, ``every / (1 − decay)``."""
        return self.schedule.window

    def describe(self) -> str:
        """One line for logs: schedule, decay, half-life, window and progress."""
        return f"{self.schedule.describe()}; {self.state.count} updates, step {self.state.step}"

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "schedule": self.schedule.to_dict()}

    def _load_config(self, config: Mapping[str, Any]) -> None:
        super()._load_config(config)
        if "schedule" in config:
            self.schedule = DecaySchedule.from_dict(config["schedule"])
            self.every = self.schedule.every

    @classmethod
    def _from_config(cls, module: torch.nn.Module, config: Mapping[str, Any], *,
                     device: torch.device | str | None) -> EMA:
        if "schedule" not in config:
            raise FormatError("the saved EMA record has no schedule")
        return cls(module, schedule=DecaySchedule.from_dict(config["schedule"]), start=int(config.get("start", 0)),
                   include_buffers=bool(config.get("include_buffers", True)), device=device)


_WEIGHTINGS = ("equal", "linear")


class SWA(_Averager):
    """Cumulative (Polyak–Ruppert / SWA) average of every update from ``start`` on.

    ``weighting="equal"`` gives every averaged step the same weight (as
    ``AveragedModel``'s default); ``"linear"`` gives the k-th averaged step weight ``k``
    (newest heaviest, as the offline ``scheme="linear"``). Both are kept online in one
    buffer: the n-th update is ``avg ← lerp(avg, x_n, w_n / Σ_{k≤n} w_k)``, i.e. weight
    ``1/n`` (equal) or ``2/(n + 1)`` (linear), which is exactly ``Σ w_k·x_k / Σ w_k``.

    Args:
        module: The model to follow.
        start: First averaged step; before it the average copies the weights.
        every: Average every ``every``-th step.
        weighting: ``"equal"`` or ``"linear"``.
        include_buffers: Average floating buffers (True) or copy them (False).
        dtype: Accumulator dtype (default: float32 for bf16/fp16, else the tensor's).
        device: Keep the average on this device.

    References:
        Polyak & Juditsky (1992), Acceleration of stochastic approximation by averaging.
        Izmailov et al. (2018), Averaging weights leads to wider optima and better
        generalization (SWA).
    """

    kind = "swa"

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        start: int = 0,
        every: int = 1,
        weighting: str = "equal",
        include_buffers: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if weighting not in _WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {list(_WEIGHTINGS)}, got {weighting!r}")
        self.weighting = weighting
        super().__init__(module, start=start, every=every, include_buffers=include_buffers, dtype=dtype, device=device)

    def _weight(self, count: int) -> float:
        n = count + 1
        return 1.0 / n if self.weighting == "equal" else 2.0 / (n + 1)

    def describe(self) -> str:
        """One line for logs."""
        return f"{self.weighting} SWA from step {self.start} every {self.every}; {self.state.count} updates"

    def _config(self) -> dict[str, Any]:
        return {**super()._config(), "weighting": self.weighting}

    def _load_config(self, config: Mapping[str, Any]) -> None:
        super()._load_config(config)
        weighting = config.get("weighting", self.weighting)
        if weighting not in _WEIGHTINGS:
            raise ConfigError(f"saved SWA weighting {weighting!r} is not one of {list(_WEIGHTINGS)}")
        self.weighting = weighting

    @classmethod
    def _from_config(cls, module: torch.nn.Module, config: Mapping[str, Any], *,
                     device: torch.device | str | None) -> SWA:
        return cls(module, start=int(config.get("start", 0)), every=int(config.get("every", 1)),
                   weighting=str(config.get("weighting", "equal")),
                   include_buffers=bool(config.get("include_buffers", True)), device=device)
