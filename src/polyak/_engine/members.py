"""Members of an average: ordering files, choosing the newest N, opening them, checking them."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from .._dtypes import is_float, is_integer_like
from .._errors import ConfigError, FormatError, MismatchError, PolyakError
from .._layout import compare_layouts, mismatch_error, quoted
from ..formats import SourceTemplate, TensorInfo, TensorSource, open_source
from ..formats._common import open_files_limit, too_many_open_files
from ..formats._memory import MappingSource

__all__ = [
    "KNOWN_PREFIXES",
    "ORDERS",
    "MemberLike",
    "check_members",
    "open_members",
    "order_members",
    "select_members",
]

MemberLike = Union[str, "os.PathLike[str]", Mapping[str, Any], TensorSource]

ORDERS = ("number", "mtime", "name", "given")
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")
_DIGITS = re.compile(r"(\d+)")


def _natural_key(path: Path) -> tuple[Any, ...]:
    parts = _DIGITS.split(path.name)
    key = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)
    return (key, str(path))


def order_members(members: Sequence[MemberLike], order: str = "number") -> list[MemberLike]:
    """Put members oldest → newest.

    Args:
        members: Paths (or in-memory states, which keep their given order).
        order: ``"number"`` (by the numbers in the file name, so ``model_9`` comes before
            ``model_10``), ``"mtime"`` (modification time), ``"name"`` (plain string order)
            or ``"given"`` (as passed).

    Raises:
        ConfigError: Unknown order, or a file-based order asked for in-memory states.
    """
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    items = list(members)
    if order == "given":
        return items
    if not all(isinstance(m, (str, os.PathLike)) for m in items):
        if any(isinstance(m, (str, os.PathLike)) for m in items):
            raise ConfigError("mixing file paths and in-memory states needs order='given'")
        return items
    paths: list[Path] = [Path(m) for m in items]  # type: ignore[arg-type]
    ordered: list[Path]
    if order == "number":
        ordered = sorted(paths, key=_natural_key)
    elif order == "name":
        ordered = sorted(paths, key=lambda p: (p.name, str(p)))
    else:
        try:
            ordered = sorted(paths, key=lambda p: (p.stat().st_mtime_ns, _natural_key(p)))
        except FileNotFoundError as exc:
            raise FormatError(f"{exc.filename}: no such file") from None
    return list[MemberLike](ordered)


def select_members(members: Sequence[MemberLike], *, last: int | None = None, order: str = "number") -> list[MemberLike]:
    """Order members oldest → newest and keep the newest ``last`` of them."""
    if not members:
        raise ConfigError("no members given: pass at least one checkpoint")
    ordered = order_members(members, order)
    if last is not None:
        if isinstance(last, bool) or not isinstance(last, int) or last < 1:
            raise ConfigError(f"last must be a whole number ≥ 1, got {last!r}")
        if last > len(ordered):
            raise ConfigError(f"last={last} but only {len(ordered)} members were given")
        ordered = ordered[-last:]
    seen: set[Path] = set()
    for m in ordered:
        if isinstance(m, (str, os.PathLike)):
            p = Path(m).resolve()
            if p in seen:
                raise ConfigError(f"{m} is given twice; each member may appear once")
            seen.add(p)
    return ordered


def member_label(member: MemberLike, index: int) -> str:
    if isinstance(member, (str, os.PathLike)):
        return str(member)
    if isinstance(member, TensorSource):
        return member.label
    return f"member {index}"


class PrefixStripped(TensorSource):
    """A view of another source with name prefixes (``module.``, ``_orig_mod.``) removed."""

    def __init__(self, inner: TensorSource, prefixes: Sequence[str]) -> None:
        super().__init__(inner.path, inner.label)
        self.inner = inner
        self.format_name = inner.format_name  # type: ignore[misc]
        self.zero_copy = inner.zero_copy  # type: ignore[misc]
        self._map: dict[str, str] = {}
        for name in inner.infos():
            new = name
            changed = True
            while changed:
                changed = False
                for p in prefixes:
                    if p and new.startswith(p):
                        new = new[len(p):]
                        changed = True
            if new in self._map:
                raise MismatchError(
                    f"{inner.label}: stripping {list(prefixes)} makes {self._map[new]!r} and {name!r} "
                    f"both {new!r}; strip fewer prefixes"
                )
            self._map[new] = name
        self._infos = {
            new: TensorInfo(new, inner.infos()[old].shape, inner.infos()[old].dtype) for new, old in self._map.items()
        }

    def infos(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def read(self, name: str) -> np.ndarray:
        return self.inner.read(self._map[name])

    def metadata(self) -> dict[str, str]:
        return self.inner.metadata()

    def aliases(self) -> dict[str, str]:
        back = {old: new for new, old in self._map.items()}
        return {back[a]: back[c] for a, c in self.inner.aliases().items() if a in back and c in back}

    def extras(self) -> dict[str, Any]:
        return self.inner.extras()

    def template(self) -> SourceTemplate | None:
        # The writer receives the tensors under the stripped names; the template maps them
        # back to where they sit in the newest member (a Keras file keeps its dataset paths).
        inner = self.inner.template()
        return None if inner is None else inner.renamed({old: new for new, old in self._map.items()})

    def files(self) -> list[Path]:
        return self.inner.files()

    def close(self) -> None:
        self.inner.close()


def open_member(
    member: MemberLike,
    index: int,
    *,
    format: str | None = None,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
) -> TensorSource:
    """Open one member (path, mapping or source) as a source, prefixes stripped."""
    if isinstance(member, TensorSource):
        src = member
    elif isinstance(member, (str, os.PathLike)):
        src = open_source(member, format=format, key=key)
    elif isinstance(member, Mapping):
        src = MappingSource(member, member_label(member, index))
    else:
        raise ConfigError(
            f"member {index}: expected a checkpoint path or a mapping of tensors, got {type(member).__name__}"
        )
    if strip_prefix:
        src = PrefixStripped(src, tuple(strip_prefix))
    return src


@contextlib.contextmanager
def open_members(
    members: Sequence[MemberLike],
    *,
    format: str | None = None,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
) -> Iterator[list[TensorSource]]:
    """Open every member; all are closed on exit, also when opening one of them fails."""
    opened: list[TensorSource] = []
    owned: list[TensorSource] = []  # sources we opened; the caller's own sources stay open
    try:
        for i, m in enumerate(members):
            try:
                src = open_member(m, i, format=format, key=key, strip_prefix=strip_prefix)
            except (OSError, PolyakError) as exc:
                if not too_many_open_files(exc):
                    raise
                limit = open_files_limit()
                raise ConfigError(
                    f"{member_label(m, i)}: cannot open member {i + 1} of {len(members)}: too many open "
                    f"files{f' (the limit is {limit})' if limit is not None else ''}; raise the limit "
                    "with `ulimit -n` or average fewer members at once (safetensors members keep no "
                    "file open while averaging; other formats keep one each)"
                ) from None
            opened.append(src)
            if src is not m:
                owned.append(src)
        yield opened
    finally:
        for src in owned:
            with contextlib.suppress(Exception):
                src.close()


def _prefix_hint(ref: set[str], other: set[str], label: str) -> str | None:
    for p in KNOWN_PREFIXES:
        if {p + k for k in ref} == other:
            return f"the keys of {label} carry the prefix {p!r}; pass --strip-prefix {p} (strip_prefix=[{p!r}])"
        if {p + k for k in other} == ref:
            return f"the keys of the newest member carry the prefix {p!r} and {label}'s do not; pass --strip-prefix {p}"
        stripped_ref = {k.removeprefix(p) for k in ref}
        stripped_other = {k.removeprefix(p) for k in other}
        if stripped_ref == stripped_other and ref != other:
            return f"the keys differ only by the prefix {p!r}; pass --strip-prefix {p}"
    return None


def check_members(sources: Sequence[TensorSource], *, int_policy: str = "newest") -> list[TensorInfo]:
    """Check names, shapes and dtypes across all members before any arithmetic.

    The newest member (the last) is the reference. Every problem is collected, and one
    :class:`MismatchError` lists them all with file names.

    Args:
        sources: The opened members, oldest → newest.
        int_policy: ``"newest"`` (integer and bool tensors are copied from the newest
            member) or ``"error"`` (refuse checkpoints that hold any).

    Returns:
        The reference tensor infos in the newest member's order.
    """
    if int_policy not in ("newest", "error"):
        raise ConfigError(f"int_policy must be 'newest' or 'error', got {int_policy!r}")
    if not sources:
        raise ConfigError("no members given: pass at least one checkpoint")
    ref = sources[-1]
    ref_infos = ref.infos()
    if not ref_infos:
        raise FormatError(f"{ref.label}: the checkpoint holds no tensors")
    problems: list[str] = []
    hints: list[str] = []
    for src in sources[:-1]:
        diff = compare_layouts(ref_infos, src.infos(), (ref.label, src.label))
        problems += diff.problems()
        if diff.missing or diff.unexpected:
            hint = _prefix_hint(set(ref_infos), set(src.infos()), src.label)
            if hint and hint not in hints:
                hints.append(hint)
    if int_policy == "error":
        ints = [n for n, i in ref_infos.items() if is_integer_like(i.dtype)]
        if ints:
            problems.append(
                f"integer/bool tensors cannot be averaged and int_policy is 'error': {quoted(ints)}; "
                "use --int-policy newest to copy them from the newest member"
            )
    odd = [n for n, i in ref_infos.items() if not is_float(i.dtype) and not is_integer_like(i.dtype)]
    if odd:
        problems.append(f"tensors of unsupported dtypes: {quoted(odd)}")
    if problems:
        raise mismatch_error(
            f"the {len(sources)} members do not match",
            problems,
            hints=hints,
            fix="polyak averages tensors by name and needs the same names, shapes and dtypes in every member",
        )
    return list(ref_infos.values())
