"""Amazon Bedrock's runtime API as policyd reads it: its paths, Converse's bodies and usage, InvokeModel's
Anthropic bodies, and its streams in AWS's event stream encoding (policyd/event_stream.py). Through the real
Envoy with boto3: tests/test_gateway.py."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from policyd import event_stream
from policyd.http_api import parse_call, rewrite_body, upstream_path
from policyd.usage_capture import ResponseReader

SONNET = "us.anthropic.claude-sonnet-4-20250514-v1:0"
SONNET_IN_PATH = "us.anthropic.claude-sonnet-4-20250514-v1%3A0"  # as boto3 sends it
KEY = {"authorization": "Bearer pdk_live_x"}


def converse(body: dict[str, Any], verb: str = "converse", headers: dict[str, str] | None = None):
    return parse_call("POST", f"/model/{SONNET_IN_PATH}/{verb}", {**KEY, **(headers or {})}, json.dumps(body).encode())


def message(kind: str, payload: dict[str, Any], message_type: str = "event") -> bytes:
    return event_stream.encode({":event-type": kind, ":content-type": "application/json", ":message-type": message_type},
                               json.dumps(payload).encode())


def chunk(event: dict[str, Any]) -> bytes:
    """InvokeModelWithResponseStream's message: one of Anthropic's events, base64 in `bytes`."""
    return message("chunk", {"bytes": base64.b64encode(json.dumps(event).encode()).decode(), "p": "ab"})


header_texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.dictionaries(header_texts.filter(lambda t: 0 < len(t.encode()) < 100), header_texts,
                                          max_size=4), st.binary(max_size=300)), min_size=1, max_size=6),
       st.lists(st.integers(1, 97), min_size=1, max_size=40))
def test_messages_are_read_back_whole_however_their_bytes_are_split(messages, cuts) -> None:
    """Whatever way the network splits the stream, each message is read once, whole, in order."""
    stream = b"".join(event_stream.encode(headers, payload) for headers, payload in messages)
    decoder, read, at = event_stream.Decoder(), [], 0
    for size in cuts * (len(stream) // max(sum(cuts), 1) + 1):
        read += decoder.feed(stream[at:at + size])
        at += size
        if at >= len(stream):
            break
    read += decoder.feed(stream[at:])
    assert [(m.headers, m.payload) for m in read] == messages and decoder.pending == 0


def test_bytes_not_of_the_encoding_are_refused_not_misread() -> None:
    whole = message("metadata", {"usage": {"inputTokens": 3}})
    for at in (2, 9, len(whole) - 20, len(whole) - 2):  # the length, the prelude's checksum, the payload, the checksum
        broken = bytearray(whole)
        broken[at] ^= 0x40
        with pytest.raises(event_stream.EventStreamError):
            event_stream.Decoder().feed(bytes(broken))
    too_long = struct.pack(">II", event_stream.MESSAGE_BYTES_MAX + 1, 0)
    with pytest.raises(event_stream.EventStreamError):
        event_stream.Decoder().feed(too_long + struct.pack(">I", __import__("zlib").crc32(too_long)))


def test_bedrock_paths_name_the_api_the_model_and_whether_it_streams() -> None:
    call = converse({"messages": [{"role": "user", "content": [{"text": "hello"}]}], "inferenceConfig": {"maxTokens": 9}})
    assert (call.problem, call.endpoint, call.model, call.model_in_path, call.stream, call.max_output_tokens) == (
        "", "bedrock_converse", SONNET, True, False, 9)
    assert converse({"messages": []}, "converse-stream").stream
    counted = converse({"input": {"converse": {"messages": []}}}, "count-tokens")
    assert (counted.problem, counted.endpoint, counted.count_tokens) == ("", "bedrock_converse", True)
    anthropic = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 20,
                 "messages": [{"role": "user", "content": "hi"}]}
    for verb, streamed in (("invoke", False), ("invoke-with-response-stream", True)):
        call = converse(anthropic, verb)
        assert (call.problem, call.endpoint, call.model, call.stream, call.max_output_tokens) == (
            "", "anthropic_messages", SONNET, streamed, 20)
        assert (call.service_tier, call.service_tier_implied) == ("", False)  # no first-party priority tier here
    arn = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123"
    by_arn = parse_call("POST", f"/model/{arn.replace(':', '%3A').replace('/', '%2F')}/converse", KEY, b'{"messages": []}')
    assert by_arn.model == arn


def test_bedrock_bodies_policyd_cannot_hold_are_refused_before_the_provider() -> None:
    other_model = converse({"inputText": "a Titan body"}, "invoke")  # a body of another family than Anthropic's
    assert (other_model.problem, other_model.problem_param) == ("invalid_request", "anthropic_version")
    for bad in ({"inferenceConfig": {"maxTokens": 0}}, {"inferenceConfig": {"maxTokens": "many"}},
                {"inferenceConfig": {"maxTokens": 2.5}}):
        call = converse({"messages": [], **bad})
        assert (call.problem, call.problem_param) == ("invalid_request", "inferenceConfig.maxTokens"), bad
    assert converse({"messages": [], "inferenceConfig": [1]}).problem_param == "inferenceConfig"
    assert converse({"messages": [], "serviceTier": "flex"}).problem_param == "serviceTier"
    assert converse({"messages": [], "serviceTier": {"type": "flex"},
                     "performanceConfig": {"latency": "optimized"}}).problem_param == "performanceConfig"


def test_converse_requests_are_read_for_what_the_provider_bills() -> None:
    plain = converse({"messages": [{"role": "user", "content": [{"text": "x" * 400}]}]})
    assert plain.prompt_bytes >= 400 and not plain.unseen_input and plain.service_tier == ""
    assert converse({"messages": [], "serviceTier": {"type": "flex"}}).service_tier == "flex"
    assert converse({"messages": [], "serviceTier": {"type": "default"}}).service_tier == ""
    assert converse({"messages": [], "performanceConfig": {"latency": "optimized"}}).service_tier == "latency_optimized"
    invoked = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []}  # InvokeModel's: headers
    assert converse(invoked, "invoke", {"X-Amzn-Bedrock-Service-Tier": "priority"}).service_tier == "priority"
    assert converse(invoked, "invoke", {"X-Amzn-Bedrock-PerformanceConfig-Latency": "optimized"}).service_tier == \
        "latency_optimized"
    for media in ({"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}},
                  {"document": {"format": "pdf", "name": "a", "source": {"s3Location": {"uri": "s3://b/a.pdf"}}}},
                  {"video": {"format": "mp4", "source": {"bytes": "AAAA"}}}):
        assert converse({"messages": [{"role": "user", "content": [media]}]}).unseen_input, media  # billed by content
    cached = converse({"system": [{"text": "long"}, {"cachePoint": {"type": "default"}}], "messages": []})
    assert cached.cache_write == "5m"
    hour = converse({"messages": [{"role": "user", "content": [{"text": "a"}, {"cachePoint": {"type": "default",
                                                                                              "ttl": "1h"}}]}]})
    assert hour.cache_write == "1h"
    tools = converse({"messages": [], "toolConfig": {"tools": [{"toolSpec": {"name": "t", "inputSchema": {"json": {}}}}]}})
    assert tools.prompt_bytes > plain.prompt_bytes - 400 + 1000  # the model's own tool-use prompt is input too


def test_the_cap_is_written_where_converse_reads_it_and_a_downgrade_into_the_path() -> None:
    body = {"messages": [], "inferenceConfig": {"temperature": 0.2}}
    rewritten = rewrite_body(body, "bedrock_converse", SONNET, SONNET, 300, False, False, model_in_path=True)
    assert rewritten == {"messages": [], "inferenceConfig": {"temperature": 0.2, "maxTokens": 300}}
    assert rewrite_body(body, "bedrock_converse", SONNET, SONNET, 300, True, False, model_in_path=True) is None
    haiku = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    assert upstream_path(f"/model/{SONNET_IN_PATH}/converse-stream", haiku, SONNET) == \
        "/model/us.anthropic.claude-3-5-haiku-20241022-v1%3A0/converse-stream"
    assert "model" not in (rewrite_body({"anthropic_version": "bedrock-2023-05-31", "messages": []},
                                        "anthropic_messages", haiku, SONNET, 50, False, False, model_in_path=True) or {})


def read(endpoint: str, stream: bool, data: bytes, piece: int = 0) -> ResponseReader:
    reader = ResponseReader(endpoint, stream)
    for at in range(0, len(data), piece or len(data) or 1):
        reader.feed(data[at:at + (piece or len(data))])
    reader.finish()
    return reader


def test_a_converse_reply_is_charged_its_usage_its_cache_apart() -> None:
    reply = {"output": {"message": {"role": "assistant", "content": [{"text": "hello there"}]}}, "stopReason": "end_turn",
             "usage": {"inputTokens": 10, "outputTokens": 7, "totalTokens": 117, "cacheReadInputTokens": 40,
                       "cacheWriteInputTokens": 60, "cacheDetails": [{"ttl": "1h", "inputTokens": 60}]},
             "serviceTier": {"type": "flex"}}
    reader = read("bedrock_converse", False, json.dumps(reply).encode())
    tokens = reader.tokens
    assert reader.found_usage and (tokens.input_tokens, tokens.cached_input_tokens, tokens.cache_write_input_tokens,
                                   tokens.cache_write_1h_input_tokens, tokens.output_tokens, tokens.service_tier) == (
        110, 40, 60, 60, 7, "flex")
    optimized = read("bedrock_converse", False, json.dumps(
        {**reply, "serviceTier": {"type": "default"}, "performanceConfig": {"latency": "optimized"}}).encode())
    assert optimized.tokens.service_tier == "latency_optimized"
    assert read("bedrock_converse", False, json.dumps({**reply, "serviceTier": {"type": "default"}}).encode()
                ).tokens.service_tier == ""
    unmetered = read("bedrock_converse", False, json.dumps({k: v for k, v in reply.items() if k != "usage"}).encode())
    assert not unmetered.found_usage and unmetered.estimated_output_tokens() == 3  # "hello there": 11 bytes


def converse_stream(words: list[str], usage: dict[str, Any] | None) -> bytes:
    events = [message("messageStart", {"role": "assistant", "p": "abc"})]
    events += [message("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": w}, "p": "x"}) for w in words]
    events += [message("contentBlockStop", {"contentBlockIndex": 0}), message("messageStop", {"stopReason": "end_turn"})]
    if usage is not None:
        events.append(message("metadata", {"usage": usage, "metrics": {"latencyMs": 5}}))
    return b"".join(events)


@pytest.mark.parametrize("piece", [0, 1, 7, 64])
def test_a_converse_stream_is_charged_from_its_metadata_event_however_it_arrives(piece: int) -> None:
    data = converse_stream(["one", " two", " three"], {"inputTokens": 12, "outputTokens": 3, "totalTokens": 15})
    reader = read("bedrock_converse", True, data, piece)
    assert (reader.found_usage, reader.output_final, reader.finished, reader.malformed) == (True, True, True, False)
    assert (reader.tokens.input_tokens, reader.tokens.output_tokens) == (12, 3)
    assert reader.delivered_bytes == len("one two three")


def test_a_converse_stream_cut_before_its_usage_is_estimated_from_what_it_delivered() -> None:
    data = converse_stream(["x" * 40, "y" * 40], None)
    reader = read("bedrock_converse", True, data[:-30])  # cut inside its last message
    assert (reader.found_usage, reader.finished, reader.malformed) == (False, False, False)
    assert reader.estimated_output_tokens() == 20
    error = message("throttlingException", {"message": "slow down"}, message_type="exception")
    after_error = read("bedrock_converse", True, converse_stream(["a" * 8], None) + error)
    assert not after_error.found_usage and after_error.estimated_output_tokens() == 2 and not after_error.malformed
    broken = bytearray(data)
    broken[len(data) // 2] ^= 1
    assert read("bedrock_converse", True, bytes(broken)).malformed


def test_an_invoke_stream_is_read_as_the_anthropic_events_it_carries() -> None:
    events = [{"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {
                  "input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5}}},
              {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi there"}},
              {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 9}},
              {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 25, "outputTokenCount": 9}}]
    reader = read("anthropic_messages", True, b"".join(chunk(e) for e in events), 11)
    assert (reader.found_usage, reader.output_final, reader.finished) == (True, True, True)
    assert (reader.tokens.input_tokens, reader.tokens.cached_input_tokens, reader.tokens.output_tokens) == (30, 5, 9)
    assert reader.delivered_bytes == len("hi there")
    # the tier its reply's headers say served it (InvokeModel's; Anthropic's usage on Bedrock names none)
    for headers, tier in ((("flex", "standard"), "flex"), (("default", "optimized"), "latency_optimized"),
                          (("default", "standard"), "")):
        reader = ResponseReader("anthropic_messages", True)
        reader.served_on(*headers)
        for event in events:
            reader.feed(chunk(event))
        reader.finish()
        assert reader.tokens.service_tier == tier, headers
    garbled = message("chunk", {"bytes": "not base64!"})
    assert read("anthropic_messages", True, garbled).malformed


def test_policyds_own_errors_reach_bedrock_clients_in_awss_shape_too() -> None:
    from policyd.http_api import aws_client_path, error_body, for_aws_clients, reply_headers

    assert aws_client_path(f"/model/{SONNET_IN_PATH}/converse-stream") and not aws_client_path("/v1/chat/completions")
    body = error_body("rate_limit_error", "rate_limited", "slow down: 3 requests a minute")
    status, headers, sent = for_aws_clients(429, dict(reply_headers(429, 20)), body)
    assert (status, headers["x-amzn-errortype"], headers["retry-after"]) == (429, "ThrottlingException", "20")
    assert json.loads(sent) == {"message": "slow down: 3 requests a minute", **json.loads(body)}  # OpenAI's error kept
    spent = for_aws_clients(429, dict(reply_headers(429, 0)), error_body("insufficient_quota", "insufficient_quota", "x"))
    assert (spent[0], spent[1]["x-amzn-errortype"]) == (400, "ServiceQuotaExceededException")  # never retried
    for status, name in ((400, "ValidationException"), (401, "UnrecognizedClientException"),
                         (403, "AccessDeniedException"), (404, "ResourceNotFoundException"),
                         (500, "InternalServerException"), (503, "ServiceUnavailableException")):
        assert for_aws_clients(status, {}, error_body("t", "c", "m"))[1]["x-amzn-errortype"] == name
    assert for_aws_clients(200, {}, b'{"ok": 1}') == (200, {}, b'{"ok": 1}')  # not an error
    assert for_aws_clients(502, {}, b"upstream connect error") == (502, {}, b"upstream connect error")
