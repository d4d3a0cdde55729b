"""The reservation bounds against a real byte-level BPE tokenizer (cl100k)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.estimates import CHAT_TOKENS_PER_MESSAGE, CHAT_TOKENS_PER_REQUEST, encoding, measure
from policyd.http_api import parse_call
from policyd.policy import parse_policy
from policyd.pricing import estimate_input_tokens
from tests.conftest import SAMPLE_POLICY

ENCODING = encoding()
PLANS = parse_policy(SAMPLE_POLICY).plans


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=6))
def test_strict_reservation_is_never_below_the_tokenizer(messages: list[str]) -> None:
    actual = sum(len(ENCODING.encode(m, disallowed_special=())) + CHAT_TOKENS_PER_MESSAGE for m in messages) \
        + CHAT_TOKENS_PER_REQUEST
    size = sum(len(m.encode("utf-8", "surrogatepass")) for m in messages)
    assert actual <= estimate_input_tokens(PLANS["free"], size, len(messages), 0)  # free is strict


def test_default_estimate_is_within_its_documented_bound() -> None:
    """Default mode: at most 4x under (one token per byte, bytes/4 reserved); about 1.1x on English."""
    rows = {r.kind: r for r in measure()}
    assert all(r.strict_violations == 0 for r in rows.values())
    assert all(r.worst_default_ratio < 4 for r in rows.values())
    assert rows["english"].worst_default_ratio < 1.25


NAMES = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(NAMES, st.sampled_from(["string", "integer", "boolean"]), min_size=1, max_size=30),
       st.text(max_size=200))
def test_strict_reservation_bounds_tool_definitions_names_and_all(properties: dict[str, str], message: str) -> None:
    """A tool's parameters are billed with their names (the provider renders the schema into the prompt):
    a strict reservation is never below the tokens of the tools' JSON and the message's."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {name: {"type": kind} for name, kind in properties.items()}}}}]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": message}], "tools": tools}
    call = parse_call("POST", "/v1/chat/completions", {}, json.dumps(body).encode())
    actual = len(ENCODING.encode(json.dumps(tools, ensure_ascii=False), disallowed_special=())) \
        + len(ENCODING.encode(message, disallowed_special=())) + CHAT_TOKENS_PER_MESSAGE + CHAT_TOKENS_PER_REQUEST
    assert actual <= estimate_input_tokens(PLANS["free"], call.prompt_bytes, call.message_count, 0)
