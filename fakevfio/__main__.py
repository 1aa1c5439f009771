"""``python -m fakevfio``: the same as the ``fakevfio`` command."""

from __future__ import annotations

import sys

from fakevfio.cli import main

if __name__ == "__main__":
    sys.exit(main())
