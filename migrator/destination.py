"""The destination side: QEMU's incoming migration for VFIO devices.

Theory of operation
-------------------
``load setup``  every device goes to RESUMING (a write-only data_fd).
``load``        the main stream is decoded and checked by the sans-IO
                :class:`migrator._protocol.main.DestinationProtocol` (sections,
                markers, switchover-ack accounting, the UUID; this module acts on
                its events);
                DATA blocks are written to the device in stream order;
                INIT_DATA_SENT counts down the pre-copy devices and, at zero,
                SWITCHOVER_ACK goes back on the return path; the config blob is
                written when it arrives (non-multifd). In multifd mode the
                device-state packets of every channel are routed by idstr into a
                per-device reassembler (in the intake); at MIG_CMD_SWITCHOVER_START one
                load task per device starts writing buffers strictly in idx
                order, and loads the config packet last.
``start``       after QEMU_VM_EOF and once every load task finished, P2P devices
                all go to RUNNING_P2P first, then every device to RUNNING; the
                status goes back as MIG_RP_MSG_SHUT(0).

Rule 1: the bytes queued but not yet written are bounded by
        ``max_queued_bytes`` over all devices: a receiver holding a packet that
        does not fit waits (backpressure) unless it is the packet the loader
        needs next; if every channel is stuck that way while the loaders
        starve, the bound is really exceeded and the migration fails. The
        budget, the handshake and packet checks are the pure
        :class:`migrator._protocol.multifd.MultifdIntake`; this module only
        moves bytes and waits where the intake says so.
        With ``max_queued_buffers_size`` (QEMU 10.1's
        ``x-migration-max-queued-buffers-size``) the bound is QEMU's instead:
        per device, no backpressure, and the packet that takes a device over
        it fails the migration at once with QEMU's message (the intake's
        Rule 4).
Rule 2: any failure resets every destination device and reports SHUT(1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from migrator import _wire as framing
from migrator._multifd_load import (
    POOL_BUFFER_BYTES as POOL_BUFFER_BYTES,
)
from migrator._multifd_load import (
    WRITE_BATCH_BYTES,
    Dev,
    MultifdLoad,
)
from migrator._protocol import events as ev
from migrator._protocol.events import NEED_DATA
from migrator._protocol.main import DestinationProtocol, DestinationSettings, Phase
from migrator._protocol.multifd import MultifdIntake
from migrator._wire import Marker
from migrator.backend import DeviceBackend
from migrator.config import DATA_BUFFER_BYTES, MigrationConfig
from migrator.errors import (
    ChannelBrokenError,
    ConfigurationError,
    MigrationError,
)
from migrator.stats import Progress, Stats
from migrator.transport import call
from vfio_uapi.fsm import MigFlags, State

logger = logging.getLogger(__name__)


class Destination:
    """One incoming migration."""

    def __init__(
        self,
        config: MigrationConfig,
        devices: Sequence[DeviceBackend],
        *,
        is_file: bool = False,
        progress: Progress | None = None,
        max_queued_buffers_size: int | None = None,
        load_config_after_iter: bool = False,
    ) -> None:
        """``max_queued_buffers_size``: QEMU's per-device bound instead of ours (Rule 1).

        ``load_config_after_iter``: QEMU 10.1's ``x-migration-load-config-after-iter``
        (off, as QEMU resolves it on x86): in multifd mode each device's config
        is loaded after its DEV_CONFIG_LOAD_READY, i.e. once the main stream
        reached the non-iterable sections. Both sides must agree.
        """
        self.load_config_after_iter = load_config_after_iter
        self.config = config
        self.is_file = is_file
        self.devs = [Dev(backend=b) for b in devices]
        self.by_idstr = {d.idstr: d for d in self.devs}
        if len(self.by_idstr) != len(self.devs):
            raise ConfigurationError("two destination devices have the same id", phase="setup")
        self.multifd = config.multifd_for(is_file=is_file)
        for dev in self.devs:
            dev.multifd = self.multifd
        self.intake = MultifdIntake(
            self.by_idstr,
            channels=config.multifd_channels,
            uuid=config.uuid,
            max_queued_bytes=config.max_queued_bytes,
            multifd=self.multifd,
            per_device_max=max_queued_buffers_size,
            load_config_after_iter=load_config_after_iter,
        )
        self.stats = Stats()
        self.progress = progress or Progress(enabled=False)
        self.phase = "load setup"
        self._main: trio.abc.Stream | None = None
        self._rp = False
        self._proto: DestinationProtocol | None = None
        self._rp_lock = trio.Lock()
        self._load_nursery: trio.Nursery | None = None
        self._run_nursery: trio.Nursery | None = None
        self._touched = False
        self._last_activity = 0.0
        self._first_error: MigrationError | None = None
        self._multifd = MultifdLoad(
            config,
            self.devs,
            self.by_idstr,
            self.intake,
            self.stats,
            touch=self._touch,
            note_failure=self._note_failure,
        )

    # -- entry points ---------------------------------------------------------
    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> Stats:
        """Accept one migration (main + multifd channels) on ``listeners``, load it.

        Each connection is told apart by its first bytes (main channel or
        multifd). The listeners are closed once every channel arrived, and in
        any case when this returns.
        """
        main_ch_send, main_ch_recv = trio.open_memory_channel[tuple[trio.abc.Stream, bytes]](1)
        try:
            async with trio.open_nursery() as nursery:
                self._load_nursery = nursery
                nursery.start_soon(
                    self._multifd.accept, listeners, main_ch_send, lambda: self.phase
                )
                task_status.started()
                stream, first = await main_ch_recv.receive()
                stats = await self.run(stream, first)
                nursery.cancel_scope.cancel()
                return stats
        except BaseExceptionGroup:
            # Tasks that fail while the first failure is being handled report
            # consequences (a reset device, a cancelled peer); the first one is
            # what went wrong.
            if self._first_error is not None:
                raise self._first_error from None
            raise
        finally:
            with trio.CancelScope(shield=True):
                for listener in listeners:
                    await listener.aclose()

    async def run(self, main: trio.abc.Stream, first: bytes = b"") -> Stats:
        """Load one migration from the main stream (channels arrive via ``serve``)."""
        self._main = main
        self.stats.start(trio.current_time())
        try:
            async with trio.open_nursery() as nursery:
                self._run_nursery = nursery
                if self._load_nursery is None:
                    self._load_nursery = nursery
                self._touch()
                nursery.start_soon(self._watchdog)
                await self._load(main, first)
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            cause = self._note_failure(exc)
            with trio.CancelScope(shield=True):
                # The load tasks live in serve()'s nursery: stop them before the
                # reset, or they write into the reset device and their EBADF
                # hides the real error.
                if self._multifd.loads_scope is not None:
                    self._multifd.loads_scope.cancel()
                    await self._multifd.loads_done.wait()
                for dev in self.devs if self._touched else ():
                    try:
                        await call("recovery", dev, dev.backend.reset)
                    except MigrationError as err:
                        logger.error("reset failed: %s", err)
                await self._send_shut(1)
            if cause is not None and not cause.phase:
                cause.phase = self.phase
            raise
        self.stats.finish(trio.current_time(), "completed")
        return self.stats

    def _touch(self) -> None:
        """Progress happened: bytes arrived or a device write finished."""
        self._last_activity = trio.current_time()

    async def _watchdog(self) -> None:
        """A source that stays connected but sends nothing must not hang us forever."""
        limit = self.config.peer_timeout_s
        while True:
            await trio.sleep(min(1.0, limit / 4))
            idle = trio.current_time() - self._last_activity
            if idle > limit:
                waiting = self._proto.awaiting_init_data() if self._proto is not None else []
                hint = (
                    f"; the switchover-ack still waits for INIT_DATA_SENT of {', '.join(waiting)}"
                    " (PRE_COPY devices here): a source device without PRE_COPY, or one not"
                    " RUNNING (nothing to pre-copy), never sends it; give both sides devices"
                    " with the same migration flags and a running source"
                    if waiting
                    else ""
                )
                raise ChannelBrokenError(
                    f"no data from the source for {idle:.0f} s (--peer-timeout {limit:g}){hint}"
                )

    # -- main stream -------------------------------------------------------------
    async def _receive(self, proto: DestinationProtocol, main: trio.abc.Stream, n: int) -> None:
        try:
            data = await main.receive_some(n)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ChannelBrokenError(f"main channel broke: {exc}") from exc
        self._touch()
        # Every byte that arrived counts, the file header too: the source counts
        # every byte it sends, so both sides report the same transferred_bytes.
        self.stats.transferred_bytes += len(data)
        proto.receive_data(data)

    async def _preamble(self, proto: DestinationProtocol, main: trio.abc.Stream) -> None:
        """Read the file header (and the configuration, required with --uuid) first."""
        need_uuid = self.config.uuid != bytes(16)
        while True:
            event = proto.next_event()
            if event is NEED_DATA:
                await self._receive(proto, main, 1 << 16)
            elif isinstance(event, ev.Configuration) or not need_uuid:
                return

    async def _load(self, main: trio.abc.Stream, first: bytes) -> None:
        # QEMU's config blob has no length: size it from each local device.
        sizes = {}
        for dev in self.devs:
            layout = await call(self.phase, dev, dev.backend.config_layout)
            sizes[dev.idstr] = layout.blob_size
        settings = DestinationSettings(
            idstrs=list(self.by_idstr),
            uuid=self.config.uuid,
            switchover_ack=self.config.switchover_ack,
            multifd=self.multifd,
            config_sizes=sizes,
            load_config_after_iter=self.load_config_after_iter,
            switchover_ack_legacy=self.config.qemu_compat.switchover_ack_legacy,
        )
        proto = DestinationProtocol(settings, max_data_chunk=WRITE_BATCH_BYTES)
        self._proto = proto
        if first:  # bytes the caller read to tell a file's format: they arrived too
            self.stats.transferred_bytes += len(first)
            proto.receive_data(first)
        await self._preamble(proto, main)
        self._touched = True
        for dev in self.devs:
            dev.flags = await call(self.phase, dev, dev.backend.migration_flags)
            await call(self.phase, dev, dev.backend.set_state, State.RESUMING)
            self.stats.device(dev.idstr)
        proto.devices_ready([d.idstr for d in self.devs if d.flags & MigFlags.PRE_COPY])
        # The destination's set-up: from the first byte to every device RESUMING.
        self.stats.setup_time_ms = (trio.current_time() - self.stats.t_start) * 1000
        self.phase = "load"
        current: Dev | None = None
        #: Which counter the current section's data goes to: PART sections carry
        #: pre-copy data, END sections stop-copy data (QEMU's savevm layout).
        counter = "stopcopy"
        batch: list[bytes] = []
        batch_dev: Dev | None = None
        batch_bytes = 0

        behind = _WriteBehind(self._run_nursery, self._touch)

        async def flush() -> None:
            """Hand the batch to the write-behind (it waits for the previous one)."""
            nonlocal batch, batch_dev, batch_bytes
            if batch and batch_dev is not None:
                pieces, dev = batch, batch_dev
                batch, batch_dev, batch_bytes = [], None, 0
                await behind.submit(dev, pieces)

        while proto.phase is not Phase.DONE:
            event = proto.next_event()
            if event is NEED_DATA:
                await flush()
                await self._receive(proto, main, 1 << 20)
                continue
            if isinstance(event, ev.DataHeader):
                continue  # its DataChunks follow: the batch goes on
            if isinstance(event, ev.DataChunk):
                if batch_dev is not current:
                    await flush()
                batch_dev = current
                batch.append(bytes(event.data))  # decoded chunks are bytes: no copy
                batch_bytes += len(event.data)
                if current is not None:
                    counters = self.stats.device(current.idstr)
                    if counter == "precopy":
                        counters.precopy_bytes += len(event.data)
                    else:
                        counters.stopcopy_bytes += len(event.data)
                if batch_bytes >= WRITE_BATCH_BYTES:
                    await flush()
                continue
            await flush()
            await behind.drain()  # every other event comes after the data before it
            match event:
                case ev.OpenReturnPath():
                    self._rp = not self.is_file
                case ev.Ping():
                    if self._rp:
                        await self._send_rp(proto.send(ev.Pong(event.value)))
                case ev.SwitchoverStart():
                    if self.multifd:
                        await self._multifd.start_loads(self._load_nursery)
                case ev.SectionStart() | ev.SectionFull() | ev.SectionPart() | ev.SectionEnd():
                    current = self.by_idstr[proto.idstr_of(event.section_id)]
                    counter = "precopy" if isinstance(event, ev.SectionPart) else "stopcopy"
                case ev.ConfigBlob():
                    assert current is not None
                    self.stats.device(current.idstr).config_bytes += len(event.data)
                    await call("config", current, current.backend.write_config, event.data)
                case ev.MarkerEvent(marker=Marker.DEV_CONFIG_LOAD_READY):
                    assert current is not None
                    self.intake.config_load_ready(current.idstr)
                    current.changed.notify()
                case ev.SectionFooter():
                    current = None
                case _:
                    pass
            while proto.ack_due and self._rp:
                await self._send_rp(proto.send(ev.SwitchoverAck()))
        if self.multifd:
            await self._multifd.wait_loads()
        self.phase = "start"
        for dev in self.devs:
            if dev.flags & MigFlags.P2P:
                await call("start", dev, dev.backend.set_state, State.RUNNING_P2P)
        for dev in self.devs:
            await call("start", dev, dev.backend.set_state, State.RUNNING)
        await self._send_shut(0)

    async def _send_rp(self, message: bytes) -> None:
        if not self._rp or self._main is None:
            return
        async with self._rp_lock:
            try:
                await self._main.send_all(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ChannelBrokenError(f"return path broke: {exc}") from exc

    async def _send_shut(self, status: int) -> None:
        # Encoded directly, not through the protocol: the failure verdict goes
        # out even after a protocol error left the protocol in ERROR.
        try:
            await self._send_rp(framing.encode_rp_shut(status))
        except ChannelBrokenError as exc:
            if status == 0:
                raise
            logger.debug("could not report failure: %s", exc)
            return
        if status and self._rp and self._main is not None:
            # Keep reading (and dropping) for a moment, so the source reads our
            # verdict before it runs into a reset connection.
            with trio.move_on_after(1.0):
                try:
                    while await self._main.receive_some(1 << 16):
                        pass
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    def _note_failure(self, exc: BaseException) -> MigrationError | None:
        """Remember the first failure; returns the MigrationError inside ``exc``, if any."""
        while isinstance(exc, BaseExceptionGroup):
            inner = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
            if not inner:
                return None
            exc = next((e for e in inner if isinstance(e, MigrationError)), inner[0])
        if not isinstance(exc, MigrationError):
            return None
        if self._first_error is None:
            self._first_error = exc
        return exc


class _WriteBehind:
    """Main-channel DATA written to the device in a worker thread while the next arrives.

    One batch (at most ``WRITE_BATCH_BYTES`` plus one chunk) is written at a
    time and batches are written in order: :meth:`submit` waits for the
    previous one first. :meth:`drain` waits for the last; the load loop calls
    it before every event that is not DATA (config, markers, EOF, a PING's
    answer), so each of those still comes after the data before it. A write
    error fails the write task, which fails ``nursery`` (:meth:`Destination.run`'s
    own), as an error in the load loop would.
    """

    def __init__(self, nursery: trio.Nursery | None, touch: Callable[[], None]) -> None:
        if nursery is None:
            raise ValueError("the write-behind needs Destination.run()'s nursery")
        self._nursery = nursery
        self._touch = touch
        self._done: trio.Event | None = None

    async def submit(self, dev: Dev, pieces: list[bytes]) -> None:
        await self.drain()
        done = self._done = trio.Event()
        self._nursery.start_soon(self._write, dev, pieces, done)

    async def drain(self) -> None:
        if self._done is not None:
            await self._done.wait()
            self._done = None

    async def _write(self, dev: Dev, pieces: list[bytes], done: trio.Event) -> None:
        def write_all() -> None:
            for piece in pieces:
                dev.backend.write_data(memoryview(piece))

        await call("load", dev, write_all)
        self._touch()
        done.set()


__all__ = ["DATA_BUFFER_BYTES", "Destination"]
