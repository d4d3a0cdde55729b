"""Redis losing its data while policyd runs (restarted without persistence, flushed, a key evicted): no
decision is made on the empty counters, where a month's budget would start over and a wallet read as
empty; the replica that finds them lost rebuilds them from SQL, and decisions resume where they were."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from policyd import redis_keys
from policyd.server import Service
from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2
from tests.conftest import ROOT
from tests.helpers import ask, fund, funded_key, usage
from tests.processes import PolicydProcess
from tests.servers import RedisServer

MONTH_REQUESTS = [{"window": "month", "unit": "requests", "limit": 5}]


async def _no_rebuild() -> int:
    raise AssertionError("rebuilt")


async def _open(service: Service) -> None:
    deadline = time.monotonic() + 30
    while await service.counters.gates() != [redis_keys.GATE_OPEN] * service.counters.partitions:
        assert time.monotonic() < deadline, await service.counters.gates()
        await asyncio.sleep(0.05)


async def test_counters_lost_while_serving_are_rebuilt_before_the_next_decision(service: Service) -> None:
    created = await service.admin.create_key(label="t", customer_id="acme", environment="production", plan="pro",
                                             limits=MONTH_REQUESTS)
    secret = created.secret
    await fund(service, "acme", "1")
    for i in range(4):
        assert (await service.engine.authorize(ask(secret, request_id=f"before-{i}"))).decision == "allow"
        await service.engine.settle(usage(f"before-{i}"))
    await service.admin.catch_up()  # in SQL, as a writer keeps it
    before = await service.counters.wallet("acme")

    from policyd import metrics

    rebuilt = metrics.counter_rebuilds.labels("lost", "done")._value.get()
    await service.counters.client.flushall()  # Redis restarted without its data
    during = await service.engine.authorize(ask(secret, request_id="during"))
    assert (during.decision, during.reason, during.http_status) == ("deny", "counters_unavailable", 503)
    await _open(service)  # this replica rebuilt them from SQL, unasked
    await service._recovery
    assert metrics.counter_rebuilds.labels("lost", "done")._value.get() == rebuilt + 1  # an operator sees it
    assert await service.counters.wallet("acme") == before
    assert (await service.engine.authorize(ask(secret, request_id="fifth"))).decision == "allow"
    sixth = await service.engine.authorize(ask(secret, request_id="sixth"))
    assert sixth.decision == "deny" and sixth.reason != "counters_unavailable"  # the four before the loss count
    await service.engine.settle(usage("fifth"))
    assert (await service.admin.audit()).ok


async def test_a_rebuild_that_fails_leaves_the_gates_closed_and_is_tried_again(service: Service,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Counters half-written are never decided on: the gates open only when a rewrite is whole."""
    _, secret = (lambda c: (c.row.id, c.secret))(await service.admin.create_key(
        label="t", customer_id="acme", environment="production", plan="pro"))
    await fund(service, "acme", "1")
    await service.admin.catch_up()
    rewrite = service.admin._rewrite

    async def failing() -> int:
        await rewrite()  # every counter written, then the rebuild dies before it is done
        raise ConnectionError("SQL went away")

    monkeypatch.setattr(service.admin, "_rewrite", failing)
    await service.counters.client.flushall()
    with pytest.raises(ConnectionError):
        await service.admin.rebuild()
    broken = [redis_keys.GATE_BROKEN] * service.counters.partitions
    assert await service.counters.gates() == broken
    # broken, not gone: a replica starting does not take the counters for an older policyd's, whole as they are
    await service.counters.client.set(redis_keys.POLICY_VERSION, "1")
    service.admin.rebuild, rebuild = (lambda: _no_rebuild()), service.admin.rebuild
    with pytest.raises(AssertionError, match="rebuilt"):
        await service.admin.recover(starting=True)
    service.admin.rebuild = rebuild
    assert await service.counters.client.exists(redis_keys.REBUILD_LOCK) == 0
    refused = await service.engine.authorize(ask(secret, request_id="half"))
    assert refused.reason == "counters_unavailable"
    assert service._recovery is not None
    await service._recovery  # tried at once, and failed the same way
    assert await service.counters.gates() == broken
    monkeypatch.setattr(service.admin, "_rewrite", rewrite)
    service._next_recovery_seconds = 0.0  # the next try is due
    assert (await service.engine.authorize(ask(secret, request_id="retry"))).reason == "counters_unavailable"
    await _open(service)
    assert (await service.engine.authorize(ask(secret, request_id="after"))).decision == "allow"


async def test_one_rebuild_at_a_time(service: Service) -> None:
    await service.counters.client.set(redis_keys.REBUILD_LOCK, "1")  # another replica is at it
    from policyd.domain import PolicydError

    with pytest.raises(PolicydError) as running:
        await service.admin.rebuild()
    assert running.value.reason == "rebuild_running"
    await service.counters.client.flushall()
    await service.counters.client.set(redis_keys.REBUILD_LOCK, "1")
    assert await service.admin.recover() is None  # left to the one rebuilding
    await service.counters.client.delete(redis_keys.REBUILD_LOCK)
    assert await service.admin.recover() is not None
    assert await service.admin.recover() is None  # whole again: nothing to do


async def test_an_owners_limit_binds_as_before_once_its_counters_are_rebuilt(service: Service) -> None:
    """A customer's own limit (SetOwnerLimits) counts its keys' requests in the customer's bucket: rebuilt from the
    records after a loss, it binds its keys together where it did."""
    secrets = [(await service.admin.create_key(label="t", customer_id="owned", environment="production",
                                               plan="pro")).secret for _ in range(2)]
    await fund(service, "owned", "1")
    await service.admin.set_owner_limits(MONTH_REQUESTS, "owned")
    for i in range(4):
        assert (await service.engine.authorize(ask(secrets[i % 2], request_id=f"owned-{i}"))).decision == "allow"
        await service.engine.settle(usage(f"owned-{i}"))
    await service.admin.catch_up()
    await service.counters.client.flushall()
    assert (await service.engine.authorize(ask(secrets[0], request_id="owned-during"))).reason == "counters_unavailable"
    await _open(service)
    await service._recovery
    assert (await service.engine.authorize(ask(secrets[1], request_id="owned-fifth"))).decision == "allow"
    sixth = await service.engine.authorize(ask(secrets[0], request_id="owned-sixth"))
    assert (sixth.decision, sixth.reason, sixth.message.endswith("(customer-requests-month)")) == \
        ("deny", "rate_limit_exceeded", True)
    await service.engine.settle(usage("owned-fifth"))
    assert (await service.admin.audit()).ok


@pytest.mark.slow
def test_a_redis_restarted_without_its_data_under_a_running_policyd(postgres_server) -> None:
    """The real thing: redis-server stopped and started again on its port with nothing saved, under a
    `policyd serve` on PostgreSQL. The first decisions after it are refused, none allowed on the empty
    counters; then the key's month of requests and the wallet are as they were."""
    redis = RedisServer()
    serve = PolicydProcess(redis.url, postgres_server.create_database("counters_lost"),
                           policy=str(ROOT / "policyd/samples/policy.yaml"))
    try:
        with grpc.insecure_channel(serve.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            policy = policy_pb2_grpc.PolicyServiceStub(channel)
            created = funded_key(admin, "lost")
            admin.SetKeyLimits(admin_pb2.SetKeyLimitsRequest(id=created.key.id, limits=[admin_pb2.KeyLimit(
                window="month", unit="requests", limit=5)]))

            def authorize(request_id: str) -> policy_pb2.AuthorizeResponse:
                return policy.Authorize(policy_pb2.AuthorizeRequest(
                    api_key=created.secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini",
                    attribution=types_pb2.Attribution(request_id=request_id),
                    shape=policy_pb2.RequestShape(prompt_bytes=400, max_output_tokens=50)))

            for i in range(4):
                assert authorize(f"before-{i}").decision == policy_pb2.ALLOW
                policy.Settle(policy_pb2.SettleRequest(request_id=f"before-{i}", usage=policy_pb2.Usage(
                    input_tokens=100, output_tokens=20)))
            assert len(admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="lost", limit=10)).records) == 4
            balance = admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="lost")).balance_nanos

            redis.stop()
            redis.start()  # the same port, nothing saved
            outcomes = []
            deadline = time.monotonic() + 30
            while True:
                try:
                    d = authorize(f"after-{len(outcomes)}")
                except grpc.RpcError as error:
                    outcomes.append(error.code().name)
                else:
                    outcomes.append("allow" if d.decision == policy_pb2.ALLOW else d.reason)
                    if d.decision == policy_pb2.ALLOW:
                        break
                assert time.monotonic() < deadline, outcomes[-5:]
                time.sleep(0.1)
            assert set(outcomes[:-1]) <= {"counters_unavailable", "UNAVAILABLE"} and outcomes[0] != "allow"
            fifth = f"after-{len(outcomes) - 1}"
            sixth = authorize("sixth")
            assert sixth.decision == policy_pb2.DENY and sixth.reason != "counters_unavailable"
            policy.Settle(policy_pb2.SettleRequest(request_id=fifth, usage=policy_pb2.Usage(
                input_tokens=100, output_tokens=20)))
            wallet = admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="lost"))
            assert 0 < wallet.balance_nanos < balance  # the balance before the loss, less the fifth's charge
            while True:  # the requests closed before the loss are written back once decisions run: answered
                try:
                    retried = policy.Settle(policy_pb2.SettleRequest(request_id="before-0", usage=policy_pb2.Usage(
                        input_tokens=100, output_tokens=20)))
                    break
                except grpc.RpcError as error:
                    assert error.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline
                    time.sleep(0.1)
            assert retried.outcome == policy_pb2.EXISTS
            assert admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="lost")).balance_nanos == wallet.balance_nanos
            assert admin.Audit(admin_pb2.AuditRequest()).ok
    finally:
        serve.stop()
        redis.close()


async def test_a_redis_that_evicts_keys_is_named_at_start(caplog: pytest.LogCaptureFixture) -> None:
    """An evicted counter starts again from nothing (a budget overshot): such a Redis is said loudly."""
    import redis.asyncio as aioredis

    from policyd.counters import Counters
    from policyd.server import _warn_of_eviction

    redis = RedisServer()
    client = aioredis.Redis.from_url(redis.url)
    counters = Counters(client, 1)
    try:
        await _warn_of_eviction(counters)
        assert "evicts keys" not in caplog.text  # no maxmemory: nothing is evicted
        await client.config_set("maxmemory", "100mb")
        await client.config_set("maxmemory-policy", "noeviction")
        await _warn_of_eviction(counters)
        assert "evicts keys" not in caplog.text
        await client.config_set("maxmemory-policy", "volatile-lru")  # a quota's window counter has a TTL
        await _warn_of_eviction(counters)
        assert "evicts keys when full (maxmemory-policy volatile-lru)" in caplog.text
    finally:
        await counters.aclose()
        redis.close()


async def test_counters_from_before_the_gates_are_opened_as_they_are_at_start(service: Service,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade: Redis holds the counters an older policyd kept (its policy version among them), with no
    gates. A replica of this version starting opens them as they are: a rebuild would rewrite the counters
    under the older replicas still deciding, which no gate holds back. Once running, gates gone are a loss."""
    _, secret = (lambda c: (c.row.id, c.secret))(await service.admin.create_key(
        label="t", customer_id="acme", environment="production", plan="pro"))
    await fund(service, "acme", "1")
    held = await service.engine.authorize(ask(secret, request_id="in-flight"))
    for partition in range(service.counters.partitions):
        await service.counters.client.delete(redis_keys.gate(partition))

    async def no_rebuild() -> int:
        raise AssertionError("rebuilt")

    monkeypatch.setattr(service.admin, "rebuild", no_rebuild)
    assert await service.admin.recover(starting=True) is None
    assert await service.counters.gates() == [redis_keys.GATE_OPEN] * service.counters.partitions
    assert await service.counters.wallet("acme") == (10**9, held.reserved)  # the hold kept, not rewritten
    assert (await service.engine.settle(usage("in-flight"))).outcome == "settled"
