"""``python -m benchmarks.floor MOUNTPOINT SIZE``: the FUSE floor, served until SIGTERM.

The file system itself is :class:`fakevfio._fuse.FloorFs` (pyfuse3 is imported in
that one module); this entry point only runs it in its own process, as
``fakevfio mount`` runs the device file system.
"""

from __future__ import annotations

import sys

from fakevfio._fuse import serve_floor

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m benchmarks.floor MOUNTPOINT SIZE")
    serve_floor(sys.argv[1], int(sys.argv[2]))
