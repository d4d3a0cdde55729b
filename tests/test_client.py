"""The typed Python client (sync and async) against a running policyd."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest

from policyd_client import AsyncPolicyClient, PolicyClient, PolicydCallError
from policyd_client.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from tests.conftest import ROOT
from tests.processes import PolicydProcess


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("client")
    process = PolicydProcess("", f"sqlite:///{tmp / 'p.db'}", policy=str(ROOT / "policyd/samples/policy.yaml"),
                             cwd=str(tmp))
    with grpc.insecure_channel(process.address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id="cl", source="purchase",
                                                       amount=types_pb2.Money(currency="USD", nanos=10**9)))
        key = admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="cl", plan="free", environment="production"))
    yield process, key.secret
    process.stop()


def test_sync_client_flow(served) -> None:
    process, secret = served
    with PolicyClient(process.address) as policy:
        d = policy.authorize(secret, "chat_completions", "gpt-4o-mini", request_id="c-1", prompt_bytes=100,
                             feature="chat", thread_id="t")
        assert d.allowed and d.max_output_tokens == 512 and d.reserved_nanos > 0
        assert (d.served_model, d.upstream_model) == ("gpt-4o-mini", "gpt-4o-mini")
        s = policy.settle("c-1", input_tokens=30, output_tokens=10)
        assert s.outcome == "settled" and s.charge_nanos > 0
        assert policy.settle("c-1", input_tokens=30, output_tokens=10).outcome == "exists"
        with pytest.raises(PolicydCallError) as refused:
            policy.settle("c-1", input_tokens=31, output_tokens=10)
        assert refused.value.reason == "exists_with_different_usage"
        with pytest.raises(PolicydCallError) as said_otherwise:  # what the provider said it charged travels (nanos)
            policy.settle("c-1", input_tokens=30, output_tokens=10, reported_cost=5)
        assert said_otherwise.value.reason == "exists_with_different_usage"
        assert policy.settle("c-1", input_tokens=30, output_tokens=10, reported_cost=None).outcome == "exists"
        # a router's web search travels: a model whose cost is not the router's to say refuses it
        for shape in ({"web_results": 5, "web_searches": 1}, {"web_results_per_search": 5}):
            searched = policy.authorize(secret, "chat_completions", "gpt-4o-mini", prompt_bytes=100, **shape)
            assert (searched.allowed, searched.reason) == (False, "tool_not_priced"), shape
        denied = policy.authorize(secret, "chat_completions", "gpt-4o")
        assert not denied.allowed and denied.http_status == 403
        assert json.loads(denied.error_body())["error"]["code"] == "model_not_allowed"
        with pytest.raises(ValueError):
            policy.authorize(secret, "telepathy", "gpt-4o")
        # a file an Azure OpenAI client uploads is made on the operator's Azure account
        made = policy.authorize(secret, "responses", "", request_id="c-file", creates="file", creates_at="azure")
        assert (made.allowed, made.reserved_nanos, made.route) == (True, 0, "azure")


async def test_async_client_flow(served) -> None:
    process, secret = served
    async with AsyncPolicyClient(process.address) as policy:
        d = await policy.authorize(secret, "chat_completions", "gpt-4o-mini", request_id="a-1", prompt_bytes=50)
        assert d.allowed
        three = await policy.authorize(secret, "chat_completions", "gpt-4o-mini", request_id="a-3", prompt_bytes=50,
                                       choices=3)  # n=3: the cap is reserved for each choice
        assert three.max_output_tokens == d.max_output_tokens and three.reserved_nanos > 2 * d.reserved_nanos
        assert await policy.release("a-3") == "released"
        assert await policy.release("a-1", "provider_error") == "released"
        assert await policy.release("a-1") == "already_released"
        with pytest.raises(PolicydCallError) as unknown:
            await policy.settle("nope", input_tokens=1)
        assert (unknown.value.code, unknown.value.reason) == (grpc.StatusCode.NOT_FOUND, "unknown_request")


async def test_a_key_is_described_over_the_native_api(served) -> None:
    """DescribeKey: what a key may still spend, for a proxy that answers GET /v1/key itself."""
    process, secret = served
    async with AsyncPolicyClient(process.address) as policy:
        before = await policy.describe_key(secret)
        assert (before.customer_id, before.plan, before.has_wallet, before.balance.currency) == ("cl", "free", True, "USD")
        (rpm,) = [limit for limit in before.limits if limit.name == "key-rpm"]  # the thread limit binds per request
        assert (rpm.scope, rpm.window, rpm.unit, rpm.limit) == ("key", "minute", "requests", 20)
        await policy.authorize(secret, "chat_completions", "gpt-4o-mini", request_id="described", prompt_bytes=50)
        after = await policy.describe_key(secret)
        assert [limit.used for limit in after.limits if limit.name == "key-rpm"] == [rpm.used + 1]
        assert after.reserved.nanos > before.reserved.nanos and rpm.resets_unix > 0
        await policy.release("described")
        with pytest.raises(PolicydCallError) as refused:
            await policy.describe_key("pdk_live_" + "Q" * 40)
        assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "invalid_api_key")
    with PolicyClient(process.address) as sync_policy:
        assert sync_policy.describe_key(secret).key_id == before.key_id


async def test_a_request_is_described_over_the_native_api(served) -> None:
    """DescribeRequest: one request of the key's customer, for a proxy that answers GET /v1/requests/{id} itself:
    in progress while held, waited for while its Settle lands, then exactly what Settle charged; a denial with
    its reason; another customer's request not found."""
    process, secret = served
    with grpc.insecure_channel(process.address) as channel:
        stranger = admin_pb2_grpc.AdminServiceStub(channel).CreateKey(admin_pb2.CreateKeyRequest(
            customer_id="cl-stranger", plan="free", environment="production")).secret
    async with AsyncPolicyClient(process.address) as policy:
        held = await policy.authorize(secret, "chat_completions", "gpt-4o-mini", request_id="asked-1", prompt_bytes=80,
                                      feature="f")
        running = await policy.describe_request(secret, "asked-1")
        assert (running.status, running.held.nanos, running.charge.nanos, running.has_balance) == (
            "in_progress", held.reserved_nanos, 0, False)
        started = time.monotonic()
        waiting = asyncio.create_task(policy.describe_request(secret, "asked-1", wait_ms=10_000))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # it waits for the request to close
        settled = await policy.settle("asked-1", input_tokens=30, output_tokens=10)
        asked = await waiting
        assert time.monotonic() - started < 5  # answered once the Settle landed, not at the end of its wait
        assert (asked.status, asked.charge.nanos, asked.has_balance, asked.balance_after.nanos) == (
            "settled", settled.charge_nanos, True, settled.balance_after_nanos)
        assert (asked.usage.input_tokens, asked.usage.output_tokens, asked.feature, asked.requested_model) == (
            30, 10, "f", "gpt-4o-mini")
        await policy.authorize(secret, "chat_completions", "gpt-4o-mini", request_id="asked-failed", prompt_bytes=80)
        await policy.release("asked-failed", "upstream_503")
        failed = await policy.describe_request(secret, "asked-failed", wait_ms=3000)
        assert (failed.status, failed.charge.nanos, failed.held.nanos > 0) == ("released", 0, True)
        assert not (await policy.authorize(secret, "chat_completions", "gpt-4o", request_id="asked-denied")).allowed
        refused = await policy.describe_request(secret, "asked-denied", wait_ms=3000)  # its record comes a moment after
        assert (refused.status, refused.decision, refused.reason, refused.charge.nanos) == (
            "denied", "deny", "model_not_allowed", 0)
        for api_key, request_id in ((stranger, "asked-1"), (secret, "never-made")):
            with pytest.raises(PolicydCallError) as unknown:
                await policy.describe_request(api_key, request_id)
            assert (unknown.value.code, unknown.value.reason) == (grpc.StatusCode.NOT_FOUND, "request_not_found")
    with PolicyClient(process.address) as sync_policy:
        assert sync_policy.describe_request(secret, "asked-1").charge.nanos == settled.charge_nanos
        # ListRequests: the customer's requests newest first, a page at a time, from their records
        listed = sync_policy.list_requests(secret, limit=2)
        assert [r.request_id for r in listed.requests] == ["asked-denied", "asked-failed"] and listed.has_more
        rest = sync_policy.list_requests(secret, after="asked-failed")
        assert [r.request_id for r in rest.requests][:1] == ["asked-1"]
        assert rest.requests[0].charge.nanos == settled.charge_nanos
        for api_key, after, code, reason in ((stranger, "asked-1", grpc.StatusCode.NOT_FOUND, "request_not_found"),
                                             (secret, "x" * 300, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request")):
            with pytest.raises(PolicydCallError) as refused:
                sync_policy.list_requests(api_key, after=after)
            assert (refused.value.code, refused.value.reason) == (code, reason)
    async with AsyncPolicyClient(process.address) as policy:
        assert [r.request_id for r in (await policy.list_requests(secret, limit=1)).requests] == ["asked-denied"]
        # SummarizeUsage: the customer's usage summed as asked, the settled charge in it, never the operator's cost
        summed = await policy.usage_summary(secret, group_by=["model", "decision"])
        mini = {tuple(sorted(g.group.items())): g for g in summed.groups}[(("decision", "allow"),
                                                                           ("model", "gpt-4o-mini"))]
        assert mini.charge.nanos >= settled.charge_nanos and mini.requests >= 2 and summed.currency == "USD"
        with pytest.raises(PolicydCallError) as refused:
            await policy.usage_summary(secret, group_by=["provider"])
        assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request")
        # by the days of a time zone asked for: the same requests, their day as it is there
        by_day = await policy.usage_summary(secret, bucket="day", timezone="Pacific/Kiritimati")
        today = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 14 * 3600))
        assert {g.bucket for g in by_day.groups} == {today} and sum(g.requests for g in by_day.groups) >= 2
        with pytest.raises(PolicydCallError) as refused:
            await policy.usage_summary(secret, bucket="day", timezone="Mars/Olympus_Mons")
        assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request")


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    from tests.servers import free_port

    with PolicyClient(f"127.0.0.1:{free_port()}", deadline_seconds=0.5, retries=1) as policy:
        with pytest.raises(PolicydCallError) as error:
            policy.settle("x", input_tokens=1)
        assert error.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
