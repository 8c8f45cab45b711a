"""The tensor work of :class:`~polyak.keras.EMACallback`, one :class:`~polyak._online.AveragerOps` per backend.

:func:`backend_ops` is the one place that looks at the Keras backend:

* torch: :class:`polyak._online_torch.TorchOps` over the variables' own tensors (grouped
  ``torch._foreach_lerp_``, staged through a float32 buffer for bfloat16 variables), the
  same kernels as ``polyak.torch.EMA``;
* any other backend (JAX, TensorFlow): :class:`KerasOps`, through ``keras.ops``. A
  compiled update for one of them (a jitted JAX function, a ``tf.function``) is another
  class with the same methods, returned here for its backend.

Live items are Keras variables; averages of bfloat16/float16 variables are kept in
float32 on every backend (:func:`polyak._online.accumulator_dtype_name`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from .._online import AveragerOps, accumulator_dtype_name
from .._online_torch import TorchOps

__all__ = ["KerasOps", "VariableTorchOps", "backend_ops"]


class VariableTorchOps(TorchOps):
    """:class:`TorchOps` reading Keras variables (torch backend: ``variable.value`` is a tensor)."""

    def read(self, live: Sequence[Any]) -> list[Any]:
        return [v.value for v in live]


class KerasOps:
    """Backend-neutral updates through ``keras.ops`` (new arrays each update, as JAX needs)."""

    def init(self, live: Sequence[Any], averaged: Sequence[bool]) -> list[Any]:
        out = []
        for v, is_avg in zip(live, averaged, strict=True):
            target = accumulator_dtype_name(v.dtype) if is_avg else v.dtype
            out.append(_copy_as(v.value, target))
        return out

    def update(self, averages: list[Any], live: Sequence[Any], weight: float, averaged: Sequence[bool]) -> list[Any]:
        out = []
        for a, v, is_avg in zip(averages, live, averaged, strict=True):
            cur = _copy_as(v.value, a.dtype)
            if is_avg and weight != 1.0:
                cur = keras.ops.add(a, keras.ops.multiply(keras.ops.subtract(cur, a), keras.ops.cast(weight, a.dtype)))
            out.append(cur)
        return out

    def assign(self, live: Sequence[Any], values: Sequence[Any]) -> None:
        for v, x in zip(live, values, strict=True):
            v.assign(_copy_as(x, v.dtype))

    def backup(self, live: Sequence[Any], into: list[Any] | None = None) -> list[Any]:
        return [keras.ops.copy(v.value) for v in live]

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(keras.ops.convert_to_numpy(value))

    def from_numpy(self, array: Any, like: Any) -> Any:
        return keras.ops.convert_to_tensor(np.asarray(array), dtype=keras.backend.standardize_dtype(like.dtype))


def _copy_as(x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype``, never the same buffer (``cast`` to its own dtype returns ``x``)."""
    if keras.backend.standardize_dtype(x.dtype) == keras.backend.standardize_dtype(dtype):
        return keras.ops.copy(x)
    return keras.ops.cast(x, dtype)


def backend_ops() -> AveragerOps[Any, Any]:
    """The :class:`~polyak._online.AveragerOps` for the running Keras backend."""
    if keras.backend.backend() == "torch":
        return VariableTorchOps()
    return KerasOps()
