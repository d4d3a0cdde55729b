"""End to end with two policyd replicas behind one Envoy (real redis-server and PostgreSQL, the
openai SDK as the client): Envoy spreads the gRPC streams of each request over both, so a request
decided on one replica is read and settled on the other. Nothing about a request may live in one
process between its filters; each is still charged exactly once."""

from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import grpc
import openai
import pytest

from policyd.gateway_config import SHAPES, Upstream, render
from policyd.mock_provider import MockProvider
from policyd.money import parse_amount
from policyd_client.v1 import admin_pb2, admin_pb2_grpc
from tests.helpers import FundedCustomers
from tests.processes import PolicydProcess
from tests.servers import PostgresServer, RedisServer, free_port
from tests.test_gateway import FIXTURES, PROVIDER_KEYS, PROVIDERS, expected_charge, start_envoy


class Replicas(FundedCustomers):
    def __init__(self, tmp: Path, shape: str, redis: RedisServer, database: str) -> None:
        self.mock = MockProvider(api_keys=PROVIDER_KEYS).start()
        providers = tmp / "providers.yaml"
        providers.write_text(PROVIDERS)
        env = {"POLICYD_PROVIDERS_FILE": str(providers)}
        self.replicas = [PolicydProcess(redis.url, database, policy=str(FIXTURES / "gateway_policy.yaml"),
                                        extra_env=env, cwd=str(tmp)) for _ in range(2)]
        self.port, self.admin_port = free_port(), free_port()
        (tmp / "envoy.yaml").write_text(render(
            listen_port=self.port, policyd_port=self.replicas[0].port, admin_port=self.admin_port,
            upstreams=(Upstream("openai", "127.0.0.1", self.mock.port),), shape=shape,
            more_policyd=(("127.0.0.1", self.replicas[1].port),), access_log_path=str(tmp / "access.log")))
        self.access_log = tmp / "access.log"  # shown beside a failed test (tests/conftest.py)
        self.envoy_log = tmp / "envoy.log"
        self.envoy = start_envoy(tmp / "envoy.yaml", self.port, self.envoy_log)
        self.channel = grpc.insecure_channel(self.replicas[0].address)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    def streams_per_replica(self) -> list[int]:
        """Envoy's count of gRPC streams it sent to each replica."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/clusters") as response:
            text = response.read().decode()
        return [int(re.search(rf"^policyd::127\.0\.0\.1:{r.port}::rq_total::(\d+)$", text, re.M).group(1))
                for r in self.replicas]

    def close(self) -> None:
        self.channel.close()
        self.envoy.terminate()
        self.envoy.wait(timeout=10)
        for replica in self.replicas:
            replica.stop()
        self.mock.stop()


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[RedisServer, PostgresServer]]:
    redis, postgres = RedisServer(), PostgresServer()
    yield redis, postgres
    redis.close()
    postgres.close()


@pytest.fixture(params=SHAPES)
def replicas(request: pytest.FixtureRequest, shared: tuple[RedisServer, PostgresServer]) -> Iterator[Replicas]:
    import redis as redis_client

    redis, postgres = shared
    shape = request.param
    redis_client.Redis.from_url(redis.url).flushall()  # each shape on its own counters and database
    database = postgres.create_database("replicas_" + secrets.token_hex(6))
    tmp = Path(tempfile.mkdtemp(prefix="policyd-replicas-"))
    r = Replicas(tmp, shape, redis, database)
    yield r
    r.close()
    shutil.rmtree(tmp, ignore_errors=True)


def test_a_request_decided_on_one_replica_is_settled_exactly_on_another(replicas: Replicas) -> None:
    key = replicas.customer("replicated")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{replicas.port}/v1", api_key=key, max_retries=0, timeout=20)
    charges: dict[str, int] = {}
    for i in range(6):
        with client.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"stream {i}"}], stream=True,
                stream_options={"include_usage": True}) as response:
            request_id = response.headers["x-policyd-request-id"]
            usage = [c.usage for c in response.parse() if c.usage][0]
        charges[request_id] = expected_charge("gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"reply {i}"}], max_tokens=8)
        usage = raw.parse().usage
        charges[raw.headers["x-policyd-request-id"]] = expected_charge("gpt-4o-mini", usage.prompt_tokens,
                                                                       usage.completion_tokens)
    assert min(replicas.streams_per_replica()) >= 6  # both replicas had a share of every kind of stream
    wallet = replicas.wallet_at_rest("replicated", seconds=20)
    assert wallet.reserved_nanos == 0
    assert wallet.balance_nanos == parse_amount("10") - sum(charges.values())
    report = replicas.admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="replicated", limit=100))
    settled = {r.request_id: r.charge.nanos for r in report.records if r.status == "settled"}
    assert settled == charges  # each exactly once, at the provider's usage
    assert replicas.admin.Audit(admin_pb2.AuditRequest()).ok
    assert json.dumps(replicas.mock.received()).count(key) == 0


def test_a_plan_change_binds_every_replica_at_the_next_request(replicas: Replicas) -> None:
    """Both replicas hold the key in memory (free plan: no gpt-4o); the operator moves the customer to
    pro on one of them; every next request, whichever replica decides it, is decided under pro."""
    key = replicas.customer("upgraded", plan="free")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{replicas.port}/v1", api_key=key, max_retries=0, timeout=20)
    before = replicas.streams_per_replica()
    for i in range(8):
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"before {i}"}])
    assert min(after - was for after, was in zip(replicas.streams_per_replica(), before)) >= 2  # both decided some
    moved = replicas.admin.SetPlan(admin_pb2.SetPlanRequest(customer_id="upgraded", plan="pro"))
    assert [k.owner.plan for k in moved.keys] == ["pro"]
    served = [client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"after {i}"}],
                                             max_tokens=4).model for i in range(8)]
    assert served == ["gpt-4o"] * 8
    records = replicas.records("upgraded")
    assert sorted((r.owner.plan, r.decision) for r in records) == [("free", "deny")] * 8 + [("pro", "allow")] * 8


def test_an_end_users_limit_changed_on_one_replica_binds_both_at_the_next_request(replicas: Replicas) -> None:
    """Both replicas remember an end user's own limit (a day's requests, as the openai SDK's `user` names it); the
    operator lowers it on one of them, changing no key: every next request naming her, whichever replica decides
    it, is bound by the new figure; another end user given a limit meanwhile changes nothing for her."""
    key = replicas.customer("many-users")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{replicas.port}/v1", api_key=key, max_retries=0, timeout=20)

    def limit(count: int, end_user: str = "ann") -> admin_pb2.OwnerLimits:
        return replicas.admin.SetOwnerLimits(admin_pb2.SetOwnerLimitsRequest(
            customer_id="many-users", end_user_id=end_user,
            limits=[admin_pb2.KeyLimit(window="day", unit="requests", limit=count)]))

    def asked(i: int) -> str:
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"ann {i}"}],
                                           max_tokens=4, user="ann")
            return "served"
        except openai.RateLimitError as error:
            assert "(end_user-requests-day)" in str(error)
            return "refused"

    assert limit(100).keys_changed == 1  # her customer's first end user with limits of her own: its key reads them
    before = replicas.streams_per_replica()
    assert [asked(i) for i in range(8)] == ["served"] * 8
    assert min(after - was for after, was in zip(replicas.streams_per_replica(), before)) >= 2  # both remember hers
    assert limit(5, "bo").keys_changed == 0
    assert limit(10).keys_changed == 0
    before = replicas.streams_per_replica()
    assert [asked(i) for i in range(8, 14)] == ["served"] * 2 + ["refused"] * 4
    assert min(after - was for after, was in zip(replicas.streams_per_replica(), before)) >= 2  # both decided some
    sent = [r for r in replicas.mock.received() if str(r["body"].get("messages", [{}])[0].get("content", "")
                                                       ).startswith("ann ")]
    assert len(sent) == 10  # the refused never reached the provider


def test_an_account_that_answered_429_through_one_replica_is_skipped_by_all(replicas: Replicas) -> None:
    key = replicas.customer("cooled")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{replicas.port}/v1", api_key=key, max_retries=0, timeout=20)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "busy"}],
                                       extra_headers={"x-mock-scenario": "rate_limited"})
    cooled = [r["authorization"] for r in replicas.mock.received() if r["scenario"] == "rate_limited"][-1]
    time.sleep(2)  # the replica that saw it has shared it
    for i in range(8):  # decided on both replicas in turn
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"next {i}"}],
                                       max_tokens=5)
    sent = [r["authorization"] for r in replicas.mock.received()
            if str(r["body"].get("messages", [{}])[0].get("content", "")).startswith("next ")]
    assert len(sent) == 8 and cooled not in sent


async def test_a_cool_down_one_replica_began_steers_every_replica(shared: tuple[RedisServer, PostgresServer]) -> None:
    """An account that answered 429 through one replica is skipped by the others too (within
    COOLDOWN_SHARE_SECONDS): the cool-down travels through Redis, not only the replica's memory."""
    import redis as redis_client

    from policyd import redis_keys
    from policyd.providers import Account, ProviderPool
    from policyd.server import Service
    from tests.conftest import make_settings

    redis, postgres = shared
    redis_client.Redis.from_url(redis.url).flushall()
    settings = make_settings({"redis_url": redis.url, "database_url": postgres.create_database("cooldowns")})
    first, second = [await Service.build(settings) for _ in range(2)]
    try:
        for replica in (first, second):
            replica.pool = ProviderPool([Account("openai-1", "openai", "openai", "bearer", "sk-1"),
                                         Account("openai-2", "openai", "openai", "bearer", "sk-2")])
        first.pool.cool_down("openai-1", 30)
        assert {second.pool.pick("openai").name for _ in range(4)} == {"openai-1", "openai-2"}  # not yet told
        await first.share_cooldowns()
        await second.share_cooldowns()
        assert {second.pool.pick("openai").name for _ in range(4)} == {"openai-2"}
        first.pool.cool_down("openai-2", 30)
        await first.share_cooldowns()
        await second.share_cooldowns()
        assert second.pool.cooling_providers() == {"openai"}  # the plan's fallbacks take over everywhere
        client = redis_client.Redis.from_url(redis.url)
        client.hset(redis_keys.COOLDOWNS, "openai-2", 1)  # a cool-down long over steers nobody
        third = ProviderPool([Account("openai-2", "openai", "openai", "bearer", "sk-2")])
        third.adopt({k.decode(): int(v) for k, v in client.hgetall(redis_keys.COOLDOWNS).items()})
        assert third.cooling_providers() == frozenset()
    finally:
        await first.close()
        await second.close()


def test_a_replica_that_goes_down_fails_no_request_while_another_serves(replicas: Replicas) -> None:
    """One of two replicas killed (a crash, a node lost), brought back, then told to stop (a rolling deploy): every
    request meanwhile is served, and settled, by a replica up. Envoy checks each replica's gRPC health, sets aside
    one whose connection is refused or that fails it (a replica stopping says NOT_SERVING, and takes new calls a
    moment longer), and sends a call that could not reach its replica (refused, reset before it was sent) to the
    other; policyd never saw it, so nothing is held twice. Before, Envoy went on sending a share of the requests
    to the lost replica (each got a 503), and to the stopping one (refused: their settles were lost)."""
    key = replicas.customer("one-replica-down")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{replicas.port}/v1", api_key=key, max_retries=0, timeout=20)

    def ask(text: str) -> str:
        if len(text) % 2:
            reply = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}], max_tokens=8)
            return reply.headers["x-policyd-request-id"]
        with client.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}], stream=True,
                max_tokens=8) as response:
            list(response.iter_lines())
            return response.headers["x-policyd-request-id"]

    def settled() -> set[str]:
        report = replicas.admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="one-replica-down", limit=200))
        return {r.request_id for r in report.records if r.status == "settled"}

    served = [ask(f"before {i}") for i in range(4)]
    deadline = time.monotonic() + 20
    while settled() != set(served):  # (a settle on its way to the replica killed would be charged as held later)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    lost = replicas.replicas[1]
    lost.kill()
    served += [ask(f"while down {i}") for i in range(20)]  # at once, and on
    replicas.replicas[1] = lost.restarted(POLICYD_SHUTDOWN_DELAY_SECONDS="3")  # as served behind a gateway
    before = replicas.streams_per_replica()[1]
    deadline = time.monotonic() + 30
    while replicas.streams_per_replica()[1] == before:  # back in Envoy's rotation once its health check passes
        assert time.monotonic() < deadline, "the replica back never had a stream again"
        served.append(ask(f"back {len(served)}"))
    # a replica told to stop (a rolling deploy) says so in its health and takes new calls a moment longer
    # (POLICYD_SHUTDOWN_DELAY_SECONDS), while the gateway sends them to the other, then drains
    stopping = replicas.replicas[1]
    stopping.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while stopping.process.poll() is None:  # before Envoy set it aside, and after
        assert time.monotonic() < deadline, "the replica told to stop never did"
        served.append(ask(f"while stopping {len(served)}"))
    assert stopping.process.returncode == 0
    # each settled exactly, but the reply of the first request after the crash when its observer's stream went to
    # the replica lost (before Envoy set it aside: the observer's stream is never sent again, see gateway_config):
    # that one stays held, to be charged as held at its deadline (usage_estimated:end_unseen), never free
    first_after_crash = served[4]
    deadline = time.monotonic() + 20
    while settled() | {first_after_crash} != set(served) | {first_after_crash}:
        assert time.monotonic() < deadline, sorted(served.index(r) for r in set(served) - settled())
        time.sleep(0.2)
    report = replicas.admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="one-replica-down", limit=200))
    assert len(report.records) == len(served)  # one record a request: none decided twice
    assert {r.status for r in report.records if r.request_id == first_after_crash} <= {"settled", "reserved"}
    held = [r for r in report.records if r.status == "reserved"]
    assert (replicas.wallet("one-replica-down").reserved_nanos > 0) == bool(held)
