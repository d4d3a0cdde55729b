"""Limits of scope tag: each value of a request's tag (x-policyd-tag-<name>) counts apart within its customer, a
cost center's or a product's budget, as other gateways' tag budgets; its requests refused past it, others not."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd import bucket_seeds, quotas
from policyd.policy import Limit, PolicyError, canonical_text, parse_policy
from policyd.pricing import Quantities
from policyd.server import Service
from tests.helpers import ask, counters_lost_and_rebuilt, fund, new_key, usage

POLICY = """
currency: USD
price_table:
  version: "tags-1"
  models:
    gpt-4o-mini: {provider: openai, tier: low-cost, input: "0.15", output: "0.60"}
    gpt-4o: {provider: openai, tier: premium, input: "2.50", output: "10.00"}
plans:
  tagged:
    models: ["*"]
    endpoints: [chat_completions]
    limits:
TAG_LIMITS
"""
LIMITS = """\
      - {name: product-day, scope: tag, tag: product, window: day, unit: money, limit: "PRODUCT"}
      - {name: big-day, scope: tag, tag: product, tag_values: [big], window: day, unit: requests, limit: BIG}
      - {name: team-requests, scope: tag, tag: cost-center, window: minute, unit: requests, limit: 1000}
"""
NONE = "      - {name: key-day, scope: key, window: day, unit: requests, limit: 100000}\n"


def policy(product: str = "0.01", big: int = 1000, tag_limits: bool = True) -> str:
    limits = LIMITS.replace("PRODUCT", product).replace("BIG", str(big)) if tag_limits else NONE
    return POLICY.replace("TAG_LIMITS\n", limits)


def asked(secret: str, rid: str, **tags: str) -> object:
    request = ask(secret, model="gpt-4o", request_id=rid, max_output_tokens=100)
    return replace(request, attribution=replace(request.attribution, tags=dict(tags)))


def bucket(service: Service, name: str, customer: str, value: str) -> str:
    limit: Limit = next(limit for plan in service.book.current.document.plans.values() for limit in plan.limits
                        if limit.name == name)
    ids = quotas.scope_ids(customer, "", tags={limit.tag: value})
    return quotas.hold_for(limit, service.counters.partition_of(customer), quotas.limit_scope_id(limit, ids),
                           service.engine.clock() // 1000, 0, Quantities())[0].key


async def used(service: Service, key: str) -> int:
    return int(await service.counters.client.hget(key, "used") or 0)


async def test_each_value_of_a_tag_counts_apart_and_its_requests_are_refused_past_its_budget(
        service: Service) -> None:
    """A day's budget of each value of tag `product`: the value past it is refused (budget_exceeded, naming the
    limit), another value and a request without the tag are not; a limit of some values binds those alone; two
    customers' same value never share a count. The audit, a rebuild from SQL and a reset of one value agree."""
    await service.admin.apply_policy(policy(product="0.005", big=2), "tags.yaml")
    _, secret = await new_key(service, customer="acme", plan="tagged")
    _, other = await new_key(service, customer="globex", plan="tagged")
    await fund(service, "acme", "10")
    await fund(service, "globex", "10")
    spent = 0
    n = 0
    while True:  # product=search until its budget refuses it
        n += 1
        decision = await service.engine.authorize(asked(secret, f"search-{n}", product="search"))
        if decision.decision == "deny":
            break
        spent += (await service.engine.settle(usage(f"search-{n}", 1000, 200))).charge
    assert (decision.reason, decision.message.count("product-day")) == ("budget_exceeded", 1), decision.message
    await service.writer.drain()  # its alerts name the tag's value whose requests crossed it
    alerts = [e.detail for e in service.store.events("alert") if e.detail.get("label") == "product-day"]
    assert alerts and {a["tags"]["product"] for a in alerts} == {"search"}
    assert "100" in {a["percent"] for a in alerts}  # the first refused, at least
    assert await used(service, bucket(service, "product-day", "acme", "search")) == spent
    # another value, no tag, another tag only, another customer's same value: served
    for rid, secret_, tags in (("chat-1", secret, {"product": "chat"}), ("untagged-1", secret, {}),
                               ("center-1", secret, {"cost-center": "r-and-d"}),
                               ("globex-search", other, {"product": "search"})):
        assert (await service.engine.authorize(asked(secret_, rid, **tags))).decision == "allow", rid
        await service.engine.settle(usage(rid, 10, 5))
    assert await used(service, bucket(service, "team-requests", "acme", "r-and-d")) == 1
    # a limit of some values binds those alone: two requests a day of product=big, on top of the budget
    for rid in ("big-1", "big-2"):
        assert (await service.engine.authorize(asked(secret, rid, product="big"))).decision == "allow"
        await service.engine.settle(usage(rid, 1, 1))
    refused = await service.engine.authorize(asked(secret, "big-3", product="big"))
    assert (refused.decision, refused.reason) == ("deny", "rate_limit_exceeded")
    assert await used(service, bucket(service, "big-day", "acme", "chat")) == 0  # not a value it binds
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    before = {value: await used(service, bucket(service, "product-day", "acme", value)) for value in ("search", "chat")}
    await counters_lost_and_rebuilt(service)
    assert {value: await used(service, bucket(service, "product-day", "acme", value))
            for value in ("search", "chat")} == before
    # the operator forgives product=search's day: it is served again; product=chat's count stays
    target, resets = await service.admin.reset_limits("acme", tag="product=search", reason="launch day")
    assert (target.scope, target.owner_id, [r.limit.name for r in resets]) == ("tag", "product=search", ["product-day"])
    assert (await service.engine.authorize(asked(secret, "search-again", product="search"))).decision == "allow"
    assert await used(service, bucket(service, "product-day", "acme", "chat")) == before["chat"]
    with pytest.raises(Exception, match="tag"):
        await service.admin.reset_limits("acme", tag="product")
    await service.engine.release("search-again", "upstream_503")
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    # what each value spent, in the operator's report and the customer's own usage (a request without it: "")
    now = service.engine.clock()
    rows = await service.admin.usage_report(["tag:product"], now - 86_400_000, now + 1000, "", "acme", False)
    charged = {row.group["tag:product"]: row.figures["charge_nanos"] for row in rows}
    assert charged["search"] == spent and set(charged) == {"search", "chat", "big", ""}
    (own, _, _), _ = await service.engine.usage_summary(secret, ["tag:product", "model"], now - 86_400_000, now + 1000)
    assert {row.group["tag:product"]: row.charge for row in own if row.group["tag:product"]}["search"] == spent


async def test_a_tag_limit_given_mid_window_counts_what_each_value_used_before(
        service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy giving a plan a tag's budget mid-day starts each value's bucket from what its requests of the day
    spent (read from the records' tags, on both backends), a value it does not list from nothing."""
    monkeypatch.setattr(bucket_seeds, "CUTOFF_MARGIN_MS", 0)
    monkeypatch.setattr(bucket_seeds, "second_pass_delay_s", lambda refresh_ms: 0.02)
    await service.admin.apply_policy(policy(tag_limits=False), "plain.yaml")
    _, secret = await new_key(service, customer="acme", plan="tagged")
    await fund(service, "acme", "10")
    charged: dict[str, int] = {}
    for rid, value in (("a1", "search"), ("a2", "search"), ("a3", "big"), ("a4", "")):
        await service.engine.authorize(asked(secret, rid, **({"product": value} if value else {})))
        charge = (await service.engine.settle(usage(rid, 1000, 100))).charge
        charged[value] = charged.get(value, 0) + charge
    await service.writer.drain()
    await service.admin.apply_policy(policy(product="100.00", big=1000), "tags.yaml")
    while service.admin.seeding:
        await asyncio.gather(*service.admin.seeding)
    assert await used(service, bucket(service, "product-day", "acme", "search")) == charged["search"]
    assert await used(service, bucket(service, "product-day", "acme", "big")) == charged["big"]
    assert await used(service, bucket(service, "big-day", "acme", "big")) == 1  # requests, its value alone
    assert await used(service, bucket(service, "big-day", "acme", "search")) == 0
    await service.writer.drain()
    assert (await service.admin.audit()).ok


def test_a_tag_limit_names_its_tag_and_only_it_does() -> None:
    for bad in ("{name: t, scope: tag, window: day, unit: money, limit: '1'}",
                "{name: t, scope: customer, tag: product, window: day, unit: money, limit: '1'}",
                "{name: t, scope: customer, tag_values: [a], window: day, unit: money, limit: '1'}",
                "{name: t, scope: tag, tag: 'a b', window: day, unit: money, limit: '1'}"):
        with pytest.raises(PolicyError):
            parse_policy(POLICY.replace("TAG_LIMITS\n", f"      - {bad}\n"), "bad.yaml")
    plain = parse_policy(policy(tag_limits=False), "plain.yaml")
    limit_fields = {name for limit in yaml.safe_load(canonical_text(plain))["plans"]["tagged"]["limits"] for name in limit}
    assert not limit_fields & {"tag", "tag_values"}  # a policy without tag limits reads as before (its digest too)
    tagged = parse_policy(policy(), "tags.yaml")
    assert "tag_values" in canonical_text(tagged)
    assert [limit.label for limit in tagged.plans["tagged"].limits] == ["product-day", "big-day", "team-requests"]


def test_rollover_carries_a_tag_limits_buckets_alone() -> None:
    """Rollover reads a window's buckets by their key: a tag limit's are those of its tag and of a value it binds,
    not another tag limit's of the same unit and window."""
    from policyd import rollover

    product = Limit(name="p", scope="tag", tag="product", window="day", unit="money", limit="1", rollover=True)
    some = Limit(name="s", scope="tag", tag="product", tag_values=("a:b",), window="day", unit="money", limit="1")
    center = Limit(name="c", scope="tag", tag="cost-center", window="day", unit="money", limit="1")

    def head(limit: Limit, value: str) -> str:
        ids = quotas.scope_ids("acme", "", tags={limit.tag: value})
        key = quotas.hold_for(limit, 3, quotas.limit_scope_id(limit, ids), 86400, 0, Quantities())[0].key
        return key.rsplit(":", 3)[0]

    assert rollover._same_limit(head(product, "x"), product) and not rollover._same_limit(head(product, "x"), center)
    assert rollover._same_limit(head(center, "x"), center) and not rollover._same_limit(head(center, "x"), product)
    assert rollover._same_limit(head(some, "a:b"), some) and not rollover._same_limit(head(product, "x"), some)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40),
       st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True), st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True))
def test_any_tag_value_names_one_bucket_of_its_own(value: str, other: str, tag: str, other_tag: str) -> None:
    """Whatever a tag's value holds (':', '%', '/', '='), it names one bucket of its customer's, which rollover reads
    back as of its limit and value; another value or another tag's never the same."""
    from policyd import rollover

    limit = Limit(name="t", scope="tag", tag=tag, window="day", unit="money", limit="1")
    listed = Limit(name="l", scope="tag", tag=tag, tag_values=(value,), window="day", unit="money", limit="1")

    def key(limit: Limit, tag: str, value: str) -> str:
        scope_id = quotas.limit_scope_id(limit, quotas.scope_ids("acme", "", tags={tag: value}))
        return quotas.hold_for(limit, 1, scope_id, 86400, 0, Quantities())[0].key if scope_id else ""

    mine = key(limit, tag, value)
    assert mine and rollover._same_limit(mine.rsplit(":", 3)[0], limit)
    assert rollover._same_limit(key(listed, tag, value).rsplit(":", 3)[0], listed)
    if other != value:
        assert key(limit, tag, other) != mine and key(listed, tag, other) == ""
        assert not rollover._same_limit(key(limit, tag, other).rsplit(":", 3)[0], listed)
    if other_tag != tag:
        assert key(limit, other_tag, value) == ""  # a request without the limit's tag is not bound
