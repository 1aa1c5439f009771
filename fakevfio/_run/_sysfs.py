"""The sysfs view ``fakevfio run`` shows its COMMAND: what a VMM reads before it opens a device.

QEMU's ``-device vfio-pci,host=ADDR`` and ``sysfsdev=/sys/bus/pci/devices/ADDR``,
and the migrator's PCI-address path, find a device through sysfs, not through
``/dev/vfio``: ``stat`` of the device directory and its basename as the name that
VFIO_GROUP_GET_DEVICE_FD matches (QEMU ``vfio_device_get_name``), ``readlink`` of
``iommu_group`` whose basename is the group number (``vfio_device_get_groupid``),
``realpath`` of ``subsystem`` (``vfio_device_is_mdev``: ``/sys/bus/pci`` is not
an mdev), and, for iommufd, the ``vfio-dev/vfioN/dev`` file whose ``MAJ:MIN``
names the cdev (``iommufd_cdev_getfd``, falling back to ``/dev/char/MAJ:MIN``).

This module is the pure half: :func:`layout` turns the devices of a mount
(:class:`PciFunction`, from ``info`` and ``config``) into the entries of the
view, with the kernel's file formats (``drivers/pci/pci-sysfs.c``) and link
targets. ``_child`` makes them, on tmpfs mounts inside the child's private
mount namespace only.

Rule 1: every device directory is ``/sys/devices/pciDDDD:BB/DDDD:BB:SS.F`` and is
        reached by relative links, as in the kernel: ``/sys/bus/pci/devices/ADDR``,
        ``/sys/bus/pci/drivers/vfio-pci/ADDR`` and
        ``/sys/kernel/iommu_groups/N/devices/ADDR``.
Rule 2: in the device directory: ``vendor``, ``device``, ``subsystem_vendor``,
        ``subsystem_device``, ``class``, ``revision`` (from config space at start),
        ``uevent``, and the links ``iommu_group``, ``driver`` (vfio-pci),
        ``subsystem`` (the pci bus) and ``vfio-dev/vfioN/dev``.
Rule 3: ``/dev/char/MAJ:MIN`` links to ``../vfio/devices/vfioN`` (udev's link).

Known shortcomings: the view is made once, when COMMAND starts; devices created
or removed later are not in it. The values are the config space at start. The
mount's device nodes are regular files, so an ``open_cdev``-style check that
the cdev is a character device with that ``st_rdev`` (QEMU's
``iommufd=...,host=`` path) fails; QEMU's ``iommufd`` with ``fd=`` and the legacy
group path (``host=``, ``sysfsdev=`` without ``iommufd``) work.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import attrs

from fakevfio._run._nodes import MountNodes

#: The character-device major of the ``vfio-dev`` class in the view (the kernel's is
#: dynamic; the minor is N of vfioN).
VFIO_DEV_MAJOR = 511
SYS = "/sys"


@attrs.frozen(kw_only=True)
class PciFunction:
    """One device of the mount as the view shows it."""

    address: str
    cdev: str
    group: int
    vendor: int
    device: int
    subsystem_vendor: int
    subsystem_device: int
    class_code: int
    revision: int

    @classmethod
    def from_info(cls, info: Mapping[str, object], config: bytes) -> PciFunction:
        """From a device's ``info`` object and its config space (at least 64 bytes)."""
        if len(config) < 64:
            raise ValueError(f"config space of {info.get('name')} is {len(config)} bytes")

        def u16(offset: int) -> int:
            return int.from_bytes(config[offset : offset + 2], "little")

        return cls(
            address=str(info["pci_address"]),
            cdev=str(info["cdev"]),
            group=int(str(info["iommu_group"])),
            vendor=u16(0x00),
            device=u16(0x02),
            revision=config[0x08],
            class_code=int.from_bytes(config[0x09:0x0C], "little"),
            subsystem_vendor=u16(0x2C),
            subsystem_device=u16(0x2E),
        )

    @property
    def minor(self) -> int:
        return int(self.cdev.removeprefix("vfio"))

    @property
    def bus_dir(self) -> str:
        """The root bus directory in ``/sys/devices`` (``pci0000:f0``)."""
        return "pci" + self.address.rsplit(":", 1)[0]


class EntryKind(enum.Enum):
    DIR = "dir"
    FILE = "file"
    LINK = "link"


@attrs.frozen
class Entry:
    """One path of the view: a directory, a file with ``data``, or a link to ``target``."""

    kind: EntryKind
    path: str
    data: bytes = b""
    target: str = ""
    #: a directory of one device only: whatever the host has at ``path`` is hidden
    fresh: bool = False


def _hex(value: int, digits: int) -> bytes:
    return f"0x{value:0{digits}x}\n".encode()


def device_dir(fn: PciFunction, sys: str = SYS) -> str:
    return f"{sys}/devices/{fn.bus_dir}/{fn.address}"


def layout(functions: Iterable[PciFunction], *, sys: str = SYS, dev: str = "/dev") -> list[Entry]:
    """The view's entries, parents before children (Rules 1-3)."""
    out: list[Entry] = [
        Entry(EntryKind.DIR, f"{sys}/bus/pci/drivers/vfio-pci"),
        Entry(EntryKind.DIR, f"{dev}/char"),
    ]
    for fn in functions:
        top = device_dir(fn, sys)
        group = f"{sys}/kernel/iommu_groups/{fn.group}"
        devt = f"{VFIO_DEV_MAJOR}:{fn.minor}"
        uevent = (
            "DRIVER=vfio-pci\n"
            f"PCI_CLASS={fn.class_code:X}\n"
            f"PCI_ID={fn.vendor:04X}:{fn.device:04X}\n"
            f"PCI_SUBSYS_ID={fn.subsystem_vendor:04X}:{fn.subsystem_device:04X}\n"
            f"PCI_SLOT_NAME={fn.address}\n"
        )
        out += [
            Entry(EntryKind.DIR, f"{sys}/devices/{fn.bus_dir}"),
            Entry(EntryKind.DIR, top, fresh=True),
            Entry(EntryKind.FILE, f"{top}/vendor", _hex(fn.vendor, 4)),
            Entry(EntryKind.FILE, f"{top}/device", _hex(fn.device, 4)),
            Entry(EntryKind.FILE, f"{top}/subsystem_vendor", _hex(fn.subsystem_vendor, 4)),
            Entry(EntryKind.FILE, f"{top}/subsystem_device", _hex(fn.subsystem_device, 4)),
            Entry(EntryKind.FILE, f"{top}/class", _hex(fn.class_code, 6)),
            Entry(EntryKind.FILE, f"{top}/revision", _hex(fn.revision, 2)),
            Entry(EntryKind.FILE, f"{top}/uevent", uevent.encode()),
            Entry(
                EntryKind.LINK,
                f"{top}/iommu_group",
                target=f"../../../kernel/iommu_groups/{fn.group}",
            ),
            Entry(EntryKind.LINK, f"{top}/driver", target="../../../bus/pci/drivers/vfio-pci"),
            Entry(EntryKind.LINK, f"{top}/subsystem", target="../../../bus/pci"),
            Entry(EntryKind.DIR, f"{top}/vfio-dev", fresh=True),
            Entry(EntryKind.DIR, f"{top}/vfio-dev/{fn.cdev}", fresh=True),
            Entry(EntryKind.FILE, f"{top}/vfio-dev/{fn.cdev}/dev", f"{devt}\n".encode()),
            Entry(
                EntryKind.LINK,
                f"{sys}/bus/pci/devices/{fn.address}",
                target=f"../../../devices/{fn.bus_dir}/{fn.address}",
            ),
            Entry(
                EntryKind.LINK,
                f"{sys}/bus/pci/drivers/vfio-pci/{fn.address}",
                target=f"../../../../devices/{fn.bus_dir}/{fn.address}",
            ),
            Entry(EntryKind.DIR, group, fresh=True),
            Entry(EntryKind.FILE, f"{group}/type", b"DMA\n"),
            Entry(EntryKind.FILE, f"{group}/reserved_regions", b""),
            Entry(EntryKind.DIR, f"{group}/devices", fresh=True),
            Entry(
                EntryKind.LINK,
                f"{group}/devices/{fn.address}",
                target=f"../../../../devices/{fn.bus_dir}/{fn.address}",
            ),
            Entry(EntryKind.LINK, f"{dev}/char/{devt}", target=f"../vfio/devices/{fn.cdev}"),
        ]
    seen: set[str] = set()
    unique: list[Entry] = []
    for entry in out:  # a bus directory shared by several devices, once
        if entry.path not in seen:
            seen.add(entry.path)
            unique.append(entry)
    return unique


def read_functions(nodes: MountNodes) -> list[PciFunction]:
    """The mount's devices, from their ``info`` (read already) and ``config`` files."""
    out: list[PciFunction] = []
    for name, device in sorted(nodes.devices.items()):
        try:
            info = device.info
            with open(nodes.dev_path(name, "config"), "rb", buffering=0) as f:
                config = f.read(4096)
            out.append(PciFunction.from_info(info, config))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # removed meanwhile, or not a device directory
    return out
