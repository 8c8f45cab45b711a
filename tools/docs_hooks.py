"""mkdocs hooks: pages generated from the code at build time, so that they cannot drift.

* ``<!-- polyak:api MODULE -->`` becomes one mkdocstrings block (``::: MODULE.NAME``) for
  every name in ``MODULE.__all__``, in that order. ``__all__`` is read from the source with
  ``ast`` (importing ``polyak.keras`` would start a Keras backend).
* ``<!-- polyak:cli -->`` becomes the help of the ``polyak`` command and of each of its
  subcommands, as ``argparse`` prints it (``polyak.cli.build_parser``, which imports no
  framework).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
API = re.compile(r"<!--\s*polyak:api\s+([\w.]+)\s*-->")
CLI = re.compile(r"<!--\s*polyak:cli\s*-->")


def public_names(module: str) -> list[str]:
    """``module.__all__`` read from its source file (no import)."""
    base = SRC.joinpath(*module.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            names = ast.literal_eval(node.value)
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{path}: __all__ must be a list of strings")
            return names
    raise ValueError(f"{path}: no __all__")


def api_blocks(module: str) -> str:
    blocks = []
    for name in public_names(module):
        if name.startswith("__"):  # __version__: stated on the page, not rendered as an object
            continue
        blocks.append(f"::: {module}.{name}\n")
    return "\n".join(blocks)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def cli_reference() -> str:
    """The top-level help, then ``polyak COMMAND --help`` for every subcommand."""
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width; fix it for the page
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    from polyak.cli import build_parser

    parser = build_parser()
    parts = ["## `polyak`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for name, sub in _subparsers(parser).items():
        parts += [f"## `polyak {name}`", "", "```text", sub.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    markdown = API.sub(lambda m: api_blocks(m.group(1)), markdown)
    if CLI.search(markdown):
        markdown = CLI.sub(lambda m: cli_reference(), markdown)
    return markdown
