"""Fixtures: each engine test runs twice, on the embedded default (in-process store + SQLite)
and on real parts (redis-server + PostgreSQL)."""

from __future__ import annotations

import inspect
import os
import re
import secrets
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest

from policyd.server import Service
from policyd.settings import Settings
from tests.servers import PostgresServer, RedisServer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_POLICY = (ROOT / "policyd" / "samples" / "policy.yaml").read_text()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(params=["embedded", "real"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Settings for one backend: the embedded default, or real redis-server + PostgreSQL."""
    if request.param == "embedded":
        return {"redis_url": "", "database_url": f"sqlite:///{tmp_path / 'policyd.db'}"}
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    postgres: PostgresServer = request.getfixturevalue("postgres_server")
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return {"redis_url": redis_server.url,
            "database_url": postgres.create_database("t_" + secrets.token_hex(6))}


def make_settings(backend: dict[str, str], **overrides: object) -> Settings:
    values = {"partitions": 4, "writer_enabled": False, "sweeper_interval_ms": 60_000, **backend, **overrides}
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def service(backend: dict[str, str]) -> AsyncIterator[Service]:
    """A built, started policyd without the gRPC layer; the writer is drained by the tests."""
    svc = await Service.build(make_settings(backend))
    await svc.start()
    await svc.admin.apply_policy(SAMPLE_POLICY, "sample.yaml")
    yield svc
    await svc.close()


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("POLICYD_"):
            monkeypatch.delenv(name)


# A test that counts requests against a minute's window (the sample plan's key-rpm, a limit of window minute)
# expects them all in one minute: one that straddles a minute's end, on a loaded machine, finds a new window with
# room again. Such tests (their source names one) begin with at least MINUTE_LEFT_SECONDS of the minute left.
MINUTE_LEFT_SECONDS = 5
_COUNTS_A_MINUTE = re.compile(r'"minute"|window: minute|key-rpm|requests-minute|rate_limit_exceeded')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function is not None else ""
        except (OSError, TypeError):
            continue
        if _COUNTS_A_MINUTE.search(source):
            item.add_marker(pytest.mark.counts_a_minute)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker("counts_a_minute"):  # after its fixtures' setup, right before its body
        left = 60 - time.time() % 60
        if left < MINUTE_LEFT_SECONDS:
            time.sleep(left + 0.05)
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test through a gateway that failed shows why the gateway answered as it did: the requests of its access
    log that did not end 2xx or 4xx (a 503's response flags say whether policyd's decision or the provider's
    connection failed), and the end of Envoy's own log."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    # the test's gateway: whichever of its fixtures keeps an access log (tests/test_gateway.py, test_gateway_replicas)
    gateway = next((value for value in getattr(item, "funcargs", {}).values() if hasattr(value, "access_log")), None)
    if report.when != "call" or not report.failed or gateway is None:
        return
    time.sleep(0.5)  # Envoy writes its access log out every 200 ms (start_envoy)
    shown = []
    for source in ("access_log", "envoy_log"):
        path = getattr(gateway, source, None)
        if path is None or not Path(path).exists():
            continue
        lines = Path(path).read_text(errors="replace").splitlines()
        if source == "access_log":
            lines = [line for line in lines if not re.search(r'"status":"?[24]\d\d', line)]
        shown.append(f"{path}:\n" + "\n".join(lines[-30:]))
    if shown:
        report.sections.append(("what the gateway said", "\n\n".join(shown)))
