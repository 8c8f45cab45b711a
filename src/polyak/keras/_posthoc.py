"""``PostHocEMACallback``: power-function EMAs of a Keras model with snapshots on disk."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .._errors import ConfigError, FormatError, PolyakError, whole_number
from .._json import json_object
from .._online import (
    AVERAGER_META_KEY,
    Cadence,
    EMAWeights,
    OnlineAverage,
    check_saved_tensors,
    read_record,
)
from .._posthoc import (
    DEFAULT_SIGMA_RELS,
    SNAPSHOT_KEY,
    SnapshotRecord,
    capture_counters,
    capture_state,
    check_capture_state,
    check_sigma_rels,
    snapshot_due,
    snapshot_name,
)
from .._schedules import make_schedule
from ._names import variable_names
from ._ops import backend_ops

__all__ = ["PostHocEMACallback"]


class PostHocEMACallback(keras.callbacks.Callback):
    """Track power-function EMAs during ``fit`` and store snapshots, to choose the EMA width afterwards.

    Keeps one power-function EMA per ``sigma_rels`` entry (the ``t``-th update has decay
    ``(1 − 1/t)^(γ+1)``, the first copies; as ``EMACallback(sigma_rel=...)``), updated
    after every optimizer step (counted by ``optimizer.iterations``, so
    ``steps_per_execution`` is honoured: one update per step the callback sees), and every
    ``every`` updates writes one snapshot per width into ``folder``: the same folder format
    as ``polyak.torch.PostHocEMA`` (safetensors, crash-safe, a record in the metadata),
    with the tensors named as in ``.weights.h5`` files (``layers/dense/vars/0``). After
    training, ``polyak.posthoc(folder, sigma_rel=0.08, out="ema.weights.h5")`` (or
    ``polyak posthoc FOLDER --sigma-rel 0.08 -o ema.weights.h5``) rebuilds the EMA of any
    width as a file ``model.load_weights`` reads, and :func:`polyak.posthoc_sweep` chooses
    the width on validation data.

    Snapshots hold every model variable: trainable floating ones averaged (non-trainable
    floating ones too with ``include_non_trainable``), the others (BatchNorm statistics by
    default, integer variables) copied from the model at the snapshot. Averages of
    bfloat16/float16 variables are kept and stored in float32. Works on every Keras backend
    with the same one-call update as :class:`EMACallback` (torch: grouped
    ``torch._foreach_lerp_``; JAX: one jitted, donated update; TensorFlow: one ``tf.function``).

    Args:
        folder: Where the snapshots go (created if missing). Keep one run per folder.
        sigma_rels: The tracked widths, each in ``(0, 0.2887]`` (default: 0.05 and 0.10).
        every: Updates (optimizer steps seen) between snapshots.
        include_non_trainable: Also average non-trainable floating variables.
        snapshot_at_end: Also write a snapshot when ``fit`` ends (if the last update has
            none yet), so the end of training can be rebuilt.
        resume: Continue the run whose snapshots are in ``folder`` (from its newest
            complete set of snapshots; an empty folder starts afresh). Resume training
            from the same step.

    Attributes:
        run: The id of this run (12 hex digits), recorded in every snapshot; a folder
            holds one run's snapshots.

    Raises:
        ConfigError: An invalid width or ``every``, or a folder that cannot be created;
            (when training starts) another run's snapshots in ``folder`` without ``resume``,
            or with ``resume`` snapshots of another framework or ``every``, or no step with
            a snapshot of every width.
        FormatError: (with ``resume``) a snapshot without (or with a corrupt) record.
        MismatchError: (with ``resume``) snapshots of a model with other variables.
        PolyakError: (when training starts) the callback already tracks another model.

    Example:
        >>> import numpy as np, tempfile, keras, polyak
        >>> from polyak.keras import PostHocEMACallback
        >>> def build():
        ...     return keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> model = build()
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> folder = tempfile.mkdtemp()
        >>> cb = PostHocEMACallback(folder, every=2)  # tracks sigma_rel 0.05 and 0.10
        >>> x, y = np.ones((8, 2), "float32"), np.ones((8, 1), "float32")
        >>> _ = model.fit(x, y, epochs=2, batch_size=2, verbose=0, callbacks=[cb])
        >>> cb.count, len(polyak.posthoc_plan(folder, 0.08).members)  # 8 updates: 4 snapshot steps × 2 widths
        (8, 8)
        >>> _ = polyak.posthoc(folder, sigma_rel=0.08, out=f"{folder}/ema.weights.h5")  # after training: any width
        >>> ema_model = build()  # uncompiled: the file holds no optimizer state
        >>> ema_model.load_weights(f"{folder}/ema.weights.h5")
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS,
        every: int = 1000,
        include_non_trainable: bool = False,
        snapshot_at_end: bool = False,
        resume: bool = False,
    ) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.sigma_rels = check_sigma_rels(sigma_rels)
        self.every = whole_number(every, "every", 1)
        self.include_non_trainable = bool(include_non_trainable)
        self.snapshot_at_end = bool(snapshot_at_end)
        self.resume = bool(resume)
        self.run = uuid.uuid4().hex[:12]
        self._cores: list[OnlineAverage[Any, Any]] = []
        for s in self.sigma_rels:
            self._cores.append(OnlineAverage(EMAWeights(make_schedule(sigma_rel=s)), Cadence(0, 1), backend_ops()))
        self._vars: list[Any] = []
        self._names: list[str] = []
        self._averaged: list[bool] = []
        self._written = -1
        self._pending: Mapping[str, Any] | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the snapshot folder {self.folder}: {exc.strerror or exc}") from None

    # -- counters -----------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Updates so far: the power EMAs' time ``t``."""
        return self._cores[0].state.count

    @property
    def last_step(self) -> int:
        """The last optimizer step seen."""
        return self._cores[0].state.step

    # -- variables ----------------------------------------------------------------------------
    def _collect(self) -> None:
        model = self.model
        if not model.weights:
            raise PolyakError("PostHocEMACallback: the model has no weights yet; build it (model.build(shape)) or "
                              "call it on a batch before fit")
        trainable = {id(v) for v in model.trainable_weights}
        everything = list(model.weights)
        self._vars = everything
        self._names = variable_names(model, everything)
        self._averaged = [keras.backend.is_float_dtype(v.dtype) and (id(v) in trainable or self.include_non_trainable)
                          for v in everything]

    def _start(self) -> None:
        for core in self._cores:
            core.reset(self._names, self._vars, self._averaged)

    # -- callback hooks -----------------------------------------------------------------------
    def on_train_begin(self, logs: Any = None) -> None:
        before = [id(v) for v in self._vars]
        self._collect()
        started = bool(self._cores[0].state.tensors)
        if started and before != [id(v) for v in self._vars]:
            raise PolyakError("PostHocEMACallback: this callback already tracks another model; create one per model")
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        elif not started:
            self._start()
            if self.resume:
                self._resume_from_folder()
            self._check_folder()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.update(step=int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))

    def on_train_end(self, logs: Any = None) -> None:
        if self.snapshot_at_end:
            self.snapshot()

    def update(self, *, step: int | None = None) -> None:
        """Fold the model's weights into every tracked EMA (called after each optimizer step);
        every ``every``-th update writes a snapshot per width."""
        if not self._cores[0].state.tensors:
            self._collect()
            self._start()
        before = self.count
        for core in self._cores:
            core.update(lambda: self._vars, step=step)
        if snapshot_due(before, self.count, self.every):
            self.snapshot()

    def snapshot(self) -> list[Path]:
        """Write one snapshot per tracked width now (if not written at this update yet)."""
        if self.count == 0 or self._written == self.count:
            return []
        from .._engine.inspect import save

        written = []
        for s, core in zip(self.sigma_rels, self._cores, strict=True):
            schedule = core.weights.schedule  # type: ignore[attr-defined]
            record = SnapshotRecord(sigma_rel=s, gamma=float(schedule.gamma), t=self.count, step=self.last_step,
                                    count=self.count, names=tuple(self._names), run=self.run, every=self.every,
                                    framework="keras", copied=self._copied())
            meta = {SNAPSHOT_KEY: record.to_json(), AVERAGER_META_KEY: json.dumps(core.record(self._config()))}
            path = self.folder / snapshot_name(s, self.last_step)
            save(self._arrays(core), path, metadata=meta, force=True)
            written.append(path)
        self._written = self.count
        return written

    def _copied(self) -> tuple[str, ...]:
        """Floating variables kept as copies (non-trainable ones unless ``include_non_trainable``)."""
        return tuple(n for n, v, a in zip(self._names, self._vars, self._averaged, strict=True)
                     if not a and keras.backend.is_float_dtype(v.dtype))

    def _arrays(self, core: OnlineAverage[Any, Any]) -> dict[str, np.ndarray]:
        ops = core.ops
        return {n: np.asarray(ops.to_numpy(a)) for n, a in core.state.tensors.items()}

    def _config(self) -> dict[str, Any]:
        return self._cores[0].config(include_non_trainable=self.include_non_trainable)

    def average_state(self, sigma_rel: float) -> dict[str, np.ndarray]:
        """The tracked EMA of width ``sigma_rel`` by ``.weights.h5`` tensor name.

        Raises:
            ConfigError: No tracked width equals ``sigma_rel``.
            PolyakError: There is no average yet (it is built when ``fit`` begins).
        """
        for s, core in zip(self.sigma_rels, self._cores, strict=True):
            if np.isclose(s, sigma_rel, rtol=1e-9, atol=0.0):
                if not core.state.tensors:
                    raise PolyakError("PostHocEMACallback: no average yet; it is built when fit() begins")
                return self._arrays(core)
        raise ConfigError(f"no tracked EMA of sigma_rel={sigma_rel!r}; tracked: {list(self.sigma_rels)}")

    def _check_folder(self) -> None:
        from .._engine.posthoc import check_run

        check_run(self.folder, self.run, resume_hint="PostHocEMACallback(..., resume=True) or set_state()")

    # -- state --------------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """Plain-data state for resuming: ``{"kind": "posthoc_ema", "run", "every",
        "sigma_rels", "written", "averagers"}``, each averager in the layout of
        ``EMACallback.get_state()`` with numpy arrays."""
        averagers = [core.record(self._config(), self._arrays(core) if core.state.tensors else {})
                     for core in self._cores]
        return capture_state(self.run, self.every, self.sigma_rels, self._written, averagers)

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`get_state`: now if the model is known, else when ``fit`` begins.

        Raises:
            ConfigError: The state is not a PostHocEMACallback's, or tracks other widths.
            MismatchError: Its averages do not fit the model (all differences listed).
        """
        check_capture_state(state, self.sigma_rels, owner="PostHocEMACallback")
        if getattr(self, "_model", None) is not None:
            self._collect()
            self._apply_state(state)
        else:
            self._pending = state

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        self._start()
        for core, sub in zip(self._cores, state["averagers"], strict=True):
            self._load(core, read_record(sub, kind=core.kind), "the saved state")
        self.run, self.every, self._written = capture_counters(state, self.every)

    def _load(self, core: OnlineAverage[Any, Any], record: Mapping[str, Any], where: str) -> None:
        saved = dict(record.get("tensors") or {})
        check_saved_tensors(dict(zip(self._names, self._vars, strict=True)), saved, ("this model", where),
                            what="PostHocEMACallback: the saved averages do not fit this model",
                            fix="restore the state of a PostHocEMACallback of the same model")
        ops = core.ops
        core.set_tensors({n: ops.from_numpy(saved[n], like) for n, like in core.state.tensors.items()},
                         self._averaged)
        core.state.step, core.state.count = record["step"], record["count"]

    def _resume_from_folder(self) -> None:
        from .._engine.posthoc import resume_point
        from ..formats import open_source

        chosen = resume_point(self.folder, self.sigma_rels, every=self.every, framework="keras")
        if chosen is None:
            return
        first = chosen[self.sigma_rels[0]].record
        for s, core in zip(self.sigma_rels, self._cores, strict=True):
            snap = chosen[s]
            with open_source(snap.path) as src:
                raw = src.metadata().get(AVERAGER_META_KEY)
                if raw is None:
                    raise FormatError(f"{snap.path}: no {AVERAGER_META_KEY!r} record to resume from")
                record = dict(read_record(json_object(raw, str(snap.path), f"{AVERAGER_META_KEY!r} metadata"),
                                          kind=core.kind))
                record["tensors"] = {n: np.array(src.read(n)) for n in src.infos()}
            self._load(core, record, str(snap.path))
        self.run = first.run
        self._written = first.count
