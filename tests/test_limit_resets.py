"""Resetting a limit (Admin.reset_limits): what a window counted of settled requests forgiven, requests in flight
kept, the audit and a rebuild in agreement, refunds not giving back twice, alerts armed again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from policyd.domain import PolicydError
from policyd.server import Service
from tests.helpers import ask, counters_lost_and_rebuilt, fund, new_key, usage


async def _bucket(service: Service, pattern: str) -> str:
    (key,) = [k async for k in service.counters.client.scan_iter(match=pattern)]
    return key.decode() if isinstance(key, bytes) else key


async def _used(service: Service, bucket: str) -> int:
    return int(await service.counters.client.hget(bucket, "used") or 0)


async def test_a_reset_forgives_what_the_window_counted_of_settled_requests(service: Service) -> None:
    """A customer stopped by its month budget is served again after a reset: what its settled requests put in
    the bucket is taken out, an open request's hold stays; the audit and a rebuild agree; a second reset
    forgives only what settled after the first; a refund of a forgiven request gives the limit nothing back a
    second time, one of a later request does; the 50% alert is armed again."""
    _, first = await new_key(service, plan="free", customer="stopped")
    _, second = await new_key(service, plan="free", customer="stopped")
    await fund(service, "stopped", "10")
    await service.admin.set_owner_limits([{"window": "month", "unit": "money", "limit": 1_000_000, "thresholds": [50]}],
                                         "stopped")
    bucket = None
    charged: list[int] = []
    open_hold = (await service.engine.authorize(ask(second, request_id="open-1"))).reserved  # in flight throughout
    n = 0
    while True:
        decision = await service.engine.authorize(ask(first, request_id=f"s-{n}"))
        if decision.decision == "deny":
            break
        charged.append((await service.engine.settle(usage(f"s-{n}", input_tokens=1000, output_tokens=400))).charge)
        n += 1
    assert (decision.reason, decision.message.endswith("(customer-money-month)")) == ("budget_exceeded", True)
    bucket = await _bucket(service, "*:b:customer:stopped:money:month*")
    assert await _used(service, bucket) == sum(charged) + open_hold
    assert await service.counters.client.hget(bucket, "a50:customer-money-month") is not None  # alerted once

    target, resets = await service.admin.reset_limits("stopped", unit="money", reason="runaway loop, ticket 42")
    assert (target.customer_id, target.scope, target.owner_id) == ("stopped", "customer", "")
    (reset,) = resets
    assert (reset.limit.label, reset.before, reset.forgiven, reset.used) == (
        "customer-money-month", sum(charged) + open_hold, sum(charged), open_hold)
    assert reset.ends > 0
    assert await _used(service, bucket) == open_hold
    assert open_hold < 500_000 < sum(charged)
    assert await service.counters.client.hget(bucket, "a50:customer-money-month") is None  # below 50%: armed again
    (row,) = service.store.limit_resets("stopped")
    assert (row.bucket_key, row.amount, row.unit, row.reason) == (bucket, sum(charged), "money",
                                                                    "runaway loop, ticket 42")
    assert (await service.engine.authorize(ask(first, request_id="after-1"))).decision == "allow"
    after_1 = (await service.engine.settle(usage("after-1", input_tokens=100, output_tokens=40))).charge
    open_charge = (await service.engine.settle(usage("open-1", input_tokens=100, output_tokens=40))).charge
    await service.writer.drain()
    assert await _used(service, bucket) == after_1 + open_charge
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok
    assert await _used(service, bucket) == after_1 + open_charge  # the reset survives Redis losing its data

    _, (again,) = await service.admin.reset_limits("stopped")
    assert (again.before, again.forgiven, again.used) == (after_1 + open_charge, after_1 + open_charge, 0)
    assert [r.amount for r in service.store.limit_resets("stopped")] == [sum(charged), after_1 + open_charge]

    await service.admin.refund_usage("s-0")  # forgiven by the first reset: the limit gets nothing back again
    assert await _used(service, bucket) == 0
    assert [r.amount for r in service.store.limit_resets("stopped")] == [sum(charged) - charged[0],
                                                                         after_1 + open_charge]
    assert (await service.admin.audit()).ok
    assert (await service.engine.authorize(ask(first, request_id="after-2"))).decision == "allow"
    after_2 = (await service.engine.settle(usage("after-2", input_tokens=100, output_tokens=40))).charge
    await service.admin.refund_usage("after-2")  # settled after every reset: given back to the limit
    assert await _used(service, bucket) == 0 and after_2 > 0
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok and await _used(service, bucket) == 0

    while (refused := await service.engine.authorize(ask(first, request_id=f"t-{n}"))).decision == "allow":
        await service.engine.settle(usage(f"t-{n}", input_tokens=1000, output_tokens=400))
        n += 1
    assert refused.message.endswith("(customer-money-month)")
    await service.writer.drain()
    crossings = [e for e in service.store.events("alert") if e.detail.get("label") == "customer-money-month"]
    # crossed, then reached (refusing), before the resets; both again after them
    assert [e.detail["percent"] for e in crossings] == ["50", "100", "50", "100"]


async def test_a_reset_names_its_owner_and_may_be_narrowed(service: Service) -> None:
    """A key's reset forgives its own buckets alone (another key of the customer keeps its count); a reset
    narrowed to a unit, window or name takes those alone; a thread's plan limit is reset for that thread; bad
    calls are refused and move nothing."""
    limited_id, limited = await new_key(service, plan="free", customer="narrow")
    other_id, other = await new_key(service, plan="free", customer="narrow")
    await fund(service, "narrow", "10")
    for key_id in (limited_id, other_id):
        await service.admin.set_limits(key_id, [{"window": "day", "unit": "requests", "limit": 2},
                                                {"window": "day", "unit": "money", "limit": 10**9}])
    for n in range(2):
        for name, secret in (("l", limited), ("o", other)):
            assert (await service.engine.authorize(ask(secret, request_id=f"{name}{n}", thread_id="t1"))
                    ).decision == "allow"
            await service.engine.settle(usage(f"{name}{n}"))
    refused = await service.engine.authorize(ask(limited, request_id="l-over"))
    assert (refused.reason, refused.message.endswith("(key-requests-day)")) == ("rate_limit_exceeded", True)

    target, resets = await service.admin.reset_limits(key_id=limited_id, unit="requests", window="day")  # the key's
    assert (target.customer_id, target.scope, target.owner_id) == ("narrow", "key", limited_id)
    assert [(r.limit.label, r.before, r.forgiven, r.used) for r in resets] == [("key-requests-day", 2, 2, 0)]
    money = await _bucket(service, f"*:b:key:{limited_id}:money:day*")
    assert await _used(service, money) > 0  # narrowed to requests: the money limit kept its count
    assert (await service.engine.authorize(ask(limited, request_id="l-again"))).decision == "allow"
    assert (await service.engine.authorize(ask(other, request_id="o-over"))).reason == "rate_limit_exceeded"

    _, (thread,) = await service.admin.reset_limits("narrow", thread_id="t1", name="thread-hour")
    assert (thread.limit.scope, thread.forgiven > 0, thread.used) == ("thread", True, 0)
    _, by_window = await service.admin.reset_limits("narrow", key_id=other_id, window="day")
    assert sorted(r.limit.unit for r in by_window) == ["money", "requests"]
    assert (await service.engine.authorize(ask(other, request_id="o-again"))).decision == "allow"

    for call, reason in ((dict(customer_id="narrow", key_id=limited_id, team_id="t"), "invalid_request"),
                         (dict(customer_id=""), "invalid_request"),
                         (dict(customer_id="narrow", reason="x" * 513), "invalid_request"),
                         (dict(customer_id="narrow", workspace_id="a b"), "invalid_request"),
                         (dict(customer_id="someone-else", key_id=limited_id), "unknown_key"),
                         (dict(customer_id="narrow", unit="tokens"), "limit_not_found"),  # none binds the customer
                         (dict(customer_id="narrow", end_user_id="alice"), "limit_not_found"),
                         (dict(customer_id="nobody"), "limit_not_found")):
        with pytest.raises(PolicydError) as error:
            await service.admin.reset_limits(**call)
        assert error.value.reason == reason, call
    await service.writer.drain()
    assert (await service.admin.audit()).ok


async def test_a_reset_forgives_what_an_owner_used_before_its_limit_was_made(service: Service) -> None:
    """An owner's limit set mid-window starts from what it had used (its seed); a reset forgives that too, out of
    the seed, so the limit taken off later leaves its bucket at what its records imply, never below it."""
    _, secret = await new_key(service, plan="free", customer="seeded")
    await fund(service, "seeded", "10")
    assert (await service.engine.authorize(ask(secret, request_id="before"))).decision == "allow"
    before = (await service.engine.settle(usage("before"))).charge
    row, _ = await service.admin.set_owner_limits([{"window": "month", "unit": "money", "limit": 10**9}], "seeded")
    (bucket,) = row.seeds
    assert row.seeds[bucket] == before
    assert (await service.engine.authorize(ask(secret, request_id="after"))).decision == "allow"
    after = (await service.engine.settle(usage("after"))).charge
    _, (reset,) = await service.admin.reset_limits("seeded")
    assert (reset.before, reset.forgiven, reset.used) == (before + after, before + after, 0)
    assert (await service.admin.owner_limits("seeded"))[0].seeds == {bucket: 0}  # forgiven out of the seed
    assert [r.amount for r in service.store.limit_resets("seeded")] == [after]  # the rest, the records'
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    await service.admin.set_owner_limits([], "seeded")
    assert await _used(service, bucket) == 0
    assert (await service.admin.audit()).ok


async def test_a_keys_own_limit_set_mid_window_counts_what_the_key_used_before_it(service: Service) -> None:
    """A key's own limit whose bucket nothing counted in yet starts from what the key had used in its window (its
    seed, kept on the key), as an owner's does: a budget set mid-month counts the month's spend, so a key past it
    is refused at once; another key of the customer is not counted; the audit and a rebuild agree; a reset forgives
    the seed too; the limit taken off leaves its bucket at what its records imply."""
    key_id, secret = await new_key(service, plan="free", customer="keyseed")
    _, sibling = await new_key(service, plan="free", customer="keyseed")
    await fund(service, "keyseed", "10")
    charged = held = 0
    for n in range(2):
        decision = await service.engine.authorize(ask(secret, request_id=f"ks-{n}"))
        assert decision.decision == "allow"
        held = decision.reserved  # a request's hold
        charged += (await service.engine.settle(usage(f"ks-{n}"))).charge
    assert (await service.engine.authorize(ask(sibling, request_id="ks-sibling"))).decision == "allow"
    await service.engine.settle(usage("ks-sibling"))
    budget = [{"window": "month", "unit": "money", "limit": charged + held // 2}]  # room for half a hold more
    row = await service.admin.set_limits(key_id, budget)
    (bucket,) = row.seeds
    assert row.seeds[bucket] == charged and await _used(service, bucket) == charged  # its own two, not the sibling's
    refused = await service.engine.authorize(ask(secret, request_id="ks-past"))
    assert (refused.decision, refused.reason) == ("deny", "budget_exceeded")
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert await _used(service, bucket) == charged and (await service.admin.audit()).ok
    _, (reset,) = await service.admin.reset_limits(key_id=key_id, unit="money", window="month")
    assert (reset.forgiven, reset.used) == (charged, 0)
    assert (await service.admin.get_key(key_id)).seeds == {bucket: 0}  # forgiven out of the seed
    assert (await service.engine.authorize(ask(secret, request_id="ks-after"))).decision == "allow"
    after = (await service.engine.settle(usage("ks-after"))).charge
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    assert (await service.admin.set_limits(key_id, [])).seeds is None
    assert await _used(service, bucket) == after  # what its records imply, less the reset
    assert (await service.admin.audit()).ok


async def test_changes_of_one_owners_row_made_at_once_lose_none(service: Service, monkeypatch) -> None:
    """An owner's row is read, changed and written whole by a change of its limits, a pause and a reset (its
    seeds): made at once, on one replica or several, each waits for the other (a claim in Redis), so none is
    written over. Rounds of a pause beside a change of the end user's limits end paused with the last limits; rounds
    of a reset beside a change of the customer's limits keep the seed the reset forgave, so the audit agrees. So for a
    key: its own limits, its state and its customer's limits (which it carries) changed at once all stand."""
    _, secret = await new_key(service, plan="free", customer="racing")
    await fund(service, "racing", "10")
    admin = service.admin
    for n in range(8):
        limits = [{"window": "day", "unit": "requests", "limit": 10 + n}]
        await asyncio.gather(admin.set_end_user_paused("racing", "eve", n % 2 == 0),
                             admin.set_owner_limits(limits, "racing", end_user_id="eve"))
        (row,) = [r for r in await admin.owner_limits("racing") if r.owner_id == "eve"]
        assert (row.paused, row.limits[0]["limit"]) == (n % 2 == 0, 10 + n), n

    key_id, _ = await new_key(service, plan="free", customer="racing")
    for n in range(6):  # a key's own limits, its state and its customer's limits (which every key carries) at once
        state = "paused" if n % 2 else "active"
        await asyncio.gather(admin.set_limits(key_id, [{"window": "day", "unit": "requests", "limit": 20 + n}]),
                             admin.set_state(key_id, state),
                             admin.set_owner_limits([{"window": "day", "unit": "requests", "limit": 1000 + n}],
                                                    "racing"))
        key = await admin.get_key(key_id)
        assert (key.status, key.limits[0]["limit"], key.owner_limits[0]["limit"]) == (state, 20 + n, 1000 + n), n
    await admin.set_state(key_id, "active")
    assert (await service.engine.authorize(ask(secret, request_id="racing-after"))).decision == "allow"

    saving = service.store.save_owner_limits

    def slowly(row: Any) -> None:  # a change of the limits saved late, as on a busy database: a reset made meanwhile
        time.sleep(0.2)
        saving(row)

    monkeypatch.setattr(service.store, "save_owner_limits", slowly)
    for window in ("month", "day", "hour"):  # a bucket no request counted in yet, each
        assert (await service.engine.authorize(ask(secret, request_id=f"used-{window}"))).decision == "allow"
        await service.engine.settle(usage(f"used-{window}"))
        budget = [{"window": window, "unit": "money", "limit": 10**9}]
        row, _ = await admin.set_owner_limits(budget, "racing")
        assert sum(row.seeds.values()) > 0  # what it had used, its seed
        await asyncio.gather(admin.reset_limits("racing", unit="money"), admin.set_owner_limits(budget, "racing"))
        await service.writer.drain()
        assert (await admin.audit()).ok, window


async def test_resets_amid_concurrent_requests_keep_the_counts_whole(service: Service) -> None:
    """Resets made while a customer's requests are authorized and settled concurrently: no bucket goes below
    zero, none is forgiven twice, and the audit agrees with Redis after (and after a rebuild)."""
    _, secret = await new_key(service, plan="free", customer="busy")
    await fund(service, "busy", "100")
    await service.admin.set_owner_limits([{"window": "month", "unit": "money", "limit": 10**8},
                                          {"window": "day", "unit": "requests", "limit": 10_000}], "busy")

    async def request(n: int) -> None:
        decision = await service.engine.authorize(ask(secret, request_id=f"c-{n}"))
        if decision.decision == "allow":
            await asyncio.sleep(0)
            if n % 5:
                await service.engine.settle(usage(f"c-{n}", input_tokens=50 + n, output_tokens=n % 37))
            else:
                await service.engine.release(f"c-{n}", "upstream_503")

    async def resets() -> list[int]:
        forgiven = []
        for _ in range(4):
            await asyncio.sleep(0.01)
            _, done = await service.admin.reset_limits("busy")
            forgiven += [r.forgiven for r in done]
        return forgiven

    *_, forgiven = await asyncio.gather(*(request(n) for n in range(120)), resets())
    assert sum(forgiven) > 0
    await service.writer.drain()
    for bucket in [await _bucket(service, "*:b:customer:busy:money:month*"),
                   await _bucket(service, "*:b:customer:busy:requests:day*")]:
        assert await _used(service, bucket) >= 0
    result = await service.admin.audit()
    assert result.ok, result.mismatches
    _, last = await service.admin.reset_limits("busy")
    assert [r.used for r in last] == [0, 0]  # nothing in flight: everything settled was forgiven, once
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok


async def test_two_resets_at_once_never_forgive_the_same_requests(service: Service) -> None:
    """Two resets of one customer's limits at once: one is made, the other refused (ABORTED reset_in_progress:
    it would forgive the same requests again, taking the holds of those in flight); once it is done the next may
    be made, and forgives nothing again."""
    _, secret = await new_key(service, plan="free", customer="twice")
    await fund(service, "twice", "10")
    await service.admin.set_owner_limits([{"window": "month", "unit": "money", "limit": 10**9}], "twice")
    assert (await service.engine.authorize(ask(secret, request_id="done"))).decision == "allow"
    charged = (await service.engine.settle(usage("done"))).charge
    held = (await service.engine.authorize(ask(secret, request_id="in-flight"))).reserved
    both = await asyncio.gather(service.admin.reset_limits("twice"), service.admin.reset_limits("twice"),
                                return_exceptions=True)
    refused = [r for r in both if isinstance(r, PolicydError)]
    made = [r for r in both if not isinstance(r, BaseException)]
    assert [(e.status, e.reason) for e in refused] == [("ABORTED", "reset_in_progress")]
    assert [[(r.forgiven, r.used) for r in resets] for _, resets in made] == [[(charged, held)]]
    _, (again,) = await service.admin.reset_limits("twice")
    assert (again.forgiven, again.used) == (0, held)  # the in-flight request's hold stays
    await service.writer.drain()
    assert (await service.admin.audit()).ok
