"""The Transformers ``Trainer`` callback: a :class:`polyak.torch.EMA` driven by its events."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers

from .._atomic import AtomicFolder, check_folder_output
from .._errors import ConfigError, OutputError
from .._schedules import DecaySchedule
from ..torch import EMA
from ..torch._dist import refuse_flat_parameters

__all__ = ["EMA_FILE", "EMACallback"]

EMA_FILE = "ema.safetensors"
"""The file :class:`EMACallback` writes into every ``checkpoint-N/`` folder the Trainer saves.

It is an :meth:`polyak.torch.EMA.save` file: the averaged tensors (named as in the model's
``state_dict``) with the averager's settings and counters in its metadata, read back on
``train(resume_from_checkpoint=...)``; ``polyak.torch.EMA.load`` restores it, and
``polyak inspect`` and ``polyak average`` read it like any safetensors file.
"""


class EMACallback(transformers.TrainerCallback):
    """An exponential moving average of the model's weights, kept during ``Trainer.train``.

    The average (a :class:`polyak.torch.EMA`, same options) is created when training
    begins, once the ``Trainer`` has placed the model on its device, and updated after
    every optimizer step (``on_step_end``: once per ``gradient_accumulation_steps``
    batches), with ``state.global_step`` as the step.

    * **Checkpoints.** Every ``checkpoint-N/`` folder the Trainer saves gets
      ``ema.safetensors`` (:meth:`polyak.torch.EMA.save`: written to a temporary file,
      fsynced, renamed; rank 0 only). ``train(resume_from_checkpoint=...)`` restores it, so
      a run resumed from ``checkpoint-10`` has at step 20 the same average as a straight
      run. The folder is ``resume_from`` if given, else ``args.resume_from_checkpoint`` (a
      path), else ``<output_dir>/checkpoint-<step>`` (what ``resume_from_checkpoint=True``
      picks); without the file there the average restarts from the restored weights,
      with a warning.
    * **Evaluation** (``eval_with_ema=True``): the evaluations the Trainer runs during
      training (``eval_strategy``) see the average, swapped in after the step that asks
      for one and swapped back when it ends, before the checkpoint is written. For your
      own calls: ``with callback.average_parameters(): trainer.evaluate()``.
    * **The result**: ``final_dir=`` writes the average at the end of training as a
      folder that ``from_pretrained`` opens (:meth:`save_pretrained`); ``apply_at_end=True``
      leaves it in the model (after ``load_best_model_at_end``, which loads raw weights).

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
        device: Keep the average on this device (e.g. ``"cpu"``).
        schedule: A ready :class:`polyak.DecaySchedule` instead of the decay options.
        eval_with_ema: Run the Trainer's evaluations on the average (default False).
        final_dir: Write the final average here as a ``save_pretrained`` folder.
        apply_at_end: Copy the average into the model when training ends (default False).
        resume_from: The checkpoint folder to restore the average from when resuming.

    Attributes:
        ema: The average, a :class:`polyak.torch.EMA` (``None`` until training begins).

    Raises:
        ConfigError: An invalid option (at construction); ``eval_with_ema`` with a dict of
            eval datasets (the Trainer evaluates them one by one with no event between,
            so the later ones would not see the average; evaluate them under
            :meth:`average_parameters` instead).

    Example:
        >>> from polyak.transformers import EMACallback
        >>> cb = EMACallback(decay=0.999, eval_with_ema=True)
        >>> round(cb.schedule.half_life)
        693
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
        eval_with_ema: bool = False,
        final_dir: str | os.PathLike[str] | None = None,
        apply_at_end: bool = False,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
        self._options = EMA.options(decay=decay, half_life=half_life, sigma_rel=sigma_rel, warmup=warmup,
                                    min_decay=min_decay, warmup_gamma=warmup_gamma, warmup_power=warmup_power,
                                    every=every, start=start,
                                    include_buffers=include_buffers, dtype=dtype, device=device, schedule=schedule)
        self.eval_with_ema = bool(eval_with_ema)
        self.final_dir = None if final_dir is None else Path(final_dir)
        self.apply_at_end = bool(apply_at_end)
        self.resume_from = None if resume_from is None else Path(resume_from)
        self.ema: EMA | None = None
        self._model: torch.nn.Module | None = None
        self._processing_class: Any = None
        self._swap: contextlib.ExitStack | None = None

    @property
    def schedule(self) -> DecaySchedule:
        """The decay schedule (the restored one after a resume)."""
        return self.ema.schedule if self.ema is not None else self._options["schedule"]

    # -- training --------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: torch.nn.Module | None = None,
                       processing_class: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ConfigError("the Trainer passed no model to EMACallback.on_train_begin")
        refuse_flat_parameters(model, where="polyak.transformers.EMACallback")
        self._model, self._processing_class = model, processing_class
        self.ema = EMA(model, **self._options)
        if state.global_step > 0:  # resumed: the Trainer restored a checkpoint of that step
            self._restore(args, state)

    def _restore(self, args: Any, state: Any) -> None:
        assert self.ema is not None
        folder = self.resume_from
        if folder is None and isinstance(args.resume_from_checkpoint, str) and os.path.isdir(args.resume_from_checkpoint):
            folder = Path(args.resume_from_checkpoint)
        if folder is None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        path = folder / EMA_FILE
        if not path.is_file():
            warnings.warn(f"resuming at step {state.global_step}, but {path} does not exist: the EMA starts again from "
                          "the restored weights; pass EMACallback(resume_from=<checkpoint folder>) if the checkpoint "
                          "is elsewhere", UserWarning, stacklevel=2)
            self.ema.state.step = state.global_step  # the average starts here: earlier steps are not updates
            return
        self.ema.load_state_dict(path)
        if self.ema.state.step != state.global_step:
            raise ConfigError(f"{path} holds the EMA of step {self.ema.state.step}, but the Trainer resumes at step "
                              f"{state.global_step}; resume from the checkpoint folder it was saved in")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._swap_out()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.ema is None:
            return
        self.ema.update(step=state.global_step)
        if control.should_evaluate:  # the Trainer evaluates right after this event
            self._swap_in()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if control.should_evaluate:
            self._swap_in()

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, Any] | None = None,
                    **kwargs: Any) -> None:
        swapped = self._swap is not None
        self._swap_out()
        if swapped and metrics is not None and "eval_runtime" not in metrics:
            raise ConfigError(
                "EMACallback(eval_with_ema=True) needs one eval dataset: the Trainer evaluates a dict of them one "
                "after the other with no event between, so only the first would see the average; pass one dataset, "
                "or evaluate after training with `with callback.average_parameters(): trainer.evaluate(...)`")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._swap_out()
        if self.ema is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not folder.is_dir():
            raise OutputError(f"the Trainer's checkpoint folder {folder} does not exist; EMACallback writes "
                              f"{EMA_FILE} into <output_dir>/checkpoint-<step> (hyperparameter search runs are not supported)")
        self.ema.save(folder / EMA_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._swap_out()
        if self.ema is None:
            return
        if self.final_dir is not None:
            self.save_pretrained(self.final_dir, force=True)
        if self.apply_at_end:
            self.ema.copy_to(self._model)

    # -- using the average -------------------------------------------------------------------
    def _swap_in(self) -> None:
        if self.eval_with_ema and self.ema is not None and self._swap is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self.ema.average_parameters(self._model))
            self._swap = stack

    def _swap_out(self) -> None:
        if self._swap is not None:
            stack, self._swap = self._swap, None
            stack.close()

    @contextlib.contextmanager
    def average_parameters(self) -> Iterator[torch.nn.Module]:
        """Swap the average into the model for the block (the raw weights come back after).

        Raises:
            ConfigError: There is no average yet (it is created when training begins).
        """
        if self.ema is None:
            raise ConfigError("there is no average yet: EMACallback creates it when Trainer.train() begins")
        with self.ema.average_parameters(self._model) as model:
            yield model

    def save_pretrained(self, path: str | os.PathLike[str], *, force: bool = False, **kwargs: Any) -> Path | None:
        """Write the model with the average swapped in as a folder ``from_pretrained`` opens.

        ``model.save_pretrained`` (and the processing class' ``save_pretrained``, e.g. the
        tokenizer, when the Trainer has one) write into a temporary folder beside ``path``,
        which is fsynced and renamed into place: a crash leaves the old folder or none,
        never half of one. Rank 0 writes; other ranks return ``None``.

        Args:
            path: The folder to create.
            force: Replace an existing folder.
            kwargs: Passed to ``model.save_pretrained`` (e.g. ``max_shard_size``).

        Raises:
            ConfigError: There is no average yet (it is created when training begins).
            OutputError: ``path`` holds files and ``force`` is false, or is a file.
        """
        from ..torch._common import is_writer_rank

        target = Path(path)
        if self.ema is None or self._model is None:
            raise ConfigError("there is no average yet: EMACallback creates it when Trainer.train() begins")
        if not is_writer_rank():
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        check_folder_output(target, force=force)
        with AtomicFolder(target) as folder:
            with self.average_parameters() as model:
                save = getattr(model, "save_pretrained", None)
                if save is None:
                    raise ConfigError(f"{type(model).__name__} has no save_pretrained; use EMA.save() for a safetensors file")
                save(folder.tmp, **kwargs)
            processing = getattr(self._processing_class, "save_pretrained", None)
            if processing is not None:
                processing(folder.tmp)
            return folder.commit()
