"""The stop-copy data path's moving parts: scatter sends, receive low-water marks,
multi-buffer reads and the destination's write-behind ordering (issue 19)."""

from __future__ import annotations

import os
import threading
import time

import trio
import trio.testing

from migrator._source_device import filled
from migrator.backend import DataFdBackend
from migrator.config import MigrationConfig
from migrator.destination import Destination
from migrator.errors import DeviceOpError
from migrator.source import migrate
from migrator.transport import StreamReader, send_parts
from tests.migrator.memory import MemoryDevice, MemoryListener
from vfio_uapi.fsm import MigFlags, State

MIB = 1 << 20
GUARD_S = 30


def _pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


async def test_send_parts_over_a_socket_keeps_every_byte_in_order() -> None:
    # Far more than a socket buffer, so sendmsg() comes back short inside a part.
    parts: list[bytes | memoryview] = [_pattern(12, 1), b"", _pattern(3 * MIB + 7, 2)]
    parts += [memoryview(_pattern(5000, 3))[17:]]
    parts += [_pattern(12, 4), _pattern(MIB, 5)]
    want = b"".join(bytes(p) for p in parts)
    with trio.fail_after(GUARD_S):
        a, b = trio.socket.socketpair()
        sender, receiver = trio.SocketStream(a), trio.SocketStream(b)
        got = bytearray()

        async def drain() -> None:
            while len(got) < len(want):
                got.extend(await receiver.receive_some(7000))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            await send_parts(sender, parts)
        await sender.aclose()
        await receiver.aclose()
    assert bytes(got) == want


async def test_send_parts_on_a_memory_stream_sends_each_part() -> None:
    with trio.fail_after(GUARD_S):
        client, server = trio.testing.memory_stream_pair()
        await send_parts(client, [b"ab", b"", memoryview(b"cde")])
        await client.aclose()
        got = b""
        while data := await server.receive_some():
            got += data
    assert got == b"abcde"


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    for listener in listeners:
        await listener.aclose()
    assert isinstance(server, trio.SocketStream)
    return client, server


def _lowat(stream: trio.SocketStream) -> int:
    return int(stream.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVLOWAT))


async def test_reader_waits_for_what_it_still_needs_then_hands_on_at_one() -> None:
    with trio.fail_after(GUARD_S):
        client, server = await _tcp_pair()
        reader = StreamReader(server)
        out: dict[str, bytes | None] = {}

        async def read() -> None:
            out["data"] = await reader.receive_exactly(100, "a header")

        async with trio.open_nursery() as nursery:
            await client.send_all(b"x" * 10)
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()  # read 10, waits for 90 more
            assert _lowat(server) == 90
            await client.send_all(b"y" * 95)
        assert out["data"] == b"x" * 10 + b"y" * 90
        assert reader.take_buffered() == b"y" * 5
        # Whoever reads next does not know what this reader expected.
        assert _lowat(server) == 1
        await client.aclose()
        await server.aclose()


def test_filled_splits_a_read_at_the_buffer_boundaries() -> None:
    bufs = [memoryview(bytearray(4)) for _ in range(3)]
    assert [len(v) for v in filled(bufs, 10)] == [4, 4, 2]
    assert [len(v) for v in filled(bufs, 8)] == [4, 4]
    assert filled(bufs, 0) == []


class _Trickle(MemoryDevice):
    """A device whose reads return at most 3 bytes (a driver with little ready at a time)."""

    def read_data(self, buf: memoryview) -> int:
        return super().read_data(buf[:3])


def test_read_data_many_stops_at_a_short_read() -> None:
    dev = MemoryDevice("d/vfio", _pattern(10))
    dev.set_state(State.STOP_COPY)
    bufs = [memoryview(bytearray(4)) for _ in range(4)]
    assert dev.read_data_many(bufs) == 10
    assert b"".join(bytes(v) for v in filled(bufs, 10)) == _pattern(10)
    assert dev.read_data_many(bufs) == 0
    # A short read ends the call: the next buffer would not start where filled() says.
    trickle = _Trickle("t/vfio", _pattern(10))
    trickle.set_state(State.STOP_COPY)
    assert trickle.read_data_many(bufs) == 3
    assert bytes(bufs[0][:3]) == _pattern(10)[:3]


class _SlowDevice(MemoryDevice):
    """A destination whose data writes take a while; it logs what finished when."""

    def __init__(self, idstr: str) -> None:
        super().__init__(idstr)
        self.log: list[str] = []

    def write_data(self, data: memoryview) -> None:
        time.sleep(0.005)
        super().write_data(data)
        self.log.append("data")

    def write_config(self, blob: bytes) -> None:
        super().write_config(blob)
        self.log.append("config")

    def set_state(self, state: State) -> None:
        super().set_state(state)
        self.log.append(state.name)


async def test_destination_writes_data_behind_but_config_and_start_after_it() -> None:
    """Main-channel DATA is written while more arrives; config and RUNNING wait for it."""
    size = 6 * MIB + 3
    src = MemoryDevice("gpu/vfio", _pattern(size), config=b"tag")
    dst = _SlowDevice("gpu/vfio")
    cfg = MigrationConfig(multifd_channels=0)
    listener = MemoryListener()
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Destination(cfg, [dst]).serve, [listener])
            await migrate(cfg, [src], listener.connect)
    assert bytes(dst.received) == src.state_bytes
    assert dst.loaded_config == src.config
    last_data = max(i for i, what in enumerate(dst.log) if what == "data")
    assert dst.log[last_data + 1 :] == ["config", "RUNNING"]


class _PipeBackend(DataFdBackend):
    """A data_fd backend over one end of a pipe (only the data_fd half is used)."""

    def __init__(self, fd: int) -> None:
        self.location = "pipe"
        self.idstr = "pipe/vfio"
        self._data_fd = fd

    def _fail(self, op: str, exc: OSError) -> DeviceOpError:
        return DeviceOpError(self.location, op, exc.errno or 0)

    # The control half is never called here.
    def migration_flags(self) -> MigFlags:
        raise NotImplementedError

    def get_state(self) -> State:
        raise NotImplementedError

    def set_state(self, state: State) -> None:
        raise NotImplementedError

    def precopy_info(self) -> tuple[int, int]:
        raise NotImplementedError

    def data_size(self) -> int:
        raise NotImplementedError

    def read_config(self) -> bytes:
        raise NotImplementedError

    def write_config_at(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def test_data_fd_backend_reads_and_writes_several_buffers_per_call() -> None:
    payload = _pattern(3 * 100_000 + 17)
    bufs = [memoryview(payload)[i : i + 100_000] for i in range(0, len(payload), 100_000)]
    r, w = os.pipe()
    got = bytearray()

    def drain() -> None:
        while chunk := os.read(r, 65536):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        _PipeBackend(w).write_data_many(bufs)  # more than a pipe holds: writev comes back short
    finally:
        os.close(w)
        reader.join(GUARD_S)
        os.close(r)
    assert bytes(got) == payload
    r, w = os.pipe()
    try:
        os.write(w, payload[:150])
        into = [memoryview(bytearray(100)) for _ in range(3)]
        assert _PipeBackend(r).read_data_many(into) == 150  # what the pipe had: one readv
        assert b"".join(bytes(v) for v in filled(into, 150)) == payload[:150]
    finally:
        os.close(r)
        os.close(w)
