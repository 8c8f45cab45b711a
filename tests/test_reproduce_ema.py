"""The table "reproduce your current EMA with polyak" (docs/torch.md), one test per line.

Each test trains a small model, runs the other library's EMA (or its published rule) next to
polyak's with the options the table gives, and compares every averaged tensor to 1e-6.
The lines for Lightning's EMAWeightAveraging, torch.optim.swa_utils and Keras' use_ema are
tested in test_lightning.py, test_torch_ema.py and test_keras_api.py (named in the table).

timm is not installed here (it needs torchvision, whose wheel in this environment is a CUDA
build that does not load with the CPU torch), so ModelEmaV3 is the rule written in timm's
timm/utils/model_ema.py, restated below from its documented behaviour: the average starts
as a copy of the model; ``update(model, step)`` uses ``decay = 0`` when
``s = max(0, step − update_after_step − 1)`` is 0, else ``decay`` or, with
``use_warmup``, ``1 − (1 + s/warmup_gamma)^(−warmup_power)`` clamped to ``[min_decay,
decay]``; ``update(model)`` without a step uses ``decay`` from the first call; floating
tensors of the state dict are lerped with weight ``1 − decay``, the others copied. timm's
train.py calls ``update(model, step=num_updates)`` with ``num_updates`` counting optimizer
steps from 1.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from _one_thread import one_torch_thread  # noqa: E402, F401
from polyak.torch import EMA  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 2))


def _train(model: torch.nn.Module, steps: int, after_step) -> None:
    """SGD on fixed random batches; ``after_step(k)`` after optimizer step k = 1, 2, ..."""
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    for k in range(1, steps + 1):
        x = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), torch.sin(x[:, :2])).backward()
        opt.step()
        after_step(k)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _timm_v3(init, snapshots, *, decay, min_decay=0.0, update_after_step=0, use_warmup=False,
             warmup_gamma=1.0, warmup_power=2 / 3, with_step=True):
    """timm ModelEmaV3 (see the module docstring), in float64."""
    ema = {k: v.double() if v.is_floating_point() else v.clone() for k, v in init.items()}
    for step, x in enumerate(snapshots, start=1):
        if with_step:
            s = max(0, step - update_after_step - 1)
            if s <= 0:
                d = 0.0
            elif use_warmup:
                d = max(min(1 - (1 + s / warmup_gamma) ** -warmup_power, decay), min_decay)
            else:
                d = decay
        else:
            d = decay
        ema = {k: (d * e + (1 - d) * x[k].double()) if e.is_floating_point() else x[k].clone() for k, e in ema.items()}
    return ema


def _assert_equal_averages(polyak_ema: EMA, reference: dict[str, torch.Tensor], raw: dict[str, torch.Tensor]) -> None:
    assert sorted(polyak_ema.state.tensors) == sorted(reference)
    for name, ref in reference.items():
        mine = polyak_ema.state.tensors[name]
        if ref.is_floating_point():
            torch.testing.assert_close(mine.double(), ref.double(), rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(mine, ref), name
    # not a vacuous comparison: the average is not the last weights
    assert not torch.allclose(polyak_ema.state.tensors["0.weight"], raw["0.weight"], atol=1e-3)


@pytest.mark.parametrize(
    ("timm", "ours"),
    [
        ({"decay": 0.9}, {"decay": 0.9}),
        ({"decay": 0.95, "update_after_step": 7}, {"decay": 0.95, "start": 8}),
        ({"decay": 0.99, "use_warmup": True}, {"decay": 0.99, "warmup": "timm"}),
        ({"decay": 0.99, "use_warmup": True, "warmup_power": 0.75, "warmup_gamma": 2.0, "min_decay": 0.3,
          "update_after_step": 5},
         {"decay": 0.99, "warmup": "timm", "warmup_power": 0.75, "warmup_gamma": 2.0, "min_decay": 0.3, "start": 6}),
    ],
    ids=["decay", "update_after_step", "warmup", "warmup-all-options"],
)
def test_timm_model_ema_v3(timm, ours):
    model = _model()
    init, snaps = _snapshot(model), []
    ema = EMA(model, **ours)

    def after(k):
        snaps.append(_snapshot(model))
        ema.update(step=k)

    _train(model, 40, after)
    _assert_equal_averages(ema, _timm_v3(init, snaps, **timm), snaps[-1])


def test_timm_model_ema_v3_updated_without_step():
    """``update(model)`` with no step: constant decay from the first update, blending in the
    weights the average was created with; polyak: one ``update()`` before training (its
    first update copies them)."""
    model = _model()
    init, snaps = _snapshot(model), []
    ema = EMA(model, decay=0.8)
    ema.update()  # at construction: the average starts as the initial weights

    def after(k):
        snaps.append(_snapshot(model))
        ema.update()

    _train(model, 15, after)
    _assert_equal_averages(ema, _timm_v3(init, snaps, decay=0.8, with_step=False), snaps[-1])


def _ema_pytorch_vs_polyak(theirs: dict, ours: dict, steps: int) -> None:
    ema_pytorch = pytest.importorskip("ema_pytorch")
    model = _model()
    ref = ema_pytorch.EMA(model, **theirs)
    ema = EMA(model, **ours)
    last = {}

    def after(k):
        ref.update()
        ema.update(step=k)
        last.update(_snapshot(model))

    _train(model, steps, after)
    # ema-pytorch averages floating tensors only; its copy keeps integer buffers as created
    reference = {k: v for k, v in ref.ema_model.state_dict().items() if v.is_floating_point()}
    assert int(ref.ema_model.state_dict()["1.num_batches_tracked"]) == 0
    # polyak copies the live count at each averaged step (the last: start + j·every ≤ steps)
    last_averaged = ours["start"] + (steps - ours["start"]) // ours["every"] * ours["every"]
    assert int(ema.state.tensors.pop("1.num_batches_tracked")) == last_averaged
    _assert_equal_averages(ema, reference, last)


def test_ema_pytorch_defaults():
    """``ema_pytorch.EMA(model)``: beta 0.9999, update_after_step 100, update_every 10,
    inv_gamma 1, power 2/3 — its warmup counts training steps since update_after_step, so
    polyak's (which counts averaging updates) takes ``warmup_gamma = inv_gamma / update_every``."""
    _ema_pytorch_vs_polyak({}, {"decay": 0.9999, "warmup": "timm", "warmup_gamma": 0.1, "every": 10, "start": 101},
                           steps=230)


def test_ema_pytorch_other_options():
    theirs = {"beta": 0.95, "update_after_step": 6, "update_every": 3, "inv_gamma": 2.0, "power": 0.75,
              "min_value": 0.2}
    ours = {"decay": 0.95, "warmup": "timm", "warmup_gamma": 2.0 / 3, "warmup_power": 0.75, "min_decay": 0.2,
            "every": 3, "start": 7}
    _ema_pytorch_vs_polyak(theirs, ours, steps=40)
