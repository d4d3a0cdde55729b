"""One pipelined connection for the decision scripts (authorize, settle, release) on a single Redis.

redis-py's asyncio client takes a connection from its pool for every command, writes it, reads the
reply and gives the connection back: about 85 µs of Python a call, and a system call each way for
every command (measured: 11,800 script calls/s from one process at 32 in flight). Here every call
of one event-loop turn is written in one write on one connection and the replies are matched in
order as they arrive (Redis answers a connection's commands in the order it sent them): about 5 µs
a call, and Redis itself spends a third as much (73,000 calls/s, same measurement). Nothing else
changes: the same scripts, by EVALSHA (EVAL when Redis has forgotten them), the same errors as
redis-py (ConnectionError when Redis cannot be reached or drops the connection, TimeoutError when
the oldest call has waited `timeout` seconds: the connection is then dropped, as redis-py drops a
socket that timed out), so callers keep their failure modes and retries.

Used for plain TCP and Unix-socket Redis URLs; TLS, Redis Cluster and the embedded store keep
redis-py's own path (`ScriptLane.for_client` returns None for them).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Sequence

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

TIMEOUT_SECONDS = 5.0  # as redis-py's socket_timeout in counters.connect
CONNECT_TIMEOUT_SECONDS = 2.0


class _Connection(asyncio.Protocol):
    """Commands out in order, replies matched in order; every failure fails every call in flight."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.outgoing: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.alive = False
        self._flush_scheduled = False
        self._watch: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.alive = True

    def send(self, command: Sequence[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self.alive:
            future.set_exception(RedisConnectionError("Connection closed."))
            return future
        self.outgoing.append(hiredis.pack_command(tuple(command)))
        self.waiting.append((future, loop.time()))
        if not self._flush_scheduled:  # everything sent in this turn of the loop goes in one write
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        if self._watch is None:
            self._watch = loop.call_later(self.timeout, self._check_timeout)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.alive and self.outgoing and self.transport is not None:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.waiting:  # a reply nobody asked for: the stream cannot be trusted any more
                self._fail(RedisConnectionError("Redis sent a reply no call was waiting for"))
                return
            future, _ = self.waiting.popleft()
            if not future.done():  # a caller that was cancelled meanwhile takes no reply
                future.set_result(reply)

    def _check_timeout(self) -> None:
        self._watch = None
        if not self.waiting or not self.alive:
            return
        loop = asyncio.get_running_loop()
        waited = loop.time() - self.waiting[0][1]
        if waited >= self.timeout:
            self._fail(RedisTimeoutError("Timeout reading from Redis"))
        else:
            self._watch = loop.call_later(self.timeout - waited, self._check_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"Connection to Redis lost: {exc}" if exc else "Connection closed by server."))

    def _fail(self, error: Exception) -> None:
        self.alive = False
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.outgoing.clear()
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


class ScriptLane:
    def __init__(self, *, host: str = "", port: int = 6379, path: str = "", username: str | None = None,
                 password: str | None = None, db: int = 0, timeout: float = TIMEOUT_SECONDS,
                 connect_timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
        self.host, self.port, self.path = host, port, path
        self.username, self.password, self.db = username, password, db
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._connection: _Connection | None = None
        self._connecting = asyncio.Lock()

    @classmethod
    def for_client(cls, client: Any) -> ScriptLane | None:
        """A lane to the Redis a plain redis-py client talks to; None for TLS, a cluster, the embedded store."""
        if type(client) is not aioredis.Redis:
            return None
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
        common = {"username": kwargs.get("username"), "password": kwargs.get("password"), "db": int(kwargs.get("db") or 0)}
        if kwargs.get("credential_provider") is not None or issubclass(pool.connection_class, SSLConnection):
            return None
        if issubclass(pool.connection_class, UnixDomainSocketConnection):
            return cls(path=kwargs["path"], **common)
        if issubclass(pool.connection_class, Connection):
            return cls(host=kwargs.get("host", "localhost"), port=int(kwargs.get("port", 6379)), **common)
        return None

    async def run(self, sha: str, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """A script's reply: EVALSHA, and EVAL once when Redis does not know the script (restarted, flushed)."""
        connection = self._connection
        if connection is None or not connection.alive:
            connection = await self._connect()
        reply = await connection.send(("EVALSHA", sha, len(keys), *keys, *args))
        if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
            reply = await connection.send(("EVAL", source, len(keys), *keys, *args))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def _connect(self) -> _Connection:
        async with self._connecting:
            if self._connection is not None and self._connection.alive:
                return self._connection
            loop = asyncio.get_running_loop()
            where = self.path or f"{self.host}:{self.port}"
            try:
                if self.path:
                    opening = loop.create_unix_connection(lambda: _Connection(self.timeout), self.path)
                else:
                    opening = loop.create_connection(lambda: _Connection(self.timeout), self.host, self.port)
                _, connection = await asyncio.wait_for(opening, self.connect_timeout)
            except (OSError, TimeoutError) as error:
                raise RedisConnectionError(f"Error connecting to {where}: {error!r}") from error
            setup: list[tuple[Any, ...]] = []
            if self.password:
                setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
            if self.db:
                setup.append(("SELECT", self.db))
            for command in setup:
                reply = await connection.send(command)
                if isinstance(reply, ResponseError):
                    connection._fail(RedisConnectionError(f"{command[0]} refused by {where}"))
                    raise RedisConnectionError(f"{command[0]} refused by {where}: {reply}")
            self._connection = connection
            return connection

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection._fail(RedisConnectionError("Connection closed."))
            self._connection = None
