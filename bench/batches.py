"""What holding a batch costs: its requests read (an OpenAI input file's JSON lines, each understood as the
gateway understands the request alone), then held (each request's worst case at the batch tier, summed, on a
thread), against a real redis-server; and how late the event loop the other decisions wait on runs meanwhile
(both are done on threads).

    python -m bench.batches [--requests 50000]

Prints the time to read and to hold the batch, per thousand requests, and the event loop's longest lag."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from typing import Any


async def _run(count: int) -> dict[str, Any]:
    from dataclasses import replace

    from policyd.batches import batch_shape, read_requests
    from policyd.runtime import settle_in
    from policyd.server import Service
    from tests.conftest import SAMPLE_POLICY, make_settings
    from tests.helpers import ask, fund, new_key
    from tests.servers import RedisServer

    redis, sql = RedisServer(), tempfile.mkdtemp(prefix="policyd-bench-batches-")
    try:
        service = await Service.build(make_settings({"redis_url": redis.url,
                                                     "database_url": f"sqlite:///{sql}/policyd.db"}))
        await service.start()
        settle_in()  # as a serve process runs: threads switch every half millisecond
        await service.admin.apply_policy(SAMPLE_POLICY.replace('      output: "0.60"\n', '      output: "0.60"\n'
                                         '      service_tiers: {batch: {input: "0.075", output: "0.30"}}\n', 1), "b.yaml")
        _, secret = await new_key(service, customer="bench-batch")
        await fund(service, "bench-batch", "1000000")
        content = b"\n".join(json.dumps({
            "custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "max_tokens": 200 + i % 300, "messages": [
                {"role": "system", "content": "You label support tickets."},
                {"role": "user", "content": f"Ticket {i}: my invoice shows a charge I do not recognise " * 3}]}}).encode()
            for i in range(count))
        lags: list[float] = []

        async def watch(stop: asyncio.Event) -> None:  # what another decision waits for the loop
            while not stop.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - before - 0.001)

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        started = time.perf_counter()
        found = await asyncio.to_thread(read_requests, "/v1/chat/completions", content)
        read = time.perf_counter() - started
        assert not found.problem, found.problem
        started = time.perf_counter()
        decision = await service.engine.authorize(replace(ask(secret, request_id="bench-batch"), model=found.model,
                                                          shape=batch_shape(found.requests), batch=found.requests))
        held = time.perf_counter() - started
        stop.set()
        await watcher
        assert decision.allowed, decision.reason
        await service.close()
        return {"requests": count, "file_mb": round(len(content) / 1e6, 1), "read_s": round(read, 2),
                "hold_s": round(held, 2), "read_ms_per_1000": round(read / count * 1e6, 1),
                "hold_ms_per_1000": round(held / count * 1e6, 1),
                "loop_lag_max_ms": round(max(lags, default=0) * 1000, 1)}
    finally:
        redis.close()
        shutil.rmtree(sql, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    result = asyncio.run(_run(parser.parse_args().requests))
    print(f"a batch of {result['requests']} requests ({result['file_mb']} MB): read in {result['read_s']} s "
          f"({result['read_ms_per_1000']} ms a thousand), held in {result['hold_s']} s "
          f"({result['hold_ms_per_1000']} ms a thousand); the event loop's longest lag meanwhile "
          f"{result['loop_lag_max_ms']} ms")


if __name__ == "__main__":
    main()
