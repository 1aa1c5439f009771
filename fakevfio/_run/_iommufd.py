"""The iommufd object model that QEMU's ``-device vfio-pci,iommufd=...`` needs.

Theory of operation
-------------------
QEMU (10.0, ``hw/vfio/iommufd.c`` and ``backends/iommufd.c``) realizes a cdev
device with: BIND_IOMMUFD, IOMMU_IOAS_ALLOC, IOMMU_GET_HW_INFO (dirty-tracking
capability), IOMMU_HWPT_ALLOC (a kernel-managed domain on the IOAS),
ATTACH_IOMMUFD_PT (the HWPT), IOMMU_IOAS_IOVA_RANGES, then IOMMU_IOAS_MAP and
IOMMU_IOAS_UNMAP for every guest RAM section, and IOMMU_DESTROY at tear-down.

Emulated devices do no DMA, so nothing is pinned or translated: this module
only keeps the *objects* the kernel would keep (IOAS, HWPT, the IOVA mappings
of each IOAS) so that ids, overlaps and unmaps get the kernel's answers
(``include/uapi/linux/iommufd.h``: ENOENT for an unknown id or an unmap that
hits nothing, EEXIST for a fixed-IOVA map over an existing one, EINVAL for an
unmap that would split a mapping, EOPNOTSUPP for unknown flags, EMSGSIZE when
the caller's range array is too short). The hardware reports
``IOMMU_HW_INFO_TYPE_NONE`` with no capabilities (no IOMMU dirty tracking), so
QEMU must rely on device dirty tracking or ``enable-migration=on``.

All structures start with ``u32 size``; ``size`` below the kernel's minimum is
EINVAL, and the output fields are written only after every check passed.
:func:`iommu_ioctl` answers an ioctl on a ``/dev/iommu`` open file with the
:class:`Context` held for it.
"""

from __future__ import annotations

import errno
import struct
from typing import TYPE_CHECKING, Protocol

import attrs

from fakevfio._run._nodes import NodeKind
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

if TYPE_CHECKING:
    from fakevfio._run._vfio import Call, Vfio

IOMMU_IOAS_MAP_FIXED_IOVA = 1 << 0
IOMMU_IOAS_MAP_WRITEABLE = 1 << 1
IOMMU_IOAS_MAP_READABLE = 1 << 2
_MAP_FLAGS = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE
IOMMU_HWPT_ALLOC_NEST_PARENT = 1 << 0
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = 1 << 1
IOMMU_HWPT_DATA_NONE = 0
IOMMU_HW_INFO_TYPE_NONE = 0

#: size, flags, ioas_id, reserved, user_va, length, iova
IOAS_MAP = struct.Struct("<IIIIQQQ")
#: size, ioas_id, iova, length
IOAS_UNMAP = struct.Struct("<IIQQ")
#: size, ioas_id, num_iovas, reserved, allowed_iovas ptr, out_iova_alignment
IOAS_IOVA_RANGES = struct.Struct("<IIIIQQ")
IOVA_RANGE = struct.Struct("<QQ")
#: size, flags, dev_id, pt_id, out_hwpt_id, reserved, data_type, data_len, data_uptr
HWPT_ALLOC = struct.Struct("<IIIIIIIIQ")
#: size, flags, dev_id, data_len, data_uptr, out_data_type, reserved, out_capabilities
HW_INFO = struct.Struct("<IIIIQIIQ")
HW_INFO_MINSZ = 32  # through __reserved (out_capabilities came later)
#: size, option_id, op, reserved, object_id, val64
OPTION = struct.Struct("<IIHHIQ")
IOMMU_OPTION_RLIMIT_MODE = 0
IOMMU_OPTION_HUGE_PAGES = 1
IOMMU_OPTION_OP_SET = 0
IOMMU_OPTION_OP_GET = 1

#: The IOVA space an emulated device can reach (a 64-bit device behind no IOMMU limits).
IOVA_LAST = (1 << 64) - 1
IOVA_ALIGNMENT = 4096
_U64_MAX = (1 << 64) - 1


class Memory(Protocol):
    """Access to the caller's memory; both raise IoctlError(EFAULT) like the kernel."""

    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


@attrs.define
class Ioas:
    #: iova -> (length, user_va, flags)
    maps: dict[int, tuple[int, int, int]] = attrs.Factory(dict)
    huge_pages: int = 1

    def overlaps(self, iova: int, length: int) -> bool:
        end = iova + length
        return any(a < end and iova < a + ln for a, (ln, _va, _f) in self.maps.items())

    def free_iova(self, length: int) -> int:
        top = max((a + ln for a, (ln, _va, _f) in self.maps.items()), default=0)
        return -(-top // IOVA_ALIGNMENT) * IOVA_ALIGNMENT


@attrs.define
class Hwpt:
    ioas: int
    dev_id: int
    flags: int


@attrs.define
class Context:
    """The objects of one iommufd open file (``/dev/iommu``)."""

    ioas: dict[int, Ioas] = attrs.Factory(dict)
    hwpts: dict[int, Hwpt] = attrs.Factory(dict)

    def has_pt(self, pt_id: int) -> bool:
        return pt_id in self.ioas or pt_id in self.hwpts

    def destroy(self, obj: int, attached: set[int]) -> None:
        if obj in self.hwpts:
            if obj in attached:
                raise IoctlError(errno.EBUSY, f"HWPT {obj} has attached devices")
            del self.hwpts[obj]
            return
        if obj in self.ioas:
            if obj in attached or any(h.ioas == obj for h in self.hwpts.values()):
                raise IoctlError(errno.EBUSY, f"IOAS {obj} is in use")
            del self.ioas[obj]
            return
        raise IoctlError(errno.ENOENT, f"no object {obj}")

    # -- ioctls ----------------------------------------------------------------------------
    def ioas_map(self, mem: Memory, arg: int) -> int:
        raw = mem.read(arg, IOAS_MAP.size)
        size, flags, ioas_id, reserved, user_va, length, iova = IOAS_MAP.unpack(raw)
        if size < IOAS_MAP.size:
            raise IoctlError(errno.EINVAL, "size < 40")
        if reserved or flags & ~_MAP_FLAGS:
            raise IoctlError(errno.EOPNOTSUPP, "unknown flags or reserved field set")
        ioas = self._ioas(ioas_id)
        if (
            not length
            or user_va + length > _U64_MAX
            or (flags & IOMMU_IOAS_MAP_FIXED_IOVA and iova + length - 1 > IOVA_LAST)
        ):
            raise IoctlError(errno.EOVERFLOW if length else errno.EINVAL, "bad length")
        if flags & IOMMU_IOAS_MAP_FIXED_IOVA:
            if iova % IOVA_ALIGNMENT or length % IOVA_ALIGNMENT:
                raise IoctlError(errno.EINVAL, "iova or length not aligned")
            if ioas.overlaps(iova, length):
                raise IoctlError(errno.EEXIST, f"iova 0x{iova:x} is already mapped")
        else:
            iova = ioas.free_iova(length)
        mem.write(arg + 32, struct.pack("<Q", iova))
        ioas.maps[iova] = (length, user_va, flags)
        return 0

    def ioas_unmap(self, mem: Memory, arg: int) -> int:
        size, ioas_id, iova, length = IOAS_UNMAP.unpack(mem.read(arg, IOAS_UNMAP.size))
        if size < IOAS_UNMAP.size:
            raise IoctlError(errno.EINVAL, "size < 24")
        ioas = self._ioas(ioas_id)
        if iova == 0 and length == _U64_MAX:
            gone = list(ioas.maps)
        else:
            if not length or iova + length - 1 > _U64_MAX:
                raise IoctlError(errno.EINVAL if not length else errno.EOVERFLOW, "bad range")
            end = iova + length
            gone = []
            for a, (ln, _va, _f) in ioas.maps.items():
                if a < end and iova < a + ln:
                    if a < iova or a + ln > end:
                        raise IoctlError(errno.EINVAL, "unmap would split a mapping")
                    gone.append(a)
        if not gone:
            raise IoctlError(errno.ENOENT, "nothing mapped there")
        total = sum(ioas.maps[a][0] for a in gone)
        mem.write(arg + 16, struct.pack("<Q", total))
        for a in gone:
            del ioas.maps[a]
        return 0

    def iova_ranges(self, mem: Memory, arg: int) -> int:
        raw = mem.read(arg, IOAS_IOVA_RANGES.size)
        size, ioas_id, num, reserved, ptr, _align = IOAS_IOVA_RANGES.unpack(raw)
        if size < IOAS_IOVA_RANGES.size:
            raise IoctlError(errno.EINVAL, "size < 32")
        if reserved:
            raise IoctlError(errno.EOPNOTSUPP, "reserved field set")
        self._ioas(ioas_id)
        ranges = [(0, IOVA_LAST)]
        if num >= len(ranges):
            mem.write(ptr, b"".join(IOVA_RANGE.pack(*r) for r in ranges))
        mem.write(arg, IOAS_IOVA_RANGES.pack(size, ioas_id, len(ranges), 0, ptr, IOVA_ALIGNMENT))
        if num < len(ranges):
            raise IoctlError(errno.EMSGSIZE, "range array too short")
        return 0

    def hwpt_alloc(self, mem: Memory, arg: int, dev_ids: set[int], new_id: int) -> int:
        raw = mem.read(arg, HWPT_ALLOC.size)
        size, flags, dev_id, pt_id, _out, reserved, data_type, data_len, uptr = HWPT_ALLOC.unpack(
            raw
        )
        if size < HWPT_ALLOC.size:
            raise IoctlError(errno.EINVAL, "size < 40")
        if reserved or flags & ~(IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING):
            raise IoctlError(errno.EOPNOTSUPP, "unsupported flags")
        if flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING:
            raise IoctlError(errno.EOPNOTSUPP, "no IOMMU dirty tracking")
        if data_type != IOMMU_HWPT_DATA_NONE or data_len or uptr:
            raise IoctlError(errno.EOPNOTSUPP, "nested (user-managed) HWPTs unsupported")
        if dev_id not in dev_ids:
            raise IoctlError(errno.ENOENT, f"no device {dev_id}")
        if pt_id not in self.ioas:
            raise IoctlError(
                errno.ENOENT if pt_id not in self.hwpts else errno.EINVAL, f"no IOAS {pt_id}"
            )
        mem.write(arg + 16, struct.pack("<I", new_id))
        self.hwpts[new_id] = Hwpt(ioas=pt_id, dev_id=dev_id, flags=flags)
        return 0

    def option(self, mem: Memory, arg: int) -> int:
        size, option_id, op, reserved, object_id, val = OPTION.unpack(mem.read(arg, OPTION.size))
        if size < OPTION.size:
            raise IoctlError(errno.EINVAL, "size < 24")
        if reserved or op not in (IOMMU_OPTION_OP_SET, IOMMU_OPTION_OP_GET):
            raise IoctlError(errno.EOPNOTSUPP, "bad op")
        if option_id == IOMMU_OPTION_RLIMIT_MODE:
            if object_id:
                raise IoctlError(errno.EINVAL, "global option, object_id must be 0")
            if op == IOMMU_OPTION_OP_GET:
                mem.write(arg + 16, struct.pack("<Q", 0))
            elif val > 1:
                raise IoctlError(errno.EINVAL, "value")
            return 0
        if option_id == IOMMU_OPTION_HUGE_PAGES:
            ioas = self._ioas(object_id)
            if op == IOMMU_OPTION_OP_GET:
                mem.write(arg + 16, struct.pack("<Q", ioas.huge_pages))
            elif val > 1:
                raise IoctlError(errno.EINVAL, "value")
            else:
                ioas.huge_pages = val
            return 0
        raise IoctlError(errno.EOPNOTSUPP, f"option {option_id}")

    def _ioas(self, ioas_id: int) -> Ioas:
        if ioas_id not in self.ioas:
            raise IoctlError(errno.ENOENT, f"no IOAS {ioas_id}")
        return self.ioas[ioas_id]


def hw_info(mem: Memory, arg: int, dev_ids: set[int]) -> int:
    """IOMMU_GET_HW_INFO: no vendor data, no capabilities."""
    raw = mem.read(arg, HW_INFO_MINSZ)
    size, flags, dev_id, data_len, uptr = struct.unpack_from("<IIIIQ", raw)
    if size < HW_INFO_MINSZ:
        raise IoctlError(errno.EINVAL, "size < 32")
    if flags:
        raise IoctlError(errno.EOPNOTSUPP, "flags")
    if dev_id not in dev_ids:
        raise IoctlError(errno.ENOENT, f"no device {dev_id}")
    if data_len:
        mem.write(uptr, bytes(data_len))  # the kernel zero-fills what it does not report
    mem.write(arg + 12, struct.pack("<I", 0))  # data_len: nothing reported
    mem.write(arg + 24, struct.pack("<II", IOMMU_HW_INFO_TYPE_NONE, 0))
    if size >= HW_INFO.size:
        mem.write(arg + 32, struct.pack("<Q", 0))  # out_capabilities: no dirty tracking
    return 0


# -- the ioctls of a /dev/iommu open file ---------------------------------------------------------
_U32 = struct.Struct("<I")
_CONTEXT_IOCTLS = {
    uapi.IOMMU_IOAS_MAP: Context.ioas_map,
    uapi.IOMMU_IOAS_UNMAP: Context.ioas_unmap,
    uapi.IOMMU_IOAS_IOVA_RANGES: Context.iova_ranges,
    uapi.IOMMU_OPTION: Context.option,
}


def iommu_ioctl(vfio: Vfio, call: Call, ino: int) -> int:
    """An ioctl on the caller's ``/dev/iommu`` file (inode ``ino``)."""
    r = call.request
    if r == uapi.VFIO_GET_API_VERSION:
        return uapi.VFIO_API_VERSION
    if r == uapi.VFIO_CHECK_EXTENSION:
        return int(call.arg in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU))
    if r == uapi.IOMMU_IOAS_ALLOC:
        raw = call.mem.read(call.arg, uapi.IOMMU_IOAS_ALLOC_STRUCT.size)
        size, flags, _ = uapi.IOMMU_IOAS_ALLOC_STRUCT.unpack(raw)
        if size < uapi.IOMMU_IOAS_ALLOC_STRUCT.size:
            raise IoctlError(errno.EINVAL, "size < 12")
        if flags:
            raise IoctlError(errno.EOPNOTSUPP, "flags must be 0")
        call.mem.write(call.arg + 8, _U32.pack(0))  # probe before the side effect
        entry = vfio.entry(call, call.fd, ino, NodeKind.IOMMU, None)
        ioas = vfio.take_id()
        entry.iommufd_ctx.ioas[ioas] = Ioas()
        call.mem.write(call.arg + 8, _U32.pack(ioas))
        return 0
    if r == uapi.IOMMU_DESTROY:
        size, obj = uapi.IOMMU_DESTROY_STRUCT.unpack(
            call.mem.read(call.arg, uapi.IOMMU_DESTROY_STRUCT.size)
        )
        if size < uapi.IOMMU_DESTROY_STRUCT.size:
            raise IoctlError(errno.EINVAL, "size < 8")
        found = vfio.find(call, call.fd, ino)
        if found is None:
            raise IoctlError(errno.ENOENT, f"no object {obj}")
        attached = {f.pt_id for f in vfio.files.files if f.iommufd is found and f.pt_id}
        found.iommufd_ctx.destroy(obj, attached)
        return 0
    if r not in _CONTEXT_IOCTLS and r not in (uapi.IOMMU_GET_HW_INFO, uapi.IOMMU_HWPT_ALLOC):
        raise IoctlError(errno.ENOTTY)
    found = vfio.find(call, call.fd, ino)
    ctx = found.iommufd_ctx if found is not None else Context()
    dev_ids = {
        f.devid
        for f in vfio.files.files
        if f.kind is NodeKind.CDEV and f.bound and found is not None and f.iommufd is found
    }
    if r == uapi.IOMMU_GET_HW_INFO:
        return hw_info(call.mem, call.arg, dev_ids)
    if r == uapi.IOMMU_HWPT_ALLOC:
        result = ctx.hwpt_alloc(call.mem, call.arg, dev_ids, vfio.next_id)
        vfio.take_id()  # the id is used only once the HWPT exists
        return result
    return _CONTEXT_IOCTLS[r](ctx, call.mem, call.arg)
