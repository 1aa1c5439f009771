"""Reliability and security tests: fault matrix, FUSE process death, fuzzing, defaults.

Shared checks live here so each test module states only its scenario.
"""

from __future__ import annotations

import re
import time

from tests.conftest import MountHandle

#: Phase names the migrator puts at the start of its error line (source and destination).
PHASES = (
    "setup",
    "pre-copy",
    "stop",
    "stop-copy",
    "config",
    "complete",
    "cleanup",
    "recovery",
    "load setup",
    "load",
    "start",
)
_PHASE_RE = re.compile(r"migrator: error: (" + "|".join(re.escape(p) for p in PHASES) + r")[,:] ")


def error_line(stderr: str) -> str:
    """The one ``migrator: error:`` line of a failed run; asserts it names a phase."""
    lines = [line for line in stderr.splitlines() if line.startswith("migrator: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    assert _PHASE_RE.match(lines[0]), f"no phase in {lines[0]!r}"
    return lines[0]


def phase_of(line: str) -> str:
    m = _PHASE_RE.match(line)
    assert m is not None, line
    return m.group(1)


def wait_for(mount: MountHandle, name: str, states: set[str], timeout: float = 20.0) -> str:
    """Poll a device's state until it is one of ``states``; returns it."""
    deadline = time.monotonic() + timeout
    while (now := mount.state(name)) not in states:
        assert time.monotonic() < deadline, f"{name} stayed {now}, expected one of {states}"
        time.sleep(0.01)
    return now


def assert_reset(mount: MountHandle, name: str) -> None:
    """A destination device after a failed migration: RUNNING, and its log ends with RESET."""
    assert mount.state(name) == "RUNNING"
    log = mount.log_lines(name)
    assert log, f"{name}: empty log"
    assert log[-1] == "RESET", log
