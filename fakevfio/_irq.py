"""One device's interrupts: INTx, MSI and MSI-X as vfio-pci keeps them (``VFIO_DEVICE_SET_IRQS``).

Scaffold: the interrupts issue fills this module in. The interface the rest
of the core uses is fixed: :class:`Irqs` is built per device, the driver's
``raise_irq``/``set_intx`` land in :meth:`Irqs.raise_irq` / :meth:`Irqs.set_intx`,
the ``irqs`` file reads :meth:`Irqs.text` and writes :meth:`Irqs.control`.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from fakevfio.errors import DeviceError

if TYPE_CHECKING:
    from fakevfio._device import Device


class Irqs:
    """The interrupt state of one device (called with the device lock held)."""

    def __init__(self, device: Device) -> None:
        self._device = device

    def raise_irq(self, index: int, vector: int) -> None:
        raise DeviceError(
            errno.EOPNOTSUPP, "interrupts are not built yet", device=self._device.name
        )

    def set_intx(self, asserted: bool) -> None:
        raise DeviceError(
            errno.EOPNOTSUPP, "interrupts are not built yet", device=self._device.name
        )

    def control(self, text: str) -> bytes | None:
        """One write to ``devices/NAME/irqs``; a reply (read back on the same handle) or None."""
        raise DeviceError(
            errno.EOPNOTSUPP, "interrupts are not built yet", device=self._device.name
        )

    def text(self) -> str:
        """What reading ``devices/NAME/irqs`` shows."""
        return ""

    def info(self) -> dict[str, object]:
        """The ``irqs`` object of the ``info`` file."""
        return {}

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET`` and device close: every index disabled."""

    def close(self) -> None:
        """The device is removed: release every eventfd."""
