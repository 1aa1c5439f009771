"""The backends' PRECOPY_INFOv2 API (``enable_precopy_v2``, ``precopy_info_v2``).

The kernel backend runs under ``fakevfio run``, so its feature 12 SET and
PRECOPY_INFO go through the supervisor's Linux 7.1 semantics (EINVAL for a
device without PRE_COPY); the fakevfio backend reads the device's files. A
``ram`` device with ``reinit_after`` re-initialises once for an opted-in
caller: ``reinit`` is seen exactly once and the pre-copy data read carries the
whole state again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.backend import FakeVfioBackend
from migrator.errors import NoDataNow
from tests.conftest import MountFactory
from vfio_uapi.fsm import State

pytestmark = pytest.mark.fuse

SIZE = 64 * 1024
REINIT_AFTER = 20 * 1024

KERNEL_V2 = """
import sys
from migrator.errors import NoDataNow
from migrator.kernel import open_device
from vfio_uapi.fsm import State

dev = open_device(sys.argv[1], None)
plain = open_device(sys.argv[2], None)
print("enable", int(dev.enable_precopy_v2()), int(dev.enable_precopy_v2()))
print("enable_no_pre_copy", int(plain.enable_precopy_v2()))
dev.set_state(State.PRE_COPY)
reinits, total, buf = 0, 0, bytearray(8192)
while True:
    reinits += dev.precopy_info_v2().reinit
    try:
        total += dev.read_data(memoryview(buf))
    except NoDataNow:
        break
print("reinits", reinits)
print("bytes", total)
dev.close()
plain.close()
"""


@pytest.fixture
def mount(fakevfio_mount: MountFactory) -> Iterator[Path]:
    with fakevfio_mount(
        [
            f"p0=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY,seed=3,reinit_after={REINIT_AFTER}",
            "s0=ram:size=16K,flags=STOP_COPY+P2P",
        ]
    ) as m:
        yield m.path


def _drain(dev: FakeVfioBackend) -> tuple[int, int]:
    reinits, total, buf = 0, 0, bytearray(8192)
    while True:
        reinits += dev.precopy_info_v2().reinit
        try:
            total += dev.read_data(memoryview(buf))
        except NoDataNow:
            return reinits, total


def test_fakevfio_backend_opts_in_through_the_v2_file(mount: Path) -> None:
    assert not FakeVfioBackend(mount / "devices" / "s0").enable_precopy_v2()
    dev = FakeVfioBackend(mount / "devices" / "p0")
    assert dev.enable_precopy_v2() is True
    dev.set_state(State.PRE_COPY)
    reinits, total = _drain(dev)
    assert reinits == 1
    assert total >= REINIT_AFTER + SIZE
    dev.close()


def test_kernel_backend_opts_in_with_feature_12_under_fakevfio_run(
    mount: Path, tmp_path: Path
) -> None:
    if sys.platform != "linux" or os.uname().machine != "x86_64" or os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("fakevfio run needs root on x86-64 Linux")
        pytest.skip("fakevfio run needs root on x86-64 Linux")
    script = tmp_path / "v2.py"
    script.write_text(KERNEL_V2)
    cdev = {
        name: "/dev/vfio/devices/"
        + json.loads((mount / "devices" / name / "info").read_text())["cdev"]
        for name in ("p0", "s0")
    }
    cmd = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount), "--"]
    done = subprocess.run(
        [*cmd, sys.executable, str(script), cdev["p0"], cdev["s0"]],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    r = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines() if line}
    assert r["enable"] == ["1", "1"]
    assert r["enable_no_pre_copy"] == ["0"]  # the kernel's EINVAL: not opted in
    assert r["reinits"] == ["1"]
    assert int(r["bytes"][0]) >= REINIT_AFTER + SIZE
