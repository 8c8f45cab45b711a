"""Post-hoc EMA with Keras (any backend): PostHocEMACallback and EMACallback(sigma_rel=)
against a power EMA written here from the definition; rebuilds to .weights.h5; resume.

Marked `keras`: `make test` runs it on torch, jax and tensorflow."""

from __future__ import annotations

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("h5py")

import polyak  # noqa: E402
import polyak.keras as pk  # noqa: E402
from _helpers import PowerEMA  # noqa: E402
from polyak import ConfigError  # noqa: E402

pytestmark = [pytest.mark.keras, pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)]

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 4)).astype("float32")
Y = RNG.normal(size=(64, 3)).astype("float32")
BATCH = 16
XL = RNG.normal(size=(200, 4)).astype("float32")
YL = RNG.normal(size=(200, 3)).astype("float32")
EPOCHS, BATCH_L, EVERY = 2, 4, 5  # 100 steps, 20 snapshots per width


def _model(*, compiled: bool = True) -> keras.Model:
    keras.utils.set_random_seed(3)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                          keras.layers.BatchNormalization(), keras.layers.Dense(3)])
    if compiled:
        m.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse")
    return m


class _Direct(keras.callbacks.Callback):
    """Independent power EMAs of the trainable weights, by .weights.h5 name."""

    def __init__(self, *sigma_rels: float) -> None:
        super().__init__()
        self.emas = {s: PowerEMA(s) for s in sigma_rels}

    def on_train_begin(self, logs=None):
        self.vars = list(self.model.trainable_weights)
        self.names = pk.variable_names(self.model, self.vars)

    def on_train_batch_end(self, batch, logs=None):
        state = {n: keras.ops.convert_to_numpy(v) for n, v in zip(self.names, self.vars, strict=True)}
        for e in self.emas.values():
            e.update(state)


def _raw(model) -> dict[str, np.ndarray]:
    names = pk.variable_names(model, model.weights)
    return {n: keras.ops.convert_to_numpy(v) for n, v in zip(names, model.weights, strict=True)}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras_posthoc") / "ph"
    model = _model()
    cb = pk.PostHocEMACallback(folder, sigma_rels=(0.05, 0.10), every=EVERY)
    direct = _Direct(0.08, 0.10)
    plain = pk.EMACallback(sigma_rel=0.10)
    model.fit(XL, YL, epochs=EPOCHS, batch_size=BATCH_L, shuffle=False, verbose=0, callbacks=[cb, direct, plain])
    return {"folder": folder, "cb": cb, "direct": direct.emas, "plain": plain, "model": model, "raw": _raw(model)}


def test_snapshots_and_tracked_emas_follow_the_definition(fitted):
    files = sorted(p.name for p in fitted["folder"].iterdir())
    assert len(files) == 2 * 100 // EVERY
    rec = json.loads(polyak.inspect(fitted["folder"] / files[-1]).metadata["polyak_posthoc"])
    assert rec["framework"] == "keras" and rec["t"] == 100 and rec["step"] == 100
    assert rec["copied"] == ["layers/batch_normalization/vars/2", "layers/batch_normalization/vars/3"]
    assert "layers/batch_normalization/vars/2" in rec["names"]  # every variable, moving mean included
    direct = fitted["direct"][0.10].value
    tracked = fitted["cb"].average_state(0.10)
    plain = fitted["plain"].average_state()
    for name, v in direct.items():
        np.testing.assert_allclose(tracked[name], v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(plain[name], v, rtol=1e-5, atol=1e-6)


def test_rebuilt_ema_equals_an_independent_power_ema(fitted):
    rebuilt = polyak.posthoc(fitted["folder"], sigma_rel=0.08)
    direct, raw = fitted["direct"][0.08].value, fitted["raw"]
    err = max(float(np.abs(rebuilt[n] - v).max()) for n, v in direct.items())
    spread = max(float(np.abs(v - raw[n]).max()) for n, v in direct.items())
    assert err < 0.01 * spread, (err, spread)
    # non-trainable variables are copied from the newest snapshot's model
    np.testing.assert_array_equal(rebuilt["layers/batch_normalization/vars/2"], raw["layers/batch_normalization/vars/2"])


def test_rebuild_to_weights_h5_loads_into_the_model(fitted, tmp_path):
    out = tmp_path / "ema.weights.h5"
    res = polyak.posthoc(fitted["folder"], sigma_rel=0.08, out=out)
    assert res.plan is not None and res.plan.residual < 0.01
    model = _model(compiled=False)  # no optimizer state in an EMA: load into an uncompiled model
    model.load_weights(out)
    rebuilt = polyak.posthoc(fitted["folder"], sigma_rel=0.08)
    got = _raw(model)
    for name, v in rebuilt.items():
        np.testing.assert_array_equal(got[name], v)


def test_resume_from_state_and_from_folder(tmp_path):
    """Stop after 3 of 6 epochs; restore into a new callback from get_state() or from the
    folder alone: the snapshots are bit for bit those of the uninterrupted run."""
    every = 4  # 4 steps per epoch: a snapshot at the end of every epoch

    def fit(cb, model, epochs, initial=0):
        model.fit(X, Y, epochs=epochs, initial_epoch=initial, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[cb])

    fit(pk.PostHocEMACallback(tmp_path / "whole", every=every), _model(), 6)
    model = _model()
    first = pk.PostHocEMACallback(tmp_path / "state", every=every)
    fit(first, model, 3)
    second = pk.PostHocEMACallback(tmp_path / "state", every=every)
    second.set_state(first.get_state())
    fit(second, model, 6, initial=3)
    model = _model()
    fit(pk.PostHocEMACallback(tmp_path / "fold", every=every), model, 3)
    resumed = pk.PostHocEMACallback(tmp_path / "fold", every=every, resume=True)
    fit(resumed, model, 6, initial=3)
    assert resumed.count == 24
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert len(names) == 12
    for other in ("state", "fold"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == names
        for n in names:
            with polyak.open_source(tmp_path / "whole" / n) as a, polyak.open_source(tmp_path / other / n) as b:
                for t in a.infos():
                    np.testing.assert_array_equal(a.read(t), b.read(t))


def test_errors(fitted, tmp_path):
    with pytest.raises(ConfigError, match="> 0"):
        pk.PostHocEMACallback(tmp_path, sigma_rels=(0.0,))
    with pytest.raises(ConfigError, match="exactly one"):
        pk.EMACallback(0.9, sigma_rel=0.1)
    cb = pk.PostHocEMACallback(fitted["folder"], every=EVERY)  # another run's folder
    with pytest.raises(ConfigError, match="another run"):
        _model().fit(X, Y, epochs=1, batch_size=BATCH, verbose=0, callbacks=[cb])
    with pytest.raises(ConfigError, match="not a PostHocEMACallback state"):
        cb.set_state({"kind": "ema"})
