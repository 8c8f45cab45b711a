"""EMACallback on the shared online core: float32 averages of bf16 variables, the torch step
rule, the shared state layout (and 0.1 states), and CheckpointCallback's keep_last across
restarts. References: the EMA recursion in float64, the step rule written out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("h5py")

import polyak.keras as pk  # noqa: E402
from polyak import ConfigError, MismatchError, PolyakError  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)

RNG = np.random.default_rng(1)
X = RNG.normal(size=(48, 4)).astype("float32")
Y = keras.utils.to_categorical(RNG.integers(0, 3, size=48), 3).astype("float32")


def _model(dtype: str | None = None) -> keras.Model:
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
    model = _model("bfloat16")
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
    loaded = _model("bfloat16")
    loaded.load_weights(tmp_path / "ema.weights.h5")
    np.testing.assert_allclose(np.asarray(loaded.get_weights()[0], np.float32), expected, atol=2**-8)
    for w in model.get_weights():  # the model keeps its raw weights
        np.testing.assert_array_equal(np.asarray(w, np.float32), 2.0)


def _rule(seen: list[int], start: int, every: int, last: int) -> list[bool]:
    """The torch rule, written out: a seen step is averaged iff a due step start + k·every
    lies in (previous seen step, this step] (one at a time: (step − start) % every == 0)."""
    out = []
    for s in seen:
        out.append(any(last < g <= s for g in range(start, s + 1, every)))
        last = s
    return out


def test_steps_follow_the_torch_rule_from_start_epoch(ops: str) -> None:
    model = _model()
    ema = pk.EMACallback(0.7, every=3, start_epoch=1)
    ema.set_model(model)
    ema.on_train_begin()
    rng = np.random.default_rng(3)
    # Steps as the callback sees them: epoch 0 = 1..4; then jumps (steps_per_execution 2
    # with a short last execution per epoch).
    epochs = {0: [1, 2, 3, 4], 1: [6, 8, 9], 2: [11, 13, 14], 3: [16, 18, 19]}
    seen, values, ref = [], [], None
    for epoch, steps in epochs.items():
        ema.on_epoch_begin(epoch)
        for step in steps:
            value = [rng.normal(size=tuple(v.shape)).astype("float32") for v in model.weights]
            model.set_weights(value)
            ema.update(step=step)
            if epoch == 0:  # before start_epoch the average follows the weights
                for got, raw in zip(ema.average_weights(), value, strict=True):
                    np.testing.assert_array_equal(got, raw)
            else:
                seen.append(step)
                values.append(value)
    averaged = _rule(seen, start=6, every=3, last=4)
    assert averaged == [True, False, True, False, True, False, True, True, False]  # 6, 9, 13, 16, 18
    for value, on in zip(values, averaged, strict=True):
        if on:
            ref = [v.astype(np.float64) for v in value] if ref is None else [
                0.7 * r + 0.3 * v for r, v in zip(ref, value, strict=True)]
    assert ema.start == 6 and ema.count == sum(averaged) and ema.last_step == 19
    assert ref is not None
    for got, exp in zip(ema.average_weights(), ref, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)


def test_state_layout_is_the_torch_one_and_01_states_load(ops: str) -> None:
    model = _model()
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
    with pytest.raises(MismatchError, match=r'tensor "layers/dense/vars/0" has shape \(2, 2\)'):
        _set_on_model(wrong)
    with pytest.raises(ConfigError, match="this state is from a 'swa' averager, not 'ema'"):
        pk.EMACallback(0.5).set_state(dict(state, kind="swa"))
    with pytest.raises(PolyakError, match="no average yet"):
        pk.EMACallback(0.5).average_weights()


def _set_on_model(state: dict) -> None:
    cb = pk.EMACallback(0.5)
    cb.set_model(_model())
    cb.set_state(state)


def test_checkpoint_keep_last_counts_files_of_a_run_before_a_restart(tmp_path: Path) -> None:
    strangers = ["model_best.keras", "model_007.keras", "model_1.weights.h5", "notes_1.keras"]
    for name in strangers:
        (tmp_path / name).write_text("not a checkpoint of this callback")
    first = pk.CheckpointCallback(tmp_path, keep_last=2)
    model = _model()
    model.fit(X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[first])
    assert sorted(p.name for p in tmp_path.glob("model_?.keras")) == ["model_1.keras", "model_2.keras"]
    restarted = pk.CheckpointCallback(tmp_path, keep_last=2)  # a new process resumes at epoch 3
    model.fit(X, Y, initial_epoch=3, epochs=5, batch_size=16, verbose=0, callbacks=[restarted])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*strangers, "model_3.keras", "model_4.keras"])
    assert restarted.saved == restarted.files() == [tmp_path / "model_3.keras", tmp_path / "model_4.keras"]
