"""Weighting schemes: how much each of the newest n members counts in an average.

Members are always given oldest → newest. With ``j = 0`` for the newest member, the
unnormalised weight of member ``j`` is:

========================  ===========================  =====================================
scheme                    weight of member j           the tutorial's code (newest first)
========================  ===========================  =====================================
``equal``                 1                            ``[1.0 for _ in range(n)]``
``linear``                n − j                        ``[i / n for i in range(n, 0, -1)]``
``exponential`` (alpha)   exp(−(j + 1) / alpha)        ``[exp(-i / alpha) for i in range(1, n + 1)]``
``custom``                given                        —
========================  ===========================  =====================================

Weights are normalised to sum to 1, as ``numpy.average`` does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ._errors import SchemeError

__all__ = ["SCHEMES", "Scheme", "get_scheme", "scheme_names", "scheme_weights"]


@dataclass(frozen=True)
class Scheme:
    """A registered weighting scheme.

    Attributes:
        name: The name used by ``scheme=`` and ``--scheme``.
        summary: One line for ``--help`` and reports.
        formula: The unnormalised weight of member ``j`` (``j = 0`` is the newest).
        parameters: Names of the keyword parameters the scheme takes.
        reference: Where the scheme comes from.
        raw: ``raw(n, **params)`` returns the unnormalised weights, oldest → newest.
    """

    name: str
    summary: str
    formula: str
    parameters: tuple[str, ...]
    reference: str
    raw: Callable[..., np.ndarray]


def _equal(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float64)


def _linear(n: int) -> np.ndarray:
    # oldest → newest: 1, 2, ..., n (the newest member, j = 0, gets n).
    return np.arange(1, n + 1, dtype=np.float64)


def _exponential(n: int, alpha: float) -> np.ndarray:
    j = np.arange(n - 1, -1, -1, dtype=np.float64)  # oldest has j = n - 1
    return np.exp(-(j + 1.0) / alpha)


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme(
            "equal",
            "Polyak–Ruppert average: every member counts the same",
            "1",
            (),
            "Polyak & Juditsky 1992, doi:10.1137/0330046",
            _equal,
        ),
        Scheme(
            "linear",
            "linearly decreasing weights: the newest member counts n times the oldest",
            "n - j",
            (),
            "Brownlee 2018, 'Ensemble Neural Network Model Weights in Keras (Polyak Averaging)'",
            _linear,
        ),
        Scheme(
            "exponential",
            "exponentially decreasing weights with decay rate alpha (larger alpha: flatter)",
            "exp(-(j + 1) / alpha)",
            ("alpha",),
            "Brownlee 2018, 'Ensemble Neural Network Model Weights in Keras (Polyak Averaging)'",
            _exponential,
        ),
        Scheme(
            "custom",
            "weights given by the caller, oldest → newest, normalised to sum to 1",
            "w_j (given)",
            ("weights",),
            "—",
            lambda n: np.ones(n),  # never called: custom weights are handled below
        ),
    )
}


def scheme_names() -> list[str]:
    """The registered scheme names, in registry order."""
    return list(SCHEMES)


def get_scheme(name: str) -> Scheme:
    """Look a scheme up by name.

    Raises:
        SchemeError: The name is not registered; the message lists the valid names.
    """
    try:
        return SCHEMES[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(s) for s in SCHEMES)
        raise SchemeError(f"unknown weighting scheme {name!r}; valid schemes: {valid}") from None


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise SchemeError(f"the number of members must be an integer, got {n!r}")
    if n < 1:
        raise SchemeError(f"the number of members must be at least 1, got n={n}")
    return int(n)


def check_alpha(alpha: object) -> float:
    """Validate an exponential decay rate and return it as a float."""
    try:
        value = float(alpha)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SchemeError(f"alpha must be a positive number, got {alpha!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise SchemeError(
            f"alpha must be a positive, finite number (the exponential decay rate), got {alpha!r}"
        )
    return value


def _check_custom(weights: Sequence[float] | np.ndarray, n: int | None) -> np.ndarray:
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise SchemeError(f"custom weights must be numbers, got {weights!r}") from None
    if w.ndim != 1:
        raise SchemeError(f"custom weights must be a flat list of numbers, got shape {w.shape}")
    if n is not None and len(w) != n:
        raise SchemeError(
            f"got {len(w)} custom weights for {n} members; give exactly one weight per member "
            "(oldest → newest)"
        )
    if len(w) == 0:
        raise SchemeError("custom weights are empty; give one weight per member")
    if not np.all(np.isfinite(w)):
        raise SchemeError(f"custom weights must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise SchemeError(f"custom weights must not be negative, got {w.tolist()}")
    if not np.any(w > 0):
        raise SchemeError("custom weights are all zero; at least one member needs a positive weight")
    return w


def scheme_weights(
    scheme: str | Sequence[float] | np.ndarray,
    n: int | None = None,
    *,
    alpha: float = 2.0,
    weights: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Normalised weights of the newest ``n`` members, oldest → newest.

    Args:
        scheme: A registered scheme name (``"equal"``, ``"linear"``, ``"exponential"``,
            ``"custom"``) or, as a shortcut for ``"custom"``, the weights themselves.
        n: How many members. Optional for custom weights (their length is used).
        alpha: Decay rate of ``"exponential"``; must be > 0. Default 2.0, as in the tutorial.
        weights: The unnormalised weights for ``"custom"``, oldest → newest.

    Returns:
        A float64 array of length ``n`` that sums to 1.

    Raises:
        SchemeError: Unknown scheme, ``n < 1``, ``alpha <= 0``, or custom weights that are
            negative, all zero, not finite, or of the wrong length.

    Example:
        >>> import polyak
        >>> polyak.scheme_weights("linear", 3).round(4).tolist()
        [0.1667, 0.3333, 0.5]
        >>> polyak.scheme_weights("equal", 4).tolist()
        [0.25, 0.25, 0.25, 0.25]
    """
    if not isinstance(scheme, str):
        weights, scheme = scheme, "custom"
    spec = get_scheme(scheme)
    if spec.name == "custom":
        if weights is None:
            raise SchemeError('scheme "custom" needs weights=[...] (one per member, oldest → newest)')
        raw = _check_custom(weights, None if n is None else _check_n(n))
    else:
        if weights is not None:
            raise SchemeError(
                f"weights= is only used with scheme 'custom', not with {spec.name!r}"
            )
        if n is None:
            raise SchemeError(f"scheme {spec.name!r} needs the number of members n")
        count = _check_n(n)
        raw = spec.raw(count, check_alpha(alpha)) if "alpha" in spec.parameters else spec.raw(count)
    return raw / raw.sum()
