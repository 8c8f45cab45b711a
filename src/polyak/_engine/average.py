"""The streaming averaging engine: :func:`average`, the one call behind ``polyak average``.

Averages checkpoints tensor by tensor. For each tensor the members are combined chunk by
chunk into one float32 (float64 for float64 tensors) accumulator that is allocated once and
reused, so memory is the output plus a few tensors, never all members. Integer and bool
tensors are never averaged: they are copied from the newest member (``int_policy="newest"``)
or refused (``"error"``). Every floating tensor of the result is checked for NaN/Inf; only
when one is found are the members searched for the culprit.

:func:`average` is a sequence of named steps: check the options (:func:`_check_split`),
choose the members and their weights, check the output (:func:`_prepare_output`), open and
check the members, record the provenance (:func:`_provenance`), then compute the average
into a dict, into one writer (:func:`~polyak.formats.open_writer`) or with parallel workers
(:func:`~.parallel.average_parallel`). Everything that must be undone when a step fails
(the distributed group, the open members, a half-written output) sits in one ``ExitStack``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, overload

import numpy as np

from .._atomic import check_folder_output, check_output_path, cleanup_stale_temps, refuse_overlap
from .._dtypes import dtype_from_name, dtype_name, is_float
from .._errors import ConfigError
from .._schemes import get_scheme
from .._version import __version__
from ..formats import TensorSource, WriteOptions, open_writer, suffix_format
from ..formats import output_format as _output_format
from ..formats.safetensors import shard_paths
from .members import MemberLike, check_members, member_names, open_members, select_members
from .parallel import DistContext, average_parallel, close_distributed, init_distributed
from .stream import average_sources, output_infos

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["FOLDER_FORMAT", "AverageOptions", "AverageResult", "Chosen", "average", "choose_members", "parse_size"]

#: The format of a folder output (a folder ``from_pretrained`` opens).
FOLDER_FORMAT = "hf-folder"


@dataclass
class AverageResult:
    """What :func:`average` wrote.

    Attributes:
        out: The output path given.
        files: Every file written (shards and index for a sharded output).
        members: The member files (or labels), oldest → newest.
        weights: The normalised weight of each member, oldest → newest.
        scheme: The scheme name.
        averaged: Number of floating tensors averaged.
        copied: Number of integer/bool tensors copied from the newest member.
        nbytes: Bytes of tensor data written.
        seconds: Wall time.
        metadata: The ``polyak`` metadata record stored in the output.
        rank: This process's rank in a ``distributed`` average (0 otherwise). Every rank
            returns a result; rank 0's is the job's (it writes the index), so print one
            summary per job from rank 0.
        names: Each member named by the part of its path that tells it apart
            (``checkpoint-40``, not ``model.safetensors``), oldest → newest.
        notes: What the writer did beyond the tensors, one line each (a folder output:
            the files copied from the newest member and those left out).
    """

    out: Path
    files: list[Path]
    members: list[str]
    weights: list[float]
    scheme: str
    averaged: int
    copied: int
    nbytes: int
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    names: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Parse ``"5GB"``, ``"500MiB"`` or a number of bytes.

    Example:
        >>> parse_size("5GB"), parse_size("1MiB"), parse_size(123)
        (5000000000, 1048576, 123)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().lower().replace(" ", "")
        num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = s[len(num):]
        if unit not in _SIZE_UNITS or not num:
            raise ConfigError(f"cannot read the size {text!r}; write e.g. 5GB, 500MB or 2GiB")
        try:
            value = int(float(num) * _SIZE_UNITS[unit])
        except ValueError:
            raise ConfigError(f"cannot read the size {text!r}; write e.g. 5GB, 500MB or 2GiB") from None
    if value < 1:
        raise ConfigError(f"a size must be at least 1 byte, got {text!r}")
    return value


def _check_split(workers: int, distributed: bool, out: object) -> bool:
    """Whether the work is split across workers or ranks (which always writes files)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a whole number ≥ 1, got {workers!r}")
    split = workers > 1 or distributed
    if split and out is None:
        raise ConfigError("workers/distributed averaging writes files: pass an output path (-o/out=)")
    return split


def _join_distributed(stack: contextlib.ExitStack) -> DistContext:
    dist = init_distributed()
    stack.callback(close_distributed, dist)
    return dist


def _wants_folder(out: str | os.PathLike[str], out_format: str | None, members: Sequence[MemberLike]) -> bool:
    """Whether the output is a folder: ``out_format="hf-folder"``, a name ending in ``/``, an
    existing folder, or folder members and a name without a checkpoint suffix."""
    if out_format is not None:
        return out_format == FOLDER_FORMAT
    text = os.fspath(out)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        return True
    if suffix_format(text) is not None:
        return False
    return any(Path(m).is_dir() for m in members if isinstance(m, (str, os.PathLike)))


def _prepare_output(
    out: str | os.PathLike[str],
    out_format: str | None,
    members: Sequence[MemberLike],
    *,
    force: bool,
    sharded: bool,
    split: bool,
    clean: bool,
) -> tuple[Path, str | None]:
    """Check the output path (format, overwrite, overlap with the inputs) before any work.

    Returns:
        The output path and the format to write it in (``None``: by its suffix).
    """
    inputs = [m for m in members if isinstance(m, (str, os.PathLike))]
    if _wants_folder(out, out_format, members):
        if split:
            raise ConfigError(
                "--workers and --distributed write one sharded safetensors output, not a folder; "
                "drop them, or write -o NAME.safetensors.index.json"
            )
        out_path = check_folder_output(out, force=force, inputs=inputs)
        if clean:
            cleanup_stale_temps(out_path.parent)
        return out_path, FOLDER_FORMAT
    fmt = _output_format(out, out_format)
    safetensors = fmt.name in ("safetensors", "safetensors-index")
    if (sharded or split) and not safetensors:
        raise ConfigError("--shard-size, --workers and --distributed write safetensors outputs only")
    out_path = check_output_path(out, force=force, inputs=inputs)
    if safetensors and (sharded or out_path.name.endswith(".safetensors.index.json")):
        # A sharded output is judged by its index (the shards are renamed before it).
        check_output_path(shard_paths(out_path, 1)[0], force=force, inputs=inputs)
    if clean:
        cleanup_stale_temps(out_path.parent)
    return out_path, out_format


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _member_record(name: str, files: Sequence[Path], checksum: bool) -> dict[str, Any]:
    """One member in the provenance record: its name, the bytes of the files it was read
    from, and with ``checksum`` their SHA-256 (one digest, or one per file for a member
    read from several: a sharded index, a folder)."""
    rec: dict[str, Any] = {"file": name}
    if files:
        try:
            rec["bytes"] = sum(f.stat().st_size for f in files)
        except OSError:
            pass
        if checksum:
            rec["sha256"] = _sha256(files[0]) if len(files) == 1 else {f.name: _sha256(f) for f in files}
    return rec


def _provenance(
    names: Sequence[str],
    files: Sequence[Sequence[Path]],
    weights: np.ndarray,
    *,
    scheme: str,
    params: dict[str, Any],
    order: str,
    int_policy: str,
    dtype: str | None,
    checksum: bool,
) -> dict[str, Any]:
    """The ``polyak`` record stored in the output's metadata: how it was made, from what."""
    return {
        "tool": f"polyak {__version__}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "scheme": scheme,
        "params": params,
        "weights": [float(x) for x in weights],
        "order": order,
        "members": [_member_record(name, fs, checksum) for name, fs in zip(names, files)],
        "accumulate": "float32 (float64 for float64 tensors)",
        "int_policy": int_policy,
        "dtype": "as input" if dtype is None else dtype_name(dtype_from_name(dtype)),
    }


def _input_files(sources: Sequence[TensorSource]) -> list[Path]:
    return [f for src in sources for f in src.files()]


@dataclass(frozen=True)
class Chosen:
    """The members of an average, oldest → newest, and their normalised weights."""

    members: list[MemberLike]
    weights: np.ndarray
    scheme: str
    params: dict[str, Any]


def choose_members(
    members: Sequence[MemberLike],
    *,
    scheme: str = "equal",
    alpha: float | None = None,
    weights: Sequence[float] | None = None,
    last: int | None = None,
    order: str = "number",
) -> Chosen:
    """The first step of every average: the scheme, the members in order, their weights.

    Members whose order the paths do not tell are refused only when their weights would
    differ (see :func:`~.members.select_members`).

    Example:
        >>> c = choose_members(["b_10.npz", "b_9.npz", "b_11.npz"], scheme="linear", last=2)
        >>> [str(m) for m in c.members], c.weights.round(3).tolist()
        (['b_10.npz', 'b_11.npz'], [0.333, 0.667])
    """
    if weights is not None:
        scheme = "custom"
    spec = get_scheme(scheme)
    params = spec.resolve(alpha=alpha, weights=weights)
    chosen = select_members(members, last=last, order=order, weights=lambda n: spec.weights(n, **params))
    return Chosen(chosen, spec.weights(len(chosen), **params), scheme, spec.record(params))


class AverageOptions(TypedDict, total=False):
    """The keyword options of :func:`average` other than ``out`` (see there)."""

    scheme: str
    alpha: float | None
    weights: Sequence[float] | None
    last: int | None
    order: str
    format: str | None
    out_format: str | None
    key: str | None
    strip_prefix: Sequence[str]
    dtype: str | None
    int_policy: str
    checksum: bool
    shard_size: int | str | None
    keep_optimizer: bool
    force: bool
    progress: bool
    workers: int
    distributed: bool


@overload
def average(members: Sequence[MemberLike], *, out: None = None, **options: Unpack[AverageOptions]) -> dict[str, np.ndarray]: ...
@overload
def average(members: Sequence[MemberLike], *, out: str | os.PathLike[str], **options: Unpack[AverageOptions]) -> AverageResult: ...
def average(
    members: Sequence[MemberLike],
    *,
    scheme: str = "equal",
    alpha: float | None = None,
    weights: Sequence[float] | None = None,
    last: int | None = None,
    order: str = "number",
    out: str | os.PathLike[str] | None = None,
    format: str | None = None,
    out_format: str | None = None,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    dtype: str | None = None,
    int_policy: str = "newest",
    checksum: bool = False,
    shard_size: int | str | None = None,
    keep_optimizer: bool = False,
    force: bool = False,
    progress: bool = False,
    workers: int = 1,
    distributed: bool = False,
) -> dict[str, np.ndarray] | AverageResult:
    """Average checkpoints (or in-memory states) with equal, linear, exponential or custom weights.

    Members are ordered oldest → newest (``order``), the newest ``last`` are kept, and their
    weighted average is computed tensor by tensor (see :func:`polyak.scheme_weights` for the
    exact weights). Floating tensors are summed in float32 (float64 for float64) and written
    in their own dtype unless ``dtype`` says otherwise; integer and bool tensors are copied
    from the newest member.

    Args:
        members: Checkpoint paths (safetensors, sharded safetensors index, ``.npz``, ``.pt``,
            Keras files when ``polyak[keras]`` is installed), checkpoint folders (Hugging
            Face ``save_pretrained``/``Trainer`` and Accelerate ``save_state`` folders,
            ``torch.distributed.checkpoint`` folders) or mappings of name → array.
        scheme: ``"equal"``, ``"linear"``, ``"exponential"``, ``"custom"`` or another
            registered scheme (see :func:`polyak.scheme_names`).
        alpha: Decay rate of ``"exponential"`` (> 0). Default: the scheme's (2.0).
        weights: Custom weights, oldest → newest (implies ``scheme="custom"``).
        last: Keep only the newest ``last`` members.
        order: How to order paths: ``"number"`` (default: by the numbers in the part of the
            paths that differs between members, so ``checkpoint-5/model.safetensors`` comes
            before ``checkpoint-40/model.safetensors``), ``"mtime"``, ``"name"`` or
            ``"given"``. Members whose numbers tie or that have none are refused when the
            result depends on their order (a weighted scheme, or ``last`` keeping some of
            them); equal weights over all members need no order.
        out: Write the result here (format from the suffix) instead of returning it. A
            folder (a name ending in ``/``, an existing folder, folder members with a name
            without suffix, or ``out_format="hf-folder"``) gets a folder ``from_pretrained``
            opens: the weights in the newest member's layout plus its model files.
        format: Force the input format (default: by suffix, checked by magic bytes).
        out_format: Force the output format.
        key: Key of the state dict inside nested ``.pt`` checkpoints (``"model"``...).
        strip_prefix: Prefixes to remove from tensor names (``"module."``, ``"_orig_mod."``).
        dtype: Output dtype for floating tensors (e.g. ``"float32"``); default: as the input.
        int_policy: ``"newest"`` (copy integer/bool tensors from the newest member) or
            ``"error"``.
        checksum: Record each member's SHA-256 in the output metadata (an extra read pass).
        shard_size: Split a safetensors output into shards of at most this many bytes
            (``"5GB"``), with a ``.safetensors.index.json`` index. A folder output is
            sharded like its newest member unless this is given.
        keep_optimizer: Keras archives: copy the newest member's optimizer variables.
        force: Replace an existing output.
        progress: Show a progress bar on stderr (only on a terminal).
        workers: Split the tensors across this many worker threads (needs ``out``, a file,
            and files as members). Above 1 the output is always sharded safetensors:
            ``<stem>.safetensors.index.json`` plus ``<stem>-0000i-of-0000n.safetensors``
            beside ``out``; the tensors are bit-identical to ``workers=1``.
        distributed: This process is one rank of a ``torchrun`` job: each rank averages a
            disjoint share of the tensors from shared storage and writes its shards; rank 0
            writes the index after all are done (same output layout as ``workers``).

    Returns:
        Without ``out``: a dict of numpy arrays, in the newest member's tensor order. With
        ``out``: an :class:`AverageResult`.

    Raises:
        ConfigError: Invalid options (``SchemeError`` for scheme problems).
        FormatError: An unreadable, corrupt or unsafe member.
        MismatchError: Members disagree on names, shapes or dtypes (all listed at once).
        NonFiniteError: A member holds NaN/Inf in a floating tensor.
        OutputError: The output exists (without ``force``), equals an input, or cannot be
            written. No partial output is left behind.

    Example:
        >>> import numpy as np, polyak
        >>> a = {"w": np.array([0.0, 3.0], np.float32)}
        >>> b = {"w": np.array([3.0, 6.0], np.float32)}
        >>> polyak.average([a, b], scheme="linear")["w"].tolist()
        [2.0, 5.0]
    """
    t0 = time.perf_counter()
    # Options and members (in this order: the first problem found is the one reported).
    pick = choose_members(members, scheme=scheme, alpha=alpha, weights=weights, last=last, order=order)
    chosen, w, scheme = pick.members, pick.weights, pick.scheme
    shard_bytes = None if shard_size is None else parse_size(shard_size)
    split = _check_split(workers, distributed, out)
    with contextlib.ExitStack() as stack:
        dist = _join_distributed(stack) if distributed else None
        out_path = None
        write_format = out_format
        if out is not None:
            out_path, write_format = _prepare_output(
                out, out_format, chosen, force=force, sharded=shard_bytes is not None, split=split,
                clean=dist is None or dist.rank == 0,  # other ranks' live temporaries may be on shared storage
            )
        sources = stack.enter_context(open_members(chosen, format=format, key=key, strip_prefix=strip_prefix))
        infos = check_members(sources, int_policy=int_policy)
        if out_path is None:
            return average_sources(sources, w, infos=infos, dtype=dtype, int_policy=int_policy, progress=progress)
        out_infos = output_infos(infos, dtype)
        labels = [s.label for s in sources]
        names = member_names(chosen)
        record = _provenance(
            names, [s.files() for s in sources], w, scheme=scheme, params=pick.params, order=order,
            int_policy=int_policy, dtype=dtype, checksum=checksum,
        )
        metadata = {**sources[-1].metadata(), "polyak": json.dumps(record, ensure_ascii=False)}
        notes: list[str] = []
        if split:
            refuse_overlap([out_path, shard_paths(out_path, 1)[0]], _input_files(sources))
            files = average_parallel(
                chosen, w, out_infos, out_path, metadata, workers=workers, dist=dist, format=format,  # type: ignore[arg-type]
                key=key, strip_prefix=strip_prefix, dtype=dtype, int_policy=int_policy, shard_size=shard_bytes,
            )
        else:
            if write_format == FOLDER_FORMAT:  # the members' own files are known only now (shards)
                check_folder_output(out_path, force=force, inputs=_input_files(sources))
            writer = stack.enter_context(open_writer(
                out_path, out_infos, format=write_format, metadata=metadata, template=sources[-1],
                aliases=sources[-1].aliases(), options=WriteOptions(shard_size=shard_bytes, keep_optimizer=keep_optimizer),
            ))
            # Inputs are known file by file only now (shards of an index): the output must not
            # replace any of them, under any spelling.
            refuse_overlap(writer.targets, _input_files(sources))
            average_sources(sources, w, infos=infos, dtype=dtype, int_policy=int_policy, writer=writer, progress=progress)
            files = writer.commit()
            notes = list(writer.notes)
    n_float = sum(1 for i in infos if is_float(i.dtype))
    return AverageResult(
        out=out_path,
        files=files,
        members=labels,
        weights=[float(x) for x in w],
        scheme=scheme,
        averaged=n_float,
        copied=len(infos) - n_float,
        nbytes=sum(i.nbytes for i in out_infos),
        seconds=time.perf_counter() - t0,
        metadata=record,
        rank=0 if dist is None else dist.rank,
        names=names,
        notes=notes,
    )
