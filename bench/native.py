"""Native path: Authorize + Settle pairs per second and latency percentiles over gRPC, against a
no-op grpc.aio servicer measured in the same run as the floor.

    python -m bench.native [--seconds 10] [--concurrency 32] [--redis-url ...] [--database-url ...]

Without URLs it starts a throwaway redis-server and PostgreSQL on loopback (the writer drains to it).
policyd (`policyd serve`) and the floor (bench/noop_servers.py) each run as a process of their own;
the load generator runs in this process, bounded in time, on loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import grpc

from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else 0.0


async def drive(address: str, key: str, seconds: float, concurrency: int, prefix: str) -> dict:
    authorize_ms: list[float] = []
    settle_ms: list[float] = []
    pairs = 0
    deadline = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)

        async def worker(n: int) -> None:
            nonlocal pairs
            i = 0
            while time.perf_counter() < deadline:
                rid = f"{prefix}-{n}-{i}"
                i += 1
                started = time.perf_counter()
                await stub.Authorize(policy_pb2.AuthorizeRequest(
                    api_key=key, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini",
                    attribution=types_pb2.Attribution(request_id=rid, feature="bench"),
                    shape=policy_pb2.RequestShape(prompt_bytes=800, message_count=2, max_output_tokens=200)))
                middle = time.perf_counter()
                await stub.Settle(policy_pb2.SettleRequest(request_id=rid, usage=policy_pb2.Usage(
                    input_tokens=200, output_tokens=150)))
                done = time.perf_counter()
                authorize_ms.append((middle - started) * 1000)
                settle_ms.append((done - middle) * 1000)
                pairs += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {
        "pairs_per_second": round(pairs / elapsed, 1),
        "authorize_ms": {"p50": round(percentile(authorize_ms, 0.5), 3), "p99": round(percentile(authorize_ms, 0.99), 3),
                         "p999": round(percentile(authorize_ms, 0.999), 3)},
        "settle_ms": {"p50": round(percentile(settle_ms, 0.5), 3), "p99": round(percentile(settle_ms, 0.99), 3)},
    }


def floor(seconds: float, concurrency: int) -> dict:
    """The no-op servicer in a process of its own, like policyd."""
    import subprocess
    import sys

    from tests.servers import free_port, wait_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.noop_servers", str(port)],
                               cwd=os.path.join(os.path.dirname(__file__), ".."))
    try:
        wait_port(port)
        return asyncio.run(drive(f"127.0.0.1:{port}", "k", seconds, concurrency, "noop"))
    finally:
        process.terminate()
        process.wait(timeout=10)


def policyd(seconds: float, concurrency: int, redis_url: str, database_url: str, writer: str = "process") -> dict:
    """`policyd serve` in a process of its own (uvloop), the writer draining to PostgreSQL in a `policyd writer`
    process beside it (writer="process", the production shape) or inside serve (writer="inprocess")."""
    from tests.processes import PolicydProcess, WriterProcess

    separate = writer == "process"
    process = PolicydProcess(redis_url, database_url, policy=os.path.join(os.path.dirname(__file__), "policy.yaml"),
                             extra_env={"POLICYD_PARTITIONS": "16", "POLICYD_WRITER_ENABLED": str(not separate).lower()})
    writers = [WriterProcess(redis_url, database_url, extra_env={"POLICYD_PARTITIONS": "16"})] if separate else []
    try:
        with grpc.insecure_channel(process.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id="bench", source="purchase",
                                                           amount=types_pb2.Money(currency="USD", nanos=10**15)))
            key = admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="bench", plan="bench",
                                                             environment="production"))
            result = asyncio.run(drive(process.address, key.secret, seconds, concurrency, "bench"))
            lag_started = time.perf_counter()
            result["audit_ok"] = admin.Audit(admin_pb2.AuditRequest(), timeout=300).ok  # drains the writer first
            result["writer_catch_up_seconds"] = round(time.perf_counter() - lag_started, 2)
        return result
    finally:
        for w in writers:
            w.stop()
        process.stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--writer", choices=["process", "inprocess"], default="process",
                        help="the writer in a `policyd writer` process (default) or inside serve")
    args = parser.parse_args(argv)
    servers = []
    redis_url, database_url = args.redis_url, args.database_url
    if not redis_url or not database_url:
        from tests.servers import PostgresServer, RedisServer

        if not redis_url:
            servers.append(RedisServer())
            redis_url = servers[-1].url
        if not database_url:
            servers.append(PostgresServer())
            database_url = servers[-1].create_database("bench")
    try:
        noop = floor(args.seconds, args.concurrency)
        real = policyd(args.seconds, args.concurrency, redis_url, database_url, args.writer)
    finally:
        for server in servers:
            server.close()
    ratio = real["pairs_per_second"] / noop["pairs_per_second"] if noop["pairs_per_second"] else 0.0
    print(f"native Authorize+Settle ({args.concurrency} concurrent, {args.seconds:.0f} s, {os.cpu_count()} cores, "
          f"writer {'in its own process' if args.writer == 'process' else 'inside serve'})")
    print(f"{'':24} {'pairs/s':>9} {'auth p50':>9} {'auth p99':>9} {'auth p99.9':>11} {'settle p50':>11} {'settle p99':>11}")
    for name, r in (("no-op grpc.aio (floor)", noop), ("policyd (Redis + PG)", real)):
        a, s = r["authorize_ms"], r["settle_ms"]
        print(f"{name:24} {r['pairs_per_second']:>9} {a['p50']:>9} {a['p99']:>9} {a['p999']:>11} {s['p50']:>11} {s['p99']:>11}")
    print(f"ratio to floor: {ratio:.2f}; writer caught up in {real['writer_catch_up_seconds']} s; audit ok: {real['audit_ok']}")
    return {"native": {"floor": noop, "policyd": real, "ratio": round(ratio, 3), "cores": os.cpu_count(),
                       "writer": args.writer, "concurrency": args.concurrency}}


if __name__ == "__main__":
    main()
