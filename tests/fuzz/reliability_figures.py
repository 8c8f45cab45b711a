"""Print the figures of docs/reliability.md: kills survived, mutated files tried, fuzz runs.

Usage::

    PYTHONPATH=src python tests/fuzz/reliability_figures.py [--kills 15] [--mutations 200]
        [--fuzz-log FILE]

* kills: the SIGKILL campaigns of tests/test_reliability_kill.py, ``--kills`` per campaign
  (4 campaigns, each bounded to 30 s), plus ``--kills // 3`` kills of a process saving
  torch checkpoints and EMA state and of a Keras fit() with CheckpointCallback;
* mutations: runs tests/test_hostile_mutations.py with ``POLYAK_MUTATIONS`` examples per
  sample format and reports how many mutated files were tried, read and refused;
* fuzz: the totals of an atheris run (``make fuzz 2>&1 | tee FILE``), read from its log.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path.insert(0, str(TESTS))


def kills(per_campaign: int) -> str:
    from _killharness import average_campaign, make_members, run_campaign, save_campaign

    folder = Path(tempfile.mkdtemp(prefix="polyak-kills-"))
    members = make_members(folder / "in")
    campaigns = [
        average_campaign(folder / "single", members),
        average_campaign(folder / "sharded", members, sharded=True),
        save_campaign(folder, ".safetensors"),
        save_campaign(folder, ".npz"),
    ]
    rows = ["| writer | kills | output absent / complete after a run | temps left / cleaned by the next run | problems |",
            "|---|---|---|---|---|"]
    total = 0
    problems = 0
    for i, c in enumerate(campaigns):
        s = run_campaign(c, kills=per_campaign, budget_s=30, seed=i)
        total += s.kills
        problems += len(s.problems)
        rows.append(f"| {c.name} | {s.kills} | {s.outputs_absent} / {s.outputs_complete} | {s.temps_seen} / {s.temps_cleaned} | {len(s.problems)} |")
        for p in s.problems:
            print("PROBLEM:", p, file=sys.stderr)
    saver_campaigns = [  # (framework, campaign, what the row says, time budget, seed)
        ("torch", "torch-all", "CheckpointSaver .safetensors + .pt, EMA.save (one process)", 120, 9),
        ("keras", "keras-all", "Keras CheckpointCallback .keras + .weights.h5 (one fit)", 180, 11),
    ]
    for framework, campaign, what, budget, seed in saver_campaigns:
        if importlib.util.find_spec(framework) is None:
            continue
        from _killharness import run_saver_campaign

        s = run_saver_campaign(campaign, folder / framework, kills=max(per_campaign // 3, 1), budget_s=budget, seed=seed)
        total += s.kills
        problems += len(s.problems)
        rows.append(
            f"| {what} | {s.kills} | {s.outputs_complete} checkpoints left, all complete | "
            f"{s.temps_seen} / {s.temps_cleaned} | {len(s.problems)} |"
        )
        for p in s.problems:
            print("PROBLEM:", p, file=sys.stderr)
    rows.append(f"| **total** | **{total}** | | | **{problems}** |")
    return "\n".join(rows)


def mutations(n: int) -> str:
    env = dict(os.environ, POLYAK_MUTATIONS=str(n))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS / "test_hostile_mutations.py"), "-q", "-s", "-p", "no:cacheprovider"],
        capture_output=True, text=True, env=env, check=False,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("[mutations]")), "")
    status = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    counts = dict(re.findall(r"'([\w-]+:\w+)': (\d+)", line))
    names = sorted({k.split(":")[0] for k in counts})
    rows = ["| sample | mutated files | read consistently | refused with a PolyakError |", "|---|---|---|---|"]
    for name in names:
        rows.append(f"| {name} | {counts.get(name + ':tried', 0)} | {counts.get(name + ':read', 0)} | {counts.get(name + ':refused', 0)} |")
    tried = sum(int(v) for k, v in counts.items() if k.endswith(":tried"))
    rows.append(f"| **total** | **{tried}** | | |")
    return "\n".join(rows) + f"\n\npytest: {status}"


def fuzz(log: Path) -> str:
    text = log.read_text(errors="replace")
    done = re.findall(r"Done (\d+) runs in (\d+) second", text)
    stats = [ln for ln in text.splitlines() if ln.startswith("[fuzz] {")]
    cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
    crash = re.findall(r"(ERROR: libFuzzer: \w+|Uncaught Python exception:.*)", text)
    out = []
    if done:
        out.append(f"atheris: {done[-1][0]} executions in {done[-1][1]} s")
    elif progress := re.findall(r"^#(\d+)\s", text, flags=re.M):
        out.append(f"atheris: stopped after about {progress[-1]} executions")
    if cov:
        out.append(f"final coverage: {cov[-1][0]} edges, {cov[-1][1]} features")
    if stats:
        out.append(f"last tally: {stats[-1][7:]}")
    out.append(f"findings: {crash if crash else 'none'}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=15, help="kills per campaign (4 campaigns)")
    ap.add_argument("--mutations", type=int, default=200, help="hypothesis examples per sample format")
    ap.add_argument("--fuzz-log", type=Path, help="log of an atheris run (make fuzz 2>&1 | tee FILE)")
    args = ap.parse_args(argv)
    print("## kills\n")
    print(kills(args.kills))
    print("\n## mutations\n")
    print(mutations(args.mutations))
    if args.fuzz_log:
        print("\n## fuzz\n")
        print(fuzz(args.fuzz_log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
