"""Online weight averagers for PyTorch: :class:`EMA` and :class:`SWA` (one interface)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch

from .._errors import ConfigError
from .._online import EMAWeights, SWAWeights, weights_from_config
from .._schedules import DecaySchedule, make_schedule
from ._averagers import _Averager

__all__ = ["EMA", "SWA"]


class EMA(_Averager):
    """Exponential moving average of a module's weights, updated after optimizer steps.

    ``avg ← d·avg + (1 − d)·current`` with the decay ``d`` of a schedule (constant,
    timm-style warmup, TF warmup, a half-life, or a power-function EMA of relative width
    ``sigma_rel``); the first averaged update copies. With
    ``decay=`` alone it matches ``AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(d),
    use_buffers=True)`` step for step. Floating buffers (BatchNorm statistics) are averaged
    unless ``include_buffers=False`` (then copied); integer buffers are copied.

    Args:
        module: The model to follow (a DDP/compiled wrapper works too).
        decay: The decay once warm, in ``[0, 1)``. Give this, ``half_life`` or ``sigma_rel``.
        half_life: Steps after which an update's weight has halved.
        sigma_rel: A power-function EMA (Karras et al. 2024): the ``t``-th averaged
            update has decay ``(1 − 1/t)^(γ+1)``, so the average always spans
            ``sigma_rel`` of the run so far (0.05, 0.10 in EDM2); see
            :class:`PostHocEMA` to choose the width after training.
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

    Raises:
        ConfigError: Not exactly one of ``decay``, ``half_life``, ``sigma_rel`` and
            ``schedule``, a value out of range (see :func:`polyak.make_schedule`), a
            ``warmup`` with ``sigma_rel``, an ``every`` that differs from the schedule's,
            a ``module`` that is not a ``torch.nn.Module``, or a ``dtype`` that is not
            floating.
        MismatchError: Two of the module's tensors have the same name once the wrapper
            prefixes (``module.``, ``_orig_mod.``) are removed.

    Example:
        >>> import torch
        >>> from polyak.torch import EMA
        >>> model = torch.nn.Linear(4, 2)
        >>> ema = EMA(model, decay=0.999)
        >>> ema.update()  # after optimizer.step()
        >>> round(ema.half_life)
        693
        >>> EMA(model, sigma_rel=0.1).describe()
        'power EMA, sigma_rel 0.1 (gamma 6.937): weights ∝ τ^gamma over the run so far; 0 updates, step 0'
    """

    kind = "ema"

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        decay: float | None = None,
        half_life: float | None = None,
        sigma_rel: float | None = None,
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
            if decay is not None or half_life is not None or sigma_rel is not None or warmup is not None:
                raise ConfigError("give either schedule= or decay=/half_life=/sigma_rel=/warmup=, not both")
            if every is not None and every != schedule.every:
                raise ConfigError(f"every={every} differs from the schedule's every={schedule.every}")
        else:
            schedule = make_schedule(decay, half_life=half_life, sigma_rel=sigma_rel, warmup=warmup,
                                     min_decay=min_decay, warmup_gamma=warmup_gamma, warmup_power=warmup_power,
                                     every=1 if every is None else every)
        super().__init__(module, weights=EMAWeights(schedule), start=start, every=schedule.every,
                         include_buffers=include_buffers, dtype=dtype, device=device)

    @classmethod
    def options(cls, **options: Any) -> dict[str, Any]:
        """Check the options now; returns the keywords of ``EMA(module, **options)`` for later.

        Takes the constructor's keyword options (``decay``, ``half_life``, ``warmup``, ...,
        ``schedule``). For callbacks that create their average when training starts (once
        the model is on its device), such as ``polyak.lightning.EMACallback``: a bad option
        is refused when the callback is built, not minutes into a run.

        Raises:
            ConfigError: As the constructor would.

        Example:
            >>> import torch
            >>> from polyak.torch import EMA
            >>> opts = EMA.options(half_life=10)
            >>> round(EMA(torch.nn.Linear(2, 1), **opts).half_life, 6)
            10.0
        """
        probe = cls(torch.nn.Module(), **options)  # an empty module: nothing to copy, every option checked
        return {"schedule": probe.schedule, "start": probe.start, "include_buffers": probe.include_buffers,
                "dtype": probe.dtype, "device": probe.device}

    @property
    def schedule(self) -> DecaySchedule:
        """The decay schedule (:func:`polyak.make_schedule`)."""
        return cast(EMAWeights, self._core.weights).schedule

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

    @classmethod
    def _from_config(cls, module: torch.nn.Module, config: Mapping[str, Any], *,
                     device: torch.device | str | None) -> EMA:
        schedule = cast(EMAWeights, weights_from_config(cls.kind, config)).schedule
        return cls(module, schedule=schedule, start=int(config.get("start", 0)),
                   include_buffers=bool(config.get("include_buffers", True)), device=device)


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

    Raises:
        ConfigError: An unknown ``weighting``, a ``start`` below 0 or an ``every`` below 1,
            a ``module`` that is not a ``torch.nn.Module``, or a ``dtype`` that is not
            floating.
        MismatchError: Two of the module's tensors have the same name once the wrapper
            prefixes are removed.

    Example:
        >>> import torch
        >>> from polyak.torch import SWA
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> swa = SWA(model, start=2, weighting="equal")
        >>> with torch.no_grad():
        ...     for step in range(1, 6):  # the weight is the step number
        ...         _ = model.weight.fill_(step)
        ...         swa.update()
        >>> swa.state.tensors["weight"].item()  # steps 2..5 averaged: (2 + 3 + 4 + 5) / 4
        3.5
        >>> swa.copy_to(model); model.weight.item()
        3.5

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
        super().__init__(module, weights=SWAWeights(weighting), start=start, every=every,
                         include_buffers=include_buffers, dtype=dtype, device=device)

    @property
    def weighting(self) -> str:
        """``"equal"`` or ``"linear"``."""
        return cast(SWAWeights, self._core.weights).weighting

    def describe(self) -> str:
        """One line for logs."""
        return f"{self.weighting} SWA from step {self.start} every {self.every}; {self.state.count} updates"

    @classmethod
    def _from_config(cls, module: torch.nn.Module, config: Mapping[str, Any], *,
                     device: torch.device | str | None) -> SWA:
        return cls(module, start=int(config.get("start", 0)), every=int(config.get("every", 1)),
                   weighting=str(config.get("weighting", "equal")),
                   include_buffers=bool(config.get("include_buffers", True)), device=device)
