"""Usage reports and the key review record, against known traffic whose totals the test keeps itself."""

from __future__ import annotations

import csv
import io
import json

import pytest

from policyd.cli import render_report
from policyd.domain import PolicydError
from policyd.reports import month_bounds
from policyd.server import Service
from tests.helpers import ask, fund, new_key, usage

DAY = 86_400_000
T0 = 1_793_491_200_000  # 2026-11-01T00:00:00Z


async def _traffic(service: Service) -> dict:
    """Two customers over two days; returns what the test expects, computed from the settle results."""
    clock = [T0 + 3_600_000]
    service.engine.clock = lambda: clock[0]
    _, acme = await new_key(service, customer="acme")
    _, globex = await new_key(service, customer="globex", plan="free")
    await fund(service, "acme", "10")
    await fund(service, "globex", "10")
    expected: dict = {}

    async def call(secret: str, customer: str, feature: str, day: int, rid: str, settle: bool = True,
                   model: str = "gpt-4o-mini") -> None:
        clock[0] = T0 + day * DAY + 3_600_000
        d = await service.engine.authorize(ask(secret, request_id=rid, feature=feature, model=model))
        e = expected.setdefault((customer, feature, day), {"requests": 0, "denied": 0, "charge": 0, "cost": 0,
                                                           "input": 0, "output": 0, "failed": 0})
        e["requests"] += 1
        if d.decision == "deny":
            e["denied"] += 1
            return
        if settle:
            s = await service.engine.settle(usage(rid, input_tokens=100 + len(rid), output_tokens=20))
            e["charge"] += s.charge
            e["cost"] += s.cost
            e["input"] += 100 + len(rid)
            e["output"] += 20
        else:
            await service.engine.release(rid, "provider_error")
            e["failed"] += 1

    for i in range(5):
        await call(acme, "acme", "chat", 0, f"a-chat-{i}")
    for i in range(3):
        await call(acme, "acme", "search", 1, f"a-search-{i}")
    await call(acme, "acme", "search", 1, "a-fail", settle=False)
    for i in range(2):
        await call(globex, "globex", "chat", 1, f"g-chat-{i}")
    await call(globex, "globex", "chat", 1, "g-denied", model="gpt-4o")  # free plan: not allowed
    return expected


async def test_report_by_customer_and_feature_matches_independent_totals(service: Service) -> None:
    expected = await _traffic(service)
    rows = await service.admin.usage_report(["customer", "feature"], T0, T0 + 2 * DAY, "", "", False)
    got = {(r.group["customer"], r.group["feature"]): r for r in rows}
    for (customer, feature) in {(c, f) for c, f, _ in expected}:
        parts = [v for (c, f, _), v in expected.items() if (c, f) == (customer, feature)]
        r = got[(customer, feature)]
        assert r.figures["requests"] == sum(p["requests"] for p in parts)
        assert r.figures["denied"] == sum(p["denied"] for p in parts)
        assert r.figures["failed"] == sum(p["failed"] for p in parts)
        assert r.figures["charge_nanos"] == sum(p["charge"] for p in parts)
        assert r.figures["cost_nanos"] == sum(p["cost"] for p in parts)
        assert r.figures["input_tokens"] == sum(p["input"] for p in parts)
        assert r.margin_nanos == r.figures["charge_nanos"] - r.figures["cost_nanos"]
    assert len(got) == 3


async def test_report_buckets_and_top_movers(service: Service) -> None:
    expected = await _traffic(service)
    daily = await service.admin.usage_report(["customer"], T0, T0 + 2 * DAY, "day", "", False)
    by_day = {(r.group["customer"], r.bucket): r.figures["charge_nanos"] for r in daily}
    assert by_day[("acme", "2026-11-01")] == expected[("acme", "chat", 0)]["charge"]
    assert by_day[("acme", "2026-11-02")] == expected[("acme", "search", 1)]["charge"]
    monthly = await service.admin.usage_report(["customer"], T0, T0 + 2 * DAY, "month", "acme", False)
    assert [(r.bucket, r.figures["requests"]) for r in monthly] == [("2026-11", 9)]
    movers = await service.admin.usage_report(["feature"], T0 + DAY, T0 + 2 * DAY, "", "", True)
    assert movers[0].group == {"feature": "search"}  # new spend on day 2: the biggest mover
    chat = next(r for r in movers if r.group["feature"] == "chat")
    assert chat.previous["charge_nanos"] == expected[("acme", "chat", 0)]["charge"]
    with pytest.raises(PolicydError, match="unknown dimension"):
        await service.admin.usage_report(["colour"], T0, T0 + DAY, "", "", False)
    with pytest.raises(PolicydError, match="window is empty"):
        await service.admin.usage_report(["customer"], T0, T0, "", "", False)


async def test_rendering_as_table_csv_and_json(service: Service) -> None:
    await _traffic(service)
    from policyd.reports import row_dict

    rows = [row_dict(r) for r in await service.admin.usage_report(["customer"], T0, T0 + 2 * DAY, "", "", False)]
    table = render_report(rows, ["customer"], "table", "USD")
    assert table.splitlines()[0].startswith("customer") and "charge USD" in table
    parsed = list(csv.DictReader(io.StringIO(render_report(rows, ["customer"], "csv", "USD"))))
    assert {r["customer"]: int(r["charge_nanos"]) for r in parsed} == {r["customer"]: r["charge_nanos"] for r in rows}
    data = json.loads(render_report(rows, ["customer"], "json", "USD"))
    assert data["currency"] == "USD" and len(data["rows"]) == 2


async def test_key_review_record(service: Service) -> None:
    key_id, secret = await new_key(service)
    await fund(service, "acme", "10")
    for i in range(3):
        await service.engine.authorize(ask(secret, request_id=f"r-{i}"))
        await service.engine.settle(usage(f"r-{i}"))
    await service.engine.authorize(ask(secret, request_id="bad", customer_id="spoof"))
    review = await service.admin.review_key(key_id)
    assert (review["requests"], review["denials"], review["denials_by_reason"]) == (4, 1, {"owner_mismatch": 1})
    assert review["spend_today"] == review["spend_month"] > 0
    assert "gpt-4o via openai" in review["models"] and review["last_used_ms"] > 0
    rpm = next(b for b in review["buckets"] if b["label"] == "key-rpm")
    assert (rpm["used"], rpm["limit"]) == (3, 600)
    assert secret not in json.dumps({k: v for k, v in review.items() if k != "key"})


def test_month_bounds() -> None:
    assert month_bounds("2026-11") == (T0, T0 + 30 * DAY)
    for bad in ("2026-13", "26-11", "november"):
        with pytest.raises(Exception):
            month_bounds(bad)


async def test_reports_sum_what_providers_bill_apart_for_charged_requests_only(service: Service) -> None:
    """Cache writes, audio tokens, images, seconds, web and file searches: each a line of a provider's
    invoice, summed per group as the tokens are (a released request's reported figures do not count)."""
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    extra = {"cache_write_input_tokens": 300, "cache_write_1h_input_tokens": 100, "audio_input_tokens": 40,
             "audio_output_tokens": 30, "web_searches": 2, "file_searches": 3}
    for i in range(2):
        await service.engine.authorize(ask(secret, request_id=f"billed-{i}", feature="voice"))
        await service.engine.settle(usage(f"billed-{i}", input_tokens=500, output_tokens=60, **extra))
    await service.engine.authorize(ask(secret, request_id="released", feature="voice"))
    await service.engine.release("released", "provider_error")
    await service.writer.drain()
    rows = await service.admin.usage_report(["feature"], 0, 2**62, "", "acme", False)
    figures = {r.group["feature"]: r.figures for r in rows}["voice"]
    assert {name: figures[name] for name in extra} == {name: 2 * value for name, value in extra.items()}
    assert (figures["images"], figures["seconds"], figures["requests"], figures["failed"]) == (0, 0, 3, 1)
    from policyd.reports import row_dict

    parsed = list(csv.DictReader(io.StringIO(render_report([row_dict(r) for r in rows], ["feature"], "csv", "USD"))))
    assert int(parsed[0]["web_searches"]) == 4 and int(parsed[0]["cache_write_input_tokens"]) == 600
    table = render_report([row_dict(r) for r in rows], ["feature"], "table", "USD")
    assert "file_searches" in table.splitlines()[0] and "images" not in table.splitlines()[0]


async def test_buckets_are_the_hours_days_and_months_of_a_time_zone(service: Service) -> None:
    """Reports bucket by the hours, days and months of a time zone (the policy's by default, as its limits count
    days; or one asked for; UTC to opt out), across the night its clocks change (New York's 1 a.m. twice, told
    apart by their offsets) and in a zone half an hour off UTC's hours; a customer's own summary too."""
    import yaml

    from tests.conftest import SAMPLE_POLICY

    clock = [0]
    service.engine.clock = lambda: clock[0]
    _, secret = await new_key(service, customer="zoned")
    await fund(service, "zoned", "10")
    hour = 3_600_000
    for n, at in enumerate((T0 + 3 * hour + hour // 2,  # 2026-10-31 23:30 in New York (EDT)
                            T0 + 5 * hour + hour // 2,  # 2026-11-01 01:30 EDT
                            T0 + 6 * hour + hour // 2,  # 2026-11-01 01:30 EST: the clocks went back at 06:00Z
                            T0 + 18 * hour + 3 * hour // 4,  # 2026-11-01 13:45 EST; 2026-11-02 00:15 in Kolkata
                            T0 + DAY + 4 * hour + hour // 2,  # 2026-11-01 23:30 EST
                            T0 + DAY + 5 * hour + hour // 2)):  # 2026-11-02 00:30 EST
        clock[0] = at
        assert (await service.engine.authorize(ask(secret, request_id=f"z{n}"))).decision == "allow"
        await service.engine.settle(usage(f"z{n}"))

    async def buckets(bucket: str, zone: str = "") -> dict[str, int]:
        rows = await service.admin.usage_report([], T0 - DAY, T0 + 3 * DAY, bucket, "zoned", False, zone)
        return {r.bucket: r.figures["requests"] for r in rows}

    assert await buckets("day") == {"2026-11-01": 4, "2026-11-02": 2}  # UTC's: the policy names no zone
    assert await buckets("day", "America/New_York") == {"2026-10-31": 1, "2026-11-01": 4, "2026-11-02": 1}
    assert await buckets("day", "Asia/Kolkata") == {"2026-11-01": 3, "2026-11-02": 3}
    assert await buckets("month", "America/New_York") == {"2026-10": 1, "2026-11": 5}
    new_york_hours = await buckets("hour", "America/New_York")
    assert (new_york_hours["2026-11-01T01:00-04:00"], new_york_hours["2026-11-01T01:00-05:00"]) == (1, 1)
    assert (await buckets("hour", "Asia/Kolkata"))["2026-11-02T00:00+05:30"] == 1
    with pytest.raises(PolicydError) as refused:
        await buckets("day", "Mars/Olympus_Mons")
    assert refused.value.reason == "invalid_report"

    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["timezone"] = "America/New_York"
    await service.admin.apply_policy(yaml.safe_dump(doc), "zoned.yaml")
    assert await buckets("day") == {"2026-10-31": 1, "2026-11-01": 4, "2026-11-02": 1}  # the policy's days
    assert await buckets("day", "UTC") == {"2026-11-01": 4, "2026-11-02": 2}
    (rows, _, _), _ = await service.engine.usage_summary(secret, [], T0 - DAY, T0 + 3 * DAY, "day")
    assert {r.bucket: r.counts["requests"] for r in rows} == {"2026-10-31": 1, "2026-11-01": 4, "2026-11-02": 1}
