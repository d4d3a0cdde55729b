"""A limit that begins to bind while its window runs counts the use before it (policyd/bucket_seeds.py): a plan's
limit or a cap a new policy adds, a key moved to a plan with limits its old one lacked, an owner's own limit on
some models or of tokens."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd import bucket_seeds, quotas
from policyd.policy import Limit
from policyd.pricing import Quantities
from policyd.server import Service
from tests.conftest import make_settings
from tests.helpers import ask, counters_lost_and_rebuilt, fund, new_key, usage

POLICY = """
currency: USD
price_table:
  version: "seeds-1"
  models:
    gpt-4o-mini: {provider: openai, tier: low-cost, input: "0.15", output: "0.60"}
    gpt-4o: {provider: openai, tier: premium, input: "2.50", output: "10.00"}
    claude-sonnet: {provider: anthropic, tier: premium, input: "3.00", output: "15.00"}
plans:
  open:
    models: ["*"]
    endpoints: [chat_completions]
OPEN_LIMITS
  metered:
    models: ["*"]
    endpoints: [chat_completions]
    limits:
      - {name: metered-key-day, scope: key, window: day, unit: money, limit: "KEY_DAY"}
      - {name: metered-month, scope: customer, window: month, unit: money, limit: "1000.00"}
      - {name: metered-user-day, scope: end_user, window: day, unit: requests, limit: 1000}
CAPS
"""

NEW_LIMITS = """\
    limits:
      - {name: open-month, scope: customer, window: month, unit: money, limit: "OPEN_MONTH"}
      - {name: open-key-day, scope: key, window: day, unit: requests, limit: 1000}
      - {name: open-premium-day, scope: customer, window: day, unit: money, models: ["tier:premium"], limit: "100"}
      - {name: open-tokens-day, scope: customer, window: day, unit: tokens, limit: 100000000}
"""
NEW_CAP = """\
caps:
  - {name: openai-day, provider: openai, window: day, unit: cost, limit: "1000.00"}
  - {name: all-money-day, window: day, unit: money, limit: "1000.00"}
"""


def policy(open_month: str = "", key_day: str = "100.00", cap: bool = False) -> str:
    """The policy: plan `open` without limits, or with those of NEW_LIMITS (its month budget `open_month`)."""
    return POLICY.replace("OPEN_LIMITS\n", NEW_LIMITS.replace("OPEN_MONTH", open_month) if open_month else "") \
        .replace("KEY_DAY", key_day).replace("CAPS\n", NEW_CAP if cap else "")


@pytest.fixture(autouse=True)
def _second_pass_soon(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """One replica's tests: the second pass at once, not after the replicas' refresh interval (the tests of a
    lagging replica and of requests decided during the apply keep it)."""
    if not any(name in request.node.name for name in ("replica", "while_a_policy")):
        monkeypatch.setattr(bucket_seeds, "second_pass_delay_s", lambda refresh_ms: 0.02)


async def seeded(service: Service) -> None:
    """The second passes of bucket_seeds.py made (the requests decided in the seconds before a change)."""
    while service.admin.seeding:
        await asyncio.gather(*service.admin.seeding)


def bucket(service: Service, name: str, customer: str, key_id: str = "", **named: str) -> str:
    """The bucket key of the current policy's limit (or cap) `name` for this customer (and key, or end user...)."""
    policy_ = service.book.current
    assert policy_ is not None
    at = service.engine.clock() // 1000
    for cap in policy_.document.caps:
        if cap.name == name:
            return quotas.cap_hold(cap, at, 0, 0, Quantities())[0].key
    limit: Limit = next(limit for plan in policy_.document.plans.values() for limit in plan.limits
                        if limit.name == name)
    ids = quotas.scope_ids(customer, key_id, **named)
    return quotas.hold_for(limit, service.counters.partition_of(customer), ids[limit.scope], at, 0,
                           Quantities())[0].key


async def used(service: Service, key: str) -> int:
    return int(await service.counters.client.hget(key, "used") or 0)


async def spend(service: Service, secret: str, tag: str, models: list[str]) -> dict[str, Any]:
    """Requests of a key, settled; one more left open, one released: what they put in the buckets of each
    unit (money and tokens by model, requests, each record's provider cost)."""
    spent: dict[str, Any] = {"money": {}, "tokens": {}, "requests": 0, "ids": []}
    for n, model in enumerate(models):
        rid = f"{tag}-{n}"
        assert (await service.engine.authorize(ask(secret, model=model, request_id=rid))).decision == "allow"
        charge = (await service.engine.settle(usage(rid, input_tokens=90 + n, output_tokens=40 + n))).charge
        spent["money"][model] = spent["money"].get(model, 0) + charge
        spent["tokens"][model] = spent["tokens"].get(model, 0) + 130 + 2 * n
        spent["requests"] += 1
        spent["ids"].append(rid)
    held = await service.engine.authorize(ask(secret, request_id=f"{tag}-open"))  # its hold counts, tokens not yet
    spent["money"]["open"], spent["requests"] = held.reserved, spent["requests"] + 1
    spent["ids"].append(f"{tag}-open")
    await service.engine.authorize(ask(secret, request_id=f"{tag}-released"))
    await service.engine.release(f"{tag}-released", "upstream_503")  # holds nothing
    await service.engine.authorize(ask("pdk_live_" + "Q" * 40, request_id=f"{tag}-denied"))  # nothing
    return spent


# the first pass reads the records decided CUTOFF_MARGIN_MS before it, the second those after: with no margin the
# first finds these tests' requests, with the margin the second does
MARGINS = pytest.mark.parametrize("margin", [0, bucket_seeds.CUTOFF_MARGIN_MS], ids=["first-pass", "second-pass"])


@MARGINS
async def test_a_limit_a_new_policy_gives_a_plan_mid_window_counts_what_its_requests_used_before(
        service: Service, margin: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy that gives a plan limits mid-window (a month's budget, a key's requests a day, a day's budget on
    some models, a day's tokens) and adds a cap (a provider's cost a day): each bucket starts from what the
    requests it binds had put in it (settled charges, open holds; requests settled or open; tokens settled; the
    cap's provider's costs, every customer's), not from nothing; so a customer already past the new budget is
    refused at once. A bucket a limit already counted in holds what it counted and gets the requests it did not: a
    customer's own limit of the same bucket (all of them), another plan's of the same bucket (those of its keys).
    The same policy applied twice at once (two replicas starting with it) seeds once. A refund counts in the
    customer's budget, not in the operator's money cap. The audit and a rebuild agree (the seeds are kept in SQL); a
    reset forgives the seed."""
    monkeypatch.setattr(bucket_seeds, "CUTOFF_MARGIN_MS", margin)
    await service.admin.apply_policy(policy(), "seeds.yaml")
    early_key, early = await new_key(service, customer="early", plan="open")
    _, other = await new_key(service, customer="other", plan="open")
    _, owned = await new_key(service, customer="owned", plan="open")
    _, mixed_metered = await new_key(service, customer="mixed", plan="metered")
    _, mixed_open = await new_key(service, customer="mixed", plan="open")
    for customer in ("early", "other", "owned", "mixed"):
        await fund(service, customer, "50")
    mixed = [await spend(service, mixed_metered, "mixed-metered", ["gpt-4o"]),
             await spend(service, mixed_open, "mixed-open", ["gpt-4o-mini", "gpt-4o"])]
    first = await spend(service, early, "early", ["gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "claude-sonnet"])
    second = await spend(service, other, "other", ["claude-sonnet"])
    # half of one charge refunded: given back to the customer's money limits, not to the operator's caps
    refunded = (await service.admin.refund_usage(first["ids"][0], first["money"]["gpt-4o-mini"] // 4, "test"))[0]
    assert refunded > 0
    row, _ = await service.admin.set_owner_limits([{"window": "month", "unit": "money", "limit": 10**12}], "owned")
    await spend(service, owned, "owned", ["gpt-4o-mini"])
    await service.writer.drain()
    owned_month = bucket(service, "metered-month", "owned")  # the same bucket as open-month's
    owned_before = await used(service, owned_month)

    def openai_cost(record: Any) -> int:
        """What a record puts in the cap: a settled one its cost, an open one its held charge (markup 0)."""
        if record.provider != "openai" or record.decision == "deny":
            return 0
        return {"settled": record.cost_nanos, "reserved": record.reserved_nanos}.get(record.status, 0)

    def charged(record: Any) -> int:
        """What a record puts in a money cap: a settled one its charge (a refund gives none back), an open one its
        hold."""
        if record.decision == "deny":
            return 0
        return {"settled": record.charge_nanos, "reserved": record.reserved_nanos}.get(record.status, 0)

    everyone = [r for c in ("early", "other", "owned", "mixed") for r in service.store.latest_usage(c, 50)]
    cost_openai, money_all = sum(openai_cost(r) for r in everyone), sum(charged(r) for r in everyone)

    early_money = sum(first["money"].values()) - refunded
    given = policy(open_month=f"0.{early_money:09d}", cap=True)  # applied twice at once (two replicas starting)
    assert (await service.admin.apply_policy(given, "seeds.yaml", dry_run=True)).limits_begun == 6  # 4 limits, 2 caps
    results = await asyncio.gather(*(service.admin.apply_policy(given, "seeds.yaml") for _ in range(2)))
    assert sorted(result.changed for result in results) == [False, True]  # one after the other: seeded once
    applied = next(result for result in results if result.changed)
    # the first pass reads what was decided more than `margin` before: all of it, or none (the second pass's)
    assert applied.limits_begun == 6 and (applied.buckets_seeded > 0) == (margin == 0)
    await seeded(service)
    assert await used(service, bucket(service, "open-month", "early")) == early_money
    assert await used(service, bucket(service, "open-month", "other")) == sum(second["money"].values())
    assert await used(service, bucket(service, "open-key-day", "early", early_key)) == first["requests"]
    assert await used(service, bucket(service, "open-premium-day", "early")) == \
        first["money"]["gpt-4o"] + first["money"]["claude-sonnet"]
    assert await used(service, bucket(service, "open-tokens-day", "early")) == sum(first["tokens"].values())
    assert await used(service, bucket(service, "openai-day", "")) == cost_openai > 0
    assert await used(service, bucket(service, "all-money-day", "")) == money_all > early_money
    assert await used(service, owned_month) == owned_before  # its own limit counted in it already
    # counted already by the plan that had the limit; the other plan's requests added to it, each once
    assert await used(service, bucket(service, "open-month", "mixed")) == \
        sum(sum(spent["money"].values()) for spent in mixed)
    refused = await service.engine.authorize(ask(early, request_id="early-past"))
    assert (refused.reason, refused.message.endswith("(open-month)")) == ("budget_exceeded", True)
    assert (await service.engine.authorize(ask(other, request_id="other-after"))).decision == "allow"
    await service.engine.settle(usage("other-after"))
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    before_loss = {key: await used(service, key) for key in (
        bucket(service, "open-month", "early"), bucket(service, "open-month", "other"),
        bucket(service, "open-tokens-day", "early"), bucket(service, "openai-day", ""))}
    await counters_lost_and_rebuilt(service)
    assert {key: await used(service, key) for key in before_loss} == before_loss
    assert (await service.admin.audit()).ok
    assert (await service.engine.authorize(ask(early, request_id="early-rebuilt"))).reason == "budget_exceeded"
    await service.admin.reset_limits("early", name="open-month", reason="goodwill")
    assert await used(service, bucket(service, "open-month", "early")) == 0  # the seed forgiven
    assert (await service.engine.authorize(ask(early, request_id="early-forgiven"))).decision == "allow"
    await service.writer.drain()
    assert (await service.admin.audit()).ok


@MARGINS
async def test_a_key_moved_to_a_plan_with_limits_its_old_one_lacked_counts_what_it_used_before(
        service: Service, margin: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key moved mid-window to a plan whose limits its old plan did not have: its key's and its customer's new
    buckets, and those of the end users its requests named, start from what it (and the customer's keys under a
    plan binding them) used in their windows; the customer's keys left on the old plan are not counted; past the
    key's budget, it is refused at once."""
    monkeypatch.setattr(bucket_seeds, "CUTOFF_MARGIN_MS", margin)
    await service.admin.apply_policy(policy(), "seeds.yaml")
    moved_id, moved = await new_key(service, customer="mover", plan="open")
    _, stays = await new_key(service, customer="mover", plan="open")
    await fund(service, "mover", "50")
    spent = await spend(service, moved, "moved", ["gpt-4o", "gpt-4o-mini"])
    await spend(service, stays, "stays", ["gpt-4o"])
    charged = {}
    for secret, rid in ((moved, "moved-alice"), (stays, "stays-alice")):  # requests naming an end user
        assert (await service.engine.authorize(ask(secret, request_id=rid, end_user_id="alice"))).decision == "allow"
        charged[rid] = (await service.engine.settle(usage(rid))).charge
    money = sum(spent["money"].values()) + charged["moved-alice"]
    await service.admin.apply_policy(policy(key_day=f"0.{money:09d}"), "seeds.yaml")
    await service.admin.set_plan("metered", key_id=moved_id)
    await seeded(service)
    assert await used(service, bucket(service, "metered-key-day", "mover", moved_id)) == money
    assert await used(service, bucket(service, "metered-month", "mover")) == money
    # the end user's bucket: the moved key's request naming her (the one of the key left on the old plan not)
    assert await used(service, bucket(service, "metered-user-day", "mover", end_user_id="alice")) == 1
    refused = await service.engine.authorize(ask(moved, request_id="moved-past"))
    assert (refused.reason, refused.message.endswith("(metered-key-day)")) == ("budget_exceeded", True)
    assert (await service.engine.authorize(ask(stays, request_id="stays-after"))).decision == "allow"
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok
    assert (await service.engine.authorize(ask(moved, request_id="moved-rebuilt"))).reason == "budget_exceeded"


async def test_an_owners_limit_on_some_models_or_of_tokens_set_mid_window_counts_what_was_used_before(
        service: Service) -> None:
    """An owner's money limit on some models set mid-window starts from what was served on those models in it, and
    its token limit from the tokens its settled requests used (before: both from nothing)."""
    await service.admin.apply_policy(policy(), "seeds.yaml")
    _, secret = await new_key(service, customer="models", plan="open")
    await fund(service, "models", "50")
    spent = await spend(service, secret, "models", ["gpt-4o", "gpt-4o-mini", "claude-sonnet"])
    premium = spent["money"]["gpt-4o"] + spent["money"]["claude-sonnet"]
    row, _ = await service.admin.set_owner_limits([
        {"window": "day", "unit": "money", "limit": premium, "models": ["tier:premium"]},
        {"window": "day", "unit": "tokens", "limit": 10**9}], "models")
    states = {s["limit"].unit: s["used"] for s in await service.admin.owner_limit_states(row)}
    assert states == {"money": premium, "tokens": sum(spent["tokens"].values())}
    assert (await service.engine.authorize(ask(secret, model="gpt-4o", request_id="premium-past"))).reason == \
        "budget_exceeded"
    assert (await service.engine.authorize(ask(secret, request_id="low-cost-after"))).decision == "allow"
    await service.writer.drain()
    assert (await service.admin.audit()).ok


async def test_requests_a_replica_decides_under_the_old_policy_meanwhile_are_added_once_it_has_the_new(
        redis_server: Any, postgres_server: Any) -> None:
    """A replica that has not yet taken a new policy (it checks every policy_refresh_ms) decides requests without
    its new limits for a while: once every replica has taken it, what they put in its window is added to the
    limits' buckets (the second pass), each once; a request decided under the new policy counts itself alone."""
    import secrets

    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    backend = {"redis_url": redis_server.url, "database_url": postgres_server.create_database(
        "seeds_" + secrets.token_hex(4))}
    applying = await Service.build(make_settings(backend, policy_refresh_ms=100))
    await applying.start()
    lagging = None
    try:
        await applying.admin.apply_policy(policy(), "seeds.yaml")
        lagging = await Service.build(make_settings(backend, policy_refresh_ms=600_000))  # takes it at start alone
        await lagging.start()
        _, secret = await new_key(applying, customer="lag", plan="open")
        await fund(applying, "lag", "50")
        before = await spend(applying, secret, "lag", ["gpt-4o-mini"])
        await applying.admin.apply_policy(policy(open_month="40.00"), "seeds.yaml")
        assert lagging.book.current is not None and lagging.book.current.version == 1
        assert (await lagging.engine.authorize(ask(secret, request_id="lagging-1"))).decision == "allow"
        straggler = (await lagging.engine.settle(usage("lagging-1"))).charge
        assert (await applying.engine.authorize(ask(secret, request_id="applying-1"))).decision == "allow"
        counted = (await applying.engine.settle(usage("applying-1"))).charge
        await seeded(applying)
        month = bucket(applying, "open-month", "lag")
        assert await used(applying, month) == sum(before["money"].values()) + straggler + counted
        await applying.writer.drain()
        assert (await applying.admin.audit()).ok
    finally:
        if lagging is not None:
            await lagging.close()
        await applying.close()


# ---------------------------------------------------------------------------------------------- the property
# The oracle: a limit counting from the window's start (`day`), beside one a later policy adds of the same window
# under another name (`day@Etc/UTC`: the same UTC day, another bucket): seeded, the second must hold what the first
# does, whatever the requests before and after it.
ORACLE = """\
    limits:
      - {name: ORACLE-money, scope: customer, window: day, unit: money, limit: "1000"}
      - {name: ORACLE-cost, scope: customer, window: day, unit: cost, limit: "1000"}
      - {name: ORACLE-tokens, scope: customer, window: day, unit: tokens, limit: 1000000000}
      - {name: ORACLE-requests, scope: key, window: day, unit: requests, limit: 1000000}
      - {name: ORACLE-premium, scope: customer, window: day, unit: money, limit: "1000",
         models: [MODELS]}
"""
UNITS = ("money", "cost", "tokens", "requests", "premium")
_customers = itertools.count()


def oracle_policy(seeded_too: bool) -> str:
    limits = ORACLE.replace("ORACLE", "from-start").replace("MODELS", "gpt-4o, claude-sonnet")
    if seeded_too:
        limits += ORACLE.replace("ORACLE", "begun").replace("window: day", "window: day, timezone: Etc/UTC") \
            .replace("MODELS", '"tier:premium"').replace("    limits:\n", "")
    return policy().replace("  open:\n    models: [\"*\"]\n    endpoints: [chat_completions]\n",
                            "  open:\n    models: [\"*\"]\n    endpoints: [chat_completions]\n" + limits)


@pytest.fixture
def seeding_service(backend: dict[str, str]) -> Iterator[tuple[asyncio.AbstractEventLoop, Service]]:
    loop = asyncio.new_event_loop()
    service = loop.run_until_complete(Service.build(make_settings(backend, policy_refresh_ms=10)))
    loop.run_until_complete(service.start())
    yield loop, service
    loop.run_until_complete(service.close())
    loop.close()


history = st.lists(st.tuples(st.sampled_from(("settle", "release", "open", "refund", "denied")),
                             st.sampled_from(("gpt-4o-mini", "gpt-4o", "claude-sonnet")),
                             st.integers(1, 2_000), st.integers(1, 200)), max_size=6)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=history, after=history, margin=st.sampled_from((0, bucket_seeds.CUTOFF_MARGIN_MS)))
def test_a_limit_begun_mid_window_holds_what_one_counting_from_its_start_does(seeding_service, before, after,
                                                                             margin) -> None:
    """Whatever a customer's requests did before a policy gave its plan new limits (settled on any model, refunded
    in part, released, left open, denied) and after: each new limit's bucket holds what a limit of the same window
    counting from its start holds (money, cost, requests, money on some models; tokens but for the tokens still
    held by requests left open before it, which it counts once they settle), through a rebuild; the audit
    agrees. The requests before are read by the first pass or by the second (`margin`)."""
    loop, service = seeding_service
    kept = bucket_seeds.CUTOFF_MARGIN_MS
    bucket_seeds.CUTOFF_MARGIN_MS = margin  # the requests before read by the first pass (0), or the second
    try:
        loop.run_until_complete(_oracle_scenario(service, before, after, f"oracle{next(_customers)}"))
    finally:
        bucket_seeds.CUTOFF_MARGIN_MS = kept


async def _oracle_scenario(service: Service, before: list, after: list, customer: str) -> None:
    await service.admin.apply_policy(oracle_policy(False), "oracle.yaml")
    key_id, secret = await new_key(service, customer=customer, plan="open")
    await fund(service, customer, "1000")

    async def run(requests: list, tag: str) -> list[str]:
        """The requests; those left open."""
        left_open = []
        for n, (kind, model, prompt, output) in enumerate(requests):
            rid = f"{customer}-{tag}-{n}"
            d = await service.engine.authorize(ask(secret if kind != "denied" else "pdk_live_" + "Q" * 40,
                                                   model=model, request_id=rid, prompt_bytes=prompt,
                                                   max_output_tokens=output))
            if d.decision == "deny":
                continue
            if kind == "release":
                await service.engine.release(rid, "upstream_503")
            elif kind == "open":
                left_open.append(rid)
            else:
                charge = (await service.engine.settle(usage(rid, input_tokens=prompt // 8,
                                                            output_tokens=output // 2))).charge
                if kind == "refund" and charge > 1:
                    await service.admin.refund_usage(rid, charge // 2, "test")
        return left_open

    left_open = await run(before, "before")
    await service.admin.apply_policy(oracle_policy(True), "oracle.yaml")
    await seeded(service)
    await run(after, "after")
    await service.writer.drain()

    async def compare() -> None:
        tokens_open = 0
        for rid in left_open:  # their token holds, in the bucket counting from the start alone
            holds = service.store.usage_record(rid).holds
            tokens_open += sum(amount for key, unit, amount in holds if unit == "tokens")
        for unit in UNITS:
            scope_key = key_id if unit == "requests" else ""
            start = await used(service, bucket(service, f"from-start-{unit}", customer, scope_key))
            begun = await used(service, bucket(service, f"begun-{unit}", customer, scope_key))
            assert begun == start - (tokens_open if unit == "tokens" else 0), (unit, begun, start)

    await compare()
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    await compare()
    assert (await service.admin.audit()).ok


async def test_requests_decided_while_a_policy_is_applied_are_counted_once(service: Service,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests authorized and settled without pause, on several tasks, while a policy gives their plan new limits
    (the seeds read from the records, the first pass those more than its margin back (1.5 s here, to keep the test
    short; 5 s in service), the second those after): each new bucket holds
    every request once, as a limit of the same window counting from its start does (requests exactly; money at
    least as much, and no more than the holds of the requests still open when the first pass read them, which it
    counts whole)."""
    monkeypatch.setattr(bucket_seeds, "CUTOFF_MARGIN_MS", 1500)
    await service.admin.apply_policy(oracle_policy(False), "oracle.yaml")
    key_id, secret = await new_key(service, customer="busy", plan="open")
    await fund(service, "busy", "1000")
    stop, served, counter = asyncio.Event(), [], itertools.count()

    async def traffic() -> None:
        while not stop.is_set():
            rid = f"busy-{next(counter)}"
            decision = await service.engine.authorize(ask(secret, request_id=rid))
            if decision.decision != "deny":
                await service.engine.settle(usage(rid))
                served.append(decision.reserved)
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(traffic()) for _ in range(4)]
    await asyncio.sleep(bucket_seeds.CUTOFF_MARGIN_MS / 1000 + 2)  # requests before the first pass's cutoff, and after
    assert (await service.admin.apply_policy(oracle_policy(True), "oracle.yaml")).changed
    await asyncio.sleep(1)
    stop.set()
    await asyncio.gather(*tasks)
    await seeded(service)
    await service.writer.drain()
    start = {unit: await used(service, bucket(service, f"from-start-{unit}", "busy", key_id if unit == "requests" else ""))
             for unit in ("money", "requests")}
    begun = {unit: await used(service, bucket(service, f"begun-{unit}", "busy", key_id if unit == "requests" else ""))
             for unit in ("money", "requests")}
    assert begun["requests"] == start["requests"] == len(served) > 100
    assert start["money"] <= begun["money"] <= start["money"] + 4 * max(served)
    assert (await service.admin.audit()).ok


async def test_an_audit_waits_for_a_pass_halfway_through(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass adds its seeds to Redis, then keeps them in SQL: an audit made between the two would report a seed
    added to a bucket already counting as a difference (it did, now and then, in the property tests whose examples
    each apply a policy). The audit waits for the pass on its replica, and agrees."""
    await service.admin.apply_policy(policy(), "seeds.yaml")
    moved_id, moved = await new_key(service, customer="audited", plan="open")
    _, metered = await new_key(service, customer="audited", plan="metered")
    await fund(service, "audited", "50")
    await spend(service, moved, "before", ["gpt-4o"])  # in no bucket of the plan it moves to
    await spend(service, metered, "counted", ["gpt-4o"])  # in the customer's month of that plan
    await service.writer.drain()
    counted = await used(service, bucket(service, "metered-month", "audited"))
    added, keep = asyncio.Event(), bucket_seeds._keep

    async def slow_keep(*args: Any) -> None:  # the seeds are in Redis, not yet in SQL
        added.set()
        await asyncio.sleep(0.5)
        await keep(*args)

    monkeypatch.setattr(bucket_seeds, "_keep", slow_keep)
    await service.admin.set_plan("metered", key_id=moved_id)  # its month starts from what the key spent before
    await asyncio.wait_for(added.wait(), 10)
    assert await used(service, bucket(service, "metered-month", "audited")) > counted
    assert (await service.admin.audit()).ok
    await seeded(service)
    assert (await service.admin.audit()).ok
