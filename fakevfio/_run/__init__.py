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
The IOMMU side (:mod:`._iommufd`: iommufd IOAS/HWPT and the type1 container)
keeps the kernel's mappings and pushes them into each attached device's ``dma``
file, but pins nothing: a map of memory the caller does not have succeeds (the
kernel pins at map time and answers EFAULT; here the device's DMA faults), and
the IOAS has no reserved regions (no MSI window; IOVA range 0..2^64-1). A
device learns that its caller closed a device fd or group only when the
held-file scan runs (past MAX_HELD_FILES held files) or the command exits (then
every device drops every mapping); IOMMU_VFIO_IOAS
and the iommufd type1 compatibility ioctls answer ENOTTY; VADDR-invalidated
mappings fault in the device instead of blocking its DMA; nested HWPTs and
fault objects are not supported.
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
#   _iommufd.py        the IOMMU side: iommufd (IOAS areas, HWPT, dirty tracking) and
#                      the type1 container (Type1), pushing mappings into dma files.
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
