"""EMA decay schedules against their closed forms."""

import math
import re

import pytest

from polyak import ConfigError, DecaySchedule, make_schedule


def test_constant_first_update_copies():
    s = make_schedule(0.99)
    assert s(0) == 0.0
    assert [s(n) for n in (1, 2, 100)] == [0.99, 0.99, 0.99]
    assert s.name == "constant"


def test_timm_warmup_formula_and_clamp():
    s = make_schedule(0.999, warmup="timm", min_decay=0.1, warmup_gamma=1.0, warmup_power=2 / 3)
    for n in (1, 2, 10, 1000, 10**6):
        expected = min(max(1 - (1 + n) ** (-2 / 3), 0.1), 0.999)
        assert s(n) == pytest.approx(expected, rel=1e-15)
    # timm's docstring: gamma=1, power=2/3 reaches 0.999 at about 31.6K steps
    assert s(31_000) < 0.999
    assert s(32_000) == 0.999


def test_tf_warmup():
    s = make_schedule(0.9999, warmup="tf")
    for n in (1, 5, 50, 10**5):
        assert s(n) == pytest.approx(min(0.9999, (1 + n) / (10 + n)), rel=1e-15)


def test_half_life():
    s = make_schedule(half_life=100)
    assert s.decay == pytest.approx(0.5 ** (1 / 100))
    assert s.decay**100 == pytest.approx(0.5)
    assert s.half_life == pytest.approx(100)
    assert s.name == "half_life"
    s4 = make_schedule(half_life=100, every=4)
    assert s4.decay**25 == pytest.approx(0.5)
    assert s4.half_life == pytest.approx(100)


def test_window_and_describe():
    s = make_schedule(0.999)
    assert s.window == pytest.approx(1000)
    assert s.half_life == pytest.approx(math.log(2) / -math.log(0.999))
    assert "half-life" in s.describe()


def test_round_trip_dict():
    s = make_schedule(0.995, warmup="timm", min_decay=0.5, warmup_power=0.75, every=2)
    assert DecaySchedule.from_dict(s.to_dict()) == s


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give exactly one of decay= or half_life="),
        ({"decay": 0.9, "half_life": 10}, "give exactly one of decay= or half_life="),
        ({"decay": 1.0}, "decay must be in [0, 1), got 1.0"),
        ({"decay": -0.1}, "decay must be in [0, 1), got -0.1"),
        ({"decay": float("nan")}, "decay must be in [0, 1), got nan"),
        ({"decay": "high"}, "decay must be a number in [0, 1), got 'high'"),
        ({"half_life": 0}, "half_life must be a positive number of steps, got 0"),
        ({"half_life": float("inf")}, "half_life must be a positive number of steps, got inf"),
        ({"half_life": "long"}, "half_life must be a number of steps, got 'long'"),
        ({"decay": 0.9, "warmup": "cosine"}, "warmup must be one of [None, 'timm', 'tf'], got 'cosine'"),
        ({"decay": 0.9, "every": 0}, "every must be a whole number of steps ≥ 1, got 0"),
        ({"decay": 0.9, "every": True}, "every must be a whole number of steps ≥ 1, got True"),
        ({"decay": 0.9, "every": 2.0}, "every must be a whole number of steps ≥ 1, got 2.0"),
        ({"decay": 0.9, "min_decay": 0.95}, "min_decay must be in [0, decay=0.9], got 0.95"),
        ({"decay": 0.9, "min_decay": -0.1}, "min_decay must be in [0, decay=0.9], got -0.1"),
        ({"decay": 0.9, "warmup": "timm", "warmup_gamma": 0}, "warmup_gamma and warmup_power must be > 0, got 0.0, 0.6666666666666666"),
        ({"decay": 0.9, "warmup": "timm", "warmup_power": -1}, "warmup_gamma and warmup_power must be > 0, got 1.0, -1.0"),
    ],
)
def test_invalid(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        make_schedule(**kwargs)
