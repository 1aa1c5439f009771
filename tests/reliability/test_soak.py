"""The chaos soak's short version (``make soak`` runs the long one): no hang, no lost state.

A few seeded rounds of :mod:`benchmarks.soak` (random device mixes, transports,
channel counts and one random fault each: arc, read/write errors, delays,
corruption, SIGKILL of a migrator or a mount). Every round must end completed
with equal digests or failed-clean with the source's devices RUNNING and
intact, within the deadline.
"""

from __future__ import annotations

import pytest

from benchmarks.soak import soak

pytestmark = [pytest.mark.fuse, pytest.mark.slow, pytest.mark.deadline(180)]


def test_short_soak_loses_nothing_and_never_hangs() -> None:
    lines: list[str] = []
    tally = soak(rounds=10, time_limit_s=90, seed=20261202, out=lines)
    report = "\n".join(lines)
    assert tally.violations == [], report
    assert tally.outcomes["hang"] == 0, report
    assert tally.outcomes["lost-state"] == 0, report
    assert sum(tally.outcomes.values()) >= 5, report
    # Both kinds of outcome happened, so the checks of each ran.
    assert tally.outcomes["completed"] >= 1, report
    assert tally.outcomes["failed-clean"] >= 1, report
