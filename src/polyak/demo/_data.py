"""The tutorial's data: three Gaussian blobs in 2-D, exactly as scikit-learn makes them.

The tutorial calls ``make_blobs(n_samples=1100, centers=3, n_features=2, cluster_std=2,
random_state=2)``, trains on the first 100 rows and tests on the last 1000. To keep
scikit-learn out of polyak's runtime dependencies, :func:`make_blobs` replays the same
draws from :class:`numpy.random.RandomState` in the same order (the test suite checks it
equals scikit-learn's output bit for bit):

1. the centres, ``uniform(-10, 10, size=(centers, n_features))``;
2. for each centre in turn, its ``n_samples // centers`` points (the first
   ``n_samples % centers`` centres get one more), ``normal(centre, std, size=(n, n_features))``;
3. one shuffle of the row indices, ``RandomState.shuffle(arange(n_samples))``.

The 1000 held-out rows are split for "selection done right": held-out rows 0..499
(rows 100..599 of the data set) are the **validation** half, used to choose the scheme
and the number of members; held-out rows 500..999 (rows 600..1099) are the **test**
half, used only to report the choice. The rows are already in random order
(``make_blobs`` shuffles), so a contiguous split is a random one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["N_TRAIN", "N_VALIDATION", "Blobs", "load_blobs", "make_blobs", "one_hot"]

#: The tutorial's data set: ``make_blobs(**TUTORIAL_BLOBS)``.
TUTORIAL_BLOBS = {"n_samples": 1100, "centers": 3, "n_features": 2, "cluster_std": 2.0, "random_state": 2}
#: The tutorial trains on the first 100 rows and holds out the last 1000.
N_TRAIN = 100
#: The first 500 held-out rows are validation, the last 500 test.
N_VALIDATION = 500


def make_blobs(
    n_samples: int = 100,
    *,
    centers: int = 3,
    n_features: int = 2,
    cluster_std: float = 1.0,
    center_box: tuple[float, float] = (-10.0, 10.0),
    random_state: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Isotropic Gaussian blobs, identical to ``sklearn.datasets.make_blobs``.

    Covers the integer-``centers``, scalar-``cluster_std``, ``shuffle=True`` form that the
    tutorial uses.

    Args:
        n_samples: Total number of points, shared out as evenly as possible.
        centers: Number of blobs (classes).
        n_features: Dimension of each point.
        cluster_std: Standard deviation of every blob.
        center_box: Bounds of the uniform draw of the centres.
        random_state: Seed of the ``numpy.random.RandomState`` that makes every draw.

    Returns:
        ``(X, y)``: float64 points of shape ``(n_samples, n_features)`` and int64 labels.

    Example:
        >>> X, y = make_blobs(5, centers=2, random_state=0)
        >>> X.shape, y.tolist()
        ((5, 2), [0, 1, 1, 0, 0])
    """
    rng = np.random.RandomState(random_state)
    centres = rng.uniform(center_box[0], center_box[1], size=(centers, n_features))
    counts = [n_samples // centers] * centers
    for i in range(n_samples % centers):
        counts[i] += 1
    X = np.empty((n_samples, n_features), dtype=np.float64)
    y = np.empty(n_samples, dtype=np.int64)
    start = 0
    for i, count in enumerate(counts):
        X[start : start + count] = rng.normal(loc=centres[i], scale=cluster_std, size=(count, n_features))
        y[start : start + count] = i
        start += count
    order = np.arange(n_samples)
    rng.shuffle(order)
    return X[order], y[order]


def one_hot(y: np.ndarray, classes: int) -> np.ndarray:
    """One-hot float32 rows, as Keras' ``to_categorical``."""
    out = np.zeros((len(y), classes), dtype=np.float32)
    out[np.arange(len(y)), y] = 1.0
    return out


@dataclass(frozen=True)
class Blobs:
    """The tutorial's splits. ``x_*`` are float32, ``y_*`` integer labels.

    Attributes:
        x_train, y_train: rows 0..99 (the tutorial's training set).
        x_holdout, y_holdout: rows 100..1099 (the tutorial's "test" set, 1000 rows).
        x_val, y_val: rows 100..599, used to choose scheme and n.
        x_test, y_test: rows 600..1099, used only to report the chosen average.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray

    @property
    def classes(self) -> int:
        return int(self.y_holdout.max()) + 1

    @property
    def x_val(self) -> np.ndarray:
        return self.x_holdout[:N_VALIDATION]

    @property
    def y_val(self) -> np.ndarray:
        return self.y_holdout[:N_VALIDATION]

    @property
    def x_test(self) -> np.ndarray:
        return self.x_holdout[N_VALIDATION:]

    @property
    def y_test(self) -> np.ndarray:
        return self.y_holdout[N_VALIDATION:]


def load_blobs(data_seed: int = 2) -> Blobs:
    """The tutorial's data set (``data_seed=2``, as the tutorial) split into its parts.

    Args:
        data_seed: ``random_state`` of ``make_blobs``; the tutorial's value is 2.

    Returns:
        The :class:`Blobs` splits.
    """
    params = dict(TUTORIAL_BLOBS, random_state=data_seed)
    X, y = make_blobs(
        int(params["n_samples"]),
        centers=int(params["centers"]),
        n_features=int(params["n_features"]),
        cluster_std=float(params["cluster_std"]),
        random_state=int(params["random_state"]),
    )
    X = X.astype(np.float32)
    return Blobs(X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:])
