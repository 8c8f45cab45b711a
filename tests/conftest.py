"""Test configuration shared by every test module."""

import os
import subprocess

import pytest

# polyak starts Keras itself in tests: use the torch backend unless the user chose one.
os.environ.setdefault("KERAS_BACKEND", "torch")

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
