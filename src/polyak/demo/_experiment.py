"""One repetition of the tutorial's experiment: train, save members, sweep, choose.

Returns plain data (a JSON-ready dict), so repetitions can run in other processes and be
compared number for number.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigError
from .._schemes import scheme_weights
from ._data import load_blobs
from ._model import Evaluator
from ._train import Recipe, train_keras, train_torch

__all__ = ["FRAMEWORKS", "DemoConfig", "run_repetition", "scheme_label"]

FRAMEWORKS = ("keras", "torch")
SUFFIX = {"keras": ".keras", "torch": ".safetensors"}
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
    """

    framework: str = "keras"
    recipe: Recipe = field(default_factory=Recipe)
    alphas: tuple[float, ...] = (2.0,)
    data_seed: int = 2

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

    def to_dict(self) -> dict[str, Any]:
        return {"framework": self.framework, "recipe": asdict(self.recipe), "alphas": list(self.alphas), "data_seed": self.data_seed}


def scheme_label(scheme: str, alpha: float | None) -> str:
    """``"equal"``, ``"linear"``, ``"exponential(alpha=2)"``."""
    return scheme if alpha is None else f"{scheme}(alpha={alpha:g})"


def load_states(files: Sequence[Path], framework: str) -> list[dict[str, np.ndarray]]:
    """Read the member files into name-keyed numpy states (oldest → newest)."""
    from ..formats import open_source

    states = []
    for f in files:
        src = open_source(f)
        try:
            states.append({name: np.array(src.read(name)) for name in src.infos()})
        finally:
            src.close()
    return states


def sweep_states(
    states: Sequence[Mapping[str, np.ndarray]],
    evaluate: Callable[[Mapping[str, np.ndarray]], dict[str, float]],
    schemes: Sequence[tuple[str, str, float | None]],
) -> dict[str, list[dict[str, float]]]:
    """Metrics of the average of the newest n members, n = 1..len(states), per scheme."""
    out: dict[str, list[dict[str, float]]] = {}
    names = list(states[0])
    for label, scheme, alpha in schemes:
        rows = []
        for n in range(1, len(states) + 1):
            w = scheme_weights(scheme, n, alpha=alpha) if alpha is not None else scheme_weights(scheme, n)
            newest = states[len(states) - n :]
            avg = {}
            for k in names:
                acc = np.zeros(newest[0][k].shape, dtype=np.float64)
                for wi, s in zip(w, newest):
                    acc += float(wi) * s[k]
                avg[k] = acc.astype(np.float32)
            rows.append(evaluate(avg))
        out[label] = rows
    return out


def _best(candidates: Sequence[tuple[Any, Mapping[str, float]]]) -> tuple[Any, Mapping[str, float]]:
    # Highest validation accuracy; ties (common on 500 rows) go to the lower validation
    # loss, then to the earlier candidate.
    return min(candidates, key=lambda c: (-c[1]["validation"], c[1]["validation_loss"]))


def choose(single: Sequence[Mapping[str, float]], averages: Mapping[str, Sequence[Mapping[str, float]]], epochs: Sequence[int]) -> dict[str, Any]:
    """Choices made on validation, each reported with its test accuracy."""
    per_scheme = {}
    everything = []
    for label, rows in averages.items():
        (n, m) = _best([(i + 1, r) for i, r in enumerate(rows)])
        per_scheme[label] = {"n": n, "validation": m["validation"], "test": m["test"]}
        everything += [((label, i + 1), r) for i, r in enumerate(rows)]
    (label, n), m = _best(everything)
    epoch, ms = _best(list(zip(epochs, single)))
    return {
        "per_scheme": per_scheme,
        "overall": {"scheme": label, "n": n, "validation": m["validation"], "test": m["test"]},
        "single": {"epoch": epoch, "validation": ms["validation"], "test": ms["test"]},
    }


def prepare_checkpoint_dir(directory: Path) -> None:
    """Create ``directory``; remove member files an earlier demo run left there."""
    directory.mkdir(parents=True, exist_ok=True)
    for p in directory.iterdir():
        if p.is_file() and _OWN_CHECKPOINT.match(p.name):
            p.unlink()


def run_repetition(config: DemoConfig, *, seed: int, directory: Path, quiet: bool = True) -> dict[str, Any]:
    """Train once with ``seed``, save the members in ``directory``, sweep and choose.

    Returns:
        A JSON-ready dict: ``final`` (the last epoch's model, with train accuracy),
        ``single`` (each member, oldest → newest), ``averages`` (scheme → metrics of the
        newest n for n = 1..members), ``chosen`` (choices made on validation), ``files``,
        ``epochs`` (zero-based epoch of each member) and ``seconds`` (timings).
    """
    recipe = config.recipe
    data = load_blobs(config.data_seed)
    directory = Path(directory)
    prepare_checkpoint_dir(directory)
    t0 = time.perf_counter()
    train = train_keras if config.framework == "keras" else train_torch
    files = train(data, recipe, seed=seed, directory=directory, quiet=quiet)
    t1 = time.perf_counter()
    if len(files) != recipe.members:
        raise ConfigError(f"expected {recipe.members} member files in {directory}, found {len(files)}: {[f.name for f in files]}")
    states = load_states(files, config.framework)
    evaluate = Evaluator(data, config.framework)
    single = [evaluate(s) for s in states]
    final = Evaluator(data, config.framework, train=True)(states[-1])
    averages = sweep_states(states, evaluate, config.schemes())
    epochs = list(range(recipe.first_saved, recipe.epochs))
    t2 = time.perf_counter()
    return {
        "seed": seed,
        "config": config.to_dict(),
        "epochs": epochs,
        "files": [str(f) for f in files],
        "final": final,
        "single": single,
        "averages": averages,
        "chosen": choose(single, averages, epochs),
        "seconds": {"train": t1 - t0, "sweep": t2 - t1},
    }
