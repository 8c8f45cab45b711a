"""Ctrl-C while the ``polyak`` command starts: one line and exit status 130, no traceback.

``import polyak`` (numpy, ml_dtypes, the engine) takes a noticeable fraction of a second,
and it runs before the command's ``main`` can catch anything: a ``KeyboardInterrupt``
there printed a traceback. When, and only when, this process was started as the
``polyak`` command (the console script or ``python -m polyak``), :func:`guard` replaces
the SIGINT handler for the duration of that import with one that prints the command's
usual line and exits with status 130 (nothing has been written yet); ``main`` calls
:func:`release` first thing, which puts Python's handler back, so from then on Ctrl-C is
a ``KeyboardInterrupt`` handled by ``main`` (which cleans up what was being written). A
program that merely imports polyak keeps its handler.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

__all__ = ["guard", "release", "started_as_cli"]

MESSAGE = "polyak: interrupted; no output was written\n"

_installed = False


def started_as_cli() -> bool:
    """Whether this process is the ``polyak`` command (console script or ``python -m polyak``)."""
    argv0 = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv0 in ("polyak", "polyak.exe", "polyak-script.py"):
        return True
    orig = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(orig[1:], 1):
        if arg == "-m":
            return orig[i + 1 : i + 2] == ["polyak"]
        if arg == "-mpolyak":
            return True
        if not arg.startswith("-"):
            return False
    return False


def _interrupted(signum: int, frame: Any) -> None:
    # Nothing has been opened or written while polyak is still being imported.
    os.write(2, MESSAGE.encode())
    os._exit(130)


def guard() -> None:
    """Install the start-up handler, in the ``polyak`` command's main thread only."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread() or not started_as_cli():
        return
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return  # someone chose their own handler (or SIGINT is ignored): leave it
    signal.signal(signal.SIGINT, _interrupted)
    _installed = True


def release() -> None:
    """Put Python's handler back (``KeyboardInterrupt``), if :func:`guard` installed one."""
    global _installed
    if _installed and threading.current_thread() is threading.main_thread():
        if signal.getsignal(signal.SIGINT) is _interrupted:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        _installed = False


# Imported first by polyak/__init__.py: the guard covers the rest of ``import polyak``.
guard()
