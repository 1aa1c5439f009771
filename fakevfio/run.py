"""``fakevfio run``: run a program that sees a mount's devices as kernel VFIO nodes.

Theory of operation
-------------------
The child (which becomes COMMAND) enters a private mount namespace, where the
mount's node files appear at ``/dev/vfio`` and ``/dev/iommu`` (a tmpfs copy of
``/dev`` is built first when those paths do not exist). It then installs a
seccomp filter that turns every ``ioctl()`` with a request in the VFIO/iommufd
``';'`` range into a user notification, hands the listener fd to the parent
over a socketpair and ``exec``s COMMAND. Threads and forks of COMMAND inherit
the filter; the one listener serves them all.

The parent is the supervisor: it receives each notification, finds out which
file the caller's fd is (``stat`` of ``/proc/PID/fd/N``: same ``st_dev`` as the
mount and a known inode), reads and writes the caller's structs with
``process_vm_readv/writev`` and answers with the kernel's semantics
(``reference/linux-vfio-uapi.md``), driving the device through its files.

Rule 1: an fd that is not on the mount is none of our business: the ioctl
        continues into the kernel unchanged (SECCOMP_USER_NOTIF_FLAG_CONTINUE).
Rule 2: state that the kernel keeps per open file (a cdev's binding, a group's
        container, a container's IOMMU type, an iommufd's IOAS ids) is kept per
        open file description: the supervisor holds a copy of the file
        (``pidfd_getfd``) and recognises dups and forks with ``kcmp``.
Rule 3: new fds (GROUP_GET_DEVICE_FD, the data_fd of MIG_DEVICE_STATE) are
        opened by the supervisor on the mount and installed in the caller with
        SECCOMP_IOCTL_NOTIF_ADDFD (O_CLOEXEC). data_fd reads and writes never
        come here: they go straight to the FUSE session stream.
Rule 4: every request gets an answer; anything unexpected is logged and
        answered EIO. The caller's memory is checked (EFAULT) before any side
        effect that the kernel would not have made either.
Rule 5: the supervisor returns when COMMAND (the direct child) exits, with its
        exit status (128 + signal number if it was killed).

Known shortcomings: sessions are tracked by the supervisor (a data_fd is dead
after a session-ending SET or reset done *through the supervisor*); a session
ended and restarted by writing ``migration/state`` directly is not noticed for
old data_fds. A cdev may be bound by several open files at once (the kernel
allows one). Container DMA mapping ioctls are accepted and ignored; the iommufd
objects (IOAS, HWPT, IOVA mappings) are tracked but nothing is pinned
(:mod:`fakevfio._qemu_iommufd`, enough for QEMU's ``-device vfio-pci,iommufd=``);
IRQs report count 0; no IOMMU or device dirty tracking (QEMU needs
``enable-migration=on``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import ClassVar

import attrs

from fakevfio import _qemu_iommufd as _iommufd
from fakevfio import _seccomp as sc
from vfio_uapi import abi as uapi
from vfio_uapi.errors import IllegalTransition
from vfio_uapi.fsm import (
    PRECOPY_STATES,
    MigFlags,
    State,
    arcs_session_change,
    path,
)

logger = logging.getLogger(__name__)

#: Held copies of caller files before a garbage-collection scan of /proc.
MAX_HELD_FILES = 256
POLL_INTERVAL_MS = 100
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")

K_CONTAINER = "container"
K_IOMMU = "iommu"
K_GROUP = "group"
K_CDEV = "cdev"
K_DATA = "data"
K_OTHER = "other"


class _Errno(Exception):
    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(err, why)
        self.errno = err
        self.why = why


class _Continue(Exception):
    """Let the kernel run the ioctl itself (the fd is not on the mount)."""


@attrs.frozen(kw_only=True)
class _Request:
    id: int
    pid: int
    fd: int
    request: int
    arg: int


@attrs.frozen(kw_only=True)
class _DeviceInfo:
    name: str
    cdev: str
    group: int
    flags: int
    regions: dict[str, int]
    config_size: int


@attrs.define(eq=False)
class _File:
    """Supervisor-side state of one caller open file description (Rule 2)."""

    held: int  # our fd on the same open file description
    ino: int
    kind: str
    device: str | None = None
    bound: bool = False  # cdev: bound to an iommufd, or a device fd from a group
    from_group: bool = False
    devid: int = 0
    pt_id: int | None = None
    iommufd: _File | None = None
    container: _File | None = None  # group: its container (or iommufd, compat)
    iommu_type: int = 0  # container
    groups: int = 0  # container: attached groups
    iommufd_ctx: _iommufd.Context = attrs.Factory(_iommufd.Context)  # iommufd: IOAS, HWPT
    generation: int = 0  # data: the device's session generation at creation


class _CallerMemory:
    """The caller's memory for one request, with the supervisor's EFAULT mapping."""

    def __init__(self, sup: Supervisor, req: _Request) -> None:
        self._sup = sup
        self._req = req

    def read(self, addr: int, size: int) -> bytes:
        return self._sup._read(self._req, addr, size)

    def write(self, addr: int, data: bytes) -> None:
        self._sup._write(self._req, addr, data)


class Supervisor:
    """Answers the VFIO ioctls of a seccomp listener from a fakevfio mount."""

    def __init__(self, mountpoint: str, listener: int) -> None:
        self.mount = Path(mountpoint)
        self.listener = listener
        self.dev = os.stat(self.mount).st_dev
        self.notif_size, self.resp_size, _ = sc.notif_sizes()
        self.nodes: dict[int, tuple[str, str | None]] = {}
        self.devices: dict[str, _DeviceInfo] = {}
        self.files: list[_File] = []
        self.generation: dict[str, int] = {}
        self._next_id = 1
        self._pidfds: dict[int, int] = {}
        self.refresh()

    # -- node map ----------------------------------------------------------------------------
    def refresh(self) -> None:
        """(Re)build inode -> node kind from the mount's tree."""
        nodes: dict[int, tuple[str, str | None]] = {}

        def add(p: Path, kind: str, device: str | None) -> None:
            with contextlib.suppress(OSError):
                nodes[os.stat(p).st_ino] = (kind, device)

        add(self.mount / "dev" / "vfio" / "vfio", K_CONTAINER, None)
        add(self.mount / "dev" / "iommu", K_IOMMU, None)
        devices: dict[str, _DeviceInfo] = {}
        with contextlib.suppress(OSError):
            for entry in sorted(os.listdir(self.mount / "devices")):
                try:
                    info = json.loads((self.mount / "devices" / entry / "info").read_bytes())
                except (OSError, ValueError):
                    continue
                flags = 0
                for flag in info.get("migration_flags", []):
                    flags |= MigFlags[flag]
                dev = _DeviceInfo(
                    name=entry, cdev=str(info.get("cdev", "")), group=int(info["iommu_group"]),
                    flags=flags, regions={str(k): int(v) for k, v in info["regions"].items()},
                    config_size=int(info["config_size"]),
                )
                devices[entry] = dev
                add(self.mount / "dev" / "vfio" / "devices" / dev.cdev, K_CDEV, entry)
                add(self.mount / "dev" / "vfio" / str(dev.group), K_GROUP, entry)
                add(self.mount / "devices" / entry / "migration" / "data", K_DATA, entry)
        self.nodes = nodes
        self.devices = devices

    def _kind(self, ino: int) -> tuple[str, str | None]:
        if ino not in self.nodes:
            self.refresh()
        return self.nodes.get(ino, (K_OTHER, None))

    # -- the loop ----------------------------------------------------------------------------
    def serve(self, child: int) -> int:
        """Answer notifications until ``child`` exits; returns its exit status."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        hung_up = False
        while True:
            pid, status = os.waitpid(child, 0 if hung_up else os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code
            for _fd, events in poller.poll(POLL_INTERVAL_MS):
                if events & select.POLLIN:
                    self.handle_one()
                elif events & (select.POLLHUP | select.POLLERR):
                    hung_up = True  # no task uses the filter any more

    def close(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                os.close(f.held)
        self.files.clear()
        for fd in self._pidfds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pidfds.clear()

    def handle_one(self) -> None:
        buf = bytearray(max(self.notif_size, sc.NOTIF.size))
        try:
            fcntl.ioctl(self.listener, sc.SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                return
            raise
        nid, pid, _flags, _nr, _arch, _ip, a0, a1, a2, *_ = sc.NOTIF.unpack_from(buf)
        req = _Request(id=nid, pid=pid, fd=a0 & 0xFFFFFFFF, request=a1 & 0xFFFFFFFF, arg=a2)
        try:
            value = self._dispatch(req)
        except _Errno as exc:
            logger.debug("pid %d fd %d %s -> %s %s", pid, req.fd, uapi.ioctl_name(req.request),
                         errno.errorcode.get(exc.errno, exc.errno), exc.why)
            self._reply(nid, 0, exc.errno)
        except _Continue:
            self._reply(nid, 0, 0, sc.SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        except Exception:
            logger.exception("supervisor: unexpected error on %s", uapi.ioctl_name(req.request))
            self._reply(nid, 0, errno.EIO)
        else:
            logger.debug("pid %d fd %d %s -> %s", pid, req.fd, uapi.ioctl_name(req.request), value)
            if value is not None:
                self._reply(nid, value, 0)

    def _reply(self, nid: int, value: int, err: int, flags: int = 0) -> None:
        resp = bytearray(max(self.resp_size, sc.NOTIF_RESP.size))
        sc.NOTIF_RESP.pack_into(resp, 0, nid, value, -err, flags)
        try:
            fcntl.ioctl(self.listener, sc.SECCOMP_IOCTL_NOTIF_SEND, resp, True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the caller died or was interrupted
                raise

    def _valid(self, req: _Request) -> None:
        try:
            fcntl.ioctl(self.listener, sc.SECCOMP_IOCTL_NOTIF_ID_VALID,
                        bytearray(_U64.pack(req.id)), True)
        except OSError:
            raise _Errno(errno.ENOENT, "caller is gone") from None

    def _addfd(self, req: _Request, fd: int, *, send: bool) -> int:
        flags = sc.SECCOMP_ADDFD_FLAG_SEND if send else 0
        buf = bytearray(sc.NOTIF_ADDFD.pack(req.id, flags, fd, 0, os.O_CLOEXEC))
        try:
            return int(fcntl.ioctl(self.listener, sc.SECCOMP_IOCTL_NOTIF_ADDFD, buf, True))
        except OSError as exc:
            raise _Errno(exc.errno or errno.EIO, "ADDFD failed") from None

    # -- caller memory -----------------------------------------------------------------------
    def _read(self, req: _Request, addr: int, size: int) -> bytes:
        try:
            return sc.read_mem(req.pid, addr, size)
        except OSError:
            raise _Errno(errno.EFAULT, f"cannot read {size} bytes at 0x{addr:x}") from None

    def _write(self, req: _Request, addr: int, data: bytes) -> None:
        try:
            sc.write_mem(req.pid, addr, data)
        except OSError:
            raise _Errno(errno.EFAULT, f"cannot write {len(data)} bytes at 0x{addr:x}") from None

    # -- caller files ------------------------------------------------------------------------
    def _stat_fd(self, req: _Request, fd: int) -> os.stat_result:
        if fd >= 1 << 31:
            raise _Errno(errno.EBADF)
        try:
            return os.stat(f"/proc/{req.pid}/fd/{fd}")
        except FileNotFoundError:
            raise _Errno(errno.EBADF, f"fd {fd} is not open") from None
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise _Errno(errno.EIO, "the fakevfio mount is gone") from None
            raise _Continue from None

    def _pidfd(self, pid: int) -> int:
        if pid not in self._pidfds:
            try:
                self._pidfds[pid] = sc.pidfd_open(pid)
            except OSError:
                raise _Errno(errno.ESRCH, "caller is gone") from None
        return self._pidfds[pid]

    def _find(self, req: _Request, fd: int, ino: int) -> _File | None:
        for f in self.files:
            if f.ino == ino and sc.same_file(req.pid, fd, f.held):
                return f
        return None

    def _entry(self, req: _Request, fd: int, ino: int, kind: str, device: str | None) -> _File:
        """The state of the caller's open file ``fd``, created (and held) if new."""
        found = self._find(req, fd, ino)
        if found is not None:
            return found
        if len(self.files) >= MAX_HELD_FILES:
            self._collect()
        try:
            held = sc.pidfd_getfd(self._pidfd(req.pid), fd)
        except OSError:
            # a stale pidfd (pid reuse) or a vanished thread: retry once with a fresh one
            with contextlib.suppress(OSError):
                os.close(self._pidfds.pop(req.pid))
            try:
                held = sc.pidfd_getfd(self._pidfd(req.pid), fd)
            except OSError:
                raise _Errno(errno.EBADF, "cannot copy the caller's fd") from None
        new = _File(held=held, ino=ino, kind=kind, device=device)
        self.files.append(new)
        return new

    def _collect(self) -> None:
        """Drop held files no live process refers to any more (bounded memory)."""
        alive: set[int] = set()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                for fd_name in os.listdir(pid_dir / "fd"):
                    with contextlib.suppress(OSError):
                        st = os.stat(pid_dir / "fd" / fd_name)
                        if st.st_dev != self.dev:
                            continue
                        for i, f in enumerate(self.files):
                            if (i not in alive and f.ino == st.st_ino
                                    and sc.same_file(int(pid_dir.name), int(fd_name), f.held)):
                                alive.add(i)
        keep = []
        for i, f in enumerate(self.files):
            if i in alive:
                keep.append(f)
            else:
                with contextlib.suppress(OSError):
                    os.close(f.held)
        self.files = keep
        for pid in list(self._pidfds):
            if not Path(f"/proc/{pid}").exists():
                os.close(self._pidfds.pop(pid))

    # -- device files ------------------------------------------------------------------------
    def _dev_path(self, name: str, *rel: str) -> Path:
        return self.mount.joinpath("devices", name, *rel)

    def _read_text(self, name: str, *rel: str) -> str:
        try:
            with open(self._dev_path(name, *rel), "rb", buffering=0) as f:
                return f.read(65536).decode()
        except OSError as exc:
            raise _Errno(exc.errno or errno.EIO, f"read {'/'.join(rel)}") from None

    def _write_text(self, name: str, rel: tuple[str, ...], text: str) -> None:
        try:
            fd = os.open(self._dev_path(name, *rel), os.O_WRONLY)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        except OSError as exc:
            raise _Errno(exc.errno or errno.EIO, f"write {'/'.join(rel)}") from None

    def _state(self, name: str) -> State:
        return State[self._read_text(name, "migration", "state").strip()]

    def _device(self, name: str | None) -> _DeviceInfo:
        if name is None or name not in self.devices:
            self.refresh()
        if name is None or name not in self.devices:
            raise _Errno(errno.ENODEV, "the device was removed")
        return self.devices[name]

    def _end_session(self, name: str) -> None:
        self.generation[name] = self.generation.get(name, 0) + 1

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch(self, req: _Request) -> int | None:
        st = self._stat_fd(req, req.fd)
        if st.st_dev != self.dev:
            raise _Continue
        kind, device = self._kind(st.st_ino)
        self._valid(req)
        if kind == K_CDEV:
            return self._cdev(req, st.st_ino, device)
        if kind == K_GROUP:
            return self._group(req, st.st_ino, device)
        if kind == K_CONTAINER:
            return self._container(req, st.st_ino)
        if kind == K_IOMMU:
            return self._iommu(req, st.st_ino)
        if kind == K_DATA:
            return self._data(req, st.st_ino, device)
        raise _Errno(errno.ENOTTY, "not a VFIO node")

    # -- container / group / iommufd ---------------------------------------------------------
    def _container(self, req: _Request, ino: int) -> int:
        r = req.request
        if r == uapi.VFIO_GET_API_VERSION:
            return uapi.VFIO_API_VERSION
        if r == uapi.VFIO_CHECK_EXTENSION:
            return int(req.arg in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU,
                                   uapi.VFIO_DMA_CC_IOMMU, uapi.VFIO_UNMAP_ALL,
                                   uapi.VFIO_UPDATE_VADDR))
        entry = self._find(req, req.fd, ino)
        if r == uapi.VFIO_SET_IOMMU:
            if entry is None or entry.groups == 0 or entry.iommu_type:
                raise _Errno(errno.EINVAL, "no group attached, or an IOMMU is already set")
            if req.arg not in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU):
                raise _Errno(errno.ENODEV, f"IOMMU type {req.arg} not supported")
            entry.iommu_type = req.arg
            return 0
        if r in (uapi.VFIO_IOMMU_MAP_DMA, uapi.VFIO_IOMMU_UNMAP_DMA):
            if entry is None or not entry.iommu_type:
                raise _Errno(errno.EINVAL, "no IOMMU set")
            return 0  # emulated devices do no DMA: accepted and ignored
        raise _Errno(errno.ENOTTY)

    def _iommu(self, req: _Request, ino: int) -> int:
        r = req.request
        if r == uapi.VFIO_GET_API_VERSION:
            return uapi.VFIO_API_VERSION
        if r == uapi.VFIO_CHECK_EXTENSION:
            return int(req.arg in (uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU))
        if r == uapi.IOMMU_IOAS_ALLOC:
            raw = self._read(req, req.arg, uapi.IOMMU_IOAS_ALLOC_STRUCT.size)
            size, flags, _ = uapi.IOMMU_IOAS_ALLOC_STRUCT.unpack(raw)
            if size < uapi.IOMMU_IOAS_ALLOC_STRUCT.size:
                raise _Errno(errno.EINVAL, "size < 12")
            if flags:
                raise _Errno(errno.EOPNOTSUPP, "flags must be 0")
            self._write(req, req.arg + 8, _U32.pack(0))  # probe before the side effect
            entry = self._entry(req, req.fd, ino, K_IOMMU, None)
            ioas = self._next_id
            self._next_id += 1
            entry.iommufd_ctx.ioas[ioas] = _iommufd.Ioas()
            self._write(req, req.arg + 8, _U32.pack(ioas))
            return 0
        if r == uapi.IOMMU_DESTROY:
            size, obj = uapi.IOMMU_DESTROY_STRUCT.unpack(
                self._read(req, req.arg, uapi.IOMMU_DESTROY_STRUCT.size))
            if size < uapi.IOMMU_DESTROY_STRUCT.size:
                raise _Errno(errno.EINVAL, "size < 8")
            found = self._find(req, req.fd, ino)
            if found is None:
                raise _Errno(errno.ENOENT, f"no object {obj}")
            attached = {f.pt_id for f in self.files if f.iommufd is found and f.pt_id}
            with self._iommufd_errors():
                found.iommufd_ctx.destroy(obj, attached)
            return 0
        return self._iommufd_object_ioctl(req, ino)

    @contextlib.contextmanager
    def _iommufd_errors(self) -> Iterator[None]:
        try:
            yield
        except _iommufd.IommufdError as exc:
            raise _Errno(exc.errno, exc.why) from None

    def _iommufd_object_ioctl(self, req: _Request, ino: int) -> int:
        """The iommufd ioctls QEMU's iommufd backend issues (see :mod:`._qemu_iommufd`)."""
        handlers = {
            uapi.IOMMU_IOAS_MAP: _iommufd.Context.ioas_map,
            uapi.IOMMU_IOAS_UNMAP: _iommufd.Context.ioas_unmap,
            uapi.IOMMU_IOAS_IOVA_RANGES: _iommufd.Context.iova_ranges,
            uapi.IOMMU_OPTION: _iommufd.Context.option,
        }
        r = req.request
        if r not in handlers and r not in (uapi.IOMMU_GET_HW_INFO, uapi.IOMMU_HWPT_ALLOC):
            raise _Errno(errno.ENOTTY)
        mem = _CallerMemory(self, req)
        found = self._find(req, req.fd, ino)
        ctx = found.iommufd_ctx if found is not None else _iommufd.Context()
        dev_ids = {f.devid for f in self.files
                   if f.kind == K_CDEV and f.bound and found is not None and f.iommufd is found}
        with self._iommufd_errors():
            if r == uapi.IOMMU_GET_HW_INFO:
                return _iommufd.hw_info(mem, req.arg, dev_ids)
            if r == uapi.IOMMU_HWPT_ALLOC:
                result = ctx.hwpt_alloc(mem, req.arg, dev_ids, self._next_id)
                self._next_id += 1
                return result
            return handlers[r](ctx, mem, req.arg)

    def _group(self, req: _Request, ino: int, device: str | None) -> int | None:
        r = req.request
        if r == uapi.VFIO_GROUP_GET_STATUS:
            argsz, _flags = uapi.GROUP_STATUS.unpack(self._read(req, req.arg, 8))
            if argsz < uapi.GROUP_STATUS.size:
                raise _Errno(errno.EINVAL, "argsz < 8")
            entry = self._find(req, req.fd, ino)
            flags = uapi.VFIO_GROUP_FLAGS_VIABLE
            if entry is not None and entry.container is not None:
                flags |= uapi.VFIO_GROUP_FLAGS_CONTAINER_SET
            self._write(req, req.arg, uapi.GROUP_STATUS.pack(argsz, flags))
            return 0
        if r == uapi.VFIO_GROUP_SET_CONTAINER:
            (cfd,) = _I32.unpack(self._read(req, req.arg, 4))
            if cfd < 0:
                raise _Errno(errno.EINVAL, "negative fd")
            cst = self._stat_fd(req, cfd)
            ckind = self._kind(cst.st_ino)[0] if cst.st_dev == self.dev else K_OTHER
            entry = self._find(req, req.fd, ino)
            if entry is not None and entry.container is not None:
                raise _Errno(errno.EINVAL, "the group already has a container")
            if ckind not in (K_CONTAINER, K_IOMMU):
                raise _Errno(errno.EBADFD, "not a container or iommufd")
            container = self._entry(req, cfd, cst.st_ino, ckind, None)
            entry = self._entry(req, req.fd, ino, K_GROUP, device)
            entry.container = container
            container.groups += 1
            return 0
        if r == uapi.VFIO_GROUP_UNSET_CONTAINER:
            entry = self._find(req, req.fd, ino)
            if entry is None or entry.container is None:
                raise _Errno(errno.EINVAL, "no container set")
            entry.container.groups -= 1
            if entry.container.groups == 0:
                entry.container.iommu_type = 0
            entry.container = None
            return 0
        if r == uapi.VFIO_GROUP_GET_DEVICE_FD:
            entry = self._find(req, req.fd, ino)
            if entry is None or entry.container is None or (
                entry.container.kind == K_CONTAINER and not entry.container.iommu_type
            ):
                raise _Errno(errno.EINVAL, "no container/IOMMU set")
            try:
                raw = sc.read_cstring(req.pid, req.arg)
            except OSError as exc:
                raise _Errno(exc.errno or errno.EFAULT, "device name") from None
            name = raw.split(b" ", 1)[0].decode(errors="replace")
            dev = self._device(device)
            if name != dev.name:
                raise _Errno(errno.ENODEV, f"no device {name!r} in group {dev.group}")
            node = self.mount / "dev" / "vfio" / "devices" / dev.cdev
            try:
                fd = os.open(node, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise _Errno(exc.errno or errno.EIO, "open the device node") from None
            self.files.append(_File(held=fd, ino=os.fstat(fd).st_ino, kind=K_CDEV,
                                    device=dev.name, bound=True, from_group=True))
            self._addfd(req, fd, send=True)  # the ioctl returns the new fd
            return None
        raise _Errno(errno.ENOTTY)

    # -- device fd ---------------------------------------------------------------------------
    def _cdev(self, req: _Request, ino: int, device: str | None) -> int:
        entry = self._find(req, req.fd, ino)
        r = req.request
        if r == uapi.VFIO_DEVICE_BIND_IOMMUFD:
            return self._bind(req, ino, device, entry)
        if entry is None or not entry.bound:
            raise _Errno(errno.EINVAL, "the cdev is not bound to an iommufd")
        dev = self._device(device)
        if r == uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT:
            argsz, flags, pt_id = struct.unpack("<III", self._read(req, req.arg, 12))
            if argsz < uapi.ATTACH_IOMMUFD_PT_MINSZ or flags:
                raise _Errno(errno.EINVAL, "argsz < 12 or flags (PASID unsupported)")
            if entry.iommufd is None or not entry.iommufd.iommufd_ctx.has_pt(pt_id):
                raise _Errno(errno.ENOENT, f"no IOAS/HWPT {pt_id}")
            entry.pt_id = pt_id
            self._write(req, req.arg + 8, _U32.pack(pt_id))
            return 0
        if r == uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT:
            argsz, flags = struct.unpack("<II", self._read(req, req.arg, 8))
            if argsz < uapi.DETACH_IOMMUFD_PT_MINSZ or flags:
                raise _Errno(errno.EINVAL, "argsz < 8 or flags")
            entry.pt_id = None
            return 0
        handler = self._device_ioctls.get(r)
        if handler is None:
            raise _Errno(errno.ENOTTY)
        return handler(self, req, dev)

    def _bind(self, req: _Request, ino: int, device: str | None, entry: _File | None) -> int:
        argsz, flags, iommufd, _devid = struct.unpack(
            "<IIiI", self._read(req, req.arg, uapi.BIND_IOMMUFD_MINSZ))
        if argsz < uapi.BIND_IOMMUFD_MINSZ or flags or iommufd < 0:
            raise _Errno(errno.EINVAL, "argsz < 16, flags (no VF token support) or iommufd < 0")
        if entry is not None and entry.bound:
            raise _Errno(errno.EINVAL, "already bound (or opened through the group)")
        ist = self._stat_fd(req, iommufd)
        if ist.st_dev != self.dev or self._kind(ist.st_ino)[0] != K_IOMMU:
            raise _Errno(errno.EBADFD, "not an iommufd")
        self._device(device)
        self._write(req, req.arg + 12, _U32.pack(0))  # probe before the side effect
        ictx = self._entry(req, iommufd, ist.st_ino, K_IOMMU, None)
        entry = self._entry(req, req.fd, ino, K_CDEV, device)
        entry.bound = True
        entry.iommufd = ictx
        entry.devid = self._next_id
        self._next_id += 1
        self._write(req, req.arg + 12, _U32.pack(entry.devid))
        return 0

    def _get_info(self, req: _Request, dev: _DeviceInfo) -> int:
        argsz = _U32.unpack(self._read(req, req.arg, uapi.DEVICE_INFO_MINSZ)[:4])[0]
        if argsz < uapi.DEVICE_INFO_MINSZ:
            raise _Errno(errno.EINVAL, "argsz < 16")
        out = uapi.DEVICE_INFO.pack(
            argsz, uapi.VFIO_DEVICE_FLAGS_PCI | uapi.VFIO_DEVICE_FLAGS_RESET,
            uapi.VFIO_PCI_NUM_REGIONS, uapi.VFIO_PCI_NUM_IRQS, 0, 0,
        )
        self._write(req, req.arg, out[: min(argsz, len(out))])
        return 0

    def _get_region_info(self, req: _Request, dev: _DeviceInfo) -> int:
        argsz, _flags, index, _cap, _size, _off = uapi.REGION_INFO.unpack(
            self._read(req, req.arg, uapi.REGION_INFO.size))
        if argsz < uapi.REGION_INFO.size:
            raise _Errno(errno.EINVAL, "argsz < 32")
        if index >= uapi.VFIO_PCI_NUM_REGIONS:
            raise _Errno(errno.EINVAL, f"region index {index} >= 9")
        size = 0
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            size = dev.config_size
        elif index <= uapi.VFIO_PCI_BAR5_REGION_INDEX:
            size = dev.regions.get(f"bar{index}", 0)
        rw = uapi.VFIO_REGION_INFO_FLAG_READ | uapi.VFIO_REGION_INFO_FLAG_WRITE
        self._write(req, req.arg, uapi.REGION_INFO.pack(
            argsz, rw if size else 0, index, 0, size, uapi.region_offset(index)))
        return 0

    def _get_irq_info(self, req: _Request, dev: _DeviceInfo) -> int:
        argsz, _flags, index, _count = uapi.IRQ_INFO.unpack(
            self._read(req, req.arg, uapi.IRQ_INFO.size))
        if argsz < uapi.IRQ_INFO.size:
            raise _Errno(errno.EINVAL, "argsz < 16")
        if index >= uapi.VFIO_PCI_NUM_IRQS:
            raise _Errno(errno.EINVAL, f"irq index {index} >= 5")
        flags = uapi.VFIO_IRQ_INFO_EVENTFD
        if index == uapi.VFIO_PCI_INTX_IRQ_INDEX:
            flags |= uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED
        elif index in (uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX):
            flags |= uapi.VFIO_IRQ_INFO_NORESIZE
        # Emulated devices raise no interrupts: every index reports count 0.
        self._write(req, req.arg, uapi.IRQ_INFO.pack(argsz, flags, index, 0))
        return 0

    def _set_irqs(self, req: _Request, dev: _DeviceInfo) -> int:
        argsz, flags, index, start, count = uapi.IRQ_SET.unpack(
            self._read(req, req.arg, uapi.IRQ_SET.size))
        if argsz < uapi.IRQ_SET.size or index >= uapi.VFIO_PCI_NUM_IRQS:
            raise _Errno(errno.EINVAL, "argsz < 20 or bad index")
        if (count == 0 and start == 0 and flags == (uapi.VFIO_IRQ_SET_DATA_NONE
                                                    | uapi.VFIO_IRQ_SET_ACTION_TRIGGER)):
            return 0  # "disable": nothing to do
        raise _Errno(errno.EINVAL, "no interrupts on emulated devices (count is 0)")

    def _reset(self, req: _Request, dev: _DeviceInfo) -> int:
        self._write_text(dev.name, ("reset",), "1\n")
        self._end_session(dev.name)
        return 0

    def _feature(self, req: _Request, dev: _DeviceInfo) -> int:
        argsz, flags = uapi.DEVICE_FEATURE.unpack(self._read(req, req.arg, 8))
        if argsz < uapi.DEVICE_FEATURE.size:
            raise _Errno(errno.EINVAL, "argsz < 8")
        if flags & ~uapi.VFIO_DEVICE_FEATURE_ALL_FLAGS:
            raise _Errno(errno.EINVAL, "unknown flag bits")
        get, set_ = uapi.VFIO_DEVICE_FEATURE_GET, uapi.VFIO_DEVICE_FEATURE_SET
        probe = flags & uapi.VFIO_DEVICE_FEATURE_PROBE
        if flags & get and flags & set_ and not probe:
            raise _Errno(errno.EINVAL, "GET and SET without PROBE")
        index = flags & uapi.VFIO_DEVICE_FEATURE_MASK
        ops = {
            uapi.VFIO_DEVICE_FEATURE_MIGRATION: get,
            uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: get | set_,
            uapi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: get,
        }.get(index)
        if ops is None:
            # no logging ops on emulated devices; unknown features: vfio-pci says ENOTTY
            raise _Errno(errno.ENOTTY, f"feature {index} not supported")
        # vfio_check_feature()
        if flags & (get | set_) & ~ops:
            raise _Errno(errno.EINVAL, "GET/SET not supported by this feature")
        if probe:
            return 0
        if not flags & (get | set_):
            raise _Errno(errno.EINVAL, "neither GET nor SET")
        if argsz - 8 < 8:
            raise _Errno(errno.EINVAL, "payload smaller than the feature's minimum")
        payload = req.arg + 8
        if index == uapi.VFIO_DEVICE_FEATURE_MIGRATION:
            self._write(req, payload, uapi.FEATURE_MIGRATION.pack(dev.flags))
            return 0
        if index == uapi.VFIO_DEVICE_FEATURE_MIG_DATA_SIZE:
            size = int(self._read_text(dev.name, "migration", "data_size"))
            self._write(req, payload, uapi.FEATURE_MIG_DATA_SIZE.pack(size))
            return 0
        raw = self._read(req, payload, uapi.FEATURE_MIG_STATE.size)
        if not flags & set_:
            state = self._state(dev.name)
            self._write(req, payload, uapi.FEATURE_MIG_STATE.pack(int(state), -1))
            return 0
        return self._set_state(req, dev, raw)

    def _set_state(self, req: _Request, dev: _DeviceInfo, raw: bytes) -> int:
        payload = req.arg + 8
        target_no, _fd = uapi.FEATURE_MIG_STATE.unpack(raw)
        self._write(req, payload, raw)  # EFAULT now rather than after the state changed
        no_fd = uapi.FEATURE_MIG_STATE.pack(target_no, -1)
        before = self._state(dev.name)
        arcs: list[tuple[State, State]] = []
        if target_no < uapi.VFIO_DEVICE_STATE_NR:
            with contextlib.suppress(IllegalTransition):
                arcs = path(before, State(target_no), dev.flags)
        try:
            self._write_text(dev.name, ("migration", "state"), f"{target_no}\n")
        except _Errno:
            self._write(req, payload, no_fd)
            with contextlib.suppress(_Errno):
                reached = self._state(dev.name)
                done = []
                for arc in arcs:
                    if arc[0] == reached:
                        break
                    done.append(arc)
                if arcs_session_change(done).ends:
                    self._end_session(dev.name)
            raise
        change = arcs_session_change(arcs)
        if change.ends:
            self._end_session(dev.name)
        if not change.opens:
            self._write(req, payload, no_fd)
            return 0
        mode = os.O_WRONLY if change.writable else os.O_RDONLY
        try:
            fd = os.open(self._dev_path(dev.name, "migration", "data"), mode | os.O_CLOEXEC)
        except OSError as exc:
            self._write(req, payload, no_fd)
            raise _Errno(exc.errno or errno.EIO, "open migration/data") from None
        try:
            newfd = self._addfd(req, fd, send=False)
        except _Errno:
            os.close(fd)
            raise
        self.files.append(_File(held=fd, ino=os.fstat(fd).st_ino, kind=K_DATA, device=dev.name,
                                generation=self.generation.get(dev.name, 0)))
        self._write(req, payload, uapi.FEATURE_MIG_STATE.pack(target_no, newfd))
        return 0

    # -- data_fd -----------------------------------------------------------------------------
    def _data(self, req: _Request, ino: int, device: str | None) -> int:
        if req.request != uapi.VFIO_MIG_GET_PRECOPY_INFO:
            raise _Errno(errno.ENOTTY)
        raw = self._read(req, req.arg, uapi.PRECOPY_INFO.size)
        argsz, flags, _i, _d = uapi.PRECOPY_INFO.unpack(raw)
        if argsz < uapi.PRECOPY_INFO.size:
            raise _Errno(errno.EINVAL, "argsz < 24")
        dev = self._device(device)
        if self._state(dev.name) not in PRECOPY_STATES:
            raise _Errno(errno.EINVAL, "not in PRE_COPY/PRE_COPY_P2P")
        entry = self._find(req, req.fd, ino)
        if entry is not None and entry.generation != self.generation.get(dev.name, 0):
            raise _Errno(errno.ENODEV, "the session of this data_fd has ended")
        fields = dict(
            line.split() for line in self._read_text(dev.name, "migration", "precopy_info")
            .splitlines() if line.strip()
        )
        out = uapi.PRECOPY_INFO.pack(argsz, flags, int(fields["initial_bytes"]),
                                     int(fields["dirty_bytes"]))
        self._write(req, req.arg, out)
        return 0

    _device_ioctls: ClassVar[dict[int, Callable[[Supervisor, _Request, _DeviceInfo], int]]] = {
        uapi.VFIO_DEVICE_GET_INFO: _get_info,
        uapi.VFIO_DEVICE_GET_REGION_INFO: _get_region_info,
        uapi.VFIO_DEVICE_GET_IRQ_INFO: _get_irq_info,
        uapi.VFIO_DEVICE_SET_IRQS: _set_irqs,
        uapi.VFIO_DEVICE_RESET: _reset,
        uapi.VFIO_DEVICE_FEATURE: _feature,
    }


# -- the child: namespace, filter, exec -------------------------------------------------------
def _enter_namespace(mount: Path, stage: str) -> None:
    """Private mount namespace with the mount's nodes at /dev/vfio and /dev/iommu."""
    sc.unshare(sc.CLONE_NEWNS)
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_SLAVE)
    if not (os.path.isdir("/dev/vfio") and os.path.exists("/dev/iommu")):
        # Build a tmpfs /dev that holds everything the real one has, plus our two paths,
        # so nothing is created in the shared /dev.
        sc.mount("/dev", stage, None, sc.MS_BIND | sc.MS_REC)
        sc.mount("tmpfs", "/dev", "tmpfs", 0, "mode=755")
        for entry in os.scandir(stage):
            target = f"/dev/{entry.name}"
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
            elif entry.is_dir(follow_symlinks=False):
                os.mkdir(target)
                sc.mount(entry.path, target, None, sc.MS_BIND | sc.MS_REC)
            else:
                with open(target, "wb"):
                    pass
                sc.mount(entry.path, target, None, sc.MS_BIND)
        sc.umount2(stage, sc.MNT_DETACH)
        if not os.path.isdir("/dev/vfio"):
            os.mkdir("/dev/vfio")
        if not os.path.exists("/dev/iommu"):
            with open("/dev/iommu", "wb"):
                pass
    sc.mount(str(mount / "dev" / "vfio"), "/dev/vfio", None, sc.MS_BIND | sc.MS_REC)
    sc.mount(str(mount / "dev" / "iommu"), "/dev/iommu", None, sc.MS_BIND)


def _child(mount: Path, stage: str, sock: socket.socket, argv: Sequence[str]) -> None:
    try:
        _enter_namespace(mount, stage)
        listener = sc.install_filter()
        socket.send_fds(sock, [b"L"], [listener])
        os.close(listener)
        sock.close()
        os.execvp(argv[0], list(argv))
    except BaseException as exc:  # noqa: BLE001 (the child must never return to the caller)
        with contextlib.suppress(BaseException):
            print(f"fakevfio run: {argv[0]}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)


def run_command(mountpoint: str, argv: list[str]) -> int:
    """Run ``argv`` with the mount's devices as kernel VFIO nodes; returns its exit status."""
    if not argv:
        print("fakevfio run: no command given", file=sys.stderr)
        return 2
    mount = Path(mountpoint).resolve()
    for rel in ("dev/vfio", "dev/iommu"):
        if not (mount / rel).exists():
            print(f"fakevfio run: {mount / rel} does not exist (not a fakevfio mount?)",
                  file=sys.stderr)
            return 1
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stage = tempfile.mkdtemp(prefix="fakevfio-run-")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        _child(mount, stage, child_sock, argv)
    child_sock.close()
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    supervisor: Supervisor | None = None
    try:
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(parent_sock, 16, 1)
        finally:
            parent_sock.close()
            with contextlib.suppress(OSError):
                os.rmdir(stage)
        if not fds:  # set-up failed; the child said why
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
        supervisor = Supervisor(str(mount), fds[0])
        return supervisor.serve(pid)
    finally:
        if supervisor is not None:
            supervisor.close()
            os.close(supervisor.listener)
        signal.signal(signal.SIGINT, old_int)
