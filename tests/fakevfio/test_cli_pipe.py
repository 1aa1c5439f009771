"""``fakevfio`` writing into a pipe whose reader has gone (``... | head -1``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


# Long output (drivers --json: the error comes from print) and short output that only
# the final flush writes (doctor --json: the error would come at exit).
@pytest.mark.parametrize("args", [["drivers", "--json"], ["doctor", "--json"]])
def test_a_closed_pipe_ends_the_command_quietly_with_sigpipes_status(args: list[str]) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte is written
    try:
        ran = subprocess.run(
            [sys.executable, "-m", "fakevfio", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            # Block-buffered stdout, as a user's shell gives (some CI sets PYTHONUNBUFFERED).
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)
    assert ran.stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert ran.returncode == 128 + 13  # as a C tool killed by SIGPIPE reports in the shell
