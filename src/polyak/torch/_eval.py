"""After averaging: recompute BatchNorm statistics (:func:`update_bn`) and evaluate states."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import numpy as np
import torch

from .._errors import ConfigError
from .._layout import compare_layouts
from ..formats.torch_pt import numpy_to_tensor
from ._common import LABEL_KEYS, canonical_name, feed, move_batch, split_targets

__all__ = ["Evaluate", "evaluator", "update_bn"]


@torch.no_grad()
def update_bn(
    model: torch.nn.Module,
    loader: Iterable[Any],
    *,
    call: Callable[[torch.nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Recompute the running statistics of every BatchNorm layer with one pass over ``loader``.

    Averaged weights need statistics of their own: the averaged running mean/variance are
    not the statistics of the averaged network. Every ``torch.nn.modules.batchnorm._BatchNorm``
    (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants) is reset and, with ``momentum=None``,
    accumulates a cumulative (equal) average over the pass. Momenta and each module's
    train/eval mode are restored afterwards. Runs under ``torch.no_grad()``.

    Args:
        model: The model (usually after ``copy_to`` or ``load_average``).
        loader: Iterable of batches (a ``DataLoader``).
        call: ``call(model, batch)`` runs one batch. Default: ``model(batch[0])`` for a
            tuple/list batch, ``model(**inputs)`` for a dict (its targets, under ``labels``,
            ``label``, ``targets``, ``target`` or ``y``, left out, as :func:`evaluator`
            leaves them out), else ``model(batch)``.
        device: Move the tensors of each batch to this device first.

    Returns:
        The number of batches seen (0 when the model has no BatchNorm: nothing is run).

    Example:
        >>> import torch
        >>> from polyak.torch import update_bn
        >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
        >>> update_bn(m, [(torch.randn(8, 3), None)])
        1
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    run = call or feed
    modes = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in norms}
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    seen = 0
    try:
        for batch in loader:
            run(model, move_batch(batch, device))
            seen += 1
    finally:
        for bn, momentum in momenta.items():
            bn.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    return seen


class Evaluate(Protocol):
    """``evaluate(state) -> metrics``: what :func:`evaluator` returns and :func:`polyak.sweep` calls.

    Called with a state (tensor name → numpy array), it scores those weights in the
    module; called with no state, the module as it is. Returns ``{metric: value}``.

    Example:
        >>> import torch
        >>> from polyak.torch import evaluator
        >>> model = torch.nn.Linear(2, 1)
        >>> evaluate = evaluator(model, [(torch.ones(4, 2), torch.full((4, 1), 3.0))])
        >>> evaluate({"weight": torch.ones(1, 2).numpy(), "bias": torch.ones(1).numpy()})  # 1 + 1 + 1 = 3
        {'loss': 0.0}
    """

    def __call__(self, state: Mapping[str, np.ndarray] | None = None) -> dict[str, float]: ...


def _default_call(model: torch.nn.Module, batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        inputs, targets = split_targets(batch)
        if targets is None:
            raise ConfigError(f"dict batches need the targets under one of {list(LABEL_KEYS)}, or pass call=")
        return model(**inputs), targets
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return model(batch[0]), batch[1]
    raise ConfigError("batches must be (inputs, targets) pairs or dicts with 'labels'; otherwise pass "
                      "call=lambda model, batch: (outputs, targets)")


def default_metric(outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The metrics :func:`evaluator` measures by default: loss and accuracy, or MSE.

    Args:
        outputs: The model's outputs for a batch (logits; an object with a ``logits``
            attribute, such as a Hugging Face model output, is read through it).
        targets: The batch's targets.

    Returns:
        For integer class targets (one dimension fewer than ``outputs``): the mean
        cross-entropy ``loss`` and the ``accuracy`` of the arg-max. Otherwise the mean
        squared error as ``loss`` (targets reshaped to the outputs' shape).

    Example:
        >>> import torch
        >>> from polyak.torch import default_metric
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> {k: round(v, 4) for k, v in default_metric(logits, torch.tensor([0, 0])).items()}
        {'loss': 1.1269, 'accuracy': 0.5}
        >>> default_metric(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0]))
        {'loss': 2.0}
    """
    outputs = getattr(outputs, "logits", outputs)
    if not targets.is_floating_point() and outputs.ndim == targets.ndim + 1:
        loss = torch.nn.functional.cross_entropy(outputs.float(), targets.long())
        accuracy = (outputs.argmax(dim=-1) == targets).float().mean()
        return {"loss": float(loss), "accuracy": float(accuracy)}
    mse = torch.nn.functional.mse_loss(outputs.float(), targets.float().reshape(outputs.shape))
    return {"loss": float(mse)}


def evaluator(
    module: torch.nn.Module,
    loader: Iterable[Any],
    metric: Callable[[Any, Any], Any] | None = None,
    *,
    call: Callable[[torch.nn.Module, Any], tuple[Any, Any]] | None = None,
    device: torch.device | str | None = None,
) -> Evaluate:
    """An ``evaluate(state) -> {metric: value}`` function for :func:`polyak.sweep`.

    Each call loads ``state`` (tensor name → numpy array, e.g. an average) into ``module``,
    runs ``loader`` in eval mode under ``torch.no_grad()``, and puts the module's own
    weights and train/eval modes back, also on errors. ``evaluate()`` with no state
    evaluates the module as it is. The state may hold a subset of the module's tensors
    (the others keep their values); every name it holds must be the module's, with the
    same shape, and is cast to the module tensor's dtype (a float32 average evaluates in a
    bf16 module).

    Args:
        module: The model to evaluate (names match with ``module.``/``_orig_mod.`` ignored).
        loader: Re-iterable batches (a ``DataLoader`` or a list).
        metric: ``metric(outputs, targets)`` returning a float, a scalar tensor or a dict of
            them; averaged over batches weighted by batch size. Default: for integer
            targets ``{"loss": cross-entropy, "accuracy": ...}``, otherwise
            ``{"loss": mean squared error}``.
        call: ``call(model, batch) -> (outputs, targets)``. Default: ``(model(x), y)`` for
            ``(x, y, ...)`` batches; for dicts the targets are popped from ``labels``
            (``label``, ``targets``, ``target``, ``y``) and ``model(**rest)`` is called.
        device: Move each batch to this device first.

    Returns:
        The evaluate function (see :class:`Evaluate`).

    Raises:
        MismatchError: (when called) a state name the module does not have, or a shape
            conflict; all listed at once.
        ConfigError: (when called) the loader gives no batches, or a batch that is neither
            an ``(inputs, targets)`` pair nor a dict with targets (pass ``call=``).

    Example:
        >>> import torch, polyak
        >>> from polyak.torch import evaluator
        >>> x = torch.tensor([[1.0], [2.0]]); y = 2 * x  # the data of y = 2x
        >>> model = torch.nn.Linear(1, 1, bias=False)
        >>> members = [{"weight": torch.tensor([[1.0]])}, {"weight": torch.tensor([[3.0]])}]
        >>> res = polyak.sweep(members, evaluator(model, [(x, y)]), schemes=["equal"])
        >>> [(r.name, r.n, r.value("loss", "eval")) for r in res.select_rows(kind="average")]
        [('equal', 1, 2.5), ('equal', 2, 0.0)]
    """
    run = call or _default_call
    score = metric or default_metric

    @torch.no_grad()
    def evaluate(state: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
        live = {canonical_name(k): t for k, t in module.state_dict(keep_vars=True).items()}
        given = {} if state is None else {canonical_name(k): v for k, v in state.items()}
        compare_layouts(live, given, ("the module", "the state"), dtypes=False, missing_ok=True).raise_if_any(
            "the state does not fit the module",
            fix="evaluate states of this module's architecture (names as in its state_dict; module./_orig_mod. ignored)",
        )
        backup = {k: live[k].detach().clone() for k in given}
        modes = {m: m.training for m in module.modules()}
        try:
            for k, v in given.items():
                live[k].copy_(numpy_to_tensor(np.asarray(v)))
            module.eval()
            totals: dict[str, float] = {}
            count = 0
            for batch in loader:
                outputs, targets = run(module, move_batch(batch, device))
                value = score(outputs, targets)
                if not isinstance(value, Mapping):
                    value = {"metric": value}
                n = int(targets.shape[0]) if hasattr(targets, "shape") and len(targets.shape) else 1
                for key, x in value.items():
                    totals[key] = totals.get(key, 0.0) + float(x) * n
                count += n
            if not count:
                raise ConfigError("the evaluation loader gave no batches")
            return {k: v / count for k, v in totals.items()}
        finally:
            for k, raw in backup.items():
                live[k].copy_(raw)
            for m, mode in modes.items():
                m.training = mode

    return evaluate
