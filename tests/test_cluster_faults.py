"""A Redis Cluster that loses a node: every error reaches the failure policy.

The test starts a three-node cluster of its own (the shared one serves other tests), with a
one-second node timeout, and shuts one node down mid-run. A closed meter raises
``StoreUnavailable`` (HTTP 503), an open one admits degraded; no cluster error escapes.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import services
from clock import Clock
from meterkit import Meter, Plan, StoreUnavailable
from meterkit.auth import create_key
from meterkit.http.app import HttpApp
from meterkit.http.core import Request

T0 = 1_730_419_200 + 3600
needs_redis = pytest.mark.skipif(
    shutil.which("redis-server") is None and not services.in_ci(),
    reason="redis-server is not installed: the cluster fault tests start a cluster of their own",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(predicate: object, what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def cluster_state(port: int) -> str:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True, text=True
    ).stdout
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("cluster_state:")
        ),
        "",
    )


def redis_server(tmp_path: Path, port: int, *options: str) -> None:
    """A redis-server of this test's own on ``port``, keeping nothing on disk."""
    subprocess.run(
        [
            "redis-server",
            *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)),
            *("--save", "", "--appendonly", "no", "--daemonize", "yes"),
            *options,
        ],
        check=True,
        capture_output=True,
    )


def answers(port: int) -> bool:
    return (
        subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).returncode == 0
    )


def shut_down(port: int) -> None:
    subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[int]]:
    ports = []
    while len(ports) < 3:
        port = free_port()
        if port < 55_000 and port not in ports:  # a cluster bus port is port + 10000
            ports.append(port)
    for port in ports:
        redis_server(
            tmp_path,
            port,
            *("--cluster-enabled", "yes", "--cluster-node-timeout", "1000"),
            *("--cluster-config-file", str(tmp_path / f"nodes-{port}.conf")),
        )
    try:
        wait_for(lambda: all(answers(p) for p in ports), "the nodes")
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
        )
        wait_for(lambda: all(cluster_state(p) == "ok" for p in ports), "the cluster")
        yield ports
    finally:
        for port in ports:
            shut_down(port)


def quota_status(meter: Meter, org: str) -> int:
    token, _ = create_key(meter, org, "admin", ["usage:read"])
    request = Request("GET", "/v1/organization/quota", (), {"authorization": f"Bearer {token}"})
    return HttpApp(meter).handle(request).status


@needs_redis
def test_a_lost_node_goes_through_the_failure_policy(cluster: list[int], tmp_path: Path) -> None:
    counters = f"redis+cluster://127.0.0.1:{cluster[0]}/0"
    url = f"sqlite:///{tmp_path / 'm.db'}"
    clock = Clock(T0)
    closed = Meter(url, clock=clock, counters=counters, default_plan="p")
    opened = Meter(url, clock=clock, counters=counters, default_plan="p", policy="open")
    try:
        closed.set_plan(Plan("p", limits={"tokens": 1000}))
        assert closed.check("org_before", {"tokens": 1}).allowed
        shut_down(cluster[1])
        wait_for(lambda: cluster_state(cluster[0]) == "fail", "the cluster to notice")
        orgs = [
            f"org_{i}" for i in range(12)
        ]  # spread over every slot range: some on the lost node
        for org in orgs:
            with pytest.raises(StoreUnavailable):
                closed.check(org, {"tokens": 1})
            degraded = opened.check(org, {"tokens": 1})
            assert degraded.allowed and degraded.degraded
        assert quota_status(closed, orgs[0]) == 503
    finally:
        closed.close()
        opened.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    redis_server(tmp_path, port)
    try:
        wait_for(lambda: answers(port), "redis")
        yield port
    finally:
        shut_down(port)


@needs_redis
@pytest.mark.slow
def test_a_paused_redis_never_applies_a_lease_report_twice(
    private_redis: int, tmp_path: Path
) -> None:
    """Redis paused longer than the socket timeout while a flush applies what it logged
    ahead of its lease report: the call times out, Redis runs it when the pause ends, and
    the next flush finds it applied (its marker refuses it) instead of counting it again; the
    report waits for it and counts once."""
    from meterkit.recovery import counter_differences

    counters = f"redis://127.0.0.1:{private_redis}/0"
    clock = Clock(T0)
    with Meter(f"sqlite:///{tmp_path / 'm.db'}", clock=clock, counters=counters) as m:
        m.set_plan(Plan("p", limits={"tokens": 1000}))
        m.assign_plan("org", "p")
        for _ in range(30):
            assert m.check("org", {"tokens": 1}).allowed
        m.flush()
        for _ in range(9):
            assert m.check("org", {"tokens": 1}).allowed  # from the lease: no store call
        subprocess.run(
            ["redis-cli", "-p", str(private_redis), "client", "pause", "6000", "all"],
            check=True,
            capture_output=True,
        )
        with pytest.raises(StoreUnavailable):
            m.flush()  # the socket times out after 5 s; Redis runs the call at 6 s
        wait_for(
            lambda: (
                subprocess.run(
                    ["redis-cli", "-p", str(private_redis), "ping"], capture_output=True, timeout=10
                ).stdout.strip()
                == b"PONG"
            ),
            "the pause to end",
        )
        m.flush()
        assert m.quotas.used("org", "tokens") == 39
        assert counter_differences(m, "org") == {}
