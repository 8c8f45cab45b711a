"""Property-based: mutated files of every format are read consistently or refused cleanly.

Hypothesis corrupts valid sample files (bit flips, truncation, byte insertions and
deletions, overwrites near the headers, and structured edits of safetensors headers and
index files). For every mutated file polyak must either read it (every tensor matching its
declared shape and dtype, the same tensors as the original when the bytes are unchanged)
or raise a :class:`polyak.PolyakError` - never another exception, a hang (each example runs
under a time limit) or a crash. Averaging the mutated file with an intact member must
likewise succeed or raise a PolyakError.

``POLYAK_MUTATIONS`` sets the examples per sample format (default 40; e.g. 2000 for a deep
run). Run with ``-s`` to print how many mutated files were tried.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyak
from _formats_samples import SAMPLES, available, sample_state
from _hostile import ReadingTimeout, read_all, time_limit

EXAMPLES = int(os.environ.get("POLYAK_MUTATIONS", "40"))
TIME_LIMIT_S = 20.0
COUNTS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if COUNTS:
        tried = sum(v for k, v in COUNTS.items() if k.endswith(":tried"))
        print(f"\n[mutations] {tried} mutated files tried: {dict(sorted(COUNTS.items()))}")


_ORIGINALS: dict[str, tuple[Path, Path, dict[Path, bytes], dict[str, np.ndarray]]] = {}


def _original(name: str) -> tuple[Path, Path, dict[Path, bytes], dict[str, np.ndarray]]:
    """(folder, path for polyak, {file: bytes}, tensors) of a valid sample, made once."""
    if name not in _ORIGINALS:
        folder = Path(tempfile.mkdtemp(prefix=f"polyak-mut-{name}-"))
        path, files = SAMPLES[name].make(folder, sample_state(3))
        tensors = read_all(path)
        _ORIGINALS[name] = (folder, path, {f: f.read_bytes() for f in files}, tensors)
    return _ORIGINALS[name]


# --- mutations ---------------------------------------------------------------------------

positions = st.one_of(st.integers(0, 300), st.integers(-300, -1), st.integers(0, 1 << 20))
byte_ops = st.one_of(
    st.tuples(st.just("flip"), positions, st.integers(0, 7)),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), positions, st.integers(1, 64)),
    st.tuples(st.just("overwrite"), positions, st.binary(min_size=1, max_size=16)),
)

json_values = st.one_of(
    st.integers(-(2**64), 2**64),
    st.sampled_from([0, 1, 2**31, 2**32, 2**63 - 1, 2**63, -1]),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
    st.lists(st.integers(-(2**40), 2**40), max_size=4),
)


def _apply(data: bytes, op: tuple[Any, ...]) -> bytes:
    b = bytearray(data)
    if not b:
        return bytes(b)
    kind, pos = op[0], op[1] % (len(b) + (1 if op[0] in ("insert", "truncate") else 0))
    if kind == "flip":
        b[pos] ^= 1 << op[2]
    elif kind == "truncate":
        del b[pos:]
    elif kind == "insert":
        b[pos:pos] = op[2]
    elif kind == "delete":
        del b[pos : pos + op[2]]
    else:
        b[pos : pos + len(op[2])] = op[2]
    return bytes(b)


def _edit_safetensors_header(data: bytes, draw: st.DrawFn) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    target = draw(st.sampled_from([*names, "__metadata__"]))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "whole", "shape[0]", "offset[1]"]))
    value = draw(json_values)
    entry = header.get(target)
    if field == "whole" or not isinstance(entry, dict):
        header[target] = value
    elif field == "shape[0]" and entry.get("shape"):
        entry["shape"][0] = value
    elif field == "offset[1]" and entry.get("data_offsets"):
        entry["data_offsets"][1] = value
    elif field in entry:
        entry[field] = draw(st.one_of(json_values, st.sampled_from(["F32", "F16", "I64", "BF16", "BOOL", "F8_E4M3"])))
    raw = json.dumps(header).encode()
    keep_len = draw(st.booleans())
    length = n if keep_len else len(raw)
    raw = raw[:n].ljust(n) if keep_len else raw
    return struct.pack("<Q", length) + raw + data[8 + n :]


def _edit_index(data: bytes, draw: st.DrawFn) -> bytes:
    index = json.loads(data)
    what = draw(st.sampled_from(["total_size", "weight_map-value", "weight_map-key", "drop", "metadata"]))
    wmap = index["weight_map"]
    key = draw(st.sampled_from(sorted(wmap)))
    if what == "total_size":
        index["metadata"]["total_size"] = draw(json_values)
    elif what == "weight_map-value":
        wmap[key] = draw(st.one_of(json_values, st.sampled_from(["../x.safetensors", "/etc/passwd", "", "."])))
    elif what == "weight_map-key":
        wmap[draw(st.text(max_size=6))] = wmap.pop(key)
    elif what == "drop":
        del wmap[key]
    else:
        index["metadata"] = draw(json_values)
    return json.dumps(index).encode()


@st.composite
def mutations(draw: st.DrawFn, name: str) -> dict[Path, bytes]:
    """{file: mutated bytes} for one sample; untouched files keep their bytes."""
    _, _, originals, _ = _original(name)
    files = sorted(originals)
    victim = draw(st.sampled_from(files))
    data = originals[victim]
    structured = draw(st.booleans())
    if structured and victim.name.endswith(".index.json"):
        data = _edit_index(data, draw)
    elif structured and victim.suffix == ".safetensors":
        data = _edit_safetensors_header(data, draw)
    for op in draw(st.lists(byte_ops, min_size=0 if structured else 1, max_size=3)):
        data = _apply(data, op)
    return {**originals, victim: data}


# --- the property --------------------------------------------------------------------------


def _check(name: str, mutated: dict[Path, bytes]) -> None:
    _folder, path, originals, tensors = _original(name)
    work = Path(tempfile.mkdtemp(prefix="polyak-mut-"))
    try:
        for f, data in mutated.items():
            (work / f.name).write_bytes(data)
        target = work / path.name
        intact = work / "intact"
        intact.mkdir()
        for f, data in originals.items():
            (intact / f.name).write_bytes(data)
        COUNTS[f"{name}:tried"] += 1
        try:
            with time_limit(TIME_LIMIT_S), warnings.catch_warnings():
                warnings.simplefilter("error")
                got = read_all(target)
                avg = polyak.average([intact / path.name, target], order="given")
        except polyak.PolyakError as exc:
            COUNTS[f"{name}:refused"] += 1
            if os.environ.get("POLYAK_MUTATIONS_VERBOSE"):
                print(f"{name}: {str(exc)[:150]}")
            return
        except ReadingTimeout:
            pytest.fail(f"{name}: reading a mutated file hung for {TIME_LIMIT_S} s")
        COUNTS[f"{name}:read"] += 1
        if mutated == originals:
            assert got.keys() == tensors.keys()
            for k in tensors:
                np.testing.assert_array_equal(got[k], tensors[k])
        assert set(avg) == set(got)
    finally:
        shutil.rmtree(work, ignore_errors=True)


SAMPLE_IDS = sorted(SAMPLES)


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_mutated_files_read_or_refused(name: str) -> None:
    if not available(SAMPLES[name]):
        pytest.skip(f"{name} needs {', '.join(SAMPLES[name].needs)}")

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=os.environ.get("POLYAK_MUTATIONS_RANDOM") is None,
    )
    @given(mutated=mutations(name))
    def run(mutated: dict[Path, bytes]) -> None:
        _check(name, mutated)

    run()
