"""Selection on validation data, greedy soups, diagnostics."""

from __future__ import annotations

import numpy as np
import pytest

import polyak
from polyak import SweepResults, SweepRow


def table_results() -> SweepResults:
    # validation is best at n=3 (linear); test is best at n=5: the test score of n=3 is
    # what must be reported.
    val = {1: 0.70, 2: 0.74, 3: 0.80, 4: 0.78, 5: 0.75}
    test = {1: 0.69, 2: 0.73, 3: 0.76, 4: 0.77, 5: 0.79}
    rows = [SweepRow("single", n, {"validation": {"acc": 0.7}, "test": {"acc": 0.68 if n == 1 else 0.6}},
                     member=f"m{n}") for n in range(1, 6)]
    for scheme, shift in (("equal", -0.01), ("linear", 0.0)):
        rows += [SweepRow("average", n, {"validation": {"acc": val[n] + shift, "loss": 1 - val[n] - shift},
                                         "test": {"acc": test[n] + shift, "loss": 1 - test[n]}}, scheme=scheme)
                 for n in range(1, 6)]
    return SweepResults(rows, [f"m{i}" for i in range(5, 0, -1)], schemes=("equal", "linear"))


def test_select_chooses_on_validation_and_reports_test_of_that_choice() -> None:
    sel = polyak.select(table_results(), "acc")
    assert (sel.scheme, sel.n, sel.alpha) == ("linear", 3, None)
    assert sel.selected == pytest.approx(0.80)
    assert sel.reported == pytest.approx(0.76)  # not the test optimum 0.79
    assert sel.last_checkpoint == pytest.approx(0.68)
    assert "linear, n=3" in str(sel)


def test_select_min_mode_and_kinds() -> None:
    sel = polyak.select(table_results(), "loss", mode="min")
    assert (sel.scheme, sel.n) == ("linear", 3)
    with pytest.raises(polyak.ConfigError, match="mode"):
        polyak.select(table_results(), "acc", mode="best")
    assert polyak.select(table_results(), "acc", kinds=("single",)).row.kind == "single"


def test_select_warns_when_choosing_and_reporting_on_the_same_split() -> None:
    with pytest.warns(polyak.SelectionBiasWarning, match="same data"):
        sel = polyak.select(table_results(), "acc", on="test", report="test")
    assert sel.n == 5


def test_select_names_what_exists() -> None:
    res = polyak.sweep([{"w": np.ones(2)}], lambda s: {"acc": 1.0})
    with pytest.raises(polyak.ConfigError, match=r"no split 'validation'.*\['eval'\]"):
        polyak.select(res, "acc")
    with pytest.raises(polyak.ConfigError, match="no metric 'f1'"):
        polyak.select(table_results(), "f1")
    assert polyak.select(res, "acc", on="eval", report=None).n == 1


def soup_case():
    target = np.array([1.0, 1.0, 0.0], np.float32)
    members = [
        {"w": np.array([0.0, 3.0, 0.0], np.float32), "step": np.array([0])},   # far: hurts
        {"w": np.array([1.2, 0.9, 0.0], np.float32), "step": np.array([1])},   # best alone
        {"w": np.array([0.9, 1.1, 0.1], np.float32), "step": np.array([2])},   # helps
        {"w": np.array([0.7, 1.3, -0.2], np.float32), "step": np.array([3])},  # helps a bit?
    ]

    def evaluate(state):
        err = float(np.sum((state["w"].astype(np.float64) - target) ** 2))
        return {"validation": {"score": -err}, "test": {"score": -2 * err}}

    return members, evaluate, target


def greedy_by_definition(members, target) -> tuple[list[int], float]:
    """Wortsman et al.'s greedy soup written out: members by their own score, best first;
    each is kept when the uniform average with it scores better than without."""
    scores = [-float(np.sum((m["w"].astype(np.float64) - target) ** 2)) for m in members]
    order = sorted(range(len(members)), key=lambda i: -scores[i])
    kept = [order[0]]
    best = scores[order[0]]
    for i in order[1:]:
        w = np.mean([members[j]["w"].astype(np.float64) for j in [*kept, i]], axis=0)
        s = -float(np.sum((w - target) ** 2))
        if s > best:
            kept, best = [*kept, i], s
    return kept, best


def test_greedy_soup_skips_a_member_that_hurts() -> None:
    members, evaluate, target = soup_case()
    soup = polyak.greedy_soup(members, evaluate, "score")
    scores = [-float(np.sum((m["w"] - target) ** 2)) for m in members]
    assert soup.individual == pytest.approx(scores)
    assert soup.indices[0] == int(np.argmax(scores))
    assert 0 not in soup.indices  # adding the far member makes the soup worse
    kept, best = greedy_by_definition(members, target)
    assert soup.indices == kept
    assert soup.score == pytest.approx(best, abs=1e-6)  # float32 weights
    np.testing.assert_allclose(soup.state["w"], np.mean([members[j]["w"] for j in kept], axis=0), rtol=1e-6)
    assert soup.state["step"].tolist() == [max(kept)]
    assert soup.metrics["test"]["score"] == pytest.approx(2 * best, abs=2e-6)
    assert [h[2] for h in soup.history].count(True) == len(kept)


def test_greedy_soup_reuses_sweep_singles() -> None:
    members, evaluate, target = soup_case()
    calls = []

    def counted(state):
        calls.append(1)
        return evaluate(state)

    res = polyak.sweep(members, evaluate, schemes=["equal"])
    soup = polyak.greedy_soup(members, counted, "score", results=res)
    assert len(calls) == 4  # only the four candidate soups, no single re-evaluations
    kept, best = greedy_by_definition(members, target)
    assert soup.indices == kept and soup.score == pytest.approx(best, abs=1e-6)


def basin(n: int, seed: int, noise: float = 0.01) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=4000).astype(np.float32)
    return [{"w": centre + noise * rng.normal(size=4000).astype(np.float32), "n": np.array([i])} for i in range(n)]


def test_diagnose_accepts_one_basin() -> None:
    d = polyak.diagnose(basin(5, 0))
    assert d.ok and max(d.distance) < 0.05
    assert min(min(row) for row in d.cosine) > 0.99


def test_diagnose_flags_a_member_from_another_run() -> None:
    members = basin(4, 0) + basin(1, 1)  # the newest comes from a different init
    with pytest.warns(polyak.AveragingWarning, match="they look like different runs") as record:
        d = polyak.diagnose(members)
    assert not d.ok
    assert any("cosine" in str(r.message) for r in record)
    assert any("1 member(s) lie farther" in str(r.message) and "member 4 (" in str(r.message) for r in record)
    assert int(np.argmax(d.distance)) == 4
    # Numbers against a direct computation.
    x = np.stack([m["w"].astype(np.float64) for m in members])
    mean = x.mean(axis=0)
    want = np.linalg.norm(x - mean, axis=1) / np.linalg.norm(mean)
    np.testing.assert_allclose(d.distance, want, rtol=1e-9)
    cos = (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    np.testing.assert_allclose(d.cosine, cos, rtol=1e-9)


def test_check_results_flags_an_average_far_below_its_members() -> None:
    members = basin(2, 0) + basin(2, 1)
    target = members[-1]["w"]

    def evaluate(state):  # accuracy-like: high near the newest member, falls off fast
        return {"acc": float(np.exp(-np.linalg.norm(state["w"] - target) / 10))}

    res = polyak.sweep(members, evaluate, schemes=["equal"])
    found = polyak.check_results(res, "acc")
    assert found and ("newest 3 members" in found[0] or "newest 4 members" in found[0])
    with pytest.warns(polyak.AveragingWarning, match="different runs") as record:
        polyak.diagnose(members, results=res, metric="acc")
    assert set(found) <= {str(r.message) for r in record}
    ok = polyak.sweep(basin(4, 2), lambda s: {"acc": 0.9}, schemes=["equal"])
    assert polyak.check_results(ok, "acc") == []


def test_select_infers_metric_direction_and_splits_for_every_caller() -> None:
    # The first metric returned is "acc" (max); "loss" reads lower-is-better (min).
    sel = polyak.select(table_results())
    assert (sel.metric, sel.mode, sel.on, sel.report, sel.n) == ("acc", "max", "validation", "test", 3)
    loss = polyak.select(table_results(), "loss")
    assert loss.mode == "min" and (loss.scheme, loss.n) == ("linear", 3)
    assert polyak.select(table_results(), "loss", mode="max").n == 1  # an explicit mode wins
    # "auto" splits: validation/test when there, else the one split and no report.
    assert (sel.on, sel.report) == (polyak.select(table_results(), on="auto", report="auto").on, "test")
    only = polyak.sweep([{"w": np.ones(2)}, {"w": np.zeros(2)}], lambda s: {"val_loss": float(s["w"][0])},
                        schemes=["equal"])
    auto = polyak.select(only, on="auto", report="auto")
    assert (auto.metric, auto.mode, auto.on, auto.report) == ("val_loss", "min", "eval", None)
    assert (auto.n, auto.selected) == (1, 0.0)
    on_test = polyak.select(table_results(), on="test", report="auto")
    assert on_test.report is None and on_test.n == 5


def big_members(n: int, size: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    centre = rng.normal(size=size).astype(np.float32)
    return [{"small": rng.normal(size=3).astype(np.float32),
             "big": centre + 0.01 * rng.normal(size=size).astype(np.float32),
             "step": np.array([i])} for i in range(n)]


def test_greedy_soup_refuses_a_member_with_nan_naming_it(tmp_path) -> None:
    # The NaN sits in the middle of a tensor that spans several chunks (in the second),
    # of a member in the middle of the list.
    from polyak._engine.kernel import CHUNK

    members = big_members(5, 3 * CHUNK)
    members[2]["big"][CHUNK + 123] = np.nan
    paths = []
    for i, m in enumerate(members):
        polyak.save(m, tmp_path / f"soup_{i}.safetensors")
        paths.append(tmp_path / f"soup_{i}.safetensors")

    def evaluate(state):
        return {"validation": {"score": -float(np.abs(state["big"][:10]).sum())}}

    with pytest.raises(polyak.NonFiniteError, match=r'soup_2\.safetensors: tensor "big" has NaN or Inf'):
        polyak.greedy_soup(paths, evaluate, "score")


def test_diagnose_refuses_a_member_with_inf_naming_it() -> None:
    from polyak._engine.kernel import CHUNK

    members = big_members(5, 2 * CHUNK + 5)
    members[3]["big"][CHUNK + 7] = np.inf
    with pytest.raises(polyak.NonFiniteError, match=r'member 3: tensor "big" has NaN or Inf'):
        polyak.diagnose(members, warn=False)


def test_sweep_refuses_nan_past_the_first_chunk() -> None:
    from polyak._engine.kernel import CHUNK

    members = big_members(4, 2 * CHUNK)
    for m in members:
        m["big"] = m["big"].astype(np.float16)
    members[1]["big"][CHUNK + 99] = np.nan
    with pytest.raises(polyak.NonFiniteError, match=r'member 1: tensor "big" has NaN or Inf'):
        polyak.sweep(members, lambda s: {"x": 0.0}, schemes=["linear"])
