"""Reports of a sweep: a terminal table, JSON and CSV files, PNG figures.

matplotlib is imported inside the figure functions only (``pip install polyak[plot]``),
through its object API (``matplotlib.figure.Figure`` with the Agg canvas), so no global
pyplot state or GUI backend is touched. Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._atomic import atomic_write_bytes
from .._errors import ConfigError
from .metrics import mode_sign

if TYPE_CHECKING:
    from .results import PosthocSweepResults, SweepResults, SweepRow

__all__ = ["format_posthoc_table", "format_table", "plot_alphas", "plot_posthoc", "plot_sweep", "sigma_axis", "write_csv",
           "write_json"]

_BOLD, _RESET = "\033[1m", "\033[0m"


def _columns(results: SweepResults) -> list[tuple[str, list[SweepRow]]]:
    cols: list[tuple[str, list[SweepRow]]] = []
    singles = results.select_rows(kind="single")
    if singles:
        cols.append(("single", singles))
    for scheme, alpha in results.curves():
        rows = [r for r in results.select_rows(kind="average", scheme=scheme) if r.alpha == alpha]
        cols.append((rows[0].name, rows))
    ens = results.select_rows(kind="prediction_ensemble")
    if ens:
        cols.append(("prediction_ensemble", ens))
    return cols


def format_table(
    results: SweepResults,
    metric: str,
    split: str | None = None,
    *,
    mode: str = "max",
    color: bool | None = None,
) -> str:
    """A table of ``metric`` on ``split``: one row per n, one column per scheme.

    The ``single`` column holds the n-th newest member alone; the best value of each
    column is marked with ``*`` (and bold on a terminal).

    Args:
        results: Sweep results.
        metric: The metric shown.
        split: The split shown (default: the first).
        mode: ``"max"`` or ``"min"``: which value is best.
        color: Bold the best values; default: when stdout is a terminal.
    """
    sign = mode_sign(mode)
    split = split or results.splits[0]
    results.check_metric(metric, split)
    if color is None:
        color = bool(getattr(sys.stdout, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ
    cols = _columns(results)
    ns = sorted({r.n for _, rows in cols for r in rows})
    cells: dict[tuple[str, int], str] = {}
    for name, rows in cols:
        vals = [r.value(metric, split) for r in rows]
        finite = [v for v in vals if not math.isnan(v)]
        best = max(finite, key=lambda v: sign * v) if finite else math.nan
        for r, v in zip(rows, vals, strict=True):
            text = f"{v:.4f}" + ("*" if v == best else " ")
            cells[(name, r.n)] = f"{_BOLD}{text}{_RESET}" if (color and v == best) else text
    widths = [max(len(name), 8) for name, _ in cols]
    head = f"{'n':>4}  " + "  ".join(f"{name:>{w}}" for (name, _), w in zip(cols, widths, strict=True))
    lines = [f"{split} {metric} ({'higher' if sign > 0 else 'lower'} is better; * best per column)", head]
    for n in ns:
        parts = []
        for (name, _), w in zip(cols, widths, strict=True):
            cell = cells.get((name, n), "-")
            pad = w + (len(cell) - len(cell.replace(_BOLD, "").replace(_RESET, "")))
            parts.append(f"{cell:>{pad}}")
        lines.append(f"{n:>4}  " + "  ".join(parts))
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(results: SweepResults, path: str | os.PathLike[str], *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the results (and ``extra`` entries, e.g. a selection) as JSON; NaN becomes null."""
    data = results.to_dict()
    data.update(extra or {})
    text = json.dumps(_jsonable(data), indent=2, ensure_ascii=False) + "\n"
    return atomic_write_bytes(path, text.encode())


def write_csv(results: SweepResults, path: str | os.PathLike[str]) -> Path:
    """Write one line per row: kind, scheme, alpha, n, member, seconds, then ``split/metric`` columns."""
    keys = [(s, m) for s in results.splits for m in results.metric_names(s)]
    # Post-hoc EMA rows carry their width; plain sweeps keep their columns.
    widths = any(r.sigma_rel is not None for r in results.rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "scheme", "alpha", *(["sigma_rel"] if widths else []), "n", "member", "seconds",
                *(f"{s}/{m}" for s, m in keys)])
    for r in results.rows:
        vals = [r.value(m, s) for s, m in keys]
        width = ["" if r.sigma_rel is None else repr(r.sigma_rel)] if widths else []
        w.writerow([r.kind, r.scheme or "", "" if r.alpha is None else f"{r.alpha:g}", *width, r.n, r.member or "",
                    f"{r.seconds:.6f}", *("" if math.isnan(v) else repr(v) for v in vals)])
    return atomic_write_bytes(path, buf.getvalue().encode())


def _figure(ncols: int) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("figures need matplotlib: pip install 'polyak[plot]'") from None
    fig = Figure(figsize=(4.2 * ncols, 3.6), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False, sharey=True)[0]
    return fig, axes


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())


def _singles(ax: Any, results: SweepResults, metric: str, split: str) -> None:
    rows = results.select_rows(kind="single")
    if rows:
        ax.plot([r.n for r in rows], [r.value(metric, split) for r in rows], "o", color="tab:blue",
                label="n-th newest member alone")


def plot_sweep(results: SweepResults, path: str | os.PathLike[str], metric: str, split: str | None = None) -> Path:
    """The tutorial's figure, one panel per scheme: blue dots, each member alone (at its
    position from the newest); orange line, the average of the newest n members (one line
    per alpha for several decay rates); green dashes, the prediction ensemble."""
    split = split or results.splits[0]
    results.check_metric(metric, split)
    schemes = list(dict.fromkeys(s for s, _ in results.curves()))
    if not schemes:
        raise ConfigError("the results hold no averages to plot")
    fig, axes = _figure(len(schemes))
    ens = results.select_rows(kind="prediction_ensemble")
    for ax, scheme in zip(axes, schemes, strict=False):
        _singles(ax, results, metric, split)
        alphas = [a for s, a in results.curves() if s == scheme]
        for k, alpha in enumerate(alphas):
            rows = [r for r in results.select_rows(kind="average", scheme=scheme) if r.alpha == alpha]
            color = "tab:orange" if k == 0 else f"C{(k + 2) % 10}"
            label = "average of the newest n" + ("" if alpha is None else f", alpha = {alpha:g}")
            ax.plot([r.n for r in rows], [r.value(metric, split) for r in rows], "-", color=color, label=label)
        if ens:
            ax.plot([r.n for r in ens], [r.value(metric, split) for r in ens], "--", color="tab:green",
                    label="prediction ensemble")
        ax.set_title(scheme)
        ax.set_xlabel("n (newest members)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel(f"{split} {metric}")
    return _save(fig, path)


def plot_alphas(results: SweepResults, path: str | os.PathLike[str], metric: str, split: str | None = None) -> Path:
    """Exponential averages: x = n, one line per decay rate alpha; blue dots, members alone."""
    split = split or results.splits[0]
    results.check_metric(metric, split)
    alphas = [a for s, a in results.curves() if s == "exponential" and a is not None]
    if not alphas:
        raise ConfigError("the results hold no exponential averages; sweep scheme 'exponential'")
    fig, axes = _figure(1)
    ax = axes[0]
    _singles(ax, results, metric, split)
    for k, alpha in enumerate(alphas):
        rows = results.select_rows(kind="average", scheme="exponential", alpha=alpha)
        ax.plot([r.n for r in rows], [r.value(metric, split) for r in rows], "-", color=f"C{(k + 1) % 10}",
                label=f"alpha = {alpha:g}")
    ax.set_title("exponential weights: decay rate alpha")
    ax.set_xlabel("n (newest members)")
    ax.set_ylabel(f"{split} {metric}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return _save(fig, path)


def format_posthoc_table(results: PosthocSweepResults, metric: str, *, mode: str = "max",
                         color: bool | None = None) -> str:
    """A table of a post-hoc EMA sweep: one line per width (``T`` marks a tracked snapshot),
    ``metric`` on every split, and the profile residual of each rebuilt width; the best
    value of each split is marked with ``*`` (and bold on a terminal)."""
    sign = mode_sign(mode)
    splits = [s for s in results.splits if metric in results.metric_names(s)]
    if not splits:
        results.check_metric(metric, results.splits[0] if results.splits else "validation")
    if color is None:
        color = bool(getattr(sys.stdout, "isatty", lambda: False)()) and "NO_COLOR" not in os.environ
    rows = sorted((r for r in results.rows if r.kind in ("posthoc", "tracked") and r.sigma_rel is not None),
                  key=lambda r: (r.sigma_rel, r.kind != "tracked"))
    best = {}
    for split in splits:
        vals = [r.value(metric, split) for r in rows if not math.isnan(r.value(metric, split))]
        best[split] = max(vals, key=lambda v: sign * v) if vals else math.nan
    widths = [max(len(s), 9) for s in splits]
    lines = [f"post-hoc EMA at step {results.step} from {len(results.members)} snapshots: {metric} "
             f"({'higher' if sign > 0 else 'lower'} is better; * best per column; T = a tracked snapshot itself)",
             f"{'sigma_rel':>9}  {'residual':>8}  " + "  ".join(f"{s:>{w}}" for s, w in zip(splits, widths, strict=True))]
    for r in rows:
        res = "" if r.kind == "tracked" else f"{results.residual(r.sigma_rel or 0.0):.1e}"
        label = f"{r.sigma_rel:g}" + (" T" if r.kind == "tracked" else "  ")
        cells = []
        for split, w in zip(splits, widths, strict=True):
            v = r.value(metric, split)
            text = "-" if math.isnan(v) else f"{v:.4f}" + ("*" if v == best[split] else " ")
            pad = w
            if color and v == best[split]:
                text = f"{_BOLD}{text}{_RESET}"
                pad += len(_BOLD) + len(_RESET)
            cells.append(f"{text:>{pad}}")
        lines.append(f"{label:>9}  {res:>8}  " + "  ".join(cells))
    return "\n".join(lines)


def sigma_axis(ax: Any, widths: list[float]) -> None:
    """A log axis of EMA widths labelled in plain numbers (0.02, 0.05, 0.1, 0.2)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ticks = [v for v in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3) if min(widths) <= v <= max(widths)]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_posthoc(results: PosthocSweepResults, path: str | os.PathLike[str], metric: str,
                 split: str | None = None) -> Path:
    """The metric of each rebuilt EMA against its width ``σ_rel`` (log axis), one line per
    split (``split`` first and solid), the tracked snapshots as large markers."""
    splits = [s for s in results.splits if metric in results.metric_names(s)]
    if split is not None:
        results.check_metric(metric, split)
        splits = [split, *(s for s in splits if s != split)]
    if not splits:
        raise ConfigError(f"no split has the metric {metric!r}")
    rebuilt = results.select_rows(kind="posthoc")
    if not rebuilt:
        raise ConfigError("the results hold no rebuilt post-hoc EMAs to plot")
    rebuilt = sorted(rebuilt, key=lambda r: r.sigma_rel or 0.0)
    tracked = results.select_rows(kind="tracked")
    fig, axes = _figure(1)
    ax = axes[0]
    for k, s in enumerate(splits):
        xs = [r.sigma_rel for r in rebuilt]
        ax.plot(xs, [r.value(metric, s) for r in rebuilt], "-" if k == 0 else "--", marker=".", color=f"C{k}",
                label=f"{s}: rebuilt EMA")
        if tracked:
            ax.plot([r.sigma_rel for r in tracked], [r.value(metric, s) for r in tracked], "D", color=f"C{k}",
                    markersize=8, markerfacecolor="none", label=f"{s}: tracked snapshot")
    sigma_axis(ax, [r.sigma_rel or 0.0 for r in rebuilt])
    ax.set_xlabel("sigma_rel (EMA width relative to the training length)")
    ax.set_ylabel(metric)
    ax.set_title(f"post-hoc EMA at step {results.step}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small")
    return _save(fig, path)
