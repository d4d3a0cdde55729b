"""SQL access for keys, policy versions, the ledger and records (synchronous; callers use threads)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable

from sqlalchemy import (JSON, Table, bindparam, case, delete, func, insert, literal, or_, select, text, tuple_,
                        update)
from sqlalchemy.dialects import sqlite
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from policyd import compact_json, key_limits, redis_keys
from policyd.db import (ApiKeyRow, EventRow, LedgerEntryRow, LimitResetRow, OwnerLimitsRow, PolicyVersionRow,
                        PrunedSumRow, UsageRecordRow, BucketSeedRow, make_engine)
from policyd.policy import TAG_SCOPE_PREFIX, Limit

OPEN_STATUSES = ("reserved",)
OWNER_ID_LENGTH_MAX = 128  # owner_limits.owner_id


@dataclass(frozen=True)
class KeyRecord:
    """The identity of a key, as the decision pipeline needs it. Its owner never changes; its plan, scopes
    and own limits (its terms) may: their fingerprint is kept in the key's Redis state, where the
    authorize script compares it with the one a decision was made under."""

    id: str
    customer_id: str
    workspace_id: str
    project_id: str
    team_id: str
    environment: str
    plan: str
    scopes: tuple[str, ...] = field(default=())
    # its own limits and its owners', as stored (key_limits.py)
    stored_limits: tuple[dict[str, Any], ...] = field(default=())
    # the fingerprint of its customer's end users' own limits ("": none), read when a request names its end user
    end_user_limits: str = ""

    @cached_property
    def terms(self) -> str:
        return key_terms(self.plan, self.scopes, self.stored_limits, self.end_user_limits)

    @cached_property
    def limits(self) -> tuple[Limit, ...]:
        return key_limits.as_limits(self.stored_limits)


def key_terms(plan: str, scopes: Iterable[str], limits: Iterable[dict[str, Any]] | None = (),
              end_user_limits: str = "") -> str:
    """The fingerprint of what a key may do: its plan, scopes and own limits (its owners' among them), and its
    customer's end users' (a key of a customer whose end users have none reads as it did before they could)."""
    described = json.dumps([plan, sorted(scopes), list(limits or ())] + ([end_user_limits] if end_user_limits else []),
                           sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def _by_columns(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by the columns they name: each group is one executemany (the others take defaults)."""
    groups: dict[frozenset[str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(frozenset(row), []).append(row)
    return list(groups.values())


def _filled(table: Table, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The columns to write of a batch and each row's values in their order: the columns some row names,
    and those with a Python-side default (worked out once a batch), which a row leaving them out takes,
    as an INSERT through SQLAlchemy would; columns with neither are left to the table's own default."""
    named = set().union(*rows)
    columns = [c for c in table.columns if c.name in named or c.default is not None]
    defaults = [(c.name, None if c.default is None else c.default.arg(None) if c.default.is_callable  # type: ignore[attr-defined]
                 else c.default.arg) for c in columns]  # type: ignore[attr-defined]
    return [c.name for c in columns], [[row.get(name, default) for name, default in defaults] for row in rows]


def _copy(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """COPY rows into a PostgreSQL table in the session's transaction. The driver's errors are raised as
    SQLAlchemy's (IntegrityError for a row that exists), as an INSERT's would be."""
    import psycopg

    names, values = _filled(table, rows)
    json_positions = [i for i, name in enumerate(names) if isinstance(table.c[name].type, JSON)]
    statement = f"COPY {table.name} ({', '.join(names)}) FROM STDIN"
    cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
    try:
        with cursor.copy(statement) as copy:
            for row in values:
                for i in json_positions:  # JSON as text: the server parses it into the column
                    if row[i] is not None:
                        row[i] = compact_json.dumps(row[i])
                copy.write_row(row)
    except psycopg.Error as error:
        raise DBAPIError.instance(statement, None, error, psycopg.Error) from error
    finally:
        cursor.close()


def add_sums(session: Session, table: Table, index: list[str], rows: list[dict[str, Any]], latest: bool = False
             ) -> None:
    """Insert rows of an `amount` by their key columns (`index`), adding the amount to that of a row there
    (`latest`: keeping the greater of the two instead): one upsert, run for every row."""
    postgresql = session.bind is not None and session.bind.dialect.name == "postgresql"
    statement = (postgresql_insert if postgresql else sqlite.insert)(table)
    old, new = table.c.amount, statement.excluded.amount
    combined = (func.greatest(old, new) if postgresql else func.max(old, new)) if latest else old + new
    session.execute(statement.on_conflict_do_update(index_elements=index, set_={"amount": combined}), rows)


def _insert_ignore_postgresql(session: Session, table: Table, rows: list[dict[str, Any]]) -> None:
    """Insert a batch in one statement, skipping rows whose key exists: the rows go as one JSON array that
    PostgreSQL turns into the table's row type (an executemany costs a round trip of the driver's
    pipeline a row). Rows that repeat a key within the batch are skipped the same way."""
    names, values = _filled(table, rows)
    listed = ", ".join(names)
    statement = text(f"INSERT INTO {table.name} ({listed}) SELECT {listed} FROM "
                     f"jsonb_populate_recordset(NULL::{table.name}, CAST(:rows AS jsonb)) ON CONFLICT DO NOTHING")
    session.execute(statement, {"rows": compact_json.dumps([dict(zip(names, row)) for row in values])})


def key_record(row: ApiKeyRow) -> KeyRecord:
    return KeyRecord(
        id=row.id,
        customer_id=row.customer_id,
        workspace_id=row.workspace_id,
        project_id=row.project_id,
        team_id=row.team_id,
        environment=row.environment,
        plan=row.plan,
        scopes=tuple(row.scopes or ()),
        stored_limits=tuple(row.limits or ()) + tuple(row.owner_limits or ()),
        end_user_limits=row.end_user_limits or "",
    )


SETTLED = ("settled", "settled_late")


def held_in_unit(unit: str, refunds_count: bool = True) -> Any:
    """What a record holds in a bucket of `unit` counting it from its authorization, as SQL sums it: a settled one
    its charge less refunds (money; `refunds_count` false: a cap's, which a refund gives nothing back), its provider
    cost (cost), its tokens (tokens: input, output and the image tool's, as Quantities.tokens counts them), 1
    (requests); an open one its hold (money and cost: its reserved charge, the larger; tokens: none known until it
    settles), 1; released, expired and denied ones nothing."""
    r = UsageRecordRow
    settled = {"money": r.charge_nanos - r.refunded_nanos if refunds_count else r.charge_nanos, "cost": r.cost_nanos,
               "requests": 1,
               "tokens": r.input_tokens + r.output_tokens + r.image_generation_input_tokens
               + r.image_generation_output_tokens}[unit]
    open_hold = {"money": r.reserved_nanos, "cost": r.reserved_nanos, "requests": 1, "tokens": 0}[unit]
    return case((r.status.in_(SETTLED), settled), (r.status == "reserved", open_hold), else_=0)


# the record column naming the bucket of each limit scope (quotas.scope_ids: all but key and customer within the
# customer)
SCOPE_COLUMNS = {"key": "api_key_id", "customer": "customer_id", "workspace": "workspace_id",
                 "project": "project_id", "team": "team_id", "feature": "feature", "model": "served_model",
                 "thread": "thread_id", "end_user": "end_user_id"}


def scope_column(scope: str) -> Any:
    """The records' column a limit scope's buckets are named by (SCOPE_COLUMNS); a tag limit's ("tag:<name>"), the
    value of that tag in each record's tags (NULL where it has none, never equal to "")."""
    if scope.startswith(TAG_SCOPE_PREFIX):
        return UsageRecordRow.tags[scope[len(TAG_SCOPE_PREFIX):]].as_string()
    return getattr(UsageRecordRow, SCOPE_COLUMNS[scope])


def use_in_window_query(scope: str, unit: str, since_ms: int, until_ms: int, *, plans: Iterable[str] = (),
                        key_id: str = "", only_key_id: str = "", customer_id: str = "", owner_id: str = "",
                        before_version: int = 0, by_request: bool = False) -> Any:
    """(customer, the scope's id of it: SCOPE_COLUMNS, the model served, its provider, what those requests in
    [since_ms, until_ms) hold in a bucket of `unit`: held_in_unit): of the requests decided under these plans, or
    by this key (either: both given), by this key alone (`only_key_id`), of one customer and one owner of the scope
    (given: read by the customer's index on (customer, created), an end user's by (customer, end user, created)),
    decided under a policy older than `before_version` (given). Scope "all": every customer's (a cap's), customer
    and owner ""; scope "tag:<name>": the value of that tag of each request that has it. What a limit that begins to
    bind mid-window starts from (bucket_seeds.py). `by_request`: a row a request, each with the buckets it held in
    (its holds) last."""
    r = UsageRecordRow
    named = scope_column(scope) if scope != "all" else None
    groups = [r.customer_id, named] if named is not None else [literal(""), literal("")]
    held = held_in_unit(unit, refunds_count=named is not None)  # a refund gives a cap nothing back
    query = select(*groups, r.served_model, r.provider, *((held, r.holds) if by_request else (func.sum(held),))) \
        .where(r.created_ms >= since_ms, r.created_ms < until_ms, r.decision != "deny")
    plans = tuple(plans)
    if plans and key_id:
        query = query.where(or_(r.plan.in_(plans), r.api_key_id == key_id))
    elif plans:
        query = query.where(r.plan.in_(plans))
    elif key_id:
        query = query.where(r.api_key_id == key_id)
    if only_key_id:
        query = query.where(r.api_key_id == only_key_id)
    if customer_id:
        query = query.where(r.customer_id == customer_id)
    if named is not None:
        query = query.where(named == owner_id) if owner_id else query.where(named != "")
    if before_version:
        query = query.where(r.policy_version < before_version)
    if by_request:
        return query
    return query.group_by(*(groups if named is not None else []), r.served_model, r.provider)


# what deleted records count in a key's review, kept in pruned_sums (retention.py): its requests, when it was last
# used, its denials, failures, and denials by reason ("<key id> <reason>")
KEY_ACTIVITY_KINDS = ("key_requests", "key_last_used", "key_denials", "key_errors", "key_deny_reason")


def key_activity_columns() -> list[Any]:
    """What a key's review counts of its records: requests, the last one's time, denials, failures."""
    r = UsageRecordRow
    return [func.count(), func.max(r.created_ms), func.sum(case((r.decision == "deny", 1), else_=0)),
            func.sum(case((r.status.in_(("released", "expired")), 1), else_=0))]


class Store:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine = make_engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def session(self) -> Session:
        return self.sessions()

    def insert_ignore(self, session: Session, model: type, rows: list[dict[str, Any]]) -> None:
        """Insert rows, skipping those whose primary key exists (replays are harmless)."""
        if not rows:
            return
        if self.engine.dialect.name == "postgresql":
            _insert_ignore_postgresql(session, model.__table__, rows)  # type: ignore[attr-defined]
            return
        # executemany (a list of parameter sets): one statement compiled and cached, whatever the batch size;
        # rows that name other columns go in a statement of their own (the rest take their defaults)
        for same in _by_columns(rows):
            session.execute(sqlite.insert(model.__table__).on_conflict_do_nothing(), same)  # Core, not ORM bulk

    def insert_new(self, session: Session, model: type, rows: list[dict[str, Any]]) -> None:
        """Insert rows that must not exist yet (a conflict raises IntegrityError: another writer was first).
        On PostgreSQL by COPY (the batch in one stream the driver encodes in C: the writer's inserts cost
        about half of its CPU as executemany)."""
        if not rows:
            return
        if self.engine.dialect.name == "postgresql":
            _copy(session, model.__table__, rows)  # type: ignore[attr-defined]
            return
        for same in _by_columns(rows):
            session.execute(insert(model.__table__), same)  # Core: the ORM's bulk path costs more per row

    def update_by_key(self, session: Session, model: type, key: str, rows: list[dict[str, Any]]) -> None:
        """Update rows by their key column: each dict holds the key and the columns to set; rows that set
        the same columns go in one executemany."""
        table = model.__table__  # type: ignore[attr-defined]
        for same in _by_columns(rows):
            names = [name for name in same[0] if name != key]
            statement = (update(table).where(table.c[key] == bindparam(f"k_{key}"))
                         .values({name: bindparam(f"v_{name}") for name in names}))
            session.execute(statement, [{f"k_{key}": row[key], **{f"v_{n}": row[n] for n in names}} for row in same])

    def insert_records(self, records: list[dict[str, Any]]) -> None:
        with self.session() as session, session.begin():
            self.insert_ignore(session, UsageRecordRow, records)

    def insert_event(self, event: dict[str, Any]) -> None:
        with self.session() as session, session.begin():
            self.insert_ignore(session, EventRow, [event])

    def list_events(self, kind: str, customer_id: str, since_ms: int, until_ms: int, limit: int) -> list[EventRow]:
        """Events newest first, filtered."""
        e = EventRow
        query = _narrowed(select(e).order_by(e.created_ms.desc(), e.id).limit(limit),
                          ((e.kind, kind), (e.customer_id, customer_id)), e.created_ms, since_ms, until_ms)
        with self.session() as session:
            return list(session.scalars(query))

    # keys
    def key_by_hash(self, secret_hash: str) -> ApiKeyRow | None:
        with self.session() as session:
            return session.scalars(
                select(ApiKeyRow).where(
                    or_(ApiKeyRow.secret_hash == secret_hash, ApiKeyRow.previous_secret_hash == secret_hash)
                )
            ).first()

    def key(self, key_id: str) -> ApiKeyRow | None:
        with self.session() as session:
            return session.get(ApiKeyRow, key_id)

    def keys(self, customer_id: str = "") -> list[ApiKeyRow]:
        with self.session() as session:
            query = select(ApiKeyRow).order_by(ApiKeyRow.created_ms, ApiKeyRow.id)
            if customer_id:
                query = query.where(ApiKeyRow.customer_id == customer_id)
            return list(session.scalars(query))

    def keys_page(self, customer_ids: Iterable[str] | None, after: tuple[int, str] | None, count: int
                  ) -> list[ApiKeyRow]:
        """Up to `count` keys, oldest first, of these customers (None: every customer's), past `after` (a key's
        created_ms and id)."""
        k = ApiKeyRow
        query = select(k).order_by(k.created_ms, k.id).limit(count)
        if customer_ids is not None:
            query = query.where(k.customer_id.in_(sorted(customer_ids)))
        if after is not None:
            query = query.where(tuple_(k.created_ms, k.id) > tuple_(*after))
        with self.session() as session:
            return list(session.scalars(query))

    def save_key(self, row: ApiKeyRow) -> ApiKeyRow:
        with self.session() as session, session.begin():
            merged = session.merge(row)
        return merged

    def owner_limits(self, customer_id: str = "") -> list[OwnerLimitsRow]:
        """The limits given a customer and its workspaces, projects and teams (every customer's: "")."""
        r = OwnerLimitsRow
        with self.session() as session:
            query = select(r).order_by(r.customer_id, r.scope, r.owner_id)
            return list(session.scalars(query.where(r.customer_id == customer_id) if customer_id else query))

    def keys_owner_limits(self, customer_id: str) -> list[OwnerLimitsRow]:
        """The limits its keys carry of a customer's owners: the customer's, its workspaces', projects' and
        teams' (not its end users', which a decision reads one at a time)."""
        r = OwnerLimitsRow
        with self.session() as session:
            return list(session.scalars(select(r).where(r.customer_id == customer_id, r.scope != "end_user")
                                        .order_by(r.scope, r.owner_id)))

    def has_end_user_limits(self, customer_id: str) -> bool:
        """Whether some end users of the customer have limits of their own."""
        r = OwnerLimitsRow
        with self.session() as session:
            return session.execute(select(r.owner_id).where(r.customer_id == customer_id, r.scope == "end_user")
                                   .limit(1)).first() is not None

    def keys_to_flag(self, customer_id: str, flag: str) -> list[ApiKeyRow]:
        """A customer's keys, revoked ones aside, whose end_user_limits is not `flag` (Admin.set_owner_limits)."""
        k = ApiKeyRow
        with self.session() as session:
            return list(session.scalars(select(k).where(
                k.customer_id == customer_id, k.status != "revoked",
                func.coalesce(k.end_user_limits, "") != flag).order_by(k.created_ms, k.id)))

    def owner_limits_page(self, customer_id: str, scope: str, owner_id: str, after: tuple[str, str, str] | None,
                          count: int) -> list[OwnerLimitsRow]:
        """Up to `count` owners with limits of their own, by customer, scope and owner id, past `after` (one such
        triple): every customer's (""), of every scope (""), or the one owner named."""
        r = OwnerLimitsRow
        query = select(r).order_by(r.customer_id, r.scope, r.owner_id).limit(count)
        for column, value in ((r.customer_id, customer_id), (r.scope, scope), (r.owner_id, owner_id)):
            if value:
                query = query.where(column == value)
        if after is not None:
            query = query.where(tuple_(r.customer_id, r.scope, r.owner_id) > tuple_(*after))
        with self.session() as session:
            return list(session.scalars(query))

    def owner_limits_of(self, customer_id: str, scope: str, owner_id: str) -> OwnerLimitsRow | None:
        """One owner's limits (an end user's, read by a decision naming it), or None."""
        if len(owner_id) > OWNER_ID_LENGTH_MAX:  # longer than any owner's: none has limits of its own
            return None
        with self.session() as session:
            return session.get(OwnerLimitsRow, (customer_id, scope, owner_id))

    def use_in_window(self, scope: str, unit: str, since_ms: int, until_ms: int, **narrowed: Any
                      ) -> dict[tuple[str, str, str, str], int]:
        """(customer, owner, model served, provider) -> what those requests in [since_ms, until_ms) hold in a bucket
        of `unit` (use_in_window_query)."""
        with self.session() as session:
            return {(str(row[0]), str(row[1]), str(row[2]), str(row[3])): int(row[4])
                    for row in session.execute(use_in_window_query(scope, unit, since_ms, until_ms, **narrowed))
                    if row[4]}

    def use_by_request(self, scope: str, unit: str, since_ms: int, until_ms: int, **narrowed: Any
                       ) -> list[tuple[str, str, str, str, int, set[str]]]:
        """Each request use_in_window would sum: (customer, owner, model served, provider, what it holds in a bucket
        of `unit`, the bucket keys it held in)."""
        with self.session() as session:
            return [(str(row[0]), str(row[1]), str(row[2]), str(row[3]), int(row[4]),
                     {hold[0] for hold in row[5] or ()})
                    for row in session.execute(use_in_window_query(scope, unit, since_ms, until_ms, by_request=True,
                                                                   **narrowed)) if row[4]]

    def bucket_seeds(self) -> dict[str, int]:
        """Bucket key -> what it counted from when its limit began to bind mid-window (bucket_seeds.py)."""
        with self.session() as session:
            return {key: int(amount) for key, amount in session.execute(
                select(BucketSeedRow.bucket_key, BucketSeedRow.amount))}

    def held_beside_records(self, session: Session | None = None) -> dict[str, int]:
        """Bucket key -> what a bucket holds beside its records' holds (held_by_bucket): what owners and keys had used
        before their limits were made (their seeds), what limits begun mid-window started from and what rollover
        carried (bucket_seeds), less what resets took (limit_resets.py). Read in `session`, when given."""
        if session is None:
            with self.session() as own:
                return self.held_beside_records(own)
        held: dict[str, int] = {}
        seeded = [seeds or {} for seeds in session.scalars(select(OwnerLimitsRow.seeds))]
        seeded += [seeds or {} for seeds in session.scalars(select(ApiKeyRow.seeds).where(ApiKeyRow.seeds.is_not(None)))]
        seeded.append(dict(session.execute(select(BucketSeedRow.bucket_key, BucketSeedRow.amount)).all()))
        for seeds in seeded:
            for key, amount in seeds.items():
                held[key] = held.get(key, 0) + int(amount)
        for key, amount in session.execute(select(LimitResetRow.bucket_key, func.sum(LimitResetRow.amount))
                                           .group_by(LimitResetRow.bucket_key)):
            held[key] = held.get(key, 0) - int(amount)
        return held

    def add_bucket_seeds(self, seeds: dict[str, int], at_ms: int, ended: Iterable[str] = ()) -> None:
        """Add to the seeds of these buckets (made where none), and take those of `ended` windows out, in one
        transaction."""
        with self.session() as session, session.begin():
            ended = list(ended)
            if ended:
                session.execute(delete(BucketSeedRow).where(BucketSeedRow.bucket_key.in_(ended)))
            if seeds:
                add_sums(session, BucketSeedRow.__table__, ["bucket_key"],
                         [{"bucket_key": key, "amount": amount, "made_ms": at_ms}
                          for key, amount in sorted(seeds.items())])

    def save_owner_limits(self, row: OwnerLimitsRow) -> None:
        """An owner's limits (none, and not paused: its row goes)."""
        with self.session() as session, session.begin():
            if row.limits or row.paused:
                session.merge(row)
            else:
                session.execute(delete(OwnerLimitsRow).where(
                    OwnerLimitsRow.customer_id == row.customer_id, OwnerLimitsRow.scope == row.scope,
                    OwnerLimitsRow.owner_id == row.owner_id))

    def plans_in_use(self) -> dict[str, int]:
        with self.session() as session:
            rows = session.execute(
                select(ApiKeyRow.plan, func.count()).where(ApiKeyRow.status != "revoked").group_by(ApiKeyRow.plan)
            )
            return {plan: count for plan, count in rows}

    # policy versions
    def latest_policy(self) -> PolicyVersionRow | None:
        with self.session() as session:
            return session.scalars(select(PolicyVersionRow).order_by(PolicyVersionRow.version.desc())).first()

    def policy_version(self, version: int) -> PolicyVersionRow | None:
        with self.session() as session:
            return session.get(PolicyVersionRow, version)

    def add_policy(self, row: PolicyVersionRow) -> None:
        with self.session() as session, session.begin():
            session.add(row)

    # records
    def usage_record(self, request_id: str) -> UsageRecordRow | None:
        with self.session() as session:
            return session.get(UsageRecordRow, request_id)

    def latest_usage(self, customer_id: str, limit: int, request_id: str = "", api_key_id: str = "",
                     since_ms: int = 0, until_ms: int = 0, after: tuple[int, str] | None = None) -> list[UsageRecordRow]:
        """Records newest first (then by request id), filtered; `after` (created ms, request id) starts the
        page past that record (a keyset page: records written meanwhile neither shift nor repeat it)."""
        r = UsageRecordRow
        with self.session() as session:
            query = _narrowed(select(r).order_by(r.created_ms.desc(), r.request_id).limit(limit),
                              ((r.customer_id, customer_id), (r.request_id, request_id), (r.api_key_id, api_key_id)),
                              r.created_ms, since_ms, until_ms)
            if after is not None:
                query = query.where(or_(r.created_ms < after[0], (r.created_ms == after[0]) & (r.request_id > after[1])))
            return list(session.scalars(query))

    def key_activity(self, key_id: str, day_start_ms: int, month_start_ms: int) -> dict[str, Any]:
        r = UsageRecordRow
        charged = r.status.in_(("settled", "settled_late"))
        with self.session() as session:
            totals = session.execute(select(
                *key_activity_columns(),
                func.sum(case((charged & (r.created_ms >= day_start_ms), r.charge_nanos), else_=0)),
                func.sum(case((charged & (r.created_ms >= month_start_ms), r.charge_nanos), else_=0)),
            ).where(r.api_key_id == key_id)).one()
            reasons = dict(session.execute(select(r.reason, func.count()).where(
                r.api_key_id == key_id, r.decision == "deny").group_by(r.reason)).all())
            # what deleted records counted (retention.py)
            pruned = {(kind, key): int(amount) for kind, key, amount in session.execute(
                select(PrunedSumRow.kind, PrunedSumRow.key, PrunedSumRow.amount).where(
                    PrunedSumRow.kind.in_(KEY_ACTIVITY_KINDS),
                    or_(PrunedSumRow.key == key_id, PrunedSumRow.key.startswith(f"{key_id} ", autoescape=True))))}
        requests, last, denials, errors, today, month = totals
        for (kind, key), amount in pruned.items():
            if kind == "key_deny_reason":
                reason = key.removeprefix(f"{key_id} ")
                reasons[reason] = int(reasons.get(reason, 0)) + amount
        return {"requests": int(requests or 0) + pruned.get(("key_requests", key_id), 0),
                "last_used_ms": max(int(last or 0), pruned.get(("key_last_used", key_id), 0)),
                "denials": int(denials or 0) + pruned.get(("key_denials", key_id), 0),
                "errors": int(errors or 0) + pruned.get(("key_errors", key_id), 0),
                "spend_today": int(today or 0), "spend_month": int(month or 0),
                "denials_by_reason": {k: int(v) for k, v in reasons.items()}}

    def ledger_balances(self) -> dict[str, int]:
        """Wallet id -> the sum of its ledger entries (its balance)."""
        with self.session() as session:
            rows = session.execute(
                select(LedgerEntryRow.wallet_id, LedgerEntryRow.customer_id, func.sum(LedgerEntryRow.amount_nanos))
                .group_by(LedgerEntryRow.wallet_id, LedgerEntryRow.customer_id)
            )
            balances: dict[str, int] = {}
            for wallet, customer, total in rows:
                balances[wallet or customer] = balances.get(wallet or customer, 0) + int(total)
            return balances

    def open_reservations(self) -> list[UsageRecordRow]:
        with self.session() as session:
            return list(session.scalars(select(UsageRecordRow).where(UsageRecordRow.status.in_(OPEN_STATUSES))))

    def closed_since(self, since_ms: int, before: tuple[int, str] | None, limit: int, statuses: Iterable[str],
                     columns: Iterable[str]) -> list[Any]:
        """These columns (and updated_ms) of up to `limit` records closed since since_ms with one of these
        statuses, last written first, those written before `before` (the last one of the previous page:
        updated ms, request id). Rows, not ORM objects: a day of records is read a page at a time."""
        r = UsageRecordRow
        query = select(*(getattr(r, name) for name in {*columns, "updated_ms", "request_id", "status"})).where(
            r.status.in_(tuple(statuses)), r.updated_ms >= since_ms, r.closed_ms >= since_ms)
        if before is not None:
            query = query.where(tuple_(r.updated_ms, r.request_id) < tuple_(*before))
        query = query.order_by(r.updated_ms.desc(), r.request_id.desc()).limit(limit)
        with self.session() as session:
            return list(session.execute(query))

    def stored_response(self, response_id: str) -> tuple[str, str, str, str, int, int] | None:
        """(customer, provider, served model, provider account, created ms, its input and output tokens) of
        the request whose reply the provider stored under this id (a response, a conversation, a kept chat
        completion, an explicit cache: the first, which made it), or None."""
        r = UsageRecordRow
        query = select(r.customer_id, r.provider, r.served_model, r.provider_account, r.created_ms,
                       r.input_tokens + r.output_tokens).where(
            r.provider_response_id == response_id).order_by(r.created_ms).limit(1)
        with self.session() as session:
            row = session.execute(query).first()
        return None if row is None else tuple(row)  # type: ignore[return-value]

    def cache_storage_charged(self, name: str) -> int:
        """The token-seconds of storage charged for an explicit cache: its making's and every change of its time
        to live's (its tokens x the longest life charged)."""
        r = UsageRecordRow
        query = select(func.coalesce(func.sum(r.cache_storage_token_seconds), 0)).where(
            r.provider_response_id == name, r.status.in_(("settled", "settled_late")))
        with self.session() as session:
            return int(session.execute(query).scalar() or 0)

    def stored_responses(self, since_ms: int) -> list[tuple[str, str, str, str, str, int, int]]:
        """(provider response id, customer, provider, served model, provider account, created ms, its input
        and output tokens) of each response the provider stored for a request made since since_ms, the first
        made first (an explicit cache's making, before the changes of its time to live)."""
        r = UsageRecordRow
        query = select(r.provider_response_id, r.customer_id, r.provider, r.served_model, r.provider_account,
                       r.created_ms, r.input_tokens + r.output_tokens).where(r.provider_response_id != "",
                                                                             r.created_ms >= since_ms
                                                                             ).order_by(r.created_ms)
        with self.session() as session:
            return [tuple(row) for row in session.execute(query)]

    def held_by_bucket(self) -> dict[str, int]:
        """Bucket key -> what the records hold in it: a settled record its final holds, an open one what it
        reserved; released, expired and denied ones nothing. Summed by SQL from each record's
        [[bucket key, unit, amount], ...] (read into Python, the holds of every record cost the audit
        seconds a 20,000 records, all of them spent holding the lock decisions need)."""
        held = self._bucket_sums("CASE WHEN status IN ('settled', 'settled_late') THEN final_holds ELSE holds END",
                                 "status NOT IN ('denied', 'released', 'expired')")
        for key, amount in self.pruned_sums("bucket").items():  # deleted records' (retention.py)
            held[key] = held.get(key, 0) + amount
        return held

    def held_in_window(self, since_ms: int, until_ms: int, session: Session | None = None) -> dict[str, int]:
        """Bucket key -> what the records authorized in [since_ms, until_ms) hold in it, as held_by_bucket sums
        them (a window's buckets: rollover.py); read in `session`, when given."""
        return self._bucket_sums("CASE WHEN status IN ('settled', 'settled_late') THEN final_holds ELSE holds END",
                                 "status NOT IN ('denied', 'released', 'expired') AND created_ms >= :since "
                                 "AND created_ms < :until", session=session, since=since_ms, until=until_ms)

    def settled_in_bucket(self, customer_id: str, bucket_key: str, since_ms: int, until_ms: int) -> int:
        """What a customer's requests authorized since `since_ms` and settled by `until_ms` put in one bucket
        (money: their charges less refunds), as held_by_bucket sums it; open ones left out."""
        whose = "customer_id = :customer AND " if customer_id else ""  # "": every customer's (a cap's)
        kept = self._bucket_sums("final_holds", f"status IN ('settled', 'settled_late') AND {whose}"
                                 "created_ms >= :since AND closed_ms <= :until", bucket_key,
                                 customer=customer_id, since=since_ms, until=until_ms).get(bucket_key, 0)
        # deleted records were settled long before, in the bucket's window (retention.py keeps a running one's)
        return kept + self.pruned_sums("bucket", bucket_key).get(bucket_key, 0)

    def pruned_sums(self, kind: str, key: str = "") -> dict[str, int]:
        """What deleted usage records still count for (retention.py): bucket key -> holds (`bucket`), expiring
        grant id -> nanos consumed (`credit`); of one key alone, when named."""
        query = select(PrunedSumRow.key, PrunedSumRow.amount).where(PrunedSumRow.kind == kind)
        if key:
            query = query.where(PrunedSumRow.key == key)
        with self.session() as session:
            return {str(k): int(amount) for k, amount in session.execute(query)}

    def bucket_sums_where(self, where: str, session: Session | None = None, **params: Any) -> dict[str, int]:
        """Bucket key -> what the settled records `where` selects (SQL) put in it, as held_by_bucket sums them."""
        return self._bucket_sums("final_holds", where, session=session, **params)

    def _bucket_sums(self, held: str, where: str, bucket_key: str = "", session: Session | None = None,
                     **params: Any) -> dict[str, int]:
        """Bucket key -> the amounts the `held` column's [[bucket key, unit, amount], ...] of the records `where`
        selects put in it (of one bucket alone, when named)."""
        # a refund gave its amount back to the customer's money limits (not to the operator's caps)
        def refunded(key: str, unit: str) -> str:
            return f"refunded_nanos > 0 AND {unit} = 'money' AND {key} NOT LIKE '{redis_keys.CAPS_PREFIX}%'"

        pg_key, pg_unit, pg_amount = "h.value ->> 0", "h.value ->> 1", "CAST(h.value ->> 2 AS numeric)"
        lite_key, lite_unit = "json_extract(h.value, '$[0]')", "json_extract(h.value, '$[1]')"
        lite_amount = "CAST(json_extract(h.value, '$[2]') AS INTEGER)"
        pg_where, lite_where = f"WHERE {where}", f"WHERE {where}"
        if bucket_key:
            pg_where, lite_where = f"{pg_where} AND {pg_key} = :bucket", f"{lite_where} AND {lite_key} = :bucket"
            params["bucket"] = bucket_key
        return self._summed(
            postgresql=f"SELECT {pg_key}, SUM(CASE WHEN {refunded(pg_key, pg_unit)} THEN "
                       f"GREATEST({pg_amount} - refunded_nanos, 0) ELSE {pg_amount} END) FROM usage_records, "
                       f"json_array_elements(CASE WHEN json_typeof({held}) = 'array' THEN {held} END) AS h "
                       f"{pg_where} GROUP BY 1",
            sqlite=f"SELECT {lite_key}, SUM(CASE WHEN {refunded(lite_key, lite_unit)} THEN "
                   f"MAX({lite_amount} - refunded_nanos, 0) ELSE {lite_amount} END) "
                   f"FROM usage_records, json_each(CASE WHEN json_type({held}) = 'array' THEN {held} END) AS h "
                   f"{lite_where} GROUP BY 1", session=session, **params)

    def _summed(self, postgresql: str, sqlite: str, session: Session | None = None, **params: Any) -> dict[str, int]:
        """The rows (key, integer total) of the query in this database's dialect, as a dict (read in `session`,
        when given)."""
        query = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        if session is not None:
            return {str(key): int(total) for key, total in session.execute(text(query), params) if key is not None}
        with self.session() as own:
            return {str(key): int(total) for key, total in own.execute(text(query), params) if key is not None}

    def save_limit_reset(self, row: LimitResetRow, seeded: OwnerLimitsRow | ApiKeyRow | None = None) -> None:
        """A reset, and the owner's limits (or the key) whose seed it forgave (part of), in one transaction."""
        with self.session() as session, session.begin():
            session.add(row)
            if isinstance(seeded, ApiKeyRow):
                session.execute(update(ApiKeyRow).where(ApiKeyRow.id == seeded.id).values(seeds=seeded.seeds))
            elif seeded is not None:
                session.execute(update(OwnerLimitsRow).where(
                    OwnerLimitsRow.customer_id == seeded.customer_id, OwnerLimitsRow.scope == seeded.scope,
                    OwnerLimitsRow.owner_id == seeded.owner_id).values(seeds=seeded.seeds))

    def limit_resets(self, customer_id: str = "") -> list[LimitResetRow]:
        """The resets of a customer's limits (every customer's: ""), oldest first."""
        r = LimitResetRow
        with self.session() as session:
            query = select(r).order_by(r.created_ms, r.id)
            return list(session.scalars(query.where(r.customer_id == customer_id) if customer_id else query))

    def forgiven_by_resets(self, returned: list[tuple[str, int]], closed_ms: int
                           ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        """A refund's (bucket key, nanos) split in two: what goes back to its buckets, and (reset id, nanos) of
        what resets made once the request had settled forgave already (each taking in at most what it took)."""
        r = LimitResetRow
        back: list[tuple[str, int]] = []
        forgiven: list[tuple[str, int]] = []
        with self.session() as session:
            for key, nanos in returned:
                for reset_id, amount in session.execute(
                        select(r.id, r.amount).where(r.bucket_key == key, r.created_ms >= closed_ms, r.amount > 0)
                        .order_by(r.created_ms, r.id)):
                    share = min(nanos, int(amount))
                    forgiven.append((reset_id, share))
                    nanos -= share
                    if not nanos:
                        break
                if nanos:
                    back.append((key, nanos))
        return back, forgiven

    def take_into_resets(self, forgiven: list[tuple[str, int]]) -> None:
        """Resets whose forgiven amounts a refund gave back to the customer: each now forgave that much less."""
        if not forgiven:
            return
        with self.session() as session, session.begin():
            for reset_id, nanos in forgiven:
                session.execute(update(LimitResetRow).where(LimitResetRow.id == reset_id)
                                .values(amount=LimitResetRow.amount - nanos))

    def reset_by_bucket(self, customer_id: str = "") -> dict[str, int]:
        """Bucket key -> what resets took out of it (a customer's buckets alone, when named)."""
        r = LimitResetRow
        query = select(r.bucket_key, func.sum(r.amount)).group_by(r.bucket_key)
        with self.session() as session:
            return {key: int(total) for key, total in session.execute(
                query.where(r.customer_id == customer_id) if customer_id else query)}

    def open_expiring_grants(self) -> list[tuple[str, str, int, int]]:
        """(grant id, wallet id, amount, expires ms) of expiring grants not expired yet."""
        with self.session() as session:
            expired = {e.removeprefix("expiry:") for e in session.scalars(
                select(LedgerEntryRow.entry_id).where(LedgerEntryRow.kind == "expiry"))}
            rows = session.execute(select(LedgerEntryRow.entry_id, LedgerEntryRow.wallet_id,
                                          LedgerEntryRow.amount_nanos, LedgerEntryRow.expires_ms)
                                   .where(LedgerEntryRow.kind == "grant", LedgerEntryRow.expires_ms > 0))
            return [(e.removeprefix("grant:"), c, int(a), int(x)) for e, c, a, x in rows
                    if e.removeprefix("grant:") not in expired]

    def credit_consumed(self) -> dict[str, int]:
        """Expiring grant id -> nanos of it that settled charges consumed: summed by SQL from each settled
        record's {grant id: nanos} (read into Python, every settled record's cost the audit seconds)."""
        consumed = self.credit_sums_where("status IN ('settled', 'settled_late')")
        for grant_id, amount in self.pruned_sums("credit").items():  # deleted records' (retention.py)
            consumed[grant_id] = consumed.get(grant_id, 0) + amount
        return consumed

    def credit_sums_where(self, where: str, session: Session | None = None, **params: Any) -> dict[str, int]:
        """Expiring grant id -> nanos of it the records `where` selects (SQL) consumed."""
        where = f"WHERE {where} GROUP BY 1"
        return self._summed(
            postgresql="SELECT c.key, SUM(CAST(c.value AS numeric)) FROM usage_records, json_each_text(CASE WHEN "
                       f"json_typeof(credit_source) = 'object' THEN credit_source END) AS c {where}",
            sqlite="SELECT c.key, SUM(CAST(c.value AS INTEGER)) FROM usage_records, json_each(CASE WHEN "
                   f"json_type(credit_source) = 'object' THEN credit_source END) AS c {where}", session=session,
            **params)

    def grant_ids(self) -> list[tuple[str, str]]:
        with self.session() as session:
            rows = session.execute(
                select(LedgerEntryRow.entry_id, LedgerEntryRow.wallet_id).where(LedgerEntryRow.kind == "grant")
            )
            return [(entry_id.removeprefix("grant:"), customer) for entry_id, customer in rows]

    def events(self, kind: str) -> list[EventRow]:
        with self.session() as session:
            return list(session.scalars(select(EventRow).where(EventRow.kind == kind).order_by(EventRow.created_ms)))


def _narrowed(query: Any, equal: Iterable[tuple[Any, Any]], created: Any, since_ms: int, until_ms: int) -> Any:
    """A listing's query narrowed to rows whose columns equal the values given (an empty value: any) and made
    in [since_ms, until_ms) (0: unbounded)."""
    for column, value in equal:
        if value:
            query = query.where(column == value)
    if since_ms:
        query = query.where(created >= since_ms)
    if until_ms:
        query = query.where(created < until_ms)
    return query
