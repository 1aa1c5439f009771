"""``fakevfio run``: real VFIO ioctls from C and Python against a real fakevfio mount.

``tests/c/vfio_drive.c`` is compiled into tmp_path and run under
``python -m fakevfio run --mount MP -- ...``; it prints ``key value`` lines that are
checked against the kernel's semantics and against the device's files (log,
state, data stream). The FSM conformance tables B (``tests/data/fsm_tables_b.md``)
are replayed through the ioctl path for all four flag sets (ERROR row excluded:
ERROR cannot be reached through the uAPI without a failing driver).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MountFactory

pytestmark = pytest.mark.fuse

ROOT = Path(__file__).resolve().parent
SOURCE = ROOT / "c" / "vfio_drive.c"
TABLES_B = ROOT / "data" / "fsm_tables_b.md"
FLAG_SETS = ["STOP_COPY", "STOP_COPY+P2P", "STOP_COPY+PRE_COPY", "STOP_COPY+P2P+PRE_COPY"]
ABBR = {"ERR": 0, "STOP": 1, "RUN": 2, "SC": 3, "RES": 4, "RP2P": 5, "PC": 6, "PCP2P": 7}


def _seccomp_missing() -> str | None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "fakevfio run needs Linux on x86-64"
    if os.geteuid() != 0:
        return "fakevfio run needs root (mount namespace, pidfd_getfd)"
    if shutil.which("gcc") is None:
        return "gcc is missing"
    return None


@pytest.fixture(scope="module")
def drive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _seccomp_missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    exe = tmp_path_factory.mktemp("c") / "vfio_drive"
    subprocess.run(["gcc", "-Wall", "-O1", "-pthread", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def run_under(
    mount: Path, *argv: str, timeout: float = 60, channel: bool = True
) -> subprocess.CompletedProcess[str]:
    """``fakevfio run`` of ``argv``; ``channel=False``: device states through the files."""
    cmd = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount), "--", *argv]
    env = {**os.environ, "FAKEVFIO_RUN_CHANNEL": "on" if channel else "off"}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def parse(out: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for line in out.splitlines():
        parts = line.split()
        result.update(zip(parts[::2], parts[1::2], strict=False))
    return result


@pytest.fixture
def mount(fakevfio_mount: MountFactory) -> Iterator[Path]:
    with fakevfio_mount(
        [
            "gpu0=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY,seed=7",
            "dst=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY",
        ]
    ) as m:
        yield m.path


def test_run_c_save_via_ioctls(drive: Path, mount: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "stream.bin"
    done = run_under(mount, str(drive), "save", "/dev/vfio/devices/vfio0", str(out_file))
    assert done.returncode == 0, done.stderr
    r = parse(done.stdout)
    einval, enodev, enomsg = str(errno.EINVAL), str(errno.ENODEV), str(errno.ENOMSG)
    assert r["info_before_bind"] == einval
    assert r["bind"] == "0"
    assert r["bind_again"] == einval
    assert r["attach"] == "0"
    assert r["attach_bad"] == str(errno.ENOENT)
    assert r["migration_flags"] == "7"
    assert r["probe_state"] == "0"
    dev = mount / "devices" / "gpu0"
    assert int(r["data_size"]) > 0
    assert (r["info_flags"], r["num_regions"], r["num_irqs"]) == ("3", "9", "5")
    assert r["config_size"] == "256"
    assert int(r["config_offset"]) == 7 << 40
    config = (dev / "config").read_bytes()
    assert int(r["config_ids"]) == int.from_bytes(config[:4], "little")
    assert r["set_pre_copy"] == "0"
    assert r["data_fd_valid"] == "1"
    assert r["data_fd_cloexec"] == "1"
    assert r["precopy_info"] == "0"
    assert int(r["initial_bytes"]) > 0
    assert r["precopy_end"] == enomsg
    assert r["set_stop_copy"] == "0"
    assert r["stop_copy_fd"] == "-1"  # PRE_COPY_P2P -> STOP_COPY keeps the session
    assert r["precopy_info_in_sc"] == einval
    assert r["set_sc_to_pc"] == einval
    assert r["eof"] == "0"
    assert int(r["total_bytes"]) == out_file.stat().st_size
    assert r["set_stop"] == "0"
    assert r["precopy_info_dead"] == einval  # state check first
    assert r["read_dead"] == enodev
    assert r["state_end"] == "1"
    log = (dev / "migration" / "log").read_text().splitlines()
    assert log == [
        "RUNNING PRE_COPY",
        "PRE_COPY PRE_COPY_P2P",
        "PRE_COPY_P2P STOP_COPY",
        "REFUSED STOP_COPY PRE_COPY",
        "STOP_COPY STOP",
    ]
    # Load the stream into the second device through its files: same digest.
    dst = mount / "devices" / "dst"
    for state in ("STOP", "RESUMING"):
        (dst / "migration" / "state").write_text(state)
    fd = os.open(dst / "migration" / "data", os.O_WRONLY)
    try:
        data = memoryview(out_file.read_bytes())
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)
    (dst / "migration" / "state").write_text("STOP")

    src_info = json.loads((dev / "info").read_text())
    dst_info = json.loads((dst / "info").read_text())
    assert src_info["state_digest"] == dst_info["state_digest"]
    assert hashlib.sha256(out_file.read_bytes()).hexdigest()  # the stream is non-empty


def test_run_c_bad_input_gets_kernel_errnos(drive: Path, mount: Path) -> None:
    done = run_under(mount, str(drive), "bad", "/dev/vfio/devices/vfio0")
    assert done.returncode == 0, done.stderr
    r = parse(done.stdout)
    e = {name: str(getattr(errno, name)) for name in ("EINVAL", "ENOTTY", "EFAULT", "EBADF")}
    assert r["short_argsz"] == e["EINVAL"]
    assert r["bad_flag_bits"] == e["EINVAL"]
    assert r["get_and_set"] == e["EINVAL"]
    assert r["unknown_feature"] == e["ENOTTY"]
    assert r["probe_no_payload"] == "0"
    assert r["small_payload"] == e["EINVAL"]
    assert r["set_on_get_only"] == e["EINVAL"]
    assert r["neither_get_nor_set"] == e["EINVAL"]
    assert r["dma_logging"] == e["EINVAL"]  # START is SET-only (vfio_check_feature)
    assert r["unmapped_feature"] == e["EFAULT"]
    assert r["null_info"] == e["EFAULT"]
    assert r["readonly_get"] == e["EFAULT"]
    assert r["info_short"] == e["EINVAL"]
    assert r["info_20"] == "0"
    assert r["pad"] == "deadbeef"  # argsz 20: the 24-byte struct is not overrun
    assert r["region_bad_index"] == e["EINVAL"]
    assert r["region_short"] == e["EINVAL"]
    assert r["unknown_ioctl"] == e["ENOTTY"]
    assert r["precopy_on_device"] == e["ENOTTY"]
    assert r["bad_fd"] == e["EBADF"]
    assert r["pipe_fd"] == e["ENOTTY"]  # not ours: the kernel answered
    assert r["state_request_8"] == e["EINVAL"]
    assert r["state_request_error"] == e["EINVAL"]
    assert r["to_stop_copy"] == "0"
    assert r["precopy_short"] == e["EINVAL"]
    assert r["precopy_in_sc"] == e["EINVAL"]
    assert r["data_fd_other_ioctl"] == e["ENOTTY"]
    assert r["reset"] == "0"
    assert r["state_after_reset"] == "2"
    assert r["survived"] == "1"


def test_run_c_legacy_group_path(drive: Path, mount: Path) -> None:
    done = run_under(mount, str(drive), "group", "100", "gpu0")
    assert done.returncode == 0, done.stderr
    r = parse(done.stdout)
    assert r["api"] == "0"
    assert r["ext_type1v2"] == "1"
    assert r["status"] == "0"
    assert r["flags"] == "7"  # last "flags" key: GET MIGRATION on the group device fd
    assert r["get_fd_early"] == str(errno.EINVAL)
    assert r["set_iommu_early"] == str(errno.EINVAL)
    assert r["set_container"] == "0"
    assert r["set_container_again"] == str(errno.EINVAL)
    assert r["set_iommu"] == "0"
    assert r["wrong_name"] == str(errno.ENODEV)
    assert r["device_fd_valid"] == "1"
    assert r["device_fd_cloexec"] == "1"
    assert r["state"] == "2"
    assert r["bind_group_fd"] == str(errno.EINVAL)
    assert r["dup_state"] == "2"
    status = [line for line in done.stdout.splitlines() if line.startswith("status")]
    assert status == ["status 0 flags 1", "status2 0 flags 3"]


def test_run_c_threads_and_fork_share_one_listener(drive: Path, mount: Path) -> None:
    done = run_under(mount, str(drive), "threads", "/dev/vfio/devices/vfio0")
    assert done.returncode == 0, done.stderr
    r = parse(done.stdout)
    assert r["thread_failures"] == "0"
    assert r["fork_child_ok"] == "1"


def test_run_exit_status_is_the_commands(mount: Path) -> None:
    assert run_under(mount, "sh", "-c", "exit 7").returncode == 7
    assert run_under(mount, "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    done = run_under(mount, "sh", "-c", "test -d /dev/vfio/devices && test -e /dev/iommu")
    assert done.returncode == 0
    assert not Path("/dev/vfio/devices").exists() or Path("/dev/vfio").is_dir()


def test_run_exit_status_tells_not_found_from_cannot_execute(mount: Path, tmp_path: Path) -> None:
    """127 when COMMAND does not exist, 126 when it exists but cannot be executed (as sh)."""
    missing = run_under(mount, str(tmp_path / "no-such-program"))
    assert missing.returncode == 127, missing.stderr
    assert "No such file" in missing.stderr
    assert run_under(mount, "no-such-program-on-the-path").returncode == 127
    not_executable = tmp_path / "data.txt"
    not_executable.write_text("echo hi\n")  # mode 0644: EACCES
    denied = run_under(mount, str(not_executable))
    assert denied.returncode == 126, denied.stderr
    assert "Permission denied" in denied.stderr
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF\x00not a real executable")  # executable bit, no format: ENOEXEC
    garbage.chmod(0o755)
    noexec = run_under(mount, str(garbage))
    assert noexec.returncode == 126, noexec.stderr
    assert run_under(mount, str(tmp_path)).returncode == 126  # a directory: EACCES
    # the shell's statuses, which fakevfio run follows
    assert subprocess.run(["sh", "-c", str(not_executable)], check=False).returncode == 126
    assert subprocess.run(["sh", "-c", str(tmp_path / "no-such")], check=False).returncode == 127


def test_run_child_set_up_failure_is_fakevfio_runs_own_125(tmp_path: Path) -> None:
    """A child whose namespace cannot be made (no node files to bind) exits 125, not 127."""
    reason = _seccomp_missing()
    if reason:
        pytest.skip(reason)
    from fakevfio._run._child import EXIT_SETUP_FAILED, fork_child, receive_listener

    pid, sock, stage = fork_child(tmp_path, ["true"])  # tmp_path has no dev/vfio to bind
    assert receive_listener(sock, stage) is None  # it never got to send its listener
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == EXIT_SETUP_FAILED == 125
    assert not Path(stage).exists()


def _tables_b() -> dict[str, dict[tuple[int, int], tuple[str, str]]]:
    tables: dict[str, dict[tuple[int, int], tuple[str, str]]] = {}
    current = ""
    for line in TABLES_B.read_text().splitlines():
        m = re.match(r"#### (.*) \(flags=0x(\d)\)", line)
        if m:
            current = {
                "1": "STOP_COPY",
                "3": "STOP_COPY+P2P",
                "5": "STOP_COPY+PRE_COPY",
                "7": "STOP_COPY+P2P+PRE_COPY",
            }[m.group(2)]
            tables[current] = {}
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not current or len(cells) != 10 or not cells[0].endswith(")") or "\\" in cells[0]:
            continue
        cur = int(cells[0].split("(")[1].rstrip(")"))
        for new, cell in enumerate(cells[1:]):
            if cell == "EINVAL":
                outcome = ("EINVAL", "-1")
            else:
                fd = "NEW" if "fd NEW" in cell else "-1"
                arrow = cell.split(" [")[0]
                end = cur if arrow.startswith("ok") else ABBR[arrow.split("->")[-1]]
                outcome = (str(end), fd)
            tables[current][(cur, new)] = outcome
    return tables


@pytest.mark.parametrize("flags", FLAG_SETS)
@pytest.mark.parametrize("channel", [True, False], ids=["channel", "files"])
def test_run_fsm_tables_b_through_ioctls(
    drive: Path, fakevfio_mount: MountFactory, flags: str, channel: bool
) -> None:
    """The kernel's tables, through the mount's control channel and through the files."""
    table = _tables_b()[flags]
    with fakevfio_mount([f"d=ram:size=4K,flags={flags}"]) as m:
        done = run_under(
            m.path, str(drive), "fsm", "/dev/vfio/devices/vfio0", timeout=120, channel=channel
        )
    assert done.returncode == 0, done.stderr
    checked = 0
    seen_cur = set()
    for line in done.stdout.splitlines():
        parts = line.split()
        if parts[0] == "unreachable":
            assert all(cur != int(parts[1]) for cur, _ in table), line
            continue
        if parts[0] != "cell":
            continue
        cur, new, err, fd, after = int(parts[1]), int(parts[2]), int(parts[3]), parts[4], parts[5]
        seen_cur.add(cur)
        expect_state, expect_fd = table[(cur, new)]
        if expect_state == "EINVAL" or (cur == 4 and new != 4 and new < 8):
            # From RESUMING every success path starts with RESUMING -> STOP, whose
            # validation fails here (nothing was written): EINVAL, still RESUMING.
            assert (err, fd, int(after)) == (errno.EINVAL, "-1", cur), line
        else:
            assert (err, fd, after) == (0, expect_fd, expect_state), line
        checked += 1
    assert seen_cur == {cur for cur, _ in table if cur != 0}
    assert checked == 9 * len(seen_cur)


KERNEL_SAVE = """
import sys
from vfio_uapi.fsm import State
from migrator.errors import NoDataNow
from migrator.kernel import KernelBackend, open_device

dev = open_device("/dev/vfio/devices/vfio0", None)
assert isinstance(dev, KernelBackend)
print("idstr", dev.idstr)
print("flags", int(dev.migration_flags()))
print("probe", int(dev.probe(2)))
print("size", dev.data_size())
config = dev.read_config()
print("config_len", len(config))
dev.set_state(State.PRE_COPY)
print("precopy", *dev.precopy_info())
out = bytearray()
buf = bytearray(4099)
while True:
    try:
        n = dev.read_data(memoryview(buf))
    except NoDataNow:
        break
    out += buf[:n]
dev.set_state(State.STOP_COPY)
print("has_fd_in_sc", int(dev.has_data_fd()))
try:
    dev.set_state(State.PRE_COPY)
except Exception as exc:
    print("sc_to_pc", exc.errno)
while n := dev.read_data(memoryview(buf)):
    out += buf[:n]
dev.set_state(State.STOP)
print("has_fd_after_stop", int(dev.has_data_fd()))
print("state", dev.get_state().name)
open(sys.argv[1], "wb").write(out)
print("bytes", len(out))
try:
    dev.set_state(State.ERROR)
except Exception as exc:
    print("set_error", exc.errno)
dev.reset()
print("after_reset", dev.get_state().name)
dev.close()
"""


def test_run_kernel_backend_saves_a_ram_device(mount: Path, tmp_path: Path) -> None:
    script = tmp_path / "save.py"
    script.write_text(KERNEL_SAVE)
    out = tmp_path / "state.bin"
    done = run_under(mount, sys.executable, str(script), str(out))
    assert done.returncode == 0, done.stderr
    r = parse(done.stdout)
    assert r["idstr"] == "vfio0/vfio"
    assert r["flags"] == "7"
    assert r["probe"] == "1"
    assert r["config_len"] == "256"
    assert r["has_fd_in_sc"] == "1"
    assert r["sc_to_pc"] == str(errno.EINVAL)
    assert r["has_fd_after_stop"] == "0"
    assert r["state"] == "STOP"
    assert int(r["bytes"]) == out.stat().st_size > 0
    assert r["set_error"] == str(errno.EINVAL)
    assert r["after_reset"] == "RUNNING"
    log = (mount / "devices" / "gpu0" / "migration" / "log").read_text().splitlines()
    # The backend refused STOP_COPY -> PRE_COPY locally: the device never saw it.
    assert not any(line.startswith("REFUSED STOP_COPY") for line in log)
    assert log[-1] == "RESET"
