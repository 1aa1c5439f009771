"""Progress of a long migration on the terminal, drawn by rich (both sides, all four verbs).

What one line shows: the phase (``setup``, ``pre-copy``, ``stop-copy``, ``load``, ...), the
bytes moved and, where the total is known, the percent of it, the rate, the ETA, and the
pre-copy iterations so far.

Rule 1: only on a terminal. When stderr is not a TTY nothing at all is written, so
        scripts and logs that read stderr see exactly what they saw before.
Rule 2: the figures are sampled from the engine's :class:`~migrator.stats.Stats`, five
        times a second; the engine computes nothing for display. The source hands its
        phase and stats in through ``update`` (the :class:`~migrator.stats.Progress`
        interface it already calls); a destination is :meth:`TerminalProgress.watch`-ed.
Rule 3: the known total is what the source knows: bytes sent plus the bytes its devices
        still report pending (pre-copy info and the stop-copy size), so it grows when a
        device dirties its state and percent and ETA follow. A destination does not know
        the total in advance: it shows bytes and rate, no percent or ETA.
Rule 4: rich draws and erases the line (no escape codes are written here); the last
        frame stays on screen when the migration ends, at 100% once it completed.
Rule 5: the rate and the ETA are computed here over a sliding window of samples
        (:class:`RateWindow`, pure), not by rich: rich forgets its speed samples whenever
        the total changes, and the source's total changes with every pre-copy iteration.
"""

from __future__ import annotations

import collections
import sys
from typing import Protocol, TextIO

import attrs
import trio
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, TaskID, TaskProgressColumn, TextColumn
from rich.progress import Progress as RichProgress

from migrator.stats import Progress, Stats

#: Seconds between two samples of the engine's figures (Rule 2).
SAMPLE_INTERVAL_S = 0.2
#: The rate is the bytes moved over about the last this many seconds (Rule 5).
RATE_WINDOW_S = 3.0


@attrs.define
class RateWindow:
    """Bytes per second over about the last ``window_s`` seconds of samples (Rule 5)."""

    window_s: float = RATE_WINDOW_S
    _samples: collections.deque[tuple[float, int]] = attrs.field(
        factory=collections.deque, init=False
    )

    def add(self, now: float, value: int) -> None:
        """Record the byte count ``value`` at time ``now`` (seconds, a monotonic clock)."""
        self._samples.append((now, value))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Bytes per second, or None before two samples a moment apart."""
        if len(self._samples) < 2:
            return None
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None

    def last_time(self) -> float:
        return self._samples[-1][0] if self._samples else 0.0


def eta_text(remaining: int | None, rate: float | None) -> str:
    """``ETA m:ss`` (``h:mm:ss``) for ``remaining`` bytes at ``rate``; ``ETA -:--`` if unknown."""
    if remaining is None or rate is None or rate <= 0:
        return "ETA -:--"
    seconds = round(remaining / rate)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"ETA {hours}:{minutes:02d}:{secs:02d}" if hours else f"ETA {minutes}:{secs:02d}"


def rate_text(rate: float | None) -> str:
    """The rate in MiB/s (binary units, as the byte counts are)."""
    return "? MiB/s" if rate is None else f"{rate / 2**20:.1f} MiB/s"


class _Watched(Protocol):
    phase: str
    stats: Stats


class TerminalProgress(Progress):
    """The progress line of one migration (Rules 1-5); a no-op when not on a terminal."""

    def __init__(self, role: str, *, file: TextIO | None = None) -> None:
        stream = file if file is not None else sys.stderr
        super().__init__(enabled=stream.isatty())
        self.role = role
        self._phase = "setup"
        self._stats: Stats | None = None
        self._watched: _Watched | None = None
        self._rate = RateWindow()
        self._view: RichProgress | None = None
        self._task: TaskID | None = None
        if self.enabled:
            self._view = RichProgress(
                TextColumn("{task.description}"),
                TextColumn("[bold]{task.fields[phase]:>10}"),
                BarColumn(bar_width=24),
                TaskProgressColumn(),
                DownloadColumn(binary_units=True),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[eta]}"),
                TextColumn("{task.fields[iterations]}"),
                console=Console(file=stream),
                refresh_per_second=5,
                transient=False,
            )
            self._task = self._view.add_task(
                role, total=None, phase="setup", rate="", eta="", iterations=""
            )

    # -- the engine's side ----------------------------------------------------------------
    def update(self, phase: str, stats: Stats, bandwidth: float) -> None:
        """The source's report (the :class:`Progress` interface): remember it (Rule 2)."""
        self._phase, self._stats = phase, stats

    def watch(self, role: _Watched) -> None:
        """Sample ``role``'s ``phase`` and ``stats`` (a destination, which reports nothing)."""
        self._watched = role

    # -- drawing --------------------------------------------------------------------------
    def sample(self, now: float) -> None:
        """Push the figures at time ``now`` into the line (Rules 2, 3 and 5)."""
        if self._view is None or self._task is None:
            return
        if self._watched is not None:
            self._phase, self._stats = self._watched.phase, self._watched.stats
        stats = self._stats
        if stats is None:
            self._view.update(self._task, phase=self._phase)
            return
        done = stats.transferred_bytes
        self._rate.add(now, done)
        rate = self._rate.rate()
        total: int | None = None
        if stats.status == "completed":
            total = done
            self._phase = "completed"
        elif self._watched is None:
            total = done + stats.pending_bytes
        iterations = stats.precopy_iterations
        self._view.update(
            self._task,
            completed=done,
            total=total,
            phase=self._phase,
            rate=rate_text(rate),
            eta=eta_text(None if total is None else total - done, rate),
            iterations=f"iter {iterations}" if iterations else "",
        )

    async def run(self) -> None:
        """Draw until cancelled (the CLI runs it beside the migration)."""
        if self._view is None:
            return
        self._view.start()
        while True:
            self.sample(trio.current_time())
            await trio.sleep(SAMPLE_INTERVAL_S)

    def done(self) -> None:
        """The final frame, left on screen (Rule 4); the terminal gets its cursor back."""
        if self._view is None:
            return
        try:
            now = trio.current_time()
        except RuntimeError:  # outside trio.run: a moment after the last sample
            now = self._rate.last_time() + SAMPLE_INTERVAL_S
        self.sample(now)
        self._view.refresh()
        self._view.stop()
        self._view = None


__all__ = [
    "RATE_WINDOW_S",
    "SAMPLE_INTERVAL_S",
    "RateWindow",
    "TerminalProgress",
    "eta_text",
    "rate_text",
]
