"""Weighting schemes against the tutorial's own formulas, computed by hand."""

import re
from math import exp

import numpy as np
import pytest

import polyak
from _helpers import tutorial_weights
from polyak import SchemeError, scheme_weights
from polyak._schemes import (
    MEMBER,
    REQUIRED,
    SCHEMES,
    Param,
    RunningSum,
    Scheme,
    Update,
    register_scheme,
)


@pytest.mark.parametrize("scheme", ["equal", "linear", "exponential"])
@pytest.mark.parametrize("n", [1, 2, 3, 10, 37])
def test_matches_tutorial_formulas(scheme, n):
    np.testing.assert_allclose(scheme_weights(scheme, n), tutorial_weights(scheme, n), rtol=1e-14, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_exponential_alpha(alpha):
    np.testing.assert_allclose(
        scheme_weights("exponential", 10, alpha=alpha), tutorial_weights("exponential", 10, alpha), rtol=1e-14
    )


def test_hand_computed_values():
    # linear, n = 4: oldest → newest 1, 2, 3, 4 over 10
    assert scheme_weights("linear", 4).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=1e-15)
    # exponential alpha=2, n=2: newest exp(-1/2), older exp(-1)
    a, b = exp(-1.0), exp(-0.5)
    assert scheme_weights("exponential", 2).tolist() == pytest.approx([a / (a + b), b / (a + b)], abs=1e-15)
    assert scheme_weights("equal", 1).tolist() == [1.0]


def test_newest_weighs_most_and_sum_is_one():
    for scheme in ("linear", "exponential"):
        w = scheme_weights(scheme, 8)
        assert np.all(np.diff(w) > 0)
        assert w.sum() == pytest.approx(1.0, abs=1e-15)


def test_custom_weights_are_normalised():
    assert scheme_weights("custom", weights=[1, 1, 2]).tolist() == [0.25, 0.25, 0.5]
    assert scheme_weights([0, 3]).tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "equal", "n": 0}, "the number of members must be at least 1, got n=0"),
        ({"scheme": "linear", "n": -3}, "the number of members must be at least 1, got n=-3"),
        ({"scheme": "linear", "n": 2.5}, "the number of members must be an integer, got 2.5"),
        ({"scheme": "linear", "n": True}, "the number of members must be an integer, got True"),
        ({"scheme": "linear"}, "scheme 'linear' needs the number of members n"),
        ({"scheme": "exponential", "n": 3, "alpha": 0},
         "alpha must be a positive, finite number (the exponential decay rate), got 0"),
        ({"scheme": "exponential", "n": 3, "alpha": -1},
         "alpha must be a positive, finite number (the exponential decay rate), got -1"),
        ({"scheme": "exponential", "n": 3, "alpha": float("nan")},
         "alpha must be a positive, finite number (the exponential decay rate), got nan"),
        ({"scheme": "exponential", "n": 3, "alpha": float("inf")},
         "alpha must be a positive, finite number (the exponential decay rate), got inf"),
        ({"scheme": "exponential", "n": 3, "alpha": "abc"}, "alpha must be a positive number, got 'abc'"),
        ({"scheme": "custom", "weights": [1, -1]}, "custom weights must not be negative, got [1.0, -1.0]"),
        ({"scheme": "custom", "weights": [0, 0]},
         "custom weights are all zero; at least one member needs a positive weight"),
        ({"scheme": "custom", "weights": [1, float("nan"), 2]}, "custom weights must be finite, got [1.0, nan, 2.0]"),
        ({"scheme": "custom", "weights": [1, float("inf")]}, "custom weights must be finite, got [1.0, inf]"),
        ({"scheme": "custom", "weights": ["a", "b"]}, "custom weights must be numbers, got ['a', 'b']"),
        ({"scheme": "custom", "weights": [[1, 2], [3, 4]]},
         "custom weights must be a flat list of numbers, got shape (2, 2)"),
        ({"scheme": "custom", "weights": 3.0}, "custom weights must be a flat list of numbers, got shape ()"),
        ({"scheme": "custom", "n": 3, "weights": [1, 2]},
         "got 2 custom weights for 3 members; give exactly one weight per member (oldest → newest)"),
        ({"scheme": "custom", "weights": []}, "custom weights are empty; give one weight per member"),
        ({"scheme": "custom"}, "scheme 'custom' needs weights= (one weight per member, oldest → newest)"),
        ({"scheme": "mean", "n": 3}, "unknown weighting scheme 'mean'; valid schemes: 'equal', 'linear', 'exponential', 'custom'"),
        ({"scheme": "linear", "n": 3, "weights": [1, 2, 3]}, "weights= is only used with scheme 'custom', not with 'linear'"),
    ],
)
def test_invalid_input_raises_clear_error(kwargs, message):
    scheme = kwargs.pop("scheme")
    n = kwargs.pop("n", None)
    with pytest.raises(SchemeError, match=f"^{re.escape(message)}$"):
        scheme_weights(scheme, n, **kwargs)


def test_registry_errors_say_what_and_how() -> None:
    with pytest.raises(SchemeError, match=re.escape("scheme 'exponential' has no parameter 'beta'; it takes ['alpha']")):
        polyak.get_scheme("exponential").param("beta")
    assert polyak.get_scheme("exponential").param("alpha").default == 2.0  # the tutorial's default
    with pytest.raises(SchemeError, match="^a scheme named 'equal' is already registered; pass replace=True to replace it$"):
        register_scheme(SCHEMES["equal"])
    assert repr(REQUIRED) == "REQUIRED" and repr(MEMBER) == "MEMBER"  # as help and errors show them


def test_exponential_weights_stay_finite_for_a_tiny_alpha() -> None:
    # exp(-(j + 1) / alpha) underflows to 0 for every member when alpha < 1/745 (all NaN
    # after normalising, in 0.1); the factor exp(-1/alpha) cancels, so the newest counts 1.
    assert scheme_weights("exponential", 3, alpha=1e-3).tolist() == [0.0, 0.0, 1.0]
    w = [exp(-2 / 0.01), exp(-1 / 0.01), 1.0]  # by hand, newest weight 1
    np.testing.assert_allclose(scheme_weights("exponential", 3, alpha=0.01), np.array(w) / sum(w), rtol=1e-14)
    states = [{"w": np.full(2, float(i), np.float32)} for i in range(3)]
    assert polyak.average(states, scheme="exponential", alpha=1e-3)["w"].tolist() == [2.0, 2.0]


def test_scheme_error_is_value_error():
    with pytest.raises(ValueError, match="^the number of members must be at least 1, got n=0$"):
        scheme_weights("equal", 0)


def test_registry():
    assert polyak.scheme_names() == ["equal", "linear", "exponential", "custom"]
    spec = polyak.get_scheme("exponential")
    assert spec.parameters == ("alpha",)
    assert "exp" in spec.formula


# A new scheme is one registration: a toy "power" scheme, weight (j + 1)^(−alpha) for the
# j-th newest member, with its own typed parameter and running sum.
def _power_raw(n: int, alpha: float) -> np.ndarray:
    j = np.arange(n - 1, -1, -1, dtype=np.float64)  # oldest → newest
    return (j + 1.0) ** -alpha


def _power_sums(alpha: float) -> RunningSum:
    return RunningSum(("P", alpha), lambda j: (Update(("P", alpha), (j + 1.0) ** -alpha),))


def _check_power(value: object) -> float:
    alpha = float(value)  # type: ignore[arg-type]
    if not alpha > 0:
        raise SchemeError(f"power: alpha must be > 0, got {value!r}")
    return alpha


@pytest.fixture
def power():
    scheme = register_scheme(Scheme(
        name="power", summary="toy", formula="(j + 1)^-alpha", reference="test", raw=_power_raw,
        params=(Param("alpha", 1.0, _check_power, "the exponent"),), running=_power_sums,
    ))
    yield scheme
    del SCHEMES["power"]


def power_weights(n: int, alpha: float) -> np.ndarray:
    """By hand, oldest → newest: the newest counts 1, the one before 1/2^alpha, ..."""
    return np.array([1.0 / (n - i) ** alpha for i in range(n)])


def test_a_registered_scheme_works_in_average_and_sweep(power, tmp_path) -> None:
    rng = np.random.default_rng(3)
    states = [{"w": rng.normal(size=(3, 4)).astype(np.float64), "step": np.array([i])} for i in range(6)]
    paths = []
    for i, state in enumerate(states):
        polyak.save(state, tmp_path / f"m_{i}.safetensors")
        paths.append(tmp_path / f"m_{i}.safetensors")
    stack = np.stack([s["w"] for s in states])
    assert "power" in polyak.scheme_names()
    np.testing.assert_allclose(scheme_weights("power", 4, alpha=2.0),
                               power_weights(4, 2.0) / power_weights(4, 2.0).sum(), rtol=1e-14)
    # polyak.average, with the provenance record's params from the scheme.
    got = polyak.average(paths, scheme="power", alpha=0.5, last=4)
    np.testing.assert_allclose(got["w"], np.average(stack[2:], axis=0, weights=power_weights(4, 0.5)), rtol=1e-12)
    res = polyak.average(paths, scheme="power", out=tmp_path / "avg.safetensors")
    assert res.metadata["scheme"] == "power" and res.metadata["params"] == {"alpha": 1.0}
    with pytest.raises(SchemeError, match="power: alpha must be > 0"):
        polyak.average(paths, scheme="power", alpha=-1.0)
    # polyak.sweep: one curve per alpha, each row the numpy.average of the newest n files.
    seen: list[np.ndarray] = []

    def evaluate(state):
        seen.append(np.array(state["w"], copy=True))
        return {"x": 0.0}

    rows = polyak.sweep(paths, evaluate, schemes=["equal", "power"], alphas=(0.5, 2.0), baselines=()).rows
    assert [(r.scheme, r.alpha) for r in rows[:3]] == [("equal", None), ("power", 0.5), ("power", 2.0)]
    assert len(rows) == 6 * 3
    for r, w_avg in zip(rows, seen, strict=True):
        w = np.ones(r.n) if r.scheme == "equal" else power_weights(r.n, r.alpha)
        np.testing.assert_allclose(w_avg, np.average(stack[-r.n:], axis=0, weights=w), rtol=1e-12)
    # Registered schemes with running sums are swept by default.
    res = polyak.sweep(paths, lambda s: {"x": 0.0}, baselines=(), n=[1])
    assert res.schemes == ("equal", "linear", "exponential", "power")


def test_schemes_sharing_a_sum_must_update_it_alike(tmp_path) -> None:
    register_scheme(Scheme(name="bad", summary="", formula="", reference="", raw=lambda n: np.ones(n),
                           running=lambda: RunningSum("S0", lambda j: (Update("S0", 2.0),))))
    try:
        with pytest.raises(SchemeError, match="'bad' updates the running sum 'S0' differently"):
            polyak.sweep([{"w": np.ones(2)}] * 2, lambda s: {"x": 0.0}, schemes=["equal", "bad"])
        with pytest.raises(SchemeError, match="already registered"):
            register_scheme(SCHEMES["bad"])
    finally:
        del SCHEMES["bad"]


def test_the_command_line_offers_a_registered_scheme(power, tmp_path, capsys) -> None:
    from polyak.cli import main

    paths = []
    for i in range(3):
        polyak.save({"w": np.array([float(i)], np.float32)}, tmp_path / f"m_{i}.safetensors")
        paths.append(str(tmp_path / f"m_{i}.safetensors"))
    out = tmp_path / "avg.safetensors"
    assert main(["average", *paths, "-o", str(out), "--scheme", "power", "--alpha", "1"]) == 0
    want = np.average([0.0, 1.0, 2.0], weights=power_weights(3, 1.0))
    assert polyak.average([out])["w"][0] == pytest.approx(want, rel=1e-6)
    assert "power" in capsys.readouterr().out
