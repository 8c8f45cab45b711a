"""``CheckpointCallback``: save the members of a later average during one ``fit`` call."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import keras

from .._atomic import cleanup_stale_temps, commit_many, fsync_file, temp_path_for
from .._errors import ConfigError, OutputError, whole_number
from .._retention import Retention

__all__ = ["CheckpointCallback"]

FORMATS = (".keras", ".weights.h5")


def _add_keras_metadata(src: Path, dst: Path, record: dict[str, Any]) -> None:
    """Copy a ``.keras`` zip, adding ``record`` as ``"polyak"`` in ``metadata.json``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED, allowZip64=True) as zout:
        for zi in zin.infolist():
            if zi.filename == "metadata.json":
                meta = json.loads(zin.read(zi))
                meta["polyak"] = record
                zout.writestr("metadata.json", json.dumps(meta, indent=2))
            else:
                with zin.open(zi) as fin, zout.open(zi.filename, "w", force_zip64=True) as fout:
                    shutil.copyfileobj(fin, fout, 1 << 22)


def save_model_atomic(model: Any, target: Path, record: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (``.keras`` or ``.weights.h5``) crash-safely, with ``record`` stored
    as ``"polyak"`` in ``metadata.json`` (``.keras``) or as a root attribute (``.weights.h5``)."""
    suffix = next((s for s in FORMATS if target.name.endswith(s)), None)
    if suffix is None:
        raise ConfigError(f"{target}: Keras checkpoints end in .keras or .weights.h5")
    tmp = temp_path_for(target, suffix)
    extra: Path | None = None
    try:
        if suffix == ".keras":
            model.save(tmp)
            if record is not None:
                extra = temp_path_for(target, suffix)
                _add_keras_metadata(tmp, extra, record)
                tmp.unlink()
                tmp, extra = extra, None
        else:
            model.save_weights(tmp)
            if record is not None:
                import h5py

                with h5py.File(tmp, "a") as f:
                    f.attrs["polyak"] = json.dumps(record)
        fsync_file(tmp)
        commit_many([(tmp, target)])
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        for p in (tmp, extra):
            if p is not None:
                with contextlib.suppress(OSError):
                    p.unlink()
    return target


class CheckpointCallback(keras.callbacks.Callback):
    """Save the model at the end of chosen epochs, crash-safely, as members of an average.

    The tutorial's "train 500 epochs and save the models from epoch 490 on" becomes one
    ``fit(epochs=500, callbacks=[CheckpointCallback("ckpt", start_epoch=490)])`` call.
    Files are named ``<prefix>_<epoch><format>`` with Keras' 0-based epoch
    (``model_490.keras`` ... ``model_499.keras``), so polyak's numeric ordering puts them
    oldest → newest. Each file is written to a temporary name in the same folder and
    renamed into place, so a crash never leaves a half-written member. The epoch and the
    optimizer step are also stored inside the file: in ``metadata.json`` under
    ``"polyak"`` for ``.keras`` archives (Keras ignores the entry), as the root attribute
    ``polyak`` (JSON) for ``.weights.h5`` files.

    Args:
        directory: Folder for the checkpoints (created if missing).
        start_epoch: First epoch (0-based, as Keras counts) to save.
        every: Save every ``every`` epochs from ``start_epoch``.
        keep_last: Keep only the newest ``keep_last`` files named like this callback's
            (``None``: keep all), also those written before a restart by an earlier run;
            the file just written is never deleted, other files never touched (the policy
            of ``polyak.torch.CheckpointSaver``). Works with early stopping: the newest
            files are always the last epochs actually trained.
        format: ``".keras"`` (whole model, loadable with ``keras.models.load_model``) or
            ``".weights.h5"`` (weights only, smaller).
        prefix: File-name prefix.

    Attributes:
        saved: The files this callback wrote that are still on disk, oldest → newest.

    Raises:
        ConfigError: An unknown ``format``, a ``start_epoch`` below 0, an ``every`` or
            ``keep_last`` below 1, or a ``prefix`` with a path separator.
        OutputError: (during ``fit``) a checkpoint cannot be written.

    Example:
        >>> import numpy as np, tempfile, keras, polyak
        >>> from polyak.keras import CheckpointCallback
        >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        >>> model.compile(optimizer="sgd", loss="mse")
        >>> folder = tempfile.mkdtemp()
        >>> cb = CheckpointCallback(folder, start_epoch=2, format=".weights.h5")
        >>> x, y = np.ones((8, 2), "float32"), np.ones((8, 1), "float32")
        >>> _ = model.fit(x, y, epochs=4, batch_size=4, verbose=0, callbacks=[cb])
        >>> [p.name for p in cb.saved]  # epochs 2 and 3 (Keras counts from 0)
        ['model_2.weights.h5', 'model_3.weights.h5']
        >>> _ = polyak.average(cb.saved, out=f"{folder}/avg.weights.h5", keep_optimizer=True)
        >>> model.load_weights(f"{folder}/avg.weights.h5")  # a compiled model needs the optimizer state

        Without ``keep_optimizer`` the file holds no optimizer state: load it into a newly
        built, uncompiled model of the same architecture, then compile that.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        start_epoch: int = 0,
        every: int = 1,
        keep_last: int | None = None,
        format: str = ".keras",
        prefix: str = "model",
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ConfigError(f"format must be one of {FORMATS}, got {format!r}")
        self._retention = Retention(prefix, format, start=whole_number(start_epoch, "start_epoch", 0),
                                    every=every, keep_last=keep_last)
        self.directory = Path(directory)
        self.start_epoch = start_epoch
        self.every = every
        self.keep_last = keep_last
        self.format = format
        self.prefix = prefix
        #: Paths written by this callback and still on disk, oldest → newest.
        self.saved: list[Path] = []

    def path_for(self, epoch: int) -> Path:
        """The file the checkpoint of ``epoch`` (0-based) is written to."""
        return self.directory / self._retention.name_for(epoch)

    def files(self) -> list[Path]:
        """This callback's checkpoints on disk (also those of earlier runs), oldest first."""
        return self._retention.files(self.directory)

    def on_train_begin(self, logs: Any = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        cleanup_stale_temps(self.directory)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if not self._retention.due(epoch):
            return
        step = None
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None:
            with contextlib.suppress(Exception):
                step = int(keras.ops.convert_to_numpy(optimizer.iterations))
        target = self.path_for(epoch)
        save_model_atomic(self.model, target, {"epoch": epoch, "step": step})
        if target in self.saved:
            self.saved.remove(target)
        self.saved.append(target)
        gone = set(self._retention.prune(self.directory, keep=target))
        self.saved = [p for p in self.saved if p not in gone]
