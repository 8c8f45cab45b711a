"""The polyak exception family.

Every error polyak raises on purpose is a :class:`PolyakError`. Subclasses also derive
from the builtin that fits (``ValueError`` for bad values, ``OSError`` for files), so code
that already catches those keeps working. Messages say what went wrong, where (file and
tensor), and what to do about it.
"""

from __future__ import annotations


class PolyakError(Exception):
    """Base class of every error raised by polyak on purpose."""


class ConfigError(PolyakError, ValueError):
    """An option or argument has an invalid value (a scheme, alpha, weights, a size...)."""


class SchemeError(ConfigError):
    """A weighting scheme or its parameters are invalid."""


class FormatError(PolyakError, ValueError):
    """A file cannot be read as the format it claims to be (corrupt, truncated, unknown)."""


class UnsafeFileError(FormatError):
    """A file would need code execution, links outside itself, or unbounded resources."""


class MismatchError(PolyakError, ValueError):
    """Members disagree on tensor names, shapes or dtypes."""


class NonFiniteError(PolyakError, ValueError):
    """A member (or the result) holds NaN or Inf in a floating-point tensor."""


class OutputError(PolyakError, OSError):
    """The output cannot be written (exists, read-only folder, equal to an input, disk full)."""


def whole_number(value: object, what: str, minimum: int = 0) -> int:
    """``value`` if it is an ``int`` (not a bool) of at least ``minimum``, else a :class:`ConfigError`.

    Example:
        >>> whole_number(3, "every", 1)
        3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{what} must be a whole number ≥ {minimum}, got {value!r}")
    return value


class PolyakWarning(UserWarning):
    """Base class of every warning polyak gives (averaging that looks unsafe, biased selection)."""


__all__ = [
    "ConfigError",
    "FormatError",
    "MismatchError",
    "NonFiniteError",
    "OutputError",
    "PolyakError",
    "PolyakWarning",
    "SchemeError",
    "UnsafeFileError",
    "whole_number",
]
