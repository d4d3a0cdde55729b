"""Record retention: usage records, alert and rejected-call events and delivered alerts older than
`record_retention_days` are deleted, an hour of records at a time, and no figure policyd answers changes.

What a deleted record still counts for is kept, in the transaction that deletes it:
- its holds in buckets whose window still runs (a lifetime budget's; a thread's budget Redis still holds) and the
  credit it consumed of each expiring grant: added to `pruned_sums`, which Store.held_by_bucket, settled_in_bucket
  and credit_consumed add to the kept records' sums, so the audit, a rebuild and a reset read what they read before;
- its customer's invoice months (those its charges are dated in, and those they reached the ledger in: a charge
  that reached it after its month was closed is an adjustment there) are closed first, lines by model and by feature
  (invoices.py), so each is exported as it was (a month not ended yet holds the deletion back until it ends);
- what a key's review counts of it (its requests, denials by reason and failures, when it was last used):
  added to `pruned_sums` too (Store.key_activity), so a key idle since before the horizon is not "never used";
- its hour of the rollups: summed again from the records as they are when they go, and never again after
  (rollups.refresh leaves the hours before the horizon), so the dashboard's history stays whole; once its day is
  wholly before the horizon, that day's hourly rows go too (its day's row, summed from them, stays), so the rollups
  stop growing with every hour.

Kept whatever their age: open records (the horizon stays before the oldest one's hour), and those that made an
object the provider keeps until it is deleted (a conversation, a file, an explicit cache), whose owner later
requests are checked against. The wallet's ledger, limit resets and closed invoices are never deleted.

A report or GET /v1/usage over a window that begins before the horizon is refused, naming it (reports.py); the
dashboard reads the rollups. A deleted request is unknown to lookups and refunds; a limit given after its owner's
records were deleted is seeded from the kept ones.

A pass runs every PASS_SECONDS where the writer runs: the hours of records due (each in a transaction of its own,
run alone among the rollups' passes and other replicas': rollups.serialized), then events and delivered alerts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy import delete, func, literal, select, tuple_
from sqlalchemy.orm import Session

from policyd import invoices, metrics, reports, rollups
from policyd.db import (PRUNED_CURSOR, AlertDeliveryRow, EventRow, LedgerEntryRow, PeriodCloseRow, PrunedSumRow,
                        RollupCursorRow, UsageRecordRow)
from policyd.domain import CACHED_CONTENT_PREFIX
from policyd.loops import every
from policyd.quotas import idles_out, remaining_ttl
from policyd.store import OPEN_STATUSES, Store, add_sums, key_activity_columns

log = logging.getLogger("policyd.retention")

HOUR_MS = rollups.HOUR_MS
DAY_MS = rollups.DAY_MS
PASS_SECONDS = 3600
HOURS_PER_PASS = 24 * 7  # a pass ends after this many hours of records (the next one goes on)
ROWS_PER_STATEMENT = 10_000  # events and deliveries deleted a statement at a time
# the provider keeps these until their owner deletes them: the record that made one says whose it is
KEPT_ID_PREFIXES = ("conv_", "file-", "file_", CACHED_CONTENT_PREFIX)
SETTLED = ("settled", "settled_late")
# the events a request may make (one a request, at most): those deleted. Kept: admin actions (the audit trail),
# key state changes, reconciliations, and events the writer could not apply (unwritable, unknown: for the operator)
PRUNED_EVENT_KINDS = ("alert", "rejected")
# which Redis buckets of threads' budgets still exist (a thread still spending): bucket keys -> those that do
ThreadsAlive = Callable[[list[str]], Awaitable[set[str]]]


@dataclass
class Pruned:
    records: int = 0
    events: int = 0
    deliveries: int = 0
    hours: int = 0
    periods_closed: int = 0
    rollup_hours: int = 0  # hourly rollup rows of days wholly before the horizon (their days kept)
    horizon_ms: int = 0  # records created before it are gone
    held_back: str = ""  # why the horizon stayed short of the retention's, if it did
    carried: dict[str, int] = field(default_factory=dict)  # kind -> keys added to pruned_sums


horizon = reports.pruned_before


def _deletable(r: type[UsageRecordRow], start_ms: int, end_ms: int) -> list:  # type: ignore[type-arg]
    return [r.created_ms >= start_ms, r.created_ms < end_ms, r.status.not_in(OPEN_STATUSES),
            *[~r.provider_response_id.startswith(prefix, autoescape=True) for prefix in KEPT_ID_PREFIXES]]


def _hour(ms: int) -> int:
    return ms - ms % HOUR_MS


def _target(session: Session, days: int, now_ms: int) -> tuple[int, str]:
    """How far records may be deleted now (an hour's start), and why not as far as the retention, if so."""
    r = UsageRecordRow
    target, why = _hour(now_ms - days * DAY_MS), ""
    oldest_open = session.scalar(select(func.min(r.created_ms)).where(r.status.in_(OPEN_STATUSES)))
    if oldest_open is not None and _hour(int(oldest_open)) < target:
        target, why = _hour(int(oldest_open)), "a request older than the retention is still open"
    return target, why


async def prune(store: Store, days: int, now_ms: int, threads_alive: ThreadsAlive) -> Pruned:
    """One pass: what it deleted and kept. `threads_alive`: the thread budget buckets Redis still holds."""
    done = Pruned()
    with store.session() as session:
        target, done.held_back = _target(session, days, now_ms)
        done.horizon_ms = start = horizon(session)
    r = UsageRecordRow
    finished = False  # nothing deletable is left before the target
    while done.hours < HOURS_PER_PASS:
        with store.session() as session:
            first = session.scalar(select(func.min(r.created_ms)).where(*_deletable(r, start, target)))
        if first is None:
            finished = True
            break
        hour = _hour(int(first))
        alive = await threads_alive(await asyncio.to_thread(_thread_buckets, store, hour))
        try:
            done.periods_closed += await asyncio.to_thread(_close_months, store, hour, now_ms)
            await asyncio.to_thread(_prune_hour, store, hour, alive, now_ms, done)
        except invoices.InvoiceError as error:  # a month not ended, to close: nothing of the hour deleted
            done.held_back = str(error)
            break
        start = done.horizon_ms = hour + HOUR_MS
        done.hours += 1
    if finished:  # the horizon moves to the target (past hours of kept records alone)
        await asyncio.to_thread(_advance, store, target, done)
    await asyncio.to_thread(_drop_rollup_hours, store, done)
    await asyncio.to_thread(_prune_events, store, now_ms - days * DAY_MS, done)
    return done


def _drop_rollup_hours(store: Store, done: Pruned) -> None:
    """The hourly rollups of the days wholly before the horizon: their days were summed from them, whole, when
    their last hour's records went, and are never summed again; nothing reads an hour that old (the dashboard's
    hours are the last two days'). Their days stay."""
    with store.session() as session, session.begin():
        rollups.serialized(session)
        before = horizon(session)
        done.rollup_hours = rollups.drop_hours(session, before - before % DAY_MS)
    metrics.rows_pruned.labels("usage_rollups").inc(done.rollup_hours)


def _advance(store: Store, target: int, done: Pruned) -> None:
    with store.session() as session, session.begin():
        rollups.serialized(session)
        _set_horizon(session, target)
        done.horizon_ms = max(done.horizon_ms, target)


def _set_horizon(session: Session, ms: int) -> None:
    cursor = session.get(RollupCursorRow, PRUNED_CURSOR)
    if cursor is None:
        session.add(RollupCursorRow(name=PRUNED_CURSOR, written_ms=ms))
    elif cursor.written_ms < ms:
        cursor.written_ms = ms


def _thread_buckets(store: Store, hour: int) -> list[str]:
    """The thread budget buckets the hour's settled records hold in."""
    sums = store.bucket_sums_where(_hour_clause(), hour=hour, end=hour + HOUR_MS)
    return [key for key in sums if idles_out(key)]


def _hour_clause() -> str:
    """The SQL of _deletable for the hour [:hour, :end), settled records alone (those that hold)."""
    kept = " AND ".join(f"provider_response_id NOT LIKE '{prefix.replace('_', chr(92) + '_')}%' ESCAPE '\\'"
                        for prefix in KEPT_ID_PREFIXES)
    return f"created_ms >= :hour AND created_ms < :end AND status IN ('settled', 'settled_late') AND {kept}"


def _prune_hour(store: Store, hour: int, threads_alive: set[str], now_ms: int, done: Pruned) -> None:
    r = UsageRecordRow
    end = hour + HOUR_MS
    with store.session() as session, session.begin():
        rollups.serialized(session)
        if session.bind is not None and session.bind.dialect.name == "postgresql":  # no change under the sums
            locked = select(r.request_id).where(*_deletable(r, hour, end)).with_for_update().subquery()
            session.execute(select(func.count()).select_from(locked))
        rollups.rebuild_hour(session, hour)  # summed as they are at their deletion, and never again
        for customer, period in sorted({(c, p) for c, p, _ in _months_to_close(session, hour, end)}):  # a race
            done.periods_closed += _close(session, _groupings_open(session, customer, period), customer, period,
                                          now_ms)
        now_s = now_ms // 1000
        buckets = {key: amount for key, amount in store.bucket_sums_where(
            _hour_clause(), session=session, hour=hour, end=end).items()
            if amount and remaining_ttl(key, now_s) is not None and (not idles_out(key) or key in threads_alive)}
        credits = {key: amount for key, amount in store.credit_sums_where(
            _hour_clause(), session=session, hour=hour, end=end).items() if amount}
        _carry(session, "bucket", buckets, done)
        _carry(session, "credit", credits, done)
        _carry_key_activity(session, hour, end, done)
        deleted = session.execute(delete(r).where(*_deletable(r, hour, end)).execution_options(
            synchronize_session=False))
        done.records += deleted.rowcount or 0
        _set_horizon(session, end)
    metrics.rows_pruned.labels("usage_records").inc(deleted.rowcount or 0)


def _months_to_close(session: Session, hour: int, end: int) -> set[tuple[str, str, str]]:
    """(customer, month, lines by) of every invoice not closed yet of a month the hour's charges are dated in, or
    reached its customer's ledger in (a late one is an adjustment there)."""
    r, l = UsageRecordRow, LedgerEntryRow
    its_charge = l.entry_id == literal("charge:") + r.request_id  # the ledger's key: no scan of it
    in_hour = (r.created_ms >= hour, r.created_ms < end)
    charged = (select(l.customer_id, func.min(l.created_ms), func.max(l.created_ms),
                      func.min(func.nullif(l.recorded_ms, 0)), func.max(l.recorded_ms))
               .join(r, its_charge).where(*in_hour).group_by(l.customer_id))
    months: set[tuple[str, str]] = set()
    for customer, first, last, first_recorded, last_recorded in session.execute(charged):
        months.update((customer, period) for period in _months(int(first), int(last)))
        if first_recorded is not None:
            months.update((customer, period) for period in _months(int(first_recorded), int(last_recorded)))
    promo = (select(r.customer_id, func.min(r.closed_ms), func.max(r.closed_ms))
             .where(*in_hour, r.billing_mode == "promo", r.status.in_(SETTLED)).group_by(r.customer_id))
    for customer, first, last in session.execute(promo):
        if session.scalar(select(l.entry_id).where(l.customer_id == customer).limit(1)) is not None:  # invoiced
            months.update((customer, period) for period in _months(int(first), int(last)))
    if not months:
        return set()
    p = PeriodCloseRow
    closed = {(c, period, by) for c, period, by in session.execute(select(p.customer_id, p.period, p.lines_by).where(
        p.period.in_({period for _, period in months}), p.customer_id.in_({c for c, _ in months})))}
    return {(c, period, by) for c, period in months for by in invoices.GROUPINGS} - closed


def _close_months(store: Store, hour: int, now_ms: int) -> int:
    """Close the invoices the hour's deletion needs closed, a customer's month a transaction (building 1,000
    customers' invoices takes a while: not under the lock an hour's deletion holds)."""
    with store.session() as session:
        due = _months_to_close(session, hour, hour + HOUR_MS)
    closed = 0
    for customer, period in sorted({(c, p) for c, p, _ in due}):
        with store.session() as session, session.begin():
            rollups.serialized(session)  # another replica's pass closes none of them meanwhile
            closed += _close(session, {d for d in _groupings_open(session, customer, period)
                                       if (customer, period, d) in due}, customer, period, now_ms)
    return closed


def _groupings_open(session: Session, customer: str, period: str) -> set[str]:
    """The ways (lines by model, by feature) a customer's invoice of a month is not closed yet."""
    p = PeriodCloseRow
    done = set(session.scalars(select(p.lines_by).where(p.customer_id == customer, p.period == period)))
    return set(invoices.GROUPINGS) - done


def _close(session: Session, groupings: set[str], customer: str, period: str, now_ms: int) -> int:
    for lines_by in sorted(groupings):
        invoices.close(session, invoices.build(session, customer, period, lines_by), now_ms)
    session.flush()
    return len(groupings)


def _months(first_ms: int, last_ms: int) -> list[str]:
    """The UTC months (YYYY-MM) from first_ms's to last_ms's."""
    year, month = time.gmtime(first_ms // 1000)[:2]
    last = tuple(time.gmtime(last_ms // 1000)[:2])
    out = []
    while (year, month) <= last:
        out.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return out


def _carry_key_activity(session: Session, hour: int, end: int, done: Pruned) -> None:
    """What a key's review counts of the hour's records (Store.key_activity): its requests, denials (by reason) and
    failures, and when it was last used."""
    r = UsageRecordRow
    deletable = [*_deletable(r, hour, end), r.api_key_id != ""]
    counts: dict[str, dict[str, int]] = {kind: {} for kind in ("key_requests", "key_denials", "key_errors")}
    last: dict[str, int] = {}
    for key_id, requests, latest, denials, errors in session.execute(
            select(r.api_key_id, *key_activity_columns()).where(*deletable).group_by(r.api_key_id)):
        counts["key_requests"][key_id], last[key_id] = int(requests), int(latest)
        counts["key_denials"][key_id], counts["key_errors"][key_id] = int(denials or 0), int(errors or 0)
    reasons = {f"{key_id} {reason}": int(n) for key_id, reason, n in session.execute(
        select(r.api_key_id, r.reason, func.count()).where(*deletable, r.decision == "deny")
        .group_by(r.api_key_id, r.reason))}
    for kind, sums in [*counts.items(), ("key_deny_reason", reasons)]:
        _carry(session, kind, {key: n for key, n in sums.items() if n}, done)
    _carry(session, "key_last_used", last, done, latest=True)


def _carry(session: Session, kind: str, sums: dict[str, int], done: Pruned, latest: bool = False) -> None:
    """Add these sums to pruned_sums (`latest`: keep the greater of the two instead): one upsert, run for every key."""
    if not sums:
        return
    add_sums(session, PrunedSumRow.__table__, ["kind", "key"],
             [{"kind": kind, "key": key, "amount": amount} for key, amount in sorted(sums.items())], latest)
    done.carried[kind] = done.carried.get(kind, 0) + len(sums)


def _prune_events(store: Store, before_ms: int, done: Pruned) -> None:
    """Alerts and rejected calls made before `before_ms` (an alert not while it waits for a delivery), and the
    deliveries made before it."""
    e, d = EventRow, AlertDeliveryRow
    while True:
        with store.session() as session, session.begin():
            waiting = select(d.event_id).where(d.delivered_ms == 0)
            ids = select(e.id).where(e.kind.in_(PRUNED_EVENT_KINDS), e.created_ms < before_ms,
                                     e.id.not_in(waiting)).limit(ROWS_PER_STATEMENT)
            deleted = session.execute(delete(e).where(e.id.in_(ids.scalar_subquery())).execution_options(
                synchronize_session=False)).rowcount or 0
        done.events += deleted
        metrics.rows_pruned.labels("events").inc(deleted)
        if deleted < ROWS_PER_STATEMENT:
            break
    while True:
        with store.session() as session, session.begin():
            rows = select(d.event_id, d.url).where(d.delivered_ms > 0, d.delivered_ms < before_ms).limit(
                ROWS_PER_STATEMENT)
            deleted = session.execute(delete(d).where(tuple_(d.event_id, d.url).in_(rows)).execution_options(
                synchronize_session=False)).rowcount or 0
        done.deliveries += deleted
        metrics.rows_pruned.labels("alert_deliveries").inc(deleted)
        if deleted < ROWS_PER_STATEMENT:
            break


async def run(store: Store, days: int, stop: asyncio.Event, threads_alive: ThreadsAlive, clock: Callable[[], int]
              ) -> None:
    async def one_pass() -> None:
        while not stop.is_set():  # a backlog (retention just turned on) is deleted HOURS_PER_PASS hours a time
            done = await prune(store, days, clock(), threads_alive)
            if done.records or done.events or done.deliveries or done.held_back:
                log.info("retention: %d usage records, %d events and %d deliveries deleted; records kept from %d%s",
                         done.records, done.events, done.deliveries, done.horizon_ms,
                         f" ({done.held_back})" if done.held_back else "")
            if done.hours < HOURS_PER_PASS:
                return

    await every(PASS_SECONDS, stop, one_pass, "record retention pass")
