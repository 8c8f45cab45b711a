"""Keras 3 ``.keras`` archives (``model.save("m.keras")``), read and written without Keras.

A ``.keras`` file is a zip holding ``metadata.json``, ``config.json`` and
``model.weights.h5`` (stored uncompressed), plus ``assets/`` for layers that have assets.
polyak averages the tensors of ``model.weights.h5`` (keyed as in ``.weights.h5`` files),
copies ``config.json``, ``metadata.json`` and any assets from the newest member, and adds a
``"polyak"`` entry to ``metadata.json`` describing the average (scheme, weights, members),
which Keras ignores. Optimizer variables (``optimizer/...``) are never averaged: they are
dropped (Keras then warns on ``load_model`` that the optimizer starts fresh) or copied
from the newest member with ``keep_optimizer``.

Safety: members that expand far beyond their stored size (zip bombs) and archives that
claim an implausible total are refused before anything is read; JSON members are read
with a size cap; the weights are read in place from the archive when stored (no copy) or
extracted with a size check otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import AtomicFile, temp_path_for
from .._errors import ConfigError, FormatError, OutputError, UnsafeFileError
from .._json import json_object
from ._base import FormatImpl, SourceTemplate, TensorInfo, TensorWriter
from ._common import check_zip, reject_key
from ._h5 import CORRUPT_ERRORS, H5Source, H5Template, corrupt_file_errors, open_h5
from .keras_weights import OPTIMIZER_GROUPS, KerasWeightsWriter

WEIGHTS = "model.weights.h5"
CONFIG = "config.json"
METADATA = "metadata.json"
MAX_RATIO = 100  # Keras' own limit (above 16 MiB); stored members are 1:1
MAX_JSON = 64 << 20


def sniff_keras(path: Path, head: bytes) -> bool:
    if not head.startswith(b"PK\x03\x04"):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return CONFIG in names and (WEIGHTS in names or "model.weights.npz" in names)


def read_member(zf: zipfile.ZipFile, name: str, label: str, limit: int = MAX_JSON) -> bytes:
    """A member's bytes, read with a size cap that does not trust the declared size."""
    with zf.open(name) as fp:
        data = fp.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"{label}: member {name} is larger than {limit} bytes; refusing it")
    return data


class _StoredMember(io.RawIOBase):
    """A read-only, seekable view of an uncompressed zip member, read in place."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._f: io.BufferedReader = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._offset, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(view[:n])
        self._pos += got or 0
        return got or 0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._f.close()
        super().close()


def _data_offset(path: Path, zi: zipfile.ZipInfo) -> int:
    with open(path, "rb") as f:
        f.seek(zi.header_offset)
        header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise FormatError(f"{path}: corrupt zip entry for {zi.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return zi.header_offset + 30 + name_len + extra_len


@dataclass(frozen=True)
class KerasArchiveTemplate(SourceTemplate):
    """What a ``.keras`` output copies from the newest member.

    Attributes:
        weights: The layout of its ``model.weights.h5``.
        config: Its ``config.json``, as stored.
        keras_metadata: Its ``metadata.json``.
        archive: The member's open zip file.
        assets: The zip entries other than weights, config and metadata (assets).
    """

    weights: H5Template
    config: bytes
    keras_metadata: Mapping[str, Any]
    archive: zipfile.ZipFile
    assets: Sequence[zipfile.ZipInfo]

    def renamed(self, names: Mapping[str, str]) -> KerasArchiveTemplate:
        return dataclasses.replace(self, weights=self.weights.renamed(names))


class KerasArchiveSource(H5Source):
    format_name = "keras"

    config: bytes
    config_object: dict[str, Any]
    keras_metadata: dict[str, Any]
    members: list[zipfile.ZipInfo]
    archive: zipfile.ZipFile

    def template(self) -> SourceTemplate | None:
        return KerasArchiveTemplate(self.layout(), self.config, self.keras_metadata, self.archive, self.members)

    def metadata(self) -> dict[str, str]:
        out = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.keras_metadata.items()}
        return out

    def extras(self) -> dict[str, Any]:
        opt = [g for g in OPTIMIZER_GROUPS if g in self.h5]
        cls = self.config_object.get("class_name", "?")
        return {
            "model class": cls,
            "keras_version": self.keras_metadata.get("keras_version"),
            "optimizer state": "present (not averaged)" if opt else "absent",
        }


def open_keras(path: Path, *, key: str | None = None, label: str | None = None) -> KerasArchiveSource:
    reject_key(key, path, "keras")
    lab = label if label is not None else str(path)
    try:
        zf = zipfile.ZipFile(path)
    except CORRUPT_ERRORS as exc:
        raise FormatError(f"{lab}: not a readable .keras archive ({exc})") from None
    owned: list[Any] = [zf]
    try:
        with corrupt_file_errors(lab, "corrupt .keras archive"):
            return _open_keras(path, zf, lab, owned)
    except BaseException:
        for obj in reversed(owned):
            with contextlib.suppress(Exception):
                obj.close()
        raise


def _open_keras(path: Path, zf: zipfile.ZipFile, lab: str, owned: list[Any]) -> KerasArchiveSource:
    check_zip(zf, lab, max_ratio=MAX_RATIO)
    names = zf.namelist()
    if WEIGHTS not in names:
        if "model.weights.npz" in names:
            raise FormatError(
                f"{lab}: saved with weights_format='npz'; polyak reads .keras archives with "
                f"{WEIGHTS}. Re-save with model.save(path) (the default h5 weights)"
            )
        raise FormatError(f"{lab}: the archive has no {WEIGHTS}; not a Keras 3 model file")
    config = read_member(zf, CONFIG, lab)
    # Parsed with limits even though only copied: `inspect` reports its class, and a file
    # whose config Keras could not parse is no model file.
    config_object = json_object(config, lab, CONFIG)
    meta: dict[str, Any] = {}
    if METADATA in names:
        meta = json_object(read_member(zf, METADATA, lab), lab, METADATA)
    zi = zf.getinfo(WEIGHTS)
    if zi.compress_type == zipfile.ZIP_STORED:
        fileobj: Any = _StoredMember(path, _data_offset(path, zi), zi.file_size)
        owned.append(fileobj)
    else:
        tmp = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the source
        owned.append(tmp)  # closed by open_keras if copying fails (a damaged deflate stream)
        with zf.open(zi) as fp:
            copied = 0
            while block := fp.read(1 << 22):
                copied += len(block)
                if copied > zi.file_size:
                    raise UnsafeFileError(f"{lab}: {WEIGHTS} is larger than declared; refusing it")
                tmp.write(block)
        tmp.seek(0)
        fileobj = tmp
    h5 = open_h5(fileobj, lab)
    src = KerasArchiveSource(h5, path, label=lab, excluded=OPTIMIZER_GROUPS, owned=owned)
    src.config = config
    src.config_object = config_object
    src.keras_metadata = meta
    src.members = [z for z in zf.infolist() if z.filename not in (WEIGHTS, CONFIG, METADATA)]
    src.archive = zf
    return src


class KerasArchiveWriter(TensorWriter):
    """Writes a ``.keras`` zip: the newest member's config/metadata/assets + averaged weights."""

    def __init__(self, path: Path, infos: Sequence[TensorInfo], *, template: SourceTemplate | None = None, **kwargs: Any) -> None:
        if not isinstance(template, KerasArchiveTemplate):
            raise ConfigError(
                f"{path}: a .keras output copies the model config from the newest member, which "
                "must itself be a .keras file; write .weights.h5, .safetensors or .npz instead"
            )
        super().__init__(path, infos, template=template, **kwargs)
        self._src = template
        self._inner = KerasWeightsWriter(
            path,
            infos,
            template=template.weights,
            options=self.options,
            publish=False,
            tmp=temp_path_for(path.with_name(path.name + ".weights.h5")),
            metadata={},
        )

    @property
    def order(self) -> list[str]:
        return self._inner.order

    def write(self, name: str, array: np.ndarray) -> None:
        self._inner.write(name, array)

    def commit(self) -> list[Path]:
        h5_tmp = self._inner.commit()[0]
        meta = dict(self._src.keras_metadata)
        record = self.metadata.get("polyak")
        if record is not None:
            try:
                meta["polyak"] = json.loads(record)
            except ValueError:
                meta["polyak"] = record
        out = AtomicFile(self.path)
        try:
            with zipfile.ZipFile(out.file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.writestr(METADATA, json.dumps(meta, indent=2))
                zf.writestr(CONFIG, self._src.config)
                zf.write(h5_tmp, WEIGHTS)
                for zi in self._src.assets:
                    with self._src.archive.open(zi) as fin, zf.open(zi.filename, "w", force_zip64=True) as fout:
                        shutil.copyfileobj(fin, fout, 1 << 22)
            return [out.commit()]
        except OSError as exc:
            out.abort()
            raise OutputError(f"cannot write {self.path}: {exc}") from exc
        finally:
            out.abort()
            with contextlib.suppress(OSError):
                h5_tmp.unlink()

    def abort(self) -> None:
        self._inner.abort()


KERAS = FormatImpl(sniff=sniff_keras, open=open_keras, writer=KerasArchiveWriter)
