"""The ``fakevfio`` command: mount lifecycle, stale mounts, errors and help."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fakevfio.cli import main


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
    try:
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
