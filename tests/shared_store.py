"""One store shared by several meters, each standing for a process with its own leases and
caches: SQLite, PostgreSQL, PostgreSQL + Redis and PostgreSQL + a Redis Cluster. The fixtures
are registered from conftest.py."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import services
from clock import Clock
from meterkit import Meter

RUN = uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def shared_postgres() -> Iterator[str]:
    url = services.postgres_url()
    yield url
    services.drop_schemas(url, f"mk_l{RUN}\\_")


OpenShared = Callable[..., Meter]


@pytest.fixture(params=["sqlite", "postgres", "postgres+redis", "postgres+redis-cluster"])
def open_shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenShared]:
    """``open_shared(clock)``: another meter (another process's view) on one shared store."""
    counters = None
    keys: list[tuple[str, str]] = []
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'shared.db'}"
    else:
        base = request.getfixturevalue("shared_postgres")
        url = services.with_params(base, schema=f"mk_l{RUN}_{uuid.uuid4().hex[:10]}")
        if request.param != "postgres":
            prefix = f"mkl{RUN}:{uuid.uuid4().hex[:8]}:"
            cluster = request.param.endswith("cluster")
            server = services.redis_cluster_url() if cluster else services.redis_url()
            counters = services.with_params(server, prefix=prefix)
            keys.append((server, prefix))
    opened: list[Meter] = []

    def make(clock: Clock, **options: object) -> Meter:
        meter = Meter(url, clock=clock, counters=counters, **options)  # type: ignore[arg-type]
        opened.append(meter)
        return meter

    yield make
    for meter in opened:
        meter.close()
    for server, prefix in keys:
        services.clear_redis(server, prefix)
