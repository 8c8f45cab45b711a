"""Choosing an average: selection on validation data, and greedy soups.

Choosing the best of many averages on the data you then report overstates how good the
choice is (the tutorial picked n on its test set). :func:`select` chooses on one split and
reports another; :func:`greedy_soup` builds a soup member by member on validation data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._dtypes import accumulator_dtype, is_float
from .._engine.members import MemberLike, check_members, open_members, select_members
from .._errors import ConfigError, PolyakWarning
from .._progress import Progress
from ..formats import TensorInfo, TensorSource
from .metrics import mode_sign, normalize_metrics
from .results import SweepResults, SweepRow
from .sweep import CHUNK, Evaluate

__all__ = ["Selection", "SelectionBiasWarning", "SoupResult", "greedy_soup", "select"]


class SelectionBiasWarning(PolyakWarning):
    """The same data is used to choose a model and to report its score."""


@dataclass(frozen=True)
class Selection:
    """The average chosen on one split, with its score on another.

    Attributes:
        row: The chosen :class:`SweepRow` (scheme, n, alpha, all its metrics).
        metric: The metric compared.
        on: The split the choice was made on.
        report: The split reported (``None``: none).
        mode: ``"max"`` or ``"min"``.
        selected: The chosen row's ``metric`` on ``on``.
        reported: The chosen row's ``metric`` on ``report`` — the number to publish.
        last_checkpoint: The newest member alone on ``report`` (NaN when not measured).
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
        return self.row.scheme

    @property
    def n(self) -> int:
        return self.row.n

    @property
    def alpha(self) -> float | None:
        return self.row.alpha

    def __str__(self) -> str:
        text = f"chose {self.row.name}, n={self.n} on {self.on} {self.metric} {self.selected:.4g}"
        if self.report is not None:
            text += f"; {self.report} {self.metric} {self.reported:.4g}"
            if not math.isnan(self.last_checkpoint):
                text += f" (newest checkpoint alone: {self.last_checkpoint:.4g})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.row.kind, "scheme": self.scheme, "n": self.n, "alpha": self.alpha,
            "metric": self.metric, "on": self.on, "report": self.report, "mode": self.mode,
            "selected": self.selected, "reported": self.reported, "last_checkpoint": self.last_checkpoint,
        }


def select(
    results: SweepResults,
    metric: str,
    *,
    on: str = "validation",
    report: str | None = "test",
    mode: str = "max",
    kinds: Sequence[str] = ("average",),
) -> Selection:
    """Choose (scheme, n, alpha) on the ``on`` split and report only that choice on ``report``.

    Args:
        results: What :func:`polyak.sweep` measured.
        metric: The metric to compare, e.g. ``"accuracy"``.
        on: The split to choose on (validation data).
        report: The split whose score of the chosen model is reported (test data), or
            ``None``.
        mode: ``"max"`` (higher is better) or ``"min"`` (lower is better, e.g. loss).
        kinds: Which rows compete: ``"average"`` (default), also ``"single"`` and
            ``"prediction_ensemble"``.

    Returns:
        A :class:`Selection`. Ties go to the smallest n.

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
    """
    mode_sign(mode)
    if on not in results.splits:
        raise ConfigError(
            f"no split {on!r} to select on; the results have {results.splits}. Return "
            "{'validation': {...}, 'test': {...}} from evaluate, or pass on= and report= "
            "explicitly (selecting and reporting on the same split is biased)"
        )
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
    """A greedy soup.

    Attributes:
        members: Labels of the members in the soup, in the order they were added.
        indices: Their positions in the ordered member list (0 = oldest).
        state: The soup's weights (fresh arrays; integer tensors from its newest member).
        score: The soup's ``metric`` on ``on``.
        metrics: All metrics of the soup (every split evaluate returned).
        individual: Each member's ``metric`` on ``on``, oldest → newest.
        history: ``(label, score of the soup with it, accepted)`` for each candidate tried.
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

    def candidate(self, src: TensorSource) -> None:
        """``cand = sum + x``; ``out = cand / (count + 1)``."""
        scale = 1.0 / (self.count + 1)
        for info in self.infos:
            if info.name not in self.sum:
                continue
            x = np.asarray(src.read(info.name)).reshape(-1)
            s, c, o = self.sum[info.name], self.cand[info.name], self.out[info.name].reshape(-1)
            for a in range(0, info.size, CHUNK):
                b = min(a + CHUNK, info.size)
                np.add(s[a:b], x[a:b], out=c[a:b], casting="unsafe")
                np.copyto(o[a:b], c[a:b] * c.dtype.type(scale), casting="unsafe")

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
    mode: str = "max",
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
        evaluate: See :class:`polyak.sweep`'s ``evaluate``; must measure the split ``on``.
        metric: The metric to compare.
        on: The split to choose on (default ``"validation"``).
        mode: ``"max"`` or ``"min"``.
        results: A sweep of the same members with ``"single"`` rows, to skip re-evaluating
            each member alone.
        format, key, strip_prefix, order, last: As in :func:`polyak.average`.
        progress: Show a progress bar on stderr.

    Returns:
        A :class:`SoupResult`.

    Raises:
        ConfigError: ``evaluate`` does not return ``metric`` on ``on``.

    References:
        Wortsman et al. 2022, "Model soups", arXiv:2203.05482 (greedy soup, Recipe 1).
    """
    sign = mode_sign(mode)
    chosen = select_members(members, last=last, order=order)

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
