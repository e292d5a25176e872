"""The counters capability: every store decides as :func:`meterkit.counters.apply` does."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterkit import counters as rule
from meterkit.counters import MAX_COUNTER
from meterkit.models import CounterLine, Hold
from meterkit.stores.base import CounterStore
from meterkit.testing.support import T0, store_property

__all__ = ["CounterConformance", "ModelCounters"]

NOW = T0 + 100


def hold_of(id: str, expires_at: int, **amounts: int) -> Hold:
    return Hold(id, "org", tuple(amounts.items()), expires_at)


class ModelCounters:
    """The reference: the primitives of :class:`meterkit.counters.CounterBackend` over plain
    dicts, written here apart from every store, decided by :func:`meterkit.counters.apply`."""

    def __init__(self) -> None:
        self.values: dict[str, tuple[int, int | None]] = {}
        self.holds: dict[str, Hold] = {}

    def _live(self, key: str, now: int) -> tuple[int, int | None]:
        value, expires = self.values.get(key, (0, None))
        return (0, None) if expires is not None and expires <= now else (value, expires)

    def read(self, keys: Sequence[str], now: int) -> list[int]:
        return [self._live(key, now)[0] for key in keys]

    def add_at(self, key: str, delta: int, expires_at: int | None, now: int) -> int:
        value, expires = self._live(key, now)
        value = rule.clamp(value + delta)
        self.values[key] = (value, expires if expires_at is None else expires_at)
        return value

    def pop_expired_holds(self, now: int) -> list[Hold]:
        gone = sorted((h for h in self.holds.values() if h.expires_at <= now), key=lambda h: h.id)
        for hold in gone:
            del self.holds[hold.id]
        return gone

    def pop_hold(self, hold_id: str) -> Hold | None:
        return self.holds.pop(hold_id, None)

    def put_hold(self, hold: Hold) -> None:
        self.holds[hold.id] = hold

    def at(self, now: int) -> _ModelAt:
        """The backend as :mod:`meterkit.counters` calls it, at ``now``."""
        return _ModelAt(self, now)


class _ModelAt:
    def __init__(self, model: ModelCounters, now: int) -> None:
        self.model, self.now = model, now
        self.read = model.read
        self.pop_expired_holds = model.pop_expired_holds
        self.pop_hold = model.pop_hold
        self.put_hold = model.put_hold

    def add(self, key: str, delta: int, expires_at: int | None) -> int:
        return self.model.add_at(key, delta, expires_at, self.now)


_LINE_NAMES = ("a", "b", "c")
_PREVIOUS_NAMES = ("pa", "pb")  # previous windows: counters no line of the same call names
_NAMES = _LINE_NAMES + _PREVIOUS_NAMES
_LINE = st.tuples(
    st.sampled_from(_LINE_NAMES),  # the counter
    st.integers(0, 6),  # amount
    st.one_of(st.none(), st.integers(0, 12)),  # limit
    st.one_of(st.none(), st.integers(1, 30)),  # expires in
    st.one_of(st.none(), st.sampled_from(_PREVIOUS_NAMES)),  # the previous window's counter
    st.sampled_from((0.0, 0.25, 0.5, 0.999, 1.0)),  # its weight
)
_OPS = st.one_of(
    st.tuples(
        st.just("apply"),
        # Keys are distinct within one call (the CounterStore contract).
        st.lists(_LINE, min_size=1, max_size=3, unique_by=lambda line: line[0]),
        st.one_of(st.none(), st.tuples(st.integers(0, 1), st.integers(1, 20))),
    ),
    st.tuples(
        st.just("add"),
        st.lists(
            st.tuples(st.sampled_from(_NAMES), st.integers(-5, 5)),
            min_size=1,
            max_size=3,
            unique_by=lambda delta: delta[0],
        ),
        st.one_of(st.none(), st.integers(1, 30)),
    ),
    st.tuples(
        st.just("settle"),
        st.integers(0, 1),
        st.lists(
            st.tuples(st.sampled_from(_NAMES), st.integers(-5, 5)),
            min_size=1,
            max_size=2,
            unique_by=lambda delta: delta[0],
        ),
    ),
    st.tuples(st.just("set"), st.sampled_from(_NAMES), st.integers(0, 9)),
    st.tuples(st.just("read"), st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3)),
    st.tuples(st.just("wait"), st.integers(0, 15)),
)


class CounterConformance:
    """Every counters store (event stores and Redis alike). Subclass and give a ``counters``
    fixture: a fresh :class:`~meterkit.stores.base.CounterStore` (``StoreConformance`` gives
    its store)."""

    @pytest.fixture
    def counters(self) -> CounterStore:
        raise NotImplementedError("a CounterConformance subclass must give a counters fixture")

    def test_a_hold_of_a_known_id_is_replaced(self, counters: CounterStore) -> None:
        from meterkit.models import CounterLine, Hold

        first = Hold("lease", "org", (("t", 7),), T0 + 5)
        counters.counters_apply([CounterLine("t", 7)], now=T0, hold=first)
        again = Hold("lease", "org", (("t", 4),), T0 + 50)
        assert counters.counters_apply([CounterLine("t", -3)], now=T0 + 1, hold=again).admitted
        counters.counters_apply([], now=T0 + 5)
        assert counters.counters_read(["t"], now=T0 + 5) == [4]
        counters.counters_apply([], now=T0 + 50)
        assert counters.counters_read(["t"], now=T0 + 50) == [0]

    # -- the counter conformance suite ------------------------------------------------------------

    def test_admits_and_adds_within_the_limit(self, counters: CounterStore) -> None:
        result = counters.counters_apply([CounterLine("a", 4, 10)], now=NOW)
        assert (result.admitted, result.used, result.previous) == (True, (4,), (0,))
        result = counters.counters_apply([CounterLine("a", 6, 10)], now=NOW)
        assert (result.admitted, result.used) == (True, (10,)), "exactly the limit fits"
        result = counters.counters_apply([CounterLine("a", 1, 10)], now=NOW)
        assert (result.admitted, result.used) == (False, (10,)), "refused: the state before"
        assert counters.counters_read(["a"], now=NOW) == [10]

    def test_all_or_nothing_across_lines(self, counters: CounterStore) -> None:
        counters.counters_add([("tight", 9)], now=NOW)
        lines = [CounterLine("loose", 5, 100), CounterLine("free", 5), CounterLine("tight", 2, 10)]
        result = counters.counters_apply(lines, now=NOW)
        assert not result.admitted
        assert result.used == (0, 0, 9)
        assert counters.counters_read(["loose", "free", "tight"], now=NOW) == [0, 0, 9]
        lines[2] = CounterLine("tight", 1, 10)
        assert counters.counters_apply(lines, now=NOW).used == (5, 5, 10)

    def test_no_limit_always_fits_and_a_zero_limit_refuses(self, counters: CounterStore) -> None:
        assert counters.counters_apply([CounterLine("n", 10**12)], now=NOW).admitted
        assert counters.counters_read(["n"], now=NOW) == [10**12]
        assert not counters.counters_apply([CounterLine("z", 1, 0)], now=NOW).admitted
        assert counters.counters_apply([CounterLine("z", 0, 0)], now=NOW).admitted

    def test_large_values_stay_exact(self, counters: CounterStore) -> None:
        big = 2**53 - 1
        assert counters.counters_add([("big", big - 1)], now=NOW) == [big - 1]
        assert counters.counters_apply([CounterLine("big", 1, big)], now=NOW).used == (big,)
        assert not counters.counters_apply([CounterLine("big", 1, big)], now=NOW).admitted
        assert counters.counters_read(["big"], now=NOW) == [big]

    @pytest.mark.parametrize(
        ("previous", "weight", "current", "amount", "limit", "admitted"),
        [
            (10, 0.5, 0, 5, 10, True),  # floor(5) + 0 + 5 = 10
            (10, 0.5, 0, 6, 10, False),
            (3, 0.5, 8, 1, 10, True),  # floor(1.5) = 1: 1 + 8 + 1 = 10
            (3, 0.5, 9, 1, 10, False),
            (7, 0.999, 3, 1, 10, True),  # floor(6.993) = 6
            (60, 1 / 60, 9, 1, 10, False),  # floor(60 * (1/60)) = 1 (the double rounds up to 1.0)
            (59, 1 / 60, 9, 1, 10, True),  # floor(0.98...) = 0
            (5, 0.0, 10, 0, 10, True),
        ],
    )
    def test_sliding_window_estimate(
        self,
        counters: CounterStore,
        previous: int,
        weight: float,
        current: int,
        amount: int,
        limit: int,
        admitted: bool,
    ) -> None:
        counters.counters_add([("prev", previous), ("cur", current)], now=NOW)
        line = CounterLine("cur", amount, limit, prev_key="prev", prev_weight=weight)
        result = counters.counters_apply([line], now=NOW)
        assert result.admitted is admitted
        assert result.previous == (previous,)
        assert result.used == ((current + amount,) if admitted else (current,))
        assert counters.counters_read(["prev"], now=NOW) == [previous], (
            "the previous window is read"
        )

    def test_previous_is_reported_only_for_lines_with_a_previous_key(
        self, counters: CounterStore
    ) -> None:
        counters.counters_add([("p", 5)], now=NOW)
        lines = [CounterLine("x", 1, 3), CounterLine("y", 1, 3, prev_key="p", prev_weight=0.0)]
        assert counters.counters_apply(lines, now=NOW).previous == (0, 5)

    def test_counters_expire_at_their_time(self, counters: CounterStore) -> None:
        counters.counters_apply([CounterLine("w", 3, 10, expires_at=NOW + 60)], now=NOW)
        assert counters.counters_read(["w"], now=NOW + 59) == [3]
        assert counters.counters_read(["w"], now=NOW + 60) == [0]
        result = counters.counters_apply(
            [CounterLine("w", 10, 10, expires_at=NOW + 120)], now=NOW + 60
        )
        assert (result.admitted, result.used) == (True, (10,)), "an expired counter starts over"
        assert counters.counters_read(["w"], now=NOW + 119) == [10]
        assert counters.counters_read(["w"], now=NOW + 120) == [0]

    def test_adding_without_an_expiry_keeps_the_one_there(self, counters: CounterStore) -> None:
        counters.counters_add([("k", 2)], now=NOW, expires_at=NOW + 10)
        counters.counters_add([("k", 3)], now=NOW)
        assert counters.counters_read(["k"], now=NOW + 9) == [5]
        assert counters.counters_read(["k"], now=NOW + 10) == [0]
        # Expired, then added to without an expiry: a fresh counter that never expires.
        assert counters.counters_add([("k", 1)], now=NOW + 10) == [1]
        assert counters.counters_read(["k"], now=NOW + 10**6) == [1]

    def test_refused_apply_leaves_nothing_behind(self, counters: CounterStore) -> None:
        line = CounterLine("never", 5, 4, expires_at=NOW + 60)
        assert not counters.counters_apply([line], now=NOW).admitted
        # Nothing counts, and no expiry was set: an unconditional add later never expires.
        assert counters.counters_read(["never"], now=NOW) == [0]
        counters.counters_add([("never", 2)], now=NOW)
        assert counters.counters_read(["never"], now=NOW + 10**6) == [2]

    def test_counters_never_pass_the_bound(self, counters: CounterStore) -> None:
        # 2**53 - 1: what a Redis Lua double still holds exactly; no backend goes past it.
        assert counters.counters_apply([CounterLine("big", MAX_COUNTER)], now=NOW).admitted
        refused = counters.counters_apply(
            [CounterLine("small", 1, 10), CounterLine("big", 1)], now=NOW
        )
        assert not refused.admitted  # no limit on "big", but no room either: all or nothing
        assert counters.counters_read(["big", "small"], now=NOW) == [MAX_COUNTER, 0]
        assert counters.counters_add([("big", MAX_COUNTER)], now=NOW) == [MAX_COUNTER]  # saturates
        assert counters.counters_add([("big", -2 * MAX_COUNTER)], now=NOW) == [0]

    def test_counters_never_go_below_zero(self, counters: CounterStore) -> None:
        counters.counters_add([("f", 3)], now=NOW)
        assert counters.counters_add([("f", -10), ("g", -1)], now=NOW) == [0, 0]
        assert counters.counters_add([("f", 4)], now=NOW) == [4]

    def test_add_is_unconditional_and_returns_the_values(self, counters: CounterStore) -> None:
        counters.counters_apply([CounterLine("lim", 10, 10)], now=NOW)
        assert counters.counters_add([("lim", 5), ("other", 1)], now=NOW) == [15, 1]
        assert counters.counters_add([], now=NOW) == []

    def test_set_replaces_value_and_expiry(self, counters: CounterStore) -> None:
        counters.counters_add([("s", 50)], now=NOW, expires_at=NOW + 5)
        counters.counters_set("s", 7, now=NOW)
        assert counters.counters_read(["s"], now=NOW + 100) == [7], "set without expiry: none"
        counters.counters_set("s", 9, now=NOW, expires_at=NOW + 3)
        assert counters.counters_read(["s"], now=NOW + 2) == [9]
        assert counters.counters_read(["s"], now=NOW + 3) == [0]

    def test_read_of_absent_keys_is_zero(self, counters: CounterStore) -> None:
        assert counters.counters_read(["nope", "nada"], now=NOW) == [0, 0]
        assert counters.counters_read([], now=NOW) == []

    def test_keys_may_hold_any_text(self, counters: CounterStore) -> None:
        keys = ["q\x1forg\x1ftokens\x1f1730419200", "with space", "ünïcødé ✓", "a:b:c", "#hash"]
        if getattr(counters, "cluster", False):
            # On a cluster one operation's keys belong to one organization (one hash slot).
            keys = [keys[0], *(f"q\x1forg\x1f{k}" for k in keys[1:])]
        counters.counters_add([(k, i + 1) for i, k in enumerate(keys)], now=NOW)
        hold = Hold("h", "org", ((keys[0], 1), (keys[4], 1)), NOW + 5)
        assert counters.counters_apply([CounterLine(keys[2], 1, 10)], now=NOW, hold=hold).admitted
        assert counters.counters_read(keys, now=NOW) == [1, 2, 4, 4, 5]
        assert counters.counters_settle("h", [(keys[0], -1)], now=NOW)
        assert counters.counters_read(keys[:1], now=NOW) == [0]

    # -- holds ------------------------------------------------------------------------------------

    def test_settle_forgets_the_hold_and_adds_the_deltas(self, counters: CounterStore) -> None:
        held = counters.counters_apply(
            [CounterLine("t", 30, 100)], now=NOW, hold=hold_of("r1", NOW + 300, t=30)
        )
        assert held.used == (30,)
        assert counters.counters_settle("r1", [("t", -20)], now=NOW + 1)
        assert counters.counters_read(["t"], now=NOW + 1) == [10]
        assert not counters.counters_settle("r1", [("t", -10)], now=NOW + 1), "settled once only"
        assert counters.counters_read(["t"], now=NOW + 1) == [10]

    def test_settle_of_an_unknown_hold_changes_nothing(self, counters: CounterStore) -> None:
        counters.counters_add([("t", 5)], now=NOW)
        assert not counters.counters_settle("nobody", [("t", -5)], now=NOW)
        assert counters.counters_read(["t"], now=NOW) == [5]

    def test_refused_apply_keeps_no_hold(self, counters: CounterStore) -> None:
        result = counters.counters_apply(
            [CounterLine("t", 30, 10)], now=NOW, hold=hold_of("r", NOW + 300, t=30)
        )
        assert not result.admitted
        assert not counters.counters_settle("r", [], now=NOW)

    def test_expired_holds_are_released_by_the_next_apply(self, counters: CounterStore) -> None:
        counters.counters_apply(
            [CounterLine("t", 8, 10)], now=NOW, hold=hold_of("r", NOW + 60, t=8)
        )
        # One second before expiry the hold still counts: 8 + 5 > 10.
        assert not counters.counters_apply([CounterLine("t", 5, 10)], now=NOW + 59).admitted
        # At its expiry it is given back first, inside the same atomic operation: 0 + 5 fits.
        result = counters.counters_apply([CounterLine("t", 5, 10)], now=NOW + 60)
        assert (result.admitted, result.used) == (True, (5,))
        assert not counters.counters_settle("r", [("t", -8)], now=NOW + 61), "it expired"
        assert counters.counters_read(["t"], now=NOW + 61) == [5]

    def test_settle_releases_expired_holds_first(self, counters: CounterStore) -> None:
        counters.counters_apply(
            [CounterLine("a", 4), CounterLine("b", 2)],
            now=NOW,
            hold=hold_of("old", NOW + 10, a=4, b=2),
        )
        counters.counters_apply([CounterLine("c", 1)], now=NOW, hold=hold_of("new", NOW + 99, c=1))
        assert counters.counters_settle("new", [("c", 5)], now=NOW + 10)
        assert counters.counters_read(["a", "b", "c"], now=NOW + 10) == [0, 0, 6]

    def test_releasing_an_expired_hold_never_goes_below_zero(self, counters: CounterStore) -> None:
        counters.counters_apply([CounterLine("t", 5)], now=NOW, hold=hold_of("r", NOW + 1, t=5))
        counters.counters_set("t", 2, now=NOW)  # recalculated meanwhile
        counters.counters_apply([], now=NOW + 1)
        assert counters.counters_read(["t"], now=NOW + 1) == [0]

    def test_a_hold_without_amounts_can_be_settled(self, counters: CounterStore) -> None:
        assert counters.counters_apply([], now=NOW, hold=hold_of("empty", NOW + 5)).admitted
        assert counters.counters_settle("empty", [], now=NOW)
        assert not counters.counters_settle("empty", [], now=NOW)

    def test_holds_release_only_their_own_amounts(self, counters: CounterStore) -> None:
        counters.counters_add([("t", 100)], now=NOW)
        counters.counters_apply([CounterLine("t", 7)], now=NOW, hold=hold_of("x", NOW + 5, t=7))
        counters.counters_apply([CounterLine("t", 3)], now=NOW, hold=hold_of("y", NOW + 50, t=3))
        counters.counters_apply([], now=NOW + 5)
        assert counters.counters_read(["t"], now=NOW + 5) == [103]
        assert counters.counters_settle("y", [("t", -3)], now=NOW + 6)
        assert counters.counters_read(["t"], now=NOW + 6) == [100]

    def test_a_hold_of_a_known_id_is_replaced_with_its_expiry(self, counters: CounterStore) -> None:
        # Leases rewrite one hold per organization with every take and report.
        counters.counters_apply([CounterLine("t", 7)], now=NOW, hold=hold_of("l", NOW + 5, t=7))
        lines = [CounterLine("t", -3), CounterLine("u", 2)]
        assert counters.counters_apply(
            lines, now=NOW + 1, hold=hold_of("l", NOW + 50, t=4, u=2)
        ).admitted
        counters.counters_apply([], now=NOW + 5)  # the first expiry is gone with the first hold
        assert counters.counters_read(["t", "u"], now=NOW + 5) == [4, 2]
        counters.counters_apply([], now=NOW + 50)
        assert counters.counters_read(["t", "u"], now=NOW + 50) == [0, 0]

    def test_negative_amounts_without_a_limit_give_back(self, counters: CounterStore) -> None:
        counters.counters_add([("t", 5)], now=NOW)
        result = counters.counters_apply([CounterLine("t", -2), CounterLine("v", -1)], now=NOW)
        assert (result.admitted, result.used) == (True, (3, 0))

    # -- claims -----------------------------------------------------------------------------------

    def test_claim_once(self, counters: CounterStore) -> None:
        assert counters.claim_once("forever", now=NOW)
        assert not counters.claim_once("forever", now=NOW + 10**6)
        assert counters.claim_once("period", now=NOW, expires_at=NOW + 30)
        assert not counters.claim_once("period", now=NOW + 29, expires_at=NOW + 30)
        assert counters.claim_once("period", now=NOW + 30, expires_at=NOW + 60), "expired: again"
        assert not counters.claim_once("period", now=NOW + 31)

    # -- concurrency ------------------------------------------------------------------------------

    def test_threads_racing_one_counter_admit_exactly_the_limit(
        self, counters: CounterStore
    ) -> None:
        limit, threads, tries = 37, 8, 10
        admitted: list[int] = []
        lock = threading.Lock()
        barrier = threading.Barrier(threads)

        def work() -> None:
            barrier.wait()
            mine = 0
            for _ in range(tries):
                lines = [CounterLine("race", 1, limit), CounterLine("race_total", 1)]
                if counters.counters_apply(lines, now=NOW).admitted:
                    mine += 1
            with lock:
                admitted.append(mine)

        workers = [threading.Thread(target=work) for _ in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert sum(admitted) == limit
        assert counters.counters_read(["race", "race_total"], now=NOW) == [limit, limit]

    # -- the rule ---------------------------------------------------------------------------

    @store_property(40)  # each example on keys of its own: the fixture is not shared state
    @given(ops=st.lists(_OPS, min_size=1, max_size=14))
    def test_decides_exactly_as_the_rule(
        self, counters: CounterStore, ops: list[tuple[Any, ...]]
    ) -> None:
        """Every call answers as :func:`meterkit.counters.apply` (and ``settle``,
        ``release_expired``) over :class:`ModelCounters`: the one definition of the rule."""
        org = f"m{uuid.uuid4().hex[:12]}"  # a key space of its own per example (one slot)

        def key(name: str) -> str:
            return f"q\x1f{org}\x1f{name}"

        model, now = ModelCounters(), T0
        for op in ops:
            if op[0] == "apply":
                lines = [
                    CounterLine(
                        key(name),
                        amount,
                        limit,
                        None if expires is None else now + expires,
                        None if prev is None else key(prev),
                        weight if prev is not None else 1.0,
                    )
                    for name, amount, limit, expires, prev, weight in op[1]
                ]
                hold = None
                if op[2] is not None:
                    amounts = tuple((ln.key, ln.amount) for ln in lines)
                    hold = Hold(f"h{op[2][0]}{org}", org, amounts, now + op[2][1])
                got = counters.counters_apply(lines, now=now, hold=hold)
                want = rule.apply(model.at(now), lines, now, hold)
                assert got == want, f"apply {lines} at {now}"
            elif op[0] == "add":
                deltas = [(key(name), delta) for name, delta in op[1]]
                expires_at = None if op[2] is None else now + op[2]
                got_values = counters.counters_add(deltas, now=now, expires_at=expires_at)
                backend = model.at(now)
                assert got_values == [backend.add(k, d, expires_at) for k, d in deltas]
            elif op[0] == "settle":
                deltas = [(key(name), delta) for name, delta in op[2]]
                hold_id = f"h{op[1]}{org}"
                got_settled = counters.counters_settle(hold_id, deltas, now=now)
                assert got_settled == rule.settle(model.at(now), hold_id, deltas, now)
            elif op[0] == "set":
                counters.counters_set(key(op[1]), op[2], now=now)
                model.values[key(op[1])] = (op[2], None)
            elif op[0] == "read":
                keys = [key(name) for name in op[1]]
                rule.release_expired(model.at(now), now)
                assert counters.counters_read(keys, now=now) == model.read(keys, now)
            else:
                now += op[1]
        everything = [key(name) for name in _NAMES]
        rule.release_expired(model.at(now), now)
        assert counters.counters_read(everything, now=now) == model.read(everything, now)
