"""Tests of the gpu example driver, in process through fakevfio.testing's conformance kit."""

from __future__ import annotations

import errno
import zlib
from collections.abc import Mapping

import pytest
from fakevfio_gpu import GpuDriver, records
from fakevfio_gpu.records import RECORD, encode_record

from fakevfio import State
from fakevfio.errors import ConfigError, DeviceError
from fakevfio.testing import LocalDevice, check_arc_driver, round_trip

SMALL = {"mem": "32K", "seed": "5"}
CHUNKS = [1, 7, 4099]
#: The END record's size; it closes every complete stream.
END_RECORD_BYTES = RECORD.size + records.END.size
Gpu = LocalDevice[GpuDriver]


def make(options: Mapping[str, str] = SMALL, name: str = "src") -> Gpu:
    return LocalDevice(GpuDriver(name, dict(options)))


def test_gpu_follows_the_driver_rules() -> None:
    check_arc_driver(
        lambda name: GpuDriver(name, {**SMALL, "dirty_rate": "64K"}),
        dest_factory=lambda name: GpuDriver(name, {"mem": "32K"}),
    )


def with_extra_record(stream: bytes, record: bytes) -> bytes:
    """Insert ``record`` before END and fix END's CRC, as a newer source would send it."""
    body = stream[:-END_RECORD_BYTES] + record
    mem_bytes, _crc = records.END.unpack(stream[-records.END.size :])
    return body + encode_record(records.TAG_END, records.END.pack(mem_bytes, zlib.crc32(body)))


@pytest.mark.parametrize("chunk", CHUNKS)
def test_gpu_full_save_restore_gives_equal_digest(chunk: int) -> None:
    src = make()
    src.region_write("bar0", 64, b"context!")
    src.region_write("bar2", 5000, b"payload")
    dst = make({"mem": "32K"}, "dst")
    assert dst.digest() != src.digest()
    stream = round_trip(src, dst, save_chunk=chunk, load_chunk=chunk)
    assert len(stream) == src.driver.data_size(None)
    assert dst.region_read("bar0", 64, 8) == b"context!"
    assert dst.region_read("bar2", 5000, 7) == b"payload"


def test_gpu_precopy_tracks_dirty_pages_while_running() -> None:
    src = make({"mem": "1M", "seed": "2", "dirty_rate": "400K"})
    assert src.set_state(State.PRE_COPY)
    info = src.precopy_info()
    assert info.initial_bytes > 1 << 20
    assert info.dirty_bytes == 0
    stream = bytearray(src.read(300_000))
    src.advance(0.01)  # ~1 page dirtied, maybe before it was sent (then it goes once)
    stream += src.drain(65536)
    assert src.precopy_info().initial_bytes == 0
    for _ in range(3):
        src.advance(0.1)  # 10 pages
        info = src.precopy_info()
        assert info.initial_bytes == 0
        assert 0 < info.dirty_bytes <= 10 * (4096 + RECORD.size + records.MEM_OFFSET.size)
        stream += src.drain(4099)
        assert src.precopy_info().dirty_bytes == 0
    src.advance(0.1)
    assert src.data_size() > 4096
    src.set_state(State.STOP_COPY)
    stream += src.drain(4099)
    src.set_state(State.STOP)
    dst = make({"mem": "1M"}, "dst")
    dst.load(bytes(stream))
    assert dst.digest() == src.digest()
    load_stream = dst.driver.last_load
    assert load_stream is not None
    assert load_stream.source_stats is not None
    sent, resent = load_stream.source_stats
    assert sent == 256
    assert 30 <= resent <= 41


def test_gpu_bandwidth_options_pace_the_stream() -> None:
    src = make({"mem": "64K", "read_bandwidth": "1M"})
    assert src.set_state(State.STOP_COPY)
    data, delay = src.read_paced(65536, now=0.0)
    assert delay == pytest.approx(len(data) / (1 << 20))
    dst = make({"mem": "64K", "write_bandwidth": "2M"}, "dst")
    assert dst.set_state(State.RESUMING)
    delay = dst.write_paced(data[:4096], now=0.0)
    assert delay == pytest.approx(4096 / (2 << 20))


def test_gpu_resume_skips_unknown_optional_record() -> None:
    src = make()
    stream = with_extra_record(src.save(), encode_record(77, b"future info", mandatory=False))
    dst = make({"mem": "32K"}, "dst")
    dst.load(stream, 7)
    assert dst.digest() == src.digest()
    assert dst.driver.info()["skipped_records"] == 1


def _expect_rejected(stream: bytes, err: int, *, at_write: bool = True) -> Gpu:
    dst = make({"mem": "32K"}, "dst")
    if at_write:
        with pytest.raises(DeviceError) as exc:
            dst.start_load(stream, 7)
        assert exc.value.errno == err
    else:
        dst.start_load(stream, 7)
    with pytest.raises(DeviceError) as exc:
        dst.set_state(State.STOP)
    assert exc.value.errno == (errno.EINVAL if at_write else err)
    assert dst.state() is State.RESUMING
    return dst


def test_gpu_resume_rejects_unknown_mandatory_record() -> None:
    stream = with_extra_record(make().save(), encode_record(77, b"new feature"))
    _expect_rejected(stream, errno.EOPNOTSUPP)


def test_gpu_resume_rejects_other_stream_version() -> None:
    stream = make().save()
    _expect_rejected(
        records.encode_preamble(version=2) + stream[records.PREAMBLE.size :], errno.EOPNOTSUPP
    )


def test_gpu_resume_rejects_other_memory_size() -> None:
    _expect_rejected(make({"mem": "64K"}).save(), errno.EOPNOTSUPP)


@pytest.mark.parametrize(
    "offset",
    [0, 13, 16 + 5, 20000, -20],
    ids=["magic", "preamble-flags", "record-flags", "memory-data", "end"],
)
def test_gpu_resume_rejects_corrupted_stream(offset: int) -> None:
    stream = bytearray(make().save())
    stream[offset] ^= 0x04
    _expect_rejected(bytes(stream), errno.EINVAL)


def test_gpu_resume_truncated_stream_fails_stop_and_can_be_completed() -> None:
    stream = make().save()
    dst = make({"mem": "32K"}, "dst")
    dst.start_load(stream[:-1])
    with pytest.raises(DeviceError) as exc:
        dst.set_state(State.STOP)
    assert exc.value.errno == errno.EINVAL
    dst.write(stream[-1:])
    dst.set_state(State.STOP)


def test_gpu_resume_rejects_bytes_after_end() -> None:
    _expect_rejected(make().save() + b"\0", errno.ENOMEM)


def test_gpu_options_and_default_memory() -> None:
    assert {"mem", "dirty_rate", "read_bandwidth", "write_bandwidth"} <= set(GpuDriver.options)
    dev = make({})
    assert dev.regions()["bar2"] == 512 << 20
    assert dev.data_size() > 512 << 20
    dev.close()
    with pytest.raises(ConfigError, match="page_size"):
        GpuDriver("d", {"mem": "1M", "page_size": "3000"})


def test_gpu_precopy_dirty_bytes_never_grow_while_reading() -> None:
    src = make({"mem": "256K", "dirty_rate": "40K"})
    assert src.set_state(State.PRE_COPY)
    src.drain(65536)
    src.advance(1.0)  # 10 pages
    last = src.precopy_info().dirty_bytes
    assert last > 0
    while last:
        src.read(1000)
        info = src.precopy_info()
        assert info.dirty_bytes <= last
        last = info.dirty_bytes
    with pytest.raises(DeviceError) as exc:
        src.read(1)
    assert exc.value.errno == errno.ENOMSG


def test_gpu_stop_copy_eof_is_final_even_if_memory_changes() -> None:
    src = make({"mem": "64K"})
    assert src.set_state(State.PRE_COPY)
    src.set_state(State.STOP_COPY)
    stream = src.drain(65536)
    src.region_write("bar2", 0, b"late")  # the BAR is still writable
    assert src.read(100) == b""
    assert src.read(0) == b""
    dst = make({"mem": "64K"}, "dst")
    dst.load(stream)
