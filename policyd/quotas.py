"""Quota buckets: which counters a request counts against, in which window, and how much."""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime, timezone

from policyd import redis_keys
from policyd.counters import BucketHold
from policyd.money import ceil_div
from policyd.policy import Limit
from policyd.pricing import Quantities

WINDOW_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
BUCKET_TTL_MARGIN_SECONDS = 3600
LIMIT_REASONS = {"money": "budget_exceeded", "tokens": "rate_limit_exceeded", "requests": "rate_limit_exceeded"}


@dataclass(frozen=True)
class Window:
    start: int  # unix seconds (0 for "total")
    end: int  # unix seconds (0 for "total": never)


def window_of(window: str, now_s: int) -> Window:
    if window == "total":
        return Window(0, 0)
    if window == "month":
        moment = datetime.fromtimestamp(now_s, tz=timezone.utc)
        start = calendar.timegm((moment.year, moment.month, 1, 0, 0, 0))
        days = calendar.monthrange(moment.year, moment.month)[1]
        return Window(start, start + days * 86400)
    length = WINDOW_SECONDS[window]
    start = now_s - now_s % length
    return Window(start, start + length)


def _escape(scope_id: str) -> str:
    return scope_id.replace("%", "%25").replace(":", "%3A")


def amount_for(unit: str, charge: int, q: Quantities) -> int:
    if unit == "money":
        return charge
    if unit == "tokens":
        return q.tokens
    return 1


def limit_reason(limit: Limit) -> str:
    return LIMIT_REASONS[limit.unit]


def hold_for(limit: Limit, partition: int, scope_id: str, now_s: int, charge: int, q: Quantities) -> tuple[BucketHold, Window]:
    window = window_of(limit.window, now_s)
    key = redis_keys.bucket(partition, limit.scope, _escape(scope_id), limit.unit, limit.window, window.start)
    ttl = 0 if window.end == 0 else window.end - now_s + BUCKET_TTL_MARGIN_SECONDS
    thresholds = tuple((pct, ceil_div(limit.limit * pct, 100)) for pct in limit.thresholds)
    hold = BucketHold(
        key=key,
        label=limit.label,
        unit=limit.unit,
        amount=amount_for(limit.unit, charge, q),
        limit=limit.limit,
        mode="shadow" if limit.action == "shadow" else "block",
        ttl_seconds=ttl,
        thresholds=thresholds,
    )
    return hold, window


def remaining_ttl(bucket_key: str, now_s: int) -> int | None:
    """Seconds a bucket key should live from now, 0 for "total", None once its window has passed."""
    _, window, start = bucket_key.rsplit(":", 2)
    if window == "total":
        return 0
    end = window_of(window, int(start)).end
    if end <= now_s:
        return None
    return end - now_s + BUCKET_TTL_MARGIN_SECONDS
