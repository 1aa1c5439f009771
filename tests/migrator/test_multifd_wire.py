"""Tests of migrator.multifd_wire: golden layouts, reference cross-checks, errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator import multifd_wire as w
from migrator.errors import FramingError
from tests.migrator.qemu_reference import (
    build_device_state_packet,
    build_init,
    parse_device_state_packet,
    parse_init,
)

UUID = bytes(range(1, 17))


def test_constants() -> None:
    assert w.MULTIFD_MAGIC == 0x11223344
    assert w.MULTIFD_VERSION == 1
    assert w.MULTIFD_FLAG_SYNC == 1
    assert w.MULTIFD_FLAG_DEVICE_STATE == 0x40 == 32 << 1
    assert (w.INIT_SIZE, w.DEVICE_STATE_HEADER_SIZE, w.VFIO_PACKET_HEADER_SIZE) == (64, 276, 12)
    assert w.VFIO_DEVICE_STATE_CONFIG_STATE == 1
    assert w.VFIO_DEVICE_STATE_PACKET_VERSION == 0
    assert w.IDX_INVALID == 0xFFFFFFFF


# --- init ---------------------------------------------------------------------


def test_init_golden_layout() -> None:
    raw = w.encode_init(UUID, 3)
    assert len(raw) == 64
    assert raw[0:4] == bytes.fromhex("11223344")
    assert raw[4:8] == bytes.fromhex("00000001")
    assert raw[8:24] == UUID
    assert raw[24] == 3
    assert raw[25:64] == bytes(39)
    assert raw == build_init(UUID, 3)
    assert parse_init(raw) == {
        "magic": 0x11223344,
        "version": 1,
        "uuid": UUID,
        "id": 3,
        "reserved": bytes(39),
    }


def test_init_round_trip() -> None:
    for channel in range(4):
        assert w.decode_init(build_init(UUID, channel), expected_uuid=UUID, channels=4) == channel


def test_init_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="uuid must be 16 bytes"):
        w.encode_init(b"short", 0)
    with pytest.raises(ValueError, match="does not fit in a u8"):
        w.encode_init(UUID, 256)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (build_init(UUID, 0)[:63], "multifd init packet is 63 bytes, expected 64"),
        (b"\x11\x22\x33\x45" + build_init(UUID, 0)[4:], "bad magic 0x11223345"),
        (build_init(UUID, 0)[:4] + b"\0\0\0\2" + build_init(UUID, 0)[8:], "unknown version 2"),
        (
            build_init(bytes(16), 1),
            "multifd channel 1 has uuid 00000000-0000-0000-0000-000000000000, "
            "expected 01020304-0506-0708-090a-0b0c0d0e0f10",
        ),
        (
            build_init(UUID, 3),
            "multifd: received channel id 3 is greater than number of channels 2",
        ),
        (
            build_init(UUID, 255),
            "multifd: received channel id 255 is greater than number of channels 2",
        ),
    ],
)
def test_init_errors(raw: bytes, message: str) -> None:
    with pytest.raises(FramingError) as info:
        w.decode_init(raw, expected_uuid=UUID, channels=2)
    assert message in str(info.value)


# --- device-state header ------------------------------------------------------------


def test_device_state_header_golden_layout() -> None:
    raw = w.encode_device_state_header("0000:00:04.0/vfio", 7, 0x01020304)
    assert len(raw) == 276
    assert raw[0:4] == bytes.fromhex("11223344")
    assert raw[4:8] == bytes.fromhex("00000001")
    assert raw[8:12] == bytes.fromhex("00000040")
    assert raw[12:268] == b"0000:00:04.0/vfio" + bytes(256 - 17)
    assert raw[268:272] == bytes.fromhex("00000007")
    assert raw[272:276] == bytes.fromhex("01020304")


def test_device_state_packet_matches_reference() -> None:
    data = b"device bytes"
    payload = w.encode_vfio_packet_header(5, 0) + data
    raw = w.encode_device_state_header("dev/vfio", 0, len(payload)) + payload
    assert raw == build_device_state_packet("dev/vfio", 0, 5, False, data)
    assert parse_device_state_packet(raw) == {
        "magic": 0x11223344,
        "version": 1,
        "flags": 0x40,
        "idstr": "dev/vfio",
        "instance_id": 0,
        "size": 24,
        "vfio_version": 0,
        "idx": 5,
        "vfio_flags": 0,
        "data": data,
    }


def test_decoders_read_reference_packets() -> None:
    raw = build_device_state_packet("a/vfio", 3, 9, True, b"cfg")
    hdr = w.decode_device_state_header(raw[:276], max_payload=1 << 20)
    assert hdr == w.DeviceStateHeader("a/vfio", 3, 15)
    pkt = w.decode_vfio_packet(raw[276:])
    assert (pkt.idx, pkt.flags, bytes(pkt.data), pkt.is_config) == (9, 1, b"cfg", True)


def test_idstr_of_255_bytes_fills_the_field_and_stays_terminated() -> None:
    raw = w.encode_device_state_header("x" * 255, 0, 12)
    assert raw[12:267] == b"x" * 255
    assert raw[267] == 0  # byte 255 of the idstr field
    assert w.decode_device_state_header(raw, max_payload=12).idstr == "x" * 255
    with pytest.raises(ValueError, match="maximum is 255"):
        w.encode_device_state_header("x" * 256, 0, 12)
    with pytest.raises(ValueError, match="NUL"):
        w.encode_device_state_header("a\0b", 0, 12)


def _header(
    *,
    magic: int = 0x11223344,
    version: int = 1,
    flags: int = 0x40,
    idstr: bytes = b"d",
    size: int = 12,
) -> bytes:
    return struct.pack(">III256sII", magic, version, flags, idstr, 0, size)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_header()[:275], "multifd device state header is 275 bytes, expected 276"),
        (_header(magic=0x44332211), "multifd packet has bad magic 0x44332211"),
        (_header(version=2), "multifd packet has unknown version 2"),
        (_header(flags=0), "multifd packet is not a device-state packet (flags 0x0)"),
        (_header(flags=1), "is not a device-state packet (flags 0x1)"),
        (_header(flags=0x41), "received SYNC device state packet"),
        (_header(idstr=b"x" * 256), "unterminated multifd device state idstr"),
        (_header(size=0), "received empty device state packet"),
        (
            _header(size=1001),
            "multifd device state packet of 1001 bytes exceeds the maximum of 1000",
        ),
        (_header(size=0xFFFFFFFF), "of 4294967295 bytes exceeds the maximum of 1000"),
        (_header(idstr=b"\xff\xfe"), "multifd device state idstr is not valid UTF-8"),
    ],
)
def test_device_state_header_errors(raw: bytes, message: str) -> None:
    with pytest.raises(FramingError) as info:
        w.decode_device_state_header(raw, max_payload=1000)
    assert message in str(info.value)


# --- VFIO packet --------------------------------------------------------------------


def test_vfio_packet_header_golden() -> None:
    assert w.encode_vfio_packet_header(0x0A0B0C0D, 1) == bytes.fromhex("00000000 0a0b0c0d 00000001")


def test_vfio_packet_data_is_a_view() -> None:
    payload = bytearray(w.encode_vfio_packet_header(0, 0) + b"abc")
    pkt = w.decode_vfio_packet(memoryview(payload))
    payload[12] = ord("z")
    assert bytes(pkt.data) == b"zbc"
    assert not pkt.is_config


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "packet too short at 0 bytes (min is 12)"),
        (bytes(11), "packet too short at 11 bytes (min is 12)"),
        (struct.pack(">III", 1, 0, 0), "packet has unknown version 1"),
        (struct.pack(">III", 0, 0xFFFFFFFF, 0), "packet index is invalid"),
    ],
)
def test_vfio_packet_errors(payload: bytes, message: str) -> None:
    with pytest.raises(FramingError) as info:
        w.decode_vfio_packet(payload)
    assert message in str(info.value)


# --- sniffing -------------------------------------------------------------------------


def test_sniff_channel() -> None:
    assert w.sniff_channel(b"QEVM") == "main"
    assert w.sniff_channel(bytes.fromhex("11223344")) == "multifd"
    with pytest.raises(FramingError, match="unknown channel: first bytes 0x47455420"):
        w.sniff_channel(b"GET ")
    with pytest.raises(FramingError, match="channel sent only 2 bytes"):
        w.sniff_channel(b"QE")


# --- properties -------------------------------------------------------------------------


@given(
    idstr=st.text(max_size=60).filter(lambda s: "\0" not in s and len(s.encode()) <= 255),
    instance_id=st.integers(0, 2**32 - 1),
    idx=st.integers(0, 2**32 - 2),
    is_config=st.booleans(),
    data=st.binary(max_size=64),
)
def test_packet_round_trip(
    idstr: str, instance_id: int, idx: int, is_config: bool, data: bytes
) -> None:
    payload = w.encode_vfio_packet_header(idx, int(is_config)) + data
    raw = w.encode_device_state_header(idstr, instance_id, len(payload)) + payload
    assert raw == build_device_state_packet(idstr, instance_id, idx, is_config, data)
    hdr = w.decode_device_state_header(raw[:276], max_payload=len(payload))
    assert hdr == w.DeviceStateHeader(idstr, instance_id, len(payload))
    pkt = w.decode_vfio_packet(raw[276:])
    assert (pkt.idx, pkt.is_config, bytes(pkt.data)) == (idx, is_config, data)


#: VFIO packet payloads: random bytes, and headers near the rules' edges
#: (version 0 or not, idx 0xffffffff or not, any flags).
_payloads = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda version, idx, flags, data: struct.pack(">III", version, idx, flags) + data,
        st.sampled_from([0, 1]),
        st.sampled_from([0, 5, 0xFFFFFFFE, 0xFFFFFFFF]),
        st.integers(0, 3),
        st.binary(max_size=8),
    ),
)


@settings(max_examples=500)
@given(raw=st.binary(min_size=276, max_size=276), payload=_payloads)
def test_random_headers_raise_only_framing_error(raw: bytes, payload: bytes) -> None:
    """Hostile bytes: a FramingError, or exactly what the independent reference reads."""
    # Mostly-valid headers too, so the later checks are reached.
    for blob in (raw, _header(flags=raw[0], idstr=raw[1:256], size=raw[256])):
        try:
            hdr = w.decode_device_state_header(blob, max_payload=64)
        except FramingError:
            continue
        ref = parse_device_state_packet(blob + bytes(struct.unpack_from(">I", blob, 272)[0]))
        assert (ref["magic"], ref["version"]) == (0x11223344, 1)
        # QEMU's multifd_recv_thread takes any packet with MULTIFD_FLAG_DEVICE_STATE (0x40)
        # as device state and refuses only SYNC (bit 0) there; other bits (the RAM
        # compression flags) are not looked at, so 0x42 is a device-state packet too.
        assert isinstance(ref["flags"], int)
        assert ref["flags"] & 0x40, hex(ref["flags"])
        assert not ref["flags"] & 0x1, hex(ref["flags"])
        assert (hdr.idstr, hdr.instance_id, hdr.size) == (
            ref["idstr"],
            ref["instance_id"],
            ref["size"],
        )
        assert hdr.size <= 64  # the bound holds before anything is allocated
    # QEMU's vfio_multifd_load_state_buffer rules (reference 4.2): too short,
    # a version other than 0, or idx 0xffffffff fail; anything else is a packet.
    refused = len(payload) < 12 or payload[:4] != bytes(4) or payload[4:8] == b"\xff" * 4
    try:
        pkt = w.decode_vfio_packet(payload)
    except FramingError:
        assert refused
    else:
        assert not refused
        _, idx, flags = struct.unpack_from(">III", payload)
        assert (pkt.idx, pkt.is_config, bytes(pkt.data)) == (idx, bool(flags & 1), payload[12:])
    try:
        channel = w.decode_init(raw[:64], expected_uuid=UUID, channels=4)
    except FramingError:
        pass
    else:
        init = parse_init(raw[:64])
        assert (init["magic"], init["version"], init["uuid"]) == (0x11223344, 1, UUID)
        assert channel == init["id"]


# --- config packet data ---------------------------------------------------------------


def test_config_packet_data_layout_and_round_trip() -> None:
    # QEMU's vfio_multifd_save_complete_precopy_config: the marker, QEMU's
    # config blob as it is (no length of its own), EOS.
    raw = w.encode_config_packet_data(b"cfg")
    assert raw == bytes.fromhex("ffffffffef100002 636667 ffffffffef100001")
    assert w.decode_config_packet_data(raw, max_config_bytes=3) == b"cfg"
    assert w.decode_config_packet_data(memoryview(raw), max_config_bytes=3) == b"cfg"


_CFG = bytes.fromhex("ffffffffef100002")
_EOS = bytes.fromhex("ffffffffef100001")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "config packet too short at 0 bytes"),
        (_EOS + b"ab" + _EOS, "expected FLAG_DEV_CONFIG_STATE but got 0xffffffffef100001"),
        (_CFG + b"\0\0", "config packet too short at 10 bytes"),
        (_CFG + bytes(9) + _EOS, "config blob of 9 bytes exceeds the maximum of 8"),
        (_CFG + b"abcdefgh", "end flag incorrect (got 0x6162636465666768)"),
        (_CFG + b"ab" + _CFG, "end flag incorrect"),
        (_CFG + b"ab" + _EOS + b"x", "end flag incorrect"),
    ],
)
def test_config_packet_data_errors(raw: bytes, message: str) -> None:
    with pytest.raises(FramingError) as info:
        w.decode_config_packet_data(raw, max_config_bytes=8)
    assert message in str(info.value)


def test_init_accepts_the_ids_qemu_accepts() -> None:
    # migration/multifd.c multifd_recv_initial_packet refuses only id > channels.
    assert [
        w.decode_init(build_init(UUID, i), expected_uuid=UUID, channels=2) for i in range(3)
    ] == [
        0,
        1,
        2,
    ]
