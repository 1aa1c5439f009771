"""The migration stream the core produces and validates for :class:`StateDriver` drivers.

Theory of operation
-------------------
A saving session turns the driver's state into one byte stream; a resuming
session parses it back. All integers are little-endian.

Stream header (32 bytes, then the driver's header)::

    0  8  magic b"FVIOSTRM"
    8  4  format version (3; version 2 had PAGES records of at most 1 MiB,
          version 1 a zlib CRC-32 at END)
    12 4  page size
    16 8  state size in bytes
    24 4  driver header length H (at most 4096)
    28 4  flags (0)
    32 H  driver header (``StateDriver.header()``)

Records (16-byte header, then the payload)::

    0  4  tag: 1 = PAGES, 2 = END
    4  4  payload length (PAGES: 1 .. 1 GiB of state bytes; END: 16)
    8  8  offset of the PAGES data in the state (a page boundary); 0 for END
    16 .. payload

    END payload: u64 number of PAGES payload bytes in the stream, u32 CRC-32C
    (Castagnoli, as iSCSI and ext4 use; :func:`stream_checksum`) of every stream
    byte before this payload, u32 reserved (0). CRC-32C runs on the CPU's CRC
    instructions (SSE4.2, ARMv8) through the ``crc32c`` package: about 10x
    zlib's CRC-32, which was most of the per-byte cost of a stream.

Rule 1: the *initial* part of a stream is the header plus PAGES records for
        the whole state, in offset order: of 1 MiB in a pre-copy session, of up
        to 1 GiB in a stop-copy one (so 1 MiB reads of a stopped device lie
        inside one record, see Rule 6). In PRE_COPY the device keeps running
        and every page it dirties after the session began is re-sent later as
        another PAGES record (``dirty_bytes``) of at most 1 MiB.
Rule 2: the END record is only written in STOP_COPY, after every dirty page;
        after it a read returns 0 bytes forever. In PRE_COPY* a read with
        nothing to send fails with ENOMSG (the uAPI's temporary end).
Rule 3: the loader checks the header before it applies any byte of state:
        bad magic or malformed records give EINVAL, another format version,
        page size, state size or driver header give EOPNOTSUPP, a CRC-32
        mismatch at END (a corrupted stream) gives EINVAL, bytes after END
        give ENOMEM. Any such error kills the session (ENODEV after).
Rule 4: RESUMING -> STOP succeeds only when END arrived, every page was
        loaded at least once and END's byte count matches; otherwise EINVAL
        and the device stays in RESUMING.
Rule 5: with ``reinit_after`` set on the driver, the first PRECOPY_INFOv2
        query of a pre-copy session after that many bytes were read starts the
        initial part again (every page, in offset order, after the bytes
        already queued; dirty pages dropped) and answers REINIT. A v1 query
        never does: initial_bytes only decreases for a caller that did not
        opt in (``VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2``, Linux 7.1).
Rule 6: in STOP_COPY the device is stopped, so a read that lies inside one
        queued piece (a record header, or the state bytes of a driver with
        ``stable_ranges``) returns a view of it instead of a copy, its
        checksum taken over that view. Everywhere else (PRE_COPY, where the
        workload may change a page before the reply leaves, or a read across
        pieces) it returns a new ``bytes``. :class:`fakevfio._device.Device`
        copies a view anyway when the reply waits out a pace or a delay, or
        carries a corruption fault. A region write racing such a read may
        reach its reader; END's checksum then fails on the destination (the
        uAPI: the user restricts access to the regions in STOP_COPY).
Rule 7: a stop-copy session of a ``stable_ranges`` driver takes END's CRC-32C
        from the checksum of each CHECKSUM_CHUNK-aligned chunk of state
        (``StateDriver.checksum``), combined in stream order once the chunk is
        wholly read (``checksum_combine``, zlib's crc32_combine for CRC-32C), so
        a driver that keeps the checksums of chunks it has not written since
        (the ram driver: any write drops those it touches) sends a stopped
        state without a per-byte pass. The bytes on the wire are the same.
"""

from __future__ import annotations

import collections
import errno
import functools
import struct
from typing import TYPE_CHECKING

import attrs
import crc32c

from fakevfio.driver._base import LoadStream, PrecopyInfo, SaveStream
from fakevfio.errors import DeviceError
from vfio_uapi.fsm import PRECOPY_STATES, State

if TYPE_CHECKING:
    from fakevfio.driver._state import StateDriver

MAGIC = b"FVIOSTRM"
FORMAT_VERSION = 3
HEADER = struct.Struct("<8sIIQII")
RECORD = struct.Struct("<IIQ")
TAG_PAGES = 1
TAG_END = 2
END_PAYLOAD = struct.Struct("<QII")
MAX_DRIVER_HEADER_BYTES = 4096
#: The largest PAGES payload a loader accepts: a stop-copy session's initial records.
MAX_RECORD_BYTES = 1 << 30
#: A stop-copy session checksums its state in chunks of this many bytes at offsets
#: that are multiples of it (``StateDriver.checksum``, Rule 7).
CHECKSUM_CHUNK = 1 << 20
#: The PAGES payload of a pre-copy session's initial part and of every dirty run.
PRECOPY_RECORD_BYTES = 1 << 20


def stream_checksum(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """The END record's checksum: CRC-32C of ``data``, continuing from ``crc``."""
    return crc32c.crc32c(data, crc)


@functools.lru_cache(maxsize=16)
def _shift_tables(length: int) -> tuple[tuple[int, ...], ...]:
    """Byte tables of the linear map a CRC-32C goes through over ``length`` more bytes.

    ``crc32c(B, c) ^ crc32c(B, 0)`` depends only on ``c`` and ``len(B)`` and is
    linear in ``c`` (the bytes' own part cancels): the image of each of the 32
    bits, from ``length`` zero bytes, gives four 256-entry tables.
    """
    zeros = bytes(length)
    base = crc32c.crc32c(zeros, 0)
    bits = [crc32c.crc32c(zeros, 1 << i) ^ base for i in range(32)]
    tables = []
    for byte in range(4):
        table = [0] * 256
        for value in range(1, 256):
            low = value & -value
            table[value] = table[value ^ low] ^ bits[8 * byte + low.bit_length() - 1]
        tables.append(tuple(table))
    return tuple(tables)


def checksum_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC-32C of ``A + B`` from the CRCs of ``A`` and ``B`` and ``B``'s length.

    zlib's crc32_combine, for CRC-32C; :func:`_shift_tables` keeps the tables.
    """
    t0, t1, t2, t3 = _shift_tables(length_b)
    shifted = t0[crc_a & 255] ^ t1[(crc_a >> 8) & 255] ^ t2[(crc_a >> 16) & 255] ^ t3[crc_a >> 24]
    return shifted ^ crc_b


def _stream_header(driver: StateDriver) -> bytes:
    drv = driver.header()
    if len(drv) > MAX_DRIVER_HEADER_BYTES:
        raise ValueError(f"driver header of {len(drv)} bytes exceeds {MAX_DRIVER_HEADER_BYTES}")
    return (
        HEADER.pack(MAGIC, FORMAT_VERSION, driver.page_size, driver.state_size(), len(drv), 0) + drv
    )


def _records_bytes(length: int, run: int) -> int:
    """Bytes of PAGES records covering ``length`` state bytes in runs of ``run`` bytes."""
    return length + RECORD.size * (-(-length // run))


def full_stream_size(driver: StateDriver) -> int:
    """Size of a complete STOP_COPY stream of a stopped device."""
    return (
        HEADER.size
        + len(driver.header())
        + _records_bytes(driver.state_size(), _run_bytes(driver))
        + RECORD.size
        + END_PAYLOAD.size
    )


def _run_bytes(driver: StateDriver, record: int = MAX_RECORD_BYTES) -> int:
    """The initial part's record payload (whole pages): of a stop-copy session by default."""
    return max(driver.page_size, (record // driver.page_size) * driver.page_size)


class StateSaveStream(SaveStream):
    """Saving session of a StateDriver (see the module docstring)."""

    #: Its views are of record headers or of a stopped device's stable state (Rule 6).
    stable_views = True

    def __init__(self, driver: StateDriver, *, precopy: bool) -> None:
        self._driver = driver
        self._size = driver.state_size()
        #: Initial records: 1 MiB in pre-copy (re-initialisation and the pre-copy
        #: accounting count in those), up to 1 GiB in stop-copy (Rule 6).
        self._run = _run_bytes(driver, PRECOPY_RECORD_BYTES if precopy else MAX_RECORD_BYTES)
        #: Dirty runs, at most 1 MiB.
        self._dirty_run = max(1, PRECOPY_RECORD_BYTES // driver.page_size)
        self._views = driver.stable_ranges
        header = _stream_header(driver)
        # None stands for the END payload, built when the reader reaches it
        # (its CRC covers every byte read before it).
        self._segments: collections.deque[memoryview | None] = collections.deque(
            [memoryview(header)]
        )
        self._crc = 0
        #: Rule 7: a stop-copy session of a stable driver folds its bytes into the CRC
        #: once read, in order: (piece, state offset or -1 for stream metadata).
        self._lazy = not precopy and self._views
        self._unfolded: collections.deque[tuple[memoryview, int]] = collections.deque()
        if self._lazy:
            self._unfolded.append((memoryview(header), -1))
        self._folded = 0  # stream bytes in self._crc (lazy mode)
        self._cursor = 0  # next state offset of the initial part
        self._initial_total = len(header) + _records_bytes(self._size, self._run)
        self._emitted = 0  # bytes returned by read() so far
        self._pending = len(header)  # bytes in _segments
        self._data_bytes = 0  # PAGES payload bytes produced
        self._end_written = False
        self._reinitialised = False
        self.precopy = precopy

    # -- accounting -------------------------------------------------------
    def _initial_left(self) -> int:
        return max(0, self._initial_total - self._emitted)

    def precopy_info(self) -> PrecopyInfo:
        initial = self._initial_left()
        # Bytes already produced beyond the initial part, plus dirty pages to come.
        produced_dirty = self._emitted + self._pending - max(self._initial_total, self._emitted)
        # Upper bound per dirty page (data + a record header), so reads never grow it.
        per_page = self._driver.page_size + RECORD.size
        dirty = max(0, produced_dirty) + self._driver.dirty_pages() * per_page
        return PrecopyInfo(initial_bytes=initial, dirty_bytes=dirty)

    def precopy_info_v2(self) -> PrecopyInfo:
        """Rule 5: the first v2 query after ``reinit_after`` bytes read re-initialises."""
        after = self._driver.reinit_after
        if after is None or self._reinitialised or self._emitted < after:
            return self.precopy_info()
        self._reinitialised = True
        self._reinit()
        return attrs.evolve(self.precopy_info(), reinit=True)

    def _reinit(self) -> None:
        """New initial data: the whole state again, after what is already queued.

        Bytes produced but not yet read count as initial too (the caller must
        read them first); dirty pages are dropped, the new initial part
        carries them.
        """
        driver = self._driver
        while driver.take_dirty_run(self._dirty_run) is not None:
            pass
        self._cursor = 0
        self._initial_total = self._emitted + self._pending + _records_bytes(self._size, self._run)

    def remaining(self) -> int:
        if self._end_written:
            return self._pending
        unsent_initial = self._size - self._cursor
        dirty = self._driver.dirty_pages() * self._driver.page_size
        return (
            self._pending
            + _records_bytes(unsent_initial, self._run)
            + _records_bytes(dirty, self._dirty_run * self._driver.page_size)
            + RECORD.size
            + END_PAYLOAD.size
        )

    # -- production -------------------------------------------------------
    def _produce(self, state: State) -> bool:
        """Queue the next record; False when nothing is left for now."""
        driver = self._driver
        if self._end_written:
            return False  # after END: EOF forever, even if something is dirtied later
        if self._cursor < self._size:
            offset = self._cursor
            length = min(self._run, self._size - offset)
            self._cursor += length
        else:
            run = driver.take_dirty_run(self._dirty_run)
            if run is not None:
                offset = run[0] * driver.page_size
                length = min(run[1] * driver.page_size, self._size - offset)
            elif state is State.STOP_COPY and not self._end_written:
                self._end_written = True
                end = memoryview(RECORD.pack(TAG_END, END_PAYLOAD.size, 0))
                self._segments.append(end)
                self._segments.append(None)
                if self._lazy:
                    self._unfolded.append((end, -1))
                self._pending += RECORD.size + END_PAYLOAD.size
                return True
            else:
                return False
        data = memoryview(driver.save_range(offset, length))
        if len(data) != length:
            raise DeviceError(
                errno.EIO,
                f"driver returned {len(data)} bytes for a {length}-byte range",
                device=driver.name,
            )
        head = memoryview(RECORD.pack(TAG_PAGES, length, offset))
        self._segments.append(head)
        self._segments.append(data)
        if self._lazy:
            self._unfolded.append((head, -1))
            self._unfolded.append((data, offset))
        self._pending += RECORD.size + length
        self._data_bytes += length
        return True

    def read(self, size: int, state: State) -> bytes | memoryview:
        # Rule 6: a stopped device's read inside one queued piece is a view of
        # it (no copy in the daemon; pyfuse3 replies from any buffer).
        segments = self._segments
        if state is State.STOP_COPY and size > 0 and (segments or self._produce(state)):
            seg = segments[0]
            if seg is not None and len(seg) >= size and (self._views or isinstance(seg.obj, bytes)):
                if len(seg) == size:
                    segments.popleft()
                else:
                    segments[0] = seg[size:]
                    seg = seg[:size]
                self._pending -= size
                self._emitted += size
                if self._lazy:
                    self._fold(self._emitted)
                else:
                    self._crc = stream_checksum(seg, self._crc)
                return seg
        return self._read_joined(size, state)

    def _read_joined(self, size: int, state: State) -> bytes:
        # One copy per byte: the pieces (views of the driver's memory and of the
        # queued record headers) are gathered as views and joined once into an
        # exact-size ``bytes`` (no zero fill, no intermediate buffer), and the
        # CRC runs once over that result, which is what the reader gets.
        if size <= 0:
            return b""
        pieces: list[memoryview] = []
        filled = crc_done = 0
        segments = self._segments
        while filled < size:
            if not segments and not self._produce(state):
                break
            seg = segments[0]
            if seg is None:
                # END's CRC covers every byte before it, this read's included.
                # (The pieces are views the device lock keeps unchanged until the join.)
                if self._lazy:
                    self._fold(self._emitted + filled)
                else:
                    for piece in pieces:
                        self._crc = stream_checksum(piece, self._crc)
                crc_done = filled
                seg = memoryview(END_PAYLOAD.pack(self._data_bytes, self._crc, 0))
                segments[0] = seg
            n = min(len(seg), size - filled)
            if n == len(seg):
                pieces.append(seg)
                segments.popleft()
            else:
                pieces.append(seg[:n])
                segments[0] = seg[n:]
            filled += n
        self._pending -= filled
        self._emitted += filled
        if filled == 0:
            if state in PRECOPY_STATES:
                raise DeviceError(
                    errno.ENOMSG, "no pre-copy data for now", device=self._driver.name
                )
            return b""
        out = pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)
        if self._lazy:
            self._fold(self._emitted)
        elif crc_done < filled:
            self._crc = stream_checksum(memoryview(out)[crc_done:], self._crc)
        return out

    def _fold(self, limit: int) -> None:
        """Rule 7: fold the read bytes before stream offset ``limit`` into the CRC.

        Metadata pieces fold once wholly read; state bytes by aligned chunk,
        each once wholly read, from ``StateDriver.checksum`` (which may know it
        without reading the memory) when the chunk is whole.
        """
        unfolded = self._unfolded
        driver = self._driver
        crc = self._crc
        pos = self._folded
        while unfolded:
            piece, offset = unfolded[0]
            if offset < 0:
                if pos + len(piece) > limit:
                    break
                crc = stream_checksum(piece, crc)
                pos += len(piece)
                unfolded.popleft()
                continue
            n = min(len(piece), CHECKSUM_CHUNK - offset % CHECKSUM_CHUNK)
            if pos + n > limit:
                break
            if offset % CHECKSUM_CHUNK == 0 and (n == CHECKSUM_CHUNK or offset + n == self._size):
                crc = checksum_combine(crc, driver.checksum(offset, n), n)
            else:
                crc = stream_checksum(piece[:n], crc)
            pos += n
            if n == len(piece):
                unfolded.popleft()
            else:
                unfolded[0] = (piece[n:], offset + n)
        self._crc = crc
        self._folded = pos


class StateLoadStream(LoadStream):
    """Resuming session of a StateDriver: incremental, bounded parser."""

    def __init__(self, driver: StateDriver) -> None:
        self._driver = driver
        self._size = driver.state_size()
        self._page = driver.page_size
        self._pages = -(-self._size // self._page)
        self._loaded = bytearray(self._pages)
        self._loaded_count = 0
        self._buf = bytearray()  # header / record header bytes only (bounded)
        self._need = HEADER.size
        self._phase = "header"
        self._data_left = 0
        self._data_offset = 0
        self._data_bytes = 0
        self._end_count: int | None = None
        self._crc = 0
        self.received = 0

    def _fail(self, err: int, msg: str) -> DeviceError:
        return DeviceError(
            err, f"resuming stream at byte {self.received}: {msg}", device=self._driver.name
        )

    def write(self, data: memoryview) -> None:
        pos = 0
        n = len(data)
        while pos < n:
            if self._phase == "data":
                take = min(self._data_left, n - pos)
                piece = data[pos : pos + take]
                self._crc = stream_checksum(piece, self._crc)
                self._driver.load_range(self._data_offset, piece)
                self._data_offset += take
                self._data_left -= take
                pos += take
                self.received += take
                if self._data_left == 0:
                    self._phase = "record"
                    self._need = RECORD.size
                continue
            if self._phase == "done":
                raise self._fail(errno.ENOMEM, "data after the END record")
            take = min(self._need - len(self._buf), n - pos)
            piece = data[pos : pos + take]
            if self._phase != "end":  # the CRC covers everything before END's payload
                self._crc = stream_checksum(piece, self._crc)
            self._buf += piece
            pos += take
            self.received += take
            if len(self._buf) == self._need:
                self._parse()

    def _parse(self) -> None:
        buf = bytes(self._buf)
        self._buf.clear()
        if self._phase == "header":
            magic, version, page, size, hlen, flags = HEADER.unpack(buf)
            if magic != MAGIC:
                raise self._fail(errno.EINVAL, f"bad magic {magic!r} (expected {MAGIC!r})")
            if version != FORMAT_VERSION:
                raise self._fail(
                    errno.EOPNOTSUPP,
                    f"stream format version {version} (this device loads {FORMAT_VERSION})",
                )
            if page != self._page or size != self._size:
                raise self._fail(
                    errno.EOPNOTSUPP,
                    f"stream of a device with {size} bytes in {page}-byte pages "
                    f"(this device: {self._size} bytes in {self._page}-byte pages)",
                )
            if flags != 0 or hlen > MAX_DRIVER_HEADER_BYTES:
                raise self._fail(errno.EINVAL, f"bad header flags {flags:#x} or length {hlen}")
            self._phase = "driver-header"
            self._need = hlen
            if hlen == 0:
                self._parse_driver_header(b"")
            return
        if self._phase == "driver-header":
            self._parse_driver_header(buf)
            return
        if self._phase == "record":
            tag, length, offset = RECORD.unpack(buf)
            if tag == TAG_PAGES:
                if (
                    length == 0
                    or length > MAX_RECORD_BYTES
                    or offset % self._page
                    or offset + length > self._size
                    or (length % self._page and offset + length != self._size)
                ):
                    raise self._fail(
                        errno.EINVAL, f"bad PAGES record (offset {offset}, length {length})"
                    )
                # One byte per page; counted and set by slice, not page by page
                # (a 1 MiB record is 256 pages of 4 KiB).
                first = offset // self._page
                end = (offset + length - 1) // self._page + 1
                self._loaded_count += self._loaded.count(0, first, end)
                self._loaded[first:end] = b"\x01" * (end - first)
                self._phase = "data"
                self._data_left = length
                self._data_offset = offset
                self._data_bytes += length
            elif tag == TAG_END:
                if length != END_PAYLOAD.size or offset != 0:
                    raise self._fail(errno.EINVAL, f"bad END record (length {length})")
                self._phase = "end"
                self._need = END_PAYLOAD.size
            else:
                raise self._fail(errno.EINVAL, f"unknown record tag {tag}")
            return
        if self._phase == "end":
            count, crc, reserved = END_PAYLOAD.unpack(buf)
            if crc != self._crc or reserved:
                raise self._fail(
                    errno.EINVAL,
                    f"stream checksum mismatch (END says {crc:#010x}, data gives "
                    f"{self._crc:#010x}): the stream is corrupted",
                )
            self._end_count = count
            self._phase = "done"
            return
        raise AssertionError(self._phase)

    def _parse_driver_header(self, header: bytes) -> None:
        try:
            self._driver.check_header(header)
        except DeviceError as exc:
            raise self._fail(exc.errno, exc.detail) from None
        self._phase = "record"
        self._need = RECORD.size

    def finish(self) -> None:
        """The RESUMING -> STOP check (Rule 4)."""
        if self._phase != "done":
            raise self._fail(
                errno.EINVAL, f"incomplete stream (stopped in {self._phase}, no END record)"
            )
        if self._loaded_count != self._pages:
            raise self._fail(
                errno.EINVAL,
                f"incomplete state: {self._pages - self._loaded_count} of {self._pages} "
                "pages never sent",
            )
        if self._end_count != self._data_bytes:
            raise self._fail(
                errno.EINVAL,
                f"END record counts {self._end_count} data bytes, "
                f"stream carried {self._data_bytes}",
            )
        self._driver.validate()


_PRECOPY_START_ARCS = frozenset(
    {(State.RUNNING, State.PRE_COPY), (State.RUNNING_P2P, State.PRE_COPY_P2P)}
)


def state_driver_step(
    driver: StateDriver, current: State, nxt: State, stream: SaveStream | LoadStream | None
) -> SaveStream | LoadStream | None:
    """Arc implementation shared by every StateDriver."""
    arc = (current, nxt)
    if arc in _PRECOPY_START_ARCS:
        driver.start_dirty_tracking()
        return StateSaveStream(driver, precopy=True)
    if arc == (State.STOP, State.STOP_COPY):
        return StateSaveStream(driver, precopy=False)
    if arc == (State.STOP, State.RESUMING):
        return StateLoadStream(driver)
    if arc == (State.RESUMING, State.STOP):
        if not isinstance(stream, StateLoadStream):
            raise DeviceError(errno.EINVAL, "no resuming stream to load", device=driver.name)
        stream.finish()
    return None


def state_driver_data_size(driver: StateDriver, stream: SaveStream | LoadStream | None) -> int:
    if isinstance(stream, StateSaveStream):
        return stream.remaining()
    return full_stream_size(driver)
