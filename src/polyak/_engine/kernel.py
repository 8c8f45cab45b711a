"""The engine's inner kernels: the one chunk loop, the chunked weighted sum, the NaN/Inf
probe, reused buffers and the background writer.

Every chunked numpy loop in polyak (the average here, the sweep's running sums, the greedy
soup, the diagnostics' Gram matrix) walks tensors in :data:`CHUNK`-element pieces with
:func:`chunks`, widens narrow dtypes with :func:`widen`, and checks each member for NaN/Inf
with :func:`probe` while a chunk is in cache and :func:`check_finite` after the tensor.

Kept apart from :mod:`polyak._engine.average` (which validates, plans and reports) because these
are the hot paths whose shape the benchmarks measure (``benchmarks/bench_average.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import ml_dtypes
import numpy as np

from .._errors import NonFiniteError
from ..formats import TensorWriter

__all__ = [
    "CHUNK",
    "PARALLEL_MIN",
    "Buffers",
    "WriteBehind",
    "accumulate",
    "accumulate_all",
    "accumulate_into",
    "add_scaled",
    "all_finite",
    "check_cast",
    "check_finite",
    "chunks",
    "member_chunks",
    "probe",
    "scaled_copy",
    "widen",
]

#: Elements per chunk, for every chunk loop: small enough that a chunk of a member, of the
#: accumulator (or the sweep's running sums and outputs) and the scratch stay in the CPU
#: cache (L2/L3) while all are updated, so each is streamed from memory once; large enough
#: that Python overhead is negligible. 2**18 measured fastest of 2**14..2**20 for the
#: sweep (docs/benchmarks.md, "Sweep"); the average measured no slower with it than with 2**16.
CHUNK = 1 << 18


def chunks(size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each :data:`CHUNK` of a flat tensor of ``size`` elements.

    Example:
        >>> list(chunks(CHUNK + 3)) == [(0, CHUNK), (CHUNK, CHUNK + 3)]
        True
    """
    for a in range(0, size, CHUNK):
        yield a, min(a + CHUNK, size)


def widen(xs: np.ndarray, dtype: np.dtype, scratch: np.ndarray) -> np.ndarray:
    """``xs`` in ``dtype``: itself when it already is, else a copy in ``scratch``'s head.

    Narrow members (bfloat16, float16) are widened before any arithmetic so that products
    and sums are computed at accumulator precision.
    """
    if xs.dtype == dtype:
        return xs
    out = scratch[: xs.size]
    np.copyto(out, xs, casting="unsafe")
    return out


def add_scaled(dst: np.ndarray, x: np.ndarray, w: Any, tmp: np.ndarray) -> None:
    """``dst += w · x`` in ``dst``'s dtype (a plain add when ``w == 1``; ``tmp`` is scratch)."""
    if w == 1:
        np.add(dst, x, out=dst)
    else:
        np.multiply(x, w, out=tmp)
        np.add(dst, tmp, out=dst)


def scaled_copy(dst: np.ndarray, x: np.ndarray, w: Any, tmp: np.ndarray) -> None:
    """``dst ← w · x``, computed in ``x``'s dtype and rounded to ``dst``'s (``tmp``: scratch)."""
    if dst.dtype == x.dtype:
        np.multiply(x, w, out=dst)
    else:
        np.multiply(x, w, out=tmp)
        np.copyto(dst, tmp, casting="unsafe")


def probe(xs: np.ndarray) -> float:
    """The sum of a chunk (in its own dtype), taken while it is in cache.

    It is finite exactly when no element is NaN or Inf, or (rarely) when large finite
    values overflow it; :func:`check_finite` then looks element by element. A float32
    sum costs half a float64 one, and the check needs no more. An overflow is expected
    here and warns about nothing (in any thread).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.add.reduce(xs)
    if xs.dtype.kind == "c":
        return float(s.real) + float(s.imag)
    return float(s)


def all_finite(x: np.ndarray) -> bool:
    """Whether every element of ``x`` is finite (narrow float types checked in float32)."""
    x = np.asarray(x)
    return bool(np.isfinite(x if x.dtype.kind in "fc" else x.astype(np.float32)).all())


def check_finite(total: float, x: np.ndarray, *, label: str, name: str) -> None:
    """Refuse a member's tensor that holds NaN or Inf, naming the member and the tensor.

    Args:
        total: The sum of :func:`probe` over the tensor's chunks.
        x: The tensor, looked at element by element only when ``total`` is not finite.
        label: The member (its file name).
        name: The tensor.

    Raises:
        NonFiniteError: ``x`` holds NaN or Inf.
    """
    if math.isfinite(total) or all_finite(x):
        return
    raise NonFiniteError(
        f"{label}: tensor \"{name}\" has NaN or Inf values. They would spread into every average "
        "that contains this member; drop it (e.g. with last=) or repair it first"
    )


def check_cast(acc: np.ndarray, out: np.ndarray, *, name: str) -> None:
    """Refuse a result that the cast to its output dtype turned into NaN or Inf.

    ``acc`` is the finite result in the accumulator dtype, ``out`` the same values in the
    dtype that is written (``--dtype float16``, or a float16 member's own dtype). A value
    beyond the output dtype's range becomes Inf (float16, bfloat16) or NaN (float8_e4m3fn);
    the finiteness of what is actually written is what matters. Two reductions over ``acc``
    decide; ``out`` is looked at element by element only when a value reaches the range's
    end (where rounding may still land on the largest finite value).

    Raises:
        NonFiniteError: Naming the tensor, the largest magnitude reached, and the dtype's range.

    Example:
        >>> import numpy as np
        >>> acc = np.array([1.0, 3e38], np.float32)
        >>> with np.errstate(over="ignore"):
        ...     out = acc.astype(np.float16)
        >>> check_cast(acc, out, name="w")
        Traceback (most recent call last):
        ...
        polyak._errors.NonFiniteError: tensor "w": its average reaches 3e+38, beyond the range of float16 (largest finite value 65504); written as float16 it would be Inf. Write a wider dtype (e.g. --dtype float32) or leave --dtype unset
    """
    if acc.size == 0:
        return
    info = ml_dtypes.finfo(out.dtype)
    top = float(info.max)
    signed = float(info.min) == -top
    if acc.dtype.kind == "c" or not signed:
        peak = float(np.max(np.abs(acc)))
    else:
        peak = max(float(acc.max()), -float(acc.min()))
        if peak < top:
            return
    if all_finite(out):
        return
    became = "NaN" if np.isnan(out.astype(np.complex128 if out.dtype.kind == "c" else np.float32)).any() else "Inf"
    dt = np.dtype(out.dtype).name
    span = f"largest finite value {top:g}" if signed else f"finite values from {float(info.tiny):g} to {top:g}"
    raise NonFiniteError(
        f'tensor "{name}": its average reaches {peak:.4g}, beyond the range of {dt} ({span}); '
        f"written as {dt} it would be {became}. Write a wider dtype (e.g. --dtype float32) or leave --dtype unset"
    )


def member_chunks(
    x: np.ndarray, dtype: np.dtype, scratch: np.ndarray, *, label: str, name: str
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, chunk)`` of a member's tensor, each chunk widened to ``dtype``.

    Each chunk is probed for NaN/Inf while it is in cache; after the last one,
    :func:`check_finite` raises :class:`~polyak.NonFiniteError` naming ``label`` and
    ``name`` if the tensor holds any. ``scratch`` must hold :data:`CHUNK` elements of
    ``dtype`` (or the tensor's size, when smaller); the chunk may live there, so use it
    before asking for the next.

    Example:
        >>> import numpy as np
        >>> x = np.arange(4, dtype=np.float16)
        >>> [c.dtype.name for _, _, c in member_chunks(x, np.dtype(np.float32), np.empty(4, np.float32),
        ...                                           label="m", name="w")]
        ['float32']
    """
    flat = np.asarray(x).reshape(-1)
    total = 0.0
    for a, b in chunks(flat.size):
        xs = widen(flat[a:b], dtype, scratch)
        total += probe(xs)
        yield a, b, xs
    check_finite(total, flat, label=label, name=name)


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
        The :func:`probe` of ``acc``, summed over its chunks while each is in cache: it
        is finite exactly when no element is NaN or Inf (or, rarely, when large finite
        values overflow the sum, which the caller then checks element by element).
    """
    n = acc.size
    ws = [acc.dtype.type(w) for w in weights]
    # Scratch to widen narrow members into: only when some member needs it.
    cast = bufs.get(f"cast{part}", acc.dtype, min(n, CHUNK)) if any(a.dtype != acc.dtype for a in arrays) else acc[:0]
    tmp = bufs.get(f"tmp{part}", acc.dtype, min(n, CHUNK))
    flats = [a.reshape(-1) for a in arrays]
    total = 0.0
    # NaN/Inf (in a member or from an overflow) are found from the returned probe and
    # reported by the caller; numpy's warnings about them would only add noise. The
    # caller's np.errstate does not reach the worker threads of accumulate_all.
    with np.errstate(over="ignore", invalid="ignore"):
        for a, b in chunks(n):
            dst = acc[a:b]
            for i, (x, w) in enumerate(zip(flats, ws)):
                xs = widen(x[a:b], acc.dtype, cast)
                if i == 0 and first:
                    np.multiply(xs, w, out=dst)
                else:
                    add_scaled(dst, xs, w, tmp[: b - a])
            total += probe(dst)
    return total


def accumulate_into(
    arrays: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    dest: np.ndarray,
    dtype: np.dtype,
    bufs: Buffers,
    *,
    first: bool = True,
    part: int = 0,
) -> float:
    """:func:`accumulate` into ``dest`` whatever its dtype: summed in ``dtype``, written in ``dest``'s.

    When ``dest`` has the accumulation dtype the sum goes straight into it. Otherwise each
    chunk is summed in a chunk of scratch space (``dtype``) and cast into ``dest``, so a
    narrow destination (a bfloat16 module tensor) needs no full-size accumulator: the extra
    memory is one chunk. ``first`` must then be true (a narrow ``dest`` cannot carry the
    running sum between calls).

    Example:
        >>> dest = np.empty(3, np.float16)
        >>> _ = accumulate_into([np.ones(3, np.float16), np.full(3, 3, np.float16)], [0.5, 0.5], dest,
        ...                     np.dtype(np.float32), Buffers())
        >>> dest.tolist()
        [2.0, 2.0, 2.0]
    """
    dt = np.dtype(dtype)
    if dest.dtype == dt:
        return accumulate(arrays, weights, dest.reshape(-1), bufs, first=first, part=part)
    if not first:
        raise ValueError("accumulate_into: a destination of another dtype takes the whole sum at once")
    flats = [a.reshape(-1) for a in arrays]
    flat = dest.reshape(-1)
    chunk = bufs.get(f"chunk{part}", dt, min(flat.size, CHUNK))
    total = 0.0
    for a, b in chunks(flat.size):
        total += accumulate([x[a:b] for x in flats], weights, chunk[: b - a], bufs, first=True, part=part)
        np.copyto(flat[a:b], chunk[: b - a], casting="unsafe")
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
    dtype: np.dtype | None = None,
) -> float:
    """:func:`accumulate_into` of whole tensors, split into ``threads`` contiguous parts.

    numpy releases the GIL inside its loops, so the parts run on separate cores; each part
    has its own scratch buffers (allocated here, in the calling thread). ``dtype`` is the
    accumulation dtype (default: ``acc``'s own).
    """
    n = acc.size
    dt = acc.dtype if dtype is None else np.dtype(dtype)
    if threads <= 1 or pool is None or n < PARALLEL_MIN:
        return accumulate_into(arrays, weights, acc, dt, bufs)
    step = -(-n // threads // 64) * 64  # equal parts, aligned to 256-byte lines
    bounds = [(lo, min(lo + step, n)) for lo in range(0, n, step)]
    widen_any = any(a.dtype != dt for a in arrays)
    for k, (lo, hi) in enumerate(bounds):  # allocate scratch buffers before the threads run
        for slot in ("cast" if widen_any else "", "tmp", "chunk" if dt != acc.dtype else ""):
            if slot:
                bufs.get(f"{slot}{k}", dt, min(hi - lo, CHUNK))
    flats = [a.reshape(-1) for a in arrays]
    flat = acc.reshape(-1)
    futures = [
        pool.submit(accumulate_into, [x[lo:hi] for x in flats], weights, flat[lo:hi], dt, bufs, part=k)
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
