"""A replica stopped or lost while the gateway's replies pass through it (the real Envoy, `policyd serve`
on a real redis-server and PostgreSQL, the openai SDK as the client). The observer filter fails open: the
reply goes on to its client whatever becomes of the replica reading it, and the provider bills all of it.
So a rolling deploy must wait for the streams open (charged exactly), a replica that can wait no longer
charges what it leaves unread as held, and one killed outright leaves a charge at the deadline, never
free usage."""

from __future__ import annotations

import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import grpc
import openai
import pytest

from policyd.gateway_config import SHAPES, Upstream, render
from policyd.mock_provider import COMPLETION_TOKENS_MAX, WORDS, MockProvider
from grpc_health.v1 import health_pb2, health_pb2_grpc
from policyd_client.v1 import admin_pb2, admin_pb2_grpc
from tests.helpers import FundedCustomers
from tests.processes import PolicydProcess
from tests.servers import PostgresServer, RedisServer, free_port
from tests.test_gateway import FIXTURES, PROVIDER_KEYS, PROVIDERS, expected_charge, start_envoy

OUTPUT_CAP = 50  # held for each request; the mock writes 12 words, 0.6 s apart (scenario very_slow: 7.2 s)


class Deployment(FundedCustomers):
    """One replica behind Envoy, restartable on the same port (as an orchestrator replaces a pod)."""

    def __init__(self, tmp: Path, shape: str, redis: RedisServer, database: str, env: dict[str, str]) -> None:
        self.tmp, self.redis_url, self.database = tmp, redis.url, database
        self.mock = MockProvider(api_keys=PROVIDER_KEYS).start()
        providers = tmp / "providers.yaml"
        providers.write_text(PROVIDERS)
        self.env = {"POLICYD_PROVIDERS_FILE": str(providers), **env}
        self.policyd_port = free_port()
        self.replica = self.start_replica()
        self.port = free_port()
        (tmp / "envoy.yaml").write_text(render(
            listen_port=self.port, policyd_port=self.policyd_port, admin_port=free_port(),
            upstreams=(Upstream("openai", "127.0.0.1", self.mock.port),), shape=shape))
        self.envoy = start_envoy(tmp / "envoy.yaml", self.port, tmp / "envoy.log")

    def start_replica(self) -> PolicydProcess:
        replica = PolicydProcess(self.redis_url, self.database, policy=str(FIXTURES / "gateway_policy.yaml"),
                                 extra_env=self.env, cwd=str(self.tmp), port=self.policyd_port)
        if getattr(self, "channel", None) is not None:
            self.channel.close()  # the replica before it's
        self.channel = grpc.insecure_channel(replica.address)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        return replica

    def record(self, customer: str) -> Any:
        (record,) = self.records(customer)
        return record

    def close(self) -> None:
        self.channel.close()
        self.envoy.terminate()
        self.envoy.wait(timeout=10)
        self.replica.stop()
        self.mock.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class SlowStream(threading.Thread):
    """A streamed chat completion through the gateway, read to its end in a thread of its own."""

    def __init__(self, deployment: Deployment, key: str, ask_usage: bool = True) -> None:
        super().__init__(daemon=True)
        self.ask_usage = ask_usage  # not asked: policyd asks it (the processing filter rewrites the body)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{deployment.port}/v1", api_key=key, max_retries=0,
                                    timeout=30)
        self.began = threading.Event()
        self.text = ""
        self.usage: Any = None
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            stream = self.client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "take your time"}], stream=True,
                max_tokens=OUTPUT_CAP, **({"stream_options": {"include_usage": True}} if self.ask_usage else {}),
                extra_headers={"x-mock-scenario": "very_slow"})
            for chunk in stream:
                self.began.set()
                if chunk.choices and chunk.choices[0].delta.content:
                    self.text += chunk.choices[0].delta.content
                if chunk.usage:
                    self.usage = chunk.usage
        except BaseException as error:  # noqa: BLE001 (reported by the test)
            self.error = error
        finally:
            self.began.set()

    def whole(self) -> Any:
        """The reply as its client got it: every word, and the provider's usage when the client asked it."""
        self.join(timeout=30)
        assert self.error is None and self.text == "".join(WORDS), (self.error, self.text)
        if self.ask_usage:
            assert self.usage is not None and self.usage.completion_tokens == COMPLETION_TOKENS_MAX
        else:
            assert self.usage is None  # policyd's own request for it was taken out of the stream
        return self.usage


@pytest.fixture
def servers(redis_server: RedisServer, postgres_server: PostgresServer) -> tuple[RedisServer, PostgresServer]:
    return redis_server, postgres_server


def deployment(servers: tuple[RedisServer, PostgresServer], shape: str = SHAPES[0], **env: str) -> Deployment:
    import redis as redis_client

    redis, postgres = servers
    redis_client.Redis.from_url(redis.url).flushall()  # each on counters and a database of its own
    return Deployment(Path(tempfile.mkdtemp(prefix="policyd-stops-")), shape, redis,
                      postgres.create_database("stops_" + secrets.token_hex(6)), env)


def test_a_replica_told_to_stop_reads_the_streams_open_to_their_end_before_it_exits(
        servers: tuple[RedisServer, PostgresServer]) -> None:
    """SIGTERM (a rolling deploy) while a 7 s stream passes: the replica takes no new calls but reads the
    stream to its end and settles it at the provider's usage, then exits (it once gave streams 5 s and
    charged the rest as cut: the words delivered so far, while the client got them all). A client watching
    its health (a stream that never ends by itself) does not hold it up."""
    metrics_port = free_port()
    d = deployment(servers, POLICYD_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    try:
        key = d.customer("drained")
        watching = health_pb2_grpc.HealthStub(d.channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watching).status == health_pb2.HealthCheckResponse.SERVING
        stream = SlowStream(d, key)
        assert stream.began.wait(15)
        assert wait_for(lambda: gateway_streams_open(metrics_port) >= 1, 10)  # the observer's, at the replica
        stopping = time.monotonic()
        d.replica.process.send_signal(signal.SIGTERM)
        usage = stream.whole()
        assert d.replica.process.wait(timeout=30) == 0
        assert time.monotonic() - stopping < 20  # the stream's 7 s, then at most CALLS_GRACE_SECONDS for the watch
        assert "still open" not in d.replica.log()
        d.replica = d.start_replica()
        record = d.record("drained")
        assert (record.status, record.error_class, record.stream_interrupted) == ("settled", "", False)
        assert (record.input_tokens, record.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
        assert record.charge.nanos == expected_charge("gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens)
        assert d.wallet_at_rest("drained").reserved_nanos == 0
        assert d.admin.Audit(admin_pb2.AuditRequest()).ok
    finally:
        d.close()


def gateway_streams_open(metrics_port: int) -> float:
    """What a replica's /metrics says of the gateway's streams open to it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        found = re.search(r"^policyd_gateway_streams_open ([0-9.]+)$", reply.read().decode(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def wait_for(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_stream_a_stopping_replica_can_wait_for_no_longer_is_charged_as_held(
        servers: tuple[RedisServer, PostgresServer]) -> None:
    """Past the shutdown grace (1 s here) the replica stops reading; the client still gets the whole
    reply, so the request is charged its output cap, not the words read before the replica left."""
    metrics_port = free_port()
    d = deployment(servers, POLICYD_SHUTDOWN_GRACE_SECONDS="1", POLICYD_METRICS_LISTEN=f"127.0.0.1:{metrics_port}")
    try:
        key = d.customer("left-unread")
        stream = SlowStream(d, key)
        assert stream.began.wait(15)
        # the observer's stream is open at the replica (Envoy opens it beside the reply it passes on, not before)
        assert wait_for(lambda: gateway_streams_open(metrics_port) >= 1, 10)
        stopping = time.monotonic()
        d.replica.process.send_signal(signal.SIGTERM)
        assert d.replica.process.wait(timeout=30) == 0
        assert time.monotonic() - stopping < 6  # it did not wait for the stream's end
        assert "1 gateway streams still open after the 1 s grace" in d.replica.log()
        stream.whole()  # Envoy went on without the replica: the client got all of it
        d.replica = d.start_replica()
        record = d.record("left-unread")
        assert (record.status, record.error_class) == ("settled", "usage_estimated:unread_at_shutdown")
        assert record.output_tokens == OUTPUT_CAP and record.stream_interrupted
        assert record.charge.nanos == expected_charge("gpt-4o-mini", record.input_tokens, OUTPUT_CAP)
        assert d.wallet_at_rest("left-unread").reserved_nanos == 0
        assert d.admin.Audit(admin_pb2.AuditRequest()).ok
    finally:
        d.close()


@pytest.mark.parametrize("shape", SHAPES)
def test_a_replica_killed_mid_stream_leaves_a_charge_at_the_deadline_not_free_usage(
        servers: tuple[RedisServer, PostgresServer], shape: str) -> None:
    """SIGKILL (out of memory, a node lost) mid-stream: nothing of the replica settles the request, and
    the reply still reaches its client. The replica that takes its place charges it as held once its
    reservation's deadline (3 s here) and one more TTL have passed (for a report still on its way),
    instead of releasing it as if the provider had not billed."""
    d = deployment(servers, shape, POLICYD_RESERVATION_TTL_SECONDS="3")
    try:
        key = d.customer("lost-" + shape.replace("+", "-"))
        stream = SlowStream(d, key, ask_usage=False)  # so both shapes' processing filters see the request
        assert stream.began.wait(15)
        time.sleep(0.3)  # mid-stream (the next word comes 0.6 s after the first): the processing stream has ended
        d.replica.kill()
        d.replica = d.start_replica()
        stream.whole()
        customer = "lost-" + shape.replace("+", "-")
        deadline = time.monotonic() + 20
        while (record := d.record(customer)).status == "reserved":
            assert time.monotonic() < deadline, "the reservation was never closed"
            time.sleep(0.2)
        assert (record.status, record.error_class) == ("settled", "usage_estimated:end_unseen")
        assert record.output_tokens == OUTPUT_CAP > COMPLETION_TOKENS_MAX
        assert record.charge.nanos == expected_charge("gpt-4o-mini", record.input_tokens, OUTPUT_CAP)
        wallet = d.wallet_at_rest(customer)
        assert wallet.reserved_nanos == 0 and d.admin.Audit(admin_pb2.AuditRequest()).ok
    finally:
        d.close()


def test_a_replica_told_to_stop_says_so_in_its_health_before_it_refuses_calls(tmp_path: Path) -> None:
    """SIGTERM: the health turns NOT_SERVING at once, and new calls are still taken for
    POLICYD_SHUTDOWN_DELAY_SECONDS, time for a gateway checking the health to send them elsewhere first; then the
    replica takes no more and exits. A second SIGTERM ends the wait at once."""
    for second_signal in (False, True):
        replica = PolicydProcess("", f"sqlite:///{tmp_path / f'delay-{second_signal}.db'}",
                                 extra_env={"POLICYD_SHUTDOWN_DELAY_SECONDS": "4"})
        channel = grpc.insecure_channel(replica.address)
        health = health_pb2_grpc.HealthStub(channel)
        try:
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            told = time.monotonic()
            replica.process.send_signal(signal.SIGTERM)
            assert wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status ==
                            health_pb2.HealthCheckResponse.NOT_SERVING, 3)
            if second_signal:
                replica.process.send_signal(signal.SIGTERM)
                assert replica.process.wait(timeout=10) == 0 and time.monotonic() - told < 3.5
                continue
            # a new call, on a new connection, is still answered in the delay
            fresh = grpc.insecure_channel(replica.address)
            try:
                answered = health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert answered.status == health_pb2.HealthCheckResponse.NOT_SERVING
            finally:
                fresh.close()
            assert time.monotonic() - told < 3.5 and replica.process.poll() is None
            assert replica.process.wait(timeout=30) == 0 and time.monotonic() - told >= 4
        finally:
            channel.close()
            replica.stop()
