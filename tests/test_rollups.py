"""The rollups agree with the reports (the same figures summed from the records), on SQLite and on
PostgreSQL, after new records, after late changes to old ones, and for every dimension."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import delete, update

from policyd import reports, rollups
from policyd.db import RollupCursorRow, UsageRecordRow, UsageRollupRow, migrate
from policyd.store import Store

HOUR = rollups.HOUR_MS
START = 1_795_000_000_000 - 1_795_000_000_000 % rollups.DAY_MS
STATUSES = ("denied", "reserved", "settled", "settled_late", "released", "expired")


def records(rng: random.Random, count: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(count):
        status = rng.choice(STATUSES)
        cost = rng.randrange(0, 10**9)
        out.append({
            "request_id": f"r{offset + i}", "created_ms": START + rng.randrange(0, 3 * 24 * HOUR),
            "customer_id": rng.choice(["a", "b", "c", ""]), "api_key_id": rng.choice(["k1", "k2", "k3"]),
            "feature": rng.choice(["chat", "search", ""]), "served_model": rng.choice(["gpt-4o", "gpt-4o-mini"]),
            "environment": rng.choice(["production", "staging"]),
            "reason": "model_not_allowed" if status == "denied" else rng.choice(["", "", "budget_exceeded"]),
            "decision": "deny" if status == "denied" else rng.choice(["allow", "allow", "downgrade"]),
            "status": status, "input_tokens": rng.randrange(0, 5000), "output_tokens": rng.randrange(0, 2000),
            "cached_input_tokens": 0, "cost_nanos": cost, "charge_nanos": cost * 12 // 10,
            "retries": rng.randrange(0, 2), "fallback_reason": rng.choice(["", "", "cooling"]),
            **{name: rng.choice([0, 0, rng.randrange(1, 3000)]) for name in reports.USAGE_FIGURES},
        })
    return out


def assert_rollups_match_reports(store: Store) -> None:
    since, until = START - rollups.DAY_MS, START + 5 * rollups.DAY_MS
    with store.session() as session:
        for dimension in rollups.DIMENSIONS:
            for period in ("hour", "day"):
                expected = {(r.group[dimension], r.bucket): r.figures for r in
                            reports.usage_report(session, [dimension], since, until, period)}
                got = {(r.group[dimension], r.bucket): r.figures for r in
                       rollups.over_time(session, dimension, period, since, until)}
                assert got == expected, (dimension, period)


def check(store: Store, seed: int) -> None:
    rng = random.Random(seed)
    store.insert_records(records(rng, 300))
    assert rollups.refresh(store) > 0
    assert_rollups_match_reports(store)
    # new records in old and new hours, and late changes to old records (a late settlement, a release)
    store.insert_records(records(rng, 50, offset=1000))
    with store.session() as session, session.begin():
        for row in session.query(UsageRecordRow).filter(UsageRecordRow.status == "reserved").limit(20):
            row.status = rng.choice(["settled_late", "expired"])
            row.charge_nanos += 7
    rollups.refresh(store)
    assert_rollups_match_reports(store)


def test_rollups_match_reports_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    migrate(url)
    store = Store(url)
    try:
        check(store, 1)
    finally:
        store.close()


def test_rollups_match_reports_on_postgresql(postgres_server) -> None:
    url = postgres_server.create_database("rollups")
    migrate(url)
    store = Store(url)
    try:
        check(store, 2)
    finally:
        store.close()


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), batches=st.integers(1, 4))
def test_rollups_match_reports_whatever_the_order_of_writes(tmp_path: Path, seed: int, batches: int) -> None:
    url = f"sqlite:///{tmp_path / f'p{seed}-{batches}.db'}"
    migrate(url)
    store = Store(url)
    try:
        rng = random.Random(seed)
        for b in range(batches):
            store.insert_records(records(rng, rng.randrange(1, 60), offset=b * 100))
            if rng.random() < 0.5:
                rollups.refresh(store)
        rollups.refresh(store)
        assert_rollups_match_reports(store)
    finally:
        store.close()


def test_a_pass_without_a_cursor_rebuilds_everything(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    migrate(url)
    store = Store(url)
    try:
        store.insert_records(records(random.Random(3), 100))
        rollups.refresh(store)
        with store.session() as session, session.begin():
            session.execute(update(UsageRollupRow).values(charge_nanos=0))  # damage
            session.execute(delete(RollupCursorRow))
        rollups.refresh(store)
        assert_rollups_match_reports(store)
    finally:
        store.close()


def test_rollups_made_before_the_usage_figures_are_rebuilt_with_them(tmp_path: Path) -> None:
    """Migration 0019 adds the figures of what providers bill apart; the rollups written before it lack
    them, so it clears the cursor: the next pass sums every hour again, records written before included."""
    url = f"sqlite:///{tmp_path / 'upgrade.db'}"
    migrate(url, "0018")
    store = Store(url)
    try:
        with store.engine.begin() as connection:  # a cursor past everything: no record would be summed again
            connection.execute(RollupCursorRow.__table__.insert().values(name=rollups.CURSOR, written_ms=2**62))
        migrate(url)
        with store.session() as session:
            assert session.get(RollupCursorRow, rollups.CURSOR) is None
        store.insert_records(records(random.Random(7), 200))
        assert rollups.refresh(store) > 0
        assert_rollups_match_reports(store)
        with store.session() as session:
            summed = rollups.top(session, "customer", "day", START - rollups.DAY_MS, START + 5 * rollups.DAY_MS,
                                 "web_searches")
        assert sum(r.figures["web_searches"] for r in summed) > 0
    finally:
        store.close()
