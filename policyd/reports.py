"""Usage reports: who spent what, on which feature, model or thread, over a window.

Grouped in SQL (one GROUP BY over usage_records, bucketed by hour or day with integer division of
the timestamp, which PostgreSQL and SQLite compute alike); months are made of days in Python. Buckets are
UTC's, or a time zone's: the window is cut where the zone's clocks change, and each part bucketed by its
timestamps shifted by the zone's offset then.
Figures are integers: counts, tokens and nanos.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from policyd.db import PRUNED_CURSOR, RollupCursorRow, UsageRecordRow
from policyd.money import ceil_div
from policyd.own_usage import TAG_DIMENSION  # a request tag's values ("tag:product")
from policyd.policy import TAG_SCOPE_PREFIX, time_zone

DIMENSIONS = {
    "customer": UsageRecordRow.customer_id, "workspace": UsageRecordRow.workspace_id,
    "project": UsageRecordRow.project_id, "team": UsageRecordRow.team_id, "key": UsageRecordRow.api_key_id,
    "environment": UsageRecordRow.environment, "feature": UsageRecordRow.feature, "route": UsageRecordRow.route,
    "thread": UsageRecordRow.thread_id, "end_user": UsageRecordRow.end_user_id,
    "model": UsageRecordRow.served_model, "requested_model": UsageRecordRow.requested_model,
    "provider": UsageRecordRow.provider, "decision": UsageRecordRow.decision, "status": UsageRecordRow.status,
    "reason": UsageRecordRow.reason,
}


def known_dimension(name: str) -> bool:
    return name in DIMENSIONS or bool(TAG_DIMENSION.match(name))


def dimension_column(name: str) -> Any:
    """The records' column a dimension groups by: a tag's is the value of that tag of each request (none: "")."""
    if name in DIMENSIONS:
        return DIMENSIONS[name]
    return func.coalesce(UsageRecordRow.tags[name[len(TAG_SCOPE_PREFIX):]].as_string(), "")


BUCKET_MS = {"hour": 3_600_000, "day": 86_400_000, "month": 86_400_000}
# what else a provider bills apart, summed over charged records like the tokens: each line of a provider's
# invoice has its figure (cache writes of either TTL, of which 1h; audio tokens, part of input/output_tokens;
# images; audio seconds; web and file searches; image input tokens, part of input_tokens; the image_generation
# tool's calls and tokens, billed at its image model's prices; image output tokens, part of output_tokens;
# hosted containers; prompts grounded with Google Maps; a rerank's search units; reasoning billed apart, part of
# output_tokens; explicit caches' token-seconds kept)
USAGE_FIGURES = ("cache_write_input_tokens", "cache_write_1h_input_tokens", "audio_input_tokens",
                 "audio_output_tokens", "images", "seconds", "web_searches", "file_searches", "image_input_tokens",
                 "image_generation_calls", "image_generation_input_tokens", "image_generation_cached_input_tokens",
                 "image_generation_image_input_tokens", "image_generation_output_tokens", "image_output_tokens",
                 "containers", "maps_groundings", "search_units", "reasoning_output_tokens",
                 "cache_storage_token_seconds", "refunded_nanos")
FIGURES = ("requests", "allowed", "denied", "downgraded", "failed", "input_tokens", "cached_input_tokens",
           "output_tokens", "cost_nanos", "charge_nanos", "retries", "fallbacks", *USAGE_FIGURES)
CHARGED = ("settled", "settled_late")
GROUPS_MAX = 10_000


class ReportError(ValueError):
    pass


@dataclass
class ReportRow:
    group: dict[str, str]
    bucket: str = ""
    figures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIGURES, 0))
    previous: dict[str, int] = field(default_factory=dict)

    @property
    def margin_nanos(self) -> int:
        return self.figures["charge_nanos"] - self.figures["cost_nanos"]

    @property
    def cost_per_success_nanos(self) -> int:
        successes = self.figures["allowed"] - self.figures["failed"]
        return ceil_div(self.figures["cost_nanos"], successes) if successes > 0 else 0


def bucket_label(bucket: str, start_ms: int, zone: ZoneInfo | None = None) -> str:
    """A bucket's name: its start, in UTC or in a time zone (an hour's with its offset from UTC)."""
    moment = datetime.fromtimestamp(start_ms / 1000, tz=zone or timezone.utc)  # a timestamp, not money
    if bucket == "hour":
        return moment.strftime("%Y-%m-%dT%H:00Z") if zone is None else moment.isoformat(timespec="minutes")
    if bucket == "day":
        return moment.strftime("%Y-%m-%d")
    return moment.strftime("%Y-%m")


def offset_spans(since_ms: int, until_ms: int, zone: ZoneInfo | None) -> list[tuple[int, int, int]]:
    """[since, until) cut where the zone's offset from UTC changes (its clocks change): (start, end, offset ms)
    of each part, in which local hours, days and months start at UTC times shifted by the offset alone."""
    def offset(ms: int) -> int:
        moment = datetime.fromtimestamp(ms / 1000, tz=zone)
        return int(moment.utcoffset().total_seconds() * 1000)  # type: ignore[union-attr]

    if zone is None:
        return [(since_ms, until_ms, 0)]
    spans, start, current = [], since_ms, offset(since_ms)
    probe = since_ms
    while probe < until_ms:
        step_end = min(probe + 86_400_000, until_ms)
        if offset(step_end - 1) != current:  # a change within the day: found to the millisecond
            low, high = probe, step_end - 1
            while low < high:
                middle = (low + high) // 2
                if offset(middle) == current:
                    low = middle + 1
                else:
                    high = middle
            spans.append((start, low, current))
            start, current = low, offset(low)
            probe = low
            continue
        probe = step_end
    spans.append((start, until_ms, current))
    return spans


def figure_columns() -> list[Any]:
    """The report's figures as SQL aggregates over usage_records (also what the rollups store)."""
    r = UsageRecordRow
    charged = r.status.in_(CHARGED)
    return [
        func.count().label("requests"),
        func.sum(case((r.decision != "deny", 1), else_=0)).label("allowed"),
        func.sum(case((r.decision == "deny", 1), else_=0)).label("denied"),
        func.sum(case((r.decision == "downgrade", 1), else_=0)).label("downgraded"),
        func.sum(case((r.status.in_(("released", "expired")), 1), else_=0)).label("failed"),
        func.sum(case((charged, r.input_tokens), else_=0)).label("input_tokens"),
        func.sum(case((charged, r.cached_input_tokens), else_=0)).label("cached_input_tokens"),
        func.sum(case((charged, r.output_tokens), else_=0)).label("output_tokens"),
        func.sum(case((charged, r.cost_nanos), else_=0)).label("cost_nanos"),
        func.sum(case((charged, r.charge_nanos), else_=0)).label("charge_nanos"),
        func.sum(r.retries).label("retries"),
        func.sum(case((r.fallback_reason != "", 1), else_=0)).label("fallbacks"),
        *[func.sum(case((charged, getattr(r, name)), else_=0)).label(name) for name in USAGE_FIGURES],
    ]


def _query(session: Session, group_by: list[str], since_ms: int, until_ms: int, bucket: str,
           customer_id: str, zone: ZoneInfo | None = None) -> dict[tuple[tuple[str, ...], str], dict[str, int]]:
    """Each group's figures (and bucket's: hours, days and months of the zone, UTC's without one), one query a
    span of the window in which the zone's offset from UTC holds."""
    out: dict[tuple[tuple[str, ...], str], dict[str, int]] = {}
    for start, end, offset in offset_spans(since_ms, until_ms, zone) if bucket else [(since_ms, until_ms, 0)]:
        _query_span(session, group_by, start, end, bucket, customer_id, offset, zone, out)
    return out


def _query_span(session: Session, group_by: list[str], since_ms: int, until_ms: int, bucket: str, customer_id: str,
                offset: int, zone: ZoneInfo | None, out: dict[tuple[tuple[str, ...], str], dict[str, int]]) -> None:
    r = UsageRecordRow
    columns = [dimension_column(d).label(d) for d in group_by]
    if bucket:  # local time is UTC shifted by the offset: buckets of it, given back as UTC instants
        local = r.created_ms + offset
        columns.append((local - local % BUCKET_MS[bucket] - offset).label("bucket"))
    figures = figure_columns()
    query = select(*columns, *figures).where(r.created_ms >= since_ms, r.created_ms < until_ms)
    if customer_id:
        query = query.where(r.customer_id == customer_id)
    groups = [c for c in columns]
    if groups:
        query = query.group_by(*groups)
    for row in session.execute(query.limit(GROUPS_MAX * 31)):
        data = row._mapping
        key = tuple(str(data[d] or "") for d in group_by)
        label = bucket_label(bucket, int(data["bucket"]), zone) if bucket else ""
        target = out.setdefault((key, label), dict.fromkeys(FIGURES, 0))
        for name in FIGURES:
            target[name] += int(data[name] or 0)


def top_groups(session: Session, dimension: str, since_ms: int, until_ms: int, order_by: str, limit: int,
               only: list[str] | None = None) -> list[ReportRow]:
    """The `limit` groups of one dimension with the biggest `order_by` figure, sorted and limited in SQL
    (for dimensions with too many values to bring them all back, such as threads)."""
    named = dimension_column(dimension)
    column = named.label(dimension)
    figures = figure_columns()
    ordering = next(f for f in figures if f.name == order_by)
    query = (select(column, *figures).where(UsageRecordRow.created_ms >= since_ms, UsageRecordRow.created_ms < until_ms,
                                            named != "")
             .group_by(column).order_by(ordering.desc(), column).limit(limit))
    if only is not None:
        query = query.where(named.in_(only))
    return [ReportRow({dimension: str(row._mapping[dimension])}, "",
                      {name: int(row._mapping[name] or 0) for name in FIGURES}) for row in session.execute(query)]


def usage_report(session: Session, group_by: list[str], since_ms: int, until_ms: int, bucket: str = "",
                 customer_id: str = "", compare_previous: bool = False, zone_name: str = "") -> list[ReportRow]:
    """`zone_name`: the IANA time zone whose hours, days and months the buckets are ("" or UTC: UTC's)."""
    try:
        zone = time_zone(zone_name) if zone_name and zone_name != "UTC" else None
    except ValueError as error:
        raise ReportError(str(error)) from None
    unknown = [d for d in group_by if not known_dimension(d)]
    if unknown:
        raise ReportError(f"unknown dimension {unknown[0]!r} (known: {', '.join(DIMENSIONS)}, tag:<name>)")
    if bucket not in ("", "hour", "day", "month"):
        raise ReportError("bucket must be hour, day or month")
    if until_ms <= since_ms:
        raise ReportError("the window is empty: until must be after since")
    if compare_previous and bucket:
        raise ReportError("top movers compare whole windows: leave the bucket out")
    require_kept(session, 2 * since_ms - until_ms if compare_previous else since_ms)
    current = _query(session, group_by, since_ms, until_ms, bucket, customer_id, zone)
    previous = _query(session, group_by, 2 * since_ms - until_ms, since_ms, "", customer_id) if compare_previous else {}
    rows = [ReportRow(dict(zip(group_by, key)), label, figures, previous.get((key, ""), {}))
            for (key, label), figures in current.items()]
    if compare_previous:  # top movers: what grew most against the window before
        rows.sort(key=lambda r: (-(r.figures["charge_nanos"] - r.previous.get("charge_nanos", 0)), list(r.group.values())))
    else:
        rows.sort(key=lambda r: (r.bucket, -r.figures["charge_nanos"], list(r.group.values())))
    return rows[:GROUPS_MAX]


def pruned_before(session: Session) -> int:
    """Usage records created before this (unix ms) were deleted (record retention); 0: none were."""
    cursor = session.get(RollupCursorRow, PRUNED_CURSOR)
    return cursor.written_ms if cursor is not None else 0


def require_kept(session: Session, since_ms: int) -> None:
    """A window read from usage records must begin where they are kept (ReportError naming it)."""
    horizon = pruned_before(session)
    if since_ms < horizon:
        first = datetime.fromtimestamp(horizon / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
        raise ReportError(f"usage records before {first} were deleted (record retention): ask from {first} on; "
                          "the dashboard's hourly and daily sums cover earlier windows")


def month_bounds(period: str) -> tuple[int, int]:
    """'2026-10' -> [start, end) in unix ms, UTC."""
    try:
        year, month = (int(p) for p in period.split("-"))
        if not 1 <= month <= 12 or not 1970 <= year <= 9999 or len(period) != 7:
            raise ValueError
    except ValueError:
        raise ReportError(f"a period is YYYY-MM, not {period!r}") from None
    start = calendar.timegm((year, month, 1, 0, 0, 0))
    days = calendar.monthrange(year, month)[1]
    return start * 1000, (start + days * 86400) * 1000


def row_dict(row: ReportRow) -> dict[str, Any]:
    data: dict[str, Any] = {**row.group}
    if row.bucket:
        data["bucket"] = row.bucket
    data.update(row.figures)
    data["margin_nanos"] = row.margin_nanos
    data["cost_per_success_nanos"] = row.cost_per_success_nanos
    if row.previous:
        data["previous_charge_nanos"] = row.previous.get("charge_nanos", 0)
        data["charge_change_nanos"] = row.figures["charge_nanos"] - row.previous.get("charge_nanos", 0)
    return data
