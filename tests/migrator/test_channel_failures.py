"""Connections and processes that die mid-migration, between two real migrators.

Four 32 MiB ``ram`` devices with a limited read bandwidth make the stop-copy
phase last a few seconds, long enough to break things in the middle of it:
a TCP proxy cuts one multifd channel after some bytes, or one side is
SIGKILLed. The survivor must exit non-zero promptly, source devices must be
RUNNING with the state they had, destination devices reset.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MountFactory, MountHandle
from tests.migrator import wire_sender as ws
from tests.migrator.helpers import MIGRATOR, digest, finish, start_incoming

pytestmark = [pytest.mark.fuse, pytest.mark.slow, pytest.mark.deadline(60)]
_names = itertools.count()
Mounts = tuple[MountHandle, MountHandle]
MULTIFD_MAGIC = struct.pack(">I", ws.MULTIFD_MAGIC)
#: "Promptly": generous enough for a loaded 2-core CI machine.
PROMPT_S = 8
DEVICE_OPTS = "size=32M flags=STOP_COPY+P2P seed={seed} read_bandwidth=24M"


@pytest.fixture(scope="module")
def mounts(fakevfio_mount_module: MountFactory) -> Iterator[Mounts]:
    with fakevfio_mount_module([]) as src, fakevfio_mount_module([]) as dst:
        yield src, dst


@pytest.fixture
def devices(mounts: Mounts) -> Iterator[list[str]]:
    """Four fresh source/destination pairs, removed afterwards (they are big)."""
    src, dst = mounts
    names = [f"c{next(_names)}" for _ in range(4)]
    for i, name in enumerate(names):
        assert src.create(name, "ram", DEVICE_OPTS.format(seed=i + 1)) is None
        assert dst.create(name, "ram", "size=32M flags=STOP_COPY+P2P") is None
    yield names
    for mount in (src, dst):
        for name in names:
            mount.reset(name)
            assert mount.remove(name) is None


class CuttingProxy:
    """Forwards tcp connections; the first multifd channel is cut after ``cut_after`` bytes."""

    def __init__(self, target: str, cut_after: int) -> None:
        host, _, port = target.removeprefix("tcp:").rpartition(":")
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.cut_at: float | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self._multifd_seen = 0
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
                self._socks += [client, server]
                first = client.recv(4, socket.MSG_WAITALL)
                limit = None
                if first == MULTIFD_MAGIC:
                    if self._multifd_seen == 0:
                        limit = self.cut_after
                    self._multifd_seen += 1
                server.sendall(first)
                for a, b, lim in ((client, server, limit), (server, client, None)):
                    threading.Thread(target=self._pump, args=(a, b, lim), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, limit: int | None) -> None:
        sent = 0
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    b.sendall(data[: limit - sent])
                    self.cut_at = time.monotonic()
                    for s in (a, b):
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.close()
                    return
                b.sendall(data)
                sent += len(data)
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


def _start_source(addr: str, src: MountHandle, names: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*MIGRATOR, "migrate", "--to", addr, "--multifd-channels", "4", "--multifd-transfer", "on"]
        + [str(src.device(n)) for n in names],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_stop_copy(src: MountHandle, names: list[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not any(src.state(n) == "STOP_COPY" for n in names):
        assert time.monotonic() < deadline, "the source never reached STOP_COPY"
        time.sleep(0.02)


def _check_source_intact(src: MountHandle, names: list[str], before: dict[str, str]) -> None:
    for name in names:
        assert src.state(name) == "RUNNING"
        assert digest(src, name) == before[name]


def test_cut_multifd_channel_fails_both_sides(mounts: Mounts, devices: list[str]) -> None:
    src, dst = mounts
    before = {n: digest(src, n) for n in devices}
    incoming, addr = start_incoming(
        "tcp:127.0.0.1:0", [str(dst.device(n)) for n in devices], "--multifd-channels", "4"
    )
    proxy = CuttingProxy(addr, cut_after=8 << 20)
    try:
        source = _start_source(proxy.addr, src, devices)
        src_result = finish(source, 30)
        src_done = time.monotonic()
        dst_result = finish(incoming, 30)
        dst_done = time.monotonic()
    finally:
        proxy.close()
    assert proxy.cut_at is not None, "the channel was never cut"
    assert src_result.returncode != 0, src_result.stderr
    assert dst_result.returncode != 0, dst_result.stderr
    assert src_done - proxy.cut_at < PROMPT_S
    assert dst_done - proxy.cut_at < PROMPT_S
    assert "stop-copy" in ws.error_line(src_result.stderr)
    assert "load" in ws.error_line(dst_result.stderr)
    _check_source_intact(src, devices, before)
    for name in devices:
        ws.assert_reset(dst, name)


def test_sigkill_destination_mid_stop_copy(mounts: Mounts, devices: list[str]) -> None:
    src, dst = mounts
    before = {n: digest(src, n) for n in devices}
    incoming, addr = start_incoming(
        "tcp:127.0.0.1:0", [str(dst.device(n)) for n in devices], "--multifd-channels", "4"
    )
    source = _start_source(addr, src, devices)
    try:
        _wait_for_stop_copy(src, devices)
        time.sleep(0.3)
        incoming.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        result = finish(source, 30)
    finally:
        incoming.kill()
        incoming.communicate()
    assert result.returncode != 0
    assert time.monotonic() - killed < PROMPT_S
    line = ws.error_line(result.stderr)
    assert "stop-copy" in line, line
    _check_source_intact(src, devices, before)


def test_sigkill_source_mid_transfer(mounts: Mounts, devices: list[str], tmp_path: Path) -> None:
    src, dst = mounts
    incoming, addr = start_incoming(
        "tcp:127.0.0.1:0", [str(dst.device(n)) for n in devices], "--multifd-channels", "4"
    )
    source = _start_source(addr, src, devices)
    try:
        _wait_for_stop_copy(src, devices)
        time.sleep(0.3)
        source.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        result = finish(incoming, 30)
    finally:
        source.kill()
        source.communicate()
    assert result.returncode != 0
    assert time.monotonic() - killed < PROMPT_S
    ws.error_line(result.stderr)
    for name in devices:
        ws.assert_reset(dst, name)
