"""The PCI surface of one emulated device: config space, capabilities and BARs.

Theory of operation
-------------------
A driver *declares* its PCI surface (``bars()``, ``interrupt_pin``,
``msi_vectors``, ``msix_vectors``, ``msix_bar``, ``pcie``, ``config_size``) and
gives the bytes it owns in ``initial_config()`` (vendor, device, class,
revision, subsystem, ...). :meth:`PciLayout.from_driver` checks the
declarations and places everything; :class:`PciSpace` is the config space a
VMM sees through vfio-pci (``drivers/vfio/pci/vfio_pci_config.c``): the
hardware's read-only and write-one-to-clear bits plus the kernel's
virtualisation of the fields a VMM touches. Pure: no I/O, no clock.

Rule 1: BARs. Each BAR's size is a power of two, at least 4 KiB for memory and
        4 bytes for I/O; a 32-bit memory BAR is at most 2 GiB; a 64-bit BAR takes
        two registers (index 0..4, the next index declares nothing); I/O BARs
        are never prefetchable. The driver's region ``barN`` is the backing of
        BAR N and may be smaller than the BAR (never larger): accesses past the
        backing read zeros and drop writes; accesses past the BAR fail.
Rule 2: MSI-X. With ``msix_vectors`` the core adds a dedicated 32-bit memory BAR
        (index ``msix_bar``, default: the highest free index, so the driver's
        own BARs keep their numbers and low indexes stay free) holding the table
        at offset 0 (16 bytes per vector, every vector masked at reset) and the
        PBA at the next 4 KiB boundary; the BAR is at least 4 KiB.
Rule 3: the capability list is built by the core at 0x60 (0x40..0x5f are the
        device's own bytes, raw read-write), in this order: MSI
        (64-bit address, no per-vector masking), MSI-X, PCI Express (version 2
        endpoint; needs ``config_size`` 4096, the extended list at 0x100 is
        empty). Status bit 4 (capabilities list) is set iff there is one; 0x34
        points at the first. These bytes, the BAR registers, the expansion ROM
        register (no ROM: 0) and the interrupt pin overwrite what
        ``initial_config()`` has there; every other byte is the driver's.
Rule 4: writes, byte by byte as the kernel's 1/2/4-byte accesses compose: a
        bit changes only where the field is writable (vfio_pci_config.c's
        write masks and the hardware's): command (IO, MEMORY, MASTER, PARITY,
        SERR, INTX_DISABLE), status (write one to clear bits 8, 11..15), cache
        line size, latency timer, interrupt line, BARs, MSI control (enable and
        multiple-message enable; the enable sticks only while MSI is enabled by
        SET_IRQS, ``msi_active``; a queue size above the capable one is clamped
        to it), MSI address and data, PCIe device control (not phantom
        functions; initiate-FLR reads back 0) and device control 2 (not ARI),
        PCIe device status (write one to clear). Bytes outside the header and
        every capability are raw read-write, as vfio-pci passes them to the
        hardware. MSI-X and everything else read-only: writes are dropped.
Rule 5: a BAR register reads ``written & ~(size - 1) | type bits`` (a sizing
        probe of all-ones reads the size mask); the upper register of a 64-bit
        BAR reads ``written & upper half of the mask``; BARs the device does not
        implement read 0.
Rule 6: config loads are placed relative to the data stream. Every config write
        while the device is RESUMING is counted in :attr:`PciSpace.resume_writes`
        with the resuming session's byte position and whether the loading
        stream had reached its END record (known for ``StateDriver`` streams;
        an ``ArcDriver``'s stream has no END the core can see). A write that
        lands before END -- a VMM that loads config before the data, which QEMU
        never does -- is also one line in ``migration/log``:
        ``CONFIG-EARLY OFFSET SIZE at POSITION`` (offset in hex, position = data
        bytes written in this session so far). Loads after END log nothing, so
        a correct migration's log stays one line per arc.
"""

from __future__ import annotations

import collections
import errno
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import attrs

from fakevfio._stream import StateLoadStream
from fakevfio.driver._base import ArcDriver, Bar, BarKind, LoadStream
from fakevfio.errors import DeviceError
from vfio_uapi.fsm import State

if TYPE_CHECKING:
    from fakevfio._device import Device

_Bad = Callable[[str], ValueError]

# -- the PCI header (include/uapi/linux/pci_regs.h) -------------------------
VENDOR_ID = 0x00
COMMAND = 0x04
STATUS = 0x06
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BASE_ADDRESS_0 = 0x10
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
STD_HEADER_SIZEOF = 0x40
#: Where the core's capability list starts: 0x40..0x5f stay device-specific bytes.
CAP_START = 0x60
CFG_SPACE_SIZE = 256

COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
COMMAND_MASTER = 0x4
COMMAND_PARITY = 0x40
COMMAND_SERR = 0x100
COMMAND_INTX_DISABLE = 0x400
COMMAND_WRITABLE = (
    COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE
)
STATUS_CAP_LIST = 0x10
#: master data parity error, signaled/received target abort, received master abort,
#: signaled system error, detected parity error
STATUS_W1C = 0x0100 | 0x0800 | 0x1000 | 0x2000 | 0x4000 | 0x8000

BAR_SPACE_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8

CAP_ID_MSI = 0x05
CAP_ID_EXP = 0x10
CAP_ID_MSIX = 0x11

MSI_FLAGS = 2
MSI_FLAGS_ENABLE = 0x1
MSI_FLAGS_QMASK = 0x0E
MSI_FLAGS_QSIZE = 0x70
MSI_FLAGS_64BIT = 0x80
MSI_CAP_LEN = 14  # id, next, flags, address lo, address hi, data (64-bit, no masking)

MSIX_FLAGS = 2
MSIX_TABLE = 4
MSIX_PBA = 8
MSIX_CAP_LEN = 12
MSIX_ENTRY_SIZE = 16
MSIX_ENTRY_VECTOR_CTRL = 12
MSIX_ENTRY_CTRL_MASKBIT = 0x1

EXP_FLAGS = 2
EXP_DEVCAP = 4
EXP_DEVCTL = 8
EXP_DEVSTA = 10
EXP_LNKCAP = 12
EXP_LNKSTA = 18
EXP_DEVCTL2 = 40
EXP_CAP_LEN = 0x3C  # PCI_CAP_EXP_ENDPOINT_SIZEOF_V2
EXP_FLAGS_V2_ENDPOINT = 0x0002  # version 2, device/port type 0 (PCI Express endpoint)
EXP_DEVCAP_RBER = 0x8000
EXP_DEVCTL_DEFAULT = 0x2810  # max read request 512 bytes, relaxed ordering, no snoop
EXP_DEVCTL_PHANTOM = 0x0200
EXP_DEVCTL_BCR_FLR = 0x8000
EXP_DEVCTL2_ARI = 0x0020
EXP_LINK_X1_2_5GT = 0x0011  # link speed 2.5 GT/s, width x1

PAGE = 4096
MAX_MSIX_VECTORS = 2048
MSI_VECTOR_COUNTS = (1, 2, 4, 8, 16, 32)
BAR_COUNT = 6


@attrs.frozen(kw_only=True)
class Msix:
    """Where the MSI-X table and PBA live (Rule 2)."""

    bar: int
    vectors: int
    table_offset: int = 0
    pba_offset: int

    @property
    def table_size(self) -> int:
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return (self.vectors + 63) // 64 * 8


@attrs.frozen(kw_only=True)
class Capability:
    """One capability of the standard list."""

    id: int
    offset: int
    length: int


@attrs.frozen(kw_only=True)
class PciLayout:
    """The checked declarations of one device (Rules 1-3)."""

    config_size: int
    bars: Mapping[int, Bar]
    #: BAR index -> bytes of driver backing (region ``barN``; 0 for the MSI-X BAR)
    backing: Mapping[int, int]
    msix: Msix | None
    capabilities: tuple[Capability, ...]
    interrupt_pin: int
    msi_vectors: int
    pcie: bool

    @classmethod
    def from_driver(cls, driver: ArcDriver, config_size: int) -> PciLayout:
        """Check and place the driver's declarations.

        Raises:
            ValueError: a declaration breaks Rule 1, 2 or 3 (a driver bug; the
                message names the driver's device and what to change).
        """

        def bad(message: str) -> ValueError:
            return ValueError(f"device {driver.name}: {message}")

        bars = dict(driver.bars())
        regions = dict(driver.regions())
        for index, bar in bars.items():
            _check_bar(index, bar, bars, bad)
        backing: dict[int, int] = {}
        for region, size in regions.items():
            number = bar_index(region)
            if number is None:
                continue
            if number not in bars:
                raise bad(f"region {region} has no BAR: declare it in bars()")
            if size > bars[number].size:
                raise bad(
                    f"region {region} ({size} bytes) is larger than BAR {number} "
                    f"({bars[number].size} bytes): declare a larger power-of-two Bar size"
                )
            backing[number] = size
        pin, msi, msix_n = driver.interrupt_pin, driver.msi_vectors, driver.msix_vectors
        if pin not in range(5):
            raise bad(f"interrupt_pin {pin} (expected 0 for none or 1..4 for INTA..INTD)")
        if msi and msi not in MSI_VECTOR_COUNTS:
            raise bad(f"msi_vectors {msi} (expected 0 or a power of two 1..32)")
        if msix_n not in range(MAX_MSIX_VECTORS + 1):
            raise bad(f"msix_vectors {msix_n} (expected 0..{MAX_MSIX_VECTORS})")
        if driver.pcie and config_size != PAGE:
            raise bad("a PCI Express device (pcie=True) needs config_size 4096")
        msix = None
        if msix_n:
            msix = _place_msix(driver.msix_bar, msix_n, bars, bad)
            bars[msix.bar] = Bar(size=_msix_bar_size(msix))
            backing[msix.bar] = 0
        caps: list[Capability] = []
        offset = CAP_START
        for cap_id, length, wanted in (
            (CAP_ID_MSI, MSI_CAP_LEN, msi),
            (CAP_ID_MSIX, MSIX_CAP_LEN, msix_n),
            (CAP_ID_EXP, EXP_CAP_LEN, driver.pcie),
        ):
            if wanted:
                caps.append(Capability(id=cap_id, offset=offset, length=length))
                offset += (length + 3) & ~3
        return cls(
            config_size=config_size,
            bars=dict(sorted(bars.items())),
            backing=backing,
            msix=msix,
            capabilities=tuple(caps),
            interrupt_pin=pin,
            msi_vectors=msi,
            pcie=driver.pcie,
        )

    def bars_info(self) -> dict[str, object]:
        """The ``bars`` object of the ``info`` file."""
        out: dict[str, object] = {}
        for index, bar in self.bars.items():
            entry: dict[str, object] = {
                "size": bar.size,
                "kind": bar.kind.value,
                "prefetchable": bar.prefetchable,
                "backing": self.backing.get(index, 0),
            }
            if self.msix is not None and self.msix.bar == index:
                entry["msix"] = {
                    "vectors": self.msix.vectors,
                    "table_offset": self.msix.table_offset,
                    "pba_offset": self.msix.pba_offset,
                }
            out[str(index)] = entry
        return out


def bar_index(region: str) -> int | None:
    """``barN`` (N 0..5) -> N; any other region name -> None."""
    if region.startswith("bar") and region[3:].isdigit() and len(region) == 4:
        index = int(region[3:])
        return index if index < BAR_COUNT else None
    return None


def _check_bar(index: int, bar: Bar, bars: Mapping[int, Bar], fail: _Bad) -> None:
    if index not in range(BAR_COUNT):
        raise fail(f"BAR index {index} (expected 0..5)")
    size = bar.size
    if size <= 0 or size & (size - 1):
        raise fail(f"BAR {index} size {size} is not a power of two")
    if bar.kind is BarKind.IO:
        if size < 4:
            raise fail(f"I/O BAR {index} size {size} (at least 4 bytes)")
        if bar.prefetchable:
            raise fail(f"I/O BAR {index} cannot be prefetchable")
        return
    if size < PAGE:
        raise fail(f"memory BAR {index} size {size} (at least 4096 bytes)")
    if bar.kind is BarKind.MEM32 and size > 1 << 31:
        raise fail(f"32-bit BAR {index} size {size} (at most 2 GiB: use BarKind.MEM64)")
    if bar.kind is BarKind.MEM64:
        if index == BAR_COUNT - 1:
            raise fail("BAR 5 cannot be 64-bit (it needs the next register too)")
        if index + 1 in bars:
            raise fail(f"BAR {index + 1} is the upper half of 64-bit BAR {index}")


def _place_msix(wanted: int | None, vectors: int, bars: Mapping[int, Bar], bad: _Bad) -> Msix:
    taken = set(bars)
    taken |= {i + 1 for i, b in bars.items() if b.kind is BarKind.MEM64}
    if wanted is not None:
        if wanted not in range(BAR_COUNT) or wanted in taken:
            raise bad(f"msix_bar {wanted} is not a free BAR index (taken: {sorted(taken)})")
        index = wanted
    else:
        free = [i for i in range(BAR_COUNT) if i not in taken]
        if not free:
            raise bad("no free BAR index for the MSI-X table (set msix_vectors = 0)")
        index = free[-1]
    table = vectors * MSIX_ENTRY_SIZE
    return Msix(bar=index, vectors=vectors, pba_offset=(table + PAGE - 1) // PAGE * PAGE)


def _msix_bar_size(msix: Msix) -> int:
    end = msix.pba_offset + msix.pba_size
    return max(PAGE, 1 << (end - 1).bit_length())


def _le(data: bytearray, offset: int, size: int) -> int:
    return int.from_bytes(data[offset : offset + size], "little")


def _put(data: bytearray, offset: int, size: int, value: int) -> None:
    data[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


@attrs.frozen(kw_only=True)
class ResumeWrite:
    """One config write while RESUMING (Rule 6)."""

    offset: int
    size: int
    #: Data bytes written to the resuming session before this write.
    position: int
    #: Whether the loading stream had reached END (None: the stream cannot tell).
    after_end: bool | None


#: How many RESUMING config writes a device remembers (the oldest go first).
RESUME_WRITES_KEPT = 256


def stream_complete(stream: LoadStream) -> bool | None:
    """Whether a loading stream has taken its END record (None: it cannot tell)."""
    if isinstance(stream, StateLoadStream):
        return stream._phase == "done"
    return None


class PciSpace:
    """The config space of one device, and the MSI-X table (Rules 3-6).

    Called with the device lock held; :meth:`read` and :meth:`write` take
    offsets already checked against ``config_size`` by the caller.
    """

    def __init__(self, layout: PciLayout, initial: bytes, *, device: str = "") -> None:
        self.layout = layout
        self.device = device
        #: Whether SET_IRQS enabled MSI (the MSI enable bit sticks only then).
        self.msi_active = False
        size = layout.config_size
        cfg = bytearray(initial)
        if len(cfg) != size:
            raise ValueError(f"device {device}: initial_config() is {len(cfg)} bytes, not {size}")
        if cfg[HEADER_TYPE] & 0x7F:
            raise ValueError(
                f"device {device}: header type {cfg[HEADER_TYPE] & 0x7F} "
                "(only type 0, an endpoint, is emulated)"
            )
        self._write = bytearray(size)  # writable bits
        self._w1c = bytearray(size)  # write-one-to-clear bits
        self._raw = bytearray(size)  # 1: outside the header and every capability
        self._raw[STD_HEADER_SIZEOF:] = b"\x01" * (size - STD_HEADER_SIZEOF)
        self._header(cfg)
        for index, cap in enumerate(layout.capabilities):
            nxt = (
                layout.capabilities[index + 1].offset if index + 1 < len(layout.capabilities) else 0
            )
            span = (cap.length + 3) & ~3
            cfg[cap.offset : cap.offset + span] = bytes(span)
            self._raw[cap.offset : cap.offset + span] = bytes(span)
            cfg[cap.offset] = cap.id
            cfg[cap.offset + 1] = nxt
            self._capability(cfg, cap)
        if layout.config_size > CFG_SPACE_SIZE:
            cfg[CFG_SPACE_SIZE : CFG_SPACE_SIZE + 4] = bytes(4)  # empty extended list
        self._cfg = cfg
        self._msix_table = bytearray()
        if layout.msix is not None:
            self._msix_table = bytearray(layout.msix.table_size)
            self.reset_msix()
        #: Config writes while RESUMING, oldest first (Rule 6).
        self.resume_writes: collections.deque[ResumeWrite] = collections.deque(
            maxlen=RESUME_WRITES_KEPT
        )
        #: Called after each write with its offset and size (set by :func:`pci_space`).
        self.observer: Callable[[int, int], None] | None = None

    # -- building -------------------------------------------------------------------
    def _header(self, cfg: bytearray) -> None:
        layout = self.layout
        status = _le(cfg, STATUS, 2) & ~STATUS_CAP_LIST
        if layout.capabilities:
            status |= STATUS_CAP_LIST
        _put(cfg, STATUS, 2, status)
        cfg[CAPABILITY_LIST] = layout.capabilities[0].offset if layout.capabilities else 0
        cfg[INTERRUPT_PIN] = layout.interrupt_pin
        for index in range(BAR_COUNT):
            _put(cfg, BASE_ADDRESS_0 + 4 * index, 4, 0)
        for index, bar in layout.bars.items():
            _put(cfg, BASE_ADDRESS_0 + 4 * index, 4, _bar_flags(bar))
        _put(cfg, ROM_ADDRESS, 4, 0)
        _put(self._write, COMMAND, 2, COMMAND_WRITABLE)
        _put(self._w1c, STATUS, 2, STATUS_W1C)
        self._write[CACHE_LINE_SIZE] = 0xFF
        self._write[LATENCY_TIMER] = 0xFF
        self._write[INTERRUPT_LINE] = 0xFF
        self._write[BASE_ADDRESS_0 : BASE_ADDRESS_0 + 24] = b"\xff" * 24

    def _capability(self, cfg: bytearray, cap: Capability) -> None:
        at = cap.offset
        layout = self.layout
        if cap.id == CAP_ID_MSI:
            qmax = layout.msi_vectors.bit_length() - 1
            _put(cfg, at + MSI_FLAGS, 2, MSI_FLAGS_64BIT | qmax << 1)
            self._write[at + MSI_FLAGS] = MSI_FLAGS_ENABLE | MSI_FLAGS_QSIZE
            self._write[at + 4 : at + 14] = b"\xff" * 10  # address lo, hi, data
        elif cap.id == CAP_ID_MSIX:
            msix = layout.msix
            assert msix is not None
            _put(cfg, at + MSIX_FLAGS, 2, msix.vectors - 1)
            _put(cfg, at + MSIX_TABLE, 4, msix.table_offset | msix.bar)
            _put(cfg, at + MSIX_PBA, 4, msix.pba_offset | msix.bar)
        else:
            _put(cfg, at + EXP_FLAGS, 2, EXP_FLAGS_V2_ENDPOINT)
            _put(cfg, at + EXP_DEVCAP, 4, EXP_DEVCAP_RBER)
            _put(cfg, at + EXP_DEVCTL, 2, EXP_DEVCTL_DEFAULT)
            _put(cfg, at + EXP_LNKCAP, 4, EXP_LINK_X1_2_5GT)
            _put(cfg, at + EXP_LNKSTA, 2, EXP_LINK_X1_2_5GT)
            _put(self._write, at + EXP_DEVCTL, 2, 0xFFFF & ~EXP_DEVCTL_PHANTOM)
            _put(self._w1c, at + EXP_DEVSTA, 2, 0x000F)
            _put(self._write, at + EXP_DEVCTL2, 2, 0xFFFF & ~EXP_DEVCTL2_ARI)

    # -- config space ---------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset+size)`` clipped to the space (BARs read per Rule 5)."""
        return bytes(self._cfg[max(0, offset) : max(0, offset) + max(0, size)])

    def snapshot(self) -> bytes:
        return bytes(self._cfg)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """One config write inside the space (Rule 4)."""
        cfg = self._cfg
        data = bytes(data)
        for i, value in enumerate(data):
            pos = offset + i
            if self._raw[pos]:
                cfg[pos] = value
                continue
            mask = self._write[pos]
            cfg[pos] = (cfg[pos] & ~mask) | (value & mask)
            cfg[pos] &= ~(value & self._w1c[pos]) & 0xFF
        end = offset + len(data)
        if offset < BASE_ADDRESS_0 + 24 and end > BASE_ADDRESS_0:
            self._fix_bars()
        for cap in self.layout.capabilities:
            if offset < cap.offset + cap.length and end > cap.offset:
                self._fix_capability(cap)
        if self.observer is not None:
            self.observer(offset, len(data))

    def resume_writes_info(self) -> dict[str, object]:
        """Rule 6 as an ``info`` object: counts and the last position."""
        writes = list(self.resume_writes)
        return {
            "after_end": sum(1 for w in writes if w.after_end is True),
            "before_end": sum(1 for w in writes if w.after_end is False),
            "unknown": sum(1 for w in writes if w.after_end is None),
            "positions": sorted({w.position for w in writes}),
        }

    def _fix_bars(self) -> None:
        cfg = self._cfg
        upper: set[int] = set()
        for index in range(BAR_COUNT):
            at = BASE_ADDRESS_0 + 4 * index
            if index in upper:
                continue
            bar = self.layout.bars.get(index)
            if bar is None:
                _put(cfg, at, 4, 0)
                continue
            mask = ~(bar.size - 1)
            _put(cfg, at, 4, (_le(cfg, at, 4) & mask & 0xFFFFFFFF) | _bar_flags(bar))
            if bar.kind is BarKind.MEM64:
                upper.add(index + 1)
                _put(cfg, at + 4, 4, _le(cfg, at + 4, 4) & ((mask >> 32) & 0xFFFFFFFF))

    def _fix_capability(self, cap: Capability) -> None:
        cfg = self._cfg
        at = cap.offset
        if cap.id == CAP_ID_MSI:
            flags = _le(cfg, at + MSI_FLAGS, 2)
            if not self.msi_active:
                flags &= ~MSI_FLAGS_ENABLE
            qmax = self.layout.msi_vectors.bit_length() - 1
            if (flags & MSI_FLAGS_QSIZE) >> 4 > qmax:
                flags = (flags & ~MSI_FLAGS_QSIZE) | qmax << 4
            _put(cfg, at + MSI_FLAGS, 2, flags)
        elif cap.id == CAP_ID_EXP:
            ctl = _le(cfg, at + EXP_DEVCTL, 2)
            _put(cfg, at + EXP_DEVCTL, 2, ctl & ~EXP_DEVCTL_BCR_FLR)

    def command(self) -> int:
        return _le(self._cfg, COMMAND, 2)

    # -- the MSI-X BAR ----------------------------------------------------------------
    def reset_msix(self) -> None:
        """Every vector masked, addresses and data 0 (the state after reset)."""
        table = self._msix_table
        table[:] = bytes(len(table))
        for at in range(MSIX_ENTRY_VECTOR_CTRL, len(table), MSIX_ENTRY_SIZE):
            table[at] = MSIX_ENTRY_CTRL_MASKBIT

    def msix_read(self, offset: int, size: int) -> bytes:
        """Bytes of the MSI-X BAR: the table, zeros elsewhere (the PBA: nothing pending)."""
        msix = self.layout.msix
        assert msix is not None
        out = bytearray(size)
        start, end = (
            max(offset, msix.table_offset),
            min(offset + size, msix.table_offset + msix.table_size),
        )
        if start < end:
            base = msix.table_offset
            out[start - offset : end - offset] = self._msix_table[start - base : end - base]
        return bytes(out)

    def msix_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """A write of the MSI-X BAR: table entries store, the PBA and the rest are read-only."""
        msix = self.layout.msix
        assert msix is not None
        data = bytes(data)
        start, end = (
            max(offset, msix.table_offset),
            min(offset + len(data), msix.table_offset + msix.table_size),
        )
        if start < end:
            base = msix.table_offset
            self._msix_table[start - base : end - base] = data[start - offset : end - offset]

    def msix_masked(self, vector: int) -> bool:
        """Whether MSI-X ``vector``'s table entry has its mask bit set."""
        at = vector * MSIX_ENTRY_SIZE + MSIX_ENTRY_VECTOR_CTRL
        return bool(self._msix_table[at] & MSIX_ENTRY_CTRL_MASKBIT)


def _bar_flags(bar: Bar) -> int:
    if bar.kind is BarKind.IO:
        return BAR_SPACE_IO
    flags = BAR_MEM_TYPE_64 if bar.kind is BarKind.MEM64 else 0
    return flags | (BAR_MEM_PREFETCH if bar.prefetchable else 0)


def check_bar_access(device: str, index: int, bar: Bar, offset: int, length: int) -> None:
    """EINVAL for an access that does not lie inside BAR ``index``."""
    if offset < 0 or offset + length > bar.size:
        raise DeviceError(
            errno.EINVAL,
            f"BAR {index}: access of {length} bytes at {offset} is outside the BAR "
            f"({bar.size} bytes)",
            device=device,
        )


def pci_space(device: Device) -> PciSpace:
    """The device's :class:`PciSpace`, built from its driver on first use (device lock held).

    Raises:
        ValueError: the driver's declarations break Rules 1-3.
    """
    space = getattr(device, "_pci_space", None)
    if isinstance(space, PciSpace):
        return space
    layout = PciLayout.from_driver(device.driver, len(device._config))
    space = PciSpace(layout, bytes(device._config), device=device.name)
    space.observer = functools.partial(_note_resume_write, device, space)
    device._pci_space = space  # type: ignore[attr-defined]
    return space


def _note_resume_write(device: Device, space: PciSpace, offset: int, size: int) -> None:
    """Rule 6: place a config write relative to the resuming data stream (lock held)."""
    session = device._session
    if device.state is not State.RESUMING or session is None or session.saving:
        return
    assert isinstance(session.stream, LoadStream)
    after_end = stream_complete(session.stream)
    space.resume_writes.append(
        ResumeWrite(offset=offset, size=size, position=session.position, after_end=after_end)
    )
    if after_end is False:
        device._log.append(f"CONFIG-EARLY {offset:#x} {size} at {session.position}")
