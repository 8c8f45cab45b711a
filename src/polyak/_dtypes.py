"""dtype helpers: names ↔ numpy dtypes (bfloat16 and float8 through ml_dtypes), classes."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from ._errors import ConfigError

__all__ = ["accumulator_dtype", "dtype_from_name", "dtype_name", "is_float", "is_integer_like", "output_dtype"]

# ml_dtypes' floating types are numpy "void-like" (kind 'V'), so numpy's own
# issubdtype(np.floating) does not see them.
_ML_FLOATS: dict[str, np.dtype] = {
    name: np.dtype(getattr(ml_dtypes, name))
    for name in (
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e4m3b11fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(ml_dtypes, name)
}


def dtype_from_name(name: str) -> np.dtype:
    """Turn a dtype name (``"float32"``, ``"bfloat16"``, ``"float8_e4m3fn"``...) into a dtype."""
    if name in _ML_FLOATS:
        return _ML_FLOATS[name]
    try:
        dt = np.dtype(name)
    except TypeError:
        valid = "float16, bfloat16, float32, float64, float8_e4m3fn, float8_e5m2"
        raise ConfigError(f"unknown dtype {name!r}; use one of {valid}") from None
    return dt


def dtype_name(dtype: np.dtype) -> str:
    """A dtype's canonical name (``bfloat16`` rather than ``|V2``)."""
    return np.dtype(dtype).name


def is_float(dtype: np.dtype) -> bool:
    """True for floating-point and complex dtypes, ml_dtypes' bfloat16/float8 included."""
    dt = np.dtype(dtype)
    if dt.kind in "fc":
        return True
    return dt in _ML_FLOATS.values()


def is_integer_like(dtype: np.dtype) -> bool:
    """True for integer and boolean dtypes: these are copied, never averaged."""
    return np.dtype(dtype).kind in "biu"


def accumulator_dtype(dtype: np.dtype) -> np.dtype:
    """Where a floating tensor is summed: float64 for float64, float32 for anything narrower.

    Complex tensors accumulate in their own complex dtype.
    """
    dt = np.dtype(dtype)
    if dt.kind == "c":
        return dt
    if dt == np.float64 or (dt.kind == "f" and dt.itemsize > 8):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def output_dtype(name: str | None) -> np.dtype | None:
    """The dtype asked for the floating tensors of an output (``--dtype``), checked.

    ``None`` (keep each tensor's dtype) stays ``None``; anything else must name a
    floating-point dtype. Checked with the other options, before any file is opened.

    Example:
        >>> output_dtype("bfloat16").name, output_dtype(None)
        ('bfloat16', None)
        >>> output_dtype("U4")
        Traceback (most recent call last):
        ...
        polyak._errors.ConfigError: --dtype must be a floating-point dtype (float16, bfloat16, float32, float64, float8_e4m3fn, float8_e5m2), got 'U4'
    """
    if name is None:
        return None
    if not isinstance(name, str):
        raise ConfigError(f"--dtype must be a dtype name such as 'float32', got {name!r}")
    dt = dtype_from_name(name)
    if not is_float(dt):
        raise ConfigError(
            "--dtype must be a floating-point dtype (float16, bfloat16, float32, float64, "
            f"float8_e4m3fn, float8_e5m2), got {name!r}"
        )
    return dt
