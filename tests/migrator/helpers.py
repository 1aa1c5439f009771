"""Running the real ``migrator`` CLI between two real fakevfio mounts."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from tests.conftest import MountHandle

MIGRATOR = [sys.executable, "-m", "migrator"]

#: The arcs QEMU 10.1 requests of a source device, written from
#: reference/qemu-vfio-multifd.md section 6.2 and the kernel's shortest paths
#: (reference/linux-vfio-uapi.md tables B), keyed by the device's flags.
SOURCE_ARCS = {
    "STOP_COPY": ["RUNNING STOP", "STOP STOP_COPY", "STOP_COPY STOP"],
    "STOP_COPY+P2P": [
        "RUNNING RUNNING_P2P",
        "RUNNING_P2P STOP",
        "STOP STOP_COPY",
        "STOP_COPY STOP",
    ],
    "STOP_COPY+PRE_COPY": ["RUNNING PRE_COPY", "PRE_COPY STOP_COPY", "STOP_COPY STOP"],
    "STOP_COPY+P2P+PRE_COPY": [
        "RUNNING PRE_COPY",
        "PRE_COPY PRE_COPY_P2P",
        "PRE_COPY_P2P STOP_COPY",
        "STOP_COPY STOP",
    ],
}
#: Section 6.3: RESUMING at load setup; P2P devices start through RUNNING_P2P.
DEST_ARCS = {
    False: ["RUNNING STOP", "STOP RESUMING", "RESUMING STOP", "STOP RUNNING"],
    True: [
        "RUNNING RUNNING_P2P",
        "RUNNING_P2P STOP",
        "STOP RESUMING",
        "RESUMING STOP",
        "STOP RUNNING_P2P",
        "RUNNING_P2P RUNNING",
    ],
}
FLAG_SETS = list(SOURCE_ARCS)


@attrs.frozen
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.stdout.strip().splitlines()[-1])
        return out


def start_incoming(
    listen: str, devices: Sequence[str], *args: str, log: Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start ``migrator incoming``; return the process and the address it listens on."""
    proc = subprocess.Popen(
        [*MIGRATOR, "incoming", "--listen", listen, "--json", *args, *devices],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    line = ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stderr, selectors.EVENT_READ)
        while not line.endswith("\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                proc.kill()
                raise TimeoutError("migrator incoming did not start listening")
            ch = os.read(proc.stderr.fileno(), 1).decode()
            if not ch:
                raise RuntimeError(f"migrator incoming exited: {proc.wait()} {line}")
            line += ch
    assert line.startswith("migrator: listening on "), line
    return proc, line.split("listening on ", 1)[1].strip()


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> Result:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise
    return Result(proc.returncode, out, err)


def run_migrator(*args: str, timeout: float = 60) -> Result:
    proc = subprocess.run(
        [*MIGRATOR, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def migrate(
    listen: str,
    src: Sequence[str],
    dst: Sequence[str],
    *args: str,
    dest_args: Sequence[str] = (),
    timeout: float = 60,
) -> tuple[Result, Result]:
    """One migration through the CLI; returns (source result, destination result)."""
    incoming, addr = start_incoming(listen, dst, *args, *dest_args)
    try:
        source = run_migrator("migrate", "--to", addr, "--json", *args, *src, timeout=timeout)
    finally:
        dest = finish(incoming, timeout)
    return source, dest


def digest(mount: MountHandle, name: str) -> str:
    return str(mount.info(name)["state_digest"])


def config_bytes(mount: MountHandle, name: str) -> bytes:
    return mount.read_bytes(mount.file(name, "config"))


#: What write_config_marker programs as a guest would: PCI_COMMAND memory
#: space + bus master, and BAR0 at 0xe0000000 (aligned for any BAR up to 512 MiB).
PROGRAMMED_COMMAND = 0x0006
PROGRAMMED_BAR0 = 0xE0000000


def write_config_marker(mount: MountHandle, name: str, marker: bytes) -> None:
    """Program COMMAND and BAR0 (restored by a destination) and a marker at 0x40 (not)."""
    fd = os.open(mount.file(name, "config"), os.O_WRONLY)
    try:
        os.pwrite(fd, marker, 0x40)
        os.pwrite(fd, PROGRAMMED_COMMAND.to_bytes(2, "little"), 0x04)
        os.pwrite(fd, PROGRAMMED_BAR0.to_bytes(4, "little"), 0x10)
    finally:
        os.close(fd)
    config = config_bytes(mount, name)
    assert config[4:6] != bytes(2), config[:0x28].hex()
    assert config[0x10:0x14] != bytes(4), config[:0x28].hex()


def check_config_restored(src: bytes, dst_before: bytes, dst: bytes) -> None:
    """The destination got what QEMU's vfio_pci_load_config writes, and nothing else.

    PCI_COMMAND (0x04) and the BARs (0x10-0x27) are the source's; every other
    byte is the destination device's own (MSI/MSI-X enable bits, the rest of
    what QEMU writes, are clear on both sides here).
    """
    assert dst[0x04:0x06] == src[0x04:0x06]
    assert dst[0x10:0x28] == src[0x10:0x28]
    rest = [i for i in range(len(dst)) if not (4 <= i < 6 or 0x10 <= i < 0x28)]
    assert [dst[i] for i in rest] == [dst_before[i] for i in rest]
