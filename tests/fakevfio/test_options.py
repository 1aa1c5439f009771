"""Device descriptions (``NAME=DRIVER:k=v,...`` and create lines) and sizes."""

from __future__ import annotations

import pytest

from fakevfio._options import (
    MAX_OPTION_VALUE_CHARS,
    MAX_OPTIONS,
    DeviceSpec,
    check_device_name,
    parse_pci_address,
    parse_size,
)
from fakevfio.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "name", "driver", "options"),
    [
        ("gpu0=ram", "gpu0", "ram", {}),
        ("gpu0=ram:", "gpu0", "ram", {}),
        (
            "gpu0=ram:size=256M,flags=STOP_COPY+P2P+PRE_COPY,seed=7",
            "gpu0",
            "ram",
            {"size": "256M", "flags": "STOP_COPY+P2P+PRE_COPY", "seed": "7"},
        ),
        ("0000:01:00.1=my-drv.v2:a=,b=x=y", "0000:01:00.1", "my-drv.v2", {"a": "", "b": "x=y"}),
        ("a_b.c-d=ram:size=1K,,seed=1", "a_b.c-d", "ram", {"size": "1K", "seed": "1"}),
        ("x" * 64 + "=ram", "x" * 64, "ram", {}),
    ],
)
def test_device_spec_from_cli_good(
    text: str, name: str, driver: str, options: dict[str, str]
) -> None:
    spec = DeviceSpec.from_cli(text)
    assert (spec.name, spec.driver, dict(spec.options)) == (name, driver, options)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "gpu0",
        "gpu0=",
        "=ram",
        "../x=ram",
        "a/b=ram",
        "/=ram",
        ".=ram",
        "..=ram",
        "x" * 65 + "=ram",
        "gpu 0=ram",
        "gpü=ram",
        "gpu0=r/am",
        "gpu0=:size=1",
        "gpu0=ram:size",
        "gpu0=ram:Size=1",
        "gpu0=ram:1size=1",
        "gpu0=ram:=1",
        "gpu0=ram:size=1,size=2",
        "gpu0=ram:size=" + "9" * (MAX_OPTION_VALUE_CHARS + 1),
        "gpu0=ram:" + ",".join(f"k{i}=1" for i in range(MAX_OPTIONS + 1)),
    ],
)
def test_device_spec_from_cli_bad(text: str) -> None:
    with pytest.raises(ConfigError):
        DeviceSpec.from_cli(text)


def test_device_spec_limits_are_inclusive() -> None:
    spec = DeviceSpec.from_cli("g=ram:" + ",".join(f"k{i}=1" for i in range(MAX_OPTIONS)))
    assert len(spec.options) == MAX_OPTIONS
    spec = DeviceSpec.from_cli("g=ram:v=" + "a" * MAX_OPTION_VALUE_CHARS)
    assert len(spec.options["v"]) == MAX_OPTION_VALUE_CHARS


@pytest.mark.parametrize(
    ("line", "name", "options"),
    [
        ("gpu1", "gpu1", {}),
        ("gpu1\n", "gpu1", {}),
        ("  gpu1   size=4K  seed=3 \n", "gpu1", {"size": "4K", "seed": "3"}),
        ("gpu1 flags=STOP_COPY", "gpu1", {"flags": "STOP_COPY"}),
    ],
)
def test_device_spec_from_create_line_good(line: str, name: str, options: dict[str, str]) -> None:
    spec = DeviceSpec.from_create_line("ram", line)
    assert (spec.name, spec.driver, dict(spec.options)) == (name, "ram", options)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   \n",
        "../x",
        "/",
        "a/b",
        "..",
        "x" * 65,
        "gpu1 size",
        "gpu1 size=1 size=2",
        "gpu1 =1",
        "gpu1 BAD=1",
    ],
)
def test_device_spec_from_create_line_bad(line: str) -> None:
    with pytest.raises(ConfigError):
        DeviceSpec.from_create_line("ram", line)


def test_device_spec_from_create_line_checks_driver_name() -> None:
    with pytest.raises(ConfigError, match="driver"):
        DeviceSpec.from_create_line("../ram", "gpu1")


def test_device_spec_is_frozen() -> None:
    spec = DeviceSpec.from_cli("a=ram")
    with pytest.raises(AttributeError):
        spec.name = "b"  # type: ignore[misc]


@pytest.mark.parametrize("name", ["a", "A-Z_0.9:x", "0000:01:00.1", "...", "-", "x" * 64])
def test_check_device_name_good(name: str) -> None:
    assert check_device_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "a/b", "../x", "/", "a b", "a\n", "a\x00", "x" * 65, "é"]
)
def test_check_device_name_bad(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid device name"):
        check_device_name(name)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("4096", 4096),
        ("1K", 1024),
        ("1k", 1024),
        ("256M", 256 << 20),
        ("2G", 2 << 30),
        ("1T", 1 << 40),
        (" 3M ", 3 << 20),
        ("1KiB", 1024),
        ("1MB", 1 << 20),
    ],
)
def test_parse_size_good(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text", ["", "K", "-1", "1.5M", "1X", "1KK", "0x10", "1 0", "1" * 20, "1e3", "M1"]
)
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid size"):
        parse_size(text)


def test_parse_size_error_names_what() -> None:
    with pytest.raises(ConfigError, match="invalid dirty_rate option 'fast'"):
        parse_size("fast", what="dirty_rate option")


# -- PCI addresses (the reserved keys address= / pci_address=) --------------------------------
@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("0000:00:05.0", "0000:00:05.0"),
        ("00:05.0", "0000:00:05.0"),
        ("ABCD:F0:1F.7", "abcd:f0:1f.7"),
        ("ffff:ff:1f.7", "ffff:ff:1f.7"),
        (" 0000:01:00.1 ", "0000:01:00.1"),
    ],
)
def test_parse_pci_address_gives_the_kernels_spelling(text: str, address: str) -> None:
    assert parse_pci_address(text) == address


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0000:00:20.0", "slot 0x20 is out of range"),  # 5 bits of slot (PCI_SLOT)
        ("0000:00:05.8", "expected DOMAIN:BUS:SLOT.FUNCTION"),  # 3 bits of function
        ("10000:00:05.0", "expected"),
        ("0:5.0", "expected"),
        ("0000:000:05.0", "expected"),
        ("0000:00:05", "expected"),
        ("0000:00:05.0.1", "expected"),
        ("gpu0", "expected"),
        ("", "expected"),
        ("0000:0g:05.0", "expected"),
    ],
)
def test_parse_pci_address_rejects(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_pci_address(text)


@pytest.mark.parametrize("key", ["address", "pci_address"])
def test_device_spec_takes_the_pci_address_out_of_the_driver_options(key: str) -> None:
    spec = DeviceSpec.from_cli(f"g=ram:size=16M,{key}=0000:00:05.0,seed=1")
    assert spec.pci_address == "0000:00:05.0"
    assert dict(spec.options) == {"size": "16M", "seed": "1"}
    line = DeviceSpec.from_create_line("ram", f"g size=4K {key}=01:02.3")
    assert (line.pci_address, dict(line.options)) == ("0000:01:02.3", {"size": "4K"})
    assert DeviceSpec.from_cli("g=ram:size=4K").pci_address is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("g=ram:address=0000:00:05.0,pci_address=0000:00:06.0", "given twice"),
        ("g=ram:address=0000:00:05.0,address=0000:00:06.0", "option address given twice"),
        ("g=ram:address=nowhere", r"device g: option address: invalid PCI address 'nowhere'"),
        ("g=ram:pci_address=00:40.0", "slot 0x40 is out of range"),
        ("g=ram:address=", "invalid PCI address ''"),
    ],
)
def test_device_spec_bad_pci_address(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DeviceSpec.from_cli(text)
    with pytest.raises(ConfigError, match=match):
        DeviceSpec.from_create_line("ram", "g " + text.partition(":")[2].replace(",", " "))


def test_device_spec_split_reserved_for_specs_built_directly() -> None:
    direct = DeviceSpec("g", "ram", {"size": "4K", "address": "00:05.0"})
    split = direct.split_reserved()
    assert (split.pci_address, dict(split.options)) == ("0000:00:05.0", {"size": "4K"})
    assert split.split_reserved() == split
    with pytest.raises(ConfigError, match="given twice"):
        DeviceSpec("g", "ram", {"address": "00:05.0"}, pci_address="0000:00:06.0").split_reserved()
