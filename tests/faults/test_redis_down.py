"""Redis unavailable: decisions fail closed (or open, when configured), are still recorded, and
the service recovers when Redis is back."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import pytest

from policyd.server import Service
from tests.conftest import SAMPLE_POLICY, make_settings
from tests.helpers import ask, fund, new_key
from tests.servers import RedisServer


@asynccontextmanager
async def reserved_then_redis_down(tmp_path: Path, request_id: str,
                                   failure_mode: str = "closed") -> AsyncIterator[tuple[Service, RedisServer, str]]:
    """A service on a Redis with AOF, acme funded with 1, `request_id` reserved and in SQL, then
    Redis stopped: (service, redis, acme's key)."""
    redis = RedisServer(appendonly=True)
    service = await Service.build(make_settings({"redis_url": redis.url,
                                                 "database_url": f"sqlite:///{tmp_path / 'p.db'}"},
                                                failure_mode=failure_mode))
    try:
        await service.start()
        await service.admin.apply_policy(SAMPLE_POLICY, "p.yaml")
        _, secret = await new_key(service)
        await fund(service, "acme", "1")
        assert (await service.engine.authorize(ask(secret, request_id=request_id))).decision == "allow"
        await service.writer.drain()
        redis.stop()
        yield service, redis, secret
    finally:
        await service.close()
        redis.close()


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_redis_down_fails_in_the_configured_mode(tmp_path: Path, mode: str) -> None:
    async with reserved_then_redis_down(tmp_path, "before", mode) as (service, redis, secret):
        during = await service.engine.authorize(ask(secret, request_id="during"))
        if mode == "closed":
            assert (during.decision, during.reason, during.http_status) == ("deny", "counters_unavailable", 503)
        else:
            assert (during.decision, during.reason, during.reserved) == ("allow", "counters_unavailable_fail_open", 0)
        unowned = await service.engine.authorize(ask("pdk_live_" + "N" * 40, request_id="during-unknown"))
        assert unowned.decision == "deny"
        row = service.store.usage_record("during")
        assert row is not None and row.reason == "counters_unavailable"
        assert row.status == ("denied" if mode == "closed" else "unmetered")
        assert service.store.usage_record("during-unknown").reason == "invalid_api_key"
        redis.start()  # AOF on: the counters come back as they were
        after = await service.engine.authorize(ask(secret, request_id="after"))
        assert after.decision == "allow"
        balance, reserved = await service.counters.wallet("acme")
        assert balance == 1_000_000_000 and reserved == 2 * after.reserved  # "before" and "after" held
        assert (await service.admin.audit()).ok


async def test_a_settle_made_while_redis_is_down_lands_when_it_is_back(tmp_path: Path) -> None:
    """A response was delivered, then Redis went away: its settle (made in the background, as ext_proc
    makes it) is made again until Redis is back, so the customer is still charged, exactly."""
    import asyncio
    import time

    from tests.helpers import usage

    async with reserved_then_redis_down(tmp_path, "delivered") as (service, redis, _):
        service.engine.close_in_background(lambda: service.engine.settle(usage("delivered")), "delivered")
        await asyncio.sleep(1.0)  # several attempts, each refused
        started = time.monotonic()
        await service.engine.finish_closings()  # an audit or a report does not wait out the outage
        assert time.monotonic() - started < 1.0
        assert service.store.usage_record("delivered").status == "reserved"
        redis.start()
        deadline = time.monotonic() + 20
        while service.store.usage_record("delivered").status == "reserved" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            await service.writer.drain()
        row = service.store.usage_record("delivered")
        assert row.status == "settled" and row.charge_nanos > 0
        balance, reserved = await service.counters.wallet("acme")
        assert (balance, reserved) == (1_000_000_000 - row.charge_nanos, 0)
        assert (await service.admin.audit()).ok
