"""The interrupt ioctls of a device fd: VFIO_DEVICE_GET_IRQ_INFO and VFIO_DEVICE_SET_IRQS.

Scaffold: the interrupts issue gives these the kernel's semantics
(``vfio_pci_ioctl_get_irq_info``, ``vfio_set_irqs_validate_and_prepare``,
``vfio_pci_set_irqs_ioctl``) and hands eventfds to the device's ``irqs`` file.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakevfio._run._nodes import DeviceInfo
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

if TYPE_CHECKING:
    from fakevfio._run._vfio import Call, Vfio


def get_irq_info(vfio: Vfio, call: Call, dev: DeviceInfo) -> int:
    argsz, _flags, index, _count = uapi.IRQ_INFO.unpack(call.mem.read(call.arg, uapi.IRQ_INFO.size))
    if argsz < uapi.IRQ_INFO.size:
        raise IoctlError(errno.EINVAL, "argsz < 16")
    if index >= uapi.VFIO_PCI_NUM_IRQS:
        raise IoctlError(errno.EINVAL, f"irq index {index} >= 5")
    flags = uapi.VFIO_IRQ_INFO_EVENTFD
    if index == uapi.VFIO_PCI_INTX_IRQ_INDEX:
        flags |= uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED
    elif index in (uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX):
        flags |= uapi.VFIO_IRQ_INFO_NORESIZE
    call.mem.write(call.arg, uapi.IRQ_INFO.pack(argsz, flags, index, 0))
    return 0


def set_irqs(vfio: Vfio, call: Call, dev: DeviceInfo) -> int:
    argsz, flags, index, start, count = uapi.IRQ_SET.unpack(
        call.mem.read(call.arg, uapi.IRQ_SET.size)
    )
    if argsz < uapi.IRQ_SET.size or index >= uapi.VFIO_PCI_NUM_IRQS:
        raise IoctlError(errno.EINVAL, "argsz < 20 or bad index")
    disable = uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER
    if count == 0 and start == 0 and flags == disable:
        return 0  # "disable": nothing to do
    raise IoctlError(errno.EINVAL, "no interrupts on emulated devices (count is 0)")
