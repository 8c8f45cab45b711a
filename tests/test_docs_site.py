"""The generated parts of the documentation site (tools/docs_hooks.py) follow the code.

`make docs` (part of `make test`) builds the site strictly; these tests pin what the hooks
generate: every public name of every documented module, and every subcommand's help.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "tools" / "docs_hooks.py")
hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hooks)  # type: ignore[union-attr]

#: Reference pages and the module each documents.
PAGES = {"polyak.md": "polyak", "torch.md": "polyak.torch", "keras.md": "polyak.keras", "formats.md": "polyak.formats",
         "lightning.md": "polyak.lightning", "transformers.md": "polyak.transformers"}


@pytest.mark.parametrize("module", ["polyak", "polyak.formats", "polyak.torch", "polyak.lightning", "polyak.transformers"])
def test_reference_lists_every_public_name(module):
    needs = {"polyak.torch": "torch", "polyak.lightning": "lightning", "polyak.transformers": "transformers"}
    pytest.importorskip(needs[module]) if module in needs else None
    names = hooks.public_names(module)
    assert names == list(importlib.import_module(module).__all__)
    blocks = hooks.api_blocks(module)
    for name in names:
        if not name.startswith("__"):
            assert f"::: {module}.{name}\n" in blocks


def test_every_public_module_has_a_reference_page():
    pages = {p.name: p.read_text() for p in (ROOT / "docs" / "reference").glob("*.md")}
    for page, module in PAGES.items():
        assert f"<!-- polyak:api {module} -->" in pages[page]
    faces = {p.name for p in (ROOT / "src" / "polyak").iterdir() if (p / "__init__.py").exists() and not p.name.startswith("_")}
    documented = {m.removeprefix("polyak.") for m in PAGES.values()} | {"cli", "demo"}
    assert faces <= documented, f"add a reference page for {sorted(faces - documented)}"


def test_every_public_name_is_documented():
    """Summary, Args, Returns, Raises and an Example for every public name (tools/audit_docstrings.py)."""
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("audit_docstrings", ROOT / "tools" / "audit_docstrings.py")
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)  # type: ignore[union-attr]
    gaps = audit.audit(ROOT)
    assert not gaps, "docstring gaps (python tools/audit_docstrings.py):\n" + "\n".join(gaps)


def test_cli_reference_has_every_subcommand():
    from polyak.cli import build_parser

    text = hooks.cli_reference()
    subcommands = hooks._subparsers(build_parser())
    assert subcommands
    for name, parser in subcommands.items():
        assert f"## `polyak {name}`" in text
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:  # hidden on purpose (test-only options)
                continue
            for flag in action.option_strings:
                assert re.search(re.escape(flag) + r"\b", text), f"{name}: {flag} missing"
