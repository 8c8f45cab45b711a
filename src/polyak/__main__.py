"""``python -m polyak`` runs the ``polyak`` command."""

import sys

from .cli import main

sys.exit(main())
