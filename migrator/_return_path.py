"""The source side's reader of the return path.

:class:`ReturnPath` reads the destination's messages off the main connection
through the main-channel :class:`migrator._protocol.main.SourceProtocol`: a
SWITCHOVER_ACK answers a request in :attr:`ReturnPath.ack` (the pure
:class:`migrator._protocol.switchover_ack.SourceSwitchoverAck`, QEMU 10.x's or
11.1's accounting) and :attr:`ReturnPath.acked` is set while no request is
unanswered (a new request replaces it with an unset event); SHUT records the destination's
status and ends the reader (a non-zero status fails the migration at once). A
broken or closed connection is remembered and raised by :meth:`ReturnPath.check`,
which :class:`migrator.source.Source` calls between pre-copy iterations and when
it waits for the final SHUT.
"""

from __future__ import annotations

import attrs
import trio

from migrator._protocol import events as ev
from migrator._protocol.main import SourceProtocol
from migrator._protocol.switchover_ack import SourceSwitchoverAck
from migrator.errors import ChannelBrokenError, FramingError, MigrationError, RemoteProtocolError


@attrs.define(eq=False)
class ReturnPath:
    """What the destination said on the return path so far."""

    main: trio.abc.Stream
    proto: SourceProtocol
    ack: SourceSwitchoverAck = attrs.field(factory=lambda: SourceSwitchoverAck(legacy=True))
    acked: trio.Event = attrs.field(factory=trio.Event)
    shut: int | None = None
    shut_event: trio.Event = attrs.field(factory=trio.Event)
    error: MigrationError | None = None

    async def read(self) -> None:
        proto = self.proto
        try:
            while True:
                try:
                    data = await self.main.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise ChannelBrokenError(f"return path broke: {exc}") from exc
                proto.receive_data(data)
                while True:
                    try:
                        event = proto.next_event()
                    except RemoteProtocolError as exc:
                        if data or isinstance(exc, FramingError):
                            raise
                        # A clean close before SHUT: the peer went away.
                        raise ChannelBrokenError(exc.message) from None
                    if event is ev.NEED_DATA:
                        break
                    if isinstance(event, ev.SwitchoverAck):
                        self.ack.acked()
                        if self.ack.can_switchover:
                            self.acked.set()
                    elif isinstance(event, ev.Shut):
                        self.shut = event.status
                        if self.shut != 0:
                            # The destination failed: stop at once with its verdict
                            # rather than with whatever our next send runs into. The
                            # event stays unset: a waiter woken by it would raise the
                            # same verdict a second time beside this one.
                            raise RemoteProtocolError(
                                f"the destination failed to load the state (status {self.shut})",
                                phase="load",
                            )
                        self.shut_event.set()
                        return
                if not data:
                    raise ChannelBrokenError(
                        "the destination closed the connection before reporting a result"
                    )
        except ChannelBrokenError as exc:
            self.error = exc
            self.shut_event.set()

    def request_ack(self, idstr: str) -> None:
        """``idstr`` asks for a SWITCHOVER_ACK (QEMU 11.1): the switchover waits for it."""
        self.ack.request(idstr)
        if self.acked.is_set():
            self.acked = trio.Event()

    def ack_not_needed(self) -> None:
        """No ACK to wait for: no return path, switchover-ack off, or nobody asked."""
        self.acked.set()

    async def wait_shut(self, phase: str) -> None:
        # No deadline here: the destination may still be loading a large state;
        # its death closes the connection, which ends the wait.
        await self.shut_event.wait()
        self.check(phase)

    def check(self, phase: str) -> None:
        """Raise if the return path failed or the destination reported a result early."""
        if not self.shut_event.is_set():
            return
        if self.error is not None:
            raise self.error.with_context(phase="complete")
        if self.shut != 0 or phase != "complete":
            raise RemoteProtocolError(
                f"the destination failed to load the state (status {self.shut})", phase="load"
            )
