"""``migrator`` command line: migrate, incoming, save, load."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib.metadata
import json
import logging
import os
import re
import signal
import stat
import sys
import uuid as _uuid
from collections.abc import Sequence
from functools import partial

import attrs
import trio

from migrator._progress import TerminalProgress
from migrator.backend import DeviceBackend, FakeVfioBackend
from migrator.config import DEFAULT_MACHINE, MigrationConfig, MultifdTransfer, QemuCompat
from migrator.destination import Destination
from migrator.errors import ConfigurationError, DeviceOpError, MigrationError
from migrator.source import Source, migrate
from migrator.stats import Stats
from migrator.transport import Address, FileStream, listening_on, open_listeners, open_stream
from vfio_uapi.units import parse_size

_PCI_RE = re.compile(r"(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]")

EPILOG = """\
examples:
  migrator incoming --listen tcp:127.0.0.1:4444 /mnt/dst/devices/gpu0
  migrator migrate --to tcp:127.0.0.1:4444 --json /mnt/src/devices/gpu0
  migrator migrate --to unix:/tmp/mig.sock --multifd-channels 4 DEV1 DEV2,id=nic/vfio
  migrator save -o state.bin /mnt/src/devices/gpu0
  migrator load -i state.bin /mnt/dst/devices/gpu0
  migrator migrate --to tcp:10.0.0.2:4444 /dev/vfio/devices/vfio0     (real device, iommufd)
  migrator migrate --to tcp:10.0.0.2:4444 0000:3b:00.1                  (real device, group path)
"""


def open_device(arg: str) -> DeviceBackend:
    """Open ``DEVICE[,id=IDSTR]``: a fakevfio device dir, a cdev, or a PCI address."""
    spec, _, opts = arg.partition(",")
    idstr: str | None = None
    if opts:
        key, _, value = opts.partition("=")
        if key != "id" or not value or len(value.encode()) > 255:
            raise ConfigurationError(
                f"invalid device option {opts!r} (expected id=IDSTR, at most 255 bytes)"
            )
        idstr = value
    try:
        is_dir = stat.S_ISDIR(os.stat(spec).st_mode)
    except FileNotFoundError:
        is_dir = False
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise ConfigurationError(
                f"{spec}: the device's mount stopped answering (its fakevfio server died; "
                f"{os.strerror(exc.errno)})",
                phase="setup",
            ) from None
        is_dir = False
    if is_dir:
        return FakeVfioBackend(spec, idstr)
    if spec.startswith("/dev/vfio/") or _PCI_RE.fullmatch(spec):
        try:
            from migrator.kernel import open_device as open_kernel_device
        except ImportError as exc:
            raise ConfigurationError(f"the kernel backend is unavailable: {exc}") from exc
        return open_kernel_device(spec, idstr)
    raise ConfigurationError(
        f"{spec!r} is not a fakevfio device directory, a /dev/vfio/devices/vfioN cdev, "
        "or a PCI address"
    )


def _config(args: argparse.Namespace) -> MigrationConfig:
    try:
        uuid = _uuid.UUID(args.uuid).bytes if args.uuid else bytes(16)
    except ValueError:
        raise ConfigurationError(f"invalid --uuid {args.uuid!r}") from None
    try:
        return MigrationConfig(
            multifd_channels=args.multifd_channels,
            multifd_transfer=MultifdTransfer(args.multifd_transfer),
            switchover_ack=args.switchover_ack == "on",
            qemu_compat=QemuCompat(args.qemu_compat),
            machine=args.machine or DEFAULT_MACHINE,
            downtime_limit_ms=args.downtime_limit,
            max_queued_bytes=parse_size(args.max_queued_bytes, what="--max-queued-bytes"),
            max_bandwidth=parse_size(args.max_bandwidth, what="--max-bandwidth"),
            max_precopy_iterations=args.max_precopy_iterations,
            precopy_time_limit_s=args.precopy_time_limit,
            uuid=uuid,
            peer_timeout_s=args.peer_timeout,
        )
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migrator",
        description="Migrate VFIO device state like QEMU 10.1 (fakevfio or real /dev/vfio).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"migrator {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, live: bool) -> None:
        p.add_argument("devices", nargs="+", metavar="DEVICE", help="DEVICE[,id=IDSTR]")
        # Options that only a live migration has get None as their default, so that
        # save/load can refuse them when given (_refuse_inapplicable).
        p.add_argument(
            "--multifd-channels",
            type=int,
            default=2 if live else None,
            metavar="N",
            help="multifd channels (default: 2; live migration only)",
        )
        p.add_argument(
            "--multifd-transfer",
            choices=["on", "off", "auto"],
            default="auto",
            help="device state over the multifd channels: auto = on when channels > 0 "
            "and not a file (default: auto)",
        )
        p.add_argument(
            "--switchover-ack",
            choices=["on", "off"],
            default="on" if live else None,
            help="wait for the destination's switchover-ack (default: on; live only)",
        )
        p.add_argument(
            "--qemu-compat",
            choices=[c.value for c in QemuCompat],
            default=QemuCompat.V10_0.value if live else None,
            help="switchover-ack as which QEMU does it: 10.0 = one ACK for all devices "
            "(QEMU 10.x, and 11.1 on machine types <= 11.0); 11.1 = one per INIT_DATA_SENT, "
            "again after a REINIT (QEMU 11.1's own machine types); both sides must agree "
            "(default: 10.0; live only)",
        )
        p.add_argument(
            "--machine",
            default=None,
            metavar="TYPE",
            help="migrate/save: the machine type the stream's configuration section names "
            "(a QEMU destination wants its own, e.g. pc-q35-11.1; default: fakevfio)",
        )
        p.add_argument(
            "--downtime-limit",
            type=int,
            default=300,
            metavar="MS",
            help="switch over once the pending bytes fit this downtime (default: 300)",
        )
        p.add_argument(
            "--max-queued-bytes",
            default="64M",
            metavar="BYTES",
            help="destination bound on queued multifd bytes, all devices together, with "
            "backpressure (default: 64M)",
        )
        if live:
            p.add_argument(
                "--max-queued-buffers-size",
                default=None,
                metavar="BYTES",
                help="incoming: QEMU 10.1's x-migration-max-queued-buffers-size instead: per "
                "device, no backpressure, fails at once (default: off)",
            )
            p.add_argument(
                "--load-config-after-iter",
                choices=["on", "off"],
                default="off",
                help="QEMU 10.1's x-migration-load-config-after-iter: the config loads after "
                "DEV_CONFIG_LOAD_READY (multifd; both sides must agree; default: off, as on x86)",
            )
        p.add_argument(
            "--max-bandwidth",
            default="0",
            metavar="BYTES_PER_S",
            help="source send rate limit (default: 0 = unlimited)",
        )
        p.add_argument(
            "--max-precopy-iterations",
            type=int,
            default=100_000,
            metavar="N",
            help="switch over after N pre-copy iterations (default: 100000)",
        )
        p.add_argument(
            "--precopy-time-limit",
            type=float,
            default=60.0,
            metavar="SECONDS",
            help="switch over after this much pre-copy (default: 60)",
        )
        p.add_argument(
            "--peer-timeout",
            type=float,
            default=30.0 if live else None,
            metavar="SECONDS",
            help="give up on a peer silent this long (default: 30; live only)",
        )
        p.add_argument(
            "--uuid", default=None, help="migration UUID checked in the multifd handshake"
        )
        p.add_argument("--json", action="store_true", help="print statistics as one JSON object")
        p.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")

    for name, helptext, addr_opts in (
        ("migrate", "live source side", ("--to",)),
        ("incoming", "destination side: accept one migration, then exit", ("--listen",)),
        ("save", "save device state to a file (no multifd)", ("-o", "--output")),
        ("load", "load device state from a file", ("-i", "--input")),
    ):
        p = sub.add_parser(
            name, help=helptext, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        live = name in ("migrate", "incoming")
        p.add_argument(
            *addr_opts,
            dest="target",
            required=True,
            metavar="ADDR" if live else "FILE",
            help="tcp:HOST:PORT or unix:PATH" if live else "the state file",
        )
        common(p, live)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("fakevfio")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


#: Options of a live migration that a file save or load cannot honour.
_LIVE_ONLY = (
    ("multifd_channels", "--multifd-channels"),
    ("switchover_ack", "--switchover-ack"),
    ("peer_timeout", "--peer-timeout"),
    ("qemu_compat", "--qemu-compat"),
)


def _refuse_inapplicable(args: argparse.Namespace) -> None:
    """save/load write or read a file: refuse the options only a live migration has."""
    if args.command in ("migrate", "incoming"):
        return
    given = [flag for attr, flag in _LIVE_ONLY if getattr(args, attr) is not None]
    if given:
        raise ConfigurationError(
            f"{args.command} works on a file: {', '.join(given)} "
            f"{'applies' if len(given) == 1 else 'apply'} only to a live migration "
            "(migrate/incoming); remove it"
        )
    args.multifd_channels, args.switchover_ack, args.peer_timeout = 0, "off", 30.0
    args.qemu_compat = QemuCompat.V10_0.value


class Interrupted(MigrationError):
    """SIGINT or SIGTERM cancelled the migration; the exit status is 128 + the signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"cancelled by {signal.Signals(signum).name}")


async def _watch_signals(scope: trio.CancelScope, hit: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            hit.append(signum)
            scope.cancel()
            return


async def _amain(
    args: argparse.Namespace, config: MigrationConfig, devices: list[DeviceBackend]
) -> Stats:
    progress = TerminalProgress(args.command)  # draws only on a terminal
    interrupted: list[int] = []
    stats: Stats | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, nursery.cancel_scope, interrupted)
            nursery.start_soon(progress.run)
            stats = await _run_role(args, config, devices, progress)
            nursery.cancel_scope.cancel()
    finally:
        progress.done()  # also on failure: rich gives the terminal back its cursor
    if interrupted:
        raise Interrupted(interrupted[0])
    return stats


async def _run_role(
    args: argparse.Namespace,
    config: MigrationConfig,
    devices: list[DeviceBackend],
    progress: TerminalProgress,
) -> Stats:
    if args.command == "migrate":
        addr = Address.parse(args.target)
        return await migrate(
            config,
            devices,
            partial(open_stream, addr),
            progress=progress,
            load_config_after_iter=args.load_config_after_iter == "on",
        )
    if args.command == "save":
        config.multifd_for(is_file=True)
        out = await FileStream.open(args.target, "w")
        try:
            return await Source(
                config, devices, out, return_path=False, is_file=True, progress=progress
            ).run()
        finally:
            await out.aclose()
    if args.command == "load":
        config.multifd_for(is_file=True)
        inp = await FileStream.open(args.target, "r")
        try:
            loader = Destination(config, devices, is_file=True, progress=progress)
            progress.watch(loader)
            return await loader.run(inp)
        finally:
            await inp.aclose()
    addr = Address.parse(args.target)
    bound = args.max_queued_buffers_size
    dest = Destination(
        config,
        devices,
        progress=progress,
        max_queued_buffers_size=(
            parse_size(bound, what="--max-queued-buffers-size") if bound is not None else None
        ),
        load_config_after_iter=args.load_config_after_iter == "on",
    )
    progress.watch(dest)
    listeners = await open_listeners(addr)
    return await dest.serve(listeners, task_status=_Announce(listening_on(addr, listeners)))


@attrs.frozen
class _Announce:
    """task_status that prints where we listen (tests and scripts wait for this line)."""

    where: str

    def started(self, value: None = None) -> None:
        print(f"migrator: listening on {self.where}", file=sys.stderr, flush=True)


def _device_error_hint(exc: MigrationError, devices: Sequence[DeviceBackend]) -> str:
    """Where a fakevfio device says why it failed: its ``info`` file's ``last_error``.

    The errno of a device file (``write data failed: ENOTSUP``) is all the kernel
    passes back; the mount recorded the reason (fakevfio's ``_tree`` Rule 7).
    """
    if not isinstance(exc, DeviceOpError):
        return ""
    for dev in devices:
        if isinstance(dev, FakeVfioBackend) and exc.device in (dev.location, dev.idstr):
            return f"; the device says why: see {dev.location}/info last_error"
    return ""


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out += _leaves(sub)
        return out
    return [exc]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``migrator``; returns the exit status."""
    try:
        try:
            status = _main(argv)
        except SystemExit as exc:  # argparse: --help and --version 0, usage errors 2
            status = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
        sys.stdout.flush()  # here, so that a reader that left is a BrokenPipeError below
    except BrokenPipeError:
        # The reader left (`migrator migrate --json ... | head -c 10`): end quietly, as a
        # C tool killed by SIGPIPE does, and keep Python's exit-time flush from reporting
        # the same broken pipe again. The migration's outcome is already decided.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return status


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="migrator: %(levelname)s: %(message)s",
    )
    devices: list[DeviceBackend] = []
    stats: Stats | None = None
    error: str | None = None
    status = 1
    try:
        _refuse_inapplicable(args)
        config = _config(args)
        devices = [open_device(d) for d in args.devices]
        stats = trio.run(_amain, args, config, devices)
    except BaseException as exc:
        if args.debug:
            logging.exception("migration failed")
        leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)] or [exc]
        first = next((e for e in leaves if isinstance(e, MigrationError)), leaves[0])
        if isinstance(first, KeyboardInterrupt):
            error = "cancelled by SIGINT"
            status = 128 + signal.SIGINT
        elif isinstance(first, MigrationError):
            error = str(first) + _device_error_hint(first, devices)
            if isinstance(first, Interrupted):
                status = 128 + first.signum
        else:
            error = f"unexpected {type(first).__name__}: {first}"
    finally:
        for dev in devices:
            with contextlib.suppress(MigrationError):
                dev.close()
    if error is not None:
        print(f"migrator: error: {error}", file=sys.stderr)
        if args.json:
            failed = Stats(status="failed", error=error)
            print(json.dumps(failed.to_json()))
        return status
    assert stats is not None
    if args.json:
        print(json.dumps(stats.to_json()))
    else:
        print(
            f"migrator: {args.command} completed: {stats.transferred_bytes} bytes, "
            f"downtime {stats.downtime_ms:.1f} ms, "
            f"total {stats.to_json()['total_time_ms']:.1f} ms, "
            f"{stats.precopy_iterations} pre-copy iterations",
            file=sys.stderr,
        )
    return 0
