"""API keys (meterkit.auth): creation, hashed storage, authentication, revocation, the hook."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meterkit import Meter, ValidationError, auth, hookimpl
from meterkit.auth import (
    ApiKey,
    Principal,
    authenticate,
    create_key,
    get_key,
    list_keys,
    revoke_key,
)

NOW = 1_730_419_200


@pytest.fixture
def meter(store_url: str) -> Iterator[Meter]:
    with Meter(store_url, clock=lambda: NOW) as m:
        yield m


def test_create_key_returns_token_once_and_metadata_without_secret(meter: Meter) -> None:
    token, key = create_key(meter, "org_a", "admin", ["usage:read", "usage:write"], name="ci")
    assert isinstance(key, ApiKey)
    assert token.startswith(f"mk_{key.id}_")
    assert key.organization_id == "org_a"
    assert key.role == "admin"
    assert key.scopes == frozenset({"usage:read", "usage:write"})
    assert key.name == "ci" and key.prefix == "mk_" and key.created_at == NOW
    assert key.active and key.revoked_at is None
    assert token not in repr(key)
    secret = token[len(f"mk_{key.id}_") :]
    # At least 32 bytes of randomness in the secret part.
    assert len(base64.urlsafe_b64decode(secret + "=")) >= 32


def test_store_keeps_only_a_hash(meter: Meter) -> None:
    token, key = create_key(meter, "org_a", "member", ["usage:read"])
    record = meter.store.get_record(auth.KEY_KIND, key.id)
    assert record is not None
    stored = json.dumps(record)
    secret = token[-43:]
    assert token not in stored and secret not in stored
    assert len(record["sha256"]) == 64
    assert record["organization_id"] == "org_a" and record["scopes"] == ["usage:read"]


def test_tokens_are_unique(meter: Meter) -> None:
    tokens = {create_key(meter, "org_a", "member", ["usage:read"])[0] for _ in range(20)}
    assert len(tokens) == 20


def test_authenticate_a_key(meter: Meter) -> None:
    token, key = create_key(meter, "org_a", "member", ["usage:read"])
    principal = authenticate(meter, token)
    assert principal == Principal("org_a", "member", frozenset({"usage:read"}), key.id)
    assert principal is not None and not principal.is_admin
    assert principal.has_scope("usage:read") and not principal.has_scope("usage:write")


def test_keys_survive_reopening(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    with Meter(url) as m:
        token, key = create_key(m, "org_a", "admin", ["usage:read"])
    with Meter(url) as m:
        principal = authenticate(m, token)
        assert principal is not None and principal.key_id == key.id


def test_wrong_secret_unknown_id_or_tampering_is_refused(meter: Meter) -> None:
    token, key = create_key(meter, "org_a", "admin", ["usage:read"])
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    other_id = token.replace(key.id, "0" * 16)
    other_prefix = "xx_" + token[3:]
    for bad in (
        flipped,
        other_id,
        other_prefix,
        token + "x",
        token[:-1],
        "",
        "Bearer " + token,
        token.upper(),
        "mk_",
        "mk_" + "a" * 200,
    ):
        assert authenticate(meter, bad) is None, bad


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_garbage_tokens_are_none(token: str) -> None:
    with Meter("memory://", clock=lambda: NOW) as m:
        create_key(m, "org_a", "admin", ["usage:read"])
        assert authenticate(m, token) is None


def test_revoke(meter: Meter) -> None:
    token, key = create_key(meter, "org_a", "admin", ["usage:read"])
    assert revoke_key(meter, key.id) is True
    assert authenticate(meter, token) is None
    assert revoke_key(meter, key.id) is False
    assert revoke_key(meter, "0123456789abcdef") is False
    stored = get_key(meter, key.id)
    assert stored is not None and stored.revoked_at == NOW and not stored.active


def test_list_keys_is_per_organization(meter: Meter) -> None:
    _, a1 = create_key(meter, "org_a", "admin", ["usage:read"])
    _, a2 = create_key(meter, "org_a", "member", "usage:read,usage:write")
    _, b1 = create_key(meter, "org_b", "member", ["usage:read"])
    revoke_key(meter, a1.id)
    keys = list_keys(meter, "org_a")
    assert sorted(k.id for k in keys) == sorted([a1.id, a2.id])
    assert {k.id: k.active for k in keys} == {a1.id: False, a2.id: True}
    assert [k.id for k in list_keys(meter, "org_b")] == [b1.id]
    assert list_keys(meter, "org_c") == []
    assert get_key(meter, a2.id) == a2
    assert a2.scopes == frozenset({"usage:read", "usage:write"})


def test_custom_prefix(meter: Meter) -> None:
    for prefix in ("acme_", "sk-live-", "x", "a_b_c_"):
        token, key = create_key(meter, "org_a", "member", ["usage:read"], prefix=prefix)
        assert token.startswith(prefix + key.id + "_") and key.prefix == prefix
        principal = authenticate(meter, token)
        assert principal is not None and principal.key_id == key.id


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("", "admin", ["usage:read"]), {}, "organization_id"),
        ((" org", "admin", ["usage:read"]), {}, "organization_id"),
        ((None, "admin", ["usage:read"]), {}, "organization_id"),
        (("org_a", "owner", ["usage:read"]), {}, "role"),
        (("org_a", "admin", ["usage:delete"]), {}, "scopes"),
        (("org_a", "admin", 5), {}, "scopes"),
        (("org_a", "admin", [5]), {}, "scopes"),
        (("org_a", "admin", ["usage:read"]), {"prefix": ""}, "prefix"),
        (("org_a", "admin", ["usage:read"]), {"prefix": "has space"}, "prefix"),
        (("org_a", "admin", ["usage:read"]), {"prefix": "p" * 17}, "prefix"),
        (("org_a", "admin", ["usage:read"]), {"prefix": "mk\n"}, "prefix"),
        (("org_a", "admin", ["usage:read"]), {"name": ""}, "name"),
        (("org_a", "admin", ["usage:read"]), {"name": 3}, "name"),
    ],
)
def test_bad_input_names_the_field(
    meter: Meter, args: tuple[Any, ...], kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as err:
        create_key(meter, *args, **kwargs)
    assert err.value.field == field
    assert meter.store.list_records(auth.KEY_KIND) == []


def test_bad_input_elsewhere(meter: Meter) -> None:
    with pytest.raises(ValidationError) as err:
        authenticate(meter, None)  # type: ignore[arg-type]
    assert err.value.field == "token"
    with pytest.raises(ValidationError) as err:
        revoke_key(meter, "")
    assert err.value.field == "key_id"
    with pytest.raises(ValidationError) as err:
        list_keys(meter, "")
    assert err.value.field == "organization_id"
    with pytest.raises(ValidationError) as err:
        Principal("org_a", "root", frozenset())
    assert err.value.field == "role"


class Sessions:
    """An application's own session tokens, through the meterkit_authenticate hook."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl
    def meterkit_authenticate(self, meter: Meter, token: str) -> Principal | None:
        self.asked.append(token)
        if token == "session-123":
            return Principal("org_s", "member", frozenset({"usage:read", "app:custom"}))
        return None


def test_meterkit_authenticate_hook_is_asked_first() -> None:
    sessions = Sessions()
    with Meter("memory://", plugins=[sessions], clock=lambda: NOW) as m:
        principal = authenticate(m, "session-123")
        assert principal == Principal("org_s", "member", frozenset({"usage:read", "app:custom"}))
        assert principal is not None and principal.key_id is None
        # Tokens the hook does not know fall through to meterkit's keys.
        token, key = create_key(m, "org_a", "admin", ["usage:read"])
        found = authenticate(m, token)
        assert found is not None and found.key_id == key.id
        assert authenticate(m, "session-999") is None
        assert sessions.asked == ["session-123", token, "session-999"]


def test_meterkit_authenticate_hook_must_return_a_principal() -> None:
    class Broken:
        @hookimpl
        def meterkit_authenticate(self, token: str) -> object:
            return {"organization_id": "org_a"}

    with Meter("memory://", plugins=[Broken()]) as m, pytest.raises(ValidationError) as err:
        authenticate(m, "anything")
    assert err.value.field == "meterkit_authenticate"


def test_a_miss_does_the_same_work_as_a_wrong_secret(
    meter: Meter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a key id exists must not show in what checking a token costs.

    Counted, not timed: every well-formed token that fails costs one hash of the token and one
    read of the hash index, and never reads the record of the id it names.
    """
    token, _ = create_key(meter, "org_a", "member", ["usage:read"])
    revoked_token, revoked = create_key(meter, "org_a", "member", ["usage:read"])
    revoke_key(meter, revoked.id)
    assert authenticate(meter, token) is not None  # once per process: index older keys
    secret = token[-43:]
    wrong_secret = token[:-43] + ("A" if secret[0] != "A" else "B") + secret[1:]
    unknown_id = f"mk_{'0' * 16}_{secret}"
    work: list[tuple[str, object]] = []
    real_hash, real_compare = auth._hash, auth.hmac.compare_digest
    real_get = meter.store.get_record

    def counted_hash(text: str) -> str:
        work.append(("hash", len(text)))
        return real_hash(text)

    def counted_compare(a: str, b: str) -> bool:
        work.append(("compare", (len(a), len(b))))
        return real_compare(a, b)

    def counted_get(kind: str, record_key: str) -> Any:
        work.append(("read", kind))
        return real_get(kind, record_key)

    monkeypatch.setattr(auth, "_hash", counted_hash)
    monkeypatch.setattr(auth.hmac, "compare_digest", counted_compare)
    monkeypatch.setattr(meter.store, "get_record", counted_get)
    seen = []
    for candidate in (unknown_id, wrong_secret, revoked_token):
        work.clear()
        assert authenticate(meter, candidate) is None
        seen.append(list(work))
    assert seen[0] == seen[1] == seen[2], seen
    assert seen[0] == [("hash", len(token)), ("read", "api_key_sha256")]
    # A good token found valid within the last second: its hash, and nothing read.
    work.clear()
    assert authenticate(meter, token) is not None
    assert work == [("hash", len(token))]
    # Checked afresh: the index, then its own record.
    auth._CACHES.pop(meter, None)
    work.clear()
    assert authenticate(meter, token) is not None
    assert work == [
        ("hash", len(token)),
        ("read", "api_key_sha256"),
        ("read", "api_key"),
        ("compare", (64, 64)),
    ]


def test_revocation_is_seen_at_once_here_and_within_the_bound_elsewhere(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr("meterkit.auth._time.monotonic", lambda: now[0])
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    with Meter(url, clock=lambda: NOW) as here, Meter(url, clock=lambda: NOW) as there:
        token, key = create_key(here, "org_a", "member", ["usage:read"])
        other, other_key = create_key(here, "org_a", "member", ["usage:read"])
        for m in (here, there):
            assert authenticate(m, token) is not None and authenticate(m, other) is not None
        assert revoke_key(here, key.id)
        assert authenticate(here, token) is None  # the revoking process: at once
        assert authenticate(there, token) is not None  # another: trusted a moment longer ...
        now[0] += auth.KEY_CACHE_SECONDS
        assert authenticate(there, token) is None  # ... and no longer than the bound
        assert authenticate(there, other) is not None and other_key.id != key.id


def test_keys_from_before_the_hash_index_still_authenticate() -> None:
    meter = Meter("memory://")
    token, key = create_key(meter, "org_a", "member", ["usage:read"])
    revoked_token, revoked = create_key(meter, "org_a", "member", ["usage:read"])
    revoke_key(meter, revoked.id)
    # As 0.1 left a store: key records only.
    for digest, _ in meter.store.list_records(auth.HASH_KIND):
        meter.store.delete_record(auth.HASH_KIND, digest)
    fresh = Meter(store=meter.store)
    found = authenticate(fresh, token)
    assert found is not None and found.key_id == key.id
    assert authenticate(fresh, revoked_token) is None
