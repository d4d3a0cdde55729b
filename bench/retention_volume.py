"""Record retention at volume: N usage records in PostgreSQL over two months (the report_volume set, each with its
ledger charge and a hold in its customer's lifetime budget), then one retention pass deleting the first month of
them: records deleted a second, hours a second, the longest hour's transaction (the time decisions' writer may wait
on its lock), the invoice months it closed; then a key review and an audit-style sum of the lifetime buckets.

    python -m bench.retention_volume --records 1000000 [--database-url postgresql+psycopg://...]

Without --database-url it starts a throwaway PostgreSQL (Debian's package) on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from sqlalchemy import text

from bench.report_volume import SPAN_MS, START_MS, database, generate
from policyd import retention
from policyd.store import Store

DAY_MS = 86_400_000


async def _none_alive(keys: list[str]) -> set[str]:
    return set()


def _prepare(url: str) -> None:
    """Each record's charge in the ledger (reaching it when made) and a hold in its customer's lifetime budget."""
    store = Store(url)
    with store.session() as session, session.begin():
        session.execute(text(
            "INSERT INTO ledger_entries (entry_id, customer_id, wallet_id, kind, amount_nanos, currency, request_id, "
            "source, note, balance_after_nanos, created_ms, expires_ms, recorded_ms) SELECT 'charge:' || request_id, "
            "customer_id, customer_id, 'charge', -charge_nanos, 'USD', request_id, 'usage', '', 0, created_ms, 0, "
            "created_ms FROM usage_records"))
        session.execute(text(
            "UPDATE usage_records SET closed_ms = created_ms, final_holds = json_build_array(json_build_array("
            "'pd:{p0}:b:customer:' || customer_id || ':money:total:0', 'money', charge_nanos))"))
        session.execute(text("ANALYZE"))
    store.close()


def run(url: str) -> dict:
    store = Store(url)
    now = START_MS + SPAN_MS // 2 + 35 * DAY_MS  # the first half of the span is past a 35 days' retention
    held_before = sum(store.held_by_bucket().values())
    hours: list[float] = []
    original = retention._prune_hour

    def timed(*args: object) -> None:
        started = time.perf_counter()
        original(*args)  # type: ignore[arg-type]
        hours.append(time.perf_counter() - started)

    retention._prune_hour = timed  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        records = closed = 0
        while True:  # a pass does a week of hours; the service runs them back to back
            done = asyncio.run(retention.prune(store, 35, now, _none_alive))
            records, closed = records + done.records, closed + done.periods_closed
            if done.hours < retention.HOURS_PER_PASS:
                break
        seconds = time.perf_counter() - started
    finally:
        retention._prune_hour = original  # type: ignore[assignment]
    held_after = sum(store.held_by_bucket().values())
    started = time.perf_counter()
    store.key_activity("key_cust42", now - now % DAY_MS, now - 30 * DAY_MS)
    review_ms = (time.perf_counter() - started) * 1000
    store.close()
    return {"records_deleted": records, "seconds": round(seconds, 1),
            "records_per_second": round(records / seconds) if seconds else 0, "hours": len(hours),
            "hour_median_ms": round(sorted(hours)[len(hours) // 2] * 1000, 1) if hours else 0,
            "hour_max_ms": round(max(hours) * 1000, 1) if hours else 0, "periods_closed": closed,
            "lifetime_buckets_unchanged": held_before == held_after, "key_review_ms": round(review_ms, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args(argv)
    with database(args.database_url, "retention") as url:
        generate(url, args.records)
        _prepare(url)
        result = {"records": args.records, **run(url)}
        print(f"retention, half of {args.records:,} records past it: {result['records_deleted']:,} deleted in "
              f"{result['seconds']} s ({result['records_per_second']:,}/s; {result['hours']} hours, median "
              f"{result['hour_median_ms']} ms, longest {result['hour_max_ms']} ms; {result['periods_closed']} invoice "
              f"months closed); lifetime budgets unchanged: {result['lifetime_buckets_unchanged']}; a key's review "
              f"after: {result['key_review_ms']} ms")
        print(json.dumps(result))
        return {"retention_volume": result}


if __name__ == "__main__":
    main()
