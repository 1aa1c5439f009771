"""The built-in ``ram`` reference driver: a device whose state is a block of memory.

Its state is ``size`` bytes (anonymous memory, so unused sizes cost nothing
until written), exposed as region ``bar0``. With ``dirty_rate`` set, a workload
rewrites randomly chosen pages while the device runs, at that many bytes per
second, so pre-copy really has dirty pages to re-send. With ``dma_rate`` set,
the same workload DMA-writes that many bytes per second, in whole 4 KiB pages
of a deterministic pattern (from ``seed``), to pages chosen among the writable
IOVA mappings of the device (guest RAM under QEMU), or only those inside
``dma_window=IOVA:LENGTH`` (so a guest's own code and data can be left alone),
and with ``dma_bus_master=required`` only while the PCI command register has
Bus Master Enable set, as hardware (a firmware expects power-on RAM untouched
until a driver enables the device);
with nothing mapped it does nothing and builds up no backlog. With
``reinit_after=BYTES`` (a PRE_COPY device) a pre-copy session re-initialises once
after that many bytes were read, as a device reconfigured during migration
does: the first PRECOPY_INFOv2 query past that point raises initial_bytes to
the whole state again and answers ``VFIO_PRECOPY_INFO_REINIT``; a caller that
did not opt in (``VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2``) never sees it
(:mod:`fakevfio._stream` Rule 5). The stream, sessions
and validation come from the core (:mod:`fakevfio._stream`); the driver header
names the driver, its stream version and its size, so a stream from another
version or another size is refused on resume.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import random
import struct
from collections.abc import Mapping
from typing import ClassVar

import attrs

from fakevfio import _dma, _stream
from fakevfio._device import Device
from fakevfio.driver import OptionSpec, StateDriver
from fakevfio.errors import ConfigError, DeviceError
from vfio_uapi.fsm import MigFlags, parse_flags
from vfio_uapi.units import parse_size

_HEADER = struct.Struct("<8sIIQ")
_MAGIC = b"FVRAMDEV"
_MAX_SIZE = 1 << 40
_FILL_BLOCK = _stream.CHECKSUM_CHUNK  # the fill checksums each chunk as it writes it
_CHUNK = _stream.CHECKSUM_CHUNK
_DMA_PAGE = 4096


def _window(name: str, text: str | None) -> tuple[int, int] | None:
    """``dma_window=IOVA:LENGTH`` as (start, end), page aligned."""
    if text is None:
        return None
    start_text, sep, length_text = text.partition(":")
    try:
        start = parse_size(start_text, what="dma_window IOVA")
        length = parse_size(length_text, what="dma_window LENGTH")
    except ValueError as exc:
        raise ConfigError(f"device {name}: {exc}") from None
    if not sep or length <= 0 or start % _DMA_PAGE or length % _DMA_PAGE:
        raise ConfigError(
            f"device {name}: dma_window {text!r} must be IOVA:LENGTH, both multiples of 4K "
            "and the length > 0 (e.g. 16M:32M)"
        )
    return start, start + length


def _clip(maps: tuple[_dma.Mapping, ...], window: tuple[int, int] | None) -> list[_dma.Mapping]:
    """The writable mappings, cut to the DMA window."""
    out = []
    for m in maps:
        if not m.writable:
            continue
        if window is None:
            out.append(m)
            continue
        lo, hi = max(m.iova, window[0]), min(m.end, window[1])
        if lo < hi:
            out.append(attrs.evolve(m, iova=lo, length=hi - lo, vaddr=m.vaddr + lo - m.iova))
    return out


def _bus_master(host: object) -> bool:
    """Whether the PCI command register (offset 4) has Bus Master Enable (bit 2) set."""
    return isinstance(host, Device) and bool(host.config_bytes()[4] & 0x04)


def _mappings(host: object) -> tuple[_dma.Mapping, ...]:
    """The device's IOVA mappings (the built-in driver may look at its own core device)."""
    if isinstance(host, Device):
        return host.dma.mappings()
    return ()


class RamDriver(StateDriver):
    """Reference driver: memory-backed state, optional dirtying workload and speed limits."""

    description = "memory-backed reference device with an optional dirtying workload"
    options: ClassVar[Mapping[str, OptionSpec]] = {
        "size": OptionSpec(kind="size", default="1M", help="state size in bytes (K, M, G)"),
        "flags": OptionSpec(
            kind="flags",
            default="STOP_COPY+P2P+PRE_COPY",
            help="migration flags: STOP_COPY[+P2P][+PRE_COPY]",
        ),
        "seed": OptionSpec(
            kind="int", default=None, help="deterministic initial content (zeros if absent)"
        ),
        "dirty_rate": OptionSpec(
            kind="size", default="0", help="bytes/s the workload changes while running"
        ),
        "read_bandwidth": OptionSpec(
            kind="size", default=None, help="data stream read speed, bytes/s"
        ),
        "write_bandwidth": OptionSpec(
            kind="size", default=None, help="data stream write speed, bytes/s"
        ),
        "dma_rate": OptionSpec(
            kind="size",
            default="0",
            help="bytes/s the device DMA-writes into its writable mappings while running",
        ),
        "dma_window": OptionSpec(
            kind="str",
            default=None,
            help="IOVA:LENGTH (K/M/G): DMA only there (default: every writable mapping)",
        ),
        "dma_bus_master": OptionSpec(
            kind="str",
            default="ignored",
            help="'required': DMA only while Bus Master Enable is set in the PCI command "
            "register, as on hardware (a guest driver sets it); 'ignored' (default)",
        ),
        "reinit_after": OptionSpec(
            kind="size",
            default=None,
            help="PRE_COPY devices: re-initialise once per session after this many bytes "
            "read (REINIT, for callers that opted in to PRECOPY_INFOv2)",
        ),
        "page_size": OptionSpec(kind="size", default="4K", help="dirty-tracking granularity"),
        "config_size": OptionSpec(
            kind="int", default="256", help="PCI config space size: 256 or 4096"
        ),
    }
    stream_version = 1
    stable_ranges = True  # save_range is a view of the state's mmap
    # PCI surface: an INTA pin, one MSI vector and four MSI-X vectors.
    interrupt_pin = 1
    msi_vectors = 1
    msix_vectors = 4

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        super().__init__(name, options)
        size = self.size_option("size") or 0
        if not 1 <= size <= _MAX_SIZE:
            raise ConfigError(f"device {name}: size must be between 1 byte and 1T, got {size}")
        try:
            self._flags = parse_flags(self.option("flags") or "STOP_COPY")
        except ValueError as exc:
            raise ConfigError(f"device {name}: {exc}") from None
        page = self.size_option("page_size") or 4096
        if page < 512 or page & (page - 1) or page > (1 << 20):
            raise ConfigError(f"device {name}: page_size must be a power of two in 512..1M")
        self.page_size = page
        cfg = self.int_option("config_size")
        if cfg not in (256, 4096):
            raise ConfigError(f"device {name}: config_size must be 256 or 4096")
        self.config_size = cfg
        self.reinit_after = self.size_option("reinit_after")
        if self.reinit_after is not None and not self._flags & MigFlags.PRE_COPY:
            raise ConfigError(
                f"device {name}: reinit_after needs PRE_COPY in flags (it re-initialises "
                "a pre-copy session); add +PRE_COPY or drop the option"
            )
        self.read_bandwidth = self.size_option("read_bandwidth") or None
        self.write_bandwidth = self.size_option("write_bandwidth") or None
        self._dirty_rate = self.size_option("dirty_rate") or 0
        self._seed = self.int_option("seed")
        self._size = size
        try:
            self._mem = mmap.mmap(-1, size)
        except OSError as exc:  # the host cannot map that much
            raise DeviceError(
                exc.errno or errno.ENOMEM,
                f"cannot allocate {size} bytes of state: {exc.strerror}",
                device=name,
            ) from None
        self._view = memoryview(self._mem)
        #: CRC-32C of each CHECKSUM_CHUNK of the state, -1 where unknown; every
        #: write to the memory drops the chunks it touches (checksum()).
        self._crcs = [-1] * -(-size // _CHUNK)
        if self._seed is not None:
            self._fill(self._seed)
        else:  # fresh anonymous memory is zeros
            zero = _stream.stream_checksum(bytes(min(size, _CHUNK)))
            self._crcs = [zero] * (size // _CHUNK) + [-1] * (1 if size % _CHUNK else 0)
        self._rng = random.Random(self._seed if self._seed is not None else 0)
        self._carry = 0.0
        self.pages_dirtied = 0
        self._dma_rate = self.size_option("dma_rate") or 0
        self._dma_rng = random.Random(f"dma/{self._seed if self._seed is not None else 0}")
        self._dma_carry = 0.0
        self._dma_window = _window(name, self.option("dma_window"))
        master = self.option("dma_bus_master")
        if master not in ("required", "ignored"):
            raise ConfigError(f"device {name}: dma_bus_master must be 'required' or 'ignored'")
        self._needs_master = master == "required"
        self.dma_pages = 0
        self.dma_errors = 0

    def _fill(self, seed: int) -> None:
        block = random.Random(seed).randbytes(_FILL_BLOCK)
        doubled = memoryview(block + block)
        for i, off in enumerate(range(0, self._size, _FILL_BLOCK)):
            n = min(_FILL_BLOCK, self._size - off)
            rot = (i * 4099) % _FILL_BLOCK
            self._view[off : off + n] = doubled[rot : rot + n]
            self._crcs[i] = _stream.stream_checksum(doubled[rot : rot + n])  # still in cache

    @property
    def migration_flags(self) -> MigFlags:
        return self._flags

    def state_size(self) -> int:
        return self._size

    def save_range(self, offset: int, length: int) -> memoryview:
        return self._view[offset : offset + length]

    def load_range(self, offset: int, data: memoryview) -> None:
        self._view[offset : offset + len(data)] = data
        self._changed(offset, len(data))

    def _changed(self, offset: int, length: int) -> None:
        """Drop the known checksums of the chunks ``length`` bytes at ``offset`` touch."""
        first, end = offset // _CHUNK, (offset + length - 1) // _CHUNK + 1
        if end - first == 1:
            self._crcs[first] = -1
        elif length > 0:
            self._crcs[first:end] = [-1] * (end - first)

    def checksum(self, offset: int, length: int) -> int:
        """A chunk's CRC-32C from the values kept since its last write (else computed)."""
        if offset % _CHUNK or (length != _CHUNK and offset + length != self._size):
            return super().checksum(offset, length)
        index = offset // _CHUNK
        crc = self._crcs[index]
        if crc < 0:
            crc = self._crcs[index] = _stream.stream_checksum(self._view[offset : offset + length])
        return crc

    def header(self) -> bytes:
        return _HEADER.pack(_MAGIC, self.stream_version, self.page_size, self._size)

    def check_header(self, header: bytes) -> None:
        if len(header) != _HEADER.size:
            raise DeviceError(
                errno.EINVAL,
                f"ram header of {len(header)} bytes (expected {_HEADER.size})",
                device=self.name,
            )
        magic, version, page, size = _HEADER.unpack(header)
        if magic != _MAGIC:
            raise DeviceError(errno.EINVAL, f"not a ram stream (magic {magic!r})", device=self.name)
        if version != self.stream_version:
            raise DeviceError(
                errno.EOPNOTSUPP,
                f"ram stream version {version} (this driver loads version {self.stream_version})",
                device=self.name,
            )
        if size != self._size or page != self.page_size:
            raise DeviceError(
                errno.EOPNOTSUPP,
                f"ram stream of {size} bytes / {page}-byte pages "
                f"(this device: {self._size} / {self.page_size})",
                device=self.name,
            )

    def digest(self) -> str:
        return hashlib.sha256(self._view).hexdigest()

    def regions(self) -> Mapping[str, int]:
        return {"bar0": self._size}

    def region_read(self, region: str, offset: int, size: int) -> memoryview:
        return self._view[offset : offset + size]

    def region_write(self, region: str, offset: int, data: memoryview) -> None:
        self._view[offset : offset + len(data)] = data
        self._changed(offset, len(data))
        self.mark_dirty(offset, len(data))

    def has_workload(self) -> bool:
        return self._dirty_rate > 0 or self._dma_rate > 0

    def advance(self, seconds: float) -> None:
        if self._dirty_rate:
            self._advance_state(seconds)
        if self._dma_rate:
            self.advance_dma(seconds)

    def advance_dma(self, seconds: float) -> None:
        """DMA-write whole pages of a seeded pattern into the writable mappings.

        :meth:`advance` calls it; a core that also lets devices DMA in
        RUNNING_P2P and PRE_COPY_P2P (where the state workload must not run)
        calls it alone there.
        """
        if self._needs_master and not _bus_master(self._host):
            self._dma_carry = 0.0  # a device without Bus Master Enable cannot DMA
            return
        maps = _clip(_mappings(self._host), self._dma_window)
        if not maps:
            self._dma_carry = 0.0  # unmapped time builds no backlog
            return
        # A late tick catches up at most a quarter second of writes.
        self._dma_carry = min(
            self._dma_carry + self._dma_rate * seconds / _DMA_PAGE, self._dma_rate / _DMA_PAGE / 4
        )
        pages = int(self._dma_carry)
        self._dma_carry -= pages
        total = sum(m.length for m in maps) // _DMA_PAGE
        rng = self._dma_rng
        for _ in range(pages):
            index = rng.randrange(total)
            for m in maps:
                count = m.length // _DMA_PAGE
                if index < count:
                    break
                index -= count
            data = rng.randbytes(_DMA_PAGE)
            try:
                self.dma_write(m.iova + index * _DMA_PAGE, data)
            except DeviceError:  # counted by the core as a DMA fault; try again next tick
                self.dma_errors += 1
                return
            self.dma_pages += 1

    def _advance_state(self, seconds: float) -> None:
        self._carry += self._dirty_rate * seconds / self.page_size
        pages = int(self._carry)
        self._carry -= pages
        npages = -(-self._size // self.page_size)
        rng = self._rng
        for _ in range(pages):
            page = rng.randrange(npages)
            off = page * self.page_size + rng.randrange(
                0, min(self.page_size, self._size - page * self.page_size)
            )
            off = min(off, self._size - 8) if self._size >= 8 else 0
            chunk = rng.randbytes(min(8, self._size))
            self._view[off : off + len(chunk)] = chunk
            self._changed(off, len(chunk))
            self.mark_dirty(off, len(chunk))
        self.pages_dirtied += pages

    def info(self) -> Mapping[str, object]:
        out: dict[str, object] = {"size": self._size, "pages_dirtied": self.pages_dirtied}
        if self._dma_rate:
            out |= {"dma_pages": self.dma_pages, "dma_errors": self.dma_errors}
        return out

    def close(self) -> None:
        # A dead session's stream may still hold views of the memory (pages it
        # had queued); then the mapping is freed with the last of them.
        with contextlib.suppress(BufferError):
            self._view.release()
            self._mem.close()
