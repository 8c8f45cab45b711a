"""SIGKILL writers at random points: inputs intact, output absent or complete, temps cleaned.

The campaigns (``tests/_killharness.py``) kill ``polyak average`` (single file and sharded)
and ``polyak.save`` (safetensors and npz) in subprocesses, at random times over a measured
run or over its write phase. ``POLYAK_KILLS`` scales the number of kills per campaign
(default 12, at most ``POLYAK_KILL_BUDGET_S`` = 4 s per campaign: about 40 kills in
~15 s on 2 cores). Run with ``-s`` to print the counts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from _killharness import (
    average_campaign,
    make_members,
    run_campaign,
    run_saver_campaign,
    save_campaign,
)

KILLS = int(os.environ.get("POLYAK_KILLS", "12"))
BUDGET_S = float(os.environ.get("POLYAK_KILL_BUDGET_S", "4"))
#: Each saver run starts torch (~2 s): a few kills only, unless asked for more.
SAVER_KILLS = int(os.environ.get("POLYAK_SAVER_KILLS", "2"))

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


@pytest.mark.parametrize(
    ("campaign", "kills"),
    [("average", KILLS), ("average-sharded", KILLS), ("save-safetensors", KILLS // 2 + 1), ("save-npz", KILLS // 2 + 1)],
)
def test_sigkill_leaves_inputs_intact_and_output_absent_or_complete(tmp_path: Path, campaign: str, kills: int) -> None:
    members = make_members(tmp_path / "in")
    if campaign == "average":
        c = average_campaign(tmp_path, members)
    elif campaign == "average-sharded":
        c = average_campaign(tmp_path, members, sharded=True)
    elif campaign == "save-safetensors":
        c = save_campaign(tmp_path, ".safetensors")
    else:
        c = save_campaign(tmp_path, ".npz")
    stats = run_campaign(c, kills=kills, budget_s=BUDGET_S, seed=sum(map(ord, campaign)))
    print(f"\n[kills] {c.name}: {stats}")
    assert stats.problems == []
    # Nothing here may pass on 0 == 0: the campaign really killed writers (how many fit in
    # the budget depends on the load), at least one kill left a temporary file, and the
    # next run removed every one of them; every run ended with an output or none, checked.
    assert stats.kills >= 1 and stats.temps_seen >= 1
    assert stats.temps_cleaned == stats.temps_seen
    assert stats.outputs_complete + stats.outputs_absent == stats.runs


def test_sigkill_checkpoint_saver_and_ema_state(tmp_path: Path) -> None:
    """A process saving checkpoints (CheckpointSaver), EMA state and post-hoc EMA snapshots in a loop, killed while
    saving: every file left is complete, and the next saver removes the temporary files."""
    pytest.importorskip("torch")
    kind = "torch-all"  # CheckpointSaver .safetensors and .pt, EMA.save, PostHocEMA, in one process
    stats = run_saver_campaign(kind, tmp_path, kills=SAVER_KILLS, budget_s=BUDGET_S * 2, seed=3)
    print(f"\n[kills] {kind}: {stats}")
    assert stats.problems == []
    assert stats.kills >= 1 and stats.temps_seen >= 1  # see above: never 0 == 0
    assert stats.temps_cleaned == stats.temps_seen
    assert stats.outputs_complete >= 1  # checkpoints left by the killed runs were checked
