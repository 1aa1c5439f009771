"""The operating-system side of DMA and interrupts: other processes' memory, fds and eventfds.

:class:`OsServices` is the :class:`fakevfio._host.HostServices` a mount
hands its devices: ``process_vm_readv/writev`` for DMA into the memory a VMM
mapped, ``pidfd_getfd`` for the eventfds a VMM passed in ``SET_IRQS``, and
one watcher thread that turns signals on resample eventfds into callbacks.
The supervisor of ``fakevfio run`` uses the same syscalls for its callers'
ioctl arguments.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import selectors
import threading
from collections.abc import Callable

from fakevfio._libc import SYS_PIDFD_GETFD, SYS_PIDFD_OPEN, check, libc, syscall

PIDFD_THREAD = os.O_EXCL


def pidfd_open(pid: int) -> int:
    """A pidfd for a process or (kernel >= 6.9) a thread."""
    fd = syscall(SYS_PIDFD_OPEN, pid, 0)
    if fd < 0 and ctypes.get_errno() == errno.EINVAL:  # a non-leader thread
        fd = syscall(SYS_PIDFD_OPEN, pid, PIDFD_THREAD)
    return check(fd, f"pidfd_open({pid})")


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A copy (same open file description) of another process's fd, O_CLOEXEC."""
    return check(syscall(SYS_PIDFD_GETFD, pidfd, targetfd, 0), "pidfd_getfd")


class _IoVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


libc.process_vm_readv.restype = ctypes.c_ssize_t
libc.process_vm_writev.restype = ctypes.c_ssize_t


def read_mem(pid: int, addr: int, size: int) -> bytes:
    """``size`` bytes of ``pid``'s memory at ``addr``; OSError(EFAULT) if not all mapped."""
    if size == 0:
        return b""
    if addr <= 0 or addr + size > 1 << 64:
        raise OSError(errno.EFAULT, "bad address")
    buf = ctypes.create_string_buffer(size)
    local = _IoVec(ctypes.addressof(buf), size)
    remote = _IoVec(addr, size)
    n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != size:
        err = ctypes.get_errno() if n < 0 else errno.EFAULT
        raise OSError(errno.EFAULT if err in (errno.EFAULT, 0) else err, "process_vm_readv")
    return buf.raw


def write_mem(pid: int, addr: int, data: bytes | memoryview) -> None:
    """Write ``data`` into ``pid``'s memory at ``addr`` (honours page protections)."""
    size = len(data)
    if not size:
        return
    if addr <= 0 or addr + size > 1 << 64:
        raise OSError(errno.EFAULT, "bad address")
    buf = ctypes.create_string_buffer(bytes(data), size)
    local = _IoVec(ctypes.addressof(buf), size)
    remote = _IoVec(addr, size)
    n = libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != size:
        err = ctypes.get_errno() if n < 0 else errno.EFAULT
        raise OSError(errno.EFAULT if err in (errno.EFAULT, 0) else err, "process_vm_writev")


class OsServices:
    """:class:`fakevfio._host.HostServices` on this machine's syscalls."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._selector: selectors.DefaultSelector | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        #: Callbacks of the watcher thread that raised (they are not re-raised anywhere).
        self.callback_errors = 0

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        return read_mem(pid, addr, size)

    def write_memory(self, pid: int, addr: int, data: bytes | memoryview) -> None:
        write_mem(pid, addr, data)

    def take_fd(self, pid: int, fd: int) -> int:
        pidfd = pidfd_open(pid)
        try:
            return pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)

    def close_fd(self, fd: int) -> None:
        os.close(fd)

    def signal_eventfd(self, fd: int) -> None:
        os.eventfd_write(fd, 1)

    # -- the watcher thread -----------------------------------------------------------------------
    def watch_eventfd(self, fd: int, callback: Callable[[], None]) -> None:
        with self._lock:
            if self._selector is None:
                self._selector = selectors.DefaultSelector()
                self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
                self._selector.register(self._wake_r, selectors.EVENT_READ, None)
                self._thread = threading.Thread(
                    target=self._watch, name="fakevfio-eventfd-watch", daemon=True
                )
                self._thread.start()
            self._selector.register(fd, selectors.EVENT_READ, callback)
            self._wake()

    def unwatch_eventfd(self, fd: int) -> None:
        with self._lock:
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(fd)
                self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _watch(self) -> None:
        """The watcher thread: read each signalled eventfd, then call its callback.

        The check that the fd is still watched and the read happen under the
        lock, so once :meth:`unwatch_eventfd` returns, the fd is never read
        again (the caller may close it). Callbacks run without the lock (they
        take device locks, and watch/unwatch are called under those), and a
        callback that raises does not stop the thread.
        """
        selector = self._selector
        assert selector is not None
        while True:
            for key, _events in selector.select():
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                with self._lock:
                    if selector.get_map().get(key.fd) is not key or not _readable(key.fd):
                        continue
                    try:
                        os.eventfd_read(key.fd)
                    except BlockingIOError:
                        continue
                    except OSError:
                        with contextlib.suppress(KeyError, ValueError):
                            selector.unregister(key.fd)
                        continue
                try:
                    key.data()
                except Exception:  # noqa: BLE001 - one bad callback must not stop the watcher
                    self.callback_errors += 1


def _readable(fd: int) -> bool:
    """Whether a read of ``fd`` would not block now (a watched fd may be shared)."""
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return any(ev & select.POLLIN for _fd, ev in poll.poll(0))
