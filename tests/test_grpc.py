"""The gRPC surface: a real server in this process, health, reflection, admin token, error statuses."""

from __future__ import annotations

from typing import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from policyd.server import Service, make_grpc_server
from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2
from tests.conftest import SAMPLE_POLICY, make_settings
from tests.helpers import grpc_channel

TOKEN = "admin-secret-for-tests"


@pytest.fixture
async def channel(backend: dict[str, str]) -> AsyncIterator[grpc.aio.Channel]:
    service = await Service.build(make_settings(backend, admin_token=TOKEN))
    await service.start()
    server, health_servicer = make_grpc_server(service)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(grace=1)
    await service.close()


AUTH = (("authorization", f"Bearer {TOKEN}"),)


async def test_health_and_reflection(channel: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for response in stub.ServerReflectionInfo(ask()):
        names |= {s.name for s in response.list_services_response.service}
    assert {"policyd.v1.PolicyService", "policyd.v1.AdminService", "grpc.health.v1.Health"} <= names


async def test_admin_requires_the_token(channel: grpc.aio.Channel) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml=SAMPLE_POLICY))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError):
        await admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml=SAMPLE_POLICY), metadata=(("authorization", "Bearer nope"),))


async def test_full_flow_over_grpc(channel: grpc.aio.Channel) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    applied = await admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml=SAMPLE_POLICY, source_name="s.yaml"), metadata=AUTH)
    assert applied.version == 1 and applied.changed
    await admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id="acme", source="purchase",
                                                         amount=types_pb2.Money(currency="USD", nanos=2_000_000_000)),
                            metadata=AUTH)
    created = await admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="acme", plan="pro", environment="production",
                                                               label="k"), metadata=AUTH)
    assert created.secret.startswith("pdk_live_") and len(created.secret) == 49
    listed = await admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=AUTH)
    assert created.secret not in str(listed) and listed.keys[0].prefix == created.secret[:12]

    decision = await policy.Authorize(policy_pb2.AuthorizeRequest(
        api_key=created.secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o",
        attribution=types_pb2.Attribution(request_id="g1", feature="chat", tags={"team": "search"}),
        shape=policy_pb2.RequestShape(prompt_bytes=400, message_count=2, max_output_tokens=100)))
    assert decision.decision == policy_pb2.ALLOW
    assert (decision.served_model, decision.upstream_model) == ("gpt-4o", "gpt-4o")  # the provider's name too
    assert decision.output_cap_field == "max_completion_tokens"
    assert decision.owner.customer_id == "acme" and decision.policy_version == 1
    assert decision.reserved.currency == "USD" and decision.reserved.nanos > 0
    settled = await policy.Settle(policy_pb2.SettleRequest(request_id="g1", usage=policy_pb2.Usage(
        input_tokens=120, output_tokens=80, image_input_tokens=20)))  # gpt-4o prices image input as input
    assert settled.outcome == policy_pb2.SETTLED
    assert settled.balance_after.nanos == 2_000_000_000 - settled.charge.nanos
    wallet = await admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="acme"), metadata=AUTH)
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (settled.balance_after.nanos, 0)

    review = await admin.ReviewKey(admin_pb2.GetKeyRequest(id=created.key.id), metadata=AUTH)
    rpm = next(b for b in review.buckets if b.label == "key-rpm")
    assert (rpm.scope, rpm.unit, rpm.used, rpm.limit, list(rpm.thresholds), rpm.action) == (
        "key", "requests", 1, 600, [50, 80], "block")
    assert review.spend_today_nanos == settled.charge.nanos and created.secret not in str(review)
    await admin.PauseKey(admin_pb2.KeyActionRequest(id=created.key.id), metadata=AUTH)
    paused = await policy.Authorize(policy_pb2.AuthorizeRequest(api_key=created.secret,
                                                                endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o"))
    assert (paused.decision, paused.reason, paused.http_status) == (policy_pb2.DENY, "key_paused", 403)
    assert (paused.error.type, paused.error.code) == ("permission_error", "key_paused")
    audit = await admin.Audit(admin_pb2.AuditRequest(), metadata=AUTH)
    assert audit.ok and audit.counters_checked > 0
    (record,) = [r for r in (await admin.ListUsage(admin_pb2.ListUsageRequest(), metadata=AUTH)).records
                 if r.request_id == "g1"]
    assert (record.input_tokens, record.image_input_tokens, record.charge.nanos) == (120, 20, settled.charge.nanos)


async def test_errors_carry_status_and_machine_reason(channel: grpc.aio.Channel) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as bad_policy:
        await admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml="plans: [", source_name="broken.yaml"), metadata=AUTH)
    assert bad_policy.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "broken.yaml:1" in bad_policy.value.details()
    assert dict(bad_policy.value.trailing_metadata())["policyd-reason"] == "invalid_policy"
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await policy.Settle(policy_pb2.SettleRequest(request_id="nope", usage=policy_pb2.Usage(input_tokens=1)))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(unknown.value.trailing_metadata())["policyd-reason"] == "unknown_request"
    with pytest.raises(grpc.aio.AioRpcError) as no_key:
        await admin.GetKey(admin_pb2.GetKeyRequest(id="key_missing"), metadata=AUTH)
    assert no_key.value.code() == grpc.StatusCode.NOT_FOUND
    unknown_endpoint = await policy.Authorize(policy_pb2.AuthorizeRequest(api_key="x", model="gpt-4o"))
    assert (unknown_endpoint.decision, unknown_endpoint.reason) == (policy_pb2.DENY, "unknown_endpoint")
    for request in (admin_pb2.CreateKeyRequest(customer_id="acme", plan="pro", environment="production", label="l" * 257),
                    admin_pb2.CreateKeyRequest(customer_id="c" * 129, plan="pro", environment="production"),
                    admin_pb2.CreateKeyRequest(customer_id="acme", plan="pro", environment="production",
                                               scopes=[f"s{i}" for i in range(100)])):
        with pytest.raises(grpc.aio.AioRpcError) as too_long:  # limits on what admins send, too
            await admin.CreateKey(request, metadata=AUTH)
        assert too_long.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


async def test_every_admin_call_needs_the_token(channel: grpc.aio.Channel) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    service = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
    for method in service.methods:
        request_class = getattr(admin_pb2, method.input_type.name)
        call = getattr(admin, method.name)
        for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call(request_class(), metadata=metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED, method.name


async def funded_key(admin: admin_pb2_grpc.AdminServiceStub, customer: str, policy_yaml: str) -> str:
    """The policy applied; a pro key of `customer`, funded with 1 USD: its secret."""
    await admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml=policy_yaml), metadata=AUTH)
    await admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id=customer, source="purchase",
                                                         amount=types_pb2.Money(currency="USD", nanos=10**9)),
                            metadata=AUTH)
    created = await admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id=customer, plan="pro",
                                                               environment="production"), metadata=AUTH)
    return created.secret


async def test_a_native_proxy_settles_a_client_gone_as_held(channel: grpc.aio.Channel) -> None:
    """A proxy whose client left before the reply began settles with usage_estimated and output_as_held: the
    output held (the cap of every choice) and an images request's images are charged, as the provider bills."""
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    priced = SAMPLE_POLICY.replace("    gpt-image-1:\n", '    whisper-1: {provider: openai, tier: low-cost, per_second: "0.0001"}\n'
                                                      "    gpt-image-1:\n", 1)
    secret = await funded_key(admin, "held", priced)
    for request_id, endpoint, model, shape in (
            ("held-1", types_pb2.CHAT_COMPLETIONS, "gpt-4o-mini", policy_pb2.RequestShape(prompt_bytes=40,
                                                                                         max_output_tokens=300)),
            ("held-2", types_pb2.IMAGES, "gpt-image-1", policy_pb2.RequestShape(prompt_bytes=40, image_count=2)),
            ("held-3", types_pb2.AUDIO_TRANSCRIPTIONS, "whisper-1", policy_pb2.RequestShape(seconds=30))):
        held = await policy.Authorize(policy_pb2.AuthorizeRequest(
            api_key=secret, endpoint=endpoint, model=model, attribution=types_pb2.Attribution(request_id=request_id),
            shape=shape))
        assert held.decision == policy_pb2.ALLOW, held.reason
        settled = await policy.Settle(policy_pb2.SettleRequest(
            request_id=request_id, usage_estimated=True, output_as_held=True, stream_interrupted=True,
            error_class="usage_estimated:client_gone"))
        assert settled.charge.nanos == held.reserved.nanos > 0, request_id  # gpt-image-1 here: per image alone
    usage = await admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="held", limit=10), metadata=AUTH)
    records = {r.request_id: r for r in usage.records}
    assert (records["held-1"].output_tokens, records["held-2"].images, records["held-3"].seconds) == (300, 2, 30)


async def test_trace_context_problems_and_estimated_settlement(channel: grpc.aio.Channel) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    secret = await funded_key(admin, "tr", SAMPLE_POLICY)
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ask = policy_pb2.AuthorizeRequest(api_key=secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o",
                                      attribution=types_pb2.Attribution(request_id="tr-1"),
                                      shape=policy_pb2.RequestShape(prompt_bytes=400, max_output_tokens=100))
    assert (await policy.Authorize(ask, metadata=(("traceparent", trace),))).decision == policy_pb2.ALLOW

    # usage unknown: input as estimated at Authorize, output as delivered, marked
    settled = await policy.Settle(policy_pb2.SettleRequest(
        request_id="tr-1", usage=policy_pb2.Usage(output_tokens=500), usage_estimated=True, stream_interrupted=True,
        error_class="usage_estimated:stream_cut"))
    assert settled.outcome == policy_pb2.SETTLED and settled.charge.nanos > 0

    # a request the proxy could not use: denied, recorded, nothing reserved
    refused = await policy.Authorize(policy_pb2.AuthorizeRequest(
        api_key=secret, endpoint=types_pb2.CHAT_COMPLETIONS, attribution=types_pb2.Attribution(request_id="tr-2"),
        problem=types_pb2.OpenAIError(code="request_too_large", message="too big")))
    assert (refused.decision, refused.reason, refused.http_status) == (policy_pb2.DENY, "request_too_large", 413)
    smuggled = await policy.Authorize(policy_pb2.AuthorizeRequest(
        api_key=secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o",
        problem=types_pb2.OpenAIError(code="budget_exceeded", message="not a proxy problem")))
    assert (smuggled.decision, smuggled.reason) == (policy_pb2.DENY, "invalid_request")

    usage = await admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="tr", limit=10), metadata=AUTH)
    (first,) = [r for r in usage.records if r.request_id == "tr-1"]
    assert (first.traceparent, first.trace_id) == (trace, "0af7651916cd43dd8448eb211c80319c")
    assert first.output_tokens == 100  # at most the reserved cap
    assert first.stream_interrupted and first.error_class == "usage_estimated:stream_cut"
    assert (first.choices, first.web_searches, first.service_tier) == (1, 0, "")
    wallet = await admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="tr"), metadata=AUTH)
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (10**9 - settled.charge.nanos, 0)

    # what a usage record says of its parts travels back through ListUsage
    ask = policy_pb2.AuthorizeRequest(api_key=secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o",
                                      attribution=types_pb2.Attribution(request_id="tr-3"),
                                      shape=policy_pb2.RequestShape(prompt_bytes=400, max_output_tokens=100, choices=2))
    assert (await policy.Authorize(ask)).decision == policy_pb2.ALLOW
    await policy.Settle(policy_pb2.SettleRequest(request_id="tr-3", service_tier="priority", usage=policy_pb2.Usage(
        input_tokens=100, output_tokens=20, cache_write_input_tokens=8, cache_write_1h_input_tokens=4,
        audio_input_tokens=10, audio_output_tokens=5, web_searches=1)))
    usage = await admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="tr", limit=10), metadata=AUTH)
    (parts,) = [r for r in usage.records if r.request_id == "tr-3"]
    assert (parts.choices, parts.web_searches, parts.service_tier, parts.cache_write_input_tokens,
            parts.cache_write_1h_input_tokens, parts.audio_input_tokens, parts.audio_output_tokens) == (
        2, 1, "priority", 8, 4, 10, 5)

    # the image_generation tool: its image model and bound in, its usage out, whole or estimated
    for request_id in ("tr-4", "tr-5"):
        drawn = await policy.Authorize(policy_pb2.AuthorizeRequest(
            api_key=secret, endpoint=types_pb2.RESPONSES, model="gpt-4o", attribution=types_pb2.Attribution(
                request_id=request_id), shape=policy_pb2.RequestShape(prompt_bytes=40, image_model="gpt-image-1")))
        assert (drawn.decision, drawn.max_tool_calls) == (policy_pb2.ALLOW, 10)
    await policy.Settle(policy_pb2.SettleRequest(request_id="tr-4", usage=policy_pb2.Usage(
        input_tokens=10, output_tokens=5, image_generation_calls=1, image_generation_input_tokens=40,
        image_generation_cached_input_tokens=8, image_generation_image_input_tokens=12,
        image_generation_output_tokens=272)))
    await policy.Settle(policy_pb2.SettleRequest(request_id="tr-5", usage_estimated=True, stream_interrupted=True,
                                                 usage=policy_pb2.Usage(output_tokens=3, image_generation_calls=1)))
    usage = await admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="tr", limit=10), metadata=AUTH)
    tool = {r.request_id: r for r in usage.records}
    assert (tool["tr-4"].image_model, tool["tr-4"].image_generation_calls, tool["tr-4"].image_generation_input_tokens,
            tool["tr-4"].image_generation_cached_input_tokens, tool["tr-4"].image_generation_image_input_tokens,
            tool["tr-4"].image_generation_output_tokens) == ("gpt-image-1", 1, 40, 8, 12, 272)
    assert (tool["tr-5"].image_generation_calls, tool["tr-5"].status) == (1, "settled")
    assert tool["tr-5"].image_generation_output_tokens > 0  # an image made, charged at the model's most


@pytest.mark.parametrize("fault, code, reason", [
    (RuntimeError("INSERT INTO usage_records ... " + "x" * 40_000), grpc.StatusCode.INTERNAL, "internal"),
    (__import__("redis").exceptions.ConnectionError("Redis went away"), grpc.StatusCode.UNAVAILABLE, "unavailable"),
])
async def test_unexpected_errors_are_logged_and_answered_briefly(tmp_path, caplog, fault, code, reason) -> None:
    """An error policyd did not expect (SQL text, data, a long message) stays in its log: the caller gets
    a short status it can read (a 40 KB message would pass gRPC's metadata limit: the client would see
    RESOURCE_EXHAUSTED, not the error) and the machine reason."""
    service = await Service.build(make_settings({"redis_url": "", "database_url": f"sqlite:///{tmp_path}/g.db"},
                                                admin_token=TOKEN))
    await service.start()

    async def failing_audit():
        raise fault

    service.admin.audit = failing_audit
    try:
        async with grpc_channel(service) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await admin_pb2_grpc.AdminServiceStub(ch).Audit(admin_pb2.AuditRequest(), metadata=AUTH)
    finally:
        await service.close()
    assert error.value.code() == code
    assert error.value.details() == f"{reason}: {type(fault).__name__} (the details are in policyd's log)"
    assert dict(error.value.trailing_metadata())["policyd-reason"] == reason
    assert any(r.exc_info and r.exc_info[1] is fault for r in caplog.records)


async def test_hosted_tools_over_the_native_api(channel: grpc.aio.Channel) -> None:
    """RequestShape.containers (its memory "1g" when the caller names none) and maps_grounding: held at the
    model's prices; a denial with its reason where the model prices none; Usage.containers charged."""
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    priced = SAMPLE_POLICY.replace('      output: "10.00"', '      output: "10.00"\n      per_container: {1g: "0.03"}', 1)
    secret = await funded_key(admin, "ht", priced)

    async def ask(request_id: str, **shape: object) -> policy_pb2.AuthorizeResponse:
        return await policy.Authorize(policy_pb2.AuthorizeRequest(
            api_key=secret, endpoint=types_pb2.RESPONSES, model="gpt-4o",
            attribution=types_pb2.Attribution(request_id=request_id),
            shape=policy_pb2.RequestShape(prompt_bytes=40, max_output_tokens=10, **shape)))

    plain, computing = await ask("ht-1"), await ask("ht-2", containers=1)
    assert computing.decision == policy_pb2.ALLOW
    assert computing.reserved.nanos - plain.reserved.nanos == 30_000_000 * 12 // 10  # a 1g container, marked up
    for request_id, shape in (("ht-3", {"containers": 1, "container_memory": "64g"}), ("ht-4", {"maps_grounding": True})):
        refused = await ask(request_id, **shape)
        assert (refused.decision, refused.reason, refused.error.param) == (policy_pb2.DENY, "tool_not_priced", "tools")
    settled = await policy.Settle(policy_pb2.SettleRequest(request_id="ht-2", usage=policy_pb2.Usage(
        input_tokens=10, output_tokens=5, containers=1)))
    usage = await admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="ht", limit=10), metadata=AUTH)
    (record,) = [r for r in usage.records if r.request_id == "ht-2"]
    assert (record.containers, record.container_memory, record.charge.nanos) == (1, "1g", settled.charge.nanos)


def test_charge_held_on_expiry_and_the_call_token_travel_from_the_client_to_the_decision() -> None:
    """A proxy of one's own asks that a reservation it could not close be charged at its deadline
    (AuthorizeRequest.charge_held_on_expiry); unasked, it is released there."""
    from policyd.servicers import authorize_input
    from policyd_client.client import _authorize_request

    asked = _authorize_request("pdk_x", "chat_completions", "gpt-4o-mini", "r-1", 10, 1, 5, False,
                               charge_held_on_expiry=True, call_token="t-1", output_cap_param="max_tokens")
    unasked = _authorize_request("pdk_x", "chat_completions", "gpt-4o-mini", "r-2", 10, 1, 5, False)
    assert (authorize_input(asked).shape.output_cap_param, authorize_input(unasked).shape.output_cap_param) == (
        "max_tokens", "")  # the field a refusal of its cost names (the ASGI middleware sends every shape field)
    assert (asked.charge_held_on_expiry, unasked.charge_held_on_expiry) == (True, False)
    assert authorize_input(asked).charge_held_on_expiry and not authorize_input(unasked).charge_held_on_expiry
    assert (authorize_input(asked).call_token, authorize_input(unasked).call_token) == ("t-1", "")


async def test_a_rerank_over_the_native_api(channel: grpc.aio.Channel) -> None:
    """RERANK: a model priced per search unit is held at the most its documents may be (RequestShape.documents,
    document_bytes, document_tokens_max, chunks of half the model's context), charged Usage.search_units,
    and, reported none, the fewest its documents bill; recorded in UsageRecord.search_units."""
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    priced = SAMPLE_POLICY.replace("  models:\n", "  models:\n    rerank-v3.5:\n      provider: cohere\n"
                                   "      tier: low-cost\n      per_search_unit: \"0.002\"\n"
                                   "      context_window: 4096\n", 1)
    secret = await funded_key(admin, "rr", priced)

    async def ask(request_id: str, documents: int, document_bytes: int, tokens_max: int = 0) -> policy_pb2.AuthorizeResponse:
        return await policy.Authorize(policy_pb2.AuthorizeRequest(
            api_key=secret, endpoint=types_pb2.RERANK, model="rerank-v3.5",
            attribution=types_pb2.Attribution(request_id=request_id),
            shape=policy_pb2.RequestShape(prompt_bytes=document_bytes, message_count=documents, documents=documents,
                                          document_bytes=document_bytes, document_tokens_max=tokens_max)))

    unit, held = 2_000_000, 2_000_000 * 12 // 10  # a search unit's cost, and its charge on plan pro (20% markup)
    short, long, capped = await ask("rr-1", 100, 2_000), await ask("rr-2", 100, 2_000 + 400_000), \
        await ask("rr-3", 100, 2_000 + 400_000, tokens_max=4000)
    assert (short.decision, short.max_output_tokens) == (policy_pb2.ALLOW, 0)
    assert short.reserved.nanos == held  # 100 documents of a chunk each: one search unit
    # chunks of at least 2,040 tokens (half the context, less 8 of the chunk's own): 100 + 402,000 // 2,040 = 297
    assert long.reserved.nanos == 3 * held
    assert capped.reserved.nanos == 2 * held  # each read up to 4,000 tokens: 2 chunks apiece, 200
    charged = await policy.Settle(policy_pb2.SettleRequest(request_id="rr-2", usage=policy_pb2.Usage(search_units=2)))
    uncounted = await policy.Settle(policy_pb2.SettleRequest(request_id="rr-3", usage=policy_pb2.Usage()))
    assert (charged.cost.nanos, uncounted.cost.nanos) == (2 * unit, unit)
    # its client gone before the reply began: the provider ranks them all the same, charged as held
    gone = await ask("rr-4", 100, 2_000 + 400_000)
    left = await policy.Settle(policy_pb2.SettleRequest(request_id="rr-4", usage=policy_pb2.Usage(),
                                                        usage_estimated=True, output_as_held=True))
    assert (left.cost.nanos, left.charge.nanos) == (3 * unit, gone.reserved.nanos)
    usage = await admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="rr", limit=10), metadata=AUTH)
    units = {r.request_id: r.search_units for r in usage.records}
    assert (units["rr-2"], units["rr-3"], units["rr-4"]) == (2, 1, 3)


async def test_a_search_context_fee_and_reasoning_billed_apart_over_the_native_api(channel: grpc.aio.Channel) -> None:
    """Perplexity's Sonar bills each request a fee by its search's context size (per_search_context): held at
    the size asked (RequestShape.search_context_size; the table's default when none, its dearest for one it does
    not price), charged at the size the reply reports (Usage.search_context_size), else as asked. Sonar Deep
    Research bills its reasoning beside its output at a price of its own (Usage.reasoning_output_tokens, part of
    output_tokens) and searches it is held for (searches_held). Both recorded in UsageRecord."""
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    priced = SAMPLE_POLICY.replace("  models:\n", "  models:\n"
                                   "    sonar:\n      provider: perplexity\n      tier: low-cost\n"
                                   "      input: \"1.00\"\n      output: \"1.00\"\n"
                                   "      per_search_context: {low: \"0.005\", medium: \"0.008\", high: \"0.012\"}\n"
                                   "      search_context_default: low\n"
                                   "    sonar-deep-research:\n      provider: perplexity\n      tier: low-cost\n"
                                   "      input: \"2.00\"\n      output: \"8.00\"\n      reasoning_output: \"3.00\"\n"
                                   "      per_web_search: \"0.005\"\n      searches_held: 30\n", 1)
    secret = await funded_key(admin, "px", priced)

    async def ask(request_id: str, model: str = "sonar", size: str = "") -> policy_pb2.AuthorizeResponse:
        return await policy.Authorize(policy_pb2.AuthorizeRequest(
            api_key=secret, endpoint=types_pb2.CHAT_COMPLETIONS, model=model,
            attribution=types_pb2.Attribution(request_id=request_id),
            shape=policy_pb2.RequestShape(input_tokens=1_000, max_output_tokens=1_000, search_context_size=size)))

    markup = 12  # plan pro's charge: the cost and 20%
    tokens = 2 * 1_000 * 1_000  # 1,000 tokens in and out at $1.00 per million, in nanos
    fees = {"low": 5_000_000, "medium": 8_000_000, "high": 12_000_000}
    held = {size or "default": (await ask(f"px-{size or 'default'}", size=size)).reserved.nanos
            for size in ("", "medium", "HIGH", "ultra")}
    assert held == {"default": (tokens + fees["low"]) * markup // 10, "medium": (tokens + fees["medium"]) * markup // 10,
                    "HIGH": (tokens + fees["high"]) * markup // 10, "ultra": (tokens + fees["high"]) * markup // 10}
    reported = await policy.Settle(policy_pb2.SettleRequest(request_id="px-medium", usage=policy_pb2.Usage(
        input_tokens=100, output_tokens=50, search_context_size="low")))
    as_asked = await policy.Settle(policy_pb2.SettleRequest(request_id="px-HIGH", usage=policy_pb2.Usage(
        input_tokens=100, output_tokens=50)))
    as_default = await policy.Settle(policy_pb2.SettleRequest(request_id="px-default", usage=policy_pb2.Usage(
        input_tokens=100, output_tokens=50)))
    assert (reported.cost.nanos, as_asked.cost.nanos, as_default.cost.nanos) == (
        150_000 + fees["low"], 150_000 + fees["high"], 150_000 + fees["low"])

    deep = await ask("px-deep", model="sonar-deep-research")
    # 1,000 in at $2, 1,000 out at $8 and as much reasoning at $3, 30 searches at $0.005
    assert deep.reserved.nanos == (2_000_000 + 8_000_000 + 3_000_000 + 30 * 5_000_000) * markup // 10
    settled = await policy.Settle(policy_pb2.SettleRequest(request_id="px-deep", usage=policy_pb2.Usage(
        input_tokens=400, output_tokens=1_050, reasoning_output_tokens=1_000, web_searches=7)))
    assert settled.cost.nanos == 400 * 2_000 + 50 * 8_000 + 1_000 * 3_000 + 7 * 5_000_000
    too_much = policy.Settle(policy_pb2.SettleRequest(request_id="px-ultra", usage=policy_pb2.Usage(
        output_tokens=10, reasoning_output_tokens=11)))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await too_much
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    usage = await admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="px", limit=10), metadata=AUTH)
    records = {r.request_id: r for r in usage.records}
    assert [records[r].search_context_size for r in ("px-medium", "px-HIGH", "px-default", "px-deep")] == \
        ["low", "high", "low", ""]
    assert (records["px-deep"].reasoning_output_tokens, records["px-deep"].web_searches) == (1_000, 7)


async def test_an_explicit_cache_made_and_kept_longer_over_the_native_api(channel: grpc.aio.Channel) -> None:
    """Gemini's explicit caches (endpoint CACHED_CONTENTS): one made is held at its input's tokens written and kept
    for the seconds it is asked to live (RequestShape.seconds), charged its tokens (Usage.input_tokens) and the
    token-seconds its reply says it lives (Usage.cache_storage_token_seconds; as asked when it gives none). Its time
    to live made longer names the cache (previous_response_id) and no model: the cache's, held at its tokens for
    the seconds asked, charged the time past what was charged before, no tokens written again; another customer's
    cache, or one policyd never made, is not found."""
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    priced = SAMPLE_POLICY.replace("  models:\n", "  models:\n"  # 1 nano a token-second: $3.60 per 1M token-hours
                                   "    gemini-cache:\n      provider: google\n      tier: low-cost\n"
                                   "      input: \"1.00\"\n      output: \"4.00\"\n      cache_storage: \"3.60\"\n"
                                   "    gemini-cache-written:\n      provider: google\n      tier: low-cost\n"
                                   "      input: \"1.00\"\n      cache_write_input: \"0.25\"\n"
                                   "      cache_storage: \"3.60\"\n", 1)
    secret = await funded_key(admin, "cacher", priced)
    other = await funded_key(admin, "cacher-other", priced)

    async def ask(request_id: str, seconds: int, model: str = "gemini-cache", cache: str = "",
                  key: str = secret) -> policy_pb2.AuthorizeResponse:
        return await policy.Authorize(policy_pb2.AuthorizeRequest(
            api_key=key, endpoint=types_pb2.CACHED_CONTENTS, model=model, previous_response_id=cache,
            attribution=types_pb2.Attribution(request_id=request_id),
            shape=policy_pb2.RequestShape(input_tokens=1_000 if not cache else 0, seconds=seconds)))

    markup = 12  # plan pro's charge: the cost and 20%
    made = await ask("cache-made", 600)
    assert (made.decision, made.reserved.nanos) == (policy_pb2.ALLOW, (1_000 * 1_000 + 1_000 * 600) * markup // 10)
    settled = await policy.Settle(policy_pb2.SettleRequest(
        request_id="cache-made", provider_response_id="cachedContents/c-9",
        usage=policy_pb2.Usage(input_tokens=1_000, cache_storage_token_seconds=1_000 * 601)))
    assert settled.cost.nanos == 1_000 * 1_000 + 1_000 * 601
    untimed = await ask("cache-untimed", 300)
    assert untimed.decision == policy_pb2.ALLOW
    settled = await policy.Settle(policy_pb2.SettleRequest(request_id="cache-untimed",
                                                           usage=policy_pb2.Usage(input_tokens=500)))
    assert settled.cost.nanos == 500 * 1_000 + 500 * 300  # its reply gave no times: kept as long as asked
    written = await ask("cache-written", 60, model="gemini-cache-written")  # its tokens written at the write price
    assert written.reserved.nanos == (1_000 * 250 + 1_000 * 60) * markup // 10
    settled = await policy.Settle(policy_pb2.SettleRequest(request_id="cache-written", usage=policy_pb2.Usage(
        input_tokens=800, cache_storage_token_seconds=800 * 60)))
    assert settled.cost.nanos == 800 * 250 + 800 * 60

    longer = await ask("cache-longer", 1_200, model="", cache="cachedContents/c-9")
    assert (longer.decision, longer.served_model, longer.reserved.nanos) == (
        policy_pb2.ALLOW, "gemini-cache", 1_000 * 1_200 * markup // 10)
    settled = await policy.Settle(policy_pb2.SettleRequest(
        request_id="cache-longer", provider_response_id="cachedContents/c-9",
        usage=policy_pb2.Usage(input_tokens=1_000, cache_storage_token_seconds=1_000 * 1_500)))
    assert settled.cost.nanos == 1_000 * (1_500 - 601)  # the time added alone; its tokens were written before
    again = await ask("cache-again", 60, model="", cache="cachedContents/c-9")
    settled = await policy.Settle(policy_pb2.SettleRequest(
        request_id="cache-again",
        usage=policy_pb2.Usage(input_tokens=1_000, cache_storage_token_seconds=1_000 * 1_400)))
    assert (again.decision, settled.cost.nanos) == (policy_pb2.ALLOW, 0)  # shortened: no time added
    for cache, key in (("cachedContents/c-9", other), ("cachedContents/never-made", secret)):
        refused = await ask(f"cache-refused-{key[-4:]}", 60, model="", cache=cache, key=key)
        assert (refused.decision, refused.reason) == (policy_pb2.DENY, "cached_content_not_found"), cache
    usage = await admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="cacher", limit=10), metadata=AUTH)
    records = {r.request_id: r for r in usage.records}
    assert [(records[r].input_tokens, records[r].cache_storage_token_seconds) for r in
            ("cache-made", "cache-untimed", "cache-longer", "cache-again")] == [
        (1_000, 601_000), (500, 150_000), (0, 899_000), (0, 0)]
    assert records["cache-longer"].endpoint == "cached_contents"


@pytest.mark.parametrize("shared", [False, True])
async def test_a_second_server_on_a_policyd_address_is_refused_unless_it_is_shared(tmp_path, shared: bool) -> None:
    """gRPC lets servers share an address (SO_REUSEPORT) by default: a second `policyd serve` started on the
    address of a running one would take some of its connections, unseen. policyd's servers do not share it (a
    second one exits naming it), unless told to (POLICYD_LISTEN_SHARED, as the workers are)."""
    from policyd.server import _listen
    from tests.servers import free_port

    settings = make_settings({"redis_url": "", "database_url": f"sqlite:///{tmp_path / 'p.db'}"},
                             listen_shared=shared)
    service = await Service.build(settings)
    await service.start()
    address = f"127.0.0.1:{free_port()}"
    first, _ = make_grpc_server(service)
    _listen(first, address, settings, "")
    await first.start()
    second, _ = make_grpc_server(service)
    try:
        if shared:
            _listen(second, address, settings, "")
            await second.start()
        else:
            with pytest.raises(SystemExit, match=f"cannot listen on {address}: the address is taken"):
                _listen(second, address, settings, "")
    finally:
        await second.stop(grace=0)
        await first.stop(grace=0)
        await service.close()


async def test_a_native_proxy_settles_what_the_provider_said_it_charged(channel: grpc.aio.Channel) -> None:
    """Usage.reported_cost (OpenRouter's usage.cost): the cost of a model priced reported_cost, in the request's
    currency; in another, refused (invalid_usage) with nothing moved."""
    import yaml

    admin = admin_pb2_grpc.AdminServiceStub(channel)
    policy = policy_pb2_grpc.PolicyServiceStub(channel)
    document = yaml.safe_load(SAMPLE_POLICY)
    document["price_table"]["models"]["router/open-model"] = {"provider": "openrouter", "tier": "low-cost",
                                                              "input": "2.00", "output": "8.00", "reported_cost": True}
    await admin.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml=yaml.safe_dump(document), source_name="r.yaml"),
                            metadata=AUTH)
    await admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id="acme", source="purchase",
                                                         amount=types_pb2.Money(currency="USD", nanos=10**9)),
                            metadata=AUTH)
    created = await admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="acme", plan="pro", environment="production",
                                                               label="k"), metadata=AUTH)
    for rid in ("rc-1", "rc-2"):
        await policy.Authorize(policy_pb2.AuthorizeRequest(
            api_key=created.secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="router/open-model",
            attribution=types_pb2.Attribution(request_id=rid), shape=policy_pb2.RequestShape(input_tokens=100,
                                                                                          max_output_tokens=10)))
    settled = await policy.Settle(policy_pb2.SettleRequest(request_id="rc-1", usage=policy_pb2.Usage(
        input_tokens=100, output_tokens=10, reported_cost=types_pb2.Money(currency="USD", nanos=4_321))))
    assert (settled.cost.nanos, settled.charge.nanos) == (4_321, -(-4_321 * 12_000 // 10_000))
    with pytest.raises(grpc.aio.AioRpcError) as other_currency:
        await policy.Settle(policy_pb2.SettleRequest(request_id="rc-2", usage=policy_pb2.Usage(
            input_tokens=100, output_tokens=10, reported_cost=types_pb2.Money(currency="EUR", nanos=4_321))))
    assert other_currency.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(other_currency.value.trailing_metadata())["policyd-reason"] == "invalid_usage"
    with pytest.raises(grpc.aio.AioRpcError) as estimated_other:  # so too for a settle of estimated usage
        await policy.Settle(policy_pb2.SettleRequest(request_id="rc-2", usage_estimated=True, usage=policy_pb2.Usage(
            output_tokens=10, reported_cost=types_pb2.Money(currency="EUR", nanos=4_321))))
    assert dict(estimated_other.value.trailing_metadata())["policyd-reason"] == "invalid_usage"
    wallet = await admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="acme"), metadata=AUTH)
    assert wallet.balance_nanos == 10**9 - settled.charge.nanos  # rc-2 still held, nothing charged for it
    # a router's web search on it, and a gateway's fallbacks named in their own field, travel the native shape
    searched = await policy.Authorize(policy_pb2.AuthorizeRequest(
        api_key=created.secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="router/open-model",
        shape=policy_pb2.RequestShape(input_tokens=100, max_output_tokens=10, web_results=5, web_searches=1)))
    assert (searched.decision, searched.reason) == (policy_pb2.DENY, "tool_not_priced")  # no per_web_result given
    fallen = await policy.Authorize(policy_pb2.AuthorizeRequest(
        api_key=created.secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="router/open-model",
        shape=policy_pb2.RequestShape(input_tokens=100, max_output_tokens=10, fallback_models=["mystery/model"],
                                      fallbacks_routed=True, fallbacks_param="fallbacks")))
    assert (fallen.decision, fallen.reason, fallen.error.param) == (policy_pb2.DENY, "unknown_model", "fallbacks")
