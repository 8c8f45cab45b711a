"""What ``polyak demo`` prints and draws: the tutorial's lines, tables, PNG figures, JSON.

matplotlib is imported only here and only when a figure is drawn (Agg canvas, no pyplot
global state). Every file goes through polyak's atomic writes.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._atomic import atomic_write_bytes
from .._choose.report import sigma_axis

__all__ = ["figure_posthoc", "figure_repeats", "figure_scheme", "framework_label", "posthoc_text", "repetition_text",
           "summary_text", "write_json"]

Rep = dict[str, Any]


def framework_label(rep: Rep, *, reason: bool = True) -> str:
    """``"torch"``, or the Keras backend that ran: ``"keras on jax (set by KERAS_BACKEND)"``."""
    backend = rep.get("backend")
    if not backend:
        return str(rep["config"]["framework"])
    text = f"{rep['config']['framework']} on {backend['name']}"
    return f"{text} ({backend['reason']})" if reason else text


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=False) + "\n").encode())


def file_stem(label: str) -> str:
    """``"exponential(alpha=2)"`` → ``"exponential_alpha_2"``."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_").replace(".", "p")


def tutorial_lines(rep: Rep, label: str) -> list[str]:
    """The tutorial's printout: ``> n: single=<n-th newest member>, average=<newest n>``."""
    single = rep["single"][::-1]
    return [f"> {n}: single={single[n - 1]['holdout']:.3f}, average={row['holdout']:.3f}" for n, row in enumerate(rep["averages"][label], 1)]


def repetition_text(rep: Rep) -> str:
    """The report of one repetition."""
    cfg = rep["config"]
    epochs = rep["epochs"]
    m = len(epochs)
    labels = list(rep["averages"])
    lines = [
        f"{framework_label(rep)}, seed {rep['seed']}: {cfg['recipe']['epochs']} epochs, members = the models after "
        f"epochs {epochs[0]}..{epochs[-1]} (zero-based, as the tutorial)",
        f"final model (epoch {epochs[-1]}): train={rep['final']['train']:.3f}, held-out={rep['final']['holdout']:.3f}"
        "   (tutorial: ~0.86 and ~0.81)",
    ]
    for label in labels:
        lines += ["", f"{label}: single member n vs average of the newest n (accuracy, 1000 held-out rows)"]
        lines += tutorial_lines(rep, label)
    lines += ["", "held-out accuracy; row n: the n-th newest member and the average of the newest n"]
    head = f"{'n':>3} {'epoch':>5} {'single':>7} " + " ".join(f"{lab:>{max(len(lab), 7)}}" for lab in labels)
    lines.append(head)
    single = rep["single"][::-1]
    for n in range(1, m + 1):
        cells = " ".join(f"{rep['averages'][lab][n - 1]['holdout']:>{max(len(lab), 7)}.3f}" for lab in labels)
        lines.append(f"{n:>3} {epochs[-n]:>5} {single[n - 1]['holdout']:>7.3f} {cells}")
    spread = rep_spread(rep)
    lines.append(f"{'std':>9} {spread['single']:>7.4f} " + " ".join(f"{spread[lab]:>{max(len(lab), 7)}.4f}" for lab in labels))
    ch = rep["chosen"]
    lines += [
        "",
        "selection done right: choose on validation (held-out rows 0..499), score on test (rows 500..999)",
        f"  final model                      test={rep['final']['test']:.3f}",
        f"  single member chosen: epoch {ch['single']['epoch']:<4}  test={ch['single']['test']:.3f}   (validation {ch['single']['validation']:.3f})",
    ]
    for label, c in ch["per_scheme"].items():
        lines.append(f"  {label + ', n = ' + str(c['n']):<31}  test={c['test']:.3f}   (validation {c['validation']:.3f})")
    o = ch["overall"]
    lines.append(f"  {'chosen: ' + o['scheme'] + ', n = ' + str(o['n']):<31}  test={o['test']:.3f}   vs final model {rep['final']['test']:.3f}")
    return "\n".join(lines)


def rep_spread(rep: Rep) -> dict[str, float]:
    """Std of held-out accuracy across the single members and across n for each scheme."""
    import numpy as np

    out = {"single": float(np.std([s["holdout"] for s in rep["single"]]))}
    for lab, rows in rep["averages"].items():
        out[lab] = float(np.std([r["holdout"] for r in rows]))
    return out


def _pm(stats: dict[str, float] | None) -> str:
    return "      —      " if stats is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def summary_text(summary: dict[str, Any], *, framework: str) -> str:
    """The report of ``--repeats``."""
    seeds = summary["seeds"]
    width = max(len(r["label"]) for r in summary["rows"])
    lines = [
        f"{framework}, {summary['runs']} runs (seeds {seeds[0]}..{seeds[-1]}): accuracy, mean ± std over runs",
        f"{'':<{width}}  held-out (1000)  test (500)",
    ]
    for r in summary["rows"]:
        lines.append(f"{r['label']:<{width}}  {_pm(r['holdout'])}  {_pm(r['test'])}")
    m = summary["members"]
    lines += ["", f"versus the final model (better / tie / worse, in {summary['runs']} runs):"]
    for label, v in summary["versus_final"].items():
        parts = []
        if "fixed_n_holdout" in v:
            c = v["fixed_n_holdout"]
            parts.append(f"n = {m} on held-out {c['better']:>2} / {c['tie']:>2} / {c['worse']:>2}")
        if "chosen_n_test" in v:
            c = v["chosen_n_test"]
            parts.append(f"n chosen on validation, on test {c['better']:>2} / {c['tie']:>2} / {c['worse']:>2}")
        if "chosen_sigma_test" in v:
            c = v["chosen_sigma_test"]
            parts.append(f"sigma_rel chosen on validation, on test {c['better']:>2} / {c['tie']:>2} / {c['worse']:>2}")
        lines.append(f"  {label:<22} " + ";  ".join(parts))
    sp = summary["spread"]
    lines += [
        "",
        f"within-run spread (std of held-out accuracy across the {m} members / across n = 1..{m}, mean over runs):",
        "  " + ",  ".join(f"{k} {v:.4f}" for k, v in sp.items()),
    ]
    if "posthoc_chosen_sigma_rels" in summary:
        counts: dict[float, int] = {}
        for s in summary["posthoc_chosen_sigma_rels"]:
            counts[s] = counts.get(s, 0) + 1
        lines += ["", "post-hoc EMA: sigma_rel chosen on validation (times): "
                  + ", ".join(f"{k:g} ({v})" for k, v in sorted(counts.items())),
                  f"post-hoc EMA (sigma_rel chosen on validation) on test versus (better / tie / worse, in "
                  f"{summary['runs']} runs):"]
        for label, c in summary["posthoc_versus"].items():
            lines.append(f"  {label:<36} {c['better']:>2} / {c['tie']:>2} / {c['worse']:>2}")
    return "\n".join(lines)


def posthoc_text(rep: Rep) -> str:
    """The post-hoc EMA part of one repetition's report."""
    ph = rep["posthoc"]
    cfg = rep["config"]["posthoc"]
    tracked = ", ".join(f"{t['sigma_rel']:g}" for t in ph["tracked"])
    lines = [
        f"post-hoc EMA: power EMAs of sigma_rel {tracked} updated after every batch, a snapshot every "
        f"{cfg['every_epochs']} epochs ({ph['snapshots']} files); every width rebuilt at the end of training",
        f"{'sigma_rel':>10} {'residual':>9} {'held-out':>9} {'validation':>10} {'test':>6}",
    ]
    for r in ph["rebuilt"]:
        lines.append(f"{r['sigma_rel']:>10g} {r['residual']:>9.1e} {r['holdout']:>9.3f} {r['validation']:>10.3f} {r['test']:>6.3f}")
    for r in ph["tracked"]:
        lines.append(f"{str(r['sigma_rel']) + ' T':>10} {'':>9} {r['holdout']:>9.3f} {r['validation']:>10.3f} {r['test']:>6.3f}")
    c = ph["chosen"]
    lines += [
        "  (T: the tracked EMA itself; residual: how well the snapshots express that width, 0 = exactly)",
        f"  chosen on validation: sigma_rel {c['sigma_rel']:g}  test={c['test']:.3f}   (validation {c['validation']:.3f}); "
        f"final model test={rep['final']['test']:.3f}, chosen checkpoint average test={rep['chosen']['overall']['test']:.3f}",
    ]
    return "\n".join(lines)


def figure_posthoc(rep: Rep, path: Path) -> Path:
    """Held-out, validation and test accuracy of every rebuilt width; tracked EMAs marked."""
    ph = rep["posthoc"]
    fig = _figure()
    ax = fig.add_subplot()
    xs = [r["sigma_rel"] for r in ph["rebuilt"]]
    for split, colour in (("holdout", "tab:blue"), ("validation", "tab:orange"), ("test", "tab:green")):
        ax.plot(xs, [r[split] for r in ph["rebuilt"]], marker=".", color=colour, label=f"rebuilt EMA, {split}")
        ax.plot([t["sigma_rel"] for t in ph["tracked"]], [t[split] for t in ph["tracked"]], "D", color=colour,
                markerfacecolor="none", markersize=8)
    ax.axhline(rep["final"]["holdout"], color="grey", linestyle=":", label="final model, held-out")
    ax.axvline(ph["chosen"]["sigma_rel"], color="black", linewidth=0.8, label="chosen on validation")
    sigma_axis(ax, xs)
    ax.set_xlabel("sigma_rel (diamonds: the tracked EMAs)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"post-hoc EMA, seed {rep['seed']}")
    ax.legend(fontsize="small")
    return _save_png(fig, path)


def _figure(width: float = 6.4, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def figure_scheme(rep: Rep, labels: Sequence[str], path: Path, *, title: str) -> Path:
    """The tutorial's figure: blue dots single members, orange line(s) the average of the newest n."""
    fig = _figure()
    ax = fig.add_subplot()
    single = [s["holdout"] for s in rep["single"][::-1]]
    ns = list(range(1, len(single) + 1))
    ax.plot(ns, single, marker="o", linestyle="None", color="tab:blue", label="single member (n-th newest)")
    colours = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
    for i, label in enumerate(labels):
        ax.plot(ns, [r["holdout"] for r in rep["averages"][label]], color=colours[i % len(colours)], label=f"average of newest n: {label}")
    ax.set_xlabel("n")
    ax.set_ylabel("accuracy on the 1000 held-out rows")
    ax.set_title(title)
    ax.legend(fontsize="small")
    return _save_png(fig, path)


def figure_repeats(reps: Sequence[Rep], summary: dict[str, Any], path: Path) -> Path:
    """Distributions over runs: held-out accuracies (left), choices scored on test (right)."""
    import numpy as np

    from ._summary import rows

    fig = _figure(8.0, 8.0)
    left, right = fig.subplots(2, 1, sharex=True)
    table = rows(reps)
    for ax, which, title in ((left, 1, "held-out rows (1000), tutorial-comparable"), (right, 2, "test rows (500); choices made on validation")):
        data, names = [], []
        for row in table:
            getter = row[which]
            if getter is None or (which == 2 and row[1] is not None and "final" not in row[0]):
                continue
            data.append([getter(r) for r in reps])  # type: ignore[operator]
            names.append(row[0])
        rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
        for i, values in enumerate(data):
            ax.scatter(values, i + rng.uniform(-0.2, 0.2, len(values)), s=10, alpha=0.6, color="tab:blue")
            mean, std = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            ax.errorbar([mean], [i], xerr=[std], fmt="|", color="black", markersize=14, capsize=4)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_title(title, fontsize="medium")
        ax.tick_params(axis="y", labelsize="small")
    right.set_xlabel("accuracy (dots: runs; bars: mean ± std)")
    fig.suptitle(f"{summary['runs']} runs, {framework_label(reps[0], reason=False)}")
    return _save_png(fig, path)
