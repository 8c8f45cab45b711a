"""Metrics as polyak reads them everywhere: **split → metric name → number**.

An evaluate function may return ``{"validation": {"accuracy": 0.81}, "test": {...}}`` or a
flat ``{"accuracy": 0.8}``, which has evaluated one split, stored under the name
:data:`DEFAULT_SPLIT` (``"eval"``). ``mode`` says which direction is better;
:func:`default_mode` guesses it from the metric's name.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping
from typing import Any

from .._errors import ConfigError

__all__ = ["DEFAULT_SPLIT", "default_mode", "mode_sign", "normalize_metrics"]

#: Split name given to the metrics of an evaluate function that returns a flat dict.
DEFAULT_SPLIT = "eval"

#: Metric names for which lower is better.
_LOWER_IS_BETTER = re.compile(r"loss|error|err\b|mse|mae|rmse|nll|perplexity|ppl|wer|cer", re.I)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, int, float)):
        try:
            return float(value)  # numpy / torch scalars
        except (TypeError, ValueError):
            raise ConfigError(
                f"{where} is {value!r} ({type(value).__name__}); evaluate must return numbers"
            ) from None
    return float(value)


def normalize_metrics(raw: Any, *, source: str = "evaluate") -> dict[str, dict[str, float]]:
    """Bring what an evaluate/score function returned into ``{split: {metric: float}}``.

    Args:
        raw: ``{"validation": {"accuracy": ..}, "test": {..}}`` (splits) or a flat
            ``{"accuracy": .., "loss": ..}`` (one split, named ``"eval"``).
        source: Names the function in error messages.

    Raises:
        ConfigError: Not a mapping, empty, a mix of numbers and nested dicts, or a value
            that is not a number.

    Example:
        >>> normalize_metrics({"accuracy": 0.5})
        {'eval': {'accuracy': 0.5}}
    """
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            f"{source} must return a non-empty dict of metrics, e.g. {{'accuracy': 0.8}} or "
            f"{{'validation': {{'accuracy': 0.8}}, 'test': {{'accuracy': 0.79}}}}; got {raw!r}"
        )
    nested = [isinstance(v, Mapping) for v in raw.values()]
    if all(nested):
        out: dict[str, dict[str, float]] = {}
        for split, metrics in raw.items():
            if not metrics:
                raise ConfigError(f"{source} returned no metrics for split {split!r}")
            out[str(split)] = {str(k): _number(v, f"{source}: {split}/{k}") for k, v in metrics.items()}
        return out
    if any(nested):
        raise ConfigError(
            f"{source} returned a mix of numbers and dicts ({list(raw)}); return either "
            "{metric: number} or {split: {metric: number}}"
        )
    return {DEFAULT_SPLIT: {str(k): _number(v, f"{source}: {k}") for k, v in raw.items()}}


def mode_sign(mode: str) -> float:
    """``+1`` when higher is better (``"max"``), ``-1`` when lower is (``"min"``)."""
    if mode not in ("max", "min"):
        raise ConfigError(f"mode must be 'max' (higher is better) or 'min' (lower is better), got {mode!r}")
    return 1.0 if mode == "max" else -1.0


def default_mode(metric: str) -> str:
    """``"min"`` for metric names that read lower-is-better (loss, error, mse, mae, nll,
    perplexity, wer, cer...), ``"max"`` otherwise.

    Example:
        >>> default_mode("val_loss"), default_mode("accuracy")
        ('min', 'max')
    """
    return "min" if _LOWER_IS_BETTER.search(metric) else "max"
