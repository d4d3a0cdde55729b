"""Administration: keys, policy, credit, audit and rebuild. The AdminService calls these.

Every change is made in SQL (the source of truth) and then in Redis, so it
reaches every replica together: a paused key is refused by the next Authorize
on any replica, because the authorize script reads the key's state.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from policyd import keys as key_secrets
from policyd import redis_keys
from policyd.counters import (CLOSED_RECORD_FIELDS, STORED_RESPONSE_HOT_SECONDS, ClosedRequest, Counters,
                              Fenced, Reservation)
from policyd.db import ApiKeyRow, LimitResetRow, OwnerLimitsRow, PolicyVersionRow
from policyd.directory import KeyDirectory
from policyd.domain import CACHED_CONTENT_PREFIX, PolicydError
from policyd.money import AMOUNT_MAX
from policyd.policy import ENVIRONMENTS, Cap, Policy, PolicyError, canonical_text, diff, parse_policy
from policyd.pricing import Quantities
from policyd.policy_book import PolicyBook
from policyd import bucket_seeds, invoices, key_limits, limit_resets, metrics, quotas, reconcile, reports
from policyd.quotas import idles_out, remaining_ttl
from policyd.store import OWNER_ID_LENGTH_MAX, Store, key_record
from policyd.writer import REFUND_PREFIX, Writer

log = logging.getLogger("policyd.admin")

GRANT_SOURCES = ("purchase", "promo", "refund", "adjustment")
ROTATION_GRACE_SECONDS_DEFAULT = 86_400
ROTATION_GRACE_SECONDS_MAX = 30 * 86_400
LABEL_LENGTH_MAX = 256
USAGE_LIST_MAX = 1000
KEYS_PAGE_MAX = 1000  # keys a ListKeys page (also its default: a customer's keys, as before, in one page)
CREDENTIALS_PAGE_MAX = 1000  # admin credentials a ListAdminCredentials page (and its default)
OWNER_SCOPES = ("customer", "workspace", "project", "team", "end_user")  # the owners given limits of their own
REBUILD_SECONDS_MAX = 600  # a rebuild that dies holds its partitions' gates and its lock this long at most
OWNER_CHANGE_SECONDS = 120  # one change of an owner's row at a time: its claim lasts at most this, should its maker die
OWNER_CHANGE_WAIT_SECONDS = 60  # a change waits this long for another of the same owner's to end
POLICY_APPLY_SECONDS = 600  # one policy applied at a time (its new limits seeded: a month's records read)
KEY_SCOPES_MAX = 32
SCOPE_LENGTH_MAX = 128


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class KeyCreation:
    row: ApiKeyRow
    secret: str


@dataclass(frozen=True)
class ApplyResult:
    version: int
    changed: bool
    diff: str
    limits_begun: int = 0  # plan limits and caps whose buckets the policy before did not count in (bucket_seeds.py)
    buckets_seeded: int = 0  # ... of those, the buckets the first pass started from the use before them


AUDIT_ROUNDS = 3  # comparisons a difference must survive to be reported (see Admin.audit)


@dataclass(frozen=True)
class AuditResult:
    ok: bool
    checked: int
    mismatches: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass
class _BucketBinding:
    """A bucket a reset may find: its current window, the limits counting in it (a reset of one is theirs too,
    one counter), those of them a reset names, and the alerts of each (quotas.alert_fields)."""

    window: quotas.Window
    limits: list[Any] = field(default_factory=list)
    alerts: dict[str, int] = field(default_factory=dict)
    named: list[Any] = field(default_factory=list)


def page_after(page_token: str) -> tuple[int, str] | None:
    """Where a page a token of a listing by time and id ("<ms>/<id>") names starts: after that row."""
    if not page_token:
        return None
    created, _, last = page_token.partition("/")
    if not created.isdigit() or not last:
        raise _invalid("invalid_request", "page_token is not one a listing gave")
    return int(created), last


def _owner_after(page_token: str) -> tuple[str, str, str] | None:
    """Where a page of owners a token names starts: after that owner (its customer, scope and id)."""
    if not page_token:
        return None
    try:
        after = json.loads(base64.urlsafe_b64decode(page_token.encode()))
    except (ValueError, RecursionError):  # not base64, not UTF-8, not JSON
        after = None
    if not (isinstance(after, list) and len(after) == 3 and all(isinstance(part, str) for part in after)):
        raise _invalid("invalid_request", "page_token is not one a listing gave")
    return after[0], after[1], after[2]


def page_of(rows: list[Any], count: int, token: Callable[[Any], str]) -> tuple[list[Any], str]:
    """A page of `count` of `rows` (read one more than that), and the token of the page after it: made of its last
    row, "" when no row was left past it."""
    return (rows[:count], token(rows[count - 1])) if len(rows) > count else (rows, "")


def _page_size(limit: int) -> int:
    """A listing's page: 50 rows unless asked, at most USAGE_LIST_MAX."""
    return 50 if limit <= 0 else min(limit, USAGE_LIST_MAX)


def _invalid(reason: str, message: str) -> PolicydError:
    return PolicydError("INVALID_ARGUMENT", reason, message)


def _check_expiry(expires_ms: int) -> None:
    if expires_ms < 0 or (expires_ms and expires_ms <= now_ms()):
        raise _invalid("invalid_request", "expires_unix_ms must be in the future (or 0: never)")


def _key_scopes(scopes: list[str]) -> list[str]:
    if len(scopes) > KEY_SCOPES_MAX or any(not s or len(s) > SCOPE_LENGTH_MAX or s != s.strip() for s in scopes):
        raise _invalid("invalid_request", f"at most {KEY_SCOPES_MAX} scopes, each a model glob or tier:NAME of "
                                          f"1-{SCOPE_LENGTH_MAX} characters")
    return list(dict.fromkeys(scopes))


def _key_limits(limits: list[dict[str, Any]], policy: Policy | None, scope: str = "key") -> list[dict[str, Any]]:
    """A key's (or an owner's) limits as stored; a limit on some models must name models of the policy in force."""
    try:
        checked = key_limits.checked(limits, scope, policy.document.names_a_model if policy else None)
    except ValueError as error:
        raise _invalid("invalid_limit", str(error)) from None
    if any(0 < entry.get("until_unix_ms", 0) <= now_ms() for entry in checked):
        raise _invalid("invalid_limit", "a limit's until_unix_ms is a time to come (none: for good)")
    return checked


def _owner(customer_id: str, workspace_id: str = "", project_id: str = "", team_id: str = "",
           end_user_id: str = "") -> tuple[str, str]:
    """(scope, owner id) of the owner a call names: a workspace, project, team or end user of the customer, or the
    customer itself when none is named."""
    if not customer_id:
        raise _invalid("invalid_request", "customer_id is required")
    _check_owner_ids(customer_id=customer_id, workspace_id=workspace_id, project_id=project_id, team_id=team_id)
    if len(end_user_id) > OWNER_ID_LENGTH_MAX or not end_user_id.isprintable():
        raise _invalid("invalid_request", f"end_user_id must be at most {OWNER_ID_LENGTH_MAX} printable characters")
    named = [(scope, owner_id) for scope, owner_id in (("workspace", workspace_id), ("project", project_id),
                                                       ("team", team_id), ("end_user", end_user_id)) if owner_id]
    if len(named) > 1:
        raise _invalid("invalid_request", "name one of workspace_id, project_id, team_id and end_user_id (or none: "
                                          "the customer)")
    return named[0] if named else ("customer", "")


def _check_owner_ids(**ids: str) -> None:
    for name, value in ids.items():
        if len(value) > OWNER_ID_LENGTH_MAX or any(c in value for c in "{}/\x00\n\r\t "):
            raise _invalid("invalid_request",
                           f"{name} must be at most {OWNER_ID_LENGTH_MAX} characters without spaces, '/' or braces")


def _bound_to_owners(key: ApiKeyRow, given: list[OwnerLimitsRow], end_users: str) -> bool:
    """The key made to carry its owners' limits (`given`: its customer's, store.keys_owner_limits): its
    customer's, and its workspace's, project's and team's where it has one; and `end_users`, "1" when some end
    users of its customer have limits of their own (read by the decision of a request naming one: too many to
    carry). Whether that changed it."""
    ids = {"customer": "", "workspace": key.workspace_id, "project": key.project_id, "team": key.team_id}
    limits = [entry for row in given if row.scope == "customer" or (ids.get(row.scope) and ids[row.scope] ==
                                                                     row.owner_id) for entry in row.limits]
    if limits == (key.owner_limits or []) and end_users == (key.end_user_limits or ""):
        return False
    key.owner_limits, key.end_user_limits = limits, end_users
    return True


def _secrets_of(row: ApiKeyRow, at: int) -> list[tuple[str, int]]:
    valid = [(row.secret_hash, 0)]
    if row.previous_secret_hash and row.previous_expires_ms > at:
        valid.append((row.previous_secret_hash, row.previous_expires_ms))
    return valid


class Admin:
    def __init__(self, store: Store, counters: Counters, book: PolicyBook, directory: KeyDirectory,
                 writer: Writer, reservation_ttl_seconds: int = 600) -> None:
        self.reservation_ttl_ms = reservation_ttl_seconds * 1000
        self.pool: Any = None  # the provider account pool, when the service has one (reconciliation per key)
        self.finish_closings: Any = None  # the engine's, when there is one: settles in flight come first
        self.restoring: asyncio.Task[int] | None = None  # closed requests written back after a rebuild
        self.seeding: set[asyncio.Task[None]] = set()  # the second passes of bucket_seeds.py still to come
        # a pass of bucket_seeds.py (its seeds added to Redis, then kept in SQL) and an audit's comparison, one at a
        # time: a comparison between the two steps would report the seed as a difference
        self.seeding_now = asyncio.Lock()
        self.policy_refresh_ms = 500  # how often another replica takes a new policy (Settings.policy_refresh_ms)
        self.store = store
        self.counters = counters
        self.book = book
        self.directory = directory
        self.writer = writer

    # ------------------------------------------------------------------ keys
    async def create_key(self, *, label: str, customer_id: str, workspace_id: str = "", project_id: str = "",
                         team_id: str = "", environment: str, plan: str, scopes: list[str] | None = None,
                         test: bool = False, expires_ms: int = 0,
                         limits: list[dict[str, Any]] | None = None) -> KeyCreation:
        """`expires_ms`: when the key ends (refused as key_expired from then on), 0 = never; `limits`: the
        key's own limits (key_limits.py)."""
        if not customer_id:
            raise _invalid("invalid_request", "customer_id is required")
        _check_expiry(expires_ms)
        own_limits = _key_limits(limits or [], self.book.current)
        _check_owner_ids(customer_id=customer_id, workspace_id=workspace_id, project_id=project_id, team_id=team_id)
        if len(label) > LABEL_LENGTH_MAX:
            raise _invalid("invalid_request", f"label must be at most {LABEL_LENGTH_MAX} characters")
        if environment not in ENVIRONMENTS:
            raise _invalid("invalid_environment", f"environment must be one of {', '.join(ENVIRONMENTS)}")
        self._check_plan(plan, "creating keys")
        secret = key_secrets.new_secret(test=test)
        at = now_ms()
        row = ApiKeyRow(
            id=key_secrets.new_key_id(), label=label, prefix=key_secrets.display_prefix(secret),
            secret_hash=key_secrets.hash_secret(secret), previous_secret_hash=None, previous_expires_ms=0,
            customer_id=customer_id, workspace_id=workspace_id, project_id=project_id, team_id=team_id,
            environment=environment, plan=plan, scopes=_key_scopes(scopes or []), status="active", created_ms=at,
            rotated_ms=0, status_changed_ms=at, expires_ms=expires_ms, limits=own_limits,
        )
        _bound_to_owners(row, *await self._owners_of_keys(customer_id))
        await asyncio.to_thread(self.store.save_key, row)
        await self._publish_key(row)
        # an owner's limits changed meanwhile: read again once the key is in SQL (set_owner_limits lists the keys
        # once its own row is), so that one of the two calls sees the other; under the key's claim, as any change
        # of it (one made meanwhile is not written over)
        async with self._key_claimed(row.id) as row:
            if _bound_to_owners(row, *await self._owners_of_keys(customer_id)):
                await self._save_and_publish(row)
        self.directory.remember(row.secret_hash, key_record(row))
        return KeyCreation(row, secret)

    def _check_plan(self, plan: str, doing: str) -> None:
        """A plan keys may be put on: one of the active policy's."""
        policy = self.book.current
        if policy is None:
            raise PolicydError("FAILED_PRECONDITION", "no_policy", f"apply a policy before {doing}")
        if policy.plan(plan) is None:
            raise _invalid("unknown_plan", f"plan {plan!r} is not in policy version {policy.version} "
                                           f"(plans: {', '.join(sorted(policy.document.plans))})")

    async def _publish_key(self, row: ApiKeyRow) -> None:
        at = now_ms()
        await self.counters.set_key_state(row.customer_id, row.id, row.status, _secrets_of(row, at), at, row.expires_ms,
                                          key_record(row).terms, row.plan)

    async def get_key(self, key_id: str) -> ApiKeyRow:
        row = await asyncio.to_thread(self.store.key, key_id)
        if row is None:
            raise PolicydError("NOT_FOUND", "unknown_key", f"no key {key_id!r}")
        return row

    async def list_keys(self, customer_id: str = "") -> list[ApiKeyRow]:
        return await asyncio.to_thread(self.store.keys, customer_id)

    async def keys_page(self, customer_ids: set[str] | None, limit: int = 0, page_token: str = ""
                        ) -> tuple[list[ApiKeyRow], str]:
        """Keys of these customers (None: every customer's), oldest first: a page of `limit` (default and at most
        KEYS_PAGE_MAX) past `page_token`, and the next page's token ("" when this page is the last)."""
        count = KEYS_PAGE_MAX if limit <= 0 else min(limit, KEYS_PAGE_MAX)
        rows = await asyncio.to_thread(self.store.keys_page, customer_ids, page_after(page_token), count + 1)
        return page_of(rows, count, lambda last: f"{last.created_ms}/{last.id}")

    async def set_state(self, key_id: str, status: str) -> ApiKeyRow:
        async with self._key_claimed(key_id) as row:
            if row.status == "revoked" and status != "revoked":
                raise PolicydError("FAILED_PRECONDITION", "key_revoked", "a revoked key cannot be used again")
            row.status = status
            row.status_changed_ms = now_ms()
            await self._save_and_publish(row)
        return row

    async def set_expiry(self, key_id: str, expires_ms: int) -> ApiKeyRow:
        """Move a key's end (0 = never): an expired key that gets a later end works again."""
        _check_expiry(expires_ms)
        return await self._change_key(key_id, expires_ms=expires_ms)

    async def set_limits(self, key_id: str, limits: list[dict[str, Any]]) -> ApiKeyRow:
        """Give a key its own limits (none: the plan's alone); they bind from the next decision on every
        replica. A limit that lowers a count already past it refuses the key's next requests in that window. A
        money or request limit whose bucket nothing counted in yet starts from what the key had used in its window
        (its seed, as an owner's: `_seeded`)."""
        checked = _key_limits(limits, self.book.current)
        async with self._key_claimed(key_id, usable=True) as row:
            row.limits = checked
            row.seeds = await self._seeded(row.customer_id, "key", key_id, self._as_counted(checked),
                                           quotas.scope_ids(row.customer_id, key_id)["key"], row.seeds) or None
            await self._save_and_publish(row)
        return row

    async def set_scopes(self, key_id: str, scopes: list[str]) -> ApiKeyRow:
        """Narrow (or widen back, within its plan) the models a key may use: globs or tier:NAME, none = the
        plan's; binding from the next decision on every replica."""
        return await self._change_key(key_id, scopes=_key_scopes(scopes))

    async def _change_key(self, key_id: str, **fields: Any) -> ApiKeyRow:
        """Change a key that is not revoked, and publish its new state (and terms) to every replica."""
        async with self._key_claimed(key_id, usable=True) as row:
            for name, value in fields.items():
                setattr(row, name, value)
            await self._save_and_publish(row)
        return row

    @contextlib.asynccontextmanager
    async def _key_claimed(self, key_id: str, usable: bool = False) -> AsyncIterator[ApiKeyRow]:
        """The key as SQL holds it, read under its claim (the owner claim of scope key: `_owner_claimed`), for a
        change to be written and published whole before another's begins: each change of a key (its state, limits
        and their seeds, plan, scopes, expiry, secret, its owners' limits it carries) reads, changes and writes its
        row whole, and publishes the terms it wrote, so two at once could lose one, or leave Redis with the terms
        of the one SQL does not hold (its requests then refused as stale until its next change). `usable`: a
        revoked key refused (key_revoked)."""
        customer_id = (await self.get_key(key_id)).customer_id
        async with self._owner_claimed(customer_id, "key", key_id):
            yield await (self._usable_key(key_id) if usable else self.get_key(key_id))

    async def _usable_key(self, key_id: str) -> ApiKeyRow:
        row = await self.get_key(key_id)
        if row.status == "revoked":
            raise PolicydError("FAILED_PRECONDITION", "key_revoked", "a revoked key cannot be used again")
        return row

    async def _save_and_publish(self, row: ApiKeyRow) -> None:
        await asyncio.to_thread(self.store.save_key, row)  # SQL first: a replica that sees new terms reads them here
        await self._publish_key(row)

    async def set_owner_limits(self, limits: list[dict[str, Any]], customer_id: str, workspace_id: str = "",
                               project_id: str = "", team_id: str = "", end_user_id: str = ""
                               ) -> tuple[OwnerLimitsRow, int]:
        """Give an owner (a customer, or one of its workspaces, projects, teams or end users) its limits, the whole
        set (none: its plans' alone): each binds every key of the owner, those made later too (an end user's: the
        requests of any key of its customer that name it), in place of a plan's limit of the same scope and bucket
        (key_limits.py), from the next decision on every replica. The row, and how many keys changed. A limit that
        lowers a count already past it refuses the owner's next requests in that window."""
        scope, owner_id = _owner(customer_id, workspace_id, project_id, team_id, end_user_id)
        checked = _key_limits(limits, self.book.current, scope)
        async with self._owner_claimed(customer_id, scope, owner_id):
            old = await asyncio.to_thread(self.store.owner_limits_of, customer_id, scope, owner_id)
            row = OwnerLimitsRow(customer_id=customer_id, scope=scope, owner_id=owner_id, limits=checked,
                                 updated_ms=now_ms(), paused=bool(old and old.paused))  # a paused end user stays so
            limits, ids = self._owner_buckets(row)
            row.seeds = await self._seeded(customer_id, scope, owner_id, limits, ids[scope], old.seeds if old else None)
            await asyncio.to_thread(self.store.save_owner_limits, row)
        return row, await self._owner_changed(customer_id, scope, owner_id)

    async def set_end_user_paused(self, customer_id: str, end_user_id: str, paused: bool
                                  ) -> tuple[OwnerLimitsRow, int]:
        """Pause one of a customer's end users: the requests naming it, of any key of the customer, are refused
        (end_user_paused, 403) from the next decision on every replica, its own limits kept; or resume it. The
        row, and how many keys changed (a customer's first end user with a row of its own, or its last)."""
        scope, owner_id = _owner(customer_id, end_user_id=end_user_id)
        if scope != "end_user":
            raise _invalid("invalid_request", "end_user_id is required")
        async with self._owner_claimed(customer_id, scope, owner_id):
            row = await asyncio.to_thread(self.store.owner_limits_of, customer_id, scope, owner_id) or \
                OwnerLimitsRow(customer_id=customer_id, scope=scope, owner_id=owner_id, limits=[], seeds={})
            row.paused, row.updated_ms = paused, now_ms()
            await asyncio.to_thread(self.store.save_owner_limits, row)
        return row, await self._owner_changed(customer_id, scope, owner_id)

    @contextlib.asynccontextmanager
    async def _owner_claimed(self, customer_id: str, scope: str, owner_id: str) -> AsyncIterator[None]:
        """One change of an owner's row (or of a key's: scope "key", `_key_claimed`) at a time, across replicas: its
        limits (and their seeds), an end user's pause and a reset's seeds are each read, changed and written whole,
        so two at once would lose one (a pause undone by a limit change made beside it). Waits for another's to end
        (OWNER_CHANGE_WAIT_SECONDS at most: ABORTED owner_change_in_progress)."""
        claim, holder = redis_keys.owner_change(customer_id, scope, owner_id), secrets.token_hex(8)
        deadline = time.monotonic() + OWNER_CHANGE_WAIT_SECONDS
        while not await self.counters.claim(claim, holder, OWNER_CHANGE_SECONDS):
            if time.monotonic() > deadline:
                raise PolicydError("ABORTED", "owner_change_in_progress",
                                   f"another change of {scope} {owner_id or customer_id!r} is being made; try again "
                                   "once it is done")
            await asyncio.sleep(0.01)
        try:
            yield
        finally:
            await self.counters.end_claim(claim, holder)

    async def _owner_changed(self, customer_id: str, scope: str, owner_id: str) -> int:
        """After an owner's row changed in SQL: an end user's stamp into Redis, and every key of the customer made
        to carry its owners' limits as they now stand (_bound_to_owners); how many keys changed."""
        if scope == "end_user":  # its stamp first: a key that starts reading end users' finds it
            await self._publish_end_user(customer_id, owner_id)
        changed: set[str] = set()
        # keys made from now on read these
        given, end_users = await self._owners_of_keys(customer_id)
        while True:  # until no other change of the customer's owners came meanwhile (each ends on the last state)
            keys = await self.list_keys(customer_id) if scope != "end_user" else \
                await asyncio.to_thread(self.store.keys_to_flag, customer_id, end_users)  # the rest have it
            for listed in keys:
                if listed.status == "revoked" or not _bound_to_owners(listed, given, end_users):
                    continue
                async with self._key_claimed(listed.id) as key:  # as SQL holds it now (a change of it may be made)
                    if key.status != "revoked" and _bound_to_owners(key, given, end_users):
                        await self._save_and_publish(key)
                        changed.add(key.id)
            now_given, now_end_users = await self._owners_of_keys(customer_id)
            if [(r.scope, r.owner_id, r.limits) for r in now_given] == [(r.scope, r.owner_id, r.limits)
                                                                        for r in given] and now_end_users == end_users:
                return len(changed)
            given, end_users = now_given, now_end_users

    async def _owners_of_keys(self, customer_id: str) -> tuple[list[OwnerLimitsRow], str]:
        """What a customer's keys carry of its owners' limits (_bound_to_owners): its owners' rows but its end
        users', and "1" when some of its end users have limits of their own (or are paused)."""
        given = await asyncio.to_thread(self.store.keys_owner_limits, customer_id)
        return given, "1" if await asyncio.to_thread(self.store.has_end_user_limits, customer_id) else ""

    async def _publish_end_user(self, customer_id: str, end_user_id: str) -> None:
        """The stamp of an end user's own limits as SQL holds them, into Redis, where the authorize script checks a
        decision's (none: none there); written again until SQL holds what was written (two changes at once
        end on the last)."""
        terms = redis_keys.end_user_terms(self.counters.partition_of(customer_id), customer_id)

        async def in_sql() -> str:
            row = await asyncio.to_thread(self.store.owner_limits_of, customer_id, "end_user", end_user_id)
            return key_limits.end_user_stamp(row)

        stamp = await in_sql()
        while True:
            if stamp:
                await self.counters.client.hset(terms, end_user_id, stamp)
            else:
                await self.counters.client.hdel(terms, end_user_id)
            now = await in_sql()
            if now == stamp:
                return
            stamp = now

    async def _seeded(self, customer_id: str, scope: str, owner_id: str, limits: tuple[Any, ...], scope_id: str,
                      old_seeds: dict[str, int] | None) -> dict[str, int]:
        """What the owner (a key, or a customer, workspace, project, team or end user of it) had used before its
        limits were made, in the buckets of their current windows that no request has counted in yet (no plan limit
        of theirs): written into each bucket (as a plan's limit a policy adds: bucket_seeds.py; a limit on some
        models, what was served on them), so a budget set mid-month counts the month's spend; kept with the limits
        (`seeds`) for the audit and a rebuild, whose records name no such bucket. Seeds of buckets no limit keeps
        are taken back out of them. `limits`: its own, as its requests count them; `scope_id`: its buckets' id
        (quotas.scope_ids); `old_seeds`: before."""
        at, policy = now_ms(), self.book.current
        seeds = {key: amount for key, amount in (old_seeds or {}).items() if remaining_ttl(key, at // 1000) is not None}
        partition = self.counters.partition_of(customer_id)
        owner = owner_id or customer_id  # the records' column of the scope holds the customer's id
        kept: dict[str, int] = {}
        caught_up = False
        for limit in limits:
            hold, window = quotas.hold_for(limit, partition, scope_id, at // 1000, 0, Quantities())
            if hold.key in seeds:
                kept[hold.key] = seeds.pop(hold.key)
                continue
            if policy is None or await self.counters.client.exists(hold.key):
                continue  # a bucket already counting: the window's use is in it
            if not caught_up:
                await self.catch_up()
                caught_up = True
            seeding = bucket_seeds.Seeding(limit, policy, window, at, customer_id=customer_id, owner_id=owner)
            used = (await bucket_seeds.use(self.store, seeding, window.start * 1000, at + 1)).get(
                (customer_id, owner), 0)
            if used and await self.counters.seed_bucket(hold.key, used, hold.ttl_seconds, partition) is not None:
                kept[hold.key] = used  # none counted meanwhile
        for key, amount in seeds.items():  # a limit taken off: its bucket holds what its records imply again
            await self.counters.client.hincrby(key, "used", -amount)
        return kept

    async def _held_by_bucket(self) -> dict[str, int]:
        """Bucket key -> what it should hold: what the records imply, and what owners and keys had used before their
        limits were made (their seeds), and requests before a plan's limit or a cap began to bind (bucket_seeds.py),
        less what resets forgave (limit_resets.py)."""
        held = await asyncio.to_thread(self.store.held_by_bucket)
        for key, amount in (await asyncio.to_thread(self.store.held_beside_records)).items():
            held[key] = held.get(key, 0) + amount
        return held

    async def owner_limits(self, customer_id: str = "") -> list[OwnerLimitsRow]:
        """The limits given a customer and its workspaces, projects and teams (every customer's: "")."""
        if customer_id:
            _owner(customer_id)
        return await asyncio.to_thread(self.store.owner_limits, customer_id)

    async def owner_limits_page(self, customer_id: str = "", scope: str = "", owner_id: str = "", limit: int = 0,
                                page_token: str = "") -> tuple[list[OwnerLimitsRow], str]:
        """Owners with limits of their own (every customer's: ""; of one scope; the one owner named), by customer,
        scope and owner id: a page of `limit` (default 50, at most USAGE_LIST_MAX) past `page_token`, and the next
        page's token ("" when this page is the last)."""
        if customer_id:
            _owner(customer_id)
        if scope not in ("", *OWNER_SCOPES):
            raise _invalid("invalid_request", f"scope is one of {', '.join(OWNER_SCOPES)}, not {scope!r}")
        if owner_id and scope in ("", "customer"):
            raise _invalid("invalid_request", "owner_id names an owner of a scope: give the scope (end_user, team, ...)")
        count = _page_size(limit)
        rows = await asyncio.to_thread(self.store.owner_limits_page, customer_id, scope, owner_id,
                                       _owner_after(page_token), count + 1)
        return page_of(rows, count, lambda last: base64.urlsafe_b64encode(json.dumps(
            [last.customer_id, last.scope, last.owner_id], separators=(",", ":")).encode()).decode())

    async def owner_limit_states(self, row: OwnerLimitsRow) -> list[dict[str, Any]]:
        """The current window of each of an owner's limits: the Limit, what its bucket holds (`used`) and when the
        window ends (`ends`, unix s; 0 for total), as a key's review shows its own."""
        limits, ids = self._owner_buckets(row)
        return await quotas.bucket_states(self.counters, limits, ids, now_ms())

    def _owner_buckets(self, row: OwnerLimitsRow) -> tuple[tuple[Any, ...], dict[str, str]]:
        """An owner's limits as its keys' decisions count them (the policy's time zone where they name none), and
        the bucket ids of its scope (quotas.scope_ids)."""
        named = {} if row.scope == "customer" else {f"{row.scope}_id": row.owner_id}
        return self._as_counted(row.limits), quotas.scope_ids(row.customer_id, "", **named)

    def _as_counted(self, stored: list[dict[str, Any]] | None) -> tuple[Any, ...]:
        """A key's or an owner's own limits (as key_limits.checked stores them) as its requests count them now: the
        policy's time zone where they name none, those past their `until` gone."""
        policy = self.book.current
        return key_limits.effective((), key_limits.as_limits(stored), policy.document.timezone if policy else "",
                                    now_ms())

    async def reset_limits(self, customer_id: str = "", *, unit: str = "", window: str = "", name: str = "",
                           reason: str = "", **named: str) -> tuple[limit_resets.Target, list[limit_resets.Reset]]:
        """Forgive what the current window of each limit binding an owner (limit_resets.py) has counted of its
        settled requests: it is served again at once; requests in flight keep their holds. `named`: at most one
        of key_id, workspace_id, project_id, team_id, end_user_id, feature, model, thread_id, tag
        ("<tag>=<value>"; none: the customer); `unit`, `window`, `name` narrow it. Each reset is kept for the audit
        and a rebuild. The owner reset (a key's customer found), and each limit's reset."""
        try:
            target = limit_resets.target(customer_id, **named)
        except ValueError as error:
            raise _invalid("invalid_request", str(error)) from None
        _check_owner_ids(**{name: value for name, value in {"customer_id": customer_id, **named}.items()
                            if name in ("customer_id", "workspace_id", "project_id", "team_id")})
        if any(len(value) > limit_resets.NAMED_ID_LENGTH_MAX for value in named.values()):
            raise _invalid("invalid_request", f"an id is at most {limit_resets.NAMED_ID_LENGTH_MAX} characters")
        if len(reason) > limit_resets.REASON_LENGTH_MAX:
            raise _invalid("invalid_request", f"a reason is at most {limit_resets.REASON_LENGTH_MAX} characters")
        if target.scope == "key":
            key = await self.get_key(target.owner_id)
            if customer_id and key.customer_id != customer_id:
                raise PolicydError("NOT_FOUND", "unknown_key", f"no key {target.owner_id!r}")
            target = limit_resets.Target(key.customer_id, "key", key.id)
        at = now_ms()
        own_row = await asyncio.to_thread(self.store.owner_limits_of, target.customer_id, "end_user",
                                          target.owner_id) if target.scope == "end_user" else None
        own = key_limits.as_limits(own_row.limits) if own_row is not None else ()
        found = self._limits_binding(target, await self.list_keys(target.customer_id), own, unit, window, name, at)
        if not found:
            raise PolicydError("NOT_FOUND", "limit_not_found",
                               f"no limit binds {target.scope} {target.owner_id or target.customer_id!r} "
                               "in the policy in force" + (" as narrowed" if unit or window or name else ""))
        claim, holder = redis_keys.limit_reset(target.customer_id), secrets.token_hex(8)
        if not await self.counters.claim(claim, holder, limit_resets.CLAIM_SECONDS):
            raise PolicydError("ABORTED", "reset_in_progress", f"another reset of {target.customer_id!r}'s limits "
                                                               "is being made; try again once it is done")
        try:
            if target.scope not in (*OWNER_SCOPES, "key"):  # a feature's, a model's, a thread's: no seeds
                return target, await self._reset(target, found, reason, at)
            async with self._owner_claimed(target.customer_id, target.scope, target.owner_id):  # its seeds
                return target, await self._reset(target, found, reason, at)
        finally:
            await self.counters.end_claim(claim, holder)

    async def _reset(self, target: limit_resets.Target, found: dict[str, "_BucketBinding"], reason: str, at: int
                     ) -> list[limit_resets.Reset]:
        """Each bucket found reset (under the customer's claim): what its settled requests by `at` and its seed
        put in it, less what earlier resets took, taken out; kept in SQL."""
        await self.catch_up()  # what was settled before `at` is in SQL
        # what the owner (or the key) had used before its limits were made is kept with them (its seeds: _seeded)
        own_row: OwnerLimitsRow | ApiKeyRow | None = None
        if target.scope in OWNER_SCOPES:
            own_row = await asyncio.to_thread(self.store.owner_limits_of, target.customer_id, target.scope,
                                              target.owner_id)
        elif target.scope == "key":
            own_row = await asyncio.to_thread(self.store.key, target.owner_id)
        seeded = {key: own_row for key in (own_row.seeds or {})} if own_row is not None else {}
        earlier = await asyncio.to_thread(self.store.reset_by_bucket, target.customer_id)
        # ... and what a plan's limit new mid-window counted from (bucket_seeds.py): forgiven as the records' part
        begun = await asyncio.to_thread(self.store.bucket_seeds)
        partition = self.counters.partition_of(target.customer_id)
        done: list[limit_resets.Reset] = []
        for bucket, binding in found.items():
            limit, current = binding.named[0], binding.window
            settled = await asyncio.to_thread(self.store.settled_in_bucket, target.customer_id, bucket,
                                              current.start * 1000 - limit_resets.WINDOW_START_MARGIN_MS, at)
            owner = seeded.get(bucket)
            seed = (owner.seeds or {}).get(bucket, 0) if owner else 0
            # what it started from: a seed (use before its limit) is forgiven; a carry (rollover.py) stays
            started = begun.get(bucket, 0)
            owed = max(settled - earlier.get(bucket, 0) + seed + max(started, 0), 0)
            try:
                outcome = await self.counters.reset_limit(partition, bucket, owed, binding.alerts, min(started, 0))
            except Fenced:
                raise PolicydError("UNAVAILABLE", "rebuilding", "counters are being rebuilt; retry shortly") from None
            taken, used = outcome or (0, 0)
            if taken:
                # what the owner used before its limit was made is forgiven out of its seed; the rest, the records'
                seed_taken = min(seed, taken)
                row = LimitResetRow(id="reset_" + secrets.token_hex(12), customer_id=target.customer_id,
                                    bucket_key=bucket, label=limit.label, unit=limit.unit, amount=taken - seed_taken,
                                    reason=reason, created_ms=at)
                if owner is not None and seed_taken:
                    owner.seeds = {**(owner.seeds or {}), bucket: seed - seed_taken}
                try:
                    await asyncio.to_thread(self.store.save_limit_reset, row, owner if seed_taken else None)
                except Exception:  # not kept: the bucket counts it again, as the records imply
                    await self.counters.reset_limit(partition, bucket, -taken)
                    raise
            done += [limit_resets.Reset(each, used + taken, taken, used, current.end) for each in binding.limits]
        return done

    def _limits_binding(self, target: limit_resets.Target, keys: list[ApiKeyRow], own: tuple[Any, ...], unit: str,
                        window: str, name: str, at: int) -> dict[str, "_BucketBinding"]:
        """Bucket key -> the limits of the policy in force that bind the target's requests in that bucket of
        its own, of each bucket where one does as narrowed by unit, window and name (two limits of a plan may
        count in one bucket: a reset of one is the other's too). `own`: an end user's own limits, beside its
        keys' (Engine._with_end_user_limits)."""
        policy = self.book.current
        found: dict[str, _BucketBinding] = {}
        if policy is None:
            return found
        partition = self.counters.partition_of(target.customer_id)
        for key in keys:
            plan = policy.plan(key.plan)
            if plan is None or not target.binds(key):
                continue
            for limit in key_limits.effective(plan.limits, key_record(key).limits + own, policy.document.timezone, at):
                owner = target.bucket_id(limit) if limit.scope == target.scope else ""
                if not owner:
                    continue
                hold, current = quotas.hold_for(limit, partition, owner, at // 1000, 0, Quantities())
                binding = found.setdefault(hold.key, _BucketBinding(current))
                binding.alerts.update(quotas.alert_fields(hold))
                if limit not in binding.limits:
                    binding.limits.append(limit)
                    if limit_resets.matches(limit, unit, window, name):
                        binding.named.append(limit)
        return {bucket: binding for bucket, binding in found.items() if binding.named}

    async def set_plan(self, plan: str, *, key_id: str = "", customer_id: str = "") -> list[ApiKeyRow]:
        """Move a key, or every key of a customer, to another plan of the active policy (an upgrade, a
        downgrade): the keys moved. Every replica decides under the new plan from the next request (the
        authorize script sees the key's new terms); requests already reserved settle as reserved.
        Revoked keys stay as they were."""
        if bool(key_id) == bool(customer_id):
            raise _invalid("invalid_request", "give either a key id or a customer id")
        self._check_plan(plan, "moving keys to a plan")
        if key_id:
            rows = [await self._usable_key(key_id)]
        else:
            rows = await self.list_keys(customer_id)
            if not rows:
                raise PolicydError("NOT_FOUND", "unknown_customer", f"customer {customer_id!r} has no keys")
        moved = []
        for listed in rows:
            async with self._key_claimed(listed.id) as row:
                if row.status == "revoked" or row.plan == plan:
                    continue
                policy, old_plan = self.book.current, row.plan
                # its new plan's limits its old one lacked count what it and its owners used in their windows
                seedings, _ = await self._seed(bucket_seeds.key_move_seedings(policy, row, old_plan, plan,
                                                                             now_ms())) if policy is not None else ([], 0)
                row.plan = plan
                await self._save_and_publish(row)
                if seedings:  # ... and what it decided under its old plan while it moved (no more from now)
                    self._seed_later(bucket_seeds.moved_key_stragglers(seedings, row.id, old_plan), 0)
            moved.append(row)
        return moved

    async def rotate_key(self, key_id: str, grace_seconds: int = ROTATION_GRACE_SECONDS_DEFAULT) -> KeyCreation:
        if not 0 <= grace_seconds <= ROTATION_GRACE_SECONDS_MAX:
            raise _invalid("invalid_request", f"grace_seconds must be between 0 and {ROTATION_GRACE_SECONDS_MAX}")
        async with self._key_claimed(key_id) as row:
            if row.status == "revoked":
                raise PolicydError("FAILED_PRECONDITION", "key_revoked", "a revoked key cannot be rotated")
            secret = key_secrets.new_secret(test=row.prefix.startswith("pdk_test_"))
            at = now_ms()
            row.previous_secret_hash = row.secret_hash if grace_seconds > 0 else None
            row.previous_expires_ms = at + grace_seconds * 1000 if grace_seconds > 0 else 0
            row.secret_hash = key_secrets.hash_secret(secret)
            row.prefix = key_secrets.display_prefix(secret)
            row.rotated_ms = at
            await self._save_and_publish(row)
        self.directory.remember(row.secret_hash, key_record(row))
        return KeyCreation(row, secret)

    # ------------------------------------------------------------------ policy
    async def apply_policy(self, text: str, source_name: str = "policy.yaml", dry_run: bool = False) -> ApplyResult:
        try:
            document = parse_policy(text, source_name or "policy.yaml")
        except PolicyError as error:
            raise _invalid("invalid_policy", str(error)) from None
        if document.caps and self.counters.cluster:
            raise _invalid("invalid_policy", f"{source_name}: caps count every customer's requests in one counter, "
                                             "which a Redis Cluster cannot change beside a customer's in one step: "
                                             "use caps with a single Redis (with replicas)")
        in_use = await asyncio.to_thread(self.store.plans_in_use)
        missing = sorted(plan for plan in in_use if plan not in document.plans)
        if missing:
            raise _invalid("invalid_policy", f"{source_name}: plans used by keys are missing: "
                                             + ", ".join(f"{p} ({in_use[p]} keys)" for p in missing))
        canonical = canonical_text(document)
        if dry_run:  # what it would change, and how many of its limits would begin mid-window
            current = self.book.current
            begun = bucket_seeds.policy_seedings(current, Policy((current.version if current else 0) + 1, document,
                                                                 canonical), now_ms())
            return ApplyResult(current.version if current else 0, False, diff(current.canonical if current else "",
                                                                              canonical), len(begun))
        async with self._policy_claimed():  # one at a time: its new limits' seeds read once (bucket_seeds.py)
            await self.book.load_latest()  # one applied meanwhile, on another replica
            current = self.book.current
            changes = diff(current.canonical if current else "", canonical)
            if not changes:
                return ApplyResult(current.version if current else 0, False, changes)
            version = (current.version if current else 0) + 1
            applied = Policy(version, document, canonical)
            # its limits new mid-window start from the use before them, seeded before it can bind anywhere (a
            # replica starting meanwhile reads the latest policy from SQL)
            begun = bucket_seeds.policy_seedings(current, applied, now_ms())
            seedings, seeded = await self._seed(begun)
            row = PolicyVersionRow(version=version, digest=applied.digest, canonical=canonical, source=text,
                                   source_name=source_name, applied_ms=now_ms())
            try:
                await asyncio.to_thread(self.store.add_policy, row)
            except Exception as error:
                if "UNIQUE" in str(error).upper() or "duplicate" in str(error).lower():
                    raise PolicydError("ABORTED", "policy_conflict",
                                       "another policy was applied at the same time; try again") from None
                raise
            self.book.install(applied)
            await self.counters.client.set(redis_keys.POLICY_VERSION, str(version))
        if seedings:  # what replicas not yet on it decide meanwhile, once each has taken it
            self._seed_later(seedings, bucket_seeds.second_pass_delay_s(self.policy_refresh_ms))
        return ApplyResult(version, True, changes, len(begun), seeded)

    @contextlib.asynccontextmanager
    async def _policy_claimed(self) -> AsyncIterator[None]:
        """One policy applied at a time, across replicas (a claim in Redis, waited for up to POLICY_APPLY_SECONDS:
        ABORTED policy_apply_in_progress): two at once would each seed the limits new in it."""
        holder, deadline = secrets.token_hex(8), time.monotonic() + POLICY_APPLY_SECONDS
        while not await self.counters.claim(redis_keys.POLICY_APPLY, holder, POLICY_APPLY_SECONDS):
            if time.monotonic() > deadline:
                raise PolicydError("ABORTED", "policy_apply_in_progress",
                                   "another policy is being applied; try again once it is done")
            await asyncio.sleep(0.05)
        try:
            yield
        finally:
            await self.counters.end_claim(redis_keys.POLICY_APPLY, holder)

    async def _seed(self, seedings: list[bucket_seeds.Seeding], cutoff_ms: int = 0
                    ) -> tuple[list[bucket_seeds.Seeding], int]:
        """The first pass of bucket_seeds.py over the records decided before the cutoff (by default a few seconds
        before now: they are all in SQL once caught up): the seedings made, and how many buckets they gave some.
        Seeds not given (Redis or SQL failing) are logged: those limits count from their making, as before."""
        if not seedings:
            return [], 0
        try:
            await self.catch_up()
            async with self.seeding_now:
                seeded = await bucket_seeds.seed(self.counters, self.store, seedings,
                                                 cutoff_ms or self._seed_cutoff(seedings))
        except Exception:
            log.exception("the limits that bind from now on count from now: their use before could not be seeded")
            return [], 0
        return seedings, seeded

    @staticmethod
    def _seed_cutoff(seedings: list[bucket_seeds.Seeding]) -> int:
        return seedings[0].at_ms - bucket_seeds.CUTOFF_MARGIN_MS

    def _seed_later(self, seedings: list[bucket_seeds.Seeding], delay_s: float) -> None:
        """The second pass of bucket_seeds.py, after `delay_s` (tracked: `seeding`, awaited by tests, cancelled at
        stop)."""
        async def later() -> None:
            await asyncio.sleep(delay_s)
            try:
                await self.catch_up()
                async with self.seeding_now:
                    await bucket_seeds.stragglers(self.counters, self.store, seedings, self._seed_cutoff(seedings))
            except Exception:
                log.exception("the requests decided without a new limit while it was taken up are not in its count")

        task = asyncio.create_task(later())
        self.seeding.add(task)
        task.add_done_callback(self.seeding.discard)

    # ------------------------------------------------------------------ wallets
    async def grant_credit(self, customer_id: str, amount: int, currency: str, source: str, grant_id: str = "",
                           note: str = "", expires_ms: int = 0, workspace_id: str = "") -> tuple[str, str, tuple[int, int]]:
        """Credit a customer's wallet, or one workspace's wallet (for plans with wallet_scope: workspace). A
        negative amount is a debit, an `adjustment` alone (a mistaken grant taken back, a chargeback): it may
        take the balance below zero, and requests are then refused until credit comes."""
        if not customer_id or len(customer_id) > OWNER_ID_LENGTH_MAX or "/" in customer_id \
                or len(workspace_id) > OWNER_ID_LENGTH_MAX or "/" in workspace_id:
            raise _invalid("invalid_request", "customer_id is required (and neither id may contain '/')")
        if source not in GRANT_SOURCES:
            raise _invalid("invalid_grant", f"source must be one of {', '.join(GRANT_SOURCES)}")
        if amount == 0 or abs(amount) > AMOUNT_MAX:
            raise _invalid("invalid_amount", "a credit grant is an amount of nanos other than 0, at most 2^53-1")
        if amount < 0 and (source != "adjustment" or expires_ms):
            raise _invalid("invalid_amount", "a debit (a negative amount) is an adjustment, and never expires")
        policy = self.book.current
        expected = policy.document.currency if policy else "USD"
        if currency and currency != expected:
            raise _invalid("currency_mismatch", f"wallets are in {expected}, not {currency}")
        if expires_ms < 0 or (expires_ms and expires_ms <= now_ms()):
            raise _invalid("invalid_grant", "a credit's expiry must be in the future (or 0: never)")
        grant_id = grant_id or "grant_" + secrets.token_hex(12)
        if grant_id.startswith(REFUND_PREFIX):
            raise _invalid("invalid_request", f"grant ids starting {REFUND_PREFIX} are refunds' (RefundUsage)")
        if any(c in grant_id for c in " \n\r\t{}"):
            raise _invalid("invalid_request", "grant_id must not contain spaces or braces")
        if len(grant_id) > 128:
            raise _invalid("invalid_request", "grant_id must be at most 128 characters")
        wallet = redis_keys.wallet_id(customer_id, workspace_id)
        payload = json.dumps({"customer_id": customer_id, "wallet_id": wallet, "currency": expected, "source": source,
                              "note": note[:1024]})
        partition = self.counters.partition_of(customer_id)
        try:
            outcome, _ = await self.counters.grant(partition, wallet, grant_id, amount, now_ms(), payload,
                                                   expires_ms)
        except Fenced:
            raise PolicydError("UNAVAILABLE", "rebuilding", "counters are being rebuilt; retry shortly") from None
        if outcome == "too_large":
            raise _invalid("invalid_amount", "the balance would pass 2^53-1 nanos either way")
        return grant_id, outcome, await self.counters.wallet(wallet)

    async def refund_usage(self, request_id: str, amount: int = 0, note: str = "") -> tuple[int, str, tuple[int, int]]:
        """Give back what a settled request was charged, all of it (`amount` 0) or a part, once: to its wallet
        (a ledger grant `refund:<request id>`, source refund) and, in the same atomic step, to the money limits
        it counted in whose windows are still running, so a customer a mistaken charge (a price set wrong, a
        provider's fault) has blocked is served again at once. Its provider cost stands: cost, token and request
        limits and the operator's caps keep counting it. Returns (the nanos refunded, the wallet id, the
        wallet's balance and reserved)."""
        if not request_id:
            raise _invalid("invalid_request", "request_id is required")
        await self.catch_up()
        record = await asyncio.to_thread(self.store.usage_record, request_id)
        if record is None:
            raise PolicydError("NOT_FOUND", "unknown_request", f"no usage record {request_id}")
        if record.status not in ("settled", "settled_late") or record.charge_nanos <= 0:
            raise PolicydError("FAILED_PRECONDITION", "nothing_to_refund",
                               f"{request_id} is {record.status} and charged {record.charge_nanos} nanos: nothing to refund")
        if record.refunded_ms:
            raise PolicydError("ALREADY_EXISTS", "already_refunded", f"{request_id} was refunded already")
        amount = amount or record.charge_nanos
        if not 0 < amount <= record.charge_nanos:
            raise _invalid("invalid_amount", f"a refund is more than 0 and at most the request's charge, "
                                             f"{record.charge_nanos} nanos")
        partition = self.counters.partition_of(record.customer_id)
        returned = [(key, min(amount, int(held))) for key, unit, held in record.final_holds or []  # not the caps
                    if unit == "money" and int(held) > 0 and not key.startswith(redis_keys.CAPS_PREFIX)]
        # a limit a reset forgave this charge already gets nothing back again: the reset's row takes it in
        returned, forgiven = await asyncio.to_thread(self.store.forgiven_by_resets, returned, record.closed_ms)
        wallet = record.wallet_id or record.customer_id
        payload = json.dumps({"customer_id": record.customer_id, "wallet_id": wallet, "currency": record.currency,
                              "source": "refund", "note": note[:1024], "refund_of": request_id})
        try:
            outcome, _ = await self.counters.grant(partition, wallet, REFUND_PREFIX + request_id, amount, now_ms(), payload,
                                                   returned=returned)
        except Fenced:
            raise PolicydError("UNAVAILABLE", "rebuilding", "counters are being rebuilt; retry shortly") from None
        if outcome == "exists":
            raise PolicydError("ALREADY_EXISTS", "already_refunded", f"{request_id} was refunded already")
        if outcome == "too_large":
            raise _invalid("invalid_amount", "the balance would pass 2^53-1 nanos")
        await self.writer.drain()
        await asyncio.to_thread(self.store.take_into_resets, forgiven)
        return amount, wallet, await self.counters.wallet(wallet)

    async def record_action(self, action: str, by: str, customer_id: str = "", request_id: str = "",
                            **detail: Any) -> None:
        """An admin action done, for the record (ListEvents, kind admin_action): what, by whom (`operator`,
        or a scoped credential's id), on whose. Never a secret: callers pass ids, amounts and names."""
        await asyncio.to_thread(self.store.insert_event, {
            "id": f"admin-{secrets.token_hex(12)}", "kind": "admin_action", "request_id": request_id,
            "customer_id": customer_id, "created_ms": now_ms(), "detail": {"action": action, "by": by, **detail}})

    async def list_events(self, kind: str, customer_id: str, since_ms: int, until_ms: int, limit: int) -> list[Any]:
        await self.catch_up()
        return await asyncio.to_thread(self.store.list_events, kind, customer_id, since_ms, until_ms,
                                       _page_size(limit))

    async def catch_up(self) -> None:
        """What this process decided is in SQL: its settles still in flight finish, then every pending
        event is written (reports, listings, invoices, reconciliation and audits read after this)."""
        if self.finish_closings is not None:
            await self.finish_closings()
        await self.writer.drain()

    async def list_usage(self, customer_id: str, limit: int, request_id: str = "", api_key_id: str = "",
                         since_ms: int = 0, until_ms: int = 0, page_token: str = "") -> tuple[list[Any], str]:
        """Usage records (after draining what is pending), newest first: a page of `limit` (at most
        USAGE_LIST_MAX) past `page_token`, and the next page's token ("" when this page is the last)."""
        limit = _page_size(limit)
        after = page_after(page_token)
        await self.catch_up()
        rows = await asyncio.to_thread(self.store.latest_usage, customer_id, limit + 1, request_id, api_key_id,
                                       since_ms, until_ms, after)
        return page_of(rows, limit, lambda last: f"{last.created_ms}/{last.request_id}")

    async def usage_report(self, group_by: list[str], since_ms: int, until_ms: int, bucket: str, customer_id: str,
                           compare_previous: bool, zone_name: str = "") -> list[Any]:
        """`zone_name`: whose hours, days and months the buckets are ("": the policy's time zone, whose days its
        limits count; "UTC")."""
        await self.catch_up()
        policy = self.book.current
        zone_name = zone_name or (policy.document.timezone if policy else "")

        def run() -> list[Any]:
            with self.store.session() as session:
                return reports.usage_report(session, group_by, since_ms, until_ms, bucket, customer_id,
                                            compare_previous, zone_name)

        try:
            return await asyncio.to_thread(run)
        except reports.ReportError as error:
            raise _invalid("invalid_report", str(error)) from None

    async def invoice(self, customer_id: str, period: str, lines_by: str = "model", close: bool = False) -> Any:
        """The invoice of a customer for a period; with close=True, also close the period."""
        await self.catch_up()

        def run() -> Any:
            with self.store.session() as session, session.begin():
                built = invoices.build(session, customer_id, period, lines_by or "model")
                if close:
                    invoices.close(session, built, now_ms())
                    return invoices.Invoice(built.customer_id, built.period, built.group_by, built.text, closed=True)
                return built

        try:
            return await asyncio.to_thread(run)
        except invoices.InvoiceError as error:
            reason = "period_closed" if "already closed" in str(error) else "invalid_invoice"
            raise PolicydError("FAILED_PRECONDITION" if reason == "period_closed" else "INVALID_ARGUMENT", reason,
                               str(error)) from None

    async def reconcile(self, provider: str, export: bytes, tolerance_nanos: int = 0, tolerance_bps: int = 0) -> Any:
        policy = self.book.current
        if policy is None:
            raise PolicydError("FAILED_PRECONDITION", "no_policy", "apply a policy first")
        models = [m for m, price in policy.document.price_table.models.items() if price.provider == provider]
        if not models:
            raise _invalid("unknown_provider", f"no model of provider {provider!r} in the price table")
        if tolerance_nanos < 0 or not 0 <= tolerance_bps <= 10_000:
            raise _invalid("invalid_request", "tolerances must not be negative (bps at most 10000)")
        try:
            basis, lines = reconcile.parse(export, policy.document.currency)
        except (reconcile.ReconcileError, UnicodeDecodeError) as error:
            raise _invalid("invalid_export", str(error)) from None
        await self.catch_up()

        def run() -> Any:
            with self.store.session() as session:
                accounts = self.pool.accounts_by_provider_key() if self.pool is not None else {}
                return reconcile.reconcile(session, provider, basis, lines, models, tolerance_nanos, tolerance_bps,
                                           accounts)

        try:
            result = await asyncio.to_thread(run)
        except reconcile.ReconcileError as error:  # days whose records retention deleted
            raise _invalid("invalid_export", str(error)) from None
        await asyncio.to_thread(self.store.insert_event, {
            "id": f"reconcile-{secrets.token_hex(8)}", "kind": "reconciliation", "request_id": "",
            "customer_id": "", "created_ms": now_ms(),
            "detail": {"provider": provider, "basis": basis, "ok": result.ok, "totals": result.totals(),
                       "lines": [c.__dict__ for c in result.comparisons[:10_000]]}})
        return result

    async def review_key(self, key_id: str) -> dict[str, Any]:
        """The review record of a key: owner, routes, bucket state, spend, last use, denials; no secret."""
        row = await self.get_key(key_id)
        await self.catch_up()
        at = now_ms()
        day_start = at - at % 86_400_000
        month_start = quotas.window_of("month", at // 1000).start * 1000
        activity = await asyncio.to_thread(self.store.key_activity, key_id, day_start, month_start)
        policy = self.book.current
        plan = policy.plan(row.plan) if policy else None
        models: list[str] = []
        buckets: list[dict[str, Any]] = []
        if policy is not None and plan is not None:
            from policyd.engine import Engine

            models = [f"{m} via {policy.model(m).upstream}"  # type: ignore[union-attr]
                      for m, _ in Engine.models_allowed(policy, plan, tuple(row.scopes or ()), row.environment)]
            limits = key_limits.effective(plan.limits, key_record(row).limits, policy.document.timezone, at)
            ids = quotas.scope_ids(row.customer_id, row.id, row.workspace_id, row.project_id, row.team_id)
            for state in await quotas.bucket_states(self.counters, limits, ids, at):
                limit = state["limit"]
                buckets.append({"label": limit.label, "unit": limit.unit, "window": limit.window, "used": state["used"],
                                "limit": limit.limit, "scope": limit.scope, "thresholds": list(limit.thresholds),
                                "action": limit.action})
        return {"key": row, "models": models, "buckets": buckets, **activity}

    async def caps(self) -> list[tuple[Cap, int, int]]:
        """The operator's caps in the policy in force: each with what its current window holds (open
        requests' holds, closed ones' charges) and when that window ends (unix s, 0 for a total)."""
        if self.book.current is None:
            return []
        now_s = now_ms() // 1000
        states = []
        for cap in self.book.current.document.caps:
            hold, window = quotas.cap_hold(cap, now_s, 0, 0, Quantities())
            states.append((cap, int(await self.counters.client.hget(hold.key, "used") or 0), window.end))
        return states

    async def reset_cap(self, name: str, reason: str = "") -> tuple[Cap, int, int, int, int]:
        """Forgive what one of the operator's caps counted of its settled requests in its current window (and what
        it was seeded with, bucket_seeds.py), less what earlier resets took: served again at once; requests in
        flight keep their holds. Kept (limit_resets, customer ""), so the audit and a rebuild take it out as the
        counter did. (the cap, what it held before, what was taken, what it holds now, when its window ends)."""
        policy = self.book.current
        cap = next((c for c in policy.document.caps if c.name == name), None) if policy is not None else None
        if cap is None:
            raise PolicydError("NOT_FOUND", "unknown_cap", f"no cap {name!r} in the policy in force")
        if len(reason) > limit_resets.REASON_LENGTH_MAX:
            raise _invalid("invalid_request", f"a reason is at most {limit_resets.REASON_LENGTH_MAX} characters")
        claim, holder = redis_keys.cap_reset(name), secrets.token_hex(8)
        if not await self.counters.claim(claim, holder, limit_resets.CLAIM_SECONDS):
            raise PolicydError("ABORTED", "reset_in_progress", f"another reset of cap {name!r} is being made; try "
                                                               "again once it is done")
        try:
            await self.catch_up()  # what was settled before `at` is in SQL
            at = now_ms()
            hold, window = quotas.cap_hold(cap, at // 1000, 0, 0, Quantities())
            settled = await asyncio.to_thread(self.store.settled_in_bucket, "", hold.key,
                                              window.start * 1000 - limit_resets.WINDOW_START_MARGIN_MS, at)
            earlier = (await asyncio.to_thread(self.store.reset_by_bucket)).get(hold.key, 0)
            seed = (await asyncio.to_thread(self.store.bucket_seeds)).get(hold.key, 0)
            outcome = await self.counters.reset_limit(None, hold.key, max(settled - earlier + seed, 0),
                                                      quotas.alert_fields(hold))
            taken, used = outcome or (0, 0)
            if taken:
                row = LimitResetRow(id="reset_" + secrets.token_hex(12), customer_id="", bucket_key=hold.key,
                                    label=cap.name, unit=cap.unit, amount=taken, reason=reason, created_ms=at)
                try:
                    await asyncio.to_thread(self.store.save_limit_reset, row)
                except Exception:  # not kept: the cap counts it again, as the records imply
                    await self.counters.reset_limit(None, hold.key, -taken)
                    raise
            return cap, used + taken, taken, used, window.end
        finally:
            await self.counters.end_claim(claim, holder)

    # ------------------------------------------------------------------ audit and rebuild
    async def audit(self) -> AuditResult:
        """Redis counters against what the SQL ledger implies (after catching up).

        Under traffic a request may close between the ledger's read and the counters' (its event not
        yet in SQL): a passing difference. Only differences still there after AUDIT_ROUNDS catch-ups
        are mismatches; a counter that is truly off stays off."""
        async with self.seeding_now:  # not halfway through a pass of bucket_seeds.py (on this replica)
            result = await self._compare()
        for _ in range(AUDIT_ROUNDS - 1):
            if result.ok:
                break
            async with self.seeding_now:
                again = await self._compare()
            persisting = {name for name, _, _ in result.mismatches}
            result = AuditResult(not any(m[0] in persisting for m in again.mismatches), again.checked,
                                 [m for m in again.mismatches if m[0] in persisting])
        return result

    async def _compare(self) -> AuditResult:
        await self.catch_up()
        balances = await asyncio.to_thread(self.store.ledger_balances)
        open_rows = await asyncio.to_thread(self.store.open_reservations)
        reserved: dict[str, int] = {}
        for row in open_rows:
            wallet = row.wallet_id or row.customer_id
            reserved[wallet] = reserved.get(wallet, 0) + row.reserved_nanos
        customers = set(balances) | set(reserved) | set(await self._wallet_customers())
        mismatches: list[tuple[str, int, int]] = []
        for customer in sorted(customers):
            balance, held = await self.counters.wallet(customer)
            if balance != balances.get(customer, 0):
                mismatches.append((f"wallet:{customer}:balance", balance, balances.get(customer, 0)))
            if held != reserved.get(customer, 0):
                mismatches.append((f"wallet:{customer}:reserved", held, reserved.get(customer, 0)))
        buckets = await self._held_by_bucket()
        now_s = now_ms() // 1000
        for key, expected in sorted(buckets.items()):
            if remaining_ttl(key, now_s) is None:
                continue  # a window that has passed
            used = await self.counters.client.hget(key, "used")
            if used is None and idles_out(key):
                continue  # a thread's budget forgotten once idle
            value = int(used or 0)
            if value != expected:
                mismatches.append((key, value, expected))
        credits = await asyncio.to_thread(self._credits_left)
        for (customer, grant_id), expected in sorted(credits.items()):
            p = self.counters.partition_of(customer)
            value = int(await self.counters.client.hget(redis_keys.credit_left(p, customer), grant_id) or 0)
            if value != expected:
                mismatches.append((f"credit_left:{customer}:{grant_id}", value, expected))
        return AuditResult(not mismatches, 2 * len(customers) + len(buckets) + len(credits), mismatches)

    def _credits_left(self) -> dict[tuple[str, str], int]:
        consumed = self.store.credit_consumed()
        return {(customer, grant_id): amount - consumed.get(grant_id, 0)
                for grant_id, customer, amount, _ in self.store.open_expiring_grants()}

    async def _wallet_customers(self) -> list[str]:
        found = []
        async for key in self.counters.client.scan_iter(match=f"{redis_keys.PREFIX}:{{p*}}:wallet:*", count=1000):
            found.append((key.decode() if isinstance(key, bytes) else key).split(":wallet:", 1)[1])
        return found

    async def rebuild(self) -> int:
        """Rewrite every counter from SQL (after Redis lost its data). Returns the number of counters written.

        Gated: every partition refuses script calls (authorize, settle, release, grant) until the rewrite is
        done, so a replica still running cannot change a counter halfway through, and events still in the
        streams are written to SQL first. The gates open only when the rewrite is whole: one that fails
        leaves them closed (decisions refused, as with counters lost) for the next rebuild. One rebuild at
        a time, across replicas (`rebuild_running` when another holds the lock)."""
        client = self.counters.client
        if not await client.set(redis_keys.REBUILD_LOCK, "1", nx=True, ex=REBUILD_SECONDS_MAX):
            raise PolicydError("FAILED_PRECONDITION", "rebuild_running", "another rebuild of the counters is running")
        gates = [redis_keys.gate(p) for p in range(self.counters.partitions)]
        try:
            for gate in gates:
                await client.set(gate, redis_keys.GATE_REBUILDING, ex=REBUILD_SECONDS_MAX)
            try:
                await self.writer.ensure_groups()
                await self.writer.drain()
                written = await self._rewrite()
            except BaseException:
                for gate in gates:  # closed for good, until a rebuild succeeds (not an upgrade's missing gate)
                    await client.set(gate, redis_keys.GATE_BROKEN)
                raise
            for gate in gates:
                await client.set(gate, redis_keys.GATE_OPEN)
            # then, with decisions running again, the requests closed before the loss (their retries answered)
            if self.restoring is not None:
                self.restoring.cancel()
            self.restoring = asyncio.create_task(self._restore_closed())
            return written
        finally:
            await client.delete(redis_keys.REBUILD_LOCK)

    async def restored(self) -> int:
        """Waits for the requests closed before the loss to be written back (after the last rebuild); how many."""
        return await self.restoring if self.restoring is not None else 0

    async def stop_restoring(self) -> None:
        if self.restoring is not None and not self.restoring.done():
            self.restoring.cancel()
            await asyncio.wait([self.restoring])

    async def stop_seeding(self) -> None:
        """Second passes still to come are not made (the requests they would add are left out of their limits)."""
        for task in list(self.seeding):
            task.cancel()
        if self.seeding:
            await asyncio.wait(list(self.seeding))

    async def _restore_closed(self) -> int:
        """Closed reservations written back from their records, those closed last first, for what is left of
        their retention (Counters.restore_closed); a page at a time, decisions running meanwhile. A settled one
        from before its fingerprint was kept is not (a retried Settle would be refused as other numbers)."""
        started = time.monotonic()
        at = now_ms()
        since = at - self.counters.retention_seconds * 1000
        written = 0
        try:
            for statuses, columns in ((("settled", "settled_late", "released"), _CLOSED_COLUMNS),
                                      (("expired",), _EXPIRED_COLUMNS)):  # a late settle reads all of its record
                before = None
                while rows := await asyncio.to_thread(self.store.closed_since, since, before, RESTORE_PAGE_RECORDS,
                                                      statuses, columns):
                    before = (rows[-1].updated_ms, rows[-1].request_id)
                    closed = [self._closed_request(row) for row in rows
                              if row.settle_fingerprint or row.status == "released" or row.status == "expired"]
                    written += await self.counters.restore_closed(closed, at)
        except Exception:
            log.exception("writing back the requests closed before the counters were lost failed after %d: "
                          "retries of the others are new to Redis", written)
            return written
        log.info("requests closed before the counters were lost: %d written back in %.1f s", written,
                 time.monotonic() - started)
        return written

    def _closed_request(self, row: Any) -> ClosedRequest:
        fields = _reservation_fields(row, _RECORD_COLUMNS if row.status == "expired" else CLOSED_RECORD_FIELDS,
                                     row.reservation_facts or {})
        p = self.counters.partition_of(row.customer_id)
        state = "settled" if row.status in ("settled", "settled_late") else row.status
        reservation = Reservation(row.request_id, p, state, row.reserved_nanos or 0,
                                  row.created_ms + self.reservation_ttl_ms, fields)
        return ClosedRequest(reservation, redis_keys.key_state(p, row.api_key_id), row.closed_ms or row.updated_ms,
                             row.settle_fingerprint, row.balance_before_nanos or 0, row.balance_after_nanos or 0)

    async def recover(self, starting: bool = False) -> int | None:
        """Rebuild the counters when a partition's gate is gone (Redis lost them: restarted without
        persistence, flushed, evicted; or a rebuild died) or broken (a rebuild failed): every decision on that
        partition is refused until they are whole. Nothing when every gate is open or another replica is at
        it. Returns the counters written, or None when no rebuild ran here."""
        client = self.counters.client
        gates = await self.counters.gates()
        if all(g == redis_keys.GATE_OPEN for g in gates) or redis_keys.GATE_REBUILDING in gates:
            return None  # whole, or another replica is at it (its gates lapse if it dies)
        if starting and gates == [None] * len(gates) and await client.get(redis_keys.POLICY_VERSION) is not None:
            # counters kept by a policyd from before the gates (an upgrade), not lost: whole as they are. A
            # rebuild now would rewrite them under the older replicas still deciding, which no gate holds back
            for partition in range(self.counters.partitions):
                await client.set(redis_keys.gate(partition), redis_keys.GATE_OPEN, nx=True)
            log.info("counters kept from before their gates: opened as they are")
            return None
        say = log.info if starting else log.warning  # at start: an empty store, a new Redis
        trigger = "start" if starting else "lost"
        say("counters not known whole (a partition's gate is gone): rebuilding them from SQL")
        try:
            written = await self.rebuild()
        except PolicydError as error:
            if error.reason == "rebuild_running":
                return None
            metrics.counter_rebuilds.labels(trigger, "failed").inc()
            raise
        except Exception:
            metrics.counter_rebuilds.labels(trigger, "failed").inc()
            raise
        metrics.counter_rebuilds.labels(trigger, "done").inc()
        say("counters rebuilt from SQL: %d written", written)
        return written

    async def _rewrite(self) -> int:
        """Every counter from SQL, queued on pipelines of REBUILD_PIPELINE_COMMANDS commands (a million keys
        is a thousand round trips, not a million)."""
        at = now_ms()
        written = 0
        async with _Batches(self.counters.client) as batch:
            for row in await asyncio.to_thread(self.store.keys):
                self.counters.queue_key_state(await batch.pipe(2), row.customer_id, row.id, row.status,
                                              _secrets_of(row, at), row.expires_ms, key_record(row).terms)
                written += 1
            after = None  # the stamps of end users' own limits, which a replica may have remembered older ones of
            while rows := await asyncio.to_thread(self.store.owner_limits_page, "", "end_user", "", after,
                                                  RESTORE_PAGE_RECORDS):
                after = (rows[-1].customer_id, rows[-1].scope, rows[-1].owner_id)
                for owner in rows:
                    (await batch.pipe()).hset(
                        redis_keys.end_user_terms(self.counters.partition_of(owner.customer_id), owner.customer_id),
                        owner.owner_id, key_limits.end_user_stamp(owner))
                    written += 1
            balances = await asyncio.to_thread(self.store.ledger_balances)
            open_rows = await asyncio.to_thread(self.store.open_reservations)
            reserved: dict[str, int] = {}
            inflight: dict[tuple[int, str], int] = {}
            for row in open_rows:
                wallet = row.wallet_id or row.customer_id
                reserved[wallet] = reserved.get(wallet, 0) + row.reserved_nanos
                p = self.counters.partition_of(row.customer_id)
                facts = dict(row.reservation_facts or {})
                # a background response's (background.py): held as long, its key's concurrency slot given back
                # already, and asked for on when policyd asks its provider for it
                poll, poll_until = facts.pop("poll", ""), int(facts.pop("poll_until", 0) or 0)
                if not poll_until:
                    inflight[(p, row.api_key_id)] = inflight.get((p, row.api_key_id), 0) + 1
                expires = row.created_ms + self.reservation_ttl_ms
                fields = _reservation_fields(row, _RECORD_COLUMNS, facts)
                pipe = await batch.pipe(6)
                pipe.hset(redis_keys.reservation(p, row.request_id), mapping={
                    "state": "reserved", "key": redis_keys.key_state(p, row.api_key_id), "amount": str(row.reserved_nanos),
                    "wallet": "1", "expires": str(max(expires, at)), "created": str(row.created_ms),
                    "r": json.dumps(fields, separators=(",", ":")),
                    **({"slot": "returned"} if poll_until else {}), **({"poll": poll} if poll else {}),
                })
                pipe.zadd(redis_keys.deadlines(p), {row.request_id: max(expires, poll_until, at)})
                if poll:
                    pipe.zadd(redis_keys.background_polls(p), {row.request_id: at})
                    pipe.set(redis_keys.polled_response(p, poll.partition("\n")[2]), row.request_id,
                             px=max(poll_until, at) - at + 60_000)
                pipe.set(redis_keys.request_index(row.request_id), str(p), ex=self.counters.request_index_seconds)
                written += 1
            for customer in set(balances) | set(reserved):
                p = self.counters.partition_of(customer)
                (await batch.pipe()).hset(redis_keys.wallet(p, customer), mapping={
                    "balance": str(balances.get(customer, 0)), "reserved": str(reserved.get(customer, 0)),
                })
                written += 1
            for (p, key_id), count in inflight.items():
                (await batch.pipe()).set(redis_keys.inflight(p, key_id), str(count))
            for grant_id, customer in await asyncio.to_thread(self.store.grant_ids):
                (await batch.pipe()).set(redis_keys.grant_marker(self.counters.partition_of(customer), grant_id), "1")
            credits = await asyncio.to_thread(self._credits_left)
            expiries = {g: x for g, _, _, x in await asyncio.to_thread(self.store.open_expiring_grants)}
            for (customer, grant_id), left in credits.items():
                p = self.counters.partition_of(customer)
                pipe = await batch.pipe(3)
                pipe.zadd(redis_keys.credit_deadlines(p), {f"{customer} {grant_id}": expiries[grant_id]})
                if left > 0:
                    pipe.zadd(redis_keys.expiring_credits(p, customer), {grant_id: expiries[grant_id]})
                    pipe.hset(redis_keys.credit_left(p, customer), grant_id, str(left))
                written += 1
            from policyd.engine import CONVERSATION_PRICE

            kept_ms = STORED_RESPONSE_HOT_SECONDS * 1000  # older ones are found in their records when asked for
            for response_id, customer, provider, served, account, created_ms, context in await asyncio.to_thread(
                    self.store.stored_responses, at - kept_ms):  # and conversations made (no model served)
                price = CONVERSATION_PRICE if not served else \
                    self.book.current.model(served) if self.book.current is not None else None
                seconds = (created_ms + kept_ms - at) // 1000
                model, life = "", 0  # an explicit cache's model, and the longest life it was charged
                if response_id.startswith(CACHED_CONTENT_PREFIX):
                    charged = await asyncio.to_thread(self.store.cache_storage_charged, response_id)
                    model, life = served, charged // max(1, int(context or 0))
                    seconds += life
                if seconds > 0:
                    self.counters.queue_stored_response(await batch.pipe(), response_id, customer, provider,
                                                        price.upstream if price else "", account, seconds,
                                                        int(context or 0), model, life)
                    written += 1
            now_s = at // 1000
            for key, total in (await self._held_by_bucket()).items():
                ttl = remaining_ttl(key, now_s)
                if ttl is None:
                    continue
                pipe = await batch.pipe(2)
                pipe.hset(key, "used", str(total))
                if ttl:
                    pipe.expire(key, ttl)
                written += 1
        # the policy version last: its presence says the counters are whole
        if self.book.current is not None:
            await self.counters.client.set(redis_keys.POLICY_VERSION, str(self.book.current.version))
        return written


def _reservation_fields(row: Any, columns: tuple[str, ...], facts: dict[str, Any]) -> dict[str, Any]:
    """A reservation's facts as a rebuild writes them back from its record: these columns of the record (its
    wallet, the customer's when it names none), beside the facts SQL kept for it."""
    record = {c: getattr(row, c) for c in columns}
    record["wallet_id"] = record["wallet_id"] or row.customer_id
    return {"record": record, "input_tokens_estimate": 0, **facts}


REBUILD_PIPELINE_COMMANDS = 1000
RESTORE_PAGE_RECORDS = 2000  # closed records read from SQL, and written back to Redis, at a time


class _Batches:
    """Pipelines (no transaction) sent whenever REBUILD_PIPELINE_COMMANDS commands are queued, and at the end."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.current: Any = None
        self.queued = 0

    async def pipe(self, commands: int = 1) -> Any:
        """The pipeline to queue the next `commands` commands on."""
        if self.current is not None and self.queued + commands > REBUILD_PIPELINE_COMMANDS:
            await self.flush()
        if self.current is None:
            self.current = self.client.pipeline(transaction=False)
        self.queued += commands
        return self.current

    async def flush(self) -> None:
        if self.current is not None:
            pipe, self.current, self.queued = self.current, None, 0
            await pipe.execute()  # which resets it (entering it as a context would reset a cluster's queue)

    async def __aenter__(self) -> "_Batches":
        return self

    async def __aexit__(self, kind: Any, error: Any, trace: Any) -> None:
        if kind is None:
            await self.flush()
        elif self.current is not None:
            await self.current.reset()


_RECORD_COLUMNS = (
    "request_id", "created_ms", "trace_id", "traceparent", "customer_id", "workspace_id", "project_id", "team_id",
    "api_key_id", "wallet_id", "plan", "environment", "claimed", "end_user_id", "agent_id", "thread_id", "feature", "route",
    "tags", "endpoint", "requested_model", "primary_model", "served_model", "provider", "upstream", "decision",
    "policy_version", "price_table_version", "billing_mode", "reservation_mode", "currency", "max_output_tokens", "choices",
    "holds", "decision_latency_us", "client_address", "user_agent", "fallback_reason",
    "containers", "container_memory", "image_model",
)
# what a closed reservation is written back from (Admin._restore_closed): a settled or released one keeps a few
# facts (counters.CLOSED_RECORD_FIELDS), an expired one all of them
_CLOSED_COLUMNS = (*CLOSED_RECORD_FIELDS, "status", "reserved_nanos", "reservation_facts", "closed_ms",
                   "settle_fingerprint", "balance_before_nanos", "balance_after_nanos")
_EXPIRED_COLUMNS = (*_RECORD_COLUMNS, *_CLOSED_COLUMNS)
