"""migrator: VFIO device-state migration the way QEMU 10.1 does it.

The sans-IO codecs (:mod:`migrator._wire`, :mod:`migrator.multifd_wire`,
:mod:`migrator.reassembly`) are pure; :mod:`migrator.source` and
:mod:`migrator.destination` are the trio engines; device access goes through
:class:`migrator.backend.DeviceBackend` (fakevfio files, or the kernel uAPI in
:mod:`migrator.kernel`).
"""

from __future__ import annotations

from migrator.backend import DeviceBackend, FakeVfioBackend
from migrator.config import MigrationConfig, MultifdTransfer
from migrator.destination import Destination
from migrator.errors import (
    ChannelBrokenError,
    ConfigurationError,
    DeviceOpError,
    FramingError,
    LocalProtocolError,
    MigrationError,
    PeerClosedError,
    ReassemblyError,
    RemoteProtocolError,
)
from migrator.reassembly import Reassembler
from migrator.source import Source
from migrator.stats import Stats
from migrator.transport import Address

__all__ = [
    "Address",
    "ChannelBrokenError",
    "ConfigurationError",
    "Destination",
    "DeviceBackend",
    "DeviceOpError",
    "FakeVfioBackend",
    "FramingError",
    "LocalProtocolError",
    "MigrationConfig",
    "MigrationError",
    "MultifdTransfer",
    "PeerClosedError",
    "Reassembler",
    "ReassemblyError",
    "RemoteProtocolError",
    "Source",
    "Stats",
]
