"""The source's pre-copy convergence policy: when to switch over.

QEMU's migration thread estimates the bandwidth over windows of
``BUFFER_DELAY`` (100 ms), and switches over once the pending bytes could be
sent within the downtime limit at that bandwidth. This is that decision as
pure state: the engine passes in the time and byte counts after each
iteration, and asks. The policy never reads a clock.

Rule 1: the bandwidth is the bytes sent over the last full window; before the
        first window ends it is 0 (unknown), and nothing converges.
Rule 2: the cheap estimate (pre-copy info) only decides whether to ask the
        devices for their exact stop-copy sizes (it is at or below the
        threshold, or the bandwidth is still unknown); only the exact sizes
        can make pre-copy converge.
Rule 3: nothing switches over before the destination acked (switchover-ack);
        once it has, the iteration bound or the time bound forces a switchover
        even when pre-copy has not converged.
Rule 4: an idle iteration (it sent nothing, and no pre-copy device has
        initial or dirty bytes left) cannot bring the pending bytes down:
        what remains is stop-copy data only, so once acked the source switches
        over. (Without this, a stop-copy-only device next to a finished
        pre-copy device kept the source iterating until the time bound, since
        an idle window measures no bandwidth: found by the soak.)
"""

from __future__ import annotations

import enum

import attrs

#: How long one bandwidth sample lasts (QEMU's BUFFER_DELAY is 100 ms).
BANDWIDTH_WINDOW_S = 0.1


class Decision(enum.Enum):
    """What the source does after a pre-copy iteration."""

    CONTINUE = "continue"
    CONVERGED = "converged"
    FORCED = "forced"


@attrs.define(kw_only=True)
class Convergence:
    """Pre-copy convergence state of one migration (see the module docstring)."""

    downtime_limit_ms: int
    max_iterations: int
    time_limit_s: float
    start: float
    window_start: float = attrs.field(default=attrs.Factory(lambda s: s.start, takes_self=True))
    window_bytes: int = 0
    #: Bytes per second over the last full window; 0 until one ended.
    bandwidth: float = 0.0

    def observe(self, now: float, transferred_bytes: int) -> float:
        """Account the bytes sent so far at ``now``; returns the bandwidth estimate."""
        elapsed = now - self.window_start
        if elapsed >= BANDWIDTH_WINDOW_S:
            self.bandwidth = (transferred_bytes - self.window_bytes) / elapsed
            self.window_start, self.window_bytes = now, transferred_bytes
        return self.bandwidth

    @property
    def threshold(self) -> float:
        """Bytes that can go within the downtime limit at the current bandwidth."""
        return self.bandwidth * self.downtime_limit_ms / 1000.0

    def wants_exact_size(self, pending_estimate: int) -> bool:
        """Whether to ask the devices for their exact stop-copy sizes now (Rule 2)."""
        return pending_estimate <= self.threshold or not self.bandwidth

    def decide(
        self,
        *,
        now: float,
        iterations: int,
        pending: int,
        exact: bool,
        acked: bool,
        idle: bool = False,
    ) -> Decision:
        """Switch over now? ``exact`` says ``pending`` is the devices' stop-copy size;
        ``idle`` that the iteration sent nothing and pre-copy has nothing left (Rule 4)."""
        if exact and acked and self.bandwidth and pending <= self.threshold:
            return Decision.CONVERGED
        if idle and acked:
            return Decision.CONVERGED
        bounded = iterations >= self.max_iterations or now - self.start >= self.time_limit_s
        if bounded and acked:
            return Decision.FORCED
        return Decision.CONTINUE
