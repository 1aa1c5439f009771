"""fakevfio example driver ``mtty``: the kernel's mtty sample device and its migration."""

from __future__ import annotations

from fakevfio_mtty.driver import (
    MAGIC,
    MAJOR_VERSION,
    MINOR_VERSION,
    MttyDriver,
    encode_header,
    image_size,
)
from fakevfio_mtty.uart import Port

__all__ = [
    "MAGIC",
    "MAJOR_VERSION",
    "MINOR_VERSION",
    "MttyDriver",
    "Port",
    "encode_header",
    "image_size",
]
