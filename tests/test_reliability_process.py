"""The polyak process under limits and signals: real subprocesses, few and small.

* 200 safetensors members under an open-files limit of 64 (``ulimit -n 64``): averaged,
  because a memory map does not keep a file descriptor; formats that must keep one file
  open per member get one clear error naming the limit.
* Ctrl-C (SIGINT) while ``--workers 4`` writes its shards: exit status 130, one line, and
  no temporary file left, as for a single-file run.
* Ctrl-C while the command is still importing polyak: exit status 130, one line, no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import polyak
from _hostile import leftovers

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX limits and signals")

_LIMITED = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    import numpy as np
    import polyak

    folder, suffix, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    members = []
    for i in range(n):
        p = folder / f"m_{i}{suffix}"
        polyak.save({"a": np.full(7, i, np.float32), "b": np.full((2, 3), -i, np.float32)}, p)
        members.append(p)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    report = {}
    for mode, kwargs in [("one", {}), ("workers", {"workers": 4})]:
        try:
            result = polyak.average(members, out=folder / f"avg-{mode}.safetensors", **kwargs)
            report[mode] = {"files": [f.name for f in result.files]}
        except polyak.PolyakError as exc:
            report[mode] = {"error": type(exc).__name__ + ": " + str(exc)}
    print(json.dumps(report))
    """
)


def _limited(tmp_path: Path, suffix: str, n: int = 200) -> dict[str, dict[str, object]]:
    proc = subprocess.run(
        [sys.executable, "-c", _LIMITED, str(tmp_path), suffix, str(n)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_200_safetensors_members_under_ulimit_64(tmp_path: Path) -> None:
    report = _limited(tmp_path, ".safetensors")
    assert "error" not in report["one"] and "error" not in report["workers"], report
    one = polyak.average([tmp_path / "avg-one.safetensors"])
    workers = polyak.average([tmp_path / "avg-workers.safetensors.index.json"])
    # Independent reference: the mean of 0..199 and of its negation.
    np.testing.assert_allclose(one["a"], np.full(7, np.mean(np.arange(200)), np.float32), rtol=1e-6)
    np.testing.assert_allclose(one["b"], np.full((2, 3), -np.mean(np.arange(200)), np.float32), rtol=1e-6)
    for k in one:
        np.testing.assert_array_equal(workers[k], one[k])
    assert leftovers(tmp_path) == []


def test_members_that_keep_a_file_open_get_a_clear_error_at_the_limit(tmp_path: Path) -> None:
    report = _limited(tmp_path, ".npz", n=80)
    error = str(report["one"]["error"])
    assert error.startswith("ConfigError: ") and "too many open files (the limit is 64)" in error
    assert "ulimit -n" in error and "m_" in error and "of 80" in error
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("avg")) == []
    assert leftovers(tmp_path) == []


# --- SIGINT ----------------------------------------------------------------------------------

_SLOW_CLI = textwrap.dedent(
    """
    import sys, time
    import polyak._engine.stream as stream
    from polyak.cli import main

    real = stream.accumulate_all

    def slow(*args, **kwargs):  # each tensor takes a while: the signal lands mid-run
        time.sleep(0.2)
        return real(*args, **kwargs)

    stream.accumulate_all = slow
    sys.exit(main(sys.argv[1:]))
    """
)


def _members(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in range(n):
        p = folder / f"ck_{i}.safetensors"
        polyak.save({f"t{k:02d}": np.full(1000, i + k, np.float32) for k in range(16)}, p)
        paths.append(p)
    return paths


def _wait_for(predicate: object, proc: subprocess.Popen[str], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def test_sigint_during_workers_leaves_no_shard_temp(tmp_path: Path) -> None:
    members = _members(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_CLI, "average", *map(str, members), "-o", str(out_dir / "avg.safetensors"),
         "--workers", "4", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Interrupt once every worker has its shard's temporary file open.
    started = _wait_for(lambda: len(leftovers(out_dir)) >= 4, proc)
    assert started, f"no temporary shards appeared: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["polyak: interrupted; no output was written"]
    assert sorted(out_dir.iterdir()) == []  # no shard, no index, no temporary file
    assert leftovers(tmp_path) == []


def _loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see the import's progress")
@pytest.mark.parametrize("library", ["numpy", "ml_dtypes"])
def test_sigint_while_importing_polyak_is_one_line(tmp_path: Path, library: str) -> None:
    """Ctrl-C while `python -m polyak` imports its modules (numpy, ml_dtypes): no traceback."""
    members = _members(tmp_path / "in", n=2)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyak", "average", *map(str, members), "-o", str(tmp_path / "avg.safetensors")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    # The library's shared objects are mapped while `import polyak` runs (before main()).
    if not _wait_for(lambda: _loaded(proc.pid, library), proc, timeout=30):
        proc.communicate()
        pytest.skip(f"{library} was not seen loading before the run ended")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["polyak: interrupted; no output was written"]
    assert not (tmp_path / "avg.safetensors").exists() and leftovers(tmp_path) == []
