"""One request as its customer may see it (GET /v1/requests/{id}, DescribeRequest): what it was charged, what it
used and where it stands, read from its usage record in SQL, or from its reservation in Redis while the writer
has not yet written the record. Never what it cost the operator, nor the provider account that served it. And the
customer's requests, newest first, a page at a time (GET /v1/requests, ListRequests), from their records.

A request still in progress (held, its reply not yet settled; or settled a moment ago, its record not yet
updated) is looked at again every POLL_SECONDS until it closes or the wait asked for runs out; an id found
nowhere is looked for again until RECORD_LAG_SECONDS have passed (within the wait), since a denial's record, the
one trace such a request leaves, is written a moment after the client has its answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from policyd.domain import RequestSummary

if TYPE_CHECKING:  # the HTTP API reads this module's bounds without loading SQL's
    from policyd.counters import Counters
    from policyd.store import Store

log = logging.getLogger(__name__)

REQUEST_ID_LENGTH_MAX = 256  # a client's id (128) with what policyd adds to it (its key's, an attempt's number)
WAIT_MS_MAX = 20_000  # the longest a caller may wait for a request to close
DECISION_SECONDS = WAIT_MS_MAX // 1000 + 5  # how long Envoy waits for policyd's answer to a lookup
LISTING_DEFAULT = 20  # the requests a page of a listing holds unless told
LISTING_MAX = 100  # the most requests one page of a listing holds
POLL_SECONDS = 0.1
RECORD_LAG_SECONDS = 1.0
# lookups one process lets wait at once (each reads SQL every POLL_SECONDS): past it a lookup answers at once
WAITING_MAX = 100
_waiting = 0

# the record's status -> the request's, as its customer reads it
STATUSES = {"reserved": "in_progress", "settled": "settled", "settled_late": "settled", "released": "released",
            "expired": "expired", "denied": "denied", "unmetered": "unmetered"}

# the usage a record keeps, by the names of Settle's Usage (the record's request_count is its requests)
USAGE_FIELDS = ("input_tokens", "cached_input_tokens", "output_tokens", "images", "seconds", "cache_write_input_tokens",
                "web_searches", "audio_input_tokens", "audio_output_tokens", "cache_write_1h_input_tokens",
                "file_searches", "image_input_tokens", "image_generation_calls", "image_generation_input_tokens",
                "image_generation_cached_input_tokens", "image_generation_image_input_tokens",
                "image_generation_output_tokens", "image_output_tokens", "containers", "maps_groundings",
                "search_units", "search_context_size", "reasoning_output_tokens", "cache_storage_token_seconds")


def _field(source: Any, name: str, default: Any) -> Any:
    """A field of a record: a row of SQL's (an attribute) or the record a reservation keeps (a key)."""
    value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
    return default if value is None else value


def summary_of(record: Any, held: int | None = None) -> RequestSummary:
    """A request's summary from its record (a UsageRecordRow, or the record dict its reservation keeps, whose
    status is in_progress and whose hold is `held`)."""
    status = "in_progress" if held is not None else STATUSES.get(_field(record, "status", ""), "in_progress")
    balance_after = _field(record, "balance_after_nanos", None) if status != "in_progress" else None
    usage = {name: _field(record, name, "" if name == "search_context_size" else 0) for name in USAGE_FIELDS}
    usage["requests"] = _field(record, "request_count", 0)
    error_class = _field(record, "error_class", "")
    return RequestSummary(
        request_id=_field(record, "request_id", ""), created_ms=_field(record, "created_ms", 0), status=status,
        decision=_field(record, "decision", ""), reason=_field(record, "reason", ""),
        message=_field(record, "message", ""), endpoint=_field(record, "endpoint", ""),
        requested_model=_field(record, "requested_model", ""), served_model=_field(record, "served_model", ""),
        api_key_id=_field(record, "api_key_id", ""), currency=_field(record, "currency", ""),
        charge=_field(record, "charge_nanos", 0) if status != "in_progress" else 0,
        held=held if held is not None else _field(record, "reserved_nanos", 0),
        refunded=_field(record, "refunded_nanos", 0), balance_after=balance_after, usage=usage,
        usage_estimated=error_class.startswith("usage_estimated"), error_class=error_class,
        feature=_field(record, "feature", ""), thread_id=_field(record, "thread_id", ""),
        end_user_id=_field(record, "end_user_id", ""), agent_id=_field(record, "agent_id", ""),
        tags=dict(_field(record, "tags", {})),
    )


async def _reservation(counters: Counters, request_id: str) -> Any:
    """The request's reservation in Redis, None when it has none (or Redis cannot be reached: SQL alone answers)."""
    try:
        return await counters.find_reservation(request_id)
    except Exception:
        log.warning("counters unreachable: request %s looked up in SQL alone", request_id)
        return None


async def find(store: Store, counters: Counters, customer_id: str, request_id: str,
               wait_ms: int) -> RequestSummary | None:
    """The request of this customer with this id (None: none, or another customer's), waiting up to `wait_ms`
    (at most WAIT_MS_MAX; none while WAITING_MAX others wait) for one in progress to close."""
    global _waiting
    started = time.monotonic()
    deadline = started + (min(max(wait_ms, 0), WAIT_MS_MAX) / 1000 if _waiting < WAITING_MAX else 0)
    _waiting += 1
    try:
        return await _looked_for(store, counters, customer_id, request_id, started, deadline)
    finally:
        _waiting -= 1


async def _looked_for(store: Store, counters: Counters, customer_id: str, request_id: str, started: float,
                      deadline: float) -> RequestSummary | None:
    lag_ends = min(deadline, started + RECORD_LAG_SECONDS)
    while True:
        row = await asyncio.to_thread(store.usage_record, request_id)
        if row is not None:
            if row.customer_id != customer_id:
                return None
            summary = summary_of(row)
            if summary.status != "in_progress" or time.monotonic() >= deadline:
                return summary
        else:  # not written yet: held in Redis, or a denial whose record is on its way
            reservation = await _reservation(counters, request_id)
            if reservation is not None and reservation.record.get("customer_id") != customer_id:
                return None
            if time.monotonic() >= (deadline if reservation is not None else lag_ends):
                return None if reservation is None else summary_of(reservation.record, held=reservation.amount)
        await asyncio.sleep(POLL_SECONDS)


async def recent(store: Store, customer_id: str, limit: int, after: str = "") -> tuple[list[RequestSummary], bool] | None:
    """A page of the customer's requests from their records, newest first: at most `limit` (LISTING_MAX), past the
    request `after` (the last of the page before), and whether more follow; None when `after` is not one of the
    customer's requests. A request whose record the writer has not yet written is not in it yet."""
    anchor = None
    if after:
        row = await asyncio.to_thread(store.usage_record, after)
        if row is None or row.customer_id != customer_id:
            return None
        anchor = (row.created_ms, row.request_id)
    limit = min(max(limit, 1), LISTING_MAX)
    rows = await asyncio.to_thread(store.latest_usage, customer_id, limit + 1, after=anchor)
    return [summary_of(row) for row in rows[:limit]], len(rows) > limit
