"""polyak.keras: capture callback, averaged models, evaluator, EMA callback, update_bn.

The EMA callback runs on the shared online core: float32 averages of bf16 variables, the
torch step rule, the shared state layout (and 0.1 states), and CheckpointCallback's
keep_last across restarts are checked against the EMA recursion in float64 and the step
rule written out."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("h5py")

import polyak  # noqa: E402
import polyak.keras as pk  # noqa: E402
from _helpers import per_step_ema, tutorial_weights  # noqa: E402

pytestmark = [pytest.mark.keras, pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)]

RNG = np.random.default_rng(0)
X = RNG.normal(size=(48, 4)).astype("float32")
Y = keras.utils.to_categorical(RNG.integers(0, 3, size=48), 3).astype("float32")


def _model(*, bn: bool = True, compiled: bool = True, **opt: object) -> keras.Model:
    keras.utils.set_random_seed(3)
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
    if bn:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(3, activation="softmax"))
    m = keras.Sequential(layers)
    if not compiled:
        return m
    m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9, **opt), loss="categorical_crossentropy",
              metrics=["accuracy"])
    return m


def test_checkpoint_callback_names_epochs_keep_last(tmp_path: Path) -> None:
    cb = pk.CheckpointCallback(tmp_path, start_epoch=2, every=2, keep_last=2)
    _model().fit(X, Y, epochs=8, batch_size=16, verbose=0, callbacks=[cb])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_4.keras", "model_6.keras"]
    assert cb.saved == [tmp_path / "model_4.keras", tmp_path / "model_6.keras"]
    with zipfile.ZipFile(tmp_path / "model_6.keras") as zf:
        assert json.loads(zf.read("metadata.json"))["polyak"] == {"epoch": 6, "step": 21}
    cbw = pk.CheckpointCallback(tmp_path / "w", format=".weights.h5", prefix="net")
    _model().fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[cbw])
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["net_0.weights.h5", "net_1.weights.h5"]
    import h5py

    with h5py.File(tmp_path / "w" / "net_1.weights.h5") as f:
        assert json.loads(f.attrs["polyak"])["epoch"] == 1


def test_tutorial_flow_load_average_evaluate(tmp_path: Path) -> None:
    cb = pk.CheckpointCallback(tmp_path, start_epoch=3)
    _model().fit(X, Y, epochs=6, batch_size=16, verbose=0, callbacks=[cb])
    models = pk.load_models(tmp_path, start=3, end=6)
    assert len(models) == 3
    assert len(pk.load_models(str(tmp_path / "model_*.keras"), start=4)) == 2
    for scheme in ("equal", "linear", "exponential"):
        avg = pk.average_models(models, scheme=scheme, alpha=2.0)
        w = tutorial_weights(scheme, 3, 2.0)
        expected = [np.average(np.stack(t), axis=0, weights=w) for t in zip(*[m.get_weights() for m in models], strict=True)]
        for got, exp in zip(avg.get_weights(), expected, strict=True):
            np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-7)
        assert avg.compiled
        assert set(avg.evaluate(X, Y, verbose=0, return_dict=True)) >= {"loss", "accuracy"}
    # the evaluator evaluates a name-keyed state and restores the model
    target = models[-1]
    before = target.get_weights()
    fn = pk.evaluator(target, X, Y, metrics=["accuracy"])
    state = polyak.average(sorted(tmp_path.glob("*.keras")), scheme="linear")
    got = fn(state)
    ref = pk.average_models(models, scheme="linear").evaluate(X, Y, verbose=0, return_dict=True)
    assert got == pytest.approx({"accuracy": ref["accuracy"]}, abs=1e-6)
    for a, b in zip(target.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(polyak.MismatchError, match='1 unexpected tensor.*"nope"'):
        fn({"nope": np.zeros(1)})
    bad = dict(state, **{"layers/batch_normalization/vars/1": np.zeros(5, np.float32), "nope": np.zeros(1)})
    with pytest.raises(polyak.MismatchError, match=r'(?s)2 problem.*"nope".*"layers/batch_normalization/vars/1" '
                                                   r"has shape \(5,\), sequential_\d+ has \(8,\).*look like"):
        fn(bad)
    for a, b in zip(target.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_average_models_unbuilt_and_subclassed() -> None:
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(polyak.PolyakError, match="build it first"):
        pk.average_models([unbuilt, unbuilt])

    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.a = keras.layers.Dense(5)
            self.b = keras.layers.Dense(2)

        def call(self, x):  # type: ignore[no-untyped-def]
            return self.b(self.a(x))

    nets = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        n = Net()
        n(X[:1])
        nets.append(n)
    with pytest.raises(polyak.PolyakError, match="template"):
        pk.average_models(nets)

    def build() -> Net:
        n = Net()
        n(X[:1])
        return n

    avg = pk.average_models(nets, build_fn=build)
    np.testing.assert_allclose(avg.get_weights()[0], (nets[0].get_weights()[0] + nets[1].get_weights()[0]) / 2, rtol=1e-6)


class _Probe(keras.callbacks.Callback):
    """Records the weights the model holds at each hook (placed after the EMA callback)."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[list[np.ndarray]] = []
        self.at_test: list[list[np.ndarray]] = []
        self.at_epoch_end: list[list[np.ndarray]] = []

    def on_train_batch_end(self, batch, logs=None):  # type: ignore[no-untyped-def]
        self.steps.append([keras.ops.convert_to_numpy(v) for v in self.model.weights])

    def on_test_begin(self, logs=None):  # type: ignore[no-untyped-def]
        self.at_test.append([keras.ops.convert_to_numpy(v) for v in self.model.weights])

    def on_epoch_end(self, epoch, logs=None):  # type: ignore[no-untyped-def]
        self.at_epoch_end.append([keras.ops.convert_to_numpy(v) for v in self.model.weights])


def _closed_form(steps: list[list[np.ndarray]], decay: Callable[[int], float]) -> list[np.ndarray]:
    """The EMA recursion in float64: the first step copies, update n uses ``decay(n)``."""
    avg = [s.astype(np.float64) for s in steps[0]]
    for n, cur in enumerate(steps[1:], start=1):
        d = decay(n)
        avg = [d * a + (1 - d) * c for a, c in zip(avg, cur, strict=True)]
    return avg


def _timm(decay: float, min_decay: float = 0.0) -> Callable[[int], float]:
    """timm ModelEmaV3's warmup, written out (gamma 1, power 2/3)."""
    return lambda n: min(max(1 - (1 + n) ** (-2 / 3), min_decay), decay)


def test_ema_matches_keras_use_ema() -> None:
    model = _model(bn=True, use_ema=True, ema_momentum=0.9)
    ema = pk.EMACallback(0.9)
    model.fit(X, Y, epochs=3, batch_size=8, verbose=0, callbacks=[ema])
    # after fit, Keras has overwritten the trainable weights with its own EMA
    ours = ema.average_weights()
    trainable = {id(v) for v in model.trainable_weights}
    checked = 0
    for v, mine in zip(model.weights, ours, strict=True):
        if id(v) in trainable:
            np.testing.assert_allclose(mine, keras.ops.convert_to_numpy(v), rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 6
    assert set(ema.average_state()) == {
        "layers/dense/vars/0", "layers/dense/vars/1", "layers/batch_normalization/vars/0",
        "layers/batch_normalization/vars/1", "layers/dense_1/vars/0", "layers/dense_1/vars/1",
    }


def test_ema_closed_form_swap_and_raw_weights_kept(tmp_path: Path) -> None:
    model = _model()
    ema = pk.EMACallback(0.8, warmup="timm", include_non_trainable=True, save_path=tmp_path / "ema.weights.h5")
    probe = _Probe()
    hist = model.fit(X, Y, epochs=2, batch_size=16, verbose=0, validation_data=(X, Y), callbacks=[ema, probe])
    expected = _closed_form(probe.steps, _timm(0.8))
    for got, exp in zip(ema.average_weights(), expected, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
    # validation ran on the average; training went on (and ended) with the raw weights
    for got, exp in zip(probe.at_test[-1], expected, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
    for got, raw in zip(probe.at_epoch_end[-1], probe.steps[-1], strict=True):
        np.testing.assert_array_equal(got, raw)
    for got, raw in zip(model.get_weights(), probe.steps[-1], strict=True):
        np.testing.assert_array_equal(got, raw)
    avg_model = _model()
    avg_model.set_weights(ema.average_weights())
    val = avg_model.evaluate(X, Y, verbose=0, return_dict=True)
    assert hist.history["val_loss"][-1] == pytest.approx(val["loss"], rel=1e-5)
    # evaluate / predict with the callback: the average, then the raw weights are back
    assert model.evaluate(X, Y, verbose=0, callbacks=[ema], return_dict=True)["loss"] == pytest.approx(val["loss"], rel=1e-5)
    np.testing.assert_allclose(model.predict(X, verbose=0, callbacks=[ema]), avg_model.predict(X, verbose=0), rtol=1e-5, atol=1e-6)
    for got, raw in zip(model.get_weights(), probe.steps[-1], strict=True):
        np.testing.assert_array_equal(got, raw)
    # the saved file holds the average
    loaded = _model(compiled=False)  # Keras refuses optimizer state into a fresh optimizer
    loaded.load_weights(tmp_path / "ema.weights.h5")
    for got, exp in zip(loaded.get_weights(), expected, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


def test_ema_apply_at_end_every_and_resume() -> None:
    model = _model()
    ema = pk.EMACallback(half_life=4, every=2, start_epoch=1, apply_at_end=True)
    probe = _Probe()
    model.fit(X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[ema, probe])
    assert ema.count == 3  # steps 4..9 of epochs 1-2, every 2 steps: 4, 6, 8
    # The closed form: a half-life of 4 steps, updated every 2: decay 0.5 ** (2 / 4).
    d = 0.5 ** (2 / 4)
    expected = _closed_form([probe.steps[s - 1] for s in (4, 6, 8)], lambda n: d)
    trainable = {id(v) for v in model.trainable_weights}
    for v, got, exp, raw in zip(model.weights, model.get_weights(), expected, probe.steps[-1], strict=True):
        if id(v) in trainable:  # the average is left in the model
            np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
        else:  # BatchNorm's statistics are not averaged (include_non_trainable=False)
            np.testing.assert_array_equal(got, raw)
    state = ema.get_state()
    json.dumps({k: v for k, v in state.items() if k != "tensors"})
    resumed = pk.EMACallback(0.5)
    resumed.set_state(state)
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[ema, resumed])
    assert resumed.count == ema.count
    for a, b in zip(resumed.average_weights(), ema.average_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_update_bn_cumulative_batch_statistics() -> None:
    model = _model()
    model.fit(X, Y, epochs=1, batch_size=16, verbose=0)
    bn = model.layers[1]
    momentum = bn.momentum
    bn.moving_mean.assign(np.full(8, 5.0, "float32"))
    pk.update_bn(model, X, batch_size=16)
    h = keras.ops.convert_to_numpy(model.layers[0](X)).reshape(3, 16, 8)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), h.mean(axis=1).mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), h.var(axis=1).mean(axis=0), rtol=1e-4, atol=1e-6)
    assert bn.momentum == momentum


# -- the shared online core and retention policy ------------------------------------

def _plain_model(dtype: str | None = None) -> keras.Model:
    keras.utils.set_random_seed(5)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu", dtype=dtype),
                          keras.layers.Dense(3, activation="softmax", dtype=dtype)])
    m.compile(optimizer=keras.optimizers.SGD(0.05), loss="categorical_crossentropy")
    return m


def _fill(model: keras.Model, value: float) -> None:
    for v in model.weights:
        v.assign(np.full(tuple(v.shape), value, dtype="float32"))


@pytest.fixture(params=["backend", "keras.ops"])
def ops(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with this backend's ops and with the keras.ops ones (JAX/TF's path)."""
    if request.param == "keras.ops":
        from polyak.keras import _ema, _ops

        monkeypatch.setattr(_ema, "backend_ops", _ops.KerasOps)
    return str(request.param)


def test_bf16_variables_average_in_float32(ops: str, tmp_path: Path) -> None:
    model = _plain_model("bfloat16")
    assert {v.dtype for v in model.weights} == {"bfloat16"}
    ema = pk.EMACallback(0.999)
    ema.set_model(model)
    _fill(model, 1.0)
    ema.update(step=1)  # the first update copies 1.0
    _fill(model, 2.0)
    expected = 1.0
    for step in range(2, 1002):
        ema.update(step=step)
        expected = 0.999 * expected + 0.001 * 2.0  # the recursion, in float64
    assert expected == pytest.approx(2 - 0.999**1000) and round(expected, 3) == 1.632
    state = ema.average_state()
    for name, avg in state.items():
        np.testing.assert_allclose(np.asarray(avg, np.float64), expected, rtol=0, atol=1e-4, err_msg=name)
        assert avg.dtype == np.float32, name  # a bf16 average would stay at 1.0
    weights = ema.average_weights()  # like get_weights(): the variables' dtype
    assert {str(w.dtype) for w in weights} == {"bfloat16"}
    np.testing.assert_allclose(np.asarray(weights[0], np.float32), expected, atol=2**-8)
    ema.save(tmp_path / "ema.weights.h5")
    loaded = _plain_model("bfloat16")
    loaded.load_weights(tmp_path / "ema.weights.h5")
    np.testing.assert_allclose(np.asarray(loaded.get_weights()[0], np.float32), expected, atol=2**-8)
    for w in model.get_weights():  # the model keeps its raw weights
        np.testing.assert_array_equal(np.asarray(w, np.float32), 2.0)


@pytest.mark.parametrize(("every", "warmup"), [(3, None), (1, "tf")])
def test_steps_follow_the_torch_rule_from_start_epoch(ops: str, every: int, warmup: str | None) -> None:
    # fit's hooks as Keras calls them with steps_per_execution=2 (also on the torch
    # backend, which refuses it in fit): 5 batches per epoch, so executions end at batch
    # indices 1, 3 and 5 (the last one short: one step, though Keras says 5).
    model = _plain_model()
    ema = pk.EMACallback(0.7, warmup=warmup, every=every, start_epoch=1)
    ema.set_model(model)
    ema.on_train_begin()
    reads = 0
    iterations = ema._iterations

    def counted() -> int:
        nonlocal reads
        reads += 1
        return iterations()

    ema._iterations = counted  # type: ignore[method-assign]
    rng = np.random.default_rng(3)
    executions = []
    for epoch in range(4):
        ema.on_epoch_begin(epoch)
        for batch, steps in ((1, 2), (3, 2), (5, 1)):
            value = [rng.normal(size=tuple(v.shape)).astype("float32") for v in model.weights]
            model.set_weights(value)
            model.optimizer.iterations.assign(int(model.optimizer.iterations.numpy()) + steps)
            ema.on_train_batch_end(batch)
            if epoch == 0:  # before start_epoch the average follows the weights
                for got, raw in zip(ema.average_weights(), value, strict=True):
                    np.testing.assert_array_equal(got, raw)
            else:
                executions.append((5 * epoch + batch // 2 * 2 + steps, value))
    # start = the first optimizer step of epoch 1 (step 6, inside the first execution)
    ref, due = per_step_ema(executions, start=6, every=every, schedule=ema.schedule)
    assert (ema.start, ema.count, ema.last_step) == (6, due, 20)
    assert due == {3: 5, 1: 15}[every]  # 6, 9, 12, 15, 18 / 6..20
    for got, exp in zip(ema.average_weights(), ref, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
    # the count was read at each epoch's start and when an update was due, not per batch
    assert reads == {3: 4 + 3 + 6, 1: 4 + 3 + 9}[every]


def test_state_layout_is_the_torch_one_and_01_states_load(ops: str) -> None:
    model = _plain_model()
    ema = pk.EMACallback(half_life=4, every=2, start_epoch=1)
    model.fit(X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[ema])  # 3 steps per epoch
    state = ema.get_state()
    assert list(state) == ["kind", "step", "count", "config", "tensors"]
    assert (state["kind"], state["step"], state["count"]) == ("ema", 9, 3)  # steps 4, 6, 8
    assert state["config"] == {"start": 4, "every": 2, "schedule": ema.schedule.to_dict(), "start_epoch": 1,
                               "include_non_trainable": False}
    torch = pytest.importorskip("torch")
    from polyak.torch import EMA

    assert list(EMA(torch.nn.Linear(2, 2), decay=0.9).state_dict()) == list(state)
    # What 0.1's get_state() returned for this run: it updated at 4, 6, 8.
    old = {"schedule": ema.schedule.to_dict(), "count": 3, "last_step": 8, "start_epoch": 1,
           "include_non_trainable": False, "averages": ema.average_state()}
    resumed = pk.EMACallback(0.5)
    resumed.set_state(old)
    assert resumed.schedule == ema.schedule and resumed.start_epoch == 1
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0, callbacks=[ema, resumed])  # steps 10..15
    assert resumed.start == 4 and resumed.count == ema.count == 6  # 10, 12, 14 more
    for a, b in zip(resumed.average_weights(), ema.average_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    wrong = dict(state, tensors={**state["tensors"], "layers/dense/vars/0": np.zeros((2, 2), "float32")})
    with pytest.raises(polyak.MismatchError, match=r'tensor "layers/dense/vars/0" has shape \(2, 2\)'):
        _set_on_model(wrong)
    with pytest.raises(polyak.ConfigError, match="this state is from a 'swa' averager, not 'ema'"):
        pk.EMACallback(0.5).set_state(dict(state, kind="swa"))
    with pytest.raises(polyak.PolyakError, match="no average yet"):
        pk.EMACallback(0.5).average_weights()


def _set_on_model(state: dict) -> None:
    cb = pk.EMACallback(0.5)
    cb.set_model(_plain_model())
    cb.set_state(state)


def test_checkpoint_keep_last_counts_files_of_a_run_before_a_restart(tmp_path: Path) -> None:
    strangers = ["model_best.keras", "model_007.keras", "model_1.weights.h5", "notes_1.keras"]
    for name in strangers:
        (tmp_path / name).write_text("not a checkpoint of this callback")
    first = pk.CheckpointCallback(tmp_path, keep_last=2)
    model = _plain_model()
    model.fit(X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[first])
    assert sorted(p.name for p in tmp_path.glob("model_?.keras")) == ["model_1.keras", "model_2.keras"]
    restarted = pk.CheckpointCallback(tmp_path, keep_last=2)  # a new process resumes at epoch 3
    model.fit(X, Y, initial_epoch=3, epochs=5, batch_size=16, verbose=0, callbacks=[restarted])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*strangers, "model_3.keras", "model_4.keras"])
    assert restarted.saved == restarted.files() == [tmp_path / "model_3.keras", tmp_path / "model_4.keras"]
