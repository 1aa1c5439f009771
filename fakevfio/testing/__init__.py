"""The testing toolkit: fakevfio in other projects' tests, benchmarks and driver plugins.

Three things, none of which needs pytest:

* Real mounts. :func:`mount` serves devices with ``python -m fakevfio mount``
  in a subprocess and returns a :class:`Mount` with helpers for the device
  files; leaving it (also by an exception or Ctrl-C) always unmounts, and a
  dead server's stale mount is force-unmounted. :func:`migrate` runs
  ``migrator incoming`` and ``migrator migrate --json`` between two mounts.
  :func:`fuse_problems` says what is missing when FUSE mounts cannot work.
* Measurements: :class:`PeakRss` samples a process's peak RSS;
  :class:`MigrationResult` carries each migrator's ``ru_maxrss`` and the wall time.
* The driver conformance kit, for plugin authors: :class:`LocalDevice` runs a
  driver in this process (the core's FSM, sessions and faults, no FUSE), and
  :func:`check_state_driver` / :func:`check_arc_driver` drive devices made by
  a factory through the project's rules, like trio's ``check_two_way_stream``.

One error convention: what the toolkit starts and fails (a server that will
not mount, a migration that fails) raises a :class:`HarnessError` that carries
the process's stderr (:class:`MountError`, :class:`MigrationFailed`); what a
device refuses reaches the caller unchanged (``OSError`` with the kernel's
errno through a mount, :class:`fakevfio.errors.DeviceError` in process); a
broken driver rule raises :class:`DriverRuleError`, an ``AssertionError``.

General layout: ``_process`` holds the subprocess plumbing (errors, ready
lines, parent-death signal, migrator children) and ``_rss`` the peak-RSS
measurements; ``_mount`` is the one mount lifecycle and ``_migrate`` runs
migrations on it; ``_local`` is the in-process device and ``_conformance`` the
rules run on it. FUSE diagnosis lives in :mod:`fakevfio._environment` (the CLI
uses it too) and is re-exported here. :mod:`fakevfio.pytest_plugin` builds
fixtures on this package; nothing here imports pyfuse3, trio or pytest.
"""

from __future__ import annotations

from fakevfio._environment import fuse_missing_reason, fuse_problems, fuse_required
from fakevfio.testing._conformance import (
    ARC_DRIVER_RULES,
    DRIVER_HEADER_OFFSET,
    STATE_DRIVER_RULES,
    DriverRuleError,
    LocalCheckDevice,
    check_arc_driver,
    check_state_driver,
    check_uapi,
    migrate_local,
    round_trip,
    state_stream_offset,
)
from fakevfio.testing._local import DriverFactory, LocalDevice, make_device
from fakevfio.testing._migrate import (
    DEFAULT_MIGRATION_TIMEOUT_S,
    LISTENING_PREFIX,
    MigrationFailed,
    MigrationResult,
    migrate,
    migrate_devices,
)
from fakevfio.testing._mount import (
    DEFAULT_READY_TIMEOUT_S,
    READY_PREFIX,
    Devices,
    Mount,
    MountError,
    device_args,
    errno_of,
    force_unmount,
    mount,
    read_file,
    start_mount,
    write_file,
)
from fakevfio.testing._process import HarnessError
from fakevfio.testing._rss import PeakRss, status_kib

__all__ = [
    "ARC_DRIVER_RULES",
    "DEFAULT_MIGRATION_TIMEOUT_S",
    "DEFAULT_READY_TIMEOUT_S",
    "DRIVER_HEADER_OFFSET",
    "LISTENING_PREFIX",
    "READY_PREFIX",
    "STATE_DRIVER_RULES",
    "Devices",
    "DriverFactory",
    "DriverRuleError",
    "HarnessError",
    "LocalCheckDevice",
    "LocalDevice",
    "MigrationFailed",
    "MigrationResult",
    "Mount",
    "MountError",
    "PeakRss",
    "check_arc_driver",
    "check_state_driver",
    "check_uapi",
    "device_args",
    "errno_of",
    "force_unmount",
    "fuse_missing_reason",
    "fuse_problems",
    "fuse_required",
    "make_device",
    "migrate",
    "migrate_devices",
    "migrate_local",
    "mount",
    "read_file",
    "round_trip",
    "start_mount",
    "state_stream_offset",
    "status_kib",
    "write_file",
]
