"""The ``fakevfio`` command: mount lifecycle, stale mounts, errors and help."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fakevfio.cli import main
from tests.conftest import MountHandle


def _fakevfio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fakevfio", *args], capture_output=True, text=True, timeout=30
    )


def test_cli_usage_and_domain_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["mount"]) == 2
    assert main(["nosuchcommand"]) == 2
    assert main(["mount", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["mount", str(tmp_path / "full")]) == 1
    assert "not empty" in capsys.readouterr().err
    (tmp_path / "mp").mkdir()
    assert main(["mount", str(tmp_path / "mp"), "--device", "bad spec"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "invalid device" in err[0]
    assert main(["mount", str(tmp_path / "mp"), "--device", "x=nodriver"]) == 1
    assert "unknown driver" in capsys.readouterr().err
    assert main(["run", "--mount", str(tmp_path / "mp")]) == 2


@pytest.mark.parametrize("command", ["mount", "drivers", "umount", "run"])
def test_cli_help_shows_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert "example:" in capsys.readouterr().out


def test_cli_drivers_lists_options_and_load_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drivers", "--driver", "broken=no.such.module:X"]) == 0
    out = capsys.readouterr().out
    assert "ram: " in out
    assert "  size (size, default 1M): " in out
    assert "error: driver plugin 'broken'" in out


@pytest.mark.fuse
def test_cli_toml_config_and_bad_plugin(tmp_path: Path, fakevfio_mount: Any) -> None:
    config = tmp_path / "devices.toml"
    config.write_text('[devices.t0]\ndriver = "ram"\nsize = "8K"\nseed = 4\n')
    args = ["--config", str(config), "--driver", "broken=no.such.module:X"]
    with fakevfio_mount([], extra_args=args) as m:
        assert m.info("t0")["size"] == 8192
        assert "driver plugin 'broken'" in m.log.read_text()


@pytest.mark.fuse
def test_cli_sigterm_unmounts_and_stale_mount_is_cleaned(tmp_path: Path) -> None:
    mp = tmp_path / "mp"
    mp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fakevfio", "mount", str(mp), "--device", "a=ram:size=4K"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:  # (a failure anywhere leaves no stale mount behind on the machine)
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"fakevfio: mounted {mp} (1 devices)\n"
        os.kill(proc.pid, signal.SIGKILL)  # leaves a stale mount behind
        proc.wait()
        proc.stdout.close()
        with pytest.raises(OSError, match="not connected"):
            os.stat(mp)
        proc = subprocess.Popen(
            [sys.executable, "-m", "fakevfio", "mount", str(mp)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == f"fakevfio: mounted {mp} (0 devices)\n"
        assert sorted(os.listdir(mp)) == ["dev", "devices", "drivers"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0
        assert "stale FUSE mount" in err
        assert os.listdir(mp) == []  # unmounted cleanly
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True, check=False)


# -- issue 20: the conventions users expect -------------------------------------------------
def test_cli_config_with_an_unknown_table_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mp").mkdir()
    config = tmp_path / "devices.toml"
    config.write_text('[device.gpu0]\ndriver = "ram"\n')  # "device", not "devices"
    assert main(["mount", str(tmp_path / "mp"), "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "unknown table or key 'device'" in err
    assert "did you mean [devices]?" in err
    config.write_text('[devices.gpu0]\ndriver = "ram"\nsise = "4K"\n')  # a driver option typo
    assert main(["mount", str(tmp_path / "mp"), "--config", str(config)]) == 1
    assert "device gpu0: unknown option(s) sise" in capsys.readouterr().err


def test_cli_option_errors_name_the_device_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mp").mkdir()
    assert main(["mount", str(tmp_path / "mp"), "--device", "g=ram:size=banana"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("fakevfio: device g: invalid size option 'banana'")
    assert "`fakevfio drivers` lists driver ram's options" in err[0]


def test_cli_drivers_json_is_the_listing_as_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["drivers", "--driver", "broken=no.such.module:X"]) == 0
    text = capsys.readouterr().out
    assert main(["drivers", "--json", "--driver", "broken=no.such.module:X"]) == 0
    report = json.loads(capsys.readouterr().out)
    ram = report["drivers"]["ram"]
    assert f"\nram: {ram['description']}\n" in "\n" + text  # (installed plugins may come first)
    for key, opt in ram["options"].items():  # every option the text shows, as data
        assert f"  {key} ({opt['kind']}, default {opt['default'] or 'none'}): " in text
    assert [e for e in report["errors"] if "driver plugin 'broken'" in e]


_FAKEVFIO_RUN = [sys.executable, "-m", "fakevfio", "run"]


def _setpriv_without(*caps: str) -> list[str]:
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        pytest.skip("needs root and setpriv (util-linux) to drop capabilities")
    drop = ",".join(f"-{cap}" for cap in caps)
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", "--"]


@pytest.mark.fuse
def test_run_without_privilege_says_which_and_how_to_fix(fakevfio_mount: Any) -> None:
    drop = _setpriv_without("sys_admin", "sys_ptrace")
    # The kernel's verdict on such a process: no private mount namespace.
    unshare = subprocess.run([*drop, "unshare", "-m", "true"], capture_output=True, text=True)
    assert unshare.returncode != 0
    assert "Operation not permitted" in unshare.stderr
    with fakevfio_mount(["gpu0=ram:size=4K"]) as m:
        done = subprocess.run(
            [*drop, sys.executable, "-m", "fakevfio", "run", "--mount", str(m.path), "--", "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 125, done.stderr
    assert "missing CAP_SYS_ADMIN" in done.stderr
    assert "CAP_SYS_PTRACE" in done.stderr
    assert "sudo" in done.stderr
    assert "unshare" not in done.stderr.split("missing")[0]  # not the bare syscall error


@pytest.mark.fuse
def test_run_map_agrees_with_the_sysfs_view_and_keeps_stdout_clean(
    fakevfio_mount: Any,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("fakevfio run needs root")
    script = "for d in /sys/bus/pci/devices/*/vfio-dev/vfio*; do echo $d; done"
    with fakevfio_mount(["gpu0=ram:size=4K", "nic0=ram:size=4K,address=0000:00:07.0"]) as m:
        done = subprocess.run(
            [*_FAKEVFIO_RUN, "--map", "--mount", str(m.path), "--", "sh", "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
        )
        quiet = subprocess.run(
            [*_FAKEVFIO_RUN, "--mount", str(m.path), "--", "true"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    assert quiet.stderr == ""  # not a terminal, no --map: nothing added
    # What the program sees: /sys/bus/pci/devices/ADDR/vfio-dev/vfioN, one per device.
    seen = {p.split("/")[5]: p.split("/")[-1] for p in done.stdout.split()}
    shown = re.findall(r"/dev/vfio/devices/(vfio\d+) = (\S+) \(PCI (\S+),", done.stderr)
    assert {address: cdev for cdev, _name, address in shown} == seen
    assert sorted(name for _cdev, name, _address in shown) == ["gpu0", "nic0"]
    assert ("vfio1", "nic0", "0000:00:07.0") in shown


@pytest.mark.fuse
def test_device_errors_are_last_error_in_info_and_warned_once(
    fakevfio_mount: Any, tmp_path: Path
) -> None:
    with fakevfio_mount(["pre=ram:size=64K,seed=1", "dst=ram:size=16K"]) as m:
        # The pre-copy temporary end (ENOMSG) is the protocol, not a failure.
        assert m.set_state("pre", "PRE_COPY") is None
        with pytest.raises(OSError, match="No message of desired type") as ended:
            m.read_bytes(m.file("pre", "migration/data"))
        assert ended.value.errno == errno.ENOMSG
        assert m.info("pre")["last_error"] is None
        # A refused state write: the errno the kernel handed the writer is the record's.
        assert m.set_state("pre", "ERROR") == errno.EINVAL  # the uAPI refuses it
        record = m.info("pre")["last_error"]
        assert record["errno"] == "EINVAL"
        assert record["operation"] == "write migration/state 'ERROR'"
        assert record["state"] == "PRE_COPY"
        # A resuming stream of the wrong size, twice: recorded twice, warned once.
        assert m.set_state("pre", "RUNNING") is None
        assert m.set_state("dst", "STOP") is None
        for attempt in (1, 2):
            assert m.set_state("dst", "RESUMING") is None
            stream = _saved_stream(m, "pre")
            err = m.write_bytes(m.file("dst", "migration/data"), stream)
            assert err is not None
            record = m.info("dst")["last_error"]
            assert record["errno"] == errno.errorcode[err]
            assert record["operation"] == "write migration/data"
            assert "65536" in record["message"]
            assert "16384" in record["message"]
            assert record["count"] == attempt
            m.reset("dst")
            assert m.set_state("dst", "STOP") is None
        warnings = [
            line
            for line in m.log.read_text().splitlines()
            if "device dst: write migration/data" in line
        ]
    assert len(warnings) == 1, warnings
    assert "see devices/dst/info last_error" in warnings[0]


def _saved_stream(m: MountHandle, name: str) -> bytes:
    """The device's complete STOP_COPY stream, read through the mount."""
    assert m.set_state(name, "STOP") is None
    assert m.set_state(name, "STOP_COPY") is None
    data = m.read_bytes(m.file(name, "migration/data"))
    assert m.set_state(name, "STOP") is None
    assert m.set_state(name, "RUNNING") is None
    return data
