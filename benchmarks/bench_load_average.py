"""``polyak.torch.load_average``: streamed into the module vs polyak 0.1's way, same run (issue 13).

polyak 0.1 computed the whole average as numpy arrays (``polyak.average`` without ``out``)
and then copied each into the module: a second copy of the model in private memory. Now
each tensor is averaged straight into the module's own tensor. Both run here on the same
files, each in its own subprocess that builds the module first (its 1× model of private
memory is the baseline) and then samples its private memory (RssAnon, see DESIGN.md) while
it loads the average; the table gives time and peak extra private memory, as a fraction
of the model.

Default: 5 float32 checkpoints of ~400 MB into a 100M-parameter module (100 tensors of 1M).

    .venv/bin/python benchmarks/bench_load_average.py            # the issue's configuration
    .venv/bin/python benchmarks/bench_load_average.py --quick    # 5 × 40 MB, to check it runs
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

from bench_average import SAMPLER, warm

MODULE = """
    import torch
    torch.set_num_threads(1)
    class Net(torch.nn.Module):
        def __init__(self, n, elems):
            super().__init__()
            self.layers = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(elems)) for _ in range(n))
    module = Net(n_tensors, elems)
"""

APPROACHES = {
    "polyak 0.1": """
        # polyak 0.1's load_average: the whole average as numpy, then one copy_ per tensor
        averaged = polyak.average(paths, order="given")
        with torch.no_grad():
            live = module.state_dict(keep_vars=True)
            for k, tensor in live.items():
                tensor.copy_(numpy_to_tensor(np.asarray(averaged[k])))
        del averaged
    """,
    "polyak": """
        load_average(module, paths, order="given")
    """,
}


def make_members(folder: Path, n_members: int, n_tensors: int, elems: int) -> list[str]:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    base = rng.standard_normal(elems, dtype=np.float32)
    paths = []
    for i in range(n_members):
        state = {f"layers.{t}": base + np.float32(0.01 * (i + t)) for t in range(n_tensors)}
        p = folder / f"ckpt_{i}.safetensors"
        save_file(state, str(p))
        paths.append(str(p))
    return paths


def run_one(name: str, paths: list[str], n_tensors: int, elems: int) -> dict[str, float]:
    script = (
        SAMPLER
        + "import numpy as np, polyak\nfrom polyak.torch import load_average\n"
        + "from polyak.formats.torch_pt import numpy_to_tensor\n"
        + f"paths = {paths!r}\nn_tensors = {n_tensors}\nelems = {elems}\n"
        + textwrap.dedent(MODULE)
        + "base = rss_anon()\nsampler = threading.Thread(target=sample, daemon=True); sampler.start()\n"
        + "t0 = time.perf_counter()\n"
        + textwrap.dedent(APPROACHES[name])
        + "\nelapsed = time.perf_counter() - t0\nstop.set(); sampler.join()\n"
        + "check = float(module.layers[n_tensors // 2][:1000].double().sum())\n"
        + "print(json.dumps({'seconds': elapsed, 'peak_private': max(peak[0] - base, 0), 'check': check}))\n"
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 × 40 MB members")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--mb", type=float, default=400.0, help="checkpoint (and module) size in MB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per approach, alternating (best is reported)")
    parser.add_argument("--dir", help="where to write the members (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.quick:
        args.mb, args.repeat = 40.0, 1
    elems = int(args.mb * 1e6 / 4 / args.tensors)
    model_bytes = elems * 4 * args.tensors
    folder = Path(tempfile.mkdtemp(prefix="polyak-bench-", dir=args.dir))
    try:
        paths = make_members(folder, args.members, args.tensors, elems)
        print(f"{args.members} members × {os.path.getsize(paths[0]) / 1e6:.0f} MB into a module of "
              f"{elems * args.tensors / 1e6:.0f}M float32 parameters ({args.tensors} tensors), best of {args.repeat}")
        results: dict[str, dict[str, float]] = {}
        for _ in range(args.repeat):
            for name in APPROACHES:  # alternating, so that machine load hits both alike
                warm(paths)
                r = run_one(name, paths, args.tensors, elems)
                best = results.get(name)
                if best is None:
                    results[name] = r
                else:
                    best["seconds"] = min(best["seconds"], r["seconds"])
                    best["peak_private"] = min(best["peak_private"], r["peak_private"])
        checks = {round(r["check"], 3) for r in results.values()}
        if len(checks) != 1:
            raise RuntimeError(f"the approaches loaded different values: {results}")
        old = results["polyak 0.1"]
        print(f"{'approach':<12} {'time':>8} {'extra private memory':>22} {'/ model':>8} {'time / 0.1':>11}")
        for name, r in results.items():
            print(f"{name:<12} {r['seconds']:>7.2f}s {r['peak_private'] / 1e6:>19.1f} MB "
                  f"{r['peak_private'] / model_bytes:>8.3f} {r['seconds'] / old['seconds']:>11.2f}")
        new = results["polyak"]
        ok = new["peak_private"] <= 0.1 * model_bytes
        print(f"extra private memory ≤ 0.1 × model: {'yes' if ok else 'NO'}; "
              f"speed vs 0.1: {old['seconds'] / new['seconds']:.2f}×")
        return 0 if ok else 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
