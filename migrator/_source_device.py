"""The source side's per-device record and its state helpers.

:class:`Dev` is what :class:`migrator.source.Source` tracks per device (section
id, flags, state, buffer size, pre-copy counters); :func:`call` runs a blocking
backend call in a worker thread and tags its errors; :func:`set_state` is QEMU's
vfio_migration_set_state (try ``recover``, else reset); :func:`restore_running`
is the failure path that returns every device to RUNNING. Shared by
``migrator.source`` and ``migrator._multifd_send``.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Sequence
from typing import TypeVar

import attrs

from migrator.backend import DeviceBackend
from migrator.config import DATA_BUFFER_BYTES
from migrator.errors import MigrationError
from migrator.transport import call
from vfio_uapi.fsm import MigFlags, State

logger = logging.getLogger("migrator.source")
T = TypeVar("T")


@attrs.define(eq=False)
class Dev:
    backend: DeviceBackend
    section_id: int
    flags: MigFlags = MigFlags.STOP_COPY
    state: State = State.RUNNING
    multifd: bool = False
    buf_size: int = DATA_BUFFER_BYTES
    init_size: int = 0
    dirty_size: int = 0
    init_sent: bool = False

    @property
    def idstr(self) -> str:
        return self.backend.idstr

    @property
    def precopy(self) -> bool:
        return bool(self.flags & MigFlags.PRE_COPY)


def aligned(size: int) -> memoryview:
    """A zeroed, page-aligned buffer.

    The kernel pins a direct-I/O read buffer page by page and caps one FUSE
    request at 256 pages: a 1 MiB buffer that does not start on a page boundary
    spans 257 pages and every read becomes two requests (1048560 + 16 bytes).
    QEMU's buffers are page-aligned, and so are ours.
    """
    return memoryview(mmap.mmap(-1, max(size, 1)))


#: Buffers one stop-copy read fills, one DATA block or multifd packet each: a
#: ``readv`` of 4 x 1 MiB costs one worker-thread hop where four reads cost four
#: (the device still sees QEMU's 1 MiB reads, see DeviceBackend.read_data_many).
READ_BUFFERS = 4


def read_buffers(dev: Dev) -> int:
    """How many buffers one stop-copy read of ``dev`` fills.

    Only whole 1 MiB buffers are read several at a time: each is then exactly
    one FUSE request (256 page-aligned pages) or one driver read(), so every
    DATA block is the one QEMU's own read would have produced. A smaller
    buffer (a state under 1 MiB) is read alone.
    """
    return READ_BUFFERS if dev.buf_size == DATA_BUFFER_BYTES else 1


def filled(bufs: Sequence[memoryview], n: int) -> list[memoryview]:
    """The parts of ``bufs`` that ``n`` bytes read into them in turn filled."""
    out = []
    for buf in bufs:
        if n <= 0:
            break
        out.append(buf[: min(n, len(buf))])
        n -= len(buf)
    return out


async def set_state(phase: str, dev: Dev, state: State, *, recover: State | None) -> None:
    """QEMU's vfio_migration_set_state: on failure try ``recover``, else reset."""
    if dev.state == state:
        return
    try:
        await call(phase, dev, dev.backend.set_state, state)
    except MigrationError as exc:
        recovered = False
        if recover is not None:
            try:
                await call(phase, dev, dev.backend.set_state, recover)
                dev.state = recover
                recovered = True
            except MigrationError as err:
                logger.warning("recovery to %s failed: %s", recover.name, err)
        if not recovered:
            await reset(dev)
        raise exc.with_context(phase=phase, device=dev.idstr) from None
    dev.state = state


async def set_or_reset(phase: str, dev: Dev, state: State) -> None:
    try:
        await set_state(phase, dev, state, recover=None)
    except MigrationError as exc:
        logger.warning("%s", exc)


async def reset(dev: Dev) -> None:
    try:
        await call("recovery", dev, dev.backend.reset)
    except MigrationError as exc:
        logger.error("reset failed: %s", exc)
    dev.state = State.RUNNING


async def restore_running(devs: Sequence[Dev]) -> None:
    """Failure path: every device back to RUNNING (reset if that fails)."""
    for dev in devs:
        try:
            current = await call("recovery", dev, dev.backend.get_state)
            dev.state = current
            if current is State.RUNNING:
                continue
            await call("recovery", dev, dev.backend.set_state, State.RUNNING)
            dev.state = State.RUNNING
        except MigrationError as exc:
            logger.warning("%s; resetting", exc)
            await reset(dev)
