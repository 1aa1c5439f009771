"""Multifd channel wire format: the init handshake and device-state packets.

Byte layouts follow QEMU 10.1 (reference ``qemu-vfio-multifd.md`` section 3),
all big-endian:

* ``MultiFDInit_t`` (64 bytes): be32 magic, be32 version, 16-byte UUID, u8
  channel id, 39 reserved zero bytes.
* ``MultiFDPacketDeviceState_t`` (276 bytes): be32 magic, be32 version, be32
  flags (0x40), char idstr[256] (NUL-terminated, byte 255 always 0), be32
  instance_id, be32 next_packet_size; then ``next_packet_size`` payload bytes.
* The payload is a ``VFIODeviceStatePacket``: be32 version (0), be32 idx, be32
  flags (1 = config packet), then the data.

Decoders raise FramingError and never allocate for a size before checking it
against the caller's bound.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from migrator._wire import QEMU_VM_FILE_MAGIC, Marker
from migrator.errors import FramingError

MULTIFD_MAGIC: Final = 0x11223344
MULTIFD_VERSION: Final = 1
MULTIFD_FLAG_SYNC: Final = 1
MULTIFD_FLAG_DEVICE_STATE: Final = 0x40
INIT_SIZE: Final = 64
DEVICE_STATE_HEADER_SIZE: Final = 276
VFIO_PACKET_HEADER_SIZE: Final = 12
VFIO_DEVICE_STATE_CONFIG_STATE: Final = 1
VFIO_DEVICE_STATE_PACKET_VERSION: Final = 0
IDX_INVALID: Final = 0xFFFFFFFF

UUID_SIZE: Final = 16
IDSTR_FIELD_SIZE: Final = 256

# magic, version, uuid, id, 7 + 32 reserved bytes
_INIT = struct.Struct(">II16sB39x")
# magic, version, flags, idstr[256], instance_id, next_packet_size
_DEVICE_STATE = struct.Struct(">III256sII")
_VFIO = struct.Struct(">III")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")

assert _INIT.size == INIT_SIZE
assert _DEVICE_STATE.size == DEVICE_STATE_HEADER_SIZE
assert _VFIO.size == VFIO_PACKET_HEADER_SIZE


@attrs.frozen
class DeviceStateHeader:
    """A decoded device-state packet header; ``size`` payload bytes follow it."""

    idstr: str
    instance_id: int
    size: int


@attrs.frozen
class VfioPacket:
    """A decoded VFIO device-state packet; ``data`` is a view into the payload."""

    idx: int
    flags: int
    data: memoryview = attrs.field(eq=False)

    @property
    def is_config(self) -> bool:
        return bool(self.flags & VFIO_DEVICE_STATE_CONFIG_STATE)


def sniff_channel(first4: bytes) -> str:
    """Tell a new connection's kind from its first 4 bytes: "main" or "multifd"."""
    if len(first4) < 4:
        raise FramingError(f"channel sent only {len(first4)} bytes before closing")
    magic = _BE32.unpack_from(first4)[0]
    if magic == QEMU_VM_FILE_MAGIC:
        return "main"
    if magic == MULTIFD_MAGIC:
        return "multifd"
    raise FramingError(f"unknown channel: first bytes 0x{magic:08x} are no known magic")


def encode_init(uuid: bytes, channel_id: int) -> bytes:
    """The 64-byte MultiFDInit_t a source sends first on each multifd channel."""
    if len(uuid) != UUID_SIZE:
        raise ValueError(f"uuid must be {UUID_SIZE} bytes, got {len(uuid)}")
    if not 0 <= channel_id <= 0xFF:
        raise ValueError(f"channel id {channel_id} does not fit in a u8")
    return _INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id)


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def decode_init(data: bytes, *, expected_uuid: bytes, channels: int) -> int:
    """Check a MultiFDInit_t and return its channel id.

    Exactly the ids QEMU's ``multifd_recv_initial_packet`` accepts:
    ``id <= channels``, so ``id == channels`` too (QEMU then indexes one past
    its array of channels; here the id is only a label, each accepted once,
    and ``channels`` connections in all make the set complete). A QEMU source
    numbers its channels 0 to channels - 1.

    Raises:
        FramingError: wrong size, bad magic or version, UUID mismatch, or a
            channel id out of range.
    """
    if len(data) != INIT_SIZE:
        raise FramingError(f"multifd init packet is {len(data)} bytes, expected {INIT_SIZE}")
    magic, version, uuid, channel_id = _INIT.unpack(data)
    if magic != MULTIFD_MAGIC:
        raise FramingError(
            f"multifd init packet has bad magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x}"
        )
    if version != MULTIFD_VERSION:
        raise FramingError(
            f"multifd init packet has unknown version {version}, expected {MULTIFD_VERSION}"
        )
    if uuid != expected_uuid:
        raise FramingError(
            f"multifd channel {channel_id} has uuid {_uuid_text(uuid)}, "
            f"expected {_uuid_text(expected_uuid)}"
        )
    if channel_id > channels:  # QEMU's multifd_recv_initial_packet, its words
        raise FramingError(
            f"multifd: received channel id {channel_id} is greater than number of "
            f"channels {channels}"
        )
    return int(channel_id)


def encode_device_state_header(idstr: str, instance_id: int, payload_len: int) -> bytes:
    """The 276-byte MultiFDPacketDeviceState_t header for ``payload_len`` bytes."""
    raw = idstr.encode()
    if len(raw) > IDSTR_FIELD_SIZE - 1:
        raise ValueError(f"idstr is {len(raw)} bytes, the maximum is {IDSTR_FIELD_SIZE - 1}")
    if b"\0" in raw:
        raise ValueError("idstr must not contain NUL")
    # struct pads the 256-byte field with NULs, so byte 255 is always 0.
    return _DEVICE_STATE.pack(
        MULTIFD_MAGIC, MULTIFD_VERSION, MULTIFD_FLAG_DEVICE_STATE, raw, instance_id, payload_len
    )


def decode_device_state_header(data: bytes, *, max_payload: int) -> DeviceStateHeader:
    """Check a 276-byte device-state header; the payload is not read here.

    Raises:
        FramingError: bad magic or version, not a device-state packet, SYNC
            flag, unterminated idstr, empty payload, or a payload larger than
            ``max_payload`` (checked before the caller allocates anything).
    """
    if len(data) != DEVICE_STATE_HEADER_SIZE:
        raise FramingError(
            f"multifd device state header is {len(data)} bytes, expected {DEVICE_STATE_HEADER_SIZE}"
        )
    magic, version, flags, raw_idstr, instance_id, size = _DEVICE_STATE.unpack(data)
    if magic != MULTIFD_MAGIC:
        raise FramingError(
            f"multifd packet has bad magic 0x{magic:08x}, expected 0x{MULTIFD_MAGIC:08x}"
        )
    if version != MULTIFD_VERSION:
        raise FramingError(
            f"multifd packet has unknown version {version}, expected {MULTIFD_VERSION}"
        )
    if not flags & MULTIFD_FLAG_DEVICE_STATE:
        raise FramingError(
            f"multifd packet is not a device-state packet (flags 0x{flags:x}); "
            "RAM packets are not supported"
        )
    if flags & MULTIFD_FLAG_SYNC:
        raise FramingError("multifd: received SYNC device state packet")
    if raw_idstr[IDSTR_FIELD_SIZE - 1] != 0:
        raise FramingError("unterminated multifd device state idstr")
    if size == 0:
        raise FramingError("multifd: received empty device state packet")
    if size > max_payload:
        raise FramingError(
            f"multifd device state packet of {size} bytes exceeds the maximum of {max_payload}"
        )
    name = raw_idstr.split(b"\0", 1)[0]
    try:
        idstr = name.decode()
    except UnicodeDecodeError:
        raise FramingError(f"multifd device state idstr is not valid UTF-8: {name!r}") from None
    return DeviceStateHeader(idstr, instance_id, size)


def encode_vfio_packet_header(idx: int, flags: int) -> bytes:
    """The 12-byte VFIODeviceStatePacket header (version 0); data follows it."""
    return _VFIO.pack(VFIO_DEVICE_STATE_PACKET_VERSION, idx, flags)


def encode_packet_headers(idstr: str, idx: int, flags: int, data_len: int) -> bytes:
    """Both headers of a device-state packet (instance 0) whose VFIO data is ``data_len`` bytes."""
    return encode_device_state_header(
        idstr, 0, VFIO_PACKET_HEADER_SIZE + data_len
    ) + encode_vfio_packet_header(idx, flags)


def decode_vfio_packet(payload: bytes | bytearray | memoryview) -> VfioPacket:
    """Split a device-state payload into its VFIO header and data (no copy).

    Raises:
        FramingError: shorter than 12 bytes, version not 0, or idx 0xffffffff.
    """
    view = memoryview(payload)
    if len(view) < VFIO_PACKET_HEADER_SIZE:
        raise FramingError(
            f"packet too short at {len(view)} bytes (min is {VFIO_PACKET_HEADER_SIZE})"
        )
    version, idx, flags = _VFIO.unpack_from(view)
    if version != VFIO_DEVICE_STATE_PACKET_VERSION:
        raise FramingError(f"packet has unknown version {version}")
    if idx == IDX_INVALID:
        raise FramingError("packet index is invalid")
    return VfioPacket(idx, flags, view[VFIO_PACKET_HEADER_SIZE:])


def encode_config_packet_data(blob: bytes) -> bytes:
    """The data of a config packet: be64 DEV_CONFIG_STATE, QEMU's config blob, be64 EOS.

    ``blob`` is QEMU's ``vmstate_vfio_pci_config`` (``_wire.pci_config``), as
    QEMU's vfio_multifd_save_complete_precopy_config writes it.
    """
    return _BE64.pack(Marker.DEV_CONFIG_STATE) + blob + _BE64.pack(Marker.END_OF_STATE)


def decode_config_packet_data(
    data: bytes | bytearray | memoryview, *, max_config_bytes: int
) -> bytes:
    """The config blob inside a config packet's data (see encode_config_packet_data).

    Raises:
        FramingError: no leading DEV_CONFIG_STATE, no trailing EOS, or a blob
            over the bound. The blob's size is checked against the device when
            it is loaded (``pci_config.decode_qemu_config``).
    """
    view = memoryview(data)
    if len(view) < 16:
        raise FramingError(f"config packet too short at {len(view)} bytes")
    first = _BE64.unpack_from(view)[0]
    if first != Marker.DEV_CONFIG_STATE:
        raise FramingError(f"expected FLAG_DEV_CONFIG_STATE but got 0x{first:x}")
    length = len(view) - 16
    if length > max_config_bytes:
        raise FramingError(
            f"config blob of {length} bytes exceeds the maximum of {max_config_bytes}"
        )
    last = _BE64.unpack_from(view, len(view) - 8)[0]
    if last != Marker.END_OF_STATE:
        raise FramingError(f"config state: end flag incorrect (got 0x{last:x})")
    return bytes(view[8:-8])
