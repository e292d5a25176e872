"""Spend limits and alerts through a real ``meterkit serve --demo-model``, driven by the SDK.

The official ``openai`` SDK manages the limit and the alerts (``client.admin.organization``)
and calls the demo model behind the metering guard (``client.chat.completions.create``)
until the hard limit refuses it with a 429. The server's notifiers deliver the alert to a
real local SMTP server and to a local webhook receiver that fails first.
"""

from __future__ import annotations

import email
import email.policy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import openai
import pytest
from openai.types.admin.organization import (
    OrganizationSpendAlert,
    OrganizationSpendAlertDeleted,
    OrganizationSpendLimit,
    OrganizationSpendLimitDeleted,
)

from meterkit import Meter
from meterkit.auth import create_key
from meterkit.notify import verify_signature
from notify_helpers import SmtpSink, smtp_server, webhook_server
from test_server import Server, start_with_retry, stop

NOW = 1_765_022_400  # 2025-12-06T12:00:00Z
DAY = 86_400
ORG = "org_spend"


@attrs.define
class Env:
    server: Server
    tokens: dict[str, str]
    smtp: SmtpSink
    webhook: Any
    db: str

    def sdk(self, key: str = "admin") -> openai.OpenAI:
        token = self.tokens[key]
        return openai.OpenAI(
            api_key=token,
            admin_api_key=token,
            base_url=f"{self.server.base}/v1",
            max_retries=0,
            timeout=30.0,
        )


def config(db: str, smtp_port: int, webhook_url: str) -> str:
    return f"""
store = "{db}"

[[prices]]
meter = "completions"
measure = "input_tokens"
unit_price = "0.01"
line_item = "demo input"
quantity_unit = "tokens"

[[prices]]
meter = "completions"
measure = "output_tokens"
unit_price = "0.01"
line_item = "demo output"
quantity_unit = "tokens"

[notify.email]
host = "127.0.0.1"
port = {smtp_port}
sender = "meterkit@example.com"

[notify.webhook]
url = "{webhook_url}"
secret = "webhook-secret"
allow_private = true
backoff = 0.05
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("spend_server")
    db = f"sqlite:///{tmp / 'spend.db'}"
    with smtp_server() as (sink, port), webhook_server() as hooks:
        hooks.statuses.append(503)  # the first delivery fails and is retried
        (tmp / "meterkit.toml").write_text(config(db, port, hooks.url))
        with Meter(db, clock=lambda: NOW) as meter:
            tokens = {
                "admin": create_key(meter, ORG, "admin", ["usage:read", "usage:write"])[0],
                "member": create_key(meter, ORG, "member", ["usage:read", "usage:write"])[0],
            }
        args = ["serve", "--config", str(tmp / "meterkit.toml"), "--demo-model"]
        server = start_with_retry(
            [*args, "--now", str(NOW), "--freeze-clock", "--log-level", "warning"],
            tmp / "serve.log",
            tmp,
        )
        try:
            yield Env(server, tokens, sink, hooks, db)
        finally:
            stop(server)


def strict(model: Any, response: Any) -> Any:
    body = response.http_response.json()
    model.model_validate(body, strict=True)
    return response.parse()


def complete(client: openai.OpenAI) -> Any:
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Say something."}]
    )


def test_spend_limit_crud_alerts_and_enforcement_through_the_sdk(env: Env) -> None:
    admin = env.sdk().admin.organization
    with pytest.raises(openai.NotFoundError):
        admin.spend_limit.retrieve()
    with pytest.raises(openai.PermissionDeniedError):  # a member key, as OpenAI's
        env.sdk("member").admin.organization.spend_limit.retrieve()
    with pytest.raises(openai.BadRequestError) as bad:
        admin.spend_limit.update(currency="USD", interval="month", threshold_amount=0)
    assert bad.value.body["param"] == "threshold_amount"  # type: ignore[index]

    raw = admin.spend_limit.with_raw_response
    limit = strict(
        OrganizationSpendLimit,
        raw.update(currency="USD", interval="month", threshold_amount=100),
    )
    assert (limit.threshold_amount, limit.enforcement.status) == (100, "inactive")
    alert = strict(
        OrganizationSpendAlert,
        admin.spend_alerts.with_raw_response.create(
            currency="USD",
            interval="month",
            threshold_amount=50,
            notification_channel={
                "type": "email",
                "recipients": ["ops@example.com"],
                "subject_prefix": "[spend]",
            },
        ),
    )

    # Each call to the demo model costs 1 cent a token; the guard refuses once $1 is spent.
    client = env.sdk()
    answers = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(50):
            reply = complete(client)
            assert reply.usage is not None and reply.usage.total_tokens > 0
            answers += 1
    assert 1 < answers < 50
    error = refused.value.body
    assert isinstance(error, dict) and error["code"] == "insufficient_quota"
    assert "hard spend limit of $1.00" in error["message"]
    status = strict(OrganizationSpendLimit, raw.retrieve())
    assert status.enforcement.status == "enforcing"
    with Meter(env.db, clock=lambda: NOW) as meter:
        # What the server counted is what its recorded events cost (rounding up only).
        day = NOW - NOW % DAY
        page = meter.costs(organization_id=ORG, start_time=day, end_time=day + DAY, limit=1)
        total = sum(page.totals().values())
        assert meter.spend(ORG).counted >= total >= 1
        assert meter.spend(ORG).counted - total < 1e-6

    # The alert went out once, by email and by a signed webhook that succeeded on its retry.
    deadline = time.monotonic() + 30
    while (not env.smtp.messages or len(env.webhook.received) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [m.rcpt_tos for m in env.smtp.messages] == [["ops@example.com"]]
    mail = email.message_from_bytes(env.smtp.messages[0].content, policy=email.policy.default)
    assert str(mail["Subject"]).strip().startswith("[spend] Spend alert: org_spend reached $0.50 ")
    assert len(env.webhook.received) == 2
    headers, body = env.webhook.received[-1]
    assert verify_signature(
        "webhook-secret", headers["Meterkit-Signature"], body, now=int(time.time())
    )
    assert json.loads(body)["alert"]["id"] == alert.id

    # Raising the limit lets requests through again; deleting it lifts the limit.
    raw.update(currency="USD", interval="month", threshold_amount=10_000)
    assert complete(client).usage is not None
    deleted = strict(OrganizationSpendLimitDeleted, raw.delete())
    assert deleted.deleted is True
    with pytest.raises(openai.NotFoundError):
        admin.spend_limit.delete()
    assert complete(client).usage is not None


def test_spend_alerts_are_paged_and_managed_through_the_sdk(env: Env) -> None:
    admin = env.sdk().admin.organization
    channel = {"type": "email", "recipients": ["a@example.com"]}
    created = [
        admin.spend_alerts.create(
            currency="USD",
            interval="month",
            threshold_amount=1000 * (i + 1),
            notification_channel=channel,  # type: ignore[arg-type]
        )
        for i in range(5)
    ]
    ours = {a.id for a in created}
    listed = [a for a in admin.spend_alerts.list(limit=2) if a.id in ours]
    assert [a.id for a in listed] == [a.id for a in created]  # oldest first, over three pages
    page = admin.spend_alerts.with_raw_response.list(limit=2)
    body = page.http_response.json()
    assert body["object"] == "list" and body["has_more"] is True and len(body["data"]) == 2
    for item in body["data"]:
        OrganizationSpendAlert.model_validate(item, strict=True)
    newest = admin.spend_alerts.list(limit=1, order="desc").data[0]
    assert newest.id == created[-1].id
    one = admin.spend_alerts.retrieve(created[1].id)
    assert one.threshold_amount == 2000
    changed = admin.spend_alerts.update(
        created[1].id,
        currency="USD",
        interval="month",
        threshold_amount=2500,
        notification_channel=channel,  # type: ignore[arg-type]
    )
    assert changed.threshold_amount == 2500 and changed.id == created[1].id
    gone = admin.spend_alerts.with_raw_response.delete(created[1].id)
    assert strict(OrganizationSpendAlertDeleted, gone).deleted is True
    with pytest.raises(openai.NotFoundError):
        admin.spend_alerts.retrieve(created[1].id)
    with pytest.raises(openai.BadRequestError) as bad:
        admin.spend_alerts.create(
            currency="USD",
            interval="month",
            threshold_amount=5,
            notification_channel={"type": "email", "recipients": ["nope"]},
        )
    assert bad.value.body["param"] == "notification_channel.recipients[0]"  # type: ignore[index]


def test_an_admin_key_sets_its_own_limit_under_the_operators_cap_never_above(env: Env) -> None:
    org = "org_capped"
    with Meter(env.db, clock=lambda: NOW) as operator:
        token = create_key(operator, org, "admin", ["usage:read", "usage:write"])[0]
        operator.set_spend_cap(org, 5_000)  # $50 a month, the operator's
    client = openai.OpenAI(
        api_key=token, admin_api_key=token, base_url=f"{env.server.base}/v1", max_retries=0
    )
    raw = client.admin.organization.spend_limit.with_raw_response
    assert strict(OrganizationSpendLimit, raw.retrieve()).threshold_amount == 5_000
    # Well-formed, but above what the operator allows: a conflict with the stored cap.
    with pytest.raises(openai.ConflictError) as above:
        raw.update(currency="USD", interval="month", threshold_amount=5_001)
    assert above.value.body["param"] == "threshold_amount"  # type: ignore[index]
    lower = strict(
        OrganizationSpendLimit, raw.update(currency="USD", interval="month", threshold_amount=1_000)
    )
    assert lower.threshold_amount == 1_000
    assert strict(OrganizationSpendLimit, raw.retrieve()).threshold_amount == 1_000
    assert strict(OrganizationSpendLimitDeleted, raw.delete()).deleted is True
    # Its own limit is gone; the operator's cap is not, and no key can lift it.
    assert strict(OrganizationSpendLimit, raw.retrieve()).threshold_amount == 5_000
    with pytest.raises(openai.PermissionDeniedError) as denied:
        raw.delete()
    assert denied.value.body["code"] == "spend_limit_set_by_operator"  # type: ignore[index]
    with Meter(env.db, clock=lambda: NOW) as operator:
        state = operator.spend(org)
        assert state.limit is not None and state.limit.threshold_amount == 5_000
        assert operator.delete_spend_cap(org)
    with pytest.raises(openai.NotFoundError):
        raw.retrieve()
