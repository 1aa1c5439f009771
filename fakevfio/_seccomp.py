"""Thin ctypes wrappers for the Linux syscalls ``fakevfio run`` needs (x86-64 only).

seccomp user notification (filter, listener ioctls, ADDFD), mount namespaces,
pidfds, ``kcmp`` and ``process_vm_readv/writev``. No policy lives here; the
supervisor in :mod:`fakevfio.run` decides what to answer. Numbers are from the
x86-64 syscall table and ``include/uapi/linux/seccomp.h`` (checked by the ABI test
where the installed header has them).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from vfio_uapi import abi as uapi

libc = ctypes.CDLL(None, use_errno=True)

SYS_SECCOMP = 317
SYS_KCMP = 312
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
NR_IOCTL = 16
AUDIT_ARCH_X86_64 = 0xC000003E

PR_SET_NO_NEW_PRIVS = 38
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
#: Linux >= 5.19: once the supervisor has received a notification, only a fatal signal
#: interrupts the caller. Without it a signal (QEMU's threads get many) restarts an
#: ioctl whose side effect the supervisor already made (e.g. IOMMU_IOAS_MAP -> EEXIST).
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1 << 0
SECCOMP_ADDFD_FLAG_SETFD = 1 << 0
SECCOMP_ADDFD_FLAG_SEND = 1 << 1

# _IOWR('!', 0, struct seccomp_notif) etc. (sizes 80, 24, 8, 24 on x86-64)
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103

#: struct seccomp_notif: id, pid, flags, then seccomp_data (nr, arch, ip, args[6])
NOTIF = struct.Struct("<QIIiIQ6Q")
#: struct seccomp_notif_resp: id, val, error, flags
NOTIF_RESP = struct.Struct("<QqiI")
#: struct seccomp_notif_addfd: id, flags, srcfd, newfd, newfd_flags
NOTIF_ADDFD = struct.Struct("<QIIII")
NOTIF_SIZES = struct.Struct("<HHH")

CLONE_NEWNS = 0x00020000
MS_RDONLY = 1
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2
KCMP_FILE = 0
PIDFD_THREAD = os.O_EXCL

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


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _syscall(nr: int, *args: int) -> int:
    return int(libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)))


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
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    code = filter_program()
    buf = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("<HxxxxxxQ", len(code) // _SOCK_FILTER.size, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    flags = SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    fd = _syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, ctypes.addressof(fbuf))
    if fd < 0 and ctypes.get_errno() == errno.EINVAL:  # kernel < 5.19: no killable wait
        fd = _syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER,
                      ctypes.addressof(fbuf))
    return _check(fd, "seccomp(SET_MODE_FILTER)")


def notif_sizes() -> tuple[int, int, int]:
    """SECCOMP_GET_NOTIF_SIZES: (notif, resp, data) sizes of the running kernel."""
    buf = ctypes.create_string_buffer(NOTIF_SIZES.size)
    _check(_syscall(SYS_SECCOMP, SECCOMP_GET_NOTIF_SIZES, 0, ctypes.addressof(buf)),
           "seccomp(GET_NOTIF_SIZES)")
    notif, resp, data = NOTIF_SIZES.unpack(buf.raw)
    return notif, resp, data


def unshare(flags: int) -> None:
    _check(libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    def enc(s: str | None) -> bytes | None:
        return None if s is None else os.fsencode(s)

    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target}")


def umount2(target: str, flags: int) -> None:
    _check(libc.umount2(os.fsencode(target), flags), f"umount {target}")


def pidfd_open(pid: int) -> int:
    """A pidfd for a process or (kernel >= 6.9) a thread."""
    fd = _syscall(SYS_PIDFD_OPEN, pid, 0)
    if fd < 0 and ctypes.get_errno() == errno.EINVAL:  # a non-leader thread
        fd = _syscall(SYS_PIDFD_OPEN, pid, PIDFD_THREAD)
    return _check(fd, f"pidfd_open({pid})")


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """A copy (same open file description) of another process's fd, O_CLOEXEC."""
    return _check(_syscall(SYS_PIDFD_GETFD, pidfd, targetfd, 0), "pidfd_getfd")


def same_file(pid: int, fd: int, my_fd: int) -> bool:
    """kcmp(KCMP_FILE): whether ``pid``'s ``fd`` is the open file description ``my_fd``."""
    return _syscall(SYS_KCMP, os.getpid(), pid, KCMP_FILE, my_fd, fd) == 0


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


def write_mem(pid: int, addr: int, data: bytes) -> None:
    """Write ``data`` into ``pid``'s memory at ``addr`` (honours page protections)."""
    if not data:
        return
    if addr <= 0 or addr + len(data) > 1 << 64:
        raise OSError(errno.EFAULT, "bad address")
    buf = ctypes.create_string_buffer(data, len(data))
    local = _IoVec(ctypes.addressof(buf), len(data))
    remote = _IoVec(addr, len(data))
    n = libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != len(data):
        err = ctypes.get_errno() if n < 0 else errno.EFAULT
        raise OSError(errno.EFAULT if err in (errno.EFAULT, 0) else err, "process_vm_writev")


def read_cstring(pid: int, addr: int, limit: int = 4096) -> bytes:
    """A NUL-terminated string without the NUL, read page by page (like strndup_user)."""
    out = bytearray()
    while len(out) < limit:
        chunk_len = min(limit - len(out), 4096 - ((addr + len(out)) % 4096))
        chunk = read_mem(pid, addr + len(out), chunk_len)
        nul = chunk.find(b"\0")
        if nul >= 0:
            return bytes(out + chunk[:nul])
        out += chunk
    raise OSError(errno.EINVAL, "string too long")
