"""The ``fakevfio`` command: mount emulated devices, list drivers, unmount, run programs.

Only argument parsing, configuration and exit codes live here: domain errors
print one line on stderr and exit 1, usage errors exit 2. The FUSE adapter
(and with it pyfuse3) is imported lazily, so ``fakevfio drivers`` works on
machines without libfuse.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from fakevfio._loader import load_drivers
from fakevfio._options import DeviceSpec
from fakevfio._process import OsServices
from fakevfio._registry import Registry
from fakevfio.errors import ConfigError, FakeVfioError

logger = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class MountConfig:
    """Everything ``fakevfio mount`` needs, parsed and checked."""

    mountpoint: str
    devices: tuple[DeviceSpec, ...]
    driver_specs: tuple[str, ...]
    allow_other: bool
    debug: bool


class CliError(FakeVfioError):
    """A problem the user must fix (bad mountpoint, bad config file)."""


# -- argument parsing ---------------------------------------------------------------
_MOUNT_EPILOG = """\
example:
  fakevfio mount /tmp/fv --device gpu0=ram:size=256M,flags=STOP_COPY+P2P+PRE_COPY,seed=7
  echo STOP > /tmp/fv/devices/gpu0/migration/state

config file (--config devices.toml):
  [devices.gpu0]
  driver = "ram"
  size = "256M"
  seed = 7
"""
_DRIVERS_EPILOG = (
    "example:\n  fakevfio drivers --driver mine=mypkg.driver:MyDriver\n  fakevfio drivers --json\n"
)
_UMOUNT_EPILOG = "example:\n  fakevfio umount /tmp/fv\n"
_RUN_EPILOG = (
    "example:\n  fakevfio run --mount /tmp/fv -- migrator save -o /tmp/s.bin "
    "/dev/vfio/devices/vfio0\n"
    "exit status: COMMAND's (128 + N if a signal N killed it); 125 when fakevfio run "
    "itself fails\n(not a fakevfio mount, not enough privilege); 126/127: COMMAND cannot "
    "run / was not found\n"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fakevfio",
        description="Emulated VFIO migration devices on a FUSE filesystem.",
        epilog="example:\n  fakevfio mount /tmp/fv --device gpu0=ram:size=64M",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="DEBUG logging and full tracebacks")
    parser.add_argument("--version", action="version", version=f"fakevfio {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, epilog: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="DEBUG logging and full tracebacks",
        )
        return p

    mount = add(
        "mount", "mount emulated devices and serve them until SIGINT/SIGTERM", _MOUNT_EPILOG
    )
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    mount.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="NAME=DRIVER[:k=v,...]",
        help="create a device (repeatable)",
    )
    mount.add_argument("--config", metavar="FILE.toml", help="devices from a TOML file")
    mount.add_argument(
        "--driver",
        action="append",
        default=[],
        metavar="NAME=module:Class",
        help="load an extra driver class (repeatable)",
    )
    mount.add_argument("--allow-other", action="store_true", help="let other users see the mount")

    drivers = add("drivers", "list the available drivers and their options", _DRIVERS_EPILOG)
    drivers.add_argument(
        "--driver",
        action="append",
        default=[],
        metavar="NAME=module:Class",
        help="also load this driver class (repeatable)",
    )
    drivers.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: drivers (description, options with kind, default and "
        "help) and load errors",
    )

    umount = add("umount", "unmount a fakevfio mount", _UMOUNT_EPILOG)
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")

    run = add(
        "run", "run a program that sees the mount's devices as kernel VFIO nodes", _RUN_EPILOG
    )
    run.add_argument(
        "--mount", required=True, metavar="MOUNTPOINT", dest="mount", help="a fakevfio mount"
    )
    run.add_argument(
        "--map",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="print which /dev/vfio/devices/vfioN is which device on stderr "
        "(default: when stderr is a terminal)",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    _add_guest_verb(add)
    _add_check_verb(add)
    doctor = add(
        "doctor",
        "say what this machine lacks for mounting, fakevfio run, the QEMU tests and guests",
        "example:\n  fakevfio doctor --json\n",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


# -- check (the conformance suite: fakevfio.check) --------------------------------------

_CHECK_EPILOG = (
    "examples:\n"
    "  fakevfio check /tmp/fv/devices/gpu0\n"
    "  fakevfio check --destructive --junit-xml out.xml /dev/vfio/devices/vfio0\n"
    "  fakevfio run --mount /tmp/fv -- fakevfio check /dev/vfio/devices/vfio0\n"
    "exit status: 0 only when every selected check passes; see docs/check.md\n"
)


def _add_check_verb(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    p = add("check", "run the VFIO migration uAPI conformance checks on devices", _CHECK_EPILOG)
    p.add_argument(
        "devices", nargs="*", metavar="DEVICE", help="device dir, VFIO cdev or PCI address"
    )
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="DEVICE",
        help="a partner for the two-device round trip or a foreign stream, not checked itself",
    )
    p.add_argument("--destructive", action="store_true", help="also resets and bad resume input")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("-k", dest="pattern", metavar="PATTERN", help="only checks matching this")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per check (60)")
    p.add_argument("--slow-arc", type=float, default=1.0, help="an arc slower is a failure (1 s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--junit-xml", metavar="FILE", help="also write a JUnit XML report")


def _cmd_check(args: argparse.Namespace) -> int:
    from fakevfio import check  # lazily: only this verb needs it

    if args.list:
        for c in check.select(args.pattern, destructive=True):
            mark = " (destructive)" if c.destructive else ""
            print(f"{c.name:28} {c.description}{mark}\n{'':28} rule: {c.rule}")
        return 0
    if not args.devices:
        print("fakevfio check: give at least one DEVICE (or --list)", file=sys.stderr)
        return 2
    tty = sys.stderr.isatty()

    def progress(r: check.CheckResult) -> None:
        if tty:
            print(f"\r\033[K{r.device} {r.check}: {r.status}", end="", file=sys.stderr)

    results = check.run_checks_detached(
        args.devices,
        destructive=args.destructive,
        pattern=args.pattern,
        timeout=args.timeout,
        slow_arc_s=args.slow_arc,
        progress=progress,
        peers=args.peer,
    )
    if tty:
        print("\r\033[K", end="", file=sys.stderr)
    print(check.to_json(results) if args.json else check.table(results), flush=True)
    if args.junit_xml:
        Path(args.junit_xml).write_text(check.to_junit_xml(results))
    return 0 if results and all(r.ok for r in results) else 1


# -- guest (the guest kit: fakevfio.guest) --------------------------------------------

_GUEST_EPILOG = (
    "examples:\n"
    "  fakevfio guest build\n"
    "  fakevfio guest boot -c 'cat /sys/bus/pci/devices/*/vendor'\n"
    "  fakevfio guest boot --mount /tmp/fv --device gpu0 --script probe.sh\n"
    "packages: the kernel image linux-image-amd64 depends on and busybox-static\n"
    "(apt-get download, never installed); cache: ~/.cache/fakevfio/guest\n"
    "($XDG_CACHE_HOME, $FAKEVFIO_GUEST_CACHE); see docs/guests.md\n"
)


def _add_guest_verb(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    guest = add("guest", "build or boot a small Linux guest (the guest kit)", _GUEST_EPILOG)
    actions = guest.add_subparsers(dest="guest_action", required=True, metavar="ACTION")
    for name, help_ in (
        ("build", "build (or find in the cache) the guest image; prints it as JSON"),
        ("boot", "boot the guest, print its console, exit with its script's status"),
    ):
        p = actions.add_parser(name, help=help_, description=help_)
        source = p.add_mutually_exclusive_group()
        source.add_argument("--script", metavar="FILE", help="the shell script the guest runs")
        source.add_argument("-c", dest="command_text", metavar="TEXT", help="the script inline")
        p.add_argument("--cache", metavar="DIR", help="cache directory")
        if name == "boot":
            p.add_argument("--mount", metavar="MOUNTPOINT", help="pass this mount's devices")
            p.add_argument(
                "--device",
                action="append",
                default=[],
                metavar="NAME",
                help="a device of --mount as -device vfio-pci (repeatable)",
            )
            p.add_argument("--memory", default="256M", help="guest RAM (default 256M)")
            p.add_argument("--accel", default="auto", help="auto (default), kvm or tcg")
            p.add_argument("--workdir", metavar="DIR", help="console and log files (default: tmp)")
            p.add_argument(
                "--timeout", type=float, default=120.0, help="seconds for the script (120)"
            )


def _cmd_guest(args: argparse.Namespace) -> int:
    import contextlib
    import json
    import tempfile
    import time

    from fakevfio import guest  # lazily: it starts QEMU and brings qemu.qmp

    script = args.command_text or ""
    if args.script:
        try:
            script = Path(args.script).read_text()
        except OSError as exc:
            print(f"fakevfio guest: cannot read the script {args.script}: {exc}", file=sys.stderr)
            return 2
    if args.guest_action == "boot" and args.device and not args.mount:
        print("fakevfio guest boot: --device needs --mount MOUNTPOINT", file=sys.stderr)
        return 2
    try:
        image = guest.build_image(script, cache_dir=args.cache)
        if args.guest_action == "build":
            print(
                json.dumps(
                    {
                        "kernel": str(image.kernel),
                        "initrd": str(image.initrd),
                        "key": image.key,
                        "cached": image.cached,
                        "kernel_package": f"{image.kernel_package.name}="
                        f"{image.kernel_package.version}",
                        "busybox_package": f"{image.busybox_package.name}="
                        f"{image.busybox_package.version}",
                    },
                    indent=2,
                )
            )
            return 0
        with contextlib.ExitStack() as stack:
            workdir = args.workdir or stack.enter_context(
                tempfile.TemporaryDirectory(prefix="fakevfio-guest-")
            )
            vm = stack.enter_context(
                guest.boot(
                    image,
                    args.mount,
                    args.device,
                    workdir=workdir,
                    memory=args.memory,
                    accel=args.accel,
                    wait_ready=False,
                )
            )
            deadline = time.monotonic() + args.timeout
            shown = 0
            while True:
                lines = vm.console_lines()
                for line in lines[shown:]:
                    if line.startswith(guest.EXIT_PREFIX):
                        return int(line[len(guest.EXIT_PREFIX) :] or 1)
                    print(line, flush=True)
                shown = len(lines)
                if vm.process.poll() is not None:
                    vm.fail(f"QEMU exited with status {vm.process.returncode}")
                if time.monotonic() > deadline:
                    vm.fail(f"the script did not end within {args.timeout:g} s", timeout=True)
                time.sleep(0.05)
    except (guest.GuestError, guest.GuestBuildError) as exc:
        print(f"fakevfio guest: {exc}", file=sys.stderr)
        return 1


def _version() -> str:
    try:
        return importlib.metadata.version("fakevfio")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_DOCTOR_AREAS = {
    "mount": "fakevfio mount (FUSE)",
    "run": "fakevfio run (VFIO ioctls for QEMU)",
    "qemu": "the QEMU tests",
    "guest": "the guest kit",
}


def _cmd_doctor(args: argparse.Namespace) -> int:
    """One line per area: ok, or each problem with its fix; exit 1 if any."""
    from fakevfio._environment import doctor

    report = doctor()
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        for area, problems in report.items():
            label = _DOCTOR_AREAS[area]
            if not problems:
                print(f"ok       {label}")
            for problem in problems:
                print(f"MISSING  {label}: {problem}")
    return 1 if any(report.values()) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fakevfio``; returns the exit status."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, so that a reader that left is a BrokenPipeError below
    except BrokenPipeError:
        # The reader left (`fakevfio drivers --json | head`): end quietly, as a C tool
        # killed by SIGPIPE does (status 128 + 13), and keep Python's exit-time flush of
        # stdout from reporting the same broken pipe again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return status


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, usage errors 2
        return exc.code if isinstance(exc.code, int) else 2
    debug = bool(getattr(args, "debug", False))
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format=(
            "fakevfio: %(levelname)s: %(name)s: %(message)s" if debug else "fakevfio: %(message)s"
        ),
        stream=sys.stderr,
    )
    if not debug:
        # Driver load errors are printed by the commands, one line each.
        logging.getLogger("fakevfio._loader").setLevel(logging.CRITICAL)
    try:
        return _run_command(args, debug)
    except FakeVfioError as exc:
        if debug:
            logger.exception("failed")
        print(f"fakevfio: {exc}", file=sys.stderr)
        return 1


def _run_command(args: argparse.Namespace, debug: bool) -> int:
    if args.command == "mount":
        return _cmd_mount(args, debug)
    if args.command == "drivers":
        return _cmd_drivers(args)
    if args.command == "umount":
        return _cmd_umount(args.mountpoint)
    if args.command == "run":
        return _cmd_run(args.mount, list(args.argv), show_map=args.map)
    if args.command == "guest":
        return _cmd_guest(args)
    if args.command == "check":
        return _cmd_check(args)
    if args.command == "doctor":
        return _cmd_doctor(args)
    raise AssertionError(f"unknown command {args.command}")  # argparse checks the choices


# -- mount ----------------------------------------------------------------------------
def _devices_from_toml(path: str) -> list[DeviceSpec]:
    from fakevfio._config import parse_config

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"config {path} is not UTF-8 text (a TOML file is)") from None
    return parse_config(text, path)


def _fusermount() -> str | None:
    return shutil.which("fusermount3") or shutil.which("fusermount")


def _lazy_unmount(mountpoint: str) -> bool:
    tool = _fusermount()
    commands = ([[tool, "-u", "-z", mountpoint]] if tool else []) + [["umount", "-l", mountpoint]]
    for cmd in commands:
        try:
            done = subprocess.run(cmd, capture_output=True, check=False)
        except OSError:
            continue
        if done.returncode == 0:
            return True
    return False


def _check_mountpoint(mountpoint: str) -> None:
    try:
        os.stat(mountpoint)
        if os.path.isdir(mountpoint):
            # stat() alone may be answered from the kernel's attribute cache
            # of a mount whose server died; listing it needs the server.
            os.listdir(mountpoint)
    except FileNotFoundError:
        raise CliError(
            f"mountpoint {mountpoint} does not exist (create an empty directory)"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise CliError(f"mountpoint {mountpoint}: {exc.strerror}") from None
        print(
            f"fakevfio: {mountpoint} is a stale FUSE mount (transport endpoint is not "
            "connected, its server died); unmounting it",
            file=sys.stderr,
        )
        if not _lazy_unmount(mountpoint):
            raise CliError(
                f"mountpoint {mountpoint} is a stale mount and unmounting it failed "
                f"(try: fusermount3 -u -z {mountpoint})"
            ) from None
    path = Path(mountpoint)
    if not path.is_dir():
        raise CliError(f"mountpoint {mountpoint} is not a directory")
    if any(path.iterdir()):
        raise CliError(f"mountpoint {mountpoint} is not empty (or is already mounted)")


def _load_registry(driver_specs: Sequence[str]) -> Registry:
    loaded = load_drivers(extra_modules=driver_specs)
    for err in loaded.errors:
        print(f"fakevfio: {err}", file=sys.stderr)
    return Registry(loaded.drivers, host=OsServices())


def _cmd_mount(args: argparse.Namespace, debug: bool) -> int:
    specs: list[DeviceSpec] = []
    if args.config:
        specs.extend(_devices_from_toml(args.config))
    specs.extend(DeviceSpec.from_cli(text) for text in args.device)
    config = MountConfig(
        mountpoint=args.mountpoint,
        devices=tuple(specs),
        driver_specs=tuple(args.driver),
        allow_other=args.allow_other,
        debug=debug,
    )
    _check_mountpoint(config.mountpoint)
    registry = _load_registry(config.driver_specs)
    for spec in config.devices:
        registry.create(spec)

    import trio  # lazily: `fakevfio drivers` stays fast and trio-free

    status = 0
    try:
        trio.run(_amain_mount, config, registry)
    except* (RuntimeError, OSError) as group:  # pyfuse3.init: no /dev/fuse, not permitted, ...
        for exc in group.exceptions:
            print(f"fakevfio: cannot mount {config.mountpoint}: {exc}", file=sys.stderr)
        _explain_mount_failure(config)
        status = 1
    finally:
        for device in registry.live_devices():
            device.close()
    return status


def _explain_mount_failure(config: MountConfig) -> None:
    """After a failed mount: name what is missing and how to fix it (docs/ci.md)."""
    from fakevfio._environment import fuse_problems

    problems = fuse_problems(config.mountpoint, allow_other=config.allow_other)
    for problem in problems:
        print(f"fakevfio: {problem}", file=sys.stderr)
    if not problems:
        print(
            "fakevfio: /dev/fuse, fusermount3 and the mountpoint look fine; a security "
            "policy may deny mount (Docker's AppArmor profile does: "
            "--security-opt apparmor:unconfined), see docs/ci.md",
            file=sys.stderr,
        )


async def _amain_mount(config: MountConfig, registry: Registry) -> None:
    import trio

    from fakevfio._fuse import serve  # lazily: the only pyfuse3 importer

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery(strict_exception_groups=True) as nursery:

            async def serve_then_stop(task_status: trio.TaskStatus[None]) -> None:
                await serve(
                    config.mountpoint,
                    registry,
                    allow_other=config.allow_other,
                    debug=config.debug,
                    task_status=task_status,
                )
                nursery.cancel_scope.cancel()  # unmounted from outside

            await nursery.start(serve_then_stop)
            count = len(registry.live_devices())
            print(f"fakevfio: mounted {config.mountpoint} ({count} devices)", flush=True)
            async for signum in signals:
                logger.info("signal %d: unmounting", signum)
                nursery.cancel_scope.cancel()
                break


# -- other commands ----------------------------------------------------------------------
def _cmd_drivers(args: argparse.Namespace) -> int:
    loaded = load_drivers(extra_modules=args.driver)
    if args.json:
        report = {
            "drivers": {
                name: {
                    "description": cls.description,
                    "options": {
                        key: {"kind": opt.kind, "default": opt.default, "help": opt.help}
                        for key, opt in cls.options.items()
                    },
                }
                for name, cls in loaded.drivers.items()
            },
            "errors": [str(err) for err in loaded.errors],
        }
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    for name in sorted(loaded.drivers):
        cls = loaded.drivers[name]
        print(f"{name}: {cls.description or '(no description)'}")
        for key in sorted(cls.options):
            opt = cls.options[key]
            default = "none" if opt.default is None else opt.default
            print(f"  {key} ({opt.kind}, default {default}): {opt.help}")
    if not loaded.drivers:
        print("(no drivers loaded)")
    for err in loaded.errors:
        print(f"error: {err}")
    return 0


def _cmd_umount(mountpoint: str) -> int:
    tool = _fusermount()
    cmd = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise CliError(f"cannot run {cmd[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise CliError(f"unmounting {mountpoint} failed: {detail}")
    return 0


def _cmd_run(mountpoint: str, command: list[str], *, show_map: bool | None = None) -> int:
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(
            "fakevfio run: a COMMAND is required (fakevfio run --mount MP -- COMMAND...)",
            file=sys.stderr,
        )
        return 2
    try:
        # Lazily: optional, Linux-only (seccomp user notification).
        module = importlib.import_module("fakevfio._run")
        run_command: Callable[..., int] = module.run_command
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"fakevfio run is not available: {exc}") from None
    return run_command(mountpoint, command, show_map=show_map)


__all__ = ["MountConfig", "main"]
