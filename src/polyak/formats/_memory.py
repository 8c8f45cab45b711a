"""In-memory states (dicts of numpy arrays, torch tensors, lists) as tensor sources."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._errors import ConfigError
from ._base import TensorInfo, TensorSource


def to_numpy(value: Any) -> np.ndarray:
    """A numpy array for a numpy array, torch tensor, Keras/jax array or nested list.

    Frameworks are recognised through ``sys.modules`` only: if torch was never imported,
    the value cannot be a torch tensor, and polyak does not import it to check.
    """
    if isinstance(value, np.ndarray):
        return value
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        from .torch_pt import tensor_to_numpy

        return tensor_to_numpy(value)
    if hasattr(value, "numpy") and callable(value.numpy):
        return np.asarray(value.numpy())
    return np.asarray(value)


class MappingSource(TensorSource):
    """A name-keyed mapping held in memory (e.g. ``model.state_dict()``)."""

    format_name = "memory"
    zero_copy = True

    def __init__(self, state: Mapping[str, Any], label: str) -> None:
        super().__init__(None, label)
        if not isinstance(state, Mapping):
            raise ConfigError(f"{label}: expected a mapping of tensor names to arrays, got {type(state).__name__}")
        self._arrays: dict[str, np.ndarray] = {}
        for name, value in state.items():
            if not isinstance(name, str):
                raise ConfigError(f"{label}: tensor names must be strings, got {name!r}")
            arr = to_numpy(value)
            if arr.dtype.hasobject:
                raise ConfigError(f"{label}: tensor {name!r} is not numeric")
            self._arrays[name] = arr
        self._infos = {n: TensorInfo(n, tuple(a.shape), a.dtype) for n, a in self._arrays.items()}

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        return self._arrays[name]
