"""Record a few days of completions usage into meterkit.db and print the usage pages.

    python examples/quickstart.py

Four days of traffic for two projects and two models go into the embedded SQLite store
(``meterkit.db`` in the current directory). Event ids are fixed, so running the script again
records nothing new: every event is reported as a duplicate and the pages stay the same.
The query asks for two daily buckets a page and follows ``next_page`` to the end.
"""

from __future__ import annotations

import json
import random
import sys

import meterkit

DAY = 86_400
START = 1_730_419_200  # 2024-11-01T00:00:00Z
DAYS = 4
PROJECTS = ("proj_search", "proj_chat")
MODELS = ("gpt-4o", "gpt-4o-mini")


def make_events() -> list[meterkit.Event]:
    rng = random.Random(2024)
    events = []
    for day in range(DAYS):
        for n in range(24):
            project = PROJECTS[n % 2]
            model = MODELS[(n // 2) % 2]
            input_tokens = rng.randint(200, 4000)
            events.append(
                meterkit.Event(
                    id=f"evt_{day}_{n}",
                    meter="completions",
                    organization_id="org_demo",
                    time=START + day * DAY + n * 3600 + rng.randint(0, 3599),
                    values={
                        "input_tokens": input_tokens,
                        "output_tokens": rng.randint(20, 800),
                        "input_cached_tokens": input_tokens // 4 if n % 3 == 0 else 0,
                        "num_model_requests": 1,
                    },
                    dimensions={
                        "project_id": project,
                        "user_id": f"user_{n % 3}",
                        "api_key_id": f"key_{project}",
                        "model": model,
                        "batch": n % 6 == 5,
                        "service_tier": "default",
                    },
                )
            )
    return events


def main() -> None:
    with meterkit.Meter("sqlite:///meterkit.db") as m:
        result = m.record_many(make_events())
        print(
            f"recorded {result.accepted} new events, {result.duplicates} already recorded",
            file=sys.stderr,
        )
        page_token = None
        while True:
            page = m.usage(
                "completions",
                organization_id="org_demo",
                start_time=START,
                end_time=START + DAYS * DAY,
                bucket_width="1d",
                group_by=["project_id", "model"],
                limit=2,
                page=page_token,
            )
            print(json.dumps(page.to_dict(), indent=2))
            if not page.has_more:
                break
            page_token = page.next_page


if __name__ == "__main__":
    main()
