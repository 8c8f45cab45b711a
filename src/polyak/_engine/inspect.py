"""``polyak inspect``: what a checkpoint holds."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._errors import PolyakError
from .._json import json_object
from .._progress import human_bytes
from ..formats import TensorInfo, detect_format, open_source


@dataclass
class Inspection:
    """What :func:`polyak.inspect` found in a checkpoint: its format, tensors, totals and metadata.

    Attributes:
        path: The checkpoint, as given.
        format: The format's registry name (``"safetensors"``, ``"torch"``, ``"keras"``...).
        tensors: Every tensor's :class:`~polyak.formats.TensorInfo` (name, shape, dtype), in
            the checkpoint's own order.
        metadata: The string metadata stored with the checkpoint (a ``"polyak"`` entry is
            the provenance record of an average polyak wrote).
        extras: Format-specific details (e.g. a ``.pt`` file's other top-level keys).

    Example:
        >>> import numpy as np, os, tempfile, polyak
        >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> _ = polyak.save({"w": np.ones((2, 3), np.float32), "step": np.array(7)}, p, metadata={"epoch": "3"})
        >>> ins = polyak.inspect(p)
        >>> ins.format, [(t.name, t.shape, t.dtype_name) for t in ins.tensors]
        ('safetensors', [('step', (), 'int64'), ('w', (2, 3), 'float32')])
        >>> ins.parameters, ins.nbytes, ins.dtypes(), ins.metadata
        (7, 32, {'int64': 1, 'float32': 6}, {'epoch': '3'})
    """

    path: str
    format: str
    tensors: list[TensorInfo]
    metadata: dict[str, str]
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        """Total number of elements over all tensors."""
        return sum(t.size for t in self.tensors)

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data (headers and metadata not counted)."""
        return sum(t.nbytes for t in self.tensors)

    def dtypes(self) -> dict[str, int]:
        """Elements per dtype."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.dtype_name] = counts.get(t.dtype_name, 0) + t.size
        return counts

    def to_dict(self) -> dict[str, Any]:
        """The inspection as a JSON-able dict (what ``polyak inspect --json`` prints).

        Keys: ``path``, ``format``, ``parameters``, ``bytes``, ``dtypes``, ``tensors`` (name,
        shape, dtype, bytes each), ``metadata`` (a polyak provenance record parsed into a
        dict) and the JSON-able ``extras``.
        """
        meta: dict[str, Any] = {}
        for k, v in self.metadata.items():
            record = _polyak_record(v) if k == "polyak" else None
            meta[k] = v if record is None else record
        return {
            "path": self.path,
            "format": self.format,
            "parameters": self.parameters,
            "bytes": self.nbytes,
            "dtypes": self.dtypes(),
            "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype_name, "bytes": t.nbytes} for t in self.tensors],
            "metadata": meta,
            "extras": {k: v for k, v in self.extras.items() if _jsonable(v)},
        }


def _polyak_record(text: str) -> dict[str, Any] | None:
    """The ``polyak`` metadata record, parsed with limits (``None`` when it is not one)."""
    try:
        return json_object(text, "", "polyak record")
    except PolyakError:
        return None


def _summary(record: dict[str, Any]) -> str | None:
    """One line about an average's record, or ``None`` when its fields are not as polyak writes them."""
    weights, members = record.get("weights", []), record.get("members", [])
    if not isinstance(weights, list) or not isinstance(members, list):
        return None
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in weights):
        return None
    if not all(isinstance(m, dict) for m in members):
        return None
    ws = ", ".join(f"{x:.4g}" for x in weights)
    names = ", ".join(str(m.get("file", "?")) for m in members)
    return f"polyak: {record.get('scheme')} average of {len(members)} members ({names}); weights {ws}"


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def inspect(path: str | os.PathLike[str], *, format: str | None = None, key: str | None = None) -> Inspection:
    """Describe a checkpoint without reading its tensor data.

    Args:
        path: The checkpoint.
        format: Force a format by name.
        key: Key of the state dict inside a nested ``.pt`` checkpoint.

    Returns:
        An :class:`Inspection` (tensors with shapes, dtypes and sizes; metadata; totals).

    Example:
        >>> import numpy as np, polyak, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> _ = polyak.save({"w": np.ones((2, 3), np.float32)}, os.path.join(d, "m.safetensors"))
        >>> polyak.inspect(os.path.join(d, "m.safetensors")).parameters
        6
    """
    fmt = detect_format(path, format)
    with open_source(path, format=fmt.name, key=key) as src:
        return Inspection(str(path), fmt.name, list(src.infos().values()), src.metadata(), src.extras())


def format_inspection(ins: Inspection, *, limit: int | None = 50) -> str:
    """A terminal table of an inspection."""
    lines = [f"{ins.path}  ({ins.format})"]
    rows = ins.tensors if limit is None else ins.tensors[:limit]
    width = max([len(t.name) for t in rows] + [6])
    lines.append(f"  {'tensor'.ljust(width)}  {'shape':<18} {'dtype':<10} {'size':>10}")
    for t in rows:
        shape = "(" + ", ".join(map(str, t.shape)) + ("," if len(t.shape) == 1 else "") + ")"
        lines.append(f"  {t.name.ljust(width)}  {shape:<18} {t.dtype_name:<10} {human_bytes(t.nbytes):>10}")
    if limit is not None and len(ins.tensors) > limit:
        lines.append(f"  ... {len(ins.tensors) - limit} more tensors (--all shows every tensor)")
    dtypes = ", ".join(f"{k}: {v:,}" for k, v in ins.dtypes().items())
    lines.append(f"total: {len(ins.tensors)} tensors, {ins.parameters:,} parameters, {human_bytes(ins.nbytes)} ({dtypes})")
    for k, v in ins.extras.items():
        if v:
            lines.append(f"{k}: {v}")
    for k, v in sorted(ins.metadata.items()):
        record = _polyak_record(v) if k == "polyak" else None
        line = None if record is None else _summary(record)
        if line is not None:
            lines.append(line)
            continue
        text = v if len(v) <= 200 else v[:200] + "…"
        lines.append(f"metadata {k}: {text}")
    return "\n".join(lines)


def save(state: dict[str, Any], path: str | os.PathLike[str], *, metadata: dict[str, str] | None = None, force: bool = False) -> list[Any]:
    """Write a name-keyed state (numpy arrays or tensors) to any writable format, atomically.

    The format comes from the suffix (``.safetensors``, ``.npz``, ``.pt``,
    ``.weights.h5``...). Every file is checked before any is written and written under a
    temporary name, then renamed into place, so a failure leaves nothing behind.

    Args:
        state: Tensor name → numpy array, torch tensor, Keras/JAX array or nested list of
            numbers.
        path: The output file.
        metadata: String metadata to store where the format allows (default: none).
        force: Replace an existing file.

    Returns:
        Every file written (one, unless the format writes several).

    Raises:
        ConfigError: The state is not a mapping of string names to numeric arrays, or the
            suffix names no format polyak writes.
        FormatError: A tensor name or a metadata entry cannot be stored (not valid Unicode).
        OutputError: ``path`` exists (without ``force``), is not a regular file, or cannot
            be written.

    Example:
        >>> import numpy as np, polyak, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "m.npz")
        >>> _ = polyak.save({"w": np.arange(3.0)}, p)
        >>> polyak.inspect(p).parameters
        3
    """
    from .._atomic import check_output_path, check_outputs, cleanup_stale_temps
    from ..formats import check_storable, open_writer, output_files
    from ..formats._memory import MappingSource

    out = check_output_path(path, force=force)
    src = MappingSource(state, "state")
    infos = list(src.infos().values())
    check_storable(infos, metadata or {}, out)
    # The same output policy as polyak.average: every file written (a sharded output's
    # shards too) is checked before any is.
    for folder in dict.fromkeys(f.parent for f in check_outputs(output_files(out, infos), force=force)):
        cleanup_stale_temps(folder)
    writer = open_writer(out, infos, metadata=metadata or {})
    with writer:
        for name in writer.order:
            writer.write(name, np.asarray(src.read(name)))
        return writer.commit()
