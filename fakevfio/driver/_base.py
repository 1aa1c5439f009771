"""The arc-level driver API and the stream types (see :mod:`fakevfio.driver`)."""

from __future__ import annotations

import abc
import enum
import errno
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import attrs

from fakevfio._options import parse_size
from fakevfio.errors import ConfigError, DeviceError
from vfio_uapi.fsm import MigFlags, State

if TYPE_CHECKING:
    from fakevfio._device import DriverHost

PCI_CONFIG_SIZES = (256, 4096)

#: ``VFIO_PCI_*_IRQ_INDEX``: the interrupt indexes a driver raises.
IRQ_INTX = 0
IRQ_MSI = 1
IRQ_MSIX = 2


class BarKind(enum.Enum):
    """What a BAR decodes: I/O ports, or memory below 4 GiB or anywhere (64-bit)."""

    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@attrs.frozen(kw_only=True)
class Bar:
    """One BAR as the device's config space declares it.

    ``size`` is what a sizing probe finds: a power of two, at least 4 KiB for a
    memory BAR and at least 4 bytes for an I/O BAR. The driver's region of the
    same index (``regions()["barN"]``) is the backing; accesses past it read
    as zeros and ignore writes, as on hardware.
    """

    size: int
    kind: BarKind = BarKind.MEM32
    prefetchable: bool = False


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
    """``struct vfio_precopy_info`` output.

    ``reinit`` is ``VFIO_PRECOPY_INFO_REINIT`` (Linux 7.1): new initial data is
    on the stream, initial_bytes started again from a new value and
    dirty_bytes from 0. A stream may set it only in answer to
    :meth:`SaveStream.precopy_info_v2`, the query of a caller that opted in
    with ``VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2``.
    """

    initial_bytes: int
    dirty_bytes: int
    reinit: bool = False


class SaveStream(abc.ABC):
    """The saving side of one migration session (arc-level drivers)."""

    #: True if a memoryview that :meth:`read` returns stays valid and unchanged
    #: until the reply has left (the core then replies from it without a copy);
    #: False (the default): the core copies every view it gets.
    stable_views: ClassVar[bool] = False

    @abc.abstractmethod
    def read(self, size: int, state: State) -> bytes | bytearray | memoryview:
        """Return up to ``size`` bytes of the stream.

        In STOP_COPY an empty result means the end of the stream. In PRE_COPY*
        raise ``DeviceError(ENOMSG)`` at the temporary end.
        """

    @abc.abstractmethod
    def precopy_info(self) -> PrecopyInfo:
        """Current pre-copy estimates (only called in PRE_COPY*); ``reinit`` stays False.

        initial_bytes never grows here: a v1 caller cannot be told of new initial data.
        """

    def precopy_info_v2(self) -> PrecopyInfo:
        """The estimates for a caller that opted in to PRECOPY_INFOv2 (only in PRE_COPY*).

        The one place a stream may start its initial data again (and say so
        with ``reinit``). Default: :meth:`precopy_info`.
        """
        return self.precopy_info()

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
    #: StateDriver streams: after this many bytes read, the first PRECOPY_INFOv2
    #: query of the session starts the initial data again (REINIT); None: never.
    reinit_after: int | None = None
    #: Emulated device speed on the data stream, bytes per second (None: unlimited).
    read_bandwidth: int | None = None
    write_bandwidth: int | None = None

    # -- PCI surface: what config space and VFIO_DEVICE_GET_IRQ_INFO declare --
    #: Interrupt pin: 0 none, 1..4 INTA..INTD (INTx count 1 when set).
    interrupt_pin: int = 0
    #: MSI vectors (0: no MSI capability; else a power of two, 1..32).
    msi_vectors: int = 0
    #: MSI-X vectors (0: no MSI-X capability; else 1..2048).
    msix_vectors: int = 0
    #: A PCI Express device (a PCIe capability; the ERR IRQ index exists). Needs
    #: ``config_size = 4096``.
    pcie: bool = False
    #: The BAR index of the core's MSI-X BAR (table at 0, PBA at the next 4 KiB
    #: boundary); None: the highest index no BAR of ``bars()`` uses.
    msix_bar: int | None = None

    def initial_config(self) -> bytes:
        """The PCI config space at creation (``config_size`` bytes)."""
        cfg = bytearray(self.config_size)
        cfg[0:2] = (0x1AF4).to_bytes(2, "little")  # vendor: Red Hat / virtio range
        cfg[2:4] = (0x10F0).to_bytes(2, "little")
        cfg[0x0E] = 0  # header type 0
        return bytes(cfg)

    def regions(self) -> Mapping[str, int]:
        """Region name -> size in bytes (``barN``: the backing of BAR N)."""
        return {}

    def bars(self) -> Mapping[int, Bar]:
        """BAR index -> :class:`Bar` (the MSI-X BAR is added by the core).

        Default: one memory BAR per ``barN`` region, of the smallest power of
        two >= 4 KiB that covers the region: 32-bit up to 2 GiB, else 64-bit
        prefetchable. Override it for I/O BARs, 64-bit or prefetchable BARs, or
        a BAR larger than its backing.
        """
        out: dict[int, Bar] = {}
        for region, size in self.regions().items():
            if region.startswith("bar") and region[3:].isdigit() and int(region[3:]) < 6:
                bar_size = max(4096, 1 << max(0, size - 1).bit_length())
                if bar_size > 1 << 31:
                    out[int(region[3:])] = Bar(size=bar_size, kind=BarKind.MEM64, prefetchable=True)
                else:
                    out[int(region[3:])] = Bar(size=bar_size)
        return out

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

    def advance_dma(self, seconds: float) -> None:
        """The DMA part of the workload in RUNNING_P2P and PRE_COPY_P2P (default: none)."""

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

    # -- what a driver does to the VM (the core installs the host) ------
    _host: DriverHost | None = None

    def _require_host(self) -> DriverHost:
        if self._host is None:
            raise DeviceError(
                errno.ENODEV,
                "the driver is not attached to a device (create it through a Registry)",
                device=self.name,
            )
        return self._host

    def raise_irq(self, index: int, vector: int = 0) -> None:
        """Raise interrupt ``vector`` of ``index`` (IRQ_INTX, IRQ_MSI, IRQ_MSIX).

        For INTx this is an edge: the core signals the VMM's trigger unless the
        line is masked, and masks it (automask) until the VMM unmasks it.
        """
        self._require_host().raise_irq(index, vector)

    def irq_enabled(self, index: int) -> bool:
        """Whether the VMM enabled interrupt ``index`` with SET_IRQS (only one index is
        active at a time, as in vfio-pci: INTx, MSI or MSI-X)."""
        return self._require_host().irq_enabled(index)

    def set_intx(self, asserted: bool) -> None:
        """Drive the INTx line as a level: asserted lines signal again on each unmask."""
        self._require_host().set_intx(asserted)

    def dma_read(self, iova: int, length: int) -> bytes:
        """Read ``length`` bytes of the VMM's memory at ``iova`` (EFAULT if unmapped)."""
        return self._require_host().dma_read(iova, length)

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` into the VMM's memory at ``iova`` (DeviceError EFAULT if unmapped
        or read-only); every tracker that is on marks the pages dirty."""
        self._require_host().dma_write(iova, data)
