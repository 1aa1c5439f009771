"""Addresses and byte streams: tcp, unix, and files, all as trio streams.

Everything the engines send or receive goes through ``trio.abc.Stream``
(``send_all``/``receive_some``), so tests can substitute memory streams and the
file transport looks like a one-way connection.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Awaitable, Callable

import attrs
import trio

from migrator.errors import ConfigurationError

MAX_UNIX_PATH = 107


@attrs.frozen
class Address:
    """``tcp:HOST:PORT`` or ``unix:PATH``."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> Address:
        kind, sep, rest = text.partition(":")
        if kind == "tcp" and sep:
            host, sep2, port = rest.rpartition(":")
            if not sep2 or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ConfigurationError(f"invalid address {text!r} (expected tcp:HOST:PORT)")
            return cls("tcp", host=host.strip("[]") or "127.0.0.1", port=int(port))
        if kind == "unix" and rest:
            if len(rest.encode()) > MAX_UNIX_PATH:
                raise ConfigurationError(f"unix socket path {rest!r} is too long")
            return cls("unix", path=rest)
        raise ConfigurationError(f"invalid address {text!r} (expected tcp:HOST:PORT or unix:PATH)")

    def __str__(self) -> str:
        return f"tcp:{self.host}:{self.port}" if self.kind == "tcp" else f"unix:{self.path}"


async def open_stream(addr: Address) -> trio.abc.Stream:
    """Connect to ``addr``."""
    try:
        if addr.kind == "tcp":
            stream: trio.abc.Stream = await trio.open_tcp_stream(addr.host, addr.port)
            stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
            return stream
        return await trio.open_unix_socket(addr.path)
    except OSError as exc:
        raise ConfigurationError(f"cannot connect to {addr}: {exc.strerror or exc}") from exc


async def open_listeners(addr: Address) -> list[trio.SocketListener]:
    """Listen on ``addr`` (a stale unix socket file is replaced)."""
    try:
        if addr.kind == "tcp":
            return await trio.open_tcp_listeners(addr.port, host=addr.host or None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(addr.path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(addr.path)
        sock.listen(64)
        return [trio.SocketListener(sock)]
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {addr}: {exc.strerror or exc}") from exc


def listening_on(addr: Address, listeners: list[trio.SocketListener]) -> str:
    """Where ``listeners`` opened for ``addr`` listen (the real port for ``tcp:HOST:0``)."""
    if addr.kind == "tcp":
        return f"tcp:{addr.host}:{listeners[0].socket.getsockname()[1]}"
    return str(addr)


class FileStream(trio.abc.Stream):
    """A file as a one-directional trio stream (``save`` writes, ``load`` reads)."""

    def __init__(self, file: trio.abc.AsyncResource, raw: object) -> None:
        self._file = file
        self._raw = raw

    @classmethod
    async def open(cls, path: str, mode: str) -> FileStream:
        try:
            f = await trio.open_file(path, mode + "b", buffering=0)
        except OSError as exc:
            raise ConfigurationError(f"cannot open {path}: {exc.strerror or exc}") from exc
        return cls(f, f)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        write: Callable[[memoryview], Awaitable[int]] = self._file.write  # type: ignore[attr-defined]
        while len(view):
            n = await write(view)
            view = view[n:]

    async def wait_send_all_might_not_block(self) -> None:
        return

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        read: Callable[[int], Awaitable[bytes]] = self._file.read  # type: ignore[attr-defined]
        return await read(max_bytes or 1 << 20)

    async def aclose(self) -> None:
        await self._file.aclose()

    async def flush_to_disk(self) -> None:
        fileno = self._file.fileno()  # type: ignore[attr-defined]
        await trio.to_thread.run_sync(os.fsync, fileno)
