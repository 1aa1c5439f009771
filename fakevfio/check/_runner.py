"""Running checks against devices, and the three report formats.

Rules:

* Each check runs in a daemon worker thread joined with a timeout: a driver
  that hangs is a failed check (``timeout``), never a hung tool. A timed-out
  device is not driven again (its worker may still hold it); its later checks
  fail as ``not run``.
* A check's verdict is ``pass``, ``warn`` (the rule held; something to know,
  e.g. a flipped payload that loaded), ``fail`` or ``skip``; an unexpected
  exception in a check (an errno the rule did not foresee) is a ``fail`` naming
  the operation. Only ``fail`` makes the run fail.
* All devices are opened first; each device's checks see the others as peers
  (the two-device round trip, a stream of another configuration).
* The reports are pure functions of the results: :func:`table`, :func:`to_json`,
  :func:`to_junit_xml`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs

from fakevfio.check._access import Device, open_device
from fakevfio.check._checks import (
    CHECKS,
    SLOW_ARC_S,
    Check,
    CheckFailed,
    CheckSkipped,
    CheckWarning,
    Context,
)

DEFAULT_TIMEOUT_S = 60.0


@attrs.frozen
class CheckResult:
    """One check on one device."""

    check: str
    device: str
    status: str  # "pass" | "warn" | "fail" | "skip"
    detail: str
    seconds: float
    rule: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "fail"


def select(pattern: str | None = None, *, destructive: bool = False) -> list[Check]:
    """The checks to run: ``-k`` glob or substring, destructive ones only if asked."""
    chosen = []
    for check in CHECKS:
        if check.destructive and not destructive:
            continue
        if pattern and not (pattern in check.name or fnmatch.fnmatchcase(check.name, pattern)):
            continue
        chosen.append(check)
    return chosen


def _run_one(check: Check, ctx: Context, timeout: float) -> tuple[str, str, bool]:
    box: list[tuple[str, str]] = []

    def work() -> None:
        try:
            box.append(("pass", check.fn(ctx)))
        except CheckFailed as exc:
            box.append(("fail", str(exc)))
        except CheckSkipped as exc:
            box.append(("skip", str(exc)))
        except CheckWarning as exc:
            box.append(("warn", str(exc)))
        except OSError as exc:
            box.append(("fail", f"unexpected error: {exc}"))
        except Exception as exc:  # noqa: BLE001 - any crash of a check is its failure
            line = traceback.format_exception_only(exc)[-1].strip()
            box.append(("fail", f"check crashed: {line}"))

    worker = threading.Thread(target=work, name=f"check {check.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive() or not box:
        return "fail", f"timeout: no answer within {timeout:g} s (a hung driver?)", True
    status, detail = box[0]
    return status, detail, False


def run_checks(
    devices: Iterable[str | Device],
    *,
    destructive: bool = False,
    pattern: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    slow_arc_s: float = SLOW_ARC_S,
    progress: Callable[[CheckResult], None] | None = None,
    peers: Iterable[str | Device] = (),
) -> list[CheckResult]:
    """Run the selected checks on each device (a path or an opened :class:`Device`).

    ``peers`` are devices that are not checked themselves but serve the checks of
    the others as a round-trip partner or as a source of a foreign stream.
    """
    results: list[CheckResult] = []
    checks = select(pattern, destructive=destructive)
    opened: list[tuple[str | Device, Context, str]] = []
    checked: list[tuple[str | Device, Context, str]] = []
    devices = list(devices)
    for index, spec in enumerate([*devices, *peers]):
        name = spec if isinstance(spec, str) else spec.name
        try:
            dev = open_device(spec) if isinstance(spec, str) else spec
        except OSError as exc:
            results.append(CheckResult("open", name, "fail", str(exc), 0.0))
            continue
        opened.append((spec, Context(dev, slow_arc_s=slow_arc_s, destructive=destructive), name))
        if index < len(devices):
            checked.append(opened[-1])
    contexts = [ctx for _, ctx, _ in opened]
    for ctx in contexts:
        ctx.peers = contexts
    for _spec, ctx, name in checked:
        for check in checks:
            start = time.monotonic()
            if ctx.hung:
                status, detail = "fail", "not run: an earlier check on this device hung"
            else:
                status, detail, hung = _run_one(check, ctx, timeout)
                ctx.hung = hung
            result = CheckResult(
                check.name, name, status, detail, time.monotonic() - start, check.rule
            )
            results.append(result)
            if progress is not None:
                progress(result)
    for spec, ctx, _ in opened:
        if not ctx.hung and isinstance(spec, str):
            ctx.dev.close()
    return results


def table(results: Sequence[CheckResult]) -> str:
    rows = [("CHECK", "DEVICE", "RESULT", "TIME", "DETAIL")]
    rows += [(r.check, r.device, r.status.upper(), f"{r.seconds:.2f}s", r.detail) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip()
        + "  "
        + row[4]
        for row in rows
    ]
    failed = sum(not r.ok for r in results)
    counts = {k: sum(r.status == k for r in results) for k in ("pass", "warn", "skip")}
    lines.append(
        f"{counts['pass']} passed, {counts['warn']} passed with a warning, "
        f"{counts['skip']} skipped, {failed} failed"
    )
    return "\n".join(lines)


def to_json(results: Sequence[CheckResult]) -> str:
    return json.dumps(
        {
            "ok": all(r.ok for r in results),
            "results": [attrs.asdict(r) for r in results],
        },
        indent=2,
    )


def to_junit_xml(results: Sequence[CheckResult]) -> str:
    suite = ET.Element(
        "testsuite",
        name="fakevfio check",
        tests=str(len(results)),
        failures=str(sum(r.status == "fail" for r in results)),
        skipped=str(sum(r.status == "skip" for r in results)),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for r in results:
        case = ET.SubElement(
            suite, "testcase", classname=r.device, name=r.check, time=f"{r.seconds:.3f}"
        )
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.detail).text = f"{r.detail}\nrule: {r.rule}"
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.detail)
        elif r.status == "warn":
            ET.SubElement(case, "system-out").text = f"WARNING: {r.detail}"
    text: str = ET.tostring(suite, encoding="unicode", xml_declaration=True)
    return text


def run_checks_detached(devices: Sequence[str], **kwargs: Any) -> list[CheckResult]:
    """:func:`run_checks` in a forked child that the caller never waits for.

    A check that timed out leaves a thread blocked in the driver, and closing that
    device's files at exit can block too (a FUSE flush queued behind the hung
    request). The child sends its results as one length-prefixed JSON message
    and exits; if its exit hangs, only the child hangs, never the tool.
    """
    progress = kwargs.pop("progress", None)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(rfd)
        # Never keep the caller's stdout/stderr open: a reader waits for their EOF.
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 1)
        os.dup2(null, 2)
        status = 1
        try:
            results = run_checks(devices, **kwargs)
            data = json.dumps([attrs.asdict(r) for r in results]).encode()
            os.write(wfd, len(data).to_bytes(8, "little"))
            view = memoryview(data)
            while view:
                view = view[os.write(wfd, view) :]
            status = 0
        finally:
            os._exit(status)
    os.close(wfd)
    try:
        head = _read_exactly(rfd, 8)
        if len(head) < 8:
            os.waitpid(pid, 0)
            raise RuntimeError("fakevfio check: the worker process died without results")
        body = _read_exactly(rfd, int.from_bytes(head, "little"))
    finally:
        os.close(rfd)
    results = [CheckResult(**r) for r in json.loads(body)]
    if progress is not None:
        for r in results:
            progress(r)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    return results


def _read_exactly(fd: int, n: int) -> bytes:
    parts = []
    while n > 0:
        data = os.read(fd, min(n, 1 << 20))
        if not data:
            break
        parts.append(data)
        n -= len(data)
    return b"".join(parts)
