"""CheckpointSaver, load_average, update_bn and evaluator."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.optim.swa_utils import update_bn as torch_update_bn  # noqa: E402

import polyak  # noqa: E402
from polyak import ConfigError, MismatchError, OutputError  # noqa: E402
from polyak.torch import CheckpointSaver, evaluator, load_average, update_bn  # noqa: E402


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).to(dtype)


def test_saver_naming_schedule_and_keep_last(tmp_path: Path) -> None:
    saver = CheckpointSaver(tmp_path / "ck", every=3, start=4, keep_last=2)
    m = make_model()
    saved = [e for e in range(20) if saver.maybe_save(m, epoch=e) is not None]
    assert saved == [4, 7, 10, 13, 16, 19]
    names = [p.name for p in saver.files()]
    assert names == ["ckpt_epoch_16.safetensors", "ckpt_epoch_19.safetensors"]
    assert sorted(os.listdir(tmp_path / "ck")) == names  # no temporary files left
    with pytest.raises(ConfigError, match="epoch="):
        saver.maybe_save(m, step=3)


def test_saver_numbers_sort_numerically(tmp_path: Path) -> None:
    saver = CheckpointSaver(tmp_path, unit="step", every=50, prefix="run", keep_last=3)
    m = make_model()
    for step in range(0, 1001, 50):
        saver.maybe_save(m, step=step)
    assert [p.name for p in saver.files()] == ["run_step_900.safetensors", "run_step_950.safetensors",
                                               "run_step_1000.safetensors"]
    assert polyak.order_members(saver.files()[::-1]) == saver.files()


def test_saver_metadata_bf16_and_prefixes(tmp_path: Path) -> None:
    class DDPLike(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.module = inner

    m = make_model(dtype=torch.bfloat16)
    path = CheckpointSaver(tmp_path).save(DDPLike(m), step=120, epoch=3)
    assert path is not None and path.name == "ckpt_epoch_3.safetensors"
    ins = polyak.inspect(path)
    assert json.loads(ins.metadata["step"]) == 120 and json.loads(ins.metadata["epoch"]) == 3
    assert float(ins.metadata["wall_time"]) > 1e9
    src = polyak.open_source(path)
    assert set(src.infos()) == set(m.state_dict())
    assert str(src.infos()["0.weight"].dtype) == "bfloat16"
    got = src.read("0.weight").astype(np.float32)
    np.testing.assert_array_equal(got, m[0].weight.detach().float().numpy())
    src.close()


def test_saver_pt_format_is_read_back(tmp_path: Path) -> None:
    m = make_model()
    path = CheckpointSaver(tmp_path, format=".pt").save(m, epoch=7)
    assert path is not None and path.name == "ckpt_epoch_7.pt"
    obj = torch.load(path, weights_only=True)
    assert obj["polyak"]["epoch"] == 7
    assert set(obj["state_dict"]) == set(m.state_dict())
    avg = polyak.average([path])
    np.testing.assert_allclose(avg["0.weight"], m[0].weight.detach().numpy())


def test_saver_failed_write_keeps_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saver = CheckpointSaver(tmp_path, keep_last=1)
    m = make_model()
    saver.save(m, epoch=1)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OutputError, match="no space left on the device"):
        saver.save(m, epoch=2)
    monkeypatch.undo()
    assert [p.name for p in saver.files()] == ["ckpt_epoch_1.safetensors"]
    assert os.listdir(tmp_path) == ["ckpt_epoch_1.safetensors"]


def test_load_average_matches_numpy_average(tmp_path: Path) -> None:
    saver = CheckpointSaver(tmp_path)
    states = []
    for epoch in range(4):
        m = make_model(epoch)
        saver.save(m, epoch=epoch)
        states.append({k: v.detach().numpy().copy() for k, v in m.state_dict().items()})
    target = make_model(9)
    report = load_average(target, saver.files(), scheme="linear")
    assert report.missing == [] and report.unexpected == []
    w = np.arange(1, 5)
    for name, t in target.state_dict().items():
        if t.is_floating_point():
            expected = np.average(np.stack([s[name] for s in states]), axis=0, weights=w)
            np.testing.assert_allclose(t.numpy(), expected, rtol=1e-5, atol=1e-6)
        else:
            assert t.numpy() == states[-1][name]


def test_load_average_strict_and_report(tmp_path: Path) -> None:
    m = make_model()
    path = CheckpointSaver(tmp_path).save(m, epoch=0)
    bigger = torch.nn.Sequential(*make_model(), torch.nn.Linear(3, 2))
    with pytest.raises(MismatchError, match="strict=False"):
        load_average(bigger, [path])
    report = load_average(bigger, [path], strict=False)
    assert report.missing == ["4.weight", "4.bias"] and report.unexpected == []
    bf16 = make_model(dtype=torch.bfloat16)
    load_average(bf16, [path])
    assert bf16[0].weight.dtype == torch.bfloat16


def loader(n_batches: int = 5, dicts: bool = False) -> list:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(10, 4, generator=g) * 3 + 1, torch.randint(0, 3, (10,), generator=g)) for _ in range(n_batches)]
    return [{"x": x, "labels": y} for x, y in batches] if dicts else batches


def test_update_bn_matches_torch_and_restores_state() -> None:
    ours, ref = make_model(), make_model()
    ours.eval()
    ref.eval()
    ours[1].momentum = 0.3
    ref[1].momentum = 0.3
    assert update_bn(ours, loader()) == 5
    torch_update_bn(loader(), ref)
    torch.testing.assert_close(ours[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(ours[1].running_var, ref[1].running_var)
    assert ours[1].momentum == 0.3 and not ours.training and not ours[1].training


def test_update_bn_with_dict_batches_and_call() -> None:
    class Keyword(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()

        def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
            return self.net(x)

    kw, ref = Keyword(), make_model()
    update_bn(kw, loader(dicts=True))
    torch_update_bn(loader(), ref)
    torch.testing.assert_close(kw.net[1].running_mean, ref[1].running_mean)
    custom = make_model()
    update_bn(custom, loader(dicts=True), call=lambda model, batch: model(batch["x"]))
    torch.testing.assert_close(custom[1].running_var, ref[1].running_var)


def test_evaluator_loads_state_and_restores() -> None:
    m = make_model()
    m.train()
    raw = {k: v.clone() for k, v in m.state_dict().items()}
    evaluate = evaluator(m, loader())
    other = make_model(3)
    other.eval()
    state = {k: v.detach().numpy() for k, v in other.state_dict().items()}
    metrics = evaluate(state)
    x = torch.cat([b[0] for b in loader()])
    y = torch.cat([b[1] for b in loader()])
    with torch.no_grad():
        logits = other(x)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, raw[k], rtol=0, atol=0)
    assert m.training
    mse = evaluator(m, [(torch.ones(2, 4), torch.zeros(2, 3))])()
    assert set(mse) == {"loss"}
    with pytest.raises(MismatchError, match='1 unexpected tensor.*"nope"'):
        evaluate({"nope": np.zeros(1)})
    bad = dict(state, **{"1.running_mean": np.zeros(5, np.float32), "2.nope": np.zeros(1)})
    with pytest.raises(MismatchError, match=r'(?s)2 problem.*"2.nope".*"1.running_mean" has shape \(5,\), the module has \(6,\)'):
        evaluate(bad)
    for k, v in m.state_dict().items():  # a refused state leaves the module as it was
        torch.testing.assert_close(v, raw[k], rtol=0, atol=0)


def test_saver_after_a_restart_keeps_the_newest_and_never_deletes_strangers(tmp_path: Path) -> None:
    m = make_model()
    first = CheckpointSaver(tmp_path, keep_last=2)
    for epoch in range(3):
        first.save(m, epoch=epoch)
    strangers = ["ckpt_epoch_best.safetensors", "ckpt_epoch_007.safetensors", "ckpt_step_9.safetensors",
                 "ckpt_epoch_1.pt", "other_epoch_1.safetensors"]
    for name in strangers:
        (tmp_path / name).write_text("not a checkpoint of this saver")
    restarted = CheckpointSaver(tmp_path, keep_last=2)  # a new process
    restarted.save(m, epoch=3)
    assert [p.name for p in restarted.files()] == ["ckpt_epoch_2.safetensors", "ckpt_epoch_3.safetensors"]
    # A run rolled back to epoch 1 never deletes the checkpoint it has just written.
    restarted.save(m, epoch=1)
    assert [p.name for p in restarted.files()] == ["ckpt_epoch_1.safetensors", "ckpt_epoch_2.safetensors",
                                                   "ckpt_epoch_3.safetensors"]
    assert sorted(os.listdir(tmp_path)) == sorted([*strangers, "ckpt_epoch_1.safetensors",
                                                   "ckpt_epoch_2.safetensors", "ckpt_epoch_3.safetensors"])
