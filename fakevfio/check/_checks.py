"""The checks: one function per uAPI rule, each with a stable name.

Rules:

* A check takes a :class:`Context` (one device, reached through
  :mod:`fakevfio.check._access`) and either returns a one-line summary (pass),
  raises :class:`CheckFailed` naming what broke, or :class:`CheckSkipped` when the
  rule does not apply to the device (a flag it lacks, a file a kernel has not).
* Checks compare the device with the kernel's rules, never with our own device
  model: paths and session changes come from :mod:`vfio_uapi.fsm` (a transcription
  of ``vfio_mig_get_next_state()``), errnos from ``include/uapi/linux/vfio.h``.
* Every check leaves the device in a non-ERROR state it can be driven from, or
  resets it (destructive checks only); a non-destructive check resets only a
  device it failed, which a refused load left in RESUMING or ERROR.
* Stream reads are bounded (:data:`MAX_STREAM`): a device that never ends its
  stream fails the check instead of filling memory.
* A check may also end with :class:`CheckWarning`: the rule held, but something
  the uAPI allows and a user should know about happened (a bit-flipped payload
  that loaded, on a stream without integrity checks); it is reported, not a
  failure.
* Checks that need a second device (the two-device round trip, a stream from
  another configuration) take it from :attr:`Context.peers`, the other devices
  of the same run; they never load a foreign stream into a device without
  ``--destructive``, and a peer always gets its own state back.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import time
from collections.abc import Callable

import attrs

from fakevfio.check._access import AccessError, Device
from vfio_uapi.fsm import MigFlags, State, path, session_change, supported

#: At most this many bytes are read from one session.
MAX_STREAM = 1 << 30
CHUNK = 1 << 20
#: Writes to the resuming stream are this size (FUSE's max_write is 128 KiB).
WRITE_CHUNK = 1 << 16
#: Default threshold above which one arc is reported slow.
SLOW_ARC_S = 1.0
DEAD_ERRNOS = (errno.ENODEV, errno.EBADF)


class CheckFailed(Exception):
    """The device broke the check's rule; the message says how."""


class CheckSkipped(Exception):
    """The check does not apply to this device; the message says why."""


class CheckWarning(Exception):
    """The rule held, with something worth reporting; the message says what."""


#: The magic of fakevfio's stream format, which ends with a CRC-32 of every byte.
INTEGRITY_MAGIC = b"FVIOSTRM"


@attrs.define
class Context:
    """One device under test and what the checks learn about it."""

    dev: Device
    slow_arc_s: float = SLOW_ARC_S
    destructive: bool = False
    _stream: bytes | None = None
    arc_times: dict[tuple[State, State], float] = attrs.field(factory=dict)
    #: The other devices of the run (for the checks that need a second device).
    peers: list[Context] = attrs.field(factory=list)
    #: The slowest whole save (STOP -> STOP_COPY, read to EOF, -> STOP) and load.
    save_s: float = 0.0
    load_s: float = 0.0
    #: Set when a check on this device timed out: peers leave it alone.
    hung: bool = False
    _config: str | None = None

    def stream(self) -> bytes:
        """A valid stream of this device (saved once, in STOP)."""
        if self._stream is None:
            self._stream = save(self)
        return self._stream

    def configuration(self) -> str:
        if self._config is None:
            self._config = f"{self.dev.identity()} {self.dev.configuration()}"
        return self._config

    def usable_peers(self) -> list[Context]:
        return [p for p in self.peers if p is not self and not p.hung]


def _err(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def states_of(flags: MigFlags) -> list[State]:
    return [s for s in State if s is not State.ERROR and supported(s, flags)]


def _timed_set(ctx: Context, target: State, before: State | None = None) -> bool:
    """One SET (timed when it is a single arc); ``before``: the state, if known."""
    if before is None:
        before = ctx.dev.state()
    start = time.monotonic()
    new = ctx.dev.set_state(target)
    took = time.monotonic() - start
    if len(path(before, target, ctx.dev.flags)) == 1:
        ctx.arc_times[(before, target)] = max(took, ctx.arc_times.get((before, target), 0.0))
    return new


def go(ctx: Context, target: State) -> None:
    """Bring the device to ``target`` (via RUNNING; RESUMING gets the device's stream)."""
    dev = ctx.dev
    current = dev.state()
    if current is State.ERROR:
        raise CheckFailed(f"the device is in ERROR (wanted {target.name}); reset it")
    if current is target:
        return
    if current is State.RESUMING:
        try:
            _timed_set(ctx, State.STOP, current)
        except OSError:
            # The stream written so far (if any) was not the device's: give it that.
            write_all(dev, ctx.stream())
            _timed_set(ctx, State.STOP)
        if target is State.STOP:
            return
        current = State.STOP
    if target is State.RESUMING:
        stream = ctx.stream()
        go(ctx, State.STOP)
        _timed_set(ctx, State.RESUMING)
        write_all(dev, stream)
        return
    if current in (State.STOP_COPY, State.PRE_COPY, State.PRE_COPY_P2P) and target in (
        State.PRE_COPY,
        State.PRE_COPY_P2P,
        State.STOP_COPY,
    ):
        _timed_set(ctx, State.RUNNING, current)
        current = State.RUNNING
    _timed_set(ctx, target, current)


def read_all(dev: Device, *, limit: int = MAX_STREAM) -> bytes:
    """Read the saving session to its end (STOP_COPY: EOF)."""
    fd = dev.open_data(write=False)
    try:
        parts: list[bytes] = []
        total = 0
        while True:
            data = dev.read(fd, CHUNK)
            if not data:
                return b"".join(parts)
            parts.append(data)
            total += len(data)
            if total > limit:
                raise CheckFailed(f"the stream did not end within {limit} bytes")
    finally:
        dev.close_data(fd)


def write_all(dev: Device, data: bytes) -> None:
    fd = dev.open_data(write=True)
    try:
        view = memoryview(data)
        while view:
            n = dev.write(fd, view[:WRITE_CHUNK])
            view = view[n:]
    finally:
        dev.close_data(fd)


def save(ctx: Context) -> bytes:
    """STOP -> STOP_COPY, read to EOF, -> STOP; the stream."""
    go(ctx, State.STOP)
    start = time.monotonic()
    _timed_set(ctx, State.STOP_COPY, State.STOP)
    data = read_all(ctx.dev)
    _timed_set(ctx, State.STOP, State.STOP_COPY)
    ctx.save_s = max(ctx.save_s, time.monotonic() - start)
    return data


def load(ctx: Context, data: bytes) -> None:
    go(ctx, State.STOP)
    start = time.monotonic()
    _timed_set(ctx, State.RESUMING, State.STOP)
    write_all(ctx.dev, data)
    _timed_set(ctx, State.STOP, State.RESUMING)
    ctx.load_s = max(ctx.load_s, time.monotonic() - start)


def new_lines(before: list[str], after: list[str]) -> list[str]:
    """The log lines appended between two reads (the log keeps only its last lines)."""
    for shift in range(len(before) + 1):
        kept = before[shift:]
        if after[: len(kept)] == kept:
            return after[len(kept) :]
    return after


# -- the checks --------------------------------------------------------------------------
def check_fsm_paths(ctx: Context) -> str:
    dev = ctx.dev
    ctx.stream()
    states = states_of(dev.flags)
    n = 0
    for src in states:
        for dst in states:
            if src is State.STOP_COPY and dst in (State.PRE_COPY, State.PRE_COPY_P2P):
                continue
            go(ctx, src)
            expected = path(src, dst, dev.flags)
            before = dev.log()
            try:
                if len(expected) == 1:
                    _timed_set(ctx, dst)
                else:
                    dev.set_state(dst)
            except OSError as exc:
                raise CheckFailed(
                    f"{src.name} -> {dst.name} failed with {_err(exc)} (path "
                    f"{' '.join(f'{a.name}>{b.name}' for a, b in expected)})"
                ) from None
            if dst is State.RESUMING and src is not State.RESUMING:
                write_all(dev, ctx.stream())
            reached = dev.state()
            if reached is not dst:
                raise CheckFailed(f"{src.name} -> {dst.name} ended in {reached.name}")
            if dev.has_files:
                seen = [ln for ln in new_lines(before, dev.log()) if not ln.startswith("REFUSED")]
                want = [f"{a.name} {b.name}" for a, b in expected]
                if seen != want:
                    raise CheckFailed(
                        f"{src.name} -> {dst.name}: driver arcs {seen}, the kernel's "
                        f"shortest path is {want}"
                    )
            n += 1
    go(ctx, State.RUNNING)
    return f"{n} (from, to) pairs"


def check_fsm_illegal(ctx: Context) -> str:
    dev = ctx.dev
    flags = dev.flags
    cases: list[tuple[State, int]] = []
    for src in states_of(flags):
        cases.append((src, int(State.ERROR)))
        cases.append((src, 8))
        cases.extend(
            (src, int(s)) for s in State if s is not State.ERROR and not supported(s, flags)
        )
    if flags & MigFlags.PRE_COPY and (ctx.destructive or dev.has_files):
        # Unpatched kernels loop forever on this arc: only with --destructive on hardware.
        cases.append((State.STOP_COPY, int(State.PRE_COPY)))
        if flags & MigFlags.P2P:
            cases.append((State.STOP_COPY, int(State.PRE_COPY_P2P)))
    for src, target in cases:
        go(ctx, src)
        before = dev.log()
        digest = dev.digest() if src is not State.RUNNING else None
        try:
            dev.set_state(target)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise CheckFailed(
                    f"{src.name} -> {target} failed with {_err(exc)}, expected EINVAL"
                ) from None
        else:
            raise CheckFailed(f"{src.name} -> {target} succeeded, expected EINVAL")
        if dev.state() is not src:
            raise CheckFailed(
                f"refused {src.name} -> {target} left the device in {dev.state().name}"
            )
        if dev.has_files:
            arcs = [ln for ln in new_lines(before, dev.log()) if not ln.startswith("REFUSED")]
            if arcs:
                raise CheckFailed(f"refused {src.name} -> {target} ran arcs {arcs}")
            if digest is not None and dev.digest() != digest:
                raise CheckFailed(f"refused {src.name} -> {target} changed the state digest")
    go(ctx, State.RUNNING)
    return f"{len(cases)} requests refused with EINVAL"


def check_new_session(ctx: Context) -> str:
    dev = ctx.dev
    ctx.stream()
    states = states_of(dev.flags)
    opened = 0
    for src in states:
        for dst in states:
            if src is State.STOP_COPY and dst in (State.PRE_COPY, State.PRE_COPY_P2P):
                continue
            if src is dst:
                continue
            go(ctx, src)
            new = dev.set_state(dst)
            if dst is State.RESUMING:
                write_all(dev, ctx.stream())
            want = session_change(src, dst, dev.flags).opens
            if new != want:
                raise CheckFailed(
                    f"{src.name} -> {dst.name} {'handed out' if new else 'did not hand out'} "
                    f"a new data_fd; the kernel {'does' if want else 'does not'}"
                )
            opened += new
    go(ctx, State.RUNNING)
    return f"{opened} requests opened a session, all on the four arcs"


def check_stop_copy_eof(ctx: Context) -> str:
    dev = ctx.dev
    go(ctx, State.STOP)
    _timed_set(ctx, State.STOP_COPY)
    fd = dev.open_data(write=False)
    try:
        total = 0
        while True:
            data = dev.read(fd, CHUNK)
            if not data:
                break
            total += len(data)
            if total > MAX_STREAM:
                raise CheckFailed(f"STOP_COPY stream did not end within {MAX_STREAM} bytes")
        for n in (1, 4096, CHUNK):
            more = dev.read(fd, n)
            if more:
                raise CheckFailed(f"read({n}) after EOF returned {len(more)} bytes")
    finally:
        dev.close_data(fd)
    _timed_set(ctx, State.STOP)
    return f"{total} bytes, then EOF for good"


def check_precopy_end(ctx: Context) -> str:
    dev = ctx.dev
    if not dev.flags & MigFlags.PRE_COPY:
        raise CheckSkipped("no PRE_COPY flag")
    go(ctx, State.RUNNING)
    _timed_set(ctx, State.PRE_COPY)
    fd = dev.open_data(write=False)
    total = 0
    try:
        while True:
            try:
                data = dev.read(fd, CHUNK)
            except OSError as exc:
                if exc.errno == errno.ENOMSG:
                    break
                raise CheckFailed(f"PRE_COPY read failed with {_err(exc)}") from None
            if not data:
                raise CheckFailed("PRE_COPY read returned EOF; expected ENOMSG at the end")
            total += len(data)
            if total > MAX_STREAM:
                raise CheckFailed(f"PRE_COPY did not reach its end within {MAX_STREAM} bytes")
    finally:
        dev.close_data(fd)
    go(ctx, State.RUNNING)
    return f"ENOMSG after {total} bytes"


def check_dead_session(ctx: Context) -> str:
    dev = ctx.dev
    go(ctx, State.STOP)
    dev.set_state(State.STOP_COPY)
    fd = dev.open_data(write=False)
    try:
        dev.set_state(State.STOP)
        try:
            dev.read(fd, 4096)
        except OSError as exc:
            if exc.errno not in DEAD_ERRNOS:
                raise CheckFailed(f"read after STOP_COPY -> STOP: {_err(exc)}") from None
        else:
            raise CheckFailed("read of the saving data_fd after STOP_COPY -> STOP succeeded")
    finally:
        dev.close_data(fd)
    stream = ctx.stream()
    dev.set_state(State.RESUMING)
    fd = dev.open_data(write=True)
    try:
        dev.write(fd, stream)
        dev.set_state(State.STOP)
        try:
            dev.write(fd, b"\0")
        except OSError as exc:
            if exc.errno not in DEAD_ERRNOS:
                raise CheckFailed(f"write after RESUMING -> STOP: {_err(exc)}") from None
        else:
            raise CheckFailed("write of the resuming data_fd after RESUMING -> STOP succeeded")
    finally:
        dev.close_data(fd)
    go(ctx, State.RUNNING)
    return "ENODEV/EBADF after both sessions ended"


def check_direction(ctx: Context) -> str:
    dev = ctx.dev
    go(ctx, State.STOP)
    dev.set_state(State.STOP_COPY)
    try:
        fd = dev.open_data(write=True)
    except OSError:
        pass  # the file refuses the wrong mode (EACCES)
    else:
        try:
            dev.write(fd, b"\0")
        except OSError:
            pass
        else:
            raise CheckFailed("a write to the saving stream succeeded")
        finally:
            dev.close_data(fd)
    go(ctx, State.RESUMING)
    try:
        fd = dev.open_data(write=False)
    except OSError:
        pass
    else:
        try:
            dev.read(fd, 1)
        except OSError:
            pass
        else:
            raise CheckFailed("a read of the resuming stream succeeded")
        finally:
            dev.close_data(fd)
    go(ctx, State.STOP)
    return "saving is read-only, resuming write-only"


def check_precopy_info_states(ctx: Context) -> str:
    dev = ctx.dev
    checked = []
    for st in states_of(dev.flags):
        go(ctx, st)
        fd = -1
        if not dev.has_files:
            if st not in (State.STOP_COPY, State.RESUMING, State.PRE_COPY, State.PRE_COPY_P2P):
                continue
            fd = dev.open_data(write=st is State.RESUMING)
        try:
            try:
                dev.precopy_info(fd)
            except OSError as exc:
                if st in (State.PRE_COPY, State.PRE_COPY_P2P):
                    raise CheckFailed(f"PRECOPY_INFO in {st.name} failed: {_err(exc)}") from None
                if exc.errno != errno.EINVAL:
                    raise CheckFailed(
                        f"PRECOPY_INFO in {st.name}: {_err(exc)}, expected EINVAL"
                    ) from None
            else:
                if st not in (State.PRE_COPY, State.PRE_COPY_P2P):
                    raise CheckFailed(f"PRECOPY_INFO in {st.name} succeeded, expected EINVAL")
        finally:
            if fd >= 0:
                dev.close_data(fd)
        checked.append(st.name)
    go(ctx, State.RUNNING)
    return "in " + " ".join(checked)


def check_precopy_info_initial(ctx: Context) -> str:
    dev = ctx.dev
    if not dev.flags & MigFlags.PRE_COPY:
        raise CheckSkipped("no PRE_COPY flag")
    go(ctx, State.RUNNING)
    dev.set_state(State.PRE_COPY)
    fd = dev.open_data(write=False)
    seen = []
    try:
        last, _ = dev.precopy_info(fd)
        seen.append(last)
        total = 0
        while True:
            try:
                data = dev.read(fd, 65536)
            except OSError as exc:
                if exc.errno == errno.ENOMSG:
                    break
                raise CheckFailed(f"PRE_COPY read failed with {_err(exc)}") from None
            if not data:
                break
            total += len(data)
            initial, _dirty = dev.precopy_info(fd)
            if initial > last:
                raise CheckFailed(
                    f"initial_bytes grew from {last} to {initial} after {total} bytes read"
                )
            last = initial
            if total > MAX_STREAM:
                raise CheckFailed("PRE_COPY did not end")
        if last != 0:
            raise CheckFailed(f"initial_bytes {last} at the pre-copy end, expected 0")
    finally:
        dev.close_data(fd)
    go(ctx, State.RUNNING)
    return f"initial_bytes {seen[0]} -> 0, never growing"


def check_data_size(ctx: Context) -> str:
    dev = ctx.dev
    sizes = []
    for st in states_of(dev.flags):
        go(ctx, st)
        try:
            size = dev.data_size()
        except OSError as exc:
            raise CheckFailed(f"MIG_DATA_SIZE in {st.name} failed: {_err(exc)}") from None
        if size < 0:
            raise CheckFailed(f"MIG_DATA_SIZE {size} in {st.name}")
        sizes.append(f"{st.name}={size}")
    go(ctx, State.RUNNING)
    return " ".join(sizes)


def check_reset(ctx: Context) -> str:
    dev = ctx.dev
    for st in states_of(dev.flags):
        go(ctx, st)
        fd = -1
        if st in (State.STOP_COPY, State.PRE_COPY, State.PRE_COPY_P2P, State.RESUMING):
            fd = dev.open_data(write=st is State.RESUMING)
        try:
            dev.reset()
            if dev.state() is not State.RUNNING:
                raise CheckFailed(f"reset in {st.name} left the device in {dev.state().name}")
            if fd >= 0:
                try:
                    if st is State.RESUMING:
                        dev.write(fd, b"\0")
                    else:
                        dev.read(fd, 1)
                except OSError as exc:
                    if exc.errno not in DEAD_ERRNOS:
                        raise CheckFailed(
                            f"data_fd after reset in {st.name}: {_err(exc)}, expected ENODEV"
                        ) from None
                else:
                    raise CheckFailed(f"the {st.name} session survived the reset")
        finally:
            if fd >= 0:
                dev.close_data(fd)
    return "every state -> RUNNING, the session ended"


def check_repeat(ctx: Context) -> str:
    first = save(ctx)
    digest = ctx.dev.digest()
    load(ctx, first)
    if ctx.dev.digest() != digest:
        raise CheckFailed("the device's state_digest changed after loading its own stream")
    second = save(ctx)
    a, b = hashlib.sha256(first).hexdigest(), hashlib.sha256(second).hexdigest()
    if a != b:
        raise CheckFailed(
            f"save -> load -> save gave a different stream ({len(first)} bytes sha256 {a[:12]}, "
            f"then {len(second)} bytes sha256 {b[:12]})"
        )
    go(ctx, State.RUNNING)
    return f"{len(first)} bytes, sha256 {a[:16]}"


def bad_streams(stream: bytes) -> list[tuple[str, bytes]]:
    n = len(stream)
    cases = [("empty", b""), ("truncated", stream[: n // 2]), ("one byte short", stream[:-1])]
    offsets = sorted({0, 1, 4, 8, 12, 16, 24, 32, 48, 64, n // 4, n // 2, 3 * n // 4, n - 1})
    for off in offsets:
        if 0 <= off < n:
            flipped = bytearray(stream)
            flipped[off] ^= 0x10
            cases.append((f"bit flip at {off}", bytes(flipped)))
    cases.append(("bytes after the end", stream + b"\0" * 16))
    return cases


def _foreign(ctx: Context) -> tuple[str, bytes] | None:
    """A stream of a peer of another configuration (another driver or size), if any."""
    mine = ctx.configuration()
    for peer in ctx.usable_peers():
        if peer.configuration() != mine:
            return peer.dev.name, peer.stream()
    return None


def check_resume_hardening(ctx: Context) -> str:
    dev = ctx.dev
    stream = ctx.stream()
    cases = bad_streams(stream)
    foreign = _foreign(ctx)
    if foreign is not None:
        cases.append((f"the stream of {foreign[0]} (another configuration)", foreign[1]))
    go(ctx, State.RUNNING)
    # fakevfio's format ends with a CRC-32 of every byte: there, every flip must fail.
    strict = stream.startswith(INTEGRITY_MAGIC)
    loaded: list[str] = []
    for what, data in cases:
        dev.reset()
        go(ctx, State.STOP)
        dev.set_state(State.RESUMING)
        refused = ""
        try:
            write_all(dev, data)
        except OSError as exc:
            refused = f"write {_err(exc)}"
        try:
            dev.set_state(State.STOP)
        except OSError as exc:
            refused = refused or f"RESUMING -> STOP {_err(exc)}"
        if not refused:
            if what.startswith("bit flip") and what != "bit flip at 0" and not strict:
                # A flip inside the payload may be a valid image of another state
                # (the uAPI asks no checksum): loading it is allowed, hanging is not.
                loaded.append(what.removeprefix("bit flip at "))
            else:
                why = " (the stream has a CRC: every flip must fail)" if strict else ""
                raise CheckFailed(
                    f"{what}: the device accepted the stream ({len(data)} bytes){why}"
                )
        dev.reset()
        if dev.state() is not State.RUNNING:
            raise CheckFailed(f"{what}: reset left the device in {dev.state().name}")
    load(ctx, stream)
    if save(ctx) != stream:
        raise CheckFailed(
            "after the bad streams and a reset, the device's own stream no longer loads"
        )
    go(ctx, State.RUNNING)
    note = "" if foreign else " (no stream of another configuration: give such a device too)"
    summary = f"{len(cases) - len(loaded)} bad streams refused, the device works after reset"
    if loaded:
        raise CheckWarning(
            f"{summary}; payload bit flips at offsets {', '.join(loaded)} of {len(stream)} "
            f"LOADED (no integrity check in the stream){note}"
        )
    return summary + note


def _leave_resuming(ctx: Context) -> None:
    """After a load that failed (the check fails anyway): a device left in RESUMING
    with a stream it refused can only leave it by reset; do that, so that the other
    checks are not failed by this one's leftovers."""
    if ctx.dev.state() in (State.RESUMING, State.ERROR):
        ctx.dev.reset()


def _read_until_enomsg(dev: Device, fd: int, limit: int) -> tuple[bytes, bool]:
    """Read up to ``limit`` bytes of a pre-copy stream; (data, reached the temporary end)."""
    parts: list[bytes] = []
    total = 0
    while total < limit:
        try:
            data = dev.read(fd, min(CHUNK, limit - total))
        except OSError as exc:
            if exc.errno == errno.ENOMSG:
                return b"".join(parts), True
            raise CheckFailed(f"a PRE_COPY read failed with {_err(exc)}") from None
        if not data:
            raise CheckFailed("a PRE_COPY read returned EOF; expected ENOMSG at the end")
        parts.append(data)
        total += len(data)
    return b"".join(parts), False


def check_shared_stream(ctx: Context) -> str:
    dev = ctx.dev
    if not dev.flags & MigFlags.PRE_COPY:
        raise CheckSkipped("no PRE_COPY flag")
    go(ctx, State.RUNNING)
    if not _timed_set(ctx, State.PRE_COPY):
        raise CheckFailed("RUNNING -> PRE_COPY handed out no data_fd")
    fd = dev.open_data(write=False)
    parts: list[bytes] = []
    arcs = ["PRE_COPY"]
    try:
        parts.append(_read_until_enomsg(dev, fd, 4096)[0])
        targets = [State.PRE_COPY_P2P] if dev.flags & MigFlags.P2P else []
        for target in [*targets, State.STOP_COPY]:
            if _timed_set(ctx, target):
                raise CheckFailed(
                    f"{arcs[-1]} -> {target.name} handed out a new data_fd; the saving "
                    "group PRE_COPY, PRE_COPY_P2P, STOP_COPY shares one stream"
                )
            arcs.append(target.name)
            if target is State.PRE_COPY_P2P:
                parts.append(_read_until_enomsg(dev, fd, 4096)[0])
        total = sum(map(len, parts))
        while True:
            try:
                data = dev.read(fd, CHUNK)
            except OSError as exc:
                raise CheckFailed(
                    f"the data_fd of RUNNING -> PRE_COPY, read in {' -> '.join(arcs)}, failed "
                    f"with {_err(exc)} after {total} bytes: the session must go on"
                ) from None
            if not data:
                break
            parts.append(data)
            total += len(data)
            if total > MAX_STREAM:
                raise CheckFailed(f"the stream did not end within {MAX_STREAM} bytes")
    finally:
        dev.close_data(fd)
    _timed_set(ctx, State.STOP)
    digest = dev.digest()
    stream = b"".join(parts)
    try:
        load(ctx, stream)
    except OSError as exc:
        _leave_resuming(ctx)
        raise CheckFailed(
            f"the {len(stream)} bytes read on one data_fd across {' -> '.join(arcs)} do not "
            f"load: {exc}"
        ) from None
    if dev.digest() != digest:
        raise CheckFailed("the stream read across the saving group loaded another state")
    go(ctx, State.RUNNING)
    return f"one data_fd across {' -> '.join(arcs)}, {len(stream)} bytes that load"


#: Rounds of "info says data, read it" after the first temporary end.
DIRTY_ROUNDS = 64


def check_dirty_bytes(ctx: Context) -> str:
    dev = ctx.dev
    if not dev.flags & MigFlags.PRE_COPY:
        raise CheckSkipped("no PRE_COPY flag")
    go(ctx, State.RUNNING)
    dev.set_state(State.PRE_COPY)
    fd = dev.open_data(write=False)
    try:
        initial, dirty = dev.precopy_info(fd)
        if dirty != 0:
            raise CheckFailed(
                f"dirty_bytes {dirty} (initial_bytes {initial}) before anything was read: "
                "dirty_bytes starts at zero and counts only changes to data already read"
            )
        total = 0
        ends = 0
        for _ in range(DIRTY_ROUNDS):
            data, end = _read_until_enomsg(dev, fd, MAX_STREAM - total)
            total += len(data)
            if not end:
                raise CheckFailed(f"PRE_COPY did not reach its end within {MAX_STREAM} bytes")
            ends += 1
            initial, dirty = dev.precopy_info(fd)
            if initial != 0:
                raise CheckFailed(f"ENOMSG after {total} bytes while initial_bytes is {initial}")
            if dirty == 0:
                break
            # The device changed state since the end (or its counter is wrong): the
            # data it reports must be there to read.
            try:
                more = dev.read(fd, CHUNK)
            except OSError as exc:
                if exc.errno != errno.ENOMSG:
                    raise CheckFailed(f"a PRE_COPY read failed with {_err(exc)}") from None
                raise CheckFailed(
                    f"ENOMSG while PRECOPY_INFO says dirty_bytes {dirty}: the temporary end "
                    "is reached only when initial_bytes and dirty_bytes are both zero"
                ) from None
            total += len(more)
    finally:
        dev.close_data(fd)
    go(ctx, State.RUNNING)
    return f"dirty_bytes 0 at the start, both 0 at each of {ends} temporary ends ({total} bytes)"


def check_two_devices(ctx: Context) -> str:
    dev = ctx.dev
    mine = ctx.configuration()
    partner = next((p for p in ctx.usable_peers() if p.configuration() == mine), None)
    if partner is None:
        raise CheckSkipped("no second device of the same driver and configuration given")
    first = save(ctx)
    digest = dev.digest()
    own = save(partner)
    try:
        try:
            load(partner, first)
        except OSError as exc:
            _leave_resuming(partner)
            raise CheckFailed(f"{partner.dev.name} refused {dev.name}'s stream: {exc}") from None
        if partner.dev.digest() != digest:
            raise CheckFailed(f"{partner.dev.name} loaded {dev.name}'s stream into another state")
        again = save(partner)
    finally:
        load(partner, own)
        go(partner, State.RUNNING)
    a, b = hashlib.sha256(first).hexdigest(), hashlib.sha256(again).hexdigest()
    if a != b:
        raise CheckFailed(
            f"save {dev.name} ({len(first)} bytes, sha256 {a[:12]}) -> load into "
            f"{partner.dev.name} -> save gave {len(again)} bytes, sha256 {b[:12]}"
        )
    go(ctx, State.RUNNING)
    return f"into {partner.dev.name} and back out: the same {len(first)} bytes"


#: The DMA logging check's buffer: pages, the page size, and the IOVA it is mapped at.
DMA_PAGES = 64
DMA_PAGE = 4096
DMA_IOVA = 1 << 32
#: How long the device may DMA while logging (it runs in RUNNING).
DMA_WORK_S = 0.3
_FILL = 0x5A


def _expect_errno(what: str, errs: tuple[int, ...], fn: Callable[[], object]) -> None:
    try:
        fn()
    except OSError as exc:
        if exc.errno not in errs:
            want = "/".join(errno.errorcode[e] for e in errs)
            raise CheckFailed(f"{what}: {_err(exc)}, expected {want}") from None
        return
    raise CheckFailed(f"{what} succeeded, expected {errno.errorcode[errs[0]]}")


def _bits(bitmap: bytes) -> set[int]:
    value = int.from_bytes(bitmap, "little")
    return {i for i in range(len(bitmap) * 8) if value >> i & 1}


def _written(buf: mmap.mmap) -> set[int]:
    clean = bytes([_FILL]) * DMA_PAGE
    return {i for i in range(DMA_PAGES) if buf[i * DMA_PAGE : (i + 1) * DMA_PAGE] != clean}


def check_dma_logging(ctx: Context) -> str:
    dev = ctx.dev
    if not dev.dma_logging():
        raise CheckSkipped("the device does not support VFIO_DEVICE_FEATURE_DMA_LOGGING")
    size = DMA_PAGES * DMA_PAGE
    iova = DMA_IOVA
    buf = mmap.mmap(-1, size)
    buf.write(bytes([_FILL]) * size)
    anchor = ctypes.c_char.from_buffer(buf)
    go(ctx, State.RUNNING)
    dev.dma_map(iova, ctypes.addressof(anchor), size)
    started = False
    try:
        _expect_errno(
            "REPORT before START", (errno.EINVAL,), lambda: dev.log_report(iova, size, 4096)
        )
        _expect_errno("START with no ranges", (errno.EINVAL,), lambda: dev.log_start(4096, []))
        _expect_errno(
            "START with a range not aligned to the page size",
            (errno.EINVAL,),
            lambda: dev.log_start(4096, [(iova + 512, size)]),
        )
        page = dev.log_start(DMA_PAGE, [(iova, size)])
        started = True
        if page < DMA_PAGE or page & (page - 1):
            raise CheckFailed(f"START gave back page size {page}: not a power of two >= 4 KiB")
        _expect_errno(
            "a second START while logging",
            (errno.EINVAL, errno.EBUSY),
            lambda: dev.log_start(DMA_PAGE, [(iova, size)]),
        )
        for bad in (DMA_PAGE + 1, 2048):
            _expect_errno(
                f"REPORT with page size {bad}",
                (errno.EINVAL,),
                lambda bad=bad: dev.log_report(iova, size, bad),  # type: ignore[misc]
            )
        _expect_errno(
            "REPORT of a range that wraps past 2^64",
            (errno.EOVERFLOW,),
            lambda: dev.log_report(iova, (1 << 64) - iova + DMA_PAGE, DMA_PAGE),
        )
        time.sleep(DMA_WORK_S)
        go(ctx, State.STOP)  # no DMA in STOP: what is written now stays written
        reported = _bits(dev.log_report(iova, size, DMA_PAGE))
        written = _written(buf)
        missing = sorted(written - reported)
        if missing:
            raise CheckFailed(
                f"{len(missing)} of {len(written)} pages the device wrote are not in the "
                f"REPORT bitmap (first page {missing[0]}, iova {iova + missing[0] * DMA_PAGE:#x})"
            )
        time.sleep(0.05)
        again = _bits(dev.log_report(iova, size, DMA_PAGE))
        if _written(buf) != written:
            raise CheckFailed("the device DMA-wrote while in STOP")
        if again:
            raise CheckFailed(
                f"a second REPORT in STOP has {len(again)} pages: a report clears what it "
                "returned, and a stopped device writes nothing"
            )
        dev.log_stop()
        started = False
        _expect_errno(
            "REPORT after STOP", (errno.EINVAL,), lambda: dev.log_report(iova, size, 4096)
        )
        dev.log_stop()  # a second STOP is harmless
    finally:
        if started:
            dev.log_stop()
        dev.dma_unmap(iova, size)
        del anchor
        buf.close()
    go(ctx, State.RUNNING)
    extra = f"{len(written)} pages written, all reported" if written else "no page written"
    return f"START/REPORT/STOP rules hold, page size {page}; {extra}"


def check_arc_times(ctx: Context) -> str:
    if not ctx.arc_times:
        for st in states_of(ctx.dev.flags):
            go(ctx, st)
        go(ctx, State.RUNNING)
    slow = {k: v for k, v in ctx.arc_times.items() if v > ctx.slow_arc_s}
    worst = max(ctx.arc_times.items(), key=lambda kv: kv[1])
    if slow:
        names = ", ".join(f"{a.name}>{b.name} {t:.3f}s" for (a, b), t in sorted(slow.items()))
        raise CheckFailed(f"slow arcs (> {ctx.slow_arc_s:g} s): {names}")
    (a, b), t = worst
    whole = (
        f"; save {ctx.save_s * 1000:.1f} ms, load {ctx.load_s * 1000:.1f} ms" if ctx.save_s else ""
    )
    return f"{len(ctx.arc_times)} arcs, slowest {a.name}>{b.name} {t * 1000:.1f} ms{whole}"


@attrs.frozen
class Check:
    """One rule: a stable name, what it checks, where the kernel says so."""

    name: str
    description: str
    rule: str
    fn: Callable[[Context], str]
    destructive: bool = False


CHECKS: tuple[Check, ...] = (
    Check(
        "fsm.shortest-path",
        "every (from, to) pair of the flag set takes the kernel's shortest path, each arc once",
        "vfio_mig_get_next_state() in drivers/vfio/vfio_main.c",
        check_fsm_paths,
    ),
    Check(
        "fsm.illegal-einval",
        "ERROR, numbers >= 8, unsupported states, STOP_COPY -> PRE_COPY*: EINVAL, nothing changes",
        "vfio_mig_get_next_state() and vfio_ioctl_device_feature_mig_device_state()",
        check_fsm_illegal,
    ),
    Check(
        "data_fd.new-session",
        "a new data_fd only on RUNNING>PRE_COPY, RUNNING_P2P>PRE_COPY_P2P, STOP>STOP_COPY, "
        "STOP>RESUMING",
        "struct vfio_device_feature_mig_state, include/uapi/linux/vfio.h",
        check_new_session,
    ),
    Check(
        "data_fd.stop-copy-eof",
        "STOP_COPY reads return the state, then 0 (EOF) for good",
        "VFIO_DEVICE_STATE_STOP_COPY in include/uapi/linux/vfio.h",
        check_stop_copy_eof,
    ),
    Check(
        "data_fd.precopy-enomsg",
        "PRE_COPY reads end with ENOMSG at the temporary end, never EOF",
        "VFIO_MIG_GET_PRECOPY_INFO comment in include/uapi/linux/vfio.h",
        check_precopy_end,
    ),
    Check(
        "data_fd.dead-session",
        "a data_fd whose session ended fails reads and writes (ENODEV/EBADF)",
        "struct vfio_device_feature_mig_state, include/uapi/linux/vfio.h",
        check_dead_session,
    ),
    Check(
        "data_fd.direction",
        "the saving stream is read-only, the resuming stream write-only",
        "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE in include/uapi/linux/vfio.h",
        check_direction,
    ),
    Check(
        "data_fd.shared-stream",
        "PRE_COPY -> PRE_COPY_P2P -> STOP_COPY keep the data_fd of RUNNING -> PRE_COPY: no new "
        "data_fd, the stream goes on and loads",
        "struct vfio_device_feature_mig_state; vfio_mig_get_next_state() saving group",
        check_shared_stream,
    ),
    Check(
        "precopy_info.states",
        "PRECOPY_INFO works in PRE_COPY*, fails EINVAL elsewhere",
        "VFIO_MIG_GET_PRECOPY_INFO in include/uapi/linux/vfio.h",
        check_precopy_info_states,
    ),
    Check(
        "precopy_info.initial-bytes",
        "initial_bytes never grows while the stream is read and is 0 at the pre-copy end",
        "struct vfio_precopy_info in include/uapi/linux/vfio.h",
        check_precopy_info_initial,
    ),
    Check(
        "precopy_info.dirty-bytes",
        "dirty_bytes is 0 before anything is read; ENOMSG only when initial_bytes and "
        "dirty_bytes are both 0",
        "VFIO_MIG_GET_PRECOPY_INFO comment in include/uapi/linux/vfio.h (mlx5's dirty_bytes fix)",
        check_dirty_bytes,
    ),
    Check(
        "data_size.every-state",
        "MIG_DATA_SIZE answers in every state",
        "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE, vfio_ioctl_device_feature_migration_data_size()",
        check_data_size,
    ),
    Check(
        "migration.repeat",
        "save -> load into the same device -> save gives the same bytes",
        "VFIO_DEVICE_STATE_RESUMING in include/uapi/linux/vfio.h",
        check_repeat,
    ),
    Check(
        "migration.two-device",
        "save A -> load into B (same driver and configuration) -> save B: the same bytes and "
        "state; B gets its own state back",
        "VFIO_DEVICE_STATE_RESUMING in include/uapi/linux/vfio.h",
        check_two_devices,
    ),
    Check(
        "dma_logging.rules",
        "DMA_LOGGING START/REPORT/STOP: errnos of bad requests, every page the device wrote is "
        "reported, a report clears, nothing is written in STOP",
        "vfio_ioctl_device_feature_logging_*() in drivers/vfio/vfio_main.c; "
        "mlx5vf_start_page_tracker()",
        check_dma_logging,
    ),
    Check(
        "arc.time",
        "each arc's time (slow arcs fail), and the slowest whole save and load",
        "the downtime QEMU budgets for vfio_save_complete_precopy()",
        check_arc_times,
    ),
    Check(
        "reset.every-state",
        "VFIO_DEVICE_RESET from every state: RUNNING, the session's data_fd is dead",
        "VFIO_DEVICE_RESET in include/uapi/linux/vfio.h; mlx5vf_pci_aer_reset_done()",
        check_reset,
        destructive=True,
    ),
    Check(
        "resume.hardening",
        "empty, truncated, bit-flipped, over-long and foreign-configuration streams fail the "
        "write or RESUMING -> STOP",
        "VFIO_DEVICE_STATE_RESUMING in include/uapi/linux/vfio.h",
        check_resume_hardening,
        destructive=True,
    ),
)


def by_name() -> dict[str, Check]:
    return {c.name: c for c in CHECKS}


__all__ = [
    "CHECKS",
    "AccessError",
    "Check",
    "CheckFailed",
    "CheckSkipped",
    "CheckWarning",
    "Context",
]
