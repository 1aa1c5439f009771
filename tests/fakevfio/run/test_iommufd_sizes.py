"""IOMMU_HWPT_ALLOC and IOMMU_GET_HW_INFO take every struct size a kernel took.

The oracle is ``drivers/iommu/iommufd/main.c``: each ioctl's minimum is
``offsetofend`` of its ``IOCTL_OP`` last field (``__reserved`` for both: 24 and
32 bytes), and ``copy_struct_from_user`` zero-extends a smaller struct and
refuses a larger one with non-zero bytes past today's (E2BIG); the answer is
written back only up to the caller's size. ``iommufd_get_hw_info`` refuses a
non-zero ``__reserved[3]`` (bytes 29..31, EOPNOTSUPP) and ignores byte 28,
``out_max_pasid_log2``, an output. Sizes: hwpt_alloc 40 before 6.11, 48 since
(``fault_id``); hw_info 32 before 6.8, 40 since (``out_capabilities``).
"""

from __future__ import annotations

import errno
import struct

import pytest

from fakevfio._run import _iommufd as m
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

ARG = 0x1000
DEV = 9


class Mem:
    def __init__(self) -> None:
        self.buf = bytearray(0x4000)

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.buf[addr : addr + size])

    def write(self, addr: int, data: bytes) -> None:
        self.buf[addr : addr + len(data)] = data


def _errno(fn: object, *args: object) -> int:
    with pytest.raises(IoctlError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno


def _hwpt(size: int, tail: bytes = b"", flags: int = 0) -> tuple[Mem, m.Context]:
    mem, ctx = Mem(), m.Context()
    ctx.ioas[1] = m.Ioas()
    full = uapi.IOMMU_HWPT_ALLOC_STRUCT.pack(size, flags, DEV, 1, 0, 0, 0, 0, 0, 0, 0)
    mem.buf[ARG : ARG + 64] = b"\xee" * 64  # what the caller has past its struct
    mem.write(ARG, full[:size] + tail)
    return mem, ctx


@pytest.mark.parametrize("size", [24, 40, 48])
def test_hwpt_alloc_takes_the_minimum_the_6_10_and_the_current_size(size: int) -> None:
    mem, ctx = _hwpt(size)
    ctx.hwpt_alloc(mem, ARG, {DEV}, 42)
    assert struct.unpack_from("<I", mem.buf, ARG + 16)[0] == 42  # out_hwpt_id
    assert mem.buf[ARG + size : ARG + 64] == b"\xee" * (64 - size)  # nothing past its size


def test_hwpt_alloc_sizes_the_kernel_refuses() -> None:
    mem, ctx = _hwpt(23)
    assert _errno(ctx.hwpt_alloc, mem, ARG, {DEV}, 42) == errno.EINVAL
    mem, ctx = _hwpt(56, tail=bytes(8))
    ctx.hwpt_alloc(mem, ARG, {DEV}, 42)  # a zero tail is fine
    mem, ctx = _hwpt(56, tail=b"\x01" + bytes(7))
    assert _errno(ctx.hwpt_alloc, mem, ARG, {DEV}, 42) == errno.E2BIG
    mem, ctx = _hwpt(40, flags=uapi.IOMMU_HWPT_FAULT_ID_VALID)  # fault_id 0: no such object
    assert _errno(ctx.hwpt_alloc, mem, ARG, {DEV}, 42) == errno.ENOENT
    assert 42 not in ctx.hwpts


def _hw_info(size: int, patch: dict[int, int] | None = None, tail: bytes = b"") -> Mem:
    mem = Mem()
    mem.buf[ARG : ARG + 64] = b"\xee" * 64
    raw = bytearray(uapi.IOMMU_HW_INFO_STRUCT.pack(size, 0, DEV, 0, 0, 0, 0, 0))
    for offset, value in (patch or {}).items():
        raw[offset] = value
    mem.write(ARG, bytes(raw[:size]) + tail)
    return mem


def test_hw_info_sizes_reserved_bytes_and_the_pasid_output() -> None:
    assert _errno(m.hw_info, _hw_info(31), ARG, {DEV}) == errno.EINVAL
    old = _hw_info(32, {28: 5})  # byte 28 in is ignored: an output
    m.hw_info(old, ARG, {DEV})
    assert old.buf[ARG + 28] == 0  # out_max_pasid_log2: no PASID
    assert old.buf[ARG + 32 : ARG + 40] == b"\xee" * 8  # no out_capabilities for a 6.7 caller
    new = _hw_info(40)
    m.hw_info(new, ARG, {DEV})
    caps = uapi.IOMMU_HW_INFO_STRUCT.offsets()["out_capabilities"][0]
    assert struct.unpack_from("<Q", new.buf, ARG + caps)[0] == uapi.IOMMU_HW_CAP_DIRTY_TRACKING
    m.hw_info(_hw_info(48, tail=bytes(8)), ARG, {DEV})
    assert _errno(m.hw_info, _hw_info(48, tail=b"\x01" + bytes(7)), ARG, {DEV}) == errno.E2BIG
    for byte in (29, 30, 31):
        assert _errno(m.hw_info, _hw_info(40, {byte: 1}), ARG, {DEV}) == errno.EOPNOTSUPP
