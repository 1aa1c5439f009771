"""One migration between mounts: ``migrator incoming``, then ``migrator migrate``, both ``--json``.

:func:`migrate_devices` never leaves a migrator running: a side that does not
finish in time is killed (its stderr says so) and the run counts as failed.
Besides both parsed JSON objects, exit codes and stderr, the result carries
the wall time and each side's peak RSS (``ru_maxrss``), which benchmarks use.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs

from fakevfio.testing._mount import Mount
from fakevfio.testing._process import Child, HarnessError

#: The line ``migrator incoming`` prints on stderr once it listens.
LISTENING_PREFIX = "migrator: listening on "
DEFAULT_MIGRATION_TIMEOUT_S = 120.0


@attrs.frozen(kw_only=True)
class MigrationResult:
    """Both sides of one migration: exit codes, parsed ``--json`` objects, stderr."""

    source: dict[str, Any]
    dest: dict[str, Any]
    source_returncode: int
    dest_returncode: int
    source_stderr: str
    dest_stderr: str
    #: Where the destination listened ("" if it never did).
    address: str = ""
    #: From starting the source until both sides exited.
    wall_s: float = 0.0
    #: Peak RSS (``ru_maxrss``) of each migrator process, KiB (0 if not started).
    source_maxrss_kib: int = 0
    dest_maxrss_kib: int = 0

    @property
    def ok(self) -> bool:
        return self.source_returncode == 0 and self.dest_returncode == 0


class MigrationFailed(HarnessError):
    """A migration run by :func:`migrate` with ``check=True`` did not complete."""

    def __init__(self, result: MigrationResult) -> None:
        self.result = result
        super().__init__(
            f"migration failed (source exit {result.source_returncode}, destination exit "
            f"{result.dest_returncode}): source: {_last_line(result.source_stderr)}; "
            f"destination: {_last_line(result.dest_stderr)}"
        )


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _parse_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    return {}


def migrate_devices(
    source: Sequence[str | os.PathLike[str]],
    dest: Sequence[str | os.PathLike[str]],
    *,
    options: Sequence[str] = (),
    dest_options: Sequence[str] = (),
    listen: str = "tcp:127.0.0.1:0",
    timeout: float = DEFAULT_MIGRATION_TIMEOUT_S,
    check: bool = True,
    python: str = sys.executable,
) -> MigrationResult:
    """``migrator incoming`` on ``dest``, then ``migrator migrate`` from ``source``.

    DEVICE arguments are as the migrator takes them (device directories, with an
    optional ``,id=IDSTR``). ``options`` go to both sides (``--multifd-channels``
    and ``--switchover-ack`` must agree), ``dest_options`` only to the destination.
    Both sides run with ``--json``; each gets ``timeout`` seconds (the
    destination from when the source exited), then it is killed.

    Raises:
        MigrationFailed: with ``check=True``, when either side exits non-zero.
    """
    migrator = [python, "-m", "migrator"]
    dst_args = [os.fspath(d) for d in dest]
    src_args = [os.fspath(d) for d in source]
    incoming = Child(
        [*migrator, "incoming", "--listen", listen, "--json", *options, *dest_options, *dst_args],
        name="migrator incoming",
    )
    src: Child | None = None
    try:
        addr = incoming.wait_for_line(LISTENING_PREFIX, timeout)
        started = time.perf_counter()
        if addr:
            incoming.start_draining()
            src = Child(
                [*migrator, "migrate", "--to", addr, "--json", *options, *src_args],
                name="migrator migrate",
            )
            src.finish(timeout)
        incoming.finish(timeout if addr else 5)
        wall = time.perf_counter() - started
    except BaseException:
        for child in (src, incoming):
            if child is not None:
                child.kill()
        raise
    result = MigrationResult(
        source=_parse_json(src.stdout) if src else {},
        dest=_parse_json(incoming.stdout),
        source_returncode=_exit_code(src),
        dest_returncode=_exit_code(incoming),
        source_stderr=src.stderr if src else "source not started",
        dest_stderr=incoming.stderr,
        address=addr or "",
        wall_s=wall,
        source_maxrss_kib=src.maxrss_kib if src else 0,
        dest_maxrss_kib=incoming.maxrss_kib,
    )
    if check and not result.ok:
        raise MigrationFailed(result)
    return result


def _exit_code(child: Child | None) -> int:
    code = child.returncode if child is not None else None
    return -1 if code is None else code


def migrate(
    source: Mount,
    dest: Mount,
    names: Sequence[str] | None = None,
    **kwargs: Any,
) -> MigrationResult:
    """Migrate devices ``names`` (default: all of ``source``'s) to same-named devices.

    Keyword arguments are :func:`migrate_devices`'s.
    """
    chosen = source.device_names() if names is None else list(names)
    return migrate_devices(
        [source.device(n) for n in chosen], [dest.device(n) for n in chosen], **kwargs
    )


__all__ = [
    "DEFAULT_MIGRATION_TIMEOUT_S",
    "LISTENING_PREFIX",
    "MigrationFailed",
    "MigrationResult",
    "migrate",
    "migrate_devices",
]
