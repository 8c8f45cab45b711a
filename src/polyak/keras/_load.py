"""Loading whole Keras models from files, with Keras' safe mode left on."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import keras

from .._errors import PolyakError, UnsafeFileError
from .._json import parse_json

__all__ = ["lambda_layers", "load_model"]


def load_model(path: Path, *, compile: bool = True) -> Any:
    """``keras.models.load_model(path, safe_mode=True)``, refusals as polyak errors.

    Keras' safe mode refuses to deserialise a ``Lambda`` layer whose function is Python
    bytecode (it would run code from the file); polyak never turns it off. The refusal is
    raised as :class:`~polyak.UnsafeFileError` naming the file and the layers.

    Raises:
        UnsafeFileError: The model holds code that only an unsafe load would run.
    """
    try:
        return keras.models.load_model(path, compile=compile, safe_mode=True)
    except ValueError as exc:
        if "safe_mode" not in str(exc):
            raise
        names = lambda_layers(path)
        which = f"its Lambda layer{'s' if len(names) > 1 else ''} {', '.join(map(repr, names))}" if names else "a layer"
        raise UnsafeFileError(
            f"{path}: refused to load: {which} hold{'s' if len(names) <= 1 else ''} a Python function "
            "(bytecode) that only an unsafe load would run, and polyak keeps Keras' safe_mode on. "
            "If you trust this file, load it yourself with keras.models.load_model(path, "
            "safe_mode=False); or build the model in code, load the file's weights into it "
            "(model.load_weights) and average those (polyak.average reads .keras files without "
            "deserialising layers)"
        ) from None


def _model_config(path: Path) -> bytes | str | None:
    """The model config JSON stored in a ``.keras`` archive or a legacy ``.h5`` file."""
    try:
        if zipfile.is_zipfile(path):
            from ..formats.keras_archive import CONFIG, read_member

            with zipfile.ZipFile(path) as zf:
                return read_member(zf, CONFIG, str(path))
        import h5py

        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
        return raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, PolyakError):
        return None


def lambda_layers(path: Path) -> list[str]:
    """The names of the ``Lambda`` layers in a saved model's config (none if unreadable)."""
    raw = _model_config(path)
    if raw is None:
        return []
    try:
        config = parse_json(raw, str(path), "model config")
    except PolyakError:
        return []
    names: list[str] = []
    stack = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                inner = node.get("config")
                name = inner.get("name") if isinstance(inner, dict) else None
                names.append(str(name) if name is not None else "?")
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))
    return names
