"""Tests of the edu example driver: its register model against QEMU's hw/misc/edu.c and
docs/specs/edu.rst, its DMA engine, its interrupts and its migration (in process).

The expected values come from QEMU's device: the identification 0x010000ed, the
liveness inversion, factorials in a 32-bit register (10! = 0x375f00), the
interrupt status bits 0x001 (factorial) and 0x100 (DMA), the access-size rules
(4 bytes below 0x80, 4 or 8 above, all ones otherwise), the 4096-byte buffer at
0x40000 and the DMA registers frozen while a transfer runs.
"""

from __future__ import annotations

import ctypes
import errno
import math
import mmap
import os
import struct
from collections.abc import Mapping

import pytest
from fakevfio_edu import DMA_BUFFER, IDENTIFICATION, EduDriver
from fakevfio_edu.driver import (
    DRIVER_HEADER,
    STREAM_MAGIC,
    factorial_u32,
)

from fakevfio import State
from fakevfio.driver import IRQ_MSI
from fakevfio.errors import ConfigError, DeviceError
from fakevfio.testing import (
    DRIVER_HEADER_OFFSET,
    LocalDevice,
    check_state_driver,
)

Edu = LocalDevice[EduDriver]
FAST = {"dma_delay_ms": "0"}
RAM = 0x100000  # an IOVA of the fake host's memory


class FakeHost:
    """What the driver reaches through raise_irq/set_intx/dma_read/dma_write, recorded.

    Memory is one window of ``size`` bytes at IOVA ``base``; outside it is a DMA
    fault, as the core's Dma raises it (EFAULT).
    """

    def __init__(self, base: int = RAM, size: int = 0x10000) -> None:
        self.base = base
        self.memory = bytearray(size)
        self.calls: list[tuple[str, object]] = []

    def _window(self, iova: int, length: int) -> slice:
        if iova < self.base or iova + length > self.base + len(self.memory):
            raise DeviceError(errno.EFAULT, f"DMA at {iova:#x}: nothing is mapped", device="t")
        return slice(iova - self.base, iova - self.base + length)

    def irq_enabled(self, index: int) -> bool:
        """INTx is what the VMM enabled (what a driver API with ``irq_enabled`` would ask)."""
        return index == 0

    def raise_irq(self, index: int, vector: int) -> None:
        self.calls.append(("raise", index))

    def set_intx(self, asserted: bool) -> None:
        self.calls.append(("intx", asserted))

    def dma_read(self, iova: int, length: int) -> bytes:
        self.calls.append(("read", (iova, length)))
        return bytes(self.memory[self._window(iova, length)])

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        window = self._window(iova, len(data))
        self.calls.append(("write", (iova, len(data))))
        self.memory[window] = data

    def take(self) -> list[tuple[str, object]]:
        calls, self.calls = self.calls, []
        return calls


def make(options: Mapping[str, str] = FAST, name: str = "src") -> tuple[Edu, FakeHost]:
    dev = LocalDevice(EduDriver(name, dict(options)))
    host = FakeHost()
    dev.driver._host = host
    return dev, host


def r32(dev: Edu, offset: int) -> int:
    value: int = struct.unpack("<I", dev.region_read("bar0", offset, 4))[0]
    return value


def r64(dev: Edu, offset: int) -> int:
    value: int = struct.unpack("<Q", dev.region_read("bar0", offset, 8))[0]
    return value


def w32(dev: Edu, offset: int, value: int) -> None:
    dev.region_write("bar0", offset, struct.pack("<I", value))


def w64(dev: Edu, offset: int, value: int) -> None:
    dev.region_write("bar0", offset, struct.pack("<Q", value))


def dma(dev: Edu, src: int, dst: int, count: int, cmd: int) -> None:
    w64(dev, 0x80, src)
    w64(dev, 0x88, dst)
    w64(dev, 0x90, count)
    w32(dev, 0x98, cmd)


# -- the PCI surface -------------------------------------------------------------------
def test_edu_pci_identity_is_qemus() -> None:
    cfg = EduDriver("e", {}).initial_config()
    assert cfg[0:4] == bytes.fromhex("3412e811")  # 1234:11e8
    assert cfg[0x08] == 0x10  # revision
    assert cfg[0x09:0x0C] == bytes([0x00, 0xFF, 0x00])  # prog-if 0, PCI_CLASS_OTHERS 0x00ff
    assert cfg[0x3D] == 1  # INTA
    driver = EduDriver("e", {})
    assert (driver.interrupt_pin, driver.msi_vectors, driver.msix_vectors) == (1, 1, 0)
    assert driver.regions() == {"bar0": 1 << 20}
    assert driver.bars()[0].size == 1 << 20


# -- registers ---------------------------------------------------------------------------
def test_edu_identification_and_liveness() -> None:
    dev, _ = make()
    assert r32(dev, 0x00) == IDENTIFICATION == 0x010000ED
    w32(dev, 0x00, 0)  # read-only
    assert r32(dev, 0x00) == IDENTIFICATION
    assert r32(dev, 0x04) == 0
    w32(dev, 0x04, 0x12345678)
    assert r32(dev, 0x04) == 0xEDCBA987
    w32(dev, 0x04, 0)
    assert r32(dev, 0x04) == 0xFFFFFFFF


def test_edu_access_sizes_follow_edu_c() -> None:
    dev, _ = make()
    w32(dev, 0x04, 0x0F0F0F0F)
    # Narrower than 4 bytes or unaligned: QEMU's memory core refuses it, the guest reads 0
    # (QEMU's own edu, booted by tests/guest/test_guest_edu.py, shows the same).
    assert dev.region_read("bar0", 0x04, 2) == b"\0\0"
    assert dev.region_read("bar0", 0x04, 1) == b"\0"
    assert dev.region_read("bar0", 0x00, 8) == b"\xff" * 8  # below 0x80 edu.c takes 4 bytes
    dev.region_write("bar0", 0x04, b"\x00\x00")  # ignored
    dev.region_write("bar0", 0x00, struct.pack("<Q", 0))  # 8 bytes at 0x04's dword: ignored
    assert r32(dev, 0x04) == 0xF0F0F0F0
    w64(dev, 0x80, 0x1_2345_6000)  # above 0x80: 8 bytes
    assert r64(dev, 0x80) == 0x1_2345_6000
    assert r32(dev, 0x80) == 0x2345_6000  # a 4-byte read gives the low half
    assert r32(dev, 0x84) == 0xFFFFFFFF  # no register at 0x84
    w32(dev, 0x80, 0x1000)  # a 4-byte write zero-extends
    assert r64(dev, 0x80) == 0x1000
    assert r32(dev, 0x60) == 0xFFFFFFFF  # write-only
    assert r32(dev, DMA_BUFFER) == 0xFFFFFFFF  # the buffer is not MMIO
    assert dev.region_read("bar0", 0x02, 4) == bytes(4)  # unaligned
    assert dev.region_read("bar0", 0x84, 8) == bytes(8)
    dev.region_write("bar0", 0x06, struct.pack("<I", 0))  # unaligned: ignored
    assert r32(dev, 0x04) == 0xF0F0F0F0
    # A wide read is what the kernel's split into dwords reads.
    wide = dev.region_read("bar0", 0, 16)
    assert wide == struct.pack("<IIII", IDENTIFICATION, 0xF0F0F0F0, 0, 0xFFFFFFFF)
    assert dev.region_read("bar0", 2, 12) == bytes(2) + wide[4:12] + bytes(2)


def test_edu_factorial_of_ten_and_its_status_bit() -> None:
    dev, host = make()
    w32(dev, 0x08, 10)
    assert r32(dev, 0x20) & 0x01  # computing
    assert dev.driver.has_workload()
    w32(dev, 0x08, 5)  # ignored while computing
    w32(dev, 0x20, 0x01)  # the computing bit is read-only
    assert r32(dev, 0x08) == 10
    dev.advance(0.02)
    assert r32(dev, 0x20) == 0
    assert r32(dev, 0x08) == 3628800 == 0x375F00
    assert not dev.driver.has_workload()
    assert r32(dev, 0x24) == 0  # no interrupt asked for
    assert host.take() == []
    w32(dev, 0x08, 13)  # 13! = 6227020800 does not fit: the register wraps
    dev.advance(0.02)
    assert r32(dev, 0x08) == math.factorial(13) % 2**32


def test_edu_factorial_wraps_like_a_u32() -> None:
    for n in range(40):
        assert factorial_u32(n) == math.factorial(n) % 2**32
    assert factorial_u32(0xFFFFFFFF) == 0


def test_edu_factorial_delay_counts_in_ticks() -> None:
    dev, _ = make({"fact_delay_ms": "50"})
    w32(dev, 0x08, 4)
    dev.advance(0.04)
    assert r32(dev, 0x20) & 0x01
    dev.advance(0.01)
    assert r32(dev, 0x20) == 0
    assert r32(dev, 0x08) == 24


def test_edu_factorial_interrupt_is_a_level_on_intx() -> None:
    dev, host = make()
    w32(dev, 0x20, 0x80)  # raise an interrupt when done
    assert r32(dev, 0x20) == 0x80
    w32(dev, 0x08, 3)
    dev.advance(0.02)
    assert r32(dev, 0x08) == 6
    assert r32(dev, 0x24) == 0x001
    assert ("intx", True) in host.take()
    w32(dev, 0x64, 0x001)
    assert r32(dev, 0x24) == 0
    assert host.take() == [("intx", False)]
    w32(dev, 0x20, 0)  # clears the interrupt-on-completion bit
    w32(dev, 0x08, 3)
    dev.advance(0.02)
    assert r32(dev, 0x24) == 0
    assert host.take() == []


def test_edu_raise_and_acknowledge() -> None:
    dev, host = make()
    w32(dev, 0x60, 0x5)
    assert r32(dev, 0x24) == 0x5
    # Without irq_enabled in the driver API edu signals both and the core drops MSI.
    both = dev.driver.irq_mode() == "intx+msi"
    assert host.take() == [("raise", IRQ_MSI)] * both + [("intx", True)]
    w32(dev, 0x60, 0x8)  # ORed in
    assert r32(dev, 0x24) == 0xD
    host.take()
    w32(dev, 0x64, 0x1)
    assert r32(dev, 0x24) == 0xC
    assert host.take() == []  # still asserted
    w32(dev, 0x64, 0xFFFFFFFF)
    assert r32(dev, 0x24) == 0
    assert host.take() == [("intx", False)]
    w32(dev, 0x60, 0)  # raising nothing signals nothing
    assert host.take() == []
    assert dev.driver.counters()["irqs_raised"] == 2


class _MsiEdu(EduDriver):
    """An edu whose core says which interrupt the VMM enabled."""

    msi_on = True

    def irq_enabled(self, index: int) -> bool:
        return self.msi_on if index == IRQ_MSI else not self.msi_on


def test_edu_with_msi_enabled_sends_one_message_per_raise() -> None:
    dev = LocalDevice(_MsiEdu("m", {}))
    host = FakeHost()
    dev.driver._host = host
    w32(dev, 0x60, 0x1)
    w32(dev, 0x60, 0x2)
    assert host.take() == [("raise", IRQ_MSI), ("raise", IRQ_MSI)]
    w32(dev, 0x64, 0x3)
    assert host.take() == []  # an MSI is not lowered
    dev.driver.msi_on = False
    w32(dev, 0x60, 0x1)
    assert host.take() == [("intx", True)]
    assert dev.driver.info()["interrupt_mode"] == "intx"


def test_edu_undelivered_interrupt_is_counted_not_fatal() -> None:
    dev = LocalDevice(EduDriver("u", {}))

    class Refusing(FakeHost):
        def set_intx(self, asserted: bool) -> None:
            raise DeviceError(errno.EINVAL, "no trigger", device="u")

    dev.driver._host = Refusing()
    w32(dev, 0x60, 0x1)
    assert r32(dev, 0x24) == 0x1
    info = dev.driver.info()
    assert info["irq_undelivered"] == 1
    assert "no trigger" in str(info["last_irq_error"])


# -- the DMA engine ------------------------------------------------------------------------
def test_edu_dma_ram_to_device_and_back() -> None:
    dev, host = make()
    pattern = os.urandom(4096)
    host.memory[0:4096] = pattern
    dma(dev, RAM, DMA_BUFFER, 4096, 0x1)
    assert r32(dev, 0x98) & 1  # running until the tick
    dev.advance(0.02)
    assert r32(dev, 0x98) == 0x0
    assert dev.driver.buffer == pattern
    dma(dev, DMA_BUFFER + 96, RAM + 0x2000 + 8, 100, 0x3)  # device -> RAM, part of the buffer
    dev.advance(0.02)
    assert host.memory[0x2000 + 8 : 0x2000 + 108] == pattern[96:196]
    assert host.memory[0x2000 : 0x2000 + 8] == bytes(8)
    counters = dev.driver.counters()
    assert counters["dma_transfers"] == 2
    assert counters["dma_bytes_to_device"] == 4096
    assert counters["dma_bytes_to_ram"] == 100
    assert r32(dev, 0x24) == 0  # bit 2 not set: no interrupt


def test_edu_dma_interrupt_and_frozen_registers() -> None:
    dev, host = make({"dma_delay_ms": "100"})
    dma(dev, RAM, DMA_BUFFER, 16, 0x1 | 0x4)
    w64(dev, 0x80, 0xDEAD000)  # ignored while running
    w64(dev, 0x90, 1)
    w32(dev, 0x98, 0x3)  # a second start is ignored too
    assert (r64(dev, 0x80), r64(dev, 0x90), r64(dev, 0x98)) == (RAM, 16, 0x5)
    dev.advance(0.05)
    assert r32(dev, 0x98) & 1
    dev.advance(0.05)
    assert r32(dev, 0x98) == 0x4
    assert r32(dev, 0x24) == 0x100
    assert ("intx", True) in host.take()
    w32(dev, 0x98, 0x6)  # without the start bit: nothing happens
    assert r32(dev, 0x98) == 0x4
    assert not dev.driver.has_workload()


def test_edu_dma_outside_the_buffer_moves_nothing() -> None:
    dev, host = make()
    host.memory[0:16] = b"x" * 16
    for dst, count in ((DMA_BUFFER - 4, 16), (DMA_BUFFER + 4090, 16), (DMA_BUFFER, 4097)):
        dma(dev, RAM, dst, count, 0x1 | 0x4)
        dev.advance(0.02)
        assert r32(dev, 0x98) == 0x4  # completes anyway, as edu.c does
        assert r32(dev, 0x24) == 0x100
        w32(dev, 0x64, 0x100)
    assert dev.driver.buffer == bytes(4096)
    assert dev.driver.counters()["dma_range_errors"] == 3
    assert not any(name == "read" for name, _ in host.take())
    assert "outside the buffer" in str(dev.driver.info()["last_dma_error"])


def test_edu_dma_fault_leaves_the_buffer_and_still_completes() -> None:
    dev, host = make()
    host.memory[0:8] = b"original"
    dma(dev, RAM, DMA_BUFFER, 8, 0x1)
    dev.advance(0.02)
    dma(dev, 0x9000000, DMA_BUFFER, 8, 0x1 | 0x4)  # nothing mapped there
    dev.advance(0.02)
    assert dev.driver.buffer[:8] == b"original"
    assert r32(dev, 0x98) == 0x4
    assert r32(dev, 0x24) == 0x100
    counters = dev.driver.counters()
    assert (counters["dma_faults"], counters["dma_transfers"]) == (1, 1)
    assert "nothing is mapped" in str(dev.driver.info()["last_dma_error"])


def test_edu_dma_mask_clamps_the_ram_address() -> None:
    dev, host = make()
    host.memory[0:4] = b"abcd"
    dma(dev, (1 << 28) | RAM, DMA_BUFFER, 4, 0x1)  # bit 28 is outside the default mask
    dev.advance(0.02)
    assert host.take()[0] == ("read", (RAM, 4))
    assert dev.driver.buffer[:4] == b"abcd"
    wide, host = make({**FAST, "dma_mask": str((1 << 64) - 1)})
    dma(wide, (1 << 28) | RAM, DMA_BUFFER, 4, 0x1)
    wide.advance(0.02)
    assert wide.driver.counters()["dma_faults"] == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dma_mask": "0"}, "dma_mask"),
        ({"dma_delay_ms": "-1"}, "dma_delay_ms"),
        ({"fact_delay_ms": "60001"}, "fact_delay_ms"),
        ({"dma_mask": "lots"}, "not an integer"),
        ({"speed": "1"}, "unknown option"),
    ],
)
def test_edu_rejects_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EduDriver("bad", options)


# -- migration ---------------------------------------------------------------------------
def test_edu_follows_the_driver_rules() -> None:
    def factory(name: str) -> EduDriver:
        driver = EduDriver(name, FAST)
        driver._host = FakeHost()
        driver.mmio_write(0x04, 4, 0x1234)
        driver.mmio_write(0x08, 4, 7)  # computing: the workload finishes it
        return driver

    check_state_driver(factory, dest_factory=lambda name: EduDriver(name, FAST))


def _busy_source() -> tuple[Edu, FakeHost, bytes]:
    src, host = make()
    pattern = os.urandom(4096)
    host.memory[0:4096] = pattern
    dma(src, RAM, DMA_BUFFER, 4096, 0x1)
    src.advance(0.02)
    w32(src, 0x04, 0xA5A5A5A5)
    w32(src, 0x20, 0x80)
    w32(src, 0x08, 10)
    src.advance(0.02)
    w32(src, 0x60, 0x40)
    return src, host, pattern


def test_edu_migration_carries_registers_and_buffer() -> None:
    src, _, pattern = _busy_source()
    stream = src.save()
    dst, dst_host = make(name="dst")
    assert dst.digest() != src.digest()
    dst.load(stream)
    assert dst.digest() == src.digest()
    assert dst.driver.buffer == pattern
    assert (r32(dst, 0x04), r32(dst, 0x08), r32(dst, 0x20)) == (0x5A5A5A5A, 3628800, 0x80)
    assert r32(dst, 0x24) == 0x41
    # The destination drives the line it loaded asserted once it runs (STOP ->
    # RUNNING_P2P -> RUNNING), and DMAs the buffer back out.
    assert dst_host.take() == []
    dst.set_state(State.RUNNING)
    assert dst_host.take() == [("intx", True)]
    dma(dst, DMA_BUFFER, RAM + 0x4000, 4096, 0x3)
    dst.advance(0.02)
    assert bytes(dst_host.memory[0x4000:0x5000]) == pattern


def test_edu_dma_in_flight_finishes_on_the_source_before_stop() -> None:
    src, host = make({"dma_delay_ms": "60000"})
    pattern = os.urandom(4096)
    host.memory[0:4096] = pattern
    dma(src, RAM, DMA_BUFFER, 4096, 0x1 | 0x4)
    w32(src, 0x08, 6)
    src.advance(0.02)  # the factorial is done, the DMA still has a minute to go
    assert r32(src, 0x98) & 1
    assert src.set_state(State.PRE_COPY)
    first = src.drain()  # the initial data: the buffer is still empty
    src.set_state(State.STOP_COPY)  # PRE_COPY -> PRE_COPY_P2P completes it
    assert r32(src, 0x98) == 0x4
    assert r32(src, 0x24) == 0x100
    assert src.driver.buffer == pattern
    assert ("intx", True) in host.take()
    rest = src.drain()
    assert rest  # the pages the completion changed go again
    src.set_state(State.STOP)
    dst, _ = make(name="dst")
    dst.load(first + rest)
    assert dst.digest() == src.digest()
    assert dst.driver.buffer == pattern
    assert not dst.driver.has_workload()


def test_edu_work_latched_while_stopped_resumes_on_the_destination() -> None:
    src, host = make()
    host.memory[0:4] = b"late"
    src.set_state(State.STOP)
    dma(src, RAM, DMA_BUFFER, 4, 0x1)  # a misbehaving VMM writes in STOP
    src.advance(1.0)  # the core does not tick a stopped device; neither does the driver
    assert r32(src, 0x98) & 1
    stream = src.save()
    dst, dst_host = make(name="dst")
    dst_host.memory[0:4] = b"dest"
    dst.load(stream)
    assert r32(dst, 0x98) & 1
    dst.advance(0.02)  # STOP: no tick
    assert r32(dst, 0x98) & 1
    dst.set_state(State.RUNNING)
    dst.advance(0.02)
    assert dst.driver.buffer[:4] == b"dest"  # the destination's memory, restarted there
    assert r32(dst, 0x98) == 0


def _stream_with_header(src: Edu, header: bytes) -> bytes:
    stream = bytearray(src.save())
    stream[DRIVER_HEADER_OFFSET : DRIVER_HEADER_OFFSET + DRIVER_HEADER.size] = header
    return bytes(stream)


@pytest.mark.parametrize(
    ("header", "err"),
    [
        (DRIVER_HEADER.pack(b"FVNICDEV", 1, 0xFFFFFFF), errno.EINVAL),
        (DRIVER_HEADER.pack(STREAM_MAGIC, 2, 0xFFFFFFF), errno.EOPNOTSUPP),
        (DRIVER_HEADER.pack(STREAM_MAGIC, 1, 0xFFFFFFFF), errno.EOPNOTSUPP),
    ],
)
def test_edu_rejects_other_streams(header: bytes, err: int) -> None:
    src, _, _ = _busy_source()
    dst, _ = make(name="dst")
    before = dst.digest()
    with pytest.raises(DeviceError) as info:
        dst.load(_stream_with_header(src, header))
    assert info.value.errno == err
    assert dst.digest() == before


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0x00, b"\x00", "identification"),
        (0x0C, b"\x02", "reserved bits"),
        (0x200, b"\x01", "reserved register bytes"),
        (0x38, b"\x01", "DMA time left"),
    ],
)
def test_edu_validate_rejects_inconsistent_state(offset: int, value: bytes, message: str) -> None:
    src, _, _ = _busy_source()
    good = src.save()
    src.driver._state[offset : offset + len(value)] = value  # a source with a broken state
    bad = src.save()  # a well-formed stream (the core's CRC is right) of that state
    dst, _ = make(name="dst")
    dst.start_load(bad)
    with pytest.raises(DeviceError, match=message) as info:
        dst.set_state(State.STOP)
    assert info.value.errno == errno.EINVAL
    assert dst.state() is State.RESUMING
    fresh, _ = make(name="fresh")
    fresh.load(good)  # the same device's good stream loads
    assert fresh.driver.buffer == src.driver.buffer


def test_edu_reset_returns_to_power_on() -> None:
    src, host, _ = _busy_source()
    host.take()
    src.reset()
    assert (r32(src, 0x04), r32(src, 0x08), r32(src, 0x20), r32(src, 0x24)) == (0, 0, 0, 0)
    assert src.driver.buffer == bytes(4096)
    assert r32(src, 0x00) == IDENTIFICATION
    assert ("intx", False) in host.take()
    assert src.driver.counters()["dma_transfers"] == 1  # counters stay


# -- real DMA through the core -------------------------------------------------------------
def test_edu_dma_reaches_this_process_memory_through_the_core() -> None:
    from fakevfio._device import Device
    from fakevfio._process import OsServices

    driver = EduDriver("real", FAST)
    device = Device("real", "edu", driver, 0, host=OsServices())
    dev = LocalDevice(driver, _device=device)
    memory = mmap.mmap(-1, 0x2000)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    pattern = os.urandom(4096)
    memory[0:4096] = pattern
    try:
        with device.lock:
            device.dma.control(f"map 0x{RAM:x} 0x2000 {os.getpid()} 0x{address:x} rw")
    except DeviceError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            pytest.skip(f"the core's DMA is not built: {exc}")
        raise
    dma(dev, RAM, DMA_BUFFER, 4096, 0x1)
    dev.advance(0.02)
    assert dev.region_read("bar0", 0x98, 4) == b"\0\0\0\0"
    dma(dev, DMA_BUFFER, RAM + 0x1000, 4096, 0x3)
    dev.advance(0.02)
    assert memory[0x1000:0x2000] == pattern
    dma(dev, RAM + 0x3000, DMA_BUFFER, 4096, 0x1)  # past the mapping: a DMA fault
    dev.advance(0.02)
    assert dev.driver.counters()["dma_faults"] == 1
    assert dev.driver.buffer == pattern
    with device.lock:
        device.dma.control("unmap all")


# -- interrupts through the core's vfio-pci model -------------------------------------------
def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_edu_intx_level_through_the_cores_automask() -> None:
    """vfio-pci's INTx (vfio_pci_intrs.c): a signal masks the line until UNMASK; an UNMASK
    while edu still holds the line asserted signals again; once acknowledged, it unmasks."""
    from fakevfio._device import Device
    from fakevfio._process import OsServices

    driver = EduDriver("irq", FAST)
    device = Device("irq", "edu", driver, 0, host=OsServices())
    dev = LocalDevice(driver, _device=device)
    trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with device.lock:
            device.irqs.control(f"set intx trigger 0 1 eventfd {os.getpid()}:{trigger}")
        w32(dev, 0x60, 0x1)
        assert _eventfd_count(trigger) == 1
        w32(dev, 0x60, 0x2)  # already asserted and masked: nothing new
        assert _eventfd_count(trigger) == 0
        with device.lock:
            device.irqs.control("set intx unmask 0 1 none")
        assert _eventfd_count(trigger) == 1  # still asserted: signalled again
        w32(dev, 0x64, 0x3)  # acknowledged: the line drops
        with device.lock:
            device.irqs.control("set intx unmask 0 1 none")
        assert _eventfd_count(trigger) == 0
        w32(dev, 0x60, 0x100)  # unmasked now: the next raise signals at once
        assert _eventfd_count(trigger) == 1
        line = device.irqs.info()["intx"]
        assert isinstance(line, dict)
        assert line["asserted"] is True
        assert driver.info()["irq_undelivered"] == 0
    finally:
        with device.lock:
            device.irqs.close()
        os.close(trigger)
