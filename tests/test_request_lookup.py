"""One request as its customer sees it (policyd/request_lookup.py), from its record in SQL, or from its reservation
in Redis while the record is on its way; SQL alone when Redis cannot be reached."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis.exceptions

from policyd import request_lookup
from policyd.counters import Reservation
from policyd.db import migrate
from policyd.store import Store


class _Counters:
    """What the lookup reads of the counters: a reservation by request id, or Redis away."""

    def __init__(self, reservation: Reservation | None = None, away: bool = False) -> None:
        self.reservation, self.away, self.asked = reservation, away, 0

    async def find_reservation(self, request_id: str) -> Reservation | None:
        self.asked += 1
        if self.away:
            raise redis.exceptions.ConnectionError("connection refused")
        return self.reservation if self.reservation and self.reservation.request_id == request_id else None


def _store(tmp_path: Path) -> Store:
    url = f"sqlite:///{tmp_path / 'lookup.db'}"
    migrate(url)
    return Store(url)


def _record(**fields: Any) -> dict[str, Any]:
    return {"request_id": "r-1", "created_ms": 1_700_000_000_123, "customer_id": "acme", "api_key_id": "key_a",
            "decision": "allow", "status": "settled", "currency": "USD", "requested_model": "gpt-4o",
            "served_model": "gpt-4o-mini", "reserved_nanos": 900, "charge_nanos": 345, "cost_nanos": 300,
            "balance_after_nanos": 10_000, "input_tokens": 12, "cached_input_tokens": 4, "output_tokens": 7,
            "web_searches": 2, "request_count": 1, "error_class": "usage_estimated:client_gone",
            "provider_account": "openai-1", "tags": {"env": "blue"}, **fields}


async def test_a_settled_request_is_read_from_its_record_even_with_redis_away(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.insert_records([_record()])
    counters = _Counters(away=True)
    found = await request_lookup.find(store, counters, "acme", "r-1", wait_ms=0)  # type: ignore[arg-type]
    assert found is not None and counters.asked == 0  # its record answers: Redis is not asked
    assert (found.status, found.charge, found.held, found.balance_after, found.usage_estimated) == (
        "settled", 345, 900, 10_000, True)
    assert (found.usage["input_tokens"], found.usage["web_searches"], found.usage["requests"]) == (12, 2, 1)
    assert "cost" not in found.__dataclass_fields__ and "provider_account" not in found.__dataclass_fields__
    assert await request_lookup.find(store, counters, "globex", "r-1", wait_ms=0) is None  # type: ignore[arg-type]
    # not written yet, and Redis away: not found once the record's usual lag has passed, without failing
    assert await request_lookup.find(store, counters, "acme", "r-2", wait_ms=300) is None  # type: ignore[arg-type]
    assert counters.asked >= 2


async def test_a_request_whose_record_is_on_its_way_is_read_from_its_reservation(tmp_path: Path) -> None:
    store = _store(tmp_path)
    held = Reservation(request_id="r-9", partition=0, state="held", amount=1234, expires_ms=0,
                       fields={"record": _record(request_id="r-9", status=None, charge_nanos=None)})
    counters = _Counters(held)
    found = await request_lookup.find(store, counters, "acme", "r-9", wait_ms=0)  # type: ignore[arg-type]
    assert found is not None and (found.status, found.held, found.charge, found.balance_after) == (
        "in_progress", 1234, 0, None)
    assert await request_lookup.find(store, counters, "globex", "r-9", wait_ms=0) is None  # type: ignore[arg-type]
    store.insert_records([_record(request_id="r-9", status="released", charge_nanos=0, balance_after_nanos=None)])
    found = await request_lookup.find(store, counters, "acme", "r-9", wait_ms=0)  # type: ignore[arg-type]
    assert found is not None and (found.status, found.charge, found.held) == ("released", 0, 900)


async def test_a_lookup_waits_no_longer_once_too_many_others_wait(tmp_path: Path, monkeypatch) -> None:
    """Each waiting lookup reads SQL every POLL_SECONDS: past WAITING_MAX waiting in one process, a lookup answers
    at once with where the request stands."""
    held = Reservation(request_id="r-5", partition=0, state="held", amount=77, expires_ms=0,
                       fields={"record": _record(request_id="r-5")})
    store = _store(tmp_path)
    monkeypatch.setattr(request_lookup, "WAITING_MAX", 0)
    started = time.monotonic()
    found = await request_lookup.find(store, _Counters(held), "acme", "r-5", wait_ms=5000)  # type: ignore[arg-type]
    assert found is not None and found.status == "in_progress" and time.monotonic() - started < 1
    monkeypatch.setattr(request_lookup, "WAITING_MAX", 100)
    started = time.monotonic()
    await request_lookup.find(store, _Counters(held), "acme", "r-5", wait_ms=500)  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.5 and request_lookup._waiting == 0


async def test_a_customers_requests_are_listed_newest_first_a_page_at_a_time(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.insert_records([_record(request_id=f"r-{n}", created_ms=1_700_000_000_000 + n // 2) for n in range(5)]
                         + [_record(request_id="theirs", customer_id="globex", created_ms=1_800_000_000_000)])
    pages, after = [], ""
    while True:  # two a page: r-4, then r-2 and r-3 (one millisecond: by id), r-0 and r-1
        page = await request_lookup.recent(store, "acme", 2, after)
        assert page is not None
        pages.append([s.request_id for s in page[0]])
        if not page[1]:
            break
        after = page[0][-1].request_id
    assert pages == [["r-4", "r-2"], ["r-3", "r-0"], ["r-1"]]
    whole, more = await request_lookup.recent(store, "acme", 500)  # at most LISTING_MAX
    assert len(whole) == 5 and not more and whole[0].charge == 345 and "theirs" not in {s.request_id for s in whole}
    assert await request_lookup.recent(store, "acme", 2, "theirs") is None  # another customer's: not a cursor
    assert await request_lookup.recent(store, "acme", 2, "never-made") is None
