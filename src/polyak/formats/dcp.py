"""torch.distributed.checkpoint (DCP) folders, read tensor by tensor without a process group.

A DCP checkpoint is a folder with a ``.metadata`` file and one or more ``*.distcp`` data
files (at least one per rank that saved it). The metadata lists every flattened key
(``model.layer.weight``) with its global shape and dtype (``TensorStorageMetadata``) or
marks it as pickled bytes (``BytesStorageMetadata``: step counters, learning rates, ...).
polyak reads the metadata, then loads each tensor on its own into a freshly allocated
buffer with ``torch.distributed.checkpoint.load(..., no_dist=True)``, which reads only the
chunks that tensor needs, so memory stays at one tensor whatever the world size that saved
it. Non-tensor entries are skipped.

Layouts: a flat model state dict saved directly (``dcp.save(model.state_dict())``) is read
as is. A training checkpoint saved as ``{"model": ..., "optimizer": ..., "step": ...}`` is
unwrapped by ``key=`` (``--key model``; nested keys with ``/``, e.g. ``--key app/model``), or
automatically when exactly one top-level entry holds tensors. The folder is only read:
nothing in it is unpickled except through DCP's own reader, and byte entries are never
loaded.

References:
    torch ``torch/distributed/checkpoint/format_utils.py`` (``dcp_to_torch_save``) and
    ``state_dict_loader.py`` (``load``): the offline, single-process way to read DCP.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import ConfigError, FormatError
from ._base import FormatImpl, TensorInfo, TensorSource

__all__ = ["DCP", "DcpSource", "sniff_dcp"]

METADATA_FILE = ".metadata"


def sniff_dcp(path: Path, head: bytes) -> bool:
    """A folder holding a ``.metadata`` file (checked by name only: torch is not imported)."""
    return path.is_dir() and (path / METADATA_FILE).is_file()


def _modules() -> tuple[Any, Any]:
    from .torch_pt import _torch

    torch = _torch()
    import torch.distributed.checkpoint as dcp

    return torch, dcp


def _np_dtype(torch: Any, dtype: Any) -> np.dtype:
    import ml_dtypes

    special = {torch.bfloat16: np.dtype(ml_dtypes.bfloat16)}
    for attr in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, attr):
            special[getattr(torch, attr)] = np.dtype(getattr(ml_dtypes, attr))
    if dtype in special:
        return special[dtype]
    try:
        return np.dtype(str(dtype).removeprefix("torch."))
    except TypeError:
        raise FormatError(f"tensor dtype {dtype} has no numpy equivalent") from None


def _top_level(fqn: str, paths: Mapping[str, Any]) -> tuple[str, ...]:
    """The path of a flattened key in the saved nested dict (``("model", "a.weight")``)."""
    path = paths.get(fqn)
    if isinstance(path, (tuple, list)) and path and all(isinstance(p, (str, int)) for p in path):
        return tuple(str(p) for p in path)
    return (fqn,)


class DcpSource(TensorSource):
    """A DCP checkpoint folder; each :meth:`read` loads one tensor (a copy, never a view)."""

    format_name = "dcp"
    zero_copy = False

    def __init__(self, path: Path, *, key: str | None = None, label: str | None = None) -> None:
        super().__init__(path, label)
        torch, dcp = _modules()
        self._torch, self._dcp = torch, dcp
        try:
            meta = dcp.FileSystemReader(str(path)).read_metadata()
        except Exception as exc:  # corrupt or foreign .metadata: say which folder
            raise FormatError(
                f"{self.label}: not a readable torch.distributed.checkpoint folder "
                f"({type(exc).__name__}: {exc}); it may have been written by another torch version"
            ) from None
        paths = meta.planner_data if isinstance(meta.planner_data, Mapping) else {}
        tensors: dict[tuple[str, ...], tuple[str, Any]] = {}
        for fqn, entry in meta.state_dict_metadata.items():
            if type(entry).__name__ != "TensorStorageMetadata":
                continue  # pickled non-tensor values (step, lr, RNG state): never loaded
            tensors[_top_level(fqn, paths)] = (fqn, entry)
        if not tensors:
            raise FormatError(f"{self.label}: the checkpoint holds no tensors")
        self.key, selected = self._select(tensors, key)
        self._fqn: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._torch_dtypes: dict[str, Any] = {}
        for name, (fqn, entry) in selected.items():
            self._fqn[name] = fqn
            self._torch_dtypes[name] = entry.properties.dtype
            self._infos[name] = TensorInfo(name, tuple(int(d) for d in entry.size), _np_dtype(torch, entry.properties.dtype))
        self.world_files = sorted(p.name for p in path.glob("*.distcp"))

    def _select(
        self, tensors: dict[tuple[str, ...], tuple[str, Any]], key: str | None
    ) -> tuple[str | None, dict[str, tuple[str, Any]]]:
        """Choose the tensors of the state dict to average and name them without the key."""
        if key is not None:
            parts = tuple(p for p in key.split("/") if p)
            chosen = {
                ".".join(path[len(parts):]): v for path, v in tensors.items() if path[: len(parts)] == parts and len(path) > len(parts)
            }
            if not chosen:
                found = sorted({p[0] for p in tensors})
                raise ConfigError(
                    f"{self.label}: no tensors under the key {key!r}; top-level entries with tensors: {', '.join(map(repr, found))}"
                )
            return key, chosen
        tops = {p[0] for p in tensors}
        flat = [p for p in tensors if len(p) == 1]
        if flat:  # a model state dict saved directly: its top-level tensors
            return None, {path[0]: tensors[path] for path in flat}
        if len(tops) > 1:
            shown = ", ".join(repr(t) for t in sorted(tops))
            raise ConfigError(
                f"{self.label}: the checkpoint holds several state dicts ({shown}); choose one "
                f"with --key (key=), e.g. --key {sorted(tops)[0]}"
            )
        (top,) = tops
        return top, {".".join(path[1:]): v for path, v in tensors.items()}

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        torch, dcp = self._torch, self._dcp
        info = self._infos[name]
        buf = torch.empty(info.shape, dtype=self._torch_dtypes[name])
        state = {self._fqn[name]: buf}
        try:
            with warnings.catch_warnings():
                # no_dist=True is the point (no process group, no collectives); torch warns
                # about it every call.
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=dcp.FileSystemReader(str(self.path)), no_dist=True)
        except Exception as exc:
            raise FormatError(
                f"{self.label}: cannot read tensor {name!r} ({type(exc).__name__}: {exc}); "
                "a data file (*.distcp) may be missing or truncated"
            ) from None
        from .torch_pt import tensor_to_numpy

        return tensor_to_numpy(state[self._fqn[name]])

    def extras(self) -> dict[str, Any]:
        return {"key": self.key, "data_files": self.world_files}


DCP = FormatImpl(sniff=sniff_dcp, open=DcpSource)
