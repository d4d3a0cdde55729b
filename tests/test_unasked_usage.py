"""The usage event of a stream whose client did not ask for it, kept from that client (policyd/unasked_usage.py)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.http_api import parse_call
from policyd.unasked_usage import UnaskedUsage, usage_only

CONTENT = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'
STOP = b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
USAGE = b'data: {"id":"c","choices": [ ],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}'
# some providers put the usage on the last chunk with its choice: clients read that chunk, so it stays
USAGE_WITH_CHOICE = b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":9}}'
# text that only looks like the event, inside a content delta (escaped quotes): stays
LOOKALIKE = b'data: {"choices":[{"index":0,"delta":{"content":"\\"choices\\": [], \\"usage\\": {}"}}]}'
DONE = b"data: [DONE]"


def through(pieces: list[bytes]) -> bytes:
    stream = UnaskedUsage()
    return b"".join(stream.feed(piece) for piece in pieces) + stream.finish()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


def test_the_usage_event_alone_is_taken_out() -> None:
    for blank in (b"\n\n", b"\r\n\r\n"):
        events = [CONTENT, LOOKALIKE, STOP, USAGE_WITH_CHOICE, USAGE, DONE]
        stream = blank.join(events) + blank
        kept = blank.join([CONTENT, LOOKALIKE, STOP, USAGE_WITH_CHOICE, DONE]) + blank
        assert through([stream]) == kept
    assert usage_only(USAGE + b"\n\n") and not usage_only(USAGE_WITH_CHOICE) and not usage_only(LOOKALIKE)
    assert not usage_only(b'data: {"choices": [], "usage": {"a": 1}')  # not JSON: passes as sent


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([CONTENT, STOP, USAGE, USAGE_WITH_CHOICE, LOOKALIKE, b": keep-alive"]), max_size=8),
       st.sampled_from([b"\n\n", b"\r\n\r\n"]), st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_of_a_stream_gives_the_client_every_byte_but_the_usage_events(
        events: list[bytes], blank: bytes, cuts: list[int]) -> None:
    """However the network splits the stream, the client gets the same bytes, in order, less the usage
    events; an event is held only until its blank line arrives."""
    stream = blank.join([*events, DONE]) + blank
    expected = blank.join([e for e in [*events, DONE] if e != USAGE]) + blank
    assert through(split(stream, cuts)) == expected
    unterminated = stream + b"data: {\"choices\":[{\"index\":0}]}"  # a last event without its blank line
    assert through(split(unterminated, cuts)) == expected + b"data: {\"choices\":[{\"index\":0}]}"


def test_only_streams_whose_client_did_not_ask_for_usage_lose_the_event() -> None:
    def unasked(path: str, body: dict) -> bool:
        return parse_call("POST", path, {"authorization": "Bearer k"}, json.dumps(body).encode()).usage_unasked
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert unasked("/v1/chat/completions", {**chat, "stream": True})
    assert unasked("/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": False}})
    assert unasked("/v1/completions", {"model": "m", "prompt": "x", "stream": True})
    assert not unasked("/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}})
    assert not unasked("/v1/chat/completions", chat)  # not a stream: its usage is in the reply anyway
    assert not unasked("/v1/responses", {"model": "m", "input": "x", "stream": True})  # its usage is always sent
