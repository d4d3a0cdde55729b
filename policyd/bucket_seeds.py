"""Bucket seeds: a limit that begins to bind while its window runs counts the use before it.

A limit counts in a bucket (quotas.hold_for, cap_hold) that each request adds to as it is decided. One that began
to bind mid-window would count from nothing: a monthly budget of 100 that a new policy gives a plan on the 20th
would let a customer that had spent 150 this month spend 100 more; a daily cap of the operator's added at noon
would count the afternoon alone. So each of its buckets starts from what the requests it binds had put in it in
the window so far, summed from their records (Store.use_in_window, store.held_in_unit: settled charges less
refunds, costs, tokens, requests; open requests' holds): its seed, kept in SQL (`bucket_seeds`) and added to what
the records hold by the audit, a rebuild and a reset (the records' own holds never name the bucket).

When: a policy applied (`policy_seedings`: each plan's limit and each cap whose bucket the policy before it did not
count in: a new limit, or one of another window, unit, scope or models), and a key moved to another plan
(`key_move_seedings`: the new plan's limits its old plan did not have, of the key, its customer, workspace,
project and team, and of the end users, threads, features and models its requests named). A key's or an owner's own limit seeds its buckets itself (Admin._seeded), kept with it.

Each request once: a bucket counts the requests it held (their records' holds name it), and its seed what the
requests of its window the limit binds put in it that it did not hold. The first pass runs before the limit binds
anywhere (before the policy is announced, before the key's new terms are published), over the records decided before
it (`cutoff`, a few seconds back: all in SQL once caught up): summed, for a bucket nothing counts in yet; one by one
(those whose holds do not name it), for a bucket a limit of it already counts in (an owner's own limit of the same
bucket, another plan's, the same limit taken off and given again). The second pass (`stragglers`) adds, one by one,
what was decided after the cutoff without the limit (on a replica that had not yet taken the new policy: within its
refresh interval; by the key under its old plan while it moved), once no replica decides so any more. A process
stopped between the two leaves those few requests out.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from policyd import quotas
from policyd.policy import Cap, Limit, Policy
from policyd.pricing import Quantities
from policyd.quotas import Window, remaining_ttl

if TYPE_CHECKING:
    from policyd.counters import Counters
    from policyd.db import ApiKeyRow
    from policyd.store import Store

STRAGGLER_MARGIN_MS = 2000  # past the policy refresh interval, before the second pass
CUTOFF_MARGIN_MS = 5000  # the first pass reads the records decided this long before it (all in SQL once caught up)
UNBOUNDED_MS = 2 ** 62


@dataclass
class Seeding:
    """The seeding of one limit's buckets: the records that count in them, and what each was given."""

    limit: Limit  # a plan's limit, or a cap
    policy: Policy  # the policy it binds under: the tiers of the models it names
    window: Window  # the one running at the first pass (its buckets')
    at_ms: int  # the first pass's moment
    plans: tuple[str, ...] = ()  # records decided under these plans ...
    key_id: str = ""  # ... or by this key
    only_key_id: str = ""  # by this key alone
    customer_id: str = ""  # of this customer and owner alone (a key moved)
    owner_id: str = ""
    before_version: int = 0  # records decided under an older policy (a policy applied)

    @property
    def at_s(self) -> int:
        return self.at_ms // 1000

    @property
    def scope(self) -> str:
        """The records' column its buckets are named by (store.SCOPE_COLUMNS); "all" for a cap's one bucket."""
        return "all" if isinstance(self.limit, Cap) else self.limit.scope_key

    def binds(self, model: str, provider: str) -> bool:
        """Whether a request served on this model by this provider counts in the limit's buckets."""
        price = self.policy.model(model)
        tier = price.tier if price is not None else ""
        if isinstance(self.limit, Cap):
            return (not self.limit.provider or provider == self.limit.provider) and self.limit.binds(model, tier)
        return self.limit.binds(model, tier)

    def bucket(self, counters: Counters, customer_id: str, owner: str) -> tuple[str, int | None]:
        """The bucket key of the limit's window for this customer and owner (its scope's id; a tag's value), and its
        partition (None: a cap's, no partition's); "" for an owner the limit does not bind (a value of its tag it
        does not list)."""
        if isinstance(self.limit, Cap):
            return quotas.cap_hold(self.limit, self.at_s, 0, 0, Quantities())[0].key, None
        partition = counters.partition_of(customer_id)
        named = {_ID_ARGUMENTS[self.limit.scope]: owner} if self.limit.scope in _ID_ARGUMENTS else {}
        ids = quotas.scope_ids(customer_id, owner if self.limit.scope == "key" else "", **named,
                               tags={self.limit.tag: owner} if self.limit.scope == "tag" else None)
        scope_id = quotas.limit_scope_id(self.limit, ids)
        if not scope_id:
            return "", partition
        return quotas.hold_for(self.limit, partition, scope_id, self.at_s, 0, Quantities())[0].key, partition


# quotas.scope_ids' argument naming each scope's id within its customer
_ID_ARGUMENTS = {"workspace": "workspace_id", "project": "project_id", "team": "team_id", "feature": "feature",
                 "model": "model", "thread": "thread_id", "end_user": "end_user_id"}


def shape(limit: Limit) -> tuple[object, ...]:
    """What names a limit's buckets, whatever its amount, action, name or alerts: two limits of one shape count in
    the same buckets (a cap's: its name)."""
    if isinstance(limit, Cap):
        return "cap", limit.name, limit.unit, quotas.window_spec(limit)
    return limit.scope, limit.unit, quotas.window_spec(limit), tuple(sorted(set(limit.models))), limit.tag, \
        tuple(sorted(set(limit.tag_values)))


def _plan_shapes(policy: Policy, plan: str) -> set[tuple[object, ...]]:
    found = policy.plan(plan)
    return {shape(limit) for limit in found.limits} if found is not None else set()


def policy_seedings(old: Policy | None, new: Policy, at_ms: int) -> list[Seeding]:
    """The limits of `new` whose buckets `old` did not count in: each plan's (its records those of the plans that
    bind it now, decided under an older policy) and each cap (every customer's)."""
    if old is None:  # nothing was decided under no policy
        return []
    at_s, found = at_ms // 1000, {}
    for name in sorted(new.document.plans):
        before = _plan_shapes(old, name)
        for limit in new.document.plans[name].limits:
            if shape(limit) not in before and shape(limit) not in found:
                found[shape(limit)] = limit
    seedings = [Seeding(limit, new, quotas.window_of(quotas.window_spec(limit), at_s), at_ms,
                        plans=tuple(sorted(n for n in new.document.plans if key in _plan_shapes(new, n))),
                        before_version=new.version)
                for key, limit in found.items()]
    caps_before = {shape(cap) for cap in old.document.caps}
    seedings += [Seeding(cap, new, quotas.window_of(quotas.window_spec(cap), at_s), at_ms, before_version=new.version)
                 for cap in new.document.caps if shape(cap) not in caps_before]
    return seedings


def key_move_seedings(policy: Policy, key: ApiKeyRow, old_plan: str, new_plan: str, at_ms: int) -> list[Seeding]:
    """The limits of the key's new plan, of the key and its owners, whose buckets its old plan did not count its
    requests in: each over the records of the owner decided under a plan that binds it, and the key's own."""
    at_s, before = at_ms // 1000, _plan_shapes(policy, old_plan)
    plan = policy.plan(new_plan)
    owners = {"key": key.id, "customer": key.customer_id, "workspace": key.workspace_id,
              "project": key.project_id, "team": key.team_id}
    seedings, seen = [], set()
    for limit in plan.limits if plan is not None else ():
        if (limit.scope in owners and not owners[limit.scope]) or shape(limit) in before | seen:
            continue  # an owner the key has none of; a limit its old plan counted it in
        seen.add(shape(limit))
        plans = tuple(sorted(n for n in policy.document.plans if shape(limit) in _plan_shapes(policy, n)))
        # a request's own scopes (its end user's, thread's, feature's, model's): each of the customer's named
        seedings.append(Seeding(limit, policy, quotas.window_of(quotas.window_spec(limit), at_s), at_ms, plans=plans,
                                key_id=key.id, customer_id=key.customer_id, owner_id=owners.get(limit.scope, "")))
    return seedings


async def seed(counters: Counters, store: Store, seedings: list[Seeding], cutoff_ms: int) -> int:
    """The first pass: each limit's buckets given what the records decided before `cutoff_ms` put in its window
    (those it did not count itself); kept in SQL. How many buckets were given some."""
    return await _run(counters, store, seedings, 0, cutoff_ms, first=True)


async def stragglers(counters: Counters, store: Store, seedings: list[Seeding], cutoff_ms: int) -> int:
    """The second pass: what the records decided from `cutoff_ms` on without the limit put in its window, added
    to its buckets. How many buckets were added to."""
    return await _run(counters, store, seedings, cutoff_ms, 0, first=False)


def second_pass_delay_s(policy_refresh_ms: int) -> float:
    """How long after a policy is applied every replica has taken it (each checks every `policy_refresh_ms`)."""
    return (2 * policy_refresh_ms + STRAGGLER_MARGIN_MS) / 1000


def moved_key_stragglers(seedings: list[Seeding], key_id: str, old_plan: str) -> list[Seeding]:
    """The seedings of a moved key's buckets over its own records decided under its old plan (key_move_seedings):
    its requests decided while it moved, for the second pass."""
    return [replace(seeding, plans=(old_plan,), key_id="", only_key_id=key_id) for seeding in seedings]


async def _run(counters: Counters, store: Store, seedings: list[Seeding], since_ms: int, until_ms: int,
               first: bool) -> int:
    """Seed each limit's buckets with what the records decided in [since_ms, until_ms) (0: no bound) of its window
    put in them and they did not count; kept in SQL. How many buckets were given some."""
    added: dict[str, int] = {}
    partitions: dict[str, int | None] = {}
    now_s = int(time.time())
    try:
        for seeding in seedings:
            since = max(seeding.window.start * 1000, since_ms)
            until = min([bound for bound in (until_ms, seeding.window.end * 1000) if bound] or [UNBOUNDED_MS])
            if until <= since:
                continue
            sums = await use(store, seeding, since, until) if first else \
                await _not_counted(counters, store, seeding, since, until)
            for (customer, owner), amount in sums.items():
                key, partition = seeding.bucket(counters, customer, owner)
                ttl = remaining_ttl(key, now_s) if key else None
                if ttl is None:
                    continue
                if first and await counters.seed_bucket(key, amount, ttl, partition) is None:
                    # a limit of this bucket counts already: the requests it did not hold, one by one
                    amount = (await _not_counted(counters, store, replace(seeding, customer_id=customer,
                                                                          owner_id=owner), since, until)).get(
                        (customer, owner), 0)
                    if not amount:
                        continue
                    await counters.seed_bucket(key, amount, ttl, partition, only_new=False)
                elif not first:
                    await counters.seed_bucket(key, amount, ttl, partition, only_new=False)
                added[key] = added.get(key, 0) + amount
                partitions[key] = partition
    finally:
        if added:
            await _keep(counters, store, added, partitions, now_s)
    return len(added)


async def use(store: Store, seeding: Seeding, since_ms: int, until_ms: int) -> dict[tuple[str, str], int]:
    """(customer, owner) -> what the records the seeding counts put in its bucket in [since_ms, until_ms)."""
    summed = await asyncio.to_thread(store.use_in_window, seeding.scope, seeding.limit.unit, since_ms, until_ms,
                                     **_narrowing(seeding))
    sums: dict[tuple[str, str], int] = {}
    for (customer, owner, model, provider), amount in summed.items():
        if seeding.binds(model, provider):
            sums[(customer, owner)] = sums.get((customer, owner), 0) + amount
    return {owner: amount for owner, amount in sorted(sums.items()) if amount > 0}


async def _not_counted(counters: Counters, store: Store, seeding: Seeding, since_ms: int, until_ms: int
                       ) -> dict[tuple[str, str], int]:
    """(customer, owner) -> what the records the seeding counts put in its bucket in [since_ms, until_ms), of those
    that did not count in it themselves (a limit of its bucket bound them: their holds name it), read one by one:
    the second pass's few seconds of requests, or an owner's window whose bucket a limit already counts in."""
    requests = await asyncio.to_thread(store.use_by_request, seeding.scope, seeding.limit.unit, since_ms, until_ms,
                                       **_narrowing(seeding))
    sums: dict[tuple[str, str], int] = {}
    for customer, owner, model, provider, amount, held_in in requests:
        bucket = seeding.bucket(counters, customer, owner)[0]
        if bucket and seeding.binds(model, provider) and bucket not in held_in:
            sums[(customer, owner)] = sums.get((customer, owner), 0) + amount
    return {owner: amount for owner, amount in sorted(sums.items()) if amount > 0}


def _narrowing(seeding: Seeding) -> dict[str, object]:
    """The records a seeding counts, as Store.use_in_window narrows them."""
    return {"plans": seeding.plans, "key_id": seeding.key_id, "only_key_id": seeding.only_key_id,
            "customer_id": seeding.customer_id, "owner_id": seeding.owner_id,
            "before_version": seeding.before_version}


async def _keep(counters: Counters, store: Store, added: dict[str, int], partitions: dict[str, int | None],
                now_s: int) -> None:
    """The seeds given, kept in SQL (and those of windows that have passed taken out); not kept, taken back out of
    their buckets (they count from the limit's making, as before)."""
    try:
        ended = [key for key in await asyncio.to_thread(store.bucket_seeds) if remaining_ttl(key, now_s) is None]
        await asyncio.to_thread(store.add_bucket_seeds, added, now_s * 1000, ended)
    except Exception:
        for key, amount in added.items():
            await counters.seed_bucket(key, -amount, 0, partitions[key], only_new=False)
        raise
