"""The arc-level driver API and the stream types (see :mod:`fakevfio.driver`)."""

from __future__ import annotations

import abc
import errno
from collections.abc import Mapping
from typing import ClassVar

import attrs

from fakevfio._options import parse_size
from fakevfio.errors import ConfigError, DeviceError
from vfio_uapi.fsm import MigFlags, State

PCI_CONFIG_SIZES = (256, 4096)


@attrs.frozen(kw_only=True)
class OptionSpec:
    """One driver option, as listed by ``fakevfio drivers``.

    ``kind`` is ``size`` (K/M/G suffixes), ``int``, ``flags`` or ``str``.
    """

    kind: str
    default: str | None
    help: str


@attrs.frozen(kw_only=True)
class PrecopyInfo:
    """``struct vfio_precopy_info`` output."""

    initial_bytes: int
    dirty_bytes: int


class SaveStream(abc.ABC):
    """The saving side of one migration session (arc-level drivers)."""

    @abc.abstractmethod
    def read(self, size: int, state: State) -> bytes | bytearray | memoryview:
        """Return up to ``size`` bytes of the stream.

        In STOP_COPY an empty result means the end of the stream. In PRE_COPY*
        raise ``DeviceError(ENOMSG)`` at the temporary end.
        """

    @abc.abstractmethod
    def precopy_info(self) -> PrecopyInfo:
        """Current pre-copy estimates (only called in PRE_COPY*)."""

    @abc.abstractmethod
    def remaining(self) -> int:
        """Estimated bytes still to come if the device stopped now."""


class LoadStream(abc.ABC):
    """The resuming side of one migration session (arc-level drivers)."""

    @abc.abstractmethod
    def write(self, data: memoryview) -> None:
        """Accept the next bytes of the stream (any segmentation).

        Raise ``DeviceError`` on bad data; the core then kills the session.
        """


class ArcDriver(abc.ABC):
    """Full-control driver interface.

    Subclasses set the class attributes, accept their options in ``__init__``
    (parse with the helpers below) and implement the abstract methods.
    """

    #: One line shown by ``fakevfio drivers``.
    description: ClassVar[str] = ""
    #: Options the driver accepts, listed by ``fakevfio drivers``.
    options: ClassVar[Mapping[str, OptionSpec]] = {}

    def __init__(self, name: str, options: Mapping[str, str]) -> None:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            allowed = ", ".join(sorted(self.options)) or "none"
            raise ConfigError(
                f"device {name}: unknown option(s) {', '.join(unknown)} (allowed: {allowed})"
            )
        self.name = name
        self._raw_options = dict(options)

    # -- option helpers -------------------------------------------------
    def option(self, key: str) -> str | None:
        """The option's value, or its declared default."""
        if key in self._raw_options:
            return self._raw_options[key]
        return self.options[key].default

    def size_option(self, key: str) -> int | None:
        value = self.option(key)
        return None if value is None else parse_size(value, what=f"{key} option")

    def int_option(self, key: str) -> int | None:
        value = self.option(key)
        if value is None:
            return None
        try:
            return int(value, 0)
        except ValueError:
            raise ConfigError(
                f"device {self.name}: option {key}={value!r} is not an integer"
            ) from None

    # -- description ----------------------------------------------------
    @property
    @abc.abstractmethod
    def migration_flags(self) -> MigFlags:
        """One of the four defined flag words."""

    config_size: int = 256
    #: Dirty pages are counted in units of this size (bytes).
    page_size: int = 4096
    #: Emulated device speed on the data stream, bytes per second (None: unlimited).
    read_bandwidth: int | None = None
    write_bandwidth: int | None = None

    def initial_config(self) -> bytes:
        """The PCI config space at creation (``config_size`` bytes)."""
        cfg = bytearray(self.config_size)
        cfg[0:2] = (0x1AF4).to_bytes(2, "little")  # vendor: Red Hat / virtio range
        cfg[2:4] = (0x10F0).to_bytes(2, "little")
        cfg[0x0E] = 0  # header type 0
        return bytes(cfg)

    def regions(self) -> Mapping[str, int]:
        """Region name -> size in bytes."""
        return {}

    def region_read(self, region: str, offset: int, size: int) -> bytes | memoryview:
        raise DeviceError(errno.EINVAL, f"region {region} is not readable", device=self.name)

    def region_write(self, region: str, offset: int, data: memoryview) -> None:
        raise DeviceError(errno.EINVAL, f"region {region} is not writable", device=self.name)

    # -- migration ------------------------------------------------------
    @abc.abstractmethod
    def step(
        self, current: State, nxt: State, stream: SaveStream | LoadStream | None
    ) -> SaveStream | LoadStream | None:
        """Execute one arc. Return a new stream exactly on the four new-session arcs.

        ``stream`` is the live session's stream (None without a session). On
        RESUMING -> STOP validate it and raise DeviceError if it is incomplete.
        """

    @abc.abstractmethod
    def data_size(self, stream: SaveStream | LoadStream | None) -> int:
        """``VFIO_DEVICE_FEATURE_MIG_DATA_SIZE``: bytes still to come in STOP_COPY."""

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET`` hook; the core already moved the state to RUNNING."""

    @abc.abstractmethod
    def digest(self) -> str:
        """Hex SHA-256 over the complete migratable internal state."""

    def advance(self, seconds: float) -> None:
        """Run the device's workload for ``seconds`` (only called while running)."""

    def session_ended(self) -> None:
        """The live migration session ended (any reason: arc, reset, ERROR, removal)."""

    def has_workload(self) -> bool:
        """Whether :meth:`advance` does anything (saves needless ticks)."""
        return False

    def info(self) -> Mapping[str, object]:
        """Driver-specific extra fields for the ``info`` file."""
        return {}

    def close(self) -> None:
        """The device is being removed."""
