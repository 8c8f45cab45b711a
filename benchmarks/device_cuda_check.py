"""A short check on a CUDA machine that the PyTorch averagers work on the GPU and in bf16.

Not part of the test suite (CI has no GPU). Run on a machine with CUDA:

    PYTHONPATH=src python3 benchmarks/device_cuda_check.py [--out results.json]

Checks (each prints PASS/FAIL with the measured error): EMA vs
``torch.optim.swa_utils.AveragedModel(get_ema_multi_avg_fn)`` on CUDA; a bf16 model with
the default float32 average moves where a bf16 average does not; SWA equals the mean;
``average_parameters`` restores the raw weights (also after an exception); exact resume;
``CheckpointSaver`` of a bf16 CUDA model read back by ``polyak.average``; an EMA kept on
the CPU for a CUDA model. Then times one EMA update of a ~100M-parameter model against
``torch._foreach_lerp_`` on the same tensors (CUDA events, median of 50).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import polyak
from polyak.torch import EMA, SWA, CheckpointSaver

results: dict[str, object] = {}


def check(name: str, ok: bool, detail: str) -> None:
    results[name] = {"ok": bool(ok), "detail": detail}
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def mlp(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    return m.to("cuda", dtype)


def train_steps(model: torch.nn.Module, steps: int, callback) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(1)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(32, 16, device="cuda", generator=g, dtype=dtype)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        callback()


def correctness() -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    m = mlp()
    ema = EMA(m, decay=0.9)
    ref = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)

    def both() -> None:
        ema.update()
        ref.update_parameters(m)

    train_steps(m, 30, both)
    with ema.average_parameters(m):
        ours = {k: v.detach().clone() for k, v in m.state_dict().items()}
    theirs = {k.removeprefix("module."): v for k, v in ref.state_dict().items() if k != "n_averaged"}
    err = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours if ours[k].is_floating_point())
    check("ema_vs_averagedmodel_cuda", err < 1e-6, f"max |diff| {err:.2e} after 30 steps (tolerance 1e-6)")

    # bf16 model: a float32 average moves, a bf16 one rounds every increment away
    p = torch.nn.Parameter(torch.ones(1024, device="cuda", dtype=torch.bfloat16))
    holder = torch.nn.Module()
    holder.p = p
    ema32 = EMA(holder, decay=0.9999)
    ema16 = EMA(holder, decay=0.9999, dtype=torch.bfloat16)
    ema32.update()
    ema16.update()
    with torch.no_grad():
        p.fill_(1.0078125)  # the next bf16 value above 1.0
    for _ in range(1000):
        ema32.update()
        ema16.update()
    expected = 1.0 + 0.0078125 * (1 - 0.9999**1000)
    kept32 = next(v for _, v in _tensors(ema32.state_dict()) if v.numel() == 1024)
    kept16 = next(v for _, v in _tensors(ema16.state_dict()) if v.numel() == 1024)
    v32, avg16 = kept32.float().mean().item(), kept16.float().mean().item()
    check("bf16_model_fp32_average_moves",
          kept32.dtype == torch.float32 and abs(v32 - expected) < 5e-5 and avg16 == 1.0,  # float32 rounding of 1e-4-sized steps
          f"float32 average {v32:.6f} (closed form {expected:.6f}); a bf16 average stays {avg16}")

    m = mlp()
    swa = SWA(m)
    snaps: list[dict[str, torch.Tensor]] = []

    def both_swa() -> None:
        swa.update()
        snaps.append({k: v.detach().clone() for k, v in m.named_parameters()})

    train_steps(m, 10, both_swa)
    with swa.average_parameters(m):
        got = {k: v.detach().clone() for k, v in m.named_parameters()}
    err = max((got[k] - torch.stack([s[k] for s in snaps]).mean(0)).abs().max().item() for k in got)
    check("swa_equals_mean_cuda", err < 1e-6, f"max |diff| {err:.2e}")

    raw = {k: v.detach().clone() for k, v in m.state_dict().items()}
    try:
        with swa.average_parameters(m):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    same = all(torch.equal(raw[k], v) for k, v in m.state_dict().items())
    check("swap_restores_after_exception_cuda", same, "raw weights restored bit for bit")

    # exact resume on CUDA: 10 steps + save/load + 10 steps == 20 straight (same data)
    a = mlp()
    ea = EMA(a, decay=0.95, warmup="timm")
    train_steps(a, 20, ea.update)
    c = mlp()
    ec = EMA(c, decay=0.95, warmup="timm")
    calls = [0]

    def maybe_resume() -> None:
        nonlocal ec
        ec.update()
        calls[0] += 1
        if calls[0] == 10:
            saved = ec.state_dict()
            ec = EMA(c, decay=0.95, warmup="timm")
            ec.load_state_dict(saved)

    train_steps(c, 20, maybe_resume)
    with ea.average_parameters(a):
        wa = {k: v.detach().clone() for k, v in a.state_dict().items()}
    with ec.average_parameters(c):
        wc = {k: v.detach().clone() for k, v in c.state_dict().items()}
    same = all(torch.equal(wa[k], wc[k]) for k in wa)
    check("resume_exact_cuda", same, "EMA after 10 + save/load + 10 steps == 20 straight (bit for bit)")

    with tempfile.TemporaryDirectory() as d:
        m = mlp(torch.bfloat16)
        saver = CheckpointSaver(d, every=1, unit="step")
        states: list[dict[str, torch.Tensor]] = []
        step = [0]

        def save() -> None:
            step[0] += 1
            saver.maybe_save(m, step=step[0])
            states.append({k: v.detach().float().cpu() for k, v in m.state_dict().items()})

        train_steps(m, 3, save)
        files = sorted(Path(d).glob("*.safetensors"))
        avg = polyak.average(files, scheme="linear")
        w = polyak.scheme_weights("linear", 3)
        k = "0.weight"
        ref_w = sum(float(wi) * s[k] for wi, s in zip(w, states))
        got_w = torch.from_numpy(avg[k].astype("float32"))
        err = (got_w - ref_w).abs().max().item()
        check("checkpointsaver_bf16_cuda_then_average", len(files) == 3 and str(avg[k].dtype) == "bfloat16" and err < 1e-2,
              f"{len(files)} files, dtype {avg[k].dtype}, max |diff| vs fp32 reference {err:.2e} (bf16 rounding)")

    m = mlp()
    ecpu = EMA(m, decay=0.9, device="cpu")
    train_steps(m, 5, ecpu.update)
    dev = {v.device.type for _, v in _tensors(ecpu.state_dict())}
    check("ema_cpu_copy_of_cuda_model", dev == {"cpu"}, f"average tensors live on {sorted(dev)}")


def _tensors(state: dict) -> list[tuple[str, torch.Tensor]]:
    out = []

    def walk(prefix: str, obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            out.append((prefix, obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", state)
    return [(k, v) for k, v in out if v.is_floating_point() and v.numel() > 1]


def timing(n_params: int, n_tensors: int) -> None:
    per = n_params // n_tensors

    def model(dtype: torch.dtype) -> torch.nn.Module:
        m = torch.nn.Module()
        m.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(per, device="cuda", dtype=dtype)) for _ in range(n_tensors)])
        return m

    def median_ms(fn, reps: int = 50) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        times.sort()
        return times[len(times) // 2]

    m32 = model(torch.float32)
    params = [p.detach() for p in m32.parameters()]
    avgs = [p.clone() for p in params]
    t_bound = median_ms(lambda: torch._foreach_lerp_(avgs, params, 0.001))
    e32 = EMA(m32, decay=0.999)
    e32.update()
    t_ema = median_ms(e32.update)
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    am = AveragedModel(m32, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    am.update_parameters(m32)
    t_am = median_ms(lambda: am.update_parameters(m32))
    m16 = model(torch.bfloat16)
    e16 = EMA(m16, decay=0.999)
    e16.update()
    t_bf16 = median_ms(e16.update)
    gb = n_params * 4 * 3 / 1e9
    results["timing"] = {"params": n_params, "tensors": n_tensors, "foreach_lerp_ms": t_bound, "polyak_ema_ms": t_ema,
                         "averagedmodel_ms": t_am, "polyak_ema_bf16_model_fp32_avg_ms": t_bf16}
    print(f"\n{n_params / 1e6:.0f}M parameters in {n_tensors} tensors on {torch.cuda.get_device_name()} (median of 50, CUDA events)")
    print(f"  torch._foreach_lerp_ (bound)      {t_bound:7.3f} ms  ({gb / (t_bound / 1e3):.0f} GB/s for 3 × 4 B/param)")
    print(f"  polyak EMA.update, fp32           {t_ema:7.3f} ms  = {t_ema / t_bound:.2f}× the bound")
    print(f"  AveragedModel(get_ema_multi_avg)  {t_am:7.3f} ms  = {t_am / t_bound:.2f}× the bound")
    print(f"  polyak EMA.update, bf16 model     {t_bf16:7.3f} ms  = {t_bf16 / t_ema:.2f}× the fp32 case")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="(ignored: needs a GPU anyway)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    correctness()
    timing(int(args.params), args.tensors)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    failed = [k for k, v in results.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"\n{len([v for v in results.values() if isinstance(v, dict) and 'ok' in v]) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
