"""The durable store: SQLAlchemy models of keys, policies, usage records and the ledger.

PostgreSQL in production, SQLite as the embedded default; the schema is made by
the Alembic migrations in policyd/migrations (never by create_all). Money columns
are BIGINT nanos. Rows of the ledger are appended, never edited.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Index, Integer, String, Text, create_engine, event, false
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID = String(128)
NAME = String(256)


class Base(DeclarativeBase):
    pass


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    label: Mapped[str] = mapped_column(NAME, default="")
    prefix: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    previous_secret_hash: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    previous_expires_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    customer_id: Mapped[str] = mapped_column(ID, index=True)
    workspace_id: Mapped[str] = mapped_column(ID, default="")
    project_id: Mapped[str] = mapped_column(ID, default="")
    team_id: Mapped[str] = mapped_column(ID, default="")
    environment: Mapped[str] = mapped_column(String(32))
    plan: Mapped[str] = mapped_column(ID)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    # the key's own limits ({window, unit, limit, timezone}; money in nanos): key_limits.py
    limits: Mapped[list[dict] | None] = mapped_column(JSON, default=list, nullable=True)
    # its owners' limits (each with its scope: customer, workspace, project, team), copied from owner_limits
    owner_limits: Mapped[list[dict] | None] = mapped_column(JSON, default=list, nullable=True)
    # "1" when some end users of its customer have limits of their own (owner_limits rows of scope end_user), ""
    # for none (earlier, a fingerprint of them all: as "1"): part of its terms, so every replica starts or stops
    # reading an end user's a request names (Engine._with_end_user_limits); a change of one end user's binds
    # through its stamp in Redis (redis_keys.end_user_terms), the key unchanged
    end_user_limits: Mapped[str | None] = mapped_column(String(16), default="", nullable=True)
    # bucket key -> what the key had used in that bucket's window before its own limit was made (no request named
    # the bucket then), as an owner's seeds (OwnerLimitsRow.seeds); None: none
    seeds: Mapped[dict[str, int] | None] = mapped_column(JSON(none_as_null=True), default=None, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_ms: Mapped[int] = mapped_column(BigInteger)
    rotated_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    status_changed_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # the key's end, 0 = never


class PolicyVersionRow(Base):
    __tablename__ = "policy_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    digest: Mapped[str] = mapped_column(String(64))
    canonical: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(Text)
    source_name: Mapped[str] = mapped_column(NAME, default="")
    applied_ms: Mapped[int] = mapped_column(BigInteger)


class UsageRecordRow(Base):
    """One row per request_id: the decision, and once settled, the actual usage and money."""

    __tablename__ = "usage_records"

    request_id: Mapped[str] = mapped_column(ID, primary_key=True)
    created_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    trace_id: Mapped[str] = mapped_column(ID, default="")
    traceparent: Mapped[str] = mapped_column(NAME, default="")
    customer_id: Mapped[str] = mapped_column(ID, default="")  # indexed first in ix_usage_customer_created
    workspace_id: Mapped[str] = mapped_column(ID, default="")
    project_id: Mapped[str] = mapped_column(ID, default="")
    team_id: Mapped[str] = mapped_column(ID, default="")
    api_key_id: Mapped[str] = mapped_column(ID, default="", index=True)
    wallet_id: Mapped[str] = mapped_column(String(258), default="", server_default="")  # customer or customer/workspace
    plan: Mapped[str] = mapped_column(ID, default="")
    environment: Mapped[str] = mapped_column(String(32), default="")
    claimed: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # owner fields the caller claimed
    end_user_id: Mapped[str] = mapped_column(NAME, default="")
    agent_id: Mapped[str] = mapped_column(NAME, default="")
    thread_id: Mapped[str] = mapped_column(NAME, default="")
    feature: Mapped[str] = mapped_column(NAME, default="")
    route: Mapped[str] = mapped_column(NAME, default="")
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    endpoint: Mapped[str] = mapped_column(String(32), default="")
    requested_model: Mapped[str] = mapped_column(NAME, default="")
    primary_model: Mapped[str] = mapped_column(NAME, default="")
    served_model: Mapped[str] = mapped_column(NAME, default="")
    provider: Mapped[str] = mapped_column(ID, default="")
    provider_account: Mapped[str] = mapped_column(NAME, default="", server_default="")  # the credential that served it
    upstream: Mapped[str] = mapped_column(NAME, default="")
    fallback_reason: Mapped[str] = mapped_column(NAME, default="")
    decision: Mapped[str] = mapped_column(String(16))  # allow | deny | downgrade
    reason: Mapped[str] = mapped_column(ID, default="")
    message: Mapped[str] = mapped_column(Text, default="")
    shadow_denials: Mapped[list[str]] = mapped_column(JSON, default=list)
    quota_bucket: Mapped[str] = mapped_column(NAME, default="")
    policy_version: Mapped[int] = mapped_column(Integer, default=0)
    price_table_version: Mapped[str] = mapped_column(ID, default="")
    billing_mode: Mapped[str] = mapped_column(String(16), default="")
    reservation_mode: Mapped[str] = mapped_column(String(16), default="")
    currency: Mapped[str] = mapped_column(String(3), default="")
    status: Mapped[str] = mapped_column(String(16), index=True)  # denied|reserved|settled|settled_late|released|expired
    reserved_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    max_output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)  # the cap of each choice
    choices: Mapped[int] = mapped_column(BigInteger, default=1, server_default="1")  # n: output reserved = cap x n
    holds: Mapped[list[Any]] = mapped_column(JSON, default=list)  # [[bucket key, unit, held], ...]
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_write_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    web_searches: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # the provider's, priced each
    file_searches: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # ... of files, priced each
    audio_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # of input_tokens
    audio_output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # of output_tokens
    image_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # of input_tokens
    image_output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # of output_tokens (0022)
    # hosted containers (migration 0023): those reserved, then those charged; the memory limit they were priced at
    containers: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    container_memory: Mapped[str] = mapped_column(String(16), default="", server_default="")
    maps_groundings: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # migration 0025
    search_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # a rerank's (migration 0029)
    # the search context size its fee was charged at (per_search_context), and the output tokens of reasoning
    # billed at its own price (Perplexity's; migration 0030)
    search_context_size: Mapped[str] = mapped_column(String(16), default="", server_default="")
    reasoning_output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # an explicit cache's tokens x the seconds it is kept, charged at cache_storage (migration 0031)
    cache_storage_token_seconds: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # the Responses API's image_generation tool (migration 0021): the image model that priced its images, its usage
    image_model: Mapped[str] = mapped_column(NAME, default="", server_default="")
    image_generation_calls: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    image_generation_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    image_generation_cached_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    image_generation_image_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    image_generation_output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # ... and what they cost (part of cost_nanos): reconciled under the image model, as providers bill it (0024)
    image_generation_cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # the parts of its cost other models than the served one ran (an Anthropic reply's usage.iterations: an
    # advisor's calls, a server-side fallback's declined attempts): model -> [cost nanos, tokens], reconciled
    # under each, as the provider bills them (migration 0041)
    other_models: Mapped[dict[str, list[int]]] = mapped_column(JSON, default=dict, server_default="{}")
    other_models_cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # their sum
    cache_write_1h_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # of cache writes
    service_tier: Mapped[str] = mapped_column(String(32), default="", server_default="")  # the provider's, priced apart
    # the id of the response the provider stored for it (the Responses API's): only its customer may reach it
    provider_response_id: Mapped[str] = mapped_column(String(256), default="", server_default="", index=True)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    images: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[int] = mapped_column(BigInteger, default=0)
    request_count: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    charge_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    balance_before_nanos: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    balance_after_nanos: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    final_holds: Mapped[list[Any]] = mapped_column(JSON, default=list)  # [[bucket key, unit, actual], ...]
    credit_source: Mapped[dict[str, int]] = mapped_column(JSON, default=dict, server_default="{}")  # expiring grant -> nanos paid
    # what of the charge the operator gave back (RefundUsage: to the wallet, and to the money limits it counted in)
    refunded_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    refunded_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # what its reservation keeps beside the record (estimates, call token, what its deadline does), which a
    # rebuild of the counters restores (migration 0027): all of them while it is open or expired (a late settle
    # needs them), those a closed reservation keeps (counters.CLOSED_FIELDS) once settled or released
    reservation_facts: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, default=None)
    # the fingerprint of the numbers it was settled with: a retried Settle must bring the same (migration 0028)
    settle_fingerprint: Mapped[str] = mapped_column(String(64), default="", server_default="")
    decision_latency_us: Mapped[int] = mapped_column(BigInteger, default=0)
    upstream_latency_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    upstream_status: Mapped[int] = mapped_column(Integer, default=0)
    error_class: Mapped[str] = mapped_column(NAME, default="")
    stream_interrupted: Mapped[bool] = mapped_column(Boolean, default=False)
    client_address: Mapped[str] = mapped_column(NAME, default="")
    user_agent: Mapped[str] = mapped_column(Text, default="")
    closed_ms: Mapped[int] = mapped_column(BigInteger, default=0)
    close_reason: Mapped[str] = mapped_column(NAME, default="")
    # when this row was last written to SQL (the rollups rebuild the hours of rows written since their last pass)
    updated_ms: Mapped[int] = mapped_column(BigInteger, default=_now_ms, onupdate=_now_ms, server_default="0",
                                            index=True)


Index("ix_usage_customer_created", UsageRecordRow.customer_id, UsageRecordRow.created_ms)
# an end user's records in a window (what its limit set mid-window starts from: store.used_before), not its
# customer's all
Index("ix_usage_customer_end_user_created", UsageRecordRow.customer_id, UsageRecordRow.end_user_id,
      UsageRecordRow.created_ms)


class UsageRollupRow(Base):
    """Usage records summed per hour and per day, one row per (dimension, value): what the dashboard
    reads instead of scanning a month of records. Rebuilt, hour by hour, from the records written
    since the last pass (policyd/rollups.py); the same figures as policyd/reports.py computes."""

    __tablename__ = "usage_rollups"

    period: Mapped[str] = mapped_column(String(8), primary_key=True)  # hour | day
    start_ms: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    dimension: Mapped[str] = mapped_column(String(16), primary_key=True)  # customer | key | feature | model | ...
    value: Mapped[str] = mapped_column(ID, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    allowed: Mapped[int] = mapped_column(BigInteger, default=0)
    denied: Mapped[int] = mapped_column(BigInteger, default=0)
    downgraded: Mapped[int] = mapped_column(BigInteger, default=0)
    failed: Mapped[int] = mapped_column(BigInteger, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cached_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    charge_nanos: Mapped[int] = mapped_column(BigInteger, default=0)
    retries: Mapped[int] = mapped_column(BigInteger, default=0)
    fallbacks: Mapped[int] = mapped_column(BigInteger, default=0)
    # reports.USAGE_FIGURES (migration 0019)
    cache_write_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    cache_write_1h_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    audio_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    audio_output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    images: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    seconds: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    web_searches: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    file_searches: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    image_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # migration 0020
    image_generation_calls: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # migration 0021
    image_generation_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    image_generation_cached_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    image_generation_image_input_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    image_generation_output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    image_output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # migration 0022
    containers: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # migration 0023
    maps_groundings: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # migration 0025
    search_units: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # a rerank's (migration 0029)
    reasoning_output_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # migration 0030
    cache_storage_token_seconds: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # 0031
    refunded_nanos: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # migration 0026


Index("ix_rollups_dimension_period_start", UsageRollupRow.dimension, UsageRollupRow.period, UsageRollupRow.start_ms)


class AdminCredentialRow(Base):
    """An admin credential scoped to a customer and its sub-customers; only the secret's SHA-256 is kept."""

    __tablename__ = "admin_credentials"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(32))
    customer_id: Mapped[str] = mapped_column(ID, index=True)
    label: Mapped[str] = mapped_column(NAME, default="")
    created_ms: Mapped[int] = mapped_column(BigInteger)
    revoked_ms: Mapped[int] = mapped_column(BigInteger, default=0)


class CustomerParentRow(Base):
    """customer_id is a sub-customer of parent_id (a reseller's customer)."""

    __tablename__ = "customer_parents"

    customer_id: Mapped[str] = mapped_column(ID, primary_key=True)
    parent_id: Mapped[str] = mapped_column(ID, index=True)
    created_ms: Mapped[int] = mapped_column(BigInteger)


class OwnerLimitsRow(Base):
    """The limits an operator gives an owner: a customer (owner_id empty), or one of its workspaces, projects or
    teams; each of the owner's keys carries a copy (ApiKeyRow.owner_limits), kept in step by Admin. Or one of its
    end users (scope end_user): read by the decision of a request naming it, checked by its stamp in Redis
    (redis_keys.end_user_terms); an end user may be paused, its limits kept."""

    __tablename__ = "owner_limits"

    customer_id: Mapped[str] = mapped_column(ID, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), primary_key=True)  # customer, workspace, project, team, end_user
    owner_id: Mapped[str] = mapped_column(ID, primary_key=True, default="")
    limits: Mapped[list[dict]] = mapped_column(JSON, default=list)  # as key_limits.checked stores them
    updated_ms: Mapped[int] = mapped_column(BigInteger)
    # bucket key -> what the owner had used in that bucket's window before the limit was made (its requests then
    # named no such bucket): written into the bucket, and added to what the records imply by the audit and a rebuild
    seeds: Mapped[dict[str, int] | None] = mapped_column(JSON, default=dict, nullable=True)
    # an end user's: its requests refused (end_user_paused) until resumed (Admin.set_end_user_paused)
    paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class LimitResetRow(Base):
    """A limit's current window forgiven by an operator (Admin.reset_limits): what its bucket had counted of settled
    requests, taken out of it; the audit and a rebuild take it out of what the records imply too."""

    __tablename__ = "limit_resets"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_id: Mapped[str] = mapped_column(ID, index=True)
    bucket_key: Mapped[str] = mapped_column(String(512), index=True)
    label: Mapped[str] = mapped_column(NAME, default="")  # the limit's name
    unit: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)  # units of the bucket taken out (money: nanos)
    reason: Mapped[str] = mapped_column(String(512), default="")
    created_ms: Mapped[int] = mapped_column(BigInteger)


# the rollup_cursor row whose written_ms is the retention's horizon: usage records created before it were deleted
# (policyd/retention.py), and the rollups' hours before it are never summed again
PRUNED_CURSOR = "retention"


class RollupCursorRow(Base):
    """How far the rollups have read: records written (updated_ms) before `written_ms` are summed."""

    __tablename__ = "rollup_cursor"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    written_ms: Mapped[int] = mapped_column(BigInteger, default=0)


class PrunedSumRow(Base):
    """What deleted usage records still count for (policyd/retention.py), added to what the kept ones do: their
    holds in a bucket whose window is still running (`bucket`: a lifetime budget's), the credit they consumed of an
    expiring grant (`credit`)."""

    __tablename__ = "pruned_sums"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # bucket | credit
    key: Mapped[str] = mapped_column(String(512), primary_key=True)  # the bucket key | the grant id
    amount: Mapped[int] = mapped_column(BigInteger)  # the bucket's unit (money: nanos) | nanos


class BucketSeedRow(Base):
    """What a limit's bucket counted from when the limit began to bind mid-window: the use before it of the
    requests it binds (policyd/bucket_seeds.py: a policy's new plan limit or cap, a key moved to a plan that has
    one), added to what the records hold in it for the audit and a rebuild (their holds never name it)."""

    __tablename__ = "bucket_seeds"

    bucket_key: Mapped[str] = mapped_column(String(512), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)  # the bucket's unit (money and cost: nanos)
    made_ms: Mapped[int] = mapped_column(BigInteger)


class LedgerEntryRow(Base):
    """An append-only wallet movement: + for grants, - for charges."""

    __tablename__ = "ledger_entries"

    entry_id: Mapped[str] = mapped_column(String(160), primary_key=True)  # grant:<id> | charge:<rid> | expiry:<id>
    customer_id: Mapped[str] = mapped_column(ID, index=True)
    wallet_id: Mapped[str] = mapped_column(String(258), default="", server_default="", index=True)
    kind: Mapped[str] = mapped_column(String(16))  # grant | charge | expiry
    amount_nanos: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3))
    request_id: Mapped[str] = mapped_column(ID, default="")
    source: Mapped[str] = mapped_column(String(32), default="")  # purchase | promo | refund | adjustment | usage
    note: Mapped[str] = mapped_column(Text, default="")
    balance_after_nanos: Mapped[int] = mapped_column(BigInteger)
    created_ms: Mapped[int] = mapped_column(BigInteger, index=True)
    expires_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # grants: 0 = never
    recorded_ms: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # when it reached SQL


class PeriodCloseRow(Base):
    """A closed invoice period: its export as it was, and the digest of it."""

    __tablename__ = "period_closes"

    customer_id: Mapped[str] = mapped_column(ID, primary_key=True)
    period: Mapped[str] = mapped_column(String(7), primary_key=True)  # YYYY-MM
    lines_by: Mapped[str] = mapped_column(String(16), primary_key=True)
    closed_ms: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    export: Mapped[str] = mapped_column(Text)


class AlertDeliveryRow(Base):
    """One alert to one webhook: delivered at least once, retried with backoff until it is."""

    __tablename__ = "alert_deliveries"

    event_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    url: Mapped[str] = mapped_column(String(512), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_ms: Mapped[int] = mapped_column(BigInteger, default=0, index=True)
    delivered_ms: Mapped[int] = mapped_column(BigInteger, default=0, index=True)
    last_error: Mapped[str] = mapped_column(Text, default="")


class EventRow(Base):
    """Events that are not a usage record: alerts (threshold crossings) and rejected calls."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # partition/stream entry id
    kind: Mapped[str] = mapped_column(String(32), index=True)  # alert | rejected
    request_id: Mapped[str] = mapped_column(ID, default="")
    customer_id: Mapped[str] = mapped_column(ID, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_ms: Mapped[int] = mapped_column(BigInteger, index=True)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # executemany through psycopg's own pipeline, one short statement parsed once, instead of one INSERT
    # with a VALUES row per record (which psycopg re-parses for every batch size: most of the writer's time)
    return create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True, use_insertmanyvalues=False)


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema to the newest migration (Alembic), on SQLite and PostgreSQL alike (or to
    `revision`: tests of a migration start from the one before it)."""
    from importlib import resources

    from alembic import command
    from alembic.config import Config

    location = resources.files("policyd").joinpath("migrations")
    config = Config()
    config.set_main_option("script_location", str(location))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, revision)
