"""EMACallback update cost per step vs Keras' ``use_ema=True``, and vs the memory bound.

Builds a Keras 3 MLP of about ``--params`` parameters on the torch backend and times, in
the same run:

* ``EMACallback.update()`` (one multi-tensor ``torch._foreach_lerp_`` over the variables'
  own tensors),
* Keras' own EMA step of ``use_ema=True``
  (``optimizer._update_model_variables_moving_average``, what every training step adds),
* the memory-bandwidth bound: ``torch._foreach_lerp_`` on fresh float32 tensors of the
  same sizes (read average + weights, write average).

Prints median milliseconds per update and the ratios. Run:
``PYTHONPATH=src .venv/bin/python benchmarks/bench_keras_ema.py`` (``--quick``: 10M).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("KERAS_BACKEND", "torch")


def _interleaved_ms(fns: list[Callable[[], object]], reps: int) -> list[float]:
    """Median ms of each function, run round-robin so that machine noise hits all alike."""
    for _ in range(3):  # warm up: first touches of fresh memory are page faults
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1000 * statistics.median(ts) for ts in times]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10M parameters, 3 repetitions")
    parser.add_argument("--params", type=float, default=100e6, help="approximate parameter count")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    params = 10e6 if args.quick else args.params
    reps = 3 if args.quick else args.reps

    import keras
    import torch

    if keras.backend.backend() != "torch":
        print("skipped: needs KERAS_BACKEND=torch")
        return 0
    import polyak.keras as pk

    width, depth = 2048, max(1, round(params / (2048 * 2049)))
    layers = [keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(depth)]
    model = keras.Sequential(layers)
    n = sum(int(v.numpy().size) for v in model.trainable_weights)
    print(f"model: {depth} × Dense({width}), {n / 1e6:.1f}M parameters, float32, torch {torch.__version__}, "
          f"keras {keras.__version__}, {torch.get_num_threads()} threads")

    ema = pk.EMACallback(0.999)
    ema.set_model(model)
    ema.update(step=1)  # first update copies

    opt = keras.optimizers.SGD(0.01, use_ema=True, ema_momentum=0.999)
    opt.build(model.trainable_variables)
    opt.iterations.assign(1)

    avg = [torch.randn(tuple(v.shape)) for v in model.trainable_weights]
    cur = [torch.randn(tuple(v.shape)) for v in model.trainable_weights]
    t_ours, t_keras, t_bound = _interleaved_ms(
        [
            lambda: ema.update(),
            lambda: opt._update_model_variables_moving_average(model.trainable_variables),
            lambda: torch._foreach_lerp_(avg, cur, 0.001),
        ],
        reps,
    )

    print("the averaging update alone:")
    print(f"  EMACallback.update:          {t_ours:8.1f} ms/step  ({t_ours / t_bound:.2f}× the bound)")
    print(f"  Keras use_ema=True EMA step: {t_keras:8.1f} ms/step  ({t_keras / t_bound:.2f}× the bound)")
    print(f"  bound (_foreach_lerp_):      {t_bound:8.1f} ms/step")
    print(f"  EMACallback is {t_keras / t_ours:.1f}× faster than use_ema's update")

    # What each adds to a whole training step (train_on_batch, SGD, batch of 8 rows):
    # use_ema=True vs a plain optimizer, and a plain optimizer + EMACallback.update().
    def compiled(use_ema: bool) -> keras.Model:
        m = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(depth)])
        m.compile(optimizer=keras.optimizers.SGD(0.001, use_ema=use_ema, ema_momentum=0.999), loss="mse")
        return m

    x = torch.randn(8, width).numpy()
    y = torch.randn(8, width).numpy()
    plain, with_ema = compiled(False), compiled(True)
    cb = pk.EMACallback(0.999)
    cb.set_model(plain)
    cb.update(step=1)

    def plain_plus_callback() -> None:
        plain.train_on_batch(x, y)
        cb.update()

    t_plain, t_use_ema, t_cb = _interleaved_ms(
        [lambda: plain.train_on_batch(x, y), lambda: with_ema.train_on_batch(x, y), plain_plus_callback],
        max(3, reps // 2),
    )
    print("a whole training step (train_on_batch, batch 8):")
    print(f"  plain SGD:                   {t_plain:8.1f} ms")
    print(f"  SGD(use_ema=True):           {t_use_ema:8.1f} ms  (+{t_use_ema - t_plain:.1f} ms)")
    print(f"  plain SGD + EMACallback:     {t_cb:8.1f} ms  (+{t_cb - t_plain:.1f} ms)")
    if t_cb - t_plain > 0:
        print(f"  use_ema adds {(t_use_ema - t_plain) / (t_cb - t_plain):.1f}× what EMACallback adds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
