"""Source and Destination in one trio run, over memory streams and a memory listener.

No sockets, no FUSE, no subprocess: the engines' channel opening, the
destination's sniffing and handshake checks, multifd fan-out and fan-in, and
the timeouts (under ``autojump_clock``) run in milliseconds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import attrs
import pytest
import trio
import trio.testing

from migrator import _wire as framing
from migrator import multifd_wire
from migrator._wire.pci_config import encode_qemu_config
from migrator.backend import PrecopyInfo
from migrator.config import DATA_BUFFER_BYTES, MigrationConfig
from migrator.destination import Destination
from migrator.errors import (
    ChannelBrokenError,
    FramingError,
    MigrationError,
    NoDataNow,
    ReassemblyError,
)
from migrator.source import _Sender, migrate
from migrator.stats import Stats
from tests.migrator import qemu_reference as ref
from tests.migrator.memory import MemoryDevice, MemoryListener
from vfio_uapi.fsm import MigFlags, State

MIB = 1 << 20
GUARD_S = 20
T = TypeVar("T")


@pytest.fixture(autouse=True)
def inline_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory devices do not block: run their calls inline, not in worker threads.

    This keeps each run deterministic, and lets ``autojump_clock`` jump only
    when every task really waits (a worker thread in flight looks idle to it).
    """

    async def run_sync(fn: Callable[..., T], *args: object) -> T:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


def group_of(exc: type[BaseException], match: str) -> pytest.RaisesGroup[BaseException]:
    """What a test's own nursery raises when the served Destination fails with ``exc``."""
    return pytest.RaisesGroup(pytest.RaisesExc(exc, match=match))


def pair(
    name: str, size: int, *, flags: MigFlags = MigFlags.STOP_COPY
) -> tuple[MemoryDevice, MemoryDevice]:
    pattern = bytes((i * 7 + len(name)) % 251 for i in range(251))
    state = (pattern * (size // 251 + 1))[:size]
    src = MemoryDevice(name, state, config=name.encode()[:8] * 3, flags=flags)
    return src, MemoryDevice(name, flags=flags)


def config(channels: int, **kw: object) -> MigrationConfig:
    return MigrationConfig(
        multifd_channels=channels,
        max_precopy_iterations=3,
        **kw,  # type: ignore[arg-type]
    )


async def run_both(
    cfg: MigrationConfig, src: list[MemoryDevice], dst: list[MemoryDevice]
) -> tuple[Stats, Stats, MemoryListener]:
    listener = MemoryListener()
    dest = Destination(cfg, dst)
    out: dict[str, Stats] = {}

    async def serve() -> None:
        out["dest"] = await dest.serve([listener])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        out["src"] = await migrate(cfg, src, listener.connect)
    return out["src"], out["dest"], listener


@pytest.mark.parametrize("channels", [0, 1, 3])
async def test_engines_migrate_over_memory_streams(channels: int) -> None:
    with trio.fail_after(GUARD_S):
        devices = [
            pair("gpu0/vfio", 2 * MIB + 5, flags=MigFlags.STOP_COPY | MigFlags.PRE_COPY),
            pair("nic/vfio", 10, flags=MigFlags.STOP_COPY | MigFlags.P2P),
        ]
        src = [s for s, _ in devices]
        dst = [d for _, d in devices]
        src_stats, dst_stats, listener = await run_both(config(channels), src, dst)
    assert src_stats.status == dst_stats.status == "completed"
    for s, d in devices:
        assert bytes(d.received) == s.state_bytes
        assert d.loaded_config == s.config
        assert s.state is State.STOP
        assert d.state is State.RUNNING
        assert src_stats.devices[s.idstr].stopcopy_bytes == len(s.state_bytes)
    assert listener.closed
    assert dst_stats.transferred_bytes == src_stats.transferred_bytes
    blob = len(encode_qemu_config(devices[0][0].config))
    for s, _ in devices:  # both sides count QEMU's blob, as it travels
        assert dst_stats.devices[s.idstr].config_bytes == blob
        assert src_stats.devices[s.idstr].config_bytes == blob
    assert {k: attrs.asdict(v) for k, v in dst_stats.devices.items()} == {
        k: attrs.asdict(v) for k, v in src_stats.devices.items()
    }


async def test_engines_keep_to_the_queue_budget_with_backpressure() -> None:
    """Six 1 MiB packets per device over three channels, with room for about one."""
    cfg = config(3, max_queued_bytes=DATA_BUFFER_BYTES + 64)
    devices = [pair("a/vfio", 6 * MIB), pair("b/vfio", 6 * MIB + 1)]
    with trio.fail_after(GUARD_S):
        await run_both(cfg, [s for s, _ in devices], [d for _, d in devices])
    for s, d in devices:
        assert bytes(d.received) == s.state_bytes


async def test_destination_refuses_a_channel_with_the_wrong_uuid() -> None:
    cfg = config(2, uuid=bytes(range(16)))
    listener = MemoryListener()
    dest = Destination(cfg, [MemoryDevice("gpu0/vfio")])
    with trio.fail_after(GUARD_S), group_of(FramingError, "has uuid 00000000-"):
        async with trio.open_nursery() as nursery:
            await nursery.start(dest.serve, [listener])
            channel = await listener.connect()
            await channel.send_all(multifd_wire.encode_init(bytes(16), 0))
    assert listener.closed


async def test_destination_refuses_a_channel_id_out_of_range() -> None:
    listener = MemoryListener()
    dest = Destination(config(2), [MemoryDevice("gpu0/vfio")])
    with (
        trio.fail_after(GUARD_S),
        group_of(FramingError, "received channel id 3 is greater than number of channels 2"),
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(dest.serve, [listener])
            channel = await listener.connect()
            await channel.send_all(multifd_wire.encode_init(bytes(16), 3))


async def test_destination_refuses_unknown_first_bytes() -> None:
    listener = MemoryListener()
    dest = Destination(config(1), [MemoryDevice("gpu0/vfio")])
    with trio.fail_after(GUARD_S), group_of(FramingError, "no known magic"):
        async with trio.open_nursery() as nursery:
            await nursery.start(dest.serve, [listener])
            stranger = await listener.connect()
            await stranger.send_all(b"GET / HTTP/1.1\r\n")


async def test_silent_connection_does_not_hold_up_the_migration(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cfg = config(2, peer_timeout_s=5.0)
    src, dst = pair("gpu0/vfio", MIB // 2)
    listener = MemoryListener()
    dest = Destination(cfg, [dst])
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(dest.serve, [listener])
            silent = await listener.connect()
            stats = await migrate(cfg, [src], listener.connect)
            # Done long before the silent connection's --peer-timeout.
            assert trio.current_time() < cfg.peer_timeout_s
    assert stats.status == "completed"
    await silent.aclose()
    assert bytes(dst.received) == src.state_bytes


async def test_destination_watchdog_fails_a_silent_source(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cfg = config(0, peer_timeout_s=5.0)
    dst = MemoryDevice("gpu0/vfio")
    listener = MemoryListener()
    dest = Destination(cfg, [dst])
    with trio.fail_after(GUARD_S), group_of(ChannelBrokenError, "no data from the source"):
        async with trio.open_nursery() as nursery:
            await nursery.start(dest.serve, [listener])
            main = await listener.connect()
            await main.send_all(framing.encode_file_header())
    assert trio.current_time() >= 5.0
    assert (State.RESUMING, State.RUNNING) not in dst.arcs  # reset, not started
    assert dst.state is State.RUNNING


async def test_silent_connection_is_dropped_after_the_peer_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cfg = config(1, peer_timeout_s=5.0)
    listener = MemoryListener()
    dest = Destination(cfg, [MemoryDevice("gpu0/vfio")])
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(dest.serve, [listener])
            silent = await listener.connect()
            assert await silent.receive_some() == b""
            assert trio.current_time() >= cfg.peer_timeout_s
            assert not listener.closed  # still waiting for the real source
            nursery.cancel_scope.cancel()
    assert listener.closed


class _BrokenStream(trio.abc.Stream):
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        raise trio.BrokenResourceError("peer reset")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return b""

    async def aclose(self) -> None:
        self.closed = True
        await trio.lowlevel.checkpoint()


async def test_source_channel_broken_during_handshake_is_a_setup_error() -> None:
    opened: list[trio.abc.Stream] = []

    async def connect() -> trio.abc.Stream:
        stream: trio.abc.Stream = (
            _BrokenStream() if opened else trio.testing.memory_stream_pair()[0]
        )
        opened.append(stream)
        return stream

    src, _ = pair("gpu0/vfio", 10)
    broke = "multifd channel 0 broke during its handshake"
    with trio.fail_after(GUARD_S), pytest.raises(ChannelBrokenError, match=broke) as info:
        await migrate(config(2), [src], connect)
    assert info.value.phase == "setup"
    assert len(opened) == 2
    assert getattr(opened[1], "closed", False)
    assert src.arcs == []  # no device was touched


async def test_source_without_precopy_devices_waits_for_the_switchover_ack(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QEMU's migration_can_switchover: no SWITCHOVER_START before the ack, pre-copy or not.

    The destination (ours, over memory streams) acks at OPEN_RETURN_PATH, since it
    has no pre-copy device; its ack is held back 5 s here. The VM must not stop
    (the source's ``t_stop``) before the ack went out.
    """
    acked_at: list[float] = []
    send_rp = Destination._send_rp
    # QEMU's MIG_RP_MSG_SWITCHOVER_ACK (7) with no payload (migration/migration.h).
    ack = (7).to_bytes(2, "big") + (0).to_bytes(2, "big")

    async def slow_ack(self: Destination, message: bytes) -> None:
        if message == ack:
            await trio.sleep(5)
            acked_at.append(trio.current_time())
        await send_rp(self, message)

    monkeypatch.setattr(Destination, "_send_rp", slow_ack)
    src, dst = pair("nic/vfio", 10)
    with trio.fail_after(GUARD_S):
        src_stats, dst_stats, _ = await run_both(config(0), [src], [dst])
    assert src_stats.status == dst_stats.status == "completed"
    assert len(acked_at) == 1
    assert src_stats.t_stop is not None
    assert src_stats.t_stop >= acked_at[0]
    assert bytes(dst.received) == src.state_bytes


async def test_destination_with_qemus_queue_bound_fails_at_once_with_qemus_message() -> None:
    """``max_queued_buffers_size`` below one 1 MiB packet: QEMU 10.1 fails the first one."""
    listener = MemoryListener()
    src, dst = pair("gpu0/vfio", 2 * MIB)
    dest = Destination(config(2), [dst], max_queued_buffers_size=MIB - 1)
    failed: list[ReassemblyError] = []

    async def serve() -> None:
        try:
            await dest.serve([listener])
        except* ReassemblyError as group:
            failed.extend(e for e in group.exceptions if isinstance(e, ReassemblyError))

    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.RaisesGroup(MigrationError, allow_unwrapped=True, flatten_subgroups=True):
                await migrate(config(2), [src], listener.connect)
    assert [(e.message, e.device) for e in failed] in (
        [(f"queuing state buffer {idx} would exceed the size max of 1048575", "gpu0/vfio")]
        for idx in (0, 1)
    )
    assert dst.state is State.RUNNING  # reset
    assert src.state is State.RUNNING  # restored


async def test_destination_with_qemus_queue_bound_loads_what_fits() -> None:
    src, dst = pair("gpu0/vfio", 3 * MIB + 7)
    listener = MemoryListener()
    dest = Destination(config(3), [dst], max_queued_buffers_size=8 * MIB)
    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(dest.serve, [listener])
            stats = await migrate(config(3), [src], listener.connect)
    assert stats.status == "completed"
    assert bytes(dst.received) == src.state_bytes


class ScriptedPrecopyDevice(MemoryDevice):
    """A pre-copy device whose reads return ``reads`` bytes in turn, initial bytes first.

    VFIO_MIG_GET_PRECOPY_INFO reports what is left of ``initial`` and ``dirty``,
    as a device does (the uAPI: initial_bytes falls as it is read, then dirty).
    """

    def __init__(self, idstr: str, *, initial: int, dirty: int, reads: list[int]) -> None:
        super().__init__(idstr, b"s" * 3000, flags=MigFlags.STOP_COPY | MigFlags.PRE_COPY)
        self.initial, self.dirty, self.reads = initial, dirty, list(reads)

    def read_data(self, buf: memoryview) -> int:
        if self.state not in (State.PRE_COPY, State.PRE_COPY_P2P):
            return super().read_data(buf)
        if not self.reads:
            raise NoDataNow(self.idstr)
        n = self.reads.pop(0)
        buf[:n] = b"p" * n
        taken = min(self.initial, n)
        self.initial -= taken
        self.dirty = max(0, self.dirty - (n - taken))
        return n

    def precopy_info(self) -> tuple[int, int]:
        return self.initial, self.dirty


def qemu_part_markers(initial: int, dirty: int, reads: list[int]) -> list[str]:
    """hw/vfio/migration.c vfio_save_iterate with switchover-ack: each PART's end marker.

    vfio_update_estimated_pending_data takes a read from initial first, then
    dirty; INIT_DATA_SENT goes once, in the first PART after which the cached
    initial size is 0 (whatever dirty is), EOS otherwise.
    """
    out, sent = [], False
    for n in reads:
        taken = min(initial, n)
        initial -= taken
        dirty -= min(dirty, n - taken)
        if initial == 0 and not sent:
            sent = True
            out.append("INIT_DATA_SENT")
        else:
            out.append("EOS")
    return out


async def test_init_data_sent_goes_where_qemus_rule_puts_it(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Initial bytes run out while dirty bytes remain: INIT_DATA_SENT then, not at dirty 0."""
    initial, dirty, reads = 100, 50, [60, 60, 30]
    expected = qemu_part_markers(initial, dirty, reads)
    assert expected == ["EOS", "INIT_DATA_SENT", "EOS"]  # the case this test is about
    sent: list[bytes] = []
    send = _Sender.send

    async def record(self: _Sender, *parts: bytes | bytearray | memoryview) -> None:
        sent.extend(bytes(p) for p in parts)
        await send(self, *parts)

    monkeypatch.setattr(_Sender, "send", record)
    src = ScriptedPrecopyDevice("gpu0/vfio", initial=initial, dirty=dirty, reads=reads)
    dst = MemoryDevice("gpu0/vfio", flags=src.flags)
    cfg = MigrationConfig(multifd_channels=0, max_precopy_iterations=20)
    with trio.fail_after(GUARD_S):
        src_stats, _, _ = await run_both(cfg, [src], [dst])
    assert src_stats.status == "completed"
    records = ref.parse_stream(b"".join(sent), {"gpu0/vfio": ref.pci_config_blob_size(256, 0)})
    parts: list[list[ref.Record]] = []  # each PART section's payload records
    in_part = False
    for rec in records:
        if rec[0] in ("start", "part", "end", "full"):
            in_part = rec[0] == "part"
            if in_part:
                parts.append([])
        elif in_part and rec[0] in ("data", "marker"):
            parts[-1].append(rec)
    with_data = [p for p in parts if p[0][0] == "data"]
    assert [len(p[0][2]) for p in with_data] == reads
    assert [p[1][2] for p in with_data] == expected
    # Idle iterations after the data: lone EOS, and INIT_DATA_SENT never again.
    assert all(p == [("marker", 1, "EOS")] for p in parts[len(with_data) :]), parts


class ReinitDevice(ScriptedPrecopyDevice):
    """Opts in to PRECOPY_INFOv2; re-initialises at the ``at``-th query after its
    first initial data was read.

    The uAPI (Linux 7.1): REINIT in the query's flags, initial_bytes from a new
    value, dirty_bytes from 0; the new initial data is next on the stream.
    """

    def __init__(self, idstr: str, *, again: int, at: int) -> None:
        super().__init__(idstr, initial=100, dirty=0, reads=[100])
        self.again, self.at = again, at
        self.opted_in = False
        self.reinit_reported = 0

    def enable_precopy_v2(self) -> bool:
        self.opted_in = True
        return True

    def precopy_info_v2(self) -> PrecopyInfo:
        assert self.opted_in
        reinit = False
        if self.initial == 0 and not self.reads and self.again:
            self.at -= 1
            if self.at == 0:
                self.initial, self.dirty, self.reads = self.again, 0, [self.again]
                self.again = 0
                reinit = True
                self.reinit_reported += 1
        return PrecopyInfo(initial_bytes=self.initial, dirty_bytes=self.dirty, reinit=reinit)


@pytest.mark.parametrize("at", [1, 3])
async def test_source_reads_reinitialised_initial_data_before_switching_over(
    autojump_clock: trio.testing.MockClock, at: int
) -> None:
    """REINIT after pre-copy's first data (at=1: the next query; at=3: the query
    made when the source is about to switch over): the new initial bytes still go
    in pre-copy, and INIT_DATA_SENT only once."""
    src = ReinitDevice("gpu0/vfio", again=40, at=at)
    dst = MemoryDevice("gpu0/vfio", flags=src.flags)
    cfg = MigrationConfig(multifd_channels=0, max_precopy_iterations=50)
    with trio.fail_after(GUARD_S):
        src_stats, dst_stats, _ = await run_both(cfg, [src], [dst])
    assert src_stats.status == dst_stats.status == "completed"
    assert src.reinit_reported == 1
    assert src_stats.devices["gpu0/vfio"].precopy_bytes == 100 + 40
    assert dst_stats.devices["gpu0/vfio"].precopy_bytes == 100 + 40
    assert bytes(dst.received) == b"p" * 140 + src.state_bytes


# --- x-migration-load-config-after-iter (QEMU 10.1, hw/vfio/migration-multifd.c) ---


async def _run_load_ready(
    monkeypatch: pytest.MonkeyPatch, *, source: bool, destination: bool
) -> tuple[list[bytes], list[BaseException], MemoryDevice, MemoryDevice]:
    """One multifd migration with the option set on each side; the main stream sent."""
    sent: list[bytes] = []
    send = _Sender.send

    async def record(self: _Sender, *parts: bytes | bytearray | memoryview) -> None:
        sent.extend(bytes(p) for p in parts)
        await send(self, *parts)

    monkeypatch.setattr(_Sender, "send", record)
    src, dst = pair("gpu0/vfio", 3 * MIB + 3)
    listener = MemoryListener()
    dest = Destination(config(2), [dst], load_config_after_iter=destination)
    failures: list[BaseException] = []

    async def serve() -> None:
        try:
            await dest.serve([listener])
        except* MigrationError as group:
            failures.extend(group.exceptions)

    with trio.fail_after(GUARD_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            try:
                await migrate(config(2), [src], listener.connect, load_config_after_iter=source)
            except* MigrationError:
                pass
    return sent, failures, src, dst


async def test_load_config_after_iter_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    sent, failures, src, dst = await _run_load_ready(monkeypatch, source=True, destination=True)
    assert not failures
    assert bytes(dst.received) == src.state_bytes
    assert dst.loaded_config == src.config
    records = ref.parse_stream(b"".join(sent))
    full = records.index(("full", 1, "gpu0/vfio", 0, 1))
    # QEMU 10.1's save_state in multifd mode: a lone DEV_CONFIG_LOAD_READY, no EOS.
    assert records[full + 1 : full + 3] == [("marker", 1, "CONFIG_LOAD_READY"), ("footer", 1)]


@pytest.mark.parametrize(
    ("source", "destination", "message"),
    [
        # QEMU's vfio_load_state_config_load_ready refuses it when its property is off.
        (True, False, "got DEV_CONFIG_LOAD_READY but was disabled"),
        # QEMU's load thread would wait for the marker for ever; this side says why.
        (False, True, "stream ended without DEV_CONFIG_LOAD_READY for gpu0/vfio"),
    ],
)
async def test_load_config_after_iter_mismatch_fails_cleanly(
    monkeypatch: pytest.MonkeyPatch, source: bool, destination: bool, message: str
) -> None:
    _, failures, src, dst = await _run_load_ready(
        monkeypatch, source=source, destination=destination
    )
    assert any(message in str(f) for f in failures), failures
    assert dst.state is State.RUNNING  # reset
    assert src.state is State.RUNNING  # restored
