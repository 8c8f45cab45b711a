"""Sweeps: running sums against polyak.average, one read per member, baselines, metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import ClassVar

import ml_dtypes
import numpy as np
import pytest

import polyak
from _helpers import tutorial_weights
from polyak._choose.metrics import normalize_metrics
from polyak.formats import TensorInfo, TensorSource
from polyak.formats._memory import MappingSource


def make_members(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    members = []
    for i in range(n):
        members.append({
            "w32": rng.normal(size=(7, 5)).astype(np.float32),
            "w64": rng.normal(size=(3,)).astype(np.float64),
            "w16": rng.normal(size=(70_000,)).astype(np.float16),  # spans two chunks
            "wbf": rng.normal(size=(4, 4)).astype(ml_dtypes.bfloat16),
            "steps": np.array([100 * i], np.int64),
        })
    return members


def capture() -> tuple[list[dict[str, np.ndarray]], object]:
    seen: list[dict[str, np.ndarray]] = []

    def evaluate(state: Mapping[str, np.ndarray]) -> dict[str, float]:
        seen.append({k: np.array(v, copy=True) for k, v in state.items()})
        return {"w0": float(np.asarray(state["w32"], np.float64).flat[0])}

    return seen, evaluate


def _ulp_tol(dtype: np.dtype, ref: np.ndarray) -> float:
    eps = float(ml_dtypes.finfo(dtype).eps) if dtype == np.dtype(ml_dtypes.bfloat16) else float(np.finfo(dtype).eps)
    scale = float(np.max(np.abs(ref.astype(np.float64)))) if ref.size else 1.0
    # float32/float64 sums differ from polyak.average's only by rounding order; narrow
    # dtypes may round the same float32 value to the neighbouring representable number.
    return {4: 16, 8: 16}.get(np.dtype(dtype).itemsize, 1) * eps * scale


def test_every_average_equals_polyak_average() -> None:
    members = make_members(9)
    seen, evaluate = capture()
    res = polyak.sweep(members, evaluate, alphas=(0.5, 2.0, 7.0), baselines=())
    assert len(res.rows) == 9 * 5
    for row, state in zip(res.rows, seen, strict=True):
        ref = polyak.average(members, scheme=row.scheme, alpha=row.alpha or 2.0, last=row.n)
        assert list(state) == list(ref)
        for name, want in ref.items():
            got = state[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            if want.dtype.kind in "iub":
                np.testing.assert_array_equal(got, members[-1][name])
            else:
                tol = _ulp_tol(want.dtype, want)
                diff = np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))
                assert diff <= tol, (row.name, row.n, name, diff, tol)


def test_closed_forms_in_float64() -> None:
    # x_j = j-th member's value; closed forms for the newest n of 0, 1, ..., 5 (5 newest).
    members = [{"w": np.array([float(i)])} for i in range(6)]
    res = polyak.sweep(members, lambda s: {"w": float(s["w"][0])}, alphas=(1.5,), baselines=())
    for row in res.rows:
        vals = np.arange(6 - row.n, 6, dtype=np.float64)
        w = tutorial_weights(row.scheme, row.n, row.alpha or 2.0)
        assert row.value("w", "eval") == pytest.approx(float(np.average(vals, weights=w)), rel=1e-13)


def test_singles_are_the_members_with_their_own_integers() -> None:
    members = make_members(4)
    seen, evaluate = capture()
    res = polyak.sweep(members, evaluate, schemes=["equal"], baselines=("single",))
    singles = [(r, s) for r, s in zip(res.rows, seen, strict=True) if r.kind == "single"]
    assert [r.n for r, _ in singles] == [1, 2, 3, 4]
    for row, state in singles:
        member = members[4 - row.n]
        assert row.member == f"member {4 - row.n}"
        for name, value in member.items():
            np.testing.assert_array_equal(state[name], value)
            assert state[name].dtype == value.dtype


class CountingSource(TensorSource):
    reads: ClassVar[Counter[tuple[str, str]]] = Counter()

    def __init__(self, state: dict[str, np.ndarray], label: str) -> None:
        super().__init__(None, label)
        self.inner = MappingSource(state, label)

    def infos(self) -> Mapping[str, TensorInfo]:
        return self.inner.infos()

    def read(self, name: str) -> np.ndarray:
        CountingSource.reads[(self.label, name)] += 1
        return self.inner.read(name)


def test_each_member_is_read_once() -> None:
    CountingSource.reads.clear()
    members = make_members(6)
    sources = [CountingSource(m, f"m{i}") for i, m in enumerate(members)]
    polyak.sweep(sources, lambda s: {"x": 0.0}, alphas=(1.0, 3.0), predict=lambda s: np.ones(3),
                 score=lambda p: {"x": float(p.sum())})
    assert set(CountingSource.reads.values()) == {1}
    assert len(CountingSource.reads) == 6 * 5


def test_subset_of_n_reads_only_what_it_needs() -> None:
    CountingSource.reads.clear()
    sources = [CountingSource(m, f"m{i}") for i, m in enumerate(make_members(6))]
    res = polyak.sweep(sources, lambda s: {"x": 0.0}, n=[1, 3], baselines=())
    assert sorted({r.n for r in res.rows}) == [1, 3]
    assert {label for label, _ in CountingSource.reads} == {"m3", "m4", "m5"}


def test_prediction_ensemble_is_the_mean_of_member_predictions() -> None:
    members = [{"w": np.array([float(i), 1.0], np.float32)} for i in range(5)]

    def predict(state):  # "probabilities" that depend on the weights
        return {"validation": np.array([state["w"][0], 10.0]), "test": np.array([2 * state["w"][0]])}

    def score(p):
        return {"validation": {"m": float(p["validation"][0])}, "test": {"m": float(p["test"][0])}}

    res = polyak.sweep(members, lambda s: score(predict(s)), schemes=["equal"], predict=predict, score=score)
    ens = res.select_rows(kind="prediction_ensemble")
    assert [r.n for r in ens] == [1, 2, 3, 4, 5]
    for r in ens:
        newest = np.arange(5 - r.n, 5, dtype=np.float64)
        assert r.value("m", "validation") == pytest.approx(newest.mean())
        assert r.value("m", "test") == pytest.approx(2 * newest.mean())


def test_evaluator_object_with_predict_and_score_gives_the_ensemble() -> None:
    class Evaluator:
        def __call__(self, state):
            return {"m": float(state["w"][0])}

        def predict(self, state):
            return np.array([state["w"][0]])

        def score(self, p):
            return {"m": float(p[0])}

    res = polyak.sweep([{"w": np.array([float(i)])} for i in range(3)], Evaluator(), schemes=["linear"])
    assert [r.value("m", "eval") for r in res.select_rows(kind="prediction_ensemble")] == [2.0, 1.5, 1.0]


def test_metric_conventions() -> None:
    assert normalize_metrics({"acc": np.float32(0.5)}) == {"eval": {"acc": 0.5}}
    assert normalize_metrics({"validation": {"acc": 1}, "test": {"acc": 0}}) == {
        "validation": {"acc": 1.0}, "test": {"acc": 0.0}}
    with pytest.raises(polyak.ConfigError, match="mix"):
        normalize_metrics({"validation": {"acc": 1}, "loss": 0.3})
    with pytest.raises(polyak.ConfigError, match="numbers"):
        normalize_metrics({"acc": "high"})
    with pytest.raises(polyak.ConfigError, match="non-empty dict"):
        normalize_metrics(0.5)


def test_option_errors() -> None:
    ms = make_members(3)
    with pytest.raises(polyak.SchemeError, match="sweepable"):
        polyak.sweep(ms, lambda s: {"x": 0}, schemes=["custom"])
    with pytest.raises(polyak.SchemeError, match="alpha"):
        polyak.sweep(ms, lambda s: {"x": 0}, alphas=(0.0,))
    with pytest.raises(polyak.ConfigError, match="baseline"):
        polyak.sweep(ms, lambda s: {"x": 0}, baselines=("oracle",))
    with pytest.raises(polyak.ConfigError, match="from 1 to 3"):
        polyak.sweep(ms, lambda s: {"x": 0}, n=[4])
    with pytest.raises(polyak.ConfigError, match="score="):
        polyak.sweep(ms, lambda s: {"x": 0}, predict=lambda s: np.zeros(2))


def test_nan_member_is_refused() -> None:
    ms = make_members(3)
    ms[0]["w32"][2, 2] = np.nan
    with pytest.raises(polyak.NonFiniteError, match=r"member 0.*w32"):
        polyak.sweep(ms, lambda s: {"x": 0.0})


def test_results_round_trip(tmp_path) -> None:
    res = polyak.sweep(make_members(3), lambda s: {"validation": {"a": 1.0}, "test": {"a": 2.0}})
    back = polyak.SweepResults.from_dict(res.to_dict())
    assert back.rows == res.rows and back.members == res.members
    assert res.splits == ["validation", "test"] and res.metric_names() == ["a"]
    res.to_json(tmp_path / "r.json")
    res.to_csv(tmp_path / "r.csv")
    header = (tmp_path / "r.csv").read_text().splitlines()[0]
    assert header == "kind,scheme,alpha,n,member,seconds,validation/a,test/a"
    assert "*" in res.table("a", "test", color=False)


def test_safetensors_members_on_disk(tmp_path) -> None:
    members = make_members(4)
    paths = []
    for i, m in enumerate(members):
        polyak.save(m, tmp_path / f"ckpt_{i}.safetensors")
        paths.append(tmp_path / f"ckpt_{i}.safetensors")
    seen, evaluate = capture()
    res = polyak.sweep(list(reversed(paths)), evaluate, schemes=["linear"], baselines=())
    assert res.members == [str(p) for p in paths]  # ordered by the number in the name
    want = polyak.average(paths, scheme="linear")
    np.testing.assert_allclose(seen[-1]["w32"], want["w32"], rtol=1e-6, atol=1e-6)
