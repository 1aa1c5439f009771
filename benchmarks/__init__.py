"""Benchmarks for fakevfio and the migrator (``python -m benchmarks``, ``make bench``).

Every figure is printed next to a baseline measured in the same run on the same
machine, so the ratios mean something across machines while the absolute numbers
do not. The baselines are honest floors, not our own slower paths:

* the FUSE floor: :class:`fakevfio._fuse.FloorFs`, a pyfuse3 file system that
  answers from one 1 MiB buffer (direct I/O, no worker thread): read, write,
  4-byte ``pread`` and open+read+close rates;
* the device's own ``migration/data`` read-alone (to /dev/null) and write-alone
  (a saved stream from /dev/shm) rates, and ``dd | dd iflag=fullblock``;
* the device-speed model (bytes / ``read_bandwidth``);
* under ``fakevfio run``, an intercepted ioctl that the supervisor continues into
  the kernel (``benchmarks/c/ioctl_rate.c``);
* QEMU's own ``query-migrate`` figures for the same devices.

Scenarios (``--only NAME``):

``stopcopy``  1 GiB ram device: read/write alone against the floor (>= 0.8x),
              dd | dd and the migrator (1 channel, multifd 2 and 4) against
              min(read alone, write alone) (>= 0.85x).
``downtime``  K = 1, 2, 4, 8 devices of 256 MiB at read_bandwidth 64 MiB/s,
              single channel and multifd K, against the model (within 5% for
              K <= 4), with the source mount's CPU seconds.
``memory``    peak RSS (ru_maxrss) of the destination migrator for 1 GiB and
              4 GiB of device state.
``scale``     64 devices in one mount, 8 channels: times at 8 and 64 devices.
``fsm``       state transitions per second against plain file operations, and
              pre-copy convergence with a dirtying device.
``control``   config/region 4-byte pread against the floor's (>= 0.8x), state
              write+read against the floor's open+read+close (>= 0.3x), GET/SET
              MIG_DEVICE_STATE and a cdev config pread under ``fakevfio run``
              against a continued ioctl (>= 5,000/s).
``qemu``      QEMU -> QEMU migration of one device (query-migrate downtime and
              throughput) next to the migrator's for the same device.

``--size-scale tiny`` divides every size by 64 and uses fewer devices (CI smoke
test); ``full`` is the real benchmark. ``--out DIR`` also writes ``table.txt`` and
``plot.png`` (downtime against K, throughput against channels; needs matplotlib,
the ``bench`` extra). Progress goes to stderr, the table to stdout.
"""
