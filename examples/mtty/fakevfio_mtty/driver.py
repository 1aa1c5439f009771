"""The mtty sample device: PCI surface, interrupts and migration, at the arc level.

This driver shows the full-control level (:class:`fakevfio.driver.ArcDriver`):
it implements ``step()`` arc by arc, the way ``mtty_set_state()`` does in
``samples/vfio-mdev/mtty.c``, and returns its own :class:`~fakevfio.driver.SaveStream`
and :class:`~fakevfio.driver.LoadStream` on the arcs that open a data_fd. The
UART registers are :mod:`fakevfio_mtty.uart`.

Theory of operation
-------------------
The PCI surface is the sample's ``mtty_create_config_space()``: WCH vendor
0x4348, device 0x3253 (a CH352 dual serial card, which Linux's 8250_pci driver
binds as two 16550A ports, port N in BAR N), subsystem 0x4348:0x3253, revision
0x10, class 0x07 (communication) subclass 0x00 prog-if 0x02 (16550), command
I/O+, status 0x0200, the INTA pin, the vendor bytes at 0x40-0x4c and the
"PCI Serial/UART" string at 0x60. Each port is an 8-byte I/O BAR
(``Bar(size=8, kind=BarKind.IO)``). The core builds the BAR registers and the
MSI capability (one vector) from :meth:`MttyDriver.bars`, ``interrupt_pin`` and
``msi_vectors``; the sample advertises MSI only through VFIO_DEVICE_GET_IRQ_INFO.
The core's capability list starts at 0x60, so the MSI capability overwrites
the string there (only the bytes at 0x40-0x5f are left to the driver).

Interrupts (Rules I1-I3; where the UART raises one is :mod:`fakevfio_mtty.uart`):

Rule I1: each interrupt the sample's ``mtty_trigger_interrupt()`` would raise is
        ``raise_irq(IRQ_MSI)``; the core signals it only when the VMM enabled
        MSI (the sample signals only its active index).
Rule I2: INTx, ``intx=edge`` (default): the sample's triggers, one
        ``raise_irq(IRQ_INTX)`` each; the core automasks as the sample does
        (signal, then masked until the VMM's UNMASK), and keeps a trigger
        raised while masked pending until that unmask (the sample drops it).
        ``intx=level``: the line is the OR of the ports' IIR "interrupt
        pending", given to ``set_intx()`` whenever it changes, so the core
        signals on assertion when unmasked and again on an UNMASK while still
        asserted, as vfio-pci serves a level-triggered device.
Rule I3: the image has no separate interrupt state (IER, overrun and the FIFO
        are the interrupt state), so the interrupts are re-derived from the
        registers on every arc into RUNNING (a stopped device raises nothing):
        with ``intx=level`` the line is driven again; with ``intx=edge`` an IIR
        cause pending raises one MSI and one INTx trigger, so a destination
        whose FIFO holds bytes interrupts its guest (the sample raises nothing
        there; a spurious interrupt costs a guest one IIR read, a lost one
        stalls its port). A driver not attached to a device raises nothing.
Rule I4: the first arc into RUNNING after a load signals INTx once even when
        the loaded registers say nothing is pending (a spurious interrupt,
        edge or level mode). QEMU migrates the PCI INTx level (``irq_state``
        in vmstate_vfio_pci_config) but not vfio's ``intx.pending``, and its
        ``vfio_intx_eoi()`` lowers the level only when ``pending`` is set: a
        level asserted at the switchover (e.g. by an UNMASK that re-signalled
        just before the guest's IIR read cleared the cause) stays asserted on
        the destination for ever, and the guest spins in its interrupt handler
        with nothing to do until it disables the irq ("nobody cared"). One
        signal sets ``pending`` again, so the guest's next BAR access lowers
        the level and unmasks. This is QEMU's behaviour on its non-KVM INTx
        path (TCG, or ``x-no-kvm-intx``) with any level-triggered device,
        hardware included; KVM's irqfd path does not use ``irq_state``.

Accesses are split as ``mtty_read()``/``mtty_write()`` split them (4 bytes when
aligned and at least 4 remain, else 2, else 1); each piece reaches the register
at its first byte only, the rest of a piece reads as 0 and its writes are
dropped (the sample fills one byte of the piece).

The migration image is ``struct mtty_data``, little-endian::

    0   8  magic 0x7e9d09898c3e2c4e
    8   4  major version (1)
    12  4  minor version (0)
    16  4  nr_ports (1 or 2)
    20  4  flags (0)
    24  36 x nr_ports  struct serial_port (see fakevfio_mtty.uart)

Rule 1: RUNNING -> PRE_COPY (and RUNNING_P2P -> PRE_COPY_P2P) opens a saving
        stream holding only the 24-byte header: that is the whole pre-copy
        "initial" data (initial_bytes counts its unread bytes, dirty_bytes is
        always 0 because the ports are only ever sent in STOP_COPY). Once it is
        read, a read fails with ENOMSG (the sample returns 0 here).
Rule 2: PRE_COPY_P2P -> STOP_COPY appends the ports to the same stream; STOP ->
        STOP_COPY opens a stream with header and ports. In STOP_COPY a read past
        the image returns 0 bytes forever.
Rule 3: STOP -> RESUMING opens a write-only stream. Writes are stored in order;
        as soon as 24 bytes are present the header is checked. Bad magic or
        flags != 0 give EINVAL, another major/minor version or another nr_ports
        give EOPNOTSUPP, data past the image size gives ENOMEM. Any write error
        kills the stream (the core returns ENODEV for every later write).
Rule 4: RESUMING -> STOP re-checks the header, requires exactly the image size
        and checks every port for consistency; only then are the ports loaded.
        Otherwise EINVAL and the device stays in RESUMING (the sample checks
        neither the header again nor an exact length). A short image leaves the
        stream usable (write the rest, then try again); a bad one kills it.
Rule 5: every other arc is a no-op; ``reset`` does not touch the UART state
        (neither does the sample's VFIO_DEVICE_RESET).
"""

from __future__ import annotations

import errno
import hashlib
import struct
from collections.abc import Mapping
from typing import ClassVar

from fakevfio import MigFlags, State
from fakevfio.driver import (
    IRQ_INTX,
    IRQ_MSI,
    ArcDriver,
    Bar,
    BarKind,
    LoadStream,
    OptionSpec,
    PrecopyInfo,
    SaveStream,
)
from fakevfio.errors import ConfigError, DeviceError
from fakevfio_mtty.uart import PORT, REGISTERS, Port, PortImageError

MAGIC = 0x7E9D09898C3E2C4E
VENDOR_ID = 0x4348
DEVICE_ID = 0x3253
INTX_MODES = ("level", "edge")
MAJOR_VERSION = 1
MINOR_VERSION = 0
HEADER = struct.Struct("<QIIII")
assert HEADER.size == 24
PORT_BYTES = PORT.size


def image_size(nr_ports: int) -> int:
    """Bytes of a complete image (60 for one port, 96 for two)."""
    return HEADER.size + PORT_BYTES * nr_ports


def encode_header(
    nr_ports: int,
    *,
    major: int = MAJOR_VERSION,
    minor: int = MINOR_VERSION,
    flags: int = 0,
    magic: int = MAGIC,
) -> bytes:
    """The 24-byte image header (keyword arguments exist to build bad ones in tests)."""
    return HEADER.pack(magic, major, minor, nr_ports, flags)


def check_header(header: bytes | bytearray | memoryview, nr_ports: int) -> tuple[int, str] | None:
    """Return ``(errno, reason)`` if the header cannot be loaded by this device, else None."""
    magic, major, minor, ports, flags = HEADER.unpack(header)
    if magic != MAGIC:
        return errno.EINVAL, f"bad magic {magic:#018x} (expected {MAGIC:#018x})"
    if flags != 0:
        return errno.EINVAL, f"header flags {flags:#x} (must be 0)"
    if (major, minor) != (MAJOR_VERSION, MINOR_VERSION):
        return (
            errno.EOPNOTSUPP,
            f"image version {major}.{minor} (this driver loads {MAJOR_VERSION}.{MINOR_VERSION})",
        )
    if ports != nr_ports:
        return errno.EOPNOTSUPP, f"image of {ports} port(s), this device has {nr_ports}"
    return None


class MttySaveStream(SaveStream):
    """A saving data_fd: a buffer that grows once (Rule 2) and a read position."""

    def __init__(self, driver: MttyDriver, *, with_ports: bool) -> None:
        self._driver = driver
        self._buf = bytearray(encode_header(driver.nr_ports))
        self._pos = 0
        self.has_ports = False
        if with_ports:
            self.append_ports()

    def append_ports(self) -> None:
        if not self.has_ports:
            self._buf += self._driver.ports_image()
            self.has_ports = True

    def read(self, size: int, state: State) -> bytes:
        if size <= 0:
            return b""
        data = bytes(self._buf[self._pos : self._pos + size])
        self._pos += len(data)
        if not data and state is not State.STOP_COPY:
            # uAPI: the temporary end of a pre-copy stream is ENOMSG, not EOF.
            raise DeviceError(errno.ENOMSG, "no pre-copy data for now", device=self._driver.name)
        return data

    def precopy_info(self) -> PrecopyInfo:
        return PrecopyInfo(initial_bytes=len(self._buf) - self._pos, dirty_bytes=0)

    def remaining(self) -> int:
        left = len(self._buf) - self._pos
        return left if self.has_ports else left + PORT_BYTES * self._driver.nr_ports


class MttyLoadStream(LoadStream):
    """A resuming data_fd (Rules 3 and 4)."""

    def __init__(self, driver: MttyDriver) -> None:
        self._driver = driver
        self._size = image_size(driver.nr_ports)
        self._buf = bytearray()
        self._header_ok = False
        self.failed: DeviceError | None = None

    def _fail(self, err: int, msg: str) -> DeviceError:
        exc = DeviceError(
            err, f"resuming stream at byte {len(self._buf)}: {msg}", device=self._driver.name
        )
        self.failed = exc
        return exc

    def write(self, data: memoryview) -> None:
        if self.failed is not None:
            raise DeviceError(
                errno.ENODEV, "the stream was rejected earlier", device=self._driver.name
            )
        if len(self._buf) + len(data) > self._size:
            raise self._fail(
                errno.ENOMEM,
                f"{len(data)} more bytes would exceed the {self._size}-byte image",
            )
        self._buf += data
        if not self._header_ok and len(self._buf) >= HEADER.size:
            problem = check_header(self._buf[: HEADER.size], self._driver.nr_ports)
            if problem is not None:
                raise self._fail(*problem)
            self._header_ok = True

    def finish(self) -> list[Port]:
        """The RESUMING -> STOP check; returns the ports to load."""
        if self.failed is not None:
            raise DeviceError(
                errno.EINVAL,
                f"cannot load: the stream was rejected ({self.failed.detail})",
                device=self._driver.name,
            )
        if len(self._buf) != self._size:
            # Not fatal: the rest may still be written before the next attempt.
            raise DeviceError(
                errno.EINVAL,
                f"incomplete image: {len(self._buf)} of {self._size} bytes written",
                device=self._driver.name,
            )
        problem = check_header(self._buf[: HEADER.size], self._driver.nr_ports)
        if problem is not None:
            raise self._fail(*problem)
        ports = []
        for i in range(self._driver.nr_ports):
            off = HEADER.size + i * PORT_BYTES
            try:
                ports.append(Port.from_bytes(self._buf[off : off + PORT_BYTES]))
            except PortImageError as exc:
                raise self._fail(errno.EINVAL, f"port {i}: {exc}") from None
        return ports


class MttyDriver(ArcDriver):
    """The mtty sample serial device (1 or 2 ports), with its migration fixed up."""

    description = "the kernel's mtty sample serial device (arc-level driver example)"
    options: ClassVar[Mapping[str, OptionSpec]] = {
        "nr_ports": OptionSpec(kind="int", default="1", help="number of UART ports: 1 or 2"),
        "intx": OptionSpec(
            kind="str",
            default="edge",
            help="INTx: edge (the sample's triggers, automasked) or level (IIR pending)",
        ),
    }
    interrupt_pin = 1  # INTA#
    msi_vectors = 1

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        super().__init__(name, options)
        nr_ports = self.int_option("nr_ports")
        if nr_ports not in (1, 2):
            raise ConfigError(f"device {name}: nr_ports must be 1 or 2, got {nr_ports}")
        intx = self.option("intx")
        if intx not in INTX_MODES:
            raise ConfigError(f"device {name}: intx must be level or edge, got {intx!r}")
        self.nr_ports = nr_ports
        self.intx_mode = intx
        self.ports = [Port() for _ in range(nr_ports)]
        self.intx_line = False
        #: Rule I4: a load happened and no arc into RUNNING has followed yet
        self.loaded = False
        #: Interrupts the sample's model raised (``mtty_trigger_interrupt`` calls).
        self.triggers = 0

    @property
    def migration_flags(self) -> MigFlags:
        return MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY

    def initial_config(self) -> bytes:
        """``mtty_create_config_space()``; the core adds BARs and the MSI capability."""
        cfg = bytearray(self.config_size)
        struct.pack_into("<HHHH", cfg, 0, VENDOR_ID, DEVICE_ID, 0x0001, 0x0200)
        cfg[0x08:0x0C] = bytes([0x10, 0x02, 0x00, 0x07])  # revision, prog-if, subclass, class
        struct.pack_into("<I", cfg, 0x10, 0x1)  # BAR0: I/O space
        if self.nr_ports == 2:
            struct.pack_into("<I", cfg, 0x14, 0x1)  # BAR1: I/O space
        struct.pack_into("<HH", cfg, 0x2C, VENDOR_ID, DEVICE_ID)  # subsystem
        cfg[0x3D] = 0x01  # interrupt pin INTA#
        for off, value in ((0x40, 0x23), (0x43, 0x80), (0x44, 0x23), (0x48, 0x23), (0x4C, 0x23)):
            cfg[off] = value  # the sample's vendor-specific bytes
        cfg[0x60:0x6F] = b"PCI Serial/UART"
        return bytes(cfg)

    # -- regions: one 8-byte I/O BAR per port --------------------------------
    def regions(self) -> Mapping[str, int]:
        return {f"bar{i}": REGISTERS for i in range(self.nr_ports)}

    def bars(self) -> Mapping[int, Bar]:
        return {i: Bar(size=REGISTERS, kind=BarKind.IO) for i in range(self.nr_ports)}

    def _port(self, region: str) -> Port:
        return self.ports[int(region.removeprefix("bar"))]

    def region_read(self, region: str, offset: int, size: int) -> bytes:
        port = self._port(region)
        out = bytearray()
        raised = 0
        for off, piece in _pieces(offset, size):
            value, n = port.read(off)
            raised += n
            out += bytes([value]) + bytes(piece - 1)
        self._signal(raised)
        return bytes(out)

    def region_write(self, region: str, offset: int, data: memoryview) -> None:
        port = self._port(region)
        raised = 0
        pos = 0
        for off, piece in _pieces(offset, len(data)):
            raised += port.write(off, data[pos])
            pos += piece
        self._signal(raised)

    # -- interrupts (Rules I1-I3) ------------------------------------------
    def _signal(self, raised: int) -> None:
        self.triggers += raised
        if self._host is None:
            return
        for _ in range(raised):
            self.raise_irq(IRQ_MSI)
            if self.intx_mode == "edge":
                self.raise_irq(IRQ_INTX)
        if self.intx_mode == "level":
            self._drive_line(force=False)

    def _drive_line(self, *, force: bool) -> None:
        level = any(port.interrupt_pending() for port in self.ports)
        if level != self.intx_line or (force and level):
            self.intx_line = level
            self.set_intx(level)

    # -- migration ------------------------------------------------------
    def ports_image(self) -> bytes:
        return b"".join(port.to_bytes() for port in self.ports)

    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        arc = (current, nxt)
        if arc in {(State.RUNNING, State.PRE_COPY), (State.RUNNING_P2P, State.PRE_COPY_P2P)}:
            return MttySaveStream(self, with_ports=False)
        if arc == (State.STOP, State.STOP_COPY):
            return MttySaveStream(self, with_ports=True)
        if nxt is State.STOP_COPY:  # PRE_COPY_P2P (or PRE_COPY) -> STOP_COPY: same stream
            if not isinstance(stream, MttySaveStream):
                raise DeviceError(errno.EINVAL, "no pre-copy stream to complete", device=self.name)
            stream.append_ports()
            return None
        if arc == (State.STOP, State.RESUMING):
            return MttyLoadStream(self)
        if arc == (State.RESUMING, State.STOP):
            if not isinstance(stream, MttyLoadStream):
                raise DeviceError(errno.EINVAL, "no resuming stream to load", device=self.name)
            self.ports = stream.finish()
            self.intx_line = False  # this device's line: driven again on RUNNING
            self.loaded = True
        elif nxt is State.RUNNING:
            self._resync()
        return None

    def _resync(self) -> None:
        """Rules I3 and I4: interrupt for what the (loaded) registers say is pending,
        and after a load signal INTx at least once."""
        loaded, self.loaded = self.loaded, False
        if self._host is None:
            return
        pending = any(port.interrupt_pending() for port in self.ports)
        if self.intx_mode == "level":
            self._drive_line(force=True)
        elif pending:
            self.raise_irq(IRQ_MSI)
            self.raise_irq(IRQ_INTX)
        if loaded and not pending:
            self.raise_irq(IRQ_INTX)  # Rule I4: give QEMU back its intx.pending

    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        # Like the sample: the fixed image size, whatever the state.
        return image_size(self.nr_ports)

    def digest(self) -> str:
        return hashlib.sha256(encode_header(self.nr_ports) + self.ports_image()).hexdigest()

    def info(self) -> Mapping[str, object]:
        return {
            "nr_ports": self.nr_ports,
            "image_size": image_size(self.nr_ports),
            "intx": self.intx_mode,
            "intx_line": self.intx_line,
            "triggers": self.triggers,
            "fifo_counts": [port.count for port in self.ports],
        }


def _pieces(offset: int, size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each access ``mtty_read``/``mtty_write`` would make."""
    out = []
    end = offset + size
    while offset < end:
        left = end - offset
        piece = 4 if left >= 4 and offset % 4 == 0 else 2 if left >= 2 and offset % 2 == 0 else 1
        out.append((offset, piece))
        offset += piece
    return out
