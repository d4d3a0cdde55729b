"""Wiring: every part of a policyd process is built and started here, and nowhere else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2, external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from policyd import metrics, redis_keys, retention, rollover, rollups, runtime
from policyd.dashboard import serve_dashboard
from policyd.admin import Admin
from policyd.alerts import AlertDelivery
from policyd.anomalies import AnomalyDetector
from policyd.background import BackgroundResponses
from policyd.money import parse_amount
from policyd.counters import Counters, connect
from policyd.db import migrate
from policyd.directory import KeyDirectory
from policyd.engine import Engine
from policyd.ext_authz import AuthorizationServicer
from policyd.ext_proc import ExternalProcessorServicer
from policyd.loops import every
from policyd.domain import PolicydError
from policyd.policy import PolicyError, parse_policy
from policyd.providers import ProviderPool
from policyd.policy_book import PolicyBook
from policyd.servicers import AdminServicer, PolicyServicer
from policyd.settings import Settings
from policyd.store import Store
from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc
from policyd.writer import Writer

log = logging.getLogger("policyd")

# The largest gRPC message policyd accepts: Envoy sends a request body whole to ext_authz and to the
# processing ext_proc (and a reply whole in the ext_proc shape), up to the gateway's body limit; gRPC's
# default of 4 MiB would fail bodies between it and that limit. Past the limit the gateway refuses.
GRPC_MESSAGE_BYTES_MAX = 64 * 1024 * 1024
COOLDOWN_SHARE_SECONDS = 1.0  # how often a replica publishes and takes up provider cool-downs


RECOVERY_INTERVAL_SECONDS = 5.0
CALLS_GRACE_SECONDS = 5.0  # at shutdown, for the calls still open that are no gateway stream
TOKEN_CHECK_SECONDS = 30.0  # how often accounts minting access tokens are looked at (each renewed when due)


async def _warn_of_eviction(counters: Counters) -> None:
    """Redis that evicts keys when full may drop a quota's counter, which then starts again from nothing: a
    budget overshot. Said loudly at start."""
    policy = await counters.eviction_policy()
    if policy:
        log.error("Redis evicts keys when full (maxmemory-policy %s): a counter it evicts starts again from "
                  "nothing, and a budget can be overshot; set maxmemory-policy noeviction", policy)


@dataclass
class Service:
    settings: Settings
    store: Store
    counters: Counters
    book: PolicyBook
    directory: KeyDirectory
    writer: Writer
    engine: Engine
    admin: Admin
    pool: ProviderPool
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _recovery: asyncio.Task[None] | None = None
    _next_recovery_seconds: float = 0.0
    _started: bool = False

    @classmethod
    async def build(cls, settings: Settings) -> "Service":
        await asyncio.to_thread(migrate, settings.database_url)
        store = Store(settings.database_url)
        counters = Counters(connect(settings.redis_url), settings.partitions,
                            settings.closed_request_retention_seconds, settings.reservation_ttl_seconds)
        book = PolicyBook(store, counters.client)
        directory = KeyDirectory(store)
        writer = Writer(counters.client, store, settings.partitions, settings.writer_batch)
        engine = Engine(counters, store, book, directory, settings.reservation_ttl_seconds, settings.failure_mode)
        admin = Admin(store, counters, book, directory, writer, settings.reservation_ttl_seconds)
        admin.policy_refresh_ms = settings.policy_refresh_ms
        pool = ProviderPool.load(settings.providers_file)
        admin.pool = pool
        engine.background = BackgroundResponses(engine, pool, settings.background_response_seconds,
                                                settings.background_poll_seconds)
        admin.finish_closings = engine.finish_closings
        return cls(settings, store, counters, book, directory, writer, engine, admin, pool)

    async def start(self) -> None:
        policy_text = _policy_file_text(self.settings.policy_file) if self.settings.policy_file else ""
        await self.writer.ensure_groups()  # the first call to Redis: one that cannot reach it has nothing to stop
        self._started = True
        await self.book.load_latest()
        # counters not known whole (the embedded store at start, a Redis that lost its data, a rebuild that
        # died): rewritten from SQL before the first decision, unless another replica is at it
        await self.admin.recover(starting=True)
        self.counters.on_fenced = self._counters_fenced
        await _warn_of_eviction(self.counters)
        if self.settings.policy_file:
            try:
                result = await self.admin.apply_policy(policy_text, self.settings.policy_file)
            except PolicydError as error:  # valid alone, not here (a plan its keys use is missing, caps on a cluster)
                raise SystemExit(f"cannot apply the policy file {self.settings.policy_file}: {error.message}") from None
            log.info("policy %s: version %d%s", self.settings.policy_file, result.version,
                     " (applied)" if result.changed else " (unchanged)")
        self.tasks.append(asyncio.create_task(self.engine.run_sweeper(self.stop, self.settings.sweeper_interval_ms)))
        if self.pool.follows_any():  # a process that cannot ask (a writer without the accounts) leaves it to others
            self.tasks.append(asyncio.create_task(every(self.settings.background_poll_seconds, self.stop,
                                                        self.engine.background.poll_due,
                                                        "asking providers for background responses")))
        self.tasks.append(asyncio.create_task(runtime.watch_loop_lag(self.stop)))
        self.tasks.append(asyncio.create_task(self.book.run(self.stop, self.settings.policy_refresh_ms)))
        if self.pool.accounts:
            self.tasks.append(asyncio.create_task(every(COOLDOWN_SHARE_SECONDS, self.stop, self.share_cooldowns,
                                                        "sharing provider cool-downs")))
        if self.pool.minting():  # Vertex AI accounts: a token before the first request, the next before it lapses
            await self.pool.mint_due_tokens()
            self.tasks.append(asyncio.create_task(every(TOKEN_CHECK_SECONDS, self.stop, self.pool.mint_due_tokens,
                                                        "minting provider access tokens")))
        if self.settings.writer_enabled:
            self._start_sql_loops()

    def _counters_fenced(self) -> None:
        """A script found its partition's gate closed: a rebuild under way (nothing to do), or the counters
        lost while this replica runs (Redis restarted without its data): rebuilt from SQL here, unless another
        replica is at it; tried again at most every RECOVERY_INTERVAL_SECONDS while they stay lost."""
        now = time.monotonic()
        if self._recovery is not None and not self._recovery.done() or now < self._next_recovery_seconds:
            return
        self._next_recovery_seconds = now + RECOVERY_INTERVAL_SECONDS
        self._recovery = asyncio.create_task(self._recover())

    async def _recover(self) -> None:
        try:
            await self.admin.recover()
        except Exception:
            log.exception("rebuilding lost counters failed; decisions stay refused until a rebuild succeeds")

    async def share_cooldowns(self) -> None:
        """Publish the provider cool-downs this replica began and take up everyone's: a 429 one replica
        saw steers every replica off that account within COOLDOWN_SHARE_SECONDS."""
        client = self.counters.client
        announced = self.pool.take_announced()
        if announced:
            try:
                await client.hset(redis_keys.COOLDOWNS, mapping=announced)
            except Exception:
                self.pool.announce(announced)  # shared on a later pass
                raise
        # one field an account, ended ones left in place (a field a replica is rewriting is never deleted)
        shared = {(k.decode() if isinstance(k, bytes) else k): int(v)
                  for k, v in (await client.hgetall(redis_keys.COOLDOWNS)).items()}
        self.pool.adopt(shared)

    def _start_sql_loops(self) -> None:
        """The writer and the loops that read SQL (anomalies, rollups, webhooks, retention) run where the writer runs:
        in `policyd writer`, or in a serve process that writes its own records (POLICYD_WRITER_ENABLED)."""
        self.tasks.append(asyncio.create_task(self.writer.run(self.stop)))
        detector = AnomalyDetector(
            self.store, self.settings.anomaly_window_seconds * 1000, self.settings.anomaly_spend_factor,
            parse_amount(self.settings.anomaly_spend_min), self.settings.anomaly_thread_requests)
        self.tasks.append(asyncio.create_task(detector.run(self.stop)))
        self.tasks.append(asyncio.create_task(rollups.run(self.store, self.stop, self.settings.rollup_interval_ms)))
        self.tasks.append(asyncio.create_task(every(rollover.PASS_SECONDS, self.stop, lambda: rollover.carry(
            self.store, self.counters, self.book.current), "rollover")))
        if self.settings.record_retention_days:
            self.tasks.append(asyncio.create_task(retention.run(
                self.store, self.settings.record_retention_days, self.stop, self.counters.existing, self.engine.clock)))
        urls = [u.strip() for u in self.settings.webhook_urls.split(",") if u.strip()]
        if urls:
            delivery = AlertDelivery(self.store, urls, self.settings.webhook_secret)
            self.tasks.append(asyncio.create_task(delivery.run(self.stop, self.settings.webhook_interval_ms)))

    async def close(self) -> None:
        """Stop in order: background tasks, the closings in flight, a last drain to SQL; then the connections
        (all there is to close of a service built and never started)."""
        self.stop.set()
        if not self._started:
            await self.counters.aclose()
            self.store.close()
            return
        if self._recovery is not None and not self._recovery.done():
            await asyncio.wait([self._recovery], timeout=30)
        await self.admin.stop_restoring()
        await self.admin.stop_seeding()
        await self.engine.finish_closings(stopping=True)  # settles in flight, before the last drain
        for task in self.tasks:
            try:
                await asyncio.wait_for(task, timeout=5)
            except (TimeoutError, asyncio.CancelledError):
                log.warning("background task %s did not stop in time", task.get_coro())
                task.cancel()
        try:
            await self.writer.drain()
        except Exception:
            log.exception("final drain failed; events stay in the stream for the next writer")
        await self.counters.aclose()
        self.store.close()


def make_grpc_server(service: Service, policy: bool = True, admin: bool = True,
                     gateway_streams: ExternalProcessorServicer | None = None
                     ) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A gRPC server with the decision services (PolicyService, ext_authz, ext_proc: `gateway_streams`, or
    one of its own), the AdminService, or both; health checking and reflection on each."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
                                      # gRPC shares an address by default: a second process would take half the
                                      # connections of the first, unseen (unless shared on purpose: workers)
                                      ("grpc.so_reuseport", int(service.settings.listen_shared))])
    names = []
    if policy:
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(PolicyServicer(service.engine), server)
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AuthorizationServicer(service.engine, service.pool),
                                                                   server)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
            gateway_streams or ExternalProcessorServicer(service.engine, service.pool), server)
        names += [policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
                  external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name,
                  external_processor_pb2.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name]
    if admin:
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(service.admin, service.settings.admin_token),
                                                          server)
        names.append(admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


def _policy_file_text(path: str) -> str:
    """The policy file `policyd serve` applies at its start, read and checked before anything starts: one it cannot
    read, or not a valid policy, stops it with the reason in a line (not a traceback after the counters' rebuild)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        parse_policy(text, path)
    except OSError as error:
        raise SystemExit(f"cannot read the policy file {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise SystemExit(f"cannot read the policy file {path}: not UTF-8 text") from None
    except PolicyError as error:
        raise SystemExit(f"invalid policy file: {error}") from None
    return text


def _listen(server: grpc.aio.Server, address: str, settings: Settings, client_ca_file: str) -> None:
    try:
        if settings.tls_cert_file:
            key = Path(settings.tls_key_file).read_bytes()
            cert = Path(settings.tls_cert_file).read_bytes()
            ca = Path(client_ca_file).read_bytes() if client_ca_file else None
            credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                      require_client_auth=ca is not None)
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind to address"
        port = 0
    if port == 0:
        raise SystemExit(f"cannot listen on {address}: the address is taken, or not one of this machine's")


async def serve(settings: Settings, ready: asyncio.Event | None = None,
                shutdown: asyncio.Event | None = None, stop_now: asyncio.Event | None = None) -> None:
    """Start the service (told to stop meanwhile: `_start`), bind its addresses and serve until `shutdown` is set
    (SIGTERM/SIGINT in `policyd serve`), then stop in order: health NOT_SERVING, in-flight calls and the gateway's
    streams finished (`_stop_serving`: up to the shutdown grace, or until `stop_now`, a second signal), background
    tasks, a last drain."""
    service = await Service.build(settings)
    shutdown, stop_now = shutdown or asyncio.Event(), stop_now or asyncio.Event()
    try:
        started = await _start(service, shutdown, stop_now)
    except BaseException:  # a start that fails stops what it started (its loops would keep the process running)
        await service.close()
        raise
    if not started or shutdown.is_set():  # told to stop while it started: it never listens
        await service.close()
        log.info("policyd stopped before it served")
        return
    separate_admin = bool(settings.admin_listen)
    gateway_streams = ExternalProcessorServicer(service.engine, service.pool)
    metrics.gateway_streams_open.set_function(lambda: gateway_streams.streams_open)
    server, health_servicer = make_grpc_server(service, admin=not separate_admin, gateway_streams=gateway_streams)
    main_names = ("", "policyd.v1.PolicyService") + (() if separate_admin else ("policyd.v1.AdminService",))
    servers = [(server, health_servicer, main_names)]
    dashboard, started_serving = None, False
    try:  # from here, whatever ends serving (a signal, an address taken, an error) stops the service in order
        # bound once the service is ready (a gateway connecting earlier is refused, and tries another replica)
        _listen(server, settings.listen, settings, settings.tls_client_ca_file)
        if separate_admin:
            admin_server, admin_health = make_grpc_server(service, policy=False)
            _listen(admin_server, settings.admin_listen, settings,
                    settings.admin_tls_client_ca_file or settings.tls_client_ca_file)
            servers.append((admin_server, admin_health, ("", "policyd.v1.AdminService")))
        metrics.serve(settings.metrics_listen)
        dashboard = await serve_dashboard(service.admin, settings.dashboard_listen, settings.admin_token,
                                          settings.dashboard_viewer_token)
        for grpc_server, health_of, names in servers:
            await grpc_server.start()
            for name in names:
                await health_of.set(name, health_pb2.HealthCheckResponse.SERVING)
        started_serving = True
        runtime.settle_in()
        log.info("policyd serving on %s (redis: %s, database: %s)", settings.listen,
                 "embedded" if not settings.redis_url else "external", settings.database_url.split("://")[0])
        if ready is not None:
            ready.set()
        await shutdown.wait()
    finally:
        log.info("policyd stopping")
        for grpc_server, health_of, _ in servers:
            await health_of.enter_graceful_shutdown()
        if shutdown.is_set() and started_serving:  # told to stop: load balancers learn it before calls are refused
            await _announce_stopping(settings.shutdown_delay_seconds, stop_now)
        await _stop_serving([grpc_server for grpc_server, _, _ in servers], gateway_streams,
                            settings.shutdown_grace_seconds, stop_now)
        log.info("grpc servers stopped")
        if dashboard is not None:
            await dashboard.stop()
        await service.close()
        log.info("policyd stopped")


async def _start(service: Service, shutdown: asyncio.Event, stop_now: asyncio.Event) -> bool:
    """Service.start, told apart from a signal meanwhile (a start may take minutes: counters rebuilt from SQL):
    the first is said at once and heeded when the start is done (a rebuild left half made would close every
    replica's counters until another rebuilt them), the second (`stop_now`) cancels the start. Whether it started."""
    starting = asyncio.ensure_future(service.start())
    for told in (shutdown, stop_now):
        heard = asyncio.ensure_future(told.wait())
        try:
            await asyncio.wait({starting, heard}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            starting.cancel()
            raise
        finally:
            heard.cancel()
        if starting.done():
            starting.result()  # raises what failed it
            return True
        if told is shutdown:
            log.info("policyd told to stop while it starts: it stops once started (a second signal: now)")
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    log.info("policyd told again to stop: its start cancelled")
    return False


async def _announce_stopping(delay_seconds: int, stop_now: asyncio.Event) -> None:
    """Go on taking new calls `delay_seconds` (Settings.shutdown_delay_seconds) while the health says NOT_SERVING,
    so that a gateway checking it sends new requests elsewhere before any is refused; a second signal ends it."""
    if delay_seconds <= 0 or stop_now.is_set():
        return
    log.info("policyd stopping: health NOT_SERVING, new calls still taken for %d s", delay_seconds)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop_now.wait(), timeout=delay_seconds)


async def _stop_serving(grpc_servers: list[grpc.aio.Server], gateway_streams: ExternalProcessorServicer,
                        grace_seconds: int, stop_now: asyncio.Event) -> None:
    """Take no new calls, and wait for the gateway's streams open to end: one lasts as long as its reply
    (minutes for a long generation), and one cut short here would be charged as what was delivered while
    its client gets the rest. Past the grace (or at `stop_now`), those still open are let go unread
    (ExternalProcessorServicer.abandoning: each charged as held). Other calls get CALLS_GRACE_SECONDS more (a unary
    call ends in moments; a health watch or a reflection stream never does), then are cancelled."""
    stopping = asyncio.ensure_future(asyncio.gather(
        *(s.stop(grace=grace_seconds + CALLS_GRACE_SECONDS) for s in grpc_servers)))
    told = asyncio.ensure_future(stop_now.wait())
    deadline = time.monotonic() + grace_seconds
    while gateway_streams.streams_open and not told.done() and not stopping.done() and time.monotonic() < deadline:
        await asyncio.wait({stopping, told}, timeout=0.1, return_when=asyncio.FIRST_COMPLETED)
    if gateway_streams.streams_open and not stopping.done():
        log.warning("%d gateway streams still open %s; stopping without them", gateway_streams.streams_open,
                    "at a second signal" if told.done() else f"after the {grace_seconds} s grace")
        gateway_streams.abandoning = True
    elif not told.done():
        await asyncio.wait({stopping, told}, timeout=CALLS_GRACE_SECONDS, return_when=asyncio.FIRST_COMPLETED)
    told.cancel()
    if not stopping.done():
        await asyncio.gather(*(s.stop(None) for s in grpc_servers))
    await stopping


async def work(settings: Settings, shutdown: asyncio.Event | None = None) -> None:
    """`policyd writer`: the writer (streams to SQL) and the background loops, no listener. Run it beside
    `policyd serve` processes started with POLICYD_WRITER_ENABLED=false, so SQL work never competes
    with decisions for a process (several writers may run: their consumer group shares the streams)."""
    if not settings.redis_url:
        raise SystemExit("policyd writer needs a shared Redis (POLICYD_REDIS_URL): the embedded store lives "
                         "inside one serve process, which writes its own records")
    service = await Service.build(settings)
    shutdown = shutdown or asyncio.Event()
    try:  # whatever ends it (a signal, the /metrics address taken, a start that failed) stops it in order
        await service.start()
        metrics.serve(settings.metrics_listen)
        runtime.settle_in()
        log.info("policyd writer running (database: %s)", settings.database_url.split("://")[0])
        await shutdown.wait()
    finally:
        log.info("policyd writer stopping")
        await service.close()
        log.info("policyd writer stopped")
