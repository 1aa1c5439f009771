"""Parsing of device descriptions and driver options.

A device is described as ``NAME=DRIVER[:key=value,...]`` on the command line, or
as ``NAME key=value ...`` in a ``drivers/<driver>/create`` write. Sizes and
rates take the suffixes K, M and G (powers of 1024).
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


def check_device_name(name: str) -> str:
    """Return ``name`` if it is a valid device name, else raise ConfigError."""
    if not DEVICE_NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise ConfigError(
            f"invalid device name {name!r} (expected 1-64 characters of A-Z a-z 0-9 _ . : -, "
            "not '.' or '..')"
        )
    return name


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

    @classmethod
    def from_cli(cls, text: str) -> DeviceSpec:
        """Parse ``NAME=DRIVER[:key=value,...]``."""
        name, sep, rest = text.partition("=")
        if not sep or not rest:
            raise ConfigError(f"invalid device {text!r} (expected NAME=DRIVER[:key=value,...])")
        driver, _, opts = rest.partition(":")
        pairs = [p for p in opts.split(",") if p] if opts else []
        return cls(check_device_name(name), _check_driver(driver), _parse_pairs(pairs, text))

    @classmethod
    def from_create_line(cls, driver: str, text: str) -> DeviceSpec:
        """Parse the ``NAME [key=value ...]`` line written to ``drivers/<driver>/create``."""
        words = text.split()
        if not words:
            raise ConfigError("empty create line (expected NAME [key=value ...])")
        return cls(
            check_device_name(words[0]), _check_driver(driver), _parse_pairs(words[1:], text)
        )


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
