"""Tests of the mtty example driver, in process through fakevfio.testing's conformance kit."""

from __future__ import annotations

import errno
import struct

import pytest
from fakevfio_mtty import MAGIC, MttyDriver, encode_header, image_size
from fakevfio_mtty.uart import (
    UART_FCR_CLEAR_RCVR,
    UART_LCR_DLAB,
    UART_LSR,
    UART_LSR_DR,
    UART_LSR_OE,
)

from fakevfio import State
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
    assert set(MttyDriver.options) == {"nr_ports"}
    with pytest.raises(ConfigError, match="nr_ports"):
        MttyDriver("d", {"nr_ports": "3"})
    with pytest.raises(ConfigError, match="unknown option"):
        MttyDriver("d", {"ports": "1"})
    dev = make(2)
    assert dict(dev.regions()) == {"bar0": 8, "bar1": 8}
    assert dev.info()["migration_flags"] == ["STOP_COPY", "P2P", "PRE_COPY"]
