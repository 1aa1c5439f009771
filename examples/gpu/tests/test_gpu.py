"""Tests of the gpu example driver, driven through fakevfio._device.Device."""

from __future__ import annotations

import errno
import zlib
from collections.abc import Mapping

import pytest
from fakevfio_gpu import GpuDriver, records
from fakevfio_gpu.records import RECORD, encode_record

from fakevfio._device import Device
from fakevfio.errors import ConfigError, DeviceError
from vfio_uapi.fsm import State

SMALL = {"mem": "32K", "seed": "5"}
CHUNKS = [1, 7, 4099]
#: The END record's size; it closes every complete stream.
END_RECORD_BYTES = RECORD.size + records.END.size


def make(options: Mapping[str, str] = SMALL, name: str = "src") -> Device:
    return Device(name, "gpu", GpuDriver(name, dict(options)), 0)


def gpu(dev: Device) -> GpuDriver:
    assert isinstance(dev.driver, GpuDriver)
    return dev.driver


def drain(dev: Device, chunk: int) -> bytes:
    """Read until EOF (STOP_COPY) or ENOMSG (pre-copy's temporary end)."""
    session = dev.session
    assert session is not None
    out = bytearray()
    while True:
        try:
            data = dev.read(session, chunk)[0]
        except DeviceError as exc:
            if exc.errno != errno.ENOMSG:
                raise
            return bytes(out)
        if not data:
            return bytes(out)
        out += data


def save(dev: Device, chunk: int = 65536) -> bytes:
    dev.set_state(State.STOP_COPY)
    data = drain(dev, chunk)
    dev.set_state(State.STOP)
    return data


def start_load(dev: Device, stream: bytes, chunk: int = 4099) -> None:
    dev.set_state(State.RESUMING)
    session = dev.session
    assert session is not None
    view = memoryview(stream)
    for off in range(0, len(stream), chunk):
        dev.write(session, view[off : off + chunk])


def load(dev: Device, stream: bytes, chunk: int = 4099) -> None:
    start_load(dev, stream, chunk)
    dev.set_state(State.STOP)


def with_extra_record(stream: bytes, record: bytes) -> bytes:
    """Insert ``record`` before END and fix END's CRC, as a newer source would send it."""
    body = stream[:-END_RECORD_BYTES] + record
    mem_bytes, _crc = records.END.unpack(stream[-records.END.size :])
    return body + encode_record(records.TAG_END, records.END.pack(mem_bytes, zlib.crc32(body)))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_gpu_full_save_restore_gives_equal_digest(chunk: int) -> None:
    src = make()
    src.region_write("regs", 64, memoryview(b"context!"))
    src.region_write("vram", 5000, memoryview(b"payload"))
    stream = save(src, chunk)
    assert len(stream) == gpu(src).data_size(None)
    dst = make({"mem": "32K"}, "dst")
    assert gpu(dst).digest() != gpu(src).digest()
    load(dst, stream, chunk)
    assert gpu(dst).digest() == gpu(src).digest()
    assert dst.region_read("regs", 64, 8) == b"context!"
    assert dst.region_read("vram", 5000, 7) == b"payload"


def test_gpu_precopy_tracks_dirty_pages_while_running() -> None:
    src = make({"mem": "1M", "seed": "2", "dirty_rate": "400K"})
    session = src.set_state(State.PRE_COPY).session
    assert session is not None
    info = src.precopy_info()
    assert info.initial_bytes > 1 << 20
    assert info.dirty_bytes == 0
    stream = bytearray(src.read(session, 300_000)[0])
    src.advance(0.01)  # ~1 page dirtied, maybe before it was sent (then it goes once)
    stream += drain(src, 65536)
    assert src.precopy_info().initial_bytes == 0
    for _ in range(3):
        src.advance(0.1)  # 10 pages
        info = src.precopy_info()
        assert info.initial_bytes == 0
        assert 0 < info.dirty_bytes <= 10 * (4096 + RECORD.size + records.MEM_OFFSET.size)
        stream += drain(src, 4099)
        assert src.precopy_info().dirty_bytes == 0
    src.advance(0.1)
    assert src.data_size() > 4096
    src.set_state(State.STOP_COPY)
    stream += drain(src, 4099)
    src.set_state(State.STOP)
    dst = make({"mem": "1M"}, "dst")
    load(dst, bytes(stream))
    assert gpu(dst).digest() == gpu(src).digest()
    load_stream = gpu(dst).last_load
    assert load_stream is not None
    assert load_stream.source_stats is not None
    sent, resent = load_stream.source_stats
    assert sent == 256
    assert 30 <= resent <= 41


def test_gpu_bandwidth_options_pace_the_stream() -> None:
    src = make({"mem": "64K", "read_bandwidth": "1M"})
    session = src.set_state(State.STOP_COPY).session
    assert session is not None
    data, delay = src.read(session, 65536, now=0.0)
    assert delay == pytest.approx(len(data) / (1 << 20))
    dst = make({"mem": "64K", "write_bandwidth": "2M"}, "dst")
    session = dst.set_state(State.RESUMING).session
    assert session is not None
    _n, delay = dst.write(session, memoryview(data[:4096]), now=0.0)
    assert delay == pytest.approx(4096 / (2 << 20))


def test_gpu_resume_skips_unknown_optional_record() -> None:
    src = make()
    stream = with_extra_record(save(src), encode_record(77, b"future info", mandatory=False))
    dst = make({"mem": "32K"}, "dst")
    load(dst, stream, 7)
    assert gpu(dst).digest() == gpu(src).digest()
    assert gpu(dst).info()["skipped_records"] == 1


def _expect_rejected(stream: bytes, err: int, *, at_write: bool = True) -> Device:
    dst = make({"mem": "32K"}, "dst")
    if at_write:
        with pytest.raises(DeviceError) as exc:
            start_load(dst, stream, 7)
        assert exc.value.errno == err
    else:
        start_load(dst, stream, 7)
    with pytest.raises(DeviceError) as exc:
        dst.set_state(State.STOP)
    assert exc.value.errno == (errno.EINVAL if at_write else err)
    assert dst.state is State.RESUMING
    return dst


def test_gpu_resume_rejects_unknown_mandatory_record() -> None:
    stream = with_extra_record(save(make()), encode_record(77, b"new feature"))
    _expect_rejected(stream, errno.EOPNOTSUPP)


def test_gpu_resume_rejects_other_stream_version() -> None:
    stream = save(make())
    _expect_rejected(records.encode_preamble(version=2) + stream[records.PREAMBLE.size :],
                     errno.EOPNOTSUPP)


def test_gpu_resume_rejects_other_memory_size() -> None:
    _expect_rejected(save(make({"mem": "64K"})), errno.EOPNOTSUPP)


@pytest.mark.parametrize("offset", [0, 13, 16 + 5, 20000, -20],
                         ids=["magic", "preamble-flags", "record-flags", "memory-data", "end"])
def test_gpu_resume_rejects_corrupted_stream(offset: int) -> None:
    stream = bytearray(save(make()))
    stream[offset] ^= 0x04
    _expect_rejected(bytes(stream), errno.EINVAL)


def test_gpu_resume_truncated_stream_fails_stop_and_can_be_completed() -> None:
    stream = save(make())
    dst = make({"mem": "32K"}, "dst")
    start_load(dst, stream[:-1])
    with pytest.raises(DeviceError) as exc:
        dst.set_state(State.STOP)
    assert exc.value.errno == errno.EINVAL
    session = dst.session
    assert session is not None
    dst.write(session, memoryview(stream[-1:]))
    dst.set_state(State.STOP)


def test_gpu_resume_rejects_bytes_after_end() -> None:
    _expect_rejected(save(make()) + b"\0", errno.ENOMEM)


def test_gpu_options_and_default_memory() -> None:
    assert {"mem", "dirty_rate", "read_bandwidth", "write_bandwidth"} <= set(GpuDriver.options)
    dev = make({})
    assert dev.regions()["vram"] == 512 << 20
    assert dev.data_size() > 512 << 20
    dev.close()
    with pytest.raises(ConfigError, match="page_size"):
        GpuDriver("d", {"mem": "1M", "page_size": "3000"})


def test_gpu_precopy_dirty_bytes_never_grow_while_reading() -> None:
    src = make({"mem": "256K", "dirty_rate": "40K"})
    session = src.set_state(State.PRE_COPY).session
    assert session is not None
    drain(src, 65536)
    src.advance(1.0)  # 10 pages
    last = src.precopy_info().dirty_bytes
    assert last > 0
    while last:
        src.read(session, 1000)
        info = src.precopy_info()
        assert info.dirty_bytes <= last
        last = info.dirty_bytes
    with pytest.raises(DeviceError) as exc:
        src.read(session, 1)
    assert exc.value.errno == errno.ENOMSG


def test_gpu_stop_copy_eof_is_final_even_if_memory_changes() -> None:
    src = make({"mem": "64K"})
    session = src.set_state(State.PRE_COPY).session
    assert session is not None
    src.set_state(State.STOP_COPY)
    stream = drain(src, 65536)
    src.region_write("vram", 0, memoryview(b"late"))  # the BAR is still writable
    assert src.read(session, 100)[0] == b""
    assert src.read(session, 0)[0] == b""
    dst = make({"mem": "64K"}, "dst")
    load(dst, stream)
