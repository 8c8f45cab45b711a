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

Each scheme is one :class:`Scheme` in :data:`SCHEMES`: its name, its typed parameters with
defaults and validation (:class:`Param`), its weights formula, and the running sums that
let :func:`polyak.sweep` build the average of the newest n members for every n in one
pass (:class:`RunningSum`). Adding a scheme is one :func:`register_scheme` call;
``polyak.average``, ``polyak.scheme_weights``, ``polyak.sweep``, the provenance record and
the command line's choices all read the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import SchemeError

__all__ = [
    "MEMBER",
    "REQUIRED",
    "SCHEMES",
    "Param",
    "RunningSum",
    "Scheme",
    "Update",
    "get_scheme",
    "register_scheme",
    "scheme_names",
    "scheme_weights",
]


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: The default of a :class:`Param` that must be given.
REQUIRED: Any = _Marker("REQUIRED")
#: The source of an :class:`Update` that adds the member just read.
MEMBER: Any = _Marker("MEMBER")


@dataclass(frozen=True)
class Param:
    """A typed keyword parameter of a scheme.

    Attributes:
        name: The keyword (``alpha``), also the key in the provenance record's ``params``.
        default: The value when none is given; :data:`REQUIRED` when one must be.
        check: Validates a given value and returns it converted (e.g. to ``float``);
            raises :class:`~polyak.SchemeError` with a message that says what is wrong.
        help: What the parameter means, for error messages and ``--help``.
        recorded: Whether the provenance record lists it (custom weights are recorded as
            the weights themselves).
    """

    name: str
    default: Any
    check: Callable[[Any], Any]
    help: str
    recorded: bool = True


@dataclass(frozen=True)
class Update:
    """One step of a running sum: ``sums[target] += coef · source``.

    ``source`` is :data:`MEMBER` (the member just read) or the key of another running sum
    (as updated earlier in the same step). Keys are shared between schemes on purpose:
    ``equal`` and ``linear`` both keep ``"S0"``, which a sweep of both holds once; schemes
    that share a key must update it identically.
    """

    target: Hashable
    coef: float = 1.0
    source: Hashable = MEMBER


@dataclass(frozen=True)
class RunningSum:
    """How a sweep keeps a scheme's average of the newest n members for every n at once.

    Members are read newest first. When member ``j`` (0 = the newest) is read, the sweep
    applies ``updates(j)`` in order; afterwards the sum ``result`` holds
    ``Σ_{j<n} c_n(j) · x_j`` with coefficients proportional to the scheme's weights of the
    newest ``n``. The sweep applies the same updates to ones to get ``Σ_{j<n} c_n(j)`` and
    divides by it, so the coefficients need not be normalised; keep the newest member's
    near 1 (coefficients below 1e-30 in float32 sums, 1e-290 in float64, are skipped:
    they cannot change the sum and would be slow subnormal numbers).

    Attributes:
        result: The key of the sum that holds the unnormalised average.
        updates: ``updates(j)``: the updates when member ``j`` is read; the same keys for
            every ``j``.
    """

    result: Hashable
    updates: Callable[[int], Sequence[Update]]


@dataclass(frozen=True)
class Scheme:
    """A registered weighting scheme.

    Attributes:
        name: The name used by ``scheme=`` and ``--scheme``.
        summary: One line for ``--help`` and reports.
        formula: The unnormalised weight of member ``j`` (``j = 0`` is the newest).
        reference: Where the scheme comes from.
        raw: ``raw(n, **params)`` returns the unnormalised weights, oldest → newest.
        params: The keyword parameters the scheme takes, with defaults and validation.
            A sweep varies the one named ``alpha`` (its ``alphas=``); others keep their
            defaults there.
        running: ``running(**params)`` returns the scheme's :class:`RunningSum`, which is
            what lets :func:`polyak.sweep` sweep it; ``None``: the scheme cannot be swept.
    """

    name: str
    summary: str
    formula: str
    reference: str
    raw: Callable[..., np.ndarray]
    params: tuple[Param, ...] = ()
    running: Callable[..., RunningSum] | None = None

    @property
    def parameters(self) -> tuple[str, ...]:
        """Names of the keyword parameters the scheme takes."""
        return tuple(p.name for p in self.params)

    def param(self, name: str) -> Param:
        """The parameter called ``name``.

        Raises:
            SchemeError: The scheme takes no such parameter.
        """
        for p in self.params:
            if p.name == name:
                return p
        raise SchemeError(f"scheme {self.name!r} has no parameter {name!r}; it takes {list(self.parameters)}")

    def resolve(self, **given: Any) -> dict[str, Any]:
        """The scheme's parameters, validated: the given ones, defaults for the rest.

        Values of ``None`` count as not given, and keywords the scheme does not take are
        ignored, so callers can pass every option they have (``alpha=`` to ``"equal"``).

        Raises:
            SchemeError: A value fails its check, or a required parameter is missing.

        Example:
            >>> get_scheme("exponential").resolve(alpha=4), get_scheme("equal").resolve(alpha=4)
            ({'alpha': 4.0}, {})
        """
        out: dict[str, Any] = {}
        for p in self.params:
            value = given.get(p.name)
            if value is not None:
                out[p.name] = p.check(value)
            elif p.default is REQUIRED:
                raise SchemeError(f"scheme {self.name!r} needs {p.name}= ({p.help})")
            else:
                out[p.name] = p.default
        return out

    def record(self, params: dict[str, Any]) -> dict[str, Any]:
        """The resolved ``params`` as the provenance record lists them."""
        return {p.name: params[p.name] for p in self.params if p.recorded}

    def weights(self, n: int, **params: Any) -> np.ndarray:
        """Normalised weights of the newest ``n`` members, oldest → newest (``params`` resolved)."""
        raw = np.asarray(self.raw(_check_n(n), **params), dtype=np.float64)
        return raw / raw.sum()


#: The registry: name → :class:`Scheme`, in the order ``--help`` lists them.
SCHEMES: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme, *, replace: bool = False) -> Scheme:
    """Add a scheme to the registry (and so to ``average``, ``sweep`` and the command line).

    Raises:
        SchemeError: The name is taken (without ``replace``).
    """
    if scheme.name in SCHEMES and not replace:
        raise SchemeError(f"a scheme named {scheme.name!r} is already registered; pass replace=True to replace it")
    SCHEMES[scheme.name] = scheme
    return scheme


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


def _check_custom(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    try:
        w = np.asarray(weights, dtype=np.float64)
    except (TypeError, ValueError):
        raise SchemeError(f"custom weights must be numbers, got {weights!r}") from None
    if w.ndim != 1:
        raise SchemeError(f"custom weights must be a flat list of numbers, got shape {w.shape}")
    if len(w) == 0:
        raise SchemeError("custom weights are empty; give one weight per member")
    if not np.all(np.isfinite(w)):
        raise SchemeError(f"custom weights must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise SchemeError(f"custom weights must not be negative, got {w.tolist()}")
    if not np.any(w > 0):
        raise SchemeError("custom weights are all zero; at least one member needs a positive weight")
    return w


def _equal(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float64)


def _linear(n: int) -> np.ndarray:
    # oldest → newest: 1, 2, ..., n (the newest member, j = 0, gets n).
    return np.arange(1, n + 1, dtype=np.float64)


def _exponential(n: int, alpha: float) -> np.ndarray:
    # exp(−(j + 1)/alpha) scaled by exp(1/alpha), which cancels after normalising: the
    # newest member gets 1, so a tiny alpha cannot underflow every weight to 0.
    j = np.arange(n - 1, -1, -1, dtype=np.float64)  # oldest has j = n - 1
    return np.exp(-j / alpha)


def _custom(n: int, weights: np.ndarray) -> np.ndarray:
    if len(weights) != n:
        raise SchemeError(
            f"got {len(weights)} custom weights for {n} members; give exactly one weight per member "
            "(oldest → newest)"
        )
    return weights


# Running sums (see polyak._choose.sweep): S0(n) = Σ_{j<n} x_j.
def _equal_sums() -> RunningSum:
    return RunningSum("S0", lambda j: (Update("S0"),))


def _linear_sums() -> RunningSum:
    # L(n) = Σ_{j<n} (n − j)·x_j = n·S0 − S1; L(n) − L(n−1) = S0(n) avoids that cancellation.
    return RunningSum("L", lambda j: (Update("S0"), Update("L", source="S0")))


def _exponential_sums(alpha: float) -> RunningSum:
    # The common factor exp(−1/alpha) cancels after normalising: the newest member gets 1.
    key = ("E", alpha)
    return RunningSum(key, lambda j: (Update(key, math.exp(-j / alpha)),))


register_scheme(Scheme(
    name="equal",
    summary="Polyak–Ruppert average: every member counts the same",
    formula="1",
    reference="Polyak & Juditsky 1992, doi:10.1137/0330046",
    raw=_equal,
    running=_equal_sums,
))
register_scheme(Scheme(
    name="linear",
    summary="linearly decreasing weights: the newest member counts n times the oldest",
    formula="n - j",
    reference="Brownlee 2018, 'Ensemble Neural Network Model Weights in Keras (Polyak Averaging)'",
    raw=_linear,
    running=_linear_sums,
))
register_scheme(Scheme(
    name="exponential",
    summary="exponentially decreasing weights with decay rate alpha (larger alpha: flatter)",
    formula="exp(-(j + 1) / alpha)",
    reference="Brownlee 2018, 'Ensemble Neural Network Model Weights in Keras (Polyak Averaging)'",
    raw=_exponential,
    params=(Param("alpha", 2.0, check_alpha, "the decay rate, > 0; larger is flatter"),),
    running=_exponential_sums,
))
register_scheme(Scheme(
    name="custom",
    summary="weights given by the caller, oldest → newest, normalised to sum to 1",
    formula="w_j (given)",
    reference="—",
    raw=_custom,
    params=(Param("weights", REQUIRED, _check_custom, "one weight per member, oldest → newest", recorded=False),),
))


def scheme_names() -> list[str]:
    """The names of the registered weighting schemes: what ``scheme=`` and ``--scheme`` accept.

    Returns:
        The names in registry order (the built-in ``equal``, ``linear``, ``exponential``
        and ``custom`` first, then any added with ``polyak._schemes.register_scheme``).

    Example:
        >>> import polyak
        >>> polyak.scheme_names()
        ['equal', 'linear', 'exponential', 'custom']
    """
    return list(SCHEMES)


def get_scheme(name: str) -> Scheme:
    """Look a weighting scheme up by name: its formula, parameters and weights.

    Args:
        name: A registered scheme name (see :func:`polyak.scheme_names`).

    Returns:
        The registered ``Scheme``: its ``name``, ``summary``, ``formula``, ``reference``,
        its parameters (``parameters``, ``resolve()`` to validate and fill in defaults) and
        ``weights(n, **params)``, the normalised weights of the newest ``n`` members,
        oldest → newest.

    Raises:
        SchemeError: The name is not registered; the message lists the valid names.

    Example:
        >>> import polyak
        >>> s = polyak.get_scheme("exponential")
        >>> s.formula, s.parameters, s.resolve()
        ('exp(-(j + 1) / alpha)', ('alpha',), {'alpha': 2.0})
        >>> s.weights(3, **s.resolve()).round(3).tolist()
        [0.186, 0.307, 0.506]
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


def scheme_weights(
    scheme: str | Sequence[float] | np.ndarray,
    n: int | None = None,
    *,
    alpha: float | None = None,
    weights: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """Normalised weights of the newest ``n`` members, oldest → newest.

    Args:
        scheme: A registered scheme name (``"equal"``, ``"linear"``, ``"exponential"``,
            ``"custom"``) or, as a shortcut for ``"custom"``, the weights themselves.
        n: How many members. Optional for custom weights (their length is used).
        alpha: Decay rate of ``"exponential"``; must be > 0. Default (``None``): the
            scheme's, 2.0, as in the tutorial. Ignored by schemes without ``alpha``.
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
    if weights is not None and "weights" not in spec.parameters:
        raise SchemeError(f"weights= is only used with scheme 'custom', not with {spec.name!r}")
    params = spec.resolve(alpha=alpha, weights=weights)
    if n is None:
        if "weights" not in params:
            raise SchemeError(f"scheme {spec.name!r} needs the number of members n")
        n = len(params["weights"])
    return spec.weights(n, **params)
