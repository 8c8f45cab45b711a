"""``polyak posthoc``: rebuild a post-hoc EMA of any width, or choose the width on validation data."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

EPILOG = """\
FOLDER holds the snapshots written during training by polyak.torch.PostHocEMA or
polyak.keras.PostHocEMACallback (posthoc_sigma<σ>_step<N>.safetensors). Without --sigma-rel
or --sweep the command describes the folder.

--sweep takes widths as a list (0.03,0.05,0.08) or a range START:STOP:STEP (0.02:0.25:0.01,
both ends included); alone, it sweeps the default grid {grid}.
--eval names the evaluate function (or a factory returning it) as in `polyak sweep`:
MODULE:NAME or FILE.py:NAME, returning {{"validation": {{...}}, "test": {{...}}}}.

examples:
  polyak posthoc run/posthoc                                     # what the folder holds
  polyak posthoc run/posthoc --sigma-rel 0.08 -o ema_0.08.safetensors
  polyak posthoc run/posthoc --sigma-rel 0.08 --step 20000 -o ema.pt
  polyak posthoc keras_run/posthoc --sigma-rel 0.12 -o ema.weights.h5
  polyak posthoc run/posthoc --sweep 0.02:0.25:0.01 --eval my_eval.py:make_evaluate -o sweep/
"""


def _grid(text: str) -> list[float]:
    """``0.03,0.05,0.08`` or ``START:STOP:STEP`` (both ends included)."""
    text = text.replace(" ", "")
    try:
        if ":" in text:
            parts = [float(x) for x in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts
            count = round((stop - start) / step) + 1
            values = [round(start + k * step, 12) for k in range(count)]
            return [v for v in values if v <= stop + 1e-12]
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"write the widths as 0.03,0.05,0.08 or START:STOP:STEP such as 0.02:0.25:0.01, got {text!r}"
        ) from None


def register(sub: Any) -> None:
    from .._choose.posthoc import DEFAULT_SWEEP
    from ._sweep import add_choice_options

    p = sub.add_parser(
        "posthoc",
        help="rebuild a post-hoc EMA of any width from snapshots, or choose the width on validation data",
        description="Post-hoc EMA (Karras et al. 2024): rebuild the EMA of any width sigma_rel at any snapshot "
        "step as a weighted sum of power-EMA snapshots, or rebuild a grid of widths, evaluate each and choose on "
        "validation data.",
        epilog=EPILOG.format(grid=",".join(f"{s:g}" for s in DEFAULT_SWEEP)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="FOLDER", help="the snapshot folder")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--sigma-rel", type=float, metavar="S", help="rebuild the EMA of this width (needs -o)")
    what.add_argument("--sweep", type=_grid, nargs="?", const=list(DEFAULT_SWEEP), metavar="GRID",
                      help="rebuild and evaluate every width of GRID (needs --eval)")
    p.add_argument("--step", type=int, metavar="T", help="rebuild as of training step T (default: the last snapshot)")
    p.add_argument("-o", "--out", help="rebuild: the output file (its suffix picks the format); sweep: a folder for "
                   "results.json, results.csv, posthoc.png")
    p.add_argument("--eval", metavar="MODULE:NAME", help="evaluate function or factory (sweep)")
    add_choice_options(p, "sweep: ")
    p.add_argument("--no-tracked", action="store_true", help="sweep: do not evaluate the tracked snapshots themselves")
    p.add_argument("--no-plots", action="store_true", help="sweep: do not write the figure")
    p.add_argument("--out-format", help="rebuild: output format, instead of the output suffix")
    p.add_argument("--dtype", help="output dtype of floating tensors (default: the snapshots', float32)")
    p.add_argument("--shard-size", help="rebuild: split a safetensors output into shards of at most this size, e.g. 5GB")
    p.add_argument("--force", action="store_true", help="replace existing outputs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=run_posthoc)


def _warnings(records: list[warnings.WarningMessage]) -> None:
    for r in records:
        print(f"polyak: warning: {r.message}", file=sys.stderr)


def run_posthoc(args: argparse.Namespace) -> int:
    from .._errors import ConfigError

    if args.sweep is not None:
        if not args.eval:
            raise ConfigError("--sweep evaluates every rebuilt EMA: give the evaluate function with --eval MODULE:NAME")
        return _run_sweep(args)
    if args.sigma_rel is not None:
        if not args.out:
            raise ConfigError("--sigma-rel writes the rebuilt EMA: give the output file with -o OUT")
        return _run_rebuild(args)
    if args.eval or args.out:
        raise ConfigError("say what to do: --sigma-rel S -o OUT rebuilds one width, --sweep GRID --eval ... chooses one")
    return _describe(args)


def _describe(args: argparse.Namespace) -> int:
    from .._engine.posthoc import read_folder
    from .._progress import human_bytes

    snaps = read_folder(args.folder)
    first, last = snaps.snapshots[0].record, snaps.snapshots[-1].record
    size = sum(s.path.stat().st_size for s in snaps.snapshots)
    print(f"{snaps.folder}: {len(snaps.snapshots)} {last.framework} snapshots of run {last.run}, "
          f"{len(last.names)} tensors, {human_bytes(size)}")
    print(f"tracked sigma_rel: {', '.join(f'{s:g}' for s in snaps.sigma_rels)}; a snapshot every {last.every} updates")
    print(f"steps {snaps.steps[0]}..{snaps.steps[-1]} ({len(snaps.steps)} steps; t = {first.t}..{last.t} updates)")
    return 0


def _run_rebuild(args: argparse.Namespace) -> int:
    from .._engine.posthoc import posthoc
    from .._progress import human_bytes

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        result = posthoc(args.folder, sigma_rel=args.sigma_rel, step=args.step, out=args.out,
                         out_format=args.out_format, dtype=args.dtype, shard_size=args.shard_size, force=args.force,
                         progress=not args.quiet)
    _warnings(records)
    if not args.quiet:
        if result.plan is not None:
            print(result.plan.describe())
        print(f"{result.averaged} tensors rebuilt, {result.copied} copied from the newest snapshot, "
              f"{human_bytes(result.nbytes)} in {result.seconds:.2f} s")
        for f in result.files:
            print(f"wrote {f}")
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from .._choose.posthoc import posthoc_sweep
    from .._choose.report import format_posthoc_table, plot_posthoc, write_csv, write_json
    from .._choose.select import select
    from .._errors import ConfigError
    from ._sweep import _check_out, load_callable

    files = ["results.json", "results.csv"] + ([] if args.no_plots else ["posthoc.png"])
    folder = _check_out(args.out, args.force, files) if args.out else None
    evaluate = load_callable(args.eval, "--eval")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        results = posthoc_sweep(args.folder, evaluate, args.sweep, step=args.step, tracked=not args.no_tracked,
                                dtype=args.dtype, progress=not args.quiet)
        selection = select(results, args.metric, on=args.on, report=args.report, mode=args.mode)
    if not args.quiet:
        print(format_posthoc_table(results, selection.metric, mode=selection.mode))
        print()
        print(selection)
        if selection.report is None:
            print(f"note: chosen and scored on the same split ({selection.on}); return a separate validation split "
                  "from evaluate for an unbiased test score")
    _warnings(records)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        written = [write_json(results, folder / "results.json", extra={"selection": selection.to_dict()}),
                   write_csv(results, folder / "results.csv")]
        if not args.no_plots:
            try:
                written.append(plot_posthoc(results, folder / "posthoc.png", selection.metric, selection.on))
            except ConfigError as exc:
                print(f"polyak: warning: no figure: {exc}", file=sys.stderr)
        if not args.quiet:
            for f in written:
                print(f"wrote {f}")
    return 0
