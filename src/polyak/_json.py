"""JSON from files polyak did not write: one parser with limits, for every reader.

A checkpoint's JSON (a safetensors header, a sharded index, ``__polyak__.json`` in an
``.npz``, a ``.keras`` archive's ``config.json`` and ``metadata.json``, an averager's
metadata record) comes from whoever made the file. Python's :func:`json.loads` trusts it:
nesting 200,000 deep raises ``RecursionError``, a 5,000-digit integer ``ValueError``,
``NaN``/``Infinity``/``1e400`` become floats that are not numbers, and ``"\\ud800"``
becomes a string that no file can store. :func:`parse_json` refuses all of these with a
:class:`~polyak.FormatError` (or :class:`~polyak.UnsafeFileError` for the resource limits)
naming the file and what was being read; :func:`json_object` adds the type check every
reader needs first.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ._errors import FormatError, UnsafeFileError

__all__ = ["MAX_DEPTH", "MAX_NUMBER_CHARS", "json_object", "parse_json"]

#: Deepest nesting accepted. A safetensors header is 3 deep, an index 3, a Keras model
#: config of nested functional models a few dozen.
MAX_DEPTH = 200
#: Longest number literal accepted: 2**64 has 20 digits, a float's repr at most 24 chars.
MAX_NUMBER_CHARS = 40


class _Refused(Exception):
    def __init__(self, why: str, unsafe: bool = False) -> None:
        super().__init__(why)
        self.unsafe = unsafe


def _int(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Refused(f"a {len(text)}-digit number", unsafe=True)
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise _Refused(f"a {len(text)}-character number", unsafe=True)
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text}, which overflows a float")
    return value


def _constant(text: str) -> Any:
    raise _Refused(f"{text}, which is not a number in JSON")


def _bad_string(s: str) -> bool:
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _check_tree(value: Any, max_depth: int) -> str | None:
    """Why the parsed value is refused (too deep, a lone surrogate), without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if depth > max_depth:
                return f"nesting deeper than {max_depth} levels"
            for k, v in node.items():
                if _bad_string(k):
                    return f"the key {k!r}, which is not valid Unicode (a lone surrogate)"
                stack.append((v, depth + 1))
        elif isinstance(node, list):
            if depth > max_depth:
                return f"nesting deeper than {max_depth} levels"
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str) and _bad_string(node):
            return f"the string {node[:40]!r}, which is not valid Unicode (a lone surrogate)"
    return None


def parse_json(data: bytes | str, label: str, what: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON, refusing what :func:`json.loads` would let through or crash on.

    Args:
        data: The JSON text (bytes are decoded as UTF-8).
        label: The file, for messages.
        what: What the JSON is (``"safetensors header"``, ``"index"``...), for messages.
        max_depth: Deepest nesting accepted.

    Returns:
        The parsed value: dicts, lists, str, int, finite float, bool, None.

    Raises:
        FormatError: Not UTF-8, not JSON, ``NaN``/``Infinity`` or a float that overflows, a
            lone surrogate in a string.
        UnsafeFileError: Nesting deeper than ``max_depth``, a number longer than
            :data:`MAX_NUMBER_CHARS` characters.

    Example:
        >>> parse_json(b'{"total_size": 12}', "m.json", "index")
        {'total_size': 12}
        >>> parse_json('{"total_size": NaN}', "m.json", "index")
        Traceback (most recent call last):
        ...
        polyak._errors.FormatError: m.json: corrupted index: it holds NaN, which is not a number in JSON
    """
    try:
        text = str(data, "utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
    except UnicodeDecodeError as exc:
        raise FormatError(f"{label}: corrupted {what} (not UTF-8: {exc})") from None
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except _Refused as exc:
        cls = UnsafeFileError if exc.unsafe else FormatError
        raise cls(f"{label}: corrupted {what}: it holds {exc}") from None
    except RecursionError:
        raise UnsafeFileError(
            f"{label}: the {what} is nested deeper than Python can parse; the file is corrupt or hostile"
        ) from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{label}: corrupted {what} (not valid JSON: {exc})") from None
    except ValueError as exc:  # defensive: any other literal json refuses
        raise FormatError(f"{label}: corrupted {what} ({exc})") from None
    why = _check_tree(value, max_depth)
    if why is not None:
        cls = UnsafeFileError if why.startswith("nesting") else FormatError
        raise cls(f"{label}: corrupted {what}: it holds {why}")
    return value


def json_object(data: bytes | str, label: str, what: str, *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """:func:`parse_json`, and the value must be a JSON object.

    Example:
        >>> json_object(b"[1, 2]", "model.npz", "__polyak__.json")
        Traceback (most recent call last):
        ...
        polyak._errors.FormatError: model.npz: corrupted __polyak__.json: a list, not a JSON object
    """
    value = parse_json(data, label, what, max_depth=max_depth)
    if not isinstance(value, dict):
        raise FormatError(f"{label}: corrupted {what}: a {_json_type(value)}, not a JSON object")
    return value


def _json_type(value: Any) -> str:
    """What a parsed value that is not an object is, in JSON's words."""
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")
