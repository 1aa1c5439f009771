"""Emulated device speed is a pace: ``read_bandwidth``/``write_bandwidth`` through a mount.

The model is ``bytes / bandwidth``; each figure is compared with it in the same
run, within 5%. The rules of :class:`fakevfio._device.Bandwidth` are checked
where they can fail deterministically (the schedule across a short gap; the
adapter waiting for the deadline with 40% of the pace spent on processing), and
a real mount shows three devices, reading and writing in parallel, each at its
own pace (1 MiB requests, as the migrator makes; little CPU, so a loaded
machine keeps up).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import trio

from fakevfio._device import PACE_SLACK_S, Bandwidth
from fakevfio._fuse import VfioFs
from fakevfio._options import DeviceSpec
from fakevfio._ram import RamDriver
from fakevfio._registry import Registry
from fakevfio._tree import ROOT_INODE, Tree
from fakevfio.driver import SaveStream
from fakevfio.testing import Mount, mount, read_file
from vfio_uapi.fsm import State

MiB = 1 << 20
REQUEST = MiB
TOLERANCE = 0.05


def test_bandwidth_keeps_the_schedule_across_short_gaps_and_restarts_after_idleness() -> None:
    bw = Bandwidth(1000)
    assert bw.delay(500, 10.0) == pytest.approx(0.5)  # due at 10.5
    # The next request arrives a round trip after the deadline: still due at 10.5 + 0.5.
    late = PACE_SLACK_S / 2
    assert bw.delay(500, 10.5 + late) == pytest.approx(0.5 - late)
    # Idle for longer than the slack: a new schedule from the arrival, no burst credit.
    assert bw.delay(500, 20.0) == pytest.approx(0.5)
    # Processing that outlasts the pace never yields a negative wait.
    assert bw.delay(0, 30.0) == 0.0


def test_the_adapter_counts_the_processing_time_inside_the_pace() -> None:
    """Each request costs 50 ms of work out of its 125 ms pace: the pace alone is the figure."""
    rate, request, work_s, requests = 4 * MiB, 512 * 1024, 0.05, 4
    registry = Registry({"ram": RamDriver})
    device = registry.create(
        DeviceSpec.from_cli(f"p=ram:size=4M,seed=1,read_bandwidth={rate // MiB}M")
    )
    device.set_state(State.STOP_COPY)
    assert device.session is not None
    stream = device.session.stream
    assert isinstance(stream, SaveStream)
    original = stream.read

    def slow_read(size: int, state: State) -> bytes | bytearray | memoryview:
        time.sleep(work_s)  # the driver's processing cost, in the worker thread
        return original(size, state)

    stream.read = slow_read  # type: ignore[method-assign]
    tree = Tree(registry)
    ino = ROOT_INODE
    for name in ("devices", "p", "migration", "data"):
        ino = tree.lookup(ino, name).ino
    fs = VfioFs(tree)
    fs._handles[1] = tree.open(ino, os.O_RDONLY)
    got: list[float] = []

    async def run() -> None:
        total = 0
        t0 = trio.current_time()
        for _ in range(requests):
            total += len(await fs.read(1, 0, request))
        got.extend((trio.current_time() - t0, total / rate))

    trio.run(run)
    seconds, model = got
    work = requests * work_s
    # The old behaviour (the delay after the work) is model + work; a pace is the model.
    # Halfway between the two is the line, so a loaded machine's jitter cannot decide it.
    assert model * (1 - TOLERANCE) <= seconds < model + work / 2, (
        f"{seconds * 1000:.0f} ms for {requests} paced reads, model {model * 1000:.0f} ms "
        f"(their {work * 1000:.0f} ms of work must be inside it, not added)"
    )


def _timed_read(path: Path, out: dict[str, tuple[int, float]], key: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        total = 0
        t0 = time.perf_counter()
        while chunk := os.read(fd, REQUEST):
            total += len(chunk)
        out[key] = (total, time.perf_counter() - t0)
    finally:
        os.close(fd)


def _timed_write(path: Path, stream: bytes, out: dict[str, tuple[int, float]], key: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    view = memoryview(stream)
    try:
        t0 = time.perf_counter()
        for off in range(0, len(view), REQUEST):
            os.write(fd, view[off : off + REQUEST])
        out[key] = (len(view), time.perf_counter() - t0)
    finally:
        os.close(fd)


@pytest.mark.fuse
def test_three_devices_in_parallel_each_keep_their_own_pace(tmp_path: Path) -> None:
    rates = {"a": 32 * MiB, "b": 16 * MiB, "d": 24 * MiB}
    devices = [
        f"a=ram:size=32M,seed=1,read_bandwidth={rates['a'] // MiB}M",
        f"b=ram:size=16M,seed=2,read_bandwidth={rates['b'] // MiB}M",
        "e=ram:size=24M,seed=3",  # unpaced source of the stream d loads
        f"d=ram:size=24M,write_bandwidth={rates['d'] // MiB}M",
    ]
    attempts: list[str] = []
    with mount(devices, base_dir=tmp_path) as m:
        m.set_state("e", "STOP")
        reference = m.digest("e")
        m.set_state("e", "STOP_COPY")
        stream = read_file(m.device("e") / "migration" / "data")
        # A wall-clock figure: a second attempt absorbs one stall of a loaded machine.
        for _ in range(2):
            out = _paced_round(m, stream)
            assert m.digest("d") == reference
            report = {name: (sec, nbytes / rates[name]) for name, (nbytes, sec) in out.items()}
            assert set(report) == {"a", "b", "d"}
            late = [n for n, (sec, model) in report.items() if abs(sec / model - 1) > TOLERANCE]
            figures = [
                f"{n} {sec * 1000:.0f}/{mo * 1000:.0f} ms" for n, (sec, mo) in report.items()
            ]
            attempts.append(", ".join(figures))
            if not late:
                return
    raise AssertionError(
        f"not within {TOLERANCE:.0%} of bytes/bandwidth (measured/model): " + "; ".join(attempts)
    )


def _paced_round(m: Mount, stream: bytes) -> dict[str, tuple[int, float]]:
    """Save a and b and load d at once, each timed; every device back to RUNNING after."""
    for name in ("a", "b"):
        m.set_state(name, "STOP_COPY")
    m.set_state("d", "RESUMING")
    out: dict[str, tuple[int, float]] = {}
    threads = [
        threading.Thread(target=_timed_read, args=(m.device(n) / "migration" / "data", out, n))
        for n in ("a", "b")
    ]
    threads.append(
        threading.Thread(
            target=_timed_write, args=(m.device("d") / "migration" / "data", stream, out, "d")
        )
    )
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    m.set_state("d", "RUNNING")  # the paced load is complete and valid
    for name in ("a", "b"):
        m.set_state(name, "RUNNING")
    return out
