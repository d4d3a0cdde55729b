"""Decisions while operators work: paced Authorize + Settle latency alone, then while admin calls run
back to back (a usage report, the newest records, an audit: each drains the streams to SQL first and
reads it), against the same `policyd serve` with its writer in a process of its own.

    python -m bench.admin_load [--seconds 12] [--rate 300] [--warm-pairs 20000]

Without URLs it starts a throwaway redis-server and PostgreSQL on loopback. The load generator runs in
this process, bounded in time, on loopback only; the admin calls run on a thread of their own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time

import grpc

from bench.native import funded_key, paced
from policyd_client.v1 import admin_pb2, admin_pb2_grpc


def admin_calls(admin: admin_pb2_grpc.AdminServiceStub, stop: threading.Event) -> dict[str, list[float]]:
    """The admin calls, one after another until `stop`: the seconds each call took, by name."""
    took: dict[str, list[float]] = {"UsageReport": [], "ListUsage": [], "Audit": []}

    def report() -> None:  # the last day's, by customer and model
        now = int(time.time() * 1000)
        admin.UsageReport(admin_pb2.UsageReportRequest(group_by=["customer", "model"], since_unix_ms=now - 86_400_000,
                                                       until_unix_ms=now + 60_000), timeout=120)

    calls = (("UsageReport", report),
             ("ListUsage", lambda: admin.ListUsage(admin_pb2.ListUsageRequest(limit=1000), timeout=120)),
             ("Audit", lambda: admin.Audit(admin_pb2.AuditRequest(), timeout=120)))
    while not stop.is_set():
        for name, call in calls:
            started = time.perf_counter()
            call()
            took[name].append(time.perf_counter() - started)
            if stop.is_set():
                break
    return took


def main(argv: list[str] | None = None) -> dict:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument("--rate", type=int, default=300, help="Authorize+Settle pairs a second, paced")
    parser.add_argument("--warm-pairs", type=int, default=20_000, help="records in SQL before the runs")
    args = parser.parse_args(argv)
    from tests.processes import PolicydProcess, WriterProcess
    from tests.servers import PostgresServer, RedisServer

    redis, postgres = RedisServer(), PostgresServer()
    database_url = postgres.create_database("bench")
    env = {"POLICYD_PARTITIONS": "16", "POLICYD_WRITER_ENABLED": "false"}
    process = PolicydProcess(redis.url, database_url, policy=os.path.join(os.path.dirname(__file__), "policy.yaml"),
                             extra_env=env)
    writer = WriterProcess(redis.url, database_url, extra_env={"POLICYD_PARTITIONS": "16"})
    try:
        with grpc.insecure_channel(process.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            key = funded_key(admin).secret
            run = f"{time.time_ns():x}"
            warm_rate = 1000
            asyncio.run(paced(process.address, key, args.warm_pairs / warm_rate, warm_rate, f"warm-{run}"))
            admin.Audit(admin_pb2.AuditRequest(), timeout=300)  # the history is in SQL before the runs
            alone = asyncio.run(paced(process.address, key, args.seconds, args.rate, f"alone-{run}"))
            stop = threading.Event()
            took: dict[str, list[float]] = {}
            failed: list[BaseException] = []

            def admin_thread() -> None:
                try:
                    took.update(admin_calls(admin, stop))
                except BaseException as error:  # reported after the run: a failed admin call spoils the figures
                    failed.append(error)

            worker = threading.Thread(target=admin_thread)
            worker.start()
            try:
                busy = asyncio.run(paced(process.address, key, args.seconds, args.rate, f"busy-{run}"))
            finally:
                stop.set()
                worker.join()
            if failed:
                raise failed[0]
    finally:
        writer.stop()
        process.stop()
        redis.close()
        postgres.close()
    print(f"decisions while admin calls run ({args.rate} pairs/s paced, {args.seconds:.0f} s, {os.cpu_count()} cores, "
          f"{args.warm_pairs} records in SQL before)")
    print(f"{'':24} {'auth p50':>9} {'auth p99':>9} {'auth p99.9':>11}")
    for name, result in (("alone", alone), ("admin calls running", busy)):
        a = result["authorize_ms"]
        print(f"{name:24} {a['p50']:>9} {a['p99']:>9} {a['p999']:>11}")
    for name, seconds in took.items():
        if seconds:
            print(f"  {name}: {len(seconds)} calls, {1000 * sum(seconds) / len(seconds):.1f} ms each on average")
    return {"admin_load": {"rate": args.rate, "alone": alone, "busy": busy,
                           "admin_calls": {name: {"calls": len(s), "mean_ms": round(1000 * sum(s) / max(len(s), 1), 1)}
                                           for name, s in took.items()}}}


if __name__ == "__main__":
    main()
