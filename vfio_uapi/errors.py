"""The one error of the shared uAPI room: a migration state that cannot be reached.

It is a ``ValueError`` (a request the uAPI refuses with EINVAL) and stands outside
both packages' roots on purpose: :mod:`fakevfio` wraps it into its own
``IllegalTransition`` (a ``DeviceError`` with errno EINVAL), and the migrator's
kernel backend only uses it to learn that no arc would run.
"""

from __future__ import annotations

import errno as _errno


class IllegalTransition(ValueError):
    """No path leads from ``current`` to ``requested`` for this device's flags."""

    def __init__(self, current: str, requested: str, reason: str) -> None:
        self.current = current
        self.requested = requested
        self.reason = reason
        #: What the kernel's SET ioctl returns for it.
        self.errno = _errno.EINVAL
        super().__init__(f"cannot move from {current} to {requested}: {reason}")
