"""Hostile input: random and oversized fields never crash a decision, never leak a reservation,
and always come back as a clear answer (a decision, or a PolicydError with a machine reason)."""

from __future__ import annotations

import asyncio
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd.domain import Attribution, AuthorizeInput, PolicydError, Shape, UsageReport
from policyd.http_api import encoded_body, rewrite_body
from policyd.server import Service
from policyd.usage_capture import ResponseReader, background_answer, closing
from policyd.validation import STORED_RESPONSE_ID_PATTERN
from tests.conftest import SAMPLE_POLICY, make_settings

text = st.one_of(st.text(max_size=40), st.text(min_size=250, max_size=600),
                 st.sampled_from(["", "gpt-4o", "gpt-4o-mini", "chat_completions", "x\r\nInjected: 1", "\x00", "{p0}"]))
numbers = st.one_of(st.integers(-10, 10), st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 10**12, 10**12 + 1]))


@st.composite
def requests(draw, secret: str):
    return AuthorizeInput(
        api_key=draw(st.one_of(st.just(secret), text)),
        endpoint=draw(st.one_of(st.sampled_from(["chat_completions", "embeddings", "images"]), text)),
        model=draw(text),
        attribution=Attribution(request_id=draw(st.one_of(st.just(""), text)), feature=draw(text),
                                thread_id=draw(text), customer_id=draw(st.one_of(st.just(""), text)),
                                tags=draw(st.dictionaries(text, text, max_size=40))),
        shape=Shape(prompt_bytes=draw(numbers), max_output_tokens=draw(numbers), message_count=draw(numbers),
                    image_count=draw(numbers), input_tokens=draw(numbers),
                    # the hosted tools: an image model, its calls and sizes, containers, maps grounding
                    image_model=draw(st.one_of(st.sampled_from(["", "gpt-image-1"]), text)),
                    image_generation_calls=draw(numbers), partial_images=draw(numbers), image_scale=draw(numbers),
                    containers=draw(numbers), container_memory=draw(st.one_of(st.just("1g"), text)),
                    maps_grounding=draw(st.booleans()),
                    # other models the provider may run for it: fallbacks, an advisor, its calls and output
                    fallback_models=tuple(draw(st.lists(st.one_of(st.just("gpt-4o"), text), max_size=12))),
                    fallbacks_routed=draw(st.booleans()),
                    advisor_model=draw(st.one_of(st.sampled_from(["", "gpt-4o"]), text)),
                    advisor_calls=draw(numbers), advisor_max_tokens=draw(numbers)),
        client_address=draw(text), user_agent=draw(text),
    )


def test_random_authorize_and_settle_input(tmp_path) -> None:
    loop = asyncio.new_event_loop()
    service = loop.run_until_complete(Service.build(make_settings(
        {"redis_url": "", "database_url": f"sqlite:///{tmp_path / 'f.db'}"})))
    loop.run_until_complete(service.start())
    policy = SAMPLE_POLICY.replace("limit: 600}", "limit: 1000000}").replace(
        '      output: "0.60"', '      output: "0.60"\n      per_container: {1g: "0.03"}', 1)
    loop.run_until_complete(service.admin.apply_policy(policy, "p"))
    key = loop.run_until_complete(service.admin.create_key(label="f", customer_id="fuzz", environment="production",
                                                           plan="pro"))
    loop.run_until_complete(service.admin.grant_credit("fuzz", 10**12, "USD", "purchase"))
    allowed: list[str] = []

    sane = st.builds(
        AuthorizeInput, api_key=st.just(key.secret), endpoint=st.sampled_from(["chat_completions", "responses"]),
        model=st.sampled_from(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4"]),
        attribution=st.builds(Attribution, request_id=st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True),
                              feature=st.from_regex(r"[a-z]{0,8}", fullmatch=True)),
        shape=st.builds(Shape, prompt_bytes=st.integers(0, 10**6), max_output_tokens=st.integers(0, 10**5),
                        image_model=st.sampled_from(["", "gpt-image-1"]), image_generation_calls=st.integers(0, 3),
                        image_scale=st.integers(0, 6), containers=st.integers(0, 2), container_memory=st.just("1g")))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=st.one_of(sane, requests(key.secret)), usage=st.tuples(numbers, numbers, numbers),
           tools=st.tuples(numbers, numbers, numbers))
    def one(request: AuthorizeInput, usage: tuple[int, int, int], tools: tuple[int, int, int]) -> None:
        decision = loop.run_until_complete(service.engine.authorize(request))
        assert decision.decision in ("allow", "deny", "downgrade")
        if decision.decision == "deny":
            assert decision.reason and 400 <= decision.http_status < 600
            return
        allowed.append(decision.request_id)
        try:
            loop.run_until_complete(service.engine.settle(UsageReport(
                request_id=decision.request_id, input_tokens=usage[0], output_tokens=usage[1], images=usage[2],
                image_generation_calls=tools[0], image_generation_output_tokens=tools[1], containers=tools[2])))
        except PolicydError as error:
            assert error.reason in ("invalid_usage", "exists_with_different_usage")
            try:
                loop.run_until_complete(service.engine.release(decision.request_id, "fuzz"))
            except PolicydError as release_error:  # a retried request id that was settled before
                assert release_error.reason == "already_settled"

    try:
        one()
        assert allowed, "no random request was allowed: the generator no longer reaches the reservation path"
        balance, reserved = loop.run_until_complete(service.counters.wallet("fuzz"))
        assert reserved == 0  # nothing leaked: every allow was settled or released
        audit = loop.run_until_complete(service.admin.audit())
        assert audit.ok, audit.mismatches
    finally:
        loop.run_until_complete(service.close())
        loop.close()


_REPLY_KEYS = ["type", "usage", "response", "output", "item", "tool_usage", "image_gen", "web_search", "num_requests",
               "input_tokens", "output_tokens", "usageMetadata", "candidates", "groundingMetadata", "groundingChunks",
               "maps", "candidatesTokensDetails", "promptTokensDetails", "cacheTokensDetails", "modality", "tokenCount",
               "action", "container_id", "environment", "status", "input_tokens_details", "cache_write_tokens_details",
               "ttl_12h_tokens", "cached_tokens", "cache_write_tokens", "image_tokens", "audio_tokens", "choices",
               "delta", "content", "parts", "text", "message", "server_tool_use", "prompt_tokens", "completion_tokens",
               "prompt_tokens_details", "completion_tokens_details", "data", "duration", "id", "service_tier",
               "cache_read_input_tokens", "cache_creation_input_tokens", "cache_creation", "webSearchQueries",
               "promptTokenCount", "candidatesTokenCount", "thoughtsTokenCount", "cachedContentTokenCount",
               "total_tokens", "reasoning_tokens", "citation_tokens", "num_search_queries", "search_context_size",
               "server_side_tool_usage_details", "web_search_calls", "x_search_calls", "usageMetadata", "done", "error",
               "generateVideoResponse", "generatedSamples", "video", "uri", "name", "response", "createTime",
               "expireTime", "totalTokenCount", "file", "iterations", "type", "model", "stop_reason"]
_REPLY_WORDS = st.sampled_from(["IMAGE", "AUDIO", "image_generation_call", "code_interpreter_call", "shell_call",
                                "response.completed", "response.output_item.added", "web_search_call", "search",
                                "message_delta", "message_start", "response.image_generation_call.completed",
                                "COMPLETED", "FAILED", "low", "HIGH", "https://g.example/v1beta/files/f-1:download",
                                "2026-12-06T10:00:00Z", "2026-12-06T10:10:00.5Z", "1999-01-01T00:00:00+02:00",
                                "cachedContents/c-1", "projects/p/locations/l/cachedContents/c-2", "files/f-2",
                                "compaction", "message", "fallback_message", "advisor_message", "refusal"])
_replies = st.recursive(st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.text(max_size=6) | _REPLY_WORDS,
                        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_REPLY_KEYS), inner,
                                                                                    max_size=6), max_leaves=30)


@settings(max_examples=3000, deadline=None)
@given(endpoint=st.sampled_from(["responses", "gemini_generate_content", "chat_completions", "anthropic_messages",
                                 "images", "completions", "embeddings", "audio_transcriptions", "cached_contents"]),
       reply=_replies, stream=st.booleans())
def test_any_reply_is_read_without_failing_and_its_parts_fit(endpoint: str, reply: object, stream: bool) -> None:
    """Whatever a provider sends back (the fields' names right, their values anything): the reader never
    fails, and the parts of the usage it reads fit in their wholes, as Settle requires of them."""
    reader = ResponseReader(endpoint, stream, stored=endpoint in ("gemini_generate_content", "cached_contents"))
    raw = json.dumps(reply).encode()
    reader.feed(b"data: " + raw + b"\n\n" if stream else raw)
    reader.finish()
    closing(200, reader, cut=True)
    assert reader.estimated_output_tokens() >= 0
    t = reader.tokens
    assert t.cached_input_tokens + t.cache_write_input_tokens + t.audio_input_tokens + t.image_input_tokens \
        <= t.input_tokens
    assert t.audio_output_tokens + t.image_output_tokens + t.reasoning_output_tokens <= t.output_tokens
    assert t.cache_write_1h_input_tokens <= t.cache_write_input_tokens
    assert len(t.search_context_size) <= 16
    assert 0 <= t.cache_storage_token_seconds and len(reader.response_id) <= 200  # a cache's, a Gemini file's
    assert t.image_generation_cached_input_tokens + t.image_generation_image_input_tokens \
        <= t.image_generation_input_tokens
    if t.parts:  # Anthropic's iterations: the usage is their sums, each part's own fitting in it
        assert (t.input_tokens, t.output_tokens) == (sum(p.input_tokens for p in t.parts),
                                                     sum(p.output_tokens for p in t.parts))
        assert all(p.cached_input_tokens + p.cache_write_input_tokens <= p.input_tokens for p in t.parts)


@settings(max_examples=1500, deadline=None)
@given(endpoint=st.sampled_from(["responses", "chat_completions", "videos"]), status=st.sampled_from([200, 404, 500]),
       answer=_replies)
def test_any_answer_for_a_followed_response_is_read_without_failing(endpoint: str, status: int, answer: object) -> None:
    """Whatever a provider answers for a background response, an async chat job or a Veo operation policyd
    follows: read without failing, one of the actions the poller knows, and the files it names ones a Settle
    takes (provider_file_ids)."""
    action, reader = background_answer(status, json.dumps(answer).encode(), endpoint)
    assert action in ("wait", "settle", "release", "held", "gone")
    assert reader.images >= 0 and all(STORED_RESPONSE_ID_PATTERN.match(f) for f in reader.files)
    assert action != "settle" or status == 200


@settings(max_examples=500, deadline=None)
@given(coding=st.sampled_from(["gzip", "deflate", "br", "gzip, br", "identity", ""]), body=st.binary(max_size=300),
       compressed=st.booleans(), stream=st.booleans(), pieces=st.integers(1, 50))
def test_any_reply_in_any_coding_is_read_without_failing(coding: str, body: bytes, compressed: bool, stream: bool,
                                                         pieces: int) -> None:
    """A reply declared in a content coding, whether its bytes are in it or not: never a failure, and it
    closes as settled or estimated."""
    import gzip

    data = gzip.compress(body) if compressed else body
    reader = ResponseReader("chat_completions", stream)
    reader.encoded_as(coding)
    for at in range(0, len(data), pieces):
        reader.feed(data[at:at + pieces])
    reader.finish()
    assert closing(200, reader, cut=False).action in ("settle", "estimate")
    assert reader.estimated_output_tokens() >= 0


_BODY_KEYS = ["model", "tools", "max_uses", "type", "max_tool_calls", "max_output_tokens", "max_tokens",
              "max_completion_tokens", "generationConfig", "maxOutputTokens", "stream", "stream_options",
              "include_usage", "messages", "input", "contents", "generation_config", "max_output_tokens",
              "candidateCount", "candidate_count", "models", "fallbacks"]
_bodies = st.dictionaries(st.sampled_from(_BODY_KEYS), st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=5)
    | st.sampled_from(["web_search_20250305", "web_search", "image_generation"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_BODY_KEYS), inner, max_size=5),
    max_leaves=20), max_size=6)


@settings(max_examples=2000, deadline=None)
@given(body=_bodies, endpoint=st.sampled_from(["chat_completions", "completions", "responses", "anthropic_messages",
                                               "gemini_generate_content", "embeddings"]),
       served=st.sampled_from(["m", "cheaper"]), cap=st.integers(0, 1000), gave=st.booleans(), stream=st.booleans(),
       tool_cap=st.integers(0, 20), others=st.lists(st.text(max_size=5), max_size=3))
def test_any_body_is_rewritten_without_failing(body: dict, endpoint: str, served: str, cap: int, gave: bool,
                                               stream: bool, tool_cap: int, others: list[str]) -> None:
    """What policy writes into a request (the served model, the output cap, the tools' bound, usage in a
    stream, the other models it names) never fails on a body of odd values: the reservation is not left behind
    a failed rewrite."""
    rewritten = rewrite_body(body, endpoint, served, "m", cap, gave, stream, False, tool_cap,
                             fallback_models=tuple(others))
    if rewritten is not None:
        sent = json.loads(encoded_body(rewritten))
        downgraded = served != "m" and endpoint != "gemini_generate_content"  # Gemini's model is in its path
        assert sent.get("model") == (served if downgraded else body.get("model"))
        if cap and not gave and endpoint == "gemini_generate_content":  # in the config the body gives
            named = next((k for k in ("generationConfig", "generation_config") if isinstance(body.get(k), dict)),
                         "generationConfig")
            assert sent[named]["maxOutputTokens"] == cap
