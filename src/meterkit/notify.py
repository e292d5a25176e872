"""Delivering spend alerts: email over SMTP and signed webhooks, off the request path.

A spend alert that fires (:mod:`meterkit.spend`) becomes an :class:`AlertNotice`, queued in
the meter's :class:`Outbox`; one background thread hands it to every notifier configured
(``Meter(notifiers=[...])`` or the ``[notify.email]`` / ``[notify.webhook]`` tables of the
configuration file). A failing notifier is logged and does not stop the others.

- :class:`EmailNotifier` sends one message to the alert's recipients through a configured
  SMTP server (``smtplib``; STARTTLS, implicit TLS and login are optional).
- :class:`WebhookNotifier` POSTs the notice as JSON, signed with HMAC-SHA256 over
  ``"{timestamp}.{body}"`` in the ``Meterkit-Signature: t=<timestamp>,v1=<hex>`` header
  (:func:`verify_signature` checks it on the receiving side). A connection error, a 429 or a
  5xx is retried with exponential backoff; other answers are final.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import queue
import smtplib
import socket
import ssl
import threading
import time as _time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from email.message import EmailMessage
from typing import Any, Protocol

import attrs

from meterkit.errors import ValidationError
from meterkit.spend import SpendAlert, nano_to_usd

__all__ = [
    "RECORD",
    "AlertNotice",
    "DeliveryFailed",
    "EmailNotifier",
    "Notifier",
    "Outbox",
    "WebhookNotifier",
    "notifiers_from_config",
    "private_address",
    "sign",
    "verify_signature",
]

logger = logging.getLogger("meterkit")

SIGNATURE_HEADER = "Meterkit-Signature"


class DeliveryFailed(Exception):
    """A notifier gave up on a notice (after its retries, for webhooks)."""


@attrs.frozen
class AlertNotice:
    """A spend alert that fired: the alert, the month's counted spend and when it fired."""

    alert: SpendAlert
    spent_nano: int
    period_start: int
    fired_at: int

    @property
    def organization_id(self) -> str:
        return self.alert.organization_id

    @property
    def spent(self) -> Decimal:
        """Month-to-date spend in dollars when the alert fired."""
        return nano_to_usd(self.spent_nano)

    @property
    def threshold(self) -> Decimal:
        return Decimal(self.alert.threshold_amount).scaleb(-2)

    def to_dict(self) -> dict[str, Any]:
        """The webhook body (amounts in dollars as decimal strings: exact)."""
        return {
            "object": "organization.spend_alert.fired",
            "organization_id": self.organization_id,
            "alert": self.alert.to_dict(),
            "spent": str(self.spent),
            "threshold": f"{self.threshold:.2f}",
            "currency": self.alert.currency,
            "period_start": self.period_start,
            "fired_at": self.fired_at,
        }

    def to_record(self) -> dict[str, Any]:
        return {
            "alert": {"id": self.alert.id, **self.alert.to_record()},
            "organization_id": self.alert.organization_id,
            "spent_nano": self.spent_nano,
            "period_start": self.period_start,
            "fired_at": self.fired_at,
        }

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> AlertNotice:
        alert = dict(data["alert"])
        alert_id = alert.pop("id")
        return cls(
            SpendAlert.from_record(alert_id, data["organization_id"], alert),
            int(data["spent_nano"]),
            int(data["period_start"]),
            int(data["fired_at"]),
        )

    def subject(self) -> str:
        prefix = self.alert.notification_channel.subject_prefix
        text = (
            f"Spend alert: {self.organization_id} reached ${self.threshold:.2f} "
            f"this month (${self.spent:.2f} so far)"
        )
        return f"{prefix} {text}" if prefix else text


def _dollars(amount: Decimal) -> str:
    """Cents at least (``0.50``), every digit beyond them kept (``5.0312``)."""
    cents = amount.quantize(Decimal("0.01"))
    return str(cents if cents == amount else amount.normalize())


class Notifier(Protocol):
    """Delivers a notice, or raises (the outbox logs it)."""

    def deliver(self, notice: AlertNotice) -> None: ...


@attrs.frozen
class EmailNotifier:
    """Email to the alert's recipients through the SMTP server at ``host``:``port``."""

    host: str
    sender: str
    port: int = 25
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    starttls: bool = False
    tls: bool = False  # implicit TLS (port 465)
    timeout: float = 10.0

    def message(self, notice: AlertNotice) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.sender
        msg["To"] = ", ".join(notice.alert.notification_channel.recipients)
        msg["Subject"] = notice.subject()
        msg.set_content(
            f"Organization {notice.organization_id} has spent ${_dollars(notice.spent)} "
            f"{notice.alert.currency} this month, reaching the alert at "
            f"${notice.threshold:.2f} (alert {notice.alert.id}).\n"
        )
        return msg

    def deliver(self, notice: AlertNotice) -> None:
        msg = self.message(notice)
        context = ssl.create_default_context()
        smtp: smtplib.SMTP
        if self.tls:
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=context)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        with smtp:
            if self.starttls:
                smtp.starttls(context=context)
            if self.username is not None:
                smtp.login(self.username, self.password or "")
            smtp.send_message(msg)


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The ``Meterkit-Signature`` header value of ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def verify_signature(
    secret: str | Sequence[str], header: str, body: bytes, *, now: int, tolerance: int = 300
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` — or, during a rotation, with any of
    several secrets — and is at most ``tolerance`` s old."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    given = parts.get("v1", "")
    secrets = [secret] if isinstance(secret, str) else list(secret)
    # Every secret compared, in constant time each: which one matched is not told by timing.
    matched = False
    for one in secrets:
        expected = sign(one, timestamp, body).split("v1=", 1)[1]
        matched |= hmac.compare_digest(expected, given)
    return matched


def private_address(host: str) -> str | None:
    """The first address ``host`` is or resolves to that is loopback, link-local, private,
    reserved, multicast or unspecified, or ``None``: a webhook must not reach into the
    network the server runs in unless the operator allows it."""
    try:
        found = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError:
            return None  # unresolvable: the delivery fails on its own
        found = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    for ip in found:
        if (
            ip.is_loopback
            or ip.is_link_local
            or ip.is_private
            or ip.is_reserved
            or ip.is_multicast
            or ip.is_unspecified
        ):
            return str(ip)
    return None


@attrs.frozen
class WebhookNotifier:
    """A signed JSON POST to ``url``, retried ``retries`` times with doubling ``backoff``.

    A ``url`` on a loopback, link-local or private address (or a name resolving to one, checked
    at every delivery) is refused unless ``allow_private`` — a receiver on the server's own
    network is the operator's choice, not a default."""

    url: str
    secret: str = attrs.field(repr=False)
    retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    timeout: float = 10.0
    clock: Callable[[], float] = attrs.field(default=_time.time, repr=False)
    sleep: Callable[[float], None] = attrs.field(default=_time.sleep, repr=False)
    allow_private: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValidationError("url", "must be an http:// or https:// URL")
        if not self.secret:
            raise ValidationError("secret", "must not be empty (it signs every delivery)")
        host = urllib.parse.urlsplit(self.url).hostname or ""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return
        if not self.allow_private and private_address(str(literal)) is not None:
            raise ValidationError(
                "url", f"{host} is a private address (WebhookNotifier(allow_private=True))"
            )

    def deliver(self, notice: AlertNotice) -> None:
        if not self.allow_private:
            host = urllib.parse.urlsplit(self.url).hostname or ""
            found = private_address(host)
            if found is not None:
                raise DeliveryFailed(
                    f"{self.url} resolves to the private address {found}; not sent "
                    "(WebhookNotifier(allow_private=True) allows it)"
                )
        body = json.dumps(notice.to_dict(), sort_keys=True).encode()
        wait = self.backoff
        for attempt in range(self.retries + 1):
            # Signed at each attempt: a receiver's freshness check applies to the retry too.
            request = urllib.request.Request(
                self.url,
                data=body,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(self.secret, int(self.clock()), body),
                    "Meterkit-Delivery-Attempt": str(attempt + 1),
                },
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    raise DeliveryFailed(f"{self.url} answered {exc.code}") from None
                reason = f"HTTP {exc.code}"
            except (urllib.error.URLError, OSError) as exc:
                reason = str(exc)
            if attempt == self.retries:
                raise DeliveryFailed(f"{self.url}: {reason} after {attempt + 1} attempts")
            self.sleep(wait)
            wait = min(self.max_backoff, wait * 2)


RECORD = "outbox"
"""Store records of this kind hold the notices not delivered to every notifier yet."""


class Outbox:
    """Notices on their way to the notifiers: kept in the store until every notifier took them.

    A fired alert's notice is written to the store (a record of the kind :data:`RECORD`)
    before it is queued, and deleted once every notifier delivered it. A notifier that fails
    is tried again ``retry_after`` seconds later (doubling each time, ``max_attempts`` in
    all), the ones that succeeded are not asked again. Every process with notifiers sweeps
    the store every ``sweep_interval`` seconds for notices due — its own retries, and those of
    a process that died before delivering — and claims each attempt for ``lease`` seconds
    (the store's ``claim_once``), so a notice is delivered at least once and, unless a
    process dies between delivering and recording it, once.
    """

    def __init__(
        self,
        notifiers: Sequence[Notifier] = (),
        *,
        store: Any,
        counters: Any = None,
        clock: Callable[[], int] = lambda: int(_time.time()),
        retry_after: float = 60.0,
        max_attempts: int = 10,
        sweep_interval: float = 30.0,
        lease: int = 300,
    ) -> None:
        self.notifiers = tuple(notifiers)
        self.store = store
        self.counters = counters if counters is not None else store
        self.clock = clock
        self.retry_after = retry_after
        self.max_attempts = max_attempts
        self.sweep_interval = sweep_interval
        self.lease = lease
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._busy = 0  # attempts under way, by either the queue or a sweep
        self.delivered: list[tuple[str, AlertNotice]] = []
        self.failed: list[tuple[str, AlertNotice, str]] = []

    @staticmethod
    def key(notice: AlertNotice) -> str:
        alert = notice.alert
        return f"{alert.organization_id}:{alert.id}:{alert.threshold_amount}:{notice.period_start}"

    def start(self) -> None:
        """Start delivering (and sweeping the store for notices due), when there are notifiers."""
        if not self.notifiers or self._closed:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="meterkit-notify", daemon=True
                )
                self._thread.start()

    def submit(self, notice: AlertNotice) -> None:
        """Keep ``notice`` until every notifier delivered it, and queue it now."""
        if not self.notifiers:
            return
        key = self.key(notice)
        self._put(key, {"notice": notice.to_record(), "delivered": [], "attempts": 0, "due": 0})
        self._queue.put(key)
        self.start()

    def _put(self, key: str, data: dict[str, Any]) -> None:
        self.store.put_record(RECORD, key, data)

    def _get(self, key: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.store.get_record(RECORD, key)
        return found

    def _delete(self, key: str) -> None:
        self.store.delete_record(RECORD, key)

    def pending(self) -> list[str]:
        """The keys of the notices not delivered to every notifier yet."""
        return sorted(key for key, _ in self.store.list_records(RECORD))

    def _run(self) -> None:
        self._sweep()
        while True:
            try:
                key = self._queue.get(timeout=self.sweep_interval)
            except queue.Empty:
                self._sweep()
                continue
            try:
                if key is None:
                    return
                self._attempt(key)
            except Exception:
                logger.warning("meterkit: delivering spend alert %s failed", key, exc_info=True)
            finally:
                self._queue.task_done()

    def _sweep(self) -> None:
        try:
            for key in self.pending():
                self._attempt(key)
        except Exception:
            logger.warning("meterkit: sweeping the spend alert outbox failed", exc_info=True)

    def _attempt(self, key: str) -> None:
        with self._lock:
            self._busy += 1
        try:
            self._try(key)
        finally:
            with self._lock:
                self._busy -= 1

    def _try(self, key: str) -> None:
        data = self._get(key)
        now = self.clock()
        if data is None or data.get("due", 0) > now:
            return
        attempts = int(data.get("attempts", 0))
        if self.counters is not None and not self.counters.claim_once(
            f"ob\x1f{key}\x1f{attempts}", now=now, expires_at=now + self.lease
        ):
            return  # another process has this attempt
        notice = AlertNotice.from_record(data["notice"])
        done = set(data.get("delivered", ()))
        for notifier in self.notifiers:
            name = type(notifier).__name__
            if name in done:
                continue
            try:
                notifier.deliver(notice)
            except Exception as exc:
                logger.warning(
                    "meterkit: spend alert %s not delivered by %s: %s", notice.alert.id, name, exc
                )
                self.failed.append((name, notice, str(exc)))
            else:
                done.add(name)
                self.delivered.append((name, notice))
        if all(type(n).__name__ in done for n in self.notifiers):
            self._delete(key)
            return
        attempts += 1
        if attempts >= self.max_attempts:
            logger.error(
                "meterkit: spend alert %s given up after %d attempts", notice.alert.id, attempts
            )
            self._delete(key)
            return
        due = now + int(self.retry_after * 2 ** (attempts - 1))
        self._put(key, {**data, "delivered": sorted(done), "attempts": attempts, "due": due})

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every queued notice was tried once by every notifier (and no sweep is
        under way); ``False`` on timeout."""
        deadline = _time.monotonic() + timeout
        while self._queue.unfinished_tasks or self._busy:
            if _time.monotonic() >= deadline:
                return False
            _time.sleep(0.01)
        return True

    def sweep(self) -> None:
        """Try every notice due now, in this thread (what the background sweep does)."""
        self._sweep()

    def close(self, timeout: float = 5.0) -> None:
        self._closed = True
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self.drain(timeout)
            self._queue.put(None)
            thread.join(timeout)


def notifiers_from_config(table: Mapping[str, Any]) -> list[Notifier]:
    """Notifiers from the ``[notify]`` table: ``email`` and ``webhook`` sub-tables."""
    out: list[Notifier] = []
    unknown = set(table) - {"email", "webhook"}
    if unknown:
        raise ValidationError(f"notify.{sorted(unknown)[0]}", "is not a notifier (email, webhook)")
    email = table.get("email")
    if email is not None:
        out.append(_build("notify.email", EmailNotifier, email, {"host", "sender"}))
    webhook = table.get("webhook")
    if webhook is not None:
        out.append(_build("notify.webhook", WebhookNotifier, webhook, {"url", "secret"}))
    return out


def _build(field: str, cls: Any, data: object, required: set[str]) -> Any:
    if not isinstance(data, Mapping):
        raise ValidationError(field, "must be a table")
    allowed = {a.name for a in attrs.fields(cls)} - {"clock", "sleep"}
    for key in data:
        if key not in allowed:
            raise ValidationError(f"{field}.{key}", f"is not a setting; known: {sorted(allowed)}")
    for key in sorted(required - set(data)):
        raise ValidationError(f"{field}.{key}", "is required")
    for attribute in attrs.fields(cls):
        if attribute.name not in data:
            continue
        value = data[attribute.name]
        kinds: dict[str, type | tuple[type, ...]] = {
            "int": int,
            "float": (int, float),
            "bool": bool,
        }
        kind = kinds.get(str(attribute.type).replace("str | None", "str"), str)
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
            raise ValidationError(f"{field}.{attribute.name}", f"must be a {attribute.type}")
    try:
        return cls(**data)
    except ValidationError as exc:
        raise ValidationError(f"{field}.{exc.field}", exc.message) from None
