"""The benchmark scenarios. Each returns a list of :class:`Figure`."""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from benchmarks.harness import (
    FLOOR_PIDS,
    BenchError,
    GiB,
    MiB,
    build_ioctl_rate,
    dd_pipe,
    dd_read,
    dd_write,
    floor_mounted,
    ioctl_rates,
    log,
    migrate,
    missing_tools,
    mounted,
    open_read_close,
    pread_op,
    rate,
    size_text,
)
from benchmarks.qemu import QEMU, qemu_migration, qemu_missing
from benchmarks.report import Figure
from fakevfio.testing import MigrationResult


@attrs.frozen
class Scale:
    name: str
    div: int  # every size is divided by this
    repeats: int  # repeated timings (the median is reported)

    def size(self, full: int) -> int:
        return max(4096, full // self.div)

    @property
    def tiny(self) -> bool:
        return self.div > 1


SCALES = {"full": Scale("full", 1, 3), "tiny": Scale("tiny", 64, 1)}


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else 0.0


def _ram(name: str, size: int, **opts: object) -> str:
    parts = [f"size={size_text(size)}"] + [f"{k}={v}" for k, v in opts.items() if v is not None]
    return f"{name}=ram:{','.join(parts)}"


def _stream_bytes(run: MigrationResult) -> int:
    return sum(
        int(d.get("stopcopy_bytes", 0)) + int(d.get("precopy_bytes", 0))
        for d in run.source["devices"].values()
    )


def _multifd(channels: int) -> list[str]:
    return ["--multifd-channels", str(channels), "--multifd-transfer", "on"]


def _ratio_fig(
    scenario: str,
    name: str,
    num: float,
    den: float,
    den_name: str,
    floor: float | None = None,
    ceil: float | None = None,
    unit: str = "MB/s",
) -> Figure:
    ratio = num / den if den else None
    target, ok = "", None
    if floor is not None and ratio is not None:
        target, ok = f">= {floor:.2f}x", ratio >= floor
    if ceil is not None and ratio is not None:
        target, ok = f"<= {ceil:.2f}x", ratio <= ceil
    return Figure(scenario, name, num, unit, f"{den_name} {den:,.0f} {unit}", ratio, target, ok)


#: CPU time below this (clock ticks are 10 ms) is too coarse to report per GiB.
MIN_CPU_COUNTED_S = 0.5


# -- 1. stop-copy throughput ----------------------------------------------------------------
def stopcopy(base: Path, scale: Scale) -> list[Figure]:
    """The data path against the FUSE floor and the device's own read- and write-alone rates.

    Every method runs once per round, rounds interleaved, medians reported:
    the floor's read and write, ``migration/data`` read alone (to /dev/null) and
    write alone (a saved stream from /dev/shm), ``dd | dd iflag=fullblock`` and
    the migrator (one channel, multifd 2 and 4).
    """
    sc = "stopcopy"
    size = scale.size(1 * GiB)
    if "dd" in missing_tools():
        raise BenchError("stopcopy needs dd (apt-get install -y coreutils)")
    src_spec = [_ram("a", size, seed=1, flags="STOP_COPY")]
    dst_spec = [_ram("a", size, flags="STOP_COPY")]
    log(f"stopcopy: mounting the FUSE floor and 2 x {size_text(size)}")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with (
        floor_mounted(base, size) as floor,
        mounted(base, src_spec) as src,
        mounted(base, dst_spec) as dst,
        tempfile.NamedTemporaryFile(dir=shm, prefix="fakevfio-bench-stream-") as saved,
    ):
        src.set_state("a", "STOP")
        reference = src.digest("a")
        src.set_state("a", "STOP_COPY")
        stream_bytes, _ = dd_write(src.device("a") / "migration" / "data", Path(saved.name))
        src.set_state("a", "RUNNING")
        times: dict[str, list[float]] = {}
        nbytes: dict[str, int] = {}
        src_data = src.device("a") / "migration" / "data"
        dst_data = dst.device("a") / "migration" / "data"

        def saving(copy: Callable[[], tuple[int, float]]) -> tuple[int, float]:
            src.set_state("a", "STOP_COPY")
            try:
                return copy()
            finally:
                src.set_state("a", "RUNNING")

        def loading(copy: Callable[[], tuple[int, float]]) -> tuple[int, float]:
            dst.set_state("a", "RESUMING")
            result = copy()
            dst.set_state("a", "RUNNING")  # validates the stream
            return result

        def mig(args: list[str]) -> tuple[int, float]:
            run = migrate(src, dst, ["a"], args)
            src.set_state("a", "RUNNING")
            return _stream_bytes(run), run.source["total_time_ms"] / 1000

        mib = size // MiB
        #: whose CPU time a method's serving daemon spends (the floor's, or the mount's)
        daemons = {
            "floor read": FLOOR_PIDS[floor],
            "floor write": FLOOR_PIDS[floor],
            "floor ram read": FLOOR_PIDS[floor],
            "floor ram write": FLOOR_PIDS[floor],
            "read alone": src.pid,
            "write alone": dst.pid,
        }
        cpu: dict[str, list[float]] = {}  # ms per GiB, per run
        cpu_total: dict[str, float] = {}  # s, over the runs
        # The floor's writes take the same saved stream from memory as "write alone"
        # does, so dd's own reading costs both the same; /dev/zero (dd clears its
        # buffer instead of copying a GiB) is kept for comparison with earlier runs.
        methods: dict[str, Callable[[], tuple[int, float]]] = {
            "floor read": lambda: dd_read(floor / "data"),
            "floor write": lambda: dd_write(Path(saved.name), floor / "data"),
            "floor write /dev/zero": lambda: dd_write("/dev/zero", floor / "data", count_mib=mib),
            "floor ram read": lambda: dd_read(floor / "ram"),
            "floor ram write": lambda: dd_write(Path(saved.name), floor / "ram"),
            "read alone": lambda: saving(lambda: dd_read(src_data)),
            "write alone": lambda: loading(lambda: dd_write(Path(saved.name), dst_data)),
            "dd | dd": lambda: saving(lambda: loading(lambda: dd_pipe(src_data, dst_data))),
            "migrator 1ch": lambda: mig(["--multifd-transfer", "off"]),
            "migrator multifd 2": lambda: mig(_multifd(2)),
            "migrator multifd 4": lambda: mig(_multifd(4)),
        }
        for rep in range(scale.repeats):
            for label, fn in methods.items():
                log(f"stopcopy: {label} (run {rep + 1}/{scale.repeats})")
                pid = daemons.get(label)
                cpu0 = _cpu_seconds(pid) if pid is not None else 0.0
                n, secs = fn()
                if pid is not None and n:
                    used = _cpu_seconds(pid) - cpu0
                    cpu.setdefault(label, []).append(used * 1000 * GiB / n)
                    cpu_total[label] = cpu_total.get(label, 0.0) + used
                times.setdefault(label, []).append(secs)
                nbytes[label] = n
                checked = rep == 0 and label in ("write alone", "dd | dd", "migrator 1ch")
                if checked and dst.digest("a") != reference:
                    raise BenchError(f"stopcopy: {label}: destination digest differs")
    mbps = {k: _mbps(nbytes[k], statistics.median(v)) for k, v in times.items()}
    note = (
        f"{size_text(size)} device ({stream_bytes:,} stream bytes), flags=STOP_COPY, 1 MiB "
        f"requests, median of {scale.repeats} interleaved rounds"
    )
    figs = [
        Figure(sc, "FUSE floor read (baseline)", mbps["floor read"], "MB/s", note=note),
        Figure(
            sc,
            "FUSE floor write (baseline)",
            mbps["floor write"],
            "MB/s",
            note="dd reads the saved stream from /dev/shm, as for write alone",
        ),
        _ratio_fig(
            sc,
            "FUSE floor write from /dev/zero (earlier runs' baseline)",
            mbps["floor write /dev/zero"],
            mbps["floor write"],
            "floor write",
        ),
        Figure(
            sc,
            "FUSE floor RAM file read (baseline)",
            mbps["floor ram read"],
            "MB/s",
            note=f"the floor's file of {size_text(size)} in memory: a read is a view at its "
            "offset, a write a copy there (as many distinct bytes as the device's state)",
        ),
        Figure(sc, "FUSE floor RAM file write (baseline)", mbps["floor ram write"], "MB/s"),
        _ratio_fig(
            sc,
            "migration/data read alone",
            mbps["read alone"],
            mbps["floor read"],
            "floor read",
            floor=0.8,
        ),
        _ratio_fig(
            sc,
            "migration/data write alone",
            mbps["write alone"],
            mbps["floor write"],
            "floor write",
            floor=0.8,
        ),
        _ratio_fig(
            sc,
            "migration/data read alone vs the RAM file",
            mbps["read alone"],
            mbps["floor ram read"],
            "floor RAM read",
        ),
        _ratio_fig(
            sc,
            "migration/data write alone vs the RAM file",
            mbps["write alone"],
            mbps["floor ram write"],
            "floor RAM write",
        ),
    ]
    # The daemon's CPU time per GiB served: less sensitive than MB/s to other work
    # on the machine (it counts only the daemon's own running time), so it shows
    # what the data path costs next to the floor when the rates are noisy.
    per_gib = {k: statistics.median(v) for k, v in cpu.items()}
    for label, den in (
        ("read alone", "floor read"),
        ("write alone", "floor write"),
        ("read alone", "floor ram read"),
        ("write alone", "floor ram write"),
    ):
        vs = " vs the RAM file" if "ram" in den else ""
        name = f"migration/data {label}: daemon CPU per GiB{vs}"
        counted = min(cpu_total.get(label, 0.0), cpu_total.get(den, 0.0))
        if counted < MIN_CPU_COUNTED_S:
            figs.append(
                Figure(sc, name, None, "ms", note=f"skipped: under {MIN_CPU_COUNTED_S} s counted")
            )
            continue
        ours, floor_ms = per_gib[label], per_gib[den]
        figs.append(
            Figure(
                sc,
                name,
                ours,
                "ms",
                f"{den} {floor_ms:,.0f} ms",
                floor_ms / ours if ours else None,
                note="ratio = the floor's CPU / ours (1.0x: as cheap as the floor); "
                "utime+stime of the serving process, clock ticks",
            )
        )
    alone = min(mbps["read alone"], mbps["write alone"])
    figs.extend(
        _ratio_fig(
            sc,
            label + (" iflag=fullblock" if label == "dd | dd" else ""),
            mbps[label],
            alone,
            "min(alone)",
            floor=None if label == "dd | dd" else 0.85,
        )
        for label in ("dd | dd", "migrator 1ch", "migrator multifd 2", "migrator multifd 4")
    )
    for fig in figs:
        if fig.name.startswith("migrator"):
            fig.point = ("throughput", "migrator", 1 if "1ch" in fig.name else int(fig.name[-1]))
    figs.extend(
        Figure(sc, "", alone, "MB/s", point=("throughput", "min(read, write alone)", x))
        for x in (1, 2, 4)
    )
    return figs


# -- 2. downtime scaling --------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: Device-bound downtime is within this of the model for these K (the issue's goal).
DOWNTIME_BAND = 0.05
DOWNTIME_GOAL_KS = (1, 2, 4)


def downtime(base: Path, scale: Scale) -> list[Figure]:
    """Device-bound downtime against the device-speed model, K devices of one size each.

    The model: each device's stream at its ``read_bandwidth``; single channel saves
    the devices one after another (K x size / bw), multifd K saves them in parallel
    (size / bw). The source mount's CPU time per migration says what K costs.
    """
    sc = "downtime"
    size = scale.size(256 * MiB)
    # Low enough that the two cores are not the bottleneck: reads stay device-bound.
    bw = 16 * MiB if scale.tiny else 64 * MiB
    ks = [1, 2] if scale.tiny else [1, 2, 4, 8]
    figs: list[Figure] = []
    for k in ks:
        names = [f"d{i}" for i in range(k)]
        src_spec = [
            _ram(n, size, seed=i + 1, flags="STOP_COPY", read_bandwidth=size_text(bw))
            for i, n in enumerate(names)
        ]
        dst_spec = [_ram(n, size, flags="STOP_COPY") for n in names]
        log(f"downtime: K={k}: mounting 2 x {k} x {size_text(size)} (read {size_text(bw)}/s)")
        with mounted(base, src_spec) as src, mounted(base, dst_spec) as dst:
            res: dict[str, list[float]] = {"single": [], "multifd": []}
            cpu: dict[str, list[float]] = {"single": [], "multifd": []}
            modes = {
                "single": ["--multifd-transfer", "off"],
                "multifd": ["--multifd-channels", str(k), "--multifd-transfer", "on"],
            }
            for rep in range(scale.repeats):
                for mode, args in modes.items():
                    log(f"downtime: K={k} {mode} (run {rep + 1}/{scale.repeats})")
                    c0 = _cpu_seconds(src.pid)
                    run = migrate(src, dst, names, args)
                    cpu[mode].append(_cpu_seconds(src.pid) - c0)
                    res[mode].append(run.source["downtime_ms"])
                    for n in names:
                        src.set_state(n, "RUNNING")
        model = size / bw * 1000
        goal = k in DOWNTIME_GOAL_KS
        for mode, label, ideal in (
            ("single", "single channel", k * model),
            ("multifd", f"multifd {k} ch", model),
        ):
            value = statistics.median(res[mode])
            ratio = value / ideal
            figs.append(
                Figure(
                    sc,
                    f"K={k} {label} downtime",
                    value,
                    "ms",
                    f"model {ideal:,.0f} ms",
                    ratio,
                    f"{1 - DOWNTIME_BAND:.2f}-{1 + DOWNTIME_BAND:.2f}x" if goal else "",
                    abs(ratio - 1) <= DOWNTIME_BAND if goal else None,
                    note=f"source mount CPU {statistics.median(cpu[mode]):.2f} s per migration "
                    f"({k} x {size_text(size)} at read_bandwidth {size_text(bw)}/s, "
                    f"{os.cpu_count()} cores)",
                    point=("downtime", label.replace(f" {k} ch", ""), k),
                )
            )
            figs.append(
                Figure(sc, "", ideal, "ms", point=("downtime", f"model {label.split()[0]}", k))
            )
    return [f for f in figs if f.name] + [f for f in figs if not f.name]


# -- 3. destination memory ------------------------------------------------------------------
def memory(base: Path, scale: Scale) -> list[Figure]:
    sc = "memory"
    size = scale.size(1 * GiB)
    ndev = 4
    names = [f"m{i}" for i in range(ndev)]
    src_spec = [_ram(n, size, seed=i + 1, flags="STOP_COPY") for i, n in enumerate(names)]
    src_spec.append(_ram("small", 1 * MiB, seed=9, flags="STOP_COPY"))
    dst_spec = [_ram(n, size, flags="STOP_COPY") for n in names]
    dst_spec.append(_ram("small", 1 * MiB, flags="STOP_COPY"))
    limit_mib = 256
    figs: list[Figure] = []
    log(f"memory: mounting 2 x {ndev} x {size_text(size)}")
    with mounted(base, src_spec) as src, mounted(base, dst_spec) as dst:
        modes = {
            "multifd 4ch": ["--multifd-channels", "4", "--multifd-transfer", "on"],
            "single channel": ["--multifd-transfer", "off"],
        }
        for mode, args in modes.items():
            peaks: dict[str, float] = {}
            for label, devs in (
                ("1 MiB", ["small"]),
                (size_text(size), names[:1]),
                (size_text(size * ndev), names),
            ):
                log(f"memory: {mode}, {label} of state")
                run = migrate(src, dst, devs, args)
                for n in devs:
                    src.set_state(n, "RUNNING")
                peaks[label] = run.dest_maxrss_kib / 1024
            small, one, four = peaks.values()
            one_label, four_label = size_text(size), size_text(size * ndev)
            figs.append(Figure(sc, f"{mode}: dest peak RSS, 1 MiB state (baseline)", small, "MiB"))
            for label, value in ((one_label, one), (four_label, four)):
                figs.append(
                    Figure(
                        sc,
                        f"{mode}: dest peak RSS, {label} state",
                        value,
                        "MiB",
                        f"1 MiB state {small:,.0f} MiB",
                        value / small,
                        f"< {limit_mib} MiB",
                        value < limit_mib,
                    )
                )
            figs.append(
                Figure(
                    sc,
                    f"{mode}: growth {four_label} vs {one_label}",
                    four,
                    "MiB",
                    f"{one_label} state {one:,.0f} MiB",
                    four / one,
                    "<= 1.25x",
                    four / one <= 1.25,
                )
            )
    figs[0].note = "peak RSS = ru_maxrss of the migrator incoming process (wait4)"
    return figs


# -- 4. many devices --------------------------------------------------------------------------
def scale_devices(base: Path, scale: Scale) -> list[Figure]:
    sc = "scale"
    size = scale.size(16 * MiB)
    total = 8 if scale.tiny else 64
    few = 2 if scale.tiny else 8
    channels = 8
    names = [f"s{i:02d}" for i in range(total)]
    src_spec = [_ram(n, size, seed=i + 1, flags="STOP_COPY") for i, n in enumerate(names)]
    dst_spec = [_ram(n, size, flags="STOP_COPY") for n in names]
    args = ["--multifd-channels", str(channels), "--multifd-transfer", "on"]
    log(f"scale: mounting 2 x {total} x {size_text(size)}")
    res: dict[int, list[MigrationResult]] = {few: [], total: []}
    with mounted(base, src_spec) as src, mounted(base, dst_spec) as dst:
        for rep in range(scale.repeats):
            for k in (few, total):
                log(f"scale: {k} devices, {channels} channels (run {rep + 1}/{scale.repeats})")
                devs = names[:k]
                run = migrate(src, dst, devs, args)
                res[k].append(run)
                for n in names[:k]:
                    src.set_state(n, "RUNNING")

    def med(k: int, key: str) -> float:
        return statistics.median(float(r.source[key]) for r in res[k])

    figs = []
    for key, label in (
        ("total_time_ms", "total time"),
        ("downtime_ms", "downtime"),
        ("setup_time_ms", "setup time"),
    ):
        a, b = med(few, key), med(total, key)
        figs.append(Figure(sc, f"{few} devices {label}", a, "ms"))
        growth = b / a if a else None
        target, ok = "", None
        if key == "total_time_ms" and growth is not None:
            target, ok = f"<= {total / few:.1f}x (linear)", growth <= total / few
        figs.append(
            Figure(
                sc,
                f"{total} devices {label}",
                b,
                "ms",
                f"{few} devices {a:,.1f} ms",
                growth,
                target,
                ok,
            )
        )
    figs[0].note = (
        f"{size_text(size)} per device, {channels} multifd channels, "
        f"{total // few}x the devices and data"
    )
    return figs


# -- 5. state machine rate and pre-copy convergence --------------------------------------------
def _write(path: Path | str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(path: Path | str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def fsm(base: Path, scale: Scale) -> list[Figure]:
    sc = "fsm"
    cycles = 100 if scale.tiny else 2000
    pre_size = scale.size(128 * MiB)
    rate = scale.size(8 * MiB)
    bw = scale.size(256 * MiB)
    figs: list[Figure] = []
    rounds = 1 if scale.tiny else 5
    log("fsm: mounting (one device, nothing else running)")
    with mounted(base, [_ram("f", 4096, flags="STOP_COPY")]) as one:
        state = one.device("f") / "migration" / "state"
        flags = one.device("f") / "migration" / "flags"
        rates: dict[str, list[float]] = {"fsm": [], "fuse": [], "tmpfs": []}
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.NamedTemporaryFile(dir=shm) as tmp:
            for rnd in range(rounds):
                log(f"fsm: {cycles} RUNNING<->STOP cycles and baselines (round {rnd + 1}/{rounds})")
                t0 = time.perf_counter()
                for _ in range(cycles):
                    _write(state, b"STOP\n")
                    if _read(state) != b"STOP\n":
                        raise BenchError("fsm: state did not read back STOP")
                    _write(state, b"RUNNING\n")
                    if _read(state) != b"RUNNING\n":
                        raise BenchError("fsm: state did not read back RUNNING")
                rates["fsm"].append(2 * cycles / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for _ in range(cycles * 2):
                    _read(flags)
                    _read(flags)
                rates["fuse"].append(2 * cycles / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for _ in range(cycles * 2):
                    _write(tmp.name, b"STOP\n")
                    _read(tmp.name)
                rates["tmpfs"].append(2 * cycles / (time.perf_counter() - t0))
    fsm_rate, fuse_rate, tmpfs_rate = (
        statistics.median(rates[k]) for k in ("fsm", "fuse", "tmpfs")
    )
    figs.append(
        Figure(
            sc,
            "state write+read (transition) rate",
            fsm_rate,
            "ops/s",
            note="one op = open/write/close of migration/state (one arc) + "
            f"open/read/close of it; median of {rounds} rounds of {2 * cycles}",
        )
    )
    figs.append(
        Figure(
            sc,
            "  vs 2 x read of migration/flags",
            fsm_rate,
            "ops/s",
            f"flags read pair {fuse_rate:,.0f} ops/s",
            fsm_rate / fuse_rate,
        )
    )
    figs.append(
        Figure(
            sc,
            "  vs write+read of a tmpfs file",
            fsm_rate,
            "ops/s",
            f"tmpfs {tmpfs_rate:,.0f} ops/s",
            fsm_rate / tmpfs_rate,
        )
    )

    src_spec = [
        _ram("p", pre_size, seed=3, flags="STOP_COPY+PRE_COPY", dirty_rate=size_text(rate)),
        _ram("q", pre_size, seed=4, flags="STOP_COPY+PRE_COPY"),
    ]
    dst_spec = [
        _ram("p", pre_size, flags="STOP_COPY+PRE_COPY"),
        _ram("q", pre_size, flags="STOP_COPY+PRE_COPY"),
    ]
    log("fsm: mounting pre-copy devices")
    with mounted(base, src_spec) as src, mounted(base, dst_spec) as dst:
        results: dict[str, list[MigrationResult]] = {"p": [], "q": []}
        args = ["--max-bandwidth", size_text(bw)]
        for rep in range(scale.repeats):
            for dev in ("q", "p"):
                log(f"fsm: pre-copy convergence, device {dev} (run {rep + 1}/{scale.repeats})")
                results[dev].append(migrate(src, dst, [dev], args))
                src.set_state(dev, "RUNNING")

    def med(dev: str, key: str) -> float:
        return statistics.median(float(r.source[key]) for r in results[dev])

    ideal = pre_size / bw * 1000
    clean, dirty = med("q", "total_time_ms"), med("p", "total_time_ms")
    figs.append(
        Figure(
            sc,
            "pre-copy total time, dirty_rate 0 (baseline)",
            clean,
            "ms",
            f"size/bandwidth {ideal:,.0f} ms",
            clean / ideal,
            note=f"{size_text(pre_size)} device, --max-bandwidth {size_text(bw)}/s, "
            "downtime-limit 300 ms",
        )
    )
    figs.append(
        Figure(
            sc,
            f"pre-copy total time, dirty_rate {size_text(rate)}/s",
            dirty,
            "ms",
            f"dirty_rate 0 {clean:,.0f} ms",
            dirty / clean if clean else None,
            note=f"{med('p', 'precopy_iterations'):.0f} iterations, "
            f"downtime {med('p', 'downtime_ms'):.0f} ms",
        )
    )
    figs.append(
        Figure(
            sc,
            f"pre-copy downtime, dirty_rate {size_text(rate)}/s",
            med("p", "downtime_ms"),
            "ms",
            "downtime-limit 300 ms",
            med("p", "downtime_ms") / 300,
            "<= 1.00x",
            med("p", "downtime_ms") <= 300,
        )
    )
    return figs


# -- 6. the control path ---------------------------------------------------------------------
def control(base: Path, scale: Scale) -> list[Figure]:
    """Small operations against the FUSE floor's and the kernel's same-run rates.

    Through the mount: a 4-byte ``pread`` of ``config`` and of ``regions/bar0`` (fd
    kept open) against the floor's 4-byte ``pread``; a state write+read (open,
    write, close, open, read, close of ``migration/state``) against the floor's
    open+read+close. Under ``fakevfio run`` (a C program): GET and SET
    MIG_DEVICE_STATE and a config ``pread`` on the cdev against an intercepted
    ioctl that the supervisor continues into the kernel.
    """
    sc = "control"
    seconds = 0.3 if scale.tiny else 2.0
    rounds = 1 if scale.tiny else 3
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}  # the serving daemon's CPU seconds, per round
    counted: dict[str, float] = {}  # operations, over the rounds
    exe = build_ioctl_rate(base)
    log("control: mounting the FUSE floor and one device")
    with floor_mounted(base, 4096) as floor, mounted(base, [_ram("c", 64 * 1024)]) as m:
        dev = m.device("c")
        state = dev / "migration" / "state"

        def state_op() -> None:
            for target in (b"STOP\n", b"RUNNING\n"):
                _write(state, target)
                if _read(state) != target:
                    raise BenchError(f"control: state did not read back {target!r}")

        for rnd in range(rounds):
            log(f"control: round {rnd + 1}/{rounds}")
            for label, path in (
                ("floor pread", floor / "small"),
                ("config pread", dev / "config"),
                ("region pread", dev / "regions" / "bar0"),
            ):
                op, close = pread_op(path)
                try:
                    rates.setdefault(label, []).append(rate(op, seconds))
                finally:
                    close()
            floor_op = functools.partial(open_read_close, floor / "small")
            for label, op, per_call, pid in (
                ("floor open+read+close", floor_op, 1, FLOOR_PIDS[floor]),
                # one op = one state write+read; state_op does two
                ("state write+read", state_op, 2, m.pid),
            ):
                cpu0, t0 = _cpu_seconds(pid), time.perf_counter()
                ops_per_s = per_call * rate(op, seconds)
                ops = ops_per_s * (time.perf_counter() - t0)
                rates.setdefault(label, []).append(ops_per_s)
                cpu.setdefault(label, []).append(_cpu_seconds(pid) - cpu0)
                counted[label] = counted.get(label, 0.0) + ops
            if exe is not None:
                for key, value in ioctl_rates(exe, m, "vfio0", seconds / 2).items():
                    rates.setdefault(f"ioctl {key}", []).append(value)
                files = ioctl_rates(exe, m, "vfio0", seconds / 2, channel=False)
                for key, value in files.items():
                    rates.setdefault(f"files {key}", []).append(value)
    med = {k: statistics.median(v) for k, v in rates.items()}
    note = f"median of {rounds} rounds of {seconds:g} s each; rates in operations per second"
    figs = [
        Figure(sc, "FUSE floor 4-byte pread (baseline)", med["floor pread"], "ops/s", note=note),
        Figure(sc, "FUSE floor open+read+close (baseline)", med["floor open+read+close"], "ops/s"),
        _ratio_fig(
            sc,
            "config 4-byte pread",
            med["config pread"],
            med["floor pread"],
            "floor pread",
            floor=0.8,
            unit="ops/s",
        ),
        _ratio_fig(
            sc,
            "region bar0 4-byte pread",
            med["region pread"],
            med["floor pread"],
            "floor pread",
            floor=0.8,
            unit="ops/s",
        ),
        _ratio_fig(
            sc,
            "state write+read",
            med["state write+read"],
            med["floor open+read+close"],
            "floor o+r+c",
            floor=0.3,
            unit="ops/s",
        ),
    ]
    # The daemon's CPU time per operation: what an operation costs the server,
    # whatever else the machine runs (rates on a loaded machine mostly measure
    # scheduling delays, and an op of 8 FUSE requests meets more of them than 3).
    name = "state write+read: daemon CPU per op"
    totals = {k: sum(v) for k, v in cpu.items()}
    if min(totals.values()) < MIN_CPU_COUNTED_S:
        figs.append(Figure(sc, name, None, "us", note=f"skipped: under {MIN_CPU_COUNTED_S} s"))
    else:
        per_op = {k: totals[k] * 1e6 / counted[k] for k in totals}
        ours, floor_us = per_op["state write+read"], per_op["floor open+read+close"]
        figs.append(
            Figure(
                sc,
                name,
                ours,
                "us",
                f"floor o+r+c {floor_us:,.0f} us",
                floor_us / ours if ours else None,
                note="ratio = the floor's CPU / ours; utime+stime of the serving process; "
                "an op is 8 FUSE requests (OPEN WRITE FLUSH RELEASE OPEN READ FLUSH "
                "RELEASE), the floor's 3 (it answers FLUSH with ENOSYS)",
            )
        )
    if exe is None:
        figs.append(Figure(sc, "ioctl rates", None, "ops/s", note="skipped: gcc is missing"))
        return figs
    native = med["ioctl native"]
    figs.append(
        Figure(
            sc,
            "continued ioctl under fakevfio run (baseline)",
            native,
            "ops/s",
            note="VFIO_GET_API_VERSION on a pipe: notified, not ours, continued to the kernel",
        )
    )
    for key, label in (
        ("ioctl get_state", "GET MIG_DEVICE_STATE"),
        ("ioctl set_state", "SET MIG_DEVICE_STATE STOP<->RUNNING"),
        ("ioctl config_pread", "cdev config 4-byte pread"),
    ):
        fig = _ratio_fig(sc, f"{label} (fakevfio run)", med[key], native, "continued", unit="ops/s")
        if key != "ioctl config_pread":
            fig.target, fig.ok = ">= 5,000 ops/s", med[key] >= 5000
        figs.append(fig)
    for key, label in (("get_state", "GET"), ("set_state", "SET")):
        # the same ioctls with the states through migration/state: the channel's share
        figs.append(
            _ratio_fig(
                sc,
                f"{label} MIG_DEVICE_STATE through the files (FAKEVFIO_RUN_CHANNEL=off)",
                med[f"files {key}"],
                med[f"ioctl {key}"],
                "the channel",
                unit="ops/s",
            )
        )
    return figs


# -- 6b. copies per byte on the data path ----------------------------------------------------
#: What each direction of ``migration/data`` copies, read off the code path (the
#: in-process count below checks the daemon's user-space share of it).
COPIES_READ = (
    "read: no copy in the daemon for a read inside the state's one record (a view of the "
    "stopped state, Rule 6; the first read, across the stream header, and the last, "
    "across END, join their pieces into one bytes), 1 in the kernel (the reply's writev "
    "into the reader's buffer), and no CRC-32C pass where the driver kept its chunks' "
    "checksums (Rule 7); the floor: the kernel's 1"
)
COPIES_WRITE = (
    "write: 1 copy in the kernel (the request into libfuse's buffer), 1 in pyfuse3 (a "
    "bytes of the request), 1 into the state (load_range), plus one CRC-32C pass; the "
    "floor: the kernel's and pyfuse3's 2"
)


def _buffered_per_byte(step: Callable[[], int], requests: int) -> float:
    """Bytes of new buffers allocated per byte moved (tracemalloc peak of each call).

    A copy into a fresh buffer shows as 1 per copy, so an intermediate buffer (the
    temporary a bytearray slice assignment makes from a memoryview, say) counts.
    """
    import tracemalloc

    tracemalloc.start()
    try:
        made = moved = 0
        for _ in range(requests):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            n = step()
            made += tracemalloc.get_traced_memory()[1] - before
            moved += n
    finally:
        tracemalloc.stop()
    return made / moved if moved else 0.0


def copies(base: Path, scale: Scale) -> list[Figure]:
    """New buffers per byte of the daemon's stream code, counted in process with tracemalloc.

    A ram device's saving stream is read in 1 MiB requests and the stream is
    written back to a second device in 1 MiB requests, through ``Device.read``
    and ``Device.write`` (what the FUSE handlers call inline). The copies the
    kernel and pyfuse3 add are the notes' (the FUSE floor has them too).
    """
    from fakevfio._device import Device
    from fakevfio._ram import RamDriver
    from vfio_uapi.fsm import State

    sc = "copies"
    size = scale.size(64 * MiB)
    opts = {"size": str(size), "flags": "STOP_COPY"}
    src = Device("src", "ram", RamDriver("src", {**opts, "seed": "5"}), 0)
    dst = Device("dst", "ram", RamDriver("dst", opts), 1)
    src.set_state(State.STOP)
    session = src.set_state(State.STOP_COPY).session
    assert session is not None
    parts: list[bytes | bytearray | memoryview] = []

    def read_step() -> int:
        data, _ = src.read(session, MiB)
        parts.append(data)  # a view stays a view: the join below is the benchmark's
        return len(data)

    requests = -(-size // MiB) + 2
    read_ratio = _buffered_per_byte(read_step, requests)
    stream = memoryview(b"".join(parts))
    dst.set_state(State.STOP)
    loading = dst.set_state(State.RESUMING).session
    assert loading is not None
    offsets = iter(range(0, len(stream), MiB))

    def write_step() -> int:
        offset = next(offsets, None)
        if offset is None:
            return 0
        count, _ = dst.write(loading, stream[offset : offset + MiB])
        return count

    write_ratio = _buffered_per_byte(write_step, -(-len(stream) // MiB))
    dst.set_state(State.STOP)  # the loaded stream checks out (CRC, every page)
    if dst.driver.digest() != src.driver.digest():
        raise BenchError("copies: the reloaded device's digest differs")
    note = f"{size_text(size)} ram device, 1 MiB requests, in process (no mount)"
    return [
        Figure(
            sc,
            "saving stream: new buffer bytes per byte",
            read_ratio,
            "x",
            target="<= 0.05x",
            ok=read_ratio <= 0.05,
            note=f"{note}; {COPIES_READ}",
        ),
        Figure(
            sc,
            "resuming stream: new buffer bytes per byte",
            write_ratio,
            "x",
            target="<= 0.01x",
            ok=write_ratio <= 0.01,
            note=COPIES_WRITE,
        ),
    ]


# -- 7. QEMU's own view ------------------------------------------------------------------------
def qemu_view(base: Path, scale: Scale) -> list[Figure]:
    """QEMU's ``query-migrate`` downtime and throughput next to the migrator's, same devices.

    One ram device at a ``read_bandwidth`` (device-bound, so both should meet the
    model), multifd 2 channels on both; QEMU also moves its 64 MiB of (zero) RAM.
    """
    sc = "qemu"
    why = qemu_missing()
    if why is not None:
        return [Figure(sc, "QEMU migration", None, "ms", note=f"skipped: {why}")]
    size = scale.size(256 * MiB)
    bw = 16 * MiB if scale.tiny else 64 * MiB
    src_spec = [_ram("q", size, seed=1, flags="STOP_COPY", read_bandwidth=size_text(bw))]
    dst_spec = [_ram("q", size, flags="STOP_COPY")]
    res: dict[str, list[tuple[float, float]]] = {"qemu": [], "migrator": []}
    log(f"qemu: mounting 2 x {size_text(size)} (read {size_text(bw)}/s)")
    with mounted(base, src_spec) as src, mounted(base, dst_spec) as dst:
        for rep in range(scale.repeats):
            log(f"qemu: QEMU -> QEMU (run {rep + 1}/{scale.repeats})")
            info = qemu_migration(src, dst, base)
            # ram.transferred is every byte of every channel, the device's included
            # (QEMU >= 8.2, migration_transferred_bytes()); vfio.transferred is its share.
            moved = int(info["ram"]["transferred"])
            res["qemu"].append((float(info["downtime"]), _mbps(moved, info["total-time"] / 1000)))
            for m in (src, dst):
                m.set_state("q", "RUNNING")
            log(f"qemu: migrator (run {rep + 1}/{scale.repeats})")
            run = migrate(src, dst, ["q"], _multifd(2))
            src.set_state("q", "RUNNING")
            res["migrator"].append(
                (
                    float(run.source["downtime_ms"]),
                    _mbps(_stream_bytes(run), run.source["total_time_ms"] / 1000),
                )
            )
    q_down = statistics.median(d for d, _ in res["qemu"])
    q_rate = statistics.median(r for _, r in res["qemu"])
    m_down = statistics.median(d for d, _ in res["migrator"])
    m_rate = statistics.median(r for _, r in res["migrator"])
    model = size / bw * 1000
    note = (
        f"{size_text(size)} device at read_bandwidth {size_text(bw)}/s, multifd 2, "
        f"QEMU {QEMU} (TCG, 64 MiB RAM); QEMU's throughput is ram.transferred over total-time "
        "(every channel's bytes: the device's and the RAM pages', not ram + vfio)"
    )
    return [
        Figure(
            sc,
            "QEMU downtime (query-migrate)",
            q_down,
            "ms",
            f"model {model:,.0f} ms",
            q_down / model,
            note=note,
        ),
        _ratio_fig(sc, "migrator downtime", m_down, q_down, "QEMU", unit="ms"),
        Figure(sc, "QEMU throughput (query-migrate)", q_rate, "MB/s"),
        _ratio_fig(sc, "migrator throughput", m_rate, q_rate, "QEMU"),
    ]


SCENARIOS: dict[str, Callable[[Path, Scale], list[Figure]]] = {
    "stopcopy": stopcopy,
    "downtime": downtime,
    "memory": memory,
    "scale": scale_devices,
    "fsm": fsm,
    "control": control,
    "copies": copies,
    "qemu": qemu_view,
}
