"""Plan metrics are stored: a metric named by one process is known to, and fed by, every
process on the store (a worker, ``meterkit serve``), within the plan-change bound."""

from __future__ import annotations

from typing import Any

from clock import Clock, Monotonic
from meterkit import Event, Meter, Metric, Plan
from meterkit.recovery import counter_differences
from shared_store import OpenShared

T0 = 1_730_419_200 + 3600  # 2024-11-01T01:00:00Z
ORG = "org"
LLM = Metric.parse("llm_tokens", "completions.input_tokens + completions.output_tokens")


def completion(i: int, out: int, *, model: str = "gpt-4o") -> Event:
    return Event(f"c{i}", "completions", ORG, T0, {"output_tokens": out}, {"model": model})


def on_plan(meter: Meter, limit: int) -> None:
    meter.set_plan(Plan("p", limits={"llm_tokens": limit}))
    meter.assign_plan(ORG, "p")


def test_a_metric_named_by_one_process_is_fed_by_another(open_shared: OpenShared) -> None:
    """The issue's table, last row: the worker never names the metric."""
    clock = Clock(T0)
    app = open_shared(clock, metrics=[LLM])
    on_plan(app, 20_000)
    worker = open_shared(clock)
    admitted = 0
    for i in range(100):
        if not app.check(ORG, {"llm_tokens": 1}).allowed:
            break
        admitted += 1
        worker.record_many([completion(i, 1000)])
    assert admitted == 20
    assert worker.quotas.used(ORG, "llm_tokens") >= 20_000
    app.flush()  # its decisions' events, and its lease report
    assert counter_differences(worker, ORG) == {}


def test_opening_sends_nothing_and_the_first_use_stores_the_metric(
    open_shared: OpenShared,
) -> None:
    clock = Clock(T0)
    app = open_shared(clock, metrics=[LLM])
    other = open_shared(clock)
    assert [m.name for m in other.defined_metrics()] == []  # app has not used the store yet
    app.record_many([completion(1, 5)])
    assert [m.expression for m in other.defined_metrics()] == [LLM.expression]


def test_set_metric_counts_the_usage_the_period_already_holds(open_shared: OpenShared) -> None:
    clock = Clock(T0)
    m = open_shared(clock)
    m.set_plan(Plan("p", limits={"tokens": 10**9}))  # any plan: the organization is listed
    m.assign_plan(ORG, "p")
    m.record_many([completion(1, 700), completion(2, 200, model="gpt-4o-mini")])
    m.set_metric(LLM)
    on_plan(m, 1000)
    assert m.quotas.used(ORG, "llm_tokens") == 900
    assert not m.check(ORG, {"llm_tokens": 101}).allowed
    # A narrower definition replaces it, and the period is counted again.
    m.set_metric(
        Metric.parse("llm_tokens", "completions.output_tokens", where={"model": ["gpt-4o"]})
    )
    assert m.quotas.used(ORG, "llm_tokens") == 700
    assert counter_differences(m, ORG) == {}


def test_a_changed_definition_reaches_other_processes_within_the_refresh_bound(
    open_shared: OpenShared, monotonic: Monotonic
) -> None:
    clock = Clock(T0)
    here, there = open_shared(clock), open_shared(clock)
    here.set_metric(LLM)
    on_plan(here, 10_000)
    there.record_many([completion(1, 100)])
    assert there.quotas.used(ORG, "llm_tokens") == 100
    here.set_metric(Metric.parse("llm_tokens", "completions.input_tokens"))
    there.record_many([completion(2, 100)])  # before its refresh: the old definition counts
    monotonic.t += there.quotas.cache_seconds
    there.record_many([completion(3, 100)])  # after: output tokens count no more
    here.flush()
    there.flush()
    assert here.quotas.used(ORG, "llm_tokens") == 100


def test_a_stored_metric_on_a_meter_unknown_here_keeps_what_this_process_can_record(
    open_shared: OpenShared,
) -> None:
    from meterkit import Measure, MeterSpec

    clock = Clock(T0)
    renders = MeterSpec("renders", [Measure("cpu_ms")])
    app = open_shared(clock, meters=[renders])
    app.set_metric(Metric.parse("work", "renders.cpu_ms + completions.output_tokens"))
    other = open_shared(clock)
    (found,) = other.defined_metrics()
    assert found.expression == "completions.output_tokens"  # renders cannot be recorded here


def test_toml_metrics_are_stored_once(tmp_path: Any) -> None:
    path = tmp_path / "meterkit.toml"
    url = f"sqlite:///{tmp_path / 'm.db'}"
    path.write_text(
        f'store = "{url}"\n'
        "[metrics.llm_tokens]\n"
        'sources = "completions.input_tokens + completions.output_tokens"\n'
    )
    with Meter.from_config(path, clock=Clock(T0)) as first:
        assert [m.name for m in first.defined_metrics()] == ["llm_tokens"]
    with Meter(url, clock=Clock(T0)) as plain:
        (found,) = plain.defined_metrics()
        assert found == LLM
        records = plain.store.list_records("metric")
    with Meter.from_config(path, clock=Clock(T0)) as again:
        assert again.store.list_records("metric") == records


def test_the_first_decision_of_a_process_records_on_a_stored_metrics_meter(
    open_shared: OpenShared,
) -> None:
    clock = Clock(T0)
    admin = open_shared(clock)
    admin.set_metric(LLM)
    on_plan(admin, 100)
    fresh = open_shared(clock)  # its first call is a decision on the stored metric
    assert fresh.check(ORG, {"llm_tokens": 3}).allowed
    fresh.flush()
    day = T0 - T0 % 86400
    recorded = fresh.total(
        "llm_tokens", "llm_tokens", organization_id=ORG, start_time=day, end_time=day + 86400
    )
    assert recorded == 3
    assert counter_differences(fresh, ORG) == {}
