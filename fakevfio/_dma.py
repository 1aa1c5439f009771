"""One device's DMA: the IOVA mappings of its VMM, DMA reads and writes, dirty trackers.

Scaffold: the DMA and dirty-tracking issue fills this module in. The
interface the rest of the core uses is fixed: :class:`Dma` is built per
device, the driver's ``dma_read``/``dma_write`` land in :meth:`Dma.read` /
:meth:`Dma.write`, the ``dma`` file reads :meth:`Dma.text` and writes
:meth:`Dma.control` (whose reply is read back on the same handle).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakevfio.errors import DeviceError

if TYPE_CHECKING:
    from fakevfio._device import Device


class Dma:
    """The DMA state of one device (called with the device lock held)."""

    def __init__(self, device: Device) -> None:
        self._device = device

    def read(self, iova: int, length: int) -> bytes:
        raise DeviceError(
            errno.EFAULT, f"DMA read at 0x{iova:x}: nothing is mapped", device=self._device.name
        )

    def write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        raise DeviceError(
            errno.EFAULT, f"DMA write at 0x{iova:x}: nothing is mapped", device=self._device.name
        )

    def control(self, text: str) -> bytes | None:
        """One write to ``devices/NAME/dma``; a reply (read back on the same handle) or None."""
        raise DeviceError(errno.EOPNOTSUPP, "DMA is not built yet", device=self._device.name)

    def text(self) -> str:
        """What reading ``devices/NAME/dma`` shows."""
        return ""

    def info(self) -> dict[str, object]:
        """The ``dma`` object of the ``info`` file."""
        return {}

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: DMA logging stops (mappings belong to the IOMMU and stay)."""

    def close(self) -> None:
        """The device is removed."""
