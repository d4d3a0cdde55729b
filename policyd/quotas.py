"""Quota buckets: which counters a request counts against, in which window, and how much."""

from __future__ import annotations

import calendar
import functools
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from policyd import redis_keys
from policyd.counters import BucketHold
from policyd.money import ceil_div
from policyd.policy import TAG_SCOPE_PREFIX, Cap, Limit, time_zone
from policyd.pricing import Quantities

if TYPE_CHECKING:
    from policyd.counters import Counters

WINDOW_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}
BUCKET_TTL_MARGIN_SECONDS = 3600
# a caller's budget of its thread (an agent's run) is kept this long after the thread's last request, then
# forgotten (a run taken up again after that starts its budget anew): each thread would otherwise keep its
# counter for good, and an agent platform makes millions of runs
THREAD_BUDGET_IDLE_SECONDS = 30 * 86400
_THREAD_BUDGET_BUCKET = ":b:thread_budget:"
LIMIT_REASONS = {"money": "budget_exceeded", "cost": "budget_exceeded", "tokens": "rate_limit_exceeded",
                 "requests": "rate_limit_exceeded"}


@dataclass(frozen=True)
class Window:
    start: int  # unix seconds (0 for "total")
    end: int  # unix seconds (0 for "total": never)


def scope_ids(customer_id: str, key_id: str, workspace_id: str = "", project_id: str = "", team_id: str = "",
              feature: str = "", model: str = "", thread_id: str = "", end_user_id: str = "",
              tags: Mapping[str, str] | None = None) -> dict[str, str]:
    """The bucket each limit scope counts a request in. Keys and customers are unique; every other scope
    is named within its customer, so two customers' "default" workspaces, threads "t1" or end users
    "alice" never share a bucket (they would whenever both customers hash to one partition). An empty
    id: the request has none of that scope, and the limit does not bind it. A request's tags are given as
    they are ("tag:<name>" -> value): a limit of scope tag names its bucket from one (limit_scope_id)."""
    def within(name: str) -> str:
        return f"{customer_id}/{name}" if name else ""

    ids = {"key": key_id, "customer": customer_id, "workspace": within(workspace_id), "project": within(project_id),
           "team": within(team_id), "feature": within(feature), "model": within(model),
           "thread": within(thread_id), "end_user": within(end_user_id),
           "thread_budget": within(thread_id)}  # a caller's budget of its thread (key_limits.with_thread_budget)
    for name, value in (tags or {}).items():
        ids[TAG_SCOPE_PREFIX + name] = value
    return ids


def limit_scope_id(limit: Limit, ids: Mapping[str, str]) -> str:
    """The id of the bucket a limit counts a request in, of its scope_ids; "" when the limit does not bind it (it
    has none of the scope; a limit of scope tag: not that tag, or a value it does not list). A tag's bucket is its
    value's within the customer: "<customer>/<tag>=<value>"."""
    if limit.scope != "tag":
        return ids.get(limit.scope, "")
    value = ids.get(limit.scope_key, "")
    if not value or (limit.tag_values and value not in limit.tag_values):
        return ""
    return f"{ids['customer']}/{limit.tag}={value}"


def tag_of_bucket(bucket_id: str) -> tuple[str, str]:
    """The tag and value a tag limit's bucket counts (the id of its bucket key, as limit_scope_id named it)."""
    named = unescape(bucket_id.split(":m=", 1)[0]).partition("/")[2]
    tag, _, value = named.partition("=")
    return tag, value


async def bucket_states(counters: "Counters", limits: tuple[Limit, ...], ids: dict[str, str], at_ms: int
                        ) -> list[dict[str, Any]]:
    """The current window of each limit that binds a key's every request (its key, customer, workspace,
    project and team buckets, `ids` from scope_ids), and an end user's where `ids` names one: used so far, and
    when the window ends (unix s, 0 for total). Per-thread, per-feature and per-model buckets are many, one a
    request: left out."""
    partition = counters.partition_of(ids["customer"])
    states: list[dict[str, Any]] = []
    for limit in limits:
        scope_id = limit_scope_id(limit, ids)
        if not scope_id:
            continue
        hold, window = hold_for(limit, partition, scope_id, at_ms // 1000, 0, Quantities())
        states.append({"limit": limit, "used": int(await counters.client.hget(hold.key, "used") or 0),
                       "ends": window.end})
    return states


def window_spec(limit: Limit) -> str:
    """The window as bucket keys name it: "day", or "day@Europe/Paris" for a day of another time zone."""
    return f"{limit.window}@{limit.timezone}" if limit.timezone else limit.window


def _local_midnight(day: date, zone: ZoneInfo) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=zone).timestamp())


def window_of(window: str, now_s: int) -> Window:
    """The window holding `now_s`. Days and months are UTC's, or a time zone's (`day@<zone>`): from
    local midnight to local midnight, 23 or 25 hours on the days clocks change."""
    window, _, zone_name = window.partition("@")
    if window == "total":
        return Window(0, 0)
    if zone_name and window in ("day", "month"):
        zone = time_zone(zone_name)
        today = datetime.fromtimestamp(now_s, tz=zone).date()
        if window == "day":
            first, following = today, today + timedelta(days=1)
        else:
            first = today.replace(day=1)
            following = (first + timedelta(days=32)).replace(day=1)
        return Window(_local_midnight(first, zone), _local_midnight(following, zone))
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


def unescape(bucket_id: str) -> str:
    """A scope id as it was before a bucket key escaped it."""
    return bucket_id.replace("%3A", ":").replace("%25", "%")


def amount_for(unit: str, charge: int, cost: int, q: Quantities) -> int:
    """What a request counts in a bucket of this unit: its charge, its provider cost, its tokens, or 1."""
    if unit == "money":
        return charge
    if unit == "cost":
        return cost
    if unit == "tokens":
        return q.tokens
    return 1


def limit_reason(limit: Limit) -> str:
    return LIMIT_REASONS[limit.unit]


def hold_for(limit: Limit, partition: int, scope_id: str, now_s: int, charge: int, q: Quantities,
             cost: int = 0) -> tuple[BucketHold, Window]:
    """The hold of a request in its bucket of a plan's (or a key's own) limit, in its customer's partition."""
    spec = window_spec(limit)
    window = window_of(spec, now_s)
    bucket_id = _escape(scope_id)
    if limit.models:  # counted apart from the scope's limits on every model (no escaped id holds a ':')
        bucket_id += f":m={models_tag(limit.models)}"
    key = redis_keys.bucket(partition, limit.scope, bucket_id, limit.unit, spec, window.start)
    return _hold(limit, key, window, now_s, amount_for(limit.unit, charge, cost, q)), window


@functools.lru_cache(maxsize=4096)
def models_tag(models: tuple[str, ...]) -> str:
    """The bucket of a limit on some models, named by what they are, in whichever order given."""
    return hashlib.sha256("\n".join(sorted(set(models))).encode()).hexdigest()[:16]


def cap_hold(cap: Cap, now_s: int, charge: int, cost: int, q: Quantities) -> tuple[BucketHold, Window]:
    """The hold of a request in the one bucket of an operator's cap, shared by every customer."""
    spec = window_spec(cap)
    window = window_of(spec, now_s)
    key = redis_keys.cap_bucket(cap.name, cap.unit, spec, window.start)
    return _hold(cap, key, window, now_s, amount_for(cap.unit, charge, cost, q)), window


def _hold(limit: Limit, key: str, window: Window, now_s: int, amount: int) -> BucketHold:
    """A negative ttl_seconds: a life renewed by every hold (a thread's budget), not set once."""
    ttl = 0 if window.end == 0 else window.end - now_s + BUCKET_TTL_MARGIN_SECONDS
    if limit.scope == "thread_budget":
        ttl = -THREAD_BUDGET_IDLE_SECONDS
    thresholds = tuple((pct, ceil_div(limit.limit * pct, 100)) for pct in limit.thresholds)
    return BucketHold(key=key, label=limit.label, unit=limit.unit, amount=amount, limit=limit.limit,
                      mode="shadow" if limit.action == "shadow" else "block", ttl_seconds=ttl, thresholds=thresholds)


def alert_fields(hold: BucketHold) -> dict[str, int]:
    """The fields of a hold's bucket that say its limit alerted at each threshold, and the amount that crosses
    it (authorize.lua sets them, reset_limit.lua clears them): a limit's own, since two limits may count in one
    bucket."""
    return {f"a{pct}:{hold.label}": amount for pct, amount in hold.thresholds}


def idles_out(bucket_key: str) -> bool:
    """A bucket forgotten once idle (a thread's budget): its absence is no loss."""
    return _THREAD_BUDGET_BUCKET in bucket_key


def remaining_ttl(bucket_key: str, now_s: int) -> int | None:
    """Seconds a bucket key should live from now, 0 for "total", None once its window has passed (a thread's
    budget, written again after a loss: its idle time, from now)."""
    if idles_out(bucket_key):
        return THREAD_BUDGET_IDLE_SECONDS
    _, window, start = bucket_key.rsplit(":", 2)
    if window == "total":
        return 0
    end = window_of(window, int(start)).end
    if end <= now_s:
        return None
    return end - now_s + BUCKET_TTL_MARGIN_SECONDS
