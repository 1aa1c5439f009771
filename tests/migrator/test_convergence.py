"""Tests of the source's pure pre-copy convergence policy (times and sizes are arguments)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from migrator._protocol.convergence import BANDWIDTH_WINDOW_S, Convergence, Decision


def policy(**kw: float) -> Convergence:
    args: dict[str, float] = {
        "downtime_limit_ms": 300,
        "max_iterations": 100,
        "time_limit_s": 60.0,
        "start": 10.0,
    }
    args.update(kw)
    return Convergence(
        downtime_limit_ms=int(args["downtime_limit_ms"]),
        max_iterations=int(args["max_iterations"]),
        time_limit_s=args["time_limit_s"],
        start=args["start"],
    )


def test_convergence_bandwidth_is_unknown_until_a_window_ended() -> None:
    p = policy(start=0.0)
    assert p.observe(0.05, 1_000_000) == 0.0
    assert p.threshold == 0.0
    assert p.wants_exact_size(1 << 40)  # unknown bandwidth: ask the devices
    assert p.observe(BANDWIDTH_WINDOW_S, 2_000_000) == 2_000_000 / BANDWIDTH_WINDOW_S
    # The next window starts where that one ended; the estimate holds till it ends.
    assert p.observe(0.15, 9_000_000) == 2_000_000 / BANDWIDTH_WINDOW_S
    assert p.observe(0.25, 3_000_000) == (3_000_000 - 2_000_000) / (0.25 - BANDWIDTH_WINDOW_S)


def test_convergence_threshold_is_bandwidth_times_downtime() -> None:
    p = policy(downtime_limit_ms=500)
    p.observe(11.0, 100_000_000)  # 100 MB/s
    assert p.threshold == 50_000_000
    assert p.wants_exact_size(50_000_000)
    assert not p.wants_exact_size(50_000_001)


def test_convergence_converges_on_exact_sizes_only() -> None:
    p = policy()
    p.observe(11.0, 1_000_000)
    small = int(p.threshold)
    assert p.decide(now=11, iterations=1, pending=small, exact=True, acked=True) is (
        Decision.CONVERGED
    )
    assert p.decide(now=11, iterations=1, pending=small, exact=False, acked=True) is (
        Decision.CONTINUE
    )
    assert p.decide(now=11, iterations=1, pending=small + 1, exact=True, acked=True) is (
        Decision.CONTINUE
    )


def test_convergence_needs_the_ack() -> None:
    p = policy()
    p.observe(11.0, 1_000_000)
    assert p.decide(now=11, iterations=1, pending=0, exact=True, acked=False) is Decision.CONTINUE
    assert p.decide(now=99, iterations=999, pending=0, exact=True, acked=False) is (
        Decision.CONTINUE
    )


def test_convergence_never_with_zero_bandwidth() -> None:
    p = policy()
    assert p.decide(now=10, iterations=1, pending=0, exact=True, acked=True) is Decision.CONTINUE


def test_convergence_bounds_force_the_switchover() -> None:
    p = policy(max_iterations=5, time_limit_s=2.0)
    assert p.decide(now=11, iterations=4, pending=1 << 40, exact=True, acked=True) is (
        Decision.CONTINUE
    )
    assert p.decide(now=11, iterations=5, pending=1 << 40, exact=True, acked=True) is (
        Decision.FORCED
    )
    assert p.decide(now=12, iterations=1, pending=1 << 40, exact=False, acked=True) is (
        Decision.FORCED
    )


@given(
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 1 << 30)), max_size=30),
    st.integers(0, 1 << 40),
    st.booleans(),
    st.integers(1, 10**6),
)
def test_convergence_never_switches_over_unacked(
    steps: list[tuple[float, int]], pending: int, exact: bool, iterations: int
) -> None:
    p = policy()
    now, sent = 10.0, 0
    for dt, more in steps:
        now += dt
        sent += more
        assert p.observe(now, sent) >= 0
        decision = p.decide(
            now=now, iterations=iterations, pending=pending, exact=exact, acked=False
        )
        assert decision is Decision.CONTINUE
        acked = p.decide(now=now, iterations=iterations, pending=pending, exact=exact, acked=True)
        if acked is Decision.CONVERGED:
            assert exact
            assert pending <= p.threshold
            assert p.bandwidth > 0


def test_convergence_an_idle_iteration_switches_over_once_acked() -> None:
    """Rule 4: nothing left for pre-copy and nothing sent: waiting cannot help."""
    p = policy(start=0.0)
    p.observe(1.0, 0)  # an idle window: no bandwidth measured

    def decide(acked: bool, idle: bool) -> Decision:
        return p.decide(now=1.0, iterations=3, pending=4 << 20, exact=True, acked=acked, idle=idle)

    assert decide(acked=True, idle=False) is Decision.CONTINUE
    assert decide(acked=False, idle=True) is Decision.CONTINUE
    assert decide(acked=True, idle=True) is Decision.CONVERGED
