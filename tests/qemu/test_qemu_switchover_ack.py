"""QEMU 11.1's switchover-ack mechanism against a real QEMU 11.1, in both directions.

QEMU 11.1 on its own machine types (``q35`` = ``pc-q35-11.1``, migration
property ``switchover-ack-legacy=off``) answers every INIT_DATA_SENT with one
SWITCHOVER_ACK, and its source sends INIT_DATA_SENT again when a device
re-initialised (VFIO_PRECOPY_INFO_REINIT) after its first one. The device
here re-initialises right after its whole initial data was read
(``reinit_after`` = its initial bytes), so the second INIT_DATA_SENT follows.

* migrator source -> QEMU 11.1 destination: with ``--qemu-compat 11.1`` the
  return path QEMU's destination writes is byte for byte what it wrote for a
  QEMU 11.1 source (tests/data/qemu-11.1-rp-reinit.bin: PONG 1, ACK, ACK,
  SHUT 0), the main channel carries two INIT_DATA_SENT, and the device state
  arrives (digest). The same test runs against QEMU 10.0 with ``10.0``
  (legacy: one INIT_DATA_SENT, one ACK). A device without PRE_COPY: 11.1 sends no ACK at all, and
  the ``11.1`` source does not wait for one.
* QEMU 11.1 source -> migrator destination: QEMU's stream carries RAM and
  other devices' sections a VFIO-only destination cannot parse, so QEMU's own
  VFIO bytes are cut out of its main channel (every VFIO section and
  SWITCHOVER_START, in QEMU's order). Replayed from a recorded QEMU 11.1 ->
  QEMU 11.1 migration: with ``11.1`` ``migrator incoming`` writes the return
  path the QEMU 11.1 destination wrote and loads the source's state; with
  ``10.0`` it refuses the second INIT_DATA_SENT, as QEMU 10.x would. Live,
  through a filtering proxy (:class:`VfioFilter`), QEMU 11.1's source acts on
  our return path: with ``11.1`` it completes (re-initialising device, and a
  device without PRE_COPY); with ``10.0`` our destination refuses the second
  INIT_DATA_SENT, and without PRE_COPY QEMU 11.1 itself reports our ACK at
  OPEN_RETURN_PATH as "Switchover ack pending num underflowed".
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakevfio.guest import Qmp
from tests.conftest import MountFactory, MountHandle
from tests.migrator import wire_sender
from tests.migrator.helpers import Result, digest, finish, run_migrator, start_incoming
from tests.test_qemu import _MATRIX, qemu_under_run, require, version_of, wait_migration
from tests.test_qemu_wire import Proxy

pytestmark = [pytest.mark.fuse, pytest.mark.qemu, pytest.mark.slow, pytest.mark.deadline(240)]

FLAGS = "STOP_COPY+P2P+PRE_COPY"
SIZE = 16 << 20
SEED = 5
#: The initial bytes of a 16 MiB ram device (its stream header included): the
#: re-initialisation comes with the first query after they were all read.
INITIAL_BYTES = 16777528
SPEC = f"gpu0=ram:size=16M,flags={FLAGS},seed={SEED},reinit_after={INITIAL_BYTES}"
DST_SPEC = f"gpu0=ram:size=16M,flags={FLAGS}"
NO_PRE_COPY = f"gpu0=ram:size=4M,flags=STOP_COPY+P2P,seed={SEED}"
#: QEMU's idstr for the one vfio-pci device of tests/test_qemu.qemu_command on q35.
IDSTR = "0000:00:01.0/vfio"
DATA = Path(__file__).resolve().parent.parent / "data"
RECORDED_RP = (DATA / "qemu-11.1-rp-reinit.bin").read_bytes()
RECORDED_LEGACY_RP = (DATA / "qemu-11.1-legacy-rp-reinit.bin").read_bytes()
INIT_DATA_SENT = struct.pack(">Q", 0xFFFFFFFFEF100005)
CAPS = [{"capability": c, "state": True} for c in ("return-path", "switchover-ack")]


@pytest.fixture
def qemu11() -> str:
    """QEMU 11.1 of the matrix (or a FAKEVFIO_QEMU build >= 11.1)."""
    for build in _MATRIX:
        found = version_of(build.binary)
        if build.expected == "11.1" or (found and tuple(map(int, found.split("."))) >= (11, 1)):
            return require(build)
    pytest.skip("no QEMU 11.1 in the matrix (FAKEVFIO_QEMU names an older build)")


class RecordingProxy(Proxy):
    """test_qemu_wire's Proxy for one connection (multifd off): both its directions."""

    def one_connection(self) -> tuple[bytes, bytes]:
        """Stop; the one connection's (main channel, return path) bytes."""
        self.stop()
        assert len(self.streams) == 1, f"{len(self.streams)} connections (multifd is off)"
        return bytes(self.streams[0]), bytes(self.backs[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@contextlib.contextmanager
def qemu_destination(
    dst: MountHandle, tmp: Path, qemu: str
) -> Iterator[tuple[RecordingProxy, Qmp]]:
    """A QEMU destination (q35, return-path + switchover-ack) behind a RecordingProxy."""
    port = _free_port()
    with qemu_under_run(dst, tmp, "dst", "off", "-incoming", "defer", qemu=qemu) as dq:
        dq.cmd("migrate-set-capabilities", capabilities=CAPS)
        dq.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        yield RecordingProxy(port), dq


def _migrator_to_qemu(
    src: MountHandle, dst: MountHandle, tmp: Path, qemu: str, *opts: str
) -> tuple[bytes, bytes]:
    """``migrator migrate`` into a QEMU destination (q35 of its version); its bytes."""
    with qemu_destination(dst, tmp, qemu) as (proxy, dq):
        try:
            source = run_migrator(
                "migrate",
                "--to",
                f"tcp:127.0.0.1:{proxy.port}",
                "--multifd-channels",
                "0",
                "--machine",
                f"pc-q35-{version_of(qemu)}",
                *opts,
                f"{src.device('gpu0')},id={IDSTR}",
            )
        finally:
            main, rp = proxy.one_connection()
        assert source.returncode == 0, source.stderr
        info = wait_migration(dq, timeout=30)
        assert info["status"] == "completed", info
        dq.cmd("cont")  # RESUMING -> STOP loads the state, then RUNNING
        dq.cmd("stop")
    assert digest(dst, "gpu0") == digest(src, "gpu0")
    return main, rp


def _is_11_1_or_later(qemu: str) -> bool:
    version = version_of(qemu)
    assert version is not None
    return tuple(map(int, version.split("."))) >= (11, 1)


def test_migrator_source_to_a_qemu_destination_as_that_qemu(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu: str
) -> None:
    """Each QEMU of the matrix as the destination, the migrator as its own QEMU's source:
    11.1 (q35 = pc-q35-11.1) with ``--qemu-compat 11.1``, 10.x with ``10.0``."""
    new = _is_11_1_or_later(qemu)
    compat = "11.1" if new else "10.0"
    with fakevfio_mount([SPEC]) as src, fakevfio_mount([DST_SPEC]) as dst:
        main, rp = _migrator_to_qemu(src, dst, tmp_path, qemu, "--qemu-compat", compat)
        assert src.info("gpu0")["state"] == "STOP"
    if new:
        assert main.count(INIT_DATA_SENT) == 2  # again after the re-initialisation
        assert rp == RECORDED_RP  # what QEMU 11.1's destination wrote for QEMU 11.1
    else:
        # 10.0: one INIT_DATA_SENT (the re-initialised data still goes in pre-copy:
        # the source does not switch over before it was read), one ACK.
        assert main.count(INIT_DATA_SENT) == 1
        assert rp == RECORDED_LEGACY_RP


def test_migrator_source_without_pre_copy_does_not_wait_for_qemu_11_1(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu11: str
) -> None:
    """No pre-copy device: 11.1 acks nothing (10.0 acked at OPEN_RETURN_PATH)."""
    spec = f"gpu0=ram:size=4M,flags=STOP_COPY+P2P,seed={SEED}"
    with fakevfio_mount([spec]) as src, fakevfio_mount(["gpu0=ram:size=4M"]) as dst:
        main, rp = _migrator_to_qemu(
            src, dst, tmp_path, qemu11, "--qemu-compat", "11.1", "--precopy-time-limit", "5"
        )
    assert INIT_DATA_SENT not in main
    assert rp == bytes.fromhex("0002 0004 00000001  0001 0004 00000000")  # PONG 1, SHUT 0


# -- QEMU 11.1 source -> migrator destination ------------------------------------------

_SECTION_HEAD = struct.Struct(">BI")
_MARKER = struct.Struct(">Q")
_EOS, _SETUP, _CONFIG, _DATA, _INIT = (0xFFFFFFFFEF100000 | n for n in (1, 3, 2, 4, 5))


def _vfio_payload_end(main: bytes, pos: int, config_size: int) -> int:
    """The end of one VFIO section payload starting at ``pos`` (after its header)."""
    while True:
        (marker,) = _MARKER.unpack_from(main, pos)
        pos += 8
        if marker in (_EOS, _INIT):
            return pos
        if marker == _DATA:
            (size,) = _MARKER.unpack_from(main, pos)
            pos += 8 + size
        elif marker == _CONFIG:
            pos += config_size
        elif marker != _SETUP:
            raise AssertionError(f"unexpected VFIO marker 0x{marker:x} at {pos - 8}")


def qemu_vfio_bytes(main: bytes, idstr: str, config_size: int) -> list[bytes]:
    """QEMU's own VFIO sections (with footers) and SWITCHOVER_START, in stream order.

    The START and FULL headers are found by the idstr; PART and END headers by
    the section id followed by a VFIO marker; each payload is then walked by its
    markers and DATA sizes, so data bytes are never searched.
    """
    name = bytes([len(idstr)]) + idstr.encode() + struct.pack(">II", 0, 1)
    m = re.search(rb"\x01(....)" + re.escape(name), main, re.DOTALL)
    assert m, f"no SECTION_START for {idstr}"
    sid = m.group(1)
    pieces: list[tuple[int, bytes]] = []
    head_re = re.compile(
        rb"(?:[\x01\x04]" + re.escape(sid + name) + rb"|[\x02\x03]" + re.escape(sid) + rb")"
        rb"(?=\xff\xff\xff\xff\xef\x10\x00[\x01-\x05])",
        re.DOTALL,
    )
    pos = start = m.start()
    while (h := head_re.search(main, pos)) is not None:
        end = _vfio_payload_end(main, h.end(), config_size)
        assert main[end : end + 5] == b"\x7e" + sid, f"no footer after the section at {h.start()}"
        pieces.append((h.start(), main[h.start() : end + 5]))
        pos = end + 5
    switchover = main.index(b"\x08\x00\x0b\x00\x00", start)  # MIG_CMD_SWITCHOVER_START
    pieces.append((switchover, main[switchover : switchover + 5]))
    return [piece for _, piece in sorted(pieces)]


def _replayed_stream(main: bytes, config_size: int) -> bytes:
    """QEMU's VFIO bytes as a stream of their own: QEMU's header and configuration,
    OPEN_RETURN_PATH and PING 1, the VFIO pieces, EOF."""
    prologue_end = main.index(b"\x08\x00\x02\x00\x04\x00\x00\x00\x01") + 9  # PING 1
    assert main[prologue_end - 14 : prologue_end - 9] == b"\x08\x00\x01\x00\x00"  # OPEN_RP
    return main[:prologue_end] + b"".join(qemu_vfio_bytes(main, IDSTR, config_size)) + b"\x00"


def _play(stream: bytes, dst: MountHandle, *opts: str) -> tuple[bytes, Result]:
    incoming, addr = start_incoming(
        "tcp:127.0.0.1:0", [f"{dst.device('gpu0')},id={IDSTR}"], "--multifd-channels", "0", *opts
    )
    rp = bytearray()
    try:
        host, port = addr.rsplit(":", 1)
        with socket.create_connection((host.removeprefix("tcp:"), int(port))) as conn:
            conn.settimeout(30)
            with contextlib.suppress(OSError):
                conn.sendall(stream)
            with contextlib.suppress(OSError):
                while chunk := conn.recv(1 << 16):
                    rp += chunk
    finally:
        result = finish(incoming)
    return bytes(rp), result


def test_qemu_11_1_source_bytes_into_migrator_destination(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu11: str
) -> None:
    port = _free_port()
    with fakevfio_mount([SPEC]) as src, fakevfio_mount([DST_SPEC]) as dst:
        with (
            qemu_under_run(src, tmp_path, "src", "off", qemu=qemu11) as sq,
            qemu_under_run(dst, tmp_path, "dst", "off", "-incoming", "defer", qemu=qemu11) as dq,
        ):
            for q in (sq, dq):
                q.cmd("migrate-set-capabilities", capabilities=CAPS)
            sq.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30, "downtime-limit": 1000})
            sq.cmd("cont")
            dq.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            proxy = RecordingProxy(port)
            try:
                sq.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
                info = wait_migration(sq, timeout=60)
                assert info["status"] == "completed", info
                assert wait_migration(dq, timeout=30)["status"] == "completed"
            finally:
                main, qemu_rp = proxy.one_connection()
        source_digest = digest(src, "gpu0")
    assert main.count(INIT_DATA_SENT) == 2
    assert qemu_rp == RECORDED_RP  # QEMU 11.1 still writes what was recorded
    with fakevfio_mount([DST_SPEC]) as dst:
        stream = _replayed_stream(main, _config_size(main))
        ours, result = _play(stream, dst, "--qemu-compat", "11.1")
        assert result.returncode == 0, result.stderr
        assert ours == qemu_rp
        assert digest(dst, "gpu0") == source_digest
    with fakevfio_mount([DST_SPEC]) as dst:
        ours, result = _play(stream, dst, "--qemu-compat", "10.0")
        assert result.returncode != 0
        assert "approved more times" in result.stderr
        assert "--qemu-compat 11.1" in result.stderr
        assert ours.endswith(bytes.fromhex("0001 0004 00000001"))  # SHUT 1


def _config_size(main: bytes) -> int:
    """QEMU's config blob size: from the last DEV_CONFIG_STATE to its EOS and footer."""
    at = main.rindex(_MARKER.pack(_CONFIG))
    end = main.index(_MARKER.pack(_EOS) + b"\x7e", at)
    return end - at - 8


# -- live: QEMU 11.1 source -> migrator destination, through a VFIO-only filter --------


class VfioFilter:
    """A live proxy from a QEMU source to ``migrator incoming``: forwards QEMU's
    prologue (header, configuration, OPEN_RETURN_PATH, PING 1), every VFIO piece
    (qemu_vfio_bytes' patterns, each forwarded once complete), SWITCHOVER_START
    (after a section footer), and at the VM description QEMU's EOF and the
    description; drops everything else (RAM, other devices). The destination's
    return path goes back to QEMU unchanged, so QEMU's source acts on our ACKs."""

    def __init__(self, target: tuple[str, int], idstr: str, config_size: int) -> None:
        self.target = target
        self.config_size = config_size
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port: int = self.listener.getsockname()[1]
        name = bytes([len(idstr)]) + idstr.encode() + struct.pack(">II", 0, 1)
        self._start = re.compile(rb"\x01(....)" + re.escape(name), re.DOTALL)
        self._name = name
        self.forwarded = bytearray()
        self.rp = bytearray()
        self.error: BaseException | None = None
        self.closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            qemu, _ = self.listener.accept()
            with qemu, socket.create_connection(self.target) as ours:
                back = threading.Thread(target=self._relay_rp, args=(ours, qemu), daemon=True)
                back.start()
                self._filter(qemu, ours)
                with contextlib.suppress(OSError):
                    ours.shutdown(socket.SHUT_WR)  # QEMU's stream ended: so does ours
                back.join(30)
        except BaseException as exc:  # reported by close()
            self.error = exc

    def _relay_rp(self, ours: socket.socket, qemu: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := ours.recv(1 << 16):
                self.rp += chunk
                qemu.sendall(chunk)

    def _send(self, ours: socket.socket, data: bytes) -> None:
        self.forwarded += data
        try:
            ours.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True  # the destination gave up (its verdict is on the return path)

    def _filter(self, qemu: socket.socket, ours: socket.socket) -> None:
        buf = bytearray()
        sid: bytes | None = None
        head: re.Pattern[bytes] | None = None
        ping = b"\x08\x00\x02\x00\x04\x00\x00\x00\x01"
        while True:
            chunk = qemu.recv(1 << 20)
            if not chunk:
                return
            buf += chunk
            if self.closed:
                buf.clear()  # keep QEMU's side flowing until it gives up too
                continue
            if sid is None:  # the prologue, then the VFIO section id
                at = buf.find(ping)
                m = self._start.search(buf)
                if at < 0 or m is None:
                    continue
                self._send(ours, bytes(buf[: at + len(ping)]))
                sid = m.group(1)
                head = re.compile(
                    rb"(?:[\x01\x04]"
                    + re.escape(sid + self._name)
                    + rb"|[\x02\x03]"
                    + re.escape(sid)
                    + rb")(?=\xff\xff\xff\xff\xef\x10\x00[\x01-\x05])"
                    rb"|(?<=\x7e....)\x08\x00\x0b\x00\x00|\x00\x06(?=....\{)",
                    re.DOTALL,
                )
                del buf[: m.start()]
            assert head is not None
            while (h := head.search(buf)) is not None:
                piece = bytes(buf[h.start() : h.end()])
                if piece == b"\x00\x06":  # QEMU_VM_EOF, then the VM description
                    (size,) = struct.unpack_from(">I", buf, h.end())
                    while len(buf) < h.end() + 4 + size:
                        more = qemu.recv(1 << 20)
                        if not more:
                            break
                        buf += more
                    self._send(ours, bytes(buf[h.start() : h.end() + 4 + size]))
                    with contextlib.suppress(OSError):
                        while qemu.recv(1 << 16):
                            pass
                    return
                if piece == b"\x08\x00\x0b\x00\x00":
                    self._send(ours, piece)
                    del buf[: h.end()]
                    continue
                try:
                    end = _vfio_payload_end(bytes(buf), h.end(), self.config_size) + 5
                except struct.error:
                    break  # the piece is not complete yet
                if end > len(buf):
                    break
                self._send(ours, bytes(buf[h.start() : end]))
                del buf[:end]
            # Keep only what a head could still start in.
            if head.search(buf) is None and len(buf) > 64:
                del buf[: len(buf) - 64]

    def close(self) -> None:
        self._thread.join(60)
        self.listener.close()
        assert not self._thread.is_alive(), "the filter is still running"
        if self.error is not None:
            raise self.error


def _wait_verdict(qmp: Qmp, timeout: float = 60) -> dict[str, Any]:
    """query-migrate once the migration ended or QEMU recorded an error."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.cmd("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled") or "error-desc" in info:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration did not finish: {info}")
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("spec", "compat", "ok"),
    [
        pytest.param(SPEC, "11.1", True, id="reinit-11.1"),
        pytest.param(SPEC, "10.0", False, id="reinit-10.0"),
        pytest.param(
            f"gpu0=ram:size=4M,flags=STOP_COPY+P2P,seed={SEED}", "10.0", False, id="nopre-10.0"
        ),
        pytest.param(
            f"gpu0=ram:size=4M,flags=STOP_COPY+P2P,seed={SEED}", "11.1", True, id="nopre-11.1"
        ),
    ],
)
def test_live_qemu_11_1_source_into_migrator_destination(
    fakevfio_mount: MountFactory, tmp_path: Path, qemu11: str, spec: str, compat: str, ok: bool
) -> None:
    """QEMU 11.1's source acts on the migrator destination's return path, live."""
    dst_spec = spec.split(",seed")[0]
    with fakevfio_mount([spec]) as src, fakevfio_mount([dst_spec]) as dst:
        config_size = len(wire_sender.qemu_config_blob(dst.read_bytes(dst.file("gpu0", "config"))))
        incoming, addr = start_incoming(
            "tcp:127.0.0.1:0",
            [f"{dst.device('gpu0')},id={IDSTR}"],
            "--multifd-channels",
            "0",
            "--qemu-compat",
            compat,
        )
        host, port = addr.removeprefix("tcp:").rsplit(":", 1)
        filt = VfioFilter((host, int(port)), IDSTR, config_size)
        try:
            with qemu_under_run(src, tmp_path, "src", "off", qemu=qemu11) as sq:
                sq.cmd("migrate-set-capabilities", capabilities=CAPS)
                sq.cmd(
                    "migrate-set-parameters",
                    **{
                        "max-bandwidth": 8 << 30,
                        "downtime-limit": 1000,
                        "avail-switchover-bandwidth": 1 << 30,
                    },
                )
                sq.cmd("cont")
                sq.cmd("migrate", uri=f"tcp:127.0.0.1:{filt.port}")
                info = _wait_verdict(sq)
                if info["status"] not in ("completed", "failed"):
                    sq.cmd("migrate_cancel")  # QEMU keeps an RP error pending while active
        finally:
            dest = finish(incoming)
            filt.close()
        if ok:
            assert info["status"] == "completed", info
            assert "error-desc" not in info, info
            assert dest.returncode == 0, dest.stderr
            assert digest(dst, "gpu0") == digest(src, "gpu0")
        else:
            assert "error-desc" in info, info
        if "reinit_after" in spec:
            # QEMU's source sends INIT_DATA_SENT again after the re-initialisation
            # (a 10.0 destination refuses that second one).
            assert filt.forwarded.count(INIT_DATA_SENT) == 2
        else:
            assert INIT_DATA_SENT not in filt.forwarded
        if not ok and "PRE_COPY" in spec:
            assert "switchover approved more times than needed" in dest.stderr, dest.stderr
        if not ok and "PRE_COPY" not in spec:
            # A 10.0 destination acks at OPEN_RETURN_PATH; QEMU 11.1 asked for nothing.
            assert "Switchover ack pending num underflowed" in info.get("error-desc", ""), info
