"""The return-path codec: messages from the destination back to the source.

The destination talks back on the main connection with return-path messages
(be16 type, be16 length, payload; ``enum mig_rp_message_type`` in QEMU's
migration.c), of which we use ``SWITCHOVER_ACK``, ``PONG`` and ``SHUT``. Pure:
encoders return bytes, :class:`ReturnPathDecoder` is fed and drained h11 style.

As QEMU's ``source_return_path_thread``: a type that is INVALID (0) or past the
last one QEMU knows fails ("Received invalid message ..."), and so does a
known fixed-size type with another length or any payload over QEMU's 512-byte
buffer ("Received '...' message ... with incorrect length ..."). Types QEMU
knows but we never use (the postcopy ones) are returned as events; the
protocol refuses them.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

import attrs

from migrator._wire.buffer import _Buffer
from migrator._wire.savevm import NEED_DATA, NeedData
from migrator.errors import FramingError


class RpMsg(enum.IntEnum):
    """Return-path message types (enum mig_rp_message_type in migration.c)."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7


#: MIG_RP_MSG_MAX in QEMU 10.0: the first type it does not know.
RP_MSG_MAX: Final = 8
#: The size of QEMU's return-path buffer (``uint8_t buf[512]``): no payload is longer.
RP_MAX_PAYLOAD: Final = 512


# Fixed payload lengths of return-path messages (None = variable), as the
# source's return-path thread checks them.
_RP_LENGTHS: Final[dict[int, int | None]] = {
    RpMsg.SHUT: 4,
    RpMsg.PONG: 4,
    RpMsg.REQ_PAGES_ID: None,
    RpMsg.REQ_PAGES: 12,
    RpMsg.RECV_BITMAP: None,
    RpMsg.RESUME_ACK: 4,
    RpMsg.SWITCHOVER_ACK: 0,
}

_BE32 = struct.Struct(">I")
_RP_HEADER = struct.Struct(">HH")


def encode_rp_message(msg_type: int, payload: bytes = b"") -> bytes:
    """A return-path message: be16 type, be16 length, payload."""
    if len(payload) > 0xFFFF:
        raise ValueError(f"return-path payload is {len(payload)} bytes, the maximum is 65535")
    return _RP_HEADER.pack(msg_type, len(payload)) + payload


def encode_rp_shut(status: int) -> bytes:
    """MIG_RP_MSG_SHUT with its be32 status (0 = success)."""
    return encode_rp_message(RpMsg.SHUT, _BE32.pack(status & 0xFFFFFFFF))


def encode_rp_switchover_ack() -> bytes:
    """MIG_RP_MSG_SWITCHOVER_ACK (no payload)."""
    return encode_rp_message(RpMsg.SWITCHOVER_ACK)


@attrs.frozen
class RpEvent:
    """One return-path message; ``msg_type`` may be a type we do not know."""

    msg_type: int
    payload: bytes


class ReturnPathDecoder:
    """Sans-IO decoder of return-path messages (destination to source).

    Invalid types, wrong lengths and payloads over ``max_payload`` (QEMU's 512
    by default) raise FramingError, as QEMU's source does (module docstring).
    ``closed`` is True once the peer closed the channel at a message boundary.
    """

    def __init__(self, *, max_payload: int = RP_MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._buf = _Buffer()
        self._error: FramingError | None = None

    @property
    def closed(self) -> bool:
        return self._buf.eof and not self._buf.available()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes; ``b""`` means EOF."""
        if self._error is not None:
            raise FramingError(self._error.message) from self._error
        self._buf.receive(data)

    def next_event(self) -> RpEvent | NeedData:
        """The next message, or NEED_DATA (also after a clean close; see ``closed``)."""
        if self._error is not None:
            raise FramingError(self._error.message) from self._error
        try:
            return self._step()
        except FramingError as exc:
            self._error = exc
            raise

    def _step(self) -> RpEvent | NeedData:
        buf = self._buf
        avail = buf.available()
        if avail < 4:
            if buf.eof and avail:
                raise FramingError(f"truncated return path: EOF in message header ({avail} of 4)")
            return NEED_DATA
        msg_type, length = _RP_HEADER.unpack_from(buf.data, buf.pos)
        if msg_type == RpMsg.INVALID or msg_type >= RP_MSG_MAX:
            raise FramingError(
                f"Received invalid message 0x{msg_type:04x} length 0x{length:04x} "
                "on the return path (QEMU knows types 1 to 7)"
            )
        if length > self._max_payload:
            raise FramingError(
                f"return-path message 0x{msg_type:04x} of {length} bytes exceeds the maximum "
                f"of {self._max_payload}"
            )
        expected = _RP_LENGTHS.get(msg_type)
        if expected is not None and length != expected:
            raise FramingError(
                f"return-path message {RpMsg(msg_type).name} has length {length}, "
                f"expected {expected}"
            )
        if avail < 4 + length:
            if buf.eof:
                raise FramingError(
                    f"truncated return path: EOF in message 0x{msg_type:04x} "
                    f"({avail - 4} of {length} payload bytes)"
                )
            return NEED_DATA
        buf.pos += 4
        return RpEvent(msg_type, buf.take(length))


def rp_shut_status(event: RpEvent) -> int:
    """The be32 status of a SHUT message (0 means the destination succeeded)."""
    if event.msg_type != RpMsg.SHUT or len(event.payload) != 4:
        raise FramingError(
            f"not a SHUT message: type 0x{event.msg_type:04x}, {len(event.payload)} bytes"
        )
    status: int = _BE32.unpack(event.payload)[0]
    return status


def rp_is_switchover_ack(event: RpEvent) -> bool:
    """True for a well-formed SWITCHOVER_ACK (type 7, no payload)."""
    return event.msg_type == RpMsg.SWITCHOVER_ACK and not event.payload
