"""QEMU main-channel framing: savevm stream encoders, a sans-IO stream decoder,
and the return-path message codec.

The main migration channel (and a save file) carries QEMU's savevm stream: the
file header, commands, sections with footers and ``QEMU_VM_EOF``, and inside
each section the VFIO payload made of big-endian u64 markers (reference
``qemu-vfio-multifd.md`` sections 1.1, 1.2 and 1.5). The destination talks back
on the same connection with return-path messages (be16 type, be16 length,
payload), of which we use ``SWITCHOVER_ACK`` and ``SHUT``.

Everything here is pure and synchronous: encoders return ``bytes``, decoders are
fed with ``receive_data()`` and drained with ``next_event()`` (h11 style).

Theory of operation of :class:`MainStreamDecoder`
--------------------------------------------------

States (:class:`DecoderState`)::

    FILE_HEADER -> TOP_LEVEL <-> (section header) -> MARKER ... -> FOOTER -> TOP_LEVEL
                   TOP_LEVEL -- QEMU_VM_EOF --> DONE [-- VMDESCRIPTION --> VMDESC -> CLOSED]
    any state -- bad bytes / premature EOF --> ERROR (sticky)

Rule 1: the stream starts with the 8-byte file header (magic, version 3).
Rule 2: a CONFIGURATION record is only accepted directly after the header.
Rule 3: every section (START/PART/END/FULL) carries one VFIO payload: a run of
        markers ending in EOS, or in INIT_DATA_SENT / CONFIG_LOAD_READY (which
        replace the EOS), or SETUP+EOS, or CONFIG_STATE+blob+EOS; then a footer
        with the same section id.
Rule 4: DATA bytes are never buffered whole: they are handed out as DataChunk
        events of exactly ``min(remaining, max_data_chunk)`` bytes each, so the
        events do not depend on how the input was split (only up to
        ``max_data_chunk`` bytes are held at once).
Rule 5: nothing but one optional VMDESCRIPTION (what QEMU appends to a stream)
        may follow QEMU_VM_EOF.
Rule 6: an event is produced only once all of its bytes are buffered; nothing is
        consumed otherwise. Premature EOF (``receive_data(b"")``) is a
        FramingError, and so is every later call once one was raised.

The decoder checks framing only; what a marker means in a given phase (e.g. a
DATA block in a FULL section, or DEV_CONFIG_STATE in multifd mode) is the
engine's business, since it depends on negotiated settings.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, TypeAlias

import attrs

from migrator.errors import FramingError

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


class Marker(enum.IntEnum):
    """VFIO_MIG_FLAG_* markers, written as be64 (reference 1.2)."""

    END_OF_STATE = 0xFFFFFFFFEF100001
    DEV_CONFIG_STATE = 0xFFFFFFFFEF100002
    DEV_SETUP_STATE = 0xFFFFFFFFEF100003
    DEV_DATA_STATE = 0xFFFFFFFFEF100004
    DEV_INIT_DATA_SENT = 0xFFFFFFFFEF100005
    DEV_CONFIG_LOAD_READY = 0xFFFFFFFFEF100006


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
_RP_HEADER = struct.Struct(">HH")

_MARKER_VALUES: Final = frozenset(int(m) for m in Marker)


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


def encode_marker(m: Marker) -> bytes:
    """One VFIO marker as be64."""
    return _BE64.pack(m)


def encode_data_header(size: int) -> bytes:
    """DEV_DATA_STATE + be64 size; the caller sends the ``size`` bytes itself."""
    return _MARKER_AND_SIZE.pack(Marker.DEV_DATA_STATE, size)


def encode_config_blob(config: bytes) -> bytes:
    """The device config blob as this project frames it: be32 length + bytes."""
    return _BE32.pack(len(config)) + config


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
    data: bytes


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


class DecoderState(enum.Enum):
    """Where :class:`MainStreamDecoder` is in the stream."""

    FILE_HEADER = enum.auto()
    TOP_LEVEL = enum.auto()
    MARKER = enum.auto()
    SETUP_EOS = enum.auto()
    DATA = enum.auto()
    CONFIG_BLOB = enum.auto()
    CONFIG_EOS = enum.auto()
    FOOTER = enum.auto()
    DONE = enum.auto()
    VMDESC = enum.auto()
    CLOSED = enum.auto()
    ERROR = enum.auto()


_S = DecoderState

# When to move the unconsumed tail of the buffer to its front: only once the
# consumed part dominates, so each byte is moved O(1) times on average.
_COMPACT_MIN_BYTES: Final = 1 << 16


class _Buffer:
    """A bytearray with a read offset: cheap consumption, amortised compaction."""

    __slots__ = ("data", "eof", "pos")

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0
        self.eof = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        if self.pos >= len(self.data):
            self.data.clear()
            self.pos = 0
        elif self.pos >= _COMPACT_MIN_BYTES and self.pos * 2 >= len(self.data):
            del self.data[: self.pos]
            self.pos = 0
        self.data += chunk

    def receive(self, chunk: bytes | bytearray | memoryview) -> None:
        """The decoders' ``receive_data``: bytes, or ``b""`` for EOF (data after EOF is misuse)."""
        if self.eof:
            if chunk:
                raise ValueError("receive_data() called with data after EOF")
            return
        if chunk:
            self.feed(chunk)
        else:
            self.eof = True

    def available(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        with memoryview(self.data) as view:
            out = bytes(view[self.pos : self.pos + n])
        self.pos += n
        return out


class MainStreamDecoder:
    """Sans-IO decoder of the main migration stream (see the module docstring).

    Args:
        max_data_chunk: largest DataChunk handed out (and so held in memory).
        max_data_size: largest DATA block accepted.
        max_config_bytes: largest config blob accepted.
        max_vmdesc_bytes: largest trailing VM description accepted (skipped).
    """

    def __init__(
        self,
        *,
        max_data_chunk: int = 1 << 20,
        max_data_size: int = 1 << 30,
        max_config_bytes: int = 65536,
        max_vmdesc_bytes: int = 1 << 24,
    ) -> None:
        if max_data_chunk <= 0:
            raise ValueError("max_data_chunk must be positive")
        self._max_data_chunk = max_data_chunk
        self._max_data_size = max_data_size
        self._max_config_bytes = max_config_bytes
        self._max_vmdesc_bytes = max_vmdesc_bytes
        self._buf = _Buffer()
        self._state = _S.FILE_HEADER
        self._error: FramingError | None = None
        self._after_header = False  # nothing but the header seen so far
        self._section_id = 0
        self._remaining = 0  # DATA / VMDESC bytes still to come

    @property
    def state(self) -> DecoderState:
        return self._state

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet turned into events."""
        return self._buf.available()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the channel; ``b""`` means the peer closed it."""
        self._check_error()
        self._buf.receive(data)

    def next_event(self) -> Event | NeedData:
        """The next event, or NEED_DATA; raises FramingError (then always)."""
        self._check_error()
        try:
            return self._step()
        except FramingError as exc:
            self._error = exc
            self._state = _S.ERROR
            raise

    def _check_error(self) -> None:
        if self._error is not None:
            raise FramingError(self._error.message) from self._error

    # -- parsing ---------------------------------------------------------------

    def _have(self, n: int, what: str) -> bool:
        avail = self._buf.available()
        if avail >= n:
            return True
        if self._buf.eof:
            raise FramingError(f"truncated stream: EOF in {what} ({avail} of {n} bytes)")
        return False

    def _step(self) -> Event | NeedData:
        state = self._state
        if state is _S.DATA:
            return self._data_chunk()
        if state is _S.MARKER:
            return self._marker()
        if state is _S.FOOTER:
            return self._footer()
        if state is _S.TOP_LEVEL:
            return self._top_level()
        if state is _S.FILE_HEADER:
            return self._file_header()
        if state is _S.SETUP_EOS:
            return self._eos_after("SETUP STATE: EOS not found")
        if state is _S.CONFIG_BLOB:
            return self._config_blob()
        if state is _S.CONFIG_EOS:
            return self._eos_after("config state: end flag incorrect")
        if state is _S.DONE or state is _S.CLOSED:
            return self._after_eof()
        if state is _S.VMDESC:
            return self._skip_vmdesc()
        raise AssertionError(f"unhandled state {state}")  # pragma: no cover

    def _file_header(self) -> Event | NeedData:
        if not self._have(8, "file header"):
            return NEED_DATA
        buf = self._buf
        magic, version = _HEADER.unpack_from(buf.data, buf.pos)
        if magic != QEMU_VM_FILE_MAGIC:
            raise FramingError(
                f"not a QEMU migration stream: magic 0x{magic:08x}, "
                f"expected 0x{QEMU_VM_FILE_MAGIC:08x}"
            )
        if version != QEMU_VM_FILE_VERSION:
            raise FramingError(
                f"unsupported stream version {version}, expected {QEMU_VM_FILE_VERSION}"
            )
        buf.pos += 8
        self._state = _S.TOP_LEVEL
        self._after_header = True
        return FileHeader(version)

    def _top_level(self) -> Event | NeedData:
        if not self._have(1, "section type"):
            return NEED_DATA
        buf = self._buf
        kind = buf.data[buf.pos]
        if kind in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
            if not self._have(5, "section header"):
                return NEED_DATA
            section_id = _BE32.unpack_from(buf.data, buf.pos + 1)[0]
            buf.pos += 5
            self._enter_section(section_id)
            if kind == QEMU_VM_SECTION_PART:
                return SectionPart(section_id)
            return SectionEnd(section_id)
        if kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
            return self._long_section(kind)
        if kind == QEMU_VM_COMMAND:
            return self._command()
        if kind == QEMU_VM_EOF:
            buf.pos += 1
            self._after_header = False
            self._state = _S.DONE
            return EndOfFile()
        if kind == QEMU_VM_CONFIGURATION:
            if not self._after_header:
                raise FramingError("CONFIGURATION record not directly after the file header")
            return self._configuration()
        raise FramingError(f"unexpected section type 0x{kind:02x} in the stream")

    def _enter_section(self, section_id: int) -> None:
        self._after_header = False
        self._section_id = section_id
        self._state = _S.MARKER

    def _long_section(self, kind: int) -> Event | NeedData:
        if not self._have(6, "section header"):
            return NEED_DATA
        buf = self._buf
        _, section_id, id_len = _SECTION_LONG_PREFIX.unpack_from(buf.data, buf.pos)
        total = 6 + id_len + 8
        if not self._have(total, "section header"):
            return NEED_DATA
        raw = bytes(buf.data[buf.pos + 6 : buf.pos + 6 + id_len])
        idstr = _decode_text(raw, "section idstr")
        instance_id, version_id = _INSTANCE_VERSION.unpack_from(buf.data, buf.pos + 6 + id_len)
        buf.pos += total
        self._enter_section(section_id)
        if kind == QEMU_VM_SECTION_START:
            return SectionStart(
                section_id=section_id, idstr=idstr, instance_id=instance_id, version_id=version_id
            )
        return SectionFull(
            section_id=section_id, idstr=idstr, instance_id=instance_id, version_id=version_id
        )

    def _command(self) -> Event | NeedData:
        if not self._have(5, "command header"):
            return NEED_DATA
        buf = self._buf
        _, cmd, length = _COMMAND.unpack_from(buf.data, buf.pos)
        # length is a be16, so the payload is bounded by 64 KiB by construction.
        expected = _COMMAND_LENGTHS.get(cmd)
        if expected is not None and length != expected[1]:
            raise FramingError(f"command {expected[0]} has length {length}, expected {expected[1]}")
        if not self._have(5 + length, "command payload"):
            return NEED_DATA
        payload = bytes(buf.data[buf.pos + 5 : buf.pos + 5 + length])
        buf.pos += 5 + length
        self._after_header = False
        return Command(cmd, payload)

    def _configuration(self) -> Event | NeedData:
        # The record is small and bounded; parse it without consuming until all
        # of it (and the byte after it, which says whether a subsection
        # follows) is buffered.
        buf = self._buf
        parsed = _parse_configuration(buf.data, buf.pos, eof=buf.eof)
        if parsed is None:
            return NEED_DATA
        event, end = parsed
        buf.pos = end
        self._after_header = False
        return event

    def _marker(self) -> Event | NeedData:
        if not self._have(8, "VFIO marker"):
            return NEED_DATA
        buf = self._buf
        value = _BE64.unpack_from(buf.data, buf.pos)[0]
        if value == Marker.DEV_DATA_STATE:
            if not self._have(16, "DATA block header"):
                return NEED_DATA
            size = _BE64.unpack_from(buf.data, buf.pos + 8)[0]
            if size > self._max_data_size:
                raise FramingError(
                    f"DATA block of {size} bytes exceeds the maximum of {self._max_data_size}"
                )
            buf.pos += 16
            self._remaining = size
            if size:
                self._state = _S.DATA
            return DataHeader(self._section_id, size)
        if value not in _MARKER_VALUES:
            raise FramingError(f"Unknown tag 0x{value:x} in section {self._section_id}")
        marker = Marker(value)
        buf.pos += 8
        if marker is Marker.DEV_SETUP_STATE:
            self._state = _S.SETUP_EOS
        elif marker is Marker.DEV_CONFIG_STATE:
            self._state = _S.CONFIG_BLOB
        else:
            # EOS, INIT_DATA_SENT and CONFIG_LOAD_READY all end the payload.
            self._state = _S.FOOTER
        return MarkerEvent(self._section_id, marker)

    def _eos_after(self, message: str) -> Event | NeedData:
        if not self._have(8, "VFIO marker"):
            return NEED_DATA
        buf = self._buf
        value = _BE64.unpack_from(buf.data, buf.pos)[0]
        if value != Marker.END_OF_STATE:
            raise FramingError(f"{message} (got 0x{value:x})")
        buf.pos += 8
        self._state = _S.FOOTER
        return MarkerEvent(self._section_id, Marker.END_OF_STATE)

    def _data_chunk(self) -> Event | NeedData:
        n = min(self._remaining, self._max_data_chunk)
        if not self._have(n, "DATA block"):
            return NEED_DATA
        data = self._buf.take(n)
        self._remaining -= n
        if not self._remaining:
            self._state = _S.MARKER
        return DataChunk(self._section_id, data)

    def _config_blob(self) -> Event | NeedData:
        if not self._have(4, "config blob length"):
            return NEED_DATA
        buf = self._buf
        length = _BE32.unpack_from(buf.data, buf.pos)[0]
        if length > self._max_config_bytes:
            raise FramingError(
                f"config blob of {length} bytes exceeds the maximum of {self._max_config_bytes}"
            )
        if not self._have(4 + length, "config blob"):
            return NEED_DATA
        buf.pos += 4
        data = buf.take(length)
        self._state = _S.CONFIG_EOS
        return ConfigBlob(self._section_id, data)

    def _footer(self) -> Event | NeedData:
        if not self._have(5, "section footer"):
            return NEED_DATA
        buf = self._buf
        kind, section_id = _SECTION_SHORT.unpack_from(buf.data, buf.pos)
        if kind != QEMU_VM_SECTION_FOOTER:
            raise FramingError(
                f"missing section footer for section {self._section_id} (got byte 0x{kind:02x})"
            )
        if section_id != self._section_id:
            raise FramingError(
                f"mismatched section footer: got section {section_id}, expected {self._section_id}"
            )
        buf.pos += 5
        self._state = _S.TOP_LEVEL
        return SectionFooter(section_id)

    def _after_eof(self) -> Event | NeedData:
        buf = self._buf
        if not buf.available():
            return NEED_DATA
        kind = buf.data[buf.pos]
        if self._state is _S.DONE and kind == QEMU_VM_VMDESCRIPTION:
            if not self._have(5, "VM description header"):
                return NEED_DATA
            size = _BE32.unpack_from(buf.data, buf.pos + 1)[0]
            if size > self._max_vmdesc_bytes:
                raise FramingError(
                    f"VM description of {size} bytes exceeds the maximum of "
                    f"{self._max_vmdesc_bytes}"
                )
            buf.pos += 5
            self._remaining = size
            self._state = _S.VMDESC if size else _S.CLOSED
            return VmDescription(size)
        raise FramingError(f"unexpected data after the end of the stream (byte 0x{kind:02x})")

    def _skip_vmdesc(self) -> Event | NeedData:
        buf = self._buf
        n = min(self._remaining, buf.available())
        buf.pos += n
        self._remaining -= n
        if not self._remaining:
            self._state = _S.CLOSED
            return self._after_eof()
        if buf.eof:
            raise FramingError("truncated stream: EOF in VM description")
        return NEED_DATA


def _decode_text(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise FramingError(f"{what} is not valid UTF-8: {raw!r}") from None


def _parse_configuration(
    data: bytearray, pos: int, *, eof: bool
) -> tuple[Configuration, int] | None:
    """Parse a CONFIGURATION record at ``data[pos]``; None when incomplete."""
    end = len(data)

    def need(p: int, n: int, what: str) -> bool:
        if p + n <= end:
            return True
        if eof:
            raise FramingError(f"truncated stream: EOF in {what}")
        return False

    p = pos + 1
    if not need(p, 4, "CONFIGURATION record"):
        return None
    name_len = _BE32.unpack_from(data, p)[0]
    if name_len > MAX_MACHINE_NAME_BYTES:
        raise FramingError(
            f"machine name of {name_len} bytes exceeds the maximum of {MAX_MACHINE_NAME_BYTES}"
        )
    p += 4
    if not need(p, name_len, "CONFIGURATION record"):
        return None
    name = _decode_text(bytes(data[p : p + name_len]), "machine name")
    p += name_len
    page_bits: int | None = None
    caps: tuple[str, ...] = ()
    uuid: bytes | None = None
    seen: set[str] = set()
    while True:
        # A subsection follows iff the next byte is QEMU_VM_SUBSECTION; at EOF
        # there is nothing more (the truncation is reported by the caller).
        if p >= end:
            if eof:
                break
            return None
        if data[p] != QEMU_VM_SUBSECTION:
            break
        if not need(p, 2, "configuration subsection"):
            return None
        sub_len = data[p + 1]
        if not need(p, 2 + sub_len + 4, "configuration subsection"):
            return None
        sub = _decode_text(bytes(data[p + 2 : p + 2 + sub_len]), "subsection name")
        version = _BE32.unpack_from(data, p + 2 + sub_len)[0]
        if sub in seen:
            raise FramingError(f"duplicate configuration subsection {sub!r}")
        seen.add(sub)
        if version != 1:
            raise FramingError(f"configuration subsection {sub!r} has unknown version {version}")
        p += 2 + sub_len + 4
        if sub == "configuration/target-page-bits":
            if not need(p, 4, sub):
                return None
            page_bits = _BE32.unpack_from(data, p)[0]
            p += 4
        elif sub == "configuration/uuid":
            if not need(p, 16, sub):
                return None
            uuid = bytes(data[p : p + 16])
            p += 16
        elif sub == "configuration/capabilities":
            if not need(p, 4, sub):
                return None
            count = _BE32.unpack_from(data, p)[0]
            if count > MAX_CONFIG_CAPABILITIES:
                raise FramingError(
                    f"{count} capabilities exceed the maximum of {MAX_CONFIG_CAPABILITIES}"
                )
            p += 4
            names = []
            for _ in range(count):
                if not need(p, 1, sub):
                    return None
                cap_len = data[p]
                if not need(p, 1 + cap_len, sub):
                    return None
                names.append(_decode_text(bytes(data[p + 1 : p + 1 + cap_len]), "capability"))
                p += 1 + cap_len
            caps = tuple(names)
        else:
            raise FramingError(f"unknown configuration subsection {sub!r}")
    return Configuration(name, target_page_bits=page_bits, capabilities=caps, uuid=uuid), p


# --- return path --------------------------------------------------------------


@attrs.frozen
class RpEvent:
    """One return-path message; ``msg_type`` may be a type we do not know."""

    msg_type: int
    payload: bytes


class ReturnPathDecoder:
    """Sans-IO decoder of return-path messages (destination to source).

    Known fixed-size types with a wrong length raise FramingError, as QEMU's
    source does; unknown types are returned as events for the caller to judge.
    ``closed`` is True once the peer closed the channel at a message boundary.
    """

    def __init__(self, *, max_payload: int = 0xFFFF) -> None:
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
