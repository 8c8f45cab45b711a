"""Helpers shared by the hostile-input and reliability tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

import polyak
from polyak._atomic import TEMP_MARK
from polyak.formats import open_source

__all__ = [
    "ReadingTimeout",
    "leftovers",
    "read_all",
    "run_cli",
    "time_limit",
]


class ReadingTimeout(Exception):
    """A reader took longer than its time limit (a hang)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`ReadingTimeout` in the main thread after ``seconds`` (SIGALRM)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _alarm(signum: int, frame: Any) -> None:
        raise ReadingTimeout(f"reading took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def read_all(path: Path, **kwargs: Any) -> dict[str, np.ndarray]:
    """Open ``path`` with polyak and read every tensor, checking each against its info.

    Returns copies of the tensors. Raises whatever polyak raises; an inconsistency between
    the declared info and the array read back is an ``AssertionError`` (a polyak bug).
    """
    out: dict[str, np.ndarray] = {}
    with open_source(path, **kwargs) as src:
        infos = dict(src.infos())
        for name, info in infos.items():
            arr = src.read(name)
            if not isinstance(arr, np.ndarray):
                raise AssertionError(f"{name}: read returned {type(arr).__name__}")
            if arr.shape != info.shape or arr.dtype != info.dtype:
                raise AssertionError(f"{name}: info says {info.shape} {info.dtype}, read gave {arr.shape} {arr.dtype}")
            out[name] = np.array(arr, copy=True)
        src.metadata()
    polyak.inspect(path, **kwargs)
    return out


def leftovers(folder: Path) -> list[str]:
    """Names of polyak temporary files in ``folder`` (recursively)."""
    return sorted(p.name for p in folder.rglob("*") if TEMP_MARK in p.name)


def run_cli(args: list[str], *, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m polyak ARGS`` in a subprocess (PYTHONPATH and the rest passed on)."""
    full_env = dict(os.environ if env is None else env)
    return subprocess.run(
        [sys.executable, "-m", "polyak", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        check=False,
    )


def one_line_error(stderr: str) -> str:
    """The CLI's single error line; fails on tracebacks or extra lines."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if "Traceback" in stderr or len(lines) != 1 or not lines[0].startswith("polyak: error:"):
        raise AssertionError(f"expected one 'polyak: error:' line, got:\n{stderr}")
    return lines[0]


def expect_polyak_error(fn: Callable[[], Any]) -> polyak.PolyakError | None:
    """Call ``fn``; return the PolyakError it raised, or None if it succeeded."""
    try:
        fn()
    except polyak.PolyakError as exc:
        return exc
    return None
