"""A netem stand-in: delay and drop the packets of an NFQUEUE queue (run inside a netns).

``python -m tests.reliability._nfqueue QUEUE DELAY_MS LOSS_PERCENT SEED`` binds
nfnetlink_queue queue QUEUE (``include/uapi/linux/netfilter/nfnetlink_queue.h``)
and gives every packet iptables sends there its verdict DELAY_MS later:
NF_DROP with probability LOSS_PERCENT (seeded), else NF_ACCEPT. It is what
``tc qdisc ... netem delay D loss L`` does, for kernels built without
``CONFIG_NET_SCH_NETEM`` (this machine's). Packets keep their order (a
FIFO of due times, all with the same delay). It prints ``ready`` once bound
and runs until killed. Only packet metadata is copied (NFQNL_COPY_META).
"""

from __future__ import annotations

import collections
import random
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian, packed by hand)


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg: int, queue: int, attrs: bytes, seq: int = 0) -> bytes:
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", queue) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def _packet_ids(data: bytes) -> list[int]:
    """The packet ids of the NFQNL_MSG_PACKET messages in one recv."""
    ids, off = [], 0
    while off + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, off)
        if length < _NLMSG.size:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            pos, end = off + _NLMSG.size + _NFGEN.size, off + length
            while pos + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from(">I", data, pos + 4)[0])
                pos += (alen + 3) & ~3
        off += (length + 3) & ~3
    return ids


def serve(queue: int, delay_s: float, loss: float, seed: int) -> None:
    rng = random.Random(seed)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, 0))
    bind = struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, 0)
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, bind)))
    params = struct.pack(">IB", 0, NFQNL_COPY_META)
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_PARAMS, params)))
    print("ready", flush=True)
    due: collections.deque[tuple[float, int, int]] = collections.deque()
    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
        readable, _, _ = select.select([sock], [], [], timeout)
        if readable:
            data = sock.recv(1 << 16)
            now = time.monotonic()
            for pid in _packet_ids(data):
                verdict = NF_DROP if rng.random() < loss else NF_ACCEPT
                due.append((now + delay_s, pid, verdict))
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, pid, verdict = due.popleft()
            hdr = struct.pack(">II", verdict, pid)
            sock.send(_message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, hdr)))


if __name__ == "__main__":
    q, delay_ms, loss_pct, seed = sys.argv[1:5]
    serve(int(q), float(delay_ms) / 1000, float(loss_pct) / 100, int(seed))
