"""Events of the main migration channel and its return path, as frozen values.

The savevm-level events (file header, configuration, section headers, VFIO
markers, DATA blocks, config blobs, footers, QEMU_VM_EOF) are the wire codec's
own values from :mod:`migrator._wire`, re-exported here; the three commands we
speak become events of their own (:class:`OpenReturnPath`, :class:`Ping`,
:class:`SwitchoverStart`), and so do the return-path messages
(:class:`SwitchoverAck`, :class:`Pong`, :class:`Shut`) and the peer's clean
close (:class:`Closed`). For multifd: the channels carry no main-channel
events; :class:`SwitchoverStart` is the one main-channel event the multifd
loaders wait for (the intake in :mod:`migrator._protocol.multifd` has its own).
"""

from __future__ import annotations

from typing import TypeAlias

import attrs

from migrator._wire import (
    NEED_DATA,
    ConfigBlob,
    Configuration,
    DataChunk,
    DataHeader,
    EndOfFile,
    FileHeader,
    MarkerEvent,
    NeedData,
    RpEvent,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    VmDescription,
)

__all__ = [
    "NEED_DATA",
    "Closed",
    "ConfigBlob",
    "Configuration",
    "DataChunk",
    "DataHeader",
    "EndOfFile",
    "Event",
    "FileHeader",
    "MainEvent",
    "MarkerEvent",
    "NeedData",
    "OpenReturnPath",
    "Ping",
    "Pong",
    "ReturnPathEvent",
    "RpEvent",
    "SectionEnd",
    "SectionFooter",
    "SectionFull",
    "SectionPart",
    "SectionStart",
    "Shut",
    "SwitchoverAck",
    "SwitchoverStart",
    "VmDescription",
]


@attrs.frozen
class OpenReturnPath:
    """MIG_CMD_OPEN_RETURN_PATH: the destination may talk back from now on."""


@attrs.frozen
class Ping:
    """MIG_CMD_PING with its be32 value (4 bytes); answered by :class:`Pong`."""

    value: bytes = attrs.field(validator=attrs.validators.max_len(4), default=bytes(4))


@attrs.frozen
class SwitchoverStart:
    """MIG_CMD_SWITCHOVER_START: in multifd mode, the loaders may start writing."""


@attrs.frozen
class SwitchoverAck:
    """MIG_RP_MSG_SWITCHOVER_ACK: every pre-copy device sent its initial data."""


@attrs.frozen
class Pong:
    """MIG_RP_MSG_PONG, echoing a :class:`Ping`'s value."""

    value: bytes = attrs.field(validator=attrs.validators.max_len(4), default=bytes(4))


@attrs.frozen
class Shut:
    """MIG_RP_MSG_SHUT: the destination's verdict (0 = loaded and running)."""

    status: int = attrs.field(validator=attrs.validators.ge(0))


@attrs.frozen
class Closed:
    """The peer closed its side at a clean point (after EOF / after SHUT)."""


#: What goes source -> destination on the main channel.
MainEvent: TypeAlias = (
    FileHeader
    | Configuration
    | OpenReturnPath
    | Ping
    | SwitchoverStart
    | SectionStart
    | SectionPart
    | SectionEnd
    | SectionFull
    | MarkerEvent
    | DataHeader
    | DataChunk
    | ConfigBlob
    | SectionFooter
    | EndOfFile
    | VmDescription
)
#: What goes destination -> source on the return path (RpEvent: a type we do not use).
ReturnPathEvent: TypeAlias = SwitchoverAck | Pong | Shut | RpEvent
Event: TypeAlias = MainEvent | ReturnPathEvent | Closed
