"""Post-hoc EMA: the math of power-function EMA profiles, and the snapshot record.

A *power-function EMA* with exponent ``γ ≥ 0`` is, after ``t`` updates (``t = 1, 2, …``),
``ema_t = β_t·ema_{t−1} + (1 − β_t)·θ_t`` with ``β_t = (1 − 1/t)^(γ+1)`` (so ``t = 1``
copies). Its weight over the past is ``∝ τ^γ`` on ``[0, t]``, and its width relative to
``t`` is ``σ_rel = sqrt((γ+1) / ((γ+2)²(γ+3)))``. A snapshot ``i`` of such an EMA, taken at
``t_i`` with exponent ``γ_i``, has the normalised *profile*
``p_i(τ) = (γ_i+1)·τ^γ_i / t_i^(γ_i+1)`` on ``[0, t_i]``, and two profiles have the inner
product (``m = min(t_a, t_b)``)::

    ⟨p_a, p_b⟩ = (γ_a+1)(γ_b+1)·m^(γ_a+γ_b+1) / ((γ_a+γ_b+1)·t_a^(γ_a+1)·t_b^(γ_b+1)).

An EMA of any other ``σ_rel*`` at ``t*`` is rebuilt as ``Σ x_i·snapshot_i`` where ``x``
solves the least-squares match of the profiles, ``A x = b`` with ``A_ij = ⟨p_i, p_j⟩`` and
``b_i = ⟨p_i, p*⟩``, normalised to sum to 1: a weighted checkpoint average with signed
weights, which the engine computes (:func:`polyak.posthoc`). ``A`` is badly conditioned
(about 1e5 for two profiles of 20 snapshots), so everything here is float64, and the
inner products are computed from logarithms (``t^(γ+1)`` overflows for ``t = 1e6``,
``γ = 50``).

This module is numpy only: the profile math (:func:`sigma_rel_to_gamma`,
:func:`gamma_to_sigma_rel`, :func:`profile_inner`, :func:`solve_coefficients`) and the
snapshot record that the capture faces (``polyak.torch.PostHocEMA``,
``polyak.keras.PostHocEMACallback``) write into each snapshot's metadata and the rebuild
reads (:class:`SnapshotRecord`).

References:
    Karras, Aittala, Lehtinen, Hellsten, Aila, Laine (2024), "Analyzing and Improving the
    Training Dynamics of Diffusion Models" (EDM2), arXiv:2312.02696, section 3 and
    appendix C.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ._errors import ConfigError, FormatError, whole_number
from ._json import json_object

__all__ = [
    "CAPTURE_KIND",
    "DEFAULT_SIGMA_RELS",
    "MAX_SIGMA_REL",
    "SNAPSHOT_KEY",
    "Fit",
    "SnapshotRecord",
    "capture_counters",
    "capture_state",
    "check_capture_state",
    "check_sigma_rel",
    "check_sigma_rels",
    "gamma_to_sigma_rel",
    "profile_inner",
    "sigma_rel_to_gamma",
    "snapshot_due",
    "snapshot_name",
    "solve_coefficients",
]

#: The largest σ_rel a power EMA with γ ≥ 0 has: γ = 0 (a uniform average of everything so
#: far) has σ_rel = sqrt(1/12) ≈ 0.2887.
MAX_SIGMA_REL = math.sqrt(1.0 / 12.0)

#: The paper's two tracked profiles (γ ≈ 16.97 and 6.94).
DEFAULT_SIGMA_RELS = (0.05, 0.10)

#: Metadata key of the snapshot record (JSON) in every snapshot file.
SNAPSHOT_KEY = "polyak_posthoc"

#: Version of the snapshot record layout.
RECORD_VERSION = 1

#: ``kind`` of a capture's resumable state (``PostHocEMA.state_dict``,
#: ``PostHocEMACallback.get_state``): one layout for both faces.
CAPTURE_KIND = "posthoc_ema"


def capture_state(run: str, every: int, sigma_rels: Sequence[float], written: int,
                  averagers: list[Any]) -> dict[str, Any]:
    """A capture's resumable state: ``{"kind", "run", "every", "sigma_rels", "written", "averagers"}``.

    Example:
        >>> capture_state("r1", 5, (0.05, 0.1), 20, [])["kind"]
        'posthoc_ema'
    """
    return {"kind": CAPTURE_KIND, "run": run, "every": every, "sigma_rels": list(sigma_rels),
            "written": written, "averagers": averagers}


def check_capture_state(state: Any, sigma_rels: Sequence[float], *, owner: str, hint: str = "") -> None:
    """Refuse a saved state that is not a capture's, or that tracks other widths than ``sigma_rels``.

    Raises:
        ConfigError: Naming the kind found (``owner`` and ``hint`` say whose state was
            expected and how to get one), or both lists of widths.

    Example:
        >>> check_capture_state(capture_state("r1", 5, (0.05, 0.1), 20, []), (0.05, 0.1), owner="PostHocEMA")
        >>> check_capture_state({"kind": "ema"}, (0.05, 0.1), owner="PostHocEMA")
        Traceback (most recent call last):
        ...
        polyak._errors.ConfigError: not a PostHocEMA state (kind 'ema')
    """
    if state.get("kind") != CAPTURE_KIND:
        raise ConfigError(f"not a {owner} state (kind {state.get('kind')!r}){hint}")
    saved = tuple(float(s) for s in state.get("sigma_rels", ()))
    if len(saved) != len(sigma_rels) or not np.allclose(saved, sigma_rels, rtol=1e-12, atol=0.0):
        raise ConfigError(f"the state tracks sigma_rels {list(saved)}, this {owner} {list(sigma_rels)}; "
                          "create it with the same sigma_rels")


def snapshot_due(before: int, after: int, every: int) -> bool:
    """Whether an update that took the count from ``before`` to ``after`` owes a snapshot.

    A snapshot is due each time the count reaches a multiple of ``every``; an update that
    stands in for several steps (Keras' ``steps_per_execution``, ``step=`` given now and
    then) may jump over that multiple, and still owes it.

    Example:
        >>> snapshot_due(4, 5, 5), snapshot_due(3, 6, 5), snapshot_due(5, 5, 5), snapshot_due(6, 9, 5)
        (True, True, False, False)
    """
    return after // every > before // every


def capture_counters(state: Any, every: int) -> tuple[str, int, int]:
    """``(run, every, written)`` of a capture's state (``every`` where the state has none).

    Example:
        >>> capture_counters(capture_state("r1", 5, (0.05,), 20, []), 1)
        ('r1', 5, 20)
    """
    return (str(state["run"]), whole_number(int(state.get("every", every)), "every", 1),
            int(state.get("written", -1)))


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of a power EMA with exponent ``γ``: ``sqrt((γ+1)/((γ+2)²(γ+3)))``.

    Example:
        >>> round(gamma_to_sigma_rel(6.94), 4), round(gamma_to_sigma_rel(0.0), 4)
        (0.1, 0.2887)
    """
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def check_sigma_rel(sigma_rel: object, what: str = "sigma_rel") -> float:
    """Validate a relative width: a number in ``(0, sqrt(1/12)]`` (γ ≥ 0).

    Raises:
        ConfigError: Not a number, not finite, ≤ 0 or above :data:`MAX_SIGMA_REL`.
    """
    try:
        s = float(sigma_rel)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number in (0, {MAX_SIGMA_REL:.4f}], got {sigma_rel!r}") from None
    if not math.isfinite(s) or s <= 0:
        raise ConfigError(
            f"{what} must be > 0 (the EMA's width relative to the training length, e.g. 0.05 or 0.1), got {sigma_rel!r}"
        )
    if s > MAX_SIGMA_REL * (1 + 1e-12):
        raise ConfigError(
            f"{what}={s:g} is wider than any power EMA: the widest (γ = 0, a plain running mean of "
            f"every step) has sigma_rel = sqrt(1/12) = {MAX_SIGMA_REL:.4f}; choose a value in (0, {MAX_SIGMA_REL:.4f}]"
        )
    return min(s, MAX_SIGMA_REL)


def check_sigma_rels(values: Sequence[object] | object, what: str = "sigma_rels") -> tuple[float, ...]:
    """Validate a non-empty list of distinct relative widths, returned sorted ascending."""
    if isinstance(values, (int, float, str)):
        values = [values]
    try:
        items = list(values)  # type: ignore[call-overload]
    except TypeError:
        raise ConfigError(f"{what} must be a list of numbers, got {values!r}") from None
    if not items:
        raise ConfigError(f"{what} is empty; give at least one relative width such as 0.05")
    out = [check_sigma_rel(v, what) for v in items]
    if len(set(out)) != len(out):
        raise ConfigError(f"{what} holds the same value twice: {out}")
    return tuple(sorted(out))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent ``γ ≥ 0`` of the power EMA whose relative width is ``σ_rel``.

    ``σ_rel(γ)`` falls monotonically from ``sqrt(1/12)`` at ``γ = 0`` towards 0, so the
    root of ``σ_rel²·(γ+2)²(γ+3) = γ+1`` (a cubic) is unique there; it is found by
    bisection to full float64 precision.

    Raises:
        ConfigError: ``σ_rel`` is not in ``(0, sqrt(1/12)]``.

    Example:
        >>> round(sigma_rel_to_gamma(0.05), 2), round(sigma_rel_to_gamma(0.10), 2)
        (16.97, 6.94)
    """
    s = check_sigma_rel(sigma_rel)
    target = s * s

    def f(g: float) -> float:  # > 0 below the root, < 0 above it (σ_rel² falls with γ)
        return (g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)) - target

    if f(0.0) <= 0.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while f(hi) > 0.0:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if f(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def profile_inner(t_a: Any, gamma_a: Any, t_b: Any, gamma_b: Any) -> np.ndarray:
    """``⟨p_a, p_b⟩`` of power-EMA profiles, broadcast over arrays, in float64.

    Computed from logarithms, so large ``t`` and ``γ`` neither overflow nor lose precision.

    Example:
        >>> round(float(profile_inner(10.0, 0.0, 10.0, 0.0)), 12)  # a uniform density on [0, 10]: 1/10
        0.1
    """
    ta, ga = np.asarray(t_a, np.float64), np.asarray(gamma_a, np.float64)
    tb, gb = np.asarray(t_b, np.float64), np.asarray(gamma_b, np.float64)
    m = np.minimum(ta, tb)
    s = ga + gb + 1.0
    log = (np.log(ga + 1.0) + np.log(gb + 1.0) + s * np.log(m) - np.log(s)
           - (ga + 1.0) * np.log(ta) - (gb + 1.0) * np.log(tb))
    return np.asarray(np.exp(log))


@dataclass(frozen=True)
class Fit:
    """The coefficients that rebuild one profile from the snapshots, and how well they do.

    Attributes:
        sigma_rel: The rebuilt relative width ``σ_rel*``.
        gamma: Its exponent ``γ*``.
        t: The rebuilt EMA's time ``t*`` (updates).
        coefficients: One signed weight per snapshot (in the order given), summing to 1.
        residual: ``‖p* − Σ x_i p_i‖ / ‖p*‖`` (L2 norms on ``[0, t*]``): 0 is an exact
            match; the rebuilt weights differ from the wanted EMA by about this fraction
            of how much that EMA's weights vary over the profile's width.
        raw_sum: ``Σ x_i`` before normalising (1 for a good fit).
    """

    sigma_rel: float
    gamma: float
    t: float
    coefficients: np.ndarray
    residual: float
    raw_sum: float

    def to_dict(self) -> dict[str, Any]:
        return {"sigma_rel": self.sigma_rel, "gamma": self.gamma, "t": self.t,
                "coefficients": [float(x) for x in self.coefficients], "residual": self.residual,
                "raw_sum": self.raw_sum}


def solve_coefficients(ts: Sequence[float], gammas: Sequence[float], t: float, sigma_rel: float) -> Fit:
    """Coefficients ``x`` with ``Σ x_i p_i ≈ p*`` (least squares), normalised to sum to 1.

    Args:
        ts: Each snapshot's time ``t_i`` (updates, ≥ 1).
        gammas: Each snapshot's exponent ``γ_i``.
        t: The time ``t*`` of the EMA to rebuild.
        sigma_rel: Its relative width ``σ_rel*``.

    Returns:
        A :class:`Fit`.

    Raises:
        ConfigError: No snapshots, a time below 1, or an invalid ``σ_rel``.

    Example:
        >>> fit = solve_coefficients([100.0], [6.94], 100.0, 0.10)  # the snapshot itself
        >>> [round(float(x), 6) for x in fit.coefficients], round(fit.residual, 3)
        ([1.0], 0.0)
    """
    t_i = np.asarray(ts, np.float64).reshape(-1)
    g_i = np.asarray(gammas, np.float64).reshape(-1)
    if t_i.size == 0 or t_i.size != g_i.size:
        raise ConfigError(f"need one exponent per snapshot and at least one snapshot, got {t_i.size} and {g_i.size}")
    if np.any(t_i < 1) or not np.all(np.isfinite(t_i)) or float(t) < 1:
        raise ConfigError(f"profile times count updates and start at 1, got {t_i.tolist()} and t*={t}")
    if np.any(g_i < 0) or not np.all(np.isfinite(g_i)):
        raise ConfigError(f"power EMA exponents must be finite and ≥ 0, got {g_i.tolist()}")
    gamma = sigma_rel_to_gamma(sigma_rel)
    # Profiles are scale-free (⟨p_a, p_b⟩ scales as 1/s when every t does), so measure time
    # in units of t*: the matrix entries are then of order 1.
    scale = float(t)
    t_n, t_star = t_i / scale, 1.0
    a = profile_inner(t_n[:, None], g_i[:, None], t_n[None, :], g_i[None, :])
    b = profile_inner(t_n, g_i, t_star, gamma)
    x, *_ = np.linalg.lstsq(a, b, rcond=None)
    raw_sum = float(x.sum())
    if not math.isfinite(raw_sum) or abs(raw_sum) < 1e-12:
        raise ConfigError(
            f"the snapshots cannot express an EMA with sigma_rel={sigma_rel:g} at t={t:g} "
            "(the coefficients sum to 0); take snapshots of more profiles or more often"
        )
    x = x / raw_sum
    pp = float(profile_inner(t_star, gamma, t_star, gamma))
    err2 = pp - 2.0 * float(x @ b) + float(x @ a @ x)
    residual = math.sqrt(max(err2, 0.0) / pp)
    return Fit(sigma_rel=float(sigma_rel), gamma=gamma, t=float(t), coefficients=x, residual=residual, raw_sum=raw_sum)


@dataclass(frozen=True)
class SnapshotRecord:
    """What every snapshot file says about itself (JSON under :data:`SNAPSHOT_KEY`).

    Attributes:
        sigma_rel: The tracked profile's relative width.
        gamma: Its exponent.
        t: The power EMA's time: the number of updates it has taken (the first copies).
        step: The training step of the snapshot (what ``--step`` refers to).
        count: Updates folded in (equals ``t``; kept for readers of averager states).
        names: The tensor names of the model, in the model's order.
        run: An identifier shared by every snapshot of one training run.
        every: Updates between snapshots.
        framework: ``"torch"`` or ``"keras"``.
        copied: Floating tensors copied from the model rather than averaged (BatchNorm
            statistics with ``include_buffers=False``): a rebuild copies them from the
            newest snapshot, as integer tensors.
        version: The record layout's version.
    """

    sigma_rel: float
    gamma: float
    t: int
    step: int
    count: int
    names: tuple[str, ...]
    run: str
    every: int
    framework: str
    copied: tuple[str, ...] = ()
    version: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["names"] = list(self.names)
        data["copied"] = list(self.copied)
        if not data["extra"]:
            del data["extra"]
        return json.dumps(data, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, label: str) -> SnapshotRecord:
        """Parse a record; ``label`` names the file in errors.

        Raises:
            FormatError: Not a JSON object, a field missing or of the wrong type, or a newer layout.
            UnsafeFileError: JSON nested too deep or with an absurdly long number.
        """
        data = json_object(text, label, f"{SNAPSHOT_KEY!r} metadata")  # untrusted: the file may not be ours
        version = data.get("version", RECORD_VERSION)
        if not isinstance(version, int) or version > RECORD_VERSION:
            raise FormatError(f"{label}: snapshot record version {version!r} is newer than this polyak reads "
                              f"({RECORD_VERSION}); upgrade polyak")
        try:
            rec = cls(
                sigma_rel=float(data["sigma_rel"]), gamma=float(data["gamma"]), t=int(data["t"]),
                step=int(data["step"]), count=int(data["count"]), names=tuple(str(n) for n in data["names"]),
                run=str(data["run"]), every=int(data["every"]), framework=str(data["framework"]),
                copied=tuple(str(n) for n in data.get("copied", ())), version=version,
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{label}: the {SNAPSHOT_KEY!r} record lacks or garbles {exc}") from None
        if rec.t < 1 or rec.gamma < 0 or not (0 < rec.sigma_rel <= MAX_SIGMA_REL * (1 + 1e-9)):
            raise FormatError(f"{label}: the snapshot record holds t={rec.t}, gamma={rec.gamma}, "
                              f"sigma_rel={rec.sigma_rel}, which no power EMA has")
        return rec


_NAME = re.compile(r"^posthoc_sigma(?P<sigma>[0-9.e+-]+)_step(?P<step>\d+)\.safetensors$")


def snapshot_name(sigma_rel: float, step: int) -> str:
    """The file name of a snapshot: ``posthoc_sigma0.05_step000001000.safetensors``.

    The step is zero-padded so that a plain listing shows snapshots in time order.

    Example:
        >>> snapshot_name(0.05, 1000)
        'posthoc_sigma0.05_step000001000.safetensors'
    """
    return f"posthoc_sigma{float(sigma_rel):g}_step{int(step):09d}.safetensors"


def is_snapshot_name(name: str) -> bool:
    """Whether ``name`` is what :func:`snapshot_name` writes."""
    return _NAME.match(name) is not None
