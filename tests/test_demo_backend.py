"""Which Keras backend ``polyak demo`` runs on: the user's (``KERAS_BACKEND``, ``keras.json``),
else torch, else an installed one; TensorFlow-only and JAX-only installs work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from polyak import ConfigError
from polyak.demo._backend import BackendChoice, choose_keras_backend, keras_config_path


def _only(*names: str):  # type: ignore[no-untyped-def]
    return lambda backend: backend in names


def _home(tmp_path: Path, backend: str | None = None, text: str | None = None) -> dict[str, str]:
    if text is None and backend is not None:
        text = json.dumps({"floatx": "float32", "epsilon": 1e-07, "backend": backend, "image_data_format": "channels_last"})
    if text is not None:
        (tmp_path / "keras.json").write_text(text)
    return {"KERAS_HOME": str(tmp_path)}


def test_keras_backend_wins_over_keras_json(tmp_path: Path) -> None:
    env = {**_home(tmp_path, "tensorflow"), "KERAS_BACKEND": "jax"}
    assert choose_keras_backend(env, _only("torch", "jax", "tensorflow")) == BackendChoice("jax", "set by KERAS_BACKEND")
    with pytest.raises(ConfigError, match=r"KERAS_BACKEND=jax, but jax is not installed; install it, or set "
                                          r"KERAS_BACKEND to an installed backend \(torch, tensorflow\)"):
        choose_keras_backend(env, _only("torch", "tensorflow"))


def test_keras_json_is_respected(tmp_path: Path) -> None:
    env = _home(tmp_path, "jax")
    path = tmp_path / "keras.json"
    assert choose_keras_backend(env, _only("torch", "jax")) == BackendChoice("jax", f"set in {path}")
    # a keras.json naming a backend that is not installed (Keras writes "tensorflow" the
    # first time it is imported, also on a machine without TensorFlow): the demo goes on
    env = _home(tmp_path, "tensorflow")
    assert choose_keras_backend(env, _only("torch", "jax")) == BackendChoice(
        "torch", f"{path} names tensorflow, which is not installed; the first installed of torch, tensorflow, jax")
    assert choose_keras_backend(env, _only("jax")).name == "jax"


@pytest.mark.parametrize(("installed", "expected"), [(("torch", "tensorflow", "jax"), "torch"),
                                                      (("jax", "tensorflow"), "tensorflow"), (("jax",), "jax")])
def test_nothing_configured_prefers_torch_then_an_installed_backend(
        tmp_path: Path, installed: tuple[str, ...], expected: str) -> None:
    for env in (_home(tmp_path), _home(tmp_path, text="{not json"), _home(tmp_path, text='{"floatx": "float32"}')):
        choice = choose_keras_backend(env, _only(*installed))
        assert choice == BackendChoice(expected, "nothing configured; the first installed of torch, tensorflow, jax")
    with pytest.raises(ConfigError, match="Keras needs a backend: install torch, tensorflow or jax"):
        choose_keras_backend(_home(tmp_path), _only())


def test_keras_config_path_follows_keras_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert keras_config_path({"KERAS_HOME": str(tmp_path)}) == tmp_path / "keras.json"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert keras_config_path({}) == tmp_path / ".keras" / "keras.json"


# A process in which some packages are "not installed": importing them fails as it would.
_BLOCKED = """
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from polyak.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _demo_without(blocked: set[str], home: Path, out: Path) -> tuple[subprocess.CompletedProcess[str], dict]:  # type: ignore[type-arg]
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env["KERAS_HOME"] = str(home)
    r = subprocess.run([sys.executable, "-c", _BLOCKED.format(blocked=sorted(blocked)), "demo", "--epochs", "3",
                        "--members", "2", "--quiet", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize(("only", "blocked"), [("jax", {"torch", "tensorflow"}), ("tensorflow", {"torch", "jax"})])
def test_a_jax_only_or_tensorflow_only_install_runs_the_demo(tmp_path: Path, only: str, blocked: set[str]) -> None:
    pytest.importorskip(only)
    pytest.importorskip("keras")
    pytest.importorskip("matplotlib")
    r, data = _demo_without(blocked, tmp_path / "home", tmp_path / "out")
    assert data["backend"] == {"name": only, "reason": "nothing configured; the first installed of torch, tensorflow, jax"}
    assert f"[keras on {only}, " in r.stdout
    # Keras wrote its default keras.json (naming tensorflow) on that first import; on a
    # JAX-only install the next run passes over it, on a TensorFlow-only one follows it
    written = tmp_path / "home" / "keras.json"
    assert json.loads(written.read_text())["backend"] == "tensorflow"
    again = choose_keras_backend({"KERAS_HOME": str(tmp_path / "home")}, lambda b: b not in blocked)
    assert again == (BackendChoice("jax", f"{written} names tensorflow, which is not installed; the first installed "
                                          "of torch, tensorflow, jax") if only == "jax"
                     else BackendChoice("tensorflow", f"set in {written}"))
