"""EMACallback on every Keras backend (``make test`` runs the ``keras`` tests under torch, jax
and tensorflow): Keras' own ``use_ema=True`` average, read from the optimizer, is the
reference; ``steps_per_execution`` counts optimizer steps; no average shares a buffer with
a variable (Keras' JAX trainer donates the variables' buffers); between updates a batch
costs a counter."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import polyak.keras as pk  # noqa: E402
from _helpers import per_step_ema  # noqa: E402
from polyak.keras._ops import KerasOps, backend_ops  # noqa: E402

pytestmark = [pytest.mark.keras,
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")]

BACKEND = keras.backend.backend()
#: Keras' torch backend refuses steps_per_execution > 1.
SPE = [1] if BACKEND == "torch" else [1, 3]
ONLY_JAX_TF = pytest.mark.skipif(BACKEND == "torch", reason="Keras' torch backend refuses steps_per_execution > 1")

ROWS, BATCH, STEPS_PER_EPOCH = 50, 8, 7  # the last batch of an epoch holds 2 rows
RNG = np.random.default_rng(7)
X = RNG.normal(size=(ROWS, 4)).astype("float32")
Y = np.eye(3, dtype="float32")[RNG.integers(0, 3, size=ROWS)]


class LearnOnFirstStepOfExecution(keras.optimizers.schedules.LearningRateSchedule):
    """``lr`` on the first optimizer step of each ``steps_per_execution`` block, 0 on the others.

    With plain SGD the weights then stay put inside an execution, so the weights the
    callback sees once per execution are the weights of every step in it: a per-step
    EMA over them (Keras' ``use_ema``) is exact, not an approximation.
    """

    def __init__(self, lr: float, spe: int) -> None:
        self.lr, self.spe = lr, spe

    def __call__(self, step: Any) -> Any:
        batch = keras.ops.mod(keras.ops.mod(step, STEPS_PER_EPOCH), self.spe)  # step = iterations before it
        return keras.ops.where(keras.ops.equal(batch, 0), self.lr, 0.0)


def _model(*, bn: bool, spe: int, use_ema: bool = False) -> keras.Model:
    keras.utils.set_random_seed(4)
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
    if bn:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(3, activation="softmax"))
    model = keras.Sequential(layers)
    if spe == 1:
        opt = keras.optimizers.SGD(0.05, momentum=0.9, use_ema=use_ema, ema_momentum=0.8)
    else:
        opt = keras.optimizers.SGD(LearnOnFirstStepOfExecution(0.1, spe), use_ema=use_ema, ema_momentum=0.8)
    model.compile(optimizer=opt, loss="categorical_crossentropy", steps_per_execution=spe)
    return model


class _Raw(keras.callbacks.Callback):
    """The weights at the end of each execution (what the EMA callback sees) and its step."""

    def __init__(self) -> None:
        super().__init__()
        self.executions: list[tuple[int, list[np.ndarray]]] = []

    def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.executions.append((step, [np.array(keras.ops.convert_to_numpy(v)) for v in self.model.weights]))


def _trainable(model: keras.Model, weights: list[np.ndarray]) -> list[np.ndarray]:
    ids = {id(v) for v in model.trainable_weights}
    by_id = {id(v): w for v, w in zip(model.weights, weights, strict=True)}
    return [by_id[id(v)] for v in model.trainable_weights if id(v) in ids]


@pytest.mark.parametrize("spe", SPE)
@pytest.mark.parametrize("bn", [False, True])
def test_ema_equals_keras_use_ema(bn: bool, spe: int) -> None:
    # Two fit calls with validation, a short last batch, evaluate/predict with the callback
    # between them, apply_at_end: the callback's average is Keras' own use_ema average.
    model = _model(bn=bn, spe=spe, use_ema=True)
    ema = pk.EMACallback(0.8, apply_at_end=True)
    raw = _Raw()
    for call in range(2):
        model.fit(X, Y, epochs=2, batch_size=BATCH, verbose=0, validation_data=(X[:20], Y[:20]), callbacks=[ema, raw])
        theirs = [keras.ops.convert_to_numpy(a) for a in model.optimizer._model_variables_moving_average]
        ours = _trainable(model, ema.average_weights())
        assert len(ours) == len(theirs) == (6 if bn else 4)
        for mine, keras_avg in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(mine, keras_avg, rtol=1e-5, atol=1e-6)
        # apply_at_end: the model holds the average (as Keras leaves it with use_ema)
        for held, keras_avg in zip(_trainable(model, model.get_weights()), theirs, strict=True):
            np.testing.assert_allclose(held, keras_avg, rtol=1e-5, atol=1e-6)
        # the raw weights of the last step are far from it: the comparison can fail
        assert max(float(np.abs(a - w).max()) for a, w in zip(ours, _trainable(model, raw.executions[-1][1]),
                                                                strict=True)) > 1e-3
        if call == 0:  # the average survives evaluate/predict with the callback (JAX: no deleted buffer)
            before = ema.average_weights()
            model.evaluate(X, Y, verbose=0, callbacks=[ema])
            model.predict(X, verbose=0, callbacks=[ema])
            for a, b in zip(ema.average_weights(), before, strict=True):
                np.testing.assert_array_equal(a, b)
    steps = 2 * 2 * STEPS_PER_EPOCH
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == steps
    assert (ema.count, ema.last_step) == (steps, steps)  # every optimizer step, also with spe = 3


@ONLY_JAX_TF
@pytest.mark.parametrize(("every", "warmup"), [(1, "timm"), (2, None)])
def test_steps_per_execution_half_life_and_warmup_count_optimizer_steps(every: int, warmup: str | None) -> None:
    model = _model(bn=True, spe=3)
    ema = pk.EMACallback(half_life=6, warmup=warmup, every=every, start_epoch=1)
    raw = _Raw()
    model.fit(X, Y, epochs=3, batch_size=BATCH, verbose=0, callbacks=[ema, raw])
    # executions end at steps 3, 6, 7 | 10, 13, 14 | 17, 20, 21; epoch 1 starts at step 8
    assert [s for s, _ in raw.executions] == [3, 6, 7, 10, 13, 14, 17, 20, 21]
    ref, due = per_step_ema(raw.executions[3:], start=8, every=every, schedule=ema.schedule)
    assert (ema.start, ema.count, ema.last_step) == (8, due, 21)
    assert due == {1: 14, 2: 7}[every]
    for got, exp in zip(_trainable(model, ema.average_weights()), _trainable(model, ref), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
    # half_life=6 optimizer steps: the decay per update of `every` steps
    assert ema.schedule.decay == pytest.approx(0.5 ** (every / 6))


def test_between_updates_a_batch_costs_a_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    # The model (and with it optimizer.iterations and, on JAX, a sync of every variable)
    # is touched in on_train_batch_end only when an update is due: with every=1000 only at
    # the start step (step 1). It used to be read after every batch.
    model = _model(bn=False, spe=1)
    ema = pk.EMACallback(0.9, every=1000)
    touched = []
    base = keras.callbacks.Callback.model.fget
    monkeypatch.setattr(pk.EMACallback, "model", property(lambda self: touched.append(1) or base(self)))
    hook = ema.on_train_batch_end
    batches_touching = []

    def counted(batch, logs=None):  # type: ignore[no-untyped-def]
        before = len(touched)
        hook(batch, logs)
        batches_touching.append(len(touched) > before)

    ema.on_train_batch_end = counted  # type: ignore[method-assign]
    syncs = []
    if BACKEND == "jax":  # a real sync: the trained state attached to the variables mid-epoch
        sync = model.jax_state_sync
        model.jax_state_sync = lambda: syncs.append(not model._jax_state_synced) or sync()
    model.fit(X, Y, epochs=3, batch_size=BATCH, verbose=0, callbacks=[ema])
    assert len(batches_touching) == 3 * STEPS_PER_EPOCH
    assert batches_touching == [True] + [False] * (3 * STEPS_PER_EPOCH - 1)
    assert (ema.count, ema.last_step) == (1, 3 * STEPS_PER_EPOCH)
    if BACKEND == "jax":  # Keras' own sync at each epoch's end, plus the one update's
        assert sum(syncs) == 3 + 1


def _clobber(variables: list[Any]) -> None:
    """What the trainer does to the variables next: JAX donates each buffer to its step."""
    if BACKEND == "jax":
        import jax

        step = jax.jit(lambda x: x * 0 - 7, donate_argnums=0)
        for v in variables:
            v.assign(step(v.value))
    else:
        for v in variables:
            v.assign(np.full(tuple(v.shape), -7, dtype=keras.backend.standardize_dtype(v.dtype)))


@pytest.mark.parametrize("which", ["backend", "keras.ops"])
def test_averages_never_share_a_buffer_with_the_variables(which: str) -> None:
    model = _model(bn=True, spe=1)
    variables = [v for v in model.weights if keras.backend.is_float_dtype(v.dtype)]
    ops = backend_ops() if which == "backend" else KerasOps()
    flags = (True,) * len(variables)
    avgs = ops.init(variables, flags)
    first = [ops.to_numpy(a) for a in avgs]
    _clobber(variables)  # init copied
    for a, f in zip(avgs, first, strict=True):
        np.testing.assert_array_equal(ops.to_numpy(a), f)
    ops.assign(variables, avgs)  # the average into the model (validation, apply_at_end)
    backup = ops.backup(variables)
    _clobber(variables)
    for a, b, f in zip(avgs, backup, first, strict=True):
        np.testing.assert_array_equal(ops.to_numpy(a), f)
        np.testing.assert_array_equal(ops.to_numpy(b), f)
    ops.assign(variables, backup)  # the raw weights back; then training goes on
    _clobber(variables)
    backup = ops.backup(variables, backup)  # reusing the backup's buffers
    avgs = ops.update(avgs, variables, 0.25, flags)
    restored = [ops.from_numpy(f, a) for f, a in zip(first, avgs, strict=True)]
    _clobber(variables)
    for a, r, b, f in zip(avgs, restored, backup, first, strict=True):
        np.testing.assert_allclose(ops.to_numpy(a), 0.75 * f + 0.25 * -7, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(ops.to_numpy(r), f)
        np.testing.assert_array_equal(ops.to_numpy(b), -7)
    # weight 1 copies exactly, also between values far apart
    for v in variables:
        v.assign(np.full(tuple(v.shape), 3e-8, dtype="float32"))
    huge = ops.update([ops.from_numpy(np.full(tuple(v.shape), 3e30, np.float32), a) for v, a in
                       zip(variables, avgs, strict=True)], variables, 1.0, list(flags))  # new averages: new flags
    for a in huge:
        np.testing.assert_array_equal(ops.to_numpy(a), np.float32(3e-8))


def test_a_saved_state_does_not_follow_later_updates() -> None:
    # Used to fail on the torch backend: average_state()/get_state() returned numpy views
    # of the averages, which the next update changed in place.
    model = _model(bn=False, spe=1)
    ema = pk.EMACallback(0.5)
    model.fit(X, Y, epochs=1, batch_size=BATCH, verbose=0, callbacks=[ema])
    state, weights = ema.get_state(), ema.average_weights()
    kept = {k: v.copy() for k, v in state["tensors"].items()}
    model.fit(X, Y, epochs=1, batch_size=BATCH, verbose=0, callbacks=[ema])
    assert ema.count == 2 * STEPS_PER_EPOCH
    for name, value in kept.items():
        np.testing.assert_array_equal(state["tensors"][name], value, err_msg=name)
    assert any(not np.array_equal(a, b) for a, b in zip(ema.average_weights(), weights, strict=True))
