"""The `polyak` command end to end, through a subprocess."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import polyak
from _helpers import random_state, read_safetensors, write_members


def run(*args, cwd=None):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "polyak", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


@pytest.fixture
def members(tmp_path):
    rng = np.random.default_rng(0)
    states = [random_state(rng) for _ in range(12)]
    return states, write_members(tmp_path, states, stem="ckpt")


def test_average_exponential_last(tmp_path, members):
    states, paths = members
    out = tmp_path / "final.safetensors"
    r = run("average", *paths, "-o", out, "--scheme", "exponential", "--alpha", "2", "--last", "10")
    assert r.returncode == 0, r.stderr
    assert "averaged 10 checkpoints" in r.stdout and f"wrote {out}" in r.stdout
    got = read_safetensors(out)  # the safetensors package reads what the CLI wrote
    want = polyak.average(paths[2:], scheme="exponential", alpha=2.0)
    for k in want:
        np.testing.assert_array_equal(got[k].reshape(-1).view(np.uint8), want[k].reshape(-1).view(np.uint8))


def test_inspect_table_and_json(tmp_path, members):
    _, paths = members
    r = run("inspect", paths[0])
    assert r.returncode == 0, r.stderr
    assert "layer1.weight" in r.stdout and "(8, 5)" in r.stdout and "parameters" in r.stdout
    r = run("inspect", paths[0], "--json")
    data = json.loads(r.stdout)
    assert data["format"] == "safetensors"
    assert data["parameters"] == sum(int(np.prod(t["shape"])) for t in data["tensors"])


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--scheme", "exponential", "--alpha", "0"], "alpha"),
        (["--last", "40"], "only 12 members"),
        (["--weights", "1,2"], "2 custom weights for 12 members"),
        (["--shard-size", "lots"], "cannot read the size"),
    ],
)
def test_user_errors_exit_2_one_line_no_output(tmp_path, members, args, needle):
    _, paths = members
    out = tmp_path / "out.safetensors"
    r = run("average", *paths, "-o", out, *args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "polyak-tmp" in p.name]


def test_mismatch_error_names_files(tmp_path):
    a = tmp_path / "a_1.safetensors"
    b = tmp_path / "a_2.safetensors"
    polyak.save({"w": np.zeros(2, np.float32)}, a)
    polyak.save({"w": np.zeros(3, np.float32)}, b)
    r = run("average", a, b, "-o", tmp_path / "o.npz")
    assert r.returncode == 2
    assert "a_1.safetensors" in r.stderr and "shape (2,)" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.npz").exists()


def test_existing_output_needs_force(tmp_path, members):
    _, paths = members
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    r = run("average", *paths, "-o", out)
    assert r.returncode == 2 and "--force" in r.stderr
    assert out.read_bytes() == b"precious"
    r = run("average", *paths, "-o", out, "--force", "-q")
    assert r.returncode == 0 and r.stdout == ""


def test_help_has_examples():
    r = run("average", "--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "--last" in r.stdout
    r = run("--help")
    assert "polyak average" in r.stdout


def test_pt_to_npz_with_key(tmp_path):
    torch = pytest.importorskip("torch")
    for i in range(3):
        torch.save({"model": {"w": torch.full((2,), float(i))}, "epoch": i}, tmp_path / f"epoch_{i}.pt")
    out = tmp_path / "avg.npz"
    r = run("average", *sorted(tmp_path.glob("epoch_*.pt")), "-o", out, "--scheme", "linear", "--key", "model")
    assert r.returncode == 0, r.stderr
    # linear weights 1, 2, 3 over values 0, 1, 2: (0 + 2 + 6) / 6
    with np.load(out) as npz:  # numpy reads what the CLI wrote
        assert npz["w"].tolist() == pytest.approx([8 / 6, 8 / 6])


@pytest.mark.parametrize("last", ["0", "-3"])
def test_last_is_checked_once_by_the_library(tmp_path, members, capsys, last):
    from polyak.cli import main

    _, paths = members
    out = tmp_path / "out.safetensors"
    assert main(["average", *map(str, paths), "-o", str(out), "--last", last]) == 2
    err = capsys.readouterr().err
    assert err == f"polyak: error: last must be a whole number ≥ 1, got {last}\n"
    assert not out.exists()


def test_summary_comes_from_rank_0_of_the_result(tmp_path, members):
    _, paths = members
    result = polyak.average(paths, out=tmp_path / "o.safetensors")
    assert result.rank == 0  # a distributed run's other ranks return their own rank
