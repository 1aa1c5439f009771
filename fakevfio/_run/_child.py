"""The child's set-up: a private mount namespace, the seccomp filter, then ``exec``.

The child (which becomes COMMAND) enters a private mount namespace where the
mount's node files appear at ``/dev/vfio`` and ``/dev/iommu`` (a tmpfs copy of
``/dev`` is built first when those paths do not exist, so nothing is created
in the shared ``/dev``). It then installs a seccomp filter that turns every
``ioctl()`` with a request in the VFIO/iommufd ``';'`` range into a user
notification, hands the listener fd to the parent over a socketpair and
``exec``s COMMAND. Threads and forks of COMMAND inherit the filter. Numbers are
from the x86-64 syscall table and ``include/uapi/linux/seccomp.h``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fakevfio._libc import SYS_SECCOMP, check, libc, syscall
from vfio_uapi import abi as uapi

NR_IOCTL = 16
AUDIT_ARCH_X86_64 = 0xC000003E
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
#: Linux >= 5.19: once the supervisor has received a notification, only a fatal signal
#: interrupts the caller. Without it a signal (QEMU's threads get many) restarts an
#: ioctl whose side effect the supervisor already made (e.g. IOMMU_IOAS_MAP -> EEXIST).
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

# BPF opcodes
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JGE_K = 0x35
_BPF_JGT_K = 0x25
_BPF_RET_K = 0x06
_SOCK_FILTER = struct.Struct("<HBBI")
# offsets in struct seccomp_data
_OFF_NR = 0
_OFF_ARCH = 4
_OFF_ARG1_LO = 16 + 8  # args[1], low 32 bits (little-endian); the kernel ignores the rest


def filter_program() -> bytes:
    """The BPF program: USER_NOTIF for ioctl() with a VFIO/iommufd request, else ALLOW.

    Other architectures' syscalls (e.g. i386 via int 0x80) are allowed untouched;
    such a caller's VFIO ioctls reach the kernel (and fail there without a driver).
    """
    first, last = uapi.VFIO_IOCTL_FIRST, uapi.VFIO_IOCTL_LAST
    prog = [
        (_BPF_LD_W_ABS, 0, 0, _OFF_ARCH),
        (_BPF_JEQ_K, 0, 6, AUDIT_ARCH_X86_64),  # 1: wrong arch -> 8
        (_BPF_LD_W_ABS, 0, 0, _OFF_NR),
        (_BPF_JEQ_K, 0, 4, NR_IOCTL),  # 3: not ioctl -> 8
        (_BPF_LD_W_ABS, 0, 0, _OFF_ARG1_LO),
        (_BPF_JGE_K, 0, 2, first),  # 5: below the range -> 8
        (_BPF_JGT_K, 1, 0, last),  # 6: above the range -> 8
        (_BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF),  # 7
        (_BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),  # 8
    ]
    return b"".join(_SOCK_FILTER.pack(*ins) for ins in prog)


def install_filter() -> int:
    """NO_NEW_PRIVS + the filter with a new listener; returns the listener fd."""
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    code = filter_program()
    buf = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("<HxxxxxxQ", len(code) // _SOCK_FILTER.size, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    fd = syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.addressof(fbuf))
    if fd < 0 and ctypes.get_errno() == errno.EINVAL:  # kernel < 5.19: no killable wait
        fd = syscall(
            SYS_SECCOMP,
            SECCOMP_SET_MODE_FILTER,
            SECCOMP_FILTER_FLAG_NEW_LISTENER,
            ctypes.addressof(fbuf),
        )
    return check(fd, "seccomp(SET_MODE_FILTER)")


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    check(
        libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount {source} on {target}",
    )


def umount2(target: str, flags: int) -> None:
    check(libc.umount2(os.fsencode(target), flags), f"umount {target}")


def _enter_namespace(mountpoint: Path, stage: str) -> None:
    """Private mount namespace with the mount's nodes at /dev/vfio and /dev/iommu."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_SLAVE)
    if not (os.path.isdir("/dev/vfio") and os.path.exists("/dev/iommu")):
        # Build a tmpfs /dev that holds everything the real one has, plus our two paths,
        # so nothing is created in the shared /dev.
        mount("/dev", stage, None, MS_BIND | MS_REC)
        mount("tmpfs", "/dev", "tmpfs", 0, "mode=755")
        for entry in os.scandir(stage):
            target = f"/dev/{entry.name}"
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
            elif entry.is_dir(follow_symlinks=False):
                os.mkdir(target)
                mount(entry.path, target, None, MS_BIND | MS_REC)
            else:
                with open(target, "wb"):
                    pass
                mount(entry.path, target, None, MS_BIND)
        umount2(stage, MNT_DETACH)
        if not os.path.isdir("/dev/vfio"):
            os.mkdir("/dev/vfio")
        if not os.path.exists("/dev/iommu"):
            with open("/dev/iommu", "wb"):
                pass
    mount(str(mountpoint / "dev" / "vfio"), "/dev/vfio", None, MS_BIND | MS_REC)
    mount(str(mountpoint / "dev" / "iommu"), "/dev/iommu", None, MS_BIND)


def _child(mountpoint: Path, stage: str, sock: socket.socket, argv: Sequence[str]) -> None:
    try:
        _enter_namespace(mountpoint, stage)
        listener = install_filter()
        socket.send_fds(sock, [b"L"], [listener])
        os.close(listener)
        sock.close()
        os.execvp(argv[0], list(argv))
    except BaseException as exc:  # noqa: BLE001 (the child must never return to the caller)
        with contextlib.suppress(BaseException):
            print(f"fakevfio run: {argv[0]}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)


def fork_child(mountpoint: Path, argv: Sequence[str]) -> tuple[int, socket.socket, str]:
    """Fork the child that becomes ``argv``: its pid, our socket end and the staging dir.

    The child sends the listener fd over the socket (:func:`receive_listener`).
    """
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stage = tempfile.mkdtemp(prefix="fakevfio-run-")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        _child(mountpoint, stage, child_sock, argv)
    child_sock.close()
    return pid, parent_sock, stage


def receive_listener(sock: socket.socket, stage: str) -> int | None:
    """The child's listener fd, or None when its set-up failed (it said why on stderr).

    Closes ``sock`` and removes the staging directory.
    """
    try:
        _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.rmdir(stage)
    return fds[0] if fds else None
