"""A source that connects and then goes silent does not hang the destination."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.migrator.helpers import finish, start_incoming

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
