"""The operator's endpoints: only a key with the ``operator`` scope changes plans, assignments,
grants and caps over HTTP; an organization's admin key cannot, and bad input changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from meterkit.auth import create_key
from meterkit.http.routing import match_path
from test_http import Env, assert_openai_error, data, make_env

PLAN = "/v1/operator/plans/gold"
ORG_PLAN = "/v1/operator/organizations/org_z/plan"
GRANTS = "/v1/operator/organizations/org_z/credit_grants"
CAP = "/v1/operator/organizations/org_z/spend_cap"
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", PLAN, None),
    ("PUT", PLAN, {"limits": {"tokens": 10}}),
    ("GET", ORG_PLAN, None),
    ("PUT", ORG_PLAN, {"plan": "free"}),
    ("POST", GRANTS, {"credits": 5}),
    ("GET", CAP, None),
    ("PUT", CAP, {"threshold_amount": 100}),
    ("DELETE", CAP, None),
]


@pytest.fixture
def env() -> Iterator[Env]:
    e = make_env()
    e.tokens["operator"], _ = create_key(e.meter, "ops", "admin", ["operator"], name="operator")
    e.tokens["z_admin"], _ = create_key(e.meter, "org_z", "admin", ["usage:read", "usage:write"])
    yield e
    e.meter.close()


def test_only_an_operator_key_reaches_the_operator_endpoints(env: Env) -> None:
    before = (env.meter.plan_of("org_z"), env.meter.get_plan("gold"), env.meter.spend_cap("org_z"))
    for method, path, body in ROUTES:
        for key in ("admin", "z_admin", "other"):
            r = env.send(method, path, body=body, key=key)
            assert assert_openai_error(r, 403)["code"] == "insufficient_scope"
        assert_openai_error(env.send(method, path, body=body, key=None), 401)
    assert (
        env.meter.plan_of("org_z"),
        env.meter.get_plan("gold"),
        env.meter.spend_cap("org_z"),
    ) == before
    # Every operator route is one of those tried above, and documented.
    operator = [r for r in env.app.routes if r.scope == "operator"]
    assert len(operator) == len(ROUTES)
    paths = env.app.openapi()["paths"]
    for route in operator:
        assert any(m == route.method and match_path(route, p) for m, p, _ in ROUTES)
        assert route.method.lower() in paths[route.path]


def test_an_operator_key_sets_plans_assignments_grants_and_caps(env: Env) -> None:
    assert_openai_error(env.send("GET", PLAN, key="operator"), 404)
    r = env.send("PUT", PLAN, body={"name": "Gold", "limits": {"tokens": 10}}, key="operator")
    assert r.status == 200 and data(r)["limits"] == {"tokens": 10} and data(r)["id"] == "gold"
    assert data(env.send("GET", PLAN, key="operator"))["name"] == "Gold"

    assert_openai_error(env.send("GET", ORG_PLAN, key="operator"), 404)
    r = env.send("PUT", ORG_PLAN, body={"plan": "gold", "seats": 2}, key="operator")
    assert data(r) == {
        "object": "organization.plan",
        "organization_id": "org_z",
        "plan": "gold",
        "seats": 2,
    }
    assert data(env.send("GET", ORG_PLAN, key="operator"))["plan"] == "gold"
    # The assignment is enforced at once: 10 tokens, then a refusal.
    assert env.meter.check("org_z", {"tokens": 10}).allowed
    assert not env.meter.check("org_z", {"tokens": 1}).allowed

    # A grant sent twice with one id is granted once.
    for _ in range(2):
        r = env.send("POST", GRANTS, body={"id": "grant_1", "credits": 7}, key="operator")
        assert r.status == 200 and data(r)["credits"] == 7
    assert [g.credits for g in env.meter.quotas.grants("org_z")] == [7]

    r = env.send("PUT", CAP, body={"threshold_amount": 500}, key="operator")
    assert data(r)["threshold_amount"] == 500 and env.meter.spend_cap("org_z") == 500
    # The organization's admin key stays under it, and cannot lift it.
    above = {"currency": "USD", "interval": "month", "threshold_amount": 501}
    r = env.send("POST", "/v1/organization/spend_limit", body=above, key="z_admin")
    assert assert_openai_error(r, 409, "threshold_amount")["code"] == "conflict"
    r = env.send("DELETE", "/v1/organization/spend_limit", key="z_admin")
    assert assert_openai_error(r, 403)["code"] == "spend_limit_set_by_operator"
    assert data(env.send("GET", CAP, key="operator"))["threshold_amount"] == 500
    assert data(env.send("DELETE", CAP, key="operator"))["deleted"] is True
    assert env.meter.spend_cap("org_z") is None
    assert_openai_error(env.send("DELETE", CAP, key="operator"), 404)


def test_assigning_a_plan_that_does_not_exist_is_a_404(env: Env) -> None:
    before = env.meter.plan_of("org_z")
    r = env.send("PUT", ORG_PLAN, body={"plan": "nope"}, key="operator")
    assert assert_openai_error(r, 404, "plan")["code"] == "not_found"
    assert env.meter.plan_of("org_z") == before


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("PUT", PLAN, {"limits": "lots"}, "limits"),
        ("PUT", PLAN, {"limits": {"tokens": "ten"}}, "plan.limits.tokens"),
        ("PUT", PLAN, {"limits": {"tokens": 10}, "colour": "gold"}, "colour"),
        ("PUT", PLAN, {"billing_cycle": "weekly"}, "billing_cycle"),
        ("PUT", PLAN, {"limits": {"querys": 10}}, "limits.querys"),
        ("PUT", PLAN, {"rate_limit_rpm": -5}, "plan.rate_limit_rpm"),
        ("PUT", ORG_PLAN, {"plan": 3}, "plan"),
        ("PUT", ORG_PLAN, {"plan": "free", "seats": 0}, "seats"),
        ("POST", GRANTS, {"credits": 0}, "credits"),
        ("POST", GRANTS, {"credits": 5, "id": 5}, "id"),
        ("POST", GRANTS, {"credits": 5, "expires_at": "soon"}, "expires_at"),
        ("PUT", CAP, {"threshold_amount": 0}, "threshold_amount"),
        ("PUT", CAP, {"threshold_amount": "100"}, "threshold_amount"),
        ("PUT", CAP.replace("org_z", "x\x01"), {"threshold_amount": 1}, "organization_id"),
    ],
)
def test_bad_operator_input_names_the_field_and_changes_nothing(
    env: Env, method: str, path: str, body: Any, param: str | None
) -> None:
    def state() -> Any:
        return (
            env.meter.plan_of("org_z"),
            env.meter.get_plan("gold"),
            env.meter.spend_cap("org_z"),
            env.meter.quotas.grants("org_z"),
        )

    before = state()
    r = env.send(method, path, body=body, key="operator")
    error = assert_openai_error(r, 422, param)
    assert error["code"] == "invalid_value"
    assert state() == before
    if param != "organization_id":
        # Not an object at all: a malformed body.
        assert_openai_error(env.send(method, path, body=[body], key="operator"), 400)
        assert state() == before
