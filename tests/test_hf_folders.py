"""Hugging Face checkpoints as users have them: Trainer ``checkpoint-N/`` folders, save_pretrained
(single and sharded), pytorch_model.bin, Accelerate ``save_state``; folders in, folders out.

Real ``transformers.Trainer`` and ``accelerate`` runs on a tiny GPT-2 built from a config (nothing
is downloaded); every number is checked against ``numpy.average`` of the files as the
``safetensors`` package (or ``torch.load``) reads them.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from safetensors.numpy import load_file  # noqa: E402

import polyak  # noqa: E402
from polyak import ConfigError, FormatError, OutputError  # noqa: E402
from polyak.cli import main as cli_main  # noqa: E402
from polyak.torch import load_average  # noqa: E402

STEPS = list(range(5, 45, 5))  # 5, 10, ..., 40: string order is not step order
TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


def tiny_config() -> transformers.GPT2Config:
    return transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=64, n_positions=16,
                                   bos_token_id=0, eos_token_id=0)


def tiny_model(seed: int = 0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(tiny_config())


class _Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a busy machine: threads only contend
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trainer_out(tmp_path_factory: pytest.TempPathFactory, single_thread: None) -> Path:
    """A real Trainer run: ``out/checkpoint-5`` ... ``out/checkpoint-40`` (shared by the tests)."""
    out = tmp_path_factory.mktemp("trainer") / "out"
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=40, save_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], logging_steps=1000, use_cpu=True, seed=0, disable_tqdm=True, save_total_limit=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's own deprecation notices are not under test
        transformers.Trainer(model=tiny_model(), args=args, train_dataset=_Tokens()).train()
    assert sorted(p.name for p in out.iterdir()) == sorted(f"checkpoint-{n}" for n in STEPS)
    return out


def weights_of(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


def reference(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    return {k: np.average(np.stack([s[k] for s in states]), axis=0, weights=weights) for k in states[-1]}


def test_trainer_checkpoints_by_path(trainer_out: Path, tmp_path: Path) -> None:
    files = sorted(str(p) for p in trainer_out.glob("checkpoint-*/model.safetensors"))  # a shell's order
    assert Path(files[-1]).parent.name == "checkpoint-5"
    out = tmp_path / "avg.safetensors"
    assert cli_main(["average", *files, "-o", str(out), "--last", "3", "-q"]) == 0
    expected = reference([weights_of(trainer_out / f"checkpoint-{n}") for n in (30, 35, 40)], [1, 1, 1])
    got = load_file(str(out))
    assert set(got) == set(expected) and "lm_head.weight" not in got  # stored once, as the Trainer did
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7)
    # linear weights: the newest (step 40) gets the largest
    lin = polyak.average(files, last=3, scheme="linear")
    exp = reference([weights_of(trainer_out / f"checkpoint-{n}") for n in (30, 35, 40)], [1, 2, 3])
    for k, v in exp.items():
        np.testing.assert_allclose(lin[k], v, rtol=1e-6, atol=1e-7)


def test_trainer_folders_in_a_folder_out(trainer_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folders = sorted(str(p) for p in trainer_out.glob("checkpoint-*"))
    avg = tmp_path / "avg"
    assert cli_main(["average", *folders, "-o", f"{avg}/", "--last", "3", "--scheme", "linear"]) == 0
    printed = capsys.readouterr().out
    assert "oldest → newest: checkpoint-30 (0.1667), checkpoint-35 (0.3333), checkpoint-40 (0.5)" in printed
    assert "copied from checkpoint-40: config.json, generation_config.json" in printed
    assert all(name in printed.split("left out of checkpoint-40")[1] for name in TRAINING_STATE)
    assert sorted(p.name for p in avg.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert (avg / "config.json").read_bytes() == (trainer_out / "checkpoint-40" / "config.json").read_bytes()
    assert not [p for p in tmp_path.iterdir() if "polyak-tmp" in p.name]
    rec = json.loads(polyak.inspect(avg / "model.safetensors").metadata["polyak"])
    assert [m["file"] for m in rec["members"]] == ["checkpoint-30", "checkpoint-35", "checkpoint-40"]

    model = transformers.GPT2LMHeadModel.from_pretrained(avg)
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives
    expected = reference([weights_of(trainer_out / f"checkpoint-{n}") for n in (30, 35, 40)], [1, 2, 3])
    state = model.state_dict()
    for k, v in expected.items():
        np.testing.assert_allclose(state[k].numpy(), v, rtol=1e-6, atol=1e-7)
    # an output name without a suffix is a folder too when the inputs are folders
    assert cli_main(["average", *folders, "-o", str(tmp_path / "plain"), "-q"]) == 0
    assert (tmp_path / "plain" / "config.json").is_file()


def test_tied_gpt2_through_load_average(trainer_out: Path) -> None:
    model = tiny_model(seed=7)
    assert model.lm_head.weight is model.transformer.wte.weight
    folders = [trainer_out / f"checkpoint-{n}" for n in STEPS]
    report = load_average(model, folders, last=3, scheme="exponential", alpha=1.0)  # strict=True
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" in report.loaded and report.missing == [] and report.unexpected == []
    expected = reference([weights_of(trainer_out / f"checkpoint-{n}") for n in (30, 35, 40)],
                         list(polyak.scheme_weights("exponential", 3, alpha=1.0)))
    state = model.state_dict()
    for k, v in expected.items():
        np.testing.assert_allclose(state[k].numpy(), v, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.lm_head.weight.detach().numpy(), expected["transformer.wte.weight"], rtol=1e-6, atol=1e-7)


def test_two_runs_need_an_order(trainer_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for run, step in (("runA", 10), ("runB", 20)):
        shutil.copytree(trainer_out / f"checkpoint-{step}", tmp_path / run)
    out = tmp_path / "soup"
    assert cli_main(["average", str(tmp_path / "runA"), str(tmp_path / "runB"), "-o", f"{out}/", "--scheme", "linear"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "runA, runB have no numbers" in err and "--order mtime|name|given" in err
    assert not out.exists()
    # equal weights over both need no order (a soup)
    assert cli_main(["average", str(tmp_path / "runB"), str(tmp_path / "runA"), "-o", f"{out}/", "-q"]) == 0
    expected = reference([weights_of(tmp_path / "runA"), weights_of(tmp_path / "runB")], [1, 1])
    got = weights_of(out)
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7)


def _save_bin(model: torch.nn.Module, folder: Path, config: bool = True) -> None:
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # tied: both names, one storage
    if config:
        model.config.to_json_file(folder / "config.json")


def test_pytorch_model_bin_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = [tiny_model(seed) for seed in (1, 2, 3)]
    for i, m in enumerate(models):
        _save_bin(m, tmp_path / "run" / f"checkpoint-{(i + 1) * 100}")
    out = tmp_path / "avg"
    res = polyak.average(sorted((tmp_path / "run").iterdir()), out=f"{out}/", scheme="linear")
    assert "the members hold pytorch_model.bin; the average is written as safetensors (model.safetensors)" in res.notes[0]
    assert any("lm_head.weight (= transformer.wte.weight)" in n for n in res.notes)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert "lm_head.weight" not in weights_of(out)
    states = [{k: v.numpy() for k, v in m.state_dict().items()} for m in models]
    expected = reference(states, [1, 2, 3])
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for k, v in loaded.state_dict().items():
        np.testing.assert_allclose(v.numpy(), expected[k], rtol=1e-6, atol=1e-7)
    # a folder holding both: model.safetensors wins, as in from_pretrained
    both = tmp_path / "both"
    _save_bin(tiny_model(9), both, config=False)
    shutil.copy(out / "model.safetensors", both / "model.safetensors")
    got = polyak.average([both])
    np.testing.assert_allclose(got["transformer.wte.weight"], expected["transformer.wte.weight"], rtol=1e-6, atol=1e-7)
    assert polyak.inspect(both).extras["weights"] == "model.safetensors"


def _sharded_bin(model: torch.nn.Module, folder: Path) -> None:
    """``pytorch_model.bin.index.json`` with two .bin shards, as transformers 4 wrote them."""
    folder.mkdir(parents=True)
    state = model.state_dict()
    names = [n for n in state if n != "lm_head.weight"]
    half = len(names) // 2
    wmap = {}
    for k, part in enumerate((names[:half], names[half:]), start=1):
        shard = f"pytorch_model-0000{k}-of-00002.bin"
        torch.save({n: state[n].clone() for n in part}, folder / shard)
        wmap.update(dict.fromkeys(part, shard))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    model.config.to_json_file(folder / "config.json")


def test_sharded_folders_keep_their_layout(tmp_path: Path, single_thread: None) -> None:
    models = [tiny_model(seed) for seed in (4, 5, 6)]
    for i, m in enumerate(models):
        m.save_pretrained(tmp_path / "st" / f"step_{i}", max_shard_size="12KB")
    newest = tmp_path / "st" / "step_2"
    index = json.loads((newest / "model.safetensors.index.json").read_text())
    shard_bytes: dict[str, int] = {}
    newest_weights = {}
    for name, shard in index["weight_map"].items():
        t = load_file(str(newest / shard))[name]
        newest_weights[name] = t
        shard_bytes[shard] = shard_bytes.get(shard, 0) + t.nbytes
    assert len(shard_bytes) > 1
    out = tmp_path / "avg"
    polyak.average(sorted((tmp_path / "st").iterdir()), out=f"{out}/")
    out_index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes: dict[str, int] = {}
    for name, shard in out_index["weight_map"].items():
        sizes[shard] = sizes.get(shard, 0) + load_file(str(out / shard))[name].nbytes
    assert len(sizes) > 1 and max(sizes.values()) <= max(shard_bytes.values())
    assert all(s.startswith("model-0000") for s in sizes)
    states = [{k: v.numpy() for k, v in m.state_dict().items()} for m in models]
    expected = reference(states, [1, 1, 1])
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    for k, v in loaded.state_dict().items():
        np.testing.assert_allclose(v.numpy(), expected[k], rtol=1e-6, atol=1e-7)
    # --shard-size decides instead of the newest member; a large one gives one file
    one = tmp_path / "one"
    polyak.average(sorted((tmp_path / "st").iterdir()), out=f"{one}/", shard_size="1GB")
    assert sorted(p.name for p in one.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    # the same models as sharded .bin folders
    for i, m in enumerate(models):
        _sharded_bin(m, tmp_path / "bin" / f"step_{i}")
    got = polyak.average(sorted((tmp_path / "bin").iterdir()))
    for k, v in got.items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-6, atol=1e-7)
    direct = polyak.average(sorted((tmp_path / "bin").glob("*/pytorch_model.bin.index.json")), scheme="linear")
    lin = reference(states, [1, 2, 3])
    np.testing.assert_allclose(direct["transformer.h.1.mlp.c_fc.weight"], lin["transformer.h.1.mlp.c_fc.weight"], rtol=1e-6, atol=1e-7)


def test_accelerate_save_state_folders(tmp_path: Path, single_thread: None) -> None:
    import accelerate

    acc = accelerate.Accelerator(cpu=True)
    states = []
    for i, seed in enumerate((11, 12, 13)):
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        torch.manual_seed(seed)
        for p in model.parameters():
            torch.nn.init.normal_(p)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = acc.prepare(model, opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc.save_state(str(tmp_path / "acc" / f"step_{(i + 1) * 1000}"))
        states.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
        acc.free_memory()
    newest = tmp_path / "acc" / "step_3000"
    assert {"model.safetensors", "optimizer.bin"} <= {p.name for p in newest.iterdir()}
    got = polyak.average(sorted((tmp_path / "acc").iterdir()), scheme="linear")
    for k, v in reference(states, [1, 2, 3]).items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7)
    # a folder out: the weights only (Accelerate keeps no config), none of the training state
    out = tmp_path / "avg"
    res = polyak.average(sorted((tmp_path / "acc").iterdir()), out=f"{out}/")
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert any("optimizer.bin" in n and "random_states_0.pkl" in n for n in res.notes)
    # two prepared models in one state folder: which one to average is the user's call
    shutil.copy(newest / "model.safetensors", newest / "model_1.safetensors")
    with pytest.raises(FormatError, match=r"holds the weights of 2 models \(model\.safetensors, model_1\.safetensors\); "
                                          r"give the file to average"):
        polyak.average([newest])


def test_folder_output_is_atomic_and_guarded(trainer_out: Path, tmp_path: Path) -> None:
    folders = [trainer_out / f"checkpoint-{n}" for n in (30, 35, 40)]
    out = tmp_path / "avg"
    polyak.average(folders, out=f"{out}/")
    before = weights_of(out)
    with pytest.raises(OutputError, match="already exists and is not empty; pass --force"):
        polyak.average(folders, out=f"{out}/", scheme="linear")
    polyak.average(folders, out=f"{out}/", scheme="linear", force=True)  # replaced as a whole
    after = weights_of(out)
    assert not np.array_equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg"]  # no temporaries, no old folder aside
    # an empty folder may be filled without --force
    (tmp_path / "empty").mkdir()
    polyak.average(folders, out=tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    # never the inputs' own folder, never a folder holding them
    with pytest.raises(OutputError, match="holds the input"):
        polyak.average(folders, out=f"{trainer_out}/", force=True)
    with pytest.raises(OutputError, match="is the input"):
        polyak.average(folders, out=f"{folders[-1]}/", force=True)
    with pytest.raises(ConfigError, match="--workers and --distributed write one sharded safetensors output, not a folder"):
        polyak.average(folders, out=f"{tmp_path / 'w'}/", workers=2)
    # a failure while averaging leaves nothing behind
    bad = tmp_path / "bad"
    shutil.copytree(folders[0], bad / "checkpoint-1")
    state = weights_of(bad / "checkpoint-1")
    state["transformer.h.0.ln_1.weight"][3] = np.nan
    from safetensors.numpy import save_file

    save_file(state, str(bad / "checkpoint-1" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(polyak.NonFiniteError, match="checkpoint-1"):
        polyak.average([bad / "checkpoint-1", folders[-1]], out=f"{tmp_path / 'nan'}/", order="given")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg", "bad", "empty"]
    # a temporary folder of a killed run is removed by the next run in that folder
    stale = tmp_path / ".avg2.polyak-tmp-999999999-abcd"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "x").write_bytes(b"x")
    polyak.average(folders, out=f"{tmp_path / 'avg2'}/")
    assert not stale.exists()


def test_inspect_and_unknown_folders(trainer_out: Path, tmp_path: Path) -> None:
    ins = polyak.inspect(trainer_out / "checkpoint-40")
    assert ins.format == "hf-folder" and ins.extras["weights"] == "model.safetensors"
    assert ins.extras["model_files"] == ["config.json", "generation_config.json"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FormatError, match=r"empty: a folder that holds no checkpoint polyak knows \(dcp: .*hf-folder: "):
        polyak.average([tmp_path / "empty"])
