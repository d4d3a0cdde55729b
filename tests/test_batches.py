"""Batches (policyd/batches.py): a batch's input file read into the requests it holds, its hold the sum of those
requests' own holds at the batch tier (a property), and what the provider's answer for a batch says. The
gateway's side, through the real Envoy with the openai SDK, is in tests/test_gateway.py."""

from __future__ import annotations

import asyncio
import itertools
import json
import urllib.request
from dataclasses import replace
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd.batches import BATCH_TIER, batch_answer, batch_shape, inline_requests, read_requests, with_output_caps
from policyd.domain import AuthorizeInput, Shape
from policyd.server import Service
from tests.conftest import SAMPLE_POLICY, make_settings
from tests.helpers import ask, counters_lost_and_rebuilt, fund, new_key

CHAT = "/v1/chat/completions"


def line(body: dict[str, Any], url: str = CHAT, number: int = 0) -> bytes:
    return json.dumps({"custom_id": f"r{number}", "method": "POST", "url": url, "body": body}).encode()


def chat(model: str = "gpt-4o-mini", content: str = "hello", **more: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **more}


def test_a_files_requests_are_read_as_each_would_be_sent_alone_at_the_batch_tier() -> None:
    content = b"\n".join([line(chat(max_tokens=40), number=0), b"", line(chat(content="x" * 900, n=2), number=1)])
    found = read_requests(CHAT, content)
    assert (found.problem, found.model) == ("", "gpt-4o-mini")
    assert [(r.max_output_tokens, r.choices, r.service_tier) for r in found.requests] == \
        [(40, 0, BATCH_TIER), (0, 2, BATCH_TIER)]
    assert found.requests[1].prompt_bytes > found.requests[0].prompt_bytes >= len("hello")
    # a request without its output cap is held at the model's most, none when the model has no most
    assert [r.max_output_tokens for r in with_output_caps(found.requests, "chat_completions", 16_384) or ()] == \
        [40, 16_384]
    assert with_output_caps(found.requests, "chat_completions", 0) is None
    assert with_output_caps(found.requests, "embeddings", 0) == found.requests  # no output to cap


@pytest.mark.parametrize("content, said", [
    (b"", "holds no requests"),
    (b"not json", "line 1 of the input file is not JSON"),
    (line(chat()) + b"\n" + line(chat(model="gpt-4o")), "line 2 of the input file: a batch's requests are all for one"),
    (line(chat(), url="/v1/embeddings"), "every request of this batch is a POST to /v1/chat/completions"),
    (line(chat(stream=True)), "neither streamed nor background"),
    (line(chat(max_tokens="many")), "max_tokens must be"),
    (line({"model": "gpt-4o-mini", "input": "x", "previous_response_id": "resp_1"}, url="/v1/responses"),
     "do not continue stored responses"),
    (line({"model": "gpt-4o-mini", "input": "x", "tools": [{"type": "web_search"}]}, url="/v1/responses"),
     "give the request's hosted tools a bound"),
    (line(chat(tools=[{"type": "openrouter:web_search"}])), "give the request's hosted tools a bound"),
])
def test_a_file_whose_requests_cannot_be_held_says_which_line_and_why(content: bytes, said: str) -> None:
    url = "/v1/responses" if b"/v1/responses" in content else CHAT
    assert said in read_requests(url, content).problem


def test_an_anthropic_message_batchs_requests_are_read_from_its_body() -> None:
    params = {"model": "claude-sonnet-4", "max_tokens": 300, "messages": [{"role": "user", "content": "hi"}]}
    found = inline_requests([{"custom_id": "a", "params": params}, {"custom_id": "b", "params": params}])
    assert (found.problem, found.model, len(found.requests)) == ("", "claude-sonnet-4", 2)
    # at the batch tier, not at the priority tier Anthropic serves a request sent alone at when it can
    assert {(r.max_output_tokens, r.service_tier, r.service_tier_implied) for r in found.requests} == \
        {(300, BATCH_TIER, False)}
    refused = inline_requests([{"custom_id": "a", "params": {**params, "max_tokens": 0}}])
    assert (refused.param, refused.problem.startswith("requests[0]: max_tokens")) == ("requests", True)
    assert inline_requests([{"custom_id": "a"}]).problem == "requests[0] is not a request (custom_id, params)"
    # one naming other models the provider would run beside it (held for alone, not in a batch's hold)
    for other in ({"fallbacks": [{"model": "claude-opus-4-8"}]},
                  {"tools": [{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-8", "max_uses": 1}]}):
        assert "name no other model" in inline_requests([{"custom_id": "a", "params": {**params, **other}}]).problem
    assert inline_requests([]).problem == "requests holds no requests"


def test_the_providers_answer_for_an_anthropic_message_batch() -> None:
    def answer(batch: dict[str, Any]) -> tuple[str, str]:
        said = batch_answer(200, json.dumps({"type": "message_batch", "id": "msgbatch_1", **batch}).encode())
        return said.action, said.output_path

    assert answer({"processing_status": "in_progress"}) == ("wait", "")
    assert answer({"processing_status": "canceling"}) == ("wait", "")
    # ended: its usage is its results' (Anthropic reports none for the batch)
    assert answer({"processing_status": "ended", "request_counts": {"succeeded": 2}}) == \
        ("read_output", "messages/batches/msgbatch_1/results")
    assert answer({"processing_status": "ended", "request_counts": {"succeeded": 0, "canceled": 3}})[0] == "release"


def test_the_providers_answer_for_a_batch() -> None:
    usage = {"input_tokens": 120, "input_tokens_details": {"cached_tokens": 20}, "output_tokens": 30,
             "output_tokens_details": {"reasoning_tokens": 10}, "total_tokens": 150}

    def answer(status: int, batch: Any) -> tuple[str, str, tuple[int, int, int]]:
        said = batch_answer(status, json.dumps(batch).encode())
        return said.action, said.status, (said.tokens.input_tokens, said.tokens.cached_input_tokens,
                                          said.tokens.output_tokens)

    assert answer(200, {"status": "in_progress"})[:2] == ("wait", "in_progress")
    assert answer(200, {"status": "finalizing", "usage": usage})[0] == "wait"
    assert answer(503, {})[0] == "wait" and answer(200, "not a batch")[0] == "wait"
    assert answer(404, {})[0] == "gone"
    assert answer(200, {"status": "completed", "usage": usage}) == ("settle", "completed", (120, 20, 30))
    assert answer(200, {"status": "expired", "usage": usage})[0] == "settle"  # what ran before it expired
    assert answer(200, {"status": "failed", "usage": None})[0] == "release"  # failed validating: nothing ran
    assert answer(200, {"status": "cancelled", "usage": {"input_tokens": 0, "output_tokens": 0}})[0] == "release"
    # ended, its usage not reported: read from its output file, or charged as held when it has none
    read = batch_answer(200, json.dumps({"status": "completed", "output_file_id": "file-out",
                                         "endpoint": "/v1/embeddings"}).encode())
    assert (read.action, read.output_path, read.endpoint) == ("read_output", "files/file-out/content", "embeddings")
    assert answer(200, {"status": "completed", "request_counts": {"completed": 3}})[0] == "held"
    assert answer(200, {"status": "completed", "request_counts": {"completed": 0}})[0] == "release"


# gpt-4o-mini's batch tier
BATCH_PRICED = SAMPLE_POLICY.replace('      output: "0.60"\n', '      output: "0.60"\n      service_tiers: '
                                    '{batch: {input: "0.075", cached_input: "0.0375", output: "0.30"}}\n', 1)


@pytest.fixture
def running(backend: dict[str, str]) -> Iterator[tuple[asyncio.AbstractEventLoop, Service]]:
    loop = asyncio.new_event_loop()
    service = loop.run_until_complete(Service.build(make_settings(backend)))
    loop.run_until_complete(service.start())
    loop.run_until_complete(service.admin.apply_policy(BATCH_PRICED, "batch.yaml"))
    yield loop, service
    loop.run_until_complete(service.close())
    loop.close()


customers = itertools.count()
requests = st.lists(st.tuples(st.integers(1, 20_000), st.integers(1, 4_000), st.integers(0, 3)), min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=requests, plan=st.sampled_from(["free", "pro"]))
def test_a_batch_holds_the_sum_of_its_requests_own_holds_at_the_batch_tier(
        running: tuple[asyncio.AbstractEventLoop, Service], drawn: list[tuple[int, int, int]], plan: str) -> None:
    """Whatever its requests (prompt sizes, output caps, choices) and the plan (strict or estimated, marked up
    or at cost), a batch holds exactly what its requests would hold each sent alone on the batch tier: its
    wallet, to the nano, and each of its limits' money buckets."""
    loop, service = running

    async def check() -> None:
        customer = f"batch-{next(customers)}"
        _, secret = await new_key(service, customer=customer, plan=plan)
        await fund(service, customer, "1000")
        alone = [ask(secret, prompt_bytes=size, max_output_tokens=cap, choices=n, service_tier=BATCH_TIER,
                     request_id=f"{customer}-{i}", thread_id="t") for i, (size, cap, n) in enumerate(drawn)]
        held_alone = 0
        for request in alone:
            decision = await service.engine.authorize(request)
            assert decision.allowed, decision.reason
            held_alone += decision.reserved
        lines = tuple(request.shape for request in alone)
        batch = replace(alone[0], shape=batch_shape(lines), batch=lines,
                        attribution=replace(alone[0].attribution, request_id=f"{customer}-batch"))
        decision = await service.engine.authorize(batch)
        assert decision.allowed and decision.reserved == held_alone > 0
        assert (decision.served_model, decision.decision) == ("gpt-4o-mini", "allow")
        wallet = await service.counters.wallet(customer)
        assert wallet[1] == 2 * held_alone  # the requests alone, and the batch

    loop.run_until_complete(check())


def test_a_batch_is_never_served_by_another_model(running: tuple[asyncio.AbstractEventLoop, Service]) -> None:
    """Its file names the model, which the gateway cannot rewrite: a batch past a downgrading limit is refused,
    not held on the cheaper model, and a model whose batch tier is not priced refuses it."""
    loop, service = running

    async def check() -> None:
        _, secret = await new_key(service, customer="batch-downgrade", plan="pro")
        await fund(service, "batch-downgrade", "1000")
        lines = (Shape(prompt_bytes=100, message_count=1, max_output_tokens=10, service_tier=BATCH_TIER),)

        def premium(request_id: str) -> AuthorizeInput:
            return replace(ask(secret, model="gpt-4o", request_id=request_id), shape=batch_shape(lines), batch=lines)

        refused = await service.engine.authorize(premium("unpriced-batch"))
        assert (refused.allowed, refused.reason) == (False, "service_tier_not_priced")
        # gpt-4o's batch tier priced, and the plan's day of premium models spent: a request alone is served by
        # gpt-4o-mini (the limit's downgrade), a batch is refused
        await service.admin.apply_policy(BATCH_PRICED.replace(
            '      output: "10.00"\n', '      output: "10.00"\n      service_tiers: {batch: {input: "1.25", output: "5.00"}}\n', 1)
            .replace('limit: "50.00", action: downgrade', 'limit: "0.000001", action: downgrade'), "downgrading.yaml")
        alone = await service.engine.authorize(ask(secret, model="gpt-4o", request_id="premium-alone"))
        assert (alone.decision, alone.served_model) == ("downgrade", "gpt-4o-mini")
        refused = await service.engine.authorize(premium("premium-batch"))
        assert (refused.allowed, refused.served_model) == (False, "gpt-4o")
        assert refused.reason == "budget_exceeded"
        assert (await service.counters.wallet("batch-downgrade"))[1] == alone.reserved  # the batch holds nothing

    loop.run_until_complete(check())


async def test_a_batch_is_followed_on_after_redis_lost_its_data_and_charged_at_its_end(service: Service) -> None:
    """Redis lost its data while a batch ran: the counters rebuilt from SQL hold it as long (its window and a
    margin, past the request's own deadline), ask the provider for it on, and charge its results' usage at the
    batch tier once it ended. A batch that never ends is charged as held at its deadline, never released."""
    from policyd.background import BackgroundResponses
    from policyd.batches import hold_seconds
    from policyd.mock_provider import MockProvider
    from policyd.money import parse_amount, price_quantity
    from policyd.providers import Account, ProviderPool

    await service.admin.apply_policy(SAMPLE_POLICY.replace('      output: "15.00"\n', '      output: "15.00"\n'
                                     '      service_tiers: {batch: {input: "1.50", output: "7.50"}}\n', 1), "b.yaml")
    provider = MockProvider(api_keys=("sk-mock-batch",)).start()
    try:
        accounts = ProviderPool([Account("anthropic-b", "anthropic", "anthropic", "x-api-key", "sk-mock-batch",
                                         base_url=f"http://127.0.0.1:{provider.port}/v1")])
        background = BackgroundResponses(service.engine, accounts, 3600, 1.0)
        service.engine.background = background
        _, secret = await new_key(service)
        await fund(service, "acme", "50")
        clock = [service.engine.clock()]
        service.engine.clock = lambda: clock[0]
        params = {"model": "claude-sonnet-4", "max_tokens": 300, "messages": [{"role": "user", "content": "hi"}]}
        found = inline_requests([{"custom_id": f"q{i}", "params": params} for i in range(4)])
        made = {}
        for request_id, polls in (("batch-across", 1), ("batch-never", 10_000)):
            held = await service.engine.authorize(replace(
                ask(secret, model="claude-sonnet-4", endpoint="anthropic_messages", request_id=request_id),
                shape=batch_shape(found.requests), batch=found.requests, charge_held_on_expiry=True))
            assert held.allowed, held.reason
            batch = json.loads(urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{provider.port}/v1/messages/batches", method="POST",
                data=json.dumps({"requests": [{"custom_id": f"q{i}", "params": params} for i in range(4)]}).encode(),
                headers={"x-api-key": "sk-mock-batch", "content-type": "application/json",
                         "x-mock-batch-polls": str(polls)}), timeout=10).read())
            made[request_id] = (batch["id"], held.reserved)
            await background.poll_later(request_id, batch["id"], "anthropic-b", hold_seconds(86_400))
        await service.writer.drain()
        wallet = await service.counters.wallet("acme")
        await counters_lost_and_rebuilt(service)
        for request_id in made:
            service.counters.forget(request_id)
        assert await service.counters.wallet("acme") == wallet  # both held again
        clock[0] += 2 * service.engine.reservation_ttl_ms + 1  # past the requests' own deadline, and one more TTL
        await service.engine.expire_due()
        assert (await service.counters.wallet("acme"))[1] == wallet[1]  # still held: they run on at the provider
        for _ in range(3):
            clock[0] += 1000
            await background.poll_due()
        await service.writer.drain()
        record = service.store.usage_record("batch-across")
        used = [r[2:] for r in provider.batches[made["batch-across"][0]][1]["results"]]
        inputs, outputs = sum(u[0] for u in used), sum(u[1] for u in used)
        cost = price_quantity(inputs, parse_amount("1.50")) + price_quantity(outputs, parse_amount("7.50"))
        assert (record.status, record.error_class, record.input_tokens, record.output_tokens) == \
            ("settled", "", inputs, outputs)
        assert record.charge_nanos == -(-cost * 12_000 // 10_000)  # the pro plan's 20% markup, rounded up
        # the one that never ends: held to its window and margin, then charged as held
        clock[0] += hold_seconds(86_400) * 1000
        await service.engine.expire_due()
        await service.writer.drain()
        never = service.store.usage_record("batch-never")
        assert (never.status, never.charge_nanos) == ("settled", made["batch-never"][1])
        assert never.error_class.startswith("usage_estimated")
        assert (await service.counters.wallet("acme"))[1] == 0
        assert (await service.admin.audit()).ok
    finally:
        provider.stop()


async def test_a_batch_on_an_account_policyd_cannot_ask_at_is_refused_and_holds_nothing(service: Service) -> None:
    """Without the account's base_url policyd can neither read a batch's input file nor ask for the batch until
    it ends: refused before the provider (recorded), nothing held, rather than held for a day and charged as
    held; a file its customer did not upload is not found."""
    from policyd import http_api
    from policyd.batches import UNREADABLE, Batches
    from policyd.providers import Account, ProviderPool

    await service.admin.apply_policy(BATCH_PRICED.replace('      output: "15.00"\n', '      output: "15.00"\n'
                                     '      service_tiers: {batch: {input: "1.50", output: "7.50"}}\n', 1), "b.yaml")
    _, secret = await new_key(service, customer="no-base-url")
    await fund(service, "no-base-url", "50")
    await service.engine.remember_response("no-base-url", "file-theirs", "openai", "openai", "openai-plain")
    batches = Batches(service.engine, ProviderPool([
        Account("openai-plain", "openai", "openai", "bearer", "sk-x"),
        Account("anthropic-plain", "anthropic", "anthropic", "x-api-key", "sk-y")]))

    def made(path: str, body: dict[str, Any], headers: dict[str, str]) -> http_api.HttpCall:
        return http_api.parse_call("POST", path, {"content-type": "application/json", **headers},
                                   json.dumps(body).encode())

    openai_batch = {"input_file_id": "file-theirs", "endpoint": CHAT, "completion_window": "24h"}
    refused = await batches.authorize(made("/v1/batches", openai_batch, {"authorization": f"Bearer {secret}"}))
    assert (refused.allowed, refused.reason, refused.message) == (False, "invalid_request", UNREADABLE)
    refused = await batches.authorize(made("/v1/batches", {**openai_batch, "input_file_id": "file-another"},
                                           {"authorization": f"Bearer {secret}"}))
    assert (refused.allowed, refused.reason) == (False, "file_not_found")
    params = {"model": "claude-sonnet-4", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    refused = await batches.authorize(made("/v1/messages/batches", {"requests": [{"custom_id": "a", "params": params}]},
                                           {"x-api-key": secret, "anthropic-version": "2023-06-01"}))
    assert (refused.allowed, refused.reason, refused.message) == (False, "invalid_request", UNREADABLE)
    assert (await service.counters.wallet("no-base-url"))[1] == 0  # the Anthropic batch's hold released
    await service.writer.drain()
    assert [r.reason for r in service.store.latest_usage("no-base-url", 10)].count("invalid_request") == 2


def test_a_plans_most_for_one_request_binds_each_request_of_a_batch(
        running: tuple[asyncio.AbstractEventLoop, Service]) -> None:
    """max_request_charge is the most a single request may cost: each of a batch's requests is bound by it,
    not the batch's sum (a batch of many cheap requests is held; one with a request past it is refused)."""
    loop, service = running

    async def check() -> None:
        await service.admin.apply_policy(BATCH_PRICED.replace("    markup_bps: 2000\n",
                                                              '    markup_bps: 2000\n    max_request_charge: "0.0005"\n',
                                                              1), "capped.yaml")
        _, secret = await new_key(service, customer="batch-capped", plan="pro")
        await fund(service, "batch-capped", "100")
        cheap = tuple(Shape(prompt_bytes=400, message_count=1, max_output_tokens=1_000, service_tier=BATCH_TIER)
                      for _ in range(20))

        def batch(request_id: str, requests: tuple[Shape, ...]) -> AuthorizeInput:
            return replace(ask(secret, request_id=request_id), shape=batch_shape(requests), batch=requests)

        alone = await service.engine.authorize(replace(ask(secret, request_id="one"), shape=cheap[0]))
        held = await service.engine.authorize(batch("many-cheap", cheap))
        assert alone.allowed and held.allowed and held.reserved == 20 * alone.reserved > 500_000  # past it, summed
        dear = cheap[:3] + (replace(cheap[0], max_output_tokens=3_000),)
        refused = await service.engine.authorize(batch("one-dear", dear))
        assert (refused.allowed, refused.reason) == (False, "request_too_costly")
        assert "A request of this batch may cost up to" in refused.message

    loop.run_until_complete(check())


def test_policyds_own_calls_carry_the_query_an_accounts_base_url_gives() -> None:
    """Azure OpenAI's dated API answers nothing without its api-version: an account's base_url gives it, and
    policyd's own reads (a batch's file, the batch, a background response) carry it after their path."""
    from policyd.http_api import parse_call
    from policyd.providers import Account

    azure = Account("azure-1", "azure", "azure", "api-key", "k",
                    base_url="https://r.openai.azure.com/openai?api-version=2024-10-21")
    assert azure.request("files/file-1/content").full_url == \
        "https://r.openai.azure.com/openai/files/file-1/content?api-version=2024-10-21"
    assert azure.request("batches/b?x=1").full_url == "https://r.openai.azure.com/openai/batches/b?x=1&api-version=2024-10-21"
    assert azure.request("files/f").get_header("Api-key") == "k"
    plain = Account("openai-1", "openai", "openai", "bearer", "k", base_url="https://api.openai.com/v1")
    assert plain.request("batches/b").full_url == "https://api.openai.com/v1/batches/b"
    # Azure OpenAI's clients' files are made on its accounts: its dated paths, or its key header
    for path, headers in (("/openai/files?api-version=2024-10-21", {"authorization": "Bearer k"}),
                          ("/openai/v1/files", {"api-key": "k"})):
        assert parse_call("POST", path, {"content-type": "multipart/form-data", **headers}, b"").creates_at == "azure"
    assert parse_call("POST", "/v1/files", {"authorization": "Bearer k"}, b"").creates_at == ""
    assert parse_call("POST", "/openai/v1/files", {"authorization": "Bearer k"}, b"").creates_at == ""
    # an Azure batch names its requests' endpoint without /v1, and so does each of its lines
    line = {"custom_id": "a", "method": "POST", "url": "/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}}
    found = read_requests("/chat/completions", json.dumps(line).encode())
    assert (found.problem, found.model, len(found.requests)) == ("", "gpt-4o-mini", 1)


def test_a_gemini_batch_is_read_and_its_end_charged_from_its_replies() -> None:
    """Gemini's batch mode: its inline requests held each as the same request alone, at the batch tier; its
    answer ended once its state says so, charged its replies' usage (failed ones billing nothing)."""
    from policyd.batches import BATCH_ID_PREFIXES, batch_answer
    from policyd.http_api import batch_made, parse_call

    path = "/v1beta/models/gemini-2.5-flash:batchGenerateContent"
    requests = [{"request": {"contents": [{"role": "user", "parts": [{"text": "x" * 40}]}],
                             "generationConfig": {"maxOutputTokens": cap}}, "metadata": {"key": str(cap)}}
                for cap in (10, 20)]
    call = parse_call("POST", path, {"x-goog-api-key": "k"}, json.dumps(
        {"batch": {"displayName": "d", "inputConfig": {"requests": {"requests": requests}}}}).encode())
    assert (call.problem, call.batch, call.model, call.batch_seconds, batch_made("POST", path)) == (
        "", True, "gemini-2.5-flash", 48 * 3600, True)
    found = inline_requests(call.batch_inline, call.endpoint, call.model)
    assert (found.problem, found.model) == ("", "gemini-2.5-flash")
    assert [(r.max_output_tokens, r.service_tier) for r in found.requests] == [(10, BATCH_TIER), (20, BATCH_TIER)]
    assert inline_requests([{"metadata": {}}], call.endpoint, call.model).problem  # no request in it
    from_file = parse_call("POST", path, {"x-goog-api-key": "k"},
                           b'{"batch": {"inputConfig": {"fileName": "files/a"}}}')
    assert (from_file.problem, from_file.problem_param) == ("invalid_request", "batch.inputConfig")
    read = parse_call("GET", "/v1beta/batches/abc", {"x-goog-api-key": "k"}, b"")
    assert (read.stored_response, read.endpoint) == ("batches/abc", "gemini_generate_content")
    assert "batches/abc".startswith(BATCH_ID_PREFIXES)

    def answer(state: str, replies: list[Any] | None = None) -> Any:
        metadata: dict[str, Any] = {"state": state}
        if replies is not None:
            metadata["output"] = {"inlinedResponses": {"inlinedResponses": replies}}
        return batch_answer(200, json.dumps({"name": "batches/abc", "metadata": metadata}).encode())

    def reply(used_in: int, used_out: int) -> dict[str, Any]:
        return {"response": {"usageMetadata": {"promptTokenCount": used_in, "candidatesTokenCount": used_out}}}

    assert answer("BATCH_STATE_RUNNING").action == "wait"
    done = answer("BATCH_STATE_SUCCEEDED", [reply(10, 3), {"error": {"code": 400}}, reply(7, 2)])
    assert (done.action, done.tokens.input_tokens, done.tokens.output_tokens) == ("settle", 17, 5)
    assert answer("BATCH_STATE_CANCELLED", [reply(4, 1)]).tokens.output_tokens == 1
    assert answer("BATCH_STATE_FAILED").action == "release"  # nothing ran
    assert answer("BATCH_STATE_SUCCEEDED", [{"error": {"code": 500}}]).action == "release"  # none billed
    assert answer("BATCH_STATE_EXPIRED").action == "held"  # ended with no replies to read
    openai_batch = parse_call("GET", "/v1/batches/batch_abc", {"authorization": "Bearer k"}, b"")
    assert (openai_batch.stored_response, openai_batch.endpoint) == ("batch_abc", "responses")  # OpenAI's, still
