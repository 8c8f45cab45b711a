"""`polyak demo` against the tutorial's own way of running the same experiment.

The tutorial's way, reimplemented faithfully in Keras 3: 500 separate ``fit(epochs=1)``
calls, ``model.save`` after epochs 490..499, ``load_model`` of the ten files, then for
each of its three listings (equal, linear, exponential) ``evaluate`` of every single
model and of the average of the newest n = 1..10 (``clone_model`` + ``set_weights`` +
``compile`` + ``evaluate``): 60 ``evaluate`` calls. Against it: one repetition of
``polyak demo`` (Keras, and ``--framework torch``) and ``--repeats 30`` of each, all
after the imports, in the same process and run.

    python benchmarks/bench_demo.py            # full sizes (~5 minutes on 2 cores)
    python benchmarks/bench_demo.py --quick    # 50 epochs, 3 repeats: checks that it runs
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def tutorial_way(epochs: int, members: int, workdir: Path) -> float:
    """The tutorial's listings, one after the other; returns seconds."""
    import keras
    import numpy as np

    from polyak.demo._data import load_blobs, one_hot

    d = load_blobs()
    trainX, trainy = d.x_train, one_hot(d.y_train, 3)
    testX, testy = d.x_holdout, one_hot(d.y_holdout, 3)
    t0 = time.perf_counter()
    model = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(25, activation="relu", kernel_initializer="he_uniform"), keras.layers.Dense(3, activation="softmax")]
    )
    opt = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    model.compile(loss="categorical_crossentropy", optimizer=opt, metrics=["accuracy"])
    for i in range(epochs):
        model.fit(trainX, trainy, epochs=1, verbose=0)
        if i >= epochs - members:
            model.save(workdir / f"model_{i}.keras")
    loaded = [keras.models.load_model(workdir / f"model_{i}.keras") for i in range(epochs - members, epochs)]
    loaded = list(reversed(loaded))  # newest first, as the tutorial

    def ensemble(subset: list, weights: list[float]) -> keras.Model:  # type: ignore[type-arg]
        avg = [np.average(np.array([m.get_weights()[layer] for m in subset]), axis=0, weights=weights) for layer in range(len(subset[0].get_weights()))]
        new = keras.models.clone_model(subset[0])
        new.set_weights(avg)
        new.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9), metrics=["accuracy"])
        return new

    for scheme in ("equal", "linear", "exponential"):
        for n in range(1, members + 1):
            if scheme == "equal":
                w = [1.0 for _ in range(n)]
            elif scheme == "linear":
                w = [i / n for i in range(n, 0, -1)]
            else:
                w = [float(np.exp(-i / 2.0)) for i in range(1, n + 1)]
            ensemble(loaded[:n], w).evaluate(testX, testy, verbose=0)
            loaded[n - 1].evaluate(testX, testy, verbose=0)
    return time.perf_counter() - t0


def polyak_demo(framework: str, epochs: int, members: int, repeats: int, out: Path) -> float:
    from polyak.demo._experiment import DemoConfig
    from polyak.demo._run import run_demo
    from polyak.demo._train import Recipe

    cfg = DemoConfig(framework=framework, recipe=Recipe(epochs=epochs, members=members))
    t0 = time.perf_counter()
    run_demo(cfg, seed=1, repeats=repeats, out=out, quiet=True, echo=lambda s: None)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 epochs, 3 repeats")
    args = parser.parse_args(argv)
    epochs, repeats = (50, 3) if args.quick else (500, 30)
    warnings.simplefilter("ignore")  # Keras' numpy-2 deprecation chatter
    import keras  # noqa: F401  (imports are not timed)
    import matplotlib.figure  # noqa: F401
    import torch  # noqa: F401

    print(f"cores: {os.cpu_count()}, load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"epochs {epochs}, 10 members; times after imports, in seconds")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "tut").mkdir()
        rows = [(f"tutorial's way (Keras: {epochs} fit calls, 10 save/load, 60 evaluate)", tutorial_way(epochs, 10, root / "tut"))]
        rows.append(("polyak demo (Keras, one fit call)", polyak_demo("keras", epochs, 10, 1, root / "k1")))
        rows.append(("polyak demo --framework torch", polyak_demo("torch", epochs, 10, 1, root / "t1")))
        rows.append((f"polyak demo --framework torch --repeats {repeats}", polyak_demo("torch", epochs, 10, repeats, root / "tr")))
        rows.append((f"polyak demo --repeats {repeats} (Keras)", polyak_demo("keras", epochs, 10, repeats, root / "kr")))
    base = rows[0][1]
    for label, secs in rows:
        print(f"{label:<70} {secs:8.2f} s  {base / secs:6.1f}x")
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
