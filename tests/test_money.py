"""Money: reserve at Authorize, settle, release, expire, idempotency, limits, audit and rebuild."""

from __future__ import annotations

import asyncio
import calendar
import itertools
import json
from dataclasses import replace
from typing import Any, AsyncIterator

import pytest
import yaml

from policyd import redis_keys
from policyd.counters import CLOSED_FIELDS, CLOSED_RECORD_FIELDS
from policyd.db import LedgerEntryRow
from policyd.domain import AuthorizeInput, PolicydError
from policyd.engine import next_attempt_id
from policyd.money import apply_basis_points, format_amount, parse_amount, price_quantity
from policyd.pricing import input_estimate
from policyd.server import Service
from tests.conftest import SAMPLE_POLICY, make_settings
from tests.helpers import ask, counters_lost_and_rebuilt, fund, new_key, reshaped, usage

_customers = itertools.count()

USD = 1_000_000_000


async def test_settle_charges_exact_cost_plus_markup(service: Service) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    d = await service.engine.authorize(ask(secret, model="gpt-4o", request_id="s1", max_output_tokens=200))
    assert d.decision == "allow"
    s = await service.engine.settle(usage("s1", input_tokens=1000, output_tokens=150).__class__(
        request_id="s1", input_tokens=1000, cached_input_tokens=400, output_tokens=150))
    # gpt-4o: input 2.50, cached 1.25, output 10.00 per 1M tokens; plan pro: +20%
    cost = price_quantity(600, parse_amount("2.50")) + price_quantity(400, parse_amount("1.25")) \
        + price_quantity(150, parse_amount("10.00"))
    assert s.cost == cost == 1_500_000 + 500_000 + 1_500_000
    assert s.charge == cost * 12 // 10
    assert (s.balance_before, s.balance_after) == (10 * USD, 10 * USD - s.charge)
    assert s.outcome == "settled"
    assert await service.counters.wallet("acme") == (10 * USD - s.charge, 0)
    await service.writer.drain()
    row = service.store.usage_record("s1")
    assert (row.status, row.cost_nanos, row.charge_nanos) == ("settled", cost, s.charge)
    assert (row.balance_before_nanos, row.balance_after_nanos) == (10 * USD, 10 * USD - s.charge)
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == (1000, 400, 150)
    assert service.store.ledger_balances() == {"acme": 10 * USD - s.charge}
    assert (await service.admin.audit()).ok


async def test_duplicate_settle_charges_once_and_conflict_is_rejected(service: Service) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    await service.engine.authorize(ask(secret, request_id="dup"))
    first = await service.engine.settle(usage("dup"))
    again = await service.engine.settle(usage("dup"))
    assert again.outcome == "exists" and first.outcome == "settled"
    assert (again.charge, again.balance_after) == (first.charge, first.balance_after)
    assert await service.counters.wallet("acme") == (10 * USD - first.charge, 0)
    with pytest.raises(PolicydError) as error:
        await service.engine.settle(usage("dup", output_tokens=999))
    assert error.value.reason == "exists_with_different_usage"
    await service.writer.drain()
    assert [e.detail["reason"] for e in service.store.events("rejected")] == ["exists_with_different_usage"]
    assert (await service.admin.audit()).ok


async def test_a_closed_reservation_keeps_only_what_answering_its_retries_reads(service: Service,
                                                                              backend: dict[str, str]) -> None:
    """Redis keeps a closed request's reservation to answer retries (a day: closed_request_retention_seconds);
    kept whole (its attribution, tags and holds as JSON) it held ~2 KB a request for that long. Settled or released, it
    keeps the facts a retry reads, and every retry is answered as before: the Settle's numbers, a conflict,
    a Release, a settle after a release, a client's retry of its id."""
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    tags = {f"tag-{i}": "x" * 200 for i in range(8)}  # a client's tags: in SQL, never needed again in Redis
    partition = service.counters.partition_of("acme")
    client = service.counters.client
    await service.engine.authorize(replace(ask(secret, request_id="kept", thread_id="t", feature="f", tags=tags,
                                               max_output_tokens=300), call_token="call-1"))
    key = redis_keys.reservation(partition, "kept")
    open_bytes = await client.memory_usage(key, samples=0) if backend["redis_url"] else 0
    first = await service.engine.settle(usage("kept", 1000, 150, served_model="gpt-4o-mini"))
    service.counters.forget("kept")  # a retry on another replica: the facts from Redis alone
    stored = {k.decode(): v.decode() for k, v in (await client.hgetall(key)).items()}
    assert set(stored) - {f"r.{name}" for name in CLOSED_RECORD_FIELDS} - {f"f.{name}" for name in CLOSED_FIELDS} \
        == {"state", "key", "amount", "expires", "created", "fingerprint", "balance_before", "balance_after"}
    assert json.loads(stored["f.call_token"]) == "call-1" and json.loads(stored["r.policy_version"]) == 1
    assert "tag-0" not in str(stored) and '"t"' not in stored.values()  # its tags and thread are in SQL
    if backend["redis_url"]:  # what a closed request costs Redis for its retention: small fields, a listpack
        assert (await client.object("encoding", key)).decode() == "listpack"
        assert await client.memory_usage(key, samples=0) < open_bytes / 3  # every field counted: samples=0
    # kept a day (settings.closed_request_retention_seconds), found by its id as long
    assert 86400 - 60 < await client.ttl(key) <= 86400
    assert await client.ttl(redis_keys.request_index("kept")) > 86400 + 2 * 660
    again = await service.engine.settle(usage("kept", 1000, 150, served_model="gpt-4o-mini"))
    same = await service.engine.settle(usage("kept", 1000, 150))  # the served model left out: the one authorized
    for retried in (again, same):
        assert retried.outcome == "exists"
        assert (retried.charge, retried.cost, retried.balance_before, retried.balance_after, retried.served_model,
                retried.currency, retried.price_table_version) == (
            first.charge, first.cost, first.balance_before, first.balance_after, first.served_model,
            first.currency, first.price_table_version)
    with pytest.raises(PolicydError, match="already settled with other numbers"):
        await service.engine.settle(usage("kept", 1000, 151))
    with pytest.raises(PolicydError, match="settled; it cannot be released"):
        await service.engine.release("kept", "late")
    refused = await service.engine.authorize(replace(ask(secret, request_id="kept"), call_token="call-2"))
    assert (refused.decision, refused.reason) == ("deny", "invalid_request")  # settled: never served twice

    await service.engine.authorize(replace(ask(secret, request_id="failed", tags=tags), call_token="call-3"))
    await service.engine.release("failed", "upstream_503")
    service.counters.forget("failed")
    released = await client.hgetall(redis_keys.reservation(partition, "failed"))
    assert b"r" not in released and b"f.call_token" in released and b"tag-0" not in b"".join(released.values())
    assert (await service.engine.release("failed", "again")).outcome == "already_released"
    with pytest.raises(PolicydError, match="already_released"):
        await service.engine.settle(usage("failed"))
    retried = await service.engine.authorize(replace(ask(secret, request_id="failed"), call_token="call-4"))
    assert (retried.decision, retried.request_id) == ("allow", "failed:attempt-2")
    proxy_retry = await service.engine.authorize(replace(ask(secret, request_id="failed"), call_token="call-3"))
    assert (proxy_retry.decision, proxy_retry.reason) == ("deny", "invalid_request")  # the same call: closed
    assert await service.counters.wallet("acme") == (10 * USD - first.charge, retried.reserved)
    await service.writer.drain()
    record = service.store.usage_record("kept")
    assert (record.tags, record.thread_id, record.charge_nanos) == (tags, "t", first.charge)
    assert (await service.admin.audit()).ok


async def test_an_operator_sets_how_long_closed_requests_answer_retries(backend: dict[str, str]) -> None:
    svc = await Service.build(make_settings(backend, closed_request_retention_seconds=3600))
    try:
        await svc.start()
        await svc.admin.apply_policy(SAMPLE_POLICY, "sample.yaml")
        _, secret = await new_key(svc)
        await fund(svc, "acme", "1")
        for request_id in ("settled", "released"):
            await svc.engine.authorize(ask(secret, request_id=request_id))
        await svc.engine.settle(usage("settled"))
        await svc.engine.release("released", "upstream_500")
        partition = svc.counters.partition_of("acme")
        for request_id in ("settled", "released"):
            assert 3600 - 60 < await svc.counters.client.ttl(redis_keys.reservation(partition, request_id)) <= 3600
    finally:
        await svc.close()


async def test_release_returns_the_hold(service: Service) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    d = await service.engine.authorize(ask(secret, request_id="rel"))
    assert await service.counters.wallet("acme") == (USD, d.reserved)
    released = await service.engine.release("rel", "client_disconnected")
    assert (released.outcome, released.released) == ("released", d.reserved)
    assert await service.counters.wallet("acme") == (USD, 0)
    assert (await service.engine.release("rel", "again")).outcome == "already_released"
    with pytest.raises(PolicydError, match="already_released"):
        await service.engine.settle(usage("rel"))
    await service.writer.drain()
    row = service.store.usage_record("rel")
    assert (row.status, row.close_reason) == ("released", "client_disconnected")
    assert (await service.admin.audit()).ok


async def test_settles_left_to_the_background_finish_before_an_audit_and_a_shutdown(service: Service) -> None:
    import asyncio

    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    for request_id in ("bg-audit", "bg-close"):
        await service.engine.authorize(ask(secret, request_id=request_id))

    async def settle_later(request_id: str) -> None:  # as ext_proc does once it has answered Envoy
        await asyncio.sleep(0.3)
        await service.engine.settle(usage(request_id))

    service.engine.close_in_background(lambda: settle_later("bg-audit"), "bg-audit")
    assert (await service.admin.audit()).ok
    assert service.store.usage_record("bg-audit").status == "settled"  # the audit waited for it
    service.engine.close_in_background(lambda: settle_later("bg-close"), "bg-close")
    await service.close()  # and so does a shutdown, before its last drain
    assert service.store.usage_record("bg-close").status == "settled"


async def test_unsettled_reservation_expires_and_late_settle_still_charges(service: Service) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    clock = [service.engine.clock()]
    service.engine.clock = lambda: clock[0]
    d = await service.engine.authorize(ask(secret, request_id="exp"))
    assert await service.engine.expire_due() == 0
    clock[0] += service.engine.reservation_ttl_ms + 1
    assert await service.engine.expire_due() == 1
    assert await service.counters.wallet("acme") == (USD, 0)
    assert d.reserved > 0
    late = await service.engine.settle(usage("exp"))
    assert late.outcome == "settled_late"
    assert await service.counters.wallet("acme") == (USD - late.charge, 0)
    await service.writer.drain()
    row = service.store.usage_record("exp")
    assert row.status == "settled_late" and row.charge_nanos == late.charge
    assert (await service.admin.audit()).ok


async def test_a_request_sent_on_to_the_provider_that_nobody_closes_is_charged_as_held_after_its_deadline(
        service: Service) -> None:
    """A gateway's request (charge_held_on_expiry) whose end no replica saw (the one reading its reply was
    lost): the provider billed it, so it is charged the hold instead of released as free; held one more
    TTL past its deadline first, for a report still on its way (a settle made again once Redis is back), its
    key's concurrency slot returned at the deadline (the request has ended by then)."""
    from policyd import redis_keys

    key_id, secret = await new_key(service)
    await fund(service, "acme", "1")

    async def in_flight() -> int:
        return int(await service.counters.client.get(redis_keys.inflight(service.counters.partition_of("acme"),
                                                                          key_id)) or 0)

    clock = [service.engine.clock()]
    service.engine.clock = lambda: clock[0]
    ttl = service.engine.reservation_ttl_ms
    held = {}
    for request_id in ("lost", "late-report", "late-release"):
        sent_on = replace(ask(secret, model="gpt-4o", request_id=request_id, max_output_tokens=300),
                          charge_held_on_expiry=True)
        held[request_id] = (await service.engine.authorize(sent_on)).reserved
    await service.engine.authorize(ask(secret, model="gpt-4o", request_id="not-sent", max_output_tokens=300))
    assert await in_flight() == 4
    clock[0] += ttl + 1
    assert await service.engine.expire_due() == 1  # "not-sent" released; the three sent on still held
    assert await service.counters.wallet("acme") == (USD, sum(held.values()))
    assert await in_flight() == 0  # their slots returned: a plan's concurrency cap counts them no more
    assert await service.engine.expire_due() == 0 and await in_flight() == 0  # returned once
    assert (await service.engine.release("late-release", "upstream_500")).outcome == "released"
    assert await in_flight() == 0
    late = await service.engine.settle(usage("late-report", input_tokens=120, output_tokens=40))
    assert late.charge == (price_quantity(120, parse_amount("2.50")) + price_quantity(40, parse_amount("10.00"))) * 12 // 10
    clock[0] += ttl
    assert await service.engine.expire_due() == 1
    price = service.book.current.model("gpt-4o")
    estimate = input_estimate(400, 1, 0)
    charge = (price_quantity(estimate, price.input) + price_quantity(300, price.output)) * 12 // 10  # pro: +20%
    assert 0 < charge <= held["lost"]
    assert await service.counters.wallet("acme") == (USD - charge - late.charge, 0)
    assert await in_flight() == 0  # neither closing took a slot back a second time
    with pytest.raises(PolicydError, match="already_settled"):
        await service.engine.release("lost", "late")
    await service.writer.drain()
    lost, kept = service.store.usage_record("lost"), service.store.usage_record("not-sent")
    assert (lost.status, lost.error_class, lost.charge_nanos) == ("settled", "usage_estimated:end_unseen", charge)
    assert (lost.input_tokens, lost.output_tokens, lost.stream_interrupted) == (estimate, 300, True)
    assert (kept.status, kept.charge_nanos) == ("expired", 0)
    assert (service.store.usage_record("late-report").error_class, late.outcome) == ("", "settled")
    assert (await service.admin.audit()).ok


async def test_a_request_id_in_flight_answers_its_own_retries_but_refuses_another_request(service: Service) -> None:
    """A proxy's request ids may come from its clients (idempotency-key): a second client request reusing one
    while the first is in flight, answered as a retry, would reach the provider on the first one's hold and be
    charged nothing. With the proxy's call token it is refused (409); the proxy's own retry (same token) and a
    native caller without tokens are answered as retries, as before."""
    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    first = await service.engine.authorize(replace(ask(secret, request_id="reused"), call_token="call-a"))
    retried = await service.engine.authorize(replace(ask(secret, request_id="reused"), call_token="call-a"))
    assert (first.decision, retried.decision, retried.reserved) == ("allow", "allow", first.reserved)
    other = await service.engine.authorize(replace(ask(secret, request_id="reused"), call_token="call-b"))
    assert (other.decision, other.reason, other.http_status, other.error_param) == (
        "deny", "request_in_progress", 409, "request_id")
    assert await service.counters.wallet("acme") == (USD, first.reserved)  # held once, for the first alone
    native = await service.engine.authorize(ask(secret, request_id="native"))
    assert (await service.engine.authorize(ask(secret, request_id="native"))).reserved == native.reserved
    await service.engine.settle(usage("reused"))
    settled = await service.engine.authorize(replace(ask(secret, request_id="reused"), call_token="call-c"))
    assert (settled.decision, settled.reason) == ("deny", "invalid_request")  # used and settled: a new id, please


async def test_a_client_request_tried_again_after_its_attempt_failed_is_served_as_a_new_attempt(
        service: Service) -> None:
    """A client retrying with its Idempotency-Key after the provider failed its request (released) used to be
    refused, 400 'already used and is released': its retry failed where it should succeed. Each retry is now
    served as an attempt of its own (<id>:attempt-N), charged once; a retry after one succeeded is refused."""
    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    first = await service.engine.authorize(replace(ask(secret, request_id="idem-1"), call_token="call-a"))
    await service.engine.release("idem-1", "upstream_500")
    proxy_retry = await service.engine.authorize(replace(ask(secret, request_id="idem-1"), call_token="call-a"))
    assert (proxy_retry.decision, proxy_retry.reason) == ("deny", "invalid_request")  # the same call: closed
    second = await service.engine.authorize(replace(ask(secret, request_id="idem-1"), call_token="call-b"))
    assert (first.request_id, second.decision, second.request_id) == ("idem-1", "allow", "idem-1:attempt-2")
    assert await service.counters.wallet("acme") == (USD, second.reserved)
    await service.engine.release("idem-1:attempt-2", "client_gone")
    third = await service.engine.authorize(replace(ask(secret, request_id="idem-1"), call_token="call-c"))
    assert (third.decision, third.request_id) == ("allow", "idem-1:attempt-3")
    in_flight = await service.engine.authorize(replace(ask(secret, request_id="idem-1"), call_token="call-d"))
    assert (in_flight.decision, in_flight.reason) == ("deny", "request_in_progress")  # attempt 3 runs
    settled = await service.engine.settle(usage("idem-1:attempt-3"))
    after = await service.engine.authorize(replace(ask(secret, request_id="idem-1"), call_token="call-e"))
    assert (after.decision, after.reason) == ("deny", "invalid_request")  # it succeeded: never served twice
    assert await service.counters.wallet("acme") == (USD - settled.charge, 0)
    native = await service.engine.authorize(ask(secret, request_id="native-1"))  # a native caller's own ids
    await service.engine.release(native.request_id, "upstream_500")
    assert (await service.engine.authorize(ask(secret, request_id="native-1"))).reason == "invalid_request"
    await service.writer.drain()
    assert [service.store.usage_record(r).status for r in ("idem-1", "idem-1:attempt-2", "idem-1:attempt-3")] == [
        "released", "released", "settled"]
    assert (await service.admin.audit()).ok


@pytest.mark.parametrize("same_partition", [True, False])
async def test_a_request_id_names_one_request_across_customers(service: Service, same_partition: bool) -> None:
    """Two customers naming a request alike ("job-1", an Idempotency-Key "1"): in different partitions, both
    were reserved under the one id, and Settle, which finds a request by its id alone, closed whichever the
    index named: one customer's usage charged to the other's wallet, the other's hold left to expire, and one
    record of the two. A native caller's id held by another customer's request is now refused, wherever that
    request's partition; a gateway client's (its own names, in a space of its own) is served under its key."""
    first = "acme"
    other = next(c for c in (f"other-{i}" for i in range(40))
                 if (service.counters.partition_of(c) == service.counters.partition_of(first)) == same_partition)
    await fund(service, first, "1")
    await fund(service, other, "1")
    _, first_secret = await new_key(service, first)
    other_key, other_secret = await new_key(service, other)
    held = await service.engine.authorize(ask(first_secret, request_id="job-1"))
    refused = await service.engine.authorize(ask(other_secret, request_id="job-1", max_output_tokens=1000))
    assert (held.decision, refused.decision, refused.reason, refused.error_param) == (
        "allow", "deny", "invalid_request", "request_id")
    assert await service.counters.wallet(other) == (USD, 0)  # nothing held for the refused request
    settled = await service.engine.settle(usage("job-1", 1000, 1000))
    assert await service.counters.wallet(first) == (USD - settled.charge, 0)
    assert await service.counters.wallet(other) == (USD, 0)

    # gateway clients' requests, each client naming its own "idem-1"
    token = itertools.count()
    mine = await service.engine.authorize(replace(ask(first_secret, request_id="idem-1"), call_token=f"c{next(token)}"))
    theirs = await service.engine.authorize(replace(ask(other_secret, request_id="idem-1", max_output_tokens=1000),
                                                    call_token="their-call"))
    owned = f"idem-1/key:{other_key}"
    assert (mine.request_id, theirs.decision, theirs.request_id) == ("idem-1", "allow", owned)
    retried = await service.engine.authorize(replace(ask(other_secret, request_id="idem-1", max_output_tokens=1000),
                                                     call_token="their-call"))  # the proxy's own retry
    assert (retried.request_id, retried.reserved) == (owned, theirs.reserved)
    theirs_settled = await service.engine.settle(usage(owned, 10, 900))
    mine_settled = await service.engine.settle(usage("idem-1", 10, 20))
    assert theirs_settled.charge != mine_settled.charge
    assert await service.counters.wallet(first) == (USD - settled.charge - mine_settled.charge, 0)
    assert await service.counters.wallet(other) == (USD - theirs_settled.charge, 0)
    again = await service.engine.authorize(replace(ask(other_secret, request_id="idem-1"), call_token="later"))
    assert (again.decision, again.reason) == ("deny", "invalid_request")  # theirs succeeded: never served twice
    await service.writer.drain()
    for request_id, customer, charge in (("job-1", first, settled.charge), ("idem-1", first, mine_settled.charge),
                                         (owned, other, theirs_settled.charge)):
        record = service.store.usage_record(request_id)
        assert (record.customer_id, record.status, record.charge_nanos) == (customer, "settled", charge)
    assert (await service.admin.audit()).ok


def test_attempt_ids_are_bounded() -> None:
    assert [next_attempt_id(i) for i in ("a", "a:attempt-2", "a:attempt-9", "x:attempt-1", "b:attempt-")] == [
        "a:attempt-2", "a:attempt-3", "a:attempt-10", "x:attempt-1:attempt-2", "b:attempt-:attempt-2"]
    assert next_attempt_id("a:attempt-10") == "" and next_attempt_id("r" * 120) == ""


async def test_a_refund_gives_a_charge_back_to_the_wallet_and_the_money_limits_it_counted_in(service: Service) -> None:
    """A charge made in error (a price set wrong, a provider's fault) used to block a customer until its
    window passed: a credit grant mended the wallet, never the budget the charge had filled. A refund gives
    the charge back to both at once, once, and audit and rebuild agree with it."""
    _, secret = await new_key(service, plan="free", customer="wronged")
    await fund(service, "wronged", "10")
    await service.engine.authorize(ask(secret, thread_id="t", request_id="dear", max_output_tokens=10))
    # the free plan's thread-hour budget is 0.50: this one request fills it (its prices said so, wrongly)
    dear = await service.engine.settle(usage("dear", input_tokens=4_000_000, output_tokens=10))
    assert dear.charge > parse_amount("0.50")
    blocked = await service.engine.authorize(ask(secret, thread_id="t", max_output_tokens=10))
    assert (blocked.decision, blocked.reason) == ("deny", "budget_exceeded")
    with pytest.raises(PolicydError, match="at most the request's charge"):
        await service.admin.refund_usage("dear", dear.charge + 1)
    part = parse_amount("0.10")
    amount, wallet, (balance, _) = await service.admin.refund_usage("dear", part, note="the price was wrong")
    assert (amount, wallet, balance) == (part, "wronged", 10 * USD - dear.charge + part)
    still = await service.engine.authorize(ask(secret, thread_id="t", max_output_tokens=10))
    assert still.decision == "deny"  # a part given back: the thread is still past its 0.50
    with pytest.raises(PolicydError, match="refunded already"):
        await service.admin.refund_usage("dear")
    assert (await service.admin.audit()).ok

    await service.engine.authorize(ask(secret, thread_id="u", request_id="dear-2", max_output_tokens=10))
    dear_2 = await service.engine.settle(usage("dear-2", input_tokens=4_000_000, output_tokens=10))
    assert (await service.engine.authorize(ask(secret, thread_id="u", max_output_tokens=10))).decision == "deny"
    amount, _, (balance, _) = await service.admin.refund_usage("dear-2")  # the whole charge
    assert (amount, balance) == (dear_2.charge, 10 * USD - dear.charge + part)
    served = await service.engine.authorize(ask(secret, thread_id="u", max_output_tokens=10, request_id="after"))
    assert served.decision == "allow"  # the thread's budget has its room back at once
    await service.engine.settle(usage("after"))
    await service.writer.drain()
    record = service.store.usage_record("dear-2")
    assert (record.status, record.charge_nanos, record.refunded_nanos) == ("settled", dear_2.charge, dear_2.charge)
    assert record.refunded_ms > 0 and service.store.usage_record("dear").refunded_nanos == part
    with service.store.session() as session:
        refunds = {e.entry_id: (e.amount_nanos, e.source, e.request_id, e.note) for e in session.query(LedgerEntryRow)
                   if e.entry_id.startswith("grant:refund:")}
    assert refunds == {"grant:refund:dear": (part, "refund", "dear", "the price was wrong"),
                       "grant:refund:dear-2": (dear_2.charge, "refund", "dear-2", "")}
    assert (await service.admin.audit()).ok
    await service.admin.rebuild()  # the counters from SQL: the refunds' room stays given back
    assert (await service.admin.audit()).ok
    assert (await service.engine.authorize(ask(secret, thread_id="u", max_output_tokens=10))).decision == "allow"
    with pytest.raises(PolicydError, match="refunded already"):
        await service.admin.refund_usage("dear-2")  # after a rebuild too
    blocked_id = (await service.engine.authorize(ask(secret, thread_id="t", max_output_tokens=10))).request_id
    for request_id, reason in ((blocked_id, "nothing_to_refund"), ("nobody", "unknown_request")):
        with pytest.raises(PolicydError) as refused:
            await service.admin.refund_usage(request_id)
        assert refused.value.reason == reason
    with pytest.raises(PolicydError, match="refunds'"):
        await service.admin.grant_credit("wronged", USD, "USD", "refund", "refund:after")  # never made by hand


async def test_usage_records_are_found_by_request_and_key_and_paged_through_whole(service: Service) -> None:
    """A listing showed the newest 1,000 records and nothing else: a support question about one request (its
    x-policyd-request-id), one key's records, or an export of a month could not be answered."""
    key_a, secret_a = await new_key(service, customer="paged")
    key_b, secret_b = await new_key(service, customer="paged")
    await fund(service, "paged", "10")
    clock = [service.engine.clock()]
    service.engine.clock = lambda: clock[0]
    for i in range(7):  # two at each moment: a page may end between records of one millisecond
        clock[0] += 1000 * (i % 2)
        await service.engine.authorize(ask(secret_a if i % 3 else secret_b, request_id=f"paged-{i}"))
    expected = [r.request_id for r in (await service.admin.list_usage("paged", 100))[0]]
    assert sorted(expected) == [f"paged-{i}" for i in range(7)]
    pages, token = [], ""
    while True:
        rows, token = await service.admin.list_usage("paged", 3, page_token=token)
        pages.append([r.request_id for r in rows])
        if not token:
            break
    assert [len(p) for p in pages] == [3, 3, 1] and sum(pages, []) == expected  # whole, in order, once each
    assert [r.request_id for r in (await service.admin.list_usage("", 10, request_id="paged-4"))[0]] == ["paged-4"]
    assert (await service.admin.list_usage("someone-else", 10, request_id="paged-4"))[0] == []  # not theirs
    by_b = [r.request_id for r in (await service.admin.list_usage("paged", 10, api_key_id=key_b))[0]]
    assert sorted(by_b) == ["paged-0", "paged-3", "paged-6"]
    first = service.store.usage_record("paged-0").created_ms
    window = (await service.admin.list_usage("paged", 10, since_ms=first + 1000, until_ms=first + 2000))[0]
    assert sorted(r.request_id for r in window) == ["paged-1", "paged-2"]
    by_a = [r.request_id for r in (await service.admin.list_usage("paged", 10, api_key_id=key_a))[0]]
    assert sorted(by_a) == ["paged-1", "paged-2", "paged-4", "paged-5"]
    with pytest.raises(PolicydError, match="page_token"):
        await service.admin.list_usage("paged", 3, page_token="nonsense")


async def test_a_request_id_reused_after_its_reservation_was_forgotten_is_recorded_apart(service: Service) -> None:
    """Redis answers a retry by a closed reservation for a day (closed_request_retention_seconds); past it, a
    client reusing the id (an idempotency key made from a prompt, a job's id run again next week) reserves anew.
    Recorded under the id the record already held, the second charge overwrote the first in SQL and its ledger
    entry was dropped as written: the wallet and the ledger parted (audit failed). It is recorded apart."""
    from policyd import redis_keys

    _, secret = await new_key(service, customer="weekly")
    await fund(service, "weekly", "10")
    await service.engine.authorize(ask(secret, request_id="job-7"))
    first = await service.engine.settle(usage("job-7", input_tokens=100, output_tokens=50))
    await service.writer.drain()
    partition = service.counters.partition_of("weekly")
    await service.counters.client.delete(redis_keys.reservation(partition, "job-7"), redis_keys.request_index("job-7"))
    service.counters.forget("job-7")  # (as a week later: this process remembers no recent reservation of it)
    clock = [service.engine.clock() + 8 * 86_400_000]  # a week and a day later
    service.engine.clock = lambda: clock[0]
    again = await service.engine.authorize(ask(secret, request_id="job-7"))
    assert again.decision == "allow"
    second = await service.engine.settle(usage("job-7", input_tokens=300, output_tokens=90))
    assert second.outcome == "settled" and second.charge != first.charge
    await service.writer.drain()
    assert await service.counters.wallet("weekly") == (10 * USD - first.charge - second.charge, 0)
    assert service.store.ledger_balances()["weekly"] == 10 * USD - first.charge - second.charge
    kept, apart = service.store.usage_record("job-7"), service.store.usage_record(f"job-7@{clock[0]}")
    assert (kept.charge_nanos, kept.input_tokens) == (first.charge, 100)
    assert (apart.status, apart.charge_nanos, apart.input_tokens) == ("settled", second.charge, 300)
    assert (await service.admin.audit()).ok


async def test_wallet_caps_spend_before_it_happens(service: Service) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "0.001")
    d = await service.engine.authorize(ask(secret, model="gpt-4o", max_output_tokens=4000, request_id="big"))
    assert (d.decision, d.reason, d.http_status, d.error_type) == ("deny", "insufficient_quota", 429, "insufficient_quota")
    assert await service.counters.wallet("acme") == (1_000_000, 0)


@pytest.mark.parametrize(
    ("report", "reason"),
    [
        ({"input_tokens": -1}, "invalid_usage"),
        ({"output_tokens": 10**15}, "invalid_usage"),
        ({"input_tokens": 10, "cached_input_tokens": 11}, "invalid_usage"),
        ({"served_model": "gpt-unknown"}, "unknown_model"),
    ],
)
async def test_bad_settle_moves_no_money(service: Service, report: dict, reason: str) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    d = await service.engine.authorize(ask(secret, request_id="bad-settle"))
    from policyd.domain import UsageReport

    with pytest.raises(PolicydError) as error:
        await service.engine.settle(UsageReport(request_id="bad-settle", **report))
    assert error.value.reason == reason
    assert await service.counters.wallet("acme") == (USD, d.reserved)
    await service.writer.drain()
    assert [e.detail["reason"] for e in service.store.events("rejected")] == [reason]


async def test_settle_unknown_and_denied_requests(service: Service) -> None:
    _, secret = await new_key(service, plan="free", customer="tiny")
    with pytest.raises(PolicydError) as unknown:
        await service.engine.settle(usage("never-authorized"))
    assert (unknown.value.reason, unknown.value.status) == ("unknown_request", "NOT_FOUND")
    denied = await service.engine.authorize(ask(secret, model="gpt-4o", request_id="was-denied"))
    assert denied.decision == "deny"
    await service.writer.drain()
    with pytest.raises(PolicydError) as error:
        await service.engine.settle(usage("was-denied"))
    assert error.value.reason == "request_denied"


async def test_grants_are_idempotent_and_checked(service: Service) -> None:
    await fund(service, "acme", "5", grant_id="g1")
    await fund(service, "acme", "5", grant_id="g1")
    assert await service.counters.wallet("acme") == (5 * USD, 0)
    for amount, currency, source, reason in (
        (-1, "USD", "purchase", "invalid_amount"),
        (0, "USD", "purchase", "invalid_amount"),
        (USD, "EUR", "purchase", "currency_mismatch"),
        (USD, "USD", "gift", "invalid_grant"),
    ):
        with pytest.raises(PolicydError) as error:
            await service.admin.grant_credit("acme", amount, currency, source)
        assert error.value.reason == reason
    assert await service.counters.wallet("acme") == (5 * USD, 0)
    await service.writer.drain()
    assert service.store.ledger_balances() == {"acme": 5 * USD}


async def test_request_rate_limit_per_key_with_retry_after(service: Service) -> None:
    _, secret = await new_key(service, plan="free", customer="tiny")
    await fund(service, "tiny", "10")
    decisions = [await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10)) for _ in range(21)]
    assert [d.decision for d in decisions[:20]] == ["allow"] * 20
    last = decisions[20]
    assert (last.decision, last.reason, last.http_status) == ("deny", "rate_limit_exceeded", 429)
    assert 1 <= last.retry_after_seconds <= 60


async def test_thread_budget_stops_a_runaway_loop_but_not_other_threads(service: Service) -> None:
    _, secret = await new_key(service, plan="free", customer="loopy")
    await fund(service, "loopy", "10")
    # free plan: thread-hour budget 0.50; each request on gpt-4o-mini reserves about 0.00015
    allowed = 0
    for i in range(200):
        d = await service.engine.authorize(ask(secret, thread_id="agent-loop", prompt_bytes=200_000,
                                                max_output_tokens=500, request_id=f"loop-{i}"))
        if d.decision == "deny":
            assert d.reason == "budget_exceeded"
            break
        allowed += 1
        await service.engine.settle(usage(f"loop-{i}", input_tokens=200_000, output_tokens=500))
    else:
        pytest.fail("the thread budget never stopped the loop")
    assert allowed > 0
    other = await service.engine.authorize(ask(secret, thread_id="another", prompt_bytes=100, max_output_tokens=10))
    assert other.decision == "allow"


async def test_downgrade_when_daily_premium_budget_is_spent(service: Service) -> None:
    policy = (await service.admin.book.version(1)).canonical.replace("limit: '50.000000000'", "limit: '0.010000000'")
    await service.admin.apply_policy(policy, "tight.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    first = await service.engine.authorize(ask(secret, model="gpt-4o", max_output_tokens=500, request_id="d1"))
    assert first.decision == "allow" and first.served_model == "gpt-4o"
    second = await service.engine.authorize(ask(secret, model="gpt-4o", max_output_tokens=500, request_id="d2"))
    assert (second.decision, second.served_model, second.requested_model) == ("downgrade", "gpt-4o-mini", "gpt-4o")
    critical = await service.engine.authorize(ask(secret, model="gpt-4o", max_output_tokens=500, feature="checkout"))
    assert (critical.decision, critical.reason) == ("deny", "budget_exceeded")
    await service.writer.drain()
    row = service.store.usage_record("d2")
    assert (row.decision, row.served_model, row.requested_model) == ("downgrade", "gpt-4o-mini", "gpt-4o")


async def acme_with_prices(service: Service, models: dict[str, dict[str, Any]], added: bool = False) -> str:
    """The sample policy with these models' prices (`added`: to those a model has); a pro key of acme,
    funded with 10."""
    doc = yaml.safe_load(SAMPLE_POLICY)
    for name, prices in models.items():
        doc["price_table"]["models"][name] = {**(doc["price_table"]["models"][name] if added else {}), **prices}
    await service.admin.apply_policy(yaml.safe_dump(doc), "prices.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    return secret


async def test_speech_priced_by_tokens_holds_audio_tokens_up_to_the_cap_and_charges_them_at_the_audio_price(
        service: Service) -> None:
    """Over the native API, where a caller may send a speech request's characters alone: a speech model priced
    for output reserves the text's tokens (estimated from those characters) and audio tokens up to the model's
    output cap, at the audio price; Settle's output tokens are charged as audio tokens."""
    secret = await acme_with_prices(service, {"gpt-4o-mini-tts": {
        "provider": "openai", "tier": "low-cost", "input": "0.60", "audio_output": "12.00",
        "default_max_output_tokens": 2000}})
    decision = await service.engine.authorize(ask(secret, model="gpt-4o-mini-tts", endpoint="audio_speech",
                                                  prompt_bytes=0, max_output_tokens=0, input_tokens=400,
                                                  request_id="tts-native"))
    assert (decision.decision, decision.max_output_tokens) == ("allow", 2000)
    held = price_quantity(input_estimate(400, 1, 0), parse_amount("0.60")) + price_quantity(2000, parse_amount("12.00"))
    assert decision.reserved == -(-held * 12_000 // 10_000)  # pro's 20% markup
    settled = await service.engine.settle(usage("tts-native", input_tokens=90, output_tokens=1234))
    cost = price_quantity(90, parse_amount("0.60")) + price_quantity(1234, parse_amount("12.00"))
    assert settled.charge == -(-cost * 12_000 // 10_000)
    await service.writer.drain()
    row = service.store.usage_record("tts-native")
    assert (row.cost_nanos, row.output_tokens, row.audio_output_tokens) == (cost, 1234, 1234)


async def test_a_reply_whose_client_left_before_it_began_is_charged_as_held(service: Service) -> None:
    """The provider makes a reply not streamed whole however soon its client leaves: its input as estimated,
    its output cap, and an images request's images, as held."""
    from dataclasses import replace as changed

    secret = await acme_with_prices(service, {"dall-e-3": {"provider": "openai", "tier": "low-cost",
                                                           "per_image": "0.04"}})
    asked = ask(secret, model="dall-e-3", endpoint="images", request_id="drawn", prompt_bytes=40, max_output_tokens=0)
    held = await service.engine.authorize(changed(asked, shape=changed(asked.shape, image_count=3)))
    settled = await service.engine.settle_estimated("drawn", 0, interrupted=True, output_as_held=True,
                                                    error_class="usage_estimated:client_gone")
    assert settled.charge == held.reserved == -(-3 * parse_amount("0.04") * 12_000 // 10_000)
    chat = await service.engine.authorize(ask(secret, request_id="thought", max_output_tokens=300))
    settled = await service.engine.settle_estimated("thought", 0, interrupted=True, output_as_held=True,
                                                    error_class="usage_estimated:client_gone")
    assert settled.charge == chat.reserved
    await service.writer.drain()
    assert (service.store.usage_record("drawn").images, service.store.usage_record("thought").output_tokens) == (3, 300)
    assert (await service.admin.audit()).ok


async def test_image_input_tokens_are_held_and_charged_at_their_own_price(service: Service) -> None:
    """gpt-image-1 bills an edit's input images at twice its text's price: an edit (input the text does not
    bound) holds its input at the dearer price, and Settle's image_input_tokens are charged at it."""
    secret = await acme_with_prices(service, {"gpt-image-1": {
        "provider": "openai", "tier": "low-cost", "input": "5.00", "image_input": "10.00", "output": "40.00",
        "output_tokens_per_image": 1056}})
    made = await service.engine.authorize(ask(secret, model="gpt-image-1", endpoint="images", request_id="made",
                                              prompt_bytes=400, max_output_tokens=0))
    edit = await service.engine.authorize(ask(secret, model="gpt-image-1", endpoint="images", request_id="edit",
                                              prompt_bytes=400, max_output_tokens=0, unseen_input=True))
    likely = input_estimate(400, 1, 0)
    output = price_quantity(1056, parse_amount("40.00"))
    assert made.reserved == -(-(price_quantity(likely, parse_amount("5.00")) + output) * 12_000 // 10_000)
    assert edit.reserved == -(-(price_quantity(likely, parse_amount("10.00")) + output) * 12_000 // 10_000)
    settled = await service.engine.settle(usage("edit", input_tokens=700, output_tokens=1056, image_input_tokens=646))
    cost = price_quantity(54, parse_amount("5.00")) + price_quantity(646, parse_amount("10.00")) + output
    assert settled.charge == -(-cost * 12_000 // 10_000)
    await service.writer.drain()
    row = service.store.usage_record("edit")
    assert (row.cost_nanos, row.input_tokens, row.image_input_tokens) == (cost, 700, 646)


async def test_the_image_generation_tool_is_held_and_charged_at_its_image_models_prices(service: Service) -> None:
    """The Responses API's image_generation tool: each call it may make is held at the image model's most
    per image (and 100 tokens a partial image) and the request's input at the image model's dearer input
    price; Settle charges the tool's usage at the image model's prices beside the model's own, each with
    the plan's markup. Calls reported without tokens are charged an image at the most each; tool usage for
    a request that reserved no image model (a stored prompt's tool) cannot be priced: the rest of the request
    is charged, the figures recorded, the record marked."""
    secret = await acme_with_prices(service, {"gpt-image-1": {
        "provider": "openai", "tier": "premium", "input": "5.00", "cached_input": "1.25", "image_input": "10.00",
        "output": "40.00", "output_tokens_per_image": 1056}})

    def drawing(request_id: str, **tool: Any) -> AuthorizeInput:
        plain = ask(secret, endpoint="responses", request_id=request_id)
        return replace(plain, shape=replace(plain.shape, image_model="gpt-image-1", **tool))

    def marked_up(nanos: int) -> int:
        return -(-nanos * 12_000 // 10_000)

    plain = await service.engine.authorize(ask(secret, endpoint="responses", request_id="plain"))
    drawn = await service.engine.authorize(drawing("drawn", image_generation_calls=2, partial_images=1))
    held_input = input_estimate(400, 1, 0)
    assert drawn.reserved - plain.reserved == marked_up(
        price_quantity(2 * held_input, parse_amount("10.00")) + price_quantity(2 * (1056 + 100), parse_amount("40.00")))
    assert drawn.max_tool_calls == 0  # the request bounds its calls itself
    unbounded = await service.engine.authorize(drawing("unbounded"))
    assert unbounded.max_tool_calls == 10  # the plan's default, for the request to carry
    assert unbounded.reserved - plain.reserved == marked_up(
        price_quantity(10 * held_input, parse_amount("10.00")) + price_quantity(10 * 1056, parse_amount("40.00")))

    settled = await service.engine.settle(usage(
        "drawn", input_tokens=100, output_tokens=50, image_generation_calls=1, image_generation_input_tokens=300,
        image_generation_cached_input_tokens=120, image_generation_image_input_tokens=150,
        image_generation_output_tokens=1156))
    own = price_quantity(100, parse_amount("0.15")) + price_quantity(50, parse_amount("0.60"))
    images = price_quantity(30, parse_amount("5.00")) + price_quantity(120, parse_amount("1.25")) + \
        price_quantity(150, parse_amount("10.00")) + price_quantity(1156, parse_amount("40.00"))
    assert (settled.cost, settled.charge) == (own + images, marked_up(own) + marked_up(images))
    counted = await service.engine.settle(usage("unbounded", input_tokens=100, output_tokens=50,
                                                image_generation_calls=2))
    assert counted.cost == own + price_quantity(2 * 1056, parse_amount("40.00"))
    unpriced = await service.engine.settle(usage("plain", image_generation_calls=1, image_generation_output_tokens=272))
    assert unpriced.cost == own
    await service.writer.drain()
    row = service.store.usage_record("plain")
    assert (row.status, row.error_class, row.image_generation_output_tokens) == ("settled", "image_generation_unpriced", 272)
    row = service.store.usage_record("drawn")
    assert (row.image_model, row.image_generation_calls, row.image_generation_input_tokens,
            row.image_generation_cached_input_tokens, row.image_generation_image_input_tokens,
            row.image_generation_output_tokens, row.cost_nanos) == ("gpt-image-1", 1, 300, 120, 150, 1156, own + images)
    assert service.store.usage_record("unbounded").image_generation_output_tokens == 2 * 1056
    assert await service.counters.wallet("acme") == (
        parse_amount("10") - settled.charge - counted.charge - unpriced.charge, 0)


async def test_an_image_tool_naming_no_model_is_given_the_plans_and_a_retry_says_so_again(service: Service) -> None:
    """RequestShape.image_model_default: the plan's image_generation_model is reserved for and answered in
    Decision.image_model (a retried Authorize answers it too); a plan without one refuses the request."""
    defaulted = SAMPLE_POLICY.replace("    markup_bps: 2000\n",
                                      "    markup_bps: 2000\n    image_generation_model: gpt-image-1\n", 1)
    await service.admin.apply_policy(defaulted, "image-default.yaml")
    _, secret = await new_key(service)
    _, free_secret = await new_key(service, plan="free", customer="tiny")
    await fund(service, "acme", "10")
    await fund(service, "tiny", "10")

    def unnamed(key: str, request_id: str) -> AuthorizeInput:
        request = ask(key, endpoint="responses", request_id=request_id)
        return replace(request, shape=replace(request.shape, image_model_default=True, image_generation_calls=1))

    first = await service.engine.authorize(unnamed(secret, "unnamed"))
    again = await service.engine.authorize(unnamed(secret, "unnamed"))
    assert (first.decision, first.image_model, again.image_model, again.reserved) == (
        "allow", "gpt-image-1", "gpt-image-1", first.reserved)
    named = await service.engine.authorize(replace(unnamed(secret, "named"), shape=replace(
        unnamed(secret, "named").shape, image_model="gpt-image-1", image_model_default=False)))
    assert (named.image_model, named.reserved) == ("", first.reserved)  # named: nothing to set, the same hold
    refused = await service.engine.authorize(unnamed(free_secret, "no-default"))
    assert (refused.decision, refused.reason, refused.error_param) == ("deny", "image_model_required", "tools")


async def test_a_large_or_animated_image_is_held_at_its_scale(service: Service) -> None:
    """An image larger than the standard sizes, or a GIF's frames, may bill that many times the model's most
    per image (RequestShape.image_scale): held so, for the images endpoint and the image_generation tool;
    a tool's image with no usage reported is charged so too."""
    secret = await acme_with_prices(service, {"gpt-image-2": {
        "provider": "openai", "tier": "premium", "input": "5.00", "output": "40.00", "output_tokens_per_image": 1056}})

    def scaled(request: AuthorizeInput, scale: int, **shape: Any) -> AuthorizeInput:
        return replace(request, shape=replace(request.shape, image_scale=scale, **shape))

    def images(request_id: str, scale: int) -> AuthorizeInput:
        return scaled(ask(secret, model="gpt-image-2", endpoint="images", request_id=request_id, prompt_bytes=40,
                          max_output_tokens=0), scale, image_count=2)

    standard = await service.engine.authorize(images("s", 0))
    large = await service.engine.authorize(images("l", 6))
    per_image = price_quantity(1056, parse_amount("40.00")) * 12 // 10
    assert large.reserved - standard.reserved >= 2 * 5 * per_image - 2  # five more images' worth, each of two
    plain = await service.engine.authorize(ask(secret, endpoint="responses", request_id="plain"))
    drawn = await service.engine.authorize(scaled(ask(secret, endpoint="responses", request_id="gif"), 9,
                                                  image_model="gpt-image-2", image_generation_calls=1))
    assert drawn.reserved - plain.reserved >= 9 * per_image
    settled = await service.engine.settle(usage("gif", input_tokens=100, output_tokens=50, image_generation_calls=1))
    own = price_quantity(100, parse_amount("0.15")) + price_quantity(50, parse_amount("0.60"))
    assert settled.cost == own + price_quantity(9 * 1056, parse_amount("40.00"))


async def test_image_output_tokens_are_held_and_charged_at_their_own_price(service: Service) -> None:
    """A model pricing the images it makes apart (Gemini's image models): every output token is held at the
    image price (any may be an image's), and Settle's image_output_tokens are charged at it, the rest of
    the output at the text price."""
    secret = await acme_with_prices(service, {"gemini-2.5-flash-image": {
        "provider": "google", "tier": "low-cost", "input": "0.30", "output": "2.50", "image_output": "30.00"}})
    held = await service.engine.authorize(ask(secret, model="gemini-2.5-flash-image", endpoint="gemini_generate_content",
                                              request_id="painted", prompt_bytes=400, max_output_tokens=2000))
    likely = input_estimate(400, 1, 0)
    assert held.reserved == -(-(price_quantity(likely, parse_amount("0.30"))
                                + price_quantity(2000, parse_amount("30.00"))) * 12_000 // 10_000)
    settled = await service.engine.settle(usage("painted", input_tokens=12, output_tokens=1400, image_output_tokens=1290))
    cost = price_quantity(12, parse_amount("0.30")) + price_quantity(110, parse_amount("2.50")) + \
        price_quantity(1290, parse_amount("30.00"))
    assert (settled.cost, settled.charge) == (cost, -(-cost * 12_000 // 10_000))
    await service.writer.drain()
    row = service.store.usage_record("painted")
    assert (row.output_tokens, row.image_output_tokens, row.cost_nanos) == (1400, 1290, cost)


async def test_hosted_containers_are_held_and_charged_by_their_memory(service: Service) -> None:
    """Containers a request may have the provider make (code interpreter, shell) are held at the model's
    per_container price of the largest memory asked, and charged for those the reply ran code in, at most
    those asked for; a memory the model does not price is refused before anything is held."""
    secret = await acme_with_prices(service, {"gpt-4o-mini": {"per_container": {"1g": "0.03", "4g": "0.12"}}},
                                    added=True)

    def computing(request_id: str, containers: int, memory: str) -> AuthorizeInput:
        plain = ask(secret, endpoint="responses", request_id=request_id)
        return replace(plain, shape=replace(plain.shape, containers=containers, container_memory=memory))

    plain = await service.engine.authorize(ask(secret, endpoint="responses", request_id="plain"))
    two = await service.engine.authorize(computing("two", 2, "4g"))
    assert two.reserved - plain.reserved == 2 * parse_amount("0.12") * 12 // 10
    refused = await service.engine.authorize(computing("huge", 1, "64g"))
    assert (refused.decision, refused.reason, refused.error_param) == ("deny", "tool_not_priced", "tools")
    own = price_quantity(100, parse_amount("0.15")) + price_quantity(50, parse_amount("0.60"))
    settled = await service.engine.settle(usage("two", containers=3))  # three seen, two asked for: two charged
    assert settled.cost == own + 2 * parse_amount("0.12")
    one = await service.engine.authorize(computing("unused", 1, "1g"))
    assert one.decision == "allow"
    unused = await service.engine.settle(usage("unused"))  # the model ran no code: no container billed
    assert unused.cost == own
    await service.writer.drain()
    assert (service.store.usage_record("two").containers, service.store.usage_record("two").container_memory) == (2, "4g")
    assert service.store.usage_record("unused").containers == 0
    assert service.store.usage_record("huge").status == "denied"


async def test_grounding_with_google_maps_is_held_and_charged_per_prompt(service: Service) -> None:
    """Gemini's googleMaps tool: one grounded prompt held at the model's per_maps_grounding, charged when
    the reply was grounded; a model that does not price it refuses the request before anything is held."""
    secret = await acme_with_prices(service, {"gemini-2.5-flash": {"per_maps_grounding": "0.025"}}, added=True)

    def grounded(model: str, request_id: str) -> AuthorizeInput:
        request = ask(secret, model=model, endpoint="gemini_generate_content", request_id=request_id)
        return replace(request, shape=replace(request.shape, maps_grounding=True))

    plain = await service.engine.authorize(ask(secret, model="gemini-2.5-flash", endpoint="gemini_generate_content",
                                               request_id="plain"))
    held = await service.engine.authorize(grounded("gemini-2.5-flash", "maps"))
    assert held.reserved - plain.reserved == parse_amount("0.025") * 12 // 10
    refused = await service.engine.authorize(grounded("gpt-4o-mini", "unpriced"))
    assert (refused.decision, refused.reason, refused.error_param) == ("deny", "tool_not_priced", "tools")
    settled = await service.engine.settle(usage("maps", maps_groundings=1))
    assert settled.cost == price_quantity(100, parse_amount("0.30")) + price_quantity(50, parse_amount("2.50")) + \
        parse_amount("0.025")
    await service.writer.drain()
    assert service.store.usage_record("maps").maps_groundings == 1


async def test_shadow_limit_records_would_deny_but_allows(service: Service) -> None:
    policy = (await service.admin.book.version(1)).canonical.replace(
        "    - action: block\n      downgrade_to: ''\n      limit: 20\n", "    - action: shadow\n      downgrade_to: ''\n      limit: 1\n")
    assert "action: shadow" in policy
    await service.admin.apply_policy(policy, "shadow.yaml")
    _, secret = await new_key(service, plan="free", customer="tiny")
    await fund(service, "tiny", "1")
    await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10))
    d = await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10, request_id="sh"))
    assert d.decision == "allow" and d.shadow_denials == ("key-rpm",)
    await service.writer.drain()
    assert service.store.usage_record("sh").shadow_denials == ["key-rpm"]


async def test_soft_thresholds_alert_once_per_crossing(service: Service) -> None:
    _, secret = await new_key(service, plan="free", customer="tiny")
    await fund(service, "tiny", "10")
    for _ in range(17):  # key-rpm limit 20: 50% at 10, 80% at 16
        assert (await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=10))).allowed
    await service.writer.drain()
    alerts = [(e.detail["label"], e.detail["percent"]) for e in service.store.events("alert")]
    assert alerts == [("key-rpm", "50"), ("key-rpm", "80")]


async def test_concurrency_cap_counts_in_flight_requests(service: Service) -> None:
    policy = (await service.admin.book.version(1)).canonical.replace("concurrency: 32", "concurrency: 2")
    await service.admin.apply_policy(policy, "conc.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    a = await service.engine.authorize(ask(secret, request_id="c1"))
    b = await service.engine.authorize(ask(secret, request_id="c2"))
    c = await service.engine.authorize(ask(secret, request_id="c3"))
    assert (a.decision, b.decision, c.reason) == ("allow", "allow", "concurrency_limit_exceeded")
    await service.engine.settle(usage("c1"))
    assert (await service.engine.authorize(ask(secret, request_id="c4"))).decision == "allow"


async def test_authorize_retry_reserves_once(service: Service) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    a = await service.engine.authorize(ask(secret, request_id="retry"))
    b = await service.engine.authorize(ask(secret, request_id="retry"))
    assert a.decision == b.decision == "allow" and a.reserved == b.reserved
    assert await service.counters.wallet("acme") == (USD, a.reserved)
    _, other = await new_key(service, customer="acme")
    hijack = await service.engine.authorize(ask(other, request_id="retry"))
    assert hijack.decision == "deny" and hijack.reason == "invalid_request"


async def test_strict_mode_bounds_spend_by_the_reservation(service: Service) -> None:
    _, secret = await new_key(service, plan="free", customer="strict")
    await fund(service, "strict", "0.01")
    prompt_bytes, cap = 1000, 100
    d = await service.engine.authorize(ask(secret, prompt_bytes=prompt_bytes, max_output_tokens=cap, request_id="st"))
    assert d.max_output_tokens == cap
    # the worst case a byte-level tokenizer allows for 1000 bytes in one message, at the enforced cap
    s = await service.engine.settle(usage("st", input_tokens=prompt_bytes + 8 + 16, output_tokens=cap))
    assert s.charge <= d.reserved


async def test_every_choice_is_reserved_up_to_the_cap(service: Service) -> None:
    """n choices are n completions, each up to the cap, all billed: the reservation covers them all."""
    _, secret = await new_key(service, plan="free", customer="choices")
    await fund(service, "choices", "0.01")
    prompt_bytes, cap = 1000, 100
    one = await service.engine.authorize(ask(secret, prompt_bytes=prompt_bytes, max_output_tokens=cap, request_id="n1"))
    four = await service.engine.authorize(ask(secret, prompt_bytes=prompt_bytes, max_output_tokens=cap, choices=4,
                                              request_id="n4"))
    assert (one.decision, four.decision) == ("allow", "allow")
    assert four.max_output_tokens == cap  # the cap of each choice, as the provider applies it
    worst = usage("n4", input_tokens=prompt_bytes + 8 + 16, output_tokens=4 * cap)
    s = await service.engine.settle(worst)
    assert one.reserved < s.charge <= four.reserved  # one choice's reservation would have been overshot
    await service.engine.release("n1", "test")
    # a wallet that covers one choice but not four
    _, poor = await new_key(service, plan="free", customer="poor")
    await fund(service, "poor", format_amount(one.reserved))
    many = await service.engine.authorize(ask(poor, prompt_bytes=prompt_bytes, max_output_tokens=cap, choices=2))
    assert many.reason == "insufficient_quota"
    assert (await service.engine.authorize(ask(poor, prompt_bytes=prompt_bytes, max_output_tokens=cap))).decision == "allow"
    # a cut reply is estimated from what was delivered, up to the cap of every choice
    await service.engine.authorize(ask(secret, max_output_tokens=cap, choices=4, request_id="cut4"))
    await service.engine.authorize(ask(secret, max_output_tokens=cap, request_id="cut1"))
    for rid in ("cut4", "cut1"):
        await service.engine.settle_estimated(rid, 350, interrupted=True, error_class="client_disconnected")
    await service.writer.drain()
    assert service.store.usage_record("cut4").output_tokens == 350
    assert service.store.usage_record("cut1").output_tokens == cap
    assert (service.store.usage_record("n4").choices, service.store.usage_record("cut1").choices) == (4, 1)
    assert (await service.admin.audit()).ok


async def test_default_output_cap_is_returned_when_the_client_gives_none(service: Service) -> None:
    _, secret = await new_key(service, plan="free", customer="cap")
    await fund(service, "cap", "1")
    d = await service.engine.authorize(ask(secret, max_output_tokens=0))
    assert d.max_output_tokens == 512


async def test_a_model_may_give_its_own_default_output_cap(service: Service) -> None:
    """A reasoning model spends hidden reasoning from the same cap: the plan's small default would leave it
    nothing to answer with, so the model's own default (when it has one) replaces it; a client's cap still rules."""
    secret = await mini_priced_with(service, "default_max_output_tokens: 8000")  # free plan default: 512
    roomy = await service.engine.authorize(ask(secret, max_output_tokens=0))
    assert roomy.max_output_tokens == 8000
    assert roomy.reserved == price_quantity(400 + 8 + 16, parse_amount("0.15")) + price_quantity(8000, parse_amount("0.60"))
    assert (await service.engine.authorize(ask(secret, max_output_tokens=64))).max_output_tokens == 64


async def test_no_more_output_is_reserved_than_the_model_can_make(service: Service) -> None:
    """A client's cap beyond the model's most output is refused or cut by the provider: reserving it would
    refuse requests a wallet can pay for."""
    secret = await mini_priced_with(service, "max_output_tokens: 16384")
    greedy = await service.engine.authorize(ask(secret, max_output_tokens=1_000_000))
    assert greedy.max_output_tokens == 16384
    assert greedy.reserved == price_quantity(400 + 8 + 16, parse_amount("0.15")) + price_quantity(16384, parse_amount("0.60"))
    assert (await service.engine.authorize(ask(secret, max_output_tokens=100))).max_output_tokens == 100


async def test_rebuild_restores_counters_after_redis_data_loss(service: Service) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "3", grant_id="g-rebuild")
    await service.engine.authorize(ask(secret, request_id="open-1", thread_id="t"))
    await service.engine.authorize(ask(secret, request_id="done-1", thread_id="t"))
    await service.engine.settle(usage("done-1"))
    await service.writer.drain()
    before = await service.counters.wallet("acme")
    await service.counters.client.flushall()
    await service.writer.ensure_groups()
    assert await service.counters.wallet("acme") == (0, 0)
    assert not (await service.admin.audit()).ok
    await service.admin.rebuild()
    assert await service.counters.wallet("acme") == before
    assert (await service.admin.audit()).ok
    # the key works again, the open reservation can still be settled, and the grant is not applied twice
    assert (await service.engine.authorize(ask(secret, request_id="after"))).decision == "allow"
    await service.engine.settle(usage("open-1"))
    await fund(service, "acme", "3", grant_id="g-rebuild")
    assert (await service.admin.audit()).ok


async def test_a_rebuild_restores_what_open_reservations_are_settled_by(service: Service) -> None:
    """Counters rebuilt from SQL (Redis lost its data) made an open reservation of its record alone: its
    containers and image model, its input estimate, its call token and what its deadline does were gone.
    Settled after the loss, a request was charged no container, its cut stream no input, a gateway's own
    retry was refused as another request, and one sent to the provider that nobody closed was released free
    at its deadline. Each request here has a twin closed before the loss: after it, each is charged alike."""
    secret = await acme_with_prices(service, {"gpt-4o-mini": {"per_container": {"4g": "0.12"}}}, added=True)
    clock = [service.engine.clock()]
    service.engine.clock = lambda: clock[0]

    def computing(request_id: str) -> AuthorizeInput:
        plain = ask(secret, endpoint="responses", request_id=request_id)
        return replace(plain, shape=replace(plain.shape, containers=2, container_memory="4g"))

    def sent_on(request_id: str) -> AuthorizeInput:
        return replace(ask(secret, model="gpt-4o", request_id=request_id, max_output_tokens=300),
                       charge_held_on_expiry=True, call_token=f"call-{request_id}")

    for twin in ("before", "after"):
        await service.engine.authorize(computing(f"computing-{twin}"))
        await service.engine.authorize(ask(secret, request_id=f"cut-{twin}", prompt_bytes=40_000))
        await service.engine.authorize(sent_on(f"sent-{twin}"))
    charges = {"computing-before": (await service.engine.settle(usage("computing-before", containers=2))).charge,
               "cut-before": (await service.engine.settle_estimated(
                   "cut-before", 20, interrupted=True, error_class="usage_estimated:stream_cut")).charge}
    await service.writer.drain()
    await counters_lost_and_rebuilt(service)
    for request_id in ("computing-after", "cut-after", "sent-after"):  # closed by another replica, say
        service.counters.forget(request_id)

    assert (await service.engine.settle(usage("computing-after", containers=2))).charge == charges["computing-before"]
    cut = await service.engine.settle_estimated("cut-after", 20, interrupted=True,
                                                error_class="usage_estimated:stream_cut")
    assert cut.charge == charges["cut-before"]
    retried = await service.engine.authorize(sent_on("sent-after"))  # the gateway's own retry: answered
    assert (retried.decision, retried.request_id) == ("allow", "sent-after")
    clock[0] += 2 * service.engine.reservation_ttl_ms + 1  # its deadline, and the hold kept one TTL past it
    for _ in range(3):
        await service.engine.expire_due()
    await service.writer.drain()
    before, after = service.store.usage_record("sent-before"), service.store.usage_record("sent-after")
    assert (after.status, after.error_class) == ("settled", "usage_estimated:end_unseen")
    assert after.charge_nanos == before.charge_nanos > 0
    assert service.store.usage_record("cut-after").input_tokens == service.store.usage_record("cut-before").input_tokens
    kept = service.store.usage_record("sent-after").reservation_facts  # closed: those answering a retry reads
    assert kept["call_token"] == "call-sent-after" and "charge_held_on_expiry" not in kept
    assert set(kept) <= set(CLOSED_FIELDS)
    assert (await service.admin.audit()).ok


async def test_a_rebuild_restores_the_requests_closed_before_the_loss(service: Service) -> None:
    """Counters rebuilt from SQL (Redis lost its data) knew only open requests: every request closed before the
    loss was new to Redis. A client's retry of a settled request (its Idempotency-Key) was served and charged
    again, a retried Settle was unknown_request, a late settle of an expired one was lost (its usage never
    charged), a client's retry of a released one took the first one's id. Each is answered after the loss as
    before it: the closed reservations of the last retention are written back, each only where its id is free."""
    secret = await acme_with_prices(service, {})
    now = service.engine.clock()
    clock = [now - service.counters.retention_seconds * 1000 - 60_000]
    service.engine.clock = lambda: clock[0]

    def gateway(request_id: str, token: str) -> AuthorizeInput:
        return replace(ask(secret, request_id=request_id), call_token=token)

    await service.engine.authorize(ask(secret, request_id="long-ago"))  # closed past the retention: not restored
    await service.engine.settle(usage("long-ago"))
    clock[0] = now
    await service.engine.authorize(ask(secret, request_id="expired-before"))
    await service.engine.authorize(ask(secret, request_id="expired-after"))
    clock[0] += service.engine.reservation_ttl_ms + 1
    assert await service.engine.expire_due() == 2
    await service.engine.authorize(ask(secret, request_id="native"))
    settled = await service.engine.settle(usage("native", 1200, 300))
    await service.engine.authorize(gateway("idem-1", "call-a"))
    await service.engine.settle(usage("idem-1"))
    await service.engine.authorize(gateway("idem-2", "call-b"))
    await service.engine.release("idem-2", "provider_error")
    late_before = await service.engine.settle(usage("expired-before", 700, 40))
    await service.writer.drain()
    wallet = await service.counters.wallet("acme")
    assert service.store.usage_record("native").settle_fingerprint
    await service.counters.client.flushall()
    await service.writer.ensure_groups()
    # a request denied since the loss named idem-1 (its id indexed, no reservation made): it is written back all
    # the same; one that named it in another partition would keep it
    await service.counters.client.set(redis_keys.request_index("idem-1"), str(service.counters.partition_of("acme")))
    await service.admin.rebuild()
    assert await service.admin.restored() == 5  # written back while decisions run; not the one long closed
    service.counters.forget("expired-after")  # closed by another replica, say
    assert await service.counters.wallet("acme") == wallet

    retried = await service.engine.settle(usage("native", 1200, 300))  # a retried Settle: its first answer
    assert (retried.outcome, retried.charge, retried.balance_before, retried.balance_after) == \
        ("exists", settled.charge, settled.balance_before, settled.balance_after)
    with pytest.raises(PolicydError) as other:
        await service.engine.settle(usage("native", 1200, 301))
    assert other.value.reason == "exists_with_different_usage"
    for request in (gateway("idem-1", "call-a"), gateway("idem-1", "call-z"), ask(secret, request_id="native")):
        again = await service.engine.authorize(request)  # a client's retry of a settled request: not served again
        assert (again.decision, again.reason) == ("deny", "invalid_request")
    assert (await service.engine.release("idem-2", "client_disconnected")).outcome == "already_released"
    with pytest.raises(PolicydError) as released:
        await service.engine.settle(usage("idem-2"))
    assert released.value.reason == "already_released"
    anew = await service.engine.authorize(gateway("idem-2", "call-c"))  # the client trying a failed call again
    assert (anew.decision, anew.request_id) == ("allow", next_attempt_id("idem-2"))
    late = await service.engine.settle(usage("expired-after", 700, 40))  # a late settle: charged as before
    assert (late.outcome, late.charge) == ("settled_late", late_before.charge)
    old = await service.engine.authorize(ask(secret, request_id="long-ago"))
    assert (old.decision, old.request_id) == ("allow", "long-ago")

    # written only where the id is free: a request made since keeps it, and nothing is written twice
    await service.engine.authorize(ask(secret, request_id="fresh"))
    assert await service.admin._restore_closed() == 0
    assert (await service.engine.settle(usage("fresh"))).outcome == "settled"
    await service.engine.settle(usage(next_attempt_id("idem-2")))
    await service.engine.settle(usage("long-ago"))
    await service.writer.drain()
    assert service.store.usage_record("native").charge_nanos == settled.charge
    assert service.store.usage_record("expired-after").status == "settled_late"
    assert (await service.admin.audit()).ok


async def test_rebuild_restores_every_key_state_without_recording_changes(service: Service) -> None:
    paused_id, paused = await new_key(service, customer="acme")
    rotated_id, old_secret = await new_key(service, customer="acme")
    revoked_id, revoked = await new_key(service, customer="acme")
    await fund(service, "acme", "3")
    await service.admin.set_state(paused_id, "paused")
    await service.admin.set_state(revoked_id, "revoked")
    new_secret = (await service.admin.rotate_key(rotated_id, grace_seconds=3600)).secret
    await service.writer.drain()
    changes = len(service.store.events("key_state"))
    await counters_lost_and_rebuilt(service)
    decided = {name: (await service.engine.authorize(ask(secret))).reason or "allowed" for name, secret in (
        ("paused", paused), ("revoked", revoked), ("old secret in its grace", old_secret), ("new secret", new_secret))}
    assert decided == {"paused": "key_paused", "revoked": "key_revoked", "old secret in its grace": "allowed",
                       "new secret": "allowed"}
    await service.writer.drain()
    assert len(service.store.events("key_state")) == changes  # a rebuild changes no key: it records none


async def test_rebuild_remembers_whose_each_stored_response_is(service: Service) -> None:
    """Whose a stored response is lives in Redis for speed and in its usage record for good: after Redis
    lost its data, a rebuild knows it again, so another customer still cannot read or continue it, its
    own customer still can, on the provider account that stored it."""
    _, mine = await new_key(service, customer="acme")
    _, theirs = await new_key(service, customer="rival")
    await fund(service, "acme", "3")
    await fund(service, "rival", "3")
    await service.engine.authorize(ask(mine, request_id="made", endpoint="responses"))
    await service.engine.settle(usage("made", provider_response_id="resp_kept", provider_account="second"))
    await service.engine.authorize(ask(mine, request_id="plain"))
    await service.engine.settle(usage("plain"))
    await service.writer.drain()
    assert (service.store.usage_record("made").provider_response_id,
            service.store.usage_record("plain").provider_response_id) == ("resp_kept", "")

    def reading(secret: str) -> AuthorizeInput:
        return replace(ask(secret, endpoint="responses"), stored_response="resp_kept")

    before = await service.engine.authorize(reading(mine))
    await counters_lost_and_rebuilt(service)
    read = await service.engine.authorize(reading(mine))
    assert (read.decision, read.account, read.provider) == ("allow", "second", "openai")
    assert (read.provider, read.route, read.account) == (before.provider, before.route, before.account)
    assert read.route != ""
    assert (await service.engine.authorize(reading(theirs))).reason == "response_not_found"
    continued = replace(ask(theirs, endpoint="responses"), previous_response="resp_kept")
    assert (await service.engine.authorize(continued)).reason == "response_not_found"
    assert (await service.engine.authorize(replace(ask(mine, endpoint="responses"),
                                                   previous_response="resp_kept"))).decision == "allow"


async def test_whose_an_older_stored_response_is_comes_from_its_record(service: Service) -> None:
    """Redis holds whose a stored response is for a day (a Responses API deployment stores every reply); an
    older one is found in the usage record that made it, and held in Redis again, so its customer still
    reaches it and no other does, until the provider forgets it (30 days)."""
    from policyd import redis_keys

    _, mine = await new_key(service, customer="acme")
    _, theirs = await new_key(service, customer="rival")
    await fund(service, "acme", "3")
    await fund(service, "rival", "3")
    await service.engine.authorize(ask(mine, request_id="made", endpoint="responses"))
    await service.engine.settle(usage("made", provider_response_id="resp_old", provider_account="second"))
    await service.writer.drain()
    key = redis_keys.stored_response("resp_old")
    assert 0 < await service.counters.client.ttl(key) <= 86400
    await service.counters.client.delete(key)  # a day later

    def reaching(secret: str) -> AuthorizeInput:
        return replace(ask(secret, endpoint="responses"), stored_response="resp_old")

    read = await service.engine.authorize(reaching(mine))
    assert (read.decision, read.account) == ("allow", "second")
    assert await service.counters.client.exists(key)  # held again
    await service.counters.client.delete(key)
    assert (await service.engine.authorize(reaching(theirs))).reason == "response_not_found"
    continuing = replace(ask(theirs, endpoint="responses"), previous_response="resp_old")
    assert (await service.engine.authorize(continuing)).reason == "response_not_found"
    await service.counters.client.delete(key)
    looked_up = []
    real_lookup = service.store.stored_response
    service.store.stored_response = lambda response_id: looked_up.append(response_id) or real_lookup(response_id)
    try:  # an id no record names is looked for in SQL once a minute, however often it is sent
        for _ in range(3):
            unknown = replace(ask(theirs, endpoint="responses"), previous_response="resp_nobody_made")
            assert (await service.engine.authorize(unknown)).decision == "allow"
        assert looked_up == ["resp_nobody_made"]
    finally:
        service.store.stored_response = real_lookup
    real_clock = service.engine.clock
    service.engine.clock = lambda: real_clock() + 31 * 86400 * 1000  # the provider has forgotten it
    try:
        assert (await service.engine.authorize(reaching(mine))).reason == "response_not_found"
    finally:
        service.engine.clock = real_clock


async def before_and_after_a_rebuild(service: Service) -> AsyncIterator[bool]:
    """False once what was written is in SQL; then True, once Redis lost everything and policyd rebuilt it."""
    await service.writer.drain()
    yield False
    await counters_lost_and_rebuilt(service)
    yield True


async def test_a_file_made_at_azure_is_found_there_after_a_rebuild(service: Service) -> None:
    """An Azure OpenAI client's file is made on an Azure account (creates_at), and reached there, not at
    OpenAI's, before and after a rebuild (whose batches read it there); a provider no file is made at is refused."""
    _, mine = await new_key(service, customer="acme")
    making = replace(ask(mine, request_id="file-at-azure", endpoint="responses", model=""), creates="file",
                     creates_at="azure")
    made = await service.engine.authorize(making)
    assert (made.decision, made.reserved, made.provider) == ("allow", 0, "azure")
    await service.engine.settle(usage("file-at-azure", input_tokens=0, output_tokens=0,
                                      provider_response_id="file-az1", provider_account="azure-east"))
    async for rebuilt in before_and_after_a_rebuild(service):
        read = await service.engine.authorize(replace(ask(mine, endpoint="responses"), stored_response="file-az1"))
        assert (read.decision, read.provider, read.account) == ("allow", "azure", "azure-east"), rebuilt
    elsewhere = await service.engine.authorize(replace(ask(mine, request_id="file-at-x", endpoint="responses", model=""),
                                                       creates="file", creates_at="bedrock"))
    assert (elsewhere.reason, elsewhere.error_param) == ("invalid_request", "creates_at")


async def test_a_conversation_is_made_free_and_stays_its_customers_after_a_rebuild(service: Service) -> None:
    """Making a conversation reserves and charges nothing (an empty wallet may), and is settled with the
    conversation's id: only its customer may reach it or add to it, before and after a rebuild."""
    _, mine = await new_key(service, customer="acme")
    _, theirs = await new_key(service, customer="rival")
    await fund(service, "rival", "3")
    making = replace(ask(mine, request_id="conv-made", endpoint="responses", model=""), creates="conversation")
    made = await service.engine.authorize(making)
    assert (made.decision, made.reserved, made.provider, made.route) == ("allow", 0, "openai", "openai")
    settled = await service.engine.settle(usage("conv-made", input_tokens=0, output_tokens=0,
                                                provider_response_id="conv_kept", provider_account="second"))
    assert (settled.charge, settled.balance_after) == (0, 0)

    def reaching(secret: str) -> AuthorizeInput:
        return replace(ask(secret, endpoint="responses"), stored_response="conv_kept")

    def adding(secret: str) -> AuthorizeInput:
        return replace(ask(secret, endpoint="responses"), conversation="conv_kept")

    async for _ in before_and_after_a_rebuild(service):
        read = await service.engine.authorize(reaching(mine))
        assert (read.decision, read.provider, read.route, read.account) == ("allow", "openai", "openai", "second")
        assert (await service.engine.authorize(reaching(theirs))).reason == "conversation_not_found"
        refused = await service.engine.authorize(adding(theirs))
        assert (refused.reason, refused.error_param) == ("conversation_not_found", "conversation")
    assert service.store.usage_record("conv-made").provider_response_id == "conv_kept"
    assert (await service.admin.audit()).ok


async def test_a_continuation_reserves_the_input_it_carries_unseen(service: Service) -> None:
    """previous_response_id, or a conversation, sends what came before back to the model, billed as input
    the body does not show: an estimating plan reserves the previous response's (or the conversation's
    last answer's) input and output beside the visible input, so a wallet that cannot pay for them is
    refused before the call instead of overdrawn after it."""
    _, secret = await new_key(service, customer="acme")  # plan pro: estimate, 20% markup
    await fund(service, "acme", "1")
    await service.engine.authorize(ask(secret, request_id="first", endpoint="responses"))
    await service.engine.settle(usage("first", input_tokens=50_000, output_tokens=10_000,
                                      provider_response_id="resp_long"))
    plain = await service.engine.authorize(ask(secret, request_id="plain", endpoint="responses", unseen_input=True))
    continuing = replace(ask(secret, request_id="next", endpoint="responses", unseen_input=True),
                         previous_response="resp_long")
    continued = await service.engine.authorize(continuing)
    carried = price_quantity(60_000, parse_amount("0.15")) * 12 // 10  # input at 0.15 a million, 20% markup
    assert abs(continued.reserved - plain.reserved - carried) <= 1
    await service.engine.release("next", "test")
    await service.engine.release("plain", "test")
    # a conversation: what its last answer settled is what the next one carries
    await service.engine.authorize(replace(ask(secret, request_id="made", endpoint="responses", model=""),
                                           creates="conversation"))
    await service.engine.settle(usage("made", 0, 0, provider_response_id="conv_long"))
    for turn, (tokens_in, tokens_out) in enumerate(((2_000, 500), (30_000, 5_000))):
        answer = replace(ask(secret, request_id=f"turn-{turn}", endpoint="responses", unseen_input=True),
                         conversation="conv_long")
        await service.engine.authorize(answer)
        await service.engine.settle(usage(f"turn-{turn}", tokens_in, tokens_out))
    following = await service.engine.authorize(replace(ask(secret, request_id="turn-2", endpoint="responses",
                                                           unseen_input=True), conversation="conv_long"))
    assert abs(following.reserved - plain.reserved - price_quantity(35_000, parse_amount("0.15")) * 12 // 10) <= 1
    await service.engine.release("turn-2", "test")
    # a wallet that covers the visible input but not what the continuation carries
    from policyd.pricing import Quantities, charge_of, cost_of

    policy = service.engine.book.current
    said = Quantities(input_tokens=50_000, output_tokens=10_000)
    first_charge = charge_of(policy.plan("pro"), "gpt-4o-mini", said, cost_of(policy.model("gpt-4o-mini"), said),
                             "standard")
    _, poor = await new_key(service, customer="poor")
    await fund(service, "poor", format_amount(first_charge + plain.reserved + carried // 2))
    await service.engine.authorize(ask(poor, request_id="poor-first", endpoint="responses"))
    settled = await service.engine.settle(usage("poor-first", 50_000, 10_000, provider_response_id="resp_poor"))
    assert settled.balance_after == plain.reserved + carried // 2
    refused = await service.engine.authorize(replace(ask(poor, request_id="poor-next", endpoint="responses",
                                                         unseen_input=True), previous_response="resp_poor"))
    assert refused.reason == "insufficient_quota"  # not overdrawn by 60,000 tokens it did not reserve
    assert (await service.engine.authorize(ask(poor, request_id="poor-plain", endpoint="responses",
                                               unseen_input=True))).decision == "allow"


async def test_rebuild_is_fenced_against_replicas_still_running(service: Service) -> None:
    from policyd import redis_keys

    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    d = await service.engine.authorize(ask(secret, request_id="fenced-1"))
    partition = service.counters.partition_of("acme")
    await service.counters.client.set(redis_keys.gate(partition), redis_keys.GATE_REBUILDING)  # as a rebuild does
    during = await service.engine.authorize(ask(secret, request_id="fenced-2"))
    assert (during.decision, during.reason, during.http_status) == ("deny", "counters_unavailable", 503)
    with pytest.raises(PolicydError) as settle_error:
        await service.engine.settle(usage("fenced-1"))
    assert (settle_error.value.status, settle_error.value.reason) == ("UNAVAILABLE", "rebuilding")
    with pytest.raises(PolicydError, match="rebuilding"):
        await service.admin.grant_credit("acme", USD, "USD", "purchase")
    assert await service.counters.wallet("acme") == (USD, d.reserved)
    await service.admin.rebuild()  # closes the gates, drains, rewrites, opens them
    assert await service.counters.gates() == [redis_keys.GATE_OPEN] * service.counters.partitions
    assert (await service.engine.settle(usage("fenced-1"))).outcome == "settled"
    assert (await service.admin.audit()).ok


async def test_expiring_credit_is_used_first_and_its_rest_expires(service: Service) -> None:
    _, secret = await new_key(service)
    clock = [service.engine.clock()]
    service.engine.clock = lambda: clock[0]
    import time as _time

    expires = int(_time.time() * 1000) + 3_600_000
    await service.admin.grant_credit("acme", 1 * USD, "USD", "purchase", "paid")
    await service.admin.grant_credit("acme", USD // 100, "USD", "promo", "trial", expires_ms=expires)
    await service.engine.authorize(ask(secret, model="gpt-4o", request_id="uses-trial"))
    s = await service.engine.settle(usage("uses-trial", input_tokens=1000, output_tokens=500))
    assert 0 < s.charge < USD // 100
    await service.writer.drain()
    assert service.store.usage_record("uses-trial").credit_source == {"trial": s.charge}
    assert service.store.credit_consumed() == {"trial": s.charge}  # summed by SQL, as the audit reads it
    assert (await service.admin.audit()).ok
    with pytest.raises(PolicydError, match="invalid_grant"):
        await service.admin.grant_credit("acme", USD, "USD", "promo", "old", expires_ms=1)
    clock[0] = expires + 1
    await service.engine.expire_due()
    assert await service.counters.wallet("acme") == (USD + USD // 100 - s.charge - (USD // 100 - s.charge), 0)
    await service.writer.drain()
    assert service.store.ledger_balances() == {"acme": USD}
    assert (await service.admin.audit()).ok
    await service.admin.rebuild()
    assert await service.counters.wallet("acme") == (USD, 0)


async def test_zero_charge_requests_settle_and_release(service: Service) -> None:
    """A free plan or a promoted feature reserves 0 and is charged 0; the provider cost is kept."""
    policy = (await service.admin.book.version(1)).canonical.replace(
        "    promo_features: []\n", "    promo_features: [launch-week]\n")
    await service.admin.apply_policy(policy, "promo.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    d = await service.engine.authorize(ask(secret, request_id="promo-1", feature="launch-week"))
    assert d.decision == "allow" and d.reserved == 0
    s = await service.engine.settle(usage("promo-1"))
    assert s.charge == 0 and s.cost > 0
    await service.engine.authorize(ask(secret, request_id="promo-2", feature="launch-week"))
    assert (await service.engine.release("promo-2", "provider_error")).outcome == "released"
    await service.writer.drain()
    row = service.store.usage_record("promo-1")
    assert (row.billing_mode, row.charge_nanos, row.cost_nanos) == ("promo", 0, s.cost)
    assert await service.counters.wallet("acme") == (USD, 0)
    assert (await service.admin.audit()).ok


async def test_workspace_wallets_are_separate(service: Service) -> None:
    policy = (await service.admin.book.version(1)).canonical.replace(
        "    wallet_scope: customer\n", "    wallet_scope: workspace\n")
    await service.admin.apply_policy(policy, "ws.yaml")
    _, ws1 = await new_key(service, workspace_id="ws1")
    _, ws2 = await new_key(service, workspace_id="ws2")
    await service.admin.grant_credit("acme", USD, "USD", "purchase", "ws1-credit", workspace_id="ws1")
    await fund(service, "acme", "5")  # the customer's own wallet is not the workspaces'
    d = await service.engine.authorize(ask(ws1, request_id="ws1-1"))
    assert d.decision == "allow"
    s = await service.engine.settle(usage("ws1-1"))
    assert s.balance_before == USD
    assert await service.counters.wallet("acme/ws1") == (USD - s.charge, 0)
    assert await service.counters.wallet("acme") == (5 * USD, 0)
    broke = await service.engine.authorize(ask(ws2, request_id="ws2-1"))
    assert broke.reason == "insufficient_quota"
    with pytest.raises(PolicydError):
        await service.admin.grant_credit("acme/x", USD, "USD", "purchase")
    await service.writer.drain()
    assert service.store.ledger_balances() == {"acme/ws1": USD - s.charge, "acme": 5 * USD}
    assert (await service.admin.audit()).ok
    await service.counters.client.flushall()
    await service.admin.rebuild()
    assert await service.counters.wallet("acme/ws1") == (USD - s.charge, 0)
    assert (await service.admin.audit()).ok


async def test_a_closed_request_id_cannot_authorize_again(service: Service) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    await service.engine.authorize(ask(secret, request_id="once"))
    await service.engine.release("once", "provider_error")
    again = await service.engine.authorize(ask(secret, request_id="once"))
    assert (again.decision, again.reason, again.error_param) == ("deny", "invalid_request", "request_id")
    assert "released" in again.message
    assert await service.counters.wallet("acme") == (USD, 0)


async def test_settle_and_release_after_a_local_authorize_take_one_redis_round_trip(redis_server, postgres_server) -> None:
    """The hot path: Authorize is one script (which sets the request index too); the Settle or Release
    of a reservation this process made runs its script alone, with no lookup before it. Counted by a
    real redis-server (MONITOR, leaving out what the scripts run inside Redis)."""
    import secrets

    from tests.conftest import make_settings

    # background loops slowed down: the counts below are this test's commands alone
    service = await Service.build(make_settings(
        {"redis_url": redis_server.url, "database_url": postgres_server.create_database("rt_" + secrets.token_hex(4))},
        writer_enabled=False, sweeper_interval_ms=600_000, policy_refresh_ms=600_000))
    await service.start()
    try:
        await _one_round_trip(service)
    finally:
        await service.close()


async def _one_round_trip(service: Service) -> None:
    import threading

    import redis as sync_redis

    from tests.conftest import SAMPLE_POLICY

    await service.admin.apply_policy(SAMPLE_POLICY, "p.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "5")

    class Sent:
        """The commands clients send (MONITOR; commands run inside scripts are left out)."""

        def __enter__(self) -> list[str]:
            self.commands: list[str] = []
            self.ready, self.done = threading.Event(), threading.Event()
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
            assert self.ready.wait(10)
            return self.commands

        def _watch(self) -> None:
            client = sync_redis.Redis.from_url(service.settings.redis_url)
            with client.monitor() as monitor:
                self.ready.set()
                for event in monitor.listen():
                    if event["command"] == "ECHO stop-watching":
                        break
                    name = event["command"].split()[0].upper()
                    if event.get("client_type") != "lua" and name not in ("HELLO", "CLIENT", "SELECT"):
                        self.commands.append(name)  # (a new connection's set-up is not a round trip of the call)
            client.close()

        def __exit__(self, *exc: object) -> None:
            sync_redis.Redis.from_url(service.settings.redis_url).echo("stop-watching")
            self.thread.join(10)

    for rid in ("warm-1", "warm-2"):  # the first use of a script loads it (NOSCRIPT, SCRIPT LOAD, EVALSHA)
        assert (await service.engine.authorize(ask(secret, request_id=rid))).decision == "allow"
    await service.engine.settle(usage("warm-1"))
    await service.engine.release("warm-2", "warm-up")
    for rid, close in (("rt-1", "settle"), ("rt-2", "release")):
        with Sent() as sent:
            assert (await service.engine.authorize(ask(secret, request_id=rid))).decision == "allow"
        assert sent == ["EVALSHA"], ("authorize: one script, which sets the request index itself", sent)
        with Sent() as sent:
            if close == "settle":
                assert (await service.engine.settle(usage(rid))).outcome == "settled"
            else:
                assert (await service.engine.release(rid, "provider_error")).outcome == "released"
        assert sent == ["EVALSHA"], (close, sent)
    # another process (no local facts) still settles, with the lookups
    assert (await service.engine.authorize(ask(secret, request_id="rt-3"))).decision == "allow"
    service.counters.forget("rt-3")
    with Sent() as sent:
        assert (await service.engine.settle(usage("rt-3"))).outcome == "settled"
    assert sent == ["GET", "HGETALL", "EVALSHA"], sent


async def test_an_audit_under_traffic_reports_only_differences_that_stay(service: Service,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from policyd import redis_keys
    from policyd.admin import AUDIT_ROUNDS

    _, secret = await new_key(service)
    await fund(service, "acme", "3")
    await service.engine.authorize(ask(secret, request_id="traffic-1"))
    await service.engine.settle(usage("traffic-1"))
    ledger = service.store.ledger_balances
    reads: list[int] = []

    def ledger_read_before_an_event_landed() -> dict[str, int]:  # the first read misses a settle in flight
        reads.append(1)
        balances = ledger()
        return {**balances, "acme": balances["acme"] + 7} if len(reads) == 1 else balances

    monkeypatch.setattr(service.store, "ledger_balances", ledger_read_before_an_event_landed)
    audit = await service.admin.audit()
    assert audit.ok and len(reads) == 2  # the difference was gone at the next comparison
    balance, _ = await service.counters.wallet("acme")
    key = redis_keys.wallet(service.counters.partition_of("acme"), "acme")
    await service.counters.client.hincrby(key, "balance", 5)  # a counter that is truly off stays off
    audit = await service.admin.audit()
    assert not audit.ok and audit.mismatches == [("wallet:acme:balance", balance + 5, balance)]
    assert len(reads) == 2 + AUDIT_ROUNDS


async def test_day_budgets_start_at_midnight_in_the_policy_time_zone(service: Service) -> None:
    """A customer in Tokyo gets a new day at Tokyo's midnight (15:00 UTC), not at UTC's."""
    tight = SAMPLE_POLICY.replace('limit: "50.00", action: downgrade', 'limit: "0.01", action: downgrade')
    await service.admin.apply_policy(tight.replace("currency: USD\n", "currency: USD\ntimezone: Asia/Tokyo\n"), "tokyo.yaml")
    limit = next(lim for lim in service.admin.book.current.plan("pro").limits if lim.name == "premium-day")
    assert limit.timezone == "Asia/Tokyo"
    assert next(lim for lim in service.admin.book.current.plan("pro").limits if lim.window == "minute").timezone == ""
    clock = [calendar.timegm((2026, 11, 24, 14, 30, 0)) * 1000]  # 23:30 in Tokyo
    service.engine.clock = lambda: clock[0]
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    first = await service.engine.authorize(ask(secret, model="gpt-4o", max_output_tokens=500, request_id="tz1"))
    late = await service.engine.authorize(ask(secret, model="gpt-4o", max_output_tokens=500, request_id="tz2"))
    assert (first.decision, late.decision) == ("allow", "downgrade")  # the day's premium budget is spent
    clock[0] += 3600 * 1000  # 00:30 in Tokyo, still 15:30 of the same UTC day
    next_day = await service.engine.authorize(ask(secret, model="gpt-4o", max_output_tokens=500, request_id="tz3"))
    assert (next_day.decision, next_day.served_model) == ("allow", "gpt-4o")
    await service.writer.drain()
    holds = [key for key, _, _ in service.store.usage_record("tz3").holds if ":day@Asia/Tokyo:" in key]
    assert holds and holds[0].endswith(f":{calendar.timegm((2026, 11, 24, 15, 0, 0))}")
    assert (await service.admin.audit()).ok


async def test_day_budgets_without_a_time_zone_are_utc_days(service: Service) -> None:
    tight = SAMPLE_POLICY.replace('limit: "50.00", action: downgrade', 'limit: "0.01", action: downgrade')
    await service.admin.apply_policy(tight, "utc.yaml")
    clock = [calendar.timegm((2026, 11, 24, 14, 30, 0)) * 1000]
    service.engine.clock = lambda: clock[0]
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    await service.engine.authorize(ask(secret, model="gpt-4o", max_output_tokens=500))
    clock[0] += 3600 * 1000
    later = await service.engine.authorize(ask(secret, model="gpt-4o", max_output_tokens=500))
    assert later.decision == "downgrade"  # the same UTC day
    clock[0] = calendar.timegm((2026, 11, 25, 0, 0, 1)) * 1000
    assert (await service.engine.authorize(ask(secret, model="gpt-4o", max_output_tokens=500))).decision == "allow"


async def mini_priced_with(service: Service, prices: str) -> str:
    """The sample policy with `prices` (YAML) added to gpt-4o-mini's; a funded key of the free plan (strict,
    charged at cost) of a customer of its own."""
    await service.admin.apply_policy(SAMPLE_POLICY.replace('      output: "0.60"\n', f'      output: "0.60"\n      {prices}\n', 1),
                                     "priced.yaml")
    customer = f"priced-{next(_customers)}"
    _, secret = await new_key(service, plan="free", customer=customer)
    await fund(service, customer, "1")
    return secret


async def test_a_prompt_marked_for_the_cache_is_reserved_at_the_cache_write_price(service: Service) -> None:
    """Cache writes cost more than input (Anthropic: 1.25x for five minutes, 2x for an hour): a request whose
    body marks its input for the cache (cache_control) is reserved at the write price, so a strict plan's
    bound holds when the provider writes the whole prompt; without the mark it is input as before."""
    from policyd.pricing import STRICT_TOKENS_PER_MESSAGE, STRICT_TOKENS_PER_REQUEST

    secret = await mini_priced_with(service, 'cache_write_input: "0.1875"\n      cache_write_1h_input: "0.30"')
    bound = 400 + STRICT_TOKENS_PER_MESSAGE + STRICT_TOKENS_PER_REQUEST  # ask(): 400 bytes, one message

    def marked(request_id: str, ttl: str) -> AuthorizeInput:
        request = ask(secret, request_id=request_id)
        return replace(request, shape=replace(request.shape, cache_write=ttl))

    plain = await service.engine.authorize(ask(secret, request_id="plain"))
    output = price_quantity(100, parse_amount("0.60"))
    assert plain.reserved == price_quantity(bound, parse_amount("0.15")) + output
    for ttl, price in (("5m", "0.1875"), ("1h", "0.30")):
        held = await service.engine.authorize(marked(f"cached-{ttl}", ttl))
        assert held.reserved == price_quantity(bound, parse_amount(price)) + output
        written = dict(cache_write_input_tokens=bound, cache_write_1h_input_tokens=bound if ttl == "1h" else 0)
        settled = await service.engine.settle(usage(f"cached-{ttl}", input_tokens=bound, output_tokens=100, **written))
        assert plain.reserved < settled.charge <= held.reserved  # beyond the plain bound, within the marked one
    await service.engine.release("plain", "test")


async def test_a_spoken_reply_is_reserved_at_the_audio_output_price(service: Service) -> None:
    """A chat completion that may answer in audio (modalities ["text", "audio"]) has its output reserved at
    the audio output price (gpt-4o-audio: 8x text's), so a strict bound holds when every token is spoken."""
    secret = await mini_priced_with(service, 'audio_output: "4.80"')
    plain = await service.engine.authorize(ask(secret, request_id="text"))
    spoken = ask(secret, request_id="spoken")
    held = await service.engine.authorize(replace(spoken, shape=replace(spoken.shape, audio_output=True)))
    assert held.reserved - plain.reserved == price_quantity(100, parse_amount("4.80")) - price_quantity(
        100, parse_amount("0.60"))
    settled = await service.engine.settle(usage("spoken", input_tokens=10, output_tokens=100, audio_output_tokens=100))
    assert plain.reserved < settled.charge <= held.reserved
    await service.engine.release("text", "test")


async def test_file_searches_are_reserved_up_to_the_requests_bound(service: Service) -> None:
    """max_tool_calls with a file_search tool bounds the file searches the provider may run: each is
    reserved at its price, and the charge of those run stays within it."""
    secret = await mini_priced_with(service, 'per_file_search: "0.0025"')
    plain = await service.engine.authorize(ask(secret, request_id="no-search"))
    bounded = ask(secret, request_id="searches")
    held = await service.engine.authorize(replace(bounded, shape=replace(bounded.shape, file_searches=3)))
    assert held.reserved - plain.reserved == 3 * parse_amount("0.0025")
    settled = await service.engine.settle(usage("searches", input_tokens=10, output_tokens=10, file_searches=3))
    assert parse_amount("0.0075") < settled.charge <= held.reserved
    await service.engine.release("no-search", "test")


async def test_a_long_prompt_is_reserved_and_charged_at_the_long_context_tier(service: Service) -> None:
    secret = await mini_priced_with(service, 'long_context_above: 1000\n'
                                             '      long_context: {input: "0.30", cached_input: "0.15", output: "1.20"}')
    base_in, base_out, tier_in, tier_out = (parse_amount(p) for p in ("0.15", "0.60", "0.30", "1.20"))
    short = await service.engine.authorize(ask(secret, prompt_bytes=500, max_output_tokens=100, request_id="short"))
    long = await service.engine.authorize(ask(secret, prompt_bytes=5000, max_output_tokens=100, request_id="long"))
    # the strict bound of input (bytes + 8 a message + 16) decides the tier of the reservation
    assert short.reserved == price_quantity(524, base_in) + price_quantity(100, base_out)
    assert long.reserved == price_quantity(5024, tier_in) + price_quantity(100, tier_out)
    s = await service.engine.settle(usage("short", input_tokens=1000, output_tokens=90))  # at the threshold: base
    assert s.charge == price_quantity(1000, base_in) + price_quantity(90, base_out)
    s = await service.engine.settle(usage("long", input_tokens=1001, output_tokens=90))  # past it: every token
    assert s.charge == price_quantity(1001, tier_in) + price_quantity(90, tier_out)
    await service.writer.drain()
    assert (await service.admin.audit()).ok


async def test_a_reply_cut_while_the_model_thought_unseen_is_charged_the_output_its_speed_made(
        service: Service) -> None:
    """A reasoning model shows nothing while it thinks, and bills the thinking: with the model's output speed
    in the price table, a stream cut (or left) before the provider reported its usage is charged at least
    that speed times the seconds since its authorization (at most its cap); without it, what it showed."""
    document = yaml.safe_load((await service.admin.book.version(1)).canonical)
    document["price_table"]["models"]["gpt-4o"]["output_tokens_per_second"] = 40
    await service.admin.apply_policy(yaml.safe_dump(document), "speeds.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    clock = [service.engine.clock()]
    service.engine.clock = lambda: clock[0]
    for request_id, model in (("thinking", "gpt-4o"), ("long-thought", "gpt-4o"), ("no-speed", "gpt-4o-mini"),
                              ("whole", "gpt-4o")):
        await service.engine.authorize(ask(secret, model=model, max_output_tokens=1000, request_id=request_id))
    clock[0] += 7_500  # 7.5 s: 300 tokens at 40 a second
    cut = {"interrupted": True, "error_class": "usage_estimated:stream_cut"}
    assert (await service.engine.settle_estimated("thinking", 12, **cut)).charge == \
        -(-(price_quantity(104, parse_amount("2.50")) + price_quantity(300, parse_amount("10.00"))) * 12 // 10)
    clock[0] += 60_000
    await service.engine.settle_estimated("long-thought", 12, **cut)
    await service.engine.settle_estimated("no-speed", 12, **cut)
    # a reply the provider ended without reporting usage was not cut: what it showed is all it made
    await service.engine.settle_estimated("whole", 12, interrupted=False, error_class="usage_estimated:no_usage_reported")
    await service.writer.drain()
    outputs = {rid: service.store.usage_record(rid).output_tokens for rid in ("thinking", "long-thought", "no-speed",
                                                                              "whole")}
    assert outputs == {"thinking": 300, "long-thought": 1000, "no-speed": 12, "whole": 12}
    assert (await service.admin.audit()).ok


async def test_a_reply_from_another_model_than_the_one_sent_is_priced_as_the_model_that_served_it(
        service: Service) -> None:
    """A provider may serve another model than the one it was sent (a server-side fallback, a router) and
    bills that one: the reply names it, and the table prices it. A name the table does not know (a dated
    snapshot of the model sent, even one another entry sends upstream) leaves the model authorized; so does
    the model's own upstream name."""
    document = yaml.safe_load((await service.admin.book.version(1)).canonical)
    document["price_table"]["models"]["house-mini"] = {**document["price_table"]["models"]["gpt-4o-mini"],
                                                       "upstream_model": "gpt-4o-mini-2024-07-18"}
    await service.admin.apply_policy(yaml.safe_dump(document), "house.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    for request_id, model in (("fell-back", "gpt-4o-mini"), ("snapshot", "gpt-4o-mini"), ("house", "house-mini"),
                              ("estimated", "gpt-4o-mini"), ("other-provider", "gpt-4o-mini"),
                              ("alias-resolved", "gpt-4o-mini")):
        await service.engine.authorize(ask(secret, model=model, max_output_tokens=100, request_id=request_id))
    gpt_4o = price_quantity(1000, parse_amount("2.50")) + price_quantity(50, parse_amount("10.00"))
    mini = price_quantity(1000, parse_amount("0.15")) + price_quantity(50, parse_amount("0.60"))
    assert (await service.engine.settle(usage("fell-back", 1000, 50, reply_model="gpt-4o"))).cost == gpt_4o
    assert (await service.engine.settle(usage("snapshot", 1000, 50, reply_model="gpt-4o-2024-08-06"))).cost == mini
    assert (await service.engine.settle(usage("house", 1000, 50, reply_model="gpt-4o-mini-2024-07-18"))).cost == mini
    # the snapshot an alias resolved to, which another entry also sends upstream: the alias sent stays
    assert (await service.engine.settle(usage("alias-resolved", 1000, 50, reply_model="gpt-4o-mini-2024-07-18"))).cost \
        == mini
    # another provider's entry (an Azure deployment whose reply names OpenAI's model): not what billed it
    assert (await service.engine.settle(usage("other-provider", 1000, 50, reply_model="claude-sonnet-4"))).cost == mini
    from policyd.usage_capture import Tokens

    cut = await service.engine.settle_estimated("estimated", 50, interrupted=True, error_class="usage_estimated:stream_cut",
                                                reported=Tokens(input_tokens=1000, reply_model="gpt-4o"))
    assert cut.cost == gpt_4o
    await service.writer.drain()
    served = {rid: service.store.usage_record(rid).served_model
              for rid in ("fell-back", "snapshot", "house", "estimated", "other-provider", "alias-resolved")}
    assert served == {"fell-back": "gpt-4o", "snapshot": "gpt-4o-mini", "house": "house-mini", "estimated": "gpt-4o",
                      "other-provider": "gpt-4o-mini", "alias-resolved": "gpt-4o-mini"}
    assert (await service.admin.audit()).ok


async def test_a_replys_parts_are_priced_each_at_the_model_that_ran_it(service: Service) -> None:
    """A reply holding several models' work (Anthropic's usage.iterations: a server-side fallback's declined
    attempt, an advisor's calls, a compaction) bills each part at its own model's prices, a long-context
    tier by the part's own input; the record holds the parts' sums, the model that wrote the reply, and the
    other models' costs, which reconciliation sets under each. A part naming a dated snapshot is its model's;
    one naming a model the table does not price is at the served model's, marked. Parts that do not add up
    to the token fields given, or hold what parts cannot, are refused and move no money; a retried Settle
    with the same parts is charged once."""
    from policyd.domain import UsagePart

    document = yaml.safe_load((await service.admin.book.version(1)).canonical)
    models = document["price_table"]["models"]
    models["claude-fable-5"] = {"provider": "anthropic", "tier": "premium", "input": "10.00", "cached_input": "1.00",
                                "cache_write_input": "12.50", "output": "50.00"}
    models["claude-opus-4-8"] = {"provider": "anthropic", "tier": "premium", "input": "5.00", "cached_input": "0.50",
                                 "cache_write_input": "6.25", "output": "25.00", "long_context_above": 200000,
                                 "long_context": {"input": "10.00", "cached_input": "1.00",
                                                  "cache_write_input": "12.50", "output": "37.50"}}
    await service.admin.apply_policy(yaml.safe_dump(document), "fable.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "100")
    for rid in ("fell-back", "compacted", "unpriced", "bad-sum", "bad-audio", "bad-part"):
        model = "claude-fable-5" if rid == "fell-back" else "claude-opus-4-8"
        await service.engine.authorize(ask(secret, model=model, max_output_tokens=20000, request_id=rid,
                                           endpoint="anthropic_messages"))
    declined = UsagePart("message", "claude-fable-5-20260601", 83192, 72769, 10421, 0, 578)
    served = UsagePart("fallback_message", "claude-opus-4-8", 79216, 79214, 0, 0, 13658)
    fable = price_quantity(2, parse_amount("10.00")) + price_quantity(72769, parse_amount("1.00")) \
        + price_quantity(10421, parse_amount("12.50")) + price_quantity(578, parse_amount("50.00"))
    opus = price_quantity(2, parse_amount("5.00")) + price_quantity(79214, parse_amount("0.50")) \
        + price_quantity(13658, parse_amount("25.00"))
    settled = await service.engine.settle(usage("fell-back", 0, 0, reply_model="claude-opus-4-8",
                                                parts=(declined, served)))
    assert (settled.cost, settled.served_model) == (fable + opus, "claude-opus-4-8")
    assert settled.charge == apply_basis_points(fable, 12_000) + apply_basis_points(opus, 12_000)  # part by part
    again = await service.engine.settle(usage("fell-back", 0, 0, reply_model="claude-opus-4-8", parts=(declined, served)))
    assert (again.outcome, again.charge) == ("exists", settled.charge)
    # a compaction (no model: the served one's) past the long-context threshold, its reply's part below it
    compaction, reply = UsagePart("compaction", "", 210000, 0, 0, 0, 3500), UsagePart("message", "", 23000, 0, 0, 0, 1000)
    compacted = await service.engine.settle(usage("compacted", 233000, 4500, parts=(compaction, reply)))
    assert compacted.cost == price_quantity(210000, parse_amount("10.00")) + price_quantity(3500, parse_amount("37.50")) \
        + price_quantity(23000, parse_amount("5.00")) + price_quantity(1000, parse_amount("25.00"))
    odd = await service.engine.settle(usage("unpriced", 0, 0, parts=(UsagePart("advisor_message", "claude-mystery-9",
                                                                               100, 0, 0, 0, 10),)))
    assert odd.cost == price_quantity(100, parse_amount("5.00")) + price_quantity(10, parse_amount("25.00"))
    balance = await service.counters.wallet("acme")
    for rid, report, field in (
            ("bad-sum", usage("bad-sum", 5, 0, parts=(UsagePart("message", "", 4, 0, 0, 0, 0),)), "input_tokens"),
            ("bad-audio", usage("bad-audio", 0, 0, audio_input_tokens=1, parts=(reply,)), "audio_input_tokens"),
            ("bad-part", usage("bad-part", 0, 0, parts=(UsagePart("message", "", 4, 5, 0, 0, 0),)), "parts")):
        with pytest.raises(PolicydError) as refused:
            await service.engine.settle(report)
        assert (refused.value.reason, field in str(refused.value) or field == "parts") == ("invalid_usage", True), rid
    assert await service.counters.wallet("acme") == balance  # refused: no money moved
    await service.writer.drain()
    record = service.store.usage_record("fell-back")
    assert (record.served_model, record.input_tokens, record.cached_input_tokens, record.cache_write_input_tokens,
            record.output_tokens, record.cost_nanos) == ("claude-opus-4-8", 162408, 151983, 10421, 14236, fable + opus)
    assert (record.other_models, record.other_models_cost_nanos) == ({"claude-fable-5": [fable, 83192 + 578]}, fable)
    assert (record.fallback_reason, service.store.usage_record("compacted").fallback_reason) == ("provider_fallback", "")
    assert service.store.usage_record("unpriced").error_class == "part_model_unpriced"
    assert service.store.usage_record("compacted").error_class == ""
    assert (await service.admin.audit()).ok
    # reconciled per model: the declined attempt under the model that ran it, as the provider bills it
    day = __import__("time").strftime("%Y-%m-%d", __import__("time").gmtime(record.created_ms // 1000))
    export = "\n".join(["date,model,amount", f"{day},claude-fable-5,{format_amount(fable)}",
                        f"{day},claude-opus-4-8,{format_amount(opus + compacted.cost + odd.cost)}"])
    result = await service.admin.reconcile("anthropic", export.encode())
    assert {(c.model, c.status) for c in result.comparisons} == {("claude-fable-5", "matched"),
                                                                  ("claude-opus-4-8", "matched")}, result.comparisons


async def test_other_models_a_request_names_must_be_allowed_and_are_held_for(service: Service) -> None:
    """Anthropic's server-side fallbacks and its advisor tool name other models the provider runs and bills:
    each must be one the key may use (else refused, naming the field, nothing held), and the hold covers them
    (each fallback the whole request again; each advisor call the conversation and its advice, for the calls
    its max_uses allows, the plan's default_max_tool_calls set in the tool when it gives none)."""
    from policyd.domain import Shape

    document = yaml.safe_load((await service.admin.book.version(1)).canonical)
    document["price_table"]["models"]["claude-opus-4-8"] = {"provider": "anthropic", "tier": "premium", "input": "5.00",
                                                            "output": "25.00", "max_output_tokens": 32000}
    document["price_table"]["models"]["claude-haiku-4-5"] = {"provider": "anthropic", "tier": "low-cost",
                                                             "input": "1.00", "output": "5.00"}
    await service.admin.apply_policy(yaml.safe_dump(document), "others.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "100")

    def asked(rid: str, **shape: Any) -> AuthorizeInput:
        return reshaped(ask(secret, model="claude-haiku-4-5", request_id=rid, endpoint="anthropic_messages",
                            input_tokens=1000, max_output_tokens=200), **shape)

    alone = await service.engine.authorize(asked("alone"))
    one = price_quantity(1000, parse_amount("1.00")) + price_quantity(200, parse_amount("5.00"))
    assert alone.reserved == apply_basis_points(one, 12_000)
    fell = await service.engine.authorize(asked("fallback", fallback_models=("claude-opus-4-8",)))
    opus = price_quantity(1000, parse_amount("5.00")) + price_quantity(200, parse_amount("25.00"))
    assert fell.reserved == apply_basis_points(one, 12_000) + apply_basis_points(opus, 12_000)
    advised = await service.engine.authorize(asked("advisor", advisor_model="claude-opus-4-8", advisor_calls=2,
                                                   advisor_max_tokens=700))
    advice = price_quantity(2 * 1200, parse_amount("5.00")) + price_quantity(2 * 700, parse_amount("25.00"))
    assert advised.reserved == apply_basis_points(one, 12_000) + apply_basis_points(advice, 12_000)
    unbounded = await service.engine.authorize(asked("advisor-unbounded", advisor_model="claude-opus-4-8"))
    calls = 10  # the plan's default_max_tool_calls, set in the tool as its max_uses
    advice = price_quantity(calls * 1200, parse_amount("5.00")) + price_quantity(calls * 32000, parse_amount("25.00"))
    assert (unbounded.reserved, unbounded.max_tool_calls) == (apply_basis_points(one, 12_000)
                                                              + apply_basis_points(advice, 12_000), calls)
    # a key of a plan without the premium tier may not have them run for it
    _, low = await new_key(service, customer="thrifty", plan="free")
    await fund(service, "thrifty", "100")
    for rid, shape, param in (("free-fallback", {"fallback_models": ("claude-opus-4-8",)}, "fallbacks"),
                              ("free-advisor", {"advisor_model": "claude-opus-4-8"}, "tools")):
        request = ask(low, model="gpt-4o-mini", request_id=rid, input_tokens=10)  # (the free plan's endpoint)
        denied = await service.engine.authorize(replace(request, shape=replace(request.shape, **shape)))
        assert (denied.decision, denied.reason, denied.error_param, denied.reserved) == (
            "deny", "model_not_allowed", param, 0)
    unknown = await service.engine.authorize(asked("unknown", fallback_models=("claude-mystery-9",)))
    assert (unknown.decision, unknown.reason, unknown.error_param) == ("deny", "unknown_model", "fallbacks")
    assert Shape().fallback_models == ()


async def test_a_routers_fallbacks_are_the_keys_and_the_dearest_of_them_is_held(service: Service) -> None:
    """A router's fallbacks (OpenRouter's `models`): tried in turn until one serves, the one that served alone
    billed. Each must be one the key may use (else refused, naming `models`, nothing held); the hold is the whole
    request on the dearest of them (its output cap within that model's max_output_tokens), not their sum; a
    fallback that served is charged at its prices."""
    from policyd.domain import Shape

    document = yaml.safe_load((await service.admin.book.version(1)).canonical)
    models = document["price_table"]["models"]
    models["openai/gpt-4o-mini"] = {"provider": "openrouter", "tier": "low-cost", "input": "0.15", "output": "0.60"}
    models["anthropic/claude-opus-4"] = {"provider": "openrouter", "tier": "premium", "input": "15.00",
                                         "output": "75.00", "max_output_tokens": 32000}
    models["google/gemini-flash"] = {"provider": "openrouter", "tier": "low-cost", "input": "0.10", "output": "0.40"}
    await service.admin.apply_policy(yaml.safe_dump(document), "routed.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "100")

    def asked(rid: str, cap: int = 200, **shape: Any) -> AuthorizeInput:
        return reshaped(ask(secret, model="openai/gpt-4o-mini", request_id=rid, input_tokens=1000,
                            max_output_tokens=cap), **shape)

    def at(input_price: str, output_price: str, output_tokens: int = 200) -> int:
        return apply_basis_points(price_quantity(1000, parse_amount(input_price))
                                  + price_quantity(output_tokens, parse_amount(output_price)), 12_000)  # pro: +20%

    alone = await service.engine.authorize(asked("alone"))
    assert alone.reserved == at("0.15", "0.60")
    cheaper = await service.engine.authorize(asked("cheaper", fallback_models=("google/gemini-flash",),
                                                   fallbacks_routed=True))
    assert cheaper.reserved == at("0.15", "0.60")  # the model asked for is the dearest: held as alone
    dearest = await service.engine.authorize(asked("dearest", fallback_models=(
        "google/gemini-flash", "anthropic/claude-opus-4"), fallbacks_routed=True))
    assert dearest.reserved == at("15.00", "75.00")  # not the sum of the three
    summed = await service.engine.authorize(asked("summed", fallback_models=(
        "google/gemini-flash", "anthropic/claude-opus-4")))  # Anthropic's kind: each declined attempt may bill
    assert summed.reserved > dearest.reserved
    big = await service.engine.authorize(asked("big-cap", cap=100_000, fallback_models=("anthropic/claude-opus-4",),
                                               fallbacks_routed=True))
    assert big.reserved == at("15.00", "75.00", 32_000)  # the fallback writes at most its own max_output_tokens
    # the one that served is charged at its prices; one that did not, at the model asked for's
    served = await service.engine.settle(usage("dearest", 1000, 150, reply_model="anthropic/claude-opus-4"))
    assert served.cost == price_quantity(1000, parse_amount("15.00")) + price_quantity(150, parse_amount("75.00"))
    kept = await service.engine.settle(usage("cheaper", 1000, 150, reply_model="openai/gpt-4o-mini"))
    assert kept.cost == price_quantity(1000, parse_amount("0.15")) + price_quantity(150, parse_amount("0.60"))
    await service.writer.drain()
    assert (service.store.usage_record("dearest").served_model, service.store.usage_record("dearest").fallback_reason,
            service.store.usage_record("cheaper").fallback_reason) == ("anthropic/claude-opus-4", "provider_fallback", "")
    # a key of a plan without the premium tier may not have them served to it; a model the table lacks is unknown
    _, low = await new_key(service, customer="thrifty", plan="free")
    await fund(service, "thrifty", "100")
    request = ask(low, model="openai/gpt-4o-mini", request_id="free-routed", input_tokens=10)
    denied = await service.engine.authorize(replace(request, shape=replace(
        request.shape, fallback_models=("anthropic/claude-opus-4",), fallbacks_routed=True)))
    assert (denied.decision, denied.reason, denied.error_param, denied.reserved) == (
        "deny", "model_not_allowed", "models", 0)
    litellm = await service.engine.authorize(replace(request, shape=replace(  # a gateway of LiteLLM's kind's list
        request.shape, fallback_models=("anthropic/claude-opus-4",), fallbacks_routed=True,
        fallbacks_param="fallbacks")))
    assert (litellm.decision, litellm.reason, litellm.error_param) == ("deny", "model_not_allowed", "fallbacks")
    unknown = await service.engine.authorize(asked("unknown", fallback_models=("mystery/model-9",),
                                                   fallbacks_routed=True))
    assert (unknown.decision, unknown.reason, unknown.error_param) == ("deny", "unknown_model", "models")
    # a router may be given ten; Anthropic's fallbacks are three at most
    many = ("google/gemini-flash",) * 11
    ten = await service.engine.authorize(asked("ten", fallback_models=many[:10], fallbacks_routed=True))
    assert (ten.decision, ten.reserved) == ("allow", at("0.15", "0.60"))
    for rid, shape, most in (("eleven", {"fallback_models": many, "fallbacks_routed": True}, 10),
                             ("four", {"fallback_models": many[:4]}, 3)):
        refused = await service.engine.authorize(asked(rid, **shape))
        assert (refused.decision, refused.reason, refused.error_param, refused.reserved) == (
            "deny", "invalid_request", "fallbacks", 0)
        assert f"at most {most}" in refused.message
    assert Shape().fallbacks_routed is False


async def test_a_limit_on_a_fallbacks_model_holds_and_counts_the_request_only_if_that_model_serves(
        service: Service) -> None:
    """A request naming fallbacks may be served by any of them: a limit or cap on one of their models (a budget on
    the premium tier, a model's own bucket) holds it too, refusing it when it has no room, and counts it at settle
    only when that model served it (nothing when another did); a release gives every hold back."""
    document = yaml.safe_load((await service.admin.book.version(1)).canonical)
    document["plans"]["pro"]["limits"] += [
        {"name": "premium-budget", "scope": "customer", "models": ["tier:premium"], "window": "day", "unit": "money",
         "limit": "0.30"},
        {"name": "model-requests", "scope": "model", "window": "day", "unit": "requests", "limit": 1000}]
    await service.admin.apply_policy(yaml.safe_dump(document), "fallback-limits.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "100")

    def asked(rid: str, cap: int = 200, **shape: Any) -> AuthorizeInput:
        return reshaped(ask(secret, model="gpt-4o-mini", request_id=rid, input_tokens=1000, max_output_tokens=cap),
                        **shape)

    async def used(key: str) -> int:
        return int(await service.counters.client.hget(key, "used") or 0)

    routed = {"fallback_models": ("gpt-4o",), "fallbacks_routed": True}
    for rid, served in (("mini-served", "gpt-4o-mini"), ("fallback-served", "gpt-4o")):
        assert (await service.engine.authorize(asked(rid, **routed))).decision == "allow"
        await service.writer.drain()
        holds = {hold[0]: hold[3] if len(hold) > 3 else None for hold in service.store.usage_record(rid).holds}
        only = {tuple(models) for models in holds.values() if models}
        assert only == {("gpt-4o",), ("gpt-4o-mini",)}, holds  # the premium budget's and each model's bucket
        premium = next(key for key, models in holds.items() if models == ["gpt-4o"] and ":money:" in key)
        dear_model = next(key for key, models in holds.items() if models == ["gpt-4o"] and ":requests:" in key)
        cheap_model = next(key for key, models in holds.items() if models == ["gpt-4o-mini"])
        before = {key: await used(key) for key in (premium, dear_model, cheap_model)}
        settled = await service.engine.settle(usage(rid, 1000, 100, reply_model=served))
        after = {key: await used(key) for key in (premium, dear_model, cheap_model)}
        await service.writer.drain()
        final = {key: amount for key, _, amount in service.store.usage_record(rid).final_holds}
        if served == "gpt-4o":
            assert (final[premium], final[dear_model], final[cheap_model]) == (settled.charge, 1, 0)
        else:
            assert (final[premium], final[dear_model], final[cheap_model]) == (0, 0, 1)
        for key in (premium, dear_model, cheap_model):  # the counter moved from the hold to what it counts
            assert after[key] - before[key] == final[key] - next(
                h[2] for h in service.store.usage_record(rid).holds if h[0] == key), key
    assert (await service.admin.audit()).ok
    # no room in the premium budget for what the fallback may write: refused, though the model asked for has room
    big = await service.engine.authorize(asked("big", cap=30_000, **routed))
    assert (big.decision, big.reason, big.reserved) == ("deny", "budget_exceeded", 0) and "premium-budget" in big.message
    assert (await service.engine.authorize(asked("big-alone", cap=30_000))).decision == "allow"
    # a release gives back every hold, the fallbacks' too
    await service.engine.authorize(asked("released", **routed))
    await service.writer.drain()
    held = service.store.usage_record("released").holds
    counts = {h[0]: await used(h[0]) for h in held}
    await service.engine.release("released", "provider_error")
    assert [await used(key) for key, *_ in held] == [counts[key] - amount for key, _, amount, *_ in held]
    # a downgrading limit on the premium tier with no room: the request asked of a premium model goes on the cheaper
    # one, unless it names a premium fallback the provider could still serve past the limit: then it is refused
    document["plans"]["pro"]["limits"] += [
        {"name": "premium-tight", "scope": "customer", "models": ["tier:premium"], "window": "day", "unit": "money",
         "limit": "0.000001", "action": "downgrade", "downgrade_to": "gpt-4o-mini"}]
    await service.admin.apply_policy(yaml.safe_dump(document), "fallback-limits-2.yaml")
    premium = ask(secret, model="gpt-4o", request_id="premium-alone", input_tokens=100, max_output_tokens=10)
    assert (await service.engine.authorize(premium)).decision == "downgrade"
    for rid, fallbacks, decision in (("premium-fallback", ("claude-sonnet-4",), "deny"),
                                     ("cheap-fallback", ("gpt-4o-mini",), "downgrade")):
        d = await service.engine.authorize(reshaped(replace(premium, attribution=replace(
            premium.attribution, request_id=rid)), fallback_models=fallbacks, fallbacks_routed=True))
        assert d.decision == decision, (rid, d)
        assert d.decision == "downgrade" or (d.reason, d.reserved) == ("budget_exceeded", 0)
    assert (await service.admin.audit()).ok


async def test_a_model_priced_as_its_provider_reports_costs_what_the_reply_says_was_charged(service: Service) -> None:
    """A router prices one model's routes apart (OpenRouter's providers of one open model, at up to several times
    each other's prices): its reply says what it charged (usage.cost), and a model priced `reported_cost` costs
    that, not its tokens at the table's prices (which bound the hold); a reply saying nothing is priced at the
    table's, marked; a free route costs nothing; another model ignores what a reply says."""
    document = yaml.safe_load((await service.admin.book.version(1)).canonical)
    document["price_table"]["models"]["router/open-model"] = {
        "provider": "openrouter", "tier": "low-cost", "input": "2.00", "output": "8.00", "reported_cost": True}
    document["price_table"]["models"]["router/auto"] = {  # the router's own pick: reported, whatever it picks
        "provider": "openrouter", "tier": "low-cost", "input": "10.00", "output": "40.00", "reported_cost": True}
    document["price_table"]["models"]["router/listed"] = {"provider": "openrouter", "tier": "low-cost",
                                                          "input": "1.00", "output": "1.00"}
    await service.admin.apply_policy(yaml.safe_dump(document), "reported.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "100")
    table = price_quantity(1000, parse_amount("2.00")) + price_quantity(100, parse_amount("8.00"))
    for rid in ("said", "unsaid", "free", "other", "retried"):
        model = "gpt-4o-mini" if rid == "other" else "router/open-model"
        held = await service.engine.authorize(ask(secret, model=model, request_id=rid, input_tokens=1000,
                                                  max_output_tokens=100))
        assert held.decision == "allow"
    said = await service.engine.settle(usage("said", 1000, 100, reported_cost=1_234_567))
    assert (said.cost, said.charge) == (1_234_567, apply_basis_points(1_234_567, 12_000)) and said.cost != table
    unsaid = await service.engine.settle(usage("unsaid", 1000, 100))
    assert (unsaid.cost, unsaid.charge) == (table, apply_basis_points(table, 12_000))
    assert (await service.engine.settle(usage("free", 1000, 100, reported_cost=0))).charge == 0
    other = await service.engine.settle(usage("other", 1000, 100, reported_cost=1))
    assert other.cost == price_quantity(1000, parse_amount("0.15")) + price_quantity(100, parse_amount("0.60"))
    await service.engine.settle(usage("retried", 1000, 100, reported_cost=500))
    assert (await service.engine.settle(usage("retried", 1000, 100, reported_cost=500))).outcome == "exists"
    with pytest.raises(PolicydError) as changed:  # the same request said to have cost otherwise: not charged twice
        await service.engine.settle(usage("retried", 1000, 100, reported_cost=501))
    assert changed.value.reason == "exists_with_different_usage"
    # the router's pick of another model of the table (openrouter/auto's), priced by what the reply says
    await service.engine.authorize(ask(secret, model="router/auto", request_id="picked", input_tokens=1000,
                                       max_output_tokens=100))
    picked = await service.engine.settle(usage("picked", 1000, 100, reported_cost=7_777, reply_model="router/listed"))
    assert (picked.cost, picked.served_model) == (7_777, "router/listed")
    await service.writer.drain()
    assert (service.store.usage_record("said").cost_nanos, service.store.usage_record("said").error_class,
            service.store.usage_record("unsaid").error_class) == (1_234_567, "", "cost_not_reported")
    # a negative cost is refused, nothing moved
    await service.engine.authorize(ask(secret, model="router/open-model", request_id="negative", input_tokens=10))
    before = await service.counters.wallet("acme")
    with pytest.raises(PolicydError) as negative:
        await service.engine.settle(usage("negative", 10, 1, reported_cost=-5))
    assert negative.value.reason == "invalid_usage" and await service.counters.wallet("acme") == before
    assert (await service.admin.audit()).ok


async def test_a_fallback_that_served_is_charged_as_it_by_any_name_its_reply_gives(service: Service) -> None:
    """A reply naming a fallback the request named by another name than the table's, its upstream name (an alias's
    fallback goes upstream so, and the router answers so) or a dated snapshot of either, was priced as the model
    asked for (the cheaper): it is that fallback, counted in its limits; a snapshot of the model asked for stays
    that model, even where a fallback's name begins its name."""
    document = yaml.safe_load((await service.admin.book.version(1)).canonical)
    models = document["price_table"]["models"]
    models["router/cheap"] = {"provider": "openrouter", "tier": "low-cost", "input": "0.15", "output": "0.60"}
    models["router/cheap-mini"] = {"provider": "openrouter", "tier": "low-cost", "input": "0.05", "output": "0.20"}
    models["premium"] = {"provider": "openrouter", "tier": "premium", "input": "15.00", "output": "75.00",
                         "upstream_model": "anthropic/claude-opus-4"}
    document["plans"]["pro"]["limits"] = [*document["plans"]["pro"].get("limits", []), {
        "name": "opus-day", "scope": "customer", "window": "day", "unit": "money", "limit": "100",
        "models": ["premium"]}]
    await service.admin.apply_policy(yaml.safe_dump(document), "fallback-names.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "100")

    def cost(input_price: str, output_price: str) -> int:
        return price_quantity(1000, parse_amount(input_price)) + price_quantity(150, parse_amount(output_price))

    for rid, asked, fallback, reply, served in (
            ("upstream", "router/cheap", "premium", "anthropic/claude-opus-4", "premium"),
            ("snapshot", "router/cheap", "premium", "anthropic/claude-opus-4-20250514", "premium"),
            ("own", "router/cheap-mini", "router/cheap", "router/cheap-mini-2025-01-01", "router/cheap-mini"),
            ("fallback-snapshot", "router/cheap-mini", "router/cheap", "router/cheap-2025-01-01", "router/cheap"),
            ("unlisted", "router/cheap", "premium", "someone/else", "router/cheap")):
        held = await service.engine.authorize(reshaped(ask(secret, model=asked, request_id=rid, input_tokens=1000,
                                                           max_output_tokens=200),
                                                       fallback_models=(fallback,), fallbacks_routed=True))
        assert held.decision == "allow", (rid, held)
        settled = await service.engine.settle(usage(rid, 1000, 150, reply_model=reply))
        prices = {"premium": ("15.00", "75.00"), "router/cheap": ("0.15", "0.60"),
                  "router/cheap-mini": ("0.05", "0.20")}[served]
        assert (settled.served_model, settled.cost) == (served, cost(*prices)), rid
    await service.writer.drain()
    # the limit on the premium model alone (its bucket of some models, ":m=") counts the request it served alone
    premium = [h for h in service.store.usage_record("upstream").final_holds if ":m=" in h[0]]
    assert premium and premium[0][2] == apply_basis_points(cost("15.00", "75.00"), 12_000)
    unlisted = [h for h in service.store.usage_record("unlisted").final_holds if ":m=" in h[0]]
    assert unlisted and unlisted[0][2] == 0


async def test_a_routers_web_search_is_held_at_its_results_and_refused_where_it_cannot_be(service: Service) -> None:
    """A router's web search (OpenRouter's web plugin, its web_search server tool) is billed in what the router
    says it charged, beside the tokens: its results (Exa's engine: each) and searches (its native engines: each).
    The hold takes the most the request allows at the model's per_web_result and per_web_search: the plugin's one
    search of its max_results, the server tool's max_total_results (as many searches: each returns one at least),
    a server tool given no bound the plan's searches of its max_results each (the bound answered to set). A model
    whose cost is not the router's to say, or that prices no web search, refuses it; a reply saying no cost is
    charged its held results beside its tokens, marked."""
    document = yaml.safe_load((await service.admin.book.version(1)).canonical)
    models = document["price_table"]["models"]
    models["router/open-model"] = {"provider": "openrouter", "tier": "low-cost", "input": "2.00", "output": "8.00",
                                   "reported_cost": True, "per_web_result": "0.004", "per_web_search": "0.01"}
    models["router/unpriced-search"] = {"provider": "openrouter", "tier": "low-cost", "input": "2.00",
                                        "output": "8.00", "reported_cost": True}
    models["router/table-priced"] = {"provider": "openrouter", "tier": "low-cost", "input": "2.00", "output": "8.00",
                                     "per_web_result": "0.004"}
    await service.admin.apply_policy(yaml.safe_dump(document), "router-search.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "100")
    tokens = price_quantity(1000, parse_amount("2.00")) + price_quantity(100, parse_amount("8.00"))
    result, search = parse_amount("0.004"), parse_amount("0.01")

    async def held(rid: str, model: str = "router/open-model", **shape: int) -> Any:
        return await service.engine.authorize(reshaped(ask(secret, model=model, request_id=rid, input_tokens=1000,
                                                           max_output_tokens=100), **shape))

    plugin = await held("plugin", web_searches=1, web_results=5)
    assert (plugin.decision, plugin.reserved) == ("allow", apply_basis_points(tokens + 5 * result + search, 12_000))
    bounded = await held("bounded", web_searches=7, web_results=7)
    assert bounded.reserved == apply_basis_points(tokens + 7 * (result + search), 12_000)
    unbounded = await held("unbounded", web_results_per_search=3)
    assert unbounded.max_tool_calls == 10  # the plan's searches, their results (3 each) the bound to set
    assert unbounded.reserved == apply_basis_points(tokens + 30 * (result + search), 12_000)
    assert (await held("plain")).reserved == apply_basis_points(tokens, 12_000)  # no search asked, none held
    for rid, model in (("unpriced", "router/unpriced-search"), ("table", "router/table-priced")):
        refused = await held(rid, model, web_searches=1, web_results=5)
        assert (refused.decision, refused.reason, refused.error_param) == ("deny", "tool_not_priced", "tools"), rid
    said = await service.engine.settle(usage("plugin", 1000, 100, reported_cost=25_000_000))
    assert (said.cost, said.charge) == (25_000_000, apply_basis_points(25_000_000, 12_000))
    unsaid = await service.engine.settle(usage("unbounded", 1000, 100))  # a stream cut before its usage
    assert (unsaid.cost, unsaid.charge) == (tokens + 30 * result, apply_basis_points(tokens + 30 * result, 12_000))
    plain = await service.engine.settle(usage("plain", 1000, 100))
    assert plain.cost == tokens
    await service.writer.drain()
    assert service.store.usage_record("unbounded").error_class == "cost_not_reported"
    assert (await service.admin.audit()).ok


async def test_a_request_at_a_regions_endpoint_is_held_and_charged_at_that_geographys_prices(service: Service) -> None:
    """Claude at a Vertex AI region's endpoint costs more than at the global one (the newer models), and the reply
    does not say where it ran: a request whose endpoint is a region's (Shape.geo) is held and charged at the
    model's `regional` tier where it has one, else at its prices as they are (never refused, nothing marked)."""
    document = yaml.safe_load((await service.admin.book.version(1)).canonical)
    document["price_table"]["models"]["claude-sonnet-4-5"] = {
        "provider": "anthropic", "tier": "premium", "input": "3.00", "output": "15.00",
        "service_tiers": {"regional": {"input": "3.30", "output": "16.50"}}}
    await service.admin.apply_policy(yaml.safe_dump(document), "regional.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "100")

    def at(input_price: str, output_price: str, output_tokens: int) -> int:
        return price_quantity(1000, parse_amount(input_price)) + \
            price_quantity(output_tokens, parse_amount(output_price))

    for rid, model, geo in (("regional", "claude-sonnet-4-5", "regional"), ("global", "claude-sonnet-4-5", ""),
                            ("older", "claude-sonnet-4", "regional")):
        held = await service.engine.authorize(reshaped(ask(secret, model=model, request_id=rid,
                                                           endpoint="anthropic_messages", input_tokens=1000,
                                                           max_output_tokens=200), geo=geo))
        assert held.decision == "allow", held
        expected = at("3.30", "16.50", 200) if rid == "regional" else at("3.00", "15.00", 200)
        assert held.reserved == apply_basis_points(expected, 12_000), rid
        settled = await service.engine.settle(usage(rid, 1000, 150))  # the reply says no geography
        assert settled.cost == (at("3.30", "16.50", 150) if rid == "regional" else at("3.00", "15.00", 150)), rid
    await service.writer.drain()
    assert {rid: service.store.usage_record(rid).error_class for rid in ("regional", "global", "older")} == {
        "regional": "", "global": "", "older": ""}


async def test_a_cut_stream_is_charged_the_input_the_provider_reported_and_the_output_delivered(service: Service) -> None:
    from policyd.usage_capture import Tokens

    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    await service.engine.authorize(ask(secret, model="gpt-4o", prompt_bytes=400, max_output_tokens=100, request_id="cut"))
    s = await service.engine.settle_estimated("cut", 250, interrupted=True, error_class="usage_estimated:stream_cut",
                                              reported=Tokens(input_tokens=3000, cached_input_tokens=1000))
    await service.writer.drain()
    row = service.store.usage_record("cut")
    assert (row.input_tokens, row.cached_input_tokens, row.output_tokens) == (3000, 1000, 100)  # output: at most the cap
    cost = price_quantity(2000, parse_amount("2.50")) + price_quantity(1000, parse_amount("1.25")) + \
        price_quantity(100, parse_amount("10.00"))
    assert s.charge == -(-cost * 12_000 // 10_000)  # pro: +20%


async def test_web_searches_are_part_of_a_settlements_numbers(service: Service) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    await service.engine.authorize(ask(secret, request_id="search"))
    first = await service.engine.settle(usage("search", web_searches=2))
    assert (await service.engine.settle(usage("search", web_searches=2))).outcome == "exists"  # a retry
    with pytest.raises(PolicydError) as other:
        await service.engine.settle(usage("search", web_searches=3))
    assert other.value.reason == "exists_with_different_usage"
    with pytest.raises(PolicydError) as negative:
        await service.engine.settle(usage("search-2", web_searches=-1))
    assert negative.value.reason == "invalid_usage"
    await service.writer.drain()
    assert service.store.usage_record("search").web_searches == 2
    assert first.charge > 0 and (await service.admin.audit()).ok


async def test_the_web_searches_a_request_allows_are_reserved_at_their_price(service: Service) -> None:
    secret = await mini_priced_with(service, 'per_web_search: "0.01"')
    plain = await service.engine.authorize(ask(secret, request_id="plain"))
    bounded = await service.engine.authorize(ask(secret, request_id="bounded", web_searches=3))
    assert bounded.reserved - plain.reserved == 3 * parse_amount("0.01")
    s = await service.engine.settle(usage("bounded", input_tokens=100, output_tokens=50, web_searches=3))
    assert s.charge <= bounded.reserved  # within the strict bound


@pytest.mark.parametrize(("numbers", "part"), [
    ({"input_tokens": 100, "cached_input_tokens": 50, "audio_input_tokens": 60}, "audio_input_tokens"),
    ({"output_tokens": 10, "audio_output_tokens": 11}, "audio_output_tokens"),
    ({"output_tokens": 10, "audio_output_tokens": 5, "image_output_tokens": 6}, "image_output_tokens"),
    ({"input_tokens": 100, "audio_input_tokens": 50, "image_input_tokens": 51}, "image_input_tokens"),
    ({"input_tokens": 100, "cache_write_input_tokens": 10, "cache_write_1h_input_tokens": 11}, "cache_write_1h"),
])
async def test_the_parts_of_the_tokens_fit_in_them(service: Service, numbers: dict, part: str) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    await service.engine.authorize(ask(secret, request_id="audio"))
    with pytest.raises(PolicydError) as refused:
        await service.engine.settle(usage("audio", **numbers))
    assert refused.value.reason == "invalid_usage" and part in refused.value.message
    assert await service.counters.wallet("acme") == (1_000_000_000, (await service.counters.find_reservation("audio")).amount)


async def test_a_geography_and_fast_mode_are_priced_as_the_table_names_them(service: Service) -> None:
    """Anthropic's US-only inference ("us") and fast mode in it ("fast_mode+us"): held at the prices the
    table gives the tier asked for, charged at the tier the usage says it ran on."""
    secret = await mini_priced_with(service, 'service_tiers: {us: {input: "0.165", output: "0.66"}, '
                                             '"fast_mode+us": {input: "0.99", output: "3.96"}}')
    standard = await service.engine.authorize(ask(secret, request_id="geo-std"))
    fast_us = await service.engine.authorize(ask(secret, request_id="geo-fast", service_tier="fast_mode+us"))
    assert fast_us.reserved == 6 * -(-standard.reserved * 11 // 10)  # 6x, and a tenth more, on these prices
    s = await service.engine.settle(usage("geo-fast", input_tokens=100, output_tokens=50, service_tier="us"))
    assert s.charge == price_quantity(100, parse_amount("0.165")) + price_quantity(50, parse_amount("0.66"))
    refused = await service.engine.authorize(ask(secret, request_id="geo-fast-only", service_tier="fast_mode"))
    assert refused.reason == "service_tier_not_priced"  # fast mode without the geography is another tier


async def test_a_service_tier_is_reserved_and_charged_at_its_prices(service: Service) -> None:
    secret = await mini_priced_with(service, 'service_tiers: {flex: {input: "0.075", output: "0.30"}, '
                                             'priority: {input: "0.30", output: "1.20"}}')
    default = await service.engine.authorize(ask(secret, request_id="default"))
    priority = await service.engine.authorize(ask(secret, request_id="priority", service_tier="priority"))
    assert priority.reserved == 2 * default.reserved  # twice the prices, same bound
    s = await service.engine.settle(usage("priority", input_tokens=100, output_tokens=50, service_tier="flex"))
    assert s.charge == price_quantity(100, parse_amount("0.075")) + price_quantity(50, parse_amount("0.30"))  # as served
    await service.writer.drain()
    assert service.store.usage_record("priority").service_tier == "flex"
    assert service.store.usage_record("default").service_tier == ""


async def test_a_request_charged_as_held_is_charged_at_the_tier_it_asked_for(service: Service) -> None:
    """A flex request whose client left before its reply (charged as held: the provider bills it) is charged
    at the flex prices it was held at, not at the model's standard prices (twice as dear: more than it held,
    and more than the provider's invoice says)."""
    secret = await mini_priced_with(service, 'service_tiers: {flex: {input: "0.075", output: "0.30"}}')
    held = await service.engine.authorize(ask(secret, request_id="flex-gone", service_tier="flex"))
    reservation = await service.counters.find_reservation("flex-gone")
    assert reservation is not None
    estimate, cap = int(reservation.fields["input_tokens_estimate"]), int(reservation.record["max_output_tokens"])
    s = await service.engine.settle_estimated("flex-gone", 0, interrupted=True,
                                              error_class="usage_estimated:client_gone", output_as_held=True)
    assert s.charge == price_quantity(estimate, parse_amount("0.075")) + price_quantity(cap, parse_amount("0.30"))
    assert 0 < s.charge <= held.reserved
    await service.writer.drain()
    assert service.store.usage_record("flex-gone").service_tier == "flex"


async def test_a_tier_asked_for_must_be_priced_and_goes_by_either_name(service: Service) -> None:
    """OpenAI's "fast" tier is its "priority" (renamed): priced by either name. A tier the model's prices do
    not name is refused before anything is held (charged at the standard prices it would be undercharged,
    or overcharged); the provider's own default (Anthropic's priority) is not asked for, and passes. A
    reply on a tier the table does not price is charged the model's prices and marked."""
    secret = await mini_priced_with(service, 'service_tiers: {priority: {input: "0.30", output: "1.20"}}')
    default = await service.engine.authorize(ask(secret, request_id="std"))
    fast = await service.engine.authorize(ask(secret, request_id="fast", service_tier="fast"))
    assert fast.decision == "allow" and fast.reserved == 2 * default.reserved
    s = await service.engine.settle(usage("fast", input_tokens=100, output_tokens=50, service_tier="fast"))
    assert s.charge == price_quantity(100, parse_amount("0.30")) + price_quantity(50, parse_amount("1.20"))
    for tier in ("flex", "ultrafast"):
        refused = await service.engine.authorize(ask(secret, request_id=f"asked-{tier}", service_tier=tier))
        assert (refused.decision, refused.reason, refused.http_status, refused.error_param) == (
            "deny", "service_tier_not_priced", 400, "service_tier"), tier
    us = await service.engine.authorize(ask(secret, request_id="us", service_tier="us"))  # priced below
    assert (us.reason, us.error_param) == ("service_tier_not_priced", "service_tier")
    fast_mode = await service.engine.authorize(ask(secret, request_id="fast-mode",
                                                   service_tier="fast_mode"))  # Anthropic's: not its priority
    assert (fast_mode.reason, fast_mode.error_param) == ("service_tier_not_priced", "speed")
    implied = await service.engine.authorize(ask(secret, request_id="implied", service_tier="flex",
                                                 service_tier_implied=True))
    assert implied.decision == "allow" and implied.reserved == default.reserved
    await service.engine.settle(usage("std", input_tokens=100, output_tokens=50, service_tier="scale"))
    await service.writer.drain()
    assert (service.store.usage_record("asked-flex").status, service.store.usage_record("asked-flex").reserved_nanos) \
        == ("denied", 0)
    unpriced = service.store.usage_record("std")
    assert (unpriced.service_tier, unpriced.error_class) == ("scale", "service_tier_unpriced")
    assert unpriced.cost_nanos == price_quantity(100, parse_amount("0.15")) + price_quantity(50, parse_amount("0.60"))
    assert service.store.usage_record("fast").error_class == ""
    assert (await service.admin.audit()).ok


async def test_input_a_request_only_refers_to_is_reserved_up_to_the_context_window_on_strict_plans(
        service: Service) -> None:
    """A previous response, a stored prompt, a file, an image URL, a server tool's results: billed as
    input, not in the body's bytes. A strict plan reserves the model's context window for them, so the
    wallet still cannot go below zero; a model with no window refuses them; estimate plans are unchanged."""
    from policyd.pricing import input_estimate

    secret = await mini_priced_with(service, "context_window: 4000")  # free plan: strict, at cost
    price_in, price_out = parse_amount("0.15"), parse_amount("0.60")
    window = await service.engine.authorize(ask(secret, prompt_bytes=100, max_output_tokens=100, request_id="ref",
                                                unseen_input=True))
    assert window.reserved == price_quantity(4000, price_in) + price_quantity(100, price_out)
    s = await service.engine.settle(usage("ref", input_tokens=4000, output_tokens=100))  # a long conversation
    assert s.charge == window.reserved
    huge = await service.engine.authorize(ask(secret, prompt_bytes=50_000, max_output_tokens=100, request_id="huge"))
    assert huge.reserved == window.reserved  # the provider refuses more input than the window: the bound
    await service.engine.authorize(ask(secret, prompt_bytes=400, max_output_tokens=100, request_id="ref-cut",
                                       unseen_input=True))
    await service.engine.settle_estimated("ref-cut", 10, interrupted=True, error_class="usage_estimated:stream_cut")
    await service.writer.drain()
    # a cut stream the provider reported nothing of is charged the likely input, not the bound it reserved
    assert service.store.usage_record("ref-cut").input_tokens == input_estimate(400, 1, 0)

    _, poor = await new_key(service, plan="free", customer="poor")
    await fund(service, "poor", "0.0001")  # covers 100 bytes and 100 tokens out, not a 4,000-token window
    assert (await service.engine.authorize(ask(poor, prompt_bytes=100, request_id="poor-seen"))).decision == "allow"
    unseen = await service.engine.authorize(ask(poor, prompt_bytes=100, request_id="poor-unseen", unseen_input=True))
    assert unseen.reason == "insufficient_quota"

    await service.admin.apply_policy(SAMPLE_POLICY, "no-window.yaml")  # gpt-4o-mini has no context_window
    refused = await service.engine.authorize(ask(secret, prompt_bytes=100, request_id="unbounded", unseen_input=True))
    assert (refused.decision, refused.reason, refused.http_status, refused.error_param) == (
        "deny", "input_unbounded", 400, "model")
    _, pro = await new_key(service, customer="estimating")  # pro: estimate reservations, as before
    await fund(service, "estimating", "1")
    estimated = await service.engine.authorize(ask(pro, prompt_bytes=100, max_output_tokens=100, unseen_input=True))
    assert estimated.decision == "allow"
    await service.writer.drain()
    row = service.store.usage_record("unbounded")
    assert (row.status, row.reason, row.reserved_nanos) == ("denied", "input_unbounded", 0)
    assert (await service.admin.audit()).ok


async def test_limits_below_the_customer_bind_each_customer_apart(service: Service) -> None:
    """Workspaces, projects, teams, features, models, threads and end users are named by each customer:
    two customers' end user "alice" or team "red" are never one bucket, even when both customers' counters
    sit in one partition."""
    rpm = "- {name: key-rpm, scope: key, window: minute, unit: requests, limit: 20}"
    await service.admin.apply_policy(SAMPLE_POLICY.replace(rpm, rpm + (
        "\n      - {name: team-hour, scope: team, window: hour, unit: requests, limit: 2}"
        "\n      - {name: user-hour, scope: end_user, window: hour, unit: requests, limit: 1}"), 1), "scopes.yaml")
    names = (f"tenant-{i}" for i in itertools.count())
    first = next(names)
    second = next(n for n in names if service.counters.partition_of(n) == service.counters.partition_of(first))
    red: dict[str, str] = {}
    for customer in (first, second):
        _, red[customer] = await new_key(service, plan="free", customer=customer, team_id="red")
        await fund(service, customer, "1")
    _, blue = await new_key(service, plan="free", customer=first, team_id="blue")

    async def asked(secret: str, end_user: str) -> str:
        d = await service.engine.authorize(ask(secret, end_user_id=end_user, prompt_bytes=10, max_output_tokens=5))
        return d.decision if d.decision != "deny" else d.message.rsplit("(", 1)[-1].rstrip(")")

    assert await asked(red[first], "alice") == "allow"
    assert await asked(red[first], "alice") == "user-hour"  # the first customer's alice: her one request
    assert await asked(red[second], "alice") == "allow"  # the second customer's alice is someone else
    assert await asked(red[first], "bob") == "allow"  # team red of the first customer: 2 of 2
    assert await asked(red[first], "carol") == "team-hour"
    assert await asked(blue, "carol") == "allow"  # another team of the same customer
    assert await asked(red[second], "bob") == "allow"  # the second customer's team red: 2 of 2
    assert await asked(red[second], "carol") == "team-hour"
    await service.writer.drain()
    assert (await service.admin.audit()).ok


async def test_a_strict_plan_reserves_every_token_id_of_a_prompt_given_as_ids(service: Service) -> None:
    """Token ids (legacy completions, embeddings) have no text for the bytes' bound: a strict plan reserves
    their count when it is the greater."""
    _, secret = await new_key(service, plan="free", customer="token-ids")
    await fund(service, "token-ids", "1")
    d = await service.engine.authorize(ask(secret, model="text-embedding-3-small", endpoint="embeddings",
                                           prompt_bytes=0, input_tokens=5000, request_id="ids"))
    assert d.reserved == price_quantity(5000, parse_amount("0.02"))
    s = await service.engine.settle(usage("ids", input_tokens=5000, output_tokens=0))
    assert s.charge == d.reserved
    text = await service.engine.authorize(ask(secret, model="text-embedding-3-small", endpoint="embeddings",
                                              prompt_bytes=1000, input_tokens=10))
    assert text.reserved == price_quantity(1000 + 8 + 16, parse_amount("0.02"))  # the bytes' bound, the greater


async def test_a_reservation_whose_proxy_gave_up_midway_is_released_at_once(service: Service) -> None:
    """Envoy drops its ext_authz (or ext_proc) call when the client hangs up while policyd decides: the
    decision still runs to its end, and what it reserved is released then, not held until it expires."""
    import asyncio

    _, secret = await new_key(service, customer="gone")
    await fund(service, "gone", "1")
    reserving = service.engine.counters.authorize

    async def slow_reservation(**kwargs):  # the client hangs up while the script runs
        await asyncio.sleep(0.05)
        return await reserving(**kwargs)

    service.engine.counters.authorize = slow_reservation  # type: ignore[method-assign]
    asked = asyncio.ensure_future(service.engine.authorize_for_proxy(ask(secret, request_id="abandoned")))
    await asyncio.sleep(0.01)
    asked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asked
    await asyncio.sleep(0.1)
    await service.engine.finish_closings()
    assert await service.counters.wallet("gone") == (USD, 0)  # nothing held
    await service.writer.drain()
    row = service.store.usage_record("abandoned")
    assert (row.status, row.close_reason) == ("released", "client_gone")
    service.engine.counters.authorize = reserving  # type: ignore[method-assign]
    kept = await service.engine.authorize_for_proxy(ask(secret, request_id="kept"))  # not cancelled: kept
    assert kept.decision == "allow" and (await service.counters.wallet("gone"))[1] == kept.reserved


async def test_search_tools_given_no_bound_are_bounded_at_the_plans_default_and_reserved_so(service: Service) -> None:
    """A web search tool without max_uses (or a Responses API search tool without max_tool_calls) could run
    any number of paid searches: policyd bounds each such tool at the plan's default_max_tool_calls,
    reserves that many searches at their price, and answers the bound for the proxy to set. A wallet
    that cannot pay for them is refused, not overdrawn; a retry is answered with the same bound."""
    secret = await mini_priced_with(service, 'per_web_search: "0.01"\n      per_file_search: "0.0025"')
    plain = await service.engine.authorize(ask(secret, request_id="no-tools"))
    assert plain.max_tool_calls == 0
    request = ask(secret, request_id="unbounded")
    unbounded = replace(request, endpoint="responses",
                        shape=replace(request.shape, unbounded_web_search_tools=2, unbounded_file_search=True))
    held = await service.engine.authorize(unbounded)
    default = 10  # the plan's default_max_tool_calls
    assert held.allowed and held.max_tool_calls == default
    assert held.reserved - plain.reserved == 2 * default * parse_amount("0.01") + default * parse_amount("0.0025")
    again = await service.engine.authorize(unbounded)  # a retry: the same reservation, the same bound
    assert (again.reserved, again.max_tool_calls) == (held.reserved, default)
    settled = await service.engine.settle(usage("unbounded", input_tokens=10, output_tokens=10, web_searches=20,
                                                file_searches=10))
    assert settled.charge <= held.reserved  # every search the bound allows is covered
    await service.engine.release("no-tools", "test")

    # the plan's own default; a wallet that pays for the tokens but not for the searches is refused
    await service.admin.apply_policy(SAMPLE_POLICY.replace('      output: "0.60"\n', '      output: "0.60"\n'
                                                           '      per_web_search: "0.01"\n', 1)
                                     .replace("  free:\n", "  free:\n    default_max_tool_calls: 3\n", 1), "bounded.yaml")
    _, poor = await new_key(service, plan="free", customer="poor-searcher")
    await fund(service, "poor-searcher", "0.02")
    tokens_only = await service.engine.authorize(ask(poor, request_id="poor-plain"))
    assert tokens_only.allowed and tokens_only.reserved < parse_amount("0.02")
    await service.engine.release("poor-plain", "test")
    searching = ask(poor, request_id="poor-search")
    refused = await service.engine.authorize(replace(searching, endpoint="responses",
                                                     shape=replace(searching.shape, unbounded_web_search_tools=1)))
    assert not refused.allowed and refused.reason == "insufficient_quota"
    bounded_here = ask(poor, request_id="poor-search-1")
    one = await service.engine.authorize(replace(bounded_here, shape=replace(bounded_here.shape, web_searches=1)))
    assert one.allowed and one.max_tool_calls == 0  # a bound of its own: nothing to set
    await service.engine.release("poor-search-1", "test")

    await service.writer.drain()
    assert (await service.admin.audit()).ok


async def test_the_audit_sums_every_records_holds_and_finds_a_bucket_that_is_off(service: Service) -> None:
    """The audit's bucket totals are summed by SQL: a settled record counts its final holds, an open one what
    it reserved, a released or denied one nothing; they equal the counters, and a counter moved by hand is
    reported."""
    _, secret = await new_key(service)
    await fund(service, "acme", "5")
    for i in range(6):
        assert (await service.engine.authorize(ask(secret, request_id=f"held-{i}", prompt_bytes=400))).decision == "allow"
    for i in range(3):
        await service.engine.settle(usage(f"held-{i}", input_tokens=100 + i, output_tokens=7 * i))
    await service.engine.release("held-3", "provider_error")
    await service.engine.authorize(ask(secret, model="not-a-model", request_id="held-denied"))
    await service.writer.drain()
    expected: dict[str, int] = {}
    for i in range(6):
        row = service.store.usage_record(f"held-{i}")
        if row.status == "released":
            continue
        for key, _unit, amount in row.final_holds if row.status == "settled" else row.holds:
            expected[key] = expected.get(key, 0) + int(amount)
    assert expected and any(amount > 0 for amount in expected.values())
    assert service.store.held_by_bucket() == expected
    assert (await service.admin.audit()).ok
    key = sorted(expected)[0]
    await service.counters.client.hincrby(key, "used", 1)
    audit = await service.admin.audit()
    assert not audit.ok and audit.mismatches == [(key, expected[key] + 1, expected[key])]


ALIASED = SAMPLE_POLICY.replace("    gpt-4o-mini:\n", """\
    house-fast:
      provider: openai
      tier: low-cost
      upstream_model: gpt-4o-mini-2024-07-18
      output_cap_field: max_tokens
      input: "0.30"
      output: "1.20"
    gpt-4o-mini:
""").replace("downgrade_to: gpt-4o-mini}", "downgrade_to: house-fast}")


async def test_a_model_the_provider_names_otherwise_is_sent_by_that_name_and_charged_by_the_tables(
        service: Service) -> None:
    """A price-table entry with `upstream_model` (a name customers see, a dated snapshot, an Azure
    deployment): the request goes upstream with the provider's name, while the decision, the charge, the
    limits and the record keep the table's; a downgrade onto it is sent by the provider's name too; a proxy
    that settles with the provider's name is read as the model it was authorized for."""
    await service.admin.apply_policy(ALIASED, "aliased.yaml")
    _, secret = await new_key(service, customer="aliaser")
    await fund(service, "aliaser", "10")
    d = await service.engine.authorize(ask(secret, model="house-fast", request_id="alias-1"))
    assert (d.decision, d.requested_model, d.served_model, d.upstream_model) == (
        "allow", "house-fast", "house-fast", "gpt-4o-mini-2024-07-18")
    assert d.output_cap_field == "max_tokens"  # its provider reads a chat completion's cap there
    plain = await service.engine.authorize(ask(secret, model="gpt-4o-mini", request_id="alias-plain"))
    assert (plain.served_model, plain.upstream_model, plain.output_cap_field) == ("gpt-4o-mini", "gpt-4o-mini", "")
    retried = await service.engine.authorize(ask(secret, model="house-fast", request_id="alias-1"))
    assert (retried.served_model, retried.upstream_model) == ("house-fast", "gpt-4o-mini-2024-07-18")
    assert retried.output_cap_field == "max_tokens"

    s = await service.engine.settle(usage("alias-1", input_tokens=1000, output_tokens=100,
                                          served_model="gpt-4o-mini-2024-07-18"))
    cost = price_quantity(1000, parse_amount("0.30")) + price_quantity(100, parse_amount("1.20"))
    assert (s.outcome, s.served_model, s.cost, s.charge) == ("settled", "house-fast", cost, cost * 12 // 10)
    with pytest.raises(PolicydError) as error:  # a name neither the table nor the authorized model has
        await service.engine.settle(usage("alias-plain", served_model="gpt-4o-mini-2024-07-18"))
    assert error.value.reason == "unknown_model"
    await service.writer.drain()
    row = service.store.usage_record("alias-1")
    assert (row.requested_model, row.served_model, row.charge_nanos) == ("house-fast", "house-fast", s.charge)

    # over the day's limit, gpt-4o is downgraded onto the entry: sent as the provider names it
    await service.admin.apply_policy(ALIASED.replace('limit: "50.00"', 'limit: "0.000001"'), "aliased-tight.yaml")
    down = await service.engine.authorize(ask(secret, model="gpt-4o", request_id="alias-down"))
    assert (down.decision, down.served_model, down.upstream_model) == (
        "downgrade", "house-fast", "gpt-4o-mini-2024-07-18")

    with pytest.raises(PolicydError, match="output_cap_field"):  # the fields chat completions have
        await service.admin.apply_policy(ALIASED.replace("output_cap_field: max_tokens", "output_cap_field: tokens"),
                                         "bad-field.yaml")
    with pytest.raises(PolicydError, match="upstream_model"):  # one name, no spaces
        await service.admin.apply_policy(ALIASED.replace("upstream_model: gpt-4o-mini-2024-07-18",
                                                         "upstream_model: 'gpt 4o'"), "bad.yaml")


async def _fitting_policy(service: Service, **plan: object) -> None:
    import yaml

    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["plans"]["fitting"] = {"extends": "pro", "fit_output_cap": True, "fit_output_cap_min": 100, **plan}
    await service.admin.apply_policy(yaml.safe_dump(doc), "fitting.yaml")


async def test_a_plan_that_fits_the_output_cap_serves_the_largest_the_wallet_can_hold(service: Service) -> None:
    """A coding agent asks 32,000 output tokens a request: a wallet that cannot hold that much is not
    refused while it can hold a useful cap; the request is held, and served, with the largest cap it can
    (written into the request by the proxy). Nothing can overshoot: the hold is a true bound."""
    await _fitting_policy(service)
    _, rich = await new_key(service, customer="rich", plan="fitting")
    await fund(service, "rich", "100")

    async def held(cap: int, request_id: str) -> int:
        d = await service.engine.authorize(ask(rich, request_id=request_id, max_output_tokens=cap))
        assert d.decision == "allow" and d.max_output_tokens == cap
        await service.engine.release(request_id, "test")
        return d.reserved

    whole = await held(32_000, "whole")
    _, agent = await new_key(service, customer="agent", plan="fitting")
    await fund(service, "agent", format_amount(whole // 2))
    fitted = await service.engine.authorize(ask(agent, request_id="fitted", max_output_tokens=32_000))
    assert fitted.decision == "allow" and 100 <= fitted.max_output_tokens < 32_000
    assert fitted.reserved <= whole // 2 < await held(fitted.max_output_tokens + 1, "one-more")  # the largest
    assert await service.counters.wallet("agent") == (whole // 2, fitted.reserved)
    # the next one: what is left cannot hold the plan's least (100 tokens): refused, as without fitting
    refused = await service.engine.authorize(ask(agent, request_id="refused", max_output_tokens=32_000))
    assert refused.reason == "insufficient_quota"
    settled = await service.engine.settle(usage("fitted", 100, 50))
    assert settled.balance_after == whole // 2 - settled.charge
    # a plan without it refuses as before; a compaction, whose cap no proxy can write, is never fitted
    _, plain = await new_key(service, customer="agent", plan="pro")
    assert (await service.engine.authorize(ask(plain, max_output_tokens=10**6))).reason == "insufficient_quota"
    _, compactor = await new_key(service, customer="compactor", plan="fitting")
    await fund(service, "compactor", format_amount(await held(300, "small")))  # less than the default cap's hold
    plain_response = ask(compactor, request_id="response", endpoint="responses", max_output_tokens=0)
    compaction = replace(plain_response, shape=replace(plain_response.shape, output_cap_fixed=True))
    assert (await service.engine.authorize(compaction)).reason == "insufficient_quota"
    fitted_response = await service.engine.authorize(plain_response)  # the default cap, fitted
    assert fitted_response.decision == "allow" and 100 <= fitted_response.max_output_tokens < 1024
    assert (await service.admin.audit()).ok


async def test_concurrent_requests_fitted_to_one_wallet_never_hold_more_than_it_has(service: Service) -> None:
    await _fitting_policy(service)
    _, agent = await new_key(service, customer="swarm", plan="fitting")
    await fund(service, "swarm", "0.05")
    decisions = await asyncio.gather(*(service.engine.authorize(ask(agent, request_id=f"swarm-{i}",
                                                                    max_output_tokens=100_000))
                                       for i in range(24)))
    allowed = [d for d in decisions if d.decision == "allow"]
    assert allowed and any(d.max_output_tokens < 100_000 for d in allowed)
    assert all(d.reason == "insufficient_quota" for d in decisions if d.decision != "allow")
    assert sum(d.reserved for d in allowed) == (await service.counters.wallet("swarm"))[1] <= parse_amount("0.05")
    for d in allowed:  # each served its whole fitted cap: the wallet ends at or above nothing
        await service.engine.settle(usage(d.request_id, 50, d.max_output_tokens))  # input within its estimate
    balance, reserved = await service.counters.wallet("swarm")
    assert reserved == 0 and balance >= 0
    assert (await service.admin.audit()).ok


async def test_a_money_limit_fits_the_output_cap_too(service: Service) -> None:
    """The limit that refuses may be a budget rather than the wallet: the cap is fitted to what it can
    still hold; a request limit, which no cap moves, refuses as before."""
    await _fitting_policy(service, limits=[{"name": "day", "scope": "key", "window": "day", "unit": "money",
                                            "limit": "0.004"}])
    _, agent = await new_key(service, customer="budgeted", plan="fitting")
    await fund(service, "budgeted", "100")
    d = await service.engine.authorize(ask(agent, request_id="budgeted-1", max_output_tokens=50_000))
    assert d.decision == "allow" and 100 <= d.max_output_tokens < 50_000 and d.reserved <= parse_amount("0.004")


async def test_a_request_past_the_plans_max_request_charge_is_refused_or_fitted(service: Service) -> None:
    """max_request_charge: the most one request may hold. Past it a request is refused before any counter
    moves, with what it may cost and what the plan allows (and where its cap goes); a plan that fits the
    output cap serves it with the largest cap within the bound instead."""
    import yaml

    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["plans"]["bounded"] = {"extends": "pro", "max_request_charge": "0.01"}
    doc["plans"]["bounded-fitting"] = {"extends": "bounded", "fit_output_cap": True}
    await service.admin.apply_policy(yaml.safe_dump(doc), "bounded.yaml")
    assert service.book.current.plan("bounded").max_request_charge == parse_amount("0.01")
    _, secret = await new_key(service, customer="bounded", plan="bounded")
    await fund(service, "bounded", "10")
    refused = await service.engine.authorize(ask(secret, request_id="dear", max_output_tokens=32_000))
    assert (refused.decision, refused.reason, refused.http_status, refused.error_param) == (
        "deny", "request_too_costly", 400, "max_completion_tokens")
    assert "at most 0.010000000 USD" in refused.message and "32000 output tokens" in refused.message
    assert await service.counters.wallet("bounded") == (parse_amount("10"), 0)
    cheap = await service.engine.authorize(ask(secret, request_id="cheap", max_output_tokens=1_000))
    assert cheap.decision == "allow" and cheap.reserved <= parse_amount("0.01")
    _, fitting = await new_key(service, customer="bounded", plan="bounded-fitting")
    fitted = await service.engine.authorize(ask(fitting, request_id="fitted", max_output_tokens=32_000))
    assert fitted.decision == "allow" and 256 <= fitted.max_output_tokens < 32_000
    assert fitted.reserved <= parse_amount("0.01")
    await service.writer.drain()
    (record,) = [r for r in (await service.admin.list_usage("bounded", 10))[0] if r.request_id == "dear"]
    assert (record.status, record.reason) == ("denied", "request_too_costly")


async def test_an_adjustment_may_take_credit_back_and_only_an_adjustment(service: Service) -> None:
    """A debit (a negative grant, source adjustment): a mistaken grant taken back, a chargeback. It may
    take the balance below zero (requests then refused until credit comes), is applied once by its id,
    and is in the ledger a rebuild reads."""
    _, secret = await new_key(service, customer="debited")
    await fund(service, "debited", "1")
    await fund(service, "debited", "-0.25", grant_id="chargeback-1", source="adjustment")
    await fund(service, "debited", "-0.25", grant_id="chargeback-1", source="adjustment")  # a retry: once
    assert await service.counters.wallet("debited") == (parse_amount("0.75"), 0)
    for wrong in ({"source": "purchase"}, {"source": "refund"}):
        with pytest.raises(PolicydError) as refused:
            await fund(service, "debited", "-0.10", **wrong)
        assert refused.value.reason == "invalid_amount"
    with pytest.raises(PolicydError):
        await service.admin.grant_credit("debited", -1, "USD", "adjustment", expires_ms=2 * 10**12)
    await fund(service, "debited", "-2", source="adjustment")  # more than it has: a debt
    assert (await service.counters.wallet("debited"))[0] == parse_amount("-1.25")
    assert (await service.engine.authorize(ask(secret, request_id="in-debt"))).reason == "insufficient_quota"
    await service.writer.drain()
    await service.counters.client.flushall()
    await service.admin.rebuild()
    assert (await service.counters.wallet("debited"))[0] == parse_amount("-1.25")
    assert (await service.admin.audit()).ok


async def test_a_pattern_entry_prices_every_model_it_matches(service: Service) -> None:
    """A provider makes a fine-tune's name as its customer trains it ("ft:gpt-4o-mini-2024-07-18:acme::x1"):
    gateways refused it, or logged it at nothing, until someone priced that exact name. A price table entry
    named by a glob prices every model it matches, the most specific pattern first; the record keeps the
    model's own name, a pattern names no model a client may call, and lists of models leave patterns out."""
    doc = yaml.safe_load(SAMPLE_POLICY)
    models = doc["price_table"]["models"]
    models["ft:gpt-4o-mini-2024-07-18:*"] = {"provider": "openai", "tier": "low-cost", "input": "0.30", "output": "1.20"}
    models["ft:*"] = {"provider": "openai", "tier": "premium", "input": "3.75", "output": "15.00"}
    await service.admin.apply_policy(yaml.safe_dump(doc), "fine-tunes.yaml")
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    tuned, other = "ft:gpt-4o-mini-2024-07-18:acme::x1", "ft:gpt-4.1-2025-04-14:acme::y2"
    for request_id, model, prices in (("ft-1", tuned, ("0.30", "1.20")), ("ft-2", other, ("3.75", "15.00"))):
        allowed = await service.engine.authorize(ask(secret, model=model, request_id=request_id))
        assert (allowed.decision, allowed.served_model, allowed.upstream_model) == ("allow", model, model)
        settled = await service.engine.settle(usage(request_id))
        assert settled.cost == price_quantity(100, parse_amount(prices[0])) + price_quantity(50, parse_amount(prices[1]))
    for name in ("ft:*", "ft:gpt-4o-mini-2024-07-18:*"):  # a pattern is no model's name
        refused = await service.engine.authorize(ask(secret, model=name, request_id=f"pattern-{len(name)}"))
        assert (refused.decision, refused.reason) == ("deny", "unknown_model")
    listed, _ = await service.engine.models_for(secret)
    assert [m for m, _ in listed if m.startswith("ft:")] == []
    await service.writer.drain()
    assert service.store.usage_record("ft-1").served_model == tuned
    doc["plans"]["pro"]["fallbacks"] = {"gpt-4o": ["ft:*"]}
    with pytest.raises(PolicydError) as refused_policy:
        await service.admin.apply_policy(yaml.safe_dump(doc), "fallback-to-a-pattern.yaml")
    assert "pattern" in str(refused_policy.value)


async def test_a_fitted_cap_never_goes_below_what_a_thinking_claude_accepts(service: Service) -> None:
    """Anthropic refuses a max_tokens not past the request's extended thinking budget (400): a cap fitted to
    the wallet below it would be a refusal from the provider instead of policyd's own. A wallet that can
    hold a cap past the budget is fitted to one; one that cannot is refused, insufficient_quota, nothing held."""
    await _fitting_policy(service)
    _, rich = await new_key(service, customer="rich-thinker", plan="fitting")
    await fund(service, "rich-thinker", "100")

    def thinking(secret: str, request_id: str, budget: int, cap: int = 32_000) -> AuthorizeInput:
        request = ask(secret, model="claude-sonnet-4", endpoint="anthropic_messages", request_id=request_id,
                      max_output_tokens=cap)
        return replace(request, shape=replace(request.shape, least_output_cap=budget + 1 if budget else 0))

    held = await service.engine.authorize(thinking(rich, "at-budget", 0, cap=8_001))
    await service.engine.release("at-budget", "test")
    _, agent = await new_key(service, customer="thinker", plan="fitting")
    await fund(service, "thinker", format_amount(held.reserved))  # holds a cap of 8,001 at most
    fitted = await service.engine.authorize(thinking(agent, "small-budget", 4_000))
    assert fitted.decision == "allow" and 4_001 <= fitted.max_output_tokens <= 8_001
    await service.engine.release("small-budget", "test")
    refused = await service.engine.authorize(thinking(agent, "large-budget", 10_000))
    assert (refused.decision, refused.reason) == ("deny", "insufficient_quota")
    assert await service.counters.wallet("thinker") == (held.reserved, 0)


async def test_an_explicit_cache_is_known_from_its_records_and_never_served_by_another_model(service: Service) -> None:
    """Whose an explicit cache is, its model and the life it was charged are in Redis while it lives; once Redis
    has forgotten it (or after a rebuild of the counters) they come from its records: its making's model and
    tokens, and the longest life charged over its making and every change of its time to live, so a change is
    still charged the time added alone. A cache serves its own model: a limit that downgrades refuses a request
    using one (or making one) rather than send it to another model, which Google would refuse."""
    cached = SAMPLE_POLICY.replace("  models:\n", "  models:\n    gemini-cache:\n      provider: google\n"
                                   "      tier: premium\n      input: \"1.00\"\n      output: \"4.00\"\n"
                                   "      cache_storage: \"3.60\"\n", 1)  # 1 nano a token-second
    await service.admin.apply_policy(cached, "cached.yaml")
    _, mine = await new_key(service, customer="acme")
    await fund(service, "acme", "50")
    made = ask(mine, model="gemini-cache", endpoint="cached_contents", request_id="made", max_output_tokens=0)
    held = await service.engine.authorize(replace(made, shape=replace(made.shape, seconds=600)))
    assert held.decision == "allow", held
    await service.engine.settle(usage("made", input_tokens=1_000, output_tokens=0, provider_account="second",
                                      cache_storage_token_seconds=1_000 * 600, provider_response_id="cachedContents/k"))

    def change(request_id: str) -> AuthorizeInput:
        """A change of its time to live (PATCH cachedContents/k)."""
        return replace(made, model="", previous_response="cachedContents/k",
                       attribution=replace(made.attribution, request_id=request_id),
                       shape=replace(made.shape, prompt_bytes=0, seconds=3_600))

    async def changed(request_id: str, life: int) -> int:
        """Its change settled, its reply saying it now lives `life` seconds from its making: the cost."""
        settled = await service.engine.settle(usage(request_id, input_tokens=1_000, output_tokens=0,
                                                    cache_storage_token_seconds=1_000 * life,
                                                    provider_response_id="cachedContents/k"))
        return settled.cost

    async def longer(request_id: str, life: int) -> int:
        decision = await service.engine.authorize(change(request_id))
        assert (decision.decision, decision.served_model) == ("allow", "gemini-cache"), decision
        return await changed(request_id, life)

    assert await longer("longer-1", 900) == 1_000 * 300
    await service.writer.drain()
    await service.counters.client.delete(redis_keys.stored_response("cachedContents/k"))  # forgotten
    assert await longer("longer-2", 1_000) == 1_000 * 100  # its life charged (900 s) found in its records
    await service.writer.drain()
    await counters_lost_and_rebuilt(service)
    assert await longer("longer-3", 1_200) == 1_000 * 200
    # two changes at once would each be charged from the same life: one runs at a time, the other refused (its
    # hold given back) until the first ends; then it is charged the time past the first's alone
    first = await service.engine.authorize(change("together-1"))
    second = await service.engine.authorize(change("together-2"))
    assert (first.decision, second.decision, second.reason, second.http_status) == (
        "allow", "deny", "request_in_progress", 409), second
    assert (await service.counters.wallet("acme"))[1] == first.reserved  # the second's hold given back
    assert await changed("together-1", 1_500) == 1_000 * 300
    assert await longer("together-3", 1_800) == 1_000 * 300  # past the first's 1,500 s, not 1,200
    assert (await service.engine.authorize(change("dropped"))).decision == "allow"
    await service.engine.release("dropped", "upstream_503")  # a change that failed ends too
    assert await longer("after-dropped", 1_900) == 1_000 * 100
    using = replace(ask(mine, model="gemini-cache", endpoint="gemini_generate_content", request_id="uses"),
                    previous_response="cachedContents/k")
    assert (await service.engine.authorize(using)).account == "second"  # served where it was made

    await service.admin.apply_policy(cached.replace('limit: "50.00", action: downgrade', 'limit: "0.000001", '
                                                    'action: downgrade', 1), "tight.yaml")
    plain = await service.engine.authorize(ask(mine, model="gemini-cache", endpoint="gemini_generate_content",
                                               request_id="plain"))
    assert (plain.decision, plain.served_model) == ("downgrade", "gpt-4o-mini")  # the limit downgrades
    refused = await service.engine.authorize(replace(using, attribution=replace(using.attribution,
                                                                                request_id="uses-tight")))
    assert (refused.decision, refused.served_model) == ("deny", "gemini-cache"), refused
    another = await service.engine.authorize(replace(made, attribution=replace(made.attribution,
                                                                               request_id="made-tight")))
    assert another.decision == "deny", another

    await service.admin.apply_policy(cached.replace("    markup_bps: 2000\n", "    markup_bps: 2000\n"
                                                    "    max_request_charge: \"0.01\"\n", 1), "bounded.yaml")
    year = await service.engine.authorize(replace(made, attribution=replace(made.attribution, request_id="year"),
                                                  shape=replace(made.shape, seconds=365 * 86400)))
    assert (year.decision, year.reason, year.error_param) == ("deny", "request_too_costly", "ttl"), year
    assert "shorter time to live" in year.message
    hour = await service.engine.authorize(replace(made, attribution=replace(made.attribution, request_id="hour"),
                                                  shape=replace(made.shape, seconds=3600)))
    assert hour.decision == "allow", hour


async def test_a_gemini_uploads_bytes_come_without_a_key_as_the_key_that_began_it(service: Service) -> None:
    """Google's SDK sends an upload's bytes with no key: the upload (policyd's name for its id, from its
    beginning's reply) stands for the key that began it, as that key's state is (a key revoked meanwhile: refused);
    an upload policyd never began has no key (missing_api_key); another customer's key naming it is refused."""
    key_id, mine = await new_key(service, customer="acme")
    _, theirs = await new_key(service, customer="rival")

    def upload(secret: str, request_id: str, named: str = "") -> AuthorizeInput:
        return AuthorizeInput(api_key=secret, endpoint="gemini_generate_content", model="", creates="file",
                              creates_at="google", files=(named,) if named else (),
                              attribution=replace(ask(secret).attribution, request_id=request_id))

    begun = await service.engine.authorize(upload(mine, "begun"))
    assert (begun.decision, begun.provider) == ("allow", "google"), begun
    await service.engine.settle(usage("begun", input_tokens=0, output_tokens=0, provider_response_id="gu-abc"))
    part = await service.engine.authorize(upload("", "part-1", "gu-abc"))
    assert (part.decision, part.owner.customer_id, part.provider) == ("allow", "acme", "google"), part
    assert (await service.engine.authorize(upload(theirs, "part-theirs", "gu-abc"))).reason == "file_not_found"
    assert (await service.engine.authorize(upload("", "part-stranger", "gu-never"))).reason == "missing_api_key"
    await service.admin.set_state(key_id, "revoked")
    assert (await service.engine.authorize(upload("", "part-2", "gu-abc"))).reason == "key_revoked"


async def test_a_request_that_holds_nothing_is_not_refused_by_a_wallet_or_budget_already_past(service: Service) -> None:
    """A model priced at 0 (a self-hosted one) spends nothing: an overdrawn wallet (an estimating plan settled above
    its hold) or a money limit already past its figure (lowered below what it counts) refuses paid requests, not
    it (as a budget just reached never did). Its request still counts in a request limit, which still binds it;
    nothing is charged or held."""
    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["price_table"]["models"]["local-llama"] = {"provider": "openai", "tier": "low-cost", "input": "0",
                                                   "output": "0"}
    await service.admin.apply_policy(yaml.safe_dump(doc), "free-model.yaml")
    key_id, secret = await new_key(service, plan="pro", customer="overdrawn")
    await fund(service, "overdrawn", "0.001")
    held = await service.engine.authorize(ask(secret, model="gpt-4o", prompt_bytes=10, max_output_tokens=10,
                                              request_id="over"))
    settled = await service.engine.settle(usage("over", input_tokens=100_000, output_tokens=50_000))
    assert held.reserved < settled.charge and (await service.counters.wallet("overdrawn"))[0] < 0  # overdrawn

    async def asked(model: str, n: int) -> Any:
        return await service.engine.authorize(ask(secret, model=model, prompt_bytes=10, max_output_tokens=10,
                                                  request_id=f"{model}-{n}"))

    paid, free = await asked("gpt-4o-mini", 1), await asked("local-llama", 1)
    assert (paid.decision, paid.reason, free.decision, free.reserved) == ("deny", "insufficient_quota", "allow", 0)
    assert (await service.engine.settle(usage(free.request_id, input_tokens=40, output_tokens=30))).charge == 0
    await fund(service, "overdrawn", "5")
    await service.admin.set_limits(key_id, [{"window": "day", "unit": "money", "limit": 1},  # counting the day's
                                            {"window": "day", "unit": "requests", "limit": 6}])  # 2 served before
    paid, free = await asked("gpt-4o-mini", 2), await asked("local-llama", 2)
    assert (paid.decision, paid.reason, paid.message.endswith("(key-money-day)")) == ("deny", "budget_exceeded", True)
    assert (free.decision, free.reserved) == ("allow", 0)
    assert [(await asked("local-llama", n)).reason for n in (3, 4, 5, 6)] == ["", "", "", "rate_limit_exceeded"]
    balance, reserved = await service.counters.wallet("overdrawn")
    assert reserved == 0 and balance == parse_amount("5.001") - settled.charge
    await service.writer.drain()
    assert (await service.admin.audit()).ok
