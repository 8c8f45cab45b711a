"""PyTorch .pt checkpoints: weights_only loading, nesting, prefixes, tied tensors."""

import ml_dtypes
import numpy as np
import pytest

import polyak
from _helpers import tutorial_weights
from polyak import ConfigError, UnsafeFileError
from polyak.formats import open_source

torch = pytest.importorskip("torch")


def sd(seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    m[1].num_batches_tracked.fill_(seed)
    return m.state_dict()


def test_pt_matches_numpy_average_and_torch_loads_output(tmp_path):
    sds = [sd(i) for i in range(4)]
    paths = []
    for i, s in enumerate(sds):
        paths.append(tmp_path / f"epoch_{i}.pt")
        torch.save(s, paths[-1])
    out = tmp_path / "avg.pt"
    polyak.average(paths, scheme="linear", out=out)
    got = torch.load(out, weights_only=True)
    w = tutorial_weights("linear", 4)
    for k, v in sds[-1].items():
        if v.is_floating_point():
            want = np.average(np.stack([s[k].numpy() for s in sds]), axis=0, weights=w)
            np.testing.assert_allclose(got[k].numpy(), want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got[k], v)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    m.load_state_dict(got)


def test_nested_key_default_and_ambiguous(tmp_path):
    p = tmp_path / "ckpt_1.pt"
    torch.save({"model": sd(1), "optimizer": {"state": {}, "param_groups": []}, "epoch": 3}, p)
    with open_source(p) as src:
        assert "0.weight" in src.infos()
        assert src.key == "model"
    q = tmp_path / "ckpt_2.pt"
    torch.save({"model": sd(1), "ema": sd(2)}, q)
    with pytest.raises(ConfigError, match=r"'model', 'ema'.*--key"):
        open_source(q)
    with open_source(q, key="ema") as src:
        np.testing.assert_array_equal(src.read("0.weight"), sd(2)["0.weight"].numpy())
    with pytest.raises(ConfigError, match="no key 'nope'"):
        open_source(q, key="nope")
    # the output keeps the nesting key and records polyak metadata
    out = tmp_path / "avg.pt"
    torch.save({"model": sd(3), "epoch": 4}, tmp_path / "ckpt_3.pt")
    polyak.average([p, tmp_path / "ckpt_3.pt"], out=out)
    loaded = torch.load(out, weights_only=True)
    assert set(loaded) == {"model", "polyak"}


def test_unsafe_pickle_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Evil()}, p)
    with pytest.raises(UnsafeFileError, match="weights_only=True"):
        open_source(p)
    assert not marker.exists()


def test_bf16_and_prefix_and_tied(tmp_path):
    w = torch.randn(5, 3).to(torch.bfloat16)
    state = {"module.emb.weight": w, "module.head.weight": w, "module.b": torch.zeros(3, dtype=torch.bfloat16)}
    p1, p2 = tmp_path / "a_1.pt", tmp_path / "a_2.pt"
    torch.save(state, p1)
    torch.save(state, p2)
    with open_source(p1) as src:
        assert src.infos()["module.emb.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
        assert src.aliases() == {"module.head.weight": "module.emb.weight"}
    out = tmp_path / "avg.pt"
    polyak.average([p1, p2], out=out, strip_prefix=["module."])
    got = torch.load(out, weights_only=True)
    assert set(got) == {"emb.weight", "head.weight", "b"}
    assert got["emb.weight"].dtype == torch.bfloat16
    assert torch.equal(got["emb.weight"], w)
    # tied tensors are written once: both names share storage
    assert got["emb.weight"].data_ptr() == got["head.weight"].data_ptr()


def test_pt_to_safetensors_and_back(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    s = sd(5)
    torch.save(s, tmp_path / "m_1.pt")
    polyak.average([tmp_path / "m_1.pt"], out=tmp_path / "m.safetensors")
    back = st.load_file(tmp_path / "m.safetensors")
    for k in s:
        assert torch.equal(back[k], s[k])
    polyak.average([tmp_path / "m.safetensors"], out=tmp_path / "m2.pt")
    again = torch.load(tmp_path / "m2.pt", weights_only=True)
    for k in s:
        assert torch.equal(again[k], s[k])


def test_in_memory_torch_state_dicts():
    sds = [sd(i) for i in range(3)]
    got = polyak.average(sds, scheme="exponential")
    w = tutorial_weights("exponential", 3)
    want = np.average(np.stack([s["2.weight"].numpy() for s in sds]), axis=0, weights=w)
    np.testing.assert_allclose(got["2.weight"], want, rtol=1e-6)
