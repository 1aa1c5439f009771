"""The source side's multifd stop-copy: save tasks fanned out over the channels.

:class:`MultifdSend` runs QEMU's save_complete_precopy_thread once per multifd
device (STOP_COPY, then chunks read into VFIO device-state packets with
consecutive idx, then the config packet) and queues each packet on a bounded
memory channel that whichever multifd channel is idle sends. Packet buffers
are page-aligned and reused once sent. :class:`migrator.source.Source` calls
:meth:`MultifdSend.run` in its ``stop-copy`` phase and sends the main
channel's sections meanwhile.
"""

from __future__ import annotations

import mmap
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from migrator._protocol.multifd import PacketLayout, PacketPlanner
from migrator._source_device import Dev, aligned, filled, read_buffers, set_state
from migrator.errors import ChannelBrokenError
from migrator.stats import Stats
from migrator.transport import call
from vfio_uapi.fsm import State

_PAGE = mmap.PAGESIZE
#: A multifd packet queued for a channel, and the reusable buffer it lives in.
_Packet = tuple[memoryview, memoryview | None]


@attrs.define(eq=False)
class MultifdSend:
    """The multifd channels of one outgoing migration and their packet buffers."""

    channels: Sequence[trio.abc.Stream]
    stats: Stats
    #: Packet buffers the channel senders are done with (page faults on a
    #: fresh 1 MiB buffer per packet cost more than the copy we avoid).
    _buffers: list[memoryview] = attrs.field(factory=list)

    async def run(self, devs: Sequence[Dev], main_channel: Callable[[], Awaitable[None]]) -> None:
        """Save ``devs`` over the channels while ``main_channel()`` sends the sections."""
        send_ch, recv_ch = trio.open_memory_channel[_Packet](max(2, len(self.channels) * 2))
        async with trio.open_nursery() as nursery:
            for stream in self.channels:
                nursery.start_soon(self._channel_sender, stream, recv_ch.clone())
            recv_ch.close()
            async with send_ch, trio.open_nursery() as savers:
                for dev in devs:
                    savers.start_soon(self._save_thread, dev, send_ch.clone())
                await main_channel()

    async def _channel_sender(
        self, stream: trio.abc.Stream, packets: trio.MemoryReceiveChannel[_Packet]
    ) -> None:
        async with packets:
            async for packet, buffer in packets:
                try:
                    await stream.send_all(packet)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise ChannelBrokenError(
                        f"multifd channel broke while sending: {exc}", phase="stop-copy"
                    ) from exc
                self.stats.transferred_bytes += len(packet)
                if buffer is not None:
                    self._buffers.append(buffer)  # sent: reuse it for a later packet

    async def _save_thread(self, dev: Dev, out: trio.MemorySendChannel[_Packet]) -> None:
        """QEMU's save_complete_precopy_thread for one device."""
        async with out:
            await set_state("stop-copy", dev, State.STOP_COPY, recover=State.STOP)
            # The headers go just before a page boundary, so the data read lands
            # page-aligned (see migrator._source_device.aligned).
            plan = PacketPlanner(dev.idstr, PacketLayout(data_offset=_PAGE, buf_size=dev.buf_size))
            layout = plan.layout
            counters = self.stats.device(dev.idstr)
            per_read = read_buffers(dev)
            while True:
                # Several packets' data areas in one readv (one worker-thread
                # hop); each packet still holds what one QEMU read would.
                views = [self._packet_buffer(layout.buffer_bytes) for _ in range(per_read)]
                datas = [view[layout.data_offset :] for view in views]
                n = int(await call("stop-copy", dev, dev.backend.read_data_many, datas))
                blocks = filled(datas, n)
                self._buffers.extend(views[len(blocks) :])  # not needed this time
                for view, block in zip(views, blocks, strict=False):
                    size = len(block)
                    view[layout.head : layout.data_offset] = plan.data_headers(size)
                    await out.send((view[layout.frame(size)], view))
                    counters.stopcopy_bytes += size
                if n == 0:
                    break
            # QEMU's vmstate_vfio_pci_config blob, counted as it travels (as the
            # destination counts it once decoded).
            blob = bytes(await call("config", dev, dev.backend.save_config))
            counters.config_bytes += len(blob)
            await out.send((memoryview(plan.config_packet_blob(blob)), None))

    def _packet_buffer(self, size: int) -> memoryview:
        while self._buffers:
            buf = self._buffers.pop()
            if len(buf) >= size:
                return buf[:size]
        return aligned(size)
