"""The kernel FSM table against the uAPI reference tables (tables A and B).

Tables B for all four flag sets live in ``tests/data/fsm_tables_b.md``, copied
verbatim from the reference notes; the parser below is independent of
:mod:`vfio_uapi.fsm`, so a typo in ``fsm.TABLE`` cannot hide behind itself.
"""

from __future__ import annotations

import errno
import re

import pytest

from tests.fsm_tables import ABBREV, Outcome, column, tables_b
from vfio_uapi import fsm
from vfio_uapi.errors import IllegalTransition
from vfio_uapi.fsm import MigFlags, State

#: The four arcs the uAPI says return a new data_fd (written out, not imported).
UAPI_NEW_FD_ARCS = {
    (State.RUNNING, State.PRE_COPY),
    (State.RUNNING_P2P, State.PRE_COPY_P2P),
    (State.STOP, State.STOP_COPY),
    (State.STOP, State.RESUMING),
}
SAVING = {State.PRE_COPY, State.PRE_COPY_P2P, State.STOP_COPY}


TABLES = tables_b()
CELLS = [
    pytest.param(
        flags,
        cur,
        new,
        outcome,
        id=f"{flags:#x}-{cur.name}-{new if new is None else State(new).name}",
    )
    for flags, table in sorted(TABLES.items())
    for (cur, new), outcome in table.items()
]


def test_tables_b_parse_completely() -> None:
    assert sorted(TABLES) == [1, 3, 5, 7]
    for flags, table in TABLES.items():
        rows = {cur for cur, _ in table}
        assert rows == {State.ERROR} | {
            s for s in State if fsm.supported(s, flags) and s is not State.ERROR
        }
        assert len(table) == len(rows) * 9
    assert sum(len(t) for t in TABLES.values()) == 9 * (5 + 6 + 6 + 8)


@pytest.mark.parametrize(("flags", "cur", "new", "outcome"), CELLS)
def test_fsm_path_matches_table_b(
    flags: int, cur: State, new: int | None, outcome: Outcome
) -> None:
    if new is None:
        # A number >= 8 never becomes a State: the parser refuses it (EINVAL upstream).
        assert outcome.einval
        for number in ("8", "9", "255", "4294967295"):
            with pytest.raises(ValueError, match="out of range"):
                fsm.parse_state(number)
        return
    target = State(new)
    if outcome.einval:
        with pytest.raises(IllegalTransition) as info:
            fsm.path(cur, target, flags)
        assert info.value.errno == errno.EINVAL
        return
    arcs = fsm.path(cur, target, flags)
    assert tuple(arcs) == outcome.arcs
    # Rule 5: a new session iff the *final* arc is a new-fd arc (table B's column).
    change = fsm.session_change(cur, target, flags)
    assert change.opens == outcome.new_fd
    assert change.writable == (change.opens and target is State.RESUMING)
    # A session ends when an arc leaves the saving group or RESUMING for a state
    # outside the saving group (stated by group, not by the module's arc lists).
    leaves = any(a in SAVING | {State.RESUMING} and b not in SAVING for a, b in arcs)
    assert change.ends == (leaves or change.opens)
    assert fsm.arcs_session_change(arcs) == change
    # Rule 2: a saving-group state is interior only on a move inside the group
    # (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY); no path leaves and re-enters it.
    for _, mid in arcs[:-1]:
        assert mid not in SAVING or (cur in SAVING and target in SAVING)
    # Every arc is a direct arc the driver may see.
    for a, b in arcs:
        assert fsm.next_state(a, b, flags) is b


def test_fsm_new_session_arcs_are_the_uapi_four() -> None:
    assert fsm.NEW_SESSION_ARCS == UAPI_NEW_FD_ARCS
    uapi_end_arcs = {
        (State.STOP_COPY, State.STOP),
        (State.PRE_COPY, State.RUNNING),
        (State.PRE_COPY_P2P, State.RUNNING_P2P),
        (State.RESUMING, State.STOP),
    }
    assert uapi_end_arcs == fsm.END_SESSION_ARCS


@pytest.mark.parametrize("flags", [f for f in fsm.VALID_FLAGS if f & MigFlags.PRE_COPY])
@pytest.mark.parametrize("target", [State.PRE_COPY, State.PRE_COPY_P2P])
def test_fsm_stop_copy_to_pre_copy_refused_without_hanging(flags: MigFlags, target: State) -> None:
    if not fsm.supported(target, flags):
        target = State.PRE_COPY
    with pytest.raises(IllegalTransition, match="no path") as info:
        fsm.next_state(State.STOP_COPY, target, flags)
    assert info.value.errno == errno.EINVAL
    assert (info.value.current, info.value.requested) == ("STOP_COPY", target.name)


# Table A for STOP_COPY|P2P|PRE_COPY (flags=0x7), verbatim from the reference notes.
TABLE_A_0X7 = """
| cur \\ new | ERR(0) | STOP(1) | RUN(2) | SC(3) | RES(4) | RP2P(5) | PC(6) | PCP2P(7) | >=8 |
|---|---|---|---|---|---|---|---|---|---|
| ERR(0) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) |
| STOP(1) | EINVAL | STOP | RP2P | SC | RES | RP2P | RP2P | RP2P | EINVAL |
| RUN(2) | EINVAL | RP2P | RUN | RP2P | RP2P | RP2P | PC | RP2P | EINVAL |
| SC(3) | EINVAL | STOP | STOP | SC | STOP | STOP | EINVAL | EINVAL | EINVAL |
| RES(4) | EINVAL | STOP | STOP | STOP | RES | STOP | STOP | STOP | EINVAL |
| RP2P(5) | EINVAL | STOP | RUN | STOP | STOP | RP2P | RUN | PCP2P | EINVAL |
| PC(6) | EINVAL | RUN | RUN | PCP2P | RUN | RUN | PC | PCP2P | EINVAL |
| PCP2P(7) | EINVAL | RP2P | RP2P | SC | RP2P | RP2P | PC | PCP2P | EINVAL |
"""  # noqa: E501

# Table A for STOP_COPY|PRE_COPY (flags=0x5): the skip loop over RUNNING_P2P matters here.
TABLE_A_0X5 = """
| cur \\ new | ERR(0) | STOP(1) | RUN(2) | SC(3) | RES(4) | RP2P(5) | PC(6) | PCP2P(7) | >=8 |
|---|---|---|---|---|---|---|---|---|---|
| ERR(0) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) | EINVAL(WARN) |
| STOP(1) | EINVAL | STOP | RUN | SC | RES | EINVAL | RUN | EINVAL | EINVAL |
| RUN(2) | EINVAL | STOP | RUN | STOP | STOP | EINVAL | PC | EINVAL | EINVAL |
| SC(3) | EINVAL | STOP | STOP | SC | STOP | EINVAL | EINVAL | EINVAL | EINVAL |
| RES(4) | EINVAL | STOP | STOP | STOP | RES | EINVAL | STOP | EINVAL | EINVAL |
| PC(6) | EINVAL | RUN | RUN | SC | RUN | EINVAL | PC | EINVAL | EINVAL |
"""  # noqa: E501


def _table_a_cells(text: str) -> list[tuple[State, int | None, str]]:
    out: list[tuple[State, int | None, str]] = []
    columns: list[int | None] = []
    for line in text.strip().splitlines():
        if line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "cur \\ new":
            columns = [column(c) for c in cells[1:]]
            continue
        m = re.fullmatch(r"[A-Z0-9]+\((\d)\)", cells[0])
        assert m
        out.extend(
            (State(int(m.group(1))), col, cell)
            for col, cell in zip(columns, cells[1:], strict=True)
        )
    return out


@pytest.mark.parametrize(
    ("flags", "cur", "new", "expected"),
    [(7, *cell) for cell in _table_a_cells(TABLE_A_0X7)]
    + [(5, *cell) for cell in _table_a_cells(TABLE_A_0X5)],
)
def test_fsm_next_state_matches_table_a(
    flags: int, cur: State, new: int | None, expected: str
) -> None:
    if new is None:
        with pytest.raises(ValueError, match="out of range"):
            fsm.parse_state("8")
        return
    if expected.startswith("EINVAL"):
        with pytest.raises(IllegalTransition) as info:
            fsm.next_state(cur, State(new), flags)
        assert info.value.errno == errno.EINVAL
        if cur is State.ERROR:
            assert "allows no moves" in str(info.value)
    else:
        assert fsm.next_state(cur, State(new), flags) is ABBREV[expected]


def test_fsm_table_rows_cover_every_pair() -> None:
    for cur in State:
        assert set(fsm.TABLE[cur]) == set(State)
        assert fsm.TABLE[cur][cur] is cur
        assert fsm.TABLE[cur][State.ERROR] is State.ERROR


def test_fsm_path_same_state_is_empty() -> None:
    for flags in fsm.VALID_FLAGS:
        for state in State:
            assert fsm.path(state, state, flags) == []


def test_fsm_error_is_never_a_target() -> None:
    with pytest.raises(IllegalTransition, match="ERROR cannot be requested"):
        fsm.next_state(State.RUNNING, State.ERROR, 7)


def test_fsm_unsupported_target_names_the_flags() -> None:
    with pytest.raises(
        IllegalTransition, match=r"does not support PRE_COPY \(flags: STOP_COPY P2P\)"
    ):
        fsm.path(State.RUNNING, State.PRE_COPY, 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("STOP", State.STOP),
        ("running\n", State.RUNNING),
        ("  Pre_Copy_P2P  ", State.PRE_COPY_P2P),
        ("ERROR", State.ERROR),
        ("0", State.ERROR),
        ("3", State.STOP_COPY),
        ("7\n", State.PRE_COPY_P2P),
        ("007", State.PRE_COPY_P2P),
    ],
)
def test_parse_state_accepts_names_and_numbers(text: str, expected: State) -> None:
    assert fsm.parse_state(text) is expected


@pytest.mark.parametrize(
    "text", ["", "\n", "8", "42", "-1", "+3", "0x3", "STOPCOPY", "STOP COPY", "3.0"]
)
def test_parse_state_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"state"):
        fsm.parse_state(text)


def test_parse_state_rejects_non_ascii_digits() -> None:
    # "²".isdigit() is true but int() refuses it; still a ValueError, as documented.
    with pytest.raises(ValueError):  # noqa: PT011 - the message comes from int()
        fsm.parse_state("²")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("STOP_COPY", 1),
        ("STOP_COPY+P2P", 3),
        ("stop_copy|pre_copy", 5),
        ("PRE_COPY+P2P+STOP_COPY", 7),
        ("STOP_COPY P2P PRE_COPY", 7),
        ("STOP_COPY++P2P", 3),
    ],
)
def test_parse_flags_accepts(text: str, expected: int) -> None:
    assert fsm.parse_flags(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "not a combination"),
        ("P2P", "not a combination"),
        ("PRE_COPY+P2P", "not a combination"),
        ("STOP_COPY+FOO", "unknown migration flag"),
        ("STOP_COPY+ERROR", "unknown migration flag"),
    ],
)
def test_parse_flags_rejects(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fsm.parse_flags(text)


@pytest.mark.parametrize(
    ("flags", "text"),
    [
        (1, "STOP_COPY"),
        (3, "STOP_COPY P2P"),
        (5, "STOP_COPY PRE_COPY"),
        (7, "STOP_COPY P2P PRE_COPY"),
    ],
)
def test_flags_text_is_the_interface_spelling(flags: int, text: str) -> None:
    assert fsm.flags_text(flags) == text
    assert fsm.parse_flags(text) == flags


def test_supported_matches_reference_flag_requirements() -> None:
    need = {State.RUNNING_P2P: 3, State.PRE_COPY: 5, State.PRE_COPY_P2P: 7}
    for flags in (1, 3, 5, 7):
        assert not fsm.supported(State.ERROR, flags)
        for state in State:
            if state is State.ERROR:
                continue
            assert fsm.supported(state, flags) == (
                (need.get(state, 1) & flags) == need.get(state, 1)
            )
