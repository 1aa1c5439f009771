"""Tests of the mtty example driver, in process through fakevfio.testing's conformance kit."""

from __future__ import annotations

import errno
import struct
from pathlib import Path

import pytest
from fakevfio_mtty import MAGIC, MttyDriver, encode_header, image_size
from fakevfio_mtty.uart import (
    UART_FCR_CLEAR_RCVR,
    UART_LCR_DLAB,
    UART_LSR,
    UART_LSR_DR,
    UART_LSR_OE,
    UART_MCR_AFE,
    UART_MCR_DTR,
    UART_MCR_OUT2,
    UART_MCR_RTS,
)

from fakevfio import State
from fakevfio.driver import BarKind
from fakevfio.errors import ConfigError, DeviceError
from fakevfio.testing import LocalDevice, check_arc_driver, round_trip

CHUNKS = [1, 7, 4099]
THR = 0
Mtty = LocalDevice[MttyDriver]


def make(nr_ports: int = 1, name: str = "src") -> Mtty:
    return LocalDevice(MttyDriver(name, {"nr_ports": str(nr_ports)}))


def uart_write(dev: Mtty, port: int, data: bytes) -> None:
    for b in data:
        dev.region_write(f"bar{port}", THR, bytes([b]))


def uart_read(dev: Mtty, port: int, n: int) -> bytes:
    return b"".join(dev.region_read(f"bar{port}", THR, 1) for _ in range(n))


def lsr(dev: Mtty, port: int) -> int:
    return dev.region_read(f"bar{port}", UART_LSR, 1)[0]


def _with_bytes(name: str) -> MttyDriver:
    """A two-port source with bytes waiting in both FIFOs."""
    driver = MttyDriver(name, {"nr_ports": "2"})
    for port, data in ((0, b"hello"), (1, b"port1")):
        for b in data:
            driver.region_write(f"bar{port}", THR, memoryview(bytes([b])))
    return driver


def test_mtty_follows_the_driver_rules() -> None:
    check_arc_driver(_with_bytes, dest_factory=lambda name: MttyDriver(name, {"nr_ports": "2"}))


@pytest.mark.parametrize("nr_ports", [1, 2])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_mtty_bytes_written_before_migration_read_back_after(chunk: int, nr_ports: int) -> None:
    src, dst = make(nr_ports), make(nr_ports, "dst")
    uart_write(src, 0, b"hello")
    if nr_ports == 2:
        uart_write(src, 1, b"port1")
    stream = round_trip(src, dst, save_chunk=chunk, load_chunk=chunk)
    assert len(stream) == image_size(nr_ports) == 24 + 36 * nr_ports
    assert lsr(dst, 0) & UART_LSR_DR
    assert uart_read(dst, 0, 5) == b"hello"
    assert not lsr(dst, 0) & UART_LSR_DR
    if nr_ports == 2:
        assert uart_read(dst, 1, 5) == b"port1"


def test_mtty_image_layout_matches_struct_mtty_data() -> None:
    src = make(2)
    uart_write(src, 1, b"ab")
    stream = src.save()
    assert struct.unpack_from("<QIIII", stream) == (MAGIC, 1, 0, 2, 0)
    port1 = stream[24 + 36 :]
    assert port1[8:10] == b"ab"  # rxtx.fifo
    assert (port1[24], port1[25], port1[26]) == (2, 0, 2)  # head, tail, count
    assert port1[33] == 16  # max_fifo_size
    assert src.data_size() == 96


def test_mtty_precopy_sends_header_then_enomsg_then_ports() -> None:
    src = make(1)
    uart_write(src, 0, b"x")
    assert src.set_state(State.PRE_COPY)
    assert src.precopy_info().initial_bytes == 24
    assert src.precopy_info().dirty_bytes == 0
    first = src.read(7)
    assert src.precopy_info().initial_bytes == 17
    header = first + src.read(100)
    assert header == encode_header(1)
    assert src.precopy_info().initial_bytes == 0
    with pytest.raises(DeviceError) as exc:
        src.read(100)
    assert exc.value.errno == errno.ENOMSG
    assert src.data_size() == 60
    assert not src.set_state(State.STOP_COPY)  # same stream continues
    rest = src.drain(7)
    assert len(rest) == 36
    assert src.read(10) == b""  # EOF forever in STOP_COPY
    src.set_state(State.STOP)
    dst = make(1, "dst")
    dst.load(header + rest)
    assert uart_read(dst, 0, 1) == b"x"


@pytest.mark.parametrize(
    ("header", "err"),
    [
        pytest.param(encode_header(1, magic=MAGIC ^ 1), errno.EINVAL, id="magic"),
        pytest.param(encode_header(1, flags=1), errno.EINVAL, id="flags"),
        pytest.param(encode_header(1, major=2), errno.EOPNOTSUPP, id="major"),
        pytest.param(encode_header(1, minor=1), errno.EOPNOTSUPP, id="minor"),
        pytest.param(encode_header(2), errno.EOPNOTSUPP, id="nr_ports"),
    ],
)
def test_mtty_resume_rejects_bad_header(header: bytes, err: int) -> None:
    src, dst = make(1), make(1, "dst")
    stream = header + src.save()[24:]
    dst.set_state(State.RESUMING)
    dst.write(stream[:20])
    with pytest.raises(DeviceError) as exc:
        dst.write(stream[20:30])  # completes the header
    assert exc.value.errno == err
    with pytest.raises(DeviceError) as exc:
        dst.write(stream[30:])
    assert exc.value.errno == errno.ENODEV  # the stream is dead
    with pytest.raises(DeviceError) as exc:
        dst.set_state(State.STOP)
    assert exc.value.errno == errno.EINVAL
    assert dst.state() is State.RESUMING
    dst.reset()
    assert dst.state() is State.RUNNING


def test_mtty_resume_rejects_data_past_the_image() -> None:
    stream = make(1).save()
    dst = make(1, "dst")
    dst.set_state(State.RESUMING)
    with pytest.raises(DeviceError) as exc:
        dst.write(stream + b"\0")
    assert exc.value.errno == errno.ENOMEM


def test_mtty_resume_short_image_fails_stop_and_can_be_completed() -> None:
    stream = make(1).save()
    dst = make(1, "dst")
    dst.start_load(stream[:-1])
    with pytest.raises(DeviceError) as exc:
        dst.set_state(State.STOP)
    assert exc.value.errno == errno.EINVAL
    assert dst.state() is State.RESUMING
    dst.write(stream[-1:])
    dst.set_state(State.STOP)
    assert dst.state() is State.STOP


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        pytest.param(24 + 26, 5, id="count-vs-head-tail"),
        pytest.param(24 + 24, 16, id="head-out-of-range"),
        pytest.param(24 + 27, 2, id="dlab-not-bool"),
        pytest.param(24 + 33, 3, id="max-fifo-size"),
    ],
)
def test_mtty_resume_rejects_inconsistent_port(offset: int, value: int) -> None:
    stream = bytearray(make(1).save())
    stream[offset] = value
    dst = make(1, "dst")
    before = dst.digest()
    with pytest.raises(DeviceError) as exc:
        dst.load(bytes(stream))
    assert exc.value.errno == errno.EINVAL
    assert dst.state() is State.RESUMING
    assert dst.digest() == before  # nothing was loaded


def test_mtty_resume_rejects_corrupted_stream_from_fault_rule() -> None:
    src = make(1)
    src.set_faults("corrupt after 3")  # flips a bit of the magic
    stream = src.save()
    dst = make(1, "dst")
    with pytest.raises(DeviceError) as exc:
        dst.start_load(stream, 7)
    assert exc.value.errno == errno.EINVAL


def test_mtty_uart_divisor_fifo_overrun_and_clear() -> None:
    dev = make(1)
    dev.region_write("bar0", 3, bytes([UART_LCR_DLAB]))
    dev.region_write("bar0", 0, b"\x0c")
    dev.region_write("bar0", 1, b"\x01")
    assert dev.region_read("bar0", 0, 1) == b"\x0c"
    assert dev.region_read("bar0", 1, 1) == b"\x01"
    dev.region_write("bar0", 3, b"\x03")
    uart_write(dev, 0, bytes(range(17)))  # one more than the FIFO holds
    assert lsr(dev, 0) & UART_LSR_OE
    assert lsr(dev, 0) & UART_LSR_DR  # a full FIFO still has data (the sample says no)
    dev.region_write("bar0", 2, bytes([UART_FCR_CLEAR_RCVR | 1]))
    assert not lsr(dev, 0) & UART_LSR_DR
    assert uart_read(dev, 0, 1) == b"\0"


def test_mtty_reset_keeps_uart_state_and_ends_session() -> None:
    dev = make(1)
    uart_write(dev, 0, b"z")
    assert dev.set_state(State.PRE_COPY)
    dev.reset()
    assert dev.state() is State.RUNNING
    assert not dev.session_alive()
    assert uart_read(dev, 0, 1) == b"z"


def test_mtty_options() -> None:
    assert set(MttyDriver.options) == {"nr_ports", "intx"}
    with pytest.raises(ConfigError, match="nr_ports"):
        MttyDriver("d", {"nr_ports": "3"})
    with pytest.raises(ConfigError, match="intx must be level or edge"):
        MttyDriver("d", {"intx": "pulse"})
    with pytest.raises(ConfigError, match="unknown option"):
        MttyDriver("d", {"ports": "1"})
    dev = make(2)
    assert dict(dev.regions()) == {"bar0": 8, "bar1": 8}
    assert dev.info()["migration_flags"] == ["STOP_COPY", "P2P", "PRE_COPY"]


# -- the register model against samples/vfio-mdev/mtty.c -----------------------
# Expected values are read off the sample's handle_bar_read / handle_bar_write and
# the register bits of include/uapi/linux/serial_reg.h (checked against the
# system's header by test_mtty_constants_and_layout_match_the_c_headers).

IER, FCR, LCR, MCR, MSR, SCR = 1, 2, 3, 4, 6, 7
IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08


class Recorder:
    """A DriverHost that records what the driver asks of the VM."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def raise_irq(self, index: int, vector: int) -> None:
        assert vector == 0
        self.calls.append(("raise", index))

    def irq_enabled(self, index: int) -> bool:
        return True  # the sample signals whichever index the VMM enabled

    def set_intx(self, asserted: bool) -> None:
        self.calls.append(("intx", int(asserted)))

    def dma_read(self, iova: int, length: int) -> bytes:
        raise AssertionError("mtty does no DMA")

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        raise AssertionError("mtty does no DMA")

    def take(self) -> list[tuple[str, int]]:
        out, self.calls = self.calls, []
        return out


def attached(intx: str = "level", nr_ports: int = 1) -> tuple[MttyDriver, Recorder]:
    driver = MttyDriver("m", {"nr_ports": str(nr_ports), "intx": intx})
    host = Recorder()
    driver._host = host
    return driver, host


def wr(driver: MttyDriver, offset: int, *values: int, port: int = 0) -> None:
    for v in values:
        driver.region_write(f"bar{port}", offset, memoryview(bytes([v])))


def rd(driver: MttyDriver, offset: int, port: int = 0) -> int:
    return driver.region_read(f"bar{port}", offset, 1)[0]


MSI = ("raise", 1)
EDGE = ("raise", 0)


def test_mtty_config_space_is_the_samples() -> None:
    cfg = MttyDriver("m", {"nr_ports": "2"}).initial_config()
    assert struct.unpack_from("<HHHH", cfg, 0) == (0x4348, 0x3253, 0x0001, 0x0200)
    assert cfg[8:12] == bytes([0x10, 0x02, 0x00, 0x07])  # rev, prog-if 16550, serial class
    assert struct.unpack_from("<II", cfg, 0x10) == (1, 1)  # two I/O BARs
    assert struct.unpack_from("<HH", cfg, 0x2C) == (0x4348, 0x3253)
    assert (cfg[0x34], cfg[0x3D]) == (0, 1)  # no capability of its own, INTA#
    assert (cfg[0x40], cfg[0x43], cfg[0x44], cfg[0x48], cfg[0x4C]) == (0x23, 0x80, 0x23, 0x23, 0x23)
    assert cfg[0x60:0x6F] == b"PCI Serial/UART"
    assert struct.unpack_from("<I", MttyDriver("m", {}).initial_config(), 0x14) == (0,)
    driver = MttyDriver("m", {"nr_ports": "2"})
    assert {i: (b.size, b.kind) for i, b in driver.bars().items()} == {
        0: (8, BarKind.IO),
        1: (8, BarKind.IO),
    }
    assert (driver.interrupt_pin, driver.msi_vectors, driver.msix_vectors) == (1, 1, 0)


def test_mtty_config_space_as_the_core_builds_it() -> None:
    """The sample's fields survive the core's BAR and capability layer; MSI is one vector."""
    cfg = make(2).config()
    assert struct.unpack_from("<HH", cfg, 0) == (0x4348, 0x3253)
    assert cfg[8:12] == bytes([0x10, 0x02, 0x00, 0x07])
    assert struct.unpack_from("<HH", cfg, 0x2C) == (0x4348, 0x3253)
    assert struct.unpack_from("<II", cfg, 0x10)[0] & 0x1 == 1  # I/O space indicator
    assert struct.unpack_from("<II", cfg, 0x10)[1] & 0x1 == 1
    assert cfg[0x3D] == 1
    assert (cfg[0x40], cfg[0x43], cfg[0x4C]) == (0x23, 0x80, 0x23)
    assert struct.unpack_from("<H", cfg, 6)[0] & 0x10  # capabilities list
    chain, ptr = [], cfg[0x34]
    while ptr:
        chain.append(cfg[ptr])
        ptr = cfg[ptr + 1]
    assert chain == [0x05]  # MSI only: no MSI-X, not PCI Express
    msi_control = struct.unpack_from("<H", cfg, cfg[0x34] + 2)[0]
    assert (msi_control >> 1) & 0x7 == 0  # multiple message capable: 1 vector


@pytest.mark.parametrize("trigger", [0x00, 0x40, 0x80, 0xC0])
def test_mtty_fcr_forces_trigger_level_1_so_each_first_byte_interrupts(trigger: int) -> None:
    driver, host = attached("edge")
    wr(driver, FCR, trigger | 0x01 | 0x06)  # enable + clear, any programmed level
    wr(driver, IER, IER_RDI)
    wr(driver, THR, 0x41)
    assert host.take() == [MSI, EDGE]  # count reached the (forced) level 1
    wr(driver, THR, 0x42)
    assert host.take() == []  # count 2 != 1: the sample raises only on equality
    assert rd(driver, IIR := 2) == 0xC4  # RDI pending (count >= level)
    assert driver.ports[0].intr_trigger_level == 1
    assert driver.ports[0].fcr == trigger | 0x07
    assert rd(driver, IIR) == 0xC4


def test_mtty_without_fifo_enable_one_byte_holds_and_overrun_raises_line_status() -> None:
    driver, host = attached("edge")
    wr(driver, FCR, 0x00)  # FIFO disabled: max_fifo_size 1
    wr(driver, IER, IER_RDI | IER_RLSI)
    wr(driver, THR, 1)
    assert host.take() == [MSI, EDGE]
    wr(driver, THR, 2)  # no room: dropped, overrun, RLSI interrupt
    assert host.take() == [MSI, EDGE]
    assert rd(driver, UART_LSR) == UART_LSR_DR | UART_LSR_OE
    assert rd(driver, 2) == 0xC6  # RLSI | RDI
    assert rd(driver, THR) == 1
    assert rd(driver, UART_LSR) == 0x60 | UART_LSR_OE  # overrun stays until a byte is queued
    wr(driver, THR, 3)
    assert host.take() == [MSI, EDGE]  # queued: overrun cleared, count back at 1
    assert rd(driver, UART_LSR) == UART_LSR_DR
    wr(driver, IER, 0)
    wr(driver, THR, 4)  # overrun without IER.RLSI: no interrupt
    assert host.take() == []


def test_mtty_transmitter_empty_interrupts_on_ier_write_and_on_draining_read() -> None:
    driver, host = attached("edge")
    wr(driver, FCR, 0x07)
    wr(driver, IER, IER_THRI)  # empty FIFO + THRI: raise
    assert host.take() == [MSI, EDGE]
    assert rd(driver, 2) == 0xC2
    wr(driver, IER, 0)
    wr(driver, THR, 7, 8)
    wr(driver, IER, IER_THRI)  # not empty: nothing
    assert host.take() == []
    assert rd(driver, 2) == 0xC1
    assert rd(driver, THR) == 7
    assert host.take() == []  # one byte left
    assert rd(driver, THR) == 8
    assert host.take() == [MSI, EDGE]  # the read emptied the FIFO
    assert rd(driver, THR) == 0  # empty: 0, and THRI raises again (head == tail)
    assert host.take() == [MSI, EDGE]


def test_mtty_iir_ors_the_causes_and_hides_modem_status() -> None:
    driver, _ = attached()
    wr(driver, FCR, 0x07)
    assert rd(driver, 2) == 0xC1  # IER 0: no interrupt, FIFO bits set
    wr(driver, IER, IER_MSI)
    wr(driver, MCR, UART_MCR_RTS)
    assert rd(driver, 2) == 0xC1  # UART_IIR_MSI is 0: the sample's OR never shows it
    wr(driver, IER, IER_RDI | IER_THRI | IER_RLSI | IER_MSI)
    assert rd(driver, 2) == 0xC2
    wr(driver, THR, *range(17))
    assert rd(driver, 2) == 0xC6  # RLSI (overrun) | RDI
    assert rd(driver, IER) == 0x0F  # reads back the low nibble
    wr(driver, IER, 0xF1)
    assert rd(driver, IER) == 0x01
    assert driver.ports[0].uart_reg[1] == 0xF1  # the sample stores all 8 bits


def test_mtty_full_fifo_reads_back_all_16_bytes() -> None:
    driver, _ = attached()
    wr(driver, FCR, 0x07)
    wr(driver, THR, *range(0x30, 0x40))
    port = driver.ports[0]
    assert (port.head, port.tail, port.count) == (0, 0, 16)  # head wrapped onto tail
    assert rd(driver, UART_LSR) == UART_LSR_DR  # the sample's head != tail test says empty
    assert bytes(rd(driver, THR) for _ in range(16)) == bytes(range(0x30, 0x40))
    assert rd(driver, UART_LSR) == 0x60


def test_mtty_msr_cts_follows_afe_and_fifo_room() -> None:
    driver, _ = attached()
    wr(driver, FCR, 0x07)
    assert rd(driver, MSR) == 0xB3  # DCD DSR CTS DDSR DCTS
    wr(driver, MCR, UART_MCR_AFE)
    assert rd(driver, MSR) == 0xB3  # room in the FIFO
    wr(driver, THR, *range(16))
    assert rd(driver, MSR) == 0xA2  # AFE and full: no CTS
    wr(driver, MCR, 0)
    assert rd(driver, MSR) == 0xB3
    wr(driver, MSR, 0, UART_LSR, 0xFF)  # read-only: ignored
    assert rd(driver, MSR) == 0xB3
    assert rd(driver, UART_LSR) == UART_LSR_DR


def test_mtty_mcr_raises_twice_with_modem_status_enabled() -> None:
    driver, host = attached("edge")
    wr(driver, MCR, UART_MCR_OUT2 | UART_MCR_RTS)
    assert host.take() == []  # IER.MSI clear
    wr(driver, IER, IER_MSI)
    wr(driver, MCR, UART_MCR_OUT2 | UART_MCR_RTS)
    assert host.take() == [MSI, EDGE, MSI, EDGE]
    wr(driver, MCR, UART_MCR_DTR)
    assert host.take() == [MSI, EDGE]
    assert rd(driver, MCR) == UART_MCR_DTR
    wr(driver, SCR, 0x5A)
    assert rd(driver, SCR) == 0x5A


def test_mtty_divisor_latch_is_ored_and_zeroed_by_dlab() -> None:
    driver, _ = attached()
    wr(driver, LCR, UART_LCR_DLAB | 0x03)
    wr(driver, THR, 0x01, 0x02)  # DLL ORed: 0x03
    wr(driver, IER, 0x10)
    assert (rd(driver, THR), rd(driver, IER)) == (0x03, 0x10)
    assert rd(driver, LCR) == 0x83
    wr(driver, LCR, UART_LCR_DLAB)  # DLAB again: divisor back to 0
    assert (rd(driver, THR), rd(driver, IER)) == (0, 0)
    wr(driver, LCR, 0x03)
    assert rd(driver, UART_LSR) == 0x60  # the DLL writes queued nothing


def test_mtty_wide_accesses_reach_one_register_per_piece() -> None:
    driver, _ = attached()
    wr(driver, FCR, 0x07)
    driver.region_write("bar0", 0, memoryview(b"\x41\x0f"))  # one 2-byte piece: THR only
    assert driver.ports[0].uart_reg[1] == 0
    assert driver.ports[0].count == 1
    driver.region_write("bar0", 1, memoryview(b"\x42\x43"))  # two 1-byte pieces: IER, FCR
    assert driver.ports[0].uart_reg[1] == 0x42
    assert driver.ports[0].fcr == 0x43
    wr(driver, IER, 0)
    wr(driver, FCR, 0x07)
    wr(driver, THR, 0x55)
    assert driver.region_read("bar0", 0, 4) == b"\x55\0\0\0"  # RBR popped, rest 0
    assert driver.region_read("bar0", 4, 4) == bytes([0, 0, 0, 0])  # MCR piece only
    assert driver.region_read("bar0", 5, 3) == bytes([0x60, 0xB3, 0])  # LSR, MSR, SCR


def test_mtty_intx_level_follows_iir_pending() -> None:
    driver, host = attached("level")
    wr(driver, FCR, 0x07)
    wr(driver, IER, IER_RDI | IER_RLSI)
    assert host.take() == []
    wr(driver, THR, 0x61)
    assert host.take() == [MSI, ("intx", 1)]  # one MSI edge, the line goes up
    wr(driver, THR, 0x62)
    assert host.take() == []  # still asserted: no new call
    rd(driver, THR)
    assert host.take() == []
    rd(driver, THR)
    assert host.take() == [("intx", 0)]  # drained, IER.THRI clear: line down
    wr(driver, IER, IER_RDI | IER_THRI)
    assert host.take() == [MSI, ("intx", 1)]  # transmitter empty
    wr(driver, IER, IER_RDI)
    assert host.take() == [("intx", 0)]
    assert driver.info()["intx_line"] is False


def test_mtty_intx_level_is_the_or_of_both_ports() -> None:
    driver, host = attached("level", nr_ports=2)
    for port in (0, 1):
        wr(driver, FCR, 0x07, port=port)
        wr(driver, IER, IER_RDI, port=port)
    wr(driver, THR, 1, port=0)
    wr(driver, THR, 2, port=1)
    assert host.take() == [MSI, ("intx", 1), MSI]
    rd(driver, THR, port=0)
    assert host.take() == []  # port 1 still pending
    rd(driver, THR, port=1)
    assert host.take() == [("intx", 0)]


def test_mtty_unattached_driver_raises_nothing() -> None:
    driver = MttyDriver("m", {})
    wr(driver, FCR, 0x07)
    wr(driver, IER, IER_RDI | IER_THRI)
    wr(driver, THR, 1)
    assert driver.triggers == 2  # counted, but there is no VM to interrupt
    assert driver.intx_line is False


def _source_with_pending_rdi() -> Mtty:
    src = make(1)
    src.region_write("bar0", FCR, bytes([0x07]))
    uart_write(src, 0, b"ab")
    src.region_write("bar0", IER, bytes([IER_RDI]))  # enabled after the bytes: no edge
    return src


def test_mtty_destination_interrupts_for_migrated_fifo_bytes_level() -> None:
    src = _source_with_pending_rdi()
    dst = LocalDevice(MttyDriver("dst", {"intx": "level"}))
    host = Recorder()
    dst.driver._host = host
    dst.load(src.save())
    assert host.take() == []  # STOP: a stopped device raises nothing
    dst.set_state(State.RUNNING)
    assert host.take() == [("intx", 1)]  # Rule I3: the loaded FIFO asserts the line
    assert uart_read(dst, 0, 2) == b"ab"
    assert host.take() == [("intx", 0)]


def test_mtty_destination_interrupts_for_migrated_fifo_bytes_edge() -> None:
    src = _source_with_pending_rdi()
    dst = make(1, "dst")
    host = Recorder()
    dst.driver._host = host
    dst.load(src.save())
    assert host.take() == []  # STOP: nothing yet
    dst.set_state(State.RUNNING)
    assert host.take() == [MSI, EDGE]  # one trigger for the pending receive data
    assert uart_read(dst, 0, 2) == b"ab"
    assert host.take() == []  # IER.THRI clear: draining raises nothing
    empty = make(1, "dst2")
    empty.driver._host = host
    empty.load(make(1).save())
    empty.set_state(State.RUNNING)
    assert host.take() == [EDGE]  # Rule I4: nothing pending, still one INTx after a load
    empty.set_state(State.STOP)
    empty.set_state(State.RUNNING)
    assert host.take() == []  # only the first arc into RUNNING after the load


@pytest.mark.parametrize("intx", ["level", "edge"])
def test_mtty_signals_intx_once_after_a_load_with_nothing_pending(intx: str) -> None:
    """Rule I4: QEMU restores the PCI INTx level but not vfio's intx.pending, so a
    level asserted at the switchover is only ever lowered after one more signal."""
    dst = LocalDevice(MttyDriver("dst", {"intx": intx}))
    host = Recorder()
    dst.driver._host = host
    dst.load(make(1).save())
    assert host.take() == []  # STOP: a stopped device raises nothing
    dst.set_state(State.RUNNING)
    assert host.take() == [EDGE]
    assert dst.driver.info()["intx_line"] is False  # a signal, not a line left asserted
    fresh = LocalDevice(MttyDriver("fresh", {"intx": intx}))
    fresh.driver._host = host
    fresh.set_state(State.STOP)
    fresh.set_state(State.RUNNING)
    assert host.take() == []  # no load, no spurious interrupt


@pytest.mark.parametrize("level", [2, 4, 8, 14])
def test_mtty_resume_rejects_a_trigger_level_the_sample_never_keeps(level: int) -> None:
    stream = bytearray(make(1).save())
    stream[24 + 34] = level
    dst = make(1, "dst")
    with pytest.raises(DeviceError) as exc:
        dst.load(bytes(stream))
    assert exc.value.errno == errno.EINVAL
    assert "trigger level" in exc.value.detail


C_CHECK = r"""
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <linux/serial_reg.h>
#include <linux/types.h>

struct rxtx { __u8 fifo[16]; __u8 head, tail; __u8 count; };
struct serial_port {
    __u8 uart_reg[8]; struct rxtx rxtx; bool dlab; bool overrun; __u16 divisor;
    __u8 fcr; __u8 max_fifo_size; __u8 intr_trigger_level;
};
struct mtty_data { __u64 magic; __u32 major_ver, minor_ver, nr_ports, flags;
                   struct serial_port ports[2]; };
#define P(x) printf(#x " %d\n", (int)(x))
int main(void) {
    P(UART_RX); P(UART_IER); P(UART_IIR); P(UART_FCR); P(UART_LCR); P(UART_MCR);
    P(UART_LSR); P(UART_MSR); P(UART_SCR); P(UART_LCR_DLAB); P(UART_FCR_ENABLE_FIFO);
    P(UART_FCR_CLEAR_RCVR); P(UART_FCR_CLEAR_XMIT); P(UART_FCR_TRIGGER_MASK);
    P(UART_LSR_DR); P(UART_LSR_OE); P(UART_LSR_THRE); P(UART_LSR_TEMT); P(UART_IER_RDI);
    P(UART_IER_THRI); P(UART_IER_RLSI); P(UART_IER_MSI); P(UART_IIR_NO_INT); P(UART_IIR_MSI);
    P(UART_IIR_THRI); P(UART_IIR_RDI); P(UART_IIR_RLSI); P(UART_MSR_DCD); P(UART_MSR_DSR);
    P(UART_MSR_CTS); P(UART_MSR_DDSR); P(UART_MSR_DCTS); P(UART_MCR_DTR); P(UART_MCR_RTS);
    P(UART_MCR_OUT2); P(UART_MCR_AFE);
    P(sizeof(struct serial_port)); P(offsetof(struct serial_port, rxtx.head));
    P(offsetof(struct serial_port, dlab)); P(offsetof(struct serial_port, overrun));
    P(offsetof(struct serial_port, divisor)); P(offsetof(struct serial_port, fcr));
    P(offsetof(struct serial_port, intr_trigger_level));
    P(offsetof(struct mtty_data, ports)); P(sizeof(struct mtty_data));
    return 0;
}
"""


def test_mtty_constants_and_layout_match_the_c_headers(tmp_path: Path) -> None:
    """The register bits against the system's <linux/serial_reg.h>, and the image layout
    against the C compiler's layout of the sample's struct declarations."""
    import shutil
    import subprocess

    from fakevfio_mtty import uart

    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = tmp_path / "check.c"
    src.write_text(C_CHECK)
    exe = tmp_path / "check"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    values = dict(line.rsplit(" ", 1) for line in out.splitlines())
    for name, value in values.items():
        if name.startswith("UART_"):
            assert getattr(uart, name) == int(value), name
    port = uart.Port(divisor=0x1234, fcr=0x56, intr_trigger_level=1, dlab=True, overrun=True)
    image = port.to_bytes()
    assert len(image) == int(values["sizeof(struct serial_port)"]) == uart.PORT.size
    assert image[int(values["offsetof(struct serial_port, divisor)"])] == 0x34
    assert image[int(values["offsetof(struct serial_port, fcr)"])] == 0x56
    assert image[int(values["offsetof(struct serial_port, dlab)"])] == 1
    assert image[int(values["offsetof(struct serial_port, overrun)"])] == 1
    assert image[int(values["offsetof(struct serial_port, intr_trigger_level)"])] == 1
    assert int(values["offsetof(struct serial_port, rxtx.head)"]) == 24
    assert int(values["offsetof(struct mtty_data, ports)"]) == 24
    assert int(values["sizeof(struct mtty_data)"]) == image_size(2)
