"""The driver API: what a vendor driver plugin implements.

There are two levels.

* :class:`ArcDriver` gives a driver full control, like a kernel variant driver's
  ``migration_set_state``: the core calls :meth:`ArcDriver.step` once per arc the
  kernel's FSM hands out, and the driver returns a :class:`SaveStream` or
  :class:`LoadStream` on the four arcs that open a new data_fd.
* :class:`StateDriver` is the simple level: the driver only describes its state
  as a byte array of ``state_size`` bytes (``save_range``/``load_range``), a
  versioned header it validates, and which pages its workload dirtied. The core
  turns that into sessions, chunking, pre-copy accounting and a validated
  stream (see :mod:`fakevfio._stream`).

Drivers are synchronous and do no I/O; the core serialises every call on a
device with one lock, so a driver needs no locking of its own. Errors a driver
wants userspace to see are raised as :class:`~fakevfio.errors.DeviceError` with
the errno the kernel would return.

General layout: :mod:`fakevfio.driver._base` holds :class:`ArcDriver` and the
stream types; :mod:`fakevfio._stream` implements StateDriver streams on those
types; :mod:`fakevfio.driver._state` holds :class:`StateDriver`, built on both.
"""

from __future__ import annotations

from fakevfio.driver._base import (
    IRQ_INTX,
    IRQ_MSI,
    IRQ_MSIX,
    PCI_CONFIG_SIZES,
    ArcDriver,
    Bar,
    BarKind,
    LoadStream,
    OptionSpec,
    PrecopyInfo,
    SaveStream,
)
from fakevfio.driver._state import StateDriver

__all__ = [
    "IRQ_INTX",
    "IRQ_MSI",
    "IRQ_MSIX",
    "PCI_CONFIG_SIZES",
    "ArcDriver",
    "Bar",
    "BarKind",
    "LoadStream",
    "OptionSpec",
    "PrecopyInfo",
    "SaveStream",
    "StateDriver",
]
