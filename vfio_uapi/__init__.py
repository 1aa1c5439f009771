"""vfio_uapi: the Linux VFIO migration uAPI as pure, dependency-free Python.

General layout
--------------
This is the room both :mod:`fakevfio` (the device side) and :mod:`migrator`
(the VMM side) build on, so that neither reaches into the other. It imports
nothing but the standard library and attrs, never trio, pyfuse3 or either
package.

- :mod:`vfio_uapi.fsm`: the kernel's migration state machine
  (``vfio_mig_get_next_state``), its paths and the one session rule
  (:func:`~vfio_uapi.fsm.session_change`).
- :mod:`vfio_uapi.abi`: ioctl numbers, struct layouts and flag bits of
  ``linux/vfio.h`` and ``linux/iommufd.h``, checked against a compiled C program.
- :mod:`vfio_uapi.units`: the K/M/G size suffixes all options share.
- :mod:`vfio_uapi.errors`: :class:`IllegalTransition`.
"""

from __future__ import annotations

from vfio_uapi.errors import IllegalTransition
from vfio_uapi.fsm import (
    END_SESSION_ARCS,
    NEW_SESSION_ARCS,
    NO_CHANGE,
    PRECOPY_STATES,
    SAVING_STATES,
    MigFlags,
    SessionChange,
    State,
    arcs_session_change,
    path,
    session_change,
)
from vfio_uapi.units import parse_size

__all__ = [
    "END_SESSION_ARCS",
    "NEW_SESSION_ARCS",
    "NO_CHANGE",
    "PRECOPY_STATES",
    "SAVING_STATES",
    "IllegalTransition",
    "MigFlags",
    "SessionChange",
    "State",
    "arcs_session_change",
    "parse_size",
    "path",
    "session_change",
]
