"""Provider invoice reconciliation against the ledger, with an export that has one missing line,
one price mismatch and one extra line."""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal

import pytest
import yaml

from policyd.domain import PolicydError
from policyd.money import parse_amount, price_quantity
from policyd.server import Service
from tests.conftest import SAMPLE_POLICY
from tests.helpers import ask, fund, new_key, usage

DAY1 = 1_793_491_200  # 2026-11-01T00:00:00Z, seconds
DAY = 86_400


def units(nanos: int) -> str:
    return str(Decimal(nanos) / Decimal(10**9))


async def _ledger(service: Service) -> dict[tuple[str, str], int]:
    clock = [0]
    service.engine.clock = lambda: clock[0]
    _, secret = await new_key(service)
    await fund(service, "acme", "50")
    costs: dict[tuple[str, str], int] = {}
    for day, model, n in ((0, "gpt-4o", 3), (0, "gpt-4o-mini", 2), (1, "gpt-4o", 2)):
        for i in range(n):
            clock[0] = (DAY1 + day * DAY + 3600 + i) * 1000
            rid = f"d{day}-{model}-{i}"
            await service.engine.authorize(ask(secret, model=model, request_id=rid))
            s = await service.engine.settle(usage(rid, input_tokens=1234 + i, output_tokens=321))
            key = (f"2026-11-0{day + 1}", model)
            costs[key] = costs.get(key, 0) + s.cost
    return costs


def _costs_export(lines: list[tuple[int, str, str]]) -> bytes:
    """The OpenAI organization costs API shape: pages of daily buckets."""
    buckets: dict[int, list] = {}
    for start, line_item, value in lines:
        buckets.setdefault(start, []).append({"object": "organization.costs.result", "line_item": line_item,
                                              "project_id": "proj_1", "amount": {"value": value, "currency": "usd"}})
    # numbers are written as JSON numbers, like the API does
    text = json.dumps({"object": "page", "data": [
        {"object": "bucket", "start_time": s, "end_time": s + DAY, "results": r} for s, r in sorted(buckets.items())]})
    for _, _, value in lines:
        text = text.replace(f'"value": "{value}"', f'"value": {value}')
    return text.encode()


async def test_missing_mismatched_and_extra_lines_are_reported(service: Service) -> None:
    costs = await _ledger(service)
    gpt4o_day1 = costs[("2026-11-01", "gpt-4o")]
    mini_day1 = costs[("2026-11-01", "gpt-4o-mini")]
    export = _costs_export([
        # gpt-4o on day 1, split into input and output line items under its dated name: matches exactly
        (DAY1, "gpt-4o-2024-08-06, input", units(gpt4o_day1 - 1_000_000)),
        (DAY1, "gpt-4o-2024-08-06, output", units(1_000_000)),
        # gpt-4o-mini on day 1 billed one cent more: a price mismatch
        (DAY1, "gpt-4o-mini-2024-07-18, input", units(mini_day1 + 10_000_000)),
        # day 2's gpt-4o is missing from the export; an extra line on day 3 policyd never saw
        (DAY1 + 2 * DAY, "gpt-4o-mini-2024-07-18, input", "0.5"),
    ])
    result = await service.admin.reconcile("openai", export)
    status = {(c.day, c.model): c for c in result.comparisons}
    assert status[("2026-11-01", "gpt-4o")].status == "matched"
    assert status[("2026-11-01", "gpt-4o-mini")].status == "mismatched"
    assert status[("2026-11-01", "gpt-4o-mini")].difference_nanos == 10_000_000
    assert status[("2026-11-02", "gpt-4o")].status == "missing_in_export"
    assert status[("2026-11-02", "gpt-4o")].ledger_nanos == costs[("2026-11-02", "gpt-4o")]
    assert status[("2026-11-03", "gpt-4o-mini")].status == "missing_in_ledger"
    assert not result.ok
    totals = result.totals()
    assert totals["provider_nanos"] == gpt4o_day1 + mini_day1 + 10_000_000 + 500_000_000
    assert totals["ledger_nanos"] == sum(costs.values())
    tolerant = await service.admin.reconcile("openai", export, tolerance_nanos=10_000_000)
    assert {(c.day, c.model): c.status for c in tolerant.comparisons}[("2026-11-01", "gpt-4o-mini")] == "within_tolerance"


async def test_generic_csv_and_usage_exports(service: Service) -> None:
    costs = await _ledger(service)
    rows = ["date,model,key,input_tokens,output_tokens,amount,currency"]
    for (day, model), nanos in sorted(costs.items()):
        rows.append(f"{day},{model},key-1,0,0,{units(nanos)},USD")
    result = await service.admin.reconcile("openai", ("\n".join(rows) + "\n").encode())
    assert result.ok and {c.status for c in result.comparisons} == {"matched"}
    usage_export = json.dumps({"object": "page", "data": [{"object": "bucket", "start_time": DAY1, "results": [
        {"object": "organization.usage.completions.result", "model": "gpt-4o-2024-08-06",
         "input_tokens": 1234 + 1235 + 1236, "output_tokens": 3 * 321}]}]}).encode()
    tokens = await service.admin.reconcile("openai", usage_export)
    gpt4o = {(c.day, c.model): c for c in tokens.comparisons}[("2026-11-01", "gpt-4o")]
    assert (tokens.basis, gpt4o.status) == ("tokens", "matched")


@pytest.mark.parametrize(
    ("export", "message"),
    [
        (b'{"data": 5}', "data list of buckets"),
        (b"not,a,valid\nexport,at,all\n", "header with at least date, model and amount"),
        (b"date,model,amount,currency\n2026-11-01,gpt-4o,1.00,EUR\n", "is in EUR"),
        (b"date,model,amount\n2026-11-01,gpt-4o,1.00\n2026-11-01,gpt-4o,2.00\n", "duplicated line"),
        (b"date,model,amount\n2026-11-01,gpt-4o,lots\n", "line 2"),
        (b"\xff\xfe", "utf-8"),
    ],
)
async def test_malformed_exports_change_nothing(service: Service, export: bytes, message: str) -> None:
    await fund(service, "acme", "1")
    with pytest.raises(PolicydError) as error:
        await service.admin.reconcile("openai", export)
    assert error.value.reason == "invalid_export" and message in error.value.message
    await service.writer.drain()
    assert service.store.events("reconciliation") == []
    with pytest.raises(PolicydError, match="unknown_provider|no model of provider"):
        await service.admin.reconcile("nobody", b"date,model,amount\n")


async def test_reconciliation_per_provider_key(service: Service) -> None:
    from policyd.providers import Account, ProviderPool

    service.admin.pool = ProviderPool([Account("openai-1", "openai", "openai", "bearer", "s1", provider_key_id="key_A"),
                                       Account("openai-2", "openai", "openai", "bearer", "s2", provider_key_id="key_B")])
    service.engine.clock = lambda: (DAY1 + 3600) * 1000
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    costs = {}
    for i, account in enumerate(["openai-1", "openai-2", "openai-2"]):
        await service.engine.authorize(ask(secret, model="gpt-4o", request_id=f"k-{i}"))
        from policyd.domain import UsageReport

        s = await service.engine.settle(UsageReport(request_id=f"k-{i}", input_tokens=1000 + i, output_tokens=100,
                                                    provider_account=account))
        costs[account] = costs.get(account, 0) + s.cost
    export = json.dumps({"data": [{"start_time": DAY1, "results": [
        {"object": "organization.costs.result", "line_item": "gpt-4o, input", "api_key_id": "key_A",
         "amount": {"value": units(costs["openai-1"]), "currency": "usd"}},
        {"object": "organization.costs.result", "line_item": "gpt-4o, input", "api_key_id": "key_B",
         "amount": {"value": units(costs["openai-2"] + 1), "currency": "usd"}}]}]}).encode()
    result = await service.admin.reconcile("openai", export)
    by_account = {c.account: c.status for c in result.comparisons}
    assert by_account == {"openai-1": "matched", "openai-2": "mismatched"}


async def test_images_of_the_image_generation_tool_reconcile_under_their_image_model(service: Service) -> None:
    """The provider bills the images a Responses API image_generation tool made under the image model, apart
    from the model's own tokens: the ledger counts them so, and both lines match to the nano."""
    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["price_table"]["models"]["gpt-image-1"] = {"provider": "openai", "tier": "premium", "input": "5.00",
                                                   "output": "40.00", "output_tokens_per_image": 1056}
    await service.admin.apply_policy(yaml.safe_dump(doc), "image-tool.yaml")
    service.engine.clock = lambda: (DAY1 + 3600) * 1000
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    plain = ask(secret, endpoint="responses", request_id="drawn")
    await service.engine.authorize(replace(plain, shape=replace(plain.shape, image_model="gpt-image-1",
                                                                image_generation_calls=1)))
    settled = await service.engine.settle(usage("drawn", input_tokens=100, output_tokens=50, image_generation_calls=1,
                                                image_generation_input_tokens=40, image_generation_output_tokens=1056))
    images = price_quantity(40, parse_amount("5.00")) + price_quantity(1056, parse_amount("40.00"))
    own = settled.cost - images
    assert own == price_quantity(100, parse_amount("0.15")) + price_quantity(50, parse_amount("0.60"))
    export = _costs_export([(DAY1, "gpt-4o-mini-2024-07-18, input", units(own)),
                            (DAY1, "gpt-image-1, image output", units(images))])
    result = await service.admin.reconcile("openai", export)
    assert result.ok and {(c.model, c.status, c.ledger_nanos) for c in result.comparisons} == {
        ("gpt-4o-mini", "matched", own), ("gpt-image-1", "matched", images)}


async def test_anthropics_cost_report_in_cents_reconciles_per_model_and_whole_days(service: Service) -> None:
    """Anthropic's cost report: amounts in cents (decimal strings), its dated model names; a day with lines
    of no model (web searches, or a report not grouped by description) is compared whole."""
    clock = [0]
    service.engine.clock = lambda: clock[0]
    _, secret = await new_key(service, customer="claude-user")
    await fund(service, "claude-user", "50")
    costs: dict[str, int] = {}
    for day in (0, 1):
        for i in range(2):
            clock[0] = (DAY1 + day * DAY + 3600 + i) * 1000
            rid = f"claude-{day}-{i}"
            await service.engine.authorize(ask(secret, model="claude-sonnet-4", request_id=rid))
            s = await service.engine.settle(usage(rid, input_tokens=1000 + i, output_tokens=77))
            costs[f"2026-11-0{day + 1}"] = costs.get(f"2026-11-0{day + 1}", 0) + s.cost

    def cents(nanos: int) -> str:
        return str(Decimal(nanos) / Decimal(10**7))  # 1 cent = 10^7 nanos

    first, second = costs["2026-11-01"], costs["2026-11-02"]
    report = {"data": [
        {"starting_at": "2026-11-01T00:00:00Z", "ending_at": "2026-11-02T00:00:00Z", "results": [
            {"amount": cents(first - 3 * 10**7), "currency": "USD", "model": "claude-sonnet-4-20250514",
             "cost_type": "tokens", "token_type": "uncached_input_tokens", "description": "Input"},
            {"amount": cents(3 * 10**7), "currency": "USD", "model": "claude-sonnet-4-20250514",
             "cost_type": "tokens", "token_type": "output_tokens", "description": "Output"}]},
        {"starting_at": "2026-11-02T00:00:00Z", "ending_at": "2026-11-03T00:00:00Z", "results": [
            {"amount": cents(second - 10**7), "currency": "USD", "model": "claude-sonnet-4-20250514",
             "cost_type": "tokens", "token_type": "output_tokens", "description": "Output"},
            {"amount": cents(10**7), "currency": "USD", "model": None, "cost_type": "web_search",
             "description": "Web Search"}]}],
        "has_more": False, "next_page": None}
    result = await service.admin.reconcile("anthropic", json.dumps(report).encode())
    assert {(c.day, c.model, c.status) for c in result.comparisons} == {
        ("2026-11-01", "claude-sonnet-4", "matched"), ("2026-11-02", "", "matched")}
    assert result.ok and result.totals()["provider_nanos"] == first + second
    report["data"][0]["results"][1]["amount"] = cents(3 * 10**7 + 10**7)  # billed a cent more
    result = await service.admin.reconcile("anthropic", json.dumps(report).encode())
    assert {(c.day, c.status, c.difference_nanos) for c in result.comparisons if c.day == "2026-11-01"} == {
        ("2026-11-01", "mismatched", 10**7)}
    report["data"][0]["results"][0]["currency"] = "EUR"
    with pytest.raises(PolicydError):
        await service.admin.reconcile("anthropic", json.dumps(report).encode())
