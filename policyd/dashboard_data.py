"""What the dashboard shows, read from the ledger and the counters. Figures are integers (nanos,
tokens, counts); pages format them. Every figure here comes from the same tables the CLI reports
and invoices read, so a page and `policyd usage report` agree to the nano."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import case, func, select

from policyd import reports
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
    return [reports._bucket_label(bucket, at) for at in range(start, until_ms, step)]


class DashboardData:
    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.store = admin.store

    async def overview(self, days: int, by: str, metric: str) -> Overview:
        await self.admin.writer.drain()
        until = now_ms()
        since = until - days * DAY_MS
        bucket = "hour" if days <= 2 else "day"
        figure = "cost_nanos" if metric == "cost" else "charge_nanos"

        def run() -> Overview:
            with self.store.session() as session:
                over_time = reports.usage_report(session, [by], since, until, bucket)
                tops = {d: reports.usage_report(session, [d], since, until)[:TOP_ROWS] for d in TOP_DIMENSIONS}
                reasons = reports.usage_report(session, ["reason"], since, until, bucket)
                totals = reports.usage_report(session, [], since, until)
            labels = bucket_labels(since, until, bucket)
            index = {label: i for i, label in enumerate(labels)}
            per_group: dict[str, int] = {}
            for row in over_time:
                per_group[row.group[by]] = per_group.get(row.group[by], 0) + row.figures[figure]
            ranked = sorted((g for g, v in per_group.items() if v > 0), key=lambda g: (-per_group[g], g))
            shown = ranked[:STACKED_SERIES_MAX]
            series = {g: [0] * len(labels) for g in shown}
            if len(ranked) > len(shown):
                series["other"] = [0] * len(labels)
            for row in over_time:
                if row.bucket in index and row.figures[figure]:
                    name = row.group[by] if row.group[by] in shown else "other"
                    if name in series:
                        series[name][index[row.bucket]] += row.figures[figure]
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
            for row in tops.values():
                row.sort(key=lambda r: (-r.figures[figure], list(r.group.values())))
            return Overview(
                since, until, by, metric, labels, series, totals[0].figures if totals else dict.fromkeys(reports.FIGURES, 0),
                tops, denial_series,
                sorted(((r, d, g) for r, (d, g) in denial_totals.items()), key=lambda t: (-(t[1] + t[2]), t[0])))

        return await asyncio.to_thread(run)

    async def customer(self, customer_id: str) -> CustomerView:
        await self.admin.writer.drain()
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
        await self.admin.writer.drain()
        until = now_ms()
        since = until - hours * HOUR_MS

        def run() -> Incidents:
            view = Incidents(since, until)
            with self.store.session() as session:
                for d in INCIDENT_DIMENSIONS:
                    rows = reports.usage_report(session, [d], since, until, compare_previous=True)
                    view.movers[d] = [r for r in rows if r.group[d]][:5]
                threads = reports.usage_report(session, ["thread"], since, until)
                view.busiest_threads = sorted((r for r in threads if r.group["thread"]),
                                              key=lambda r: (-r.figures["requests"], r.group["thread"]))[:5]
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
