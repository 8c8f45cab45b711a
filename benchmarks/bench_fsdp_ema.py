"""EMA on FSDP2 shards (2 CPU ranks, gloo): update time and averager memory per rank.

Launches itself under ``torchrun --nproc_per_node 2``. Each rank shards an MLP with
``fully_shard`` and measures, in the same run:

* ``polyak.torch.EMA.update()`` against the bare kernel it must match,
  ``torch._foreach_lerp_`` over float32 copies of the rank's local shards (target ≤ 1.1×);
* the averager's memory (bytes of its stored tensors) against the rank's parameter shard
  (target ≤ 1.05×, bf16 parameters: ≤ 2.1× since the average is kept in float32).

Run: ``.venv/bin/python benchmarks/bench_fsdp_ema.py`` (``--quick``: a smaller model).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rank_main(width: int, layers: int, reps: int) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from polyak.torch import EMA
    from polyak.torch._common import local_tensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(dtype)
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        ema = EMA(model, decay=0.999)
        shards = [local_tensor(p) for p in model.parameters()]
        shard_bytes = sum(t.numel() * t.element_size() for t in shards)
        avg_bytes = sum(t.numel() * t.element_size() for t in ema.state.tensors.values())
        ema.update()
        ema.update()
        t0 = time.perf_counter()
        for _ in range(reps):
            ema.update()
        polyak_s = (time.perf_counter() - t0) / reps
        bare = [t.detach().float().clone() for t in shards]
        if dtype == torch.float32:
            src = shards
            t0 = time.perf_counter()
            for _ in range(reps):
                torch._foreach_lerp_(bare, src, 0.001)
        else:  # the bare kernel must widen bf16 too: copy into float32 staging, then lerp
            stage = [torch.empty_like(b) for b in bare]
            t0 = time.perf_counter()
            for _ in range(reps):
                torch._foreach_copy_(stage, shards)
                torch._foreach_lerp_(bare, stage, 0.001)
        bare_s = (time.perf_counter() - t0) / reps
        line = (
            f"rank {rank} {str(dtype).removeprefix('torch.')}: shard {shard_bytes / 1e6:.1f} MB, averager "
            f"{avg_bytes / 1e6:.1f} MB ({avg_bytes / shard_bytes:.2f}x); update {polyak_s * 1e3:.2f} ms vs "
            f"bare foreach {bare_s * 1e3:.2f} ms ({polyak_s / bare_s:.2f}x)"
        )
        for r in range(dist.get_world_size()):
            if r == rank:
                print(line, flush=True)
            dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a 4 x 256 MLP, few repeats")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.reps = 256, 4, 5
    if args.rank_worker:
        _rank_main(args.width, args.layers, args.reps)
        return 0
    try:
        import torch.distributed  # noqa: F401
    except ImportError:
        print("torch is not installed: skipped")
        return 0
    params = args.layers * (args.width * args.width + args.width)
    print(f"model: {args.layers} x Linear({args.width}, {args.width}) = {params / 1e6:.1f} M parameters, 2 ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
        "--rank-worker", "--width", str(args.width), "--layers", str(args.layers), "--reps", str(args.reps),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    print(r.stdout, end="")
    if r.returncode:
        print(r.stderr[-3000:])
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
