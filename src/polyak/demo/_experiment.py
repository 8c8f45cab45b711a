"""One repetition of the tutorial's experiment: train, save members, sweep, choose.

The members are real files; ``polyak.sweep`` reads each once and scores every average of
the newest n (running sums), ``polyak.select`` makes the choices on validation rows.

Returns plain data (a JSON-ready dict), so repetitions can run in other processes and be
compared number for number.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._choose.posthoc import DEFAULT_SWEEP, posthoc_sweep
from .._choose.results import SweepResults, SweepRow
from .._choose.select import select
from .._choose.sweep import sweep
from .._engine.posthoc import PosthocFitWarning
from .._errors import ConfigError
from .._posthoc import DEFAULT_SIGMA_RELS, is_snapshot_name
from ._backend import use_keras_backend
from ._data import load_blobs
from ._model import Evaluator
from ._train import PosthocCapture, Recipe, steps_per_epoch, train_keras, train_torch

__all__ = ["FRAMEWORKS", "DemoConfig", "run_repetition", "scheme_label"]

FRAMEWORKS = ("keras", "torch")
SUFFIX = {"keras": ".keras", "torch": ".safetensors"}
#: The post-hoc EMA snapshot folder inside the checkpoint folder.
POSTHOC_DIR = "posthoc"
#: Files the demo itself writes into its checkpoint folder (and removes before a new run).
_OWN_CHECKPOINT = re.compile(r"^model_(epoch_)?\d+\.(keras|weights\.h5|safetensors)$")


@dataclass(frozen=True)
class DemoConfig:
    """What ``polyak demo`` runs.

    Attributes:
        framework: ``"keras"`` (the tutorial's) or ``"torch"``.
        recipe: Training recipe (epochs, members, ...).
        alphas: Decay rates of the exponential scheme (the tutorial: 2).
        data_seed: ``random_state`` of the blobs (the tutorial: 2); fixed across repeats.
        posthoc: Also keep power EMAs during training (post-hoc EMA: per-batch updates,
            a snapshot every :attr:`posthoc_every_epochs` epochs), rebuild every width of
            ``posthoc_grid`` afterwards and choose one on validation.
        posthoc_sigma_rels: The tracked widths (EDM2's 0.05 and 0.10).
        posthoc_grid: The widths rebuilt and compared.
    """

    framework: str = "keras"
    recipe: Recipe = field(default_factory=Recipe)
    alphas: tuple[float, ...] = (2.0,)
    data_seed: int = 2
    posthoc: bool = False
    posthoc_sigma_rels: tuple[float, ...] = DEFAULT_SIGMA_RELS
    posthoc_grid: tuple[float, ...] = DEFAULT_SWEEP

    def __post_init__(self) -> None:
        if self.framework not in FRAMEWORKS:
            raise ConfigError(f"unknown framework {self.framework!r}; choose keras or torch")
        r = self.recipe
        if r.members < 1 or r.epochs < r.members:
            raise ConfigError(f"--members must be between 1 and --epochs ({r.epochs}), got {r.members}")
        if not self.alphas or any(not a > 0 for a in self.alphas):
            raise ConfigError(f"--alphas must be positive decay rates, got {list(self.alphas)}")

    def schemes(self) -> list[tuple[str, str, float | None]]:
        """``(label, scheme, alpha)`` for every average the sweep scores."""
        out: list[tuple[str, str, float | None]] = [("equal", "equal", None), ("linear", "linear", None)]
        out += [(scheme_label("exponential", a), "exponential", a) for a in self.alphas]
        return out

    @property
    def posthoc_every_epochs(self) -> int:
        """Epochs between post-hoc EMA snapshots: 20 snapshots per width over the run."""
        return max(1, self.recipe.epochs // 20)

    def to_dict(self) -> dict[str, Any]:
        out = {"framework": self.framework, "recipe": asdict(self.recipe), "alphas": list(self.alphas), "data_seed": self.data_seed}
        if self.posthoc:
            out["posthoc"] = {"sigma_rels": list(self.posthoc_sigma_rels), "grid": list(self.posthoc_grid),
                              "every_epochs": self.posthoc_every_epochs}
        return out


def scheme_label(scheme: str, alpha: float | None) -> str:
    """``"equal"``, ``"linear"``, ``"exponential(alpha=2)"``."""
    return scheme if alpha is None else f"{scheme}(alpha={alpha:g})"


def load_states(files: Sequence[Path]) -> list[dict[str, np.ndarray]]:
    """Read member files into name-keyed numpy states (oldest → newest)."""
    from ..formats import open_source

    states = []
    for f in files:
        src = open_source(f)
        try:
            states.append({name: np.array(src.read(name)) for name in src.infos()})
        finally:
            src.close()
    return states


class _Nested:
    """The demo's flat metrics as the sweep's ``{split: {metric: value}}``."""

    def __init__(self, evaluate: Evaluator) -> None:
        self.evaluate = evaluate

    def __call__(self, state: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
        m = self.evaluate(state)
        return {split: {"accuracy": m[split], "loss": m[f"{split}_loss"]} for split in ("holdout", "validation", "test")}


def _flat(row: SweepRow) -> dict[str, float]:
    out = {}
    for split, metrics in row.metrics.items():
        out[split] = float(metrics["accuracy"])
        out[f"{split}_loss"] = float(metrics["loss"])
    return out


def sweep_members(
    files: Sequence[Path], evaluate: Evaluator, config: DemoConfig
) -> tuple[list[dict[str, float]], dict[str, list[dict[str, float]]], dict[str, Any]]:
    """``polyak.sweep`` over the member files, then ``polyak.select`` on validation.

    Returns:
        ``(single, averages, chosen)``: each member's metrics (oldest → newest); per scheme
        label, the metrics of the average of the newest n for n = 1..members; and the
        choices made on validation accuracy (ties: the smallest n), each with its test
        accuracy.
    """
    results = sweep(
        [Path(f) for f in files],
        _Nested(evaluate),
        schemes=("equal", "linear", "exponential"),
        alphas=config.alphas,
        baselines=("single",),
        order="given",
    )
    singles = sorted(results.select_rows(kind="single"), key=lambda r: -r.n)  # n = 1 is the newest
    single = [_flat(r) for r in singles]
    averages: dict[str, list[dict[str, float]]] = {}
    per_scheme: dict[str, Any] = {}
    for label, scheme, alpha in config.schemes():
        rows = sorted(results.select_rows(kind="average", scheme=scheme, alpha=alpha), key=lambda r: r.n)
        averages[label] = [_flat(r) for r in rows]
        chosen = select(SweepResults(rows, results.members), "accuracy", on="validation", report="test")
        per_scheme[label] = {"n": chosen.n, "validation": chosen.selected, "test": chosen.reported}
    overall = select(results, "accuracy", on="validation", report="test")
    by_single = select(results, "accuracy", on="validation", report="test", kinds=("single",))
    epochs = list(range(config.recipe.first_saved, config.recipe.epochs))
    chosen_all = {
        "per_scheme": per_scheme,
        "overall": {
            "scheme": scheme_label(overall.scheme or "", overall.alpha),
            "n": overall.n,
            "validation": overall.selected,
            "test": overall.reported,
        },
        "single": {"epoch": epochs[-by_single.n], "validation": by_single.selected, "test": by_single.reported},
    }
    return single, averages, chosen_all


def prepare_checkpoint_dir(directory: Path) -> None:
    """Create ``directory``; remove member files and post-hoc EMA snapshots an earlier demo
    run left there."""
    directory.mkdir(parents=True, exist_ok=True)
    for p in directory.iterdir():
        if p.is_file() and _OWN_CHECKPOINT.match(p.name):
            p.unlink()
    snapshots = directory / POSTHOC_DIR
    if snapshots.is_dir():
        for p in snapshots.iterdir():
            if p.is_file() and is_snapshot_name(p.name):
                p.unlink()


def posthoc_members(folder: Path, evaluate: Evaluator, config: DemoConfig) -> dict[str, Any]:
    """``polyak.posthoc_sweep`` over the snapshots, then ``polyak.select`` on validation.

    Returns:
        ``{"rebuilt": [...], "tracked": [...], "chosen": {...}, "snapshots": N}``: the
        metrics of every rebuilt width (with its profile residual) and of the tracked
        EMAs at the end of training, and the width chosen on validation accuracy with its
        test accuracy.
    """
    with warnings.catch_warnings():
        # Widths the snapshots express poorly are kept, with their residual, in the report.
        warnings.simplefilter("ignore", PosthocFitWarning)
        results = posthoc_sweep(folder, _Nested(evaluate), config.posthoc_grid)
    chosen = select(results, "accuracy", on="validation", report="test")

    def row(r: SweepRow) -> dict[str, Any]:
        out: dict[str, Any] = {"sigma_rel": r.sigma_rel, **_flat(r)}
        if r.kind == "posthoc":
            out["residual"] = results.residual(r.sigma_rel or 0.0)
        return out

    return {
        "snapshots": len(results.members),
        "step": results.step,
        "rebuilt": [row(r) for r in sorted(results.select_rows(kind="posthoc"), key=lambda r: r.sigma_rel or 0.0)],
        "tracked": [row(r) for r in sorted(results.select_rows(kind="tracked"), key=lambda r: r.sigma_rel or 0.0)],
        "chosen": {"sigma_rel": chosen.sigma_rel, "kind": chosen.row.kind, "validation": chosen.selected,
                   "test": chosen.reported, "holdout": chosen.row.value("accuracy", "holdout")},
    }


def run_repetition(config: DemoConfig, *, seed: int, directory: Path, quiet: bool = True) -> dict[str, Any]:
    """Train once with ``seed``, save the members in ``directory``, sweep and choose.

    Returns:
        A JSON-ready dict: ``final`` (the last epoch's model, with train accuracy),
        ``single`` (each member, oldest → newest), ``averages`` (scheme → metrics of the
        newest n for n = 1..members), ``chosen`` (choices made on validation), ``files``,
        ``epochs`` (zero-based epoch of each member), ``backend`` (Keras: the backend's
        ``name`` and the ``reason`` it was chosen) and ``seconds`` (timings); with
        ``config.posthoc`` also ``posthoc`` (see :func:`posthoc_members`).
    """
    recipe = config.recipe
    data = load_blobs(config.data_seed)
    directory = Path(directory)
    prepare_checkpoint_dir(directory)
    t0 = time.perf_counter()
    backend = None
    if config.framework == "keras":
        choice = use_keras_backend()
        backend = {"name": choice.name, "reason": choice.reason}
    train = train_keras if config.framework == "keras" else train_torch
    capture = None
    if config.posthoc:
        every = config.posthoc_every_epochs * steps_per_epoch(data, recipe)
        capture = PosthocCapture(directory / POSTHOC_DIR, config.posthoc_sigma_rels, every)
    files = train(data, recipe, seed=seed, directory=directory, quiet=quiet, posthoc=capture)
    t1 = time.perf_counter()
    if len(files) != recipe.members:
        raise ConfigError(f"expected {recipe.members} member files in {directory}, found {len(files)}: {[f.name for f in files]}")
    single, averages, chosen = sweep_members(files, Evaluator(data, config.framework), config)
    final = Evaluator(data, config.framework, train=True)(load_states(files[-1:])[0])
    epochs = list(range(recipe.first_saved, recipe.epochs))
    t2 = time.perf_counter()
    extra: dict[str, Any] = {}
    if capture is not None:
        extra["posthoc"] = posthoc_members(capture.folder, Evaluator(data, config.framework), config)
        extra["seconds_posthoc"] = time.perf_counter() - t2
    return {
        "seed": seed,
        "config": config.to_dict(),
        "epochs": epochs,
        "files": [str(f) for f in files],
        "final": final,
        "single": single,
        "averages": averages,
        "chosen": chosen,
        **({"backend": backend} if backend else {}),
        "seconds": {"train": t1 - t0, "sweep": t2 - t1, **({"posthoc": extra.pop("seconds_posthoc")} if extra else {})},
        **extra,
    }
