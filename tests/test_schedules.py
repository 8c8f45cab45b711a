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
        ({}, "give exactly one of decay=, half_life= or sigma_rel="),
        ({"decay": 0.9, "half_life": 10}, "give exactly one of decay=, half_life= or sigma_rel="),
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


def test_timm_defaults_are_timms() -> None:
    # timm ModelEmaV3: warmup_gamma=1.0, warmup_power=2/3, min_decay=0 unless given.
    s = make_schedule(0.9999, warmup="timm")
    assert (s.name, s.warmup_gamma, s.warmup_power, s.min_decay) == ("warmup", 1.0, 2 / 3, 0.0)
    for n in (1, 7, 500):
        assert s(n) == pytest.approx(1 - (1 + n) ** (-2 / 3), rel=1e-15)
    g = make_schedule(0.9999, warmup="timm", warmup_gamma=10.0, warmup_power=0.75)
    for n in (1, 7, 500):
        assert g(n) == pytest.approx(1 - (1 + n / 10.0) ** -0.75, rel=1e-15)


@pytest.mark.parametrize("warmup", [None, "timm", "tf"])
def test_the_first_update_copies_under_every_warmup(warmup) -> None:
    s = make_schedule(0.99, warmup=warmup, min_decay=0.5)
    assert s(0) == 0.0 and s(-1) == 0.0
    assert s(1) > 0.0


def test_zero_decay_copies_every_update() -> None:
    s = make_schedule(0.0)
    assert [s(n) for n in range(4)] == [0.0, 0.0, 0.0, 0.0]
    assert (s.half_life, s.window) == (0.0, 1.0)
    assert s.describe() == "constant EMA, decay 0, half-life 0 steps, window ≈ 1 steps"


def test_describe_in_full() -> None:
    assert make_schedule(0.999).describe() == "constant EMA, decay 0.999, half-life 692.8 steps, window ≈ 1000 steps"
    s = make_schedule(half_life=10, every=2)
    assert s.describe() == "half_life EMA, decay 0.870551, half-life 10 steps, window ≈ 15.45 steps"
    assert s.window == pytest.approx(2 / (1 - 0.5 ** (2 / 10)), rel=1e-15)


def test_saved_schedules_are_checked_like_new_ones() -> None:
    d = make_schedule(0.9, warmup="tf", every=3).to_dict()
    assert d == {"name": "tf_warmup", "decay": 0.9, "min_decay": 0.0, "warmup_gamma": 1.0,
                 "warmup_power": 2 / 3, "half_life_steps": None, "every": 3}
    cases = [
        ({**d, "bogus": 1, "other": 2}, "unknown decay-schedule fields ['bogus', 'other'] in saved state"),
        ({**d, "name": "cosine"},
         "unknown decay schedule 'cosine'; valid schedules: ['constant', 'half_life', 'power', 'tf_warmup', 'warmup']"),
        ({**d, "every": 0}, "every must be a whole number of steps ≥ 1, got 0"),
        ({**d, "every": 2.0}, "every must be a whole number of steps ≥ 1, got 2.0"),
        ({**d, "every": False}, "every must be a whole number of steps ≥ 1, got False"),
        ({**d, "decay": float("inf")}, "decay must be in [0, 1), got inf"),
        ({**d, "min_decay": 0.95}, "min_decay must be in [0, decay=0.9], got 0.95"),
        ({**d, "warmup_gamma": -1.0}, "warmup_gamma and warmup_power must be > 0, got -1.0, 0.6666666666666666"),
        ({**d, "warmup_power": 0.0}, "warmup_gamma and warmup_power must be > 0, got 1.0, 0.0"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            DecaySchedule.from_dict(data)
    assert DecaySchedule.from_dict({**d, "min_decay": 0.9}).min_decay == 0.9  # the bounds are allowed
    assert DecaySchedule.from_dict({**d, "decay": 0.0, "min_decay": 0.0}).decay == 0.0


def test_options_are_stored_as_floats() -> None:
    s = make_schedule(half_life=8, min_decay=0, warmup="timm", warmup_gamma=2, warmup_power=1)
    for value in (s.decay, s.min_decay, s.warmup_gamma, s.warmup_power, s.half_life_steps):
        assert type(value) is float
    assert s.name == "warmup" and s.half_life_steps == 8.0  # a warmup keeps its name with half_life
    assert make_schedule(decay=1 - 2**-10).decay == 1 - 2**-10


def test_power_schedule_fields_are_checked_together() -> None:
    needs = "^a power schedule needs sigma_rel \\(and the gamma it implies\\)$"
    for fields in ({}, {"sigma_rel": 0.1}, {"gamma": 6.94}):
        with pytest.raises(ConfigError, match=needs):
            DecaySchedule(name="power", decay=0.0, **fields)
    for fields in ({"sigma_rel": 0.1}, {"gamma": 6.94}, {"sigma_rel": 0.1, "gamma": 6.94}):
        with pytest.raises(ConfigError, match="^sigma_rel and gamma belong to the power schedule, not to 'constant'$"):
            DecaySchedule(name="constant", decay=0.9, **fields)
    with pytest.raises(ConfigError, match=r"^a power EMA \(sigma_rel=\) has its own warmup; drop warmup=$"):
        make_schedule(sigma_rel=0.1, warmup="tf")


@pytest.mark.parametrize("every", [0, -2, True, "2", 2.0])
@pytest.mark.parametrize("kind", ["decay", "half_life", "sigma_rel"])
def test_every_is_a_whole_number_of_steps_for_every_kind_of_schedule(kind: str, every: object) -> None:
    with pytest.raises(ConfigError, match=f"^every must be a whole number of steps ≥ 1, got {re.escape(repr(every))}$"):
        make_schedule(**{kind: 0.1 if kind == "sigma_rel" else 0.9 if kind == "decay" else 10.0}, every=every)  # type: ignore[arg-type]


def test_a_half_life_of_one_step_or_less_is_allowed() -> None:
    assert make_schedule(half_life=1).decay == 0.5
    assert make_schedule(half_life=0.5).decay == 0.25
    assert make_schedule(half_life=2, every=2).decay == 0.5


def test_a_schedule_is_checked_however_it_is_built() -> None:
    # built directly (schedule= of the averagers takes one), or from a saved state
    with pytest.raises(ConfigError, match=r"^unknown decay schedule 'cosine'; valid schedules: \["):
        DecaySchedule(name="cosine", decay=0.9)
    with pytest.raises(ConfigError, match=r"^decay must be in \[0, 1\), got 1\.5$"):
        DecaySchedule(name="constant", decay=1.5)
    saved = make_schedule(0.9).to_dict()
    for field in ("name", "decay"):
        with pytest.raises(ConfigError, match=f"^the saved decay schedule has no {field}$"):
            DecaySchedule.from_dict({k: v for k, v in saved.items() if k != field})
    with pytest.raises(ConfigError, match="^the saved decay schedule has no decay and no name$"):
        DecaySchedule.from_dict({"every": 1})
