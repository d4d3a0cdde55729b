"""One gateway shape, policyd behind Envoy (real Redis, the writer draining to real PostgreSQL), JSON
replies (or streams, --stream) at --connections and at one connection: requests/s, latency, and the CPU
each process (the gateway Envoy's too) spends a request (read from /proc). Short and repeatable, to
compare two commits side by side: run it from each checkout in turn, several times alternately (the
machine's noise moves single runs by 10-20%).

    python -m bench.shape_cpu [--shape ext_authz+ext_proc] [--seconds 10] [--connections 32] [--stream]
    PYTHONPATH=/path/to/other/checkout python -m bench.shape_cpu ...   # the same, for another commit
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.envoy_path import HERE, Envoy, cpu_seconds, free_port, funded_key, policyd_stack, provider_config, wrk
from policyd.gateway_config import SHAPES, Upstream, render


def measured(url: str, key: str, connections: int, seconds: float, workdir: Path, pids: dict[str, int],
             stream: bool = False) -> dict[str, Any]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    out = wrk(url, key, stream, connections, seconds, workdir)
    out["cpu_ms_per_request"] = {name: round(1000 * (cpu_seconds(pid) - before[name]) / max(out["requests"], 1), 3)
                                 for name, pid in pids.items()}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default=SHAPES[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="streamed replies (SSE) instead of JSON")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    workdir = Path(tempfile.mkdtemp(prefix="policyd-bench-shape-"))
    started: list[Any] = []
    try:
        provider = Envoy(provider_config(provider_port := free_port()), provider_port, workdir)
        started.append(provider)
        redis, policyd, writer = policyd_stack(started)
        key = funded_key(policyd.address)
        gateway = Envoy(render(listen_port=(port := free_port()), policyd_port=policyd.port, admin_port=free_port(),
                               upstreams=(Upstream("openai", "127.0.0.1", provider.port),), shape=args.shape),
                        port, workdir)
        started.append(gateway)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        pids = {"policyd": policyd.process.pid, "writer": writer.process.pid, "redis": redis.process.pid,
                "envoy": gateway.process.pid}
        kind = "stream" if args.stream else "json"
        wrk(url, key, args.stream, args.connections, 3, workdir)  # warm up
        results = {"shape": args.shape,
                   f"{kind}_{args.connections}": measured(url, key, args.connections, args.seconds, workdir, pids,
                                                          args.stream),
                   f"{kind}_1": measured(url, key, 1, args.seconds / 2, workdir, pids, args.stream)}
    finally:
        for thing in reversed(started):
            (thing.stop if hasattr(thing, "stop") and not hasattr(thing, "close") else thing.close)()
        shutil.rmtree(workdir, ignore_errors=True)
    for name in (f"{kind}_{args.connections}", f"{kind}_1"):
        r = results[name]
        print(f"{args.shape}, {name}: {r['rps']} req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, CPU ms a request: "
              + ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_request"].items()))
    print(json.dumps(results))
    return {"shape_cpu": results}


if __name__ == "__main__":
    main()
