"""A checkpoint format that is not polyak's: what a user registers with register_format.

A ``.toy`` file is the line ``TOY 1`` followed by JSON: ``{"tensors": {name: {"dtype",
"values", "note"}}, "metadata": {...}}``. Each tensor carries a free-text note, which the
writer copies from the newest member (its template), so that the template hook and its
renaming under ``strip_prefix`` are exercised by a format polyak knows nothing about.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyak._atomic import atomic_write_bytes
from polyak.formats import FormatImpl, SourceTemplate, TensorInfo, TensorSource, TensorWriter

MAGIC = b"TOY 1\n"


def save_toy(path: Path, tensors: Mapping[str, np.ndarray], notes: Mapping[str, str]) -> Path:
    body = {
        "tensors": {n: {"dtype": a.dtype.name, "values": a.tolist(), "note": notes.get(n, "")} for n, a in tensors.items()},
        "metadata": {},
    }
    path.write_bytes(MAGIC + json.dumps(body).encode())
    return path


def load_toy(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    assert raw.startswith(MAGIC)
    return json.loads(raw[len(MAGIC):])  # type: ignore[no-any-return]


def sniff_toy(path: Path, head: bytes) -> bool:
    return head.startswith(MAGIC)


@dataclass(frozen=True)
class ToyTemplate(SourceTemplate):
    notes: Mapping[str, str]

    def renamed(self, names: Mapping[str, str]) -> ToyTemplate:
        return ToyTemplate({names[n]: note for n, note in self.notes.items() if n in names})


class ToySource(TensorSource):
    format_name = "toy"

    def __init__(self, path: Path, *, key: str | None = None, label: str | None = None) -> None:
        super().__init__(path, label)
        tensors = load_toy(path)["tensors"]
        self._arrays = {n: np.asarray(t["values"], dtype=t["dtype"]) for n, t in tensors.items()}  # type: ignore[attr-defined]
        self._notes = {n: t["note"] for n, t in tensors.items()}  # type: ignore[attr-defined]

    def infos(self) -> Mapping[str, TensorInfo]:
        return {n: TensorInfo(n, a.shape, a.dtype) for n, a in self._arrays.items()}

    def read(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def template(self) -> SourceTemplate | None:
        return ToyTemplate(self._notes)


class ToyWriter(TensorWriter):
    def __init__(self, path: Path, infos: list[TensorInfo], **kwargs: object) -> None:
        super().__init__(path, infos, **kwargs)  # type: ignore[arg-type]
        self._values: dict[str, np.ndarray] = {}

    def write(self, name: str, array: np.ndarray) -> None:
        self._values[name] = np.array(array, copy=True)

    def commit(self) -> list[Path]:
        notes = self.template.notes if isinstance(self.template, ToyTemplate) else {}
        body = {
            "tensors": {
                n: {"dtype": i.dtype_name, "values": self._values[n].tolist(), "note": notes.get(n, "")}
                for n, i in self.infos.items()
            },
            "metadata": self.metadata,
        }
        return [atomic_write_bytes(self.path, MAGIC + json.dumps(body).encode())]

    def abort(self) -> None:
        self._values = {}


TOY = FormatImpl(sniff=sniff_toy, open=ToySource, writer=ToyWriter)
