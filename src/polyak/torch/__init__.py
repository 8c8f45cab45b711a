"""polyak for PyTorch: capture checkpoints, online EMA/SWA, averaged modules, BatchNorm repair.

Importing this module imports torch (the core ``polyak`` package never does).

* :class:`CheckpointSaver`: save ``state_dict`` every k epochs/steps from a start point,
  keep the newest K files, atomic writes, step/epoch/time in the metadata.
* :class:`EMA`, :class:`SWA`: online averagers with one interface: ``update()``,
  ``copy_to(model)``, ``average_parameters(model)`` (swap in, restore on exit),
  ``state_dict()``/``load_state_dict()`` (exact resume), ``save(path)``/``load(path, model)``.
* :class:`PostHocEMA`: power-function EMAs with snapshots on disk, to choose the EMA
  width after training (:func:`polyak.posthoc`, :func:`polyak.posthoc_sweep`).
* :func:`load_average`: fill a module with the average of saved checkpoints.
* :func:`update_bn`: recompute BatchNorm statistics after averaging.
* :func:`evaluator`: an ``evaluate(state) -> metrics`` function for :func:`polyak.sweep`.

Example:
    >>> import torch
    >>> from polyak.torch import EMA
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> ema = EMA(model, decay=0.99)
    >>> for _ in range(3):
    ...     opt.zero_grad(); model(torch.ones(1, 3)).sum().backward(); opt.step()
    ...     ema.update()
    >>> with ema.average_parameters(model):
    ...     _ = model(torch.ones(1, 3))
"""

from __future__ import annotations

import torch  # noqa: F401  - the user opted in to torch by importing polyak.torch

from ._averagers import AveragerState as AveragerState
from ._checkpoints import CheckpointSaver as CheckpointSaver
from ._common import WRAPPER_PREFIXES as WRAPPER_PREFIXES
from ._common import canonical_name as canonical_name
from ._dist import export as export
from ._dist import full_state_dict as full_state_dict
from ._dist import load_full_state_dict as load_full_state_dict
from ._dist import load_sharded as load_sharded
from ._dist import save_sharded as save_sharded
from ._ema import EMA as EMA
from ._ema import SWA as SWA
from ._eval import Evaluate as Evaluate
from ._eval import default_metric as default_metric
from ._eval import evaluator as evaluator
from ._eval import update_bn as update_bn
from ._load import LoadReport as LoadReport
from ._load import load_average as load_average
from ._posthoc import PostHocEMA as PostHocEMA

__all__ = [
    "EMA",
    "SWA",
    "WRAPPER_PREFIXES",
    "AveragerState",
    "CheckpointSaver",
    "Evaluate",
    "LoadReport",
    "PostHocEMA",
    "canonical_name",
    "default_metric",
    "evaluator",
    "export",
    "full_state_dict",
    "load_average",
    "load_full_state_dict",
    "load_sharded",
    "save_sharded",
    "update_bn",
]
