"""Tests of the nic example driver, driven through fakevfio._device.Device."""

from __future__ import annotations

import errno
from collections.abc import Mapping

import pytest
from fakevfio_nic import DRIVER_HEADER, NicDriver
from fakevfio_nic.driver import DESC, REG_ID, REG_RINGS

from fakevfio import _stream as core_stream
from fakevfio._device import Device
from fakevfio.errors import ConfigError, DeviceError
from vfio_uapi.fsm import State

SMALL = {"ring_size": "16", "filters": "16"}
CHUNKS = [1, 7, 4099]


def make(options: Mapping[str, str] = SMALL, name: str = "src",
         cls: type[NicDriver] = NicDriver) -> Device:
    return Device(name, "nic", cls(name, dict(options)), 0)


def nic(dev: Device) -> NicDriver:
    assert isinstance(dev.driver, NicDriver)
    return dev.driver


def drain(dev: Device, chunk: int) -> bytes:
    """Read until EOF (STOP_COPY) or ENOMSG (pre-copy's temporary end)."""
    session = dev.session
    assert session is not None
    out = bytearray()
    while True:
        try:
            data = dev.read(session, chunk)[0]
        except DeviceError as exc:
            if exc.errno != errno.ENOMSG:
                raise
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


def save(dev: Device, chunk: int = 4099) -> bytes:
    dev.set_state(State.STOP_COPY)
    data = drain(dev, chunk)
    dev.set_state(State.STOP)
    return data


def load(dev: Device, stream: bytes, chunk: int = 4099) -> None:
    dev.set_state(State.RESUMING)
    session = dev.session
    assert session is not None
    view = memoryview(stream)
    for off in range(0, len(stream), chunk):
        dev.write(session, view[off : off + chunk])
    dev.set_state(State.STOP)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_nic_full_save_restore_gives_equal_digest(chunk: int) -> None:
    src = make({**SMALL, "pps": "1000", "seed": "3"})
    src.advance(0.05)  # some traffic before the migration
    entry = bytes.fromhex("020000000001") + b"\x05\0\x03\0"  # MAC, VLAN 5, valid|match VLAN
    src.region_write("bar0", 0x1000 + 32, memoryview(entry))
    stream = save(src, chunk)
    dst = make(name="dst")
    assert dst.driver.digest() != src.driver.digest()
    load(dst, stream, chunk)
    assert dst.driver.digest() == src.driver.digest()
    assert nic(dst).counters()["rx_packets"] == nic(src).counters()["rx_packets"] > 0


def test_nic_precopy_resends_what_the_workload_dirtied() -> None:
    src = make({"pps": "200000", "seed": "1"})  # default geometry: 4096-entry rings
    assert nic(src).state_size() > 100_000
    session = src.set_state(State.PRE_COPY).session
    assert session is not None
    info = src.precopy_info()
    assert info.initial_bytes >= nic(src).state_size()
    assert info.dirty_bytes == 0
    stream = bytearray(drain(src, 65536))
    assert src.precopy_info().initial_bytes == 0
    for _ in range(3):
        src.advance(0.001)  # 200 packets: a few descriptor pages and the counter page
        info = src.precopy_info()
        assert info.initial_bytes == 0
        assert 0 < info.dirty_bytes < nic(src).state_size() // 4
        stream += drain(src, 4099)
        assert src.precopy_info().dirty_bytes == 0
    src.advance(0.001)
    src.set_state(State.STOP_COPY)  # stops the workload; the rest follows
    stream += drain(src, 4099)
    src.set_state(State.STOP)
    full = nic(src).state_size()
    assert len(stream) > full  # the dirty pages went twice
    dst = make({}, "dst")
    load(dst, bytes(stream))
    assert dst.driver.digest() == src.driver.digest()
    counters = nic(src).counters()
    assert counters["rx_packets"] + counters["tx_packets"] == 800


class _NicV2(NicDriver):
    stream_version = 2


@pytest.mark.parametrize(
    ("source", "err"),
    [
        pytest.param(lambda: make(cls=_NicV2), errno.EOPNOTSUPP, id="stream-version"),
        pytest.param(lambda: make({"ring_size": "32", "filters": "16"}), errno.EOPNOTSUPP,
                     id="ring-size"),
    ],
)
def test_nic_resume_rejects_incompatible_stream(source: object, err: int) -> None:
    assert callable(source)
    stream = save(source())
    dst = make(name="dst")
    with pytest.raises(DeviceError) as exc:
        load(dst, stream, 7)
    assert exc.value.errno == err
    assert dst.state is State.RESUMING


def _flip(stream: bytes, offset: int) -> bytes:
    out = bytearray(stream)
    out[offset] ^= 0x10
    return bytes(out)


def _state_offset(stream: bytes, state_offset: int) -> int:
    """Stream offset of a state byte in the first PAGES record (the state is sent in order)."""
    return core_stream.HEADER.size + DRIVER_HEADER.size + core_stream.RECORD.size + state_offset


def test_nic_resume_rejects_corrupted_header_at_once() -> None:
    stream = save(make())
    dst = make(name="dst")
    with pytest.raises(DeviceError) as exc:
        load(dst, _flip(stream, 2), 7)  # core stream magic
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(DeviceError) as exc:
        load(make(name="dst2"), _flip(stream, core_stream.HEADER.size + 1), 7)  # nic magic
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize("state_offset", [REG_ID, REG_RINGS + 1, 0x1000 + 16 + 12],
                         ids=["id-register", "ring-index", "filter-reserved"])
def test_nic_resume_rejects_inconsistent_state_at_stop(state_offset: int) -> None:
    stream = save(make())
    dst = make(name="dst")
    with pytest.raises(DeviceError) as exc:
        load(dst, _flip(stream, _state_offset(stream, state_offset)))
    assert exc.value.errno == errno.EINVAL
    assert dst.state is State.RESUMING


def test_nic_workload_writes_descriptors_and_counters() -> None:
    dev = make({**SMALL, "pps": "100"})
    assert dev.driver.has_workload()
    dev.advance(0.5)
    drv = nic(dev)
    counters = drv.counters()
    assert counters["rx_packets"] + counters["tx_packets"] == 50
    desc = DESC.unpack(dev.region_read("bar0", drv.rx_off, DESC.size))
    assert desc[1] >= 64
    assert desc[2] == 3
    dev.region_write("bar0", REG_ID, memoryview(b"\0\0\0\0"))  # read-only
    assert dev.region_read("bar0", REG_ID, 4) == b"1CIN"


def test_nic_options() -> None:
    assert {"ring_size", "filters", "pps", "mac", "seed"} <= set(NicDriver.options)
    with pytest.raises(ConfigError, match="ring_size"):
        NicDriver("d", {"ring_size": "100"})
    with pytest.raises(ConfigError, match="MAC"):
        NicDriver("d", {"mac": "nope"})
    dev = make({"mac": "02:00:00:00:00:07", **SMALL})
    assert dev.region_read("bar0", 8, 6) == bytes.fromhex("020000000007")
