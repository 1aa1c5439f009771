"""Parsing of device descriptions and driver options.

A device is described as ``NAME=DRIVER[:key=value,...]`` on the command line, or
as ``NAME key=value ...`` in a ``drivers/<driver>/create`` write. Sizes and
rates take the suffixes K, M and G (powers of 1024).

Rule 1: the keys ``address`` and ``pci_address`` are the core's, never a driver's:
        they set the device's PCI address (``DDDD:BB:SS.F`` or ``BB:SS.F``, hex, slot
        00..1f, function 0..7, as ``lspci -D`` prints it) and are taken out of the
        options before the driver sees them (:meth:`DeviceSpec.split_reserved`).
Rule 2: a PCI address is kept in the kernel's spelling (``pci_name()``: four-digit
        domain, lower case), so comparing two addresses is comparing two strings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs

from fakevfio.errors import ConfigError
from vfio_uapi import units

DEVICE_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_KEY_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_OPTIONS = 64
MAX_OPTION_VALUE_CHARS = 256
#: Option keys that set the device's PCI address (Rule 1); INTERFACES names ``address``.
PCI_ADDRESS_KEYS = ("address", "pci_address")
_PCI_ADDRESS_RE = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{4}):)?(?P<bus>[0-9a-fA-F]{2}):(?P<slot>[0-9a-fA-F]{2})"
    r"\.(?P<function>[0-7])"
)
MAX_PCI_SLOT = 0x1F


def check_device_name(name: str) -> str:
    """Return ``name`` if it is a valid device name, else raise ConfigError."""
    if not DEVICE_NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise ConfigError(
            f"invalid device name {name!r} (expected 1-64 characters of A-Z a-z 0-9 _ . : -, "
            "not '.' or '..')"
        )
    return name


def parse_pci_address(text: str) -> str:
    """The PCI address ``text`` in the kernel's spelling (``0000:00:05.0``), else ConfigError.

    ``DDDD:BB:SS.F`` or ``BB:SS.F`` (domain 0000), hex digits of either case.
    """
    match = _PCI_ADDRESS_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(
            f"invalid PCI address {text[:80]!r} (expected DOMAIN:BUS:SLOT.FUNCTION in hex, "
            "e.g. 0000:00:05.0, or BUS:SLOT.FUNCTION)"
        )
    slot = int(match["slot"], 16)
    if slot > MAX_PCI_SLOT:
        raise ConfigError(
            f"invalid PCI address {text!r}: slot 0x{slot:02x} is out of range (00..1f)"
        )
    domain = int(match["domain"] or "0", 16)
    return f"{domain:04x}:{int(match['bus'], 16):02x}:{slot:02x}.{match['function']}"


def parse_size(text: str, *, what: str = "size") -> int:
    """Parse ``256M`` / ``4096`` / ``1G`` into bytes (K, M, G, T are powers of 1024)."""
    try:
        return units.parse_size(text, what=what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@attrs.frozen
class DeviceSpec:
    """A device to create: its name, its driver and the driver's options."""

    name: str
    driver: str
    options: Mapping[str, str] = attrs.field(factory=dict)
    #: The PCI address the spec asks for (None: the registry assigns one).
    pci_address: str | None = attrs.field(default=None, kw_only=True)

    @classmethod
    def from_cli(cls, text: str) -> DeviceSpec:
        """Parse ``NAME=DRIVER[:key=value,...]``."""
        name, sep, rest = text.partition("=")
        if not sep or not rest:
            raise ConfigError(f"invalid device {text!r} (expected NAME=DRIVER[:key=value,...])")
        driver, _, opts = rest.partition(":")
        pairs = [p for p in opts.split(",") if p] if opts else []
        spec = cls(check_device_name(name), _check_driver(driver), _parse_pairs(pairs, text))
        return spec.split_reserved()

    @classmethod
    def from_create_line(cls, driver: str, text: str) -> DeviceSpec:
        """Parse the ``NAME [key=value ...]`` line written to ``drivers/<driver>/create``."""
        words = text.split()
        if not words:
            raise ConfigError("empty create line (expected NAME [key=value ...])")
        spec = cls(
            check_device_name(words[0]), _check_driver(driver), _parse_pairs(words[1:], text)
        )
        return spec.split_reserved()

    def split_reserved(self) -> DeviceSpec:
        """This spec with the PCI address keys (Rule 1) moved out of the driver's options.

        Raises:
            ConfigError: a malformed address, both keys given, or an address in the
                options of a spec that already has one.
        """
        given = [key for key in PCI_ADDRESS_KEYS if key in self.options]
        if not given:
            return self
        if len(given) > 1 or self.pci_address is not None:
            raise ConfigError(
                f"device {self.name}: the PCI address is given twice "
                f"({' and '.join(given)}); give one of {', '.join(PCI_ADDRESS_KEYS)}"
            )
        try:
            address = parse_pci_address(self.options[given[0]])
        except ConfigError as exc:
            raise ConfigError(f"device {self.name}: option {given[0]}: {exc}") from None
        options = {k: v for k, v in self.options.items() if k not in PCI_ADDRESS_KEYS}
        return attrs.evolve(self, options=options, pci_address=address)


def _check_driver(driver: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", driver):
        raise ConfigError(f"invalid driver name {driver!r}")
    return driver


def _parse_pairs(pairs: list[str], whole: str) -> dict[str, str]:
    if len(pairs) > MAX_OPTIONS:
        raise ConfigError(f"too many options in {whole[:80]!r} (at most {MAX_OPTIONS})")
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.fullmatch(key):
            raise ConfigError(f"invalid option {pair[:80]!r} (expected key=value)")
        if len(value) > MAX_OPTION_VALUE_CHARS:
            raise ConfigError(f"option {key} is too long (at most {MAX_OPTION_VALUE_CHARS} chars)")
        if key in out:
            raise ConfigError(f"option {key} given twice")
        out[key] = value.strip()
    return out
