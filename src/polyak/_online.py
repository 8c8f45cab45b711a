"""The online-averaging core: when an update happens, with what weight, and the one state layout.

Framework-free. :class:`polyak.torch.EMA`/``SWA`` and :class:`polyak.keras.EMACallback`
are thin shells around one :class:`OnlineAverage`: they find the live tensors (a module's
parameters, a model's variables), hold the state, and hand the tensor work to an
:class:`AveragerOps` of their backend. Everything else is decided here, once:

* **weights per update** (:class:`EMAWeights` over a :class:`~polyak.DecaySchedule`,
  :class:`SWAWeights`): ``avg ← lerp(avg, current, w)``, the first averaged update
  copies (``w = 1``);
* **cadence** (:class:`Cadence`, :func:`next_update`): steps before ``start`` copy the
  weights into the average ("follow"); from ``start`` on the steps ``start``,
  ``start + every``, ... are averaged, the others skipped;
* **accumulator dtypes** (:func:`accumulator_dtype_name`): float32 for bfloat16/float16;
* **the state record** (:meth:`OnlineAverage.record`, :func:`read_record`):
  ``{"kind", "step", "count", "config", "tensors"}``, the same for every face, and the
  0.1 Keras layout upgraded on load.

The state is plain data (:class:`AveragerState`) and :func:`next_update` is a pure
function of it, as in optax's ``ema``: the shells only apply its answer to tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from ._dtypes import accumulator_dtype, dtype_from_name, is_float
from ._errors import ConfigError, FormatError, whole_number
from ._layout import compare_layouts
from ._schedules import DecaySchedule

__all__ = ["AVERAGER_META_KEY", "FIELDS", "AveragerOps", "AveragerState", "Cadence", "EMAWeights", "OnlineAverage",
           "SWAWeights", "Update", "Weights", "accumulator_dtype_name", "check_saved_tensors", "combined_weight",
           "next_update", "read_record", "weights_from_config"]

#: The fields of a saved averager state, in this order, for every face.
FIELDS = ("kind", "step", "count", "config", "tensors")

#: Metadata key of the record (JSON, the fields but ``tensors``) in an averager's
#: safetensors file (``EMA.save``, ``export``, post-hoc EMA snapshots of every face).
AVERAGER_META_KEY = "polyak_averager"

T = TypeVar("T")
L = TypeVar("L")  # a live tensor (or whatever a face reads it from: a Keras variable)
A = TypeVar("A")  # an averaged tensor, as the backend keeps it
L_in = TypeVar("L_in", contravariant=True)


def accumulator_dtype_name(storage: str, override: str | None = None) -> str:
    """The dtype an average of a ``storage``-typed tensor is kept in.

    Floating tensors narrower than float32 (bfloat16, float16, float8) accumulate in
    float32, others in their own dtype: an average kept in bfloat16 with decay 0.999
    never moves, since ``0.001 · x`` is below bfloat16's resolution near ``x``.
    ``override`` (a floating dtype name) replaces that choice; complex tensors always
    keep their dtype, and non-floating ones are not averaged (their name is returned).

    Example:
        >>> accumulator_dtype_name("bfloat16"), accumulator_dtype_name("float64")
        ('float32', 'float64')
        >>> accumulator_dtype_name("bfloat16", override="bfloat16")
        'bfloat16'
    """
    if storage.startswith("complex"):
        return storage
    try:
        dt = dtype_from_name(storage)
    except ConfigError:  # a dtype numpy does not know (torch's complex32): keep it
        return storage
    if not is_float(dt):
        return storage
    return override if override is not None else accumulator_dtype(dt).name


@dataclass
class AveragerState(Generic[T]):
    """The state of an online averager (plain data).

    Attributes:
        step: Training steps seen (``update()`` calls, or the last ``step=`` given).
        count: Due steps averaged since ``start`` (0: nothing averaged yet); one per
            update when steps come one at a time, ``m`` for an update that stands in for
            ``m`` due steps (see :func:`next_update`).
        tensors: Canonical name → stored tensor: the average of floating tensors (in the
            accumulator dtype) and a copy of the others.
    """

    step: int = 0
    count: int = 0
    tensors: dict[str, T] = field(default_factory=dict)


class Weights(Protocol):
    """How much an update weighs: ``w(count)`` for the update after ``count`` averaged ones."""

    kind: ClassVar[str]

    def __call__(self, count: int) -> float:
        """The lerp weight; 1 (a copy) for ``count == 0``."""
        ...

    @property
    def every(self) -> int | None:
        """The cadence these weights were built for (EMA half-lives are in steps), if any."""
        ...

    def config(self) -> dict[str, Any]:
        """The settings to save (JSON-able)."""
        ...


@dataclass(frozen=True)
class EMAWeights:
    """Exponential moving average: ``w = 1 − d(count)`` with ``d`` from a decay schedule.

    Example:
        >>> from polyak import make_schedule
        >>> w = EMAWeights(make_schedule(0.9))
        >>> w(0), round(w(1), 12)
        (1.0, 0.1)
    """

    schedule: DecaySchedule
    kind: ClassVar[str] = "ema"

    def __call__(self, count: int) -> float:
        return 1.0 - self.schedule(count)

    @property
    def every(self) -> int | None:
        return self.schedule.every

    def config(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict()}


#: SWA weightings: ``equal`` (every averaged step weighs the same) and ``linear`` (the
#: k-th averaged step weighs k, as the offline ``scheme="linear"``).
SWA_WEIGHTINGS = ("equal", "linear")


@dataclass(frozen=True)
class SWAWeights:
    """Cumulative (Polyak–Ruppert / SWA) mean: ``w = 1/n`` (equal) or ``2/(n + 1)`` (linear).

    With weights ``w_k`` and ``W_n = Σ_{k≤n} w_k``, ``avg_n = lerp(avg_{n−1}, x_n, w_n/W_n)``
    is exactly the weighted mean ``Σ w_k·x_k / W_n``; ``n = count + 1``.

    Example:
        >>> [SWAWeights("equal")(c) for c in range(3)], SWAWeights("linear")(1)
        ([1.0, 0.5, 0.3333333333333333], 0.6666666666666666)
    """

    weighting: str = "equal"
    kind: ClassVar[str] = "swa"

    def __post_init__(self) -> None:
        if self.weighting not in SWA_WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {list(SWA_WEIGHTINGS)}, got {self.weighting!r}")

    def __call__(self, count: int) -> float:
        n = count + 1
        return 1.0 / n if self.weighting == "equal" else 2.0 / (n + 1)

    @property
    def every(self) -> int | None:
        return None

    def config(self) -> dict[str, Any]:
        return {"weighting": self.weighting}


def weights_from_config(kind: str, config: Mapping[str, Any], default: Weights | None = None) -> Weights:
    """The :class:`Weights` a saved ``config`` describes (``default`` where it says nothing).

    Raises:
        FormatError: An EMA record without a schedule and no ``default``.
        ConfigError: An unknown kind, schedule or SWA weighting.
    """
    if kind == EMAWeights.kind:
        if "schedule" in config:
            return EMAWeights(DecaySchedule.from_dict(config["schedule"]))
        if default is None:
            raise FormatError("the saved EMA record has no schedule")
        return default
    if kind == SWAWeights.kind:
        fallback = default.config()["weighting"] if default is not None else "equal"
        weighting = config.get("weighting", fallback)
        if weighting not in SWA_WEIGHTINGS:
            raise ConfigError(f"saved SWA weighting {weighting!r} is not one of {list(SWA_WEIGHTINGS)}")
        return SWAWeights(weighting)
    raise ConfigError(f"unknown averager kind {kind!r}; polyak saves 'ema' and 'swa' averagers")


@dataclass(frozen=True)
class Cadence:
    """Which training steps update the average.

    Attributes:
        start: First averaged step; earlier steps copy the weights into the average.
            ``None``: not fixed yet (every step copies until the face fixes it; Keras
            fixes it at the first step of ``start_epoch``).
        every: Steps between averaged updates: ``start``, ``start + every``, ...
    """

    start: int | None = 0
    every: int = 1

    def __post_init__(self) -> None:
        if self.start is not None:
            whole_number(self.start, "start", 0)
        whole_number(self.every, "every", 1)

    def next_due(self, step: int) -> int:
        """The first step after ``step`` whose update changes the average.

        While the average follows the weights (before ``start``, or ``start`` not fixed)
        that is the next step; from ``start`` on, the next ``start + k·every``. A face that
        sees steps only now and then (Keras' ``steps_per_execution``) uses it to do nothing
        between updates.

        Example:
            >>> Cadence(start=3, every=4).next_due(1), Cadence(3, 4).next_due(3), Cadence(None, 4).next_due(8)
            (2, 7, 9)
        """
        if self.start is None or step + 1 < self.start:
            return step + 1
        return self.start + -(-(step + 1 - self.start) // self.every) * self.every


@dataclass(slots=True)
class Update:
    """What one update does: the counters after it and the lerp weight.

    Attributes:
        step: The step just completed (the state's new ``step``).
        count: The state's new ``count`` (it grows by the number of due steps covered).
        weight: ``avg ← lerp(avg, current, weight)``; 1 copies; ``None``: leave the average.
    """

    step: int
    count: int
    weight: float | None


def next_update(state: AveragerState[Any], cadence: Cadence, weights: Weights, *, step: int | None = None) -> Update:
    """The update for training step ``step`` (default: one more than the last), a pure function.

    Steps before ``cadence.start`` copy the weights (the average follows them; ``count``
    stays 0). From ``start`` on, the steps ``start + k·every`` are averaged, with weight
    ``weights(count)`` (1, a copy, for the first); the others leave the average as it is.
    A step that jumps over such due steps (Keras' ``steps_per_execution``, a loop that
    passes ``step=`` only now and then) stands in for all ``m`` of them: it weighs as
    ``m`` updates with its weights, ``1 − Π_{j<m} (1 − weights(count + j))``, and
    ``count`` grows by ``m``, so decays, half-lives and warmups keep counting steps
    (an EMA with decay ``d`` moves by ``1 − d^m``). When steps come one at a time this
    is exactly "every ``every``-th step from ``start``".

    Example:
        >>> w = SWAWeights()
        >>> state, steps = AveragerState(), []
        >>> for _ in range(8):
        ...     u = next_update(state, Cadence(start=3, every=2), w)
        ...     state.step, state.count = u.step, u.count
        ...     steps.append("copy" if u.weight == 1 else "-" if u.weight is None else round(u.weight, 2))
        >>> steps  # steps 1..8
        ['copy', 'copy', 'copy', '-', 0.5, '-', 0.33, '-']
        >>> from polyak import make_schedule
        >>> u = next_update(AveragerState(step=4, count=1), Cadence(0, 1), EMAWeights(make_schedule(0.9)), step=7)
        >>> u.count, round(u.weight, 6)  # steps 5, 6, 7 at once: 1 - 0.9**3
        (4, 0.271)
    """
    now = state.step + 1 if step is None else whole_number(step, "step", 0)
    start = cadence.start
    if start is None or now < start:
        return Update(now, state.count, 1.0)
    every = cadence.every
    grid = start + (now - start) // every * every  # the last due step ≤ now
    if grid != now and grid <= state.step:  # off the grid and its due step was already seen
        return Update(now, state.count, None)
    # Due steps in (state.step, now]; a repeated or backward step on the grid counts once.
    covered = max(1, (grid - cadence.next_due(max(state.step, start - 1))) // every + 1)
    return Update(now, state.count + covered, combined_weight(weights, state.count, covered))


def combined_weight(weights: Weights, count: int, covered: int) -> float:
    """The lerp weight of ``covered`` updates with the same current value, the first after ``count``.

    ``1 − Π_{j<covered} (1 − weights(count + j))``: the average keeps the product of
    what each update keeps. For one update, ``weights(count)``.

    Example:
        >>> w = SWAWeights()  # a mean: 2 more samples after 3 weigh 2/5
        >>> round(combined_weight(w, 3, 2), 12), combined_weight(w, 0, 5)
        (0.4, 1.0)
    """
    if covered == 1:
        return weights(count)
    keep = 1.0
    for j in range(covered):
        keep *= 1.0 - weights(count + j)
        if keep == 0.0:  # a copy: nothing of the old average is left
            break
    return 1.0 - keep


class AveragerOps(Protocol[L_in, A]):
    """The tensor work of an online averager, one implementation per backend.

    ``live`` is what a face hands over: torch tensors (``polyak.torch``), Keras variables
    (``polyak.keras``); ``averages`` are the backend's arrays, in the order of ``live``.
    ``averaged[i]`` says whether entry ``i`` is averaged (floating) or copied (integer,
    bool, or a float the user asked to copy). Implementations: ``TorchOps`` (grouped
    ``torch._foreach_lerp_``), Keras' ``KerasOps`` (``keras.ops``); a compiled backend (a
    jitted JAX update, a ``tf.function``) implements the same methods.
    """

    def init(self, live: Sequence[L_in], averaged: Sequence[bool]) -> list[A]:
        """Fresh averages: copies of the live values, averaged ones in their accumulator dtype."""
        ...

    def update(self, averages: list[A], live: Sequence[L_in], weight: float, averaged: Sequence[bool]) -> list[A]:
        """All of ``avg ← lerp(avg, current, weight)`` (copy where not averaged) in one call.

        ``weight == 1`` must copy exactly. Returns the new averages: in-place backends
        update and return ``averages`` itself, functional ones (JAX) return new arrays.
        While ``averaged`` is the same object the averages are the same arrays (or the ones
        this method returned), so a backend may cache work per ``averaged`` object.
        """
        ...

    def assign(self, live: Sequence[L_in], values: Sequence[A]) -> None:
        """Write ``values`` into the live tensors (their own dtypes), sharing no buffer with them."""
        ...

    def backup(self, live: Sequence[L_in], into: list[A] | None = None) -> list[A]:
        """Copies of the live values (reusing ``into``'s buffers where the backend can)."""
        ...

    def to_numpy(self, value: A) -> Any:
        """A numpy array of one average (for plain-data state): a copy, which later updates leave alone."""
        ...

    def from_numpy(self, array: Any, like: A) -> A:
        """An average with ``like``'s dtype and placement holding ``array``."""
        ...


class OnlineAverage(Generic[L, A]):
    """One online average: its state, weights, cadence and the backend's ops.

    The face calls :meth:`reset` with the live tensors once, :meth:`update` after every
    training step, and :meth:`record` / :meth:`configure` to save and restore.

    Args:
        weights: How much each update weighs (:class:`EMAWeights`, :class:`SWAWeights`).
        cadence: Which steps update (its ``every`` must equal ``weights.every`` if set).
        ops: The backend's :class:`AveragerOps`.
    """

    def __init__(self, weights: Weights, cadence: Cadence, ops: AveragerOps[L, A]) -> None:
        self.weights = weights
        self.cadence = cadence
        self._check_every()
        self.ops = ops
        self.state: AveragerState[A] = AveragerState()
        #: Per tensor of ``state.tensors``: averaged (True) or copied (False).
        self.averaged: tuple[bool, ...] = ()

    @property
    def kind(self) -> str:
        return self.weights.kind

    def _check_every(self) -> None:
        every = self.weights.every
        if every is not None and every != self.cadence.every:
            raise ConfigError(f"every={self.cadence.every} differs from the schedule's every={every}")

    def reset(self, names: Sequence[str], live: Sequence[L], averaged: Sequence[bool]) -> None:
        """Start the averages as copies of ``live`` (accumulator dtypes); counters stay."""
        self.set_tensors(dict(zip(names, self.ops.init(live, tuple(averaged)), strict=True)), averaged)

    def set_tensors(self, tensors: dict[str, A], averaged: Sequence[bool]) -> None:
        """Replace the averages (a loaded state): the ops see new ``averaged`` flags, so a
        backend that caches per set of averages (torch's update plan) starts afresh."""
        self.averaged = tuple(bool(a) for a in averaged)  # always a new object
        self.state.tensors = tensors

    def update(self, live: Callable[[], Sequence[L]], *, step: int | None = None) -> Update:
        """Apply :func:`next_update` for ``step``; ``live()`` is called only if tensors change."""
        st = self.state
        upd = next_update(st, self.cadence, self.weights, step=step)
        if upd.weight is not None:
            averages = list(st.tensors.values())
            new = self.ops.update(averages, live(), upd.weight, self.averaged)
            if new is not averages:  # a functional backend made new arrays
                st.tensors = dict(zip(st.tensors, new, strict=True))
        st.step, st.count = upd.step, upd.count
        return upd

    def averages(self) -> list[A]:
        """The averages in the order of ``state.tensors`` (and of the live tensors)."""
        return list(self.state.tensors.values())

    def config(self, **extra: Any) -> dict[str, Any]:
        """The settings to save: ``start``, ``every``, the weights' and the face's ``extra``."""
        return {"start": self.cadence.start, "every": self.cadence.every, **self.weights.config(), **extra}

    def record(self, config: Mapping[str, Any], tensors: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The state in the one layout: ``{"kind", "step", "count", "config"[, "tensors"]}``."""
        out: dict[str, Any] = {"kind": self.kind, "step": self.state.step, "count": self.state.count,
                               "config": dict(config)}
        if tensors is not None:
            out["tensors"] = dict(tensors)
        return out

    def configure(self, config: Mapping[str, Any]) -> None:
        """Take the weights and cadence of a saved ``config`` (what it omits stays)."""
        weights = weights_from_config(self.kind, config, self.weights)
        every = weights.every if weights.every is not None else config.get("every", self.cadence.every)
        self.weights, self.cadence = weights, Cadence(config.get("start", self.cadence.start), every)
        self._check_every()


def read_record(record: Mapping[str, Any], *, kind: str) -> dict[str, Any]:
    """A saved state in the one layout, checked to be of ``kind``.

    Accepts the layout of :meth:`OnlineAverage.record` and the 0.1 layout of
    ``EMACallback.get_state()`` (``schedule``, ``count``, ``last_step``, ``start_epoch``,
    ``include_non_trainable``, ``averages``), which is upgraded: its updates ran every
    ``every`` steps up to ``last_step``, so ``start = last_step − (count − 1)·every``.

    Raises:
        ConfigError: The record is of another kind, or a counter is not a whole number.
        FormatError: It is not an averager state.
    """
    if "kind" not in record and "schedule" in record and "last_step" in record:
        record = _upgrade_keras_01(record)
    if "kind" not in record:
        raise FormatError(f"not an averager state: it has no 'kind' (fields: {sorted(record)})")
    found = record["kind"]
    if found != kind:
        raise ConfigError(f"this state is from a {found!r} averager, not {kind!r}; load it with that class")
    out = dict(record)
    out["step"] = whole_number(int(record.get("step", 0)), "step", 0)
    out["count"] = whole_number(int(record.get("count", 0)), "count", 0)
    out["config"] = dict(record.get("config") or {})
    return out


def _upgrade_keras_01(old: Mapping[str, Any]) -> dict[str, Any]:
    schedule = dict(old["schedule"])
    every = int(schedule.get("every", 1))
    count, last = int(old.get("count", 0)), int(old["last_step"])
    start = last - (count - 1) * every if count > 0 and last >= 0 else None
    config = {"start": None if start is None else max(start, 0), "every": every, "schedule": schedule,
              "start_epoch": int(old.get("start_epoch", 0)),
              "include_non_trainable": bool(old.get("include_non_trainable", False))}
    record: dict[str, Any] = {"kind": EMAWeights.kind, "step": max(last, 0), "count": count, "config": config}
    if "averages" in old:
        record["tensors"] = dict(old["averages"] or {})
    return record


def check_saved_tensors(ours: Mapping[str, Any], saved: Mapping[str, Any],
                        labels: tuple[str, str] = ("this averager", "the saved state"), *, what: str, fix: str) -> None:
    """Raise one :class:`MismatchError` listing every name and shape the saved tensors differ in.

    Dtypes are not compared: a saved average is converted into the accumulator's dtype
    (or kept, when it is wider).

    Args:
        ours: Name → the averager's (or model's) tensor.
        saved: Name → the saved tensor.
        labels: How ``ours`` and ``saved`` are named in the message.
        what: The first line of the message (what was being loaded).
        fix: The last line (what to do).
    """
    compare_layouts(ours, saved, labels, dtypes=False).raise_if_any(what, fix=fix)
