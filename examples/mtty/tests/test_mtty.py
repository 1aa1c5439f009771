"""Tests of the mtty example driver, driven through fakevfio._device.Device."""

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

from fakevfio._device import Device
from fakevfio._faults import FaultRules
from fakevfio.errors import ConfigError, DeviceError
from vfio_uapi.fsm import State

CHUNKS = [1, 7, 4099]
THR = 0


def make(nr_ports: int = 1, name: str = "src") -> Device:
    return Device(name, "mtty", MttyDriver(name, {"nr_ports": str(nr_ports)}), 0)


def read_all(dev: Device, chunk: int) -> bytes:
    session = dev.session
    assert session is not None
    out = bytearray()
    while data := dev.read(session, chunk)[0]:
        out += data
    return bytes(out)


def state(dev: Device) -> State:
    """The device state (a call, so mypy does not narrow it across state changes)."""
    return dev.state


def save(dev: Device, chunk: int = 4099) -> bytes:
    dev.set_state(State.STOP_COPY)
    data = read_all(dev, chunk)
    dev.set_state(State.STOP)
    return data


def write_all(dev: Device, stream: bytes, chunk: int = 4099) -> None:
    session = dev.session
    assert session is not None
    view = memoryview(stream)
    for off in range(0, len(stream), chunk):
        dev.write(session, view[off : off + chunk])


def load(dev: Device, stream: bytes, chunk: int = 4099) -> None:
    dev.set_state(State.RESUMING)
    write_all(dev, stream, chunk)
    dev.set_state(State.STOP)


def uart_write(dev: Device, port: int, data: bytes) -> None:
    for b in data:
        dev.region_write(f"bar{port}", THR, memoryview(bytes([b])))


def uart_read(dev: Device, port: int, n: int) -> bytes:
    return b"".join(dev.region_read(f"bar{port}", THR, 1) for _ in range(n))


def lsr(dev: Device, port: int) -> int:
    return dev.region_read(f"bar{port}", UART_LSR, 1)[0]


@pytest.mark.parametrize("nr_ports", [1, 2])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_mtty_bytes_written_before_migration_read_back_after(chunk: int, nr_ports: int) -> None:
    src, dst = make(nr_ports), make(nr_ports, "dst")
    uart_write(src, 0, b"hello")
    if nr_ports == 2:
        uart_write(src, 1, b"port1")
    stream = save(src, chunk)
    assert len(stream) == image_size(nr_ports) == 24 + 36 * nr_ports
    load(dst, stream, chunk)
    assert dst.state is State.STOP
    assert dst.driver.digest() == src.driver.digest()
    assert lsr(dst, 0) & UART_LSR_DR
    assert uart_read(dst, 0, 5) == b"hello"
    assert not lsr(dst, 0) & UART_LSR_DR
    if nr_ports == 2:
        assert uart_read(dst, 1, 5) == b"port1"


def test_mtty_image_layout_matches_struct_mtty_data() -> None:
    src = make(2)
    uart_write(src, 1, b"ab")
    stream = save(src)
    assert struct.unpack_from("<QIIII", stream) == (MAGIC, 1, 0, 2, 0)
    port1 = stream[24 + 36 :]
    assert port1[8:10] == b"ab"  # rxtx.fifo
    assert (port1[24], port1[25], port1[26]) == (2, 0, 2)  # head, tail, count
    assert port1[33] == 16  # max_fifo_size
    assert src.data_size() == 96


def test_mtty_precopy_sends_header_then_enomsg_then_ports() -> None:
    src = make(1)
    uart_write(src, 0, b"x")
    result = src.set_state(State.PRE_COPY)
    session = result.session
    assert session is not None
    assert src.precopy_info().initial_bytes == 24
    assert src.precopy_info().dirty_bytes == 0
    first = src.read(session, 7)[0]
    assert src.precopy_info().initial_bytes == 17
    header = bytes(first + src.read(session, 100)[0])
    assert header == encode_header(1)
    assert src.precopy_info().initial_bytes == 0
    with pytest.raises(DeviceError) as exc:
        src.read(session, 100)
    assert exc.value.errno == errno.ENOMSG
    assert src.data_size() == 60
    assert src.set_state(State.STOP_COPY).session is None  # same stream continues
    rest = read_all(src, 7)
    assert len(rest) == 36
    assert src.read(session, 10)[0] == b""  # EOF forever in STOP_COPY
    src.set_state(State.STOP)
    dst = make(1, "dst")
    load(dst, header + rest)
    assert uart_read(dst, 0, 1) == b"x"


def test_mtty_precopy_back_to_running_ends_session() -> None:
    src = make(1)
    session = src.set_state(State.PRE_COPY).session
    assert session is not None
    src.set_state(State.RUNNING)
    with pytest.raises(DeviceError) as exc:
        src.read(session, 1)
    assert exc.value.errno == errno.ENODEV


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
    stream = header + save(src)[24:]
    dst.set_state(State.RESUMING)
    session = dst.session
    assert session is not None
    dst.write(session, memoryview(stream[:20]))
    with pytest.raises(DeviceError) as exc:
        dst.write(session, memoryview(stream[20:30]))  # completes the header
    assert exc.value.errno == err
    with pytest.raises(DeviceError) as exc:
        dst.write(session, memoryview(stream[30:]))
    assert exc.value.errno == errno.ENODEV  # the stream is dead
    with pytest.raises(DeviceError) as exc:
        dst.set_state(State.STOP)
    assert exc.value.errno == errno.EINVAL
    assert state(dst) is State.RESUMING
    dst.reset()
    assert state(dst) is State.RUNNING


def test_mtty_resume_rejects_data_past_the_image() -> None:
    stream = save(make(1))
    dst = make(1, "dst")
    dst.set_state(State.RESUMING)
    session = dst.session
    assert session is not None
    with pytest.raises(DeviceError) as exc:
        dst.write(session, memoryview(stream + b"\0"))
    assert exc.value.errno == errno.ENOMEM


def test_mtty_resume_short_image_fails_stop_and_can_be_completed() -> None:
    stream = save(make(1))
    dst = make(1, "dst")
    dst.set_state(State.RESUMING)
    session = dst.session
    assert session is not None
    dst.write(session, memoryview(stream[:-1]))
    with pytest.raises(DeviceError) as exc:
        dst.set_state(State.STOP)
    assert exc.value.errno == errno.EINVAL
    assert state(dst) is State.RESUMING
    dst.write(session, memoryview(stream[-1:]))
    dst.set_state(State.STOP)
    assert state(dst) is State.STOP


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
    stream = bytearray(save(make(1)))
    stream[offset] = value
    dst = make(1, "dst")
    before = dst.driver.digest()
    with pytest.raises(DeviceError) as exc:
        load(dst, bytes(stream))
    assert exc.value.errno == errno.EINVAL
    assert dst.state is State.RESUMING
    assert dst.driver.digest() == before  # nothing was loaded


def test_mtty_resume_rejects_corrupted_stream_from_fault_rule() -> None:
    src = make(1)
    src.faults = FaultRules.parse("corrupt after 3")  # flips a bit of the magic
    stream = save(src)
    dst = make(1, "dst")
    dst.set_state(State.RESUMING)
    session = dst.session
    assert session is not None
    with pytest.raises(DeviceError) as exc:
        write_all(dst, stream, 7)
    assert exc.value.errno == errno.EINVAL


def test_mtty_uart_divisor_fifo_overrun_and_clear() -> None:
    dev = make(1)
    dev.region_write("bar0", 3, memoryview(bytes([UART_LCR_DLAB])))
    dev.region_write("bar0", 0, memoryview(b"\x0c"))
    dev.region_write("bar0", 1, memoryview(b"\x01"))
    assert dev.region_read("bar0", 0, 1) == b"\x0c"
    assert dev.region_read("bar0", 1, 1) == b"\x01"
    dev.region_write("bar0", 3, memoryview(b"\x03"))
    uart_write(dev, 0, bytes(range(17)))  # one more than the FIFO holds
    assert lsr(dev, 0) & UART_LSR_OE
    assert lsr(dev, 0) & UART_LSR_DR  # a full FIFO still has data (the sample says no)
    dev.region_write("bar0", 2, memoryview(bytes([UART_FCR_CLEAR_RCVR | 1])))
    assert not lsr(dev, 0) & UART_LSR_DR
    assert uart_read(dev, 0, 1) == b"\0"


def test_mtty_reset_keeps_uart_state_and_ends_session() -> None:
    dev = make(1)
    uart_write(dev, 0, b"z")
    session = dev.set_state(State.PRE_COPY).session
    assert session is not None
    dev.reset()
    assert dev.state is State.RUNNING
    assert not session.alive
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
