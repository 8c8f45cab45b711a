"""Averaging split across local worker threads (``workers=N``) or torch.distributed ranks.

Every output tensor depends on the same tensor of each member only, so the work splits by
tensor name with no communication: each worker (or rank) opens the members itself, averages
its share of the tensors with the ordinary engine (:func:`polyak._engine.stream.average_sources`)
and writes its own safetensors shards. The numbers are therefore bit-identical to a single
process: the same code computes every tensor from the same bytes.

The output is always sharded: ``<stem>.safetensors.index.json`` plus
``<stem>-0000i-of-0000n.safetensors``. Shards stay under temporary names until *every*
worker has finished; then they are renamed into place and the index is written last, so an
index never points at a missing or partial shard, and a failed run leaves nothing behind
(a worker that was killed leaves a temporary file that the next run removes).

Split: with ``shard_size`` the shards are exactly those a single process would write
(:func:`polyak.formats.safetensors.plan_shards`) and whole shards are handed to workers,
largest first, each to the least loaded one. Without it the tensors themselves are dealt
out that way (one shard per worker, split further at 5 GB).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .._errors import ConfigError, OutputError, PolyakError
from ..formats import TensorInfo
from ..formats.safetensors import (
    DEFAULT_SHARD_SIZE,
    SafetensorsWriter,
    ShardLayout,
    plan_shards,
    shard_paths,
)
from .members import open_members
from .stream import Stopped, average_sources, output_infos

__all__ = ["DistContext", "ShardPlan", "average_parallel", "init_distributed", "plan_parallel"]

#: A rank may wait this long for the slowest rank before giving up.
DIST_TIMEOUT = timedelta(hours=4)
_DIST_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ShardPlan(ShardLayout):
    """Which shard holds which tensors, and which worker writes it.

    A :class:`~polyak.formats.safetensors.ShardLayout` with owners: its ``commit`` publishes
    the shards the workers finished, exactly as a single process publishes its own.

    Attributes:
        index_path: ``<stem>.safetensors.index.json``.
        shard_paths: One path per shard.
        groups: The output tensors of each shard, in file order.
        owners: The worker (rank) that writes each shard.
    """

    owners: list[int]

    def fingerprint(self) -> str:
        """A digest of the plan, to check that every rank planned the same split."""
        text = json.dumps(
            [[p.name, o, [(i.name, list(i.shape), str(i.dtype)) for i in g]] for p, o, g in zip(self.shard_paths, self.owners, self.groups, strict=True)]
        )
        return hashlib.sha256(text.encode()).hexdigest()


def _deal(sizes: Sequence[int], parts: int) -> list[int]:
    """Longest-processing-time-first: each item, largest first, to the least loaded part."""
    load = [0] * parts
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = min(range(parts), key=lambda k: (load[k], k))
        owner[i] = k
        load[k] += sizes[i]
    return owner


def plan_parallel(
    infos: Sequence[TensorInfo], out: Path, *, parts: int, shard_size: int | None = None
) -> ShardPlan:
    """Split the output tensors into shards and deal the shards to ``parts`` workers.

    Args:
        infos: The output tensors (name, shape, output dtype).
        out: The output path given by the user (``x.safetensors`` or
            ``x.safetensors.index.json``); the index and shards are named after it.
        parts: Number of workers (ranks).
        shard_size: Largest shard in bytes; ``None`` for one shard per worker (at most 5 GB
            each).

    Example:
        >>> import numpy as np
        >>> from pathlib import Path
        >>> infos = [TensorInfo(n, (4,), np.dtype("float32")) for n in "abcd"]
        >>> plan = plan_parallel(infos, Path("avg.safetensors"), parts=2)
        >>> [p.name for p in plan.shard_paths], plan.owners
        (['avg-00001-of-00002.safetensors', 'avg-00002-of-00002.safetensors'], [0, 1])
    """
    if parts < 1:
        raise ConfigError(f"workers must be at least 1, got {parts}")
    groups: list[list[TensorInfo]] = []
    owners: list[int] = []
    if shard_size is not None:
        groups = [g for g in plan_shards(infos, shard_size) if g]
        owners = _deal([sum(i.nbytes for i in g) for g in groups], parts)
    else:
        items = list(infos)
        dealt = _deal([i.nbytes for i in items], parts)
        for k in range(parts):
            mine = [info for info, o in zip(items, dealt, strict=True) if o == k]
            for g in plan_shards(mine, DEFAULT_SHARD_SIZE) if mine else []:
                groups.append(g)
                owners.append(k)
    index, paths = shard_paths(out, len(groups))
    return ShardPlan(index, paths, groups, owners)


@dataclass(frozen=True)
class _Job:
    """What one worker needs; plain data (it also describes one rank's share of a distributed job)."""

    members: list[str]
    weights: list[float]
    format: str | None
    key: str | None
    strip_prefix: list[str]
    dtype: str | None
    int_policy: str
    metadata: dict[str, str]
    shards: list[tuple[str, list[str]]]


def _run_job(job: _Job, stop: threading.Event | None = None) -> list[tuple[str, str]]:
    """Average this worker's shards into finished temporary files; returns (tmp, target) pairs.

    On any error the temporaries this worker wrote are deleted before the error propagates.
    ``stop`` (set when another worker failed or the run was interrupted) ends the job at the
    next tensor with :class:`~.stream.Stopped`, cleaning up the same way.
    """
    done: list[tuple[str, str]] = []
    try:
        with open_members(job.members, format=job.format, key=job.key, strip_prefix=job.strip_prefix) as sources:
            ref = sources[-1].infos()
            for target, names in job.shards:
                in_infos = [ref[n] for n in names]
                writer = SafetensorsWriter(Path(target), output_infos(in_infos, job.dtype), metadata=job.metadata)
                with writer:
                    average_sources(
                        sources, job.weights, infos=in_infos, dtype=job.dtype, int_policy=job.int_policy,
                        writer=writer, threads=1,  # the workers themselves are the parallelism
                        stop=stop,
                    )
                    done.append((str(writer.finish()), target))
    except BaseException:
        _remove([tmp for tmp, _ in done])
        raise
    return done


def _remove(paths: Sequence[str | Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


def _as_paths(done: Sequence[tuple[str, str]]) -> list[tuple[Path, Path]]:
    """Workers report (temporary, shard) as strings: they travel between ranks."""
    return [(Path(tmp), Path(target)) for tmp, target in done]


def _jobs(plan: ShardPlan, parts: int, base: dict[str, Any]) -> list[_Job]:
    jobs = []
    for k in range(parts):
        shards = [(str(p), [i.name for i in g]) for p, g, o in zip(plan.shard_paths, plan.groups, plan.owners, strict=True) if o == k]
        jobs.append(_Job(shards=shards, **base))
    return jobs


@dataclass(frozen=True)
class DistContext:
    """This process's place in a torch.distributed job.

    Attributes:
        rank: This process's rank.
        world_size: Number of ranks.
        owns_group: polyak created the process group (and destroys it when done).
    """

    rank: int
    world_size: int
    owns_group: bool


def init_distributed() -> DistContext:
    """Join the torch.distributed job this process was started in (by ``torchrun``).

    Uses the existing default process group if there is one, else creates a gloo group from
    the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` environment (gloo: the work
    is file I/O and CPU arithmetic; only small Python objects are exchanged).

    Raises:
        ConfigError: torch is missing, or the process was not started by torchrun.
    """
    try:
        import torch.distributed as dist
    except ImportError:
        raise ConfigError("--distributed needs torch: pip install 'polyak[torch]'") from None
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), owns_group=False)
    missing = [v for v in _DIST_ENV if not os.environ.get(v)]
    if missing or not dist.is_available():
        raise ConfigError(
            f"--distributed needs a torch.distributed launch, but {', '.join(missing) or 'torch.distributed'} "
            "is not set; start it with e.g. torchrun --nproc_per_node 2 -m polyak average --distributed ... "
            "(or use --workers N for processes on this machine)"
        )
    dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), owns_group=True)
    atexit.register(close_distributed, ctx)  # also when averaging fails before the end
    return ctx


def close_distributed(ctx: DistContext) -> None:
    """Destroy the process group if polyak created it."""
    import torch.distributed as dist

    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def average_parallel(
    members: Sequence[str | os.PathLike[str]],
    weights: Sequence[float],
    out_infos: Sequence[TensorInfo],
    out: Path,
    metadata: Mapping[str, str],
    *,
    workers: int = 1,
    dist: DistContext | None = None,
    format: str | None = None,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    dtype: str | None = None,
    int_policy: str = "newest",
    shard_size: int | None = None,
    plan: ShardPlan | None = None,
    inputs: Sequence[Path] = (),
) -> list[Path]:
    """Average already-checked members into a sharded safetensors output, split across workers.

    With ``dist`` every rank of the torch.distributed job calls this with the same arguments
    and writes the shards it owns; rank 0 renames them all into place and writes the index
    after every rank has finished. Otherwise ``workers`` threads of this process do the same
    (see :func:`_run_local`) and this process commits.

    ``plan`` is the split the caller already checked (:func:`plan_parallel` with the same
    arguments when omitted); ``inputs`` are the files being read, which the commit never
    deletes.

    Returns:
        The shard paths and the index path (last).

    Raises:
        ConfigError: A member is not a file path.
        OutputError: A worker failed or died; no output was written.
    """
    paths = []
    for m in members:
        if not isinstance(m, (str, os.PathLike)):
            raise ConfigError("workers/distributed averaging needs checkpoint files, not in-memory states")
        paths.append(os.fspath(m))
    parts = dist.world_size if dist is not None else workers
    if plan is None:
        plan = plan_parallel(out_infos, out, parts=parts, shard_size=shard_size)
    base: dict[str, Any] = {
        "members": paths, "weights": [float(x) for x in weights], "format": format, "key": key,
        "strip_prefix": list(strip_prefix), "dtype": dtype, "int_policy": int_policy, "metadata": dict(metadata),
    }
    if dist is not None:
        return _run_distributed(plan, base, dist, inputs)
    jobs = [j for j in _jobs(plan, parts, base) if j.shards]
    if len(jobs) == 1:
        return plan.commit(_as_paths(_run_job(jobs[0])), base["metadata"], inputs=inputs)
    return plan.commit(_as_paths(_run_local(jobs)), base["metadata"], inputs=inputs)


def _run_local(jobs: Sequence[_Job]) -> list[tuple[str, str]]:
    """Run every job in a thread of this process; all finish or none count.

    Threads, not processes: the engine's inner loop is numpy ufuncs on chunks of 64K
    elements, which release the GIL, so two threads keep two cores busy with no interpreter
    start-up (a fresh process costs a few tenths of a second, as long as a whole 4 GB job
    from the page cache) and no pickling. Each job opens the members itself (its own memory
    maps) and writes its own shards, so the threads share nothing but the output folder.
    When a job fails, or this thread is interrupted (Ctrl-C: ``KeyboardInterrupt``), the
    others are told to stop at their next tensor, every job is waited for, and everything
    they wrote is deleted before the error propagates: a stopped run leaves no temporary
    file, as a single-process run does.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    stop = threading.Event()
    done: list[tuple[str, str]] = []
    errors: list[BaseException] = []
    pool = ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="polyak-worker")
    futures: list[Future[list[tuple[str, str]]]] = []
    try:
        futures = [pool.submit(_run_job, job, stop) for job in jobs]
        for future in futures:
            try:
                done.extend(future.result())
            except Exception as exc:  # collect every job before cleaning up
                errors.append(exc)
                stop.set()
    except BaseException:  # interrupted while waiting: stop, wait, clean up, re-raise
        stop.set()
        for future in futures:
            with contextlib.suppress(BaseException):
                done.extend(future.result())
        _remove([tmp for tmp, _ in done])
        raise
    finally:
        pool.shutdown(wait=True)
    if errors:
        _remove([tmp for tmp, _ in done])
        raise next((e for e in errors if not isinstance(e, Stopped)), errors[0])
    return done


def _run_distributed(plan: ShardPlan, base: dict[str, Any], ctx: DistContext, inputs: Sequence[Path]) -> list[Path]:
    import torch.distributed as dist

    # This first collective is also the barrier that keeps every rank from writing before
    # rank 0 has removed stale temporaries (average() cleans the folder on rank 0 only).
    prints: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(prints, plan.fingerprint())
    if len(set(prints)) != 1:
        raise ConfigError(
            "the ranks disagree on the tensors to average (different files or options per rank?); "
            "every rank must see the same checkpoints on shared storage"
        )
    # One metadata record for every shard (rank 0's, whose clock stamps the output).
    meta = [base["metadata"]]
    dist.broadcast_object_list(meta, src=0)
    base = {**base, "metadata": meta[0]}
    job = _jobs(plan, ctx.world_size, base)[ctx.rank]
    error: str | None = None
    done: list[tuple[str, str]] = []
    try:
        done = _run_job(job)
    except PolyakError as exc:
        error = f"rank {ctx.rank}: {exc}"
    results: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(results, (done, error))
    errors = [e for _, e in results if e is not None]
    if errors:
        _remove([tmp for tmp, _ in done])
        raise OutputError("distributed averaging failed, nothing was written:\n  " + "\n  ".join(errors))
    files = [*plan.shard_paths, plan.index_path]
    if ctx.rank == 0:
        try:
            files = plan.commit(_as_paths([pair for d, _ in results for pair in d]), base["metadata"], inputs=inputs)
        finally:
            dist.barrier()
    else:
        dist.barrier()
        if not plan.index_path.exists():
            raise OutputError(f"rank 0 could not write {plan.index_path}; see its error")
    return files
