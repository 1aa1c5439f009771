"""``fakevfio`` writing into a pipe whose reader has gone (``... | head -1``).

:func:`run_into_closed_pipe` serves the ``migrator`` case too (tests/migrator/test_cli.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_into_closed_pipe(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with stdout a pipe whose reader is gone before the first byte."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            argv,
            stdout=write,
            stderr=subprocess.PIPE,
            # Block-buffered stdout, as a user's shell gives (some CI sets PYTHONUNBUFFERED).
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
            text=True,
            timeout=60,
        )
    finally:
        os.close(write)


# Long output (drivers --json: the error comes from print) and short output that only
# the final flush writes (doctor --json: the error would come at exit).
@pytest.mark.parametrize("args", [["drivers", "--json"], ["doctor", "--json"]])
def test_a_closed_pipe_ends_the_command_quietly_with_sigpipes_status(args: list[str]) -> None:
    ran = run_into_closed_pipe([sys.executable, "-m", "fakevfio", *args])
    assert ran.stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert ran.returncode == 128 + 13  # as a C tool killed by SIGPIPE reports in the shell
