"""fakevfio example driver ``nic``: a NIC written against the simple StateDriver API."""

from __future__ import annotations

from fakevfio_nic.driver import DRIVER_HEADER, STREAM_MAGIC, STREAM_VERSION, NicDriver

__all__ = ["DRIVER_HEADER", "STREAM_MAGIC", "STREAM_VERSION", "NicDriver"]
