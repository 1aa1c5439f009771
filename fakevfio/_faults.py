"""Fault-injection rules of ``devices/<name>/faults`` (INTERFACES section 4).

Rules are parsed all at once; a bad line rejects the whole write and leaves the
previous rules active. The grammar, one rule per line::

    arc FROM TO ERRNO          the arc FROM -> TO fails with ERRNO
    read ERRNO after BYTES     session reads fail with ERRNO once BYTES were read
    write ERRNO after BYTES    resuming writes fail with ERRNO once BYTES were written
    delay read|write|arc MS    add MS milliseconds to each such operation
    corrupt after BYTES        flip one bit of the saved stream at offset BYTES
    dirty lose PERCENT         the device's dirty reports (DMA logging and the
                               IOMMU-side trackers) omit PERCENT % (0..100) of the
                               pages it DMA-wrote, chosen deterministically by page
                               (a buggy tracker; see docs/dma.md)
"""

from __future__ import annotations

import attrs

from fakevfio.errors import ConfigError, errno_from_name, errno_name
from vfio_uapi.fsm import State

MAX_RULES = 64
MAX_RULES_TEXT_BYTES = 8192
_MAX_DELAY_MS = 600_000


@attrs.frozen(kw_only=True)
class ArcFault:
    current: State
    nxt: State
    errno: int

    def text(self) -> str:
        return f"arc {self.current.name} {self.nxt.name} {errno_name(self.errno)}"


@attrs.frozen(kw_only=True)
class IoFault:
    op: str  # "read" or "write"
    errno: int
    after: int

    def text(self) -> str:
        return f"{self.op} {errno_name(self.errno)} after {self.after}"


@attrs.frozen(kw_only=True)
class DelayFault:
    op: str  # "read", "write" or "arc"
    ms: int

    def text(self) -> str:
        return f"delay {self.op} {self.ms}"


@attrs.frozen(kw_only=True)
class CorruptFault:
    after: int

    def text(self) -> str:
        return f"corrupt after {self.after}"


@attrs.frozen(kw_only=True)
class DirtyLoseFault:
    """A buggy dirty tracker: the device's dirty reports omit ``percent`` % of written pages."""

    percent: int

    def text(self) -> str:
        return f"dirty lose {self.percent}"


Fault = ArcFault | IoFault | DelayFault | CorruptFault | DirtyLoseFault


@attrs.frozen
class FaultRules:
    """The active rules of one device."""

    rules: tuple[Fault, ...] = ()

    @classmethod
    def parse(cls, text: str) -> FaultRules:
        """Parse the whole ``faults`` file.

        Raises:
            ConfigError: naming the line and what was expected.
        """
        if len(text.encode()) > MAX_RULES_TEXT_BYTES:
            raise ConfigError(f"fault rules longer than {MAX_RULES_TEXT_BYTES} bytes")
        rules: list[Fault] = []
        for number, line in enumerate(text.splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            try:
                rules.append(_parse_rule(words))
            except ConfigError as exc:
                raise ConfigError(
                    f"fault rule line {number} {line.strip()[:80]!r}: {exc}"
                ) from None
        if len(rules) > MAX_RULES:
            raise ConfigError(f"{len(rules)} fault rules (at most {MAX_RULES})")
        return cls(tuple(rules))

    def text(self) -> str:
        return "".join(rule.text() + "\n" for rule in self.rules)

    def arc_errno(self, current: State, nxt: State) -> int | None:
        for rule in self.rules:
            if isinstance(rule, ArcFault) and rule.current == current and rule.nxt == nxt:
                return rule.errno
        return None

    def io_fault(self, op: str) -> IoFault | None:
        for rule in self.rules:
            if isinstance(rule, IoFault) and rule.op == op:
                return rule
        return None

    def delay_ms(self, op: str) -> int:
        return sum(r.ms for r in self.rules if isinstance(r, DelayFault) and r.op == op)

    def corrupt_offsets(self) -> list[int]:
        return [r.after for r in self.rules if isinstance(r, CorruptFault)]

    def dirty_lose_percent(self) -> int:
        """The share (0..100) of written pages the dirty reports omit (the largest rule)."""
        return max((r.percent for r in self.rules if isinstance(r, DirtyLoseFault)), default=0)


def _int(word: str, what: str) -> int:
    if not (word.isascii() and word.isdigit()) or len(word) > 19:
        raise ConfigError(f"{what} {word!r} is not a non-negative integer")
    return int(word)


def _state(word: str) -> State:
    try:
        return State[word.upper()]
    except KeyError:
        raise ConfigError(f"unknown state {word!r}") from None


def _parse_rule(words: list[str]) -> Fault:
    kind = words[0]
    if kind == "arc" and len(words) == 4:
        return ArcFault(
            current=_state(words[1]), nxt=_state(words[2]), errno=errno_from_name(words[3])
        )
    if kind in ("read", "write") and len(words) == 4 and words[2] == "after":
        return IoFault(op=kind, errno=errno_from_name(words[1]), after=_int(words[3], "byte count"))
    if kind == "delay" and len(words) == 3 and words[1] in ("read", "write", "arc"):
        ms = _int(words[2], "delay")
        if ms > _MAX_DELAY_MS:
            raise ConfigError(f"delay {ms} ms is longer than {_MAX_DELAY_MS} ms")
        return DelayFault(op=words[1], ms=ms)
    if kind == "corrupt" and len(words) == 3 and words[1] == "after":
        return CorruptFault(after=_int(words[2], "byte offset"))
    if kind == "dirty" and len(words) == 3 and words[1] == "lose":
        percent = _int(words[2], "percentage")
        if percent > 100:
            raise ConfigError(f"dirty lose {percent}: a percentage is 0..100")
        return DirtyLoseFault(percent=percent)
    raise ConfigError(
        "expected one of: 'arc FROM TO ERRNO', 'read ERRNO after BYTES', "
        "'write ERRNO after BYTES', 'delay read|write|arc MS', 'corrupt after BYTES', "
        "'dirty lose PERCENT'"
    )
