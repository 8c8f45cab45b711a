"""Keras 3 ``.weights.h5`` files (``model.save_weights``), read and written with h5py only.

The file mirrors the model's object tree: each layer's variables are datasets
``<object path>/vars/<i>`` (``layers/dense/vars/0``), each ``vars`` group carries the
attribute ``name=<layer name>``, bfloat16 variables are 2-byte opaque datasets tagged
``dtype="bfloat16"``. Tensors are keyed by their HDF5 path. Optimizer variables
(``optimizer/...``, present when the model was compiled) are never averaged: they are
dropped from the output, or copied from the newest member with ``keep_optimizer``.

References:
    keras/src/saving/saving_lib.py (``H5IOStore``, ``save_weights_only``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._base import FormatImpl
from ._common import reject_key
from ._h5 import (
    H5Source,
    H5TemplateWriter,
    corrupt_file_errors,
    is_legacy_layout,
    open_h5,
    sniff_hdf5,
)

#: Top-level groups holding optimizer state in Keras 3 files.
OPTIMIZER_GROUPS = ("optimizer",)


def is_keras3_layout(f: Any) -> bool:
    """Keras 3 weights: not the legacy layout, and the root holds ``vars`` or ``layers``."""
    return not is_legacy_layout(f) and ("vars" in f or "layers" in f or len(f) > 0)


def sniff_keras_weights(path: Path, head: bytes) -> bool:
    return sniff_hdf5(path, head, is_keras3_layout)


class KerasWeightsSource(H5Source):
    format_name = "keras-weights"

    def extras(self) -> dict[str, Any]:
        with corrupt_file_errors(self.label):
            opt = [g for g in OPTIMIZER_GROUPS if g in self.h5]
        return {"optimizer state": "present (not averaged)" if opt else "absent"}


def open_keras_weights(path: Path, *, key: str | None = None, label: str | None = None) -> KerasWeightsSource:
    reject_key(key, path, "keras-weights")
    lab = label if label is not None else str(path)
    h5 = open_h5(path, lab)
    try:
        return KerasWeightsSource(h5, path, label=lab, excluded=OPTIMIZER_GROUPS)
    except BaseException:
        h5.close()
        raise


class KerasWeightsWriter(H5TemplateWriter):
    """A ``.weights.h5`` shaped like the newest member (when it is one): its object tree and
    attributes, the averaged variables, and optimizer variables only with ``keep_optimizer``."""

    excluded = OPTIMIZER_GROUPS


KERAS_WEIGHTS = FormatImpl(sniff=sniff_keras_weights, open=open_keras_weights, writer=KerasWeightsWriter)
