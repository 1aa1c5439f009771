"""The migrator's command-line conventions: --version, help with defaults, long options,
refusal of options that do not apply (issue 20); exit codes 130/143 are in test_cancel.py."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MountFactory, MountHandle
from tests.fakevfio.test_cli_pipe import run_into_closed_pipe
from tests.migrator.helpers import MIGRATOR, digest, finish, run_migrator, start_incoming

pytestmark = [pytest.mark.fuse]


@pytest.fixture(scope="module")
def mounts(fakevfio_mount_module: MountFactory) -> Iterator[tuple[MountHandle, MountHandle]]:
    with (
        fakevfio_mount_module(["d0=ram:size=1M,seed=3,flags=STOP_COPY+P2P"]) as src,
        fakevfio_mount_module(["d0=ram:size=1M,flags=STOP_COPY+P2P"]) as dst,
    ):
        yield src, dst


def test_version_names_the_installed_distribution() -> None:
    result = run_migrator("--version")
    assert result.returncode == 0
    assert result.stdout == f"migrator {importlib.metadata.version('fakevfio')}\n"


@pytest.mark.parametrize("command", ["migrate", "incoming", "save", "load"])
def test_help_shows_every_option_with_its_default(command: str) -> None:
    result = run_migrator(command, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for needle in ("(default: 300)", "(default: 64M)", "(default: auto)", "(default: 60)"):
        assert needle in text, needle
    if command in ("save", "load"):
        assert ("--output FILE" if command == "save" else "--input FILE") in text


@pytest.mark.parametrize(
    "option", [("--multifd-channels", "3"), ("--switchover-ack", "off"), ("--peer-timeout", "5")]
)
@pytest.mark.parametrize("command", ["save", "load"])
def test_file_commands_refuse_live_only_options_and_touch_nothing(
    mounts: tuple[MountHandle, MountHandle], tmp_path: Path, command: str, option: tuple[str, str]
) -> None:
    src, _dst = mounts
    path = tmp_path / "state.bin"
    flag = "-o" if command == "save" else "-i"
    if command == "load":
        path.write_bytes(b"not read")
    log = src.log_lines("d0")
    result = run_migrator(command, flag, str(path), *option, str(src.device("d0")))
    assert result.returncode == 1
    assert f"{option[0]} applies only to a live migration" in result.stderr
    assert src.log_lines("d0") == log  # the device was never touched
    assert src.state("d0") == "RUNNING"
    if command == "save":
        assert not path.exists()


def test_long_forms_of_output_and_input(
    mounts: tuple[MountHandle, MountHandle], tmp_path: Path
) -> None:
    src, dst = mounts
    path = tmp_path / "state.bin"
    saved = run_migrator("save", "--output", str(path), str(src.device("d0")))
    assert saved.returncode == 0, saved.stderr
    src.set_state("d0", "RUNNING")
    loaded = run_migrator("load", "--input", str(path), str(dst.device("d0")))
    assert loaded.returncode == 0, loaded.stderr
    assert digest(dst, "d0") == digest(src, "d0")


def test_a_device_side_load_failure_points_at_the_devices_last_error(
    fakevfio_mount: MountFactory, tmp_path: Path
) -> None:
    path = tmp_path / "state.bin"
    with fakevfio_mount(["big=ram:size=64K,seed=2,flags=STOP_COPY", "small=ram:size=16K"]) as m:
        saved = run_migrator("save", "-o", str(path), str(m.device("big")))
        assert saved.returncode == 0, saved.stderr
        loaded = run_migrator("load", "-i", str(path), str(m.device("small")) + ",id=big/vfio")
        record = m.info("small")["last_error"]
        small = m.device("small")
    assert loaded.returncode == 1
    line = loaded.stderr.strip().splitlines()[-1]
    # The errno the kernel passed back to the migrator's write() is the one recorded ...
    assert f"write data failed: {record['errno']}" in line
    # ... and the line says where the reason is.
    assert line.endswith(f"; the device says why: see {small}/info last_error")
    assert record["operation"] == "write migration/data"
    assert "65536" in record["message"]


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _on_a_terminal(*args: str) -> tuple[int, str, list[str]]:
    """Run ``migrator ARGS`` with stderr on a pty (the kernel's terminal): status, stdout,
    and every frame the terminal received (escape codes removed)."""
    master, slave = pty.openpty()
    # A terminal that can redraw: under TERM=dumb rich draws only the last frame.
    env = {**os.environ, "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [*MIGRATOR, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env
    )
    os.close(slave)
    screen = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the last writer closed the pty
            break
        if not chunk:
            break
        screen += chunk
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    status = proc.wait(timeout=60)
    text = _ANSI.sub("", screen.decode(errors="replace"))
    return status, out, [f.strip() for f in re.split(r"[\r\n]", text) if f.strip()]


@pytest.mark.slow
def test_progress_on_a_terminal_both_sides_and_nothing_when_piped(
    fakevfio_mount: MountFactory, tmp_path: Path
) -> None:
    path = tmp_path / "state.bin"
    devices = ["g=ram:size=4M,seed=5,read_bandwidth=4M,dirty_rate=256K", "quick=ram:size=4K"]
    with fakevfio_mount([*devices, "dst=ram:size=4M,write_bandwidth=4M"]) as m:
        status, out, frames = _on_a_terminal("save", "-o", str(path), "--json", str(m.device("g")))
        assert status == 0, frames
        sent = json.loads(out)["transferred_bytes"]
        pre_copy = [f for f in frames if f.startswith("save") and "pre-copy" in f]
        assert pre_copy, frames
        full = r"\d+% [\d.]+/[\d.]+ MiB [\d.]+ MiB/s ETA \d+:\d\d iter \d+$"
        assert [f for f in pre_copy if re.search(full, f) and " 0.0 MiB/s" not in f], pre_copy
        last = [f for f in frames if f.startswith("save")][-1]
        assert last.startswith("save  completed")
        assert f"100% {sent / 2**20:.1f}/{sent / 2**20:.1f} MiB" in last  # the --json figure
        status, _out, frames = _on_a_terminal(
            "load", "-i", str(path), f"{m.device('dst')},id=g/vfio"
        )
        assert status == 0, frames
        loading = [f for f in frames if f.startswith("load") and " load " in f]
        assert loading, frames
        # No total on this side: bytes and rate, no percent.
        assert [f for f in loading if re.search(r"[\d.]+/\? MiB [\d.]+ MiB/s", f)], loading
        assert not [f for f in loading if "%" in f]
        piped = run_migrator("save", "-o", str(path), "--json", str(m.device("quick")))
    assert piped.returncode == 0
    assert piped.stderr == ""  # not a terminal: not one byte of progress


def test_qemu_10_1_options_reach_both_sides(fakevfio_mount: MountFactory) -> None:
    """--load-config-after-iter on both sides completes (the config waits for QEMU's lone
    DEV_CONFIG_LOAD_READY marker); on one side only, both fail; a bad
    --max-queued-buffers-size is refused by name."""
    spec = ["d0=ram:size=1M,seed=9"]
    with fakevfio_mount(spec) as src, fakevfio_mount(["d0=ram:size=1M"]) as dst:
        mf = ("--multifd-transfer", "on", "--multifd-channels", "2")
        on = ("--load-config-after-iter", "on")
        incoming, addr = start_incoming("tcp:127.0.0.1:0", [str(dst.device("d0"))], *mf, *on)
        source = run_migrator("migrate", "--to", addr, *mf, *on, str(src.device("d0")))
        assert source.returncode == 0, source.stderr
        assert finish(incoming).returncode == 0
        assert digest(src, "d0") == digest(dst, "d0")
    with fakevfio_mount(spec) as src, fakevfio_mount(["d0=ram:size=1M"]) as dst:
        incoming, addr = start_incoming(
            "tcp:127.0.0.1:0", [str(dst.device("d0"))], *mf, *on, "--peer-timeout", "5"
        )
        source = run_migrator("migrate", "--to", addr, *mf, str(src.device("d0")))
        assert source.returncode != 0
        assert finish(incoming).returncode != 0
        assert src.state("d0") == "RUNNING"
        bad = run_migrator(
            "incoming",
            "--listen",
            "tcp:127.0.0.1:0",
            "--max-queued-buffers-size",
            "banana",
            str(dst.device("d0")),
        )
        assert bad.returncode != 0
        assert "--max-queued-buffers-size" in bad.stderr, bad.stderr


# Output only the final flush writes (--help, --version: argparse's own) and a usage
# error's status: a closed pipe ends quietly with SIGPIPE's status, a usage error stays 2.
@pytest.mark.parametrize(("args", "status"), [(["--help"], 141), (["--version"], 141)])
def test_a_closed_pipe_ends_migrator_quietly(args: list[str], status: int) -> None:
    ran = run_into_closed_pipe([*MIGRATOR, *args])
    assert ran.stderr == ""  # no "Exception ignored ... BrokenPipeError"
    assert ran.returncode == status


def test_usage_error_still_exits_2_with_argparses_message() -> None:
    ran = subprocess.run(
        [*MIGRATOR, "migrate", "--to", "tcp:127.0.0.1:1", "--fakevfio-no-such-option", "dev"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 2
    assert "unrecognized arguments: --fakevfio-no-such-option" in ran.stderr
