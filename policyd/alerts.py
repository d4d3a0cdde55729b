"""Alert delivery to webhooks: at least once, signed, retried with backoff, deduplicated by id.

Alerts are event rows (kind "alert": a soft threshold crossed, once per crossing per window, and the first
request a limit refused in its window, at percent 100 with `reached`; decided atomically in the authorize
script, each naming whose request it was). For every alert and every configured URL a delivery row is made;
due deliveries are POSTed as JSON

    {"id": "<event id>", "kind": "alert", "created_ms": ..., "customer_id": ..., "api_key_id": ..., "label":
     "premium-day", "percent": "80", "used": "...", "limit": "...", "bucket": "...", "request_id": "..."}

with `x-policyd-event-id` (receivers deduplicate on it) and `x-policyd-signature:
sha256=<hex HMAC-SHA256 of the body with POLICYD_WEBHOOK_SECRET>`. A failed attempt is retried
after 1 s, 2 s, 4 s ... up to RETRY_DELAY_MAX_MS, for as long as it takes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any

from sqlalchemy import select

from policyd.db import AlertDeliveryRow, EventRow
from policyd.loops import every
from policyd.store import Store

log = logging.getLogger("policyd.alerts")

RETRY_DELAY_MIN_MS = 1_000
RETRY_DELAY_MAX_MS = 300_000
DELIVERY_TIMEOUT_SECONDS = 5
BATCH = 100


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(event: EventRow) -> bytes:
    return json.dumps({"id": event.id, "kind": event.kind, "created_ms": event.created_ms,
                       "customer_id": event.customer_id, "request_id": event.request_id, **event.detail},
                      sort_keys=True, separators=(",", ":")).encode()


def _post(url: str, body: bytes, headers: dict[str, str]) -> str:
    """'' when delivered (2xx), else the error."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=DELIVERY_TIMEOUT_SECONDS) as reply:
            return "" if 200 <= reply.status < 300 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return type(error).__name__


class AlertDelivery:
    def __init__(self, store: Store, urls: list[str], secret: str, clock=lambda: int(time.time() * 1000)) -> None:
        self.store = store
        self.urls = urls
        self.secret = secret
        self.clock = clock

    def _schedule(self) -> None:
        """A delivery row for every alert and URL that has none."""
        with self.store.session() as session, session.begin():
            for url in self.urls:
                known = select(AlertDeliveryRow.event_id).where(AlertDeliveryRow.url == url)
                new = session.scalars(select(EventRow.id).where(EventRow.kind == "alert", EventRow.id.not_in(known))
                                      .order_by(EventRow.created_ms).limit(BATCH * 10)).all()
                self.store.insert_ignore(session, AlertDeliveryRow, [
                    {"event_id": e, "url": url, "attempts": 0, "next_attempt_ms": 0, "delivered_ms": 0,
                     "last_error": ""} for e in new])

    def deliver_due(self) -> int:
        """Attempt every due delivery once; the number delivered."""
        if not self.urls:
            return 0
        self._schedule()
        now = self.clock()
        delivered = 0
        with self.store.session() as session:
            due = session.execute(
                select(AlertDeliveryRow, EventRow).join(EventRow, EventRow.id == AlertDeliveryRow.event_id)
                .where(AlertDeliveryRow.delivered_ms == 0, AlertDeliveryRow.next_attempt_ms <= now)
                .order_by(AlertDeliveryRow.next_attempt_ms).limit(BATCH)).all()
            for delivery, event in due:
                body = payload(event)
                error = _post(delivery.url, body, {"x-policyd-event-id": event.id,
                                                   "x-policyd-signature": sign(self.secret, body)})
                delivery.attempts += 1
                if error:
                    delay = min(RETRY_DELAY_MIN_MS * 2 ** (delivery.attempts - 1), RETRY_DELAY_MAX_MS)
                    delivery.next_attempt_ms = now + delay
                    delivery.last_error = error
                    log.warning("alert %s to %s failed (%s); attempt %d, next in %d ms", event.id,
                                delivery.url.split("?")[0], error, delivery.attempts, delay)
                else:
                    delivery.delivered_ms = self.clock()
                    delivery.last_error = ""
                    delivered += 1
                session.commit()
        return delivered

    async def run(self, stop: asyncio.Event, interval_ms: int) -> None:
        await every(interval_ms / 1000, stop, lambda: asyncio.to_thread(self.deliver_due), "alert delivery")


def deliveries(store: Store) -> list[Any]:
    with store.session() as session:
        return list(session.scalars(select(AlertDeliveryRow).order_by(AlertDeliveryRow.event_id)))
