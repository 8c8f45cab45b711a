"""EMA decay schedules: the decay used by each update of an exponential moving average.

An EMA update is ``average ← decay · average + (1 − decay) · current``. Every schedule
here counts ``n``, the number of updates already applied; the first update (``n = 0``)
always copies the current weights (decay 0), as ``torch.optim.swa_utils.AveragedModel``,
timm and Keras ``use_ema`` do.

================  =====================================================  ====================
name              decay of update n (n ≥ 1)                              reference
================  =====================================================  ====================
``constant``      ``decay``                                              AveragedModel EMA
``warmup``        ``clamp(1 − (1 + n/γ)^(−p), min_decay, decay)``        timm ``ModelEmaV3``
``tf_warmup``     ``min(decay, (1 + n) / (10 + n))``                     TF / torch-ema
``half_life``     ``0.5 ** (every / half_life_steps)``                   Composer ``EMA``
``power``         ``(1 − 1/(n+1))^(γ+1)``, γ from ``sigma_rel``          Karras et al. 2024
================  =====================================================  ====================

The ``power`` schedule is the power-function EMA of post-hoc EMA (EDM2): after ``t``
updates (``t = n + 1``) its weight over the past is ``∝ τ^γ`` on ``[0, t]``, a width that
grows with the run, ``σ_rel`` of its length (:mod:`polyak._posthoc`). Its first update
(``t = 1``) copies, like every schedule here.

The schedule is plain data (a frozen dataclass) so it can be saved with the averager's
state and resumed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from ._errors import ConfigError
from ._posthoc import check_sigma_rel, gamma_to_sigma_rel, sigma_rel_to_gamma

__all__ = ["SCHEDULES", "DecaySchedule", "make_schedule"]

SCHEDULES: dict[str, str] = {
    "constant": "the same decay for every update (after the first, which copies)",
    "warmup": "timm-style warmup 1 - (1 + n/gamma)^(-power), clamped to [min_decay, decay]",
    "tf_warmup": "TensorFlow/torch-ema warmup min(decay, (1 + n) / (10 + n))",
    "half_life": "constant decay 0.5 ** (every / half_life_steps): weights halve every half-life",
    "power": "power-function EMA (1 - 1/t)^(gamma + 1), t = updates so far: a width of sigma_rel of the run",
}


@dataclass(frozen=True)
class DecaySchedule:
    """A named EMA decay schedule (plain data): the decay of each update, saved with an averager's state.

    Build one with :func:`polyak.make_schedule` (or directly: every field is checked either
    way); call it with the number of updates already applied to get the next update's decay. The EMA averagers
    (``polyak.torch.EMA``, ``polyak.keras.EMACallback``) take one as ``schedule=``.

    Attributes:
        name: One of ``constant``, ``warmup``, ``tf_warmup``, ``half_life``, ``power``.
        decay: The decay once warm (the maximum for warmup schedules), in ``[0, 1)``;
            0 for ``power``, whose decay never stops growing.
        min_decay: Lower clamp of the ``warmup`` schedule.
        warmup_gamma: ``γ`` of the ``warmup`` schedule (timm's ``warmup_gamma``).
        warmup_power: ``p`` of the ``warmup`` schedule (timm's ``warmup_power``).
        half_life_steps: For ``half_life``: training steps after which an update's weight
            has halved.
        every: Training steps between two updates (used to express half-lives in steps).
        sigma_rel: For ``power``: the width of the averaging profile relative to the
            number of updates so far (0.05 and 0.10 in EDM2).
        gamma: For ``power``: the exponent ``γ`` that ``sigma_rel`` implies.

    Raises:
        ConfigError: A field out of range or missing for its schedule (when it is built).

    Example:
        >>> import polyak
        >>> s = polyak.make_schedule(half_life=100)
        >>> s.name, round(s.decay, 6), round(s.window, 1), s(0), s(5) == s.decay
        ('half_life', 0.993092, 144.8, 0.0, True)
        >>> polyak.DecaySchedule.from_dict(s.to_dict()) == s  # as saved in a state file
        True
        >>> w = polyak.make_schedule(0.999, warmup="timm")
        >>> [round(w(n), 4) for n in (0, 1, 10, 100_000)]  # the decay grows to 0.999
        [0.0, 0.37, 0.7978, 0.999]
    """

    name: str
    decay: float
    min_decay: float = 0.0
    warmup_gamma: float = 1.0
    warmup_power: float = 2.0 / 3.0
    half_life_steps: float | None = None
    every: int = 1
    sigma_rel: float | None = None
    gamma: float | None = None

    def __post_init__(self) -> None:
        _validate(self)

    def __call__(self, n: int) -> float:
        """The decay of the update that follows ``n`` earlier updates (0 for the first)."""
        if n <= 0:
            return 0.0
        if self.name == "power":
            # β_t = (1 − 1/t)^(γ+1) with t = n + 1: the (n+1)-th update.
            return float((n / (n + 1.0)) ** (self.gamma + 1.0))  # type: ignore[operator]  # set for power
        if self.name == "warmup":
            d = 1.0 - (1.0 + n / self.warmup_gamma) ** (-self.warmup_power)
            return min(max(d, self.min_decay), self.decay)
        if self.name == "tf_warmup":
            return min(self.decay, (1.0 + n) / (10.0 + n))
        return self.decay

    @property
    def half_life(self) -> float:
        """Training steps after which an update's weight has halved, once warm (NaN for
        ``power``: its half-life grows with the run)."""
        if self.name == "power":
            return math.nan
        if self.decay <= 0:
            return 0.0
        return self.every * math.log(2.0) / -math.log(self.decay)

    @property
    def window(self) -> float:
        """Effective averaging window in training steps, ``every / (1 − decay)`` (NaN for
        ``power``: its window is ``sigma_rel`` of the run so far)."""
        if self.name == "power":
            return math.nan
        return self.every / (1.0 - self.decay)

    def describe(self) -> str:
        """One line for logs: schedule, decay, half-life and effective window."""
        if self.name == "power":
            return (f"power EMA, sigma_rel {self.sigma_rel:.4g} (gamma {self.gamma:.4g}): weights ∝ τ^gamma "
                    "over the run so far")
        return (
            f"{self.name} EMA, decay {self.decay:.6g}, half-life {self.half_life:.4g} steps, "
            f"window ≈ {self.window:.4g} steps"
        )

    def to_dict(self) -> dict[str, Any]:
        """The schedule as a JSON-able dict (for state files and metadata)."""
        data = asdict(self)
        if self.name != "power":  # the layout of schedules saved before ``power`` existed
            del data["sigma_rel"], data["gamma"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DecaySchedule:
        """Rebuild a schedule saved with :meth:`to_dict`, validated as :func:`make_schedule` does.

        Raises:
            ConfigError: An unknown field or schedule name, or a value out of range.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown decay-schedule fields {sorted(unknown)} in saved state")
        missing = {"name", "decay"} - set(data)
        if missing:
            raise ConfigError(f"the saved decay schedule has no {' and no '.join(sorted(missing))}")
        return cls(**data)


def _validate(s: DecaySchedule) -> None:
    """Every check of a schedule's fields, run when one is built (also from a saved state)."""
    if s.name not in SCHEDULES:
        raise ConfigError(f"unknown decay schedule {s.name!r}; valid schedules: {sorted(SCHEDULES)}")
    if not (0.0 <= s.decay < 1.0) or not math.isfinite(s.decay):
        raise ConfigError(f"decay must be in [0, 1), got {s.decay!r}")
    if not (0.0 <= s.min_decay <= s.decay):
        raise ConfigError(f"min_decay must be in [0, decay={s.decay}], got {s.min_decay!r}")
    if s.warmup_gamma <= 0 or s.warmup_power <= 0:
        raise ConfigError(
            f"warmup_gamma and warmup_power must be > 0, got {s.warmup_gamma!r}, {s.warmup_power!r}"
        )
    if isinstance(s.every, bool) or not isinstance(s.every, int) or s.every < 1:
        raise ConfigError(f"every must be a whole number of steps ≥ 1, got {s.every!r}")
    if s.name == "power":
        if s.sigma_rel is None or s.gamma is None:
            raise ConfigError("a power schedule needs sigma_rel (and the gamma it implies)")
        check_sigma_rel(s.sigma_rel)
        if not math.isclose(gamma_to_sigma_rel(s.gamma), s.sigma_rel, rel_tol=1e-9):
            raise ConfigError(f"gamma={s.gamma!r} does not give sigma_rel={s.sigma_rel!r}; "
                              f"it gives {gamma_to_sigma_rel(s.gamma):.6g}")
    elif s.sigma_rel is not None or s.gamma is not None:
        raise ConfigError(f"sigma_rel and gamma belong to the power schedule, not to {s.name!r}")


_WARMUPS: dict[str | None, str] = {None: "constant", "timm": "warmup", "tf": "tf_warmup"}


def make_schedule(
    decay: float | None = None,
    *,
    half_life: float | None = None,
    warmup: str | None = None,
    min_decay: float = 0.0,
    warmup_gamma: float = 1.0,
    warmup_power: float = 2.0 / 3.0,
    every: int = 1,
    sigma_rel: float | None = None,
) -> DecaySchedule:
    """Build a validated decay schedule from user-facing options.

    Args:
        decay: The decay once warm, in ``[0, 1)``. Give this, ``half_life`` or ``sigma_rel``.
        half_life: Training steps after which an update's weight has halved; the decay per
            update is ``0.5 ** (every / half_life)``.
        sigma_rel: A power-function EMA (post-hoc EMA's profiles, Karras et al. 2024) of
            this relative width, in ``(0, 0.2887]``: the ``t``-th update (``t = 1`` copies)
            has decay ``(1 − 1/t)^(γ+1)``, γ from ``sigma_rel`` (0.05: γ ≈ 16.97, 0.10:
            γ ≈ 6.94). Its width grows with the run: ``sigma_rel`` of the updates so far.
        warmup: ``None`` (constant decay), ``"timm"`` (``1 − (1 + n/γ)^(−p)`` clamped to
            ``[min_decay, decay]``) or ``"tf"`` (``min(decay, (1 + n)/(10 + n))``).
        min_decay: Lower clamp of the ``"timm"`` warmup.
        warmup_gamma: ``γ`` of the ``"timm"`` warmup.
        warmup_power: ``p`` of the ``"timm"`` warmup (2/3 for long runs, 3/4 for short ones).
        every: Training steps between updates.

    Returns:
        A :class:`DecaySchedule`.

    Raises:
        ConfigError: Not exactly one of ``decay``, ``half_life`` and ``sigma_rel``, a
            warmup with ``sigma_rel``, or a value out of range.

    Example:
        >>> from polyak import make_schedule
        >>> s = make_schedule(0.999)
        >>> s(0), s(1), round(s.half_life, 1)
        (0.0, 0.999, 692.8)
        >>> round(make_schedule(half_life=100).decay, 6)
        0.993092
        >>> p = make_schedule(sigma_rel=0.10)
        >>> p.name, round(p.gamma, 2), p(0), round(p(1), 5)  # t = 2: (1 − 1/2)^(γ+1)
        ('power', 6.94, 0.0, 0.00408)
    """
    if sum(x is not None for x in (decay, half_life, sigma_rel)) != 1:
        raise ConfigError("give exactly one of decay=, half_life= or sigma_rel=")
    if sigma_rel is not None:
        if warmup is not None:
            raise ConfigError("a power EMA (sigma_rel=) has its own warmup; drop warmup=")
        value = check_sigma_rel(sigma_rel)
        return DecaySchedule(name="power", decay=0.0, every=every, sigma_rel=value, gamma=sigma_rel_to_gamma(value))
    if warmup not in _WARMUPS:
        raise ConfigError(f"warmup must be one of {list(_WARMUPS)}, got {warmup!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"every must be a whole number of steps ≥ 1, got {every!r}")
    steps: float | None = None
    if half_life is not None:
        try:
            steps = float(half_life)
        except (TypeError, ValueError):
            raise ConfigError(f"half_life must be a number of steps, got {half_life!r}") from None
        if not math.isfinite(steps) or steps <= 0:
            raise ConfigError(f"half_life must be a positive number of steps, got {half_life!r}")
        decay = 0.5 ** (every / steps)
    name = _WARMUPS[warmup]
    if name == "constant" and half_life is not None:
        name = "half_life"
    try:
        value = float(decay)  # type: ignore[arg-type]  # set in both branches above
    except (TypeError, ValueError):
        raise ConfigError(f"decay must be a number in [0, 1), got {decay!r}") from None
    return DecaySchedule(
        name=name,
        decay=value,
        min_decay=float(min_decay),
        warmup_gamma=float(warmup_gamma),
        warmup_power=float(warmup_power),
        half_life_steps=steps,
        every=every,
    )

