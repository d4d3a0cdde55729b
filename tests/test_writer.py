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

    def sql_down(self, partition, entries):
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

    def commit_then_die(self, partition, entries):
        original(self, partition, entries)  # the SQL commit happens...
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
