"""The format registry as objects: a user's own format, and templates that survive renaming.

Each format declares one FormatImpl (sniff, open, writer); what a writer carries over from
the newest member is that member's template() (renamed when strip_prefix renames tensors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import polyak
from _toy_format import TOY, load_toy, save_toy
from polyak import ConfigError, FormatError
from polyak.formats import FORMATS, Format, detect_format, get_format, open_source, register_format

FIXTURES = Path(__file__).parent / "fixtures" / "keras2"


@pytest.fixture(params=["lazy", "object"])
def toy_format(request):
    # Registered lazily by "module:NAME" (as the built-in formats are) or as the object.
    provider = "_toy_format:TOY" if request.param == "lazy" else TOY
    fmt = register_format(Format("toy", (".toy",), provider, "a toy format registered by a test"))
    yield fmt
    FORMATS.pop("toy", None)


def test_a_user_registered_format_is_read_averaged_and_written(tmp_path, toy_format):
    a = save_toy(
        tmp_path / "m_1.toy",
        {"module.w": np.array([0.0, 3.0], np.float32), "module.step": np.array(4, np.int64)},
        {"module.w": "old note"},
    )
    b = save_toy(
        tmp_path / "m_2.toy",
        {"module.w": np.array([3.0, 6.0], np.float32), "module.step": np.array(9, np.int64)},
        {"module.w": "kernel of the only layer", "module.step": "optimizer steps"},
    )
    assert detect_format(a) is toy_format and toy_format.writable
    with open_source(b) as src:
        assert src.format_name == "toy" and list(src.infos()) == ["module.w", "module.step"]
    assert polyak.inspect(a).parameters == 3

    out = tmp_path / "avg.toy"
    result = polyak.average([a, b], scheme="linear", strip_prefix=["module."], out=out)
    assert result.files == [out]
    got = load_toy(out)["tensors"]
    # linear weights for 2 members: 1/3, 2/3 (oldest → newest)
    assert got["w"]["values"] == pytest.approx([2.0, 5.0])
    assert got["w"]["dtype"] == "float32"
    assert got["step"]["values"] == 9  # integers: copied from the newest member
    # the newest member's template, renamed like its tensors
    assert got["w"]["note"] == "kernel of the only layer"
    assert got["step"]["note"] == "optimizer steps"
    assert "polyak" in load_toy(out)["metadata"]

    # in memory, and into another format
    mem = polyak.average([a, b])
    np.testing.assert_array_equal(mem["module.w"], np.array([1.5, 4.5], np.float32))
    polyak.average([a, b], out=tmp_path / "avg.npz")
    with open_source(tmp_path / "avg.npz") as src:
        np.testing.assert_array_equal(src.read("module.w"), np.array([1.5, 4.5], np.float32))


def test_a_registered_format_is_checked_by_its_sniffer(tmp_path, toy_format):
    fake = tmp_path / "x.toy"
    np.savez(tmp_path / "x.npz", a=np.zeros(2))
    fake.write_bytes((tmp_path / "x.npz").read_bytes())
    with pytest.raises(FormatError, match="the name says toy but the content looks like npz"):
        polyak.open_source(fake)


def test_a_provider_that_is_not_a_format_impl_is_refused(tmp_path):
    fmt = Format("broken", (".broken",), "polyak.formats.npz:NpzWriter", "not a FormatImpl")
    with pytest.raises(ConfigError, match="'polyak.formats.npz:NpzWriter' does not name a polyak.formats.FormatImpl"):
        fmt.impl()


def test_unwritable_formats_say_so():
    assert get_format("dcp").writable is False
    assert get_format("npz").writable is True
    with pytest.raises(ConfigError, match="polyak cannot write dcp files"):
        polyak.formats.output_format("out", "dcp")


def _datasets(path: Path, names: list[str]) -> list[np.ndarray]:
    h5py = pytest.importorskip("h5py")
    with h5py.File(path) as f:
        return [f[n][()] for n in names]


@pytest.mark.parametrize(
    "members",
    [
        ["full_1.h5", "full_2.h5", "full_3.h5"],
        ["weights_1.h5", "full_2.h5", "full_3.h5"],  # the reason to strip: mixed layouts
    ],
)
def test_strip_prefix_on_keras2_h5_keeps_the_newest_members_layout(tmp_path, members):
    # Used to fail: "newest member ... must itself be a Keras 2 .h5 file" (the prefix-stripping
    # view hid the member's HDF5 layout from the writer).
    h5py = pytest.importorskip("h5py")
    paths = [FIXTURES / m for m in members]
    out = tmp_path / "avg.h5"
    polyak.average(paths, order="given", strip_prefix=["model_weights/"], out=out)
    with polyak.open_source(paths[-1]) as newest:
        names = list(newest.infos())
    assert names[0] == "model_weights/dense/dense/kernel:0"
    with polyak.open_source(out) as src:
        assert src.format_name == "keras2-h5"
        assert list(src.infos()) == names  # the newest member's paths, not the stripped names
    per_member = []
    for p in paths:
        with h5py.File(p) as f:
            root = f.get("model_weights", f)
            per_member.append([root[n.removeprefix("model_weights/")][()] for n in names])
    expected = [np.mean(np.stack(t).astype(np.float64), axis=0) for t in zip(*per_member, strict=True)]
    for got, want in zip(_datasets(out, names), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # float32 sums
    with h5py.File(out) as f, h5py.File(paths[-1]) as g:
        for key in ("model_config", "training_config", "keras_version", "backend"):
            assert f.attrs[key] == g.attrs[key]
        assert list(f["model_weights"].attrs["layer_names"]) == list(g["model_weights"].attrs["layer_names"])
        assert "optimizer_weights" not in f


def _keras3_weights(path: Path, kernel: np.ndarray, bias: np.ndarray) -> Path:
    """A Keras 3 ``.weights.h5`` as ``model.save_weights`` lays it out (written with h5py)."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w") as f:
        v = f.create_group("layers/dense/vars")
        v.attrs["name"] = "dense"
        v["0"] = kernel
        v["1"] = bias
        f.create_group("layers/dense_1/vars").attrs["name"] = "dense_1"
        f.create_group("vars")
    return path


def test_strip_prefix_on_keras3_weights_keeps_the_layout(tmp_path):
    # Used to write a flat file of the stripped names ("dense/vars/0", no attributes), which
    # Keras cannot load: the writer never saw the newest member's layout.
    h5py = pytest.importorskip("h5py")
    a = _keras3_weights(tmp_path / "m_1.weights.h5", np.full((2, 3), 1.0, np.float32), np.zeros(3, np.float32))
    b = _keras3_weights(tmp_path / "m_2.weights.h5", np.full((2, 3), 4.0, np.float32), np.ones(3, np.float32))
    out = tmp_path / "avg.weights.h5"
    polyak.average([a, b], strip_prefix=["layers/"], out=out)
    with h5py.File(out) as f:
        assert f["layers/dense/vars"].attrs["name"] == "dense"
        assert f["layers/dense_1/vars"].attrs["name"] == "dense_1"
        np.testing.assert_array_equal(f["layers/dense/vars/0"][()], np.full((2, 3), 2.5, np.float32))
        np.testing.assert_array_equal(f["layers/dense/vars/1"][()], np.full(3, 0.5, np.float32))
        assert "dense" not in f


def test_strip_prefix_on_a_nested_pt_keeps_the_nesting_key(tmp_path):
    torch = pytest.importorskip("torch")
    for i in range(2):
        torch.save({"model": {"module.w": torch.full((2,), float(i))}, "epoch": i}, tmp_path / f"m_{i}.pt")
    out = tmp_path / "avg.pt"
    polyak.average([tmp_path / "m_0.pt", tmp_path / "m_1.pt"], strip_prefix=["module."], out=out)
    got = torch.load(out, weights_only=True)
    assert set(got) == {"model", "polyak"}
    torch.testing.assert_close(got["model"]["w"], torch.full((2,), 0.5))


@pytest.mark.keras
def test_strip_prefix_on_a_keras_archive_keeps_config_and_layout(tmp_path):
    # Used to fail: "a .keras output copies the model config from the newest member, which
    # must itself be a .keras file" (the prefix-stripping view hid the archive).
    keras = pytest.importorskip("keras")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    paths = []
    for i in range(3):
        model.layers[0].kernel.assign(np.full((4, 3), float(i), "float32"))
        model.save(tmp_path / f"m_{i}.keras")
        paths.append(tmp_path / f"m_{i}.keras")
    out = tmp_path / "avg.keras"
    polyak.average(paths, scheme="linear", strip_prefix=["layers/"], out=out)
    loaded = keras.saving.load_model(out)
    # linear weights 1/6, 2/6, 3/6 of kernels 0, 1, 2: 8/6
    np.testing.assert_allclose(loaded.layers[0].kernel.numpy(), np.full((4, 3), 8 / 6), rtol=1e-6)
