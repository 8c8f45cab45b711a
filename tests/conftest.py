"""Test configuration shared by every test module."""

import os

# polyak starts Keras itself in tests: use the torch backend unless the user chose one.
os.environ.setdefault("KERAS_BACKEND", "torch")
