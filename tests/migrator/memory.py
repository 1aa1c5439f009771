"""In-memory stand-ins for engine tests: a device backend and a trio Listener.

``MemoryDevice`` keeps a device's state as bytes: a source reads it out in
STOP_COPY, a destination collects what is written while RESUMING. Pre-copy
reads have nothing to give (ENOMSG), so a pre-copy device sends its
INIT_DATA_SENT at once. ``MemoryListener.connect`` hands the other end of a
``trio.testing.memory_stream_pair`` to whoever ``accept``s.
"""

from __future__ import annotations

import errno

import trio
import trio.testing

from migrator.backend import DeviceBackend
from migrator.errors import DeviceOpError, NoDataNow
from vfio_uapi.fsm import PRECOPY_STATES, MigFlags, State


def config_space(bars: bytes) -> bytes:
    """A 256-byte type-0 config space (virtio's ids) whose BARs hold ``bars`` (<= 24 bytes).

    The BARs are among what a destination restores (migrator._wire.pci_config
    Rule 3), so a tag there travels from a source to a destination device.
    """
    assert len(bars) <= 24, bars
    space = bytearray(256)
    space[0:4] = b"\xf4\x1a\x00\x10"
    space[0x10 : 0x10 + len(bars)] = bars
    return bytes(space)


class MemoryDevice(DeviceBackend):
    """A device whose migration state is ``state`` (source) or what was written (destination)."""

    def __init__(
        self,
        idstr: str,
        state: bytes = b"",
        config: bytes = b"",
        *,
        flags: MigFlags = MigFlags.STOP_COPY,
    ) -> None:
        self.idstr = idstr
        self.location = f"memory:{idstr}"
        self.state_bytes = state
        self.config = config_space(config)
        self.flags = flags
        self.state = State.RUNNING
        self.arcs: list[tuple[State, State]] = []
        self.received = bytearray()
        self.loaded_config: bytes | None = None
        self._pos = 0

    def migration_flags(self) -> MigFlags:
        return self.flags

    def get_state(self) -> State:
        return self.state

    def set_state(self, state: State) -> None:
        if state is State.STOP_COPY and self.state not in PRECOPY_STATES:
            self._pos = 0
        if state is State.RESUMING:
            self.received.clear()
        self.arcs.append((self.state, state))
        self.state = state

    def read_data(self, buf: memoryview) -> int:
        if self.state in PRECOPY_STATES:
            raise NoDataNow(self.idstr)
        if self.state is not State.STOP_COPY:
            raise DeviceOpError(self.location, "read", errno.EBADF, "no data_fd")
        chunk = self.state_bytes[self._pos : self._pos + len(buf)]
        buf[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def write_data(self, data: memoryview) -> None:
        if self.state is not State.RESUMING:
            raise DeviceOpError(self.location, "write", errno.EBADF, "no data_fd")
        self.received += data

    def precopy_info(self) -> tuple[int, int]:
        if not self.flags & MigFlags.PRE_COPY:
            raise DeviceOpError(self.location, "PRECOPY_INFO", errno.ENOTTY)
        return 0, 0

    def data_size(self) -> int:
        return max(1, len(self.state_bytes))

    def read_config(self) -> bytes:
        return self.config

    def write_config_at(self, offset: int, data: bytes) -> None:
        space = bytearray(self.config)
        space[offset : offset + len(data)] = data
        self.config = bytes(space)

    def write_config(self, blob: bytes) -> None:
        super().write_config(blob)
        self.loaded_config = self.config

    def reset(self) -> None:
        self.state = State.RUNNING

    def close(self) -> None:
        pass


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are memory stream pairs."""

    def __init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[trio.abc.Stream](64)
        self.closed = False

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        if self.closed:
            raise trio.BrokenResourceError("the listener is closed")
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise trio.ClosedResourceError("the listener is closed") from None

    async def aclose(self) -> None:
        self.closed = True
        self._recv.close()
        await trio.lowlevel.checkpoint()
