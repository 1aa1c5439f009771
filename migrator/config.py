"""Migration settings, as one frozen value built by the CLI (or by tests)."""

from __future__ import annotations

import enum

import attrs

DEFAULT_MAX_QUEUED_BYTES = 64 << 20
#: QEMU's VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE.
DATA_BUFFER_BYTES = 1 << 20
MAX_MULTIFD_CHANNELS = 64
#: The machine type our CONFIGURATION section names unless told otherwise.
DEFAULT_MACHINE = "fakevfio"


class QemuCompat(enum.Enum):
    """Which QEMU's switchover-ack mechanism to follow (``--qemu-compat``).

    ``V10_0``: QEMU 10.x, and QEMU 11.1 on machine types up to 11.0 (its
    ``switchover-ack-legacy=on``): the destination counts its pre-copy devices,
    sends one SWITCHOVER_ACK when each sent INIT_DATA_SENT (at OPEN_RETURN_PATH
    when it has none), and the source waits for that one ACK.
    ``V11_1``: QEMU 11.1 on its own machine types (``switchover-ack-legacy=off``):
    every pre-copy device asks for an ACK, again after a VFIO_PRECOPY_INFO_REINIT
    once its INIT_DATA_SENT went, and sends INIT_DATA_SENT again; the destination
    answers each INIT_DATA_SENT with one SWITCHOVER_ACK and nothing else; the
    source switches over when every request was answered (none asked: at once).
    See docs/qemu-versions.md for the recorded bytes.
    """

    V10_0 = "10.0"
    V11_1 = "11.1"

    @property
    def switchover_ack_legacy(self) -> bool:
        """QEMU 11.1's ``switchover-ack-legacy`` migration property."""
        return self is QemuCompat.V10_0


class MultifdTransfer(enum.Enum):
    """``x-migration-multifd-transfer``: ON, OFF or AUTO."""

    ON = "on"
    OFF = "off"
    AUTO = "auto"


@attrs.frozen(kw_only=True)
class MigrationConfig:
    """Everything that shapes one migration (source or destination side).

    ``multifd_channels`` > 0 is QEMU's multifd capability; device state uses the
    channels when ``multifd_transfer`` resolves on (AUTO: when channels exist and
    the transport is a connection, not a file).
    """

    multifd_channels: int = attrs.field(
        default=2,
        validator=attrs.validators.and_(
            attrs.validators.ge(0), attrs.validators.le(MAX_MULTIFD_CHANNELS)
        ),
    )
    multifd_transfer: MultifdTransfer = MultifdTransfer.AUTO
    switchover_ack: bool = True
    #: The switchover-ack mechanism of which QEMU (both sides must agree).
    qemu_compat: QemuCompat = QemuCompat.V10_0
    downtime_limit_ms: int = attrs.field(default=300, validator=attrs.validators.ge(1))
    max_queued_bytes: int = attrs.field(
        default=DEFAULT_MAX_QUEUED_BYTES, validator=attrs.validators.ge(DATA_BUFFER_BYTES + 64)
    )
    #: Source send rate limit in bytes/s (QEMU's max-bandwidth); 0 = unlimited.
    max_bandwidth: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    #: Convergence bounds: switch over after this many iterations or seconds of
    #: pre-copy even if pending data exceeds bandwidth x downtime-limit.
    max_precopy_iterations: int = attrs.field(default=100_000, validator=attrs.validators.ge(1))
    precopy_time_limit_s: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    #: 16-byte migration UUID for the multifd handshake (all zero by default).
    uuid: bytes = attrs.field(default=bytes(16), validator=attrs.validators.instance_of(bytes))
    #: The machine type the source's CONFIGURATION section names (QEMU's destination
    #: insists on its own, e.g. ``pc-q35-11.1``; ours accepts any). Any other than
    #: ours: the stream ends as QEMU's does, with a VM description after EOF.
    machine: str = attrs.field(default=DEFAULT_MACHINE, validator=attrs.validators.min_len(1))
    #: Seconds a destination waits for missing multifd channels / a silent peer.
    peer_timeout_s: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))

    def multifd_for(self, *, is_file: bool) -> bool:
        """Resolve multifd device transfer; raise on ON-but-unsupported."""
        supported = self.multifd_channels > 0 and not is_file
        if self.multifd_transfer is MultifdTransfer.ON and not supported:
            from migrator.errors import ConfigurationError

            why = "a file transport" if is_file else "--multifd-channels 0"
            raise ConfigurationError(
                f"Multifd device transfer requested but unsupported in the current config ({why})",
                phase="setup",
            )
        return self.multifd_transfer is not MultifdTransfer.OFF and supported
