"""The averaging engine's inner kernels: reused buffers, the chunked weighted sum, and the
background writer.

Kept apart from :mod:`polyak._engine.average` (which validates, plans and reports) because these
are the hot paths whose shape the benchmarks measure (``benchmarks/bench_average.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..formats import TensorWriter

__all__ = ["CHUNK", "PARALLEL_MIN", "Buffers", "WriteBehind", "accumulate", "accumulate_all"]

#: Elements per chunk: small enough that a chunk of every member and the accumulator stay
#: in the CPU cache, large enough that Python overhead is negligible.
CHUNK = 1 << 16


class Buffers:
    """Accumulator and scratch space, grown on demand and reused for every tensor.

    Fresh large allocations cost far more than reusing memory (page faults on every new
    page), so each buffer is allocated once at the size of the largest tensor seen.
    """

    def __init__(self) -> None:
        self._pool: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, slot: str, dtype: np.dtype, n: int) -> np.ndarray:
        dt = np.dtype(dtype)
        buf = self._pool.get((slot, dt))
        if buf is None or buf.size < n:
            buf = np.empty(max(n, 1), dtype=dt)
            self._pool[(slot, dt)] = buf
        return buf[:n]


def accumulate(
    arrays: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    acc: np.ndarray,
    bufs: Buffers,
    *,
    first: bool,
    part: int = 0,
) -> float:
    """``acc ← Σ w_i · x_i`` (or ``acc += ...`` when not ``first``), chunk by chunk.

    Members are the inner loop, so a chunk of the accumulator stays in the CPU cache while
    every member is added to it; narrow dtypes (bfloat16, float16) are widened into a
    scratch chunk first so that the products are computed at accumulator precision.
    ``arrays`` and ``acc`` may be slices of whole tensors (``part`` picks the scratch
    buffers, so that parts can run in parallel threads).

    Returns:
        The sum of ``acc`` (float64), taken chunk by chunk while each is in cache: it is
        finite exactly when no element is NaN or Inf (or, rarely, when large finite
        values overflow the sum, which the caller then checks element by element).
    """
    n = acc.size
    ws = [acc.dtype.type(w) for w in weights]
    cast = bufs.get(f"cast{part}", acc.dtype, min(n, CHUNK))
    tmp = bufs.get(f"tmp{part}", acc.dtype, min(n, CHUNK))
    flats = [a.reshape(-1) for a in arrays]
    total = 0.0
    for a in range(0, n, CHUNK):
        b = min(a + CHUNK, n)
        dst = acc[a:b]
        m = b - a
        for i, (x, w) in enumerate(zip(flats, ws)):
            xs = x[a:b]
            if xs.dtype != acc.dtype:
                c = cast[:m]
                np.copyto(c, xs, casting="unsafe")
                xs = c
            if i == 0 and first:
                np.multiply(xs, w, out=dst)
            else:
                t = tmp[:m]
                np.multiply(xs, w, out=t)
                np.add(dst, t, out=dst)
        total += float(np.add.reduce(dst, dtype=np.float64).real if dst.dtype.kind != "c" else np.add.reduce(dst).real)
    return total


#: Tensors below this many elements are averaged in one thread (a thread hand-off costs
#: tens of microseconds).
PARALLEL_MIN = 1 << 18


def accumulate_all(
    arrays: Sequence[np.ndarray],
    weights: np.ndarray,
    acc: np.ndarray,
    bufs: Buffers,
    pool: Any,
    threads: int,
) -> float:
    """:func:`accumulate` of whole tensors, split into ``threads`` contiguous parts.

    numpy releases the GIL inside its loops, so the parts run on separate cores; each part
    has its own scratch buffers (allocated here, in the calling thread).
    """
    n = acc.size
    if threads <= 1 or pool is None or n < PARALLEL_MIN:
        return accumulate(arrays, weights, acc, bufs, first=True)
    step = -(-n // threads // CHUNK) * CHUNK  # whole chunks per part
    bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    for k, (lo, hi) in enumerate(bounds):  # allocate scratch buffers before the threads run
        bufs.get(f"cast{k}", acc.dtype, min(hi - lo, CHUNK))
        bufs.get(f"tmp{k}", acc.dtype, min(hi - lo, CHUNK))
    flats = [a.reshape(-1) for a in arrays]
    futures = [
        pool.submit(accumulate, [x[lo:hi] for x in flats], weights, acc[lo:hi], bufs, first=True, part=k)
        for k, (lo, hi) in enumerate(bounds)
    ]
    return sum(f.result() for f in futures)


class WriteBehind:
    """Writes each tensor in a background thread while the next one is being averaged.

    Writing a tensor (a copy into the page cache) costs about as much as averaging it, and
    the file write releases the GIL, so the two overlap on two cores. At most one write is
    in flight, and order is kept: writes happen one after another.

    The write-behind owns the output buffers, two sets of them: :meth:`buffers` hands out
    the set to compute the next tensor in, and :meth:`put` (which waits for the previous
    write) switches sets, so the buffer being written is never the one being filled. A
    context manager: leaving the block waits for the last write and re-raises its error,
    unless another error is already on its way out.

    Example:
        >>> class Log:
        ...     def __init__(self): self.seen = []
        ...     def write(self, name, array): self.seen.append((name, array.tolist()))
        >>> log = Log()
        >>> with WriteBehind(log) as behind:  # any object with write(name, array)
        ...     for k in range(3):
        ...         out = behind.buffers().get("out", np.dtype("int64"), 2)
        ...         out[:] = k
        ...         behind.put(f"t{k}", out)
        >>> log.seen
        [('t0', [0, 0]), ('t1', [1, 1]), ('t2', [2, 2])]
    """

    def __init__(self, writer: TensorWriter) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polyak-write")
        self._pending: Any = None
        self._slots = (Buffers(), Buffers())
        self._next = 0

    def buffers(self) -> Buffers:
        """Where to compute the next tensor: never the buffers the write in flight reads."""
        return self._slots[self._next]

    def wait(self) -> None:
        """Block until the write in flight (if any) is done; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def put(self, name: str, value: np.ndarray) -> None:
        """Start writing ``value`` (from :meth:`buffers`, or any array nobody changes)."""
        self.wait()
        self._pending = self._pool.submit(self.writer.write, name, value)
        self._next = 1 - self._next

    def close(self) -> None:
        """Wait for the last write (errors included) and stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()  # raises the last write's error, if any
        else:
            with contextlib.suppress(BaseException):  # the error on its way out is the one to see
                self.close()
