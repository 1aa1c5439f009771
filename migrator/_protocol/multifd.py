"""Multifd as pure state: the destination's intake and the source's packet plan.

The destination's :class:`MultifdIntake` is everything the multifd channels
decide that is not moving bytes: it checks each channel's MultiFDInit_t
handshake (UUID, channel id in range, each id once), checks every
device-state packet (header, known idstr, instance 0, VFIO header), queues it
in its device's :class:`Reassembler`, keeps the one queue budget shared by all
devices, and releases in-order buffers and the decoded config per device. The
trio adapter (``migrator.destination``) only reads bytes, writes the released
buffers to the devices and waits where the intake says "no room now".

Theory of operation (the queue budget)
--------------------------------------
Rule 1: the payload bytes received and not yet written, over all devices, stay
        within ``max_queued_bytes``: a packet that does not fit is held back by
        its channel (backpressure) -- unless it is a config packet or the
        packet its device's loader waits for, which always pass, or the loader
        would starve. Each reassembler's own hard bound is the budget plus one
        maximal packet, the room those let-through packets need.
Rule 2: if every live channel holds a packet back, none of those packets fits
        now, and no loader has anything to write or is writing, nothing can
        ever free budget: the bound is really exceeded and the migration fails
        (ReassemblyError). (A held packet that fits now belongs to a channel
        that was woken and has not run yet: not stuck.)
Rule 3: budget is given back once bytes are in the device, not when they are
        handed to the writer.
Rule 4 (QEMU's bound, ``per_device_max``): instead of Rules 1-2, QEMU 10.1's
        ``x-migration-max-queued-buffers-size``: each device counts the payload
        bytes (after the 12-byte VFIO header) of its packets queued and not yet
        written, the config packet included and never given back; a packet
        that takes the count over the bound fails the migration at once, with
        QEMU's message (``vfio_load_state_buffer_insert``). Nothing is held
        back: every packet is queued as it arrives, as QEMU's receive threads
        do.

Rule 5 (``load_config_after_iter``, QEMU 10.1's
        ``x-migration-load-config-after-iter``): a device's config is released
        only once its DEV_CONFIG_LOAD_READY came on the main channel
        (:meth:`MultifdIntake.config_load_ready`), after every data buffer as
        always; a loader that waits for it is not starving, so closed channels
        do not fail it.

The source's :class:`PacketPlanner` numbers one device's stop-copy packets
0, 1, 2, ... and the config packet last, and says where in a reusable buffer
the headers go so that the data read lands page-aligned.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from migrator import multifd_wire
from migrator._wire.pci_config import encode_qemu_config
from migrator.errors import ChannelBrokenError, ReassemblyError, RemoteProtocolError
from migrator.reassembly import Buffer, Reassembler

#: Largest multifd payload accepted: a 1 MiB data buffer plus headers, or a config packet.
MAX_PACKET_BYTES = 16 << 20
#: The two headers in front of a data packet's bytes.
PACKET_HEADERS_BYTES = multifd_wire.DEVICE_STATE_HEADER_SIZE + multifd_wire.VFIO_PACKET_HEADER_SIZE


@attrs.frozen
class Packet:
    """One checked device-state packet, ready to queue."""

    idstr: str
    idx: int
    is_config: bool
    data: Buffer = attrs.field(eq=False)


@attrs.define(eq=False)
class _Device:
    reassembler: Reassembler
    writing: bool = False
    done: bool = False
    config_bytes: int = 0
    #: Rule 4: payload bytes queued and not yet written (the config never leaves).
    qemu_queued: int = 0
    #: Rule 5: DEV_CONFIG_LOAD_READY arrived.
    load_ready: bool = False


class MultifdIntake:
    """The destination's multifd channels and device queues (see the module docstring).

    ``multifd`` False means this side does not do multifd device transfer:
    channels may still connect (``channels`` > 0), but any packet is refused.
    ``per_device_max`` selects QEMU's bound (Rule 4) instead of the shared
    budget; ``max_queued_bytes`` then plays no part.
    """

    def __init__(
        self,
        idstrs: Iterable[str],
        *,
        channels: int,
        uuid: bytes,
        max_queued_bytes: int,
        multifd: bool = True,
        max_packet_bytes: int = MAX_PACKET_BYTES,
        per_device_max: int | None = None,
        load_config_after_iter: bool = False,
    ) -> None:
        self.load_config_after_iter = load_config_after_iter
        if per_device_max is not None and per_device_max < 0:
            raise ValueError(f"per-device queue bound {per_device_max} is negative")
        self.per_device_max = per_device_max
        self.channels = channels
        self.uuid = uuid
        self.max_queued_bytes = max_queued_bytes
        self.max_packet_bytes = max_packet_bytes
        self.multifd = multifd
        self._idstrs = list(idstrs)
        self._devs: dict[str, _Device] = {}
        # Each reassembler's own bound: Rule 1's budget plus one let-through
        # packet, or (Rule 4) QEMU's bound, checked here first, plus the packet
        # that crosses it.
        hard = (max_queued_bytes if per_device_max is None else per_device_max) + max_packet_bytes
        if multifd:
            for idstr in self._idstrs:
                self._devs[idstr] = _Device(Reassembler(idstr, max_queued_bytes=hard))
        self._channel_ids: set[int] = set()
        self._live_channels = 0
        self._blocked: list[Packet] = []
        self._queued_total = 0
        self.loads_started = False

    # -- channels -------------------------------------------------------------
    def begin_channel(self) -> None:
        """A connection sniffed as multifd: refuse it when this side wants none."""
        if self.channels == 0:
            raise RemoteProtocolError(
                "a multifd channel connected but this side has --multifd-channels 0"
            )

    def accept_handshake(self, init: bytes) -> int:
        """Check a channel's MultiFDInit_t; returns its id (each id is accepted once)."""
        channel_id = multifd_wire.decode_init(init, expected_uuid=self.uuid, channels=self.channels)
        if channel_id in self._channel_ids:
            raise RemoteProtocolError(f"multifd channel id {channel_id} connected twice")
        self._channel_ids.add(channel_id)
        self._live_channels += 1
        return channel_id

    def channel_closed(self) -> None:
        """A channel's peer closed it cleanly, between packets."""
        self._live_channels -= 1

    @property
    def all_channels_connected(self) -> bool:
        return len(self._channel_ids) >= self.channels

    @property
    def any_channel_connected(self) -> bool:
        return bool(self._channel_ids)

    @property
    def queued_bytes(self) -> int:
        """Bytes received and not yet written, all devices."""
        return self._queued_total

    # -- packets ----------------------------------------------------------------
    def decode_header(self, header: bytes) -> multifd_wire.DeviceStateHeader:
        """Check a 276-byte packet header; its payload size is within the bound."""
        return multifd_wire.decode_device_state_header(header, max_payload=self.max_packet_bytes)

    def decode_packet(self, hdr: multifd_wire.DeviceStateHeader, payload: Buffer) -> Packet:
        """Check a packet's device and VFIO header; nothing is queued yet."""
        if hdr.idstr not in self._idstrs or hdr.instance_id != 0:
            raise RemoteProtocolError(
                f"Unknown idstr {hdr.idstr} or instance id {hdr.instance_id} for load state buffer"
            )
        if not self.multifd:
            raise RemoteProtocolError(
                "got device state packet but not doing multifd transfer", device=hdr.idstr
            )
        packet = multifd_wire.decode_vfio_packet(payload)
        return Packet(hdr.idstr, packet.idx, packet.is_config, packet.data)

    def fits(self, packet: Packet) -> bool:
        """Whether ``packet`` may be queued now (Rule 1); if not, the channel waits.

        Under QEMU's bound (Rule 4) every packet may: nothing waits.
        """
        if packet.is_config or self.per_device_max is not None:
            return True
        r = self._dev(packet.idstr).reassembler
        return (
            packet.idx == r.waiting_for
            or self._queued_total + len(packet.data) <= self.max_queued_bytes
        )

    def block(self, packet: Packet) -> None:
        """A channel starts waiting for budget to queue ``packet``; raises if it never will.

        Call :meth:`unblock` once the wait ends (also when it is cancelled).
        """
        self._blocked.append(packet)
        if self._stuck():
            self._blocked.remove(packet)
            r = self._dev(packet.idstr).reassembler
            raise ReassemblyError(
                f"queuing state buffer {packet.idx} would exceed the size max of "
                f"{self.max_queued_bytes} (every channel is blocked, buffer "
                f"{r.waiting_for} never arrived)",
                device=packet.idstr,
            )

    def unblock(self, packet: Packet) -> None:
        """The wait that :meth:`block` began for ``packet`` ended."""
        self._blocked.remove(packet)

    def push(self, packet: Packet) -> None:
        """Queue ``packet`` in its device's reassembler (duplicates etc. raise there).

        Raises:
            ReassemblyError: under QEMU's bound (Rule 4), the packet takes its
                device over it; nothing is queued then.
        """
        dev = self._dev(packet.idstr)
        limit = self.per_device_max
        if limit is not None and dev.qemu_queued + len(packet.data) > limit:
            raise ReassemblyError(
                f"queuing state buffer {packet.idx} would exceed the size max of {limit}",
                device=packet.idstr,
            )
        dev.reassembler.push(packet.idx, packet.is_config, packet.data)
        dev.qemu_queued += len(packet.data)
        self._queued_total += len(packet.data)

    # -- loading ----------------------------------------------------------------
    def start_loads(self) -> None:
        """MIG_CMD_SWITCHOVER_START: the loaders run from now on."""
        self.loads_started = True

    def pop_ready(self, idstr: str, max_bytes: int | None = None) -> list[Buffer]:
        """The device's next in-order buffers; with any, the device counts as writing."""
        dev = self._dev(idstr)
        ready = dev.reassembler.pop_ready(max_bytes)
        dev.writing = bool(ready)
        return ready

    def written(self, idstr: str, nbytes: int) -> None:
        """The buffers from :meth:`pop_ready` are in the device: their budget is free."""
        dev = self._dev(idstr)
        dev.writing = False
        dev.qemu_queued -= nbytes
        self._queued_total -= nbytes

    def write_failed(self, idstr: str) -> None:
        self._dev(idstr).writing = False

    def take_config(self, idstr: str) -> bytes | None:
        """The device's config blob, once every data buffer before it was written.

        Raises:
            FramingError: the config packet's data is not
                ``[DEV_CONFIG_STATE][be32 n][config][EOS]``.
        """
        dev = self._dev(idstr)
        raw = dev.reassembler.config
        if raw is None or self.awaiting_load_ready(idstr):
            return None
        dev.config_bytes = len(raw)
        try:
            return multifd_wire.decode_config_packet_data(
                raw, max_config_bytes=self.max_packet_bytes
            )
        except RemoteProtocolError as exc:
            raise exc.with_context(device=idstr) from None

    def config_load_ready(self, idstr: str) -> None:
        """DEV_CONFIG_LOAD_READY for ``idstr`` came on the main channel (Rule 5)."""
        self._dev(idstr).load_ready = True

    def awaiting_load_ready(self, idstr: str) -> bool:
        """The config is due but waits for DEV_CONFIG_LOAD_READY (Rule 5)."""
        dev = self._dev(idstr)
        return (
            self.load_config_after_iter
            and not dev.load_ready
            and dev.reassembler.config is not None
        )

    def config_loaded(self, idstr: str) -> None:
        """The config is in the device: it is done and its budget is free."""
        dev = self._dev(idstr)
        dev.done = True
        self._queued_total -= dev.config_bytes

    def done(self, idstr: str) -> bool:
        dev = self._devs.get(idstr)
        return dev is not None and dev.done

    def waiting_for(self, idstr: str) -> int:
        return self._dev(idstr).reassembler.waiting_for

    def check_progress(self, idstr: str) -> None:
        """Raise if the device's loader, having nothing to write, can never get more."""
        r = self._dev(idstr).reassembler
        if self._live_channels <= 0 and self._channel_ids:
            raise ChannelBrokenError(
                f"multifd channels closed before state buffer {r.waiting_for} arrived"
            )
        if self._stuck():
            raise ReassemblyError(
                f"queuing state buffer {r.waiting_for} would exceed the size max of "
                f"{self.max_queued_bytes} (every channel is blocked, buffer "
                f"{r.waiting_for} never arrived)",
                device=idstr,
            )

    def _stuck(self) -> bool:
        """Every channel waits for budget and no loader can free any (Rule 2)."""
        blocked = self._blocked
        if not self.loads_started or not blocked or len(blocked) < self._live_channels:
            return False
        if any(self.fits(p) for p in blocked):
            return False
        for dev in self._devs.values():
            if dev.done:
                continue
            if dev.writing or dev.reassembler.has_ready:
                return False
        return True

    def _dev(self, idstr: str) -> _Device:
        try:
            return self._devs[idstr]
        except KeyError:
            raise ValueError(f"{idstr!r} is not a multifd device of this intake") from None


@attrs.frozen
class PacketLayout:
    """Where a data packet sits in its buffer: headers end where the data starts.

    The data starts at ``data_offset`` (one page in), so a read into it is
    page-aligned; the two headers go just before it.
    """

    data_offset: int
    buf_size: int

    def __attrs_post_init__(self) -> None:
        if self.data_offset < PACKET_HEADERS_BYTES:
            raise ValueError(f"data offset {self.data_offset} leaves no room for the headers")

    @property
    def buffer_bytes(self) -> int:
        return self.data_offset + self.buf_size

    @property
    def head(self) -> int:
        return self.data_offset - PACKET_HEADERS_BYTES

    def frame(self, n: int) -> slice:
        """The packet's bytes in the buffer once ``n`` data bytes were read."""
        return slice(self.head, self.data_offset + n)


class PacketPlanner:
    """One device's stop-copy packets: data packets 0, 1, 2, ..., then the config."""

    def __init__(self, idstr: str, layout: PacketLayout) -> None:
        self.idstr = idstr
        self.layout = layout
        self.next_idx = 0
        self.finished = False

    def data_headers(self, n: int) -> bytes:
        """The headers of the next data packet of ``n`` bytes (goes at ``layout.head``)."""
        if self.finished:
            raise ValueError("the config packet was already planned")
        if not 0 < n <= self.layout.buf_size:
            raise ValueError(f"data packet of {n} bytes (buffer is {self.layout.buf_size})")
        out = multifd_wire.encode_packet_headers(self.idstr, self.next_idx, 0, n)
        self.next_idx += 1
        return out

    def config_packet(self, config: bytes) -> bytes:
        """The config packet for a device whose config space is ``config`` (the last one).

        The packet carries QEMU's blob for it (``_wire.pci_config.encode_qemu_config``).
        """
        return self.config_packet_blob(encode_qemu_config(config))

    def config_packet_blob(self, blob: bytes) -> bytes:
        """The whole config packet (headers and data) carrying QEMU's config ``blob``."""
        if self.finished:
            raise ValueError("the config packet was already planned")
        self.finished = True
        data = multifd_wire.encode_config_packet_data(blob)
        return (
            multifd_wire.encode_packet_headers(
                self.idstr, self.next_idx, multifd_wire.VFIO_DEVICE_STATE_CONFIG_STATE, len(data)
            )
            + data
        )
