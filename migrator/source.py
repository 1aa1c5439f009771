"""The source side: what QEMU's migration thread and hw/vfio do for VFIO devices.

Theory of operation
-------------------
Phases, in order (names appear in error messages and ``--json``):

``setup``      file header, MIG_CMD_OPEN_RETURN_PATH (connections only), then
               per device a SECTION_START with ``[SETUP][EOS]``. The data buffer
               is ``min(1 MiB, stop_copy_length)``; pre-copy devices go
               RUNNING -> PRE_COPY.
``pre-copy``   iterations: per active device one SECTION_PART with at most one
               read of the buffer size (ENOMSG and 0 mean "nothing now"), then
               INIT_DATA_SENT once the initial bytes are gone (switchover-ack) or
               EOS. Switch over when every pre-copy device's initial data was
               acked and the pending bytes fit bandwidth x downtime-limit, or
               when the iteration/time bound is reached (once acked). Without
               pre-copy devices nothing iterates, but with switchover-ack the
               source still waits for the destination's SWITCHOVER_ACK, as
               QEMU's ``migration_can_switchover`` does (QEMU 10.0 and later).
``stop``       the VM stops: P2P devices all go to *_P2P first, then each device
               to STOP_COPY (pre-copy devices) or STOP; MIG_CMD_SWITCHOVER_START.
``stop-copy``  multifd: one save task per device is started first (it moves the
               device to STOP_COPY, reads chunks into VFIO device-state packets
               with consecutive idx and queues them to whichever channel is
               idle, then the config packet); then every device's SECTION_END
               carries a lone EOS. Without multifd: SECTION_END carries the data
               blocks until a read returns 0, then EOS.
``config``     SECTION_FULL per device: ``[DEV_CONFIG_STATE][QEMU's config blob][EOS]``
               (multifd: a lone EOS, or with ``load_config_after_iter`` a lone
               DEV_CONFIG_LOAD_READY, as QEMU 10.1's
               x-migration-load-config-after-iter), then QEMU_VM_EOF.
``complete``   wait for the destination's SHUT on the return path; devices go
               STOP_COPY -> STOP and are left there.

Pre-copy info v2 (Linux 7.1): a pre-copy device is opted in to
``VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`` before RUNNING -> PRE_COPY (older
kernels and devices refuse it; nothing changes for them). When a query says
``VFIO_PRECOPY_INFO_REINIT``, the device has new initial data: its cached
initial size restarts from the reported value and dirty from 0 (the uAPI's
words), and the source does not switch over, even when forced by the
iteration or time bound, until that initial data was read again. Before
every switchover decision the opted-in devices are queried once more, so a
re-initialisation right at the end is seen (QEMU 11.1 checks REINIT during
switchover). The stream is unchanged: INIT_DATA_SENT still goes once per
device, so a QEMU 10.x destination loads it.

Rule: any failure returns every source device to RUNNING (reset if that
fails), and the error names the phase and device.
"""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Awaitable, Callable, Sequence

import trio
import trio.lowlevel

from migrator import _wire as framing
from migrator import multifd_wire
from migrator._multifd_send import MultifdSend
from migrator._protocol import events as ev
from migrator._protocol.convergence import Convergence, Decision
from migrator._protocol.main import SourceProtocol
from migrator._protocol.switchover_ack import SourceSwitchoverAck
from migrator._return_path import ReturnPath
from migrator._source_device import (
    Dev,
    aligned,
    filled,
    read_buffers,
    restore_running,
    set_or_reset,
    set_state,
)
from migrator._wire import Marker
from migrator.backend import DeviceBackend
from migrator.config import DATA_BUFFER_BYTES, DEFAULT_MACHINE, MigrationConfig
from migrator.errors import (
    ChannelBrokenError,
    ConfigurationError,
    DeviceOpError,
    MigrationError,
    NoDataNow,
    PeerClosedError,
    RemoteProtocolError,
)
from migrator.stats import Progress, Stats
from migrator.transport import bound_silence, call, send_parts
from vfio_uapi.fsm import PRECOPY_STATES, MigFlags, State

logger = logging.getLogger(__name__)
#: The pause after a pre-copy iteration that had nothing to send.
IDLE_ITERATION_S = 0.005
#: How long the source waits for a SWITCHOVER_ACK before it says why it may never come.
ACK_WAIT_HINT_S = 5.0


def _migration_errors(exc: BaseException) -> list[MigrationError]:
    """The MigrationErrors in ``exc`` (itself or the leaves of an exception group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [e for sub in exc.exceptions for e in _migration_errors(sub)]
    return [exc] if isinstance(exc, MigrationError) else []


class _Sender:
    """Serialised writes on the main channel, with byte counting and rate limit."""

    def __init__(
        self, stream: trio.abc.Stream, stats: Stats, max_bandwidth: int, proto: SourceProtocol
    ) -> None:
        self.stream = stream
        self.proto = proto
        self.stats = stats
        self.max_bandwidth = max_bandwidth
        self._start = trio.current_time()
        self._sent = 0

    async def send(self, *parts: bytes | bytearray | memoryview) -> None:
        try:
            await send_parts(self.stream, parts)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self.proto.send_failed()
            raise ChannelBrokenError(f"main channel broke while sending: {exc}") from exc
        size = sum(len(part) for part in parts)
        self._sent += size
        self.stats.transferred_bytes += size
        if self.max_bandwidth:
            ahead = self._sent / self.max_bandwidth - (trio.current_time() - self._start)
            if ahead > 0:
                await trio.sleep(ahead)

    async def emit(self, *events: ev.MainEvent) -> None:
        """Send ``events`` through the protocol, which checks their order (Rule 1)."""
        await self.send(*[self.proto.send(event) for event in events])


class Source:
    """One outgoing migration."""

    def __init__(
        self,
        config: MigrationConfig,
        devices: Sequence[DeviceBackend],
        main: trio.abc.Stream,
        channels: Sequence[trio.abc.Stream] = (),
        *,
        return_path: bool = True,
        is_file: bool = False,
        progress: Progress | None = None,
        load_config_after_iter: bool = False,
    ) -> None:
        self.config = config
        #: QEMU 10.1's x-migration-load-config-after-iter (off, as on x86).
        self.load_config_after_iter = load_config_after_iter
        self.devs = [Dev(backend=b, section_id=i + 1) for i, b in enumerate(devices)]
        self.main = main
        self.channels = list(channels)
        self.return_path = return_path
        self.is_file = is_file
        self.stats = Stats()
        self.progress = progress or Progress(enabled=False)
        self.phase = "setup"
        #: The main-channel protocol: every main-channel event is sent through it
        #: (so it checks the order) and the return path is read by it.
        self._proto = SourceProtocol()
        legacy = config.qemu_compat.switchover_ack_legacy
        self._rp = ReturnPath(main, self._proto, ack=SourceSwitchoverAck(legacy=legacy))
        #: QEMU 11.1's mechanism is in use: pre-copy devices ask for their ACKs.
        self._ack_requests = return_path and config.switchover_ack and not legacy
        #: Devices opted in to PRECOPY_INFOv2 (by id), and those with re-initialised
        #: initial data not read yet.
        self._precopy_v2: set[int] = set()
        self._reinit_pending: set[int] = set()
        #: How many REINITs each device reported (by idstr).
        self.reinits: dict[str, int] = {}

    # -- public -------------------------------------------------------------
    async def run(self) -> Stats:
        """Migrate; on any failure restore the devices to RUNNING and re-raise."""
        t0 = trio.current_time()
        self.stats.start(t0)
        sender = _Sender(self.main, self.stats, self.config.max_bandwidth, self._proto)
        try:
            async with trio.open_nursery() as nursery:
                if self.return_path:
                    nursery.start_soon(self._rp.read)
                await self._migrate(sender)
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await restore_running(self.devs)
            # The failure may come wrapped in the nursery's exception group.
            for failure in _migration_errors(exc):
                if not failure.phase:
                    failure.phase = self.phase
            raise
        self.stats.finish(trio.current_time(), "completed")
        return self.stats

    # -- phases ---------------------------------------------------------------
    async def _migrate(self, sender: _Sender) -> None:
        cfg = self.config
        multifd = cfg.multifd_for(is_file=self.is_file) and bool(self.channels)
        await self._setup(sender, multifd)
        self.stats.setup_time_ms = (trio.current_time() - self.stats.t_start) * 1000
        self.phase = "pre-copy"
        await self._iterate(sender)
        self.phase = "stop"
        self.stats.mark_stop(trio.current_time())
        await self._stop_devices()
        await sender.emit(ev.SwitchoverStart())
        self.phase = "stop-copy"
        await self._complete(sender)
        self.phase = "config"
        for dev in self.devs:
            sid = dev.section_id
            events: list[ev.MainEvent] = [ev.SectionFull(sid, dev.idstr, 0, 1)]
            if dev.multifd:
                last = (
                    Marker.DEV_CONFIG_LOAD_READY
                    if self.load_config_after_iter
                    else Marker.END_OF_STATE
                )
                events.append(ev.MarkerEvent(sid, last))
            else:
                config = bytes(await call("config", dev, dev.backend.save_config))
                events += [
                    ev.MarkerEvent(sid, Marker.DEV_CONFIG_STATE),
                    ev.ConfigBlob(sid, config),
                    ev.MarkerEvent(sid, Marker.END_OF_STATE),
                ]
                self.stats.device(dev.idstr).config_bytes += len(config)
            events.append(ev.SectionFooter(sid))
            await sender.emit(*events)
        await sender.emit(ev.EndOfFile())
        if self.config.machine != DEFAULT_MACHINE:
            await sender.send(self._proto.send_vm_description(self._vm_description()))
        self.phase = "complete"
        try:
            if isinstance(self.main, trio.abc.HalfCloseableStream) and not self.return_path:
                await self.main.send_eof()
            if not self.return_path and hasattr(self.main, "flush_to_disk"):
                await self.main.flush_to_disk()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ChannelBrokenError(f"finishing the stream failed: {exc}") from exc
        if self.return_path:
            await self._rp.wait_shut(self.phase)
        self.stats.mark_resumed(trio.current_time())
        self.phase = "cleanup"
        for dev in self.devs:
            # QEMU does STOP_COPY -> STOP in save_cleanup, outside the downtime.
            await set_or_reset("cleanup", dev, State.STOP)

    def _vm_description(self) -> bytes:
        """A VM description of our sections (QEMU's destination reads and drops it)."""
        devices = [{"name": dev.idstr, "instance_id": 0, "vmsd_name": "vfio"} for dev in self.devs]
        return json.dumps({"page_size": 4096, "devices": devices}).encode()

    async def _setup(self, sender: _Sender, multifd: bool) -> None:
        proto = self._proto
        await sender.send(proto.send(ev.FileHeader(framing.QEMU_VM_FILE_VERSION)))
        # QEMU always sends its configuration section (qemu_savevm_state_header;
        # its destination requires one), with the migration UUID when there is
        # one: a destination started with --uuid refuses a stream without it.
        uuid = self.config.uuid if self.config.uuid != bytes(16) else None
        await sender.send(proto.send(ev.Configuration(self.config.machine, uuid=uuid)))
        if self.return_path:
            # The protocol knows the return path is open before the bytes go out.
            await sender.send(proto.send(ev.OpenReturnPath()))
            # As QEMU's migration_thread: PING 1 right after OPEN_RETURN_PATH
            # (the destination answers PONG 1 on the return path).
            await sender.send(proto.send(ev.Ping(b"\0\0\0\1")))
        for dev in self.devs:
            dev.flags = await call("setup", dev, dev.backend.migration_flags)
            dev.state = await call("setup", dev, dev.backend.get_state)
            if dev.state not in (State.RUNNING, State.STOP):
                raise MigrationError(
                    f"device is in {dev.state.name}; a source device must be RUNNING",
                    phase="setup",
                    device=dev.idstr,
                )
            dev.multifd = multifd
            try:
                size = int(await call("setup", dev, dev.backend.data_size))
            except DeviceOpError:
                size = DATA_BUFFER_BYTES
            dev.buf_size = min(DATA_BUFFER_BYTES, size)
            if dev.buf_size <= 0:
                raise MigrationError(
                    "Failed to allocate migration data buffer (device reports 0 stop-copy bytes)",
                    phase="setup",
                    device=dev.idstr,
                )
            if dev.precopy and dev.state is State.RUNNING:
                if await call("setup", dev, dev.backend.enable_precopy_v2):
                    self._precopy_v2.add(id(dev))
                await set_state("setup", dev, State.PRE_COPY, recover=State.RUNNING)
                await self._refresh_precopy(dev)
            self.stats.device(dev.idstr)
            sid = dev.section_id
            await sender.emit(
                ev.SectionStart(sid, dev.idstr, 0, 1),
                ev.MarkerEvent(sid, Marker.DEV_SETUP_STATE),
                ev.MarkerEvent(sid, Marker.END_OF_STATE),
                ev.SectionFooter(sid),
            )
        if self._ack_requests:
            # QEMU 11.1: each pre-copy device asks for its ACK when pre-copy starts
            # (its first pending query: "request switchover ack 1"); none asked, none
            # comes: a 11.1 destination sends no ACK at OPEN_RETURN_PATH.
            for dev in self.devs:
                if dev.state in PRECOPY_STATES:
                    self._rp.request_ack(dev.idstr)
            if self._rp.ack.can_switchover:
                self._rp.ack_not_needed()
        elif not self.return_path or not self.config.switchover_ack:
            self._rp.ack_not_needed()

    async def _refresh_precopy(self, dev: Dev) -> None:
        dev.init_size = dev.dirty_size = 0
        try:
            if id(dev) in self._precopy_v2:
                info = await call("pre-copy", dev, dev.backend.precopy_info_v2)
                init, dirty, reinit = info.initial_bytes, info.dirty_bytes, info.reinit
            else:
                init, dirty = await call("pre-copy", dev, dev.backend.precopy_info)
                reinit = False
        except DeviceOpError:
            return
        if reinit:
            # New initial data on the stream: initial restarts, dirty from 0.
            logger.info("%s: pre-copy re-initialised, %d initial bytes", dev.idstr, init)
            self.reinits[dev.idstr] = self.reinits.get(dev.idstr, 0) + 1
            dirty = 0
            if init:
                self._reinit_pending.add(id(dev))
            if self._ack_requests and dev.init_sent:
                # QEMU 11.1: a re-initialisation after INIT_DATA_SENT asks for a new
                # ACK, and INIT_DATA_SENT goes again once the new initial data went.
                dev.init_sent = False
                self._rp.request_ack(dev.idstr)
        dev.init_size, dev.dirty_size = init, dirty
        if not init:
            self._reinit_pending.discard(id(dev))

    async def _reinit_blocks_switchover(self) -> bool:
        """Query the opted-in devices once more; True while re-initialised data is unread."""
        for dev in self.devs:
            if id(dev) in self._precopy_v2 and dev.state in PRECOPY_STATES:
                await self._refresh_precopy(dev)
        return bool(self._reinit_pending)

    async def _iterate(self, sender: _Sender) -> None:
        cfg = self.config
        policy = Convergence(
            downtime_limit_ms=cfg.downtime_limit_ms,
            max_iterations=cfg.max_precopy_iterations,
            time_limit_s=cfg.precopy_time_limit_s,
            start=trio.current_time(),
            window_bytes=self.stats.transferred_bytes,
        )
        buffers = {id(dev): aligned(dev.buf_size) for dev in self.devs if dev.precopy}
        while True:
            active = [d for d in self.devs if d.state in PRECOPY_STATES]
            if not active:
                # Nothing to iterate, yet QEMU's migration_can_switchover still
                # holds the switchover until the destination's SWITCHOVER_ACK
                # (its RAM iterates meanwhile); ours sends nothing while it waits.
                await self._wait_acked()
                return
            if self.phase == "pre-copy":
                self._rp.check(self.phase)
            sent = 0  # device data bytes (each iteration sends its section framing anyway)
            for dev in active:
                sent += await self._iterate_device(sender, dev, buffers[id(dev)])
            self.stats.precopy_iterations += 1
            now = trio.current_time()
            bandwidth = policy.observe(now, self.stats.transferred_bytes)
            pending = sum(d.init_size + d.dirty_size for d in active)
            self.stats.pending_bytes = pending
            self.progress.update(self.phase, self.stats, bandwidth)
            acked = self._rp.acked.is_set()
            exact = policy.wants_exact_size(pending)
            if exact:
                pending = 0
                for dev in self.devs:
                    try:
                        pending += int(await call("pre-copy", dev, dev.backend.data_size))
                    except DeviceOpError:
                        pending += 100 << 30  # QEMU's VFIO_MIG_STOP_COPY_SIZE
                    if dev.state in PRECOPY_STATES:
                        await self._refresh_precopy(dev)
                self.stats.pending_bytes = pending
            idle = not sent and all(
                d.init_size + d.dirty_size == 0 for d in self.devs if d.state in PRECOPY_STATES
            )
            decision = policy.decide(
                now=now,
                iterations=self.stats.precopy_iterations,
                pending=pending,
                exact=exact,
                acked=acked,
                idle=idle,
            )
            if decision is not Decision.CONTINUE and await self._reinit_blocks_switchover():
                decision = Decision.CONTINUE
            if decision is Decision.CONVERGED:
                return
            if decision is Decision.FORCED:
                logger.info("pre-copy bound reached; switching over with %d bytes pending", pending)
                self.stats.forced_switchover = True
                return
            if sent:
                await trio.lowlevel.checkpoint()
            else:  # nothing to send (yet): do not spin on the devices' files
                await trio.sleep(IDLE_ITERATION_S)

    async def _wait_acked(self) -> None:
        """Wait for SWITCHOVER_ACK (set at once without switchover-ack), failing with the
        return path: a destination that failed or went away ends the wait. A long wait
        is named once: a QEMU 11.1 destination on its own machine type acks nothing
        when no device has pre-copy, where QEMU 10.x acks at OPEN_RETURN_PATH."""
        hint_at: float | None = trio.current_time() + ACK_WAIT_HINT_S
        while not self._rp.acked.is_set():
            self._rp.check(self.phase)
            with trio.move_on_after(IDLE_ITERATION_S * 10):
                await self._rp.acked.wait()
            if hint_at is not None and trio.current_time() >= hint_at and self._rp.ack.legacy:
                hint_at = None
                logger.warning(
                    "still waiting for the destination's SWITCHOVER_ACK after %g s with no "
                    "pre-copy device: a QEMU 11.1 destination on its own machine type (q35) "
                    "sends none; use --qemu-compat 11.1 (or --switchover-ack off)",
                    ACK_WAIT_HINT_S,
                )
        self._rp.check(self.phase)

    async def _iterate_device(self, sender: _Sender, dev: Dev, view: memoryview) -> int:
        """One pre-copy section of ``dev``; returns the data bytes it carried."""
        try:
            n = int(await call("pre-copy", dev, dev.backend.read_data, view))
        except NoDataNow:
            n = 0
        sid = dev.section_id
        events: list[ev.MainEvent] = [ev.SectionPart(sid)]
        if n:
            events += [ev.DataHeader(sid, n), ev.DataChunk(sid, view[:n])]
            self.stats.device(dev.idstr).precopy_bytes += n
            taken = min(dev.init_size, n)
            dev.init_size -= taken
            dev.dirty_size = max(0, dev.dirty_size - (n - taken))
        else:
            dev.init_size = dev.dirty_size = 0
        if not dev.init_size:
            self._reinit_pending.discard(id(dev))
        if (
            self.config.switchover_ack
            and self.return_path
            and dev.init_size == 0
            and not dev.init_sent
        ):
            dev.init_sent = True
            events.append(ev.MarkerEvent(sid, Marker.DEV_INIT_DATA_SENT))
        else:
            events.append(ev.MarkerEvent(sid, Marker.END_OF_STATE))
        events.append(ev.SectionFooter(sid))
        await sender.emit(*events)
        return n

    async def _stop_devices(self) -> None:
        for dev in self.devs:
            if dev.flags & MigFlags.P2P:
                target = State.PRE_COPY_P2P if dev.state in PRECOPY_STATES else State.RUNNING_P2P
                await set_state("stop", dev, target, recover=None)
        for dev in self.devs:
            target = State.STOP_COPY if dev.state in PRECOPY_STATES else State.STOP
            await set_state("stop", dev, target, recover=None)

    async def _complete(self, sender: _Sender) -> None:
        multifd = [d for d in self.devs if d.multifd]
        if not multifd:
            for dev in self.devs:
                await self._complete_main(sender, dev)
            return

        async def main_channel() -> None:
            for dev in self.devs:
                if dev.multifd:
                    sid = dev.section_id
                    await sender.emit(
                        ev.SectionEnd(sid),
                        ev.MarkerEvent(sid, Marker.END_OF_STATE),
                        ev.SectionFooter(sid),
                    )
                else:
                    await self._complete_main(sender, dev)

        await MultifdSend(self.channels, self.stats).run(multifd, main_channel)

    async def _complete_main(self, sender: _Sender, dev: Dev) -> None:
        await set_state("stop-copy", dev, State.STOP_COPY, recover=State.STOP)
        sid = dev.section_id
        await sender.emit(ev.SectionEnd(sid))
        counters = self.stats.device(dev.idstr)
        # The device is read one step ahead of the socket (a worker thread reads
        # the next buffers while these are sent): at most three groups of
        # buffers exist, one being read, one queued, one being sent.
        free: list[list[memoryview]] = []
        reads_in, reads = trio.open_memory_channel[tuple[list[memoryview], int]](1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_ahead, dev, reads_in, free)
            async with reads:
                async for bufs, n in reads:
                    events: list[ev.MainEvent] = []
                    for block in filled(bufs, n):
                        events += [ev.DataHeader(sid, len(block)), ev.DataChunk(sid, block)]
                    await sender.emit(*events)
                    counters.stopcopy_bytes += n
                    free.append(bufs)
                    self.progress.update(self.phase, self.stats, 0.0)
        await sender.emit(ev.MarkerEvent(sid, Marker.END_OF_STATE), ev.SectionFooter(sid))


async def _read_ahead(
    dev: Dev,
    out: trio.MemorySendChannel[tuple[list[memoryview], int]],
    free: list[list[memoryview]],
) -> None:
    """Read ``dev``'s stop-copy data until a read returns 0, into buffers from ``free``."""
    async with out:
        while True:
            bufs = free.pop() if free else [aligned(dev.buf_size) for _ in range(read_buffers(dev))]
            n = int(await call("stop-copy", dev, dev.backend.read_data_many, bufs))
            if n == 0:
                return
            await out.send((bufs, n))


async def migrate(
    config: MigrationConfig,
    devices: Sequence[DeviceBackend],
    connect: Callable[[], Awaitable[trio.abc.Stream]],
    *,
    progress: Progress | None = None,
    load_config_after_iter: bool = False,
) -> Stats:
    """Open the main channel and the multifd channels with ``connect``, then migrate.

    Each multifd channel starts with its MultiFDInit_t (channel ids 0..N-1, the
    config's UUID). Every stream opened is closed on return.
    """
    streams: list[trio.abc.Stream] = []
    try:
        try:
            try:
                main = await connect()
                streams.append(main)
                bound_silence(main, config.peer_timeout_s)
                for i in range(config.multifd_channels):
                    channel = await connect()
                    streams.append(channel)
                    bound_silence(channel, config.peer_timeout_s)
                    try:
                        await channel.send_all(multifd_wire.encode_init(config.uuid, i))
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        raise ChannelBrokenError(
                            f"multifd channel {i} broke during its handshake: {exc}"
                        ) from exc
            except MigrationError as exc:
                # (A destination that refused an earlier channel closes its listener.)
                raise exc.with_context(phase="setup") from None
            return await Source(
                config,
                devices,
                main,
                streams[1:],
                progress=progress,
                load_config_after_iter=load_config_after_iter,
            ).run()
        except BaseException as exc:
            # A destination that refuses the stream (a --uuid mismatch, a device it
            # does not have) closes every connection: whichever send or connect of
            # ours runs into that first, the user must learn that the destination
            # ended it, not only which of our sockets noticed.
            failures = _migration_errors(exc)
            broken = [
                f
                for f in failures
                if isinstance(f, (ChannelBrokenError, ConfigurationError, PeerClosedError))
            ]
            verdict = [
                f
                for f in failures
                if isinstance(f, RemoteProtocolError) and not isinstance(f, PeerClosedError)
            ]
            if broken and not verdict and streams:
                closed: bool | None = True  # the return path saw the destination close
                if not any(isinstance(f, PeerClosedError) for f in broken):
                    with trio.CancelScope(shield=True):
                        closed = await _closed_by_peer(streams[0])
                if closed is None or any(_timed_out(f) for f in broken):
                    raise ChannelBrokenError(
                        f"the destination stopped acknowledging for {config.peer_timeout_s:g} s"
                        f" (--peer-timeout {config.peer_timeout_s:g}): the link is down or its"
                        " host is gone",
                        phase=broken[0].phase or "setup",
                    ) from exc
                if closed:
                    raise RemoteProtocolError(
                        "the destination refused or failed the migration and closed the "
                        f"connection ({broken[0].message}); its log says why (e.g. a "
                        "--uuid mismatch or a device it does not have)",
                        phase=broken[0].phase or "setup",
                    ) from exc
            raise
    finally:
        with trio.CancelScope(shield=True):
            for stream in streams:
                await stream.aclose()


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is TCP_USER_TIMEOUT's ETIMEDOUT."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ETIMEDOUT:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _closed_by_peer(main: trio.abc.Stream) -> bool | None:
    """Whether the destination closed the main connection (EOF within a second);
    None when the connection timed out (the peer stopped acknowledging)."""
    with trio.move_on_after(1.0):
        try:
            while True:
                if not await main.receive_some(65536):
                    return True
        except trio.BusyResourceError:
            return False  # the return-path reader still owns the stream: not closed
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            return None if _timed_out(exc) else True
    return False
