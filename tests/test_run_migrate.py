"""The migrator's kernel backend, unmodified, against fake devices under ``fakevfio run``.

Both sides use the real ioctl uAPI (``/dev/vfio/devices/vfioN`` + ``/dev/iommu``)
answered by the seccomp supervisor; the destination's state must equal the
source's, exactly as through the file backend.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.migrator.helpers import SOURCE_ARCS, Result, digest

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(120)]


def _under_run(mount: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fakevfio",
        "run",
        "--mount",
        str(mount),
        "--",
        sys.executable,
        "-m",
        "migrator",
        *args,
    ]


@pytest.mark.parametrize("multifd", ["off", "on"])
def test_kernel_backend_migrates_under_fakevfio_run(
    fakevfio_mount: MountFactory, tmp_path: Path, multifd: str
) -> None:
    flags = "STOP_COPY+P2P+PRE_COPY"
    with (
        fakevfio_mount([f"gpu0=ram:size=8M,flags={flags},seed=5,dirty_rate=1M"]) as src,
        fakevfio_mount([f"gpu0=ram:size=8M,flags={flags}"]) as dst,
    ):
        sock = f"unix:{tmp_path}/k.sock"
        common = ["--multifd-transfer", multifd, "--multifd-channels", "2", "--json"]
        incoming = subprocess.Popen(
            _under_run(
                dst.path,
                "incoming",
                "--listen",
                sock,
                *common,
                "/dev/vfio/devices/vfio0,id=gpu0/vfio",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert incoming.stderr is not None
            line = incoming.stderr.readline()
            assert line.startswith("migrator: listening on"), line
            out = subprocess.run(
                _under_run(
                    src.path,
                    "migrate",
                    "--to",
                    sock,
                    *common,
                    "/dev/vfio/devices/vfio0,id=gpu0/vfio",
                ),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            source = Result(out.returncode, out.stdout, out.stderr)
        finally:
            _out, derr = incoming.communicate(timeout=60)
        assert source.returncode == 0, source.stderr
        assert incoming.returncode == 0, derr
        assert source.json()["status"] == "completed"
        assert src.state("gpu0") == "STOP"
        assert dst.state("gpu0") == "RUNNING"
        assert digest(dst, "gpu0") == digest(src, "gpu0")
        assert src.log_lines("gpu0") == SOURCE_ARCS[flags]


@pytest.mark.parametrize("multifd", ["off", "on"])
def test_migrator_by_pci_address_under_fakevfio_run(
    fakevfio_mount: MountFactory, tmp_path: Path, multifd: str
) -> None:
    """``migrator ... 0000:f0:00.0``: sysfs iommu_group, the legacy container and group
    (TYPE1v2), VFIO_GROUP_GET_DEVICE_FD by the address, as on a host with vfio-pci."""
    flags = "STOP_COPY+P2P+PRE_COPY"
    with (
        fakevfio_mount(
            [
                "other=ram:size=64K",  # takes vfio0 and the default 0000:f0:00.0
                f"gpu0=ram:size=8M,flags={flags},seed=5,dirty_rate=1M,address=0000:00:07.0",
            ]
        ) as src,
        fakevfio_mount([f"gpu0=ram:size=8M,flags={flags}"]) as dst,
    ):
        assert src.info("gpu0")["pci_address"] == "0000:00:07.0"
        assert dst.info("gpu0")["pci_address"] == "0000:f0:00.0"
        sock = f"unix:{tmp_path}/k.sock"
        common = ["--multifd-transfer", multifd, "--multifd-channels", "2", "--json"]
        incoming = subprocess.Popen(
            _under_run(dst.path, "incoming", "--listen", sock, *common, "0000:f0:00.0,id=gpu0"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert incoming.stderr is not None
            line = incoming.stderr.readline()
            assert line.startswith("migrator: listening on"), line
            out = subprocess.run(
                _under_run(src.path, "migrate", "--to", sock, *common, "0000:00:07.0,id=gpu0"),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            source = Result(out.returncode, out.stdout, out.stderr)
            if source.returncode != 0:
                incoming.kill()  # it would wait for a source forever
        finally:
            _out, derr = incoming.communicate(timeout=60)
        assert source.returncode == 0, source.stderr
        assert incoming.returncode == 0, derr
        assert source.json()["status"] == "completed"
        assert src.state("gpu0") == "STOP"
        assert src.state("other") == "RUNNING"  # the device at the other address: untouched
        assert dst.state("gpu0") == "RUNNING"
        assert digest(dst, "gpu0") == digest(src, "gpu0")
        assert src.log_lines("gpu0") == SOURCE_ARCS[flags]
        assert src.log_lines("other") == []


def test_migrator_by_pci_address_names_what_is_missing(fakevfio_mount: MountFactory) -> None:
    with fakevfio_mount(["gpu0=ram:size=64K"]) as src:
        out = subprocess.run(
            _under_run(src.path, "save", "-o", "/dev/null", "0000:f0:01.0"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert out.returncode != 0
    assert out.stderr.splitlines() == [
        "migrator: error: device 0000:f0:01.0: find iommu_group failed: ENODEV "
        "(no such PCI device (no /sys/bus/pci/devices/0000:f0:01.0))"
    ]


def _fake_sysfs(tmp_path: Path, *, group: bool, driver: str | None) -> Path:
    sysfs = tmp_path / "sys" / "bus" / "pci" / "devices"
    dev = tmp_path / "sys" / "devices" / "pci0000:00" / "0000:00:05.0"
    dev.mkdir(parents=True)
    sysfs.mkdir(parents=True)
    (sysfs / "0000:00:05.0").symlink_to("../../../devices/pci0000:00/0000:00:05.0")
    if group:
        (dev / "iommu_group").symlink_to("../../../kernel/iommu_groups/12")
    if driver:
        (dev / "driver").symlink_to(f"../../../bus/pci/drivers/{driver}")
    (tmp_path / "dev" / "vfio").mkdir(parents=True)  # without the group's node
    return sysfs


@pytest.mark.parametrize(
    ("group", "driver", "message"),
    [
        (False, None, r"find iommu_group failed: ENOENT \(no IOMMU group .*is the IOMMU on"),
        (True, "e1000e", r"IOMMU group 12 has no VFIO node: the device is bound to e1000e, not"),
        (True, None, r"bound to no driver, not vfio-pci \(echo vfio-pci > .*driver_override"),
    ],
)
def test_kernel_backend_pci_address_says_what_is_wrong(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, group: bool, driver: str | None, message: str
) -> None:
    from migrator import kernel
    from migrator.errors import DeviceOpError

    monkeypatch.setattr(
        kernel, "SYS_PCI_DEVICES", _fake_sysfs(tmp_path, group=group, driver=driver)
    )
    monkeypatch.setattr(kernel, "DEV_VFIO", tmp_path / "dev" / "vfio")
    with pytest.raises(DeviceOpError, match=message):
        kernel.open_device("0000:00:05.0")
    with pytest.raises(DeviceOpError, match=message):
        kernel.open_device("00:05.0")  # the short form, as lspci prints it
