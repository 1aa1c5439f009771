"""The VFIO/iommufd ioctl surface of ``fakevfio run``, fuzzed (issue 18, item 4).

A seeded C fuzzer (``tests/c/ioctl_fuzz.c``) issues random requests, argsz,
flags, structs and pointers (NULL, unmapped, read-only, straddling into a
PROT_NONE page) on the container, group, iommufd, cdev, group device fd and
data_fd, under ``fakevfio run``. Each ioctl has a watchdog. The answers are
held against the kernel's errno set of each ioctl (``ioctl_fuzz.KERNEL``),
and the device's FSM invariants must hold afterwards. ``make soak`` runs the
same harness for 100,000 ioctls (``benchmarks/soak.py``). The seed is
``FAKEVFIO_FUZZ_SEED`` (default 1); a failure prints it.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.reliability import ioctl_fuzz

pytestmark = pytest.mark.fuse

COUNT = 5000
SEED = int(os.environ.get("FAKEVFIO_FUZZ_SEED", "1"))


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = ioctl_fuzz.missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return ioctl_fuzz.compile_fuzzer(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def mount(fakevfio_mount_module: MountFactory) -> Iterator[Path]:
    with fakevfio_mount_module(["dev=ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY,seed=5"]) as m:
        yield m.path


def test_fuzzed_ioctls_get_kernel_errnos_and_leave_the_fsm_intact(
    fuzzer: Path, mount: Path
) -> None:
    res = ioctl_fuzz.run_fuzzer(fuzzer, mount, "dev", seed=SEED, count=COUNT, timeout=120)
    tag = f"seed {SEED}"
    assert not res.hang, f"{tag}: {res.hang}"
    assert res.returncode == 0, f"{tag}: {res.stderr[-2000:]}"
    assert res.total == COUNT, tag
    assert "unexpected error" not in res.stderr, f"{tag}: {res.stderr[-2000:]}"
    assert "Traceback" not in res.stderr, f"{tag}: {res.stderr[-2000:]}"
    hist = res.errno_histogram()
    assert hist[errno.ENOSYS] == 0, f"{tag}: ENOSYS means the supervisor stopped listening"
    assert res.violations() == [], tag
    # The run went deep: every kind of fd was reached and some ioctls of each succeeded.
    ok_kinds = {kind for (kind, _r, err) in res.results if err == 0}
    assert ok_kinds >= {"container", "group", "iommu", "cdev", "gdev"}, ok_kinds
    assert any(kind == "data" for (kind, _r, _e) in res.results), "no data_fd was reached"
    assert ioctl_fuzz.device_invariants(mount / "devices" / "dev") == [], tag


def test_fuzzer_is_reproducible_from_its_seed(fuzzer: Path, mount: Path) -> None:
    runs = [
        ioctl_fuzz.run_fuzzer(fuzzer, mount, "dev", seed=SEED + 1, count=300, timeout=60)
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        assert ioctl_fuzz.device_invariants(mount / "devices" / "dev") == []
    assert runs[0].results == runs[1].results


def test_errno_table_rejects_an_answer_outside_the_kernels_set() -> None:
    """The checker itself: EIO (the supervisor's "unexpected error") is never allowed."""
    from collections import Counter

    from vfio_uapi import abi

    res = ioctl_fuzz.FuzzResult(
        seed=0,
        total=2,
        elapsed_ms=0,
        results=Counter({("cdev", abi.VFIO_DEVICE_GET_INFO, errno.EIO): 1}),
        hang="",
        returncode=0,
        stderr="",
    )
    assert len(res.violations()) == 1
    assert ioctl_fuzz.allowed("container", abi._io(0xF0)) == {errno.EINVAL, errno.ENOTTY}
    assert errno.ENOTTY not in ioctl_fuzz.allowed("group", abi.VFIO_GROUP_GET_STATUS)
