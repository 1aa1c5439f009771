"""``make demo``: mount two sets of fake devices, migrate between them, show the result.

This is the whole product in one run: two fakevfio mounts (source and
destination, each its own FUSE process), ``migrator incoming`` on a Unix
socket, ``migrator migrate`` with multifd and pre-copy, a dirtying workload on
the source, then a comparison of what each side holds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEVICES = {
    "gpu0": "size=64M,flags=STOP_COPY+P2P+PRE_COPY,seed=7,dirty_rate=8M",
    "nic0": "size=16M,flags=STOP_COPY+P2P,seed=3",
}


def _mount(mountpoint: Path, specs: dict[str, str]) -> subprocess.Popen[bytes]:
    mountpoint.mkdir()
    cmd = [sys.executable, "-m", "fakevfio", "mount", str(mountpoint)]
    for name, opts in specs.items():
        cmd += ["--device", f"{name}=ram:{opts}" if opts else f"{name}=ram"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line.startswith("fakevfio: mounted"):
        raise SystemExit(f"mount failed: {line or 'no output'} (exit {proc.wait()})")
    print(line)
    return proc


def _info(mountpoint: Path, name: str) -> dict[str, object]:
    with open(mountpoint / "devices" / name / "info", "rb", buffering=0) as f:
        data: dict[str, object] = json.loads(f.read(1 << 20))
    return data


def _log(mountpoint: Path, name: str) -> list[str]:
    with open(mountpoint / "devices" / name / "migration" / "log", "rb", buffering=0) as f:
        return f.read(1 << 20).decode().splitlines()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fakevfio-demo-") as tmp:
        base = Path(tmp)
        src_mp, dst_mp = base / "src", base / "dst"
        mounts = [
            _mount(src_mp, DEVICES),
            _mount(
                dst_mp,
                {
                    n: ",".join(o for o in opts.split(",") if o.split("=")[0] in ("size", "flags"))
                    for n, opts in DEVICES.items()
                },
            ),
        ]
        try:
            sock = f"unix:{base}/migration.sock"
            src_devs = [str(src_mp / "devices" / n) for n in DEVICES]
            dst_devs = [str(dst_mp / "devices" / n) for n in DEVICES]
            migrator = [sys.executable, "-m", "migrator"]
            incoming = subprocess.Popen(
                [*migrator, "incoming", "--listen", sock, "--multifd-channels", "4", *dst_devs],
                stderr=subprocess.PIPE,
            )
            assert incoming.stderr is not None
            print(incoming.stderr.readline().decode().strip())
            time.sleep(0.2)  # the workload dirties some pages before we start
            out = subprocess.run(
                [
                    *migrator,
                    "migrate",
                    "--to",
                    sock,
                    "--multifd-channels",
                    "4",
                    "--json",
                    *src_devs,
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            incoming.wait(timeout=60)
            if out.returncode or incoming.returncode:
                print(out.stderr, file=sys.stderr)
                return 1
            stats = json.loads(out.stdout)
            print("\nmigration statistics (migrator migrate --json):")
            print(json.dumps(stats, indent=2))
            ok = True
            for name in DEVICES:
                s, d = _info(src_mp, name), _info(dst_mp, name)
                same = s["state_digest"] == d["state_digest"]
                ok &= same
                print(
                    f"\n{name}: source {s['state']}, destination {d['state']}, "
                    f"state_digest {'EQUAL' if same else 'DIFFERENT'} "
                    f"({str(d['state_digest'])[:16]}...)"
                )
                print("  source arcs:      " + " | ".join(_log(src_mp, name)))
                print("  destination arcs: " + " | ".join(_log(dst_mp, name)))
            print("\ndemo " + ("succeeded" if ok else "FAILED"))
            return 0 if ok else 1
        finally:
            for proc in mounts:
                proc.send_signal(signal.SIGTERM)
            for proc in mounts:
                proc.wait(timeout=30)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
