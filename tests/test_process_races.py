"""Check, then record: several real processes race one limit, each recording its usage right
after it is served (the pattern the guard and most applications follow).

The bound (docs/quotas.md): the limit is passed by at most the requests in flight, at most one
per process. Run on SQLite, PostgreSQL, PostgreSQL + Redis and PostgreSQL + a Redis Cluster,
with the default leases, the plan metric stored by the parent and named by no child.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from clock import Clock
from meterkit import Metric, Plan
from meterkit.recovery import counter_differences
from shared_store import OpenShared

T0 = 1_730_419_200 + 3600
ORG = "org"
PROCESSES = 3

WORKER = textwrap.dedent(
    """
    import sys
    from meterkit import Meter

    url, counters, t0, name, mode = sys.argv[1:6]
    m = Meter(url, counters=counters or None, clock=lambda: int(t0))
    ask = {"llm_tokens": 1} if mode == "metric" else {}
    sys.stdin.readline()  # every worker starts together
    admitted = refused = i = 0
    while refused < 5:
        if m.check("org", ask).allowed:
            admitted += 1
            i += 1
            m.record("completions", {"output_tokens": 1000}, organization_id="org",
                     dimensions={"model": "gpt-4o"}, id=f"{name}-{i}")
        else:
            refused += 1
    m.close()
    print(admitted, flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["metric", "spend"])
def test_check_then_record_across_processes_passes_the_limit_by_at_most_one_per_process(
    open_shared: OpenShared, tmp_path: Path, mode: str
) -> None:
    parent = open_shared(Clock(T0))
    if mode == "metric":
        parent.set_metric(
            Metric.parse("llm_tokens", "completions.input_tokens + completions.output_tokens")
        )
        parent.set_plan(Plan("p", limits={"llm_tokens": 20_000}))
        parent.assign_plan(ORG, "p")
        fits = 20
    else:
        parent.set_price(
            {
                "meter": "completions",
                "measure": "output_tokens",
                "unit_price": "10.00",
                "per": 1_000_000,
                "line_item": "output",
                "quantity_unit": "tokens",
            }
        )
        parent.set_spend_limit(ORG, 5)  # 5 cents: five requests of 1,000 tokens at $10/M
        fits = 5
    counters = parent.counters
    counters_url = "" if counters is parent.store else counters.url
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), parent.url, counters_url, str(T0), f"w{n}", mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(PROCESSES)
    ]
    try:
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        admitted = []
        for w in workers:
            out, _ = w.communicate(timeout=120)
            assert w.returncode == 0
            admitted.append(int(out.strip()))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    total = sum(admitted)
    assert fits <= total <= fits + PROCESSES, admitted
    if mode == "metric":
        assert counter_differences(parent, ORG) == {}
    else:
        spent = parent.spend(ORG).counted
        assert spent == Decimal("0.01") * total  # every admitted request's cost, once
