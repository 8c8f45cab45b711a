"""Keras files as formats of the engine: read/written with h5py, loaded back by Keras."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")
keras = pytest.importorskip("keras")

import polyak  # noqa: E402
from _helpers import tutorial_weights  # noqa: E402
from polyak import FormatError, UnsafeFileError  # noqa: E402

# Keras 3.15's Variable.numpy() trips numpy 2's __array__(copy=) deprecation: Keras' bug.
pytestmark = [pytest.mark.keras, pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)]
# Keras 3 warns about the input_shape argument in every Keras 2 model config it loads.
legacy_warning = pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`:UserWarning")

FIXTURES = Path(__file__).parent / "fixtures" / "keras2"


def _model(dtype: str = "float32", *, compiled: bool = True) -> keras.Model:
    m = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(6, activation="relu", dtype=dtype),
            keras.layers.BatchNormalization(dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )
    if compiled:
        m.compile(optimizer="adam", loss="mse")
    return m


def _members(tmp_path: Path, suffix: str, n: int = 3, dtype: str = "float32") -> tuple[list[Path], keras.Model, list[list[np.ndarray]]]:
    keras.utils.set_random_seed(1)
    m = _model(dtype)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 3)).astype("float32")
    paths, weights = [], []
    for epoch in range(n):
        m.fit(x, y, epochs=1, batch_size=8, verbose=0)
        p = tmp_path / f"m_{epoch}{suffix}"
        if suffix == ".keras":
            m.save(p)
        else:
            m.save_weights(p)
        paths.append(p)
        weights.append(m.get_weights())
    return paths, m, weights


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.setdefault("KERAS_BACKEND", "torch")
    return subprocess.run([sys.executable, "-m", "polyak", *args], capture_output=True, text=True, env=env)


def _expected(weights: list[list[np.ndarray]], w: np.ndarray) -> list[np.ndarray]:
    return [np.average(np.stack(ws), axis=0, weights=w) for ws in zip(*weights, strict=True)]


def test_keras_archive_cli_average_loads_and_predicts(tmp_path: Path) -> None:
    paths, _, weights = _members(tmp_path, ".keras")
    out = tmp_path / "avg.keras"
    r = _cli("average", *map(str, paths), "-o", str(out), "--scheme", "linear")
    assert r.returncode == 0, r.stderr
    with pytest.warns(UserWarning, match="optimizer"):  # optimizer state dropped: starts fresh
        loaded = keras.models.load_model(out)
    w = tutorial_weights("linear", 3)
    ref = _model()
    ref.set_weights(_expected(weights, w))
    x = np.random.default_rng(5).normal(size=(7, 4)).astype("float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), ref.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    with zipfile.ZipFile(out) as zf:
        assert zf.namelist()[:3] == ["metadata.json", "config.json", "model.weights.h5"]
        assert '"polyak"' in zf.read("metadata.json").decode()
        with zipfile.ZipFile(paths[-1]) as newest:
            assert zf.read("config.json") == newest.read("config.json")
    # in memory: the same numbers, keyed by HDF5 path
    state = polyak.average(paths, scheme="linear")
    assert "layers/dense/vars/0" in state and not any(k.startswith("optimizer") for k in state)
    np.testing.assert_allclose(state["layers/dense/vars/0"], _expected(weights, w)[0], rtol=1e-6)


def test_keras_archive_keep_optimizer(tmp_path: Path) -> None:
    paths, _, _ = _members(tmp_path, ".keras", n=2)
    out = tmp_path / "avg.keras"
    polyak.average(paths, out=out, keep_optimizer=True)
    loaded = keras.models.load_model(out)  # no warning: optimizer state present
    assert loaded.optimizer is not None
    with zipfile.ZipFile(out) as a, zipfile.ZipFile(paths[-1]) as b:
        import io

        fa, fb = h5py.File(io.BytesIO(a.read("model.weights.h5"))), h5py.File(io.BytesIO(b.read("model.weights.h5")))
        assert sorted(fa["optimizer/vars"]) == sorted(fb["optimizer/vars"])
        for k in fb["optimizer/vars"]:
            np.testing.assert_array_equal(fa["optimizer/vars"][k][()], fb["optimizer/vars"][k][()])


def test_weights_h5_round_trip_and_h5_suffix(tmp_path: Path) -> None:
    paths, _, weights = _members(tmp_path, ".weights.h5")
    out = tmp_path / "avg.weights.h5"
    polyak.average(paths, out=out, scheme="exponential", alpha=1.5)
    m = _model(compiled=False)  # the optimizer state was dropped: load into an uncompiled model
    m.load_weights(out)
    for got, exp in zip(m.get_weights(), _expected(weights, tutorial_weights("exponential", 3, 1.5)), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-6, atol=1e-7)
    with h5py.File(out) as f, h5py.File(paths[-1]) as g:
        assert "optimizer" not in f and "optimizer" in g
        assert dict(f["layers/dense/vars"].attrs) == dict(g["layers/dense/vars"].attrs)
    # a Keras 3 weights file named .h5: the content decides, also for the output
    renamed = []
    for p in paths:
        q = p.with_name(p.name.replace(".weights.h5", ".h5"))
        q.write_bytes(p.read_bytes())
        renamed.append(q)
    assert polyak.open_source(renamed[0]).format_name == "keras-weights"
    polyak.average(renamed, out=tmp_path / "avg2.h5")
    assert polyak.open_source(tmp_path / "avg2.h5").format_name == "keras-weights"


def test_bfloat16_attributes_carried(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    paths, _, _ = _members(tmp_path, ".weights.h5", n=2, dtype="bfloat16")
    with polyak.open_source(paths[0]) as src:
        assert src.infos()["layers/dense/vars/0"].dtype == np.dtype(ml_dtypes.bfloat16)
    out = tmp_path / "avg.weights.h5"
    polyak.average(paths, out=out)
    with h5py.File(out) as f:
        ds = f["layers/dense/vars/0"]
        assert ds.dtype.kind == "V" and ds.dtype.itemsize == 2 and ds.attrs["dtype"] == "bfloat16"
    m = _model("bfloat16", compiled=False)
    m.load_weights(out)
    state = polyak.average(paths)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(keras.ops.cast(m.layers[0].kernel, "float32")),
        state["layers/dense/vars/0"].astype(np.float32),
    )


def _fixture_state(path: Path, names: list[str]) -> list[np.ndarray]:
    with h5py.File(path) as f:
        return [f[n][()] for n in names]


@legacy_warning
def test_legacy_full_model_h5(tmp_path: Path) -> None:
    members = sorted(FIXTURES.glob("full_*.h5"))
    out = tmp_path / "avg.h5"
    r = _cli("average", *map(str, members), "-o", str(out))
    assert r.returncode == 0, r.stderr
    with polyak.open_source(out) as src:
        assert src.format_name == "keras2-h5"
        names = list(src.infos())
    assert names[0] == "model_weights/dense/dense/kernel:0"
    expected = [np.mean(np.stack(t), axis=0) for t in zip(*[_fixture_state(p, names) for p in members], strict=True)]
    with h5py.File(out) as f, h5py.File(members[-1]) as g:
        for key in ("model_config", "training_config", "keras_version", "backend"):
            assert f.attrs[key] == g.attrs[key]
        assert list(f["model_weights"].attrs["layer_names"]) == list(g["model_weights"].attrs["layer_names"])
        assert "optimizer_weights" not in f
    loaded = keras.saving.load_model(out, compile=False)
    ref = keras.saving.load_model(members[-1], compile=False)
    data = np.load(FIXTURES / "expected.npz")
    np.testing.assert_allclose(ref.predict(data["x"], verbose=0), data["pred_3"], rtol=1e-5, atol=1e-6)
    # Keras 3 orders the legacy weights as model.weights; compare as sets of arrays by layer
    got = loaded.get_weights()
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([w.ravel() for w in got]), np.concatenate([w.ravel() for w in expected]), rtol=1e-6, atol=1e-7)


@legacy_warning
def test_legacy_weights_only_h5_and_chunked_attributes(tmp_path: Path) -> None:
    members = []
    for p in sorted(FIXTURES.glob("weights_*.h5")):
        q = tmp_path / p.name
        q.write_bytes(p.read_bytes())
        with h5py.File(q, "a") as f:  # split layer_names as Keras 2 does for > 64 KiB attributes
            names = f.attrs["layer_names"]
            del f.attrs["layer_names"]
            f.attrs["layer_names0"] = names[:2]
            f.attrs["layer_names1"] = names[2:]
        members.append(q)
    out = tmp_path / "avg.h5"
    polyak.average(members, out=out)
    with h5py.File(out) as f:
        assert "layer_names" not in f.attrs and list(f.attrs["layer_names1"]) == ["dense_1"]
    model = keras.saving.load_model(FIXTURES / "full_3.h5", compile=False)
    model.load_weights(out)
    with polyak.open_source(members[0]) as src:
        names = list(src.infos())
    expected = [np.mean(np.stack(t), axis=0) for t in zip(*[_fixture_state(p, names) for p in members], strict=True)]
    np.testing.assert_allclose(
        np.concatenate([w.ravel() for w in model.get_weights()]),
        np.concatenate([w.ravel() for w in expected]),
        rtol=1e-6,
        atol=1e-7,
    )


def test_links_are_refused(tmp_path: Path) -> None:
    paths, _, _ = _members(tmp_path, ".weights.h5", n=1)
    soft = tmp_path / "soft.weights.h5"
    soft.write_bytes(paths[0].read_bytes())
    with h5py.File(soft, "a") as f:
        f["layers/extra"] = h5py.SoftLink("/layers/dense")
    with pytest.raises(UnsafeFileError, match="soft link"):
        polyak.open_source(soft)
    ext = tmp_path / "ext.weights.h5"
    ext.write_bytes(paths[0].read_bytes())
    with h5py.File(ext, "a") as f:
        f["layers/extra"] = h5py.ExternalLink(str(paths[0]), "/layers")
    with pytest.raises(UnsafeFileError, match="external link"):
        polyak.open_source(ext)


def test_zip_bomb_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", "{}")
        zf.writestr("model.weights.h5", b"\0" * (40 << 20))
    with pytest.raises(UnsafeFileError, match="zip bomb"):
        polyak.open_source(bomb)


def test_wrong_content_is_explained(tmp_path: Path) -> None:
    legacy = tmp_path / "w.weights.h5"
    legacy.write_bytes((FIXTURES / "weights_1.h5").read_bytes())
    with pytest.raises(FormatError, match="keras2-h5"):
        polyak.open_source(legacy)


def test_sniffing_other_formats_does_not_import_h5py(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np, polyak; np.savez(sys.argv[1], a=np.zeros(2));"
        "polyak.open_source(sys.argv[1]); print('h5py' in sys.modules, 'keras' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.npz")], capture_output=True, text=True)
    assert r.stdout.split() == ["False", "False"], r.stderr
