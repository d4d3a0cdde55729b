"""The durable store's bulk paths on a real PostgreSQL: records inserted by COPY read back as an INSERT
would have written them, and a record that exists is refused as an INSERT refuses it."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from policyd.db import UsageRecordRow, migrate
from policyd.store import Store


def test_copied_records_take_the_defaults_an_insert_gives_and_refuse_duplicates(postgres_server) -> None:
    url = postgres_server.create_database("store_copy")
    migrate(url)
    store = Store(url)
    try:
        full = {"request_id": "r-full", "created_ms": 5, "decision": "allow", "status": "settled",
                "customer_id": "c\t1\n", "tags": {"team": "a\\b", "note": "quote \" and tab \t"},
                "shadow_denials": ["x"], "balance_before_nanos": None, "charge_nanos": 2**62,
                "stream_interrupted": True, "message": "ünïcode ✓"}
        sparse = {"request_id": "r-sparse", "created_ms": 6, "decision": "deny", "status": "denied"}
        with store.session() as session, session.begin():
            store.insert_new(session, UsageRecordRow, [full, sparse])
        with store.session() as session:
            got = {r.request_id: r for r in session.query(UsageRecordRow)}
        row = got["r-full"]
        assert (row.customer_id, row.tags, row.shadow_denials, row.charge_nanos, row.stream_interrupted, row.message) \
            == ("c\t1\n", {"team": "a\\b", "note": "quote \" and tab \t"}, ["x"], 2**62, True, "ünïcode ✓")
        assert row.balance_before_nanos is None and row.updated_ms > 0
        empty = got["r-sparse"]  # what a row leaves out takes the model's defaults
        assert (empty.tags, empty.holds, empty.claimed, empty.credit_source, empty.reason, empty.cost_nanos,
                empty.stream_interrupted, empty.balance_after_nanos) == ({}, [], {}, {}, "", 0, False, None)
        assert empty.updated_ms > 0
        with pytest.raises(IntegrityError):  # the writer's signal that another writer was first
            with store.session() as session, session.begin():
                store.insert_new(session, UsageRecordRow, [dict(sparse, status="settled")])
        with store.session() as session:  # and nothing of the refused batch was written
            assert session.get(UsageRecordRow, "r-sparse").status == "denied"
    finally:
        store.close()
