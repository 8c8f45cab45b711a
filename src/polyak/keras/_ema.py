"""``EMACallback``: an exponential moving average of a Keras model's weights during ``fit``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .._errors import ConfigError, PolyakError
from .._layout import compare_layouts
from .._schedules import DecaySchedule, make_schedule
from ._checkpoint import save_model_atomic
from ._names import variable_names

__all__ = ["EMACallback"]


def _torch_backend() -> bool:
    return keras.backend.backend() == "torch"


class _TorchOps:
    """Multi-tensor updates on the variables' own torch tensors (one kernel per list)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def values(self, variables: list[Any]) -> list[Any]:
        return [v.value for v in variables]

    def clone(self, tensors: list[Any]) -> list[Any]:
        with self.torch.no_grad():
            return [t.detach().clone() for t in tensors]

    def copy_(self, dst: list[Any], src: list[Any]) -> None:
        if dst:
            with self.torch.no_grad():
                self.torch._foreach_copy_(dst, src)

    def lerp_(self, avg: list[Any], cur: list[Any], weight: float) -> None:
        if avg:
            with self.torch.no_grad():
                self.torch._foreach_lerp_(avg, cur, weight)

    def to_numpy(self, t: Any) -> np.ndarray:
        return keras.ops.convert_to_numpy(t)

    def from_numpy(self, arr: np.ndarray, like: Any) -> Any:
        return self.torch.as_tensor(np.asarray(arr), device=like.device).to(like.dtype).clone()


class _KerasOps:
    """Backend-neutral updates through ``keras.ops`` (JAX, TensorFlow)."""

    def values(self, variables: list[Any]) -> list[Any]:
        return [v.value for v in variables]

    def clone(self, tensors: list[Any]) -> list[Any]:
        return [keras.ops.copy(t) for t in tensors]

    def copy_(self, dst: list[Any], src: list[Any]) -> None:  # dst: variables
        for v, s in zip(dst, src, strict=True):
            v.assign(s)

    def lerp_(self, avg: list[Any], cur: list[Any], weight: float) -> None:
        for i, (a, c) in enumerate(zip(avg, cur, strict=True)):
            avg[i] = keras.ops.add(a, keras.ops.multiply(keras.ops.subtract(c, a), keras.ops.cast(weight, a.dtype)))

    def to_numpy(self, t: Any) -> np.ndarray:
        return keras.ops.convert_to_numpy(t)

    def from_numpy(self, arr: np.ndarray, like: Any) -> Any:
        return keras.ops.convert_to_tensor(np.asarray(arr), dtype=like.dtype)


class EMACallback(keras.callbacks.Callback):
    """Keep an exponential moving average (EMA) of the model's weights during ``fit``.

    After every ``every`` optimizer steps (counted from ``optimizer.iterations``, so
    ``steps_per_execution`` is honoured) the average is updated as
    ``average ← d · average + (1 − d) · weights``, with ``d`` from
    :func:`polyak.make_schedule` (the same schedules as ``polyak.torch``): the first update
    copies the weights, later ones use the constant ``decay`` (or ``half_life``), with an
    optional ``"timm"`` / ``"tf"`` warmup. Validation inside ``fit`` (and ``predict``
    called from other callbacks during ``fit``) runs on the average: it is swapped in at
    ``on_test_begin`` / ``on_predict_begin`` and the raw weights are put back at the
    matching ``*_end``, so training continues from the raw weights. After ``fit`` the model
    keeps its raw weights unless ``apply_at_end=True``; the average is available from
    :meth:`average_weights`, :meth:`average_state` and :meth:`save`. Passing the callback
    to ``model.evaluate(..., callbacks=[ema])`` or ``predict`` evaluates the average.

    On the torch backend updates run as one multi-tensor ``torch._foreach_lerp_`` over the
    variables' own tensors; on other backends through ``keras.ops``.

    Differences from the optimizer's ``use_ema=True``: that one averages trainable weights
    only, overwrites the model's weights with the average at the end of ``fit``, has no
    warmup or half-life, and evaluates raw weights during ``fit``. With
    ``decay=m, include_non_trainable=False, apply_at_end=True`` this callback reproduces
    it (same first-copy and constant-momentum rule).

    Args:
        decay: Decay per update once warm, in ``[0, 1)``. Give this or ``half_life``.
        half_life: Optimizer steps after which a step's weight in the average has halved.
        warmup: ``None``, ``"timm"`` or ``"tf"`` (see :func:`polyak.make_schedule`).
        start_epoch: First epoch (0-based) whose steps update the average; the first
            update after it copies the weights.
        every: Optimizer steps between updates.
        include_non_trainable: Also average non-trainable floating variables (BatchNorm
            moving statistics); non-float variables are never averaged.
        apply_at_end: Leave the average in the model after ``fit``.
        save_path: Also write the average to this ``.weights.h5`` (or ``.keras``) file at
            the end of ``fit`` (crash-safe).

    Example:
        >>> ema = EMACallback(half_life=200)  # doctest: +SKIP
        >>> model.fit(x, y, epochs=20, validation_data=(xv, yv), callbacks=[ema])  # doctest: +SKIP
        >>> ema.save("ema.weights.h5")  # doctest: +SKIP
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        warmup: str | None = None,
        start_epoch: int = 0,
        every: int = 1,
        include_non_trainable: bool = False,
        apply_at_end: bool = False,
        save_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.schedule: DecaySchedule = make_schedule(decay, half_life=half_life, warmup=warmup, every=every)
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ConfigError(f"start_epoch must be a whole number ≥ 0, got {start_epoch!r}")
        self.start_epoch = start_epoch
        self.include_non_trainable = bool(include_non_trainable)
        self.apply_at_end = bool(apply_at_end)
        self.save_path = None if save_path is None else Path(save_path)
        self.count = 0  # updates applied
        self.last_step = -1  # optimizer step of the last update
        self._epoch = 0
        self._ops: Any = _TorchOps() if _torch_backend() else _KerasOps()
        self._vars: list[Any] = []  # averaged variables (floats)
        self._names: list[str] = []
        self._avg: list[Any] | None = None
        self._backup: list[Any] | None = None
        self._swapped = False
        self._pending: dict[str, Any] | None = None

    # -- which variables ------------------------------------------------------------------
    def _collect(self) -> None:
        model = self.model
        if not model.weights:
            raise PolyakError(
                "EMACallback: the model has no weights yet; build it (model.build(shape)) or "
                "call it on a batch before fit"
            )
        chosen = list(model.trainable_weights)
        if self.include_non_trainable:
            chosen += list(model.non_trainable_weights)
        chosen = [v for v in chosen if keras.backend.is_float_dtype(v.dtype)]
        ids = {id(v) for v in chosen}
        everything = list(model.weights)
        names = variable_names(model, everything)
        self._vars = [v for v in everything if id(v) in ids]
        self._names = [n for v, n in zip(everything, names, strict=True) if id(v) in ids]

    # -- callback hooks -------------------------------------------------------------------
    def on_train_begin(self, logs: Any = None) -> None:
        before = [id(v) for v in self._vars]
        self._collect()
        if self._avg is not None and before != [id(v) for v in self._vars]:
            raise PolyakError(
                "EMACallback: this callback already holds an average of another model; "
                "create a new EMACallback for each model"
            )
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if self._epoch < self.start_epoch:
            return
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if self.last_step >= 0 and step - self.last_step < self.schedule.every:
            return
        self.update(step=step)

    def update(self, *, step: int | None = None) -> None:
        """Fold the model's current weights into the average (called by the hooks)."""
        if not self._vars:
            self._collect()
        current = self._ops.values(self._vars)
        if self._avg is None or self.count == 0:
            self._avg = self._ops.clone(current)
        else:
            d = self.schedule(self.count)
            self._ops.lerp_(self._avg, current, 1.0 - d)
        self.count += 1
        if step is not None:
            self.last_step = step

    def _swap_in(self) -> None:
        if self._swapped or self._avg is None:
            return
        current = self._ops.values(self._vars)
        if self._backup is None or isinstance(self._ops, _KerasOps):
            self._backup = self._ops.clone(current)
        else:
            self._ops.copy_(self._backup, current)
        self._assign(self._avg)
        self._swapped = True

    def _swap_out(self) -> None:
        if not self._swapped or self._backup is None:
            return
        self._assign(self._backup)
        self._swapped = False

    def _assign(self, tensors: list[Any]) -> None:
        if isinstance(self._ops, _TorchOps):
            self._ops.copy_(self._ops.values(self._vars), tensors)
        else:
            for v, t in zip(self._vars, tensors, strict=True):
                v.assign(t)

    def on_test_begin(self, logs: Any = None) -> None:
        self._swap_in()

    def on_test_end(self, logs: Any = None) -> None:
        self._swap_out()

    def on_predict_begin(self, logs: Any = None) -> None:
        self._swap_in()

    def on_predict_end(self, logs: Any = None) -> None:
        self._swap_out()

    def on_train_end(self, logs: Any = None) -> None:
        self._swap_out()
        if self.save_path is not None and self._avg is not None:
            self.save(self.save_path)
        if self.apply_at_end and self._avg is not None:
            self._assign(self._avg)

    # -- results --------------------------------------------------------------------------
    def _require_average(self) -> list[Any]:
        if self._avg is None:
            raise PolyakError("EMACallback: no average yet; it is built by the first training step of fit()")
        return self._avg

    def average_weights(self) -> list[np.ndarray]:
        """The averaged model weights as a list like ``model.get_weights()`` (variables
        that are not averaged hold their current value)."""
        avg = self._require_average()
        by_id = {id(v): self._ops.to_numpy(a) for v, a in zip(self._vars, avg, strict=True)}
        return [by_id[id(v)] if id(v) in by_id else keras.ops.convert_to_numpy(v) for v in self.model.weights]

    def average_state(self) -> dict[str, np.ndarray]:
        """The averaged variables by ``.weights.h5`` tensor name (``layers/dense/vars/0``)."""
        avg = self._require_average()
        return {n: self._ops.to_numpy(a) for n, a in zip(self._names, avg, strict=True)}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model with the averaged weights to ``path`` (``.weights.h5`` or
        ``.keras``), crash-safely; the model keeps its current weights."""
        self._require_average()
        was_swapped = self._swapped
        self._swap_in()
        try:
            return save_model_atomic(self.model, Path(path), {"ema": self.get_state(arrays=False)})
        finally:
            if not was_swapped:
                self._swap_out()

    def get_state(self, *, arrays: bool = True) -> dict[str, Any]:
        """Plain-data state for resuming: schedule, counters and (with ``arrays``) the
        averaged arrays by tensor name."""
        state: dict[str, Any] = {
            "schedule": self.schedule.to_dict(),
            "count": self.count,
            "last_step": self.last_step,
            "start_epoch": self.start_epoch,
            "include_non_trainable": self.include_non_trainable,
        }
        if arrays:
            state["averages"] = self.average_state() if self._avg is not None else {}
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state`; applied now if the model is known, else at ``fit``."""
        self.schedule = DecaySchedule.from_dict(state["schedule"])
        self.start_epoch = int(state.get("start_epoch", self.start_epoch))
        self.include_non_trainable = bool(state.get("include_non_trainable", self.include_non_trainable))
        if getattr(self, "_model", None) is not None:
            self._collect()
            self._apply_state(state)
        else:
            self._pending = dict(state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        averages = dict(state.get("averages") or {})
        self.count = int(state["count"])
        self.last_step = int(state["last_step"])
        if not averages:
            self._avg = None
            self.count = 0
            return
        # Dtypes may differ: each average is converted to its variable's (from_numpy).
        compare_layouts(dict(zip(self._names, self._vars, strict=True)), averages, ("this model", "the saved average"),
                        dtypes=False).raise_if_any("EMACallback.set_state: the saved average does not fit this model",
                                                   fix="restore the state of an EMACallback of the same model")
        current = self._ops.values(self._vars)
        self._avg = [self._ops.from_numpy(averages[n], c) for n, c in zip(self._names, current, strict=True)]
