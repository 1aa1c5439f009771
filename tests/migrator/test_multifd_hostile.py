"""A raw multifd source against a real ``migrator incoming``: good and hostile packets.

The sender (tests/migrator/wire_sender.py) is written from the reference only.
It reads a real fakevfio device's stop-copy stream through its files, then
speaks QEMU's main channel and multifd channels over real tcp/unix sockets.
Each hostile case must fail the destination with one clear error line, a
non-zero exit and reset destination devices.
"""

from __future__ import annotations

import functools
import itertools
import struct
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakevfio.testing import PeakRss
from tests.conftest import MountFactory, MountHandle
from tests.migrator import qemu_reference as ref
from tests.migrator import wire_sender as ws
from tests.migrator.helpers import (
    DEST_ARCS,
    Result,
    check_config_restored,
    config_bytes,
    digest,
    finish,
    migrate,
    start_incoming,
    write_config_marker,
)

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(60)]
_names = itertools.count()
Mounts = tuple[MountHandle, MountHandle]


@pytest.fixture(scope="module")
def mounts(fakevfio_mount_module: MountFactory) -> Iterator[Mounts]:
    with fakevfio_mount_module([]) as src, fakevfio_mount_module([]) as dst:
        yield src, dst


@attrs.frozen
class Dev:
    name: str
    idstr: str
    chunks: list[bytes]
    config: bytes  # the source's config space (the packets carry QEMU's blob of it)
    dst_config: bytes  # the destination device's, before the migration

    def packets(self) -> list[bytes]:
        return ws.device_packets(self.idstr, self.chunks, self.config)


def _device(mounts: Mounts, size: str = "3M") -> Dev:
    """A source device read out through its files, and an empty twin on the destination."""
    src, dst = mounts
    name = f"h{next(_names)}"
    assert src.create(name, "ram", f"size={size} flags=STOP_COPY seed={len(name) + 5}") is None
    assert dst.create(name, "ram", f"size={size} flags=STOP_COPY") is None
    write_config_marker(src, name, f"cfg-{name}".encode())
    chunks, config = ws.read_stop_copy(src.device(name))
    assert sum(map(len, chunks)) > 0
    return Dev(name, f"{name}/vfio", chunks, config, config_bytes(dst, name))


def _listen(tmp_path: Path, transport: str) -> str:
    return "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/in.sock"


Order = Callable[[int], list[tuple[int, int]]]


def _load_in_order(mounts: Mounts, tmp_path: Path, transport: str, order: Order) -> None:
    """Send two devices' packets as ``order(n)`` says ((packet, channel) pairs); all loads."""
    src, dst = mounts
    devs = [_device(mounts), _device(mounts, "2M")]
    idstrs = [d.idstr for d in devs]
    incoming, addr = start_incoming(
        _listen(tmp_path, transport),
        [str(dst.device(d.name)) for d in devs],
        "--multifd-channels",
        "4",
    )
    try:
        with ws.RawSource(addr) as sender:
            sender.send_main(ws.main_prologue(idstrs))
            sender.open_channels(4)
            sender.send_main(ws.switchover_start())
            packets = [p for d in devs for p in d.packets()]
            for index, channel in order(len(packets)):
                sender.channels[channel].sendall(packets[index])
            sender.send_main(ws.main_epilogue(idstrs))
            rp = sender.read_return_path()
    finally:
        result = finish(incoming, 30)
    assert result.returncode == 0, result.stderr
    assert result.json()["status"] == "completed"
    assert rp[-1] == (ws.RP_SHUT, struct.pack(">I", 0))
    for d in devs:
        assert dst.state(d.name) == "RUNNING"
        assert digest(dst, d.name) == digest(src, d.name)
        check_config_restored(d.config, d.dst_config, config_bytes(dst, d.name))
        assert f"cfg-{d.name}".encode() not in config_bytes(dst, d.name)
        # Config last: no config write reached the device before its END record
        # (fakevfio/_pci.py Rule 6 logs CONFIG-EARLY for one).
        assert dst.log_lines(d.name) == DEST_ARCS[False]


@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=False,
)
@given(data=st.data())
def test_multifd_stream_in_any_arrival_order_loads(
    mounts: Mounts, tmp_path: Path, data: st.DataObject
) -> None:
    """Hypothesis picks the arrival order and each packet's channel (tcp)."""

    def order(n: int) -> list[tuple[int, int]]:
        perm = data.draw(st.permutations(range(n)), label="arrival order")
        chans = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n), label="channels")
        return list(zip(perm, chans, strict=True))

    _load_in_order(mounts, tmp_path, "tcp", order)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_multifd_config_packets_first_still_load_config_last(
    mounts: Mounts, tmp_path: Path, transport: str
) -> None:
    """Every packet in reverse: each config packet arrives before all of its device's data."""
    _load_in_order(mounts, tmp_path, transport, lambda n: [(i, i % 4) for i in reversed(range(n))])


# --- hostile cases -------------------------------------------------------------------

Case = Callable[[ws.RawSource, Dev], None]


def _send_then(bad: bytes, *, before: int = 1) -> Case:
    """Send ``before`` good packets, then ``bad`` on another channel."""

    def run(sender: ws.RawSource, dev: Dev) -> None:
        good = dev.packets()
        for p in good[:before]:
            sender.channels[0].sendall(p)
        ws.quietly(lambda: sender.channels[1].sendall(bad))

    return run


def _payload_case(payload: bytes) -> Case:
    def run(sender: ws.RawSource, dev: Dev) -> None:
        _send_then(ws.packet(dev.idstr, payload))(sender, dev)

    return run


def _header_case(**header: object) -> Case:
    def run(sender: ws.RawSource, dev: Dev) -> None:
        payload = ws.vfio_payload(1, dev.chunks[1])
        _send_then(ws.packet(dev.idstr, payload, **header))(sender, dev)

    return run


def _duplicate(sender: ws.RawSource, dev: Dev) -> None:
    first = dev.packets()[0]
    sender.channels[0].sendall(first)
    ws.quietly(lambda: sender.channels[1].sendall(first))


def _empty(sender: ws.RawSource, dev: Dev) -> None:
    ws.quietly(lambda: sender.channels[1].sendall(ws.device_state_header(dev.idstr, 0)))


CASES: dict[str, tuple[Case, str]] = {
    "short packet": (
        _payload_case(struct.pack(">II", 0, 1)),
        "packet too short at 8 bytes (min is 12)",
    ),
    "unknown vfio version": (
        _payload_case(ws.vfio_payload(1, b"x" * 64, version=7)),
        "packet has unknown version 7",
    ),
    "idx 0xffffffff": (
        _payload_case(ws.vfio_payload(0xFFFFFFFF, b"x" * 64)),
        "packet index is invalid",
    ),
    "duplicate idx": (_duplicate, "state buffer 0 already filled"),
    "unknown idstr": (
        lambda s, d: _send_then(ws.packet("nosuch/vfio", ws.vfio_payload(1, b"x")))(s, d),
        "Unknown idstr nosuch/vfio or instance id 0 for load state buffer",
    ),
    "unterminated idstr": (
        _header_case(idstr_field=b"h" * 256),
        "unterminated multifd device state idstr",
    ),
    "empty packet": (_empty, "received empty device state packet"),
    "SYNC flag": (
        _header_case(flags=ws.FLAG_DEVICE_STATE | ws.FLAG_SYNC),
        "received SYNC device state packet",
    ),
    "bad packet magic": (_header_case(magic=0xDEADBEEF), "bad magic 0xdeadbeef"),
    "bad packet version": (_header_case(version=2), "multifd packet has unknown version 2"),
}


def _run_hostile(
    mounts: Mounts,
    tmp_path: Path,
    case: Callable[[ws.RawSource, Dev], None],
    *,
    transport: str = "tcp",
    dest_args: tuple[str, ...] = (),
    channels: int = 2,
    init_uuid: bytes = bytes(16),
    configuration: bytes = b"",
    epilogue: bytes | None = None,
) -> tuple[Result, Dev, list[tuple[int, bytes]]]:
    """Start a destination, bring it to RESUMING, open channels, then run ``case``."""
    _, dst = mounts
    dev = _device(mounts)
    incoming, addr = start_incoming(
        _listen(tmp_path, transport),
        [str(dst.device(dev.name))],
        "--multifd-channels",
        str(channels),
        *dest_args,
    )
    try:
        with ws.RawSource(addr, timeout=15) as sender:
            sender.send_main(ws.main_prologue([dev.idstr], configuration=configuration))
            ws.wait_state(dst, dev.name, "RESUMING")
            if channels:
                ws.quietly(lambda: sender.open_channels(channels, init_uuid))
            ws.quietly(lambda: sender.send_main(ws.switchover_start()))
            case(sender, dev)
            if epilogue is not None:
                ws.quietly(lambda: sender.send_main(epilogue))
            rp = sender.read_return_path()
    finally:
        result = finish(incoming, 30)
    assert result.returncode != 0, result.stderr
    ws.assert_reset(dst, dev.name)
    assert (ws.RP_SHUT, struct.pack(">I", 1)) in rp
    return result, dev, rp


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_packet_fails_cleanly(mounts: Mounts, tmp_path: Path, name: str) -> None:
    case, message = CASES[name]
    result, _, _ = _run_hostile(mounts, tmp_path, case)
    line = ws.error_line(result.stderr)
    assert message in line, line
    assert "load" in line


@pytest.mark.parametrize(
    ("init", "message"),
    [
        (ws.init_packet(0, magic=0xDEADBEEF), "first bytes 0xdeadbeef are no known magic"),
        (ws.init_packet(0, version=9), "multifd init packet has unknown version 9"),
    ],
)
def test_bad_multifd_handshake(mounts: Mounts, tmp_path: Path, init: bytes, message: str) -> None:
    def case(sender: ws.RawSource, dev: Dev) -> None:
        ws.quietly(lambda: sender.open_raw_channel(init))

    result, _, _ = _run_hostile(
        mounts, tmp_path, case, channels=0, dest_args=("--multifd-channels", "2")
    )
    assert message in ws.error_line(result.stderr)


def test_wrong_uuid_is_refused(mounts: Mounts, tmp_path: Path) -> None:
    want = uuidlib.uuid4()
    other = uuidlib.uuid4()

    def case(sender: ws.RawSource, dev: Dev) -> None:
        ws.quietly(lambda: sender.open_raw_channel(ws.init_packet(0, other.bytes)))

    result, _, _ = _run_hostile(
        mounts,
        tmp_path,
        case,
        transport="unix",
        channels=0,
        dest_args=("--multifd-channels", "2", "--uuid", str(want)),
        configuration=ws.configuration_with_uuid(want.bytes),
    )
    line = ws.error_line(result.stderr)
    assert f"uuid {other}" in line, line
    assert f"expected {want}" in line, line


def test_config_state_on_main_channel_in_multifd_mode(mounts: Mounts, tmp_path: Path) -> None:
    def case(sender: ws.RawSource, dev: Dev) -> None:
        for p in dev.packets()[:-1]:
            sender.channels[0].sendall(p)
        records: list[ref.Record] = [
            ("end", 1),
            ("marker", 1, "EOS"),
            ("footer", 1),
            ("full", 1, dev.idstr, 0, 1),
            ("marker", 1, "CONFIG_STATE"),
            ("config", 1, ws.qemu_config_blob(dev.config)),
            ("marker", 1, "EOS"),
            ("footer", 1),
            ("eof",),
        ]
        ws.quietly(lambda: sender.send_main(ref.build_stream(records)))

    result, _, _ = _run_hostile(mounts, tmp_path, case)
    line = ws.error_line(result.stderr)
    assert "got DEV_CONFIG_STATE in main migration channel but doing multifd transfer" in line


def test_queue_bound_exceeded_while_the_writer_starves(mounts: Mounts, tmp_path: Path) -> None:
    # idx 0 is withheld: the in-order writer starves while 1..6 (1 MiB each)
    # pile up against a 2 MiB bound. Each channel carries three of them, so
    # whatever order they are read in, both channels end up blocked.
    def case(sender: ws.RawSource, dev: Dev) -> None:
        for idx in range(1, 7):
            p = ws.packet(dev.idstr, ws.vfio_payload(idx, bytes([idx]) * ws.DATA_BUFFER))
            ws.quietly(functools.partial(sender.channels[idx % 2].sendall, p))

    result, _, _ = _run_hostile(mounts, tmp_path, case, dest_args=("--max-queued-bytes", "2M"))
    line = ws.error_line(result.stderr)
    assert f"would exceed the size max of {2 << 20}" in line, line
    assert "buffer 0 never arrived" in line


def test_oversized_payload_fails_before_allocating(mounts: Mounts, tmp_path: Path) -> None:
    _, dst = mounts
    dev = _device(mounts)
    claimed = 2 << 30
    incoming, addr = start_incoming(
        _listen(tmp_path, "tcp"), [str(dst.device(dev.name))], "--multifd-channels", "1"
    )
    peak = PeakRss(incoming.pid)
    try:
        with ws.RawSource(addr, timeout=15) as sender:
            sender.send_main(ws.main_prologue([dev.idstr]))
            ws.wait_state(dst, dev.name, "RESUMING")
            sender.open_channels(1)
            sender.send_main(ws.switchover_start())
            # The header claims 2 GiB, and 256 MiB really follow: a destination
            # that buffered the payload before checking its size would show it.
            header = ws.device_state_header(dev.idstr, claimed)
            filler = b"\xa5" * (1 << 20)

            def flood() -> None:
                sender.channels[0].sendall(header)
                for _ in range(256):
                    sender.channels[0].sendall(filler)

            ws.quietly(flood)
            rp = sender.read_return_path()
    finally:
        result = finish(incoming, 30)
    peak_kib = peak.join()
    assert result.returncode != 0
    line = ws.error_line(result.stderr)
    assert f"packet of {claimed} bytes exceeds the maximum" in line, line
    assert 0 < peak_kib < 128 << 10, f"destination peaked at {peak_kib} KiB"
    ws.assert_reset(dst, dev.name)
    assert (ws.RP_SHUT, struct.pack(">I", 1)) in rp


@pytest.mark.parametrize(("src_mode", "dst_mode"), [("on", "off"), ("off", "on")])
def test_multifd_transfer_mode_mismatch(
    mounts: Mounts, tmp_path: Path, src_mode: str, dst_mode: str
) -> None:
    src, dst = mounts
    names = [f"mm{next(_names)}" for _ in range(2)]
    for name in names:
        assert src.create(name, "ram", "size=2M flags=STOP_COPY+P2P seed=3") is None
        assert dst.create(name, "ram", "size=2M flags=STOP_COPY+P2P") is None
    before = {n: digest(src, n) for n in names}
    source, dest = migrate(
        f"unix:{tmp_path}/mm.sock",
        [str(src.device(n)) for n in names],
        [str(dst.device(n)) for n in names],
        "--multifd-channels",
        "2",
        "--multifd-transfer",
        src_mode,
        dest_args=("--multifd-transfer", dst_mode),
        timeout=30,
    )
    assert source.returncode != 0, source.stderr
    assert dest.returncode != 0, dest.stderr
    src_line, dst_line = ws.error_line(source.stderr), ws.error_line(dest.stderr)
    if src_mode == "on":
        assert "not doing multifd transfer" in dst_line, dst_line
    else:
        assert "got DEV_CONFIG_STATE in main migration channel but doing multifd" in dst_line
    assert "the destination failed to load the state" in src_line or "broke" in src_line
    for name in names:
        assert src.state(name) == "RUNNING"
        assert digest(src, name) == before[name]
        ws.assert_reset(dst, name)
