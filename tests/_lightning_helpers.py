"""A tiny LightningModule and Trainer settings shared by the Lightning tests (in-process and DDP)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

N, BATCH, IN, OUT = 24, 4, 5, 3  # 6 optimizer steps per epoch at batch 4

#: Lightning 2.6 with torch 2.13 warns about torch's pytree API (not our code); the
#: single-worker DataLoader hint is not a problem of a 24-row dataset.
LIGHTNING_NOISE = [
    "ignore:.*isinstance\\(treespec, LeafSpec\\).*:FutureWarning",
    "ignore:.*does not have many workers.*",
    "ignore:.*The number of training batches.*is smaller than the logging interval.*",
    "ignore:You defined a `validation_step` but have no `val_dataloader`.*",
]


class Net(pl.LightningModule):
    """``self.model`` holds the network (so checkpoint names start with ``model.``)."""

    def __init__(self, *, bn: bool = False, lr: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()  # plain values: the .ckpt still loads with weights_only=True
        torch.manual_seed(seed)
        mid: list[torch.nn.Module] = [torch.nn.BatchNorm1d(8)] if bn else []
        self.model = torch.nn.Sequential(torch.nn.Linear(IN, 8), *mid, torch.nn.Tanh(), torch.nn.Linear(8, OUT))
        self.lr = lr
        self.seen_in_validation: list[dict[str, torch.Tensor]] = []
        self.seen_in_test: list[dict[str, torch.Tensor]] = []
        self.fail_in_validation_at: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.model(x), y)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen_in_validation.append(self._snapshot())
            if self.fail_in_validation_at == len(self.seen_in_validation):
                raise RuntimeError("validation failed on purpose")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            self.seen_in_test.append(self._snapshot())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def data(batch: int = BATCH, n: int = N, *, like_ddp: bool = False) -> torch.utils.data.DataLoader:
    """Fixed rows in a fixed order; ``like_ddp``: in the order Lightning's DDP takes them.

    Under DDP Lightning gives the training loader a ``DistributedSampler(shuffle=True,
    seed=0)``: epoch e is ``randperm(n)`` seeded ``e`` with rank r taking every other row,
    so the rows of step k on 2 ranks with batch b are rows ``2bk .. 2b(k+1)`` of that
    permutation: one process with batch 2b and the same sampler on 1 replica sees them too.
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, IN, generator=g)
    y = torch.tanh(x @ torch.randn(IN, OUT, generator=g)) + 0.1 * torch.randn(n, OUT, generator=g)
    ds = torch.utils.data.TensorDataset(x, y)
    if like_ddp:
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
        return torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False)


def trainer(root: Any, callbacks: list[Any], **kw: Any) -> pl.Trainer:
    opts: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "logger": False,
                            "enable_progress_bar": False, "enable_model_summary": False,
                            "enable_checkpointing": False, "num_sanity_val_steps": 0,
                            "deterministic": True, "default_root_dir": str(root)}
    opts.update(kw)
    return pl.Trainer(callbacks=callbacks, **opts)


class Probe(pl.Callback):
    """Records the raw weights after every optimizer step (put it before the EMA callback)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []
        self._last = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step > self._last:
            self._last = trainer.global_step
            self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
