"""Redis unavailable: decisions fail closed (or open, when configured), are still recorded, and
the service recovers when Redis is back."""

from __future__ import annotations

from pathlib import Path

import pytest

from policyd.server import Service
from tests.conftest import SAMPLE_POLICY, make_settings
from tests.helpers import ask, fund, new_key
from tests.servers import RedisServer


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_redis_down_fails_in_the_configured_mode(tmp_path: Path, mode: str) -> None:
    redis = RedisServer(appendonly=True)
    service = await Service.build(make_settings({"redis_url": redis.url,
                                                 "database_url": f"sqlite:///{tmp_path / 'p.db'}"},
                                                failure_mode=mode))
    try:
        await service.start()
        await service.admin.apply_policy(SAMPLE_POLICY, "p.yaml")
        _, secret = await new_key(service)
        await fund(service, "acme", "1")
        assert (await service.engine.authorize(ask(secret, request_id="before"))).decision == "allow"
        await service.writer.drain()
        redis.stop()
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
    finally:
        await service.close()
        redis.close()
