"""Broken main-channel streams and files through the real CLI.

A real ``migrator save`` file is taken apart with the independent reference
model (tests/migrator/qemu_reference.py), broken in one place and fed to
``migrator load -i FILE`` and, over a real socket, to ``migrator incoming``.
Each case must give one clear error line, a non-zero exit and leave the
destination device reset (or untouched, when the stream fails before its
header is complete). Mismatches between two real migrator processes must also
leave the source's devices RUNNING with the state they had.
"""

from __future__ import annotations

import itertools
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import MountFactory, MountHandle
from tests.migrator import qemu_reference as ref
from tests.migrator import wire_sender as ws
from tests.migrator.helpers import (
    Result,
    config_bytes,
    digest,
    finish,
    migrate,
    run_migrator,
    start_incoming,
)

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(60)]
_names = itertools.count()
Mounts = tuple[MountHandle, MountHandle]
IDSTR = "saved/vfio"


@pytest.fixture(scope="module")
def mounts(fakevfio_mount_module: MountFactory) -> Iterator[Mounts]:
    with fakevfio_mount_module([]) as src, fakevfio_mount_module([]) as dst:
        yield src, dst


@pytest.fixture(scope="module")
def saved(mounts: Mounts, tmp_path_factory: pytest.TempPathFactory) -> list[ref.Record]:
    """The records of a real save file of a 2 MiB device (id ``saved/vfio``)."""
    src, _ = mounts
    assert src.create("saved", "ram", "size=2M flags=STOP_COPY seed=9") is None
    path = tmp_path_factory.mktemp("saved") / "state.bin"
    result = run_migrator("save", "-o", str(path), str(src.device("saved")))
    assert result.returncode == 0, result.stderr
    data = path.read_bytes()
    blob = ws.qemu_config_blob(config_bytes(src, "saved"))
    records = ref.parse_stream(data, {"saved/vfio": len(blob)})
    # The save file's config blob is QEMU's, as the independent model builds it.
    assert [r[2] for r in records if r[0] == "config"] == [blob]
    assert ref.build_stream(records) == data
    assert [r[0] for r in records].count("data") >= 2
    return records


def _offset(records: list[ref.Record], upto: int) -> int:
    return len(ref.build_stream(records[:upto]))


def _index(records: list[ref.Record], tag: str) -> int:
    return next(i for i, r in enumerate(records) if r[0] == tag)


Breaker = Callable[[list[ref.Record]], bytes]


def _cut(where: Callable[[list[ref.Record]], int]) -> Breaker:
    return lambda records: ref.build_stream(records)[: where(records)]


def _splice(after_tag: str, raw: bytes, *, skip: int = 0) -> Breaker:
    """Records up to and including the first ``after_tag``, then ``raw``, then the rest."""

    def build(records: list[ref.Record]) -> bytes:
        i = _index(records, after_tag) + 1
        return ref.build_stream(records[:i]) + raw + ref.build_stream(records[i + skip :])

    return build


def _be64(n: int) -> bytes:
    return struct.pack(">Q", n)


def _init_data_sent(records: list[ref.Record]) -> bytes:
    i = _index(records, "end")
    part = [("part", 1), ("marker", 1, "INIT_DATA_SENT"), ("footer", 1)]
    return ref.build_stream([*records[:i], *part, *records[i:]])


def _first_data(records: list[ref.Record]) -> int:
    return _index(records, "data")


# name -> (breaker, expected message, whether the destination got past the header)
CASES: dict[str, tuple[Breaker, str, bool]] = {
    "cut in the file header": (_cut(lambda r: 5), "truncated stream: EOF in file header", False),
    "cut in a section header": (
        _cut(lambda r: _offset(r, _index(r, "start")) + 7),
        "truncated stream: EOF in section header",
        True,
    ),
    "cut in a DATA block": (
        _cut(lambda r: _offset(r, _first_data(r)) + 16 + 1000),
        "truncated stream: EOF in DATA block",
        True,
    ),
    "cut in the config blob": (
        _cut(lambda r: _offset(r, _index(r, "config")) + 100),
        "truncated stream: EOF in config blob",
        True,
    ),
    "cut before EOF": (
        _cut(lambda r: len(ref.build_stream(r)) - 1),
        "truncated stream: EOF in section type",
        True,
    ),
    "wrong magic": (
        lambda r: b"QEVN" + ref.build_stream(r)[4:],
        "not a QEMU migration stream: magic 0x5145564e",
        False,
    ),
    "wrong version": (
        lambda r: ref.build_stream(r)[:4] + struct.pack(">I", 2) + ref.build_stream(r)[8:],
        "unsupported stream version 2",
        False,
    ),
    "garbage marker": (
        _splice("end", _be64(0xDEADBEEF00C0FFEE)),
        "Unknown tag 0xdeadbeef00c0ffee",
        True,
    ),
    "SETUP without EOS": (
        # Drop the EOS after SETUP: the footer's bytes are read as the marker.
        lambda r: ref.build_stream([x for i, x in enumerate(r) if i != _index(r, "marker") + 1]),
        "SETUP STATE: EOS not found",
        True,
    ),
    "DATA larger than the rest of the stream": (
        lambda r: (
            ref.build_stream(r[: _index(r, "end") + 1])
            + _be64(ref.MARKERS["DATA"])
            + _be64(64 << 20)
            + b"\x5a" * 4096
        ),
        "truncated stream: EOF in DATA block",
        True,
    ),
    "DATA size over the bound": (
        _splice("end", _be64(ref.MARKERS["DATA"]) + _be64(1 << 40)),
        f"DATA block of {1 << 40} bytes exceeds the maximum",
        True,
    ),
    "INIT_DATA_SENT without switchover-ack": (
        _init_data_sent,
        "Received INIT_DATA_SENT but switchover ack is not used",
        True,
    ),
}


#: A connection is told apart by its first 4 bytes, so a wrong magic is not a main channel.
INCOMING_MESSAGES = {"wrong magic": "unknown channel: first bytes 0x5145564e are no known magic"}


def _dest_device(mounts: Mounts) -> str:
    _, dst = mounts
    name = f"b{next(_names)}"
    assert dst.create(name, "ram", "size=2M flags=STOP_COPY") is None
    return name


def _check_dest(dst: MountHandle, name: str, touched: bool) -> None:
    if touched:
        ws.assert_reset(dst, name)
    else:
        assert dst.state(name) == "RUNNING"
        assert dst.log_lines(name) == []


def _check_refused(result: Result, message: str) -> str:
    assert result.returncode != 0, result.stderr
    line = ws.error_line(result.stderr)
    assert message in line, line
    return line


def test_the_unbroken_file_loads(mounts: Mounts, saved: list[ref.Record], tmp_path: Path) -> None:
    """The baseline the breakers start from is good."""
    src, dst = mounts
    name = _dest_device(mounts)
    path = tmp_path / "good.bin"
    path.write_bytes(ref.build_stream(saved))
    result = run_migrator("load", "-i", str(path), f"{dst.device(name)},id={IDSTR}")
    assert result.returncode == 0, result.stderr
    assert digest(dst, name) == digest(src, "saved")


@pytest.mark.parametrize("case", list(CASES))
def test_load_refuses_a_broken_file(
    mounts: Mounts, saved: list[ref.Record], tmp_path: Path, case: str
) -> None:
    _, dst = mounts
    breaker, message, touched = CASES[case]
    name = _dest_device(mounts)
    path = tmp_path / "broken.bin"
    path.write_bytes(breaker(saved))
    result = run_migrator("load", "-i", str(path), f"{dst.device(name)},id={IDSTR}", timeout=30)
    _check_refused(result, message)
    _check_dest(dst, name, touched)


@pytest.mark.parametrize("case", list(CASES))
def test_incoming_refuses_a_broken_stream(
    mounts: Mounts, saved: list[ref.Record], tmp_path: Path, case: str
) -> None:
    _, dst = mounts
    breaker, message, touched = CASES[case]
    name = _dest_device(mounts)
    # A live stream: the header, the configuration, then OPEN_RETURN_PATH and
    # PING 1, as QEMU 10.0 sends them (tests/data/qemu-10.0-main-prologue.bin).
    assert saved[1][0] == "configuration"
    rp_open = [("command", ref.CMD_OPEN_RETURN_PATH, b""), ("command", 2, b"\0\0\0\1")]
    live = [*saved[:2], *rp_open, *saved[2:]]
    data = breaker(live) if case not in ("wrong magic", "wrong version") else breaker(saved)
    incoming, addr = start_incoming(
        f"unix:{tmp_path}/in.sock",
        [f"{dst.device(name)},id={IDSTR}"],
        "--multifd-transfer",
        "off",
    )
    try:
        with ws.RawSource(addr, timeout=15) as sender:
            ws.quietly(lambda: sender.send_main(data))
            ws.quietly(lambda: sender.main.shutdown(socket.SHUT_WR))
            rp = sender.read_return_path()
    finally:
        result = finish(incoming, 30)
    _check_refused(result, INCOMING_MESSAGES.get(case, message))
    _check_dest(dst, name, touched)
    if touched:
        assert rp[-1] == (ws.RP_SHUT, struct.pack(">I", 1))


def test_load_refuses_an_unknown_idstr(
    mounts: Mounts, saved: list[ref.Record], tmp_path: Path
) -> None:
    _, dst = mounts
    name = _dest_device(mounts)
    path = tmp_path / "good.bin"
    path.write_bytes(ref.build_stream(saved))
    result = run_migrator("load", "-i", str(path), f"{dst.device(name)},id=other/vfio")
    _check_refused(result, f"Unknown savevm section or instance '{IDSTR}' 0")
    ws.assert_reset(dst, name)


def test_load_refuses_a_file_with_fewer_devices(
    mounts: Mounts, saved: list[ref.Record], tmp_path: Path
) -> None:
    _, dst = mounts
    names = [_dest_device(mounts), _dest_device(mounts)]
    path = tmp_path / "good.bin"
    path.write_bytes(ref.build_stream(saved))
    result = run_migrator(
        "load", "-i", str(path), f"{dst.device(names[0])},id={IDSTR}", str(dst.device(names[1]))
    )
    _check_refused(result, f"carried no state for destination device(s) {names[1]}/vfio")
    for name in names:
        ws.assert_reset(dst, name)


# --- two real migrator processes that disagree ---------------------------------------


def _source_devices(mounts: Mounts, n: int, flags: str = "STOP_COPY+P2P") -> list[str]:
    src, dst = mounts
    names = []
    for _ in range(n):
        name = f"s{next(_names)}"
        assert src.create(name, "ram", f"size=2M flags={flags} seed=4") is None
        assert dst.create(name, "ram", f"size=2M flags={flags}") is None
        names.append(name)
    return names


def _live(
    mounts: Mounts,
    tmp_path: Path,
    src_specs: list[str],
    dst_specs: list[str],
    *,
    dest_args: tuple[str, ...] = (),
) -> tuple[Result, Result]:
    source, dest = migrate("tcp:127.0.0.1:0", src_specs, dst_specs, dest_args=dest_args, timeout=30)
    assert source.returncode != 0, source.stderr
    assert dest.returncode != 0, dest.stderr
    ws.error_line(source.stderr)
    return source, dest


def test_live_unknown_idstr(mounts: Mounts, tmp_path: Path) -> None:
    src, dst = mounts
    (name,) = _source_devices(mounts, 1)
    before = digest(src, name)
    _, dest = _live(
        mounts,
        tmp_path,
        [f"{src.device(name)},id=left/vfio"],
        [f"{dst.device(name)},id=right/vfio"],
    )
    _check_refused(dest, "Unknown savevm section or instance 'left/vfio' 0")
    assert src.state(name) == "RUNNING"
    assert digest(src, name) == before
    ws.assert_reset(dst, name)


@pytest.mark.parametrize("flags", ["STOP_COPY+P2P", "STOP_COPY+P2P+PRE_COPY"])
def test_live_source_has_fewer_devices(mounts: Mounts, tmp_path: Path, flags: str) -> None:
    """Both sides fail fast: with pre-copy devices the source used to wait for an ack forever."""
    src, dst = mounts
    a, b = _source_devices(mounts, 2, flags)
    before = digest(src, a)
    started = time.monotonic()
    source, dest = _live(
        mounts, tmp_path, [str(src.device(a))], [str(dst.device(a)), str(dst.device(b))]
    )
    assert time.monotonic() - started < 20
    _check_refused(dest, f"carried no state for destination device(s) {b}/vfio")
    _check_refused(dest, "the source sent 1 device(s), this side has 2")
    _check_refused(source, "the destination failed")
    assert src.state(a) == "RUNNING"
    assert digest(src, a) == before
    ws.assert_reset(dst, a)
    ws.assert_reset(dst, b)


def test_live_source_has_more_devices(mounts: Mounts, tmp_path: Path) -> None:
    src, dst = mounts
    (a,) = _source_devices(mounts, 1)
    # The second source device runs a dirtying workload: only its state is checked.
    dirty = f"s{next(_names)}"
    assert src.create(dirty, "ram", "size=2M flags=STOP_COPY+PRE_COPY seed=5 dirty_rate=1M") is None
    before = digest(src, a)
    _, dest = _live(
        mounts, tmp_path, [str(src.device(a)), str(src.device(dirty))], [str(dst.device(a))]
    )
    _check_refused(dest, f"Unknown savevm section or instance '{dirty}/vfio' 0")
    for name in (a, dirty):
        assert src.state(name) == "RUNNING"
    assert digest(src, a) == before
    ws.assert_reset(dst, a)


def test_live_init_data_sent_without_switchover_ack(mounts: Mounts, tmp_path: Path) -> None:
    src, dst = mounts
    (name,) = _source_devices(mounts, 1, "STOP_COPY+PRE_COPY")
    before = digest(src, name)
    source, dest = _live(
        mounts,
        tmp_path,
        [str(src.device(name))],
        [str(dst.device(name))],
        dest_args=("--switchover-ack", "off"),
    )
    _check_refused(dest, "Received INIT_DATA_SENT but switchover ack is not used")
    _check_refused(source, "the destination failed to load the state")
    assert src.state(name) == "RUNNING"
    assert digest(src, name) == before
    ws.assert_reset(dst, name)
