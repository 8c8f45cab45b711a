"""Run by tests/test_lightning_distributed.py: polyak.lightning.EMACallback on 2 CPU processes.

``python _lightning_dist_scenario.py OUT`` starts rank 0; Lightning's ``strategy="ddp"``
launches rank 1 by running this script again. In the same two processes:

1. DDP, 2 epochs with validation and a checkpoint per epoch;
2. FSDP2 (``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``): 1 epoch with
   a (distributed) checkpoint, then a new Trainer resumes from it for a second epoch;
3. Lightning's own ``EMAWeightAveraging`` under the same FSDP2 setup (it fails: recorded).

Each rank writes what the test compares with a one-process run of the same data.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
warnings.simplefilter("ignore")  # Lightning's hints about workers, pytree deprecations, ...

from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from _lightning_helpers import Net, data, trainer  # noqa: E402
from polyak.lightning import EMACallback  # noqa: E402
from polyak.torch import export  # noqa: E402

DECAY = 0.7
PER_RANK_BATCH = 4  # the one-process reference uses batch 8: DDP averages the two halves' gradients


class ShardedNet(Net):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.model[0], mesh=mesh)  # Linear(5, 8): rows 4 + 4
        fully_shard(self.model, mesh=mesh)  # Linear(8, 3): rows 2 + 1 (uneven)


def fsdp2() -> ModelParallelStrategy:
    return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)


def main(out: Path) -> None:
    common = {"devices": 2, "deterministic": False, "enable_checkpointing": True}
    report: dict = {}

    # 1. DDP
    cb = EMACallback(decay=DECAY)
    net = Net()
    t = trainer(out / "ddp", [cb, ModelCheckpoint(dirpath=out / "ddp", save_top_k=-1, every_n_epochs=1)],
                strategy="ddp", **common)
    t.fit(net, data(PER_RANK_BATCH), data(PER_RANK_BATCH, n=8))
    rank = t.global_rank
    torch.save({"ema": {k: v.clone() for k, v in cb.ema.state.tensors.items()},
                "module": {k: v.clone() for k, v in net.state_dict().items()},
                "validated_on": net.seen_in_validation[-1]}, out / f"ddp_rank{rank}.pt")
    report["ddp"] = {"world": t.world_size, "step": cb.ema.state.step, "count": cb.ema.state.count}

    # 2. FSDP2: one epoch, checkpoint, resume in a new Trainer for the second
    first = EMACallback(decay=DECAY)
    t = trainer(out / "fsdp", [first, ModelCheckpoint(dirpath=out / "fsdp", save_top_k=-1, every_n_epochs=1)],
                strategy=fsdp2(), max_epochs=1, **common)
    t.fit(ShardedNet(), data(PER_RANK_BATCH), data(PER_RANK_BATCH, n=8))
    report["local_shapes"] = {k: list(v.shape) for k, v in first.ema.state.tensors.items()}
    resumed, net = EMACallback(decay=0.1), ShardedNet()  # settings come from the checkpoint
    t = trainer(out / "fsdp2", [resumed], strategy=fsdp2(), max_epochs=2, **common)
    t.fit(net, data(PER_RANK_BATCH), data(PER_RANK_BATCH, n=8), ckpt_path=out / "fsdp" / "epoch=0-step=3.ckpt")
    ema = resumed.ema.state.tensors
    # the last validation (after the last step) and the module after fit hold this rank's averaged shards
    report["fsdp"] = {"step": resumed.ema.state.step, "count": resumed.ema.state.count,
                      "decay": resumed.schedule.decay,
                      "validated_on_ema": all(torch.equal(v.to_local(), ema[k])
                                              for k, v in net.seen_in_validation[-1].items()),
                      "module_holds_ema": all(torch.equal(v.to_local(), ema[k]) for k, v in net.state_dict().items())}
    export(resumed.ema, out / "fsdp_ema.safetensors")

    # 3. Lightning's own callback with the same sharded model
    try:
        trainer(out / "theirs", [EMAWeightAveraging(decay=DECAY)], strategy=fsdp2(), max_epochs=1, **common).fit(
            ShardedNet(), data(PER_RANK_BATCH))
        report["lightning_fsdp2"] = "ran"
    except Exception as exc:  # what the test documents
        report["lightning_fsdp2"] = f"{type(exc).__name__}: {exc}"
    (out / f"report{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
