"""fakevfio example driver ``edu``: QEMU's educational PCI device (docs/specs/edu.rst)."""

from __future__ import annotations

from fakevfio_edu.driver import (
    BAR_SIZE,
    DMA_BUFFER,
    DMA_BUFFER_SIZE,
    DRIVER_HEADER,
    IDENTIFICATION,
    STREAM_MAGIC,
    STREAM_VERSION,
    EduDriver,
)

__all__ = [
    "BAR_SIZE",
    "DMA_BUFFER",
    "DMA_BUFFER_SIZE",
    "DRIVER_HEADER",
    "IDENTIFICATION",
    "STREAM_MAGIC",
    "STREAM_VERSION",
    "EduDriver",
]
