"""The caller's files and memory: pidfds, ``kcmp``, the held-file table, ``process_vm_*``.

State the kernel keeps per open file (a cdev's binding, a group's container, a
container's IOMMU type, an iommufd's objects) is kept here per open file
description: the supervisor holds a copy of the caller's file
(``pidfd_getfd``) and recognises dups and forks with ``kcmp(KCMP_FILE)``. The
table is bounded: past :data:`MAX_HELD_FILES` a scan of ``/proc`` drops the
files no live process refers to any more. The caller's structs are read and
written with ``process_vm_readv/writev``, every failure answered EFAULT.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

import attrs

from fakevfio._libc import SYS_KCMP, syscall
from fakevfio._process import pidfd_getfd, pidfd_open, read_mem, write_mem
from fakevfio._run._fileid import FileId, file_id
from fakevfio._run._iommufd import Context, Type1
from fakevfio._run._nodes import NodeKind
from fakevfio.errors import IoctlError

#: Held copies of caller files before a garbage-collection scan of /proc.
MAX_HELD_FILES = 256
KCMP_FILE = 0


class PassThrough(Exception):  # a control-flow signal, not an error
    """Let the kernel run the ioctl itself (the fd is not on the mount)."""


# -- syscalls ------------------------------------------------------------------------------------
def same_file(pid: int, fd: int, my_fd: int) -> bool:
    """kcmp(KCMP_FILE): whether ``pid``'s ``fd`` is the open file description ``my_fd``."""
    return syscall(SYS_KCMP, _my_pid[0], pid, KCMP_FILE, my_fd, fd) == 0


#: this process's pid, for kcmp on every ioctl (a forked child refreshes it)
_my_pid = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _my_pid.__setitem__(0, os.getpid()))


def read_cstring(read: Callable[[int, int], bytes], addr: int, limit: int = 4096) -> bytes:
    """A NUL-terminated string without the NUL, read page by page (like strndup_user).

    ``read(addr, size)`` reads the memory; a string longer than ``limit`` is
    OSError(EINVAL).
    """
    out = bytearray()
    while len(out) < limit:
        chunk_len = min(limit - len(out), 4096 - ((addr + len(out)) % 4096))
        chunk = read(addr + len(out), chunk_len)
        nul = chunk.find(b"\0")
        if nul >= 0:
            return bytes(out + chunk[:nul])
        out += chunk
    raise OSError(errno.EINVAL, "string too long")


@attrs.define(eq=False)
class CallerMemory:
    """The memory of caller ``pid``, with the supervisor's errno mapping (EFAULT)."""

    pid: int

    def read(self, addr: int, size: int) -> bytes:
        try:
            return read_mem(self.pid, addr, size)
        except OSError:
            raise IoctlError(errno.EFAULT, f"cannot read {size} bytes at 0x{addr:x}") from None

    def write(self, addr: int, data: bytes) -> None:
        try:
            write_mem(self.pid, addr, data)
        except OSError:
            raise IoctlError(
                errno.EFAULT, f"cannot write {len(data)} bytes at 0x{addr:x}"
            ) from None

    def read_cstring(self, addr: int) -> bytes:
        """A device name argument (GROUP_GET_DEVICE_FD); the errno is process_vm_readv's."""
        try:
            return read_cstring(lambda a, n: read_mem(self.pid, a, n), addr)
        except OSError as exc:
            raise IoctlError(exc.errno or errno.EFAULT, "device name") from None


def thread_group(tid: int) -> int:
    """The thread group id (process) of thread ``tid``; ``tid`` itself if unknown."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f.read(4096).splitlines():
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return tid


# -- the held-file table -------------------------------------------------------------------------
@attrs.define(eq=False)
class OpenFile:
    """Supervisor-side state of one caller open file description."""

    held: int  # our fd on the same open file description
    ino: int
    kind: NodeKind
    device: str | None = None
    bound: bool = False  # cdev: bound to an iommufd, or a device fd from a group
    from_group: bool = False
    devid: int = 0
    pt_id: int | None = None
    iommufd: OpenFile | None = None
    container: OpenFile | None = None  # group: its container (or iommufd, compat)
    iommu_type: int = 0  # container
    type1: Type1 | None = None  # container: its type1 IOMMU once set
    groups: int = 0  # container: attached groups
    iommufd_ctx: Context = attrs.Factory(Context)  # iommufd: IOAS, HWPT
    generation: int = 0  # data: the device's session generation at creation


@attrs.define(eq=False)
class HeldFiles:
    """The caller open files the supervisor holds a copy of, on the mount ``dev``."""

    dev: int  # st_dev of the mount
    files: list[OpenFile] = attrs.Factory(list)
    _pidfds: dict[int, int] = attrs.Factory(dict)
    #: told of each file :meth:`collect` drops (the caller closed it): its state is undone
    on_drop: Callable[[OpenFile], None] | None = None

    def close(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                os.close(f.held)
        self.files.clear()
        for fd in self._pidfds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._pidfds.clear()

    def add(self, file: OpenFile) -> None:
        """Hold a file the supervisor opened itself (a device fd, a data_fd)."""
        self.files.append(file)

    def stat_fd(self, pid: int, fd: int) -> FileId:
        """What ``pid``'s ``fd`` is: EBADF if not open, PassThrough if not ours to know."""
        if fd >= 1 << 31:
            raise IoctlError(errno.EBADF)
        try:
            return file_id(b"/proc/%d/fd/%d" % (pid, fd))
        except FileNotFoundError:
            raise IoctlError(errno.EBADF, f"fd {fd} is not open") from None
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise IoctlError(errno.EIO, "the fakevfio mount is gone") from None
            raise PassThrough from None

    def find(self, pid: int, fd: int, ino: int) -> OpenFile | None:
        """The held state of ``pid``'s open file ``fd`` (inode ``ino``), if any."""
        for f in self.files:
            if f.ino == ino and same_file(pid, fd, f.held):
                return f
        return None

    def entry(self, pid: int, fd: int, ino: int, kind: NodeKind, device: str | None) -> OpenFile:
        """The state of the caller's open file ``fd``, created (and held) if new."""
        found = self.find(pid, fd, ino)
        if found is not None:
            return found
        if len(self.files) >= MAX_HELD_FILES:
            self.collect()
        try:
            held = pidfd_getfd(self._pidfd(pid), fd)
        except OSError:
            # a stale pidfd (pid reuse) or a vanished thread: retry once with a fresh one
            with contextlib.suppress(OSError):
                os.close(self._pidfds.pop(pid))
            try:
                held = pidfd_getfd(self._pidfd(pid), fd)
            except OSError:
                raise IoctlError(errno.EBADF, "cannot copy the caller's fd") from None
        new = OpenFile(held=held, ino=ino, kind=kind, device=device)
        self.files.append(new)
        return new

    def _pidfd(self, pid: int) -> int:
        """A pidfd of ``pid``'s process: pidfd_open needs the thread group leader (before
        Linux 6.9's PIDFD_THREAD) and the fd table is the process's anyway."""
        if pid not in self._pidfds:
            try:
                self._pidfds[pid] = pidfd_open(thread_group(pid))
            except OSError:
                raise IoctlError(errno.ESRCH, "caller is gone") from None
        return self._pidfds[pid]

    def collect(self) -> None:
        """Drop held files no live process refers to any more (bounded memory)."""
        alive: set[int] = set()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
                continue
            with contextlib.suppress(OSError):
                for fd_name in os.listdir(pid_dir / "fd"):
                    with contextlib.suppress(OSError):
                        st = file_id(f"{pid_dir}/fd/{fd_name}")  # no GETATTR per fd
                        if st.st_dev != self.dev:
                            continue
                        for i, f in enumerate(self.files):
                            if (
                                i not in alive
                                and f.ino == st.st_ino
                                and same_file(int(pid_dir.name), int(fd_name), f.held)
                            ):
                                alive.add(i)
        keep = [f for i, f in enumerate(self.files) if i in alive]
        dropped = [f for i, f in enumerate(self.files) if i not in alive]
        self.files = keep
        for f in dropped:
            if self.on_drop is not None:
                with contextlib.suppress(IoctlError):
                    self.on_drop(f)
            with contextlib.suppress(OSError):
                os.close(f.held)
        for pid in list(self._pidfds):
            if not Path(f"/proc/{pid}").exists():
                os.close(self._pidfds.pop(pid))
