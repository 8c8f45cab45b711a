"""Training the tutorial's MLP, with Keras (one ``fit`` call) or PyTorch (a plain loop).

Both save the members as real checkpoint files while training, with polyak's own
capture tools: ``polyak.keras.CheckpointCallback`` (``.keras`` files) and
``polyak.torch.CheckpointSaver`` (``.safetensors``). The frameworks are imported inside
the functions: the ``polyak`` command must start without them.

The recipe is the tutorial's: ``Dense(25, relu, he_uniform) → Dense(3, softmax)``,
categorical cross-entropy, ``SGD(learning_rate=0.01, momentum=0.9)``, batches of 32 drawn
from a fresh shuffle of the 100 training rows every epoch (the last batch holds 4 rows).

PyTorch matches Keras exactly in what it computes, up to float rounding:

* initialisers: ``he_uniform`` is U(±sqrt(6 / fan_in)) for the hidden kernel,
  ``glorot_uniform`` (Keras' default) U(±sqrt(6 / (fan_in + fan_out))) for the output
  kernel, zero biases;
* SGD with momentum: Keras updates ``v ← m·v − lr·g; w ← w + v`` from ``v = 0``;
  ``torch.optim.SGD(momentum=m, dampening=0)`` updates ``b ← m·b + g; w ← w − lr·b``
  with ``b = g`` on the first step. With ``v = −lr·b`` these are the same recursion,
  first step included (for a constant learning rate);
* the loss: Keras' softmax output + cross-entropy with probabilities clipped to
  [1e-7, 1 − 1e-7] (:func:`keras_crossentropy`; plain ``CrossEntropyLoss`` differs in
  the first steps, where some rows are confidently wrong and Keras' clip stops their
  gradient). The torch module returns logits; the softmax lives in the loss.

The random streams differ (Keras draws from its backend's generator), so the same
``--seed`` gives different runs in the two frameworks; each is deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._progress import Progress
from ._backend import use_keras_backend
from ._data import Blobs, one_hot

__all__ = ["PosthocCapture", "Recipe", "steps_per_epoch", "train_keras", "train_torch"]

#: ``keras.config.epsilon()``: Keras clips probabilities to [eps, 1 - eps] in its losses.
KERAS_EPSILON = 1e-7


@dataclass(frozen=True)
class PosthocCapture:
    """Power EMAs kept during training for post-hoc EMA: where, which widths, how often.

    Attributes:
        folder: The snapshot folder.
        sigma_rels: The tracked widths.
        every: Optimizer steps (batches) between snapshots.
    """

    folder: Path
    sigma_rels: tuple[float, ...]
    every: int


@dataclass(frozen=True)
class Recipe:
    """What to train and which epochs to keep.

    Attributes:
        epochs: Training epochs (the tutorial: 500).
        members: Save the last ``members`` epochs (the tutorial: 10, epochs 490..499).
        hidden: Hidden units (25).
        learning_rate: SGD step (0.01).
        momentum: SGD momentum (0.9).
        batch_size: Rows per step (32).
    """

    epochs: int = 500
    members: int = 10
    hidden: int = 25
    learning_rate: float = 0.01
    momentum: float = 0.9
    batch_size: int = 32

    @property
    def first_saved(self) -> int:
        """Zero-based index of the first saved epoch (490 for the tutorial)."""
        return self.epochs - self.members


def _set_torch_threads() -> None:
    import torch

    # A 2-25-3 MLP on 32 rows: threads only add overhead, and one thread is deterministic.
    torch.set_num_threads(1)


def sgd_momentum(params: list[Any], *, learning_rate: float, momentum: float) -> Any:
    """``torch.optim.SGD(params, lr, momentum)``'s update (dampening 0, no Nesterov), inlined.

    ``b ← m·b + g; w ← w − lr·b`` with ``b = 0`` before the first step, so the first
    step is ``b = g`` as in torch. Bit for bit the same as ``torch.optim.SGD`` (the tests
    check it); written out because constructing a ``torch.optim`` optimizer imports
    ``torch._dynamo`` (~1.2 s here), longer than the whole training run.
    """
    import torch

    buffers = [torch.zeros_like(p) for p in params]

    def step() -> None:
        with torch.no_grad():
            for p, b in zip(params, buffers):
                b.mul_(momentum).add_(p.grad)
                p.add_(b, alpha=-learning_rate)

    return step


def build_torch_mlp(inputs: int, hidden: int, classes: int, *, generator: Any) -> Any:
    """``hidden`` (he_uniform kernel) → ReLU → ``output`` (glorot_uniform kernel), zero biases.

    The module returns logits (softmax lives in the loss and in evaluation).
    """
    import torch
    from torch import nn

    first, second = nn.Linear(inputs, hidden), nn.Linear(hidden, classes)
    model = nn.Sequential()
    model.add_module("hidden", first)
    model.add_module("relu", nn.ReLU())
    model.add_module("output", second)
    with torch.no_grad():
        for layer, limit in (
            (first, math.sqrt(6.0 / inputs)),  # he_uniform: fan_in
            (second, math.sqrt(6.0 / (hidden + classes))),  # glorot_uniform: fan_in + fan_out
        ):
            layer.weight.uniform_(-limit, limit, generator=generator)
            layer.bias.zero_()
    return model


def torch_epoch(model: Any, step: Any, x: Any, y: Any, order: Any, *, batch_size: int, after_step: Any = None) -> None:
    """One epoch of mean cross-entropy SGD over ``x[order]`` in batches (the last may be short);
    ``after_step()`` runs after every optimizer step (an online averager's update)."""
    params = list(model.parameters())
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        for p in params:
            p.grad = None
        keras_crossentropy(model(x[idx]), y[idx]).backward()
        step()
        if after_step is not None:
            after_step()


def keras_crossentropy(logits: Any, y: Any) -> Any:
    """Keras' ``categorical_crossentropy`` on a softmax output, in torch.

    Keras clips the probabilities to ``[1e-7, 1 - 1e-7]`` before the log, so a row whose
    true class has probability below 1e-7 (common in the first steps: the inputs reach
    ±15 and he_uniform weights ±1.7) contributes loss 16.1 and **no gradient**;
    ``torch.nn.CrossEntropyLoss`` would push it. Matching this keeps the torch run on
    Keras' trajectory (the tests check the weights after several epochs agree).
    """
    import torch

    proba = torch.softmax(logits, dim=1).clamp(KERAS_EPSILON, 1.0 - KERAS_EPSILON)
    return -torch.log(proba.gather(1, y[:, None])).mean()


def steps_per_epoch(data: Blobs, recipe: Recipe) -> int:
    """Optimizer steps per epoch (4 for the tutorial: 100 rows in batches of 32)."""
    return -(-len(data.y_train) // recipe.batch_size)


def train_torch(data: Blobs, recipe: Recipe, *, seed: int, directory: Path, quiet: bool = True,
                posthoc: PosthocCapture | None = None) -> list[Path]:
    """Train with PyTorch and save the last ``recipe.members`` epochs as ``.safetensors``.

    Args:
        data: The splits; trains on ``data.x_train``.
        recipe: The training recipe.
        seed: Seeds the initial weights and the per-epoch shuffles.
        directory: Where the checkpoints go.
        quiet: No progress bar.
        posthoc: Also keep power EMAs (``polyak.torch.PostHocEMA``, updated after every
            batch) with snapshots in ``posthoc.folder``.

    Returns:
        The member files, oldest → newest.
    """
    import torch

    from ..torch import CheckpointSaver

    _set_torch_threads()
    gen = torch.Generator().manual_seed(seed)
    model = build_torch_mlp(data.x_train.shape[1], recipe.hidden, data.classes, generator=gen)
    params = list(model.parameters())
    step = sgd_momentum(params, learning_rate=recipe.learning_rate, momentum=recipe.momentum)
    x = torch.from_numpy(np.ascontiguousarray(data.x_train))
    y = torch.from_numpy(data.y_train)
    saver = CheckpointSaver(directory, every=1, unit="epoch", start=recipe.first_saved, format=".safetensors", prefix="model")
    after = None
    if posthoc is not None:
        from ..torch import PostHocEMA

        after = PostHocEMA(model, posthoc.folder, sigma_rels=posthoc.sigma_rels, every=posthoc.every).update
    bar = Progress(recipe.epochs, "training (torch)", enabled=not quiet, unit="epoch")
    for epoch in range(recipe.epochs):
        torch_epoch(model, step, x, y, torch.randperm(len(y), generator=gen), batch_size=recipe.batch_size,
                    after_step=after)
        saver.maybe_save(model, epoch=epoch)
        bar.update()
    bar.close()
    return saver.files()


def build_keras_mlp(inputs: int, classes: int, recipe: Recipe) -> Any:
    """The tutorial's compiled Keras model (weights drawn from Keras' global seed)."""
    import keras

    model = keras.Sequential(
        [
            keras.Input((inputs,)),
            keras.layers.Dense(recipe.hidden, activation="relu", kernel_initializer="he_uniform"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile(
        loss="categorical_crossentropy",
        optimizer=keras.optimizers.SGD(learning_rate=recipe.learning_rate, momentum=recipe.momentum),
    )
    return model


def train_keras(data: Blobs, recipe: Recipe, *, seed: int, directory: Path, quiet: bool = True,
                posthoc: PosthocCapture | None = None) -> list[Path]:
    """Train with Keras in one ``fit`` call; save the last ``recipe.members`` epochs as ``.keras``.

    Keras runs on the backend :func:`polyak.demo._backend.use_keras_backend` picks (the
    user's ``KERAS_BACKEND`` or ``keras.json``, else torch or another installed one).

    Args:
        data: The splits; trains on ``data.x_train``.
        recipe: The training recipe.
        seed: ``keras.utils.set_random_seed(seed)``: initial weights and shuffles.
        directory: Where the checkpoints go.
        quiet: No progress bar.
        posthoc: Also keep power EMAs (``polyak.keras.PostHocEMACallback``, updated after
            every batch) with snapshots in ``posthoc.folder``.

    Returns:
        The member files, oldest → newest.
    """
    use_keras_backend()
    import keras

    from ..keras import CheckpointCallback

    if keras.backend.backend() == "torch":
        _set_torch_threads()
    keras.utils.set_random_seed(seed)
    classes = data.classes
    model = build_keras_mlp(data.x_train.shape[1], classes, recipe)
    bar = Progress(recipe.epochs, "training (keras)", enabled=not quiet, unit="epoch")

    class _Bar(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            bar.update()

    saver = CheckpointCallback(directory, start_epoch=recipe.first_saved, every=1, format=".keras", prefix="model_epoch")
    callbacks: list[Any] = [saver, _Bar()]
    if posthoc is not None:
        from ..keras import PostHocEMACallback

        callbacks.append(PostHocEMACallback(posthoc.folder, sigma_rels=posthoc.sigma_rels, every=posthoc.every))
    model.fit(
        data.x_train,
        one_hot(data.y_train, classes),
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        shuffle=True,
        verbose=0,
        callbacks=callbacks,
    )
    bar.close()
    return list(saver.saved)

