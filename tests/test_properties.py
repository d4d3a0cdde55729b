"""Property tests: random interleavings of authorize / settle / release / expire / top-up / refund / limit reset keep
balance = grants - settled charges + refunds, reserved = open reservations, to the nano, and the limits
as the records imply them (audit); strict plans never
take a wallet below zero (n choices each reaching the output cap included, and input a request only
refers to, bounded by the model's context window)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import replace
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from policyd.domain import PolicydError
from policyd.server import Service
from tests.conftest import SAMPLE_POLICY, make_settings
from tests.helpers import ask, counters_lost_and_rebuilt, usage

ops = st.lists(
    st.one_of(
        st.tuples(st.just("authorize"), st.integers(0, 20_000), st.integers(0, 800), st.integers(0, 4), st.booleans()),
        st.tuples(st.just("settle"), st.integers(0, 40), st.floats(0, 1), st.floats(0, 1)),
        st.tuples(st.just("settle_again"), st.integers(0, 40)),
        st.tuples(st.just("release"), st.integers(0, 40)),
        st.tuples(st.just("expire")),
        st.tuples(st.just("grant"), st.integers(1, 5_000_000)),
        st.tuples(st.just("refund"), st.integers(0, 40), st.floats(0, 1)),
    ),
    min_size=1,
    max_size=40,
)


@pytest.fixture
def running(backend: dict[str, str]) -> Iterator[tuple[asyncio.AbstractEventLoop, Service]]:
    loop = asyncio.new_event_loop()
    service = loop.run_until_complete(Service.build(make_settings(backend)))
    loop.run_until_complete(service.start())
    policy = SAMPLE_POLICY.replace("limit: 20}", "limit: 100000}").replace(
        '      output: "0.60"\n', f'      output: "0.60"\n      context_window: {CONTEXT_WINDOW}\n', 1)  # gpt-4o-mini's
    loop.run_until_complete(service.admin.apply_policy(policy, "p.yaml"))
    yield loop, service
    loop.run_until_complete(service.close())
    loop.close()


counter = itertools.count()
CONTEXT_WINDOW = 6_000  # below the largest prompts drawn: the window bounds some of them


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=ops)
# a small prompt that refers to a long conversation (previous_response_id), billed at the whole window
@example(operations=[("grant", 100_000), ("authorize", 100, 100, 0, True), ("settle", 0, 1.0, 1.0)])
# a refund of half a charge, then one of the same request refused; its thread's money limit given back
@example(operations=[("grant", 5_000_000), ("authorize", 100, 100, 0, False), ("settle", 0, 1.0, 1.0),
                     ("refund", 0, 0.5), ("refund", 0, 1.0), ("authorize", 50, 10, 0, False), ("expire",)])
def test_wallet_invariant_under_random_interleavings(running, operations) -> None:
    loop, service = running
    loop.run_until_complete(_scenario(service, operations, f"cust{next(counter)}"))


async def _scenario(service: Service, operations: list, customer: str) -> None:
    clock = [service.engine.clock()]
    service.engine.clock = lambda: clock[0]
    key = await service.admin.create_key(label="p", customer_id=customer, environment="production", plan="free")
    grants = 0
    charges = 0
    refunds = 0
    charged: dict[str, int] = {}
    refunded: set[str] = set()
    requests: list[tuple[str, int, int, int]] = []  # request id, reserved, input bound, output bound
    open_: dict[str, int] = {}
    state: dict[str, str] = {}
    settled_with: dict[str, tuple[int, int]] = {}
    for n, op in enumerate(operations):
        kind = op[0]
        if kind == "authorize":
            rid = f"{customer}-{n}"
            d = await service.engine.authorize(ask(key.secret, request_id=rid, prompt_bytes=op[1],
                                                    max_output_tokens=op[2], choices=op[3], thread_id=f"t{n}",
                                                    unseen_input=op[4]))
            # the most input the provider can bill: the bytes' bound (bytes + 8 a message + 16), at most the
            # context window, which alone bounds input the request only refers to
            bound = CONTEXT_WINDOW if op[4] else min(op[1] + 24, CONTEXT_WINDOW)
            if d.decision != "deny":  # each of n choices may reach the cap
                requests.append((rid, d.reserved, bound, d.max_output_tokens * max(1, op[3])))
                open_[rid] = d.reserved
                state[rid] = "reserved"
        elif kind in ("settle", "settle_again", "release") and requests:
            rid, _, prompt, cap = requests[op[1] % len(requests)]
            if kind == "release":
                try:
                    await service.engine.release(rid, "test")
                    if state[rid] == "reserved":
                        state[rid] = "released"
                        open_.pop(rid)
                except PolicydError as error:
                    assert state[rid] == "settled" and error.reason == "already_settled"
                continue
            if kind == "settle":
                # within the strict bound: input <= its bound, output <= the enforced cap x choices
                tokens = (int(prompt * op[2]), int(cap * op[3]))
            else:
                tokens = settled_with.get(rid, (1, 1))
            try:
                s = await service.engine.settle(usage(rid, input_tokens=tokens[0], output_tokens=tokens[1]))
            except PolicydError as error:
                assert (state[rid], error.reason) in (("released", "already_released"),
                                                      ("settled", "exists_with_different_usage"))
                continue
            if s.outcome == "exists":
                assert state[rid] == "settled" and settled_with[rid] == tokens
                continue
            assert state[rid] in ("reserved", "expired")
            assert s.outcome == ("settled" if state[rid] == "reserved" else "settled_late")
            charges += s.charge
            charged[rid] = s.charge
            open_.pop(rid, None)
            state[rid] = "settled"
            settled_with[rid] = tokens
        elif kind == "expire":
            clock[0] += service.engine.reservation_ttl_ms + 1
            await service.engine.expire_due()
            for rid in list(open_):
                state[rid] = "expired"
                open_.pop(rid)
        elif kind == "refund" and charged:
            rid = sorted(charged)[op[1] % len(charged)]
            part = max(1, int(charged[rid] * op[2])) if charged[rid] else 0
            try:
                amount, _, _ = await service.admin.refund_usage(rid, part)
            except PolicydError as error:
                assert (error.reason, rid in refunded or not charged[rid]) in (
                    ("already_refunded", True), ("nothing_to_refund", True)), error.reason
                continue
            assert rid not in refunded and amount == part
            refunded.add(rid)
            refunds += amount
        elif kind == "grant":
            await service.admin.grant_credit(customer, op[1], "USD", "purchase")
            grants += op[1]
        balance, reserved = await service.counters.wallet(customer)
        assert balance == grants - charges + refunds
        assert reserved == sum(open_.values())
        assert balance - reserved >= 0  # strict plan: the reservation was an upper bound
    await service.writer.drain()
    assert service.store.ledger_balances().get(customer, 0) == grants - charges + refunds
    audit = await service.admin.audit()
    assert audit.ok, audit.mismatches


def request_ops(authorize: st.SearchStrategy, output_max: int, size_max: int) -> st.SearchStrategy:
    """Operations on a few requests: authorize one (as drawn), settle one of those served (by its index, with
    its output tokens), release one."""
    return st.lists(st.one_of(authorize, st.tuples(st.just("settle"), st.integers(0, 20), st.integers(0, output_max)),
                              st.tuples(st.just("release"), st.integers(0, 20))), min_size=1, max_size=size_max)


# a customer (0 or 1) names a request "n0".."n2", as a gateway's client (its call token 0 or 1) or natively
shared_ops = request_ops(st.tuples(st.just("authorize"), st.integers(0, 1), st.integers(0, 2), st.booleans(),
                                   st.integers(0, 1)), output_max=300, size_max=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=shared_ops)
# the second customer names a request the first holds, natively and as a gateway's client, then both settle
@example(operations=[("authorize", 0, 0, False, 0), ("authorize", 1, 0, False, 0), ("authorize", 1, 0, True, 0),
                     ("settle", 0, 100), ("settle", 1, 200), ("settle", 1, 250)])
def test_customers_naming_requests_alike_each_pay_their_own(running, operations) -> None:
    """Two customers (in different partitions) naming their requests from one small set of names, in any
    order: every request served belongs to one customer, every settle is charged to that customer's wallet,
    each wallet's balance and holds are its own requests' to the nano, and SQL agrees."""
    loop, service = running
    loop.run_until_complete(_shared_names(service, operations, next(counter)))


async def _shared_names(service: Service, operations: list, run: int) -> None:
    names = [f"shared{run}-{i}" for i in range(40)]
    first = names[0]
    second = next(c for c in names if service.counters.partition_of(c) != service.counters.partition_of(first))
    customers = (first, second)
    keys = []
    for customer in customers:
        keys.append(await service.admin.create_key(label="p", customer_id=customer, environment="production",
                                                   plan="pro"))
        await service.admin.grant_credit(customer, 10**9, "USD", "purchase")
    whose: dict[str, int] = {}  # request id served -> the customer it belongs to
    served: list[str] = []
    open_: dict[str, int] = {}
    closed: set[str] = set()
    charges = [0, 0]
    for op in operations:
        kind = op[0]
        if kind == "authorize":
            _, c, name, gateway, token = op
            request = ask(keys[c].secret, request_id=f"r{run}-n{name}", max_output_tokens=50)
            if gateway:
                request = replace(request, call_token=f"{c}-{token}")
            d = await service.engine.authorize(request)
            if d.decision == "deny":
                continue
            assert whose.setdefault(d.request_id, c) == c  # never another customer's request
            assert d.request_id not in closed  # a closed request is never served again
            if d.request_id not in open_:
                open_[d.request_id] = d.reserved
                served.append(d.request_id)
        elif served:
            rid = served[op[1] % len(served)]
            try:
                if kind == "release":
                    await service.engine.release(rid, "test")
                else:
                    s = await service.engine.settle(usage(rid, input_tokens=100, output_tokens=op[2] % 51))
                    if s.outcome != "exists":
                        charges[whose[rid]] += s.charge
            except PolicydError:
                pass
            if rid in open_ and (kind == "release" or rid not in closed):
                open_.pop(rid)
                closed.add(rid)
        for c, customer in enumerate(customers):
            balance, reserved = await service.counters.wallet(customer)
            assert balance == 10**9 - charges[c], (customer, balance, charges)
            assert reserved == sum(amount for rid, amount in open_.items() if whose[rid] == c)
    await service.writer.drain()
    balances = service.store.ledger_balances()
    for c, customer in enumerate(customers):
        assert balances.get(customer, 0) == 10**9 - charges[c]
    for rid, c in whose.items():
        assert service.store.usage_record(rid).customer_id == customers[c]
    audit = await service.admin.audit()
    assert audit.ok, audit.mismatches


# a request named "n0".."n5", natively or as a gateway's client (its call token 0 or 1)
loss_ops = request_ops(st.tuples(st.just("authorize"), st.integers(0, 5), st.booleans(), st.integers(0, 1)),
                       output_max=50, size_max=20)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=loss_ops)
@example(operations=[("authorize", 0, True, 0), ("settle", 0, 10), ("authorize", 1, True, 1), ("release", 1)])
def test_a_loss_of_the_counters_changes_no_answer_to_a_retry(running, operations) -> None:
    """Any requests made, settled and released, then Redis loses its data and the counters are rebuilt from
    SQL: every retry of a closed request (its Settle with the same numbers or others, its Release, its id
    named again natively or by the gateway's own retry) is answered as before the loss, to the nano, and no
    money moves."""
    loop, service = running
    loop.run_until_complete(_retries_across_a_loss(service, operations, next(counter)))


async def _retries_across_a_loss(service: Service, operations: list, run: int) -> None:
    customer = f"loss{run}"
    key = await service.admin.create_key(label="p", customer_id=customer, environment="production", plan="pro")
    await service.admin.grant_credit(customer, 10**9, "USD", "purchase")
    served: list[tuple[str, str]] = []  # request id, the call token it was served with ("" natively)
    numbers: dict[str, int] = {}  # request id -> the output tokens it was settled with
    for op in operations:
        if op[0] == "authorize":
            _, name, gateway, token = op
            request = ask(key.secret, request_id=f"r{run}-n{name}", max_output_tokens=50)
            call_token = f"t{token}" if gateway else ""
            decision = await service.engine.authorize(replace(request, call_token=call_token))
            if decision.decision == "allow" and decision.request_id not in dict(served):
                served.append((decision.request_id, call_token))
        elif served:
            rid = served[op[1] % len(served)][0]
            try:
                if op[0] == "settle":
                    await service.engine.settle(usage(rid, input_tokens=100, output_tokens=op[2]))
                    numbers.setdefault(rid, op[2])
                else:
                    await service.engine.release(rid, "test")
            except PolicydError:
                pass

    async def answers() -> list[object]:
        """What every retry of a closed request is answered (none of them changes anything)."""
        found: list[object] = []
        for rid, call_token in served:
            reservation = await service.counters.find_reservation(rid)
            if reservation is not None and reservation.state == "reserved":
                continue
            retries = [lambda: service.engine.settle(usage(rid, input_tokens=100, output_tokens=numbers.get(rid, 7))),
                       lambda: service.engine.settle(usage(rid, input_tokens=100, output_tokens=51)),
                       lambda: service.engine.release(rid, "test")]
            for retry in retries:
                try:
                    found.append(await retry())
                except PolicydError as error:
                    found.append(error.reason)
            for token in {"", call_token}:  # its id named again: natively, and as the gateway's own retry
                d = await service.engine.authorize(replace(ask(key.secret, request_id=rid, max_output_tokens=50),
                                                           call_token=token))
                found.append((d.decision, d.reason, d.request_id))
            service.counters.forget(rid)
        return found

    before = await answers()
    wallet = await service.counters.wallet(customer)
    await service.writer.drain()
    await counters_lost_and_rebuilt(service)
    await service.admin.restored()
    assert await answers() == before
    assert await service.counters.wallet(customer) == wallet
    audit = await service.admin.audit()
    assert audit.ok, audit.mismatches


ZONES = ["", "UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe", "America/Santiago",
         "Pacific/Apia", "Asia/Tehran", "Pacific/Chatham"]


@settings(max_examples=500, deadline=None)
@example(instant=1662897600, window="day", zone="America/Santiago")  # 2022-09-11: no midnight (00:00 -> 01:00)
@example(instant=1325160000, window="day", zone="Pacific/Apia")  # 2011-12-29: the next day, the 30th, never was
@example(instant=1696161600, window="day", zone="Australia/Lord_Howe")  # 2023-10-01: a 23.5-hour day
@example(instant=1774800000, window="month", zone="Europe/Paris")  # March 2026: 743 hours
@given(instant=st.integers(946_684_800, 2_208_988_800), window=st.sampled_from(["day", "month"]),
       zone=st.sampled_from(ZONES))
def test_calendar_windows_tile_time_in_every_time_zone(instant: int, window: str, zone: str) -> None:
    """Every instant is in exactly one window, windows follow one another with no gap, a day lasts 23 to 25
    hours (clock changes), and a window starts where its local date (or month) begins."""
    from datetime import datetime, timezone as utc

    from policyd.policy import time_zone
    from policyd.quotas import remaining_ttl, window_of

    spec = f"{window}@{zone}" if zone else window
    w = window_of(spec, instant)
    assert w.start <= instant < w.end
    assert window_of(spec, w.end).start == w.end and window_of(spec, w.start - 1).end == w.start
    hours = (w.end - w.start) / 3600
    assert (22.5 <= hours <= 25.5) if window == "day" else (27 * 24 <= hours <= 32 * 24)
    tz = time_zone(zone) if zone else utc.utc
    start, before, now = (datetime.fromtimestamp(t, tz=tz) for t in (w.start, w.start - 1, instant))
    if window == "day":
        assert start.date() == now.date() and before.date() < start.date()
    else:
        assert (start.year, start.month) == (now.year, now.month) and (before.year, before.month) != (start.year, start.month)
    assert remaining_ttl(f"pd:{{p0}}:b:customer:c:money:{spec}:{w.start}", instant) is not None


@settings(max_examples=300, deadline=None)
@given(documents=st.lists(st.integers(0, 60_000), min_size=1, max_size=400),
       query_tokens=st.integers(1, 2_000), context=st.sampled_from([512, 4096, 32_768]),
       tokens_max=st.one_of(st.just(0), st.integers(1, 40_000)), bytes_a_token=st.integers(1, 6))
def test_a_reranks_hold_covers_the_search_units_any_chunking_bills(documents: list[int], query_tokens: int,
                                                                  context: int, tokens_max: int,
                                                                  bytes_a_token: int) -> None:
    """Whatever a document's bytes a token (at least one), a query of up to half the context, and the tokens
    read of each document (all of them, or `tokens_max`), the search units a reranker that splits documents
    into chunks of its context less the query bills are never more than policyd holds; and never fewer
    than the fewest it charges a reply that counts none."""
    from policyd.pricing import (DOCUMENTS_PER_SEARCH_UNIT, rerank_chunks_most, rerank_search_units,
                                 rerank_search_units_likely)

    query_tokens = min(query_tokens, context // 2)
    room = context - query_tokens - 4  # the document's tokens a chunk holds beside the query and 4 of Cohere's own
    chunks = 0
    for size in documents:
        tokens = -(-size // bytes_a_token)
        read = min(tokens, tokens_max) if tokens_max else tokens
        chunks += max(1, -(-read // room))
    billed = -(-chunks // DOCUMENTS_PER_SEARCH_UNIT)
    assert chunks <= rerank_chunks_most(len(documents), sum(documents), tokens_max, context)
    assert rerank_search_units_likely(len(documents)) <= billed <= rerank_search_units(len(documents), sum(documents),
                                                                                       tokens_max, context)


SEARCH_FEES = {"low": 5_000_000, "medium": 8_000_000, "high": 12_000_000}  # nanos; the default medium


@pytest.fixture
def searching(backend: dict[str, str]) -> Iterator[tuple[asyncio.AbstractEventLoop, Service]]:
    """A service whose price table has Perplexity's kind of models: a search context fee (its default not the
    cheapest), and reasoning billed beside the output with searches the model runs as it will."""
    loop = asyncio.new_event_loop()
    service = loop.run_until_complete(Service.build(make_settings(backend)))
    loop.run_until_complete(service.start())
    policy = SAMPLE_POLICY.replace("limit: 20}", "limit: 100000}").replace("  models:\n", (
        "  models:\n    sonar:\n      provider: perplexity\n      tier: low-cost\n      input: \"1.00\"\n"
        "      output: \"1.00\"\n      per_search_context: {low: \"0.005\", medium: \"0.008\", high: \"0.012\"}\n"
        "      search_context_default: medium\n"
        "    sonar-deep-research:\n      provider: perplexity\n      tier: low-cost\n      input: \"2.00\"\n"
        "      output: \"8.00\"\n      reasoning_output: \"3.00\"\n      per_web_search: \"0.005\"\n"
        "      searches_held: 20\n"), 1)
    loop.run_until_complete(service.admin.apply_policy(policy, "p.yaml"))
    yield loop, service
    loop.run_until_complete(service.close())
    loop.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(asked=st.sampled_from(["", "low", "medium", "high", "ultra"]), data=st.data(),
       input_tokens=st.integers(1, 5_000), cap=st.integers(1, 2_000), deep=st.booleans())
def test_a_search_fee_and_unbounded_searches_and_reasoning_are_never_held_short(
        searching, asked: str, data: st.DataObject, input_tokens: int, cap: int, deep: bool) -> None:
    """Whatever size a request asks its search for (none, one priced, one not priced), the size the provider
    then runs it at (the one asked when priced; its default, which the table names, when none; any other-
    wise) is never dearer than what policyd held, and is what it charges; a deep research's output, reasoning
    (each up to the cap) and searches (up to those its model is held for) the same."""
    loop, service = searching
    customer = f"search{next(counter)}"
    if asked in SEARCH_FEES:
        ran = data.draw(st.sampled_from([asked, ""]))
    elif asked == "":
        ran = data.draw(st.sampled_from(["medium", ""]))
    else:
        ran = data.draw(st.sampled_from([*SEARCH_FEES, ""]))
    output = data.draw(st.integers(0, cap))
    reasoning = data.draw(st.integers(0, cap)) if deep else 0
    searches = data.draw(st.integers(0, 20)) if deep else 0

    async def run() -> None:
        await service.admin.grant_credit(customer, 10**12, "USD", "purchase")
        key = await service.admin.create_key(label="p", customer_id=customer, environment="production", plan="free")
        request = ask(key.secret, model="sonar-deep-research" if deep else "sonar", request_id=f"{customer}-1",
                      input_tokens=input_tokens, max_output_tokens=cap)
        held = await service.engine.authorize(replace(request, shape=replace(request.shape,
                                                                             search_context_size=asked)))
        assert held.decision == "allow", held
        settled = await service.engine.settle(usage(held.request_id, input_tokens=input_tokens,
                                                    output_tokens=output + reasoning, reasoning_output_tokens=reasoning,
                                                    web_searches=searches, search_context_size=ran))
        assert settled.charge <= held.reserved
        if not deep:
            fee = SEARCH_FEES[ran or (asked if asked in SEARCH_FEES else "medium") if ran or asked != "ultra"
                              else "high"]
            assert settled.cost == input_tokens * 1_000 + output * 1_000 + fee

    loop.run_until_complete(run())


@pytest.fixture
def caching(backend: dict[str, str]) -> Iterator[tuple[asyncio.AbstractEventLoop, Service]]:
    """A service whose strict plan may make explicit caches of a model kept at 1 nano a token-second ($3.60 per
    1M token-hours) and written at 1,000 nanos a token ($1.00 per 1M)."""
    loop = asyncio.new_event_loop()
    service = loop.run_until_complete(Service.build(make_settings(backend)))
    loop.run_until_complete(service.start())
    policy = SAMPLE_POLICY.replace("limit: 20}", "limit: 100000}").replace(
        "endpoints: [chat_completions, responses, embeddings]", "endpoints: [chat_completions, cached_contents]", 1
    ).replace("  models:\n", "  models:\n    gemini-cache:\n      provider: google\n      tier: low-cost\n"
              "      input: \"1.00\"\n      output: \"4.00\"\n      cache_storage: \"3.60\"\n", 1)
    loop.run_until_complete(service.admin.apply_policy(policy, "p.yaml"))
    yield loop, service
    loop.run_until_complete(service.close())
    loop.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt_bytes=st.integers(1, 20_000), ttl=st.integers(1, 366 * 86400), data=st.data())
def test_an_explicit_caches_charge_never_passes_its_hold(caching, prompt_bytes: int, ttl: int,
                                                         data: st.DataObject) -> None:
    """A cache made on a strict plan, whatever its tokens (a token is at least a byte) and the time it is asked to
    live, is charged its tokens and that time, never more than held; its time to live then changed, at any moment
    of its life and by any time asked from then, is charged the time past its life charged before (none when
    shortened), never more than held."""
    loop, service = caching
    customer = f"cache{next(counter)}"
    tokens = data.draw(st.integers(1, prompt_bytes))
    elapsed, asked = data.draw(st.integers(0, ttl)), data.draw(st.integers(1, 366 * 86400))

    async def run() -> None:
        await service.admin.grant_credit(customer, 10**15, "USD", "purchase")
        key = await service.admin.create_key(label="p", customer_id=customer, environment="production", plan="free")
        made = ask(key.secret, model="gemini-cache", endpoint="cached_contents", request_id=f"{customer}-made",
                   prompt_bytes=prompt_bytes, max_output_tokens=0)
        held = await service.engine.authorize(replace(made, shape=replace(made.shape, seconds=ttl)))
        assert held.decision == "allow", held
        settled = await service.engine.settle(usage(held.request_id, input_tokens=tokens, output_tokens=0,
                                                    cache_storage_token_seconds=tokens * ttl,
                                                    provider_response_id=f"cachedContents/{customer}"))
        assert settled.cost == tokens * 1_000 + tokens * ttl and settled.charge <= held.reserved
        longer = replace(made, model="", previous_response=f"cachedContents/{customer}",
                         attribution=replace(made.attribution, request_id=f"{customer}-longer"),
                         shape=replace(made.shape, prompt_bytes=0, seconds=asked))
        held = await service.engine.authorize(longer)
        assert (held.decision, held.served_model) == ("allow", "gemini-cache"), held
        settled = await service.engine.settle(usage(held.request_id, input_tokens=tokens, output_tokens=0,
                                                    cache_storage_token_seconds=tokens * (elapsed + asked)))
        assert settled.cost == tokens * max(0, elapsed + asked - ttl) and settled.charge <= held.reserved

    loop.run_until_complete(run())


thread_budget_ops = st.lists(
    st.one_of(
        st.tuples(st.just("authorize"), st.integers(0, 4_000), st.integers(1, 400)),
        st.tuples(st.just("settle"), st.integers(0, 30), st.floats(0, 1), st.floats(0, 1)),
        st.tuples(st.just("release"), st.integers(0, 30)),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(1, 2_000_000), operations=thread_budget_ops)
def test_a_threads_budget_is_never_overshot(running, budget: int, operations) -> None:
    """A caller's thread budget (AuthorizeInput.thread_budget) on a strict plan: whatever requests of the thread
    are held, settled within their bounds or released, in any order, what the thread's requests were charged and
    what they still hold never passes the budget, and the counters agree with the records (audit)."""
    loop, service = running
    loop.run_until_complete(_budget_scenario(service, budget, operations, f"run{next(counter)}", "thread"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(1, 2_000_000), operations=thread_budget_ops)
def test_a_customers_own_budget_is_never_overshot_by_its_keys(running, budget: int, operations) -> None:
    """A customer's own budget (Admin.set_owner_limits) on a strict plan, its requests spread over three keys:
    whatever is held, settled within its bounds or released, in any order, what the customer was charged and
    still holds never passes the budget, and the counters agree with the records (audit)."""
    loop, service = running
    loop.run_until_complete(_budget_scenario(service, budget, operations, f"owner{next(counter)}", "customer"))


async def _close(service: Service, rid: str, op: tuple, held: dict[str, tuple[int, int, int]]) -> int | None:
    """Release an open request (op "release"), or settle it within its strict bounds (op "settle": the drawn
    parts of its input and output bounds), taking it out of `held`: its charge, never past its hold (None:
    released)."""
    hold, input_bound, output_bound = held.pop(rid)
    if op[0] == "release":
        await service.engine.release(rid, "test")
        return None
    s = await service.engine.settle(usage(rid, input_tokens=int(input_bound * op[2]),
                                          output_tokens=int(output_bound * op[3])))
    assert s.charge <= hold
    return s.charge


async def _budget_scenario(service: Service, budget: int, operations: list, customer: str, whose: str) -> None:
    """`whose`: the budget is the thread's (its caller's) or the customer's (set by the operator)."""
    secrets = [(await service.admin.create_key(label="p", customer_id=customer, environment="production",
                                               plan="free")).secret for _ in range(1 if whose == "thread" else 3)]
    await service.admin.grant_credit(customer, 10**12, "USD", "purchase", "")
    if whose == "customer":
        await service.admin.set_owner_limits([{"window": "total", "unit": "money", "limit": budget}], customer)
    held: dict[str, tuple[int, int, int]] = {}  # open request id -> its hold, input bound, output bound
    opened: list[str] = []
    charged = 0
    for n, op in enumerate(operations):
        if op[0] == "authorize":
            rid = f"{customer}-{n}"
            asked = ask(secrets[n % len(secrets)], request_id=rid, prompt_bytes=op[1], max_output_tokens=op[2],
                        thread_id="run")
            d = await service.engine.authorize(replace(asked, thread_budget=budget) if whose == "thread" else asked)
            if d.decision != "deny":
                held[rid] = (d.reserved, min(op[1] + 24, CONTEXT_WINDOW), d.max_output_tokens)
                opened.append(rid)
            else:
                label = "(thread-budget)" if whose == "thread" else "(customer-money-total)"
                assert d.reason == "budget_exceeded" and d.message.endswith(label), d
        elif opened and opened[op[1] % len(opened)] in held:
            charged += await _close(service, opened[op[1] % len(opened)], op, held) or 0
        assert charged + sum(hold for hold, _, _ in held.values()) <= budget
    await service.writer.drain()
    assert (await service.admin.audit()).ok


owner_history = st.lists(st.tuples(st.sampled_from(("settle", "release", "open", "refund", "denied")),
                                   st.integers(1, 2_000), st.integers(1, 200)), max_size=8)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(before=owner_history, after=owner_history)
def test_an_owners_limit_set_mid_window_starts_from_what_was_used_and_the_audit_agrees(running, before,
                                                                                       after) -> None:
    """Whatever an owner did in the window before its money and request limits were made (requests settled, some
    refunded in part, released, left open, denied), the limits start from exactly what a bucket counting them all
    would hold (charges less refunds and open holds; requests settled or open); with more requests after, a
    rebuild, and the limits taken off, the counters always agree with the records (audit)."""
    loop, service = running
    loop.run_until_complete(_owner_seed_scenario(service, before, after, f"seeded{next(counter)}"))


async def _owner_seed_scenario(service: Service, before: list, after: list, customer: str) -> None:
    secret = (await service.admin.create_key(label="p", customer_id=customer, environment="production",
                                             plan="free")).secret
    await service.admin.grant_credit(customer, 10**12, "USD", "purchase", "")

    async def run(history: list, tag: str) -> tuple[int, int]:
        """The requests of a history: what a bucket counting them all holds (money, requests)."""
        money = requests = 0
        for n, (kind, prompt, output) in enumerate(history):
            rid = f"{customer}-{tag}-{n}"
            asked = ask(secret if kind != "denied" else "pdk_live_" + "Q" * 40, request_id=rid, prompt_bytes=prompt,
                        max_output_tokens=output)
            d = await service.engine.authorize(asked)
            if d.decision == "deny":
                continue
            if kind == "release":
                await service.engine.release(rid, "upstream_503")
            elif kind == "open":
                money, requests = money + d.reserved, requests + 1
            else:
                settled = await service.engine.settle(usage(rid, input_tokens=prompt // 8, output_tokens=output // 2))
                charge = settled.charge
                refunded = 0
                if kind == "refund" and charge > 1:  # a part of it given back
                    refunded = (await service.admin.refund_usage(rid, charge // 2, "test"))[0]
                money, requests = money + charge - refunded, requests + 1
        return money, requests

    money, requests = await run(before, "before")
    row, _ = await service.admin.set_owner_limits([{"window": "month", "unit": "money", "limit": 10**12},
                                                   {"window": "day", "unit": "requests", "limit": 10**6}], customer)
    used = {s["limit"].unit: s["used"] for s in await service.admin.owner_limit_states(row)}
    assert used == {"money": money, "requests": requests}
    await run(after, "after")
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok
    await service.admin.set_owner_limits([], customer)
    await service.writer.drain()
    assert (await service.admin.audit()).ok


reset_ops = st.lists(st.one_of(
    st.tuples(st.just("authorize"), st.integers(1, 4_000), st.integers(1, 400)),
    st.tuples(st.just("settle"), st.integers(0, 30), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("release"), st.integers(0, 30)),
    st.tuples(st.just("refund"), st.integers(0, 30), st.floats(0.01, 1)),
    st.tuples(st.just("reset"), st.sampled_from(("", "money", "requests"))),
), min_size=1, max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=reset_ops)
# a refund of a forgiven request, then a reset again; one of a request settled after the reset
@example(operations=[("authorize", 100, 100), ("settle", 0, 1.0, 1.0), ("authorize", 100, 100), ("reset", ""),
                     ("refund", 0, 0.5), ("settle", 1, 1.0, 0.5), ("refund", 1, 1.0), ("reset", "money")])
def test_resets_forgive_each_settled_request_once_and_the_audit_agrees(running, operations) -> None:
    """Requests held, settled, released and refunded (in part) in any order, with resets of the customer's money
    and request limits among them: each bucket holds exactly the open requests' holds and what settled requests
    not yet forgiven put in it (a refund of a forgiven request giving nothing back again), never below zero; the
    counters agree with the records (audit), before and after a rebuild."""
    loop, service = running
    loop.run_until_complete(_reset_scenario(service, operations, f"reset{next(counter)}"))


async def _reset_scenario(service: Service, operations: list, customer: str) -> None:
    secret = (await service.admin.create_key(label="p", customer_id=customer, environment="production",
                                             plan="free")).secret
    await service.admin.grant_credit(customer, 10**12, "USD", "purchase", "")
    row, _ = await service.admin.set_owner_limits([{"window": "month", "unit": "money", "limit": 10**12},
                                                   {"window": "day", "unit": "requests", "limit": 10**6}], customer)
    # request id -> {unit: what it puts in that bucket now}, its state, and the units whose reset forgave it
    requests: dict[str, dict] = {}
    for n, op in enumerate(operations):
        ids = list(requests)
        if op[0] == "authorize":
            rid = f"{customer}-{n}"
            d = await service.engine.authorize(ask(secret, request_id=rid, prompt_bytes=op[1], max_output_tokens=op[2]))
            assert d.decision == "allow", d
            requests[rid] = {"money": d.reserved, "requests": 1, "state": "open", "forgiven": set(), "charge": 0}
        elif op[0] == "reset":
            _, done = await service.admin.reset_limits(customer, unit=op[1])
            for unit in ("money", "requests") if not op[1] else (op[1],):
                forgiven = [r for r in requests.values() if r["state"] == "settled" and unit not in r["forgiven"]]
                assert [d.forgiven for d in done if d.limit.unit == unit] == [sum(r[unit] for r in forgiven)]
                for r in forgiven:
                    r["forgiven"].add(unit)
        elif ids:
            rid = ids[op[1] % len(ids)]
            r = requests[rid]
            if op[0] == "release" and r["state"] == "open":
                await service.engine.release(rid, "test")
                r.update(state="released", money=0, requests=0)
            elif op[0] == "settle" and r["state"] == "open":
                settled = await service.engine.settle(usage(rid, input_tokens=int(2_000 * op[2]),
                                                            output_tokens=int(400 * op[3])))
                r.update(state="settled", money=settled.charge, charge=settled.charge)
            elif op[0] == "refund" and r["state"] == "settled" and r["charge"] > 1 and "refunded" not in r:
                amount = max(int(r["charge"] * op[2]), 1)
                await service.admin.refund_usage(rid, amount, "test")
                r["refunded"] = amount
                if "money" not in r["forgiven"]:  # a forgiven one: its limit gets nothing back again
                    r["money"] -= min(amount, r["money"])
        states = {s["limit"].unit: s["used"] for s in await service.admin.owner_limit_states(row)}
        for unit in ("money", "requests"):
            assert states[unit] == sum(r[unit] for r in requests.values() if unit not in r["forgiven"]) >= 0, op
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.integers(1, 2_000_000), requests_limit=st.integers(1, 12), operations=thread_budget_ops)
def test_limits_sharing_a_bucket_count_each_request_once(running, budget: int, requests_limit: int,
                                                         operations) -> None:
    """A plan's budget and request limit, each with a shadow limit of the same bucket beside it (what an operator
    tries before tightening): whatever requests are held, settled within their bounds or released, each bucket
    holds exactly the open requests' holds and what settled ones were charged (a request counted once, not once
    a limit), so the budget and the request limit admit all they allow and never more; the audit agrees."""
    loop, service = running
    loop.run_until_complete(_shared_bucket_scenario(service, budget, requests_limit, operations,
                                                    f"shared{next(counter)}"))


async def _shared_bucket_scenario(service: Service, budget: int, requests_limit: int, operations: list,
                                  customer: str) -> None:
    from policyd import quotas
    from policyd.money import format_amount
    from policyd.pricing import Quantities

    plan_limits = "\n".join(f"      - {{{limit}}}" for limit in (
        f'name: key-budget, scope: key, window: total, unit: money, limit: "{format_amount(budget)}"',
        f'name: key-budget-watch, scope: key, window: total, unit: money, limit: "{format_amount(budget // 3)}", '
        'action: shadow',
        f"name: key-requests, scope: key, window: total, unit: requests, limit: {requests_limit}",
        "name: key-requests-watch, scope: key, window: total, unit: requests, limit: 1, action: shadow"))
    free_rpm = "      - {name: key-rpm, scope: key, window: minute, unit: requests, limit: 20}"
    await service.admin.apply_policy(SAMPLE_POLICY.replace(free_rpm, plan_limits, 1), f"{customer}.yaml")
    key = await service.admin.create_key(label="p", customer_id=customer, environment="production", plan="free")
    await service.admin.grant_credit(customer, 10**12, "USD", "purchase", "")
    policy = service.book.current
    assert policy is not None
    buckets = {}
    for limit in policy.plan("free").limits:
        if limit.scope == "key":
            hold, _ = quotas.hold_for(limit, service.counters.partition_of(customer), key.row.id, 0, 0, Quantities())
            buckets[limit.unit] = hold.key
    assert len(buckets) == 2  # a limit and its watch: one bucket
    held: dict[str, tuple[int, int, int]] = {}  # open request id -> its hold, input bound, output bound
    opened: list[str] = []
    charged = counted = 0
    for n, op in enumerate(operations):
        if op[0] == "authorize":
            rid = f"{customer}-{n}"
            d = await service.engine.authorize(ask(key.secret, request_id=rid, prompt_bytes=op[1],
                                                   max_output_tokens=op[2]))
            if d.decision != "deny":
                held[rid] = (d.reserved, min(op[1] + 24, CONTEXT_WINDOW), d.max_output_tokens)
                opened.append(rid)
            else:  # with room for a request, the budget refused it; without, either may (the budget is first)
                refusals = {("budget_exceeded", "(key-budget)")}
                if counted + len(held) >= requests_limit:
                    refusals.add(("rate_limit_exceeded", "(key-requests)"))
                assert (d.reason, d.message[d.message.rfind("("):]) in refusals, d
        elif opened and opened[op[1] % len(opened)] in held:
            charge = await _close(service, opened[op[1] % len(opened)], op, held)
            if charge is not None:
                charged, counted = charged + charge, counted + 1
        used = {unit: int(await service.counters.client.hget(bucket, "used") or 0) for unit, bucket in buckets.items()}
        assert used == {"money": charged + sum(hold for hold, _, _ in held.values()), "requests": counted + len(held)}
        assert used["money"] <= budget and used["requests"] <= requests_limit
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert {unit: int(await service.counters.client.hget(bucket, "used") or 0) for unit, bucket in buckets.items()} \
        == {"money": charged + sum(hold for hold, _, _ in held.values()), "requests": counted + len(held)}


LIMIT_SCOPES = ("key", "customer", "team", "end_user", "feature", "thread", "model")
LIMIT_MODELS = ((), ("gpt-4o",), ("tier:low-cost",))
PROPERTY_MODELS = ("gpt-4o-mini", "gpt-4o", "gemini-2.5-flash")
plan_limits = st.lists(st.tuples(st.sampled_from(LIMIT_SCOPES), st.sampled_from(("money", "requests")),
                                 st.sampled_from(("block", "block", "shadow", "downgrade")), st.sampled_from(LIMIT_MODELS),
                                 st.integers(1, 12)), min_size=1, max_size=7)
attributed_ops = st.lists(
    st.one_of(
        # ..., and a fallback the provider may serve it on instead (0: none; else PROPERTY_MODELS[n - 1]; a router's
        # or Anthropic's kind)
        st.tuples(st.just("authorize"), st.integers(0, 1), st.integers(0, 2), st.integers(0, 2), st.integers(0, 1),
                  st.integers(0, 1), st.integers(0, 2_000), st.integers(1, 400), st.integers(0, 3), st.booleans()),
        # ..., and which of the models that may serve it did, its reply naming it or a dated snapshot of it
        st.tuples(st.just("settle"), st.integers(0, 30), st.floats(0, 1), st.floats(0, 1), st.integers(0, 1),
                  st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 30)),
    ),
    min_size=1,
    max_size=30,
)


own_limit = st.one_of(st.none(), st.tuples(st.sampled_from(("money", "requests")), st.integers(1, 12)))
owners_limit = st.one_of(st.none(), st.tuples(st.sampled_from(("customer", "team", "end_user")),
                                              st.sampled_from(("money", "requests")), st.integers(1, 12)))
operator_caps = st.lists(st.tuples(st.sampled_from(("", "openai", "google")), st.sampled_from(LIMIT_MODELS),
                                   st.sampled_from(("money", "requests")),
                                   st.sampled_from(("block", "shadow", "downgrade")), st.integers(1, 12))
                         .filter(lambda cap: (cap[0], cap[1]) != ("google", ("gpt-4o",))),  # covering nothing: refused
                         max_size=2)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=plan_limits, operations=attributed_ops, keys_own=own_limit, owners=owners_limit, caps=operator_caps)
# a blocking limit and a shadow one of a bucket, and one of the same scope on some models beside them
@example(limits=[("key", "requests", "block", (), 3), ("key", "requests", "shadow", (), 1),
                 ("key", "requests", "block", ("gpt-4o",), 1)],
         operations=[("authorize", 0, 1, 0, 0, 0, 100, 10)] * 3 + [("settle", 0, 1.0, 1.0)], keys_own=None,
         owners=None, caps=[])
# a customer's budget downgrading premium requests, beside a blocking one of its bucket; a team's on some models
@example(limits=[("customer", "money", "downgrade", (), 4), ("customer", "money", "block", (), 9),
                 ("team", "requests", "block", ("tier:low-cost",), 2)],
         operations=[("authorize", n % 2, 1, 0, 0, 0, 1_500, 300) for n in range(5)] + [("release", 1)]
         + [("authorize", 0, 1, 0, 0, 0, 1_500, 300)], keys_own=None, owners=None, caps=[])
# an end user's own request limit in place of the plan's for her; a key's own budget in place of its plan's
@example(limits=[("end_user", "requests", "block", (), 5), ("key", "money", "block", (), 12)],
         operations=[("authorize", n % 2, 0, 1, 0, 0, 500, 100) for n in range(6)], keys_own=("money", 1),
         owners=("end_user", "requests", 2), caps=[])
# the operator's cap on openai's premium requests downgrading them, and a shadow one on every request beside it
@example(limits=[("key", "requests", "block", (), 12)],
         operations=[("authorize", n % 2, n % 3, 0, 0, 0, 1_000, 200) for n in range(8)], keys_own=None, owners=None,
         caps=[("openai", ("gpt-4o",), "requests", "downgrade", 2), ("", (), "money", "shadow", 1)])
# a router's fallback served, its reply naming a dated snapshot of it, a limit on its model alone; and one on the
# cheaper model asked for, a snapshot of which begins with the fallback's name
@example(limits=[("customer", "money", "block", ("gpt-4o",), 12), ("customer", "requests", "block", (), 12)],
         operations=[("authorize", 0, 0, 0, 0, 0, 400, 50, 2, True), ("settle", 0, 1.0, 1.0, 1, True),
                     ("authorize", 0, 1, 0, 0, 0, 400, 50, 1, True), ("settle", 0, 1.0, 1.0, 1, True)],
         keys_own=None, owners=None, caps=[])
def test_every_limit_of_a_plan_counts_exactly_the_requests_it_binds(running, limits, operations, keys_own,
                                                                    owners, caps) -> None:
    """A plan with any mix of limits (a key's, the customer's, a team's, an end user's, a feature's, a thread's, a
    model's; money and requests; blocking, shadow and one downgrading to a cheaper model; on every model or on
    some), requests of two keys naming any of those owners on any model, held, settled within their bounds or
    released in any order: each limit's bucket holds exactly what the requests it binds hold or were charged
    (each counted once, however many limits share the bucket; in no bucket of a limit that does not bind it; a
    request it downgraded not in its), a blocking or downgrading limit is never passed (a strict plan), and the
    audit agrees; so too with a key's own limit and an owner's (its customer's, a team's, an end user's) in place
    of the plan's of their buckets, and with the operator's caps (on a provider, on some models; blocking, shadow
    or downgrading) beside them."""
    loop, service = running
    loop.run_until_complete(_attributed_scenario(service, limits, operations, f"mix{next(counter)}", keys_own,
                                                 owners, caps))


async def _forget_seeds(service: Service, buckets: list[str]) -> None:
    """Buckets started from the requests before their limits (bucket_seeds.py) made to count from now on."""
    from sqlalchemy import delete

    from policyd.db import BucketSeedRow

    for key in buckets:
        await service.counters.client.delete(key)
    with service.store.session() as session, session.begin():
        session.execute(delete(BucketSeedRow).where(BucketSeedRow.bucket_key.in_(buckets)))


async def _attributed_scenario(service: Service, drawn: list, operations: list, customer: str, keys_own: tuple | None,
                               owners: tuple | None, drawn_caps: list) -> None:
    import yaml

    from policyd import quotas
    from policyd.policy import Cap
    from policyd.pricing import Quantities

    doc = yaml.safe_load(SAMPLE_POLICY)
    # one limit or cap downgrades (the first drawn so), whose label a downgraded request's attempt leaves out
    downgrading = [n for n, limit in enumerate(drawn) if limit[2] == "downgrade"][:1]
    drawn = [(scope, unit, "block" if action == "downgrade" and n not in downgrading else action, models, value)
             for n, (scope, unit, action, models, value) in enumerate(drawn)]
    cap_downgrading = [] if downgrading else [n for n, cap in enumerate(drawn_caps) if cap[3] == "downgrade"][:1]
    doc["caps"] = [{"name": f"{customer}-cap{n}", **({"provider": provider} if provider else {}),
                    **({"models": list(models)} if models else {}), "window": "total", "unit": unit,
                    "limit": f"0.{value * 1_000_000:09d}" if unit == "money" else value,
                    "action": "block" if action == "downgrade" and n not in cap_downgrading else action,
                    **({"downgrade_to": "gpt-4o-mini"} if action == "downgrade" and n in cap_downgrading else {})}
                   for n, (provider, models, unit, action, value) in enumerate(drawn_caps)]
    doc["plans"]["mixed"] = {
        "models": ["tier:low-cost", "tier:premium"], "endpoints": ["chat_completions"], "reservation": "strict",
        "default_max_output_tokens": 400,
        "limits": [{"name": f"l{n}-{scope}-{unit}", "scope": scope, "window": "total", "unit": unit,
                    "limit": f"0.{value * 1_000_000:09d}" if unit == "money" else value, "action": action,
                    **({"models": list(models)} if models else {}),
                    **({"downgrade_to": "gpt-4o-mini"} if action == "downgrade" else {})}
                   for n, (scope, unit, action, models, value) in enumerate(drawn)]}
    await service.admin.apply_policy(yaml.safe_dump(doc), f"{customer}.yaml")
    policy = service.book.current
    assert policy is not None
    plan = policy.plan("mixed")
    # the caps, new each example and every customer's, start from the earlier examples' requests (bucket_seeds.py,
    # proven in tests/test_bucket_seeds.py): taken back here, for each bucket to count this example's alone
    await _forget_seeds(service, [quotas.cap_hold(cap, 0, 0, 0, Quantities())[0].key for cap in policy.document.caps])
    keys = [await service.admin.create_key(label="p", customer_id=customer, environment="production", plan="mixed",
                                           team_id=team) for team in ("red", "blue")]
    await service.admin.grant_credit(customer, 10**12, "USD", "purchase", "")
    if keys_own is not None:
        await service.admin.set_limits(keys[0].row.id, [{"window": "total", "unit": keys_own[0], "limit": keys_own[1] * (
            1_000_000 if keys_own[0] == "money" else 1)}])
    if owners is not None:
        scope, unit, value = owners
        named = {"team": {"team_id": "red"}, "end_user": {"end_user_id": "alice"}}.get(scope, {})
        await service.admin.set_owner_limits([{"window": "total", "unit": unit, "limit": value * (
            1_000_000 if unit == "money" else 1)}], customer, **named)
    from policyd import key_limits
    from policyd.store import key_record
    alices = service.store.owner_limits_of(customer, "end_user", "alice")

    def limits_of(which: int, end_user: str) -> tuple:
        """The limits a request counts against: the plan's, with the key's own and its owners' (and the end
        user's) in place of those of their buckets."""
        own = key_record(service.store.key(keys[which].row.id)).limits
        if end_user == "alice" and alices is not None:
            own += key_limits.as_limits(alices.limits)
        return key_limits.effective(plan.limits, own, policy.document.timezone, service.engine.clock())

    partition = service.counters.partition_of(customer)

    def bucket_of(limit: Any, ids: dict[str, str]) -> str | None:
        """The bucket a limit counts a request of these owners in (None: the request has none of its scope)."""
        if isinstance(limit, Cap):
            return quotas.cap_hold(limit, 0, 0, 0, Quantities())[0].key
        return quotas.hold_for(limit, partition, ids[limit.scope], 0, 0, Quantities())[0].key if ids[limit.scope] \
            else None

    def binds(limit: Any, model: str) -> bool:
        price = policy.model(model)
        return limit.covers(model, price) if isinstance(limit, Cap) else limit.binds(model, price.tier)

    # request id -> (the scope ids its buckets are named by, of each model that may serve it; the model that served
    # it, "" while open; what it holds or was charged)
    counted: dict[str, tuple[dict[str, dict[str, str]], str, int]] = {}
    bound_by: dict[str, tuple] = {}  # request id -> the limits it counted against
    downgraded: set[str] = set()  # served on the cheaper model by the downgrading limit, which counts them not
    bounds: dict[str, tuple[int, int]] = {}
    for n, op in enumerate(operations):
        if op[0] == "authorize":
            _, which, model, end_user, feature, thread, prompt, output, *other = op
            fallback, routed = other or (0, False)
            # a fallback of the same provider (a reply naming another's is priced as the model asked for)
            fallbacks = (PROPERTY_MODELS[fallback - 1],) if fallback and policy.model(
                PROPERTY_MODELS[fallback - 1]).provider == policy.model(PROPERTY_MODELS[model]).provider else ()
            rid = f"{customer}-{n}"
            attribution = {"end_user_id": ("", "alice", "bob")[end_user], "feature": ("", "search")[feature],
                           "thread_id": ("", "run-1")[thread]}
            asked = ask(keys[which].secret, model=PROPERTY_MODELS[model], request_id=rid, prompt_bytes=prompt,
                        max_output_tokens=output, **attribution)
            d = await service.engine.authorize(replace(asked, shape=replace(
                asked.shape, fallback_models=fallbacks, fallbacks_routed=routed)))
            if d.decision != "deny":
                if d.decision == "downgrade":
                    downgraded.add(rid)
                    assert d.served_model == "gpt-4o-mini" and (downgrading or cap_downgrading), d
                serving = tuple(dict.fromkeys((d.served_model, *fallbacks)))
                ids = {m: quotas.scope_ids(customer, keys[which].row.id, team_id=keys[which].row.team_id,
                                           feature=attribution["feature"], model=m, thread_id=attribution["thread_id"],
                                           end_user_id=attribution["end_user_id"]) for m in serving}
                counted[rid] = (ids, "", d.reserved)
                bound_by[rid] = (*limits_of(which, attribution["end_user_id"]),
                                 *dict.fromkeys(cap for m in serving for cap in policy.caps_for(m)))
                bounds[rid] = (min(prompt + 24, 10**6), d.max_output_tokens)
            else:
                assert d.reason in ("budget_exceeded", "rate_limit_exceeded"), d
        elif counted:
            rid = sorted(bounds)[op[1] % len(bounds)] if bounds else None
            if rid is None:
                continue
            input_bound, output_bound = bounds.pop(rid)
            ids, _, hold = counted[rid]
            if op[0] == "release":
                await service.engine.release(rid, "test")
                del counted[rid]
            else:
                served = list(ids)[(op[4] if len(op) > 4 else 0) % len(ids)]  # the first: the model authorized
                # (a snapshot of gpt-4o-mini is its own, whichever of the two is a fallback: the longer name's)
                reply = served + "-2025-01-01" if len(op) > 5 and op[5] else served
                s = await service.engine.settle(usage(rid, input_tokens=int(input_bound * op[2]),
                                                      output_tokens=int(output_bound * op[3]), reply_model=reply))
                assert s.served_model == served, (reply, served, s.served_model)
                assert s.charge <= hold
                counted[rid] = (ids, served, s.charge)
        # each bucket: what the requests any of its limits (or caps) binds put in it, each once (a request its
        # downgrading limit served on the cheaper model counts there only through another limit of that bucket)
        # (an open request: of each model that may serve it; a settled one: of the model that served it alone)
        expected: dict[str, int] = {}
        for rid, (ids, served, amount) in counted.items():
            counted_in = set()
            for limit in bound_by[rid]:
                for model in (served,) if served else ids:
                    key = bucket_of(limit, ids[model])
                    if key is None or not binds(limit, model) or (limit.action == "downgrade" and rid in downgraded):
                        continue
                    if key not in counted_in:
                        counted_in.add(key)
                        expected[key] = expected.get(key, 0) + (amount if limit.unit == "money" else 1)
        # each limit a request counted against, in the bucket of that request's owner (a cap's: its one)
        keyed = {(limit, key) for rid, (ids, _, _) in counted.items() for limit in bound_by[rid]
                 for model_ids in ids.values() if (key := bucket_of(limit, model_ids)) is not None}
        sharing: dict[str, int] = {}
        for _, key in keyed:
            sharing[key] = sharing.get(key, 0) + 1
        for limit, key in keyed:
            used = int(await service.counters.client.hget(key, "used") or 0)
            assert used == expected.get(key, 0), (limit.label, key, op)
            # never passed: a blocking limit; a downgrading one counting alone (beside another, the requests it
            # downgraded count there through the other)
            if limit.action == "block" or limit.action == "downgrade" and sharing[key] == 1:
                assert used <= limit.limit, (limit.label, key)
    await service.writer.drain()
    assert (await service.admin.audit()).ok
