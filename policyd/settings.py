"""Configuration: environment variables (POLICYD_*) and command-line flags.

Without any, policyd runs on the embedded default: a SQLite file and an
in-process Redis-compatible store that runs the same Lua scripts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# the fewest days records may be kept (policyd/retention.py): a month's limits count from them until it ends, and
# its invoice is closed from them
RETENTION_DAYS_MIN = 35


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POLICYD_", extra="forbid")

    listen: str = Field("127.0.0.1:50051", description="gRPC address to serve on (host:port)")
    redis_url: str = Field("", description="Redis URL (redis://host:6379/0, rediss:// for TLS, redis+cluster://host:port "
                                           "for a Redis Cluster); empty = the embedded in-process store")
    database_url: str = Field(
        "sqlite:///policyd.db",
        description="SQLAlchemy URL of the durable store (postgresql+psycopg://... in production)",
    )
    workers: int = Field(1, ge=1, le=64, description="`policyd serve` processes sharing `listen` (SO_REUSEPORT, Linux; "
                                                     "a shared Redis needed): about one a core. Worker 0 alone applies "
                                                     "policy_file and runs the writer and the dashboard; worker i serves "
                                                     "metrics on the metrics port + i")
    listen_shared: bool = Field(False, description="let other processes listen on `listen` and `admin_listen` too "
                                                   "(SO_REUSEPORT: each connection goes to one of them), as "
                                                   "POLICYD_WORKERS' workers do; false: a second process started on "
                                                   "the address exits, saying so, instead of sharing it unseen")
    admin_listen: str = Field("", description="serve the AdminService on this address only (host:port), apart from "
                                               "the decision services; empty = on `listen` with them")
    admin_tls_client_ca_file: str = Field("", description="PEM CA the AdminService listener requires client "
                                                           "certificates from (mTLS for admins); empty = tls_client_ca_file")
    admin_token: str = Field("", description="bearer token the AdminService requires; empty = no check (loopback use)")
    tls_cert_file: str = Field("", description="PEM certificate: serve gRPC over TLS")
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file")
    tls_client_ca_file: str = Field("", description="PEM CA: require client certificates signed by it (mTLS)")
    policy_file: str = Field("", description="policy YAML to apply at start")
    providers_file: str = Field("", description="provider accounts YAML (credentials put on upstream requests)")
    partitions: int = Field(16, ge=1, le=1024, description="event stream partitions (Redis Cluster hash slots)")
    reservation_ttl_seconds: int = Field(660, ge=1, description="unsettled reservations expire after this (longer than "
                                         "the gateway's 600 s route timeout: a reply that takes all of it is settled "
                                         "before its hold lapses); one the gateway sent on to the provider is held "
                                         "as long again, then charged as held, not released")
    closed_request_retention_seconds: int = Field(86400, ge=600, description="how long Redis keeps a closed request "
                                                  "(settled, released) to answer retries of its Settle or Release and "
                                                  "of its id (a client's idempotency key): 24 h, as long as "
                                                  "idempotency keys commonly last; about 1 KB of Redis a request "
                                                  "meanwhile. A request naming the id after it is a new request, "
                                                  "recorded apart")
    shutdown_delay_seconds: int = Field(3, ge=0, le=600, description="on SIGTERM, how long `policyd serve` goes on "
                                        "taking new calls while its health says NOT_SERVING, before it takes no more: "
                                        "the gateway's Envoy, checking each replica every second, sends new requests "
                                        "to the others first (a call refused meanwhile would fail, or go unsettled). "
                                        "0 with no load balancer checking it; a second SIGTERM ends it at once")
    shutdown_grace_seconds: int = Field(660, ge=0, description="on SIGTERM, how long `policyd serve` waits for the "
                                        "gateway's streams still open to end (it stops as soon as they have, other "
                                        "calls given 5 s more); replies still passing then go on to their clients "
                                        "unread and are charged as held. A second SIGTERM stops at once")
    failure_mode: Literal["closed", "open"] = Field(
        "closed", description="when Redis cannot be reached: deny (closed) or allow unreserved (open)"
    )
    writer_batch: int = Field(500, ge=1, le=10_000, description="events the writer moves to SQL per batch")
    writer_enabled: bool = Field(True, description="run the stream-to-SQL writer, and the loops that read SQL "
                                 "(anomalies, rollups, webhooks), in this process")
    sweeper_interval_ms: int = Field(500, ge=10, description="how often reservations past their deadline are closed")
    background_response_seconds: int = Field(10800, ge=60, description="how long a background response (the "
                                             "Responses API's background: true) is waited for: its hold stays while "
                                             "policyd asks the provider for it, then it is charged as held")
    background_poll_seconds: float = Field(5.0, gt=0, le=300, description="how often policyd asks the provider "
                                           "for a background response it waits for (with the account's base_url)")
    policy_refresh_ms: int = Field(500, ge=10, description="how often a replica checks for a newer policy")
    webhook_urls: str = Field("", description="comma-separated URLs that receive alerts (JSON, HMAC-signed)")
    webhook_secret: str = Field("", description="the HMAC-SHA256 key alerts are signed with (x-policyd-signature)")
    webhook_interval_ms: int = Field(1000, ge=10, description="how often pending alerts are delivered")
    anomaly_window_seconds: int = Field(600, ge=60, description="anomaly detection window")
    anomaly_spend_factor: int = Field(5, ge=2, description="a key spending this many times its usual rate is an anomaly")
    anomaly_spend_min: str = Field("0.10", description="...and at least this much in the window (currency units)")
    anomaly_thread_requests: int = Field(50, ge=2, description="a thread with this many requests in a window loops")
    metrics_listen: str = Field("", description="Prometheus /metrics address (host:port, e.g. 127.0.0.1:9464); empty = off")
    rollup_interval_ms: int = Field(30_000, ge=100, description="how often usage rollups (the dashboard's sums) are "
                                                              "brought up to date in the background")
    record_retention_days: int = Field(0, description="delete usage records, alerts, rejected calls and alert "
                                                       "deliveries older than this many days, an hour's at a time, "
                                                       "without changing a budget, rollup or invoice "
                                                       "(policyd/retention.py); 0 = keep them all; else at least 35 "
                                                       "(a month's window and its invoice's close)")
    dashboard_listen: str = Field("", description="web dashboard address (host:port, e.g. 127.0.0.1:8090); empty = off. "
                                                  "Login with the admin token (admin rights) or the viewer token")
    dashboard_viewer_token: str = Field("", description="token that opens the dashboard read-only (with admin_token set)")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR (JSON lines on stderr; secrets never logged)")

    @field_validator("record_retention_days")
    @classmethod
    def _retention_covers_a_month(cls, days: int) -> int:
        if days < 0 or 0 < days < RETENTION_DAYS_MIN:
            raise ValueError(f"keep records at least {RETENTION_DAYS_MIN} days (0: all of them): a month's limits "
                             f"and its invoice are counted from them")
        return days


def reference() -> str:
    """The configuration reference as a Markdown table, generated from this model (README, `policyd config-reference`)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "empty" if default == "" else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        bounds = {m.__class__.__name__: getattr(m, m.__class__.__name__.lower()) for m in field.metadata
                  if m.__class__.__name__ in ("Ge", "Le")}
        limits = (f"{bounds['Ge']} to {bounds['Le']}" if len(bounds) == 2
                  else f"at least {bounds['Ge']}" if "Ge" in bounds else "")
        meaning = (field.description or "").replace("|", "\\|") + (f" ({limits})" if limits else "")
        rows.append(f"| `POLICYD_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"
