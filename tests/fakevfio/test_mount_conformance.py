"""migration/state writes through a real mount, generated from the kernel's tables B.

``tests/data/fsm_tables_b.md`` is a verbatim copy of the kernel reference's
tables B (all four flag sets). Every (current, requested) cell is checked
through the filesystem: final state, errno, the arcs appended to
``migration/log`` and whether a new session started (``info``'s ``session``).

A device only reaches ERROR when its driver moves it there, and no file can do
that, so the ERROR rows are checked in-process through the same file semantics
(:class:`fakevfio._tree.Tree`) on a device put in ERROR with ``fail_to_error``.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakevfio._device import Device
from fakevfio._options import DeviceSpec
from fakevfio._ram import RamDriver
from fakevfio._registry import Registry
from fakevfio._tree import ROOT_INODE, Tree
from fakevfio.errors import DeviceError
from vfio_uapi.fsm import State

TABLES = Path(__file__).parent.parent / "data" / "fsm_tables_b.md"
ABBR = {
    "ERR": "ERROR",
    "STOP": "STOP",
    "RUN": "RUNNING",
    "SC": "STOP_COPY",
    "RES": "RESUMING",
    "RP2P": "RUNNING_P2P",
    "PC": "PRE_COPY",
    "PCP2P": "PRE_COPY_P2P",
}
FLAG_OPTION = {
    1: "STOP_COPY",
    3: "STOP_COPY+P2P",
    5: "STOP_COPY+PRE_COPY",
    7: "STOP_COPY+P2P+PRE_COPY",
}
SAVING = {"PRE_COPY", "PRE_COPY_P2P", "STOP_COPY"}
#: What a ">=8" column request is written as.
OUT_OF_RANGE = ("8", "9", "4294967295")


def _label(cell: str) -> str:
    """``RP2P(5)`` -> ``RUNNING_P2P``; ``>=8`` stays."""
    word = cell.split("(")[0].strip()
    return ABBR.get(word, word)


def parse_tables() -> dict[int, dict[str, dict[str, str]]]:
    """flags -> current state -> requested column -> cell text."""
    tables: dict[int, dict[str, dict[str, str]]] = {}
    flags: int | None = None
    columns: list[str] = []
    for line in TABLES.read_text().splitlines():
        m = re.match(r"#### .*\(flags=(0x[0-9a-f]+)\)", line)
        if m:
            flags = int(m.group(1), 16)
            tables[flags] = {}
            continue
        if not line.startswith("|") or flags is None:
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].startswith("cur"):
            columns = [_label(c) for c in cells[1:]]
        elif not cells[0].startswith("-"):
            tables[flags][_label(cells[0])] = dict(zip(columns, cells[1:], strict=True))
    return tables


TABLES_B = parse_tables()


def test_tables_b_cover_every_flag_set_and_state() -> None:
    assert sorted(TABLES_B) == [1, 3, 5, 7]
    assert len(TABLES_B[7]) == 8
    assert all(len(row) == 9 for t in TABLES_B.values() for row in t.values())


def _arcs(cell: str) -> list[str]:
    path = cell.split("[")[0].strip()
    names = [ABBR[p.strip()] for p in path.split("->")]
    return [f"{a} {b}" for a, b in itertools.pairwise(names)]


def _request_texts(column: str, index: int) -> list[str]:
    if column == ">=8":
        return list(OUT_OF_RANGE)
    # Alternate names and uAPI numbers, with and without the newline.
    number = str(State[column].value)
    return [column + "\n", number] if index % 2 else [number + "\n", column]


ROWS = [
    (flags, current)
    for flags, table in sorted(TABLES_B.items())
    for current in table
    if current != "ERROR"
]


@pytest.fixture(scope="module")
def conformance_mount(fakevfio_mount_module: Any) -> Iterator[Any]:
    with fakevfio_mount_module(["seed0=ram:size=4K"]) as mount:
        for flags, current in ROWS:
            name = f"f{flags}-{current.lower()}"
            assert mount.create(name, options=f"size=8K flags={FLAG_OPTION[flags]}") is None
        yield mount


@pytest.mark.fuse
@pytest.mark.parametrize(("flags", "current"), ROWS)
def test_mount_state_write_matches_kernel_table(
    conformance_mount: Any, flags: int, current: str
) -> None:
    m = conformance_mount
    name = f"f{flags}-{current.lower()}"
    assert m.info(name)["migration_flags"] == FLAG_OPTION[flags].replace("+", " ").split()
    row = TABLES_B[flags][current]
    cases = [(col, text) for i, col in enumerate(row) for text in _request_texts(col, i)]
    cases.append(("UNKNOWN", "BOGUS\n"))
    cases.append(("UNKNOWN", "RUNNING RUNNING\n"))
    for column, text in cases:
        cell = row.get(column, "EINVAL")
        m.reset(name)
        if current == "RESUMING":
            _enter_resuming_with_valid_stream(m, name)
        elif current != "RUNNING":
            assert m.set_state(name, current) is None
        assert m.state(name) == current
        log_before = m.log_lines(name)
        session_before = m.info(name)["session"]
        where = f"flags {flags:#x}: {current} -> {text.strip()!r} (table: {cell})"

        err = m.write(name, "migration/state", text)

        log_after = m.log_lines(name)
        new_lines = log_after[len(log_before) :]
        session_after = m.info(name)["session"]
        if cell.startswith("ok"):
            assert err is None, where
            assert m.state(name) == current, where
            assert new_lines == [], where
            assert session_after == session_before, where
        elif cell == "EINVAL":
            assert err == errno.EINVAL, where
            assert m.state(name) == current, where
            refused = column not in (">=8", "UNKNOWN")
            assert new_lines == ([f"REFUSED {current} {column}"] if refused else []), where
            assert session_after == session_before, where
        else:
            arcs = _arcs(cell)
            final = arcs[-1].split()[1]
            assert err is None, where
            assert m.state(name) == final, where
            assert new_lines == arcs, where
            if "[fd NEW]" in cell:
                assert session_after is not None, where
                assert session_after != session_before, where
            elif final in SAVING:
                assert session_before is not None, where
                assert session_after == session_before, where
            else:
                assert session_after is None, where


def _enter_resuming_with_valid_stream(m: Any, name: str) -> None:
    """RESUMING with a complete stream loaded, so that RESUMING -> STOP succeeds."""
    assert m.set_state(name, "STOP_COPY") is None
    stream = m.read_bytes(m.file(name, "migration/data"))
    assert m.set_state(name, "RESUMING") is None
    fd = os.open(m.file(name, "migration/data"), os.O_WRONLY)
    try:
        assert os.write(fd, stream) == len(stream)
    finally:
        os.close(fd)


def _resolve(tree: Tree, path: str) -> int:
    ino = ROOT_INODE
    for part in path.split("/"):
        ino = tree.lookup(ino, part).ino
    return ino


@pytest.mark.parametrize("flags", sorted(TABLES_B))
def test_error_row_through_tree_file_semantics(flags: int) -> None:
    registry = Registry({"ram": RamDriver})
    device: Device = registry.create(
        DeviceSpec("e", "ram", {"size": "4K", "flags": FLAG_OPTION[flags]})
    )
    tree = Tree(registry)
    state_ino = _resolve(tree, "devices/e/migration/state")
    row = TABLES_B[flags]["ERROR"]
    for i, (column, cell) in enumerate(row.items()):
        for text in _request_texts(column, i):
            device.fail_to_error()
            log_before = device.log_text().splitlines()
            handle = tree.open(state_ino, os.O_WRONLY)
            try:
                tree.write(handle, 0, text.encode())
                err = None
            except DeviceError as exc:
                err = exc.errno
            new_lines = device.log_text().splitlines()[len(log_before) :]
            where = f"flags {flags:#x}: ERROR -> {text.strip()!r} (table: {cell})"
            assert device.state is State.ERROR, where
            if cell.startswith("ok"):
                assert err is None, where
                assert new_lines == [], where
            else:
                assert cell == "EINVAL", where
                assert err == errno.EINVAL, where
                refused = [] if column == ">=8" else [f"REFUSED ERROR {column}"]
                assert new_lines == refused, where
    device.reset()
    assert device.state is State.RUNNING
