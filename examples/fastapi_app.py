"""A FastAPI app metered and guarded by meterkit, with meterkit's endpoints mounted beside it.

    python examples/fastapi_app.py            # drive it in process and print what happened
    python examples/fastapi_app.py --serve    # serve it on http://127.0.0.1:8000 (uvicorn)

``POST /v1/chat`` holds 4,000 tokens of the organization's quota before it runs and settles
to what the (stand-in) model used; a request past the plan's quota is refused with a 429
before the endpoint runs. meterkit's usage endpoints and dashboard are under ``/meterkit``.
The store is in memory, so every run starts afresh.
"""

from __future__ import annotations

import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

import meterkit
from meterkit import Plan
from meterkit.asgi import MeteringMiddleware, create_app
from meterkit.auth import create_key

NOW = 1_764_590_400  # 2025-12-01T12:00:00Z

m = meterkit.Meter("memory://", clock=lambda: NOW)
m.set_plan(Plan("starter", "Starter", limits={"tokens": 8_000}, rate_limit_rpm=100))
m.assign_plan("org_1", "starter")
TOKEN, _key = create_key(m, "org_1", "admin", ["usage:read", "usage:write"])

app = FastAPI()
app.add_middleware(MeteringMiddleware, meter=m, cost=lambda scope: {"tokens": 4000})
app.mount("/meterkit", create_app(m))


async def run_the_model(prompt: dict[str, Any]) -> tuple[str, int]:
    """A stand-in for the model: a reply and the tokens it used."""
    text = str(prompt.get("message", ""))
    return text[::-1], 1000 + 10 * len(text)


@app.post("/v1/chat")
async def chat(request: Request) -> dict[str, str]:
    reply, used = await run_the_model(await request.json())
    request.state.meterkit.add(tokens=used)  # settles the 4,000 held to what was used
    return {"reply": reply}


def main() -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(app) as client:
        statuses = []
        for n in range(6):
            r = client.post("/v1/chat", json={"message": f"hello {n}"}, headers=headers)
            statuses.append(r.status_code)
        # 8,000 tokens: each call holds 4,000 before it runs and settles to about 1,070 after,
        # so the fifth no longer fits (4 x 1,070 + 4,000 > 8,000) and is refused unrun.
        assert statuses == [200, 200, 200, 200, 429, 429], statuses
        refused = client.post("/v1/chat", json={"message": "more"}, headers=headers)
        assert refused.json()["error"]["code"] == "insufficient_quota"
        m.flush()
        usage = client.get("/meterkit/v1/organization/quota", headers=headers).json()
        tokens = next(line for line in usage["limits"] if line["metric"] == "tokens")
        assert tokens["used"] == sum(
            1000 + 10 * len(f"hello {n}") for n in range(statuses.count(200))
        )
        assert client.get("/meterkit/dashboard").status_code == 200
    print(f"statuses: {statuses}")
    print(f"tokens used: {tokens['used']:,} of {tokens['limit']:,} ({tokens['remaining']:,} left)")
    print(f"refused with: {refused.json()['error']['message']}")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        import uvicorn

        print(f"API key for org_1: {TOKEN}")
        uvicorn.run(app, host="127.0.0.1", port=8000)
    else:
        main()
    m.close()
