"""What the dashboard shows, read from the ledger and the counters. Figures are integers (nanos,
tokens, counts); pages format them. Every figure here comes from the same tables the CLI reports
and invoices read, so a page and `policyd usage report` agree to the nano."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, func, select

from policyd import reports, rollups
from policyd.admin import Admin, now_ms
from policyd.db import EventRow, LedgerEntryRow
from policyd.redis_keys import wallet_id

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
OVERVIEW_DIMENSIONS = ("customer", "feature", "model", "environment")
TOP_DIMENSIONS = ("customer", "key", "feature", "thread")
INCIDENT_DIMENSIONS = ("key", "feature", "thread", "model")
STACKED_SERIES_MAX = 6  # the biggest groups; the rest is summed as "other"
TOP_ROWS = 10
MOVER_CANDIDATES = 200  # threads that spent most in the window, compared with their window before
LATEST_RECORDS = 50
HISTORY_DAYS = 30


@dataclass
class Overview:
    since_ms: int
    until_ms: int
    by: str
    metric: str
    buckets: list[str]
    series: dict[str, list[int]]
    totals: dict[str, int]
    tops: dict[str, list[reports.ReportRow]]
    denial_series: dict[str, list[int]]
    denial_reasons: list[tuple[str, int, int]]  # reason, denied, downgraded


@dataclass
class CustomerView:
    customer_id: str
    balance_nanos: int
    reserved_nanos: int
    history: list[tuple[str, int]]  # day, balance at its end
    daily: list[tuple[str, int, int]]  # day, granted, charged
    grants: list[LedgerEntryRow]
    buckets: list[dict[str, Any]]
    keys: list[Any]
    records: list[Any]


@dataclass
class Incidents:
    since_ms: int
    until_ms: int
    movers: dict[str, list[reports.ReportRow]] = field(default_factory=dict)
    busiest_threads: list[reports.ReportRow] = field(default_factory=list)
    anomalies: list[EventRow] = field(default_factory=list)


def bucket_labels(since_ms: int, until_ms: int, bucket: str) -> list[str]:
    step = HOUR_MS if bucket == "hour" else DAY_MS
    start = since_ms - since_ms % step
    return [reports.bucket_label(bucket, at) for at in range(start, until_ms, step)]


class DashboardData:
    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.store = admin.store

    async def _fresh(self) -> None:
        """Everything policyd decided so far is in SQL and in the rollups."""
        await self.admin.catch_up()
        await asyncio.to_thread(rollups.refresh, self.store)

    async def overview(self, days: int, by: str, metric: str) -> Overview:
        await self._fresh()
        at = now_ms()
        period, step = ("hour", HOUR_MS) if days <= 2 else ("day", DAY_MS)
        until = at - at % step + step  # the current hour or day included
        since = until - (days * 24 if period == "hour" else days) * step
        figure = "cost_nanos" if metric == "cost" else "charge_nanos"

        def run() -> Overview:
            with self.store.session() as session:
                tops = {d: rollups.top(session, d, period, since, until, figure, TOP_ROWS)
                        for d in TOP_DIMENSIONS if d != "thread"}
                # threads are too many to roll up: the top ones come from the records of the last day at most
                tops["thread"] = reports.top_groups(session, "thread", max(since, at - DAY_MS), until, figure, TOP_ROWS)
                biggest = [r.group[by] for r in rollups.top(session, by, period, since, until, figure,
                                                            STACKED_SERIES_MAX + 1) if r.figures[figure] > 0]
                shown = biggest[:STACKED_SERIES_MAX]
                over_time = rollups.over_time(session, by, period, since, until, shown)
                reasons = rollups.over_time(session, "reason", period, since, until)
            labels = bucket_labels(since, until, period)
            index = {label: i for i, label in enumerate(labels)}
            series = {g: [0] * len(labels) for g in shown}
            if len(biggest) > len(shown):
                series["other"] = [0] * len(labels)
            for row in over_time:
                if row.bucket in index and row.figures[figure] and row.group[by] in series:
                    series[row.group[by]][index[row.bucket]] += row.figures[figure]
            denial_series: dict[str, list[int]] = {}
            denial_totals: dict[str, list[int]] = {}
            for row in reasons:
                refused = row.figures["denied"] + row.figures["downgraded"]
                if not refused:
                    continue
                reason = row.group["reason"] or "downgraded"
                denial_series.setdefault(reason, [0] * len(labels))
                if row.bucket in index:
                    denial_series[reason][index[row.bucket]] += refused
                pair = denial_totals.setdefault(reason, [0, 0])
                pair[0] += row.figures["denied"]
                pair[1] += row.figures["downgraded"]
            totals = dict.fromkeys(reports.FIGURES, 0)
            for figures in rollups.totals(reasons, "reason").values():  # every record has exactly one reason
                for name in reports.FIGURES:
                    totals[name] += figures[name]
            return Overview(since, until, by, metric, labels, series, totals, tops, denial_series,
                            sorted(((r, d, g) for r, (d, g) in denial_totals.items()), key=lambda t: (-(t[1] + t[2]), t[0])))

        return await asyncio.to_thread(run)

    async def customer(self, customer_id: str) -> CustomerView:
        await self._fresh()
        balance, reserved = await self.admin.counters.wallet(wallet_id(customer_id, ""))
        keys = await self.admin.list_keys(customer_id)
        buckets: dict[tuple[str, str], dict[str, Any]] = {}
        for key in keys:
            if key.status == "revoked":
                continue
            review = await self.admin.review_key(key.id)
            for b in review["buckets"]:
                owner = key.id if b["scope"] == "key" else b["scope"]
                buckets.setdefault((owner, b["label"]), {**b, "owner": key.id if b["scope"] == "key" else customer_id})
        until = now_ms()
        since = until - until % DAY_MS - (HISTORY_DAYS - 1) * DAY_MS

        def run() -> tuple[list[tuple[str, int]], list[tuple[str, int, int]], list[LedgerEntryRow], list[Any]]:
            e = LedgerEntryRow
            day = (e.created_ms - e.created_ms % DAY_MS).label("day")
            with self.store.session() as session:
                per_day = session.execute(
                    select(day, func.sum(case((e.kind == "grant", e.amount_nanos), else_=0)),
                           func.sum(case((e.kind != "grant", e.amount_nanos), else_=0)), func.max(e.created_ms))
                    .where(e.wallet_id == customer_id, e.created_ms >= since).group_by(day).order_by(day)).all()
                last_of_day = {int(last): int(d) for d, _, _, last in per_day}
                closing = {}
                if last_of_day:
                    for created, after in session.execute(
                            select(e.created_ms, e.balance_after_nanos).where(
                                e.wallet_id == customer_id, e.created_ms.in_(list(last_of_day)))
                            .order_by(e.created_ms, e.entry_id)):
                        closing[last_of_day[int(created)]] = int(after)  # the last entry of the day wins
                opening = session.scalar(select(e.balance_after_nanos).where(
                    e.wallet_id == customer_id, e.created_ms < since)
                    .order_by(e.created_ms.desc(), e.entry_id.desc()).limit(1)) or 0
                grants = list(session.scalars(select(e).where(e.wallet_id == customer_id, e.kind != "charge")
                                              .order_by(e.created_ms.desc()).limit(LATEST_RECORDS)))
                records = self.store.latest_usage(customer_id, LATEST_RECORDS)
            label = lambda ms: datetime.fromtimestamp(ms // 1000, tz=timezone.utc).strftime("%Y-%m-%d")  # noqa: E731
            history = []
            balance = int(opening)
            for d in range(since, until, DAY_MS):  # every day, the balance carried over days without movement
                balance = closing.get(d, balance)
                history.append((label(d), balance))
            daily = [(label(int(d)), int(g or 0), -int(c or 0)) for d, g, c, _ in per_day]
            return history, daily, grants, records

        history, daily, grants, records = await asyncio.to_thread(run)
        return CustomerView(customer_id, balance, reserved, history, daily, grants,
                            sorted(buckets.values(), key=lambda b: (b["owner"], b["label"])), keys, records)

    async def incidents(self, hours: int) -> Incidents:
        await self._fresh()
        at = now_ms()
        # up to two days: hourly sums; longer windows compare whole days (a week is 7 rows per value, not 168)
        period, step = ("hour", HOUR_MS) if hours <= 48 else ("day", DAY_MS)
        until = at - at % step + step
        since = until - -(-hours * HOUR_MS // step) * step
        before = since - (until - since)
        thread_hours = min(hours, 24)  # threads come from the records: a day at most

        def run() -> Incidents:
            view = Incidents(since, until)
            with self.store.session() as session:
                for d in INCIDENT_DIMENSIONS:
                    if d == "thread":
                        start = at - thread_hours * HOUR_MS
                        rows = reports.top_groups(session, d, start, at, "charge_nanos", MOVER_CANDIDATES)
                        then = {r.group[d]: r.figures for r in reports.top_groups(
                            session, d, start - thread_hours * HOUR_MS, start, "charge_nanos", MOVER_CANDIDATES,
                            only=[r.group[d] for r in rows])}
                        rows = [replace(r, previous=then.get(r.group[d], {})) for r in rows]
                        rows.sort(key=lambda r: (-(r.figures["charge_nanos"] - r.previous.get("charge_nanos", 0)), r.group[d]))
                    else:
                        then = {r.group[d]: r.figures for r in rollups.top(session, d, period, before, since, "charge_nanos")}
                        rows = [replace(r, previous=then.get(r.group[d], {}))
                                for r in rollups.top(session, d, period, since, until, "charge_nanos")]
                        rows.sort(key=lambda r: (-(r.figures["charge_nanos"] - r.previous.get("charge_nanos", 0)), r.group[d]))
                    view.movers[d] = [r for r in rows if r.group[d]][:5]
                view.busiest_threads = reports.top_groups(session, "thread", at - thread_hours * HOUR_MS, at,
                                                          "requests", 5)
                view.anomalies = list(session.scalars(
                    select(EventRow).where(EventRow.kind == "alert", EventRow.created_ms >= since - HOUR_MS)
                    .order_by(EventRow.created_ms.desc()).limit(100)))
            view.anomalies = [a for a in view.anomalies if a.detail.get("anomaly")]
            return view

        return await asyncio.to_thread(run)

    async def reconciliation(self) -> EventRow | None:
        def run() -> EventRow | None:
            with self.store.session() as session:
                return session.scalars(select(EventRow).where(EventRow.kind == "reconciliation")
                                       .order_by(EventRow.created_ms.desc()).limit(1)).first()

        return await asyncio.to_thread(run)
