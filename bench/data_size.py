"""How cost grows with data: Authorize latency with 1 thousand vs 1 million keys, and with few vs 10
million usage records in PostgreSQL; and the resident memory of `policyd serve` at rest and after load.

    python -m bench.data_size [--keys 1000000] [--records-database-url postgresql+psycopg://.../ordered]

Keys are written the way policyd writes them (rows in api_keys, their state in Redis), in bulk, then
asked for at random: most of the million are used for the first time (the key's identity is read from
SQL once, then kept in memory), so both the cold and the warm path are in the figures. Records: with
--records-database-url (a database loaded by `python -m bench.report_volume --records 10000000`),
Authorize runs against it and against an empty one; Authorize reads no SQL, so it should not move.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import random
import statistics
import time
from typing import Any

import grpc

from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2

HERE = os.path.dirname(os.path.abspath(__file__))
CUSTOMERS = 1000


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def load_keys(database_url: str, redis_url: str, count: int, partitions: int) -> list[str]:
    """`count` keys of CUSTOMERS customers on plan bench: rows by COPY, states by pipelined HSET."""
    import psycopg
    import redis

    from policyd import redis_keys

    rng = random.Random(7)
    secrets, rows = [], io.StringIO()
    now = int(time.time() * 1000)
    for i in range(count):
        secret = "pdk_live_" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
                                       for _ in range(40))
        secrets.append(secret)
        digest = hashlib.sha256(secret.encode()).hexdigest()
        customer = f"c{i % CUSTOMERS}"
        rows.write("\t".join((f"key_b{i:015x}", "", secret[:12], digest, "\\N", "0", customer, "", "", "",
                              "production", "bench", "[]", "active", str(now), "0", "0")) + "\n")
    dsn = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as connection, connection.cursor() as cursor:
        with cursor.copy("COPY api_keys (id, label, prefix, secret_hash, previous_secret_hash, previous_expires_ms, "
                         "customer_id, workspace_id, project_id, team_id, environment, plan, scopes, status, "
                         "created_ms, rotated_ms, status_changed_ms) FROM STDIN") as copy:
            copy.write(rows.getvalue())
        cursor.execute("ANALYZE api_keys")
    client = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=False)
    for i, secret in enumerate(secrets):
        customer = f"c{i % CUSTOMERS}"
        partition = redis_keys.partition_of(customer, partitions)
        pipe.hset(redis_keys.key_state(partition, f"key_b{i:015x}"),
                  mapping={"status": "active", "h:" + hashlib.sha256(secret.encode()).hexdigest(): "0"})
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    client.close()
    return secrets


def _p50_p99(timings: list[float]) -> tuple[float, float]:
    timings = sorted(timings)
    return round(statistics.median(timings), 3), round(timings[int(len(timings) * 0.99)], 3)


async def authorize_latency(address: str, secrets: list[str], requests: int, prefix: str) -> dict[str, float]:
    """Authorize latency over `requests` keys drawn at random; a key's first use in the process (its identity
    read from SQL) and its later uses (from memory) are also reported apart, so that sizes compare like
    with like: with a thousand keys most requests reuse a key, with a million most are a first use."""
    rng = random.Random(11)
    timings = []
    first_use: list[float] = []
    used: set[str] = set()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        for i in range(requests):
            secret = rng.choice(secrets)
            started = time.perf_counter()
            d = await stub.Authorize(policy_pb2.AuthorizeRequest(
                api_key=secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini",
                attribution=types_pb2.Attribution(request_id=f"{prefix}-{i}"),
                shape=policy_pb2.RequestShape(prompt_bytes=800, max_output_tokens=100)))
            timings.append((time.perf_counter() - started) * 1000)
            if secret not in used:
                first_use.append(timings[-1])
                used.add(secret)
            assert d.decision == policy_pb2.ALLOW, d.reason
            await stub.Settle(policy_pb2.SettleRequest(request_id=f"{prefix}-{i}", usage=policy_pb2.Usage(
                input_tokens=200, output_tokens=50)))
    p50, p99 = _p50_p99(timings)
    out = {"authorize_p50_ms": p50, "authorize_p99_ms": p99, "first_uses": len(first_use)}
    if first_use:
        out["first_use_p50_ms"], out["first_use_p99_ms"] = _p50_p99(first_use)
    return out


def with_policyd(redis_url: str, database_url: str, run: Any) -> dict[str, Any]:
    from tests.processes import PolicydProcess

    process = PolicydProcess(redis_url, database_url, policy=os.path.join(HERE, "policy.yaml"),
                             extra_env={"POLICYD_PARTITIONS": "16"})
    try:
        with grpc.insecure_channel(process.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            for c in range(CUSTOMERS):
                admin.GrantCredit(admin_pb2.GrantCreditRequest(
                    customer_id=f"c{c}", source="purchase", grant_id=f"bench-{c}",
                    amount=types_pb2.Money(currency="USD", nanos=10**13)))
            result = {"rss_at_rest_mb": rss_mb(process.process.pid)}
            result.update(run(process, admin))
            result["rss_after_load_mb"] = rss_mb(process.process.pid)
        return result
    finally:
        process.stop()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--records-database-url", default="")
    args = parser.parse_args(argv)
    from tests.servers import PostgresServer, RedisServer

    results: dict[str, Any] = {"cores": os.cpu_count()}
    postgres = PostgresServer()
    try:
        for count in sorted({1_000, args.keys}):  # --keys 1000 measures one size
            redis = RedisServer()
            try:
                database = postgres.create_database(f"keys{count}")

                def run(process: Any, admin: Any, count: int = count, redis_url: str = redis.url,
                        database: str = database) -> dict[str, Any]:
                    started = time.perf_counter()
                    secrets = load_keys(database, redis_url, count, 16)
                    loaded = time.perf_counter() - started
                    out = asyncio.run(authorize_latency(process.address, secrets, args.requests, f"k{count}"))
                    warm = asyncio.run(authorize_latency(process.address, secrets[:200], args.requests, f"w{count}"))
                    return {"keys": count, "load_seconds": round(loaded, 1), "random_keys": out, "hot_200_keys": warm}

                results[f"keys_{count}"] = with_policyd(redis.url, database, run)
            finally:
                redis.close()
        databases = [("records_few", postgres.create_database("records_few"))]
        if args.records_database_url:
            databases.append(("records_loaded", args.records_database_url))
        for name, database in databases:
            redis = RedisServer()
            try:
                def run(process: Any, admin: Any, name: str = name) -> dict[str, Any]:
                    secret = admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="c1", plan="bench",
                                                                        environment="production")).secret
                    report = admin.UsageReport(admin_pb2.UsageReportRequest(group_by=[], since_unix_ms=0,
                                                                            until_unix_ms=2**62))
                    records = int(report.rows[0].figures["requests"]) if report.rows else 0
                    return {"records": records, **asyncio.run(authorize_latency(process.address, [secret],
                                                                                  args.requests, name))}

                results[name] = with_policyd(redis.url, database, run)
            finally:
                redis.close()
    finally:
        postgres.close()

    print(f"data size ({os.cpu_count()} cores; Authorize one at a time, with its Settle)")
    for name, r in results.items():
        if name == "cores":
            continue
        if name.startswith("keys_"):
            rk = r["random_keys"]
            print(f"  {r['keys']:>10,} keys: random keys p50 {rk['authorize_p50_ms']} ms p99 {rk['authorize_p99_ms']} ms "
                  f"(a key's first use, {rk['first_uses']} of them: p50 {rk.get('first_use_p50_ms')} ms); "
                  f"200 hot keys p50 {r['hot_200_keys']['authorize_p50_ms']} ms; "
                  f"RSS {r['rss_at_rest_mb']} MB at rest, {r['rss_after_load_mb']} MB after")
        else:
            print(f"  {r['records']:>10,} records: p50 {r['authorize_p50_ms']} ms p99 {r['authorize_p99_ms']} ms; "
                  f"RSS {r['rss_at_rest_mb']} MB at rest, {r['rss_after_load_mb']} MB after")
    sizes = sorted((r for name, r in results.items() if name.startswith("keys_")), key=lambda r: r["keys"])
    if len(sizes) == 2 and sizes[0]["random_keys"].get("first_use_p50_ms") and sizes[1]["random_keys"].get("first_use_p50_ms"):
        small, large = sizes

        def change(a: float, b: float) -> str:
            return f"{100 * (b - a) / a:+.1f}%"

        print(f"  Authorize p50 from {small['keys']:,} to {large['keys']:,} keys: a key's first use "
              + change(small["random_keys"]["first_use_p50_ms"], large["random_keys"]["first_use_p50_ms"])
              + ", a key in use " + change(small["hot_200_keys"]["authorize_p50_ms"], large["hot_200_keys"]["authorize_p50_ms"]))
    print(json.dumps(results))
    return {"data_size": results}


if __name__ == "__main__":
    main()
