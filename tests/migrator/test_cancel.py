"""SIGINT/SIGTERM during a migration cancel it cleanly on either side."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.migrator.helpers import MIGRATOR, digest, finish, start_incoming

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(90)]

# 16 MiB read at 4 MiB/s: the stop-copy phase lasts about 4 s.
SLOW = "size=16M,flags=STOP_COPY+P2P,seed=9,read_bandwidth=4M"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("side", ["source", "destination"])
def test_signal_cancels_and_source_keeps_its_state(
    fakevfio_mount: MountFactory, tmp_path: Path, sig: signal.Signals, side: str
) -> None:
    with (
        fakevfio_mount([f"d0=ram:{SLOW}"]) as src,
        fakevfio_mount(["d0=ram:size=16M,flags=STOP_COPY+P2P"]) as dst,
    ):
        before = digest(src, "d0")
        incoming, addr = start_incoming(f"unix:{tmp_path}/s.sock", [str(dst.device("d0"))])
        source = subprocess.Popen(
            [*MIGRATOR, "migrate", "--to", addr, "--json", str(src.device("d0"))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 20
        while src.state("d0") != "STOP_COPY":
            assert time.monotonic() < deadline, "migration never reached stop-copy"
            time.sleep(0.05)
        started = time.monotonic()
        (source if side == "source" else incoming).send_signal(sig)
        _out, err = source.communicate(timeout=30)
        dest = finish(incoming, 30)
        assert time.monotonic() - started < 15
        # The signalled side exits 128 + the signal (130, 143), the other side 1.
        signalled, other = (source, dest) if side == "source" else (dest, source)
        assert signalled.returncode == 128 + sig, signalled.returncode
        assert other.returncode == 1
        lines = [line for line in err.splitlines() if line.startswith("migrator: error:")]
        assert len(lines) == 1, err
        if side == "source":
            assert sig.name in lines[0]
        assert src.state("d0") == "RUNNING"
        assert digest(src, "d0") == before
        assert dst.state("d0") == "RUNNING"
        assert dst.log_lines("d0")[-1] == "RESET"
