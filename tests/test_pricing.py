"""Money arithmetic: the unit, the one rounding rule, cost and charge."""

from __future__ import annotations

import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.money import AMOUNT_MAX, MoneyError, format_amount, parse_amount, price_quantity
from policyd.policy import PolicyError, parse_policy
from policyd.pricing import Quantities, charge_of, cost_of
from tests.conftest import SAMPLE_POLICY


def test_parse_amount_is_exact() -> None:
    assert parse_amount("2.50") == 2_500_000_000
    assert parse_amount("0.000000001") == 1
    assert parse_amount(3) == 3_000_000_000
    assert parse_amount(Decimal("0.075")) == 75_000_000
    for bad in ("0.0000000001", "abc", "NaN", "Infinity", "1e30", 2.5, True):
        with pytest.raises(MoneyError):
            parse_amount(bad)  # type: ignore[arg-type]


@given(st.integers(-AMOUNT_MAX, AMOUNT_MAX))
def test_format_and_parse_round_trip(nanos: int) -> None:
    assert parse_amount(format_amount(nanos)) == nanos


@given(st.integers(0, 10**12), st.integers(0, 10**12))
def test_price_quantity_rounds_up_and_never_undercharges(quantity: int, price: int) -> None:
    cost = price_quantity(quantity, price)
    assert cost * 1_000_000 >= quantity * price > (cost - 1) * 1_000_000 or quantity * price == 0 == cost


def test_cost_and_charge_by_billing_mode() -> None:
    yaml = SAMPLE_POLICY.replace("  internal-staging:", """  discounted:
    models: ["tier:premium"]
    markup_bps: -2500
  listed:
    models: ["tier:premium"]
    price_list:
      gpt-4o: {input: "3.00", output: "12.00"}
  internal-staging:""")
    policy = parse_policy(yaml)
    price = policy.price_table.models["gpt-4o"]
    q = Quantities(input_tokens=1000, cached_input_tokens=200, output_tokens=333)
    cost = cost_of(price, q)
    # 800 x 2.50 + 200 x 1.25 + 333 x 10.00 per 1M, in nanos, each component rounded up
    assert cost == 2_000_000 + 250_000 + 3_330_000
    assert charge_of(policy.plans["pro"], "gpt-4o", q, cost) == cost * 12 // 10
    assert charge_of(policy.plans["internal-staging"], "gpt-4o", q, cost) == cost
    assert charge_of(policy.plans["discounted"], "gpt-4o", q, cost) == cost * 3 // 4
    assert charge_of(policy.plans["listed"], "gpt-4o", q, cost) == 1000 * 3_000 + 333 * 12_000
    free = parse_policy(SAMPLE_POLICY.replace("    reservation: strict\n", "    reservation: strict\n    billing: free\n"))
    assert charge_of(free.plans["free"], "gpt-4o-mini", q, 12345) == 0


def test_cache_reads_and_writes_have_their_own_prices() -> None:
    policy = parse_policy(SAMPLE_POLICY)
    claude = policy.price_table.models["claude-sonnet-4"]
    q = Quantities(input_tokens=10_000, cached_input_tokens=6_000, cache_write_input_tokens=3_000, output_tokens=100)
    # 1,000 uncached x 3.00 + 6,000 read x 0.30 + 3,000 written x 3.75 + 100 out x 15.00, per 1M
    assert cost_of(claude, q) == 3_000_000 + 1_800_000 + 11_250_000 + 1_500_000


def test_web_searches_are_charged_per_search_or_once_a_request_as_the_model_is_billed() -> None:
    from policyd.policy import ModelPrice

    per_search = ModelPrice(provider="google", input="0", output="0", per_web_search="0.014")
    per_request = ModelPrice(provider="google", input="0", output="0", per_web_search="0.035", web_search_unit="request")
    for searches in (0, 1, 3):
        q = Quantities(web_searches=searches)
        assert cost_of(per_search, q) == searches * parse_amount("0.014")
        assert cost_of(per_request, q) == min(searches, 1) * parse_amount("0.035")
    with pytest.raises(ValueError):
        ModelPrice(provider="google", input="0", output="0", web_search_unit="query")


def test_a_price_between_nanos_rounds_up() -> None:
    # 0.0000015 per 1M tokens = 0.0015 nanos per token
    price = parse_amount("0.0000015")
    assert price_quantity(1, price) == 1
    assert price_quantity(1000, price) == 2  # 1.5 nanos
    assert price_quantity(2000, price) == 3
    assert price_quantity(0, price) == 0
    assert price_quantity(1000, parse_amount("0.075")) == 75_000  # exact: no rounding


LONG_CONTEXT = """currency: USD
price_table:
  version: "tiers"
  models:
    gemini-2.5-pro: {provider: google, input: "1.25", cached_input: "0.31", output: "10.00", per_request: "0.001",
                     long_context_above: 200000,
                     long_context: {input: "2.50", cached_input: "0.625", output: "15.00"}}
plans:
  pro:
    models: [gemini-2.5-pro]
    markup_bps: 1000
    price_list:
      gemini-2.5-pro: {input: "2.00", output: "12.00", long_context_above: 200000,
                       long_context: {input: "4.00", output: "18.00"}}
  at-cost:
    models: [gemini-2.5-pro]
    billing: at_cost
"""


def test_a_service_tier_has_its_own_token_prices() -> None:
    document = parse_policy(LONG_CONTEXT.replace('per_request: "0.001",', 'per_request: "0.001", service_tiers: {'
                                                 'flex: {input: "0.625", output: "5.00"}, priority: {input: "2.50", '
                                                 'output: "20.00"}},'))
    price = document.price_table.models["gemini-2.5-pro"]
    q = {"input_tokens": 1_000, "output_tokens": 100}
    assert cost_of(price, Quantities(**q, service_tier="flex")) == (
        price_quantity(1_000, parse_amount("0.625")) + price_quantity(100, parse_amount("5.00")) + 1_000_000)
    assert cost_of(price, Quantities(**q, service_tier="priority")) == (
        price_quantity(1_000, parse_amount("2.50")) + price_quantity(100, parse_amount("20.00")) + 1_000_000)
    assert cost_of(price, Quantities(**q, service_tier="scale")) == cost_of(price, Quantities(**q))  # not priced: base


def test_an_hours_cache_writes_have_their_own_price_and_default_to_cache_writes() -> None:
    base = parse_policy(LONG_CONTEXT.replace('per_request: "0.001",', 'per_request: "0.001", cache_write_input: "1.50",'))
    hour = parse_policy(LONG_CONTEXT.replace('per_request: "0.001",',
                                             'per_request: "0.001", cache_write_input: "1.50", cache_write_1h_input: "2.50",'))
    q = Quantities(input_tokens=1_000, cache_write_input_tokens=600, cache_write_1h_input_tokens=200)
    plain = price_quantity(400, parse_amount("1.25")) + 1_000_000
    assert cost_of(base.price_table.models["gemini-2.5-pro"], q) == plain + price_quantity(600, parse_amount("1.50"))
    assert cost_of(hour.price_table.models["gemini-2.5-pro"], q) == (
        plain + price_quantity(400, parse_amount("1.50")) + price_quantity(200, parse_amount("2.50")))


def test_audio_tokens_have_their_own_prices_and_default_to_texts() -> None:
    document = parse_policy(LONG_CONTEXT.replace('per_request: "0.001",', 'per_request: "0.001", audio_input: "40.00",'))
    price = document.price_table.models["gemini-2.5-pro"]
    q = Quantities(input_tokens=1_000, cached_input_tokens=100, audio_input_tokens=400, output_tokens=50,
                   audio_output_tokens=20)
    assert cost_of(price, q) == (price_quantity(500, parse_amount("1.25")) + price_quantity(400, parse_amount("40.00"))
                                 + price_quantity(100, parse_amount("0.31")) + price_quantity(30, parse_amount("10.00"))
                                 + price_quantity(20, parse_amount("10.00")) + 1_000_000)  # audio output: as output


def test_a_web_search_has_its_own_price_whatever_the_tier() -> None:
    price = parse_policy(LONG_CONTEXT.replace('per_request: "0.001",', 'per_request: "0.001", per_web_search: "0.01",')
                         ).price_table.models["gemini-2.5-pro"]
    assert cost_of(price, Quantities(web_searches=3)) - cost_of(price, Quantities()) == 30_000_000
    long = Quantities(input_tokens=300_000, web_searches=1)
    assert cost_of(price, long) == price_quantity(300_000, parse_amount("2.50")) + 1_000_000 + 10_000_000


def test_past_the_long_context_threshold_every_token_has_the_tiers_price() -> None:
    document = parse_policy(LONG_CONTEXT)
    price = document.price_table.models["gemini-2.5-pro"]
    at = Quantities(input_tokens=200_000, cached_input_tokens=100_000, output_tokens=1_000)
    past = Quantities(input_tokens=200_001, cached_input_tokens=100_000, output_tokens=1_000)
    # 100,000 x 1.25 + 100,000 x 0.31 + 1,000 x 10.00 per 1M, + the request
    assert cost_of(price, at) == 125_000_000 + 31_000_000 + 10_000_000 + 1_000_000
    # 100,001 x 2.50 + 100,000 x 0.625 + 1,000 x 15.00 per 1M, + the request (not a token price: unchanged)
    assert cost_of(price, past) == 250_002_500 + 62_500_000 + 15_000_000 + 1_000_000
    pro, at_cost = document.plans["pro"], document.plans["at-cost"]
    assert charge_of(at_cost, "gemini-2.5-pro", past, cost_of(price, past)) == cost_of(price, past)
    # the plan's own price list has its own tier (its cached input: the tier's input, as it names none)
    assert charge_of(pro, "gemini-2.5-pro", past, 0) == 400_004_000 + 400_000_000 + 18_000_000
    assert charge_of(pro, "gemini-2.5-pro", at, 0) == 200_000_000 + 200_000_000 + 12_000_000


@pytest.mark.parametrize(("tier", "problem"), [
    ("long_context: {input: \"2.50\"}", "long_context and long_context_above (input tokens) go together"),
    ("long_context_above: 1000", "long_context and long_context_above (input tokens) go together"),
    ("long_context_above: 10, long_context: {input: \"2\", long_context_above: 20, long_context: {input: \"3\"}}",
     "a long_context tier has no tier of its own"),
])
def test_a_long_context_tier_is_whole(tier: str, problem: str) -> None:
    text = LONG_CONTEXT.replace("""long_context_above: 200000,
                     long_context: {input: "2.50", cached_input: "0.625", output: "15.00"}}""", tier + "}")
    with pytest.raises(PolicyError, match=re.escape(problem)):
        parse_policy(text)


@st.composite
def _token_parts(draw: st.DrawFn) -> Quantities:
    """Input and output tokens and parts of them that fit (as check_usage requires)."""
    input_tokens, output_tokens = draw(st.integers(0, 10**9)), draw(st.integers(0, 10**9))
    left = input_tokens
    parts = {}
    for name in ("cached_input_tokens", "cache_write_input_tokens", "audio_input_tokens", "image_input_tokens"):
        parts[name] = draw(st.integers(0, left))
        left -= parts[name]
    parts["audio_output_tokens"] = draw(st.integers(0, output_tokens))
    parts["image_output_tokens"] = draw(st.integers(0, output_tokens - parts["audio_output_tokens"]))
    return Quantities(input_tokens=input_tokens, output_tokens=output_tokens, requests=0, **parts)


@given(_token_parts(), st.integers(0, 10**11), st.integers(0, 10**11))
def test_a_part_without_its_own_price_costs_what_its_whole_does(q: Quantities, input_price: int, output_price: int) -> None:
    """Every part of the input and output (cached, cache writes, audio, images) is priced as its whole when
    the table gives it no price of its own: only the rounding of each part up (never down) can add, at
    most a nano a part."""
    document = parse_policy(SAMPLE_POLICY)
    price = document.price_table.models["gpt-4o"].model_copy(update={"input": input_price, "output": output_price,
                                                                     "cached_input": None})
    whole = cost_of(price, Quantities(input_tokens=q.input_tokens, output_tokens=q.output_tokens, requests=0))
    assert whole <= cost_of(price, q) <= whole + 8


@given(_token_parts(), st.integers(1, 10**11))
def test_a_part_priced_dearer_costs_more_by_exactly_its_difference(q: Quantities, extra: int) -> None:
    """Images out at their own price (Gemini's image models): dearer by `extra` a million, the image tokens
    cost that much more, rounded as their part is, and nothing else moves."""
    document = parse_policy(SAMPLE_POLICY)
    base = document.price_table.models["gpt-4o"]
    dearer = base.model_copy(update={"image_output": base.output + extra})
    added = cost_of(dearer, q) - cost_of(base, q)
    images = q.image_output_tokens
    assert added == price_quantity(images, base.output + extra) - price_quantity(images, base.output)


def test_containers_are_priced_by_their_memory() -> None:
    document = parse_policy(SAMPLE_POLICY.replace('      output: "0.60"', '      output: "0.60"\n'
                                                  '      per_container: {1g: "0.03", 4g: "0.12"}', 1))
    price = document.price_table.models["gpt-4o-mini"]
    assert cost_of(price, Quantities(containers=2, container_memory="4g", requests=0)) == 2 * parse_amount("0.12")
    assert cost_of(price, Quantities(containers=1, container_memory="1g", requests=0)) == parse_amount("0.03")
    with pytest.raises(PolicyError):
        parse_policy(SAMPLE_POLICY.replace('      output: "0.60"', '      output: "0.60"\n'
                                           '      per_container: {1g: "-0.03"}', 1))


def test_a_search_context_fee_and_reasoning_at_its_own_price() -> None:
    """per_search_context: a fee a request by its search's context size; the default's for none named, the
    dearest for a size not priced; it needs a default among its sizes. reasoning_output: the reasoning part of
    the output at its own price (None: as output)."""
    yaml = SAMPLE_POLICY.replace("  models:\n", "  models:\n    sonar:\n      provider: perplexity\n"
                                 "      input: \"1.00\"\n      output: \"1.00\"\n      reasoning_output: \"3.00\"\n"
                                 "      per_search_context: {low: \"0.005\", medium: \"0.008\", high: \"0.012\"}\n"
                                 "      search_context_default: medium\n", 1)
    price = parse_policy(yaml).price_table.models["sonar"]
    fees = {size: cost_of(price, Quantities(search_context_size=size)) for size in ("", "low", "high", "ultra")}
    assert fees == {"": 8_000_000, "low": 5_000_000, "high": 12_000_000, "ultra": 12_000_000}
    assert cost_of(price, Quantities(output_tokens=1_000_000, reasoning_output_tokens=400_000, requests=0)) == \
        600 * 1_000_000 + 400 * 3_000_000
    for good, bad in (("      search_context_default: medium\n", ""), ("default: medium", "default: huge"),
                      ("{low: ", "{Low: ")):
        with pytest.raises(PolicyError, match="search_context_default|lowercase"):
            parse_policy(yaml.replace(good, bad, 1))
    plain = parse_policy(SAMPLE_POLICY).price_table.models["gpt-4o-mini"]
    assert cost_of(plain, Quantities(search_context_size="high")) == \
        cost_of(plain, Quantities())  # a model without the fee pays none, whatever the size


@given(st.integers(0, 10**15), st.integers(0, 10**11))
def test_an_explicit_caches_storage_is_priced_per_token_hour_by_the_one_rounding_rule(token_seconds: int,
                                                                                     price: int) -> None:
    """cache_storage is per 1M token-hours; a cache's storage comes in token-seconds: priced exactly, rounded up
    once (a millionth of a token-hour's price never lost to rounding each hour or each second apart)."""
    yaml = SAMPLE_POLICY.replace("  models:\n", "  models:\n    cached:\n      provider: google\n"
                                 f"      input: \"1.00\"\n      cache_storage: \"{format_amount(price)}\"\n", 1)
    model = parse_policy(yaml).price_table.models["cached"]
    stored = cost_of(model, Quantities(cache_storage_token_seconds=token_seconds, requests=0))
    assert stored == -(-token_seconds * price // (1_000_000 * 3600))
    assert stored * 1_000_000 * 3600 >= token_seconds * price > (stored - 1) * 1_000_000 * 3600 or stored == 0
    assert cost_of(model, Quantities(input_tokens=1_000, cache_storage_token_seconds=token_seconds, requests=0)) == \
        1_000 * 1_000 + stored  # its tokens written at input, beside
