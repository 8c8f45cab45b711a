"""The capture policy shared by ``polyak.torch.CheckpointSaver`` and ``polyak.keras.CheckpointCallback``.

One :class:`Retention` says which epochs (steps) are saved, what each file is called,
which files of a folder belong to the saver, and which of them to delete to keep the
newest K. It looks at the folder, not at a list kept in memory, so files written before a
restart (by an earlier process, or an earlier callback object) count too: a restarted run
with ``keep_last=K`` still leaves the newest K. A file belongs to the saver only if its
name is exactly one the saver writes (``<stem>_<n><suffix>``, ``n`` without leading
zeros), so other files in the folder (``model_best.keras``, ``model_007.keras``,
temporary files) are never deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import ConfigError, whole_number

__all__ = ["Retention"]


@dataclass(frozen=True)
class Retention:
    """Which checkpoints a saver writes and keeps.

    Attributes:
        prefix: File-name prefix (no folder separators).
        suffix: File suffix with its dot (``.safetensors``, ``.keras``, ``.weights.h5``).
        unit: Inserted after the prefix when given: ``ckpt_epoch_3.pt`` (torch's
            ``CheckpointSaver``); ``None`` for ``model_3.keras`` (Keras' callback).
        start: First number (epoch or step) saved.
        every: Save ``start``, ``start + every``, ...
        keep_last: Keep only the newest this many files (``None``: keep all).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> r = Retention("model", ".keras", keep_last=2)
        >>> for n in (1, 2, 3):
        ...     _ = (folder / r.name_for(n)).write_text("x")
        >>> _ = (folder / "model_best.keras").write_text("not ours")
        >>> [p.name for p in r.prune(folder)]
        ['model_1.keras']
        >>> sorted(p.name for p in folder.iterdir())
        ['model_2.keras', 'model_3.keras', 'model_best.keras']
    """

    prefix: str
    suffix: str
    unit: str | None = None
    start: int = 0
    every: int = 1
    keep_last: int | None = None
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.prefix or "/" in self.prefix or os.sep in self.prefix:
            raise ConfigError(f"prefix must be a plain file-name prefix, got {self.prefix!r}")
        whole_number(self.start, "start", 0)
        whole_number(self.every, "every", 1)
        if self.keep_last is not None and (
                isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 1):
            raise ConfigError(f"keep_last must be None or a whole number ≥ 1, got {self.keep_last!r}")
        pattern = re.compile(rf"^{re.escape(self.stem)}_(0|[1-9][0-9]*){re.escape(self.suffix)}$")
        object.__setattr__(self, "_pattern", pattern)

    @property
    def stem(self) -> str:
        """The name before ``_<number>``: ``prefix`` or ``prefix_unit``."""
        return self.prefix if self.unit is None else f"{self.prefix}_{self.unit}"

    def due(self, number: int) -> bool:
        """Whether epoch (step) ``number`` is saved: ``start``, ``start + every``, ..."""
        return number >= self.start and (number - self.start) % self.every == 0

    def name_for(self, number: int) -> str:
        """The file name of epoch (step) ``number``."""
        return f"{self.stem}_{int(number)}{self.suffix}"

    def number_of(self, name: str) -> int | None:
        """The number in ``name`` if it is a name this saver writes, else ``None``."""
        m = self._pattern.match(name)
        return int(m.group(1)) if m else None

    def files(self, directory: str | os.PathLike[str]) -> list[Path]:
        """This saver's checkpoints in ``directory``, oldest (smallest number) first."""
        found = []
        with contextlib.suppress(OSError):
            for entry in Path(directory).iterdir():
                n = self.number_of(entry.name)
                if n is not None and entry.is_file():
                    found.append((n, entry))
        return [p for _, p in sorted(found)]

    def surplus(self, directory: str | os.PathLike[str], *, keep: Path | None = None) -> list[Path]:
        """The files :meth:`prune` deletes: all but the newest ``keep_last``, never ``keep``.

        ``keep`` is the file just written: a run restarted from an earlier epoch next to
        newer-numbered files of the abandoned run never deletes its own new checkpoint.
        """
        if self.keep_last is None:
            return []
        return [p for p in self.files(directory)[: -self.keep_last] if p != keep]

    def prune(self, directory: str | os.PathLike[str], *, keep: Path | None = None) -> list[Path]:
        """Delete :meth:`surplus` files; returns those deleted."""
        gone = []
        for old in self.surplus(directory, keep=keep):
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
                gone.append(old)
        return gone
