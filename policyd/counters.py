"""Counters in Redis, changed only by the Lua scripts in policyd/lua/.

One typed wrapper per script. The same scripts run on a real Redis (or Redis
Cluster) and on the embedded store (fakeredis with a Lua runtime), which is one
more implementation of the same client interface, not a special case.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, NamedTuple, Sequence

import redis.asyncio as aioredis

from policyd import compact_json, redis_keys
from policyd.money import AMOUNT_MAX
from policyd.script_lane import ScriptLane


def _load(name: str) -> str:
    return resources.files("policyd").joinpath("lua", f"{name}.lua").read_text()


def whose_of(customer_id: str, provider: str, route: str, account: str, context_tokens: int = 0, model: str = "",
             kept_seconds: int = 0) -> str:
    """A stored response's owner, where it lives, and the tokens a request that continues it carries as input
    unseen (its input and output: all of it goes back to the model), as its key holds them; an explicit cache's
    also its model and the seconds of its life charged so far (from its making)."""
    return "\t".join((customer_id, provider, route, account, str(context_tokens), model, str(kept_seconds)))


class Whose(NamedTuple):
    """A stored response's key as whose_of wrote it (fields an older key lacks: empty, 0)."""

    customer_id: str
    provider: str
    route: str
    account: str
    context_tokens: int
    model: str
    kept_seconds: int

    @classmethod
    def read(cls, text: str) -> "Whose":
        customer, provider, route, account, context, model, kept = [*text.split("\t"), "", "", "", "", "", ""][:7]
        return cls(customer, provider, route, account, int(context) if context.isdigit() else 0, model,
                   int(kept) if kept.isdigit() else 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _config_value(reply: Any, name: str) -> str:
    """One setting of a CONFIG GET reply (its keys bytes or text)."""
    return _text(reply.get(name, reply.get(name.encode(), ""))) if isinstance(reply, dict) else ""


REDIS_CONNECTIONS_MAX = 64
REDIS_POOL_WAIT_SECONDS = 5.0

try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    hiredis = None


class _HiredisPacking:
    """Commands packed by hiredis in C, as redis-py's synchronous client does; its asyncio client packs
    them in Python, argument by argument (a fifth of the engine's profiled time, with scripts of about
    thirty arguments)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str):
            args = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            args = tuple(args[0].split()) + args[1:]
        return [hiredis.pack_command(args)]


def _with_hiredis_packing(connection_class: type) -> type:
    if hiredis is None or not hasattr(hiredis, "pack_command"):
        return connection_class
    return type(f"Hiredis{connection_class.__name__}", (_HiredisPacking, connection_class), {})


def connect(url: str, connections_max: int = REDIS_CONNECTIONS_MAX) -> aioredis.Redis:
    """A client for `url`, or the embedded in-process store when `url` is empty.

    The pool blocks (up to REDIS_POOL_WAIT_SECONDS) when every connection is busy, so a burst
    of requests queues for a connection instead of failing."""
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        # a Redis Cluster: every script touches the keys of one owner partition, which share a hash slot
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(url.replace("+cluster", "", 1), decode_responses=False,
                                     max_connections=connections_max, socket_timeout=5, socket_connect_timeout=2)
    if not url:
        import fakeredis

        return fakeredis.FakeAsyncRedis(
            server=fakeredis.FakeServer(), decode_responses=False,
            connection_pool_class=aioredis.BlockingConnectionPool, max_connections=connections_max,
            timeout=REDIS_POOL_WAIT_SECONDS,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=connections_max, timeout=REDIS_POOL_WAIT_SECONDS, decode_responses=False,
        socket_timeout=5, socket_connect_timeout=2, health_check_interval=30,
    )
    pool.connection_class = _with_hiredis_packing(pool.connection_class)
    return aioredis.Redis(connection_pool=pool)


def unreachable(error: BaseException) -> bool:
    """Whether an error says the counters could not be used just now (worth retrying): the network,
    a partition's closed gate (a rebuild, counters lost), or anything redis-py raises (its own
    ConnectionError and TimeoutError classes, a cluster's failover, a replica that is read-only, a server
    still loading)."""
    return isinstance(error, (ConnectionError, OSError, TimeoutError, Fenced)) or \
        type(error).__module__.startswith("redis")


class Fenced(Exception):
    """The partition's gate is not open: its counters are being rebuilt from SQL, or Redis lost them (and
    a rebuild is due); nothing may change them until they are whole again."""

    def __init__(self, partition: int) -> None:
        super().__init__(f"partition {partition} is being rebuilt")
        self.partition = partition


@dataclass(frozen=True)
class BucketHold:
    """A quota bucket a request counts against, and what it holds there."""

    key: str
    label: str
    unit: str  # money | tokens | requests
    amount: int
    limit: int
    mode: str  # block | shadow (downgrade is decided by the engine, the script blocks)
    ttl_seconds: int
    thresholds: tuple[tuple[int, int], ...]  # (percent, used amount that crosses it)

    def args(self) -> list[str]:
        marks = ",".join(f"{pct}:{amount}" for pct, amount in self.thresholds)
        return [str(self.amount), str(self.limit), self.mode, str(self.ttl_seconds), marks, self.label]


@dataclass(frozen=True)
class EndUserTerms:
    """The end user a decision looked up the own limits of, and the stamp of those it decided under."""
    customer_id: str
    end_user_id: str
    stamp: str  # key_limits.end_user_stamp: "" for none
    paused: bool = False  # its requests refused (end_user_paused)


@dataclass(frozen=True)
class AuthorizeResult:
    outcome: str  # allow | deny | exists | stale (the key's terms changed since it was read, or the end user's)
    reason: str = ""  # stale: key | end_user
    label: str = ""
    reserved: int = 0
    shadow: tuple[str, ...] = ()
    used: tuple[int, ...] = ()  # allowed: each bucket's use once this request is held there, in the holds' order
    state: str = ""
    same_key: bool = True
    room: int = -1  # denied by the wallet or a limit: what it could still hold (-1: another denial)


@dataclass(frozen=True)
class SettleResult:
    outcome: str  # settled | settled_late | exists | conflict | released | unknown
    balance_before: int = 0
    balance_after: int = 0


# how long a closed request's reservation answers retries of its Settle or Release and of its id, by default
# (24 h, as long as idempotency keys commonly last; settings: closed_request_retention_seconds)
RESULT_RETENTION_SECONDS = 86400
REQUEST_INDEX_MARGIN_SECONDS = 3600
STORED_RESPONSE_SECONDS = 30 * 86400  # how long the provider keeps a stored response (OpenAI: 30 days)
# how long Redis holds whose a stored response is; older ones are found in their usage records (and held again)
STORED_RESPONSE_HOT_SECONDS = 86400
UPLOAD_BEGINNING_SECONDS = 3600  # a Gemini upload's beginning, until its reply is read
UPLOAD_SECONDS = 7 * 86400  # a Gemini upload, its bytes sent within (Google keeps an upload session a week)
UNKNOWN_STORED_SECONDS = 60  # an id no record names is not looked for in SQL again for this long
RECENT_RESERVATIONS_MAX = 20_000  # open reservations this process made whose facts it keeps (a few KB each)


@dataclass(frozen=True)
class Reservation:
    request_id: str
    partition: int
    state: str
    amount: int
    expires_ms: int
    fields: dict[str, Any]  # what policyd stored at authorize: {"record": ..., "input_tokens_estimate": ...}
    record_json: str = ""  # the record as this process encoded it at authorize (empty when read from Redis)

    @property
    def record(self) -> dict[str, Any]:
        """The usage record as it was at Authorize: owner, wallet, models, versions, holds."""
        return self.fields["record"]


# What a closed reservation (settled, released) keeps of the facts stored at Authorize, for as long as it answers
# retries: what the engine reads to answer a retried Settle (its fingerprint and its answer) or Release, and a
# client naming the request again. The rest (attribution, tags, holds) is in SQL by then, sent with its events.
# Each is a field of its own (`r.<name>` of the record, `f.<name>` beside it, its value as JSON), so Redis keeps
# the hash as a listpack of a few hundred bytes; kept whole, as the JSON of field `r`, it took ~2 KB a request.
CLOSED_RECORD_FIELDS = ("request_id", "created_ms", "customer_id", "wallet_id", "api_key_id", "plan", "endpoint",
                        "served_model", "policy_version", "price_table_version", "billing_mode", "currency",
                        "max_output_tokens", "choices", "containers", "container_memory", "image_model")
CLOSED_FIELDS = ("input_tokens_estimate", "seconds_estimate", "audio_tokens_estimate", "image_scale", "images",
                 "call_token", "search_units", "search_units_likely", "video_seconds", "cache_tokens",
                 "cache_kept_seconds", "geo", "web_results", "fallbacks")


def closed_facts(reservation: Reservation) -> list[str]:
    """The fields a closed reservation keeps in place of its whole facts, as name, value, name, value..."""
    pairs: list[str] = []
    for prefix, source, names in (("r.", reservation.record, CLOSED_RECORD_FIELDS),
                                  ("f.", reservation.fields, CLOSED_FIELDS)):
        for name in names:
            if name in source:
                pairs += [prefix + name, compact_json.dumps(source[name])]
    return pairs


def _facts(data: dict[str, str]) -> dict[str, Any]:
    """The facts of a reservation as stored: whole in field `r` while it may still be settled, else those a
    closed one keeps (closed_facts)."""
    if "r" in data:
        return json.loads(data["r"])
    record: dict[str, Any] = {"holds": []}
    fields: dict[str, Any] = {"record": record}
    for name, value in data.items():
        if name.startswith("r."):
            record[name[2:]] = compact_json.loads(value)
        elif name.startswith("f."):
            fields[name[2:]] = compact_json.loads(value)
    return fields


@dataclass(frozen=True)
class ClosedRequest:
    """A request closed before Redis lost its data, as its record in SQL tells it: its reservation (its facts
    as SQL keeps them), when it closed, and for a settled one what its Settle answered."""

    reservation: Reservation  # state settled, released or expired
    key: str  # its key's state hash
    closed_ms: int
    fingerprint: str = ""
    balance_before: int = 0
    balance_after: int = 0

    def hash_fields(self) -> list[str]:
        """The reservation's hash as settle.lua or release.lua leaves it, as field, value, ..."""
        r = self.reservation
        common = ["key", self.key, "amount", str(r.amount), "expires", str(r.expires_ms),
                  "created", str(r.record["created_ms"])]
        if r.state == "expired":  # a late settle prices it by every fact, charges its holds
            return ["state", "expired", "wallet", "1", *common, "r", compact_json.dumps(r.fields)]
        if r.state == "settled":
            common += ["fingerprint", self.fingerprint, "balance_before", str(self.balance_before),
                       "balance_after", str(self.balance_after)]
        return ["state", r.state, *common, *closed_facts(r)]


class Counters:
    def __init__(self, client: aioredis.Redis, partitions: int, retention_seconds: int = RESULT_RETENTION_SECONDS,
                 reservation_ttl_seconds: int = 660) -> None:
        self.client = client
        self.partitions = partitions
        self.retention_seconds = retention_seconds
        # a request id is found as long as its reservation is: open (its TTL, and a hold as long again), then closed
        self.request_index_seconds = retention_seconds + 2 * reservation_ttl_seconds + REQUEST_INDEX_MARGIN_SECONDS
        self.cluster = type(client).__name__ == "RedisCluster"
        self._recent: OrderedDict[str, Reservation] = OrderedDict()
        self._authorize = client.register_script(_load("authorize"))
        self._settle = client.register_script(_load("settle"))
        self._release = client.register_script(_load("release"))
        self._grant = client.register_script(_load("grant"))
        self._key_state = client.register_script(_load("key_state"))
        self._expire_credit = client.register_script(_load("expire_credit"))
        self._extend_hold = client.register_script(_load("extend_hold"))
        self._restore_closed = client.register_script(_load("restore_closed"))
        self._claim_polls = client.register_script(_load("claim_polls"))
        self._end_claim = client.register_script(_load("end_claim"))
        self._reset_limit = client.register_script(_load("reset_limit"))
        self._seed_bucket = client.register_script(_load("seed_bucket"))
        # the scripts every request runs go through one pipelined connection where redis-py's pool is not needed
        self._lane = ScriptLane.for_client(client)
        # told whenever a script finds its partition's gate closed (Service: a rebuild when the counters are lost)
        self.on_fenced: Callable[[], None] | None = None

    def _fenced(self, partition: int) -> Fenced:
        if self.on_fenced is not None:
            self.on_fenced()
        return Fenced(partition)

    async def gates(self) -> list[str | None]:
        """Each partition's gate: open, rebuilding, broken (a rebuild failed), or None (its counters lost)."""
        found = await asyncio.gather(*(self.client.get(redis_keys.gate(p)) for p in range(self.partitions)))
        return [_text(g) if g is not None else None for g in found]

    async def eviction_policy(self) -> str:
        """Redis's maxmemory-policy when it evicts keys once full (a maxmemory, any policy but noeviction);
        "" when it never does, or will not say (managed Redis may refuse CONFIG)."""
        try:
            policy = _config_value(await self.client.config_get("maxmemory-policy"), "maxmemory-policy")
            limit = _config_value(await self.client.config_get("maxmemory"), "maxmemory")
        except Exception:
            return ""
        return policy if policy and policy != "noeviction" and limit not in ("", "0") else ""

    async def _decide(self, script: Any, keys: list[str], args: list[str]) -> Any:
        """Run one of the per-request scripts (authorize, settle, release)."""
        if self._lane is None:
            return await script(keys=keys, args=args)
        return await self._lane.run(script.sha, script.script, keys, args)

    async def aclose(self) -> None:
        if self._lane is not None:
            await self._lane.aclose()
        await self.client.aclose()

    def partition_of(self, owner_id: str) -> int:
        return redis_keys.partition_of(owner_id, self.partitions)

    async def set_key_state(self, customer_id: str, key_id: str, status: str, secrets: list[tuple[str, int]],
                            now_ms: int, expires_ms: int = 0, terms: str = "", plan: str = "") -> None:
        """`expires_ms`: when the key itself ends (0 = never), whatever its secrets; `terms`: the
        fingerprint of its terms, plan, scopes and own limits (store.key_terms); `plan`: recorded with the change."""
        partition = self.partition_of(customer_id)
        args: list[str] = [status, str(now_ms), key_id, customer_id, str(expires_ms), terms, plan]
        for secret_hash, secret_expires_ms in secrets:
            args += [secret_hash, str(secret_expires_ms)]
        await self._key_state(keys=[redis_keys.key_state(partition, key_id), redis_keys.events(partition)], args=args)

    def queue_key_state(self, pipe: Any, customer_id: str, key_id: str, status: str,
                        secrets: list[tuple[str, int]], expires_ms: int = 0, terms: str = "") -> None:
        """The same state as set_key_state, queued on a pipeline and recorded as no change: for a rebuild,
        whose closed gates keep every decision off the partitions meanwhile (so no script is needed to order
        them, and a Redis Cluster's pipelines, which refuse scripts, take it too)."""
        key = redis_keys.key_state(self.partition_of(customer_id), key_id)
        pipe.delete(key)
        pipe.hset(key, mapping={"status": status, "expires": str(expires_ms), "terms": terms,
                                **{f"h:{secret_hash}": str(secret_expires_ms) for secret_hash, secret_expires_ms in secrets}})

    async def authorize(
        self,
        *,
        partition: int,
        request_id: str,
        key_id: str,
        customer_id: str,
        secret_hash: str,
        now_ms: int,
        expires_ms: int,
        check_wallet: bool,
        amount: int,
        concurrency_cap: int,
        payload: str,
        reservation_fields: str,
        preset_denial: str,
        terms: str,
        buckets: list[BucketHold],
        end_user: EndUserTerms | None = None,
    ) -> AuthorizeResult:
        """`customer_id`: the wallet's id (a customer's, or "<customer>/<workspace>"); `end_user`: the end user
        whose own limits the decision was made under, checked against their stamp in Redis (none: the script
        reads no end users' terms, given a name in the partition all the same)."""
        keys = [
            redis_keys.key_state(partition, key_id),
            redis_keys.wallet(partition, customer_id),
            redis_keys.reservation(partition, request_id),
            redis_keys.deadlines(partition),
            redis_keys.inflight(partition, key_id),
            redis_keys.events(partition),
            redis_keys.gate(partition),
            redis_keys.end_user_terms(partition, end_user.customer_id if end_user else ""),
            *[b.key for b in buckets],
        ]
        args: list[str] = [
            request_id, secret_hash, str(now_ms), str(expires_ms), "1" if check_wallet else "0",
            str(amount), str(concurrency_cap), payload, reservation_fields, preset_denial, terms,
            end_user.end_user_id if end_user else "", end_user.stamp if end_user else "", str(len(buckets)),
        ]
        for b in buckets:
            args += b.args()
        if self.cluster:  # the request index lives in another slot: its own round trip
            index = redis_keys.request_index(request_id)
            if not await self.client.set(index, str(partition), ex=self.request_index_seconds, nx=True) \
                    and _text(await self.client.get(index) or str(partition)) != str(partition):
                # a request id names one request in every partition: this one is another partition's request's
                return AuthorizeResult("exists", state="elsewhere", same_key=False)
        else:  # one round trip: the script sets the index too
            keys.append(redis_keys.request_index(request_id))
            args += [str(partition), str(self.request_index_seconds)]
        reply = await self._decide(self._authorize, keys, args)
        outcome = _text(reply[0])
        if outcome == "fenced":
            raise self._fenced(partition)
        if outcome == "allow":
            shadow = _text(reply[2])
            used = _text(reply[3]) if len(reply) > 3 else ""
            return AuthorizeResult("allow", reserved=int(reply[1]), shadow=tuple(s for s in shadow.split("|") if s),
                                   used=tuple(int(u) for u in used.split(",") if u))
        if outcome == "deny":
            return AuthorizeResult("deny", reason=_text(reply[1]), label=_text(reply[2]),
                                   room=int(reply[3]) if len(reply) > 3 else -1)
        if outcome == "stale":
            return AuthorizeResult("stale", reason=_text(reply[1]) if len(reply) > 1 else "key")
        return AuthorizeResult("exists", state=_text(reply[1]), same_key=_text(reply[2]) == "1")

    async def stored_end_user_stamp(self, customer_id: str, end_user_id: str) -> str:
        """The stamp of an end user's own limits in Redis ("" for none), as the authorize script reads it."""
        partition = self.partition_of(customer_id)
        return _text(await self.client.hget(redis_keys.end_user_terms(partition, customer_id), end_user_id) or b"")

    def remember(self, reservation: Reservation) -> None:
        """Keep the facts of a reservation this process just made, so its Settle or Release (most often
        sent to the same process) needs one round trip to Redis instead of three. The facts never
        change after Authorize; the state is checked by the settle/release scripts themselves."""
        self._recent[reservation.request_id] = reservation
        if len(self._recent) > RECENT_RESERVATIONS_MAX:
            self._recent.popitem(last=False)

    def forget(self, request_id: str) -> None:
        self._recent.pop(request_id, None)

    async def find_reservation(self, request_id: str) -> Reservation | None:
        """The facts of a reservation (its state may be stale: the scripts check it)."""
        recent = self._recent.get(request_id)
        if recent is not None:
            return recent
        partition = await self.client.get(redis_keys.request_index(request_id))
        if partition is None:
            return None
        return await self.read_reservation(int(partition), request_id)

    async def read_reservation(self, partition: int, request_id: str) -> Reservation | None:
        raw = await self.client.hgetall(redis_keys.reservation(partition, request_id))
        if not raw:
            return None
        data = {_text(k): _text(v) for k, v in raw.items()}
        return Reservation(
            request_id=request_id,
            partition=partition,
            state=data["state"],
            amount=int(data["amount"]),
            expires_ms=int(data["expires"]),
            fields=_facts(data),
        )

    async def settle(
        self,
        reservation: Reservation,
        *,
        customer_id: str,
        key_id: str,
        now_ms: int,
        fingerprint: str,
        charge: int,
        payload: str,
        bucket_deltas: list[tuple[str, int, int]],  # (key, delta while reserved, delta after expiry)
        balance_alerts: tuple[int, ...] = (),  # balances whose crossing downward is an alert (the plan's)
    ) -> SettleResult:
        p = reservation.partition
        keys = [
            redis_keys.reservation(p, reservation.request_id),
            redis_keys.wallet(p, customer_id),
            redis_keys.deadlines(p),
            redis_keys.inflight(p, key_id),
            redis_keys.events(p),
            redis_keys.gate(p),
            redis_keys.expiring_credits(p, customer_id),
            redis_keys.credit_left(p, customer_id),
            *[key for key, _, _ in bucket_deltas],
        ]
        args = [
            reservation.request_id, str(now_ms), fingerprint, str(charge), str(-charge),
            str(self.retention_seconds), payload, str(len(bucket_deltas)),
        ]
        for _, while_reserved, after_expiry in bucket_deltas:
            args += [str(while_reserved), str(after_expiry)]
        args += [",".join(str(amount) for amount in balance_alerts), customer_id, *closed_facts(reservation)]
        reply = await self._decide(self._settle, keys, args)
        outcome = _text(reply[0])
        if outcome == "fenced":
            raise self._fenced(p)
        if outcome in ("settled", "settled_late", "exists"):
            return SettleResult(outcome, int(reply[1]), int(reply[2]))
        return SettleResult(outcome)

    async def release(
        self,
        reservation: Reservation,
        *,
        customer_id: str,
        key_id: str,
        now_ms: int,
        target: str,  # released | expired
        reason: str,
        bucket_releases: list[tuple[str, int]],  # (key, negative held amount)
    ) -> tuple[str, str]:
        p = reservation.partition
        keys = [
            redis_keys.reservation(p, reservation.request_id),
            redis_keys.wallet(p, customer_id),
            redis_keys.deadlines(p),
            redis_keys.inflight(p, key_id),
            redis_keys.events(p),
            redis_keys.gate(p),
            *[key for key, _ in bucket_releases],
        ]
        args = [reservation.request_id, str(now_ms), target, reason, str(self.retention_seconds),
                str(len(bucket_releases))]
        args += [str(amount) for _, amount in bucket_releases]
        if target == "released":  # an expired one may still be settled (late): it keeps every fact
            args += closed_facts(reservation)
        reply = await self._decide(self._release, keys, args)
        if _text(reply[0]) == "fenced":
            raise self._fenced(p)
        return _text(reply[0]), _text(reply[1]) if len(reply) > 1 else ""

    async def restore_closed(self, closed: Sequence[ClosedRequest], now_ms: int) -> int:
        """Closed reservations written back after Redis lost its data, from their records (a rebuild), for what
        is left of their retention: a retry of one (a client's id, a Settle, a Release) is answered as before
        the loss, not served and charged again. Each only where its id is free: decisions run meanwhile, and a
        request that named the id since keeps it (one denied since, which holds no reservation, does not).
        Returns the number written."""
        live = [c for c in closed if c.closed_ms + self.retention_seconds * 1000 > now_ms]
        if not live:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for c in live:  # the id first (where no request holds it now), then the reservation under it
            index_ms = c.reservation.fields["record"]["created_ms"] + self.request_index_seconds * 1000
            pipe.set(redis_keys.request_index(c.reservation.request_id), str(c.reservation.partition), nx=True,
                     px=max(index_ms - now_ms, c.closed_ms + self.retention_seconds * 1000 - now_ms))
        taken = await pipe.execute()
        held = [c for c, ok in zip(live, taken) if not ok]
        if held:  # an id indexed already: its own partition's (a request denied since, say), or another's
            pipe = self.client.pipeline(transaction=False)
            for c in held:
                pipe.get(redis_keys.request_index(c.reservation.request_id))
            ours = {c.reservation.request_id for c, partition in zip(held, await pipe.execute())
                    if partition is not None and _text(partition) == str(c.reservation.partition)}
        else:
            ours = set()
        by_partition: dict[int, tuple[list[str], list[str]]] = {}
        for c, free in zip(live, taken):
            if free or c.reservation.request_id in ours:  # the script writes it only where no request holds it
                keys, args = by_partition.setdefault(c.reservation.partition, ([], []))
                fields = c.hash_fields()
                keys.append(redis_keys.reservation(c.reservation.partition, c.reservation.request_id))
                args += [str((c.closed_ms + self.retention_seconds * 1000 - now_ms + 999) // 1000),
                         str(len(fields) // 2), *fields]
        written = 0
        for keys, args in by_partition.values():  # one script a partition: its keys share its slot
            written += int(await self._restore_closed(keys=keys, args=args))
        return written

    async def grant(self, partition: int, customer_id: str, grant_id: str, amount: int, now_ms: int, payload: str,
                    expires_ms: int = 0, returned: Sequence[tuple[str, int]] = ()) -> tuple[str, int]:
        """Credit a wallet once per grant id; a refund's grant also gives back `returned` (bucket key, nanos)."""
        reply = await self._grant(
            keys=[
                redis_keys.wallet(partition, customer_id),
                redis_keys.grant_marker(partition, grant_id),
                redis_keys.events(partition),
                redis_keys.gate(partition),
                redis_keys.expiring_credits(partition, customer_id),
                redis_keys.credit_left(partition, customer_id),
                redis_keys.credit_deadlines(partition),
                *(key for key, _ in returned),
            ],
            args=[grant_id, str(amount), str(now_ms), payload, str(AMOUNT_MAX), str(expires_ms), customer_id,
                  str(len(returned)), *(str(nanos) for _, nanos in returned)],
        )
        if _text(reply[0]) == "fenced":
            raise self._fenced(partition)
        return _text(reply[0]), int(reply[1])

    async def expire_credit(self, partition: int, customer_id: str, grant_id: str, now_ms: int) -> tuple[str, int]:
        reply = await self._expire_credit(
            keys=[
                redis_keys.wallet(partition, customer_id),
                redis_keys.expiring_credits(partition, customer_id),
                redis_keys.credit_left(partition, customer_id),
                redis_keys.credit_deadlines(partition),
                redis_keys.events(partition),
                redis_keys.gate(partition),
            ],
            args=[grant_id, str(now_ms), customer_id],
        )
        if _text(reply[0]) == "fenced":
            raise self._fenced(partition)
        return _text(reply[0]), int(reply[1])

    async def key_status(self, customer_id: str, key_id: str, secret_hash: str, now_ms: int, terms: str = "") -> str:
        """active | paused | revoked | expired | invalid (this secret does not open the key), as authorize.lua
        reads them; stale when the key is active under other terms than `terms` (its plan, scopes or limits changed)."""
        status, expiry, key_expiry, key_terms = await self.client.hmget(
            redis_keys.key_state(self.partition_of(customer_id), key_id), "status", f"h:{secret_hash}", "expires",
            "terms")
        if status is None or expiry is None:
            return "invalid"
        if _text(status) != "revoked" and key_expiry is not None and _text(key_expiry) != "0" \
                and int(key_expiry) <= now_ms:
            return "expired"
        if _text(expiry) != "0" and int(expiry) <= now_ms:
            return "invalid"
        if _text(status) == "active" and terms and key_terms and _text(key_terms) not in ("", terms):
            return "stale"
        return _text(status)

    async def remember_response(self, response_id: str, customer_id: str, provider: str, route: str, account: str,
                                seconds: int, context_tokens: int = 0, model: str = "", kept_seconds: int = 0) -> None:
        """That the provider stored this response (or conversation, or explicit cache: its `model`, and the
        seconds of its life charged) for this customer, on this provider, route and account, holding
        `context_tokens`. The first to make it keeps it: an id is the provider's, never made twice."""
        await self.client.set(redis_keys.stored_response(response_id),
                              whose_of(customer_id, provider, route, account, context_tokens, model, kept_seconds),
                              ex=seconds, nx=True)

    async def cache_kept(self, name: str, kept_seconds: int, seconds: int) -> None:
        """An explicit cache's life charged now runs `kept_seconds` from its making (or what was charged before,
        where longer), remembered `seconds` more."""
        key = redis_keys.stored_response(name)
        whose = await self.client.get(key)
        if whose is None:
            return
        found = Whose.read(_text(whose))
        await self.client.set(key, whose_of(*found._replace(kept_seconds=max(found.kept_seconds, kept_seconds))),
                              xx=True, ex=seconds)

    async def claim_cache_change(self, name: str, request_id: str, seconds: int) -> bool:
        """That this request changes an explicit cache's time to live, for `seconds` at most (its hold's life):
        False while another request does."""
        return await self.claim(redis_keys.cache_change(name), request_id, seconds)

    async def end_cache_change(self, name: str, request_id: str) -> None:
        """The request's change of the cache ended (settled or released): the next may begin."""
        await self.end_claim(redis_keys.cache_change(name), request_id)

    async def claim(self, key: str, holder: str, seconds: int) -> bool:
        """That `holder` alone does what `key` names, for `seconds` at most: False while another does."""
        return bool(await self.client.set(key, holder, nx=True, ex=max(1, seconds)))

    async def end_claim(self, key: str, holder: str) -> None:
        """The holder is done: the next may begin (a claim that ran out and was taken by another stays the other's)."""
        await self._end_claim(keys=[key], args=[holder])

    async def reset_limit(self, partition: int | None, bucket_key: str, amount: int,
                          alerts: Mapping[str, int] | None = None, floor: int = 0) -> tuple[int, int] | None:
        """Take `amount` (at most what it holds) out of a limit's bucket, arming again the alerts (field -> the
        amount that crosses it: quotas.alert_fields) its count is now below: (taken, what it holds after), or None
        when the bucket holds nothing in this window (absent). `partition`: the customer's, whose gate must be open
        (None: a cap's bucket, no partition's); `floor`: the least it may hold after (below zero: a carry)."""
        pairs = [str(v) for field, at in (alerts or {}).items() for v in (field, at)]
        keys = [bucket_key] if partition is None else [bucket_key, redis_keys.gate(partition)]
        reply = await self._reset_limit(keys=keys, args=[str(amount), str(min(floor, 0)), *pairs])
        outcome = _text(reply[0])
        if outcome == "fenced":
            raise self._fenced(partition or 0)
        if outcome == "absent":
            return None
        return int(reply[1]), int(reply[2])

    async def seed_bucket(self, bucket_key: str, amount: int, ttl_seconds: int, partition: int | None,
                          only_new: bool = True) -> int | None:
        """Start a limit's bucket from the use before the limit bound (bucket_seeds.py): what it holds after, or
        None when it counts already (`only_new`: its window's use is in it). `partition`: the customer's, whose
        gate must be open (None: a cap's bucket, no partition's); `ttl_seconds`: its life once made (0: for good)."""
        keys = [bucket_key] if partition is None else [bucket_key, redis_keys.gate(partition)]
        reply = await self._seed_bucket(keys=keys, args=["new" if only_new else "add", str(amount),
                                                          str(max(ttl_seconds, 0))])
        outcome = _text(reply[0])
        if outcome == "fenced":
            raise self._fenced(partition or 0)
        return None if outcome == "counting" else int(reply[1])

    @staticmethod
    def queue_stored_response(pipe: Any, response_id: str, customer_id: str, provider: str, route: str, account: str,
                              seconds: int, context_tokens: int = 0, model: str = "", kept_seconds: int = 0) -> None:
        """The same as remember_response, queued on a pipeline (a rebuild's)."""
        pipe.set(redis_keys.stored_response(response_id),
                 whose_of(customer_id, provider, route, account, context_tokens, model, kept_seconds),
                 ex=seconds, nx=True)

    async def grow_context(self, response_id: str, context_tokens: int) -> None:
        """A conversation answered in now holds `context_tokens` (the last answer's input and output); its
        owner and place stay. Not a counter of money: the last answer settled wins."""
        key = redis_keys.stored_response(response_id)
        whose = await self.client.get(key)
        if whose is not None:
            found = Whose.read(_text(whose))
            await self.client.set(key, whose_of(*found[:4], context_tokens), xx=True, keepttl=True)

    async def upload_beginning(self, request_id: str, secret_hash: str) -> None:
        """A Gemini upload begun with this key secret (its hash), its upload id not yet known (its reply's)."""
        await self.client.set(redis_keys.upload_began(request_id), secret_hash, ex=UPLOAD_BEGINNING_SECONDS)

    async def upload_begun(self, request_id: str, upload: str) -> None:
        """The upload a request began (its reply named it): its bytes are sent as the key it was begun with."""
        secret_hash = await self.client.get(redis_keys.upload_began(request_id))
        if secret_hash is not None:
            await self.client.set(redis_keys.gemini_upload(upload), secret_hash, ex=UPLOAD_SECONDS)

    async def upload_key(self, upload: str) -> str | None:
        """The key secret (its hash) a Gemini upload was begun with, None when policyd knows no such upload."""
        found = await self.client.get(redis_keys.gemini_upload(upload))
        return None if found is None else _text(found)

    async def known_unknown(self, response_id: str) -> bool:
        """Whether this id was looked for in SQL a moment ago and not found."""
        return bool(await self.client.exists(redis_keys.unknown_stored(response_id)))

    async def note_unknown(self, response_id: str) -> None:
        await self.client.set(redis_keys.unknown_stored(response_id), "1", ex=UNKNOWN_STORED_SECONDS)

    async def stored_response(self, response_id: str) -> str | None:
        """Whose a stored response is and where (as remember_response was told), or None when unknown."""
        raw = await self.client.get(redis_keys.stored_response(response_id))
        return raw.decode() if isinstance(raw, bytes) else raw

    async def wallet(self, customer_id: str) -> tuple[int, int]:
        raw = await self.client.hmget(redis_keys.wallet(self.partition_of(customer_id), customer_id), "balance", "reserved")
        return int(raw[0] or 0), int(raw[1] or 0)

    async def extend_hold(self, reservation: Reservation, key_id: str, until_ms: int, now_ms: int = 0,
                          background: bool = False, poll: tuple[int, str] | None = None) -> str:
        """Keep a reservation past its deadline until `until_ms` (extend_hold.lua), its key's concurrency slot
        returned: extended | already | unknown. `background`: a background response's (background.py), the
        new deadline kept in SQL; `poll`: (when, what) to ask its provider for it."""
        p = reservation.partition
        keys = [redis_keys.reservation(p, reservation.request_id), redis_keys.deadlines(p),
                redis_keys.inflight(p, key_id), redis_keys.gate(p)]
        args = [reservation.request_id, str(until_ms)]
        if background:
            keys.append(redis_keys.events(p))
            args.append(str(now_ms))
        if background and poll is not None:
            keys += [redis_keys.background_polls(p), redis_keys.polled_response(p, poll[1].partition("\n")[2])]
            args += [str(poll[0]), poll[1]]
        reply = await self._decide(self._extend_hold, keys, args)
        if _text(reply[0]) == "fenced":
            raise self._fenced(p)
        return _text(reply[0])

    async def claim_polls(self, partition: int, now_ms: int, next_ms: int, count: int) -> list[tuple[str, str]]:
        """The background responses due to be asked for in a partition, claimed until next_ms: (request id,
        what to ask: its reservation's field `poll`, "" when the reservation is gone)."""
        claimed = [_text(r) for r in await self._claim_polls(
            keys=[redis_keys.background_polls(partition)], args=[str(now_ms), str(next_ms), str(count)])]
        if not claimed:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for request_id in claimed:
                pipe.hget(redis_keys.reservation(partition, request_id), "poll")
            polls = await pipe.execute()
        return [(request_id, _text(poll) if poll is not None else "") for request_id, poll in zip(claimed, polls)]

    async def existing(self, keys: list[str]) -> set[str]:
        """Those of these keys Redis holds (one round trip)."""
        if not keys:
            return set()
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.exists(key)
            found = await pipe.execute()
        return {key for key, there in zip(keys, found) if there}

    async def stop_polling(self, partition: int, request_id: str, response_id: str = "") -> None:
        await self.client.zrem(redis_keys.background_polls(partition), request_id)
        if response_id:
            await self.client.delete(redis_keys.polled_response(partition, response_id))

    async def polled(self, partition: int, response_id: str) -> tuple[str, str] | None:
        """(request id, what to ask) of a background response policyd asks its provider for, else None."""
        request_id = await self.client.get(redis_keys.polled_response(partition, response_id))
        if request_id is None:
            return None
        poll = await self.client.hget(redis_keys.reservation(partition, _text(request_id)), "poll")
        return _text(request_id), _text(poll) if poll is not None else ""

    async def due_everywhere(self, now_ms: int, count: int = 100) -> dict[int, tuple[list[tuple[str, str]], list[str]]]:
        """Per partition with anything due: (expiring credits past expiry, reservations past deadline).
        One round trip for every partition (a pipeline), so an idle sweep costs little."""
        async with self.client.pipeline(transaction=False) as pipe:
            for partition in range(self.partitions):
                pipe.zrangebyscore(redis_keys.credit_deadlines(partition), "-inf", now_ms, start=0, num=count)
                pipe.zrangebyscore(redis_keys.deadlines(partition), "-inf", now_ms, start=0, num=count)
            replies = await pipe.execute()
        due = {}
        for partition in range(self.partitions):
            credits, reservations = replies[2 * partition], replies[2 * partition + 1]
            if credits or reservations:
                due[partition] = ([tuple(_text(m).split(" ", 1)) for m in credits],  # type: ignore[misc]
                                  [_text(i) for i in reservations])
        return due

