"""Test configuration shared by every test module."""

import os
import subprocess

import pytest

# polyak starts Keras itself in tests: use the torch backend unless the user chose one.
# `make test` runs the tests marked `keras` again under jax and tensorflow (Keras fixes
# its backend at import, so one pytest process per backend).
os.environ.setdefault("KERAS_BACKEND", "torch")

#: Under ``POLYAK_IN_PROCESS_ONLY=1`` (``make mutate``): test files that start Keras or torch
#: models run after the others, so that a mutant is usually killed by a fast test first.
_SLOW_FILES = ("test_keras", "test_torch", "test_hostile", "test_format_registry", "test_sweep_cli",
               "test_reliability_numerics", "test_lightning", "test_transformers", "test_posthoc", "test_hf_folders")

if os.environ.get("POLYAK_IN_PROCESS_ONLY") == "1":
    # `make mutate` (tests/mutation/mutate.py) changes the code inside the test process; a
    # polyak started in a subprocess runs the unchanged code, so a test that starts one can
    # only cost time there: it is skipped at that point (fixtures of any scope included).

    class _InProcessOnly(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *args, **kwargs) -> None:
            if "PYTEST_CURRENT_TEST" in os.environ:
                pytest.skip("starts a subprocess: not part of the in-process (mutation) run")
            super().__init__(*args, **kwargs)

    subprocess.Popen = _InProcessOnly  # type: ignore[misc]

    def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
        items.sort(key=lambda item: item.path.name.startswith(_SLOW_FILES))

def pytest_report_header(config):  # type: ignore[no-untyped-def]
    return f"keras backend: {os.environ['KERAS_BACKEND']} (KERAS_BACKEND)"
