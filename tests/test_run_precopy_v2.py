"""A C consumer of PRECOPY_INFO(v2), built against the Linux >= 7.1 header, under fakevfio run.

``tests/c/abi_precopy_consumer.c`` uses ``struct vfio_precopy_info``,
``VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2`` and ``VFIO_PRECOPY_INFO_REINIT`` from
the current uAPI header (:mod:`tests.vfio_uapi.headers`), so its ioctls are the
kernel's bytes, not ours. Checked against the device's ``migration/precopy_info``
file after every query: the same initial_bytes and dirty_bytes. The flags follow
Linux 7.1: echoed before the opt-in, an output (0 or REINIT) after it; feature 12
is SET-only (GET: EINVAL). A ``ram`` device with ``reinit_after`` answers REINIT
once, and the stream read then carries the whole state again.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from tests.conftest import MountFactory
from tests.vfio_uapi.headers import find_headers

pytestmark = pytest.mark.fuse

SOURCE = Path(__file__).resolve().parent / "c" / "abi_precopy_consumer.c"
SIZE = 64 * 1024
REINIT_AFTER = 20 * 1024


@attrs.frozen
class Run:
    lines: list[list[str]]

    def value(self, key: str) -> list[int]:
        (line,) = [ln for ln in self.lines if ln[0] == key]
        return [int(v) for v in line[1:]]

    def queries(self) -> list[list[int]]:
        return [[int(v) for v in ln[1:]] for ln in self.lines if ln[0] == "q"]


def _fail_or_skip(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory, fakevfio_mount_module: MountFactory
) -> Iterator[Run]:
    if sys.platform != "linux" or os.uname().machine != "x86_64" or os.geteuid() != 0:
        _fail_or_skip("fakevfio run needs root on x86-64 Linux")
    headers, why = find_headers()
    if headers is None:
        _fail_or_skip(why)
        return
    exe = tmp_path_factory.mktemp("c") / "abi_precopy_consumer"
    subprocess.run(
        ["gcc", "-Wall", "-Werror", "-O1", *headers.cflags, "-o", str(exe), str(SOURCE)],
        check=True,
    )
    spec = f"p0=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY,seed=3,reinit_after={REINIT_AFTER}"
    with fakevfio_mount_module([spec]) as m:
        info = json.loads((m.path / "devices" / "p0" / "info").read_text())
        cdev = f"/dev/vfio/devices/{info['cdev']}"
        cmd = [sys.executable, "-m", "fakevfio", "run", "--mount", str(m.path), "--"]
        done = subprocess.run(
            [*cmd, str(exe), cdev, str(m.path / "devices" / "p0")],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        yield Run([line.split() for line in done.stdout.splitlines() if line.strip()])


def test_precopy_info_over_ioctls_matches_the_file_and_flags_follow_the_opt_in(run: Run) -> None:
    flags, initial, dirty, file_initial, file_dirty = run.value("v1")
    assert flags == 0x1234  # before the opt-in: the caller's flags come back
    assert (initial, dirty) == (file_initial, file_dirty)
    assert initial > SIZE
    assert run.value("probe") == [0]
    assert run.value("get") == [errno.EINVAL]  # SET only
    assert run.value("set") == [0]
    queries = run.queries()
    assert len(queries) == run.value("queries")[0] > 2
    for flags, initial, dirty, file_initial, file_dirty in queries:
        assert flags in (0, 1)  # output only after the opt-in: 0xa5a50000 is gone
        assert (initial, dirty) == (file_initial, file_dirty)
    assert queries[-1][1:3] == [0, 0]  # the temporary end of stream ...
    assert run.value("end") == [errno.ENOMSG]  # ... where read() answers ENOMSG


def test_reinit_reaches_a_c_consumer_once_and_the_state_is_sent_again(run: Run) -> None:
    queries = run.queries()
    reinits = [q for q in queries if q[0] & 1]
    assert len(reinits) == 1
    v1_initial = run.value("v1")[1]
    assert reinits[0][1] > v1_initial - REINIT_AFTER  # initial_bytes rose again ...
    assert reinits[0][2] == 0  # ... and dirty_bytes restarted from 0
    assert run.value("bytes")[0] >= REINIT_AFTER + SIZE
