"""Sweeps: evaluate the average of the newest n members for every n, scheme and decay rate.

Members are walked newest → oldest, so that after reading member ``n − 1`` (``j = 0`` is
the newest) the running sums hold the newest ``n`` members, and each member is read once.
Each scheme says how its sums are kept (:class:`polyak._schemes.RunningSum`):

* equal: ``S0(n) = S0(n−1) + x_{n−1}``; average ``S0(n) / n``.
* linear (weight ``n − j``): ``L(n) = Σ_j (n − j)·x_j = n·S0(n) − S1(n)``. Rather than
  subtracting two large sums (cancellation), note ``L(n) − L(n−1) = S0(n)``, so
  ``L(n) = L(n−1) + S0(n)``; average ``L(n) / (n(n+1)/2)``.
* exponential (weight ``exp(−(j+1)/alpha)``): the common factor ``exp(−1/alpha)`` cancels
  after normalising, so ``E(n) = E(n−1) + exp(−(n−1)/alpha)·x_{n−1}`` and the average is
  ``E(n) / Σ_{j<n} exp(−j/alpha)``.

The divisors come from applying the same updates to ones. Each update touches every
weight once: O(N) tensor work per scheme. Memory, whatever N is: one model copy (float32,
float64 for float64 tensors) per running sum — S0 for equal and linear, L for linear, one
E per alpha — plus one output copy (members' dtype) per curve, plus one for the member
alone when the single/prediction baselines are on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .._dtypes import accumulator_dtype, is_float
from .._engine.kernel import CHUNK, add_scaled, member_chunks, scaled_copy
from .._engine.members import MemberLike, check_members, open_members, select_members
from .._errors import ConfigError, SchemeError
from .._progress import Progress
from .._schemes import MEMBER, SCHEMES, RunningSum, Scheme, Update
from ..formats import TensorInfo, TensorSource
from ..formats._memory import to_numpy
from .metrics import normalize_metrics
from .results import SweepResults, SweepRow

__all__ = ["BASELINES", "Evaluate", "Predict", "Score", "sweep", "sweep_schemes"]

BASELINES = ("single", "prediction_ensemble")

#: Updates whose coefficient is below this are skipped: they cannot change a float32 sum
#: (its resolution is 6e-8 relative to the newest member's coefficient, about 1), and
#: multiplying by them would produce subnormal numbers, which are slow on most CPUs.
_TINY = {np.dtype(np.float32): 1e-30, np.dtype(np.float64): 1e-290}


def sweep_schemes() -> list[str]:
    """The registered schemes a sweep can evaluate (those with running sums), in order."""
    return [s.name for s in SCHEMES.values() if s.running is not None]


class Evaluate(Protocol):
    """``evaluate(state) -> metrics``: the function a sweep calls to score one set of weights.

    ``state`` maps tensor names to numpy arrays (the members' names, after
    ``strip_prefix``). **The arrays are reused for the next model**: load them into your
    model (which copies) or copy them; do not keep references after returning, and do
    not write into them. Return ``{metric: number}`` or ``{split: {metric: number}}``
    (e.g. ``{"validation": {"accuracy": 0.81}, "test": {"accuracy": 0.80}}``); a flat dict
    is one split named ``"eval"``. ``polyak.torch.evaluator`` and
    ``polyak.keras.evaluator`` build one from a model and data.

    Example:
        >>> import numpy as np, polyak
        >>> x, y = np.array([[1.0], [2.0]]), np.array([2.0, 4.0])  # validation data of y = 2x
        >>> def evaluate(state):
        ...     return {"validation": {"mse": float(np.mean((x @ state["w"] - y) ** 2))}}
        >>> members = [{"w": np.array([1.0])}, {"w": np.array([3.0])}]
        >>> res = polyak.sweep(members, evaluate, schemes=["equal"])
        >>> [(r.name, r.n, r.value("mse", "validation")) for r in res.rows]
        [('single', 1, 2.5), ('equal', 1, 2.5), ('single', 2, 2.5), ('equal', 2, 0.0)]
    """

    def __call__(self, state: Mapping[str, np.ndarray], /) -> Mapping[str, Any]: ...


class Predict(Protocol):
    """``predict(state) -> predictions``: a model's outputs, for a sweep's prediction-ensemble baseline.

    Returns an array (or ``{split: array}``) of model outputs, the same shapes for every
    state. Outputs should be probabilities (or other quantities whose mean is meaningful);
    the prediction ensemble of the newest n members is the element-wise mean of their
    outputs, which :class:`Score` turns into metrics. ``state`` is as for
    :class:`Evaluate` (reused arrays: do not keep them).

    Example:
        >>> import numpy as np, polyak
        >>> x, y = np.array([[1.0], [2.0]]), np.array([2.0, 4.0])
        >>> def predict(state):  # the model's outputs on the validation inputs
        ...     return {"validation": x @ state["w"]}
        >>> def score(predictions):  # metrics of the mean of several members' outputs
        ...     return {split: {"mse": float(np.mean((p - y) ** 2))} for split, p in predictions.items()}
        >>> members = [{"w": np.array([1.0])}, {"w": np.array([3.0])}]
        >>> res = polyak.sweep(members, lambda s: score(predict(s)), schemes=["equal"], predict=predict, score=score)
        >>> [r.value("mse", "validation") for r in res.select_rows(kind="prediction_ensemble")]
        [2.5, 0.0]
    """

    def __call__(self, state: Mapping[str, np.ndarray], /) -> Any: ...


class Score(Protocol):
    """``score(predictions) -> metrics``: the metrics of a prediction ensemble's mean outputs.

    ``predictions`` has the shape :class:`Predict` returns (an array or ``{split: array}``),
    averaged over the newest n members; return metrics in the convention of
    :class:`Evaluate` (``{metric: number}`` or ``{split: {metric: number}}``).

    Example:
        >>> import numpy as np
        >>> labels = np.array([0, 1])
        >>> def score(probabilities):  # the members' predicted class probabilities, averaged
        ...     return {"accuracy": float(np.mean(probabilities.argmax(axis=1) == labels))}
        >>> score(np.array([[0.9, 0.1], [0.3, 0.7]]))
        {'accuracy': 1.0}
    """

    def __call__(self, predictions: Any, /) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class _Curve:
    """One swept average: a scheme, its ``alpha`` (if it takes one), its running sums."""

    scheme: str
    alpha: float | None
    sums: RunningSum

    @property
    def key(self) -> tuple[str, float | None]:
        return (self.scheme, self.alpha)


class _Group:
    """Float tensors of one dtype laid out in flat buffers: running sums and outputs."""

    def __init__(self, dtype: np.dtype, infos: list[TensorInfo], sums: Sequence[Any], outs: Sequence[Any]) -> None:
        self.dtype = np.dtype(dtype)
        self.acc_dtype = accumulator_dtype(self.dtype)
        self.offsets: dict[str, tuple[int, int]] = {}
        size = 0
        for info in infos:
            self.offsets[info.name] = (size, size + info.size)
            size += info.size
        self.sums = {k: np.zeros(size, dtype=self.acc_dtype) for k in sums}
        self.outs = {k: np.zeros(size, dtype=self.dtype) for k in outs}
        self.views = {
            k: {i.name: out[self.offsets[i.name][0]:self.offsets[i.name][1]].reshape(i.shape) for i in infos}
            for k, out in self.outs.items()
        }


class _RunningSums:
    """The running sums of every curve's scheme, updated one member at a time.

    Each curve (scheme, alpha) has its own output buffer, written in the same chunk loop
    that updates the sums, while the chunk is still in the CPU cache: a separate pass
    per average would stream every running sum from memory once more. ``"member"`` is the
    copy of the member just read, for the single-member and prediction baselines.
    """

    def __init__(self, infos: Sequence[TensorInfo], curves: Sequence[_Curve], *, member: bool) -> None:
        self.infos = list(infos)
        self.curves = list(curves)
        self.rules = [c.sums for c in curves]
        first = self._updates(0)
        keys = list(dict.fromkeys([u.target for u in first] + [r.result for r in self.rules]))
        for u in first:
            if u.source is not MEMBER and u.source not in keys:
                raise SchemeError(f"a running sum adds {u.source!r}, which no scheme keeps; sources are MEMBER or a sum's key")
        #: Σ of the coefficients each sum holds: the same updates applied to ones.
        self.weight = dict.fromkeys(keys, 0.0)
        outs: list[Any] = [*(c.key for c in self.curves), *(["member"] if member else [])]
        by_dtype: dict[np.dtype, list[TensorInfo]] = {}
        for info in self.infos:
            if is_float(info.dtype):
                by_dtype.setdefault(np.dtype(info.dtype), []).append(info)
        self.groups = [_Group(dt, lst, keys, outs) for dt, lst in by_dtype.items()]
        self.group_of = {name: g for g in self.groups for name in g.offsets}
        self.count = 0
        chunk = min(CHUNK, max([1, *(i.size for i in self.infos)]))
        self._cast = {g.acc_dtype: np.empty(chunk, g.acc_dtype) for g in self.groups}
        self._tmp = {g.acc_dtype: np.empty(chunk, g.acc_dtype) for g in self.groups}

    def _updates(self, j: int) -> list[Update]:
        """Every curve's updates for member ``j``, in order, a shared sum's only once."""
        done: dict[Hashable, tuple[Update, ...]] = {}
        steps: list[Update] = []
        for curve, rule in zip(self.curves, self.rules):
            ups = tuple(rule.updates(j))
            mine = {t: tuple(u for u in ups if u.target == t) for t in dict.fromkeys(u.target for u in ups)}
            for t, own in mine.items():
                if t in done and done[t] != own:
                    raise SchemeError(
                        f"scheme {curve.scheme!r} updates the running sum {t!r} differently from another "
                        "scheme in this sweep; give its sum a key of its own"
                    )
            steps += [u for u in ups if u.target not in done]
            for t, own in mine.items():
                done.setdefault(t, own)
        return steps

    def add(self, src: TensorSource, *, emit: bool) -> dict[str, np.ndarray]:
        """Add the next (older) member, and write every curve's average when ``emit``.

        Returns the member's integer/bool tensors (copies).
        """
        steps = self._updates(self.count)
        self.count += 1
        for u in steps:
            self.weight[u.target] += u.coef * (1.0 if u.source is MEMBER else self.weight[u.source])
        scales = [(c.key, r.result, 1.0 / self.weight[r.result]) for c, r in zip(self.curves, self.rules)] if emit else []
        ints: dict[str, np.ndarray] = {}
        for info in self.infos:
            x = src.read(info.name)
            if not is_float(info.dtype):
                ints[info.name] = np.array(x, copy=True)
                continue
            g = self.group_of[info.name]
            start, _ = g.offsets[info.name]
            flat = np.asarray(x).reshape(-1)
            acc_dt = g.acc_dtype
            tiny = _TINY.get(acc_dt, 0.0)
            ops = [
                (g.sums[u.target], None if u.source is MEMBER else g.sums[u.source], acc_dt.type(u.coef))
                for u in steps if abs(u.coef) >= tiny
            ]
            member = g.outs.get("member")
            emits = [(g.outs[c], g.sums[k], acc_dt.type(sc)) for c, k, sc in scales]
            tmp = self._tmp[acc_dt]
            # The kernel probes each chunk for NaN/Inf while it is in cache and refuses the
            # member after the tensor, before the NaN spreads into every average holding it.
            for a, b, xs in member_chunks(flat, acc_dt, self._cast[acc_dt], label=src.label, name=info.name):
                t = tmp[: b - a]
                lo, hi = start + a, start + b
                if member is not None:
                    member[lo:hi] = flat[a:b]
                for acc, source, w in ops:
                    add_scaled(acc[lo:hi], xs if source is None else source[lo:hi], w, t)
                for out, acc, sc in emits:
                    scaled_copy(out[lo:hi], acc[lo:hi], sc, t)
        return ints

    def state(self, which: Any, ints: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A fresh name → array dict over the (reused) buffer ``which``, in the members' order."""
        out: dict[str, np.ndarray] = {}
        for info in self.infos:
            out[info.name] = ints[info.name] if info.name in ints else self.group_of[info.name].views[which][info.name]
        return out


def _sweepable(name: str) -> tuple[Scheme, Callable[..., RunningSum]]:
    spec = SCHEMES.get(name)
    if spec is None or spec.running is None:
        raise SchemeError(f"cannot sweep scheme {name!r}; sweepable schemes: {', '.join(sweep_schemes())}")
    return spec, spec.running


def _curves(schemes: Iterable[str] | None, alphas: Iterable[float] | None) -> list[_Curve]:
    if schemes is None:
        schemes = sweep_schemes()
    elif isinstance(schemes, str):
        schemes = [s.strip() for s in schemes.split(",") if s.strip()]
    names = list(dict.fromkeys(schemes))
    if not names:
        raise SchemeError(f"no schemes to sweep; choose from {', '.join(sweep_schemes())}")
    chosen = [_sweepable(name) for name in names]
    alist = None if alphas is None else list(alphas)
    curves: list[_Curve] = []
    for spec, running in chosen:
        if "alpha" not in spec.parameters:
            curves.append(_Curve(spec.name, None, running(**spec.resolve())))
            continue
        values = [spec.param("alpha").default] if alist is None else alist
        if not values:
            raise SchemeError(f"scheme {spec.name!r} needs at least one alpha")
        resolved = {float(p["alpha"]): p for p in (spec.resolve(alpha=a) for a in values)}
        curves += [_Curve(spec.name, a, running(**p)) for a, p in resolved.items()]
    return curves


def _check_ns(n: Iterable[int] | int | None, total: int) -> list[int]:
    if n is None:
        return list(range(1, total + 1))
    values = [n] if isinstance(n, int) else list(n)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= total:
            raise ConfigError(f"n must hold whole numbers from 1 to {total} (the number of members), got {v!r}")
    if not values:
        raise ConfigError("n is empty; give at least one number of members to average")
    return sorted({int(v) for v in values})


class _Ensemble:
    """The running mean of the members' predictions (arrays or {split: array})."""

    def __init__(self) -> None:
        self.sum: dict[str, np.ndarray] | None = None
        self.keyed = False
        self.count = 0

    def add(self, pred: Any) -> Any:
        keyed = isinstance(pred, Mapping)
        items = {str(k): to_numpy(v) for k, v in pred.items()} if keyed else {"": to_numpy(pred)}
        if self.sum is None:
            self.keyed = keyed
            self.sum = {k: np.array(v, dtype=np.float64, copy=True) for k, v in items.items()}
        else:
            shapes = {k: v.shape for k, v in self.sum.items()}
            if keyed != self.keyed or {k: v.shape for k, v in items.items()} != shapes:
                got = {k: v.shape for k, v in items.items()}
                raise ConfigError(f"predict returned {got} for one member and {shapes} for another; it must return the same shapes every time")
            for k, v in items.items():
                self.sum[k] += v
        self.count += 1
        mean = {k: v / self.count for k, v in self.sum.items()}
        return mean if self.keyed else mean[""]


def _resolve_predict(evaluate: Any, predict: Any, score: Any, baselines: Sequence[str]) -> tuple[Any, Any]:
    if "prediction_ensemble" not in baselines:
        if predict is not None:
            raise ConfigError("predict= was given but baselines excludes 'prediction_ensemble'")
        return None, None
    if predict is None and callable(getattr(evaluate, "predict", None)) and callable(getattr(evaluate, "score", None)):
        return evaluate.predict, evaluate.score
    if predict is None:
        return None, None
    score = score if score is not None else getattr(predict, "score", None) or getattr(evaluate, "score", None)
    if not callable(score):
        raise ConfigError("predict= needs score=: a function that turns averaged predictions into metrics")
    return predict, score


def sweep(
    members: Sequence[MemberLike],
    evaluate: Evaluate,
    *,
    schemes: Iterable[str] | None = None,
    alphas: Iterable[float] | None = None,
    n: Iterable[int] | int | None = None,
    baselines: Iterable[str] = BASELINES,
    predict: Predict | None = None,
    score: Score | None = None,
    format: str | None = None,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    order: str = "number",
    last: int | None = None,
    progress: bool = False,
) -> SweepResults:
    """Evaluate the average of the newest n members for every n, scheme and decay rate.

    Each member is read once, newest first; running sums give every average (see the
    module notes), so the tensor work is O(N) per scheme and memory a few model copies
    (one per running sum and one output per curve; 7 for the defaults). Baselines: each member alone (``"single"``) and,
    with ``predict``/``score``, the mean of the newest n members' predictions
    (``"prediction_ensemble"``, an ensemble that costs n forward passes).

    Args:
        members: Checkpoint paths or in-memory states (name → array), oldest → newest
            after ``order``.
        evaluate: ``evaluate(state) -> {metric: number}`` or ``{split: {metric: number}}``
            (see :class:`Evaluate`). The arrays handed over are reused: do not keep them.
        schemes: Any of the registered schemes with running sums (default: all of them,
            ``"equal"``, ``"linear"``, ``"exponential"``; see :func:`sweep_schemes`).
        alphas: Decay rates for the schemes that take ``alpha`` (each > 0); one curve
            per alpha. Default: the scheme's own (2.0 for ``"exponential"``).
        n: Which numbers of newest members to evaluate (default: 1..N).
        baselines: Any of ``"single"``, ``"prediction_ensemble"``.
        predict: ``predict(state) -> array`` (or ``{split: array}``) of outputs, for the
            prediction ensemble. When omitted and ``evaluate`` has ``predict`` and
            ``score`` methods, those are used.
        score: ``score(mean_predictions) -> metrics``; default ``predict.score`` or
            ``evaluate.score``.
        format: Force the input format.
        key: Key of the state dict inside nested ``.pt`` checkpoints.
        strip_prefix: Prefixes to remove from tensor names.
        order: How to order paths: ``"number"``, ``"mtime"``, ``"name"`` or ``"given"``.
        last: Keep only the newest ``last`` members.
        progress: Show a progress bar on stderr (only on a terminal).

    Returns:
        :class:`SweepResults`, one row per evaluated model.

    Raises:
        ConfigError: Invalid options or metrics (``SchemeError`` for schemes and alphas).
        FormatError: An unreadable, corrupt or unsafe member.
        MismatchError: Members disagree on names, shapes or dtypes (all listed at once).
        NonFiniteError: A member holds NaN/Inf in a floating tensor.

    Example:
        >>> import numpy as np, polyak
        >>> ms = [{"w": np.array([float(i)], np.float32)} for i in range(4)]
        >>> res = polyak.sweep(ms, lambda s: {"w": float(s["w"][0])}, schemes=["equal"])
        >>> [r.value("w", "eval") for r in res.select_rows(kind="average")]
        [3.0, 2.5, 2.0, 1.5]

    References:
        Polyak & Juditsky 1992, doi:10.1137/0330046; Izmailov et al. 2018 (SWA),
        arXiv:1803.05407.
    """
    t0 = time.perf_counter()
    curves = _curves(schemes, alphas)
    base = list(dict.fromkeys(baselines))
    for b in base:
        if b not in BASELINES:
            raise ConfigError(f"unknown baseline {b!r}; choose from {', '.join(BASELINES)}")
    predict, score = _resolve_predict(evaluate, predict, score, base)
    chosen = select_members(members, last=last, order=order)
    total = len(chosen)
    ns = _check_ns(n, total)
    wanted = set(ns)
    rows: list[SweepRow] = []
    ensemble = _Ensemble()

    def run(kind: str, count: int, fn: Any, arg: Any, **extra: Any) -> None:
        t = time.perf_counter()
        metrics = normalize_metrics(fn(arg), source="score" if kind == "prediction_ensemble" else "evaluate")
        rows.append(SweepRow(kind=kind, n=count, metrics=metrics, seconds=time.perf_counter() - t, **extra))

    with open_members(chosen, format=format, key=key, strip_prefix=strip_prefix) as sources:
        labels = [s.label for s in sources]
        infos = check_members(sources)
        single = "single" in base
        sums = _RunningSums(infos, curves, member=single or predict is not None)
        newest_ints: dict[str, np.ndarray] = {}
        bar = Progress(sum(i.nbytes for i in infos) * max(ns), "sweeping", enabled=progress)
        try:
            for step in range(1, max(ns) + 1):
                src = sources[total - step]
                ints = sums.add(src, emit=step in wanted)
                if step == 1:
                    newest_ints = ints
                if single or predict is not None:
                    state = sums.state("member", ints)
                    if single:
                        run("single", step, evaluate, state, member=labels[total - step])
                    if predict is not None:
                        mean = ensemble.add(predict(state))
                        if step in wanted:
                            run("prediction_ensemble", step, score, mean)
                if step in wanted:
                    for c in curves:
                        run("average", step, evaluate, sums.state(c.key, newest_ints), scheme=c.scheme, alpha=c.alpha)
                bar.update(sum(i.nbytes for i in infos))
        finally:
            bar.close()
    return SweepResults(
        rows=rows,
        members=labels,
        schemes=tuple(dict.fromkeys(c.scheme for c in curves)),
        alphas=tuple(c.alpha for c in curves if c.alpha is not None),
        seconds=time.perf_counter() - t0,
    )
