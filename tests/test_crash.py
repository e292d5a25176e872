"""kill -9 while many threads record: every acknowledged event is stored, none twice.

A child process records from 8 threads on SQLite (FULL, the default) and prints each event id
the moment record() returns for it. The parent reads those lines, kills the child with SIGKILL
mid-stream, reopens the file and checks that every id the child was told is durable is there —
and that recording everything again stores exactly the rest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meterkit import Event, Meter

T0 = 1_730_419_200
THREADS, PER_THREAD = 8, 400

CHILD = textwrap.dedent(
    """
    import sys, threading
    from meterkit import Meter

    T0 = 1_730_419_200
    meter = Meter(sys.argv[1], clock=lambda: T0 + 3600)
    lock = threading.Lock()

    def worker(k):
        for i in range(int(sys.argv[3])):
            event_id = f"t{k}-{i}"
            meter.record("tokens", {"tokens": 1}, organization_id="org", id=event_id,
                         time=T0 + 60)
            with lock:  # acknowledged: durable from here on
                sys.stdout.write(event_id + "\\n")
                sys.stdout.flush()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(int(sys.argv[2]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    """
)


def all_events() -> list[Event]:
    return [
        Event(f"t{k}-{i}", "tokens", "org", T0 + 60, {"tokens": 1})
        for k in range(THREADS)
        for i in range(PER_THREAD)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("after", [50, 600])
def test_acknowledged_records_survive_kill_9(tmp_path: Path, after: int) -> None:
    url = f"sqlite:///{tmp_path / 'crash.db'}"
    Meter(url).close()  # the schema exists before the child starts
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(THREADS), str(PER_THREAD)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert child.stdout is not None
    acknowledged: list[str] = []
    for line in child.stdout:
        acknowledged.append(line.strip())
        if len(acknowledged) >= after:
            child.send_signal(signal.SIGKILL)
            break
    acknowledged += [line.strip() for line in child.stdout]  # what was written before it died
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the child finished before it was killed"
    with Meter(url, clock=lambda: T0 + 3600) as meter:
        meter.store.ensure_meter(meter.spec("tokens"))
        stored = {e.id for e in meter.store.scan("tokens", "org", 0, T0 + 3600)}
        assert set(acknowledged) <= stored, sorted(set(acknowledged) - stored)[:5]
        again = meter.record_many(all_events())
        assert again.accepted == THREADS * PER_THREAD - len(stored)
        assert again.duplicates == len(stored) and again.conflicts == ()
        total = meter.total(
            "tokens", "tokens", organization_id="org", start_time=T0, end_time=T0 + 3600
        )
        assert total == THREADS * PER_THREAD
