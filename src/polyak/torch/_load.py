"""Fill a module with the average of saved checkpoints, streamed into its own tensors.

:func:`load_average` runs the engine's steps (choose and order the members, open them,
check names and shapes from the headers) and then checks the module against the members'
layout before any arithmetic. Each tensor is then averaged straight into the module's own
tensor (:class:`ModuleWriter`, a writer whose destination is the module): a CPU tensor is
the accumulator itself (or, for bfloat16/float16, receives each chunk as it is summed), a
GPU tensor receives the finished tensor. Extra memory is a few tensors' worth at most, never
the model (``benchmarks/bench_load_average.py``).

Tied weights (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``): the module's
``state_dict`` lists one tensor under several names while Hugging Face files store it once.
Names of one tensor are one slot here: the average needs to hold one of them, fills the
tensor once (the tie survives, as nothing is reassigned), and where it holds several their
values must agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._dtypes import is_float
from .._errors import ConfigError, MismatchError
from .._layout import compare_layouts
from ..formats import TensorInfo, TensorWriter
from ..formats.torch_pt import numpy_dtype, numpy_to_tensor, tensor_to_numpy
from ._common import WRAPPER_PREFIXES, canonical_name

__all__ = ["LoadReport", "ModuleWriter", "load_average"]

#: What :func:`load_average` passes on to the engine (see :func:`polyak.average`).
OPTIONS = ("alpha", "weights", "last", "order", "format", "key", "strip_prefix", "int_policy", "progress")


@dataclass
class LoadReport:
    """What :func:`load_average` put into the module: the tensors loaded, and those left out.

    Attributes:
        loaded: Names of the module's tensors that received the average (module order;
            every name of a tied tensor).
        missing: The module's tensors the average lacks (module order; left as they were).
        unexpected: Averaged tensors the module lacks (sorted; ignored).

    Example:
        >>> import torch
        >>> from polyak.torch import load_average
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Linear(1, 1))
        >>> partial = {"0.weight": torch.ones(1, 2), "0.bias": torch.zeros(1), "head.weight": torch.ones(3)}
        >>> report = load_average(model, [partial], strict=False)
        >>> report.loaded, report.missing, report.unexpected
        (['0.weight', '0.bias'], ['1.weight', '1.bias'], ['head.weight'])
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def _storage_key(t: torch.Tensor) -> tuple[Any, ...] | None:
    """Where a tensor's elements live: equal for the names of one tied tensor."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def tied_groups(live: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """The module's names grouped by the tensor they name, in module order (a tied
    parameter's names form one group; every other name is a group of its own)."""
    groups: dict[Any, list[str]] = {}
    for name, t in live.items():
        key = _storage_key(t)
        groups.setdefault(("name", name) if key is None else key, []).append(name)
    return list(groups.values())


class ModuleWriter(TensorWriter):
    """A writer whose destination is a module's own tensors.

    :meth:`target` offers a CPU tensor's memory (as a numpy view) so the engine sums the
    average straight into it; :meth:`write` copies into any other tensor (GPU, non
    contiguous), casting to its dtype. A name in ``agree`` is a second name of a tensor
    already filled: its average is only compared with what the tensor holds.

    Args:
        live: Name → the module's tensor, for every name to fill.
        infos: The tensors to average (name, shape, the dtype to sum them for), in the
            order to fill them.
        agree: Names to compare rather than fill, each with the name it must equal.
    """

    def __init__(self, live: Mapping[str, torch.Tensor], infos: Sequence[TensorInfo], agree: Mapping[str, str]) -> None:
        super().__init__(Path("<module>"), infos, metadata={})
        self.live = dict(live)
        self.agree = dict(agree)

    def target(self, name: str) -> np.ndarray | None:
        t = self.live[name]
        if name in self.agree or t.device.type != "cpu" or not t.is_contiguous() or not t.is_floating_point():
            return None
        try:
            view = tensor_to_numpy(t)  # shares t's memory (no copy for a contiguous CPU tensor)
        except (RuntimeError, TypeError):  # a conjugate/negative view, a dtype numpy lacks
            return None
        return view if view.flags.writeable else None

    def write(self, name: str, array: np.ndarray) -> None:
        t = self.live[name]
        value = numpy_to_tensor(array)
        if name in self.agree:
            if not torch.equal(t, value.to(device=t.device, dtype=t.dtype)):
                raise MismatchError(
                    f"the module ties {name!r} to {self.agree[name]!r} (one tensor), but the averaged "
                    "checkpoints hold different values for them; load checkpoints of a tied model, or untie "
                    "the module's weights first"
                )
            return
        t.copy_(value)

    def commit(self) -> list[Path]:
        return []

    def abort(self) -> None:
        pass


def _plan(
    module: torch.nn.Module, infos: Sequence[TensorInfo], *, strict: bool
) -> tuple[ModuleWriter, list[TensorInfo], LoadReport]:
    """Match the module to the averaged tensors (tied names as one) before any arithmetic."""
    live = {canonical_name(k): t for k, t in module.state_dict(keep_vars=True).items()}
    have = {i.name: i for i in infos}
    expected: dict[str, torch.Tensor] = {}
    fill: dict[str, torch.Tensor] = {}
    agree: dict[str, str] = {}
    loaded: set[str] = set()
    for group in tied_groups(live):
        present = [n for n in group if n in have]
        for n in present or group:  # a name the average lacks is missing only if the whole tensor is
            expected[n] = live[n]
        if present:
            loaded.update(group)
            fill[present[0]] = live[present[0]].detach()
            for n in present[1:]:
                fill[n] = live[n].detach()
                agree[n] = present[0]
    # Dtypes are not compared: the average is cast into the module's dtypes (bf16, fp16).
    diff = compare_layouts(expected, have, ("the module", "the averaged checkpoints"), dtypes=False)
    names_differ = bool(diff.missing or diff.unexpected)
    (diff if strict else replace(diff, missing=[], unexpected=[])).raise_if_any(
        "the averaged checkpoints do not fit the module",
        fix=("pass strict=False to load the common tensors (their shapes must still match)" if strict and names_differ
             else "average checkpoints of this module's architecture"),
    )
    order: list[TensorInfo] = []
    for info in infos:  # the members' order: sequential reads
        if info.name not in fill:
            continue
        t = fill[info.name]
        dtype = numpy_dtype(t) if is_float(info.dtype) and t.is_floating_point() else info.dtype
        order.append(TensorInfo(info.name, info.shape, dtype))
    report = LoadReport([n for n in live if n in loaded], diff.missing, diff.unexpected)
    return ModuleWriter(fill, order, agree), order, report


@torch.no_grad()
def load_average(
    module: torch.nn.Module,
    checkpoints: Sequence[Any],
    *,
    scheme: str = "equal",
    strict: bool = True,
    **kwargs: Any,
) -> LoadReport:
    """Fill ``module`` with the average of saved checkpoints, streamed into its own tensors.

    Names and shapes are checked from the members' headers and against the module before
    any arithmetic; then each tensor is averaged (float32 accumulation, float64 for float64;
    integers copied from the newest member) directly into the module's tensor, so the extra
    memory is a few tensors, not a copy of the model. The module's tensors keep their dtype,
    device and identity (optimizers and ties stay valid).

    Args:
        module: The model to fill; its tensors keep their dtype and device.
        checkpoints: Paths or folders (any format :func:`polyak.average` reads, Hugging Face
            ``checkpoint-N/`` folders included) or state dicts, oldest → newest (paths are
            ordered by the numbers in their paths unless ``order="given"``).
        scheme: ``"equal"``, ``"linear"``, ``"exponential"`` or ``"custom"`` (``weights=``).
        strict: Require the averaged names to equal the module's (prefixes ``module.`` and
            ``_orig_mod.`` ignored; the names of one tied tensor count once: the average
            needs one of them). With ``strict=False`` the common tensors are loaded and the
            report lists the missing and unexpected ones. Shapes must match either way;
            dtypes need not (the average is cast into the module's dtypes).
        **kwargs: ``alpha``, ``weights``, ``last``, ``order``, ``format``, ``key``,
            ``strip_prefix``, ``int_policy``, ``progress``, as in :func:`polyak.average`.

    Returns:
        A :class:`LoadReport`.

    Raises:
        ConfigError: Invalid options (``out=`` or another keyword :func:`polyak.average`
            takes but a module cannot; ``SchemeError`` for scheme problems).
        FormatError: An unreadable, corrupt or unsafe checkpoint.
        MismatchError: Names differ (strict) or shapes differ (always); all listed at once,
            before the module is touched. Also when a tied tensor's names hold different
            averages.
        NonFiniteError: A member holds NaN/Inf. Found while streaming: the tensors before
            it are already loaded, so reload the module (or fix the member) before use.

    Example:
        >>> import torch, polyak
        >>> from polyak.torch import load_average
        >>> m = torch.nn.Linear(2, 1)
        >>> a = {"weight": torch.zeros(1, 2), "bias": torch.zeros(1)}
        >>> b = {"weight": torch.ones(1, 2), "bias": torch.full((1,), 3.0)}
        >>> report = load_average(m, [a, b])
        >>> m.weight.tolist(), m.bias.tolist(), report.missing
        ([[0.5, 0.5]], [1.5], [])
    """
    from .._engine.average import choose_members
    from .._engine.members import check_members, open_members
    from .._engine.stream import average_sources

    if "out" in kwargs:
        raise ConfigError("load_average fills a module; use polyak.average(out=...) to write a file")
    other = sorted(set(kwargs) - set(OPTIONS))
    if other:
        raise ConfigError(
            f"load_average does not take {', '.join(other)}: it fills a module in place; it takes "
            f"{', '.join(OPTIONS)}"
        )
    opts = dict(kwargs)
    opts.setdefault("strip_prefix", WRAPPER_PREFIXES)
    int_policy = opts.pop("int_policy", "newest")
    progress = opts.pop("progress", False)
    pick = choose_members(
        list(checkpoints), scheme=scheme, alpha=opts.pop("alpha", None), weights=opts.pop("weights", None),
        last=opts.pop("last", None), order=opts.pop("order", "number"),
    )
    with open_members(pick.members, **opts) as sources:
        infos = check_members(sources, int_policy=int_policy)
        writer, order, report = _plan(module, infos, strict=strict)
        average_sources(sources, pick.weights, infos=order, int_policy=int_policy, writer=writer, progress=progress)
    return report
