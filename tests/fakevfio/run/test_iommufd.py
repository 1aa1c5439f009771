"""The iommufd object model behind ``fakevfio run`` (what QEMU's iommufd backend issues)."""

from __future__ import annotations

import errno
import struct

import pytest

from fakevfio._run import _iommufd as m
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

ARG = 0x1000
RANGES = 0x8000


class Mem:
    """A flat fake of the caller's memory."""

    def __init__(self) -> None:
        self.buf = bytearray(0x10000)

    def read(self, addr: int, size: int) -> bytes:
        if addr + size > len(self.buf):
            raise IoctlError(errno.EFAULT, f"0x{addr:x}")
        return bytes(self.buf[addr : addr + size])

    def write(self, addr: int, data: bytes) -> None:
        if addr + len(data) > len(self.buf):
            raise IoctlError(errno.EFAULT, f"0x{addr:x}")
        self.buf[addr : addr + len(data)] = data


def _err(fn: object, *args: object) -> int:
    with pytest.raises(IoctlError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno


def _map(
    mem: Mem,
    ctx: m.Context,
    ioas: int,
    iova: int,
    length: int,
    flags: int = m.IOMMU_IOAS_MAP_FIXED_IOVA | m.IOMMU_IOAS_MAP_READABLE,
) -> int:
    mem.write(ARG, m.IOAS_MAP.pack(m.IOAS_MAP.size, flags, ioas, 0, 0x7F0000000000, length, iova))
    ctx.ioas_map(mem, ARG)
    return int(m.IOAS_MAP.unpack(mem.read(ARG, m.IOAS_MAP.size))[6])


def _unmap(mem: Mem, ctx: m.Context, ioas: int, iova: int, length: int) -> int:
    mem.write(ARG, m.IOAS_UNMAP.pack(m.IOAS_UNMAP.size, ioas, iova, length))
    ctx.ioas_unmap(mem, ARG)
    return int(m.IOAS_UNMAP.unpack(mem.read(ARG, m.IOAS_UNMAP.size))[3])


def test_map_unmap_follow_the_kernel() -> None:
    mem, ctx = Mem(), m.Context()
    ctx.ioas[1] = m.Ioas()
    assert _map(mem, ctx, 1, 0, 0x10000) == 0
    assert _map(mem, ctx, 1, 0x100000, 0x2000) == 0x100000
    assert _err(_map, mem, ctx, 1, 0x8000, 0x1000) == errno.EEXIST
    assert _err(_map, mem, ctx, 2, 0, 0x1000) == errno.ENOENT
    assert _err(_map, mem, ctx, 1, 0x200000, 0) == errno.EINVAL
    # the kernel picks the first hole from 4 KiB up (iopt_alloc_iova)
    assert _map(mem, ctx, 1, 0, 0x1000, flags=m.IOMMU_IOAS_MAP_READABLE) == 0x10000
    assert _err(_unmap, mem, ctx, 1, 0x1000, 0x1000) == errno.ENOENT  # would cut an area
    assert _err(_unmap, mem, ctx, 1, 0x400000, 0x1000) == errno.ENOENT
    assert _unmap(mem, ctx, 1, 0, 0x10000) == 0x10000
    assert _unmap(mem, ctx, 1, 0, (1 << 64) - 1) == 0x3000  # unmap all
    assert ctx.ioas[1].areas == {}


def test_iova_ranges_two_calls_like_qemu() -> None:
    mem, ctx = Mem(), m.Context()
    ctx.ioas[5] = m.Ioas()
    mem.write(ARG, m.IOAS_IOVA_RANGES.pack(m.IOAS_IOVA_RANGES.size, 5, 0, 0, 0, 0))
    assert _err(ctx.iova_ranges, mem, ARG) == errno.EMSGSIZE
    num = m.IOAS_IOVA_RANGES.unpack(mem.read(ARG, 32))[2]
    assert num == 1
    mem.write(ARG, m.IOAS_IOVA_RANGES.pack(m.IOAS_IOVA_RANGES.size, 5, num, 0, RANGES, 0))
    ctx.iova_ranges(mem, ARG)
    assert m.IOAS_IOVA_RANGES.unpack(mem.read(ARG, 32))[5] == m.IOVA_ALIGNMENT
    assert m.IOVA_RANGE.unpack(mem.read(RANGES, 16)) == (0, m.IOVA_LAST)


def test_hwpt_alloc_hw_info_and_destroy() -> None:
    mem, ctx = Mem(), m.Context()
    ctx.ioas[1] = m.Ioas()
    mem.write(ARG, m.HW_INFO.pack(m.HW_INFO.size, 0, 9, 16, RANGES, 7, 0, 7))
    mem.write(RANGES, b"\xff" * 16)
    m.hw_info(mem, ARG, {9})
    out = m.HW_INFO.unpack(mem.read(ARG, m.HW_INFO.size))
    assert (out[3], out[5], out[7]) == (0, m.IOMMU_HW_INFO_TYPE_NONE, 1)  # DIRTY_TRACKING
    assert mem.read(RANGES, 16) == bytes(16)
    assert _err(m.hw_info, mem, ARG, {8}) == errno.ENOENT

    def alloc(flags: int, dev: int, pt: int) -> None:
        mem.write(ARG, m.HWPT_ALLOC.pack(m.HWPT_ALLOC.size, flags, dev, pt, 0, 0, 0, 0, 0, 0, 0))
        ctx.hwpt_alloc(mem, ARG, {9}, 42)

    assert _err(alloc, 1 << 9, 9, 1) == errno.EOPNOTSUPP
    assert _err(alloc, 0, 8, 1) == errno.ENOENT
    alloc(0, 9, 1)
    assert struct.unpack_from("<I", mem.read(ARG + 16, 4))[0] == 42
    assert ctx.has_pt(42)
    assert _err(ctx.destroy, 1) == errno.EBUSY  # the HWPT holds the IOAS
    ctx.destroy(42)
    ctx.destroy(1)
    assert _err(ctx.destroy, 1) == errno.ENOENT


# -- the kernel's rules, each refusal changing nothing ---------------------------------------------
PID = 4242
VA = 0x7F00_0000_0000
RW = m.IOMMU_IOAS_MAP_READABLE | m.IOMMU_IOAS_MAP_WRITEABLE
FIXED = m.IOMMU_IOAS_MAP_FIXED_IOVA


class Port:
    """The devices' dma files: records commands, reports the pages in ``dirty``."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.dirty: dict[str, set[int]] = {}

    def send(self, device: str, command: str) -> None:
        self.sent.append((device, command))

    def report(self, device: str, command: str) -> bytes:
        words = command.split()
        assert words[:2] == ["report", "iommu"]
        iova, length, pgsize = (int(w, 0) for w in words[2:5])
        bits = 0
        for page in sorted(self.dirty.get(device, set())):
            if iova <= page < iova + length:
                bits |= 1 << ((page - iova) // pgsize)
                if "noclear" not in words:
                    self.dirty[device].discard(page)
        self.sent.append((device, command))
        return bits.to_bytes(m.bitmap_bytes(length // pgsize), "little")


class World:
    """One iommufd with IOAS 1, devices 10 (d0) and 11 (d1) bound, and a recorder."""

    def __init__(self) -> None:
        self.mem, self.ctx, self.port = Mem(), m.Context(), Port()
        self.ctx.ioas[1] = m.Ioas()
        self.ctx.bind(10, "d0")
        self.ctx.bind(11, "d1")
        self.ids = iter(range(100, 200))

    def new_id(self) -> int:
        return next(self.ids)

    def map(
        self,
        iova: int,
        length: int,
        flags: int = FIXED | RW,
        va: int = VA,
        ioas: int = 1,
        size: int = 40,
        reserved: int = 0,
    ) -> int:
        self.mem.write(ARG, m.IOAS_MAP.pack(size, flags, ioas, reserved, va, length, iova))
        self.ctx.ioas_map(self.mem, ARG, PID, self.port)
        return int(m.IOAS_MAP.unpack(self.mem.read(ARG, 40))[6])

    def unmap(self, iova: int, length: int, ioas: int = 1) -> int:
        self.mem.write(ARG, m.IOAS_UNMAP.pack(24, ioas, iova, length))
        self.ctx.ioas_unmap(self.mem, ARG, self.port)
        return int(m.IOAS_UNMAP.unpack(self.mem.read(ARG, 24))[3])

    def copy(
        self, dst: int, src: int, length: int, flags: int = FIXED | RW, dst_ioas: int = 2
    ) -> int:
        self.mem.write(ARG, m.IOAS_COPY.pack(40, flags, dst_ioas, 1, length, dst, src))
        self.ctx.ioas_copy(self.mem, ARG, self.port)
        return int(m.IOAS_COPY.unpack(self.mem.read(ARG, 40))[5])

    def alloc(self, flags: int, dev: int = 10, pt: int = 1) -> int:
        new = self.new_id()
        self.mem.write(ARG, m.HWPT_ALLOC.pack(48, flags, dev, pt, 0, 0, 0, 0, 0, 0, 0))
        self.ctx.hwpt_alloc(self.mem, ARG, set(self.ctx.devices), new)
        return new

    def set_dirty(self, hwpt: int, flags: int = 1) -> int:
        self.mem.write(ARG, m.SET_DIRTY.pack(16, flags, hwpt, 0))
        return self.ctx.set_dirty_tracking(self.mem, ARG, self.port)

    def bitmap(
        self,
        hwpt: int,
        iova: int,
        length: int,
        page: int = 4096,
        flags: int = 0,
        data: int = RANGES,
    ) -> int:
        self.mem.write(ARG, m.GET_DIRTY.pack(48, hwpt, flags, 0, iova, length, page, data))
        return self.ctx.get_dirty_bitmap(self.mem, ARG, self.port)

    def state(self) -> tuple[object, ...]:
        return (
            repr(self.ctx),
            list(self.port.sent),
            self.mem.read(RANGES, 64),
        )


def _refused(w: World, fn: object, *args: object, **kwargs: object) -> int:
    before = w.state()
    code = _err(fn, *args, **kwargs) if not kwargs else _err_kw(fn, args, kwargs)
    assert w.state() == before
    return code


def _err_kw(fn: object, args: tuple[object, ...], kwargs: dict[str, object]) -> int:
    with pytest.raises(IoctlError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    return info.value.errno


def test_struct_size_rules_of_iommufd() -> None:
    w = World()
    assert _refused(w, w.map, 0x10000, 0x1000, size=39) == errno.EINVAL  # below the minimum
    w.mem.write(ARG + 40, b"\x01")  # a newer caller's unknown field set: E2BIG
    w.mem.write(ARG, m.IOAS_MAP.pack(48, FIXED | RW, 1, 0, VA, 0x1000, 0x10000))
    assert _err(w.ctx.ioas_map, w.mem, ARG, PID, w.port) == errno.E2BIG
    assert w.ctx.ioas[1].areas == {}
    w.mem.write(ARG + 40, bytes(8))  # zeros past the struct: accepted
    w.ctx.ioas_map(w.mem, ARG, PID, w.port)
    assert 0x10000 in w.ctx.ioas[1].areas
    # an older HW_INFO (32 bytes, no out_capabilities) gets only its 32 bytes back
    w.mem.write(ARG, m.HW_INFO.pack(32, 0, 10, 0, 0, 0, 0, 0xAAAA))
    m.hw_info(w.mem, ARG, {10})
    assert m.HW_INFO.unpack(w.mem.read(ARG, 40))[7] == 0xAAAA
    w.mem.write(ARG, m.HW_INFO.pack(40, 0, 10, 0, 0, 0, 0, 0))
    m.hw_info(w.mem, ARG, {10})
    assert m.HW_INFO.unpack(w.mem.read(ARG, 40))[7] == 1  # IOMMU_HW_CAP_DIRTY_TRACKING


def test_ioas_map_rules() -> None:
    w = World()
    assert _refused(w, w.map, 0x10000, 0x1000, flags=FIXED | RW | 8) == errno.EOPNOTSUPP
    assert _refused(w, w.map, 0x10000, 0x1000, reserved=1) == errno.EOPNOTSUPP
    assert _refused(w, w.map, (1 << 64) - 1, 0x1000) == errno.EOVERFLOW  # iova >= ULONG_MAX
    assert _refused(w, w.map, 0x10000, 0x1000, flags=FIXED) == errno.EINVAL  # no R/W
    assert _refused(w, w.map, 0x10000, 0x1000, ioas=7) == errno.ENOENT
    assert _refused(w, w.map, 0x10000, 0) == errno.EINVAL
    assert _refused(w, w.map, 0x10000, 0x1000, va=(1 << 64) - 0x800) == errno.EOVERFLOW
    assert _refused(w, w.map, 0x10000, 0x1800) == errno.EINVAL  # length not 4 KiB aligned
    assert _refused(w, w.map, 0x10800, 0x1000) == errno.EINVAL  # iova not aligned
    assert _refused(w, w.map, 0x10000, 0x1000, va=VA + 0x10) == errno.EINVAL  # page offset
    assert _refused(w, w.map, (1 << 64) - 0x2000, 0x3000) == errno.EOVERFLOW  # iova wraps
    assert w.map(0x10000, 0x2000) == 0x10000
    assert _refused(w, w.map, 0x11000, 0x2000) == errno.EEXIST
    assert _refused(w, w.map, 0xF000, 0x2000) == errno.EEXIST


def test_ioas_automatic_iova_is_the_kernels_first_fit() -> None:
    w = World()
    auto = RW  # no FIXED_IOVA
    # from PAGE_SIZE up, aligned to min(roundup_pow_of_two(length), 1 << __ffs(uptr))
    assert w.map(0, 0x1000, flags=auto, va=VA + 0x1000) == 0x1000
    assert w.map(0, 0x3000, flags=auto, va=VA) == 0x4000  # 16 KiB alignment
    assert w.map(0, 0x200000, flags=auto, va=VA) == 0x200000  # 2 MiB aligned by the length
    # the uptr's 4 KiB alignment wins, but no hole below the last area holds 2 MiB
    assert w.map(0, 0x200000, flags=auto, va=VA + 0x1000) == 0x400000
    assert w.map(0, 0x1000, flags=auto, va=VA + 0x1000) == 0x2000  # the first hole
    assert _refused(w, w.map, 0, 1 << 63, flags=auto) == errno.EOVERFLOW


def test_ioas_unmap_rules() -> None:
    w = World()
    w.map(0x10000, 0x2000)
    w.map(0x20000, 0x1000)
    w.mem.write(ARG, m.IOAS_UNMAP.pack(23, 1, 0x10000, 0x2000))
    assert _refused(w, w.ctx.ioas_unmap, w.mem, ARG, w.port) == errno.EINVAL
    assert _refused(w, w.unmap, 0x10000, 0x2000, ioas=9) == errno.ENOENT
    assert _refused(w, w.unmap, 0x10000, 0) == errno.EINVAL
    assert _refused(w, w.unmap, 0x10000, (1 << 64) - 1) == errno.EOVERFLOW
    assert _refused(w, w.unmap, 0x11000, 0x1000) == errno.ENOENT  # cuts an area
    assert _refused(w, w.unmap, 0x10000, 0x10800) == errno.ENOENT  # cuts the second
    assert _refused(w, w.unmap, 0x40000, 0x1000) == errno.ENOENT  # nothing there
    assert w.unmap(0x0, 0x30000) == 0x3000  # holes are fine, whole areas go
    assert w.unmap(0, (1 << 64) - 1) == 0  # unmap all of nothing succeeds


def test_ioas_copy_maps_the_same_pages() -> None:
    w = World()
    w.ctx.ioas[2] = m.Ioas()
    w.map(0x10000, 0x2000, va=VA)
    w.map(0x12000, 0x1000, va=VA + 0x100000, flags=FIXED | m.IOMMU_IOAS_MAP_READABLE)
    assert _refused(w, w.copy, 0x80000, 0x10000, 0x4000) == errno.ENOENT  # not all mapped
    assert _refused(w, w.copy, 0x80000, 0x10000, 0x3000, flags=FIXED) == errno.EINVAL
    assert _refused(w, w.copy, 0x80000, 0x10000, 0x3000, dst_ioas=9) == errno.ENOENT
    assert _refused(w, w.copy, 0x80000, 0x10000, 0) == errno.EINVAL
    # write access to the pages of a read-only map
    assert _refused(w, w.copy, 0x80000, 0x11000, 0x2000) == errno.EPERM
    read = FIXED | m.IOMMU_IOAS_MAP_READABLE
    assert w.copy(0x80000, 0x11000, 0x2000, flags=read) == 0x80000
    areas = w.ctx.ioas[2].sorted_areas()
    assert [(a.iova, a.length, a.vaddr, a.perm) for a in areas] == [
        (0x80000, 0x1000, VA + 0x1000, "r"),
        (0x81000, 0x1000, VA + 0x100000, "r"),
    ]


def test_attach_replays_maps_and_pushes_each_change() -> None:
    w = World()
    w.map(0x10000, 0x2000)
    hwpt = w.ctx.attach(w.port, 10, 1, w.new_id)
    assert w.ctx.hwpts[hwpt].auto
    assert w.ctx.attach(w.port, 11, 1, w.new_id) == hwpt  # the same automatic domain
    assert w.port.sent == [
        ("d0", f"map 0x10000 0x2000 {PID} 0x{VA:x} rw"),
        ("d1", f"map 0x10000 0x2000 {PID} 0x{VA:x} rw"),
    ]
    w.port.sent.clear()
    w.map(0x20000, 0x1000, flags=FIXED | m.IOMMU_IOAS_MAP_WRITEABLE)
    w.unmap(0x10000, 0x2000)
    assert w.port.sent == [
        ("d0", f"map 0x20000 0x1000 {PID} 0x{VA:x} w"),
        ("d1", f"map 0x20000 0x1000 {PID} 0x{VA:x} w"),
        ("d0", "unmap 0x10000 0x2000"),
        ("d1", "unmap 0x10000 0x2000"),
    ]
    w.port.sent.clear()
    w.ctx.detach(w.port, 10)
    w.ctx.detach(w.port, 11)
    assert w.port.sent == [("d0", "unmap all"), ("d1", "unmap all")]
    assert hwpt not in w.ctx.hwpts  # the automatic HWPT goes with its last device


def test_hwpt_dirty_tracking_rules() -> None:
    w = World()
    assert _refused(w, w.alloc, 1 << 9) == errno.EOPNOTSUPP
    plain = w.alloc(0)
    dirty = w.alloc(m.IOMMU_HWPT_ALLOC_DIRTY_TRACKING)
    w.map(0x0, 0x40000)  # pages 0..63
    w.map(0x40000, 0x10000)
    w.ctx.attach(w.port, 10, dirty, w.new_id)
    w.ctx.attach(w.port, 11, dirty, w.new_id)
    assert _refused(w, w.set_dirty, plain) == errno.EOPNOTSUPP  # allocated without the flag
    assert _refused(w, w.set_dirty, dirty, flags=2) == errno.EOPNOTSUPP
    assert _refused(w, w.set_dirty, 999) == errno.ENOENT
    w.port.sent.clear()
    assert w.set_dirty(dirty) == 0
    assert w.port.sent == [("d0", "dirty iommu on"), ("d1", "dirty iommu on")]
    w.port.dirty = {"d0": {0x1000, 0x41000}, "d1": {0x3F000}}
    assert _refused(w, w.bitmap, dirty, 0, 0x50000, page=0) == errno.EINVAL
    assert _refused(w, w.bitmap, dirty, 0x800, 0x1000) == errno.EINVAL  # not IOAS aligned
    assert _refused(w, w.bitmap, dirty, 0x1000, 0x1000, page=0x2000) == errno.EINVAL
    assert _refused(w, w.bitmap, dirty, 0x2000, (1 << 64) - 0x1000) == errno.EOVERFLOW
    assert _refused(w, w.bitmap, dirty, 0, 0x60000) == errno.EINVAL  # a hole at 0x50000
    assert _refused(w, w.bitmap, dirty, 0, 0x50000, flags=2) == errno.EOPNOTSUPP
    assert _refused(w, w.bitmap, plain, 0, 0x50000) == errno.EOPNOTSUPP
    assert _refused(w, w.bitmap, dirty, 0, 0x50000, data=0xFFF8) == errno.EFAULT
    w.mem.write(RANGES, (1 << 2).to_bytes(8, "little"))  # the kernel only sets bits
    nc = uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR
    assert w.bitmap(dirty, 0, 0x50000, flags=nc) == 0
    words = struct.unpack_from("<QQ", w.mem.buf, RANGES)
    assert words == ((1 << 1) | (1 << 2) | (1 << 63), 1 << 1)  # pages 1, 63, 65
    assert w.port.sent[-1] == ("d1", "report iommu 0x0 0x50000 0x1000 noclear")
    w.mem.write(RANGES, bytes(16))
    assert w.bitmap(dirty, 0, 0x50000) == 0  # NO_CLEAR kept them; this read clears
    assert struct.unpack_from("<QQ", w.mem.buf, RANGES) == ((1 << 1) | (1 << 63), 1 << 1)
    w.mem.write(RANGES, bytes(16))
    assert w.bitmap(dirty, 0, 0x50000) == 0
    assert struct.unpack_from("<QQ", w.mem.buf, RANGES) == (0, 0)
    # 2 MiB bitmap pages: one bit covers 512 pages
    w.port.dirty = {"d0": {0x41000}}
    w.map(0x50000, 0x1B0000)
    assert w.bitmap(dirty, 0, 0x200000, page=0x200000) == 0
    assert struct.unpack_from("<Q", w.mem.buf, RANGES) == (1,)
    w.port.sent.clear()
    assert w.set_dirty(dirty, flags=0) == 0
    assert w.port.sent == [("d0", "dirty iommu off"), ("d1", "dirty iommu off")]


def test_allow_iovas_restricts_automatic_iovas_only() -> None:
    w = World()

    def allow(ranges: list[tuple[int, int]], reserved: int = 0, ioas: int = 1) -> None:
        for i, r in enumerate(ranges):
            w.mem.write(0x6000 + 16 * i, m.IOVA_RANGE.pack(*r))
        w.mem.write(ARG, m.ALLOW_IOVAS.pack(24, ioas, len(ranges), reserved, 0x6000))
        w.ctx.allow_iovas(w.mem, ARG)

    assert _refused(w, allow, [(0x100000, 0x1FFFFF)], reserved=1) == errno.EOPNOTSUPP
    assert _refused(w, allow, [(0x100000, 0x1FFFFF)], ioas=9) == errno.ENOENT
    assert _refused(w, allow, [(0x200000, 0x200000)]) == errno.EINVAL  # start >= last
    assert _refused(w, allow, [(0x100000, 0x1FFFFF), (0x180000, 0x2FFFFF)]) == errno.EINVAL
    allow([(0x400000, 0x400FFF), (0x401000, 0x402FFF)])  # touching: one span
    auto = RW
    assert w.map(0, 0x2000, flags=auto, va=VA + 0x2000) == 0x400000
    assert w.map(0, 0x1000, flags=auto, va=VA) == 0x402000
    assert _refused(w, w.map, 0, 0x1000, flags=auto) == errno.ENOSPC  # the allowed space is full
    assert w.map(0x10000, 0x1000) == 0x10000  # a fixed IOVA needs no allowed range
