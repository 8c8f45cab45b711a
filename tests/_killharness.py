"""Kill writers with SIGKILL at random points and check what is left on disk.

Used by ``tests/test_reliability_kill.py`` (a bounded campaign) and by
``tests/fuzz/reliability_figures.py`` (the figures of docs/reliability.md).

A campaign runs a writer in a subprocess many times and kills it with SIGKILL, either at
a uniformly random time over the whole measured run (startup included), or at a random
time after its temporary output file appeared (so that most kills land while bytes are
being written, fsynced and renamed); until a kill has left a temporary file, it kills as
soon as one appears. After every kill it checks:

* every input is byte-identical to what it was (and, at the end, loadable);
* the output either does not exist or is complete and bit-identical to a reference run
  (the ``created`` timestamp in the metadata masked), shards and index included;
* leftovers are only temporary files named ``.<name>.polyak-tmp-<pid>-<hex>``;

and at the end that one ordinary run removes every leftover temporary file.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import polyak
from polyak._atomic import TEMP_MARK

__all__ = ["Campaign", "KillStats", "make_members", "run_campaign"]

_CREATED = re.compile(rb'\\?"created\\?": ?\\?"[^"\\]*\\?"')


@dataclass
class KillStats:
    """What a campaign did."""

    runs: int = 0
    kills: int = 0
    finished_before_kill: int = 0
    outputs_complete: int = 0
    outputs_absent: int = 0
    #: Temporary files left by killed runs, and how many of them a later run removed.
    temps_seen: int = 0
    temps_cleaned: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def make_members(folder: Path, *, n: int = 4, tensors: int = 8, elements: int = 125_000, seed: int = 0) -> list[Path]:
    """``n`` safetensors members of ``tensors`` float32 tensors (4 MB each by default)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        state = {f"block.{j}.weight": rng.standard_normal(elements).astype(np.float32) for j in range(tensors)}
        state["step"] = np.array(100 * (i + 1), dtype=np.int64)
        path = folder / f"ckpt_{i + 1}.safetensors"
        polyak.save(state, path, force=True)
        paths.append(path)
    return paths


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _masked(data: bytes) -> bytes:
    return _CREATED.sub(b'"created":"<masked>"', data)


def _output_files(out: Path, sharded: bool) -> list[Path]:
    if not sharded:
        return [out]
    index = out.with_name(out.name.removesuffix(".safetensors") + ".safetensors.index.json")
    shards = sorted(out.parent.glob(out.name.removesuffix(".safetensors") + "-*-of-*.safetensors"))
    return [index, *shards]


@dataclass
class Campaign:
    """One writer to kill: a command that writes ``out`` from ``inputs``.

    Attributes:
        name: For reports.
        argv: The command (``[sys.executable, "-m", "polyak", ...]``), ``--force`` excluded.
        inputs: Files that must never change.
        out: The output (for sharded outputs, the name given to ``-o``).
        sharded: The output is an index plus shards.
        force_flag: The flag that allows replacing an existing output (``None``: the
            command always replaces it).
    """

    name: str
    argv: list[str]
    inputs: list[Path]
    out: Path
    sharded: bool = False
    force_flag: str | None = "--force"

    def command(self, force: bool) -> list[str]:
        return [*self.argv, *([self.force_flag] if force and self.force_flag else [])]


def _reference(c: Campaign, env: dict[str, str]) -> dict[str, bytes]:
    for f in _output_files(c.out, c.sharded):
        f.unlink(missing_ok=True)
    proc = subprocess.run(c.command(False), env=env, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run of {c.name} failed: {proc.stderr.decode()}")
    ref = {f.name: _masked(f.read_bytes()) for f in _output_files(c.out, c.sharded)}
    for f in _output_files(c.out, c.sharded):
        f.unlink()
    return ref


def _check_output(c: Campaign, ref: dict[str, bytes]) -> str | None:
    """``None`` when there is no output or it matches the reference; else the problem."""
    files = _output_files(c.out, c.sharded)
    head = files[0]
    if not head.exists():
        return None
    got = {f.name: _masked(f.read_bytes()) for f in files if f.exists()}
    if c.sharded:
        # Orphan shards without an index are not an output; with the index, all must match.
        got = {k: v for k, v in got.items() if k in ref}
    if got != ref:
        diff = sorted(k for k in set(got) | set(ref) if got.get(k) != ref.get(k))
        return f"{c.name}: output exists but differs from the reference in {diff}"
    return None


def _temps(folder: Path) -> set[str]:
    with os.scandir(folder) as it:
        return {e.name for e in it if TEMP_MARK in e.name}


def _wait_for_temp(folder: Path, proc: subprocess.Popen[bytes], limit: float, old: set[str]) -> bool:
    """Wait until ``proc`` creates a temporary file (one not in ``old``, left by earlier kills)."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        if proc.poll() is not None:
            return False
        if _temps(folder) - old:
            return True
        time.sleep(0.0005)  # do not starve the writer of the CPU on a small machine
    return False


#: A campaign that has not yet killed a writer while its temporary file existed (the
#: evidence for "the next run removes what a killed run left") keeps trying, past its
#: budget and its number of kills (a loaded machine can spend the budget before), for at
#: most this many runs; the tests then fail on the missing evidence.
MIN_RUNS_FOR_EVIDENCE = 10


def _evidence(stats: KillStats) -> bool:
    """A kill happened, and one left a temporary file for the next run to remove."""
    return stats.kills >= 1 and stats.temps_seen >= 1


def _go_on(stats: KillStats, kills: int, elapsed: float, budget_s: float) -> bool:
    if not _evidence(stats) and stats.runs < MIN_RUNS_FOR_EVIDENCE:
        return True
    return stats.kills < kills and elapsed < budget_s


def run_campaign(c: Campaign, *, kills: int, budget_s: float, seed: int = 0, env: dict[str, str] | None = None) -> KillStats:
    """Kill ``c`` up to ``kills`` times within ``budget_s`` seconds; return what happened."""
    env = dict(os.environ if env is None else env)
    rng = random.Random(seed)
    stats = KillStats()
    t_start = time.perf_counter()
    digests = {p: _digest(p) for p in c.inputs}
    ref = _reference(c, env)
    # Measure a full run and its write phase (while temporary files exist: a kill then
    # leaves one for the next run to remove).
    t0 = time.perf_counter()
    proc = subprocess.Popen(c.command(True), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_temp(c.out.parent, proc, 60, set())
    t_temp = time.perf_counter()
    while proc.poll() is None and _temps(c.out.parent):
        time.sleep(0.0005)
    t_gone = time.perf_counter()
    proc.wait()
    t1 = time.perf_counter()
    total, write_phase = t1 - t0, max(t_gone - t_temp, 1e-3)
    folder = c.out.parent
    previous: set[Path] = set()
    t_kills = time.perf_counter()  # the budget counts the kill runs, not the measurement
    while _go_on(stats, kills, time.perf_counter() - t_kills, budget_s):
        force = rng.random() < 0.5
        if not force:
            for f in _output_files(c.out, c.sharded):
                f.unlink(missing_ok=True)
        old = _temps(folder)
        proc = subprocess.Popen(c.command(force), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stats.runs += 1
        if not _evidence(stats):
            # First the evidence: kill as soon as a temporary file appears (the write phase
            # of a small output can be shorter than this loop's reaction on a loaded machine).
            _wait_for_temp(folder, proc, 60, old)
        elif rng.random() < 0.3:
            time.sleep(rng.uniform(0, total * 1.05))
        else:
            _wait_for_temp(folder, proc, 60, old)
            time.sleep(rng.uniform(0, write_phase * 1.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            stats.kills += 1
        else:
            stats.finished_before_kill += 1
        proc.wait()
        temps = [p for p in folder.iterdir() if TEMP_MARK in p.name]
        stats.temps_cleaned += len(previous - set(temps))
        stats.temps_seen += len(set(temps) - previous)
        previous = set(temps)
        bad_names = [p.name for p in temps if not p.name.startswith(".")]
        if bad_names:
            stats.problems.append(f"{c.name}: temporary files not hidden: {bad_names}")
        for p, d in digests.items():
            if _digest(p) != d:
                stats.problems.append(f"{c.name}: input {p.name} changed after a kill")
        problem = _check_output(c, ref)
        if problem:
            stats.problems.append(problem)
        elif _output_files(c.out, c.sharded)[0].exists():
            stats.outputs_complete += 1
        else:
            stats.outputs_absent += 1
    # One ordinary run cleans up every leftover temporary file and writes the output.
    before = [p for p in folder.iterdir() if TEMP_MARK in p.name]
    proc2 = subprocess.run(c.command(True), env=env, capture_output=True, check=False)
    if proc2.returncode != 0:
        stats.problems.append(f"{c.name}: the run after the kills failed: {proc2.stderr.decode()[-500:]}")
    after = [p for p in folder.iterdir() if TEMP_MARK in p.name]
    stats.temps_cleaned += len(before) - len(after)
    if after:
        stats.problems.append(f"{c.name}: temporary files survived the next run: {[p.name for p in after]}")
    problem = _check_output(c, ref)
    if problem or not _output_files(c.out, c.sharded)[0].exists():
        stats.problems.append(problem or f"{c.name}: no output after the final run")
    for p in c.inputs:
        polyak.inspect(p)
    stats.seconds = time.perf_counter() - t_start
    return stats


def average_campaign(folder: Path, members: list[Path], *, sharded: bool = False) -> Campaign:
    out = folder / "out" / "avg.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "polyak", "average", *map(str, members), "-o", str(out), "-q", "--scheme", "linear"]
    if sharded:
        argv += ["--shard-size", "1MB"]
    return Campaign("average" + (" --shard-size" if sharded else ""), argv, members, out, sharded)


SAVE_SCRIPT = """
import sys, numpy as np, polyak
rng = np.random.default_rng(5)
state = {f"t{j}": rng.standard_normal(250_000).astype(np.float32) for j in range(8)}
polyak.save(state, sys.argv[1], force=True)
"""


def save_campaign(folder: Path, suffix: str = ".safetensors") -> Campaign:
    out = folder / "save" / f"state{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    return Campaign(f"polyak.save {suffix}", [sys.executable, "-c", SAVE_SCRIPT, str(out)], [], out, False, None)


_TORCH_SAVER = """
import sys, torch
from polyak.torch import CheckpointSaver
saver = CheckpointSaver(sys.argv[1], format="FORMAT")
m = torch.nn.Linear(300, 300)
for epoch in range(10_000):
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float(epoch))
    saver.save(m, epoch=epoch)
"""

SAVER_SCRIPTS = {
    # Every checkpoint N holds tensors filled with N, so a file can be checked on its own.
    "torch-safetensors": _TORCH_SAVER.replace("FORMAT", ".safetensors"),
    "torch-pt": _TORCH_SAVER.replace("FORMAT", ".pt"),
    "torch-ema-state": """
import sys, torch
from polyak.torch import EMA
m = torch.nn.Linear(300, 300)
ema = EMA(m, decay=0.5)
for step in range(10_000):
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float(step))
    ema.update()
    ema.save(sys.argv[1] + "/ema.safetensors")
""",
    # All four in one process (one torch start per kill): the default test campaign.
    "torch-all": """
import os, sys, torch
from polyak.torch import EMA, CheckpointSaver, PostHocEMA
root = sys.argv[1]
os.makedirs(root + "/ema", exist_ok=True)
savers = [CheckpointSaver(root + "/st", format=".safetensors"), CheckpointSaver(root + "/pt", format=".pt")]
m = torch.nn.Linear(300, 300)
ema = EMA(m, decay=0.5)
posthoc = PostHocEMA(m, root + "/posthoc", every=1)  # a snapshot per width at every step
for epoch in range(10_000):
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float(epoch))
    for saver in savers:
        saver.save(m, epoch=epoch)
    ema.update()
    ema.save(root + "/ema/ema.safetensors")
    posthoc.update()
""",
    # Keras: CheckpointCallback (.keras and .weights.h5) saving at every epoch of a fit().
    "keras-all": """
import os, sys
os.environ.setdefault("KERAS_BACKEND", "torch")
import numpy as np, keras
from polyak.keras import CheckpointCallback
root = sys.argv[1]
m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(64), keras.layers.Dense(4)])
m.compile(optimizer="sgd", loss="mse")
x, y = np.ones((8, 8), "float32"), np.zeros((8, 4), "float32")
cbs = [CheckpointCallback(root + "/keras", format=".keras"), CheckpointCallback(root + "/weights", format=".weights.h5")]
m.fit(x, y, epochs=100_000, verbose=0, callbacks=cbs)
""",
}


def _all_temps(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if TEMP_MARK in p.name}


def _check_saver_file(path: Path) -> str | None:
    """A checkpoint left after a kill must be complete: it reads, and (torch scripts) every
    tensor is filled with the checkpoint's number."""
    import re as _re

    try:
        with polyak.open_source(path) as src:
            values = {float(np.asarray(src.read(n)).reshape(-1)[0]) for n in src.infos() if src.infos()[n].size}
            complete = all(np.all(np.asarray(src.read(n)) == np.asarray(src.read(n)).reshape(-1)[0]) for n in src.infos())
    except polyak.PolyakError as exc:
        return f"{path.name}: unreadable after a kill: {exc}"
    if path.name.endswith((".keras", ".weights.h5")):
        return None  # a Keras checkpoint: complete if every tensor reads (values change in fit)
    m = _re.search(r"_(\d+)\.", path.name)
    if m and values != {float(m.group(1))}:
        return f"{path.name}: holds {sorted(values)[:3]}, expected {m.group(1)}"
    if not complete or len(values) != 1:
        return f"{path.name}: mixed contents {sorted(values)[:3]}"
    return None


def _wait_for_saving(folder: Path, proc: subprocess.Popen[bytes], limit: float = 60) -> None:
    """Until the process has written its first checkpoint file (or exited)."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end and proc.poll() is None:
        if any(p.is_file() for p in folder.rglob("*")):
            return
        time.sleep(0.005)


def _saver_evidence(stats: KillStats) -> bool:
    """As :func:`_evidence`, and a checkpoint left by a killed saver was checked."""
    return _evidence(stats) and stats.outputs_complete >= 1


def run_saver_campaign(kind: str, folder: Path, *, kills: int, budget_s: float, seed: int = 0) -> KillStats:
    """Kill a process that keeps saving checkpoints (CheckpointSaver / EMA.save) at random times."""
    env = dict(os.environ)
    rng = random.Random(seed)
    stats = KillStats()
    t_start = time.perf_counter()
    out = folder / kind
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", SAVER_SCRIPTS[kind], str(out)]
    previous: set[str] = set()
    while (not _saver_evidence(stats) and stats.runs < MIN_RUNS_FOR_EVIDENCE) or (
            stats.kills < kills and time.perf_counter() - t_start < budget_s):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stats.runs += 1
        _wait_for_saving(out, proc)  # past the imports: saving has begun
        if _saver_evidence(stats):
            time.sleep(rng.uniform(0, 0.5))
        else:  # as in run_campaign: first a kill that leaves a temporary file next to a checkpoint
            end = time.perf_counter() + 5
            while proc.poll() is None and time.perf_counter() < end and not (
                    _all_temps(out) - previous and any(p.is_file() and TEMP_MARK not in p.name for p in out.rglob("*"))):
                time.sleep(0.0005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            stats.kills += 1
        else:
            stats.problems.append(f"{kind}: the saver exited: {proc.stderr.read().decode()[-300:] if proc.stderr else ''}")
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        temps = _all_temps(out)
        stats.temps_cleaned += len(previous - temps)
        stats.temps_seen += len(temps - previous)
        previous = temps
        files = [p for p in out.rglob("*") if p.is_file() and TEMP_MARK not in p.name]
        for p in files:
            problem = _check_saver_file(p)
            if problem:
                stats.problems.append(f"{kind}: {problem}")
        stats.outputs_complete += len(files)
        for p in files:  # start each run from an empty folder but the temps
            p.unlink()
    # The next saver (its constructor) or EMA.save removes what killed runs left.
    before = _all_temps(out)
    from polyak._atomic import cleanup_stale_temps
    from polyak.torch import CheckpointSaver

    for sub in {out, *(p for p in out.rglob("*") if p.is_dir())}:
        if sub.name in ("st", "pt") or kind in ("torch-safetensors", "torch-pt"):
            CheckpointSaver(sub)
        else:
            # What EMA.save -> polyak.save and CheckpointCallback.on_train_begin run first.
            cleanup_stale_temps(sub)
    after = _all_temps(out)
    stats.temps_cleaned += len(before - after)
    if after:
        stats.problems.append(f"{kind}: temporary files survived the next saver: {sorted(after)}")
    stats.seconds = time.perf_counter() - t_start
    return stats
