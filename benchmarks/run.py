"""Run every benchmark (``make bench``): each ``benchmarks/bench_*.py`` module's ``main()``.

Benchmarks measure polyak and its peers in the same run and print ratios; they are never
part of the test suite. Run one alone with ``python benchmarks/bench_<name>.py``; pass
``--quick`` for a smaller, faster configuration (used to smoke-test that they run).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover(names: list[str] | None = None) -> list[Path]:
    files = sorted(HERE.glob("bench_*.py"))
    if names:
        files = [f for f in files if any(n in f.stem for n in names)]
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("only", nargs="*", help="run only benchmarks whose name contains one of these")
    parser.add_argument("--quick", action="store_true", help="small sizes: check that they run")
    args = parser.parse_args(argv)
    failed = 0
    for path in discover(args.only):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        print(f"=== {path.stem} ===", flush=True)
        t0 = time.perf_counter()
        rc = module.main(["--quick"] if args.quick else [])
        print(f"=== {path.stem}: {'ok' if not rc else 'FAILED'} in {time.perf_counter() - t0:.1f} s ===\n", flush=True)
        failed += bool(rc)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
