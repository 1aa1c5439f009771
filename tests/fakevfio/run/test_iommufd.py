"""The iommufd object model behind ``fakevfio run`` (what QEMU's iommufd backend issues)."""

from __future__ import annotations

import errno
import struct

import pytest

from fakevfio._run import _iommufd as m
from fakevfio.errors import IoctlError

ARG = 0x1000
RANGES = 0x8000


class Mem:
    """A flat fake of the caller's memory."""

    def __init__(self) -> None:
        self.buf = bytearray(0x10000)

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.buf[addr : addr + size])

    def write(self, addr: int, data: bytes) -> None:
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
