"""Record retention: old usage records, events and delivered alerts deleted, and every figure policyd answers
from SQL unchanged (budgets after a rebuild, expiring credit, invoices, the dashboard's rollups)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import time
from dataclasses import replace

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from policyd import invoices, redis_keys, reports, retention, rollups
from policyd.db import (AlertDeliveryRow, EventRow, LedgerEntryRow, PeriodCloseRow, UsageRecordRow, UsageRollupRow,
                        migrate)
from policyd.domain import PolicydError
from policyd.money import parse_amount
from policyd.quotas import idles_out, remaining_ttl
from policyd.server import Service
from policyd.settings import RETENTION_DAYS_MIN, Settings
from policyd.store import Store
from tests.helpers import ask, counters_lost_and_rebuilt, fund, new_key, usage

HOUR = 3_600_000
DAY = 86_400_000


def _now() -> int:
    return time.time_ns() // 1_000_000


def _rollups(service: Service, since: int, until: int, period: str = "day") -> dict[str, dict]:
    with service.store.session() as session:
        return {d: {r.group[d]: r.figures for r in rollups.top(session, d, period, since, until, "charge_nanos")}
                for d in rollups.DIMENSIONS}


async def _lifetime_bucket(service: Service) -> tuple[str, int]:
    held = await service.admin._held_by_bucket()
    (key,) = [k for k in held if ":customer:acme:money:total:" in k]
    return key, int(await service.counters.client.hget(key, "used") or 0)


async def test_old_records_go_and_budgets_credit_invoices_and_rollups_stay_as_they_were(service: Service) -> None:
    now = _now()
    old = now - 50 * DAY - now % HOUR  # an hour of a month long ended
    clock = [old]
    service.engine.clock = lambda: clock[0]
    key_id, secret = await new_key(service)
    idle_key, idle_secret = await new_key(service)  # used before the horizon alone
    await fund(service, "acme", "20")
    await service.admin.grant_credit("acme", parse_amount("0.05"), "USD", "promo", "trial", expires_ms=now + 30 * DAY)
    budget = parse_amount("0.50")
    await service.admin.set_owner_limits([{"window": "total", "unit": "money", "limit": budget}], "acme")
    charged = 0
    for i in range(6):
        clock[0] = old + i * 60_000
        thread = ("thread-alive", "thread-idle")[i % 2] if i < 4 else ""
        asked = ask(secret, request_id=f"old-{i}", feature=("chat", "search")[i % 2], thread_id=thread)
        d = await service.engine.authorize(replace(asked, thread_budget=budget) if thread else asked)
        assert d.decision == "allow", d
        charged += (await service.engine.settle(usage(f"old-{i}", input_tokens=2000 * (i + 1)))).charge
    clock[0] = old + 10 * 60_000
    assert (await service.engine.authorize(ask(secret, model="no-such-model", request_id="old-denied"))).decision == "deny"
    await service.engine.authorize(ask(idle_secret, request_id="old-idle"))
    charged += (await service.engine.settle(usage("old-idle"))).charge
    await service.engine.authorize(ask(secret, request_id="old-released"))
    await service.engine.release("old-released", "upstream_error")
    await service.engine.authorize(ask(secret, request_id="old-conversation", endpoint="responses"))
    charged += (await service.engine.settle(usage("old-conversation", provider_response_id="conv_kept"))).charge
    clock[0] = now - DAY
    await service.engine.authorize(ask(secret, request_id="new-0"))
    charged += (await service.engine.settle(usage("new-0"))).charge
    clock[0] = now
    await service.writer.drain()
    with service.store.session() as session, session.begin():  # they reached SQL when made (not by the test's clock)
        session.query(LedgerEntryRow).update({"recorded_ms": LedgerEntryRow.created_ms})
    # an alert of long ago delivered, one still waiting for its webhook, a recent one; an admin action of long ago
    with service.store.session() as session, session.begin():
        session.add_all([EventRow(id=f"e-{n}", kind="alert", customer_id="acme", created_ms=at, detail={})
                         for n, at in (("delivered", old), ("waiting", old), ("recent", now - DAY))]
                        + [EventRow(id=f"e-{kind}", kind=kind, created_ms=old, detail={})  # kept whatever their age
                           for kind in ("admin_action", "unwritable", "reconciliation", "key_state")])
        session.add_all([AlertDeliveryRow(event_id="e-delivered", url="http://127.0.0.1:9/", delivered_ms=old + 1),
                         AlertDeliveryRow(event_id="e-waiting", url="http://127.0.0.1:9/", delivered_ms=0)])
    # the idle thread's budget Redis forgot (30 days without a request); the other thread still spends
    idle = [k for k in await service.admin._held_by_bucket() if idles_out(k) and "thread-idle" in k]
    assert idle
    await service.counters.client.delete(*idle)

    period = time.strftime("%Y-%m", time.gmtime(old // 1000))
    invoices = {by: (await service.admin.invoice("acme", period, by)).text for by in ("model", "feature")}
    await rollups_refreshed(service)
    before_rollups = _rollups(service, old - DAY, now + DAY)
    assert _rollups(service, old - DAY, old + DAY, "hour") == _rollups(service, old - DAY, old + DAY)
    bucket, used = await _lifetime_bucket(service)
    assert used == charged
    credit = await service.counters.client.hget(redis_keys.credit_left(service.counters.partition_of("acme"), "acme"),
                                                "trial")
    assert (await service.admin.audit()).ok
    activity = ("requests", "last_used_ms", "denials", "errors", "denials_by_reason")
    reviews = {k: {f: (await service.admin.review_key(k))[f] for f in activity} for k in (key_id, idle_key)}
    assert reviews[idle_key]["last_used_ms"] == old + 10 * 60_000 and reviews[key_id]["denials"] == 1

    done = await retention.prune(service.store, RETENTION_DAYS_MIN, now, service.counters.existing)

    assert done.records == 9 and done.horizon_ms == now - RETENTION_DAYS_MIN * DAY - (now - RETENTION_DAYS_MIN * DAY) % HOUR
    assert done.events == 1 and done.deliveries == 1 and done.periods_closed >= 2
    assert all(service.store.usage_record(f"old-{i}") is None for i in range(6))
    assert service.store.usage_record("old-released") is None and service.store.usage_record("old-idle") is None
    # a key's review counts what it did before the horizon still: an idle key is not "never used"
    assert {k: {f: (await service.admin.review_key(k))[f] for f in activity} for k in (key_id, idle_key)} == reviews
    assert service.store.usage_record("old-conversation") is not None  # whose conversation it is, kept
    assert service.store.usage_record("new-0") is not None
    with service.store.session() as session:
        assert {e.id for e in session.query(EventRow) if e.id.startswith("e-")} == {
            "e-waiting", "e-recent", "e-admin_action", "e-unwritable", "e-reconciliation", "e-key_state"}
        assert [d.event_id for d in session.query(AlertDeliveryRow)] == ["e-waiting"]
    # the month's invoices, both ways, exported as they were (closed from the records before they went)
    for by, text in invoices.items():
        invoice = await service.admin.invoice("acme", period, by)
        assert invoice.closed and invoice.text == text
    # the dashboard's sums, even once the kept record of a deleted hour is written again; the hourly rows of the days
    # wholly before the horizon gone, their days' kept
    assert _rollups(service, old - DAY, now + DAY) == before_rollups
    assert done.rollup_hours > 0 and _rollups(service, old - DAY, old + DAY, "hour") == {
        d: {} for d in rollups.DIMENSIONS}
    with service.store.session() as session, session.begin():
        session.query(UsageRecordRow).filter_by(request_id="old-conversation").update({"updated_ms": _now()})
    await rollups_refreshed(service)
    assert _rollups(service, old - DAY, now + DAY) == before_rollups
    # the lifetime budget, the live thread's and the expiring credit: as they were, in the audit and after a rebuild
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok
    assert await _lifetime_bucket(service) == (bucket, used)
    alive = [k for k in await service.admin._held_by_bucket() if "thread-alive" in k]
    assert alive and int(await service.counters.client.hget(alive[0], "used") or 0) > 0
    carried = service.store.pruned_sums("bucket")
    assert alive[0] in carried and not any("thread-idle" in k for k in carried)  # a forgotten thread's: not kept
    assert await service.counters.client.hget(
        redis_keys.credit_left(service.counters.partition_of("acme"), "acme"), "trial") == credit
    # still enforced: a request that would take the customer past its lifetime budget is refused
    await service.admin.set_owner_limits([{"window": "total", "unit": "money", "limit": used + 1}], "acme")
    d = await service.engine.authorize(ask(secret, request_id="past-budget"))
    assert d.decision == "deny" and d.reason == "budget_exceeded", d
    # a report from before the horizon is refused, naming it; one after it is answered
    with pytest.raises(PolicydError) as refused:
        await service.admin.usage_report(["model"], old, now, "", "acme", False)
    assert refused.value.reason == "invalid_report" and "deleted" in str(refused.value)
    rows = await service.admin.usage_report(["model"], done.horizon_ms, now + 1, "", "acme", False)
    assert sum(r.figures["requests"] for r in rows) >= 1
    _, denial = await service.engine.usage_summary(secret, ["model"], old, now)  # GET /v1/usage: a 400, saying why
    assert denial is not None and denial.http_status == 400 and "deleted" in denial.message, denial
    summed, _ = await service.engine.usage_summary(secret, ["model"], done.horizon_ms, now + 1)
    assert summed is not None and sum(r.counts["requests"] for r in summed[0]) >= 1
    # a second pass finds nothing more
    again = await retention.prune(service.store, RETENTION_DAYS_MIN, now, service.counters.existing)
    assert again.records == 0 and again.periods_closed == 0


async def rollups_refreshed(service: Service) -> None:
    await asyncio.to_thread(rollups.refresh, service.store)


async def test_an_open_request_older_than_the_retention_keeps_its_hour_and_those_after(service: Service) -> None:
    now = _now()
    old = now - 40 * DAY - now % HOUR
    with service.store.session() as session, session.begin():
        session.add_all([UsageRecordRow(request_id=rid, created_ms=at, decision="allow", status=status,
                                        customer_id="acme", updated_ms=at)
                         for rid, at, status in (("older", old - 2 * HOUR, "released"), ("open", old, "reserved"),
                                                 ("after", old + HOUR, "released"))])
    done = await retention.prune(service.store, RETENTION_DAYS_MIN, now, service.counters.existing)
    assert done.records == 1 and done.horizon_ms == old and "still open" in done.held_back
    assert service.store.usage_record("older") is None
    assert service.store.usage_record("open") is not None and service.store.usage_record("after") is not None


async def test_a_backlog_goes_a_few_hours_a_pass_the_horizon_after_the_last_hour_deleted(
        service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retention, "HOURS_PER_PASS", 2)
    now = _now()
    old = now - 40 * DAY - now % HOUR
    with service.store.session() as session, session.begin():
        session.add_all([UsageRecordRow(request_id=f"h{n}", created_ms=old + n * HOUR, decision="allow",
                                        status="released", customer_id="acme", updated_ms=old)
                         for n in range(5)])
    horizons = []
    for _ in range(3):
        done = await retention.prune(service.store, RETENTION_DAYS_MIN, now, service.counters.existing)
        horizons.append((done.hours, done.horizon_ms))
        with service.store.session() as session:
            assert retention.horizon(session) == done.horizon_ms
    target = now - RETENTION_DAYS_MIN * DAY - (now - RETENTION_DAYS_MIN * DAY) % HOUR
    assert horizons == [(2, old + 2 * HOUR), (2, old + 4 * HOUR), (1, target)]
    assert all(service.store.usage_record(f"h{n}") is None for n in range(5))


def test_retention_is_off_or_covers_a_month() -> None:
    assert Settings(record_retention_days=0).record_retention_days == 0
    assert Settings(record_retention_days=RETENTION_DAYS_MIN).record_retention_days == RETENTION_DAYS_MIN
    with pytest.raises(ValidationError, match="at least 35 days"):
        Settings(record_retention_days=7)


# a hypothesis property over the store alone: any records (any status, holds in any bucket, refunds, expiring credit,
# promotional ones, charges reaching the ledger an hour later or days late, across a month's end, their months
# closed or not), deleted at any retention
NOW = 1_796_600_000_000  # 2026-12-07
DAY_BUCKET = "pd:{p0}:b:customer:c1:money:day:"  # the day's its record was made in
BUCKETS = ("pd:{p0}:b:customer:c1:money:total:0", "pd:{p0}:b:customer:c1:requests:total:0",
           "pd:{p1}:b:customer:c2:money:total:0", "pd:{p0}:b:thread_budget:t-alive:money:total:0",
           "pd:{p0}:b:thread_budget:t-gone:money:total:0", "pd:{caps}:b:cap:all:money:total:0", DAY_BUCKET)
_examples = itertools.count()
record_strategy = st.tuples(
    st.integers(0, 70 * 24),  # hours before NOW it was made
    st.sampled_from(("c1", "c2")),
    st.sampled_from(("settled", "settled", "settled_late", "released", "expired", "denied")),
    st.lists(st.tuples(st.sampled_from(BUCKETS), st.integers(0, 5_000)), max_size=3, unique_by=lambda h: h[0]),
    st.integers(0, 5_000),  # its charge
    st.integers(0, 100),  # % of it refunded
    st.integers(0, 3_000),  # credit of the expiring grant it consumed
    st.sampled_from(("", "", "promo")),
    st.sampled_from(("", "", "resp_1", "conv_1")),
    st.sampled_from((0, 0, 0, 3, 20, 45)),  # days late its charge reached the ledger
)
CURRENT_MONTH = time.strftime("%Y-%m", time.gmtime(NOW // 1000))


def _month(ms: int) -> str:
    return time.strftime("%Y-%m", time.gmtime(ms // 1000))


def _fill(store: Any, records: list) -> None:
    with store.session() as session, session.begin():
        for n, (hours, customer, status, holds, charge, refund, credit, mode, response, late) in enumerate(records):
            at = NOW - hours * HOUR - n
            settled = status in ("settled", "settled_late")
            final = [[key + str(at // 1000 - at // 1000 % 86400) if key == DAY_BUCKET else key,
                      "requests" if ":requests:" in key else "money", amount] for key, amount in holds]
            session.add(UsageRecordRow(
                request_id=f"r{n}", created_ms=at, updated_ms=at + HOUR, closed_ms=at + HOUR,
                decision="deny" if status == "denied" else "allow", status=status, customer_id=customer,
                api_key_id=("k1", "k2", "")[n % 3], reason=("budget_exceeded", "unknown_model")[n % 2]
                if status == "denied" else "",
                feature=("chat", "search")[n % 2], served_model=("m1", "m2")[n % 3 % 2], billing_mode=mode,
                holds=final, final_holds=final if settled else [], charge_nanos=charge if settled else 0,
                refunded_nanos=charge * refund // 100 if settled else 0, cost_nanos=charge,
                credit_source={"g1": credit} if settled and credit else {},
                provider_response_id=f"{response}{n}" if response else ""))
            if settled and charge and mode != "promo":
                session.add(LedgerEntryRow(entry_id=f"charge:r{n}", customer_id=customer, wallet_id=customer,
                                           kind="charge", amount_nanos=-charge, currency="USD", request_id=f"r{n}",
                                           source="usage", balance_after_nanos=0, created_ms=at + HOUR,
                                           recorded_ms=min(at + HOUR + late * DAY, NOW - 1)))


def _close_ended_months_early(store: Any) -> None:
    """Every ended month with charges closed an hour after it ended (charges that reached the ledger later are
    adjustments of the month they reached it in)."""
    with store.session() as session, session.begin():
        months = {(c, _month(at)) for c, at in session.query(LedgerEntryRow.customer_id, LedgerEntryRow.created_ms)}
        for customer, period in sorted(months):
            if period < CURRENT_MONTH:
                for by in ("model", "feature"):
                    invoices.close(session, invoices.build(session, customer, period, by),
                                   reports.month_bounds(period)[1] + HOUR)


def _live(key: str) -> bool:
    """A bucket whose window runs at NOW, of a thread Redis still holds."""
    return remaining_ttl(key, NOW // 1000) is not None and "t-gone" not in key


def _figures(store: Any, months: list[tuple[str, str]]) -> dict[str, Any]:
    with store.session() as session:
        return {
            "held": {k: v for k, v in store.held_by_bucket().items() if _live(k) and v},  # none: 0
            "credit": {k: v for k, v in store.credit_consumed().items() if v},
            "keys": {k: store.key_activity(k, NOW - NOW % DAY, 1_796_083_200_000) for k in ("k1", "k2")},  # Dec 1
            "invoices": {(c, p, by): invoices.build(session, c, p, by).text for c, p in months for by in ("model", "feature")},
            "rollups": sorted((r.period, r.start_ms, r.dimension, r.value, r.charge_nanos, r.requests, r.cost_nanos)
                              for r in session.query(UsageRollupRow)),
        }


@pytest.fixture
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A migrated SQLite file, copied for each example."""
    template = tmp_path_factory.mktemp("retention") / "template.db"
    migrate(f"sqlite:///{template}")
    return template


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record_strategy, min_size=1, max_size=25), days=st.integers(RETENTION_DAYS_MIN, 60),
       closed_early=st.booleans())
def test_deleting_records_changes_no_sum_kept_of_them(migrated: Any, records: list, days: int,
                                                      closed_early: bool) -> None:
    """Whatever records there are, deleting those older than the retention changes no bucket's sum (those whose
    window still runs; a thread's Redis still holds), no expiring grant's consumption, no key's review (its
    requests, denials by reason, failures, last use), no invoice (their months
    closed first: those their charges are dated in and those late ones reached the ledger in; one not ended holds
    the deletion back), no rollup; and deletes exactly the closed records made before the horizon, save those that
    made a conversation."""
    path = migrated.with_name(f"example-{next(_examples)}.db")
    shutil.copyfile(migrated, path)
    store = Store(f"sqlite:///{path}")
    try:
        _fill(store, records)
        if closed_early:
            _close_ended_months_early(store)
        rollups.refresh(store)
        with store.session() as session:
            ledger = list(session.query(LedgerEntryRow.request_id, LedgerEntryRow.customer_id,
                                        LedgerEntryRow.created_ms, LedgerEntryRow.recorded_ms))
        months = sorted({(c, _month(at)) for _, c, made, recorded in ledger for at in (made, recorded)})

        async def alive(keys: list[str]) -> set[str]:
            return {k for k in keys if "t-gone" not in k}

        before = _figures(store, months)
        done = asyncio.run(retention.prune(store, days, NOW, alive))
        after = _figures(store, months)
        # the hourly rollups of the days wholly before the horizon go (their days' rows stay, unchanged)
        cut = done.horizon_ms - done.horizon_ms % DAY
        assert not [row for row in after["rollups"] if row[0] == "hour" and row[1] < cut]
        before["rollups"] = [row for row in before["rollups"] if row[0] == "day" or row[1] >= cut]
        assert after == before
        with store.session() as session:
            kept = {rid for (rid,) in session.query(UsageRecordRow.request_id)}
            closed = {(c, p) for c, p in session.query(PeriodCloseRow.customer_id, PeriodCloseRow.period)}
        assert {(c, _month(at)) for rid, c, made, recorded in ledger for at in (made, recorded)
                if rid not in kept} <= closed
        assert all(_live(key) for key in store.pruned_sums("bucket"))  # what is kept of them: running windows' alone
        target = NOW - days * DAY - (NOW - days * DAY) % HOUR
        if done.held_back:  # the next hour to delete has a charge of the month not ended
            assert "has not ended" in done.held_back and done.horizon_ms < target
            assert any(target > made >= done.horizon_ms and CURRENT_MONTH in (_month(at), _month(recorded))
                       for _, _, at, recorded in ledger for made in [at - HOUR])
        else:
            assert done.horizon_ms == target
        for n, (hours, _, status, *_, response, _late) in enumerate(records):
            made = NOW - hours * HOUR - n
            assert (f"r{n}" in kept) == (made >= done.horizon_ms or response == "conv_1"), (n, done)
    finally:
        store.close()


async def test_a_service_told_to_keep_records_35_days_deletes_older_ones_as_it_runs(backend: dict[str, str]) -> None:
    from tests.conftest import make_settings

    now = _now()
    first = await Service.build(make_settings(backend))
    await first.start()
    with first.store.session() as session, session.begin():
        session.add_all([UsageRecordRow(request_id=rid, created_ms=at, updated_ms=at, decision="allow",
                                        status="released", customer_id="acme")
                         for rid, at in (("gone", now - 40 * DAY), ("kept", now - 30 * DAY))])
    await first.close()
    service = await Service.build(make_settings(backend, writer_enabled=True,  # the loops that read SQL run with it
                                                record_retention_days=RETENTION_DAYS_MIN))
    await service.start()
    try:
        for _ in range(200):
            if service.store.usage_record("gone") is None:
                break
            await asyncio.sleep(0.05)
        assert service.store.usage_record("gone") is None and service.store.usage_record("kept") is not None
    finally:
        await service.close()
