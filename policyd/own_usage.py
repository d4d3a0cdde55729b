"""What a customer may see of its own usage, summed (GET /v1/usage, SummarizeUsage): its requests and what they
were charged over a window, grouped as it asks (by model, feature, thread, key, ...; by hour, day or month), from
its usage records. What its requests cost the operator, and the provider accounts that served them, are never in
it: a customer's figures are its charges, tokens and counts.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from policyd.policy import TAG_NAME_PATTERN, TAG_SCOPE_PREFIX

if TYPE_CHECKING:  # the HTTP API reads this module's bounds without loading SQL's
    from policyd.store import Store

# the dimensions a customer may group by: its own (its customer, the operator's routes and providers are not), and
# the values of one of its requests' tags ("tag:product")
TAG_DIMENSION = re.compile(rf"^{TAG_SCOPE_PREFIX}{TAG_NAME_PATTERN}$")
DIMENSIONS = ("workspace", "project", "team", "key", "environment", "feature", "thread", "end_user", "model",
              "requested_model", "decision", "status", "reason")
BUCKETS = ("hour", "day", "month")
# the figures a customer sees: counts and tokens, its charges (never the operator's cost, nor its fallbacks)
COUNTS = ("requests", "allowed", "denied", "downgraded", "failed", "retries", "input_tokens", "cached_input_tokens",
          "output_tokens")
MONEY = ("charge_nanos", "refunded_nanos")
OPERATORS = ("cost_nanos", "fallbacks")  # what its requests cost the operator, and its providers' fallbacks
GROUP_BY_MAX = 3
WINDOW_MS_DEFAULT = 30 * 86_400_000  # the window summed unless told: the last 30 days
WINDOW_MS_MAX = 400 * 86_400_000
ROWS_MAX = 1000  # the groups one answer holds (the largest charges first within a bucket); past it: truncated


@dataclass(frozen=True)
class UsageRow:
    group: dict[str, str]
    bucket: str  # "" when not bucketed; else the hour, day or month (2026-12-06, 2026-12-06T14:00Z, 2026-12; an hour of
    # a policy's time zone with its offset, 2026-12-06T09:00-05:00)
    counts: dict[str, int]
    charge: int  # nanos of the policy's currency
    refunded: int
    usage: dict[str, int]  # every other figure it was billed by that is not zero


async def summary(store: Store, customer_id: str, group_by: list[str], since_ms: int, until_ms: int,
                  bucket: str = "", zone_name: str = "") -> tuple[list[UsageRow], bool]:
    """The customer's usage over [since_ms, until_ms), grouped; and whether more groups were left out
    (ROWS_MAX). `group_by`, `bucket`, the window: checked by the caller (http_api, the servicer). Buckets are the
    hours, days and months of `zone_name` (the policy's time zone, whose days its limits count: "" for UTC)."""
    from policyd import reports

    def run() -> list[reports.ReportRow]:
        with store.session() as session:
            return reports.usage_report(session, group_by, since_ms, until_ms, bucket, customer_id,
                                        zone_name=zone_name)

    rows = await asyncio.to_thread(run)
    shown_apart = (*COUNTS, *MONEY, *OPERATORS)
    return [UsageRow(dict(r.group), r.bucket, {name: r.figures[name] for name in COUNTS}, r.figures["charge_nanos"],
                     r.figures["refunded_nanos"], {n: v for n, v in r.figures.items() if v and n not in shown_apart})
            for r in rows[:ROWS_MAX]], len(rows) > ROWS_MAX


def window(since_ms: int | None, until_ms: int | None) -> tuple[int, int]:
    """The window summed, [since, until) in unix ms: until now (the end of the current second, its requests in)
    unless told, since WINDOW_MS_DEFAULT before until unless told."""
    until = (int(time.time()) + 1) * 1000 if until_ms is None else until_ms
    return (max(until - WINDOW_MS_DEFAULT, 0) if since_ms is None else since_ms), until


def problem(group_by: list[str], since_ms: int, until_ms: int, bucket: str, zone_name: str = ""
            ) -> tuple[str, str] | None:
    """What is wrong with a summary asked for (its message, and the parameter), None when nothing is."""
    unknown = [d for d in group_by if d not in DIMENSIONS and not TAG_DIMENSION.match(d)]
    if unknown or len(group_by) > GROUP_BY_MAX or len(set(group_by)) < len(group_by):
        return (f"group_by is up to {GROUP_BY_MAX} of {', '.join(DIMENSIONS)}, tag:<name>, each once", "group_by")
    if bucket and bucket not in BUCKETS:
        return (f"bucket is one of {', '.join(BUCKETS)}", "bucket")
    if not 0 <= since_ms < until_ms or until_ms - since_ms > WINDOW_MS_MAX:
        return (f"since must be before until, at most {WINDOW_MS_MAX // 86_400_000} days apart", "since")
    if zone_name and zone_name != "UTC":
        try:
            ZoneInfo(zone_name)
        except (ValueError, KeyError):  # ZoneInfoNotFoundError is a KeyError
            return (f"timezone is an IANA time zone such as Europe/Paris, not {zone_name[:64]!r}", "timezone")
    return None
