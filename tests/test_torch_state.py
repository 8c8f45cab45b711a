"""Averager state: exact resume, files, dtype safety."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import polyak  # noqa: E402
from polyak import ConfigError, FormatError, MismatchError  # noqa: E402
from polyak.torch import EMA, SWA  # noqa: E402


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


def run(model: torch.nn.Module, opt: torch.optim.Optimizer, avg: object, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        opt.zero_grad()
        model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        opt.step()
        avg.update()  # type: ignore[attr-defined]


@pytest.mark.parametrize("via_file", [False, True])
@pytest.mark.parametrize("kind", ["ema", "swa"])
def test_resume_is_exact(tmp_path: Path, kind: str, via_file: bool) -> None:
    def build(model: torch.nn.Module) -> EMA | SWA:
        if kind == "ema":
            return EMA(model, decay=0.9, warmup="timm", every=2, start=3)
        return SWA(model, weighting="linear", start=2)

    straight = make_model()
    opt = torch.optim.SGD(straight.parameters(), lr=0.05)
    ref = build(straight)
    run(straight, opt, ref, range(20))

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = build(model)
    run(model, opt, first, range(10))
    if via_file:
        path = first.save(tmp_path / "avg.safetensors")
        assert path is not None
        second = type(first).load(path, model)
    else:
        torch.save({"avg": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
        saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        second = EMA(model, decay=0.5) if kind == "ema" else SWA(model)
        second.load_state_dict(saved["avg"])
    run(model, opt, second, range(10, 20))
    assert (second.state.step, second.state.count) == (ref.state.step, ref.state.count)
    for name, t in ref.state.tensors.items():
        torch.testing.assert_close(second.state.tensors[name], t, rtol=0, atol=0)


def test_saved_file_is_inspectable_and_averageable(tmp_path: Path) -> None:
    m = make_model()
    ema = EMA(m, half_life=10)
    ema.update()
    a = ema.save(tmp_path / "ema_1.safetensors")
    ema.update()
    b = ema.save(tmp_path / "ema_2.safetensors")
    ins = polyak.inspect(a)
    record = json.loads(ins.metadata["polyak_averager"])
    assert record["kind"] == "ema" and record["config"]["schedule"]["name"] == "half_life"
    out = polyak.average([a, b])
    assert set(out) == set(ema.state.tensors)
    proc = subprocess.run([sys.executable, "-m", "polyak", "inspect", str(a)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(ConfigError, match=f"^averagers are saved as .safetensors files, got {re.escape(str(tmp_path / 'ema.pt'))}; "
                       "for torch.save use state_dict\\(\\)$"):
        ema.save(tmp_path / "ema.pt")


def test_fp32_average_is_never_downcast_on_load() -> None:
    fp32 = make_model()
    ema = EMA(fp32, decay=0.9)
    with torch.no_grad():
        for p in fp32.parameters():
            p.add_(1e-3)
    ema.update()
    ema.update()
    bf16_model = make_model().to(torch.bfloat16)
    target = EMA(bf16_model, decay=0.9, dtype=torch.bfloat16)
    target.load_state_dict(ema.state_dict())
    for name, t in ema.state.tensors.items():
        assert target.state.tensors[name].dtype == t.dtype
        torch.testing.assert_close(target.state.tensors[name], t, rtol=0, atol=0)
    target.update()  # the plan handles the bf16 model → fp32 average
    assert target.state.tensors["0.weight"].dtype == torch.float32


def test_load_state_dict_reports_mismatches() -> None:
    ema = EMA(make_model(), decay=0.9)
    other = EMA(torch.nn.Sequential(torch.nn.Linear(4, 8)), decay=0.9)
    with pytest.raises(MismatchError, match="missing"):
        ema.load_state_dict(other.state_dict())
    with pytest.raises(ConfigError, match="swa"):
        ema.load_state_dict(SWA(make_model()).state_dict())
    bad = ema.state_dict()
    bad["tensors"] = dict(bad["tensors"], **{"0.weight": torch.zeros(3, 3)})
    with pytest.raises(MismatchError, match="shape"):
        ema.load_state_dict(bad)


def test_compiled_prefix_is_ignored(tmp_path: Path) -> None:
    m = make_model()
    ema = EMA(m, decay=0.9)
    path = ema.save(tmp_path / "ema.safetensors")

    class Compiled(torch.nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    restored = EMA.load(path, Compiled(make_model(1)))  # type: ignore[arg-type]
    assert set(restored.state.tensors) == set(ema.state.tensors)


def test_01_state_dict_still_loads() -> None:
    # A state_dict() as polyak 0.1 wrote it (written out by hand, not by today's code).
    old = {
        "kind": "ema", "step": 7, "count": 5,
        "config": {"start": 2, "every": 1, "include_buffers": True,
                   "schedule": {"name": "constant", "decay": 0.5, "min_decay": 0.0, "warmup_gamma": 1.0,
                                "warmup_power": 2.0 / 3.0, "half_life_steps": None, "every": 1}},
        "tensors": {"weight": torch.full((1, 2), 1.0), "bias": torch.zeros(1)},
    }
    m = torch.nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(3.0)
        m.bias.fill_(1.0)
    ema = EMA(m, decay=0.9, start=0)
    ema.load_state_dict(old)
    assert (ema.schedule.decay, ema.start, ema.every) == (0.5, 2, 1)
    assert (ema.state.step, ema.state.count) == (7, 5)
    ema.update()  # step 8: avg ← 0.5·avg + 0.5·x
    assert ema.state.tensors["weight"].tolist() == [[2.0, 2.0]] and ema.state.tensors["bias"].tolist() == [0.5]
    assert ema.state_dict()["config"] == {**old["config"], "start": 2}  # the same layout back
    with pytest.raises(FormatError, match="has no 'tensors'"):
        ema.load_state_dict({k: v for k, v in old.items() if k != "tensors"})


def test_update_after_loading_wider_averages_updates_them() -> None:
    # The update plan is built for the first averages; a load that replaces them (a float32
    # average into a bfloat16 averager) must not leave it writing into the old ones.
    model = make_model().to(torch.bfloat16)
    target = EMA(model, decay=0.9, dtype=torch.bfloat16)
    target.update()
    target.update()
    saved = {k: v.float() + 0.5 if v.is_floating_point() else v.clone() for k, v in target.state.tensors.items()}
    target.load_state_dict({**target.state_dict(), "tensors": saved})
    target.update()
    for name, t in target.state.tensors.items():
        if t.is_floating_point():
            assert t.dtype == torch.float32
            expected = 0.9 * saved[name] + 0.1 * dict(model.state_dict())[name].float()
            torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-6)
