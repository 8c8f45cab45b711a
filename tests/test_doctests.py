"""Every docstring Example in polyak runs as written: the examples of the API reference are tested.

The modules are found, not listed: every module under ``src/polyak`` with a ``>>>`` line
in its source. A module runs when the frameworks its examples use are installed (all are
in the dev environment): those of its package (``polyak.torch`` needs torch, ``polyak.keras``
Keras...) and those its examples import (the core ``polyak.posthoc`` example trains with
``polyak.torch.PostHocEMA``). Modules whose examples run Keras are marked ``keras``, so that
``make test`` runs them on every Keras backend. Temporary folders the examples make
(``tempfile.mkdtemp()``) are created inside pytest's ``tmp_path``.
"""

from __future__ import annotations

import doctest
import importlib
import re
import tempfile
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: The framework each face needs (its package imports it).
FACES = {"polyak.torch": ("torch",), "polyak.keras": ("keras", "h5py"), "polyak.lightning": ("lightning", "torch"),
         "polyak.transformers": ("transformers", "torch")}
#: Frameworks an example may import (``import torch``, ``from polyak.keras import ...``).
USES = re.compile(r">>>.*\b(?:import|from)\s+(?:polyak\.)?(torch|keras|lightning|transformers)\b")
SKIP = re.compile(r"#\s*doctest:\s*\+SKIP")


def _modules() -> list[tuple[str, tuple[str, ...], bool]]:
    """(module, the frameworks its examples need, whether every example line is skipped)."""
    found = []
    for path in sorted((SRC / "polyak").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        examples = [line for line in text.splitlines() if line.lstrip().startswith(">>>")]
        if not examples:
            continue
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        needs = {fw for face, fws in FACES.items() if name == face or name.startswith(face + ".") for fw in fws}
        needs |= {m.group(1) for m in map(USES.search, examples) if m}
        found.append((name, tuple(sorted(needs)), all(SKIP.search(line) for line in examples)))
    return found


MODULES = _modules()


def test_the_examples_are_found():
    names = {name for name, _, _ in MODULES}
    assert {"polyak", "polyak._engine.average", "polyak.formats", "polyak.torch._ema", "polyak.keras",
            "polyak.lightning", "polyak.transformers"} <= names
    needs = {name: fws for name, fws, _ in MODULES}
    assert needs["polyak._engine.posthoc"] == ("torch",) and needs["polyak._engine.average"] == ()


@pytest.mark.parametrize("name,needs,all_skipped", [
    pytest.param(name, needs, skipped, id=name, marks=[pytest.mark.keras] if "keras" in needs else [])
    for name, needs, skipped in MODULES
])
def test_docstring_examples(name, needs, all_skipped, tmp_path, monkeypatch):
    for framework in needs:
        pytest.importorskip(framework)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    assert result.attempted > 0 or all_skipped, f"{name}: no example ran (are they in docstrings?)"
