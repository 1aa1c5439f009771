"""Addresses and byte streams: tcp, unix, and files, all as trio streams.

Everything the engines send or receive goes through ``trio.abc.Stream``
(``send_all``/``receive_some``), so tests can substitute memory streams and the
file transport looks like a one-way connection. Also here: the exact-size
reader of multifd channels (``recv_into`` straight into pooled buffers on a
socket), its buffer pool, and a re-armable event.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, TypeVar

import attrs
import trio

from migrator.errors import ChannelBrokenError, ConfigurationError, FramingError, MigrationError
from migrator.reassembly import Buffer

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


def bound_silence(stream: trio.abc.Stream, peer_timeout_s: float) -> None:
    """A TCP peer that stops acknowledging for ``peer_timeout_s`` breaks ``stream``.

    TCP_USER_TIMEOUT (RFC 5482) ends a connection whose sent data or keepalive
    probe stays unacknowledged that long (ETIMEDOUT), and keepalive probes every
    second make it apply to a side that is only waiting: without them a cut link
    leaves a sender blocked for TCP's own retransmission limit (about 15 minutes).
    Unix sockets and other streams are left alone (a local peer that dies closes
    them).
    """
    inet = (trio.socket.AF_INET, trio.socket.AF_INET6)
    if not isinstance(stream, trio.SocketStream) or stream.socket.family not in inet:
        return
    tcp = trio.socket.IPPROTO_TCP
    stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_KEEPALIVE, 1)
    stream.setsockopt(tcp, trio.socket.TCP_KEEPIDLE, 1)
    stream.setsockopt(tcp, trio.socket.TCP_KEEPINTVL, 1)
    stream.setsockopt(tcp, trio.socket.TCP_USER_TIMEOUT, max(1, int(peer_timeout_s * 1000)))


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
    """Listen on ``addr``.

    A unix path is only ever replaced when it is a socket nobody listens on
    (one left by a process that died): any other file, or a live socket, is a
    ConfigurationError and stays as it was.
    """
    try:
        if addr.kind == "tcp":
            return await trio.open_tcp_listeners(addr.port, host=addr.host or None)
        _remove_stale_socket(addr.path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(addr.path)
        sock.listen(64)
        return [trio.SocketListener(sock)]
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {addr}: {exc.strerror or exc}") from exc


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigurationError(
            f"cannot listen on unix:{path}: the path exists and is not a socket; "
            "refusing to replace it (remove it or choose another path)"
        )
    if _unix_listening(path):
        raise ConfigurationError(
            f"cannot listen on unix:{path}: another process is listening there "
            "(Address already in use)"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale: nobody listens there


#: ``__SO_ACCEPTCON`` in the Flags column of /proc/net/unix: a listening socket.
_SO_ACCEPTCON = 0x10000


def _unix_listening(path: str) -> bool:
    """Whether a listening socket is bound to ``path`` (read from /proc, no connection made:
    a probing connect would look like a failed migration to the process listening)."""
    want = os.path.abspath(path)
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as table:
            lines = table.read().splitlines()[1:]
    except OSError:
        return True  # cannot tell: never replace what might be live
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) == 8 and int(fields[3], 16) & _SO_ACCEPTCON:
            bound = fields[7]
            if bound == path or os.path.abspath(bound) == want:
                return True
    return False


def listening_on(addr: Address, listeners: list[trio.SocketListener]) -> str:
    """Where ``listeners`` opened for ``addr`` listen (the real port for ``tcp:HOST:0``)."""
    if addr.kind == "tcp":
        return f"tcp:{addr.host}:{listeners[0].socket.getsockname()[1]}"
    return str(addr)


async def serve_connections(
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    handle: Callable[[trio.abc.Stream], Awaitable[None]],
    accepting: trio.CancelScope,
) -> None:
    """Hand every connection of ``listeners`` to ``handle``, each in a task of its own.

    Accepting stops when ``accepting`` is cancelled (the handlers go on); then
    the listeners are closed. Returns once every handler returned.
    """
    async with trio.open_nursery() as handlers:

        async def accept_from(listener: trio.abc.Listener[trio.abc.Stream]) -> None:
            while True:
                stream = await listener.accept()
                handlers.start_soon(handle, stream)

        with accepting:
            try:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(accept_from, listener)
            finally:
                with trio.CancelScope(shield=True):
                    for listener in listeners:
                        await listener.aclose()


#: Buffers per sendmsg(): far below any IOV_MAX (1024 on Linux).
_SEND_PARTS_MAX = 64


async def send_parts(stream: trio.abc.Stream, parts: Sequence[Buffer]) -> None:
    """``send_all`` of every part in turn, as one ``sendmsg`` scatter list on a socket.

    A DATA block's 12-byte header and its 1 MiB of data leave in one system
    call, uncopied, instead of two (with TCP_NODELAY the lone header would
    also be a segment of its own). Other streams get one ``send_all`` per part.
    Errors are the socket's own (OSError), as ``send_all``'s are trio's.
    """
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    sock = stream.socket if isinstance(stream, trio.SocketStream) else None
    if sock is None or len(views) < 2:
        for view in views:
            await stream.send_all(view)
        return
    first = 0
    while first < len(views):
        sent = await sock.sendmsg(views[first : first + _SEND_PARTS_MAX])
        while sent and sent >= len(views[first]):
            sent -= len(views[first])
            first += 1
        if sent:
            views[first] = views[first][sent:]


class Notifier:
    """A re-armable event: ``wait()`` until the next ``notify()``."""

    def __init__(self) -> None:
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()


class BufferPool:
    """Reusable receive buffers of ``size`` bytes, at most ``max_buffers`` kept.

    A fresh 1 MiB buffer per multifd packet costs page faults; a buffer whose
    bytes were written to the device comes back here for a later packet.
    """

    def __init__(self, size: int, max_buffers: int = 16) -> None:
        self.size = size
        self.max_buffers = max_buffers
        self._free: list[bytearray] = []

    def take(self, n: int) -> bytearray:
        """A buffer of at least ``n`` bytes."""
        if self._free and n <= self.size:
            return self._free.pop()
        if n < self.size // 16:
            return bytearray(n)  # config packets and other small ones: not pooled
        return bytearray(max(self.size, n))

    def give_back(self, buffers: Iterable[Buffer]) -> None:
        """Keep the pool's own buffers behind these views for reuse (bounded)."""
        for buf in buffers:
            base = buf.obj if isinstance(buf, memoryview) else None
            if (
                isinstance(base, bytearray)
                and len(base) == self.size
                and len(self._free) < self.max_buffers
            ):
                self._free.append(base)


#: The largest SO_RCVLOWAT asked for (Linux caps it at half of tcp_rmem's maximum).
_LOWAT_MAX_BYTES = 4 << 20


class StreamReader:
    """Exact-size reads from a multifd channel's stream with a small carry-over buffer.

    On TCP the reader always knows how many bytes it still needs, and says so
    with SO_RCVLOWAT before it waits: the kernel then wakes it once the rest
    of a 1 MiB payload is there, not for every 64 KiB segment that arrives
    (measured: 9 recv() and 7 epoll_wait() per MiB before, about 3 and 1
    after). It never waits for a byte the peer does not owe: the low-water
    mark is the exact remainder of what it reads, and a closing or stalled
    peer still wakes it (FIN, error, or a full receive window).
    """

    def __init__(self, stream: trio.abc.Stream, initial: bytes = b"") -> None:
        self.stream = stream
        self._buf = bytearray(initial)
        sock = getattr(stream, "socket", None)
        inet = (trio.socket.AF_INET, trio.socket.AF_INET6)
        self._tcp = sock if sock is not None and sock.family in inet else None
        self._lowat = 1

    def _expect(self, n: int) -> None:
        """Wake for at least ``n`` more bytes (SO_RCVLOWAT), once a read came back short."""
        lowat = max(1, min(n, _LOWAT_MAX_BYTES))
        if self._tcp is not None and lowat != self._lowat:
            try:
                self._tcp.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVLOWAT, lowat)
            except OSError:
                self._tcp = None  # a socket that refuses it is read as before
                return
            self._lowat = lowat

    async def receive_exactly(self, n: int, what: str) -> bytes | None:
        """``n`` bytes, or None on EOF before the first byte; FramingError on a short read."""
        while len(self._buf) < n:
            self._expect(n - len(self._buf))
            try:
                data = await self.stream.receive_some(max(65536, n - len(self._buf)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ChannelBrokenError(
                    f"multifd channel broke while reading {what}: {exc}"
                ) from exc
            if not data:
                if not self._buf:
                    return None
                raise FramingError(f"unexpected EOF in {what} ({len(self._buf)} of {n} bytes)")
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def receive_payload(self, n: int, what: str, pool: BufferPool) -> memoryview:
        """Exactly ``n`` bytes into a buffer of their own, straight from the socket.

        A 1 MiB multifd payload goes from the kernel into its buffer with
        ``recv_into``: no carry-over buffer, no slicing, no trimming. The
        buffer comes from ``pool``.
        """
        view = memoryview(pool.take(n))[:n]
        got = min(len(self._buf), n)
        view[:got] = self._buf[:got]
        del self._buf[:got]
        sock = getattr(self.stream, "socket", None)
        while got < n:
            self._expect(n - got)
            try:
                if sock is not None:
                    k = await sock.recv_into(view[got:])
                else:
                    data = await self.stream.receive_some(n - got)
                    k = len(data)
                    view[got : got + k] = data
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ChannelBrokenError(
                    f"multifd channel broke while reading {what}: {exc}"
                ) from exc
            if k == 0:
                where = "after packet header" if got == 0 else f"in {what} ({got} of {n} bytes)"
                raise FramingError(f"unexpected EOF {where}")
            got += k
        return view

    def take_buffered(self) -> bytes:
        """Bytes read from the stream but not yet consumed; the stream is handed on.

        The low-water mark goes back to 1: the next reader does not know what
        this one expected (a main channel left at 4 would never see a lone
        QEMU_VM_EOF byte).
        """
        self._expect(1)
        out = bytes(self._buf)
        self._buf.clear()
        return out


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


T = TypeVar("T")


class _Named(Protocol):
    @property
    def idstr(self) -> str: ...


async def call(phase: str, dev: _Named, fn: Callable[..., T], *args: object) -> T:
    """Run a blocking backend call in a worker thread, tagging its errors with phase and device."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except MigrationError as exc:
        raise exc.with_context(phase=phase, device=dev.idstr) from None
