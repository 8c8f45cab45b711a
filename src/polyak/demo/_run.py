"""Run the demo: one repetition with its full report, or many with a summary.

Repetitions are independent processes' worth of work (a seed in, a JSON-ready dict out),
so ``--jobs`` runs them in parallel ``spawn`` processes and gets the same numbers as
running them one by one.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._errors import ConfigError
from .._progress import Progress
from ._backend import use_keras_backend
from ._experiment import DemoConfig, run_repetition
from ._show import (
    figure_posthoc,
    figure_repeats,
    figure_scheme,
    file_stem,
    framework_label,
    posthoc_text,
    repetition_text,
    summary_text,
    write_json,
)
from ._summary import summarise

__all__ = ["run_demo"]


def _one(config: DemoConfig, seed: int, directory: str) -> dict[str, Any]:
    return run_repetition(config, seed=seed, directory=Path(directory), quiet=True)


def run_repetitions(config: DemoConfig, seeds: list[int], out: Path, *, jobs: int, quiet: bool) -> list[dict[str, Any]]:
    """Run one repetition per seed (checkpoints in ``out/checkpoints/seed_<seed>``), in seed order."""
    dirs = {s: str(out / "checkpoints" / f"seed_{s}") for s in seeds}
    results: dict[int, dict[str, Any]] = {}
    bar = Progress(len(seeds), f"{len(seeds)} runs", enabled=not quiet, unit="run", delay=0.0)
    if jobs <= 1:
        for s in seeds:
            results[s] = _one(config, s, dirs[s])
            bar.update()
    else:
        if config.framework == "keras":
            use_keras_backend()  # sets KERAS_BACKEND: the workers inherit it
        ctx = multiprocessing.get_context("spawn")  # no fork after a framework started threads
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_one, config, s, dirs[s]): s for s in seeds}
            for fut in cf.as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
    bar.close()
    return [results[s] for s in seeds]


def _schemes_figures(rep: dict[str, Any], out: Path) -> list[Path]:
    paths = []
    labels = list(rep["averages"])
    for label in labels:
        paths.append(figure_scheme(rep, [label], out / f"{file_stem(label)}.png", title=f"{label} weights, seed {rep['seed']}"))
    expo = [lab for lab in labels if lab.startswith("exponential")]
    if len(expo) > 1:
        paths.append(figure_scheme(rep, expo, out / "alphas.png", title=f"exponential decay rates, seed {rep['seed']}"))
    if "posthoc" in rep:
        paths.append(figure_posthoc(rep, out / "posthoc.png"))
    return paths


def run_demo(
    config: DemoConfig,
    *,
    seed: int = 1,
    repeats: int = 1,
    jobs: int | None = None,
    out: str | os.PathLike[str] = "polyak-demo",
    quiet: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the tutorial's experiment and write its files into ``out``.

    Args:
        config: What to train and sweep.
        seed: Training seed of the (first) repetition; repetition i uses ``seed + i``.
        repeats: Number of repetitions; 1 gives the tutorial's full report.
        jobs: Parallel processes for ``repeats > 1`` (default: min(repeats, CPU cores)).
        out: Output folder: ``results.json`` / ``repeats.json``, PNG figures,
            ``checkpoints/``.
        quiet: No progress bar and no report; only the last line.
        echo: Where report lines go.

    Returns:
        ``results.json``'s content (one repetition) or ``repeats.json``'s (several).
    """
    if repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {repeats}")
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output folder {out}: {exc.strerror}; choose another with --out") from None
    t0 = time.perf_counter()
    if repeats == 1:
        rep = run_repetition(config, seed=seed, directory=out / "checkpoints", quiet=quiet)
        data = {"config": config.to_dict(), **rep}
        write_json(out / "results.json", data)
        figures = _schemes_figures(rep, out)
        if not quiet:
            echo(repetition_text(rep))
            echo("")
            if "posthoc" in rep:
                echo(posthoc_text(rep))
                echo("")
        first, last = Path(rep["files"][0]).name, Path(rep["files"][-1]).name
        echo(
            f"files: {out}/ — results.json, {len(figures)} figures ({', '.join(p.name for p in figures)}), "
            f"{len(rep['files'])} checkpoints (checkpoints/{first} … {last})"
            + (f", {rep['posthoc']['snapshots']} post-hoc EMA snapshots (checkpoints/posthoc/)" if "posthoc" in rep else "")
            + f" [{framework_label(rep, reason=False)}, {time.perf_counter() - t0:.1f} s]"
        )
        return data
    seeds = list(range(seed, seed + repeats))
    workers = min(repeats, jobs if jobs is not None else (os.cpu_count() or 1))
    reps = run_repetitions(config, seeds, out, jobs=workers, quiet=quiet)
    summary = summarise(reps)
    data = {"config": config.to_dict(), "summary": summary, "runs": reps}
    write_json(out / "repeats.json", data)
    figure_repeats(reps, summary, out / "repeats.png")
    if not quiet:
        echo(summary_text(summary, framework=framework_label(reps[0])))
        echo("")
    echo(
        f"files: {out}/ — repeats.json, repeats.png, checkpoints/seed_<seed>/ for seeds {seeds[0]}..{seeds[-1]}"
        f" [{framework_label(reps[0], reason=False)}, {time.perf_counter() - t0:.1f} s, "
        f"{workers} process{'es' if workers > 1 else ''}]"
    )
    return data
