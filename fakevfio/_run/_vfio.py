"""VFIO ioctl semantics: dispatch by node kind, the container, group and cdev ioctls.

Each handler answers one ioctl of a :class:`Call` the way the kernel does
(``reference/linux-vfio-uapi.md``): argsz and flags first (EINVAL), the
caller's memory before any side effect (EFAULT), state checks in the
kernel's order, and output fields written only once every check passed.
The device fd and data_fd ioctls are in :mod:`._device_ioctls`, the IOMMU
models (iommufd objects, the container's type1) in :mod:`._iommufd`; a
:class:`Vfio` is their :class:`~._iommufd.DmaPort`: it writes each mapping
change into the ``dma`` file of the devices concerned and reads their dirty
reports back on the same handle (a device whose core has no DMA support,
EOPNOTSUPP, is skipped). When the command exits every device drops what it
was given. Nothing here knows about seccomp: a :class:`Call`
carries the caller's memory and the two notification services a handler
needs (install an fd, check the caller is still there), so tests call
:meth:`Vfio.dispatch` with an in-memory caller memory.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
from collections.abc import Callable
from typing import Protocol

import attrs

from fakevfio._run import _device_ioctls, _iommufd
from fakevfio._run._caller import HeldFiles, OpenFile, PassThrough, thread_group
from fakevfio._run._nodes import MountNodes, NodeKind, match_device_name
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
logger = logging.getLogger("fakevfio.run")
#: The largest reply read back from a ``dma`` file (the core's bound: a bitmap of 1 TiB of pages).
MAX_DMA_REPLY = 32 << 20
#: A ``dma`` file answering these has no DMA support (an older core): pushes are dropped.
_NO_DMA = frozenset({errno.EOPNOTSUPP, errno.ENOENT})


class Memory(_iommufd.Memory, Protocol):
    """The caller's memory; each access raises IoctlError (EFAULT) like the kernel."""

    def read_cstring(self, addr: int) -> bytes:
        """A NUL-terminated string (without the NUL) of at most one page."""
        ...


@attrs.frozen(kw_only=True)
class Call:
    """One ``ioctl(fd, request, arg)`` of caller ``pid``, being answered."""

    pid: int
    fd: int
    request: int
    arg: int
    mem: Memory
    #: install our fd in the caller (ADDFD, O_CLOEXEC); with send=True that answers the ioctl
    install_fd: Callable[[int, bool], int]
    #: IoctlError(ENOENT) if the caller is gone (SECCOMP_IOCTL_NOTIF_ID_VALID)
    check_alive: Callable[[], None]
    #: the caller's thread group id (0: unknown; :attr:`process` reads it from /proc)
    tgid: int = 0

    @property
    def process(self) -> int:
        """The calling process (thread group): whose memory a DMA mapping maps.

        Looked up only by the ioctls that need it (a mapping, an eventfd): reading
        ``/proc/TID/status`` for every notification was a tenth of a GET's cost.
        """
        return self.tgid or thread_group(self.pid)


@attrs.define(eq=False)
class Vfio:
    """The VFIO/iommufd semantics of one mount, over the held-file table."""

    nodes: MountNodes
    files: HeldFiles
    _next_id: int = 1  # device, IOAS and HWPT ids share one counter

    def __attrs_post_init__(self) -> None:
        self.files.on_drop = self._dropped

    def _dropped(self, f: OpenFile) -> None:
        """The caller closed ``f`` (the held-file scan found no process with it)."""
        if f.kind is NodeKind.CDEV and f.device:
            others = [g for g in self.files.files if g is not f and g.device == f.device]
            if not any(g.kind is NodeKind.CDEV for g in others):
                self._irqs_off(f.device)  # vfio_pci_core_disable: the last device fd
        if f.kind is NodeKind.CDEV and f.iommufd is not None:
            f.iommufd.iommufd_ctx.unbind(self, f.devid)
        elif f.kind is NodeKind.GROUP and f.container is not None:
            if f.container.type1 is not None and f.device:
                _iommufd.Type1.leave(self, f.device)
            f.container.groups -= 1
            if f.container.groups == 0:
                f.container.iommu_type = 0
                f.container.type1 = None
        elif f.kind is NodeKind.IOMMU:  # a bound cdev keeps its iommufd context alive
            bound = {g.devid for g in self.files.files if g.iommufd is f}
            for dev_id in list(f.iommufd_ctx.devices):
                if dev_id not in bound:
                    f.iommufd_ctx.unbind(self, dev_id)

    @property
    def next_id(self) -> int:
        """The id :meth:`take_id` returns next."""
        return self._next_id

    def take_id(self) -> int:
        new = self._next_id
        self._next_id += 1
        return new

    # -- the devices' dma files (the DmaPort of the IOMMU models) --------------------------------
    def send(self, device: str, command: str) -> None:
        """One command to ``devices/NAME/dma``; IoctlError with its errno if refused."""
        try:
            self.nodes.write_text(device, ("dma",), command)
        except IoctlError as exc:
            if exc.errno not in _NO_DMA:
                raise IoctlError(exc.errno, f"device {device} refused {command!r}") from None
            logger.debug("device %s has no DMA support: %r dropped", device, command)

    def report(self, device: str, command: str) -> bytes:
        """A ``report ...`` command to ``devices/NAME/dma`` and its reply (the bitmap)."""
        try:
            fd = os.open(self.nodes.dev_path(device, "dma"), os.O_RDWR)
        except OSError as exc:
            if exc.errno in _NO_DMA:
                return b""
            raise IoctlError(exc.errno or errno.EIO, f"open devices/{device}/dma") from None
        try:
            os.write(fd, command.encode())
            chunks, total = [], 0
            while total < MAX_DMA_REPLY:
                chunk = os.pread(fd, min(1 << 20, MAX_DMA_REPLY - total), total)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            if exc.errno in _NO_DMA:
                return b""
            raise IoctlError(exc.errno or errno.EIO, f"device {device}: {command!r}") from None
        finally:
            os.close(fd)

    def close(self) -> None:
        """The caller is gone: every device loses the mappings and eventfds it was given."""
        for name in {f.device for f in self.files.files if f.kind is NodeKind.CDEV and f.device}:
            self._irqs_off(name)
        for f in self.files.files:
            if f.kind is NodeKind.GROUP and f.device and f.container and f.container.type1:
                _iommufd.Type1.leave(self, f.device)
            if f.kind is NodeKind.IOMMU:
                for dev_id in list(f.iommufd_ctx.devices):
                    with contextlib.suppress(IoctlError):
                        f.iommufd_ctx.unbind(self, dev_id)

    def _irqs_off(self, device: str) -> None:
        """Release every interrupt eventfd of ``device``, as closing its last fd does."""
        with contextlib.suppress(IoctlError, OSError):
            self.nodes.write_text(device, ("irqs",), "disable\n")

    def container_devices(self, container: OpenFile) -> list[str]:
        """The devices of the groups set to ``container``."""
        names = []
        for f in self.files.files:
            grouped = f.kind is NodeKind.GROUP and f.container is container
            if grouped and f.device and f.device not in names:
                names.append(f.device)
        return names

    def find(self, call: Call, fd: int, ino: int) -> OpenFile | None:
        return self.files.find(call.pid, fd, ino)

    def entry(self, call: Call, fd: int, ino: int, kind: NodeKind, device: str | None) -> OpenFile:
        return self.files.entry(call.pid, fd, ino, kind, device)

    def dispatch(self, call: Call) -> int | None:
        """The ioctl's return value, None when ADDFD already answered it.

        Raises:
            IoctlError: the errno to answer.
            PassThrough: the fd is not on the mount; the kernel runs the ioctl.
        """
        st = self.files.stat_fd(call.pid, call.fd)
        if st.st_dev != self.nodes.dev:
            raise PassThrough
        kind, device = self.nodes.kind(st.st_ino)
        call.check_alive()
        if kind is NodeKind.CDEV:
            return self._cdev(call, st.st_ino, device)
        if kind is NodeKind.GROUP:
            return self._group(call, st.st_ino, device)
        if kind is NodeKind.CONTAINER:
            return self._container(call, st.st_ino)
        if kind is NodeKind.IOMMU:
            return _iommufd.iommu_ioctl(self, call, st.st_ino)
        if kind is NodeKind.DATA:
            return _device_ioctls.data_ioctl(self, call, st.st_ino, device)
        raise IoctlError(errno.ENOTTY, "not a VFIO node")

    # -- container / group -----------------------------------------------------------------------
    def _container(self, call: Call, ino: int) -> int:
        r = call.request
        if r == uapi.VFIO_GET_API_VERSION:
            return uapi.VFIO_API_VERSION
        entry = self.find(call, call.fd, ino)
        if r == uapi.VFIO_CHECK_EXTENSION:
            # vfio_iommu_type1_check_extension: UPDATE_VADDR and DMA_CC need the IOMMU set
            # (iommu_data is NULL before VFIO_SET_IOMMU); our domains enforce coherency
            always = (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_UNMAP_ALL)
            with_iommu = (uapi.VFIO_DMA_CC_IOMMU, uapi.VFIO_UPDATE_VADDR)
            has_iommu = entry is not None and entry.type1 is not None
            return int(call.arg in always or (has_iommu and call.arg in with_iommu))
        if r == uapi.VFIO_SET_IOMMU:
            if entry is None or entry.groups == 0 or entry.iommu_type:
                raise IoctlError(errno.EINVAL, "no group attached, or an IOMMU is already set")
            if call.arg not in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU):
                raise IoctlError(errno.ENODEV, f"IOMMU type {call.arg} not supported")
            entry.iommu_type = call.arg
            entry.type1 = _iommufd.Type1(v2=call.arg == uapi.VFIO_TYPE1v2_IOMMU)
            return 0
        if entry is None or entry.type1 is None:
            raise IoctlError(errno.EINVAL, "no IOMMU set (VFIO_SET_IOMMU first)")
        type1, mem, arg = entry.type1, call.mem, call.arg
        if r == uapi.VFIO_IOMMU_GET_INFO:
            return type1.get_info(mem, arg)
        devices = self.container_devices(entry)
        if r == uapi.VFIO_IOMMU_MAP_DMA:
            return type1.map_dma(mem, arg, call.process, self, devices)
        if r == uapi.VFIO_IOMMU_UNMAP_DMA:
            return type1.unmap_dma(mem, arg, self, devices)
        if r == uapi.VFIO_IOMMU_DIRTY_PAGES:
            return type1.dirty_pages(mem, arg, self, devices)
        raise IoctlError(errno.ENOTTY)

    def _group(self, call: Call, ino: int, device: str | None) -> int | None:
        r = call.request
        if r == uapi.VFIO_GROUP_GET_STATUS:
            argsz, _flags = uapi.GROUP_STATUS.unpack(call.mem.read(call.arg, 8))
            if argsz < uapi.GROUP_STATUS.size:
                raise IoctlError(errno.EINVAL, "argsz < 8")
            entry = self.find(call, call.fd, ino)
            flags = uapi.VFIO_GROUP_FLAGS_VIABLE
            if entry is not None and entry.container is not None:
                flags |= uapi.VFIO_GROUP_FLAGS_CONTAINER_SET
            call.mem.write(call.arg, uapi.GROUP_STATUS.pack(argsz, flags))
            return 0
        if r == uapi.VFIO_GROUP_SET_CONTAINER:
            return self._set_container(call, ino, device)
        if r == uapi.VFIO_GROUP_UNSET_CONTAINER:
            entry = self.find(call, call.fd, ino)
            if entry is None or entry.container is None:
                raise IoctlError(errno.EINVAL, "no container set")
            if entry.container.type1 is not None and entry.device:
                _iommufd.Type1.leave(self, entry.device)
            entry.container.groups -= 1
            if entry.container.groups == 0:  # the IOMMU goes with its last group
                entry.container.iommu_type = 0
                entry.container.type1 = None
            entry.container = None
            return 0
        if r == uapi.VFIO_GROUP_GET_DEVICE_FD:
            self._get_device_fd(call, ino, device)
            return None  # ADDFD answered: the ioctl returns the new fd
        raise IoctlError(errno.ENOTTY)

    def _set_container(self, call: Call, ino: int, device: str | None) -> int:
        (cfd,) = _I32.unpack(call.mem.read(call.arg, 4))
        if cfd < 0:
            raise IoctlError(errno.EINVAL, "negative fd")
        cst = self.files.stat_fd(call.pid, cfd)
        ckind = self.nodes.kind(cst.st_ino)[0] if cst.st_dev == self.nodes.dev else NodeKind.OTHER
        entry = self.find(call, call.fd, ino)
        if entry is not None and entry.container is not None:
            raise IoctlError(errno.EINVAL, "the group already has a container")
        if ckind not in (NodeKind.CONTAINER, NodeKind.IOMMU):
            raise IoctlError(errno.EBADFD, "not a container or iommufd")
        container = self.entry(call, cfd, cst.st_ino, ckind, None)
        entry = self.entry(call, call.fd, ino, NodeKind.GROUP, device)
        if container.type1 is not None and device:
            container.type1.replay(self, device)  # the IOMMU maps the container's DMA for it
        entry.container = container
        container.groups += 1
        return 0

    def _get_device_fd(self, call: Call, ino: int, device: str | None) -> None:
        # The kernel's order (drivers/vfio/group.c): strndup_user (EFAULT, EINVAL when
        # longer than a page), the lookup by name (vfio_device_get_from_name: ENODEV, or
        # the match's errno), then the open, which needs a container with an IOMMU (EINVAL).
        raw = call.mem.read_cstring(call.arg)
        dev = self.nodes.device(device)
        name = raw.decode(errors="replace")
        match_device_name(name, dev)
        entry = self.find(call, call.fd, ino)
        if (
            entry is None
            or entry.container is None
            or (entry.container.kind is NodeKind.CONTAINER and not entry.container.iommu_type)
        ):
            raise IoctlError(errno.EINVAL, "no container/IOMMU set")
        node = self.nodes.path / "dev" / "vfio" / "devices" / dev.cdev
        try:
            fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise IoctlError(exc.errno or errno.EIO, "open the device node") from None
        self.files.add(
            OpenFile(
                held=fd,
                ino=os.fstat(fd).st_ino,
                kind=NodeKind.CDEV,
                device=dev.name,
                bound=True,
                from_group=True,
            )
        )
        call.install_fd(fd, True)  # the ioctl returns the new fd

    # -- cdev ------------------------------------------------------------------------------------
    def _cdev(self, call: Call, ino: int, device: str | None) -> int:
        entry = self.find(call, call.fd, ino)
        r = call.request
        if r == uapi.VFIO_DEVICE_BIND_IOMMUFD:
            return self._bind(call, ino, device, entry)
        if entry is None or not entry.bound:
            raise IoctlError(errno.EINVAL, "the cdev is not bound to an iommufd")
        dev = self.nodes.device(device)
        if r == uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
            argsz, flags, pt_id = struct.unpack("<III", call.mem.read(call.arg, 12))
            if argsz < uapi.ATTACH_IOMMUFD_PT_MINSZ or flags:
                raise IoctlError(errno.EINVAL, "argsz < 12 or flags (PASID unsupported)")
            ctx = entry.iommufd.iommufd_ctx if entry.iommufd is not None else None
            if ctx is None or not ctx.has_pt(pt_id) or entry.devid not in ctx.devices:
                raise IoctlError(errno.ENOENT, f"no IOAS/HWPT {pt_id}")
            call.mem.write(call.arg + 8, _U32.pack(pt_id))  # probe before the side effect
            self._drop_stale(ctx, entry.devid, dev.name)
            hwpt = ctx.attach(self, entry.devid, pt_id, self.take_id)
            entry.pt_id = hwpt
            call.mem.write(call.arg + 8, _U32.pack(hwpt))
            return 0
        if r == uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT:
            argsz, flags = struct.unpack("<II", call.mem.read(call.arg, 8))
            if argsz < uapi.DETACH_IOMMUFD_PT_MINSZ or flags:
                raise IoctlError(errno.EINVAL, "argsz < 8 or flags")
            if entry.iommufd is not None:
                entry.iommufd.iommufd_ctx.detach(self, entry.devid)
            entry.pt_id = None
            return 0
        return _device_ioctls.device_ioctl(self, call, dev)

    def _drop_stale(self, ctx: _iommufd.Context, devid: int, device: str) -> None:
        """Detach ``device`` where an older binding still holds it (its fds were closed)."""
        for f in self.files.files:
            if f.kind is not NodeKind.IOMMU:
                continue
            for dev_id, att in list(f.iommufd_ctx.devices.items()):
                mine = f.iommufd_ctx is ctx and dev_id == devid
                if att.device == device and att.hwpt is not None and not mine:
                    f.iommufd_ctx.detach(self, dev_id)

    def _bind(self, call: Call, ino: int, device: str | None, entry: OpenFile | None) -> int:
        argsz, flags, iommufd, _devid = struct.unpack(
            "<IIiI", call.mem.read(call.arg, uapi.BIND_IOMMUFD_MINSZ)
        )
        if argsz < uapi.BIND_IOMMUFD_MINSZ or flags or iommufd < 0:
            raise IoctlError(errno.EINVAL, "argsz < 16, flags (no VF token support) or iommufd < 0")
        if entry is not None and entry.bound:
            raise IoctlError(errno.EINVAL, "already bound (or opened through the group)")
        ist = self.files.stat_fd(call.pid, iommufd)
        if ist.st_dev != self.nodes.dev or self.nodes.kind(ist.st_ino)[0] is not NodeKind.IOMMU:
            raise IoctlError(errno.EBADFD, "not an iommufd")
        dev_name = self.nodes.device(device).name
        call.mem.write(call.arg + 12, _U32.pack(0))  # probe before the side effect
        ictx = self.entry(call, iommufd, ist.st_ino, NodeKind.IOMMU, None)
        entry = self.entry(call, call.fd, ino, NodeKind.CDEV, device)
        entry.bound = True
        entry.iommufd = ictx
        entry.devid = self.take_id()
        ictx.iommufd_ctx.bind(entry.devid, dev_name)
        call.mem.write(call.arg + 12, _U32.pack(entry.devid))
        return 0
