"""Run by tests/test_torch_distributed.py under torchrun (2 CPU ranks, gloo): DDP then FSDP2.

Each rank trains the same small model on its half of a fixed batch, follows it with an EMA
and writes what the test compares: the DDP average of every rank, the file rank 0 saved,
the FSDP2 export, a sharded (DCP) save and the export after resuming from it.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from polyak import ConfigError
from polyak.torch import EMA, PostHocEMA, export, load_sharded, save_sharded

STEPS, DECAY, LR = 5, 0.8, 0.1


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, 8, 5, generator=g), torch.randn(STEPS, 8, 3, generator=g)


def train(model, ema, rank, world):
    xs, ys = data()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in zip(xs, ys):
        n = x.shape[0] // world
        xb, yb = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xb), yb).backward()
        opt.step()
        ema.update()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}
    # DDP: the same averager class on the wrapped module; no communication of its own.
    ddp = torch.nn.parallel.DistributedDataParallel(make_model())
    ema = EMA(ddp, decay=DECAY)
    train(ddp, ema, rank, world)
    torch.save({k: v.clone() for k, v in ema.state.tensors.items()}, out / f"ddp_rank{rank}.pt")
    saved = ema.save(out / "ddp_ema.safetensors")
    report["ddp_saved"] = None if saved is None else str(saved)
    dist.barrier()

    # FSDP2: parameters become DTensors sharded on dim 0 (7 rows: uneven shards).
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0])
    fully_shard(model)
    ema = EMA(model, decay=DECAY)
    report["local_shapes"] = {k: list(v.shape) for k, v in ema.state.tensors.items()}
    train(model, ema, rank, world)
    from polyak.torch._common import local_tensor

    with ema.average_parameters(model):
        report["swapped"] = all(
            torch.equal(local_tensor(p), ema.state.tensors[n]) for n, p in model.named_parameters()
        )
    try:  # a file of rank 0's shards would be silently wrong: refused
        ema.save(out / "wrong.safetensors")
    except ConfigError:
        report["save_refused"] = True
    export(ema, out / "fsdp_ema.safetensors")
    save_sharded(ema, out / "fsdp_state")
    # Resume on the same world size from the sharded save.
    again = make_model()
    fully_shard(again[0])
    fully_shard(again)
    resumed = EMA(again, decay=0.5)
    load_sharded(resumed, out / "fsdp_state")
    report["resumed_count"] = resumed.state.count
    export(resumed, out / "fsdp_resumed.safetensors")

    # PostHocEMA: under DDP rank 0 writes the snapshots; under FSDP2 each snapshot is
    # gathered through export, and a run resumes from the folder on the shards.
    ddp = torch.nn.parallel.DistributedDataParallel(make_model())
    train(ddp, PostHocEMA(ddp, out / "posthoc_ddp", every=2), rank, world)
    dist.barrier()
    model = make_model()
    fully_shard(model[0])
    fully_shard(model)
    train(model, PostHocEMA(model, out / "posthoc_fsdp", every=2), rank, world)
    dist.barrier()
    again = make_model()
    fully_shard(again[0])
    fully_shard(again)
    resumed_ph = PostHocEMA(again, out / "posthoc_fsdp", every=2, resume=True)
    report["posthoc_resumed"] = [resumed_ph.count, list(resumed_ph.ema(0.05).state.tensors["0.weight"].shape)]
    export(resumed_ph.ema(0.05), out / "posthoc_resumed.safetensors")
    (out / f"report{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
