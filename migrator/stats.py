"""Migration statistics (``--json``) and the terminal progress line."""

from __future__ import annotations

import sys
from typing import Any

import attrs


@attrs.define
class DeviceCounters:
    precopy_bytes: int = 0
    stopcopy_bytes: int = 0
    config_bytes: int = 0

    def total(self) -> int:
        return self.precopy_bytes + self.stopcopy_bytes + self.config_bytes


@attrs.define
class Stats:
    """Figures of one migration; times are trio clock seconds, reported in ms."""

    status: str = "active"
    t_start: float = 0.0
    t_end: float = 0.0
    t_stop: float | None = None
    t_resumed: float | None = None
    setup_time_ms: float = 0.0
    transferred_bytes: int = 0
    precopy_iterations: int = 0
    pending_bytes: int = 0
    forced_switchover: bool = False
    devices: dict[str, DeviceCounters] = attrs.field(factory=dict)
    error: str | None = None

    def start(self, now: float) -> None:
        self.t_start = now

    def finish(self, now: float, status: str) -> None:
        self.t_end = now
        self.status = status

    def mark_stop(self, now: float) -> None:
        self.t_stop = now

    def mark_resumed(self, now: float) -> None:
        self.t_resumed = now

    def device(self, idstr: str) -> DeviceCounters:
        return self.devices.setdefault(idstr, DeviceCounters())

    @property
    def downtime_ms(self) -> float:
        if self.t_stop is None:
            return 0.0
        end = self.t_resumed if self.t_resumed is not None else self.t_end
        return max(0.0, (end - self.t_stop) * 1000)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "total_time_ms": round((self.t_end - self.t_start) * 1000, 3),
            "downtime_ms": round(self.downtime_ms, 3),
            "setup_time_ms": round(self.setup_time_ms, 3),
            "transferred_bytes": self.transferred_bytes,
            "precopy_iterations": self.precopy_iterations,
            "forced_switchover": self.forced_switchover,
            "devices": {
                name: {
                    "precopy_bytes": c.precopy_bytes,
                    "stopcopy_bytes": c.stopcopy_bytes,
                    "config_bytes": c.config_bytes,
                    "total_bytes": c.total(),
                }
                for name, c in self.devices.items()
            },
            **({"error": self.error} if self.error else {}),
        }


class Progress:
    """One self-overwriting stderr line (phase, bytes, rate, pending) on a terminal."""

    def __init__(self, *, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._last = 0.0

    def update(self, phase: str, stats: Stats, bandwidth: float) -> None:
        if not self.enabled:
            return
        import time

        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        sys.stderr.write(
            f"\r{phase:>10}  sent {stats.transferred_bytes / 2**20:10.1f} MiB"
            f"  {bandwidth / 2**20:8.1f} MiB/s  pending {stats.pending_bytes / 2**20:8.1f} MiB"
            f"  iter {stats.precopy_iterations}\x1b[K"
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
