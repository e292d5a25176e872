"""PostgreSQL and Redis: ingest events/s and quota checks/s against raw baselines.

**Ingest**: ``Meter("postgresql://…").record_many(batch)`` (one transaction per batch:
``INSERT … SELECT FROM unnest(…) ON CONFLICT (organization_id, id) DO NOTHING RETURNING id``)
against raw psycopg ``executemany`` of the same rows (``INSERT … VALUES (…) ON CONFLICT
(organization_id, id) DO NOTHING``, one transaction per batch; psycopg pipelines the
statements) into a table of the same shape
(``CREATE TABLE … (LIKE events_completions INCLUDING ALL)``: same columns, types, collations,
primary key and index) in the same database. For context also ``COPY … FROM STDIN`` of the
same rows into a third such table (COPY has no ``ON CONFLICT``: it cannot skip a duplicate,
so it does less than the other two). The three take turns batch by batch, the order rotating.
The server's own durability applies to all (``synchronous_commit`` as configured).

**Quota checks**: ``Meter.check(org, {"tokens": 100})`` — three limits at once, as in
``quotas.py`` — with counters in PostgreSQL (row locks) and in Redis (``Meter("postgresql://…",
counters="redis://…")``, one Lua script), each also with ``record_debits=False`` (by default
an admitted check is recorded as a ``tokens`` event in PostgreSQL as well), against the
``limits`` library's ``RedisStorage`` fixed-window ``hit`` on the same Redis (and, for
context, three fixed-window hits in a row and its sliding-window counter).

Everything lives in a schema of its own (``meterkit_bench``) and under Redis keys starting
``meterkit-bench``; both are removed before and after the run. A part whose server does not
answer is skipped, with the reason printed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from data import Row, batches, generate, to_event
from ingest import COLUMNS, TABLE, IngestFigures
from quotas import Contender, MeterContender, limits_contenders, measure, report
from report import fmt_rate, fmt_ratio, median, table

import meterkit

__all__ = ["SCHEMA", "run"]

SCHEMA = "meterkit_bench"
REDIS_PREFIX = "meterkit-bench:"
LIMITS_PREFIX = "meterkit-bench-limits"
RAW_TABLE = f"raw_{TABLE}"
COPY_TABLE = f"copy_{TABLE}"


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query += list(params.items())
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


def postgres_down(url: str) -> str | None:
    """Why PostgreSQL at ``url`` cannot be used, or ``None`` when it answers."""
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - a dev dependency
        return f"psycopg is not installed ({exc})"
    try:
        with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return f"PostgreSQL at {url} does not answer: {str(exc).strip().splitlines()[0]}"
    return None


def redis_down(url: str) -> str | None:
    """Why Redis at ``url`` cannot be used, or ``None`` when it answers."""
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - a dev dependency
        return f"redis is not installed ({exc})"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        try:
            client.ping()
        finally:
            client.close()
    except redis.RedisError as exc:
        return f"Redis at {url} does not answer: {exc}"
    return None


def drop_schema(url: str) -> None:
    import psycopg

    with psycopg.connect(url, connect_timeout=3, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


def clear_redis(url: str) -> int:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
    try:
        removed = 0
        for pattern in (f"{REDIS_PREFIX}*", f"{LIMITS_PREFIX}*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 1000):
                removed += int(client.delete(*keys[i : i + 1000]))
        return removed
    finally:
        client.close()


# -- ingest ------------------------------------------------------------------------------------


def ingest(pg_url: str, rows: Sequence[Row], batch_size: int) -> dict[str, Any]:
    import psycopg

    mk_url = with_query(pg_url, schema=SCHEMA)
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    insert = (
        f'INSERT INTO {SCHEMA}."{RAW_TABLE}" ({cols}) '
        f"VALUES ({', '.join(['%s'] * len(COLUMNS))}) ON CONFLICT (organization_id, id) DO NOTHING"
    )
    copy = f'COPY {SCHEMA}."{COPY_TABLE}" ({cols}) FROM STDIN'
    mk = IngestFigures(len(rows), 0, 0.0, 0)
    raw = IngestFigures(len(rows), 0, 0.0, 0)
    cp = IngestFigures(len(rows), 0, 0.0, 0)
    with meterkit.Meter(mk_url) as meter, psycopg.connect(pg_url, autocommit=True) as conn:
        meter.store.ensure_meter(meter.spec("completions"))  # schema and table, untimed
        for name in (RAW_TABLE, COPY_TABLE):
            conn.execute(f'CREATE TABLE {SCHEMA}."{name}" (LIKE {SCHEMA}."{TABLE}" INCLUDING ALL)')
        shapes = {
            name: conn.execute(
                "SELECT column_name, data_type, collation_name, is_nullable "
                "FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                "ORDER BY ordinal_position",
                (SCHEMA, name),
            ).fetchall()
            for name in (TABLE, RAW_TABLE, COPY_TABLE)
        }
        assert shapes[TABLE] == shapes[RAW_TABLE] == shapes[COPY_TABLE], shapes
        assert set(COLUMNS) <= {c[0] for c in shapes[TABLE]}, shapes[TABLE]

        def run_mk(chunk: Sequence[Row]) -> None:
            events = [to_event(r) for r in chunk]
            t0 = time.perf_counter()
            result = meter.record_many(events)
            mk.seconds += time.perf_counter() - t0
            mk.accepted += result.accepted
            mk.batches += 1

        def run_raw(chunk: Sequence[Row]) -> None:
            t0 = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(insert, chunk)
                accepted = cur.rowcount
            raw.seconds += time.perf_counter() - t0
            raw.accepted += accepted
            raw.batches += 1

        def run_copy(chunk: Sequence[Row]) -> None:
            t0 = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur, cur.copy(copy) as c:
                for row in chunk:
                    c.write_row(row)
            cp.seconds += time.perf_counter() - t0
            cp.accepted += len(chunk)
            cp.batches += 1

        sides: list[Callable[[Sequence[Row]], None]] = [run_mk, run_raw, run_copy]
        for i, chunk in enumerate(batches(rows, batch_size)):
            k = i % len(sides)
            for side in [*sides[k:], *sides[:k]]:
                side(chunk)
        # Correctness guards: the same rows everywhere.
        totals = {
            name: conn.execute(
                "SELECT count(*), sum(v_input_tokens), sum(v_output_audio_tokens) "
                f'FROM {SCHEMA}."{name}"'
            ).fetchone()
            for name in (TABLE, RAW_TABLE, COPY_TABLE)
        }
    assert totals[TABLE] == totals[RAW_TABLE] == totals[COPY_TABLE], totals
    assert mk.accepted == raw.accepted == len(rows), (mk, raw)
    result = {
        "events": len(rows),
        "batch": batch_size,
        "meterkit": mk.as_dict(),
        "raw_executemany": raw.as_dict(),
        "raw_copy": cp.as_dict(),
        # How many times longer meterkit takes than the raw way (1.0 = as fast).
        "ratio_meterkit_over_executemany": round(mk.seconds / raw.seconds, 2),
        "ratio_meterkit_over_copy": round(mk.seconds / cp.seconds, 2),
    }
    print(
        table(
            f"\nIngest into PostgreSQL ({len(rows):,} events, 1 transaction per {batch_size:,})",
            [
                ("", "events/s", "seconds", "meterkit time / this"),
                ("meterkit record_many", fmt_rate(mk.events_per_s), f"{mk.seconds:.2f}", "1.00x"),
                (
                    "raw psycopg executemany",
                    fmt_rate(raw.events_per_s),
                    f"{raw.seconds:.2f}",
                    fmt_ratio(mk.seconds / raw.seconds),
                ),
                (
                    "raw psycopg COPY (no ON CONFLICT)",
                    fmt_rate(cp.events_per_s),
                    f"{cp.seconds:.2f}",
                    fmt_ratio(mk.seconds / cp.seconds),
                ),
            ],
        ),
        flush=True,
    )
    return result


# -- quota checks ------------------------------------------------------------------------------


def checks(pg_url: str | None, redis_url: str | None, args: argparse.Namespace) -> dict[str, Any]:
    from limits import storage

    threads = sorted({1, args.threads})
    contenders: list[Contender] = []
    try:
        if pg_url is not None:
            mk_url = with_query(pg_url, schema=SCHEMA)
            contenders += [
                MeterContender("meterkit PostgreSQL", mk_url, "org_s0"),
                MeterContender(
                    "meterkit PostgreSQL, record_debits=False",
                    mk_url,
                    "org_s1",
                    record_debits=False,
                ),
                # Every decision a store call (one statement) and a durable debit event.
                MeterContender("meterkit PostgreSQL, leases=False", mk_url, "org_s4", leases=False),
            ]
        if redis_url is not None:
            events = with_query(pg_url, schema=SCHEMA) if pg_url is not None else "memory://"
            where = "PostgreSQL" if pg_url is not None else "memory://"
            counters = with_query(redis_url, prefix=REDIS_PREFIX)
            if pg_url is not None:
                contenders.append(
                    MeterContender(
                        f"meterkit {where} + Redis counters", events, "org_s2", counters=counters
                    )
                )
            contenders.append(
                MeterContender(
                    f"meterkit {where} + Redis counters, record_debits=False",
                    events,
                    "org_s3",
                    counters=counters,
                    record_debits=False,
                )
            )

            def make_storage() -> storage.Storage:
                return storage.RedisStorage(redis_url, key_prefix=LIMITS_PREFIX)

            contenders += limits_contenders(make_storage, "Redis", "org_s", moving=False)
        print(
            f"scale: quota checks, {args.rounds} rounds x {args.seconds:g} s per contender, "
            f"{' and '.join(map(str, threads))} thread(s) ...",
            flush=True,
        )
        rates = measure(contenders, threads, args.rounds, args.seconds)
        for c in contenders:
            c.verify()
        if any(c.baseline for c in contenders):
            return report("Quota check-and-debit on shared stores", contenders, rates, threads)
        # No Redis: no `limits` baseline to compare with, only meterkit's own figures.
        out: dict[str, Any] = {"baseline": None, "by_threads": {}}
        for n in threads:
            rows: list[tuple[str, ...]] = [("", "checks/s (median)", "min", "max")]
            figures: dict[str, Any] = {}
            for c in contenders:
                runs = rates[c.name][n]
                rows.append(
                    (c.name, fmt_rate(median(runs)), fmt_rate(min(runs)), fmt_rate(max(runs)))
                )
                figures[c.name] = {
                    "per_s_median": round(median(runs)),
                    "per_s_runs": [round(x) for x in runs],
                }
            out["by_threads"][str(n)] = figures
            label = "1 thread" if n == 1 else f"{n} threads"
            print(table(f"\nQuota check-and-debit (no Redis: no baseline), {label}", rows))
        return out
    finally:
        for c in contenders:
            c.close()


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    pg_url: str | None = args.postgres
    redis_url: str | None = args.redis
    result: dict[str, Any] = {"postgres": pg_url, "redis": redis_url, "skipped": {}}
    assert pg_url is not None and redis_url is not None
    pg_reason = postgres_down(pg_url)
    redis_reason = redis_down(redis_url)
    if pg_reason:
        print(f"scale: skipping the PostgreSQL parts: {pg_reason}", flush=True)
        result["skipped"]["postgres"] = pg_reason
        pg_url = None
    if redis_reason:
        print(f"scale: skipping the Redis parts: {redis_reason}", flush=True)
        result["skipped"]["redis"] = redis_reason
        redis_url = None
    if pg_url is None and redis_url is None:
        return result
    try:
        if pg_url is not None:
            drop_schema(pg_url)
        if redis_url is not None:
            clear_redis(redis_url)
        if pg_url is not None:
            rows = generate(args.scale_events, args.seed).rows
            print(
                f"scale: ingest of {len(rows):,} events into PostgreSQL, batches of "
                f"{args.batch:,} ...",
                flush=True,
            )
            result["ingest"] = ingest(pg_url, rows, args.batch)
            del rows
        result["checks"] = checks(pg_url, redis_url, args)
    finally:
        if pg_url is not None:
            drop_schema(pg_url)
        if redis_url is not None:
            clear_redis(redis_url)
    return result
