"""PRECOPY_INFOv2 and VFIO_PRECOPY_INFO_REINIT in the device model (Linux 7.1 uAPI).

The oracle is the uAPI text of ``include/uapi/linux/vfio.h`` (7.1): without the
opt-in initial_bytes "should have a non-zero initial value and decrease as
migration data is read"; after it, REINIT means "new initial data is present on
the stream", initial_bytes "may report a non-zero value irrespective of any
previously reported values" and "dirty_bytes is also reset to zero". The
stream read after a REINIT must still migrate the device: the destination's
state digest equals the source's.
"""

from __future__ import annotations

import errno

import pytest

from fakevfio._device import Device, Session
from fakevfio._ram import RamDriver
from fakevfio._tree import _precopy_text
from fakevfio.errors import ConfigError, DeviceError
from vfio_uapi.fsm import State

SIZE = 64 * 1024
REINIT_AFTER = 20_000


def _ram(name: str, **options: str) -> Device:
    opts = {"size": "64K", "seed": "5", "flags": "STOP_COPY+P2P+PRE_COPY"} | options
    return Device(name, "ram", RamDriver(name, opts), 0)


def _read(device: Device, session: Session, size: int) -> bytes:
    try:
        return bytes(device.read(session, size)[0])
    except DeviceError as exc:
        if exc.errno != errno.ENOMSG:  # only the temporary end of pre-copy data
            raise
        return b""


def _pre_copy(device: Device) -> Session:
    session = device.set_state(State.PRE_COPY).session
    assert session is not None
    return session


def test_v2_caller_sees_reinit_once_and_the_stream_still_migrates() -> None:
    src = _ram("src", reinit_after=str(REINIT_AFTER))
    session = _pre_copy(src)
    first = src.precopy_info(v2=True)
    assert first.initial_bytes > SIZE
    assert not first.reinit
    stream = bytearray(_read(src, session, REINIT_AFTER + 1000))
    before = src.precopy_info(v2=True)  # the query that crosses the threshold
    assert before.reinit
    # New initial data: the whole state again plus what was queued; dirty reset to 0.
    assert before.initial_bytes > first.initial_bytes - len(stream)
    assert before.initial_bytes > SIZE
    assert before.dirty_bytes == 0
    again = src.precopy_info(v2=True)
    assert not again.reinit
    assert again.initial_bytes == before.initial_bytes
    while chunk := _read(src, session, 16384):
        stream += chunk
    assert src.precopy_info(v2=True).initial_bytes == 0
    # The initial part read before the REINIT, then every page of the state again.
    assert len(stream) >= REINIT_AFTER + SIZE
    src.set_state(State.STOP_COPY)
    while chunk := _read(src, session, 16384):
        stream += chunk
    dst = _ram("dst", seed="9")
    assert dst.driver.digest() != src.driver.digest()
    dst.set_state(State.STOP)
    load = dst.set_state(State.RESUMING).session
    assert load is not None
    dst.write(load, memoryview(stream))
    dst.set_state(State.STOP)
    assert dst.driver.digest() == src.driver.digest()


def test_v1_caller_never_sees_initial_bytes_grow() -> None:
    src = _ram("src", reinit_after=str(REINIT_AFTER))
    session = _pre_copy(src)
    last = src.precopy_info()
    while _read(src, session, 4096):
        now = src.precopy_info()
        assert not now.reinit
        assert now.initial_bytes <= last.initial_bytes
        last = now
    assert last.initial_bytes == 0


def test_precopy_info_v2_text_has_the_flags_line() -> None:
    src = _ram("src", reinit_after="0")
    _pre_copy(src)
    assert _precopy_text(src).splitlines()[2:] == []  # v1 file: two lines, as INTERFACES says
    first = dict(line.split() for line in _precopy_text(src, v2=True).splitlines())
    second = dict(line.split() for line in _precopy_text(src, v2=True).splitlines())
    assert (first["flags"], second["flags"]) == ("1", "0")  # bit 0: VFIO_PRECOPY_INFO_REINIT


def test_reinit_after_needs_pre_copy() -> None:
    with pytest.raises(ConfigError, match="PRE_COPY"):
        _ram("x", flags="STOP_COPY+P2P", reinit_after="4K")
