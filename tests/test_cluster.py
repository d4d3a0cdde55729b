"""policyd on a real Redis Cluster (3 masters + 3 replicas): every script touches one slot, the
writer reads every partition, audit and rebuild see every node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from policyd.server import Service
from tests.conftest import SAMPLE_POLICY, make_settings
from tests.helpers import ask, fund, new_key, usage
from tests.servers import RedisCluster


@pytest.fixture(scope="module")
def cluster():
    c = RedisCluster()
    yield c
    c.close()


async def test_the_whole_flow_on_a_cluster(cluster: RedisCluster, tmp_path: Path) -> None:
    service = await Service.build(make_settings({"redis_url": cluster.url,
                                                 "database_url": f"sqlite:///{tmp_path / 'p.db'}"}, partitions=8))
    try:
        await service.start()
        await service.admin.apply_policy(SAMPLE_POLICY.replace("concurrency: 32", "concurrency: 0"), "p.yaml")
        customers = [f"c{i}" for i in range(12)]  # spread over every partition, so every master
        secrets = {}
        for c in customers:
            _, secrets[c] = await new_key(service, customer=c)
            await fund(service, c, "1")
        results = await asyncio.gather(*(service.engine.authorize(ask(secrets[c], request_id=f"{c}-{i}", thread_id="t"))
                                         for c in customers for i in range(5)))
        assert all(d.decision == "allow" for d in results)
        for c in customers:
            for i in range(4):
                await service.engine.settle(usage(f"{c}-{i}"))
            await service.engine.release(f"{c}-4", "provider_error")
        held_elsewhere = next(c for c in customers  # c0's request id, named by a customer of another partition
                              if service.counters.partition_of(c) != service.counters.partition_of("c0"))
        refused = await service.engine.authorize(ask(secrets[held_elsewhere], request_id="c0-0"))
        assert (refused.decision, refused.reason) == ("deny", "invalid_request")
        key_id, secret = await new_key(service, customer="c0")
        await service.admin.set_state(key_id, "paused")
        assert (await service.engine.authorize(ask(secret))).reason == "key_paused"
        for c in customers:  # each customer's thread limit reset, in its own partition's slot
            _, (reset,) = await service.admin.reset_limits(c, thread_id="t")
            assert (reset.limit.label, reset.forgiven > 0, reset.used) == ("thread-hour", True, 0)
        audit = await service.admin.audit()
        assert audit.ok, audit.mismatches
        assert len(service.store.ledger_balances()) == len(customers)
        before = {c: await service.counters.wallet(c) for c in customers}
        slots = {service.counters.client.keyslot(f"pd:{{p{p}}}:x") for p in range(8)}
        assert len(slots) == 8  # eight partitions, eight slots, spread over the masters
        await service.writer.drain()  # the closed requests in SQL before the loss
        await service.counters.client.flushall(target_nodes="primaries")
        await service.admin.rebuild()
        assert {c: await service.counters.wallet(c) for c in customers} == before
        assert (await service.admin.audit()).ok
        assert await service.admin.restored() == len(customers) * 5
        for c in customers:  # the closed requests too, each partition's in its own slot: retries answered
            service.counters.forget(f"{c}-0")
            assert (await service.engine.settle(usage(f"{c}-0"))).outcome == "exists"
            assert (await service.engine.release(f"{c}-4", "provider_error")).outcome == "already_released"
        assert {c: await service.counters.wallet(c) for c in customers} == before
    finally:
        await service.close()


async def test_a_policy_with_caps_is_refused_on_a_cluster(cluster: RedisCluster, tmp_path: Path) -> None:
    """A cap is one counter beside every partition's: a cluster cannot change it in one step with a
    customer's, so the policy is refused, with the reason, and the one in force stays."""
    from policyd.domain import PolicydError

    service = await Service.build(make_settings({"redis_url": cluster.url,
                                                 "database_url": f"sqlite:///{tmp_path / 'p.db'}"}, partitions=8))
    try:
        await service.start()
        first = await service.admin.apply_policy(SAMPLE_POLICY, "p.yaml")
        capped = SAMPLE_POLICY + '\ncaps:\n  - {name: all-day, window: day, unit: cost, limit: "100.00"}\n'
        with pytest.raises(PolicydError) as refused:
            await service.admin.apply_policy(capped, "capped.yaml")
        assert refused.value.reason == "invalid_policy" and "Redis Cluster" in refused.value.message
        assert service.admin.book.current.version == first.version
    finally:
        await service.close()
