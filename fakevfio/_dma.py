"""One device's DMA: the IOVA mappings of its VMM, DMA reads and writes, dirty trackers.

Theory of operation
-------------------
A real device reaches the VMM's memory through the IOMMU: the VMM maps its
memory (iommufd ``IOMMU_IOAS_MAP``, type1 ``VFIO_IOMMU_MAP_DMA``) at IOVAs,
and the device reads and writes IOVAs. Here the supervisor (or a test) tells
the device each mapping through the ``devices/NAME/dma`` file, and
:meth:`Dma.read` / :meth:`Dma.write` translate an IOVA range, across
mappings, into ``host.read_memory`` / ``host.write_memory`` of the mapping
process: a write really lands in QEMU's guest RAM.

Three dirty trackers see every DMA write: the device's own DMA logging
(``VFIO_DEVICE_FEATURE_DMA_LOGGING_*``, the ``log`` commands) and the IOMMU-side
trackers of this device, ``iommu`` (iommufd HWPT dirty tracking) and ``type1``
(``VFIO_IOMMU_DIRTY_PAGES``); the supervisor ORs the reports of the devices
that share one HWPT or container.

Rule 1: a mapping is 4 KiB aligned in IOVA and length, non-empty, and overlaps
        no other (EEXIST); a command that fails changes nothing.
Rule 2: a DMA access is checked whole before any byte moves: an unmapped
        IOVA, a write to a read-only mapping or a read of a write-only one is
        a DMA fault (EFAULT, counted, nothing written). The host's failure to
        reach the process memory is a fault too.
Rule 3: every page a DMA write touched is marked in each tracker that is on at
        that moment; DMA logging marks only pages inside its started ranges,
        in units of its page size; the IOMMU trackers in 4 KiB pages.
Rule 4: a report is a bitmap of one bit per report page of [iova, iova+length),
        little-endian u64 words (bit i is bit i%64 of word i/64), as the kernel's
        iova_bitmap writes it; a tracked page sets every report bit it overlaps.
        A clearing report (DMA logging reports always clear, like the kernel's
        ``log_read_and_clear``) forgets what it covered.
Rule 5: the fault rule ``dirty lose PERCENT`` drops that share of the pages
        from every report, chosen by a fixed hash of the page number (so the
        same pages are lost each time); a clearing report forgets them too.
Rule 6: DMA logging follows ``vfio_ioctl_device_feature_logging_*`` in
        ``drivers/vfio/vfio_main.c`` and the variant drivers: START needs 1..256
        ranges (``LOG_MAX_RANGES`` on 4 KiB pages; E2BIG beyond), each range
        aligned to the page size (EINVAL), without overflow (EOVERFLOW), not
        overlapping another (EINVAL; unsorted is fine); a second START is EINVAL
        (mlx5, pds); the page size becomes a power of two clamped to
        4 KiB..1 GiB (mlx5's ilog2 and clamp) and is given back. STOP always
        succeeds. REPORT needs a page size >= 4 KiB and a power of two (EINVAL),
        no overflow (EOVERFLOW), logging started (EINVAL) and a non-empty range
        inside the span of the started ranges (EINVAL, pds).

Known shortcomings: the IOMMU-side rules of iommufd and type1 (alignment to
the IOAS, type1's pgsize) are the supervisor's; this module only checks what
it needs to build a bitmap. Reset stops DMA logging; mappings and the
IOMMU-side trackers belong to the IOMMU and stay.
"""

from __future__ import annotations

import bisect
import errno
from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

from fakevfio.errors import DeviceError

if TYPE_CHECKING:
    from fakevfio._device import Device
    from fakevfio._host import HostServices

#: The IOMMU page: mapping alignment and the IOMMU-side trackers' granularity.
PAGE_BYTES = 4096
#: ``LOG_MAX_RANGES`` of vfio_main.c: the ranges of one START fit in one 4 KiB page.
LOG_MAX_RANGES = PAGE_BYTES // 16
LOG_MIN_PAGE_BYTES = 4096
LOG_MAX_PAGE_BYTES = 1 << 30
#: Bounds of outside input: mappings per device, bytes of one report's bitmap.
MAX_MAPPINGS = 65536
MAX_REPORT_BITMAP_BYTES = 256 << 20  # as the supervisor's GET_DIRTY_BITMAP limit
#: ULONG_MAX on a 64-bit kernel: no IOVA range may end past it.
IOVA_LIMIT = 1 << 64
_TRACKERS = ("iommu", "type1")
_GOLDEN = 0x9E3779B97F4A7C15


@attrs.frozen(kw_only=True)
class Mapping:
    """One IOVA range of the device and the process memory behind it."""

    iova: int
    length: int
    pid: int
    vaddr: int
    readable: bool
    writable: bool

    @property
    def end(self) -> int:
        return self.iova + self.length

    def perm(self) -> str:
        return ("r" if self.readable else "") + ("w" if self.writable else "")


@attrs.define
class Tracker:
    """An IOMMU-side tracker (``iommu`` or ``type1``): dirty 4 KiB page numbers while on."""

    on: bool = False
    dirty: set[int] = attrs.Factory(set)


@attrs.define
class DmaLog:
    """The device's DMA logging once started: page size, ranges, dirty log-page numbers."""

    page_size: int
    ranges: tuple[tuple[int, int], ...]  # sorted (start, end), end exclusive
    starts: tuple[int, ...]
    dirty: set[int] = attrs.Factory(set)


@attrs.define
class Counters:
    bytes_written: int = 0
    pages_written: int = 0
    bytes_read: int = 0
    faults: int = 0
    pages_lost: int = 0
    last_fault: str | None = None


class Dma:
    """The DMA state of one device (called with the device lock held)."""

    def __init__(self, device: Device) -> None:
        self._device = device
        self._maps: list[Mapping] = []  # sorted by iova, never overlapping
        self._starts: list[int] = []
        self.trackers = {name: Tracker() for name in _TRACKERS}
        self.log: DmaLog | None = None
        self.counters = Counters()

    def _err(self, err: int, message: str) -> DeviceError:
        return DeviceError(err, message, device=self._device.name)

    # -- what the driver does -------------------------------------------------------------
    def mappings(self) -> tuple[Mapping, ...]:
        return tuple(self._maps)

    def read(self, iova: int, length: int) -> bytes:
        """DMA read of ``length`` bytes at ``iova`` (Rule 2)."""
        pieces = self._resolve(iova, length, "read")
        host = self._host("read")
        out = bytearray()
        for mapping, offset, size in pieces:
            try:
                out += host.read_memory(mapping.pid, mapping.vaddr + offset, size)
            except OSError as exc:
                raise self._fault(
                    f"DMA read of {size} bytes at IOVA 0x{mapping.iova + offset:x}: process "
                    f"{mapping.pid} memory at 0x{mapping.vaddr + offset:x} is not readable "
                    f"({exc.strerror or exc}); did the VMM unmap it without telling the device?"
                ) from None
        self.counters.bytes_read += length
        return bytes(out)

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """DMA write of ``data`` at ``iova`` (Rules 2 and 3)."""
        view = memoryview(data).cast("B")
        length = len(view)
        pieces = self._resolve(iova, length, "write")
        host = self._host("write")
        done = 0
        for mapping, offset, size in pieces:
            try:
                host.write_memory(
                    mapping.pid, mapping.vaddr + offset, view[done : done + size].tobytes()
                )
            except OSError as exc:
                if done:
                    self._mark(iova, done)
                raise self._fault(
                    f"DMA write of {size} bytes at IOVA 0x{mapping.iova + offset:x}: process "
                    f"{mapping.pid} memory at 0x{mapping.vaddr + offset:x} is not writable "
                    f"({exc.strerror or exc}); did the VMM unmap it without telling the device?"
                ) from None
            done += size
        self._mark(iova, length)

    def _host(self, op: str) -> HostServices:
        host = self._device.host
        if host is None:
            raise self._err(
                errno.ENODEV,
                f"DMA {op}: this device has no host services (create it through a Registry "
                "with host=OsServices())",
            )
        return host

    def _fault(self, message: str) -> DeviceError:
        self.counters.faults += 1
        self.counters.last_fault = message
        return self._err(errno.EFAULT, message)

    def _resolve(self, iova: int, length: int, op: str) -> list[tuple[Mapping, int, int]]:
        """The (mapping, offset in it, size) pieces of [iova, iova+length), or a DMA fault."""
        if length < 0 or iova < 0:
            raise ValueError(f"DMA {op}: negative IOVA or length ({iova}, {length})")
        if iova + length > IOVA_LIMIT:
            raise self._fault(f"DMA {op} of {length} bytes at IOVA 0x{iova:x} passes 2^64")
        pieces: list[tuple[Mapping, int, int]] = []
        at, end = iova, iova + length
        while at < end:
            mapping = self._find(at)
            if mapping is None:
                raise self._fault(
                    f"DMA {op} of {length} bytes at IOVA 0x{iova:x}: IOVA 0x{at:x} is not mapped "
                    f"({len(self._maps)} mappings; the VMM must map it first)"
                )
            if op == "write" and not mapping.writable:
                raise self._fault(
                    f"DMA write at IOVA 0x{at:x}: the mapping 0x{mapping.iova:x}+0x"
                    f"{mapping.length:x} is read-only (mapped '{mapping.perm()}')"
                )
            if op == "read" and not mapping.readable:
                raise self._fault(
                    f"DMA read at IOVA 0x{at:x}: the mapping 0x{mapping.iova:x}+0x"
                    f"{mapping.length:x} is write-only (mapped '{mapping.perm()}')"
                )
            size = min(end, mapping.end) - at
            pieces.append((mapping, at - mapping.iova, size))
            at += size
        return pieces

    def _find(self, iova: int) -> Mapping | None:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0 and iova < self._maps[i].end:
            return self._maps[i]
        return None

    def _mark(self, iova: int, length: int) -> None:
        """Rule 3: the written pages go into every tracker that is on."""
        if length <= 0:
            return
        end = iova + length
        first, last = iova // PAGE_BYTES, (end - 1) // PAGE_BYTES
        self.counters.bytes_written += length
        self.counters.pages_written += last - first + 1
        for tracker in self.trackers.values():
            if tracker.on:
                tracker.dirty.update(range(first, last + 1))
        log = self.log
        if log is None:
            return
        ps = log.page_size
        i = bisect.bisect_left(log.starts, end) - 1
        while i >= 0 and log.ranges[i][1] > iova:
            start, stop = log.ranges[i]
            lo, hi = max(start, iova), min(stop, end)
            log.dirty.update(range(lo // ps, (hi - 1) // ps + 1))
            i -= 1

    # -- the dma file -----------------------------------------------------------------------
    def control(self, text: str) -> bytes | None:
        """One write to ``devices/NAME/dma``; a reply (read back on the same handle) or None.

        Raises:
            DeviceError: the errno of the command (nothing changed).
        """
        words = text.split()
        if not words:
            raise self._err(errno.EINVAL, f"dma: empty command (expected {_USAGE})")
        try:
            return _run(self, words)
        except _BadCommand as exc:
            raise self._err(exc.errno, f"dma: {' '.join(words)[:120]!r}: {exc}") from None

    def map(self, mapping: Mapping) -> None:
        """Rule 1."""
        if mapping.iova % PAGE_BYTES or mapping.length % PAGE_BYTES or mapping.length <= 0:
            raise _BadCommand(
                errno.EINVAL,
                f"IOVA 0x{mapping.iova:x} and length 0x{mapping.length:x} must be multiples of "
                f"{PAGE_BYTES} and the length > 0",
            )
        if mapping.end > IOVA_LIMIT or mapping.vaddr + mapping.length > IOVA_LIMIT:
            raise _BadCommand(errno.EOVERFLOW, "the IOVA or address range passes 2^64")
        if not (mapping.readable or mapping.writable):
            raise _BadCommand(errno.EINVAL, "PERM must be r, w or rw")
        i = bisect.bisect_left(self._starts, mapping.iova)
        for j in (i - 1, i):
            if 0 <= j < len(self._maps):
                other = self._maps[j]
                if other.iova < mapping.end and mapping.iova < other.end:
                    raise _BadCommand(
                        errno.EEXIST,
                        f"overlaps the mapping 0x{other.iova:x}+0x{other.length:x} "
                        "(unmap it first)",
                    )
        if len(self._maps) >= MAX_MAPPINGS:
            raise _BadCommand(errno.ENOSPC, f"already {MAX_MAPPINGS} mappings")
        self._maps.insert(i, mapping)
        self._starts.insert(i, mapping.iova)

    def unmap(self, iova: int, length: int) -> int:
        """Drop what is mapped inside [iova, iova+length) (a straddling mapping is trimmed)."""
        if iova % PAGE_BYTES or length % PAGE_BYTES or length <= 0:
            raise _BadCommand(
                errno.EINVAL,
                f"IOVA 0x{iova:x} and length 0x{length:x} must be multiples of {PAGE_BYTES} "
                "and the length > 0",
            )
        if iova + length > IOVA_LIMIT:
            raise _BadCommand(errno.EOVERFLOW, "the IOVA range passes 2^64")
        end = iova + length
        kept: list[Mapping] = []
        dropped = 0
        for m in self._maps:
            if m.end <= iova or m.iova >= end:
                kept.append(m)
                continue
            dropped += 1
            if m.iova < iova:
                kept.append(attrs.evolve(m, length=iova - m.iova))
            if m.end > end:
                cut = end - m.iova
                kept.append(attrs.evolve(m, iova=end, length=m.end - end, vaddr=m.vaddr + cut))
        self._set_maps(kept)
        return dropped

    def _set_maps(self, maps: list[Mapping]) -> None:
        self._maps = sorted(maps, key=lambda m: m.iova)
        self._starts = [m.iova for m in self._maps]

    # -- reports ----------------------------------------------------------------------------
    def report(self, tracker: str, iova: int, length: int, pgsize: int, *, clear: bool) -> bytes:
        """Rule 4: the bitmap of an IOMMU-side tracker's dirty pages in [iova, iova+length)."""
        state = self.trackers[tracker]
        _check_report_range(iova, length, pgsize, minimum=1)
        if not state.on:
            raise _BadCommand(errno.EINVAL, f"the {tracker} tracker is off ('dirty {tracker} on')")
        return _bitmap(self, state.dirty, PAGE_BYTES, iova, length, pgsize, clear=clear)

    def log_start(self, page_size: int, ranges: list[tuple[int, int]]) -> int:
        """Rule 6, START; returns the page size the device tracks in."""
        if not ranges:
            raise _BadCommand(errno.EINVAL, "no ranges (num_ranges 0)")
        if len(ranges) > LOG_MAX_RANGES:
            raise _BadCommand(errno.E2BIG, f"{len(ranges)} ranges (at most {LOG_MAX_RANGES})")
        if page_size <= 0:
            raise _BadCommand(errno.EINVAL, "page size 0")
        accepted = _check_ranges(page_size, ranges)
        if self.log is not None:
            raise _BadCommand(errno.EINVAL, "DMA logging is already started (stop it first)")
        shift = page_size.bit_length() - 1  # ilog2
        effective = min(max(1 << shift, LOG_MIN_PAGE_BYTES), LOG_MAX_PAGE_BYTES)
        ordered = tuple(sorted(accepted))
        self.log = DmaLog(page_size=effective, ranges=ordered, starts=tuple(s for s, _ in ordered))
        return effective

    def log_report(self, iova: int, length: int, pgsize: int) -> bytes:
        """Rule 6, REPORT: the bitmap of the logged pages of the range, which it clears."""
        _check_report_range(iova, length, pgsize, minimum=LOG_MIN_PAGE_BYTES, aligned=False)
        log = self.log
        if log is None:
            raise _BadCommand(errno.EINVAL, "DMA logging is not started")
        low, high = log.ranges[0][0], max(stop for _, stop in log.ranges)
        if length == 0 or iova < low or iova + length > high:
            raise _BadCommand(
                errno.EINVAL,
                f"report range 0x{iova:x}+0x{length:x} is outside the logged span "
                f"0x{low:x}..0x{high:x}",
            )
        return _bitmap(self, log.dirty, log.page_size, iova, length, pgsize, clear=True)

    # -- views ----------------------------------------------------------------------------
    def text(self) -> str:
        """What reading ``devices/NAME/dma`` shows."""
        return _text(self)

    def info(self) -> dict[str, object]:
        """The ``dma`` object of the ``info`` file."""
        return _info(self)

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: DMA logging stops (mappings belong to the IOMMU and stay)."""
        self.log = None

    def close(self) -> None:
        """The device is removed."""
        self.log = None
        self._set_maps([])


class _BadCommand(Exception):  # carries an errno to Dma.control, never leaves this module
    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.errno = err


_USAGE = (
    "'map IOVA LENGTH PID VADDR r|w|rw', 'unmap IOVA LENGTH', 'unmap all', "
    "'dirty iommu|type1 on|off', 'report iommu|type1 IOVA LENGTH PGSIZE [noclear]', "
    "'log start PGSIZE IOVA:LENGTH[,...]', 'log stop', 'log report IOVA LENGTH PGSIZE'"
)


def _num(word: str, what: str) -> int:
    """A decimal or 0x-hex number below 2^64."""
    digits, base = (word[2:], 16) if word[:2].lower() == "0x" else (word, 10)
    allowed = "0123456789abcdefABCDEF" if base == 16 else "0123456789"
    if not digits or len(digits) > 20 or any(ch not in allowed for ch in digits):
        raise _BadCommand(errno.EINVAL, f"{what} {word[:24]!r} is not a decimal or 0x-hex number")
    value = int(digits, base)
    if value >= IOVA_LIMIT:
        raise _BadCommand(errno.EOVERFLOW, f"{what} {word[:24]!r} does not fit in 64 bits")
    return value


def _check_report_range(
    iova: int, length: int, pgsize: int, *, minimum: int, aligned: bool = True
) -> None:
    if pgsize < minimum or pgsize & (pgsize - 1):
        raise _BadCommand(
            errno.EINVAL, f"page size {pgsize} is not a power of two of at least {minimum}"
        )
    if iova + length >= IOVA_LIMIT:
        raise _BadCommand(errno.EOVERFLOW, f"range 0x{iova:x}+0x{length:x} passes 2^64")
    if aligned and (iova % pgsize or length % pgsize or length == 0):
        raise _BadCommand(
            errno.EINVAL,
            f"range 0x{iova:x}+0x{length:x} must be non-empty and aligned to the page "
            f"size {pgsize}",
        )


def _pages_in(dirty: set[int], first: int, last: int) -> list[int]:
    if last - first + 1 <= len(dirty):
        return [p for p in range(first, last + 1) if p in dirty]
    return [p for p in dirty if first <= p <= last]


def _lost(page: int, percent: int) -> bool:
    """Rule 5: whether ``dirty lose PERCENT`` drops ``page`` (a fixed hash, not a random draw)."""
    return ((page * _GOLDEN) & (IOVA_LIMIT - 1)) >> 32 < percent * (1 << 32) // 100


def _triple(words: list[str]) -> tuple[int, int, int]:
    return _num(words[0], "IOVA"), _num(words[1], "LENGTH"), _num(words[2], "PGSIZE")


def _perm(word: str) -> tuple[bool, bool]:
    if word not in ("r", "w", "rw"):
        raise _BadCommand(errno.EINVAL, f"PERM {word[:8]!r} must be r, w or rw")
    return "r" in word, "w" in word


def _ranges(word: str) -> Iterator[tuple[int, int]]:
    parts = word.split(",")
    if len(parts) > LOG_MAX_RANGES:
        raise _BadCommand(errno.E2BIG, f"{len(parts)} ranges (at most {LOG_MAX_RANGES})")
    for part in parts:
        iova, sep, length = part.partition(":")
        if not sep:
            raise _BadCommand(errno.EINVAL, f"range {part[:40]!r} is not IOVA:LENGTH")
        yield _num(iova, "range IOVA"), _num(length, "range length")


def _run(dma: Dma, words: list[str]) -> bytes | None:
    cmd, args = words[0], words[1:]
    if cmd == "map" and len(args) == 5:
        readable, writable = _perm(args[4])
        pid = _num(args[2], "PID")
        if not 0 < pid < 1 << 22:
            raise _BadCommand(errno.EINVAL, f"PID {pid} is not a process id")
        dma.map(
            Mapping(
                iova=_num(args[0], "IOVA"),
                length=_num(args[1], "LENGTH"),
                pid=pid,
                vaddr=_num(args[3], "VADDR"),
                readable=readable,
                writable=writable,
            )
        )
        return None
    if cmd == "unmap" and args == ["all"]:
        dma._set_maps([])
        return None
    if cmd == "unmap" and len(args) == 2:
        dma.unmap(_num(args[0], "IOVA"), _num(args[1], "LENGTH"))
        return None
    if cmd == "dirty" and len(args) == 2 and args[0] in _TRACKERS and args[1] in ("on", "off"):
        tracker = dma.trackers[args[0]]
        on = args[1] == "on"
        if on != tracker.on:
            tracker.dirty.clear()  # enabling starts from clean (iommufd clears on enable)
        tracker.on = on
        return None
    if cmd == "report" and len(args) in (4, 5) and args[0] in _TRACKERS:
        if len(args) == 5 and args[4] != "noclear":
            raise _BadCommand(errno.EINVAL, f"expected 'noclear', not {args[4][:16]!r}")
        iova, length, pgsize = _triple(args[1:4])
        return dma.report(args[0], iova, length, pgsize, clear=len(args) == 4)
    if cmd == "log" and args[:1] == ["start"] and len(args) == 3:
        page_size = _num(args[1], "PGSIZE")
        effective = dma.log_start(page_size, list(_ranges(args[2])))
        return f"page_size {effective}\n".encode()
    if cmd == "log" and args == ["stop"]:
        dma.log = None
        return None
    if cmd == "log" and args[:1] == ["report"] and len(args) == 4:
        iova, length, pgsize = _triple(args[1:4])
        return dma.log_report(iova, length, pgsize)
    raise _BadCommand(errno.EINVAL, f"expected one of {_USAGE}")


def _bitmap(
    dma: Dma, dirty: set[int], unit: int, iova: int, length: int, pgsize: int, *, clear: bool
) -> bytes:
    npages = -(-length // pgsize)
    nbytes = -(-npages // 64) * 8
    if nbytes > MAX_REPORT_BITMAP_BYTES:
        raise _BadCommand(
            errno.E2BIG,
            f"a bitmap of {nbytes} bytes (at most {MAX_REPORT_BITMAP_BYTES}; report a "
            "smaller range)",
        )
    bitmap = bytearray(nbytes)
    end = iova + length
    first, last = iova // unit, (end - 1) // unit
    hits = _pages_in(dirty, first, last)
    lose = dma._device.faults.dirty_lose_percent()
    for page in hits:
        if lose and _lost(page, lose):
            dma.counters.pages_lost += 1
            continue
        lo = max(page * unit, iova) - iova
        hi = min((page + 1) * unit, end) - 1 - iova
        for bit in range(lo // pgsize, hi // pgsize + 1):
            bitmap[bit >> 3] |= 1 << (bit & 7)
    if clear:
        dirty.difference_update(hits)
    return bytes(bitmap)


def _text(dma: Dma) -> str:
    """What reading ``devices/NAME/dma`` shows."""
    lines = [f"map 0x{m.iova:x} 0x{m.length:x} {m.pid} 0x{m.vaddr:x} {m.perm()}" for m in dma._maps]
    for name, tracker in dma.trackers.items():
        lines.append(f"dirty {name} {'on' if tracker.on else 'off'} pages {len(tracker.dirty)}")
    log = dma.log
    if log is None:
        lines.append("log off")
    else:
        spans = ",".join(f"0x{s:x}:0x{e - s:x}" for s, e in log.ranges)
        lines.append(f"log on {log.page_size} {spans} pages {len(log.dirty)}")
    c = dma.counters
    lines.append(
        f"bytes_written {c.bytes_written} pages_written {c.pages_written} "
        f"bytes_read {c.bytes_read} faults {c.faults} pages_lost {c.pages_lost}"
    )
    if c.last_fault:
        lines.append(f"last_fault {c.last_fault}")
    return "".join(line + "\n" for line in lines)


def _info(dma: Dma) -> dict[str, object]:
    """The ``dma`` object of the ``info`` file."""
    c = dma.counters
    log = dma.log
    return {
        "bytes_written": c.bytes_written,
        "pages_written": c.pages_written,
        "bytes_read": c.bytes_read,
        "faults": c.faults,
        "last_fault": c.last_fault,
        "pages_lost": c.pages_lost,
        "mappings": len(dma._maps),
        "mapped_bytes": sum(m.length for m in dma._maps),
        "trackers": {
            name: {"on": t.on, "dirty_pages": len(t.dirty)} for name, t in dma.trackers.items()
        },
        "log": None
        if log is None
        else {
            "page_size": log.page_size,
            "ranges": len(log.ranges),
            "dirty_pages": len(log.dirty),
        },
    }


def _check_ranges(page_size: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """START's per-range checks in the kernel's order: alignment, overflow, overlap."""
    mask = page_size - 1
    accepted: list[tuple[int, int]] = []
    for iova, length in ranges:
        if iova & mask or length & mask:
            raise _BadCommand(
                errno.EINVAL,
                f"range 0x{iova:x}+0x{length:x} is not aligned to the page size {page_size}",
            )
        if iova + length >= IOVA_LIMIT:  # check_add_overflow on u64
            raise _BadCommand(errno.EOVERFLOW, f"range 0x{iova:x}+0x{length:x} passes 2^64")
        if length == 0:
            raise _BadCommand(errno.EINVAL, f"range 0x{iova:x} is empty")
        for start, stop in accepted:
            if start < iova + length and iova < stop:
                raise _BadCommand(
                    errno.EINVAL,
                    f"range 0x{iova:x}+0x{length:x} overlaps 0x{start:x}+0x{stop - start:x}",
                )
        accepted.append((iova, iova + length))
    return accepted
