"""Metering and the quota guard, independent of any web framework.

:class:`Metering` is what :class:`meterkit.asgi.MeteringMiddleware` and
:func:`meterkit.flask.init_app` share: an adapter calls :meth:`Metering.begin` before the
application's endpoint runs (identify the caller, then check and debit the quotas in one atomic
step) and :meth:`Metering.finish` after the response (settle the reservation to the usage the
endpoint reported, and record the request). Both are blocking calls that touch the store: the
ASGI adapter runs them in a worker thread.

The rate-limit headers (``X-RateLimit-*`` and the IETF draft ``RateLimit`` /
``RateLimit-Policy``), the ``Retry-After`` of a refusal and the default refusal body are built
here too, from a :class:`~meterkit.quotas.Decision`, so both adapters answer byte for byte alike.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeAlias, TypeVar, cast

import attrs

from meterkit.auth import Principal, authenticate, cached_principal
from meterkit.errors import QuotaExceeded, StoreUnavailable, ValidationError
from meterkit.http.errors import MESSAGES, OPENAI, HttpError
from meterkit.models import Event
from meterkit.periods import Period
from meterkit.plans import UNLIMITED
from meterkit.pricing import default_period_of
from meterkit.quotas import RATE_WINDOWS, Decision, Reservation, check_amounts
from meterkit.spend import SPEND, nano_to_usd

if TYPE_CHECKING:
    from meterkit.meter import Meter

__all__ = [
    "DEFAULT_COST",
    "NEEDS_STORE",
    "Cost",
    "Identify",
    "Identity",
    "Metering",
    "MeteringOptions",
    "NeedsStore",
    "OnRefused",
    "Refusal",
    "Ticket",
    "Unidentified",
    "Usage",
    "bearer_token",
    "check_priced",
    "merge_headers",
    "openai_refusal",
    "rate_limit_headers",
    "refusal_headers",
    "retry_after_seconds",
]

logger = logging.getLogger("meterkit.metering")

R = TypeVar("R")
Headers: TypeAlias = tuple[tuple[str, str], ...]
Identity: TypeAlias = "str | Principal | None"
Identify: TypeAlias = Callable[[R], Identity]
"""``identify(request) -> organization_id | Principal | None``; ``None`` means "unidentified"."""
Cost: TypeAlias = "Mapping[str, int] | Callable[[R], Mapping[str, int] | None] | None"
"""What a request costs before it runs: a fixed mapping, a function of the request, or none."""
PriceSpec: TypeAlias = "Mapping[str, Mapping[str, int]]"
Price: TypeAlias = "PriceSpec | Callable[[R], PriceSpec | None] | None"
"""The usage a request is expected to price (``{meter: {measure: amount}}``), held against the
spend limit before it runs: a fixed mapping, a function of the request, or none."""
OnRefused: TypeAlias = Callable[[Decision], tuple[int, Sequence[tuple[str, str]], "bytes | str"]]
"""``on_refused(decision) -> (status, headers, body)``: the answer to a refused request."""
Unidentified: TypeAlias = Literal["pass", "refuse"]

DEFAULT_COST: Mapping[str, int] = MappingProxyType({"queries": 1})
"""Every metered request is one query, unless ``cost=`` says otherwise."""

# When nothing better is known (a gauge limit frees up only when something is removed), a
# refused client is told to come back in a minute rather than hammer the server every second.
FALLBACK_RETRY_AFTER = 60


def check_priced(value: object) -> dict[str, dict[str, int]]:
    """Priced usage, ``{meter: {measure: amount}}``, every amount whole and non-negative (a
    ``ValidationError`` names ``price`` or ``price.<meter>``)."""
    if not isinstance(value, Mapping):
        raise ValidationError("price", "must map meter names to {measure: amount}")
    return {str(meter): check_amounts(v, f"price.{meter}") for meter, v in value.items()}


# -- the request-scoped usage handle ---------------------------------------------------------


class Usage:
    """What the endpoint reports about the request it is serving.

    ``usage.add(tokens=123)`` (or ``usage.add({"tokens": 123})``) adds to what is reported;
    after the response the reservation is settled to it: a metric the request reserved is
    committed at the reported amount instead of the reserved one, a metric it did not reserve is
    debited on top. ``metered`` is false when the caller was not identified: reports are then
    dropped. Thread-safe, so an endpoint may report from its own worker threads.
    """

    def __init__(
        self,
        organization_id: str | None = None,
        decision: Decision | None = None,
        key_id: str | None = None,
    ) -> None:
        self.organization_id = organization_id
        self.decision = decision
        self.key_id = key_id
        self._reported: dict[str, int] = {}
        self._priced: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    @property
    def metered(self) -> bool:
        return self.organization_id is not None

    def add(self, amounts: Mapping[str, int] | None = None, /, **more: int) -> None:
        """Report usage; amounts are whole, non-negative numbers and add up across calls."""
        clean = check_amounts({**(amounts or {}), **more}, "usage")
        with self._lock:
            for metric, amount in clean.items():
                self._reported[metric] = self._reported.get(metric, 0) + amount

    def price(self, usage: Mapping[str, Mapping[str, int]]) -> None:
        """Report the usage the request really priced (``{meter: {measure: amount}}``; adds
        up across calls): with the guard's ``price=`` estimate, the request is settled to it
        and recorded as priced events, so its spend and its costs are this usage."""
        clean = check_priced(usage)
        with self._lock:
            for meter, measures in clean.items():
                into = self._priced.setdefault(meter, {})
                for measure, amount in measures.items():
                    into[measure] = into.get(measure, 0) + amount

    @property
    def priced(self) -> dict[str, dict[str, int]]:
        """A copy of the priced usage reported so far."""
        with self._lock:
            return {meter: dict(measures) for meter, measures in self._priced.items()}

    @property
    def reported(self) -> dict[str, int]:
        """A copy of everything reported so far."""
        with self._lock:
            return dict(self._reported)

    def __repr__(self) -> str:
        return f"Usage(organization_id={self.organization_id!r}, reported={self.reported!r})"


# -- headers and bodies from a decision --------------------------------------------------------


def retry_after_seconds(decision: Decision, now: int) -> int:
    """Whole seconds (at least 1) a refused client should wait before trying again.

    The decision's own ``retry_after`` when waiting helps; otherwise the time until the deciding
    limit resets (a request bigger than the whole limit fits no sooner than the next period);
    otherwise (a gauge) :data:`FALLBACK_RETRY_AFTER`.
    """
    if decision.retry_after is not None:
        return max(1, decision.retry_after)
    if decision.reset_at is not None:
        return max(1, decision.reset_at - now)
    return FALLBACK_RETRY_AFTER


@functools.lru_cache(maxsize=1024)  # metric names: a handful, on every response
def _sf_string(value: str) -> str:
    """An RFC 8941 sf-string: printable ASCII only, with ``"`` and ``\\`` escaped."""
    safe = "".join(c if " " <= c <= "~" else "?" for c in value)
    return '"' + safe.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rate_limit_headers(
    decision: Decision, now: int, windows: Mapping[str, int] | None = None
) -> Headers:
    """The rate-limit headers describing ``decision``; none when no limit applies.

    ``X-RateLimit-Limit`` / ``-Remaining`` / ``-Reset`` (Unix seconds) describe the deciding
    limit: the one that refused, or the one with the least room left. ``RateLimit-Policy`` and
    ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers) list every limited line, named by its
    metric, with ``w`` the window in seconds where ``windows`` knows it and ``t`` the seconds
    until it resets (for the refusing line: until a retry can succeed).
    """
    limited = [s for s in decision.limits if s.limit != UNLIMITED]
    if not limited:
        return ()
    windows = windows or {}
    refused = decision.refused_by
    wait = retry_after_seconds(decision, now) if refused is not None else None
    decider = decision.deciding()  # what decision.limit / .remaining / .reset_at describe
    if decider is None:
        limit, remaining, reset_at = decision.limit, decision.remaining, decision.reset_at
    else:
        limit, remaining, reset_at = decider.limit, decider.remaining, decider.reset_at
    reset = now + wait if wait is not None else reset_at
    headers: list[tuple[str, str]] = [
        ("X-RateLimit-Limit", str(limit)),
        ("X-RateLimit-Remaining", str(remaining)),
    ]
    if reset is not None:
        headers.append(("X-RateLimit-Reset", str(reset)))
    policies: list[str] = []
    states: list[str] = []
    for state in limited:
        name = _sf_string(state.metric)
        policies.append(_policy(state.metric, state.limit, windows.get(state.metric)))
        item = f"{name};r={state.remaining}"
        if state.metric == refused and wait is not None:
            item += f";t={wait}"
        elif state.reset_at is not None:
            item += f";t={max(0, state.reset_at - now)}"
        states.append(item)
    headers.append(("RateLimit-Policy", ", ".join(policies)))
    headers.append(("RateLimit", ", ".join(states)))
    return tuple(headers)


@functools.lru_cache(maxsize=4096)  # (metric, limit, window): a few per plan, on every response
def _policy(metric: str, limit: int, window: int | None) -> str:
    name = _sf_string(metric)
    unit = '"requests"' if metric in RATE_WINDOWS else name
    return f"{name};q={limit};qu={unit}" + (f";w={window}" if window else "")


def refusal_headers(
    decision: Decision, now: int, windows: Mapping[str, int] | None = None
) -> Headers:
    """``Retry-After`` and the rate-limit headers of a refused request."""
    return (
        ("Retry-After", str(retry_after_seconds(decision, now))),
        *rate_limit_headers(decision, now, windows),
    )


def _describe_rate(metric: str) -> str:
    return "requests per minute" if RATE_WINDOWS[metric] == 60 else "requests per day"


def openai_refusal(decision: Decision) -> tuple[int, Sequence[tuple[str, str]], bytes]:
    """The default answer to a refusal: a 429 in the OpenAI error shape.

    A rate limit is ``{"type": "requests", "code": "rate_limit_exceeded"}``, a quota
    ``{"type": "insufficient_quota", "code": "insufficient_quota"}``, as the OpenAI API answers.
    """
    metric = decision.refused_by or "quota"
    state = decision.state(metric)
    limit = state.limit if state else decision.limit
    used = state.used if state else decision.used
    if metric in RATE_WINDOWS:
        message = (
            f"Rate limit reached for {_describe_rate(metric)} ({metric}): "
            f"limit {limit}, used {used}."
        )
        kind, code = "requests", "rate_limit_exceeded"
    elif metric == SPEND:
        message = (
            "Your organization reached its hard spend limit of "
            f"${nano_to_usd(limit):.2f} this month (spent ${nano_to_usd(used):.2f})."
        )
        kind, code = "insufficient_quota", "insufficient_quota"
    else:
        requested = state.requested if state else 0
        message = (
            f"You exceeded your current quota for {metric}: "
            f"limit {limit}, used {used}, requested {requested}."
        )
        kind, code = "insufficient_quota", "insufficient_quota"
    if decision.retry_after is not None:
        message += f" Try again in {decision.retry_after}s."
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return 429, (("Content-Type", "application/json"),), json.dumps(body).encode("utf-8")


def merge_headers(
    headers: Iterable[tuple[str, str]], extra: Iterable[tuple[str, str]]
) -> list[tuple[str, str]]:
    """``headers`` plus each of ``extra`` whose name (case-insensitively) is not there yet."""
    out = list(headers)
    present = {name.lower() for name, _ in out}
    out.extend((name, value) for name, value in extra if name.lower() not in present)
    return out


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


# -- what begin() hands back -------------------------------------------------------------------


@attrs.frozen
class Refusal:
    """An answer given instead of calling the endpoint (429, 401 or 503)."""

    status: int
    headers: Headers
    body: bytes
    decision: Decision | None = None


@attrs.define(eq=False)
class Ticket:
    """An admitted request: its decision, its reservation (if it reserved anything), the
    rate-limit headers to add to its response and the handle the endpoint reports usage on."""

    usage: Usage
    decision: Decision
    reservation: Reservation | None
    headers: Headers
    dimensions: Mapping[str, str]

    @property
    def organization_id(self) -> str:
        return self.decision.organization_id

    @property
    def id(self) -> str:
        return self.decision.id


# -- the guard ---------------------------------------------------------------------------------


def _cost(value: Cost[R]) -> Cost[R]:
    if value is None or callable(value):
        return value
    return MappingProxyType(check_amounts(value, "cost"))


def _price(value: Price[R]) -> Price[R]:
    if value is None or callable(value):
        return value
    return MappingProxyType({m: MappingProxyType(v) for m, v in check_priced(value).items()})


def _unidentified(_inst: object, _attr: object, value: object) -> None:
    if value not in ("pass", "refuse"):
        raise ValidationError("unidentified", "must be 'pass' or 'refuse'")


def _ttl(_inst: object, _attr: object, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError("ttl", "must be a positive number of seconds")


@attrs.frozen(kw_only=True)
class MeteringOptions(Generic[R]):
    """How the guard meters the requests of a framework's type ``R``, as one value: what the
    ASGI middleware, the Flask extension and ``meterkit serve`` take (each also takes these as
    keywords). Checked when made; docs/adapters.md describes each."""

    identify: Identify[R] | None = None
    cost: Cost[R] = attrs.field(default=DEFAULT_COST, converter=_cost)
    on_refused: OnRefused | None = None
    record_meter: str | None = "requests"
    unidentified: Unidentified = attrs.field(default="refuse", validator=_unidentified)
    skip: Callable[[R], bool] | None = None
    ttl: int = attrs.field(default=300, validator=_ttl)
    record_refused: bool = False
    price: Price[R] = attrs.field(default=None, converter=_price)

    @classmethod
    def of(cls, options: MeteringOptions[R] | None, given: Mapping[str, Any]) -> MeteringOptions[R]:
        """``options`` with the keyword options ``given`` on top (either may be absent); an
        unknown keyword is a ``TypeError``, as for any function."""
        names = attrs.fields_dict(cls)
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        base = options if options is not None else cls()
        return attrs.evolve(base, **given) if given else base


if TYPE_CHECKING:
    from typing_extensions import TypedDict, Unpack

    class MeteringKeywords(TypedDict, Generic[R], total=False):
        """:class:`MeteringOptions` as keywords, for type checkers."""

        identify: Identify[R] | None
        cost: Cost[R]
        on_refused: OnRefused | None
        record_meter: str | None
        unidentified: Unidentified
        skip: Callable[[R], bool] | None
        ttl: int
        record_refused: bool
        price: Price[R]


class Metering(Generic[R]):
    """Identify, admit, settle and record, for requests of a framework's type ``R``.

    ``authorization(request)`` returns the request's ``Authorization`` header: the default
    ``identify`` authenticates its bearer token with :func:`meterkit.auth.authenticate`.
    ``options`` (or the same as keywords) are a :class:`MeteringOptions`; see
    ``docs/adapters.md`` for every option.
    """

    def __init__(
        self,
        meter: Meter,
        *,
        authorization: Callable[[R], str | None],
        options: MeteringOptions[R] | None = None,
        **given: Unpack[MeteringKeywords[R]],
    ) -> None:
        chosen: MeteringOptions[R] = MeteringOptions.of(options, given)
        self.options = chosen
        self.meter = meter
        self.authorization = authorization
        self.identify = chosen.identify
        self.cost = chosen.cost
        self.price = chosen.price
        self.on_refused: OnRefused = chosen.on_refused or openai_refusal
        self.unidentified: Unidentified = chosen.unidentified
        self._skip = chosen.skip
        self.ttl = chosen.ttl
        self.record_refused = chosen.record_refused
        record_meter = self.record_meter = chosen.record_meter
        self._record_measure: str | None = None
        if record_meter is not None:
            spec = meter.spec(record_meter, "record_meter")
            measure = spec.measure(record_meter) or spec.measures[0]
            self._record_measure = measure.name

    # -- before the request ----------------------------------------------------------------

    def skip(self, request: R, *, own: bool = False) -> bool:
        """True when ``request`` is not metered at all: it goes to meterkit's ``own``
        endpoints (a customer who spent their quota can still read their usage), or the
        ``skip`` option says so."""
        if own:
            return True
        return self._skip is not None and bool(self._skip(request))

    def begin(self, request: R, *, method: str, path: str) -> Ticket | Refusal | None:
        """Identify the caller and admit the request, or refuse it. Blocking (store I/O).

        ``None``: the caller is unidentified and may pass unmetered (or the store is down under
        the fail-open policy). A :class:`Refusal`: answer it instead of calling the endpoint.
        A :class:`Ticket`: call the endpoint, then :meth:`finish`.
        """
        try:
            who = self._identify(request)
        except StoreUnavailable:
            # Whoever it is cannot be told while the store is down: never admitted, whatever
            # the policy (fail-open is about quotas of known callers, not about identity).
            logger.warning("meterkit: store unavailable; cannot identify %s %s", method, path)
            return _error(503, "store_unavailable", (("Retry-After", "1"),))
        try:
            if who is None:
                # Credentials that were presented but do not identify anyone (unknown, revoked,
                # expired, malformed) are refused whatever `unidentified` says: only a caller
                # who presented none may pass unmetered.
                if self.unidentified == "refuse" or self.authorization(request):
                    return self._unidentified(request)
                return None
            org, key_id = (who, None) if isinstance(who, str) else (who.organization_id, who.key_id)
            dimensions = {"api_key_id": key_id} if key_id else {}
            amounts = self._amounts(request)
            price = self._price(request)
            return self._admit(org, key_id, amounts, dimensions, method, path, price)
        except StoreUnavailable:
            if self.meter.quotas.policy == "open":
                logger.warning("meterkit: store unavailable; %s %s passes unmetered", method, path)
                return None
            logger.warning("meterkit: store unavailable; refusing %s %s", method, path)
            return _error(503, "store_unavailable", (("Retry-After", "1"),))

    def begin_local(
        self, request: R, *, method: str, path: str
    ) -> Ticket | Refusal | NeedsStore | None:
        """:meth:`begin` without any store I/O, for an event loop: the caller's key from the
        cache, the decision from this process's leases. :data:`NEEDS_STORE` (nothing was
        decided or consumed) when that is not enough: then call :meth:`begin` in a thread.
        """
        if self.identify is not None or callable(self.cost) or self.price is not None:
            return NEEDS_STORE  # user code, which may block; or a price to estimate
        token = bearer_token(self.authorization(request))
        if token is None or (
            self.meter.quotas.all_in_memory
            and not self.meter.pm.hook.meterkit_authenticate.get_hookimpls()
        ):
            # No credentials (refused or passed without a store call), or keys, plans and
            # counters all in this process's memory: begin() decides right here.
            return self.begin(request, method=method, path=path)
        who = cached_principal(self.meter, token)
        if who is None:
            return NEEDS_STORE
        org, key_id = who.organization_id, who.key_id
        now = self.meter.now()
        period = self.meter.quotas.compiled(org, now)
        if period is None:
            return NEEDS_STORE
        dimensions = {"api_key_id": key_id} if key_id else {}
        amounts = dict(self.cost) if self.cost else {}
        got = self.meter.quotas.decide_local(
            org, amounts, ttl=self.ttl if amounts else None, dimensions=dimensions
        )
        if got is None:
            return NEEDS_STORE
        decision, reservation = got
        windows = self._windows(org, decision, now, period)
        headers = rate_limit_headers(decision, now, windows)
        return Ticket(Usage(org, decision, key_id), decision, reservation, headers, dimensions)

    def _unidentified(self, request: R) -> Refusal:
        if self.identify is not None:
            return _error(401, "unidentified", (), "This request could not be identified.")
        code = "invalid_api_key" if self.authorization(request) else "missing_api_key"
        return _error(401, code, (("WWW-Authenticate", "Bearer"),))

    def _identify(self, request: R) -> Identity:
        if self.identify is not None:
            who = self.identify(request)
        else:
            token = bearer_token(self.authorization(request))
            who = authenticate(self.meter, token) if token is not None else None
        if who is not None and not isinstance(who, (str, Principal)):
            raise TypeError("identify() must return an organization id, a Principal or None")
        return who

    def _amounts(self, request: R) -> dict[str, int]:
        cost = self.cost
        if cost is None:
            return {}
        if callable(cost):
            found = cost(request)
            return check_amounts(found, "cost") if found else {}
        return dict(cost)

    def _price(self, request: R) -> dict[str, dict[str, int]] | None:
        price = self.price
        if price is None:
            return None
        found = price(request) if callable(price) else price
        return check_priced(found) if found else None

    def _admit(
        self,
        org: str,
        key_id: str | None,
        amounts: dict[str, int],
        dimensions: dict[str, str],
        method: str,
        path: str,
        price: dict[str, dict[str, int]] | None = None,
    ) -> Ticket | Refusal:
        reservation: Reservation | None = None
        try:
            if amounts or price:
                reservation = self.meter.reserve(
                    org, amounts, ttl=self.ttl, dimensions=dimensions, price=price
                )
                decision = reservation.decision
            else:
                # Nothing to hold until the response: the rate limits are decided (and counted)
                # by one check.
                decision = self.meter.check(org, {}, dimensions=dimensions)
                if not decision.allowed:
                    raise QuotaExceeded(decision)
        except QuotaExceeded as exc:
            return self._refuse(cast(Decision, exc.decision), dimensions, method, path)
        now = self.meter.now()
        headers = rate_limit_headers(decision, now, self._windows(org, decision, now))
        usage = Usage(org, decision, key_id)
        return Ticket(usage, decision, reservation, headers, dimensions)

    def _windows(
        self, org: str, decision: Decision, now: int, period: Period | None = None
    ) -> dict[str, int]:
        """Each limited line's window in seconds: the rate window, or the billing period."""
        out: dict[str, int] = {}
        for state in decision.limits:
            if state.limit == UNLIMITED:
                continue
            if state.metric in RATE_WINDOWS:
                out[state.metric] = RATE_WINDOWS[state.metric]
            elif state.metric == SPEND:
                month = default_period_of(now)
                out[SPEND] = month.end - month.start
            elif state.reset_at is not None:
                period = (
                    period
                    or self.meter.quotas.compiled(org, now)
                    or self.meter.quotas.period(org, now)
                )
                out[state.metric] = period.end - period.start
        return out

    def _refuse(
        self, decision: Decision, dimensions: Mapping[str, str], method: str, path: str
    ) -> Refusal:
        now = self.meter.now()
        org = decision.organization_id
        status, custom, body = self.on_refused(decision)
        headers = merge_headers(
            [(str(k), str(v)) for k, v in custom],
            refusal_headers(decision, now, self._windows(org, decision, now)),
        )
        raw = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        if self.record_refused:
            self._record(f"{decision.id}:request", org, dimensions, method, path, status)
        return Refusal(int(status), tuple(headers), raw, decision)

    # -- after the response ----------------------------------------------------------------

    def finish_local(
        self, ticket: Ticket, *, status: int | None, method: str, route: str, failed: bool = False
    ) -> bool:
        """:meth:`finish` without any store I/O, when the request's reservation came from a
        lease and it reported no usage beyond what it held; ``False`` (nothing done) otherwise:
        then call :meth:`finish` in a thread. Never raises."""
        reservation = ticket.reservation
        if self.meter.quotas.all_in_memory:
            try:
                self._finish(ticket, status=status, method=method, route=route, failed=failed)
            except Exception:
                logger.exception("meterkit: could not settle request %s", ticket.id)
            return True
        if reservation is not None and not reservation.leased:
            return False
        if self.price is not None:
            return False  # priced events are priced from the price book: maybe a store read
        held = reservation.held if reservation is not None else {}
        if any(v for m, v in ticket.usage.reported.items() if m not in held):
            return False  # a debit of usage nobody reserved: the store's
        try:
            with self.meter.quotas.no_io():
                self._finish(ticket, status=status, method=method, route=route, failed=failed)
        except Exception:
            logger.exception("meterkit: could not settle request %s", ticket.id)
        return True

    def finish(
        self, ticket: Ticket, *, status: int | None, method: str, route: str, failed: bool = False
    ) -> None:
        """Settle the reservation and record the request. Blocking (store I/O); never raises.

        A request that raised, answered 5xx or never answered (``status`` ``None``) failed:
        its reservation is released, so the caller does not pay for the server's failure. Usage
        the endpoint reported explicitly is counted either way, because it happened.
        """
        try:
            # Settling and reported usage: one commit where the store decides (a leased
            # reservation settles in memory). If it fails the hold expires after its ttl and
            # gives its amounts back, so a request is never charged twice.
            settles_in_store = ticket.reservation is not None and not ticket.reservation.leased
            with self.meter.transaction() if settles_in_store else contextlib.nullcontext():
                self._finish(ticket, status=status, method=method, route=route, failed=failed)
        except Exception:
            logger.exception("meterkit: could not settle request %s", ticket.id)

    def _finish(
        self, ticket: Ticket, *, status: int | None, method: str, route: str, failed: bool
    ) -> None:
        failed = failed or status is None or status >= 500
        reported = ticket.usage.reported
        org = ticket.organization_id
        extra = dict(reported)
        reservation = ticket.reservation
        if reservation is not None:
            # The spend line is settled by the usage itself (its priced events), never reported.
            held = {m: a for m, a in reservation.held.items() if m != SPEND}
            extra = {m: v for m, v in reported.items() if m not in held}
            priced = ticket.usage.priced if SPEND in reservation.held else {}
            real = {"price": priced} if priced else {}
            if not failed:
                reservation.commit({m: reported.get(m, a) for m, a in held.items()}, **real)
            elif priced or any(m in reported for m in held):
                reservation.commit({m: reported.get(m, 0) for m in held}, **real)
            else:
                reservation.release()
        extra = {m: v for m, v in extra.items() if v}
        if extra:
            self.meter.debit(org, extra, dimensions=ticket.dimensions)
        self._record(
            f"{ticket.id}:request",
            org,
            ticket.dimensions,
            method,
            route,
            500 if status is None else status,
        )

    def _record(
        self,
        event_id: str,
        org: str,
        dimensions: Mapping[str, str],
        method: str,
        route: str,
        status: int,
    ) -> None:
        if self.record_meter is None or self._record_measure is None:
            return
        spec = self.meter.spec(self.record_meter)
        known = spec.dimension_names
        dims = {
            k: v
            for k, v in {
                **dimensions,
                "method": method.upper()[:64] or "-",
                "route": route[:256] or "/",
                "status": str(status),
            }.items()
            if k in known
        }
        event = Event(
            event_id, self.record_meter, org, self.meter.now(), {self._record_measure: 1}, dims
        )
        try:
            # Written by the meter's next flush: the request is not held up by a commit.
            self.meter.record_later([event], wait=not self.meter.quotas.in_no_io)
        except Exception:
            logger.exception("meterkit: could not record request %s", event_id)


class NeedsStore(enum.Enum):
    """What :meth:`Metering.begin_local` answers when only the store can tell."""

    NEEDS_STORE = "needs_store"


NEEDS_STORE = NeedsStore.NEEDS_STORE

_OWN_PATHS: re.Pattern[str] | None = None


def own_endpoint(path: str) -> bool:
    """Whether ``path`` is one of meterkit's own HTTP endpoint paths (``/healthz``, …)."""
    global _OWN_PATHS
    if _OWN_PATHS is None:
        from meterkit.http.app import default_surfaces

        # Hidden catch-alls (``/v1/{resource}/{action}``) only answer 404: an application's
        # own path of that form is not one of ours.
        templates = sorted({r.path for s in default_surfaces() for r in s.routes if not r.hidden})
        alternatives = "|".join(re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(t)) for t in templates)
        _OWN_PATHS = re.compile(f"(?:{alternatives})")
    return _OWN_PATHS.fullmatch(path) is not None


def _error(
    status: int, code: str, headers: Sequence[tuple[str, str]], message: str | None = None
) -> Refusal:
    text = message if message is not None else MESSAGES[code]
    response = OPENAI.error(HttpError(status, text, code=code, headers=headers))
    return Refusal(status, response.headers, response.body)
