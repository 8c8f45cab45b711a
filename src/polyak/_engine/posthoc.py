"""Rebuild a post-hoc EMA: read a snapshot folder, solve the coefficients, stream the sum.

A folder written by ``polyak.torch.PostHocEMA`` or ``polyak.keras.PostHocEMACallback``
holds snapshots of power-function EMAs (one file per tracked ``σ_rel`` every ``every``
updates, each with a :class:`~polyak._posthoc.SnapshotRecord` in its metadata). An EMA of
any other ``σ_rel`` at any snapshot step ``T`` is ``Σ x_i · snapshot_i`` over the snapshots
taken at or before ``T``, with the signed coefficients of
:func:`~polyak._posthoc.solve_coefficients`: a weighted checkpoint average, streamed
through the engine (:func:`~.average.average_chosen`) like any other, one tensor at a
time, so never all snapshots in memory. Integer tensors come from the newest snapshot at
or before ``T``.

:func:`read_folder` lists and checks the snapshots (headers only); :func:`plan` chooses the
snapshots and coefficients for one target; :func:`posthoc` rebuilds it.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from .._atomic import TEMP_MARK
from .._errors import ConfigError, FormatError, MismatchError, PolyakWarning
from .._online import AVERAGER_META_KEY
from .._posthoc import (
    SNAPSHOT_KEY,
    Fit,
    SnapshotRecord,
    check_sigma_rel,
    is_snapshot_name,
    solve_coefficients,
)
from ..formats import open_source
from .average import AverageResult, Chosen, average_chosen
from .members import MemberLike

__all__ = ["MAX_RESIDUAL", "PosthocFitWarning", "PosthocPlan", "PosthocResult", "Snapshot", "SnapshotFolder",
           "check_run", "plan", "posthoc", "read_folder", "resume_point", "scan_folder"]

#: Above this relative profile mismatch a rebuild warns: the wanted EMA lies outside what
#: the tracked profiles express well (narrower than the narrowest, or far wider than the
#: widest tracked one, or too few snapshots).
MAX_RESIDUAL = 0.1


class PosthocFitWarning(PolyakWarning):
    """The snapshots match the wanted EMA's profile poorly (large residual)."""


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file and its record."""

    path: Path
    record: SnapshotRecord

    @property
    def label(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class SnapshotFolder:
    """The snapshots of one run, oldest → newest (by step, then σ_rel).

    Attributes:
        folder: The folder.
        snapshots: Every snapshot.
        sigma_rels: The tracked relative widths, ascending.
        steps: The snapshot steps, ascending.
    """

    folder: Path
    snapshots: tuple[Snapshot, ...]
    sigma_rels: tuple[float, ...]
    steps: tuple[int, ...]

    @property
    def framework(self) -> str:
        return self.snapshots[-1].record.framework

    def at(self, step: int) -> list[Snapshot]:
        """The snapshots taken at ``step``."""
        return [s for s in self.snapshots if s.record.step == step]

    def snapshot_step(self, step: int) -> int:
        """The newest snapshot step at or before ``step``.

        Raises:
            ConfigError: ``step`` is before the first snapshot or after the last.
        """
        steps = self.steps
        if step < steps[0]:
            raise ConfigError(
                f"step {step} is before the first snapshot in {self.folder} (step {steps[0]}): there is nothing "
                f"to rebuild from; choose a step from {steps[0]} to {steps[-1]}"
            )
        if step > steps[-1]:
            raise ConfigError(
                f"step {step} is after the last snapshot in {self.folder} (step {steps[-1]}): the snapshots cannot "
                f"tell what came later; choose a step from {steps[0]} to {steps[-1]}"
            )
        return max(s for s in steps if s <= step)


def scan_folder(folder: str | os.PathLike[str]) -> list[Snapshot]:
    """Every snapshot file in ``folder`` with its record, unchecked and unordered (headers only).

    Files not named like snapshots, and temporary files of interrupted writes, are skipped.

    Raises:
        FormatError: A file named like a snapshot has no (or a corrupt) record.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.iterdir()):
        if TEMP_MARK in path.name or not is_snapshot_name(path.name) or not path.is_file():
            continue  # leftovers of a killed write, and anything that is not a snapshot
        with open_source(path) as src:
            meta = src.metadata()
        text = meta.get(SNAPSHOT_KEY)
        if text is None:
            raise FormatError(
                f"{path}: named like a post-hoc EMA snapshot but has no {SNAPSHOT_KEY!r} record; "
                "move it out of the snapshot folder"
            )
        out.append(Snapshot(path, SnapshotRecord.from_json(text, str(path))))
    return out


def read_folder(folder: str | os.PathLike[str]) -> SnapshotFolder:
    """List and check the snapshots of a folder (reads only the files' headers).

    Raises:
        ConfigError: The folder does not exist, holds no snapshots, or mixes runs,
            frameworks or tracking cadences.
        MismatchError: Snapshots disagree on the model's tensor names.
        FormatError: A snapshot's record is missing or corrupt.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder; give the folder PostHocEMA wrote its snapshots into")
    snaps = scan_folder(root)
    if not snaps:
        raise ConfigError(
            f"{root} holds no post-hoc EMA snapshots (posthoc_sigma<σ>_step<N>.safetensors, written by "
            "polyak.torch.PostHocEMA or polyak.keras.PostHocEMACallback)"
        )
    runs: dict[str, list[Snapshot]] = {}
    for s in snaps:
        runs.setdefault(s.record.run, []).append(s)
    if len(runs) > 1:
        parts = [f"run {r}: {len(v)} files, steps {min(x.record.step for x in v)}..{max(x.record.step for x in v)}"
                 for r, v in runs.items()]
        raise ConfigError(f"{root} mixes snapshots of {len(runs)} training runs ({'; '.join(parts)}); "
                          "keep each run's snapshots in a folder of its own")
    for attr in ("framework", "every"):
        values = sorted({str(getattr(s.record, attr)) for s in snaps})
        if len(values) > 1:
            raise ConfigError(f"{root} mixes snapshots with {attr} {', '.join(values)}; keep one run per folder")
    names = snaps[-1].record.names
    odd = [s.label for s in snaps if s.record.names != names]
    if odd:
        raise MismatchError(f"{root}: snapshots of different models: {', '.join(odd[:5])}"
                            f"{' …' if len(odd) > 5 else ''} list other tensors than {snaps[-1].label}; "
                            "keep one model's snapshots per folder")
    seen: dict[tuple[int, float], str] = {}
    for s in snaps:
        key = (s.record.step, s.record.sigma_rel)
        if key in seen:
            raise ConfigError(f"{root}: {seen[key]} and {s.label} are both the sigma_rel={key[1]:g} snapshot of step "
                              f"{key[0]}; remove one")
        seen[key] = s.label
    snaps.sort(key=lambda s: (s.record.step, s.record.sigma_rel))
    bad_t = [s.label for a, s in itertools.pairwise(snaps) if s.record.step > a.record.step and s.record.t < a.record.t]
    if bad_t:
        raise ConfigError(f"{root}: {bad_t[0]} counts fewer updates than an earlier snapshot; the folder mixes "
                          "restarted runs, keep one run per folder")
    return SnapshotFolder(
        folder=root, snapshots=tuple(snaps),
        sigma_rels=tuple(sorted({s.record.sigma_rel for s in snaps})),
        steps=tuple(sorted({s.record.step for s in snaps})),
    )


def check_run(folder: str | os.PathLike[str], run: str, *, resume_hint: str) -> list[Snapshot]:
    """Before a capture's first update: ``folder`` must hold no other run's snapshots.

    Returns this run's snapshots already there (a resumed run's).

    Raises:
        ConfigError: Another run's snapshots are in the folder (``resume_hint`` says how
            to continue that run instead).
    """
    found = scan_folder(folder)
    if any(s.record.run != run for s in found):
        raise ConfigError(
            f"{folder} already holds post-hoc EMA snapshots of another run ({len(found)} files); use an "
            f"empty folder, or continue that run with {resume_hint}"
        )
    return found


def resume_point(folder: str | os.PathLike[str], sigma_rels: Sequence[float], *, every: int,
                 framework: str) -> dict[float, Snapshot] | None:
    """The snapshots to resume a capture from: the newest step with one of every width.

    Returns:
        ``σ_rel → snapshot`` (every width of ``sigma_rels``), or ``None`` for a folder
        without snapshots (a fresh run).

    Raises:
        ConfigError: The folder's snapshots are another framework's, were taken with
            another ``every``, or no step has every width.
    """
    if not scan_folder(folder):
        return None
    snaps = read_folder(folder)
    if snaps.framework != framework:
        raise ConfigError(f"{folder} holds snapshots of a {snaps.framework} run; resume it there")
    for step in reversed(snaps.steps):
        at = {round(s.record.sigma_rel, 12): s for s in snaps.at(step)}
        if all(round(s, 12) in at for s in sigma_rels):
            break
    else:
        raise ConfigError(f"{folder}: no step has a snapshot of every tracked sigma_rel {list(sigma_rels)} "
                          f"(tracked there: {list(snaps.sigma_rels)}); resume with the sigma_rels of that run")
    chosen = {s: at[round(s, 12)] for s in sigma_rels}
    found = next(iter(chosen.values())).record.every
    if found != every:
        raise ConfigError(f"{folder} was written with every={found}, not every={every}; resume with every={found}")
    return chosen


@dataclass(frozen=True)
class PosthocPlan:
    """How a post-hoc EMA is rebuilt: which snapshots, with which coefficients, and how well they fit.

    :func:`polyak.posthoc_plan` makes one without reading any tensor; :func:`polyak.posthoc`
    follows it (and returns it as :attr:`PosthocResult.plan`).

    Attributes:
        folder: The snapshot folder.
        step: The training step ``T`` of the rebuilt EMA (a snapshot step).
        fit: The coefficients (one per member, signed, summing to 1) and the residual.
        members: The snapshots used (those at or before ``T``), oldest → newest; the
            last one's integer tensors are copied.

    :func:`polyak.posthoc_plan`'s example makes one.
    """

    folder: SnapshotFolder
    step: int
    fit: Fit
    members: tuple[Snapshot, ...] = field(default=())

    @property
    def sigma_rel(self) -> float:
        """The relative width of the rebuilt EMA."""
        return self.fit.sigma_rel

    @property
    def coefficients(self) -> np.ndarray:
        """One signed coefficient per member (oldest → newest), summing to 1 (float64)."""
        return self.fit.coefficients

    @property
    def residual(self) -> float:
        """The relative L2 mismatch between the wanted EMA's weight profile and the one the
        coefficients give (0: exact; above :data:`MAX_RESIDUAL` a rebuild warns)."""
        return self.fit.residual

    def describe(self, limit: int = 6) -> str:
        """Lines for the command line: target, fit, the largest coefficients."""
        fit = self.fit
        lines = [f"post-hoc EMA sigma_rel={fit.sigma_rel:g} (gamma {fit.gamma:.4g}) at step {self.step} (t={fit.t:g}) "
                 f"from {len(self.members)} snapshots of sigma_rel {', '.join(f'{s:g}' for s in self.folder.sigma_rels)}",
                 f"profile fit: residual {fit.residual:.2e} (relative L2 mismatch of the weight profiles; "
                 f"coefficients summed to {fit.raw_sum:.6f} before normalising)"]
        order = np.argsort(-np.abs(fit.coefficients))[:limit]
        parts = [f"{self.members[i].label} {fit.coefficients[i]:+.4f}" for i in sorted(order)]
        more = len(self.members) - len(order)
        lines.append("coefficients: " + ", ".join(parts) + (f", … ({more} more)" if more > 0 else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The plan as a JSON-able dict: ``folder``, ``step``, the fit (``sigma_rel``,
        ``gamma``, ``t``, ``coefficients``, ``residual``, ``raw_sum``) and the ``members``' names."""
        return {"folder": str(self.folder.folder), "step": self.step, **self.fit.to_dict(),
                "members": [m.label for m in self.members]}


def plan(folder: str | os.PathLike[str] | SnapshotFolder, sigma_rel: float, *, step: int | None = None,
         warn: bool = True) -> PosthocPlan:
    """The snapshots and coefficients that rebuild the EMA of ``sigma_rel`` at ``step``.

    Args:
        folder: A snapshot folder (or its :func:`read_folder`).
        sigma_rel: The relative width to rebuild, in ``(0, 0.2887]``.
        step: The training step (default: the last snapshot's). Between two snapshot
            steps the EMA is rebuilt as of the earlier one (with a warning): a power
            EMA's profile cut short is a multiple of its earlier profile, so that is the
            best the snapshots can give.
        warn: Warn (:class:`PosthocFitWarning`) when the residual exceeds
            :data:`MAX_RESIDUAL`, or ``step`` is not a snapshot step.

    Returns:
        A :class:`PosthocPlan`: the rebuilt step, the snapshots used and their
        coefficients, and the profile residual. No tensor is read.

    Raises:
        ConfigError: No or mixed snapshots in the folder, an invalid ``sigma_rel`` or a
            ``step`` before the first or after the last snapshot.
        FormatError: A snapshot's record is missing or corrupt.
        MismatchError: Snapshots disagree on the model's tensor names.

    Warns:
        PosthocFitWarning: With ``warn``, when the residual exceeds :data:`MAX_RESIDUAL` or
            ``step`` is not a snapshot step.

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
        >>> plan = polyak.posthoc_plan(folder, 0.08)
        >>> plan.step, plan.sigma_rel, len(plan.members), round(float(plan.coefficients.sum()), 9)
        (20, 0.08, 8, 1.0)
        >>> plan.residual < 0.1  # the profiles of 0.05 and 0.10 express 0.08 well
        True
        >>> plan = polyak.posthoc_plan(folder, 0.08, step=12, warn=False)  # no snapshot at 12: step 10's
        >>> plan.step, [m.label for m in plan.members][-2:]
        (10, ['posthoc_sigma0.05_step000000010.safetensors', 'posthoc_sigma0.1_step000000010.safetensors'])
    """
    snaps = folder if isinstance(folder, SnapshotFolder) else read_folder(folder)
    target = check_sigma_rel(sigma_rel)
    if step is None:
        step = snaps.steps[-1]
    elif isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ConfigError(f"step must be a whole training step, got {step!r}")
    at = snaps.snapshot_step(int(step))
    if at != step and warn:
        # A power EMA's profile at t*, cut at t < t*, is a multiple of its profile at t: the
        # best the snapshots can do for a step between two of them is the earlier one.
        warnings.warn(f"there is no snapshot at step {step}: rebuilding the EMA as of step {at}, the newest "
                      "snapshot before it", PosthocFitWarning, stacklevel=3)
    members = tuple(s for s in snaps.snapshots if s.record.step <= at)
    t = float(snaps.at(at)[0].record.t)
    fit = solve_coefficients([m.record.t for m in members], [m.record.gamma for m in members], t, target)
    if warn and fit.residual > MAX_RESIDUAL:
        tracked = ", ".join(f"{s:g}" for s in snaps.sigma_rels)
        warnings.warn(
            f"sigma_rel={target:g} at step {at} is outside what the snapshots express well (tracked sigma_rel "
            f"{tracked}, {len(members)} snapshots): profile residual {fit.residual:.3f} > {MAX_RESIDUAL}; "
            "stay between and near the tracked widths, or track more profiles",
            PosthocFitWarning, stacklevel=3,
        )
    return PosthocPlan(folder=snaps, step=at, fit=fit, members=members)


@dataclass
class PosthocResult(AverageResult):
    """What :func:`polyak.posthoc` wrote: the :class:`~polyak.AverageResult` fields and the plan followed.

    Its ``scheme`` is ``"posthoc"``, its ``weights`` the plan's signed coefficients, and
    its ``metadata["params"]`` records ``sigma_rel``, ``gamma``, ``step``, ``t``, the
    ``residual`` and the tracked widths.

    Attributes:
        plan: The :class:`PosthocPlan` that was followed.

    :func:`polyak.posthoc`'s example makes one.
    """

    plan: PosthocPlan | None = None


@overload
def posthoc(folder: str | os.PathLike[str], *, sigma_rel: float, step: int | None = None, out: None = None,
            out_format: str | None = None, dtype: str | None = None, shard_size: int | str | None = None,
            force: bool = False, progress: bool = False) -> dict[str, np.ndarray]: ...
@overload
def posthoc(folder: str | os.PathLike[str], *, sigma_rel: float, step: int | None = None,
            out: str | os.PathLike[str], out_format: str | None = None, dtype: str | None = None,
            shard_size: int | str | None = None, force: bool = False, progress: bool = False) -> PosthocResult: ...
def posthoc(
    folder: str | os.PathLike[str],
    *,
    sigma_rel: float,
    step: int | None = None,
    out: str | os.PathLike[str] | None = None,
    out_format: str | None = None,
    dtype: str | None = None,
    shard_size: int | str | None = None,
    force: bool = False,
    progress: bool = False,
) -> dict[str, np.ndarray] | PosthocResult:
    """Rebuild the EMA of any width ``sigma_rel`` from post-hoc EMA snapshots, after training.

    ``polyak.torch.PostHocEMA`` / ``polyak.keras.PostHocEMACallback`` keep power-function
    EMAs of a few widths during training (EDM2's defaults: ``σ_rel`` 0.05 and 0.10) and
    store snapshots of them every few steps. Any other width at any snapshot step is a
    weighted sum of those snapshots with signed coefficients (solved in float64 by
    matching the EMAs' weight profiles, Karras et al. 2024), streamed through the engine
    one tensor at a time, summed in float32 (float64 for float64 tensors). Integer
    tensors come from the newest snapshot at or before ``step``.

    Args:
        folder: The snapshot folder.
        sigma_rel: The EMA width to rebuild, relative to the training length, in
            ``(0, 0.2887]``; best between the tracked widths (a warning says when the
            snapshots express it poorly, with the profile residual).
        step: Rebuild the EMA as it was at this training step (default: the last
            snapshot's); only snapshots taken at or before it are used. Between two
            snapshot steps, the earlier one is used (with a warning).
        out: Write the result here (any format polyak writes: ``.safetensors``, ``.pt``,
            ``.npz``, ``.weights.h5`` for Keras snapshots...) instead of returning it.
        out_format: Force the output format.
        dtype: Output dtype of floating tensors (default: the snapshots', float32).
        shard_size: Split a safetensors output into shards of at most this size.
        force: Replace an existing output.
        progress: Show a progress bar on stderr (only on a terminal).

    Returns:
        Without ``out``: name → numpy array. With ``out``: a :class:`PosthocResult` (its
        ``plan`` holds the coefficients and the residual; ``weights`` the coefficients).

    Raises:
        ConfigError: No or mixed snapshots, ``sigma_rel ≤ 0`` (or above 0.2887), a
            ``step`` before the first or after the last snapshot.
        MismatchError, FormatError, NonFiniteError, OutputError: As :func:`polyak.average`.

    Warns:
        PosthocFitWarning: The snapshots match the wanted profile poorly (residual above
            :data:`MAX_RESIDUAL`).

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
        >>> ema = polyak.posthoc(folder, sigma_rel=0.08)  # after training: any width
        >>> round(ema["weight"].item(), 2)  # between the tracked 0.05 (19.37) and 0.10 (18.23)
        18.67
        >>> tracked = polyak.posthoc(folder, sigma_rel=0.10)["weight"].item()
        >>> abs(tracked - phema.ema(0.10).state.tensors["weight"].item()) < 1e-5  # a tracked width comes back
        True
        >>> res = polyak.posthoc(folder, sigma_rel=0.08, out=f"{folder}/ema_0.08.safetensors")
        >>> [f.name for f in res.files], res.scheme, res.plan.step, len(res.weights)  # a PosthocResult
        (['ema_0.08.safetensors'], 'posthoc', 20, 8)

    References:
        Karras et al. (2024), "Analyzing and Improving the Training Dynamics of Diffusion
        Models", arXiv:2312.02696.
    """
    t0 = time.perf_counter()
    p = plan(folder, sigma_rel, step=step)
    fit = p.fit
    params = {"sigma_rel": fit.sigma_rel, "gamma": fit.gamma, "step": p.step, "t": fit.t, "residual": fit.residual,
              "tracked_sigma_rels": list(p.folder.sigma_rels)}
    pick = Chosen(list[MemberLike]([m.path for m in p.members]), fit.coefficients, "posthoc", params)
    result = average_chosen(
        pick, order="given", out=out, out_format=out_format, dtype=dtype, shard_size=shard_size, force=force,
        progress=progress, drop_metadata=(SNAPSHOT_KEY, AVERAGER_META_KEY), copy=p.members[-1].record.copied,
        started=t0,
    )
    if isinstance(result, dict):
        return result
    return PosthocResult(**vars(result), plan=p)


def coefficient_table(fits: Sequence[Fit]) -> list[dict[str, Any]]:
    """The fits as JSON-able rows (for reports)."""
    return [{"sigma_rel": f.sigma_rel, "gamma": f.gamma, "residual": f.residual,
             "max_abs_coefficient": float(np.max(np.abs(f.coefficients))) if f.coefficients.size else math.nan}
            for f in fits]
