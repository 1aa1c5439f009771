"""An accelerator with a large memory, at the arc level with its own streams.

The device has ``mem`` bytes of memory (region ``bar2``, a 64-bit prefetchable
BAR) and a 4 KiB engine context (region ``bar0``). While it runs, a workload rewrites ``dirty_rate``
bytes of memory per second, page by page, and advances the context's cycle
counter. The driver tracks dirtied pages itself during a pre-copy session and
sends them again; its stream is the tagged-record format of
:mod:`fakevfio_gpu.records` (like mlx5's), which the core knows nothing about:
that is why this driver implements :class:`~fakevfio.driver.ArcDriver` and not
the simpler :class:`~fakevfio.driver.StateDriver`.

Pre-copy: RUNNING -> PRE_COPY opens a stream whose *initial* part is the
preamble, DEVINFO and MEM records for the whole memory (read from memory as the
reader gets to it, so a page dirtied before it is sent goes once, not twice).
Pages dirtied after they were sent are re-sent as *dirty* data. Stop-copy sends
what is still dirty, then CONTEXT, STATS and END.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import mmap
import random
import struct
import zlib
from collections.abc import Mapping
from typing import ClassVar

from fakevfio import PRECOPY_STATES, MigFlags, State
from fakevfio.driver import (
    ArcDriver,
    Bar,
    BarKind,
    LoadStream,
    OptionSpec,
    PrecopyInfo,
    SaveStream,
)
from fakevfio.errors import ConfigError, DeviceError
from fakevfio_gpu import records as rec
from fakevfio_gpu.dirty import DirtyBitmap

CONTEXT_ID = 0x31555047  # "GPU1"
_CTX_ID = struct.Struct("<I")
_CTX_CYCLES = struct.Struct("<Q")
CTX_CYCLES_OFFSET = 8
_MAX_MEM_BYTES = 1 << 40
_FILL_BLOCK = 1 << 20
#: The regions: BAR0 holds the engine context, BAR2 the device memory.
REGS = "bar0"
VRAM = "bar2"


class GpuSaveStream(SaveStream):
    """Saving session: produces records lazily, as they are read."""

    def __init__(self, driver: GpuDriver, *, precopy: bool) -> None:
        self._driver = driver
        self._mem = driver.mem_size
        self._page = driver.page_size
        self._run = max(self._page, rec.MAX_MEM_RECORD_BYTES // self._page * self._page)
        self._segments: collections.deque[bytes] = collections.deque()
        self._crc = 0
        self._pending = 0
        self._emitted = 0
        self._cursor = 0  # next memory offset of the initial part
        self._mem_bytes = 0
        self._tail_written = False
        self.pages_sent = 0
        self.pages_resent = 0
        self.precopy = precopy
        self._queue(rec.encode_preamble())
        self._queue(rec.encode_record(rec.TAG_DEVINFO, rec.DEVINFO.pack(self._mem, self._page)))
        self._initial_total = self._pending + rec.mem_records_bytes(self._mem, self._run)

    def _queue(self, data: bytes) -> None:
        self._segments.append(data)
        self._crc = zlib.crc32(data, self._crc)
        self._pending += len(data)

    def _queue_mem(self, offset: int, length: int) -> None:
        # Copy now: the CRC must cover exactly the bytes the reader will get.
        data = bytes(self._driver.view[offset : offset + length])
        self._queue(
            rec.RECORD.pack(rec.TAG_MEM, rec.FLAG_MANDATORY, rec.MEM_OFFSET.size + length)
            + rec.MEM_OFFSET.pack(offset)
            + data
        )
        self._mem_bytes += length

    def _produce(self, state: State) -> bool:
        driver = self._driver
        if self._tail_written:
            return False  # after END: EOF forever, even if a BAR write dirties a page
        if self._cursor < self._mem:
            offset = self._cursor
            length = min(self._run, self._mem - offset)
            self._cursor += length
            pages = -(-length // self._page)
            if driver.dirty is not None:
                driver.dirty.clear(offset // self._page, pages)
            self._queue_mem(offset, length)
            self.pages_sent += pages
            return True
        run = driver.dirty.take_run(self._run // self._page) if driver.dirty is not None else None
        if run is not None:
            offset = run[0] * self._page
            self._queue_mem(offset, min(run[1] * self._page, self._mem - offset))
            self.pages_resent += run[1]
            return True
        if state is State.STOP_COPY and not self._tail_written:
            self._tail_written = True
            self._queue(rec.encode_record(rec.TAG_CONTEXT, bytes(driver.context)))
            self._queue(
                rec.encode_record(
                    rec.TAG_STATS,
                    rec.STATS.pack(self.pages_sent, self.pages_resent),
                    mandatory=False,
                )
            )
            self._queue(rec.encode_record(rec.TAG_END, rec.END.pack(self._mem_bytes, self._crc)))
            return True
        return False

    def read(self, size: int, state: State) -> bytes:
        if size <= 0:
            return b""
        out = bytearray()
        segments = self._segments
        while len(out) < size:
            if not segments and not self._produce(state):
                break
            seg = segments[0]
            want = size - len(out)
            if len(seg) <= want:
                out += segments.popleft()
            else:
                out += seg[:want]
                segments[0] = seg[want:]
        self._pending -= len(out)
        self._emitted += len(out)
        if not out and state in PRECOPY_STATES:
            raise DeviceError(errno.ENOMSG, "no pre-copy data for now", device=self._driver.name)
        return bytes(out)

    def precopy_info(self) -> PrecopyInfo:
        initial = max(0, self._initial_total - self._emitted)
        produced_beyond = self._emitted + self._pending - max(self._initial_total, self._emitted)
        dirty = self._driver.dirty.count if self._driver.dirty is not None else 0
        # An upper bound per dirty page (data and a whole record), so reading never grows it.
        per_page = self._page + rec.RECORD.size + rec.MEM_OFFSET.size
        return PrecopyInfo(
            initial_bytes=initial, dirty_bytes=max(0, produced_beyond) + dirty * per_page
        )

    def remaining(self) -> int:
        if self._tail_written:
            return self._pending
        dirty = self._driver.dirty.count if self._driver.dirty is not None else 0
        return (
            self._pending
            + rec.mem_records_bytes(self._mem - self._cursor, self._run)
            + rec.mem_records_bytes(dirty * self._page, self._run)
            + rec.TAIL_BYTES
        )


class GpuLoadStream(LoadStream):
    """Resuming session: an incremental parser that never buffers more than a record header,
    a DEVINFO/STATS/END payload or the 4 KiB context."""

    def __init__(self, driver: GpuDriver) -> None:
        self._driver = driver
        self._page = driver.page_size
        self._pages = -(-driver.mem_size // self._page)
        self._loaded = DirtyBitmap(self._pages)  # reused as a "page seen" map
        self._buf = bytearray()
        self._phase = "preamble"
        self._need = rec.PREAMBLE.size
        self._left = 0  # payload bytes left in MEM data or a skipped record
        self._mem_offset = 0
        self._mem_bytes = 0
        self._crc = 0
        self._crc_before_record = 0
        self._records = 0
        self._context: bytes | None = None
        self.received = 0
        self.skipped_records = 0
        self.source_stats: tuple[int, int] | None = None
        self.failed: DeviceError | None = None

    def _fail(self, err: int, msg: str) -> DeviceError:
        self.failed = DeviceError(
            err, f"resuming stream at byte {self.received}: {msg}", device=self._driver.name
        )
        return self.failed

    def write(self, data: memoryview) -> None:
        if self.failed is not None:
            raise DeviceError(
                errno.ENODEV, "the stream was rejected earlier", device=self._driver.name
            )
        pos, n = 0, len(data)
        while pos < n:
            if self._phase == "done":
                raise self._fail(errno.ENOMEM, "data after the END record")
            if self._phase in ("mem", "skip"):
                take = min(self._left, n - pos)
                chunk = data[pos : pos + take]
                if self._phase == "mem":
                    self._driver.view[self._mem_offset : self._mem_offset + take] = chunk
                    self._mem_offset += take
                self._consume(chunk)
                pos += take
                self._left -= take
                if not self._left:
                    self._expect_record()
                continue
            take = min(self._need - len(self._buf), n - pos)
            chunk = data[pos : pos + take]
            self._buf += chunk
            self._consume(chunk)
            pos += take
            if len(self._buf) == self._need:
                buf = bytes(self._buf)
                self._buf.clear()
                self._parse(buf)

    def _consume(self, chunk: memoryview) -> None:
        self._crc = zlib.crc32(chunk, self._crc)
        self.received += len(chunk)

    def _expect_record(self) -> None:
        self._phase = "record"
        self._need = rec.RECORD.size
        self._crc_before_record = self._crc

    def _parse(self, buf: bytes) -> None:
        phase = self._phase
        if phase == "preamble":
            magic, version, flags = rec.PREAMBLE.unpack(buf)
            if magic != rec.MAGIC:
                raise self._fail(errno.EINVAL, f"bad magic {magic!r} (expected {rec.MAGIC!r})")
            if version != rec.STREAM_VERSION:
                raise self._fail(
                    errno.EOPNOTSUPP,
                    f"gpu stream version {version} "
                    f"(this driver loads version {rec.STREAM_VERSION})",
                )
            if flags:
                raise self._fail(errno.EINVAL, f"preamble flags {flags:#x} (must be 0)")
            self._expect_record()
        elif phase == "record":
            self._parse_record_header(buf)
        elif phase == "devinfo":
            mem, page = rec.DEVINFO.unpack(buf)
            if (mem, page) != (self._driver.mem_size, self._page):
                raise self._fail(
                    errno.EOPNOTSUPP,
                    f"stream of a gpu with {mem} bytes in {page}-byte pages "
                    f"(this device: {self._driver.mem_size} bytes in {self._page}-byte pages)",
                )
            self._expect_record()
        elif phase == "memoffset":
            (offset,) = rec.MEM_OFFSET.unpack(buf)
            length = self._left
            if offset % self._page or offset + length > self._driver.mem_size:
                raise self._fail(errno.EINVAL, f"bad MEM record (offset {offset}, {length} bytes)")
            self._loaded.mark(offset // self._page, (offset + length - 1) // self._page)
            self._mem_offset = offset
            self._mem_bytes += length
            self._phase = "mem"
        elif phase == "context":
            (ident,) = _CTX_ID.unpack_from(buf)
            if ident != CONTEXT_ID:
                raise self._fail(errno.EINVAL, f"context ID {ident:#x} (expected {CONTEXT_ID:#x})")
            self._context = buf
            self._expect_record()
        elif phase == "stats":
            self.source_stats = rec.STATS.unpack(buf)
            self._expect_record()
        elif phase == "end":
            mem_bytes, crc = rec.END.unpack(buf)
            if crc != self._crc_before_record:
                raise self._fail(
                    errno.EINVAL,
                    f"CRC mismatch: stream {self._crc_before_record:#010x}, "
                    f"END record says {crc:#010x} (corrupted stream)",
                )
            if mem_bytes != self._mem_bytes:
                raise self._fail(
                    errno.EINVAL,
                    f"END counts {mem_bytes} memory bytes, stream carried {self._mem_bytes}",
                )
            self._phase = "done"
        else:
            raise AssertionError(phase)

    def _parse_record_header(self, buf: bytes) -> None:
        tag, flags, length = rec.RECORD.unpack(buf)
        name = rec.TAG_NAMES.get(tag, f"tag {tag}")
        if flags & ~rec.FLAG_MANDATORY:
            raise self._fail(errno.EINVAL, f"{name} record with reserved flags {flags:#x}")
        first = self._records == 0
        self._records += 1
        if first and tag != rec.TAG_DEVINFO:
            raise self._fail(errno.EINVAL, f"first record is {name}, expected DEVINFO")
        fixed = {
            rec.TAG_DEVINFO: rec.DEVINFO.size,
            rec.TAG_CONTEXT: rec.CONTEXT_BYTES,
            rec.TAG_STATS: rec.STATS.size,
            rec.TAG_END: rec.END.size,
        }
        phases = {
            rec.TAG_DEVINFO: "devinfo",
            rec.TAG_CONTEXT: "context",
            rec.TAG_STATS: "stats",
            rec.TAG_END: "end",
        }
        if tag in fixed:
            if length != fixed[tag]:
                raise self._fail(
                    errno.EINVAL, f"{name} record of {length} bytes (expected {fixed[tag]})"
                )
            if tag == rec.TAG_DEVINFO and not first:
                raise self._fail(errno.EINVAL, "a second DEVINFO record")
            self._phase = phases[tag]
            self._need = length
        elif tag == rec.TAG_MEM:
            data = length - rec.MEM_OFFSET.size
            if not 1 <= data <= rec.MAX_MEM_RECORD_BYTES:
                raise self._fail(errno.EINVAL, f"MEM record of {length} bytes")
            self._phase = "memoffset"
            self._need = rec.MEM_OFFSET.size
            self._left = data
        elif flags & rec.FLAG_MANDATORY:
            raise self._fail(
                errno.EOPNOTSUPP,
                f"unknown mandatory record tag {tag} (this driver loads version "
                f"{rec.STREAM_VERSION} records)",
            )
        elif length > rec.MAX_SKIP_BYTES:
            raise self._fail(
                errno.EINVAL,
                f"optional record tag {tag} of {length} bytes "
                f"(at most {rec.MAX_SKIP_BYTES} are skipped)",
            )
        else:
            self.skipped_records += 1
            if length:
                self._phase = "skip"
                self._left = length
            else:
                self._expect_record()

    def finish(self) -> bytes:
        """The RESUMING -> STOP check; returns the context to install."""
        if self.failed is not None:
            raise DeviceError(
                errno.EINVAL,
                f"cannot load: the stream was rejected ({self.failed.detail})",
                device=self._driver.name,
            )
        if self._phase != "done":
            # Not fatal: the rest may still be written before the next attempt.
            raise DeviceError(
                errno.EINVAL,
                f"incomplete stream at byte {self.received} (in {self._phase}, no END record yet)",
                device=self._driver.name,
            )
        if self._loaded.count != self._pages:
            raise self._fail(
                errno.EINVAL,
                f"{self._pages - self._loaded.count} of {self._pages} pages never sent",
            )
        if self._context is None:
            raise self._fail(errno.EINVAL, "no CONTEXT record")
        return self._context


class GpuDriver(ArcDriver):
    """An accelerator: big memory, dirty tracking, bandwidth limits, tagged-record stream."""

    description = "accelerator with large memory and an mlx5-style record stream (ArcDriver)"
    options: ClassVar[Mapping[str, OptionSpec]] = {
        "mem": OptionSpec(kind="size", default="512M", help="device memory in bytes (K, M, G)"),
        "page_size": OptionSpec(kind="size", default="4K", help="dirty-tracking page size"),
        "dirty_rate": OptionSpec(
            kind="size", default="0", help="memory bytes/s the workload rewrites while running"
        ),
        "read_bandwidth": OptionSpec(
            kind="size", default=None, help="device save speed on the data stream, bytes/s"
        ),
        "write_bandwidth": OptionSpec(
            kind="size", default=None, help="device restore speed on the data stream, bytes/s"
        ),
        "seed": OptionSpec(
            kind="int", default=None, help="deterministic initial memory content (zeros if absent)"
        ),
    }

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        super().__init__(name, options)
        mem = self.size_option("mem") or 0
        if not 1 <= mem <= _MAX_MEM_BYTES:
            raise ConfigError(f"device {name}: mem must be between 1 byte and 1T, got {mem}")
        page = self.size_option("page_size") or 0
        if page < 512 or page & (page - 1) or page > rec.MAX_MEM_RECORD_BYTES:
            raise ConfigError(f"device {name}: page_size must be a power of two in 512..1M")
        self.mem_size = mem
        self.page_size = page
        self.read_bandwidth = self.size_option("read_bandwidth") or None
        self.write_bandwidth = self.size_option("write_bandwidth") or None
        self.dirty_rate = self.size_option("dirty_rate") or 0
        seed = self.int_option("seed")
        self._mmap = mmap.mmap(-1, mem)
        self.view = memoryview(self._mmap)
        self.context = bytearray(rec.CONTEXT_BYTES)
        _CTX_ID.pack_into(self.context, 0, CONTEXT_ID)
        self.dirty: DirtyBitmap | None = None
        self.pages_dirtied = 0
        self.last_load: GpuLoadStream | None = None
        self._rng = random.Random(seed if seed is not None else 0)
        self._carry = 0.0
        if seed is not None:
            self._fill(seed)

    def _fill(self, seed: int) -> None:
        block = random.Random(seed).randbytes(_FILL_BLOCK)
        doubled = block + block
        for i, off in enumerate(range(0, self.mem_size, _FILL_BLOCK)):
            n = min(_FILL_BLOCK, self.mem_size - off)
            rot = (i * 4099) % _FILL_BLOCK
            self.view[off : off + n] = doubled[rot : rot + n]

    @property
    def migration_flags(self) -> MigFlags:
        return MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY

    # -- PCI surface and regions ------------------------------------------
    # BAR0: 4 KiB engine registers (32-bit); BAR2: the memory, 64-bit
    # prefetchable, the power of two covering ``mem`` (as a GPU's VRAM BAR).
    interrupt_pin = 1
    msi_vectors = 1

    def regions(self) -> Mapping[str, int]:
        return {REGS: rec.CONTEXT_BYTES, VRAM: self.mem_size}

    def bars(self) -> Mapping[int, Bar]:
        vram = max(4096, 1 << (self.mem_size - 1).bit_length())
        return {
            0: Bar(size=rec.CONTEXT_BYTES),
            2: Bar(size=vram, kind=BarKind.MEM64, prefetchable=True),
        }

    def region_read(self, region: str, offset: int, size: int) -> bytes:
        if region == REGS:
            return bytes(self.context[offset : offset + size])
        return bytes(self.view[offset : offset + size])

    def region_write(self, region: str, offset: int, data: memoryview) -> None:
        if region == REGS:
            self.context[offset : offset + len(data)] = data
            _CTX_ID.pack_into(self.context, 0, CONTEXT_ID)  # read-only ID register
            return
        self.view[offset : offset + len(data)] = data
        self._mark(offset, len(data))

    def _mark(self, offset: int, length: int) -> None:
        if self.dirty is not None and length > 0:
            self.dirty.mark(offset // self.page_size, (offset + length - 1) // self.page_size)

    # -- migration ------------------------------------------------------
    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        arc = (current, nxt)
        if arc in {(State.RUNNING, State.PRE_COPY), (State.RUNNING_P2P, State.PRE_COPY_P2P)}:
            self.dirty = DirtyBitmap(-(-self.mem_size // self.page_size))
            return GpuSaveStream(self, precopy=True)
        if arc == (State.STOP, State.STOP_COPY):
            return GpuSaveStream(self, precopy=False)
        if arc == (State.STOP, State.RESUMING):
            self.last_load = GpuLoadStream(self)
            return self.last_load
        if arc == (State.RESUMING, State.STOP):
            if not isinstance(stream, GpuLoadStream):
                raise DeviceError(errno.EINVAL, "no resuming stream to load", device=self.name)
            self.context[:] = stream.finish()
        return None

    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        if isinstance(stream, GpuSaveStream):
            return stream.remaining()
        run = max(self.page_size, rec.MAX_MEM_RECORD_BYTES // self.page_size * self.page_size)
        return (
            rec.PREAMBLE.size
            + rec.RECORD.size
            + rec.DEVINFO.size
            + rec.mem_records_bytes(self.mem_size, run)
            + rec.TAIL_BYTES
        )

    def session_ended(self) -> None:
        self.dirty = None

    def digest(self) -> str:
        h = hashlib.sha256(self.view)
        h.update(self.context)
        return h.hexdigest()

    # -- workload -------------------------------------------------------
    def has_workload(self) -> bool:
        return self.dirty_rate > 0

    def advance(self, seconds: float) -> None:
        self._carry += self.dirty_rate * seconds / self.page_size
        pages = int(self._carry)
        self._carry -= pages
        npages = -(-self.mem_size // self.page_size)
        rng = self._rng
        for _ in range(min(pages, npages)):
            page = rng.randrange(npages)
            start = page * self.page_size
            span = min(self.page_size, self.mem_size - start)
            off = start + rng.randrange(max(1, span - 7))
            chunk = rng.randbytes(min(8, self.mem_size - off))
            self.view[off : off + len(chunk)] = chunk
            self._mark(off, len(chunk))
        self.pages_dirtied += pages
        (cycles,) = _CTX_CYCLES.unpack_from(self.context, CTX_CYCLES_OFFSET)
        _CTX_CYCLES.pack_into(
            self.context, CTX_CYCLES_OFFSET, (cycles + int(seconds * 1e9)) & (2**64 - 1)
        )

    def info(self) -> Mapping[str, object]:
        out: dict[str, object] = {"mem": self.mem_size, "pages_dirtied": self.pages_dirtied}
        if self.last_load is not None:
            out["skipped_records"] = self.last_load.skipped_records
        return out

    def close(self) -> None:
        self.view.release()
        self._mmap.close()
