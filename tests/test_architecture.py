"""The house's shape (docs/architecture.md) beyond what the import contracts check.

`make lint` runs the import-linter contracts in pyproject.toml (layers, independence of the
torch and Keras faces, no cycles, no frameworks below the faces). These tests guard the
contracts themselves: a new module must be placed in a layer, and the frameworks that the
forbidden contract lets through (function-local imports of a format that needs torch or
h5py) must stay inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "polyak"
FRAMEWORKS = {"torch", "keras", "jax", "jaxlib", "tensorflow", "h5py", "matplotlib", "lightning", "transformers"}
FACES = {"torch", "keras", "cli", "demo", "lightning", "transformers"}


def _contracts() -> list[dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["importlinter"]["contracts"]


def _layered() -> set[str]:
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    names: set[str] = set()
    for layer in layers["layers"]:
        names.update(part.strip() for part in layer.replace("|", ":").split(":"))
    return names


def test_every_module_of_the_package_has_a_layer():
    children = {p.stem for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__")}
    children |= {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    unplaced = sorted(children - _layered())
    assert not unplaced, f"add these to the layers contract in pyproject.toml: {unplaced}"
    missing = sorted(_layered() - children)
    assert not missing, f"the layers contract names modules that do not exist: {missing}"


def test_every_module_below_the_faces_is_kept_free_of_frameworks():
    (forbidden,) = [c for c in _contracts() if c["type"] == "forbidden"]
    below = {name for name in _layered() if name not in FACES}
    sources = {m.removeprefix("polyak.") for m in forbidden["source_modules"]}
    assert sources == below, f"the forbidden contract's source_modules must be every module below the faces: add {sorted(below - sources)}"


def _module_level_imports(tree: ast.Module) -> list[tuple[int, str]]:
    """Imports executed when the module is imported: not inside a function body."""
    found: list[tuple[int, str]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((node.lineno, node.module))
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.orelse)
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(tree.body)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _below_faces() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.relative_to(SRC).parts[0] not in FACES)


@pytest.mark.parametrize("path", _below_faces(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_framework_import_at_module_level_below_the_faces(path):
    tree = ast.parse(path.read_text(), str(path))
    bad = [(line, name) for line, name in _module_level_imports(tree) if name.split(".")[0] in FRAMEWORKS]
    assert not bad, f"{path.relative_to(ROOT)} imports a framework at module level: {bad}; import it inside the function that needs it"


def test_the_module_level_check_sees_what_it_must():
    # The checker itself: module level (also under try/if/class) counts, function bodies
    # and TYPE_CHECKING blocks do not.
    tree = ast.parse(
        "import os\ntry:\n    import torch\nexcept ImportError:\n    pass\n"
        "class A:\n    import h5py\n"
        "def f():\n    import keras\n"
        "if TYPE_CHECKING:\n    import jax\n"
        "from matplotlib import pyplot\n"
    )
    assert [n for _, n in _module_level_imports(tree)] == ["os", "torch", "h5py", "matplotlib"]
