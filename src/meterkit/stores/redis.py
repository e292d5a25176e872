"""``redis://`` — quota and rate-limit counters in Redis, beside a durable event store.

``Meter("postgresql://…", counters="redis://host:6379/0")``: events, plans and records stay in
the event store; the hot counters every request touches live here. Each operation of the
:class:`~meterkit.stores.base.CounterStore` protocol is one Lua script, so it is atomic on the
server without locks or round trips:

- **The decision mirrors** :func:`meterkit.counters.fits` **exactly**: a line fits when
  ``floor(previous * prev_weight) + current + amount <= limit``; all lines fit or nothing is
  written (all-or-nothing across limits). Counters never go below 0.
- **O(1) state per key**: a counter is one hash ``{v: value, e: expires_at}``. Expiry is decided
  with the caller's ``now`` (so every process and a test clock agree with the other stores);
  the same script also sets ``PEXPIREAT`` a little after ``expires_at`` so Redis frees the
  memory by itself.
- **Holds** (reservations) are hashes with an expiry index (a sorted set scored by
  ``expires_at``); every apply and settle first releases the holds that expired, inside the
  same script.

URL: ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://`` for TLS, with redis-py's
query options (``socket_timeout=…``) and meterkit's ``prefix`` (default ``mk:``), which starts
every key meterkit writes, so several applications can share one database.

**What Redis loses.** A Redis without persistence (``save ""``, ``appendonly no``) keeps
nothing across a restart, and even with persistence the last second or so of writes can be
lost. Then period quotas and gauges read 0 until they are rebuilt from the event store with
:func:`meterkit.recovery.rebuild_counters`; reservations that were held and rate-limit windows
cannot be rebuilt and start empty. See docs/deployment.md.

**Redis Cluster**: ``redis+cluster://host:port/0``. Each key carries the hash tag of the
organization it belongs to (the second ``\x1f``-separated field of meterkit's keys), so every
key one script touches — counters, holds, the expiry index — is in one slot. Keys of several
organizations in one call are refused (``ValueError``): meterkit never makes such a call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from meterkit.counters import MAX_COUNTER
from meterkit.errors import StoreUnavailable
from meterkit.hookspecs import hookimpl
from meterkit.models import CounterLine, CounterResult, Hold

__all__ = ["GRACE_SECONDS", "SCHEMES", "RedisCounters"]

CLUSTER_SCHEMES = ("redis+cluster",)
SCHEMES = ("redis", "rediss", *CLUSTER_SCHEMES)
GRACE_SECONDS = 300
"""How long after its ``expires_at`` (by the Redis clock) Redis itself deletes a key.

The logical expiry uses the caller's clock; this margin keeps a key alive while clocks of the
application hosts and of Redis differ by less than it.
"""

_T = TypeVar("_T")


def _script(name: str) -> str:
    """A Lua script of ``stores/lua/``, with the numbers it shares with Python filled in."""
    text = resources.files("meterkit.stores").joinpath(f"lua/{name}.lua").read_text("utf-8")
    return text.replace("$GRACE_SECONDS", str(GRACE_SECONDS)).replace(
        "$MAX_COUNTER", str(MAX_COUNTER)
    )


# Every script starts with the prelude's helpers (get, put, add, release_expired); the rule
# of a decision (meterkit.counters.fits) is apply.lua's, held to it by the conformance suite.
_PRELUDE = _script("prelude")
_APPLY = _PRELUDE + _script("apply")
_SETTLE = _PRELUDE + _script("settle")
_ADD = _PRELUDE + _script("add")
_SET = _PRELUDE + _script("set")
_READ = _PRELUDE + _script("read")
_CLAIM = _PRELUDE + _script("claim")


def _opt(value: int | None) -> str:
    return "" if value is None else str(int(value))


def _split_url(url: str) -> tuple[str, str]:
    """``url`` without meterkit's ``prefix`` option (redis-py rejects it), and the prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in query if k == "prefix"), "mk:")
    rest = urlencode([(k, v) for k, v in query if k != "prefix"])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), prefix


class RedisCounters:
    """A :class:`~meterkit.stores.base.CounterStore` on one Redis server; thread-safe."""

    def __init__(self, url: str, *, client: Any = None) -> None:
        import redis as redis_lib
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        self.url = url
        clean, self.prefix = _split_url(url)
        self.cluster = urlsplit(url).scheme in CLUSTER_SCHEMES
        if client is None and self.cluster:
            from redis.cluster import RedisCluster

            # One decision's keys share a slot (see _space): each script runs on one node.
            # As for one server: one quick retry (a moved slot, a failover), then the
            # failure policy; redis-py's default of several retries with backoff, each
            # waiting out its socket timeout, held a decision 6-14 s with a node down.
            with self._unavailable("connecting to the cluster"):
                client = RedisCluster.from_url(
                    urlunsplit(("redis", *urlsplit(clean)[1:])),
                    socket_timeout=2.0,
                    socket_connect_timeout=1.0,
                    retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
                )
        if client is None:
            # Fail fast: a quota decision waits seconds at most, then the failure policy
            # (fail closed / open) decides. One quick retry reconnects a connection Redis
            # dropped (a restart); a script whose reply was lost may then run twice, which
            # over-counts and never over-admits.
            client = redis_lib.Redis.from_url(
                clean,
                socket_timeout=5.0,
                socket_connect_timeout=2.0,
                health_check_interval=30,
                retry=Retry(
                    ExponentialBackoff(cap=0.2, base=0.02),
                    1,
                    supported_errors=(redis_lib.ConnectionError,),
                ),
            )
        self.client = client
        # register_script: EVALSHA, loading the script again after Redis forgets it (restart).
        self._apply = client.register_script(_APPLY)
        self._settle = client.register_script(_SETTLE)
        self._add = client.register_script(_ADD)
        self._set = client.register_script(_SET)
        self._read = client.register_script(_READ)
        self._claim = client.register_script(_CLAIM)

    def _space(self, keys: Iterable[str]) -> str:
        """The prefix of every key one operation touches: on a cluster, with the hash tag of
        the organization the keys belong to (``q␟org␟…``), so they share one slot."""
        if not self.cluster:
            return self.prefix
        tags = {key.split("\x1f", 2)[1] if "\x1f" in key else "_" for key in keys}
        if len(tags) > 1:
            raise ValueError(f"one operation's keys span organizations: {sorted(tags)}")
        return f"{self.prefix}{{{tags.pop() if tags else '_'}}}"

    @contextmanager
    def _unavailable(self, what: str) -> Iterator[None]:
        import redis as redis_lib

        try:
            yield
        except (
            redis_lib.ConnectionError,  # includes BusyLoadingError (restarting, loading data)
            redis_lib.TimeoutError,
            redis_lib.exceptions.ReadOnlyError,  # a replica after failover
            # A cluster missing a node: CLUSTERDOWN / MASTERDOWN, TRYAGAIN while slots
            # migrate, a slot no reachable node serves, or no node reachable at all.
            redis_lib.exceptions.ClusterError,
            redis_lib.exceptions.TryAgainError,
            redis_lib.exceptions.RedisClusterException,
        ) as exc:
            raise StoreUnavailable(f"Redis counters unavailable while {what}: {exc}") from exc

    def _call(self, what: str, script: Callable[..., Any], keys: list[str], args: list[Any]) -> Any:
        with self._unavailable(what):
            return script(keys=keys, args=args)

    @staticmethod
    def _base(space: str, now: int) -> list[Any]:
        return [space, str(int(now))]

    # -- the CounterStore protocol ------------------------------------------------------------

    def counters_apply(
        self, lines: Sequence[CounterLine], *, now: int, hold: Hold | None = None
    ) -> CounterResult:
        n = len(lines)
        prev = [line.prev_key for line in lines if line.prev_key]
        sp = self._space([line.key for line in lines] + prev)
        hold_key = f"{sp}h:{hold.id}" if hold is not None else f"{sp}h:"
        keys = [f"{sp}holds", hold_key]
        keys += [f"{sp}c:{line.key}" for line in lines]
        keys += [f"{sp}c:{line.prev_key or line.key}" for line in lines]
        args = self._base(sp, now)
        if hold is not None:
            args += [n, hold.id, str(int(hold.expires_at)), hold.organization_id]
        else:
            args += [n, "", "", ""]
        for line in lines:
            args += [
                str(int(line.amount)),
                _opt(line.limit),
                _opt(line.expires_at),
                "1" if line.prev_key else "0",
                repr(float(line.prev_weight)),  # repr: the exact double, parsed back exactly
            ]
        if hold is not None:
            for key, amount in hold.amounts:
                args += [key, str(int(amount))]
        out = self._call("applying a quota decision", self._apply, keys, args)
        values = [int(v) for v in out]
        return CounterResult(values[0] == 1, tuple(values[1 : 1 + n]), tuple(values[1 + n :]))

    def counters_settle(self, hold_id: str, deltas: Sequence[tuple[str, int]], *, now: int) -> bool:
        sp = self._space(key for key, _ in deltas)
        keys = [f"{sp}holds", f"{sp}h:{hold_id}"]
        keys += [f"{sp}c:{key}" for key, _ in deltas]
        args = [*self._base(sp, now), hold_id, *(str(int(d)) for _, d in deltas)]
        return int(self._call("settling a reservation", self._settle, keys, args)) == 1

    def counters_add(
        self, deltas: Sequence[tuple[str, int]], *, now: int, expires_at: int | None = None
    ) -> list[int]:
        if not deltas:
            return []
        sp = self._space(key for key, _ in deltas)
        keys = [f"{sp}c:{key}" for key, _ in deltas]
        args = [*self._base(sp, now), _opt(expires_at), *(str(int(d)) for _, d in deltas)]
        return [int(v) for v in self._call("adding to counters", self._add, keys, args)]

    def counters_set(
        self, key: str, value: int, *, now: int, expires_at: int | None = None
    ) -> None:
        sp = self._space([key])
        args = [*self._base(sp, now), str(int(value)), _opt(expires_at)]
        self._call("setting a counter", self._set, [f"{sp}c:{key}"], args)

    def counters_read(self, keys: Sequence[str], *, now: int) -> list[int]:
        if not keys:
            return []
        sp = self._space(keys)
        full = [f"{sp}c:{key}" for key in keys]
        out = self._call("reading counters", self._read, full, self._base(sp, now))
        return [int(v) for v in out]

    def claim_once(self, marker: str, *, now: int, expires_at: int | None = None) -> bool:
        sp = self._space([marker])
        args = [*self._base(sp, now), _opt(expires_at)]
        key = f"{sp}m:{marker}"
        return int(self._call("claiming a marker", self._claim, [key], args)) == 1

    def close(self) -> None:
        self.client.close()


@hookimpl
def meterkit_open_counters(url: str, scheme: str) -> RedisCounters | None:
    return RedisCounters(url) if scheme in SCHEMES else None
