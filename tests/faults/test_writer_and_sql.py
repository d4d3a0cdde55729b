"""The writer: records reach SQL exactly once, whatever dies on the way."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from policyd.db import LedgerEntryRow, UsageRecordRow
from policyd.server import Service
from policyd.writer import Writer
from tests.helpers import ask, fund, new_key, usage


def _counts(service: Service) -> tuple[int, int]:
    with service.store.session() as session:
        records = session.scalar(select(func.count()).select_from(UsageRecordRow))
        ledger = session.scalar(select(func.count()).select_from(LedgerEntryRow))
    return records, ledger


async def _traffic(service: Service, secret: str, n: int, prefix: str) -> None:
    for i in range(n):
        d = await service.engine.authorize(ask(secret, request_id=f"{prefix}-{i}"))
        if d.decision == "allow" and i % 3:
            await service.engine.settle(usage(f"{prefix}-{i}"))


async def test_sql_unavailable_then_back(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "10", grant_id="g")
    original = Writer._apply

    def sql_down(self, entries):
        raise OperationalError("INSERT", {}, Exception("connection refused"))

    monkeypatch.setattr(Writer, "_apply", sql_down)
    await _traffic(service, secret, 30, "down")
    with pytest.raises(OperationalError):
        await service.writer.drain_once()
    assert _counts(service) == (0, 0)
    monkeypatch.setattr(Writer, "_apply", original)
    await service.writer.drain()
    assert _counts(service) == (30, 1 + 20)  # 30 decisions; the grant and 20 charges
    assert (await service.admin.audit()).ok


async def test_a_dead_writers_entries_are_claimed_and_written_once(service: Service,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "10", grant_id="g")
    await _traffic(service, secret, 25, "claim")
    dead = Writer(service.counters.client, service.store, service.counters.partitions, batch=7, consumer="dead")
    original = Writer._apply
    calls = {"n": 0}

    def commit_then_die(self, entries):
        original(self, entries)  # the SQL commit happens...
        calls["n"] += 1
        raise KeyboardInterrupt("killed before XACK")  # ...and the process dies before acknowledging

    monkeypatch.setattr(Writer, "_apply", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        await dead.drain_once()
    monkeypatch.setattr(Writer, "_apply", original)
    assert calls["n"] == 1
    survivor = Writer(service.counters.client, service.store, service.counters.partitions, claim_idle_ms=0,
                      consumer="survivor")
    await survivor.drain()
    assert _counts(service) == (25, 1 + 16)
    assert (await service.admin.audit()).ok


async def test_an_unwritable_event_does_not_block_its_partition(service: Service) -> None:
    from policyd import redis_keys

    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    partition = service.counters.partition_of("acme")
    await service.counters.client.xadd(redis_keys.events(partition), {"type": "settle", "rid": "broken", "at": "1",
                                                                      "d": "{not json"})
    await service.engine.authorize(ask(secret, request_id="after-broken"))
    await service.writer.drain()
    assert service.store.usage_record("after-broken") is not None
    assert [e.request_id for e in service.store.events("unwritable")] == ["broken"]


async def test_events_of_one_request_can_be_applied_in_any_order(service: Service) -> None:
    """Several writers share a stream, so a release (or settle) may reach SQL before its authorize."""
    from policyd import redis_keys

    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    partition = service.counters.partition_of("acme")
    await service.engine.authorize(ask(secret, request_id="o-released"))
    await service.engine.release("o-released", "provider_error")
    await service.engine.authorize(ask(secret, request_id="o-settled"))
    await service.engine.settle(usage("o-settled"))
    clock = [service.engine.clock()]
    service.engine.clock = lambda: clock[0]
    await service.engine.authorize(ask(secret, request_id="o-late"))
    clock[0] += service.engine.reservation_ttl_ms + 1
    await service.engine.expire_due()
    await service.engine.settle(usage("o-late"))
    entries = await service.counters.client.xrange(redis_keys.events(partition))
    decoded = [(partition, i.decode(), {k.decode(): v.decode() for k, v in f.items()}) for i, f in entries]
    await service.counters.client.delete(redis_keys.events(partition))
    service.writer._apply(list(reversed(decoded)))
    released = service.store.usage_record("o-released")
    assert (released.status, released.customer_id, released.close_reason) == ("released", "acme", "provider_error")
    settled = service.store.usage_record("o-settled")
    assert (settled.status, settled.customer_id) == ("settled", "acme") and settled.charge_nanos > 0
    late = service.store.usage_record("o-late")
    assert late.status == "settled_late" and late.customer_id == "acme"
    service.writer._apply(decoded)  # and a replay in order changes nothing
    assert service.store.usage_record("o-late").status == "settled_late"
    await service.writer.ensure_groups()
    assert (await service.admin.audit()).ok
