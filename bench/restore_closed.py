"""How fast a rebuild of the counters writes back the requests closed before Redis lost its data: closed
usage records in PostgreSQL, written back to a real redis-server as policyd does it after a rebuild (in the
background, decisions running), last closed first.

    python -m bench.restore_closed [--records 100000]

Prints records/s and Redis's memory after; the records are settled requests of one day, as the writer leaves
them (their settle's fingerprint, the facts a closed reservation keeps)."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any


async def _run(records: int) -> dict[str, Any]:
    from policyd.db import UsageRecordRow
    from policyd.server import Service
    from tests.conftest import make_settings
    from tests.servers import PostgresServer, RedisServer

    redis, postgres = RedisServer(), PostgresServer()
    try:
        service = await Service.build(make_settings({"redis_url": redis.url,
                                                     "database_url": postgres.create_database("restore")}))
        await service.start()
        now = int(time.time() * 1000)
        rows = [dict(request_id=f"req-{i:09d}", created_ms=now - 3_600_000 + i, customer_id=f"c{i % 500}",
                     api_key_id=f"k{i % 500}", wallet_id=f"c{i % 500}", plan="pro", endpoint="chat_completions",
                     served_model="gpt-4o-mini", policy_version=1, price_table_version="v1",
                     billing_mode="cost_plus", currency="USD", max_output_tokens=100, choices=1, status="settled",
                     decision="allow", reserved_nanos=1000, charge_nanos=900, balance_before_nanos=10**9,
                     balance_after_nanos=10**9 - 900, settle_fingerprint="f" * 32, closed_ms=now - 1000,
                     updated_ms=now - 1000 + i % 1000, holds=[], tags={},
                     reservation_facts={"input_tokens_estimate": 120, "seconds_estimate": 0,
                                        "audio_tokens_estimate": 0, "call_token": f"call-{i}"})
                for i in range(records)]
        with service.store.session() as session:
            for start in range(0, records, 10_000):
                session.execute(UsageRecordRow.__table__.insert(), rows[start:start + 10_000])
            session.commit()
        await service.counters.client.flushall()
        await service.writer.ensure_groups()
        started = time.perf_counter()
        written = await service.admin._restore_closed()
        seconds = time.perf_counter() - started
        memory = (await service.counters.client.info("memory"))["used_memory"]
        await service.close()
    finally:
        redis.close()
        postgres.close()
    return {"records": records, "written": written, "seconds": round(seconds, 2),
            "records_per_second": round(written / seconds), "redis_bytes_per_record": memory // max(written, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args(argv)
    result = asyncio.run(_run(args.records))
    print("closed requests written back after a loss of the counters (real PostgreSQL -> real redis-server)")
    print(f"  {result['written']:,} of {result['records']:,} records in {result['seconds']} s: "
          f"{result['records_per_second']:,}/s; Redis {result['redis_bytes_per_record']:,} bytes a record after")
    return {"restore_closed": result}


if __name__ == "__main__":
    main()
