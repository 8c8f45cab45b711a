"""Weighting schemes against the tutorial's own formulas, computed by hand."""

from math import exp

import numpy as np
import pytest

import polyak
from polyak import SchemeError, scheme_weights


def tutorial_weights(scheme: str, n: int, alpha: float = 2.0) -> np.ndarray:
    """The tutorial's code, newest first, normalised, then reversed to oldest → newest."""
    if scheme == "equal":
        w = [1.0 for _ in range(n)]
    elif scheme == "linear":
        w = [i / n for i in range(n, 0, -1)]
    else:
        w = [exp(-i / alpha) for i in range(1, n + 1)]
    arr = np.array(w[::-1])
    return arr / arr.sum()


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
    ("kwargs", "match"),
    [
        ({"scheme": "equal", "n": 0}, "at least 1"),
        ({"scheme": "linear", "n": -3}, "at least 1"),
        ({"scheme": "linear", "n": 2.5}, "integer"),
        ({"scheme": "exponential", "n": 3, "alpha": 0}, "alpha"),
        ({"scheme": "exponential", "n": 3, "alpha": -1}, "alpha"),
        ({"scheme": "exponential", "n": 3, "alpha": float("nan")}, "alpha"),
        ({"scheme": "custom", "weights": [1, -1]}, "negative"),
        ({"scheme": "custom", "weights": [0, 0]}, "all zero"),
        ({"scheme": "custom", "n": 3, "weights": [1, 2]}, "2 custom weights for 3 members"),
        ({"scheme": "custom", "weights": []}, "empty"),
        ({"scheme": "custom"}, "needs weights"),
        ({"scheme": "mean", "n": 3}, "valid schemes: 'equal', 'linear', 'exponential', 'custom'"),
        ({"scheme": "linear", "n": 3, "weights": [1, 2, 3]}, "only used with scheme 'custom'"),
    ],
)
def test_invalid_input_raises_clear_error(kwargs, match):
    scheme = kwargs.pop("scheme")
    n = kwargs.pop("n", None)
    with pytest.raises(SchemeError, match=match):
        scheme_weights(scheme, n, **kwargs)


def test_scheme_error_is_value_error():
    with pytest.raises(ValueError):
        scheme_weights("equal", 0)


def test_registry():
    assert polyak.scheme_names() == ["equal", "linear", "exponential", "custom"]
    spec = polyak.get_scheme("exponential")
    assert spec.parameters == ("alpha",)
    assert "exp" in spec.formula
