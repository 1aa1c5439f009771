"""The IOMMU side of ``fakevfio run``: iommufd (IOAS, HWPT, dirty tracking) and type1 containers.

Theory of operation
-------------------
QEMU (10.0, ``hw/vfio/iommufd.c`` and ``backends/iommufd.c``) realizes a cdev
device with: BIND_IOMMUFD, IOMMU_IOAS_ALLOC, IOMMU_GET_HW_INFO (dirty-tracking
capability), IOMMU_HWPT_ALLOC (a kernel-managed domain on the IOAS, with
IOMMU_HWPT_ALLOC_DIRTY_TRACKING when the capability is there),
ATTACH_IOMMUFD_PT (the HWPT), IOMMU_IOAS_IOVA_RANGES, then IOMMU_IOAS_MAP and
IOMMU_IOAS_UNMAP for every guest RAM section; for a migration
IOMMU_HWPT_SET_DIRTY_TRACKING and IOMMU_HWPT_GET_DIRTY_BITMAP; IOMMU_DESTROY at
tear-down. This module keeps the objects the kernel keeps (IOAS with its areas,
HWPT, the attachment of each bound device) and answers with the kernel's checks
(``drivers/iommu/iommufd/ioas.c``, ``io_pagetable.c``, ``hw_pagetable.c``,
``main.c``). The devices are the IOMMU's clients: every area is pushed into the
``dma`` file of each device attached to the IOAS (through any HWPT), and the
dirty bitmap of a HWPT is the OR of the ``report iommu`` of its devices.

Rule 1: every structure starts with ``u32 size``; below the kernel's minimum
        (``offsetofend`` of the last field the ioctl requires) is EINVAL, a
        larger struct must have zeros past the fields we know (E2BIG, as
        ``copy_struct_from_user``), a smaller one is zero-extended, and the
        answer is written back only up to the caller's ``size``.
Rule 2: checks run in the kernel's order, and nothing changes, in the model or
        in a device, before every check passed; a device that refuses a push
        undoes the pushes already made (the ioctl fails with the device's errno).
Rule 3: the IOAS is page-granular (``iova_alignment`` 4 KiB, as with a domain
        attached): IOVA, length and user address of a map are 4 KiB aligned
        (EINVAL), a map needs READABLE or WRITEABLE (EINVAL), a fixed IOVA over
        an area is EEXIST, an automatic IOVA is the kernel's first fit
        (``iopt_alloc_iova``: from 4 KiB up, inside the IOMMU_IOAS_ALLOW_IOVAS
        ranges if any were given, aligned to the smaller of the length's power
        of two and the user address's alignment).
Rule 4: an unmap removes whole areas; one that would cut an area, or hits
        nothing, is ENOENT; unmap of iova 0 and length U64_MAX removes all (0
        even when empty). IOMMU_IOAS_COPY maps the same user pages (each source
        area's pid and address) at a new IOVA; write access to pages mapped
        read-only is EPERM.
Rule 5: a mapping belongs to the mapping process (its thread group id, the
        ``mm`` the kernel pins from) at its user address: the device's DMA
        reads and writes that memory.
Rule 6: IOMMU_GET_HW_INFO reports IOMMU_HW_CAP_DIRTY_TRACKING, no vendor data
        and out_max_pasid_log2 0 (no PASID); it takes the 32-byte struct of
        6.7, the 40-byte one of 6.8 and later (and a larger zero-tailed one), and
        refuses any flag (IOMMU_HW_INFO_FLAG_INPUT_TYPE of 6.17 too) and a
        non-zero byte of ``__reserved[3]`` with EOPNOTSUPP; a HWPT
        allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING accepts
        SET_DIRTY_TRACKING (enabling starts from a clean snapshot), one without
        it answers EOPNOTSUPP, as ``iopt_set_dirty_tracking`` does for a domain
        without dirty ops. GET_DIRTY_BITMAP checks its range as
        ``iommufd_check_iova_range`` (EOVERFLOW, EINVAL), needs the range
        covered by contiguous areas (EINVAL), only sets bits (the caller zeroes
        the bitmap), and clears what it reported unless NO_CLEAR.
Rule 7: ATTACH_IOMMUFD_PT to an IOAS attaches to an automatic HWPT (without
        dirty tracking) whose id is returned, shared by the devices of that
        IOAS and destroyed with its last device, as ``iommufd_device_auto_get_domain``.

:func:`iommu_ioctl` answers an ioctl on a ``/dev/iommu`` open file with the
:class:`Context` held for it. :class:`Type1` is the legacy container's IOMMU
(``vfio_iommu_type1.c``, its own rules in its docstring); both share
:class:`Area`, the ``dma``-file pushes (:class:`DmaPort`) and the bitmap helpers.
"""

from __future__ import annotations

import contextlib
import errno
import struct
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import attrs

from fakevfio._run._nodes import NodeKind
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

if TYPE_CHECKING:
    from fakevfio._run._vfio import Call, Vfio

IOMMU_IOAS_MAP_FIXED_IOVA = uapi.IOMMU_IOAS_MAP_FIXED_IOVA
IOMMU_IOAS_MAP_WRITEABLE = uapi.IOMMU_IOAS_MAP_WRITEABLE
IOMMU_IOAS_MAP_READABLE = uapi.IOMMU_IOAS_MAP_READABLE
_MAP_FLAGS = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE
_PROT = IOMMU_IOAS_MAP_WRITEABLE | IOMMU_IOAS_MAP_READABLE
IOMMU_HWPT_ALLOC_NEST_PARENT = uapi.IOMMU_HWPT_ALLOC_NEST_PARENT
IOMMU_HWPT_ALLOC_DIRTY_TRACKING = uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
_HWPT_FLAGS = (
    uapi.IOMMU_HWPT_ALLOC_NEST_PARENT
    | uapi.IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    | uapi.IOMMU_HWPT_FAULT_ID_VALID
    | uapi.IOMMU_HWPT_ALLOC_PASID
)
IOMMU_HWPT_DATA_NONE = uapi.IOMMU_HWPT_DATA_NONE
IOMMU_HW_INFO_TYPE_NONE = uapi.IOMMU_HW_INFO_TYPE_NONE

IOAS_MAP = uapi.IOMMU_IOAS_MAP_STRUCT
IOAS_UNMAP = uapi.IOMMU_IOAS_UNMAP_STRUCT
IOAS_COPY = uapi.IOMMU_IOAS_COPY_STRUCT
IOAS_IOVA_RANGES = uapi.IOMMU_IOAS_IOVA_RANGES_STRUCT
IOVA_RANGE = uapi.IOMMU_IOVA_RANGE
ALLOW_IOVAS = uapi.IOMMU_IOAS_ALLOW_IOVAS_STRUCT
#: Ranges one IOMMU_IOAS_ALLOW_IOVAS may give (bounded outside input; beyond: ENOMEM).
MAX_ALLOWED_IOVAS = 4096
#: size, flags, dev_id, pt_id, out_hwpt_id, __reserved, data_type, data_len, data_uptr,
#: fault_id, __reserved2 (48 bytes since 6.11, 40 before; the kernel requires 24)
HWPT_ALLOC = uapi.IOMMU_HWPT_ALLOC_STRUCT
HWPT_ALLOC_MINSZ = uapi.IOMMU_HWPT_ALLOC_MINSZ
HW_INFO = uapi.IOMMU_HW_INFO_STRUCT
HW_INFO_MINSZ = uapi.IOMMU_HW_INFO_MINSZ
SET_DIRTY = uapi.IOMMU_HWPT_SET_DIRTY_TRACKING_STRUCT
GET_DIRTY = uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_STRUCT
OPTION = uapi.IOMMU_OPTION_STRUCT
IOMMU_OPTION_RLIMIT_MODE = uapi.IOMMU_OPTION_RLIMIT_MODE
IOMMU_OPTION_HUGE_PAGES = uapi.IOMMU_OPTION_HUGE_PAGES
IOMMU_OPTION_OP_SET = uapi.IOMMU_OPTION_OP_SET
IOMMU_OPTION_OP_GET = uapi.IOMMU_OPTION_OP_GET

#: The IOVA space an emulated device can reach (a 64-bit device behind no IOMMU limits).
IOVA_LAST = (1 << 64) - 1
IOVA_ALIGNMENT = 4096
PAGE_SIZE = 4096
_U64_MAX = (1 << 64) - 1
ULONG_MAX = _U64_MAX
#: The largest struct tail read to check it is zero (copy_struct_from_user); beyond: E2BIG.
MAX_STRUCT_TAIL = 1 << 16


class Memory(Protocol):
    """Access to the caller's memory; both raise IoctlError(EFAULT) like the kernel."""

    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class DmaPort(Protocol):
    """The ``devices/NAME/dma`` files (the supervisor writes them on the mount; tests record).

    ``send`` writes one command (IoctlError with the file's errno on refusal);
    ``report`` writes one ``report ...`` command and returns its reply, the bitmap.
    """

    def send(self, device: str, command: str) -> None: ...

    def report(self, device: str, command: str) -> bytes: ...


# -- shared by iommufd and type1 -----------------------------------------------------------------
@attrs.frozen(kw_only=True)
class Area:
    """One IOVA mapping: ``length`` bytes at ``iova`` are process ``pid``'s memory at ``vaddr``."""

    iova: int
    length: int
    pid: int
    vaddr: int
    readable: bool
    writeable: bool
    #: the pages may be mapped writeable (IOAS_COPY of a read-only map: EPERM)
    pages_writable: bool = True

    @property
    def last(self) -> int:
        return self.iova + self.length - 1

    @property
    def perm(self) -> str:
        return ("r" if self.readable else "") + ("w" if self.writeable else "")

    def map_command(self) -> str:
        return f"map 0x{self.iova:x} 0x{self.length:x} {self.pid} 0x{self.vaddr:x} {self.perm}"

    def unmap_command(self) -> str:
        return f"unmap 0x{self.iova:x} 0x{self.length:x}"


def push_all(port: DmaPort, devices: Iterable[str], commands: list[str], undo: list[str]) -> None:
    """Send ``commands`` to every device; on a refusal send ``undo`` to the ones done, re-raise."""
    done: list[str] = []
    for dev in devices:
        try:
            for command in commands:
                port.send(dev, command)
        except IoctlError:
            for back in [*done, dev]:
                for command in undo:
                    with contextlib.suppress(IoctlError):
                        port.send(back, command)
            raise
        done.append(dev)


def bitmap_bytes(nbits: int) -> int:
    """Bytes of a bitmap of ``nbits`` bits in u64 words (the kernel's DIRTY_BITMAP_BYTES)."""
    return (nbits + 63) // 64 * 8


def reported_bits(port: DmaPort, devices: Iterable[str], command: str, nbits: int) -> int:
    """The OR of the devices' bitmaps for ``command``, as an int (bit n = page n)."""
    bits = 0
    for dev in devices:
        reply = port.report(dev, command)
        bits |= int.from_bytes(reply[: bitmap_bytes(nbits)], "little")
    return bits & ((1 << nbits) - 1)


def ffs(value: int) -> int:
    """The index of the lowest set bit (``__ffs``); ``value`` must not be 0."""
    return (value & -value).bit_length() - 1


def read_struct(mem: Memory, arg: int, layout: struct.Struct, min_size: int) -> tuple[int, bytes]:
    """The caller's ``size`` and its struct, zero-extended to ``layout`` (Rule 1)."""
    (size,) = struct.unpack("<I", mem.read(arg, 4))
    if size < min_size:
        raise IoctlError(errno.EINVAL, f"size {size} < {min_size}: the struct is too old")
    raw = mem.read(arg, min(size, layout.size))
    if size > layout.size:
        tail = size - layout.size
        if tail > MAX_STRUCT_TAIL:
            raise IoctlError(errno.E2BIG, f"size {size}: struct tail past {layout.size} too long")
        if any(mem.read(arg + layout.size, tail)):
            raise IoctlError(
                errno.E2BIG, f"size {size}: bytes past {layout.size} (unknown fields) must be 0"
            )
    return size, raw + bytes(layout.size - len(raw))


def respond(mem: Memory, arg: int, size: int, data: bytes) -> None:
    """Write the answer back, at most the caller's ``size`` bytes (iommufd_ucmd_respond)."""
    mem.write(arg, data[: min(size, len(data))])


# -- iommufd objects -----------------------------------------------------------------------------
@attrs.define
class Ioas:
    """An IO address space: its areas by IOVA."""

    areas: dict[int, Area] = attrs.Factory(dict)
    huge_pages: int = 1
    iova_alignment: int = IOVA_ALIGNMENT
    #: IOMMU_IOAS_ALLOW_IOVAS: the (start, last) ranges automatic IOVAs come from (empty: all)
    allowed: list[tuple[int, int]] = attrs.Factory(list)

    def sorted_areas(self) -> list[Area]:
        return [self.areas[a] for a in sorted(self.areas)]

    def overlapping(self, iova: int, last: int) -> list[Area]:
        return [a for a in self.sorted_areas() if a.iova <= last and iova <= a.last]

    def alloc_iova(self, uptr: int, length: int) -> int:
        """``iopt_alloc_iova``: the first hole that fits, aligned as the kernel aligns it."""
        page_offset = uptr % PAGE_SIZE
        if length == 0 or length >= ULONG_MAX // 2:
            raise IoctlError(errno.EOVERFLOW, f"length 0x{length:x} is too large to allocate")
        pow2 = 1 << (length - 1).bit_length()
        align = pow2 if not uptr else min(pow2, 1 << ffs(uptr))
        if align < self.iova_alignment:
            raise IoctlError(errno.EINVAL, f"user address 0x{uptr:x} below the IOAS alignment")
        lo, hi = PAGE_SIZE, ULONG_MAX - PAGE_SIZE
        merged: list[tuple[int, int]] = []  # touching ranges are one span of the interval tree
        for a, b in self.allowed:
            if merged and merged[-1][1] + 1 == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        spans = [(max(a, lo), min(b, hi)) for a, b in merged] if merged else [(lo, hi)]
        for span_start, span_last in spans:
            start = (-(-span_start // align) * align) | page_offset
            if span_start > span_last or start > span_last or span_last - start < length - 1:
                continue
            hole = start
            for area in [*self.sorted_areas(), None]:
                hole_last = span_last if area is None else min(area.iova - 1, span_last)
                if area is not None and area.last < hole:
                    continue
                if hole <= hole_last and hole_last - hole >= length - 1:
                    cand = (-(-hole // align) * align) | page_offset
                    if cand <= hole_last and hole_last - cand >= length - 1:
                        return cand
                if area is None or area.iova > span_last:
                    break
                hole = max(hole, area.last + 1)
        raise IoctlError(errno.ENOSPC, f"no free IOVA range of 0x{length:x} bytes")


@attrs.define
class Hwpt:
    """A paging HWPT (an IOMMU domain) on an IOAS."""

    ioas: int
    dev_id: int
    flags: int
    auto: bool = False
    dirty: bool = False  # SET_DIRTY_TRACKING enabled

    @property
    def dirty_capable(self) -> bool:
        return bool(self.flags & IOMMU_HWPT_ALLOC_DIRTY_TRACKING)


@attrs.define
class Attachment:
    """A bound device of this iommufd and the HWPT it is attached to (None: detached)."""

    device: str
    hwpt: int | None = None


@attrs.define
class Context:
    """The objects of one iommufd open file (``/dev/iommu``)."""

    ioas: dict[int, Ioas] = attrs.Factory(dict)
    hwpts: dict[int, Hwpt] = attrs.Factory(dict)
    #: dev_id -> attachment, for every device bound to this iommufd
    devices: dict[int, Attachment] = attrs.Factory(dict)

    def has_pt(self, pt_id: int) -> bool:
        return pt_id in self.ioas or pt_id in self.hwpts

    def ioas_devices(self, ioas_id: int) -> list[str]:
        """The devices attached to IOAS ``ioas_id`` through any HWPT."""
        return [
            a.device
            for a in self.devices.values()
            if a.hwpt is not None and self.hwpts[a.hwpt].ioas == ioas_id
        ]

    def hwpt_devices(self, hwpt_id: int) -> list[str]:
        return [a.device for a in self.devices.values() if a.hwpt == hwpt_id]

    def destroy(self, obj: int) -> None:
        attached = {a.hwpt for a in self.devices.values()}
        if obj in self.hwpts:
            if obj in attached or self.hwpts[obj].auto:
                raise IoctlError(errno.EBUSY, f"HWPT {obj} has attached devices")
            del self.hwpts[obj]
            return
        if obj in self.ioas:
            if any(h.ioas == obj for h in self.hwpts.values()):
                raise IoctlError(errno.EBUSY, f"IOAS {obj} is in use by a HWPT")
            del self.ioas[obj]
            return
        raise IoctlError(errno.ENOENT, f"no object {obj}")

    # -- attach / detach (the cdev ioctls) ---------------------------------------------------
    def bind(self, dev_id: int, device: str) -> None:
        self.devices[dev_id] = Attachment(device)

    def attach(self, port: DmaPort, dev_id: int, pt_id: int, new_id: Callable[[], int]) -> int:
        """ATTACH_IOMMUFD_PT (a replace if attached): the id of the HWPT attached now (Rule 7)."""
        att = self.devices[dev_id]
        if pt_id in self.hwpts:
            hwpt_id, ioas_id = pt_id, self.hwpts[pt_id].ioas
        elif pt_id in self.ioas:
            auto = [i for i, h in self.hwpts.items() if h.auto and h.ioas == pt_id]
            hwpt_id, ioas_id = (auto[0] if auto else 0), pt_id
        else:
            raise IoctlError(errno.ENOENT, f"ATTACH_IOMMUFD_PT: no IOAS or HWPT {pt_id}")
        if hwpt_id and att.hwpt == hwpt_id:
            return hwpt_id
        old = self.hwpts[att.hwpt] if att.hwpt is not None else None
        dirty = bool(hwpt_id) and self.hwpts[hwpt_id].dirty
        if old is not None and old.ioas == ioas_id:
            if old.dirty != dirty:  # the same mappings: only the tracker changes
                port.send(att.device, f"dirty iommu {'on' if dirty else 'off'}")
        else:
            if old is not None and old.dirty:
                _quiet_send(port, att.device, "dirty iommu off")
            commands = [a.map_command() for a in self.ioas[ioas_id].sorted_areas()]
            if old is not None:
                commands.insert(0, "unmap all")
            if dirty:
                commands.append("dirty iommu on")
            push_all(port, [att.device], commands, ["unmap all"])
        if att.hwpt is not None:
            self._release(att.hwpt, dev_id)
        if not hwpt_id:
            hwpt_id = new_id()
            self.hwpts[hwpt_id] = Hwpt(ioas=ioas_id, dev_id=dev_id, flags=0, auto=True)
        att.hwpt = hwpt_id
        return hwpt_id

    def detach(self, port: DmaPort, dev_id: int) -> None:
        """DETACH_IOMMUFD_PT, or the device fd closed: the device loses every mapping."""
        att = self.devices.get(dev_id)
        if att is None or att.hwpt is None:
            return
        old = att.hwpt
        if self.hwpts[old].dirty:
            _quiet_send(port, att.device, "dirty iommu off")
        _quiet_send(port, att.device, "unmap all")
        att.hwpt = None
        self._release(old, dev_id)

    def unbind(self, port: DmaPort, dev_id: int) -> None:
        self.detach(port, dev_id)
        self.devices.pop(dev_id, None)

    def _release(self, hwpt_id: int, dev_id: int) -> None:
        hwpt = self.hwpts[hwpt_id]
        users = [d for d, a in self.devices.items() if a.hwpt == hwpt_id and d != dev_id]
        if hwpt.auto and not users:
            del self.hwpts[hwpt_id]

    # -- IOAS ioctls -------------------------------------------------------------------------
    def ioas_map(self, mem: Memory, arg: int, pid: int = 0, port: DmaPort | None = None) -> int:
        size, raw = read_struct(mem, arg, IOAS_MAP, IOAS_MAP.size)
        _size, flags, ioas_id, reserved, user_va, length, iova = IOAS_MAP.unpack(raw)
        if reserved or flags & ~_MAP_FLAGS:
            raise IoctlError(errno.EOPNOTSUPP, f"IOAS_MAP: unknown flags 0x{flags:x} or __reserved")
        if iova >= ULONG_MAX or length >= ULONG_MAX:
            raise IoctlError(errno.EOVERFLOW, "IOAS_MAP: iova or length >= ULONG_MAX")
        if not flags & _PROT:
            raise IoctlError(errno.EINVAL, "IOAS_MAP: neither READABLE nor WRITEABLE")
        ioas = self._ioas(ioas_id)
        if not length:
            raise IoctlError(errno.EINVAL, "IOAS_MAP: length 0")
        if user_va + length > _U64_MAX:
            raise IoctlError(errno.EOVERFLOW, "IOAS_MAP: user_va + length wraps")
        area = Area(
            iova=0,
            length=length,
            pid=pid,
            vaddr=user_va,
            readable=bool(flags & IOMMU_IOAS_MAP_READABLE),
            writeable=bool(flags & IOMMU_IOAS_MAP_WRITEABLE),
            pages_writable=bool(flags & IOMMU_IOAS_MAP_WRITEABLE),
        )
        iova = self._place(ioas, iova, [area], fixed=bool(flags & IOMMU_IOAS_MAP_FIXED_IOVA))
        out = IOAS_MAP.pack(size, flags, ioas_id, 0, user_va, length, iova)
        respond(mem, arg, size, out)  # EFAULT here leaves nothing mapped
        self._insert(port, ioas_id, [attrs.evolve(area, iova=iova)])
        return 0

    def ioas_copy(self, mem: Memory, arg: int, port: DmaPort | None = None) -> int:
        size, raw = read_struct(mem, arg, IOAS_COPY, IOAS_COPY.size)
        _s, flags, dst_id, src_id, length, dst_iova, src_iova = IOAS_COPY.unpack(raw)
        if flags & ~_MAP_FLAGS:
            raise IoctlError(errno.EOPNOTSUPP, f"IOAS_COPY: unknown flags 0x{flags:x}")
        if length >= ULONG_MAX or src_iova >= ULONG_MAX or dst_iova >= ULONG_MAX:
            raise IoctlError(errno.EOVERFLOW, "IOAS_COPY: length or an iova >= ULONG_MAX")
        if not flags & _PROT:
            raise IoctlError(errno.EINVAL, "IOAS_COPY: neither READABLE nor WRITEABLE")
        src = self._ioas(src_id)
        if not length:
            raise IoctlError(errno.EINVAL, "IOAS_COPY: length 0")
        if src_iova + length - 1 > _U64_MAX:
            raise IoctlError(errno.EOVERFLOW, "IOAS_COPY: src_iova + length wraps")
        slices = _contiguous(src, src_iova, src_iova + length - 1)
        if slices is None:
            raise IoctlError(
                errno.ENOENT, f"IOAS_COPY: [0x{src_iova:x}, +0x{length:x}) is not all mapped"
            )
        dst = self._ioas(dst_id)
        writeable = bool(flags & IOMMU_IOAS_MAP_WRITEABLE)
        areas = [
            attrs.evolve(
                s,
                iova=0,
                readable=bool(flags & IOMMU_IOAS_MAP_READABLE),
                writeable=writeable,
            )
            for s in slices
        ]
        if writeable and not all(s.pages_writable for s in slices):
            # iopt_insert_area runs after the IOVA checks; the error is the same either way
            self._place(dst, dst_iova, areas, fixed=bool(flags & IOMMU_IOAS_MAP_FIXED_IOVA))
            raise IoctlError(errno.EPERM, "IOAS_COPY: write access to pages mapped read-only")
        iova = self._place(dst, dst_iova, areas, fixed=bool(flags & IOMMU_IOAS_MAP_FIXED_IOVA))
        respond(mem, arg, size, IOAS_COPY.pack(size, flags, dst_id, src_id, length, iova, src_iova))
        placed, at = [], iova
        for a in areas:
            placed.append(attrs.evolve(a, iova=at))
            at += a.length
        self._insert(port, dst_id, placed)
        return 0

    def ioas_unmap(self, mem: Memory, arg: int, port: DmaPort | None = None) -> int:
        size, raw = read_struct(mem, arg, IOAS_UNMAP, IOAS_UNMAP.size)
        _s, ioas_id, iova, length = IOAS_UNMAP.unpack(raw)
        ioas = self._ioas(ioas_id)
        if iova == 0 and length == _U64_MAX:
            gone = ioas.sorted_areas()
        else:
            if iova >= ULONG_MAX or length >= ULONG_MAX:
                raise IoctlError(errno.EOVERFLOW, "IOAS_UNMAP: iova or length >= ULONG_MAX")
            if not length:
                raise IoctlError(errno.EINVAL, "IOAS_UNMAP: length 0")
            last = iova + length - 1
            if last > _U64_MAX:
                raise IoctlError(errno.EOVERFLOW, "IOAS_UNMAP: iova + length wraps")
            gone = ioas.overlapping(iova, last)
            for a in gone:
                if a.iova < iova or a.last > last:
                    raise IoctlError(
                        errno.ENOENT,
                        f"IOAS_UNMAP: [0x{iova:x}, 0x{last:x}] would cut the area at 0x{a.iova:x}"
                        f" (+0x{a.length:x}); unmap whole areas",
                    )
            if not gone:
                raise IoctlError(
                    errno.ENOENT, f"IOAS_UNMAP: nothing mapped in [0x{iova:x}, +0x{length:x})"
                )
        total = sum(a.length for a in gone)
        respond(mem, arg, size, IOAS_UNMAP.pack(size, ioas_id, iova, total))
        for a in gone:
            del ioas.areas[a.iova]
        if port is not None:
            for dev in self.ioas_devices(ioas_id):
                for a in gone:
                    _quiet_send(port, dev, a.unmap_command())
        return 0

    def allow_iovas(self, mem: Memory, arg: int) -> int:
        """IOMMU_IOAS_ALLOW_IOVAS: replace the ranges automatic IOVAs are taken from."""
        _size, raw = read_struct(mem, arg, ALLOW_IOVAS, ALLOW_IOVAS.size)
        _s, ioas_id, num, reserved, ptr = ALLOW_IOVAS.unpack(raw)
        if reserved:
            raise IoctlError(errno.EOPNOTSUPP, "IOAS_ALLOW_IOVAS: __reserved set")
        ioas = self._ioas(ioas_id)
        if num > MAX_ALLOWED_IOVAS:
            raise IoctlError(
                errno.ENOMEM, f"IOAS_ALLOW_IOVAS: {num} ranges (at most {MAX_ALLOWED_IOVAS})"
            )
        ranges: list[tuple[int, int]] = []
        for i in range(num):
            start, last = IOVA_RANGE.unpack(mem.read(ptr + i * IOVA_RANGE.size, IOVA_RANGE.size))
            if start >= last:
                raise IoctlError(errno.EINVAL, f"IOAS_ALLOW_IOVAS: range {i} start >= last")
            if any(a <= last and start <= b for a, b in ranges):
                raise IoctlError(errno.EINVAL, f"IOAS_ALLOW_IOVAS: range {i} overlaps another")
            ranges.append((start, last))
        ioas.allowed = sorted(ranges)
        return 0

    def iova_ranges(self, mem: Memory, arg: int) -> int:
        size, raw = read_struct(mem, arg, IOAS_IOVA_RANGES, IOAS_IOVA_RANGES.size)
        _s, ioas_id, num, reserved, ptr, _align = IOAS_IOVA_RANGES.unpack(raw)
        if reserved:
            raise IoctlError(errno.EOPNOTSUPP, "IOAS_IOVA_RANGES: __reserved set")
        ioas = self._ioas(ioas_id)
        ranges = [(0, IOVA_LAST)]
        if num >= len(ranges):
            mem.write(ptr, b"".join(IOVA_RANGE.pack(*r) for r in ranges))
        out = IOAS_IOVA_RANGES.pack(size, ioas_id, len(ranges), 0, ptr, ioas.iova_alignment)
        respond(mem, arg, size, out)
        if num < len(ranges):
            raise IoctlError(errno.EMSGSIZE, "IOAS_IOVA_RANGES: the range array is too short")
        return 0

    # -- HWPT ioctls -------------------------------------------------------------------------
    def hwpt_alloc(self, mem: Memory, arg: int, dev_ids: set[int], new_id: int) -> int:
        size, raw = read_struct(mem, arg, HWPT_ALLOC, HWPT_ALLOC_MINSZ)
        fields = HWPT_ALLOC.unpack(raw)
        _s, flags, dev_id, pt_id, _out, reserved, data_type, data_len, _uptr, _fault, _r2 = fields
        if reserved:
            raise IoctlError(errno.EOPNOTSUPP, "HWPT_ALLOC: __reserved set")
        if (data_type == IOMMU_HWPT_DATA_NONE) == bool(data_len):
            raise IoctlError(errno.EINVAL, "HWPT_ALLOC: data_len must be 0 exactly for DATA_NONE")
        if dev_id not in dev_ids:
            raise IoctlError(errno.ENOENT, f"HWPT_ALLOC: no device {dev_id} bound to this iommufd")
        if pt_id in self.hwpts:
            raise IoctlError(errno.EOPNOTSUPP, "HWPT_ALLOC: nested HWPTs are not supported")
        if pt_id not in self.ioas:
            raise IoctlError(errno.ENOENT, f"HWPT_ALLOC: no IOAS {pt_id}")
        if flags & ~_HWPT_FLAGS:
            raise IoctlError(errno.EOPNOTSUPP, f"HWPT_ALLOC: unknown flags 0x{flags:x}")
        if flags & uapi.IOMMU_HWPT_FAULT_ID_VALID and flags & IOMMU_HWPT_ALLOC_NEST_PARENT:
            raise IoctlError(errno.EOPNOTSUPP, "HWPT_ALLOC: FAULT_ID_VALID with NEST_PARENT")
        if data_type != IOMMU_HWPT_DATA_NONE:
            raise IoctlError(errno.EOPNOTSUPP, "HWPT_ALLOC: no driver-specific paging data")
        if flags & uapi.IOMMU_HWPT_FAULT_ID_VALID:
            raise IoctlError(errno.ENOENT, "HWPT_ALLOC: no fault object (none can be allocated)")
        out = HWPT_ALLOC.pack(*fields[:4], new_id, *fields[5:])
        respond(mem, arg, size, out)
        self.hwpts[new_id] = Hwpt(ioas=pt_id, dev_id=dev_id, flags=flags)
        return 0

    def set_dirty_tracking(self, mem: Memory, arg: int, port: DmaPort) -> int:
        _size, raw = read_struct(mem, arg, SET_DIRTY, SET_DIRTY.size)
        _s, flags, hwpt_id, _reserved = SET_DIRTY.unpack(raw)
        if flags & ~uapi.IOMMU_HWPT_DIRTY_TRACKING_ENABLE:
            raise IoctlError(
                errno.EOPNOTSUPP, f"HWPT_SET_DIRTY_TRACKING: unknown flags 0x{flags:x}"
            )
        hwpt = self._hwpt(hwpt_id)
        if not hwpt.dirty_capable:
            raise IoctlError(
                errno.EOPNOTSUPP,
                f"HWPT {hwpt_id} was allocated without IOMMU_HWPT_ALLOC_DIRTY_TRACKING",
            )
        enable = bool(flags & uapi.IOMMU_HWPT_DIRTY_TRACKING_ENABLE)
        devices = self.hwpt_devices(hwpt_id)
        if enable:
            # a clean snapshot: an enabled tracker restarts (its dirty bits are cleared)
            undo = [] if hwpt.dirty else ["dirty iommu off"]
            push_all(
                port,
                devices,
                [*(["dirty iommu off"] if hwpt.dirty else []), "dirty iommu on"],
                undo,
            )
        elif hwpt.dirty:
            for dev in devices:
                _quiet_send(port, dev, "dirty iommu off")
        hwpt.dirty = enable
        return 0

    def get_dirty_bitmap(self, mem: Memory, arg: int, port: DmaPort) -> int:
        _size, raw = read_struct(mem, arg, GET_DIRTY, GET_DIRTY.size)
        _s, hwpt_id, flags, reserved, iova, length, page_size, data = GET_DIRTY.unpack(raw)
        if flags & ~uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR or reserved:
            raise IoctlError(
                errno.EOPNOTSUPP, f"HWPT_GET_DIRTY_BITMAP: unknown flags 0x{flags:x} or __reserved"
            )
        hwpt = self._hwpt(hwpt_id)
        ioas = self.ioas[hwpt.ioas]
        last = iova + ((length - 1) & _U64_MAX)
        if last > _U64_MAX:
            raise IoctlError(errno.EOVERFLOW, "HWPT_GET_DIRTY_BITMAP: iova + length - 1 wraps")
        align = ioas.iova_alignment
        if iova & (align - 1) or (last + 1) & (align - 1):
            raise IoctlError(errno.EINVAL, f"HWPT_GET_DIRTY_BITMAP: range not {align}-byte aligned")
        if not page_size:
            raise IoctlError(errno.EINVAL, "HWPT_GET_DIRTY_BITMAP: page_size 0")
        if iova & (page_size - 1) or (last + 1) & (page_size - 1):
            raise IoctlError(
                errno.EINVAL,
                f"HWPT_GET_DIRTY_BITMAP: [0x{iova:x}, 0x{last:x}] not aligned to page_size"
                f" 0x{page_size:x}",
            )
        if not hwpt.dirty_capable:
            raise IoctlError(errno.EOPNOTSUPP, f"HWPT {hwpt_id} has no dirty tracking")
        if not length:
            raise IoctlError(errno.EINVAL, "HWPT_GET_DIRTY_BITMAP: length 0")
        if _contiguous(ioas, iova, last) is None:
            raise IoctlError(
                errno.EINVAL,
                f"HWPT_GET_DIRTY_BITMAP: [0x{iova:x}, 0x{last:x}] is not mapped contiguously",
            )
        pgshift = ffs(page_size)
        nbits = ((last - iova) >> pgshift) + 1
        nbytes = bitmap_bytes(nbits)
        if nbytes > 1 << 28:
            raise IoctlError(errno.ENOMEM, f"HWPT_GET_DIRTY_BITMAP: bitmap of {nbytes} bytes")
        old = mem.read(data, nbytes)  # the kernel pins the bitmap pages first (EFAULT)
        suffix = "" if not flags & uapi.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR else " noclear"
        command = f"report iommu 0x{iova:x} 0x{length:x} 0x{1 << pgshift:x}{suffix}"
        bits = reported_bits(port, self.hwpt_devices(hwpt_id), command, nbits)
        if bits:
            new = (int.from_bytes(old, "little") | bits).to_bytes(nbytes, "little")
            mem.write(data, new)
        return 0

    def option(self, mem: Memory, arg: int) -> int:
        size, raw = read_struct(mem, arg, OPTION, OPTION.size)
        _s, option_id, op, reserved, object_id, val = OPTION.unpack(raw)
        if reserved:
            raise IoctlError(errno.EOPNOTSUPP, "IOMMU_OPTION: __reserved set")
        if op not in (IOMMU_OPTION_OP_SET, IOMMU_OPTION_OP_GET):
            raise IoctlError(errno.EOPNOTSUPP, f"IOMMU_OPTION: op {op}")
        if option_id == IOMMU_OPTION_RLIMIT_MODE:
            if object_id:
                raise IoctlError(errno.EINVAL, "IOMMU_OPTION: global option, object_id must be 0")
            if op == IOMMU_OPTION_OP_GET:
                respond(mem, arg, size, OPTION.pack(size, option_id, op, 0, object_id, 0))
            elif val > 1:
                raise IoctlError(errno.EINVAL, f"IOMMU_OPTION: value {val}")
            return 0
        if option_id == IOMMU_OPTION_HUGE_PAGES:
            ioas = self._ioas(object_id)
            if op == IOMMU_OPTION_OP_GET:
                out = OPTION.pack(size, option_id, op, 0, object_id, ioas.huge_pages)
                respond(mem, arg, size, out)
            elif val > 1:
                raise IoctlError(errno.EINVAL, f"IOMMU_OPTION: value {val}")
            else:
                ioas.huge_pages = val
            return 0
        raise IoctlError(errno.EOPNOTSUPP, f"IOMMU_OPTION: option {option_id}")

    # -- helpers -----------------------------------------------------------------------------
    def _ioas(self, ioas_id: int) -> Ioas:
        if ioas_id not in self.ioas:
            raise IoctlError(errno.ENOENT, f"no IOAS {ioas_id}")
        return self.ioas[ioas_id]

    def _hwpt(self, hwpt_id: int) -> Hwpt:
        if hwpt_id not in self.hwpts:
            raise IoctlError(errno.ENOENT, f"no HWPT {hwpt_id}")
        return self.hwpts[hwpt_id]

    @staticmethod
    def _place(ioas: Ioas, iova: int, areas: list[Area], *, fixed: bool) -> int:
        """The IOVA of ``areas`` laid end to end (``iopt_alloc_area_pages``); nothing changes."""
        length = sum(a.length for a in areas)
        align = ioas.iova_alignment
        if length & (align - 1) or not length:
            raise IoctlError(errno.EINVAL, f"length 0x{length:x} is not {align}-byte aligned")
        if fixed:
            if iova & (align - 1):
                raise IoctlError(errno.EINVAL, f"iova 0x{iova:x} is not {align}-byte aligned")
            if iova + length - 1 > _U64_MAX:
                raise IoctlError(errno.EOVERFLOW, f"iova 0x{iova:x} + length wraps")
            if ioas.overlapping(iova, iova + length - 1):
                raise IoctlError(errno.EEXIST, f"iova 0x{iova:x} (+0x{length:x}) is already mapped")
        else:
            iova = ioas.alloc_iova(areas[0].vaddr, length)
        for a in areas:
            if a.vaddr % PAGE_SIZE & (align - 1):
                raise IoctlError(
                    errno.EINVAL, f"user address 0x{a.vaddr:x} is not {align}-byte aligned"
                )
        return iova

    def _insert(self, port: DmaPort | None, ioas_id: int, areas: list[Area]) -> None:
        if port is not None:
            push_all(
                port,
                self.ioas_devices(ioas_id),
                [a.map_command() for a in areas],
                [a.unmap_command() for a in areas],
            )
        for a in areas:
            self.ioas[ioas_id].areas[a.iova] = a


def _contiguous(ioas: Ioas, iova: int, last: int) -> list[Area] | None:
    """The slices of the areas that cover [iova, last] without a hole, or None."""
    out: list[Area] = []
    cur = iova
    for a in ioas.sorted_areas():
        if a.last < cur:
            continue
        if a.iova > cur:
            return None
        end = min(a.last, last)
        off = cur - a.iova
        out.append(attrs.evolve(a, iova=cur, length=end - cur + 1, vaddr=a.vaddr + off))
        cur = end + 1
        if cur > last:
            return out
    return None


def _quiet_send(port: DmaPort, device: str, command: str) -> None:
    """A push that cannot be refused in the kernel (unmaps, tracker off): errors are dropped."""
    with contextlib.suppress(IoctlError):
        port.send(device, command)


def hw_info(mem: Memory, arg: int, dev_ids: set[int]) -> int:
    """IOMMU_GET_HW_INFO: no vendor data, the dirty-tracking capability."""
    size, raw = read_struct(mem, arg, HW_INFO, HW_INFO_MINSZ)
    _s, flags, dev_id, data_len, uptr, _type, _pasid, _caps = HW_INFO.unpack(raw)
    if flags:  # IOMMU_HW_INFO_FLAG_INPUT_TYPE (6.17) is refused, as before 6.17
        raise IoctlError(errno.EOPNOTSUPP, f"GET_HW_INFO: flags 0x{flags:x}")
    reserved = HW_INFO.offsets()["__reserved"]
    if any(raw[reserved[0] : reserved[0] + reserved[1]]):
        raise IoctlError(errno.EOPNOTSUPP, "GET_HW_INFO: __reserved (bytes 29..31) set")
    if dev_id not in dev_ids:
        raise IoctlError(errno.ENOENT, f"GET_HW_INFO: no device {dev_id} bound to this iommufd")
    if data_len:
        mem.write(uptr, bytes(data_len))  # the kernel zero-fills what it does not report
    # out_max_pasid_log2 0: no PASID support.
    out = HW_INFO.pack(
        size,
        flags,
        dev_id,
        0,
        uptr,
        IOMMU_HW_INFO_TYPE_NONE,
        0,
        uapi.IOMMU_HW_CAP_DIRTY_TRACKING,
    )
    respond(mem, arg, size, out)
    return 0


# -- the ioctls of a /dev/iommu open file ---------------------------------------------------------
_U32 = struct.Struct("<I")
_OBJECT_IOCTLS = frozenset(
    {
        uapi.IOMMU_IOAS_MAP,
        uapi.IOMMU_IOAS_UNMAP,
        uapi.IOMMU_IOAS_COPY,
        uapi.IOMMU_IOAS_ALLOW_IOVAS,
        uapi.IOMMU_IOAS_IOVA_RANGES,
        uapi.IOMMU_OPTION,
        uapi.IOMMU_GET_HW_INFO,
        uapi.IOMMU_HWPT_ALLOC,
        uapi.IOMMU_HWPT_SET_DIRTY_TRACKING,
        uapi.IOMMU_HWPT_GET_DIRTY_BITMAP,
    }
)


def iommu_ioctl(vfio: Vfio, call: Call, ino: int) -> int:
    """An ioctl on the caller's ``/dev/iommu`` file (inode ``ino``)."""
    r = call.request
    if r == uapi.VFIO_GET_API_VERSION:
        return uapi.VFIO_API_VERSION
    if r == uapi.VFIO_CHECK_EXTENSION:
        return int(call.arg in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU))
    if r == uapi.IOMMU_IOAS_ALLOC:
        _size, raw = read_struct(call.mem, call.arg, uapi.IOMMU_IOAS_ALLOC_STRUCT, 12)
        _s, flags, _ = uapi.IOMMU_IOAS_ALLOC_STRUCT.unpack(raw)
        if flags:
            raise IoctlError(errno.EOPNOTSUPP, "IOAS_ALLOC: flags must be 0")
        call.mem.write(call.arg + 8, _U32.pack(0))  # probe before the side effect
        entry = vfio.entry(call, call.fd, ino, NodeKind.IOMMU, None)
        ioas = vfio.take_id()
        entry.iommufd_ctx.ioas[ioas] = Ioas()
        call.mem.write(call.arg + 8, _U32.pack(ioas))
        return 0
    if r == uapi.IOMMU_DESTROY:
        _size, raw = read_struct(call.mem, call.arg, uapi.IOMMU_DESTROY_STRUCT, 8)
        _s, obj = uapi.IOMMU_DESTROY_STRUCT.unpack(raw)
        found = vfio.find(call, call.fd, ino)
        if found is None:
            raise IoctlError(errno.ENOENT, f"no object {obj}")
        found.iommufd_ctx.destroy(obj)
        return 0
    if r not in _OBJECT_IOCTLS:
        raise IoctlError(errno.ENOTTY)
    found = vfio.find(call, call.fd, ino)
    ctx = found.iommufd_ctx if found is not None else Context()
    dev_ids = set(ctx.devices)
    mem, arg = call.mem, call.arg
    if r == uapi.IOMMU_GET_HW_INFO:
        return hw_info(mem, arg, dev_ids)
    if r == uapi.IOMMU_HWPT_ALLOC:
        result = ctx.hwpt_alloc(mem, arg, dev_ids, vfio.next_id)
        vfio.take_id()  # the id is used only once the HWPT exists
        return result
    if r == uapi.IOMMU_IOAS_MAP:
        return ctx.ioas_map(mem, arg, call.process, vfio)
    if r == uapi.IOMMU_IOAS_UNMAP:
        return ctx.ioas_unmap(mem, arg, vfio)
    if r == uapi.IOMMU_IOAS_COPY:
        return ctx.ioas_copy(mem, arg, vfio)
    if r == uapi.IOMMU_IOAS_IOVA_RANGES:
        return ctx.iova_ranges(mem, arg)
    if r == uapi.IOMMU_IOAS_ALLOW_IOVAS:
        return ctx.allow_iovas(mem, arg)
    if r == uapi.IOMMU_HWPT_SET_DIRTY_TRACKING:
        return ctx.set_dirty_tracking(mem, arg, vfio)
    if r == uapi.IOMMU_HWPT_GET_DIRTY_BITMAP:
        return ctx.get_dirty_bitmap(mem, arg, vfio)
    return ctx.option(mem, arg)


# -- the type1 container (``drivers/vfio/vfio_iommu_type1.c``) -----------------------------------
#: The container's page sizes: every power of two from 4 KiB (``PAGE_MASK``, what type1
#: keeps for devices that pin only what they access, an emulated-IOMMU group's view).
TYPE1_PGSIZE_BITMAP = _U64_MAX & ~(PAGE_SIZE - 1)
#: DIRTY_BITMAP_SIZE_MAX: the bitmap of INT_MAX pages, in bytes.
DIRTY_BITMAP_SIZE_MAX = bitmap_bytes((1 << 31) - 1)
#: The default ``dma_entry_limit`` module parameter (U16_MAX mappings).
DMA_ENTRY_LIMIT = 0xFFFF
#: x86-64 user addresses end here (access_ok of a bitmap pointer; beyond: EINVAL).
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE
_MAP_DMA_FLAGS = (
    uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE | uapi.VFIO_DMA_MAP_FLAG_VADDR
)
_UNMAP_DMA_FLAGS = (
    uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP
    | uapi.VFIO_DMA_UNMAP_FLAG_ALL
    | uapi.VFIO_DMA_UNMAP_FLAG_VADDR
)
_DIRTY_FLAGS = (
    uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START
    | uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP
    | uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
)


def _access_ok(addr: int, size: int) -> bool:
    return addr + size <= TASK_SIZE_MAX


def _verify_bitmap_size(npages: int, size: int) -> None:
    """``verify_bitmap_size``: EINVAL unless the bitmap holds ``npages`` bits and is not huge."""
    if not npages or not size or size > DIRTY_BITMAP_SIZE_MAX:
        raise IoctlError(
            errno.EINVAL, f"dirty bitmap of {size} bytes for {npages} pages (limit 256 MiB)"
        )
    if size < bitmap_bytes(npages):
        raise IoctlError(
            errno.EINVAL,
            f"dirty bitmap of {size} bytes < {bitmap_bytes(npages)} for {npages} pages",
        )


@attrs.define
class Type1:
    """The type1 IOMMU of one container (``/dev/vfio/vfio`` after VFIO_SET_IOMMU).

    Theory of operation: the container keeps its ``vfio_dma`` mappings (one
    :class:`Area` each, with the mapping process's thread group and user
    address) and pushes each into the ``dma`` file of every device of its
    groups. Our devices pin only what they DMA, like an mdev that uses
    ``vfio_dma_rw``: so the dirty bitmap reports exactly the pages the devices
    wrote (``report type1``, ORed over the devices) and never "all pages
    dirty", which the kernel reports for a device that pins nothing.

    Rule 1: MAP_DMA: argsz >= 32 and known flags (EINVAL); READ/WRITE or VADDR,
            not both and not neither (EINVAL); size > 0 and size, iova, vaddr
            4 KiB aligned, no wrap (EINVAL); an overlap is EEXIST; past
            ``dma_entry_limit`` mappings ENOSPC.
    Rule 2: UNMAP_DMA (v2): the range may not start or end inside a mapping
            (EINVAL); the mappings inside go, holes are fine and unmapping
            nothing answers 0 with size 0; ``size`` reports the bytes unmapped.
            v1 (VFIO_TYPE1_IOMMU) removes each mapping that starts in the
            range, whole. UNMAP_ALL needs iova 0 and size 0.
    Rule 3: VADDR: an unmap with VFIO_DMA_UNMAP_FLAG_VADDR invalidates the
            user address of the mappings (the devices lose them until then:
            the kernel blocks their DMA, ours faults), a map with
            VFIO_DMA_MAP_FLAG_VADDR gives the same iova and size a new one.
    Rule 4: dirty pages: START/STOP/GET_BITMAP one at a time (EINVAL), v1 is
            EACCES; GET_BITMAP needs tracking on, the smallest page size, and
            a range that does not cut a mapping (EINVAL); its words are written
            as ``update_user_bitmap`` writes them, and reading clears.
    """

    v2: bool
    maps: dict[int, Area] = attrs.Factory(dict)
    invalid: set[int] = attrs.Factory(set)  # iovas whose vaddr is invalidated
    dirty: bool = False

    @property
    def pgsize(self) -> int:
        return 1 << ffs(TYPE1_PGSIZE_BITMAP)

    def sorted_maps(self) -> list[Area]:
        return [self.maps[a] for a in sorted(self.maps)]

    def find(self, iova: int, size: int) -> Area | None:
        """``vfio_find_dma``: a mapping overlapping [iova, iova+size) (size 0: containing iova)."""
        for a in self.sorted_maps():
            if iova + max(size, 1) > a.iova and iova <= a.last:
                return a
        return None

    # -- ioctls ------------------------------------------------------------------------------
    def get_info(self, mem: Memory, arg: int) -> int:
        raw = mem.read(arg, uapi.IOMMU_TYPE1_INFO_MINSZ)
        argsz, _flags, _pgs = struct.unpack("<IIQ", raw)
        if argsz < uapi.IOMMU_TYPE1_INFO_MINSZ:
            raise IoctlError(errno.EINVAL, f"VFIO_IOMMU_GET_INFO: argsz {argsz} < 16")
        info_size = uapi.IOMMU_TYPE1_INFO.size
        caps = bytearray()

        def add(cap: bytes) -> None:
            at = len(caps)
            padded = cap + bytes(-len(cap) % 8)
            if at:  # link the previous tail to this one (offsets from the info start)
                tail = 0
                while True:
                    nxt = struct.unpack_from("<I", caps, tail + 4)[0]
                    if not nxt:
                        break
                    tail = nxt - info_size
                struct.pack_into("<I", caps, tail + 4, info_size + at)
            caps.extend(padded)

        add(
            uapi.IOMMU_TYPE1_CAP_MIGRATION.pack(
                uapi.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
                1,
                0,
                0,
                0,
                self.pgsize,
                DIRTY_BITMAP_SIZE_MAX,
            )
        )
        add(
            uapi.IOMMU_TYPE1_CAP_DMA_AVAIL.pack(
                uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 0, DMA_ENTRY_LIMIT - len(self.maps)
            )
        )
        ranges = [(0, IOVA_LAST)]
        add(
            uapi.IOMMU_TYPE1_CAP_IOVA_RANGE.pack(
                uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0, len(ranges), 0
            )
            + b"".join(uapi.IOVA_RANGE.pack(*r) for r in ranges)
        )
        flags = uapi.VFIO_IOMMU_INFO_PGSIZES | uapi.VFIO_IOMMU_INFO_CAPS
        cap_offset = 0
        out_argsz = argsz
        if argsz < info_size + len(caps):
            out_argsz = info_size + len(caps)  # the caller learns the size it needs
        else:
            mem.write(arg + info_size, bytes(caps))
            cap_offset = info_size
        out = uapi.IOMMU_TYPE1_INFO.pack(out_argsz, flags, TYPE1_PGSIZE_BITMAP, cap_offset, 0)
        mem.write(arg, out[: min(argsz, info_size)])
        return 0

    def map_dma(self, mem: Memory, arg: int, pid: int, port: DmaPort, devices: list[str]) -> int:
        argsz, flags, vaddr, iova, size = uapi.IOMMU_TYPE1_DMA_MAP.unpack(mem.read(arg, 32))
        if argsz < 32 or flags & ~_MAP_DMA_FLAGS:
            raise IoctlError(errno.EINVAL, f"MAP_DMA: argsz {argsz} < 32 or flags 0x{flags:x}")
        set_vaddr = bool(flags & uapi.VFIO_DMA_MAP_FLAG_VADDR)
        prot = flags & (uapi.VFIO_DMA_MAP_FLAG_READ | uapi.VFIO_DMA_MAP_FLAG_WRITE)
        if bool(prot) == set_vaddr:
            raise IoctlError(
                errno.EINVAL, "MAP_DMA: give READ and/or WRITE, or VADDR alone (to update)"
            )
        pg = self.pgsize
        if not size or (size | iova | vaddr) & (pg - 1):
            raise IoctlError(
                errno.EINVAL,
                f"MAP_DMA: size 0x{size:x}, iova 0x{iova:x}, vaddr 0x{vaddr:x} must be"
                f" non-zero and {pg}-byte aligned",
            )
        if iova + size - 1 > _U64_MAX or vaddr + size - 1 > _U64_MAX:
            raise IoctlError(errno.EINVAL, "MAP_DMA: iova or vaddr + size wraps")
        dma = self.find(iova, size)
        if set_vaddr:
            if dma is None:
                raise IoctlError(errno.ENOENT, f"MAP_DMA VADDR: nothing mapped at 0x{iova:x}")
            if dma.iova not in self.invalid or dma.iova != iova or dma.length != size:
                raise IoctlError(
                    errno.EINVAL,
                    "MAP_DMA VADDR: needs exactly one mapping's iova and size, invalidated first",
                )
            new = attrs.evolve(dma, vaddr=vaddr, pid=pid)
            push_all(port, devices, [new.map_command()], [new.unmap_command()])
            self.maps[iova] = new
            self.invalid.discard(iova)
            return 0
        if dma is not None:
            raise IoctlError(
                errno.EEXIST, f"MAP_DMA: [0x{iova:x}, +0x{size:x}) overlaps 0x{dma.iova:x}"
            )
        if len(self.maps) >= DMA_ENTRY_LIMIT:
            raise IoctlError(errno.ENOSPC, f"MAP_DMA: {DMA_ENTRY_LIMIT} mappings already")
        area = Area(
            iova=iova,
            length=size,
            pid=pid,
            vaddr=vaddr,
            readable=bool(flags & uapi.VFIO_DMA_MAP_FLAG_READ),
            writeable=bool(flags & uapi.VFIO_DMA_MAP_FLAG_WRITE),
        )
        push_all(port, devices, [area.map_command()], [area.unmap_command()])
        self.maps[iova] = area
        return 0

    def unmap_dma(self, mem: Memory, arg: int, port: DmaPort, devices: list[str]) -> int:
        argsz, flags, iova, size = uapi.IOMMU_TYPE1_DMA_UNMAP.unpack(mem.read(arg, 24))
        get_dirty = bool(flags & uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP)
        if argsz < 24 or flags & ~_UNMAP_DMA_FLAGS:
            raise IoctlError(errno.EINVAL, f"UNMAP_DMA: argsz {argsz} < 24 or flags 0x{flags:x}")
        if get_dirty and flags & (uapi.VFIO_DMA_UNMAP_FLAG_ALL | uapi.VFIO_DMA_UNMAP_FLAG_VADDR):
            raise IoctlError(errno.EINVAL, "UNMAP_DMA: GET_DIRTY_BITMAP with ALL or VADDR")
        bm_pgsize = bm_size = bm_data = 0
        if get_dirty:
            if argsz < 24 + uapi.VFIO_BITMAP.size:
                raise IoctlError(errno.EINVAL, "UNMAP_DMA: argsz leaves no room for vfio_bitmap")
            bm_pgsize, bm_size, bm_data = uapi.VFIO_BITMAP.unpack(mem.read(arg + 24, 24))
            if not _access_ok(bm_data, bm_size):
                raise IoctlError(errno.EINVAL, "UNMAP_DMA: the bitmap is not user memory")
            if not bm_pgsize:
                raise IoctlError(errno.EINVAL, "UNMAP_DMA: bitmap pgsize 0")
            _verify_bitmap_size(size >> ffs(bm_pgsize), bm_size)
        unmap_all = bool(flags & uapi.VFIO_DMA_UNMAP_FLAG_ALL)
        invalidate = bool(flags & uapi.VFIO_DMA_UNMAP_FLAG_VADDR)
        pg = self.pgsize
        if iova & (pg - 1):
            raise IoctlError(errno.EINVAL, f"UNMAP_DMA: iova 0x{iova:x} not {pg}-byte aligned")
        if unmap_all:
            if iova or size:
                raise IoctlError(errno.EINVAL, "UNMAP_DMA ALL: iova and size must be 0")
            size = _U64_MAX
        elif not size or size & (pg - 1) or iova + size - 1 > _U64_MAX:
            raise IoctlError(
                errno.EINVAL, f"UNMAP_DMA: size 0x{size:x} zero, unaligned or wrapping"
            )
        if get_dirty and (not self.dirty or bm_pgsize != pg):
            raise IoctlError(
                errno.EINVAL, f"UNMAP_DMA GET_DIRTY_BITMAP: tracking off or pgsize != {pg}"
            )
        last = min(iova + size - 1, _U64_MAX)
        if self.v2 and not unmap_all:
            first = self.find(iova, 1)
            if first is not None and first.iova != iova:
                raise IoctlError(
                    errno.EINVAL, f"UNMAP_DMA: 0x{iova:x} is inside the mapping at 0x{first.iova:x}"
                )
            end = self.find(last, 0)
            if end is not None and end.last != last:
                raise IoctlError(
                    errno.EINVAL, f"UNMAP_DMA: 0x{last:x} is inside the mapping at 0x{end.iova:x}"
                )
        gone: list[Area] = []
        for a in self.sorted_maps():
            if a.last < iova:
                continue
            if a.iova > last:
                break
            if not self.v2 and iova > a.iova:
                break
            gone.append(a)
        if invalidate:
            if any(a.iova in self.invalid for a in gone):
                raise IoctlError(errno.EINVAL, "UNMAP_DMA VADDR: a vaddr is already invalid")
        elif get_dirty:
            for a in gone:
                self._copy_bitmap(mem, port, devices, bm_data, iova, a)
        unmapped = sum(a.length for a in gone)
        out = uapi.IOMMU_TYPE1_DMA_UNMAP.pack(argsz, flags, iova if not unmap_all else 0, unmapped)
        mem.write(arg, out)
        for a in gone:
            for dev in devices:
                _quiet_send(port, dev, a.unmap_command())
            if invalidate:
                self.invalid.add(a.iova)
            else:
                del self.maps[a.iova]
                self.invalid.discard(a.iova)
        return 0

    def dirty_pages(self, mem: Memory, arg: int, port: DmaPort, devices: list[str]) -> int:
        if not self.v2:
            raise IoctlError(errno.EACCES, "DIRTY_PAGES: a VFIO_TYPE1_IOMMU (v1) container")
        argsz, flags = uapi.IOMMU_TYPE1_DIRTY_BITMAP.unpack(mem.read(arg, 8))
        if argsz < 8 or flags & ~_DIRTY_FLAGS:
            raise IoctlError(errno.EINVAL, f"DIRTY_PAGES: argsz {argsz} < 8 or flags 0x{flags:x}")
        if not flags or flags & (flags - 1):
            raise IoctlError(errno.EINVAL, "DIRTY_PAGES: exactly one of START, STOP, GET_BITMAP")
        if flags & uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START:
            if not self.dirty:
                push_all(port, devices, ["dirty type1 on"], ["dirty type1 off"])
                self.dirty = True
            return 0
        if flags & uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP:
            if self.dirty:
                for dev in devices:
                    _quiet_send(port, dev, "dirty type1 off")
                self.dirty = False
            return 0
        get = uapi.IOMMU_TYPE1_DIRTY_BITMAP_GET
        if argsz - 8 < get.size:
            raise IoctlError(errno.EINVAL, "DIRTY_PAGES GET_BITMAP: argsz leaves no room for range")
        iova, size, bm_pgsize, bm_size, bm_data = get.unpack(mem.read(arg + 8, get.size))
        if iova + size > _U64_MAX:
            raise IoctlError(errno.EINVAL, "DIRTY_PAGES GET_BITMAP: iova + size wraps")
        if not _access_ok(bm_data, bm_size):
            raise IoctlError(errno.EINVAL, "DIRTY_PAGES GET_BITMAP: the bitmap is not user memory")
        if not bm_pgsize:
            raise IoctlError(errno.EINVAL, "DIRTY_PAGES GET_BITMAP: pgsize 0")
        _verify_bitmap_size(size >> ffs(bm_pgsize), bm_size)
        pg = self.pgsize
        if bm_pgsize != pg:
            raise IoctlError(
                errno.EINVAL, f"DIRTY_PAGES GET_BITMAP: pgsize 0x{bm_pgsize:x}, only 0x{pg:x}"
            )
        if iova & (pg - 1) or not size or size & (pg - 1):
            raise IoctlError(errno.EINVAL, "DIRTY_PAGES GET_BITMAP: iova or size not aligned")
        if not self.dirty:
            raise IoctlError(errno.EINVAL, "DIRTY_PAGES GET_BITMAP: dirty tracking is not started")
        last = iova + size - 1
        first = self.find(iova, 1)
        end = self.find(last, 0)
        if (first is not None and first.iova != iova) or (end is not None and end.last != last):
            raise IoctlError(
                errno.EINVAL, "DIRTY_PAGES GET_BITMAP: the range must not cut a mapping"
            )
        for a in self.sorted_maps():
            if a.iova < iova:
                continue
            if a.iova > last:
                break
            self._copy_bitmap(mem, port, devices, bm_data, iova, a)
        return 0

    # -- devices joining and leaving ---------------------------------------------------------
    def replay(self, port: DmaPort, device: str) -> None:
        """A group joins a container with mappings (``vfio_iommu_replay``)."""
        commands = [a.map_command() for a in self.sorted_maps() if a.iova not in self.invalid]
        if self.dirty:
            commands.append("dirty type1 on")
        push_all(port, [device], commands, ["unmap all"])

    @staticmethod
    def leave(port: DmaPort, device: str) -> None:
        _quiet_send(port, device, "dirty type1 off")
        _quiet_send(port, device, "unmap all")

    def _copy_bitmap(
        self, mem: Memory, port: DmaPort, devices: list[str], data: int, base: int, a: Area
    ) -> None:
        """``update_user_bitmap``: the mapping's words written at its bit offset from ``base``."""
        pgshift = ffs(self.pgsize)
        nbits = a.length >> pgshift
        command = f"report type1 0x{a.iova:x} 0x{a.length:x} 0x{self.pgsize:x}"
        bits = reported_bits(port, devices, command, nbits)
        bit_offset = (a.iova - base) >> pgshift
        word, shift = divmod(bit_offset, 64)
        value = bits << shift
        if shift:
            value |= int.from_bytes(mem.read(data + word * 8, 8), "little")
        mem.write(data + word * 8, value.to_bytes(bitmap_bytes(nbits + shift), "little"))
