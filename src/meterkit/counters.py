"""The rule every store applies, atomically, to quota counters.

Stores differ only in how they make the read-decide-write atomic (a lock, ``BEGIN
IMMEDIATE``, row locks, a server-side function, a Lua script); the decision itself is
:func:`apply`, which PostgreSQL's ``mk_counters_apply`` and Redis's ``apply.lua`` mirror line for
line. :class:`meterkit.testing.CounterConformance` holds every store to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from meterkit.models import CounterLine, CounterResult, Hold
from meterkit.validate import MAX_VALUE

__all__ = [
    "MAX_COUNTER",
    "CounterBackend",
    "admits",
    "apply",
    "clamp",
    "decide",
    "fits",
    "release_expired",
    "settle",
]

MAX_COUNTER = MAX_VALUE
"""The largest amount, limit or counter value: every backend holds it exactly (Redis Lua
numbers are doubles, exact up to 2**53). Amounts beyond it are refused before any counter is
touched; a limitless line that would pass it is refused too, so a counter never wraps."""


def clamp(value: int) -> int:
    """A counter's new value: never negative, never past :data:`MAX_COUNTER`."""
    return 0 if value < 0 else MAX_COUNTER if value > MAX_COUNTER else value


def fits(line: CounterLine, current: int, previous: int) -> bool:
    """Whether ``line.amount`` more fits under ``line.limit`` and :data:`MAX_COUNTER`."""
    if current + line.amount > MAX_COUNTER:
        return False
    if line.limit is None:
        return True
    estimate = math.floor(previous * line.prev_weight) + current
    return estimate + line.amount <= line.limit


def admits(lines: Sequence[CounterLine], current: Sequence[int], previous: Sequence[int]) -> bool:
    """All-or-nothing: every line must fit."""
    for line, c, p in zip(lines, current, previous):  # noqa: SIM110 - faster than all() here
        if not fits(line, c, p):
            return False
    return True


def decide(
    lines: Sequence[CounterLine], current: Sequence[int], previous: Sequence[int]
) -> tuple[int, ...] | None:
    """The rule of a decision: ``None`` when a line does not fit (nothing is added), else every
    line's counter after its amount. Keys are distinct within one decision."""
    if not admits(lines, current, previous):
        return None
    return tuple([clamp(c + line.amount) for line, c in zip(lines, current)])


class CounterBackend(Protocol):
    """The primitives a store offers *inside* its own atomic section."""

    def read(self, keys: Sequence[str], now: int) -> list[int]: ...

    def add(self, key: str, delta: int, expires_at: int | None) -> int: ...

    def pop_expired_holds(self, now: int) -> list[Hold]: ...

    def pop_hold(self, hold_id: str) -> Hold | None: ...

    def put_hold(self, hold: Hold) -> None: ...


def release_expired(backend: CounterBackend, now: int) -> None:
    for hold in backend.pop_expired_holds(now):
        for key, amount in hold.amounts:
            backend.add(key, -amount, None)


def apply(
    backend: CounterBackend, lines: Sequence[CounterLine], now: int, hold: Hold | None
) -> CounterResult:
    """Read, decide and write; the caller holds the store's lock or transaction.

    The rule is :func:`decide`: this runs it over a backend's primitives (SQLite, and
    PostgreSQL's settles and adds); the memory store runs it over its dicts; PostgreSQL's
    ``mk_counters_apply`` and Redis's ``apply.lua`` repeat it line for line. The conformance
    suite holds every store to this function.
    """
    release_expired(backend, now)
    n = len(lines)
    keys = [line.key for line in lines]
    keys += [line.prev_key for line in lines if line.prev_key]
    values = backend.read(keys, now)  # one read: the lines' counters, then previous windows
    current = values[:n]
    later = iter(values[n:])
    previous = [next(later) if line.prev_key else 0 for line in lines]
    if decide(lines, current, previous) is None:
        return CounterResult(False, tuple(current), tuple(previous))
    add = backend.add
    used = tuple([add(line.key, line.amount, line.expires_at) for line in lines])
    if hold is not None:
        backend.put_hold(hold)
    return CounterResult(True, used, tuple(previous))


def settle(
    backend: CounterBackend, hold_id: str, deltas: Sequence[tuple[str, int]], now: int
) -> bool:
    release_expired(backend, now)
    if backend.pop_hold(hold_id) is None:
        return False
    for key, delta in deltas:
        backend.add(key, delta, None)
    return True
