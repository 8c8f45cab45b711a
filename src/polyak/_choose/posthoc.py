"""Choose the EMA width after training: rebuild every width of a grid, evaluate, select.

The post-hoc counterpart of :func:`polyak.sweep`: the snapshots of a post-hoc EMA run are
opened once, each width of the grid is rebuilt through the engine (one model copy in
memory at a time, :func:`~polyak._engine.stream.average_sources` with the signed
coefficients of its fit) and scored, and so are the tracked snapshots themselves. The
result is a :class:`~polyak._choose.results.PosthocSweepResults`, which
:func:`polyak.select` chooses from on validation data and reports on test data.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Mapping

import numpy as np

from .._engine.members import check_members, open_members
from .._engine.posthoc import MAX_RESIDUAL, PosthocFitWarning, plan, read_folder
from .._engine.stream import average_sources
from .._posthoc import check_sigma_rels
from .._progress import Progress
from .metrics import normalize_metrics
from .results import PosthocSweepResults, SweepRow
from .sweep import Evaluate

__all__ = ["DEFAULT_SWEEP", "posthoc_sweep"]

#: The widths :func:`posthoc_sweep` rebuilds by default: around and between EDM2's two
#: tracked profiles (0.05, 0.10), and on to where a rebuild from them grows inexact.
DEFAULT_SWEEP = (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.12, 0.14, 0.16, 0.18, 0.20, 0.25)


def posthoc_sweep(
    folder: str | os.PathLike[str],
    evaluate: Evaluate,
    sigma_rels: Iterable[float] = DEFAULT_SWEEP,
    *,
    step: int | None = None,
    tracked: bool = True,
    dtype: str | None = None,
    progress: bool = False,
) -> PosthocSweepResults:
    """Rebuild the post-hoc EMA of every width in ``sigma_rels`` and evaluate each.

    Each width is rebuilt at ``step`` from the snapshots at or before it
    (:func:`polyak.posthoc`), one model in memory at a time, and handed to ``evaluate``;
    with ``tracked`` the stored snapshots of that step are evaluated too (rows of kind
    ``"tracked"``: the EMAs that ran during training). Choose with :func:`polyak.select`
    (on validation, reported on test); the results print as a table, save as JSON/CSV
    and plot the metric against ``σ_rel``.

    Args:
        folder: A snapshot folder of ``polyak.torch.PostHocEMA`` /
            ``polyak.keras.PostHocEMACallback``.
        evaluate: ``evaluate(state) -> {metric: number}`` or ``{split: {metric: number}}``
            (see :class:`polyak.Evaluate`); the arrays are fresh for every width.
        sigma_rels: The widths to rebuild, each in ``(0, 0.2887]`` (default:
            :data:`DEFAULT_SWEEP`, 0.02 … 0.25).
        step: Rebuild at this training step (default: the last snapshot's).
        tracked: Also evaluate the snapshots stored at ``step``.
        dtype: Floating dtype handed to ``evaluate`` (default: the snapshots', float32).
        progress: Show a progress bar on stderr (only on a terminal).

    Returns:
        :class:`PosthocSweepResults`: one row per width (kind ``"posthoc"``, ``n`` = the
        snapshots combined) and per tracked snapshot (kind ``"tracked"``), and the fits.
        Widths the snapshots express poorly (residual above 0.1) are listed in ``notes``.

    Raises:
        ConfigError: No or mixed snapshots, an invalid width or step, or bad metrics.

    Warns:
        PosthocFitWarning: Once, when some widths are expressed poorly.

    Example:
        >>> import tempfile, torch, polyak
        >>> from polyak.torch import PostHocEMA
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> folder = tempfile.mkdtemp()
        >>> phema = PostHocEMA(model, folder, every=5)  # tracks sigma_rel 0.05 and 0.10
        >>> with torch.no_grad():
        ...     for step in range(1, 21):  # training: the weight is the step number
        ...         _ = model.weight.fill_(step)
        ...         phema.update()
        >>> def evaluate(state):  # the best weight is 18.5 on validation data, 18.6 on test data
        ...     w = float(state["weight"][0, 0])
        ...     return {"validation": {"err": abs(w - 18.5)}, "test": {"err": abs(w - 18.6)}}
        >>> res = polyak.posthoc_sweep(folder, evaluate, [0.05, 0.06, 0.07, 0.08, 0.09, 0.10])
        >>> print(res.table("err", mode="min", color=False))
        post-hoc EMA at step 20 from 8 snapshots: err (lower is better; * best per column; T = a tracked snapshot itself)
        sigma_rel  residual  validation       test
           0.05 T               0.8718     0.7718
           0.05     0.0e+00     0.8718     0.7718
           0.06     2.9e-02     0.6164     0.5164
           0.07     3.6e-02     0.3869     0.2869
           0.08     3.1e-02     0.1671     0.0671*
           0.09     1.8e-02     0.0510*    0.1510
            0.1 T               0.2709     0.3709
            0.1     0.0e+00     0.2709     0.3709
        >>> print(polyak.select(res, "err"))  # chosen on validation, reported on test
        chose posthoc(sigma_rel=0.09) on validation err 0.05097; test err 0.151
    """
    t0 = time.perf_counter()
    snaps = read_folder(folder)
    grid = check_sigma_rels(list(sigma_rels))
    target = snaps.steps[-1] if step is None else step
    plans = [plan(snaps, s, step=target, warn=False) for s in grid]
    members = plans[0].members
    rows: list[SweepRow] = []
    notes: list[str] = []
    poor = [p for p in plans if p.residual > MAX_RESIDUAL]
    if poor:
        notes.append(
            "the snapshots express these widths poorly (profile residual > "
            f"{MAX_RESIDUAL}): " + ", ".join(f"{p.sigma_rel:g} ({p.residual:.2f})" for p in poor)
            + f"; tracked widths: {', '.join(f'{s:g}' for s in snaps.sigma_rels)}"
        )
        warnings.warn(notes[-1], PosthocFitWarning, stacklevel=2)

    def run(kind: str, state: Mapping[str, np.ndarray], sigma_rel: float, n: int, member: str | None = None) -> None:
        t = time.perf_counter()
        metrics = normalize_metrics(evaluate(state))
        rows.append(SweepRow(kind=kind, n=n, metrics=metrics, member=member, seconds=time.perf_counter() - t,
                             sigma_rel=sigma_rel))

    at_step = [s for s in snaps.at(int(target))] if tracked else []
    with open_members([m.path for m in members]) as sources:
        infos = check_members(sources)
        bar = Progress(len(plans) + len(at_step), "post-hoc EMA", enabled=progress, unit="model")
        try:
            for p in plans:
                state = average_sources(sources, p.coefficients, infos=infos, dtype=dtype, copy=members[-1].record.copied)
                run("posthoc", state, p.sigma_rel, len(members))
                bar.update()
            by_path = {m.path: src for m, src in zip(members, sources, strict=True)}
            for snap in at_step:
                src = by_path[snap.path]
                state = {i.name: _cast(src.read(i.name), dtype) for i in infos}
                run("tracked", state, snap.record.sigma_rel, 1, member=snap.label)
                bar.update()
        finally:
            bar.close()
    return PosthocSweepResults(
        rows=rows, members=[m.label for m in members], seconds=time.perf_counter() - t0, notes=notes,
        step=int(target), tracked=snaps.sigma_rels, fits=[p.fit.to_dict() for p in plans],
    )


def _cast(x: np.ndarray, dtype: str | None) -> np.ndarray:
    arr = np.array(x, copy=True)
    if dtype is not None and arr.dtype.kind == "f":
        from .._dtypes import dtype_from_name

        arr = arr.astype(dtype_from_name(dtype))
    return arr

