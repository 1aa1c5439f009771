"""QEMU's own multifd device-state packets decode with our codec, and match ours.

A TCP proxy sits between the migration source and destination and records
every connection's source-to-destination bytes. An unmodified QEMU source
migrates a fakevfio device (``-device vfio-pci``, ``x-migration-multifd-transfer=on``)
through it to a QEMU destination; then our ``migrator`` migrates the same
device through it between two fakevfio mounts. Both captures are walked:

* the main channel starts with be32 0x5145564d, every other connection with
  QEMU's 64-byte ``MultiFDInit_t`` (checked by ``multifd_wire.decode_init``);
* RAM packets (QEMU only) are ``MultiFDPacket_t`` as in QEMU 10.0's
  ``migration/multifd.h``: a 320-byte header (hdr, pages_alloc, normal_pages,
  next_packet_size, be64 packet_num, zero_pages, unused32[1], unused64[3],
  ramblock[256]), then room for 128 be64 offsets (512 KiB / 4 KiB pages: the
  sender always writes its whole ``packet_len``; normal_pages + zero_pages of
  them are used), then ``next_packet_size`` bytes of normal pages. SYNC
  packets (flags 1) have the same size with every field 0 but packet_num;
* device-state packets (flags 0x40) must decode with
  ``decode_device_state_header`` / ``decode_vfio_packet``.

The device has no PRE_COPY, so its whole STOP_COPY stream goes through
multifd, and the data packets in idx order must equal the stream a fresh
fakevfio device with the same seed produces. The idstr differs by design:
QEMU's is the PCI address (``0000:00:01.0/vfio``), ours ``<device name>/vfio``.
The config packets are byte-identical: QEMU's ``vmstate_vfio_pci_config``
(version, config space, irq_state, MSI-X table and PBA), once our source device
holds what the guest's firmware programmed through QEMU (COMMAND, BARs,
INTERRUPT_LINE; see the end of the test).
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest

from fakevfio._ram import RamDriver
from fakevfio._stream import StateSaveStream
from migrator import multifd_wire as wire
from migrator._wire import QEMU_VM_FILE_MAGIC, Marker
from tests.conftest import MountFactory, MountHandle
from tests.migrator import qemu_reference, wire_sender
from tests.migrator.helpers import (
    DEST_ARCS,
    SOURCE_ARCS,
    check_config_restored,
    config_bytes,
    digest,
    finish,
    run_migrator,
    start_incoming,
)
from tests.test_qemu import (  # _need_qemu: autouse, skips without QEMU
    _need_qemu,  # noqa: F401
    arcs,
    qemu_under_run,
    wait_migration,
)
from vfio_uapi.fsm import State

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.slow, pytest.mark.deadline(120)]

SIZE = "16M"
SEED = "3"
#: No PRE_COPY: every byte of the device's stream travels in multifd packets.
FLAGS = "STOP_COPY+P2P"
SPEC = f"gpu0=ram:size={SIZE},flags={FLAGS},seed={SEED}"
#: The destination device: same size and flags (a destination whose device has
#: PRE_COPY waits for an INIT_DATA_SENT that a STOP_COPY-only source never sends).
DST_SPEC = f"gpu0=ram:size={SIZE},flags={FLAGS}"
DATA_BUFFER = 1 << 20  # VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE, and our read size
TARGET_PAGE = 4096  # x86
RAM_PAGES = (512 << 10) // TARGET_PAGE  # MULTIFD_PACKET_SIZE / target page size

_HDR = struct.Struct(">III")
# MultiFDPacket_t (QEMU 10.0): hdr, pages_alloc, normal_pages, next_packet_size,
# packet_num, zero_pages, unused32[1], unused64[3], ramblock[256]
_RAM = struct.Struct(">III III Q II 24x 256s")
_BE64 = struct.Struct(">Q")
assert _RAM.size == 320


class Proxy:
    """Forwards each connection to ``127.0.0.1:target``; records both directions.

    ``streams[i]`` is connection i's client->target bytes, ``backs[i]`` its
    target->client bytes (the return path, on a main channel).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.streams: list[bytearray] = []
        self.backs: list[bytearray] = []
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target))
            forward, back = bytearray(), bytearray()
            self.streams.append(forward)
            self.backs.append(back)
            self._socks += [client, upstream]
            for args in ((client, upstream, forward), (upstream, client, back)):
                thread = threading.Thread(target=self._pump, args=args, daemon=True)
                thread.start()
                self._threads.append(thread)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while chunk := src.recv(1 << 20):
                record += chunk
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def stop(self) -> None:
        """Stop accepting and wait for every connection to end."""
        self._stop.set()
        self._acceptor.join(5)
        self.listener.close()
        for thread in self._threads:
            thread.join(10)
        alive = sum(t.is_alive() for t in self._threads)
        for sock in self._socks:
            sock.close()
        assert not alive, f"{alive} proxy pumps still running"

    def close(self) -> list[bytes]:
        """:meth:`stop`; the recorded client->target streams."""
        self.stop()
        return [bytes(s) for s in self.streams]


@attrs.frozen
class DevicePacket:
    channel: int
    idstr: str
    instance_id: int
    idx: int
    flags: int
    data: bytes
    head: bytes  # the raw 276 + 12 header bytes


@attrs.frozen
class Capture:
    multifd_channels: int
    ram_packets: int
    sync_packets: int
    packets: list[DevicePacket]


def walk(streams: Sequence[bytes]) -> Capture:
    """Split a recorded migration into its channels and decode every multifd packet."""
    kinds = [wire.sniff_channel(s[:4]) for s in streams]
    assert kinds.count("main") == 1, kinds
    main = streams[kinds.index("main")]
    assert struct.unpack_from(">I", main)[0] == QEMU_VM_FILE_MAGIC
    ram = sync = 0
    packets: list[DevicePacket] = []
    channel_ids = []
    for stream, kind in zip(streams, kinds, strict=True):
        if kind != "multifd":
            continue
        view = memoryview(stream)
        channel = wire.decode_init(
            bytes(view[: wire.INIT_SIZE]), expected_uuid=bytes(16), channels=kinds.count("multifd")
        )
        channel_ids.append(channel)
        pos = wire.INIT_SIZE
        while pos < len(view):
            magic, version, flags = _HDR.unpack_from(view, pos)
            assert (magic, version) == (wire.MULTIFD_MAGIC, wire.MULTIFD_VERSION), (channel, pos)
            if flags & wire.MULTIFD_FLAG_DEVICE_STATE:
                header = wire.decode_device_state_header(
                    bytes(view[pos : pos + wire.DEVICE_STATE_HEADER_SIZE]), max_payload=1 << 30
                )
                start = pos + wire.DEVICE_STATE_HEADER_SIZE
                payload = view[start : start + header.size]
                assert len(payload) == header.size, f"channel {channel}: truncated packet"
                pkt = wire.decode_vfio_packet(payload)
                head = bytes(view[pos : start + wire.VFIO_PACKET_HEADER_SIZE])
                packets.append(
                    DevicePacket(
                        channel,
                        header.idstr,
                        header.instance_id,
                        pkt.idx,
                        pkt.flags,
                        bytes(pkt.data),
                        head,
                    )
                )
                pos = start + header.size
                continue
            # A RAM or SYNC packet: NOCOMP, the sender's whole packet_len (the
            # header and room for RAM_PAGES offsets), then the normal pages.
            fields = _RAM.unpack_from(view, pos)
            pages_alloc, normal, next_size, _num, zero, unused32, ramblock = fields[3:]
            assert unused32 == 0, (channel, pos, fields)
            if flags == wire.MULTIFD_FLAG_SYNC:  # all zero but packet_num
                assert (pages_alloc, normal, next_size, zero) == (0, 0, 0, 0), (channel, pos)
                sync += 1
            else:
                assert flags == 0, f"RAM packet flags 0x{flags:x}"
                assert pages_alloc == RAM_PAGES, (channel, pos, fields)
                assert 0 < normal + zero <= pages_alloc, (channel, pos, fields)
                assert next_size == normal * TARGET_PAGE, (channel, pos, fields)
                assert ramblock.rstrip(b"\0"), "RAM packet names no ramblock"
                ram += 1
            pos += _RAM.size + 8 * RAM_PAGES + next_size
        assert pos == len(view), f"channel {channel}: {pos - len(view)} bytes past its end"
    assert sorted(channel_ids) == list(range(len(channel_ids)))
    return Capture(len(channel_ids), ram, sync, packets)


def expected_stream() -> bytes:
    """The whole STOP_COPY stream of a stopped device with SPEC's options."""
    driver = RamDriver("gpu0", {"size": SIZE, "flags": FLAGS, "seed": SEED})
    try:
        stream = StateSaveStream(driver, precopy=False)
        out = bytearray()
        while chunk := stream.read(DATA_BUFFER, State.STOP_COPY):
            out += chunk
        return bytes(out)
    finally:
        driver.close()


def check_device_packets(capture: Capture, stream: bytes) -> list[DevicePacket]:
    """The properties both sources' packets must have; returns them in idx order."""
    packets = sorted(capture.packets, key=lambda p: p.idx)
    assert packets, "no device-state packets at all"
    assert len({(p.idstr, p.instance_id) for p in packets}) == 1, "more than one device"
    assert re.fullmatch(r".+/vfio", packets[0].idstr), packets[0].idstr
    assert [p.idx for p in packets] == list(range(len(packets)))
    *data, config = packets
    assert config.flags == wire.VFIO_DEVICE_STATE_CONFIG_STATE
    assert all(p.flags == 0 for p in data)
    assert all(1 <= len(p.data) <= DATA_BUFFER for p in data)
    # Byte for byte what our encoders write (flags 0x40, NUL-padded idstr, ...).
    for p in packets:
        size = wire.VFIO_PACKET_HEADER_SIZE + len(p.data)
        assert p.head == wire.encode_device_state_header(
            p.idstr, p.instance_id, size
        ) + wire.encode_vfio_packet_header(p.idx, p.flags), p.idx
    assert b"".join(p.data for p in data) == stream
    assert _BE64.unpack_from(config.data)[0] == Marker.DEV_CONFIG_STATE
    assert _BE64.unpack_from(config.data, len(config.data) - 8)[0] == Marker.END_OF_STATE
    return packets


def qemu_migrate_through_proxy(
    src: MountHandle, dst: MountHandle, tmp: Path, *, multifd: bool = True
) -> list[bytes]:
    """Migrate gpu0 with two QEMUs through a Proxy; the recorded streams.

    As ``test_qemu.qemu_migrate`` but without switchover-ack: QEMU 10.0.2 never
    switches over with it when the device has no PRE_COPY (the migration stays
    "active"), and PRE_COPY would send the device's data on the main channel.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    names = ("multifd", "return-path") if multifd else ("return-path",)
    caps = [{"capability": c, "state": True} for c in names]
    mode = "on" if multifd else "off"
    proxy: Proxy | None = None
    try:
        with (
            qemu_under_run(src, tmp, "src", mode) as sq,
            qemu_under_run(dst, tmp, "dst", mode, "-incoming", "defer") as dq,
        ):
            for q in (sq, dq):
                q.cmd("migrate-set-capabilities", capabilities=caps)
                if multifd:
                    q.cmd("migrate-set-parameters", **{"multifd-channels": 2})
            # QEMU estimates the switchover bandwidth from what pre-copy moved; with an idle
            # RAM and no device pre-copy that is a few kB/s under load, and it never switches
            # over (seen in a Debian 13 container: 30 s 'active', 3882 dirty syncs).
            # avail-switchover-bandwidth is QEMU's own answer: use this figure instead.
            sq.cmd(
                "migrate-set-parameters",
                **{
                    "max-bandwidth": 8 << 30,
                    "downtime-limit": 1000,
                    "avail-switchover-bandwidth": 1 << 30,
                },
            )
            sq.cmd("cont")
            dq.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            src_start, dst_start = len(arcs(src)), len(arcs(dst))
            proxy = Proxy(port)
            sq.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
            info = wait_migration(sq, timeout=30)
            assert info["status"] == "completed", info
            assert wait_migration(dq, timeout=30)["status"] == "completed"
            assert info["vfio"]["transferred"] > 16 << 20
            src_digest = digest(src, "gpu0")
            dq.cmd("cont")  # RESUMING -> STOP loads the stream, then RUNNING
            dst_end = len(arcs(dst))
            dq.cmd("stop")
            assert digest(dst, "gpu0") == src_digest
            assert arcs(src)[src_start:] == SOURCE_ARCS[FLAGS]
            assert arcs(dst)[dst_start:dst_end] == DEST_ARCS[True]
    finally:
        streams = proxy.close() if proxy is not None else []
    return streams


#: Config-space ranges a guest's firmware programs through QEMU (COMMAND, the
#: six BARs, INTERRUPT_LINE): QEMU's blob has the guest's values there.
GUEST_PROGRAMMED = ((0x04, 0x06), (0x10, 0x28), (0x3C, 0x3D))


def program_as_guest(mount: MountHandle, guest_config: bytes) -> None:
    """Write GUEST_PROGRAMMED of ``guest_config`` into gpu0, as QEMU wrote them."""
    path = mount.file("gpu0", "config")
    with open(path, "r+b", buffering=0) as f:
        for a, b in GUEST_PROGRAMMED:
            f.seek(a)
            f.write(guest_config[a:b])
    assert config_bytes(mount, "gpu0")[:0x40] == guest_config[:0x40]


def test_qemu_multifd_device_state_packets_match_ours(
    fakevfio_mount: MountFactory, tmp_path: Path
) -> None:
    stream = expected_stream()
    with fakevfio_mount([SPEC]) as src, fakevfio_mount([DST_SPEC]) as dst:
        qemu = walk(qemu_migrate_through_proxy(src, dst, tmp_path))
        msix = [
            bar["msix"]["vectors"] for bar in src.info("gpu0")["bars"].values() if "msix" in bar
        ]
        # What the guest (SeaBIOS) programmed through QEMU into the device.
        guest_config = config_bytes(src, "gpu0")

    with fakevfio_mount([SPEC]) as src, fakevfio_mount([DST_SPEC]) as dst:
        mflags = ("--multifd-transfer", "on", "--multifd-channels", "2")
        program_as_guest(src, guest_config)
        dst_before = config_bytes(dst, "gpu0")
        incoming, addr = start_incoming("tcp:127.0.0.1:0", [str(dst.device("gpu0"))], *mflags)
        proxy = Proxy(int(addr.rsplit(":", 1)[1]))
        try:
            source = run_migrator(
                "migrate",
                "--to",
                f"tcp:127.0.0.1:{proxy.port}",
                "--json",
                *mflags,
                str(src.device("gpu0")),
            )
        finally:
            dest = finish(incoming)
            ours_streams = proxy.close()
        assert source.returncode == 0, source.stderr
        assert dest.returncode == 0, dest.stderr
        assert digest(dst, "gpu0") == digest(src, "gpu0")
        # Loaded as QEMU's vfio_pci_load_config: COMMAND and the BARs, nothing else.
        check_config_restored(guest_config, dst_before, config_bytes(dst, "gpu0"))
    ours = walk(ours_streams)

    theirs = check_device_packets(qemu, stream)
    mine = check_device_packets(ours, stream)
    assert qemu.multifd_channels == ours.multifd_channels == 2
    assert qemu.ram_packets > 0
    assert ours.ram_packets == ours.sync_packets == 0
    # The same packets: one per 1 MiB read, the same data sizes, config last.
    assert [len(p.data) for p in theirs[:-1]] == [len(p.data) for p in mine[:-1]]
    # idstr: the PCI address vs the device's name, by design; instance 0 both.
    assert re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]/vfio", theirs[0].idstr)
    assert mine[0].idstr == "gpu0/vfio"
    assert theirs[0].instance_id == mine[0].instance_id == 0
    # The config packets: QEMU's vmstate_vfio_pci_config (pci_config module
    # docstring), byte for byte. QEMU's config space is the guest's view: the
    # firmware set PCI_COMMAND, the BARs and INTERRUPT_LINE; our source device
    # was given the same values (program_as_guest), so every byte is equal --
    # the version, the config space, irq_state, the MSI-X table (all vectors
    # masked, as msix_init leaves them) and the PBA.
    qemu_cfg, our_cfg = theirs[-1].data, mine[-1].data
    msix_state = sum(16 * n + (n + 7) // 8 for n in msix)
    assert msix_state > 0
    assert len(qemu_cfg) == 8 + 4 + 256 + 16 + msix_state + 8
    assert struct.unpack_from(">i", qemu_cfg, 8)[0] == 2
    # (Whether SeaBIOS got to program them before the migration started is a
    # race: sometimes those bytes are still zero on both sides.)
    assert our_cfg == qemu_cfg
    blob = wire.decode_config_packet_data(our_cfg, max_config_bytes=4096)
    assert blob == qemu_cfg[8:-8]
    # Both spread packets over both channels.
    assert {p.channel for p in theirs} == {p.channel for p in mine} == {0, 1}


#: The first bytes of QEMU 10.0.2's main channel (q35, return-path on): header,
#: CONFIGURATION "pc-q35-10.0" (no subsection), OPEN_RETURN_PATH, PING 1.
PROLOGUE = Path(__file__).parent / "data" / "qemu-10.0-main-prologue.bin"


def main_channel_config(main: bytes, size: int) -> bytes:
    """The config blob of the (one) VFIO device in a main channel, and check its framing.

    QEMU's stream holds RAM and other devices' sections we do not parse; the
    device's DATA is a seeded stream, so the last DEV_CONFIG_STATE marker is the
    config's: the blob follows it, then EOS and the FULL section's footer.
    """
    at = main.rfind(_BE64.pack(Marker.DEV_CONFIG_STATE))
    assert at > 0, "no DEV_CONFIG_STATE in the main channel"
    blob = main[at + 8 : at + 8 + size]
    assert _BE64.unpack_from(main, at + 8 + size)[0] == Marker.END_OF_STATE
    assert main[at + 16 + size] == 0x7E  # QEMU_VM_SECTION_FOOTER
    return blob


def test_qemu_main_channel_config_section_matches_ours(
    fakevfio_mount: MountFactory, tmp_path: Path
) -> None:
    """Without multifd: the config blob in the FULL section is QEMU's, byte for byte."""
    with fakevfio_mount([SPEC]) as src, fakevfio_mount([DST_SPEC]) as dst:
        streams = qemu_migrate_through_proxy(src, dst, tmp_path, multifd=False)
        guest_config = config_bytes(src, "gpu0")
    assert [wire.sniff_channel(s[:4]) for s in streams] == ["main"]
    size = len(wire_sender.qemu_config_blob(guest_config))
    theirs = main_channel_config(streams[0], size)

    with fakevfio_mount([SPEC]) as src, fakevfio_mount([DST_SPEC]) as dst:
        program_as_guest(src, guest_config)
        dst_before = config_bytes(dst, "gpu0")
        off = ("--multifd-channels", "0")
        incoming, addr = start_incoming("tcp:127.0.0.1:0", [str(dst.device("gpu0"))], *off)
        proxy = Proxy(int(addr.rsplit(":", 1)[1]))
        try:
            source = run_migrator(
                "migrate", "--to", f"tcp:127.0.0.1:{proxy.port}", *off, str(src.device("gpu0"))
            )
        finally:
            dest = finish(incoming)
            ours_streams = proxy.close()
        assert source.returncode == 0, source.stderr
        assert dest.returncode == 0, dest.stderr
        assert digest(dst, "gpu0") == digest(src, "gpu0")
        check_config_restored(guest_config, dst_before, config_bytes(dst, "gpu0"))
    kinds = [wire.sniff_channel(s[:4]) if s else "empty" for s in ours_streams]
    assert kinds.count("main") == 1, kinds
    assert "multifd" not in kinds, kinds
    main = ours_streams[kinds.index("main")]
    records = qemu_reference.parse_stream(main, {"gpu0/vfio": size})
    ours = [r[2] for r in records if r[0] == "config"]
    assert ours == [main_channel_config(main, size)]
    assert struct.unpack_from(">i", theirs)[0] == 2
    assert ours[0] == theirs
    # The prologue: the header, QEMU's configuration section (always sent; the
    # machine name differs by design), OPEN_RETURN_PATH, then PING 1.
    recorded = PROLOGUE.read_bytes()
    assert streams[0].startswith(recorded)  # QEMU still sends what was recorded
    name = b"fakevfio"
    ours_prologue = recorded.replace(b"\0\0\0\x0bpc-q35-10.0", struct.pack(">I", len(name)) + name)
    assert main.startswith(ours_prologue), main[: len(ours_prologue)].hex(" ")
