"""``fakevfio.testing`` beyond mounts: the conformance kit, LocalDevice, peak RSS, migrator runs.

The kit is checked both ways: the project's own drivers pass it, and a toy
driver with one deliberate bug per case breaks exactly the rule it should.
"""

from __future__ import annotations

import errno
import hashlib
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from fakevfio import State
from fakevfio._ram import RamDriver
from fakevfio.driver import ArcDriver, LoadStream, PrecopyInfo, SaveStream
from fakevfio.errors import DeviceError
from fakevfio.testing import (
    ARC_DRIVER_RULES,
    STATE_DRIVER_RULES,
    DriverRuleError,
    HarnessError,
    LocalDevice,
    MigrationFailed,
    PeakRss,
    check_arc_driver,
    check_state_driver,
    migrate_devices,
)
from fakevfio.testing._rss import wait_rusage
from vfio_uapi.fsm import MigFlags

RAM = {"size": "64K", "flags": "STOP_COPY+P2P+PRE_COPY"}


def test_ram_driver_passes_the_state_driver_rules() -> None:
    check_state_driver(
        lambda name: RamDriver(name, {**RAM, "seed": "1", "dirty_rate": "64K"}),
        dest_factory=lambda name: RamDriver(name, RAM),
    )


class _Toy(ArcDriver):
    """A 64-byte state with its own streams; ``bug`` breaks one rule on purpose."""

    migration_flags = MigFlags.STOP_COPY | MigFlags.PRE_COPY
    bug = ""

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        super().__init__(name, options)
        self.mem = bytearray(range(64)) if name == "src" else bytearray(64)

    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        if (current, nxt) in {(State.RUNNING, State.PRE_COPY), (State.STOP, State.STOP_COPY)}:
            return _ToySave(self)
        if (current, nxt) == (State.STOP, State.RESUMING):
            return _ToyLoad(self)
        if (current, nxt) == (State.RESUMING, State.STOP):
            assert isinstance(stream, _ToyLoad)
            if len(stream.got) != len(self.mem) and self.bug != "accepts short streams":
                raise DeviceError(errno.EINVAL, "short stream", device=self.name)
            self.mem[: len(stream.got)] = stream.got
            if self.bug == "loses a byte":
                self.mem[-1] ^= 1
        return None

    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        return len(self.mem)

    def digest(self) -> str:
        return "not hex" if self.bug == "bad digest" else hashlib.sha256(self.mem).hexdigest()


class _ToySave(SaveStream):
    def __init__(self, driver: _Toy) -> None:
        self.driver = driver
        self.pos = 0

    def read(self, size: int, state: State) -> bytes:
        data = bytes(self.driver.mem[self.pos : self.pos + size])
        self.pos += len(data)
        if not data and state is State.PRE_COPY and self.driver.bug != "b'' in pre-copy":
            raise DeviceError(errno.ENOMSG, "temporary end", device=self.driver.name)
        if not data and self.driver.bug == "restarts after the end":
            self.pos = 0
        return data

    def precopy_info(self) -> PrecopyInfo:
        return PrecopyInfo(initial_bytes=len(self.driver.mem) - self.pos, dirty_bytes=0)

    def remaining(self) -> int:
        return len(self.driver.mem) - self.pos


class _ToyLoad(LoadStream):
    def __init__(self, driver: _Toy) -> None:
        self.got = bytearray()

    def write(self, data: memoryview) -> None:
        self.got += data


def _toy(bug: str) -> Callable[[str], _Toy]:
    def factory(name: str) -> _Toy:
        driver = _Toy(name, {})
        driver.bug = bug
        return driver

    return factory


def test_the_toy_driver_without_a_bug_passes() -> None:
    check_arc_driver(_toy(""))


@pytest.mark.parametrize(
    ("bug", "rule"),
    [
        ("bad digest", "description"),
        ("loses a byte", "round trip"),
        ("restarts after the end", "end of stream is final"),
        ("accepts short streams", "incomplete stream"),
        ("b'' in pre-copy", "pre-copy"),
    ],
)
def test_the_kit_names_the_broken_rule(bug: str, rule: str) -> None:
    with pytest.raises(DriverRuleError) as info:
        check_arc_driver(_toy(bug))
    assert isinstance(info.value, AssertionError)  # pytest reports a failure, not an error
    assert info.value.rule == rule, info.value
    assert rule in str(info.value)
    assert rule in ARC_DRIVER_RULES


class _ForgetsDirty(RamDriver):
    def mark_dirty(self, offset: int, length: int) -> None:
        pass


def test_the_kit_catches_a_workload_that_does_not_mark_dirty() -> None:
    def factory(name: str) -> RamDriver:
        return _ForgetsDirty(name, {**RAM, "dirty_rate": "64K"})

    with pytest.raises(DriverRuleError, match="digests differ") as info:
        check_state_driver(factory)
    assert info.value.rule == "pre-copy"  # the stream misses what the workload changed
    with pytest.raises(DriverRuleError, match="mark_dirty missing") as info:
        STATE_DRIVER_RULES["dirty tracking"](factory, factory)


def test_check_state_driver_refuses_an_arc_driver() -> None:
    with pytest.raises(AssertionError, match="no StateDriver"):
        check_state_driver(_toy(""))


def test_local_device_data_handle_outlives_its_session() -> None:
    dev = LocalDevice(RamDriver("d", {"size": "8K", "flags": "STOP_COPY"}))
    with pytest.raises(DeviceError) as exc:
        dev.read(1)
    assert exc.value.errno == errno.ENODEV  # no session was ever opened
    assert dev.set_state("STOP_COPY")
    assert not dev.set_state(State.STOP_COPY)  # the current state: nothing happens
    assert dev.read(10)
    dev.set_state(State.STOP)
    assert not dev.session_alive()
    with pytest.raises(DeviceError) as exc:
        dev.read(1)
    assert exc.value.errno == errno.ENODEV
    assert dev.log() == ["RUNNING STOP", "STOP STOP_COPY", "STOP_COPY STOP"]


def test_peak_rss_and_wait_rusage_see_a_child_allocate() -> None:
    code = "import sys; x = bytearray(96 << 20); x[::4096] = b'x' * (24 << 10); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    peak = PeakRss(proc.pid)
    with pytest.raises(subprocess.TimeoutExpired):
        wait_rusage(proc, 0.5)
    assert proc.stdin is not None
    proc.stdin.close()
    returncode, maxrss_kib = wait_rusage(proc, 30)
    assert returncode == 0
    assert maxrss_kib > 96 << 10
    assert peak.join() > 64 << 10  # sampled: may miss the last milliseconds


def test_a_migration_that_cannot_start_is_a_harness_error(tmp_path: Path) -> None:
    missing = [tmp_path / "no-such-device"]
    result = migrate_devices(missing, missing, check=False, timeout=30)
    assert not result.ok
    assert result.source_stderr == "source not started"
    assert result.dest_returncode != 0
    assert result.dest_stderr
    with pytest.raises(MigrationFailed) as info:
        migrate_devices(missing, missing, timeout=30)
    assert isinstance(info.value, HarnessError)
    assert info.value.result.dest_returncode != 0
