"""Diagnostics before (and after) averaging: are these members one run, one basin?

Averaging weights works when the members lie in one low-loss basin — checkpoints of one
run, or fine-tunes of one pretrained model — and fails for independently trained networks
(Frankle et al. 2020, Wortsman et al. 2022: averaging two separately initialised networks
gives near-chance accuracy). Two numbers, over all floating tensors flattened into one
vector per member, tell the cases apart:

* **relative distance** ``‖x_i − x̄‖ / ‖x̄‖`` of each member to the equal-weight mean. For
  N members that are mutually orthogonal with equal norms (independent random inits) it
  is ``√(N − 1) ≥ 1``; checkpoints of one run near its end are a few percent apart.
* **cosine similarity** ``⟨x_i, x_j⟩ / (‖x_i‖ ‖x_j‖)`` of the flattened weights (not of
  their deviations from the mean: those are near-orthogonal noise in a healthy run too, so
  they cannot separate "one run" from "two runs"). Independently initialised networks are
  close to orthogonal (cosine near 0 plus what shared constants like norm-layer gains add);
  checkpoints of one run are above 0.99.

Warnings fire at a cosine below :data:`MIN_COSINE` (0.9) or a relative distance above
:data:`MAX_DISTANCE` (0.5), far from both cases (see ``docs/sweep.md`` for measurements),
and, with sweep results, when an average scores more than :data:`MAX_DROP` (5 %) worse
than the mean of its own members' scores, weighted as the average weights the members.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._dtypes import is_float
from .._engine.kernel import CHUNK, check_finite, chunks, probe
from .._engine.members import MemberLike, check_members, open_members, select_members
from .._errors import PolyakWarning
from .._schemes import scheme_weights
from .metrics import default_mode, mode_sign
from .results import SweepResults

__all__ = ["MAX_DISTANCE", "MAX_DROP", "MIN_COSINE", "AveragingWarning", "Diagnosis", "check_results", "diagnose"]

#: Members whose flattened weights have a lower cosine similarity look like different runs.
MIN_COSINE = 0.9
#: Members farther than this from the mean (relative to the mean's norm) look like outliers.
MAX_DISTANCE = 0.5
#: An average scoring this much (relative) worse than the mean of its members is flagged.
MAX_DROP = 0.05


class AveragingWarning(PolyakWarning):
    """Members look unsuitable for averaging, or an average scored far below its members."""


@dataclass
class Diagnosis:
    """What :func:`polyak.diagnose` measured: how far apart the members are, and what looks unsafe.

    Prints as a table (one line per member: relative distance, lowest cosine), then the
    issues or "no problems found".

    Attributes:
        members: Member labels, oldest → newest.
        distance: Each member's ``‖x_i − x̄‖ / ‖x̄‖`` over all floating tensors.
        cosine: Pairwise cosine similarity of the flattened floating weights (N × N).
        norms: Each member's L2 norm over all floating tensors.
        issues: Human-readable problems (each also given as an :class:`AveragingWarning`).

    Example:
        >>> import numpy as np, polyak
        >>> run = [{"w": np.array([1.0, 1.0])}, {"w": np.array([1.0, 1.1])}, {"w": np.array([1.1, 1.1])}]
        >>> d = polyak.diagnose(run, warn=False)
        >>> d.ok, [round(x, 3) for x in d.distance], round(d.cosine[0][2], 4)
        (True, [0.05, 0.032, 0.05], 1.0)
        >>> print(d)  # doctest: +NORMALIZE_WHITESPACE
        member                                  rel. distance   min cosine
        member 0                                      0.05019     0.998868
        member 1                                      0.03174     0.998868
        member 2                                      0.05019     0.998868
        no problems found
    """

    members: list[str]
    distance: list[float]
    cosine: list[list[float]]
    norms: list[float]
    issues: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no issue was found."""
        return not self.issues

    def to_dict(self) -> dict[str, Any]:
        """The diagnosis as a JSON-able dict (``members``, ``distance``, ``cosine``, ``norms``,
        ``issues``), as ``polyak sweep --out`` stores it in ``results.json``."""
        return {"members": self.members, "distance": self.distance, "cosine": self.cosine,
                "norms": self.norms, "issues": self.issues}

    def __str__(self) -> str:
        lines = ["member                                  rel. distance   min cosine"]
        for i, label in enumerate(self.members):
            others = [c for j, c in enumerate(self.cosine[i]) if j != i]
            mc = min(others) if others else 1.0
            lines.append(f"{label[-38:]:<38}  {self.distance[i]:13.4g}   {mc:10.6f}")
        lines += [f"warning: {m}" for m in self.issues] or ["no problems found"]
        return "\n".join(lines)


def check_results(results: SweepResults, metric: str, *, split: str | None = None, mode: str | None = None,
                  max_drop: float = MAX_DROP) -> list[str]:
    """Averages that score more than ``max_drop`` (relative) worse than the mean of their members.

    Args:
        results: A sweep with ``"single"`` rows.
        metric: The metric to compare.
        split: The split (default: the first in the results).
        mode: ``"max"`` (higher is better) or ``"min"``; default from the metric's name
            (``"min"`` for loss/error-like names), as in :func:`polyak.select`.
        max_drop: Allowed relative drop; 0.05 is several times the sampling noise of an
            accuracy measured on 1,000 examples (≈ 1.3 points at 80 %), and far below
            what a failed average loses (near-chance accuracy, or 7 BLEU points).

    Returns:
        One message per flagged (scheme, n), worst first; empty when all is well.

    Raises:
        ConfigError: ``metric`` or ``split`` is not in the results, or ``mode`` is neither
            ``"max"`` nor ``"min"``.

    Example:
        >>> import polyak
        >>> from polyak import SweepResults, SweepRow
        >>> rows = [SweepRow("single", 1, {"eval": {"acc": 0.80}}, member="b"),
        ...         SweepRow("single", 2, {"eval": {"acc": 0.78}}, member="a"),
        ...         SweepRow("average", 2, {"eval": {"acc": 0.40}}, scheme="equal")]
        >>> polyak.check_results(SweepResults(rows, ["a", "b"]), "acc")
        ["the equal average of the newest 2 members has eval acc 0.4, 49% worse than its members' (same-weighted) mean 0.79: the members may not share a basin (different runs, or too far apart); use fewer members"]
    """
    sign = mode_sign(mode if mode is not None else default_mode(metric))
    split = split or results.splits[0]
    results.check_metric(metric, split)
    singles = {r.n: r.value(metric, split) for r in results.rows if r.kind == "single"}
    found: list[tuple[float, str]] = []
    for r in results.rows:
        if r.kind != "average" or r.n < 2 or not all(k in singles for k in range(1, r.n + 1)):
            continue
        # The members' scores weighted as the average weights them (oldest → newest):
        # what the average "should" score if weight space were as good as score space.
        w = scheme_weights(str(r.scheme), r.n, alpha=r.alpha)
        mean = float(np.dot(w, [singles[k] for k in range(r.n, 0, -1)]))
        v = r.value(metric, split)
        drop = sign * (mean - v) / max(abs(mean), 1e-12)
        if drop > max_drop:
            found.append((drop, f"the {r.name} average of the newest {r.n} members has {split} {metric} "
                                f"{v:.4g}, {drop:.0%} worse than its members' (same-weighted) mean "
                                f"{mean:.4g}: the members may not share a basin (different runs, or too far "
                                "apart); use fewer members"))
    return [m for _, m in sorted(found, key=lambda t: -t[0])]


def diagnose(
    members: Sequence[MemberLike],
    *,
    results: SweepResults | None = None,
    metric: str | None = None,
    split: str | None = None,
    mode: str | None = None,
    min_cosine: float = MIN_COSINE,
    max_distance: float = MAX_DISTANCE,
    format: str | None = None,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    order: str = "number",
    last: int | None = None,
    warn: bool = True,
) -> Diagnosis:
    """Measure how far apart members are, and warn when they look unsafe to average.

    Reads every member once. The Gram matrix of the flattened floating weights is
    accumulated in float64, chunk by chunk; distances and cosines follow from it. A
    member holding NaN/Inf is refused: it would make every number NaN, and NaN passes
    every threshold.

    Args:
        members: Checkpoint paths or in-memory states.
        results: Optional sweep results of the same members, checked with
            :func:`check_results` when ``metric`` is given too.
        metric: The metric for that check.
        split: The split of ``metric`` (default: the first).
        mode: ``"max"`` or ``"min"``: which direction is better (default: from the metric's name).
        min_cosine: Warn below this pairwise cosine (default 0.9).
        max_distance: Warn above this relative distance to the mean (default 0.5).
        format: Force the input format (as in :func:`polyak.average`).
        key: Key of the state dict inside nested ``.pt`` checkpoints.
        strip_prefix: Prefixes to remove from tensor names.
        order: How to order paths (as in :func:`polyak.average`).
        last: Use only the newest ``last`` members.
        warn: Give each issue as an :class:`AveragingWarning` too.

    Returns:
        A :class:`Diagnosis`.

    Raises:
        ConfigError: Invalid options (an unknown ``order``, a ``last`` below 1...), or a
            ``metric``/``split`` not in ``results``.
        FormatError: An unreadable, corrupt or unsafe member.
        MismatchError: Members disagree on names, shapes or dtypes (all listed at once).
        NonFiniteError: A member holds NaN/Inf in a floating tensor (named, with the member).

    Warns:
        AveragingWarning: For each issue, when ``warn`` is true.

    Example:
        >>> import numpy as np, polyak
        >>> a = {"w": np.array([1.0, 0.0])}; b = {"w": np.array([0.0, 1.0])}
        >>> d = polyak.diagnose([a, b], warn=False)
        >>> round(d.cosine[0][1], 3), [round(x, 3) for x in d.distance], len(d.issues)
        (0.0, [1.0, 1.0], 2)
    """
    # distances do not depend on the order: it matters only through last=
    chosen = select_members(members, last=last, order=order, weights=np.ones)
    with open_members(chosen, format=format, key=key, strip_prefix=strip_prefix) as sources:
        labels = [s.label for s in sources]
        infos = check_members(sources)
        n = len(sources)
        gram = np.zeros((n, n), np.float64)
        block = np.empty((n, min(CHUNK, max([1, *(i.size for i in infos)]))), np.float64)
        for info in infos:
            if not is_float(info.dtype) or not info.size:
                continue
            flats = [np.asarray(s.read(info.name)).reshape(-1) for s in sources]
            totals = [0.0] * n
            for a, b in chunks(info.size):
                x = block[:, : b - a]
                for i, f in enumerate(flats):
                    np.copyto(x[i], f[a:b], casting="unsafe")
                    totals[i] += probe(x[i])
                gram += x @ x.T
            for label, total, f in zip(labels, totals, flats):
                check_finite(total, f, label=label, name=info.name)
            del flats
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    mean_sq = gram.sum() / n**2
    dist_sq = np.diag(gram) - 2.0 * gram.sum(axis=1) / n + mean_sq
    distance = np.sqrt(np.maximum(dist_sq, 0.0)) / max(math.sqrt(max(mean_sq, 0.0)), 1e-300)
    denom = np.outer(norms, norms)
    cosine = np.divide(gram, denom, out=np.ones_like(gram), where=denom > 0)
    issues: list[str] = []
    if n >= 2:
        low = [(cosine[i, j], i, j) for i in range(n) for j in range(i + 1, n) if cosine[i, j] < min_cosine]
        if low:
            c, i, j = min(low)
            issues.append(f"{len(low)} member pair(s) have cosine similarity below {min_cosine}; lowest "
                          f"{c:.3f} between {labels[i]} and {labels[j]}: they look like different runs "
                          "or basins, whose average usually fails")
        far = sorted(np.flatnonzero(distance > max_distance), key=lambda i: -distance[i])
        if far:
            shown = ", ".join(f"{labels[i]} ({distance[i]:.2f})" for i in far[:5]) + (" ..." if len(far) > 5 else "")
            issues.append(f"{len(far)} member(s) lie farther than {max_distance}× the mean's norm from the "
                          f"mean: {shown}; they look like different runs or much earlier checkpoints")
    if results is not None and metric is not None:
        issues += check_results(results, metric, split=split, mode=mode)
    if warn:
        for msg in issues:
            warnings.warn(msg, AveragingWarning, stacklevel=2)
    return Diagnosis(members=labels, distance=distance.tolist(), cosine=cosine.tolist(),
                     norms=norms.tolist(), issues=issues)
