"""Native path: Authorize + Settle pairs per second and latency percentiles over gRPC, against a
no-op grpc.aio servicer measured in the same run as the floor.

    python -m bench.native [--seconds 10] [--concurrency 32] [--rounds 2] [--rates 100,250,500,1000]
                           [--workers 1] [--redis-url ...] [--database-url ...]

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


def channels(address: str, connections: int) -> list[grpc.aio.Channel]:
    """One connection (channel) each: a channel of its own subchannel pool, so they are not shared."""
    options = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
    return [grpc.aio.insecure_channel(address, options=options) for _ in range(connections)]


def cpu_by_process(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each process named (with its children), and by this load generator."""
    from bench.envoy_path import tree_cpu_seconds

    return {"load generator": time.process_time(), **{name: tree_cpu_seconds(pid) for name, pid in pids.items()}}


def cpu_ms_a_pair(before: dict[str, float], pids: dict[str, int], pairs: float) -> dict[str, float]:
    after = cpu_by_process(pids)
    return {name: round(1000 * (after[name] - before[name]) / max(pairs, 1), 3) for name in after}


async def drive(address: str, key: str, seconds: float, concurrency: int, prefix: str, connections: int = 1,
                pids: dict[str, int] | None = None) -> dict:
    pids = pids or {}
    cpu_before = cpu_by_process(pids)
    authorize_ms: list[float] = []
    settle_ms: list[float] = []
    pairs = 0
    deadline = time.perf_counter() + seconds
    opened = channels(address, connections)
    try:
        stubs = [policy_pb2_grpc.PolicyServiceStub(channel) for channel in opened]

        async def worker(n: int) -> None:
            nonlocal pairs
            stub = stubs[n % len(stubs)]
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
    finally:
        for channel in opened:
            await channel.close()
    return {
        "pairs_per_second": round(pairs / elapsed, 1),
        "cpu_ms_a_pair": cpu_ms_a_pair(cpu_before, pids, pairs),
        "authorize_ms": {"p50": round(percentile(authorize_ms, 0.5), 3), "p99": round(percentile(authorize_ms, 0.99), 3),
                         "p999": round(percentile(authorize_ms, 0.999), 3)},
        "settle_ms": {"p50": round(percentile(settle_ms, 0.5), 3), "p99": round(percentile(settle_ms, 0.99), 3)},
    }


async def paced(address: str, key: str, seconds: float, rate: int, prefix: str) -> dict:
    """Open loop: an Authorize starts every 1/rate s whatever the earlier ones do (each followed by its
    Settle), so the latency is that of a steady decision rate, not of a closed loop that slows down
    with the server. In flight at most rate/2 (past that the server is saturated: counted, not sent)."""
    authorize_ms: list[float] = []
    skipped = 0
    in_flight = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)

        async def one(rid: str) -> None:
            nonlocal in_flight
            started = time.perf_counter()
            await stub.Authorize(policy_pb2.AuthorizeRequest(
                api_key=key, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini",
                attribution=types_pb2.Attribution(request_id=rid, feature="bench"),
                shape=policy_pb2.RequestShape(prompt_bytes=800, message_count=2, max_output_tokens=200)))
            authorize_ms.append((time.perf_counter() - started) * 1000)
            await stub.Settle(policy_pb2.SettleRequest(request_id=rid, usage=policy_pb2.Usage(
                input_tokens=200, output_tokens=150)))
            in_flight -= 1

        tasks = []
        begin = time.perf_counter()
        total = int(seconds * rate)
        for i in range(total):
            delay = begin + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max(rate // 2, 1):
                skipped += 1
                continue
            in_flight += 1
            tasks.append(asyncio.create_task(one(f"{prefix}-{i}")))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    return {"rate_asked": rate, "authorize_per_second": round(len(authorize_ms) / elapsed, 1), "skipped": skipped,
            "authorize_ms": {"p50": round(percentile(authorize_ms, 0.5), 3), "p99": round(percentile(authorize_ms, 0.99), 3),
                             "p999": round(percentile(authorize_ms, 0.999), 3)}}


def decision_latency(database_url: str, prefix: str) -> dict:
    """Authorize as policyd itself timed it (decision_latency_us of the records), without the client and
    gRPC transport around it: what the paced runs' client-side figures include on top."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as connection:
        values = [row[0] for row in connection.execute(text(
            "select decision_latency_us from usage_records where request_id like :p order by 1"), {"p": f"{prefix}-%"})]
    engine.dispose()
    return {"p50": round(percentile(values, 0.5) / 1000, 3), "p99": round(percentile(values, 0.99) / 1000, 3),
            "p999": round(percentile(values, 0.999) / 1000, 3)}


def floor(seconds: float, concurrency: int, rates: tuple[int, ...] = (), workers: int = 1) -> dict:
    """The no-op servicer in a process of its own, like policyd (`workers` of them on one port, as policyd's)."""
    import subprocess
    import sys

    from tests.servers import free_port, wait_port

    port = free_port()
    processes = []
    try:
        for _ in range(workers):
            processes.append(subprocess.Popen([sys.executable, "-m", "bench.noop_servers", str(port)],
                                              cwd=os.path.join(os.path.dirname(__file__), "..")))
        wait_port(port)
        while not all(listening(process.pid, port) for process in processes):  # each binds once it has imported
            time.sleep(0.1)
        result = asyncio.run(drive(f"127.0.0.1:{port}", "k", seconds, concurrency, "noop", connections(workers),
                                   {"server": processes[0].pid} if workers == 1 else {}))
        result["paced"] = [asyncio.run(paced(f"127.0.0.1:{port}", "k", seconds, rate, f"noop{rate}")) for rate in rates]
        return result
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)


def listening(pid: int, port: int) -> bool:
    import psutil

    return any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.Process(pid).net_connections(kind="tcp"))


def connections(workers: int) -> int:
    """Client connections: one for one process; with several, enough that the kernel spreads them evenly."""
    return 1 if workers == 1 else 8 * workers


def funded_key(admin: admin_pb2_grpc.AdminServiceStub) -> admin_pb2.CreateKeyResponse:
    """A key of the benchmark's customer, with more credit than any run spends."""
    admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id="bench", source="purchase",
                                                   amount=types_pb2.Money(currency="USD", nanos=10**15)))
    return admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="bench", plan="bench", environment="production"))


def policyd(seconds: float, concurrency: int, redis_url: str, database_url: str, writer: str = "process",
            rates: tuple[int, ...] = (), workers: int = 1, server_pids: dict[str, int] | None = None) -> dict:
    """`policyd serve` in a process of its own (uvloop), the writer draining to PostgreSQL in a `policyd writer`
    process beside it (writer="process", the production shape) or inside serve (writer="inprocess")."""
    from tests.processes import PolicydProcess, WriterProcess

    separate = writer == "process"
    process = PolicydProcess(redis_url, database_url, policy=os.path.join(os.path.dirname(__file__), "policy.yaml"),
                             extra_env={"POLICYD_PARTITIONS": "16", "POLICYD_WRITER_ENABLED": str(not separate).lower(),
                                        "POLICYD_WORKERS": str(workers)})
    if workers > 1:
        process.listening_workers(workers)
    writers = [WriterProcess(redis_url, database_url, extra_env={"POLICYD_PARTITIONS": "16"})] if separate else []
    try:
        with grpc.insecure_channel(process.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            key = funded_key(admin)
            pids = {"serve": process.process.pid, **({"writer": writers[0].process.pid} if writers else {}),
                    **(server_pids or {})} if workers == 1 else {}
            run = f"{time.time_ns():x}"  # request ids new in every run: a repeated id is a retry, answered as a replay
            result = asyncio.run(drive(process.address, key.secret, seconds, concurrency, f"bench-{run}", connections(workers),
                                       pids))
            result["paced"] = [asyncio.run(paced(process.address, key.secret, seconds, rate, f"paced{rate}-{run}"))
                               for rate in rates]
            lag_started = time.perf_counter()
            try:
                result["audit_ok"] = admin.Audit(admin_pb2.AuditRequest(), timeout=300).ok  # drains the writer first
            except grpc.RpcError as error:  # counted as a failed audit; policyd's log says why
                result["audit_ok"] = False
                print(f"audit failed: {error.code()} {error.details()}\n{process.log()[-4000:]}")
            result["writer_catch_up_seconds"] = round(time.perf_counter() - lag_started, 2)
            for paced_run in result["paced"]:
                paced_run["decision_ms"] = decision_latency(database_url, f"paced{paced_run['rate_asked']}-{run}")
        return result
    finally:
        for w in writers:
            w.stop()
        process.stop()


def main(argv: list[str] | None = None) -> dict:
    try:  # the load generator's own loop: uvloop adds less to the latency it measures
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--database-url", default="")
    parser.add_argument("--rates", default="100,250,500,1000",
                        help="Authorize rates (per second) of the paced runs, comma-separated ('' = none)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="floor and policyd measured alternately this many times (the floor moves run to run)")
    parser.add_argument("--workers", type=int, default=1,
                        help="policyd serve processes on one port (POLICYD_WORKERS), and as many no-op floor processes")
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
    server_pids = {name: server.process.pid for name, server in zip(("redis", "postgres"), servers)
                   if len(servers) == 2 and server.process}
    rates = tuple(int(r) for r in args.rates.split(",") if r.strip())
    rounds: list[tuple[dict, dict]] = []
    try:
        for n in range(max(args.rounds, 1)):
            paced_rates = rates if n == 0 else ()  # the paced runs once
            rounds.append((floor(args.seconds, args.concurrency, paced_rates, args.workers),
                           policyd(args.seconds, args.concurrency, redis_url, database_url, args.writer, paced_rates,
                                   args.workers, server_pids)))
    finally:
        for server in servers:
            server.close()
    ratios = sorted(real["pairs_per_second"] / noop["pairs_per_second"] for noop, real in rounds)
    ratio = ratios[(len(ratios) - 1) // 2]  # the lower middle: never flattering
    noop, real = rounds[0]
    print(f"native Authorize+Settle ({args.concurrency} concurrent, {args.seconds:.0f} s, {os.cpu_count()} cores, "
          f"writer {'in its own process' if args.writer == 'process' else 'inside serve'}, {args.workers} serve "
          f"process{'es' if args.workers > 1 else ''})")
    print(f"{'':30} {'pairs/s':>9} {'auth p50':>9} {'auth p99':>9} {'auth p99.9':>11} {'settle p50':>11} {'settle p99':>11}")
    for n, pair in enumerate(rounds, 1):
        for name, r in (("no-op grpc.aio (floor)", pair[0]), ("policyd (Redis + PG)", pair[1])):
            a, s = r["authorize_ms"], r["settle_ms"]
            print(f"{f'round {n}: {name}':30} {r['pairs_per_second']:>9} {a['p50']:>9} {a['p99']:>9} {a['p999']:>11} "
                  f"{s['p50']:>11} {s['p99']:>11}")
    for n, (noop_round, real_round) in enumerate(rounds, 1):
        if real_round["cpu_ms_a_pair"]:
            print(f"round {n}: CPU ms a pair: policyd " + ", ".join(f"{k} {v}" for k, v in real_round["cpu_ms_a_pair"].items())
                  + f" (all {sum(real_round['cpu_ms_a_pair'].values()):.3f}); floor "
                  + ", ".join(f"{k} {v}" for k, v in noop_round["cpu_ms_a_pair"].items())
                  + f" (all {sum(noop_round['cpu_ms_a_pair'].values()):.3f})")
    print(f"ratio to floor: {ratio:.2f} (rounds: {', '.join(f'{x:.2f}' for x in ratios)}); writer caught up in "
          f"{real['writer_catch_up_seconds']} s; audit ok: {all(r['audit_ok'] for _, r in rounds)}")
    print("paced (open loop; each Authorize followed by its Settle): Authorize p50 / p99 / p99.9 ms")
    for run, floor_run in zip(real["paced"], noop["paced"]):
        a, f, d = run["authorize_ms"], floor_run["authorize_ms"], run["decision_ms"]
        print(f"  {run['rate_asked']:>5}/s asked, {run['authorize_per_second']}/s done ({run['skipped']} not sent): "
              f"policyd {a['p50']} / {a['p99']} / {a['p999']}; no-op floor {f['p50']} / {f['p99']} / {f['p999']}; "
              f"policyd's own work before its Redis call {d['p50']} / {d['p99']} / {d['p999']}")
    return {"native": {"rounds": [{"floor": f, "policyd": r} for f, r in rounds], "ratio": round(ratio, 3),
                       "ratios": [round(x, 3) for x in ratios], "cores": os.cpu_count(), "writer": args.writer,
                       "workers": args.workers,
                       "concurrency": args.concurrency}}


if __name__ == "__main__":
    main()
