"""The durable store's bulk paths on a real PostgreSQL: records inserted by COPY read back as an INSERT
would have written them, and a record that exists is refused as an INSERT refuses it."""

from __future__ import annotations

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError

from policyd.db import EventRow, LedgerEntryRow, UsageRecordRow, migrate
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


def test_rows_inserted_ignoring_existing_ones_read_back_whole_and_skip_repeats(postgres_server) -> None:
    """insert_ignore on PostgreSQL (one statement a batch): values exact, defaults as an INSERT gives them,
    a row whose key exists (in the table or earlier in the batch) skipped, the rest written."""
    url = postgres_server.create_database("store_ignore")
    migrate(url)
    store = Store(url)
    try:
        charge = {"entry_id": "charge:r1", "customer_id": "c1", "wallet_id": "c1", "kind": "charge",
                  "amount_nanos": -(2**62), "currency": "USD", "request_id": "r1", "source": "usage",
                  "note": "ünïcode ✓ \"quoted\" \t tab", "balance_after_nanos": 2**63 - 1, "created_ms": 7}
        sparse = {"entry_id": "grant:g1", "customer_id": "c1", "kind": "grant", "amount_nanos": 5,
                  "currency": "EUR", "balance_after_nanos": 5, "created_ms": 8}
        with store.session() as session, session.begin():
            store.insert_ignore(session, LedgerEntryRow, [charge, sparse])
        with store.session() as session, session.begin():  # a replay beside a new row, repeated in the batch
            store.insert_ignore(session, LedgerEntryRow, [dict(charge, amount_nanos=1), dict(sparse, note="new", entry_id="grant:g2"),
                                                          dict(sparse, note="again", entry_id="grant:g2")])
            store.insert_ignore(session, EventRow, [{"id": "0-1", "kind": "alert", "detail": {"a": [1, {"b": None}]},
                                                     "created_ms": 9}, {"id": "0-2", "kind": "rejected", "created_ms": 10}])
        with store.session() as session:
            ledger = {r.entry_id: r for r in session.query(LedgerEntryRow)}
            events = {r.id: r for r in session.query(EventRow)}
        assert sorted(ledger) == ["charge:r1", "grant:g1", "grant:g2"]
        row = ledger["charge:r1"]  # the replay changed nothing
        assert (row.amount_nanos, row.balance_after_nanos, row.note) == (-(2**62), 2**63 - 1, charge["note"])
        assert (ledger["grant:g1"].wallet_id, ledger["grant:g1"].request_id, ledger["grant:g1"].note,
                ledger["grant:g1"].expires_ms) == ("", "", "", 0)  # the defaults an INSERT gives
        assert ledger["grant:g2"].note == "new"  # the first of the batch's repeats
        assert events["0-1"].detail == {"a": [1, {"b": None}]} and events["0-2"].detail == {}
        assert (events["0-2"].request_id, events["0-2"].customer_id) == ("", "")
        with pytest.raises(DBAPIError):  # text PostgreSQL cannot hold: the whole batch refused, as SQL data
            with store.session() as session, session.begin():
                store.insert_ignore(session, EventRow, [{"id": "0-3", "kind": "alert", "created_ms": 1},
                                                        {"id": "0-4", "kind": "alert", "created_ms": 1,
                                                         "request_id": "nul\x00"}])
        with store.session() as session:
            assert session.get(EventRow, "0-3") is None
    finally:
        store.close()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_an_end_users_records_in_a_window_are_read_by_its_own_index(postgres_server, tmp_path, database) -> None:
    """What an end user's limit set mid-window starts from (Store.use_in_window) is read through the index on
    (customer, end user, created): the end user's records, not a scan of its customer's in the window; the sums are
    the records'."""
    from sqlalchemy import text

    from policyd.store import use_in_window_query

    url = postgres_server.create_database("store_end_users") if database == "postgresql" else \
        f"sqlite:///{tmp_path / 'store.db'}"
    migrate(url)
    store = Store(url)
    try:
        rows = [{"request_id": f"r{n}", "created_ms": 1_000 + n, "decision": "allow", "status": "settled",
                 "customer_id": "shop" if n % 10 else "other", "end_user_id": f"user-{n % 200}",
                 "charge_nanos": 7} for n in range(4000)]
        with store.session() as session, session.begin():
            store.insert_new(session, UsageRecordRow, rows)
        with store.session() as session:
            if database == "postgresql":
                session.execute(text("ANALYZE usage_records"))

            def plan(scope: str, owner: str) -> str:
                query = use_in_window_query(scope, "money", 0, 10_000, customer_id="shop", owner_id=owner)
                compiled = query.compile(session.get_bind(), compile_kwargs={"literal_binds": True})
                explain = "EXPLAIN" if database == "postgresql" else "EXPLAIN QUERY PLAN"
                return " ".join(str(line) for line in session.execute(text(f"{explain} {compiled}")))

            assert "ix_usage_customer_end_user_created" in plan("end_user", "user-3")
        assert store.use_in_window("end_user", "money", 0, 10_000, customer_id="shop", owner_id="user-3") == \
            {("shop", "user-3", "", ""): 7 * 20}
        assert store.use_in_window("customer", "requests", 0, 10_000, customer_id="shop", owner_id="shop") == \
            {("shop", "shop", "", ""): 3600}
    finally:
        store.close()
