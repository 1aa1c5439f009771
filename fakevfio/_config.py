"""The ``fakevfio mount --config FILE.toml`` file: devices as TOML tables.

The file holds one table, ``[devices]``, with one sub-table per device::

    [devices.gpu0]
    driver = "ram"
    size = "256M"
    seed = 7

Rule 1: everything in the file is known or it is an error that names it: a top-level
        table or key other than ``devices`` (``[device.gpu0]``, a misspelling) is
        refused, so a typo never mounts zero devices in silence. The keys of a device
        table are ``driver`` and the driver's options; the driver checks its own
        option names when the device is created (an unknown one names the device).
Rule 2: option values are strings or integers (``seed = 7`` is ``seed=7``), as on
        the command line; booleans, floats, arrays and tables are refused.
Rule 3: pure: the caller reads the file; this module only checks the parsed data.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping

from fakevfio._options import DeviceSpec, check_device_name
from fakevfio.errors import ConfigError

#: The only top-level table of a config file (Rule 1).
TOP_LEVEL_KEYS = ("devices",)
#: Upper bound on the devices of one file (the registry's own bound is higher).
MAX_CONFIG_DEVICES = 1024


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean [{close[0]}]?)" if close else ""


def parse_config(text: str, source: str) -> list[DeviceSpec]:
    """The device specs of a config file's text; ``source`` names the file in errors.

    Raises:
        ConfigError: a TOML syntax error, an unknown table or key (Rule 1), a device
            table without ``driver``, or a value of the wrong type (Rule 2).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {source}: {exc}") from None
    return devices_from_data(data, source)


def devices_from_data(data: Mapping[str, object], source: str) -> list[DeviceSpec]:
    """The device specs of parsed TOML ``data`` (see :func:`parse_config`)."""
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            hint = _did_you_mean(key, TOP_LEVEL_KEYS)
            raise ConfigError(
                f"config {source}: unknown table or key {key!r}{hint}; "
                "a config file holds only [devices.NAME] tables, "
                'e.g. [devices.gpu0] with driver = "ram"'
            )
    table = data.get("devices", {})
    if not isinstance(table, dict):
        raise ConfigError(f"config {source}: [devices] must be a table of [devices.NAME] tables")
    if len(table) > MAX_CONFIG_DEVICES:
        raise ConfigError(
            f"config {source}: {len(table)} devices (at most {MAX_CONFIG_DEVICES} per file)"
        )
    specs = []
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(
                f"config {source}: devices.{name} must be a table ([devices.{name}] with "
                'driver = "NAME"), not a value'
            )
        driver = entry.get("driver")
        if not isinstance(driver, str):
            raise ConfigError(f'config {source}: [devices.{name}] needs driver = "NAME"')
        options: dict[str, str] = {}
        for key, value in entry.items():
            if key == "driver":
                continue
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise ConfigError(
                    f"config {source}: [devices.{name}] {key} must be a string or an integer "
                    f'(got {type(value).__name__}), e.g. {key} = "4M"'
                )
            options[key] = str(value)
        try:
            specs.append(DeviceSpec(check_device_name(name), driver, options))
        except ConfigError as exc:
            raise ConfigError(f"config {source}: [devices.{name}]: {exc}") from None
    return specs


__all__ = ["TOP_LEVEL_KEYS", "devices_from_data", "parse_config"]
