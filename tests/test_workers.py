"""Several `policyd serve` processes on one port (POLICYD_WORKERS): connections spread across the
workers, limits hold across them (the counters are shared), what must run once runs once, a worker
that dies is replaced, and SIGTERM stops them all gracefully."""

from __future__ import annotations

import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import psycopg
import pytest

from policyd.settings import Settings
from policyd.workers import check, worker_environment
from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2
from tests.conftest import ROOT
from tests.processes import PolicydProcess, policyd_command

CHANNELS = 24  # connections: the chance that all land on one of two workers is 2 in 2**24


def _connections_by_worker(serve: PolicydProcess) -> dict[int, int]:
    return {worker.pid: sum(1 for c in worker.net_connections(kind="tcp")
                            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == serve.port)
            for worker in serve.workers()}


def _authorize(channel: grpc.Channel, secret: str, request_id: str) -> policy_pb2.AuthorizeResponse:
    return policy_pb2_grpc.PolicyServiceStub(channel).Authorize(policy_pb2.AuthorizeRequest(
        api_key=secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini",
        attribution=types_pb2.Attribution(request_id=request_id),
        shape=policy_pb2.RequestShape(prompt_bytes=400, max_output_tokens=50)), timeout=30)


def _channels(address: str) -> list[grpc.Channel]:
    # a channel of its own pool each: grpc would otherwise share one connection among them
    return [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)]


@pytest.fixture
def two_workers(redis_server, postgres_server, request):
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    database = postgres_server.create_database(f"workers_{request.node.name[5:35]}")
    serve = PolicydProcess(redis_server.url, database, policy=str(ROOT / "policyd/samples/policy.yaml"),
                           extra_env={"POLICYD_WORKERS": "2"})
    serve.listening_workers(2)  # worker 1 starts once worker 0 listens
    try:
        yield serve, database
    finally:
        serve.stop()


@pytest.mark.slow
def test_workers_share_the_port_and_the_limits(two_workers) -> None:
    serve, database = two_workers
    channels = _channels(serve.address)
    try:
        admin = admin_pb2_grpc.AdminServiceStub(channels[0])
        admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id="wk", source="purchase",
                                                       amount=types_pb2.Money(currency="USD", nanos=10**12)))
        # plan free: key-rpm 20 requests a minute, from the policy file worker 0 applied
        secret = admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="wk", plan="free",
                                                            environment="production")).secret
        with ThreadPoolExecutor(CHANNELS) as pool:
            decisions = list(pool.map(lambda n: _authorize(channels[n % CHANNELS], secret, f"wk-{n}"), range(60)))
        by_worker = _connections_by_worker(serve)
        assert len(by_worker) == 2 and all(count > 0 for count in by_worker.values()), by_worker
        allowed = [d for d in decisions if d.decision == policy_pb2.ALLOW]
        assert len(allowed) == 20  # the limit held across both processes: the counters are shared
        assert {d.error.code for d in decisions if d.decision != policy_pb2.ALLOW} == {"rate_limit_exceeded"}
        for n, decision in enumerate(decisions):
            if decision.decision == policy_pb2.ALLOW:
                policy_pb2_grpc.PolicyServiceStub(channels[n % CHANNELS]).Settle(policy_pb2.SettleRequest(
                    request_id=f"wk-{n}", usage=policy_pb2.Usage(input_tokens=100, output_tokens=20)), timeout=30)
        assert admin.Audit(admin_pb2.AuditRequest(), timeout=120).ok
    finally:
        for channel in channels:
            channel.close()
    # the policy file was applied once (by worker 0), whatever the number of workers
    dsn = database.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as connection:
        assert connection.execute("select count(*) from policy_versions").fetchone() == (1,)
        settled = connection.execute("select count(*) from usage_records where customer_id = 'wk' and "
                                     "status = 'settled'").fetchone()
    assert settled == (20,)


@pytest.mark.slow
def test_a_worker_that_dies_is_replaced_and_sigterm_stops_them_all(two_workers) -> None:
    serve, _ = two_workers
    first, second = serve.workers()
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=10)
    workers = serve.listening_workers(2)
    assert first.pid in {w.pid for w in workers} and second.pid not in {w.pid for w in workers}
    assert "worker 1" in serve.log() and "restarting it" in serve.log()
    assert serve.stop() == 0
    for worker in workers:
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    assert "policyd stopped" in serve.log() and "Traceback" not in serve.log()


def test_worker_settings_run_what_must_run_once_in_worker_zero() -> None:
    settings = Settings(redis_url="redis://127.0.0.1:6379/0", listen="0.0.0.0:50051", workers=3,
                        policy_file="p.yaml", metrics_listen="127.0.0.1:9464", dashboard_listen="127.0.0.1:8090")
    zero, two = worker_environment(settings, 0), worker_environment(settings, 2)
    assert zero["POLICYD_WORKERS"] == two["POLICYD_WORKERS"] == "1"
    assert (zero["POLICYD_POLICY_FILE"], two["POLICYD_POLICY_FILE"]) == ("p.yaml", "")
    assert (zero["POLICYD_WRITER_ENABLED"], two["POLICYD_WRITER_ENABLED"]) == ("true", "false")
    assert (zero["POLICYD_DASHBOARD_LISTEN"], two["POLICYD_DASHBOARD_LISTEN"]) == ("127.0.0.1:8090", "")
    assert (zero["POLICYD_METRICS_LISTEN"], two["POLICYD_METRICS_LISTEN"]) == ("127.0.0.1:9464", "127.0.0.1:9466")
    assert zero["POLICYD_LISTEN"] == two["POLICYD_LISTEN"] == "0.0.0.0:50051"
    # a worker reads its settings back from these variables alone
    assert Settings(**{k.removeprefix("POLICYD_").lower(): v for k, v in two.items()}).writer_enabled is False


@pytest.mark.parametrize("settings, refused", [
    ({"listen": "127.0.0.1:50051"}, "shared Redis"),
    ({"listen": "127.0.0.1:0", "redis_url": "redis://127.0.0.1:1/0"}, "fixed host:port"),
    ({"listen": "unix:/tmp/policyd.sock", "redis_url": "redis://127.0.0.1:1/0"}, "fixed host:port"),
])
def test_workers_refuse_what_processes_cannot_share(settings, refused) -> None:
    with pytest.raises(SystemExit, match=refused):
        check(Settings(workers=2, **settings))


def test_serve_with_workers_on_the_embedded_store_exits_with_the_reason(tmp_path) -> None:
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update(POLICYD_WORKERS="2", POLICYD_DATABASE_URL=f"sqlite:///{tmp_path}/p.db")
    done = subprocess.run([*policyd_command(), "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "shared Redis" in done.stderr


def _serve_with_workers(env_settings: dict[str, str], tmp_path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")}
    env.update(POLICYD_WORKERS="2", POLICYD_DATABASE_URL=f"sqlite:///{tmp_path}/p.db", **env_settings)
    return subprocess.run([*policyd_command(), "serve"], env=env, capture_output=True, text=True, timeout=120)


def test_serve_with_workers_on_an_address_already_taken_exits_saying_why(tmp_path) -> None:
    """Its workers would share the port with whatever holds it (SO_REUSEPORT): refused before any starts."""
    from tests.servers import taken_address

    with taken_address() as (_, address):
        done = _serve_with_workers({"POLICYD_LISTEN": address, "POLICYD_REDIS_URL": "redis://127.0.0.1:1/0"}, tmp_path)
    assert done.returncode != 0
    assert f"cannot listen on {address}: something already listens there" in done.stderr, done.stderr[-2000:]
    assert "worker 0 started" not in done.stderr


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_supervisor_instead_of_restarting_for_ever(redis_server, tmp_path) -> None:
    """Worker 1's /metrics port (the metrics port + 1) is taken: it exits at every start; after
    FAILED_STARTS_MAX starts in a row the supervisor stops worker 0 and exits non-zero."""
    import socket

    from policyd.workers import FAILED_STARTS_MAX
    from tests.servers import free_port

    while True:  # a port taken, the one below it free (worker 0's)
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        worker_1_metrics = taken.getsockname()[1]
        try:
            with socket.socket() as below:
                below.bind(("127.0.0.1", worker_1_metrics - 1))
            break
        except OSError:
            taken.close()
    with taken:
        taken.listen()
        done = _serve_with_workers({
            "POLICYD_LISTEN": f"127.0.0.1:{free_port()}", "POLICYD_METRICS_LISTEN": f"127.0.0.1:{worker_1_metrics - 1}",
            "POLICYD_REDIS_URL": redis_server.url.rsplit("/", 1)[0] + "/9"}, tmp_path)  # a database no other test uses
    assert done.returncode != 0, done.stderr[-3000:]
    assert done.stderr.count(f"cannot serve /metrics on 127.0.0.1:{worker_1_metrics}") == FAILED_STARTS_MAX
    assert f"worker 1 exited with 1 {FAILED_STARTS_MAX} times in a row at its start; stopping" in done.stderr
    assert "policyd stopped" in done.stderr and "policyd workers stopped" in done.stderr
