"""polyak.torch matches modules, averages and saved states by name, through one matcher.

Each place lists every difference at once (names and shapes together), whichever side it
is on, and says what to do; dtypes are cast, never refused (a bf16 module takes a float32
average).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from polyak import MismatchError  # noqa: E402
from polyak.torch import EMA, CheckpointSaver, load_average, load_sharded, save_sharded  # noqa: E402


def net(width: int = 6, *, extra: bool = False, seed: int = 0) -> torch.nn.Module:
    """``Linear(4, 6) → BatchNorm(width) → ReLU → Linear(6, 3)`` (+ ``Linear(3, 2)``)."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(width), torch.nn.ReLU(), torch.nn.Linear(6, 3)]
    if extra:
        layers.append(torch.nn.Linear(3, 2))
    return torch.nn.Sequential(*layers)


def test_load_average_lists_names_and_middle_shapes_at_once(tmp_path: Path) -> None:
    path = CheckpointSaver(tmp_path).save(net(), epoch=0)
    other = net(5, extra=True)  # a narrower BatchNorm in the middle and one more layer
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(MismatchError, match="^the averaged checkpoints do not fit the module") as info:
        load_average(other, [path])
    msg = str(info.value)
    assert msg.startswith("the averaged checkpoints do not fit the module (5 problem(s)):")
    assert 'missing 2 tensor(s) that the module has: "4.weight", "4.bias"' in msg
    for name in ("1.weight", "1.bias", "1.running_mean", "1.running_var"):
        assert f'tensor "{name}" has shape (6,), the module has (5,)' in msg
    assert msg.endswith("pass strict=False to load the common tensors (their shapes must still match)")
    # strict=False forgives the names, never the shapes
    with pytest.raises(MismatchError, match=r"(?s)\(4 problem\(s\)\).*\"1.running_var\" has shape") as info:
        load_average(other, [path], strict=False)
    assert "missing" not in str(info.value) and "strict=False" not in str(info.value)
    for k, v in other.state_dict().items():  # nothing was loaded
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_load_average_non_strict_loads_the_common_tensors_cast(tmp_path: Path) -> None:
    src = net(extra=True)
    path = CheckpointSaver(tmp_path).save(src, epoch=0)
    target = net(seed=1).to(torch.bfloat16)
    report = load_average(target, [path], strict=False)
    assert report.missing == [] and report.unexpected == ["4.bias", "4.weight"]
    assert report.loaded == list(target.state_dict())
    torch.testing.assert_close(target[3].weight, src[3].weight.detach().to(torch.bfloat16), rtol=0, atol=0)


def test_averager_refuses_a_module_of_other_shapes_before_touching_it() -> None:
    ema = EMA(net(), decay=0.9)
    avg = {k: v.clone() for k, v in ema.state.tensors.items()}
    with pytest.raises(MismatchError, match=r'(?s)\(4 problem\(s\)\).*the module: tensor "1.weight" has shape \(5,\), '
                                            r"the average has \(6,\).*average the same architecture"):
        ema.update(net(5))
    with pytest.raises(MismatchError, match=r'missing 2 tensor\(s\) that the average has: "3.weight", "3.bias"'):
        ema.copy_to(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)))
    for k, v in ema.state.tensors.items():
        torch.testing.assert_close(v, avg[k], rtol=0, atol=0)


def test_load_state_dict_lists_names_and_shapes_together() -> None:
    ema = EMA(net(), decay=0.9)
    saved = EMA(net(5, extra=True), decay=0.9).state_dict()
    with pytest.raises(MismatchError, match="^the saved averaged tensors do not match") as info:
        ema.load_state_dict(saved)
    lines = str(info.value).splitlines()
    assert lines[0] == "the saved averaged tensors do not match this averager's (5 problem(s)):"
    assert lines[1] == '  the saved state: 2 unexpected tensor(s) that this averager lacks: "4.bias", "4.weight"'
    assert lines[2] == '  the saved state: tensor "1.weight" has shape (5,), this averager has (6,)'
    assert lines[-1] == "load the state of an averager of the same model"


def test_load_sharded_checks_shapes_before_reading(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.checkpoint")
    save_sharded(EMA(net(5), decay=0.9), tmp_path / "state")
    target = EMA(net(extra=True), decay=0.9)
    kept = {k: v.clone() for k, v in target.state.tensors.items()}
    with pytest.raises(MismatchError, match=re.escape(f'{tmp_path / "state"}: missing 2 tensor(s)')) as info:
        load_sharded(target, tmp_path / "state")
    msg = str(info.value)
    assert f'{tmp_path / "state"}: missing 2 tensor(s) that this averager has: "4.weight", "4.bias"' in msg
    assert f'{tmp_path / "state"}: tensor "1.running_mean" has shape (5,), this averager has (6,)' in msg
    for k, v in target.state.tensors.items():
        torch.testing.assert_close(v, kept[k], rtol=0, atol=0)
    with pytest.raises(MismatchError, match=r'(?s)\(4 problem\(s\)\).*"1.weight" has shape \(5,\), this averager has \(6,\)'):
        load_sharded(EMA(net(), decay=0.9), tmp_path / "state")  # the same names, other shapes
    same = EMA(net(5, seed=2), decay=0.9)
    load_sharded(same, tmp_path / "state")
    np.testing.assert_array_equal(same.state.tensors["0.weight"].numpy(), net(5).state_dict()["0.weight"].numpy())
