"""The decision scripts' pipelined connection (policyd/script_lane.py), against a real redis-server: replies
matched to their calls in order, scripts Redis forgot, errors, a restarted Redis, a stalled one, AUTH
and SELECT, and which clients get a lane at all."""

from __future__ import annotations

import asyncio
import hashlib
import signal
from typing import Iterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from policyd.counters import connect
from policyd.script_lane import ScriptLane
from tests.servers import RedisServer

ECHO = "redis.call('INCR', KEYS[1]); return {ARGV[1], redis.call('GET', KEYS[1])}"
FAILING = "return redis.error_reply('ERR policyd test failure')"


def sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


@pytest.fixture
def redis_alone() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


def lane_for(server: RedisServer, **overrides: object) -> ScriptLane:
    return ScriptLane(host="127.0.0.1", port=server.port, **overrides)  # type: ignore[arg-type]


async def test_replies_reach_their_own_callers_in_one_connection(redis_alone: RedisServer) -> None:
    lane = lane_for(redis_alone)
    replies = await asyncio.gather(*(lane.run(sha(ECHO), ECHO, ["n"], [f"call-{i}"]) for i in range(2_000)))
    assert [r[0] for r in replies] == [f"call-{i}".encode() for i in range(2_000)]
    assert sorted(int(r[1]) for r in replies) == list(range(1, 2_001))  # each ran once
    client = aioredis.Redis.from_url(redis_alone.url)
    # the lane's connection and this one: every call went over one connection
    assert len(await client.client_list()) == 2
    await client.aclose()
    await lane.aclose()


async def test_a_script_redis_forgot_is_sent_whole_and_errors_are_raised(redis_alone: RedisServer) -> None:
    lane = lane_for(redis_alone)
    client = aioredis.Redis.from_url(redis_alone.url)
    await client.script_flush()  # a restarted Redis knows no script: EVALSHA says NOSCRIPT
    assert (await lane.run(sha(ECHO), ECHO, ["n"], ["a"]))[0] == b"a"
    assert (await lane.run(sha(ECHO), ECHO, ["n"], ["b"]))[0] == b"b"
    with pytest.raises(ResponseError, match="policyd test failure"):
        await lane.run(sha(FAILING), FAILING, [], [])
    assert (await lane.run(sha(ECHO), ECHO, ["n"], ["c"]))[1] == b"3"  # the connection is still in step
    await client.aclose()
    await lane.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies(redis_alone: RedisServer) -> None:
    lane = lane_for(redis_alone)
    await lane.run(sha(ECHO), ECHO, ["n"], ["warm"])
    first = asyncio.ensure_future(lane.run(sha(ECHO), ECHO, ["n"], ["first"]))
    second = asyncio.ensure_future(lane.run(sha(ECHO), ECHO, ["n"], ["second"]))
    await asyncio.sleep(0)  # both sent in this turn
    first.cancel()
    assert (await second)[0] == b"second"
    assert (await lane.run(sha(ECHO), ECHO, ["n"], ["third"]))[0] == b"third"
    await lane.aclose()


async def test_a_restarted_redis_fails_the_calls_in_flight_then_serves_again(redis_alone: RedisServer) -> None:
    lane = lane_for(redis_alone)
    await lane.run(sha(ECHO), ECHO, ["n"], ["before"])
    redis_alone.stop()
    with pytest.raises(RedisConnectionError):
        await lane.run(sha(ECHO), ECHO, ["n"], ["down"])
    with pytest.raises(RedisConnectionError):  # nothing listens: connecting fails at once
        await lane.run(sha(ECHO), ECHO, ["n"], ["still down"])
    redis_alone.start()
    assert (await lane.run(sha(ECHO), ECHO, ["n"], ["after"]))[0] == b"after"  # a new connection; NOSCRIPT handled
    await lane.aclose()


async def test_a_stalled_redis_times_the_calls_out_and_the_connection_is_replaced(redis_alone: RedisServer) -> None:
    lane = lane_for(redis_alone, timeout=0.5)
    await lane.run(sha(ECHO), ECHO, ["n"], ["before"])
    assert redis_alone.process is not None
    redis_alone.process.send_signal(signal.SIGSTOP)
    try:
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(*(lane.run(sha(ECHO), ECHO, ["n"], [str(i)]) for i in range(10)),
                                       return_exceptions=True)
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert asyncio.get_running_loop().time() - started < 2
    finally:
        redis_alone.process.send_signal(signal.SIGCONT)
    # late replies of the timed-out calls never reach later callers: they go over a new connection
    replies = await asyncio.gather(*(lane.run(sha(ECHO), ECHO, ["n"], [f"after-{i}"]) for i in range(5)))
    assert [r[0] for r in replies] == [f"after-{i}".encode() for i in range(5)]
    await lane.aclose()


async def test_password_and_database_are_those_of_the_url(redis_alone: RedisServer) -> None:
    admin = aioredis.Redis.from_url(redis_alone.url)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    client = connect(f"redis://:s3cret@127.0.0.1:{redis_alone.port}/3")
    lane = ScriptLane.for_client(client)
    assert lane is not None
    assert (await lane.run(sha(ECHO), ECHO, ["in-db-3"], ["x"]))[1] == b"1"
    assert await client.get("in-db-3") == b"1"  # written in database 3, where redis-py reads
    await lane.aclose()
    await client.aclose()
    wrong = ScriptLane.for_client(connect(f"redis://:wrong@127.0.0.1:{redis_alone.port}/0"))
    assert wrong is not None
    with pytest.raises(RedisConnectionError, match="AUTH refused"):
        await wrong.run(sha(ECHO), ECHO, ["n"], ["x"])


def test_only_plain_redis_clients_get_a_lane(tmp_path) -> None:
    assert ScriptLane.for_client(connect("redis://127.0.0.1:1/0")) is not None
    assert ScriptLane.for_client(connect(f"unix://{tmp_path}/redis.sock")).path == f"{tmp_path}/redis.sock"
    assert ScriptLane.for_client(connect("rediss://127.0.0.1:1/0")) is None  # TLS: redis-py's own path
    assert ScriptLane.for_client(connect("")) is None  # the embedded store
    assert ScriptLane.for_client(connect("redis+cluster://127.0.0.1:1")) is None
