"""polyak for the Hugging Face Transformers ``Trainer``: an EMA of the weights as a callback.

Importing this module imports ``transformers`` (and torch): the user opted in. It builds
on :mod:`polyak.torch` (:class:`polyak.torch.EMA` does the averaging).

* :class:`EMACallback`: updated after every optimizer step, ``ema.safetensors`` in every
  ``checkpoint-N/`` folder, restored by ``train(resume_from_checkpoint=...)`` exactly,
  evaluation on the average on request, the final average as a ``from_pretrained`` folder.

The ``checkpoint-N/`` folders themselves are averaged offline with ``polyak average``.

Example:
    >>> from polyak.transformers import EMACallback
    >>> callback = EMACallback(decay=0.999, eval_with_ema=True, final_dir="out/ema")
    >>> # trainer = transformers.Trainer(model, args, ..., callbacks=[callback])
"""

from __future__ import annotations

import transformers  # noqa: F401  - the user opted in to Transformers by importing polyak.transformers

from ._ema import EMA_FILE as EMA_FILE
from ._ema import EMACallback as EMACallback

__all__ = ["EMA_FILE", "EMACallback"]
