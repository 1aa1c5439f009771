"""The exact bytes of the mount's small text files, read through the pure Tree (INTERFACES 1).

The benchmarks and the migrator's fakevfio backend parse these files; a lost
newline or a changed separator breaks callers that compare whole contents.
"""

from __future__ import annotations

import os

import pytest

from fakevfio._options import DeviceSpec
from fakevfio._ram import RamDriver
from fakevfio._registry import Registry
from fakevfio._tree import ROOT_INODE, Handle, Tree
from fakevfio.driver import ArcDriver
from fakevfio.errors import DeviceError


def make_tree(flags: str = "STOP_COPY+P2P+PRE_COPY") -> Tree:
    drivers: dict[str, type[ArcDriver]] = {"ram": RamDriver}
    registry = Registry(drivers)
    registry.create(DeviceSpec.from_cli(f"d=ram:size=64K,flags={flags}"))
    return Tree(registry)


def open_path(tree: Tree, flags: int, *path: str) -> Handle:
    """The file at ``path`` (names from the root) opened with ``flags``."""
    ino = ROOT_INODE
    for name in path:
        ino = tree.lookup(ino, name).ino
    return tree.open(ino, flags)


def read(tree: Tree, *path: str) -> bytes:
    handle = open_path(tree, os.O_RDONLY, *path)
    data, _ = tree.read(handle, 0, 4096)
    tree.release(handle)
    return bytes(data)


def write(tree: Tree, text: bytes, *path: str) -> None:
    handle = open_path(tree, os.O_WRONLY, *path)
    tree.write(handle, 0, text)
    tree.release(handle)


STATE = ("devices", "d", "migration", "state")


@pytest.mark.parametrize("target", ["STOP", "RUNNING_P2P", "PRE_COPY", "STOP_COPY", "RESUMING"])
def test_tree_state_reads_its_name_and_a_newline(target: str) -> None:
    tree = make_tree()
    assert read(tree, *STATE) == b"RUNNING\n"
    if target == "RESUMING":
        write(tree, b"STOP\n", *STATE)
    write(tree, target.encode() + b"\n", *STATE)
    assert read(tree, *STATE) == target.encode() + b"\n"


def test_tree_flags_and_data_size_texts() -> None:
    tree = make_tree("STOP_COPY+P2P")
    assert read(tree, "devices", "d", "migration", "flags") == b"STOP_COPY P2P\n"
    size = read(tree, "devices", "d", "migration", "data_size")
    assert size.endswith(b"\n")
    assert int(size) > 64 * 1024  # the whole state plus the stream's headers


def test_tree_state_rejects_an_unknown_name_and_keeps_the_state() -> None:
    tree = make_tree()
    with pytest.raises(DeviceError):
        write(tree, b"SLEEPING\n", *STATE)
    assert read(tree, *STATE) == b"RUNNING\n"
