"""The seccomp user-notification loop: receive a notification, answer it, install fds.

The listener fd comes from the child's filter (:mod:`._child`). One
notification is one ioctl of a caller thread; it is answered with a value, an
errno, or "continue into the kernel" (SECCOMP_USER_NOTIF_FLAG_CONTINUE), and
new fds reach the caller through SECCOMP_IOCTL_NOTIF_ADDFD. Numbers are from
``include/uapi/linux/seccomp.h`` (x86-64 struct sizes 80, 24, 8, 24; checked by
the ABI test where the installed header has them). No VFIO policy lives here.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import struct
from collections.abc import Callable

import attrs

from fakevfio._libc import SYS_PIDFD_OPEN, SYS_SECCOMP, check, syscall
from fakevfio.errors import IoctlError

POLL_INTERVAL_MS = 100
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1 << 0
SECCOMP_ADDFD_FLAG_SETFD = 1 << 0
SECCOMP_ADDFD_FLAG_SEND = 1 << 1

# _IOWR('!', 0, struct seccomp_notif) etc.
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104  # _IOW('!', 4, __u64), Linux >= 6.6
#: Wake the supervisor on the caller's CPU and back (WF_CURRENT_CPU): one notification is
#: a synchronous hand-off, and a cross-CPU wake-up each way was most of its cost.
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1 << 0

#: struct seccomp_notif: id, pid, flags, then seccomp_data (nr, arch, ip, args[6])
NOTIF = struct.Struct("<QIIiIQ6Q")
#: struct seccomp_notif_resp: id, val, error, flags
NOTIF_RESP = struct.Struct("<QqiI")
#: struct seccomp_notif_addfd: id, flags, srcfd, newfd, newfd_flags
NOTIF_ADDFD = struct.Struct("<QIIII")
NOTIF_SIZES = struct.Struct("<HHH")
_U64 = struct.Struct("<Q")


def notif_sizes() -> tuple[int, int, int]:
    """SECCOMP_GET_NOTIF_SIZES: (notif, resp, data) sizes of the running kernel."""
    buf = ctypes.create_string_buffer(NOTIF_SIZES.size)
    check(
        syscall(SYS_SECCOMP, SECCOMP_GET_NOTIF_SIZES, 0, ctypes.addressof(buf)),
        "seccomp(GET_NOTIF_SIZES)",
    )
    notif, resp, data = NOTIF_SIZES.unpack(buf.raw)
    return notif, resp, data


def set_sync_wake_up(fd: int) -> bool:
    """Turn on the listener's synchronous wake-up mode; False where the kernel has none."""
    try:
        fcntl.ioctl(fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
    except OSError:
        return False  # EINVAL before Linux 6.6: the usual wake-ups, only slower
    return True


@attrs.frozen(kw_only=True)
class Request:
    """One notified ``ioctl(fd, request, arg)`` of thread ``pid``."""

    id: int
    pid: int
    fd: int
    request: int
    arg: int


@attrs.define(eq=False)
class Listener:
    """The supervisor's end of the seccomp listener fd (owned: :meth:`close` closes it)."""

    fd: int
    notif_size: int
    resp_size: int
    #: SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP is on (a kernel before 6.6 has no such mode)
    sync_wake_up: bool = False

    @classmethod
    def open(cls, fd: int) -> Listener:
        notif_size, resp_size, _ = notif_sizes()
        listener = cls(fd, notif_size, resp_size)
        listener.sync_wake_up = set_sync_wake_up(fd)
        return listener

    def close(self) -> None:
        os.close(self.fd)

    def receive(self) -> Request | None:
        """The next notification, or None when it vanished (caller interrupted or gone)."""
        buf = bytearray(max(self.notif_size, NOTIF.size))
        try:
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as exc:
            if exc.errno in (errno.EINTR, errno.ENOENT, errno.EAGAIN):
                return None
            raise
        nid, pid, _flags, _nr, _arch, _ip, a0, a1, a2, *_ = NOTIF.unpack_from(buf)
        return Request(id=nid, pid=pid, fd=a0 & 0xFFFFFFFF, request=a1 & 0xFFFFFFFF, arg=a2)

    def reply(self, nid: int, value: int, err: int, flags: int = 0) -> None:
        resp = bytearray(max(self.resp_size, NOTIF_RESP.size))
        NOTIF_RESP.pack_into(resp, 0, nid, value, -err, flags)
        try:
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_SEND, resp, True)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the caller died or was interrupted
                raise

    def reply_continue(self, nid: int) -> None:
        """Let the kernel run the ioctl itself."""
        self.reply(nid, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)

    def check_valid(self, nid: int) -> None:
        """IoctlError(ENOENT) unless notification ``nid`` is still pending."""
        try:
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_ID_VALID, bytearray(_U64.pack(nid)), True)
        except OSError:
            raise IoctlError(errno.ENOENT, "caller is gone") from None

    def add_fd(self, nid: int, fd: int, *, send: bool) -> int:
        """Install a copy of our ``fd`` in the caller (O_CLOEXEC); returns its number there.

        With ``send`` the notification is answered too: the ioctl returns the new fd.
        """
        flags = SECCOMP_ADDFD_FLAG_SEND if send else 0
        buf = bytearray(NOTIF_ADDFD.pack(nid, flags, fd, 0, os.O_CLOEXEC))
        try:
            return int(fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_ADDFD, buf, True))
        except OSError as exc:
            raise IoctlError(exc.errno or errno.EIO, "ADDFD failed") from None

    def serve(self, child: int, handle: Callable[[Request], None]) -> int:
        """Hand each notification to ``handle`` until ``child`` exits; returns its status.

        The status is the exit code, or 128 + the signal number if it was killed.
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        # A pidfd of the child is readable once it exits, so waitpid runs only then
        # (and on a poll timeout), not once per notification; without pidfds (before
        # Linux 5.3) it runs every time.
        pidfd = syscall(SYS_PIDFD_OPEN, child, 0)
        if pidfd >= 0:
            poller.register(pidfd, select.POLLIN)
        hung_up = False
        look = True
        try:
            while True:
                if look or hung_up:
                    pid, status = os.waitpid(child, 0 if hung_up else os.WNOHANG)
                    if pid:
                        code = os.waitstatus_to_exitcode(status)
                        return code if code >= 0 else 128 - code
                events = poller.poll(POLL_INTERVAL_MS)
                look = pidfd < 0 or not events
                for fd, revents in events:
                    if fd == pidfd:
                        look = True
                    elif revents & select.POLLIN:
                        req = self.receive()
                        if req is not None:
                            handle(req)
                    elif revents & (select.POLLHUP | select.POLLERR):
                        hung_up = True  # no task uses the filter any more
        finally:
            if pidfd >= 0:
                os.close(pidfd)
