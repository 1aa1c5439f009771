"""Hypothesis fuzz of the fakevfio files through one real mount.

Random bytes, over-long writes, odd state names and numbers, rule lines,
create lines, positional config/region writes and resuming-stream bytes are
written with plain ``os.write``/``os.pwrite``. Every write must end in
success or a clean errno; a failed write must change nothing (state, log,
rules, config, region, device list); and the FUSE server must stay alive and
never hit an unexpected error (it logs those and answers EIO).
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MountFactory, MountHandle, oserror_errno

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(120)]

DEV = "fz"
RES = "rz"
SIZE = 64 << 10
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STATES = ["ERROR", "STOP", "RUNNING", "STOP_COPY", "RESUMING", "RUNNING_P2P", "PRE_COPY"]
STATES += ["PRE_COPY_P2P"]
#: Errnos a write may legitimately end with (no EIO: the server answers that
#: only for unexpected exceptions, and no rule here injects it).
CLEAN_ERRNOS = {
    errno.EINVAL,
    errno.EFBIG,
    errno.EEXIST,
    errno.ENOENT,
    errno.ENODEV,
    errno.EOPNOTSUPP,
    errno.ENOMEM,
    errno.EBUSY,
}
HUGE = 70_000  # above the 64 KiB control-write bound


@pytest.fixture(scope="module")
def mnt(fakevfio_mount_module: MountFactory) -> Iterator[MountHandle]:
    specs = [
        f"{DEV}=ram:size={SIZE},flags=STOP_COPY+P2P+PRE_COPY,seed=3",
        f"{RES}=ram:size={SIZE},flags=STOP_COPY+P2P+PRE_COPY",
    ]
    with fakevfio_mount_module(specs) as m:
        yield m
        assert m.proc.poll() is None, "the FUSE server died"
        assert "unexpected error" not in m.log.read_text(errors="replace"), m.log.read_text()


@pytest.fixture(scope="module")
def saved_stream(mnt: MountHandle) -> bytes:
    """A complete saved stream of ``fz`` (STOP_COPY), to build near-valid resuming input."""
    assert mnt.set_state(DEV, "STOP_COPY") is None
    data = mnt.read_bytes(mnt.file(DEV, "migration/data"))
    mnt.reset(DEV)
    return data


def _snapshot(m: MountHandle, name: str) -> dict[str, Any]:
    info = m.info(name)
    return {
        "state": m.state(name),
        "log": m.log_lines(name),
        "faults": m.read(name, "faults"),
        "config": m.read_bytes(m.file(name, "config")),
        "digest": info["state_digest"],
        "devices": sorted(os.listdir(m.path / "devices")),
    }


def _alive(m: MountHandle) -> None:
    assert m.proc.poll() is None, "the FUSE server died"
    assert m.state(DEV) in STATES


def _restore(m: MountHandle, name: str) -> None:
    assert m.write(name, "faults", "\n") is None
    if m.state(name) != "RUNNING":
        m.reset(name)


def _check_write(m: MountHandle, rel: str, data: bytes, name: str = DEV) -> int | None:
    """Write ``data`` as one control write; on an error nothing may have changed."""
    before = _snapshot(m, name)
    err = m.write(name, rel, data)
    assert err is None or err in CLEAN_ERRNOS, (rel, data[:80], err and errno.errorcode[err])
    if err is not None:
        after = _snapshot(m, name)
        # A refused state request is logged as "REFUSED FROM TO" (INTERFACES section 1).
        added = after["log"][len(before["log"]) :]
        assert after["log"][: len(before["log"])] == before["log"], (rel, data[:80])
        assert added == [] or (
            rel == "migration/state" and len(added) == 1 and added[0].startswith("REFUSED ")
        ), (rel, data[:80], added)
        assert {**after, "log": None} == {**before, "log": None}, (rel, data[:80])
    _alive(m)
    return err


state_payloads = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(STATES).map(lambda s: s.encode()),
    st.builds(
        lambda s, pre, post: (pre + s + post).encode(),
        st.sampled_from([*STATES, *(s.lower() for s in STATES)]),
        st.sampled_from(["", " ", "\n", "\x00", "+"]),
        st.sampled_from(["", "\n", "\n\n", " ", "\x00", "X"]),
    ),
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda n: f"{n}\n".encode()),
    st.integers(min_value=HUGE, max_value=HUGE + 4096).map(lambda n: b"STOP\n" * (n // 5)),
)


@FUZZ
@given(data=state_payloads)
def test_fuzz_state_writes(mnt: MountHandle, data: bytes) -> None:
    try:
        err = _check_write(mnt, "migration/state", data)
        if len(data) > 65536:
            assert err == errno.EFBIG
    finally:
        _restore(mnt, DEV)


_words = st.sampled_from(
    ["arc", "read", "write", "delay", "corrupt", "after", "EIO", "ENOSPC", "EBOGUS", "#", "arc\x00"]
)
_numbers = st.integers(min_value=-5, max_value=2**80).map(str)
rule_lines = st.lists(
    st.one_of(_words, _numbers, st.sampled_from(STATES), st.text(max_size=12)), max_size=6
).map(" ".join)
fault_payloads = st.one_of(
    st.lists(rule_lines, max_size=80).map(lambda ls: "\n".join(ls).encode()),
    st.binary(max_size=500),
    st.integers(min_value=HUGE, max_value=HUGE + 100).map(lambda n: b"# x\n" * (n // 4)),
)


@FUZZ
@given(data=fault_payloads)
def test_fuzz_fault_rules(mnt: MountHandle, data: bytes) -> None:
    try:
        err = _check_write(mnt, "faults", data)
        if err is None:
            # Accepted rules read back as canonical lines, one per rule.
            text = mnt.read(DEV, "faults")
            assert all(
                line.split()[0] in ("arc", "read", "write", "delay", "corrupt")
                for line in text.splitlines()
            )
    finally:
        _restore(mnt, DEV)


_names = st.one_of(
    st.sampled_from(["../x", "a/b", "..", ".", "/", "x" * 65, "a\x00b", "dev\n2", "", " "]),
    st.text(min_size=1, max_size=70),
    st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True),
)
# Sizes stay small (or invalid): a valid 1T device with a seed would be filled for real.
_opts = st.lists(
    st.sampled_from(
        [
            "size=4K",
            "size=0",
            "size=2T",
            "size=1T",
            "size=-1",
            "size=9999999999999999999999",
            "seed=1",
            "flags=STOP_COPY",
            "flags=P2P",
            "flags=BOGUS",
            "page_size=3",
            "config_size=300",
            "nokey",
            "=1",
            "Size=1",
            "unknown=1",
            "seed=0x10",
            "seed=abc",
        ]
    ),
    max_size=5,
)
create_payloads = st.one_of(
    st.builds(lambda n, o: " ".join([n, *o]).encode("utf-8", "surrogatepass"), _names, _opts),
    st.binary(max_size=200),
    st.just(b"x " + b"a=1 " * 20_000),
)


@FUZZ
@given(data=create_payloads)
def test_fuzz_create_lines(mnt: MountHandle, data: bytes) -> None:
    devices = mnt.path / "devices"
    before = sorted(os.listdir(devices))
    err = mnt.write_bytes(mnt.path / "drivers" / "ram" / "create", data)
    assert err is None or err in CLEAN_ERRNOS, (data[:80], err and errno.errorcode[err])
    after = sorted(os.listdir(devices))
    if err is not None or not data:  # (an empty write never reaches a FUSE server)
        assert after == before, data[:80]
    else:
        created = set(after) - set(before)
        assert len(created) == 1, (data[:80], created)
        (name,) = created
        assert "/" not in name
        assert name not in (".", "..")
        assert mnt.remove(name) is None
    _alive(mnt)


@FUZZ
@given(
    which=st.sampled_from(["config", "regions/bar0"]),
    offset=st.one_of(st.integers(0, SIZE + 8), st.integers(0, 2**62)),
    data=st.binary(min_size=1, max_size=5000),
)
def test_fuzz_positional_writes(mnt: MountHandle, which: str, offset: int, data: bytes) -> None:
    path = mnt.file(DEV, which)
    total = 256 if which == "config" else SIZE
    before = mnt.read_bytes(path)
    digest = mnt.info(DEV)["state_digest"]
    fd = os.open(path, os.O_WRONLY)
    try:
        try:
            n = os.pwrite(fd, data, offset)
            err = None
        except OSError as exc:
            err = exc.errno
    finally:
        os.close(fd)
    after = mnt.read_bytes(path)
    if offset + len(data) <= total and which == "config":
        # Config space is virtualised as vfio-pci does it (read-only IDs, W1C
        # status, ...): the write is accepted whole, bytes outside it never
        # change, and the device-specific bytes 0x40..0x5f (no capability lives
        # there) take the data as written.
        assert err is None
        assert n == len(data)
        assert after[:offset] == before[:offset]
        assert after[offset + len(data) :] == before[offset + len(data) :]
        for pos in range(max(offset, 0x40), min(offset + len(data), 0x60)):
            assert after[pos] == data[pos - offset], hex(pos)
    elif offset + len(data) <= total:
        assert err is None
        assert n == len(data)
        assert after == before[:offset] + data + before[offset + len(data) :]
    else:
        assert err in (errno.EINVAL, errno.EFBIG), err
        assert after == before
        assert mnt.info(DEV)["state_digest"] == digest
    _alive(mnt)


@FUZZ
@given(
    keep=st.integers(0, 200),
    tail=st.binary(max_size=3000),
    chunks=st.integers(1, 4),
)
def test_fuzz_resuming_stream(
    mnt: MountHandle, saved_stream: bytes, keep: int, tail: bytes, chunks: int
) -> None:
    """A prefix of a real stream, then random bytes, in a few writes."""
    data = saved_stream[:keep] + tail
    mnt.reset(RES)
    assert mnt.set_state(RES, "RESUMING") is None
    log = mnt.log_lines(RES)
    try:
        fd = os.open(mnt.file(RES, "migration/data"), os.O_WRONLY)
        try:
            step = max(1, -(-len(data) // chunks))
            dead = False
            for i in range(0, len(data), step):
                err = oserror_errno(functools.partial(os.write, fd, data[i : i + step]))
                if err is None:
                    continue
                assert err in CLEAN_ERRNOS, errno.errorcode[err]
                if dead:
                    assert err == errno.ENODEV  # the session died with the first error
                dead = True
        finally:
            os.close(fd)
        assert mnt.state(RES) == "RESUMING"
        assert mnt.log_lines(RES) == log  # writes log nothing
        # An incomplete or broken stream cannot leave RESUMING.
        err = mnt.set_state(RES, "STOP")
        if data != saved_stream:
            assert err == errno.EINVAL
            assert mnt.state(RES) == "RESUMING"
    finally:
        mnt.reset(RES)
    _alive(mnt)
