"""End users with limits of their own (SetOwnerLimits with end_user_id): what a change of one end user's costs as
its customer gives more of them limits, and what a decision naming one costs beside a decision naming none. In
process, against a throwaway redis-server and PostgreSQL on loopback.

    python -m bench.end_users [--end-users 2000] [--keys 20] [--pairs 4000] [--records 0]

With --records N, N records of the customer's end users made today are in SQL first: a limit given an end user
mid-day starts from that end user's (Admin._seeded).
    PYTHONPATH=/path/to/other/checkout python -m bench.end_users ...   # the same, for another commit
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from typing import Any

from bench.inprocess import _cpu_seconds
from bench.report_volume import generate

DAY = [{"window": "day", "unit": "requests", "limit": 1_000_000}]


async def measure(end_users: int, keys: int, pairs: int, records: int = 0) -> dict[str, Any]:
    from policyd.server import Service
    from policyd.settings import Settings
    from tests.helpers import ask, usage
    from tests.servers import PostgresServer, RedisServer

    redis, postgres = RedisServer(), PostgresServer()
    try:
        database = postgres.create_database("end_users")
        settings = Settings(redis_url=redis.url, database_url=database,
                            policy_file=os.path.join(os.path.dirname(__file__), "policy.yaml"), partitions=16,
                            writer_enabled=False)
        service = await Service.build(settings)
        await service.start()
        await service.admin.grant_credit("bench", 10**15, "USD", "purchase")
        made = [await service.admin.create_key(label="bench", customer_id="bench", environment="production",
                                               plan="bench") for _ in range(keys)]
        if records:
            now_ms = int(time.time() * 1000)
            since = max(now_ms - now_ms % 86_400_000, now_ms - 3_600_000)  # today's, UTC's day as the limit's
            generate(database, records, customer="bench", end_users=end_users, start_ms=since,
                     span_ms=max(now_ms - since, 1))
        took = []  # seconds each change took, in the order made
        for n in range(end_users):
            started = time.perf_counter()
            await service.admin.set_owner_limits(DAY, "bench", end_user_id=f"user-{n:07d}")
            took.append(time.perf_counter() - started)
        tenth = max(end_users // 10, 1)
        started = time.perf_counter()
        await service.admin.set_owner_limits([{**DAY[0], "limit": 999_999}], "bench", end_user_id="user-0000000")
        changed = time.perf_counter() - started
        run = f"{time.time_ns():x}"

        async def worker(n: int, count: int, named: bool, prefix: str = "pair") -> None:
            for i in range(count):
                rid = f"{prefix}-{run}-{named}-{n}-{i}"
                end_user = f"user-{(n * count + i) % end_users:07d}" if named else ""
                decision = await service.engine.authorize(ask(made[i % keys].secret, request_id=rid,
                                                              end_user_id=end_user))
                assert decision.decision == "allow", decision
                await service.engine.settle(usage(rid))

        await asyncio.gather(*(worker(n, end_users // 8 + 1, True, "warm") for n in range(8)))  # each end user read once
        each = max(pairs // 16, 1)
        results = {"end_users": end_users, "keys": keys, "records": records,
                   "change_first_tenth_ms": round(1e3 * statistics.median(took[:tenth]), 2),
                   "change_last_tenth_ms": round(1e3 * statistics.median(took[-tenth:]), 2),
                   "change_of_the_first_ms": round(1e3 * changed, 2)}
        for named in (False, True):
            spent = await _cpu_seconds(asyncio.gather(*(worker(n, each, named) for n in range(16))), None)
            results["pair_cpu_us_" + ("naming_one" if named else "naming_none")] = round(1e6 * spent / (16 * each), 1)
        await service.close()
        return results
    finally:
        redis.close()
        postgres.close()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--end-users", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--records", type=int, default=0, help="the customer's records made today, in SQL first")
    args = parser.parse_args(argv)
    results = asyncio.run(measure(args.end_users, args.keys, args.pairs, args.records))
    print(f"{results['end_users']} end users with limits of their own, {results['keys']} keys of their customer, "
          f"{results['records']} records of theirs today "
          f"(real Redis and PostgreSQL, {os.cpu_count()} cores): a change of one end user's took "
          f"{results['change_first_tenth_ms']} ms (median, the first tenth) and {results['change_last_tenth_ms']} ms "
          f"(the last tenth), {results['change_of_the_first_ms']} ms for the first's again; Authorize+Settle "
          f"{results['pair_cpu_us_naming_none']} us of CPU a pair naming no end user, "
          f"{results['pair_cpu_us_naming_one']} us naming one")
    return results


if __name__ == "__main__":
    main()
