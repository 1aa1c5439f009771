"""The savevm stream of the main channel: constants, encoders and decoded events.

The main migration channel (and a save file) carries QEMU's savevm stream: the
file header, commands, sections with footers and ``QEMU_VM_EOF`` (reference
``qemu-vfio-multifd.md`` section 1.1). Encoders return ``bytes``; the events
are what :class:`migrator._wire.decoder.MainStreamDecoder` hands out. Pure and
synchronous.
"""

from __future__ import annotations

import struct
from typing import Final, TypeAlias

import attrs

from migrator._wire.vfio import Marker

# --- savevm stream constants (migration/savevm.h, reference 1.1) ---------------
QEMU_VM_FILE_MAGIC: Final = 0x5145564D
QEMU_VM_FILE_VERSION: Final = 3

QEMU_VM_EOF: Final = 0x00
QEMU_VM_SECTION_START: Final = 0x01
QEMU_VM_SECTION_PART: Final = 0x02
QEMU_VM_SECTION_END: Final = 0x03
QEMU_VM_SECTION_FULL: Final = 0x04
QEMU_VM_SUBSECTION: Final = 0x05
QEMU_VM_VMDESCRIPTION: Final = 0x06
QEMU_VM_CONFIGURATION: Final = 0x07
QEMU_VM_COMMAND: Final = 0x08
QEMU_VM_SECTION_FOOTER: Final = 0x7E

# Commands (enum qemu_vm_cmd): INVALID 0, OPEN_RETURN_PATH 1, PING 2, ...,
# RECV_BITMAP 10, SWITCHOVER_START 11.
MIG_CMD_OPEN_RETURN_PATH: Final = 1
MIG_CMD_PING: Final = 2
MIG_CMD_SWITCHOVER_START: Final = 11

# Payload lengths QEMU insists on for the fixed-size commands we may meet.
_COMMAND_LENGTHS: Final[dict[int, tuple[str, int]]] = {
    MIG_CMD_OPEN_RETURN_PATH: ("OPEN_RETURN_PATH", 0),
    MIG_CMD_PING: ("PING", 4),
    MIG_CMD_SWITCHOVER_START: ("SWITCHOVER_START", 0),
}

# Bounds on the CONFIGURATION record (machine names are short; QEMU has a few
# dozen capabilities at most, each name fits a u8 length).
MAX_MACHINE_NAME_BYTES: Final = 256
MAX_CONFIG_CAPABILITIES: Final = 256


_U8 = struct.Struct(">B")
_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_HEADER = struct.Struct(">II")
_COMMAND = struct.Struct(">BHH")
_SECTION_SHORT = struct.Struct(">BI")
_SECTION_LONG_PREFIX = struct.Struct(">BIB")
_INSTANCE_VERSION = struct.Struct(">II")
_MARKER_AND_SIZE = struct.Struct(">QQ")

# --- encoders -----------------------------------------------------------------


def _encode_idstr(idstr: str) -> bytes:
    raw = idstr.encode()
    if len(raw) > 255:
        raise ValueError(f"idstr is {len(raw)} bytes, the maximum is 255")
    return raw


def encode_file_header() -> bytes:
    """The 8-byte file header: be32 magic "QEVM", be32 version 3."""
    return _HEADER.pack(QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)


def encode_command(cmd: int, payload: bytes = b"") -> bytes:
    """A QEMU_VM_COMMAND record: type byte, be16 command, be16 length, payload."""
    if len(payload) > 0xFFFF:
        raise ValueError(f"command payload is {len(payload)} bytes, the maximum is 65535")
    return _COMMAND.pack(QEMU_VM_COMMAND, cmd, len(payload)) + payload


def encode_section_start(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    """A SECTION_START header (the VFIO payload and the footer follow)."""
    raw = _encode_idstr(idstr)
    return (
        _SECTION_LONG_PREFIX.pack(QEMU_VM_SECTION_START, section_id, len(raw))
        + raw
        + _INSTANCE_VERSION.pack(instance_id, version_id)
    )


def encode_section_full(section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
    """A SECTION_FULL header (same layout as START)."""
    raw = _encode_idstr(idstr)
    return (
        _SECTION_LONG_PREFIX.pack(QEMU_VM_SECTION_FULL, section_id, len(raw))
        + raw
        + _INSTANCE_VERSION.pack(instance_id, version_id)
    )


def encode_section_part(section_id: int) -> bytes:
    """A SECTION_PART header: type byte + be32 section id."""
    return _SECTION_SHORT.pack(QEMU_VM_SECTION_PART, section_id)


def encode_section_end(section_id: int) -> bytes:
    """A SECTION_END header: type byte + be32 section id."""
    return _SECTION_SHORT.pack(QEMU_VM_SECTION_END, section_id)


def encode_footer(section_id: int) -> bytes:
    """A section footer: 0x7e + be32 section id."""
    return _SECTION_SHORT.pack(QEMU_VM_SECTION_FOOTER, section_id)


def encode_eof() -> bytes:
    """QEMU_VM_EOF, the last byte of a stream."""
    return b"\x00"


def encode_vm_description(json: bytes) -> bytes:
    """QEMU_VM_VMDESCRIPTION after QEMU_VM_EOF: be32 length, then the JSON.

    QEMU's source always appends it (``should_send_vmdesc``: all but machine types
    with ``suppress_vmdesc``) and its destination reads it after EOF before it
    reports SHUT, waiting for it if it does not come.
    """
    return bytes([QEMU_VM_VMDESCRIPTION]) + struct.pack(">I", len(json)) + json


def encode_configuration(
    name: str,
    *,
    target_page_bits: int | None = None,
    capabilities: tuple[str, ...] = (),
    uuid: bytes | None = None,
) -> bytes:
    """A CONFIGURATION record as QEMU writes it after the header (for tests/tools).

    The optional subsections are written in QEMU's order (target-page-bits,
    capabilities, uuid).
    """
    raw = name.encode()
    out = bytearray(_U8.pack(QEMU_VM_CONFIGURATION) + _BE32.pack(len(raw)) + raw)
    if target_page_bits is not None:
        out += _subsection_header("configuration/target-page-bits")
        out += _BE32.pack(target_page_bits)
    if capabilities:
        out += _subsection_header("configuration/capabilities")
        out += _BE32.pack(len(capabilities))
        for cap in capabilities:
            craw = cap.encode()
            out += _U8.pack(len(craw)) + craw
    if uuid is not None:
        if len(uuid) != 16:
            raise ValueError("uuid must be 16 bytes")
        out += _subsection_header("configuration/uuid") + uuid
    return bytes(out)


def _subsection_header(name: str) -> bytes:
    raw = name.encode()
    return _U8.pack(QEMU_VM_SUBSECTION) + _U8.pack(len(raw)) + raw + _BE32.pack(1)


# --- events -------------------------------------------------------------------


@attrs.frozen
class FileHeader:
    version: int


@attrs.frozen
class Command:
    cmd: int
    payload: bytes


@attrs.frozen
class Configuration:
    """A CONFIGURATION record; the subsection fields are None/empty when absent."""

    name: str
    target_page_bits: int | None = None
    capabilities: tuple[str, ...] = ()
    uuid: bytes | None = None


@attrs.frozen
class SectionStart:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@attrs.frozen
class SectionPart:
    section_id: int


@attrs.frozen
class SectionEnd:
    section_id: int


@attrs.frozen
class SectionFull:
    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@attrs.frozen
class MarkerEvent:
    section_id: int
    marker: Marker


@attrs.frozen
class DataHeader:
    section_id: int
    size: int


@attrs.frozen
class DataChunk:
    section_id: int
    #: Decoded chunks are bytes; a sender may pass a memoryview (sent without a copy).
    data: bytes | memoryview


@attrs.frozen
class ConfigBlob:
    section_id: int
    data: bytes


@attrs.frozen
class SectionFooter:
    section_id: int


@attrs.frozen
class EndOfFile:
    pass


@attrs.frozen
class VmDescription:
    """The JSON VM description QEMU may append after QEMU_VM_EOF (skipped, not kept)."""

    size: int


Event: TypeAlias = (
    FileHeader
    | Command
    | Configuration
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


class _NeedData:
    """Type of the :data:`NEED_DATA` sentinel."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
NeedData: TypeAlias = _NeedData
