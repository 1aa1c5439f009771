"""Device: the FSM driver loop, sessions, log, faults, bandwidth and bounds.

Every cell of the reference tables B (``tests/data/fsm_tables_b.md``) is run
through :meth:`Device.set_state` with a recording arc driver, and a
Hypothesis state machine checks random request sequences against the same
tables.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
from collections.abc import Mapping

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakevfio._device import LOG_LINES, Bandwidth, Device, Session
from fakevfio._faults import FaultRules
from fakevfio._ram import RamDriver
from fakevfio.driver import ArcDriver, LoadStream, PrecopyInfo, SaveStream
from fakevfio.errors import DeviceError, IllegalTransition
from tests.fsm_tables import Outcome, tables_b
from vfio_uapi import fsm
from vfio_uapi.fsm import MigFlags, State

# ---------------------------------------------------------------------------
# Tables B, parsed independently of vfio_uapi.fsm

NEW_FD_ARCS = {
    (State.RUNNING, State.PRE_COPY),
    (State.RUNNING_P2P, State.PRE_COPY_P2P),
    (State.STOP, State.STOP_COPY),
    (State.STOP, State.RESUMING),
}

END_ARCS = {
    (State.STOP_COPY, State.STOP),
    (State.PRE_COPY, State.RUNNING),
    (State.PRE_COPY_P2P, State.RUNNING_P2P),
    (State.RESUMING, State.STOP),
}
Arc = tuple[State, State]
Row = Outcome

#: flags -> (current, requested) -> outcome; the >=8 column is tested in test_fsm.
TABLES: dict[int, dict[tuple[State, State], Row]] = {
    flags: {(cur, State(new)): row for (cur, new), row in table.items() if new is not None}
    for flags, table in tables_b().items()
}


# ---------------------------------------------------------------------------
# A recording arc driver


class FakeSave(SaveStream):
    def __init__(self, data: bytes = b"") -> None:
        self.data = data
        self.pos = 0

    def read(self, size: int, state: State) -> bytes:
        chunk = self.data[self.pos : self.pos + size]
        self.pos += len(chunk)
        if not chunk and state in fsm.PRECOPY_STATES:
            raise DeviceError(errno.ENOMSG, "temporary end")
        return chunk

    def precopy_info(self) -> PrecopyInfo:
        return PrecopyInfo(initial_bytes=len(self.data) - self.pos, dirty_bytes=0)

    def remaining(self) -> int:
        return len(self.data) - self.pos


class FakeLoad(LoadStream):
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: memoryview) -> None:
        if bytes(data).startswith(b"BAD"):
            raise DeviceError(errno.EINVAL, "bad data")
        self.data += data


class RecordingDriver(ArcDriver):
    """Records every arc; fails, or fails into ERROR, on request."""

    def __init__(self, flags: int, *, payload: bytes = b"payload") -> None:
        super().__init__("rec", {})
        self._flags = MigFlags(flags)
        self.payload = payload
        self.arcs: list[Arc] = []
        self.fail: dict[Arc, int] = {}
        self.fail_to_error: set[Arc] = set()
        self.device: Device | None = None
        self.resets = 0
        self.ended = 0
        self.streams_seen: list[SaveStream | LoadStream | None] = []
        self.wrong_stream: Arc | None = None
        self.no_stream: Arc | None = None

    @property
    def migration_flags(self) -> MigFlags:
        return self._flags

    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        arc = (current, nxt)
        self.arcs.append(arc)
        self.streams_seen.append(stream)
        if arc in self.fail:
            if arc in self.fail_to_error:
                assert self.device is not None
                self.device.fail_to_error()
            raise DeviceError(self.fail[arc], f"arc {current.name} {nxt.name} failed")
        if arc == self.wrong_stream:
            return FakeSave()
        if arc in NEW_FD_ARCS and arc != self.no_stream:
            return FakeLoad() if nxt is State.RESUMING else FakeSave(self.payload)
        return None

    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        return stream.remaining() if isinstance(stream, SaveStream) else 1234

    def digest(self) -> str:
        return "0" * 64

    def reset(self) -> None:
        self.resets += 1

    def session_ended(self) -> None:
        self.ended += 1

    def regions(self) -> Mapping[str, int]:
        return {"bar0": 16}

    def region_read(self, region: str, offset: int, size: int) -> bytes:
        return bytes(range(offset, offset + size))

    def region_write(self, region: str, offset: int, data: memoryview) -> None:
        self.written = (offset, bytes(data))


def rec_device(flags: int = 7) -> tuple[Device, RecordingDriver]:
    driver = RecordingDriver(flags)
    device = Device("d0", "rec", driver, 0)
    driver.device = device
    return device, driver


def bring_to(device: Device, state: State) -> None:
    if state is State.ERROR:
        device.fail_to_error()
    else:
        device.set_state(state)
    assert device.state is state


def ram_device(name: str = "r0", **options: str) -> Device:
    opts = {"size": "16K", "seed": "3", "flags": "STOP_COPY+P2P+PRE_COPY"} | options
    return Device(name, "ram", RamDriver(name, opts), 0)


def state_of(device: Device) -> State:
    """The state, read through a call so mypy does not keep an earlier narrowing."""
    return device.state


def log_lines(device: Device) -> list[str]:
    return device.log_text().splitlines()


# ---------------------------------------------------------------------------
# Every cell of tables B

CELLS = [
    pytest.param(flags, cur, new, row, id=f"{flags:#x}-{cur.name}-{new.name}")
    for flags, table in sorted(TABLES.items())
    for (cur, new), row in table.items()
]


@pytest.mark.parametrize(("flags", "cur", "new", "row"), CELLS)
def test_device_set_state_matches_table_b(flags: int, cur: State, new: State, row: Row) -> None:
    device, driver = rec_device(flags)
    bring_to(device, cur)
    session_before = device.session
    driver.arcs.clear()
    log_before = log_lines(device)
    if row.einval:
        with pytest.raises(IllegalTransition) as info:
            device.set_state(new)
        assert info.value.errno == errno.EINVAL
        assert info.value.device == "d0"
        assert device.state is cur
        assert driver.arcs == []
        assert device.session is session_before
        assert log_lines(device) == [*log_before, f"REFUSED {cur.name} {new.name}"]
        return
    result = device.set_state(new)
    assert device.state is new
    assert driver.arcs == list(row.arcs)
    assert result.arcs == row.arcs
    assert (result.session is not None) == row.new_fd
    assert log_lines(device) == log_before + [f"{a.name} {b.name}" for a, b in row.arcs]
    if row.new_fd:
        assert device.session is result.session
        assert result.session is not None
        assert result.session.alive
        assert result.session.saving == (new is not State.RESUMING)
        if session_before is not None:
            assert not session_before.alive
    elif not row.arcs:
        assert device.session is session_before
    elif new in fsm.SAVING_STATES:
        # Moves inside the saving group keep the very same session and stream.
        assert session_before is not None
        assert device.session is session_before
        assert session_before.alive
    else:
        assert device.session is None
        if session_before is not None:
            assert not session_before.alive


def test_device_driver_sees_live_stream_on_each_arc() -> None:
    device, driver = rec_device(7)
    device.set_state(State.PRE_COPY)
    session = device.session
    assert session is not None
    driver.streams_seen.clear()
    device.set_state(State.STOP_COPY)
    assert driver.streams_seen == [session.stream, session.stream]
    device.set_state(State.STOP)
    assert driver.streams_seen[-1] is session.stream
    assert device.session is None


# ---------------------------------------------------------------------------
# Failures and ERROR


@pytest.mark.parametrize("flags", [1, 3, 5, 7])
def test_device_failed_arc_leaves_last_reached_state(flags: int) -> None:
    device, driver = rec_device(flags)
    arcs = fsm.path(State.RUNNING, State.STOP_COPY, flags)
    failing = arcs[-1]  # STOP -> STOP_COPY
    driver.fail[failing] = errno.EIO
    with pytest.raises(DeviceError) as info:
        device.set_state(State.STOP_COPY)
    assert info.value.errno == errno.EIO
    assert device.state is State.STOP
    assert device.session is None
    assert driver.arcs == arcs
    expected = [f"{a.name} {b.name}" for a, b in arcs[:-1]] + ["STOP STOP_COPY EIO"]
    assert log_lines(device) == expected


def test_device_failed_first_arc_changes_nothing() -> None:
    device, driver = rec_device(3)
    driver.fail[(State.RUNNING, State.RUNNING_P2P)] = errno.ENOSPC
    with pytest.raises(DeviceError) as info:
        device.set_state(State.STOP)
    assert info.value.errno == errno.ENOSPC
    assert device.state is State.RUNNING
    assert log_lines(device) == ["RUNNING RUNNING_P2P ENOSPC"]


def test_device_driver_moving_to_error_ends_session() -> None:
    device, driver = rec_device(7)
    device.set_state(State.PRE_COPY)
    session = device.session
    assert session is not None
    driver.fail[(State.PRE_COPY, State.PRE_COPY_P2P)] = errno.EIO
    driver.fail_to_error.add((State.PRE_COPY, State.PRE_COPY_P2P))
    with pytest.raises(DeviceError):
        device.set_state(State.STOP_COPY)
    assert device.state is State.ERROR
    assert device.session is None
    assert not session.alive
    assert log_lines(device)[-1] == "PRE_COPY PRE_COPY_P2P EIO"
    with pytest.raises(DeviceError) as info:
        device.read(session, 10)
    assert info.value.errno == errno.ENODEV


@pytest.mark.parametrize("flags", [1, 3, 5, 7])
def test_device_only_reset_leaves_error(flags: int) -> None:
    device, driver = rec_device(flags)
    device.set_state(State.STOP)
    device.fail_to_error()
    assert device.state is State.ERROR
    driver.arcs.clear()
    # ERROR -> ERROR is a successful no-op.
    assert device.set_state(State.ERROR).arcs == ()
    for target in State:
        if target is State.ERROR:
            continue
        with pytest.raises(IllegalTransition) as info:
            device.set_state(target)
        assert info.value.errno == errno.EINVAL
        assert device.state is State.ERROR
    assert driver.arcs == []
    device.reset()
    assert state_of(device) is State.RUNNING
    assert driver.resets == 1
    assert log_lines(device)[-1] == "RESET"
    device.set_state(State.STOP)
    assert state_of(device) is State.STOP


def test_device_fail_to_error_ends_live_session() -> None:
    device, driver = rec_device(7)
    res = device.set_state(State.STOP_COPY)
    assert res.session is not None
    device.fail_to_error()
    assert not res.session.alive
    assert device.session is None
    assert driver.ended == 1


def test_device_driver_opening_no_stream_is_eio_and_error() -> None:
    device, driver = rec_device(1)
    driver.no_stream = (State.STOP, State.RESUMING)
    with pytest.raises(DeviceError) as info:
        device.set_state(State.RESUMING)
    assert info.value.errno == errno.EIO
    assert device.state is State.ERROR


def test_device_driver_stream_on_plain_arc_is_einval() -> None:
    device, driver = rec_device(1)
    driver.wrong_stream = (State.RUNNING, State.STOP)
    with pytest.raises(DeviceError) as info:
        device.set_state(State.STOP)
    assert info.value.errno == errno.EINVAL
    assert device.session is None


def test_device_refused_requests_are_logged() -> None:
    device, _ = rec_device(1)
    for target in (State.ERROR, State.PRE_COPY, State.RUNNING_P2P):
        with pytest.raises(IllegalTransition):
            device.set_state(target)
    device.set_state(State.STOP_COPY)
    with pytest.raises(IllegalTransition, match="device d0"):
        device.set_state(State.PRE_COPY)
    assert log_lines(device) == [
        "REFUSED RUNNING ERROR",
        "REFUSED RUNNING PRE_COPY",
        "REFUSED RUNNING RUNNING_P2P",
        "RUNNING STOP",
        "STOP STOP_COPY",
        "REFUSED STOP_COPY PRE_COPY",
    ]


def test_device_stop_copy_to_pre_copy_is_refused_on_pre_copy_devices() -> None:
    for flags, target in ((5, State.PRE_COPY), (7, State.PRE_COPY), (7, State.PRE_COPY_P2P)):
        device, driver = rec_device(flags)
        device.set_state(State.STOP_COPY)
        session = device.session
        driver.arcs.clear()
        with pytest.raises(IllegalTransition) as info:
            device.set_state(target)
        assert info.value.errno == errno.EINVAL
        assert device.state is State.STOP_COPY
        assert device.session is session
        assert driver.arcs == []


def test_device_log_keeps_last_4096_lines() -> None:
    device, _ = rec_device(1)
    for _ in range(LOG_LINES // 2 + 100):
        device.set_state(State.STOP)
        device.set_state(State.RUNNING)
    device.reset()
    lines = log_lines(device)
    assert LOG_LINES == 4096
    assert len(lines) == 4096
    assert lines[-1] == "RESET"
    assert lines[-2] == "STOP RUNNING"
    assert lines[-3] == "RUNNING STOP"


def test_device_rejects_driver_without_stop_copy_or_bad_config() -> None:
    class NoStopCopy(RecordingDriver):
        @property
        def migration_flags(self) -> MigFlags:
            return MigFlags.P2P

    with pytest.raises(ValueError, match="STOP_COPY"):
        Device("x", "rec", NoStopCopy(1), 0)

    class OddConfig(RecordingDriver):
        def initial_config(self) -> bytes:
            return bytes(100)

    with pytest.raises(ValueError, match="100 config bytes"):
        Device("x", "rec", OddConfig(1), 0)


# ---------------------------------------------------------------------------
# Sessions


def test_device_open_session_without_session_is_enodev() -> None:
    device, _ = rec_device(7)
    for state in (State.RUNNING, State.STOP, State.RUNNING_P2P):
        device.set_state(state)
        with pytest.raises(DeviceError) as info:
            device.open_session(read=True, write=False)
        assert info.value.errno == errno.ENODEV


def test_device_open_session_modes() -> None:
    device, _ = rec_device(7)
    device.set_state(State.STOP_COPY)
    for read, write in ((True, True), (False, True), (False, False)):
        with pytest.raises(DeviceError) as info:
            device.open_session(read=read, write=write)
        assert info.value.errno == errno.EACCES
    saving = device.open_session(read=True, write=False)
    device.set_state(State.RESUMING)
    for read, write in ((True, True), (True, False), (False, False)):
        with pytest.raises(DeviceError) as info:
            device.open_session(read=read, write=write)
        assert info.value.errno == errno.EACCES
    resuming = device.open_session(read=False, write=True)
    assert resuming is not saving
    with pytest.raises(DeviceError) as info:
        device.read(resuming, 1)
    assert info.value.errno == errno.EBADF


def test_device_handles_share_one_position() -> None:
    device, driver = rec_device(1)
    driver.payload = bytes(range(100))
    device.set_state(State.STOP_COPY)
    a = device.open_session(read=True, write=False)
    b = device.open_session(read=True, write=False)
    out = b""
    for handle in itertools.islice(itertools.cycle((a, b)), 30):
        data, _ = device.read(handle, 7)
        out += bytes(data)
    assert out == bytes(range(100))
    assert a.position == b.position == 100
    with pytest.raises(DeviceError) as info:
        device.write(a, memoryview(b"x"))
    assert info.value.errno == errno.EBADF


def test_device_session_ends_on_end_arcs_and_handles_get_enodev() -> None:
    device, _ = rec_device(7)
    device.set_state(State.STOP_COPY)
    handle = device.open_session(read=True, write=False)
    device.set_state(State.STOP)
    for op in (lambda: device.read(handle, 1), lambda: device.write(handle, memoryview(b"x"))):
        with pytest.raises(DeviceError) as info:
            op()
        assert info.value.errno == errno.ENODEV
    # A new session is a different one; the old handle stays dead.
    device.set_state(State.STOP_COPY)
    with pytest.raises(DeviceError) as info:
        device.read(handle, 1)
    assert info.value.errno == errno.ENODEV
    assert device.read(device.open_session(read=True, write=False), 3)[0] == b"pay"


def test_device_reset_ends_session() -> None:
    device, driver = rec_device(7)
    device.set_state(State.RESUMING)
    handle = device.open_session(read=False, write=True)
    device.write(handle, memoryview(b"abc"))
    device.reset()
    assert device.state is State.RUNNING
    assert device.session is None
    assert driver.ended == 1
    with pytest.raises(DeviceError) as info:
        device.write(handle, memoryview(b"abc"))
    assert info.value.errno == errno.ENODEV


def test_device_rejected_write_kills_session() -> None:
    device, _ = rec_device(7)
    device.set_state(State.RESUMING)
    handle = device.open_session(read=False, write=True)
    with pytest.raises(DeviceError) as info:
        device.write(handle, memoryview(b"BAD"))
    assert info.value.errno == errno.EINVAL
    assert device.state is State.RESUMING
    with pytest.raises(DeviceError) as info:
        device.write(handle, memoryview(b"good"))
    assert info.value.errno == errno.ENODEV


def test_device_remove_is_ebusy_while_session_live() -> None:
    device, _ = rec_device(7)
    device.check_removable()
    device.set_state(State.PRE_COPY)
    with pytest.raises(DeviceError) as info:
        device.check_removable()
    assert info.value.errno == errno.EBUSY
    device.set_state(State.RUNNING)
    device.check_removable()
    session = device.set_state(State.STOP_COPY).session
    device.close()
    assert session is not None
    assert not session.alive


def test_device_precopy_info_only_in_pre_copy_states() -> None:
    device, _ = rec_device(7)
    for state in (State.RUNNING, State.STOP, State.RUNNING_P2P, State.RESUMING, State.STOP_COPY):
        device.set_state(state)
        with pytest.raises(DeviceError) as info:
            device.precopy_info()
        assert info.value.errno == errno.EINVAL
    device.reset()
    device.fail_to_error()
    with pytest.raises(DeviceError) as info:
        device.precopy_info()
    assert info.value.errno == errno.EINVAL
    device.reset()
    handle = device.set_state(State.PRE_COPY).session
    assert handle is not None
    assert device.precopy_info() == PrecopyInfo(initial_bytes=7, dirty_bytes=0)
    device.set_state(State.PRE_COPY_P2P)
    assert device.precopy_info().initial_bytes == 7
    device.set_state(State.STOP_COPY)
    # The same session goes on, but PRECOPY_INFO needs a PRE_COPY* state: EINVAL.
    with pytest.raises(DeviceError) as info:
        device.precopy_info()
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("state", list(State))
def test_device_data_size_in_every_state(state: State) -> None:
    device = ram_device()
    full = device.data_size()
    assert full > 16 * 1024
    bring_to(device, state)
    size = device.data_size()
    assert isinstance(size, int)
    if device.session is None or state is State.RESUMING:
        assert size == full
    else:
        assert 0 < size <= full + 64


# ---------------------------------------------------------------------------
# Config space and regions


def test_device_config_bounds() -> None:
    device, _ = rec_device(1)
    assert len(device.config_bytes()) == 256
    assert device.config_read(0, 2) == (0x1AF4).to_bytes(2, "little")
    assert device.config_read(250, 100) == bytes(6)
    assert device.config_read(256, 4) == b""
    assert device.config_read(1000, 4) == b""
    assert device.config_write(252, memoryview(b"abcd")) == 4
    assert device.config_read(252, 4) == b"abcd"
    for offset, data in ((253, b"abcd"), (256, b"a"), (-1, b"a")):
        with pytest.raises(DeviceError) as info:
            device.config_write(offset, memoryview(data))
        assert info.value.errno == errno.EINVAL
    assert device.config_read(252, 4) == b"abcd"


def test_device_region_bounds() -> None:
    """bar0 has 16 bytes of backing in a 4 KiB BAR: past the backing reads zeros and
    drops writes (hardware), past the BAR is EINVAL."""
    device, driver = rec_device(1)
    assert device.regions() == {"bar0": 16}
    assert device.region_read("bar0", 10, 100) == bytes(range(10, 16)) + bytes(94)
    assert device.region_read("bar0", 16, 1) == b"\0"
    assert device.region_read("bar0", 4096, 1) == b""
    assert device.region_write("bar0", 12, memoryview(b"wxyz")) == 4
    assert driver.written == (12, b"wxyz")
    assert device.region_write("bar0", 13, memoryview(b"wxyz")) == 4
    assert driver.written == (13, b"wxy")
    with pytest.raises(DeviceError) as info:
        device.region_write("bar0", 4094, memoryview(b"wxyz"))
    assert info.value.errno == errno.EINVAL
    ops = (
        lambda: device.region_read("bar9", 0, 1),
        lambda: device.region_write("bar9", 0, memoryview(b"x")),
    )
    for op in ops:
        with pytest.raises(DeviceError) as info:
            op()
        assert info.value.errno == errno.ENOENT


def test_device_info_fields() -> None:
    device = ram_device("gpu0")
    info = device.info()
    assert info["name"] == "gpu0"
    assert info["driver"] == "ram"
    assert info["migration_flags"] == ["STOP_COPY", "P2P", "PRE_COPY"]
    assert info["state"] == "RUNNING"
    assert info["config_size"] == 256
    assert info["regions"] == {"bar0": 16 * 1024}
    assert info["cdev"] == "vfio0"
    assert info["iommu_group"] == 100
    assert re.fullmatch(r"[0-9a-f]{64}", str(info["state_digest"]))
    assert "state_digest" not in device.info(with_digest=False)


# ---------------------------------------------------------------------------
# Bandwidth pacing


def test_bandwidth_unlimited_never_waits() -> None:
    for rate in (None, 0):
        bw = Bandwidth(rate)
        assert bw.delay(10**9, 0.0) == 0.0


def test_bandwidth_token_bucket_math() -> None:
    bw = Bandwidth(1000)
    assert bw.delay(500, 0.0) == pytest.approx(0.5)  # busy until 0.5
    assert bw.delay(500, 0.0) == pytest.approx(1.0)  # queued behind the first: until 1.0
    assert bw.delay(100, 0.8) == pytest.approx(0.3)  # until 1.1
    assert bw.delay(1000, 5.0) == pytest.approx(1.0)  # idle gap earns no credit
    assert bw.delay(0, 6.0) == pytest.approx(0.0)


def test_device_read_and_write_return_bandwidth_delay() -> None:
    src = ram_device(read_bandwidth="1K", size="4K")
    src.set_state(State.STOP_COPY)
    handle = src.open_session(read=True, write=False)
    _, delay = src.read(handle, 512, now=10.0)
    assert delay == pytest.approx(0.5)
    _, delay = src.read(handle, 512, now=10.0)
    assert delay == pytest.approx(1.0)
    stream = _save(ram_device("other", size="4K"))
    dst = ram_device("dst", write_bandwidth="2K", size="4K")
    dst.set_state(State.RESUMING)
    wh = dst.open_session(read=False, write=True)
    n, delay = dst.write(wh, memoryview(stream[:1024]), now=0.0)
    assert n == 1024
    assert delay == pytest.approx(0.5)


# ---------------------------------------------------------------------------
# Fault rules through the device


def test_device_arc_fault_fails_before_driver_runs() -> None:
    device, driver = rec_device(3)
    device.faults = FaultRules.parse("arc RUNNING_P2P STOP EAGAIN\n")
    with pytest.raises(DeviceError) as info:
        device.set_state(State.STOP_COPY)
    assert info.value.errno == errno.EAGAIN
    assert device.state is State.RUNNING_P2P
    assert driver.arcs == [(State.RUNNING, State.RUNNING_P2P)]
    assert log_lines(device) == ["RUNNING RUNNING_P2P", "RUNNING_P2P STOP EAGAIN"]
    device.faults = FaultRules()
    device.set_state(State.STOP_COPY)
    assert state_of(device) is State.STOP_COPY


def test_device_arc_delay_is_per_arc() -> None:
    device, _ = rec_device(3)
    device.faults = FaultRules.parse("delay arc 25\ndelay read 7\n")
    assert device.set_state(State.STOP_COPY).delay_s == pytest.approx(0.075)
    assert device.set_state(State.STOP_COPY).delay_s == 0.0
    handle = device.open_session(read=True, write=False)
    assert device.read(handle, 3)[1] == pytest.approx(0.007)


def test_device_read_fault_after_bytes() -> None:
    device = ram_device(size="4K")
    device.faults = FaultRules.parse("read EIO after 100")
    device.set_state(State.STOP_COPY)
    handle = device.open_session(read=True, write=False)
    data, _ = device.read(handle, 60)
    assert len(data) == 60
    data, _ = device.read(handle, 60)
    assert len(data) == 40  # short read up to the fault point
    with pytest.raises(DeviceError) as info:
        device.read(handle, 60)
    assert info.value.errno == errno.EIO
    assert handle.position == 100


def test_device_write_fault_after_bytes() -> None:
    device = ram_device(size="4K")
    device.faults = FaultRules.parse("write ENOSPC after 100")
    device.set_state(State.RESUMING)
    handle = device.open_session(read=False, write=True)
    stream = _save(ram_device("src", size="4K"))
    assert device.write(handle, memoryview(stream[:60]))[0] == 60
    assert device.write(handle, memoryview(stream[60:100]))[0] == 40
    with pytest.raises(DeviceError) as info:
        device.write(handle, memoryview(stream[100:101]))
    assert info.value.errno == errno.ENOSPC
    assert handle.position == 100


def _save(device: Device, chunk: int = 4096) -> bytes:
    device.set_state(State.STOP_COPY)
    handle = device.open_session(read=True, write=False)
    out = bytearray()
    while True:
        data, _ = device.read(handle, chunk)
        if not data:
            return bytes(out)
        out += data


@pytest.mark.parametrize("offset", [0, 5, 31, 100, 4095, 4150])
def test_device_corrupt_flips_exactly_one_bit_at_offset(offset: int) -> None:
    clean = _save(ram_device(size="4K"))
    device = ram_device(size="4K")
    device.faults = FaultRules.parse(f"corrupt after {offset}")
    got = _save(device, chunk=97)
    assert len(got) == len(clean)
    diff = [i for i in range(len(clean)) if got[i] != clean[i]]
    assert diff == [offset]
    assert (got[offset] ^ clean[offset]).bit_count() == 1


# ---------------------------------------------------------------------------
# Hypothesis: random request sequences against the tables


@attrs.define
class Model:
    state: State = State.RUNNING
    session: int | None = None  # model session number
    next_session: int = 0


_OPS = st.one_of(
    st.sampled_from(list(State)).map(lambda s: ("set", s)),
    st.just(("reset", State.RUNNING)),
    st.just(("error", State.ERROR)),
    st.tuples(st.just("failarc"), st.sampled_from(list(State))),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flags=st.sampled_from([1, 3, 5, 7]), ops=st.lists(_OPS, max_size=25))
def test_device_random_requests_follow_table_model(
    flags: int, ops: list[tuple[str, State]]
) -> None:
    device, driver = rec_device(flags)
    table = TABLES[flags]
    model = Model()
    sessions: dict[int, Session] = {}
    log: list[str] = []
    for kind, target in ops:
        driver.arcs.clear()
        driver.fail.clear()
        if kind == "reset":
            device.reset()
            model.state, model.session = State.RUNNING, None
            log.append("RESET")
        elif kind == "error":
            device.fail_to_error()
            model.state, model.session = State.ERROR, None
        else:
            row = table.get((model.state, target))
            if row is None:  # cur not a row (unsupported) cannot happen
                raise AssertionError((model.state, target))
            fail_at = None
            if kind == "failarc" and row.arcs:
                fail_at = len(row.arcs) - 1
                driver.fail[row.arcs[fail_at]] = errno.EIO
            if row.einval:
                with pytest.raises(IllegalTransition):
                    device.set_state(target)
                log.append(f"REFUSED {model.state.name} {target.name}")
            elif fail_at is not None:
                with pytest.raises(DeviceError) as info:
                    device.set_state(target)
                assert info.value.errno == errno.EIO
                assert driver.arcs == list(row.arcs)
                done = row.arcs[:fail_at]
                log.extend(f"{a.name} {b.name}" for a, b in done)
                log.append(f"{row.arcs[fail_at][0].name} {row.arcs[fail_at][1].name} EIO")
                for arc in done:
                    model.state = arc[1]
                    if arc in NEW_FD_ARCS:
                        model.session, model.next_session = (
                            model.next_session,
                            model.next_session + 1,
                        )
                    elif arc in END_ARCS:
                        model.session = None
            else:
                result = device.set_state(target)
                assert driver.arcs == list(row.arcs)
                assert (result.session is not None) == row.new_fd
                log.extend(f"{a.name} {b.name}" for a, b in row.arcs)
                for arc in row.arcs:
                    model.state = arc[1]
                    if arc in NEW_FD_ARCS:
                        model.session, model.next_session = (
                            model.next_session,
                            model.next_session + 1,
                        )
                    elif arc in END_ARCS:
                        model.session = None
        assert device.state is model.state
        if model.session is None:
            assert device.session is None
        else:
            live = device.session
            assert live is not None
            assert live.alive
            known = sessions.setdefault(model.session, live)
            assert known is live
        for number, obj in sessions.items():
            if number != model.session:
                assert not obj.alive
        assert log_lines(device) == log[-LOG_LINES:]


def test_driver_asks_which_interrupt_the_vmm_enabled() -> None:
    """irq_enabled follows SET_IRQS: one index at a time (INTx, MSI or MSI-X), as vfio-pci."""
    from fakevfio._process import OsServices
    from fakevfio.driver import IRQ_INTX, IRQ_MSI, IRQ_MSIX

    driver = RamDriver("r0", {"size": "16K"})
    device = Device("r0", "ram", driver, 0, host=OsServices())
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        assert [driver.irq_enabled(i) for i in (IRQ_INTX, IRQ_MSI, IRQ_MSIX)] == [False] * 3
        with device.lock:
            device.irqs.control(f"set msi trigger 0 1 eventfd {os.getpid()}:{efd}")
        assert [driver.irq_enabled(i) for i in (IRQ_INTX, IRQ_MSI, IRQ_MSIX)] == [
            False,
            True,
            False,
        ]
        driver.raise_irq(IRQ_MSI)
        assert os.eventfd_read(efd) == 1
        with device.lock:
            device.irqs.control("set msi trigger 0 0 none")
        assert not driver.irq_enabled(IRQ_MSI)
    finally:
        device.close()
        os.close(efd)


class ScratchSave(FakeSave):
    """A stream that replies from one scratch buffer it rewrites on every read."""

    def __init__(self) -> None:
        super().__init__(b"x" * 64)
        self.scratch = bytearray(8)

    def read(self, size: int, state: State) -> memoryview:  # type: ignore[override]
        chunk = super().read(min(size, 8), state)
        self.scratch[: len(chunk)] = bytes(range(self.pos, self.pos + len(chunk)))
        return memoryview(self.scratch)[: len(chunk)]


def test_views_of_a_stream_without_stable_views_are_copied() -> None:
    driver = RecordingDriver(MigFlags.STOP_COPY)
    device = Device("d", "rec", driver, 0)
    device.set_state(State.STOP)
    stream = ScratchSave()
    device.set_state(State.STOP_COPY)
    session = device.session
    assert session is not None
    session.stream = stream
    first, _ = device.read(session, 8)
    device.read(session, 8)  # rewrites the stream's scratch buffer
    assert not isinstance(first, memoryview)
    assert bytes(first) == bytes(range(8, 16))
