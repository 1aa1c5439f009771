"""The kernel FSM table against the uAPI reference tables (tables A and B).

Tables B for all four flag sets live in ``tests/data/fsm_tables_b.md``, copied
verbatim from the reference notes; the parser below is independent of
:mod:`vfio_uapi.fsm`, so a typo in ``fsm.TABLE`` cannot hide behind itself.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator

import pytest

from fakevfio._device import Device
from fakevfio._options import DeviceSpec
from fakevfio._ram import RamDriver
from fakevfio._registry import Registry
from fakevfio._tree import ROOT_INODE, Tree
from fakevfio.errors import DeviceError
from tests.conftest import MountFactory, MountHandle
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
    pytest.param(flags, cur, new, outcome, id=f"{flags:#x}-{cur.name}-{State(new).name}")
    for flags, table in sorted(TABLES.items())
    for (cur, new), outcome in table.items()
    if new is not None
]
#: The ">=8" column: one cell per (flags, current state), each its own test.
OUT_OF_RANGE_CELLS = [
    pytest.param(flags, cur, outcome, id=f"{flags:#x}-{cur.name}-ge8")
    for flags, table in sorted(TABLES.items())
    for (cur, new), outcome in table.items()
    if new is None
]
#: How a ">=8" request is written: the first numbers past the table, a byte's
#: and a u32's largest (the uAPI field is a __u32).
OUT_OF_RANGE_TEXTS = ("8", "9\n", "255", "4294967295\n")
#: The ram driver's spelling of each flag set.
FLAG_OPTION = {
    1: "STOP_COPY",
    3: "STOP_COPY+P2P",
    5: "STOP_COPY+PRE_COPY",
    7: "STOP_COPY+P2P+PRE_COPY",
}


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
def test_fsm_path_matches_table_b(flags: int, cur: State, new: int, outcome: Outcome) -> None:
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


# -- the ">=8" column: the device and its files, cell by cell ----------------------------
#
# The kernel (drivers/vfio/vfio_main.c, vfio_mig_get_next_state) refuses a
# requested state at or past the end of its table with -EINVAL before it
# takes any arc, from every current state (from ERROR the current-state check
# refuses first, with a WARN): the device stays where it was, the driver sees
# no arc, no data_fd comes back and an open session stays open. Each cell
# below puts a device with those flags in that state and checks exactly that,
# through the file semantics in-process (fakevfio's Tree on a Device, which
# also reaches ERROR) and through migration/state under a real mount (every
# state but ERROR, which no file can reach).


def _device_in(flags: int, cur: State) -> tuple[Tree, Device, int]:
    registry = Registry({"ram": RamDriver})
    device = registry.create(DeviceSpec("d", "ram", {"size": "8K", "flags": FLAG_OPTION[flags]}))
    if cur is State.ERROR:
        device.fail_to_error()
    elif cur is State.RESUMING:
        device.set_state(State.STOP)
        device.set_state(State.RESUMING)
    elif cur is not State.RUNNING:
        device.set_state(cur)
    assert device.state is cur
    tree = Tree(registry)
    ino = ROOT_INODE
    for part in ("devices", "d", "migration", "state"):
        ino = tree.lookup(ino, part).ino
    return tree, device, ino


def _mount_in(mount: MountHandle, name: str, cur: State) -> None:
    mount.reset(name)
    if cur is State.RESUMING:
        assert mount.set_state(name, "STOP") is None
    if cur is not State.RUNNING:
        assert mount.set_state(name, cur.name) is None
    assert mount.state(name) == cur.name


@pytest.fixture(scope="module")
def ge8_mount(fakevfio_mount_module: MountFactory) -> Iterator[MountHandle]:
    specs = [f"f{flags}=ram:size=8K,flags={option}" for flags, option in FLAG_OPTION.items()]
    with fakevfio_mount_module(specs) as mount:
        yield mount


@pytest.mark.fuse
@pytest.mark.parametrize(("flags", "cur", "outcome"), OUT_OF_RANGE_CELLS)
def test_out_of_range_request_is_refused_by_the_device_and_its_files(
    ge8_mount: MountHandle, flags: int, cur: State, outcome: Outcome
) -> None:
    assert outcome == Outcome(einval=True)  # the table's word: EINVAL, no arc, no fd
    for text in OUT_OF_RANGE_TEXTS:
        where = f"flags {flags:#x}: {cur.name} -> {text.strip()}"
        # The pure parser: a number past the table never becomes a State.
        with pytest.raises(ValueError, match="out of range"):
            fsm.parse_state(text)
        # The device through its file semantics (Tree), in every state, ERROR too.
        tree, device, ino = _device_in(flags, cur)
        log_before, session_before = device.log_text(), device.session
        handle = tree.open(ino, os.O_WRONLY)
        with pytest.raises(DeviceError) as info:
            tree.write(handle, 0, text.encode())
        assert info.value.errno == errno.EINVAL, where
        assert device.state is cur, where
        assert device.log_text() == log_before, where  # the driver saw no arc
        assert device.session is session_before, where  # no new fd, none ended
        if cur is State.ERROR:
            continue  # no file reaches ERROR (the Tree above did)
        # migration/state under a real mount.
        m = ge8_mount
        name = f"f{flags}"
        _mount_in(m, name, cur)
        lines, session = m.log_lines(name), m.info(name)["session"]
        assert m.write(name, "migration/state", text) == errno.EINVAL, where
        assert m.state(name) == cur.name, where
        assert m.log_lines(name) == lines, where
        assert m.info(name)["session"] == session, where
