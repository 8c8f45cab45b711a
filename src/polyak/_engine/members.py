"""Members of an average: ordering files, choosing the newest N, opening them, checking them."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from .._dtypes import is_float, is_integer_like
from .._errors import ConfigError, FormatError, MismatchError, PolyakError
from .._layout import compare_layouts, mismatch_error, quoted
from ..formats import SourceTemplate, SourceView, TensorInfo, TensorSource, open_source
from ..formats._common import open_files_limit, too_many_open_files
from ..formats._memory import MappingSource

__all__ = [
    "KNOWN_PREFIXES",
    "ORDERS",
    "ORDER_HELP",
    "MemberLike",
    "check_members",
    "member_names",
    "open_members",
    "order_members",
    "select_members",
]

MemberLike = Union[str, "os.PathLike[str]", Mapping[str, Any], TensorSource]

ORDERS = ("number", "mtime", "name", "given")
#: ``--order``'s help, shared by the subcommands.
ORDER_HELP = (
    "how to order the checkpoints oldest → newest: number (default: the numbers in the part of "
    "the paths that differs, e.g. checkpoint-5/ before checkpoint-40/), mtime, name or given"
)
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")
_DIGITS = re.compile(r"(\d+)")
#: How many ambiguous members an error names before it says "and k more".
_SHOWN = 6


def _natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """``text`` split into digit runs (compared as numbers) and the text between them."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in _DIGITS.split(text))


def _common_span(parts: Sequence[tuple[str, ...]]) -> tuple[int, int]:
    """How many leading and trailing path components every path shares.

    The components in between are the part of each path that tells the members apart
    (``checkpoint-5`` in ``out/checkpoint-5/model.safetensors``), at whatever depth it is.
    """
    if len(parts) < 2:
        return (max(len(parts[0]) - 1, 0), 0) if parts else (0, 0)
    shortest = min(len(p) for p in parts)
    lead = 0
    while lead < shortest and all(p[lead] == parts[0][lead] for p in parts):
        lead += 1
    trail = 0
    while trail < shortest - lead and all(p[-1 - trail] == parts[0][-1 - trail] for p in parts):
        trail += 1
    return lead, trail


@dataclass(frozen=True)
class _Member:
    """A path member and what ordering needs of it."""

    path: Path
    differ: tuple[str, ...]  # the components that differ between the members
    name: str  # from the first differing component down: how summaries name it

    @property
    def numbers(self) -> tuple[int, ...]:
        return tuple(int(d) for part in self.differ for d in _DIGITS.findall(part))

    @property
    def fallback(self) -> tuple[Any, ...]:
        """A deterministic tie-break: the differing text in natural order, then the path."""
        return (tuple(_natural_key(p) for p in self.differ), str(self.path))


def _describe(members: Sequence[MemberLike]) -> list[_Member]:
    paths = [Path(m) for m in members]  # type: ignore[arg-type]
    parts = [Path(os.path.abspath(p)).parts for p in paths]
    lead, trail = _common_span(parts)
    return [_Member(p, ps[lead:len(ps) - trail], "/".join(ps[lead:]) or p.name or str(p)) for p, ps in zip(paths, parts)]


def member_names(members: Sequence[MemberLike]) -> list[str]:
    """How summaries and metadata name each member: the part of its path that tells it apart.

    For paths, each name runs from the first path component that differs between the
    members down to the file (``checkpoint-40/model.safetensors``, not
    ``model.safetensors`` three times); a lone path is named by its last component. Other
    members are named by their source label or position.

    Example:
        >>> member_names(["out/checkpoint-5/model.safetensors", "out/checkpoint-40/model.safetensors"])
        ['checkpoint-5/model.safetensors', 'checkpoint-40/model.safetensors']
        >>> member_names(["runs/ckpt_1.pt", "runs/ckpt_2.pt"])
        ['ckpt_1.pt', 'ckpt_2.pt']
    """
    paths = [m for m in members if isinstance(m, (str, os.PathLike))]
    named = iter(_describe(paths)) if paths else iter(())
    return [next(named).name if isinstance(m, (str, os.PathLike)) else member_label(m, i) for i, m in enumerate(members)]


def _mtime(path: Path) -> int:
    """Modification time; a folder's is that of the newest file directly inside it (its
    own changes when any entry is added or removed, e.g. when a trainer rotates checkpoints)."""
    try:
        if path.is_dir():
            times = [e.stat().st_mtime_ns for e in path.iterdir() if e.is_file()]
            return max(times) if times else path.stat().st_mtime_ns
        return path.stat().st_mtime_ns
    except FileNotFoundError as exc:
        raise FormatError(f"{exc.filename}: no such file") from None


def _ties(described: Sequence[_Member]) -> list[list[int]]:
    """Groups of positions (in number order) whose numbers do not order them.

    Members with the same numbers tie; a member without numbers could sit anywhere, so
    when there is one, no member's place is known.
    """
    if any(not d.numbers for d in described):
        return [list(range(len(described)))] if len(described) > 1 else []
    groups: list[list[int]] = []
    for i in range(1, len(described)):
        if described[i].numbers == described[i - 1].numbers:
            if groups and groups[-1][-1] == i - 1:
                groups[-1].append(i)
            else:
                groups.append([i - 1, i])
    return groups


def _order(members: Sequence[MemberLike], order: str) -> tuple[list[MemberLike], list[_Member], list[list[int]]]:
    """Members oldest → newest, their descriptions (paths only) and the ties of ``number``."""
    if order not in ORDERS:
        raise ConfigError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    items = list(members)
    if order == "given":
        return items, [], []
    if not all(isinstance(m, (str, os.PathLike)) for m in items):
        if any(isinstance(m, (str, os.PathLike)) for m in items):
            raise ConfigError("mixing file paths and in-memory states needs order='given'")
        return items, [], []
    described = _describe(items)
    ties: list[list[int]] = []
    if order == "number":
        described.sort(key=lambda d: (d.numbers, d.fallback))
        ties = _ties(described)
    elif order == "name":
        described.sort(key=lambda d: ("/".join(d.differ), str(d.path)))
    else:
        described.sort(key=lambda d: (_mtime(d.path), d.numbers, d.fallback))
    return [d.path for d in described], described, ties


def order_members(members: Sequence[MemberLike], order: str = "number") -> list[MemberLike]:
    """Put members oldest → newest.

    Args:
        members: Paths (or in-memory states, which keep their given order).
        order: ``"number"`` (by the numbers in the part of the paths that differs between
            the members, at any depth: ``model_9`` before ``model_10``, and
            ``checkpoint-5/model.safetensors`` before ``checkpoint-40/model.safetensors``),
            ``"mtime"`` (modification time; a folder's is its newest file's), ``"name"``
            (plain string order of that differing part) or ``"given"`` (as passed). Members
            whose numbers tie (or that have none) keep a deterministic order here;
            :func:`polyak.average` and the sweeps refuse them when the result depends on it.

    Returns:
        The members oldest → newest; paths as :class:`~pathlib.Path` objects.

    Raises:
        ConfigError: Unknown order, or a file-based order asked for in-memory states.

    Example:
        >>> [str(p) for p in order_members(["out/checkpoint-40", "out/checkpoint-5", "out/checkpoint-10"])]
        ['out/checkpoint-5', 'out/checkpoint-10', 'out/checkpoint-40']
    """
    return _order(members, order)[0]


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _ambiguity(described: Sequence[_Member], group: Sequence[int]) -> str:
    """Why the members at ``group`` have no known order, naming them."""
    members = [described[i] for i in group]
    bare = [d.name for d in members if not d.numbers]
    numbered = [d.name for d in members if d.numbers]
    if bare and numbered:
        one = len(bare) == 1
        return f"{_listed(bare)} {'has' if one else 'have'} no number to place {'it' if one else 'them'} among {_listed(numbered)}"
    if bare:
        return f"{_listed(bare)} have no numbers that order them"
    return f"{_listed(numbered)} carry the same numbers ({', '.join(map(str, members[0].numbers))})"


def select_members(
    members: Sequence[MemberLike],
    *,
    last: int | None = None,
    order: str = "number",
    weights: Sequence[float] | np.ndarray | Callable[[int], Sequence[float] | np.ndarray] | None = None,
) -> list[MemberLike]:
    """Order members oldest → newest and keep the newest ``last`` of them.

    Args:
        members: Paths or in-memory states.
        last: Keep only the newest ``last`` members.
        order: See :func:`order_members`.
        weights: What the order decides: the weights the kept members get, oldest →
            newest (or a function of their number giving them). When the numbers in the
            paths do not order some members (ties, or no numbers) and those members would
            get different weights (a weighted scheme, or ``last`` keeping some of them), the
            result would depend on an order nobody chose, and the members are refused.
            ``None``: every order matters (a sweep compares the averages of the newest n).

    Raises:
        ConfigError: No members, a bad ``last``, a member given twice, or members whose
            order is ambiguous when it matters (the message names them and ``order``'s
            other choices).
    """
    if not members:
        raise ConfigError("no members given: pass at least one checkpoint")
    if last is not None:
        if isinstance(last, bool) or not isinstance(last, int) or last < 1:
            raise ConfigError(f"last must be a whole number ≥ 1, got {last!r}")
        if last > len(members):
            raise ConfigError(f"last={last} but only {len(members)} members were given")
    seen: set[Path] = set()
    for m in members:
        if isinstance(m, (str, os.PathLike)):
            p = Path(m).resolve()
            if p in seen:
                raise ConfigError(f"{m} is given twice; each member may appear once")
            seen.add(p)
    ordered, described, ties = _order(members, order)
    n = len(ordered) if last is None else last
    if ties:
        w = weights(n) if callable(weights) else weights
        effective = None if w is None else np.concatenate([np.zeros(len(ordered) - n), np.asarray(w, np.float64)])
        bad = [g for g in ties if effective is None or len(set(effective[g].tolist())) > 1]
        if bad:
            if weights is None:
                because = "a sweep compares the averages of the newest n"
            elif n < len(ordered):
                because = f"last={n} keeps only the newest {n}"
            else:
                because = "the scheme weights them differently"
            raise ConfigError(
                f"cannot tell the order of the checkpoints: {'; '.join(_ambiguity(described, g) for g in bad[:3])}, "
                f"and the result depends on their order ({because}); choose it with "
                "--order mtime|name|given (order='mtime', 'name' or 'given'), or rename them"
            )
    return ordered[len(ordered) - n:]


def member_label(member: MemberLike, index: int) -> str:
    if isinstance(member, (str, os.PathLike)):
        return str(member)
    if isinstance(member, TensorSource):
        return member.label
    return f"member {index}"


class PrefixStripped(SourceView):
    """A view of another source with name prefixes (``module.``, ``_orig_mod.``) removed."""

    def __init__(self, inner: TensorSource, prefixes: Sequence[str]) -> None:
        super().__init__(inner)
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

    def aliases(self) -> dict[str, str]:
        back = {old: new for new, old in self._map.items()}
        return {back[a]: back[c] for a, c in self.inner.aliases().items() if a in back and c in back}

    def template(self) -> SourceTemplate | None:
        # The writer receives the tensors under the stripped names; the template maps them
        # back to where they sit in the newest member (a Keras file keeps its dataset paths).
        inner = self.inner.template()
        return None if inner is None else inner.renamed({old: new for new, old in self._map.items()})


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
