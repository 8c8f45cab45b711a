"""torch.distributed.checkpoint folders as inputs: read tensor by tensor, no process group."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import polyak
from _helpers import (
    random_state,
    read_safetensors,
    reference_average,
    tutorial_weights,
    write_members,
)
from polyak import ConfigError
from polyak.formats import detect_format, open_source

torch = pytest.importorskip("torch")
dcp = pytest.importorskip("torch.distributed.checkpoint")

from polyak.formats.torch_pt import numpy_to_tensor  # noqa: E402


def save_dcp(state, path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(path), no_dist=True)
    return path


def torch_state(np_state):
    return {k: numpy_to_tensor(v.copy()) for k, v in np_state.items()}


@pytest.fixture
def states():
    rng = np.random.default_rng(3)
    return [random_state(rng) for _ in range(4)]


def test_dcp_average_equals_safetensors_average(tmp_path, states):
    st_paths = write_members(tmp_path, states)
    dcp_paths = [
        save_dcp({"model": torch_state(s), "step": 100 * i, "optim": {"lr": 0.1}}, tmp_path / f"step_{i}")
        for i, s in enumerate(states)
    ]
    got = polyak.average(dcp_paths, scheme="linear")
    want = polyak.average(st_paths, scheme="linear")
    assert list(got) == list(want) or sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert got[k].tobytes() == want[k].tobytes(), k
    ref = reference_average(states, tutorial_weights("linear", 4))
    for k in ref:
        np.testing.assert_allclose(got[k].astype(np.float64), ref[k].astype(np.float64), rtol=1e-2 if ref[k].itemsize <= 2 else 1e-5, atol=1e-6)


def test_flat_layout_key_and_detection(tmp_path, states):
    flat = save_dcp(torch_state(states[0]), tmp_path / "flat")
    assert detect_format(flat).name == "dcp"
    with open_source(flat) as src:
        assert set(src.infos()) == set(states[0]) and src.key is None
        np.testing.assert_array_equal(src.read("layer1.weight"), states[0]["layer1.weight"])
    two = save_dcp({"model": torch_state(states[0]), "ema": torch_state(states[1]), "step": 3}, tmp_path / "two")
    with pytest.raises(ConfigError, match="--key"):
        open_source(two)
    with open_source(two, key="ema") as src:
        assert src.read("brain").tobytes() == states[1]["brain"].tobytes()
        assert src.infos()["brain"].dtype == states[1]["brain"].dtype
    with pytest.raises(ConfigError, match="no tensors under the key 'nope'.*'ema'"):
        open_source(two, key="nope")


def test_sniff_does_not_import_torch(tmp_path, states):
    folder = save_dcp(torch_state(states[0]), tmp_path / "ck")
    code = (
        "import sys, polyak.formats as f; fmt = f.detect_format(sys.argv[1]); "
        "print(fmt.name, 'torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=dict(os.environ))
    assert r.stdout.split() == ["dcp", "False"], r.stderr


def test_cli_averages_dcp_folders_with_key(tmp_path, states):
    paths = [save_dcp({"app": {"model": torch_state(s)}, "step": i}, tmp_path / f"s{i}") for i, s in enumerate(states[:2])]
    out = tmp_path / "avg.safetensors"
    r = subprocess.run(
        [sys.executable, "-m", "polyak", "average", *map(str, paths), "-o", str(out), "--key", "app/model", "-q"],
        capture_output=True, text=True, env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr
    got = read_safetensors(out)
    want = polyak.average(states[:2])
    assert all(got[k].tobytes() == want[k].tobytes() for k in want)
