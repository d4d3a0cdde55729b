"""A key's own limits: the budgets and rate limits an operator gives one key, beside its plan's; an owner's: those
it gives a customer, or one of its workspaces, projects or teams, binding every key of theirs; and a request's
thread budget, which its caller sets (with_thread_budget).

Stored with the key as `{window, unit, limit, timezone}` (money in nanos of the policy's currency; an owner's
with its `scope`, copied onto each of the owner's keys: Admin.set_owner_limits) and part of its terms
(store.key_terms), so a change binds every replica from the next decision. A limit counts in its scope's
bucket of its unit and window (the key's, the customer's, ...): where the plan has a limit of the same scope
in the same bucket, the key's or owner's replaces it (an override: "this key may spend 20 a month, not the
plan's 100"; "this customer 500, not 1,000"); any other binds beside the plan's. A bucket a plan already
counts in holds the window's use so far; a key's or owner's limit whose bucket nothing counted in yet starts from
what it had used in its window before (Admin._seeded), as a limit a policy adds does (bucket_seeds.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from pydantic import ValidationError

from policyd.money import MONEY_UNITS, format_amount
from policyd.policy import Limit

if TYPE_CHECKING:
    from policyd.db import OwnerLimitsRow

KEY_LIMITS_MAX = 8
ALERTS_MAX = 4  # the percentages of one limit that raise an alert
MODELS_MAX = 4  # the model patterns one key's or owner's limit names
MODEL_PATTERN_LENGTH_MAX = 64
THREAD_BUDGET = "thread-budget"  # the name of a caller's budget of its thread (AuthorizeInput.thread_budget)
WINDOWS = ("minute", "hour", "day", "month", "total")
UNITS = ("money", "tokens", "requests")


def checked(limits: Iterable[Mapping[str, Any]], scope: str = "key",
            names_a_model: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
    """The limits as a key (or an owner of `scope`) stores them, in one order; ValueError says what is wrong.
    `names_a_model`: whether a limit's model pattern names a model of the price table in force."""
    stored: dict[tuple[str, str, str, tuple[str, ...]], dict[str, Any]] = {}
    whose = "a key" if scope == "key" else f"a {scope}"
    for given in limits:
        window, unit = str(given.get("window", "")), str(given.get("unit", ""))
        limit, zone = given.get("limit"), str(given.get("timezone", "") or "")
        if window not in WINDOWS:
            raise ValueError(f"{whose} limit's window is one of {', '.join(WINDOWS)}, not {window!r}")
        if unit not in UNITS:
            raise ValueError(f"{whose} limit's unit is one of {', '.join(UNITS)}, not {unit!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"{whose} limit is a whole number, at least 0 (money in nanos)")
        entry: dict[str, Any] = {"window": window, "unit": unit, "limit": limit, "timezone": zone}
        alerts = list(given.get("thresholds") or ())
        if alerts:  # none given: a plan limit's (50 and 80)
            if len(alerts) > ALERTS_MAX or any(isinstance(p, bool) or not isinstance(p, int) or not 0 < p <= 100
                                               for p in alerts):
                raise ValueError(f"{whose} limit's alerts are at most {ALERTS_MAX} percentages from 1 to 100")
            entry["thresholds"] = sorted(set(alerts))
        models = given.get("models") or ()
        if models:  # only the requests served on these models count
            if isinstance(models, str) or len(models) > MODELS_MAX or any(
                    not isinstance(m, str) or not m.strip() or len(m) > MODEL_PATTERN_LENGTH_MAX or "," in m
                    for m in models):
                raise ValueError(f"{whose} limit names at most {MODELS_MAX} models (names, globs or tier:NAME), each "
                                 f"at most {MODEL_PATTERN_LENGTH_MAX} characters without commas")
            entry["models"] = sorted({m.strip() for m in models})
            unknown = [m for m in entry["models"] if names_a_model is not None and not names_a_model(m)]
            if unknown:
                raise ValueError(f"{whose} limit's model {unknown[0]!r} matches nothing in the price table")
        until = given.get("until_unix_ms") or 0
        if until:  # binds until then, then the plan's limit of its bucket again
            if isinstance(until, bool) or not isinstance(until, int) or until < 0:
                raise ValueError(f"{whose} limit's until_unix_ms is a time in unix milliseconds")
            entry["until_unix_ms"] = until
        if scope != "key":
            entry["scope"] = scope
        try:
            _limit(entry)
        except ValidationError as error:
            raise ValueError(f"{scope} limit {window}/{unit}: {error.errors()[0]['msg']}") from None
        bucket = (window, unit, zone, tuple(entry.get("models", ())))
        if bucket in stored:
            raise ValueError(f"two {scope} limits of {unit} per {window}" + (" on the same models" * bool(bucket[3])))
        stored[bucket] = entry
    if len(stored) > KEY_LIMITS_MAX:
        raise ValueError(f"{whose} has at most {KEY_LIMITS_MAX} limits of its own")
    return [stored[k] for k in sorted(stored)]


def _limit(entry: Mapping[str, Any]) -> Limit:
    value, scope = entry["limit"], entry.get("scope", "key")
    alerts = {"thresholds": tuple(entry["thresholds"])} if entry.get("thresholds") else {}
    models = tuple(entry.get("models") or ())
    on = f"[{','.join(models)}]" if models else ""  # key-money-day[gpt-4o,tier:premium]: its own name and bucket
    return Limit(name=f"{scope}-{entry['unit']}-{entry['window']}{on}", scope=scope, window=entry["window"],
                 unit=entry["unit"], limit=format_amount(value) if entry["unit"] in MONEY_UNITS else value,
                 timezone=entry.get("timezone", ""), models=models, until_unix_ms=entry.get("until_unix_ms", 0),
                 **alerts)


def end_user_stamp(row: OwnerLimitsRow | None) -> str:
    """The stamp of an end user's owner_limits row (its own limits, and whether it is paused), "" for none: what
    the authorize script compares with the one of the customer's end users' terms in Redis
    (redis_keys.end_user_terms)."""
    if row is None or (not row.limits and not row.paused):
        return ""
    stored = [row.limits or [], "paused"] if row.paused else row.limits
    return hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()[:16]


def as_limits(stored: Iterable[Mapping[str, Any]] | None) -> tuple[Limit, ...]:
    return tuple(_limit(entry) for entry in stored or ())


def effective(plan_limits: tuple[Limit, ...], own: tuple[Limit, ...], zone: str, at_ms: int) -> tuple[Limit, ...]:
    """The limits a request on this key counts against at `at_ms`: the plan's, with the key's own (and its owners')
    in place of the plan's limits of the same scope and bucket. `zone`: the policy's time zone, for day and
    month limits that name none. A key's or owner's limit past its `until_unix_ms` binds no more: the plan's of its
    bucket binds again."""
    if own:
        own = tuple(limit for limit in own if not limit.until_unix_ms or at_ms < limit.until_unix_ms)
    if not own:
        return plan_limits
    own = tuple(limit.model_copy(update={"timezone": zone}) if zone and not limit.timezone
                and limit.window in ("day", "month") else limit for limit in own)

    def bucket(limit: Limit) -> tuple[Any, ...]:
        return limit.scope, limit.unit, limit.window, limit.timezone, tuple(sorted(set(limit.models)))

    taken = {bucket(limit) for limit in own}
    kept = tuple(limit for limit in plan_limits if bucket(limit) not in taken)
    return kept + own


def with_thread_budget(limits: tuple[Limit, ...], budget: int) -> tuple[Limit, ...]:
    """The limits with a caller's budget of its thread's total charge (`budget` nanos, 0: none), beside the plan's.
    It counts in a bucket of its own (scope "thread_budget": the thread's, quotas.scope_ids), so that a plan's
    limits of the thread stand as they are, each counting once: the caller may tighten what its plan allows a
    thread, never loosen it. Made here, not read from a policy (no plan may name its scope)."""
    if not budget:
        return limits
    own = Limit.model_construct(name=THREAD_BUDGET, scope="thread_budget", window="total", unit="money",
                                limit=budget, timezone="", action="block", downgrade_to="", thresholds=())
    return (*limits, own)
