"""Rollover: what a window leaves unused of a plan's limit marked `rollover` is carried into the next.

A team given 100 a month that spends 60 may spend 140 the next: each bucket of the window that has just begun starts
below zero, by what the same owner's bucket of the previous window left unused, `max(limit - used, 0)`, at most the
limit's `rollover_max` (one window's limit unless told). The previous bucket's use is what the audit reads of it:
its records' holds, its seeds (the carry it began with, so unused budget accumulates up to the bound), less its
resets. The carry is kept as the new bucket's seed (`bucket_seeds`, negative), so the audit, a rebuild and a reset
read it as the counter does.

A pass (`carry`) runs where the writer runs, every PASS_SECONDS, and carries each limit once a window, across replicas
(a cursor a limit, written with its carries in one transaction, under the rollups' lock), from SETTLED_AFTER_MS into
the window (the previous window's records in SQL by then). Until it has run in a window its limit binds without the
carry: tighter, never looser. Who carries: an owner whose bucket counted something in the previous window (or
began with a carry), and, once the limit carried in the window before (it was in force then), every key of the
plans giving it, and their customers, workspaces, projects and teams, used or not (an end user, a thread, a feature
or a model the records alone name). Where plans share a bucket (a limit of the same scope, unit, window and
models), the first plan's amount is the one carried from.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from policyd import bucket_seeds, quotas, redis_keys, reports, rollups
from policyd.db import BucketSeedRow, RollupCursorRow
from policyd.policy import Limit, Policy
from policyd.pricing import Quantities
from policyd.quotas import remaining_ttl
from policyd.store import Store, add_sums

if TYPE_CHECKING:
    from policyd.counters import Counters

log = logging.getLogger("policyd.rollover")

PASS_SECONDS = 30
# a window's carries are made this long after it begins: the records of the window before are in SQL by then (open
# requests count their holds)
SETTLED_AFTER_MS = 60_000
CURSOR_PREFIX = "rollover:"  # RollupCursorRow: the window (its start, ms) a limit's carries were made for


def limits_of(policy: Policy | None) -> list[tuple[Limit, tuple[str, ...]]]:
    """The plans' limits that carry what a window leaves unused, one a bucket shape (the first plan's), each with
    the plans that give it."""
    found: dict[tuple[object, ...], tuple[Limit, list[str]]] = {}
    for name in sorted(policy.document.plans) if policy is not None else ():
        for limit in policy.document.plans[name].limits:
            if limit.rollover:
                found.setdefault(bucket_seeds.shape(limit), (limit, []))[1].append(name)
    return [(limit, tuple(plans)) for limit, plans in found.values()]


async def carry(store: Store, counters: Counters, policy: Policy | None, at_ms: int | None = None) -> int:
    """One pass: each rollover limit's buckets of the window running at `at_ms` (now) given what their previous
    window left unused, once a window. How many buckets were given some."""
    at_ms = at_ms if at_ms is not None else int(time.time() * 1000)
    given = 0
    for limit, plans in limits_of(policy):
        carries = await asyncio.to_thread(_planned, store, limit, plans, counters.partitions, at_ms)
        for key, amount in carries.items():
            await counters.seed_bucket(key, -amount, remaining_ttl(key, at_ms // 1000) or 0,
                                       redis_keys.partition_in(key), only_new=False)
        given += len(carries)
    return given


def _planned(store: Store, limit: Limit, plans: tuple[str, ...], partitions: int, at_ms: int) -> dict[str, int]:
    """The carries of one limit into the window running at `at_ms` (new bucket key -> amount), written to SQL with
    its cursor in one transaction; none if another pass made them."""
    spec = quotas.window_spec(limit)
    current = quotas.window_of(spec, at_ms // 1000)
    previous = quotas.window_of(spec, current.start - 1)
    name = CURSOR_PREFIX + hashlib.sha256(repr(bucket_seeds.shape(limit)).encode()).hexdigest()[:20]  # 32 at most
    if at_ms < current.start * 1000 + SETTLED_AFTER_MS:
        return {}
    with store.session() as session:  # made already (most passes): no lock taken
        cursor = session.get(RollupCursorRow, name)
        if cursor is not None and cursor.written_ms >= current.start * 1000:
            return {}
    with store.session() as session, session.begin():
        rollups.serialized(session)  # one pass at a time, across replicas
        cursor = session.get(RollupCursorRow, name)
        if cursor is not None and cursor.written_ms >= current.start * 1000:
            return {}
        # the window before reaching past record retention's horizon (a pass days late): what it used is not known
        # whole, so nothing is carried (tighter, never looser)
        known = reports.pruned_before(session) <= previous.start * 1000
        used = _used(store, session, previous.start * 1000, previous.end * 1000) if known else {}
        if known and cursor is not None and cursor.written_ms == previous.start * 1000:  # it carried in the window before:
            for key in _owners_bound(session, limit, plans, partitions, previous.start):  # bound, used or not
                used.setdefault(key, 0)
        bound = limit.rollover_max or limit.limit
        carries = {}
        for key, amount in used.items():
            head, unit, window, start = key.rsplit(":", 3)
            if (unit, window, start) == (limit.unit, spec, str(previous.start)) and _same_limit(head, limit):
                left = min(max(limit.limit - amount, 0), bound)
                if left:
                    carries[f"{head}:{unit}:{window}:{current.start}"] = left
        if carries:
            add_sums(session, BucketSeedRow.__table__, ["bucket_key"],
                     [{"bucket_key": key, "amount": -amount, "made_ms": at_ms} for key, amount in sorted(carries.items())])
        if cursor is None:
            session.add(RollupCursorRow(name=name, written_ms=current.start * 1000))
        else:
            cursor.written_ms = current.start * 1000
    if carries:
        log.info("rollover: %d buckets of %s carry into the window from %d", len(carries), limit.label,
                 current.start)
    return carries


def _owners_bound(session: Session, limit: Limit, plans: tuple[str, ...], partitions: int, window_start: int
                  ) -> list[str]:
    """The buckets of the window beginning at `window_start` of the owners a limit binds by their keys' plans (the
    keys and their customers, workspaces, projects and teams; those of a request's own, its end users' or threads',
    are known by their records alone)."""
    from sqlalchemy import select

    from policyd.db import ApiKeyRow

    if limit.scope not in ("key", "customer", "workspace", "project", "team"):
        return []
    k = ApiKeyRow
    keys = set()
    for row in session.execute(select(k.id, k.customer_id, k.workspace_id, k.project_id, k.team_id).where(
            k.plan.in_(plans), k.status != "revoked")):
        scope_id = quotas.scope_ids(row.customer_id, row.id, row.workspace_id, row.project_id, row.team_id)[limit.scope]
        if scope_id:
            partition = redis_keys.partition_of(row.customer_id, partitions)
            keys.add(quotas.hold_for(limit, partition, scope_id, window_start, 0, Quantities())[0].key)
    return sorted(keys)


def _same_limit(head: str, limit: Limit) -> bool:
    """Whether a bucket key's head ("pd:{pN}:b:<scope>:<id>") is one of this limit's scope and models."""
    parts = head.split(":", 4)
    if len(parts) != 5 or parts[2] != "b" or parts[3] != limit.scope:
        return False
    if limit.scope == "tag":  # of its tag, a value it binds
        tag, value = quotas.tag_of_bucket(parts[4])
        if tag != limit.tag or (limit.tag_values and value not in limit.tag_values):
            return False
    tag = f":m={quotas.models_tag(limit.models)}" if limit.models else ""
    return parts[4].endswith(tag) if tag else ":m=" not in parts[4]


def _used(store: Store, session: Session, since_ms: int, until_ms: int) -> dict[str, int]:
    """Bucket key -> what the buckets of the window [since_ms, until_ms) hold, as the audit reads them: their
    records' holds, and what they hold beside (seeds, carries, less resets: Store.held_beside_records)."""
    held = store.held_in_window(since_ms, until_ms, session)
    start = f":{since_ms // 1000}"
    for key, amount in store.held_beside_records(session).items():
        if key.endswith(start):
            held[key] = held.get(key, 0) + amount
    return held
