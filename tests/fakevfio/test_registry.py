"""Registry: creating, numbering and removing devices."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from fakevfio._options import DeviceSpec, parse_pci_address
from fakevfio._ram import RamDriver
from fakevfio._registry import Registry
from fakevfio.driver import ArcDriver
from fakevfio.errors import ConfigError, DeviceError, UnknownDevice
from tests.conftest import MountFactory
from vfio_uapi.fsm import State


class ExplodingDriver(RamDriver):
    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        raise ValueError("no hardware today")


def registry() -> Registry:
    drivers: dict[str, type[ArcDriver]] = {"ram": RamDriver, "boom": ExplodingDriver}
    return Registry(drivers)


def spec(text: str) -> DeviceSpec:
    return DeviceSpec.from_cli(text)


def test_registry_create_numbers_devices_in_creation_order() -> None:
    reg = registry()
    a = reg.create(spec("a=ram:size=4K"))
    b = reg.create(spec("b=ram:size=4K,flags=STOP_COPY"))
    assert (a.number, b.number) == (0, 1)
    assert (a.cdev, b.cdev) == ("vfio0", "vfio1")
    assert reg.get("b") is b
    assert reg.by_number(1) is b
    assert list(reg.devices) == ["a", "b"]
    assert reg.live_devices() == [a, b]
    assert b.state is State.RUNNING
    assert b.driver_name == "ram"


def test_registry_rejects_duplicate_and_unknown_driver() -> None:
    reg = registry()
    reg.create(spec("a=ram:size=4K"))
    with pytest.raises(ConfigError, match="already exists"):
        reg.create(spec("a=ram:size=4K"))
    with pytest.raises(ConfigError, match=r"unknown driver 'nvidia'.*loaded: boom, ram"):
        reg.create(spec("b=nvidia"))
    assert list(reg.devices) == ["a"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("b=ram:size=0", "size"),
        ("b=ram:size=lots", "invalid size"),
        ("b=ram:colour=red", "unknown option"),
        ("b=ram:flags=P2P", "not a combination"),
        ("b=ram:seed=x", "not an integer"),
        ("b=boom", "no hardware today"),
    ],
)
def test_registry_bad_options_leave_no_trace(text: str, match: str) -> None:
    reg = registry()
    with pytest.raises(ConfigError, match=match):
        reg.create(spec(text))
    assert reg.devices == {}
    # The name is free again, and numbering continues.
    dev = reg.create(spec("b=ram:size=4K"))
    assert dev.name == "b"


def test_registry_remove() -> None:
    reg = registry()
    a = reg.create(spec("a=ram:size=4K"))
    reg.create(spec("b=ram:size=4K"))
    reg.remove("a")
    assert list(reg.devices) == ["b"]
    with pytest.raises(UnknownDevice):
        reg.get("a")
    with pytest.raises(UnknownDevice):
        reg.remove("a")
    with pytest.raises(UnknownDevice):
        reg.by_number(0)
    assert a.session is None
    c = reg.create(spec("a=ram:size=4K"))
    assert c.number == 2  # numbers are never reused


def test_registry_remove_is_ebusy_while_session_live() -> None:
    reg = registry()
    dev = reg.create(spec("a=ram:size=4K"))
    session = dev.set_state(State.PRE_COPY).session
    assert session is not None
    with pytest.raises(DeviceError) as info:
        reg.remove("a")
    assert info.value.errno == errno.EBUSY
    assert reg.get("a") is dev
    dev.set_state(State.RUNNING)
    reg.remove("a")
    assert not session.alive


def test_registry_unknown_device_message() -> None:
    with pytest.raises(UnknownDevice, match="no device named 'zz'"):
        registry().get("zz")


# -- PCI addresses --------------------------------------------------------------------------
class RecordingDriver(RamDriver):
    seen: ClassVar[list[dict[str, str]]] = []

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        RecordingDriver.seen.append(dict(options))
        super().__init__(name, options)


def test_registry_pci_address_default_settable_and_shown_in_info() -> None:
    reg = registry()
    a = reg.create(spec("a=ram:size=4K"))
    b = reg.create(spec("b=ram:size=4K,address=0000:00:05.0"))
    c = DeviceSpec.from_create_line("ram", "c size=4K pci_address=00:06.0")
    c_dev = reg.create(c)
    assert (a.pci_address, b.pci_address, c_dev.pci_address) == (
        "0000:f0:00.0",
        "0000:00:05.0",
        "0000:00:06.0",
    )
    assert b.info(with_digest=False)["pci_address"] == "0000:00:05.0"


def test_registry_never_gives_the_pci_address_to_the_driver() -> None:
    RecordingDriver.seen = []
    reg = Registry({"rec": RecordingDriver})
    reg.create(spec("a=rec:size=4K,address=0000:00:05.0"))
    reg.create(DeviceSpec("b", "rec", {"size": "4K", "pci_address": "00:06.0"}))  # e.g. TOML
    assert RecordingDriver.seen == [{"size": "4K"}, {"size": "4K"}]
    assert reg.get("b").pci_address == "0000:00:06.0"


def test_registry_pci_addresses_are_unique() -> None:
    reg = registry()
    reg.create(spec("a=ram:size=4K,address=0000:00:05.0"))
    with pytest.raises(ConfigError, match=r"PCI address 0000:00:05.0 is already device a's"):
        reg.create(spec("b=ram:size=4K,address=00:05.0"))  # same address, other spelling
    assert list(reg.devices) == ["a"]
    assert reg.create(spec("b=ram:size=4K")).number == 1  # the refused spec used no number


def test_registry_explicit_address_cannot_take_a_default_one_already_given() -> None:
    reg = registry()
    reg.create(spec("a=ram:size=4K"))  # 0000:f0:00.0
    with pytest.raises(ConfigError, match="already device a's"):
        reg.create(spec("b=ram:size=4K,address=0000:f0:00.0"))
    assert list(reg.devices) == ["a"]


def test_registry_defaults_skip_addresses_a_spec_took() -> None:
    reg = registry()
    a = reg.create(spec("a=ram:size=4K,address=0000:f0:01.0"))  # device 0 names device 1's
    b = reg.create(spec("b=ram:size=4K"))  # number 1: its default is taken
    c = reg.create(spec("c=ram:size=4K"))
    assert (a.pci_address, b.pci_address, c.pci_address) == (
        "0000:f0:01.0",
        "0000:f0:02.0",
        "0000:f0:03.0",  # number 2 wanted f0:02.0, which b holds
    )


def test_registry_failed_create_releases_its_pci_address() -> None:
    reg = registry()
    with pytest.raises(ConfigError, match="no hardware today"):
        reg.create(spec("x=boom:address=0000:00:05.0"))
    with pytest.raises(ConfigError, match="unknown option"):
        reg.create(spec("y=ram:colour=red,address=0000:00:05.0"))
    dev = reg.create(spec("z=ram:size=4K,address=0000:00:05.0"))
    assert dev.pci_address == "0000:00:05.0"
    reg.remove("z")
    assert reg.create(spec("w=ram:size=4K,address=0000:00:05.0")).pci_address == "0000:00:05.0"


def test_registry_default_addresses_stay_valid_past_512_creations() -> None:
    reg = registry()
    seen = set()
    for i in range(600):
        dev = reg.create(spec(f"d{i}=ram:size=4K"))
        seen.add(dev.pci_address)
        reg.remove(dev.name)
    assert len(seen) == 600
    for address in seen:
        assert parse_pci_address(address) == address


# -- through a real mount: the CLI and drivers/<d>/create ------------------------------------
@pytest.mark.parametrize(
    ("devices", "message"),
    [
        (
            ["a=ram:size=4K,address=00:05.0", "b=ram:size=4K,address=0000:00:05.0"],
            "fakevfio: device b: PCI address 0000:00:05.0 is already device a's",
        ),
        (
            ["a=ram:size=4K,address=00:35.0"],
            "fakevfio: device a: option address: invalid PCI address '00:35.0': slot 0x35",
        ),
    ],
)
def test_mount_refuses_bad_pci_addresses(tmp_path: Path, devices: list[str], message: str) -> None:
    argv = [sys.executable, "-m", "fakevfio", "mount", str(tmp_path)]
    for device in devices:
        argv += ["--device", device]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 1
    assert out.stderr.startswith(message), out.stderr
    assert not os.path.ismount(tmp_path)


@pytest.mark.fuse
def test_mount_create_line_sets_the_pci_address(fakevfio_mount: MountFactory) -> None:
    with fakevfio_mount(["a=ram:size=4K,pci_address=0000:00:05.0"]) as m:
        assert m.info("a")["pci_address"] == "0000:00:05.0"
        assert m.create("b", options="size=4K address=00:05.0") == errno.EINVAL  # a's
        assert m.create("b", options="size=4K address=00:06.8") == errno.EINVAL
        assert "b" not in os.listdir(m.path / "devices")
        assert m.create("b", options="size=4K address=00:06.1") is None
        assert m.info("b")["pci_address"] == "0000:00:06.1"
        assert m.info("b")["regions"] == m.info("a")["regions"]  # the driver took size only
