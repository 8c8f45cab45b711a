"""The Examples in the core modules' docstrings run as written."""

import doctest
import importlib

import pytest

CORE = [
    "polyak",
    "polyak._schemes",
    "polyak._schedules",
    "polyak._engine.average",
    "polyak._engine.kernel",
    "polyak._engine.members",
    "polyak._engine.parallel",
    "polyak.formats.safetensors",
    "polyak._choose.select",
    "polyak._choose.metrics",
    "polyak._atomic",
    "polyak._layout",
    "polyak._engine.inspect",
    "polyak._progress",
    "polyak._errors",
    "polyak._online",
    "polyak._retention",
    "polyak._json",
    "polyak._dtypes",
    "polyak.formats._base",
    "polyak._posthoc",
]


@pytest.mark.parametrize("name", CORE)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


#: Modules of the torch face whose Examples run here (torch is a dev dependency).
TORCH = ["polyak.torch._common", "polyak.torch._load"]


@pytest.mark.parametrize("name", TORCH)
def test_torch_docstring_examples(name):
    pytest.importorskip("torch")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
