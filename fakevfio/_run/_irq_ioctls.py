"""The interrupt ioctls of a device fd: VFIO_DEVICE_GET_IRQ_INFO and VFIO_DEVICE_SET_IRQS.

Theory of operation
-------------------
GET_IRQ_INFO answers from the device's ``info`` file (``irqs``: the count
of each index) with ``vfio_pci_ioctl_get_irq_info``'s checks and flags.
SET_IRQS does what ``vfio_pci_ioctl_set_irqs`` does before it takes the
device's ``igate``: it reads the header, checks it as
``vfio_set_irqs_validate_and_prepare`` (drivers/vfio/vfio_main.c) does and
copies the data array from the caller; then it writes ONE ``set`` command to
``devices/NAME/irqs`` (:mod:`fakevfio._irq`), naming each eventfd as
``PID:FD`` of the caller, who stays blocked in its ioctl while the device
copies the fds. The write's errno is the ioctl's.

Rule 1: errno order as the kernel's: header EFAULT; EINVAL for argsz < 20,
        index >= 5, count >= U32_MAX - start, unknown flag bits; EINVAL for a
        range outside the index's count (every start of an index with count 0);
        EINVAL unless exactly one data type; EINVAL when argsz is too small for
        count data elements; EFAULT for the data; ENOTTY unless exactly one
        action bit (``vfio_pci_set_irqs_ioctl`` finds no handler); the rest
        (state, EBADF, EBUSY) comes from the device.
Rule 2: an fd the caller holds that is not an eventfd is EINVAL
        (``eventfd_ctx_fdget``), checked here through /proc before the write;
        an fd the caller does not hold is the device's EBADF.
Rule 3: nothing is written to the device unless every check above passed.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING

from fakevfio._run._nodes import DeviceInfo
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

if TYPE_CHECKING:
    from fakevfio._run._vfio import Call, Vfio

INDEX_NAMES = ("intx", "msi", "msix", "err", "req")
_DATA_MASK = 0x7  # VFIO_IRQ_SET_DATA_TYPE_MASK: NONE | BOOL | EVENTFD
_ACTION_MASK = 0x38  # VFIO_IRQ_SET_ACTION_TYPE_MASK: MASK | UNMASK | TRIGGER
_ACTIONS = {
    uapi.VFIO_IRQ_SET_ACTION_MASK: "mask",
    uapi.VFIO_IRQ_SET_ACTION_UNMASK: "unmask",
    uapi.VFIO_IRQ_SET_ACTION_TRIGGER: "trigger",
}
_U32_MAX = (1 << 32) - 1
EVENTFD_LINK = "anon_inode:[eventfd]"


def irq_count(dev: DeviceInfo, index: int) -> int:
    """``vfio_pci_get_irq_count``: the vectors of ``index`` (0 for unknown indexes)."""
    if not 0 <= index < len(INDEX_NAMES):
        return 0
    irqs = dev.info.get("irqs")
    if not isinstance(irqs, dict):
        return 1 if index == uapi.VFIO_PCI_REQ_IRQ_INDEX else 0
    entry = irqs.get(INDEX_NAMES[index])
    return int(entry.get("count", 0)) if isinstance(entry, dict) else 0


def _dynamic_msix(dev: DeviceInfo) -> bool:
    irqs = dev.info.get("irqs")
    entry = irqs.get("msix") if isinstance(irqs, dict) else None
    return bool(entry.get("dynamic")) if isinstance(entry, dict) else False


def get_irq_info(vfio: Vfio, call: Call, dev: DeviceInfo) -> int:
    """``vfio_pci_ioctl_get_irq_info``: writes back the 16-byte minimum only."""
    argsz, _flags, index, _count = uapi.IRQ_INFO.unpack(call.mem.read(call.arg, uapi.IRQ_INFO.size))
    if argsz < uapi.IRQ_INFO.size or index >= uapi.VFIO_PCI_NUM_IRQS:
        raise IoctlError(errno.EINVAL, f"GET_IRQ_INFO: argsz {argsz} < 16 or index {index} >= 5")
    if index == uapi.VFIO_PCI_ERR_IRQ_INDEX and not irq_count(dev, index):
        raise IoctlError(errno.EINVAL, "GET_IRQ_INFO: ERR exists only on PCI Express devices")
    flags = uapi.VFIO_IRQ_INFO_EVENTFD
    if index == uapi.VFIO_PCI_INTX_IRQ_INDEX:
        flags |= uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED
    elif index != uapi.VFIO_PCI_MSIX_IRQ_INDEX or not _dynamic_msix(dev):
        flags |= uapi.VFIO_IRQ_INFO_NORESIZE
    call.mem.write(call.arg, uapi.IRQ_INFO.pack(argsz, flags, index, irq_count(dev, index)))
    return 0


def _check_eventfd(pid: int, fd: int) -> None:
    """Rule 2: EINVAL for an open fd that is not an eventfd (a missing one is the device's)."""
    try:
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return
    if link != EVENTFD_LINK:
        raise IoctlError(errno.EINVAL, f"SET_IRQS: fd {fd} is {link}, not an eventfd")


def set_irqs(vfio: Vfio, call: Call, dev: DeviceInfo) -> int:
    """``vfio_pci_ioctl_set_irqs``: validate, copy the data, one command to ``irqs``."""
    argsz, flags, index, start, count = uapi.IRQ_SET.unpack(
        call.mem.read(call.arg, uapi.IRQ_SET.size)
    )
    num = irq_count(dev, index)
    if (
        argsz < uapi.IRQ_SET.size
        or index >= uapi.VFIO_PCI_NUM_IRQS
        or count >= _U32_MAX - start
        or flags & ~(_DATA_MASK | _ACTION_MASK)
    ):
        raise IoctlError(
            errno.EINVAL,
            f"SET_IRQS: argsz {argsz} < 20, index {index} >= 5, start {start} + count "
            f"{count} overflows, or unknown flags 0x{flags:x}",
        )
    if start >= num or start + count > num:
        raise IoctlError(
            errno.EINVAL,
            f"SET_IRQS: vectors {start}+{count} outside the {num} of {INDEX_NAMES[index]}",
        )
    data_type = flags & _DATA_MASK
    size = {
        uapi.VFIO_IRQ_SET_DATA_NONE: 0,
        uapi.VFIO_IRQ_SET_DATA_BOOL: 1,
        uapi.VFIO_IRQ_SET_DATA_EVENTFD: 4,
    }.get(data_type)
    if size is None:
        raise IoctlError(errno.EINVAL, f"SET_IRQS: flags 0x{flags:x} need exactly one DATA type")
    if size and argsz - uapi.IRQ_SET.size < count * size:
        raise IoctlError(
            errno.EINVAL,
            f"SET_IRQS: argsz {argsz} holds fewer than {count} data elements of {size} bytes",
        )
    data = call.mem.read(call.arg + uapi.IRQ_SET.size, count * size) if size and count else b""
    action = _ACTIONS.get(flags & _ACTION_MASK)
    if action is None:
        raise IoctlError(errno.ENOTTY, f"SET_IRQS: flags 0x{flags:x} need exactly one ACTION")
    head = f"set {INDEX_NAMES[index]} {action} {start} {count}"
    if size == 0:
        command = f"{head} none"
    elif size == 1:
        command = f"{head} bool {''.join('1' if b else '0' for b in data)}"
    else:
        fds = struct.unpack(f"<{count}i", data)
        check = not (index == uapi.VFIO_PCI_INTX_IRQ_INDEX and action == "mask")
        entries = []
        for fd in fds:
            if fd >= 0:
                if check:
                    _check_eventfd(call.process, fd)
                entries.append(f"{call.process}:{fd}")
            else:
                entries.append(str(fd))
        command = f"{head} eventfd {','.join(entries)}"
    vfio.nodes.write_text(dev.name, ("irqs",), command + "\n")
    return 0
