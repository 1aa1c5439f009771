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
"""

from __future__ import annotations

import errno
import struct
from typing import Protocol

import attrs

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


class IommufdError(Exception):
    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(err, why)
        self.errno = err
        self.why = why


class Memory(Protocol):
    """Access to the caller's memory (the supervisor's _read/_write of one request)."""

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
                raise IommufdError(errno.EBUSY, f"HWPT {obj} has attached devices")
            del self.hwpts[obj]
            return
        if obj in self.ioas:
            if obj in attached or any(h.ioas == obj for h in self.hwpts.values()):
                raise IommufdError(errno.EBUSY, f"IOAS {obj} is in use")
            del self.ioas[obj]
            return
        raise IommufdError(errno.ENOENT, f"no object {obj}")

    # -- ioctls ----------------------------------------------------------------------------
    def ioas_map(self, mem: Memory, arg: int) -> int:
        raw = mem.read(arg, IOAS_MAP.size)
        size, flags, ioas_id, reserved, user_va, length, iova = IOAS_MAP.unpack(raw)
        if size < IOAS_MAP.size:
            raise IommufdError(errno.EINVAL, "size < 40")
        if reserved or flags & ~_MAP_FLAGS:
            raise IommufdError(errno.EOPNOTSUPP, "unknown flags or reserved field set")
        ioas = self._ioas(ioas_id)
        if not length or user_va + length > _U64_MAX or (
            flags & IOMMU_IOAS_MAP_FIXED_IOVA and iova + length - 1 > IOVA_LAST
        ):
            raise IommufdError(errno.EOVERFLOW if length else errno.EINVAL, "bad length")
        if flags & IOMMU_IOAS_MAP_FIXED_IOVA:
            if iova % IOVA_ALIGNMENT or length % IOVA_ALIGNMENT:
                raise IommufdError(errno.EINVAL, "iova or length not aligned")
            if ioas.overlaps(iova, length):
                raise IommufdError(errno.EEXIST, f"iova 0x{iova:x} is already mapped")
        else:
            iova = ioas.free_iova(length)
        mem.write(arg + 32, struct.pack("<Q", iova))
        ioas.maps[iova] = (length, user_va, flags)
        return 0

    def ioas_unmap(self, mem: Memory, arg: int) -> int:
        size, ioas_id, iova, length = IOAS_UNMAP.unpack(mem.read(arg, IOAS_UNMAP.size))
        if size < IOAS_UNMAP.size:
            raise IommufdError(errno.EINVAL, "size < 24")
        ioas = self._ioas(ioas_id)
        if iova == 0 and length == _U64_MAX:
            gone = list(ioas.maps)
        else:
            if not length or iova + length - 1 > _U64_MAX:
                raise IommufdError(errno.EINVAL if not length else errno.EOVERFLOW, "bad range")
            end = iova + length
            gone = []
            for a, (ln, _va, _f) in ioas.maps.items():
                if a < end and iova < a + ln:
                    if a < iova or a + ln > end:
                        raise IommufdError(errno.EINVAL, "unmap would split a mapping")
                    gone.append(a)
        if not gone:
            raise IommufdError(errno.ENOENT, "nothing mapped there")
        total = sum(ioas.maps[a][0] for a in gone)
        mem.write(arg + 16, struct.pack("<Q", total))
        for a in gone:
            del ioas.maps[a]
        return 0

    def iova_ranges(self, mem: Memory, arg: int) -> int:
        raw = mem.read(arg, IOAS_IOVA_RANGES.size)
        size, ioas_id, num, reserved, ptr, _align = IOAS_IOVA_RANGES.unpack(raw)
        if size < IOAS_IOVA_RANGES.size:
            raise IommufdError(errno.EINVAL, "size < 32")
        if reserved:
            raise IommufdError(errno.EOPNOTSUPP, "reserved field set")
        self._ioas(ioas_id)
        ranges = [(0, IOVA_LAST)]
        if num >= len(ranges):
            mem.write(ptr, b"".join(IOVA_RANGE.pack(*r) for r in ranges))
        mem.write(arg, IOAS_IOVA_RANGES.pack(size, ioas_id, len(ranges), 0, ptr,
                                             IOVA_ALIGNMENT))
        if num < len(ranges):
            raise IommufdError(errno.EMSGSIZE, "range array too short")
        return 0

    def hwpt_alloc(self, mem: Memory, arg: int, dev_ids: set[int], new_id: int) -> int:
        raw = mem.read(arg, HWPT_ALLOC.size)
        size, flags, dev_id, pt_id, _out, reserved, data_type, data_len, uptr = (
            HWPT_ALLOC.unpack(raw))
        if size < HWPT_ALLOC.size:
            raise IommufdError(errno.EINVAL, "size < 40")
        if reserved or flags & ~(IOMMU_HWPT_ALLOC_NEST_PARENT | IOMMU_HWPT_ALLOC_DIRTY_TRACKING):
            raise IommufdError(errno.EOPNOTSUPP, "unsupported flags")
        if flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING:
            raise IommufdError(errno.EOPNOTSUPP, "no IOMMU dirty tracking")
        if data_type != IOMMU_HWPT_DATA_NONE or data_len or uptr:
            raise IommufdError(errno.EOPNOTSUPP, "nested (user-managed) HWPTs unsupported")
        if dev_id not in dev_ids:
            raise IommufdError(errno.ENOENT, f"no device {dev_id}")
        if pt_id not in self.ioas:
            raise IommufdError(errno.ENOENT if pt_id not in self.hwpts else errno.EINVAL,
                               f"no IOAS {pt_id}")
        mem.write(arg + 16, struct.pack("<I", new_id))
        self.hwpts[new_id] = Hwpt(ioas=pt_id, dev_id=dev_id, flags=flags)
        return 0

    def option(self, mem: Memory, arg: int) -> int:
        size, option_id, op, reserved, object_id, val = OPTION.unpack(mem.read(arg, OPTION.size))
        if size < OPTION.size:
            raise IommufdError(errno.EINVAL, "size < 24")
        if reserved or op not in (IOMMU_OPTION_OP_SET, IOMMU_OPTION_OP_GET):
            raise IommufdError(errno.EOPNOTSUPP, "bad op")
        if option_id == IOMMU_OPTION_RLIMIT_MODE:
            if object_id:
                raise IommufdError(errno.EINVAL, "global option, object_id must be 0")
            if op == IOMMU_OPTION_OP_GET:
                mem.write(arg + 16, struct.pack("<Q", 0))
            elif val > 1:
                raise IommufdError(errno.EINVAL, "value")
            return 0
        if option_id == IOMMU_OPTION_HUGE_PAGES:
            ioas = self._ioas(object_id)
            if op == IOMMU_OPTION_OP_GET:
                mem.write(arg + 16, struct.pack("<Q", ioas.huge_pages))
            elif val > 1:
                raise IommufdError(errno.EINVAL, "value")
            else:
                ioas.huge_pages = val
            return 0
        raise IommufdError(errno.EOPNOTSUPP, f"option {option_id}")

    def _ioas(self, ioas_id: int) -> Ioas:
        if ioas_id not in self.ioas:
            raise IommufdError(errno.ENOENT, f"no IOAS {ioas_id}")
        return self.ioas[ioas_id]


def hw_info(mem: Memory, arg: int, dev_ids: set[int]) -> int:
    """IOMMU_GET_HW_INFO: no vendor data, no capabilities."""
    raw = mem.read(arg, HW_INFO_MINSZ)
    size, flags, dev_id, data_len, uptr = struct.unpack_from("<IIIIQ", raw)
    if size < HW_INFO_MINSZ:
        raise IommufdError(errno.EINVAL, "size < 32")
    if flags:
        raise IommufdError(errno.EOPNOTSUPP, "flags")
    if dev_id not in dev_ids:
        raise IommufdError(errno.ENOENT, f"no device {dev_id}")
    if data_len:
        mem.write(uptr, bytes(data_len))  # the kernel zero-fills what it does not report
    mem.write(arg + 12, struct.pack("<I", 0))  # data_len: nothing reported
    mem.write(arg + 24, struct.pack("<II", IOMMU_HW_INFO_TYPE_NONE, 0))
    if size >= HW_INFO.size:
        mem.write(arg + 32, struct.pack("<Q", 0))  # out_capabilities: no dirty tracking
    return 0
