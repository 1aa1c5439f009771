"""One synchronous QMP client for everything here that drives a QEMU: the guest kit,
the QEMU tests and the QEMU benchmark.

Theory of operation: QEMU is started with ``-qmp unix:PATH,server=on,wait=off`` and
:meth:`Qmp.connect` polls until that socket accepts, failing at once when QEMU exits
first (QEMU's log tail in the message) and after ``timeout`` seconds otherwise. Each
command goes through the ``qemu.qmp`` library's synchronous client
(``QEMUMonitorProtocol``); nothing here speaks the protocol itself.

Rule 1: :meth:`Qmp.cmd` returns the command's ``return`` value. QEMU's refusal is a
:class:`QmpCommandError` naming the command and QEMU's error class and text; a
connection that fails mid-command (QEMU died, or hung up after ``quit``) is a
:class:`QmpConnectionError`. Both are :class:`~fakevfio.guest.GuestError`, so a caller
needs no import from ``qemu.qmp``.
Rule 2: :meth:`Qmp.close` never raises: after ``quit`` the library reports QEMU's
hang-up, which is the expected end.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from fakevfio.guest._errors import GuestError, GuestTimeout

_POLL_S = 0.05


class QmpCommandError(GuestError):
    """QEMU refused a QMP command (``error_class`` is QEMU's, e.g. ``GenericError``)."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {description}")
        self.command = command
        self.error_class = error_class
        self.description = description


class QmpConnectionError(GuestError, ConnectionError):
    """The QMP connection failed while a command was in flight."""


def log_tail(log: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a QEMU log, or a note that it does not exist."""
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {log})"
    return "\n".join(text.splitlines()[-lines:])


class Qmp:
    """A connected QMP monitor of one QEMU (see the module's rules)."""

    def __init__(self, monitor: QEMUMonitorProtocol) -> None:
        self.monitor = monitor

    @classmethod
    def connect(
        cls,
        path: Path,
        process: subprocess.Popen[bytes],
        log: Path,
        *,
        timeout: float = 30.0,
        reply_timeout: float = 60.0,
    ) -> Qmp:
        """Connect to the QMP socket ``path`` of the QEMU ``process`` (log: ``log``).

        Raises :class:`GuestError` when QEMU exits before the socket accepts and
        :class:`GuestTimeout` when it does not accept within ``timeout`` seconds.
        Each later command waits at most ``reply_timeout`` seconds for its reply.
        """
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise GuestError(
                    f"QEMU exited with status {process.returncode} before its QMP socket "
                    f"{path} accepted a connection\n--- QEMU log ({log}) ---\n{log_tail(log)}"
                )
            if path.exists():
                monitor = QEMUMonitorProtocol(str(path))
                try:
                    monitor.connect()
                except (ConnectError, OSError):
                    monitor.close()
                else:
                    monitor.settimeout(reply_timeout)
                    return cls(monitor)
            if time.monotonic() > deadline:
                raise GuestTimeout(
                    f"QEMU's QMP socket {path} did not accept a connection within "
                    f"{timeout:g} s (is -qmp unix:{path},server=on,wait=off on its command "
                    f"line?)\n--- QEMU log ({log}) ---\n{log_tail(log)}"
                )
            time.sleep(_POLL_S)

    def cmd(self, name: str, **arguments: Any) -> Any:
        """Run one QMP command; its ``return`` value (Rule 1)."""
        try:
            return self.monitor.cmd(name, **arguments)
        except ExecuteError as exc:
            raise QmpCommandError(name, exc.error_class, exc.error.error.desc) from None
        except (QMPError, EOFError, OSError) as exc:
            raise QmpConnectionError(f"QMP connection failed during {name}: {exc!r}") from None

    def hmp(self, line: str) -> str:
        """One HMP command (``human-monitor-command``); its output."""
        out = self.cmd("human-monitor-command", **{"command-line": line})
        if not isinstance(out, str):
            raise QmpConnectionError(f"HMP {line!r} answered {out!r}, expected text")
        return out

    @property
    def events(self) -> list[dict[str, Any]]:
        """The events QEMU sent so far (taken from the client, not interpreted)."""
        return [dict(event) for event in self.monitor.get_events()]

    def close(self) -> None:
        """Close the connection (Rule 2)."""
        with contextlib.suppress(QMPError, OSError, EOFError):
            self.monitor.close()
