"""``polyak.keras.load_models`` keeps Keras' safe mode on and says so in polyak's terms."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
pytest.importorskip("h5py")

import polyak  # noqa: E402
import polyak.keras as pk  # noqa: E402


def _model(lam: bool) -> keras.Model:
    layers = [keras.Input((3,)), keras.layers.Dense(2, name="dense")]
    if lam:
        layers.append(keras.layers.Lambda(lambda x: x * 2.0, name="double"))
    layers.append(keras.layers.Dense(1, name="head"))
    return keras.Sequential(layers)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_layer_refused_naming_file_and_layer(tmp_path: Path, suffix: str) -> None:
    paths = []
    for epoch in range(3):
        # The Lambda layer is in the middle epoch only: the files before it load fine.
        p = tmp_path / f"model_{epoch}{suffix}"
        with warnings.catch_warnings():  # Keras calls .h5 "legacy" when saving one
            warnings.simplefilter("ignore")
            _model(lam=epoch == 1).save(p)
        paths.append(p)
    with pytest.raises(polyak.UnsafeFileError, match=rf"model_1\{suffix}: refused to load: its Lambda layer 'double' holds a Python function") as info:
        pk.load_models(tmp_path)
    text = str(info.value)
    assert "safe_mode" in text and "model.load_weights" in text
    # The files without a Lambda layer still load, in epoch order.
    loaded = pk.load_models([paths[0], paths[2]])
    assert [m.get_layer("dense").kernel.shape for m in loaded] == [(3, 2), (3, 2)]
    np.testing.assert_array_equal(loaded[1].get_layer("head").get_weights()[0], keras.models.load_model(paths[2]).get_layer("head").get_weights()[0])


def test_lambda_layers_are_found_in_nested_configs(tmp_path: Path) -> None:
    from polyak.keras._load import lambda_layers

    inner = keras.Sequential([keras.Input((3,)), keras.layers.Lambda(lambda x: x + 1.0, name="shift")], name="inner")
    outer = keras.Sequential([keras.Input((3,)), inner, keras.layers.Lambda(lambda x: -x, name="negate")])
    path = tmp_path / "nested.keras"
    outer.save(path)
    assert sorted(lambda_layers(path)) == ["negate", "shift"]
    with pytest.raises(polyak.UnsafeFileError, match=r"nested\.keras: refused to load: its Lambda layers '(negate|shift)', '(negate|shift)' hold"):
        pk.load_models([path])
