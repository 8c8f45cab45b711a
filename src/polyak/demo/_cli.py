"""``polyak demo``: the tutorial's experiment, end to end, with real files."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """\
examples:
  polyak demo                              # Keras, one run: the tutorial's printout, figures, JSON
  polyak demo --framework torch            # the same with PyTorch (CheckpointSaver + safetensors)
  polyak demo --repeats 30                 # 30 seeds: mean ± std, wins/ties/losses, spread
  polyak demo --members 50 --alphas 0.5,1,2,4,8   # the tutorial's two extensions
  polyak demo --posthoc --repeats 10       # also post-hoc EMA: the EMA width chosen after training

Data: make_blobs(n_samples=1100, centers=3, n_features=2, cluster_std=2, random_state=2)
as the tutorial (--seed changes the training run, not the data); train on rows 0..99;
"held-out" = rows 100..1099 (the tutorial's test set); for honest selection they split
into validation (rows 100..599, chooses scheme and n) and test (rows 600..1099, reports).
"""


def _alphas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"alphas must be comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"alphas must be positive, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="reproduce the Polyak-averaging tutorial's experiment (train, save, average, compare)",
        description="Train the tutorial's MLP on the blobs data, save the last epochs as checkpoints, "
        "and compare single checkpoints with equal, linear and exponential averages of the newest n.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--framework", choices=("keras", "torch"), default="keras", help="training framework (default: keras, as the tutorial)")
    p.add_argument("--seed", type=int, default=1, help="training seed (initial weights, shuffles); repeats use seed, seed+1, ... (default: 1)")
    p.add_argument("--repeats", type=_positive, default=1, metavar="R", help="run R seeds and summarise (default: 1)")
    p.add_argument("--jobs", type=_positive, metavar="J", help="parallel processes for --repeats (default: min(R, CPU cores))")
    p.add_argument("--members", type=_positive, default=10, metavar="M", help="save and average the last M epochs (default: 10, the tutorial's)")
    p.add_argument("--alphas", type=_alphas, default=(2.0,), help="decay rates of the exponential scheme, e.g. 0.5,1,2,4,8 (default: 2)")
    p.add_argument("--data-seed", type=int, default=2, help="random_state of make_blobs (default: 2, the tutorial's)")
    p.add_argument("--posthoc", action="store_true", help="also keep power EMAs (sigma_rel 0.05, 0.10) while training, "
                   "rebuild EMAs of sigma_rel 0.02..0.25 afterwards and choose one on validation (post-hoc EMA)")
    p.add_argument("--out", default="polyak-demo", help="output folder (default: ./polyak-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no report, only the last line")
    p.add_argument("--epochs", type=_positive, default=500, help=argparse.SUPPRESS)  # shorter runs for tests
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ._experiment import DemoConfig
    from ._run import run_demo
    from ._train import Recipe

    config = DemoConfig(
        framework=args.framework,
        recipe=Recipe(epochs=args.epochs, members=args.members),
        alphas=args.alphas,
        data_seed=args.data_seed,
        posthoc=args.posthoc,
    )
    run_demo(config, seed=args.seed, repeats=args.repeats, jobs=args.jobs, out=args.out, quiet=args.quiet)
    return 0
