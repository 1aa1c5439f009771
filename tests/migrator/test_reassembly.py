"""Tests of migrator.reassembly.Reassembler."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrator.errors import ReassemblyError
from migrator.reassembly import Reassembler

BIG = 1 << 30


def reassemble(
    r: Reassembler, packets: list[tuple[int, bool, bytes]], pop_after: list[bool]
) -> list[bytes]:
    out: list[bytes] = []
    for (idx, is_config, data), pop in zip(packets, pop_after, strict=True):
        r.push(idx, is_config, data)
        if pop:
            out += [bytes(b) for b in r.pop_ready()]
    out += [bytes(b) for b in r.pop_ready()]
    return out


def config_of(r: Reassembler) -> bytes | None:
    # A call, so mypy does not narrow the property across steps.
    return None if r.config is None else bytes(r.config)


def test_reassembler_in_order() -> None:
    r = Reassembler("d", max_queued_bytes=BIG)
    assert (r.next_idx, r.waiting_for, r.config, r.done) == (0, 0, None, False)
    r.push(0, False, b"a")
    r.push(1, False, b"bc")
    assert r.queued_bytes == 3
    assert r.pop_ready() == [b"a", b"bc"]
    assert (r.next_idx, r.queued_bytes) == (2, 0)
    r.push(2, True, b"cfg")
    assert r.config == b"cfg"
    assert r.done
    assert r.config_idx == 2


def test_reassembler_holds_back_at_a_gap_and_before_config() -> None:
    r = Reassembler("d", max_queued_bytes=BIG)
    r.push(3, True, b"cfg")
    r.push(1, False, b"b")
    assert r.pop_ready() == []
    assert r.waiting_for == 0
    assert r.config is None  # data before the config is still missing
    r.push(0, False, b"a")
    assert r.pop_ready() == [b"a", b"b"]
    assert r.config is None
    r.push(2, False, b"c")
    assert r.pop_ready() == [b"c"]
    assert r.pop_ready() == []
    assert config_of(r) == b"cfg"
    assert r.done


def test_reassembler_config_only() -> None:
    r = Reassembler("d", max_queued_bytes=BIG)
    r.push(0, True, b"cfg")
    assert r.pop_ready() == []
    assert r.config == b"cfg"


def test_reassembler_drops_empty_buffers() -> None:
    r = Reassembler("d", max_queued_bytes=BIG)
    r.push(1, False, b"b")
    r.push(0, False, b"")
    assert r.pop_ready() == [b"b"]
    assert r.next_idx == 2


@given(
    sizes=st.lists(st.integers(0, 20), max_size=30),
    data=st.data(),
)
def test_any_permutation_reassembles_in_order(sizes: list[int], data: st.DataObject) -> None:
    chunks = [bytes([i % 256]) * n for i, n in enumerate(sizes)]
    packets = [(i, False, c) for i, c in enumerate(chunks)] + [(len(chunks), True, b"cfg")]
    order = data.draw(st.permutations(packets))
    pops = data.draw(st.lists(st.booleans(), min_size=len(order), max_size=len(order)))
    r = Reassembler("d", max_queued_bytes=BIG)
    out = reassemble(r, order, pops)
    assert out == [c for c in chunks if c]
    assert r.config == b"cfg"
    assert r.done
    assert r.queued_bytes == 3  # only the config is still held


@pytest.mark.parametrize(
    ("pushes", "bad", "message"),
    [
        ([(0, False, b"a")], (0, False, b"a"), "state buffer 0 already filled"),
        ([(2, False, b"a")], (2, False, b"b"), "state buffer 2 already filled"),
        ([(1, True, b"c")], (1, True, b"c"), "state buffer 1 already filled"),
        ([(1, True, b"c")], (1, False, b"c"), "state buffer 1 already filled"),
        ([], (0xFFFFFFFF, False, b"x"), "packet index is invalid"),
        ([], (0xFFFFFFFF, True, b"x"), "packet index is invalid"),
        ([(3, True, b"c")], (5, True, b"c"), "second config packet (idx 5; the config was idx 3)"),
        ([(3, True, b"c")], (4, False, b"d"), "data packet idx 4 is at or after the config packet"),
        ([(5, False, b"d")], (2, True, b"c"), "config packet idx 2 is before data packet idx 5"),
        # The boundaries: the config one below the highest data idx, data one above it.
        ([(3, False, b"d")], (2, True, b"c"), "config packet idx 2 is before data packet idx 3"),
        ([(2, True, b"c")], (3, False, b"d"), "data packet idx 3 is at or after the config packet"),
    ],
)
def test_reassembler_rejects(
    pushes: list[tuple[int, bool, bytes]], bad: tuple[int, bool, bytes], message: str
) -> None:
    r = Reassembler("dev/vfio", max_queued_bytes=BIG)
    for p in pushes:
        r.push(*p)
    before = (r.queued_bytes, r.queued_buffers, r.config_idx)
    with pytest.raises(ReassemblyError) as info:
        r.push(*bad)
    assert message in str(info.value)
    assert info.value.device == "dev/vfio"
    assert (r.queued_bytes, r.queued_buffers, r.config_idx) == before


def test_reassembler_rejects_an_already_popped_idx() -> None:
    r = Reassembler("d", max_queued_bytes=BIG)
    r.push(0, False, b"a")
    assert r.pop_ready() == [b"a"]
    with pytest.raises(ReassemblyError, match="state buffer 0 already filled"):
        r.push(0, False, b"a")
    with pytest.raises(ReassemblyError, match="state buffer 0 already filled"):
        r.push(0, True, b"c")


def test_reassembler_size_bound_is_checked_before_storing() -> None:
    r = Reassembler("d", max_queued_bytes=10)
    r.push(1, False, b"x" * 6)
    assert r.can_accept(4)
    assert not r.can_accept(5)
    with pytest.raises(
        ReassemblyError, match="queuing state buffer 2 would exceed the size max of 10"
    ):
        r.push(2, False, b"y" * 5)
    assert r.queued_bytes == 6
    r.push(2, False, b"y" * 4)  # exactly at the bound is fine
    r.push(0, False, b"")
    assert r.pop_ready() == [b"x" * 6, b"y" * 4]
    assert r.queued_bytes == 0
    assert r.can_accept(10)


def test_reassembler_count_bound() -> None:
    r = Reassembler("d", max_queued_bytes=BIG, max_queued_buffers=2)
    r.push(1, False, b"")
    r.push(2, False, b"")
    assert not r.can_accept(0)
    with pytest.raises(ReassemblyError, match="buffer 3 would exceed the count max of 2"):
        r.push(3, False, b"")
    with pytest.raises(ReassemblyError, match="count max"):
        r.push(0, False, b"")  # the bound is strict, even for the idx awaited


def test_reassembler_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        Reassembler("d", max_queued_bytes=-1)
    r = Reassembler("d", max_queued_bytes=BIG)
    with pytest.raises(ValueError, match="not a u32"):
        r.push(-1, False, b"")


def _ready(r: Reassembler) -> bool:
    return r.has_ready  # a call, so mypy does not narrow the property across pushes


def test_reassembler_pop_ready_in_batches_and_has_ready() -> None:
    r = Reassembler("dev/vfio", max_queued_bytes=1 << 20)
    assert not _ready(r)
    for idx in (2, 0, 1, 3):
        r.push(idx, False, bytes([idx]) * 100)
    assert _ready(r)
    first = r.pop_ready(150)  # stops once 150 bytes were taken
    assert first == [b"\x00" * 100, b"\x01" * 100]
    assert r.queued_bytes == 200
    assert r.pop_ready(1) == [b"\x02" * 100]  # at least one buffer per call
    assert r.pop_ready() == [b"\x03" * 100]
    assert not _ready(r)
    r.push(4, True, b"cfg")
    assert r.config == b"cfg"
    assert _ready(r)
