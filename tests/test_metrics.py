"""The Prometheus endpoint: after known traffic, the counters moved by exactly that much."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc

from policyd_client.v1 import admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2
from tests.conftest import ROOT
from tests.helpers import funded_key
from tests.processes import PolicydProcess
from tests.servers import free_port


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)  # a metric sample, not money
    return values


def test_metrics_count_decisions_settlements_and_charges(tmp_path: Path) -> None:
    port = free_port()
    process = PolicydProcess("", f"sqlite:///{tmp_path / 'p.db'}", policy=str(ROOT / "policyd/samples/policy.yaml"),
                             extra_env={"POLICYD_METRICS_LISTEN": f"127.0.0.1:{port}"}, cwd=str(tmp_path))
    try:
        with grpc.insecure_channel(process.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            policy = policy_pb2_grpc.PolicyServiceStub(channel)
            key = funded_key(admin, "m", plan="free")
            charged = 0
            for i in range(4):
                d = policy.Authorize(policy_pb2.AuthorizeRequest(
                    api_key=key.secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini",
                    attribution=types_pb2.Attribution(request_id=f"m-{i}"), shape=policy_pb2.RequestShape(prompt_bytes=40)))
                assert d.decision == policy_pb2.ALLOW
            for i in range(3):
                s = policy.Settle(policy_pb2.SettleRequest(request_id=f"m-{i}", usage=policy_pb2.Usage(
                    input_tokens=100, output_tokens=10)))
                charged += s.charge.nanos
            policy.Release(policy_pb2.ReleaseRequest(request_id="m-3", reason="provider_error"))
            for _ in range(2):
                policy.Authorize(policy_pb2.AuthorizeRequest(api_key=key.secret, endpoint=types_pb2.CHAT_COMPLETIONS,
                                                             model="gpt-4o"))
        values = scrape(port)
        assert values['policyd_decisions_total{decision="allow",reason="ok"}'] == 4
        assert values['policyd_decisions_total{decision="deny",reason="model_not_allowed"}'] == 2
        assert values['policyd_settlements_total{outcome="settled"}'] == 3
        assert values["policyd_charged_nanos_total"] == charged
        assert values['policyd_releases_total{reason="provider_error"}'] == 1
        assert values["policyd_authorize_seconds_count"] == 6
        assert not any("key_" in name or key.secret in name for name in values)  # no per-key labels
        # what startup made is out of the collector's full passes (tens of thousands of objects)
        assert values["policyd_heap_frozen_objects"] > 20_000
        # the loop's lateness is watched: a sample every 0.1 s (a quick run may scrape before the first)
        deadline = time.monotonic() + 5
        while values["policyd_event_loop_lag_seconds_count"] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
            values = scrape(port)
        assert values["policyd_event_loop_lag_seconds_count"] > 0
    finally:
        process.stop()
