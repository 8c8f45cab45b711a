"""EMA / SWA averagers: closed forms, AveragedModel cross-checks, schedules, dtypes."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

from polyak import ConfigError, MismatchError  # noqa: E402
from polyak.torch import EMA, SWA  # noqa: E402


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return m.to(dtype)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g).to(next(model.parameters()).dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x).float(), y).backward()
    opt.step()


def set_all(model: torch.nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def test_ema_of_constant_is_the_constant() -> None:
    m = make_model()
    set_all(m, 0.25)
    ema = EMA(m, decay=0.9)
    for _ in range(7):
        ema.update()
    for name, p in m.named_parameters():
        torch.testing.assert_close(ema.state.tensors[name], p.detach(), rtol=0, atol=1e-7)


def test_k_step_closed_form() -> None:
    m = torch.nn.Linear(3, 2)
    d = 0.8
    ema = EMA(m, decay=d)
    xs = []
    for i in range(6):
        set_all(m, float(i) ** 1.5 - 2.0)
        xs.append(m.weight.detach().double().clone())
        ema.update()
    # First update copies x_0; then avg_k = d^k x_0 + (1-d) Σ_{i=1..k} d^(k-i) x_i.
    k = len(xs) - 1
    expected = d**k * xs[0] + (1 - d) * sum(d ** (k - i) * xs[i] for i in range(1, k + 1))
    torch.testing.assert_close(ema.state.tensors["weight"].double(), expected, rtol=1e-6, atol=1e-6)
    assert ema.state.count == 6 and ema.state.step == 6


def test_matches_averaged_model_step_for_step() -> None:
    m = make_model(1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    ref = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.95), use_buffers=True)
    ema = EMA(m, decay=0.95)
    for step in range(12):
        train_step(m, opt, step)
        ref.update_parameters(m)
        ema.update()
        ref_state = {k.removeprefix("module."): v for k, v in ref.state_dict().items() if k != "n_averaged"}
        for name, mine in ema.state.tensors.items():
            if mine.is_floating_point():  # AveragedModel truncates integer buffers
                torch.testing.assert_close(mine, ref_state[name], rtol=0, atol=0)
    assert int(ema.state.tensors["1.num_batches_tracked"]) == 12


def test_swa_matches_averaged_model_and_equal_mean() -> None:
    m = make_model(2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ref = AveragedModel(m)
    swa = SWA(m)
    snaps = []
    for step in range(9):
        train_step(m, opt, step)
        ref.update_parameters(m)
        swa.update()
        snaps.append(m[0].weight.detach().double().clone())
    # AveragedModel rounds its weight 1/(n+1) to float32; polyak uses the exact double.
    torch.testing.assert_close(swa.state.tensors["0.weight"], ref.module[0].weight.detach(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(swa.state.tensors["0.weight"].double(), torch.stack(snaps).mean(0), rtol=1e-6, atol=1e-7)


def test_swa_linear_matches_numpy_average_and_offline_linear() -> None:
    import polyak

    m = torch.nn.Linear(5, 4)
    swa = SWA(m, weighting="linear", start=3, every=2)
    snaps = []
    for step in range(1, 16):
        with torch.no_grad():
            m.weight.copy_(torch.randn(4, 5, generator=torch.Generator().manual_seed(step)))
        swa.update()
        if step >= 3 and (step - 3) % 2 == 0:
            snaps.append(m.weight.detach().numpy().copy())
    n = len(snaps)
    expected = np.average(np.stack(snaps), axis=0, weights=np.arange(1, n + 1))
    np.testing.assert_allclose(swa.state.tensors["weight"].numpy(), expected, rtol=1e-5, atol=1e-6)
    offline = polyak.average([{"weight": s} for s in snaps], scheme="linear")["weight"]
    np.testing.assert_allclose(swa.state.tensors["weight"].numpy(), offline, rtol=1e-5, atol=1e-6)


def test_start_and_every() -> None:
    m = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(m, decay=0.5, start=3, every=2)
    values = {}
    for step in range(1, 9):
        set_all(m, float(step))
        ema.update()
        values[step] = float(ema.state.tensors["weight"])
    # steps 1, 2 copy; 3 is the first averaged update (copy); 5, 7 average; 4, 6, 8 skipped.
    assert values[1] == 1.0 and values[2] == 2.0 and values[3] == 3.0 and values[4] == 3.0
    assert values[5] == 0.5 * 3 + 0.5 * 5 and values[6] == values[5]
    assert values[7] == 0.5 * values[5] + 0.5 * 7
    assert ema.state.count == 3


@pytest.mark.parametrize("warmup", ["timm", "tf"])
def test_warmup_closed_forms(warmup: str) -> None:
    m = torch.nn.Linear(1, 1, bias=False)
    kw = {"warmup_gamma": 2.0, "warmup_power": 0.75, "min_decay": 0.1} if warmup == "timm" else {}
    ema = EMA(m, decay=0.99, warmup=warmup, **kw)
    avg = 0.0
    for n in range(40):
        if warmup == "timm":
            d = min(max(1 - (1 + n / 2.0) ** -0.75, 0.1), 0.99) if n else 0.0
        else:
            d = min(0.99, (1 + n) / (10 + n)) if n else 0.0
        assert ema.decay == pytest.approx(d, abs=1e-15)
        x = float(np.sin(n))
        set_all(m, x)
        ema.update()
        avg = d * avg + (1 - d) * x
        assert float(ema.state.tensors["weight"]) == pytest.approx(avg, abs=1e-6)


def test_half_life_window_describe() -> None:
    ema = EMA(torch.nn.Linear(1, 1), half_life=100)
    assert ema.half_life == pytest.approx(100)
    assert ema.decay == 0.0  # the first update copies
    assert ema.schedule.decay == pytest.approx(0.5 ** (1 / 100))
    assert ema.window == pytest.approx(1 / (1 - 0.5 ** (1 / 100)))
    assert "half-life 100 steps" in ema.describe()


def test_bf16_model_fp32_average_moves() -> None:
    m = torch.nn.Linear(8, 8).to(torch.bfloat16)
    set_all(m, 1.0)
    ema = EMA(m, decay=0.9999)
    bf16 = EMA(m, decay=0.9999, dtype=torch.bfloat16)
    assert ema.state.tensors["weight"].dtype == torch.float32
    ema.update()
    bf16.update()
    set_all(m, 2.0)
    for _ in range(100):
        ema.update()
        bf16.update()
    expected = 2.0 - 0.9999**100  # avg = 1·d^100 + 2·(1 − d^100)
    assert float(ema.state.tensors["weight"][0, 0]) == pytest.approx(expected, abs=1e-5)
    assert float(bf16.state.tensors["weight"][0, 0]) == 1.0  # a bf16 average never moves
    out = torch.nn.Linear(8, 8).to(torch.bfloat16)
    ema.copy_to(out)
    assert out.weight.dtype == torch.bfloat16


def test_include_buffers_false_copies_float_buffers() -> None:
    m = make_model(3)
    ema = EMA(m, decay=0.5, include_buffers=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for step in range(3):
        train_step(m, opt, step)
        ema.update()
    torch.testing.assert_close(ema.state.tensors["1.running_mean"], m[1].running_mean, rtol=0, atol=0)
    assert not torch.equal(ema.state.tensors["0.weight"], m[0].weight.detach())


def test_average_parameters_swaps_and_restores_after_exception() -> None:
    m = make_model(4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    ema = EMA(m, decay=0.9)
    for step in range(4):
        train_step(m, opt, step)
        ema.update()
    raw = copy.deepcopy(m.state_dict())
    params = list(m.parameters())
    with pytest.raises(RuntimeError, match="boom"), ema.average_parameters(m):
        torch.testing.assert_close(m[0].weight.detach(), ema.state.tensors["0.weight"])
        raise RuntimeError("boom")
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, raw[k], rtol=0, atol=0)
    assert all(a is b for a, b in zip(params, m.parameters(), strict=True))
    with torch.no_grad(), ema.average_parameters():
        pass
    train_step(m, opt, 99)  # the optimizer still drives the same parameters


def test_wrapped_module_names_match() -> None:
    m = make_model(5)
    ema = EMA(m, decay=0.9)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.module = inner

    wrapped = Wrapper(copy.deepcopy(m))
    ema.update(wrapped)
    ema.copy_to(wrapped)
    assert "0.weight" in ema.state.tensors
    with pytest.raises(MismatchError, match="missing"):
        ema.update(torch.nn.Linear(4, 8))


def test_step_that_jumps_over_a_due_step_averages_in_its_place() -> None:
    m = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(m, decay=0.5, start=2, every=4)  # due steps 2, 6, 10, ...
    values = {}
    for step in (1, 3, 5, 7, 8, 12):
        set_all(m, float(step))
        ema.update(step=step)
        values[step] = float(ema.state.tensors["weight"])
    # 1 copies (before start); 3 stands in for 2 (the first averaged update: a copy);
    # nothing is due in (3, 5] or (7, 8]; 7 stands in for 6, 12 for 10.
    assert values == {1: 1.0, 3: 3.0, 5: 3.0, 7: 0.5 * 3 + 0.5 * 7, 8: 5.0, 12: 0.5 * 5 + 0.5 * 12}
    assert (ema.state.step, ema.state.count) == (12, 3)


def test_invalid_options() -> None:
    m = torch.nn.Linear(1, 1)
    with pytest.raises(ConfigError, match="give exactly one of decay=, half_life= or sigma_rel="):
        EMA(m)
    with pytest.raises(ConfigError, match=r"decay must be in \[0, 1\), got 1.0"):
        EMA(m, decay=1.0)
    with pytest.raises(ConfigError, match="weighting must be one of"):
        SWA(m, weighting="cubic")
    with pytest.raises(ConfigError, match="every must be a whole number"):
        EMA(m, decay=0.9, every=0)
    with pytest.raises(ConfigError, match="start must be a whole number ≥ 0, got -1"):
        SWA(m, start=-1)


def test_staged_chunks_match_direct_lerp(monkeypatch: pytest.MonkeyPatch) -> None:
    from polyak import _online_torch as _torch_plan

    monkeypatch.setattr(_torch_plan, "STAGE_ELEMENTS_CPU", 40)  # many small chunks
    m = make_model(6, torch.bfloat16)
    staged = EMA(m, decay=0.7, warmup="tf")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    reference = {k: v.float().clone() for k, v in staged.state.tensors.items() if v.is_floating_point()}
    for step in range(5):
        train_step(m, opt, step)
        d = staged.decay
        staged.update()
        current = {k: v.detach().float() for k, v in m.state_dict().items()}
        for k in reference:
            reference[k] = current[k].clone() if step == 0 else torch.lerp(reference[k], current[k], 1 - d)
    assert len(staged._core.ops._plan.groups[0].chunks) >= 3  # type: ignore[union-attr]
    for k, v in reference.items():
        torch.testing.assert_close(staged.state.tensors[k], v, rtol=0, atol=0)


def test_plan_follows_module_to() -> None:
    m = make_model(7)
    ema = EMA(m, decay=0.5)
    ema.update()
    m.double()  # same Parameter objects, new dtype; buffers replaced
    set_all(m, 1.0)
    with torch.no_grad():
        m[1].running_mean.fill_(2.0)
    ema.update()
    assert ema.state.tensors["0.weight"].dtype == torch.float32
    torch.testing.assert_close(ema.state.tensors["1.running_mean"], torch.full((8,), 1.0))  # (0 + 2) / 2
    assert int(ema.state.tensors["1.num_batches_tracked"]) == 0


def test_options_are_checked_early_and_build_the_same_averager() -> None:
    from polyak import make_schedule
    from polyak.torch import full_state_dict, load_full_state_dict

    with pytest.raises(ConfigError, match="every=3 differs from the schedule's every=1"):
        EMA.options(schedule=make_schedule(0.9), every=3)
    opts = EMA.options(half_life=20, every=2, start=3, include_buffers=False)
    m = make_model(4)
    a, b = EMA(m, **opts), EMA(m, half_life=20, every=2, start=3, include_buffers=False)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for step in range(9):
        train_step(m, opt, step)
        a.update()
        b.update()
    assert a.state_dict()["config"] == b.state_dict()["config"]
    assert all(torch.equal(a.state.tensors[k], v) for k, v in b.state.tensors.items())
    # one process: the "full" state is the state, and loads back exactly
    c = EMA(make_model(5), decay=0.1)
    load_full_state_dict(c, full_state_dict(a))
    assert c.state.count == a.state.count and c.schedule == a.schedule
    assert all(torch.equal(c.state.tensors[k], v) for k, v in a.state.tensors.items())


def test_names_that_collide_once_wrapper_prefixes_are_removed_are_refused() -> None:
    # "module.w" and "w" are one name to polyak (DataParallel's prefix is ignored): a
    # parameter pair, a buffer pair and a parameter with a buffer, each in the middle.
    for kind, build in [
        ("parameters", lambda m: (m.register_parameter("w", torch.nn.Parameter(torch.ones(1))),
                                  m.module.register_parameter("w", torch.nn.Parameter(torch.ones(1))))),
        ("buffers", lambda m: (m.register_buffer("w", torch.ones(1)), m.module.register_buffer("w", torch.ones(1)))),
        ("buffers", lambda m: (m.register_parameter("w", torch.nn.Parameter(torch.ones(1))),
                               m.module.register_buffer("w", torch.ones(1)))),
    ]:
        model = torch.nn.Sequential()
        model.add_module("first", torch.nn.Linear(1, 1))
        model.add_module("module", torch.nn.Module())
        model.add_module("last", torch.nn.Linear(1, 1))
        build(model)
        with pytest.raises(MismatchError, match=f"^two {kind} are named 'w' once wrapper prefixes are removed$"):
            EMA(model, decay=0.9)
