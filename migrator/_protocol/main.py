"""The sans-IO main-channel protocol: what each side may send or receive when.

:class:`SourceProtocol` encodes the savevm stream the source sends and decodes
the return path; :class:`DestinationProtocol` decodes the stream and encodes the
return path. Both check every event against the same :data:`TRANSITIONS` table
(the main channel) and :data:`RP_TRANSITIONS` (the return path); bytes in,
events out, no I/O (h11 style: ``send(event) -> bytes``, ``receive_data(data)``
with ``b""`` for EOF, ``next_event() -> Event | NEED_DATA``).

Theory of operation
-------------------
Main-channel phases (:class:`Phase`)::

    FILE_HEADER -> PREAMBLE [-- Configuration -->] TOP_LEVEL
    TOP_LEVEL -- section header --> SECTION -- markers, DATA --> FOOTER -- footer --> TOP_LEVEL
    TOP_LEVEL -- EndOfFile --> DONE;   any protocol error --> ERROR (sticky)

Return-path phases (:class:`RpPhase`): CLOSED -- OpenReturnPath --> OPEN --
Shut --> SHUT.

Rule 1: an event is legal only where :data:`TRANSITIONS` (or, for the return
        path, :data:`RP_TRANSITIONS`) lists ``(phase, type(event))``; the looked-up
        phase is the next one. Sending an illegal event is a
        LocalProtocolError, receiving one a RemoteProtocolError; both say what
        was allowed.
Rule 2: inside a section, the marker picks the next phase (:data:`MARKER_PHASES`):
        SETUP_STATE and a config blob need one more END_OF_STATE, CONFIG_STATE
        needs the blob, END_OF_STATE / INIT_DATA_SENT / CONFIG_LOAD_READY end the
        payload. A DATA block is its header plus exactly ``size`` bytes of chunks.
Rule 3: a section id names one idstr for the whole stream; PART, END and footers
        name a section that was started.
Rule 4: the return path is open once OpenReturnPath went by on the main
        channel; SHUT is the destination's last message and a clean close may
        only follow it.
Rule 5 (destination): with a migration UUID the CONFIGURATION record must come
        and carry it; sections name our devices (instance 0, version <= 1);
        DEV_CONFIG_STATE is refused in multifd mode; DEV_CONFIG_LOAD_READY
        (QEMU 10.1's x-migration-load-config-after-iter) is refused outside
        multifd mode, when the option is off and the second time, as QEMU's
        vfio_load_state_config_load_ready does, and with the option on every
        device must have had one by EndOfFile (where QEMU would wait for ever,
        this side fails); INIT_DATA_SENT needs switchover-ack and a pre-copy device.
        Legacy switchover-ack (QEMU 10.x; ``switchover_ack_legacy``): at most once
        per such device, and one SWITCHOVER_ACK is due when the last of them
        arrived (or at OpenReturnPath when there are none). QEMU 11.1's
        mechanism: INIT_DATA_SENT may come again (after a REINIT) and every
        one makes one SWITCHOVER_ACK due; none is due at OpenReturnPath. See
        ``ack_due``.
        The source starts every device's section in its setup phase, so the
        first event past those starts (a PART or END section, or
        SwitchoverStart) finds every device of ours started: a device the
        source does not have fails there, before anyone waits for an ack
        it could never send. At EndOfFile every device was seen, and in
        multifd mode SwitchoverStart came.
Rule 6: any protocol error moves both phases to ERROR, and every later call
        raises a protocol error at once (errors are sticky).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Collection, Mapping
from typing import Final, NoReturn, TypeVar

import attrs

from migrator import _wire as wire
from migrator._protocol import events as ev
from migrator._wire import Marker
from migrator.errors import LocalProtocolError, PeerClosedError, RemoteProtocolError


class Phase(enum.Enum):
    """Where the main channel is (both sides track the same phase)."""

    FILE_HEADER = enum.auto()
    PREAMBLE = enum.auto()
    TOP_LEVEL = enum.auto()
    SECTION = enum.auto()
    DATA = enum.auto()
    CONFIG = enum.auto()
    END_MARKER = enum.auto()
    FOOTER = enum.auto()
    DONE = enum.auto()
    ERROR = enum.auto()


class RpPhase(enum.Enum):
    """Where the return path is."""

    CLOSED = enum.auto()
    OPEN = enum.auto()
    SHUT = enum.auto()
    ERROR = enum.auto()


_P = Phase
_TOP_EVENTS: Mapping[type[ev.Event], Phase] = {
    ev.OpenReturnPath: _P.TOP_LEVEL,
    ev.Ping: _P.TOP_LEVEL,
    ev.SwitchoverStart: _P.TOP_LEVEL,
    ev.SectionStart: _P.SECTION,
    ev.SectionPart: _P.SECTION,
    ev.SectionEnd: _P.SECTION,
    ev.SectionFull: _P.SECTION,
    ev.EndOfFile: _P.DONE,
}

#: The main channel: (phase, event type) -> next phase (Rule 1).
TRANSITIONS: Mapping[tuple[Phase, type[ev.Event]], Phase] = {
    (_P.FILE_HEADER, ev.FileHeader): _P.PREAMBLE,
    (_P.PREAMBLE, ev.Configuration): _P.TOP_LEVEL,
    **{(_P.PREAMBLE, t): p for t, p in _TOP_EVENTS.items()},
    **{(_P.TOP_LEVEL, t): p for t, p in _TOP_EVENTS.items()},
    # MarkerEvent's next phase is refined by MARKER_PHASES (Rule 2).
    (_P.SECTION, ev.MarkerEvent): _P.FOOTER,
    (_P.SECTION, ev.DataHeader): _P.DATA,
    # The last chunk of a block goes back to SECTION (Rule 2).
    (_P.DATA, ev.DataChunk): _P.DATA,
    (_P.CONFIG, ev.ConfigBlob): _P.END_MARKER,
    (_P.END_MARKER, ev.MarkerEvent): _P.FOOTER,
    (_P.FOOTER, ev.SectionFooter): _P.TOP_LEVEL,
    (_P.DONE, ev.VmDescription): _P.DONE,
}

#: The phase after a marker in SECTION (Rule 2); DEV_DATA_STATE is a DataHeader.
MARKER_PHASES: Mapping[Marker, Phase] = {
    Marker.END_OF_STATE: _P.FOOTER,
    Marker.DEV_INIT_DATA_SENT: _P.FOOTER,
    Marker.DEV_CONFIG_LOAD_READY: _P.FOOTER,
    Marker.DEV_SETUP_STATE: _P.END_MARKER,
    Marker.DEV_CONFIG_STATE: _P.CONFIG,
}

_R = RpPhase
#: The return path: (phase, event type) -> next phase (Rule 4).
RP_TRANSITIONS: Mapping[tuple[RpPhase, type[ev.Event]], RpPhase] = {
    (_R.OPEN, ev.SwitchoverAck): _R.OPEN,
    (_R.OPEN, ev.Pong): _R.OPEN,
    (_R.OPEN, ev.Shut): _R.SHUT,
    (_R.SHUT, ev.Closed): _R.SHUT,
}

S = TypeVar("S", Phase, RpPhase)


def allowed(table: Mapping[tuple[S, type[ev.Event]], S], phase: S) -> str:
    """The event names ``table`` allows in ``phase``, for error messages."""
    names = sorted(t.__name__ for (p, t) in table if p is phase)
    return ", ".join(names) or "nothing"


def transition(
    table: Mapping[tuple[S, type[ev.Event]], S],
    phase: S,
    event: ev.Event,
    *,
    remote: bool,
) -> S:
    """The next phase for ``event`` in ``phase``, or the typed error of Rule 1."""
    try:
        return table[(phase, type(event))]
    except KeyError:
        verb = "receive" if remote else "send"
        cls = RemoteProtocolError if remote else LocalProtocolError
        raise cls(
            f"cannot {verb} {type(event).__name__} in phase {phase.name} "
            f"(allowed: {allowed(table, phase)})"
        ) from None


_BE32: Final = struct.Struct(">I")


@attrs.define
class _Tracker:
    """The state both sides keep: phases, sections, the open DATA block (Rules 1-4, 6)."""

    phase: Phase = Phase.FILE_HEADER
    rp_phase: RpPhase = RpPhase.CLOSED
    sections: dict[int, str] = attrs.field(factory=dict)
    data_left: int = 0
    error: LocalProtocolError | RemoteProtocolError | None = None

    def check_error(self) -> None:
        if self.error is not None:
            raise type(self.error)(f"protocol is in ERROR after: {self.error.message}")

    def fail(self, exc: LocalProtocolError | RemoteProtocolError) -> NoReturn:
        self.error = exc
        self.phase = Phase.ERROR
        self.rp_phase = RpPhase.ERROR
        raise exc

    def main(self, event: ev.Event, *, remote: bool) -> None:
        nxt = transition(TRANSITIONS, self.phase, event, remote=remote)
        cls = RemoteProtocolError if remote else LocalProtocolError
        match event:
            case ev.SectionStart() | ev.SectionFull():
                known = self.sections.get(event.section_id)
                if known is not None and known != event.idstr:
                    raise cls(f"section id {event.section_id} reused for {event.idstr}")
                self.sections[event.section_id] = event.idstr
            case ev.SectionPart() | ev.SectionEnd():
                if event.section_id not in self.sections:
                    raise cls(f"section {event.section_id} was never started")
            case ev.MarkerEvent() if self.phase is Phase.SECTION:
                if event.marker not in MARKER_PHASES:
                    raise cls(f"{event.marker.name} is sent as a DataHeader, not a marker")
                nxt = MARKER_PHASES[event.marker]
            case ev.MarkerEvent() if event.marker is not Marker.END_OF_STATE:
                raise cls(f"expected END_OF_STATE, got {event.marker.name}")
            case ev.DataHeader():
                self.data_left = event.size
                nxt = Phase.DATA if event.size else Phase.SECTION
            case ev.DataChunk():
                if len(event.data) > self.data_left:
                    raise cls(f"{len(event.data)} bytes of DATA, {self.data_left} left in block")
                self.data_left -= len(event.data)
                nxt = Phase.DATA if self.data_left else Phase.SECTION
            case ev.OpenReturnPath():
                self.rp_phase = RpPhase.OPEN
            case _:
                pass
        self.phase = nxt

    def rp(self, event: ev.Event, *, remote: bool) -> None:
        self.rp_phase = transition(RP_TRANSITIONS, self.rp_phase, event, remote=remote)


def _encode(event: ev.MainEvent) -> bytes | memoryview:
    match event:
        case ev.FileHeader():
            return wire.encode_file_header()
        case ev.Configuration():
            return wire.encode_configuration(
                event.name,
                target_page_bits=event.target_page_bits,
                capabilities=event.capabilities,
                uuid=event.uuid,
            )
        case ev.OpenReturnPath():
            return wire.encode_command(wire.MIG_CMD_OPEN_RETURN_PATH)
        case ev.Ping():
            return wire.encode_command(wire.MIG_CMD_PING, event.value.rjust(4, b"\0"))
        case ev.SwitchoverStart():
            return wire.encode_command(wire.MIG_CMD_SWITCHOVER_START)
        case ev.SectionStart():
            return wire.encode_section_start(
                event.section_id, event.idstr, event.instance_id, event.version_id
            )
        case ev.SectionFull():
            return wire.encode_section_full(
                event.section_id, event.idstr, event.instance_id, event.version_id
            )
        case ev.SectionPart():
            return wire.encode_section_part(event.section_id)
        case ev.SectionEnd():
            return wire.encode_section_end(event.section_id)
        case ev.MarkerEvent():
            return wire.encode_marker(event.marker)
        case ev.DataHeader():
            return wire.encode_data_header(event.size)
        case ev.DataChunk():
            return event.data
        case ev.ConfigBlob():
            return wire.encode_config_blob(event.data)
        case ev.SectionFooter():
            return wire.encode_footer(event.section_id)
        case ev.EndOfFile():
            return wire.encode_eof()
        case ev.VmDescription():
            raise LocalProtocolError("sending a VM description is not supported")


_COMMANDS: Mapping[int, type[ev.OpenReturnPath | ev.SwitchoverStart]] = {
    wire.MIG_CMD_OPEN_RETURN_PATH: ev.OpenReturnPath,
    wire.MIG_CMD_SWITCHOVER_START: ev.SwitchoverStart,
}


class SourceProtocol:
    """The source's side: sends the main stream, receives the return path."""

    def __init__(self) -> None:
        self._t = _Tracker()
        self._rp = wire.ReturnPathDecoder()
        self._eof = False

    @property
    def phase(self) -> Phase:
        return self._t.phase

    @property
    def rp_phase(self) -> RpPhase:
        return self._t.rp_phase

    def send(self, event: ev.MainEvent) -> bytes | memoryview:
        """The bytes of ``event`` on the main channel (LocalProtocolError if illegal now).

        A :class:`~migrator._wire.DataChunk` comes back as its own buffer, uncopied.
        """
        self._t.check_error()
        try:
            self._t.main(event, remote=False)
            return _encode(event)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self._t.fail(exc)

    def send_vm_description(self, json: bytes) -> bytes:
        """QEMU's VM description after EndOfFile (what a QEMU destination reads last)."""
        self._t.check_error()
        try:
            self._t.main(ev.VmDescription(len(json)), remote=False)
            return wire.encode_vm_description(json)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self._t.fail(exc)

    def send_failed(self) -> None:
        """The transport died mid-send: nothing more can be sent."""
        self._t.error = self._t.error or LocalProtocolError("the main channel failed mid-send")
        self._t.phase = Phase.ERROR
        self._t.rp_phase = RpPhase.ERROR

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Return-path bytes from the destination; ``b""`` means it closed."""
        self._t.check_error()
        self._eof = self._eof or not data
        try:
            self._rp.receive_data(data)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self._t.fail(exc)

    def next_event(self) -> ev.ReturnPathEvent | ev.Closed | ev.NeedData:
        """The next return-path event, :class:`Closed` after SHUT and EOF, or NEED_DATA."""
        self._t.check_error()
        try:
            raw = self._rp.next_event()
            if raw is ev.NEED_DATA:
                if not (self._eof and self._rp.closed):
                    return ev.NEED_DATA
                if self._t.rp_phase is not RpPhase.SHUT:
                    raise PeerClosedError(
                        "the destination closed the connection before reporting a result"
                    )
                return ev.Closed()
            assert isinstance(raw, wire.RpEvent)
            event: ev.ReturnPathEvent
            if raw.msg_type == wire.RpMsg.SHUT:
                event = ev.Shut(wire.rp_shut_status(raw))
            elif wire.rp_is_switchover_ack(raw):
                event = ev.SwitchoverAck()
            elif raw.msg_type == wire.RpMsg.PONG:
                event = ev.Pong(raw.payload)
            else:
                # The postcopy messages (REQ_PAGES*, RECV_BITMAP, RESUME_ACK):
                # QEMU's source fails on each of them outside postcopy.
                name = wire.RpMsg(raw.msg_type).name
                raise RemoteProtocolError(
                    f"return-path message {name} (0x{raw.msg_type:04x}) from the destination, "
                    "but postcopy is not in use; expected SWITCHOVER_ACK, PONG or SHUT"
                )
            self._t.rp(event, remote=True)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self._t.fail(exc)
        return event


@attrs.frozen(kw_only=True)
class DestinationSettings:
    """What the destination knows before the stream starts (Rule 5).

    Attributes:
        idstrs: the section idstrs of our devices.
        uuid: the migration UUID to insist on (all zero: none).
        switchover_ack: the switchover-ack capability is on.
        multifd: device state comes on multifd channels.
        config_sizes: each device's config blob size, by idstr (the blob
            carries no length; see ``MainStreamDecoder``).
        load_config_after_iter: QEMU 10.1's ``x-migration-load-config-after-iter``
            resolved on: in multifd mode each device's config is loaded only
            after its DEV_CONFIG_LOAD_READY (see ``config_load_ready``).
        switchover_ack_legacy: QEMU 10.x's switchover-ack accounting (one ACK for
            all devices); False: QEMU 11.1's (one ACK per INIT_DATA_SENT), Rule 5.
    """

    idstrs: Collection[str]
    uuid: bytes = bytes(16)
    switchover_ack: bool = False
    multifd: bool = False
    config_sizes: Mapping[str, int] = attrs.field(factory=dict)
    load_config_after_iter: bool = False
    switchover_ack_legacy: bool = True


class DestinationProtocol:
    """The destination's side: receives the main stream, sends the return path.

    Args:
        settings: the devices and negotiated settings (Rule 5).
        max_data_chunk: largest DataChunk handed out (the decoder's bound).
    """

    def __init__(self, settings: DestinationSettings, *, max_data_chunk: int = 1 << 20) -> None:
        self.settings = settings
        self._t = _Tracker()
        self._decoder = wire.MainStreamDecoder(
            max_data_chunk=max_data_chunk, config_sizes=settings.config_sizes
        )
        self._precopy: frozenset[str] | None = None
        self._init_sent: set[str] = set()
        self._ack_pending = 0
        self._acks_due = 0
        self._seen: set[str] = set()
        self._setup_checked = False
        self._switchover_started = False
        self._load_ready: set[str] = set()

    @property
    def phase(self) -> Phase:
        return self._t.phase

    @property
    def rp_phase(self) -> RpPhase:
        return self._t.rp_phase

    @property
    def ack_due(self) -> bool:
        """A SWITCHOVER_ACK should be sent now (and is not sent yet)."""
        return self._acks_due > 0

    def awaiting_init_data(self) -> list[str]:
        """Our pre-copy devices whose INIT_DATA_SENT the switchover-ack still waits for."""
        if not self.settings.switchover_ack:
            return []
        if self.settings.switchover_ack_legacy and self._ack_pending <= 0:
            return []
        return sorted((self._precopy or frozenset()) - self._init_sent)

    @property
    def switchover_started(self) -> bool:
        return self._switchover_started

    def config_load_ready(self, idstr: str) -> bool:
        """Whether ``idstr``'s DEV_CONFIG_LOAD_READY arrived (Rule 5)."""
        return idstr in self._load_ready

    def idstr_of(self, section_id: int) -> str:
        """The idstr section ``section_id`` was started with (Rule 3)."""
        return self._t.sections[section_id]

    def devices_ready(self, precopy_idstrs: Collection[str]) -> None:
        """Our devices are RESUMING; ``precopy_idstrs`` support PRE_COPY (Rule 5)."""
        self._precopy = frozenset(precopy_idstrs)
        if self.settings.switchover_ack and self.settings.switchover_ack_legacy:
            self._ack_pending = len(self._precopy)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Main-channel bytes from the source; ``b""`` means EOF."""
        self._t.check_error()
        try:
            self._decoder.receive_data(data)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self._t.fail(exc)

    def next_event(self) -> ev.MainEvent | ev.NeedData:
        """The next main-channel event, checked against Rules 1-5, or NEED_DATA."""
        self._t.check_error()
        try:
            raw = self._decoder.next_event()
            if isinstance(raw, wire.NeedData):
                return ev.NEED_DATA
            event = self._command(raw) if isinstance(raw, wire.Command) else raw
            self._check(event)
            self._t.main(event, remote=True)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self._t.fail(exc)
        return event

    def send(self, event: ev.SwitchoverAck | ev.Pong | ev.Shut) -> bytes:
        """The return-path bytes of ``event`` (LocalProtocolError if illegal now)."""
        self._t.check_error()
        try:
            if isinstance(event, ev.SwitchoverAck):
                self._t.rp(event, remote=False)
                if not self._acks_due:
                    raise LocalProtocolError("SWITCHOVER_ACK is not due")
                self._acks_due -= 1
                return wire.encode_rp_switchover_ack()
            self._t.rp(event, remote=False)
            if isinstance(event, ev.Pong):
                return wire.encode_rp_message(wire.RpMsg.PONG, event.value)
            return wire.encode_rp_shut(event.status)
        except (LocalProtocolError, RemoteProtocolError) as exc:
            self._t.fail(exc)

    def send_failed(self) -> None:
        """The return path died mid-send."""
        self._t.error = self._t.error or LocalProtocolError("the return path failed mid-send")
        self._t.phase = Phase.ERROR
        self._t.rp_phase = RpPhase.ERROR

    # -- Rule 5 -------------------------------------------------------------------
    def _command(self, raw: wire.Command) -> ev.MainEvent:
        if raw.cmd == wire.MIG_CMD_PING:
            return ev.Ping(raw.payload[:4])
        kind = _COMMANDS.get(raw.cmd)
        if kind is None:
            raise RemoteProtocolError(f"unsupported migration command {raw.cmd}")
        return kind()

    def _check(self, event: ev.MainEvent) -> None:
        s = self.settings
        if self._t.phase is Phase.PREAMBLE and s.uuid != bytes(16):
            if not isinstance(event, ev.Configuration):
                raise RemoteProtocolError(
                    "the stream carries no migration UUID but --uuid was given; refusing it"
                )
            if event.uuid != s.uuid:
                raise RemoteProtocolError(
                    "the source's migration UUID does not match --uuid; refusing the stream"
                )
        if not self._setup_checked and isinstance(
            event, (ev.SectionPart, ev.SectionEnd, ev.SwitchoverStart)
        ):
            self._setup_checked = True
            self._check_all_started()
        match event:
            case ev.OpenReturnPath():
                if s.switchover_ack and s.switchover_ack_legacy and self._ack_pending == 0:
                    self._acks_due = 1
            case ev.SwitchoverStart():
                self._switchover_started = True
            case ev.SectionStart() | ev.SectionFull():
                if event.idstr not in s.idstrs or event.instance_id != 0:
                    raise RemoteProtocolError(
                        f"Unknown savevm section or instance '{event.idstr}' {event.instance_id} "
                        f"(this side has: {', '.join(s.idstrs) or 'no devices'})"
                    )
                if event.version_id > 1:
                    raise RemoteProtocolError(
                        f"savevm: unsupported version {event.version_id} for '{event.idstr}' v1"
                    )
                self._seen.add(event.idstr)
            case ev.MarkerEvent():
                self._marker(self._t.sections.get(event.section_id, ""), event.marker)
            case ev.EndOfFile():
                self._check_all_started()
                if s.multifd and not self._switchover_started:
                    raise RemoteProtocolError("stream ended without MIG_CMD_SWITCHOVER_START")
                waiting = [i for i in s.idstrs if i not in self._load_ready]
                if s.multifd and s.load_config_after_iter and waiting:
                    raise RemoteProtocolError(
                        f"stream ended without DEV_CONFIG_LOAD_READY for {', '.join(waiting)} "
                        "(x-migration-load-config-after-iter is on here: is it on at the source?)"
                    )
            case _:
                pass

    def _check_all_started(self) -> None:
        s = self.settings
        missing = [i for i in s.idstrs if i not in self._seen]
        if missing:
            raise RemoteProtocolError(
                f"the stream carried no state for destination device(s) "
                f"{', '.join(missing)} (the source sent {len(self._t.sections)} "
                f"device(s), this side has {len(s.idstrs)})"
            )

    def _marker(self, idstr: str, marker: Marker) -> None:
        multifd = self.settings.multifd
        if marker is Marker.DEV_CONFIG_STATE and multifd:
            raise RemoteProtocolError(
                "got DEV_CONFIG_STATE in main migration channel but doing multifd transfer",
                device=idstr,
            )
        if marker is Marker.DEV_INIT_DATA_SENT:
            precopy = self._precopy or frozenset()
            if idstr not in precopy or not self.settings.switchover_ack:
                raise RemoteProtocolError(
                    "Received INIT_DATA_SENT but switchover ack is not used", device=idstr
                )
            self._init_sent.add(idstr)
            if not self.settings.switchover_ack_legacy:
                # QEMU 11.1: every INIT_DATA_SENT is approved with its own ACK.
                self._acks_due += 1
                return
            if self._ack_pending <= 0:
                raise RemoteProtocolError(
                    "switchover approved more times than needed (a QEMU 11.1 source sends "
                    "INIT_DATA_SENT again after a REINIT: use --qemu-compat 11.1)",
                    device=idstr,
                )
            self._ack_pending -= 1
            if self._ack_pending == 0:
                self._acks_due = 1
        if marker is Marker.DEV_CONFIG_LOAD_READY:
            if not multifd:
                why = "outside multifd transfer"
            elif not self.settings.load_config_after_iter:
                why = "but was disabled"
            elif idstr in self._load_ready:
                raise RemoteProtocolError("duplicate DEV_CONFIG_LOAD_READY", device=idstr)
            else:
                self._load_ready.add(idstr)
                return
            raise RemoteProtocolError(f"got DEV_CONFIG_LOAD_READY {why}", device=idstr)
