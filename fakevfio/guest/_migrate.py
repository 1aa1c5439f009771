"""Live-migrate a booted guest to a destination started with ``incoming=True``.

Theory of operation: :func:`migrate` sets the same capabilities on both QEMUs
(``multifd``, ``return-path``, ``switchover-ack``) and parameters (multifd
channels; on the source bandwidth and downtime limit), starts
``migrate-incoming`` on the destination and ``migrate`` on the source, polls
``query-migrate`` on both until they end, and returns the source's statistics
as a :class:`MigrationStats`. The destination was started without ``-S``, so it
runs on by itself once the migration completes.

Rule 1: ``uri="tcp"`` picks a free port on 127.0.0.1, ``uri="unix"`` a socket
beside the destination's QMP socket; any other value is passed to QEMU unchanged
(``tcp:HOST:PORT``, ``unix:PATH``).
Rule 2: ``switchover-ack`` needs ``return-path`` (QEMU refuses it otherwise): asking
for it without is a ValueError before anything is sent.
Rule 3: a migration that fails, is cancelled or times out raises
:class:`MigrationError` with QEMU's ``error-desc`` and both guests' tails.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import attrs

from fakevfio.guest._qemu import Guest, GuestError

_POLL_S = 0.1
_ENDED = ("completed", "failed", "cancelled")


class MigrationError(GuestError):
    """A guest migration did not complete (the message has QEMU's reason and the tails)."""


@attrs.frozen(kw_only=True)
class MigrationStats:
    """The source's ``query-migrate`` at the end (times in ms, sizes in bytes)."""

    status: str
    total_time_ms: int
    downtime_ms: int
    setup_time_ms: int
    transferred: int  # RAM bytes sent
    vfio_transferred: int  # device-state bytes sent (0 without vfio devices)
    raw: dict[str, Any]

    @classmethod
    def from_query(cls, info: dict[str, Any]) -> MigrationStats:
        return cls(
            status=str(info.get("status")),
            total_time_ms=int(info.get("total-time", 0)),
            downtime_ms=int(info.get("downtime", 0)),
            setup_time_ms=int(info.get("setup-time", 0)),
            transferred=int(info.get("ram", {}).get("transferred", 0)),
            vfio_transferred=int(info.get("vfio", {}).get("transferred", 0)),
            raw=info,
        )


def _uri(uri: str, destination: Guest) -> str:
    if uri == "tcp":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return f"tcp:127.0.0.1:{probe.getsockname()[1]}"
    if uri == "unix":
        path = destination.sockets / "migrate"
        path.unlink(missing_ok=True)
        return f"unix:{path}"
    return uri


def _wait(guest: Guest, deadline: float, timeout: float) -> dict[str, Any]:
    while True:
        info: dict[str, Any] = guest.cmd("query-migrate")
        if info.get("status") in _ENDED:
            return info
        if time.monotonic() > deadline:
            raise MigrationError(
                f"guest {guest.name}: migration still {info.get('status')!r} after "
                f"{timeout:g} s: {info}\n{guest.tails()}"
            )
        time.sleep(_POLL_S)


def migrate(
    source: Guest,
    destination: Guest,
    *,
    uri: str = "tcp",
    multifd: bool = False,
    multifd_channels: int = 2,
    return_path: bool = True,
    switchover_ack: bool = True,
    max_bandwidth: int = 8 << 30,
    downtime_limit_ms: int = 1000,
    timeout: float = 120.0,
) -> MigrationStats:
    """Migrate ``source`` into ``destination`` (booted with ``incoming=True``).

    Returns the source's final ``query-migrate`` (:class:`MigrationStats`);
    afterwards the source is ``postmigrate`` and the destination ``running``.
    """
    if switchover_ack and not return_path:
        raise ValueError("switchover_ack=True needs return_path=True (QEMU's rule)")
    caps = {"multifd": multifd, "return-path": return_path, "switchover-ack": switchover_ack}
    capabilities = [{"capability": name, "state": on} for name, on in caps.items()]
    for guest in (source, destination):
        guest.cmd("migrate-set-capabilities", capabilities=capabilities)
        if multifd:
            guest.cmd("migrate-set-parameters", **{"multifd-channels": multifd_channels})
    source.cmd(
        "migrate-set-parameters",
        **{"max-bandwidth": max_bandwidth, "downtime-limit": downtime_limit_ms},
    )
    address = _uri(uri, destination)
    destination.cmd("migrate-incoming", uri=address)
    source.cmd("migrate", uri=address)
    deadline = time.monotonic() + timeout
    info = _wait(source, deadline, timeout)
    if info.get("status") != "completed":
        raise MigrationError(
            f"migration {source.name} -> {destination.name} over {address} ended "
            f"{info.get('status')!r}: {info.get('error-desc', info)}\n"
            f"source:\n{source.tails()}\ndestination:\n{destination.tails()}"
        )
    incoming = _wait(destination, deadline, timeout)
    if incoming.get("status") != "completed":
        raise MigrationError(
            f"the destination {destination.name} ended {incoming.get('status')!r}: "
            f"{incoming.get('error-desc', incoming)}\n{destination.tails()}"
        )
    destination.wait_status("running", timeout=max(1.0, deadline - time.monotonic()))
    return MigrationStats.from_query(info)


__all__ = ["MigrationError", "MigrationStats", "migrate"]
