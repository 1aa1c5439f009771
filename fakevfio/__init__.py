"""fakevfio: emulated VFIO migration devices served as a FUSE filesystem.

The package root re-exports the pure core (devices, the migration FSM, the
driver API, the registry and the filesystem model). The pyfuse3 adapter,
:mod:`fakevfio._fuse`, is deliberately not imported here so that everything
else works on machines without libfuse.
"""

from __future__ import annotations

# General layout (docs/architecture.md draws it; pyproject.toml's
# [tool.importlinter] contracts enforce it):
#
# Core: synchronous, no I/O of its own, imports neither trio nor pyfuse3.
#   errors.py      FakeVfioError and its subclasses.
#   driver/        the driver API (ArcDriver, StateDriver, the stream types).
#   _stream.py     the migration stream the core makes for StateDriver drivers.
#   _device.py     one device: the FSM loop, sessions, log, bandwidth, faults.
#   _faults.py, _options.py, _registry.py, _tree.py (the filesystem model),
#   _ram.py (the built-in ram driver), _control.py (the control protocol: a
#   device's state by name, for `fakevfio run`).
#   The FSM, the ABI and sizes are vfio_uapi's, outside this package.
#
# Adapters: move bytes between the world and the core.
#   _fuse.py       the pyfuse3.Operations subclass and the mount lifecycle: the
#                  one module that imports pyfuse3.
#   _loader.py     drivers from the fakevfio.drivers entry points.
#   _channel.py    the control protocol's socket, served by threads of the mount.
#
# Supervisor: _run/, `fakevfio run` (a program's VFIO and iommufd ioctls,
#   trapped by seccomp, answered from a mount's device files). Its own
#   __init__ has its layout; the cli imports it lazily.
#
# Edges: parse arguments, start processes, turn errors into exit codes.
#   cli.py, __main__.py, demo.py, _environment.py (can FUSE work here?), and
#   the testing toolkit: testing/ and pytest_plugin.py.
#
# This file re-exports the core and the loader; it imports no adapter.
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
