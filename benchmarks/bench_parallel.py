"""Offline averaging split across worker threads: ``workers=1`` vs ``workers=2`` in one run.

Writes ``--members`` float32 safetensors checkpoints of ``--member-mb`` MB each (default
8 x 512 MB = 4 GB) into a temporary folder, averages them with ``polyak.average(...,
workers=1)`` and ``workers=2`` alternately (``--repeats`` times each, best kept), checks
that both give the same tensors, and reports the speed-up. The inputs are read from the
page cache (they were just written), so the run measures CPU and memory, not the disk.

To say where memory bandwidth caps the speed-up it also measures a plain bound: the same
streaming kernel polyak runs per chunk (``acc += w * x`` over float32 arrays much larger
than the CPU caches) in one process, and in two processes at once. The two-process
aggregate over the one-process rate is the most any split of this work can gain here.

Run: ``.venv/bin/python benchmarks/bench_parallel.py`` (``--quick``: 8 x 16 MB).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import polyak  # noqa: E402

_KERNEL = """
import sys, time, numpy as np
n = int(sys.argv[1]) // 4
x = np.ones(n, np.float32); acc = np.zeros(n, np.float32); t = np.empty(1 << 16, np.float32)
reps = int(sys.argv[2])
np.multiply(x, 0.5, out=acc)
t0 = time.perf_counter()
for _ in range(reps):
    for a in range(0, n, 1 << 16):
        b = min(a + (1 << 16), n)
        np.multiply(x[a:b], np.float32(0.125), out=t[: b - a]); np.add(acc[a:b], t[: b - a], out=acc[a:b])
print(reps * n * 4 / (time.perf_counter() - t0))
"""


def bandwidth(procs: int, nbytes: int, reps: int) -> float:
    """Aggregate bytes/s of member data streamed through polyak's chunk kernel by ``procs`` processes."""
    run = [subprocess.Popen([sys.executable, "-c", _KERNEL, str(nbytes), str(reps)], stdout=subprocess.PIPE, text=True) for _ in range(procs)]
    rates = [float(p.communicate()[0]) for p in run]
    return sum(rates)


def make_members(folder: Path, count: int, member_bytes: int) -> list[Path]:
    rng = np.random.default_rng(0)
    tensors = 16
    per = member_bytes // 4 // tensors
    base = [rng.standard_normal(per, dtype=np.float32) for _ in range(tensors)]
    paths = []
    for i in range(count):
        state = {f"layer{j}.weight": base[j] * np.float32(1 + 0.01 * i) for j in range(tensors)}
        p = folder / f"ckpt_{i}.safetensors"
        polyak.save(state, p)
        paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 x 16 MB members, one repeat")
    ap.add_argument("--members", type=int, default=8)
    ap.add_argument("--member-mb", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="where to write the temporary members (default: the system temp folder)")
    args = ap.parse_args(argv)
    if args.quick:
        args.member_mb, args.repeats = 16, 1
    member_bytes = args.member_mb * 10**6
    parent = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    need = member_bytes * (args.members + 3)  # members + two outputs + slack
    if need > free * 0.5:
        scale = free * 0.5 / need
        member_bytes = int(member_bytes * scale)
        print(f"only {free / 1e9:.1f} GB free in {parent}: members scaled down to {member_bytes / 1e6:.0f} MB")
    folder = Path(tempfile.mkdtemp(prefix="polyak-bench-parallel-", dir=parent))
    try:
        t0 = time.perf_counter()
        paths = make_members(folder, args.members, member_bytes)
        total = sum(p.stat().st_size for p in paths)
        print(f"inputs: {args.members} x {member_bytes / 1e6:.0f} MB float32 = {total / 1e9:.2f} GB (written in {time.perf_counter() - t0:.1f} s)")
        best = {1: float("inf"), 2: float("inf")}
        for r in range(args.repeats):
            for workers in (1, 2):
                out = folder / f"avg_w{workers}_{r}.safetensors"
                t = time.perf_counter()
                res = polyak.average(paths, out=out, workers=workers)
                best[workers] = min(best[workers], time.perf_counter() - t)
                if r == 0 and workers == 2:
                    a = polyak.average([folder / "avg_w1_0.safetensors"])
                    b = polyak.average([res.files[-1]])
                    if any(a[k].tobytes() != b[k].tobytes() for k in a):
                        print("ERROR: workers=2 differs from workers=1")
                        return 1
                if r > 0:
                    for f in res.files:
                        f.unlink()
        for w, s in best.items():
            print(f"workers={w}: {s:.2f} s  ({total / s / 1e9:.2f} GB/s of input)")
        speedup = best[1] / best[2]
        print(f"speed-up workers=2 over workers=1: {speedup:.2f}x  (target >= 1.3x)")
        probe = min(256 * 10**6, member_bytes * 2)
        reps = 2 if args.quick else 6
        one, two = bandwidth(1, probe, reps), bandwidth(2, probe, reps)
        print(
            f"kernel bound (acc += w*x, float32, {probe / 1e6:.0f} MB arrays): 1 process {one / 1e9:.2f} GB/s, "
            f"2 processes {two / 1e9:.2f} GB/s together: at most {two / one:.2f}x from a second process"
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
