"""The DMA logging features of a device fd (``VFIO_DEVICE_FEATURE_DMA_LOGGING_*``).

Scaffold: the DMA and dirty-tracking issue gives these the kernel's semantics
(``vfio_ioctl_device_feature_logging_start/stop/report``) over the device's
``dma`` file. Until then every logging feature answers ENOTTY, as a device
without ``log_ops`` does.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakevfio._run._nodes import DeviceInfo
from fakevfio.errors import IoctlError
from vfio_uapi import abi as uapi

if TYPE_CHECKING:
    from fakevfio._run._vfio import Call, Vfio


LOGGING_FEATURES = frozenset(
    {
        uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
        uapi.VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    }
)


def logging_feature(
    vfio: Vfio, call: Call, dev: DeviceInfo, index: int, flags: int, argsz: int
) -> int:
    """One DEVICE_FEATURE ioctl for a DMA logging feature (argsz and flag word checked)."""
    raise IoctlError(errno.ENOTTY, f"feature {index} not supported")
