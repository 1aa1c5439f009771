"""A raw QEMU 10.1 migration sender for hostile-input tests.

Written only from ``/work/shared/reference/qemu-vfio-multifd.md`` (sections
1.1-1.2, 3.2-3.4) and ``/work/shared/INTERFACES.md`` section 7; it shares no
code with ``migrator`` (main-channel records come from the independent
``qemu_reference`` model, multifd packets are packed with ``struct`` here).
Every field can be overridden, so a test can send exactly the broken bytes it
wants to a real ``migrator incoming`` over real sockets.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

from tests.conftest import MountHandle
from tests.migrator import qemu_reference as ref

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
FLAG_SYNC = 1
FLAG_DEVICE_STATE = 0x40
VFIO_CONFIG_STATE = 1
RP_SHUT = 1
RP_SWITCHOVER_ACK = 7
#: QEMU's VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE: one read() per data packet.
DATA_BUFFER = 1 << 20

_INIT = struct.Struct(">II16sB7x32x")
_DS_HEADER = struct.Struct(">III256sII")
_VFIO = struct.Struct(">III")
assert _INIT.size == 64
assert _DS_HEADER.size == 276


# --- multifd bytes ---------------------------------------------------------------


def init_packet(
    channel_id: int,
    uuid: bytes = bytes(16),
    *,
    magic: int = MULTIFD_MAGIC,
    version: int = MULTIFD_VERSION,
) -> bytes:
    """MultiFDInit_t (64 bytes)."""
    return _INIT.pack(magic, version, uuid, channel_id)


def device_state_header(
    idstr: str,
    size: int,
    *,
    instance_id: int = 0,
    magic: int = MULTIFD_MAGIC,
    version: int = MULTIFD_VERSION,
    flags: int = FLAG_DEVICE_STATE,
    idstr_field: bytes | None = None,
) -> bytes:
    """MultiFDPacketDeviceState_t (276 bytes); ``size`` is next_packet_size."""
    field = idstr_field if idstr_field is not None else idstr.encode().ljust(256, b"\0")
    assert len(field) == 256
    return _DS_HEADER.pack(magic, version, flags, field, instance_id, size)


def vfio_payload(idx: int, data: bytes, *, config: bool = False, version: int = 0) -> bytes:
    """VFIODeviceStatePacket: be32 version, be32 idx, be32 flags, data."""
    return _VFIO.pack(version, idx, VFIO_CONFIG_STATE if config else 0) + data


def packet(idstr: str, payload: bytes, **header: object) -> bytes:
    """A whole device-state packet: header for ``payload``, then ``payload``."""
    return device_state_header(idstr, len(payload), **header) + payload  # type: ignore[arg-type]


def _capability(config: bytes, cap_id: int) -> int | None:
    """The offset of standard capability ``cap_id`` (PCI 3.0 6.7), or None."""
    if not config[6] & 0x10:  # PCI_STATUS_CAP_LIST
        return None
    pos, seen = config[0x34] & 0xFC, 0
    while pos and seen < 48:
        if config[pos] == cap_id:
            return pos
        pos, seen = config[pos + 1] & 0xFC, seen + 1
    return None


def qemu_config_blob(config: bytes) -> bytes:
    """QEMU's vmstate_vfio_pci_config for a device with config space ``config``.

    hw/pci/pci.c vmstate_pci_device: int32 version_id 2, the config space
    (4096 bytes for PCI Express, else 256), irq_state (4 int32, none asserted);
    hw/pci/msix.c msix_save: with MSI-X, the table as msix_init leaves it
    (every vector masked: vector control 1), then the PBA (nothing pending).
    """
    express = _capability(config, 0x10) is not None and len(config) == 4096
    out = (2).to_bytes(4, "big") + config[: 4096 if express else 256] + bytes(16)
    msix = _capability(config, 0x11)
    if msix is not None:
        n = (int.from_bytes(config[msix + 2 : msix + 4], "little") & 0x7FF) + 1
        out += (bytes(12) + (1).to_bytes(4, "little")) * n + bytes((n + 7) // 8)
    return out


def config_packet_data(blob: bytes) -> bytes:
    """Config packet data: [DEV_CONFIG_STATE][QEMU's config blob][EOS] (INTERFACES 7)."""
    return (
        struct.pack(">Q", ref.MARKERS["CONFIG_STATE"])
        + blob
        + struct.pack(">Q", ref.MARKERS["EOS"])
    )


def device_packets(idstr: str, chunks: Sequence[bytes], config: bytes) -> list[bytes]:
    """What QEMU's save thread queues for one device: data idx 0..n-1, then config idx n.

    ``config`` is the device's config space; the config packet carries its QEMU blob.
    """
    out = [packet(idstr, vfio_payload(i, c)) for i, c in enumerate(chunks)]
    blob = qemu_config_blob(config)
    out.append(packet(idstr, vfio_payload(len(chunks), config_packet_data(blob), config=True)))
    return out


# --- main channel bytes ------------------------------------------------------------


def configuration_with_uuid(uuid: bytes, machine: str = "pc") -> bytes:
    """QEMU_VM_CONFIGURATION with the ``configuration/uuid`` subsection (vmstate format)."""
    name = b"configuration/uuid"
    return (
        ref.build_stream([("configuration", machine)])
        + bytes([ref.T_SUB, len(name)])
        + name
        + struct.pack(">I", 1)
        + uuid
    )


def main_prologue(
    idstrs: Sequence[str], *, return_path: bool = True, configuration: bytes = b""
) -> bytes:
    """Header, [configuration], OPEN_RETURN_PATH, then SECTION_START [SETUP][EOS] per device."""
    head = ref.build_stream([("header", ref.STREAM_VERSION)]) + configuration
    records: list[ref.Record] = []
    if return_path:
        records.append(("command", ref.CMD_OPEN_RETURN_PATH, b""))
    for sid, idstr in enumerate(idstrs, 1):
        records += [
            ("start", sid, idstr, 0, 1),
            ("marker", sid, "SETUP"),
            ("marker", sid, "EOS"),
            ("footer", sid),
        ]
    return head + ref.build_stream(records)


def switchover_start() -> bytes:
    return ref.build_stream([("command", ref.CMD_SWITCHOVER_START, b"")])


def main_epilogue(idstrs: Sequence[str]) -> bytes:
    """Multifd mode: SECTION_END [EOS] and SECTION_FULL [EOS] per device, then EOF."""
    records: list[ref.Record] = []
    for sid, _ in enumerate(idstrs, 1):
        records += [("end", sid), ("marker", sid, "EOS"), ("footer", sid)]
    for sid, idstr in enumerate(idstrs, 1):
        records += [("full", sid, idstr, 0, 1), ("marker", sid, "EOS"), ("footer", sid)]
    records.append(("eof",))
    return ref.build_stream(records)


# --- a real source device, driven through its files ----------------------------------


def read_stop_copy(device_dir: Path) -> tuple[list[bytes], bytes]:
    """Move a fakevfio device to STOP_COPY and read its whole stream, one read per chunk."""
    fd = os.open(device_dir / "migration" / "state", os.O_WRONLY)
    try:
        os.write(fd, b"STOP_COPY\n")
    finally:
        os.close(fd)
    chunks: list[bytes] = []
    fd = os.open(device_dir / "migration" / "data", os.O_RDONLY)
    try:
        while chunk := os.read(fd, DATA_BUFFER):
            chunks.append(chunk)
    finally:
        os.close(fd)
    fd = os.open(device_dir / "config", os.O_RDONLY)
    try:
        config = os.read(fd, 4096)
    finally:
        os.close(fd)
    return chunks, config


# --- sockets ------------------------------------------------------------------------------


def connect(addr: str, timeout: float) -> socket.socket:
    """Connect to ``tcp:HOST:PORT`` or ``unix:PATH``."""
    kind, _, rest = addr.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    assert kind == "unix", addr
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(rest)
    return sock


class RawSource:
    """One main connection plus multifd channels to a ``migrator incoming``."""

    def __init__(self, addr: str, *, timeout: float = 20.0) -> None:
        self.addr = addr
        self.timeout = timeout
        self.main = connect(addr, timeout)
        self.channels: list[socket.socket] = []

    def send_main(self, data: bytes) -> None:
        self.main.sendall(data)

    def open_channels(self, n: int, uuid: bytes = bytes(16)) -> None:
        for i in range(n):
            self.open_raw_channel(init_packet(i, uuid))

    def open_raw_channel(self, first_bytes: bytes) -> socket.socket:
        sock = connect(self.addr, self.timeout)
        sock.sendall(first_bytes)
        self.channels.append(sock)
        return sock

    def send_shuffled(self, packets: Sequence[bytes], rng: random.Random) -> list[int]:
        """Send ``packets`` in a random order, each on a random channel; returns the order."""
        order = list(range(len(packets)))
        rng.shuffle(order)
        for i in order:
            rng.choice(self.channels).sendall(packets[i])
        return order

    def close_channels(self) -> None:
        for sock in self.channels:
            sock.close()
        self.channels.clear()

    def read_return_path(self) -> list[tuple[int, bytes]]:
        """Every return-path message until the destination closes the connection.

        The main channel stays open for writing, as QEMU's does: the
        destination's verdict must not depend on seeing our EOF.
        """
        data = b""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                chunk = self.main.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            data += chunk
        return ref.parse_rp(data)

    def close(self) -> None:
        self.close_channels()
        self.main.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- checks shared by the hostile-input tests ---------------------------------------------


def error_line(stderr: str) -> str:
    """The single ``migrator: error: ...`` line of a failed run (asserts there is one)."""
    lines = [line for line in stderr.splitlines() if line.startswith("migrator: error: ")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


def wait_state(mount: MountHandle, name: str, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (now := mount.state(name)) != state:
        assert time.monotonic() < deadline, f"{name} stayed {now}, expected {state}"
        time.sleep(0.01)


def assert_reset(mount: MountHandle, name: str) -> None:
    """A destination device after a failed load: RUNNING, and its log ends with RESET."""
    assert mount.state(name) == "RUNNING"
    assert mount.log_lines(name)[-1] == "RESET", mount.log_lines(name)


def quietly(fn: Callable[[], object]) -> None:
    """Send to a destination that may already have hung up on us."""
    with contextlib.suppress(OSError):
        fn()
