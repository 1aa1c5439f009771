"""What the core needs from the operating system to reach a VMM: its memory and its eventfds.

A device does DMA into the memory of the process that mapped it (a VMM's
guest RAM) and signals the eventfds that process gave it for interrupts.
Both are syscalls, so the core only holds a :class:`HostServices` handed in
by an adapter (:class:`fakevfio._process.OsServices` in a mount, the
in-process :class:`fakevfio.testing.LocalDevice`, ...). Without one
(``None``), every DMA access and every eventfd setup fails with ENODEV and
says so.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class HostServices(Protocol):
    """The syscalls behind DMA and interrupts; each raises OSError with the errno."""

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        """``size`` bytes of process ``pid`` at virtual address ``addr``."""
        ...

    def write_memory(self, pid: int, addr: int, data: bytes | memoryview) -> None:
        """Write ``data`` into process ``pid`` at virtual address ``addr``."""
        ...

    def take_fd(self, pid: int, fd: int) -> int:
        """A copy in this process of process ``pid``'s file descriptor ``fd``."""
        ...

    def close_fd(self, fd: int) -> None:
        """Close a copy made by :meth:`take_fd`."""
        ...

    def signal_eventfd(self, fd: int) -> None:
        """Add 1 to the eventfd counter of ``fd``."""
        ...

    def watch_eventfd(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from another thread) each time ``fd`` is signalled."""
        ...

    def unwatch_eventfd(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""
        ...
