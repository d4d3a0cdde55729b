"""Concurrency: a pause is never overtaken by an allow, and a wallet is never overspent."""

from __future__ import annotations

import asyncio
import json

from policyd import redis_keys
from policyd.server import Service
from tests.helpers import ask, counters_lost_and_rebuilt, fund, new_key, usage


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_pause_while_requests_are_in_flight(service: Service) -> None:
    key_id, secret = await new_key(service)
    _, sibling = await new_key(service)  # another key of the same customer: a leaked key is disabled alone
    await fund(service, "acme", "1000")
    decided_after_pause: list[str] = []
    paused = asyncio.Event()

    async def client(n: int) -> None:
        after = 0  # requests go on until 5 of this client's have started after the pause (however fast they are)
        for i in range(5_000):
            started_after_pause = paused.is_set()
            d = await service.engine.authorize(ask(secret, request_id=f"c{n}-{i}", prompt_bytes=10, max_output_tokens=5))
            if started_after_pause:
                decided_after_pause.append(d.decision)
                after += 1
                if after == 5:
                    return

    async def pauser() -> None:
        await asyncio.sleep(0.02)
        await service.admin.set_state(key_id, "paused")
        paused.set()

    await asyncio.gather(*(client(n) for n in range(8)), pauser())
    assert decided_after_pause and set(decided_after_pause) == {"deny"}
    assert (await service.engine.authorize(ask(sibling, prompt_bytes=10, max_output_tokens=5))).decision == "allow"

    # the stronger proof: in the partition's own order, no allow of this key follows the pause
    stream = redis_keys.events(service.counters.partition_of("acme"))
    entries = await service.counters.client.xrange(stream)
    order = []
    for _, fields in entries:
        f = {_text(k): _text(v) for k, v in fields.items()}
        if f["type"] == "key_state" and f["rid"] == key_id:
            order.append(f"state:{f['status']}")
        elif f["type"] == "authorize" and json.loads(f["d"])["record"]["api_key_id"] == key_id:
            order.append(f["outcome"])
    pause_at = order.index("state:paused")
    assert "allow" in order[:pause_at]
    assert "allow" not in order[pause_at:]
    await service.writer.drain()
    assert (await service.admin.audit()).ok


async def test_concurrent_authorize_never_overspends(service: Service) -> None:
    """250 concurrent requests against a wallet that affords exactly 37 of them."""
    policy = (await service.admin.book.version(1)).canonical.replace("concurrency: 32", "concurrency: 0")
    await service.admin.apply_policy(policy, "no-concurrency-cap.yaml")
    _, secret = await new_key(service)
    probe = await service.engine.authorize(ask(secret, request_id="probe", prompt_bytes=4000, max_output_tokens=300))
    assert probe.reason == "insufficient_quota"
    one = await _estimate(service, secret)
    affordable = 37
    await service.admin.grant_credit("acme", one * affordable + one - 1, "USD", "purchase")
    results = await asyncio.gather(*(
        service.engine.authorize(ask(secret, request_id=f"burst-{i}", prompt_bytes=4000, max_output_tokens=300))
        for i in range(250)
    ))
    allowed = [d for d in results if d.decision == "allow"]
    assert len(allowed) == affordable
    assert {d.reason for d in results if d.decision == "deny"} == {"insufficient_quota"}
    balance, reserved = await service.counters.wallet("acme")
    assert reserved == one * affordable <= balance
    await service.writer.drain()
    assert (await service.admin.audit()).ok


async def _estimate(service: Service, secret: str) -> int:
    """What one request of the burst reserves, measured on a scratch customer."""
    await service.admin.grant_credit("scratch", 10**12, "USD", "purchase")
    key = await service.admin.create_key(label="s", customer_id="scratch", environment="production", plan="pro")
    d = await service.engine.authorize(ask(key.secret, prompt_bytes=4000, max_output_tokens=300))
    await service.engine.release(d.request_id, "probe")
    return d.reserved


async def test_a_drain_under_steady_traffic_ends_with_everything_before_it_written(service: Service) -> None:
    """An audit, a records listing or a rebuild drains the streams first: under traffic that never pauses
    it moves what was there when it began and returns while the traffic goes on (waiting for empty
    streams, it returned only once the traffic stopped)."""
    _, secret = await new_key(service)
    await fund(service, "acme", "1000")
    stop = asyncio.Event()
    done: list[str] = []

    async def client(n: int) -> None:
        i = 0
        while not stop.is_set() and i < 4_000:  # bounded either way: about 20 s of traffic at most
            rid = f"steady-{n}-{i}"
            i += 1
            d = await service.engine.authorize(ask(secret, request_id=rid, prompt_bytes=40, max_output_tokens=5))
            assert d.decision == "allow"
            await service.engine.settle(usage(rid, input_tokens=10, output_tokens=5))
            done.append(rid)

    traffic = [asyncio.create_task(client(n)) for n in range(4)]
    try:
        while len(done) < 200:
            await asyncio.sleep(0.01)
        before = list(done)  # settled, so their events are in the streams before the drain begins
        await service.writer.drain()
        assert not all(task.done() for task in traffic), "the drain waited for the traffic to end"
        assert {service.store.usage_record(rid).status for rid in before} == {"settled"}
    finally:
        stop.set()
        await asyncio.gather(*traffic)
    await service.writer.drain()
    assert {service.store.usage_record(rid).status for rid in done} == {"settled"}
    assert (await service.admin.audit()).ok


async def test_customers_naming_one_request_id_at_once_each_get_at_most_one_request(service: Service) -> None:
    """Three customers (two sharing a partition, one in another) send requests naming one id at once: as a
    gateway's clients (each request a call of its own), each customer has exactly one served, under the id
    or its key's name for it, the rest refused as in progress (409); natively, one request in all is
    served. Every hold is in its own customer's wallet, every settle charged there."""
    from dataclasses import replace

    first = "acme"
    same = next(c for c in (f"near-{i}" for i in range(60)) if c != first and
                service.counters.partition_of(c) == service.counters.partition_of(first))
    other = next(c for c in (f"far-{i}" for i in range(60))
                 if service.counters.partition_of(c) != service.counters.partition_of(first))
    customers = (first, same, other)
    keys = {}
    for customer in customers:
        await fund(service, customer, "10")
        keys[customer] = await new_key(service, customer)

    def asking(customer: str, request_id: str, call: int | None) -> object:
        request = ask(keys[customer][1], request_id=request_id, max_output_tokens=20)
        return request if call is None else replace(request, call_token=f"{customer}-{call}")

    work = [(c, "shared-1", n) for c in customers for n in range(8)] + [(c, "native-1", None) for c in customers]
    decisions = await asyncio.gather(*(service.engine.authorize(asking(c, rid, n)) for c, rid, n in work))
    served: dict[str, list[str]] = {c: [] for c in customers}
    for (customer, request_id, call), d in zip(work, decisions):
        if d.decision == "allow":
            served[customer].append(d.request_id)
        elif call is not None:
            assert d.reason == "request_in_progress", d
        else:
            assert (d.reason, d.error_param) == ("invalid_request", "request_id"), d
    natives = [rid for ids in served.values() for rid in ids if rid == "native-1"]
    assert len(natives) == 1
    for customer in customers:
        gateway = [rid for rid in served[customer] if rid != "native-1"]
        assert len(gateway) == 1 and gateway[0] in ("shared-1", f"shared-1/key:{keys[customer][0]}")
    assert sum(rid == "shared-1" for ids in served.values() for rid in ids) == 1  # one customer holds the id
    for customer in customers:
        held = sum(d.reserved for (c, _, _), d in zip(work, decisions) if c == customer and d.decision == "allow")
        assert await service.counters.wallet(customer) == (10 * 10**9, held)
    charged = {c: 0 for c in customers}
    for customer in customers:
        for request_id in served[customer]:
            charged[customer] += (await service.engine.settle(usage(request_id))).charge
    for customer in customers:
        assert await service.counters.wallet(customer) == (10 * 10**9 - charged[customer], 0)
    assert (await service.admin.audit()).ok


async def test_requests_made_while_closed_ones_are_written_back_keep_what_they_hold(
        service: Service, monkeypatch) -> None:
    """After a loss of the counters the requests closed before it are written back while decisions run (a
    page at a time here, so that they interleave): a request made meanwhile, under a fresh id or naming a
    closed one not yet written back, keeps its reservation (never overwritten by a closed one) and is charged
    once; every closed one written back answers its retries; wallet and limits agree with SQL."""
    from dataclasses import replace

    from policyd import admin as admin_module

    monkeypatch.setattr(admin_module, "RESTORE_PAGE_RECORDS", 16)
    _, secret = await new_key(service)
    await fund(service, "acme", "1000")
    closed = [f"closed-{i}" for i in range(320)]
    for rid in closed:
        await service.engine.authorize(replace(ask(secret, request_id=rid, prompt_bytes=10, max_output_tokens=5),
                                               call_token=f"first-{rid}"))
        await service.engine.settle(usage(rid, input_tokens=10, output_tokens=5))
    await service.writer.drain()
    balance_before, _ = await service.counters.wallet("acme")
    await counters_lost_and_rebuilt(service)  # the closed ones are written back from here on, in the background
    served: list[str] = []
    denied: list[tuple[str, str]] = []
    charges: list[int] = []

    async def client(n: int) -> None:
        for i in range(40):  # a client's retry of a closed request (another call), or a new request
            rid = closed[(n * 40 + i) % len(closed)] if i % 2 else f"fresh-{n}-{i}"
            d = await service.engine.authorize(replace(ask(secret, request_id=rid, prompt_bytes=10, max_output_tokens=5),
                                                       call_token=f"again-{rid}"))
            if d.decision == "deny":
                denied.append((rid, d.reason))
            else:
                served.append(d.request_id)
                settled = await service.engine.settle(usage(d.request_id, input_tokens=10, output_tokens=5))
                assert settled.outcome == "settled"  # its own reservation, whatever was written back meanwhile
                charges.append(settled.charge)
            await asyncio.sleep(0)

    await asyncio.gather(*(client(n) for n in range(8)))
    restored = await service.admin.restored()
    served_again = set(served) & set(closed)
    assert restored == len(closed) - len(served_again)  # written back wherever its id was still free
    fresh = [rid for rid in served if rid not in served_again]
    assert len(fresh) + sum(1 for rid, _ in denied if rid.startswith("fresh-")) == 160
    for rid, reason in denied:  # refused by the key's own limits, or as a closed request once written back
        assert reason in ("rate_limit_exceeded", "budget_exceeded", "concurrency_limit_exceeded") or \
            (reason == "invalid_request" and rid in closed and rid not in served_again), (rid, reason)
    for rid in set(closed) - served_again:  # the others answer their retries as before the loss
        service.counters.forget(rid)
        assert (await service.engine.settle(usage(rid, input_tokens=10, output_tokens=5))).outcome == "exists"
    assert await service.counters.wallet("acme") == (balance_before - sum(charges), 0)
    audit = await service.admin.audit()
    assert audit.ok, audit.mismatches
