"""polyak.lightning.EMACallback under strategy="ddp" and FSDP2 on 2 CPU processes (gloo).

One launch of tests/_lightning_dist_scenario.py (Lightning starts the second process
itself) runs DDP, FSDP2 with a resume, and Lightning's own EMAWeightAveraging under FSDP2;
its results are compared here with the same training in one process (batch 8 = 2 × 4).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning.pytorch")
if not torch.distributed.is_available():  # pragma: no cover - builds without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import _lightning_dist_scenario as scenario  # noqa: E402
import polyak  # noqa: E402
from _lightning_helpers import LIGHTNING_NOISE, Net, data, trainer  # noqa: E402
from _one_thread import one_torch_thread  # noqa: E402, F401
from polyak.lightning import EMACallback  # noqa: E402

pytestmark = [*(pytest.mark.filterwarnings(f) for f in LIGHTNING_NOISE), pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).parent / "_lightning_dist_scenario.py"), str(out)]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if first.returncode == 0:
        return out
    # One retry: a rendezvous can fail on a loaded machine; a real bug fails twice.
    for p in list(out.iterdir()):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, f"first try:\n{first.stderr[-3000:]}\nsecond try:\n{again.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cb, net = EMACallback(decay=scenario.DECAY), Net()
    trainer(tmp_path_factory.mktemp("one"), [cb]).fit(net, data(2 * scenario.PER_RANK_BATCH, like_ddp=True),
                                                        data(2 * scenario.PER_RANK_BATCH, n=8))
    return {"ema": {k: v.clone() for k, v in cb.ema.state.tensors.items()}, "validated_on": net.seen_in_validation[-1],
            "step": cb.ema.state.step}


def _close(got, want, atol):
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(torch.as_tensor(np.asarray(got[k])), want[k], rtol=1e-5, atol=atol, msg=k)


def test_ddp_every_rank_keeps_the_one_process_average(launched, one_process):
    r0, r1 = (torch.load(launched / f"ddp_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["ema"][k], r1["ema"][k]) for k in r0["ema"])  # identical replicas, no communication
    _close(r0["ema"], one_process["ema"], atol=1e-6)
    _close(r0["validated_on"], one_process["validated_on"], atol=1e-6)  # validation ran on the average
    assert all(torch.equal(r0["module"][k], v) for k, v in r0["ema"].items())  # and fit ended with it
    report = json.loads((launched / "report0.json").read_text())["ddp"]
    assert report == {"world": 2, "step": one_process["step"], "count": one_process["step"]}
    # rank 0 wrote the checkpoint, with the average in it
    ckpt = torch.load(launched / "ddp" / "epoch=1-step=6.ckpt", weights_only=True)
    assert all(torch.equal(ckpt["state_dict_ema"][k], v) for k, v in r0["ema"].items())
    assert ckpt["callbacks"]["EMACallback"]["count"] == 6


def test_fsdp2_keeps_shards_checkpoints_whole_tensors_and_resumes(launched, one_process):
    reports = [json.loads((launched / f"report{r}.json").read_text()) for r in (0, 1)]
    # each rank averaged its own shards (Linear(8, 3) split 2 + 1 rows)
    assert reports[0]["local_shapes"]["model.2.weight"] == [2, 8]
    assert reports[1]["local_shapes"]["model.2.weight"] == [1, 8]
    # the distributed checkpoint (a folder) holds the whole averaged tensors in its metadata file
    meta = torch.load(launched / "fsdp" / "epoch=0-step=3.ckpt" / "meta.pt", weights_only=True)
    assert {k: list(v.shape) for k, v in meta["state_dict_ema"].items()} == {
        "model.0.weight": [8, 5], "model.0.bias": [8], "model.2.weight": [3, 8], "model.2.bias": [3]}
    # resumed from it (settings from the checkpoint), the second epoch ends at the one-process average
    for r in (0, 1):
        assert reports[r]["fsdp"] == {"step": 6, "count": 6, "decay": scenario.DECAY, "validated_on_ema": True,
                                      "module_holds_ema": True}
    _close(polyak.average([launched / "fsdp_ema.safetensors"]), one_process["ema"], atol=1e-5)


def test_lightning_own_callback_refuses_the_sharded_model(launched):
    report = json.loads((launched / "report0.json").read_text())
    assert report["lightning_fsdp2"].startswith("AssertionError: FSDP does not support deepcopy")
