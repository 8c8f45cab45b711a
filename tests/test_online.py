"""The framework-free online-averaging core: cadence, weights, dtypes, the state layout.

References are written out here (brute-force step rules, numpy weighted means, the EMA
recursion in float64), never taken from polyak.
"""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import pytest

from polyak import ConfigError, FormatError, MismatchError, make_schedule
from polyak._online import (
    FIELDS,
    AveragerState,
    Cadence,
    EMAWeights,
    OnlineAverage,
    SWAWeights,
    accumulator_dtype_name,
    check_saved_tensors,
    next_update,
    read_record,
    weights_from_config,
)


class NumpyOps:
    """A minimal AveragerOps over float64 numpy arrays (functional, like a JAX backend)."""

    def init(self, live, averaged):  # type: ignore[no-untyped-def]
        return [np.array(x, dtype=np.float64) for x in live]

    def update(self, averages, live, weight, averaged):  # type: ignore[no-untyped-def]
        return [a + (np.asarray(c) - a) * weight if f else np.array(c, dtype=np.float64)
                for a, c, f in zip(averages, live, averaged, strict=True)]

    def assign(self, live, values):  # type: ignore[no-untyped-def]
        for dst, src in zip(live, values, strict=True):
            dst[...] = src

    def backup(self, live, into=None):  # type: ignore[no-untyped-def]
        return [np.array(x) for x in live]

    def to_numpy(self, value):  # type: ignore[no-untyped-def]
        return value

    def from_numpy(self, array, like):  # type: ignore[no-untyped-def]
        return np.array(array, dtype=like.dtype)


def _actions(cadence: Cadence, steps: list[int | None]) -> list[str]:
    state: AveragerState[object] = AveragerState()
    out = []
    for step in steps:
        u = next_update(state, cadence, SWAWeights(), step=step)
        out.append("skip" if u.weight is None else "follow" if u.count == state.count else "avg")
        state.step, state.count = u.step, u.count
    return out


@pytest.mark.parametrize(("start", "every"), [(0, 1), (0, 2), (3, 2), (5, 3), (1, 4)])
def test_cadence_one_step_at_a_time_is_the_torch_rule(start: int, every: int) -> None:
    # The rule documented for polyak.torch.EMA: before start copy; from start on, average
    # the steps with (step − start) % every == 0, skip the others.
    expected = ["follow" if s < start else "avg" if (s - start) % every == 0 else "skip" for s in range(1, 30)]
    assert _actions(Cadence(start, every), [None] * 29) == expected
    assert _actions(Cadence(start, every), list(range(1, 30))) == expected


@pytest.mark.parametrize(("start", "every", "stride"), [(2, 3, 2), (4, 4, 3), (0, 5, 7), (1, 2, 2)])
def test_cadence_jumping_steps_stand_in_for_the_steps_they_pass(start: int, every: int, stride: int) -> None:
    # Steps seen only every `stride` (steps_per_execution), with a short last execution
    # per epoch: a seen step is averaged iff a due step start + k·every lies in (last, now].
    seen = [s for s in range(stride, 60, stride) if s % 10 != 9] + [60]
    due = {start + k * every for k in range(60)}
    expected, last = [], 0
    for s in seen:
        expected.append("follow" if s < start else "avg" if any(last < g <= s for g in due) else "skip")
        last = s
    assert _actions(Cadence(start, every), list(seen)) == expected


def test_cadence_repeated_or_backward_steps_use_the_grid() -> None:
    # torch's rule for a step that does not advance: on the grid → averaged, else skipped.
    assert _actions(Cadence(0, 2), [4, 4, 3, 2, 3]) == ["avg", "avg", "skip", "avg", "skip"]


def test_cadence_without_start_follows_and_options_are_checked() -> None:
    assert _actions(Cadence(None, 3), [1, 2, 7]) == ["follow"] * 3
    with pytest.raises(ConfigError, match="every must be a whole number ≥ 1, got 0"):
        Cadence(0, 0)
    with pytest.raises(ConfigError, match="start must be a whole number ≥ 0, got -1"):
        Cadence(-1, 1)
    with pytest.raises(ConfigError, match="step must be a whole number ≥ 0, got 2.5"):
        next_update(AveragerState(), Cadence(), SWAWeights(), step=2.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("weighting", ["equal", "linear"])
def test_swa_weights_give_numpy_weighted_mean(weighting: str) -> None:
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(9, 3))
    live = [np.zeros(3)]
    avg = OnlineAverage(SWAWeights(weighting), Cadence(2, 3), NumpyOps())
    avg.reset(["w"], live, [True])
    kept = []
    for step, x in enumerate(xs, start=1):
        live[0][...] = x
        avg.update(lambda: live, step=step)
        if step >= 2 and (step - 2) % 3 == 0:
            kept.append(x)
    w = np.ones(len(kept)) if weighting == "equal" else np.arange(1, len(kept) + 1)
    np.testing.assert_allclose(avg.state.tensors["w"], np.average(kept, axis=0, weights=w), rtol=1e-12)
    assert (avg.state.step, avg.state.count) == (9, 3)


def test_ema_weights_follow_the_recursion_and_first_update_copies() -> None:
    schedule = make_schedule(0.8, warmup="tf")
    live = [np.zeros(2)]
    avg = OnlineAverage(EMAWeights(schedule), Cadence(0, 1), NumpyOps())
    avg.reset(["w"], live, [True])
    ref = None
    for n in range(12):
        live[0][...] = [np.sin(n), n]
        avg.update(lambda: live)
        d = 0.0 if n == 0 else min(0.8, (1 + n) / (10 + n))
        ref = live[0].copy() if ref is None else d * ref + (1 - d) * live[0]
    np.testing.assert_allclose(avg.state.tensors["w"], ref, rtol=1e-12)
    with pytest.raises(ConfigError, match="every=1 differs from the schedule's every=2"):
        OnlineAverage(EMAWeights(make_schedule(0.9, every=2)), Cadence(0, 1), NumpyOps())


def test_accumulator_dtypes() -> None:
    got = {d: accumulator_dtype_name(d) for d in ("bfloat16", "float16", "float32", "float64", "complex64", "int64",
                                                  "bool", "float8_e4m3fn", "complex32")}
    assert got == {"bfloat16": "float32", "float16": "float32", "float32": "float32", "float64": "float64",
                   "complex64": "complex64", "int64": "int64", "bool": "bool", "float8_e4m3fn": "float32",
                   "complex32": "complex32"}
    assert accumulator_dtype_name("bfloat16", override="float64") == "float64"
    assert accumulator_dtype_name("int32", override="float64") == "int32"


def test_record_layout_round_trip_and_kind_check() -> None:
    avg = OnlineAverage(EMAWeights(make_schedule(half_life=10)), Cadence(3, 1), NumpyOps())
    avg.reset(["a", "b"], [np.ones(2), np.zeros(1)], [True, True])
    record = avg.record(avg.config(extra=1), avg.state.tensors)
    assert tuple(record) == FIELDS
    assert set(record["config"]) == {"start", "every", "schedule", "extra"}
    json.dumps({k: v for k, v in record.items() if k != "tensors"})
    other = OnlineAverage(EMAWeights(make_schedule(0.5)), Cadence(0, 1), NumpyOps())
    other.configure(read_record(record, kind="ema")["config"])
    assert other.cadence == Cadence(3, 1) and other.weights == avg.weights
    with pytest.raises(ConfigError, match="this state is from a 'ema' averager, not 'swa'"):
        read_record(record, kind="swa")
    with pytest.raises(FormatError, match="not an averager state: it has no 'kind'"):
        read_record({"step": 1, "tensors": {}}, kind="ema")
    with pytest.raises(ConfigError, match="count must be a whole number ≥ 0, got -2"):
        read_record({**record, "count": -2}, kind="ema")
    with pytest.raises(ConfigError, match="saved SWA weighting 'cubic' is not one of"):
        OnlineAverage(SWAWeights(), Cadence(), NumpyOps()).configure({"weighting": "cubic"})


def test_keras_01_layout_is_upgraded() -> None:
    schedule = make_schedule(0.9, every=2).to_dict()
    old = {"schedule": schedule, "count": 3, "last_step": 8, "start_epoch": 1, "include_non_trainable": True,
           "averages": {"layers/dense/vars/0": np.ones((2, 2))}}
    new = read_record(old, kind="ema")
    # 0.1 updated at 8, 6 and 4 (every 2 steps up to last_step): the start step was 4.
    assert new["config"] == {"start": 4, "every": 2, "schedule": schedule, "start_epoch": 1,
                             "include_non_trainable": True}
    assert (new["kind"], new["step"], new["count"]) == ("ema", 8, 3)
    assert set(new["tensors"]) == {"layers/dense/vars/0"}
    unstarted = read_record({**old, "count": 0, "last_step": -1, "averages": {}}, kind="ema")
    assert unstarted["config"]["start"] is None and unstarted["step"] == 0


@pytest.mark.parametrize(
    ("count", "last_step", "every", "start"),
    [
        (0, 5, 1, None),  # nothing averaged yet: the start is not known
        (1, 0, 1, 0),     # one update, at step 0
        (1, 7, 3, 7),     # one update: it was the start
        (3, 4, 2, 0),     # updates at 4, 2, 0
        (5, 2, 1, 0),     # more updates than steps (a resumed 0.1 run): never before step 0
        (2, -1, 1, None),
    ],
)
def test_keras_01_start_is_worked_back_from_the_last_update(count: int, last_step: int, every: int, start: int | None) -> None:
    old = {"schedule": make_schedule(0.9, every=every).to_dict(), "count": count, "last_step": last_step,
           "start_epoch": 2, "include_non_trainable": False}
    new = read_record(old, kind="ema")
    assert new["config"]["start"] == start and new["config"]["every"] == every
    assert (new["step"], new["count"]) == (max(last_step, 0), count)


def test_keras_01_record_with_only_what_0_1_required() -> None:
    # A 0.1 state holding only the schedule (without `every`) and last_step: the other
    # fields take 0.1's defaults (no updates, start_epoch 0, trainable variables only).
    schedule = {k: v for k, v in make_schedule(0.9).to_dict().items() if k != "every"}
    new = read_record({"schedule": schedule, "last_step": 6}, kind="ema")
    assert new == {"kind": "ema", "step": 6, "count": 0, "config": {
        "start": None, "every": 1, "schedule": schedule, "start_epoch": 0, "include_non_trainable": False}}
    assert read_record({"schedule": schedule, "last_step": 6, "count": 2}, kind="ema")["config"]["start"] == 5


def test_check_saved_tensors_lists_every_problem() -> None:
    ours = {"a": np.zeros(2), "b": np.zeros((2, 3)), "c": np.zeros(1)}
    saved = {"a": np.zeros(2), "b": np.zeros((3, 2)), "x": np.zeros(1)}
    with pytest.raises(MismatchError, match=r'(?s)missing 1 tensor.*"c".*unexpected tensor.*"x".*"b" has shape \(3, 2\)'):
        check_saved_tensors(ours, saved, what="does not fit", fix="load the right one")


def test_core_imports_no_framework() -> None:
    import subprocess

    code = ("import sys, polyak._online, polyak._retention, polyak._online_torch; "
            "print(sorted(m for m in ('torch', 'keras', 'jax', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_weights_of_each_kind() -> None:
    assert [SWAWeights("linear")(c) for c in range(4)] == [1.0, 2 / 3, 2 / 4, 2 / 5]
    assert list(itertools.islice((EMAWeights(make_schedule(0.75))(c) for c in itertools.count()), 3)) == [1.0, 0.25, 0.25]
    with pytest.raises(ConfigError, match=r"weighting must be one of \['equal', 'linear'\], got 'cubic'"):
        SWAWeights("cubic")


def test_weights_from_a_saved_config_and_what_it_omits() -> None:
    schedule = make_schedule(0.9, warmup="tf")
    assert weights_from_config("ema", {"schedule": schedule.to_dict()}) == EMAWeights(schedule)
    fallback = EMAWeights(make_schedule(0.5))
    assert weights_from_config("ema", {}, fallback) is fallback
    with pytest.raises(FormatError, match="^the saved EMA record has no schedule$"):
        weights_from_config("ema", {})
    assert weights_from_config("swa", {}) == SWAWeights("equal")
    assert weights_from_config("swa", {}, SWAWeights("linear")) == SWAWeights("linear")
    assert weights_from_config("swa", {"weighting": "equal"}, SWAWeights("linear")) == SWAWeights("equal")
    with pytest.raises(ConfigError, match=r"^saved SWA weighting 'cubic' is not one of \['equal', 'linear'\]$"):
        weights_from_config("swa", {"weighting": "cubic"})
    with pytest.raises(ConfigError, match="^unknown averager kind 'sgd'; polyak saves 'ema' and 'swa' averagers$"):
        weights_from_config("sgd", {})
    # configure() keeps what a saved config omits
    avg = OnlineAverage(EMAWeights(make_schedule(0.7, every=2)), Cadence(5, 2), NumpyOps())
    avg.configure({"start": 8})
    assert avg.weights == EMAWeights(make_schedule(0.7, every=2)) and avg.cadence == Cadence(8, 2)
    swa = OnlineAverage(SWAWeights("linear"), Cadence(0, 1), NumpyOps())
    swa.configure({"every": 3})
    assert swa.weights == SWAWeights("linear") and swa.cadence == Cadence(0, 3)


def test_read_record_defaults_and_counters() -> None:
    assert read_record({"kind": "swa"}, kind="swa") == {"kind": "swa", "step": 0, "count": 0, "config": {}}
    assert read_record({"kind": "swa", "config": None, "step": 3.0, "count": 2}, kind="swa") == {
        "kind": "swa", "step": 3, "count": 2, "config": {}}
    for field, value in (("step", -1), ("count", -3)):
        with pytest.raises(ConfigError, match=f"^{field} must be a whole number ≥ 0, got {value}$"):
            read_record({"kind": "swa", field: value}, kind="swa")
    # Only a record without "kind" that has 0.1's two fields is a 0.1 state.
    with pytest.raises(FormatError, match=r"^not an averager state: it has no 'kind' \(fields: \['last_step', 'tensors'\]\)$"):
        read_record({"last_step": 3, "tensors": {}}, kind="ema")
    schedule = make_schedule(0.9).to_dict()
    current = {"kind": "ema", "step": 4, "count": 2, "config": {"start": 3}, "schedule": schedule, "last_step": 9}
    assert read_record(current, kind="ema") == {**current, "step": 4, "count": 2, "config": {"start": 3}}


def test_configure_takes_every_from_the_saved_schedule() -> None:
    avg = OnlineAverage(EMAWeights(make_schedule(0.7, every=2)), Cadence(5, 2), NumpyOps())
    avg.configure({"schedule": make_schedule(0.7, every=4).to_dict(), "every": 1})
    assert avg.cadence == Cadence(5, 4) and avg.weights.every == 4


@pytest.mark.parametrize(("start", "every", "seen"), [(3, 1, [2, 5, 6, 10, 11, 15, 16]), (2, 3, [4, 7, 14, 15, 30])])
@pytest.mark.parametrize("weights", [SWAWeights("equal"), SWAWeights("linear"),
                                     EMAWeights(make_schedule(0.8, warmup="tf", every=3))], ids=["equal", "linear", "ema"])
def test_a_jump_over_m_due_steps_weighs_as_m_updates(start: int, every: int, seen: list[int], weights) -> None:  # type: ignore[no-untyped-def]
    # Steps seen now and then (steps_per_execution): the average equals the one over every
    # due step, each with the weights of the next seen step (the weights it stood in for).
    if getattr(weights, "every", None) not in (None, every):
        weights = EMAWeights(make_schedule(0.8, warmup="tf", every=every))
    rng = np.random.default_rng(1)
    values = {s: rng.normal(size=3) for s in seen}
    avg = OnlineAverage(weights, Cadence(start, every), NumpyOps())
    live = [np.zeros(3)]
    avg.reset(["w"], live, [True])
    for s in seen:
        live[0][...] = values[s]
        avg.update(lambda: live, step=s)
    due = [t for t in range(start, seen[-1] + 1) if (t - start) % every == 0]
    stand_in = [values[min(s for s in seen if s >= t)] for t in due]
    if isinstance(weights, SWAWeights):  # the weighted mean, written out
        w = np.ones(len(due)) if weights.weighting == "equal" else np.arange(1, len(due) + 1)
        expected = np.average(stand_in, axis=0, weights=w)
    else:  # the EMA recursion, one due step at a time, in float64
        expected = stand_in[0]
        for n, x in enumerate(stand_in[1:], start=1):
            d = min(0.8, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * x
    np.testing.assert_allclose(avg.state.tensors["w"], expected, rtol=1e-12)
    assert (avg.state.step, avg.state.count) == (seen[-1], len(due))


def _due(cadence: Cadence, t: int) -> bool:
    """Whether step ``t`` changes the average, from the definition (not from next_due)."""
    if cadence.start is None or t < cadence.start:
        return True
    return (t - cadence.start) % cadence.every == 0


@pytest.mark.parametrize("cadence", [Cadence(None, 4), Cadence(0, 1), Cadence(3, 4), Cadence(5, 2), Cadence(1, 3)])
def test_next_due_is_the_first_changing_step_after_any_step(cadence: Cadence) -> None:
    for step in range(0, 25):
        expected = next(t for t in itertools.count(step + 1) if _due(cadence, t))
        assert cadence.next_due(step) == expected, (cadence, step)


@pytest.mark.parametrize(("start", "every"), [(3, 1), (5, 2), (4, 3)])
def test_a_jump_from_before_start_counts_the_due_steps_from_start(start: int, every: int) -> None:
    # From step 0 (nothing seen) straight to a step past start: every due step in
    # [start, now] counts once, the steps before start none.
    for now in range(start, start + 3 * every + 1):
        u = next_update(AveragerState(), Cadence(start, every), SWAWeights())
        assert (u.step, u.count) == (1, 0)
        u = next_update(AveragerState(), Cadence(start, every), SWAWeights(), step=now)
        due = len(range(start, now + 1, every))  # the first is a copy: weight 1 however many
        assert (u.step, u.count, u.weight) == (now, due, 1.0), (now, u)


def test_configure_keeps_an_swa_cadence_the_config_omits() -> None:
    swa = OnlineAverage(SWAWeights("equal"), Cadence(0, 3), NumpyOps())
    swa.configure({"start": 4})  # a saved config without "every": the averager's own stays
    assert swa.cadence == Cadence(4, 3)
    swa.configure({})
    assert swa.cadence == Cadence(4, 3)
