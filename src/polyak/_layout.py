"""One layout matcher: compare two name-keyed layouts and report every difference at once.

A *layout* is a mapping from tensor name to anything with a ``shape`` (and a ``dtype``):
a :class:`polyak.formats.TensorInfo`, a numpy array, a torch tensor, a Keras variable.
Matching is always by name, never by position. Every place that must make sure two
layouts agree (the members of an average, a module and the average loaded into it, a
saved averager state and the model it is restored into, a state and the model that
evaluates it) asks :func:`compare_layouts` and raises the one :class:`MismatchError` it
builds, so the messages read the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._errors import MismatchError

__all__ = ["LayoutDiff", "compare_layouts", "dtype_label", "mismatch_error", "quoted", "shape_of"]

#: At most this many problems are listed in one message (the count says how many more).
MAX_LISTED = 50


def shape_of(value: Any) -> tuple[int, ...]:
    """The shape of an array-like value as a tuple of Python ints (``np.shape`` reads a
    ``shape`` attribute when there is one, so a tensor is never converted; lists are measured)."""
    return tuple(int(d) for d in np.shape(value))


def dtype_label(value: Any) -> str | None:
    """The dtype name of a value (``"float32"``, ``"bfloat16"``), whatever its framework.

    numpy and JAX arrays carry numpy dtypes, torch tensors ``torch.float32`` and Keras
    variables plain strings; all are reduced to the numpy-style name. ``None`` when the
    value has no dtype (a nested list).
    """
    dt = getattr(value, "dtype", None)
    if dt is None:
        return None
    if isinstance(dt, str):
        return dt
    if isinstance(dt, np.dtype) or (isinstance(dt, type) and issubclass(dt, np.generic)):
        return np.dtype(dt).name
    return str(dt).removeprefix("torch.")


def quoted(names: Sequence[str], limit: int = 8) -> str:
    """``"a", "b" and 3 more``: tensor names for a message."""
    shown = ", ".join(f'"{n}"' for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class LayoutDiff:
    """How ``found`` differs from ``expected`` (see :func:`compare_layouts`).

    Attributes:
        expected_label: Names the expected side in messages (a file, "the module").
        found_label: Names the found side.
        missing: Names in ``expected`` that ``found`` lacks (in ``expected``'s order).
        unexpected: Names in ``found`` that ``expected`` lacks (sorted).
        shapes: ``(name, expected shape, found shape)`` for each shape conflict.
        dtypes: ``(name, expected dtype, found dtype)`` for each dtype conflict.
    """

    expected_label: str
    found_label: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dtypes: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes or self.dtypes)

    def problems(self) -> list[str]:
        """One line per problem: missing names, unexpected names, each shape and dtype conflict."""
        exp, got = self.expected_label, self.found_label
        lines = []
        if self.missing:
            lines.append(f"{got}: missing {len(self.missing)} tensor(s) that {exp} has: {quoted(self.missing)}")
        if self.unexpected:
            lines.append(f"{got}: {len(self.unexpected)} unexpected tensor(s) that {exp} lacks: {quoted(self.unexpected)}")
        lines += [f'{got}: tensor "{n}" has shape {f}, {exp} has {e}' for n, e, f in self.shapes]
        lines += [f'{got}: tensor "{n}" is {f}, {exp} has {e}' for n, e, f in self.dtypes]
        return lines

    def raise_if_any(self, what: str, *, fix: str) -> None:
        """Raise :func:`mismatch_error` unless the layouts agree."""
        if not self.ok:
            raise mismatch_error(what, self.problems(), fix=fix)


def compare_layouts(
    expected: Mapping[str, Any],
    found: Mapping[str, Any],
    labels: tuple[str, str] = ("expected", "found"),
    *,
    shapes: bool = True,
    dtypes: bool = True,
    missing_ok: bool = False,
    unexpected_ok: bool = False,
) -> LayoutDiff:
    """Compare two layouts by name: names, shapes and (optionally) dtypes.

    Args:
        expected: Name → value with ``shape``/``dtype`` (the reference).
        found: Name → value, compared with ``expected``.
        labels: How ``expected`` and ``found`` are named in messages.
        shapes: Compare the shapes (and dtypes) of the names both sides have. ``False``
            compares names only; the values may then be anything (``dict.fromkeys(names)``).
        dtypes: Also compare dtypes (names that both sides have, when shapes agree).
        missing_ok: Names of ``expected`` absent from ``found`` are not a problem.
        unexpected_ok: Names of ``found`` absent from ``expected`` are not a problem.

    Returns:
        A :class:`LayoutDiff` listing every difference (empty when they agree).

    Example:
        >>> import numpy as np
        >>> diff = compare_layouts({"w": np.zeros(2), "b": np.zeros(1)},
        ...                        {"w": np.zeros(3), "x": np.zeros(1)}, ("the model", "the file"))
        >>> for line in diff.problems(): print(line)
        the file: missing 1 tensor(s) that the model has: "b"
        the file: 1 unexpected tensor(s) that the model lacks: "x"
        the file: tensor "w" has shape (3,), the model has (2,)
    """
    missing = [] if missing_ok else [n for n in expected if n not in found]
    unexpected = [] if unexpected_ok else sorted(n for n in found if n not in expected)
    conflicts, dts = [], []
    for name, exp in expected.items():
        if not shapes or name not in found:
            continue
        got = found[name]
        se, sf = shape_of(exp), shape_of(got)
        if se != sf:
            conflicts.append((name, se, sf))
        elif dtypes:
            de, df = dtype_label(exp), dtype_label(got)
            if de is not None and df is not None and de != df:
                dts.append((name, de, df))
    return LayoutDiff(labels[0], labels[1], missing, unexpected, conflicts, dts)


def mismatch_error(what: str, problems: Iterable[str], *, fix: str, hints: Iterable[str] = ()) -> MismatchError:
    """One :class:`MismatchError` that lists every problem (up to :data:`MAX_LISTED`).

    Args:
        what: The first line, saying what does not match (``"the 3 members do not match"``).
        problems: One line per problem (:meth:`LayoutDiff.problems`).
        fix: What to do about it (the last line).
        hints: Extra lines, each starting with ``hint:``.
    """
    found = list(problems)
    lines = [f"{what} ({len(found)} problem(s)):", *("  " + p for p in found[:MAX_LISTED])]
    if len(found) > MAX_LISTED:
        lines.append(f"  ... and {len(found) - MAX_LISTED} more")
    lines += ["hint: " + h for h in hints]
    if fix:
        lines.append(fix)
    return MismatchError("\n".join(lines))
