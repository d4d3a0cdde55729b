"""Rollover (policyd/rollover.py): what a window leaves unused of a plan's limit marked `rollover` is carried into the
next, up to its bound, once; the audit, a rebuild and a reset read it as the counter does."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd import quotas, rollover
from policyd.domain import PolicydError
from policyd.pricing import Quantities
from policyd.server import Service
from tests.conftest import make_settings
from tests.helpers import ask, counters_lost_and_rebuilt, fund, new_key, usage

DAY_MS = 86_400_000
LIMIT = 1_000_000  # nanos a day: about twenty gpt-4o-mini requests of ask()'s size

POLICY = """
currency: USD
price_table:
  version: "rollover-1"
  models:
    gpt-4o-mini: {provider: openai, tier: low-cost, input: "0.15", output: "0.60"}
plans:
  team:
    models: ["*"]
    endpoints: [chat_completions]
    limits:
      - {name: team-day, scope: customer, window: day, unit: money, limit: "0.001", rollover: true, ROLLOVER_MAX}
"""


@pytest.fixture(autouse=True)
def _carried_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A window's carries are made at once in these tests, not a minute into it (a test run just after midnight)."""
    monkeypatch.setattr(rollover, "SETTLED_AFTER_MS", 0)


def policy(rollover_max: int = 0) -> str:
    bound = f'rollover_max: "0.{rollover_max:09d}"' if rollover_max else ""
    return POLICY.replace(", ROLLOVER_MAX", f", {bound}" if bound else "")


def today_bucket(service: Service, customer: str, at_ms: int) -> str:
    current = service.book.current
    assert current is not None
    limit = current.plan("team").limits[0]
    return quotas.hold_for(limit, service.counters.partition_of(customer), customer, at_ms // 1000, 0,
                           Quantities())[0].key


async def used(service: Service, key: str) -> int:
    return int(await service.counters.client.hget(key, "used") or 0)


async def spend(service: Service, secret: str, tag: str, count: int, at_ms: int) -> int:
    """`count` requests settled at `at_ms` (the engine's clock): what they were charged."""
    service.engine.clock = lambda: at_ms
    charged = 0
    for n in range(count):
        assert (await service.engine.authorize(ask(secret, request_id=f"{tag}-{n}"))).decision == "allow"
        charged += (await service.engine.settle(usage(f"{tag}-{n}"))).charge
    return charged


async def spend_until_refused(service: Service, secret: str, tag: str) -> tuple[int, int]:
    """Requests settled until one is refused by the day's budget: what they were charged, and what one of them
    held (the refused one would have)."""
    charged = n = hold = 0
    while True:
        decision = await service.engine.authorize(ask(secret, request_id=f"{tag}-{n}"))
        if decision.decision == "deny":
            assert decision.reason == "budget_exceeded"
            return charged, hold
        hold = decision.reserved
        charged += (await service.engine.settle(usage(f"{tag}-{n}"))).charge
        n += 1


async def test_what_a_day_leaves_unused_is_carried_into_the_next_once(service: Service) -> None:
    """A team given 0.001 a day that spent part of it yesterday may spend 0.001 plus what it left today, no more;
    the carry is made once however many passes run; the audit, a rebuild and a reset read it as the counter does;
    a customer that used nothing of it yesterday carries nothing."""
    await service.admin.apply_policy(policy(), "rollover.yaml")
    _, secret = await new_key(service, customer="team-a", plan="team")
    _, idle = await new_key(service, customer="team-b", plan="team")
    for customer in ("team-a", "team-b"):
        await fund(service, customer, "1")
    now = service.engine.clock()
    yesterday = now - now % DAY_MS - DAY_MS // 2
    spent = await spend(service, secret, "yesterday", 3, yesterday)
    service.engine.clock = lambda: now
    await service.writer.drain()
    assert await rollover.carry(service.store, service.counters, service.book.current, now) == 1
    assert await rollover.carry(service.store, service.counters, service.book.current, now) == 0  # once
    bucket = today_bucket(service, "team-a", now)
    assert await used(service, bucket) == -(LIMIT - spent)
    charged, hold = await spend_until_refused(service, secret, "today")
    assert charged <= 2 * LIMIT - spent < charged + hold  # the day's limit and the carry, used up
    assert await used(service, today_bucket(service, "team-b", now)) == 0  # nothing bound yesterday: nothing carried
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    before = await used(service, bucket)
    await counters_lost_and_rebuilt(service)
    assert await used(service, bucket) == before
    assert (await service.admin.audit()).ok
    _, resets = await service.admin.reset_limits("team-a", name="team-day", reason="goodwill")
    assert resets[0].forgiven == charged and await used(service, bucket) == -(LIMIT - spent)  # the carry stays
    assert (await service.admin.audit()).ok


@pytest.mark.parametrize("bound", [LIMIT // 4, 3 * LIMIT])
async def test_unused_budget_accumulates_up_to_its_bound(service: Service, bound: int) -> None:
    """Two days left partly unused: the second day's carry includes the first's, up to `rollover_max`."""
    await service.admin.apply_policy(policy(bound), "rollover.yaml")
    _, secret = await new_key(service, customer="saver", plan="team")
    await fund(service, "saver", "1")
    now = service.engine.clock()
    two_days_ago = now - now % DAY_MS - DAY_MS - DAY_MS // 2
    first = await spend(service, secret, "first", 2, two_days_ago)
    await service.writer.drain()
    carried = await rollover.carry(service.store, service.counters, service.book.current, two_days_ago + DAY_MS)
    assert carried == 1
    second = await spend(service, secret, "second", 4, two_days_ago + DAY_MS)
    service.engine.clock = lambda: now
    await service.writer.drain()
    assert await rollover.carry(service.store, service.counters, service.book.current, now) == 1
    first_carry = min(LIMIT - first, bound)
    expected = min(LIMIT - (second - first_carry), bound)
    assert await used(service, today_bucket(service, "saver", now)) == -expected
    await service.writer.drain()
    assert (await service.admin.audit()).ok


@pytest.mark.parametrize("limit, message", [
    ('{name: m, scope: customer, window: minute, unit: requests, limit: 5, rollover: true}', "rollover carries"),
    ('{name: m, scope: customer, window: day, unit: requests, limit: 5, rollover_max: 3}', "rollover_max"),
])
async def test_rollover_a_limit_cannot_carry_is_refused(service: Service, limit: str, message: str) -> None:
    text = policy().replace(
        '      - {name: team-day, scope: customer, window: day, unit: money, limit: "0.001", rollover: true}',
        f"      - {limit}")
    with pytest.raises(PolicydError) as refused:
        await service.admin.apply_policy(text, "rollover.yaml")
    assert refused.value.reason == "invalid_policy" and message in refused.value.message
    capped = policy() + 'caps:\n  - {name: c, window: day, unit: cost, limit: "1", rollover: true}\n'
    with pytest.raises(PolicydError) as cap:
        await service.admin.apply_policy(capped, "rollover.yaml")
    assert "carries nothing over" in cap.value.message


async def test_a_service_where_the_writer_runs_carries_by_itself(backend: dict[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The pass runs where the writer runs, every PASS_SECONDS: a team that spent part of yesterday's budget finds
    the rest carried into today without anyone asking."""
    monkeypatch.setattr(rollover, "PASS_SECONDS", 0.2)
    # the passes carry once a window: one made before yesterday's spend was in SQL would find nothing to carry and
    # not come again (a window's first pass comes SETTLED_AFTER_MS into it, the records of the one before in SQL)
    spent_yesterday, carry = asyncio.Event(), rollover.carry

    async def carry_once_spent(*args: Any, **kwargs: Any) -> int:
        return await carry(*args, **kwargs) if spent_yesterday.is_set() else 0

    monkeypatch.setattr(rollover, "carry", carry_once_spent)
    service = await Service.build(make_settings(backend, writer_enabled=True))
    await service.start()
    try:
        await service.admin.apply_policy(policy(), "rollover.yaml")
        _, secret = await new_key(service, customer="team-c", plan="team")
        await fund(service, "team-c", "1")
        now = service.engine.clock()
        spent = await spend(service, secret, "yesterday", 1, now - now % DAY_MS - DAY_MS // 2)
        service.engine.clock = lambda: now
        await service.writer.drain()
        spent_yesterday.set()
        bucket = today_bucket(service, "team-c", now)
        for _ in range(100):
            if await used(service, bucket):
                break
            await asyncio.sleep(0.1)
        assert await used(service, bucket) == -(LIMIT - spent)
    finally:
        await service.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(days=st.lists(st.integers(0, 8), min_size=3, max_size=3), bound=st.sampled_from((0, LIMIT // 3, 3 * LIMIT)))
def test_a_window_may_spend_its_limit_and_what_those_before_left_unused_never_more(tmp_path_factory: Any,
                                                                                   days: list[int],
                                                                                   bound: int) -> None:
    """Whatever is spent over three days (each day's requests until its budget refuses one, or fewer), each day's
    bucket starts from exactly the carry the formula gives (what the day before left unused, its own carry
    included, at most the bound; after the limit's first day, whether it was used or not), and no day spends past
    its limit and its carry; the audit agrees."""
    backend = {"redis_url": "", "database_url": f"sqlite:///{tmp_path_factory.mktemp('rollover') / 'p.db'}"}
    asyncio.run(_three_days(backend, days, bound))


async def _three_days(backend: dict[str, str], days: list[int], bound: int) -> None:
    service = await Service.build(make_settings(backend))
    await service.start()
    try:
        await service.admin.apply_policy(policy(bound), "rollover.yaml")
        _, secret = await new_key(service, customer="prop", plan="team")
        await fund(service, "prop", "1")
        now = service.engine.clock()
        first = now - now % DAY_MS - 2 * DAY_MS
        carry = 0
        for day, count in enumerate(days):
            at = first + day * DAY_MS + DAY_MS // 2 if day < 2 else now
            if day:
                await service.writer.drain()
                await rollover.carry(service.store, service.counters, service.book.current, at)
            bucket = today_bucket(service, "prop", at)
            assert await used(service, bucket) == -carry, (day, carry)
            service.engine.clock = lambda at=at: at
            charged = served = 0
            for n in range(count):
                decision = await service.engine.authorize(ask(secret, request_id=f"d{day}-{n}"))
                if decision.decision == "deny":
                    break
                charged, served = charged + (await service.engine.settle(usage(f"d{day}-{n}"))).charge, served + 1
            assert charged <= LIMIT + carry
            # the first day's bucket carries only if it counted something (the limit's first window: whom it bound is
            # known by their records); from then on every key's customer carries, used or not
            carry = min(max(LIMIT - (charged - carry), 0), bound or LIMIT) if served or carry or day else 0
        await service.writer.drain()
        assert (await service.admin.audit()).ok
    finally:
        await service.close()


async def test_nothing_is_carried_from_a_window_record_retention_has_cut(service: Service) -> None:
    """A pass run so late that record retention has deleted part of the window before (its horizon past the
    window's start) cannot know what was left unused: it carries nothing (tighter, never looser)."""
    from policyd.db import PRUNED_CURSOR, RollupCursorRow

    await service.admin.apply_policy(policy(), "rollover.yaml")
    _, secret = await new_key(service, customer="late", plan="team")
    await fund(service, "late", "1")
    now = service.engine.clock()
    yesterday = now - now % DAY_MS - DAY_MS // 2
    await spend(service, secret, "yesterday", 2, yesterday)
    service.engine.clock = lambda: now
    await service.writer.drain()
    with service.store.session() as session, session.begin():
        session.add(RollupCursorRow(name=PRUNED_CURSOR, written_ms=yesterday))  # deleted up to yesterday noon
    assert await rollover.carry(service.store, service.counters, service.book.current, now) == 0
    assert await used(service, today_bucket(service, "late", now)) == 0
