"""Summaries over repetitions: mean ± std, wins/ties/losses, within-run spread.

Works on the JSON-ready dicts :func:`polyak.demo._experiment.run_repetition` returns.
Two kinds of number, never mixed up:

* **held-out** (all 1000 held-out rows, as the tutorial scores): final model, single
  members, averages of a fixed n. Comparable with the tutorial's figures.
* **test** (held-out rows 500..999): everything, including the choices made on
  validation (held-out rows 0..499); a choice is never scored on the rows that chose it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["Row", "summarise"]

Rep = dict[str, Any]
#: (label, held-out getter or None, test getter)
Row = tuple[str, Callable[[Rep], float] | None, Callable[[Rep], float]]


def _last_average(label: str, split: str) -> Callable[[Rep], float]:
    return lambda r: float(r["averages"][label][-1][split])


def _chosen(label: str) -> Callable[[Rep], float]:
    return lambda r: float(r["chosen"]["per_scheme"][label]["test"])


def rows(reps: Sequence[Rep]) -> list[Row]:
    """The table's rows: what is measured in each repetition."""
    first = reps[0]
    m = len(first["single"])
    out: list[Row] = [
        ("final model", lambda r: r["final"]["holdout"], lambda r: r["final"]["test"]),
        (
            "best single member (hindsight)",
            lambda r: max(s["holdout"] for s in r["single"]),
            lambda r: max(s["test"] for s in r["single"]),
        ),
        (
            "mean single member",
            lambda r: float(np.mean([s["holdout"] for s in r["single"]])),
            lambda r: float(np.mean([s["test"] for s in r["single"]])),
        ),
        ("single member chosen on validation", None, lambda r: r["chosen"]["single"]["test"]),
    ]
    for label in first["averages"]:
        out.append((f"{label}, n = {m}", _last_average(label, "holdout"), _last_average(label, "test")))
        out.append((f"{label}, n chosen on validation", None, _chosen(label)))
    out.append(("scheme and n chosen on validation", None, lambda r: r["chosen"]["overall"]["test"]))
    if "posthoc" in first:
        for i, tracked in enumerate(first["posthoc"]["tracked"]):
            out.append((f"tracked EMA sigma_rel={tracked['sigma_rel']:g} (end of run)", _tracked(i, "holdout"),
                        _tracked(i, "test")))
        out.append(("post-hoc EMA, sigma_rel chosen on validation", None, lambda r: r["posthoc"]["chosen"]["test"]))
    return out


def _tracked(i: int, split: str) -> Callable[[Rep], float]:
    return lambda r: float(r["posthoc"]["tracked"][i][split])


def _stats(values: Sequence[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "min": float(a.min()), "max": float(a.max())}


def _compare(values: Sequence[float], reference: Sequence[float]) -> dict[str, int]:
    v, ref = np.asarray(values), np.asarray(reference)
    # Accuracies are multiples of 1/1000 (or 1/500): compare at that resolution.
    diff = np.round((v - ref) * 1000)
    return {"better": int((diff > 0).sum()), "tie": int((diff == 0).sum()), "worse": int((diff < 0).sum())}


def summarise(reps: Sequence[Rep]) -> dict[str, Any]:
    """Mean ± std of every row, how averaging compares with the final model, and spread.

    Returns:
        ``{"runs", "seeds", "rows": [{"label", "holdout": stats | None, "test": stats}],
        "versus_final": {...}, "spread": {...}}`` where stats are mean/std (ddof=1)/min/max.
    """
    table = []
    for label, get_holdout, get_test in rows(reps):
        table.append(
            {
                "label": label,
                "holdout": _stats([get_holdout(r) for r in reps]) if get_holdout else None,
                "test": _stats([get_test(r) for r in reps]),
            }
        )
    final_h = [r["final"]["holdout"] for r in reps]
    final_t = [r["final"]["test"] for r in reps]
    versus: dict[str, Any] = {}
    for label in reps[0]["averages"]:
        versus[label] = {
            "fixed_n_holdout": _compare([r["averages"][label][-1]["holdout"] for r in reps], final_h),
            "chosen_n_test": _compare([r["chosen"]["per_scheme"][label]["test"] for r in reps], final_t),
        }
    versus["chosen on validation"] = {"chosen_n_test": _compare([r["chosen"]["overall"]["test"] for r in reps], final_t)}
    if "posthoc" in reps[0]:
        versus["post-hoc EMA"] = {"chosen_sigma_test": _compare([r["posthoc"]["chosen"]["test"] for r in reps], final_t)}
    spread = {"single": float(np.mean([np.std([s["holdout"] for s in r["single"]]) for r in reps]))}
    for label in reps[0]["averages"]:
        spread[label] = float(np.mean([np.std([a["holdout"] for a in r["averages"][label]]) for r in reps]))
    out_posthoc: dict[str, Any] = {}
    if "posthoc" in reps[0]:
        chosen_t = [r["posthoc"]["chosen"]["test"] for r in reps]
        against = {f"tracked EMA sigma_rel={t['sigma_rel']:g}": [r["posthoc"]["tracked"][i]["test"] for r in reps]
                   for i, t in enumerate(reps[0]["posthoc"]["tracked"])}
        against["scheme and n chosen on validation"] = [r["chosen"]["overall"]["test"] for r in reps]
        out_posthoc = {
            "posthoc_chosen_sigma_rels": [r["posthoc"]["chosen"]["sigma_rel"] for r in reps],
            # the post-hoc EMA chosen on validation against what needs no choice of width
            "posthoc_versus": {label: _compare(chosen_t, ref) for label, ref in against.items()},
        }
    return {
        **out_posthoc,
        "runs": len(reps),
        "seeds": [r["seed"] for r in reps],
        "members": len(reps[0]["single"]),
        "rows": table,
        "versus_final": versus,
        "spread": spread,
    }
