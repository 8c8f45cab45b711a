"""Helpers shared by the format modules."""

from __future__ import annotations

from pathlib import Path

from .._errors import ConfigError


def reject_key(key: str | None, path: Path, format_name: str) -> None:
    """``--key`` selects a nested dict inside a ``.pt`` file; other formats are flat."""
    if key is not None:
        raise ConfigError(
            f"{path}: --key {key!r} applies to nested PyTorch checkpoints; "
            f"{format_name} files hold their tensors at the top level, so drop --key"
        )
