"""``--qemu-compat``: QEMU 10.x's and QEMU 11.1's switchover-ack, migrator to migrator.

The device re-initialises (VFIO_PRECOPY_INFO_REINIT) right after its whole
initial data was read, so an ``11.1`` source sends INIT_DATA_SENT twice and
asks for two ACKs (tests/qemu/test_qemu_switchover_ack.py shows QEMU 11.1 doing
the same). Both sides ``11.1``: it completes; an ``11.1`` source and a ``10.0``
destination fail as QEMU would, with a message naming the option; so does an
``11.1`` source without pre-copy devices on a ``10.0`` destination, whose ACK
at OPEN_RETURN_PATH nobody asked for.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from tests.conftest import MountFactory, MountHandle
from tests.migrator.helpers import (
    MIGRATOR,
    Result,
    digest,
    finish,
    migrate,
    run_migrator,
    start_incoming,
)

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(120)]

FLAGS = "STOP_COPY+P2P+PRE_COPY"
SIZE = "2M"
DST_SPEC = f"gpu0=ram:size={SIZE},flags={FLAGS}"


def initial_bytes(mount: MountHandle, name: str) -> int:
    """The device's initial pre-copy bytes (its whole stream, header included)."""
    assert mount.set_state(name, "PRE_COPY") is None
    text = mount.read(name, "migration/precopy_info")
    mount.reset(name)
    return int(text.split()[1])


def _migrate_gpu0_as_11_1(
    src: MountHandle, dst: MountHandle, dest_args: Sequence[str] = ()
) -> tuple[Result, Result]:
    """gpu0 over one channel, both sides --qemu-compat 11.1 (``dest_args`` added last)."""
    return migrate(
        "tcp:127.0.0.1:0",
        [str(src.device("gpu0"))],
        [str(dst.device("gpu0"))],
        "--multifd-channels",
        "0",
        "--qemu-compat",
        "11.1",
        dest_args=dest_args,
    )


def _spec_reinit_late(fakevfio_mount: MountFactory) -> str:
    with fakevfio_mount([f"probe=ram:size={SIZE},flags={FLAGS},seed=4"]) as m:
        after = initial_bytes(m, "probe")
    return f"gpu0=ram:size={SIZE},flags={FLAGS},seed=4,reinit_after={after}"


def test_both_sides_11_1_migrate_a_device_that_reinitialises_after_its_init_data(
    fakevfio_mount: MountFactory,
) -> None:
    spec = _spec_reinit_late(fakevfio_mount)
    with (
        fakevfio_mount([spec]) as src,
        fakevfio_mount([f"gpu0=ram:size={SIZE},flags={FLAGS}"]) as dst,
    ):
        source, dest = _migrate_gpu0_as_11_1(src, dst)
        assert source.returncode == 0, source.stderr
        assert dest.returncode == 0, dest.stderr
        assert digest(dst, "gpu0") == digest(src, "gpu0")
        stats = source.json()["devices"]["gpu0/vfio"]
        # The re-initialised state went in pre-copy, before the switchover.
        assert stats["precopy_bytes"] > 2 * (2 << 20), stats


def test_11_1_source_to_10_0_destination_fails_on_the_second_init_data_sent(
    fakevfio_mount: MountFactory,
) -> None:
    spec = _spec_reinit_late(fakevfio_mount)
    with (
        fakevfio_mount([spec]) as src,
        fakevfio_mount([f"gpu0=ram:size={SIZE},flags={FLAGS}"]) as dst,
    ):
        source, dest = _migrate_gpu0_as_11_1(src, dst, ("--qemu-compat", "10.0"))
        assert dest.returncode != 0
        assert "switchover approved more times than needed" in dest.stderr, dest.stderr
        assert "--qemu-compat 11.1" in dest.stderr, dest.stderr
        assert source.returncode != 0
        assert src.state("gpu0") == "RUNNING"  # the failed source's device is back


def test_11_1_source_without_pre_copy_refuses_a_10_0_destinations_ack(
    fakevfio_mount: MountFactory,
) -> None:
    spec = f"gpu0=ram:size={SIZE},flags=STOP_COPY+P2P"
    with fakevfio_mount([f"{spec},seed=4"]) as src, fakevfio_mount([spec]) as dst:
        source, _ = _migrate_gpu0_as_11_1(src, dst, ("--qemu-compat", "10.0"))
        assert source.returncode != 0
        assert "Switchover ack pending num underflowed" in source.stderr, source.stderr
        assert src.state("gpu0") == "RUNNING"


@pytest.mark.parametrize("command", ["save", "load"])
def test_file_commands_refuse_qemu_compat(fakevfio_mount: MountFactory, command: str) -> None:
    with fakevfio_mount(["gpu0=ram:size=64K"]) as m:
        flag = "-o" if command == "save" else "-i"
        result = run_migrator(
            command,
            flag,
            str(m.path.parent / "x.bin"),
            "--qemu-compat",
            "11.1",
            str(m.device("gpu0")),
        )
    assert result.returncode != 0
    assert "--qemu-compat applies only to a live migration" in result.stderr, result.stderr


def test_10_0_source_names_the_option_while_an_11_1_destination_acks_nothing(
    fakevfio_mount: MountFactory,
) -> None:
    """No pre-copy device: a QEMU 11.1-style destination sends no ACK, and a 10.0
    source (QEMU 10's migration_can_switchover) waits for one; after
    ACK_WAIT_HINT_S it says why and what to use. The test stops it then."""
    spec = f"gpu0=ram:size={SIZE},flags=STOP_COPY+P2P"
    with fakevfio_mount([f"{spec},seed=4"]) as src, fakevfio_mount([spec]) as dst:
        incoming, addr = start_incoming(
            "tcp:127.0.0.1:0",
            [str(dst.device("gpu0"))],
            "--multifd-channels",
            "0",
            "--qemu-compat",
            "11.1",
        )
        source = subprocess.Popen(
            [
                *MIGRATOR,
                "migrate",
                "--to",
                addr,
                "--multifd-channels",
                "0",
                str(src.device("gpu0")),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert source.stderr is not None
            line = source.stderr.readline()  # the first thing it says
            assert "still waiting for the destination's SWITCHOVER_ACK" in line, line
            assert "--qemu-compat 11.1" in line, line
            assert source.poll() is None  # still waiting, as QEMU 10 would
        finally:
            source.terminate()
            source.communicate(timeout=30)
            incoming.kill()
            finish(incoming)
        assert src.state("gpu0") == "RUNNING"  # the interrupted source put it back
