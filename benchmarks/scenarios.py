"""The benchmark scenarios. Each returns a list of :class:`Figure`."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import attrs

from benchmarks.harness import (
    BenchError,
    GiB,
    MiB,
    dd_direct,
    dd_socat,
    log,
    migrate,
    missing_tools,
    mounted,
    size_text,
)
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


# -- 1. stop-copy throughput ----------------------------------------------------------------
def stopcopy(base: Path, scale: Scale) -> list[Figure]:
    sc = "stopcopy"
    size = scale.size(1 * GiB)
    missing = missing_tools()
    if missing:
        log(
            f"stopcopy: {', '.join(missing)} not installed; the raw-copy baselines are skipped "
            f"(apt-get install -y {' '.join('coreutils' if t == 'dd' else t for t in missing)})"
        )
    src_spec = [_ram("a", size, seed=1, flags="STOP_COPY")]
    dst_spec = [_ram("a", size, flags="STOP_COPY")]
    log(f"stopcopy: mounting 2 x {size_text(size)}")
    with mounted(base, src_spec) as src, mounted(base, dst_spec) as dst:
        src.set_state("a", "STOP")
        reference = src.digest("a")
        src.set_state("a", "RUNNING")
        times: dict[str, list[float]] = {}
        nbytes: dict[str, int] = {}
        verified: set[str] = set()

        def raw(label: str, copy: Callable[[Path, Path], tuple[int, float]]) -> None:
            src.set_state("a", "STOP")
            src.set_state("a", "STOP_COPY")
            dst.set_state("a", "STOP")
            dst.set_state("a", "RESUMING")
            data = "migration/data"
            n, secs = copy(src.device("a") / data, dst.device("a") / data)
            dst.set_state("a", "STOP")  # validates the stream
            dst.set_state("a", "RUNNING")
            src.set_state("a", "STOP")
            src.set_state("a", "RUNNING")
            times.setdefault(label, []).append(secs)
            nbytes[label] = n

        def mig(label: str, args: list[str]) -> None:
            run = migrate(src, dst, ["a"], args)
            src.set_state("a", "RUNNING")
            times.setdefault(label, []).append(run.source["total_time_ms"] / 1000)
            nbytes[label] = _stream_bytes(run)

        methods: list[tuple[str, Callable[[], None]]] = []
        if "dd" not in missing:
            methods.append(("direct dd", lambda: raw("direct dd", dd_direct)))
            if "socat" not in missing:
                methods.append(("dd+socat", lambda: raw("dd+socat", dd_socat)))
        methods += [
            ("migrator 1ch", lambda: mig("migrator 1ch", ["--multifd-transfer", "off"])),
            ("migrator multifd 2", lambda: mig("migrator multifd 2", _multifd(2))),
            ("migrator multifd 4", lambda: mig("migrator multifd 4", _multifd(4))),
        ]
        for rep in range(scale.repeats):
            for label, fn in methods:
                log(f"stopcopy: {label} (run {rep + 1}/{scale.repeats})")
                fn()
                if label not in verified:
                    got = dst.digest("a")
                    if got != reference:
                        raise BenchError(f"stopcopy: {label}: destination digest differs")
                    verified.add(label)
    mbps = {k: _mbps(nbytes[k], statistics.median(v)) for k, v in times.items()}
    figs: list[Figure] = []
    note_size = f"{size_text(size)} device, flags=STOP_COPY, median of {scale.repeats}"
    for label in ("direct dd", "dd+socat"):
        if label in mbps:
            figs.append(
                Figure(
                    sc,
                    f"{label} (baseline)",
                    mbps[label],
                    "MB/s",
                    note=note_size if label == "direct dd" else "",
                )
            )
        else:
            figs.append(
                Figure(
                    sc,
                    f"{label} (baseline)",
                    None,
                    "MB/s",
                    note=f"skipped: {', '.join(missing)} not installed",
                )
            )
    for label in ("migrator 1ch", "migrator multifd 2", "migrator multifd 4"):
        figs.append(Figure(sc, label, mbps[label], "MB/s"))
        if "dd+socat" in mbps:
            figs.append(
                _ratio_fig(
                    sc, f"{label} / dd+socat", mbps[label], mbps["dd+socat"], "dd+socat", floor=0.8
                )
            )
        if "direct dd" in mbps:
            figs.append(
                _ratio_fig(
                    sc,
                    f"{label} / direct dd",
                    mbps[label],
                    mbps["direct dd"],
                    "direct dd",
                    floor=0.6,
                )
            )
    return figs


# -- 2. downtime scaling --------------------------------------------------------------------
def downtime(base: Path, scale: Scale) -> list[Figure]:
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
            modes = {
                "single": ["--multifd-transfer", "off"],
                "multifd": ["--multifd-channels", str(k), "--multifd-transfer", "on"],
            }
            for rep in range(scale.repeats):
                for mode, args in modes.items():
                    log(f"downtime: K={k} {mode} (run {rep + 1}/{scale.repeats})")
                    run = migrate(src, dst, names, args)
                    res[mode].append(run.source["downtime_ms"])
                    for n in names:
                        src.set_state(n, "RUNNING")
        single = statistics.median(res["single"])
        multi = statistics.median(res["multifd"])
        ideal = size / bw * 1000
        figs.append(
            Figure(
                sc,
                f"K={k} single channel downtime",
                single,
                "ms",
                note=f"K={k}: device-bound ideal {k * ideal:.0f} ms single, "
                f"{ideal:.0f} ms multifd ({k} x {size_text(size)}, "
                f"read_bandwidth {size_text(bw)}/s each)",
            )
        )
        fig = _ratio_fig(
            sc,
            f"K={k} multifd ({k} ch) downtime",
            multi,
            single,
            "single",
            ceil=0.35 if k == 4 else None,
            unit="ms",
        )
        if k == 4:
            fig.note = "QEMU on hardware, 4 VFs: 1900 -> 1095 ms = 0.58x"
        figs.append(fig)
    return figs


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


SCENARIOS: dict[str, Callable[[Path, Scale], list[Figure]]] = {
    "stopcopy": stopcopy,
    "downtime": downtime,
    "memory": memory,
    "scale": scale_devices,
    "fsm": fsm,
}
