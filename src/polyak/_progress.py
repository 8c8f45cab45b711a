"""A small progress bar on stderr: only on a terminal, only for work that takes a moment."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human_bytes(n: float) -> str:
    """``1234567`` → ``"1.2 MB"`` (decimal units, as disk sizes are sold).

    Example:
        >>> human_bytes(999), human_bytes(1234567)
        ('999 B', '1.2 MB')
    """
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Progress:
    """Progress over a known total (bytes, steps, epochs...).

    Silent when disabled, when the stream is not a TTY, or until ``delay`` seconds have
    passed (quick jobs print nothing). Redraws at most ten times a second.

    Example:
        >>> p = Progress(100, "averaging", enabled=False)
        >>> p.update(50); p.close()
    """

    def __init__(
        self,
        total: float,
        desc: str = "",
        *,
        enabled: bool = True,
        unit: str = "B",
        stream: TextIO | None = None,
        delay: float = 0.5,
    ) -> None:
        self.total = max(float(total), 1e-12)
        self.desc = desc
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(enabled and isatty is not None and isatty())
        self.delay = delay
        self.start = time.perf_counter()
        self.done = 0.0
        self._last_draw = 0.0
        self._drawn = False

    def _fmt(self, value: float) -> str:
        return human_bytes(value) if self.unit == "B" else f"{value:.0f}"

    def update(self, amount: float = 1.0) -> None:
        self.done += amount
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.start < self.delay or now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        width = 30
        filled = int(frac * width)
        elapsed = now - self.start
        eta = elapsed * (1 - frac) / frac if frac > 0 else 0.0
        bar = "█" * filled + "·" * (width - filled)
        self.stream.write(
            f"\r{self.desc} {bar} {frac * 100:5.1f}% {self._fmt(self.done)}/{self._fmt(self.total)}"
            f" {elapsed:.1f}s<{eta:.1f}s "
        )
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
