"""Names of a live Keras model's variables as they appear in its ``.weights.h5`` file.

polyak keys Keras tensors by their HDF5 path (``layers/dense/vars/0``), which follows the
object tree Keras walks when saving, not ``Variable.path`` (that one depends on how and
where the model was built). To name a live model's variables the same way, the model is
"saved" into a recording store that keeps, for each variable object, the path it would be
written to; nothing is written. If this Keras version's saving internals differ, names
fall back to ``Variable.path``.
"""

from __future__ import annotations

from typing import Any

import keras

__all__ = ["variable_names"]


def _record(model: Any) -> dict[int, str]:
    from keras.src.saving import saving_lib

    paths: dict[int, str] = {}

    class _Entry(dict):  # type: ignore[type-arg,unused-ignore]
        def __init__(self, prefix: str) -> None:
            super().__init__()
            self.prefix = prefix

        def __setitem__(self, key: str, value: Any) -> None:
            paths.setdefault(id(value), f"{self.prefix}vars/{key}")

    class _Recorder(saving_lib.H5IOStore):  # type: ignore[misc,unused-ignore]
        def __init__(self) -> None:  # no file: only make() is used
            self.mode = "w"

        def __bool__(self) -> bool:
            return True

        def make(self, path: str, metadata: Any = None) -> _Entry:
            return _Entry(f"{path}/" if path else "")

        def close(self) -> None:
            pass

    saving_lib._save_state(
        model,
        weights_store=_Recorder(),
        assets_store=None,
        inner_path="",
        visited_saveables=set(),
    )
    return paths


def variable_names(model: Any, variables: list[Any] | None = None) -> list[str]:
    """The names polyak gives a live model's variables: those of its ``.weights.h5`` file.

    Names are unique; variables the recorder cannot place (layers that save computed
    values instead of their variables) are named by ``Variable.path``. These are the names
    of averaged states (``polyak.average`` of Keras files) and of the states that
    :func:`evaluator` takes.

    Args:
        model: A built Keras model.
        variables: The variables to name (default: ``model.weights``, in that order).

    Returns:
        One name per variable, in the order given.

    Example:
        >>> import keras
        >>> from polyak.keras import variable_names
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3), keras.layers.BatchNormalization()])
        >>> variable_names(model)[:3]
        ['layers/dense/vars/0', 'layers/dense/vars/1', 'layers/batch_normalization/vars/0']
    """
    variables = list(model.weights) if variables is None else list(variables)
    try:
        recorded = _record(model)
    except Exception:  # saving internals changed: fall back to variable paths
        recorded = {}
    names = [recorded.get(id(v)) or str(getattr(v, "path", v.name)) for v in variables]
    if len(set(names)) != len(names):
        names = [str(getattr(v, "path", v.name)) for v in variables]
    return names


def is_keras_model(obj: object) -> bool:
    return isinstance(obj, keras.Model)
