"""The reservation bounds against a real byte-level BPE tokenizer (cl100k)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.estimates import CHAT_TOKENS_PER_MESSAGE, CHAT_TOKENS_PER_REQUEST, encoding, measure
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
