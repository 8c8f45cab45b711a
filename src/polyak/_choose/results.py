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
from .report import format_table, plot_alphas, plot_sweep, write_csv, write_json

__all__ = ["KINDS", "SweepResults", "SweepRow"]

#: Row kinds: an average of the newest n members, one member alone, or the average of
#: the predictions of the newest n members.
KINDS = ("average", "single", "prediction_ensemble")


@dataclass(frozen=True)
class SweepRow:
    """One evaluated model.

    Attributes:
        kind: ``"average"``, ``"single"`` or ``"prediction_ensemble"``.
        n: For averages and prediction ensembles, how many of the newest members were
            combined. For a single member, its position counted from the newest (1 = the
            newest), which is where the tutorial's plots put it.
        scheme: The weighting scheme of an average (``None`` otherwise).
        alpha: The decay rate of an exponential average (``None`` otherwise).
        member: The label (file) of a single member (``None`` otherwise).
        metrics: ``{split: {metric: value}}``.
        seconds: Time spent in evaluate (and predict/score) for this row.
    """

    kind: str
    n: int
    metrics: Mapping[str, Mapping[str, float]]
    scheme: str | None = None
    alpha: float | None = None
    member: str | None = None
    seconds: float = 0.0

    @property
    def name(self) -> str:
        """``"equal"``, ``"exponential(alpha=2)"``, ``"single"`` or ``"prediction_ensemble"``."""
        if self.kind != "average":
            return self.kind
        if self.alpha is not None:
            return f"{self.scheme}(alpha={self.alpha:g})"
        return str(self.scheme)

    def value(self, metric: str, split: str) -> float:
        """The value of ``metric`` on ``split`` (NaN when this row lacks it)."""
        return float(self.metrics.get(split, {}).get(metric, math.nan))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n": self.n,
            "scheme": self.scheme,
            "alpha": self.alpha,
            "member": self.member,
            "metrics": {s: dict(m) for s, m in self.metrics.items()},
            "seconds": self.seconds,
        }


@dataclass
class SweepResults:
    """Everything a :func:`polyak.sweep` measured.

    Attributes:
        rows: One :class:`SweepRow` per evaluated model, in evaluation order.
        members: The member labels, oldest → newest.
        schemes: The schemes swept.
        alphas: The exponential decay rates swept.
        seconds: Total wall time of the sweep.
        notes: Diagnostic messages gathered while sweeping.
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
        """Raise a :class:`ConfigError` naming what exists when ``metric``/``split`` does not."""
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
        """The row with the best ``metric`` on ``split`` (ties: the smallest n, then sweep order)."""
        self.check_metric(metric, split)
        sign = mode_sign(mode)
        rows = [r for r in self.rows if r.kind in kinds and not math.isnan(r.value(metric, split))]
        if not rows:
            raise ConfigError(f"no {'/'.join(kinds)} rows have {split}/{metric}")
        return max(rows, key=lambda r: (sign * r.value(metric, split), -r.n))

    def to_dict(self) -> dict[str, Any]:
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
