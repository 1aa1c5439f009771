"""The source's switchover-ack accounting, as QEMU 10.x and QEMU 11.1 keep it.

Theory of operation
-------------------
With the switchover-ack capability the source may not stop the VM until the
destination acknowledged on the return path that the devices' initial data
arrived (MIG_RP_MSG_SWITCHOVER_ACK). Two mechanisms exist (recorded on the
wire, docs/qemu-versions.md):

``legacy`` (QEMU 10.x; QEMU 11.1 with ``switchover-ack-legacy=on``, its
machine types up to 11.0): one ACK for the whole migration. The destination
sends it when the last of its pre-copy devices sent INIT_DATA_SENT, or at
OPEN_RETURN_PATH when it has none; one ACK releases the source.

``new`` (QEMU 11.1's own machine types): every pre-copy device *requests* an
ACK (11.1's trace ``request switchover ack 1``): once when pre-copy starts and
once more after each VFIO_PRECOPY_INFO_REINIT that came after its INIT_DATA_SENT
went. The destination answers every INIT_DATA_SENT with one ACK. The source
switches over when every request was answered: with no pre-copy device at
once, and it sends nothing to wait for.

Rule 1: :attr:`SourceSwitchoverAck.can_switchover` is true iff no request is
        unanswered (legacy: until the one ACK came, nothing is answered).
Rule 2: new mode: an ACK with no request outstanding is a remote protocol
        error, QEMU 11.1's "Switchover ack pending num underflowed" (a legacy
        destination's ACK at OPEN_RETURN_PATH is one). Legacy: extra ACKs are
        harmless, as in QEMU 10.0, whose source only sets a flag.
"""

from __future__ import annotations

import attrs

from migrator.errors import LocalProtocolError, RemoteProtocolError


@attrs.define
class SourceSwitchoverAck:
    """How many of the devices' ACK requests the destination has not answered yet."""

    legacy: bool
    #: Unanswered requests (legacy: 1 until the one ACK came, as 11.1's legacy count).
    pending: int = attrs.field()
    #: Every request so far, by idstr, in order (for messages and tests).
    requests: list[str] = attrs.field(factory=list)

    @pending.default
    def _pending_at_start(self) -> int:
        return int(self.legacy)

    @property
    def can_switchover(self) -> bool:
        """Rule 1."""
        return self.pending == 0

    def request(self, idstr: str) -> None:
        """``idstr`` asks for an ACK (new mode only: legacy devices never ask)."""
        if self.legacy:
            raise LocalProtocolError(
                f"{idstr}: a switchover-ack request in legacy mode (QEMU 10.x devices never "
                "ask; use qemu_compat 11.1 for per-device requests)"
            )
        self.pending += 1
        self.requests.append(idstr)

    def acked(self) -> None:
        """A SWITCHOVER_ACK arrived (Rule 2)."""
        if self.legacy:
            self.pending = 0
            return
        if self.pending == 0:
            raise RemoteProtocolError(
                "Switchover ack pending num underflowed: a SWITCHOVER_ACK no device asked for "
                "(a QEMU 10.x-style destination acks at OPEN_RETURN_PATH; run both sides with "
                "the same --qemu-compat)"
            )
        self.pending -= 1
