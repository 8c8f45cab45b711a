"""The tutorial's MLP as plain numpy: weights from either framework, forward pass, metrics.

The model is ``Dense(25, relu, he_uniform) → Dense(3, softmax)``. Checkpoints from Keras
and PyTorch name and lay out its four tensors differently; :func:`mlp_params` maps both
onto ``W1 (2, 25), b1 (25,), W2 (25, 3), b2 (3,)`` (Keras' ``x @ kernel + bias``
layout; a torch ``Linear.weight`` is the transposed kernel). Evaluating in numpy makes
the sweep independent of the framework and fast: one forward pass over 1000 rows takes
microseconds, no framework model is built per average.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._layout import compare_layouts, quoted
from ._data import Blobs

__all__ = ["FRAMEWORK_NAMES", "Evaluator", "MLPParams", "accuracy", "mlp_params", "predict_proba"]

#: Tensor names of W1, b1, W2, b2 in each framework's checkpoint, and whether the weight
#: matrices are stored transposed (torch ``Linear.weight`` is ``(out, in)``).
#: Keras 3 ``.keras`` files key variables by the layer's position-derived path
#: (``layers/dense``, ``layers/dense_1``), not by the layer's ``name``.
FRAMEWORK_NAMES: dict[str, tuple[tuple[str, str, str, str], bool]] = {
    "keras": (("layers/dense/vars/0", "layers/dense/vars/1", "layers/dense_1/vars/0", "layers/dense_1/vars/1"), False),
    "torch": (("hidden.weight", "hidden.bias", "output.weight", "output.bias"), True),
}


@dataclass(frozen=True)
class MLPParams:
    """The four tensors of the MLP, Keras layout (``y = x @ W + b``)."""

    W1: np.ndarray
    b1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray


def mlp_params(state: Mapping[str, Any], framework: str) -> MLPParams:
    """Pick the MLP's tensors out of a name-keyed state of ``framework``'s checkpoint.

    Args:
        state: Tensor name → array (extra entries, e.g. optimizer variables, are ignored).
        framework: ``"keras"`` or ``"torch"``.

    Returns:
        The tensors in Keras layout, as float32 numpy arrays.

    Raises:
        MismatchError: A tensor is missing (all listed); the message lists what the state
            holds. Only names are checked: the hidden width is the recipe's choice.
    """
    names, transposed = FRAMEWORK_NAMES[framework]
    compare_layouts(dict.fromkeys(names), state, ("the demo MLP", f"the {framework} checkpoint"),
                    shapes=False, unexpected_ok=True).raise_if_any(
        f"the {framework} checkpoint is not the demo MLP's",
        fix=f"it holds {quoted(sorted(state), 12)}; was it saved by `polyak demo --framework {framework}`?",
    )
    w1, b1, w2, b2 = (np.asarray(state[n], dtype=np.float32) for n in names)
    if transposed:
        w1, w2 = w1.T, w2.T
    return MLPParams(w1, b1, w2, b2)


def predict_proba(params: MLPParams, x: np.ndarray) -> np.ndarray:
    """Softmax class probabilities of the MLP for the rows of ``x``."""
    hidden = np.maximum(x @ params.W1 + params.b1, 0.0)
    logits = hidden @ params.W2 + params.b2
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(proba: np.ndarray, y: np.ndarray) -> float:
    """Share of rows whose most probable class is the label."""
    return float(np.mean(proba.argmax(axis=1) == y))


def log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    """Mean categorical cross-entropy (natural log), probabilities clipped as Keras does."""
    p = np.clip(proba[np.arange(len(y)), y], 1e-7, 1.0)
    return float(-np.mean(np.log(p)))


class Evaluator:
    """``evaluate(state) -> metrics`` for the sweep: accuracy and loss on every split.

    Metrics: ``holdout`` (all 1000 held-out rows, the tutorial's "test" accuracy),
    ``validation`` (held-out rows 0..499), ``test`` (held-out rows 500..999), their
    ``*_loss`` (cross-entropy), and with ``train=True`` also ``train``.

    Args:
        data: The tutorial's splits.
        framework: Which framework's tensor names the states use.
        train: Also report accuracy on the 100 training rows.
    """

    def __init__(self, data: Blobs, framework: str, *, train: bool = False) -> None:
        self.data = data
        self.framework = framework
        self.train = train

    def __call__(self, state: Mapping[str, Any]) -> dict[str, float]:
        params = mlp_params(state, self.framework)
        d = self.data
        proba = predict_proba(params, d.x_holdout)
        k = len(d.y_val)
        out = {
            "holdout": accuracy(proba, d.y_holdout),
            "validation": accuracy(proba[:k], d.y_val),
            "test": accuracy(proba[k:], d.y_test),
            "holdout_loss": log_loss(proba, d.y_holdout),
            "validation_loss": log_loss(proba[:k], d.y_val),
            "test_loss": log_loss(proba[k:], d.y_test),
        }
        if self.train:
            out["train"] = accuracy(predict_proba(params, d.x_train), d.y_train)
        return out
