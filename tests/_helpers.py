"""Small helpers shared by tests: random states, writing members, independent references (tutorial
weights, the safetensors package, the per-step EMA, a power EMA)."""

from __future__ import annotations

from math import exp
from pathlib import Path

import ml_dtypes
import numpy as np

import polyak


def random_state(rng: np.random.Generator, *, dtypes: bool = True) -> dict[str, np.ndarray]:
    state = {
        "layer1.weight": rng.normal(size=(8, 5)).astype(np.float32),
        "layer1.bias": rng.normal(size=(8,)).astype(np.float32),
        "head.weight": rng.normal(size=(3, 8)).astype(np.float64),
        "scalar": np.array(rng.normal(), dtype=np.float32),
    }
    if dtypes:
        state["half"] = rng.normal(size=(4, 4)).astype(np.float16)
        state["brain"] = rng.normal(size=(6,)).astype(ml_dtypes.bfloat16)
        state["bn.num_batches_tracked"] = np.array(int(rng.integers(0, 100)), dtype=np.int64)
        state["mask"] = rng.random(5) > 0.5
    return state


def write_members(tmp_path: Path, states: list[dict[str, np.ndarray]], suffix: str = ".safetensors", stem: str = "ckpt") -> list[Path]:
    paths = []
    for i, st in enumerate(states):
        p = tmp_path / f"{stem}_{i}{suffix}"
        polyak.save(st, p)
        paths.append(p)
    return paths


def reference_average(states: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    """numpy.average in float64, cast back to each tensor's dtype; ints from the newest."""
    out = {}
    for name, newest in states[-1].items():
        if newest.dtype.kind in "biu":
            out[name] = newest
            continue
        stack = np.stack([s[name].astype(np.float64) for s in states])
        out[name] = np.average(stack, axis=0, weights=weights).astype(newest.dtype)
    return out


def tutorial_weights(scheme: str, n: int, alpha: float = 2.0) -> np.ndarray:
    """The tutorial's weight formulas (its code lists the newest member first), normalised
    and turned oldest → newest: the independent reference for polyak's schemes."""
    if scheme == "equal":
        w = [1.0 for _ in range(n)]
    elif scheme == "linear":
        w = [i / n for i in range(n, 0, -1)]
    elif scheme == "exponential":
        w = [exp(-i / alpha) for i in range(1, n + 1)]
    else:
        raise ValueError(f"no tutorial formula for {scheme!r}")
    arr = np.array(w[::-1])
    return arr / arr.sum()


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """A safetensors file as read by the ``safetensors`` package (not by polyak), in file order."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
            t = f.get_tensor(name)
            out[name] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    return out


def per_step_ema(executions: list[tuple[int, list[np.ndarray]]], start: int, every: int,
                 schedule: polyak.DecaySchedule) -> tuple[list[np.ndarray], int]:
    """The EMA over the optimizer steps ``start + k·every``, one by one, in float64; each
    step has the weights of the execution that ran it (seen at its last step)."""
    avg: list[np.ndarray] | None = None
    n, first = 0, 0
    for end, value in executions:
        for t in range(max(first, start), end + 1):
            if (t - start) % every == 0:
                d = schedule(n)
                avg = [v.astype(np.float64) for v in value] if avg is None else [
                    d * a + (1 - d) * v for a, v in zip(avg, value, strict=True)]
                n += 1
        first = end + 1
    assert avg is not None
    return avg, n


def power_gamma(sigma_rel: float) -> float:
    """γ of a power-function EMA from its σ_rel, independently of polyak: the largest real
    root of σ²(γ+2)²(γ+3) = γ+1, i.e. σ²γ³ + 7σ²γ² + (16σ² − 1)γ + 12σ² − 1 = 0."""
    s2 = sigma_rel**2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


class PowerEMA:
    """A power-function EMA written from its definition (Karras et al. 2024), in float64:
    after t updates, ema_t = β_t·ema_{t−1} + (1 − β_t)·θ_t with β_t = (1 − 1/t)^(γ+1)."""

    def __init__(self, sigma_rel: float) -> None:
        self.gamma = power_gamma(sigma_rel)
        self.t = 0
        self.value: dict[str, np.ndarray] = {}

    def update(self, state: dict[str, np.ndarray]) -> None:
        self.t += 1
        beta = (1.0 - 1.0 / self.t) ** (self.gamma + 1.0)
        for k, v in state.items():
            v = np.asarray(v, dtype=np.float64)
            self.value[k] = v.copy() if self.t == 1 else beta * self.value[k] + (1.0 - beta) * v
