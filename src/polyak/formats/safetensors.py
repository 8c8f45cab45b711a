"""safetensors, single file and Hugging Face sharded (``*.safetensors.index.json``).

Read without the ``safetensors`` package: the 8-byte header length and the JSON header are
parsed and validated here, and each tensor is a read-only, zero-copy numpy view of a memory
map, so any dtype ml_dtypes knows (bfloat16, float8) works and nothing is read before it is
needed. Written in a streaming way: the header depends only on names, shapes and dtypes, so
it is written first and the tensors follow one at a time.

Layout (https://github.com/huggingface/safetensors#format): ``<u64 little-endian N>``, N
bytes of JSON header (``{"__metadata__": {str: str}, name: {"dtype", "shape",
"data_offsets": [begin, end]}}``, padded with spaces), then the data, little-endian, C order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from .._atomic import AtomicFile, commit_many, fsync_dir, is_one_of
from .._errors import FormatError, OutputError, PolyakError, PolyakWarning, UnsafeFileError
from .._json import json_object, parse_json
from ._base import (
    FormatImpl,
    TensorInfo,
    TensorSource,
    TensorWriter,
    WriteOptions,
    contiguous,
)
from ._common import ReadOnlyMap, describe_read_error, reject_key

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "SAFETENSORS",
    "SAFETENSORS_INDEX",
    "SafetensorsIndexSource",
    "SafetensorsSource",
    "SafetensorsWriter",
    "ShardLayout",
    "ShardedSafetensorsWriter",
]

#: safetensors refuses headers above 100 MB (MAX_HEADER_SIZE); so do we, before allocating.
MAX_HEADER_SIZE = 100_000_000
MAX_INDEX_SIZE = 100_000_000

_CODES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "C64": np.dtype("<c8"),
    "C128": np.dtype("<c16"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
if hasattr(ml_dtypes, "float8_e8m0fnu"):
    _CODES["F8_E8M0"] = np.dtype(ml_dtypes.float8_e8m0fnu)
_NAMES: dict[np.dtype, str] = {dt.newbyteorder("="): code for code, dt in _CODES.items()}


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors dtype code of a numpy dtype (``float32`` → ``F32``)."""
    dt = np.dtype(dtype).newbyteorder("=")
    try:
        return _NAMES[dt]
    except KeyError:
        raise FormatError(f"safetensors cannot store dtype {dt.name}") from None


def sniff_safetensors(path: Path, head: bytes) -> bool:
    """A safetensors file: a plausible little-endian header length, then ``{``."""
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def sniff_safetensors_index(path: Path, head: bytes) -> bool:
    """A JSON object with a ``weight_map``, which may come after a long ``metadata`` (polyak's
    own record names every member), so the file is searched beyond ``head``."""
    if head.lstrip()[:1] != b"{":
        return False
    if b'"weight_map"' in head:
        return True
    try:
        if path.stat().st_size > MAX_INDEX_SIZE:
            return False
        with open(path, "rb") as f:
            tail = b""
            while block := f.read(1 << 20):
                if b'"weight_map"' in tail + block:
                    return True
                tail = block[-16:]
    except OSError:
        return False
    return False


def _parse_header(f: object, size: int, label: str) -> tuple[int, dict[str, TensorInfo], dict[str, tuple[int, int]], dict[str, str]]:
    read = f.read  # type: ignore[attr-defined]
    if size < 8:
        raise FormatError(f"{label}: truncated safetensors file ({size} bytes; the header length alone takes 8)")
    (n,) = struct.unpack("<Q", read(8))
    if n > MAX_HEADER_SIZE:
        raise UnsafeFileError(
            f"{label}: the safetensors header claims {n} bytes, above the {MAX_HEADER_SIZE}-byte "
            "limit; the file is corrupt or hostile"
        )
    if 8 + n > size:
        raise FormatError(
            f"{label}: truncated or corrupt safetensors file: the header claims {n} bytes but "
            f"the file has only {size - 8} after the length field"
        )
    header = json_object(read(n), label, "safetensors header")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise FormatError(f"{label}: corrupted safetensors header (__metadata__ must map strings to strings)")
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise FormatError(f"{label}: corrupted safetensors header (entry {name!r} is not an object)")
        code, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str) or code not in _CODES:  # a list is unhashable
            raise FormatError(f"{label}: tensor {name!r} has unknown dtype {code!r}")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise FormatError(f"{label}: corrupted safetensors header (bad shape or offsets for {name!r})")
        dt = _CODES[code]
        numel = 1
        for d in shape:
            numel *= d
        begin, end = offs
        if not (0 <= begin <= end <= data_size) or end - begin != numel * dt.itemsize:
            raise FormatError(
                f"{label}: tensor {name!r} claims bytes [{begin}, {end}) for shape {tuple(shape)} "
                f"{dt.name} ({numel * dt.itemsize} bytes) in a data section of {data_size} bytes; "
                "the file is truncated or corrupt"
            )
        infos[name] = TensorInfo(name, tuple(shape), dt)
        offsets[name] = (begin, end)
    spans = sorted(offsets.values())
    for (_b0, e0), (b1, _e1) in itertools.pairwise(spans):
        if b1 < e0:
            raise FormatError(f"{label}: corrupt safetensors file: tensors overlap in the data section")
    # Present tensors in file order (as safe_open's offset_keys()), which suits sequential reads.
    ordered = dict(sorted(infos.items(), key=lambda kv: offsets[kv[0]][0]))
    return 8 + n, ordered, offsets, meta


class SafetensorsSource(TensorSource):
    """A single ``.safetensors`` file, memory-mapped, one tensor at a time."""

    format_name = "safetensors"
    zero_copy = True

    def __init__(self, path: Path, *, label: str | None = None) -> None:
        super().__init__(path, label)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._data_start, self._infos, self._offsets, self._meta = _parse_header(f, size, self.label)
        except OSError as exc:
            raise FormatError(f"{self.label}: cannot read: {describe_read_error(exc)}") from exc
        self._size = size
        self._mm: ReadOnlyMap | None = None

    def _map(self) -> Any:
        """The file's bytes, memory-mapped once; no file descriptor is kept (ReadOnlyMap)."""
        if self._mm is None:
            try:
                with open(self.path, "rb") as f:  # type: ignore[arg-type]
                    if os.fstat(f.fileno()).st_size != self._size:
                        raise FormatError(f"{self.label}: the file changed size while polyak was reading it")
                    self._mm = ReadOnlyMap(f.fileno(), self._size)
            except OSError as exc:
                raise FormatError(f"{self.label}: cannot read: {describe_read_error(exc)}") from exc
        return self._mm.buffer

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        info = self._infos[name]
        begin, _end = self._offsets[name]
        if info.size == 0:
            return np.empty(info.shape, dtype=info.dtype)
        arr = np.frombuffer(self._map(), dtype=info.dtype, count=info.size, offset=self._data_start + begin)
        arr.flags.writeable = False  # the pages are read-only
        return arr.reshape(info.shape)

    def metadata(self) -> dict[str, str]:
        return dict(self._meta)

    def close(self) -> None:
        if self._mm is not None:
            # Arrays handed out may still view the map; then it is released with them.
            self._mm.close()
            self._mm = None


class SafetensorsIndexSource(TensorSource):
    """A Hugging Face sharded checkpoint: the index JSON plus its shards (one mapped at a time).

    The index (``{"metadata": {"total_size": ...}, "weight_map": {name: shard file}}``) is
    the same for every Hugging Face shard format; a subclass reads other shards by
    overriding :meth:`_open_shard` (``pytorch_model.bin.index.json``:
    :class:`polyak.formats.torch_pt.TorchIndexSource`).
    """

    format_name = "safetensors-index"
    zero_copy = True
    #: Unmap a shard when reading moves on to another (its pages are reread on demand).
    close_idle_shards: ClassVar[bool] = True

    def _open_shard(self, path: Path, label: str) -> TensorSource:
        """Open one shard named by the index."""
        return SafetensorsSource(path, label=label)

    def __init__(self, path: Path, *, label: str | None = None) -> None:
        super().__init__(path, label)
        try:
            size = path.stat().st_size
            if size > MAX_INDEX_SIZE:
                raise UnsafeFileError(f"{self.label}: index file of {size} bytes is implausibly large")
            raw = path.read_bytes()
        except OSError as exc:
            raise FormatError(f"{self.label}: cannot read: {exc.strerror or exc}") from exc
        index = json_object(raw, self.label, "index")
        wmap = index.get("weight_map")
        if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
            raise FormatError(f"{self.label}: corrupted index: 'weight_map' must map tensor names to shard files")
        meta = index.get("metadata") or {}
        if not isinstance(meta, dict):
            raise FormatError(f"{self.label}: corrupted index: 'metadata' must be a JSON object")
        self._meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
        claimed = meta.get("total_size")
        self._meta.pop("total_size", None)
        folder = path.parent
        self._shards: dict[str, TensorSource] = {}
        self._where: dict[str, str] = {}
        infos: dict[str, TensorInfo] = {}
        for shard in dict.fromkeys(wmap.values()):
            shard_path = folder / shard
            if Path(shard).is_absolute() or ".." in Path(shard).parts or Path(shard).name != shard:
                raise UnsafeFileError(
                    f"{self.label}: shard {shard!r} points outside the checkpoint folder; refusing it"
                )
            if not shard_path.is_file():
                raise FormatError(f"{self.label}: shard {shard} listed in the index is missing")
            self._shards[shard] = self._open_shard(shard_path, f"{self.label} (shard {shard})")
        for name, shard in wmap.items():
            src = self._shards[shard]
            if name not in src.infos():
                raise FormatError(f"{self.label}: tensor {name!r} is listed in the index but missing from shard {shard}")
            infos[name] = src.infos()[name]
            self._where[name] = shard
        self._infos = infos
        self._current: str | None = None
        self._check_total_size(claimed)

    def _check_total_size(self, claimed: object) -> None:
        """``total_size`` (bytes of tensor data) cannot exceed the shards that hold the data."""
        if claimed is None:
            return
        if isinstance(claimed, bool) or not isinstance(claimed, (int, float)) or claimed < 0 or claimed != int(claimed):
            raise FormatError(f"{self.label}: corrupted index: metadata total_size {claimed!r} is not a byte count")
        on_disk = sum(src.path.stat().st_size for src in self._shards.values() if src.path is not None)
        if claimed > on_disk:
            raise FormatError(
                f"{self.label}: the index claims total_size {int(claimed)} bytes but its shards hold "
                f"only {on_disk}; the index is corrupt or its shards are truncated"
            )

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        shard = self._where[name]
        if self._current is not None and self._current != shard and self.close_idle_shards:
            self._shards[self._current].close()
        self._current = shard
        return self._shards[shard].read(name)

    def metadata(self) -> dict[str, str]:
        meta: dict[str, str] = {}
        for src in self._shards.values():
            meta.update(src.metadata())
        meta.update(self._meta)
        return meta

    def aliases(self) -> dict[str, str]:
        tied: dict[str, str] = {}
        for src in self._shards.values():
            tied.update(src.aliases())
        return tied

    def extras(self) -> dict[str, object]:
        return {"shards": sorted(self._shards)}

    def shard_bytes(self) -> dict[str, int]:
        """Bytes of tensor data in each shard, by shard file name."""
        sizes = dict.fromkeys(self._shards, 0)
        for name, shard in self._where.items():
            sizes[shard] += self._infos[name].nbytes
        return sizes

    def files(self) -> list[Path]:
        return [self.path, *(src.path for src in self._shards.values())]  # type: ignore[list-item]

    def close(self) -> None:
        for src in self._shards.values():
            src.close()


def open_safetensors(path: Path, *, key: str | None = None, label: str | None = None) -> SafetensorsSource:
    reject_key(key, path, "safetensors")
    return SafetensorsSource(path, label=label)


def open_safetensors_index(path: Path, *, key: str | None = None, label: str | None = None) -> SafetensorsIndexSource:
    reject_key(key, path, "safetensors")
    return SafetensorsIndexSource(path, label=label)


def file_order(infos: Sequence[TensorInfo]) -> list[TensorInfo]:
    """The order in which a safetensors file written by polyak holds ``infos``."""
    # Widest dtype first keeps every tensor aligned; then by name, so the bytes do not depend
    # on the order the caller listed the tensors in (like safetensors' own writer).
    return sorted(infos, key=lambda i: (-np.dtype(i.dtype).itemsize, i.name))


def build_header(infos: Sequence[TensorInfo], metadata: Mapping[str, str]) -> bytes:
    """The padded header (length field included) for tensors written in the given order."""
    header: dict[str, object] = {}
    if metadata:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise FormatError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for info in infos:
        nbytes = info.nbytes
        header[info.name] = {
            "dtype": dtype_code(info.dtype),
            "shape": list(info.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _as_bytes(array: np.ndarray, info: TensorInfo, path: Path) -> memoryview:
    if array.shape != info.shape:
        raise OutputError(f"{path}: tensor {info.name!r} has shape {array.shape}, expected {info.shape}")
    dt = np.dtype(info.dtype)
    if dt.kind in "fciu":
        dt = dt.newbyteorder("<")  # safetensors data is little-endian
    arr = contiguous(np.asarray(array, dtype=dt))
    return memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else memoryview(b"")  # type: ignore[arg-type,unused-ignore]


class SafetensorsWriter(TensorWriter):
    """Streams one ``.safetensors`` file: header first, then each tensor as it comes."""

    def __init__(self, path: Path, infos: Sequence[TensorInfo], **kwargs: object) -> None:
        super().__init__(path, infos, **kwargs)  # type: ignore[arg-type]
        self._order = [i.name for i in file_order(list(self.infos.values()))]
        self._next = 0
        self._file = AtomicFile(self.path)
        self._file.write(build_header([self.infos[n] for n in self._order], self.metadata))

    @property
    def order(self) -> list[str]:
        return list(self._order)

    def write(self, name: str, array: np.ndarray) -> None:
        expected = self._order[self._next] if self._next < len(self._order) else None
        if name != expected:
            self.abort()
            raise OutputError(f"{self.path}: internal error: got tensor {name!r}, expected {expected!r}")
        self._file.write(_as_bytes(array, self.infos[name], self.path))
        self._next += 1

    def finish(self) -> Path:
        if self._next != len(self._order):
            self.abort()
            raise OutputError(f"{self.path}: only {self._next} of {len(self._order)} tensors were written")
        return self._file.finish()

    def commit(self) -> list[Path]:
        self.finish()
        commit_many([(self._file.tmp, self.path)])
        return [self.path]

    def abort(self) -> None:
        self._file.abort()


def shard_paths(path: Path, count: int) -> tuple[Path, list[Path]]:
    """Index path and shard paths for a sharded output named after ``path``."""
    name = path.name
    if name.endswith(".safetensors.index.json"):
        stem = name[: -len(".safetensors.index.json")]
    elif name.endswith(".safetensors"):
        stem = name[: -len(".safetensors")]
    else:
        stem = path.stem
    index = path.with_name(f"{stem}.safetensors.index.json")
    shards = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.safetensors") for i in range(1, count + 1)]
    return index, shards


def plan_shards(infos: Sequence[TensorInfo], shard_size: int) -> list[list[TensorInfo]]:
    """Split tensors greedily (in file order) into shards of at most ``shard_size`` bytes.

    A tensor larger than ``shard_size`` gets a shard of its own.
    """
    shards: list[list[TensorInfo]] = [[]]
    used = 0
    for info in file_order(infos):
        if shards[-1] and used + info.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(info)
        used += info.nbytes
    return shards


#: Largest shard when the output must be sharded but no ``shard_size`` was given (the
#: Hugging Face default).
DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass(frozen=True)
class ShardLayout:
    """A sharded output: the index, and each shard's path and tensors (in file order).

    The one place that publishes a sharded output (:meth:`commit`), for the single-process
    writer (:class:`ShardedSafetensorsWriter`) and for the parallel engine, whose workers
    each finish some of the shards.

    Attributes:
        index_path: ``<stem>.safetensors.index.json``.
        shard_paths: ``<stem>-0000i-of-0000n.safetensors``, one per group.
        groups: The tensors of each shard, in file order.

    Example:
        >>> infos = [TensorInfo(n, (250,), np.dtype("float32")) for n in "abc"]
        >>> layout = ShardLayout.plan(Path("avg.safetensors"), infos, shard_size=2000)
        >>> [p.name for p in layout.shard_paths], [[i.name for i in g] for g in layout.groups]
        (['avg-00001-of-00002.safetensors', 'avg-00002-of-00002.safetensors'], [['a', 'b'], ['c']])
    """

    index_path: Path
    shard_paths: list[Path]
    groups: list[list[TensorInfo]]

    @classmethod
    def plan(cls, path: Path, infos: Sequence[TensorInfo], shard_size: int) -> ShardLayout:
        """Shards of at most ``shard_size`` bytes (:func:`plan_shards`), named after ``path``."""
        groups = plan_shards(infos, shard_size)
        index, paths = shard_paths(path, len(groups))
        return cls(index, paths, groups)

    def index_bytes(self, metadata: Mapping[str, str]) -> bytes:
        """The index JSON: ``metadata`` plus ``total_size``, and the sorted ``weight_map``."""
        where = {i.name: p.name for p, g in zip(self.shard_paths, self.groups, strict=True) for i in g}
        index = {
            "metadata": {**metadata, "total_size": sum(i.nbytes for g in self.groups for i in g)},
            "weight_map": {name: where[name] for name in sorted(where)},
        }
        return json.dumps(index, indent=2, ensure_ascii=False).encode("utf-8")

    @property
    def files(self) -> list[Path]:
        """Every path :meth:`commit` creates or replaces: the shards, then the index."""
        return [*self.shard_paths, self.index_path]

    def commit(
        self, temps: Sequence[tuple[Path, Path]], metadata: Mapping[str, str], *, inputs: Sequence[Path] = ()
    ) -> list[Path]:
        """Publish finished shards and their index, crash-safely.

        Args:
            temps: ``(temporary file, shard path)`` for every shard, each finished (fsynced).
            metadata: String metadata for the index.
            inputs: The files the output was computed from: never deleted.

        The order is what makes a crash at any point harmless: the index is written (under
        a temporary name) first; an old output's index that would end up over a mix of old
        and new shards is deleted (:func:`_retire_old_index`); the shards are renamed into
        place; the index is renamed last; only then are the old output's shards that the
        new one does not use deleted (:func:`_remove_unused_shards`: only files that are
        provably stale shards of this output; anything else the old index named is left
        alone, with a :class:`~polyak.PolyakWarning` saying so). On an error every
        temporary is deleted.

        Returns:
            The shard paths and the index path (last).
        """
        idx: AtomicFile | None = None
        try:
            idx = AtomicFile(self.index_path)
            idx.write(self.index_bytes(metadata))
            idx.finish()
            listed = _retire_old_index(self.index_path, self.shard_paths)
            commit_many(temps)
            commit_many([(idx.tmp, self.index_path)])
        except BaseException:
            if idx is not None:
                idx.abort()
            for tmp, _ in temps:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            raise
        _remove_unused_shards(listed, self, inputs)
        return self.files

    def stale_shard(self, name: str) -> bool:
        """Whether a file named ``name`` (in the output's folder) is named like a shard of this
        output (``<stem>-NNNNN-of-NNNNN.safetensors``) without being one of its new shards."""
        stem = self.index_path.name[: -len(".safetensors.index.json")]
        if not re.fullmatch(re.escape(stem) + r"-\d{5,}-of-\d{5,}\.safetensors", name):
            return False
        return all(name != p.name for p in self.shard_paths)


def _listed_files(index_path: Path) -> list[str]:
    """The file names an existing index's ``weight_map`` lists (none when it is unreadable)."""
    try:
        size = index_path.stat().st_size
        if size > MAX_INDEX_SIZE:
            return []
        index = parse_json(index_path.read_bytes(), str(index_path), "index")
    except (OSError, PolyakError):
        return []
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict):
        return []
    return sorted({v for v in wmap.values() if isinstance(v, str)})


def _retire_old_index(index_path: Path, new_shards: Sequence[Path]) -> list[str]:
    """Make an existing sharded output (``--force``) stop pointing at shards about to be replaced.

    Several files cannot be renamed at once. If a new shard would replace a shard of the
    old output, the old index is deleted first, so a crash in between leaves no index
    (no output) rather than an index over a mix of old and new shards. When no names
    collide, the old index stays valid until the new one replaces it atomically.
    Returns the names the old index listed (see :func:`_remove_unused_shards`).
    """
    if not index_path.exists():
        return []
    listed = _listed_files(index_path)
    if any(p.exists() for p in new_shards):
        try:
            index_path.unlink()
        except OSError as exc:
            raise OutputError(f"cannot replace {index_path}: {exc.strerror or exc}") from exc
        fsync_dir(index_path.parent)
    return listed


def _remove_unused_shards(listed: Sequence[str], layout: ShardLayout, inputs: Sequence[Path] = ()) -> list[str]:
    """After the new index is in place: delete the replaced output's shards it does not use.

    The old index is a file polyak may not have written, so its list proves nothing: a name
    is deleted only if it is a stale shard of *this* output, that is, a plain name (a file in
    the output's folder) following the output's own shard pattern
    (:meth:`ShardLayout.stale_shard`) that is not one of the new files and not an input.
    Every other name the old index listed is left alone, and one
    :class:`~polyak.PolyakWarning` names them. Returns the names left alone.
    """
    mine = {p.name for p in layout.files}
    spared: list[str] = []
    for name in listed:
        if name in mine:
            continue  # replaced by the new output
        if not name or name in (".", "..") or Path(name).name != name:
            spared.append(name)  # not a file in the output's folder
            continue
        path = layout.index_path.with_name(name)
        if not layout.stale_shard(name) or is_one_of(path, inputs):
            if os.path.lexists(path):
                spared.append(name)
            continue
        with contextlib.suppress(OSError):
            path.unlink()
    if spared:
        warnings.warn(
            PolyakWarning(
                f"{layout.index_path}: the index it replaced also listed {', '.join(map(repr, spared))}, "
                "which are not stale shards of this output; left them alone"
            ),
            stacklevel=2,
        )
    return spared


class ShardedSafetensorsWriter(TensorWriter):
    """Writes ``<stem>-0000i-of-0000n.safetensors`` shards and ``<stem>.safetensors.index.json``.

    Every shard is kept under a temporary name until all of them are complete; then the shards
    are renamed into place and the index last, so an index never points at a missing or
    partial shard.
    """

    def __init__(self, path: Path, infos: Sequence[TensorInfo], **kwargs: object) -> None:
        super().__init__(path, infos, **kwargs)  # type: ignore[arg-type]
        self.layout = ShardLayout.plan(self.path, list(self.infos.values()), self.options.shard_size or 0)
        self.index_path, self.shard_paths = self.layout.index_path, self.layout.shard_paths
        groups = self.layout.groups
        self._order = [i.name for g in groups for i in g]
        self._shard_of = {i.name: k for k, g in enumerate(groups) for i in g}
        self._writers: list[SafetensorsWriter] = []
        self._done: list[Path] = []  # the finished shards' temporary files

    @property
    def order(self) -> list[str]:
        return list(self._order)

    def write(self, name: str, array: np.ndarray) -> None:
        k = self._shard_of[name]
        while len(self._writers) <= k:
            if self._writers:
                self._done.append(self._writers[-1].finish())
            j = len(self._writers)
            self._writers.append(
                SafetensorsWriter(self.shard_paths[j], self.layout.groups[j], metadata=self.metadata)
            )
        self._writers[k].write(name, array)

    def commit(self) -> list[Path]:
        if len(self._writers) != len(self.layout.groups):
            self.abort()
            raise OutputError(f"{self.path}: not every shard was written")
        self._done.append(self._writers[-1].finish())
        return self.layout.commit(
            list(zip(self._done, self.shard_paths, strict=True)), self.metadata, inputs=self.options.inputs
        )

    @property
    def targets(self) -> list[Path]:
        return self.layout.files

    def abort(self) -> None:
        for w in self._writers:
            w.abort()


def safetensors_writer(
    path: Path, infos: Sequence[TensorInfo], *, options: WriteOptions | None = None, template: object = None, **kwargs: Any
) -> TensorWriter:
    """The safetensors :class:`~polyak.formats.WriterFactory`: one file, or shards + index when
    ``options.shard_size`` is set and the tensors do not fit in one shard (or the output is
    named ``*.safetensors.index.json``). A safetensors file carries nothing over from a
    template; ``kwargs`` are ``metadata`` and ``aliases``."""
    opts = _sharding(path, infos, options or WriteOptions())
    if opts.shard_size is not None:
        return ShardedSafetensorsWriter(path, infos, options=opts, **kwargs)
    return SafetensorsWriter(path, infos, options=opts, **kwargs)


def _sharding(path: Path, infos: Sequence[TensorInfo], opts: WriteOptions) -> WriteOptions:
    """``opts`` with ``shard_size`` set when the output is sharded, ``None`` when it is one file."""
    wants_index = path.name.endswith(".safetensors.index.json")
    if wants_index or (opts.shard_size is not None and sum(i.nbytes for i in infos) > opts.shard_size):
        return dataclasses.replace(opts, shard_size=opts.shard_size or DEFAULT_SHARD_SIZE)
    return dataclasses.replace(opts, shard_size=None)


def safetensors_targets(path: Path, infos: Sequence[TensorInfo], options: WriteOptions) -> list[Path]:
    """What :func:`safetensors_writer` will create or replace: the file, or every shard and
    the index."""
    opts = _sharding(path, infos, options)
    if opts.shard_size is None:
        return [path]
    return ShardLayout.plan(path, infos, opts.shard_size).files


SAFETENSORS = FormatImpl(
    sniff=sniff_safetensors, open=open_safetensors, writer=safetensors_writer, targets=safetensors_targets
)
SAFETENSORS_INDEX = FormatImpl(
    sniff=sniff_safetensors_index, open=open_safetensors_index, writer=safetensors_writer, targets=safetensors_targets
)
