"""polyak.lightning.EMACallback in real (tiny, one-process) Lightning runs.

Against Lightning's own EMAWeightAveraging, a closed form, exact resume, gradient
accumulation, evaluation on the average, checkpoints and the ModelCheckpoint → polyak
average recipe. The DDP and FSDP2 runs are in test_lightning_distributed.py.
"""

from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint  # noqa: E402

import polyak  # noqa: E402
import polyak.lightning  # noqa: E402
from _lightning_helpers import LIGHTNING_NOISE, N, Net, Probe, data, trainer  # noqa: E402
from _one_thread import one_torch_thread  # noqa: E402, F401
from polyak import ConfigError, FormatError  # noqa: E402
from polyak.cli import main as cli  # noqa: E402
from polyak.lightning import EMACallback  # noqa: E402

pytestmark = [*(pytest.mark.filterwarnings(f) for f in LIGHTNING_NOISE), pytest.mark.usefixtures("one_torch_thread")]
# Resuming without the ModelCheckpoint that wrote the file, or into another folder, is what
# these tests mean to do.
_RESUMING = ("ignore:Be aware that when using `ckpt_path`.*", "ignore:The dirpath has changed.*")


def resuming(test):
    for f in _RESUMING:
        test = pytest.mark.filterwarnings(f)(test)
    return test


def _floats(state):
    return {k: v for k, v in state.items() if v.is_floating_point()}


def _ema_closed_form(steps, decay):
    """First averaged step copies, then avg ← d·avg + (1 − d)·x (float64)."""
    avg = {k: v.double() for k, v in _floats(steps[0]).items()}
    for x in steps[1:]:
        avg = {k: decay * a + (1 - decay) * x[k].double() for k, a in avg.items()}
    return avg


@pytest.mark.parametrize(
    ("theirs", "ours", "accumulate"),
    [
        ({"decay": 0.8}, {"decay": 0.8}, 1),
        ({"decay": 0.8}, {"decay": 0.8}, 3),  # gradient accumulation: one update per optimizer step
        ({"decay": 0.7, "update_every_n_steps": 3}, {"decay": 0.7, "every": 3, "start": 1}, 1),
        ({"decay": 0.7, "update_starting_at_step": 4}, {"decay": 0.7, "start": 5}, 1),
    ],
    ids=["defaults", "accumulate", "every", "start"],
)
def test_equals_lightning_ema_weight_averaging(tmp_path, theirs, ours, accumulate):
    net_a, net_b = Net(bn=True), Net(bn=True)
    ref = EMAWeightAveraging(**theirs)
    probe = Probe()
    trainer(tmp_path / "a", [ref], accumulate_grad_batches=accumulate).fit(net_a, data())
    cb = EMACallback(**ours, apply_at_end=False)
    trainer(tmp_path / "b", [probe, cb], accumulate_grad_batches=accumulate).fit(net_b, data())
    steps = 2 * N // 4 // accumulate
    assert len(probe.steps) == steps and cb.ema.state.step == steps
    # Lightning's module now holds its average (copied at the end of fit); ours kept the raw weights
    theirs_avg = net_a.state_dict()
    raw = net_b.state_dict()
    assert any(not torch.allclose(theirs_avg[k], raw[k], atol=1e-3) for k in _floats(raw))
    for name, mine in cb.ema.state.tensors.items():
        if mine.is_floating_point():
            torch.testing.assert_close(mine, theirs_avg[name], rtol=0, atol=1e-6, msg=name)
    # num_batches_tracked is copied (the live count at the last update), where AveragedModel's
    # EMA truncates it
    last = steps if "every" not in ours else steps - (steps - ours["start"]) % ours["every"]
    assert int(cb.ema.state.tensors["model.1.num_batches_tracked"]) == int(probe.steps[last - 1]["model.1.num_batches_tracked"])
    assert int(theirs_avg["model.1.num_batches_tracked"]) < int(raw["model.1.num_batches_tracked"])


def test_closed_form_validation_on_the_average_and_raw_weights_kept(tmp_path):
    d = 0.75
    probe, cb = Probe(), EMACallback(decay=d)
    net = Net()
    trainer(tmp_path, [probe, cb], max_epochs=3).fit(net, data(), data(n=8))
    per_epoch = N // 4
    # validation after epoch e saw the average of the raw weights of steps 1 .. (e+1)·per_epoch
    assert len(net.seen_in_validation) == 3
    for e, seen in enumerate(net.seen_in_validation):
        expected = _ema_closed_form(probe.steps[: (e + 1) * per_epoch], d)
        for k, v in expected.items():
            torch.testing.assert_close(seen[k].double(), v, rtol=1e-6, atol=1e-6, msg=k)
    # the end of fit left the average in the module
    final = _ema_closed_form(probe.steps, d)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v.double(), final[k], rtol=1e-6, atol=1e-6, msg=k)
    # and training ran on the raw weights: the same run without validation ends identical
    probe2 = Probe()
    trainer(tmp_path / "noval", [probe2, EMACallback(decay=d)], max_epochs=3).fit(Net(), data())
    for a, b in zip(probe.steps, probe2.steps, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_apply_at_end_false_and_eval_with_ema_false_keep_raw_weights(tmp_path):
    probe, cb = Probe(), EMACallback(decay=0.5, eval_with_ema=False, apply_at_end=False)
    net = Net()
    trainer(tmp_path, [probe, cb], max_epochs=1).fit(net, data(), data(n=8))
    assert all(torch.equal(net.seen_in_validation[0][k], probe.steps[-1][k]) for k in probe.steps[-1])
    assert all(torch.equal(v, probe.steps[-1][k]) for k, v in net.state_dict().items())
    assert not torch.allclose(cb.ema.state.tensors["model.0.weight"], probe.steps[-1]["model.0.weight"], atol=1e-4)


def test_a_failing_validation_gives_back_the_raw_weights(tmp_path):
    probe, cb = Probe(), EMACallback(decay=0.5, apply_at_end=True)
    net = Net()
    net.fail_in_validation_at = 2
    with pytest.raises(RuntimeError, match="validation failed on purpose"):
        trainer(tmp_path, [probe, cb], max_epochs=3).fit(net, data(), data(n=8))
    assert len(probe.steps) == 2 * N // 4
    assert all(torch.equal(v, probe.steps[-1][k]) for k, v in net.state_dict().items())


def _checkpointing(root, **kw):
    ckpt = ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1, **kw)
    return ckpt


@resuming
def test_two_epochs_plus_resume_equals_three_straight_epochs_exactly(tmp_path):
    opts = {"enable_checkpointing": True}
    straight_cb, straight = EMACallback(decay=0.8, warmup="timm"), Net(bn=True)
    trainer(tmp_path / "a", [straight_cb, _checkpointing(tmp_path / "a")], max_epochs=3, **opts).fit(
        straight, data(), data(n=8))
    ckpt = tmp_path / "a" / "epoch=1-step=12.ckpt"
    assert ckpt.is_file()
    resumed_cb, resumed = EMACallback(decay=0.5), Net(bn=True, seed=7)  # settings come from the checkpoint
    trainer(tmp_path / "b", [resumed_cb, _checkpointing(tmp_path / "b")], max_epochs=3, **opts).fit(
        resumed, data(), data(n=8), ckpt_path=ckpt)
    assert resumed_cb.ema.state.step == straight_cb.ema.state.step == 18
    assert resumed_cb.ema.state.count == straight_cb.ema.state.count == 18
    assert resumed_cb.schedule == straight_cb.schedule
    for k, v in straight_cb.ema.state.tensors.items():
        assert torch.equal(resumed_cb.ema.state.tensors[k], v), k
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in straight.state_dict().items())
    # validation of the resumed epoch ran on the same average
    assert all(torch.equal(resumed.seen_in_validation[-1][k], v) for k, v in straight.seen_in_validation[-1].items())


def test_checkpoint_layout_and_the_ema_in_it(tmp_path):
    cb = EMACallback(decay=0.8)
    trainer(tmp_path, [cb, _checkpointing(tmp_path)], max_epochs=2, enable_checkpointing=True).fit(Net(bn=True), data())
    ckpt = torch.load(tmp_path / "epoch=1-step=12.ckpt", weights_only=True)
    state = ckpt["callbacks"]["EMACallback"]
    assert (state["kind"], state["step"], state["count"]) == ("ema", 12, 12)
    assert state["config"]["schedule"]["decay"] == 0.8
    ema = ckpt["state_dict_ema"]
    assert sorted(ema) == sorted(ckpt["state_dict"])  # named as the module's state_dict
    for k, v in cb.ema.state.tensors.items():
        assert torch.equal(ema[k], v)
    # the raw weights stay under "state_dict": they differ from the average
    assert not torch.allclose(ckpt["state_dict"]["model.0.weight"], ema["model.0.weight"], atol=1e-4)
    # polyak reads the average out of the .ckpt
    out = tmp_path / "ema.safetensors"
    assert cli(["average", str(tmp_path / "epoch=1-step=12.ckpt"), "--key", "state_dict_ema",
                "--strip-prefix", "model.", "-o", str(out), "-q"]) == 0
    got = polyak.average([out])
    for k, v in ema.items():
        np.testing.assert_array_equal(got[k.removeprefix("model.")], v.numpy())


@resuming
def test_test_and_validate_with_ckpt_path_run_on_the_checkpoints_average(tmp_path):
    cb = EMACallback(decay=0.8, apply_at_end=False)
    trainer(tmp_path, [cb, _checkpointing(tmp_path)], max_epochs=2, enable_checkpointing=True).fit(Net(), data())
    ckpt = tmp_path / "epoch=0-step=6.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    fresh = Net(seed=3)
    t = trainer(tmp_path / "t", [EMACallback(decay=0.1)])
    t.test(fresh, data(n=8), ckpt_path=ckpt, verbose=False)
    t.validate(fresh, data(n=8), ckpt_path=ckpt, verbose=False)
    for seen in (fresh.seen_in_test[0], fresh.seen_in_validation[0]):
        assert all(torch.equal(seen[k], v) for k, v in saved["state_dict_ema"].items())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved["state_dict"].items())  # swapped back


def test_modelcheckpoint_files_feed_polyak_average(tmp_path):
    """The recipe of docs/lightning.md: every epoch's .ckpt, averaged with --key state_dict."""
    trainer(tmp_path, [_checkpointing(tmp_path)], max_epochs=3, enable_checkpointing=True).fit(Net(bn=True), data())
    files = sorted(tmp_path.glob("epoch=*.ckpt"))
    assert [f.name for f in files] == ["epoch=0-step=6.ckpt", "epoch=1-step=12.ckpt", "epoch=2-step=18.ckpt"]
    out = tmp_path / "avg.safetensors"
    # linear weights 1, 2, 3 (oldest → newest): the order matters, and comes from the numbers
    assert cli(["average", *map(str, reversed(files)), "--key", "state_dict", "--strip-prefix", "model.",
                "--scheme", "linear", "-o", str(out), "-q"]) == 0
    states = [torch.load(f, weights_only=True)["state_dict"] for f in files]
    net = Net(bn=True).model
    got = polyak.average([out])
    assert sorted(got) == sorted(k for k in net.state_dict())
    for name in got:
        vals = [s[f"model.{name}"] for s in states]
        if vals[0].is_floating_point():
            expected = sum(w * v.double() for w, v in zip((1, 2, 3), vals, strict=True)) / 6
            np.testing.assert_allclose(got[name], expected.numpy(), rtol=1e-6, atol=1e-7)
        else:  # num_batches_tracked: copied from the newest
            assert int(got[name]) == int(vals[-1]) == 18
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in got.items()})


@resuming
def test_resume_without_ema_state_warns_and_starts_from_the_weights(tmp_path):
    trainer(tmp_path / "a", [_checkpointing(tmp_path / "a")], max_epochs=1, enable_checkpointing=True).fit(Net(), data())
    cb = EMACallback(decay=0.8)
    with pytest.warns(UserWarning, match="holds no EMA state"):
        trainer(tmp_path / "b", [cb], max_epochs=2).fit(Net(), data(), ckpt_path=tmp_path / "a" / "epoch=0-step=6.ckpt")
    assert cb.ema.state.step == 12 and cb.ema.state.count == 6


@resuming
def test_an_incomplete_ema_state_is_refused(tmp_path):
    trainer(tmp_path / "a", [EMACallback(decay=0.8), _checkpointing(tmp_path / "a")], max_epochs=1,
            enable_checkpointing=True).fit(Net(), data())
    ckpt = torch.load(tmp_path / "a" / "epoch=0-step=6.ckpt", weights_only=True)
    del ckpt["state_dict_ema"]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(FormatError, match=r"broken\.ckpt: the EMA state is incomplete: no 'state_dict_ema'"):
        trainer(tmp_path / "b", [EMACallback(decay=0.8)], max_epochs=2).fit(Net(), data(), ckpt_path=tmp_path / "broken.ckpt")


def test_two_named_callbacks_keep_two_averages(tmp_path):
    fast, slow = EMACallback(decay=0.5, name="fast", apply_at_end=False), EMACallback(decay=0.9, name="slow")
    trainer(tmp_path, [fast, slow, _checkpointing(tmp_path)], max_epochs=1, enable_checkpointing=True).fit(Net(), data())
    ckpt = torch.load(tmp_path / "epoch=0-step=6.ckpt", weights_only=True)
    assert {"state_dict_ema_fast", "state_dict_ema_slow"} <= set(ckpt)
    assert ckpt["callbacks"][fast.state_key]["config"]["schedule"]["decay"] == 0.5
    assert ckpt["callbacks"][slow.state_key]["config"]["schedule"]["decay"] == 0.9


def test_options_are_checked_at_construction():
    with pytest.raises(ConfigError, match=r"decay must be in \[0, 1\)"):
        EMACallback(decay=1.5)
    with pytest.raises(ConfigError, match="exactly one of decay=, half_life= or sigma_rel="):
        EMACallback()
    with pytest.raises(ConfigError, match="dtype must be a floating dtype"):
        EMACallback(decay=0.9, dtype=torch.int64)
    with pytest.raises(ConfigError, match="start must be"):
        EMACallback(decay=0.9, start=-1)
    assert EMACallback(half_life=10, every=2).schedule.decay == pytest.approx(0.5 ** (2 / 10))


def test_flattened_parameters_are_refused(tmp_path):
    net = Net()
    net.model[0].weight.ds_id = 0  # what DeepSpeed ZeRO-3 sets on its partitioned parameters
    with pytest.raises(ConfigError, match="cannot follow this model: DeepSpeed ZeRO-3 partitioned its parameters.*"
                                          "ModelParallelStrategy"):
        trainer(tmp_path, [EMACallback(decay=0.9)], max_epochs=1).fit(net, data())


def test_lightning_refuses_fsdp1_on_the_cpu():
    """Why FSDP is tested through ModelParallelStrategy (FSDP2) here (docs/lightning.md)."""
    with pytest.raises(ValueError, match="The strategy `fsdp` requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=2, strategy="fsdp")


def test_docstring_examples():
    for module in (polyak.lightning, polyak.lightning._ema):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


def test_checkpoint_files_are_lightning_checkpoints(tmp_path: Path):
    """A checkpoint with the EMA loads back into a LightningModule (load_from_checkpoint)."""
    trainer(tmp_path, [EMACallback(decay=0.8), _checkpointing(tmp_path)], max_epochs=1,
            enable_checkpointing=True).fit(Net(), data())
    loaded = Net.load_from_checkpoint(tmp_path / "epoch=0-step=6.ckpt", weights_only=True)
    raw = torch.load(tmp_path / "epoch=0-step=6.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in raw.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_average_is_made_where_the_trainer_put_the_module(tmp_path):
    on_gpu = EMACallback(decay=0.8)
    on_cpu = EMACallback(decay=0.8, device="cpu", name="cpu", apply_at_end=False)
    trainer(tmp_path, [on_cpu, on_gpu], accelerator="gpu", deterministic=False, max_epochs=1).fit(Net(), data())
    assert all(t.device.type == "cuda" for t in on_gpu.ema.state.tensors.values())
    assert all(t.device.type == "cpu" for t in on_cpu.ema.state.tensors.values())
    for k, v in on_gpu.ema.state.tensors.items():
        torch.testing.assert_close(v.cpu(), on_cpu.ema.state.tensors[k], rtol=0, atol=1e-6)
