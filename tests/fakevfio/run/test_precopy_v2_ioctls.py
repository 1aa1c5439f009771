"""Feature 12 (VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2) and PRECOPY_INFO's flags over the handlers.

The oracle is Linux 7.1: ``vfio_ioctl_device_feature_migration_precopy_info_v2``
(EINVAL without PRE_COPY, then ``vfio_check_feature(flags, argsz, SET, 0)``:
GET is EINVAL even with PROBE, PROBE alone answers 0) and
``vfio_check_precopy_ioctl`` (flags zeroed only after the opt-in; before it the
caller's flags come back, as every kernel before 7.1 returns them).
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest

from fakevfio._run import Vfio
from fakevfio._run._caller import HeldFiles
from fakevfio._run._nodes import MountNodes
from tests.conftest import MountFactory
from tests.fakevfio.run.test_handlers import ARG, F_GET, F_PROBE, F_SET, Caller, Env, _bind
from tests.fakevfio.run.test_handlers import env as env  # the fixture
from vfio_uapi import abi as uapi

pytestmark = pytest.mark.fuse

V2 = uapi.VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOV2
FEAT = uapi.VFIO_DEVICE_FEATURE
STATE = uapi.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
PRECOPY = uapi.VFIO_MIG_GET_PRECOPY_INFO


def _bound_dev(c: Caller, cdev: Path, iommu_path: Path) -> int:
    dev, iommu = c.open(cdev), c.open(iommu_path)
    _bind(c, dev, iommu)
    assert c.ioctl(iommu, uapi.IOMMU_IOAS_ALLOC, struct.pack("<III", 12, 0, 0)) == 0
    (ioas,) = c.out(8, "<I")
    assert c.ioctl(dev, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, struct.pack("<III", 12, 0, ioas)) == 0
    return dev


def _data_fd(c: Caller, dev: int) -> int:
    pre_copy = uapi.VFIO_DEVICE_STATE_PRE_COPY
    assert c.ioctl(dev, FEAT, struct.pack("<IIIi", 16, F_SET | STATE, pre_copy, 0)) == 0
    return c.installed[-1][0]


def test_feature_12_is_set_only_and_opting_in_makes_flags_an_output(env: Env) -> None:
    c = env.caller
    dev = _bound_dev(c, env.cdev, env.mount / "dev" / "iommu")
    data = _data_fd(c, dev)
    # Before the opt-in the caller's flags come back (every kernel's v1 behaviour).
    assert c.ioctl(data, PRECOPY, uapi.PRECOPY_INFO.pack(24, 0xABC0, 0, 0)) == 0
    assert c.out(4, "<I") == (0xABC0,)
    assert c.err(dev, FEAT, struct.pack("<II", 8, F_GET | V2)) == errno.EINVAL  # SET only
    assert c.err(dev, FEAT, struct.pack("<II", 8, F_GET | F_PROBE | V2)) == errno.EINVAL
    assert c.err(dev, FEAT, struct.pack("<II", 8, V2)) == errno.EINVAL  # neither GET nor SET
    assert c.ioctl(dev, FEAT, struct.pack("<II", 8, F_SET | F_PROBE | V2)) == 0
    assert c.ioctl(data, PRECOPY, uapi.PRECOPY_INFO.pack(24, 0xABC0, 0, 0)) == 0
    assert c.out(4, "<I") == (0xABC0,)  # PROBE did not opt in
    assert c.ioctl(dev, FEAT, struct.pack("<II", 8, F_SET | V2)) == 0  # no payload needed
    c.mem.buf[ARG : ARG + 24] = uapi.PRECOPY_INFO.pack(24, 0xABC0, 0, 0)
    assert c.ioctl(data, PRECOPY) == 0
    flags, initial, dirty = c.out(4, "<IQQ")
    assert flags & ~uapi.VFIO_PRECOPY_INFO_REINIT == 0  # output only: the 0xABC0 is gone
    assert initial > 0
    assert dirty == 0


def test_feature_12_needs_pre_copy(fakevfio_mount: MountFactory) -> None:
    with fakevfio_mount(["s0=ram:size=16K,flags=STOP_COPY+P2P"]) as m:
        info = json.loads((m.path / "devices" / "s0" / "info").read_text())
        nodes = MountNodes.open(m.path)
        files = HeldFiles(nodes.dev)
        c = Caller(Vfio(nodes, files))
        try:
            cdev = m.path / "dev" / "vfio" / "devices" / info["cdev"]
            dev = _bound_dev(c, cdev, m.path / "dev" / "iommu")
            for flags in (F_SET | V2, F_SET | F_PROBE | V2):
                assert c.err(dev, FEAT, struct.pack("<II", 8, flags)) == errno.EINVAL
        finally:
            files.close()
            for fd in c.fds:
                os.close(fd)


def test_the_opt_in_ends_with_the_last_device_fd(env: Env) -> None:
    c = env.caller
    dev = _bound_dev(c, env.cdev, env.mount / "dev" / "iommu")
    assert c.ioctl(dev, FEAT, struct.pack("<II", 8, F_SET | V2)) == 0
    # Every file of this caller is gone (collect skips our own pid, as a dead caller's):
    # the kernel clears the flag in vfio_df_device_last_close.
    c.vfio.files.collect()
    dev = _bound_dev(c, env.cdev, env.mount / "dev" / "iommu")
    running = uapi.VFIO_DEVICE_STATE_RUNNING
    assert c.ioctl(dev, FEAT, struct.pack("<IIIi", 16, F_SET | STATE, running, 0)) == 0
    data = _data_fd(c, dev)
    assert c.ioctl(data, PRECOPY, uapi.PRECOPY_INFO.pack(24, 0xABC0, 0, 0)) == 0
    assert c.out(4, "<I") == (0xABC0,)  # echoed again: not opted in any more
