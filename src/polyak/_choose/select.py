"""Choosing an average: selection on validation data, and greedy soups.

Choosing the best of many averages on the data you then report overstates how good the
choice is (the tutorial picked n on its test set). :func:`select` chooses on one split and
reports another; :func:`greedy_soup` builds a soup member by member on validation data.
Both infer what is not given the same way for every caller (the command line included):
the metric is the first one evaluate returned, its direction comes from its name
(:func:`~polyak._choose.metrics.default_mode`), and ``on="auto"``/``report="auto"`` pick
the validation and test splits when the results have them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._dtypes import accumulator_dtype, is_float
from .._engine.kernel import CHUNK, member_chunks, scaled_copy
from .._engine.members import MemberLike, check_members, open_members, select_members
from .._errors import ConfigError, PolyakWarning
from .._progress import Progress
from ..formats import TensorInfo, TensorSource
from .metrics import default_mode, mode_sign, normalize_metrics
from .results import SweepResults, SweepRow
from .sweep import Evaluate

__all__ = ["Selection", "SelectionBiasWarning", "SoupResult", "greedy_soup", "select"]


class SelectionBiasWarning(PolyakWarning):
    """The same data is used to choose a model and to report its score."""


@dataclass(frozen=True)
class Selection:
    """The model :func:`polyak.select` chose on one split, with its score on another.

    Prints as one line (``chose equal, n=2 on validation acc 0.75; test acc 0.72``).

    Attributes:
        row: The chosen :class:`SweepRow` (scheme, n, alpha, all its metrics).
        metric: The metric compared.
        on: The split the choice was made on.
        report: The split reported (``None``: none).
        mode: ``"max"`` or ``"min"``.
        selected: The chosen row's ``metric`` on ``on``.
        reported: The chosen row's ``metric`` on ``report`` — the number to publish.
        last_checkpoint: The newest member alone on ``report`` (NaN when not measured).

    Example:
        >>> from polyak import SweepResults, SweepRow, select
        >>> rows = [SweepRow("average", n, {"validation": {"acc": v}, "test": {"acc": t}}, scheme="equal")
        ...         for n, v, t in [(1, 0.70, 0.71), (2, 0.75, 0.72), (3, 0.74, 0.76)]]
        >>> sel = select(SweepResults(rows, ["a", "b", "c"]), "acc")
        >>> sel.scheme, sel.n, sel.selected, sel.reported
        ('equal', 2, 0.75, 0.72)
    """

    row: SweepRow
    metric: str
    on: str
    report: str | None
    mode: str
    selected: float
    reported: float
    last_checkpoint: float

    @property
    def scheme(self) -> str | None:
        """The chosen average's weighting scheme (``None`` for other kinds of rows)."""
        return self.row.scheme

    @property
    def n(self) -> int:
        """How many of the newest members the chosen model combines (see :class:`SweepRow`)."""
        return self.row.n

    @property
    def alpha(self) -> float | None:
        """The chosen exponential average's decay rate (``None`` otherwise)."""
        return self.row.alpha

    @property
    def sigma_rel(self) -> float | None:
        """The chosen EMA width (post-hoc EMA sweeps; ``None`` otherwise)."""
        return self.row.sigma_rel

    def __str__(self) -> str:
        what = self.row.name if self.row.sigma_rel is not None else f"{self.row.name}, n={self.n}"
        text = f"chose {what} on {self.on} {self.metric} {self.selected:.4g}"
        if self.report is not None:
            text += f"; {self.report} {self.metric} {self.reported:.4g}"
            if not math.isnan(self.last_checkpoint):
                text += f" (newest checkpoint alone: {self.last_checkpoint:.4g})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The selection as a JSON-able dict (the chosen row's kind, scheme, n, alpha and
        sigma_rel, and the fields), as ``polyak sweep`` stores it in ``results.json``."""
        return {
            "kind": self.row.kind, "scheme": self.scheme, "n": self.n, "alpha": self.alpha, "sigma_rel": self.sigma_rel,
            "metric": self.metric, "on": self.on, "report": self.report, "mode": self.mode,
            "selected": self.selected, "reported": self.reported, "last_checkpoint": self.last_checkpoint,
        }


#: ``on=``/``report=`` value that lets :func:`select` choose the split.
AUTO = "auto"


def _splits(results: SweepResults, on: str, report: str | None) -> tuple[str, str | None]:
    splits = results.splits
    if not splits and AUTO in (on, report):
        raise ConfigError("the results hold no metrics: no split to select on")
    if on == AUTO:
        on = "validation" if "validation" in splits else splits[0]
    if report == AUTO:
        report = "test" if "test" in splits and on != "test" else None
    return on, report


def select(
    results: SweepResults,
    metric: str | None = None,
    *,
    on: str = "validation",
    report: str | None = "test",
    mode: str | None = None,
    kinds: Sequence[str] | None = None,
) -> Selection:
    """Choose (scheme, n, alpha) on the ``on`` split and report only that choice on ``report``.

    Args:
        results: What :func:`polyak.sweep` measured.
        metric: The metric to compare, e.g. ``"accuracy"``. Default: the first metric
            evaluate returned.
        on: The split to choose on (validation data). ``"auto"``: ``"validation"`` when
            the results have it, else their first split (then there is no unbiased
            report unless ``report`` names another split).
        report: The split whose score of the chosen model is reported (test data), or
            ``None``. ``"auto"``: ``"test"`` when the results have it and ``on`` is
            another split, else ``None``.
        mode: ``"max"`` (higher is better) or ``"min"`` (lower is better, e.g. loss).
            Default: ``"min"`` for names like loss/error/mse/perplexity, else ``"max"``.
        kinds: Which rows compete: ``"average"``, ``"single"``,
            ``"prediction_ensemble"``, ``"posthoc"``, ``"tracked"``. Default:
            ``("average",)``, or for a post-hoc EMA sweep (:func:`polyak.posthoc_sweep`)
            ``("posthoc", "tracked")``: every rebuilt width and the tracked ones.

    Returns:
        A :class:`Selection` (its ``metric``, ``on``, ``report`` and ``mode`` say what
        was inferred). Ties go to the smallest n.

    Raises:
        ConfigError: The split or metric is not in the results.

    Warns:
        SelectionBiasWarning: ``on`` equals ``report``: the reported score is optimistic.

    Example:
        >>> from polyak import SweepResults, SweepRow, select
        >>> rows = [SweepRow("average", n, {"validation": {"acc": v}, "test": {"acc": t}}, scheme="equal")
        ...         for n, v, t in [(1, 0.70, 0.71), (2, 0.75, 0.72), (3, 0.74, 0.76)]]
        >>> str(select(SweepResults(rows, ["a", "b", "c"]), "acc"))
        'chose equal, n=2 on validation acc 0.75; test acc 0.72'
        >>> select(SweepResults(rows, ["a", "b", "c"]), on="auto", report="auto").mode
        'max'
    """
    if mode is not None:
        mode_sign(mode)
    on, report = _splits(results, on, report)
    if on not in results.splits:
        raise ConfigError(
            f"no split {on!r} to select on; the results have {results.splits}. Return "
            "{'validation': {...}, 'test': {...}} from evaluate, or pass on= and report= "
            "explicitly (selecting and reporting on the same split is biased)"
        )
    metric = metric if metric is not None else results.metric_names()[0]
    mode = mode if mode is not None else default_mode(metric)
    results.check_metric(metric, on)
    if report is not None:
        results.check_metric(metric, report)
        if report == on:
            warnings.warn(
                f"selecting on {on!r} and reporting {report!r} uses the same data twice: the "
                "reported score is optimistic. Evaluate a separate validation split and select on it",
                SelectionBiasWarning,
                stacklevel=2,
            )
    if kinds is None:
        posthoc_only = not results.select_rows(kind="average") and results.select_rows(kind="posthoc")
        kinds = ("posthoc", "tracked") if posthoc_only else ("average",)
    row = results.best(metric, on, mode=mode, kinds=kinds)
    newest = [r for r in results.rows if r.kind == "single" and r.n == 1]
    last = newest[0].value(metric, report) if (newest and report is not None) else math.nan
    return Selection(
        row=row, metric=metric, on=on, report=report, mode=mode,
        selected=row.value(metric, on),
        reported=row.value(metric, report) if report is not None else math.nan,
        last_checkpoint=last,
    )


@dataclass
class SoupResult:
    """What :func:`polyak.greedy_soup` built: the members kept, the soup's weights and its scores.

    Attributes:
        members: Labels of the members in the soup, in the order they were added.
        indices: Their positions in the ordered member list (0 = oldest).
        state: The soup's weights (fresh arrays; integer tensors from its newest member).
        score: The soup's ``metric`` on ``on``.
        metrics: All metrics of the soup (every split evaluate returned).
        individual: Each member's ``metric`` on ``on``, oldest → newest.
        history: ``(label, score of the soup with it, accepted)`` for each candidate tried.

    Example:
        >>> import numpy as np, polyak
        >>> members = [{"w": np.array([w])} for w in (0.75, 1.5, 4.0, 1.125)]
        >>> soup = polyak.greedy_soup(members, lambda s: {"validation": {"err": abs(s["w"][0] - 1.0)}}, "err")
        >>> soup.members, soup.state["w"].tolist(), soup.score, soup.individual
        (['member 3', 'member 0'], [0.9375], 0.0625, [0.25, 0.5, 3.0, 0.125])
        >>> [(label, round(score, 4), kept) for label, score, kept in soup.history]
        [('member 3', 0.125, True), ('member 0', 0.0625, True), ('member 1', 0.125, False), ('member 2', 0.9583, False)]
    """

    members: list[str]
    indices: list[int]
    state: dict[str, np.ndarray]
    score: float
    metrics: Mapping[str, Mapping[str, float]]
    individual: list[float]
    history: list[tuple[str, float, bool]] = field(default_factory=list)


class _Pot:
    """The soup's running sum, a candidate sum and an output buffer (three model copies)."""

    def __init__(self, infos: Sequence[TensorInfo]) -> None:
        self.infos = list(infos)
        floats = [i for i in infos if is_float(i.dtype)]
        self.sum = {i.name: np.zeros(i.size, accumulator_dtype(i.dtype)) for i in floats}
        self.cand = {i.name: np.zeros(i.size, accumulator_dtype(i.dtype)) for i in floats}
        self.out = {i.name: np.zeros(i.shape, i.dtype) for i in floats}
        self.count = 0
        chunk = min(CHUNK, max([1, *(i.size for i in floats)]))
        dtypes = {accumulator_dtype(i.dtype) for i in floats}
        self._cast = {dt: np.empty(chunk, dt) for dt in dtypes}
        self._tmp = {dt: np.empty(chunk, dt) for dt in dtypes}

    def candidate(self, src: TensorSource) -> None:
        """``cand = sum + x``; ``out = cand / (count + 1)``.

        Raises:
            NonFiniteError: The member holds NaN/Inf (named with the tensor).
        """
        scale = 1.0 / (self.count + 1)
        for info in self.infos:
            if info.name not in self.sum:
                continue
            s, c, o = self.sum[info.name], self.cand[info.name], self.out[info.name].reshape(-1)
            tmp = self._tmp[c.dtype]
            for a, b, xs in member_chunks(src.read(info.name), c.dtype, self._cast[c.dtype], label=src.label, name=info.name):
                np.add(s[a:b], xs, out=c[a:b])
                scaled_copy(o[a:b], c[a:b], c.dtype.type(scale), tmp[: b - a])

    def accept(self) -> None:
        self.sum, self.cand = self.cand, self.sum
        self.count += 1

    def state(self, ints_from: TensorSource) -> dict[str, np.ndarray]:
        return {
            i.name: self.out[i.name] if i.name in self.out else np.array(ints_from.read(i.name), copy=True)
            for i in self.infos
        }


def greedy_soup(
    members: Sequence[MemberLike],
    evaluate: Evaluate,
    metric: str,
    *,
    on: str = "validation",
    mode: str | None = None,
    results: SweepResults | None = None,
    format: str | None = None,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    order: str = "number",
    last: int | None = None,
    progress: bool = False,
) -> SoupResult:
    """Greedy soup: add members best-first, keeping each only if the average improves.

    Members are ranked by their own ``metric`` on ``on`` (taken from ``results``' single
    rows when given, otherwise evaluated here); the soup starts with the best one, and each
    next member is kept only when the uniform average with it scores strictly better on
    ``on``. Select on validation data; report the soup's test score from ``metrics``.

    Args:
        members: Checkpoint paths or in-memory states.
        evaluate: ``evaluate(state) -> metrics``, as for :func:`polyak.sweep` (see
            :class:`polyak.Evaluate`); must measure ``metric`` on the split ``on``.
        metric: The metric to compare.
        on: The split to choose on (default ``"validation"``).
        mode: ``"max"`` or ``"min"``; default from the metric's name, as in :func:`select`.
        results: A sweep of the same members with ``"single"`` rows, to skip re-evaluating
            each member alone.
        format: Force the input format (as in :func:`polyak.average`).
        key: Key of the state dict inside nested ``.pt`` checkpoints.
        strip_prefix: Prefixes to remove from tensor names.
        order: How to order paths (as in :func:`polyak.average`).
        last: Use only the newest ``last`` members.
        progress: Show a progress bar on stderr.

    Returns:
        A :class:`SoupResult`.

    Raises:
        ConfigError: ``evaluate`` does not return ``metric`` on ``on``, or invalid options
            (``mode``, ``order``, ``last``).
        FormatError: An unreadable, corrupt or unsafe member.
        MismatchError: Members disagree on names, shapes or dtypes (all listed at once).
        NonFiniteError: A member holds NaN/Inf in a floating tensor.

    Example:
        >>> import numpy as np, polyak
        >>> members = [{"w": np.array([w])} for w in (0.75, 1.5, 4.0, 1.125)]
        >>> evaluate = lambda state: {"validation": {"err": abs(float(state["w"][0]) - 1.0)}}
        >>> soup = polyak.greedy_soup(members, evaluate, "err")  # err: lower is better
        >>> soup.members, soup.state["w"].tolist(), soup.score
        (['member 3', 'member 0'], [0.9375], 0.0625)

    References:
        Wortsman et al. 2022, "Model soups", arXiv:2203.05482 (greedy soup, Recipe 1).
    """
    sign = mode_sign(mode if mode is not None else default_mode(metric))
    # a soup's members get equal weights: their order matters only through last=
    chosen = select_members(members, last=last, order=order, weights=np.ones)

    def value(metrics: Mapping[str, Mapping[str, float]]) -> float:
        if on not in metrics or metric not in metrics[on]:
            have = {s: list(m) for s, m in metrics.items()}
            raise ConfigError(f"evaluate returned {have}; greedy_soup needs {metric!r} on split {on!r}")
        return float(metrics[on][metric])

    with open_members(chosen, format=format, key=key, strip_prefix=strip_prefix) as sources:
        labels = [s.label for s in sources]
        infos = check_members(sources)
        pot = _Pot(infos)
        known: dict[str, float] = {}
        if results is not None:
            known = {r.member: r.value(metric, on) for r in results.rows if r.kind == "single" and r.member}
        bar = Progress(2 * len(sources), "greedy soup", enabled=progress, unit="")
        try:
            individual = []
            for src in sources:
                if src.label in known and not math.isnan(known[src.label]):
                    individual.append(known[src.label])
                else:
                    pot.candidate(src)  # count is 0: out = the member itself
                    individual.append(value(normalize_metrics(evaluate(pot.state(src)))))
                bar.update()
            ranking = sorted(range(len(sources)), key=lambda i: (-sign * individual[i], -i))
            kept: list[int] = []
            history: list[tuple[str, float, bool]] = []
            best = -math.inf
            best_metrics: Mapping[str, Mapping[str, float]] = {}
            for i in ranking:
                pot.candidate(sources[i])
                metrics = normalize_metrics(evaluate(pot.state(sources[max([*kept, i])])))
                v = value(metrics)
                ok = not kept or sign * v > best
                history.append((labels[i], v, ok))
                if ok:
                    pot.accept()
                    kept.append(i)
                    best, best_metrics = sign * v, metrics
                bar.update()
        finally:
            bar.close()
        # Rebuild the soup's output from its sum (the buffer holds the last candidate).
        for info in infos:
            if info.name in pot.sum:
                np.copyto(pot.out[info.name].reshape(-1), pot.sum[info.name] / pot.count, casting="unsafe")
        state = {k: np.array(v, copy=True) for k, v in pot.state(sources[max(kept)]).items()}
    return SoupResult(
        members=[labels[i] for i in kept],
        indices=kept,
        state=state,
        score=sign * best,
        metrics=best_metrics,
        individual=individual,
        history=history,
    )
