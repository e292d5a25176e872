"""Connections of the PostgreSQL store: the pool, transactions, retries and the clock."""

from __future__ import annotations

import itertools
import os
import random
import re
import select
import threading
import time as _time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from meterkit.errors import MeterkitError, StoreConflict, StoreUnavailable
from meterkit.stores.postgres.schema import migrate

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = ["PgPool", "conninfo"]

_T = TypeVar("_T")


SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")  # unquoted in search_path: lower case


def conninfo(url: str) -> tuple[str, dict[str, Any]]:
    """The libpq connection string for ``url`` and meterkit's own options taken out of it."""
    from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    scheme = "postgresql" if parts.scheme == "postgres" else parts.scheme
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    opts: dict[str, Any] = {"min_size": 1, "max_size": 10, "timeout": 5.0}
    # libpq rejects query parameters it does not know, so meterkit's own come out first.
    for key, name, kind in (
        ("pool_min_size", "min_size", int),
        ("pool_max_size", "max_size", int),
        ("pool_timeout", "timeout", float),
    ):
        if key in query:
            try:
                opts[name] = kind(query.pop(key))
            except ValueError:
                raise MeterkitError(f"PostgreSQL URL option {key} must be a number") from None
    schema = query.pop("schema", None)
    if schema is not None:
        if not SCHEMA_RE.match(schema):
            raise MeterkitError(f"PostgreSQL URL option schema={schema!r} is not a plain name")
        query["options"] = f"{query.get('options', '')} -csearch_path={schema}".strip()
    query.setdefault("connect_timeout", "5")
    return urlunsplit(
        (scheme, parts.netloc, parts.path, urlencode(query, quote_via=quote), "")
    ), opts


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__


def connection_class(store: PgPool) -> type[psycopg.Connection[Any]]:
    """A connection class that tells ``store`` (the pool) why a connection attempt failed."""
    import psycopg

    class Connection(psycopg.Connection[Any]):
        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> Any:
            try:
                conn = super().connect(*args, **kwargs)
            except psycopg.OperationalError as exc:
                store.connect_failed(exc)
                raise
            store.connect_error = None
            return conn

    return Connection


def check_connection(conn: psycopg.Connection[Any]) -> None:
    """Make sure a pooled connection still works before it is handed out.

    An idle connection has nothing to say, so a readable socket means the server spoke: it
    dropped the connection (restart, ``pg_terminate_backend``, idle timeout). Only then is the
    connection tried with a round trip; if that fails the pool replaces it, and the caller
    never sees the dead one. Checking every connection that way would cost a round trip per
    call.
    """
    from psycopg_pool import ConnectionPool

    readable, _, _ = select.select([conn.fileno()], [], [], 0)
    if readable or conn.closed:
        ConnectionPool.check_connection(conn)


class PgPool:
    """A pool of connections to one database, and how calls run on them.

    Nothing is sent to the server until the first call (which also creates or migrates the
    schema), so a process can start while the database is down and work once it is back.
    """

    def __init__(self, url: str) -> None:
        from psycopg_pool import ConnectionPool

        self.url = url
        info, opts = conninfo(url)
        self._conninfo = info
        self._timeout: float = opts["timeout"]
        # Why the pool could not connect, as the server or libpq said it (the pool connects in
        # the background, so a caller would otherwise only learn "no connection in time").
        self.connect_error: str | None = None
        # (monotonic time, message) of the last "no connection in time": for the next
        # pool_timeout seconds every call fails at once instead of waiting again.
        self._down: tuple[float, str] | None = None
        self.pool: ConnectionPool[Any] = ConnectionPool(
            info,
            connection_class=connection_class(self),
            min_size=opts["min_size"],
            max_size=max(opts["max_size"], opts["min_size"]),
            timeout=opts["timeout"],
            kwargs={"autocommit": True},
            check=check_connection,
            name="meterkit",
            open=True,
        )
        self._secret: bytes | None = None
        self._boot_lock = threading.Lock()
        # The cursor of this thread's atomic_writes() transaction, when one is open.
        self.pinned = threading.local()
        self._clock_lock = threading.Lock()
        self._clock_offset: tuple[float, float] | None = None  # (measured at, offset)

    def connect_failed(self, exc: BaseException) -> None:
        """A connection attempt failed: remembered, to say why the pool has none."""
        self.connect_error = one_line(exc).removeprefix("connection failed: ")

    @contextmanager
    def unavailable(self, what: str) -> Iterator[None]:
        import psycopg
        from psycopg_pool import PoolTimeout

        down = self._down
        if down is not None and _time.monotonic() - down[0] < self._timeout:
            raise StoreUnavailable(f"PostgreSQL store unavailable while {what}: {down[1]}")
        try:
            yield
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            # OperationalError covers a refused or dropped connection, PoolTimeout (no free
            # connection in time), AdminShutdown (pg_terminate_backend) and QueryCanceled
            # (statement_timeout): the server did not answer, whatever the reason.
            detail = one_line(exc)
            if isinstance(exc, PoolTimeout):
                if self.connect_error is not None:
                    detail = f"{self.connect_error} (no connection within {self._timeout:g} s)"
                self._down = (_time.monotonic(), detail)
            raise StoreUnavailable(f"PostgreSQL store unavailable while {what}: {detail}") from exc
        self._down = None

    def run(
        self,
        what: str,
        fn: Callable[[psycopg.Cursor[Any]], _T],
        *,
        tx: bool = True,
        pipeline: bool = True,
        idempotent: bool = False,
        own: bool = False,
    ) -> _T:
        """``fn(cursor)`` on a pooled connection, in one transaction when ``tx``.

        Transactions run in pipeline mode: statements whose results are not read yet travel
        together (``BEGIN`` with the first, ``COMMIT`` with the last writes), which saves a
        round trip each.

        Run again, because the first try certainly changed nothing: a transaction PostgreSQL
        aborted as a deadlock victim or serialization failure; and a call whose
        connection broke before its transaction reached ``COMMIT`` (or that only reads, or
        is ``idempotent``) — a connection the server dropped just before it was handed out —
        on as many connections as the pool keeps open, plus one.
        A connection lost *during* ``COMMIT`` is never retried: the commit may have happened.
        """
        import psycopg.errors

        pinned = None if own else getattr(self.pinned, "cur", None)
        if pinned is not None:
            # Inside atomic_writes(): on its connection, in its transaction; a failure fails
            # the whole of it, which its caller may run again.
            return fn(pinned)
        self.bootstrap()
        # Every pooled connection may have been dropped at once (a server restart): a call
        # that certainly changed nothing may try as many of them as the pool keeps, plus one.
        reconnects = self.pool.min_size + 1
        with self.unavailable(what):
            for attempt in itertools.count():
                reached_commit = False
                conn = None
                try:
                    with self.pool.connection() as conn:
                        if not tx:
                            with conn.cursor() as cur:
                                return fn(cur)
                        if not pipeline:
                            with conn.transaction(), conn.cursor() as cur:
                                result = fn(cur)
                                reached_commit = True
                                return result
                        with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
                            result = fn(cur)
                            reached_commit = True
                            return result
                except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                    if attempt >= 5:
                        raise
                    _time.sleep(random.uniform(0, 0.01 * 2**attempt))
                except psycopg.OperationalError:
                    safe = (tx and not reached_commit) or idempotent
                    if reconnects <= 0 or conn is None or not conn.broken or not safe:
                        raise
                    reconnects -= 1
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def atomic_writes(self) -> Iterator[None]:
        """Every call this thread makes inside runs on one connection, in one transaction:
        events and the counter changes they cause commit together or not at all (a
        ``kill -9`` between them cannot leave one without the other). A deadlock or
        serialization failure raises :class:`~meterkit.errors.StoreConflict` with nothing
        written: run the block again."""
        import psycopg.errors

        if getattr(self.pinned, "cur", None) is not None:
            yield  # nested: the outer transaction commits
            return
        self.bootstrap()
        try:
            with (
                self.unavailable("writing events and counters"),
                self.pool.connection() as conn,
                conn.transaction(),
                conn.cursor() as cur,
            ):
                self.pinned.cur = cur
                try:
                    yield
                finally:
                    self.pinned.cur = None
        except StoreUnavailable as exc:
            cause = exc.__cause__
            if isinstance(
                cause, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
            ):
                raise StoreConflict(str(exc)) from cause
            raise

    def reachable(self) -> None:
        """Connect once, directly, before waiting on the pool: a server that refuses or a host
        that does not resolve is one clear error at once, not a pool's retries for
        ``pool_timeout`` seconds."""
        import psycopg

        with self.unavailable("opening the store"):
            try:
                psycopg.connect(self._conninfo, autocommit=True).close()
            except psycopg.OperationalError as exc:
                # Remembered as a pool timeout is: calls for the next pool_timeout seconds
                # fail at once with the same cause.
                self.connect_failed(exc)
                self._down = (_time.monotonic(), str(self.connect_error))
                raise

    def bootstrap(self) -> None:
        if self._secret is not None:
            return
        with self._boot_lock:
            if self._secret is not None:
                return
            self.reachable()
            with self.unavailable("opening the store"), self.pool.connection() as conn:
                secret = migrate(conn)
                if secret is None:
                    conn.execute(
                        "INSERT INTO mk_meta (key, value) VALUES ('cursor_secret', %s) "
                        "ON CONFLICT (key) DO NOTHING",
                        (os.urandom(32).hex(),),
                    )
                    row = conn.execute(
                        "SELECT value FROM mk_meta WHERE key = 'cursor_secret'"
                    ).fetchone()
                    assert row is not None
                    secret = str(row[0])
            self._secret = bytes.fromhex(secret)

    def db_now(self) -> float:
        """The database server's clock, as Unix seconds.

        One clock for every process and host: ``Meter(store=store, clock=store.db_now)`` makes
        every quota window, billing period and event time agree with the database instead of
        each host's own clock. The offset from the local clock is measured once a minute, so
        a call costs no round trip.
        """
        local = _time.time()
        with self._clock_lock:
            cached = self._clock_offset
            if cached is not None and local - cached[0] < 60:
                return local + cached[1]

        def ask(cur: psycopg.Cursor[Any]) -> float:
            before = _time.time()
            cur.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
            row = cur.fetchone()
            after = _time.time()
            assert row is not None
            return float(row[0]) - (before + after) / 2

        offset = self.run("reading the database clock", ask, tx=False, idempotent=True)
        with self._clock_lock:
            self._clock_offset = (local, offset)
        return _time.time() + offset

    def secret(self) -> bytes:
        """The cursor-signing secret kept in the database (made once per schema)."""
        self.bootstrap()
        assert self._secret is not None
        return self._secret

    def close(self) -> None:
        self.pool.close()
