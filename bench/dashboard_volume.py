"""The dashboard at volume: N usage records in PostgreSQL (the report_volume set), then the time of
the first rollup pass (once, at upgrade), of a pass after new traffic, and of each dashboard page's
data for a month (overview by customer, a customer page, incidents over a week) through the same
code the pages run.

    python -m bench.dashboard_volume --records 10000000 [--database-url postgresql+psycopg://...]

Without --database-url it starts a throwaway PostgreSQL (Debian's package) on loopback and loads
the records; with one, records already there are used as they are (--records 0 loads none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from bench.report_volume import database, generate
from policyd import rollups
from policyd.dashboard_data import DashboardData
from policyd.server import Service
from policyd.settings import Settings


def _median_ms(runs: list[float]) -> float:
    return round(statistics.median(runs) * 1000, 1)


async def _pages(url: str, runs: int) -> dict[str, float]:
    service = await Service.build(Settings(database_url=url, redis_url="", writer_enabled=False))
    await service.start()
    try:
        data = DashboardData(service.admin)
        timings: dict[str, list[float]] = {"overview_30d_ms": [], "customer_ms": [], "incidents_7d_ms": []}
        for _ in range(runs):
            for name, page in (("overview_30d_ms", lambda: data.overview(30, "customer", "charge")),
                               ("customer_ms", lambda: data.customer("cust42")),
                               ("incidents_7d_ms", lambda: data.incidents(168))):
                started = time.perf_counter()
                await page()
                timings[name].append(time.perf_counter() - started)
        return {name: _median_ms(values) for name, values in timings.items()}
    finally:
        await service.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with database(args.database_url, "dashboard") as url:
        if args.records:
            generate(url, args.records)
        from policyd.store import Store

        store = Store(url)
        started = time.perf_counter()
        hours = rollups.refresh(store)
        first = time.perf_counter() - started
        started = time.perf_counter()
        rollups.refresh(store)
        steady = time.perf_counter() - started
        store.close()
        result = {"first_pass_s": round(first, 1), "first_pass_hours": hours, "steady_pass_ms": round(steady * 1000, 1),
                  **asyncio.run(_pages(url, args.runs))}
        loaded = f"{args.records:,}" if args.records else "existing"
        print(f"dashboard at volume ({loaded} records): first rollup pass {result['first_pass_s']} s "
              f"({hours} hours), a later pass {result['steady_pass_ms']} ms; page data, median of {args.runs}: "
              f"overview 30 days {result['overview_30d_ms']} ms, customer {result['customer_ms']} ms, "
              f"incidents 7 days {result['incidents_7d_ms']} ms")
        print(json.dumps(result))
        return {"dashboard_volume": result}


if __name__ == "__main__":
    main()
