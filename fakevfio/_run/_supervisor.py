"""The supervisor: each notification answered through :class:`._vfio.Vfio`, and ``run_command``.

Rule 1: an fd that is not on the mount is none of our business: the ioctl
        continues into the kernel unchanged (SECCOMP_USER_NOTIF_FLAG_CONTINUE).
Rule 2: state that the kernel keeps per open file is kept per open file
        description (:mod:`._caller`).
Rule 3: new fds (GROUP_GET_DEVICE_FD, the data_fd of MIG_DEVICE_STATE) are
        opened by the supervisor on the mount and installed in the caller with
        SECCOMP_IOCTL_NOTIF_ADDFD (O_CLOEXEC). data_fd reads and writes never
        come here: they go straight to the FUSE session stream.
Rule 4: every request gets an answer; anything unexpected is logged and
        answered EIO. The caller's memory is checked (EFAULT) before any side
        effect that the kernel would not have made either.
Rule 5: the supervisor returns when COMMAND (the direct child) exits, with its
        exit status (128 + signal number if it was killed).
Rule 6: what ``fakevfio run`` cannot do itself is said before COMMAND starts, with the
        fix, and exits :data:`EXIT_RUN_FAILED` (125, as ``env``, ``chroot`` and
        ``timeout`` do for their own failures; 126/127 stay COMMAND's "cannot execute" /
        "not found"): a mount that is not a fakevfio mount, and missing privileges
        (CAP_SYS_ADMIN for the private mount namespace, CAP_SYS_PTRACE for the
        caller's memory and fds), so nobody meets a bare ``unshare: EPERM``.
Rule 7: the node map (``/dev/vfio/devices/vfioN`` = device, PCI address, IOMMU group)
        goes to stderr, never stdout (programs parse COMMAND's stdout), when stderr is a
        terminal or ``show_map`` asks for it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import sys
from pathlib import Path

import attrs

from fakevfio._run._caller import CallerMemory, HeldFiles, PassThrough
from fakevfio._run._child import EXIT_SETUP_FAILED, fork_child, receive_listener
from fakevfio._run._nodes import MountNodes
from fakevfio._run._notify import Listener, Request
from fakevfio._run._vfio import Call, Vfio
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

logger = logging.getLogger("fakevfio.run")  # the name the log had before the package


@attrs.define(eq=False)
class Supervisor:
    """Answers the VFIO ioctls of a seccomp listener from a fakevfio mount."""

    listener: Listener
    vfio: Vfio

    @classmethod
    def open(cls, mountpoint: str | Path, listener_fd: int) -> Supervisor:
        """A supervisor for ``listener_fd`` (owned from now on) and the mount."""
        nodes = MountNodes.open(mountpoint)
        nodes.use_channel = os.environ.get(CHANNEL_ENV, "on") != "off"
        listener = Listener.open(listener_fd)
        return cls(listener, Vfio(nodes, HeldFiles(nodes.dev)))

    def close(self) -> None:
        self.vfio.close()  # the devices drop the mappings of the gone caller
        self.vfio.files.close()
        self.vfio.nodes.close()
        self.listener.close()

    def serve(self, child: int) -> int:
        """Answer notifications until ``child`` exits; returns its exit status."""
        return self.listener.serve(child, self.handle)

    def handle(self, req: Request) -> None:
        """Answer one notification (Rule 4: always)."""
        listener, nid = self.listener, req.id
        call = Call(
            pid=req.pid,
            fd=req.fd,
            request=req.request,
            arg=req.arg,
            mem=CallerMemory(req.pid),
            install_fd=lambda fd, send: listener.add_fd(nid, fd, send=send),
            check_alive=functools.partial(listener.check_valid, nid),
        )
        try:
            value = self.vfio.dispatch(call)
        except IoctlError as exc:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "pid %d fd %d %s -> %s %s",
                    req.pid,
                    req.fd,
                    uapi.ioctl_name(req.request),
                    errno.errorcode.get(exc.errno, exc.errno),
                    exc.detail,
                )
            listener.reply(nid, 0, exc.errno)
        except PassThrough:
            listener.reply_continue(nid)
        except Exception:
            logger.exception("supervisor: unexpected error on %s", uapi.ioctl_name(req.request))
            listener.reply(nid, 0, errno.EIO)
        else:
            if logger.isEnabledFor(logging.DEBUG):
                name = uapi.ioctl_name(req.request)
                logger.debug("pid %d fd %d %s -> %s", req.pid, req.fd, name, value)
            if value is not None:
                listener.reply(nid, value, 0)


#: ``FAKEVFIO_RUN_CHANNEL=off``: drive device states through the files only, never the
#: mount's control channel (:mod:`fakevfio._control`), to compare or to rule it out.
CHANNEL_ENV = "FAKEVFIO_RUN_CHANNEL"
#: Exit status when ``fakevfio run`` itself fails before COMMAND runs (Rule 6).
EXIT_RUN_FAILED = EXIT_SETUP_FAILED
#: Capabilities ``fakevfio run`` needs (Rule 6): bit number, name, what for.
REQUIRED_CAPABILITIES = (
    (21, "CAP_SYS_ADMIN", "unshare(CLONE_NEWNS) and mount: COMMAND's private /dev/vfio"),
    (19, "CAP_SYS_PTRACE", "pidfd_getfd, kcmp and process_vm_readv/writev on COMMAND"),
)


def missing_capabilities(effective: int | None = None) -> list[str]:
    """Rule 6: the capabilities of :data:`REQUIRED_CAPABILITIES` this process lacks.

    ``effective`` is a ``CapEff`` mask for tests; by default /proc/self/status's.
    """
    if effective is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return []  # no /proc: let the syscalls say it
        found = [line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")]
        if not found:
            return []
        effective = int(found[0], 16)
    return [
        f"{name} ({why})" for bit, name, why in REQUIRED_CAPABILITIES if not effective >> bit & 1
    ]


def privilege_problem(mountpoint: str, argv: list[str], effective: int | None = None) -> str:
    """Rule 6: why this process cannot run ``argv`` under the supervisor, with the fix."""
    missing = missing_capabilities(effective)
    if not missing:
        return ""
    command = " ".join(argv[:1] + (["..."] if len(argv) > 1 else []))
    return (
        f"fakevfio run: not enough privilege: missing {'; '.join(missing)}. Run it as root: "
        f'sudo -E env "PATH=$PATH" fakevfio run --mount {mountpoint} -- {command} '
        "(in a container: --cap-add SYS_ADMIN --cap-add SYS_PTRACE; see docs/containers.md)"
    )


def node_map(nodes: MountNodes) -> list[str]:
    """Rule 7: one line per device: its cdev, name, PCI address and IOMMU group."""
    return [
        f"fakevfio run: /dev/vfio/devices/{info.cdev} = {name} "
        f"(PCI {info.pci_address or '?'}, /dev/vfio/{info.group})"
        for name, info in sorted(nodes.devices.items(), key=lambda item: _number(item[1].cdev))
    ]


def _number(cdev: str) -> int:
    digits = cdev.removeprefix("vfio")
    return int(digits) if digits.isdigit() else 1 << 30


def run_command(mountpoint: str, argv: list[str], *, show_map: bool | None = None) -> int:
    """Run ``argv`` with the mount's devices as kernel VFIO nodes; returns its exit status.

    ``show_map``: print the node map on stderr (Rule 7); None: when stderr is a terminal.
    """
    if not argv:
        print("fakevfio run: no command given", file=sys.stderr)
        return 2
    mount = Path(mountpoint).resolve()
    for rel in ("dev/vfio", "dev/iommu"):
        if not (mount / rel).exists():
            print(
                f"fakevfio run: {mount / rel} does not exist (is {mount} a fakevfio mount? "
                f"start one with: fakevfio mount {mount} --device NAME=ram)",
                file=sys.stderr,
            )
            return EXIT_RUN_FAILED
    problem = privilege_problem(mountpoint, argv)
    if problem:
        print(problem, file=sys.stderr)
        return EXIT_RUN_FAILED
    if show_map is None:
        show_map = sys.stderr.isatty()
    pid, sock, stage = fork_child(mount, argv)
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    supervisor: Supervisor | None = None
    try:
        listener = receive_listener(sock, stage)
        if listener is None:  # set-up failed; the child said why
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
        supervisor = Supervisor.open(mount, listener)
        if show_map:
            for line in node_map(supervisor.vfio.nodes) or [
                "fakevfio run: the mount has no devices"
            ]:
                print(line, file=sys.stderr, flush=True)
        return supervisor.serve(pid)
    finally:
        if supervisor is not None:
            supervisor.close()
        signal.signal(signal.SIGINT, old_int)
