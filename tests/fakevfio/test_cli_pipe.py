"""``fakevfio`` writing into a pipe whose reader has gone (``... | head -1``)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_closed_pipe_ends_the_command_quietly_with_sigpipes_status() -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte is written
    try:
        ran = subprocess.run(
            [sys.executable, "-m", "fakevfio", "drivers", "--json"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert ran.stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert ran.returncode == 128 + 13  # as a C tool killed by SIGPIPE reports in the shell
