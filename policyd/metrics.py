"""Prometheus metrics. Labels are bounded: decisions, machine reasons, outcomes; never keys or customers.

Served on POLICYD_METRICS_LISTEN (host:port, e.g. 127.0.0.1:9464; empty = off, the default) at /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

decisions = Counter("policyd_decisions_total", "Authorize decisions", ["decision", "reason"], registry=REGISTRY)
authorize_seconds = Histogram("policyd_authorize_seconds", "Authorize latency", buckets=LATENCY_BUCKETS,
                              registry=REGISTRY)
settlements = Counter("policyd_settlements_total", "Settle outcomes", ["outcome"], registry=REGISTRY)
settle_seconds = Histogram("policyd_settle_seconds", "Settle latency", buckets=LATENCY_BUCKETS, registry=REGISTRY)
charged_nanos = Counter("policyd_charged_nanos_total", "Charges settled, in nanos of the currency", registry=REGISTRY)
releases = Counter("policyd_releases_total", "Reservations voided", ["reason"], registry=REGISTRY)
rejections = Counter("policyd_rejections_total", "Settle/Release calls refused", ["reason"], registry=REGISTRY)
events_written = Counter("policyd_writer_events_total", "Events the writer moved to SQL", registry=REGISTRY)
rows_pruned = Counter("policyd_rows_pruned_total", "Rows deleted by record retention (records, events, deliveries, hourly rollups)",
                     ["table"], registry=REGISTRY)
writer_errors = Counter("policyd_writer_errors_total", "Writer batches that failed (retried)", registry=REGISTRY)
counter_errors = Counter("policyd_counter_errors_total", "Calls that could not reach Redis", registry=REGISTRY)
heap_frozen_objects = Gauge("policyd_heap_frozen_objects",
                            "Objects made at startup, kept out of the garbage collector's passes", registry=REGISTRY)
event_loop_lag_seconds = Histogram("policyd_event_loop_lag_seconds",
                                   "How much later than due the event loop ran a timer (checked every 0.1 s): "
                                   "every decision waits as long", buckets=LATENCY_BUCKETS, registry=REGISTRY)
counter_rebuilds = Counter("policyd_counter_rebuilds_total",
                           "Counters rewritten from SQL by this process: at start (an empty store, a new Redis) or "
                           "because Redis lost them while it ran (lost), and the rebuilds that failed",
                           ["trigger", "outcome"], registry=REGISTRY)
background_polls = Counter("policyd_background_polls_total",
                           "Background responses asked for at their provider, by what was found: running, ended "
                           "(charged or released), gone (charged as held), unreachable (no base_url: held to its "
                           "deadline), failed (asked again)", ["outcome"], registry=REGISTRY)
# read when scraped (serve sets its function: the ext_proc servicer's count), nothing on the request path
gateway_streams_open = Gauge("policyd_gateway_streams_open",
                             "The gateway's ext_proc streams open (a replica told to stop waits for them to end, up "
                             "to its shutdown grace)", registry=REGISTRY)
close_retries = Counter("policyd_close_retries_total",
                        "Settles and releases made again because Redis could not be reached", registry=REGISTRY)

KNOWN_RELEASE_REASONS = {"deadline", "client_disconnected", "provider_error", "no_response"}


def release_reason(reason: str) -> str:
    """Bounded: upstream_<status> and a few known reasons, everything else 'other'."""
    if reason in KNOWN_RELEASE_REASONS or (reason.startswith("upstream_") and reason[9:].isdigit()):
        return reason
    return "other"


def serve(listen: str) -> None:
    if not listen:
        return
    host, _, port = listen.rpartition(":")
    try:
        start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
    except OSError as error:
        raise SystemExit(f"cannot serve /metrics on {listen}: {error.strerror}") from None
