"""Coverage-guided fuzzing of polyak's format readers (atheris), with a hypothesis fallback.

Each input is one byte choosing the format (its suffix) followed by the file's bytes. The
file is opened with :func:`polyak.open_source`, every tensor is read and checked against its
declared shape and dtype, and ``polyak.inspect`` describes it. A :class:`polyak.PolyakError`
is the expected way to refuse a file; any other exception, a hang or a crash is a finding.

Usage (``make fuzz`` runs the first; numbers go to docs/reliability.md)::

    python tests/fuzz/fuzz_formats.py                       # atheris, 300 s
    python tests/fuzz/fuzz_formats.py -max_total_time=60    # libFuzzer flags pass through
    python tests/fuzz/fuzz_formats.py --fallback 2000       # no atheris: hypothesis, N inputs
    python tests/fuzz/fuzz_formats.py --formats npz,torch   # only these samples

The seed corpus is a valid sample of every format from ``tests/_formats_samples.py``
(written to a temporary folder at start), so new formats are fuzzed once registered there.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the sample registry
os.environ.setdefault("KERAS_BACKEND", "torch")

DEFAULT_SECONDS = 300
STATS: Counter[str] = Counter()
_T0 = time.time()


def _samples(only: set[str] | None = None) -> list[tuple[str, str, bytes]]:
    """(sample name, suffix, bytes) for every single-file sample whose needs are installed."""
    from _formats_samples import SAMPLES, available, sample_state

    out = []
    folder = Path(tempfile.mkdtemp(prefix="polyak-fuzz-seeds-"))
    for name, sample in sorted(SAMPLES.items()):
        if not available(sample) or (only is not None and name not in only):
            continue
        sub = folder / name
        sub.mkdir()
        path, files = sample.make(sub, sample_state(0))
        if len(files) == 1:
            out.append((name, sample.suffix, path.read_bytes()))
    return out


SAMPLE_LIST: list[tuple[str, str, bytes]] = []
WORK = Path(tempfile.mkdtemp(prefix="polyak-fuzz-"))


def check_bytes(data: bytes) -> None:
    """The fuzz target: read ``data[1:]`` as the format chosen by ``data[0]``."""
    import numpy as np

    import polyak
    from polyak.formats import open_source

    if not data:
        return
    name, suffix, _ = SAMPLE_LIST[data[0] % len(SAMPLE_LIST)]
    path = WORK / f"input{suffix}"
    path.write_bytes(data[1:])
    STATS["runs"] += 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy/h5py warnings on garbage are not findings
            with open_source(path) as src:
                for tname, info in src.infos().items():
                    arr = src.read(tname)
                    if arr.shape != info.shape or arr.dtype != info.dtype:
                        raise AssertionError(f"{name}: {tname} declared {info.shape} {info.dtype}, read {arr.shape} {arr.dtype}")
                    np.asarray(arr).tobytes()
                src.metadata()
            polyak.inspect(path)
        STATS[f"{name}:read"] += 1
    except polyak.PolyakError:
        STATS[f"{name}:refused"] += 1
    if STATS["runs"] % 5000 == 0:
        _report()


def _report() -> None:
    print(f"[fuzz] {dict(sorted(STATS.items()))} after {time.time() - _T0:.0f} s", file=sys.stderr, flush=True)


def _seed_corpus() -> Path:
    corpus = Path(tempfile.mkdtemp(prefix="polyak-fuzz-corpus-"))
    for i, (name, _suffix, data) in enumerate(SAMPLE_LIST):
        (corpus / name).write_bytes(bytes([i]) + data)
    return corpus


def run_atheris(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["polyak"]):
        import polyak
        import polyak.formats.npz
        import polyak.formats.safetensors
        import polyak.formats.torch_pt  # noqa: F401
        for mod in ("polyak.formats._h5", "polyak.formats.keras_archive", "polyak.formats.keras_weights", "polyak.formats.keras2_h5"):
            try:
                __import__(mod)
            except ImportError:
                pass
    args = [a for a in argv if a.startswith("-")]
    if not any(a.startswith(("-max_total_time", "-runs", "-atheris_runs")) for a in args):
        args.append(f"-max_total_time={DEFAULT_SECONDS}")
    if not any(a.startswith("-max_len") for a in args):
        # Seeds longer than libFuzzer's growing length limit would be cut and always refused.
        args.append(f"-max_len={max(len(d) for _, _, d in SAMPLE_LIST) + 4096}")
    corpus = _seed_corpus()
    atheris.Setup([sys.argv[0], *args, "-rss_limit_mb=4096", "-timeout=20", str(corpus)], check_bytes)
    atheris.Fuzz()


def run_fallback(n: int) -> None:
    """No atheris: the same target on n hypothesis-generated mutations of the seeds."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    @st.composite
    def inputs(draw: st.DrawFn) -> bytes:
        i = draw(st.integers(0, len(SAMPLE_LIST) - 1))
        data = bytearray(SAMPLE_LIST[i][2])
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, max(len(data) - 1, 0)))
            kind = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
            if kind == "flip" and data:
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif kind == "cut":
                del data[pos:]
            elif kind == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
            elif data:
                data[pos] = draw(st.integers(0, 255))
        return bytes([i]) + bytes(data)

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(inputs())
    def run(data: bytes) -> None:
        check_bytes(data)

    run()
    _report()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = None
    if "--formats" in argv:
        i = argv.index("--formats")
        only = set(argv[i + 1].split(","))
        argv = argv[:i] + argv[i + 2 :]
        sys.argv = [sys.argv[0], *argv]
    SAMPLE_LIST.extend(_samples(only))
    print(f"[fuzz] seeds: {[n for n, _, _ in SAMPLE_LIST]}", file=sys.stderr)
    if argv and argv[0] == "--fallback":
        run_fallback(int(argv[1]) if len(argv) > 1 else 2000)
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("[fuzz] atheris is not installed: running the hypothesis fallback (2000 inputs)", file=sys.stderr)
        run_fallback(2000)
        return 0
    run_atheris(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
