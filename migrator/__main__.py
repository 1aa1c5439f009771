"""``python -m migrator``: the same as the ``migrator`` command."""

from __future__ import annotations

import sys

from migrator.cli import main

sys.exit(main())
