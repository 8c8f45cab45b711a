"""``EMACallback``: an exponential moving average of a Keras model's weights during ``fit``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import keras
import numpy as np

from .._dtypes import dtype_from_name
from .._errors import PolyakError, whole_number
from .._online import Cadence, EMAWeights, OnlineAverage, check_saved_tensors, read_record
from .._schedules import DecaySchedule, make_schedule
from ._checkpoint import save_model_atomic
from ._names import variable_names
from ._ops import backend_ops

__all__ = ["EMACallback"]


class EMACallback(keras.callbacks.Callback):
    """Keep an exponential moving average (EMA) of the model's weights during ``fit``.

    After optimizer steps (``optimizer.iterations``) the average is updated as
    ``average ← d · average + (1 − d) · weights``, with ``d`` from
    :func:`polyak.make_schedule` (the same schedules as ``polyak.torch``): the first
    averaged update copies the weights, later ones use the constant ``decay`` (or
    ``half_life``), with an optional ``"timm"`` / ``"tf"`` warmup. Steps are counted as in
    ``polyak.torch.EMA`` (one core, :mod:`polyak._online`): before the start step the
    average follows the weights (a copy); the first optimizer step of epoch
    ``start_epoch`` is the start step, and the steps ``start``, ``start + every``, ...
    are averaged, also in later ``fit`` calls. With ``steps_per_execution=k`` the callback
    sees the weights once per k optimizer steps; an update then stands in for every due
    step it covers (an EMA moves by ``1 − d^m`` for m steps), so ``decay``, ``half_life``
    and warmups mean optimizer steps whatever ``k`` is. Between updates a batch costs a
    counter: the model and ``optimizer.iterations`` are read only when an update is due
    (on JAX, reading the model attaches the trained state to it).

    Validation inside ``fit`` (and ``predict`` called from other callbacks during
    ``fit``) runs on the average: it is swapped in at ``on_test_begin`` /
    ``on_predict_begin`` and the raw weights are put back at the matching ``*_end``, so
    training continues from the raw weights. After ``fit`` the model
    keeps its raw weights unless ``apply_at_end=True``; the average is available from
    :meth:`average_weights`, :meth:`average_state` and :meth:`save`. Passing the callback
    to ``model.evaluate(..., callbacks=[ema])`` or ``predict`` evaluates the average.

    Averages of bfloat16/float16 variables are kept in float32 on every backend. An
    update is one call over all variables (:func:`polyak.keras._ops.backend_ops`): grouped
    ``torch._foreach_lerp_`` over the variables' own tensors on torch (the kernels of
    ``polyak.torch``), one jitted XLA computation with the averages' buffers donated on
    JAX, one XLA-compiled ``tf.function`` over ``tf.Variable`` averages on TensorFlow.

    Differences from the optimizer's ``use_ema=True``: that one averages trainable weights
    only, overwrites the model's weights with the average at the end of ``fit``, has no
    warmup or half-life, and evaluates raw weights during ``fit``. With
    ``decay=m, include_non_trainable=False, apply_at_end=True`` this callback reproduces
    it (same first-copy and constant-momentum rule), also with ``steps_per_execution``
    on JAX and TensorFlow as far as the callback sees the weights (once per execution).

    Args:
        decay: Decay per update once warm, in ``[0, 1)``. Give this, ``half_life`` or ``sigma_rel``.
        half_life: Optimizer steps after which a step's weight in the average has halved.
        sigma_rel: A power-function EMA (Karras et al. 2024) of this width relative to the
            run so far (0.05, 0.10 in EDM2); see :class:`PostHocEMACallback` to choose the
            width after training.
        warmup: ``None``, ``"timm"`` or ``"tf"`` (see :func:`polyak.make_schedule`).
        start_epoch: First epoch (0-based) whose steps are averaged; its first optimizer
            step is the start step, whose update copies the weights.
        every: Optimizer steps between averaged updates.
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
        sigma_rel: float | None = None,
        warmup: str | None = None,
        start_epoch: int = 0,
        every: int = 1,
        include_non_trainable: bool = False,
        apply_at_end: bool = False,
        save_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        schedule = make_schedule(decay, half_life=half_life, sigma_rel=sigma_rel, warmup=warmup, every=every)
        self.start_epoch = whole_number(start_epoch, "start_epoch", 0)
        self.include_non_trainable = bool(include_non_trainable)
        self.apply_at_end = bool(apply_at_end)
        self.save_path = None if save_path is None else Path(save_path)
        # The start step is fixed by the first step of start_epoch (None until then).
        self._core: OnlineAverage[Any, Any] = OnlineAverage(
            EMAWeights(schedule), Cadence(None, schedule.every), backend_ops())
        self._epoch = 0
        # Optimizer steps counted without reading the model: the last value read from
        # optimizer.iterations plus each batch's steps (from the batch indices Keras gives,
        # which advance by steps_per_execution); the step of the next due update.
        self._seen = 0
        self._last_batch = -1
        self._due = 0
        self._vars: list[Any] = []  # averaged variables (floats), in the order of the state
        self._names: list[str] = []
        self._backup: list[Any] | None = None
        self._swapped = False
        self._pending: dict[str, Any] | None = None

    # -- settings and counters (held by the core) ----------------------------------------
    @property
    def schedule(self) -> DecaySchedule:
        """The decay schedule (:func:`polyak.make_schedule`)."""
        return cast(EMAWeights, self._core.weights).schedule

    @property
    def every(self) -> int:
        """Optimizer steps between averaged updates."""
        return self._core.cadence.every

    @property
    def start(self) -> int | None:
        """The optimizer step averaging started at (the first step of ``start_epoch``), once known."""
        return self._core.cadence.start

    @property
    def count(self) -> int:
        """Due optimizer steps averaged (0: the average still follows the weights); with
        ``steps_per_execution`` an update counts every due step it stands in for."""
        return self._core.state.count

    @property
    def last_step(self) -> int:
        """The last optimizer step seen."""
        return self._core.state.step

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

    def _start_averages(self) -> None:
        self._core.reset(self._names, self._vars, [True] * len(self._vars))

    # -- callback hooks -------------------------------------------------------------------
    def on_train_begin(self, logs: Any = None) -> None:
        before = [id(v) for v in self._vars]
        self._collect()
        if self._core.state.tensors and before != [id(v) for v in self._vars]:
            raise PolyakError(
                "EMACallback: this callback already holds an average of another model; "
                "create a new EMACallback for each model"
            )
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        elif not self._core.state.tensors:
            self._start_averages()

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self._epoch = epoch
        self._last_batch = -1
        self._seen = self._iterations()  # the state is attached at an epoch's start: no sync
        cadence = self._core.cadence
        if cadence.start is None and epoch >= self.start_epoch:
            # The epoch's first optimizer step, also inside a steps_per_execution block.
            self._core.cadence = Cadence(self._seen + 1, cadence.every)
        self._due = self._core.cadence.next_due(self._core.state.step)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        # A counter between updates: touching the model would sync every variable on JAX.
        self._seen += max(1, batch - self._last_batch)
        self._last_batch = batch
        if self._seen >= self._due:
            self._update_at_optimizer_step()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        # Catch up with the true step (the state is attached again at an epoch's end), so
        # that last_step and a saved state are exact; an update that is due still happens.
        self._update_at_optimizer_step()

    def _iterations(self) -> int:
        return int(keras.ops.convert_to_numpy(self._synced_model().optimizer.iterations))

    def _synced_model(self) -> Any:
        """The model with its current weights: on JAX, Keras keeps the trained state apart
        from the variables during an epoch and ``Callback.model`` attaches it."""
        return self.model

    def _update_at_optimizer_step(self) -> None:
        """An update is due by the count: read the true step and update for it."""
        now = self._iterations()
        self._seen = now
        if now != self._core.state.step:  # the same step again: the weights did not move
            self.update(step=now)
        self._due = self._core.cadence.next_due(self._core.state.step)

    def update(self, *, step: int | None = None) -> None:
        """Fold the model's current weights into the average (called after each optimizer step).

        Args:
            step: The optimizer step just completed (default: one more than the last).
                Before the start step the average follows the weights (copy). The start
                step (averaged: a copy) is fixed when epoch ``start_epoch`` begins in
                ``fit``, else by the first step seen in that epoch or later; then the steps
                ``start + k·every`` are averaged (a step that jumps over some of them, as
                with ``steps_per_execution``, stands in for all).
        """
        self._synced_model()
        if not self._core.state.tensors:
            self._collect()
            self._start_averages()
        cadence = self._core.cadence
        if cadence.start is None and self._epoch >= self.start_epoch:
            now = self._core.state.step + 1 if step is None else whole_number(step, "step", 0)
            self._core.cadence = Cadence(now, cadence.every)
        self._core.update(lambda: self._vars, step=step)

    def _swap_in(self) -> None:
        if self._swapped or not self._core.state.tensors:
            return
        self._synced_model()
        self._backup = self._core.ops.backup(self._vars, self._backup)
        self._core.ops.assign(self._vars, self._core.averages())
        self._swapped = True

    def _swap_out(self) -> None:
        if not self._swapped or self._backup is None:
            return
        self._core.ops.assign(self._vars, self._backup)
        self._swapped = False

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
        if self.save_path is not None and self._core.state.tensors:
            self.save(self.save_path)
        if self.apply_at_end and self._core.state.tensors:
            self._core.ops.assign(self._vars, self._core.averages())

    # -- results --------------------------------------------------------------------------
    def _require_average(self) -> list[Any]:
        if not self._core.state.tensors:
            raise PolyakError("EMACallback: no average yet; it is built when fit() begins")
        return self._core.averages()

    def average_weights(self) -> list[np.ndarray]:
        """The averaged model weights as a list like ``model.get_weights()``, in the variables'
        dtypes (variables that are not averaged hold their current value)."""
        avg = self._require_average()
        ops = self._core.ops
        by_id = {id(v): np.asarray(ops.to_numpy(a)).astype(dtype_from_name(keras.backend.standardize_dtype(v.dtype)))
                 for v, a in zip(self._vars, avg, strict=True)}
        return [by_id[id(v)] if id(v) in by_id else keras.ops.convert_to_numpy(v) for v in self.model.weights]

    def average_state(self) -> dict[str, np.ndarray]:
        """The averaged variables by ``.weights.h5`` tensor name (``layers/dense/vars/0``), in
        the accumulator dtype (float32 for bfloat16/float16 variables)."""
        avg = self._require_average()
        return {n: np.asarray(self._core.ops.to_numpy(a)) for n, a in zip(self._names, avg, strict=True)}

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
        """Plain-data state for resuming, in the layout of ``polyak.torch``'s ``state_dict()``.

        ``{"kind": "ema", "step", "count", "config", "tensors"}``: ``config`` holds
        ``start`` (the start step, ``None`` before ``start_epoch``), ``every``, the
        ``schedule``, ``start_epoch`` and ``include_non_trainable``; ``tensors`` (with
        ``arrays``) the averages by tensor name as numpy arrays.
        """
        config = self._core.config(start_epoch=self.start_epoch, include_non_trainable=self.include_non_trainable)
        if not arrays:
            return self._core.record(config)
        return self._core.record(config, self.average_state() if self._core.state.tensors else {})

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state` (also a 0.1 ``get_state()`` dict); applied now if the
        model is known, else when ``fit`` begins."""
        record = read_record(state, kind=self._core.kind)
        config = record["config"]
        self._core.configure(config)
        self.start_epoch = whole_number(config.get("start_epoch", self.start_epoch), "start_epoch", 0)
        self.include_non_trainable = bool(config.get("include_non_trainable", self.include_non_trainable))
        if getattr(self, "_model", None) is not None:
            self._collect()
            self._apply_state(record)
        else:
            self._pending = record

    def _apply_state(self, record: Mapping[str, Any]) -> None:
        saved = dict(record.get("tensors") or {})
        self._start_averages()
        state = self._core.state
        state.step, state.count = record["step"], record["count"]
        if not saved:  # no arrays: averaging starts again from the current weights
            state.count = 0
            return
        # Dtypes may differ: each average is converted to its accumulator's (from_numpy).
        check_saved_tensors(dict(zip(self._names, self._vars, strict=True)), saved, ("this model", "the saved average"),
                            what="EMACallback.set_state: the saved average does not fit this model",
                            fix="restore the state of an EMACallback of the same model")
        ops = self._core.ops
        self._core.set_tensors({n: ops.from_numpy(saved[n], like) for n, like in state.tensors.items()},
                               self._core.averaged)
