"""trio tests of the transport pieces: the multifd stream reader, its pool, accepting."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
import trio
import trio.testing

from migrator.errors import ChannelBrokenError, ConfigurationError, FramingError
from migrator.transport import (
    Address,
    BufferPool,
    StreamReader,
    open_listeners,
    serve_connections,
)
from tests.migrator.memory import MemoryListener

GUARD_S = 10


async def test_reader_receive_exactly_across_chunks() -> None:
    with trio.fail_after(GUARD_S):
        client, server = trio.testing.memory_stream_pair()
        reader = StreamReader(server, b"ab")
        await client.send_all(b"cd")
        await client.send_all(b"efg")
        assert await reader.receive_exactly(3, "x") == b"abc"
        assert await reader.receive_exactly(2, "x") == b"de"
        assert reader.take_buffered() in (b"", b"fg")


async def test_reader_eof_before_the_first_byte_is_none() -> None:
    with trio.fail_after(GUARD_S):
        client, server = trio.testing.memory_stream_pair()
        await client.aclose()
        assert await StreamReader(server).receive_exactly(4, "x") is None


async def test_reader_eof_inside_a_read_is_a_framing_error() -> None:
    with trio.fail_after(GUARD_S):
        client, server = trio.testing.memory_stream_pair()
        await client.send_all(b"ab")
        await client.aclose()
        with pytest.raises(FramingError, match=r"unexpected EOF in a header \(2 of 4 bytes\)"):
            await StreamReader(server).receive_exactly(4, "a header")


async def test_reader_payload_into_a_pooled_buffer() -> None:
    with trio.fail_after(GUARD_S):
        client, server = trio.testing.memory_stream_pair()
        pool = BufferPool(64, max_buffers=1)
        reader = StreamReader(server, b"xy")
        await client.send_all(b"z" * 40)
        view = await reader.receive_payload(42, "a payload", pool)
        assert bytes(view) == b"xy" + b"z" * 40
        assert len(view.obj) == 64  # type: ignore[arg-type]
        pool.give_back([view])
        pool.give_back([memoryview(bytearray(64))])  # over max_buffers: dropped
        assert pool.take(10) is view.obj  # reused, even for a small payload
        assert len(pool.take(3)) == 3  # small and the pool is empty: a buffer of its own
        assert len(pool.take(100)) == 100


async def test_reader_payload_cut_short() -> None:
    with trio.fail_after(GUARD_S):
        client, server = trio.testing.memory_stream_pair()
        await client.send_all(b"abc")
        await client.aclose()
        reader = StreamReader(server)
        with pytest.raises(FramingError, match=r"unexpected EOF in a payload \(3 of 8 bytes\)"):
            await reader.receive_payload(8, "a payload", BufferPool(64))
        client, server = trio.testing.memory_stream_pair()
        await client.aclose()
        with pytest.raises(FramingError, match="unexpected EOF after packet header"):
            await StreamReader(server).receive_payload(8, "a payload", BufferPool(64))


async def test_reader_broken_stream_is_channel_broken() -> None:
    with trio.fail_after(GUARD_S):
        _, server = trio.testing.memory_stream_pair()
        await server.aclose()
        with pytest.raises(ChannelBrokenError, match="while reading a header"):
            await StreamReader(server).receive_exactly(4, "a header")


async def test_serve_connections_accepts_on_every_listener() -> None:
    listeners = [MemoryListener(), MemoryListener()]
    got: list[bytes] = []
    accepting = trio.CancelScope()

    async def handle(stream: trio.abc.Stream) -> None:
        data = await stream.receive_some()
        got.append(bytes(data))
        if len(got) == 2:
            accepting.cancel()
        await stream.send_all(b"ok:" + data)  # handlers go on after accepting stopped

    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_connections, listeners, handle, accepting)
            a = await listeners[1].connect()
            b = await listeners[0].connect()
            await a.send_all(b"a")
            await b.send_all(b"b")
            assert await a.receive_some() == b"ok:a"
            assert await b.receive_some() == b"ok:b"
    assert sorted(got) == [b"a", b"b"]
    assert all(listener.closed for listener in listeners)


# -- unix listen paths: only a stale socket is ever replaced ------------------------


async def test_unix_listen_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("important\n")
    with pytest.raises(ConfigurationError, match="exists and is not a socket; refusing"):
        await open_listeners(Address.parse(f"unix:{precious}"))
    assert precious.read_text() == "important\n"


async def test_unix_listen_refuses_a_live_socket_and_leaves_it_working(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    live = await open_listeners(Address.parse(f"unix:{path}"))
    try:
        with pytest.raises(ConfigurationError, match="another process is listening there"):
            await open_listeners(Address.parse(f"unix:{path}"))
        with trio.fail_after(GUARD_S):
            client = await trio.open_unix_socket(str(path))
            server = await live[0].accept()
            await client.send_all(b"still mine")
            assert await server.receive_some(64) == b"still mine"
            await client.aclose()
            await server.aclose()
    finally:
        for listener in live:
            await listener.aclose()


async def test_unix_listen_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, never listening, then closed: what a killed process leaves
    dead.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    listeners = await open_listeners(Address.parse(f"unix:{path}"))
    try:
        with trio.fail_after(GUARD_S):
            client = await trio.open_unix_socket(str(path))
            await client.aclose()
    finally:
        for listener in listeners:
            await listener.aclose()
