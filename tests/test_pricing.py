"""Money arithmetic: the unit, the one rounding rule, cost and charge."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policyd.money import AMOUNT_MAX, MoneyError, format_amount, parse_amount, price_quantity
from policyd.policy import parse_policy
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


def test_a_price_between_nanos_rounds_up() -> None:
    # 0.0000015 per 1M tokens = 0.0015 nanos per token
    price = parse_amount("0.0000015")
    assert price_quantity(1, price) == 1
    assert price_quantity(1000, price) == 2  # 1.5 nanos
    assert price_quantity(2000, price) == 3
    assert price_quantity(0, price) == 0
    assert price_quantity(1000, parse_amount("0.075")) == 75_000  # exact: no rounding
