"""Reports at volume: generate N usage records in PostgreSQL, then time a month's report for one
customer (grouped by feature and model, daily buckets) through the same code the AdminService runs.

    python -m bench.report_volume --records 10000000 [--database-url postgresql+psycopg://...]

Without --database-url it starts a throwaway PostgreSQL (Debian's package) on loopback.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import time
from contextlib import contextmanager
from typing import Iterator

from policyd.db import migrate
from policyd.reports import month_bounds, usage_report
from policyd.store import Store

CUSTOMERS = 1000
FEATURES = ["chat", "search", "summarize", "agent", "embed"]
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "gemini-2.5-flash"]
START_MS = 1_790_812_800_000  # 2026-10-01
SPAN_MS = 61 * 86_400_000


@contextmanager
def database(url: str, name: str) -> Iterator[str]:
    """The database a volume run uses: the one named (`--database-url`), or one of a throwaway PostgreSQL (Debian's
    package) on loopback, stopped after; migrated."""
    server = None
    if not url:
        from tests.servers import PostgresServer

        server = PostgresServer()
        url = server.create_database(name)
    try:
        migrate(url)
        yield url
    finally:
        if server is not None:
            server.close()


def generate(url: str, records: int, seed: int = 11, *, customer: str = "", end_users: int = 0,
             start_ms: int = START_MS, span_ms: int = SPAN_MS) -> None:
    """N records by COPY, in time order over [start_ms, start_ms + span_ms): of CUSTOMERS customers, or of one
    (`customer`); naming one of `end_users` end users each ("user-0000042"), when given."""
    import psycopg

    rng = random.Random(seed)
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    from sqlalchemy import JSON, Boolean, String, Text

    from policyd.db import UsageRecordRow

    given = ("request_id", "created_ms", "customer_id", "api_key_id", "feature", "thread_id", "served_model",
             "requested_model", "provider", "decision", "status", "input_tokens", "output_tokens", "cost_nanos",
             "charge_nanos", "end_user_id")
    rest = []
    for column in UsageRecordRow.__table__.columns:
        if column.name in given:
            continue
        if column.nullable:
            value = "\\N"
        elif isinstance(column.type, JSON):
            value = "{}" if column.name in ("claimed", "tags", "credit_source") else "[]"
        elif isinstance(column.type, Boolean):
            value = "f"
        elif isinstance(column.type, (String, Text)):
            value = ""
        else:
            value = "0"
        rest.append((column.name, value))
    columns = given + tuple(name for name, _ in rest)
    tail = "\t".join(value for _, value in rest)
    with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
        done = 0
        while done < records:
            chunk = min(200_000, records - done)
            buffer = io.StringIO()
            for i in range(done, done + chunk):
                owner = customer or f"cust{rng.randrange(CUSTOMERS)}"
                cost = rng.randrange(1_000, 5_000_000)
                # records arrive in time order (the writer appends them as decisions happen), a minute of jitter
                created = start_ms + (i * span_ms) // records + rng.randrange(min(60_000, span_ms))
                buffer.write("\t".join(map(str, (
                    f"r{seed}-{i}", created, owner, f"key_{owner}", rng.choice(FEATURES),
                    f"t{rng.randrange(100000)}", rng.choice(MODELS), rng.choice(MODELS), "openai", "allow", "settled",
                    rng.randrange(10, 5000), rng.randrange(1, 2000), cost, cost * 12 // 10,
                    f"user-{rng.randrange(end_users):07d}" if end_users else ""))) + "\t" + tail + "\n")
            buffer.seek(0)
            with cursor.copy(f"COPY usage_records ({', '.join(columns)}) FROM STDIN") as copy:
                copy.write(buffer.read())
            done += chunk
        cursor.execute("ANALYZE usage_records")
        connection.commit()


def time_report(url: str, runs: int = 5) -> dict:
    store = Store(url)
    since, until = month_bounds("2026-10")
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        with store.session() as session:
            rows = usage_report(session, ["feature", "model"], since, until, "day", "cust42")
        timings.append((time.perf_counter() - started) * 1000)
    store.close()
    return {"rows": len(rows), "median_ms": round(statistics.median(timings), 1), "max_ms": round(max(timings), 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args(argv)
    with database(args.database_url, "volume") as url:
        started = time.perf_counter()
        generate(url, args.records)
        loaded = time.perf_counter() - started
        result = {"records": args.records, "load_seconds": round(loaded, 1), **time_report(url)}
        print(f"usage report, one customer, one month (of {args.records:,} records): "
              f"median {result['median_ms']} ms, max {result['max_ms']} ms ({result['rows']} rows; "
              f"loaded in {result['load_seconds']} s)")
        print(json.dumps(result))
        return {"report_volume": result}


if __name__ == "__main__":
    main()
