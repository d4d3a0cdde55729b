"""`policyd writer` in a process of its own beside a `policyd serve` whose writer is off: every decision
reaches SQL through it, once, and the books balance."""

from __future__ import annotations

import time

import grpc
import psycopg
import pytest

from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2
from tests.conftest import ROOT
from tests.helpers import funded_key
from tests.processes import PolicydProcess, WriterProcess
from tests.servers import free_port
from tests.test_metrics import scrape


@pytest.mark.slow
def test_a_separate_writer_process_writes_every_decision_once(redis_server, postgres_server) -> None:
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    database = postgres_server.create_database("writer_process")
    serve = PolicydProcess(redis_server.url, database, policy=str(ROOT / "policyd/samples/policy.yaml"),
                           extra_env={"POLICYD_WRITER_ENABLED": "false"})
    metrics_port = free_port()
    writer = WriterProcess(redis_server.url, database, extra_env={"POLICYD_ROLLUP_INTERVAL_MS": "200",
                                                                  "POLICYD_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"})
    try:
        with grpc.insecure_channel(serve.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            policy = policy_pb2_grpc.PolicyServiceStub(channel)
            secret = funded_key(admin, "w").secret
            for i in range(40):
                d = policy.Authorize(policy_pb2.AuthorizeRequest(
                    api_key=secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini",
                    attribution=types_pb2.Attribution(request_id=f"w-{i}"),
                    shape=policy_pb2.RequestShape(prompt_bytes=400, max_output_tokens=50)))
                assert d.decision == policy_pb2.ALLOW
                if i % 4:
                    policy.Settle(policy_pb2.SettleRequest(request_id=f"w-{i}", usage=policy_pb2.Usage(
                        input_tokens=100, output_tokens=20)))
                else:
                    policy.Release(policy_pb2.ReleaseRequest(request_id=f"w-{i}", reason="provider_error"))
            # only the writer process moves them to SQL: read PostgreSQL directly, without any admin call
            # (those drain the streams themselves)
            dsn = database.replace("postgresql+psycopg://", "postgresql://")
            deadline = time.monotonic() + 30
            while True:
                with psycopg.connect(dsn) as connection:
                    rows = connection.execute("select request_id, status from usage_records where customer_id = 'w'"
                                              ).fetchall()
                if len(rows) == 40 and all(status != "reserved" for _, status in rows):
                    break
                assert time.monotonic() < deadline, rows
                time.sleep(0.2)
            assert sorted(status for _, status in rows) == ["released"] * 10 + ["settled"] * 30
            # the writer too keeps what it started with out of the collector's full passes
            assert scrape(metrics_port)["policyd_heap_frozen_objects"] > 20_000
            # the loops that read SQL run in the writer process too: the rollups catch up with the records
            while True:
                with psycopg.connect(dsn) as connection:
                    summed = connection.execute("select requests from usage_rollups where period = 'day' and "
                                                "dimension = 'customer' and value = 'w'").fetchall()
                if summed == [(40,)]:
                    break
                assert time.monotonic() < deadline, summed
                time.sleep(0.2)
            assert admin.Audit(admin_pb2.AuditRequest()).ok
    finally:
        writer.stop()
        serve.stop()
    assert "Traceback" not in writer.log()


def test_a_writer_whose_metrics_address_is_taken_exits_saying_why(redis_server, tmp_path) -> None:
    """Started, then unable to serve /metrics: it stops what it started, in order (its last drain; before, its loops
    were left to the event loop's shutdown), and exits naming the address."""
    import os
    import subprocess

    from tests.processes import policyd_command
    from tests.servers import taken_address

    with taken_address() as (_, address):
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
        env.update(POLICYD_REDIS_URL=redis_server.url.rsplit("/", 1)[0] + "/9",  # a database no other test uses
                   POLICYD_DATABASE_URL=f"sqlite:///{tmp_path}/w.db", POLICYD_METRICS_LISTEN=address)
        done = subprocess.run([*policyd_command(), "writer"], env=env, cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=60)
    assert done.returncode != 0, done.stderr
    assert f"cannot serve /metrics on {address}" in done.stderr, done.stderr[-2000:]
    assert "policyd writer stopped" in done.stderr
