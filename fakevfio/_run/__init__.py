"""``fakevfio run``: run a program that sees a mount's devices as kernel VFIO nodes.

The child becomes COMMAND inside a private mount namespace where the mount's
node files are ``/dev/vfio`` and ``/dev/iommu``, under a seccomp filter that
turns its VFIO/iommufd ioctls into user notifications; the parent, the
supervisor, answers each with the kernel's semantics
(``reference/linux-vfio-uapi.md``) by driving the device through its files.
Known shortcomings: sessions are tracked by the supervisor (a data_fd is dead
after a session-ending SET or reset done *through the supervisor*; one ended
by writing ``migration/state`` directly is not noticed for old data_fds). A
cdev may be bound by several open files at once (the kernel allows one).
Container DMA mapping ioctls are accepted and ignored; the iommufd objects
(IOAS, HWPT, IOVA mappings) are tracked but nothing is pinned (enough for
QEMU's ``-device vfio-pci,iommufd=``); IRQs report count 0; no IOMMU or device
dirty tracking (QEMU needs ``enable-migration=on``).
"""

from __future__ import annotations

# General layout (x86-64 only; the cli imports this package lazily):
#
#   _supervisor.py     Supervisor (one notification -> one answer, Rules 1-5) and
#                      run_command, the entry point.
#   _notify.py         the notification loop: RECV, SEND, ID_VALID, ADDFD.
#   _caller.py         the caller's files and memory: pidfds, kcmp, the held-file
#                      table and its garbage collection, process_vm_readv/writev.
#   _nodes.py          NodeKind, the mount's inode map and device files.
#   _vfio.py           Call and Vfio: dispatch, container, group, cdev ioctls.
#   _device_ioctls.py  device fd ioctls (info, regions, IRQs, reset, features) and
#                      the data_fd's PRECOPY_INFO.
#   _iommufd.py        the iommufd object model (IOAS, HWPT, mappings) and ioctls.
#   _child.py          the child: mount namespace, seccomp filter, exec.
#   _libc.py           the libc handle and raw syscall helpers.
#
# The handlers (Vfio.dispatch and below) know nothing of seccomp: a Call
# carries the caller's memory (read/write/read_cstring) and the two listener
# services (install an fd, is the caller still there), so tests drive them with
# an in-memory memory. Every failure is fakevfio.errors.IoctlError (errno).
from fakevfio._run._nodes import NodeKind
from fakevfio._run._supervisor import Supervisor, run_command
from fakevfio._run._vfio import Call, Vfio

__all__ = ["Call", "NodeKind", "Supervisor", "Vfio", "run_command"]
