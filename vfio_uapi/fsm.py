"""The kernel's VFIO migration state machine, as pure data and two functions.

Theory of operation
-------------------
A VFIO migration driver moves between the eight states of
``enum vfio_device_mig_state``. Userspace asks for a *target* state; the kernel
(``vfio_mig_get_next_state()`` in ``drivers/vfio/vfio_main.c``) picks the next
single *arc* towards it, the driver executes that arc, and the loop repeats
until the target is reached or an arc fails.

Rule 1: the path is the kernel's shortest path, computed from ``TABLE`` with the
        optional states the device does not support skipped.
Rule 2: saving-group states (PRE_COPY, PRE_COPY_P2P, STOP_COPY) are only ever the
        first or last state of a path, never passed through.
Rule 3: ERROR is never a target. From ERROR nothing but ERROR can be requested
        (and that request is a no-op); only a reset leaves ERROR.
Rule 4: STOP_COPY -> PRE_COPY and STOP_COPY -> PRE_COPY_P2P are refused with
        EINVAL (unpatched kernels spin forever there; we never do).
Rule 5: a new migration session (a new data_fd in the kernel) starts only when
        the *final* arc is one of ``NEW_SESSION_ARCS``; the session ends on any
        of ``END_SESSION_ARCS``, on reset and on ERROR. :func:`session_change`
        is the one place that rule is worked out: the device model, the
        ``fakevfio run`` supervisor and both migrator backends ask it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import attrs

from vfio_uapi.errors import IllegalTransition


class State(enum.IntEnum):
    """``enum vfio_device_mig_state``; the values are the uAPI numbers."""

    ERROR = 0
    STOP = 1
    RUNNING = 2
    STOP_COPY = 3
    RESUMING = 4
    RUNNING_P2P = 5
    PRE_COPY = 6
    PRE_COPY_P2P = 7


class MigFlags(enum.IntFlag):
    """``VFIO_MIGRATION_*`` bits of ``vfio_device_feature_migration.flags``."""

    STOP_COPY = 1
    P2P = 2
    PRE_COPY = 4


#: The only flag words the uAPI defines.
VALID_FLAGS: tuple[MigFlags, ...] = (
    MigFlags.STOP_COPY,
    MigFlags.STOP_COPY | MigFlags.P2P,
    MigFlags.STOP_COPY | MigFlags.PRE_COPY,
    MigFlags.STOP_COPY | MigFlags.P2P | MigFlags.PRE_COPY,
)

_S = State
# fmt: off
#: Raw next step for (current, target), before unsupported states are skipped.
TABLE: Mapping[State, Mapping[State, State]] = {
    _S.STOP: {
        _S.STOP: _S.STOP, _S.RUNNING: _S.RUNNING_P2P, _S.STOP_COPY: _S.STOP_COPY,
        _S.RESUMING: _S.RESUMING, _S.RUNNING_P2P: _S.RUNNING_P2P,
        _S.PRE_COPY: _S.RUNNING_P2P, _S.PRE_COPY_P2P: _S.RUNNING_P2P, _S.ERROR: _S.ERROR,
    },
    _S.RUNNING: {
        _S.STOP: _S.RUNNING_P2P, _S.RUNNING: _S.RUNNING, _S.STOP_COPY: _S.RUNNING_P2P,
        _S.RESUMING: _S.RUNNING_P2P, _S.RUNNING_P2P: _S.RUNNING_P2P,
        _S.PRE_COPY: _S.PRE_COPY, _S.PRE_COPY_P2P: _S.RUNNING_P2P, _S.ERROR: _S.ERROR,
    },
    _S.PRE_COPY: {
        _S.STOP: _S.RUNNING, _S.RUNNING: _S.RUNNING, _S.STOP_COPY: _S.PRE_COPY_P2P,
        _S.RESUMING: _S.RUNNING, _S.RUNNING_P2P: _S.RUNNING,
        _S.PRE_COPY: _S.PRE_COPY, _S.PRE_COPY_P2P: _S.PRE_COPY_P2P, _S.ERROR: _S.ERROR,
    },
    _S.PRE_COPY_P2P: {
        _S.STOP: _S.RUNNING_P2P, _S.RUNNING: _S.RUNNING_P2P, _S.STOP_COPY: _S.STOP_COPY,
        _S.RESUMING: _S.RUNNING_P2P, _S.RUNNING_P2P: _S.RUNNING_P2P,
        _S.PRE_COPY: _S.PRE_COPY, _S.PRE_COPY_P2P: _S.PRE_COPY_P2P, _S.ERROR: _S.ERROR,
    },
    _S.STOP_COPY: {
        _S.STOP: _S.STOP, _S.RUNNING: _S.STOP, _S.STOP_COPY: _S.STOP_COPY,
        _S.RESUMING: _S.STOP, _S.RUNNING_P2P: _S.STOP,
        _S.PRE_COPY: _S.ERROR, _S.PRE_COPY_P2P: _S.ERROR, _S.ERROR: _S.ERROR,
    },
    _S.RESUMING: {
        _S.STOP: _S.STOP, _S.RUNNING: _S.STOP, _S.STOP_COPY: _S.STOP,
        _S.RESUMING: _S.RESUMING, _S.RUNNING_P2P: _S.STOP,
        _S.PRE_COPY: _S.STOP, _S.PRE_COPY_P2P: _S.STOP, _S.ERROR: _S.ERROR,
    },
    _S.RUNNING_P2P: {
        _S.STOP: _S.STOP, _S.RUNNING: _S.RUNNING, _S.STOP_COPY: _S.STOP,
        _S.RESUMING: _S.STOP, _S.RUNNING_P2P: _S.RUNNING_P2P,
        _S.PRE_COPY: _S.RUNNING, _S.PRE_COPY_P2P: _S.PRE_COPY_P2P, _S.ERROR: _S.ERROR,
    },
    _S.ERROR: dict.fromkeys(State, _S.ERROR),
}

#: Flag bits a state needs; ERROR needs bits no device has.
_STATE_FLAGS: Mapping[State, int] = {
    _S.STOP: 1, _S.RUNNING: 1, _S.STOP_COPY: 1, _S.RESUMING: 1,
    _S.RUNNING_P2P: 3, _S.PRE_COPY: 5, _S.PRE_COPY_P2P: 7, _S.ERROR: 0xFFFFFFFF,
}

# fmt: on

#: Arcs that return a new data_fd (start a migration session).
NEW_SESSION_ARCS: frozenset[tuple[State, State]] = frozenset(
    {
        (_S.RUNNING, _S.PRE_COPY),
        (_S.RUNNING_P2P, _S.PRE_COPY_P2P),
        (_S.STOP, _S.STOP_COPY),
        (_S.STOP, _S.RESUMING),
    }
)

#: Arcs that end the live session.
END_SESSION_ARCS: frozenset[tuple[State, State]] = frozenset(
    {
        (_S.STOP_COPY, _S.STOP),
        (_S.PRE_COPY, _S.RUNNING),
        (_S.PRE_COPY_P2P, _S.RUNNING_P2P),
        (_S.RESUMING, _S.STOP),
    }
)

SAVING_STATES: frozenset[State] = frozenset({_S.PRE_COPY, _S.PRE_COPY_P2P, _S.STOP_COPY})
PRECOPY_STATES: frozenset[State] = frozenset({_S.PRE_COPY, _S.PRE_COPY_P2P})
#: States in which the device runs (and, with a workload, changes its state).
RUNNING_STATES: frozenset[State] = frozenset({_S.RUNNING, _S.PRE_COPY})


def supported(state: State, flags: int) -> bool:
    """Whether a device with migration ``flags`` can be in ``state``."""
    need = _STATE_FLAGS[state]
    return (need & flags) == need


def parse_flags(text: str) -> MigFlags:
    """Parse ``STOP_COPY+P2P+PRE_COPY`` (``+``, ``|`` or spaces) into a valid flag word.

    Raises:
        ValueError: an unknown name, or a combination the uAPI does not define.
    """
    value = MigFlags(0)
    for part in text.replace("|", "+").replace(" ", "+").split("+"):
        if not part:
            continue
        try:
            value |= MigFlags[part.strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown migration flag {part!r} (expected STOP_COPY, P2P, PRE_COPY)"
            ) from None
    if value not in VALID_FLAGS:
        raise ValueError(
            f"migration flags {text!r} are not a combination the uAPI defines "
            "(STOP_COPY is required; P2P and PRE_COPY are optional)"
        )
    return value


def flags_text(flags: int) -> str:
    """The ``migration/flags`` text: names in uAPI bit order, one space apart."""
    return " ".join(f.name or "" for f in MigFlags if flags & f)


def parse_state(text: str) -> State:
    """Parse a state name or its uAPI number.

    Raises:
        ValueError: not a state name, or a number outside 0..7.
    """
    word = text.strip()
    if word.isdigit():
        number = int(word)
        if number >= len(State):
            raise ValueError(f"state number {number} is out of range (0..7)")
        return State(number)
    try:
        return State[word.upper()]
    except KeyError:
        raise ValueError(
            f"unknown state {word!r} (expected one of {', '.join(s.name for s in State)} "
            "or a number 0..7)"
        ) from None


def next_state(current: State, target: State, flags: int) -> State:
    """One step of ``vfio_mig_get_next_state()`` (with the 2026 loop fix).

    Raises:
        IllegalTransition: ``current`` or ``target`` unsupported (ERROR included),
            or no path exists (STOP_COPY -> PRE_COPY*).
    """
    if not supported(current, flags):
        raise IllegalTransition(current.name, target.name, "the current state allows no moves")
    if not supported(target, flags):
        reason = (
            "ERROR cannot be requested"
            if target is State.ERROR
            else f"the device does not support {target.name} (flags: {flags_text(flags)})"
        )
        raise IllegalTransition(current.name, target.name, reason)
    step = TABLE[current][target]
    while step is not State.ERROR and not supported(step, flags):
        step = TABLE[step][target]
    if step is State.ERROR:
        raise IllegalTransition(current.name, target.name, "no path exists (uAPI forbids it)")
    return step


def path(current: State, target: State, flags: int) -> list[tuple[State, State]]:
    """The arcs one SET request executes, in order; empty when ``current == target``.

    Raises:
        IllegalTransition: as :func:`next_state`, before any arc would run.
    """
    arcs: list[tuple[State, State]] = []
    state = current
    while state != target:
        step = next_state(state, target, flags)
        arcs.append((state, step))
        state = step
    return arcs


@attrs.frozen
class SessionChange:
    """What a run of arcs does to the migration session (Rule 5).

    Attributes:
        ends: the session that was live before the arcs (if any) is over.
        opens: a new session (a new data_fd) starts.
        writable: the new session is a resuming one (data is written to it);
            meaningless unless ``opens``.
    """

    ends: bool
    opens: bool
    writable: bool = False


#: The change of no arc at all (current == target, or the first arc failed).
NO_CHANGE = SessionChange(ends=False, opens=False)


def arcs_session_change(arcs: Iterable[tuple[State, State]]) -> SessionChange:
    """The session effect of ``arcs``, executed in order (Rule 5).

    Only the final arc can open a session (a new data_fd is returned only when
    it ends the request); a newly opened session replaces any live one.
    """
    ends = False
    last: tuple[State, State] | None = None
    for arc in arcs:
        ends = ends or arc in END_SESSION_ARCS
        last = arc
    if last is not None and last in NEW_SESSION_ARCS:
        return SessionChange(ends=True, opens=True, writable=last[1] is State.RESUMING)
    return SessionChange(ends=ends, opens=False)


def session_change(current: State, target: State, flags: int) -> SessionChange:
    """The session effect of one SET request from ``current`` to ``target``.

    Raises:
        IllegalTransition: as :func:`path`.
    """
    return arcs_session_change(path(current, target, flags))
