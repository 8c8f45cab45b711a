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
import math
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, overload

import numpy as np

from .._atomic import check_output_path, cleanup_stale_temps, refuse_overlap
from .._dtypes import dtype_from_name, dtype_name, is_float
from .._errors import ConfigError
from .._schemes import get_scheme
from .._version import __version__
from ..formats import TensorSource, WriteOptions, open_writer
from ..formats import output_format as _output_format
from ..formats.safetensors import shard_paths
from .members import MemberLike, check_members, open_members, select_members
from .parallel import DistContext, average_parallel, close_distributed, init_distributed
from .stream import average_sources, output_infos

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AverageOptions", "AverageResult", "average", "average_weighted", "parse_size"]


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


def _prepare_output(
    out: str | os.PathLike[str],
    out_format: str | None,
    members: Sequence[MemberLike],
    *,
    force: bool,
    sharded: bool,
    split: bool,
    clean: bool,
) -> Path:
    """Check the output path (format, overwrite, overlap with the inputs) before any work."""
    fmt = _output_format(out, out_format)
    safetensors = fmt.name in ("safetensors", "safetensors-index")
    if (sharded or split) and not safetensors:
        raise ConfigError("--shard-size, --workers and --distributed write safetensors outputs only")
    inputs = [m for m in members if isinstance(m, (str, os.PathLike))]
    out_path = check_output_path(out, force=force, inputs=inputs)
    if safetensors and (sharded or out_path.name.endswith(".safetensors.index.json")):
        # A sharded output is judged by its index (the shards are renamed before it).
        check_output_path(shard_paths(out_path, 1)[0], force=force, inputs=inputs)
    if clean:
        cleanup_stale_temps(out_path.parent)
    return out_path


def _member_record(member: MemberLike, label: str, checksum: bool) -> dict[str, Any]:
    rec: dict[str, Any] = {"file": label}
    if isinstance(member, (str, os.PathLike)):
        p = Path(member)
        rec["file"] = p.name
        try:
            rec["bytes"] = p.stat().st_size
        except OSError:
            pass
        if checksum and p.is_file():
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            rec["sha256"] = h.hexdigest()
    return rec


def _provenance(
    members: Sequence[MemberLike],
    labels: Sequence[str],
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
        "members": [_member_record(m, lab, checksum) for m, lab in zip(members, labels)],
        "accumulate": "float32 (float64 for float64 tensors)",
        "int_policy": int_policy,
        "dtype": "as input" if dtype is None else dtype_name(dtype_from_name(dtype)),
    }


def _input_files(sources: Sequence[TensorSource]) -> list[Path]:
    return [f for src in sources for f in src.files()]


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
            Keras files when ``polyak[keras]`` is installed) or mappings of name → array.
        scheme: ``"equal"``, ``"linear"``, ``"exponential"``, ``"custom"`` or another
            registered scheme (see :func:`polyak.scheme_names`).
        alpha: Decay rate of ``"exponential"`` (> 0). Default: the scheme's (2.0).
        weights: Custom weights, oldest → newest (implies ``scheme="custom"``).
        last: Keep only the newest ``last`` members.
        order: How to order paths: ``"number"`` (numbers in the file name; default),
            ``"mtime"``, ``"name"`` or ``"given"``.
        out: Write the result here (format from the suffix) instead of returning it.
        format: Force the input format (default: by suffix, checked by magic bytes).
        out_format: Force the output format.
        key: Key of the state dict inside nested ``.pt`` checkpoints (``"model"``...).
        strip_prefix: Prefixes to remove from tensor names (``"module."``, ``"_orig_mod."``).
        dtype: Output dtype for floating tensors (e.g. ``"float32"``); default: as the input.
        int_policy: ``"newest"`` (copy integer/bool tensors from the newest member) or
            ``"error"``.
        checksum: Record each member's SHA-256 in the output metadata (an extra read pass).
        shard_size: Split a safetensors output into shards of at most this many bytes
            (``"5GB"``), with a ``.safetensors.index.json`` index.
        keep_optimizer: Keras archives: copy the newest member's optimizer variables.
        force: Replace an existing output.
        progress: Show a progress bar on stderr (only on a terminal).
        workers: Split the tensors across this many worker threads (needs ``out`` and
            files as members). Above 1 the output is always sharded safetensors:
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
    if weights is not None:
        scheme = "custom"
    spec = get_scheme(scheme)
    params = spec.resolve(alpha=alpha, weights=weights)
    chosen = select_members(members, last=last, order=order)
    w = spec.weights(len(chosen), **params)
    return average_weighted(
        chosen, w, scheme=scheme, params=spec.record(params), order=order, out=out, format=format,
        out_format=out_format, key=key, strip_prefix=strip_prefix, dtype=dtype, int_policy=int_policy,
        checksum=checksum, shard_size=shard_size, keep_optimizer=keep_optimizer, force=force, progress=progress,
        workers=workers, distributed=distributed, started=t0,
    )


def average_weighted(
    chosen: Sequence[MemberLike],
    w: np.ndarray,
    *,
    scheme: str,
    params: dict[str, Any],
    order: str = "given",
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
    drop_metadata: Sequence[str] = (),
    copy: Collection[str] = (),
    started: float | None = None,
) -> dict[str, np.ndarray] | AverageResult:
    """The steps of :func:`average` after the weights are known: ``Σ w_i · member_i``.

    ``chosen`` are the members, oldest → newest (integer tensors come from the last);
    ``w`` their weights, which must sum to 1 but may be negative: :func:`average` passes a
    scheme's weights (never negative, users' custom weights included: ``_schemes``
    refuses those), :func:`polyak.posthoc` the signed coefficients of a post-hoc EMA.
    ``scheme`` and ``params`` are recorded in the output's provenance; the newest
    member's metadata is copied into it except the keys in ``drop_metadata``; the floating
    tensors named in ``copy`` are copied from the newest member, as integers are. The
    other options are :func:`average`'s.
    """
    t0 = time.perf_counter() if started is None else started
    w = np.asarray(w, dtype=np.float64)
    if len(w) != len(chosen) or not np.all(np.isfinite(w)) or not math.isclose(float(w.sum()), 1.0, abs_tol=1e-9):
        raise ConfigError(f"need {len(chosen)} finite weights that sum to 1, got {w.tolist()}")
    shard_bytes = None if shard_size is None else parse_size(shard_size)
    split = _check_split(workers, distributed, out)
    if split and copy:
        raise ConfigError("copied floating tensors are not supported with workers/distributed")
    with contextlib.ExitStack() as stack:
        dist = _join_distributed(stack) if distributed else None
        out_path = None
        if out is not None:
            out_path = _prepare_output(
                out, out_format, chosen, force=force, sharded=shard_bytes is not None, split=split,
                clean=dist is None or dist.rank == 0,  # other ranks' live temporaries may be on shared storage
            )
        sources = stack.enter_context(open_members(chosen, format=format, key=key, strip_prefix=strip_prefix))
        infos = check_members(sources, int_policy=int_policy)
        if out_path is None:
            return average_sources(sources, w, infos=infos, dtype=dtype, int_policy=int_policy, progress=progress,
                                   copy=copy)
        out_infos = output_infos(infos, dtype)
        labels = [s.label for s in sources]
        record = _provenance(
            chosen, labels, w, scheme=scheme, params=params, order=order, int_policy=int_policy, dtype=dtype,
            checksum=checksum,
        )
        kept = {k: v for k, v in sources[-1].metadata().items() if k not in drop_metadata}
        metadata = {**kept, "polyak": json.dumps(record, ensure_ascii=False)}
        if split:
            refuse_overlap([out_path, shard_paths(out_path, 1)[0]], _input_files(sources))
            files = average_parallel(
                chosen, w, out_infos, out_path, metadata, workers=workers, dist=dist, format=format,  # type: ignore[arg-type]
                key=key, strip_prefix=strip_prefix, dtype=dtype, int_policy=int_policy, shard_size=shard_bytes,
            )
        else:
            writer = stack.enter_context(open_writer(
                out_path, out_infos, format=out_format, metadata=metadata, template=sources[-1],
                aliases=sources[-1].aliases(), options=WriteOptions(shard_size=shard_bytes, keep_optimizer=keep_optimizer),
            ))
            # Inputs are known file by file only now (shards of an index): the output must not
            # replace any of them, under any spelling.
            refuse_overlap(writer.targets, _input_files(sources))
            average_sources(sources, w, infos=infos, dtype=dtype, int_policy=int_policy, writer=writer, progress=progress,
                            copy=copy)
            files = writer.commit()
    n_float = sum(1 for i in infos if is_float(i.dtype) and i.name not in copy)
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
    )
