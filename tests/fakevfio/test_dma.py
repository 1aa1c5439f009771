"""The device's DMA core: mappings, DMA into this process's own memory, the three trackers.

The test process is the VMM: it maps its own anonymous memory into a device
(``map IOVA LEN <its pid> <addr> rw``, as the supervisor writes it), the
device DMA-writes through :class:`fakevfio._process.OsServices`
(``process_vm_writev``), and the test sees the bytes in its own memory.
Reports are checked against the kernel's bitmap layout (``iova_bitmap``: bit
i of little-endian u64 word i/64 is page i counted from the report's IOVA)
and the rules of ``vfio_ioctl_device_feature_logging_*`` in
drivers/vfio/vfio_main.c and the mlx5/pds drivers. A bad command fails with
its errno and leaves ``text()`` unchanged.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import time

import pytest

from fakevfio._device import Device
from fakevfio._dma import LOG_MAX_RANGES
from fakevfio._faults import FaultRules
from fakevfio._process import OsServices
from fakevfio._ram import RamDriver
from fakevfio.errors import ConfigError, DeviceError
from tests.conftest import MountFactory
from vfio_uapi.fsm import State

PID = os.getpid()
K4 = 4096


class Memory:
    """Anonymous memory of this process, with its address."""

    def __init__(self, size: int) -> None:
        self.map = mmap.mmap(-1, size)
        self.size = size
        buf = (ctypes.c_char * size).from_buffer(self.map)
        self.addr = ctypes.addressof(buf)
        del buf

    def __getitem__(self, item: slice) -> bytes:
        return self.map[item]


@pytest.fixture
def mem() -> Memory:
    return Memory(16 * K4)


def device(**options: str) -> Device:
    drv = RamDriver("d0", {"size": "16K"} | options)
    return Device("d0", "ram", drv, 0, host=OsServices())


def err(dev: Device, cmd: str) -> int:
    """The errno of a command, checking that it changed nothing."""
    before = dev.dma.text()
    with pytest.raises(DeviceError) as info:
        dev.dma.control(cmd)
    assert dev.dma.text() == before, cmd
    assert info.value.device == "d0"
    return info.value.errno


def words(bitmap: bytes) -> list[int]:
    return list(struct.unpack(f"<{len(bitmap) // 8}Q", bitmap))


def test_dma_write_lands_in_the_mapping_process_memory(mem: Memory) -> None:
    dev = device()
    dev.dma.control(f"map 0x100000 {8 * K4} {PID} {mem.addr:#x} rw")
    dev.dma.control(f"map 0x200000 0x1000 {PID} {mem.addr + 8 * K4} rw")
    dev.dma_write(0x100000 + 5, b"hello")
    assert mem[5:10] == b"hello"
    # crossing the end of the first mapping into an unmapped IOVA faults and writes nothing
    with pytest.raises(DeviceError) as info:
        dev.dma_write(0x100000 + 8 * K4 - 2, b"abcd")
    assert info.value.errno == errno.EFAULT
    assert "not mapped" in str(info.value)
    assert mem[8 * K4 - 2 : 8 * K4] == b"\0\0"
    assert dev.dma_read(0x100000, 10) == b"\0" * 5 + b"hello"
    info_ = dev.dma.info()
    assert info_["bytes_written"] == 5
    assert info_["pages_written"] == 1
    assert info_["bytes_read"] == 10
    assert info_["faults"] == 1
    assert info_["mappings"] == 2


def test_dma_access_crosses_adjacent_mappings(mem: Memory) -> None:
    dev = device()
    # IOVA-adjacent, but backed by non-adjacent memory (pages 0 and 4)
    dev.dma.control(f"map 0x10000 0x1000 {PID} {mem.addr} rw")
    dev.dma.control(f"map 0x11000 0x1000 {PID} {mem.addr + 4 * K4} rw")
    dev.dma_write(0x10FFE, b"WXYZ")
    assert mem[K4 - 2 : K4] == b"WX"
    assert mem[4 * K4 : 4 * K4 + 2] == b"YZ"
    assert dev.dma_read(0x10FFE, 4) == b"WXYZ"


def test_dma_permissions_fault_and_are_counted(mem: Memory) -> None:
    dev = device()
    dev.dma.control(f"map 0 0x1000 {PID} {mem.addr} r")
    dev.dma.control(f"map 0x1000 0x1000 {PID} {mem.addr + K4} w")
    with pytest.raises(DeviceError) as info:
        dev.dma_write(0x10, b"x")
    assert info.value.errno == errno.EFAULT
    assert "read-only" in str(info.value)
    with pytest.raises(DeviceError) as info:
        dev.dma_read(0x1000, 1)
    assert "write-only" in str(info.value)
    dev.dma_write(0x1000, b"ok")
    assert mem[K4 : K4 + 2] == b"ok"
    assert dev.dma.info()["faults"] == 2
    assert mem[0x10:0x11] == b"\0"


def test_dma_of_a_process_that_is_gone_is_a_fault() -> None:
    dev = device()
    dev.dma.control("map 0 0x1000 4000000 0x7f0000000000 rw")  # no such pid (> pid_max)
    with pytest.raises(DeviceError) as info:
        dev.dma_write(0, b"x")
    assert info.value.errno == errno.EFAULT
    assert dev.dma.info()["faults"] == 1
    assert dev.dma.info()["bytes_written"] == 0


def test_dma_without_host_services_is_enodev(mem: Memory) -> None:
    dev = Device("d0", "ram", RamDriver("d0", {"size": "16K"}), 0)
    dev.dma.control(f"map 0 0x1000 {PID} {mem.addr} rw")
    with pytest.raises(DeviceError) as info:
        dev.dma_write(0, b"x")
    assert info.value.errno == errno.ENODEV


@pytest.mark.parametrize(
    ("cmd", "expected"),
    [
        ("", errno.EINVAL),
        ("map 0x1001 0x1000 1 0x1000 rw", errno.EINVAL),  # unaligned IOVA
        ("map 0x1000 0x800 1 0x1000 rw", errno.EINVAL),  # unaligned length
        ("map 0x1000 0 1 0x1000 rw", errno.EINVAL),  # empty
        ("map 0x1000 0x1000 1 0x1000 x", errno.EINVAL),  # bad PERM
        ("map 0x1000 0x1000 0 0x1000 rw", errno.EINVAL),  # PID 0
        ("map 0x1000 0x1000 1 zz rw", errno.EINVAL),
        ("map 0x1000 0x1000 1 0x1000", errno.EINVAL),  # missing PERM
        ("map 0xfffffffffffff000 0x2000 1 0x1000 rw", errno.EOVERFLOW),
        ("map 0x10000000000000000 0x1000 1 0x1000 rw", errno.EOVERFLOW),  # 2^64
        ("map 0x8000 0x1000 1 0x1000 rw", errno.EEXIST),  # overlaps 0x8000
        ("map 0x6000 0x3000 1 0x1000 rw", errno.EEXIST),  # straddles into it
        ("unmap 0x1000 0x10", errno.EINVAL),
        ("unmap", errno.EINVAL),
        ("dirty iommu maybe", errno.EINVAL),
        ("dirty vtd on", errno.EINVAL),
        ("report iommu 0 0x1000 4096", errno.EINVAL),  # tracker off
        ("report iommu 0 0x1000 4096 keep", errno.EINVAL),
        ("log stop now", errno.EINVAL),
        ("log report 0 0x1000 4096", errno.EINVAL),  # not started
        ("frobnicate", errno.EINVAL),
        ("map 1_000 0x1000 1 0x1000 rw", errno.EINVAL),  # int() would accept "1_000"
    ],
)
def test_dma_bad_commands_fail_and_change_nothing(cmd: str, expected: int) -> None:
    dev = device()
    dev.dma.control("map 0x8000 0x1000 1 0x10000 rw")
    assert err(dev, cmd) == expected


def test_dma_unmap_drops_and_trims(mem: Memory) -> None:
    dev = device()
    dev.dma.control(f"map 0 {4 * K4} {PID} {mem.addr} rw")
    dev.dma.control(f"map 0x10000 0x1000 {PID} {mem.addr + 8 * K4} rw")
    dev.dma.control("unmap 0x1000 0x2000")  # the middle two pages of the first mapping
    maps = dev.dma.mappings()
    assert [(m.iova, m.length, m.vaddr - mem.addr) for m in maps] == [
        (0, K4, 0),
        (3 * K4, K4, 3 * K4),
        (0x10000, K4, 8 * K4),
    ]
    dev.dma_write(3 * K4, b"3")
    assert mem[3 * K4 : 3 * K4 + 1] == b"3"
    with pytest.raises(DeviceError):
        dev.dma_write(K4, b"1")
    dev.dma.control("unmap all")
    assert dev.dma.mappings() == ()
    assert not dev.dma.text().startswith("map ")


def test_dma_iommu_trackers_report_written_pages_as_the_kernel_formats_them(
    mem: Memory,
) -> None:
    dev = device()
    dev.dma.control(f"map 0x40000 {16 * K4} {PID} {mem.addr} rw")
    dev.dma_write(0x40000, b"before")  # trackers off: not reported later
    dev.dma.control("dirty iommu on")
    dev.dma.control("dirty type1 on")
    dev.dma_write(0x40000 + 3 * K4 + 100, b"x" * K4)  # pages 3 and 4
    dev.dma_write(0x40000 + 15 * K4, b"y")  # page 15
    bitmap = dev.dma.control("report iommu 0x40000 0x10000 4096 noclear")
    assert bitmap == struct.pack("<Q", (1 << 3) | (1 << 4) | (1 << 15))
    # noclear kept them; a clearing report returns them once more, then nothing
    assert dev.dma.control("report iommu 0x40000 0x10000 4096") == bitmap
    assert dev.dma.control("report iommu 0x40000 0x10000 4096") == bytes(8)
    # type1 is independent: still has them; a 2 MiB report page sets one bit
    assert dev.dma.control("report type1 0 0x200000 0x200000 noclear") == struct.pack("<Q", 1)
    # an 8 KiB report page: pages 3,4 -> bits 1,2; 15 -> bit 7; from an offset IOVA
    assert words(dev.dma.control("report type1 0x42000 0xe000 0x2000") or b"") == [
        (1 << 0) | (1 << 1) | (1 << 6)
    ]
    dev.dma.control("dirty iommu off")
    assert err(dev, "report iommu 0x40000 0x10000 4096") == errno.EINVAL
    dev.dma.control("dirty iommu on")  # starts clean
    assert dev.dma.control("report iommu 0x40000 0x10000 4096") == bytes(8)


def test_dma_report_bitmap_size_is_whole_u64_words(mem: Memory) -> None:
    dev = device()
    dev.dma.control(f"map 0 {16 * K4} {PID} {mem.addr} rw")
    dev.dma.control("dirty iommu on")
    dev.dma_write(64 * K4 - K4, b"")  # an empty write marks nothing
    assert len(dev.dma.control("report iommu 0 0x1000 4096") or b"") == 8
    assert len(dev.dma.control(f"report iommu 0 {65 * K4} 4096") or b"") == 16
    assert err(dev, "report iommu 0x800 0x1000 4096") == errno.EINVAL  # unaligned
    assert err(dev, "report iommu 0 0x1000 3000") == errno.EINVAL  # not a power of two
    assert err(dev, "report iommu 0xfffffffffffff000 0x1000 4096") == errno.EOVERFLOW
    assert err(dev, "report iommu 0 0x10000000000000 1") == errno.E2BIG  # bounded bitmap


def test_dma_dirty_lose_100_empties_every_report(mem: Memory) -> None:
    dev = device()
    dev.dma.control(f"map 0 {16 * K4} {PID} {mem.addr} rw")
    dev.dma.control("dirty iommu on")
    dev.dma.control("log start 4096 0:0x10000")
    dev.faults = FaultRules.parse("dirty lose 100\n")
    for page in range(16):
        dev.dma_write(page * K4, b"z")
    assert mem[15 * K4 : 15 * K4 + 1] == b"z"  # the DMA happened
    assert dev.dma.control("report iommu 0 0x10000 4096") == bytes(8)
    assert dev.dma.control("log report 0 0x10000 4096") == bytes(8)
    assert dev.dma.info()["pages_lost"] == 32


def test_dma_dirty_lose_drops_a_fixed_share_of_pages(mem: Memory) -> None:
    dev = device()
    big = Memory(1024 * K4)
    dev.dma.control(f"map 0 {1024 * K4} {PID} {big.addr} rw")
    dev.dma.control("dirty iommu on")
    dev.faults = FaultRules.parse("dirty lose 25\n")
    for page in range(1024):
        dev.dma_write(page * K4, b"z")
    first = dev.dma.control(f"report iommu 0 {1024 * K4} 4096 noclear") or b""
    kept = sum(w.bit_count() for w in words(first))
    assert 700 < kept < 830  # about 75 % of 1024
    assert dev.dma.control(f"report iommu 0 {1024 * K4} 4096") == first  # the same pages
    dev.faults = FaultRules()
    assert dev.dma.control(f"report iommu 0 {1024 * K4} 4096") == bytes(128)  # lost for good


def test_dma_logging_start_rules_of_the_kernel() -> None:
    dev = device()
    many = ",".join(f"{i * 0x2000:#x}:0x1000" for i in range(LOG_MAX_RANGES + 1))
    assert LOG_MAX_RANGES == 4096 // 16  # vfio_main.c: PAGE_SIZE / sizeof(range)
    assert err(dev, f"log start 4096 {many}") == errno.E2BIG
    assert err(dev, "log start 4096 0x1800:0x1000") == errno.EINVAL  # iova unaligned
    assert err(dev, "log start 4096 0x1000:0x1800") == errno.EINVAL  # length unaligned
    assert err(dev, "log start 4096 0xfffffffffffff000:0x1000") == errno.EOVERFLOW
    assert err(dev, "log start 4096 0:0x3000,0x2000:0x1000") == errno.EINVAL  # overlap
    assert err(dev, "log start 4096 0:0") == errno.EINVAL
    assert err(dev, "log start 0 0:0x1000") == errno.EINVAL
    assert err(dev, "log start 4096 0x1000") == errno.EINVAL  # not IOVA:LENGTH
    # unsorted, non-overlapping ranges are fine; the page size is given back
    assert dev.dma.control("log start 4096 0x10000:0x1000,0:0x2000") == b"page_size 4096\n"
    assert err(dev, "log start 4096 0x20000:0x1000") == errno.EINVAL  # second START
    dev.dma.control("log stop")
    dev.dma.control("log stop")  # STOP when not started succeeds (mlx5, pds)
    # mlx5: the tracked page size is ilog2 of the request, clamped to the device's range
    # IS_ALIGNED masks with page_size - 1 even when that is no power of two
    assert err(dev, "log start 0x3000 0:0x6000") == errno.EINVAL
    assert dev.dma.control("log start 0x3000 0:0x4000") == b"page_size 8192\n"
    dev.dma.control("log stop")
    assert dev.dma.control("log start 512 0:0x1000") == b"page_size 4096\n"
    dev.dma.control("log stop")
    full = ",".join(f"{i * 0x2000:#x}:0x1000" for i in range(LOG_MAX_RANGES))
    assert dev.dma.control(f"log start 4096 {full}") == b"page_size 4096\n"


def test_dma_logging_report_rules_and_clearing(mem: Memory) -> None:
    dev = device()
    dev.dma.control(f"map 0x100000 {16 * K4} {PID} {mem.addr} rw")
    dev.dma.control("log start 4096 0x100000:0x4000,0x108000:0x8000")
    dev.dma_write(0x100000 + K4, b"a")  # page 1: in the first range
    dev.dma_write(0x104000, b"b")  # page 4: in the gap, not logged
    dev.dma_write(0x10F000, b"c" * 10)  # page 15
    assert err(dev, "log report 0x100000 0x10000 2048") == errno.EINVAL  # < 4 KiB
    assert err(dev, "log report 0x100000 0x10000 12288") == errno.EINVAL  # not a power of 2
    assert err(dev, "log report 0xfffffffffffff000 0x1000 4096") == errno.EOVERFLOW
    assert err(dev, "log report 0x0ff000 0x2000 4096") == errno.EINVAL  # before the span
    assert err(dev, "log report 0x10f000 0x2000 4096") == errno.EINVAL  # past the span
    assert err(dev, "log report 0x100000 0 4096") == errno.EINVAL
    bitmap = dev.dma.control("log report 0x100000 0x10000 4096")
    assert bitmap == struct.pack("<Q", (1 << 1) | (1 << 15))
    # REPORT reads and clears (the kernel's log_read_and_clear)
    assert dev.dma.control("log report 0x100000 0x10000 4096") == bytes(8)
    dev.dma_write(0x109000, b"d")
    # a report of part of the span, at 16 KiB per bit: page 9 is bit 1 of 0x104000..
    assert dev.dma.control("log report 0x104000 0xc000 16384") == struct.pack("<Q", 1 << 1)
    dev.reset()  # VFIO_DEVICE_RESET stops logging; mappings stay
    assert err(dev, "log report 0x100000 0x10000 4096") == errno.EINVAL
    assert len(dev.dma.mappings()) == 1


def test_dma_every_tracker_that_was_on_reports_each_written_page(mem: Memory) -> None:
    dev = device()
    dev.dma.control(f"map 0 {16 * K4} {PID} {mem.addr} rw")
    dev.dma.control("dirty iommu on")
    dev.dma_write(0, b"1")
    dev.dma.control("dirty type1 on")
    dev.dma.control("log start 4096 0:0x10000")
    dev.dma_write(K4, b"2")
    assert dev.dma.control("report iommu 0 0x10000 4096") == struct.pack("<Q", 0b11)
    assert dev.dma.control("report type1 0 0x10000 4096") == struct.pack("<Q", 0b10)
    assert dev.dma.control("log report 0 0x10000 4096") == struct.pack("<Q", 0b10)


def test_dma_text_shows_mappings_trackers_and_counters(mem: Memory) -> None:
    dev = device()
    dev.dma.control(f"map 0x1000 0x1000 {PID} {mem.addr:#x} r")
    dev.dma.control("dirty type1 on")
    text = dev.dma.text()
    assert f"map 0x1000 0x1000 {PID} {mem.addr:#x} r\n" in text
    assert "dirty type1 on pages 0\n" in text
    assert "dirty iommu off" in text
    assert "log off" in text
    assert "bytes_written 0" in text
    info = dev.info(with_digest=False)["dma"]
    assert isinstance(info, dict)
    assert info["trackers"] == {
        "iommu": {"on": False, "dirty_pages": 0},
        "type1": {"on": True, "dirty_pages": 0},
    }
    assert info["log"] is None


def test_ram_dma_rate_writes_writable_mappings_only_while_dma_is_allowed(mem: Memory) -> None:
    dev = device(dma_rate="400K", seed="3", flags="STOP_COPY+P2P+PRE_COPY")
    ro = Memory(4 * K4)
    dev.dma.control(f"map 0 {16 * K4} {PID} {mem.addr} rw")
    dev.dma.control(f"map 0x100000 {4 * K4} {PID} {ro.addr} r")
    dev.dma.control("dirty iommu on")
    assert dev.driver.has_workload()
    dev.advance(0.1)  # 400 KiB/s for 0.1 s: 10 pages of 4 KiB
    info = dev.dma.info()
    assert info["bytes_written"] == 10 * K4
    assert info["faults"] == 0
    assert mem[:] != bytes(16 * K4)
    assert ro[:] == bytes(4 * K4)
    dirty = dev.dma.control("report iommu 0 0x10000 4096") or b""
    assert 0 < words(dirty)[0] < 1 << 16
    snapshot = mem[:]
    dev.set_state(State.STOP)
    dev.advance(1.0)
    dev.set_state(State.RUNNING)
    assert mem[:] == snapshot  # nothing while stopped
    assert dev.dma.info()["bytes_written"] == info["bytes_written"]
    # RUNNING_P2P and PRE_COPY_P2P still master DMA (INTERFACES section 9).
    for state in (State.RUNNING_P2P, State.PRE_COPY_P2P):
        before = int(str(dev.dma.info()["bytes_written"]))
        dev.set_state(state)
        dev.advance(0.1)
        assert dev.dma.info()["bytes_written"] == before + 10 * K4, state
    dev.set_state(State.STOP)


def test_ram_dma_rate_is_deterministic_from_seed() -> None:
    outs = []
    for _ in range(2):
        m = Memory(16 * K4)
        dev = device(dma_rate="400K", seed="9")
        dev.dma.control(f"map 0 {16 * K4} {PID} {m.addr} rw")
        dev.advance(0.05)
        outs.append(m[:])
    assert outs[0] == outs[1]
    assert outs[0] != bytes(16 * K4)


def test_ram_dma_rate_builds_no_backlog_while_unmapped(mem: Memory) -> None:
    dev = device(dma_rate="400K", seed="1")
    dev.advance(10.0)  # nothing mapped: nothing to do, nothing owed
    dev.dma.control(f"map 0 {16 * K4} {PID} {mem.addr} rw")
    dev.advance(0.01)  # 1 page
    assert dev.dma.info()["bytes_written"] == K4


def test_ram_dma_window_keeps_dma_inside_it() -> None:
    m = Memory(64 * K4)
    dev = device(dma_rate="4M", seed="5", dma_window="64K:32K")
    dev.dma.control(f"map 0 {64 * K4} {PID} {m.addr} rw")
    dev.advance(0.1)  # 100 pages, all inside pages 16..23
    changed = {p for p in range(64) if m[p * K4 : (p + 1) * K4] != bytes(K4)}
    assert changed
    assert changed <= set(range(16, 24))
    for bad in ("16M", "16M:0", "1000:4K", "x:4K"):
        with pytest.raises(ConfigError, match=r"dma_window|invalid"):
            device(dma_window=bad)


def test_ram_dma_bus_master_required_waits_for_bus_master_enable(mem: Memory) -> None:
    dev = device(dma_rate="400K", seed="4", dma_bus_master="required")
    dev.dma.control(f"map 0 {16 * K4} {PID} {mem.addr} rw")
    dev.advance(1.0)
    assert dev.dma.info()["bytes_written"] == 0  # command register 0: no DMA, no backlog
    command = dev.config_read(4, 2)
    dev.config_write(4, memoryview(bytes([command[0] | 0x04, command[1]])))
    dev.advance(0.01)  # one page
    assert dev.dma.info()["bytes_written"] == K4
    with pytest.raises(ConfigError, match="dma_bus_master"):
        device(dma_bus_master="sometimes")


@pytest.mark.fuse
def test_dma_file_on_a_mount(fakevfio_mount: MountFactory) -> None:
    """The dma file through FUSE: errno of a bad command, the reply on the same handle."""
    m = Memory(16 * K4)
    with fakevfio_mount(["d0=ram:size=64K,seed=2,dma_rate=1M"]) as mount:
        dma = mount.device("d0") / "dma"
        assert mount.set_state("d0", "STOP") is None
        assert mount.write("d0", "dma", f"map 0 {16 * K4:#x} {PID} {m.addr:#x} rw\n") is None
        before = dma.read_text()
        assert mount.write("d0", "dma", "map 0 0x1000 1 0x1000 rw\n") == errno.EEXIST
        assert mount.write("d0", "dma", "bogus\n") == errno.EINVAL
        assert mount.write("d0", "faults", "dirty lose 101\n") == errno.EINVAL
        assert dma.read_text() == before
        assert mount.write("d0", "dma", "dirty iommu on\n") is None
        assert mount.set_state("d0", "RUNNING") is None
        deadline = time.monotonic() + 10
        while mount.info("d0")["dma"]["bytes_written"] < 4 * K4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert mount.set_state("d0", "STOP") is None
        changed = {p for p in range(16) if m[p * K4 : (p + 1) * K4] != bytes(K4)}
        fd = os.open(dma, os.O_RDWR)
        try:
            os.write(fd, b"report iommu 0 0x10000 4096 noclear\n")
            bitmap = os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        assert {i for i in range(64) if words(bitmap)[0] >> i & 1} == changed
        assert mount.write("d0", "faults", "dirty lose 100\n") is None
        fd = os.open(dma, os.O_RDWR)
        try:
            os.write(fd, b"report iommu 0 0x10000 4096\n")
            assert os.pread(fd, 4096, 0) == bytes(8)
        finally:
            os.close(fd)
