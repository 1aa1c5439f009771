"""Exceptions of the fakevfio package.

Every failure a device can report carries the errno the kernel would return for
it, so the FUSE adapter and the ioctl supervisor translate errors with one
lookup and never guess.
"""

from __future__ import annotations

import errno as _errno
import os


class FakeVfioError(Exception):
    """Root of every error raised by fakevfio."""


class DeviceError(FakeVfioError):
    """An operation on an emulated device failed with a kernel errno.

    Attributes:
        errno: the errno the kernel uAPI returns for this failure.
        device: name of the device, when known.
    """

    def __init__(
        self, err: int, message: str, *, device: str = "", enter_error: bool = False
    ) -> None:
        self.errno = err
        self.device = device
        #: A driver sets this when it cannot reach any valid state: the core
        #: then moves the device to ERROR (only a reset leaves it).
        self.enter_error = enter_error
        self.detail = message
        where = f"device {device}: " if device else ""
        super().__init__(f"{where}{message} ({errno_name(err)})")


class IllegalTransition(DeviceError):
    """A requested migration state cannot be reached from the current one.

    The device's form of :class:`vfio_uapi.IllegalTransition` (which the pure
    FSM raises): the same refusal, with the device's name and errno EINVAL.
    """

    def __init__(self, current: str, requested: str, reason: str, *, device: str = "") -> None:
        self.current = current
        self.requested = requested
        super().__init__(
            _errno.EINVAL,
            f"cannot move from {current} to {requested}: {reason}",
            device=device,
        )


class SessionGone(DeviceError):
    """The migration session a handle was bound to has ended."""

    def __init__(self, *, device: str = "") -> None:
        super().__init__(_errno.ENODEV, "the migration session has ended", device=device)


class IoctlError(FakeVfioError):
    """An ioctl that ``fakevfio run`` answers fails with the errno the kernel returns.

    Raised by the supervisor's VFIO and iommufd handlers (and by the caller-memory
    accessors, EFAULT); the notification loop answers the caller's ioctl with it.

    Attributes:
        errno: the errno the caller's ioctl returns.
        detail: what was attempted or which check failed (``"argsz < 16"``).
    """

    def __init__(self, err: int, detail: str = "") -> None:
        self.errno = err
        self.detail = detail
        what = f"{detail} " if detail else ""
        super().__init__(f"ioctl: {what}({errno_name(err)})")


class ConfigError(FakeVfioError):
    """A device description, option or rule is malformed."""


class DriverLoadError(FakeVfioError):
    """A driver plugin could not be loaded or is not a valid driver."""

    def __init__(self, name: str, value: str, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(
            f"driver plugin {name!r} (entry point {value!r} in group fakevfio.drivers): {reason}"
        )


class UnknownDevice(FakeVfioError):
    """No device of that name exists."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no device named {name!r}")


def errno_name(err: int) -> str:
    """Return the symbolic name of an errno (``EINVAL``), or its number."""
    if err == _errno.EOPNOTSUPP:
        return "EOPNOTSUPP"  # same number as ENOTSUP on Linux; the uAPI docs say EOPNOTSUPP
    return _errno.errorcode.get(err, str(err))


def errno_from_name(name: str) -> int:
    """Parse an errno name such as ``EIO`` (as in the :mod:`errno` module).

    Raises:
        ConfigError: the name is not an errno name.
    """
    value = getattr(_errno, name, None)
    if not name.startswith("E") or not isinstance(value, int):
        raise ConfigError(f"unknown errno name {name!r} (expected a name like EIO or ENOSPC)")
    return value


def strerror(err: int) -> str:
    """Human text for an errno."""
    return os.strerror(err)
