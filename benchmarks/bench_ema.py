"""One EMA update of a ~100M-parameter model: polyak vs torch._foreach_lerp_ and its peers.

Measured in the same run, interleaved round by round, with 2 threads:

* ``foreach_lerp`` — ``torch._foreach_lerp_`` on ready lists of the same tensors (the bound);
* ``polyak EMA`` — :class:`polyak.torch.EMA` ``update()`` (names, grouping, lerp);
* ``AveragedModel`` — ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``;
* ``torch-ema`` — ``torch_ema.ExponentialMovingAverage.update()`` (if installed);
* ``timm ModelEmaV3`` — the real one, where timm is installed (the GPU machine);
* ``timm-style (reimpl.)`` — timm is not installed here (it needs torchvision); this is our
  own few lines doing what timm's ``ModelEmaV3`` update is documented to do (walk both
  ``state_dict()``s, ``_foreach_lerp_`` the floating entries, copy the rest), not timm's code;
* ``polyak EMA bf16→fp32`` — a bfloat16 model with a float32 average, compared with the
  float32 case.

Usage: ``python benchmarks/bench_ema.py [--quick] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from polyak import _online_torch as _torch_plan
from polyak.torch import EMA

DECAY = 0.999


def make_model(layers: int, width: int, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers))).to(dtype)


class TimmStyleEma:
    """What timm's ModelEmaV3 update does, per its docs (our code, for comparison only)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = copy.deepcopy(model)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float) -> None:
        ema_f, model_f = [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values(), strict=True):
            if e.is_floating_point():
                ema_f.append(e)
                model_f.append(m)
            else:
                e.copy_(m)
        torch._foreach_lerp_(ema_f, model_f, 1.0 - decay)


def build(layers: int, width: int, device: str, explore: bool) -> dict[str, Callable[[], None]]:
    fp32 = make_model(layers, width).to(device)
    bf16 = make_model(layers, width, torch.bfloat16).to(device)
    n = sum(p.numel() for p in fp32.parameters())
    print(f"model: {layers} Linear({width}, {width}) = {n / 1e6:.1f}M parameters, "
          f"{len(list(fp32.parameters()))} tensors; device {device}; threads {torch.get_num_threads()}")
    cur = [p.detach() for p in fp32.parameters()]
    avg = [t.clone() for t in cur]
    ema = EMA(fp32, decay=DECAY)
    ema_bf16 = EMA(bf16, decay=DECAY)
    ref = AveragedModel(fp32, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    timm_like = TimmStyleEma(fp32)
    cases: dict[str, Callable[[], None]] = {
        "foreach_lerp (bound)": lambda: torch._foreach_lerp_(avg, cur, 1.0 - DECAY),
        "polyak EMA": ema.update,
        "AveragedModel": lambda: ref.update_parameters(fp32),
        "timm-style (reimpl.)": lambda: timm_like.update(fp32, DECAY),
        "polyak EMA bf16→fp32": ema_bf16.update,
    }
    try:  # the real timm, where it is installed (not on the development machine)
        from timm.utils.model_ema import ModelEmaV3

        timm_ema = ModelEmaV3(fp32, decay=DECAY)
        cases["timm ModelEmaV3"] = lambda: timm_ema.update(fp32)
    except ImportError:
        pass
    try:
        from torch_ema import ExponentialMovingAverage

        shadow = ExponentialMovingAverage(fp32.parameters(), decay=DECAY, use_num_updates=False)
        cases["torch-ema"] = shadow.update
    except ImportError:
        print("torch-ema not installed: skipped")
    if explore:  # other ways to update a bf16 model's fp32 average, to choose the default
        bf_cur = [p.detach() for p in bf16.parameters()]
        bf_avg = [t.float() for t in bf_cur]
        cases["bf16: mul_+add_ mixed"] = lambda: (torch._foreach_mul_(bf_avg, DECAY),
                                                  torch._foreach_add_(bf_avg, bf_cur, alpha=1.0 - DECAY))
        cases["bf16: .float() temporaries"] = lambda: torch._foreach_lerp_(
            bf_avg, [t.float() for t in bf_cur], 1.0 - DECAY)
        for elems in (1 << 16, 1 << 22, 1 << 30):
            saved = _torch_plan.STAGE_ELEMENTS_CPU, _torch_plan.STAGE_ELEMENTS_ACCEL
            _torch_plan.STAGE_ELEMENTS_CPU = _torch_plan.STAGE_ELEMENTS_ACCEL = elems
            variant = EMA(bf16, decay=DECAY)
            variant.update()  # builds the plan with this chunk size
            _torch_plan.STAGE_ELEMENTS_CPU, _torch_plan.STAGE_ELEMENTS_ACCEL = saved
            cases[f"bf16: staged chunk 2^{elems.bit_length() - 1}"] = variant.update
    for fn in cases.values():  # first updates copy / allocate: not timed
        fn()
        fn()
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 4M-parameter model, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 15, quick 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--explore", action="store_true", help="also time other bf16→fp32 update strategies")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers, width = (16, 512) if args.quick else (100, 1000)
    rounds = args.rounds or (3 if args.quick else 15)
    cases = build(layers, width, args.device, args.explore)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in cases}
    order = list(cases)
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(rounds):
            rng.shuffle(order)  # no case always runs after the same neighbour
            for name in order:
                sync()
                t0 = time.perf_counter()
                cases[name]()
                sync()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    bound = med["foreach_lerp (bound)"]
    print(f"{'case':24} {'median ms':>10} {'vs bound':>9}")
    for name, t in med.items():
        print(f"{name:24} {t * 1e3:10.2f} {t / bound:8.2f}x")
    print(f"polyak EMA / foreach_lerp: {med['polyak EMA'] / bound:.3f} (target ≤ 1.05)")
    print(f"polyak bf16→fp32 / polyak fp32: {med['polyak EMA bf16→fp32'] / med['polyak EMA']:.3f} (target ≤ 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
