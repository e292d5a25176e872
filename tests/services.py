"""The PostgreSQL and Redis servers the scale-out tests need, and clean-up after them.

An unreachable server skips its tests with the reason, except under ``CI=true``, where the
servers are part of the job and a missing one fails the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_DEFAULT = "redis://127.0.0.1:6379/15"
REDIS_CLUSTER_DEFAULT = "redis+cluster://127.0.0.1:7000/0"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unreachable(what: str, env: str, url: str, exc: BaseException) -> NoReturn:
    reason = f"{what} at {url} is unreachable ({type(exc).__name__}: {exc})"
    if in_ci():
        pytest.fail(f"{reason}; CI=true requires it")
    pytest.skip(f"{reason}; set {env} to run these tests")


def postgres_url() -> str:
    """``MK_POSTGRES_URL`` (or the local default), once a connection to it succeeded."""
    url = os.environ.get("MK_POSTGRES_URL", POSTGRES_DEFAULT)
    try:
        import psycopg

        psycopg.connect(url, connect_timeout=3).close()
    except Exception as exc:
        unreachable("PostgreSQL", "MK_POSTGRES_URL", url, exc)
    return url


def redis_url() -> str:
    """``MK_REDIS_URL`` (or the local default), once it answered a PING."""
    url = os.environ.get("MK_REDIS_URL", REDIS_DEFAULT)
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:
        unreachable("Redis", "MK_REDIS_URL", url, exc)
    return url


def redis_cluster_url() -> str:
    """``MK_REDIS_CLUSTER_URL`` (or the local default), once the cluster answered a PING.

    ``.ci/run`` starts a three-node cluster on ports 7000-7002 (see its cluster step).
    """
    url = os.environ.get("MK_REDIS_CLUSTER_URL", REDIS_CLUSTER_DEFAULT)
    try:
        cluster_client(url).ping()
    except Exception as exc:
        unreachable("Redis Cluster", "MK_REDIS_CLUSTER_URL", url, exc)
    return url


def cluster_client(url: str) -> Any:
    from redis.cluster import RedisCluster

    plain = "redis://" + url.split("://", 1)[1]
    return RedisCluster.from_url(plain.split("?")[0], socket_connect_timeout=2)


def clear_redis(url: str, prefix: str) -> None:
    """Delete every key starting with ``prefix`` (a test's own) from the Redis or Redis Cluster
    at ``url``."""
    import redis

    client = cluster_client(url) if url.startswith("redis+cluster") else redis.Redis.from_url(url)
    try:
        found = list(client.scan_iter(match=prefix + "*"))
        if found:
            if url.startswith("redis+cluster"):
                for key in found:  # keys of several slots: one by one
                    client.delete(key)
            else:
                client.delete(*found)
    finally:
        client.close()


def drop_schemas(url: str, prefix: str) -> None:
    """Drop every schema whose name starts with ``prefix`` (a test run's own)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s", (f"{prefix}%",)
        ).fetchall()
        # One schema per statement: a transaction locks every table it drops, and a run's
        # schemas together hold more tables than the server's lock table has room for.
        for (name,) in rows:
            conn.execute(f'DROP SCHEMA "{name}" CASCADE')


def with_params(url: str, **params: str) -> str:
    extra = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{url}{'&' if '?' in url else '?'}{extra}"


def store_urls(kind: str, tmp_path: Path, tag: str) -> Iterator[str]:
    """A URL of a fresh built-in store of ``kind`` (``memory``, ``sqlite``, ``postgres``) for
    one test, and its clean-up: the SQLite file lives in ``tmp_path``; the PostgreSQL schema,
    named from ``tag`` and the test, is dropped afterwards."""
    if kind == "memory":
        yield "memory://"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path / (tag + '.db')}"
    else:
        base = postgres_url()
        schema = f"mk_{tag}{tmp_path.name[-20:].lower().replace('-', '_')}"
        yield with_params(base, schema=schema)
        drop_schemas(base, schema)
