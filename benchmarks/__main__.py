"""``python -m benchmarks [--size-scale tiny|full] [--only NAME] [--out DIR]``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.harness import FAILURES, log, machine_details, missing_tools
from benchmarks.plot import write_plot
from benchmarks.report import Figure, render
from benchmarks.scenarios import SCALES, SCENARIOS
from fakevfio.testing import HarnessError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="fakevfio / migrator benchmarks, each figure against a same-run baseline.",
    )
    parser.add_argument(
        "--size-scale",
        choices=sorted(SCALES),
        default="full",
        help="full: the real sizes (GiB of device state); tiny: 1/64, for CI",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write the table to DIR/table.txt and the plot to DIR/plot.png",
    )
    args = parser.parse_args(argv)
    scale = SCALES[args.size_scale]
    names = args.only or list(SCENARIOS)
    missing = missing_tools()
    if missing:
        log(
            f"missing tools: {', '.join(missing)}; scenarios that need them report 'skipped' "
            "(Debian/Ubuntu: apt-get install -y coreutils)"
        )
    base = Path(tempfile.mkdtemp(prefix="fakevfio-bench-"))
    figures: list[Figure] = []
    failed: list[str] = []
    started = time.monotonic()
    try:
        log("machine details")
        machine = machine_details(base)
        for name in names:
            t0 = time.monotonic()
            log(f"=== {name} ({scale.name}) ===")
            try:
                figures += SCENARIOS[name](base, scale)
            except (HarnessError, OSError) as exc:  # BenchError, MountError, MigrationFailed
                log(f"{name} FAILED: {exc}")
                traceback.print_exc(file=sys.stderr)
                failed.append(name)
                figures.append(Figure(name, "FAILED", None, "", note=str(exc)[:300]))
            log(f"=== {name} done in {time.monotonic() - t0:.0f} s ===")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    machine.append(("load avg at end", f"{load} (1/5/15 min; > cores means other work competed)"))
    header = (
        f"fakevfio benchmarks, --size-scale {scale.name}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {time.monotonic() - started:.0f} s"
    )
    text = render(figures, machine, header)
    if FAILURES:
        text += f"\n\nmigrations that failed and were retried ({len(FAILURES)}):"
        text += "".join(f"\n  {what}: {err[-600:]}" for what, err in FAILURES)
    print(text, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.txt").write_text(text + "\n")
        log(f"table: {args.out / 'table.txt'}")
        log(write_plot(figures, args.out / "plot.png"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
