"""The torch kernels of the online averagers: :class:`TorchOps`, multi-tensor lerp by group.

:class:`TorchOps` is the :class:`polyak._online.AveragerOps` of ``polyak.torch`` (``EMA``,
``SWA``) and of ``polyak.keras.EMACallback`` on the torch backend. An averaged tensor is
updated as ``avg ← lerp(avg, current, weight)``. Tensors are grouped by (source device,
source dtype, average device, average dtype) and each group is updated with one
``torch._foreach_lerp_`` call. When the average is kept in another dtype (a bf16 model
with a float32 average) or on another device (a CPU copy of a GPU model), the current
values are first copied into a *preallocated* staging buffer of the average's dtype and
device (``torch._foreach_copy_``), chunk by chunk, so no full-size temporary is
allocated per step and the staged chunk is still in cache when the lerp reads it.

This module sits below the faces, so torch is imported inside the functions that run
only once a face (which imported torch) calls them.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ._online import accumulator_dtype_name

if TYPE_CHECKING:
    import torch

__all__ = ["TorchOps", "UpdatePlan", "build_plan", "signature"]

#: Elements per staging chunk (at least the largest tensor of a group). Small on CPU so
#: that a chunk stays in cache between the copy and the lerp; large on accelerators, where
#: fewer kernel launches matter more.
STAGE_ELEMENTS_CPU = 1 << 19
STAGE_ELEMENTS_ACCEL = 1 << 26

Signature = tuple[tuple["torch.dtype", "torch.device"], ...]


def signature(tensors: Sequence[torch.Tensor]) -> Signature:
    """What a plan depends on: each live tensor's dtype and device."""
    return tuple((t.dtype, t.device) for t in tensors)


@dataclass
class _Group:
    index: list[int]  # positions in the live-tensor list
    avg: list[torch.Tensor]
    src: list[torch.Tensor]  # the live tensors at those positions (refreshed by UpdatePlan.fits)
    # (lo, hi, staging views) covering avg[lo:hi]; empty when no conversion is needed.
    chunks: list[tuple[int, int, list[torch.Tensor]]] = field(default_factory=list)


@dataclass
class UpdatePlan:
    """Grouped foreach updates for one live-tensor signature (rebuilt when it changes)."""

    signature: Signature
    groups: list[_Group]
    copies: list[tuple[int, torch.Tensor]]  # (position, stored tensor): copied, not averaged
    sources: list[torch.Tensor] = field(default_factory=list)  # the live tensors it was built for
    averaged: Sequence[bool] = ()  # the flags it was built for: the same object, the same averages

    def fits(self, current: Sequence[torch.Tensor], averaged: Sequence[bool] | None = None) -> bool:
        """Whether this plan applies to ``current``; if so it reads from them from now on.

        Cheap when the live tensors are the same objects as last time (the usual case).
        ``averaged``, when given, must be the flags object the plan was built for: the
        online core passes a new one whenever it replaces the averages (a loaded state).
        """
        if averaged is not None and averaged is not self.averaged:
            return False
        if len(current) == len(self.sources) and all(map(operator.is_, current, self.sources)):
            # Same objects; their dtype/device change only if someone reassigned ``.data``
            # (``module.to()``), which changes every tensor of a group: check one per group.
            return all(
                (current[g.index[0]].dtype, current[g.index[0]].device) == self.signature[g.index[0]]
                for g in self.groups
            )
        if signature(current) != self.signature:
            return False
        self.sources = list(current)
        for g in self.groups:
            g.src = [current[i] for i in g.index]
        return True

    def apply(self, weight: float) -> None:
        """``avg ← lerp(avg, current, weight)`` for averaged tensors; copy the others.

        Reads the live tensors last passed to :meth:`fits` (or :func:`build_plan`);
        ``weight == 1`` copies exactly (the first update).
        """
        import torch

        with torch.no_grad():
            for g in self.groups:
                if weight == 1.0:
                    torch._foreach_copy_(g.avg, g.src)
                elif not g.chunks:
                    torch._foreach_lerp_(g.avg, g.src, weight)
                else:
                    for lo, hi, stage in g.chunks:
                        torch._foreach_copy_(stage, g.src[lo:hi])
                        torch._foreach_lerp_(g.avg[lo:hi], stage, weight)
            for i, dst in self.copies:
                dst.copy_(self.sources[i])


def build_plan(
    current: Sequence[torch.Tensor], stored: Sequence[torch.Tensor], averaged: Sequence[bool]
) -> UpdatePlan:
    """Group ``(current[i], stored[i])`` pairs; allocate staging buffers once."""
    keyed: dict[tuple[torch.dtype, torch.device, torch.dtype, torch.device], list[int]] = {}
    copies: list[tuple[int, torch.Tensor]] = []
    for i, (cur, kept, is_avg) in enumerate(zip(current, stored, averaged, strict=True)):
        if not is_avg:
            copies.append((i, kept))
            continue
        keyed.setdefault((cur.dtype, cur.device, kept.dtype, kept.device), []).append(i)
    groups = []
    for (src_dtype, src_dev, dst_dtype, dst_dev), index in keyed.items():
        avg = [stored[i] for i in index]
        group = _Group(index, avg, [current[i] for i in index])
        if (src_dtype, src_dev) != (dst_dtype, dst_dev):
            group.chunks = _chunks(avg, dst_dtype, dst_dev)
        groups.append(group)
    return UpdatePlan(signature(current), groups, copies, list(current), averaged)


def _chunks(
    avg: list[torch.Tensor], dtype: torch.dtype, device: torch.device
) -> list[tuple[int, int, list[torch.Tensor]]]:
    import torch

    limit = STAGE_ELEMENTS_CPU if device.type == "cpu" else STAGE_ELEMENTS_ACCEL
    size = max([limit, *(t.numel() for t in avg)])
    buffer = torch.empty(size, dtype=dtype, device=device)
    chunks = []
    lo = 0
    while lo < len(avg):
        hi, used, views = lo, 0, []
        while hi < len(avg) and (hi == lo or used + avg[hi].numel() <= size):
            n = avg[hi].numel()
            views.append(buffer[used:used + n].view(avg[hi].shape))
            used += n
            hi += 1
        chunks.append((lo, hi, views))
        lo = hi
    return chunks


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TorchOps:
    """:class:`~polyak._online.AveragerOps` over torch tensors: the grouped ``_foreach`` plan.

    Args:
        dtype: Accumulator dtype for averaged floating tensors (default: float32 for
            bfloat16/float16, else the tensor's own; complex tensors keep theirs).
        device: Keep the averages on this device (default: each tensor's own).

    Live items are torch tensors; a subclass that reads them from elsewhere (Keras
    variables) overrides :meth:`read`.
    """

    def __init__(self, *, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        self.dtype = dtype
        self.device = device
        self._plan: UpdatePlan | None = None

    def read(self, live: Sequence[Any]) -> list[torch.Tensor]:
        """The torch tensors behind ``live`` (the tensors themselves here)."""
        return live if isinstance(live, list) else list(live)

    def init(self, live: Sequence[Any], averaged: Sequence[bool]) -> list[torch.Tensor]:
        import torch

        override = None if self.dtype is None else _dtype_name(self.dtype)
        out = []
        with torch.no_grad():
            for t, is_avg in zip(self.read(live), averaged, strict=True):
                target = t.dtype
                if is_avg:
                    target = getattr(torch, accumulator_dtype_name(_dtype_name(t.dtype), override))
                out.append(t.detach().to(device=self.device or t.device, dtype=target, copy=True))
        return out

    def update(self, averages: list[torch.Tensor], live: Sequence[Any], weight: float,
               averaged: Sequence[bool]) -> list[torch.Tensor]:
        current = self.read(live)
        plan = self._plan
        if plan is None or not plan.fits(current, averaged):
            plan = self._plan = build_plan(current, averages, averaged)
        plan.apply(weight)
        return averages

    def assign(self, live: Sequence[Any], values: Sequence[torch.Tensor]) -> None:
        import torch

        with torch.no_grad():
            for dst, src in zip(self.read(live), values, strict=True):
                dst.copy_(src)

    def backup(self, live: Sequence[Any], into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        import torch

        current = self.read(live)
        with torch.no_grad():
            if into is not None and len(into) == len(current) and all(
                    (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
                    for a, b in zip(into, current, strict=True)):
                if into:
                    torch._foreach_copy_(into, current)
                return into
            return [t.detach().clone() for t in current]

    def to_numpy(self, value: torch.Tensor) -> np.ndarray:
        import torch

        t = value.detach().to("cpu", copy=True)  # a copy: the average is updated in place
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: through float32, exactly
            import ml_dtypes

            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy()

    def from_numpy(self, array: Any, like: torch.Tensor) -> torch.Tensor:
        import torch

        arr = np.asarray(array)
        if arr.dtype.kind not in "biufc":  # ml_dtypes' bfloat16/float8: widen exactly first
            arr = arr.astype(np.float32)
        return torch.as_tensor(arr).to(device=like.device, dtype=like.dtype).clone()
