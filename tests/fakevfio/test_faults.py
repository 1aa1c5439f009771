"""Parsing of fault-injection rules (INTERFACES section 4)."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakevfio._faults import (
    MAX_RULES,
    MAX_RULES_TEXT_BYTES,
    ArcFault,
    CorruptFault,
    DelayFault,
    DirtyLoseFault,
    FaultRules,
    IoFault,
)
from fakevfio.errors import ConfigError
from vfio_uapi.fsm import State


def test_faults_parse_every_rule_kind() -> None:
    rules = FaultRules.parse(
        "arc STOP STOP_COPY EIO\n"
        "\n"
        "# a comment\n"
        "read ENOSPC after 4096\n"
        "write EAGAIN after 0\n"
        "delay read 10\n"
        "delay write 20\n"
        "delay arc 30\n"
        "delay arc 5\n"
        "corrupt after 77\n"
    )
    assert rules.rules == (
        ArcFault(current=State.STOP, nxt=State.STOP_COPY, errno=errno.EIO),
        IoFault(op="read", errno=errno.ENOSPC, after=4096),
        IoFault(op="write", errno=errno.EAGAIN, after=0),
        DelayFault(op="read", ms=10),
        DelayFault(op="write", ms=20),
        DelayFault(op="arc", ms=30),
        DelayFault(op="arc", ms=5),
        CorruptFault(after=77),
    )
    assert rules.arc_errno(State.STOP, State.STOP_COPY) == errno.EIO
    assert rules.arc_errno(State.STOP_COPY, State.STOP) is None
    assert rules.io_fault("read") == IoFault(op="read", errno=errno.ENOSPC, after=4096)
    assert rules.io_fault("write") == IoFault(op="write", errno=errno.EAGAIN, after=0)
    assert rules.delay_ms("arc") == 35
    assert rules.delay_ms("read") == 10
    assert rules.corrupt_offsets() == [77]


def test_faults_text_round_trips_and_empty_clears() -> None:
    text = "arc running stop EIO\nread EIO after 5\ndelay arc 1\ncorrupt after 9\n"
    rules = FaultRules.parse(text)
    assert rules.text() == "arc RUNNING STOP EIO\nread EIO after 5\ndelay arc 1\ncorrupt after 9\n"
    assert FaultRules.parse(rules.text()) == rules
    assert FaultRules.parse("").rules == ()
    assert FaultRules.parse("\n  \n").text() == ""
    assert FaultRules().io_fault("read") is None


@pytest.mark.parametrize(
    "line",
    [
        "arc STOP STOP_COPY",
        "arc STOP NOWHERE EIO",
        "arc STOP STOP_COPY EFOO",
        "arc STOP STOP_COPY errorcode",
        "arc STOP STOP_COPY 5",
        "read EIO 5",
        "read EIO after -1",
        "read EIO after 1e3",
        "read EIO after 99999999999999999999",
        "write EIO before 5",
        "delay open 5",
        "delay read 600001",
        "delay read",
        "corrupt 5",
        "corrupt after x",
        "explode now",
    ],
)
def test_faults_reject_bad_lines_naming_the_line(line: str) -> None:
    with pytest.raises(ConfigError, match=r"fault rule line 2"):
        FaultRules.parse("delay arc 1\n" + line + "\n")


def test_faults_reject_non_ascii_digits() -> None:
    # "²".isdigit() is true, but it is not a number: must be a ConfigError, not ValueError.
    with pytest.raises(ConfigError, match="line 1"):
        FaultRules.parse("corrupt after ²")


def test_faults_bounds() -> None:
    assert len(FaultRules.parse("delay arc 1\n" * MAX_RULES).rules) == MAX_RULES
    with pytest.raises(ConfigError, match="at most"):
        FaultRules.parse("delay arc 1\n" * (MAX_RULES + 1))
    with pytest.raises(ConfigError, match="longer than"):
        FaultRules.parse("#" * (MAX_RULES_TEXT_BYTES + 1))
    assert FaultRules.parse("delay read 600000").delay_ms("read") == 600000


_WORDS = st.sampled_from(
    [
        "arc",
        "read",
        "write",
        "delay",
        "corrupt",
        "after",
        "EIO",
        "STOP",
        "RUNNING",
        "arc",
        "5",
        "0",
        "-1",
        "²",
        "\u0661",
        "x",
        "#",
        "ERROR",
        "ENOMSG",
    ]
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.lists(_WORDS | st.text(max_size=4), max_size=5).map(" ".join), max_size=6))
def test_faults_parse_any_text_is_config_error_or_round_trips(lines: list[str]) -> None:
    text = "\n".join(lines)
    try:
        rules = FaultRules.parse(text)
    except ConfigError:
        return
    assert FaultRules.parse(rules.text()) == rules


def test_faults_dirty_lose_parses_bounds_and_round_trips() -> None:
    rules = FaultRules.parse("dirty lose 25\ndirty lose 0\ndirty lose 100\n")
    assert rules.rules == (
        DirtyLoseFault(percent=25),
        DirtyLoseFault(percent=0),
        DirtyLoseFault(percent=100),
    )
    assert rules.dirty_lose_percent() == 100  # the largest rule wins
    assert rules.text() == "dirty lose 25\ndirty lose 0\ndirty lose 100\n"
    assert FaultRules.parse(rules.text()) == rules
    assert FaultRules().dirty_lose_percent() == 0
    assert FaultRules.parse("dirty lose 7").dirty_lose_percent() == 7


@pytest.mark.parametrize(
    "line", ["dirty lose 101", "dirty lose -1", "dirty lose", "dirty keep 5", "dirty lose 5 %"]
)
def test_faults_dirty_lose_rejects_bad_lines(line: str) -> None:
    with pytest.raises(ConfigError, match=r"fault rule line 1"):
        FaultRules.parse(line)
    with pytest.raises(ConfigError, match=r"0\.\.100"):
        FaultRules.parse("dirty lose 101")
