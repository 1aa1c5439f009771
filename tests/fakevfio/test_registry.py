"""Registry: creating, numbering and removing devices."""

from __future__ import annotations

import errno
from collections.abc import Mapping

import pytest

from fakevfio._options import DeviceSpec
from fakevfio._ram import RamDriver
from fakevfio._registry import Registry
from fakevfio.driver import ArcDriver
from fakevfio.errors import ConfigError, DeviceError, UnknownDevice
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
