"""``polyak sweep``: evaluate averages of the newest n checkpoints, choose on validation data."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from .._engine.members import ORDER_HELP, ORDERS
from .._errors import ConfigError, OutputError

SWEEP_EPILOG = """\
--eval names a Python function as MODULE:NAME (an importable module, the current folder
included) or FILE.py:NAME. The user's file is imported and run: only name code you trust.
  * NAME(state) with one required argument is the evaluate function itself: it gets a dict
    of tensor name -> numpy array and returns {"accuracy": 0.8, ...} or, for several splits,
    {"validation": {"accuracy": ...}, "test": {"accuracy": ...}}.
  * NAME() with no required arguments is a factory: it is called once (load data, build the
    model there) and must return the evaluate function.
--predict works the same way for predict(state) -> array of outputs (or {split: array});
the prediction ensemble's metrics come from --score, or from a .score attribute of the
predict (or evaluate) object.

examples:
  polyak sweep ckpt/epoch_*.safetensors --eval my_eval.py:make_evaluate --out sweep/
  polyak sweep run/*.pt --key model --eval evals:evaluate --schemes exponential --alphas 0.5,1,2,4
"""

def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, e.g. 0.5,1,2; got {text!r}") from None


def register(sub: Any) -> None:
    from .._choose.sweep import BASELINES, sweep_schemes

    p = sub.add_parser(
        "sweep",
        help="evaluate averages of the newest n checkpoints for every n and scheme",
        description="Evaluate the average of the newest n checkpoints for n = 1..N, each scheme and decay "
        "rate, against each checkpoint alone; choose on validation data; write a table, JSON, CSV and figures.",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files (any order; see --order)")
    p.add_argument("--eval", required=True, metavar="MODULE:NAME", help="evaluate function or factory (see below)")
    p.add_argument("--predict", metavar="MODULE:NAME", help="predict function or factory, for the prediction ensemble")
    p.add_argument("--score", metavar="MODULE:NAME", help="score function for averaged predictions")
    p.add_argument("--schemes", type=_csv, help=f"comma-separated (default: {','.join(sweep_schemes())})")
    p.add_argument("--alphas", type=_floats, help="decay rates of exponential, e.g. 0.5,1,2 (default: 2)")
    p.add_argument("--baselines", type=_csv, default=list(BASELINES), help=f"comma-separated: {', '.join(BASELINES)} (default: all)")
    p.add_argument("--last", type=int, metavar="N", help="use only the newest N checkpoints")
    p.add_argument("--order", choices=ORDERS, default="number", help=ORDER_HELP)
    p.add_argument("--format", help="input format, instead of detecting it from the suffix")
    p.add_argument("--key", help="key of the state dict in nested .pt checkpoints (e.g. model)")
    p.add_argument("--strip-prefix", action="append", default=[], metavar="PREFIX", help="remove this prefix from tensor names (repeatable)")
    add_choice_options(p)
    p.add_argument("--out", metavar="DIR", help="write results.json, results.csv, sweep.png, alphas.png here")
    p.add_argument("--no-plots", action="store_true", help="do not write figures")
    p.add_argument("--no-diagnose", action="store_true", help="skip the distance/cosine diagnostics (one extra read)")
    p.add_argument("--force", action="store_true", help="replace existing files in --out")
    p.add_argument("-q", "--quiet", action="store_true", help="no tables or progress; files and warnings only")
    p.set_defaults(func=run_sweep)


def add_choice_options(p: argparse.ArgumentParser, scope: str = "") -> None:
    """``--metric``, ``--on``, ``--report`` and ``--mode``: how a sweep's choice is made (``scope``
    prefixes their help, e.g. ``"sweep: "`` where they apply to one mode of a command)."""
    from .._choose.select import AUTO

    p.add_argument("--metric", help=f"{scope}metric to compare (default: the first one evaluate returns)")
    p.add_argument("--on", default=AUTO,
                   help=f"{scope}split to choose on (default: validation when evaluate returns it, else the first)")
    p.add_argument("--report", default=AUTO,
                   help=f"{scope}split to report the choice on (default: test when evaluate returns it)")
    p.add_argument("--mode", choices=("max", "min"),
                   help=f"{scope}higher or lower is better (default: min for names like loss/error, else max)")


def load_callable(spec: str, option: str) -> Any:
    """Import ``MODULE:NAME`` or ``FILE.py:NAME``; call it first when it is a factory.

    Raises:
        ConfigError: Bad spec, import failure, missing name, or a factory that returns a
            non-callable.
    """
    mod_name, sep, attr = spec.rpartition(":")
    if not sep or not mod_name or not attr.isidentifier():
        raise ConfigError(f"{option} {spec!r}: write MODULE:FUNCTION or path/to/file.py:FUNCTION")
    try:
        if mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name:
            path = Path(mod_name)
            if not path.is_file():
                raise ConfigError(f"{option} {spec!r}: no such file {path}")
            folder = str(path.resolve().parent)
            if folder not in sys.path:
                sys.path.insert(0, folder)  # so that the file can import its neighbours
            unique = f"polyak_user_{path.stem}_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(unique, path)
            if module_spec is None or module_spec.loader is None:
                raise ConfigError(f"{option} {spec!r}: cannot import {path}")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module failed to import: say which and why
        raise ConfigError(f"{option} {spec!r}: importing {mod_name} failed: {type(exc).__name__}: {exc}") from exc
    if not hasattr(module, attr):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"{option} {spec!r}: {mod_name} has no {attr!r}; it has {names}")
    obj = getattr(module, attr)
    if not callable(obj):
        raise ConfigError(f"{option} {spec!r}: {attr} is not a function")
    if _is_factory(obj):
        made = obj()
        if not callable(made):
            raise ConfigError(f"{option} {spec!r}: the factory {attr}() returned {type(made).__name__}, not a function")
        return made
    return obj


def _is_factory(obj: Any) -> bool:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    required = [
        p for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return not required


def _check_out(out: str, force: bool, names: list[str]) -> Path:
    """Refuse an --out that is a file or holds results (without --force), before the sweep."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {folder} is a file; give a folder")
    existing = [n for n in names if (folder / n).exists()]
    if existing and not force:
        raise OutputError(f"{folder} already holds {', '.join(existing)}; pass --force to replace them")
    return folder


def run_sweep(args: argparse.Namespace) -> int:
    from .._choose.diagnose import check_results, diagnose
    from .._choose.report import format_table, plot_alphas, plot_sweep, write_csv, write_json
    from .._choose.select import select
    from .._choose.sweep import sweep

    files = ["results.json", "results.csv"] + ([] if args.no_plots else ["sweep.png", "alphas.png"])
    folder = _check_out(args.out, args.force, files) if args.out else None
    evaluate = load_callable(args.eval, "--eval")
    predict = load_callable(args.predict, "--predict") if args.predict else None
    score = load_callable(args.score, "--score") if args.score else None
    common = dict(format=args.format, key=args.key, strip_prefix=args.strip_prefix, order=args.order, last=args.last)
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        results = sweep(args.checkpoints, evaluate, schemes=args.schemes, alphas=args.alphas,
                        baselines=args.baselines, predict=predict, score=score, progress=not args.quiet, **common)
        selection = select(results, args.metric, on=args.on, report=args.report, mode=args.mode)
        metric, mode, on = selection.metric, selection.mode, selection.on
        diagnosis = None if args.no_diagnose else diagnose(args.checkpoints, warn=False, **common)
        issues = (diagnosis.issues if diagnosis else []) + check_results(results, metric, split=on, mode=mode)
        caught += [str(r.message) for r in records]
    results.notes.extend(issues)
    if not args.quiet:
        for split in results.splits:
            if metric in results.metric_names(split):
                print(format_table(results, metric, split, mode=mode))
                print()
        print(selection)
        if selection.report is None:
            print(f"note: chosen and scored on the same split ({on}); return a separate validation split "
                  "from evaluate for an unbiased test score")
    for msg in caught + issues:
        print(f"polyak: warning: {msg}", file=sys.stderr)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        written = [
            write_json(results, folder / "results.json", extra={
                "selection": selection.to_dict(),
                "diagnostics": diagnosis.to_dict() if diagnosis else None,
            }),
            write_csv(results, folder / "results.csv"),
        ]
        if not args.no_plots:
            try:
                written.append(plot_sweep(results, folder / "sweep.png", metric, on))
                if any(s == "exponential" for s, _ in results.curves()):
                    written.append(plot_alphas(results, folder / "alphas.png", metric, on))
            except ConfigError as exc:
                print(f"polyak: warning: no figures: {exc}", file=sys.stderr)
        if not args.quiet:
            for f in written:
                print(f"wrote {f}")
    return 0
