"""QEMU's ``edu`` teaching device as a fakevfio driver (a :class:`~fakevfio.driver.StateDriver`).

The device follows QEMU's ``docs/specs/edu.rst`` and ``hw/misc/edu.c``: PCI ID
1234:11e8, revision 0x10, class 0x00ff ("unclassified"), INTA and a one-vector
MSI capability, and BAR0, 1 MiB of MMIO registers.

Theory of operation
-------------------

BAR0 registers (little-endian). What a guest sees is what it sees on QEMU's
edu, checked by booting both (tests/guest/test_guest_edu.py): an access
narrower than 4 bytes or not naturally aligned reads 0 and a write is ignored
(QEMU's memory core refuses it, as edu's ``valid`` sizes are 4..8); below 0x80
an 8-byte access reads all ones (edu.c takes only 4 bytes there); registers not
listed, the DMA buffer included, read all ones and ignore writes. Reads and
writes of more than 8 bytes (the ``regions/bar0`` file) are split into aligned
4-byte accesses::

    0x00 RO  identification 0x010000ed (version 1.0)
    0x04 RW  liveness: a write stores the inverted value (``~``)
    0x08 RW  factorial: a write (ignored while computing) starts computing the
             factorial of the value (modulo 2**32, as the 32-bit register holds it)
    0x20 RW  status: bit 0 computing (read-only), bit 7 raise interrupt 0x001
             when a factorial completes
    0x24 RO  interrupt status
    0x60 WO  interrupt raise: ORed into the interrupt status
    0x64 WO  interrupt acknowledge: cleared from the interrupt status
    0x80 RW  DMA source address        (64-bit; a 4-byte write zero-extends)
    0x88 RW  DMA destination address
    0x90 RW  DMA transfer count
    0x98 RW  DMA command: bit 0 start, bit 1 direction (0 RAM to device,
             1 device to RAM), bit 2 raise interrupt 0x100 when done

Rule 1 (interrupts). The interrupt line follows the interrupt status: a raise
that leaves it non-zero signals; with MSI (when the core tells the driver the
VMM enabled it, ``irq_enabled(IRQ_MSI)``) that is one MSI message per raise,
otherwise INTx is driven as a level (``set_intx``): asserted while the status is
non-zero, deasserted by the acknowledge that clears it. Without ``irq_enabled``
in the driver API the device does both and the core drops the raises of the
index the VMM did not enable (:meth:`EduDriver.irq_mode`). A delivery the core
refuses with an error is counted in ``info`` and changes no register.

Rule 2 (the DMA engine). Writing the command with bit 0 set starts a transfer
unless one is running; while it runs, writes to the four DMA registers are
ignored. The device side of a transfer is the 4096-byte buffer at 0x40000 in
the device's own address space; the RAM side is an IOVA, clamped with
``dma_mask`` (28 bits by default, as in QEMU). The transfer moves the whole
count through ``dma_read``/``dma_write`` at once. A device-side range outside
the buffer moves nothing (counted as ``dma_range_errors``); a DMA fault
(``DeviceError``, EFAULT for an unmapped or read-only IOVA) leaves the buffer
unchanged and is counted as ``dma_faults``. Either way the command completes as
QEMU's edu completes a failed ``pci_dma_*``: bit 0 clears and, if bit 2 is set,
interrupt 0x100 is raised.

Rule 3 (time). A started DMA completes ``dma_delay_ms`` after the command (QEMU
uses a 100 ms timer) and a factorial ``fact_delay_ms`` after the write, both
counted in the device's workload ticks (``advance``), which the core runs only
in RUNNING and PRE_COPY. The remaining time is device state.

Rule 4 (migration of work in flight). An operation in flight *finishes on the
source*: every arc from a state where the device may DMA (RUNNING, RUNNING_P2P,
PRE_COPY, PRE_COPY_P2P) to one where the workload does not tick completes it
first (its DMA, buffer update and interrupt happen before the arc returns), so
a device that reached STOP or STOP_COPY from a running state has none. Work a
VMM starts while the device is stopped (a register write in STOP, which the
uAPI says the user should not do) is latched: it travels in the stream, with
its time left, and runs on the destination once that runs. A destination
leaving STOP drives INTx from the interrupt status it loaded.

Rule 5 (the stream). The whole device state (registers, remaining times,
counters and the buffer: :data:`STATE_SIZE` bytes, the layout below) is the
StateDriver state, so the core's versioned stream carries it and re-sends the
page that changed in pre-copy. The driver header is :data:`DRIVER_HEADER`:
magic ``FVEDUDEV``, edu stream version, ``dma_mask``; another version or mask
is EOPNOTSUPP, a bad magic or size EINVAL. ``validate`` rejects a loaded state
whose identification, reserved bits or timers are inconsistent (EINVAL).

State layout (little-endian)::

    page 0  0x00 u32 identification   0x04 u32 liveness   0x08 u32 factorial
            0x0c u32 status           0x10 u32 irq status  0x14 u32 reserved (0)
            0x18 u64 DMA src, dst, count, command
            0x38 u64 DMA time left (us), factorial time left (us)
            0x48 u64 counters (:data:`COUNTERS`); the rest of the page is zero
    page 1  the 4096-byte DMA buffer
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Mapping
from typing import ClassVar

from fakevfio import MigFlags, State
from fakevfio.driver import IRQ_MSI, Bar, LoadStream, OptionSpec, SaveStream, StateDriver
from fakevfio.errors import ConfigError, DeviceError

PAGE_BYTES = 4096
BAR_SIZE = 1 << 20
IDENTIFICATION = 0x010000ED
VENDOR_ID = 0x1234
DEVICE_ID = 0x11E8
REVISION = 0x10
#: PCI_CLASS_OTHERS (0xff) written as the 16-bit class word: subclass 0xff, base class 0.
CLASS_WORD = 0x00FF
SUBSYSTEM_VENDOR_ID = 0x1AF4  # what QEMU gives every device
SUBSYSTEM_ID = 0x1100

#: The DMA buffer in the device's address space.
DMA_BUFFER = 0x40000
DMA_BUFFER_SIZE = 4096

# MMIO offsets in BAR0.
MMIO_ID = 0x00
MMIO_LIVENESS = 0x04
MMIO_FACT = 0x08
MMIO_STATUS = 0x20
MMIO_IRQ_STATUS = 0x24
MMIO_IRQ_RAISE = 0x60
MMIO_IRQ_ACK = 0x64
MMIO_DMA_SRC = 0x80
MMIO_DMA_DST = 0x88
MMIO_DMA_CNT = 0x90
MMIO_DMA_CMD = 0x98

STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
FACT_IRQ = 0x001
DMA_IRQ = 0x100
CMD_START = 0x1
CMD_TO_RAM = 0x2
CMD_IRQ = 0x4

STREAM_MAGIC = b"FVEDUDEV"
STREAM_VERSION = 1
DRIVER_HEADER = struct.Struct("<8sIQ")  # magic, version, dma_mask

COUNTERS = (
    "irqs_raised",
    "dma_transfers",
    "dma_faults",
    "dma_range_errors",
    "factorials",
    "dma_bytes_to_device",
    "dma_bytes_to_ram",
)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
#: State field -> (offset in the state, codec).
FIELDS: Mapping[str, tuple[int, struct.Struct]] = {
    "ident": (0x00, _U32),
    "liveness": (0x04, _U32),
    "fact": (0x08, _U32),
    "status": (0x0C, _U32),
    "irq_status": (0x10, _U32),
    "reserved": (0x14, _U32),
    "dma_src": (0x18, _U64),
    "dma_dst": (0x20, _U64),
    "dma_cnt": (0x28, _U64),
    "dma_cmd": (0x30, _U64),
    "dma_left_us": (0x38, _U64),
    "fact_left_us": (0x40, _U64),
    **{name: (0x48 + 8 * i, _U64) for i, name in enumerate(COUNTERS)},
}
_FIELDS_END = 0x48 + 8 * len(COUNTERS)
BUFFER_OFFSET = PAGE_BYTES
STATE_SIZE = 2 * PAGE_BYTES
#: MMIO register -> state field, for the plain reads (the DMA ones are 64-bit).
_READABLE = {
    MMIO_LIVENESS: "liveness",
    MMIO_FACT: "fact",
    MMIO_STATUS: "status",
    MMIO_IRQ_STATUS: "irq_status",
    MMIO_DMA_SRC: "dma_src",
    MMIO_DMA_DST: "dma_dst",
    MMIO_DMA_CNT: "dma_cnt",
    MMIO_DMA_CMD: "dma_cmd",
}
#: States in which the device may DMA and raise interrupts (vfio.h: RUNNING_P2P is
#: RUNNING without peer-to-peer DMA).
DMA_STATES = frozenset({State.RUNNING, State.RUNNING_P2P, State.PRE_COPY, State.PRE_COPY_P2P})
#: States in which the core runs the workload tick.
TICKING_STATES = frozenset({State.RUNNING, State.PRE_COPY})
MAX_DELAY_MS = 60_000
_U32_MASK = 0xFFFF_FFFF
_U64_MASK = (1 << 64) - 1


def factorial_u32(n: int) -> int:
    """``n!`` modulo 2**32, as edu's 32-bit register computes it (0 from 34! on)."""
    if n >= 34:  # 34! holds 2**32 as a factor
        return 0
    result = 1
    for k in range(2, n + 1):
        result = (result * k) & _U32_MASK
    return result


def _all_ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class EduDriver(StateDriver):
    """QEMU's edu device: identification, liveness, factorial, interrupts and DMA."""

    description = "QEMU's edu teaching device: factorial, INTx/MSI interrupts, a 4 KiB DMA engine"
    options: ClassVar[Mapping[str, OptionSpec]] = {
        "dma_mask": OptionSpec(
            kind="int", default="0xfffffff", help="mask applied to RAM-side DMA addresses"
        ),
        "dma_delay_ms": OptionSpec(
            kind="int", default="100", help="time a DMA takes, 0..60000 ms (QEMU: 100)"
        ),
        "fact_delay_ms": OptionSpec(
            kind="int", default="0", help="time a factorial takes, 0..60000 ms (next tick: 0)"
        ),
    }
    stream_version = STREAM_VERSION
    page_size = PAGE_BYTES
    interrupt_pin = 1
    msi_vectors = 1

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        super().__init__(name, options)
        mask = self.int_option("dma_mask")
        if mask is None or not 0 < mask <= _U64_MASK:
            raise ConfigError(f"device {name}: dma_mask must be in 1..2**64-1, got {mask}")
        self.dma_mask = mask
        self.dma_delay_us = self._delay_option("dma_delay_ms") * 1000
        self.fact_delay_us = self._delay_option("fact_delay_ms") * 1000
        self._state = bytearray(STATE_SIZE)
        self._set("ident", IDENTIFICATION)
        #: What the driver last told the core about INTx (not state: the line is re-driven).
        self._intx_driven = False
        self.irq_undelivered = 0
        self.last_irq_error = ""
        self.last_dma_error = ""

    def _delay_option(self, key: str) -> int:
        value = self.int_option(key)
        if value is None or not 0 <= value <= MAX_DELAY_MS:
            raise ConfigError(
                f"device {self.name}: {key} must be in 0..{MAX_DELAY_MS}, got {value}"
            )
        return value

    @property
    def migration_flags(self) -> MigFlags:
        return MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY

    # -- state fields ---------------------------------------------------------
    def _get(self, field: str) -> int:
        offset, codec = FIELDS[field]
        value: int = codec.unpack_from(self._state, offset)[0]
        return value

    def _set(self, field: str, value: int) -> None:
        offset, codec = FIELDS[field]
        codec.pack_into(self._state, offset, value & _all_ones(codec.size))
        self.mark_dirty(offset, codec.size)

    def _count(self, counter: str, amount: int = 1) -> None:
        self._set(counter, self._get(counter) + amount)

    @property
    def buffer(self) -> bytes:
        """The DMA buffer's bytes."""
        return bytes(self._state[BUFFER_OFFSET : BUFFER_OFFSET + DMA_BUFFER_SIZE])

    def counters(self) -> dict[str, int]:
        return {name: self._get(name) for name in COUNTERS}

    # -- PCI surface ------------------------------------------------------------
    def initial_config(self) -> bytes:
        cfg = bytearray(self.config_size)
        struct.pack_into("<HH", cfg, 0x00, VENDOR_ID, DEVICE_ID)
        cfg[0x08] = REVISION
        struct.pack_into("<H", cfg, 0x0A, CLASS_WORD)
        struct.pack_into("<HH", cfg, 0x2C, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID)
        cfg[0x3D] = self.interrupt_pin
        return bytes(cfg)

    def regions(self) -> Mapping[str, int]:
        return {"bar0": BAR_SIZE}

    def bars(self) -> Mapping[int, Bar]:
        return {0: Bar(size=BAR_SIZE)}

    def region_read(self, region: str, offset: int, size: int) -> bytes:
        self._check_region(region)
        if size in (4, 8) and offset % size == 0:
            return self.mmio_read(offset, size).to_bytes(size, "little")
        if size <= 8:  # narrower than 4 or unaligned: QEMU refuses it, the guest reads 0
            return bytes(size)
        # Bulk reads (the regions file): aligned dwords, as the kernel splits them.
        out = bytearray(size)
        for dword in range(-(-offset // 4) * 4, offset + size - 3, 4):
            out[dword - offset : dword - offset + 4] = _U32.pack(self.mmio_read(dword, 4))
        return bytes(out)

    def region_write(self, region: str, offset: int, data: memoryview) -> None:
        self._check_region(region)
        size = len(data)
        if size in (4, 8) and offset % size == 0:
            self.mmio_write(offset, size, int.from_bytes(data, "little"))
            return
        if size <= 8:  # narrower than 4 or unaligned: ignored
            return
        for dword in range(-(-offset // 4) * 4, offset + size - 3, 4):
            (value,) = _U32.unpack_from(data, dword - offset)
            self.mmio_write(dword, 4, value)

    def _check_region(self, region: str) -> None:
        if region != "bar0":
            raise DeviceError(
                errno.ENOENT, f"edu has only region bar0, not {region}", device=self.name
            )

    # -- the register model ---------------------------------------------------------
    def mmio_read(self, addr: int, size: int) -> int:
        """One MMIO read of ``size`` bytes at BAR0 offset ``addr`` (edu.c's rules)."""
        ones = _all_ones(size)
        if size != 4 and (addr < 0x80 or size != 8):
            return ones
        if addr == MMIO_ID:
            return IDENTIFICATION
        field = _READABLE.get(addr)
        return ones if field is None else self._get(field) & ones

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        """One MMIO write of ``size`` bytes at BAR0 offset ``addr`` (edu.c's rules)."""
        if size != 4 and (addr < 0x80 or size != 8):
            return
        value &= _all_ones(size)
        if addr == MMIO_LIVENESS:
            self._set("liveness", ~value)
        elif addr == MMIO_FACT:
            if not self._get("status") & STATUS_COMPUTING:
                self._set("fact", value)
                self._set("status", self._get("status") | STATUS_COMPUTING)
                self._set("fact_left_us", self.fact_delay_us)
        elif addr == MMIO_STATUS:
            status = self._get("status") & ~STATUS_IRQFACT
            self._set("status", status | (value & STATUS_IRQFACT))
        elif addr == MMIO_IRQ_RAISE:
            self._raise(value & _U32_MASK)
        elif addr == MMIO_IRQ_ACK:
            self._lower(value & _U32_MASK)
        elif addr in (MMIO_DMA_SRC, MMIO_DMA_DST, MMIO_DMA_CNT):
            if not self._get("dma_cmd") & CMD_START:
                self._set(_READABLE[addr], value)
        elif addr == MMIO_DMA_CMD and value & CMD_START and not self._pending_dma():
            self._set("dma_cmd", value)
            self._set("dma_left_us", self.dma_delay_us)

    # -- interrupts (Rule 1) ---------------------------------------------------------
    def irq_mode(self) -> str:
        """``msi``, ``intx``, or ``intx+msi`` when the core cannot say which one the VMM enabled.

        vfio-pci enables one of INTx and MSI at a time (its ``irq_type``). With the
        driver API's ``irq_enabled(index)`` the device signals only the enabled one,
        as edu does; without it the device drives both and the core drops (and
        counts) the raises of the index that is not enabled, which the VMM sees
        the same way.
        """
        query: Callable[[int], object] | None = getattr(self, "irq_enabled", None)
        if query is None:
            return "intx+msi"
        try:
            return "msi" if query(IRQ_MSI) else "intx"
        except DeviceError:
            return "intx"

    def _deliver(self, call: Callable[[], None]) -> None:
        try:
            call()
        except DeviceError as exc:
            self.irq_undelivered += 1
            self.last_irq_error = str(exc)

    def _raise(self, bits: int) -> None:
        status = self._get("irq_status") | bits
        self._set("irq_status", status)
        if not status:
            return
        self._count("irqs_raised")
        mode = self.irq_mode()
        if "msi" in mode:
            self._deliver(lambda: self.raise_irq(IRQ_MSI))
        if "intx" in mode:
            self._drive_intx(True)

    def _lower(self, bits: int) -> None:
        status = self._get("irq_status") & ~bits
        self._set("irq_status", status)
        if not status and "intx" in self.irq_mode():
            self._drive_intx(False)

    def _drive_intx(self, asserted: bool) -> None:
        # Asserting again is harmless (a level); deasserting a line never driven is skipped.
        if asserted or self._intx_driven:
            self._intx_driven = asserted
            self._deliver(lambda: self.set_intx(asserted))

    def _sync_intx(self) -> None:
        """Drive the line from the interrupt status (a loaded state, a reset)."""
        if "intx" not in self.irq_mode():
            return
        asserted = bool(self._get("irq_status"))
        if asserted != self._intx_driven:
            self._drive_intx(asserted)

    # -- the work (Rules 2 and 3) ---------------------------------------------------------
    def has_workload(self) -> bool:
        return self._pending_fact() or self._pending_dma()

    def _pending_fact(self) -> bool:
        return bool(self._get("status") & STATUS_COMPUTING)

    def _pending_dma(self) -> bool:
        return bool(self._get("dma_cmd") & CMD_START)

    def advance(self, seconds: float) -> None:
        elapsed = max(0, int(seconds * 1_000_000))
        if self._pending_fact():
            left = max(0, self._get("fact_left_us") - elapsed)
            self._set("fact_left_us", left)
            if not left:
                self._finish_fact()
        if self._pending_dma():
            left = max(0, self._get("dma_left_us") - elapsed)
            self._set("dma_left_us", left)
            if not left:
                self._finish_dma()

    def complete_pending(self) -> None:
        """Finish the factorial and the DMA in flight now (Rule 4)."""
        if self._pending_fact():
            self._set("fact_left_us", 0)
            self._finish_fact()
        if self._pending_dma():
            self._set("dma_left_us", 0)
            self._finish_dma()

    def _finish_fact(self) -> None:
        self._set("fact", factorial_u32(self._get("fact")))
        self._set("status", self._get("status") & ~STATUS_COMPUTING)
        self._count("factorials")
        if self._get("status") & STATUS_IRQFACT:
            self._raise(FACT_IRQ)

    def _finish_dma(self) -> None:
        cmd = self._get("dma_cmd")
        count = self._get("dma_cnt")
        to_ram = bool(cmd & CMD_TO_RAM)
        local = self._get("dma_src" if to_ram else "dma_dst")
        ram = self._get("dma_dst" if to_ram else "dma_src") & self.dma_mask
        start = local - DMA_BUFFER
        if not (start >= 0 and count <= DMA_BUFFER_SIZE - start):
            self._count("dma_range_errors")
            self.last_dma_error = (
                f"DMA of {count} bytes at device address {local:#x} is outside the buffer "
                f"[{DMA_BUFFER:#x}, {DMA_BUFFER + DMA_BUFFER_SIZE:#x})"
            )
        elif count:
            self._transfer(to_ram, BUFFER_OFFSET + start, ram, count)
        self._set("dma_cmd", cmd & ~CMD_START)
        if cmd & CMD_IRQ:
            self._raise(DMA_IRQ)

    def _transfer(self, to_ram: bool, offset: int, iova: int, count: int) -> None:
        try:
            if to_ram:
                self.dma_write(iova, bytes(self._state[offset : offset + count]))
            else:
                data = self.dma_read(iova, count)
                if len(data) != count:
                    raise DeviceError(
                        errno.EIO,
                        f"DMA read returned {len(data)} of {count} bytes",
                        device=self.name,
                    )
                self._state[offset : offset + count] = data
                self.mark_dirty(offset, count)
        except DeviceError as exc:
            self._count("dma_faults")
            self.last_dma_error = str(exc)
            return
        self._count("dma_transfers")
        self._count("dma_bytes_to_ram" if to_ram else "dma_bytes_to_device", count)

    # -- migration (Rules 4 and 5) ---------------------------------------------------------
    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        if current in DMA_STATES and nxt not in TICKING_STATES:
            self.complete_pending()
        result = super().step(current, nxt, stream)
        if current is State.STOP and nxt in DMA_STATES:
            self._sync_intx()
        return result

    def state_size(self) -> int:
        return STATE_SIZE

    def save_range(self, offset: int, length: int) -> bytes:
        return bytes(self._state[offset : offset + length])

    def load_range(self, offset: int, data: memoryview) -> None:
        self._state[offset : offset + len(data)] = data

    def header(self) -> bytes:
        return DRIVER_HEADER.pack(STREAM_MAGIC, self.stream_version, self.dma_mask)

    def check_header(self, header: bytes) -> None:
        if len(header) != DRIVER_HEADER.size:
            raise DeviceError(
                errno.EINVAL,
                f"edu header of {len(header)} bytes (expected {DRIVER_HEADER.size})",
                device=self.name,
            )
        magic, version, mask = DRIVER_HEADER.unpack(header)
        if magic != STREAM_MAGIC:
            raise DeviceError(
                errno.EINVAL, f"not an edu stream (magic {magic!r})", device=self.name
            )
        if version != self.stream_version:
            raise DeviceError(
                errno.EOPNOTSUPP,
                f"edu stream version {version} (this driver loads version {self.stream_version})",
                device=self.name,
            )
        if mask != self.dma_mask:
            raise DeviceError(
                errno.EOPNOTSUPP,
                f"stream of an edu with dma_mask={mask:#x} (this device: "
                f"dma_mask={self.dma_mask:#x}; create it with the same dma_mask)",
                device=self.name,
            )

    def validate(self) -> None:
        problem = self._inconsistency()
        if problem:
            raise DeviceError(
                errno.EINVAL, f"loaded edu state is inconsistent: {problem}", device=self.name
            )

    def _inconsistency(self) -> str:
        if self._get("ident") != IDENTIFICATION:
            return f"identification {self._get('ident'):#x} (expected {IDENTIFICATION:#x})"
        if self._get("status") & ~(STATUS_COMPUTING | STATUS_IRQFACT):
            return f"status {self._get('status'):#x} has reserved bits set"
        if self._get("reserved") or any(self._state[_FIELDS_END:PAGE_BYTES]):
            return "reserved register bytes are not zero"
        if self._get("fact_left_us") and not self._pending_fact():
            return "factorial time left without a factorial computing"
        if self._get("dma_left_us") and not self._pending_dma():
            return "DMA time left without a DMA running"
        for field, delay in (
            ("fact_left_us", self.fact_delay_us),
            ("dma_left_us", self.dma_delay_us),
        ):
            if self._get(field) > max(delay, MAX_DELAY_MS * 1000):
                return f"{field} {self._get(field)} is beyond any delay"
        return ""

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: registers and buffer to power-on values (counters stay)."""
        counters = self.counters()
        self._state[:] = bytes(STATE_SIZE)
        self._set("ident", IDENTIFICATION)
        for name, value in counters.items():
            self._set(name, value)
        self._sync_intx()

    def info(self) -> Mapping[str, object]:
        registers = {name: self._get(name) for name in FIELDS if name not in COUNTERS}
        return {
            "registers": registers,
            "counters": self.counters(),
            "pending": {"factorial": self._pending_fact(), "dma": self._pending_dma()},
            "interrupt_mode": self.irq_mode(),
            "intx_asserted": self._intx_driven,
            "irq_undelivered": self.irq_undelivered,
            "last_irq_error": self.last_irq_error,
            "last_dma_error": self.last_dma_error,
        }


__all__ = [
    "BAR_SIZE",
    "COUNTERS",
    "DMA_BUFFER",
    "DMA_BUFFER_SIZE",
    "DRIVER_HEADER",
    "IDENTIFICATION",
    "STATE_SIZE",
    "STREAM_MAGIC",
    "STREAM_VERSION",
    "EduDriver",
    "factorial_u32",
]
