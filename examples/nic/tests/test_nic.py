"""Tests of the nic example driver, in process through fakevfio.testing's conformance kit."""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping

import pytest
from fakevfio_nic import NicDriver
from fakevfio_nic.driver import DESC, REG_ID, REG_RINGS

from fakevfio import State
from fakevfio.errors import ConfigError, DeviceError
from fakevfio.testing import (
    DRIVER_HEADER_OFFSET,
    LocalDevice,
    check_state_driver,
    round_trip,
    state_stream_offset,
)

SMALL = {"ring_size": "16", "filters": "16"}
CHUNKS = [1, 7, 4099]
Nic = LocalDevice[NicDriver]


def make(
    options: Mapping[str, str] = SMALL, name: str = "src", cls: type[NicDriver] = NicDriver
) -> Nic:
    return LocalDevice(cls(name, dict(options)))


def test_nic_follows_the_driver_rules() -> None:
    check_state_driver(
        lambda name: NicDriver(name, {**SMALL, "pps": "1000", "seed": "3"}),
        dest_factory=lambda name: NicDriver(name, SMALL),
    )


@pytest.mark.parametrize("chunk", CHUNKS)
def test_nic_full_save_restore_gives_equal_digest(chunk: int) -> None:
    src = make({**SMALL, "pps": "1000", "seed": "3"})
    src.advance(0.05)  # some traffic before the migration
    entry = bytes.fromhex("020000000001") + b"\x05\0\x03\0"  # MAC, VLAN 5, valid|match VLAN
    src.region_write("bar0", 0x1000 + 32, entry)
    dst = make(name="dst")
    assert dst.digest() != src.digest()
    round_trip(src, dst, save_chunk=chunk, load_chunk=chunk)
    assert dst.driver.counters()["rx_packets"] == src.driver.counters()["rx_packets"] > 0


def test_nic_precopy_resends_what_the_workload_dirtied() -> None:
    src = make({"pps": "200000", "seed": "1"})  # default geometry: 4096-entry rings
    assert src.driver.state_size() > 100_000
    assert src.set_state(State.PRE_COPY)
    info = src.precopy_info()
    assert info.initial_bytes >= src.driver.state_size()
    assert info.dirty_bytes == 0
    stream = bytearray(src.drain(65536))
    assert src.precopy_info().initial_bytes == 0
    for _ in range(3):
        src.advance(0.001)  # 200 packets: a few descriptor pages and the counter page
        info = src.precopy_info()
        assert info.initial_bytes == 0
        assert 0 < info.dirty_bytes < src.driver.state_size() // 4
        stream += src.drain(4099)
        assert src.precopy_info().dirty_bytes == 0
    src.advance(0.001)
    src.set_state(State.STOP_COPY)  # stops the workload; the rest follows
    stream += src.drain(4099)
    src.set_state(State.STOP)
    assert len(stream) > src.driver.state_size()  # the dirty pages went twice
    dst = make({}, "dst")
    dst.load(bytes(stream))
    assert dst.digest() == src.digest()
    counters = src.driver.counters()
    assert counters["rx_packets"] + counters["tx_packets"] == 800


class _NicV2(NicDriver):
    stream_version = 2


@pytest.mark.parametrize(
    ("source", "err"),
    [
        pytest.param(lambda: make(cls=_NicV2), errno.EOPNOTSUPP, id="stream-version"),
        pytest.param(
            lambda: make({"ring_size": "32", "filters": "16"}), errno.EOPNOTSUPP, id="ring-size"
        ),
    ],
)
def test_nic_resume_rejects_incompatible_stream(source: Callable[[], Nic], err: int) -> None:
    stream = source().save()
    dst = make(name="dst")
    with pytest.raises(DeviceError) as exc:
        dst.load(stream, 7)
    assert exc.value.errno == err
    assert dst.state() is State.RESUMING


def _flip(stream: bytes, offset: int) -> bytes:
    out = bytearray(stream)
    out[offset] ^= 0x10
    return bytes(out)


def test_nic_resume_rejects_corrupted_header_at_once() -> None:
    stream = make().save()
    with pytest.raises(DeviceError) as exc:
        make(name="dst").load(_flip(stream, 2), 7)  # core stream magic
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(DeviceError) as exc:
        make(name="dst2").load(_flip(stream, DRIVER_HEADER_OFFSET + 1), 7)  # nic magic
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    "state_offset",
    [REG_ID, REG_RINGS + 1, 0x1000 + 16 + 12],
    ids=["id-register", "ring-index", "filter-reserved"],
)
def test_nic_resume_rejects_inconsistent_state_at_stop(state_offset: int) -> None:
    src = make()
    stream = src.save()
    dst = make(name="dst")
    with pytest.raises(DeviceError) as exc:
        dst.load(_flip(stream, state_stream_offset(src.driver, state_offset)))
    assert exc.value.errno == errno.EINVAL
    assert dst.state() is State.RESUMING


def test_nic_workload_writes_descriptors_and_counters() -> None:
    dev = make({**SMALL, "pps": "100"})
    assert dev.driver.has_workload()
    dev.advance(0.5)
    counters = dev.driver.counters()
    assert counters["rx_packets"] + counters["tx_packets"] == 50
    desc = DESC.unpack(dev.region_read("bar0", dev.driver.rx_off, DESC.size))
    assert desc[1] >= 64
    assert desc[2] == 3
    dev.region_write("bar0", REG_ID, b"\0\0\0\0")  # read-only
    assert dev.region_read("bar0", REG_ID, 4) == b"1CIN"


def test_nic_options() -> None:
    assert {"ring_size", "filters", "pps", "mac", "seed"} <= set(NicDriver.options)
    with pytest.raises(ConfigError, match="ring_size"):
        NicDriver("d", {"ring_size": "100"})
    with pytest.raises(ConfigError, match="MAC"):
        NicDriver("d", {"mac": "nope"})
    dev = make({"mac": "02:00:00:00:00:07", **SMALL})
    assert dev.region_read("bar0", 8, 6) == bytes.fromhex("020000000007")
