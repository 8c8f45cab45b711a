"""Legacy Keras 2 HDF5 files: full models (``model.save("m.h5")``) and weights-only files.

Layout (Keras 2 ``hdf5_format.py``; read by Keras 3's ``legacy_h5_format``): the group
holding the weights (``model_weights`` in a full-model file, the root in a weights-only
file) lists its layers in the attribute ``layer_names``; each layer group lists its
weights in ``weight_names`` (``dense/kernel:0``), and the data sits at
``<layer>/<weight name>``. Attributes larger than 64 KiB are split into numbered chunks
(``layer_names0``, ``layer_names1``...). Tensors are keyed by their HDF5 path
(``model_weights/dense/dense/kernel:0``) in ``layer_names`` / ``weight_names`` order.

The writer copies the newest member's whole file (model and training configs, every
attribute in its stored type and chunking) and replaces only the averaged datasets, so
Keras 2 and Keras 3 load the result as they loaded the members. Optimizer state
(``optimizer_weights``) is never averaged: dropped, or copied with ``keep_optimizer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._errors import ConfigError, FormatError
from ._base import FormatImpl, SourceTemplate, TensorInfo
from ._common import reject_key
from ._h5 import (
    H5Source,
    H5Template,
    H5TemplateWriter,
    corrupt_file_errors,
    is_legacy_layout,
    open_h5,
    read_attr_list,
    sniff_hdf5,
)

OPTIMIZER_GROUPS = ("optimizer_weights",)


def sniff_keras2_h5(path: Path, head: bytes) -> bool:
    return sniff_hdf5(path, head, is_legacy_layout)


def legacy_names(f: Any, label: str) -> list[str]:
    """Dataset paths of every weight, in ``layer_names`` then ``weight_names`` order."""
    if read_attr_list(f, "layer_names") is not None:
        root, prefix = f, ""
    elif "model_weights" in f:
        root, prefix = f["model_weights"], "model_weights/"
    else:
        raise FormatError(f"{label}: no layer_names attribute; not a Keras 2 HDF5 file")
    names: list[str] = []
    for layer in read_attr_list(root, "layer_names") or []:
        if layer not in root:
            raise FormatError(f"{label}: layer_names lists {layer!r} but the file has no such group")
        for weight in read_attr_list(root[layer], "weight_names") or []:
            names.append(f"{prefix}{layer}/{weight}")
    return names


class Keras2H5Source(H5Source):
    format_name = "keras2-h5"

    def extras(self) -> dict[str, Any]:
        with corrupt_file_errors(self.label):
            kind = "full model" if "model_weights" in self.h5 else "weights only"
            version = self.h5.attrs.get("keras_version")
            if isinstance(version, bytes):
                version = version.decode()
            opt = "optimizer_weights" in self.h5
        return {
            "layout": f"Keras 2 HDF5, {kind}",
            "keras_version": str(version),
            "optimizer state": "present (not averaged)" if opt else "absent",
        }


def open_keras2_h5(path: Path, *, key: str | None = None, label: str | None = None) -> Keras2H5Source:
    reject_key(key, path, "keras2-h5")
    lab = label if label is not None else str(path)
    h5 = open_h5(path, lab)
    try:
        with corrupt_file_errors(lab):
            names = legacy_names(h5, lab)
        return Keras2H5Source(h5, path, label=lab, names=names, excluded=OPTIMIZER_GROUPS)
    except BaseException:
        h5.close()
        raise


class Keras2H5Writer(H5TemplateWriter):
    """A copy of the newest member's Keras 2 file with the averaged weights (see the module)."""

    excluded = OPTIMIZER_GROUPS

    def __init__(self, path: Path, infos: Sequence[TensorInfo], *, template: SourceTemplate | None = None, **kwargs: Any) -> None:
        if not isinstance(template, H5Template):
            raise ConfigError(
                f"{path}: a Keras 2 .h5 output copies its layout (layer_names, model config) from "
                "the newest member, which must itself be a Keras 2 .h5 file; write another format "
                "(.safetensors, .npz) instead"
            )
        super().__init__(path, infos, template=template, **kwargs)


KERAS2_H5 = FormatImpl(sniff=sniff_keras2_h5, open=open_keras2_h5, writer=Keras2H5Writer)
