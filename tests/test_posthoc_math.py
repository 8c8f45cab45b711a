"""Post-hoc EMA math (numpy only): γ ↔ σ_rel, profile inner products, the power schedule,
the coefficient solve, against closed forms and independent computations written here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from _helpers import power_gamma
from polyak import ConfigError, DecaySchedule, make_schedule
from polyak._errors import FormatError
from polyak._posthoc import (
    MAX_SIGMA_REL,
    SnapshotRecord,
    gamma_to_sigma_rel,
    profile_inner,
    sigma_rel_to_gamma,
    snapshot_name,
    solve_coefficients,
)


def test_gamma_of_the_papers_defaults():
    # The issue (and EDM2) quote γ ≈ 16.97 for σ_rel 0.05 and 6.94 for 0.10.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)


@pytest.mark.parametrize("sigma_rel", [0.005, 0.02, 0.05, 0.08, 0.1, 0.17, 0.25, 0.28])
def test_gamma_is_the_largest_root_of_the_cubic(sigma_rel):
    g = sigma_rel_to_gamma(sigma_rel)
    assert g == pytest.approx(power_gamma(sigma_rel), rel=1e-9)
    assert gamma_to_sigma_rel(g) == pytest.approx(sigma_rel, rel=1e-12)


def test_sigma_rel_range():
    assert sigma_rel_to_gamma(MAX_SIGMA_REL) == 0.0
    assert gamma_to_sigma_rel(0.0) == pytest.approx(math.sqrt(1 / 12))
    for bad in (0.0, -0.1, 0.3, float("nan"), float("inf"), "wide"):
        with pytest.raises(ConfigError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("ta", "ga", "tb", "gb"), [(100, 6.94, 100, 16.97), (40, 3.0, 100, 0.0), (100, 16.97, 70, 6.94)])
def test_inner_product_matches_quadrature(ta, ga, tb, gb):
    """⟨p_a, p_b⟩ against a midpoint rule over [0, min(t_a, t_b)] (both vanish beyond)."""
    m = min(ta, tb)
    tau = (np.arange(400_000) + 0.5) * (m / 400_000)
    pa = (ga + 1) * tau**ga / ta ** (ga + 1)
    pb = (gb + 1) * tau**gb / tb ** (gb + 1)
    numeric = float(np.sum(pa * pb) * (m / 400_000))
    assert float(profile_inner(ta, ga, tb, gb)) == pytest.approx(numeric, rel=1e-6)
    assert float(profile_inner(ta, ga, tb, gb)) == pytest.approx(float(profile_inner(tb, gb, ta, ga)), rel=1e-14)


def test_inner_product_does_not_overflow():
    # t^(γ+1) = (1e6)^101 overflows float64; the ratio does not.
    v = float(profile_inner(1e6, 100.0, 1e6, 100.0))
    # ⟨p, p⟩ = (γ+1)² / ((2γ+1) t)
    assert v == pytest.approx(101**2 / (201 * 1e6), rel=1e-10)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1])
def test_power_schedule_weights_are_the_profile_integrated_per_update(sigma_rel):
    """Run the schedule on one-hot inputs: update k ends with weight ∫_{k-1}^{k} p(τ) dτ =
    (k^(γ+1) − (k−1)^(γ+1)) / t^(γ+1), the power profile, exactly."""
    s = make_schedule(sigma_rel=sigma_rel)
    g = power_gamma(sigma_rel)
    t = 60
    avg = np.zeros(t)
    for n in range(t):  # n earlier updates; the (n+1)-th folds in e_{n+1}
        d = s(n)
        x = np.zeros(t)
        x[n] = 1.0
        avg = d * avg + (1 - d) * x
    k = np.arange(1, t + 1, dtype=np.float64)
    expected = (k ** (g + 1) - (k - 1) ** (g + 1)) / t ** (g + 1)
    np.testing.assert_allclose(avg, expected, rtol=1e-9, atol=1e-300)
    assert s(0) == 0.0  # t = 1 copies


def test_power_schedule_is_plain_data():
    s = make_schedule(sigma_rel=0.1, every=2)
    assert s.name == "power" and s.every == 2
    assert DecaySchedule.from_dict(s.to_dict()) == s
    assert math.isnan(s.half_life) and math.isnan(s.window)
    assert "sigma_rel 0.1" in s.describe()
    # Other schedules keep the saved layout they had before "power" existed.
    assert "sigma_rel" not in make_schedule(0.9).to_dict()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"sigma_rel": 0.1, "decay": 0.9}, "exactly one"), ({"sigma_rel": 0.1, "warmup": "timm"}, "warmup"),
     ({"sigma_rel": 0.0}, "> 0"), ({"sigma_rel": 0.5}, "wider")],
)
def test_power_schedule_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_schedule(**kwargs)


def test_saved_power_schedule_must_be_consistent():
    data = make_schedule(sigma_rel=0.1).to_dict()
    data["gamma"] = 3.0
    with pytest.raises(ConfigError, match="does not give sigma_rel"):
        DecaySchedule.from_dict(data)


def _snapshots(n: int, every: int = 100) -> tuple[np.ndarray, np.ndarray]:
    ts = np.concatenate([np.arange(1, n + 1) * every] * 2).astype(float)
    gs = np.array([power_gamma(0.05)] * n + [power_gamma(0.10)] * n)
    return ts, gs


def test_a_tracked_profile_at_its_own_snapshot_is_that_snapshot():
    ts, gs = _snapshots(20)
    fit = solve_coefficients(ts, gs, 2000.0, 0.10)
    expected = np.zeros(40)
    expected[-1] = 1.0  # the σ_rel 0.10 snapshot at t = 2000
    np.testing.assert_allclose(fit.coefficients, expected, atol=1e-6)
    assert fit.residual < 1e-6


def test_rebuilt_profile_matches_the_target_on_a_grid():
    """The residual reported is the L2 mismatch of the profiles, checked by quadrature."""
    ts, gs = _snapshots(20)
    fit = solve_coefficients(ts, gs, 2000.0, 0.08)
    g = power_gamma(0.08)
    tau = (np.arange(200_000) + 0.5) * (2000 / 200_000)
    target = (g + 1) * tau**g / 2000 ** (g + 1)
    mix = sum(x * np.where(tau <= t, (gi + 1) * tau**gi / t ** (gi + 1), 0.0)
              for x, t, gi in zip(fit.coefficients, ts, gs))
    rel = math.sqrt(np.sum((mix - target) ** 2) / np.sum(target**2))
    assert fit.residual == pytest.approx(rel, rel=1e-3, abs=1e-7)
    assert fit.residual < 5e-3  # 0.08 lies between 0.05 and 0.10: expressed well
    assert fit.coefficients.sum() == pytest.approx(1.0)


def test_residual_grows_outside_the_tracked_widths():
    ts, gs = _snapshots(20)
    inside = solve_coefficients(ts, gs, 2000.0, 0.07).residual
    narrow = solve_coefficients(ts, gs, 2000.0, 0.01).residual
    wide = solve_coefficients(ts, gs, 2000.0, 0.28).residual
    assert inside < 0.01 < 0.1 < min(narrow, wide)


def test_solve_errors():
    with pytest.raises(ConfigError, match="at least one snapshot"):
        solve_coefficients([], [], 10.0, 0.1)
    with pytest.raises(ConfigError, match="start at 1"):
        solve_coefficients([0.0, 5.0], [1.0, 1.0], 10.0, 0.1)


def test_snapshot_record_round_trip_and_errors():
    rec = SnapshotRecord(sigma_rel=0.05, gamma=power_gamma(0.05), t=300, step=300, count=300, names=("a", "b"),
                         run="abc", every=100, framework="torch")
    assert SnapshotRecord.from_json(rec.to_json(), "f") == rec
    assert snapshot_name(0.05, 300) == "posthoc_sigma0.05_step000000300.safetensors"
    with pytest.raises(FormatError, match="f: corrupt"):
        SnapshotRecord.from_json("{", "f")
    with pytest.raises(FormatError, match="lacks or garbles"):
        SnapshotRecord.from_json('{"sigma_rel": 0.05}', "f")
    with pytest.raises(FormatError, match="newer than this polyak"):
        SnapshotRecord.from_json(rec.to_json().replace('"version": 1', '"version": 99'), "f")
