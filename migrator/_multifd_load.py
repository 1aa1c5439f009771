"""The destination's multifd channels and per-device load tasks.

:class:`MultifdLoad` is the trio side of the multifd intake
(:class:`migrator._protocol.multifd.MultifdIntake`): it tells each accepted
connection apart (main channel or multifd), reads each multifd channel's
packets into the receive :class:`migrator.transport.BufferPool`, queues them
within the shared budget (waiting for room: backpressure), and, from
MIG_CMD_SWITCHOVER_START on, runs one load task per device that writes buffers
strictly in idx order and the config packet last (QEMU's
vfio_load_bufs_thread; with x-migration-load-config-after-iter, only once the
device's DEV_CONFIG_LOAD_READY came on the main channel).
:class:`migrator.destination.Destination` owns it, and :class:`Dev`, the
destination's per-device record, lives here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import TypeVar

import attrs
import trio

from migrator import multifd_wire
from migrator._protocol.multifd import MultifdIntake, Packet
from migrator.backend import DeviceBackend
from migrator.config import DATA_BUFFER_BYTES, MigrationConfig
from migrator.errors import ChannelBrokenError, FramingError, MigrationError
from migrator.reassembly import Buffer
from migrator.stats import Stats
from migrator.transport import BufferPool, Notifier, StreamReader, call, serve_connections
from vfio_uapi.fsm import MigFlags

T = TypeVar("T")

WRITE_BATCH_BYTES = 1 << 20
#: What one load-task write (a writev, one worker-thread hop) takes from the
#: queue: the hop cost as much as a quarter of the destination's Python time
#: at one per 1 MiB buffer (py-spy --gil, multifd 2). The bytes stay within the
#: queue budget until written.
MULTIFD_WRITE_BATCH_BYTES = 4 << 20
#: Receive buffers hold one full data packet payload (12-byte header + 1 MiB).
POOL_BUFFER_BYTES = 12 + DATA_BUFFER_BYTES


@attrs.define(eq=False)
class Dev:
    backend: DeviceBackend
    flags: MigFlags = MigFlags.STOP_COPY
    multifd: bool = False
    seen: bool = False
    changed: Notifier = attrs.field(factory=Notifier)

    @property
    def idstr(self) -> str:
        return self.backend.idstr


@attrs.define(eq=False)
class MultifdLoad:
    """The multifd channels and load tasks of one incoming migration."""

    config: MigrationConfig
    devs: list[Dev]
    by_idstr: dict[str, Dev]
    intake: MultifdIntake
    stats: Stats
    #: Called when progress happened (bytes arrived or a device write finished).
    touch: Callable[[], None]
    #: Remembers the first failure; returns the MigrationError inside, if any.
    note_failure: Callable[[BaseException], MigrationError | None]
    rx_pool: BufferPool = attrs.field(factory=lambda: BufferPool(POOL_BUFFER_BYTES))
    space: Notifier = attrs.field(factory=Notifier)
    have_main: bool = False
    accepting: trio.CancelScope | None = None
    loads_started: bool = False
    loads_scope: trio.CancelScope | None = None
    loads_done: trio.Event = attrs.field(factory=trio.Event)

    async def accept(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        main_out: trio.MemorySendChannel[tuple[trio.abc.Stream, bytes]],
        phase: Callable[[], str],
    ) -> None:
        """Accept the main connection and the multifd channels, each sniffed in its own task.

        A connection that sends nothing only holds up itself (until
        ``--peer-timeout``), never the real source's connections. Once the main
        channel and every multifd channel arrived, the listeners close: one
        migration, then no more connections.
        """
        self.accepting = trio.CancelScope()
        try:
            await serve_connections(listeners, partial(self.route, main_out), self.accepting)
        except BaseException as exc:
            # (A handshake error arrives wrapped in the inner nursery's group.)
            cause = self.note_failure(exc)
            if cause is not None:
                cause.with_context(phase=phase())
            raise

    async def route(
        self,
        main_out: trio.MemorySendChannel[tuple[trio.abc.Stream, bytes]],
        stream: trio.abc.Stream,
    ) -> None:
        sniffer = StreamReader(stream)
        with trio.move_on_after(self.config.peer_timeout_s) as scope:
            first = await sniffer.receive_exactly(4, "the first bytes of a connection")
        if scope.cancelled_caught or first is None:
            await stream.aclose()
            return
        kind = multifd_wire.sniff_channel(first)
        if kind == "main":
            if self.have_main:
                await stream.aclose()
                return
            self.have_main = True
            self.check_all_connected()
            await main_out.send((stream, first + sniffer.take_buffered()))
            return
        self.intake.begin_channel()
        reader = StreamReader(stream, first + sniffer.take_buffered())
        init = await reader.receive_exactly(multifd_wire.INIT_SIZE, "the multifd handshake")
        if init is None:
            raise FramingError("multifd channel closed during its handshake")
        channel_id = self.intake.accept_handshake(init)
        self.check_all_connected()
        await self._receive_channel(reader, channel_id)

    def check_all_connected(self) -> None:
        complete = self.have_main and self.intake.all_channels_connected
        if complete and self.accepting is not None:
            self.accepting.cancel()

    async def _receive_channel(self, reader: StreamReader, channel_id: int) -> None:
        closed_by_peer = False
        try:
            while True:
                header = await reader.receive_exactly(
                    multifd_wire.DEVICE_STATE_HEADER_SIZE, "a multifd packet header"
                )
                if header is None:
                    closed_by_peer = True
                    return
                hdr = self.intake.decode_header(header)
                payload = await reader.receive_payload(
                    hdr.size, "a multifd packet payload", self.rx_pool
                )
                self.touch()
                self.stats.transferred_bytes += len(header) + len(payload)
                packet = self.intake.decode_packet(hdr, payload)
                if not packet.is_config:  # the config blob is counted once decoded
                    self.stats.device(packet.idstr).stopcopy_bytes += len(packet.data)
                await self._queue(packet)
        except MigrationError as exc:
            self.note_failure(exc)
            raise exc.with_context(phase="load") from None
        finally:
            # Only a clean close by the peer counts: a channel that failed (or was
            # cancelled because another one failed) must not make the loaders
            # report "channels closed" instead of the real error.
            if closed_by_peer:
                self.intake.channel_closed()
                for dev in self.devs:
                    dev.changed.notify()
                self.space.notify()

    async def _queue(self, packet: Packet) -> None:
        """Queue a packet within the shared budget, waiting for room, then wake its loader."""
        while not self.intake.fits(packet):
            self.intake.block(packet)
            try:
                await self.space.wait()
            finally:
                self.intake.unblock(packet)
        self.intake.push(packet)
        self.by_idstr[packet.idstr].changed.notify()

    async def start_loads(self, nursery: trio.Nursery | None) -> None:
        if self.loads_started:
            return
        self.loads_started = True
        self.intake.start_loads()
        assert nursery is not None
        await nursery.start(self._run_loads)

    async def _run_loads(self, *, task_status: trio.TaskStatus[None]) -> None:
        """One load task per device, under a cancel scope the failure path can cancel."""
        try:
            with trio.CancelScope() as scope:
                self.loads_scope = scope
                async with trio.open_nursery() as nursery:
                    for dev in self.devs:
                        nursery.start_soon(self._load_device, dev)
                    task_status.started()
        finally:
            self.loads_done.set()

    async def _load_device(self, dev: Dev) -> None:
        """QEMU's vfio_load_bufs_thread: write buffers in idx order, config last."""
        intake = self.intake
        try:
            while True:
                ready = intake.pop_ready(dev.idstr, MULTIFD_WRITE_BATCH_BYTES)
                if ready:
                    size = sum(len(b) for b in ready)

                    def write_all(buffers: list[Buffer] = ready) -> None:
                        dev.backend.write_data_many([memoryview(buf) for buf in buffers])

                    try:
                        await call("load", dev, write_all)
                    except BaseException:
                        intake.write_failed(dev.idstr)
                        raise
                    self.rx_pool.give_back(ready)
                    intake.written(dev.idstr, size)
                    self.space.notify()
                    self.touch()
                    continue
                config = intake.take_config(dev.idstr)
                if config is not None:
                    self.stats.device(dev.idstr).config_bytes += len(config)
                    await call("config", dev, dev.backend.write_config, config)
                    intake.config_loaded(dev.idstr)
                    self.space.notify()
                    dev.changed.notify()
                    return
                if not intake.awaiting_load_ready(dev.idstr):
                    intake.check_progress(dev.idstr)
                await dev.changed.wait()
        except MigrationError as exc:
            self.note_failure(exc)
            raise exc.with_context(phase="load", device=dev.idstr) from None

    async def wait_loads(self) -> None:
        deadline = trio.current_time() + self.config.peer_timeout_s
        while not all(self.intake.done(d.idstr) for d in self.devs):
            if not self.intake.any_channel_connected and trio.current_time() > deadline:
                raise ChannelBrokenError(
                    f"no multifd channel connected within {self.config.peer_timeout_s:g} s"
                )
            waiting = next(d for d in self.devs if not self.intake.done(d.idstr))
            with trio.move_on_after(1.0):
                await waiting.changed.wait()
