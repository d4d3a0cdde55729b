"""The decision's and the writer's own CPU, without gRPC: the servicers called directly in one process
against a real Redis (SQLite for serve's store), then the writer draining the events to a real
PostgreSQL. What a change to the engine, the servicers or the writer costs shows here apart from the
gRPC and event-loop work that is most of serve's CPU under load (and the machine's noise in the
multi-process benchmarks); run it from two checkouts alternately to compare them.

    python -m bench.inprocess [--pairs 16000] [--concurrency 16] [--profile]
    python -m bench.inprocess --checks 16000      # ext_authz's Check of a chat completion instead (Envoy's path)
    PYTHONPATH=/path/to/other/checkout python -m bench.inprocess ...   # the same, for another commit
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
from typing import Any, Awaitable

from policyd_client.v1 import policy_pb2, types_pb2


class _Context:
    """What the servicers read of a gRPC call's context."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass


async def _cpu_seconds(work: Awaitable[Any], profiler: cProfile.Profile | None) -> float:
    """The CPU this process spends until `work` is done (every thread's), profiled when asked."""
    started = time.process_time()
    if profiler:
        profiler.enable()
    await work
    if profiler:
        profiler.disable()
    return time.process_time() - started


def _print_profile(profiler: cProfile.Profile | None) -> None:
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


CHAT_BODY = (b'{"model":"gpt-4o-mini","max_tokens":200,"messages":[{"role":"system","content":"You are a helpful '
             b'assistant."},{"role":"user","content":"' + b"Tell me about the weather in a few words. " * 10 + b'"}]}')


async def measure_checks(checks: int, concurrency: int, profile: bool) -> dict[str, float]:
    """ext_authz's Check of a JSON chat completion, as Envoy sends it: the decision, the reply's headers and
    the metadata the later filters read (the observer's settle is not in it)."""
    from envoy.service.auth.v3 import external_auth_pb2

    from policyd.ext_authz import AuthorizationServicer
    from policyd.server import Service
    from policyd.settings import Settings
    from tests.servers import RedisServer

    redis = RedisServer()
    policy = os.path.join(os.path.dirname(__file__), "policy.yaml")
    try:
        with tempfile.TemporaryDirectory() as workdir:
            settings = Settings(redis_url=redis.url, database_url=f"sqlite:///{workdir}/policyd.db", policy_file=policy,
                                partitions=16, writer_enabled=False)
            service = await Service.build(settings)
            await service.start()
            await service.admin.grant_credit("bench", 10**15, "USD", "purchase")
            key = await service.admin.create_key(label="bench", customer_id="bench", environment="production",
                                                 plan="bench")
            servicer = AuthorizationServicer(service.engine, service.pool)
            run = f"{time.time_ns():x}"

            async def worker(n: int, count: int, prefix: str) -> None:
                for i in range(count):
                    request = external_auth_pb2.CheckRequest()
                    http = request.attributes.request.http
                    http.method, http.path, http.raw_body = "POST", "/v1/chat/completions", CHAT_BODY
                    http.headers.update({"authorization": f"Bearer {key.secret}", "content-type": "application/json",
                                         "x-request-id": f"{prefix}-{run}-{n}-{i}"})
                    answer = await servicer.Check(request, None)
                    assert answer.status.code == 0, answer

            await asyncio.gather(*(worker(n, 50, "warm") for n in range(8)))
            each = max(checks // concurrency, 1)
            profiler = cProfile.Profile() if profile else None
            spent = await _cpu_seconds(asyncio.gather(*(worker(n, each, "check") for n in range(concurrency))), profiler)
            _print_profile(profiler)
            await service.close()
            return {"checks": each * concurrency, "check_cpu_us": round(1e6 * spent / (each * concurrency), 1)}
    finally:
        redis.close()


async def measure(pairs: int, concurrency: int, profile: bool) -> dict[str, float]:
    from policyd.server import Service
    from policyd.servicers import PolicyServicer
    from policyd.settings import Settings
    from tests.servers import PostgresServer, RedisServer

    redis, postgres = RedisServer(), PostgresServer()
    policy = os.path.join(os.path.dirname(__file__), "policy.yaml")
    try:
        database = postgres.create_database("inprocess")
        settings = Settings(redis_url=redis.url, database_url=database, policy_file=policy, partitions=16,
                            writer_enabled=False)
        service = await Service.build(settings)
        await service.start()
        await service.admin.grant_credit("bench", 10**15, "USD", "purchase")
        key = await service.admin.create_key(label="bench", customer_id="bench", environment="production", plan="bench")
        await service.writer.drain()
        servicer, context = PolicyServicer(service.engine), _Context()
        run = f"{time.time_ns():x}"

        async def worker(n: int, count: int, prefix: str) -> None:
            for i in range(count):
                rid = f"{prefix}-{run}-{n}-{i}"
                await servicer.Authorize(policy_pb2.AuthorizeRequest(
                    api_key=key.secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini",
                    attribution=types_pb2.Attribution(request_id=rid, feature="bench"),
                    shape=policy_pb2.RequestShape(prompt_bytes=800, message_count=2, max_output_tokens=200)), context)
                await servicer.Settle(policy_pb2.SettleRequest(request_id=rid, usage=policy_pb2.Usage(
                    input_tokens=200, output_tokens=150)), context)

        await asyncio.gather(*(worker(n, 50, "warm") for n in range(8)))
        await service.writer.drain()
        memory_before = (await service.counters.client.info("memory"))["used_memory"]
        each = max(pairs // concurrency, 1)
        profiler = cProfile.Profile() if profile else None
        decided = await _cpu_seconds(asyncio.gather(*(worker(n, each, "pair") for n in range(concurrency))), profiler)

        async def drain() -> int:  # the writer's work for the same pairs (the SQL in a thread: counted too)
            moved = 0
            while batch := await service.writer.drain_once(claim_idle_ms=0):
                moved += batch
            return moved

        moving = asyncio.ensure_future(drain())
        written = await _cpu_seconds(moving, profiler)
        _print_profile(profiler)
        done = each * concurrency
        # what Redis keeps of each closed request once the writer has drained its events: its reservation
        # (answering retries for closed_request_retention_seconds, what answering them reads) and its request index
        kept = (await service.counters.client.info("memory"))["used_memory"] - memory_before
        await service.close()
        return {"pairs": done, "events_written": moving.result(),
                "decision_cpu_us_a_pair": round(1e6 * decided / done, 1),
                "writer_cpu_us_a_pair": round(1e6 * written / done, 1),
                "redis_bytes_kept_a_pair": round(kept / done)}
    finally:
        redis.close()
        postgres.close()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=16000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--checks", type=int, default=0, help="measure this many ext_authz Checks instead")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions (slows every call)")
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.checks:
        checked = asyncio.run(measure_checks(args.checks, args.concurrency, args.profile))
        print(f"in-process, {checked['checks']} ext_authz Checks of a chat completion ({args.concurrency} concurrent, "
              f"real Redis, {os.cpu_count()} cores): {checked['check_cpu_us']} us of CPU a Check")
        return checked
    result = asyncio.run(measure(args.pairs, args.concurrency, args.profile))
    print(f"in-process, {result['pairs']} Authorize+Settle pairs ({args.concurrency} concurrent, real Redis and "
          f"PostgreSQL, {os.cpu_count()} cores): decision {result['decision_cpu_us_a_pair']} us of CPU a pair, "
          f"writer {result['writer_cpu_us_a_pair']} us a pair ({result['events_written']} events); Redis keeps "
          f"{result['redis_bytes_kept_a_pair']} bytes a closed request")
    return result


if __name__ == "__main__":
    main()
