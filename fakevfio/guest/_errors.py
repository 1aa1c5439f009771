"""The guest kit's errors (one module, so the QMP client and the QEMU runner share them)."""

from __future__ import annotations


class GuestError(RuntimeError):
    """The guest or its QEMU did not do what was expected (the message has the tails)."""


class GuestTimeout(GuestError, TimeoutError):
    """A wait on the guest ran out of time."""
