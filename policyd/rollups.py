"""Usage rollups: usage records summed per hour and per day for each dimension the dashboard groups by,
so its pages read a few thousand rows instead of scanning a month of records.

A pass finds the hours that hold records written since the previous pass (`usage_records.updated_ms`,
indexed; a late settlement rewrites an old record, so its old hour is summed again), and rebuilds
those hours from the records, then their days from the hours. The figures are the ones
`policyd.reports` computes (`reports.figure_columns`), so a rollup and a report agree to the nano.

The dashboard runs a pass before it reads (after draining the writer), so what it shows is exact
as of that moment; a background loop keeps the rollups warm. Passes (of several replicas, and record retention's)
run one at a time (`serialized`).
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import case, delete, func, insert, literal, select, text
from sqlalchemy.orm import Session

from policyd import reports
from policyd.db import RollupCursorRow, UsageRecordRow, UsageRollupRow
from policyd.loops import every
from policyd.store import Store


HOUR_MS = 3_600_000
DAY_MS = 86_400_000
DIMENSIONS = ("customer", "key", "feature", "model", "environment", "reason")
# a record whose transaction committed after a pass began, with an updated_ms from before it, is
# still found by the next pass: each pass looks back this far before its cursor
WRITE_LAG_MS = 120_000
HOURS_PER_STATEMENT = 24 * 31
ADVISORY_LOCK = 7_424_001
CURSOR = "usage"


def _ranges(hours: list[int]) -> list[tuple[int, int]]:
    """Sorted hour starts -> [start, end) ranges of consecutive hours, at most HOURS_PER_STATEMENT long."""
    out: list[tuple[int, int]] = []
    for hour in hours:
        if out and out[-1][1] == hour and (out[-1][1] - out[-1][0]) < HOURS_PER_STATEMENT * HOUR_MS:
            out[-1] = (out[-1][0], hour + HOUR_MS)
        else:
            out.append((hour, hour + HOUR_MS))
    return out


def serialized(session: Session) -> None:
    """The rest of this transaction runs alone among the passes that change the rollups or the records they sum
    (rollups, retention): under a PostgreSQL advisory lock; on SQLite, holding the write lock from its first
    statement (reads take none: two passes would read the same cursor, then both write)."""
    if session.bind is not None and session.bind.dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK})
    else:
        session.execute(text("UPDATE rollup_cursor SET written_ms = written_ms WHERE name = ''"))


def refresh(store: Store) -> int:
    """One pass; the number of hours rebuilt."""
    started = time.time_ns() // 1_000_000
    r = UsageRecordRow
    figures = _figure_names()
    with store.session() as session, session.begin():
        serialized(session)
        cursor = session.get(RollupCursorRow, CURSOR)
        since = (cursor.written_ms - WRITE_LAG_MS) if cursor is not None and cursor.written_ms > 0 else None
        hour_of = r.created_ms - r.created_ms % HOUR_MS
        query = select(hour_of).distinct()
        if since is not None:
            query = query.where(r.updated_ms >= since)
        pruned = reports.pruned_before(session)  # hours whose records retention deleted stay as they were summed
        hours = sorted(h for h in (int(h) for h in session.scalars(query)) if h >= pruned)
        for start, end in _ranges(hours):
            _rebuild_hours(session, start, end, figures)
        for day in sorted({h - h % DAY_MS for h in hours}):
            _rebuild_day(session, day, figures)
        if cursor is None:
            session.add(RollupCursorRow(name=CURSOR, written_ms=started))
        else:
            cursor.written_ms = started
    return len(hours)


def rebuild_hour(session: Session, hour: int) -> None:
    """Sum one hour (and its day) again from its records, in the caller's transaction (retention's, before it
    deletes them)."""
    _rebuild_hours(session, hour, hour + HOUR_MS, _figure_names())
    _rebuild_day(session, hour - hour % DAY_MS, _figure_names())


def drop_hours(session: Session, before_ms: int) -> int:
    """Delete the hourly rows before `before_ms` (a day's start; retention's, of days it froze): how many."""
    rollup = UsageRollupRow.__table__
    return session.execute(delete(rollup).where(rollup.c.period == "hour", rollup.c.start_ms < before_ms)
                           ).rowcount or 0


def _figure_names() -> list[str]:
    return [c.name for c in UsageRollupRow.__table__.columns if c.name not in ("period", "start_ms", "dimension", "value")]


def _rebuild_hours(session: Session, start: int, end: int, figures: list[str]) -> None:
    r = UsageRecordRow
    rollup = UsageRollupRow.__table__
    session.execute(delete(rollup).where(rollup.c.period == "hour", rollup.c.start_ms >= start, rollup.c.start_ms < end))
    hour_of = (r.created_ms - r.created_ms % HOUR_MS).label("start_ms")
    for dimension in DIMENSIONS:
        column = reports.DIMENSIONS[dimension]
        value = func.coalesce(column, "").label("value")
        source = (select(literal("hour").label("period"), hour_of, literal(dimension).label("dimension"), value,
                         *reports.figure_columns())
                  .where(r.created_ms >= start, r.created_ms < end)
                  .group_by(hour_of, value))
        session.execute(insert(rollup).from_select(["period", "start_ms", "dimension", "value", *figures], source))


def _rebuild_day(session: Session, day: int, figures: list[str]) -> None:
    rollup = UsageRollupRow.__table__
    session.execute(delete(rollup).where(rollup.c.period == "day", rollup.c.start_ms == day))
    source = (select(literal("day"), literal(day), rollup.c.dimension, rollup.c.value,
                     *[func.sum(rollup.c[name]) for name in figures])
              .where(rollup.c.period == "hour", rollup.c.start_ms >= day, rollup.c.start_ms < day + DAY_MS)
              .group_by(rollup.c.dimension, rollup.c.value))
    session.execute(insert(rollup).from_select(["period", "start_ms", "dimension", "value", *figures], source))


def _figure_sums(rollup) -> list:  # type: ignore[no-untyped-def]
    return [func.sum(rollup.c[name]).label(name) for name in reports.FIGURES]


def _window(query, rollup, dimension: str, period: str, since_ms: int, until_ms: int):  # type: ignore[no-untyped-def]
    return query.where(rollup.c.dimension == dimension, rollup.c.period == period,
                       rollup.c.start_ms >= since_ms, rollup.c.start_ms < until_ms)


def top(session: Session, dimension: str, period: str, since_ms: int, until_ms: int, figure: str,
        limit: int | None = None) -> list[reports.ReportRow]:
    """Each value's figures over the window, biggest `figure` first (summed in SQL)."""
    rollup = UsageRollupRow.__table__
    query = _window(select(rollup.c.value, *_figure_sums(rollup)), rollup, dimension, period, since_ms, until_ms)
    query = query.group_by(rollup.c.value).order_by(func.sum(rollup.c[figure]).desc(), rollup.c.value)
    if limit is not None:
        query = query.limit(limit)
    return [reports.ReportRow({dimension: row.value}, "", {name: int(getattr(row, name) or 0) for name in reports.FIGURES})
            for row in session.execute(query)]


def over_time(session: Session, dimension: str, period: str, since_ms: int, until_ms: int,
              values: list[str] | None = None) -> list[reports.ReportRow]:
    """Figures per bucket and value; with `values`, every other value is summed as "other"."""
    rollup = UsageRollupRow.__table__
    group = rollup.c.value if values is None else case((rollup.c.value.in_(values), rollup.c.value), else_="other")
    query = _window(select(rollup.c.start_ms, group.label("value"), *_figure_sums(rollup)), rollup, dimension, period,
                    since_ms, until_ms).group_by(rollup.c.start_ms, group)
    return [reports.ReportRow({dimension: row.value}, reports.bucket_label(period, int(row.start_ms)),
                              {name: int(getattr(row, name) or 0) for name in reports.FIGURES})
            for row in session.execute(query)]


def totals(rows: list[reports.ReportRow], dimension: str) -> dict[str, dict[str, int]]:
    """Sum report rows over their buckets: value -> figures."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        target = out.setdefault(row.group[dimension], dict.fromkeys(reports.FIGURES, 0))
        for name in reports.FIGURES:
            target[name] += row.figures[name]
    return out


async def run(store: Store, stop: asyncio.Event, interval_ms: int) -> None:
    await every(interval_ms / 1000, stop, lambda: asyncio.to_thread(refresh, store), "rollup pass")
