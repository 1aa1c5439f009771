"""The control channel's socket: the mount answers :mod:`._control` requests in threads.

Rule 1: the address is abstract (no file to create or clean up; gone with the
        process) and random per mount, and the mount itself names it: the
        extended attribute :data:`ADDRESS_XATTR` of its root, which only the
        daemon serving that mount can answer, so a supervisor never reaches
        another mount's channel (a name derived from ``st_dev`` could: device
        numbers are reused). Abstract names belong to the network namespace: a
        ``fakevfio run`` in another one finds nothing and uses the files, as it
        does with a mount that has no channel.
Rule 2: ``SOCK_SEQPACKET``: one request per message. A longer one than
        :data:`MAX_MESSAGE` is cut by the kernel (``MSG_TRUNC`` tells) and answered
        EINVAL, unread; buffers are bounded.
Rule 3: only a peer of the mount's own uid, or root, is served (``SO_PEERCRED``);
        anyone else is disconnected at once and goes through the files, where the
        kernel checks the permissions.
Rule 4: a thread per connection, at most :data:`MAX_CONNECTIONS` (more are refused by
        a disconnect: the files still work); the device model is thread-safe (its
        lock), and a request runs while the trio task serves FUSE. The answer's delay
        (an injected arc delay) is slept in that thread, so only that caller waits.
Rule 5: :meth:`ControlServer.close` stops the listener and every connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
import threading
import time

from fakevfio._control import MAX_MESSAGE, answer, oversized
from fakevfio._tree import Tree

logger = logging.getLogger(__name__)

#: Connections served at once (each is a ``fakevfio run`` supervisor, usually one).
MAX_CONNECTIONS = 64
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid


#: The mount root's extended attribute that holds the channel's abstract socket name
#: (without the leading NUL).
ADDRESS_XATTR = "user.fakevfio.control"
_PREFIX = b"fakevfio/control/"


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end (``SO_PEERCRED``)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[1])


class ControlServer:
    """The channel of one mount: a listener thread and a thread per connection."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree
        #: the abstract name, without its leading NUL (the root's ADDRESS_XATTR)
        self.address = _PREFIX + secrets.token_hex(16).encode()
        self._uid = os.geteuid()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._listener.bind(b"\0" + self.address)
        self._listener.listen(8)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="fakevfio-control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening and end every connection (Rule 5)."""
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            uid = -1
            with contextlib.suppress(OSError):
                uid = peer_uid(conn)
            allowed = uid in (0, self._uid)
            with self._lock:
                serve = allowed and not self._closed and len(self._connections) < MAX_CONNECTIONS
                if serve:
                    self._connections.add(conn)
            if not serve:
                if not allowed:
                    logger.info("control channel: uid %d is not served (Rule 3)", uid)
                conn.close()
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="fakevfio-control-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                message, _, flags, _ = conn.recvmsg(MAX_MESSAGE)
                if not message and not flags:
                    return  # the peer closed
                done = oversized() if flags & socket.MSG_TRUNC else answer(self.tree, message)
                if done.delay_s > 0:
                    time.sleep(done.delay_s)
                conn.send(done.message)
        except OSError:
            return  # closed under us, or the peer vanished mid-answer
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()


def connect(address: bytes) -> socket.socket | None:
    """A connection to the channel named ``address``; None if nothing listens there."""
    if not address.startswith(_PREFIX):
        return None  # not a name a mount gives: never connect elsewhere
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(b"\0" + address)
    except OSError:
        sock.close()
        return None
    return sock


def connect_mount(mountpoint: str | os.PathLike[str]) -> socket.socket | None:
    """A connection to the channel of the mount at ``mountpoint``; None if it has none.

    One GETXATTR request to the mount; a mount without a channel (an older fakevfio)
    answers ENODATA or ENOTSUP.
    """
    try:
        address = os.getxattr(mountpoint, ADDRESS_XATTR)
    except OSError:
        return None
    return connect(address)


__all__ = [
    "ADDRESS_XATTR",
    "MAX_CONNECTIONS",
    "ControlServer",
    "connect",
    "connect_mount",
    "peer_uid",
]
