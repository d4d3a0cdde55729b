"""Background responses followed to their end (policyd/background.py), on both backends: asked for by one
replica at a time, and never released free when they cannot be asked for. The gateway's side, through the
real Envoy with the openai SDK, is in tests/test_gateway.py."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from dataclasses import replace
from typing import Iterator

import pytest

from policyd import metrics, redis_keys
from policyd.background import BackgroundResponses
from policyd.domain import Decision
from policyd.mock_provider import MockProvider
from policyd.providers import Account, ProviderPool
from policyd.server import Service
from tests.helpers import ask, counters_lost_and_rebuilt, fund, grpc_channel, new_key, usage

PROVIDER_KEY = "sk-mock-background"


def queued_at(provider: MockProvider, polls: int) -> dict:
    """A background response made at the provider, as the gateway's request made it: its queued reply."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{provider.port}/v1/responses", method="POST",
        data=json.dumps({"model": "gpt-4o-mini", "input": "a long piece of research", "background": True}).encode(),
        headers={"authorization": f"Bearer {PROVIDER_KEY}", "content-type": "application/json",
                 "x-mock-background-polls": str(polls)})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.loads(reply.read())


def pool(base_url: str) -> ProviderPool:
    return ProviderPool([Account("openai-bg", "openai", "openai", "bearer", PROVIDER_KEY, base_url=base_url)])


@pytest.fixture
def provider() -> Iterator[MockProvider]:
    mock = MockProvider(api_keys=(PROVIDER_KEY,)).start()
    yield mock
    mock.stop()


async def funded_key_on_a_clock(service: Service) -> tuple[str, str, list[int]]:
    """A funded key of acme (its id, its secret), and the engine on a clock the test moves."""
    key_id, secret = await new_key(service)
    await fund(service, "acme", "5")
    clock = [service.engine.clock()]
    service.engine.clock = lambda: clock[0]
    return key_id, secret, clock


async def background_request(service: Service, secret: str, request_id: str) -> Decision:
    """A Responses API request as the gateway authorizes it (sent on to the provider: its deadline charges it)."""
    return await service.engine.authorize(replace(ask(secret, endpoint="responses", request_id=request_id),
                                                  charge_held_on_expiry=True))


async def test_one_replica_asks_at_a_time_and_the_end_is_charged_once(service: Service,
                                                                       provider: MockProvider) -> None:
    """Two replicas asking at once: each background response is asked for by one of them a turn, and
    charged once, exactly what the provider reports at its end."""
    _, secret, clock = await funded_key_on_a_clock(service)
    replicas = [BackgroundResponses(service.engine, pool(f"http://127.0.0.1:{provider.port}/v1"), 3600, 1.0)
                for _ in range(2)]
    made = []
    for i in range(3):
        assert (await background_request(service, secret, f"bg-{i}")).decision == "allow"
        made.append(queued_at(provider, polls=2))
        await replicas[0].poll_later(f"bg-{i}", made[-1]["id"], "openai-bg")
    held = await service.counters.wallet("acme")
    assert held[1] > 0
    def polls(outcome: str) -> float:
        return metrics.REGISTRY.get_sample_value("policyd_background_polls_total", {"outcome": outcome}) or 0

    before = {outcome: polls(outcome) for outcome in ("running", "ended")}
    ended = 0
    for _ in range(5):
        clock[0] += 1000
        ended += sum(await asyncio.gather(*(r.poll_due() for r in replicas)))
    assert ended == 3
    assert (polls("running") - before["running"], polls("ended") - before["ended"]) == (6, 3)
    await service.writer.drain()
    for i, queued in enumerate(made):
        asked = [r for r in provider.received() if r["path"] == f"/v1/responses/{queued['id']}"]
        assert len(asked) == 3  # in progress twice, then ended: once a turn, whichever replica's turn
        record = service.store.usage_record(f"bg-{i}")
        usage = provider.stored[queued["id"]][0]["usage"]
        assert (record.status, record.input_tokens, record.output_tokens) == \
            ("settled", usage["input_tokens"], usage["output_tokens"])
        assert record.provider_response_id == queued["id"]
    balance, reserved = await service.counters.wallet("acme")
    assert reserved == 0 and balance == held[0] - sum(
        service.store.usage_record(f"bg-{i}").charge_nanos for i in range(3))
    assert await service.counters.client.zcard(redis_keys.background_polls(0)) == 0
    assert (await service.admin.audit()).ok


async def test_a_background_response_that_cannot_be_asked_for_is_charged_as_held(service: Service,
                                                                                   provider: MockProvider) -> None:
    """An account without a base_url (or a response the provider no longer knows): what it used cannot be
    learnt, and the provider bills it. Its hold stays past the request's own deadline, then it is charged as
    held, never released free."""
    _, secret, clock = await funded_key_on_a_clock(service)
    unreachable = BackgroundResponses(service.engine, pool(""), 3600, 1.0)
    gone = BackgroundResponses(service.engine, pool(f"http://127.0.0.1:{provider.port}/v1"), 3600, 1.0)
    for request_id, background in (("gone", gone), ("no-base-url", unreachable)):
        decision = await background_request(service, secret, request_id)
        await background.poll_later(request_id, "resp_unknown" if request_id == "gone" else
                                    queued_at(provider, 2)["id"], "openai-bg")
        clock[0] += 1000
        # the one gone is done with (charged as held); the other is not asked for (nowhere to ask): held
        assert await background.poll_due() == (1 if request_id == "gone" else 0)
    await service.writer.drain()
    assert service.store.usage_record("gone").error_class == "usage_estimated:background_gone"
    assert service.store.usage_record("gone").charge_nanos == decision.reserved > 0  # as held
    assert service.store.usage_record("no-base-url").status == "reserved"
    clock[0] += 2 * service.engine.reservation_ttl_ms  # past the request's own deadline: still held
    await service.engine.expire_due()
    assert (await service.counters.wallet("acme"))[1] == decision.reserved
    clock[0] += 3600 * 1000  # past the background deadline: charged as held
    await service.engine.expire_due()
    await service.writer.drain()
    record = service.store.usage_record("no-base-url")
    assert (record.status, record.error_class) == ("settled", "usage_estimated:end_unseen")
    assert record.charge_nanos == decision.reserved
    assert (await service.counters.wallet("acme"))[1] == 0
    assert (await service.admin.audit()).ok


async def test_a_background_response_is_asked_for_on_after_redis_lost_its_data(service: Service,
                                                                                provider: MockProvider) -> None:
    """Redis lost its data while a background response ran: the counters rebuilt from SQL ask the provider for
    it on, hold it as long, and charge it exactly at its end (not as held at the request's own deadline); its
    key's concurrency slot, given back when its reply ended, stays given back. One a native caller settles
    itself (AwaitResponse on its own account) is held as long too."""
    key_id, secret, clock = await funded_key_on_a_clock(service)
    background = BackgroundResponses(service.engine, pool(f"http://127.0.0.1:{provider.port}/v1"), 3600, 1.0)
    service.engine.background = background
    await background_request(service, secret, "across")
    queued = queued_at(provider, polls=1)
    await background.poll_later("across", queued["id"], "openai-bg")
    await background_request(service, secret, "callers")
    assert (await background.await_response("callers", "resp_callers", ""))[1] is False
    await service.writer.drain()
    wallet = await service.counters.wallet("acme")
    await counters_lost_and_rebuilt(service)
    service.counters.forget("across")
    service.counters.forget("callers")
    assert await service.counters.wallet("acme") == wallet  # the holds restored
    partition = service.counters.partition_of("acme")
    assert int(await service.counters.client.get(redis_keys.inflight(partition, key_id)) or 0) == 0
    clock[0] += 2 * service.engine.reservation_ttl_ms + 1  # past the request's own deadline, and one more TTL
    await service.engine.expire_due()
    assert (await service.counters.wallet("acme"))[1] == wallet[1]  # still held: they run on at the provider
    for _ in range(3):
        clock[0] += 1000
        await background.poll_due()
    assert (await service.engine.settle(usage("callers", 300, 40))).outcome == "settled"  # in time, by its caller
    await service.writer.drain()
    record = service.store.usage_record("across")
    used = provider.stored[queued["id"]][0]["usage"]
    assert (record.status, record.error_class, record.input_tokens, record.output_tokens) == \
        ("settled", "", used["input_tokens"], used["output_tokens"])
    assert (await service.counters.wallet("acme"))[1] == 0
    assert (await service.admin.audit()).ok


async def test_a_background_response_its_customer_deletes_is_asked_for_first(service: Service,
                                                                             provider: MockProvider) -> None:
    """A client that reads its background response once it ended and deletes it at once (before policyd's next
    turn to ask for it) left it to be found gone, and charged as held. Its deletion has it asked for first:
    charged exactly what it used."""
    _, secret, clock = await funded_key_on_a_clock(service)
    background = BackgroundResponses(service.engine, pool(f"http://127.0.0.1:{provider.port}/v1"), 3600, 1.0)
    service.engine.background = background
    await background_request(service, secret, "deleted")
    queued = queued_at(provider, polls=0)  # ended at once
    await background.poll_later("deleted", queued["id"], "openai-bg")
    deletion = replace(ask(secret, endpoint="responses", request_id="delete-it"), model="",
                       stored_response=queued["id"], deletes_stored=True)
    assert (await service.engine.authorize(deletion)).decision == "allow"
    usage = provider.stored.pop(queued["id"])[0]["usage"]  # the provider deletes it
    clock[0] += 1000
    assert await background.poll_due() == 0  # nothing left to ask for
    await service.writer.drain()
    record = service.store.usage_record("deleted")
    assert (record.status, record.error_class, record.input_tokens, record.output_tokens) == \
        ("settled", "", usage["input_tokens"], usage["output_tokens"])
    assert (await service.counters.wallet("acme"))[1] == 0


async def test_a_native_caller_has_a_background_responses_hold_kept(service: Service, provider: MockProvider) -> None:
    """Over the native API (AwaitResponse): the hold of a request whose background response has not ended is
    kept past its deadline; policyd follows it to its end on an account of its providers file with a base_url,
    else the caller settles it when it ends, charged as any settle (not late)."""
    import grpc

    from policyd_client.v1 import policy_pb2, policy_pb2_grpc, types_pb2

    _, secret, clock = await funded_key_on_a_clock(service)
    background = BackgroundResponses(service.engine, pool(f"http://127.0.0.1:{provider.port}/v1"), 3600, 1.0)
    service.engine.background = background
    async with grpc_channel(service) as channel:
        policy = policy_pb2_grpc.PolicyServiceStub(channel)

        async def authorize(request_id: str) -> None:
            d = await policy.Authorize(policy_pb2.AuthorizeRequest(
                api_key=secret, endpoint=types_pb2.RESPONSES, model="gpt-4o-mini",
                attribution=types_pb2.Attribution(request_id=request_id),
                shape=policy_pb2.RequestShape(prompt_bytes=400, max_output_tokens=100)))
            assert d.decision == policy_pb2.ALLOW

        await authorize("followed")
        queued = queued_at(provider, polls=1)
        kept = await policy.AwaitResponse(policy_pb2.AwaitResponseRequest(
            request_id="followed", provider_response_id=queued["id"], provider_account="openai-bg"))
        assert kept.followed and kept.held_until_unix_ms == clock[0] + 3600 * 1000
        await authorize("own")
        kept = await policy.AwaitResponse(policy_pb2.AwaitResponseRequest(
            request_id="own", provider_response_id="resp_elsewhere"))  # the caller's own account
        assert not kept.followed
        clock[0] += 2 * service.engine.reservation_ttl_ms + 1  # past their own deadlines: still held
        await service.engine.expire_due()
        for _ in range(3):
            clock[0] += 1000
            await background.poll_due()
        settled = await policy.Settle(policy_pb2.SettleRequest(
            request_id="own", usage=policy_pb2.Usage(input_tokens=100, output_tokens=40)))
        assert settled.outcome == policy_pb2.SETTLED  # in time: its hold was still standing
        for request, code, reason in (
                (policy_pb2.AwaitResponseRequest(request_id="own", provider_response_id="r"),
                 grpc.StatusCode.INVALID_ARGUMENT, "already_settled"),
                (policy_pb2.AwaitResponseRequest(request_id="nobody", provider_response_id="r"),
                 grpc.StatusCode.NOT_FOUND, "unknown_request"),
                (policy_pb2.AwaitResponseRequest(request_id="own"), grpc.StatusCode.INVALID_ARGUMENT,
                 "invalid_request")):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await policy.AwaitResponse(request)
            assert refused.value.code() == code
            assert dict(refused.value.trailing_metadata())["policyd-reason"] == reason
    await service.writer.drain()
    record = service.store.usage_record("followed")
    usage = provider.stored[queued["id"]][0]["usage"]
    assert (record.status, record.input_tokens, record.output_tokens) == \
        ("settled", usage["input_tokens"], usage["output_tokens"])
    assert service.store.usage_record("own").status == "settled"
    assert (await service.counters.wallet("acme"))[1] == 0
    assert (await service.admin.audit()).ok


async def test_a_process_without_the_account_leaves_the_asking_to_one_with_it(service: Service,
                                                                              provider: MockProvider) -> None:
    """A `policyd writer` runs the background loops too, often without the provider accounts: one that claimed a
    turn it cannot take (the account is not its own) leaves the response to the next turn, where a process
    with the account asks for it; a process with no base_url at all does not ask for any."""
    _, secret, clock = await funded_key_on_a_clock(service)
    follower = BackgroundResponses(service.engine, pool(f"http://127.0.0.1:{provider.port}/v1"), 3600, 1.0)
    writer = BackgroundResponses(service.engine, ProviderPool([]), 3600, 1.0)
    assert follower.pool.follows_any() and not writer.pool.follows_any()  # Service.start runs the loop or not
    await background_request(service, secret, "claimed")
    queued = queued_at(provider, polls=0)
    await follower.poll_later("claimed", queued["id"], "openai-bg")
    clock[0] += 1000
    assert await writer.poll_due() == 0  # its turn, not its account: left for the next
    clock[0] += 1000
    assert await follower.poll_due() == 1
    await service.writer.drain()
    assert service.store.usage_record("claimed").status == "settled"
