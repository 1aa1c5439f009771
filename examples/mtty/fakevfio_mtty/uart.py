"""The mtty sample's 16550-like UART port: registers, loop-back FIFO, 36-byte image.

Each port is one 8-byte I/O BAR, accessed one register per byte, exactly as
``samples/vfio-mdev/mtty.c`` emulates it: writing THR queues the byte in a
16-entry loop-back FIFO that reading RBR returns, so a byte written before a
migration can be read back after it. The port's migratable state is
``struct serial_port`` of the kernel sample, 36 bytes, little-endian:

====  ====  =====================================================
off   size  field
====  ====  =====================================================
0     8     uart_reg[8]
8     16    rxtx.fifo[16]
24    1     rxtx.head
25    1     rxtx.tail
26    1     rxtx.count
27    1     dlab (bool)
28    1     overrun (bool)
29    1     padding
30    2     divisor (u16)
32    1     fcr
33    1     max_fifo_size
34    1     intr_trigger_level
35    1     padding
====  ====  =====================================================

Known differences from the sample: LSR data-ready is computed from ``count``
(the sample compares head and tail, so a full FIFO reads as empty), and
:meth:`Port.from_bytes` checks the image for consistency, which the sample never
does.
"""

from __future__ import annotations

import struct

import attrs

PORT = struct.Struct("<8s16sBBBBBxHBBBx")
assert PORT.size == 36
FIFO_BYTES = 16
REGISTERS = 8

# Register offsets (include/uapi/linux/serial_reg.h).
UART_RX = 0  # read: RBR; write: THR; DLL with DLAB
UART_IER = 1  # DLM with DLAB
UART_IIR = 2  # read: IIR; write: FCR
UART_LCR = 3
UART_MCR = 4
UART_LSR = 5
UART_MSR = 6
UART_SCR = 7

UART_LCR_DLAB = 0x80
UART_FCR_ENABLE_FIFO = 0x01
UART_FCR_CLEAR_RCVR = 0x02
UART_FCR_CLEAR_XMIT = 0x04
UART_FCR_TRIGGER_MASK = 0xC0
UART_LSR_DR = 0x01
UART_LSR_OE = 0x02
UART_LSR_THRE = 0x20
UART_LSR_TEMT = 0x40
UART_IER_RDI = 0x01
UART_IER_THRI = 0x02
UART_IER_RLSI = 0x04
UART_IIR_NO_INT = 0x01
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_MSR_DCD = 0x80
UART_MSR_DSR = 0x20
UART_MSR_CTS = 0x10
UART_MSR_DDSR = 0x02
UART_MCR_RTS = 0x02
UART_MCR_AFE = 0x20
_TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}


class PortImageError(ValueError):
    """A serialized port is internally inconsistent."""


@attrs.define
class Port:
    """One UART port's complete state (``struct serial_port``)."""

    uart_reg: bytearray = attrs.field(factory=lambda: bytearray(REGISTERS))
    fifo: bytearray = attrs.field(factory=lambda: bytearray(FIFO_BYTES))
    head: int = 0
    tail: int = 0
    count: int = 0
    dlab: bool = False
    overrun: bool = False
    divisor: int = 0
    fcr: int = 0
    max_fifo_size: int = FIFO_BYTES
    intr_trigger_level: int = 1

    # -- image ------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return PORT.pack(
            bytes(self.uart_reg),
            bytes(self.fifo),
            self.head,
            self.tail,
            self.count,
            int(self.dlab),
            int(self.overrun),
            self.divisor,
            self.fcr,
            self.max_fifo_size,
            self.intr_trigger_level,
        )

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Port:
        """Parse and check one 36-byte port image.

        Raises:
            PortImageError: a field is out of range or the FIFO indices disagree.
        """
        fields = PORT.unpack(data)
        regs, fifo, head, tail, count, dlab, overrun, divisor, fcr, max_fifo, level = fields
        if head >= FIFO_BYTES or tail >= FIFO_BYTES:
            raise PortImageError(f"FIFO index out of range (head {head}, tail {tail})")
        if max_fifo not in (1, FIFO_BYTES) or count > max_fifo:
            raise PortImageError(f"FIFO count {count} with max_fifo_size {max_fifo}")
        # The sample's ring: push at head, pop at tail, so head - tail == count (mod 16).
        if (head - tail) % FIFO_BYTES != count % FIFO_BYTES:
            raise PortImageError(f"FIFO head {head}, tail {tail} disagree with count {count}")
        if dlab > 1 or overrun > 1:
            raise PortImageError(f"bool field holds {max(dlab, overrun)}")
        if level not in _TRIGGER_LEVELS.values():
            raise PortImageError(f"interrupt trigger level {level}")
        return cls(
            bytearray(regs),
            bytearray(fifo),
            head,
            tail,
            count,
            bool(dlab),
            bool(overrun),
            divisor,
            fcr,
            max_fifo,
            level,
        )

    # -- register access (one byte at a time, like the sample) -------------
    def write(self, offset: int, value: int) -> None:
        if offset == UART_RX:
            if self.dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            elif self.count < self.max_fifo_size:
                self.fifo[self.head] = value
                self.head = (self.head + 1) % FIFO_BYTES
                self.count += 1
                self.overrun = False
            else:
                self.overrun = True
        elif offset == UART_IER:
            if self.dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                self.uart_reg[offset] = value
        elif offset == UART_IIR:  # FCR on write
            self.fcr = value
            if value & (UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT):
                self.head = self.tail = self.count = 0
            if value & UART_FCR_ENABLE_FIFO:
                self.max_fifo_size = FIFO_BYTES
                self.intr_trigger_level = _TRIGGER_LEVELS[value & UART_FCR_TRIGGER_MASK]
            else:
                self.max_fifo_size = 1
                self.intr_trigger_level = 1
        elif offset == UART_LCR:
            if value & UART_LCR_DLAB:
                self.dlab = True
                self.divisor = 0
            else:
                self.dlab = False
            self.uart_reg[offset] = value
        elif offset in (UART_MCR, UART_SCR):
            self.uart_reg[offset] = value
        # LSR and MSR are read-only: writes are ignored, as in the sample.

    def read(self, offset: int) -> int:
        if offset == UART_RX:
            if self.dlab:
                return self.divisor & 0xFF
            if not self.count:
                return 0
            value = self.fifo[self.tail]
            self.tail = (self.tail + 1) % FIFO_BYTES
            self.count -= 1
            return value
        if offset == UART_IER:
            return self.divisor >> 8 if self.dlab else self.uart_reg[offset] & 0x0F
        if offset == UART_IIR:
            ier = self.uart_reg[UART_IER]
            iir = 0
            if ier & UART_IER_RLSI and self.overrun:
                iir = UART_IIR_RLSI
            elif ier & UART_IER_RDI and self.count >= self.intr_trigger_level:
                iir = UART_IIR_RDI
            elif ier & UART_IER_THRI and not self.count:
                iir = UART_IIR_THRI
            return (iir or UART_IIR_NO_INT) | 0xC0
        if offset == UART_LSR:
            lsr = UART_LSR_DR if self.count else 0
            if self.overrun:
                lsr |= UART_LSR_OE
            if not self.count:
                lsr |= UART_LSR_TEMT | UART_LSR_THRE
            return lsr
        if offset == UART_MSR:
            msr = UART_MSR_DSR | UART_MSR_DDSR | UART_MSR_DCD
            mcr = self.uart_reg[UART_MCR]
            if not mcr & UART_MCR_AFE or mcr & UART_MCR_RTS:
                msr |= UART_MSR_CTS
            return msr
        return self.uart_reg[offset]
