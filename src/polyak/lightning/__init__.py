"""polyak for PyTorch Lightning: an EMA of the weights as a ``Trainer`` callback.

Importing this module imports ``lightning`` (and torch): the user opted in. It builds on
:mod:`polyak.torch` (:class:`polyak.torch.EMA` does the averaging).

* :class:`EMACallback`: updated after every optimizer step, validation and test on the
  average, the average in the module at the end of ``fit``, saved in Lightning
  checkpoints and restored by ``fit(ckpt_path=...)`` exactly; DDP and FSDP2.

Saved checkpoints (``ModelCheckpoint``) are averaged offline with ``polyak average
epoch=*.ckpt --key state_dict`` (see docs/lightning.md).

Example:
    >>> import lightning.pytorch as pl
    >>> from polyak.lightning import EMACallback
    >>> trainer = pl.Trainer(callbacks=[EMACallback(decay=0.999)], logger=False,
    ...                      enable_progress_bar=False, enable_model_summary=False,
    ...                      enable_checkpointing=False)
"""

from __future__ import annotations

import lightning  # noqa: F401  - the user opted in to Lightning by importing polyak.lightning

from ._ema import CHECKPOINT_KEY as CHECKPOINT_KEY
from ._ema import EMACallback as EMACallback

__all__ = ["CHECKPOINT_KEY", "EMACallback"]
