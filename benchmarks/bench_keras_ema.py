"""EMACallback on every Keras backend: cost per update vs the memory bound, cost per step on a
small MLP, and Keras' own ``use_ema=True`` on the same backend.

Each backend runs in its own process (Keras fixes its backend at import); within a process
the cases run round-robin after warm-up, so that machine noise hits all alike, and the
ratios are taken within that process. Per backend:

* **update of a 100M-parameter model** (24 × Dense(2048), float32): ``EMACallback.update()``
  against the memory-bandwidth bound, the fastest of ``torch._foreach_lerp_`` (2 threads
  here) and numpy's in-place ``add`` (same traffic: read two arrays, write one) on fresh
  float32 arrays of the same sizes; and what a whole ``train_on_batch`` step costs plain,
  with ``use_ema=True`` and plus ``EMACallback.update()``;
* **small MLP** (20 × Dense(64) + Dense(8): 42 variables, batch 32): milliseconds per
  step of ``fit`` plain, with a callback that only reads one weight per batch (the
  reference of the targets), ``EMACallback(every=1)``, ``EMACallback(every=1000)`` and
  ``use_ema=True``.

Targets: update ≤ 1.5× the bound; on the MLP ``every=1`` ≤ 2× and ``every=1000`` ≤ 1.2×
the one-weight callback. Workers run with ``OMP_WAIT_POLICY=PASSIVE`` unless it is set. Run: ``.venv/bin/python benchmarks/bench_keras_ema.py``
(``--backends jax``; ``--quick``: 10M parameters, fewer rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

BACKENDS = ("torch", "jax", "tensorflow")


def _interleaved_ms(fns: list[Callable[[], object]], rounds: int, warmup: int = 2) -> list[float]:
    """Median ms of each function, run round-robin so that machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1000 * statistics.median(ts) for ts in times]


def _block(x: Any) -> Any:
    """Wait for asynchronous work (JAX dispatches asynchronously)."""
    import keras

    return keras.ops.convert_to_numpy(x)


def big_update(params: float, rounds: int) -> dict[str, Any]:
    """Per-update and per-step costs of a ~``params``-parameter model."""
    import keras
    import numpy as np

    import polyak.keras as pk

    width = 2048
    depth = max(1, round(params / (width * (width + 1))))

    def model(use_ema: bool = False) -> keras.Model:
        m = keras.Sequential([keras.Input((width,))] + [keras.layers.Dense(width) for _ in range(depth)])
        m.compile(optimizer=keras.optimizers.SGD(0.001, use_ema=use_ema, ema_momentum=0.999), loss="mse")
        return m

    plain = model()
    n = sum(int(np.prod(v.shape)) for v in plain.trainable_weights)
    ema = pk.EMACallback(0.999)
    ema.set_model(plain)
    ema.update(step=1)  # the first update copies

    def ours() -> None:
        ema.update()
        _block(ema._core.averages()[-1][:1])  # wait for the (asynchronous) update

    sizes = [tuple(v.shape) for v in plain.trainable_weights]
    rng = np.random.default_rng(0)
    avg = [rng.standard_normal(s, dtype=np.float32) for s in sizes]
    cur = [rng.standard_normal(s, dtype=np.float32) for s in sizes]

    def numpy_add() -> None:
        for a, c in zip(avg, cur, strict=True):
            np.add(a, c, out=a)

    fns: list[Callable[[], object]] = [ours, numpy_add]
    names = ["EMACallback.update", "numpy add"]
    try:
        import torch

        tavg = [torch.from_numpy(a.copy()) for a in avg]
        tcur = [torch.from_numpy(c) for c in cur]
        fns.append(lambda: torch._foreach_lerp_(tavg, tcur, 0.001))
        names.append("torch._foreach_lerp_")
    except ImportError:
        pass
    times = dict(zip(names, _interleaved_ms(fns, rounds), strict=True))
    bound = min(v for k, v in times.items() if k != "EMACallback.update")

    # Whole steps: plain, use_ema=True, plain + EMACallback.update().
    x = rng.standard_normal((8, width), dtype=np.float32)
    y = rng.standard_normal((8, width), dtype=np.float32)
    with_ema = model(use_ema=True)

    def step(m: keras.Model) -> Callable[[], object]:
        return lambda: m.train_on_batch(x, y)

    def step_and_update() -> None:
        plain.train_on_batch(x, y)
        ours()

    t_plain, t_use_ema, t_cb = _interleaved_ms([step(plain), step(with_ema), step_and_update], max(3, rounds // 2))
    return {"parameters": n, "depth": depth, "update_ms": times["EMACallback.update"], "bound_ms": bound,
            "bound_parts_ms": {k: v for k, v in times.items() if k != "EMACallback.update"},
            "step_plain_ms": t_plain, "step_use_ema_ms": t_use_ema, "step_plus_callback_ms": t_cb}


def small_mlp(rounds: int, steps: int) -> dict[str, Any]:
    """Per-step cost of fit on a 42-variable MLP with each callback."""
    import keras
    import numpy as np

    import polyak.keras as pk

    rng = np.random.default_rng(0)
    x = rng.standard_normal((32 * steps, 16), dtype=np.float32)
    y = rng.standard_normal((32 * steps, 8), dtype=np.float32)

    def model(use_ema: bool = False) -> keras.Model:
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((16,))] + [keras.layers.Dense(64, activation="relu") for _ in range(20)]
                             + [keras.layers.Dense(8)])
        m.compile(optimizer=keras.optimizers.SGD(1e-4, use_ema=use_ema, ema_momentum=0.99), loss="mse")
        return m

    class ReadOneWeight(keras.callbacks.Callback):
        """The reference: a callback that reads one weight after every batch."""

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            keras.ops.convert_to_numpy(self.model.weights[0])

    cases: dict[str, tuple[keras.Model, list[keras.callbacks.Callback]]] = {
        "plain": (model(), []),
        "read one weight": (model(), [ReadOneWeight()]),
        "EMACallback(every=1)": (model(), [pk.EMACallback(0.99)]),
        "EMACallback(every=1000)": (model(), [pk.EMACallback(0.99, every=1000)]),
        "use_ema=True": (model(use_ema=True), []),
    }
    assert len(cases["plain"][0].weights) == 42

    def run(m: keras.Model, cbs: list[keras.callbacks.Callback]) -> Callable[[], object]:
        def fit() -> None:
            m.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False, callbacks=cbs)
            _block(m.weights[-1])
            if m.optimizer.use_ema and keras.backend.backend() == "jax":
                # Keras 3.15's use_ema leaves each variable sharing its buffer with its
                # average after fit (variable.assign(average)); the next fit's jitted step
                # donates both and fails. A copy per variable (42 small arrays) unties them.
                for v in m.trainable_variables:
                    v.assign(keras.ops.copy(v.value))

        return fit

    times = _interleaved_ms([run(*c) for c in cases.values()], rounds)
    return {"steps": steps, "ms_per_step": {k: t / steps for k, t in zip(cases, times, strict=True)}}


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import keras

    out: dict[str, Any] = {"backend": keras.backend.backend(), "keras": keras.__version__}
    if out["backend"] == "jax":
        import jax

        out["version"] = f"jax {jax.__version__}"
    elif out["backend"] == "tensorflow":
        import tensorflow as tf

        out["version"] = f"tensorflow {tf.__version__}"
    else:
        import torch

        out["version"] = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    parts = args.parts.split(",")
    if "mlp" in parts:
        out["mlp"] = small_mlp(args.rounds, args.steps)
    if "big" in parts:
        out["big"] = big_update(args.params, args.rounds)
    return out


def _table(results: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    if "big" in results[0]:
        lines += [*_big_table(results), ""]
    if "mlp" in results[0]:
        lines += _mlp_table(results)
    return "\n".join(lines)


def _big_table(results: list[dict[str, Any]]) -> list[str]:
    lines = ["per update, ~100M parameters (ms; × the bound):",
             f"  {'backend':<11} {'bound':>8} {'EMACallback':>18} {'step plain':>11} {'+ use_ema':>16} {'+ EMACallback':>16}"]
    for r in results:
        b = r["big"]
        lines.append(
            f"  {r['backend']:<11} {b['bound_ms']:8.1f} {b['update_ms']:9.1f} ({b['update_ms'] / b['bound_ms']:4.2f}×)"
            f" {b['step_plain_ms']:11.1f} {b['step_use_ema_ms'] - b['step_plain_ms']:+9.1f} ms"
            f"      {b['step_plus_callback_ms'] - b['step_plain_ms']:+9.1f} ms")
    return lines


def _mlp_table(results: list[dict[str, Any]]) -> list[str]:
    names = list(results[0]["mlp"]["ms_per_step"])
    lines = ["small MLP (42 variables), fit, ms per step (× the read-one-weight callback):",
              "  " + f"{'backend':<11}" + "".join(f"{n:>26}" for n in names)]
    for r in results:
        per = r["mlp"]["ms_per_step"]
        ref = per["read one weight"]
        lines.append("  " + f"{r['backend']:<11}" + "".join(f"{per[n]:17.3f} ({per[n] / ref:4.2f}×)" for n in names))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10M parameters, 3 rounds, 64 steps")
    parser.add_argument("--params", type=float, default=100e6, help="approximate parameter count")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=256, help="fit steps per MLP measurement")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--parts", default="mlp,big", help="mlp (small MLP), big (100M update), or both")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.params, args.rounds, args.steps = 10e6, 3, 64
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    results = []
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--worker", "--params", str(args.params), "--rounds", str(args.rounds),
               "--steps", str(args.steps), "--parts", args.parts]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        # On a shared machine an OpenMP thread that spins while another process holds the
        # core makes torch 10-20x slower per small step; waiting passively avoids that.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(f"{backend}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
            return 1
        res = json.loads(r.stdout.strip().splitlines()[-1])
        big = f"; {res['big']['depth']} × Dense(2048) = {res['big']['parameters'] / 1e6:.1f}M parameters" if "big" in res else ""
        print(f"{backend}: {res['version']}, keras {res['keras']}{big}; {time.perf_counter() - t0:.0f} s", flush=True)
        results.append(res)
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
