"""Seeding at volume: N usage records in PostgreSQL this month so far (the report_volume set: 1,000 customers), then a
policy that gives their plan a month's budget of each customer (and a day's on some models) now: how long
the first pass of bucket_seeds.py takes (the month's records summed by customer, each customer's bucket seeded in
Redis, the seeds kept in SQL: the time ApplyPolicy waits on it), and the second pass (the last seconds' records,
read one by one).

    python -m bench.seeding_volume --records 1000000 [--database-url postgresql+psycopg://...]

Without --database-url it starts a throwaway PostgreSQL (Debian's package) on loopback; Redis is a throwaway
redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from sqlalchemy import text

from bench.report_volume import database, generate
from policyd import bucket_seeds, quotas, redis_keys
from policyd.policy import Policy, canonical_text, parse_policy
from policyd.store import Store

BEFORE = """
currency: USD
price_table:
  version: "bench"
  models:
    gpt-4o: {provider: openai, tier: premium, input: "2.50", output: "10.00"}
    gpt-4o-mini: {provider: openai, tier: low-cost, input: "0.15", output: "0.60"}
    claude-sonnet-4: {provider: anthropic, tier: premium, input: "3.00", output: "15.00"}
    gemini-2.5-flash: {provider: google, tier: low-cost, input: "0.30", output: "2.50"}
plans:
  pro:
    models: ["*"]
LIMITS
"""
LIMITS = """\
    limits:
      - {name: month-budget, scope: customer, window: month, unit: money, limit: "1000.00"}
      - {name: premium-day, scope: customer, window: day, unit: money, models: ["tier:premium"], limit: "50.00"}
"""


def _policy(version: int, limits: str) -> Policy:
    document = parse_policy(BEFORE.replace("LIMITS\n", limits), "bench.yaml")
    return Policy(version, document, canonical_text(document))


async def _run(url: str, redis_url: str, at_ms: int) -> dict:
    import redis.asyncio as aioredis

    from policyd.counters import Counters

    store = Store(url)
    client = aioredis.Redis.from_url(redis_url)
    counters = Counters(client, partitions=16)
    for partition in range(16):  # the gates a rebuild opens
        await client.set(redis_keys.gate(partition), "open")
    seedings = bucket_seeds.policy_seedings(_policy(1, ""), _policy(2, LIMITS), at_ms)
    started = time.perf_counter()
    seeded = await bucket_seeds.seed(counters, store, seedings, at_ms)
    first = time.perf_counter() - started
    started = time.perf_counter()
    added = await bucket_seeds.stragglers(counters, store, seedings, at_ms - 5_000)
    second = time.perf_counter() - started
    await client.aclose()
    store.close()
    return {"first_pass_s": round(first, 2), "buckets_seeded": seeded, "second_pass_ms": round(second * 1000, 1),
            "buckets_added_to": added}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args(argv)
    from tests.servers import RedisServer

    redis_server = RedisServer()
    try:
        with database(args.database_url, "seeding") as url:
            now_ms = int(time.time() * 1000)
            month_start = quotas.window_of("month", now_ms // 1000).start * 1000
            generate(url, args.records, start_ms=month_start, span_ms=now_ms - month_start - 120_000)
            store = Store(url)
            with store.session() as session, session.begin():
                session.execute(text("UPDATE usage_records SET plan = 'pro', policy_version = 1"))
                session.execute(text("ANALYZE usage_records"))
            store.close()
            at_ms = int(time.time() * 1000)  # this month's records, all of them before it (the seeds' windows run)
            result = {"records": args.records, **asyncio.run(_run(url, redis_server.url, at_ms))}
    finally:
        redis_server.close()
    print(f"seeding, a month's budget and a day's on some models given mid-month over {args.records:,} records: "
          f"first pass {result['first_pass_s']} s ({result['buckets_seeded']} buckets seeded), second pass "
          f"{result['second_pass_ms']} ms ({result['buckets_added_to']} added to)")
    print(json.dumps(result))
    return {"seeding_volume": result}


if __name__ == "__main__":
    main()
