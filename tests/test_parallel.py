"""average(workers=N) and --distributed: the same tensors, bit for bit, as one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import polyak
from _helpers import random_state, write_members
from polyak import ConfigError, NonFiniteError
from polyak._atomic import TEMP_MARK
from polyak._engine.parallel import plan_parallel
from polyak.formats import TensorInfo
from polyak.formats.safetensors import plan_shards


def assert_same_tensors(a_path, b_path):
    a, b = polyak.average([a_path]), polyak.average([b_path])
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.fixture
def members(tmp_path):
    rng = np.random.default_rng(5)
    states = [random_state(rng) for _ in range(5)]
    for s in states:  # enough tensors to spread over workers
        for j in range(6):
            s[f"extra.{j}"] = rng.normal(size=(17 * (j + 1),)).astype(np.float32)
    return states, write_members(tmp_path, states)


def test_plan_covers_every_tensor_once_and_balances():
    infos = [TensorInfo(f"t{i}", (100 * (i % 7 + 1),), np.dtype("float32")) for i in range(40)]
    plan = plan_parallel(infos, Path("o.safetensors"), parts=3)
    names = [i.name for g in plan.groups for i in g]
    assert sorted(names) == sorted(i.name for i in infos)
    loads = [sum(i.nbytes for g, o in zip(plan.groups, plan.owners) if o == k for i in g) for k in range(3)]
    assert max(loads) - min(loads) <= 2800  # at most one largest tensor apart (LPT)
    assert plan.index_path.name == "o.safetensors.index.json"
    # With a shard size the shards are those of a single process.
    sized = plan_parallel(infos, Path("o.safetensors.index.json"), parts=2, shard_size=5000)
    assert [[i.name for i in g] for g in sized.groups] == [[i.name for i in g] for g in plan_shards(infos, 5000)]
    assert sized.shard_paths[0].name == f"o-00001-of-{len(sized.groups):05d}.safetensors"


@pytest.mark.parametrize("shard_size", [None, "1KB"])
def test_workers_2_bit_identical_to_one_process(tmp_path, members, shard_size):
    _, paths = members
    one = polyak.average(paths, scheme="exponential", out=tmp_path / "one.safetensors", shard_size=shard_size)
    two = polyak.average(paths, scheme="exponential", out=tmp_path / "two.safetensors", workers=2, shard_size=shard_size)
    index = two.files[-1]
    assert index.name == "two.safetensors.index.json" and len(two.files) >= 3
    assert_same_tensors(one.files[-1], index)
    meta = json.loads(index.read_text())["metadata"]
    assert json.loads(meta["polyak"])["weights"] == one.weights
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
    if shard_size is not None:  # same shard layout as the single-process sharded writer
        assert [p.name.replace("two", "one") for p in two.files] == [p.name for p in one.files]


def test_worker_failure_leaves_nothing(tmp_path, members):
    states, _ = members
    states[2]["extra.5"][3] = np.nan
    paths = write_members(tmp_path, states, stem="bad")
    before = set(tmp_path.iterdir())
    with pytest.raises(NonFiniteError, match="extra.5"):
        polyak.average(paths, out=tmp_path / "avg.safetensors", workers=2)
    assert set(tmp_path.iterdir()) == before


def test_workers_need_files_and_safetensors(tmp_path, members):
    states, paths = members
    with pytest.raises(ConfigError, match="pass an output path"):
        polyak.average(states, workers=2)
    with pytest.raises(ConfigError, match="not in-memory"):
        polyak.average(states, workers=2, out=tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="safetensors outputs only"):
        polyak.average(paths, workers=2, out=tmp_path / "x.npz")
    with pytest.raises(ConfigError, match="workers"):
        polyak.average(paths, workers=0, out=tmp_path / "x.safetensors")


def _cli(*args, env=None, prog=("-m", "polyak")):
    return subprocess.run([sys.executable, *prog, *map(str, args)], capture_output=True, text=True, env=env, timeout=120)


def test_distributed_without_torchrun_is_a_clear_error(tmp_path, members):
    pytest.importorskip("torch")
    _, paths = members
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    r = _cli("average", *paths, "-o", tmp_path / "d.safetensors", "--distributed", env=env)
    assert r.returncode == 2 and "torchrun" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("d*"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_workers_and_torchrun_distributed_equal_workers_1(tmp_path, members):
    pytest.importorskip("torch")
    _, paths = members
    env = dict(os.environ)
    r = _cli("average", *paths, "-o", tmp_path / "one.safetensors", "--scheme", "linear", "-q", env=env)
    assert r.returncode == 0, r.stderr
    r = _cli("average", *paths, "-o", tmp_path / "w2.safetensors", "--scheme", "linear", "--workers", "2", env=env)
    assert r.returncode == 0, r.stderr
    assert "w2.safetensors.index.json" in r.stdout
    assert_same_tensors(tmp_path / "one.safetensors", tmp_path / "w2.safetensors.index.json")
    env["OMP_NUM_THREADS"] = "1"
    r = _cli(
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", _free_port(),
        "-m", "polyak", "average", *paths, "-o", tmp_path / "d.safetensors", "--scheme", "linear", "--distributed",
        env=env, prog=("-m", "torch.distributed.run"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote") == 3  # one summary, from rank 0
    assert_same_tensors(tmp_path / "one.safetensors", tmp_path / "d.safetensors.index.json")
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
