"""The capture policy shared by CheckpointSaver and CheckpointCallback (polyak._retention)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyak import ConfigError
from polyak import _retention as retention
from polyak._retention import Retention


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_text(name)


def test_names_numbers_and_due() -> None:
    r = Retention("ckpt", ".safetensors", unit="epoch", start=4, every=3)
    assert r.name_for(10) == "ckpt_epoch_10.safetensors"
    assert [n for n in range(20) if r.due(n)] == [4, 7, 10, 13, 16, 19]
    assert [r.number_of(n) for n in ("ckpt_epoch_0.safetensors", "ckpt_epoch_12.safetensors",
                                     "ckpt_epoch_012.safetensors", "ckpt_epoch_12.safetensors.tmp",
                                     "ckpt_step_12.safetensors", "xckpt_epoch_12.safetensors",
                                     "ckpt_epoch_-1.safetensors", "ckpt_epoch_.safetensors")] == [
        0, 12, None, None, None, None, None, None]
    keras = Retention("model", ".keras")
    assert [keras.number_of(n) for n in ("model_3.keras", "model_epoch_3.keras", "model_3.weights.h5")] == [3, None, None]


def test_a_restarted_saver_keeps_the_newest_k_and_never_deletes_strangers(tmp_path: Path) -> None:
    r = Retention("model", ".keras", keep_last=2)
    strangers = ["model_best.keras", "model_007.keras", "model_1.weights.h5", "model_1.keras.bak",
                 "other_1.keras", ".model_5.keras.polyak-tmp-1-ab"]
    _touch(tmp_path, *strangers)
    (tmp_path / "model_99.keras").mkdir()  # a folder with a checkpoint's name is not a checkpoint
    for epoch in range(3):  # the first run
        _touch(tmp_path, r.name_for(epoch))
        r.prune(tmp_path, keep=tmp_path / r.name_for(epoch))
    assert [p.name for p in r.files(tmp_path)] == ["model_1.keras", "model_2.keras"]
    again = Retention("model", ".keras", keep_last=2)  # a new process after a restart
    for epoch in (3, 4, 5):
        _touch(tmp_path, again.name_for(epoch))
        again.prune(tmp_path, keep=tmp_path / again.name_for(epoch))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*strangers, "model_99.keras", "model_4.keras",
                                                                 "model_5.keras"])


def test_numbers_sort_numerically_and_the_new_file_is_never_deleted(tmp_path: Path) -> None:
    r = Retention("run", ".pt", unit="step", keep_last=2)
    _touch(tmp_path, "run_step_900.pt", "run_step_1000.pt", "run_step_95.pt")
    assert [p.name for p in r.files(tmp_path)] == ["run_step_95.pt", "run_step_900.pt", "run_step_1000.pt"]
    # A run restarted from step 400 next to files of the abandoned run (900, 1000):
    _touch(tmp_path, "run_step_400.pt")
    assert [p.name for p in r.prune(tmp_path, keep=tmp_path / "run_step_400.pt")] == ["run_step_95.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_step_1000.pt", "run_step_400.pt", "run_step_900.pt"]
    assert Retention("run", ".pt").surplus(tmp_path) == []  # keep_last=None keeps all


def test_a_missing_folder_and_a_file_deleted_meanwhile_are_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = Retention("m", ".pt", keep_last=1)
    assert r.files(tmp_path / "nope") == [] and r.prune(tmp_path / "nope") == []
    _touch(tmp_path, "m_1.pt", "m_2.pt", "m_3.pt")
    monkeypatch.setattr(Retention, "surplus", lambda self, d, keep=None: [tmp_path / "m_0.pt", tmp_path / "m_1.pt"])
    assert r.prune(tmp_path) == [tmp_path / "m_1.pt"]  # m_0.pt was already gone: not listed, no error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_2.pt", "m_3.pt"]


def test_options_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="^prefix must be a plain file-name prefix, got 'a/b'$"):
        Retention("a/b", ".keras")
    with pytest.raises(ConfigError, match="^prefix must be a plain file-name prefix, got ''$"):
        Retention("", ".keras")
    monkeypatch.setattr(retention.os, "sep", "\\")  # as on Windows: both separators are refused
    for prefix in ("a\\b", "a/b"):
        with pytest.raises(ConfigError, match="^prefix must be a plain file-name prefix"):
            Retention(prefix, ".keras")
    monkeypatch.undo()
    for keep_last in (0, True, 2.0):
        with pytest.raises(ConfigError, match=f"^keep_last must be None or a whole number ≥ 1, got {keep_last!r}$"):
            Retention("m", ".keras", keep_last=keep_last)
    with pytest.raises(ConfigError, match="every must be a whole number ≥ 1, got 0"):
        Retention("m", ".keras", every=0)
    with pytest.raises(ConfigError, match="start must be a whole number ≥ 0, got True"):
        Retention("m", ".keras", start=True)
