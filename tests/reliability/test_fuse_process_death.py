"""SIGKILL of a ``fakevfio mount`` process in the middle of a migration.

The killed server's mount answers every later file operation with an error:
ECONNABORTED on files that were open, ENOTCONN ("Transport endpoint is not
connected") on new lookups and opens. Both migrators must exit non-zero
promptly; the side whose devices vanished must say so (its error line names
the device path and ENOTCONN); the surviving side's devices must be left as
after any failure (source RUNNING with its state, destination reset); and the
stale mount must not block the mountpoint: a new ``fakevfio mount`` on it
detects it, cleans it and serves again.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import MountFactory, MountHandle
from tests.migrator.helpers import MIGRATOR, digest, finish, start_incoming
from tests.reliability import assert_reset, error_line, phase_of, wait_for

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(90)]

#: 16 MiB at 4 MiB/s on the killed side: the transfer lasts about 4 s.
SRC_SPEC = "d0=ram:size=16M,flags=STOP_COPY+P2P,seed=5{extra}"
DST_SPEC = "d0=ram:size=16M,flags=STOP_COPY+P2P{extra}"
SLOW_READ = ",read_bandwidth=4M"
SLOW_WRITE = ",write_bandwidth=4M"
BOUND_S = 15.0
MODES = {
    "single": ("--multifd-transfer", "off"),
    "multifd": ("--multifd-transfer", "on", "--multifd-channels", "2"),
}


def _kill_server(mount: MountHandle) -> float:
    mount.proc.send_signal(signal.SIGKILL)
    mount.proc.wait(10)
    return time.monotonic()


def _remount_works(mountpoint: Path) -> None:
    """A new ``fakevfio mount`` on the stale mountpoint cleans it and serves."""
    # (stat() may still be answered from the kernel's attribute cache.)
    with pytest.raises(OSError, match=r"not connected|connection abort") as info:
        os.listdir(mountpoint)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fakevfio",
            "mount",
            str(mountpoint),
            "--device",
            "again=ram:size=4K",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"fakevfio: mounted {mountpoint} (1 devices)\n"
        state = (mountpoint / "devices" / "again" / "migration" / "state").read_text()
        assert state == "RUNNING\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert "stale FUSE mount" in err
        assert os.listdir(mountpoint) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("killed", ["source", "destination"])
def test_sigkill_of_a_mount_fails_both_migrators(
    fakevfio_mount: MountFactory, tmp_path: Path, killed: str, mode: str
) -> None:
    src_extra = SLOW_READ if killed == "source" else ""
    dst_extra = SLOW_WRITE if killed == "destination" else ""
    with (
        fakevfio_mount([SRC_SPEC.format(extra=src_extra)]) as src,
        fakevfio_mount([DST_SPEC.format(extra=dst_extra)]) as dst,
    ):
        before = digest(src, "d0")
        incoming, addr = start_incoming(
            f"unix:{tmp_path}/k.sock", [str(dst.device("d0"))], *MODES[mode]
        )
        source = subprocess.Popen(
            [*MIGRATOR, "migrate", "--to", addr, *MODES[mode], str(src.device("d0"))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(src, "d0", {"STOP_COPY"})
            time.sleep(0.5)  # some data is in flight
            victim = src if killed == "source" else dst
            killed_at = _kill_server(victim)
            src_result = finish(source, BOUND_S)
            dst_result = finish(incoming, BOUND_S)
            assert time.monotonic() - killed_at < BOUND_S
        finally:
            for proc in (source, incoming):
                if proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        assert src_result.returncode != 0, src_result.stderr
        assert dst_result.returncode != 0, dst_result.stderr
        src_line, dst_line = error_line(src_result.stderr), error_line(dst_result.stderr)
        dead_line = src_line if killed == "source" else dst_line
        assert f"device {victim.device('d0')}" in dead_line, dead_line
        # Open files of a dead FUSE server fail with ECONNABORTED, new opens with ENOTCONN.
        assert "ECONNABORTED" in dead_line or "ENOTCONN" in dead_line, dead_line
        assert "mount stopped answering" in dead_line, dead_line
        if killed == "source":
            assert phase_of(src_line) == "stop-copy", src_line
            assert phase_of(dst_line) == "load", dst_line
            assert_reset(dst, "d0")
        else:
            assert phase_of(dst_line) == "load", dst_line
            assert src.state("d0") == "RUNNING"
            assert digest(src, "d0") == before
        _remount_works(victim.path)


@pytest.mark.parametrize("command", ["migrate", "save"])
def test_a_device_on_a_dead_mount_is_named_as_such(
    fakevfio_mount: MountFactory, tmp_path: Path, command: str
) -> None:
    """Found by the soak: it said "unexpected OSError: [Errno 107] ..." and nothing else."""
    with fakevfio_mount(["d0=ram:size=1M"]) as src:
        device = str(src.device("d0"))
        _kill_server(src)
        target = (
            ["--to", "tcp:127.0.0.1:9"] if command == "migrate" else ["-o", str(tmp_path / "o")]
        )
        result = subprocess.run(
            [*MIGRATOR, command, *target, device],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode != 0
    line = error_line(result.stderr)
    assert "mount stopped answering" in line, line
    assert "unexpected" not in line, line
