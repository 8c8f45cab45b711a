"""The Lightning callback: a :class:`polyak.torch.EMA` driven by the ``Trainer``'s hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from .._errors import FormatError
from .._schedules import DecaySchedule
from ..torch import EMA, full_state_dict, load_full_state_dict
from ..torch._dist import refuse_flat_parameters

__all__ = ["CHECKPOINT_KEY", "EMACallback"]

CHECKPOINT_KEY = "state_dict_ema"
"""The top-level key of a Lightning checkpoint that holds the averaged tensors.

The tensors are named as in the LightningModule's ``state_dict`` (timm's checkpoints use
the same key); ``"state_dict"`` keeps the raw weights. ``polyak average last.ckpt --key
state_dict_ema -o ema.safetensors`` extracts them; a callback with ``name=`` uses
``"state_dict_ema_<name>"``.
"""


class EMACallback(pl.Callback):
    """An exponential moving average of a LightningModule's weights, kept by the ``Trainer``.

    The average (a :class:`polyak.torch.EMA`, same options) is created when ``fit`` starts,
    after the strategy has moved the module to its device (and wrapped or sharded it), and
    updated after every *optimizer* step, with the trainer's ``global_step`` as the step:
    under ``accumulate_grad_batches=k`` once per ``k`` batches. Validation and test run on
    the average (swapped in, the raw weights swapped back after; also when they raise), and
    at the end of ``fit`` the module holds the average, as Lightning's own
    ``WeightAveraging`` does (``apply_at_end=False`` keeps the raw weights).

    Checkpoints carry it: the settings and counters in the callback's ``state_dict``, the
    averaged tensors under the top-level key ``"state_dict_ema"`` (names as in the module's
    ``state_dict``; ``polyak average last.ckpt --key state_dict_ema`` extracts them), while
    ``"state_dict"`` keeps the raw weights, so ``fit(ckpt_path=...)`` continues exactly as
    if never stopped. Under DDP every rank keeps the same average (no communication); under
    FSDP2 (``ModelParallelStrategy``) each rank keeps the average of its own shards, gathered
    one tensor at a time into rank 0's checkpoint and split again on resume.

    With ``decay=d`` and the defaults it equals
    ``lightning.pytorch.callbacks.EMAWeightAveraging(decay=d)`` (tested to 1e-6); the
    options that match its ``update_every_n_steps=k`` and ``update_starting_at_step=s`` are
    ``every=k, start=1`` and ``start=s + 1`` (its steps are counted from 0, ours from 1).

    Args:
        decay: The decay once warm, in ``[0, 1)``. Give this, ``half_life``, ``sigma_rel``
            or ``schedule``.
        half_life: Optimizer steps after which an update's weight has halved.
        sigma_rel: A power-function EMA of this width relative to the run so far
            (``polyak.make_schedule(sigma_rel=...)``; 0.05, 0.10 in EDM2).
        warmup: ``None``, ``"timm"`` or ``"tf"`` (see :class:`polyak.torch.EMA`).
        min_decay: Lower clamp of the timm warmup.
        warmup_gamma: ``γ`` of the timm warmup.
        warmup_power: ``p`` of the timm warmup.
        every: Average every ``every``-th optimizer step (default 1).
        start: First averaged optimizer step; before it the average follows the weights.
        include_buffers: Average floating buffers (True) or copy them (False).
        dtype: Accumulator dtype (default: float32 for bf16/fp16 weights, else theirs).
        device: Keep the average on this device (e.g. ``"cpu"`` for a large GPU model).
        schedule: A ready :class:`polyak.DecaySchedule` instead of the decay options.
        eval_with_ema: Validate and test on the average (default True).
        apply_at_end: Leave the average in the module when ``fit`` ends (default True).
        name: Tells two EMA callbacks of one Trainer apart (their ``state_key`` and
            checkpoint key ``"state_dict_ema_<name>"``).

    Attributes:
        ema: The average, a :class:`polyak.torch.EMA` (``None`` until ``fit`` starts, or
            a checkpoint is loaded for testing).

    Raises:
        ConfigError: An invalid option (at construction), or a module sharded by FSDP1 or
            DeepSpeed ZeRO-3, whose flattened parameters do not keep their names (at
            ``fit``; use FSDP2 through ``ModelParallelStrategy``).

    Example:
        >>> from polyak.lightning import EMACallback
        >>> cb = EMACallback(decay=0.999)
        >>> cb.state_key, round(cb.schedule.half_life)
        ('EMACallback', 693)
    """

    def __init__(
        self,
        decay: float | None = None,
        *,
        half_life: float | None = None,
        sigma_rel: float | None = None,
        warmup: str | None = None,
        min_decay: float = 0.0,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2.0 / 3.0,
        every: int | None = None,
        start: int = 0,
        include_buffers: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        schedule: DecaySchedule | None = None,
        eval_with_ema: bool = True,
        apply_at_end: bool = True,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self._options = EMA.options(decay=decay, half_life=half_life, sigma_rel=sigma_rel, warmup=warmup,
                                    min_decay=min_decay, warmup_gamma=warmup_gamma, warmup_power=warmup_power,
                                    every=every, start=start,
                                    include_buffers=include_buffers, dtype=dtype, device=device, schedule=schedule)
        self.eval_with_ema = bool(eval_with_ema)
        self.apply_at_end = bool(apply_at_end)
        self.name = name
        self.ema: EMA | None = None
        self._record: dict[str, Any] | None = None  # from load_state_dict, until applied
        self._tensors: Mapping[str, Any] | None = None  # from on_load_checkpoint, until applied
        self._accepting = False  # the averager of the running stage exists: load into it now
        self._swap: contextlib.ExitStack | None = None

    # -- identity ------------------------------------------------------------------------
    @property
    def schedule(self) -> DecaySchedule:
        """The decay schedule (the loaded one once a checkpoint is restored)."""
        return self.ema.schedule if self.ema is not None else self._options["schedule"]

    @property
    def state_key(self) -> str:
        """The key of the callback's state in a checkpoint's ``"callbacks"`` (``"EMACallback"``,
        with the ``name`` when one is given)."""
        return "EMACallback" if self.name is None else self._generate_state_key(name=self.name)

    @property
    def checkpoint_key(self) -> str:
        """The top-level checkpoint key of the averaged tensors."""
        return CHECKPOINT_KEY if self.name is None else f"{CHECKPOINT_KEY}_{self.name}"

    # -- the averager ----------------------------------------------------------------------
    def _create(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        wrapper = trainer.strategy.model
        refuse_flat_parameters(pl_module, *([wrapper] if wrapper is not None else []), where="polyak.lightning.EMACallback")
        self.ema = EMA(pl_module, **self._options)
        self._accepting = True
        self._apply_loaded()

    def _apply_loaded(self) -> None:
        if self.ema is None or not self._accepting or self._record is None or self._tensors is None:
            return
        load_full_state_dict(self.ema, {**self._record, "tensors": self._tensors})
        self._record = self._tensors = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._accepting = False  # a checkpoint restored for this stage replaces the last one
        self._record = self._tensors = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._create(trainer, pl_module)
        if trainer.ckpt_path is not None and not trainer.strategy.restore_checkpoint_after_setup:
            self._warn_if_not_restored(trainer)

    def _warn_if_not_restored(self, trainer: pl.Trainer) -> None:
        if self._record is None and self._tensors is None and self.ema is not None and self.ema.state.step == 0:
            rank_zero_warn(f"{self.state_key}: the checkpoint {trainer.ckpt_path} holds no EMA state (no callback state "
                           f"{self.state_key!r}, no {self.checkpoint_key!r}); the average starts from its weights")
        elif (self._record is None) != (self._tensors is None):
            missing = f"callback state {self.state_key!r}" if self._record is None else repr(self.checkpoint_key)
            raise FormatError(f"{trainer.ckpt_path}: the EMA state is incomplete: no {missing}; was it saved by an "
                              "EMACallback with another name=?")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resumed without an EMA state: the average starts from the restored weights at the
        # resumed step, so the steps before it do not count as updates (warmups start here).
        if self.ema is not None and self.ema.state.step == self.ema.state.count == 0 and trainer.global_step > 0:
            self.ema.state.step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps: under gradient accumulation it moves only on
        # the batches that ended with a step.
        if self.ema is not None and trainer.global_step > self.ema.state.step:
            self.ema.update(step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is not None and self.apply_at_end:
            self.ema.copy_to(pl_module)

    # -- evaluating on the average -----------------------------------------------------------
    def _swap_in(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.eval_with_ema or self._swap is not None:
            return
        if self._record is not None and self._tensors is not None:
            self._create(trainer, pl_module)  # validate/test(ckpt_path=...): the checkpoint's average
        if self.ema is None:
            return
        stack = contextlib.ExitStack()
        stack.enter_context(self.ema.average_parameters(pl_module))
        self._swap = stack

    def _swap_out(self) -> None:
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._swap_out()

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The settings and counters (``kind``, ``step``, ``count``, ``config``); the tensors
        go to the checkpoint's ``"state_dict_ema"`` (:meth:`on_save_checkpoint`)."""
        if self.ema is None:
            return dict(self._record or {})
        return {k: v for k, v in self.ema.state_dict().items() if k != "tensors"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._record = dict(state_dict)
        self._apply_loaded()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            # Called on every rank: gathering sharded tensors is a collective.
            checkpoint[self.checkpoint_key] = full_state_dict(self.ema)["tensors"]

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        tensors = checkpoint.get(self.checkpoint_key)
        if tensors is not None:
            self._tensors = tensors
            self._apply_loaded()

    def __repr__(self) -> str:
        return f"EMACallback({self.schedule.describe()}; {self.ema!r})"
