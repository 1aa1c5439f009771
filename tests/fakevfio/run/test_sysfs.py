"""The sysfs view inside ``fakevfio run``, read the way QEMU 10 and the migrator read it.

What is checked comes from outside this project: the file formats of the kernel's
``drivers/pci/pci-sysfs.c`` (``vendor`` ``0x%04x``, ``class`` ``0x%06x``,
``revision`` ``0x%02x``), the link layout of a vfio-pci device in sysfs
(``iommu_group`` -> ``/sys/kernel/iommu_groups/N``, whose ``devices/ADDR`` links
back; ``driver`` -> ``.../drivers/vfio-pci``; ``vfio-dev/vfioN/dev`` = ``MAJ:MIN``),
QEMU's readers (``vfio_device_get_name``: ``stat`` + basename;
``vfio_device_get_groupid``: ``readlink`` + basename + ``%d``;
``vfio_device_is_mdev``: ``realpath(subsystem)``; ``iommufd_cdev_getfd``:
``vfio-dev/vfio*/dev`` then ``/dev/vfio/devices/vfioN`` or ``/dev/char/MAJ:MIN``),
and the kernel's GROUP_GET_DEVICE_FD name match (``vfio_pci_core_match``), driven
by the C program ``tests/c/vfio_drive.c`` compiled against the system's
``<linux/vfio.h>``. The host's ``/sys`` must not change, during the run or after.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakevfio._run import _sysfs
from fakevfio._run._sysfs import EntryKind, PciFunction
from tests.conftest import MountFactory
from tests.test_run import drive, parse, run_under

__all__ = ["drive"]  # the fixture, re-used

# -- the pure layout -------------------------------------------------------------------------


def _config() -> bytes:
    cfg = bytearray(256)
    cfg[0:2] = (0x4348).to_bytes(2, "little")
    cfg[2:4] = (0x3253).to_bytes(2, "little")
    cfg[0x08] = 0x10  # revision
    cfg[0x09:0x0C] = bytes([0x02, 0x00, 0x07])  # prog-if 02, subclass 00, class 07
    cfg[0x2C:0x2E] = (0x1AF4).to_bytes(2, "little")
    cfg[0x2E:0x30] = (0x1100).to_bytes(2, "little")
    return bytes(cfg)


def _fn() -> PciFunction:
    info = {"name": "m", "pci_address": "0000:f0:03.0", "cdev": "vfio3", "iommu_group": 103}
    return PciFunction.from_info(info, _config())


def test_pci_function_from_config_space() -> None:
    fn = _fn()
    assert (fn.vendor, fn.device, fn.revision, fn.class_code) == (0x4348, 0x3253, 0x10, 0x070002)
    assert (fn.subsystem_vendor, fn.subsystem_device) == (0x1AF4, 0x1100)
    assert (fn.bus_dir, fn.minor, fn.group) == ("pci0000:f0", 3, 103)
    with pytest.raises(ValueError, match="config space"):
        PciFunction.from_info({"name": "m"}, b"\0" * 16)


def test_layout_files_have_the_kernels_formats() -> None:
    entries = {e.path: e for e in _sysfs.layout([_fn()])}
    top = "/sys/devices/pci0000:f0/0000:f0:03.0"
    files = {
        p.removeprefix(top + "/"): e.data for p, e in entries.items() if e.kind is EntryKind.FILE
    }
    assert files["vendor"] == b"0x4348\n"
    assert files["device"] == b"0x3253\n"
    assert files["class"] == b"0x070002\n"
    assert files["revision"] == b"0x10\n"
    assert files["subsystem_vendor"] == b"0x1af4\n"
    assert files["subsystem_device"] == b"0x1100\n"
    assert files["vfio-dev/vfio3/dev"] == f"{_sysfs.VFIO_DEV_MAJOR}:3\n".encode()
    assert b"PCI_SLOT_NAME=0000:f0:03.0\n" in files["uevent"]
    assert b"PCI_ID=4348:3253\n" in files["uevent"]


def test_layout_links_resolve_as_in_the_kernel() -> None:
    entries = _sysfs.layout([_fn()])
    top = "/sys/devices/pci0000:f0/0000:f0:03.0"
    links = {
        e.path: posixpath.normpath(posixpath.join(posixpath.dirname(e.path), e.target))
        for e in entries
        if e.kind is EntryKind.LINK
    }
    assert links == {
        f"{top}/iommu_group": "/sys/kernel/iommu_groups/103",
        f"{top}/driver": "/sys/bus/pci/drivers/vfio-pci",
        f"{top}/subsystem": "/sys/bus/pci",
        "/sys/bus/pci/devices/0000:f0:03.0": top,
        "/sys/bus/pci/drivers/vfio-pci/0000:f0:03.0": top,
        "/sys/kernel/iommu_groups/103/devices/0000:f0:03.0": top,
        f"/dev/char/{_sysfs.VFIO_DEV_MAJOR}:3": "/dev/vfio/devices/vfio3",
    }
    # parents before children, each path once
    paths = [e.path for e in entries]
    assert len(paths) == len(set(paths))
    for i, path in enumerate(paths):
        parent = posixpath.dirname(path)
        later = [p for p in paths[i + 1 :] if p == parent]
        assert not later, f"{parent} comes after its child {path}"


def test_layout_shares_a_bus_directory() -> None:
    a = _fn()
    b = PciFunction.from_info(
        {"name": "n", "pci_address": "0000:f0:04.0", "cdev": "vfio4", "iommu_group": 104},
        _config(),
    )
    dirs = [e.path for e in _sysfs.layout([a, b]) if e.kind is EntryKind.DIR]
    assert dirs.count("/sys/devices/pci0000:f0") == 1


# -- the view under fakevfio run ---------------------------------------------------------------

#: What QEMU and the migrator do with the view, for each device address on the command line.
READER = r"""
import json, os, re, sys
out = {}
for addr in sys.argv[1:]:
    sysfsdev = f"/sys/bus/pci/devices/{addr}"
    os.stat(sysfsdev)                                   # vfio_device_get_name
    name = os.path.basename(sysfsdev)
    group = int(os.path.basename(os.readlink(f"{sysfsdev}/iommu_group")))  # get_groupid
    vfio_dev = sorted(d for d in os.listdir(f"{sysfsdev}/vfio-dev") if d.startswith("vfio"))
    devt = open(f"{sysfsdev}/vfio-dev/{vfio_dev[0]}/dev").read()
    major, minor = map(int, re.fullmatch(r"(\d+):(\d+)\n", devt).groups())
    read = lambda f: open(f"{sysfsdev}/{f}").read()
    out[addr] = {
        "name": name,
        "group": group,
        "group_dir": os.path.realpath(f"{sysfsdev}/iommu_group"),
        "group_node": os.path.exists(f"/dev/vfio/{group}"),
        "mdev": os.path.realpath(f"{sysfsdev}/subsystem") == "/sys/bus/mdev",
        "subsystem": os.path.realpath(f"{sysfsdev}/subsystem"),
        "driver": os.path.basename(os.readlink(f"{sysfsdev}/driver")),
        "driver_dir": os.path.realpath(f"/sys/bus/pci/drivers/vfio-pci/{addr}"),
        "real": os.path.realpath(sysfsdev),
        "group_back": os.path.realpath(f"/sys/kernel/iommu_groups/{group}/devices/{addr}"),
        "vfio_dev": vfio_dev,
        "cdev_node": os.path.exists(f"/dev/vfio/devices/{vfio_dev[0]}"),
        "char_link": os.path.realpath(f"/dev/char/{major}:{minor}"),
        "ids": [read(f) for f in ("vendor", "device", "class", "revision",
                                  "subsystem_vendor", "subsystem_device")],
    }
print(json.dumps(out))
"""


@pytest.fixture
def mount(fakevfio_mount: MountFactory) -> Iterator[Path]:
    with fakevfio_mount(["gpu0=ram:size=64K", "nic1=ram:size=64K,address=0000:01:1f.7"]) as m:
        yield m.path


def _host_sys() -> dict[str, list[str] | bool]:
    out: dict[str, list[str] | bool] = {}
    for d in (
        "/sys/bus/pci/devices",
        "/sys/bus/pci/drivers",
        "/sys/kernel/iommu_groups",
        "/sys/devices",
        "/dev/vfio",
        "/dev/char",
    ):
        out[d] = sorted(os.listdir(d)) if os.path.isdir(d) else os.path.exists(d)
    return out


@pytest.mark.fuse
def test_view_reads_as_qemu_reads_it(drive: Path, mount: Path) -> None:
    info = {n: json.loads((mount / "devices" / n / "info").read_bytes()) for n in ("gpu0", "nic1")}
    assert info["gpu0"]["pci_address"] == "0000:f0:00.0"
    assert info["nic1"]["pci_address"] == "0000:01:1f.7"
    r = run_under(mount, sys.executable, "-c", READER, "0000:f0:00.0", "0000:01:1f.7")
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    view = json.loads(r.stdout)
    for name, addr, bus in (
        ("gpu0", "0000:f0:00.0", "pci0000:f0"),
        ("nic1", "0000:01:1f.7", "pci0000:01"),
    ):
        v = view[addr]
        cfg = (mount / "devices" / name / "config").read_bytes()
        top = f"/sys/devices/{bus}/{addr}"
        assert v["name"] == addr
        assert v["group"] == info[name]["iommu_group"]
        assert v["group_dir"] == f"/sys/kernel/iommu_groups/{v['group']}"
        assert v["group_node"]
        assert v["cdev_node"]
        assert not v["mdev"]
        assert v["subsystem"] == "/sys/bus/pci"
        assert v["driver"] == "vfio-pci"
        assert v["real"] == v["driver_dir"] == v["group_back"] == top
        assert v["vfio_dev"] == [info[name]["cdev"]]
        assert v["char_link"] == f"/dev/vfio/devices/{info[name]['cdev']}"
        assert v["ids"] == [
            f"0x{int.from_bytes(cfg[0:2], 'little'):04x}\n",
            f"0x{int.from_bytes(cfg[2:4], 'little'):04x}\n",
            f"0x{int.from_bytes(cfg[9:12], 'little'):06x}\n",
            f"0x{cfg[8]:02x}\n",
            f"0x{int.from_bytes(cfg[0x2C:0x2E], 'little'):04x}\n",
            f"0x{int.from_bytes(cfg[0x2E:0x30], 'little'):04x}\n",
        ]


@pytest.mark.fuse
def test_view_keeps_the_hosts_entries_and_hides_a_clashing_device(
    drive: Path, fakevfio_mount: MountFactory
) -> None:
    host = (
        sorted(os.listdir("/sys/bus/pci/devices")) if os.path.isdir("/sys/bus/pci/devices") else []
    )
    specs = ["a=ram:size=4K"]
    if host:  # a fake device at a host device's address: the view shows ours there
        specs.append(f"b=ram:size=4K,address={host[0]}")
    script = (
        "import os, sys\n"
        "print(' '.join(sorted(os.listdir('/sys/bus/pci/devices'))))\n"
        "for a in sys.argv[1:]:\n"
        "    d = f'/sys/bus/pci/devices/{a}'\n"
        "    print(os.path.basename(os.readlink(f'{d}/driver')), *sorted(os.listdir(d)))\n"
    )
    with fakevfio_mount(specs) as m:
        r = run_under(m.path, sys.executable, "-c", script, *host[:1])
    assert r.returncode == 0, r.stderr
    listed, *clash = r.stdout.splitlines()
    assert listed.split() == sorted({*host, "0000:f0:00.0"})
    if host:  # Rule 2: the host device's files (resource, config, ...) are hidden, not merged
        assert clash[0].split() == ["vfio-pci", *OWN_FILES]


#: A device directory of the view, exactly (``_sysfs`` Rule 2).
OWN_FILES = [
    "class",
    "device",
    "driver",
    "iommu_group",
    "revision",
    "subsystem",
    "subsystem_device",
    "subsystem_vendor",
    "uevent",
    "vendor",
    "vfio-dev",
]


@pytest.mark.fuse
def test_host_sys_is_untouched_during_and_after(drive: Path, mount: Path, tmp_path: Path) -> None:
    before = _host_sys()
    ready = tmp_path / "ready"
    script = f"test -e /sys/bus/pci/devices/0000:f0:00.0 && touch {ready} && sleep 30"
    cmd = [sys.executable, "-m", "fakevfio", "run", "--mount", str(mount), "--", "sh", "-c", script]
    err = tmp_path / "stderr"
    with open(err, "wb") as out:
        proc = subprocess.Popen(cmd, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "the child never saw its view"
            time.sleep(0.05)
        assert _host_sys() == before  # while the child runs
        assert not os.path.exists("/sys/bus/pci/devices/0000:f0:00.0")
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
    assert _host_sys() == before


@pytest.mark.fuse
def test_group_get_device_fd_takes_the_pci_address(drive: Path, mount: Path) -> None:
    info = json.loads((mount / "devices" / "gpu0" / "info").read_bytes())
    group = str(info["iommu_group"])
    by_address = parse(run_under(mount, str(drive), "group", group, "0000:f0:00.0").stdout)
    assert by_address["device_fd_valid"] == "1"
    assert by_address["state"] == "2"  # RUNNING, read through the group's device fd
    by_name = parse(run_under(mount, str(drive), "group", group, "gpu0").stdout)
    assert by_name["device_fd_valid"] == "1"  # the device name still works
    assert by_name["wrong_name"] == str(errno.ENODEV)
    r = run_under(mount, sys.executable, "-c", GET_FD, group, *NAMES)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [[name, err] for name, err in NAMES.items()]


#: vfio_pci_core_match: after the address only spaces and " vf_token=UUID" (EINVAL: a
#: fake device is neither PF nor VF); another character right after it is no match.
NAMES = {
    "0000:f0:00.0": 0,
    "0000:f0:00.0  ": 0,
    "0000:f0:00.0x": errno.ENODEV,
    "0000:f0:00.": errno.ENODEV,
    "0000:F0:00.0": errno.ENODEV,  # dev_name is lower case; strncmp is exact
    "f0:00.0": errno.ENODEV,
    "0000:f0:00.0 vf_token=00000000-0000-0000-0000-000000000000": errno.EINVAL,
    "0000:f0:00.0 bogus": errno.EINVAL,
    "gpu0": 0,
    "gpu0x": errno.ENODEV,
}

GET_FD = r"""
import errno, fcntl, json, os, struct, sys
from vfio_uapi import abi as uapi
container = os.open("/dev/vfio/vfio", os.O_RDWR)
group = os.open(f"/dev/vfio/{sys.argv[1]}", os.O_RDWR)
fcntl.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, struct.pack("<i", container))
fcntl.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
out = []
for name in sys.argv[2:]:
    try:
        arg = bytearray(name.encode() + b"\0")
        fd = fcntl.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, arg, True)
    except OSError as exc:
        out.append([name, exc.errno])
    else:
        os.close(fd)
        out.append([name, 0])
print(json.dumps(out))
"""
