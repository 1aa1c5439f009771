"""The sans-IO decoder of the main channel: the savevm stream with its VFIO payload.

Fed with ``receive_data()`` and drained with ``next_event()`` (h11 style); the
events and encoders live in :mod:`migrator._wire.savevm` and
:mod:`migrator._wire.vfio` (reference ``qemu-vfio-multifd.md`` sections 1.1,
1.2 and 1.5).

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
        with the same section id. The blob is QEMU's vmstate_vfio_pci_config,
        which has no length: it is as long as ``config_sizes`` says for the
        idstr of its SECTION_START/FULL (the local device's layout).
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
from collections.abc import Mapping

from migrator._wire.buffer import _Buffer
from migrator._wire.savevm import (
    _BE32,
    _BE64,
    _COMMAND,
    _COMMAND_LENGTHS,
    _HEADER,
    _INSTANCE_VERSION,
    _SECTION_LONG_PREFIX,
    _SECTION_SHORT,
    MAX_CONFIG_CAPABILITIES,
    MAX_MACHINE_NAME_BYTES,
    NEED_DATA,
    QEMU_VM_COMMAND,
    QEMU_VM_CONFIGURATION,
    QEMU_VM_EOF,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    QEMU_VM_SECTION_END,
    QEMU_VM_SECTION_FOOTER,
    QEMU_VM_SECTION_FULL,
    QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START,
    QEMU_VM_SUBSECTION,
    QEMU_VM_VMDESCRIPTION,
    Command,
    ConfigBlob,
    Configuration,
    DataChunk,
    DataHeader,
    EndOfFile,
    Event,
    FileHeader,
    MarkerEvent,
    NeedData,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    VmDescription,
)
from migrator._wire.vfio import MARKER_VALUES as _MARKER_VALUES
from migrator._wire.vfio import Marker
from migrator.errors import FramingError


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


class MainStreamDecoder:
    """Sans-IO decoder of the main migration stream (see the module docstring).

    Args:
        max_data_chunk: largest DataChunk handed out (and so held in memory).
        max_data_size: largest DATA block accepted.
        max_config_bytes: largest config blob accepted.
        config_sizes: the size of each device's config blob (QEMU's
            ``vmstate_vfio_pci_config`` carries no length: a destination sizes
            it from its own device, ``pci_config.ConfigLayout.blob_size``), by
            idstr; a config blob of a device not in it is a FramingError.
        max_vmdesc_bytes: largest trailing VM description accepted (skipped).
    """

    def __init__(
        self,
        *,
        max_data_chunk: int = 1 << 20,
        max_data_size: int = 1 << 30,
        max_config_bytes: int = 65536,
        max_vmdesc_bytes: int = 1 << 24,
        config_sizes: Mapping[str, int] | None = None,
    ) -> None:
        if max_data_chunk <= 0:
            raise ValueError("max_data_chunk must be positive")
        self._max_data_chunk = max_data_chunk
        self._max_data_size = max_data_size
        self._max_config_bytes = max_config_bytes
        self._max_vmdesc_bytes = max_vmdesc_bytes
        self._config_sizes: Mapping[str, int] = {} if config_sizes is None else config_sizes
        self._idstrs: dict[int, str] = {}  # section id -> idstr, from SECTION_START/FULL
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
        return _have(self._buf, n, what)

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
            return self._eos_after(
                "config state: end flag incorrect after a config blob of the local device's "
                "size (is it the same device model? streams of migrators before QEMU's "
                "config blob, which framed config as be32 length + bytes, do not load)"
            )
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
        event = _parse_long_section(self._buf, kind)
        if not isinstance(event, NeedData):
            self._idstrs[event.section_id] = event.idstr
            self._enter_section(event.section_id)
        return event

    def _command(self) -> Event | NeedData:
        event = _parse_command(self._buf)
        if not isinstance(event, NeedData):
            self._after_header = False
        return event

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
        idstr = self._idstrs.get(self._section_id, "")
        length = self._config_sizes.get(idstr)
        if length is None:
            raise FramingError(
                f"config blob in section {self._section_id} ({idstr!r}): no local device of "
                "that idstr to size it by (QEMU's config blob carries no length)"
            )
        if length > self._max_config_bytes:
            raise FramingError(
                f"config blob of {length} bytes exceeds the maximum of {self._max_config_bytes}"
            )
        if not self._have(length, "config blob"):
            return NEED_DATA
        data = self._buf.take(length)
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


def _have(buf: _Buffer, n: int, what: str) -> bool:
    """Whether ``n`` bytes are buffered; raises FramingError at EOF (Rule 6)."""
    avail = buf.available()
    if avail >= n:
        return True
    if buf.eof:
        raise FramingError(f"truncated stream: EOF in {what} ({avail} of {n} bytes)")
    return False


def _parse_long_section(buf: _Buffer, kind: int) -> SectionStart | SectionFull | NeedData:
    """A START or FULL section header at ``buf.pos``, consumed once complete."""
    if not _have(buf, 6, "section header"):
        return NEED_DATA
    _, section_id, id_len = _SECTION_LONG_PREFIX.unpack_from(buf.data, buf.pos)
    total = 6 + id_len + 8
    if not _have(buf, total, "section header"):
        return NEED_DATA
    raw = bytes(buf.data[buf.pos + 6 : buf.pos + 6 + id_len])
    idstr = _decode_text(raw, "section idstr")
    instance_id, version_id = _INSTANCE_VERSION.unpack_from(buf.data, buf.pos + 6 + id_len)
    buf.pos += total
    if kind == QEMU_VM_SECTION_START:
        return SectionStart(
            section_id=section_id, idstr=idstr, instance_id=instance_id, version_id=version_id
        )
    return SectionFull(
        section_id=section_id, idstr=idstr, instance_id=instance_id, version_id=version_id
    )


def _parse_command(buf: _Buffer) -> Command | NeedData:
    """A COMMAND record at ``buf.pos``, consumed once complete."""
    if not _have(buf, 5, "command header"):
        return NEED_DATA
    _, cmd, length = _COMMAND.unpack_from(buf.data, buf.pos)
    # length is a be16, so the payload is bounded by 64 KiB by construction.
    expected = _COMMAND_LENGTHS.get(cmd)
    if expected is not None and length != expected[1]:
        raise FramingError(f"command {expected[0]} has length {length}, expected {expected[1]}")
    if not _have(buf, 5 + length, "command payload"):
        return NEED_DATA
    payload = bytes(buf.data[buf.pos + 5 : buf.pos + 5 + length])
    buf.pos += 5 + length
    return Command(cmd, payload)


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
