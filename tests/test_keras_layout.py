"""polyak.keras matches weights by name (the ``.weights.h5`` names), never by position.

``average_models`` used to zip ``get_weights()`` lists: two models whose layers were
created in another order were averaged layer against wrong layer without a word, and a
model with an extra layer was refused with only a count. Matching by name averages the
first and refuses the second, listing every difference at once.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("h5py")

import polyak  # noqa: E402
import polyak.keras as pk  # noqa: E402

pytestmark = [pytest.mark.keras, pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)]

X = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")


class TwoDense(keras.Model):
    """``b_out(a_in(x))``; ``out_first`` creates ``b_out`` first, so it comes first in ``weights``."""

    def __init__(self, *, out_first: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if out_first:
            self.b_out = keras.layers.Dense(4)
            self.a_in = keras.layers.Dense(4)
        else:
            self.a_in = keras.layers.Dense(4)
            self.b_out = keras.layers.Dense(4)

    def call(self, x):  # type: ignore[no-untyped-def]
        return self.b_out(self.a_in(x))


def _built(model: keras.Model, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model(X[:1])
    for i, v in enumerate(model.weights):  # distinct values everywhere, biases included
        v.assign(np.random.default_rng(seed * 10 + i).normal(size=v.shape).astype("float32"))
    return model


def _kernel(layer: keras.layers.Layer) -> np.ndarray:
    return keras.ops.convert_to_numpy(layer.kernel)


def test_layers_created_in_another_order_average_layer_by_layer() -> None:
    old, new = _built(TwoDense(), 1), _built(TwoDense(out_first=True), 2)
    # Same shapes at every position, but position 0 is a_in in one and b_out in the other.
    assert [w.shape for w in old.get_weights()] == [w.shape for w in new.get_weights()]
    assert pk.variable_names(old) != pk.variable_names(new)
    assert sorted(pk.variable_names(old)) == sorted(pk.variable_names(new))
    for target_first in (False, True):
        avg = pk.average_models([old, new], build_fn=lambda f=target_first: _built(TwoDense(out_first=f), 3))
        for layer in ("a_in", "b_out"):
            expected = (_kernel(getattr(old, layer)) + _kernel(getattr(new, layer))) / 2
            np.testing.assert_allclose(_kernel(getattr(avg, layer)), expected, rtol=1e-6)


def _seq(*middle: keras.layers.Layer, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), *middle, keras.layers.Dense(3)])


def test_models_that_differ_in_the_middle_are_refused_with_every_difference() -> None:
    extra_bn = _seq(keras.layers.BatchNormalization(), keras.layers.Dense(6), seed=1)
    narrower = _seq(keras.layers.Dense(5), seed=2)
    newest = _seq(keras.layers.Dense(6), seed=3)
    with pytest.raises(polyak.MismatchError, match=r"^the 3 members do not match") as info:
        pk.average_models([extra_bn, narrower, newest])
    lines = str(info.value).splitlines()
    a, b, c = (f"model {i} ({m.name})" for i, m in enumerate([extra_bn, narrower, newest]))
    assert lines[0] == "the 3 members do not match (4 problem(s)):"
    assert lines[1] == (
        f'  {a}: 4 unexpected tensor(s) that {c} lacks: "layers/batch_normalization/vars/0", '
        '"layers/batch_normalization/vars/1", "layers/batch_normalization/vars/2", "layers/batch_normalization/vars/3"'
    )
    assert lines[2:5] == [
        f'  {b}: tensor "layers/dense_1/vars/0" has shape (8, 5), {c} has (8, 6)',
        f'  {b}: tensor "layers/dense_1/vars/1" has shape (5,), {c} has (6,)',
        f'  {b}: tensor "layers/dense_2/vars/0" has shape (5, 3), {c} has (6, 3)',
    ]
    assert "same names, shapes and dtypes" in lines[-1]


def test_the_receiving_model_is_matched_by_name_too() -> None:
    models = [_seq(keras.layers.Dense(6), seed=s) for s in (1, 2)]
    template = _seq(keras.layers.Dense(5), seed=3)
    with pytest.raises(polyak.MismatchError, match="(?s)" + re.escape(
            f'{template.name}: tensor "layers/dense_1/vars/0" has shape (8, 5), the average has (8, 6)') + ".*template"):
        pk.average_models(models, template=template)
    avg = pk.average_models(models, template=_seq(keras.layers.Dense(6), seed=4))
    for got, *ws in zip(avg.get_weights(), *(m.get_weights() for m in models), strict=True):
        np.testing.assert_allclose(got, np.mean(ws, axis=0), rtol=1e-6)


def test_ema_state_restored_into_another_model_lists_every_difference() -> None:
    model = _seq(keras.layers.Dense(6), seed=1)
    model.compile(optimizer="sgd", loss="mse")
    ema = pk.EMACallback(0.5)
    model.fit(X, np.zeros((8, 3), "float32"), epochs=1, batch_size=4, verbose=0, callbacks=[ema])
    state = ema.get_state()
    other = _seq(keras.layers.Dense(5), keras.layers.Dense(6), seed=2)
    resumed = pk.EMACallback(0.5)
    resumed.set_model(other)
    with pytest.raises(polyak.MismatchError, match="^EMACallback.set_state: the saved average does not fit") as info:
        resumed.set_state(state)
    msg = str(info.value)
    assert msg.startswith("EMACallback.set_state: the saved average does not fit this model (5 problem(s)):")
    assert 'the saved average: missing 2 tensor(s) that this model has: "layers/dense_3/vars/0", "layers/dense_3/vars/1"' in msg
    assert 'the saved average: tensor "layers/dense_1/vars/0" has shape (8, 6), this model has (8, 5)' in msg
    assert 'the saved average: tensor "layers/dense_2/vars/0" has shape (6, 3), this model has (5, 6)' in msg
    assert msg.endswith("restore the state of an EMACallback of the same model")
