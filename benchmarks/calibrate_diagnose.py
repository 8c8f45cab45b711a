"""Calibrate polyak.diagnose's thresholds on the tutorial's experiment (numpy only).

Trains the tutorial's MLP (2 → 25 relu → 3 softmax, he_uniform, SGD lr 0.01 momentum 0.9,
batch 32, 500 epochs, make_blobs(1100, centers=3, cluster_std=2, random_state=2), first 100
rows train) from several seeds, keeps epochs 490..499 of each run, and prints the relative
distances and cosines that polyak.diagnose reports within one run, across runs, and for an
early checkpoint of the same run, with the test accuracy of averaging across runs.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/calibrate_diagnose.py`` (needs scikit-learn).
"""

from __future__ import annotations

import sys
import warnings

import numpy as np
from sklearn.datasets import make_blobs

import polyak


def train(seed: int, x: np.ndarray, y: np.ndarray, epochs: int = 500, keep: range = range(490, 500)):
    rng = np.random.default_rng(seed)
    lim1, lim2 = np.sqrt(6 / 2), np.sqrt(6 / 25)  # he_uniform: sqrt(6 / fan_in)
    p = {"w1": rng.uniform(-lim1, lim1, (2, 25)), "b1": np.zeros(25),
         "w2": rng.uniform(-lim2, lim2, (25, 3)), "b2": np.zeros(3)}
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    onehot = np.eye(3)[y]
    saved = {}
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        for s in range(0, len(x), 32):
            idx = order[s:s + 32]
            xb, yb = x[idx], onehot[idx]
            h = np.maximum(xb @ p["w1"] + p["b1"], 0)
            z = h @ p["w2"] + p["b2"]
            e = np.exp(z - z.max(axis=1, keepdims=True))
            prob = e / e.sum(axis=1, keepdims=True)
            dz = (prob - yb) / len(idx)
            dh = (dz @ p["w2"].T) * (h > 0)
            grads = {"w2": h.T @ dz, "b2": dz.sum(0), "w1": xb.T @ dh, "b1": dh.sum(0)}
            for k in p:
                vel[k] = 0.9 * vel[k] - 0.01 * grads[k]
                p[k] = p[k] + vel[k]
        if epoch in keep or epoch == 10:
            saved[epoch] = {k: v.astype(np.float32).copy() for k, v in p.items()}
    return saved


def accuracy(state, x, y) -> float:
    h = np.maximum(x @ state["w1"] + state["b1"], 0)
    return float(np.mean(np.argmax(h @ state["w2"] + state["b2"], axis=1) == y))


def main(argv: list[str] | None = None) -> int:
    x, y = make_blobs(n_samples=1100, centers=3, n_features=2, cluster_std=2, random_state=2)
    trx, tex, try_, tey = x[:100], x[100:], y[:100], y[100:]
    runs = [train(seed, trx, try_) for seed in range(4)]
    print(f"{'case':<46} {'max rel. distance':>18} {'min cosine':>11}")
    within = []
    for r in runs:
        d = polyak.diagnose([r[e] for e in range(490, 500)], warn=False)
        within.append((max(d.distance), min(min(row) for row in d.cosine)))
    print(f"{'one run, epochs 490..499 (worst of 4 runs)':<46} {max(w[0] for w in within):18.4f} {min(w[1] for w in within):11.4f}")
    cross = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            d = polyak.diagnose([runs[i][499], runs[j][499]], warn=False)
            avg = polyak.average([runs[i][499], runs[j][499]])
            cross.append((max(d.distance), d.cosine[0][1], accuracy(avg, tex, tey),
                          (accuracy(runs[i][499], tex, tey) + accuracy(runs[j][499], tex, tey)) / 2))
    print(f"{'two runs, final epochs (closest of 6 pairs)':<46} {min(c[0] for c in cross):18.4f} {max(c[1] for c in cross):11.4f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = polyak.diagnose([runs[0][10], runs[0][499]], warn=False)
    print(f"{'one run, epoch 10 vs epoch 499':<46} {max(d.distance):18.4f} {d.cosine[0][1]:11.4f}")
    print("test accuracy, average of two runs' final weights vs mean of the two alone:")
    for c in cross:
        print(f"  {c[2]:.3f} vs {c[3]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
