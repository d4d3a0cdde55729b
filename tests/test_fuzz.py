"""Hostile input: random and oversized fields never crash a decision, never leak a reservation,
and always come back as a clear answer (a decision, or a PolicydError with a machine reason)."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd.domain import Attribution, AuthorizeInput, PolicydError, Shape, UsageReport
from policyd.server import Service
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
                    image_count=draw(numbers), input_tokens=draw(numbers)),
        client_address=draw(text), user_agent=draw(text),
    )


def test_random_authorize_and_settle_input(tmp_path) -> None:
    loop = asyncio.new_event_loop()
    service = loop.run_until_complete(Service.build(make_settings(
        {"redis_url": "", "database_url": f"sqlite:///{tmp_path / 'f.db'}"})))
    loop.run_until_complete(service.start())
    loop.run_until_complete(service.admin.apply_policy(SAMPLE_POLICY.replace("limit: 600}", "limit: 1000000}"), "p"))
    key = loop.run_until_complete(service.admin.create_key(label="f", customer_id="fuzz", environment="production",
                                                           plan="pro"))
    loop.run_until_complete(service.admin.grant_credit("fuzz", 10**12, "USD", "purchase"))
    allowed: list[str] = []

    sane = st.builds(
        AuthorizeInput, api_key=st.just(key.secret), endpoint=st.sampled_from(["chat_completions", "responses"]),
        model=st.sampled_from(["gpt-4o", "gpt-4o-mini", "claude-sonnet-4"]),
        attribution=st.builds(Attribution, request_id=st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True),
                              feature=st.from_regex(r"[a-z]{0,8}", fullmatch=True)),
        shape=st.builds(Shape, prompt_bytes=st.integers(0, 10**6), max_output_tokens=st.integers(0, 10**5)))

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=st.one_of(sane, requests(key.secret)), usage=st.tuples(numbers, numbers, numbers))
    def one(request: AuthorizeInput, usage: tuple[int, int, int]) -> None:
        decision = loop.run_until_complete(service.engine.authorize(request))
        assert decision.decision in ("allow", "deny", "downgrade")
        if decision.decision == "deny":
            assert decision.reason and 400 <= decision.http_status < 600
            return
        allowed.append(decision.request_id)
        try:
            loop.run_until_complete(service.engine.settle(UsageReport(
                request_id=decision.request_id, input_tokens=usage[0], output_tokens=usage[1], images=usage[2])))
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
