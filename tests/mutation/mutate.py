"""``make mutate``: mutation testing of polyak's core modules, scored per module.

mutmut (pinned in constraints.txt, configured in ``[tool.mutmut]`` of pyproject.toml)
changes one operator, constant, argument or string at a time in the modules below and runs
the in-process tests that reach the changed function (less the training-loop integration
tests, see ``SLOW_INDIRECT``); a change that no test notices *survives*. The score of a module is

    killed / (mutants − equivalent mutants)

where a mutant counts as killed when a test failed, errored or timed out under it, and the
equivalent mutants are the surviving ones listed in ``tests/mutation/equivalent.toml``,
each with the reason it cannot change what a user sees (see the rule there).

The run is bounded and resumable: it stops after ``--budget`` seconds (mutmut keeps every
verdict it reached), and the next run checks only the mutants without one (new or changed
functions get fresh mutants). ``--rerun`` checks the survivors again (after tests were
added), except those listed as equivalent. Add ``--remap`` then: mutmut maps tests to the
functions they reach once, and its update for new tests missed some of them (mutmut 3.8.1),
so ``--remap`` maps every test again, keeping the verdicts. ``--fresh`` starts over.

Usage (from the repository root, with the dev environment)::

    make mutate                                   # every module, 1 core, 3 h at most
    make mutate MODULES="schemes kernel" MUTATE_BUDGET=900
    POLYAK_IN_PROCESS_ONLY=1 .venv/bin/python tests/mutation/mutate.py --modules schemes --rerun

Exit status: 0 when every module selected is fully checked and scores at least
``--min-score``; 1 when one scores below it (or an exclusion no longer matches its mutant);
2 when the budget ran out before every mutant was checked.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).with_name("equivalent.toml")

#: module → (source file, mutant-name patterns). For the format readers only the functions
#: that check what a file claims are mutated; their writers are covered by round trips.
MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "schemes": ("src/polyak/_schemes.py", ("polyak._schemes.*",)),
    "schedules": ("src/polyak/_schedules.py", ("polyak._schedules.*",)),
    "kernel": ("src/polyak/_engine/kernel.py", ("polyak._engine.kernel.*",)),
    "stream": ("src/polyak/_engine/stream.py", ("polyak._engine.stream.*",)),
    "members": ("src/polyak/_engine/members.py", ("polyak._engine.members.*",)),
    "layout": ("src/polyak/_layout.py", ("polyak._layout.*",)),
    "online": ("src/polyak/_online.py", ("polyak._online.*",)),
    "retention": ("src/polyak/_retention.py", ("polyak._retention.*",)),
    "atomic": ("src/polyak/_atomic.py", ("polyak._atomic.*",)),
    "safetensors-checks": ("src/polyak/formats/safetensors.py", (
        "polyak.formats.safetensors.x__parse_header__*",
        "polyak.formats.safetensors.xǁSafetensorsSourceǁ__init____*",
        "polyak.formats.safetensors.xǁSafetensorsIndexSourceǁ__init____*",
        "polyak.formats.safetensors.xǁSafetensorsIndexSourceǁ_check_total_size__*",
    )),
    "npz-checks": ("src/polyak/formats/npz.py", (
        "polyak.formats.npz.x__read_npy_header__*",
        "polyak.formats.npz.x__string_map__*",
        "polyak.formats.npz.xǁNpzSourceǁ__init____*",
        "polyak.formats.npz.xǁNpzSourceǁread__*",
    )),
    "h5-checks": ("src/polyak/formats/_h5.py", (
        "polyak.formats._h5.x_check_dataset__*",
        "polyak.formats._h5.x__link_kind__*",
        "polyak.formats._h5.x_walk__*",
        "polyak.formats._h5.x_read_attr_list__*",
        "polyak.formats._h5.x_dataset_dtype__*",
    )),
    "keras-checks": ("src/polyak/formats/keras_archive.py", (
        "polyak.formats.keras_archive.x_read_member__*",
        "polyak.formats.keras_archive.x__data_offset__*",
    )),
    "torch-checks": ("src/polyak/formats/torch_pt.py", (
        "polyak.formats.torch_pt.x__check_archive__*",
        "polyak.formats.torch_pt.x_load_state__*",
        "polyak.formats.torch_pt.x__named__*",
        "polyak.formats.torch_pt.x__flatten__*",
        "polyak.formats.torch_pt.x__check_dense__*",
    )),
    "zip-checks": ("src/polyak/formats/_common.py", (
        "polyak.formats._common.x_check_zip__*",
        "polyak.formats._common.x_reject_key__*",
    )),
    "json": ("src/polyak/_json.py", ("polyak._json.*",)),
}

# exit codes of mutmut's per-mutant test run (mutmut.stats.status_by_exit_code)
# (-1: the test process died of SIGHUP, which only a mutant sends: `os.kill(pid, 1)` for 0)
KILLED = {1, 3, -24, 24, 152, 255, 36, -11, -9, -1}  # failed, internal error, timeout, crash
SURVIVED = {0}
NO_TESTS = {5, 33}


@dataclass
class Score:
    module: str
    total: int = 0
    killed: int = 0
    equivalent: list[str] = field(default_factory=list)
    survived: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    other: dict[str, int] = field(default_factory=dict)  # exit code → count (interrupted, ...)

    @property
    def counted(self) -> int:
        return self.total - len(self.equivalent)

    @property
    def score(self) -> float:
        return 100.0 * self.killed / self.counted if self.counted else 100.0


def meta_path(source: str) -> Path:
    return ROOT / "mutants" / (source + ".meta")


def verdicts(source: str) -> dict[str, int | None]:
    p = meta_path(source)
    if not p.exists():
        return {}
    return json.loads(p.read_text())["exit_code_by_key"]


def selected(module: str) -> dict[str, int | None]:
    source, patterns = MODULES[module]
    return {k: v for k, v in verdicts(source).items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


GENERATE = """
import os
from mutmut.__main__ import copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths
from mutmut.mutation.trampoline import set_mutant_under_test
set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
copy_src_dir()
copy_also_copy_files()
setup_source_paths()
create_mutants(1)
"""


def generate() -> None:
    """Create or refresh the mutants (only changed functions get new, unchecked ones)."""
    subprocess.run([sys.executable, "-c", GENERATE], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


#: module → the test files that aim at it; their tests run first under a mutant of it.
FOCUS: dict[str, tuple[str, ...]] = {
    "schemes": ("test_schemes.py", "test_average.py"),
    "schedules": ("test_schedules.py", "test_posthoc_math.py", "test_torch_ema.py"),
    "kernel": ("test_kernel.py", "test_reliability_numerics.py", "test_average.py"),
    "stream": ("test_reliability_output.py", "test_hostile_outputs.py", "test_average.py", "test_parallel.py"),
    "members": ("test_members.py", "test_member_order.py", "test_reliability_errors.py", "test_hf_folders.py"),
    "layout": ("test_layout.py", "test_torch_layout.py", "test_keras_layout.py"),
    "online": ("test_online.py", "test_torch_ema.py", "test_keras_ema.py"),
    "retention": ("test_retention.py",),
    "atomic": ("test_atomic.py", "test_reliability_output.py", "test_hostile_outputs.py"),
    "json": ("test_json.py", "test_hostile_json.py"),
    **{m: ("test_reader_checks.py", "test_hostile_broken.py", "test_hostile_files.py", "test_hostile_bombs.py",
           "test_hostile_json.py", "test_formats.py")
       for m in ("safetensors-checks", "npz-checks", "zip-checks", "torch-checks")},
    **{m: ("test_reader_checks.py", "test_keras_formats.py", "test_keras_load.py", "test_hostile_broken.py",
           "test_hostile_files.py", "test_hostile_bombs.py", "test_formats.py")
       for m in ("h5-checks", "keras-checks")},
}

#: Test files left out of every module's run unless they are among its FOCUS files: the
#: training-loop integrations (Trainer, Lightning, Keras fits, post-hoc capture), the demo
#: and the doctests reach the core only through the calls the other tests make, at ten
#: times their cost; a mutant survives at the cost of every test it meets, so leaving
#: them out makes the whole run fit in an afternoon. A score without them can only be lower.
SLOW_INDIRECT = (
    "test_transformers.py", "test_lightning.py", "test_doctests.py", "test_demo_backend.py", "test_keras_api.py",
    "test_keras_ema.py", "test_keras_posthoc.py", "test_keras_formats.py", "test_keras_load.py",
    "test_keras_layout.py", "test_posthoc_torch.py", "test_sweep_cli.py", "test_reproduce_ema.py",
)

# mutmut runs a mutant's tests with ``-x`` in the order it is given them, which is a set's
# order. A mutant that a test kills is done at that test, so the wrapper below hands them
# over as: the tests of the mutated module's FOCUS files first, then the rest, each group
# fastest first, without the SLOW_INDIRECT files. Survivors run every test handed over.
LAUNCH = """
import fnmatch, json, sys
import mutmut.workers.isolation as isolation
from mutmut.state import state

focus, slow = json.loads(sys.argv.pop(1))

def file_of(test):
    return test.split("::")[0].rsplit("/", 1)[-1]

def ordered(name, tests):
    files = next((f for pats, f in focus if any(fnmatch.fnmatchcase(name, p) for p in pats)), [])
    duration = state().duration_by_test
    kept = [t for t in tests if file_of(t) in files or file_of(t) not in slow]
    return sorted(kept, key=lambda t: (file_of(t) not in files, duration.get(t, 0.0), t))

for cls in (isolation.MutantRunner, *isolation.MutantRunner.__subclasses__()):
    if "submit" in vars(cls) and not getattr(cls.submit, "__isabstractmethod__", False):
        def submit(self, name, tests, limit, estimated, _orig=cls.submit):
            return _orig(self, name, ordered(name, tests), limit, estimated)
        cls.submit = submit

from mutmut.__main__ import cli
sys.argv[0] = "mutmut"
cli()
"""


def run_mutmut(names: list[str], *, jobs: int, budget: float, log: Path) -> bool:
    """Check ``names`` with mutmut within ``budget`` seconds; False when stopped by it."""
    env = {**os.environ, "POLYAK_IN_PROCESS_ONLY": "1"}
    focus = json.dumps([[[list(MODULES[m][1]), list(FOCUS.get(m, ()))] for m in MODULES], list(SLOW_INDIRECT)])
    with log.open("a") as out:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, focus, "run", "--max-children", str(jobs), *names],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=budget)
            return True
        except subprocess.TimeoutExpired:
            # mutmut saves each verdict as it comes; the mutants in flight stay unchecked.
            # (SIGINT would reach the test run in flight and be recorded as its verdict.)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return False


def added_lines(name: str, source: str) -> str:
    """The mutated line(s) of a mutant, stripped and joined by `` / ``."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        diff = get_diff_for_mutant(name, path=source)
    finally:
        os.chdir(cwd)
    return " / ".join(line[1:].strip() for line in diff.splitlines()
                      if line.startswith("+") and not line.startswith("+++"))


def load_equivalent() -> dict[str, dict[str, str]]:
    data = tomllib.loads(EQUIVALENT.read_text()) if EQUIVALENT.exists() else {}
    return {e["name"]: e for e in data.get("mutant", [])}


def score(module: str, equivalent: dict[str, dict[str, str]], problems: list[str]) -> Score:
    source, _ = MODULES[module]
    s = Score(module)
    for name, code in sorted(selected(module).items()):
        s.total += 1
        if code is None:
            s.unchecked.append(name)
        elif code in KILLED:
            s.killed += 1
            if name in equivalent:
                problems.append(f"{name} is listed as equivalent but a test kills it: remove the entry")
        elif code in SURVIVED or code in NO_TESTS:
            entry = equivalent.get(name)
            if entry is None:
                s.survived.append(name)
            elif added_lines(name, source) != entry["mutated"]:
                problems.append(f"{name}: equivalent.toml says `{entry['mutated']}`, the mutant now is "
                                f"`{added_lines(name, source)}`: the entry is stale")
                s.survived.append(name)
            else:
                s.equivalent.append(name)
        else:
            s.other[str(code)] = s.other.get(str(code), 0) + 1
            s.survived.append(name)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default="", help=f"space- or comma-separated, of: {' '.join(MODULES)} (default: all)")
    ap.add_argument("--budget", type=float, default=3 * 3600, help="seconds of mutation testing at most (default 3 h)")
    ap.add_argument("--jobs", type=int, default=1, help="mutants checked at once (default 1)")
    ap.add_argument("--min-score", type=float, default=90.0, help="the score each module must reach (default 90)")
    ap.add_argument("--rerun", action="store_true", help="check the surviving mutants again (not those listed as equivalent)")
    ap.add_argument("--remap", action="store_true", help="map every test to the functions it reaches again")
    ap.add_argument("--fresh", action="store_true", help="forget every verdict and start over")
    ap.add_argument("--report-only", action="store_true", help="print the scores of the verdicts so far")
    ap.add_argument("--show", type=int, default=20, help="surviving mutants to print per module (default 20)")
    ap.add_argument("--json", type=Path, help="also write the scores to this file")
    args = ap.parse_args(argv)
    modules = [m for m in args.modules.replace(",", " ").split() if m] or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        ap.error(f"unknown modules {unknown}; valid: {' '.join(MODULES)}")

    finished = True
    if not args.report_only:
        if args.fresh:
            shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        elif args.remap:
            (ROOT / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
        generate()
        listed = load_equivalent()  # survivors by definition: --rerun does not spend time on them
        todo = [k for m in modules for k, v in selected(m).items()
                if v is None or (args.rerun and (v in SURVIVED or v in NO_TESTS) and k not in listed)]
        log = ROOT / "mutants" / "mutate.log"
        print(f"checking {len(todo)} mutants of {', '.join(modules)} (budget {args.budget:.0f} s, log {log})",
              flush=True)
        if todo:
            start = time.monotonic()
            finished = run_mutmut(todo, jobs=args.jobs, budget=args.budget, log=log)
            print(f"mutmut ran {time.monotonic() - start:.0f} s" + ("" if finished else ", stopped by the budget"))

    equivalent = load_equivalent()
    problems: list[str] = []
    scores = [score(m, equivalent, problems) for m in modules]
    print()
    print(f"{'module':<20} {'mutants':>7} {'equiv.':>6} {'killed':>6} {'survived':>8} {'unchecked':>9} {'score':>7}")
    for s in scores:
        print(f"{s.module:<20} {s.total:>7} {len(s.equivalent):>6} {s.killed:>6} {len(s.survived):>8} "
              f"{len(s.unchecked):>9} {s.score:>6.1f}%" + (f"  (other exit codes: {s.other})" if s.other else ""))
    for s in scores:
        if s.survived and args.show:
            print(f"\n{s.module}: surviving mutants (`.venv/bin/mutmut show NAME` for the diff)")
            for name in s.survived[: args.show]:
                print(f"  {name}: {added_lines(name, MODULES[s.module][0])}")
            if len(s.survived) > args.show:
                print(f"  ... and {len(s.survived) - args.show} more")
    for p in problems:
        print(f"problem: {p}")
    if args.json:
        args.json.write_text(json.dumps([{"module": s.module, "mutants": s.total, "equivalent": len(s.equivalent),
                                          "killed": s.killed, "survived": len(s.survived),
                                          "unchecked": len(s.unchecked), "score": round(s.score, 1)}
                                         for s in scores], indent=1))
    if not finished or any(s.unchecked for s in scores):
        print("\nnot every mutant was checked: run again to continue")
        return 2
    low = [s.module for s in scores if s.score < args.min_score]
    if low:
        print(f"\nbelow {args.min_score:g} %: {', '.join(low)}")
    return 1 if low or problems else 0


if __name__ == "__main__":
    sys.exit(main())
