"""Which Keras backend ``polyak demo`` trains on: the user's, else torch, else an installed one.

Keras fixes its backend when it is first imported, from ``KERAS_BACKEND`` or else the
``"backend"`` of ``keras.json`` (in ``$KERAS_HOME``, else ``~/.keras``, or
``/tmp/.keras`` when the home folder is not writable), and falls back to TensorFlow.
The demo respects both; only where neither names a backend does it choose, preferring
torch, then TensorFlow (Keras' default), then JAX, whichever is installed. Keras writes a
``keras.json`` naming TensorFlow the first time it is imported; from then on that file is
the configuration (the demo follows it while TensorFlow is installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .._errors import ConfigError

__all__ = ["PREFERENCE", "BackendChoice", "choose_keras_backend", "keras_config_path", "use_keras_backend"]

#: Backends tried, in order, where nothing is configured.
PREFERENCE = ("torch", "tensorflow", "jax")


@dataclass(frozen=True)
class BackendChoice:
    """A Keras backend and why it was chosen (shown in the demo's report).

    Attributes:
        name: ``"torch"``, ``"tensorflow"``, ``"jax"`` (or another Keras backend).
        reason: Where the choice came from, e.g. ``"set by KERAS_BACKEND"``.
    """

    name: str
    reason: str


def keras_config_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where Keras reads ``keras.json`` (its own rule: ``KERAS_HOME``, else ``~/.keras``)."""
    if "KERAS_HOME" in environ:
        return Path(environ["KERAS_HOME"]) / "keras.json"
    home = os.path.expanduser("~")
    base = home if os.access(home, os.W_OK) else "/tmp"
    return Path(base) / ".keras" / "keras.json"


def _installed(backend: str) -> bool:
    try:
        return importlib.util.find_spec(backend) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a stubbed module
        return False


def choose_keras_backend(environ: Mapping[str, str] = os.environ,
                         installed: Callable[[str], bool] = _installed) -> BackendChoice:
    """The backend Keras will run on in this process, choosing one where nothing is set.

    Args:
        environ: The environment (``KERAS_BACKEND``, ``KERAS_HOME``).
        installed: Whether a backend's package can be imported.

    Raises:
        ConfigError: ``KERAS_BACKEND`` names a backend that is not installed, or none of
            torch, TensorFlow and JAX is installed.

    Example:
        >>> choose_keras_backend({"KERAS_BACKEND": "jax"}, installed=lambda b: True)
        BackendChoice(name='jax', reason='set by KERAS_BACKEND')
    """
    found = [b for b in PREFERENCE if installed(b)]
    env = environ.get("KERAS_BACKEND", "")
    if env:
        if env in PREFERENCE and env not in found:
            raise ConfigError(f"KERAS_BACKEND={env}, but {env} is not installed; install it, or set KERAS_BACKEND "
                              f"to an installed backend ({', '.join(found) or 'none is installed'})")
        return BackendChoice(env, "set by KERAS_BACKEND")
    path = keras_config_path(environ)
    note = "nothing configured"  # + the preference below
    try:
        configured = json.loads(path.read_text()).get("backend")
    except (OSError, ValueError, AttributeError):
        configured = None
    if isinstance(configured, str) and configured:
        if configured not in PREFERENCE or configured in found:
            return BackendChoice(configured, f"set in {path}")
        note = f"{path} names {configured}, which is not installed"
    if not found:
        raise ConfigError("Keras needs a backend: install torch, tensorflow or jax (or run the demo with "
                          "--framework torch)")
    return BackendChoice(found[0], f"{note}; the first installed of {', '.join(PREFERENCE)}")


def use_keras_backend(environ: Mapping[str, str] = os.environ) -> BackendChoice:
    """:func:`choose_keras_backend`, then set ``KERAS_BACKEND`` for Keras and worker processes.

    Once Keras is imported its backend is fixed, and that is the answer.
    """
    if "keras" in sys.modules:
        import keras

        choice = BackendChoice(keras.backend.backend(), "Keras was already imported")
    else:
        choice = choose_keras_backend(environ)
    os.environ["KERAS_BACKEND"] = choice.name
    return choice
