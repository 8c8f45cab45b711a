"""Stream opened members through the kernels: one tensor at a time, into a writer or a dict.

For each tensor the members are combined chunk by chunk into one float32 (float64 for
float64 tensors) accumulator that is allocated once and reused, so memory is the output
plus a few tensors, never all members. Integer and bool tensors are copied from the newest
member. Both the single-process average (:mod:`.average`) and every worker of a parallel
one (:mod:`.parallel`) compute their tensors here, which is why their outputs are
bit-identical.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypedDict, overload

import numpy as np

from .._dtypes import accumulator_dtype, is_float, output_dtype
from .._errors import ConfigError, NonFiniteError
from .._progress import Progress
from ..formats import TensorInfo, TensorSource, TensorWriter
from .kernel import Buffers, WriteBehind, accumulate, accumulate_all, all_finite, check_cast
from .members import check_members

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Stopped", "StreamOptions", "average_sources", "output_infos"]


class Stopped(Exception):
    """A worker of a parallel average was told to stop (another failed, or Ctrl-C)."""


def _find_nonfinite(name: str, sources: Sequence[TensorSource]) -> list[str]:
    return [src.label for src in sources if not all_finite(src.read(name))]


def _refuse_nonfinite(name: str, sources: Sequence[TensorSource]) -> None:
    culprits = _find_nonfinite(name, sources)
    who = ", ".join(culprits) if culprits else "none of the members (overflow while averaging)"
    raise NonFiniteError(
        f"tensor \"{name}\" has NaN or Inf values in: {who}. Averaging would spread them "
        "into the result; drop that member (e.g. with --last) or repair it first"
    )


def output_infos(infos: Sequence[TensorInfo], dtype: str | None) -> list[TensorInfo]:
    """The output's tensors: floating ones in ``dtype`` when given, the rest as they are."""
    out_dt = output_dtype(dtype)
    return [TensorInfo(i.name, i.shape, out_dt if (out_dt is not None and is_float(i.dtype)) else i.dtype) for i in infos]


class StreamOptions(TypedDict, total=False):
    """The keyword options of :func:`average_sources` (other than ``writer``)."""

    infos: Sequence[TensorInfo] | None
    dtype: str | None
    int_policy: str
    progress: bool
    check_finite: bool
    threads: int | None
    stop: threading.Event | None
    copy: Collection[str]


class _Collect:
    """The in-memory counterpart of :class:`~.kernel.WriteBehind`: one set of buffers
    (each value is copied out at once), and a dict of the results."""

    def __init__(self) -> None:
        self.result: dict[str, np.ndarray] = {}
        self._bufs = Buffers()

    def buffers(self) -> Buffers:
        return self._bufs

    def put(self, name: str, value: np.ndarray) -> None:
        self.result[name] = np.array(value, copy=True)


@overload
def average_sources(
    sources: Sequence[TensorSource], weights: Sequence[float] | np.ndarray, *, writer: None = None, **options: Unpack[StreamOptions]
) -> dict[str, np.ndarray]: ...
@overload
def average_sources(
    sources: Sequence[TensorSource], weights: Sequence[float] | np.ndarray, *, writer: TensorWriter, **options: Unpack[StreamOptions]
) -> None: ...
def average_sources(
    sources: Sequence[TensorSource],
    weights: Sequence[float] | np.ndarray,
    *,
    infos: Sequence[TensorInfo] | None = None,
    dtype: str | None = None,
    int_policy: str = "newest",
    writer: TensorWriter | None = None,
    progress: bool = False,
    check_finite: bool = True,
    threads: int | None = None,
    stop: threading.Event | None = None,
    copy: Collection[str] = (),
) -> dict[str, np.ndarray] | None:
    """Average opened sources with given normalised weights (oldest → newest).

    Integer and bool tensors, and the floating tensors named in ``copy`` (a post-hoc EMA
    snapshot's copied BatchNorm statistics), are copied from the newest member.

    With ``writer`` the tensors are streamed to it in its order (written in a background
    thread while the next tensor is averaged) and ``None`` is returned; a tensor for which
    the writer offers its own memory (:meth:`~polyak.formats.TensorWriter.target`) is
    summed straight into it instead; otherwise a dict of
    new arrays (each in its output dtype) is returned. Large tensors of memory-mapped
    members are averaged in ``threads`` parallel parts (default: up to 2, the cores
    memory bandwidth can feed; 1 when called from a worker of a parallel average). When
    ``stop`` is set, :class:`Stopped` is raised before the next tensor.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) != len(sources):
        raise ConfigError(f"{len(w)} weights for {len(sources)} members")
    ref_infos = {i.name: i for i in (infos if infos is not None else check_members(sources, int_policy=int_policy))}
    out_dtype = output_dtype(dtype)
    newest = sources[-1]
    zero_copy = all(s.zero_copy for s in sources)
    scratch = Buffers()  # the kernels' own scratch space
    if threads is None:
        threads = min(2, os.cpu_count() or 1)
    order = writer.order if writer is not None else list(ref_infos)
    total = sum(ref_infos[n].nbytes for n in order) * len(sources)
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(Progress(total, "averaging", enabled=progress))
        # NaN/Inf are found and reported below (NonFiniteError, naming member and tensor);
        # numpy's RuntimeWarnings about them would only add noise (or, under -W error, an
        # exception that is not a PolyakError).
        stack.enter_context(np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"))
        pool = None
        if threads > 1 and zero_copy:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="polyak-average"))
        # Where each result goes: a background writer (which owns the buffers the results
        # are computed in) or a dict of copies.
        sink: WriteBehind | _Collect = stack.enter_context(WriteBehind(writer)) if writer is not None else _Collect()
        for name in order:
            if stop is not None and stop.is_set():
                raise Stopped("stopped before the end")
            info = ref_infos[name]
            if not is_float(info.dtype) or name in copy:
                value = newest.read(name)
                if out_dtype is not None and is_float(info.dtype):
                    value = np.asarray(value).astype(out_dtype)
                sink.put(name, value)
                bar.update(info.nbytes * len(sources))
                continue
            acc_dt = accumulator_dtype(info.dtype)
            target = out_dtype if out_dtype is not None else np.dtype(info.dtype)
            direct = writer.target(name) if writer is not None else None
            if direct is not None and info.size and (zero_copy or direct.dtype == acc_dt):
                # The writer's own memory (a module's tensor): summed straight into it, no
                # accumulator and no write.
                if zero_copy:
                    probe = accumulate_all([s.read(name) for s in sources], w, direct, scratch, pool, threads, acc_dt)
                else:
                    for i, s in enumerate(sources):
                        probe = accumulate([s.read(name)], [w[i]], direct.reshape(-1), scratch, first=i == 0)
                if check_finite and not math.isfinite(probe) and not all_finite(direct):
                    _refuse_nonfinite(name, sources)
                bar.update(info.nbytes * len(sources))
                continue
            bufs = sink.buffers()
            acc = bufs.get("acc", acc_dt, info.size)
            probe = 0.0  # the result's sum: finite unless an element is NaN/Inf
            if info.size:
                if zero_copy:
                    # Views of memory maps: every member's tensor at once costs nothing.
                    probe = accumulate_all([s.read(name) for s in sources], w, acc, scratch, pool, threads)
                else:
                    # Formats that copy on read: one member's tensor at a time.
                    for i, s in enumerate(sources):
                        probe = accumulate([s.read(name)], [w[i]], acc, scratch, first=i == 0)
            if check_finite and info.size and not math.isfinite(probe):
                if not np.isfinite(acc).all():
                    _refuse_nonfinite(name, sources)
            value = acc.reshape(info.shape)
            if direct is not None:  # members read one at a time, into a narrower destination
                np.copyto(direct, value, casting="unsafe")
                bar.update(info.nbytes * len(sources))
                continue
            if target != acc_dt:
                out = bufs.get("out", target, info.size).reshape(info.shape)
                np.copyto(out, value, casting="unsafe")
                if check_finite:  # what is written must be finite too, not only the sum
                    check_cast(acc, out, name=name)
                value = out
            sink.put(name, value)
            bar.update(info.nbytes * len(sources))
    return sink.result if isinstance(sink, _Collect) else None
