"""Outages with real servers and a policyd process under steady load:

- PostgreSQL stopped for 30 s: decisions go on (Redis decides, the streams buffer), the writer catches
  up when PostgreSQL is back, every record is present exactly once and the audit passes;
- the network between policyd and Redis partitioned (a proxy that drops every byte both ways): each
  decision fails closed within a bounded time and is recorded; after the partition heals, decisions
  are allowed again, nothing is charged twice, and the audit passes.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from typing import Any

import grpc
import pytest

from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2
from tests.conftest import ROOT
from tests.processes import PolicydProcess
from tests.servers import PostgresServer, RedisServer, free_port

SAMPLE = str(ROOT / "policyd" / "samples" / "policy.yaml")


class Load(threading.Thread):
    """Authorize + Settle pairs at a steady pace until stopped; what each request got, by phase."""

    def __init__(self, address: str, secret: str, pace_seconds: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.channel = grpc.insecure_channel(address)
        self.policy = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.secret = secret
        self.pace = pace_seconds
        self.phase = "before"
        self.results: list[tuple[str, str, str, float]] = []  # request id, phase (or "a->b"), outcome, seconds
        self.stopping = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stopping.is_set():
            rid = f"load-{i}"
            phase = self.phase
            started = time.monotonic()
            try:
                d = self.policy.Authorize(policy_pb2.AuthorizeRequest(
                    api_key=self.secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini",
                    attribution=types_pb2.Attribution(request_id=rid, feature="load"),
                    shape=policy_pb2.RequestShape(prompt_bytes=400, max_output_tokens=50)), timeout=30)
                outcome = "allow" if d.decision != policy_pb2.DENY else f"deny:{d.reason}"
                if outcome == "allow":
                    s = self.policy.Settle(policy_pb2.SettleRequest(request_id=rid, usage=policy_pb2.Usage(
                        input_tokens=100, output_tokens=20)), timeout=30)
                    outcome = "settled" if s.outcome == policy_pb2.SETTLED else f"settle:{s.outcome}"
            except grpc.RpcError as error:
                outcome = f"error:{error.code().name}"
            if self.phase != phase:  # began in one phase and ended in the next: neither's alone
                phase = f"{phase}->{self.phase}"
            self.results.append((rid, phase, outcome, time.monotonic() - started))
            i += 1
            time.sleep(self.pace)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=60)
        self.channel.close()


def _setup(process: PolicydProcess, customer: str) -> tuple[Any, str]:
    channel = grpc.insecure_channel(process.address)
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id=customer, source="purchase",
                                                   amount=types_pb2.Money(currency="USD", nanos=100 * 10**9)))
    secret = admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id=customer, plan="pro",
                                                        environment="production")).secret
    return admin, secret


@pytest.mark.slow
def test_postgres_stopped_for_30_seconds_under_load_loses_nothing() -> None:
    redis, postgres = RedisServer(appendonly=True), PostgresServer()
    process = PolicydProcess(redis.url, postgres.create_database("outage"), policy=SAMPLE)
    try:
        admin, secret = _setup(process, "pg-outage")
        load = Load(process.address, secret, pace_seconds=0.12)  # under the plan's 600 requests a minute
        load.start()
        time.sleep(3)
        load.phase = "outage"
        postgres.stop()
        time.sleep(30)
        postgres.start()
        load.phase = "after"
        time.sleep(5)
        load.stop()

        by_phase = Counter((phase, outcome) for _, phase, outcome, _ in load.results)
        assert by_phase[("outage", "settled")] >= 100, by_phase  # decisions went on without SQL
        assert {outcome for _, _, outcome, _ in load.results} == {"settled"}, by_phase

        deadline = time.monotonic() + 120  # the writer catches up
        while True:
            audit = admin.Audit(admin_pb2.AuditRequest(), timeout=120)
            records = admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="pg-outage", limit=10_000), timeout=60).records
            if audit.ok and len(records) == len(load.results):
                break
            assert time.monotonic() < deadline, (audit, len(records), len(load.results))
            time.sleep(1)
        ids = Counter(r.request_id for r in records)
        assert set(ids) == {rid for rid, _, _, _ in load.results} and set(ids.values()) == {1}
        assert {r.status for r in records} == {"settled"}
        wallet = admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="pg-outage"))
        assert wallet.reserved_nanos == 0
        assert wallet.balance_nanos == 100 * 10**9 - sum(r.charge.nanos for r in records)
    finally:
        process.stop()
        postgres.close()
        redis.close()


class DroppingProxy(threading.Thread):
    """A TCP proxy to Redis that, while partitioned, reads and drops every byte in both directions
    (the peers see silence, not a closed connection, as in a real partition)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(daemon=True)
        self.target_port = target_port
        self.port = free_port()
        self.partitioned = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.closed = False

    def run(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if not self.partitioned.is_set():
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@pytest.mark.slow
def test_a_network_partition_to_redis_fails_closed_within_bounds_and_heals(tmp_path) -> None:
    redis = RedisServer(appendonly=True)
    proxy = DroppingProxy(redis.port)
    proxy.start()
    process = PolicydProcess(f"redis://127.0.0.1:{proxy.port}/0", f"sqlite:///{tmp_path / 'p.db'}", policy=SAMPLE,
                             cwd=str(tmp_path), extra_env={"POLICYD_RESERVATION_TTL_SECONDS": "5"})
    try:
        admin, secret = _setup(process, "partition")
        load = Load(process.address, secret, pace_seconds=0.1)
        load.start()
        time.sleep(2)
        load.phase = "partition"
        proxy.partitioned.set()
        time.sleep(12)
        proxy.partitioned.clear()
        load.phase = "healed"
        time.sleep(8)
        load.stop()

        during = [(outcome, seconds) for _, phase, outcome, seconds in load.results if phase == "partition"]
        assert during and all(o == "deny:counters_unavailable" or o == "settled" or o.startswith("error:")
                              for o, _ in during), during
        assert any(o == "deny:counters_unavailable" for o, _ in during), during  # failed closed
        assert max(seconds for _, seconds in during) < 12, during  # bounded by the Redis timeouts
        healed = [outcome for _, phase, outcome, _ in load.results if phase == "healed"]
        assert healed[-10:] == ["settled"] * 10, healed  # recovered
        assert all(o == "settled" for _, phase, o, _ in load.results if phase == "before")

        deadline = time.monotonic() + 60
        while True:  # reservations a lost reply left behind expire; then the books balance
            audit = admin.Audit(admin_pb2.AuditRequest(), timeout=60)
            wallet = admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="partition"))
            if audit.ok and wallet.reserved_nanos == 0:
                break
            assert time.monotonic() < deadline, (audit, wallet)
            time.sleep(1)
        records = admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="partition", limit=10_000)).records
        by_id = {r.request_id: r for r in records}
        assert len(by_id) == len(records)  # once each
        for rid, _, outcome, _ in load.results:  # every decision is recorded
            assert rid in by_id, rid
            if outcome == "settled":
                assert by_id[rid].status == "settled"
            else:
                assert by_id[rid].charge.nanos == 0  # nobody pays for a refused request
        charged = sum(r.charge.nanos for r in records)
        assert wallet.balance_nanos == 100 * 10**9 - charged
    finally:
        process.stop()
        proxy.close()
        redis.close()
