"""The set of devices one mount serves: creation, numbering and removal."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from fakevfio._device import Device
from fakevfio._host import HostServices
from fakevfio._options import DeviceSpec
from fakevfio.driver import ArcDriver
from fakevfio.errors import ConfigError, DeviceError, FakeVfioError, UnknownDevice

MAX_DEVICES = 1024


class Registry:
    """Devices by name, created through the loaded drivers."""

    def __init__(
        self, drivers: Mapping[str, type[ArcDriver]], *, host: HostServices | None = None
    ) -> None:
        self.drivers = dict(drivers)
        #: The OS services each device gets for DMA and eventfds (None: neither works).
        self.host = host
        self._devices: dict[str, Device] = {}
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
            ConfigError: unknown driver, duplicate name, bad options.
        """
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
            number = self._next_number
            self._next_number += 1
            self._devices[spec.name] = _placeholder
        try:
            driver = cls(spec.name, spec.options)
            device = Device(spec.name, spec.driver, driver, number, host=self.host)
        except FakeVfioError:
            self._drop(spec.name)
            raise
        except (ValueError, TypeError, OverflowError, MemoryError) as exc:
            self._drop(spec.name)
            raise ConfigError(
                f"device {spec.name}: driver {spec.driver} refused it: {exc}"
            ) from exc
        except BaseException:
            self._drop(spec.name)
            raise
        with self._lock:
            self._devices[spec.name] = device
        return device

    def _drop(self, name: str) -> None:
        with self._lock:
            self._devices.pop(name, None)

    def remove(self, name: str) -> None:
        """Remove a device; EBUSY while a migration session is live."""
        device = self.get(name)
        if device is _placeholder:
            raise UnknownDevice(name)
        device.check_removable()
        with self._lock:
            self._devices.pop(name, None)
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
