"""Every core format round-trips and is read back by its real library."""

import json
import zipfile

import ml_dtypes
import numpy as np
import pytest

import polyak
from _helpers import random_state, write_members
from polyak import ConfigError, FormatError
from polyak.formats import detect_format, open_source


def read_all(path, **kw):
    with open_source(path, **kw) as src:
        return {n: np.array(src.read(n)) for n in src.infos()}


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k].view(np.uint8) if a[k].dtype.kind == "V" else a[k], b[k].view(np.uint8) if b[k].dtype.kind == "V" else b[k])


@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ".pt"])
def test_round_trip(tmp_path, suffix):
    if suffix == ".pt":
        pytest.importorskip("torch")
    state = random_state(np.random.default_rng(0))
    p = tmp_path / f"m{suffix}"
    polyak.save(state, p)
    assert_same(read_all(p), state)


def test_safetensors_read_by_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    state = {k: v for k, v in random_state(np.random.default_rng(1)).items()}
    p = tmp_path / "m.safetensors"
    polyak.save(state, p, metadata={"format": "np", "note": "ü"})
    loaded = st.load_file(p)
    assert_same(loaded, state)
    from safetensors import safe_open

    with safe_open(p, framework="np") as f:
        assert f.metadata() == {"format": "np", "note": "ü"}


def test_safetensors_written_by_library_read_by_polyak(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, ml_dtypes.bfloat16), "c": np.array(3, np.int64)}
    p = tmp_path / "lib.safetensors"
    st.save_file(state, p, metadata={"k": "v"})
    assert_same(read_all(p), state)
    assert open_source(p).metadata() == {"k": "v"}


def test_float8_round_trip(tmp_path):
    state = {"f8": np.linspace(-2, 2, 7).astype(ml_dtypes.float8_e4m3fn), "f5": np.linspace(-2, 2, 7).astype(ml_dtypes.float8_e5m2)}
    p = tmp_path / "f8.safetensors"
    polyak.save(state, p)
    assert_same(read_all(p), state)
    got = polyak.average([state, state])
    np.testing.assert_array_equal(got["f8"].astype(np.float32), state["f8"].astype(np.float32))


def test_safetensors_bytes_do_not_depend_on_dict_order(tmp_path):
    state = random_state(np.random.default_rng(2))
    polyak.save(state, tmp_path / "a.safetensors", metadata={"x": "1", "y": "2"})
    polyak.save(dict(reversed(list(state.items()))), tmp_path / "b.safetensors", metadata={"y": "2", "x": "1"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    header_len = int.from_bytes((tmp_path / "a.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_sharded_output_and_input(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(3)
    states = [{f"t{i}": rng.normal(size=(64, 64)).astype(np.float32) for i in range(10)} for _ in range(3)]
    paths = write_members(tmp_path, states)
    out = tmp_path / "avg.safetensors"
    res = polyak.average(paths, out=out, shard_size="40KB")
    index = tmp_path / "avg.safetensors.index.json"
    assert res.files[-1] == index and len(res.files) > 2
    data = json.loads(index.read_text())
    assert data["metadata"]["total_size"] == 10 * 64 * 64 * 4
    assert "polyak" in data["metadata"]
    merged = {}
    for shard in sorted(set(data["weight_map"].values())):
        assert (tmp_path / shard).stat().st_size <= 40_000 + 10_000
        merged.update(st.load_file(tmp_path / shard))
    want = polyak.average(states)
    assert_same(merged, want)
    # the sharded checkpoint is itself a valid input
    assert detect_format(index).name == "safetensors-index"
    assert_same(polyak.average([index]), want)


def test_npz_readable_by_numpy(tmp_path):
    state = {"a": np.arange(5.0), "b": np.ones((2, 2), np.float32)}
    p = tmp_path / "m.npz"
    polyak.save(state, p)
    with np.load(p) as z:
        np.testing.assert_array_equal(z["a"], state["a"])
        np.testing.assert_array_equal(z["b"], state["b"])
    np.savez(tmp_path / "np.npz", **state)
    assert_same(read_all(tmp_path / "np.npz"), state)


def test_npz_object_arrays_refused(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(polyak.UnsafeFileError, match="pickle"):
        open_source(p)


def test_wrong_suffix_and_magic(tmp_path):
    state = {"w": np.zeros(3, np.float32)}
    p = tmp_path / "model.npz"
    polyak.save(state, tmp_path / "real.safetensors")
    p.write_bytes((tmp_path / "real.safetensors").read_bytes())
    with pytest.raises(FormatError, match="content looks like safetensors.*--format safetensors"):
        open_source(p)
    assert_same(read_all(p, format="safetensors"), state)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(FormatError, match="junk.safetensors"):
        open_source(junk)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        open_source(empty)
    with pytest.raises(FormatError, match="no such file"):
        open_source(tmp_path / "missing.safetensors")


def test_truncated_safetensors(tmp_path):
    p = tmp_path / "m.safetensors"
    polyak.save({"w": np.zeros(1000, np.float32)}, p)
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(FormatError, match="m.safetensors"):
        read_all(p)


def test_key_on_flat_format_refused(tmp_path):
    p = tmp_path / "m.safetensors"
    polyak.save({"w": np.zeros(1, np.float32)}, p)
    with pytest.raises(ConfigError, match="--key"):
        open_source(p, key="model")


def test_output_format_from_suffix(tmp_path):
    with pytest.raises(ConfigError, match="output format"):
        polyak.save({"w": np.zeros(1)}, tmp_path / "m.weird")


def test_npz_zip_bomb_refused(tmp_path):
    p = tmp_path / "bomb.npz"
    big = np.zeros(50_000_000, np.uint8)
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("a.npy", "w", force_zip64=True) as fp:
        np.lib.format.write_array(fp, big)
    with pytest.raises(polyak.UnsafeFileError, match="zip bomb"):
        open_source(p)
