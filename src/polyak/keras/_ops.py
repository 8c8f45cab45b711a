"""The tensor work of the Keras averagers, one :class:`~polyak._online.AveragerOps` per backend.

:func:`backend_ops` is the one place that looks at the Keras backend:

* torch: :class:`VariableTorchOps`, :class:`polyak._online_torch.TorchOps` over the
  variables' own tensors (grouped ``torch._foreach_lerp_``, staged through a float32
  buffer for bfloat16 variables), the kernels of ``polyak.torch.EMA``;
* JAX: :class:`JaxOps`, one jitted XLA computation per update over every variable, the
  averages' buffers donated to it (updated in place, no allocation per step);
* TensorFlow: :class:`TensorFlowOps`, averages held in ``tf.Variable`` objects and
  updated in place by one XLA-compiled ``tf.function`` per update;
* any other backend: :class:`KerasOps`, through ``keras.ops`` (one op per variable).

Live items are Keras variables; averages of bfloat16/float16 variables are kept in
float32 on every backend (:func:`polyak._online.accumulator_dtype_name`). Every path that
copies between a variable and an average (``init``, ``assign``, ``backup``,
``from_numpy``) makes a new buffer: Keras' JAX trainer donates the variables' buffers to
its jitted steps, so an average that shared one would be deleted by the next step.

jax and tensorflow are imported only by the class of their backend, when it is used.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np

from .._online import AveragerOps, accumulator_dtype_name
from .._online_torch import TorchOps

__all__ = ["JaxOps", "KerasOps", "TensorFlowOps", "VariableTorchOps", "backend_ops"]


def _dtype(x: Any) -> str:
    return str(keras.backend.standardize_dtype(x.dtype))


def _targets(live: Sequence[Any], averaged: Sequence[bool]) -> tuple[str, ...]:
    """The dtypes averages of ``live`` are kept in (float32 for narrow floats)."""
    return tuple(accumulator_dtype_name(_dtype(v)) if a else _dtype(v) for v, a in zip(live, averaged, strict=True))


class VariableTorchOps(TorchOps):
    """:class:`TorchOps` reading Keras variables (torch backend: ``variable.value`` is a tensor)."""

    def read(self, live: Sequence[Any]) -> list[Any]:
        return [v.value for v in live]


class KerasOps:
    """Backend-neutral updates through ``keras.ops`` (new arrays each update)."""

    def init(self, live: Sequence[Any], averaged: Sequence[bool]) -> list[Any]:
        return [_copy_as(v.value, t) for v, t in zip(live, _targets(live, averaged), strict=True)]

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
        return np.array(keras.ops.convert_to_numpy(value))

    def from_numpy(self, array: Any, like: Any) -> Any:
        return keras.ops.convert_to_tensor(np.array(array), dtype=_dtype(like))


def _copy_as(x: Any, dtype: Any) -> Any:
    """``x`` in ``dtype``, never the same buffer (``cast`` to its own dtype returns ``x``)."""
    if keras.backend.standardize_dtype(x.dtype) == keras.backend.standardize_dtype(dtype):
        return keras.ops.copy(x)
    return keras.ops.cast(x, dtype)


# -- JAX ----------------------------------------------------------------------------------

@functools.cache
def _jax_kernels() -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """``(lerp, refill, convert)``, jitted once per process (XLA caches per tree of shapes)."""
    import jax
    import jax.numpy as jnp

    def lerp(avgs: tuple[Any, ...], curs: tuple[Any, ...], weight: Any, averaged: tuple[bool, ...]) -> tuple[Any, ...]:
        out = []
        for a, c, is_avg in zip(avgs, curs, averaged, strict=True):
            c = c.astype(a.dtype)
            out.append(a + weight * (c - a) if is_avg else jnp.array(c, copy=True))
        return tuple(out)

    def refill(dst: tuple[Any, ...], src: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(jnp.array(s, dtype=d.dtype, copy=True) for d, s in zip(dst, src, strict=True))

    def convert(src: tuple[Any, ...], dtypes: tuple[str, ...]) -> tuple[Any, ...]:
        return tuple(jnp.array(s, dtype=d, copy=True) for s, d in zip(src, dtypes, strict=True))

    # The first argument's buffers are donated: XLA writes the result into them.
    return (jax.jit(lerp, donate_argnums=0, static_argnums=3), jax.jit(refill, donate_argnums=0),
            jax.jit(convert, static_argnums=1))


class JaxOps:
    """JAX backend: every update is one jitted XLA computation over all the variables.

    ``avg ← avg + w·(current − avg)`` for the whole tree in one fused computation whose
    inputs are the variables' current arrays and the averages; the averages' buffers are
    donated to it, so XLA writes the new averages into them (no allocation per step) and
    the arrays passed in are deleted: hold averages only through the returned list.
    ``weight == 1`` copies exactly (a separate computation). Copies into and out of the
    variables are fresh arrays (jitted, one call for all variables), never a variable's
    buffer, which Keras' trainer donates to its own steps. The caller syncs the model's
    state first (``model.jax_state_sync()``): mid-epoch the variables hold stale values.
    """

    def read(self, live: Sequence[Any]) -> tuple[Any, ...]:
        """The variables' current arrays."""
        return tuple(v.value for v in live)

    def init(self, live: Sequence[Any], averaged: Sequence[bool]) -> list[Any]:
        convert = _jax_kernels()[2]
        return list(convert(self.read(live), _targets(live, averaged)))

    def update(self, averages: list[Any], live: Sequence[Any], weight: float, averaged: Sequence[bool]) -> list[Any]:
        lerp, refill, _ = _jax_kernels()
        if weight == 1.0:
            return list(refill(tuple(averages), self.read(live)))
        return list(lerp(tuple(averages), self.read(live), weight, tuple(averaged)))

    def assign(self, live: Sequence[Any], values: Sequence[Any]) -> None:
        convert = _jax_kernels()[2]
        fresh = convert(tuple(values), tuple(_dtype(v) for v in live))
        for v, x in zip(live, fresh, strict=True):
            v.assign(x)

    def backup(self, live: Sequence[Any], into: list[Any] | None = None) -> list[Any]:
        _, refill, convert = _jax_kernels()
        current = self.read(live)
        if into is not None and len(into) == len(current) and all(
                (a.shape, a.dtype) == (b.shape, b.dtype) for a, b in zip(into, current, strict=True)):
            return list(refill(tuple(into), current))  # into's buffers are reused (donated)
        return list(convert(current, tuple(_dtype(v) for v in live)))

    def to_numpy(self, value: Any) -> np.ndarray:
        # A copy: np.asarray would view the buffer, which the next update reuses.
        return np.array(value)

    def from_numpy(self, array: Any, like: Any) -> Any:
        import jax
        import jax.numpy as jnp

        return jax.device_put(jnp.array(np.asarray(array), dtype=like.dtype, copy=True), like.sharding)


# -- TensorFlow ---------------------------------------------------------------------------

class _TFPlan:
    """The compiled update for one set of averages and live variables."""

    def __init__(self, averages: list[Any], sources: list[Any], averaged: Sequence[bool]) -> None:
        import tensorflow as tf

        self.averages, self.sources, self.averaged = averages, sources, averaged
        pairs = list(zip(averages, sources, averaged, strict=True))

        def lerp(weight: Any) -> None:
            copy = tf.equal(weight, 1.0)  # the first update copies exactly
            for a, s, is_avg in pairs:
                cur = tf.cast(s, a.dtype)
                if is_avg:
                    cur = tf.where(copy, cur, a + tf.cast(weight, a.dtype) * (cur - a))
                a.assign(cur)

        # XLA fuses each variable's update into one pass (read both, write the average);
        # without it TF runs four ops and writes three temporaries per variable. Traced
        # once per plan (the weight is a tensor argument); calling the concrete function
        # skips tf.function's argument matching on every update.
        self.lerp = tf.function(lerp, jit_compile=True).get_concrete_function(tf.TensorSpec([], tf.float64))

    def fits(self, averages: list[Any], sources: list[Any], averaged: Sequence[bool]) -> bool:
        return (averaged is self.averaged and len(sources) == len(self.sources)
                and all(map(operator.is_, averages, self.averages))
                and all(map(operator.is_, sources, self.sources)))


class TensorFlowOps:
    """TensorFlow backend: averages in ``tf.Variable`` objects, updated in place by one ``tf.function``.

    The function (XLA-compiled; the weight is a tensor argument, so it is traced once)
    reads every live variable and updates every average; it is built for one set of
    averages and variables and rebuilt when either changes (new averages after a loaded
    state, another model). ``weight == 1`` copies exactly (a select in the same function).
    Copies into the model use
    ``assign`` (TensorFlow variables never share a buffer with another variable).
    """

    def __init__(self) -> None:
        self._plan: _TFPlan | None = None

    def read(self, live: Sequence[Any]) -> list[Any]:
        """The ``tf.Variable`` (or tensor) behind each Keras variable."""
        return [v.value for v in live]

    def init(self, live: Sequence[Any], averaged: Sequence[bool]) -> list[Any]:
        import tensorflow as tf

        return [tf.Variable(tf.cast(s, t), trainable=False)
                for s, t in zip(self.read(live), _targets(live, averaged), strict=True)]

    def update(self, averages: list[Any], live: Sequence[Any], weight: float, averaged: Sequence[bool]) -> list[Any]:
        import tensorflow as tf

        sources = self.read(live)
        plan = self._plan
        if plan is None or not plan.fits(averages, sources, averaged):
            plan = self._plan = _TFPlan(averages, sources, averaged)
        plan.lerp(tf.constant(weight, tf.float64))
        return averages

    def assign(self, live: Sequence[Any], values: Sequence[Any]) -> None:
        import tensorflow as tf

        for v, x in zip(live, values, strict=True):
            v.assign(tf.cast(x, v.dtype))

    def backup(self, live: Sequence[Any], into: list[Any] | None = None) -> list[Any]:
        import tensorflow as tf

        current = self.read(live)
        if into is not None and len(into) == len(current) and all(
                isinstance(a, tf.Variable) and (a.shape, a.dtype) == (b.shape, b.dtype)
                for a, b in zip(into, current, strict=True)):
            for a, b in zip(into, current, strict=True):
                a.assign(b)
            return into
        return [tf.Variable(tf.identity(b), trainable=False) for b in current]

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.array(value.numpy())

    def from_numpy(self, array: Any, like: Any) -> Any:
        import tensorflow as tf

        with tf.device(like.device):
            return tf.Variable(tf.cast(np.asarray(array), like.dtype), trainable=False)


def backend_ops() -> AveragerOps[Any, Any]:
    """The :class:`~polyak._online.AveragerOps` for the running Keras backend."""
    backend = keras.backend.backend()
    if backend == "torch":
        return VariableTorchOps()
    if backend == "jax":
        return JaxOps()
    if backend == "tensorflow":
        return TensorFlowOps()
    return KerasOps()
