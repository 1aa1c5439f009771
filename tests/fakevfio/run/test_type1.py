"""The type1 container IOMMU of ``fakevfio run`` against ``drivers/vfio/vfio_iommu_type1.c``.

Each rule is checked with the kernel's errno, and that a refused ioctl changes
nothing: neither the container's mappings nor the devices' ``dma`` files (a
recorder stands in for them and answers ``report type1`` from the pages it was
told are dirty). The expected numbers come from the kernel source: the
capability chain of ``vfio_iommu_type1_get_info`` (migration, DMA available,
IOVA range, each 8-byte aligned by ``vfio_info_cap_add``), ``DIRTY_BITMAP_SIZE_MAX``
(256 MiB), ``dma_entry_limit`` (65535) and ``update_user_bitmap``'s word layout.
"""

from __future__ import annotations

import errno
import struct

import attrs
import pytest

from fakevfio._run import _iommufd as m
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

ARG = 0x1000
BITMAP = 0x8000
PID = 4242
VA = 0x7F00_0000_0000
R, W, VADDR = (
    uapi.VFIO_DMA_MAP_FLAG_READ,
    uapi.VFIO_DMA_MAP_FLAG_WRITE,
    uapi.VFIO_DMA_MAP_FLAG_VADDR,
)


class Mem:
    """A flat fake of the caller's memory below 0x20000 (EFAULT elsewhere)."""

    def __init__(self) -> None:
        self.buf = bytearray(0x20000)

    def read(self, addr: int, size: int) -> bytes:
        if addr + size > len(self.buf):
            raise IoctlError(errno.EFAULT, f"0x{addr:x}")
        return bytes(self.buf[addr : addr + size])

    def write(self, addr: int, data: bytes) -> None:
        if addr + len(data) > len(self.buf):
            raise IoctlError(errno.EFAULT, f"0x{addr:x}")
        self.buf[addr : addr + len(data)] = data


@attrs.define
class Port:
    """The devices' dma files: records commands, reports the pages in ``dirty``."""

    sent: list[tuple[str, str]] = attrs.Factory(list)
    dirty: dict[str, set[int]] = attrs.Factory(dict)  # device -> dirty page IOVAs
    refuse: str | None = None  # a device that refuses every command (EINVAL)

    def send(self, device: str, command: str) -> None:
        if device == self.refuse:
            raise IoctlError(errno.EINVAL, "refused")
        self.sent.append((device, command))

    def report(self, device: str, command: str) -> bytes:
        words = command.split()
        assert words[:2] == ["report", "type1"]
        iova, length, pgsize = (int(w, 0) for w in words[2:5])
        bits = 0
        for page in sorted(self.dirty.get(device, set())):
            if iova <= page < iova + length:
                bits |= 1 << ((page - iova) // pgsize)
                self.dirty[device].discard(page)  # a type1 report clears what it reported
        self.sent.append((device, command))
        return bits.to_bytes(m.bitmap_bytes(length // pgsize), "little")


@attrs.define
class C:
    """One container with devices d0 and d1, its memory and their recorder."""

    t1: m.Type1 = attrs.Factory(lambda: m.Type1(v2=True))
    mem: Mem = attrs.Factory(Mem)
    port: Port = attrs.Factory(Port)
    devices: list[str] = attrs.Factory(lambda: ["d0", "d1"])

    def map(
        self, iova: int, size: int, flags: int = R | W, vaddr: int = VA, argsz: int = 32
    ) -> int:
        self.mem.write(ARG, uapi.IOMMU_TYPE1_DMA_MAP.pack(argsz, flags, vaddr, iova, size))
        return self.t1.map_dma(self.mem, ARG, PID, self.port, self.devices)

    def unmap(self, iova: int, size: int, flags: int = 0, argsz: int = 24) -> int:
        """The bytes unmapped (the kernel writes them back into ``size``)."""
        self.mem.write(ARG, uapi.IOMMU_TYPE1_DMA_UNMAP.pack(argsz, flags, iova, size))
        self.t1.unmap_dma(self.mem, ARG, self.port, self.devices)
        return int(uapi.IOMMU_TYPE1_DMA_UNMAP.unpack(self.mem.read(ARG, 24))[3])

    def unmap_dirty(self, iova: int, size: int, pgsize: int = 4096, bm: int = 8) -> int:
        flags = uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
        self.mem.write(ARG, uapi.IOMMU_TYPE1_DMA_UNMAP.pack(48, flags, iova, size))
        self.mem.write(ARG + 24, uapi.VFIO_BITMAP.pack(pgsize, bm, BITMAP))
        self.t1.unmap_dma(self.mem, ARG, self.port, self.devices)
        return int(uapi.IOMMU_TYPE1_DMA_UNMAP.unpack(self.mem.read(ARG, 24))[3])

    def dirty(self, flags: int, argsz: int = 8) -> int:
        self.mem.write(ARG, uapi.IOMMU_TYPE1_DIRTY_BITMAP.pack(argsz, flags))
        return self.t1.dirty_pages(self.mem, ARG, self.port, self.devices)

    def get_bitmap(
        self, iova: int, size: int, pgsize: int = 4096, bm: int = 64, data: int = BITMAP
    ) -> int:
        flags = uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
        get = uapi.IOMMU_TYPE1_DIRTY_BITMAP_GET
        self.mem.write(ARG, uapi.IOMMU_TYPE1_DIRTY_BITMAP.pack(8 + get.size, flags))
        self.mem.write(ARG + 8, get.pack(iova, size, pgsize, bm, data))
        return self.t1.dirty_pages(self.mem, ARG, self.port, self.devices)

    def snapshot(self) -> tuple[object, ...]:
        return (dict(self.t1.maps), set(self.t1.invalid), self.t1.dirty, list(self.port.sent))


def _err(fn: object, *args: object, **kwargs: object) -> int:
    with pytest.raises(IoctlError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value.errno


def _refused(c: C, fn: object, *args: object, **kwargs: object) -> int:
    """The errno of a refused call, after checking it changed nothing."""
    before = c.snapshot()
    bitmap = c.mem.read(BITMAP, 64)
    code = _err(fn, *args, **kwargs)
    assert c.snapshot() == before
    assert c.mem.read(BITMAP, 64) == bitmap
    return code


def _caps(buf: bytes) -> list[tuple[int, int, int, bytes]]:
    """The capability chain of a GET_INFO answer: (offset, id, version, body)."""
    (cap_offset,) = struct.unpack_from("<I", buf, 16)
    out, at = [], cap_offset
    while at:
        cid, version, nxt = uapi.INFO_CAP_HEADER.unpack_from(buf, at)
        out.append((at, cid, version, buf[at:]))
        at = nxt
    return out


def test_get_info_argsz_and_capability_chain() -> None:
    c = C()
    c.map(0x100000, 0x2000)
    c.mem.write(ARG, struct.pack("<I", 15))
    assert _refused(c, c.t1.get_info, c.mem, ARG) == errno.EINVAL
    # argsz 16 (no cap_offset yet): 16 bytes back, argsz says what the chain needs
    c.mem.write(ARG, struct.pack("<IIQII", 16, 0, 0, 0xAAAA, 0))
    c.t1.get_info(c.mem, ARG)
    argsz, flags, pgsizes, untouched, _ = struct.unpack_from("<IIQII", c.mem.buf, ARG)
    need = 24 + 32 + 16 + 32  # info, migration, dma_avail (12 -> 16), iova range with 1 range
    assert (argsz, flags, untouched) == (need, 3, 0xAAAA)  # PGSIZES | CAPS
    assert pgsizes == 0xFFFF_FFFF_FFFF_F000  # PAGE_MASK: every size from 4 KiB
    c.mem.write(ARG, struct.pack("<IIQII", 24, 0, 0, 0xAAAA, 0))
    c.t1.get_info(c.mem, ARG)
    assert struct.unpack_from("<II", c.mem.buf, ARG) == (need, 3)
    assert struct.unpack_from("<I", c.mem.buf, ARG + 16) == (0,)  # no chain copied
    c.mem.write(ARG, struct.pack("<I", need) + bytes(need - 4))
    c.t1.get_info(c.mem, ARG)
    buf = c.mem.read(ARG, need)
    assert struct.unpack_from("<I", buf, 0) == (need,)
    caps = _caps(buf)
    assert [(at, cid, v) for at, cid, v, _ in caps] == [(24, 2, 1), (56, 3, 1), (72, 1, 1)]
    mig = uapi.IOMMU_TYPE1_CAP_MIGRATION.unpack_from(caps[0][3])
    assert (mig[3], mig[5], mig[6]) == (0, 4096, 256 << 20)  # flags, pgsize, max bitmap
    assert uapi.IOMMU_TYPE1_CAP_DMA_AVAIL.unpack_from(caps[1][3])[3] == 65535 - 1
    iova = uapi.IOMMU_TYPE1_CAP_IOVA_RANGE.unpack_from(caps[2][3])
    assert iova[3] == 1
    assert uapi.IOVA_RANGE.unpack_from(caps[2][3], 16) == (0, (1 << 64) - 1)


def test_map_dma_rules() -> None:
    c = C()
    assert _refused(c, c.map, 0x100000, 0x2000, argsz=31) == errno.EINVAL
    assert _refused(c, c.map, 0x100000, 0x2000, flags=R | 8) == errno.EINVAL  # unknown flag
    assert _refused(c, c.map, 0x100000, 0x2000, flags=0) == errno.EINVAL  # no READ/WRITE
    assert _refused(c, c.map, 0x100000, 0x2000, flags=R | VADDR) == errno.EINVAL
    assert _refused(c, c.map, 0x100000, 0) == errno.EINVAL
    assert _refused(c, c.map, 0x100800, 0x2000) == errno.EINVAL  # iova unaligned
    assert _refused(c, c.map, 0x100000, 0x2800) == errno.EINVAL  # size unaligned
    assert _refused(c, c.map, 0x100000, 0x2000, vaddr=VA + 1) == errno.EINVAL
    assert _refused(c, c.map, (1 << 64) - 0x1000, 0x2000) == errno.EINVAL  # iova wraps
    assert _refused(c, c.map, 0x100000, 0x2000, vaddr=(1 << 64) - 0x1000) == errno.EINVAL
    assert c.map(0x100000, 0x2000, flags=R) == 0
    assert c.port.sent == [
        ("d0", f"map 0x100000 0x2000 {PID} 0x{VA:x} r"),
        ("d1", f"map 0x100000 0x2000 {PID} 0x{VA:x} r"),
    ]
    assert _refused(c, c.map, 0x101000, 0x1000) == errno.EEXIST  # inside
    assert _refused(c, c.map, 0xFF000, 0x2000) == errno.EEXIST  # straddles the start
    assert c.map(0x102000, 0x1000, flags=W) == 0  # adjacent is fine
    assert c.port.sent[-1] == ("d1", f"map 0x102000 0x1000 {PID} 0x{VA:x} w")


def test_map_dma_a_refusing_device_undoes_the_others() -> None:
    c = C()
    c.port.refuse = "d1"
    assert _err(c.map, 0x100000, 0x1000) == errno.EINVAL
    assert c.t1.maps == {}
    assert c.port.sent == [
        ("d0", f"map 0x100000 0x1000 {PID} 0x{VA:x} rw"),
        ("d0", "unmap 0x100000 0x1000"),
    ]


def test_map_dma_entry_limit_is_enospc() -> None:
    c = C(devices=[])
    for i in range(m.DMA_ENTRY_LIMIT):
        c.t1.maps[i << 12] = m.Area(
            iova=i << 12, length=4096, pid=PID, vaddr=VA, readable=True, writeable=True
        )
    assert _refused(c, c.map, 1 << 40, 0x1000) == errno.ENOSPC


def test_unmap_dma_v2_rules() -> None:
    c = C()
    c.map(0x100000, 0x4000)
    c.map(0x200000, 0x2000)
    assert _refused(c, c.unmap, 0x100000, 0x4000, argsz=23) == errno.EINVAL
    assert _refused(c, c.unmap, 0x100000, 0x4000, flags=8) == errno.EINVAL
    assert _refused(c, c.unmap, 0x100800, 0x4000) == errno.EINVAL  # iova unaligned
    assert _refused(c, c.unmap, 0x100000, 0) == errno.EINVAL
    assert _refused(c, c.unmap, 0x100000, 0x3800) == errno.EINVAL  # size unaligned
    assert _refused(c, c.unmap, 0x2000, (1 << 64) - 0x1000) == errno.EINVAL  # wraps
    assert _refused(c, c.unmap, 0x101000, 0x3000) == errno.EINVAL  # starts inside
    assert _refused(c, c.unmap, 0x100000, 0x2000) == errno.EINVAL  # ends inside (a split)
    assert _refused(c, c.unmap, 0x0, 0x101000) == errno.EINVAL  # ends inside
    flags_all = uapi.VFIO_DMA_UNMAP_FLAG_ALL
    assert _refused(c, c.unmap, 0x100000, 0, flags=flags_all) == errno.EINVAL  # iova must be 0
    assert _refused(c, c.unmap, 0, 0x1000, flags=flags_all) == errno.EINVAL  # size must be 0
    # nothing mapped there: success, 0 bytes (type1 has no ENOENT)
    assert c.unmap(0x400000, 0x1000) == 0
    c.port.sent.clear()
    # a range with holes around both mappings takes them whole
    assert c.unmap(0x0, 0x300000) == 0x6000
    assert c.t1.maps == {}
    assert c.port.sent == [
        ("d0", "unmap 0x100000 0x4000"),
        ("d1", "unmap 0x100000 0x4000"),
        ("d0", "unmap 0x200000 0x2000"),
        ("d1", "unmap 0x200000 0x2000"),
    ]
    c.map(0x100000, 0x1000)
    c.map(0x900000, 0x1000)
    assert c.unmap(0, 0, flags=flags_all) == 0x2000
    assert c.t1.maps == {}


def test_unmap_dma_v1_takes_whole_mappings_that_start_in_the_range() -> None:
    c = C(t1=m.Type1(v2=False))
    c.map(0x100000, 0x4000)
    assert c.unmap(0x101000, 0x1000) == 0  # starts before the range: v1 stops there
    assert c.unmap(0x100000, 0x1000) == 0x4000  # the whole mapping goes
    assert c.t1.maps == {}


def test_vaddr_invalidate_and_update() -> None:
    c = C()
    c.map(0x100000, 0x2000)
    c.port.sent.clear()
    vflag = uapi.VFIO_DMA_UNMAP_FLAG_VADDR
    assert _refused(c, c.map, 0x100000, 0x2000, flags=VADDR, vaddr=VA * 2) == errno.EINVAL
    assert _refused(c, c.map, 0x300000, 0x2000, flags=VADDR) == errno.ENOENT
    assert c.unmap(0x100000, 0x2000, flags=vflag) == 0x2000
    assert 0x100000 in c.t1.maps  # still mapped, its vaddr invalid
    assert c.port.sent == [("d0", "unmap 0x100000 0x2000"), ("d1", "unmap 0x100000 0x2000")]
    assert _refused(c, c.unmap, 0x100000, 0x2000, flags=vflag) == errno.EINVAL  # twice
    assert _refused(c, c.map, 0x100000, 0x1000, flags=VADDR) == errno.EINVAL  # not its size
    c.port.sent.clear()
    assert c.map(0x100000, 0x2000, flags=VADDR, vaddr=VA * 2) == 0
    assert c.port.sent[0] == ("d0", f"map 0x100000 0x2000 {PID} 0x{VA * 2:x} rw")
    assert c.t1.maps[0x100000].vaddr == VA * 2
    assert not c.t1.invalid


def test_dirty_pages_start_stop_and_bitmap_words() -> None:
    c = C()
    start, stop = uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START, uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
    assert _refused(c, c.dirty, start, argsz=7) == errno.EINVAL
    assert _refused(c, c.dirty, 8) == errno.EINVAL
    assert _refused(c, c.dirty, 0) == errno.EINVAL
    assert _refused(c, c.dirty, start | stop) == errno.EINVAL  # one at a time
    c.map(0x0, 0x40000)  # 64 pages: bits 0..63
    c.map(0x50000, 0x3000)  # 3 pages at bit 80: word 1, shift 16
    assert _refused(c, c.get_bitmap, 0x0, 0x60000) == errno.EINVAL  # not started
    c.port.sent.clear()
    assert c.dirty(start) == 0
    assert c.port.sent == [("d0", "dirty type1 on"), ("d1", "dirty type1 on")]
    c.port.dirty = {"d0": {0x1000, 0x3F000}, "d1": {0x52000, 0x1000}}
    c.mem.write(BITMAP, b"\xff" * 16)  # words the kernel reads back (leftover) or overwrites
    assert _refused(c, c.get_bitmap, 0x0, 0x60000, pgsize=8192) == errno.EINVAL
    assert _refused(c, c.get_bitmap, 0x1000, 0x5F000) == errno.EINVAL  # cuts a mapping
    assert _refused(c, c.get_bitmap, 0x0, 0x51000) == errno.EINVAL  # ends inside one
    assert _refused(c, c.get_bitmap, 0x0, 0x60000, bm=15) == errno.EINVAL  # < 2 words
    assert _refused(c, c.get_bitmap, 0x0, 0x60000, pgsize=0) == errno.EINVAL
    assert _refused(c, c.get_bitmap, 0x0, 0x60000, data=1 << 47) == errno.EINVAL  # access_ok
    assert _refused(c, c.get_bitmap, 0x0, 0x60000, bm=(256 << 20) + 8) == errno.EINVAL
    assert c.get_bitmap(0x0, 0x60000) == 0
    words = struct.unpack_from("<QQ", c.mem.buf, BITMAP)
    # mapping 1 overwrote word 0 (pages 1 and 63); mapping 2 ORed into word 1's old bits
    assert words[0] == (1 << 1) | (1 << 63)
    assert words[1] == 0xFFFF_FFFF_FFFF_FFFF  # leftover ORed whole (bitmap_or of one word)
    c.mem.write(BITMAP, bytes(16))
    assert c.get_bitmap(0x0, 0x60000) == 0  # the report cleared what it reported
    assert struct.unpack_from("<QQ", c.mem.buf, BITMAP) == (0, 0)
    c.port.dirty = {"d0": {0x1000}, "d1": {0x52000}}
    assert c.get_bitmap(0x0, 0x60000) == 0
    assert struct.unpack_from("<QQ", c.mem.buf, BITMAP) == (0b10, 1 << 18)
    assert c.dirty(stop) == 0
    assert c.port.sent[-2:] == [("d0", "dirty type1 off"), ("d1", "dirty type1 off")]
    assert c.dirty(stop) == 0  # stopping twice is fine


def test_dirty_pages_refused_on_a_v1_container() -> None:
    c = C(t1=m.Type1(v2=False))
    assert _refused(c, c.dirty, uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START) == errno.EACCES


def test_unmap_with_dirty_bitmap() -> None:
    c = C()
    c.map(0x100000, 0x4000)
    get = uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
    assert _refused(c, c.unmap_dirty, 0x100000, 0x4000) == errno.EINVAL  # tracking is off
    c.dirty(uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    c.port.dirty = {"d1": {0x102000}}
    assert _refused(c, c.unmap, 0, 0, flags=get | uapi.VFIO_DMA_UNMAP_FLAG_ALL) == errno.EINVAL
    assert _refused(c, c.unmap, 0x100000, 0x4000, flags=get, argsz=47) == errno.EINVAL
    assert _refused(c, c.unmap_dirty, 0x100000, 0x4000, pgsize=8192) == errno.EINVAL
    assert _refused(c, c.unmap_dirty, 0x100000, 0x4000, bm=0) == errno.EINVAL
    assert c.unmap_dirty(0x100000, 0x4000) == 0x4000
    assert struct.unpack_from("<Q", c.mem.buf, BITMAP) == (0b100,)
    assert c.t1.maps == {}


def test_replay_and_leave() -> None:
    c = C()
    c.map(0x100000, 0x1000)
    c.dirty(uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    c.port.sent.clear()
    c.t1.replay(c.port, "d2")
    assert c.port.sent == [
        ("d2", f"map 0x100000 0x1000 {PID} 0x{VA:x} rw"),
        ("d2", "dirty type1 on"),
    ]
    c.port.sent.clear()
    m.Type1.leave(c.port, "d2")
    assert c.port.sent == [("d2", "dirty type1 off"), ("d2", "unmap all")]
