"""The writer: drains every partition's event stream into SQL, idempotently.

Each counter change appends its event to the partition's stream in the same
Lua step, so Redis and the record can never disagree about what happened; this
writer makes the record durable. It reads through a consumer group, commits a
batch in one SQL transaction, and only then acknowledges (and deletes) the
entries. A crash anywhere leaves the entries pending: they are read again (by
this consumer, or claimed by another after `claim_idle_ms`), and replays are
harmless because every row is keyed by request_id / entry id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError

from policyd import compact_json, metrics, redis_keys
from policyd.reasons import MESSAGES
from policyd.counters import CLOSED_FIELDS
from policyd.db import EventRow, LedgerEntryRow, UsageRecordRow
from policyd.store import Store

log = logging.getLogger("policyd.writer")
# what an alert says of the request that crossed (or reached) a limit: whose it was
ALERT_OWNER_FIELDS = ("customer_id", "workspace_id", "project_id", "team_id", "api_key_id", "environment", "plan",
                      "feature", "thread_id", "end_user_id", "served_model", "tags")

DRAIN_CONFLICT_RETRIES = 20
CLAIM_CHECK_SECONDS = 1.0  # how often a running writer looks for entries a dead consumer left pending

# Events of one request may be applied in any order; a record's status only moves up this ladder.
STATUS_RANK = {"": -1, "denied": 0, "reserved": 1, "released": 2, "expired": 2, "settled": 3, "settled_late": 3}
REFUND_PREFIX = "refund:"  # the grant id of a request's refund: refund:<request id>
CLOSED = frozenset({"released", "expired", "settled", "settled_late"})


def kept_facts(facts: dict[str, Any] | None, status: str) -> dict[str, Any] | None:
    """Of the facts a reservation keeps beside its record (its estimates, call token, what its deadline does),
    those a rebuild of the counters restores for a record of this status: all while it is open or expired (a
    late settle prices by them), those a closed reservation keeps once settled or released (CLOSED_FIELDS:
    what answering a retry reads), None when there are none."""
    if facts is None or status in ("", "reserved", "expired"):
        return facts
    return {name: facts[name] for name in CLOSED_FIELDS if name in facts} or None


def _created(fields: dict[str, str]) -> str:
    """When the request an event is of was authorized (its reservation's `created`), "" when not said: an
    allowed authorize is that moment; a settle, release or expiry carries it (older events do not)."""
    kind = fields.get("type")
    if kind == "authorize":
        return fields.get("at", "") if fields.get("outcome") == "allow" else ""
    return fields.get("created", "") if kind in ("settle", "release", "expire") else ""


_RECORD_COLUMNS = frozenset(c.name for c in UsageRecordRow.__table__.columns)


class Record:
    """A usage record as the writer changes it: plain attributes over the row's columns. A record first
    seen in this batch (`new`) is inserted with the others in one executemany at the end of the batch;
    one that exists is updated the same way, with only the columns the batch changed (an ORM object per
    record cost most of the writer's time). An unset column reads as None, as on a fresh ORM object."""

    def __init__(self, values: dict[str, Any], new: bool) -> None:
        unknown = set(values) - _RECORD_COLUMNS
        if unknown:  # as the ORM would: the batch is then written event by event, and this one kept apart
            raise TypeError(f"{sorted(unknown)[0]!r} is not a usage record column")
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "new", new)
        object.__setattr__(self, "changed", set())

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        if name in _RECORD_COLUMNS:
            return None
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _RECORD_COLUMNS:
            raise TypeError(f"{name!r} is not a usage record column")
        self._values[name] = value
        self.changed.add(name)

    def columns(self) -> dict[str, Any]:
        return dict(self._values)

    def changes(self) -> dict[str, Any]:
        return {name: self._values[name] for name in self.changed}


Entry = tuple[int, str, dict[str, str]]  # partition, stream entry id, fields


def _entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<sequence>") as what orders it."""
    ms, _, sequence = entry_id.partition("-")
    return int(ms), int(sequence or 0)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(fields: dict[Any, Any]) -> dict[str, str]:
    """An entry's fields as text: bytes from a client that does not decode (every field at once), else
    whatever each one is."""
    try:
        return {k.decode(): v.decode() for k, v in fields.items()}
    except AttributeError:
        return {_text(k): _text(v) for k, v in fields.items()}


class Writer:
    def __init__(self, client: aioredis.Redis, store: Store, partitions: int, batch: int = 500,
                 claim_idle_ms: int = 10_000, consumer: str = "") -> None:
        self.client = client
        self.store = store
        self.partitions = partitions
        self.batch = batch
        self.claim_idle_ms = claim_idle_ms
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{id(self):x}"
        self.written = 0
        self._groups_ready = False
        self.reads_span_partitions = not isinstance(client, RedisCluster)
        self._claims_checked = 0.0

    async def ensure_groups(self) -> None:
        for partition in range(self.partitions):
            try:
                await self.client.xgroup_create(redis_keys.events(partition), redis_keys.STREAM_GROUP, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
        self._groups_ready = True

    async def _read(self, claim_idle_ms: int) -> list[Entry]:
        """One batch of every partition: what this consumer read but did not ack, else new entries, else
        entries another consumer left pending for claim_idle_ms (looked for once a CLAIM_CHECK_SECONDS,
        or every time when claim_idle_ms is 0). On a single Redis one XREADGROUP reads all partitions;
        a Redis Cluster keeps them in different slots, so there it is one per partition."""
        streams = {redis_keys.events(p): p for p in range(self.partitions)}
        found: dict[int, list[Any]] = {}
        groups = [list(streams)] if self.reads_span_partitions else [[stream] for stream in streams]
        for group in groups:
            for start in ("0", ">"):
                wanted = {stream: start for stream in group if streams[stream] not in found}
                if not wanted:
                    break
                reply = await self.client.xreadgroup(redis_keys.STREAM_GROUP, self.consumer, wanted, count=self.batch)
                for stream, entries in reply or []:
                    if entries:
                        found[streams[_text(stream)]] = entries
        if claim_idle_ms > 0 and time.monotonic() - self._claims_checked < CLAIM_CHECK_SECONDS:
            return self._decoded(found)
        self._claims_checked = time.monotonic()
        for stream, partition in streams.items():
            if partition not in found:
                claimed = await self.client.xautoclaim(stream, redis_keys.STREAM_GROUP, self.consumer,
                                                       claim_idle_ms, "0-0", count=self.batch)
                if claimed and claimed[1]:
                    found[partition] = claimed[1]
        return self._decoded(found)

    @staticmethod
    def _decoded(found: dict[int, list[Any]]) -> list[Entry]:
        return [(partition, _text(i), _fields(fields))
                for partition, entries in sorted(found.items()) for i, fields in entries if fields]

    async def drain_once(self, claim_idle_ms: int | None = None) -> int:
        """Move one batch of every partition to SQL, in one transaction; the number of events moved."""
        return len(await self._move_batch(claim_idle_ms))

    async def _move_batch(self, claim_idle_ms: int | None = None) -> list[Entry]:
        """drain_once: the entries it moved."""
        if not self._groups_ready:
            await self.ensure_groups()
        idle = self.claim_idle_ms if claim_idle_ms is None else claim_idle_ms
        entries = await self._read(idle)
        if not entries:
            return entries
        await asyncio.to_thread(self._apply_or_quarantine, entries)
        by_stream: dict[str, list[str]] = {}
        for partition, entry_id, _ in entries:
            by_stream.setdefault(redis_keys.events(partition), []).append(entry_id)
        async with self.client.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                pipe.xack(stream, redis_keys.STREAM_GROUP, *ids)
                pipe.xdel(stream, *ids)
            await pipe.execute()
        self.written += len(entries)
        metrics.events_written.inc(len(entries))
        return entries

    async def _newest_ids(self) -> dict[int, tuple[int, int]]:
        """Each partition's newest entry now, as (ms, sequence); a partition with none is left out."""
        async with self.client.pipeline(transaction=False) as pipe:
            for partition in range(self.partitions):
                pipe.xrevrange(redis_keys.events(partition), count=1)
            replies = await pipe.execute()
        return {partition: _entry_order(_text(reply[0][0])) for partition, reply in enumerate(replies) if reply}

    async def drain(self) -> int:
        """Move everything there is now, other consumers' pending entries included (audit, rebuild,
        shutdown). Taking an entry another writer still holds is safe: every write is idempotent.
        Events that arrive meanwhile are left to the running writers: it returns once a batch holds
        only entries newer than each partition's newest when it began (under steady traffic a
        drain that waited for empty streams would not end while the traffic lasts)."""
        newest = await self._newest_ids()
        total = 0
        conflicts = 0
        while True:
            try:
                moved = await self._move_batch(claim_idle_ms=0)
            except IntegrityError:  # another writer inserted the same record first: its row is there now
                conflicts += 1
                if conflicts > DRAIN_CONFLICT_RETRIES:
                    raise
                await asyncio.sleep(0.01 * conflicts)
                continue
            total += len(moved)
            if all(partition not in newest or _entry_order(entry_id) > newest[partition]
                   for partition, entry_id, _ in moved):
                return total

    async def run(self, stop: asyncio.Event, idle_seconds: float = 0.05, gather_seconds: float = 0.1) -> None:
        """Drain until stopped. After a small batch it waits gather_seconds, so the next batch holds more
        events (one transaction for more of them) and a request's authorize and settle more often arrive
        together (one insert of the whole record instead of an insert and an update)."""
        backoff = idle_seconds
        while not stop.is_set():
            try:
                moved = await self.drain_once()
                backoff = idle_seconds
            except Exception:  # SQL or Redis down: keep the entries pending and try again
                metrics.writer_errors.inc()
                log.exception("writer batch failed; retrying")
                moved = 0
                backoff = min(backoff * 2 if backoff > idle_seconds else 0.2, 5.0)
            wait = backoff if moved == 0 else gather_seconds if moved < self.batch else 0
            if wait:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=wait)
                except TimeoutError:
                    pass

    # applying events, in one SQL transaction per batch
    def _apply_or_quarantine(self, entries: list[Entry]) -> None:
        """Apply a batch; if SQL refuses its data (not its connection), apply one by one and keep each
        event it still refuses as an 'unwritable' event row, so one bad event never blocks a partition."""
        try:
            self._apply(entries)
            return
        except (OperationalError, InterfaceError, IntegrityError):
            raise  # SQL is away, or another writer inserted the same row first: leave it pending, retry
        except (DBAPIError, ValueError, KeyError, TypeError):
            if len(entries) == 1:
                log.exception("event %s of partition %d cannot be written; kept as unwritable", entries[0][1],
                              entries[0][0])
                self._quarantine(entries[0])
                return
        for entry in entries:
            self._apply_or_quarantine([entry])

    def _quarantine(self, entry: Entry) -> None:
        partition, entry_id, fields = entry
        detail = {k: v[:2000] for k, v in fields.items()}
        with self.store.session() as session, session.begin():
            self.store.insert_ignore(session, EventRow, [{
                "id": f"{partition}-{entry_id}", "kind": "unwritable", "request_id": fields.get("rid", "")[:128],
                "customer_id": "", "detail": detail, "created_ms": int(fields.get("at", "0") or 0),
            }])

    def _apply(self, entries: list[Entry]) -> None:
        with self.store.session() as session, session.begin():
            request_ids = {f["rid"] for _, _, f in entries
                           if f.get("type") in ("authorize", "settle", "release", "expire", "poll")}
            request_ids |= {f["rid"].removeprefix(REFUND_PREFIX) for _, _, f in entries
                            if f.get("type") == "grant" and f["rid"].startswith(REFUND_PREFIX)}
            records: dict[str, Record] = {}
            table = UsageRecordRow.__table__
            if request_ids:
                for row in session.execute(select(table).where(table.c.request_id.in_(request_ids))):
                    records[row.request_id] = Record(dict(row._mapping), new=False)
            apart = self._reusing(entries, records)
            if apart:
                for row in session.execute(select(table).where(table.c.request_id.in_(set(apart.values())))):
                    records[row.request_id] = Record(dict(row._mapping), new=False)
            ledger: list[dict[str, Any]] = []
            events: list[dict[str, Any]] = []
            for partition, entry_id, fields in entries:
                kind = fields.get("type", "")
                if apart and (fields.get("rid", ""), _created(fields)) in apart:
                    fields = {**fields, "rid": apart[fields["rid"], _created(fields)]}
                if kind == "authorize":
                    self._authorize(session, records, fields)
                elif kind == "settle":
                    ledger.append(self._settle(session, records, fields))
                elif kind in ("release", "expire"):
                    self._close(session, records, fields, "released" if kind == "release" else "expired")
                elif kind == "poll":
                    self._poll(records, fields)
                elif kind == "grant":
                    data = compact_json.loads(fields["d"])
                    refund_of = data.get("refund_of", "")
                    if refund_of and refund_of in records:  # a request's charge given back: its record says so
                        records[refund_of].refunded_nanos = int(fields["amount"])
                        records[refund_of].refunded_ms = int(fields["at"])
                    ledger.append({
                        "entry_id": f"grant:{fields['rid']}", "customer_id": data["customer_id"],
                        "wallet_id": data.get("wallet_id") or data["customer_id"], "kind": "grant",
                        "amount_nanos": int(fields["amount"]), "currency": data["currency"], "request_id": refund_of,
                        "source": data["source"], "note": data.get("note", ""),
                        "balance_after_nanos": int(fields["balance_after"]), "created_ms": int(fields["at"]),
                        "expires_ms": int(fields.get("expires", "0") or 0),
                    })
                elif kind == "credit_expire":
                    ledger.append({
                        "entry_id": f"expiry:{fields['rid']}", "customer_id": fields["customer_id"].split("/", 1)[0],
                        "wallet_id": fields["customer_id"], "kind": "expiry",
                        "amount_nanos": -int(fields["amount"]), "currency": "", "request_id": "",
                        "source": "expiry", "note": f"unused credit of {fields['rid']}",
                        "balance_after_nanos": int(fields["balance_after"]), "created_ms": int(fields["at"]),
                    })
                elif kind in ("alert", "rejected", "key_state"):
                    detail = {k: v for k, v in fields.items() if k not in ("type", "rid", "at", "d")}
                    if "d" in fields and kind == "alert":  # whose request crossed the limit (its decision's record)
                        made = compact_json.loads(fields["d"]).get("record", {})
                        detail.update({name: made[name] for name in ALERT_OWNER_FIELDS if made.get(name)})
                    elif "d" in fields:
                        detail.update(compact_json.loads(fields["d"]))
                    events.append({
                        "id": f"{partition}-{entry_id}", "kind": kind, "request_id": fields.get("rid", ""),
                        "customer_id": detail.get("customer_id", ""), "detail": detail, "created_ms": int(fields["at"]),
                    })
                else:
                    log.error("unknown event type %r in partition %d (entry %s) kept as an event", kind, partition, entry_id)
                    events.append({"id": f"{partition}-{entry_id}", "kind": "unknown", "detail": fields,
                                   "created_ms": int(fields.get("at", "0") or 0)})
            self.store.insert_new(session, UsageRecordRow, [r.columns() for r in records.values() if r.new])
            self.store.update_by_key(session, UsageRecordRow, "request_id",
                                     [{"request_id": r.request_id, **r.changes()} for r in records.values()
                                      if not r.new and r.changed])
            recorded = int(time.time() * 1000)
            for entry in ledger:
                entry["recorded_ms"] = recorded
            self.store.insert_ignore(session, LedgerEntryRow, ledger)
            self.store.insert_ignore(session, EventRow, events)

    @staticmethod
    def _reusing(entries: list[Entry], records: dict[str, Record]) -> dict[tuple[str, str], str]:
        """(request id, created ms) -> the record of a request that reused the id of one closed long ago: Redis
        answers retries by a closed reservation only closed_request_retention_seconds, after which the id reserves
        anew; recorded under the id as the record already holds it, its charge would overwrite the first's and
        its ledger entry be dropped as already written. It is recorded apart, as `<id>@<created ms>`."""
        apart: dict[tuple[str, str], str] = {}
        for _, _, fields in entries:
            created = _created(fields)
            row = records.get(fields.get("rid", "")) if created else None
            if row is not None and row.customer_id and row.status in CLOSED and str(row.created_ms) != created:
                apart[fields["rid"], created] = f"{fields['rid']}@{created}"
        return apart

    @staticmethod
    def _row(session: Any, records: dict[str, Record], rid: str, at: int) -> Record:
        """The record of a request; a stub when an event of its arrives before its authorize event
        (several writers drain one stream: events of one request can be applied in any order)."""
        row = records.get(rid)
        if row is None:
            row = Record({"request_id": rid, "created_ms": at, "decision": "allow", "status": ""}, new=True)
            records[rid] = row
        return row

    @classmethod
    def _authorize(cls, session: Any, records: dict[str, Record], fields: dict[str, str]) -> None:
        data = compact_json.loads(fields["d"])
        rid = fields["rid"]
        existing = records.get(rid)
        allowed = fields["outcome"] == "allow"
        if existing is not None and existing.status != "denied" and (not allowed or existing.status == "reserved"):
            return  # a replay, or a denied retry of a request that was allowed: the allow stands
        if existing is not None and STATUS_RANK.get(existing.status, -1) >= STATUS_RANK["settled"]:
            if allowed and existing.reservation_facts is None:  # the facts are what the settle event lacks
                existing.reservation_facts = kept_facts(data.get("facts"), existing.status)
            return  # the settle event came first and carried the whole record
        values = {**data["record"], "request_id": rid}  # the id it is recorded under (see _reusing)
        if allowed:
            values["status"] = "reserved"
            values["reserved_nanos"] = int(fields["reserved"])
            values["reservation_facts"] = data.get("facts")  # all of them while it is open (see kept_facts)
            values["shadow_denials"] = [s for s in fields.get("label", "").split("|") if s]
        else:
            values["status"] = "denied"
            values["decision"] = "deny"
            reason = fields.get("reason", "")
            label = fields.get("label", "")
            if reason == "limit":
                reason = data.get("limit_reasons", {}).get(label, "rate_limit_exceeded")
            values["reason"] = reason
            values["quota_bucket"] = label
            # events written before messages left them may still carry their own table
            values["message"] = values.get("message") or data.get("messages", {}).get(reason) or MESSAGES.get(reason, "")
            values["reserved_nanos"] = 0
        if existing is None:
            row = Record(values, new=True)
            records[rid] = row
            return
        if existing.status in ("released", "expired"):  # a stub made by the later release/expire event
            values.pop("status")
            values["reservation_facts"] = kept_facts(values.get("reservation_facts"), existing.status)
        for name, value in values.items():
            setattr(existing, name, value)

    @classmethod
    def _close(cls, session: Any, records: dict[str, Record], fields: dict[str, str], status: str) -> None:
        row = cls._row(session, records, fields["rid"], int(fields["at"]))
        if row.status in ("", "reserved"):
            row.status = status
            row.closed_ms = int(fields["at"])
            row.close_reason = fields.get("reason", "")
            cls._closed(row)

    @staticmethod
    def _poll(records: dict[str, Record], fields: dict[str, str]) -> None:
        """A background response's hold kept past its request's deadline, and what policyd asks its provider
        for ("" when the caller settles it: background.py): kept with the open record's facts, so a rebuild of
        the counters holds it as long, and asks on."""
        row = records.get(fields["rid"])
        if row is None or row.status != "reserved":
            return  # closed already (or its authorize event not yet applied, by another writer: lost to a rebuild)
        row.reservation_facts = {**(row.reservation_facts or {}), "poll": fields.get("poll", ""),
                                 "poll_until": int(fields.get("until", "0") or 0)}

    @staticmethod
    def _closed(row: Record) -> None:
        """A record closed: of the facts its open reservation kept for a rebuild, those its closed one keeps."""
        if row.reservation_facts is not None:
            kept = kept_facts(row.reservation_facts, row.status)
            if kept != row.reservation_facts:
                row.reservation_facts = kept

    @classmethod
    def _settle(cls, session: Any, records: dict[str, Record], fields: dict[str, str]) -> dict[str, Any]:
        data = compact_json.loads(fields["d"])
        rid = fields["rid"]
        record = records.get(rid)
        if record is None:  # the settle came first (or its authorize event was lost): it carries the record
            record = Record({**data["record"], "request_id": rid}, new=True)
            records[rid] = record
        elif record.status in ("", "released", "expired") and not record.customer_id:
            for name, value in data["record"].items():  # a stub: fill it from the record the settle carries
                if name != "request_id":
                    setattr(record, name, value)
        for name, value in data["settlement"].items():
            setattr(record, name, value)
        record.status = "settled" if fields["outcome"] == "settled" else "settled_late"
        record.credit_source = {g: int(a) for g, _, a in (c.partition(":") for c in fields.get("credits", "").split(",") if c)}
        record.charge_nanos = int(fields["charge"])
        record.balance_before_nanos = int(fields["balance_before"])
        record.balance_after_nanos = int(fields["balance_after"])
        record.closed_ms = int(fields["at"])
        record.settle_fingerprint = fields.get("fingerprint", "")  # from settle.lua, since migration 0028
        cls._closed(record)
        return {
            "entry_id": f"charge:{rid}", "customer_id": record.customer_id,
            "wallet_id": record.wallet_id or record.customer_id, "kind": "charge",
            "amount_nanos": -int(fields["charge"]), "currency": record.currency or data.get("currency", ""),
            "request_id": rid, "source": "usage", "note": "late" if fields["outcome"] == "settled_late" else "",
            "balance_after_nanos": int(fields["balance_after"]), "created_ms": int(fields["at"]),
        }
