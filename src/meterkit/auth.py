"""API keys: bound to one organization, with a role and scopes, stored hashed.

A token looks like ``mk_3f9a0c1d2e4b5a69_<secret>``: a configurable prefix, the key id (16 hex
digits) and a secret of 32 random bytes (43 URL-safe base64 characters). The token is shown
once, by :func:`create_key`; the store keeps only the SHA-256 of the whole token, under the
record kind ``"api_key"`` keyed by the key id, and an index record ``"api_key_sha256"`` keyed
by that hash. A 256-bit random secret cannot be guessed from its hash, so no slow password hash
is needed.

A token is looked up by its hash, never by the id it names: a token that identifies nobody is
one missing index record whether its key id exists, is revoked or was never issued, so what a
check costs tells nothing about which ids exist. Revoking a key removes its index record.

:func:`authenticate` first asks the ``meterkit_authenticate`` hook (an application's own
sessions or tokens), then meterkit's keys.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time as _time
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

import attrs

from meterkit.errors import ValidationError
from meterkit.validate import check_id, check_string

if TYPE_CHECKING:
    from meterkit.meter import Meter

__all__ = [
    "DEFAULT_PREFIX",
    "HASH_KIND",
    "KEY_CACHE_SECONDS",
    "KEY_KIND",
    "ROLES",
    "SCOPES",
    "ApiKey",
    "Principal",
    "authenticate",
    "cached_principal",
    "create_key",
    "get_key",
    "list_keys",
    "revoke_key",
]

KEY_KIND = "api_key"
HASH_KIND = "api_key_sha256"
KEY_CACHE_SECONDS = 1.0
"""How long a process trusts a token it found valid before reading the store again: a key
revoked by another process stops working there within this bound (at once where revoked)."""
_KEY_CACHE_SIZE = 10_000
_CACHES: weakref.WeakKeyDictionary[Meter, _KeyCache] = weakref.WeakKeyDictionary()
_INDEXED: weakref.WeakSet[Meter] = weakref.WeakSet()
DEFAULT_PREFIX = "mk_"
ROLES: tuple[str, ...] = ("member", "admin")
SCOPES: tuple[str, ...] = ("usage:read", "usage:write", "operator")
Role = Literal["member", "admin"]

_ID_HEX = 16  # 8 random bytes: ids only need to be unique, the secret carries the strength
_SECRET_BYTES = 32
_SECRET_CHARS = 43  # len(base64url(32 bytes)) without padding
_TAIL = _ID_HEX + 1 + _SECRET_CHARS
_MAX_TOKEN = 256
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,16}")
_ID_RE = re.compile(r"[0-9a-f]{16}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def _check_role(value: object) -> str:
    if value not in ROLES:
        raise ValidationError("role", f"must be one of {list(ROLES)}, not {value!r}")
    return str(value)


def _check_scopes(value: object, *, known_only: bool) -> frozenset[str]:
    if isinstance(value, str):
        # "usage:read,usage:write" (as typed on a command line) is accepted too.
        value = [s for s in re.split(r"[,\s]+", value) if s]
    if isinstance(value, (bytes, dict)) or not isinstance(value, Iterable):
        raise ValidationError("scopes", "must be a list of scopes")
    out = set()
    for scope in value:
        check_string("scopes", scope)
        if known_only and scope not in SCOPES:
            raise ValidationError("scopes", f"unknown scope {scope!r}; known: {list(SCOPES)}")
        out.add(scope)
    return frozenset(out)


def _principal_org(value: object) -> str:
    return check_id("organization_id", value)


def _principal_scopes(value: Iterable[str]) -> frozenset[str]:
    return _check_scopes(value, known_only=False)


@attrs.frozen
class Principal:
    """Who is asking: an organization, a role and scopes; ``key_id`` when it is a meterkit key.

    Plugins implementing ``meterkit_authenticate`` return one of these for their own tokens;
    their scopes may include names of the application's own besides ``usage:read`` and
    ``usage:write``.
    """

    organization_id: str = attrs.field(converter=_principal_org)
    role: str = attrs.field(converter=_check_role)
    scopes: frozenset[str] = attrs.field(converter=_principal_scopes)
    key_id: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


@attrs.frozen
class ApiKey:
    """An API key's metadata. The token itself is never kept; this carries no secret."""

    id: str
    organization_id: str
    role: str
    scopes: frozenset[str]
    prefix: str
    name: str | None
    created_at: int
    revoked_at: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def principal(self) -> Principal:
        return Principal(self.organization_id, self.role, self.scopes, self.id)


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _from_record(key_id: str, data: dict[str, Any]) -> ApiKey:
    return ApiKey(
        id=key_id,
        organization_id=data["organization_id"],
        role=data["role"],
        scopes=frozenset(data["scopes"]),
        prefix=data["prefix"],
        name=data.get("name"),
        created_at=data["created_at"],
        revoked_at=data.get("revoked_at"),
    )


def create_key(
    meter: Meter,
    organization_id: str,
    role: str,
    scopes: Iterable[str],
    *,
    prefix: str = DEFAULT_PREFIX,
    name: str | None = None,
) -> tuple[str, ApiKey]:
    """Create a key; returns ``(token, metadata)``. The token cannot be shown again."""
    org = check_id("organization_id", organization_id)
    role = _check_role(role)
    scope_set = _check_scopes(scopes, known_only=True)
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ValidationError("prefix", "must be 1 to 16 characters of A-Z, a-z, 0-9, '_', '-'")
    if name is not None:
        name = check_string("name", name)
    key_id = secrets.token_hex(_ID_HEX // 2)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    token = f"{prefix}{key_id}_{secret}"
    key = ApiKey(key_id, org, role, scope_set, prefix, name, meter.now())
    digest = _hash(token)
    with meter.transaction():
        meter.store.put_record(
            KEY_KIND,
            key_id,
            {
                "organization_id": org,
                "role": role,
                "scopes": sorted(scope_set),
                "prefix": prefix,
                "name": name,
                "created_at": key.created_at,
                "revoked_at": None,
                "sha256": digest,
            },
        )
        meter.store.put_record(HASH_KIND, digest, {"id": key_id})
    return token, key


def get_key(meter: Meter, key_id: str) -> ApiKey | None:
    """A key's metadata by id (revoked keys too), or ``None``."""
    key_id = check_id("key_id", key_id)
    data = meter.store.get_record(KEY_KIND, key_id)
    return _from_record(key_id, data) if data is not None else None


def list_keys(meter: Meter, organization_id: str) -> list[ApiKey]:
    """Every key of one organization, revoked ones included (``revoked_at`` set), by id."""
    org = check_id("organization_id", organization_id)
    return [
        _from_record(key_id, data)
        for key_id, data in meter.store.list_records(KEY_KIND)
        if data.get("organization_id") == org
    ]


def revoke_key(meter: Meter, key_id: str) -> bool:
    """Revoke a key at once; ``True`` if it was active, ``False`` if unknown or already revoked.

    The record stays (without any way to authenticate) so :func:`list_keys` can show when it
    was revoked.
    """
    key_id = check_id("key_id", key_id)
    data = meter.store.get_record(KEY_KIND, key_id)
    if data is None or data.get("revoked_at") is not None:
        return False
    with meter.transaction():
        # The index record goes first where the store has no transaction: a key is never
        # left usable while marked revoked.
        if isinstance(data.get("sha256"), str):
            meter.store.delete_record(HASH_KIND, data["sha256"])
        meter.store.put_record(KEY_KIND, key_id, {**data, "revoked_at": meter.now()})
    _cache(meter).forget(key_id)  # at once here; other processes within KEY_CACHE_SECONDS
    return True


def _index_keys(meter: Meter) -> None:
    """Give keys created before the hash index their index record (once per process)."""
    if meter in _INDEXED:
        return
    for key_id, data in meter.store.list_records(KEY_KIND):
        digest = data.get("sha256")
        if (
            data.get("revoked_at") is None
            and isinstance(digest, str)
            and meter.store.get_record(HASH_KIND, digest) is None
        ):
            meter.store.put_record(HASH_KIND, digest, {"id": key_id})
    _INDEXED.add(meter)


def _split(token: str) -> tuple[str, str] | None:
    """``(prefix, key_id)`` of a well-formed token, read from the right (prefixes vary)."""
    if len(token) <= _TAIL or len(token) > _MAX_TOKEN or token[-_SECRET_CHARS - 1] != "_":
        return None
    prefix, key_id = token[:-_TAIL], token[-_TAIL : -_SECRET_CHARS - 1]
    if not _PREFIX_RE.fullmatch(prefix) or not _ID_RE.fullmatch(key_id):
        return None
    if not _SECRET_RE.fullmatch(token[-_SECRET_CHARS:]):
        return None
    return prefix, key_id


class _KeyCache:
    """Tokens recently found valid, by their hash, for :data:`KEY_CACHE_SECONDS`.

    Only hits are kept: a token that identifies nobody is looked up in the store every time,
    so it costs the same whether its id exists or not, and junk cannot fill the cache.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: dict[str, tuple[float, Principal]] = {}

    def get(self, digest: str) -> Principal | None:
        with self.lock:
            hit = self.entries.get(digest)
        if hit is None or hit[0] <= _time.monotonic():
            return None
        return hit[1]

    def put(self, digest: str, principal: Principal) -> None:
        with self.lock:
            if len(self.entries) >= _KEY_CACHE_SIZE:
                self.entries.clear()
            self.entries[digest] = (_time.monotonic() + KEY_CACHE_SECONDS, principal)

    def forget(self, key_id: str) -> None:
        with self.lock:
            for digest, (_, principal) in list(self.entries.items()):
                if principal.key_id == key_id:
                    del self.entries[digest]


def _cache(meter: Meter) -> _KeyCache:
    found = _CACHES.get(meter)
    if found is None:
        found = _CACHES.setdefault(meter, _KeyCache())
    return found


def _check_key(meter: Meter, token: str) -> Principal | None:
    parts = _split(token)
    if parts is None:
        return None
    prefix, key_id = parts
    digest = _hash(token)
    cached = _cache(meter).get(digest)
    if cached is not None:
        return cached
    _index_keys(meter)
    ref = meter.store.get_record(HASH_KIND, digest)
    if ref is None or ref.get("id") != key_id:
        return None
    data = meter.store.get_record(KEY_KIND, key_id)
    expected = data.get("sha256") if data is not None else None
    # Found by the hash of the whole token, so this only guards against a damaged index.
    if not isinstance(expected, str) or not hmac.compare_digest(digest, expected):
        return None
    if data is None or data.get("revoked_at") is not None or data.get("prefix") != prefix:
        return None
    principal = _from_record(key_id, data).principal()
    _cache(meter).put(digest, principal)
    return principal


def cached_principal(meter: Meter, token: str) -> Principal | None:
    """The principal of a token found valid within :data:`KEY_CACHE_SECONDS`, without any
    store call; ``None`` when it is not known that way (ask :func:`authenticate`). Plugins that
    authenticate are never bypassed: with one installed, this is always ``None``."""
    if not isinstance(token, str) or meter.pm.hook.meterkit_authenticate.get_hookimpls():
        return None
    if _split(token) is None:
        return None
    return _cache(meter).get(_hash(token))


def authenticate(meter: Meter, token: str) -> Principal | None:
    """The :class:`Principal` a bearer token stands for, or ``None`` if it stands for nobody.

    The ``meterkit_authenticate`` hook is asked first (the first plugin to return a
    principal wins); then the token is checked against meterkit's own keys. A revoked key,
    an unknown key or a malformed token is ``None``.
    """
    if not isinstance(token, str):
        raise ValidationError("token", f"must be a string, not {type(token).__name__}")
    found = meter.pm.hook.meterkit_authenticate(meter=meter, token=token)
    if found is not None:
        if not isinstance(found, Principal):
            raise ValidationError(
                "meterkit_authenticate", "a plugin must return a meterkit.auth.Principal or None"
            )
        return found
    if not token:
        return None
    return _check_key(meter, token)
