"""An emulated NIC at the simple driver level (:class:`fakevfio.driver.StateDriver`).

The device's whole migratable state is one byte array that is also its BAR
(region ``bar0``), so the driver only says how the bytes are laid out, what its
workload dirties, and how to check a stream; the core produces the stream,
does the pre-copy accounting and re-sends dirty pages (see
:mod:`fakevfio._stream`).

State / BAR layout (little-endian; every table starts on a 4 KiB page)::

    0x0000  registers page
            0x000 u32 ID register, reads 0x4E494331 ("NIC1"; writes ignored)
            0x008 u8[6] MAC address
            0x010 u32 control (bit 0 RX enable, bit 1 TX enable, bit 2 promiscuous)
            0x020 u32 rx_head, rx_tail, tx_head, tx_tail (ring indices < ring_size)
            0x040 u64 counters: rx_packets, rx_bytes, tx_packets, tx_bytes,
                  rx_dropped, irq_count
    0x1000  filter table: ``filters`` entries of 16 bytes
            (u8[6] MAC, u16 VLAN, u16 flags: bit 0 valid, bit 1 match VLAN; 6 reserved)
    RX_OFF  RX ring: ``ring_size`` descriptors of 16 bytes
            (u64 buffer address, u16 length, u16 flags: bit 0 DONE, bit 1 EOP; u32 sequence)
    TX_OFF  TX ring, same descriptors

Pre-copy: the core sends every page once as initial data (the rings and the
filter table are most of it and change slowly), while the ``pps=`` workload
writes ring descriptors and bumps the counters; the pages it touches are
re-sent as dirty data in pre-copy and stop-copy.

Known shortcoming: the core's stream format (version 1) carries no checksum, so
a bit flipped inside a ring descriptor's payload is loaded as is. Flips in the
stream or driver header, the record framing, the ID register, the ring indices
or a filter entry's reserved bits are rejected.
"""

from __future__ import annotations

import errno
import random
import struct
from collections.abc import Mapping
from typing import ClassVar

from fakevfio import MigFlags
from fakevfio.driver import OptionSpec, StateDriver
from fakevfio.errors import ConfigError, DeviceError

PAGE_BYTES = 4096
ID_VALUE = 0x4E494331
STREAM_MAGIC = b"FVNICDEV"
STREAM_VERSION = 1
DRIVER_HEADER = struct.Struct("<8sIII")  # magic, version, ring_size, filters

REG_ID = 0x000
REG_MAC = 0x008
REG_CTRL = 0x010
REG_RINGS = 0x020  # rx_head, rx_tail, tx_head, tx_tail
REG_COUNTERS = 0x040
COUNTERS = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "rx_dropped", "irq_count")
_U32 = struct.Struct("<I")
_RING_REGS = struct.Struct("<IIII")
_COUNTER_REGS = struct.Struct(f"<{len(COUNTERS)}Q")

FILTER = struct.Struct("<6sHH6x")
FILTER_VALID = 0x1
FILTER_MATCH_VLAN = 0x2
DESC = struct.Struct("<QHHI")
DESC_DONE = 0x1
DESC_EOP = 0x2

#: One workload tick handles at most this many packets; the rest count as rx_dropped.
MAX_PACKETS_PER_TICK = 1 << 16


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES


def _parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"MAC address {text!r} (expected six hex bytes like 52:54:00:12:34:56)")
    return bytes(int(p, 16) for p in parts)


class NicDriver(StateDriver):
    """A NIC with RX/TX rings, a MAC/VLAN filter table and counters in its BAR."""

    description = "NIC with rings, filter table and counters (StateDriver example)"
    options: ClassVar[Mapping[str, OptionSpec]] = {
        "ring_size": OptionSpec(
            kind="int", default="4096", help="descriptors per ring, a power of two in 16..65536"
        ),
        "filters": OptionSpec(kind="int", default="1024", help="filter table entries, 1..65536"),
        "pps": OptionSpec(
            kind="size", default="0", help="packets/s the workload receives and sends while running"
        ),
        "mac": OptionSpec(kind="str", default="52:54:00:12:34:56", help="initial MAC address"),
        "seed": OptionSpec(kind="int", default="0", help="workload random seed"),
    }
    stream_version = STREAM_VERSION
    page_size = PAGE_BYTES

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        super().__init__(name, options)
        ring = self.int_option("ring_size") or 0
        if not 16 <= ring <= 65536 or ring & (ring - 1):
            raise ConfigError(f"device {name}: ring_size must be a power of two in 16..65536")
        filters = self.int_option("filters") or 0
        if not 1 <= filters <= 65536:
            raise ConfigError(f"device {name}: filters must be in 1..65536")
        try:
            mac = _parse_mac(self.option("mac") or "")
        except ValueError as exc:
            raise ConfigError(f"device {name}: {exc}") from None
        self.ring_size = ring
        self.filters = filters
        self.pps = self.size_option("pps") or 0
        self.filter_off = PAGE_BYTES
        self.rx_off = self.filter_off + _pages(filters * FILTER.size)
        self.tx_off = self.rx_off + _pages(ring * DESC.size)
        self._size = self.tx_off + _pages(ring * DESC.size)
        self._state = bytearray(self._size)
        self._rng = random.Random(self.int_option("seed"))
        self._carry = 0.0
        self._seq = 0
        _U32.pack_into(self._state, REG_ID, ID_VALUE)
        self._state[REG_MAC : REG_MAC + 6] = mac
        _U32.pack_into(self._state, REG_CTRL, 0x3)
        FILTER.pack_into(self._state, self.filter_off, mac, 0, FILTER_VALID)
        FILTER.pack_into(self._state, self.filter_off + FILTER.size, b"\xff" * 6, 0, FILTER_VALID)

    @property
    def migration_flags(self) -> MigFlags:
        return MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY

    # -- StateDriver --------------------------------------------------------
    def state_size(self) -> int:
        return self._size

    def save_range(self, offset: int, length: int) -> bytes:
        return bytes(self._state[offset : offset + length])

    def load_range(self, offset: int, data: memoryview) -> None:
        self._state[offset : offset + len(data)] = data

    def header(self) -> bytes:
        return DRIVER_HEADER.pack(STREAM_MAGIC, self.stream_version, self.ring_size, self.filters)

    def check_header(self, header: bytes) -> None:
        if len(header) != DRIVER_HEADER.size:
            raise DeviceError(
                errno.EINVAL,
                f"nic header of {len(header)} bytes (expected {DRIVER_HEADER.size})",
                device=self.name,
            )
        magic, version, ring, filters = DRIVER_HEADER.unpack(header)
        if magic != STREAM_MAGIC:
            raise DeviceError(errno.EINVAL, f"not a nic stream (magic {magic!r})", device=self.name)
        if version != self.stream_version:
            raise DeviceError(
                errno.EOPNOTSUPP,
                f"nic stream version {version} (this driver loads version {self.stream_version})",
                device=self.name,
            )
        if (ring, filters) != (self.ring_size, self.filters):
            raise DeviceError(
                errno.EOPNOTSUPP,
                f"stream of a nic with ring_size={ring}, filters={filters} "
                f"(this device: ring_size={self.ring_size}, filters={self.filters})",
                device=self.name,
            )

    def validate(self) -> None:
        problem = self._inconsistency()
        if problem:
            raise DeviceError(
                errno.EINVAL, f"loaded nic state is inconsistent: {problem}", device=self.name
            )

    def _inconsistency(self) -> str:
        (ident,) = _U32.unpack_from(self._state, REG_ID)
        if ident != ID_VALUE:
            return f"ID register {ident:#x}"
        rings = _RING_REGS.unpack_from(self._state, REG_RINGS)
        if max(rings) >= self.ring_size:
            return f"ring index out of range: {rings}"
        for i in range(self.filters):
            start = self.filter_off + i * FILTER.size
            raw = self._state[start : start + FILTER.size]
            _mac, _vlan, flags = FILTER.unpack(raw)
            if flags & ~(FILTER_VALID | FILTER_MATCH_VLAN) or any(raw[10:]):
                return f"filter entry {i} has reserved bits set"
        return ""

    # -- PCI surface and BAR ----------------------------------------------
    # BAR0 (32-bit memory) is the power of two covering the state (the default
    # ``bars()``: 256 KiB for the default 151552 bytes; reads past the state are
    # zeros); INTA#, and four MSI-X vectors (rx, tx, link, other) whose table
    # and PBA the core puts in BAR5.
    interrupt_pin = 1
    msix_vectors = 4

    def regions(self) -> Mapping[str, int]:
        return {"bar0": self._size}

    def region_read(self, region: str, offset: int, size: int) -> bytes:
        return bytes(self._state[offset : offset + size])

    def region_write(self, region: str, offset: int, data: memoryview) -> None:
        start, end = offset, offset + len(data)
        self._state[start:end] = data
        if start < REG_ID + 4:  # the ID register is read-only
            _U32.pack_into(self._state, REG_ID, ID_VALUE)
        self.mark_dirty(offset, len(data))

    # -- workload -------------------------------------------------------
    def counters(self) -> dict[str, int]:
        values = _COUNTER_REGS.unpack_from(self._state, REG_COUNTERS)
        return dict(zip(COUNTERS, values, strict=True))

    def has_workload(self) -> bool:
        return self.pps > 0

    def advance(self, seconds: float) -> None:
        self._carry += self.pps * seconds
        packets = int(self._carry)
        self._carry -= packets
        if not packets:
            return
        counters = list(_COUNTER_REGS.unpack_from(self._state, REG_COUNTERS))
        rx_head, rx_tail, tx_head, tx_tail = _RING_REGS.unpack_from(self._state, REG_RINGS)
        handled = min(packets, MAX_PACKETS_PER_TICK)
        counters[4] += packets - handled
        rng = self._rng
        for _ in range(handled):
            length = rng.randrange(64, 1519)
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            if rng.random() < 0.5:
                off = self.rx_off + rx_head * DESC.size
                DESC.pack_into(
                    self._state,
                    off,
                    0x1000_0000 + rx_head * 2048,
                    length,
                    DESC_DONE | DESC_EOP,
                    self._seq,
                )
                rx_head = (rx_head + 1) % self.ring_size
                counters[0] += 1
                counters[1] += length
            else:
                off = self.tx_off + tx_tail * DESC.size
                DESC.pack_into(
                    self._state,
                    off,
                    0x2000_0000 + tx_tail * 2048,
                    length,
                    DESC_DONE | DESC_EOP,
                    self._seq,
                )
                tx_tail = (tx_tail + 1) % self.ring_size
                counters[2] += 1
                counters[3] += length
            self.mark_dirty(off, DESC.size)
        counters[5] += 1
        _RING_REGS.pack_into(self._state, REG_RINGS, rx_head, rx_tail, tx_head, tx_tail)
        _COUNTER_REGS.pack_into(self._state, REG_COUNTERS, *counters)
        self.mark_dirty(0, PAGE_BYTES)

    def info(self) -> Mapping[str, object]:
        return {"ring_size": self.ring_size, "filters": self.filters, **self.counters()}
