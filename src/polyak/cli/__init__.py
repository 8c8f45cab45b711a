"""The ``polyak`` command: parse, validate, call one library function, print a summary.

Subcommands live in their own modules, each exposing ``register(subparsers)``; they are
imported to build the parser, so they must not import a framework at module level.
User errors (any :class:`PolyakError`) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .._errors import PolyakError
from .._version import __version__

#: Modules that add subcommands, in the order ``--help`` lists them.
SUBCOMMANDS = (
    "polyak.cli._average",
    "polyak.cli._sweep",
    "polyak.cli._posthoc",
    "polyak.demo._cli",
)

EPILOG = """\
examples:
  polyak average runs/ckpt_*.safetensors -o final.safetensors --scheme exponential --alpha 2 --last 10
  polyak average epoch_*.pt -o avg.pt --scheme linear --key model
  polyak inspect final.safetensors
  polyak posthoc run/posthoc --sigma-rel 0.08 -o ema.safetensors
  polyak demo

Run `polyak COMMAND --help` for the options of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyak",
        description="Average neural-network weights (Polyak–Ruppert averaging) of Keras and PyTorch checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"polyak {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):  # a subcommand not part of this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``polyak`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PolyakError as exc:
        text = str(exc)
        print(f"polyak: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("polyak: interrupted; no output was written", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `polyak inspect big.safetensors | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
