"""``python -m polyak._worker``: one worker of ``polyak average --workers N`` (internal)."""

from __future__ import annotations

import sys

from ._parallel import worker_main

if __name__ == "__main__":
    sys.exit(worker_main())
