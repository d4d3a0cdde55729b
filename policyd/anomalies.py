"""Anomalies: spend that runs away from its usual rate, and threads that loop.

Every `window` (default 10 minutes) the detector compares, per key, the charge of the window just
ended with the key's usual charge per window over the day before; `factor` times the usual (and
at least `spend_min`) is an anomaly. A thread with `thread_requests` requests or more in the window
is a loop. Each becomes an alert event with an id made of what it is and its window, so several
replicas detecting the same thing record it once, and the webhooks deliver it once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import func, select

from policyd.db import EventRow, UsageRecordRow
from policyd.loops import every
from policyd.store import Store

log = logging.getLogger("policyd.anomalies")

HISTORY_MS = 86_400_000


class AnomalyDetector:
    def __init__(self, store: Store, window_ms: int = 600_000, factor: int = 5, spend_min_nanos: int = 100_000_000,
                 thread_requests: int = 50, clock=lambda: int(time.time() * 1000)) -> None:
        self.store = store
        self.window_ms = window_ms
        self.factor = factor
        self.spend_min = spend_min_nanos
        self.thread_requests = thread_requests
        self.clock = clock

    def detect(self) -> int:
        """Look at the window that just ended; the number of new anomalies recorded."""
        now = self.clock()
        end = now - now % self.window_ms
        start = end - self.window_ms
        r = UsageRecordRow
        events = []
        with self.store.session() as session, session.begin():
            recent = dict(session.execute(
                select(r.api_key_id, func.sum(r.charge_nanos)).where(
                    r.created_ms >= start, r.created_ms < end, r.status.in_(("settled", "settled_late")),
                    r.api_key_id != "").group_by(r.api_key_id)).all())
            if recent:
                history = dict(session.execute(
                    select(r.api_key_id, func.sum(r.charge_nanos)).where(
                        r.created_ms >= start - HISTORY_MS, r.created_ms < start,
                        r.status.in_(("settled", "settled_late")), r.api_key_id.in_(list(recent)))
                    .group_by(r.api_key_id)).all())
                windows = HISTORY_MS // self.window_ms
                for key_id, spend in recent.items():
                    spend = int(spend or 0)
                    usual = -(-int(history.get(key_id) or 0) // windows)
                    if spend >= self.spend_min and spend >= self.factor * max(usual, 1):
                        events.append(self._event("spend_spike", key_id, start, end, {
                            "api_key_id": key_id, "spend_nanos": spend, "usual_nanos": usual}))
            loops = session.execute(
                select(r.thread_id, r.customer_id, r.api_key_id, func.count()).where(
                    r.created_ms >= start, r.created_ms < end, r.thread_id != "")
                .group_by(r.thread_id, r.customer_id, r.api_key_id)
                .having(func.count() >= self.thread_requests)).all()
            for thread_id, customer_id, key_id, count in loops:
                events.append(self._event("thread_loop", f"{customer_id}:{thread_id}", start, end, {
                    "customer_id": customer_id, "thread_id": thread_id, "api_key_id": key_id, "requests": int(count)}))
            if events:
                self.store.insert_ignore(session, EventRow, events)
        return len(events)

    @staticmethod
    def _event(kind: str, subject: str, start: int, end: int, detail: dict) -> dict:
        import hashlib

        digest = hashlib.sha256(f"{kind}|{subject}|{start}".encode()).hexdigest()[:40]
        return {"id": f"anomaly-{digest}", "kind": "alert", "request_id": "",
                "customer_id": str(detail.get("customer_id", "")), "created_ms": end,
                "detail": {"anomaly": kind, "window_start_ms": start, "window_end_ms": end, **detail,
                           "label": kind, "percent": ""}}

    async def run(self, stop: asyncio.Event) -> None:
        async def look() -> None:
            found = await asyncio.to_thread(self.detect)
            if found:
                log.warning("%d anomalies recorded", found)

        await every(min(self.window_ms / 1000, 60), stop, look, "anomaly detection")
