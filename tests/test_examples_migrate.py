"""Each example plugin migrates with the real migrator between two real mounts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import MountFactory
from tests.migrator.helpers import DEST_ARCS, SOURCE_ARCS, digest, migrate

pytestmark = [pytest.mark.fuse, pytest.mark.deadline(120)]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

#: driver name -> (package, class, source options, destination options)
CASES = {
    "mtty": ("fakevfio_mtty", "MttyDriver", "nr_ports=2", "nr_ports=2"),
    "nic": ("fakevfio_nic", "NicDriver", "ring_size=1024,pps=20K,seed=3", "ring_size=1024"),
    "gpu": ("fakevfio_gpu", "GpuDriver", "mem=16M,seed=5,dirty_rate=2M", "mem=16M"),
}


@pytest.mark.parametrize("driver", sorted(CASES))
@pytest.mark.parametrize("multifd", ["off", "on"])
def test_example_migrates_with_the_migrator(
    fakevfio_mount: MountFactory,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    driver: str,
    multifd: str,
) -> None:
    package, cls, src_opts, dst_opts = CASES[driver]
    path = os.pathsep.join([str(EXAMPLES / driver), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path.rstrip(os.pathsep))
    extra = ["--driver", f"{driver}={package}:{cls}"]
    with (
        fakevfio_mount([f"d0={driver}:{src_opts}"], extra_args=extra) as src,
        fakevfio_mount([f"d0={driver}:{dst_opts}"], extra_args=extra) as dst,
    ):
        flags = "+".join(src.info("d0")["migration_flags"])
        source, dest = migrate(
            f"unix:{tmp_path}/ex.sock",
            [str(src.device("d0"))],
            [str(dst.device("d0"))],
            "--multifd-transfer",
            multifd,
        )
        assert source.returncode == 0, source.stderr
        assert dest.returncode == 0, dest.stderr
        assert digest(dst, "d0") == digest(src, "d0")
        assert src.log_lines("d0") == SOURCE_ARCS[flags]
        assert dst.log_lines("d0") == DEST_ARCS["P2P" in flags]
