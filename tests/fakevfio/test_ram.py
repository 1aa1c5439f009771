"""The built-in ram reference driver: options, content, regions, workload."""

from __future__ import annotations

import errno
import hashlib
import struct

import pytest

from fakevfio._device import Device
from fakevfio._ram import RamDriver
from fakevfio.errors import ConfigError, DeviceError
from vfio_uapi.fsm import MigFlags, State


def ram(**options: str) -> RamDriver:
    return RamDriver("r", {"size": "16K"} | options)


def test_ram_defaults() -> None:
    drv = RamDriver("r", {})
    assert drv.state_size() == 1 << 20
    assert drv.migration_flags == MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY
    assert drv.page_size == 4096
    assert drv.config_size == 256
    assert drv.read_bandwidth is None
    assert drv.write_bandwidth is None
    assert not drv.has_workload()
    assert drv.regions() == {"bar0": 1 << 20}
    assert drv.digest() == hashlib.sha256(bytes(1 << 20)).hexdigest()  # zeros without a seed
    drv.close()


def test_ram_interface_options() -> None:
    drv = RamDriver(
        "r",
        {
            "size": "256K",
            "flags": "STOP_COPY+P2P",
            "seed": "7",
            "dirty_rate": "1M",
            "read_bandwidth": "10M",
            "write_bandwidth": "2G",
        },
    )
    assert drv.state_size() == 256 << 10
    assert drv.migration_flags == MigFlags.STOP_COPY | MigFlags.P2P
    assert drv.read_bandwidth == 10 << 20
    assert drv.write_bandwidth == 2 << 30
    assert drv.has_workload()
    assert drv.info() == {"size": 256 << 10, "pages_dirtied": 0}


@pytest.mark.parametrize(
    "flags", ["STOP_COPY", "STOP_COPY+P2P", "STOP_COPY+PRE_COPY", "STOP_COPY+P2P+PRE_COPY"]
)
def test_ram_every_flag_word_makes_a_device(flags: str) -> None:
    dev = Device("r", "ram", ram(flags=flags), 0)
    assert dev.flags == RamDriver("x", {"size": "1", "flags": flags}).migration_flags


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"size": "0"}, "size must be"),
        ({"size": "2T"}, "size must be"),
        ({"size": "big"}, "invalid size"),
        ({"flags": "P2P"}, "not a combination"),
        ({"flags": "STOP_COPY+TURBO"}, "unknown migration flag"),
        ({"page_size": "1000"}, "power of two"),
        ({"page_size": "256"}, "power of two"),
        ({"page_size": "2M"}, "power of two"),
        ({"config_size": "512"}, "256 or 4096"),
        ({"config_size": "x"}, "not an integer"),
        ({"seed": "seven"}, "not an integer"),
        ({"dirty_rate": "-5"}, "invalid"),
        ({"colour": "red"}, "unknown option"),
    ],
)
def test_ram_rejects_bad_options(options: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ram(**options)


def test_ram_seed_is_deterministic() -> None:
    a, b, c = ram(seed="7"), ram(seed="7"), ram(seed="8")
    assert a.digest() == b.digest()
    assert a.digest() != c.digest()
    assert bytes(a.save_range(0, 16 << 10)) != bytes(16 << 10)
    big = RamDriver("r", {"size": "3M", "seed": "1"})
    first, second = bytes(big.save_range(0, 1 << 20)), bytes(big.save_range(1 << 20, 1 << 20))
    assert first != second  # blocks are rotated, not repeated


def test_ram_config_size_4096() -> None:
    dev = Device("r", "ram", ram(config_size="4096"), 0)
    assert len(dev.config_bytes()) == 4096


def test_ram_region_io_and_dirty_tracking() -> None:
    drv = ram(seed="2")
    drv.region_write("bar0", 5000, memoryview(b"hello"))
    assert bytes(drv.region_read("bar0", 5000, 5)) == b"hello"
    assert drv.dirty_pages() == 0  # not tracking outside a pre-copy session
    drv.start_dirty_tracking()
    drv.region_write("bar0", 4094, memoryview(b"abcd"))  # spans pages 0 and 1
    assert drv.dirty_pages() == 2
    drv.region_write("bar0", 4096, memoryview(b"x"))
    assert drv.dirty_pages() == 2
    assert drv.take_dirty_run(16) == (0, 2)
    assert drv.dirty_pages() == 0
    assert drv.take_dirty_run(16) is None


def test_ram_region_through_device_bounds() -> None:
    dev = Device("r", "ram", ram(), 0)
    assert dev.region_write("bar0", (16 << 10) - 2, memoryview(b"ok")) == 2
    assert dev.region_read("bar0", (16 << 10) - 2, 10) == b"ok"
    with pytest.raises(DeviceError) as info:
        dev.region_write("bar0", (16 << 10) - 1, memoryview(b"ok"))
    assert info.value.errno == errno.EINVAL


def test_ram_workload_rate_and_carry() -> None:
    drv = ram(dirty_rate="4K")  # one page per second
    before = drv.digest()
    drv.advance(0.5)
    assert drv.pages_dirtied == 0
    assert drv.digest() == before
    drv.advance(0.5)
    assert drv.pages_dirtied == 1
    assert drv.digest() != before
    drv.advance(10)
    assert drv.pages_dirtied == 11


def test_ram_workload_runs_only_in_running_states() -> None:
    dev = Device("r", "ram", ram(dirty_rate="64K"), 0)
    driver = dev.driver
    assert isinstance(driver, RamDriver)
    for state, runs in (
        (State.RUNNING, True),
        (State.RUNNING_P2P, False),
        (State.STOP, False),
        (State.PRE_COPY_P2P, False),
        (State.STOP_COPY, False),
        (State.RESUMING, False),
        (State.ERROR, False),
    ):
        if state is State.ERROR:
            dev.fail_to_error()
        else:
            dev.reset()
            dev.set_state(state)
        before = driver.pages_dirtied
        dev.advance(1.0)
        assert (driver.pages_dirtied > before) == runs, state
    dev.reset()
    dev.set_state(State.PRE_COPY)
    before = driver.pages_dirtied
    dev.advance(1.0)
    assert driver.pages_dirtied == before + 16


def test_ram_workload_on_tiny_device() -> None:
    drv = RamDriver("r", {"size": "3", "dirty_rate": "1M", "page_size": "512"})
    drv.advance(1.0)
    assert drv.state_size() == 3
    assert len(bytes(drv.save_range(0, 3))) == 3


def test_ram_header_and_check_header() -> None:
    drv = ram(page_size="8K")
    header = drv.header()
    assert struct.unpack("<8sIIQ", header) == (b"FVRAMDEV", 1, 8192, 16 << 10)
    drv.check_header(header)
    cases = [
        (header[:-1], errno.EINVAL),
        (b"X" + header[1:], errno.EINVAL),
        (struct.pack("<8sIIQ", b"FVRAMDEV", 2, 8192, 16 << 10), errno.EOPNOTSUPP),
        (struct.pack("<8sIIQ", b"FVRAMDEV", 1, 4096, 16 << 10), errno.EOPNOTSUPP),
        (struct.pack("<8sIIQ", b"FVRAMDEV", 1, 8192, 1), errno.EOPNOTSUPP),
    ]
    for bad, err in cases:
        with pytest.raises(DeviceError) as info:
            drv.check_header(bad)
        assert info.value.errno == err


def test_ram_digest_is_sha256_of_state() -> None:
    drv = ram(seed="4")
    assert drv.digest() == hashlib.sha256(bytes(drv.save_range(0, 16 << 10))).hexdigest()
    dev = Device("r", "ram", drv, 0)
    assert dev.info()["state_digest"] == drv.digest()


def test_ram_dma_rate_option() -> None:
    drv = ram(dma_rate="2M", seed="1")
    assert drv.has_workload()  # DMA alone is a workload
    assert drv.info() == {"size": 16 << 10, "pages_dirtied": 0, "dma_pages": 0, "dma_errors": 0}
    drv.advance(1.0)  # not attached to a device: no mappings, nothing written, no backlog
    assert drv.info()["dma_pages"] == 0
    assert drv.pages_dirtied == 0  # dma_rate does not change the device's own state
    with pytest.raises(ConfigError, match="invalid"):
        ram(dma_rate="fast")
    assert "dma_rate" in RamDriver.options
    assert not ram().has_workload()


def test_ram_dma_faults_stop_the_tick_and_are_counted() -> None:
    dev = Device("r", "ram", ram(dma_rate="400K", seed="2"), 0)  # no host services
    dev.dma.control("map 0 0x10000 1 0x1000 rw")
    dev.advance(0.1)
    driver = dev.driver
    assert isinstance(driver, RamDriver)
    assert driver.dma_errors == 1  # ENODEV on the first page; the rest of the tick skipped
    assert driver.dma_pages == 0
