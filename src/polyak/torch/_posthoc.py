"""``PostHocEMA``: track power-function EMAs during training, choose the EMA width afterwards."""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._errors import ConfigError, FormatError, PolyakWarning, whole_number
from .._posthoc import (
    DEFAULT_SIGMA_RELS,
    SNAPSHOT_KEY,
    SnapshotRecord,
    capture_counters,
    capture_state,
    check_capture_state,
    check_sigma_rels,
    snapshot_due,
    snapshot_name,
)
from ._averagers import read_averager_file
from ._common import is_writer_rank
from ._ema import EMA

__all__ = ["PostHocEMA"]


class PostHocEMA:
    """Power-function EMAs of a module with snapshots on disk, to choose the EMA width after training.

    Keeps one power-function EMA per ``sigma_rels`` entry (each an :class:`EMA` with
    ``sigma_rel=``: the ``t``-th update has decay ``(1 − 1/t)^(γ+1)``, so each average
    always spans the same fraction of the run so far), updated after every optimizer step,
    and every ``every`` updates writes one snapshot file per width into ``folder``. After
    training, :func:`polyak.posthoc` (``polyak posthoc FOLDER --sigma-rel 0.08``) rebuilds
    the EMA of any other width at any snapshot step as a weighted sum of the snapshots, and
    :func:`polyak.posthoc_sweep` (``polyak posthoc FOLDER --sweep ... --eval ...``) chooses
    the width on validation data (Karras et al. 2024, EDM2).

    Snapshots are safetensors files ``posthoc_sigma<σ>_step<step>.safetensors``, written
    crash-safely (temporary file, fsync, rename: a killed run leaves complete files only),
    with the averaged tensors (float32 for bfloat16/float16 models) and a record in their
    metadata (``σ_rel``, ``γ``, ``t``, training step, update count, tensor names, run id).
    Each is also a plain :class:`EMA` state: ``EMA.load(snapshot, model)`` restores it.

    Storage: ``len(sigma_rels)`` model copies (float32) per ``every`` updates, e.g. two
    profiles × 20 snapshots = 40 model copies. Under DDP every rank updates its averages
    and rank 0 writes; under FSDP2 each rank keeps its shards and every snapshot is
    gathered one tensor at a time and written by rank 0 (:func:`polyak.torch.export`, a
    collective: call :meth:`update` on every rank).

    Args:
        module: The model to follow (a DDP/compiled/FSDP2 wrapper works too).
        folder: Where the snapshots go (created if missing). Keep one run per folder.
        sigma_rels: The tracked widths, each in ``(0, 0.2887]`` (default: EDM2's 0.05 and
            0.10). Two or more widths let the rebuild reach the widths between and a
            little beyond them.
        every: Updates between snapshots (also the first snapshot's update).
        resume: Continue the run whose snapshots are in ``folder``: the averages start
            from its newest complete set of snapshots (the training loop must resume from
            the same step); an empty folder starts afresh.
        include_buffers: Average floating buffers (BatchNorm statistics) or copy them.
        dtype: Accumulator dtype of the averages (default: float32 for bfloat16/float16
            tensors, else their own).
        device: Keep the averages on this device (e.g. ``"cpu"``).

    Attributes:
        averagers: The tracked :class:`EMA` of each width, in the order of ``sigma_rels``
            (:meth:`ema` finds one by width).
        run: The id of this run (12 hex digits), recorded in every snapshot; a folder
            holds one run's snapshots.

    Raises:
        ConfigError: An invalid width, ``every`` or EMA option, or a folder that cannot be
            created; with ``resume``, snapshots of another framework or ``every``, or no
            step with a snapshot of every width.
        FormatError: With ``resume``, a snapshot without (or with a corrupt) record, or
            whose averager state disagrees with its record.
        MismatchError: With ``resume``, snapshots of a model with other tensors.

    Example:
        >>> import torch, tempfile, polyak
        >>> from polyak.torch import PostHocEMA
        >>> model = torch.nn.Linear(4, 2)
        >>> folder = tempfile.mkdtemp()
        >>> phema = PostHocEMA(model, folder, sigma_rels=(0.05, 0.10), every=5)
        >>> for _ in range(20):
        ...     with torch.no_grad():
        ...         _ = model.weight.add_(0.01)  # an optimizer step
        ...     phema.update()
        >>> len(phema.snapshots())  # 4 steps × 2 widths
        8
        >>> ema = polyak.posthoc(folder, sigma_rel=0.08)  # after training: any width
        >>> sorted(ema)
        ['bias', 'weight']

    References:
        Karras, Aittala, Lehtinen, Hellsten, Aila, Laine (2024), "Analyzing and Improving
        the Training Dynamics of Diffusion Models", arXiv:2312.02696.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        folder: str | os.PathLike[str],
        *,
        sigma_rels: Sequence[float] = DEFAULT_SIGMA_RELS,
        every: int = 1000,
        resume: bool = False,
        include_buffers: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.sigma_rels = check_sigma_rels(sigma_rels)
        self.every = whole_number(every, "every", 1)
        self.folder = Path(folder)
        self.module = module
        self.averagers: list[EMA] = [
            EMA(module, sigma_rel=s, include_buffers=include_buffers, dtype=dtype, device=device)
            for s in self.sigma_rels
        ]
        self.run = uuid.uuid4().hex[:12]
        self._checked = False
        self._written = -1  # the update count of the last snapshot set written
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the snapshot folder {self.folder}: {exc.strerror or exc}") from None
        if resume:
            self._resume_from_folder()

    # -- the tracked averages ---------------------------------------------------------------
    def ema(self, sigma_rel: float) -> EMA:
        """The tracked :class:`EMA` of width ``sigma_rel`` (to evaluate it during training).

        Raises:
            ConfigError: No tracked width equals ``sigma_rel``.
        """
        for s, avg in zip(self.sigma_rels, self.averagers, strict=True):
            if np.isclose(s, sigma_rel, rtol=1e-9, atol=0.0):
                return avg
        raise ConfigError(f"no tracked EMA of sigma_rel={sigma_rel!r}; tracked: {list(self.sigma_rels)}")

    @property
    def step(self) -> int:
        """The training step of the last update."""
        return self.averagers[0].state.step

    @property
    def count(self) -> int:
        """Updates so far: the power EMAs' time ``t``."""
        return self.averagers[0].state.count

    # -- updating ---------------------------------------------------------------------------
    def update(self, module: torch.nn.Module | None = None, *, step: int | None = None) -> None:
        """Fold the current weights into every tracked EMA; call after each optimizer step.

        Every ``every``-th update writes a snapshot per width (see :meth:`snapshot`).

        Args:
            module: The module to read (default: the one given at construction).
            step: The training step just completed (default: one more than the last);
                snapshots are named and recorded by it.
        """
        if not self._checked:
            self._check_folder()
        before = self.count
        for avg in self.averagers:
            avg.update(module, step=step)
        if snapshot_due(before, self.count, self.every):
            self.snapshot()

    def snapshot(self) -> list[Path]:
        """Write one snapshot per tracked width now (if not written at this update yet).

        Called by :meth:`update` every ``every`` updates; call it at the end of training
        to keep the last steps too. Returns the files written (none on ranks other than 0).
        """
        if self.count == 0 or self._written == self.count:
            return []
        from ._dist import export, is_sharded

        sharded = is_sharded(self.module)
        names = self._names()
        written = []
        for s, avg in zip(self.sigma_rels, self.averagers, strict=True):
            schedule = avg.schedule
            record = SnapshotRecord(
                sigma_rel=s, gamma=float(schedule.gamma or 0.0), t=self.count, step=self.step, count=self.count,
                names=names, run=self.run, every=self.every, framework="torch", copied=self._copied(avg),
            )
            path = self.folder / snapshot_name(s, self.step)
            meta = {SNAPSHOT_KEY: record.to_json()}
            out = export(avg, path, metadata=meta) if sharded else avg.save(path, metadata=meta)
            if out is not None:
                written.append(out)
        self._written = self.count
        return written

    def _names(self) -> tuple[str, ...]:
        return tuple(self.averagers[0].state.tensors)

    @staticmethod
    def _copied(avg: EMA) -> tuple[str, ...]:
        """Floating tensors kept as copies (buffers with ``include_buffers=False``)."""
        return tuple(n for (n, t), a in zip(avg.state.tensors.items(), avg._core.averaged, strict=True)
                     if not a and (t.is_floating_point() or t.is_complex()))

    def snapshots(self) -> list[Path]:
        """The snapshot files of this run in the folder, oldest → newest."""
        from .._engine.posthoc import scan_folder

        return [s.path for s in sorted(scan_folder(self.folder), key=lambda s: (s.record.step, s.record.sigma_rel))
                if s.record.run == self.run]

    def _check_folder(self) -> None:
        """Before the first update: the folder must not hold another run's snapshots."""
        self._checked = True
        if not is_writer_rank():
            return
        from .._engine.posthoc import check_run

        found = check_run(self.folder, self.run, resume_hint="PostHocEMA(..., resume=True) or load_state_dict()")
        later = [s for s in found if s.record.t > self.count]
        if later:
            warnings.warn(
                f"{self.folder} holds {len(later)} snapshots of this run taken after update {self.count} (an earlier "
                "attempt); they are replaced as training reaches their steps, and a rebuild before then mixes the "
                "two attempts", PolyakWarning, stacklevel=3,
            )

    # -- rebuilding -------------------------------------------------------------------------
    def rebuild(self, sigma_rel: float, *, step: int | None = None,
                module: torch.nn.Module | None = None) -> dict[str, np.ndarray]:
        """The EMA of width ``sigma_rel`` rebuilt from this run's snapshots (:func:`polyak.posthoc`).

        Args:
            sigma_rel: The width to rebuild.
            step: At this snapshot step (default: the last).
            module: Also load the result into this module (names matched without wrapper
                prefixes, cast into its dtypes).

        Returns:
            Name → numpy array.
        """
        from .._engine.posthoc import posthoc

        state = posthoc(self.folder, sigma_rel=sigma_rel, step=step)
        if module is not None:
            from ._load import load_average

            load_average(module, [state], order="given")
        return state

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"kind": "posthoc_ema", "run", "every", "sigma_rels", "written", "averagers"}``.

        ``averagers`` holds each tracked :meth:`EMA.state_dict` (tensors not copied).
        """
        return capture_state(self.run, self.every, self.sigma_rels, self._written,
                             [a.state_dict() for a in self.averagers])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` exactly (the run continues into the same folder).

        Raises:
            ConfigError: The state is not a PostHocEMA's, or tracks other widths.
            MismatchError: Its tensors do not fit the module (all differences listed).
        """
        check_capture_state(state, self.sigma_rels, owner="PostHocEMA", hint="; pass PostHocEMA.state_dict()")
        for avg, sub in zip(self.averagers, state["averagers"], strict=True):
            avg.load_state_dict(sub)
        self.run, self.every, self._written = capture_counters(state, self.every)

    def _resume_from_folder(self) -> None:
        from .._engine.posthoc import resume_point
        from ._dist import is_sharded

        chosen = resume_point(self.folder, self.sigma_rels, every=self.every, framework="torch")
        if chosen is None:
            return  # nothing to resume: a fresh run
        first = chosen[self.sigma_rels[0]].record
        for s, avg in zip(self.sigma_rels, self.averagers, strict=True):
            path = chosen[s].path
            state = read_averager_file(path)
            if is_sharded(self.module):
                state["tensors"] = _local_shards(self.module, state["tensors"], path)
            avg.load_state_dict(state)
            if avg.state.count != first.t:
                raise FormatError(f"{path}: its averager state counts {avg.state.count} updates, its snapshot "
                                  f"record {first.t}")
        self.run = first.run
        self._written = first.count

    def __repr__(self) -> str:
        return (f"PostHocEMA(sigma_rels={list(self.sigma_rels)}, every={self.every}, step={self.step}, "
                f"count={self.count}, folder={str(self.folder)!r})")


def _local_shards(module: torch.nn.Module, full: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """This rank's shards of full tensors read from a snapshot (FSDP2 resume)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from ._common import canonical_name

    live = {canonical_name(n): t for n, t in module.state_dict().items()}
    out = {}
    for name, t in full.items():
        ref = live.get(name)
        if isinstance(ref, DTensor):
            # Every rank read the same file: no data needs to move (src_data_rank=None).
            t = distribute_tensor(t.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None).to_local()
        out[name] = t
    return out

