"""Members are ordered by the numbers in the part of their paths that differs; ambiguity is an error
only when the result depends on the order."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import polyak
from polyak import ConfigError
from polyak._engine.members import member_names, select_members
from polyak.cli import main as cli_main


def _save(path: Path, value: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    polyak.save({"w": np.full(3, value, np.float32)}, path)
    return path


def _trainer_layout(root: Path, steps: list[int]) -> dict[int, Path]:
    """``root/checkpoint-N/model.safetensors`` holding the value N, as a Trainer names them."""
    return {n: _save(root / f"checkpoint-{n}" / "model.safetensors", float(n)) for n in steps}


def test_order_comes_from_the_folder_that_differs(tmp_path: Path) -> None:
    paths = _trainer_layout(tmp_path / "out", [5, 10, 15, 20, 25, 30, 35, 40])
    given = sorted(str(p) for p in paths.values())  # what a shell glob gives: string order
    assert [Path(p).parent.name for p in given][:3] == ["checkpoint-10", "checkpoint-15", "checkpoint-20"]
    assert polyak.order_members(given) == [paths[n] for n in (5, 10, 15, 20, 25, 30, 35, 40)]
    # --last 3 is checkpoints 30, 35, 40 (polyak 0.1 took 35, 40 and 5), and linear weights
    # give the newest the most: numpy.average with weights 1, 2, 3.
    got = polyak.average(given, last=3, scheme="linear")["w"]
    np.testing.assert_allclose(got, np.average([30.0, 35.0, 40.0], weights=[1, 2, 3]), rtol=1e-6)
    assert polyak.average(given, last=3)["w"].tolist() == [35.0] * 3


def test_order_at_any_depth_and_numbers_in_several_parts(tmp_path: Path) -> None:
    # The differing part spans two levels; the numbers of both order the members.
    layout = {(2, 100): 3.0, (1, 900): 1.0, (1, 1000): 2.0, (10, 50): 4.0}
    paths = {k: _save(tmp_path / f"run_v{k[0]}" / f"step_{k[1]}" / "weights.safetensors", v) for k, v in layout.items()}
    ordered = polyak.order_members(list(paths.values())[::-1])
    assert [paths[k] for k in sorted(layout)] == ordered
    # The common folders and the common file name are not part of the names.
    assert member_names(ordered) == [
        "run_v1/step_900/weights.safetensors", "run_v1/step_1000/weights.safetensors",
        "run_v2/step_100/weights.safetensors", "run_v10/step_50/weights.safetensors",
    ]
    # numbers in the common part (v2 in both) do not disturb the order
    p = [_save(tmp_path / "v2" / f"e{n}" / "m.safetensors", float(n)) for n in (12, 3, 7)]
    assert polyak.order_members(p) == [p[1], p[2], p[0]]


def test_names_in_metadata_and_result(tmp_path: Path) -> None:
    paths = _trainer_layout(tmp_path / "out", [5, 10, 40])
    res = polyak.average(list(paths.values()), out=tmp_path / "avg.safetensors", scheme="linear")
    assert res.names == ["checkpoint-5/model.safetensors", "checkpoint-10/model.safetensors",
                         "checkpoint-40/model.safetensors"]
    rec = json.loads(polyak.inspect(tmp_path / "avg.safetensors").metadata["polyak"])
    assert [m["file"] for m in rec["members"]] == res.names
    assert res.members == [str(paths[n]) for n in (5, 10, 40)]  # full paths, as before
    # a lone member is named by its last component
    assert member_names([paths[5]]) == ["model.safetensors"]


def test_two_runs_are_refused_when_the_weights_differ(tmp_path: Path) -> None:
    a = _save(tmp_path / "runA" / "model.safetensors", 1.0)
    b = _save(tmp_path / "runB" / "model.safetensors", 3.0)
    with pytest.raises(ConfigError, match=r"runA/model\.safetensors, runB/model\.safetensors have no numbers.*"
                                          r"the scheme weights them differently.*--order mtime\|name\|given"):
        polyak.average([a, b], scheme="linear")
    with pytest.raises(ConfigError, match=r"last=1 keeps only the newest 1.*--order"):
        polyak.average([a, b], last=1)
    with pytest.raises(ConfigError, match="weights them differently"):
        polyak.average([a, b], weights=[1, 2])
    # Equal weights over all members need no order; the user's order settles the rest.
    assert polyak.average([b, a])["w"].tolist() == [2.0] * 3
    np.testing.assert_allclose(polyak.average([b, a], scheme="linear", order="given")["w"], 1 / 3 * 3 + 2 / 3 * 1)
    np.testing.assert_allclose(polyak.average([b, a], scheme="linear", order="name")["w"], 1 / 3 * 1 + 2 / 3 * 3)
    assert polyak.average([a, b], weights=[1, 1])["w"].tolist() == [2.0] * 3  # custom but equal


def test_same_numbers_tie_and_the_message_says_so(tmp_path: Path) -> None:
    paths = [_save(tmp_path / f"{run}_epoch_{e}.safetensors", float(e)) for run in ("ema", "raw") for e in (3, 4)]
    with pytest.raises(ConfigError, match=r"ema_epoch_4\.safetensors, raw_epoch_4\.safetensors carry the same numbers \(4\)"):
        polyak.average(paths, scheme="exponential")
    # A tie at the old end that last= drops whatever the order is no problem ...
    tied_old = [_save(tmp_path / "x" / n, v) for n, v in (("a_1.safetensors", 1.0), ("b_1.safetensors", 2.0),
                                                          ("c_2.safetensors", 5.0), ("c_3.safetensors", 7.0))]
    assert polyak.average(tied_old, last=2, scheme="linear")["w"].tolist() == pytest.approx([19 / 3] * 3)
    # ... nor is a tie whose members get equal weights; one that straddles the cut is.
    got = polyak.average(tied_old, weights=[1, 1, 2, 3])["w"]
    np.testing.assert_allclose(got, (1 * 1 + 1 * 2 + 2 * 5 + 3 * 7) / 7, rtol=1e-6)
    with pytest.raises(ConfigError, match="a_1.safetensors, b_1.safetensors carry the same numbers.*last=3"):
        polyak.average(tied_old, last=3)


def test_members_without_numbers_among_numbered_ones(tmp_path: Path) -> None:
    paths = [_save(tmp_path / n, v) for n, v in (("ckpt_1.safetensors", 1.0), ("ckpt_2.safetensors", 2.0),
                                                  ("ckpt_final.safetensors", 9.0))]
    with pytest.raises(ConfigError, match=r"ckpt_final\.safetensors has no number to place it among ckpt_1\.safetensors, ckpt_2\.safetensors"):
        polyak.average(paths, scheme="linear")
    assert polyak.average(paths)["w"].tolist() == [4.0] * 3


def test_sweep_and_select_use_the_same_order(tmp_path: Path) -> None:
    paths = _trainer_layout(tmp_path / "out", [5, 10, 40])
    res = polyak.sweep(sorted(map(str, paths.values())), lambda s: {"w": float(s["w"][0])}, schemes=["equal"])
    assert [r.member for r in res.select_rows(kind="single")] == [str(paths[n]) for n in (40, 10, 5)]
    assert [r.value("w", "eval") for r in res.select_rows(kind="average")] == [40.0, 25.0, pytest.approx(55 / 3)]
    runs = [_save(tmp_path / r / "model.safetensors", v) for r, v in (("runA", 1.0), ("runB", 2.0))]
    with pytest.raises(ConfigError, match="runA/model.safetensors, runB/model.safetensors.*a sweep compares"):
        polyak.sweep(runs, lambda s: {"w": float(s["w"][0])})
    # a soup averages its members with equal weights: no order needed
    soup = polyak.greedy_soup(runs, lambda s: {"validation": {"acc": -abs(float(s["w"][0]) - 1.5)}}, "acc")
    assert sorted(soup.members) == sorted(map(str, runs)) and soup.state["w"].tolist() == [1.5] * 3
    assert polyak.diagnose(runs, warn=False).members == [str(r) for r in runs]


def test_mtime_of_a_folder_is_its_newest_file(tmp_path: Path) -> None:
    old, new = tmp_path / "runB", tmp_path / "runA"
    _save(old / "model.safetensors", 1.0)
    _save(new / "model.safetensors", 3.0)
    os.utime(old / "model.safetensors", (1_000_000, 1_000_000))
    os.utime(new / "model.safetensors", (2_000_000, 2_000_000))
    os.utime(old, (3_000_000, 3_000_000))  # the folder itself looks newer: not what counts
    assert select_members([new, old], order="mtime", weights=[1, 2]) == [old, new]
    np.testing.assert_allclose(polyak.average([new, old], order="mtime", scheme="linear")["w"], 1 / 3 + 2 / 3 * 3)


def test_cli_refuses_with_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _save(tmp_path / "runA" / "model.safetensors", 1.0)
    b = _save(tmp_path / "runB" / "model.safetensors", 3.0)
    out = tmp_path / "avg.safetensors"
    assert cli_main(["average", str(a), str(b), "-o", str(out), "--scheme", "linear"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runA" in err and "runB" in err and "--order mtime|name|given" in err
    assert not out.exists()
    assert cli_main(["average", str(a), str(b), "-o", str(out), "--scheme", "linear", "--order", "given"]) == 0
    printed = capsys.readouterr().out
    assert "oldest → newest: runA/model.safetensors (0.3333), runB/model.safetensors (0.6667)" in printed
    assert polyak.average([out])["w"].tolist() == pytest.approx([7 / 3] * 3)


def test_a_member_given_twice_is_refused_before_ordering(tmp_path: Path) -> None:
    a = _save(tmp_path / "ckpt_1.safetensors", 1.0)
    with pytest.raises(ConfigError, match="given twice"):
        polyak.average([a, tmp_path / "." / "ckpt_1.safetensors"], scheme="linear")
