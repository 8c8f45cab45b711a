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

from .._atomic import check_folder_output, check_output_folder, check_outputs, cleanup_stale_temps
from .._dtypes import dtype_name, is_float, output_dtype
from .._errors import ConfigError
from .._schemes import get_scheme
from .._version import __version__
from ..formats import (
    TensorInfo,
    TensorSource,
    WriteOptions,
    check_storable,
    open_writer,
    output_files,
    suffix_format,
)
from ..formats import output_format as _output_format
from ..formats.safetensors import shard_paths
from .members import MemberLike, check_members, member_names, open_members, select_members
from .parallel import (
    DistContext,
    ShardPlan,
    average_parallel,
    close_distributed,
    init_distributed,
    plan_parallel,
)
from .stream import average_sources, output_infos

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["FOLDER_FORMAT", "AverageOptions", "AverageResult", "Chosen", "average", "average_chosen", "choose_members",
           "parse_size"]

#: The format of a folder output (a folder ``from_pretrained`` opens).
FOLDER_FORMAT = "hf-folder"


@dataclass
class AverageResult:
    """The summary of an average written to disk: its files, members, weights and provenance.

    :func:`polyak.average` returns one when given ``out=`` (and :func:`polyak.posthoc` a
    :class:`~polyak.PosthocResult`, which adds the plan).

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

    Example:
        >>> import numpy as np, os, tempfile, polyak
        >>> a = {"w": np.array([0.0, 3.0], np.float32), "step": np.array(10)}
        >>> b = {"w": np.array([3.0, 6.0], np.float32), "step": np.array(20)}
        >>> res = polyak.average([a, b], scheme="linear", out=os.path.join(tempfile.mkdtemp(), "avg.safetensors"))
        >>> [f.name for f in res.files], res.members, [round(w, 3) for w in res.weights]
        (['avg.safetensors'], ['member 0', 'member 1'], [0.333, 0.667])
        >>> res.averaged, res.copied, res.nbytes, res.metadata["scheme"]
        (1, 1, 16, 'linear')
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
    """Read a size in bytes as the command line's ``--shard-size`` takes it: ``"5GB"``, ``"500MiB"``, 123.

    Args:
        text: A number of bytes (an ``int``, or a string of digits), or a number with a
            unit: ``B``, decimal ``KB``/``MB``/``GB``/``TB`` (powers of 1000) or binary
            ``KiB``/``MiB``/``GiB``/``TiB`` (powers of 1024); case and spaces are ignored,
            and the number may have a fraction (``"1.5GB"``).

    Returns:
        The size in bytes (fractions of a byte rounded down), at least 1.

    Raises:
        ConfigError: The text is not a number with a known unit, or the size is below
            1 byte.

    Example:
        >>> parse_size("5GB"), parse_size("1MiB"), parse_size(123)
        (5000000000, 1048576, 123)
        >>> parse_size("5 gb"), parse_size("1.5KiB")
        (5000000000, 1536)
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
    """Whether the output is a folder: ``out_format="hf-folder"``, a name ending in ``/``, or a
    name without a checkpoint suffix that is an existing folder or goes with folder members.

    A name with a checkpoint suffix (``avg.safetensors``) is a file, even where a folder of
    that name exists: that folder is then refused, never replaced by a file or filled.
    """
    if out_format is not None:
        return out_format == FOLDER_FORMAT
    text = os.fspath(out)
    if text.endswith(("/", os.sep)):
        return True
    if suffix_format(text) is not None:
        return False
    if Path(text).is_dir():
        return True
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
    """Check the output before any member is opened: the format and mode, the folder, and
    the path itself when it is sure to be written. The full plan (every shard, the index)
    is checked by :func:`_plan_output` once the tensors are known; a folder output is
    checked as a whole (:func:`~polyak._atomic.check_folder_output`), again once the
    members' own files are known.

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
            cleanup_stale_temps(out_path.parent, keep=inputs)
        return out_path, FOLDER_FORMAT
    fmt = _output_format(out, out_format)
    safetensors = fmt.name in ("safetensors", "safetensors-index")
    if (sharded or split) and not safetensors:
        raise ConfigError("--shard-size, --workers and --distributed write safetensors outputs only")
    out_path = Path(out)
    if split or (safetensors and out_path.name.endswith(".safetensors.index.json")):
        sure = [shard_paths(out_path, 1)[0]]  # the index
    elif sharded:
        sure = []  # one file or shards + index: known from the tensors' sizes
    else:
        sure = [out_path]
    check_outputs(sure, force=force, inputs=inputs)
    check_output_folder(out_path.parent)
    return out_path, out_format


def _plan_output(
    out_path: Path,
    out_infos: list[TensorInfo],
    metadata: dict[str, str],
    sources: Sequence[TensorSource],
    *,
    force: bool,
    parts: int | None,
    out_format: str | None,
    options: WriteOptions,
    clean: bool,
) -> tuple[list[Path], ShardPlan | None]:
    """Every file the average will create or replace, checked before anything is written.

    The one output policy of every mode (one file, ``shard_size``, an index name,
    ``workers``, ``distributed``): the names and metadata must be storable, and each planned
    file must not be an input (any spelling, the shards of input indexes included), must be
    a regular file or absent, and may exist only with ``force``
    (:func:`polyak._atomic.check_outputs`). Then stale temporaries of killed runs are
    removed from the output folders (never an input).

    Returns:
        The planned files, and the parallel plan when ``parts`` (workers or ranks) is given.
    """
    check_storable(out_infos, metadata, out_path)
    plan = None
    if parts is not None:
        plan = plan_parallel(out_infos, out_path, parts=parts, shard_size=options.shard_size)
        files = plan.files
    else:
        files = output_files(out_path, out_infos, format=out_format, template=sources[-1], options=options)
    check_outputs(files, force=force, inputs=options.inputs)
    if clean:
        for folder in dict.fromkeys(f.parent for f in files):
            cleanup_stale_temps(folder, keep=options.inputs)
    return files, plan


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
        "dtype": "as input" if dtype is None else dtype_name(output_dtype(dtype)),  # type: ignore[arg-type]
    }


def _input_files(members: Sequence[MemberLike], sources: Sequence[TensorSource]) -> tuple[Path, ...]:
    """Every file being read: the members as given and each file of each source (shards)."""
    given = [Path(m) for m in members if isinstance(m, (str, os.PathLike))]
    return tuple(dict.fromkeys([*given, *(f for src in sources for f in src.files())]))


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
        force: Replace an existing output (every file of it; a symbolic link is replaced as
            a link). When a sharded output is replaced, only the old index's files that are
            stale shards of this output are deleted (others are left alone, with a
            :class:`~polyak.PolyakWarning`).
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
        NonFiniteError: A member holds NaN/Inf in a floating tensor, or the cast to the
            output dtype would write Inf/NaN (a value beyond the dtype's range).
        OutputError: A file the output would write (the file, a shard, the index) exists
            (without ``force``), is an input under any spelling, or is not a regular file
            (a folder, a device, a FIFO); or the output cannot be written. All of this is
            checked before anything is written, and no partial output is left behind.

    Example:
        >>> import numpy as np, polyak
        >>> a = {"w": np.array([0.0, 3.0], np.float32)}
        >>> b = {"w": np.array([3.0, 6.0], np.float32)}
        >>> polyak.average([a, b], scheme="linear")["w"].tolist()
        [2.0, 5.0]
    """
    t0 = time.perf_counter()
    # Options and members (in this order: the first problem found is the one reported),
    # all before any file is opened or written.
    pick = choose_members(members, scheme=scheme, alpha=alpha, weights=weights, last=last, order=order)
    return average_chosen(
        pick, order=order, out=out, format=format, out_format=out_format, key=key, strip_prefix=strip_prefix,
        dtype=dtype, int_policy=int_policy, checksum=checksum, shard_size=shard_size, keep_optimizer=keep_optimizer,
        force=force, progress=progress, workers=workers, distributed=distributed, started=t0,
    )


def average_chosen(
    pick: Chosen,
    *,
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
    """The steps of :func:`average` once the members and their weights are chosen.

    ``pick.members`` are oldest → newest (integer tensors come from the last);
    ``pick.weights`` must sum to 1 but may be negative: :func:`average` passes a scheme's
    weights (never negative, users' custom weights included: ``_schemes`` refuses those),
    :func:`polyak.posthoc` the signed coefficients of a post-hoc EMA. ``pick.scheme`` and
    ``pick.params`` are recorded in the output's provenance; the newest member's metadata
    is copied into it except the keys in ``drop_metadata``; the floating tensors named in
    ``copy`` are copied from the newest member, as integers are. The other options are
    :func:`average`'s.
    """
    t0 = time.perf_counter() if started is None else started
    chosen, w, scheme = pick.members, np.asarray(pick.weights, dtype=np.float64), pick.scheme
    if len(w) != len(chosen) or not np.all(np.isfinite(w)) or not math.isclose(float(w.sum()), 1.0, abs_tol=1e-9):
        raise ConfigError(f"need {len(chosen)} finite weights that sum to 1, got {w.tolist()}")
    shard_bytes = None if shard_size is None else parse_size(shard_size)
    output_dtype(dtype)
    split = _check_split(workers, distributed, out)
    if split and copy:
        raise ConfigError("copied floating tensors are not supported with workers/distributed")
    with contextlib.ExitStack() as stack:
        dist = _join_distributed(stack) if distributed else None
        out_path = None
        write_format = out_format
        clean = dist is None or dist.rank == 0  # other ranks' live temporaries may be on shared storage
        if out is not None:
            out_path, write_format = _prepare_output(
                out, out_format, chosen, force=force, sharded=shard_bytes is not None, split=split, clean=clean,
            )
        sources = stack.enter_context(open_members(chosen, format=format, key=key, strip_prefix=strip_prefix))
        infos = check_members(sources, int_policy=int_policy)
        if out_path is None:
            return average_sources(sources, w, infos=infos, dtype=dtype, int_policy=int_policy, progress=progress,
                                   copy=copy)
        out_infos = output_infos(infos, dtype)
        labels = [s.label for s in sources]
        names = member_names(chosen)
        record = _provenance(
            names, [s.files() for s in sources], w, scheme=scheme, params=pick.params, order=order,
            int_policy=int_policy, dtype=dtype, checksum=checksum,
        )
        kept = {k: v for k, v in sources[-1].metadata().items() if k not in drop_metadata}
        metadata = {**kept, "polyak": json.dumps(record, ensure_ascii=False)}
        options = WriteOptions(shard_size=shard_bytes, keep_optimizer=keep_optimizer, inputs=_input_files(chosen, sources))
        plan = None
        if write_format == FOLDER_FORMAT:
            # A folder is checked as a whole, now also against the members' own files (shards).
            check_storable(out_infos, metadata, out_path)
            check_folder_output(out_path, force=force, inputs=options.inputs)
        else:
            files, plan = _plan_output(
                out_path, out_infos, metadata, sources, force=force,
                parts=None if not split else (dist.world_size if dist is not None else workers),
                out_format=write_format, options=options, clean=clean,
            )
        notes: list[str] = []
        if plan is not None:
            files = average_parallel(
                chosen, w, out_infos, out_path, metadata, workers=workers, dist=dist, format=format,  # type: ignore[arg-type]
                key=key, strip_prefix=strip_prefix, dtype=dtype, int_policy=int_policy, shard_size=shard_bytes,
                plan=plan, inputs=options.inputs,
            )
        else:
            writer = stack.enter_context(open_writer(
                out_path, out_infos, format=write_format, metadata=metadata, template=sources[-1],
                aliases=sources[-1].aliases(), options=options,
            ))
            average_sources(sources, w, infos=infos, dtype=dtype, int_policy=int_policy, writer=writer, progress=progress,
                            copy=copy)
            files = writer.commit()
            notes = list(writer.notes)
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
        names=names,
        notes=notes,
    )
