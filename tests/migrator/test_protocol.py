"""In-process tests of the sans-IO main-channel protocol (migrator._protocol.main).

A :class:`MigrationPair` runs a SourceProtocol against a DestinationProtocol
with no I/O: every event the source sends is decoded by the destination, every
return-path event goes back. The illegal-event tests are generated from the
complement of ``TRANSITIONS``; the bytes are checked against the wire encoders
and the independent reference parser.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrator import _wire as wire
from migrator._protocol import events as ev
from migrator._protocol.main import (
    RP_TRANSITIONS,
    TRANSITIONS,
    DestinationProtocol,
    DestinationSettings,
    Phase,
    RpPhase,
    SourceProtocol,
    _encode,
)
from migrator._wire import Marker
from migrator.errors import FramingError, LocalProtocolError, RemoteProtocolError
from tests.migrator import qemu_reference as ref

UUID = bytes(range(16))
#: QEMU's config blob has no length: the destination sizes it (here b"cfg").
CFG_SIZES = {"dev0": 3}


class MigrationPair:
    """A source and a destination protocol wired together in memory."""

    def __init__(self, settings: DestinationSettings | None = None) -> None:
        self.src = SourceProtocol()
        self.dst = DestinationProtocol(
            settings or DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES)
        )
        self.main_bytes = bytearray()
        self.rp_bytes = bytearray()

    def send(self, *events: ev.MainEvent) -> list[object]:
        got: list[object] = []
        for event in events:
            data = self.src.send(event)
            self.main_bytes += data
            self.dst.receive_data(data)
            got += drain(self.dst)
        return got

    def reply(self, event: ev.SwitchoverAck | ev.Pong | ev.Shut) -> list[object]:
        data = self.dst.send(event)
        self.rp_bytes += data
        self.src.receive_data(data)
        return drain(self.src)


def drain(proto: SourceProtocol | DestinationProtocol) -> list[object]:
    out: list[object] = []
    while (event := proto.next_event()) is not ev.NEED_DATA:
        out.append(event)
        if isinstance(event, ev.Closed):
            break
    return out


def ack_due(dst: DestinationProtocol) -> bool:
    return dst.ack_due


def section(
    kind: type[Any], sid: int, *payload: ev.MainEvent, idstr: str = "dev0"
) -> list[ev.MainEvent]:
    head = kind(sid, idstr, 0, 1) if kind in (ev.SectionStart, ev.SectionFull) else kind(sid)
    return [head, *payload, ev.SectionFooter(sid)]


def eos(sid: int) -> ev.MarkerEvent:
    return ev.MarkerEvent(sid, Marker.END_OF_STATE)


def precopy_stream(uuid: bytes | None = UUID) -> list[ev.MainEvent]:
    """A whole pre-copy migration with switchover-ack, as the source sends it."""
    return [
        ev.FileHeader(3),
        ev.Configuration("fakevfio", uuid=uuid),
        ev.OpenReturnPath(),
        *section(ev.SectionStart, 1, ev.MarkerEvent(1, Marker.DEV_SETUP_STATE), eos(1)),
        *section(
            ev.SectionPart,
            1,
            ev.DataHeader(1, 5),
            ev.DataChunk(1, b"hello"),
            ev.MarkerEvent(1, Marker.DEV_INIT_DATA_SENT),
        ),
        *section(ev.SectionPart, 1, ev.DataHeader(1, 0), eos(1)),
        ev.Ping(b"\0\0\0\7"),
        *section(ev.SectionEnd, 1, ev.DataHeader(1, 3), ev.DataChunk(1, b"end"), eos(1)),
        *section(
            ev.SectionFull,
            1,
            ev.MarkerEvent(1, Marker.DEV_CONFIG_STATE),
            ev.ConfigBlob(1, b"cfg"),
            eos(1),
        ),
        ev.EndOfFile(),
    ]


def ack_settings(uuid: bytes = UUID) -> DestinationSettings:
    return DestinationSettings(
        idstrs=["dev0"], config_sizes=CFG_SIZES, uuid=uuid, switchover_ack=True
    )


def test_pair_precopy_switchover_ack_and_shut() -> None:
    pair = MigrationPair(ack_settings())
    pair.dst.devices_ready(["dev0"])
    stream = precopy_stream()
    got = pair.send(*stream[:3])
    assert got == stream[:3]
    assert pair.src.rp_phase is RpPhase.OPEN
    assert pair.dst.rp_phase is RpPhase.OPEN
    assert not ack_due(pair.dst)
    got = pair.send(*stream[3:13])
    assert got == stream[3:13]
    assert ack_due(pair.dst)
    assert pair.reply(ev.SwitchoverAck()) == [ev.SwitchoverAck()]
    assert not pair.dst.ack_due
    got = pair.send(*stream[13:])
    assert got == stream[13:]
    assert pair.reply(ev.Pong(b"\0\0\0\7")) == [ev.Pong(b"\0\0\0\7")]
    assert pair.src.phase is Phase.DONE
    assert pair.dst.phase is Phase.DONE
    assert pair.reply(ev.Shut(0)) == [ev.Shut(0)]
    pair.src.receive_data(b"")
    assert drain(pair.src) == [ev.Closed()]
    pair.dst.receive_data(b"")
    assert drain(pair.dst) == []


def test_pair_bytes_match_the_encoders_and_the_reference_parser() -> None:
    # The reference parser knows no CONFIGURATION subsections: no UUID here.
    pair = MigrationPair(ack_settings(bytes(16)))
    pair.dst.devices_ready(["dev0"])
    pair.send(*precopy_stream(uuid=None))
    expected = (
        wire.encode_file_header()
        + wire.encode_configuration("fakevfio")
        + wire.encode_command(wire.MIG_CMD_OPEN_RETURN_PATH)
        + wire.encode_section_start(1, "dev0", 0, 1)
        + wire.encode_marker(Marker.DEV_SETUP_STATE)
        + wire.encode_marker(Marker.END_OF_STATE)
        + wire.encode_footer(1)
    )
    assert bytes(pair.main_bytes).startswith(expected)
    assert bytes(pair.main_bytes[:8]) == b"QEVM\x00\x00\x00\x03"
    records = ref.parse_stream(bytes(pair.main_bytes), CFG_SIZES)
    assert records[0] == ("header", 3)
    assert ("command", ref.CMD_OPEN_RETURN_PATH, b"") in records
    assert records[-1] == ("eof",)
    pair.reply(ev.SwitchoverAck())
    pair.reply(ev.Shut(1))
    assert ref.parse_rp(bytes(pair.rp_bytes)) == [(7, b""), (1, b"\0\0\0\1")]


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_pair_any_chunking_gives_the_same_events(cuts: list[int]) -> None:
    src = SourceProtocol()
    data = b"".join(src.send(e) for e in precopy_stream())
    dst = DestinationProtocol(ack_settings(), max_data_chunk=2)
    dst.devices_ready(["dev0"])
    got: list[object] = []
    points = sorted({min(c, len(data)) for c in cuts})
    for a, b in itertools.pairwise([0, *points, len(data)]):
        if a == b:
            continue
        dst.receive_data(data[a:b])
        got += drain(dst)
    dst.receive_data(b"")
    got += drain(dst)
    # max_data_chunk=2 splits the DATA blocks; joined, they are the sent chunks.
    merged: list[object] = []
    for e in got:
        if isinstance(e, ev.DataChunk) and merged and isinstance(merged[-1], ev.DataChunk):
            merged[-1] = ev.DataChunk(e.section_id, bytes(merged[-1].data) + bytes(e.data))
        else:
            merged.append(e)
    assert merged == precopy_stream()


# -- every illegal event in every phase (the complement of TRANSITIONS) ----------

#: Source events that reach each phase from a fresh SourceProtocol.
REACH: dict[Phase, list[ev.MainEvent]] = {
    Phase.FILE_HEADER: [],
    Phase.PREAMBLE: [ev.FileHeader(3)],
    Phase.TOP_LEVEL: [ev.FileHeader(3), ev.OpenReturnPath()],
    Phase.SECTION: [ev.FileHeader(3), ev.SectionStart(1, "dev0", 0, 1)],
    Phase.DATA: [ev.FileHeader(3), ev.SectionStart(1, "dev0", 0, 1), ev.DataHeader(1, 4)],
    Phase.CONFIG: [
        ev.FileHeader(3),
        ev.SectionFull(1, "dev0", 0, 1),
        ev.MarkerEvent(1, Marker.DEV_CONFIG_STATE),
    ],
    Phase.END_MARKER: [
        ev.FileHeader(3),
        ev.SectionStart(1, "dev0", 0, 1),
        ev.MarkerEvent(1, Marker.DEV_SETUP_STATE),
    ],
    Phase.FOOTER: [ev.FileHeader(3), ev.SectionStart(1, "dev0", 0, 1), eos(1)],
    Phase.DONE: [ev.FileHeader(3), *section(ev.SectionStart, 1, eos(1)), ev.EndOfFile()],
}

#: One sample of each main-channel event type.
SAMPLES: list[ev.MainEvent] = [
    ev.FileHeader(3),
    ev.Configuration("fakevfio"),
    ev.OpenReturnPath(),
    ev.Ping(),
    ev.SwitchoverStart(),
    ev.SectionStart(1, "dev0", 0, 1),
    ev.SectionPart(1),
    ev.SectionEnd(1),
    ev.SectionFull(1, "dev0", 0, 1),
    eos(1),
    ev.DataHeader(1, 4),
    ev.DataChunk(1, b"abcd"),
    ev.ConfigBlob(1, b"cfg"),
    ev.SectionFooter(1),
    ev.EndOfFile(),
]

ILLEGAL = [
    (phase, sample)
    for phase in REACH
    for sample in SAMPLES
    if (phase, type(sample)) not in TRANSITIONS
]


def test_reach_covers_every_phase_but_error() -> None:
    assert set(REACH) == set(Phase) - {Phase.ERROR}
    for phase, events in REACH.items():
        src = SourceProtocol()
        for e in events:
            src.send(e)
        assert src.phase is phase


@pytest.mark.parametrize(
    ("phase", "event"), ILLEGAL, ids=[f"{p.name}-{type(e).__name__}" for p, e in ILLEGAL]
)
def test_source_refuses_illegal_event_and_error_sticks(phase: Phase, event: ev.MainEvent) -> None:
    src = SourceProtocol()
    for e in REACH[phase]:
        src.send(e)
    with pytest.raises(LocalProtocolError, match=rf"cannot send {type(event).__name__} in phase "):
        src.send(event)
    assert src.phase is Phase.ERROR
    assert src.rp_phase is RpPhase.ERROR
    with pytest.raises(LocalProtocolError, match="protocol is in ERROR"):
        src.send(ev.FileHeader(3))
    with pytest.raises(LocalProtocolError, match="protocol is in ERROR"):
        src.next_event()


def _raw(event: ev.MainEvent) -> bytes:
    return bytes(_encode(event))


# In DATA every byte is payload, so no event is illegal there on the wire.
REMOTE_ILLEGAL = [(p, e) for p, e in ILLEGAL if p is not Phase.DATA]


@pytest.mark.parametrize(
    ("phase", "event"),
    REMOTE_ILLEGAL,
    ids=[f"{p.name}-{type(e).__name__}" for p, e in REMOTE_ILLEGAL],
)
def test_destination_refuses_illegal_bytes_and_error_sticks(
    phase: Phase, event: ev.MainEvent
) -> None:
    pair = MigrationPair()
    pair.send(*REACH[phase])
    assert pair.dst.phase is phase
    pair.dst.receive_data(_raw(event) + bytes(64))
    with pytest.raises(RemoteProtocolError):
        drain(pair.dst)
    assert pair.dst.phase is Phase.ERROR
    with pytest.raises(RemoteProtocolError, match="protocol is in ERROR"):
        pair.dst.next_event()
    with pytest.raises(RemoteProtocolError, match="protocol is in ERROR"):
        pair.dst.receive_data(b"x")


def test_transitions_error_message_lists_what_was_allowed() -> None:
    src = SourceProtocol()
    with pytest.raises(LocalProtocolError) as info:
        src.send(ev.EndOfFile())
    assert str(info.value) == "cannot send EndOfFile in phase FILE_HEADER (allowed: FileHeader)"


# -- the return path -------------------------------------------------------------

RP_SAMPLES: list[ev.SwitchoverAck | ev.Pong | ev.Shut] = [
    ev.SwitchoverAck(),
    ev.Pong(),
    ev.Shut(0),
]


@pytest.mark.parametrize("event", RP_SAMPLES, ids=lambda e: type(e).__name__)
def test_return_path_message_before_open_is_refused_on_both_sides(
    event: ev.SwitchoverAck | ev.Pong | ev.Shut,
) -> None:
    assert (RpPhase.CLOSED, type(event)) not in RP_TRANSITIONS
    dst = DestinationProtocol(DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES))
    with pytest.raises(LocalProtocolError, match="in phase CLOSED"):
        dst.send(event)
    assert dst.rp_phase is RpPhase.ERROR
    src = SourceProtocol()
    src.send(ev.FileHeader(3))
    src.receive_data(wire.encode_rp_shut(0) if isinstance(event, ev.Shut) else b"\0\7\0\0")
    with pytest.raises(RemoteProtocolError, match="cannot receive"):
        drain(src)
    with pytest.raises(RemoteProtocolError, match="protocol is in ERROR"):
        src.receive_data(b"")


def test_nothing_after_shut_and_eof_before_shut() -> None:
    pair = MigrationPair()
    pair.send(ev.FileHeader(3), ev.OpenReturnPath())
    pair.reply(ev.Shut(1))
    with pytest.raises(LocalProtocolError, match="cannot send Pong in phase SHUT"):
        pair.dst.send(ev.Pong())
    src = SourceProtocol()
    src.send(ev.FileHeader(3))
    src.send(ev.OpenReturnPath())
    src.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed the connection before reporting"):
        src.next_event()


def test_switchover_ack_only_when_due() -> None:
    pair = MigrationPair(
        DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES, switchover_ack=True)
    )
    pair.dst.devices_ready([])
    pair.send(ev.FileHeader(3), ev.OpenReturnPath())
    assert pair.dst.ack_due  # no pre-copy device: due at once
    pair.reply(ev.SwitchoverAck())
    with pytest.raises(LocalProtocolError, match="not due"):
        pair.dst.send(ev.SwitchoverAck())


# -- destination rules (Rule 5) --------------------------------------------------


def _fed(settings: DestinationSettings, *events: ev.MainEvent) -> DestinationProtocol:
    src = SourceProtocol()
    dst = DestinationProtocol(settings)
    dst.devices_ready(["dev0"])
    dst.receive_data(b"".join(src.send(e) for e in events))
    return dst


@pytest.mark.parametrize(
    ("settings", "events", "message"),
    [
        (
            DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES, uuid=UUID),
            [ev.FileHeader(3), ev.Configuration("x", uuid=bytes(16)), ev.OpenReturnPath()],
            "does not match --uuid",
        ),
        (
            DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES, uuid=UUID),
            [ev.FileHeader(3), ev.OpenReturnPath()],
            "carries no migration UUID",
        ),
        (
            DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES),
            [ev.FileHeader(3), ev.SectionStart(1, "other", 0, 1)],
            "Unknown savevm section or instance 'other' 0",
        ),
        (
            DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES),
            [ev.FileHeader(3), ev.SectionStart(1, "dev0", 0, 2)],
            "unsupported version 2",
        ),
        (
            DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES),
            [
                ev.FileHeader(3),
                ev.SectionStart(1, "dev0", 0, 1),
                ev.MarkerEvent(1, Marker.DEV_INIT_DATA_SENT),
            ],
            "switchover ack is not used",
        ),
        (
            DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES, multifd=True),
            [
                ev.FileHeader(3),
                ev.SectionFull(1, "dev0", 0, 1),
                ev.MarkerEvent(1, Marker.DEV_CONFIG_STATE),
            ],
            "DEV_CONFIG_STATE in main migration channel but doing multifd",
        ),
        (
            DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES),
            [
                ev.FileHeader(3),
                ev.SectionFull(1, "dev0", 0, 1),
                ev.MarkerEvent(1, Marker.DEV_CONFIG_LOAD_READY),
            ],
            "DEV_CONFIG_LOAD_READY outside multifd transfer",
        ),
        (
            DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES, multifd=True),
            [
                ev.FileHeader(3),
                ev.SectionFull(1, "dev0", 0, 1),
                ev.MarkerEvent(1, Marker.DEV_CONFIG_LOAD_READY),
            ],
            "got DEV_CONFIG_LOAD_READY but was disabled",
        ),
        (
            DestinationSettings(
                idstrs=["dev0"], config_sizes=CFG_SIZES, multifd=True, load_config_after_iter=True
            ),
            [
                ev.FileHeader(3),
                ev.SectionFull(1, "dev0", 0, 1),
                ev.MarkerEvent(1, Marker.DEV_CONFIG_LOAD_READY),
                ev.SectionFooter(1),
                ev.SectionFull(1, "dev0", 0, 1),
                ev.MarkerEvent(1, Marker.DEV_CONFIG_LOAD_READY),
            ],
            "duplicate DEV_CONFIG_LOAD_READY",
        ),
        (
            DestinationSettings(idstrs=["dev0", "dev1"]),
            [ev.FileHeader(3), *section(ev.SectionStart, 1, eos(1)), ev.EndOfFile()],
            r"no state for destination device\(s\) dev1",
        ),
        (
            DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES, multifd=True),
            [ev.FileHeader(3), *section(ev.SectionStart, 1, eos(1)), ev.EndOfFile()],
            "without MIG_CMD_SWITCHOVER_START",
        ),
    ],
)
def test_destination_rules(
    settings: DestinationSettings, events: list[ev.MainEvent], message: str
) -> None:
    dst = _fed(settings, *events)
    with pytest.raises(RemoteProtocolError, match=message):
        drain(dst)
    assert dst.phase is Phase.ERROR


def test_destination_init_data_sent_twice_is_refused() -> None:
    events: list[ev.MainEvent] = [ev.FileHeader(3)]
    for _ in range(2):
        events += section(ev.SectionStart, 1, ev.MarkerEvent(1, Marker.DEV_INIT_DATA_SENT))
    dst = _fed(
        DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES, switchover_ack=True), *events
    )
    with pytest.raises(RemoteProtocolError, match="approved more times than needed"):
        drain(dst)


def test_section_rules_on_both_sides() -> None:
    src = SourceProtocol()
    src.send(ev.FileHeader(3))
    with pytest.raises(LocalProtocolError, match="section 4 was never started"):
        src.send(ev.SectionPart(4))
    dst = _fed(DestinationSettings(idstrs=["dev0", "dev1"]), ev.FileHeader(3))
    dst.receive_data(
        wire.encode_section_start(1, "dev0", 0, 1)
        + wire.encode_marker(Marker.END_OF_STATE)
        + wire.encode_footer(1)
        + wire.encode_section_full(1, "dev1", 0, 1)
    )
    with pytest.raises(RemoteProtocolError, match="section id 1 reused for dev1"):
        drain(dst)


def test_framing_errors_are_remote_and_sticky() -> None:
    dst = DestinationProtocol(DestinationSettings(idstrs=["dev0"], config_sizes=CFG_SIZES))
    dst.receive_data(b"XXXXXXXX")
    with pytest.raises(FramingError):
        dst.next_event()
    with pytest.raises(RemoteProtocolError, match="protocol is in ERROR"):
        dst.next_event()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        # QEMU's source fails on the postcopy messages outside postcopy ...
        (wire.encode_rp_message(wire.RpMsg.REQ_PAGES, bytes(12)), "REQ_PAGES \\(0x0004\\)"),
        (wire.encode_rp_message(wire.RpMsg.RESUME_ACK, bytes(4)), "RESUME_ACK \\(0x0006\\)"),
        (wire.encode_rp_message(wire.RpMsg.RECV_BITMAP, b"x"), "postcopy is not in use"),
        # ... and on a type it does not know (QEMU 10.0: MIG_RP_MSG_MAX is 8).
        (wire.encode_rp_message(8), "Received invalid message 0x0008 length 0x0000"),
    ],
)
def test_source_fails_on_return_path_messages_qemu_fails_on(raw: bytes, message: str) -> None:
    src = SourceProtocol()
    src.send(ev.FileHeader(3))
    src.send(ev.OpenReturnPath())
    src.receive_data(wire.encode_rp_message(wire.RpMsg.PONG, b"\0\0\0\1") + raw)
    assert src.next_event() == ev.Pong(b"\0\0\0\1")
    with pytest.raises(RemoteProtocolError, match=message):
        src.next_event()
    with pytest.raises(RemoteProtocolError, match="protocol is in ERROR"):
        src.receive_data(b"")


def test_vm_description_goes_after_eof_only_and_our_destination_skips_it() -> None:
    """QEMU's destination reads a VM description after EOF (and waits for it): a
    source naming a QEMU machine type sends one; ours decodes the stream either way."""
    pair = MigrationPair(ack_settings())
    pair.dst.devices_ready(["dev0"])
    stream = precopy_stream()
    with pytest.raises(LocalProtocolError, match="VmDescription"):
        pair.src.send_vm_description(b"{}")  # before the header: refused, sticky
    pair = MigrationPair(ack_settings())
    pair.dst.devices_ready(["dev0"])
    pair.send(*stream[:13])
    pair.reply(ev.SwitchoverAck())
    pair.send(*stream[13:])
    tail = pair.src.send_vm_description(b'{"devices": []}')
    assert tail == b"\x06\0\0\0\x0f" + b'{"devices": []}'
    pair.dst.receive_data(tail)
    assert drain(pair.dst) == [ev.VmDescription(15)]
    assert pair.dst.phase is Phase.DONE
