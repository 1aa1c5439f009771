"""Peak resident set size of a child process: sampled while it runs, or exact at its exit.

Two measurements, because tests want one and benchmarks the other:

* :class:`PeakRss` samples ``VmHWM`` (the peak since exec) from
  ``/proc/PID/status`` every 2 ms until the process exits. It works for any
  process, also one that another part of the test reaps.
* :func:`wait_rusage` reaps a :class:`subprocess.Popen` child with ``wait4``
  and returns its ``ru_maxrss``: exact, but only for our own children.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

_SAMPLE_S = 0.002


def status_kib(pid: int, field: str) -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``), or None if it has none.

    None also when the process is gone; a zombie has no memory fields.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found.group(1)) if found else None


class PeakRss:
    """Samples a process's VmHWM (peak RSS since exec) from a thread until it exits.

    Example::

        peak = PeakRss(proc.pid)
        ...  # drive the process until it exits
        assert peak.join() < 128 << 10  # KiB
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (hwm := status_kib(self.pid, "VmHWM")) is not None:
            self.peak_kib = max(self.peak_kib, hwm)
            time.sleep(_SAMPLE_S)

    def join(self, timeout: float = 10.0) -> int:
        """Wait until the process has exited (at most ``timeout`` s); the peak in KiB."""
        self._thread.join(timeout)
        return self.peak_kib


def wait_rusage(proc: subprocess.Popen[Any], timeout: float | None) -> tuple[int, int]:
    """Reap ``proc`` with ``wait4``: (its exit code as Popen reports it, ru_maxrss in KiB).

    Sets ``proc.returncode``. A child something else already reaped gives
    ``(returncode, 0)``.

    Raises:
        subprocess.TimeoutExpired: it still runs after ``timeout`` seconds.
    """
    if proc.returncode is not None:
        return proc.returncode, 0
    if timeout is not None and not _exited_within(proc.pid, timeout):
        raise subprocess.TimeoutExpired(proc.args, timeout)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss


def _exited_within(pid: int, timeout: float) -> bool:
    """Whether child ``pid`` exits within ``timeout`` s (it is not reaped)."""
    pidfd = -1
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(pid)
    if pidfd >= 0:
        try:
            return bool(select.select([pidfd], [], [], max(0.0, timeout))[0])
        finally:
            os.close(pidfd)
    deadline = time.monotonic() + timeout  # no pidfd (old kernel): poll
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:
            return True  # not our child (any more): wait4 says so
        if time.monotonic() >= deadline:
            return False
        time.sleep(_SAMPLE_S)


__all__ = ["PeakRss", "status_kib", "wait_rusage"]
