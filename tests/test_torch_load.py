"""load_average streams into the module's own tensors: numbers, dtypes, ties, memory; and
update_bn runs dict batches without their labels."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.optim.swa_utils import update_bn as torch_update_bn  # noqa: E402

import polyak  # noqa: E402
from _helpers import write_members  # noqa: E402
from polyak import ConfigError, MismatchError, NonFiniteError  # noqa: E402
from polyak._engine.kernel import CHUNK  # noqa: E402
from polyak.torch import load_average, update_bn  # noqa: E402

#: Large enough that the biggest tensor spans several chunks and is split over two threads.
WIDE = 2 * CHUNK // 256


class Net(torch.nn.Module):
    """A tied embedding/head pair, a wide layer and a BatchNorm (an integer buffer)."""

    def __init__(self, wide: int = WIDE) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.wide = torch.nn.Linear(256, wide)
        self.norm = torch.nn.BatchNorm1d(8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight


def states(n: int, dtype: type = np.float32, wide: int = WIDE) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        st = {name: rng.normal(size=t.shape).astype(dtype) for name, t in Net(wide).state_dict().items()
              if t.is_floating_point() and name != "head.weight"}  # a tied tensor is stored once
        st["norm.num_batches_tracked"] = np.array(10 * i, np.int64)
        out.append(st)
    return out


def reference(members: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    return {k: np.average(np.stack([m[k].astype(np.float64) for m in members]), axis=0, weights=weights)
            for k in members[-1] if members[-1][k].dtype.kind == "f" or members[-1][k].dtype == ml_dtypes.bfloat16}


@pytest.mark.parametrize(("module_dtype", "member_dtype", "suffix", "rtol"), [
    (torch.float32, np.float32, ".safetensors", 1e-6),   # summed straight into the module's tensors
    (torch.bfloat16, np.float32, ".safetensors", 8e-3),  # chunk by chunk, cast into bfloat16
    (torch.float64, np.float16, ".safetensors", 1e-6),   # float16 members, float64 module: float64 sums
    (torch.float32, np.float32, ".npz", 1e-6),           # members read one at a time
    (torch.bfloat16, np.float32, ".npz", 8e-3),          # ... into a buffer, then cast
])
def test_streamed_average_equals_numpy(tmp_path: Path, module_dtype: torch.dtype, member_dtype: type,
                                       suffix: str, rtol: float) -> None:
    members = states(3, member_dtype)
    module = Net().to(module_dtype)
    ids = {name: id(t) for name, t in module.state_dict(keep_vars=True).items()}
    report = load_average(module, write_members(tmp_path, members, suffix), scheme="linear")
    assert report.missing == [] and report.unexpected == []
    assert report.loaded == list(module.state_dict())  # every name, the tied head's too
    assert {name: id(t) for name, t in module.state_dict(keep_vars=True).items()} == ids  # same tensors
    assert module.head.weight is module.embed.weight
    expected = reference(members, [1, 2, 3])
    state = module.state_dict()
    for name, value in expected.items():
        got = state[name].float().numpy() if module_dtype == torch.bfloat16 else state[name].numpy()
        assert state[name].dtype == module_dtype
        np.testing.assert_allclose(got, value, rtol=rtol, atol=rtol)
    assert int(state["norm.num_batches_tracked"]) == 20  # copied from the newest, never averaged


def test_extra_memory_is_a_few_chunks_not_the_model(tmp_path: Path) -> None:
    members = states(4, wide=3 * WIDE)
    paths = write_members(tmp_path, members)
    module = Net(3 * WIDE)
    largest = module.wide.weight.numel() * 4
    tracemalloc.start()  # numpy's allocations are traced (torch's are not: the module is torch's)
    try:
        tracemalloc.reset_peak()
        load_average(module, paths, scheme="exponential")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Scratch of a chunk per thread, not one copy of even the largest tensor (polyak 0.1 held
    # the whole average: the model's size). The ratio to a real model: docs/benchmarks.md.
    assert peak <= 2 * CHUNK * 4 + 256 * 1024 < largest / 2, (peak, largest)
    np.testing.assert_allclose(module.wide.weight.detach().numpy(), reference(
        members, list(polyak.scheme_weights("exponential", 4)))["wide.weight"], rtol=1e-6, atol=1e-6)


def test_names_and_shapes_are_checked_before_the_module_is_touched(tmp_path: Path) -> None:
    members = states(2)
    members[-1]["wide.bias"] = np.zeros(5, np.float32)  # in the middle of the file's order
    for m in members:
        m.pop("embed.weight")  # neither name of the tied pair: both are missing
    module = Net()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    members[0]["wide.bias"] = np.zeros(5, np.float32)
    with pytest.raises(MismatchError, match=r'(?s)missing 2 tensor\(s\) that the module has: "embed.weight", '
                                            r'"head.weight".*"wide.bias" has shape \(5,\), the module has'):
        load_average(module, write_members(tmp_path, members))
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_a_tie_needs_agreeing_values(tmp_path: Path) -> None:
    members = states(2)
    for m in members:
        m["head.weight"] = m["embed.weight"].copy()  # both names stored (polyak's own .safetensors of a .pt)
    module = Net()
    (tmp_path / "ok").mkdir()
    load_average(module, write_members(tmp_path / "ok", members))
    np.testing.assert_allclose(module.head.weight.detach().numpy(), reference(members, [1, 1])["embed.weight"],
                               rtol=1e-6, atol=1e-7)
    members[1]["head.weight"] += 1.0  # an untied checkpoint into a tied module
    (tmp_path / "bad").mkdir()
    with pytest.raises(MismatchError, match="the module ties 'head.weight' to 'embed.weight'.*different values"):
        load_average(module, write_members(tmp_path / "bad", members))


def test_nonfinite_member_and_unknown_options(tmp_path: Path) -> None:
    members = states(2)
    members[0]["wide.weight"][5, 7] = np.inf
    with pytest.raises(NonFiniteError, match=r'"wide.weight" has NaN or Inf values in: .*ckpt_0.safetensors'):
        load_average(Net(), write_members(tmp_path, members))
    with pytest.raises(ConfigError, match="does not take dtype, workers: it fills a module in place"):
        load_average(Net(), [], dtype="float16", workers=2)
    with pytest.raises(ConfigError, match=r"polyak.average\(out=...\)"):
        load_average(Net(), [], out="x.safetensors")


def test_update_bn_drops_the_labels_of_dict_batches() -> None:
    """polyak 0.1 called model(**batch) with the labels: a model taking only x failed."""

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))

    class OnlyX(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(10, 4, generator=g) * 2 + 1, torch.randint(0, 3, (10,), generator=g)) for _ in range(4)]
    ours, ref = OnlyX(), make()
    assert update_bn(ours, [{"x": x, "labels": y} for x, y in pairs]) == 4
    torch_update_bn(pairs, ref)
    torch.testing.assert_close(ours.net[1].running_mean, ref[1].running_mean)
    torch.testing.assert_close(ours.net[1].running_var, ref[1].running_var)
    # the same rule as evaluator's: the first of labels/label/targets/target/y holds the targets
    update_bn(ours, [{"x": x, "target": y} for x, y in pairs])
    torch.testing.assert_close(ours.net[1].running_var, ref[1].running_var)


def test_tensors_the_engine_cannot_sum_into_are_copied(tmp_path: Path) -> None:
    """Non-contiguous (and, on a GPU, device) tensors get the finished average by copy_."""

    class Strided(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("t", torch.zeros(4, 6, dtype=torch.bfloat16).t())  # a (6, 4) view

    rng = np.random.default_rng(5)
    members = [{"t": rng.normal(size=(6, 4)).astype(np.float32)} for _ in range(3)]
    module = Strided()
    assert not module.t.is_contiguous()
    load_average(module, write_members(tmp_path, members), scheme="linear")
    assert not module.t.is_contiguous() and module.t.dtype == torch.bfloat16
    expected = reference(members, [1, 2, 3])["t"]
    np.testing.assert_allclose(module.t.float().numpy(), expected, rtol=8e-3, atol=8e-3)
