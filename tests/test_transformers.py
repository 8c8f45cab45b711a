"""polyak.transformers.EMACallback in real (tiny, CPU, offline) Trainer runs.

A 2-layer GPT-2 built from a config (nothing is downloaded): update timing against a
closed form (with gradient accumulation), ema.safetensors in every checkpoint, exact
resume from checkpoint-10, evaluation on the average, the final from_pretrained folder.
"""

from __future__ import annotations

import doctest
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import polyak  # noqa: E402
import polyak.transformers  # noqa: E402
from _one_thread import one_torch_thread  # noqa: E402, F401
from polyak import ConfigError, OutputError  # noqa: E402
from polyak.torch import EMA  # noqa: E402
from polyak.transformers import EMACallback  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, SEQ = 64, 8


def _model(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _args(out: Path, **kw) -> transformers.TrainingArguments:
    opts = {"output_dir": str(out), "max_steps": 20, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
            "save_strategy": "steps", "save_steps": 5, "report_to": [], "use_cpu": True, "seed": 0,
            "disable_tqdm": True, "logging_strategy": "no", "dataloader_num_workers": 0}
    opts.update(kw)
    return transformers.TrainingArguments(**opts)


def _trainer(out: Path, callbacks, *, model=None, eval_dataset=None, **kw) -> transformers.Trainer:
    return transformers.Trainer(model=model if model is not None else _model(), args=_args(out, **kw),
                                train_dataset=_Tokens(48, 1), eval_dataset=eval_dataset, callbacks=callbacks)


class _Probe(transformers.TrainerCallback):
    """The raw weights after every optimizer step (listed before the EMA callback)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kw):
        self.steps.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def _raw(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_updates_after_each_optimizer_step_closed_form(tmp_path):
    d = 0.8
    probe, cb = _Probe(), EMACallback(decay=d)
    _trainer(tmp_path, [probe, cb], max_steps=6, gradient_accumulation_steps=2, save_strategy="no").train()
    assert len(probe.steps) == 6 and cb.ema.state.step == 6 and cb.ema.state.count == 6
    for name, avg in cb.ema.state.tensors.items():
        if not avg.is_floating_point():
            continue
        expected = probe.steps[0][name].double()
        for x in probe.steps[1:]:
            expected = d * expected + (1 - d) * x[name].double()
        torch.testing.assert_close(avg.double(), expected, rtol=1e-6, atol=1e-6, msg=name)
    # the tied lm_head is GPT-2's wte: averaged once, under its first name
    assert "lm_head.weight" not in cb.ema.state.tensors and "transformer.wte.weight" in cb.ema.state.tensors


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    cb = EMACallback(decay=0.7, warmup="tf")
    trainer = _trainer(out, [cb])
    trainer.train()
    return {"out": out, "cb": cb, "raw": _raw(trainer)}


def test_every_checkpoint_folder_holds_the_ema_of_its_step(straight):
    out = straight["out"]
    folders = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in folders] == ["checkpoint-5", "checkpoint-10", "checkpoint-15", "checkpoint-20"]
    for folder in folders:
        step = int(folder.name.split("-")[1])
        ema = EMA.load(folder / "ema.safetensors", _model())
        assert ema.state.step == ema.state.count == step
        assert not any(".polyak-tmp-" in p.name for p in folder.iterdir())  # written atomically, nothing left over
    final = polyak.average([folders[-1] / "ema.safetensors"])
    for k, v in straight["cb"].ema.state.tensors.items():
        np.testing.assert_array_equal(final[k], v.numpy())
    # the Trainer's own files keep the raw weights
    raw = polyak.average([folders[-1] / "model.safetensors"])
    np.testing.assert_array_equal(raw["transformer.h.0.mlp.c_fc.weight"],
                                  straight["raw"]["transformer.h.0.mlp.c_fc.weight"].numpy())
    assert not np.allclose(raw["transformer.h.0.mlp.c_fc.weight"], final["transformer.h.0.mlp.c_fc.weight"], atol=1e-4)


@pytest.mark.parametrize("where", ["output_dir", "resume_from"])
def test_resume_from_checkpoint_10_gives_the_straight_runs_ema_at_step_20(straight, tmp_path, where):
    if where == "output_dir":  # the usual case: the checkpoint is in the run's output_dir
        shutil.copytree(straight["out"] / "checkpoint-10", tmp_path / "checkpoint-10")
        ckpt, cb = tmp_path / "checkpoint-10", EMACallback(decay=0.1)  # settings come from the checkpoint
    else:  # elsewhere: the callback is told
        ckpt = straight["out"] / "checkpoint-10"
        cb = EMACallback(decay=0.1, resume_from=ckpt)
    trainer = _trainer(tmp_path, [cb], model=_model(seed=5))
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert cb.ema.state.step == cb.ema.state.count == 20
    assert cb.schedule == straight["cb"].schedule
    for k, v in straight["cb"].ema.state.tensors.items():
        assert torch.equal(cb.ema.state.tensors[k], v), k
    assert all(torch.equal(v, straight["raw"][k]) for k, v in _raw(trainer).items())


def test_resume_from_elsewhere_without_resume_from_warns(straight, tmp_path):
    cb = EMACallback(decay=0.7, warmup="tf")
    with pytest.warns(UserWarning, match=r"resuming at step 10, but .*checkpoint-10/ema\.safetensors does not exist.*"
                                         r"EMACallback\(resume_from=<checkpoint folder>\)"):
        _trainer(tmp_path, [cb], max_steps=12, save_strategy="no").train(
            resume_from_checkpoint=str(straight["out"] / "checkpoint-10"))
    assert cb.ema.state.step == 12 and cb.ema.state.count == 2


def test_resume_true_finds_the_newest_checkpoint_and_warns_without_ema_file(tmp_path):
    _trainer(tmp_path, [EMACallback(decay=0.5)], max_steps=10).train()
    cb = EMACallback(decay=0.5)
    _trainer(tmp_path, [cb], max_steps=15).train(resume_from_checkpoint=True)
    assert cb.ema.state.step == 15 and cb.ema.state.count == 15
    (tmp_path / "checkpoint-15" / "ema.safetensors").unlink()
    cb = EMACallback(decay=0.5)
    with pytest.warns(UserWarning, match=r"checkpoint-15/ema\.safetensors does not exist: the EMA starts again"):
        _trainer(tmp_path, [cb], max_steps=20).train(resume_from_checkpoint=True)
    assert cb.ema.state.step == 20 and cb.ema.state.count == 5


def _eval_loss(model, data, out: Path) -> float:
    """The Trainer's own eval loss of ``model`` (a separate Trainer, no callback)."""
    args = _args(out, per_device_eval_batch_size=8)
    return transformers.Trainer(model=model, args=args, eval_dataset=data).evaluate()["eval_loss"]


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_eval_with_ema_evaluates_the_average_and_trains_on_the_raw_weights(tmp_path, strategy):
    evals = _Tokens(8, 2)
    probe, cb = _Probe(), EMACallback(decay=0.6, eval_with_ema=True)
    # 48 rows at batch 4: 12 steps an epoch; "steps" evaluates at 5 and 10, "epoch" at 12
    schedule = {"eval_steps": 5, "max_steps": 10} if strategy == "steps" else {"max_steps": -1, "num_train_epochs": 1,
                                                                               "save_strategy": "epoch"}
    trainer = _trainer(tmp_path / "a", [probe, cb], eval_dataset=evals, eval_strategy=strategy,
                       per_device_eval_batch_size=8, **schedule)
    trainer.train()
    logged = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    last = len(probe.steps)
    assert sorted(logged) == ([5, 10] if strategy == "steps" else [12]) and last == max(logged)
    # the logged loss at the last step is the loss of the average (a fresh model holding it)
    avg_model = _model()
    avg_model.load_state_dict({k: v for k, v in cb.ema.state.tensors.items()}, strict=False)
    avg_model.tie_weights()
    assert logged[last] == pytest.approx(_eval_loss(avg_model, evals, tmp_path / "e1"), rel=1e-6)
    raw_model = _model()
    raw_model.load_state_dict(probe.steps[-1])
    assert abs(logged[last] - _eval_loss(raw_model, evals, tmp_path / "e2")) > 1e-4
    # the checkpoint written right after that evaluation holds the raw weights
    saved = polyak.average([tmp_path / "a" / f"checkpoint-{last}" / "model.safetensors"])
    np.testing.assert_array_equal(saved["transformer.h.1.attn.c_attn.weight"],
                                  probe.steps[-1]["transformer.h.1.attn.c_attn.weight"].numpy())
    # and training went on with the raw weights: a run without evaluation ends bit for bit the same
    probe2 = _Probe()
    _trainer(tmp_path / "b", [probe2, EMACallback(decay=0.6)], max_steps=last, save_strategy="no").train()
    for a, b in zip(probe.steps, probe2.steps, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_with_ema_refuses_a_dict_of_eval_datasets(tmp_path):
    probe, cb = _Probe(), EMACallback(decay=0.6, eval_with_ema=True)
    trainer = _trainer(tmp_path, [probe, cb], eval_dataset={"a": _Tokens(4, 2), "b": _Tokens(4, 3)}, max_steps=5,
                       eval_strategy="steps", eval_steps=5, save_strategy="no")
    with pytest.raises(ConfigError, match="needs one eval dataset.*average_parameters"):
        trainer.train()
    assert all(torch.equal(v, probe.steps[-1][k]) for k, v in _raw(trainer).items())  # swapped back


def test_final_dir_is_a_from_pretrained_folder_of_the_average(tmp_path):
    final = tmp_path / "ema-final"
    cb = EMACallback(decay=0.7, final_dir=final)
    trainer = _trainer(tmp_path / "run", [cb], max_steps=6, save_strategy="no")
    trainer.train()
    loaded = transformers.GPT2LMHeadModel.from_pretrained(final)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # the tie survives
    for k, v in cb.ema.state.tensors.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not any(".polyak-tmp-" in p.name for p in tmp_path.iterdir())
    assert (final / "config.json").is_file()
    # the model itself kept its raw weights (apply_at_end=False)
    assert not torch.equal(trainer.model.transformer.wte.weight, cb.ema.state.tensors["transformer.wte.weight"])
    with pytest.raises(OutputError, match=r"ema-final already exists and is not empty; pass --force \(force=True\)"):
        cb.save_pretrained(final)
    cb.save_pretrained(final, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema-final", "run"]


def test_apply_at_end_and_average_parameters(tmp_path):
    cb = EMACallback(decay=0.7, apply_at_end=True)
    trainer = _trainer(tmp_path, [cb], max_steps=4, save_strategy="no")
    with pytest.raises(ConfigError, match="no average yet"), cb.average_parameters():
        pass
    trainer.train()
    for k, v in cb.ema.state.tensors.items():
        assert torch.equal(trainer.model.state_dict()[k], v), k


def test_flattened_parameters_are_refused(tmp_path):
    model = _model()
    model.transformer.h[0].mlp.c_fc.weight.ds_id = 3  # what DeepSpeed ZeRO-3 sets on its partitioned parameters
    with pytest.raises(ConfigError, match="EMACallback cannot follow this model: DeepSpeed ZeRO-3.*use FSDP2"):
        _trainer(tmp_path, [EMACallback(decay=0.9)], model=model, max_steps=2, save_strategy="no").train()


def test_options_are_checked_at_construction():
    with pytest.raises(ConfigError, match=r"decay must be in \[0, 1\)"):
        EMACallback(decay=-0.5)
    with pytest.raises(ConfigError, match="give either schedule= or decay="):
        EMACallback(decay=0.9, schedule=polyak.make_schedule(0.9))


def test_docstring_examples():
    for module in (polyak.transformers, polyak.transformers._ema):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0
