"""The ``polyak`` command: parse, validate, call one library function, print a summary.

Subcommands live in their own modules, each exposing ``register(subparsers)``; they are
imported to build the parser, so they must not import a framework at module level.
User errors (any :class:`PolyakError`) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from typing import TextIO

from .. import _startup
from .._errors import PolyakError, PolyakWarning
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


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: TextIO | None = None, line: str | None = None) -> None:
    """polyak's own warnings as one ``polyak: warning: ...`` line (others as Python shows them)."""
    if issubclass(category, PolyakWarning):
        print(f"polyak: warning: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def _tolerant_output() -> None:
    """Print names that are not valid Unicode (a lone surrogate in a tensor name) escaped,
    instead of failing with UnicodeEncodeError halfway through a table."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):
                reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``polyak`` command; returns the exit status.

    A :class:`~polyak.PolyakError` prints one line and returns 2; Ctrl-C at any point (the
    imports included, see :mod:`polyak._startup`) prints one line and returns 130, after
    whatever was being written has been removed.
    """
    try:
        _startup.release()
        _tolerant_output()
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except PolyakError as exc:
        text = str(exc)
        print(f"polyak: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_startup.MESSAGE, end="", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # e.g. `polyak inspect big.safetensors | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
