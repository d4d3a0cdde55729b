"""Money: integers of nano-units, and the one rounding rule.

Every amount in policyd is an ``int`` count of **nanos**: 1e-9 of the currency's
unit (1 USD = 1_000_000_000 nanos, like the ``nanos`` of ``google.type.Money``).
No float ever carries money.

The one rounding rule (applied here and nowhere else): a product of a quantity
and a price that falls between two nanos is rounded **up** (towards +infinity).
Prices are per million units (tokens), so ``cost = ceil(quantity * price / 1e6)``.
Rounding up per line never under-charges and never under-reserves.

Redis Lua numbers are doubles, exact only up to 2**53. Every amount that reaches
Redis is bounded by ``AMOUNT_MAX`` (2**53 - 1 nanos, about 9.007 million units),
checked at the edges (price tables, grants, estimates), so Lua arithmetic on
them stays exact.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

NANOS_PER_UNIT = 1_000_000_000
PRICE_QUANTITY = 1_000_000  # prices are per million tokens (or per million of any counted unit)
# ... and per million token-hours of explicit cache storage (Gemini's cachedContents), counted in token-seconds
PRICE_TOKEN_SECONDS = PRICE_QUANTITY * 3600
AMOUNT_MAX = 2**53 - 1
QUANTITY_MAX = 10**12  # tokens, images, seconds in one request: far beyond any real one
TOKEN_SECONDS_MAX = 10**15  # an explicit cache's tokens x its seconds: a million tokens kept 31 years
MONEY_UNITS = ("money", "cost")  # limit units counted in the currency: what customers are charged, what providers bill


class MoneyError(ValueError):
    """An amount that is not an exact, in-range number of nanos."""


def ceil_div(numerator: int, denominator: int) -> int:
    if denominator <= 0:
        raise MoneyError("denominator must be positive")
    return -((-numerator) // denominator)


def price_quantity(quantity: int, price_nanos_per_million: int, per: int = PRICE_QUANTITY) -> int:
    """The cost of `quantity` units at a price per million units (`per`: PRICE_TOKEN_SECONDS for token-seconds at
    a price per million token-hours): THE rounding rule."""
    if quantity < 0 or price_nanos_per_million < 0:
        raise MoneyError("quantity and price must not be negative")
    return ceil_div(quantity * price_nanos_per_million, per)


def apply_basis_points(amount: int, basis_points: int) -> int:
    """`amount` scaled by basis_points/10_000 (10_000 = 100%), rounded by the same rule."""
    return ceil_div(amount * basis_points, 10_000)


def parse_amount(text: str | int | Decimal) -> int:
    """'2.50' -> 2_500_000_000 nanos. Exact: more than 9 decimals is an error. Floats are refused."""
    if isinstance(text, bool):
        raise MoneyError("an amount must be a decimal string such as '2.50'")
    if isinstance(text, (int, Decimal)):
        value = Decimal(text)
    elif isinstance(text, str):
        try:
            value = Decimal(text.strip())
        except InvalidOperation:
            raise MoneyError(f"not a decimal amount: {text!r}") from None
    else:
        raise MoneyError(f"an amount must be a decimal string such as '2.50', not {type(text).__name__}")
    if not value.is_finite():
        raise MoneyError(f"not a finite amount: {text!r}")
    nanos = value * NANOS_PER_UNIT
    if nanos != nanos.to_integral_value():
        raise MoneyError(f"{text} has more than 9 decimals (the nano is the smallest unit)")
    result = int(nanos)
    if abs(result) > AMOUNT_MAX:
        raise MoneyError(f"{text} is out of range (at most {format_amount(AMOUNT_MAX)})")
    return result


def parse_external_amount(value: Decimal | int | str) -> int:
    """An amount from outside policyd (a provider's export) that may carry more than 9 decimals:
    rounded to the nano by the same rule as everything else (up)."""
    try:
        exact = Decimal(value) * NANOS_PER_UNIT
    except InvalidOperation:
        raise MoneyError(f"not a decimal amount: {value!r}") from None
    if not exact.is_finite() or abs(exact) > AMOUNT_MAX:
        raise MoneyError(f"amount out of range: {value!r}")
    return -int((-exact).to_integral_value(rounding="ROUND_FLOOR"))


def format_amount(nanos: int) -> str:
    """2_500_000_000 -> '2.500000000' (exact, for people and CSV)."""
    sign = "-" if nanos < 0 else ""
    units, rest = divmod(abs(nanos), NANOS_PER_UNIT)
    return f"{sign}{units}.{rest:09d}"
