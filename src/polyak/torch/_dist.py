"""Online averagers under torch.distributed: DDP replicas and FSDP2 (DTensor) shards.

DDP: every rank holds the same weights after each optimizer step, so every rank's
averager computes the same average with no communication; names are compared without the
``module.`` prefix; files are written by rank 0 only.

FSDP2 (``fully_shard``): the parameters are DTensors sharded on dim 0. The averagers see
each parameter's *local shard* (:func:`local_tensor`), keep a float32 copy of it and update
it with the same multi-tensor ``_foreach_lerp_`` as a single process, with no
communication, so per-rank memory is the shard, not the model. What needs the global view
lives here:

* :func:`save_sharded` / :func:`load_sharded`: the averager state through
  ``torch.distributed.checkpoint`` (DCP), each rank writing its shards; DCP reshards on
  load, so a state saved on N ranks resumes on M ranks or in one process.
* :func:`export`: the full averaged model as one safetensors file written by rank 0,
  gathering one tensor at a time (``DTensor.full_tensor()``), so rank 0 holds at most one
  full tensor beyond its shards.
* :func:`full_state_dict` / :func:`load_full_state_dict`: the state with whole tensors,
  for checkpoints written as one file by rank 0 (Lightning's): gathered one tensor at a
  time on save, each rank takes its own pieces on load.

References:
    pytorch/pytorch#144289 ("ema should store dtensor"): EMA on FSDP2 shards;
    ``torch.distributed.fsdp.fully_shard`` and ``torch.distributed.checkpoint`` docs.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._atomic import AtomicFolder
from .._errors import ConfigError, FormatError, OutputError
from .._json import json_object
from .._layout import compare_layouts
from ._common import META_KEY, canonical_name, local_tensor

__all__ = ["export", "full_state_dict", "is_sharded", "load_full_state_dict", "load_sharded", "local_tensor",
           "refuse_flat_parameters", "save_sharded"]

#: Key of the averager record (JSON bytes kept as a uint8 tensor, so that loading it never
#: unpickles anything) in a sharded save.
RECORD_KEY = "polyak_averager_record"
TENSORS_KEY = "averaged"


def _dtensor_type() -> Any:
    # DTensors exist only if torch.distributed.tensor was imported (by fully_shard).
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _global_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical name → the module's own (possibly DTensor) parameter or buffer."""
    out: dict[str, torch.Tensor] = {}
    for name, t in module.named_parameters():
        out.setdefault(canonical_name(name), t)
    for name, buf in module.named_buffers():
        out.setdefault(canonical_name(name), buf)
    return out


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (FSDP2, tensor parallel)."""
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(p, dtensor) for p in module.parameters())


def refuse_flat_parameters(module: torch.nn.Module, *wrappers: torch.nn.Module, where: str) -> None:
    """Refuse a module whose parameters were flattened into per-rank buffers without names.

    FSDP1 (``FullyShardedDataParallel``) and DeepSpeed ZeRO-3 replace a module's
    parameters by flat per-rank buffers (or empty placeholders), which an averager cannot
    match by name; FSDP2 (``fully_shard``) keeps them as named DTensors and works.

    Args:
        module: The module an averager would follow.
        wrappers: Modules wrapping it (a training loop's ``strategy.model``), also searched
            for FSDP1 wrappers.
        where: Who asks, for the message (e.g. ``"polyak.lightning.EMACallback"``).

    Raises:
        ConfigError: Naming the cause and FSDP2 as the fix.
    """
    fsdp1 = getattr(torch.distributed.fsdp, "FullyShardedDataParallel", None) if torch.distributed.is_available() else None
    params = list(module.parameters())
    reasons = []
    if fsdp1 is not None and any(isinstance(m, fsdp1) for w in (module, *wrappers) for m in w.modules()):
        reasons.append("it is wrapped in FSDP1 (FullyShardedDataParallel)")
    if any(hasattr(p, "ds_id") for p in params):
        reasons.append("DeepSpeed ZeRO-3 partitioned its parameters")
    if any(type(p).__name__ == "FlatParameter" for p in params):
        reasons.append("it holds FSDP1 flat parameters")
    if not params:
        reasons.append("it has no parameters (were they flattened by FSDP1 or DeepSpeed?)")
    if reasons:
        raise ConfigError(f"{where} cannot follow this model: {'; '.join(reasons)}. Averages are matched by parameter "
                          "name: use FSDP2 (torch.distributed.fsdp.fully_shard; in Lightning ModelParallelStrategy) "
                          "or DDP")


def _dist() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _as_global(averager: Any) -> dict[str, torch.Tensor]:
    """The averaged tensors as DTensors laid out like the live parameters (no copy)."""
    live = _global_tensors(averager.module)
    dtensor = _dtensor_type()
    out: dict[str, torch.Tensor] = {}
    for name, avg in averager.state.tensors.items():
        ref = live.get(name)
        if dtensor is not None and isinstance(ref, dtensor):
            # shape= and stride= from the live parameter: FSDP2 pads uneven dim-0 shards and
            # from_local would otherwise guess the global shape as local × world size.
            out[name] = dtensor.from_local(
                avg, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape, stride=ref.stride()
            )
        else:
            out[name] = avg
    return out


def _record(averager: Any) -> dict[str, Any]:
    return {k: v for k, v in averager.state_dict().items() if k != "tensors"}


def _record_tensor(record: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(record).encode("utf-8")), dtype=torch.uint8)


@contextlib.contextmanager
def _quiet_no_dist() -> Any:
    with warnings.catch_warnings():
        # Without a process group DCP runs in one process, as intended, and warns about it.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(averager: Any, path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Save an averager's state as a DCP folder; every rank writes its own shards.

    Call on every rank (it is collective when torch.distributed runs). The folder is written
    under a temporary name and renamed into place by rank 0 once every rank has finished.

    Args:
        averager: A :class:`polyak.torch.EMA` or :class:`polyak.torch.SWA`.
        path: The checkpoint folder to create.
        force: Replace an existing folder.

    Returns:
        ``path`` (on every rank).

    Raises:
        OutputError: ``path`` exists and ``force`` is false.

    Example:
        In one process (no ``torch.distributed``) it writes the whole state; under
        ``torchrun`` call it the same way on every rank.

        >>> import tempfile, torch
        >>> from polyak.torch import EMA, load_sharded, save_sharded
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = EMA(model, decay=0.9)
        >>> ema.update()
        >>> folder = save_sharded(ema, f"{tempfile.mkdtemp()}/ema_dcp")
        >>> restored = EMA(model, decay=0.9)
        >>> load_sharded(restored, folder)
        >>> restored.state.count, torch.equal(restored.state.tensors["weight"], ema.state.tensors["weight"])
        (1, True)
    """
    import torch.distributed.checkpoint as dcp

    target = Path(path)
    rank, world = _dist()
    if target.exists() and not force:
        raise OutputError(f"the output {target} already exists; pass force=True to replace it")
    folder = AtomicFolder(target) if rank == 0 else None  # rank 0 creates and publishes it
    names = [str(folder.tmp) if folder is not None else ""]
    if world > 1:
        torch.distributed.broadcast_object_list(names, src=0)  # one temporary folder for all
    tmp = Path(names[0])
    state: dict[str, Any] = {TENSORS_KEY: _as_global(averager), RECORD_KEY: _record_tensor(_record(averager))}
    try:
        with _quiet_no_dist():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=world == 1)
        if world > 1:
            torch.distributed.barrier()
        if folder is not None:
            folder.commit()
    finally:
        if folder is not None:
            folder.abort()  # only if not committed: removes the temporary folder
    if world > 1:
        torch.distributed.barrier()
    return target


@torch.no_grad()
def load_sharded(averager: Any, path: str | os.PathLike[str]) -> None:
    """Restore a state written by :func:`save_sharded`, on any number of ranks.

    Every rank reads only the pieces of its own shards (DCP reshards: a state saved on 2
    ranks loads on 4, or in one process without torch.distributed). Settings (schedule,
    start, every) and counters come from the saved state, as in ``load_state_dict``.

    Args:
        averager: The :class:`polyak.torch.EMA` or :class:`polyak.torch.SWA` to restore
            into, following the same model (call on every rank).
        path: The folder :func:`save_sharded` wrote.

    Raises:
        FormatError: The folder is not an averager state from :func:`save_sharded`.
        MismatchError: It was saved for a model with other tensor names or shapes.
        ConfigError: It is the state of another kind of averager.

    Example:
        >>> import tempfile, torch
        >>> from polyak.torch import SWA, load_sharded, save_sharded
        >>> model = torch.nn.Linear(2, 1)
        >>> swa = SWA(model)
        >>> for _ in range(3):
        ...     swa.update()
        >>> folder = save_sharded(swa, f"{tempfile.mkdtemp()}/swa_dcp")
        >>> restored = SWA(model)
        >>> load_sharded(restored, folder)
        >>> restored.state.step, restored.state.count
        (3, 3)
    """
    import torch.distributed.checkpoint as dcp

    folder = Path(path)
    _, world = _dist()
    try:
        meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    except Exception as exc:
        raise FormatError(f"{folder}: not a readable torch.distributed.checkpoint folder ({exc})") from None
    entry = meta.get(RECORD_KEY)
    if entry is None or not hasattr(entry, "size"):
        raise FormatError(f"{folder}: no averager record; it was not written by polyak.torch save_sharded()")
    # Global shapes on both sides (meta tensors: no memory); dtypes may differ, as in
    # load_state_dict (the saved average is cast into this averager's).
    saved = {
        k[len(TENSORS_KEY) + 1:]: torch.empty(tuple(getattr(v, "size", ())), device="meta")
        for k, v in meta.items()
        if k.startswith(TENSORS_KEY + ".")
    }
    targets = _as_global(averager)
    compare_layouts(targets, saved, ("this averager", str(folder)), dtypes=False).raise_if_any(
        "the saved averaged tensors do not match this averager's", fix="load the state of an averager of the same model")
    record = torch.zeros(tuple(entry.size), dtype=torch.uint8)
    state: dict[str, Any] = {TENSORS_KEY: targets, RECORD_KEY: record}
    with _quiet_no_dist():
        dcp.load(state, checkpoint_id=str(folder), no_dist=world == 1)
    loaded = state[TENSORS_KEY]
    for name, mine in averager.state.tensors.items():
        got = local_tensor(loaded[name])
        if got.data_ptr() != mine.data_ptr():
            mine.copy_(got)
    rec = json_object(bytes(state[RECORD_KEY].tolist()), str(folder), "averager record")
    averager.load_state_dict({**rec, "tensors": averager.state.tensors})


@torch.no_grad()
def export(averager: Any, path: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
           metadata: Mapping[str, str] | None = None) -> Path | None:
    """Write the full averaged model as one safetensors file, from rank 0.

    Call on every rank: each sharded tensor is gathered (``full_tensor()``, a collective) one
    at a time, in the same order on every rank, and written by rank 0 as it arrives, so
    rank 0 needs one full tensor of memory beyond its shards. The file holds the averager
    record too, so ``EMA.load(path, model)`` resumes from it in a single process.

    Args:
        averager: A :class:`polyak.torch.EMA` or :class:`polyak.torch.SWA`.
        path: A ``.safetensors`` file.
        dtype: Cast floating tensors to this dtype (default: as averaged, e.g. float32).
        metadata: More string entries for the file's metadata.

    Returns:
        ``path`` on rank 0, ``None`` on other ranks.

    Raises:
        ConfigError: ``path`` does not end in ``.safetensors``.
        OutputError: The file cannot be written.

    Example:
        >>> import tempfile, torch
        >>> from polyak.torch import EMA, export
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = EMA(model, decay=0.9)
        >>> ema.update()
        >>> path = export(ema, f"{tempfile.mkdtemp()}/ema.safetensors")  # on every rank
        >>> EMA.load(path, model).state.count
        1
    """
    from ..formats import TensorInfo
    from ..formats.safetensors import SafetensorsWriter
    from ..formats.torch_pt import numpy_dtype, tensor_to_numpy

    out = Path(path)
    if not out.name.endswith(".safetensors"):
        raise ConfigError(f"export writes a .safetensors file, got {out}")
    rank, _ = _dist()
    tensors = _as_global(averager)

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    infos = [TensorInfo(name, tuple(t.shape), numpy_dtype(torch.empty(0, dtype=out_dtype(t)))) for name, t in tensors.items()]
    meta = {**(metadata or {}), META_KEY: json.dumps(_record(averager)), "format": "pt"}
    writer = SafetensorsWriter(out, infos, metadata=meta) if rank == 0 else None
    order = writer.order if writer is not None else _order(infos)
    try:
        for name in order:
            full = _full(tensors[name])
            if writer is not None:
                writer.write(name, tensor_to_numpy(full.to(device="cpu", dtype=out_dtype(full))))
            del full
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return out if rank == 0 else None


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``full_tensor()`` of a DTensor (a collective), any other as is."""
    dtensor = _dtensor_type()
    return t.full_tensor() if dtensor is not None and isinstance(t, dtensor) else t


@torch.no_grad()
def full_state_dict(averager: Any, *, rank0_only: bool = True) -> dict[str, Any]:
    """The averager's :meth:`~polyak.torch.EMA.state_dict` with whole tensors, for one-file checkpoints.

    For an averager of a sharded (FSDP2/DTensor) module, every averaged tensor is gathered
    (``full_tensor()``, a collective: call on every rank, in the same order) one at a time
    and moved to the CPU, so a rank holds its shards plus the gathered tensors it keeps.
    With ``rank0_only`` (the default) only rank 0 keeps them (the rank that writes the
    checkpoint); the others get the record with empty ``tensors``. For any other averager
    this is ``state_dict()`` (tensors not copied). :func:`load_full_state_dict` restores it
    on any number of ranks.

    Args:
        averager: A :class:`polyak.torch.EMA` or :class:`polyak.torch.SWA`.
        rank0_only: Keep the gathered tensors on rank 0 only.

    Returns:
        ``{"kind", "step", "count", "config", "tensors"}`` with global shapes.

    Example:
        >>> import torch
        >>> from polyak.torch import EMA, full_state_dict, load_full_state_dict
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = EMA(model, decay=0.9)
        >>> ema.update()
        >>> state = full_state_dict(ema)  # e.g. into a one-file checkpoint written by rank 0
        >>> sorted(state), state["tensors"]["weight"].shape
        (['config', 'count', 'kind', 'step', 'tensors'], torch.Size([1, 2]))
    """
    if not is_sharded(averager.module):
        return dict(averager.state_dict())
    rank, _ = _dist()
    keep = rank == 0 or not rank0_only
    tensors: dict[str, torch.Tensor] = {}
    for name, t in _as_global(averager).items():  # the same order on every rank
        full = _full(t)
        if keep:
            tensors[name] = full.to("cpu", copy=True)
        del full
    return {**_record(averager), "tensors": tensors}


@torch.no_grad()
def load_full_state_dict(averager: Any, state: Mapping[str, Any]) -> None:
    """Restore a state with whole tensors (:func:`full_state_dict`, or ``state_dict()`` of one
    process) into any averager, sharded or not.

    For an averager of a sharded module every rank takes its own pieces of each tensor
    (the ``DTensor`` placements of the live parameter; no communication), so each rank
    must be given the whole state, e.g. by loading the checkpoint on every rank. Settings
    and counters come from the state, as in ``load_state_dict``.

    Args:
        averager: The :class:`polyak.torch.EMA` or :class:`polyak.torch.SWA` to restore into.
        state: The state with whole tensors.

    Raises:
        ConfigError: The state is another kind of averager's.
        MismatchError: Tensor names or (global) shapes differ, all listed.

    Example:
        >>> import torch
        >>> from polyak.torch import EMA, full_state_dict, load_full_state_dict
        >>> model = torch.nn.Linear(2, 1)
        >>> ema = EMA(model, decay=0.9)
        >>> ema.update()
        >>> restored = EMA(model, decay=0.5)
        >>> load_full_state_dict(restored, full_state_dict(ema))
        >>> restored.schedule.decay, restored.state.count  # the saved settings and counters
        (0.9, 1)
    """
    if not is_sharded(averager.module):
        averager.load_state_dict(state)
        return
    from torch.distributed.tensor import distribute_tensor

    saved = dict(state.get("tensors") or {})
    targets = _as_global(averager)
    compare_layouts(targets, saved, ("this averager", "the saved state"), dtypes=False).raise_if_any(
        "the saved averaged tensors do not match this averager's", fix="load the state of an averager of the same model")
    dtensor = _dtensor_type()
    local: dict[str, torch.Tensor] = {}
    for name, ref in targets.items():
        full = saved[name]
        if dtensor is not None and isinstance(ref, dtensor):
            full = full.to(ref.to_local().device)
            local[name] = distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None).to_local()
        else:
            local[name] = full
    averager.load_state_dict({**state, "tensors": local})


def _order(infos: list[Any]) -> list[str]:
    from ..formats.safetensors import file_order

    return [i.name for i in file_order(infos)]
