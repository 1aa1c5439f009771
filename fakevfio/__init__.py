"""fakevfio: emulated VFIO migration devices served as a FUSE filesystem.

The package root re-exports the pure core (devices, the migration FSM, the
driver API, the registry and the filesystem model). The pyfuse3 adapter,
:mod:`fakevfio._fuse`, is deliberately not imported here so that everything
else works on machines without libfuse.
"""

from __future__ import annotations

from fakevfio._device import Device, Session, SetStateResult
from fakevfio._faults import FaultRules
from fakevfio._loader import DriverSet, load_drivers
from fakevfio._options import DeviceSpec
from fakevfio._registry import Registry
from fakevfio._tree import Tree
from fakevfio.driver import (
    ArcDriver,
    LoadStream,
    OptionSpec,
    PrecopyInfo,
    SaveStream,
    StateDriver,
)
from fakevfio.errors import (
    ConfigError,
    DeviceError,
    DriverLoadError,
    FakeVfioError,
    IllegalTransition,
    SessionGone,
    UnknownDevice,
)
from vfio_uapi.fsm import PRECOPY_STATES, MigFlags, State

__all__ = [
    "PRECOPY_STATES",
    "ArcDriver",
    "ConfigError",
    "Device",
    "DeviceError",
    "DeviceSpec",
    "DriverLoadError",
    "DriverSet",
    "FakeVfioError",
    "FaultRules",
    "IllegalTransition",
    "LoadStream",
    "MigFlags",
    "OptionSpec",
    "PrecopyInfo",
    "Registry",
    "SaveStream",
    "Session",
    "SessionGone",
    "SetStateResult",
    "State",
    "StateDriver",
    "Tree",
    "UnknownDevice",
    "load_drivers",
]
