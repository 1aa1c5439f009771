"""``make demo``: mount two sets of fake devices, migrate between them, show the result.

This is the whole product in one run: two fakevfio mounts (source and
destination, each its own FUSE process), ``migrator incoming`` on a Unix
socket, ``migrator migrate`` with multifd and pre-copy, a dirtying workload on
the source, then a comparison of what each side holds. Mounts and the
migration are :mod:`fakevfio.testing`'s, so nothing stays mounted or running.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from fakevfio.testing import HarnessError, Mount, migrate, mount

DEVICES = {
    "gpu0": "size=64M,flags=STOP_COPY+P2P+PRE_COPY,seed=7,dirty_rate=8M",
    "nic0": "size=16M,flags=STOP_COPY+P2P,seed=3",
}
#: What the destination devices keep of the source's options (no seed, no workload).
DEST_OPTIONS = ("size", "flags")


def _specs(dest: bool) -> dict[str, str]:
    out = {}
    for name, opts in DEVICES.items():
        kept = [o for o in opts.split(",") if not dest or o.split("=")[0] in DEST_OPTIONS]
        out[name] = "ram:" + ",".join(kept) if kept else "ram"
    return out


def _compare(src: Mount, dst: Mount) -> bool:
    ok = True
    for name in DEVICES:
        s, d = src.info(name), dst.info(name)
        same = s["state_digest"] == d["state_digest"]
        ok &= same
        print(
            f"\n{name}: source {s['state']}, destination {d['state']}, "
            f"state_digest {'EQUAL' if same else 'DIFFERENT'} "
            f"({str(d['state_digest'])[:16]}...)"
        )
        print("  source arcs:      " + " | ".join(src.log(name)))
        print("  destination arcs: " + " | ".join(dst.log(name)))
    return ok


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="fakevfio-demo-") as tmp:
        try:
            with (
                mount(_specs(dest=False), base_dir=tmp) as src,
                mount(_specs(dest=True), base_dir=tmp) as dst,
            ):
                print(src.ready_line)
                print(dst.ready_line)
                time.sleep(0.2)  # the workload dirties some pages before we start
                result = migrate(
                    src,
                    dst,
                    listen=f"unix:{tmp}/migration.sock",
                    options=["--multifd-channels", "4"],
                    timeout=60,
                )
                print(f"migrator: listened on {result.address}")
                print("\nmigration statistics (migrator migrate --json):")
                print(json.dumps(result.source, indent=2))
                ok = _compare(src, dst)
        except HarnessError as exc:
            print(f"demo FAILED: {exc}", file=sys.stderr)
            return 1
    print("\ndemo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
