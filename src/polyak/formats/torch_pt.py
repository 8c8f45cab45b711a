"""PyTorch checkpoints (``torch.save``): ``.pt``, ``.pth``, ``.bin``, ``.ckpt``, and Hugging
Face sharded ones (``pytorch_model.bin.index.json`` + ``pytorch_model-0000i-of-0000n.bin``).

Loaded only with ``torch.load(weights_only=True, map_location="cpu")``: the restricted
unpickler builds tensors and plain containers and refuses anything that would run code.
There is no unsafe fallback. torch is imported only when such a file is opened.

A nested training checkpoint (``{"model": {...}, "optimizer": {...}, "epoch": 3}``) is
unwrapped by ``key=`` (``--key``), or automatically when exactly one entry holds tensors.
Tensors that share storage (tied weights) are reported as aliases and written once.
"""

from __future__ import annotations

import pickle
import struct
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import AtomicFile
from .._errors import ConfigError, FormatError, UnsafeFileError
from ._base import FormatImpl, SourceTemplate, TensorInfo, TensorSource, TensorWriter, contiguous
from ._common import check_zip, reject_key
from .safetensors import SafetensorsIndexSource, sniff_safetensors_index

_PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
#: torch.save stores every member uncompressed (1:1); a member above 16 MiB that expands
#: more than this is refused as a zip bomb, as in ``.keras`` archives.
MAX_RATIO = 100


def sniff_torch(path: Path, head: bytes) -> bool:
    """torch's zip format (``*/data.pkl`` inside) or the legacy pickle format."""
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith("/data.pkl") or n == "data.pkl" for n in zf.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            return False
    return head[:2] in _PICKLE_PROTOCOLS


def _torch() -> Any:
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised only without torch
        raise ConfigError(
            "reading PyTorch checkpoints needs torch: pip install 'polyak[torch]'"
        ) from None
    return torch


def tensor_to_numpy(t: Any) -> np.ndarray:
    """A CPU numpy array for a torch tensor; bfloat16/float8 through ml_dtypes (no copy)."""
    torch = _torch()
    import ml_dtypes

    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    special = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
    }
    for attr, ml in (("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", "float8_e5m2")):
        if hasattr(torch, attr):
            special[getattr(torch, attr)] = (torch.uint8, getattr(ml_dtypes, ml))
    if t.dtype in special:
        bits, np_dtype = special[t.dtype]
        return t.contiguous().view(bits).numpy().view(np_dtype)
    return t.contiguous().numpy()


def numpy_to_tensor(a: np.ndarray) -> Any:
    """A torch tensor (sharing memory where possible) for a numpy array, ml_dtypes included."""
    torch = _torch()
    arr = contiguous(a)
    if not arr.flags.writeable:
        # torch.from_numpy warns on read-only arrays (memory-mapped reads): copy first.
        arr = arr.copy()
    name = arr.dtype.name
    mapping = {"bfloat16": ("int16", torch.bfloat16), "float8_e4m3fn": ("uint8", "float8_e4m3fn"), "float8_e5m2": ("uint8", "float8_e5m2")}
    if name in mapping:
        bits, target = mapping[name]
        target_dtype = getattr(torch, target) if isinstance(target, str) else target
        return torch.from_numpy(arr.view(bits)).view(target_dtype)
    return torch.from_numpy(arr)


def _is_tensor(v: Any) -> bool:
    torch = _torch()
    return isinstance(v, torch.Tensor)


def _candidates(obj: Mapping[str, Any]) -> list[str]:
    return [k for k, v in obj.items() if isinstance(v, Mapping) and any(_is_tensor(x) for x in v.values())]


def _check_archive(path: Path, label: str) -> None:
    """torch inflates a compressed member into memory: check a zip's directory against the
    file (sizes, ratios, total) before ``torch.load`` sees it."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as zf:
            check_zip(zf, label, max_ratio=MAX_RATIO)
    except (zipfile.BadZipFile, OSError, EOFError, struct.error, NotImplementedError) as exc:
        raise FormatError(f"{label}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def load_state(path: Path, label: str) -> Any:
    """``torch.load`` with ``weights_only=True``; errors say why and what to do."""
    torch = _torch()
    _check_archive(path, label)
    try:
        zipped = zipfile.is_zipfile(path)
        with warnings.catch_warnings():
            # A corrupt legacy file can carry a nonsense pickle protocol byte; torch warns
            # about it before failing (or not). Its warnings say nothing to polyak's users.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError:
        unsafe: list[str] = []
        getter = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
        if getter is not None:
            try:
                unsafe = sorted(getter(str(path)))  # torch lists them in set order
            except Exception:
                unsafe = []
        what = f" (it references {', '.join(unsafe)})" if unsafe else ""
        raise UnsafeFileError(
            f"{label}: refused to load: the file contains Python objects that only an unsafe "
            f"pickle load could build{what}. polyak loads .pt files with "
            "torch.load(weights_only=True) and never falls back to running code from a file. "
            "If you trust this file, convert it once: state = torch.load(path, weights_only=False); "
            "then save the tensors with safetensors.torch.save_file(state['model'], 'model.safetensors') "
            "or torch.save(state['model'], 'model.pt')."
        ) from None
    except (
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        zipfile.BadZipFile,
        KeyError,
        IndexError,
        TypeError,
        AttributeError,
        struct.error,
        # torch validates parts of the legacy format with `assert` (a "storage key not found").
        AssertionError,
        UnicodeDecodeError,
        OverflowError,
        MemoryError,
    ) as exc:
        raise FormatError(f"{label}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def _named(tensors: dict[Any, Any], label: str) -> dict[str, Any]:
    """Tensor names must be strings (a state dict's are); anything else is not a state dict."""
    for k in tensors:
        if not isinstance(k, str):
            raise FormatError(f"{label}: tensor key {k!r} is of type {type(k).__name__}, not a name; not a state dict")
    return tensors


def _flatten(obj: Any, path: Path, label: str, key: str | None) -> tuple[dict[str, Any], str | None]:
    if not isinstance(obj, Mapping):
        raise FormatError(
            f"{label}: holds a {type(obj).__name__}, not a state dict; save model.state_dict() "
            "(or a dict of tensors)"
        )
    if key is not None:
        node: Any = obj
        walked: list[str] = []
        for part in key.split("/"):
            where = f"under {'/'.join(walked)!r}" if walked else "at the top level"
            if not isinstance(node, Mapping):
                raise ConfigError(
                    f"{label}: no key {key!r} in the checkpoint; {'/'.join(walked)!r} holds a value of "
                    f"type {type(node).__name__}, not a dict"
                )
            if part not in node:
                found = ", ".join(repr(k) for k in node) or "none"
                raise ConfigError(f"{label}: no key {key!r} in the checkpoint; the keys {where}: {found}")
            node = node[part]
            walked.append(part)
        if not isinstance(node, Mapping) or not any(_is_tensor(v) for v in node.values()):
            raise ConfigError(f"{label}: the entry {key!r} holds no tensors")
        return _named({k: v for k, v in node.items() if _is_tensor(v)}, label), key
    if any(_is_tensor(v) for v in obj.values()):
        return _named({k: v for k, v in obj.items() if _is_tensor(v)}, label), None
    cands = _candidates(obj)
    if len(cands) == 1:
        return _named({k: v for k, v in obj[cands[0]].items() if _is_tensor(v)}, label), cands[0]
    if not cands:
        raise FormatError(f"{label}: no tensors found (top-level keys: {', '.join(map(repr, obj))})")
    raise ConfigError(
        f"{label}: the checkpoint holds several state dicts ({', '.join(map(repr, cands))}); "
        f"choose one with --key (key=), e.g. --key {cands[0]}"
    )


def _check_dense(t: Any, name: str, label: str) -> None:
    """Refuse tensors that hold no plain array of numbers: sparse, quantized, or without data."""
    torch = _torch()
    if t.layout != torch.strided:
        raise FormatError(
            f"{label}: tensor {name!r} is a sparse tensor ({t.layout}); polyak averages dense "
            "tensors. Save it dense: state[name] = state[name].to_dense()"
        )
    if t.device.type == "meta":
        raise FormatError(
            f"{label}: tensor {name!r} is on the 'meta' device and holds no data (the model was "
            "saved before its weights were materialised). Materialise it first (e.g. "
            "model.to_empty(device='cpu') and load or initialise the weights), then save again"
        )
    if t.is_quantized:
        raise FormatError(
            f"{label}: tensor {name!r} is quantized ({t.dtype}); polyak averages floating tensors. "
            "Save it dequantized: state[name] = state[name].dequantize()"
        )


@dataclass(frozen=True)
class TorchTemplate(SourceTemplate):
    """What a ``.pt`` output keeps of the newest member: the key its state dict was nested
    under (``None`` for a flat state dict)."""

    key: str | None


class TorchSource(TensorSource):
    """A ``torch.save`` checkpoint, memory-mapped where torch allows (zip format)."""

    format_name = "torch"
    zero_copy = True

    def __init__(self, path: Path, *, key: str | None = None, label: str | None = None) -> None:
        super().__init__(path, label)
        obj = load_state(path, self.label)
        self._tensors, self.key = _flatten(obj, path, self.label, key)
        self._infos: dict[str, TensorInfo] = {}
        seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], Any], str] = {}
        self._aliases: dict[str, str] = {}
        for name, t in self._tensors.items():
            _check_dense(t, name, self.label)
            arr_dtype = numpy_dtype(t)
            self._infos[name] = TensorInfo(name, tuple(t.shape), arr_dtype)
            if t.numel() == 0:
                continue
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if ident in seen:
                self._aliases[name] = seen[ident]
            else:
                seen[ident] = name

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        return tensor_to_numpy(self._tensors[name])

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def extras(self) -> dict[str, Any]:
        return {"key": self.key, "tied": self._aliases}

    def template(self) -> TorchTemplate:
        return TorchTemplate(self.key)

    def close(self) -> None:
        self._tensors = {}


def numpy_dtype(t: Any) -> np.dtype:
    """The numpy dtype of a torch tensor (bfloat16 and float8 through ml_dtypes)."""
    torch = _torch()
    import ml_dtypes

    names = {torch.bfloat16: np.dtype(ml_dtypes.bfloat16)}
    for attr in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, attr):
            names[getattr(torch, attr)] = np.dtype(getattr(ml_dtypes, attr))
    if t.dtype in names:
        return names[t.dtype]
    try:
        return np.dtype(str(t.dtype).removeprefix("torch."))
    except TypeError:
        raise FormatError(f"tensor dtype {t.dtype} has no numpy equivalent") from None


class TorchWriter(TensorWriter):
    """Collects the tensors and writes them with ``torch.save`` (atomically) on commit.

    A flat state dict is written flat. When the newest member was nested under a key, the
    output is ``{key: state_dict, "polyak": metadata}``. Tied tensors are saved once (the
    aliases point at the same tensor object).
    """

    def __init__(self, path: Path, infos: Sequence[TensorInfo], **kwargs: Any) -> None:
        super().__init__(path, infos, **kwargs)
        self._state: dict[str, Any] = {}

    @property
    def order(self) -> list[str]:
        return [n for n in self.infos if n not in self.aliases]

    def write(self, name: str, array: np.ndarray) -> None:
        self._state[name] = numpy_to_tensor(np.array(array, copy=True))

    def commit(self) -> list[Path]:
        torch = _torch()
        from collections import OrderedDict

        state: OrderedDict[str, Any] = OrderedDict()
        for name in self.infos:
            state[name] = self._state[self.aliases.get(name, name)]
        key = self.template.key if isinstance(self.template, TorchTemplate) else None
        obj: Any = state if key is None else {key: state, "polyak": dict(self.metadata)}
        f = AtomicFile(self.path)
        try:
            torch.save(obj, f.file)
        except (OSError, RuntimeError) as exc:
            # torch reports a failed write as "enforce fail ... unexpected pos"; f.fail
            # names the real cause (e.g. no space left on the device).
            raise f.fail(exc) from exc
        except BaseException:
            f.abort()
            raise
        return [f.commit()]

    def abort(self) -> None:
        self._state = {}


class TorchIndexSource(SafetensorsIndexSource):
    """A Hugging Face sharded PyTorch checkpoint: ``pytorch_model.bin.index.json`` and its
    ``.bin`` shards, each read as a :class:`TorchSource` (``weights_only=True``,
    memory-mapped, so keeping every shard open costs no private memory)."""

    format_name = "torch-index"
    close_idle_shards = False  # a TorchSource cannot reopen itself after close()

    def _open_shard(self, path: Path, label: str) -> TensorSource:
        return TorchSource(path, label=label)


def open_torch_index(path: Path, *, key: str | None = None, label: str | None = None) -> TorchIndexSource:
    reject_key(key, path, "sharded PyTorch (pytorch_model.bin.index.json)")
    return TorchIndexSource(path, label=label)


TORCH = FormatImpl(sniff=sniff_torch, open=TorchSource, writer=TorchWriter)
TORCH_INDEX = FormatImpl(sniff=sniff_safetensors_index, open=open_torch_index)
