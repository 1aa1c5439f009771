"""The libc handle and the raw-syscall helpers the ``fakevfio run`` modules share (x86-64).

Syscall numbers are from the x86-64 table; the wrappers in :mod:`._notify`,
:mod:`._caller` and :mod:`._child` turn a negative result into ``OSError``
with the errno and what was attempted.
"""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)

SYS_SECCOMP = 317
SYS_KCMP = 312
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438


def check(result: int, what: str) -> int:
    """``result``, or ``OSError`` with the errno if it is negative."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def syscall(nr: int, *args: int) -> int:
    """The raw ``syscall(nr, args...)`` result (-1 with errno set on failure)."""
    return int(libc.syscall(ctypes.c_long(nr), *map(ctypes.c_long, args)))
