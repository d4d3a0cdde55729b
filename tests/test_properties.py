"""Property tests: random interleavings of authorize / settle / release / expire / top-up keep
balance = grants - settled charges, reserved = open reservations, to the nano; strict plans never
take a wallet below zero (n choices each reaching the output cap included)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd.domain import PolicydError
from policyd.server import Service
from tests.conftest import SAMPLE_POLICY, make_settings
from tests.helpers import ask, usage

ops = st.lists(
    st.one_of(
        st.tuples(st.just("authorize"), st.integers(0, 20_000), st.integers(0, 800), st.integers(0, 4)),
        st.tuples(st.just("settle"), st.integers(0, 40), st.floats(0, 1), st.floats(0, 1)),
        st.tuples(st.just("settle_again"), st.integers(0, 40)),
        st.tuples(st.just("release"), st.integers(0, 40)),
        st.tuples(st.just("expire")),
        st.tuples(st.just("grant"), st.integers(1, 5_000_000)),
    ),
    min_size=1,
    max_size=40,
)


@pytest.fixture
def running(backend: dict[str, str]) -> Iterator[tuple[asyncio.AbstractEventLoop, Service]]:
    loop = asyncio.new_event_loop()
    service = loop.run_until_complete(Service.build(make_settings(backend)))
    loop.run_until_complete(service.start())
    loop.run_until_complete(service.admin.apply_policy(SAMPLE_POLICY.replace("limit: 20}", "limit: 100000}"), "p.yaml"))
    yield loop, service
    loop.run_until_complete(service.close())
    loop.close()


counter = itertools.count()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=ops)
def test_wallet_invariant_under_random_interleavings(running, operations) -> None:
    loop, service = running
    loop.run_until_complete(_scenario(service, operations, f"cust{next(counter)}"))


async def _scenario(service: Service, operations: list, customer: str) -> None:
    clock = [service.engine.clock()]
    service.engine.clock = lambda: clock[0]
    key = await service.admin.create_key(label="p", customer_id=customer, environment="production", plan="free")
    grants = 0
    charges = 0
    requests: list[tuple[str, int, int, int]] = []  # request id, reserved, prompt bytes, output bound
    open_: dict[str, int] = {}
    state: dict[str, str] = {}
    settled_with: dict[str, tuple[int, int]] = {}
    for n, op in enumerate(operations):
        kind = op[0]
        if kind == "authorize":
            rid = f"{customer}-{n}"
            d = await service.engine.authorize(ask(key.secret, request_id=rid, prompt_bytes=op[1],
                                                    max_output_tokens=op[2], choices=op[3], thread_id=f"t{n}"))
            if d.decision != "deny":  # each of n choices may reach the cap
                requests.append((rid, d.reserved, op[1], d.max_output_tokens * max(1, op[3])))
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
                # within the strict bound: input <= bytes + overhead, output <= the enforced cap x choices
                tokens = (int((prompt + 24) * op[2]), int(cap * op[3]))
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
            open_.pop(rid, None)
            state[rid] = "settled"
            settled_with[rid] = tokens
        elif kind == "expire":
            clock[0] += service.engine.reservation_ttl_ms + 1
            await service.engine.expire_due()
            for rid in list(open_):
                state[rid] = "expired"
                open_.pop(rid)
        elif kind == "grant":
            await service.admin.grant_credit(customer, op[1], "USD", "purchase")
            grants += op[1]
        balance, reserved = await service.counters.wallet(customer)
        assert balance == grants - charges
        assert reserved == sum(open_.values())
        assert balance - reserved >= 0  # strict plan: the reservation was an upper bound
    await service.writer.drain()
    assert service.store.ledger_balances().get(customer, 0) == grants - charges
    audit = await service.admin.audit()
    assert audit.ok, audit.mismatches
