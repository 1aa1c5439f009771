"""The child's set-up: a private mount namespace, the seccomp filter, then ``exec``.

The child (which becomes COMMAND) enters a private mount namespace where the
mount's node files appear at ``/dev/vfio`` and ``/dev/iommu`` (a tmpfs copy of
``/dev`` is built first when those paths do not exist, so nothing is created
in the shared ``/dev``). It then installs a seccomp filter that turns every
``ioctl()`` with a request in the VFIO/iommufd ``';'`` range into a user
notification, hands the listener fd to the parent over a socketpair and
``exec``s COMMAND. Threads and forks of COMMAND inherit the filter. Numbers are
from the x86-64 syscall table and ``include/uapi/linux/seccomp.h``.

Before that it makes the sysfs view of :mod:`._sysfs` (``/sys/bus/pci/devices/ADDR``
and the rest, ``/dev/char/MAJ:MIN``), with one rule for every path it adds:

Rule 1: nothing is created in a host directory. A directory that needs a new entry
        is first *shadowed* in the private namespace: a tmpfs mounted over it that
        holds the same entries (links copied, files and directories bind-mounted
        from the original), so the child sees the host's entries plus ours and the
        host sees no change (the namespace is MS_SLAVE: our mounts never propagate).
Rule 2: a device's own directories (the device, its ``vfio-dev``, its IOMMU group)
        are made fresh; a host entry of the same path is hidden, not merged.
Rule 3: the view is best effort: when it cannot be made, COMMAND still runs, with a
        warning on stderr (``host=`` and ``sysfsdev=`` then find nothing).
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
from fakevfio._run import _sysfs
from fakevfio._run._nodes import MountNodes
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


class Shadows:
    """Directories of the private namespace made ours by tmpfs mounts (Rule 1)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        #: directories that are ours: shadows and the directories made in them
        self.ours: set[str] = set()

    def shadow(self, path: str) -> None:
        """Mount a tmpfs over the directory ``path`` that holds the same entries."""
        mount(path, self.stage, None, MS_BIND | MS_REC)
        try:
            mount("tmpfs", path, "tmpfs", 0, "mode=755")
            for entry in os.scandir(self.stage):
                target = f"{path}/{entry.name}"
                if entry.is_symlink():
                    os.symlink(os.readlink(entry.path), target)
                elif entry.is_dir(follow_symlinks=False):
                    os.mkdir(target)
                    mount(entry.path, target, None, MS_BIND | MS_REC)
                else:
                    with open(target, "wb"):
                        pass
                    mount(entry.path, target, None, MS_BIND)
        finally:
            umount2(self.stage, MNT_DETACH)
        self.ours.add(path)

    def ensure_dir(self, path: str, *, fresh: bool = False) -> None:
        """Make ``path`` a directory of ours: shadowed if it exists, else made (Rules 1, 2)."""
        if path in self.ours:
            return
        if path != "/dev" and not path.startswith(("/sys/", "/dev/")):
            raise OSError(errno.EPERM, f"refusing to shadow {path} (only /sys and /dev)")
        if not fresh and os.path.isdir(path) and not os.path.islink(path):
            self.shadow(path)
            return
        self.ensure_dir(os.path.dirname(path))
        self.clear(path)
        os.mkdir(path, 0o755)
        self.ours.add(path)

    def clear(self, path: str) -> None:
        """Remove whatever ``path`` is in a directory of ours (a bind mount, a link, a file)."""
        if os.path.ismount(path):
            umount2(path, MNT_DETACH)
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        elif os.path.isdir(path):
            os.rmdir(path)  # a shadow's empty mount point, after the umount above

    def apply(self, entries: Sequence[_sysfs.Entry]) -> None:
        """Make the view's entries, in order (parents come first)."""
        for entry in entries:
            if entry.kind is _sysfs.EntryKind.DIR:
                self.ensure_dir(entry.path, fresh=entry.fresh)
                continue
            self.ensure_dir(os.path.dirname(entry.path))
            self.clear(entry.path)
            if entry.kind is _sysfs.EntryKind.LINK:
                os.symlink(entry.target, entry.path)
            else:
                fd = os.open(entry.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
                try:
                    os.write(fd, entry.data)
                finally:
                    os.close(fd)


def _enter_namespace(mountpoint: Path, stage: str, functions: Sequence[_sysfs.PciFunction]) -> None:
    """Private mount namespace with the mount's nodes at /dev/vfio and /dev/iommu."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_SLAVE)
    shadows = Shadows(stage)
    if not (os.path.isdir("/dev/vfio") and os.path.exists("/dev/iommu")):
        # A tmpfs /dev that holds everything the real one has, plus our two paths,
        # so nothing is created in the shared /dev.
        shadows.shadow("/dev")
        if not os.path.isdir("/dev/vfio"):
            os.mkdir("/dev/vfio")
        if not os.path.exists("/dev/iommu"):
            with open("/dev/iommu", "wb"):
                pass
    try:
        shadows.apply(_sysfs.layout(functions))
    except OSError as exc:  # Rule 3
        print(f"fakevfio run: warning: no sysfs view of the devices: {exc}", file=sys.stderr)
    mount(str(mountpoint / "dev" / "vfio"), "/dev/vfio", None, MS_BIND | MS_REC)
    mount(str(mountpoint / "dev" / "iommu"), "/dev/iommu", None, MS_BIND)


#: The child's exit status when its own set-up (namespace, filter) failed: fakevfio
#: run's failure, the supervisor's ``EXIT_RUN_FAILED`` (Rule 6 there).
EXIT_SETUP_FAILED = 125
#: COMMAND exists but cannot be executed (EACCES, ENOEXEC, ...), as shells and env say.
EXIT_CANNOT_EXECUTE = 126
#: COMMAND was not found (ENOENT), as shells and env say.
EXIT_NOT_FOUND = 127


def exec_failure_status(err: int) -> int:
    """The exit status for an ``exec`` of COMMAND that failed with ``err`` (coreutils env's)."""
    return EXIT_NOT_FOUND if err == errno.ENOENT else EXIT_CANNOT_EXECUTE


def _child(
    mountpoint: Path,
    stage: str,
    sock: socket.socket,
    argv: Sequence[str],
    functions: Sequence[_sysfs.PciFunction],
) -> None:
    status = EXIT_SETUP_FAILED
    try:
        _enter_namespace(mountpoint, stage, functions)
        listener = install_filter()
        socket.send_fds(sock, [b"L"], [listener])
        os.close(listener)
        sock.close()
        try:
            os.execvp(argv[0], list(argv))
        except OSError as exc:
            status = exec_failure_status(exc.errno or errno.ENOEXEC)
            raise
    except BaseException as exc:  # noqa: BLE001 (the child must never return to the caller)
        with contextlib.suppress(BaseException):
            what = argv[0] if status != EXIT_SETUP_FAILED else "set-up failed"
            print(f"fakevfio run: {what}: {exc}", file=sys.stderr, flush=True)
        os._exit(status)


def fork_child(mountpoint: Path, argv: Sequence[str]) -> tuple[int, socket.socket, str]:
    """Fork the child that becomes ``argv``: its pid, our socket end and the staging dir.

    The child sends the listener fd over the socket (:func:`receive_listener`). The
    mount's devices are read here, before the fork, once for both sides
    (:meth:`MountNodes.prime`): the child's sysfs view and the supervisor's node map.
    """
    try:
        functions = _sysfs.read_functions(MountNodes.prime(mountpoint))
    except OSError:  # not a mount we can read: the supervisor will say so
        functions = []
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stage = tempfile.mkdtemp(prefix="fakevfio-run-")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        parent_sock.close()
        _child(mountpoint, stage, child_sock, argv, functions)
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
