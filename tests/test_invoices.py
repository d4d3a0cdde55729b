"""Invoice line items and the period close, from known traffic."""

from __future__ import annotations

import json
import time

import pytest

from policyd.domain import PolicydError
from policyd.invoices import to_csv, to_invoice_unit
from policyd.server import Service
from tests.helpers import ask, fund, new_key, usage

OCTOBER = 1_790_812_800_000  # 2026-10-01T00:00:00Z


def this_month() -> str:
    """The period of what is recorded now (grants, and charges that reach the ledger late, by the real clock)."""
    return time.strftime("%Y-%m", time.gmtime())
DAY = 86_400_000


async def _october(service: Service) -> dict[str, int]:
    clock = [OCTOBER + DAY]
    service.engine.clock = lambda: clock[0]
    policy = (await service.admin.book.version(1)).canonical.replace(
        "    promo_features: []\n", "    promo_features: [launch-week]\n")
    await service.admin.apply_policy(policy, "promo.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "20")
    charges: dict[str, int] = {}
    for i, (model, feature) in enumerate([("gpt-4o", "chat")] * 3 + [("gpt-4o-mini", "search")] * 4
                                         + [("gpt-4o", "launch-week")]):
        clock[0] = OCTOBER + (i + 1) * DAY
        await service.engine.authorize(ask(secret, model=model, request_id=f"oct-{i}", feature=feature))
        s = await service.engine.settle(usage(f"oct-{i}", input_tokens=1000 * (i + 1), output_tokens=333))
        if feature != "launch-week":
            charges[model] = charges.get(model, 0) + s.charge
    return charges


async def test_invoice_lines_credits_and_promos(service: Service) -> None:
    charges = await _october(service)
    invoice = await service.admin.invoice("acme", "2026-10")
    data = invoice.data()
    lines = {line["item"]: line for line in data["lines"]}
    assert set(lines) == {"gpt-4o", "gpt-4o-mini"}
    for model, nanos in charges.items():
        cents = to_invoice_unit(nanos)
        assert lines[model]["charge_nanos"] == nanos
        assert lines[model]["amount"] == f"{cents // 100}.{cents % 100:02d}"
    assert lines["gpt-4o"]["requests"] == 3 and lines["gpt-4o-mini"]["requests"] == 4
    total = sum(to_invoice_unit(n) for n in charges.values())
    assert data["total"] == f"{total // 100}.{total % 100:02d}"
    assert data["promotional_usage"]["requests"] == 1 and data["promotional_usage"]["cost_nanos"] > 0
    again = await service.admin.invoice("acme", "2026-10")
    assert again.text == invoice.text  # byte for byte
    by_feature = (await service.admin.invoice("acme", "2026-10", "feature")).data()
    assert {line["item"] for line in by_feature["lines"]} == {"chat", "search"}
    csv_text = to_csv(invoice)
    assert csv_text.splitlines()[0] == "kind,item,requests,input_tokens,output_tokens,charge_nanos,amount"
    assert csv_text.rstrip().endswith(f"total,,,,,,{data['total']}")
    current = (await service.admin.invoice("acme", this_month())).data()
    assert current["credits"] == [{"source": "purchase", "entries": 1, "amount_nanos": 20_000_000_000,
                                    "amount": "20.00"}]


async def test_closed_period_is_frozen_and_late_charges_move_to_the_next(service: Service) -> None:
    charges = await _october(service)
    closed = await service.admin.invoice("acme", "2026-10", close=True)
    assert closed.closed
    with pytest.raises(PolicydError) as again:
        await service.admin.invoice("acme", "2026-10", close=True)
    assert again.value.reason == "period_closed"
    with pytest.raises(PolicydError, match="has not ended"):
        await service.admin.invoice("acme", this_month(), close=True)
    # a charge dated in October reaches the ledger after the close (a writer that caught up late)
    _, secret = await new_key(service)
    service.engine.clock = lambda: OCTOBER + 20 * DAY
    await service.engine.authorize(ask(secret, model="gpt-4o", request_id="late-oct"))
    late = await service.engine.settle(usage("late-oct", input_tokens=500, output_tokens=50))
    october = await service.admin.invoice("acme", "2026-10")
    assert october.text == closed.text and october.closed  # no silent edit
    current = (await service.admin.invoice("acme", this_month())).data()
    adjustment = current["adjustments_from_closed_periods"]
    assert [(a["item"], a["charge_nanos"]) for a in adjustment] == [("late usage of 2026-10: gpt-4o", late.charge)]
    assert sum(charges.values()) > 0
    # an adjustment of the period it reached the ledger in alone: the next one does not bill it again
    year, month = (int(p) for p in this_month().split("-"))
    following = f"{year + month // 12:04d}-{month % 12 + 1:02d}"
    assert (await service.admin.invoice("acme", following)).data()["adjustments_from_closed_periods"] == []
    assert (await service.admin.invoice("acme", "2026-11")).data()["adjustments_from_closed_periods"] == []


async def test_bad_invoice_requests(service: Service) -> None:
    await _october(service)
    for customer, period, reason in (("nobody", "2026-10", "unknown customer"), ("acme", "2026-13", "YYYY-MM"),
                                     ("acme", "oct", "YYYY-MM")):
        with pytest.raises(PolicydError, match=reason):
            await service.admin.invoice(customer, period)
    with pytest.raises(PolicydError, match="by model or by feature"):
        await service.admin.invoice("acme", "2026-10", "colour")
    assert json.loads((await service.admin.invoice("acme", "2026-10")).text)["customer_id"] == "acme"
