"""The kernel's FSM tables B, parsed from tests/data/fsm_tables_b.md for the tests.

``fsm_tables_b.md`` is a verbatim copy of tables B of the kernel reference
notes (all four flag sets). This parser shares nothing with
:mod:`vfio_uapi.fsm`, so a typo in ``fsm.TABLE`` cannot hide behind itself.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import attrs

from vfio_uapi.fsm import State

TABLES_B = Path(__file__).resolve().parent / "data" / "fsm_tables_b.md"

ABBREV = {
    "ERR": State.ERROR,
    "STOP": State.STOP,
    "RUN": State.RUNNING,
    "SC": State.STOP_COPY,
    "RES": State.RESUMING,
    "RP2P": State.RUNNING_P2P,
    "PC": State.PRE_COPY,
    "PCP2P": State.PRE_COPY_P2P,
}


@attrs.frozen
class Outcome:
    """One cell of a table B: EINVAL, or the arcs and whether a new fd is returned."""

    einval: bool
    arcs: tuple[tuple[State, State], ...] = ()
    new_fd: bool = False


def column(head: str) -> int | None:
    """Column header ``SC(3)`` -> 3, ``>=8`` -> None."""
    if head == ">=8":
        return None
    m = re.fullmatch(r"([A-Z0-9]+)\((\d)\)", head)
    assert m, head
    assert ABBREV[m.group(1)] == int(m.group(2))
    return int(m.group(2))


def outcome_of(cur: State, text: str) -> Outcome:
    if text == "EINVAL":
        return Outcome(einval=True)
    m = re.fullmatch(r"(.+?) \[fd (NEW|-1)\]", text)
    assert m, text
    new_fd = m.group(2) == "NEW"
    if m.group(1) == "ok (no-op)":
        return Outcome(einval=False, arcs=(), new_fd=new_fd)
    states = [ABBREV[word] for word in m.group(1).split("->")]
    assert states[0] == cur, text
    return Outcome(einval=False, arcs=tuple(itertools.pairwise(states)), new_fd=new_fd)


def parse_tables_b(text: str) -> dict[int, dict[tuple[State, int | None], Outcome]]:
    """flags -> (current, requested number or None for >=8) -> outcome."""
    tables: dict[int, dict[tuple[State, int | None], Outcome]] = {}
    flags: int | None = None
    columns: list[int | None] = []
    for line in text.splitlines():
        heading = re.match(r"#### .*\(flags=0x(\d)\)", line)
        if heading:
            flags = int(heading.group(1), 16)
            tables[flags] = {}
            continue
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert flags is not None
        if cells[0] == "cur \\ new":
            columns = [column(c) for c in cells[1:]]
            continue
        m = re.fullmatch(r"([A-Z0-9]+)\((\d)\)", cells[0])
        assert m, line
        cur = State(int(m.group(2)))
        assert ABBREV[m.group(1)] is cur
        for col, cell in zip(columns, cells[1:], strict=True):
            tables[flags][(cur, col)] = outcome_of(cur, cell)
    return tables


def tables_b() -> dict[int, dict[tuple[State, int | None], Outcome]]:
    """flags -> (current state, requested number or None for >=8) -> outcome."""
    return parse_tables_b(TABLES_B.read_text(encoding="utf-8"))
