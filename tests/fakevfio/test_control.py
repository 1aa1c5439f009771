"""The control channel: its answers are the state file's, and its socket's rules hold.

The oracle of the protocol is the mount's own ``migration/state`` file, whose
transitions and errnos are checked against the kernel's FSM tables elsewhere
(tests/vfio_uapi, tests/fakevfio/test_device.py): the same requests go to one
tree's file and to another tree's channel, and every outcome (state, errno,
``last_error``, the arc delay) must be the same.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakevfio import _channel
from fakevfio._channel import ADDRESS_XATTR, ControlServer, connect, connect_mount
from fakevfio._control import MAX_MESSAGE, answer, get_request, parse_answer, set_request
from fakevfio._faults import FaultRules
from fakevfio._options import DeviceSpec
from fakevfio._ram import RamDriver
from fakevfio._registry import Registry
from fakevfio._tree import Tree, errno_of
from fakevfio.driver import ArcDriver
from fakevfio.errors import DeviceError
from tests.conftest import MountFactory
from tests.fakevfio.test_tree_text import STATE, open_path, read

TARGETS = [
    "RUNNING",
    "STOP",
    "STOP_COPY",
    "RESUMING",
    "RUNNING_P2P",
    "PRE_COPY",
    "PRE_COPY_P2P",
    "ERROR",
    "0",
    "1",
    "2",
    "3",
    "4",
    "8",
    "9",
    "99",
    "stop",
    "BOGUS",
    "-1",
]


def make_tree(flags: str = "STOP_COPY+P2P+PRE_COPY") -> Tree:
    drivers: dict[str, type[ArcDriver]] = {"ram": RamDriver}
    registry = Registry(drivers)
    registry.create(DeviceSpec.from_cli(f"d=ram:size=64K,flags={flags},seed=3"))
    return Tree(registry)


def file_write(tree: Tree, text: str) -> tuple[int, float]:
    """A write of ``migration/state`` through the tree: (errno or 0, delay)."""
    handle = open_path(tree, os.O_WRONLY, *STATE)
    try:
        _, delay = tree.write(handle, 0, f"{text}\n".encode())
    except DeviceError as exc:
        return errno_of(exc) or -1, 0.0
    finally:
        tree.release(handle)
    return 0, delay


def file_state(tree: Tree) -> str:
    return read(tree, *STATE).decode().strip()


@settings(max_examples=60, deadline=None)
@given(
    flags=st.sampled_from(
        ["STOP_COPY", "STOP_COPY+P2P", "STOP_COPY+PRE_COPY", "STOP_COPY+P2P+PRE_COPY"]
    ),
    targets=st.lists(st.sampled_from(TARGETS), max_size=12),
    faults=st.sampled_from(["", "arc STOP STOP_COPY EIO\n", "delay arc 7\n"]),
)
def test_channel_answers_are_the_state_files(flags: str, targets: list[str], faults: str) -> None:
    by_file, by_channel = make_tree(flags), make_tree(flags)
    for tree in (by_file, by_channel):
        tree.registry.get("d").faults = FaultRules.parse(faults)
    for target in targets:
        want_err, want_delay = file_write(by_file, target)
        done = answer(by_channel, set_request("d", target))
        err, text = parse_answer(done.message)
        assert err == want_err, (target, text)
        assert done.delay_s == pytest.approx(want_delay)
        got = parse_answer(answer(by_channel, get_request("d")).message)
        assert got == (0, file_state(by_file))
    dev_file, dev_channel = by_file.registry.get("d"), by_channel.registry.get("d")
    assert by_channel.last_error(dev_channel) == by_file.last_error(dev_file)
    assert dev_channel.log_text() == dev_file.log_text()


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"get nosuch", errno.ENOENT),
        (b"set nosuch STOP", errno.ENOENT),
        (b"get", errno.EINVAL),
        (b"get d extra", errno.EINVAL),
        (b"set d", errno.EINVAL),
        (b"reset d", errno.EINVAL),
        (b"", errno.EINVAL),
        (b"get \xff", errno.EINVAL),
        (b"set d STOP  ", errno.EINVAL),
    ],
)
def test_bad_requests_get_an_errno_and_change_nothing(request_bytes: bytes, expected: int) -> None:
    tree = make_tree()
    err, text = parse_answer(answer(tree, request_bytes).message)
    assert err == expected
    assert text  # says what was wrong
    assert file_state(tree) == "RUNNING"
    assert tree.registry.get("d").log_text() == ""


def test_garbled_answers_are_eio() -> None:
    assert parse_answer(b"ok RUNNING") == (0, "RUNNING")
    assert parse_answer(b"ok") == (0, "")
    assert parse_answer(b"err 2 gone") == (errno.ENOENT, "gone")
    for garbled in (b"", b"okay", b"err", b"err x y", b"err 0 no error", b"\xff"):
        assert parse_answer(garbled)[0] == errno.EIO


# -- the socket --------------------------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[tuple[ControlServer, Tree, bytes]]:
    tree = make_tree()
    srv = ControlServer(tree)
    yield srv, tree, srv.address
    srv.close()


def ask(sock: socket.socket, request: bytes) -> tuple[int, str]:
    sock.send(request)
    return parse_answer(sock.recv(MAX_MESSAGE))


def hung_up(sock: socket.socket) -> bool:
    """Whether the server hangs up on a request instead of answering it."""
    try:
        sock.send(b"get d")
        return sock.recv(MAX_MESSAGE) == b""
    except (BrokenPipeError, ConnectionResetError):
        return True


def test_the_socket_serves_gets_and_sets(server: tuple[ControlServer, Tree, bytes]) -> None:
    _srv, tree, address = server
    sock = connect(address)
    assert sock is not None
    with sock:
        assert ask(sock, b"get d") == (0, "RUNNING")
        assert ask(sock, b"set d STOP") == (0, "")
        assert file_state(tree) == "STOP"
        assert ask(sock, b"set d RESUMING_BAD")[0] == errno.EINVAL
        assert ask(sock, b"get d") == (0, "STOP")  # the connection stays after an error


def test_an_oversized_request_is_einval_unread(server: tuple[ControlServer, Tree, bytes]) -> None:
    _srv, tree, address = server
    sock = connect(address)
    assert sock is not None
    with sock:
        err, text = ask(sock, b"set d STOP" + b" " * MAX_MESSAGE)
        assert err == errno.EINVAL
        assert str(MAX_MESSAGE) in text
        assert file_state(tree) == "RUNNING"
        assert ask(sock, b"get d") == (0, "RUNNING")


def test_an_arc_delay_is_waited_out_before_the_answer(
    server: tuple[ControlServer, Tree, bytes],
) -> None:
    _srv, tree, address = server
    tree.registry.get("d").faults = FaultRules.parse("delay arc 150\n")
    sock = connect(address)
    assert sock is not None
    with sock:
        start = time.monotonic()
        assert ask(sock, b"set d STOP") == (0, "")
        assert time.monotonic() - start >= 0.15


def test_other_uids_are_disconnected(server: tuple[ControlServer, Tree, bytes]) -> None:
    """Rule 3: a peer that is neither root nor the mount's uid is not served."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another uid (setuid) for the check")
    _srv, tree, address = server
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = connect(address)
            if sock is not None:
                code = 0 if hung_up(sock) else 1
        finally:
            os.write(write_end, bytes([code]))
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"\0"  # connected, then hung up on without an answer
    os.close(read_end)
    assert file_state(tree) == "RUNNING"


def test_connections_are_bounded_and_close_ends_them(
    server: tuple[ControlServer, Tree, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv, _tree, address = server
    monkeypatch.setattr(_channel, "MAX_CONNECTIONS", 2)
    socks = [connect(address) for _ in range(3)]
    assert all(s is not None for s in socks)
    first, second, third = (s for s in socks if s is not None)
    assert ask(first, b"get d") == (0, "RUNNING")
    assert ask(second, b"get d") == (0, "RUNNING")
    assert hung_up(third)  # refused: the files still work for it
    srv.close()
    for sock in (first, second):
        sock.settimeout(5)
        assert sock.recv(MAX_MESSAGE) == b""
    for sock in (first, second, third):
        sock.close()
    assert connect(address) is None  # nothing listens any more


def test_only_a_name_a_mount_gives_is_connected_to(
    server: tuple[ControlServer, Tree, bytes],
) -> None:
    _srv, _tree, address = server
    other = ControlServer(make_tree())
    try:
        assert other.address != address  # random per mount, never derived from st_dev
    finally:
        other.close()
    assert connect(b"/tmp/somewhere") is None  # not a channel name: never connected to
    assert connect(address + b"x") is None  # nothing listens there


@pytest.mark.fuse
def test_the_mount_names_its_channel_in_a_root_xattr(fakevfio_mount: MountFactory) -> None:
    with fakevfio_mount(["d=ram:size=4K"]) as m:
        name = os.getxattr(m.path, ADDRESS_XATTR)
        sock = connect_mount(m.path)
        assert sock is not None
        with sock:
            assert ask(sock, b"get d") == (0, "RUNNING")
        with pytest.raises(OSError, match="No data available") as other:
            os.getxattr(m.path, "user.other")
        assert other.value.errno == errno.ENODATA
        with pytest.raises(OSError, match="No data available") as not_root:
            os.getxattr(m.path / "devices", ADDRESS_XATTR)
        assert not_root.value.errno == errno.ENODATA
    assert connect(name) is None  # gone with the mount
