"""What a sweep measured: one row per evaluated model, and helpers to read the rows.

Each row's metrics are ``{split: {metric: number}}`` (see :mod:`.metrics`). The reports
(table, JSON, CSV, figures) are rendered by :mod:`.report`, which reads these rows and
never imports this module at run time; the methods here only hand ``self`` to it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from .metrics import mode_sign
from .report import (
    format_posthoc_table,
    format_table,
    plot_alphas,
    plot_posthoc,
    plot_sweep,
    write_csv,
    write_json,
)

__all__ = ["KINDS", "PosthocSweepResults", "SweepResults", "SweepRow"]

#: Row kinds: an average of the newest n members, one member alone, the average of the
#: predictions of the newest n members; a post-hoc EMA rebuilt from snapshots, and a
#: tracked snapshot itself (:func:`polyak.posthoc_sweep`).
KINDS = ("average", "single", "prediction_ensemble", "posthoc", "tracked")


@dataclass(frozen=True)
class SweepRow:
    """One evaluated model of a sweep: what it was (kind, n, scheme...) and its metrics per split.

    Attributes:
        kind: ``"average"``, ``"single"``, ``"prediction_ensemble"``, ``"posthoc"`` or
            ``"tracked"``.
        n: For averages and prediction ensembles, how many of the newest members were
            combined. For a single member, its position counted from the newest (1 = the
            newest), which is where the tutorial's plots put it. For post-hoc EMAs, the
            number of snapshots combined; 1 for a tracked snapshot.
        scheme: The weighting scheme of an average (``None`` otherwise).
        alpha: The decay rate of an exponential average (``None`` otherwise).
        member: The label (file) of a single member or tracked snapshot (``None`` otherwise).
        metrics: ``{split: {metric: value}}``.
        seconds: Time spent in evaluate (and predict/score) for this row.
        sigma_rel: The EMA width of a post-hoc or tracked row (``None`` otherwise).

    Example:
        >>> from polyak import SweepRow
        >>> row = SweepRow("average", 3, {"validation": {"acc": 0.8}}, scheme="exponential", alpha=2.0)
        >>> row.name, row.value("acc", "validation"), row.value("acc", "test")
        ('exponential(alpha=2)', 0.8, nan)
    """

    kind: str
    n: int
    metrics: Mapping[str, Mapping[str, float]]
    scheme: str | None = None
    alpha: float | None = None
    member: str | None = None
    seconds: float = 0.0
    sigma_rel: float | None = None

    @property
    def name(self) -> str:
        """``"equal"``, ``"exponential(alpha=2)"``, ``"single"``, ``"prediction_ensemble"``,
        ``"posthoc(sigma_rel=0.08)"`` or ``"tracked(sigma_rel=0.1)"``."""
        if self.sigma_rel is not None:
            return f"{self.kind}(sigma_rel={self.sigma_rel:g})"
        if self.kind != "average":
            return self.kind
        if self.alpha is not None:
            return f"{self.scheme}(alpha={self.alpha:g})"
        return str(self.scheme)

    def value(self, metric: str, split: str) -> float:
        """The value of ``metric`` on ``split`` (NaN when this row lacks it)."""
        return float(self.metrics.get(split, {}).get(metric, math.nan))

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-able dict (its fields; ``sigma_rel`` only when set)."""
        out = {
            "kind": self.kind,
            "n": self.n,
            "scheme": self.scheme,
            "alpha": self.alpha,
            "member": self.member,
            "metrics": {s: dict(m) for s, m in self.metrics.items()},
            "seconds": self.seconds,
        }
        if self.sigma_rel is not None:
            out["sigma_rel"] = self.sigma_rel
        return out


@dataclass
class SweepResults:
    """Everything a :func:`polyak.sweep` measured: one row per evaluated model, with readers and reports.

    Choose from it with :func:`polyak.select` (on validation data, reported on test
    data); print :meth:`table`, save :meth:`to_json`/:meth:`to_csv` (read back with
    :meth:`from_dict`), draw :meth:`plot`.

    Attributes:
        rows: One :class:`SweepRow` per evaluated model, in evaluation order.
        members: The member labels, oldest → newest.
        schemes: The schemes swept.
        alphas: The exponential decay rates swept.
        seconds: Total wall time of the sweep.
        notes: Diagnostic messages gathered while sweeping.

    Example:
        >>> import numpy as np, polyak
        >>> members = [{"w": np.array([float(i)])} for i in range(4)]  # the newest is w = 3
        >>> evaluate = lambda state: {"validation": {"err": abs(float(state["w"][0]) - 2.0)}}
        >>> res = polyak.sweep(members, evaluate, schemes=["equal", "linear"])
        >>> res
        <SweepResults: 4 members, 12 rows, splits ['validation']>
        >>> print(res.table("err", mode="min", color=False))
        validation err (lower is better; * best per column)
           n    single     equal    linear
           1   1.0000    1.0000    1.0000
           2   0.0000*   0.5000    0.6667
           3   1.0000    0.0000*   0.3333
           4   2.0000    0.5000    0.0000*
        >>> best = res.best("err", "validation", mode="min")
        >>> best.name, best.n, res.curves()
        ('equal', 3, [('equal', None), ('linear', None)])
    """

    rows: list[SweepRow]
    members: list[str]
    schemes: tuple[str, ...] = ()
    alphas: tuple[float, ...] = ()
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def splits(self) -> list[str]:
        """Every split name seen, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.rows:
            for s in r.metrics:
                seen.setdefault(s, None)
        return list(seen)

    def metric_names(self, split: str | None = None) -> list[str]:
        """Every metric name seen (on ``split``, or on any split), in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.rows:
            for s, m in r.metrics.items():
                if split is None or s == split:
                    for k in m:
                        seen.setdefault(k, None)
        return list(seen)

    def check_metric(self, metric: str, split: str) -> None:
        """Check that the results hold ``metric`` on ``split``.

        Raises:
            ConfigError: They do not; the message names the splits, or the metrics of
                ``split``, that exist.
        """
        if split not in self.splits:
            raise ConfigError(
                f"no split {split!r} in the results; they have {self.splits}. Return "
                "{'validation': {...}, 'test': {...}} from evaluate to measure several splits"
            )
        if metric not in self.metric_names(split):
            raise ConfigError(
                f"no metric {metric!r} on split {split!r}; metrics there: {self.metric_names(split)}"
            )

    def select_rows(self, *, kind: str | None = None, scheme: str | None = None, alpha: float | None = None) -> list[SweepRow]:
        """Rows of one kind (and scheme/alpha for averages), sorted by n."""
        out = [
            r
            for r in self.rows
            if (kind is None or r.kind == kind)
            and (scheme is None or r.scheme == scheme)
            and (alpha is None or (r.alpha is not None and math.isclose(r.alpha, alpha)))
        ]
        return sorted(out, key=lambda r: r.n)

    def curves(self) -> list[tuple[str, float | None]]:
        """The ``(scheme, alpha)`` of every average curve, in sweep order."""
        seen: dict[tuple[str, float | None], None] = {}
        for r in self.rows:
            if r.kind == "average" and r.scheme is not None:
                seen.setdefault((r.scheme, r.alpha), None)
        return list(seen)

    def best(self, metric: str, split: str, *, mode: str = "max", kinds: Sequence[str] = ("average",)) -> SweepRow:
        """The row with the best ``metric`` on ``split`` (ties: the smallest n, then sweep order).

        Args:
            metric: The metric to compare.
            split: The split to compare it on.
            mode: ``"max"`` (higher is better) or ``"min"``.
            kinds: Which kinds of rows compete (default: averages only).

        Raises:
            ConfigError: ``metric`` is not on ``split``, ``mode`` is neither ``"max"`` nor
                ``"min"``, or no row of ``kinds`` has the metric.
        """
        self.check_metric(metric, split)
        sign = mode_sign(mode)
        rows = [r for r in self.rows if r.kind in kinds and not math.isnan(r.value(metric, split))]
        if not rows:
            raise ConfigError(f"no {'/'.join(kinds)} rows have {split}/{metric}")
        return max(rows, key=lambda r: (sign * r.value(metric, split), -r.n))

    def to_dict(self) -> dict[str, Any]:
        """The results as a JSON-able dict (``members``, ``schemes``, ``alphas``, ``seconds``,
        ``notes``, ``rows``); :meth:`from_dict` reads it back."""
        return {
            "members": list(self.members),
            "schemes": list(self.schemes),
            "alphas": list(self.alphas),
            "seconds": self.seconds,
            "notes": list(self.notes),
            "rows": [r.to_dict() for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepResults:
        """Rebuild results saved with :meth:`to_dict` (e.g. read back from ``results.json``)."""
        rows = [
            SweepRow(
                kind=r["kind"],
                n=int(r["n"]),
                metrics={s: {k: float(v) for k, v in m.items()} for s, m in r["metrics"].items()},
                scheme=r.get("scheme"),
                alpha=None if r.get("alpha") is None else float(r["alpha"]),
                member=r.get("member"),
                seconds=float(r.get("seconds", 0.0)),
                sigma_rel=None if r.get("sigma_rel") is None else float(r["sigma_rel"]),
            )
            for r in data["rows"]
        ]
        return cls(
            rows=rows,
            members=list(data.get("members", [])),
            schemes=tuple(data.get("schemes", ())),
            alphas=tuple(float(a) for a in data.get("alphas", ())),
            seconds=float(data.get("seconds", 0.0)),
            notes=list(data.get("notes", [])),
        )

    def table(self, metric: str, split: str | None = None, *, mode: str = "max", color: bool | None = None) -> str:
        """A text table of ``metric`` (see :func:`polyak._choose.report.format_table`)."""
        return format_table(self, metric, split, mode=mode, color=color)

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the results as JSON (atomically); read back with :meth:`from_dict`."""
        return write_json(self, path)

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write one CSV line per row with ``split/metric`` columns (atomically)."""
        return write_csv(self, path)

    def plot(self, path: str | os.PathLike[str], metric: str, split: str | None = None) -> Path:
        """The tutorial's figure as PNG: members alone (dots), averages of the newest n (lines)."""
        return plot_sweep(self, path, metric, split)

    def plot_alphas(self, path: str | os.PathLike[str], metric: str, split: str | None = None) -> Path:
        """Exponential averages, one line per decay rate alpha, as PNG."""
        return plot_alphas(self, path, metric, split)

    def __repr__(self) -> str:
        return f"<SweepResults: {len(self.members)} members, {len(self.rows)} rows, splits {self.splits}>"


@dataclass
class PosthocSweepResults(SweepResults):
    """What :func:`polyak.posthoc_sweep` measured: one row per rebuilt EMA width, and the fits.

    Rows are of kind ``"posthoc"`` (one per rebuilt width) and ``"tracked"`` (the stored
    snapshots themselves), each with its ``sigma_rel``. :func:`polyak.select` chooses
    among them; :meth:`table` has one line per width.

    Attributes:
        step: The training step the EMAs were rebuilt at.
        tracked: The tracked widths (those the snapshots hold).
        fits: Per rebuilt width: ``{"sigma_rel", "gamma", "t", "residual", "raw_sum",
            "coefficients"}`` (one signed coefficient per member, oldest → newest).

    Example:
        >>> from polyak import PosthocSweepResults, SweepRow, select
        >>> rows = [SweepRow("posthoc", 4, {"validation": {"acc": v}, "test": {"acc": t}}, sigma_rel=s)
        ...         for s, v, t in [(0.05, 0.80, 0.79), (0.08, 0.83, 0.81), (0.12, 0.82, 0.82)]]
        >>> res = PosthocSweepResults(rows, ["a", "b", "c", "d"], step=400, tracked=(0.05, 0.10))
        >>> print(select(res, "acc"))
        chose posthoc(sigma_rel=0.08) on validation acc 0.83; test acc 0.81
        >>> PosthocSweepResults.from_dict(res.to_dict()) == res
        True

        :func:`polyak.posthoc_sweep` shows a sweep of real snapshots.
    """

    step: int = 0
    tracked: tuple[float, ...] = ()
    fits: list[dict[str, Any]] = field(default_factory=list)

    def residual(self, sigma_rel: float) -> float:
        """The profile residual of the rebuilt width ``sigma_rel`` (NaN if not rebuilt)."""
        for f in self.fits:
            if math.isclose(f["sigma_rel"], sigma_rel, rel_tol=1e-9):
                return float(f["residual"])
        return math.nan

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`SweepResults.to_dict`, plus ``"posthoc"``: ``step``, ``tracked`` and ``fits``."""
        data = super().to_dict()
        data["posthoc"] = {"step": self.step, "tracked": list(self.tracked), "fits": list(self.fits)}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PosthocSweepResults:
        base = SweepResults.from_dict(data)
        extra = data.get("posthoc") or {}
        return cls(rows=base.rows, members=base.members, seconds=base.seconds, notes=base.notes,
                   step=int(extra.get("step", 0)), tracked=tuple(float(s) for s in extra.get("tracked", ())),
                   fits=list(extra.get("fits", [])))

    def table(self, metric: str, split: str | None = None, *, mode: str = "max", color: bool | None = None) -> str:
        """One line per width: the metric on every split, the profile residual (``split``
        is ignored: every split is shown)."""
        return format_posthoc_table(self, metric, mode=mode, color=color)

    def plot(self, path: str | os.PathLike[str], metric: str, split: str | None = None) -> Path:
        """The metric against ``σ_rel`` (every split; tracked widths marked), as PNG."""
        return plot_posthoc(self, path, metric, split)

    def __repr__(self) -> str:
        return (f"<PosthocSweepResults: step {self.step}, {len(self.members)} snapshots, "
                f"{len(self.select_rows(kind='posthoc'))} widths, splits {self.splits}>")
