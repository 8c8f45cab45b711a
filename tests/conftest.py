"""Test configuration shared by every test module."""

import os

# polyak starts Keras itself in tests: use the torch backend unless the user chose one.
# `make test` runs the tests marked `keras` again under jax and tensorflow (Keras fixes
# its backend at import, so one pytest process per backend).
os.environ.setdefault("KERAS_BACKEND", "torch")


def pytest_report_header(config):  # type: ignore[no-untyped-def]
    return f"keras backend: {os.environ['KERAS_BACKEND']} (KERAS_BACKEND)"
