"""Sweep reports (table, JSON, CSV, figures) and the `polyak sweep` command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import polyak

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def results() -> polyak.SweepResults:
    members = [{"w": np.array([float(i), 1.0], np.float32)} for i in range(6)]

    def evaluate(s):
        return {"validation": {"acc": 1 - abs(s["w"][0] - 3.5) / 10}, "test": {"acc": 1 - abs(s["w"][0] - 3) / 10}}

    return polyak.sweep(members, evaluate, alphas=(0.5, 2.0, 8.0), predict=lambda s: np.array([s["w"][0]]),
                        score=lambda p: {"validation": {"acc": 1 - abs(p[0] - 3.5) / 10},
                                         "test": {"acc": 1 - abs(p[0] - 3) / 10}})


def test_table_marks_the_best_of_each_column() -> None:
    text = polyak.SweepResults.table(results(), "acc", "validation", color=False)
    lines = text.splitlines()
    assert lines[1].split() == ["n", "single", "equal", "linear", "exponential(alpha=0.5)",
                                "exponential(alpha=2)", "exponential(alpha=8)", "prediction_ensemble"]
    assert len(lines) == 2 + 6
    assert all(sum(c.endswith("*") for c in line.split()) >= 0 for line in lines[2:])
    singles = [line.split()[1] for line in lines[2:]]
    assert singles.count("0.9500*") == 2  # members 3 and 4 (n = 3, 2) tie for best
    bold = polyak.SweepResults.table(results(), "acc", "validation", color=True)
    assert "\033[1m" in bold


def test_figures_are_png(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    res = results()
    for path in (res.plot(tmp_path / "sweep.png", "acc", "validation"),
                 res.plot_alphas(tmp_path / "alphas.png", "acc", "test")):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_json_round_trip(tmp_path) -> None:
    res = results()
    res.to_json(tmp_path / "r.json")
    back = polyak.SweepResults.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert back.rows == res.rows


EVAL_MODULE = textwrap.dedent('''
    import numpy as np

    def make_evaluate():          # a factory: no required arguments, called once
        target = np.array([2.0, 1.0], np.float32)

        def evaluate(state):
            d = float(np.abs(state["w"] - target).sum())
            return {"validation": {"acc": 1 - d / 10, "loss": d}, "test": {"acc": 1 - d / 9, "loss": d}}
        return evaluate

    def predict(state):           # a plain function: one required argument
        return np.array([state["w"][0]])

    def score(p):
        d = abs(float(p[0]) - 2.0)
        return {"validation": {"acc": 1 - d / 10, "loss": d}, "test": {"acc": 1 - d / 9, "loss": d}}
''')


def run_cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = os.environ.copy()
    # The subprocess runs in tmp_path: put this polyak first by absolute path.
    src = str(Path(polyak.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", "polyak", "sweep", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    (tmp_path / "evalmod.py").write_text(EVAL_MODULE)
    for i in range(5):
        polyak.save({"w": np.array([float(i), 1.0], np.float32), "step": np.array([i])},
                    tmp_path / f"epoch_{i}.safetensors")
    ckpts = [f"epoch_{i}.safetensors" for i in range(5)]
    proc = run_cli(*ckpts, "--eval", "evalmod.py:make_evaluate", "--predict", "evalmod:predict",
                   "--score", "evalmod:score", "--alphas", "1,4", "--out", "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "validation acc" in proc.stdout and "test acc" in proc.stdout
    assert "chose " in proc.stdout
    for name in ("results.json", "results.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    for name in ("sweep.png", "alphas.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG_MAGIC)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["selection"]["on"] == "validation" and data["selection"]["report"] == "test"
    assert {r["kind"] for r in data["rows"]} == {"average", "single", "prediction_ensemble"}
    assert data["diagnostics"]["members"][-1].endswith("epoch_4.safetensors")
    # The same files again need --force; --metric loss picks min automatically.
    again = run_cli(*ckpts, "--eval", "evalmod:make_evaluate", "--out", "out", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    loss = run_cli(*ckpts, "--eval", "evalmod:make_evaluate", "--metric", "loss", "--last", "3",
                   "--schemes", "equal", "--quiet", "--out", "out", "--force", "--no-plots", cwd=tmp_path)
    assert loss.returncode == 0, loss.stderr
    sel = json.loads((tmp_path / "out" / "results.json").read_text())["selection"]
    assert sel["mode"] == "min" and sel["metric"] == "loss"


def test_cli_user_errors_exit_2(tmp_path) -> None:
    (tmp_path / "evalmod.py").write_text(EVAL_MODULE)
    polyak.save({"w": np.zeros(2, np.float32)}, tmp_path / "a_1.safetensors")
    for spec, message in (("evalmod", "MODULE:FUNCTION"), ("evalmod:nothing", "has no 'nothing'"),
                          ("missing_mod_xyz:f", "importing missing_mod_xyz failed"),
                          ("nofile.py:f", "no such file")):
        proc = run_cli("a_1.safetensors", "--eval", spec, cwd=tmp_path)
        assert proc.returncode == 2, (spec, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_last_is_checked_by_the_library(tmp_path, capsys, monkeypatch) -> None:
    from polyak.cli import main

    (tmp_path / "evalmod_last.py").write_text(EVAL_MODULE)
    polyak.save({"w": np.zeros(2, np.float32)}, tmp_path / "a_1.safetensors")
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", "a_1.safetensors", "--eval", "evalmod_last.py:make_evaluate", "--last", "0",
                 "--out", "out", "--quiet"])
    assert code == 2
    assert capsys.readouterr().err == "polyak: error: last must be a whole number ≥ 1, got 0\n"
    assert not (tmp_path / "out").exists()  # nothing created before the error
