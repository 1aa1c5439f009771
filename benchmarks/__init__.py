"""Benchmarks for fakevfio and the migrator (``python -m benchmarks``).

Every figure is printed next to a baseline measured in the same run on the same
machine (raw ``dd``/``socat`` copies through the same mounts, the single-channel
migration, a plain file operation, the smaller configuration), so the ratios
mean something across machines while the absolute numbers do not.

Scenarios (``--only NAME``):

``stopcopy``  stop-copy throughput of one ram device (1 GiB) over tcp loopback:
              migrator single channel and multifd 2/4 channels against a direct
              ``dd`` between the two mounts' ``migration/data`` files and against
              ``dd | socat`` -> ``socat | dd`` over tcp loopback.
``downtime``  downtime with K = 1, 2, 4, 8 bandwidth-limited devices (256 MiB,
              512 MiB/s reads each): multifd (K channels) against single channel.
``memory``    peak RSS (ru_maxrss) of the destination migrator for 1 GiB and
              4 GiB of device state.
``scale``     64 devices in one mount, 8 channels: times at 8 and 64 devices.
``fsm``       state transitions per second through the filesystem against plain
              file operations, and pre-copy convergence with a dirtying device.

``--size-scale tiny`` divides every size by 64 and uses fewer devices (CI smoke
test); ``full`` is the real benchmark. Progress goes to stderr, the table to stdout.
"""
