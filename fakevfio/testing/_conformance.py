"""The driver conformance kit: the project's rules for drivers, run on in-process devices.

In the spirit of trio's ``check_two_way_stream``: a plugin's tests hand over
a factory, and the kit makes devices from it and drives them through every
rule of :mod:`fakevfio.driver` and ``docs``' state machine::

    from fakevfio.testing import check_state_driver

    def test_my_driver_follows_the_rules() -> None:
        check_state_driver(
            lambda name: MyDriver(name, {"seed": "1"}),       # sources
            dest_factory=lambda name: MyDriver(name, {}),     # destinations
        )

Rules that are also uAPI rules are not written twice: they run the checks of
:mod:`fakevfio.check` (``fakevfio check``'s, the same code that drives mounts and
kernel devices) on the in-process device through :class:`LocalCheckDevice`, an
adapter from :class:`LocalDevice` to :class:`fakevfio.check.Device`
("end of stream is final" is ``data_fd.stop-copy-eof``, "reset" is
``reset.every-state``). :func:`check_uapi` runs every check that way.

``factory(name)`` returns a new driver; sources come from ``factory`` and
destinations from ``dest_factory`` (default: the same). Give sources state
the destinations do not have (a seed, a workload), so that equal digests after
a migration mean something. Each rule is also a function of its own, listed in
:data:`ARC_DRIVER_RULES` and :data:`STATE_DRIVER_RULES` (to parametrize a
test over them). A broken rule raises :class:`DriverRuleError`, an
``AssertionError`` (pytest reports a failure), naming the rule.
"""

from __future__ import annotations

import errno
import json
import string
from collections.abc import Callable, Iterable, Mapping

from fakevfio import _stream, check
from fakevfio._device import Session
from fakevfio.driver import PCI_CONFIG_SIZES, ArcDriver, PrecopyInfo, StateDriver
from fakevfio.errors import DeviceError
from fakevfio.testing._local import (
    LOAD_CHUNK,
    SAVE_CHUNK,
    DriverFactory,
    LocalDevice,
    make_device,
)
from vfio_uapi.fsm import VALID_FLAGS, MigFlags, State

#: Per-check timeout of the uAPI checks run in process (a hung driver fails its rule).
UAPI_TIMEOUT_S = 60.0

#: Read/write sizes the round trip is run with: single bytes, odd sizes, the migrator's.
CHUNKS = (1, 7, LOAD_CHUNK, SAVE_CHUNK)
#: Workload time before a save and between pre-copy rounds (drivers with a workload).
WORKLOAD_S = 0.05
PRECOPY_ROUNDS = 3

Rule = Callable[[DriverFactory, DriverFactory], None]
Dev = LocalDevice[ArcDriver]


class DriverRuleError(AssertionError):
    """A driver broke one of the project's rules (:attr:`rule` says which)."""

    def __init__(self, rule: str, detail: str) -> None:
        self.rule = rule
        self.detail = detail
        super().__init__(f"driver rule {rule!r} broken: {detail}")


def _expect(ok: bool, rule: str, detail: str) -> None:
    if not ok:
        raise DriverRuleError(rule, detail)


def _expect_errno(rule: str, err: int | None, what: str, fn: Callable[[], object]) -> DeviceError:
    """``fn()`` must raise DeviceError (with ``err`` unless None); return it."""
    try:
        fn()
    except DeviceError as exc:
        _expect(
            err is None or exc.errno == err,
            rule,
            f"{what}: errno {errno.errorcode.get(exc.errno, exc.errno)}, expected "
            f"{errno.errorcode.get(err or 0)}",
        )
        return exc
    raise DriverRuleError(rule, f"{what} succeeded")


def _pair(factory: DriverFactory, dest_factory: DriverFactory) -> tuple[Dev, Dev]:
    return make_device(factory, "src"), make_device(dest_factory, "dst")


def _work(dev: Dev) -> None:
    if dev.driver.has_workload():
        dev.advance(WORKLOAD_S)


# -- save/load helpers ----------------------------------------------------------------------
def round_trip(
    src: Dev,
    dst: Dev,
    *,
    save_chunk: int = SAVE_CHUNK,
    load_chunk: int = LOAD_CHUNK,
) -> bytes:
    """Save ``src`` (STOP_COPY, drain, STOP), load it into ``dst``, compare digests.

    Returns the stream. Both devices end in STOP.

    Raises:
        DriverRuleError: saving changed the source, or the digests differ.
    """
    rule = "round trip"
    src.set_state(State.STOP)
    before = src.digest()
    stream = src.save(save_chunk)
    _expect(src.digest() == before, rule, "saving changed the source's state_digest")
    dst.load(stream, load_chunk)
    _expect(dst.state() is State.STOP, rule, f"destination in {dst.state().name} after load")
    _expect(
        dst.digest() == before,
        rule,
        f"destination digest {dst.digest()[:16]}... != source {before[:16]}... after "
        f"{len(stream)} bytes in reads of {save_chunk} and writes of {load_chunk}",
    )
    return stream


def migrate_local(
    factory: DriverFactory,
    dest_factory: DriverFactory | None = None,
    chunk: int = LOAD_CHUNK,
) -> tuple[Dev, Dev, bytes]:
    """New source and destination from the factories, the source's workload run, one round trip.

    Returns (source, destination, stream).
    """
    src, dst = _pair(factory, dest_factory or factory)
    _work(src)
    return src, dst, round_trip(src, dst, save_chunk=chunk, load_chunk=chunk)


#: Where a StateDriver's own header starts in its stream (after the core's header).
DRIVER_HEADER_OFFSET = _stream.HEADER.size


def state_stream_offset(driver: StateDriver, state_offset: int) -> int:
    """Where byte ``state_offset`` of a StateDriver's state sits in a fresh STOP_COPY stream.

    For tests that corrupt one field of the state on its way (the stream
    carries the state in offset order, after the core's and the driver's header).
    """
    run = _stream._run_bytes(driver)
    head = DRIVER_HEADER_OFFSET + len(driver.header())
    return head + (state_offset // run + 1) * _stream.RECORD.size + state_offset


# -- rules of every driver -------------------------------------------------------------------
def check_description(factory: DriverFactory, dest_factory: DriverFactory) -> None:
    """Flags one of the uAPI's four words; config 256/4096 bytes; digest hex; info JSON."""
    rule = "description"
    driver = factory("src")
    flags = driver.migration_flags
    _expect(flags in VALID_FLAGS, rule, f"migration_flags {flags!r} is not a uAPI flag word")
    config = driver.initial_config()
    _expect(len(config) in PCI_CONFIG_SIZES, rule, f"initial_config() is {len(config)} bytes")
    dev = LocalDevice(driver)
    digest = dev.digest()
    _expect(
        len(digest) == 64 and set(digest) <= set(string.hexdigits.lower()),
        rule,
        f"digest() {digest!r} is not a hex SHA-256",
    )
    for name, size in dev.regions().items():
        _expect(size >= 0, rule, f"region {name!r} has size {size}")
    try:
        json.dumps(dev.info())
    except (TypeError, ValueError) as exc:
        raise DriverRuleError(rule, f"info() is not JSON for the info file: {exc}") from None
    dev.close()


def check_round_trip(
    factory: DriverFactory, dest_factory: DriverFactory, chunks: Iterable[int] = CHUNKS
) -> None:
    """Any read and write segmentation migrates the state: equal digests, destination runs."""
    for chunk in chunks:
        src, dst, _ = migrate_local(factory, dest_factory, chunk)
        dst.set_state(State.RUNNING)
        src.set_state(State.RUNNING)


def check_end_of_stream_is_final(factory: DriverFactory, dest_factory: DriverFactory) -> None:
    """In STOP_COPY, once a read returned b"" every later read does too.

    The check is ``fakevfio check``'s ``data_fd.stop-copy-eof``.
    """
    src = make_device(factory)
    _work(src)
    _run_uapi("end of stream is final", src, None, "data_fd.stop-copy-eof")


def check_save_twice(factory: DriverFactory, dest_factory: DriverFactory) -> None:
    """STOP -> STOP_COPY opens a new, complete stream every time."""
    rule = "save twice"
    src = make_device(factory)
    _work(src)
    first = src.save()
    _expect(src.set_state(State.STOP_COPY), rule, "a second STOP -> STOP_COPY opened no session")
    second = src.drain()
    src.set_state(State.STOP)
    for stream in (first, second):
        dst = make_device(dest_factory, "dst")
        dst.load(stream)
        _expect(dst.digest() == src.digest(), rule, "a stream of the second save does not load")


def check_incomplete_stream(factory: DriverFactory, dest_factory: DriverFactory) -> None:
    """RESUMING -> STOP refuses an incomplete stream and stays RESUMING; reset recovers."""
    rule = "incomplete stream"
    src, dst = _pair(factory, dest_factory)
    _work(src)
    stream = src.save()
    for cut in sorted({0, len(stream) // 2, len(stream) - 1}):
        if cut >= len(stream):
            continue
        dst.start_load(stream[:cut])
        _expect_errno(
            rule,
            None,
            f"RESUMING -> STOP after {cut} of {len(stream)} bytes",
            lambda: dst.set_state(State.STOP),
        )
        _expect(dst.state() is State.RESUMING, rule, f"in {dst.state().name} after a failed STOP")
        dst.reset()
        _expect(dst.state() is State.RUNNING, rule, "reset did not return to RUNNING")
    round_trip(src, dst)


def check_reset(factory: DriverFactory, dest_factory: DriverFactory) -> None:
    """Reset in every state: RUNNING, the session ended (``reset.every-state``); then a
    migration works again."""
    src, dst = _pair(factory, dest_factory)
    _work(src)
    _run_uapi("reset", src, None, "reset.every-state")
    round_trip(src, dst)


def check_precopy(factory: DriverFactory, dest_factory: DriverFactory) -> None:
    """PRE_COPY (if supported): ENOMSG at the temporary end, estimates that only shrink
    while reading, STOP_COPY continues the same stream, RUNNING ends it."""
    rule = "pre-copy"
    src, dst = _pair(factory, dest_factory)
    if not src.driver.migration_flags & MigFlags.PRE_COPY:
        return
    _work(src)
    _expect(src.set_state(State.PRE_COPY), rule, "RUNNING -> PRE_COPY opened no session")
    stream = bytearray(_precopy_drain(src, rule))
    _expect(
        src.precopy_info().initial_bytes == 0,
        rule,
        f"initial_bytes {src.precopy_info().initial_bytes} at the temporary end",
    )
    for _ in range(PRECOPY_ROUNDS if src.driver.has_workload() else 0):
        src.advance(WORKLOAD_S)
        stream += _precopy_drain(src, rule)
    _expect(not src.set_state(State.STOP_COPY), rule, "STOP_COPY opened a new session")
    _expect(src.session_alive(), rule, "the pre-copy session ended at STOP_COPY")
    stream += src.drain()
    src.set_state(State.STOP)
    dst.load(bytes(stream))
    _expect(dst.digest() == src.digest(), rule, "pre-copy + stop-copy stream: digests differ")
    again = make_device(factory)
    again.set_state(State.PRE_COPY)
    again.set_state(State.RUNNING)
    _expect(not again.session_alive(), rule, "PRE_COPY -> RUNNING kept the session")
    _expect_errno(rule, errno.ENODEV, "a read after PRE_COPY -> RUNNING", lambda: again.read(1))


def _precopy_drain(dev: Dev, rule: str) -> bytes:
    """Read to the temporary end, checking that the estimates never grow while reading."""
    out = bytearray()
    last = dev.precopy_info()
    _expect(last.initial_bytes >= 0 and last.dirty_bytes >= 0, rule, f"precopy_info() {last}")
    while (data := dev.try_read(LOAD_CHUNK)) is not None:
        _expect(bool(data), rule, "a pre-copy read returned b'' instead of failing with ENOMSG")
        out += data
        info = dev.precopy_info()
        _expect(
            info.initial_bytes <= last.initial_bytes,
            rule,
            f"initial_bytes grew while reading: {last.initial_bytes} -> {info.initial_bytes}",
        )
        last = info
    return bytes(out)


# -- rules of StateDriver drivers ------------------------------------------------------------
def check_state_description(factory: DriverFactory, dest_factory: DriverFactory) -> None:
    """A StateDriver with a constant state_size() and a header of at most 4096 bytes."""
    rule = "state driver"
    driver = factory("src")
    _expect(isinstance(driver, StateDriver), rule, f"{type(driver).__name__} is no StateDriver")
    assert isinstance(driver, StateDriver)
    size = driver.state_size()
    _expect(size >= 0 and driver.state_size() == size, rule, "state_size() is not constant")
    header = driver.header()
    _expect(
        len(header) <= _stream.MAX_DRIVER_HEADER_BYTES, rule, f"header() is {len(header)} bytes"
    )


def check_header_checked_first(factory: DriverFactory, dest_factory: DriverFactory) -> None:
    """A stream with another driver header is refused before any state is loaded."""
    rule = "driver header"
    src, dst = _pair(factory, dest_factory)
    assert isinstance(src.driver, StateDriver)
    if not src.driver.header():
        return
    _work(src)
    stream = bytearray(src.save())
    stream[DRIVER_HEADER_OFFSET] ^= 0x20  # the driver header's first byte
    before = dst.digest()

    def load() -> None:
        dst.load(bytes(stream), 7)

    _expect_errno(rule, None, "loading a stream with a changed driver header", load)
    _expect(dst.digest() == before, rule, "state was loaded before the header was checked")
    _expect(dst.state() is State.RESUMING, rule, f"in {dst.state().name} after the refusal")
    dst.reset()
    round_trip(src, dst)


def check_dirty_tracking(factory: DriverFactory, dest_factory: DriverFactory) -> None:
    """In pre-copy, a workload that changes the state reports it (mark_dirty -> dirty_bytes)."""
    rule = "dirty tracking"
    src = make_device(factory)
    if not (src.driver.migration_flags & MigFlags.PRE_COPY and src.driver.has_workload()):
        return
    src.set_state(State.PRE_COPY)
    src.drain()
    for _ in range(PRECOPY_ROUNDS):
        before = src.digest()
        src.advance(WORKLOAD_S)
        if src.digest() != before:
            _expect(
                src.precopy_info().dirty_bytes > 0,
                rule,
                "the workload changed the state but dirty_bytes is 0 (mark_dirty missing?)",
            )
        src.drain()
        _expect(src.precopy_info().dirty_bytes == 0, rule, "dirty_bytes > 0 after draining")
    src.reset()


# -- the uAPI checks of fakevfio.check, in process -----------------------------------------
class LocalCheckDevice:
    """:class:`fakevfio.check.Device` over an in-process :class:`LocalDevice`.

    Data "fds" are handles bound to the session live when they were opened, as a
    ``migration/data`` file handle is; the core's :class:`DeviceError` becomes
    :class:`fakevfio.check.AccessError` (an ``OSError`` with the same errno).
    DMA logging needs a VMM's memory: :meth:`dma_logging` says no.
    """

    has_files = True

    def __init__(self, dev: Dev) -> None:
        self.local = dev
        self.name = dev.name
        self.flags = dev.driver.migration_flags
        self._handles: dict[int, Session] = {}
        self._next = 1

    def _call(self, op: str, fn: Callable[[], object]) -> object:
        try:
            return fn()
        except DeviceError as exc:
            raise check.AccessError(self.name, op, exc.errno, str(exc)) from None

    def state(self) -> State:
        return self.local.state()

    def set_state(self, target: State | int) -> bool:
        if int(target) not in {int(s) for s in State}:
            raise check.AccessError(self.name, f"set state {int(target)}", errno.EINVAL)
        wanted = State(int(target))
        return bool(self._call(f"set state {wanted.name}", lambda: self.local.set_state(wanted)))

    def open_data(self, write: bool) -> int:
        core = self.local._device
        session = self._call("open data", lambda: core.open_session(read=not write, write=write))
        assert isinstance(session, Session)
        handle = self._next
        self._next += 1
        self._handles[handle] = session
        return handle

    def read(self, fd: int, size: int) -> bytes:
        core, session = self.local._device, self._handles[fd]
        data = self._call("read", lambda: core.read(session, size)[0])
        assert isinstance(data, bytes | bytearray | memoryview)
        return bytes(data)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        core, session = self.local._device, self._handles[fd]
        done = self._call("write", lambda: core.write(session, memoryview(data))[0])
        assert isinstance(done, int)
        return done

    def close_data(self, fd: int) -> None:
        self._handles.pop(fd, None)

    def precopy_info(self, fd: int) -> tuple[int, int]:
        del fd  # the device answers for its live session
        info = self._call("precopy_info", self.local.precopy_info)
        assert isinstance(info, PrecopyInfo)
        return info.initial_bytes, info.dirty_bytes

    def data_size(self) -> int:
        size = self._call("data_size", self.local.data_size)
        assert isinstance(size, int)
        return size

    def reset(self) -> None:
        self.local.reset()

    def log(self) -> list[str]:
        return self.local.log()

    def digest(self) -> str | None:
        return self.local.digest()

    def set_faults(self, rules: str) -> None:
        self.local.set_faults(rules)

    def identity(self) -> str:
        return f"driver {type(self.local.driver).__name__}"

    def configuration(self) -> str:
        regions = dict(self.local.regions())
        return json.dumps({"config": len(self.local.config()), "regions": regions})

    def dma_logging(self) -> bool:
        return False

    def _no_dma(self, op: str) -> check.AccessError:
        return check.AccessError(self.name, op, errno.ENOTTY, "no VMM memory in process")

    def dma_map(self, iova: int, vaddr: int, length: int) -> None:
        raise self._no_dma("dma map")

    def dma_unmap(self, iova: int, length: int) -> None:
        raise self._no_dma("dma unmap")

    def log_start(self, page_size: int, ranges: list[tuple[int, int]]) -> int:
        raise self._no_dma("log start")

    def log_stop(self) -> None:
        raise self._no_dma("log stop")

    def log_report(self, iova: int, length: int, page_size: int) -> bytes:
        raise self._no_dma("log report")

    def close(self) -> None:
        self._handles.clear()


def _run_uapi(rule: str, dev: Dev, peer: Dev | None, pattern: str | None) -> None:
    """Run fakevfio.check's checks matching ``pattern`` on ``dev``; a failure breaks ``rule``."""
    peers = [LocalCheckDevice(peer)] if peer is not None else []
    results = check.run_checks(
        [LocalCheckDevice(dev)],
        destructive=True,
        pattern=pattern,
        timeout=UAPI_TIMEOUT_S,
        peers=peers,
    )
    failed = [r for r in results if not r.ok]
    if failed:
        raise DriverRuleError(rule, "; ".join(f"{r.check}: {r.detail}" for r in failed))


def check_uapi(factory: DriverFactory, dest_factory: DriverFactory | None = None) -> None:
    """Every check of ``fakevfio check`` (:data:`fakevfio.check.CHECKS`) on an in-process
    device from ``factory``, a device from ``dest_factory`` as its peer.

    Raises:
        DriverRuleError: rule "uapi", naming each failed check.
    """
    src = make_device(factory, "src")
    dst = make_device(dest_factory or factory, "dst")
    _work(src)
    _run_uapi("uapi", src, dst, None)


ARC_DRIVER_RULES: Mapping[str, Rule] = {
    "description": check_description,
    "round trip": check_round_trip,
    "end of stream is final": check_end_of_stream_is_final,
    "save twice": check_save_twice,
    "incomplete stream": check_incomplete_stream,
    "reset": check_reset,
    "pre-copy": check_precopy,
}
STATE_DRIVER_RULES: Mapping[str, Rule] = {
    "state driver": check_state_description,
    **ARC_DRIVER_RULES,
    "driver header": check_header_checked_first,
    "dirty tracking": check_dirty_tracking,
}


def _check(
    rules: Mapping[str, Rule], factory: DriverFactory, dest_factory: DriverFactory | None
) -> None:
    for rule in rules.values():
        rule(factory, dest_factory or factory)


def check_arc_driver(factory: DriverFactory, dest_factory: DriverFactory | None = None) -> None:
    """Run every rule of :data:`ARC_DRIVER_RULES` on devices from the factories.

    Raises:
        DriverRuleError: the first rule the driver breaks.
    """
    _check(ARC_DRIVER_RULES, factory, dest_factory)


def check_state_driver(factory: DriverFactory, dest_factory: DriverFactory | None = None) -> None:
    """:func:`check_arc_driver` plus the StateDriver rules (:data:`STATE_DRIVER_RULES`)."""
    _check(STATE_DRIVER_RULES, factory, dest_factory)


__all__ = [
    "ARC_DRIVER_RULES",
    "CHUNKS",
    "DRIVER_HEADER_OFFSET",
    "STATE_DRIVER_RULES",
    "DriverRuleError",
    "LocalCheckDevice",
    "Rule",
    "check_arc_driver",
    "check_description",
    "check_dirty_tracking",
    "check_end_of_stream_is_final",
    "check_header_checked_first",
    "check_incomplete_stream",
    "check_precopy",
    "check_reset",
    "check_round_trip",
    "check_save_twice",
    "check_state_description",
    "check_state_driver",
    "check_uapi",
    "migrate_local",
    "round_trip",
    "state_stream_offset",
]
