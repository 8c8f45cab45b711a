"""Offline averaging: polyak vs the tutorial's way, the fairseq way, a plain mmap loop, and
the page-cache bound, on the same inputs in the same run (issue 2).

Default: 10 float32 checkpoints of ~400 MB (100 tensors each), in the page cache. Each
approach runs in its own subprocess, which samples its private memory (RssAnon, see
DESIGN.md) while it works; the table reports time and peak private memory above the
interpreter's baseline, as ratios to the bound, to each peer and to one checkpoint.

    .venv/bin/python benchmarks/bench_average.py            # the issue's configuration
    .venv/bin/python benchmarks/bench_average.py --quick    # 10 × 40 MB, to check it runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

SAMPLER = textwrap.dedent(
    """
    import json, os, sys, threading, time
    def rss_anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0
    peak = [0]
    stop = threading.Event()
    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)
    """
)

APPROACHES = {
    "bound": """
        # page-cache bound: one streaming pass over every member's bytes (memory-mapped,
        # as cheap an operation as numpy has: OR-reduce of 64-bit words), one output write
        for p in paths:
            mm = np.memmap(p, dtype=np.uint8, mode="r")
            words = mm[: mm.size // 8 * 8].view(np.uint64)
            np.bitwise_or.reduce(words)
            del words, mm
        size = os.path.getsize(paths[0])
        buf = np.zeros(1 << 24, dtype=np.uint8)
        with open(out, "wb") as f:
            left = size
            while left > 0:
                n = min(left, buf.size)
                f.write(memoryview(buf[:n])); left -= n
    """,
    "mmap_loop": """
        # plain mmap streaming: per tensor, sum the members' memory-mapped arrays
        handles = [np.memmap(p, dtype=np.uint8, mode="r") for p in paths]
        hdr = []
        for p in paths:
            with open(p, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                hdr.append((8 + n, json.loads(f.read(n))))
        start, h = hdr[0]
        names = [k for k in h if k != "__metadata__"]
        acc = None
        with open(out, "wb") as f:
            for name in names:
                b, e = h[name]["data_offsets"]
                shape = h[name]["shape"]
                for i, (s, hh) in enumerate(hdr):
                    bb, ee = hh[name]["data_offsets"]
                    x = handles[i][s + bb:s + ee].view(np.float32)
                    if acc is None or acc.size < x.size:
                        acc = np.empty(x.size, np.float32)
                    a = acc[:x.size]
                    if i == 0:
                        np.multiply(x, 1 / len(paths), out=a)
                    else:
                        a += x * np.float32(1 / len(paths))
                f.write(memoryview(a))
    """,
    "polyak": """
        polyak.average(paths, out=out, force=True, order="given")
    """,
    "fairseq": """
        # fairseq scripts/average_checkpoints.py: torch.load each file, running sum, divide
        torch.set_num_threads(1)
        params = None
        for p in pt_paths:
            state = torch.load(p, map_location="cpu", weights_only=True)
            if params is None:
                params = {k: v.clone().float() for k, v in state.items()}
            else:
                for k, v in state.items():
                    params[k].add_(v)
            del state
        for v in params.values():
            v.div_(len(pt_paths))
        torch.save(params, out)
    """,
    "tutorial": """
        # the tutorial's model_weight_ensemble: load every member, numpy.average per layer
        members = [load_file(p) for p in paths]
        names = list(members[0])
        weights = [1.0 for _ in members]
        avg = {}
        for name in names:
            layer = np.array([m[name] for m in members])
            avg[name] = np.average(layer, axis=0, weights=weights)
        save_file({k: v.astype(np.float32) for k, v in avg.items()}, out)
    """,
}


def make_members(folder: Path, n_members: int, n_tensors: int, tensor_elems: int, with_pt: bool) -> tuple[list[str], list[str]]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base = rng.standard_normal(tensor_elems, dtype=np.float32)
    paths, pt_paths = [], []
    for i in range(n_members):
        state = {f"layer{t:03d}.weight": (base + np.float32(0.01 * (i + t))) for t in range(n_tensors)}
        p = folder / f"ckpt_{i}.safetensors"
        save_file(state, str(p))
        paths.append(str(p))
        if with_pt:
            import torch

            q = folder / f"ckpt_{i}.pt"
            torch.save({k: torch.from_numpy(v) for k, v in state.items()}, q)
            pt_paths.append(str(q))
    return paths, pt_paths


def run_one(name: str, paths: list[str], pt_paths: list[str], out: str, threads: int) -> dict[str, float]:
    body = textwrap.dedent(APPROACHES[name])
    # Imports happen before the clock starts: the targets are "after imports".
    imports = {
        "polyak": "import polyak\n",
        "fairseq": "import torch\n",
        "tutorial": "import numpy as np\nfrom safetensors.numpy import load_file, save_file\n",
        "mmap_loop": "import numpy as np, struct\n",
        "bound": "import numpy as np\n",
    }.get(name, "")
    script = (
        SAMPLER
        + imports
        + f"paths = {paths!r}\npt_paths = {pt_paths!r}\nout = {out!r}\n"
        + "base = rss_anon()\nt = threading.Thread(target=sample, daemon=True); t.start()\n"
        + "t0 = time.perf_counter()\n"
        + body
        + "\nelapsed = time.perf_counter() - t0\nstop.set(); t.join()\n"
        + "print(json.dumps({'seconds': elapsed, 'peak_private': max(peak[0] - base, 0)}))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def warm(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 × 40 MB members")
    parser.add_argument("--members", type=int, default=10)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--mb", type=float, default=400.0, help="checkpoint size in MB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per approach (best is reported)")
    parser.add_argument("--skip", default="", help="comma-separated approaches to skip")
    parser.add_argument("--dir", help="where to write the members (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.mb, args.repeat = 40.0, 1
    elems = int(args.mb * 1e6 / 4 / args.tensors)
    folder = Path(tempfile.mkdtemp(prefix="polyak-bench-", dir=args.dir))
    skip = set(filter(None, args.skip.split(",")))
    try:
        need_pt = "fairseq" not in skip
        paths, pt_paths = make_members(folder, args.members, args.tensors, elems, need_pt)
        one = os.path.getsize(paths[0])
        print(f"{args.members} members × {one / 1e6:.0f} MB ({args.tensors} float32 tensors), best of {args.repeat}")
        results: dict[str, dict[str, float]] = {}
        for name in APPROACHES:
            if name in skip:
                continue
            best: dict[str, float] | None = None
            for _ in range(args.repeat if name != "tutorial" else 1):
                warm(paths + (pt_paths if name == "fairseq" else []))
                out = str(folder / f"out_{name}.safetensors")
                if os.path.exists(out):
                    os.remove(out)
                r = run_one(name, paths, pt_paths, out, threads=1)
                if best is None or r["seconds"] < best["seconds"]:
                    best = r
            assert best is not None
            results[name] = best
            print(f"  {name:<10} {best['seconds']:7.2f} s   peak private {best['peak_private'] / one:5.2f}× one checkpoint", flush=True)
        bound = results["bound"]["seconds"]
        print("\nratios")
        p = results["polyak"]["seconds"]
        print(f"  polyak / page-cache bound   {p / bound:6.2f}×   (target ≤ 2.5×)")
        for peer in ("mmap_loop", "fairseq", "tutorial"):
            if peer in results:
                print(f"  {peer} / polyak{' ' * (14 - len(peer))}{results[peer]['seconds'] / p:6.2f}×" + ("   (target ≥ 4×)" if peer == "fairseq" else ""))
        print(f"  polyak peak private memory  {results['polyak']['peak_private'] / one:6.2f}× one checkpoint   (target ≤ 1.2×)")
        data = {"members": args.members, "checkpoint_bytes": one, "tensors": args.tensors, "results": results}
        print("\njson: " + json.dumps(data))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
