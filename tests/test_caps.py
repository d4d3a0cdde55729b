"""The operator's caps: one counter across every customer (a provider's daily bill, a premium model's
hourly requests), reserved in the same atomic step as each customer's wallet and limits."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from policyd.domain import PolicydError
from policyd.money import parse_amount, price_quantity
from policyd.server import Service
from tests.helpers import ask, counters_lost_and_rebuilt, fund, new_key, usage

_customers = itertools.count()

# one gpt-4o-mini request of ask(prompt_bytes=400, max_output_tokens=100) is estimated at 104 input tokens
ESTIMATE_COST = price_quantity(104, parse_amount("0.15")) + price_quantity(100, parse_amount("0.60"))

CAPPED = """
currency: USD
timezone: Europe/Paris
price_table:
  version: "caps-1"
  models:
    gpt-4o-mini: {provider: openai, tier: low-cost, input: "0.15", output: "0.60"}
    gpt-4o: {provider: openai, tier: premium, input: "2.50", output: "10.00"}
    claude-sonnet: {provider: anthropic, tier: premium, input: "3.00", output: "15.00"}
plans:
  pro:
    models: ["*"]
    markup_bps: 5000
caps:
  - {name: openai-day, provider: openai, window: day, unit: cost, limit: "OPENAI_DAY"}
  - {name: premium-hour, models: ["tier:premium"], window: hour, unit: requests, limit: 3,
     action: downgrade, downgrade_to: gpt-4o-mini}
"""


async def capped(service: Service, openai_day: int, customers: int = 2) -> list[str]:
    """The capped policy, the OpenAI cap at `openai_day` nanos of provider cost; keys of funded customers."""
    from policyd.money import format_amount

    await service.admin.apply_policy(CAPPED.replace("OPENAI_DAY", format_amount(openai_day)), "caps.yaml")
    secrets = []
    for _ in range(customers):
        customer = f"capped-{next(_customers)}"
        secrets.append((await new_key(service, customer=customer, plan="pro"))[1])
        await fund(service, customer, "100")
    return secrets


async def used(service: Service, request_id: str, label: str) -> int:
    """What the cap `label` holds now, found through the request's record."""
    await service.writer.drain()
    key = next(k for k, _unit, _held in service.store.usage_record(request_id).holds if f":cap:{label}:" in k)
    return int(await service.counters.client.hget(key, "used") or 0)


async def test_a_cap_binds_every_customer_together_and_counts_provider_cost(service: Service) -> None:
    """Two customers with money to spare share the operator's OpenAI cap: it counts provider cost (not the
    marked-up charge), is held at Authorize and trued up at Settle, and refuses whoever would cross it."""
    alice, bob = await capped(service, openai_day=ESTIMATE_COST * 5 // 2)
    first = await service.engine.authorize(ask(alice, request_id="a1"))
    assert first.decision == "allow" and first.reserved == ESTIMATE_COST * 3 // 2  # the charge has the markup
    assert await used(service, "a1", "openai-day") == ESTIMATE_COST  # the cap, the provider's cost
    assert (await service.engine.authorize(ask(bob, request_id="b1"))).decision == "allow"
    refused = await service.engine.authorize(ask(bob, request_id="b2"))
    assert (refused.decision, refused.reason, refused.http_status) == ("deny", "budget_exceeded", 429)
    assert 0 < refused.retry_after_seconds <= 86400 + 3600  # until the cap's day ends (in Paris)
    assert (await service.engine.authorize(ask(alice, request_id="c1", model="claude-sonnet"))).decision == "allow"
    await service.engine.settle(usage("a1", input_tokens=100, output_tokens=10))  # less than estimated
    actual = price_quantity(100, parse_amount("0.15")) + price_quantity(10, parse_amount("0.60"))
    assert await used(service, "a1", "openai-day") == actual + ESTIMATE_COST
    assert (await service.engine.authorize(ask(bob, request_id="b3"))).decision == "allow"  # room again
    await service.engine.release("b1", "upstream_error")
    await service.engine.release("b3", "upstream_error")
    assert await used(service, "a1", "openai-day") == actual
    assert (await service.admin.audit()).ok


async def test_a_cap_cannot_be_overshot_by_concurrent_customers(service: Service) -> None:
    """Forty requests of twenty customers at once against a cap with room for seven: seven are allowed."""
    secrets = await capped(service, openai_day=ESTIMATE_COST * 7 + ESTIMATE_COST // 2, customers=20)
    decisions = await asyncio.gather(*(service.engine.authorize(ask(secrets[n % 20], request_id=f"race-{n}"))
                                       for n in range(40)))
    allowed = [d.request_id for d in decisions if d.decision == "allow"]
    assert len(allowed) == 7
    assert {d.reason for d in decisions if d.decision == "deny"} == {"budget_exceeded"}
    assert await used(service, allowed[0], "openai-day") == 7 * ESTIMATE_COST


async def test_a_cap_may_downgrade_to_a_model_it_does_not_cover(service: Service) -> None:
    """The premium cap's fourth request in the hour is served on gpt-4o-mini, whoever sends it."""
    alice, bob = await capped(service, openai_day=parse_amount("100"))
    served = [(await service.engine.authorize(ask(secret, model="gpt-4o", request_id=f"p{n}"))).served_model
              for n, secret in enumerate((alice, bob, alice, bob))]
    assert served == ["gpt-4o", "gpt-4o", "gpt-4o", "gpt-4o-mini"]
    late = await service.engine.authorize(ask(alice, model="claude-sonnet", request_id="p4"))
    assert (late.decision, late.served_model) == ("downgrade", "gpt-4o-mini")


async def test_rebuild_restores_a_cap_from_the_records(service: Service) -> None:
    alice, bob = await capped(service, openai_day=ESTIMATE_COST * 5 // 2)
    await service.engine.authorize(ask(alice, request_id="open"))
    await service.engine.authorize(ask(bob, request_id="done"))
    await service.engine.settle(usage("done"))
    before = await used(service, "open", "openai-day")
    await counters_lost_and_rebuilt(service)
    assert await used(service, "open", "openai-day") == before
    assert (await service.engine.authorize(ask(bob, request_id="over"))).reason == "budget_exceeded"
    assert (await service.admin.audit()).ok


async def test_an_operator_resets_a_cap_and_its_customers_are_served_again(service: Service) -> None:
    """A cap reached (the operator checked the provider's bill, stopped a runaway): ResetCap forgives what its
    settled requests counted this window, every customer's; a request in flight keeps its hold and settles into
    the window; the next requests are served, up to the same cap; a second reset forgives what settled since. Kept
    in SQL: the audit agrees and a rebuild writes the cap as the reset left it. An unknown cap is refused."""
    alice, bob = await capped(service, openai_day=ESTIMATE_COST * 5 // 2)
    for n, secret in enumerate((alice, bob)):
        assert (await service.engine.authorize(ask(secret, request_id=f"r{n}"))).decision == "allow"
        await service.engine.settle(usage(f"r{n}"))
    await service.writer.drain()
    settled = sum(service.store.usage_record(f"r{n}").cost_nanos for n in range(2))
    flight = await service.engine.authorize(ask(alice, request_id="in-flight"))
    assert flight.decision == "allow"
    assert (await service.engine.authorize(ask(bob, request_id="refused"))).reason == "budget_exceeded"
    before = await used(service, "in-flight", "openai-day")
    cap, held, forgiven, after, ends = await service.admin.reset_cap("openai-day", "runaway stopped, ticket 9")
    assert (cap.name, held, forgiven, after) == ("openai-day", before, settled, ESTIMATE_COST) and ends > 0
    assert (await service.engine.authorize(ask(bob, request_id="served"))).decision == "allow"
    await service.engine.settle(usage("in-flight"))
    await service.engine.settle(usage("served"))
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    kept = await used(service, "served", "openai-day")
    await counters_lost_and_rebuilt(service)
    assert await used(service, "served", "openai-day") == kept
    assert (await service.admin.audit()).ok
    again = await service.admin.reset_cap("openai-day")
    assert again[2] == sum(service.store.usage_record(r).cost_nanos for r in ("in-flight", "served")) and again[3] == 0
    assert (await service.admin.audit()).ok
    with pytest.raises(PolicydError) as unknown:
        await service.admin.reset_cap("nobody-day")
    assert unknown.value.reason == "unknown_cap"


@pytest.mark.parametrize("caps, message", [
    ('[{name: x, provider: nobody, window: day, unit: cost, limit: "1"}]', "match nothing"),
    ('[{name: x, window: day, unit: cost, limit: "1"}, {name: x, window: hour, unit: requests, limit: 1}]',
     "another cap"),
    ('[{name: x, models: [gpt-4o], window: day, unit: cost, limit: "1", action: downgrade, downgrade_to: nope}]',
     "not in the price table"),
    ('[{name: "a b", window: day, unit: cost, limit: "1"}]', "name"),
])
async def test_caps_that_cannot_work_are_refused_with_the_reason(service: Service, caps: str, message: str) -> None:
    text = CAPPED.split("caps:")[0] + f"caps: {caps}\n"
    with pytest.raises(PolicydError) as refused:
        await service.admin.apply_policy(text, "caps.yaml")
    assert refused.value.reason == "invalid_policy" and message in refused.value.message


async def test_rate_limit_figures_name_the_customers_own_limits_not_the_operators_caps(service: Service) -> None:
    """A decision tells the tightest blocking request and token limit of the customer's own (for the
    x-ratelimit-* headers); shadow limits refuse nothing and caps are the operator's: neither is told."""
    await service.admin.apply_policy(CAPPED.replace("OPENAI_DAY", "100.00").replace("    markup_bps: 5000\n", """\
    markup_bps: 5000
    limits:
      - {name: key-hour, scope: key, window: hour, unit: requests, limit: 5}
      - {name: customer-hour, scope: customer, window: hour, unit: requests, limit: 4}
      - {name: watch, scope: key, window: hour, unit: requests, limit: 1, action: shadow}
      - {name: key-day-tokens, scope: key, window: day, unit: tokens, limit: 10000}
"""), "caps.yaml")
    _, secret = await new_key(service, customer="paced", plan="pro")
    await fund(service, "paced", "10")
    first = await service.engine.authorize(ask(secret, request_id="r1"))
    second = await service.engine.authorize(ask(secret, request_id="r2"))
    limits = {r.unit: (r.limit, r.remaining) for r in second.rate_limits}
    assert limits == {"requests": (4, 2), "tokens": (10000, 10000 - 2 * (104 + 100))}  # the customer's 4, after two
    assert {r.unit: r.remaining for r in first.rate_limits}["requests"] == 3
    assert all(r.resets_ms > 0 for r in second.rate_limits)
    assert second.shadow_denials == ("watch",)  # over its shadow limit, which is not what the figures tell


def test_rate_limit_headers_say_the_reset_as_openai_writes_it() -> None:
    from policyd.domain import RateLimit
    from policyd.http_api import rate_limit_headers

    now = 1_000_000
    headers = dict(rate_limit_headers([RateLimit("requests", 60, 59, now + 250), RateLimit("tokens", 9, 0, now + 90_500)],
                                      now))
    assert headers == {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
                       "x-ratelimit-reset-requests": "250ms", "x-ratelimit-limit-tokens": "9",
                       "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m31s"}
    assert dict(rate_limit_headers([RateLimit("requests", 5, 1, now + 7_200_000)], now))[
        "x-ratelimit-reset-requests"] == "2h0m0s"
    assert "x-ratelimit-reset-requests" not in dict(rate_limit_headers([RateLimit("requests", 5, 1, 0)], now))
