"""The core migration stream of StateDriver drivers, through Device and the ram driver.

``parse_stream`` below is an independent reading of the format described in the
:mod:`fakevfio._stream` docstring; produced streams are checked against it.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import struct
from collections.abc import Callable

import attrs
import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakevfio._device import Device, Session
from fakevfio._faults import FaultRules
from fakevfio._ram import RamDriver
from fakevfio._stream import CHECKSUM_CHUNK, checksum_combine
from fakevfio.errors import DeviceError
from vfio_uapi.fsm import State

MIB = 1 << 20


# ---------------------------------------------------------------------------
# Independent parser of the stream format


@attrs.frozen
class Record:
    tag: int
    offset: int
    length: int
    at: int  # stream offset of the payload


@attrs.frozen
class Parsed:
    page_size: int
    state_size: int
    driver_header: bytes
    records: tuple[Record, ...]
    state: bytes
    end_count: int


def parse_stream(data: bytes) -> Parsed:
    """Parse a complete stream per the stream.py docstring; AssertionError if malformed."""
    assert len(data) >= 32
    magic, version, page, size, hlen, flags = struct.unpack_from("<8sIIQII", data, 0)
    assert magic == b"FVIOSTRM"
    assert version == 3
    assert flags == 0
    assert hlen <= 4096
    driver_header = data[32 : 32 + hlen]
    assert len(driver_header) == hlen
    pos = 32 + hlen
    state = bytearray(size)
    seen = bytearray(size)
    records: list[Record] = []
    payload_total = 0
    end_count: int | None = None
    while pos < len(data):
        assert end_count is None, "bytes after END"
        assert pos + 16 <= len(data)
        tag, length, offset = struct.unpack_from("<IIQ", data, pos)
        pos += 16
        assert pos + length <= len(data)
        if tag == 1:
            assert 1 <= length <= 1 << 30
            assert offset % page == 0
            assert offset + length <= size
            state[offset : offset + length] = data[pos : pos + length]
            seen[offset : offset + length] = b"\x01" * length
            payload_total += length
        elif tag == 2:
            assert length == 16
            assert offset == 0
            end_count, crc, reserved = struct.unpack_from("<QII", data, pos)
            assert end_count == payload_total
            assert crc == crc32c.crc32c(data[:pos]), "END's CRC-32C covers every byte before it"
            assert reserved == 0
        else:
            raise AssertionError(f"unknown tag {tag}")
        records.append(Record(tag, offset, length, pos))
        pos += length
    assert end_count is not None, "no END record"
    assert all(seen), "state bytes never sent"
    return Parsed(page, size, bytes(driver_header), tuple(records), bytes(state), end_count)


def check_rule_1(parsed: Parsed) -> None:
    """The initial part is PAGES records covering the whole state in offset order."""
    covered = 0
    for rec in parsed.records:
        if covered == parsed.state_size:
            break
        assert rec.tag == 1
        assert rec.offset == covered
        covered += rec.length
    assert covered == parsed.state_size


# ---------------------------------------------------------------------------
# Helpers


def ram(name: str = "src", **options: str) -> Device:
    opts = {"size": "20K", "seed": "7", "flags": "STOP_COPY+P2P+PRE_COPY"} | options
    return Device(name, "ram", RamDriver(name, opts), 0)


def digest(device: Device) -> str:
    return device.driver.digest()


def read_all(device: Device, handle: Session, chunk: int) -> bytes:
    out = bytearray()
    while True:
        data, _ = device.read(handle, chunk)
        if not data:
            return bytes(out)
        out += data


def save(device: Device, chunk: int = 65536) -> bytes:
    if device.state is not State.STOP:
        device.set_state(State.STOP)
    device.set_state(State.STOP_COPY)
    data = read_all(device, device.open_session(read=True, write=False), chunk)
    device.set_state(State.STOP)
    return data


def start_resume(device: Device) -> Session:
    device.set_state(State.RESUMING)
    return device.open_session(read=False, write=True)


def load(device: Device, data: bytes, seg: int = 65536) -> None:
    handle = start_resume(device)
    view = memoryview(data)
    for i in range(0, len(data), seg):
        device.write(handle, view[i : i + seg])
    device.set_state(State.STOP)


def errno_of(fn: Callable[[], object]) -> int:
    with pytest.raises(DeviceError) as info:
        fn()
    return info.value.errno


# ---------------------------------------------------------------------------
# Save/restore round trips


@pytest.mark.parametrize(
    ("chunk", "size"),
    [(1, "9K"), (7, "20K"), (4096 + 3, "20K"), (4096 + 3, "2600K"), (MIB, "2600K"), (MIB, "1")],
)
def test_stream_round_trip_any_chunk_size(chunk: int, size: str) -> None:
    src = ram(size=size)
    dst = ram("dst", size=size, seed="99")
    assert digest(src) != digest(dst) or size == "1"
    stream = save(src, chunk)
    assert len(stream) == src.data_size()
    load(dst, stream, seg=chunk)
    assert dst.state is State.STOP
    assert digest(dst) == digest(src)
    parsed = parse_stream(stream)
    check_rule_1(parsed)
    assert hashlib.sha256(parsed.state).hexdigest() == digest(src)
    assert parsed.page_size == 4096
    assert parsed.state_size == src.driver.state_size()  # type: ignore[attr-defined]
    assert parsed.driver_header == src.driver.header()  # type: ignore[attr-defined]
    # A stopped device's initial part is one record (up to 1 GiB): no header inside 1 MiB reads.
    assert [r.length for r in parsed.records if r.tag == 1] == [src.driver.state_size()]  # type: ignore[attr-defined]


def test_stream_data_size_counts_down_exactly_in_stop_copy() -> None:
    src = ram(size="2100K")
    src.set_state(State.STOP)
    expected = src.data_size()
    src.set_state(State.STOP_COPY)
    handle = src.open_session(read=True, write=False)
    assert src.data_size() == expected
    total = 0
    while True:
        data, _ = src.read(handle, 300_000)
        if not data:
            break
        total += len(data)
        assert src.data_size() == expected - total
    assert total == expected
    assert src.data_size() == 0
    for _ in range(3):
        assert src.read(handle, 4096)[0] == b""  # EOF forever
    assert src.data_size() == 0


def test_stream_page_size_option_and_partial_last_page() -> None:
    src = ram(size="5000", page_size="512")
    dst = ram("dst", size="5000", page_size="512", seed="1")
    stream = save(src, 333)
    parsed = parse_stream(stream)
    assert parsed.page_size == 512
    assert parsed.state_size == 5000
    load(dst, stream, seg=100)
    assert digest(dst) == digest(src)


# ---------------------------------------------------------------------------
# Pre-copy


@pytest.mark.parametrize("flags", ["STOP_COPY+PRE_COPY", "STOP_COPY+P2P+PRE_COPY"])
def test_stream_precopy_accounting_and_temporary_end(flags: str) -> None:
    src = ram(size="64K", flags=flags, dirty_rate="64K")
    res = src.set_state(State.PRE_COPY)
    handle = res.session
    assert handle is not None
    info = src.precopy_info()
    assert info.dirty_bytes == 0
    assert info.initial_bytes == 32 + 24 + 16 + 64 * 1024
    out = bytearray()

    # initial_bytes falls by exactly what was read.
    data, _ = src.read(handle, 1000)
    out += data
    assert src.precopy_info().initial_bytes == info.initial_bytes - 1000
    assert src.precopy_info().dirty_bytes == 0

    # The workload dirties pages: dirty_bytes grows.
    src.advance(0.25)
    grown = src.precopy_info().dirty_bytes
    assert grown > 0
    assert grown % (4096 + 16) == 0  # data plus a record header per dirty page
    src.advance(0.25)
    assert src.precopy_info().dirty_bytes >= grown

    # Drain to the temporary end, checking the accounting at every read.
    prev = src.precopy_info()
    reads = 0
    while True:
        cur = src.precopy_info()
        if cur.initial_bytes == 0 and cur.dirty_bytes == 0:
            break
        data, _ = src.read(handle, 4099)
        assert len(data) > 0
        out += data
        after = src.precopy_info()
        assert after.initial_bytes == max(0, cur.initial_bytes - len(data))
        if cur.initial_bytes == 0:
            assert after.dirty_bytes < cur.dirty_bytes  # dirty data falls as read
        prev = after
        reads += 1
        assert reads < 1000
    del prev
    # ENOMSG exactly at the temporary end, and again and again.
    for _ in range(3):
        assert errno_of(lambda: src.read(handle, 4096)) == errno.ENOMSG
    assert src.precopy_info().initial_bytes == 0

    # More workload: more data, then the temporary end again.
    src.advance(0.1)
    assert src.precopy_info().dirty_bytes > 0
    out += read_all_precopy(src, handle)
    assert src.precopy_info() == type(src.precopy_info())(initial_bytes=0, dirty_bytes=0)

    # Switch to STOP_COPY: same session, then EOF forever.
    src.advance(0.1)
    res = src.set_state(State.STOP_COPY)
    assert res.session is None
    assert src.session is handle
    assert errno_of(src.precopy_info) == errno.EINVAL
    remaining = src.data_size()
    assert remaining > 0
    rest = read_all(src, handle, 5000)
    assert len(rest) <= remaining
    out += rest
    for _ in range(3):
        assert src.read(handle, 4096)[0] == b""
    assert src.data_size() == 0
    src.advance(10)  # a stopped device does not change
    stream = bytes(out)
    parsed = parse_stream(stream)
    check_rule_1(parsed)
    assert len(parsed.records) > 3  # dirty pages were re-sent
    assert hashlib.sha256(parsed.state).hexdigest() == digest(src)
    dst = ram("dst", size="64K", flags=flags)
    load(dst, stream, seg=777)
    assert digest(dst) == digest(src)


def read_all_precopy(device: Device, handle: Session) -> bytes:
    out = bytearray()
    while True:
        try:
            data, _ = device.read(handle, 4096)
        except DeviceError as exc:
            if exc.errno != errno.ENOMSG:
                raise
            return bytes(out)
        assert data
        out += data


def test_stream_precopy_session_ending_stops_dirty_tracking() -> None:
    src = ram(size="64K", dirty_rate="64K")
    res = src.set_state(State.PRE_COPY)
    assert res.session is not None
    src.advance(0.5)
    src.set_state(State.RUNNING)
    session = res.session
    assert not session.alive
    assert errno_of(lambda: src.read(session, 10)) == errno.ENODEV
    src.set_state(State.PRE_COPY)
    assert src.precopy_info().dirty_bytes == 0


def test_stream_precopy_p2p_does_not_run_the_workload() -> None:
    src = ram(size="64K", dirty_rate="64K")
    session = src.set_state(State.PRE_COPY_P2P).session
    assert session is not None
    read_all_precopy(src, session)
    src.advance(1.0)
    assert src.precopy_info().dirty_bytes == 0
    assert errno_of(lambda: src.read(session, 10)) == errno.ENOMSG


def test_stream_stop_copy_eof_is_forever_even_after_region_write() -> None:
    src = ram(size="16K")
    res = src.set_state(State.PRE_COPY)
    assert res.session is not None
    src.set_state(State.STOP_COPY)
    stream = read_all(src, res.session, 4096)
    src.region_write("bar0", 0, memoryview(b"late"))
    assert src.read(res.session, 4096)[0] == b""
    parse_stream(stream)


def test_stream_precopy_dirty_bytes_never_grow_on_read() -> None:
    src = ram(size="64K", dirty_rate="64K")
    res = src.set_state(State.PRE_COPY)
    assert res.session is not None
    while src.precopy_info().initial_bytes:
        src.read(res.session, 4096)
    src.advance(0.2)
    while True:
        before = src.precopy_info()
        if before.dirty_bytes == 0:
            break
        src.read(res.session, 1)
        assert src.precopy_info().dirty_bytes <= before.dirty_bytes


def test_stream_zero_byte_read_in_precopy_is_not_enomsg() -> None:
    src = ram(size="16K")
    res = src.set_state(State.PRE_COPY)
    assert res.session is not None
    assert src.read(res.session, 0)[0] == b""


# ---------------------------------------------------------------------------
# Resume rejections


@pytest.fixture(scope="module")
def good_stream() -> bytes:
    return save(ram(size="20K"))


def patched(stream: bytes, offset: int, fmt: str, value: int | bytes) -> bytes:
    buf = bytearray(stream)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def recrc(stream: bytes) -> bytes:
    """Recompute END's CRC-32 (the stream ends with END), so a later check is reached."""
    return patched(stream, len(stream) - 8, "<I", crc32c.crc32c(stream[:-16]))


def reject_errno(stream: bytes, *, size: str = "20K", page_size: str = "4K") -> int:
    """Write ``stream`` to a fresh device; return the errno of the rejected write."""
    dst = ram("dst", size=size, page_size=page_size)
    handle = start_resume(dst)
    with pytest.raises(DeviceError) as info:
        dst.write(handle, memoryview(stream))
    assert dst.state is State.RESUMING
    # After a rejected write the session is dead.
    assert errno_of(lambda: dst.write(handle, memoryview(b"x"))) == errno.ENODEV
    return info.value.errno


def test_resume_rejects_bad_magic(good_stream: bytes) -> None:
    assert reject_errno(b"FVIOSTRX" + good_stream[8:]) == errno.EINVAL


def test_resume_rejects_other_format_version(good_stream: bytes) -> None:
    assert reject_errno(patched(good_stream, 8, "<I", 1)) == errno.EOPNOTSUPP  # format 1: zlib CRC


def test_the_checksum_is_castagnoli_crc32c() -> None:
    """The library the stream uses computes CRC-32C (iSCSI, RFC 3720): its standard
    check value, not a value this project computed."""
    assert crc32c.crc32c(b"123456789") == 0xE3069283


def test_resume_rejects_other_state_or_page_size(good_stream: bytes) -> None:
    assert reject_errno(good_stream, size="24K") == errno.EOPNOTSUPP
    assert reject_errno(good_stream, page_size="8K") == errno.EOPNOTSUPP
    assert reject_errno(patched(good_stream, 16, "<Q", 20 * 1024 + 1)) == errno.EOPNOTSUPP


def test_resume_rejects_bad_header_flags_or_length(good_stream: bytes) -> None:
    assert reject_errno(patched(good_stream, 28, "<I", 1)) == errno.EINVAL
    assert reject_errno(patched(good_stream, 24, "<I", 4097)) == errno.EINVAL


def test_resume_rejects_driver_header_mismatch(good_stream: bytes) -> None:
    # ram header: <8sIIQ magic, version, page size, size (at stream offset 32).
    assert reject_errno(patched(good_stream, 32, "<8s", b"NOTARAM!")) == errno.EINVAL
    assert reject_errno(patched(good_stream, 40, "<I", 2)) == errno.EOPNOTSUPP
    assert reject_errno(patched(good_stream, 48, "<Q", 999)) == errno.EOPNOTSUPP
    # A driver header of another length (stream header says 23 bytes).
    assert reject_errno(patched(good_stream, 24, "<I", 23)) == errno.EINVAL


def test_resume_rejects_bytes_after_end(good_stream: bytes) -> None:
    assert reject_errno(good_stream + b"\x00") == errno.ENOMEM
    # Also when the extra byte comes in its own write.
    dst = ram("dst")
    handle = start_resume(dst)
    dst.write(handle, memoryview(good_stream))
    assert errno_of(lambda: dst.write(handle, memoryview(b"\x01"))) == errno.ENOMEM
    assert errno_of(lambda: dst.write(handle, memoryview(b"\x01"))) == errno.ENODEV


REC = 32 + 24  # first record header


@pytest.mark.parametrize(
    ("offset", "fmt", "value"),
    [
        (REC, "<I", 3),  # unknown tag
        (REC, "<I", 0),
        (REC + 4, "<I", 0),  # PAGES of length 0
        (REC + 4, "<I", (1 << 30) + 1),  # longer than a record may be
        (REC + 8, "<Q", 1),  # offset not on a page boundary
        (REC + 8, "<Q", 16 * 1024),  # runs past the end of the state
        (REC + 8, "<Q", 2**63),
    ],
)
def test_resume_rejects_malformed_records(
    good_stream: bytes, offset: int, fmt: str, value: int
) -> None:
    assert reject_errno(patched(good_stream, offset, fmt, value)) == errno.EINVAL


def test_resume_rejects_malformed_end_record(good_stream: bytes) -> None:
    end = len(good_stream) - 32
    assert struct.unpack_from("<I", good_stream, end)[0] == 2
    assert reject_errno(patched(good_stream, end + 4, "<I", 9)) == errno.EINVAL
    assert reject_errno(patched(good_stream, end + 8, "<Q", 1)) == errno.EINVAL


@pytest.mark.parametrize("cut", [0, 1, 31, 32, 55, 56, 60, 72, 5000, -24, -9, -1])
def test_resume_truncated_stream_fails_stop_and_stays_resuming(
    good_stream: bytes, cut: int
) -> None:
    dst = ram("dst", seed="5")
    before = digest(dst)
    handle = start_resume(dst)
    dst.write(handle, memoryview(good_stream[:cut]))
    with pytest.raises(DeviceError) as info:
        dst.set_state(State.STOP)
    assert info.value.errno == errno.EINVAL
    assert dst.state is State.RESUMING
    assert dst.session is not None
    assert dst.log_text().splitlines()[-1] == "RESUMING STOP EINVAL"
    if 0 <= cut <= 56:
        assert digest(dst) == before  # nothing applied before the header checked out
    dst.reset()
    assert dst.info(with_digest=False)["state"] == "RUNNING"


def test_resume_end_count_mismatch_or_missing_page_fails_stop(good_stream: bytes) -> None:
    end = len(good_stream) - 32
    bad_count = recrc(patched(good_stream, end + 16, "<Q", 12345))
    dst = ram("dst")
    load_err = errno_of(lambda: load(dst, bad_count))
    assert load_err == errno.EINVAL
    assert dst.state is State.RESUMING
    # A stream that never sends the state's second part: the one PAGES record
    # of a 1100K state cut to its first 1 MiB, END counting that.
    big = save(ram(size="1100K"))
    parsed = parse_stream(big)
    only, endrec = parsed.records
    assert (only.tag, only.length, endrec.tag) == (1, 1100 * 1024, 2)
    part = struct.pack("<IIQ", 1, MIB, 0) + big[only.at : only.at + MIB]
    tail = struct.pack("<IIQ", 2, 16, 0) + struct.pack("<QII", MIB, 0, 0)
    hole = recrc(big[: only.at - 16] + part + tail)
    dst2 = ram("dst2", size="1100K")
    assert errno_of(lambda: load(dst2, hole)) == errno.EINVAL
    assert dst2.state is State.RESUMING


def test_resume_partial_pages_fail_stop(good_stream: bytes) -> None:
    records = b"".join(struct.pack("<IIQ", 1, 1, page * 4096) + b"\xaa" for page in range(5))
    records += struct.pack("<IIQ", 2, 16, 0) + struct.pack("<QII", 5, 0, 0)
    dst = ram("dst")
    handle = start_resume(dst)
    # A partial-page record that does not end the state is malformed at once.
    bad = memoryview(good_stream[:REC] + records)
    assert errno_of(lambda: dst.write(handle, bad)) == errno.EINVAL
    assert errno_of(lambda: dst.set_state(State.STOP)) == errno.EINVAL
    assert dst.state is State.RESUMING


def test_resume_without_any_data_fails_stop() -> None:
    dst = ram("dst")
    start_resume(dst)
    assert errno_of(lambda: dst.set_state(State.STOP)) == errno.EINVAL
    assert errno_of(lambda: dst.set_state(State.RUNNING)) == errno.EINVAL
    assert dst.state is State.RESUMING


def test_resume_session_is_one_shot_per_arc(good_stream: bytes) -> None:
    dst = ram("dst")
    handle = start_resume(dst)
    dst.write(handle, memoryview(good_stream))
    dst.set_state(State.RUNNING)  # RESUMING -> STOP -> (RUNNING_P2P ->) RUNNING
    assert dst.state is State.RUNNING
    assert errno_of(lambda: dst.write(handle, memoryview(b"x"))) == errno.ENODEV


# ---------------------------------------------------------------------------
# Hypothesis


SMALL = {"size": "2565", "page_size": "512"}


@pytest.fixture(scope="module")
def small_stream() -> bytes:
    return save(ram(**SMALL))


def _try_load(stream: bytes, cuts: list[int]) -> tuple[Device, DeviceError | None]:
    dst = ram("dst", seed="11", **SMALL)
    handle = start_resume(dst)
    bounds = [0, *sorted(c % (len(stream) + 1) for c in cuts), len(stream)]
    try:
        for a, b in itertools.pairwise(bounds):
            dst.write(handle, memoryview(stream[a:b]))
        dst.set_state(State.STOP)
    except DeviceError as exc:
        return dst, exc
    return dst, None


HYP = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@HYP
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(min_value=0), max_size=5))
def test_resume_random_bytes_always_device_error(data: bytes, cuts: list[int]) -> None:
    _, err = _try_load(data, cuts)
    assert err is not None


@HYP
@given(
    prefix=st.binary(max_size=8), cuts=st.lists(st.integers(min_value=0), max_size=5), rnd=st.data()
)
def test_resume_random_tail_after_valid_header_always_device_error(
    small_stream: bytes, prefix: bytes, cuts: list[int], rnd: st.DataObject
) -> None:
    keep = rnd.draw(st.integers(min_value=0, max_value=len(small_stream) - 1))
    tail = rnd.draw(st.binary(max_size=64))
    stream = small_stream[:keep] + prefix + tail
    if stream == small_stream:
        return
    _, err = _try_load(stream, cuts)
    if err is None:
        # Only possible when random bytes replaced page payload and the rest lined up.
        parse_stream(stream)


@HYP
@given(cut=st.integers(min_value=0), cuts=st.lists(st.integers(min_value=0), max_size=4))
def test_resume_any_truncation_fails(small_stream: bytes, cut: int, cuts: list[int]) -> None:
    truncated = small_stream[: cut % len(small_stream)]
    dst, err = _try_load(truncated, cuts)
    assert err is not None
    assert dst.state is State.RESUMING


@HYP
@given(pos=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_resume_any_bit_flip_is_rejected(small_stream: bytes, pos: int, bit: int) -> None:
    pos %= len(small_stream)
    flipped = bytearray(small_stream)
    flipped[pos] ^= 1 << bit
    dst, err = _try_load(bytes(flipped), [])
    # Anywhere, page data included: the END record's CRC-32 catches it.
    assert err is not None
    assert dst.state is State.RESUMING


@HYP
@given(cuts=st.lists(st.integers(min_value=0), max_size=40))
def test_resume_any_segmentation_loads_same_digest(small_stream: bytes, cuts: list[int]) -> None:
    dst, err = _try_load(small_stream, cuts)
    assert err is None
    assert dst.state is State.STOP
    assert digest(dst) == hashlib.sha256(parse_stream(small_stream).state).hexdigest()


# ---------------------------------------------------------------------------
# Rule 6: a stopped device's reads are views of its state; everything else copies


def _stop_copy(device: Device) -> Session:
    device.set_state(State.STOP)
    device.set_state(State.STOP_COPY)
    return device.open_session(read=True, write=False)


def test_stop_copy_reads_inside_the_record_are_views_of_the_state() -> None:
    src = ram(size="3M", flags="STOP_COPY")
    handle = _stop_copy(src)
    first, _ = src.read(handle, MIB)  # header, record header, then state bytes: joined
    second, _ = src.read(handle, MIB)  # inside the one PAGES record
    assert isinstance(first, bytes)
    assert isinstance(second, memoryview)
    head = MIB - (32 + 24 + 16)
    assert bytes(second) == bytes(src.driver.save_range(head, MIB))  # type: ignore[attr-defined]
    stream = bytes(first) + bytes(second) + read_all(src, handle, MIB)
    dst = ram("dst", size="3M", flags="STOP_COPY", seed="1")
    load(dst, stream, seg=MIB)
    assert digest(dst) == digest(src)


def test_pre_copy_reads_are_copies_a_running_device_cannot_change() -> None:
    src = ram(size="2M")
    src.set_state(State.PRE_COPY)
    handle = src.open_session(read=True, write=False)
    src.read(handle, 4096)
    data, _ = src.read(handle, 4096)  # state bytes 4024..8120 of a running device
    before = bytes(data)
    src.region_write("bar0", 4096, memoryview(b"\xee" * 16))  # the workload rewrites them
    assert not isinstance(data, memoryview)
    assert bytes(data) == before


@pytest.mark.parametrize("rule", ["read_bandwidth", "delay"])
def test_paced_or_delayed_stop_copy_reads_are_copies(rule: str) -> None:
    options = {"read_bandwidth": "1G"} if rule == "read_bandwidth" else {}
    src = ram(size="3M", flags="STOP_COPY", **options)
    if rule == "delay":
        src.faults = FaultRules.parse("delay read 1")
    handle = _stop_copy(src)
    src.read(handle, MIB)
    data, delay = src.read(handle, MIB)
    assert delay > 0
    assert isinstance(data, bytes)  # the reply waits: nothing may change it meanwhile


def test_corrupting_a_stop_copy_read_leaves_the_state_alone() -> None:
    src = ram(size="3M", flags="STOP_COPY")
    before = digest(src)
    src.faults = FaultRules.parse(f"corrupt after {MIB + 100}")
    handle = _stop_copy(src)
    stream = read_all(src, handle, MIB)
    assert digest(src) == before  # the flipped byte is in the reply, not in the device
    dst = ram("dst", size="3M", flags="STOP_COPY")
    assert errno_of(lambda: load(dst, stream, seg=MIB)) == errno.EINVAL


# ---------------------------------------------------------------------------
# Rule 7: a stop-copy session's CRC from per-chunk checksums


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_checksum_combine_is_the_crc32c_of_the_concatenation(a: bytes, b: bytes) -> None:
    """The oracle is the crc32c library over ``a + b``, not this project's arithmetic."""
    assert checksum_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


def test_checksum_combine_over_a_whole_chunk() -> None:
    a, b = b"stream header", bytes(range(256)) * (CHECKSUM_CHUNK // 256)
    assert checksum_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


def _write_region(device: Device, offset: int, data: bytes) -> None:
    device.region_write("bar0", offset, memoryview(data))


def _load_other(device: Device, offset: int, data: bytes) -> None:
    other = ram("other", size="2600K", seed="5")
    _write_region(other, offset, data)
    load(device, save(other))


def _run_workload(device: Device, offset: int, data: bytes) -> None:
    driver = device.driver
    assert isinstance(driver, RamDriver)
    driver._dirty_rate = 64 << 10  # the workload's writes, wherever its rng puts them
    device.set_state(State.RUNNING)
    device.advance(4.0)
    device.set_state(State.STOP)
    driver._dirty_rate = 0


@pytest.mark.parametrize("mutate", [_write_region, _load_other, _run_workload])
@pytest.mark.parametrize(
    "offset", [0, CHECKSUM_CHUNK - 2, CHECKSUM_CHUNK + 77, 2 * CHECKSUM_CHUNK + 5]
)
def test_stop_copy_crc_is_right_after_every_kind_of_write(
    mutate: Callable[[Device, int, bytes], None], offset: int
) -> None:
    """The driver keeps each chunk's CRC-32C between stop-copy sessions; a write of any
    kind (region, resume, workload) must drop the chunks it touches, else END's CRC is
    stale and parse_stream, which recomputes it over the bytes, fails."""
    src = ram(size="2600K", seed="3")  # two whole chunks and a partial one
    parse_stream(save(src))  # every chunk's CRC now known
    before = digest(src)
    mutate(src, offset, b"\xa5\x5a\xc3")
    assert digest(src) != before
    parsed = parse_stream(save(src))
    assert hashlib.sha256(parsed.state).hexdigest() == digest(src)
    dst = ram("dst", size="2600K", seed="1")
    load(dst, save(src), seg=MIB)
    assert digest(dst) == digest(src)


def test_stop_copy_crc_of_an_unseeded_device_and_of_a_short_one() -> None:
    for size in ("2600K", "3M", "5K"):
        src = Device("src", "ram", RamDriver("src", {"size": size}), 0)  # zeros, no seed
        parse_stream(save(src))
        _write_region(src, 1, b"x")
        parse_stream(save(src))
