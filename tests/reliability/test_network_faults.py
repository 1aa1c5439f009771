"""Network faults between two hosts: migrations across network namespaces (issue 18, item 3).

Each test makes its own two "hosts": network namespaces joined by a veth pair
(10.231.X.1 and .2), with the migrator's ``incoming`` in one and ``migrate``
in the other (``ip netns exec``); the fakevfio mounts stay in the root
namespace (a network namespace does not change what paths a process sees).
Traffic stays on that veth. This kernel has no ``sch_netem``
(``CONFIG_NET_SCH_NETEM`` is off), so delay and loss come from an NFQUEUE
verdict delayer (``tests/reliability/_nfqueue.py``) on each host's INPUT: it
holds every arriving packet 20 ms and drops 1% (seeded), as ``tc qdisc ...
netem delay 20ms loss 1%`` on each end would. Link cuts are ``ip link set
... down`` on the source's end, or an iptables DROP of one multifd
channel's source port.

Rules checked:

1. With 20 ms delay and 1% loss each way a multifd migration completes with
   equal digests.
2. A cut link, in pre-copy or in stop-copy, or one cut multifd channel, ends
   both migrators within ``--peer-timeout`` (plus start-up slack) with one
   clear ``migrator: error:`` line each, and the source's devices are
   RUNNING with their ``state_digest`` from before.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from benchmarks.soak import Proc
from fakevfio.testing import Mount
from tests.conftest import MountFactory

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

PEER_TIMEOUT_S = 2
#: Each side must be done this long after the cut: the peer timeout, plus the
#: time a migrator needs to notice and restore its devices.
SLACK_S = 6.0
PORT = 4791


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install iproute2 iptables)"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@attrs.define
class Hosts:
    src_ns: str
    dst_ns: str
    src_if: str
    dst_if: str
    dst_ip: str
    delayers: list[subprocess.Popen[bytes]] = attrs.Factory(list)

    def migrator(self, ns: str, *args: str) -> Proc:
        return Proc(["ip", "netns", "exec", ns, sys.executable, "-m", "migrator", *args])

    def impair(self, ns: str, dev: str, queue: int, delay_ms: int, loss_pct: float) -> None:
        """Delay and drop what arrives on ``dev`` in ``ns`` (the netem stand-in)."""
        _run("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-i", dev, "-j", "NFQUEUE",
             "--queue-num", str(queue))  # fmt: skip
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.reliability._nfqueue",
             str(queue), str(delay_ms), str(loss_pct), "18"],
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )  # fmt: skip
        self.delayers.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"

    def cut_link(self) -> None:
        _run("ip", "-n", self.src_ns, "link", "set", self.src_if, "down")

    def cut_port(self, sport: int) -> None:
        for chain, match in (("OUTPUT", "--sport"), ("INPUT", "--dport")):
            _run("ip", "netns", "exec", self.src_ns, "iptables", "-A", chain, "-p", "tcp",
                 match, str(sport), "-j", "DROP")  # fmt: skip

    def channels(self) -> list[tuple[int, int]]:
        """The source's connections to the destination: (local port, bytes acked)."""
        out = subprocess.run(
            ["ip", "netns", "exec", self.src_ns, "ss", "-tniH", "state", "established"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        result, port = [], 0
        for line in out.splitlines():
            words = line.split()
            if len(words) >= 4 and words[3].endswith(f":{PORT}"):
                port = int(words[2].rsplit(":", 1)[1])
            elif port:
                acked = [w for w in words if w.startswith("bytes_acked:")]
                result.append((port, int(acked[0].split(":")[1]) if acked else 0))
                port = 0
        return result


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    tag = f"fv{os.getpid() % 100000}"
    net = os.getpid() % 250 + 1
    h = Hosts(f"{tag}s", f"{tag}d", f"{tag}a", f"{tag}b", f"10.231.{net}.2")
    try:
        _run("ip", "netns", "add", h.src_ns)
        _run("ip", "netns", "add", h.dst_ns)
        _run("ip", "link", "add", h.src_if, "netns", h.src_ns, "type", "veth",
             "peer", "name", h.dst_if, "netns", h.dst_ns)  # fmt: skip
        _run("ip", "-n", h.src_ns, "addr", "add", f"10.231.{net}.1/30", "dev", h.src_if)
        _run("ip", "-n", h.dst_ns, "addr", "add", f"{h.dst_ip}/30", "dev", h.dst_if)
        for ns, dev in ((h.src_ns, h.src_if), (h.dst_ns, h.dst_if)):
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        yield h
    finally:
        for proc in h.delayers:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for ns in (h.src_ns, h.dst_ns):  # deleting a namespace deletes its veth end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture(scope="module")
def mounts(fakevfio_mount_module: MountFactory) -> Iterator[tuple[Mount, Mount]]:
    """A source and a destination mount, shared by the module (each test adds its devices)."""
    with fakevfio_mount_module([]) as src, fakevfio_mount_module([]) as dst:
        yield src.mount, dst.mount


def _start(
    hosts: Hosts, src: Mount, dst: Mount, names: list[str], channels: int
) -> tuple[Proc, Proc]:
    common = ["--peer-timeout", str(PEER_TIMEOUT_S)]
    if channels:
        common += ["--multifd-transfer", "on", "--multifd-channels", str(channels)]
    dest = hosts.migrator(
        hosts.dst_ns, "incoming", "--listen", f"tcp:{hosts.dst_ip}:{PORT}", *common,
        *(str(dst.device(n)) for n in names),
    )  # fmt: skip
    assert dest.listening.wait(20), dest.lines
    source = hosts.migrator(
        hosts.src_ns, "migrate", "--to", f"tcp:{hosts.dst_ip}:{PORT}", *common,
        *(str(src.device(n)) for n in names),
    )  # fmt: skip
    return source, dest


def _wait_for(what: str, predicate: Callable[[], bool], timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_delay_and_loss_complete_with_equal_digests(
    hosts: Hosts, mounts: tuple[Mount, Mount]
) -> None:
    src, dst = mounts
    sizes = {"d0": ("256K", "STOP_COPY+PRE_COPY"), "d1": ("128K", "STOP_COPY")}
    for name, (size, flags) in sizes.items():
        src.create(name, "ram", size=size, flags=flags, seed=11)
        dst.create(name, "ram", size=size, flags=flags)
    hosts.impair(hosts.dst_ns, hosts.dst_if, 0, 20, 1)
    hosts.impair(hosts.src_ns, hosts.src_if, 1, 20, 1)
    before = {n: src.digest(n) for n in sizes}
    source, dest = _start(hosts, src, dst, list(sizes), channels=2)
    deadline = time.monotonic() + 60
    assert source.wait(deadline) == 0, source.lines
    assert dest.wait(deadline) == 0, dest.lines
    assert {n: dst.digest(n) for n in sizes} == before


@pytest.mark.parametrize(
    ("case", "flags", "channels"),
    [
        pytest.param("pre-copy", "STOP_COPY+PRE_COPY", 0),
        pytest.param("stop-copy", "STOP_COPY", 2),
        pytest.param("one multifd channel", "STOP_COPY", 3),
    ],
)
def test_a_cut_ends_both_sides_within_the_peer_timeout(
    hosts: Hosts, mounts: tuple[Mount, Mount], case: str, flags: str, channels: int
) -> None:
    src, dst = mounts
    name = "c" + str(channels)
    src.create(name, "ram", size="4M", flags=flags, seed=21)
    dst.create(name, "ram", size="4M", flags=flags)
    # slow reads (1 MiB each) keep the migration in the phase long enough to cut it there
    src.set_faults(name, "delay read 600")
    before = src.digest(name)
    source, dest = _start(hosts, src, dst, [name], channels)
    phase = "PRE_COPY" if case == "pre-copy" else "STOP_COPY"
    _wait_for(f"the source in {phase}", lambda: src.state(name) == phase)
    if case == "one multifd channel":
        _wait_for("3 multifd channels and the main one", lambda: len(hosts.channels()) == 4)
        time.sleep(0.5)  # let device data flow on the channels
        busiest = max(hosts.channels(), key=lambda c: c[1])
        hosts.cut_port(busiest[0])
    else:
        time.sleep(0.3)
        hosts.cut_link()
    cut = time.monotonic()
    src_code = source.wait(cut + PEER_TIMEOUT_S + SLACK_S)
    dst_code = dest.wait(cut + PEER_TIMEOUT_S + SLACK_S)
    took = time.monotonic() - cut
    outcome = (
        f"{case}: source {src_code} {source.lines[-1:]}, "
        f"destination {dst_code} {dest.lines[-1:]}, {took:.1f} s after the cut"
    )
    src.clear_faults(name)
    assert src_code is not None, f"the source hung; {outcome}"
    assert dst_code is not None, f"the destination hung; {outcome}"
    assert src_code != 0, outcome
    assert dst_code != 0, outcome
    for side in (source, dest):
        errors = [line for line in side.lines if line.startswith("migrator: error:")]
        assert len(errors) == 1, side.lines
    assert "--peer-timeout" in dest.lines[-1], outcome  # the destination says why
    # The source's message depends on who notices first: its own TCP_USER_TIMEOUT
    # ("the destination stopped acknowledging ..."), or the destination's watchdog
    # closing the connection once the link is back ("refused or failed ...").
    assert src.state(name) == "RUNNING", outcome
    assert src.digest(name) == before, outcome
