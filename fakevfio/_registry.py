"""The set of devices one mount serves: creation, numbering, PCI addresses and removal.

Rule 1: names and PCI addresses are unique within the mount; both are reserved under
        the lock before the driver's constructor runs, and released if it fails.
Rule 2: a device whose spec names no PCI address gets ``default_pci_address(number)``,
        or, when a spec took that one, the next free address of the same sequence.
Rule 3: the PCI address is the core's: it never reaches the driver's options.
Rule 4: an error from a driver's constructor names the device (``device g: invalid size
        option 'banana' ...``) and says where the driver's options are listed.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from fakevfio._device import Device, default_pci_address
from fakevfio._host import HostServices
from fakevfio._options import DeviceSpec, parse_pci_address
from fakevfio.driver import ArcDriver
from fakevfio.errors import ConfigError, DeviceError, FakeVfioError, UnknownDevice

MAX_DEVICES = 1024
#: Buses f0..ff, 32 slots each, functions 0..7: room for MAX_DEVICES and more.
_DEFAULT_ADDRESSES = 16 * 32 * 8


def _default_address(index: int) -> str:
    """Default address ``index``: ``default_pci_address`` for the first 512, then function 1..7."""
    if index < 512:
        return default_pci_address(index)
    return f"0000:{0xF0 + index // 32 % 16:02x}:{index % 32:02x}.{index // 512}"


def _option_error(spec: DeviceSpec, problem: str) -> str:
    """Rule 4: a driver's refusal of a device, naming the device and where its options are."""
    return (
        f"device {spec.name}: {problem}; `fakevfio drivers` lists driver {spec.driver}'s "
        "options with their forms and defaults"
    )


class Registry:
    """Devices by name, created through the loaded drivers."""

    def __init__(
        self, drivers: Mapping[str, type[ArcDriver]], *, host: HostServices | None = None
    ) -> None:
        self.drivers = dict(drivers)
        #: The OS services each device gets for DMA and eventfds (None: neither works).
        self.host = host
        self._devices: dict[str, Device] = {}
        #: PCI address -> name of the device holding it (Rule 1)
        self._addresses: dict[str, str] = {}
        self._next_number = 0
        self._lock = threading.Lock()

    @property
    def devices(self) -> Mapping[str, Device]:
        return dict(self._devices)

    def get(self, name: str) -> Device:
        try:
            return self._devices[name]
        except KeyError:
            raise UnknownDevice(name) from None

    def create(self, spec: DeviceSpec) -> Device:
        """Create a device (the driver's constructor may allocate its state).

        Raises:
            ConfigError: unknown driver, duplicate name or PCI address, bad options.
        """
        spec = spec.split_reserved()  # specs built directly (a TOML file) too: Rule 3
        cls = self.drivers.get(spec.driver)
        if cls is None:
            known = ", ".join(sorted(self.drivers)) or "none"
            raise ConfigError(
                f"unknown driver {spec.driver!r} for device {spec.name} (loaded: {known})"
            )
        with self._lock:
            if spec.name in self._devices:
                raise ConfigError(f"a device named {spec.name} already exists")
            if len(self._devices) >= MAX_DEVICES:
                raise ConfigError(f"at most {MAX_DEVICES} devices per mount")
            address = self._pick_address(spec, self._next_number)
            number = self._next_number
            self._next_number += 1
            self._devices[spec.name] = _placeholder
            self._addresses[address] = spec.name
        try:
            driver = cls(spec.name, spec.options)
            device = Device(
                spec.name, spec.driver, driver, number, host=self.host, pci_address=address
            )
        except ConfigError as exc:
            self._drop(spec.name)
            if str(exc).startswith(f"device {spec.name}"):
                raise
            raise ConfigError(_option_error(spec, str(exc))) from exc
        except FakeVfioError:
            self._drop(spec.name)
            raise
        except (ValueError, TypeError, OverflowError, MemoryError) as exc:
            self._drop(spec.name)
            raise ConfigError(
                _option_error(spec, f"driver {spec.driver} refused it: {exc}")
            ) from exc
        except BaseException:
            self._drop(spec.name)
            raise
        with self._lock:
            self._devices[spec.name] = device
        return device

    def _pick_address(self, spec: DeviceSpec, number: int) -> str:
        """The PCI address for ``spec`` (Rules 1 and 2); the caller holds the lock."""
        if spec.pci_address is not None:
            address = parse_pci_address(spec.pci_address)
            holder = self._addresses.get(address)
            if holder is not None:
                raise ConfigError(
                    f"device {spec.name}: PCI address {address} is already device {holder}'s "
                    "(each device of a mount needs its own; pick another address=)"
                )
            return address
        for step in range(_DEFAULT_ADDRESSES):
            address = _default_address((number + step) % _DEFAULT_ADDRESSES)
            if address not in self._addresses:
                return address
        raise ConfigError(f"device {spec.name}: no free PCI address")  # more than MAX_DEVICES

    def _drop(self, name: str) -> None:
        with self._lock:
            self._devices.pop(name, None)
            self._release_address(name)

    def _release_address(self, name: str) -> None:
        for address, holder in list(self._addresses.items()):
            if holder == name:
                del self._addresses[address]

    def remove(self, name: str) -> None:
        """Remove a device; EBUSY while a migration session is live."""
        device = self.get(name)
        if device is _placeholder:
            raise UnknownDevice(name)
        device.check_removable()
        with self._lock:
            self._devices.pop(name, None)
            self._release_address(name)
        device.close()

    def by_number(self, number: int) -> Device:
        for device in self._devices.values():
            if device is not _placeholder and device.number == number:
                return device
        raise UnknownDevice(f"vfio{number}")

    def live_devices(self) -> list[Device]:
        return [d for d in self._devices.values() if d is not _placeholder]


class _Placeholder(Device):
    """Reserves a name while a device is being created."""

    def __init__(self) -> None:
        pass


_placeholder = _Placeholder()

__all__ = ["DeviceError", "Registry"]
