"""The chaos soak (``make soak``): many migrations back and forth, faults at random phases.

Theory of operation
-------------------
Two mounts, A and B. Each round picks, from one seeded random generator, a
device mix (1..3 ``ram`` devices of 1..4 MiB with random flag sets and seeds,
no dirtying workload so a source's ``state_digest`` is comparable before and
after), a transport (tcp or unix), a channel count (single channel or multifd
with 2..4 channels), a direction (A -> B or B -> A) and, in most rounds, one
fault: an injected arc failure, a read or write error, delays, a corrupted
stream byte (device fault rules, on either side), a SIGKILL of either migrator
at a random moment, or a SIGKILL of either mount (which is then remounted
empty). Then it runs real ``migrator incoming`` and ``migrator migrate``.

After each round exactly one of these holds, or the soak counts a violation:

* **completed**: both exited 0 and every destination digest equals the
  source's digest from before the migration;
* **failed-clean**: both sides exited non-zero within their deadline (the
  killed one by its signal) and every source device is RUNNING with its
  digest from before (a SIGKILLed source migrator cannot restore its devices,
  as a killed VMM cannot: there the device must still hold its digest, and a
  reset must bring it back to RUNNING with it; when the source mount itself
  was killed, its state is gone by definition: the round counts as
  failed-clean if the destination failed in time);
* **lost source state** (a source device not RUNNING or with another digest
  after a failed migration) and **hang** (a side still running at its
  deadline: it is killed) are the two violations; both must stay at 0.

Across the soak the mounts' file descriptors, threads and RSS are sampled
after every round; the table at the end shows their first and last values
(RSS first/last/max for each mount), so a leak shows as growth; a mount whose
last RSS is over 1.5 times the peak of its first half of rounds (40 rounds or
more) is a violation. A mount's RSS rises over its first rounds (about
20 MiB in ten) and then stays level; over the same rounds its traced Python
memory and live object count (tracemalloc, gc) show no trend, so the rise is
the allocator's working set (most likely glibc's per-thread arenas for the
worker threads and freed multi-MiB buffers kept in the heap), not a leak
(``docs/guarantees.md``, section 3).

Then the ioctl fuzzer (``tests/c/ioctl_fuzz.c``, as
``tests/reliability/test_ioctl_fuzz.py`` runs it) issues ``--fuzz-ioctls``
random VFIO/iommufd ioctls under ``fakevfio run`` against a fresh mount, in
chunks of 10,000 with seeds derived from ``--seed``; after each chunk the
device's FSM invariants are checked. It prints ioctls/s, the errno
histogram, supervisor crashes, hangs and answers outside the kernel's errno
set (all three must be 0).

The exit status is 1 if a violation happened.

Usage: ``python -m benchmarks.soak [--rounds N] [--time-limit S] [--seed N]
[--fuzz-ioctls N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import attrs

from fakevfio.testing import Mount, mount

FLAG_SETS = ("STOP_COPY", "STOP_COPY+P2P", "STOP_COPY+PRE_COPY", "STOP_COPY+P2P+PRE_COPY")
#: Each migrator must be done within this many seconds (the peer timeout is 5 s).
DEADLINE_S = 45.0
PEER_TIMEOUT_S = 5
LISTENING = "migrator: listening on "
FAULT_KINDS = (
    "none",
    "arc",
    "read",
    "write",
    "delay",
    "corrupt",
    "kill-source",
    "kill-destination",
    "kill-source-mount",
    "kill-destination-mount",
)
#: Relative weights: mount kills are rare (remounting costs a second).
FAULT_WEIGHTS = (4, 3, 2, 2, 2, 2, 2, 2, 1, 1)


@attrs.frozen(kw_only=True)
class DeviceSpec:
    name: str
    flags: str
    size_mib: int
    seed: int

    def options(self) -> dict[str, str | int]:
        return {"size": f"{self.size_mib}M", "flags": self.flags, "seed": self.seed}


@attrs.frozen(kw_only=True)
class Plan:
    """One round, fully decided before it runs (so a failure can be replayed by seed)."""

    number: int
    forward: bool  # A -> B
    devices: tuple[DeviceSpec, ...]
    transport: str
    channels: int  # 0: single channel
    fault: str
    fault_side: str  # "source" or "destination" for device rules
    rule: str  # the device fault rule, if any
    kill_after_s: float

    @classmethod
    def draw(cls, rng: random.Random, number: int) -> Plan:
        devices = tuple(
            DeviceSpec(
                name=f"r{number}d{i}",
                flags=rng.choice(FLAG_SETS),
                size_mib=rng.randint(1, 4),
                seed=rng.randrange(1 << 30),
            )
            for i in range(rng.randint(1, 3))
        )
        fault = rng.choices(FAULT_KINDS, FAULT_WEIGHTS)[0]
        side = rng.choice(("source", "destination"))
        rule = _rule(rng, fault, side, devices[0])
        return cls(
            number=number,
            forward=number % 2 == 0,
            devices=devices,
            transport=rng.choice(("tcp", "unix")),
            channels=rng.choice((0, 0, 2, 3, 4)),
            fault=fault,
            fault_side=side,
            rule=rule,
            kill_after_s=rng.uniform(0.05, 1.5),
        )


def _rule(rng: random.Random, fault: str, side: str, dev: DeviceSpec) -> str:
    size = dev.size_mib << 20
    if fault == "arc":
        if side == "source":
            arcs = [("RUNNING", "STOP"), ("STOP", "STOP_COPY"), ("STOP_COPY", "STOP")]
            if "PRE_COPY" in dev.flags:
                arcs += [("RUNNING", "PRE_COPY"), ("PRE_COPY", "STOP_COPY")]
            if "P2P" in dev.flags:
                arcs += [("RUNNING", "RUNNING_P2P"), ("RUNNING_P2P", "STOP")]
        else:
            arcs = [("RUNNING", "STOP"), ("STOP", "RESUMING"), ("RESUMING", "STOP")]
            if "P2P" in dev.flags:
                arcs += [("STOP", "RUNNING_P2P"), ("RUNNING_P2P", "RUNNING")]
        cur, nxt = rng.choice(arcs)
        return f"arc {cur} {nxt} {rng.choice(('EIO', 'EINVAL', 'ENOMEM'))}"
    if fault == "read":
        return f"read EIO after {rng.randrange(size)}"
    if fault == "write":
        return f"write ENOSPC after {rng.randrange(size)}"
    if fault == "delay":
        return f"delay {rng.choice(('read', 'write', 'arc'))} {rng.randint(1, 40)}"
    if fault == "corrupt":
        return f"corrupt after {rng.randrange(64, size)}"
    return ""


@attrs.define
class Tally:
    outcomes: Counter[str] = attrs.Factory(Counter)
    faults: Counter[str] = attrs.Factory(Counter)
    violations: list[str] = attrs.Factory(list)
    slowest_failure_s: float = 0.0
    reset_after_kill: int = 0  # source devices a killed source migrator left stopped
    samples: list[tuple[int, int, int]] = attrs.Factory(list)  # fds, threads, rss KiB
    #: RSS KiB of each mount after every round, per mount generation ("A0", "B1", ...)
    rss: dict[str, list[int]] = attrs.Factory(dict)


# -- processes ------------------------------------------------------------------------------------
class Proc:
    """A migrator child whose stderr is drained by a thread (so it never blocks on a pipe)."""

    def __init__(self, argv: list[str]) -> None:
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.lines: list[str] = []
        self.listening = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.popen.stderr is not None
        with self.popen.stderr:
            for raw in self.popen.stderr:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append(line)
                if line.startswith(LISTENING):
                    self.listening.set()
        self.listening.set()

    def address(self) -> str:
        for line in self.lines:
            if line.startswith(LISTENING):
                return line[len(LISTENING) :].strip()
        return ""

    def wait(self, deadline: float) -> int | None:
        """The exit code, or None if it was still running at ``deadline`` (then killed)."""
        try:
            code = self.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            return None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signal.SIGKILL)


def _sockets(pid: int) -> int:
    """How many sockets process ``pid`` holds (0 once it is gone)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    count = 0
    for fd in fds:
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def _migrator(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrator", *args]


def _resources(m: Mount) -> tuple[int, int, int]:
    pid = m.process.pid
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return fds, threads, rss


# -- one round ------------------------------------------------------------------------------------
def run_round(plan: Plan, src: Mount, dst: Mount, workdir: Path, tally: Tally) -> str:
    """Run ``plan`` from ``src`` to ``dst``; the outcome's name (violations are recorded)."""
    for dev in plan.devices:
        src.create(dev.name, "ram", **dev.options())
        dst.create(dev.name, "ram", size=f"{dev.size_mib}M", flags=dev.flags)
    before = {d.name: src.digest(d.name) for d in plan.devices}
    if plan.rule:
        (src if plan.fault_side == "source" else dst).set_faults(plan.devices[0].name, plan.rule)
    listen = "tcp:127.0.0.1:0" if plan.transport == "tcp" else f"unix:{workdir}/r{plan.number}.sock"
    common = ["--peer-timeout", str(PEER_TIMEOUT_S), "--json"]
    if plan.channels:
        common += ["--multifd-transfer", "on", "--multifd-channels", str(plan.channels)]
    else:
        common += ["--multifd-transfer", "off"]
    started = time.monotonic()
    dest = Proc(
        _migrator(
            "incoming",
            "--listen",
            listen,
            *common,
            *(str(dst.device(d.name)) for d in plan.devices),
        )
    )
    dest.listening.wait(15)
    source = Proc(
        _migrator(
            "migrate",
            "--to",
            dest.address(),
            *common,
            *(str(src.device(d.name)) for d in plan.devices),
        )
    )
    listening_sockets = _sockets(dest.popen.pid)
    killer = _arm_killer(plan, source, dest, src, dst)
    src_code = source.wait(started + DEADLINE_S)
    if src_code not in (0, None) and _sockets(dest.popen.pid) <= listening_sockets:
        # The source failed before it ever connected (its device's mount was killed
        # under it, say): `migrator incoming` rightly waits for a source that never
        # comes. Give it the time a connection would have had, then stop it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            dest.popen.wait(PEER_TIMEOUT_S)
        if dest.popen.poll() is None and _sockets(dest.popen.pid) <= listening_sockets:
            dest.popen.terminate()
    dst_code = dest.wait(started + DEADLINE_S + PEER_TIMEOUT_S)
    if killer is not None:
        killer.cancel()
    elapsed = time.monotonic() - started
    tag = f"round {plan.number} ({plan.fault} {plan.rule!r}, {plan.transport}, ch {plan.channels})"
    if src_code is None or dst_code is None:
        side = "source" if src_code is None else "destination"
        tally.violations.append(
            f"{tag}: the {side} hung past its deadline; source said "
            f"{(source.lines or [''])[-1]!r}, destination {(dest.lines or [''])[-1]!r}"
        )
        return "hang"
    src_alive = _alive(src) and plan.fault != "kill-source-mount"
    dst_alive = _alive(dst) and plan.fault != "kill-destination-mount"
    if src_code == 0 and dst_code == 0:
        if dst_alive:
            for dev in plan.devices:
                got = dst.digest(dev.name)
                if got != before[dev.name]:
                    tally.violations.append(f"{tag}: {dev.name} completed with another digest")
                    return "lost-state"
        return "completed"
    tally.slowest_failure_s = max(tally.slowest_failure_s, elapsed)
    # One side succeeded and the other failed: only a killed peer may cause that
    # (a destination killed after it sent its result, say).
    if (src_code == 0 or dst_code == 0) and not plan.fault.startswith("kill"):
        tally.violations.append(
            f"{tag}: source exit {src_code}, destination exit {dst_code}: "
            f"{(source.lines or [''])[-1]} / {(dest.lines or [''])[-1]}"
        )
        return "lost-state"
    if src_alive:
        for dev in plan.devices:
            state, digest = src.state(dev.name), src.digest(dev.name)
            if plan.fault == "kill-source" and state != "RUNNING" and digest == before[dev.name]:
                # A SIGKILLed migrator cannot restore its devices (as a killed VMM
                # cannot): they stay where it left them with their state, and a reset
                # brings them back to RUNNING with that state.
                src.reset(dev.name)
                state, digest = src.state(dev.name), src.digest(dev.name)
                tally.reset_after_kill += 1
            if state != "RUNNING" or digest != before[dev.name]:
                if src_code == 0:
                    continue  # the source completed (the destination was killed later)
                tally.violations.append(
                    f"{tag}: source {dev.name} is {state} after a failed migration "
                    f"(digest {'kept' if digest == before[dev.name] else 'changed'}): "
                    f"{(source.lines or [''])[-1]}"
                )
                return "lost-state"
    return "failed-clean"


def _arm_killer(
    plan: Plan, source: Proc, dest: Proc, src: Mount, dst: Mount
) -> threading.Timer | None:
    targets = {
        "kill-source": source.kill,
        "kill-destination": dest.kill,
        "kill-source-mount": lambda: _kill_mount(src),
        "kill-destination-mount": lambda: _kill_mount(dst),
    }
    action = targets.get(plan.fault)
    if action is None:
        return None
    timer = threading.Timer(plan.kill_after_s, action)
    timer.daemon = True
    timer.start()
    return timer


def _alive(m: Mount) -> bool:
    return m.process.poll() is None and m.is_mounted()


def _kill_mount(m: Mount) -> None:
    with contextlib.suppress(ProcessLookupError):
        m.process.send_signal(signal.SIGKILL)


def _clean(m: Mount, plan: Plan) -> None:
    for dev in plan.devices:
        with contextlib.suppress(OSError):
            m.reset(dev.name)
        with contextlib.suppress(OSError):
            m.remove(dev.name)


# -- the ioctl fuzzer -----------------------------------------------------------------------------
FUZZ_CHUNK = 10_000
FUZZ_DEVICE = "fz"


@attrs.define
class FuzzTally:
    ioctls: int = 0
    seconds: float = 0.0
    errnos: Counter[int] = attrs.Factory(Counter)
    crashes: list[str] = attrs.Factory(list)  # the supervisor died, answered EIO or ENOSYS
    hangs: list[str] = attrs.Factory(list)
    outside: list[str] = attrs.Factory(list)  # answers outside the kernel's errno set
    broken_fsm: list[str] = attrs.Factory(list)

    def violations(self) -> list[str]:
        return self.crashes + self.hangs + self.outside + self.broken_fsm


def fuzz(total: int, seed: int, base: Path) -> FuzzTally:
    """``total`` fuzzed ioctls in chunks against one fresh device; the tally."""
    from tests.reliability import ioctl_fuzz  # the harness, its errno table and checks

    tally = FuzzTally()
    reason = ioctl_fuzz.missing()
    if reason:
        tally.crashes.append(f"the fuzzer cannot run here: {reason}")
        return tally
    exe = ioctl_fuzz.compile_fuzzer(base)
    where = base / "fuzz"
    where.mkdir()
    spec = f"ram:size=64K,flags=STOP_COPY+P2P+PRE_COPY,seed={seed & 0xFFFF}"
    with mount({FUZZ_DEVICE: spec}, base_dir=where) as m:
        done = 0
        while done < total:
            count = min(FUZZ_CHUNK, total - done)
            chunk_seed = seed * 1_000_003 + done
            t0 = time.monotonic()
            res = ioctl_fuzz.run_fuzzer(
                exe, m.path, FUZZ_DEVICE, seed=chunk_seed, count=count, timeout=600
            )
            tally.seconds += time.monotonic() - t0
            tag = f"fuzz seed {chunk_seed}"
            if res.hang:
                tally.hangs.append(f"{tag}: {res.hang}")
            elif res.returncode != 0 or res.total != count:
                tally.crashes.append(f"{tag}: exit {res.returncode}: {res.stderr[-300:]!r}")
            hist = res.errno_histogram()
            if "unexpected error" in res.stderr or hist[errno.ENOSYS]:
                tally.crashes.append(f"{tag}: the supervisor failed: {res.stderr[-300:]!r}")
            tally.outside += [f"{tag}: {v}" for v in res.violations()]
            tally.errnos += hist
            tally.ioctls += res.total
            tally.broken_fsm += [
                f"{tag}: {p}" for p in ioctl_fuzz.device_invariants(m.device(FUZZ_DEVICE))
            ]
            if not _alive(m):
                tally.crashes.append(f"{tag}: the mount died")
                break
            done += count
    return tally


def _fuzz_report(tally: FuzzTally) -> list[str]:
    rate = tally.ioctls / tally.seconds if tally.seconds else 0.0
    hist = ", ".join(
        f"{errno.errorcode.get(e, str(e)) if e else 'ok'} {n}"
        for e, n in sorted(tally.errnos.items(), key=lambda kv: -kv[1])
    )
    return [
        f"fuzzed ioctls  {tally.ioctls} in {tally.seconds:.0f} s ({rate:.0f}/s)",
        f"errnos  {hist}",
        f"supervisor crashes (must be 0)  {len(tally.crashes)}",
        f"ioctl hangs (must be 0)  {len(tally.hangs)}",
        f"answers outside the kernel's errno set (must be 0)  {len(tally.outside)}",
        f"FSM invariants broken (must be 0)  {len(tally.broken_fsm)}",
    ] + [f"VIOLATION {v}" for v in tally.violations()]


# -- the soak -------------------------------------------------------------------------------------
def soak(
    rounds: int,
    time_limit_s: float,
    seed: int,
    out: list[str] | None = None,
    only: int | None = None,
) -> Tally:
    """Run up to ``rounds`` rounds within ``time_limit_s``; print and return the tally.

    ``only`` replays one round of the seed's sequence (the plans are drawn all the same).
    """
    rng = random.Random(seed)
    tally = Tally()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fakevfio-soak-") as tmp, contextlib.ExitStack() as st:
        base = Path(tmp)
        mounts = {
            "A": st.enter_context(_remountable(base, "A")),
            "B": st.enter_context(_remountable(base, "B")),
        }
        for number in range(rounds):
            if time.monotonic() - t0 > time_limit_s:
                break
            plan = Plan.draw(rng, number)
            if only is not None and number != only:
                continue
            src_key, dst_key = ("A", "B") if plan.forward else ("B", "A")
            src, dst = mounts[src_key].current, mounts[dst_key].current
            outcome = run_round(plan, src, dst, base, tally)
            tally.outcomes[outcome] += 1
            tally.faults[plan.fault] += 1
            for key in (src_key, dst_key):
                box = mounts[key]
                if not _alive(box.current):
                    box.remount()
                    if key == "A":  # a new process: leaks are measured from here on
                        tally.samples.clear()
                else:
                    _clean(box.current, plan)
            tally.samples.append(_resources(mounts["A"].current))
            for key, box in mounts.items():
                label = f"{key}{box.generation}"
                tally.rss.setdefault(label, []).append(_resources(box.current)[2])
    _check_rss(tally)
    _report(tally, time.monotonic() - t0, seed, out)
    return tally


#: A mount's RSS may rise while its allocator warms up; after half the rounds it must be
#: level: the last sample at most this much above the highest of the first half.
RSS_GROWTH_LIMIT = 1.5
RSS_MIN_ROUNDS = 40


def _check_rss(tally: Tally) -> None:
    """A violation when a mount's RSS still grows in the second half of its rounds."""
    for label, kib in tally.rss.items():
        if len(kib) < RSS_MIN_ROUNDS:
            continue
        first_half = max(kib[: len(kib) // 2])
        if kib[-1] > first_half * RSS_GROWTH_LIMIT:
            tally.violations.append(
                f"mount {label}: RSS {kib[-1] / 1024:.0f} MiB after {len(kib)} rounds, "
                f"over {RSS_GROWTH_LIMIT}x the first half's peak {first_half / 1024:.0f} MiB "
                "(a leak?)"
            )


@attrs.define
class _Box:
    base: Path
    label: str
    stack: contextlib.ExitStack
    current: Mount
    generation: int = 0

    def remount(self) -> None:
        self.stack.close()
        self.generation += 1
        self.stack = contextlib.ExitStack()
        self.current = self.stack.enter_context(
            _fresh_mount(self.base, f"{self.label}{self.generation}")
        )


@contextlib.contextmanager
def _fresh_mount(base: Path, label: str) -> Iterator[Mount]:
    where = base / label
    where.mkdir()
    with mount({}, base_dir=where) as m:
        yield m


@contextlib.contextmanager
def _remountable(base: Path, label: str) -> Iterator[_Box]:
    stack = contextlib.ExitStack()
    box = _Box(base, label, stack, stack.enter_context(_fresh_mount(base, f"{label}0")))
    try:
        yield box
    finally:
        box.stack.close()


def _report(tally: Tally, elapsed: float, seed: int, out: list[str] | None) -> None:
    n = sum(tally.outcomes.values())
    first = tally.samples[0] if tally.samples else (0, 0, 0)
    last = tally.samples[-1] if tally.samples else (0, 0, 0)
    rows = [
        ("migrations", str(n)),
        ("faults by kind", ", ".join(f"{k} {v}" for k, v in sorted(tally.faults.items()))),
        ("completed", str(tally.outcomes["completed"])),
        ("failed-clean", str(tally.outcomes["failed-clean"])),
        ("lost source states (must be 0)", str(tally.outcomes["lost-state"])),
        ("hangs (must be 0)", str(tally.outcomes["hang"])),
        (
            "source devices a SIGKILLed source left stopped (state intact, reset)",
            str(tally.reset_after_kill),
        ),
        ("slowest failed migration", f"{tally.slowest_failure_s:.1f} s"),
        ("mount A samples (since its last remount)", str(len(tally.samples))),
        ("mount A fds first/last", f"{first[0]} / {last[0]}"),
        ("mount A threads first/last", f"{first[1]} / {last[1]}"),
        *(
            (
                f"mount {label} RSS first/last/max ({len(kib)} rounds)",
                f"{kib[0] / 1024:.1f} / {kib[-1] / 1024:.1f} / {max(kib) / 1024:.1f} MiB",
            )
            for label, kib in tally.rss.items()
            if kib
        ),
        ("wall time, seed", f"{elapsed:.0f} s, seed {seed}"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows] + [f"VIOLATION {v}" for v in tally.violations]
    if out is not None:
        out.extend(lines)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--rounds", type=int, default=300, help="at most this many migrations")
    parser.add_argument(
        "--time-limit", type=float, default=1800, help="stop after this many seconds"
    )
    parser.add_argument("--seed", type=int, default=1, help="the random generator's seed")
    parser.add_argument("--only", type=int, default=None, help="replay just this round")
    parser.add_argument(
        "--fuzz-ioctls", type=int, default=100_000, help="fuzzed ioctls after the rounds (0: none)"
    )
    args = parser.parse_args(argv)
    tally = soak(args.rounds, args.time_limit, args.seed, only=args.only)
    failed = bool(tally.violations)
    if args.fuzz_ioctls > 0:
        with tempfile.TemporaryDirectory(prefix="fakevfio-fuzz-") as tmp:
            fuzzed = fuzz(args.fuzz_ioctls, args.seed, Path(tmp))
        print("\n".join(_fuzz_report(fuzzed)))
        failed = failed or bool(fuzzed.violations())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
