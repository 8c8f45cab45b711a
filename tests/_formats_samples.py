"""Valid sample files of every format, for the reliability and hostile-input tests.

Each entry of :data:`SAMPLES` knows how to write a *valid* checkpoint of its format from a
dict of numpy arrays, with an independent writer where one exists (``safetensors.numpy``,
``numpy.savez``, ``torch.save``), so that polyak's readers are tested on files polyak did
not produce. A new format plugs in with one :func:`register_sample` call; every
parametrised reliability test (broken files, mutations, fuzzing, kills) then covers it.

A sample maker returns the path to hand to polyak (the index for sharded formats) and the
list of files whose bytes the mutation tests may corrupt.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SAMPLES", "SampleFormat", "available", "register_sample", "sample_state"]

Maker = Callable[[Path, dict[str, np.ndarray]], tuple[Path, list[Path]]]


@dataclass(frozen=True)
class SampleFormat:
    """How to write a valid file of one polyak format.

    Attributes:
        name: The sample's id (``npz-compressed``...).
        format: The polyak format it is read as (``polyak.formats.FORMATS`` key).
        suffix: Suffix of the file handed to polyak.
        make: ``make(folder, state) -> (path for polyak, files to corrupt)``.
        needs: Modules the maker imports (the tests skip when one is missing).
        writable: polyak can write this format (used by the kill and output tests).
    """

    name: str
    format: str
    suffix: str
    make: Maker
    needs: tuple[str, ...] = ()
    writable: bool = True


SAMPLES: dict[str, SampleFormat] = {}


def register_sample(sample: SampleFormat) -> SampleFormat:
    SAMPLES[sample.name] = sample
    return sample


def available(sample: SampleFormat) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in sample.needs)


def sample_state(seed: int = 0, *, scale: int = 1) -> dict[str, np.ndarray]:
    """A small state: float32 matrices and a vector, a float16 tensor, an int counter."""
    rng = np.random.default_rng(seed)
    return {
        "layer.0.weight": rng.standard_normal((4 * scale, 3)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(4 * scale).astype(np.float32),
        "layer.1.weight": rng.standard_normal((2, 4 * scale)).astype(np.float16),
        "steps": np.array(7 + seed, dtype=np.int64),
    }


# --- makers ------------------------------------------------------------------------------


def _safetensors(folder: Path, state: dict[str, np.ndarray]) -> tuple[Path, list[Path]]:
    from safetensors.numpy import save_file

    path = folder / "model.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path), metadata={"format": "np"})
    return path, [path]


def _safetensors_index(folder: Path, state: dict[str, np.ndarray]) -> tuple[Path, list[Path]]:
    from safetensors.numpy import save_file

    names = sorted(state)
    half = max(1, len(names) // 2)
    groups = [names[:half], names[half:]] if len(names) > 1 else [names]
    shards = []
    weight_map = {}
    for i, group in enumerate(groups, 1):
        shard = folder / f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: np.ascontiguousarray(state[k]) for k in group}, str(shard))
        shards.append(shard)
        weight_map.update({k: shard.name for k in group})
    index = folder / "model.safetensors.index.json"
    total = sum(int(v.nbytes) for v in state.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index, [index, *shards]


def _npz(folder: Path, state: dict[str, np.ndarray]) -> tuple[Path, list[Path]]:
    path = folder / "model.npz"
    np.savez(path, **state)  # type: ignore[arg-type]
    return path, [path]


def _npz_compressed(folder: Path, state: dict[str, np.ndarray]) -> tuple[Path, list[Path]]:
    path = folder / "model.npz"
    np.savez_compressed(path, **state)  # type: ignore[arg-type]
    return path, [path]


def _torch(folder: Path, state: dict[str, np.ndarray]) -> tuple[Path, list[Path]]:
    import torch

    path = folder / "model.pt"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)
    return path, [path]


def _torch_legacy(folder: Path, state: dict[str, np.ndarray]) -> tuple[Path, list[Path]]:
    import torch

    path = folder / "model.pt"
    torch.save(
        {k: torch.from_numpy(np.array(v)) for k, v in state.items()},
        path,
        _use_new_zipfile_serialization=False,
    )
    return path, [path]


def _h5_weights(path: Path, state: dict[str, np.ndarray]) -> None:
    """A Keras 3 ``.weights.h5`` layout (``layers/<layer>/vars/<i>``), written with h5py."""
    import h5py

    with h5py.File(path, "w") as f:
        for name, value in state.items():
            vars_ = f.require_group(f"layers/{name}/vars")
            vars_.create_dataset("0", data=value)


def _keras_weights(folder: Path, state: dict[str, np.ndarray]) -> tuple[Path, list[Path]]:
    path = folder / "model.weights.h5"
    _h5_weights(path, state)
    return path, [path]


def _keras_archive(folder: Path, state: dict[str, np.ndarray], *, extra: bytes = b"") -> tuple[Path, list[Path]]:
    """A Keras 3 ``.keras`` archive, members stored; ``extra`` goes into the weights' local header."""
    import zipfile

    weights = folder / "model.weights.h5.tmp"
    _h5_weights(weights, state)
    path = folder / "model.keras"
    config = {"module": "keras", "class_name": "Sequential", "config": {"name": "s", "layers": []}}
    meta = {"keras_version": "3.0.0", "date_saved": "2025-01-01@00:00:00"}
    with zipfile.ZipFile(path, "w") as zf:  # stored, like keras.saving
        zf.writestr("metadata.json", json.dumps(meta))
        zf.writestr("config.json", json.dumps(config))
        info = zipfile.ZipInfo.from_file(weights, "model.weights.h5")
        info.extra = extra
        zf.writestr(info, weights.read_bytes())
    weights.unlink()
    return path, [path]


def _keras2_h5(folder: Path, state: dict[str, np.ndarray]) -> tuple[Path, list[Path]]:
    """A Keras 2 weights-only ``.h5`` (``layer_names`` / ``weight_names`` attributes)."""
    import h5py

    path = folder / "model.h5"
    with h5py.File(path, "w") as f:
        layers = sorted(state)
        # as Keras 2's save_attributes_to_hdf5_group stores them: a fixed-length bytes array
        f.attrs["layer_names"] = np.asarray([n.encode() for n in layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.15.0"
        for name in layers:
            g = f.create_group(name)
            g.attrs["weight_names"] = np.asarray([f"{name}/w:0".encode()])
            g.create_group(name).create_dataset("w:0", data=state[name])
    return path, [path]


register_sample(SampleFormat("safetensors", "safetensors", ".safetensors", _safetensors, ("safetensors",)))
register_sample(
    SampleFormat("safetensors-index", "safetensors-index", ".safetensors.index.json", _safetensors_index, ("safetensors",))
)
register_sample(SampleFormat("npz", "npz", ".npz", _npz))
register_sample(SampleFormat("npz-compressed", "npz", ".npz", _npz_compressed, writable=False))
register_sample(SampleFormat("torch", "torch", ".pt", _torch, ("torch",)))
register_sample(SampleFormat("torch-legacy", "torch", ".pt", _torch_legacy, ("torch",), writable=False))
register_sample(SampleFormat("keras-weights", "keras-weights", ".weights.h5", _keras_weights, ("h5py",)))
register_sample(SampleFormat("keras", "keras", ".keras", _keras_archive, ("h5py",), writable=False))
register_sample(SampleFormat("keras2-h5", "keras2-h5", ".h5", _keras2_h5, ("h5py",)))
