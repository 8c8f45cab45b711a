"""``polyak demo`` end to end: short runs of both frameworks, determinism, repeats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from polyak.demo._experiment import DemoConfig
from polyak.demo._train import Recipe


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "polyak", "demo", *args], capture_output=True, text=True, timeout=300)


def _accuracies(obj: Any) -> list[float]:
    """Every accuracy in a results dict (keys without "loss"; timings and seeds excluded)."""
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            if k in ("seconds", "config", "seed", "seeds", "epochs", "n", "epoch", "runs", "members", "std") or "loss" in k:
                continue
            out += _accuracies(v)
        return out
    if isinstance(obj, list):
        return [x for v in obj for x in _accuracies(v)]
    return [obj] if isinstance(obj, float) else []


def _numbers(rep: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in rep.items() if k not in ("seconds", "files")}


def test_torch_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    r = _demo("--framework", "torch", "--epochs", "30", "--members", "5", "--alphas", "1,2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "> 1: single=" in r.stdout and "> 5: single=" in r.stdout
    assert "selection done right" in r.stdout
    assert r.stdout.strip().splitlines()[-1].startswith(f"files: {out}/")
    for name in ("results.json", "equal.png", "linear.png", "exponential_alpha_1.png", "exponential_alpha_2.png", "alphas.png"):
        assert (out / name).stat().st_size > 0, name
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"model_epoch_{e}.safetensors" for e in range(25, 30)]
    data = json.loads((out / "results.json").read_text())
    assert data["epochs"] == list(range(25, 30)) and len(data["single"]) == 5
    assert set(data["averages"]) == {"equal", "linear", "exponential(alpha=1)", "exponential(alpha=2)"}
    values = _accuracies(data)
    assert len(values) > 80 and all(0.0 <= v <= 1.0 for v in values)
    # The n = 1 average is the final model.
    assert data["averages"]["equal"][0] == {k: v for k, v in data["final"].items() if k != "train"}


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_keras_end_to_end(tmp_path: Path) -> None:
    # The command on this run's backend; the demo on each backend (its accuracies) is
    # test_demo.py's test_keras_demo_accuracy_is_in_the_reference_range, and the command on
    # JAX-only and TensorFlow-only installs is test_demo_backend.py's.
    pytest.importorskip("keras")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    r = _demo("--epochs", "12", "--members", "3", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("files:")  # --quiet: only the last line
    backend = os.environ["KERAS_BACKEND"]
    assert f"[keras on {backend}, " in r.stdout
    assert len([p for p in (out / "checkpoints").iterdir() if p.suffix == ".keras"]) == 3
    data = json.loads((out / "results.json").read_text())
    assert data["config"]["framework"] == "keras" and data["epochs"] == [9, 10, 11]
    assert data["backend"] == {"name": backend, "reason": "set by KERAS_BACKEND"}
    assert all(0.0 <= v <= 1.0 for v in _accuracies(data))
    assert (out / "exponential_alpha_2.png").exists()


def test_same_seed_same_numbers(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from polyak.demo._experiment import run_repetition

    cfg = DemoConfig(framework="torch", recipe=Recipe(epochs=25, members=4))
    a = run_repetition(cfg, seed=5, directory=tmp_path / "a")
    b = run_repetition(cfg, seed=5, directory=tmp_path / "b")
    c = run_repetition(cfg, seed=6, directory=tmp_path / "c")
    assert _numbers(a) == _numbers(b)
    assert _numbers(a)["single"] != _numbers(c)["single"]


def test_repeats_in_parallel_equal_one_by_one(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from polyak.demo._run import run_demo

    cfg = DemoConfig(framework="torch", recipe=Recipe(epochs=20, members=3))
    lines: list[str] = []
    par = run_demo(cfg, seed=3, repeats=2, jobs=2, out=tmp_path / "par", quiet=False, echo=lines.append)
    seq = run_demo(cfg, seed=3, repeats=2, jobs=1, out=tmp_path / "seq", quiet=True, echo=lambda s: None)
    assert [_numbers(r) for r in par["runs"]] == [_numbers(r) for r in seq["runs"]]
    assert par["summary"] == seq["summary"] and par["summary"]["seeds"] == [3, 4]
    assert (tmp_path / "par" / "repeats.json").exists() and (tmp_path / "par" / "repeats.png").exists()
    text = "\n".join(lines)
    assert "mean ± std" in text and "versus the final model" in text and "within-run spread" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--members", "0"], "at least 1"),
        (["--epochs", "5", "--members", "6"], "--members must be between 1 and --epochs"),
        (["--alphas", "1,-2"], "alphas must be positive"),
    ],
)
def test_user_errors_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    r = _demo(*args, "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("framework", ["torch", "keras"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_posthoc_in_the_demo(tmp_path: Path, framework: str) -> None:
    """``--posthoc``: the tracked EMAs' snapshots are in the run's folder, every width of the
    grid is scored, the choice is the best validation accuracy (ties: the tracked EMA, then
    the narrowest width), and the summary over runs reports it on test."""
    pytest.importorskip(framework)
    from polyak import open_source
    from polyak.demo._data import load_blobs
    from polyak.demo._experiment import POSTHOC_DIR, run_repetition
    from polyak.demo._model import Evaluator
    from polyak.demo._summary import summarise

    epochs = 40 if framework == "torch" else 20  # Keras' fit costs more per epoch
    config = DemoConfig(framework=framework, recipe=Recipe(epochs=epochs, members=4), posthoc=True)
    rep = run_repetition(config, seed=1, directory=tmp_path / "ckpt")
    ph = rep["posthoc"]
    assert config.posthoc_every_epochs == epochs // 20 and ph["snapshots"] == 2 * 20 and ph["step"] == epochs * 4
    assert [r["sigma_rel"] for r in ph["rebuilt"]] == list(config.posthoc_grid)
    assert [r["sigma_rel"] for r in ph["tracked"]] == [0.05, 0.1]
    # the tracked rows are the snapshot files, scored by the demo's evaluator
    folder = tmp_path / "ckpt" / POSTHOC_DIR
    with open_source(folder / f"posthoc_sigma0.1_step{epochs * 4:09d}.safetensors") as src:
        state = {n: src.read(n) for n in src.infos()}
    assert Evaluator(load_blobs(), framework)(state)["test"] == ph["tracked"][1]["test"]
    # rebuilding a tracked width gives that EMA: the same scores
    r10 = next(r for r in ph["rebuilt"] if r["sigma_rel"] == 0.1)
    assert r10["residual"] < 1e-6 and r10["test"] == ph["tracked"][1]["test"]
    best = max(r["validation"] for r in ph["rebuilt"] + ph["tracked"])
    assert ph["chosen"]["validation"] == best
    summary = summarise([rep, rep])
    labels = [r["label"] for r in summary["rows"]]
    assert "post-hoc EMA, sigma_rel chosen on validation" in labels and "tracked EMA sigma_rel=0.05 (end of run)" in labels
    assert summary["versus_final"]["post-hoc EMA"]["chosen_sigma_test"]["tie"] + \
        summary["versus_final"]["post-hoc EMA"]["chosen_sigma_test"]["better"] + \
        summary["versus_final"]["post-hoc EMA"]["chosen_sigma_test"]["worse"] == 2
    if framework == "torch":  # a second run into the same folder replaces the snapshots (no mixed runs)
        assert run_repetition(config, seed=2, directory=tmp_path / "ckpt")["posthoc"]["snapshots"] == 40
