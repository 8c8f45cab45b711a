"""Shared PyTorch helpers: canonical tensor names, the live tensors of a module, ranks.

Every part of :mod:`polyak.torch` lists a module's tensors through :func:`named_tensors`,
the single place that decides which (name, tensor) pairs exist; a sharded (DTensor) module
only needs a different implementation here.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .._errors import MismatchError
from .._online import AVERAGER_META_KEY

__all__ = [
    "LABEL_KEYS",
    "META_KEY",
    "WRAPPER_PREFIXES",
    "Slot",
    "canonical_name",
    "feed",
    "is_averaged",
    "is_writer_rank",
    "local_tensor",
    "move_batch",
    "named_slots",
    "named_tensors",
    "split_targets",
]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Prefixes that wrappers add to tensor names, ignored wherever polyak matches names.

``module.`` (``DataParallel``, ``DistributedDataParallel``) and ``_orig_mod.``
(``torch.compile``): averagers, :func:`load_average` and :func:`evaluator` compare names
without them (:func:`canonical_name`), so a wrapped model and its checkpoints match the
bare model's.
"""


#: Metadata key of the record that an averager file (``EMA.save``, ``export``) carries.
META_KEY = AVERAGER_META_KEY


def canonical_name(name: str) -> str:
    """A tensor name without the wrapper prefixes, as polyak matches names.

    Args:
        name: A name from a (possibly wrapped) module's ``state_dict``.

    Returns:
        ``name`` with every leading :data:`WRAPPER_PREFIXES` entry removed, in any order
        and repetition; prefixes inside the name are kept.

    Example:
        >>> from polyak.torch import canonical_name
        >>> canonical_name("module._orig_mod.fc.weight"), canonical_name("encoder.module.weight")
        ('fc.weight', 'encoder.module.weight')
    """
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


def is_averaged(t: torch.Tensor) -> bool:
    """Whether a tensor is averaged (floating or complex) rather than copied (int, bool)."""
    return t.is_floating_point() or t.is_complex()


Slot = tuple[dict[str, Any], str]


def named_slots(module: torch.nn.Module, *, buffers: bool = True) -> Iterator[tuple[str, Slot, bool]]:
    """Where each piece of the module's state lives: ``(canonical name, (container, key), is_parameter)``.

    ``container[key]`` is the live tensor (a submodule's ``_parameters`` or ``_buffers``
    dict), so a caller can re-read it cheaply every step, also after ``module.to()``
    replaced the buffers. Parameters come first (tied parameters once, under their first
    name), then the persistent buffers (those in ``state_dict``); non-persistent buffers
    are rebuilt by the module and are not state.
    """
    seen: set[str] = set()
    tensors: set[int] = set()
    modules = list(module.named_modules())
    kinds = [("parameters", True)] + ([("buffers", False)] if buffers else [])
    for kind, is_param in kinds:
        for mod_name, mod in modules:
            container: dict[str, Any] = getattr(mod, f"_{kind}")
            skip = () if is_param else mod._non_persistent_buffers_set
            for t_name, t in container.items():
                if t is None or t_name in skip or id(t) in tensors:
                    continue
                tensors.add(id(t))
                key = canonical_name(f"{mod_name}.{t_name}" if mod_name else t_name)
                if key in seen:
                    raise MismatchError(f"two {kind} are named {key!r} once wrapper prefixes are removed")
                seen.add(key)
                yield key, (container, t_name), is_param


def named_tensors(module: torch.nn.Module, *, buffers: bool = True) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """The module's state as ``(canonical name, tensor, is_parameter)`` (see :func:`named_slots`)."""
    for name, (container, key), is_param in named_slots(module, buffers=buffers):
        yield name, local_tensor(container[key]), is_param


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), sharing its storage; any other tensor as is.

    Averagers keep and update only this shard: EMA is elementwise, so no communication is
    needed (see :mod:`polyak.torch._dist` for saving and exporting sharded averages).
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and isinstance(t, dtensor):
        return t.to_local()
    return t


def is_writer_rank() -> bool:
    """True unless ``torch.distributed`` is initialised and this process is not rank 0."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return bool(dist.get_rank() == 0)


def move_batch(batch: Any, device: torch.device | str | None) -> Any:
    """Move every tensor in a (nested) batch to ``device``; other values are kept."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_batch(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_batch(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


#: Where dict batches keep their targets; the first of these keys present holds them.
LABEL_KEYS = ("labels", "label", "targets", "target", "y")


def split_targets(batch: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """A dict batch's model inputs and its targets (``None`` when it has none).

    The targets are the value of the first of :data:`LABEL_KEYS` the batch holds; every
    other entry is an input. The one rule for every dict batch polyak runs (``evaluator``,
    ``update_bn``).

    Example:
        >>> split_targets({"x": 1, "labels": 2})
        ({'x': 1}, 2)
    """
    inputs = dict(batch)
    for key in LABEL_KEYS:
        if key in inputs:
            targets = inputs.pop(key)
            return inputs, targets
    return inputs, None


def feed(model: Any, batch: Any) -> Any:
    """The default way to run a batch: ``model(x)`` for ``(x, ...)``, ``model(**inputs)`` for a
    dict, its targets left out (:func:`split_targets`)."""
    if isinstance(batch, Mapping):
        return model(**split_targets(batch)[0])
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)
