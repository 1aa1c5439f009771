"""End to end: the migrator CLI between two real fakevfio mounts.

Each case migrates ``ram`` devices with the dirtying workload on, then checks
what a user would: the destination holds the source's state (digest and
config at stop time), both sides end in the right states, and each side's
arc log is the sequence QEMU requests (tests/migrator/helpers.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MountFactory, MountHandle
from tests.migrator import wire_sender as ws
from tests.migrator.helpers import (
    DEST_ARCS,
    FLAG_SETS,
    SOURCE_ARCS,
    check_config_restored,
    config_bytes,
    digest,
    migrate,
    run_migrator,
    write_config_marker,
)

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(120)]
_names = itertools.count()
#: Each destination device's config before it was migrated into.
DST_CONFIG: dict[str, bytes] = {}


@pytest.fixture(scope="module")
def mounts(fakevfio_mount_module: MountFactory) -> Iterator[tuple[MountHandle, MountHandle]]:
    with fakevfio_mount_module([]) as src, fakevfio_mount_module([]) as dst:
        yield src, dst


def _pair(
    mounts: tuple[MountHandle, MountHandle], flags: str, *, size: str = "4M", dirty: str = "2M"
) -> tuple[str, str]:
    """Create a fresh source/destination device pair with the same id."""
    src, dst = mounts
    name = f"dev{next(_names)}"
    assert src.create(name, "ram", f"size={size} flags={flags} seed=11 dirty_rate={dirty}") is None
    assert dst.create(name, "ram", f"size={size} flags={flags}") is None
    write_config_marker(src, name, f"cfg-{name}".encode())
    DST_CONFIG[name] = config_bytes(dst, name)
    return name, name


def _check(mounts: tuple[MountHandle, MountHandle], names: list[str], flags: list[str]) -> None:
    src, dst = mounts
    for name, flag in zip(names, flags, strict=True):
        assert src.state(name) == "STOP"
        assert dst.state(name) == "RUNNING"
        assert digest(dst, name) == digest(src, name)
        # Only COMMAND and the BARs travel (QEMU's vfio_pci_load_config), not the marker.
        check_config_restored(config_bytes(src, name), DST_CONFIG[name], config_bytes(dst, name))
        assert f"cfg-{name}".encode() not in config_bytes(dst, name)
        assert src.log_lines(name) == SOURCE_ARCS[flag]
        assert dst.log_lines(name) == DEST_ARCS["P2P" in flag]


@pytest.mark.parametrize("flags", FLAG_SETS)
@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("multifd", ["off", "on"])
def test_migrate_each_flag_set(
    mounts: tuple[MountHandle, MountHandle],
    tmp_path: Path,
    flags: str,
    transport: str,
    multifd: str,
) -> None:
    src, dst = mounts
    name, _ = _pair(mounts, flags)
    listen = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/m.sock"
    opts = ["--multifd-transfer", multifd, "--multifd-channels", "3"]
    source, dest = migrate(listen, [str(src.device(name))], [str(dst.device(name))], *opts)
    assert source.returncode == 0, source.stderr
    assert dest.returncode == 0, dest.stderr
    stats = source.json()
    assert stats["status"] == "completed"
    counts = stats["devices"][f"{name}/vfio"]
    # QEMU's blob (the independent model's bytes count): 4 + 256 + 16 + the MSI-X
    # table and PBA, in both modes.
    blob = len(ws.qemu_config_blob(config_bytes(src, name)))
    assert blob > 4 + 256 + 16
    assert counts["config_bytes"] == blob
    if "PRE_COPY" in flags:
        assert stats["precopy_iterations"] >= 1
        assert counts["precopy_bytes"] >= 4 << 20  # the whole state went in pre-copy
    else:
        assert counts["precopy_bytes"] == 0
    # Each side counts what it saw: the same bytes, the same devices (issue 18).
    received = dest.json()
    assert received["transferred_bytes"] == stats["transferred_bytes"]
    assert received["devices"] == stats["devices"]
    assert received["setup_time_ms"] > 0
    _check(mounts, [name], [flags])


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_save_and_load_through_a_file(
    mounts: tuple[MountHandle, MountHandle], tmp_path: Path, flags: str
) -> None:
    src, dst = mounts
    name, _ = _pair(mounts, flags)
    path = tmp_path / "state.bin"
    saved = run_migrator("save", "-o", str(path), "--json", str(src.device(name)))
    assert saved.returncode == 0, saved.stderr
    assert path.stat().st_size > 4 << 20
    loaded = run_migrator("load", "-i", str(path), "--json", str(dst.device(name)))
    assert loaded.returncode == 0, loaded.stderr
    # load counts every byte of the file, the first read too (issue 18: it said 487 of 66023)
    assert saved.json()["transferred_bytes"] == path.stat().st_size
    assert loaded.json()["transferred_bytes"] == path.stat().st_size
    assert loaded.json()["devices"] == saved.json()["devices"]
    _check(mounts, [name], [flags])


def test_stop_copy_device_next_to_a_finished_precopy_device_switches_over(
    mounts: tuple[MountHandle, MountHandle],
) -> None:
    """Found by the soak: with nothing left for pre-copy, the source iterated (idle,
    measuring no bandwidth) until --precopy-time-limit instead of switching over."""
    src, dst = mounts
    pre = "STOP_COPY+PRE_COPY"
    names = [_pair(mounts, "STOP_COPY+P2P", dirty="0")[0], _pair(mounts, pre, dirty="0")[0]]
    started = time.monotonic()
    source, dest = migrate(
        "tcp:127.0.0.1:0",
        [str(src.device(n)) for n in names],
        [str(dst.device(n)) for n in names],
        "--multifd-transfer",
        "off",
        "--precopy-time-limit",
        "30",
    )
    assert source.returncode == 0, source.stderr
    assert dest.returncode == 0, dest.stderr
    assert time.monotonic() - started < 15
    assert source.json()["forced_switchover"] is False
    _check(mounts, names, ["STOP_COPY+P2P", pre])


def test_many_devices_multifd_four_channels(
    mounts: tuple[MountHandle, MountHandle], tmp_path: Path
) -> None:
    src, dst = mounts
    flags = ["STOP_COPY+P2P+PRE_COPY", "STOP_COPY+P2P", "STOP_COPY+P2P+PRE_COPY", "STOP_COPY+P2P"]
    names = [_pair(mounts, f, size="6M")[0] for f in flags]
    source, dest = migrate(
        "tcp:127.0.0.1:0",
        [str(src.device(n)) for n in names],
        [str(dst.device(n)) for n in names],
        "--multifd-channels",
        "4",
        "--multifd-transfer",
        "on",
    )
    assert source.returncode == 0, source.stderr
    assert dest.returncode == 0, dest.stderr
    _check(mounts, names, flags)


def test_custom_ids_match_devices_with_different_names(
    mounts: tuple[MountHandle, MountHandle], tmp_path: Path
) -> None:
    src, dst = mounts
    a, _ = _pair(mounts, "STOP_COPY+P2P")
    b, _ = _pair(mounts, "STOP_COPY+P2P")
    # Cross the names over: ids decide which destination device gets which state.
    source, dest = migrate(
        f"unix:{tmp_path}/x.sock",
        [f"{src.device(a)},id=first", f"{src.device(b)},id=second"],
        [f"{dst.device(b)},id=second", f"{dst.device(a)},id=first"],
    )
    assert source.returncode == 0, source.stderr
    assert dest.returncode == 0, dest.stderr
    assert digest(dst, a) == digest(src, a)
    assert digest(dst, b) == digest(src, b)


def test_precopy_converges_with_a_moderate_dirty_rate(
    mounts: tuple[MountHandle, MountHandle], tmp_path: Path
) -> None:
    src, dst = mounts
    name, _ = _pair(mounts, "STOP_COPY+P2P+PRE_COPY", size="8M", dirty="1M")
    # A 64 MiB/s link: the device dirties 1 MiB/s, so pre-copy converges on its own.
    source, dest = migrate(
        f"unix:{tmp_path}/c.sock",
        [str(src.device(name))],
        [str(dst.device(name))],
        "--max-bandwidth",
        "64M",
    )
    assert source.returncode == 0, source.stderr
    assert dest.returncode == 0, dest.stderr
    stats = source.json()
    assert stats["forced_switchover"] is False
    _check(mounts, [name], ["STOP_COPY+P2P+PRE_COPY"])


def test_precopy_above_link_rate_still_completes(
    mounts: tuple[MountHandle, MountHandle], tmp_path: Path
) -> None:
    src, dst = mounts
    name, _ = _pair(mounts, "STOP_COPY+P2P+PRE_COPY", size="8M", dirty="64M")
    # The device dirties 64 MiB/s over a 16 MiB/s link: only the bound ends pre-copy.
    source, dest = migrate(
        f"unix:{tmp_path}/d.sock",
        [str(src.device(name))],
        [str(dst.device(name))],
        "--max-bandwidth",
        "16M",
        "--downtime-limit",
        "10",
        "--precopy-time-limit",
        "2",
        timeout=90,
    )
    assert source.returncode == 0, source.stderr
    assert dest.returncode == 0, dest.stderr
    stats = source.json()
    assert stats["forced_switchover"] is True
    assert stats["precopy_iterations"] > 1
    _check(mounts, [name], ["STOP_COPY+P2P+PRE_COPY"])
