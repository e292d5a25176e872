"""Spend limits and spend alerts: an organization's month-to-date cost, held against a budget.

Spend is counted in the quota counters like any metric, under the reserved metric name
``spend``, in whole **nano-dollars** (10⁻⁹ USD) per UTC calendar month. Two things add to it:

- every recorded event the price book prices (``record``, ingest, the middleware), at the
  highest unit price its price line can charge (its own price, or its dearest tier): the
  counter is never below the cost the costs engine computes from the same events;
- decisions given an estimated ``cost`` (or amounts to ``price``): ``check`` debits it,
  ``reserve`` holds it and ``commit(cost=...)`` settles it to the actual cost.

Amounts are exact ``Decimal`` until they are counted, and rounded *up* to the nano-dollar
then, so rounding can only refuse a request sooner, never admit one past the limit.

A **spend limit** (one per organization, in cents, like OpenAI's
``organization.spend_limit``) refuses every decision whose estimated cost would take the
month's spend past it, and every decision at all once spend has reached it; its
``enforcement.status`` is then ``enforcing``. **Spend alerts** (``organization.spend_alert``)
fire once per alert and month, through the ``meterkit_quota_threshold`` hook and the
meter's notifiers (:mod:`meterkit.notify`).

Both are store records, so every process sharing the store enforces and alerts alike: the
limit is the record ``spend_limit`` keyed by the organization, each alert a record of the
kind ``spend_alert:<organization>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import attrs

from meterkit.errors import ValidationError
from meterkit.validate import MAX_VALUE, check_id, check_string

if TYPE_CHECKING:
    from meterkit.stores.base import Store

__all__ = [
    "LINE_BREAKS",
    "MAX_CENTS",
    "MAX_RECIPIENTS",
    "NANO",
    "SPEND",
    "NotificationChannel",
    "SpendAlert",
    "SpendLimit",
    "SpendState",
    "cents_to_nano",
    "check_cost",
    "nano_to_usd",
    "to_nano",
]

SPEND = "spend"
"""The reserved metric name of spend in the quota counters and in decisions."""

NANO = 10**9
"""Counter units per dollar."""

_CENTS_TO_NANO = 10**7
# The largest threshold whose nano-dollars a counter still holds exactly.
MAX_CENTS = MAX_VALUE // _CENTS_TO_NANO
LIMIT_RECORD = "spend_limit"
CAP_RECORD = "spend_cap"
"""The operator's cap on an organization's spend limit: the organization may set its own limit
at or under it, never above, and removing its own limit leaves the cap in force."""
MAX_RECIPIENTS = 20
MAX_ALERTS = 50
"""Spend alerts one organization may have."""
# Characters that break a header line (an email's To or Subject) besides CR and LF.
LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def alert_kind(organization_id: str) -> str:
    return f"spend_alert:{organization_id}"


def cents_to_nano(cents: int) -> int:
    return cents * _CENTS_TO_NANO


def to_nano(amount: Decimal) -> int:
    """Dollars as whole nano-dollars, rounded up (a counter never runs below the cost)."""
    return int((amount * NANO).to_integral_value(rounding=ROUND_CEILING))


def nano_to_usd(nano: int) -> Decimal:
    return Decimal(nano).scaleb(-9).normalize() if nano else Decimal(0)


def check_cost(field: str, value: object) -> Decimal:
    """An estimated or actual cost in dollars: a ``Decimal``, an int or a decimal string
    (never a float: money stays exact), from 0 up to what a counter holds."""
    if isinstance(value, (bool, float)):
        raise ValidationError(
            field, f"must be a Decimal, an int or a decimal string, not {type(value).__name__}"
        )
    if isinstance(value, (Decimal, int)):
        amount = Decimal(value)
    elif isinstance(value, str):
        try:
            amount = Decimal(value.strip())
        except InvalidOperation:
            raise ValidationError(field, f"{value[:50]!r} is not a decimal amount") from None
    else:
        raise ValidationError(field, f"must be a decimal amount, not {type(value).__name__}")
    if not amount.is_finite():
        raise ValidationError(field, "must be finite")
    if amount < 0:
        raise ValidationError(field, "must not be negative")
    if amount * NANO > MAX_VALUE:
        raise ValidationError(field, f"must not exceed {nano_to_usd(MAX_VALUE)} dollars")
    return amount


def check_cents(value: object, field: str = "threshold_amount") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValidationError(field, "must be a positive whole number of cents")
    if value > MAX_CENTS:
        raise ValidationError(field, f"must not exceed {MAX_CENTS} cents")
    return value


def check_currency(value: object) -> str:
    if value != "USD":
        raise ValidationError("currency", "must be 'USD' (the only currency supported)")
    return "USD"


def check_interval(value: object) -> str:
    if value != "month":
        raise ValidationError("interval", "must be 'month' (the only interval supported)")
    return "month"


@attrs.frozen
class SpendLimit:
    """An organization's hard spend limit: ``threshold_amount`` cents per UTC month."""

    organization_id: str
    threshold_amount: int
    currency: str = "USD"
    interval: str = "month"
    updated_at: int = 0

    @property
    def threshold_nano(self) -> int:
        return cents_to_nano(self.threshold_amount)

    @classmethod
    def build(cls, organization_id: str, data: Mapping[str, Any], now: int) -> SpendLimit:
        """From the SDK's update parameters, every field checked (a ValidationError names it)."""
        if not isinstance(data, Mapping):
            raise ValidationError("body", "must be an object")
        check_currency(data.get("currency"))
        check_interval(data.get("interval"))
        cents = check_cents(data.get("threshold_amount"))
        return cls(check_id("organization_id", organization_id), cents, updated_at=now)

    def to_record(self) -> dict[str, Any]:
        return {
            "threshold_amount": self.threshold_amount,
            "currency": self.currency,
            "interval": self.interval,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_record(cls, organization_id: str, data: Mapping[str, Any]) -> SpendLimit:
        return cls(
            organization_id,
            int(data["threshold_amount"]),
            data.get("currency", "USD"),
            data.get("interval", "month"),
            int(data.get("updated_at", 0)),
        )


def _recipients(value: object) -> tuple[str, ...]:
    field = "notification_channel.recipients"
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValidationError(field, "must be a non-empty list of email addresses")
    if len(value) > MAX_RECIPIENTS:
        raise ValidationError(field, f"must not list more than {MAX_RECIPIENTS} addresses")
    out = []
    for i, address in enumerate(value):
        text = check_string(f"{field}[{i}]", address)
        local, at, domain = text.partition("@")
        if (
            not at
            or not local
            or "." not in domain
            or any(c in text for c in " <>,;" + LINE_BREAKS)
        ):
            raise ValidationError(f"{field}[{i}]", f"{text[:80]!r} is not an email address")
        out.append(text)
    return tuple(out)


def _subject_prefix(value: object) -> str | None:
    if value is None:
        return None
    text = check_string("notification_channel.subject_prefix", value)
    if any(c in text for c in LINE_BREAKS) or len(text) > 200:
        raise ValidationError(
            "notification_channel.subject_prefix", "must be one line of at most 200 characters"
        )
    return text


@attrs.frozen
class NotificationChannel:
    """Where an alert is sent: email ``recipients``, with an optional subject prefix."""

    recipients: tuple[str, ...] = attrs.field(converter=_recipients)
    type: str = "email"
    subject_prefix: str | None = attrs.field(default=None, converter=_subject_prefix)

    @classmethod
    def build(cls, data: object) -> NotificationChannel:
        if not isinstance(data, Mapping):
            raise ValidationError("notification_channel", "must be an object")
        if data.get("type") != "email":
            raise ValidationError("notification_channel.type", "must be 'email'")
        return cls(data.get("recipients"), "email", data.get("subject_prefix"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipients": list(self.recipients),
            "type": self.type,
            "subject_prefix": self.subject_prefix,
        }


@attrs.frozen
class SpendAlert:
    """An alert at ``threshold_amount`` cents of month-to-date spend."""

    id: str
    organization_id: str
    threshold_amount: int
    notification_channel: NotificationChannel
    currency: str = "USD"
    interval: str = "month"
    created_at: int = 0

    @property
    def threshold_nano(self) -> int:
        return cents_to_nano(self.threshold_amount)

    @classmethod
    def build(
        cls, alert_id: str, organization_id: str, data: Mapping[str, Any], now: int
    ) -> SpendAlert:
        """From the SDK's create / update parameters, every field checked."""
        if not isinstance(data, Mapping):
            raise ValidationError("body", "must be an object")
        check_currency(data.get("currency"))
        check_interval(data.get("interval"))
        cents = check_cents(data.get("threshold_amount"))
        channel = NotificationChannel.build(data.get("notification_channel"))
        return cls(
            check_id("id", alert_id),
            check_id("organization_id", organization_id),
            cents,
            channel,
            created_at=now,
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "threshold_amount": self.threshold_amount,
            "currency": self.currency,
            "interval": self.interval,
            "notification_channel": self.notification_channel.to_dict(),
            "created_at": self.created_at,
        }

    @classmethod
    def from_record(
        cls, alert_id: str, organization_id: str, data: Mapping[str, Any]
    ) -> SpendAlert:
        channel = data["notification_channel"]
        return cls(
            alert_id,
            organization_id,
            int(data["threshold_amount"]),
            NotificationChannel(
                channel["recipients"], channel.get("type", "email"), channel.get("subject_prefix")
            ),
            data.get("currency", "USD"),
            data.get("interval", "month"),
            int(data.get("created_at", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        """The SDK's ``OrganizationSpendAlert``."""
        return {
            "object": "organization.spend_alert",
            "id": self.id,
            "currency": self.currency,
            "interval": self.interval,
            "threshold_amount": self.threshold_amount,
            "notification_channel": self.notification_channel.to_dict(),
        }


@attrs.frozen
class SpendState:
    """An organization's month-to-date spend as the limit sees it."""

    organization_id: str
    period_start: int
    period_end: int
    counted: Decimal
    """Month-to-date spend in the counters (recorded costs and decided costs, open
    reservations' estimates included), in dollars."""
    limit: SpendLimit | None

    @property
    def enforcing(self) -> bool:
        return self.limit is not None and to_nano(self.counted) >= self.limit.threshold_nano

    def to_dict(self) -> dict[str, Any]:
        """The SDK's ``OrganizationSpendLimit`` (needs a limit)."""
        assert self.limit is not None
        return {
            "object": "organization.spend_limit",
            "currency": self.limit.currency,
            "interval": self.limit.interval,
            "threshold_amount": self.limit.threshold_amount,
            "enforcement": {"status": "enforcing" if self.enforcing else "inactive"},
        }


# -- records ---------------------------------------------------------------------------------


def read_own_limit(store: Store, organization_id: str) -> SpendLimit | None:
    """The limit the organization set itself (its admin key, ``set_spend_limit``)."""
    data = store.get_record(LIMIT_RECORD, organization_id)
    return None if data is None else SpendLimit.from_record(organization_id, data)


def read_cap(store: Store, organization_id: str) -> SpendLimit | None:
    """The operator's cap (``set_spend_cap``)."""
    data = store.get_record(CAP_RECORD, organization_id)
    return None if data is None else SpendLimit.from_record(organization_id, data)


def read_limit(store: Store, organization_id: str) -> SpendLimit | None:
    """The limit in force: the lower of the organization's own limit and the operator's cap."""
    own, cap = read_own_limit(store, organization_id), read_cap(store, organization_id)
    if own is None or (cap is not None and cap.threshold_amount < own.threshold_amount):
        return cap
    return own


def list_alerts(store: Store, organization_id: str) -> list[SpendAlert]:
    """The organization's alerts, oldest first (then by id): the order lists page in."""
    alerts = [
        SpendAlert.from_record(key, organization_id, data)
        for key, data in store.list_records(alert_kind(organization_id))
    ]
    return sorted(alerts, key=lambda a: (a.created_at, a.id))


def read_spending(store: Store, organization_id: str) -> tuple[SpendLimit | None, list[SpendAlert]]:
    """The limit and the alerts, lowest threshold first (the order they are reached in)."""
    alerts = list_alerts(store, organization_id)
    alerts.sort(key=lambda a: (a.threshold_amount, a.id))
    return read_limit(store, organization_id), alerts


def get_alert(store: Store, organization_id: str, alert_id: str) -> SpendAlert | None:
    data = store.get_record(alert_kind(organization_id), alert_id)
    return None if data is None else SpendAlert.from_record(alert_id, organization_id, data)
