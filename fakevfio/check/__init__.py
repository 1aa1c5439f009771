"""``fakevfio check``: the VFIO migration uAPI conformance suite, as a Python API.

Run the checks of :data:`CHECKS` against fakevfio device directories or kernel
VFIO cdevs::

    from fakevfio.check import run_checks

    results = run_checks(["/tmp/fv/devices/gpu0"], destructive=True)
    assert all(r.ok for r in results)

Rules: checks reach a device only through :mod:`fakevfio.check._access` (files
or real ioctls), never through the device model, the supervisor
(``fakevfio._run``) or the migrator; destructive checks (resets, bad resume
input) run only when asked; each check has a timeout. See docs/check.md.
"""

from __future__ import annotations

from fakevfio.check._access import AccessError, Device, FileDevice, KernelDevice, open_device
from fakevfio.check._checks import CHECKS, Check
from fakevfio.check._runner import (
    DEFAULT_TIMEOUT_S,
    CheckResult,
    run_checks,
    run_checks_detached,
    select,
    table,
    to_json,
    to_junit_xml,
)

__all__ = [
    "CHECKS",
    "DEFAULT_TIMEOUT_S",
    "AccessError",
    "Check",
    "CheckResult",
    "Device",
    "FileDevice",
    "KernelDevice",
    "open_device",
    "run_checks",
    "run_checks_detached",
    "select",
    "table",
    "to_json",
    "to_junit_xml",
]
