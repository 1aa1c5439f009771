"""A source that connects and then goes silent does not hang the destination."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.migrator.helpers import finish, run_migrator, start_incoming

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(60)]


def test_silent_source_times_out_and_devices_are_reset(
    fakevfio_mount: MountFactory, tmp_path: Path
) -> None:
    with fakevfio_mount(["d0=ram:size=1M,flags=STOP_COPY+P2P"]) as dst:
        path = tmp_path / "silent.sock"
        incoming, _ = start_incoming(
            f"unix:{path}",
            [str(dst.device("d0"))],
            "--peer-timeout",
            "2",
            "--multifd-channels",
            "0",
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            # QEMU file header, then MIG_CMD_OPEN_RETURN_PATH; then silence.
            sock.sendall(struct.pack(">II", 0x5145564D, 3) + bytes.fromhex("0800010000"))
            started = time.monotonic()
            result = finish(incoming, 30)
            elapsed = time.monotonic() - started
        assert result.returncode != 0
        assert "no data from the source" in result.stderr
        assert elapsed < 10
        assert dst.state("d0") == "RUNNING"
        assert dst.log_lines("d0")[-1] == "RESET"


def test_destination_pre_copy_device_without_a_pre_copy_source_names_the_flags(
    fakevfio_mount: MountFactory, tmp_path: Path
) -> None:
    """A PRE_COPY device here waits for an INIT_DATA_SENT that a STOP_COPY-only source
    device never sends (QEMU's switchover-ack hangs the same way): both sides end within
    --peer-timeout, the destination's message says which device and why, and the
    source's device is RUNNING again with its state."""
    with (
        fakevfio_mount(["d0=ram:size=64K,flags=STOP_COPY+P2P,seed=4"]) as src,
        fakevfio_mount(["d0=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY"]) as dst,
    ):
        before = src.mount.digest("d0")
        path = tmp_path / "m.sock"
        incoming, _ = start_incoming(f"unix:{path}", [str(dst.device("d0"))], "--peer-timeout", "2")
        started = time.monotonic()
        source = run_migrator(
            "migrate", "--to", f"unix:{path}", "--peer-timeout", "2", str(src.device("d0"))
        )
        result = finish(incoming, 30)
        elapsed = time.monotonic() - started
        assert source.returncode != 0
        assert result.returncode != 0
        assert "INIT_DATA_SENT of d0" in result.stderr, result.stderr
        assert "same migration flags" in result.stderr
        assert elapsed < 15
        assert src.state("d0") == "RUNNING"
        assert src.mount.digest("d0") == before
