"""Exceptions of the migrator package.

Each error renders as one line that says what failed and where; the CLI prints
exactly that line. ``phase`` and ``device`` are filled in by the engine when it
knows them.
"""

from __future__ import annotations

import errno as _errno


class MigrationError(Exception):
    """Root of every migrator error."""

    def __init__(self, message: str, *, phase: str = "", device: str = "") -> None:
        self.message = message
        self.phase = phase
        self.device = device
        super().__init__(message)

    def with_context(self, *, phase: str = "", device: str = "") -> MigrationError:
        """Fill in phase/device if not set yet; returns self."""
        if phase and not self.phase:
            self.phase = phase
        if device and not self.device:
            self.device = device
        return self

    def __str__(self) -> str:
        parts = []
        if self.phase:
            parts.append(f"{self.phase}")
        if self.device:
            parts.append(f"device {self.device}")
        prefix = ", ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class DeviceOpError(MigrationError):
    """A device operation (ioctl or fakevfio file access) failed."""

    def __init__(self, device: str, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        name = _errno.errorcode.get(err, str(err))
        text = f"{op} failed: {name}"
        if detail:
            text += f" ({detail})"
        super().__init__(text, device=device)


class NoDataNow(MigrationError):
    """ENOMSG from a pre-copy read: nothing to send for now (not an error)."""

    def __init__(self, device: str) -> None:
        super().__init__("no pre-copy data for now", device=device)


class LocalProtocolError(MigrationError):
    """We tried to do something the protocol does not allow."""


class RemoteProtocolError(MigrationError):
    """The peer sent something the protocol does not allow."""


class PeerClosedError(RemoteProtocolError):
    """The peer closed the connection where the protocol wanted more (e.g. no SHUT yet):
    a refusal or a failure on its side, whose reason is in its own log."""


class FramingError(RemoteProtocolError):
    """Bytes on a channel do not parse."""


class ReassemblyError(RemoteProtocolError):
    """Multifd packets of a device do not reassemble (duplicate, invalid idx, bound)."""


class ChannelBrokenError(MigrationError):
    """A connection closed or failed mid-migration."""


class ConfigurationError(MigrationError):
    """Bad command-line input or mismatched devices."""
