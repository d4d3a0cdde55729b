"""policyd as separate processes sharing one real Redis and one PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import grpc
import pytest
import redis

from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2
from tests.conftest import ROOT
from tests.processes import PolicydProcess

SAMPLE = str(ROOT / "policyd" / "samples" / "policy.yaml")


@pytest.fixture
def shared(redis_server, postgres_server) -> dict[str, str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return {"redis_url": redis_server.url, "database_url": postgres_server.create_database("p_" + secrets.token_hex(6))}


def _request(secret: str, request_id: str) -> policy_pb2.AuthorizeRequest:
    return policy_pb2.AuthorizeRequest(
        api_key=secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini",
        attribution=types_pb2.Attribution(request_id=request_id),
        shape=policy_pb2.RequestShape(prompt_bytes=2000, message_count=1, max_output_tokens=200))


async def _setup(address: str, customer: str, no_concurrency_cap: bool = True) -> tuple[str, int]:
    """A key and the reservation one _request makes (measured on a scratch customer, then released)."""
    async with grpc.aio.insecure_channel(address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        if no_concurrency_cap:
            text = Path(SAMPLE).read_text().replace("concurrency: 32", "concurrency: 0")
            await admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml=text, source_name="nocap.yaml"))
        key = await admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id=customer, plan="pro", environment="production"))
        scratch = await admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="scratch", plan="pro", environment="production"))
        await admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id="scratch", source="purchase",
                                                             amount=types_pb2.Money(currency="USD", nanos=10**12)))
        policy = policy_pb2_grpc.PolicyServiceStub(channel)
        probe = await policy.Authorize(_request(scratch.secret, "probe"))
        await policy.Release(policy_pb2.ReleaseRequest(request_id="probe"))
        return key.secret, probe.reserved.nanos


async def _wait_for_version(channel: grpc.aio.Channel, version: int) -> None:
    """A replica picks up a policy another applied within its refresh interval (500 ms by default)."""
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    for _ in range(100):
        if (await admin.GetPolicy(admin_pb2.GetPolicyRequest())).version >= version:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"policy version {version} never reached the replica")


@pytest.mark.slow
async def test_two_processes_never_overspend_one_wallet(shared: dict[str, str]) -> None:
    a = PolicydProcess(shared["redis_url"], shared["database_url"], policy=SAMPLE)
    b = PolicydProcess(shared["redis_url"], shared["database_url"], policy=SAMPLE)
    try:
        secret, one = await _setup(a.address, "acme")
        affordable = 53
        async with grpc.aio.insecure_channel(a.address) as ca, grpc.aio.insecure_channel(b.address) as cb:
            await admin_pb2_grpc.AdminServiceStub(ca).GrantCredit(admin_pb2.GrantCreditRequest(
                customer_id="acme", source="purchase",
                amount=types_pb2.Money(currency="USD", nanos=one * affordable + one - 1)))
            await _wait_for_version(cb, 2)
            stubs = [policy_pb2_grpc.PolicyServiceStub(ca), policy_pb2_grpc.PolicyServiceStub(cb)]
            results = await asyncio.gather(*(stubs[i % 2].Authorize(_request(secret, f"two-{i}")) for i in range(240)))
            allowed = [r for r in results if r.decision == policy_pb2.ALLOW]
            assert len(allowed) == affordable
            assert {r.reason for r in results if r.decision == policy_pb2.DENY} == {"insufficient_quota"}
            # settled on the other replica than the one that authorized
            for i, r in enumerate(results):
                if r.decision == policy_pb2.ALLOW:
                    await stubs[(i + 1) % 2].Settle(policy_pb2.SettleRequest(
                        request_id=r.request_id, usage=policy_pb2.Usage(input_tokens=300, output_tokens=100)))
            wallet = await admin_pb2_grpc.AdminServiceStub(cb).GetWallet(admin_pb2.GetWalletRequest(customer_id="acme"))
            assert wallet.reserved_nanos == 0 and wallet.balance_nanos >= 0
            audit = await admin_pb2_grpc.AdminServiceStub(cb).Audit(admin_pb2.AuditRequest())
            assert audit.ok, audit
    finally:
        a.stop()
        b.stop()


@pytest.mark.slow
async def test_killed_replica_loses_nothing(shared: dict[str, str]) -> None:
    """SIGKILL a replica mid-load: its unsettled reservations expire, a Settle on another replica works,
    and SQL ends with every decision exactly once."""
    env = {"POLICYD_RESERVATION_TTL_SECONDS": "2"}
    a = PolicydProcess(shared["redis_url"], shared["database_url"], policy=SAMPLE, extra_env=env)
    b = PolicydProcess(shared["redis_url"], shared["database_url"], extra_env=env)
    try:
        secret, _ = await _setup(a.address, "acme")
        async with grpc.aio.insecure_channel(a.address) as ca:
            await admin_pb2_grpc.AdminServiceStub(ca).GrantCredit(admin_pb2.GrantCreditRequest(
                customer_id="acme", source="purchase", amount=types_pb2.Money(currency="USD", nanos=10**10)))
            policy_a = policy_pb2_grpc.PolicyServiceStub(ca)
            decided = [await policy_a.Authorize(_request(secret, f"k-{i}")) for i in range(60)]
        a.kill()
        async with grpc.aio.insecure_channel(b.address) as cb:
            await _wait_for_version(cb, 2)
            policy_b = policy_pb2_grpc.PolicyServiceStub(cb)
            settled = await policy_b.Settle(policy_pb2.SettleRequest(
                request_id="k-0", usage=policy_pb2.Usage(input_tokens=300, output_tokens=100)))
            assert settled.outcome == policy_pb2.SETTLED
            await asyncio.sleep(3)  # past the 2 s deadline: the sweeper of b voids the rest
            admin = admin_pb2_grpc.AdminServiceStub(cb)
            wallet = await admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="acme"))
            assert wallet.reserved_nanos == 0
            audit = await admin.Audit(admin_pb2.AuditRequest())
            assert audit.ok, audit
        from sqlalchemy import create_engine, text

        engine = create_engine(shared["database_url"])
        with engine.connect() as connection:
            rows = dict(connection.execute(text(
                "select status, count(*) from usage_records where request_id like 'k-%' group by status")).all())
        engine.dispose()
        assert sum(rows.values()) == len(decided) == 60
        assert rows == {"settled": 1, "expired": 59}
    finally:
        a.stop()
        b.stop()
