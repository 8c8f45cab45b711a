"""TEMPORARY stand-ins for polyak.keras / polyak.torch / keras format until they land in main."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np


class TorchSaver:
    def __init__(self, directory: Path, *, every: int = 1, unit: str = "epoch", start: int = 0, format: str = ".safetensors") -> None:
        self.directory = Path(directory)
        self.start = start
        self.directory.mkdir(parents=True, exist_ok=True)

    def maybe_save(self, module: Any, *, epoch: int) -> None:
        from .._inspect import save

        if epoch >= self.start:
            state = {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
            save(state, self.directory / f"model_{epoch}.safetensors", force=True)


def keras_callback(directory: Path, *, start_epoch: int, every: int = 1, format: str = ".keras") -> Any:
    import keras

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    class _CB(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if epoch >= start_epoch:
                self.model.save(directory / f"model_{epoch}.keras")

    return _CB()


def read_keras(path: Path) -> dict[str, np.ndarray]:
    import h5py

    with zipfile.ZipFile(path) as z:
        data = z.read("model.weights.h5")
    out: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(data), "r") as f:
        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset) and name.startswith("layers/"):
                out[name] = np.asarray(obj)
        f.visititems(visit)
    return out
