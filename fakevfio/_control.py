"""The control protocol: a device's migration state by name, without a file round trip.

``fakevfio run`` reads and sets device states more often than anything else
(every GET and SET MIG_DEVICE_STATE). Through ``migration/state`` each is a FUSE
request that the kernel, pyfuse3 and trio carry in about 60 us on a 2-core
machine, plus a ``statx`` to see that the kept fd is still that device's; the
mount answers the same two operations on a socket too (:mod:`fakevfio._channel`)
in about 20 us. This module is that protocol, both ends, with no I/O.

Rule 1: a request is one message of at most :data:`MAX_MESSAGE` bytes, ASCII words
        separated by one space: ``get NAME`` or ``set NAME TARGET`` (TARGET as
        ``migration/state`` takes it: a name or a number). The answer is one message:
        ``ok STATE`` for a get, ``ok`` for a set, or ``err ERRNO TEXT``.
Rule 2: an answer is what the file gives: the same :class:`Tree` code runs (the text,
        the transition, ``last_error``, the injected arc delay, which the server waits
        out before it answers, as the file's write does), with the errno the FUSE
        adapter would reply; a device that is gone is ENOENT, as the open of its path.
        Unlike the file, the answer never lags a removal: no dentry cache in between.
Rule 3: a malformed request is answered ``err EINVAL`` saying what was wrong, and
        changes nothing.
"""

from __future__ import annotations

import errno
import logging

import attrs

from fakevfio._tree import Tree, errno_of

logger = logging.getLogger(__name__)

#: The longest request or answer (device names are short; an error text is cut to fit).
MAX_MESSAGE = 512


@attrs.frozen
class Answer:
    """The answer to one request and the seconds to wait before sending it (Rule 2)."""

    message: bytes
    delay_s: float = 0.0


def get_request(name: str) -> bytes:
    """The request for device ``name``'s state."""
    return f"get {name}".encode("ascii")


def set_request(name: str, target: str) -> bytes:
    """The request to set device ``name`` to ``target`` (a state name or number)."""
    return f"set {name} {target}".encode("ascii")


def parse_answer(message: bytes) -> tuple[int, str]:
    """``(0, text after ok)`` or ``(errno, text)``; ``(EIO, why)`` for a garbled answer."""
    text = message.decode("ascii", "replace")
    if text == "ok" or text.startswith("ok "):
        return 0, text[3:]
    if text.startswith("err "):
        code, _, why = text[4:].partition(" ")
        if code.isdigit() and int(code) > 0:
            return int(code), why
    return errno.EIO, f"the mount's control channel answered {text[:80]!r} (not ok/err)"


def _error(err: int, text: str) -> Answer:
    message = f"err {err} {text}".encode("ascii", "replace")
    return Answer(message[:MAX_MESSAGE])


def oversized() -> Answer:
    """The answer to a request longer than :data:`MAX_MESSAGE` (cut by the socket)."""
    return _error(errno.EINVAL, f"a control request is at most {MAX_MESSAGE} bytes")


def answer(tree: Tree, message: bytes) -> Answer:
    """The mount's answer to one request (Rules 1-3)."""
    try:
        words = message.decode("ascii").split(" ")
    except UnicodeDecodeError:
        return _error(errno.EINVAL, "a control request is ASCII")
    try:
        if words[0] == "get" and len(words) == 2:
            return Answer(b"ok " + tree.state_text(words[1]).encode("ascii"))
        if words[0] == "set" and len(words) == 3:
            return Answer(b"ok", tree.write_state(words[1], words[2]))
    except Exception as exc:
        err = errno_of(exc)
        if err is None:
            logger.error("control request %r: unexpected error", message[:80], exc_info=exc)
            return _error(errno.EIO, f"unexpected {type(exc).__name__} in the mount")
        return _error(err, str(exc))
    return _error(
        errno.EINVAL,
        f"unknown request {message[:80]!r}: expected 'get NAME' or 'set NAME TARGET'",
    )


__all__ = [
    "MAX_MESSAGE",
    "Answer",
    "answer",
    "get_request",
    "oversized",
    "parse_answer",
    "set_request",
]
