"""Sweep speed: all last-n averages from running sums vs one average, from scratch, and copying.

N members of a float32 model (default 50 × ~40 MB, safetensors in a temporary folder).
Measured in the same run, best of ``--repeat``:

* ``one average``: ``polyak.average`` of all N members (the unit of every ratio);
* ``sweep``: ``polyak.sweep`` building and handing over 3 schemes × n = 1..N averages
  (evaluate does nothing), baselines off — target ≤ 8× one average;
* ``from scratch``: ``polyak.average(last=n)`` for every scheme and n (Σn member reads per
  scheme: ~(N+1)/2 × 3 ≈ 76× for N = 50);
* ``materialise``: copying 3N model-size states into fresh arrays, what handing each average
  over as new arrays would add (a reference for the buffer reuse).

Also the peak anonymous memory (RssAnon) of the sweep, in model copies.

Run: ``.venv/bin/python benchmarks/bench_sweep.py`` (``--quick``: 10 × 4 MB).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import polyak


def rss_anon() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Samples RssAnon every 10 ms while the block runs."""

    def __enter__(self) -> PeakMemory:
        self.base = rss_anon()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_anon())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_anon())


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 members of ~4 MB")
    parser.add_argument("--members", type=int, help="number of members (default 50; quick 10)")
    parser.add_argument("--mb", type=float, help="model size in MB (default 40; quick 4)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--skip-scratch", action="store_true", help="do not time the from-scratch reference")
    args = parser.parse_args(argv)
    n_members = args.members or (10 if args.quick else 50)
    mb = args.mb or (4.0 if args.quick else 40.0)
    per_tensor = 1 << 18 if args.quick else 1 << 20
    n_tensors = max(1, int(mb * 1e6 / 4 / per_tensor))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="polyak-bench-sweep-") as tmp:
        paths = []
        base = {f"layer{i}.weight": rng.standard_normal(per_tensor, dtype=np.float32) for i in range(n_tensors)}
        base["layer0.bias"] = np.zeros(1000, np.float32)
        base["steps"] = np.array([0], np.int64)
        model_bytes = sum(v.nbytes for v in base.values())
        for k in range(n_members):
            state = {name: (v + np.float32(0.01 * k) if v.dtype == np.float32 else v + k) for name, v in base.items()}
            p = Path(tmp) / f"ckpt_{k}.safetensors"
            polyak.save(state, p)
            paths.append(p)
        for p in paths:  # warm the page cache: every timing below reads from memory
            p.read_bytes()
        print(f"{n_members} members × {model_bytes / 1e6:.1f} MB float32 ({len(base)} tensors), "
              f"{os.cpu_count()} CPUs, numpy {np.__version__}")

        t_one = best_of(args.repeat, lambda: polyak.average(paths))
        calls = []

        def noop(state):
            calls.append(1)
            return {"x": 0.0}

        with PeakMemory() as mem:
            t_sweep = best_of(args.repeat, lambda: polyak.sweep(paths, noop, baselines=()))
        n_avg = len(calls) // args.repeat
        sink = []

        def fresh(state):  # what evaluate would pay to keep fresh copies
            sink.append(sum(np.array(v, copy=True).size for v in state.values()))
            return {"x": 0.0}

        t_sweep_fresh = best_of(1, lambda: polyak.sweep(paths, fresh, baselines=()))
        out = {k: np.empty_like(v) for k, v in base.items()}

        def materialise():
            for _ in range(n_avg):
                {k: np.array(v, copy=True) for k, v in out.items()}

        t_mat = best_of(args.repeat, materialise)
        t_scratch = float("nan")
        if not args.skip_scratch:
            def scratch():
                for scheme in ("equal", "linear", "exponential"):
                    for n in range(1, n_members + 1):
                        polyak.average(paths, scheme=scheme, last=n)

            t_scratch = best_of(1, scratch)
    rows = [
        ("one average of all members", t_one),
        (f"sweep: {n_avg} averages handed over (buffers reused)", t_sweep),
        ("sweep, evaluate copying every state", t_sweep_fresh),
        (f"from scratch: {n_avg} polyak.average calls", t_scratch),
        (f"materialise {n_avg} model-size states", t_mat),
    ]
    print(f"{'what':<52} {'seconds':>8} {'× one average':>14}")
    for name, t in rows:
        print(f"{name:<52} {t:8.2f} {t / t_one:14.1f}")
    copies = (mem.peak - mem.base) / model_bytes
    print(f"sweep peak extra anonymous memory: {(mem.peak - mem.base) / 1e6:.0f} MB = {copies:.1f} model copies")
    ok = t_sweep / t_one <= 8.0
    print(f"target sweep ≤ 8× one average: {'met' if ok else 'MISSED'} ({t_sweep / t_one:.1f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
