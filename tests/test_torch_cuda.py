"""The averagers on a CUDA device (skipped without one): foreach groups, staging, CPU copy."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn  # noqa: E402

from polyak.torch import EMA, SWA, CheckpointSaver, load_average, update_bn  # noqa: E402


def make_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    return m.to("cuda", dtype)


def steps(model: torch.nn.Module, n: int, *averagers: object) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dtype = next(model.parameters()).dtype
    for i in range(n):
        g = torch.Generator(device="cuda").manual_seed(i)
        opt.zero_grad()
        model(torch.randn(8, 16, device="cuda", generator=g, dtype=dtype)).float().pow(2).mean().backward()
        opt.step()
        for a in averagers:
            if isinstance(a, AveragedModel):
                a.update_parameters(model)
            else:
                a.update()  # type: ignore[attr-defined]


def test_cuda_ema_matches_averaged_model_and_cpu_copy() -> None:
    m = make_model()
    ref = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    ema = EMA(m, decay=0.9)
    cpu = EMA(m, decay=0.9, device="cpu")
    steps(m, 6, ref, ema, cpu)
    ref_state = {k.removeprefix("module."): v for k, v in ref.state_dict().items()}
    for name, t in ema.state.tensors.items():
        assert t.device.type == "cuda" and cpu.state.tensors[name].device.type == "cpu"
        if t.is_floating_point():
            torch.testing.assert_close(t, ref_state[name], rtol=0, atol=0)
            torch.testing.assert_close(cpu.state.tensors[name], t.cpu(), rtol=1e-6, atol=1e-7)


def test_cuda_bf16_model_fp32_average(tmp_path: Path) -> None:
    m = make_model(torch.bfloat16)
    ema = EMA(m, decay=0.8)
    swa = SWA(m, weighting="linear")
    steps(m, 5, ema, swa)
    assert ema.state.tensors["0.weight"].dtype == torch.float32
    with ema.average_parameters(m):
        torch.testing.assert_close(m[0].weight.float(), ema.state.tensors["0.weight"].bfloat16().float())
    path = ema.save(tmp_path / "ema.safetensors")
    assert path is not None
    again = EMA.load(path, m)
    torch.testing.assert_close(again.state.tensors["0.weight"], ema.state.tensors["0.weight"], rtol=0, atol=0)
    saver = CheckpointSaver(tmp_path / "ck")
    saver.save(m, epoch=1)
    steps(m, 1)
    saver.save(m, epoch=2)
    target = make_model(torch.bfloat16)
    load_average(target, saver.files())
    assert target[0].weight.device.type == "cuda" and target[0].weight.dtype == torch.bfloat16
    update_bn(target, [(torch.randn(8, 16, dtype=torch.bfloat16), None)], device="cuda")
