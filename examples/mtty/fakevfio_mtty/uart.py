"""The mtty sample's 16550-like UART port: registers, loop-back FIFO, 36-byte image.

Theory of operation
-------------------
Each port is one 8-byte I/O BAR whose registers behave as ``handle_bar_read``
and ``handle_bar_write`` of ``samples/vfio-mdev/mtty.c``: a byte written to THR
goes into a 16-entry loop-back FIFO and comes back when RBR is read, so what a
guest transmits it receives. :meth:`Port.read` and :meth:`Port.write` return,
besides the value, how many times the sample calls ``mtty_trigger_interrupt()``
for that access; :meth:`Port.interrupt_pending` is the IIR's "interrupt
pending" bit, the level of a real UART's interrupt output.

Rule 1 (THR): with DLAB set the byte is ORed into the divisor's low byte.
        Otherwise, if the FIFO has room (``count < max_fifo_size``), the byte is
        queued, overrun clears, and when IER.RDI is set and the count just
        reached the trigger level one interrupt is raised (receive data). A
        byte that finds the FIFO full is dropped, overrun is set, and IER.RLSI
        raises one interrupt (line status).
Rule 2 (IER): with DLAB set the byte is ORed into the divisor's high byte;
        otherwise stored, and setting IER.THRI while the FIFO is empty raises
        one interrupt (transmitter empty). Reads return the low nibble (or the
        divisor's high byte with DLAB).
Rule 3 (FCR): a clear bit empties the FIFO; ENABLE_FIFO sets the FIFO to 16
        bytes, else 1; the trigger level the guest programs is computed and
        then forced to 1, exactly as the sample does (it has no character
        timeout timer, so a level of 1 is what keeps a last byte from waiting
        in the FIFO forever). FCR is not kept in ``uart_reg``.
Rule 4 (LCR): setting DLAB also zeroes the divisor; the value is stored.
Rule 5 (MCR): stored; with IER.MSI set, OUT2 raises one interrupt and RTS or
        DTR another (the sample's two separate calls).
Rule 6 (RBR): with DLAB the divisor's low byte. Otherwise a byte is popped if
        the FIFO holds one (else 0 is returned: the sample leaves the buffer
        untouched); if the FIFO is then empty and IER.THRI is set, one
        interrupt is raised (transmitter empty).
Rule 7 (IIR): the OR of RLSI (IER.RLSI and overrun), RDI (IER.RDI and count >=
        trigger level), THRI (IER.THRI and FIFO empty) and MSI (IER.MSI and MCR
        RTS/DTR: its code is 0, so it never shows); NO_INT when that is 0;
        bits 6-7 always set (16550 FIFO present).
Rule 8 (LSR): DR when the FIFO holds data, OE while overrun (only a queued
        byte clears it), THRE and TEMT when the FIFO is empty. MSR: DSR, DDSR
        and DCD always; CTS and DCTS unless MCR.AFE is set and the FIFO is full.
        LSR and MSR ignore writes; SCR stores.

One deliberate difference from the sample: it tests "FIFO empty" as ``head ==
tail``, which a full FIFO (16 bytes, head wrapped onto tail) also satisfies, so
there a 16-byte burst (what Linux's 8250 driver writes per THRE interrupt)
would read as empty and be lost. Here "empty" is ``count == 0`` everywhere the
sample compares head and tail (RBR, IIR, LSR, the THRI triggers).

The port's migratable state is ``struct serial_port`` of the sample, 36 bytes,
little-endian:

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

:meth:`Port.from_bytes` checks an image for consistency, which the sample never
does (it copies whatever arrives).
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
UART_FCR = 2
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
UART_IER_MSI = 0x08
UART_IIR_NO_INT = 0x01
UART_IIR_MSI = 0x00
UART_IIR_THRI = 0x02
UART_IIR_RDI = 0x04
UART_IIR_RLSI = 0x06
UART_IIR_FIFO_BITS = 0xC0
UART_MSR_DCD = 0x80
UART_MSR_DSR = 0x20
UART_MSR_CTS = 0x10
UART_MSR_DDSR = 0x02
UART_MSR_DCTS = 0x01
UART_MCR_DTR = 0x01
UART_MCR_RTS = 0x02
UART_MCR_OUT2 = 0x08
UART_MCR_AFE = 0x20
TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}


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
    intr_trigger_level: int = 0

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
            raise PortImageError(f"FIFO index out of range (head {head}, tail {tail}, max 15)")
        if max_fifo not in (1, FIFO_BYTES) or count > max_fifo:
            raise PortImageError(f"FIFO count {count} with max_fifo_size {max_fifo} (1 or 16)")
        # The sample's ring: push at head, pop at tail, so head - tail == count (mod 16).
        if (head - tail) % FIFO_BYTES != count % FIFO_BYTES:
            raise PortImageError(f"FIFO head {head}, tail {tail} disagree with count {count}")
        if dlab > 1 or overrun > 1:
            raise PortImageError(f"bool field holds {max(dlab, overrun)} (0 or 1)")
        # 0 is the level of a port whose FCR was never written (the sample zero-fills).
        if level not in (0, 1):
            raise PortImageError(f"interrupt trigger level {level} (the sample forces 1)")
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

    # -- register access (one register per access, like the sample) -------
    def write(self, offset: int, value: int) -> int:
        """Write one register; returns the interrupts raised (Rules 1-5, 8)."""
        ier = self.uart_reg[UART_IER]
        if offset == UART_RX:
            if self.dlab:
                self.divisor |= value
                return 0
            if self.count < self.max_fifo_size:
                self.fifo[self.head] = value
                self.count += 1
                self.head = (self.head + 1) % FIFO_BYTES
                self.overrun = False
                return int(bool(ier & UART_IER_RDI) and self.count == self.intr_trigger_level)
            self.overrun = True
            return int(bool(ier & UART_IER_RLSI))
        if offset == UART_IER:
            if self.dlab:
                self.divisor |= value << 8
                return 0
            self.uart_reg[UART_IER] = value
            return int(bool(value & UART_IER_THRI) and self.count == 0)
        if offset == UART_FCR:
            self.fcr = value
            if value & (UART_FCR_CLEAR_RCVR | UART_FCR_CLEAR_XMIT):
                self.count = self.head = self.tail = 0
            # The programmed level is discarded: the sample has no timeout timer.
            self.intr_trigger_level = TRIGGER_LEVELS[value & UART_FCR_TRIGGER_MASK]
            self.intr_trigger_level = 1
            self.max_fifo_size = FIFO_BYTES if value & UART_FCR_ENABLE_FIFO else 1
            return 0
        if offset == UART_LCR:
            self.dlab = bool(value & UART_LCR_DLAB)
            if self.dlab:
                self.divisor = 0
            self.uart_reg[UART_LCR] = value
            return 0
        if offset == UART_MCR:
            self.uart_reg[UART_MCR] = value
            raised = 0
            if ier & UART_IER_MSI and value & UART_MCR_OUT2:
                raised += 1
            if ier & UART_IER_MSI and value & (UART_MCR_RTS | UART_MCR_DTR):
                raised += 1
            return raised
        if offset == UART_SCR:
            self.uart_reg[UART_SCR] = value
        return 0  # LSR and MSR ignore writes

    def read(self, offset: int) -> tuple[int, int]:
        """Read one register: ``(value, interrupts raised)`` (Rules 2, 6-8)."""
        if offset == UART_RX:
            if self.dlab:
                return self.divisor & 0xFF, 0
            value = 0
            if self.count:
                value = self.fifo[self.tail]
                self.count -= 1
                self.tail = (self.tail + 1) % FIFO_BYTES
            empty_irq = not self.count and self.uart_reg[UART_IER] & UART_IER_THRI
            return value, int(bool(empty_irq))
        if offset == UART_IER:
            if self.dlab:
                return self.divisor >> 8, 0
            return self.uart_reg[UART_IER] & 0x0F, 0
        if offset == UART_IIR:
            return (self.iir_cause() or UART_IIR_NO_INT) | UART_IIR_FIFO_BITS, 0
        if offset == UART_LSR:
            lsr = UART_LSR_DR if self.count else UART_LSR_TEMT | UART_LSR_THRE
            return lsr | (UART_LSR_OE if self.overrun else 0), 0
        if offset == UART_MSR:
            msr = UART_MSR_DSR | UART_MSR_DDSR | UART_MSR_DCD
            full = self.count >= self.max_fifo_size
            if not (self.uart_reg[UART_MCR] & UART_MCR_AFE and full):
                msr |= UART_MSR_CTS | UART_MSR_DCTS
            return msr, 0
        return self.uart_reg[offset], 0

    def iir_cause(self) -> int:
        """The IIR's interrupt bits as the sample ORs them (0: nothing pending)."""
        ier = self.uart_reg[UART_IER]
        iir = 0
        if ier & UART_IER_RLSI and self.overrun:
            iir |= UART_IIR_RLSI
        if ier & UART_IER_RDI and self.count >= self.intr_trigger_level:
            iir |= UART_IIR_RDI
        if ier & UART_IER_THRI and not self.count:
            iir |= UART_IIR_THRI
        if ier & UART_IER_MSI and self.uart_reg[UART_MCR] & (UART_MCR_RTS | UART_MCR_DTR):
            iir |= UART_IIR_MSI
        return iir

    def interrupt_pending(self) -> bool:
        """IIR bit 0 clear: the level of the port's interrupt output."""
        return self.iir_cause() != 0
