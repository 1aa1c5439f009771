"""Subprocess plumbing shared by mounts and migrations: errors, ready lines, children.

Every server or migrator the toolkit starts asks for SIGTERM when the thread
that started it dies (``PR_SET_PDEATHSIG``), announces itself with one line
(read here a byte at a time, so nothing after it is taken from the pipe), and
is waited for with a deadline.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from fakevfio.errors import FakeVfioError
from fakevfio.testing._rss import wait_rusage

_PR_SET_PDEATHSIG = 1


class HarnessError(FakeVfioError):
    """Something the toolkit started failed: a server or migrator exited or timed out.

    The base of :class:`~fakevfio.testing.MountError` and
    :class:`~fakevfio.testing.MigrationFailed`; benchmarks derive their own.
    """


def parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks for SIGTERM when our thread dies (Linux only).

    libc is loaded here, in the parent: the child only makes one prctl() call
    between fork and exec, and never runs the dynamic loader. Known
    shortcoming: the signal fires when the *thread* that started the child
    exits, so start children from a thread that outlives them.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return preexec


def read_line(stream: IO[bytes], deadline: float) -> bytes | None:
    """One line from a pipe, a byte at a time; None when ``deadline`` passed first.

    The line ends with ``b"\\n"`` unless the writer closed the pipe (exited) first.
    """
    line = bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                return None
            byte = os.read(stream.fileno(), 1)
            if not byte:
                break
            line += byte
    return bytes(line)


class Child:
    """A helper subprocess (one migrator side): output collected, reaped with ``wait4``.

    :meth:`wait_for_line` reads stderr until the announcement line; then
    :meth:`finish` drains both pipes (threads, so neither can fill up), waits
    with a deadline (killing it after), and records the exit code and
    ``ru_maxrss``. :meth:`kill` is the cleanup for every error path.
    """

    def __init__(self, argv: Sequence[str], *, name: str) -> None:
        self.argv = list(argv)
        self.name = name
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=parent_death_signal(),
        )
        self._out = bytearray()
        self._err = bytearray()
        self._drains: list[threading.Thread] = []
        self.maxrss_kib = 0
        self.timed_out = False
        self._finished = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def stdout(self) -> str:
        return self._out.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self._err.decode(errors="replace")

    def wait_for_line(self, prefix: str, timeout: float) -> str | None:
        """Read stderr lines until one starts with ``prefix``; the rest of that line.

        None when the child exited or did not print it within ``timeout`` s;
        the lines before it stay in :attr:`stderr` either way.
        """
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while True:
            line = read_line(self.proc.stderr, deadline)
            if line is None:
                self._err += f"{self.name} printed no {prefix!r} within {timeout} s\n".encode()
                return None
            text = line.decode(errors="replace")
            if line.endswith(b"\n") and text.startswith(prefix):
                return text[len(prefix) :].strip()
            self._err += line
            if not line.endswith(b"\n"):
                return None  # it exited

    def _drain(self) -> None:
        if self._drains:
            return
        for stream, sink in ((self.proc.stdout, self._out), (self.proc.stderr, self._err)):
            assert stream is not None
            thread = threading.Thread(target=_pump, args=(stream, sink), daemon=True)
            thread.start()
            self._drains.append(thread)

    def start_draining(self) -> None:
        """Collect stdout and stderr from now on (:meth:`finish` does it too)."""
        self._drain()

    def finish(self, timeout: float) -> int:
        """Wait for the exit, killing it after ``timeout`` s; the exit code."""
        if self._finished:
            assert self.proc.returncode is not None
            return self.proc.returncode
        self._drain()
        try:
            code, self.maxrss_kib = wait_rusage(self.proc, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code, self.maxrss_kib = wait_rusage(self.proc, None)
            self.timed_out = True
        for thread in self._drains:
            thread.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self.timed_out:
            self._err += f"{self.name} killed after {timeout} s\n".encode()
        self._finished = True
        return code

    def kill(self) -> None:
        """Kill it if it still runs and collect what it printed (cleanup; idempotent)."""
        if self.proc.returncode is None:
            self.proc.kill()
        self.finish(5)


def _pump(stream: IO[bytes], sink: bytearray) -> None:
    while chunk := os.read(stream.fileno(), 65536):
        sink += chunk


__all__ = ["Child", "HarnessError", "parent_death_signal", "read_line"]
