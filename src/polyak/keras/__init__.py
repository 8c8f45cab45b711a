"""polyak for Keras 3: capture members, average models, EMA during ``fit``, BatchNorm repair.

Importing this module imports Keras (any backend). The file formats themselves
(``.keras``, ``.weights.h5``, legacy ``.h5``) are read and written by ``polyak.average``
without Keras.

Example:
    The tutorial's recipe: save the models of the last epochs of one ``fit``, then average
    their weights.

    >>> import numpy as np, tempfile, keras
    >>> import polyak.keras as pk
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="sgd", loss="mse")
    >>> cb = pk.CheckpointCallback(tempfile.mkdtemp(), start_epoch=2)  # epochs 2 and 3 (0-based)
    >>> x, y = np.ones((8, 2), "float32"), np.ones((8, 1), "float32")
    >>> _ = model.fit(x, y, epochs=4, batch_size=4, verbose=0, callbacks=[cb])
    >>> [p.name for p in cb.saved]
    ['model_2.keras', 'model_3.keras']
    >>> avg = pk.average_models(pk.load_models(cb.directory), scheme="linear")
    >>> avg.evaluate(x, y, verbose=0) >= 0.0  # a compiled model, like the newest member
    True
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from .._engine.average import average as _average
from .._engine.members import order_members
from .._errors import ConfigError, PolyakError
from .._layout import compare_layouts, quoted
from ..formats._memory import MappingSource
from ._checkpoint import CheckpointCallback
from ._ema import EMACallback
from ._load import load_model as _load_model
from ._names import variable_names
from ._posthoc import PostHocEMACallback

__all__ = [
    "CheckpointCallback",
    "EMACallback",
    "PostHocEMACallback",
    "average_models",
    "evaluator",
    "load_models",
    "update_bn",
    "variable_names",
]

_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_NUMBER = re.compile(r"(\d+)")


def _require_built(model: Any, what: str) -> None:
    if not isinstance(model, keras.Model):
        raise ConfigError(f"{what} is a {type(model).__name__}, not a keras.Model")
    if not model.weights:
        raise PolyakError(
            f"{what} ({model.name}) has no weights yet: build it first with "
            "model.build(input_shape) or by calling it on a batch, e.g. model(x[:1])"
        )



def average_models(
    models: Sequence[Any],
    *,
    scheme: str = "equal",
    alpha: float = 2.0,
    weights: Sequence[float] | None = None,
    template: Any | None = None,
    build_fn: Callable[[], Any] | None = None,
) -> Any:
    """A new model whose weights are the weighted average of ``models``' weights.

    This is the tutorial's ``model_weight_ensemble``. Models are given oldest → newest; the
    weights come from :func:`polyak.scheme_weights` (equal, linear ``n − j`` or exponential
    ``exp(−(j+1)/alpha)`` for the ``j``-th newest), or ``weights`` (oldest → newest).
    Floating weights are summed in float32 (float64 for float64) and stored in their own
    dtype; integer variables are copied from the newest model.

    Weights are matched by name (their ``.weights.h5`` names, see :func:`variable_names`),
    never by position, so models whose layers were created in another order still average
    layer by layer, and models that differ are refused with every difference listed: names,
    shapes and dtypes must agree across ``models``. The receiving model needs the same names
    and shapes; its dtypes may differ (each average is cast when assigned).

    Sequential and Functional models are cloned from the newest with
    ``keras.models.clone_model`` (and compiled like it, if it was compiled); for subclassed
    models pass ``template`` (a built model of the same architecture that receives the
    average and is returned) or ``build_fn`` (returns a new built model).

    Args:
        models: Built Keras models of one architecture, oldest → newest.
        scheme: ``"equal"``, ``"linear"``, ``"exponential"`` or ``"custom"``.
        alpha: Decay rate of ``"exponential"``.
        weights: Custom weights, oldest → newest (implies ``scheme="custom"``).
        template: Model that receives the averaged weights.
        build_fn: Zero-argument function returning a built model to receive them.

    Returns:
        The model holding the average.

    Raises:
        ConfigError: No models, an object that is not a ``keras.Model``, or invalid
            weighting options (``SchemeError``).
        PolyakError: A model has no weights yet (build it or call it on a batch first), or
            a subclassed model cannot be cloned (pass ``template`` or ``build_fn``).
        MismatchError: The models' weights differ in names, shapes or dtypes, or the
            receiving model's in names or shapes (all listed at once).

    Example:
        >>> import numpy as np, keras
        >>> from polyak.keras import average_models
        >>> def member(w):  # a model whose kernel is all w
        ...     m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        ...     m.set_weights([np.full((2, 1), w, "float32"), np.zeros(1, "float32")])
        ...     return m
        >>> avg = average_models([member(1.0), member(2.0), member(4.0)], scheme="linear")
        >>> [round(v, 4) for v in avg.get_weights()[0].ravel().tolist()]  # (1·1 + 2·2 + 3·4) / 6
        [2.8333, 2.8333]
    """
    models = list(models)
    if not models:
        raise ConfigError("no models given")
    for i, m in enumerate(models):
        _require_built(m, f"model {i}")
    # By name (the .weights.h5 names), never by position: check_members lists every difference.
    members = [
        MappingSource(dict(zip(variable_names(m), m.get_weights(), strict=True)), f"model {i} ({m.name})")
        for i, m in enumerate(models)
    ]
    avg = _average(members, scheme=scheme, alpha=alpha, weights=weights, order="given")
    newest = models[-1]
    if template is not None:
        target = template
    elif build_fn is not None:
        target = build_fn()
    else:
        try:
            target = keras.models.clone_model(newest)
        except (NotImplementedError, TypeError, ValueError) as exc:
            raise PolyakError(
                f"cannot clone the subclassed model {newest.name} ({exc}); pass template=<a "
                "built model of the same class> or build_fn=<function returning one>"
            ) from None
    if not target.weights and not target.built:
        raise PolyakError(
            f"the model to receive the average ({target.name}) has no weights yet: pass a "
            "template or build_fn that returns a built model (call it on a batch first)"
        )
    names = variable_names(target)
    compare_layouts(avg, dict(zip(names, target.weights, strict=True)), ("the average", target.name),
                    dtypes=False).raise_if_any(
        f"the averaged weights do not fit {target.name}",
        fix="pass a template or build_fn that builds the models' architecture",
    )
    target.set_weights([avg[n] for n in names])
    if target is not template and getattr(newest, "compiled", False) and not getattr(target, "compiled", False):
        try:
            config = newest.get_compile_config()
            if config:
                target.compile_from_config(config)
        except Exception:  # a custom loss/metric that does not serialise: leave uncompiled
            pass
    return target


def _epoch_of(path: Path) -> int | None:
    numbers = _NUMBER.findall(path.name)
    return int(numbers[-1]) if numbers else None


def load_models(
    pattern_or_dir: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    start: int | None = None,
    end: int | None = None,
    compile: bool = True,
) -> list[Any]:
    """Load saved models (``.keras`` or legacy ``.h5``) oldest → newest by epoch number.

    The tutorial's ``load_all_models(n_start, n_end)``: ``start``/``end`` select epochs
    like ``range(start, end)`` (the last number in each file name is its epoch).

    Args:
        pattern_or_dir: A folder (every ``.keras``/``.h5`` file in it), a glob pattern
            (``"ckpt/model_*.keras"``) or a list of paths.
        start: First epoch to load (inclusive).
        end: Epoch to stop before (exclusive).
        compile: Passed to ``keras.models.load_model``.

    Each file is loaded with ``keras.models.load_model(path, safe_mode=True)``: Keras builds
    the model from the file's config, and its safe mode refuses code stored in the file.

    Returns:
        The loaded models, oldest → newest (ordered by the numbers in their file names).

    Raises:
        ConfigError: Nothing matched.
        UnsafeFileError: A file holds a ``Lambda`` layer with a Python function (Keras' safe
            mode refuses it); the message names the file and the layer.

    Example:
        >>> import numpy as np, tempfile, keras
        >>> from polyak.keras import load_models
        >>> folder = tempfile.mkdtemp()
        >>> for epoch in (1, 2, 10):
        ...     m = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        ...     m.set_weights([np.full((2, 1), epoch, "float32"), np.zeros(1, "float32")])
        ...     m.save(f"{folder}/model_{epoch}.keras")
        >>> [float(m.get_weights()[0][0, 0]) for m in load_models(folder, start=2)]  # epochs 2 and 10
        [2.0, 10.0]
    """
    if isinstance(pattern_or_dir, (str, os.PathLike)):
        p = Path(pattern_or_dir)
        if p.is_dir():
            paths = [q for q in p.iterdir() if q.is_file() and q.name.endswith(_MODEL_SUFFIXES)
                     and not q.name.startswith(".")]
        else:
            paths = [Path(q) for q in glob.glob(str(pattern_or_dir))]
        where = str(pattern_or_dir)
    else:
        paths = [Path(q) for q in pattern_or_dir]
        where = "the given paths"
    chosen = []
    for q in paths:
        epoch = _epoch_of(q)
        if (start is not None or end is not None) and epoch is None:
            continue
        if start is not None and epoch is not None and epoch < start:
            continue
        if end is not None and epoch is not None and epoch >= end:
            continue
        chosen.append(q)
    if not chosen:
        raise ConfigError(f"no Keras model files (.keras, .h5) found in {where} for epochs [{start}, {end})")
    ordered = order_members(chosen, "number")
    return [_load_model(Path(q), compile=compile) for q in ordered]  # type: ignore[arg-type]


def evaluator(
    model: Any,
    x: Any,
    y: Any = None,
    *,
    batch_size: int | None = None,
    metrics: Sequence[str] | None = None,
) -> Callable[[Mapping[str, np.ndarray]], dict[str, float]]:
    """A function that evaluates a name-keyed state on ``(x, y)`` with ``model``.

    The returned function assigns the state (tensor names as in ``.keras`` /
    ``.weights.h5`` files: ``layers/dense/vars/0``) into the compiled ``model``, runs
    ``model.evaluate``, restores the model's own weights and returns
    ``{metric: value}`` (all of ``evaluate``'s metrics, or those named in ``metrics``).
    Variables absent from the state keep their value; each state array is cast to its
    variable's dtype (a float32 average evaluates in a float16 model).

    Args:
        model: A built and compiled Keras model of the states' architecture.
        x: Inputs, as ``model.evaluate`` takes them (arrays, a ``tf.data.Dataset``, a
            ``keras.utils.PyDataset``...).
        y: Targets (``None`` when ``x`` yields them).
        batch_size: Passed to ``model.evaluate``.
        metrics: Keep only these of ``evaluate``'s results (default: all, ``loss`` included).

    Returns:
        ``evaluate(state) -> {metric: value}``, for :func:`polyak.sweep`,
        :func:`polyak.greedy_soup` and :func:`polyak.posthoc_sweep`.

    Raises:
        ConfigError: The model is not a ``keras.Model``; (when called) a name in ``metrics``
            that ``evaluate`` does not report.
        PolyakError: The model is not built or not compiled.
        MismatchError: (when called) a state name the model does not have, or a shape
            conflict; all listed at once.

    Example:
        >>> import numpy as np, keras
        >>> from polyak.keras import evaluator
        >>> model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
        >>> model.compile(loss="mse", metrics=["mae"])
        >>> x = np.array([[1.0], [2.0]], "float32")
        >>> evaluate = evaluator(model, x, 2 * x)  # the data of y = 2x
        >>> evaluate({"layers/dense/vars/0": np.array([[3.0]], "float32")})
        {'loss': 2.5, 'mae': 1.5}
    """
    _require_built(model, "the model")
    if not getattr(model, "compiled", False):
        raise PolyakError(f"{model.name} is not compiled; call model.compile(loss=..., metrics=[...]) first")
    variables = list(model.weights)
    names = variable_names(model, variables)
    by_name = dict(zip(names, variables, strict=True))

    def evaluate(state: Mapping[str, np.ndarray]) -> dict[str, float]:
        compare_layouts(by_name, state, (model.name, "the state"), dtypes=False, missing_ok=True).raise_if_any(
            f"the state does not fit {model.name}",
            fix=f"name tensors as the model's .weights.h5 file does; its names look like {quoted(names, 3)}",
        )
        saved = {k: keras.ops.convert_to_numpy(by_name[k]) for k in state}
        try:
            for k, v in state.items():
                by_name[k].assign(np.asarray(v))
            result = model.evaluate(x, y, batch_size=batch_size, verbose=0, return_dict=True)
        finally:
            for k, v in saved.items():
                by_name[k].assign(v)
        out = {k: float(v) for k, v in result.items()}
        if metrics is not None:
            missing = [m for m in metrics if m not in out]
            if missing:
                raise ConfigError(f"metrics {missing} not reported by evaluate; it reports {sorted(out)}")
            out = {m: out[m] for m in metrics}
        return out

    return evaluate


def _batches(data: Any, batch_size: int) -> Iterable[Any]:
    if isinstance(data, np.ndarray) or (hasattr(data, "shape") and hasattr(data, "dtype")):
        n = int(data.shape[0])
        for i in range(0, n, batch_size):
            yield data[i : i + batch_size]
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def update_bn(model: Any, data: Any, *, steps: int | None = None, batch_size: int = 32) -> Any:
    """Recompute BatchNormalization moving statistics by one pass over training data.

    Averaged weights need statistics computed with those weights. Like
    ``torch.optim.swa_utils.update_bn``, the moving mean and variance become the
    cumulative mean of the per-batch statistics (each BatchNormalization's ``momentum`` is
    set to ``k/(k+1)`` for the ``k``-th batch, then restored), with Keras' own batch
    statistics (biased variance). Nothing else changes; layers made non-trainable are
    updated too (and left non-trainable).

    Args:
        model: A built Keras model.
        data: A numpy array of inputs (split into ``batch_size`` batches), or an iterable of
            batches (``x`` or ``(x, y[, w])``), e.g. a ``keras.utils.PyDataset``.
        steps: Use at most this many batches.
        batch_size: Batch size for array input.

    Returns:
        ``model`` (updated in place).

    Raises:
        ConfigError: ``model`` is not a ``keras.Model``, or ``data`` gives no batches.
        PolyakError: The model is not built yet.

    Example:
        >>> import numpy as np, keras
        >>> from polyak.keras import update_bn
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization()])
        >>> x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]], "float32")
        >>> bn = update_bn(model, x, batch_size=2).layers[0]
        >>> keras.ops.convert_to_numpy(bn.moving_mean).tolist()  # the mean of the batches' means
        [3.0, 4.0]
        >>> keras.ops.convert_to_numpy(bn.moving_variance).tolist()  # and of their (biased) variances
        [1.0, 1.0]
    """
    _require_built(model, "the model")
    bns = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    if not bns:
        return model
    saved = [(bn, bn.momentum, bn.trainable) for bn in bns]
    try:
        for bn in bns:
            bn.trainable = True
        k = 0
        for batch in _batches(data, batch_size):
            if steps is not None and k >= steps:
                break
            for bn in bns:
                bn.momentum = k / (k + 1.0)
            model(batch, training=True)
            k += 1
        if k == 0:
            raise ConfigError("update_bn: the data gave no batches")
    finally:
        for bn, momentum, trainable in saved:
            bn.momentum = momentum
            bn.trainable = trainable
    return model


