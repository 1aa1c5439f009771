"""The seccomp listener of ``fakevfio run`` (:mod:`fakevfio._run._notify`) on a real filter.

A forked child installs the filter of :mod:`fakevfio._run._child` and hands over its
listener; the test process is the supervisor. No mount and no privilege is needed
(the filter sets NO_NEW_PRIVS).
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import socket
import sys

import pytest

from fakevfio._run._child import install_filter
from fakevfio._run._notify import Listener
from vfio_uapi import abi as uapi

if sys.platform != "linux" or os.uname().machine != "x86_64":
    pytest.skip("the seccomp listener uses x86-64 Linux syscalls", allow_module_level=True)


def _kernel() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    assert m is not None
    return int(m.group(1)), int(m.group(2))


def test_listener_answers_a_notified_ioctl_in_sync_wake_up_mode() -> None:
    r, w = os.pipe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the caller: one VFIO ioctl, its result as the exit status
        status = 254
        try:
            ours.close()
            fd = install_filter()
            socket.send_fds(theirs, [b"L"], [fd])
            os.close(fd)
            result = fcntl.ioctl(r, uapi.VFIO_GET_API_VERSION)
            status = result if 0 <= result < 254 else 253
        finally:
            os._exit(status)
    theirs.close()
    listener: Listener | None = None
    reaped = False
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 16, 1)
        assert fds, "the child sent no listener"
        listener = Listener.open(fds[0])
        # Linux 6.6 added SECCOMP_IOCTL_NOTIF_SET_FLAGS; before it the mode is off
        assert listener.sync_wake_up == (_kernel() >= (6, 6))
        assert select.select([listener.fd], [], [], 10)[0], "no notification within 10 s"
        req = listener.receive()
        assert req is not None
        assert (req.pid, req.fd, req.request) == (pid, r, uapi.VFIO_GET_API_VERSION)
        listener.reply(req.id, 42, 0)
        _, status = os.waitpid(pid, 0)
        reaped = True
        assert os.waitstatus_to_exitcode(status) == 42
    finally:
        ours.close()
        os.close(r)
        os.close(w)
        if listener is not None:
            listener.close()
        if not reaped:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
