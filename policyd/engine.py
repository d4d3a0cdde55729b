"""The decision pipeline: Authorize, Settle, Release and expiry, top to bottom.

    authorize:  validate input -> resolve the key -> policy snapshot (plan)
                -> owner/environment/endpoint/model checks -> estimate the charge
                -> quota buckets -> one atomic Lua step (key state, concurrency,
                wallet, buckets, reservation, event) -> maybe downgrade -> decision
    settle:     validate usage -> find the reservation -> price the actual usage
                with the reservation's price table -> one atomic Lua step
                (reservation -> charge, buckets adjusted, event)
    release:    find the reservation -> one atomic Lua step (holds returned, event)
    expire:     the same as release, for reservations past their deadline (charged as held instead, one
                TTL later, when the request was sent on to the provider and nobody closed it: a proxy lost)

Every outcome, allowed or denied, leaves an event in the owner's partition
stream; the writer turns events into SQL records. Servicers only translate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from dataclasses import asdict, astuple, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from policyd import keys as key_secrets
from policyd import compact_json, key_limits, metrics, own_usage, reasons, redis_keys, request_lookup
from policyd.reports import ReportError
from policyd.batches import BATCH_ID_PREFIXES
from policyd.counters import (STORED_RESPONSE_HOT_SECONDS, STORED_RESPONSE_SECONDS, AuthorizeResult, BucketHold,
                              Counters, EndUserTerms, Fenced, Reservation, Whose, unreachable, whose_of)
from policyd.directory import KeyDirectory
from policyd.loops import every
from policyd.domain import (
    ANTHROPIC_FAST_MODE,
    CACHED_CONTENT_PREFIX,
    Attribution,
    CREATED_AT,
    GEMINI_UPLOAD_PREFIX,
    IMAGE_GENERATION_USAGE,
    AuthorizeInput,
    Decision,
    KeySummary,
    LimitState,
    OUTPUT_CAP_FIELDS,
    PART_TOKEN_FIELDS,
    tier_in_geo,
    Owner,
    PolicydError,
    RateLimit,
    ReleaseResult,
    RequestSummary,
    Settlement,
    Shape,
    UsageReport,
    gemini_upload_named,
)
from policyd.money import format_amount
from policyd.policy import Cap, Limit, ModelPrice, Plan, Policy, is_model_pattern
from policyd.policy_book import PolicyBook
from policyd.pricing import (AUDIO_TOKENS_PER_SECOND, PARTIAL_IMAGE_OUTPUT_TOKENS, Quantities, audio_seconds,
                             audio_seconds_likely, billing_of, charge_of, cost_of, estimate_input_tokens,
                             image_generation_quantities, input_estimate, rerank_search_units,
                             rerank_search_units_likely)
from policyd.quotas import amount_for, bucket_states, cap_hold, hold_for, limit_reason, limit_scope_id, scope_ids
from policyd.usage_capture import Tokens
from policyd.reasons import MESSAGES
from policyd.store import KeyRecord, Store
from policyd.validation import (MODEL_NAME_LENGTH_MAX, REQUEST_ID_LENGTH_MAX, Problem, check_authorize, check_end_user,
                                check_usage)

if TYPE_CHECKING:
    from policyd.background import BackgroundResponses

log = logging.getLogger("policyd.engine")

ASK_FIRST_SECONDS = 1.0  # how long a Veo operation's read waits for policyd's own asking (ext_authz waits 2 s)
CLOSE_RETRY_SECONDS = 600  # a background settle or release is tried again this long while Redis is unreachable
CLOSE_RETRY_DELAY_MAX_SECONDS = 5.0
SWEEP_BATCH = 200
END_USER_LIMITS_CACHED_MAX = 100_000  # end users whose own limits (or none) a replica keeps read
# where a request carries a bound of its search tools for policyd to set (Gemini's takes none: reserved only)
TOOL_BOUND_ENDPOINTS = frozenset({"responses", "anthropic_messages"})
# usage fields newer than the first records: in a settlement, and its fingerprint, only when set, so that an
# older writer still writes every other record and a retried Settle fingerprints as an older replica did
LATER_USAGE_FIELDS = ("web_searches", "audio_input_tokens", "audio_output_tokens", "cache_write_1h_input_tokens",
                      "service_tier", "file_searches", "image_input_tokens", *IMAGE_GENERATION_USAGE,
                      "image_output_tokens", "containers", "maps_groundings", "search_units", "search_context_size",
                      "reasoning_output_tokens", "cache_storage_token_seconds")



NO_PRICE = ModelPrice.model_construct(provider="", route="", tier="", input=0, cached_input=None,
                                      cache_write_input=None, output=0,
                                      per_image=0, per_request=0, per_second=0)
# what making a conversation (OpenAI's POST /v1/conversations) costs, and where it goes: nothing, OpenAI
CONVERSATION_PRICE = NO_PRICE.model_copy(update={"provider": "openai"})
# ... at each provider one may be made at (an Azure OpenAI client's file, conversation: at Azure's)
CREATED_PRICES = {provider: NO_PRICE.model_copy(update={"provider": provider}) for provider in CREATED_AT}


def _created_at(provider: Any) -> ModelPrice:
    """The price (nothing) of a file or conversation made, at the provider it was made at (OpenAI unless named)."""
    return CREATED_PRICES.get(provider, CONVERSATION_PRICE)


# the decision of a key read under terms (plan, scopes, own limits) the operator has since changed: made again
STALE = Decision(decision="deny", request_id="", reason="stale")

# a key's state (counters.key_status) -> the denial it gets
KEY_STATE_DENIALS = {"invalid": "invalid_api_key", "paused": "key_paused", "revoked": "key_revoked",
                     "expired": "key_expired", "unavailable": "unavailable"}


def _buckets_held(holds: list[BucketHold], counts_only: dict[str, tuple[str, ...]] | None = None) -> list[list[Any]]:
    """[bucket key, unit, amount] of each bucket a request is counted in, once however many of its limits count
    there (a shadow limit beside a blocking one, a downgrade before a block): what its settle, release, refund,
    the audit and a rebuild take the bucket's count from. A bucket counting the request only if some of the models
    that may serve it does (`counts_only`: a limit on a fallback's model) names them, fourth: its settle counts
    nothing there when another served it."""
    held: dict[str, list[Any]] = {}
    for h in holds:
        held.setdefault(h.key, [h.key, h.unit, h.amount, *([list(counts_only[h.key])] if counts_only and h.key
                                                            in counts_only else [])])
    return list(held.values())


def _rate_limits(attempt: "_Plan", used: tuple[int, ...]) -> tuple[RateLimit, ...]:
    """The tightest request limit, token limit and money limit (a budget) a request was held in, with what each
    leaves, for the rate-limit and budget headers its client reads, and what its thread's budget leaves (unit
    "thread_budget", nanos) when its caller set one. Blocking limits of the customer's own alone: a shadow limit
    refuses nothing, and an operator's cap is the operator's business."""
    tightest: dict[str, RateLimit] = {}
    for hold, after in zip(attempt.holds, used):
        if hold.label == key_limits.THREAD_BUDGET:
            tightest["thread_budget"] = RateLimit("thread_budget", hold.limit, max(hold.limit - after, 0), 0)
            continue
        limit, ends = attempt.limits_by_label.get(hold.label, (None, 0))
        if hold.mode != "block" or hold.unit not in ("requests", "tokens", "money") or limit is None \
                or isinstance(limit, Cap):
            continue
        remaining = max(hold.limit - after, 0)
        if hold.unit not in tightest or remaining < tightest[hold.unit].remaining:
            tightest[hold.unit] = RateLimit(hold.unit, hold.limit, remaining, ends * 1000)
    return tuple(tightest.values())


def _request_charge_bound(plan: Plan, request: AuthorizeInput) -> int:
    """The most one request may hold (nanos; 0: no bound): the plan's max_request_charge, or the lower bound its
    caller set on this request (AuthorizeInput.max_charge)."""
    if not request.max_charge:
        return plan.max_request_charge
    return min(plan.max_request_charge, request.max_charge) if plan.max_request_charge else request.max_charge


def _owner_of(key: KeyRecord) -> Owner:
    return Owner(key.customer_id, key.workspace_id, key.project_id, key.team_id, key.id, key.environment, key.plan)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


ATTEMPTS_MAX = 10  # a client's request id served again after failed attempts: <id>:attempt-2 ... this many
_ATTEMPT_SUFFIX = ":attempt-"


def next_attempt_id(request_id: str) -> str:
    """The id a client's request is served under when its id names a request that failed (released, expired):
    `<id>:attempt-2`, then -3...; "" past ATTEMPTS_MAX or the longest id a request may have."""
    base, _, number = request_id.rpartition(_ATTEMPT_SUFFIX)
    attempt = int(number) + 1 if base and number.isdigit() else 2
    attempt_id = f"{base if attempt > 2 else request_id}{_ATTEMPT_SUFFIX}{attempt}"
    return attempt_id if attempt <= ATTEMPTS_MAX and len(attempt_id) <= REQUEST_ID_LENGTH_MAX else ""


_KEY_OWNED_SEPARATOR = "/key:"


def key_owned_id(request_id: str, key_id: str) -> str:
    """The id a gateway client's request is served under when another key's request holds the id the client
    named: `<id>/key:<key id>`, the same for each of its retries; "" when it is that already, or too long."""
    owned_id = f"{request_id}{_KEY_OWNED_SEPARATOR}{key_id}"
    if request_id.endswith(f"{_KEY_OWNED_SEPARATOR}{key_id}") or len(owned_id) > REQUEST_ID_LENGTH_MAX:
        return ""
    return owned_id


FREE_ENDPOINTS = frozenset({"moderations"})  # free at the provider: admitted as token counts are
STORED_RESPONSE_RECHECK_SECONDS = 0.5
CONVERSATION_ID_PREFIX = "conv_"  # OpenAI's: a stored conversation, not a stored response
FILE_ID_PREFIXES = ("file-", "file_")  # ... an uploaded file (OpenAI's; Anthropic's)
UPLOAD_ID_PREFIX = "upload_"  # ... a file being uploaded in parts (the Uploads API)


def _not_found(stored_id: str) -> str:
    """The denial of a stored thing another customer made, named as the provider names what it does not know."""
    if stored_id.startswith(CONVERSATION_ID_PREFIX):
        return "conversation_not_found"
    if stored_id.startswith(BATCH_ID_PREFIXES):
        return "batch_not_found"
    if stored_id.startswith(CACHED_CONTENT_PREFIX):
        return "cached_content_not_found"
    return "file_not_found" if stored_id.startswith((*FILE_ID_PREFIXES, UPLOAD_ID_PREFIX)) else "response_not_found"


def _stream_usage_reported(price: ModelPrice | None) -> bool:
    """Decision.stream_usage_reported: the model's provider reports a stream's usage unasked (stream_usage)."""
    return price is not None and price.stream_usage == "reported"


def _cap_field(price: ModelPrice | None) -> str:
    """Decision.output_cap_field: "" for OpenAI's max_completion_tokens, else the field the provider reads."""
    return "" if price is None or price.output_cap_field == "max_completion_tokens" else price.output_cap_field


def _image_model_named(policy: Policy | None, shape: Shape) -> str:
    """The model the request's image_generation tool is to name (Decision.image_model): the plan's, for a tool
    naming none; the tool's own as the provider knows it, when the price table names it otherwise; else ""."""
    if not shape.image_model:
        return ""
    upstream = policy.upstream_name(shape.image_model) if policy else shape.image_model
    return upstream if shape.image_model_default or upstream != shape.image_model else ""


def _reports_cost(policy: Policy, model: str) -> bool:
    """Whether the model is priced at what its provider's replies say was charged (ModelPrice.reported_cost)."""
    price = policy.model(model)
    return price is not None and price.reported_cost


def held_tier(price: ModelPrice, tier: str, geo: str) -> str:
    """The tier a request on `tier` is priced at in the geography its endpoint runs it in (Shape.geo, which its
    reply does not say): the model's tier of that geography where it prices one, else `tier` as it is."""
    if not geo:
        return tier
    in_geo = tier_in_geo(tier, geo)
    return in_geo if price.tier_prices(in_geo) is not None else tier


def _other_models_named(policy: Policy | None, shape: Shape) -> dict[str, Any]:
    """The names the request's fallbacks and advisor tool are to send their models by (Decision.fallback_models,
    advisor_model), where the price table knows one by another name than the provider's; {} when none."""
    if policy is None or not (shape.fallback_models or shape.advisor_model):
        return {}
    named: dict[str, Any] = {}
    upstream = tuple(policy.upstream_name(m) for m in shape.fallback_models)
    if upstream != shape.fallback_models:
        named["fallback_models"] = upstream
    if shape.advisor_model and policy.upstream_name(shape.advisor_model) != shape.advisor_model:
        named["advisor_model"] = policy.upstream_name(shape.advisor_model)
    return named


# endpoints whose output cap a proxy writes into the request (http_api.rewrite_body), which a plan with
# fit_output_cap may lower to what the wallet or a limit can hold; tries: another limit may refuse the lower
FITTED_ENDPOINTS = frozenset(OUTPUT_CAP_FIELDS)
FIT_TRIES = 3
CACHE_CHANGE_MARGIN_SECONDS = 60  # a cache change's claim outlives its hold this long (its expiry settles it)


def _cache_storage(report: UsageReport, reservation: Reservation) -> tuple[UsageReport, tuple[int, int]]:
    """An explicit cache's usage as charged, and (its tokens, its life in seconds from its making). Made: its
    tokens written (input, at the write price) and kept for the life its reply gives
    (Usage.cache_storage_token_seconds: its tokens x that life), else as long as it was asked to live. Its
    time to live changed (a PATCH, held with the life charged before): none written, its tokens kept past that
    life; a reply not read, as held."""
    tokens, fields = report.input_tokens, reservation.fields
    lifetime = report.cache_storage_token_seconds // tokens if tokens else 0
    if "cache_kept_seconds" in fields:
        if not tokens:  # its reply not read: its tokens, the time it was asked to live more (Settle estimated)
            return report, (0, 0)
        kept = int(fields["cache_kept_seconds"] or 0)
        return replace(report, input_tokens=0, cached_input_tokens=0, cache_write_input_tokens=0,
                       cache_write_1h_input_tokens=0, audio_input_tokens=0, image_input_tokens=0,
                       cache_storage_token_seconds=tokens * max(0, lifetime - kept)), (tokens, lifetime)
    if tokens and not report.cache_storage_token_seconds:  # a reply that gave no times: as long as asked
        lifetime = int(fields.get("seconds_estimate") or 0)
        report = replace(report, cache_storage_token_seconds=tokens * lifetime)
    written = tokens - report.cached_input_tokens - report.audio_input_tokens - report.image_input_tokens
    return replace(report, cache_write_input_tokens=max(0, written), cache_write_1h_input_tokens=0), (tokens, lifetime)


def _bound_to_model(request: AuthorizeInput) -> bool:
    """A request no other model may serve (no fallback, no downgrade): a batch, whose requests' file names
    its model; an explicit cache made (Gemini's), which serves its model alone; a request that uses one."""
    return bool(request.batch) or request.endpoint == "cached_contents" or \
        request.previous_response.startswith(CACHED_CONTENT_PREFIX)


def _fallbacks_bound(policy: Policy, limit: Limit | Cap, request: AuthorizeInput) -> bool:
    """Whether a downgrading limit binds a fallback the request names (other than the cheaper model): the cheaper
    model would go with that fallback still named, which the provider may serve past the limit; so the limit
    refuses the request instead."""
    for model in request.shape.fallback_models:
        price = policy.model(model)
        if model == limit.downgrade_to or price is None:
            continue
        if limit.covers(model, price) if isinstance(limit, Cap) else limit.binds(model, price.tier):
            return True
    return False


def _least_fitted_cap(plan: Plan, request: AuthorizeInput) -> int:
    """The least output cap a plan fits a request to: the plan's fit_output_cap_min, or what the provider
    accepts when more (a Claude request's past its thinking budget: a smaller cap would be refused, 400)."""
    return max(plan.fit_output_cap_min, request.shape.least_output_cap)


def _capped(request: AuthorizeInput, output_cap: int) -> AuthorizeInput:
    return replace(request, shape=replace(request.shape, max_output_tokens=output_cap))


@dataclass
class _Plan:
    """What one attempt at a reservation is made of."""

    served_model: str
    price: ModelPrice
    input_tokens: int
    output_cap: int
    charge: int
    holds: list[BucketHold]
    limits_by_label: dict[str, tuple[Limit, int]]  # label -> (limit, window end)
    fallback_reason: str = ""
    likely_input_tokens: int = 0  # what a settle without the provider's usage charges (input_tokens: reserved)
    likely_seconds: int = 0  # ... and the audio's seconds (speech to text)
    likely_audio_tokens: int = 0  # ... and its audio tokens, of likely_input_tokens (a model billing those)
    tool_call_cap: int = 0  # the bound the request is to carry for its unbounded search tools (0: none)
    skip_label: str = ""  # the limit a downgrade was made for, which the cheaper model's attempt leaves out
    request_charge: int = 0  # the most one request of it may be charged (a batch's dearest; else `charge`)
    search_units: int = 0  # a rerank's search units held (a model priced per search unit) ...
    likely_search_units: int = 0  # ... and the fewest it bills: what a settle without the provider's count charges
    # bucket key -> the models whose serving the request counts there, of those that may serve it (a fallback's
    # limit: only if it serves), where not all of them; {} for a request only its own model serves
    counts_only: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def empty(cls, model: str) -> "_Plan":
        """Nothing to reserve: the request is denied before its estimate."""
        return cls(model, NO_PRICE, 0, 0, 0, [], {})


@dataclass(frozen=True)
class _Estimate:
    """The most one request may bill, and what it likely bills (a batch's: the sum of its requests')."""

    output_cap: int
    input_tokens: int
    likely_input_tokens: int
    likely_seconds: int
    likely_audio_tokens: int
    tool_call_cap: int
    quantities: Quantities
    cost: int
    charge: int
    request_charge: int = 0  # the most one of its requests may be charged (0: `charge`, it is one request)
    likely_search_units: int = 0  # a rerank's fewest search units (of quantities.search_units held)

    @classmethod
    def total(cls, estimates: list["_Estimate"]) -> "_Estimate":
        """A batch's: every quantity, cost and charge summed (its requests are one model's, on one tier)."""
        counted = [f.name for f in fields(Quantities) if f.type in ("int", int)]
        quantities = replace(estimates[0].quantities, **{name: sum(getattr(e.quantities, name) for e in estimates)
                                                         for name in counted})
        return cls(sum(e.output_cap for e in estimates), sum(e.input_tokens for e in estimates),
                   sum(e.likely_input_tokens for e in estimates), sum(e.likely_seconds for e in estimates),
                   sum(e.likely_audio_tokens for e in estimates), 0, quantities,
                   sum(e.cost for e in estimates), sum(e.charge for e in estimates),
                   max(e.charge for e in estimates))


class Engine:
    def __init__(self, counters: Counters, store: Store, book: PolicyBook, directory: KeyDirectory,
                 reservation_ttl_seconds: int = 600, failure_mode: str = "closed",
                 clock: Callable[[], int] = now_ms) -> None:
        self.counters = counters
        self.store = store
        self.book = book
        self.directory = directory
        self.reservation_ttl_ms = reservation_ttl_seconds * 1000
        self.failure_mode = failure_mode
        self.clock = clock
        self._closings: set[asyncio.Task[None]] = set()
        self._retrying: set[asyncio.Task[None]] = set()  # closings between two attempts (Redis unreachable)
        self._stopping = False
        # (customer, end user) -> its own limits and their terms (_with_end_user_limits), oldest first
        self._end_user_limits: dict[tuple[str, str], tuple[tuple[Limit, ...], EndUserTerms]] = {}
        self.background: BackgroundResponses | None = None  # the background responses it waits for, once built
        self._asking: set[asyncio.Future[None]] = set()  # Veo operations asked for on their reads, still asking

    # ------------------------------------------------------------------ closings in the background
    def close_in_background(self, closing: Callable[[], Awaitable[Any]], request_id: str) -> None:
        """Run a settle or release that nobody waits for (a proxy that answered its client first, a stream
        that was cut) in a task of its own, so no cancellation interrupts it; tracked until done.

        `closing` makes the call. While the counters cannot be reached it is made again (backing off to
        CLOSE_RETRY_DELAY_MAX_SECONDS, for CLOSE_RETRY_SECONDS or until the service stops): a
        response already delivered is still charged when Redis comes back (settles are idempotent;
        one after the reservation's deadline is recorded settled_late)."""
        task = asyncio.ensure_future(self._close_retrying(closing, request_id))
        self._closings.add(task)
        task.add_done_callback(self._closings.discard)
        task.add_done_callback(self._retrying.discard)

    async def _close_retrying(self, closing: Callable[[], Awaitable[Any]], request_id: str) -> None:
        deadline = time.monotonic() + CLOSE_RETRY_SECONDS
        delay = 0.1
        while True:
            try:
                await closing()
                return
            except PolicydError as error:
                if error.status != "UNAVAILABLE":
                    log.warning("closing %s: %s", request_id, error)
                    return
                failure: BaseException = error
            except Exception as error:
                if not unreachable(error):
                    log.exception("closing %s failed; its deadline will close it", request_id)
                    return
                failure = error
            if self._stopping or time.monotonic() + delay > deadline:
                log.error("closing %s gave up with the counters unreachable (%s); its deadline will close it",
                          request_id, type(failure).__name__)
                return
            metrics.close_retries.inc()
            task = asyncio.current_task()
            self._closings.discard(task)  # an audit or a report does not wait out an outage
            self._retrying.add(task)
            try:
                await asyncio.sleep(delay)
            finally:
                self._retrying.discard(task)
                self._closings.add(task)
            delay = min(delay * 2, CLOSE_RETRY_DELAY_MAX_SECONDS)

    async def finish_closings(self, stopping: bool = False) -> None:
        """Wait for the background closings being made (before an audit or a report), and the Veo operations
        being asked for on their reads (which may settle them); ones waiting to be made again while Redis is
        unreachable are not waited for, except at shutdown (`stopping`), where each makes one last attempt."""
        self._stopping = self._stopping or stopping
        while self._closings or self._asking or (stopping and self._retrying):
            waiting = self._closings | self._asking | (self._retrying if stopping else set())
            await asyncio.wait(waiting, timeout=0.05)

    # ------------------------------------------------------------------ authorize
    async def authorize(self, request: AuthorizeInput, unavailable_providers: frozenset[str] = frozenset()) -> Decision:
        if request.stored_response:
            return await self.admit_stored_response(request)
        if request.count_tokens or request.endpoint in FREE_ENDPOINTS:
            return await self.admit_token_count(request)
        cache_update = request.cache_update
        if cache_update:
            request = await self._cache_update(request)
        started = time.perf_counter()
        decision = await self._authorize(request, unavailable_providers)
        if decision is STALE:  # the operator changed the key's terms since this process read it
            decision = await self._authorize(request, unavailable_providers)
            if decision is STALE:  # changed again meanwhile: the client may retry at once
                decision = self._deny({"request_id": request.attribution.request_id or new_request_id(),
                                       "requested_model": request.model, "served_model": request.model,
                                       "owner": Owner()}, "unavailable", retry_after=1)
        if cache_update and decision.allowed and decision.reservation_expires_ms:
            decision = await self._one_cache_change(request, decision)
        metrics.authorize_seconds.observe(time.perf_counter() - started)
        metrics.decisions.labels(decision.decision, decision.reason or "ok").inc()
        if decision.reason == "counters_unavailable" or decision.reason == "counters_unavailable_fail_open":
            metrics.counter_errors.inc()
        return decision

    async def authorize_for_proxy(self, request: AuthorizeInput,
                                  unavailable_providers: frozenset[str] = frozenset()) -> Decision:
        """Authorize for a caller that may be cancelled midway: Envoy drops its ext_authz or ext_proc call
        when the client hangs up. The decision runs to its end regardless, and a reservation nobody will
        use is released at once (reason client_gone) instead of holding the wallet until it expires."""
        deciding = asyncio.ensure_future(self.authorize(request, unavailable_providers))
        try:
            return await asyncio.shield(deciding)
        except asyncio.CancelledError:
            deciding.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, deciding: "asyncio.Future[Decision]") -> None:
        if deciding.cancelled() or deciding.exception() is not None:
            return
        decision = deciding.result()
        if decision.allowed and decision.reservation_expires_ms:  # a reservation was made (not fail-open, no count)
            request_id = decision.request_id
            self.close_in_background(lambda: self.release(request_id, "client_gone"), request_id)

    async def _cache_update(self, request: AuthorizeInput) -> AuthorizeInput:
        """A change of an explicit cache's time to live (Gemini's PATCH cachedContents/<id>) names no model: the
        cache's, its tokens and the seconds of its life charged so far, as policyd remembered them when it was
        made (whose it is is checked with the key's: a cache it does not know, or another customer's, is
        refused, cached_content_not_found)."""
        cache = Whose.read(await self._whose(request.previous_response) or "")
        return replace(request, model=cache.model[:MODEL_NAME_LENGTH_MAX], cache_tokens=cache.context_tokens,
                       cache_kept_seconds=cache.kept_seconds)

    async def _one_cache_change(self, request: AuthorizeInput, decision: Decision) -> Decision:
        """A change of an explicit cache's time to live is charged the time past the life charged before it: two at
        once would each be charged from the same life. So one runs at a time (claimed for its hold's life at
        most): another asked meanwhile is refused, its hold given back (409 request_in_progress), until the first
        is settled or released."""
        seconds = (decision.reservation_expires_ms - self.clock()) // 1000 + CACHE_CHANGE_MARGIN_SECONDS
        if await self.counters.claim_cache_change(request.previous_response, decision.request_id, seconds):
            return decision
        await self.release(decision.request_id, "cache_change_in_progress")
        return self._deny({"request_id": decision.request_id, "requested_model": decision.requested_model,
                           "served_model": decision.served_model, "owner": decision.owner}, "request_in_progress",
                          "Another change of this cache's time to live is in progress: retry once it has ended.")

    async def _end_cache_change(self, reservation: Reservation) -> None:
        """A change of an explicit cache's time to live ended (its life charged now remembered): the next may run.
        The claim runs out on its own if this fails."""
        try:
            await self.counters.end_cache_change(str(reservation.fields["cache_name"]), reservation.request_id)
        except Exception:
            log.exception("could not end the change of cached content %s", str(reservation.fields["cache_name"])[:64])

    async def _authorize(self, request: AuthorizeInput, unavailable_providers: frozenset[str]) -> Decision:
        started = time.perf_counter_ns()
        at = self.clock()
        a = request.attribution
        request_id = a.request_id or new_request_id()
        base = {"request_id": request_id, "requested_model": request.model, "served_model": request.model}

        # 1. input no policy could make sense of, and 2. the key
        screened = await self._screen(request, at, started, base)
        if isinstance(screened, Decision):
            return screened
        secret_hash = screened
        key = await self.directory.resolve(secret_hash)
        if key is None:
            return await self._deny_unowned(request, at, started, base, "invalid_api_key")
        owner = _owner_of(key)

        # 3. the policy snapshot this decision is made under
        policy = self.book.current
        plan = policy.plan(key.plan) if policy else None
        if plan is not None and request.shape.image_model_default and not request.shape.image_model:
            # an image_generation tool naming no model: the plan's, which the request is then to name
            request = replace(request, shape=replace(request.shape, image_model=plan.image_generation_model))
        preset = ""
        param = ""
        preset_message = ""
        if policy is None:
            preset = "no_policy"
        elif plan is None:
            preset = "unknown_plan"
        elif request.cache_update and not request.model:  # a cache policyd never made
            preset, param = "cached_content_not_found", "name"
        else:
            preset, param = self._policy_denial(request, key.scopes, owner, policy, plan)
            if request.thread_budget_currency or request.max_charge_currency:  # amounts its caller set
                for amount, currency in (("thread_budget", request.thread_budget_currency),
                                         ("max_charge", request.max_charge_currency)):
                    if not preset and currency not in ("", policy.document.currency):
                        preset, param = "invalid_request", amount
                        preset_message = f"{amount} is in this policy's currency, {policy.document.currency}"
        prior_tokens = 0  # input a continuation carries unseen: the previous response's, or the conversation's
        # the provider account an explicit cache the request uses was made on (or a Gemini upload it sends the
        # bytes of was begun on): served there
        served_on = ""
        for stored, reason, name in ((request.previous_response, "response_not_found", "previous_response_id"),
                                     (request.conversation, "conversation_not_found", "conversation")):
            if stored and not preset:
                found = await self._context_of(owner.customer_id, stored)
                if found is None:  # (a Gemini request's explicit cache is another customer's: cachedContent)
                    preset, param = (_not_found(stored), "cachedContent") if stored.startswith(CACHED_CONTENT_PREFIX) \
                        else (reason, name)
                else:
                    prior_tokens += found[0]
                    served_on = found[1] if stored.startswith(CACHED_CONTENT_PREFIX) else served_on

        # 4. estimate and buckets (only when the policy allows the request)
        own_limits, end_user = key.limits, None
        if key.end_user_limits and request.attribution.end_user_id:
            own_limits, end_user = await self._with_end_user_limits(key, request.attribution.end_user_id)
            if end_user.paused and not preset:  # refused in the atomic step, once its terms are known current
                preset, param = "end_user_paused", "user"
        attempt = None
        for file_id in request.files if not preset else ():  # the files its input refers to: not another's
            found = await self._context_of(owner.customer_id, file_id)
            if found is None:  # (a batch's requests' caches too)
                preset, param = ("cached_content_not_found", "cachedContent") \
                    if file_id.startswith(CACHED_CONTENT_PREFIX) else ("file_not_found", "file_id")
                break
            if file_id.startswith(GEMINI_UPLOAD_PREFIX):
                served_on = found[1]
        if not preset and request.creates:  # a conversation or a file made: free, reserved at 0, settled with its id
            attempt = _Plan("", _created_at(request.creates_at), 0, 0, 0, [], {})
        elif not preset and policy is not None and plan is not None:
            # a batch runs where its input file is, as the file names its model: never another model
            model, fallback_reason = (request.model, "") if _bound_to_model(request) else self._route_around(
                policy, plan, key.scopes, owner.environment, request.model, request.shape, unavailable_providers)
            if request.batch:  # up to 50,000 requests to estimate: on a thread, so other decisions go on meanwhile
                attempt = await asyncio.to_thread(self._attempt, request, owner, policy, plan, model, at, "",
                                                  own_limits, prior_tokens)
            else:
                attempt = self._attempt(request, owner, policy, plan, model, at, skip_label="", own_limits=own_limits,
                                        prior_tokens=prior_tokens)
            attempt.fallback_reason = fallback_reason
            bound = _request_charge_bound(plan, request)
            if bound and attempt.request_charge > bound:  # a batch's: each
                attempt, preset, param, preset_message = self._within_request_charge(
                    request, owner, policy, plan, attempt, at, own_limits, prior_tokens, bound)
        reserve = attempt or _Plan.empty(request.model)

        # 5. the atomic step; a downgrade limit may turn a deny into a second attempt on a cheaper model
        decision_kind = "allow"
        result = await self._reserve(request, request_id, secret_hash, key.terms, owner, policy, plan, reserve, preset,
                                     at, started, end_user=end_user)
        if result is None:
            return await self._counters_down(request, request_id, base, owner, policy, plan, reserve, at, started)
        if result.outcome == "stale":
            return self._stale(result, secret_hash, end_user)
        if result.outcome == "allow" and request.creates == "file" and request.creates_at == "google" \
                and not request.files:
            await self.counters.upload_beginning(request_id, secret_hash)  # a Gemini upload begun: its bytes, keyless
        if result.outcome == "deny" and result.reason == "limit" and policy is not None and plan is not None:
            limit = reserve.limits_by_label.get(result.label, (None, 0))[0]
            if limit is not None and limit.action == "downgrade" and not _bound_to_model(request) \
                    and not _fallbacks_bound(policy, limit, request) \
                    and request.attribution.feature not in plan.critical_features \
                    and limit.downgrade_to != reserve.served_model \
                    and self._may_serve(policy, plan, key.scopes, key.environment, limit.downgrade_to, request.shape):
                cheaper = self._attempt(request, owner, policy, plan, limit.downgrade_to, at, skip_label=limit.label,
                                        own_limits=own_limits, prior_tokens=prior_tokens)
                cheaper.fallback_reason = f"downgraded:{limit.label}"
                retry = await self._reserve(request, request_id, secret_hash, key.terms, owner, policy, plan, cheaper, "",
                                            at, started, decision="downgrade", end_user=end_user)
                if retry is None:
                    return await self._counters_down(request, request_id, base, owner, policy, plan, reserve, at, started)
                if retry.outcome == "stale":
                    return self._stale(retry, secret_hash, end_user)
                if retry.outcome == "allow":
                    reserve, result, decision_kind = cheaper, retry, "downgrade"
                elif retry.outcome == "deny" and retry.reason == "limit":
                    reserve, result = cheaper, retry

        # 5b. a plan that fits the output cap: the largest cap the wallet or limit that refused can still hold
        # (at least the plan's fit_output_cap_min), written into the request, instead of a refusal
        for _ in range(FIT_TRIES):
            if not (result.outcome == "deny" and result.room >= 0 and plan is not None and plan.fit_output_cap
                    and request.endpoint in FITTED_ENDPOINTS and not request.shape.output_cap_fixed
                    and not request.batch):
                break
            cap = self._largest_output_cap(request, owner, policy, plan, reserve, result.label, result.room, at,
                                           own_limits, prior_tokens)
            if cap < _least_fitted_cap(plan, request):
                break
            fitted = self._attempt(_capped(request, cap), owner, policy, plan, reserve.served_model, at,
                                   skip_label=reserve.skip_label, own_limits=own_limits, prior_tokens=prior_tokens)
            fitted.fallback_reason = reserve.fallback_reason
            if fitted.fallback_reason.startswith("downgraded:"):  # the cheaper model a limit left, fitted
                decision_kind = "downgrade"
            retry = await self._reserve(request, request_id, secret_hash, key.terms, owner, policy, plan, fitted, "",
                                        at, started, decision=decision_kind, end_user=end_user)
            if retry is None:
                return await self._counters_down(request, request_id, base, owner, policy, plan, reserve, at, started)
            if retry.outcome == "stale":
                return self._stale(retry, secret_hash, end_user)
            reserve, result = fitted, retry

        # 6. the decision
        common = dict(
            request_id=request_id, owner=owner, requested_model=request.model, served_model=reserve.served_model,
            upstream_model=reserve.price.upstream_model or reserve.served_model,  # the price at hand: no lookup
            output_cap_field=_cap_field(reserve.price), stream_usage_reported=_stream_usage_reported(reserve.price),
            provider=reserve.price.provider, route=reserve.price.upstream, account=served_on,
            policy_version=policy.version if policy else 0,
            price_table_version=policy.document.price_table.version if policy else "",
            currency=policy.document.currency if policy else "",
        )
        if result.outcome == "exists":
            existing = await self.counters.read_reservation(self.counters.partition_of(owner.customer_id), request_id)
            if not result.same_key or existing is None:
                owned_id = key_owned_id(request_id, key.id)
                if request.call_token and owned_id:
                    # a gateway client's own name for its request (its Idempotency-Key, its x-policyd-request-id)
                    # that another key's request holds: each client names its requests in a space of its own,
                    # so its request is served under its key's name for the id; refused, one customer's ids
                    # would refuse another's requests
                    return await self._authorize(
                        replace(request, attribution=replace(a, request_id=owned_id)), unavailable_providers)
                return self._deny(common, "invalid_request", "request_id was already used by another request", "request_id")
            if (existing.state in ("released", "expired") and request.call_token
                    and existing.fields.get("call_token", "") != request.call_token):
                # a client trying its request again after the provider failed it, or after it gave up on it
                # (an SDK's retry, keeping its Idempotency-Key): nothing was charged, so it is served anew,
                # as an attempt of its own; refused, the client's retry would fail where it should succeed
                attempt_id = next_attempt_id(request_id)
                if attempt_id:
                    return await self._authorize(
                        replace(request, attribution=replace(a, request_id=attempt_id)), unavailable_providers)
            if existing.state != "reserved":  # a retry is answered only while its reservation is open
                return self._deny(common, "invalid_request",
                                  f"request_id was already used and is {existing.state}: use a new one", "request_id")
            if request.call_token and existing.fields.get("call_token", "") != request.call_token:
                # another client request reusing the id while the first is in flight: answered as a retry, it
                # would reach the provider on the first one's reservation and never be charged
                return self._deny(common, "request_in_progress", param="request_id")
            first = existing.record
            return Decision(
                decision=first["decision"], reserved=existing.amount, max_output_tokens=first["max_output_tokens"],
                reservation_expires_ms=existing.expires_ms, max_tool_calls=int(existing.fields.get("max_tool_calls", 0)),
                image_model=_image_model_named(policy, request.shape), **_other_models_named(policy, request.shape),
                **{**common, "served_model": first["served_model"], "provider": first["provider"],
                   "upstream_model": policy.upstream_name(first["served_model"]) if policy else first["served_model"],
                   "output_cap_field": _cap_field(policy.model(first["served_model"]) if policy else None),
                   "stream_usage_reported": _stream_usage_reported(policy.model(first["served_model"]) if policy
                                                                   else None),
                   "route": first["upstream"], "policy_version": first["policy_version"],
                   "price_table_version": first["price_table_version"]},
            )
        if result.outcome == "deny":
            reason, retry_after = result.reason, 0
            if reason == "limit":
                limit, window_end = reserve.limits_by_label[result.label]
                reason = limit_reason(limit)
                retry_after = max(1, -(-(window_end * 1000 - at) // 1000)) if window_end else 0
            elif reason == "concurrency_limit_exceeded":
                retry_after = 1
            message = preset_message if reason == preset and preset_message else MESSAGES.get(reason, "")
            return self._deny(common, reason, message, param, retry_after, result.label)
        return Decision(
            decision=decision_kind, reserved=result.reserved, max_output_tokens=reserve.output_cap,
            reservation_expires_ms=at + self.reservation_ttl_ms, shadow_denials=result.shadow,
            rate_limits=_rate_limits(reserve, result.used),
            max_tool_calls=reserve.tool_call_cap,
            image_model=_image_model_named(policy, request.shape), **_other_models_named(policy, request.shape),
            **common,
        )

    async def _screen(self, request: AuthorizeInput, at: int, started: int, base: dict[str, str]) -> Decision | str:
        """The first steps of every decision: input no policy could make sense of, a missing or malformed
        key. The recorded denial, or the hash of the key's secret to look it up by."""
        try:
            check_authorize(request)
        except Problem as problem:
            if problem.param == "request_id":
                base["request_id"] = new_request_id()
            return await self._deny_unowned(request, at, started, base, problem.reason, problem.message, problem.param)
        if not request.api_key:
            upload = gemini_upload_named(request)  # a Gemini upload's bytes (sent with no key): as its beginner's
            began_with = await self.counters.upload_key(upload) if upload else None
            if upload and began_with is None:  # its beginning's reply may still be settling
                await asyncio.sleep(STORED_RESPONSE_RECHECK_SECONDS)
                began_with = await self.counters.upload_key(upload)
            if began_with:
                return began_with
            return await self._deny_unowned(request, at, started, base, "missing_api_key")
        if not key_secrets.is_well_formed(request.api_key):
            return await self._deny_unowned(request, at, started, base, "malformed_api_key")
        return key_secrets.hash_secret(request.api_key)

    async def deny_request(self, request: AuthorizeInput, reason: str, message: str, param: str = "") -> Decision:
        """A request a proxy could not make sense of (not JSON, too large, ...): denied and recorded, as the
        key's owner's when its key is one (so a customer finds its refused requests among its records)."""
        a = request.attribution
        request_id = a.request_id if a.request_id and len(a.request_id) <= 128 else new_request_id()
        base = {"request_id": request_id, "requested_model": request.model[:256], "served_model": request.model[:256]}
        key = await self.directory.resolve(key_secrets.hash_secret(request.api_key)) \
            if key_secrets.is_well_formed(request.api_key) else None
        if key is None:
            return await self._deny_unowned(request, self.clock(), time.perf_counter_ns(), base, reason, message, param)
        owner = _owner_of(key)
        await self._record_denial(request, owner, None, None, self.clock(), time.perf_counter_ns(), base, reason, message)
        return self._deny(base | {"owner": owner}, reason, message or MESSAGES.get(reason, ""), param)

    async def admit_token_count(self, request: AuthorizeInput) -> Decision:
        """A request that only counts tokens, free at the provider (Anthropic's count_tokens, Gemini's
        countTokens, OpenAI's input_tokens; clients such as Claude Code send many), or another free call
        (OpenAI's moderations). The key, its state, the plan, the endpoint and the model are checked as
        for a model call; nothing is reserved, counted against a limit or charged. An allowed one leaves
        no record and nothing to settle; a denied one is recorded as every denial is."""
        async def check(key: KeyRecord, owner: Owner, policy: Policy, plan: Plan) -> tuple[str, str, tuple[str, ...]]:
            reason, param = self._policy_denial(request, key.scopes, owner, policy, plan)
            price = policy.model(request.model)
            return reason, param, (price.provider, price.upstream) if price else ()

        return await self._admit_free(request, check, "token_count")

    async def admit_stored_response(self, request: AuthorizeInput) -> Decision:
        """A request that reads, deletes or cancels a response the provider stored (the Responses API's
        GET/DELETE /v1/responses/{id}, its input_items, its cancel), reads, changes or deletes a
        conversation or its items (/v1/conversations/{id}...) or a chat completion kept with store: true
        (/v1/chat/completions/{id}, its messages): free at the provider. The key, its state and the plan's
        endpoint (responses, chat_completions) are checked; the response or conversation must be one made under
        the key's customer (a miss is looked for once more a moment later: the reply that made it may still
        be settling), else response_not_found or conversation_not_found (404, as the provider says of an id
        it does not know). Served on the provider account that stored it; recorded only when refused."""
        async def check(key: KeyRecord, owner: Owner, policy: Policy, plan: Plan) -> tuple[str, str, tuple[str, ...]]:
            if request.endpoint not in plan.endpoints:  # responses, or chat_completions for a stored chat
                return "endpoint_not_allowed", "", ()
            whose = await self._whose(request.stored_response)
            if whose is None:
                await asyncio.sleep(STORED_RESPONSE_RECHECK_SECONDS)
                whose = await self._whose(request.stored_response)
            found = Whose.read(whose or "")
            customer = found.customer_id
            if customer == owner.customer_id:
                # one policyd waits for: asked for first, while it is there
                if request.deletes_stored and self.background is not None:
                    await self.background.ask_now(customer, request.stored_response)
                # a Veo operation read: asked for first, so that one done is charged and its videos made its
                # customer's before the client downloads them (the read waits for it a moment; the asking goes on)
                elif request.endpoint == "videos" and self.background is not None:
                    asking = asyncio.ensure_future(self.background.ask_now(customer, request.stored_response))
                    self._asking.add(asking)
                    asking.add_done_callback(self._asking.discard)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(asking), ASK_FIRST_SECONDS)
                return "", "", (found.provider, found.route, found.account)
            return _not_found(request.stored_response), "", ()

        return await self._admit_free(request, check, "stored_response")

    async def _admit_free(self, request: AuthorizeInput, check: Callable[..., Awaitable[tuple[str, str, tuple[str, ...]]]],
                          label: str) -> Decision:
        """The common steps of a call free at the provider: the input, the key and its state, the policy
        and plan; then `check(key, owner, policy, plan)`: (denial reason or "", its param, where to serve
        it: (provider, route[, account]))."""
        started = time.perf_counter_ns()
        at = self.clock()
        request_id = request.attribution.request_id or new_request_id()
        base = {"request_id": request_id, "requested_model": request.model, "served_model": request.model}
        screened = await self._screen(request, at, started, base)
        if isinstance(screened, Decision):
            return screened
        key, status = await self._key_in_force(screened, at)
        if key is None:
            return await self._deny_unowned(request, at, started, base, "invalid_api_key")
        owner = _owner_of(key)
        policy = self.book.current
        plan = policy.plan(key.plan) if policy else None
        reason, param, where = KEY_STATE_DENIALS.get(status, ""), "", ()
        if not reason and (policy is None or plan is None):
            reason = "unknown_plan" if policy else "no_policy"
        elif not reason and policy is not None and plan is not None:
            reason, param, where = await check(key, owner, policy, plan)
        provider, route, account = (*where, "", "", "")[:3]
        common = dict(
            base, owner=owner, provider=provider, route=route, account=account,
            upstream_model=policy.upstream_name(request.model) if policy else request.model,
            policy_version=policy.version if policy else 0,
            price_table_version=policy.document.price_table.version if policy else "",
            currency=policy.document.currency if policy else "",
        )
        decision = Decision(decision="allow", **common)
        if reason:
            await self._record_denial(request, owner, policy, plan, at, started, base, reason)
            decision = self._deny(common, reason, param=param)
        metrics.decisions.labels(decision.decision, decision.reason or label).inc()
        return decision

    async def models_for(self, api_key: str) -> tuple[list[tuple[str, str]], Decision | None]:
        """The models a key may use (GET /v1/models), or the denial when the key may use none."""
        found = await self._key_asking(api_key)
        if isinstance(found, Decision):
            return [], found
        key, policy, plan = found
        return self.models_allowed(policy, plan, key.scopes, key.environment), None

    async def key_summary(self, api_key: str, end_user_id: str = "") -> tuple[KeySummary | None, Decision | None]:
        """What a key may still spend (GET /v1/key, for the key's own holder): its wallet, the current
        window of every limit that binds all its requests, with what is used, and the models it may use; and,
        for an end user of its customer it names (x-end-user-id), every limit binding that end user's requests
        (the plan's end_user limits, or the end user's own in their place)."""
        if end_user_id:
            try:
                check_end_user(end_user_id)
            except Problem as problem:
                return None, await self.deny_request(AuthorizeInput(api_key=api_key, endpoint="", model=""),
                                                     problem.reason, problem.message, problem.param)
        found = await self._key_asking(api_key)
        if isinstance(found, Decision):
            return None, found
        key, policy, plan = found
        wallet_id = redis_keys.wallet_id(key.customer_id, key.workspace_id) \
            if plan.wallet_scope == "workspace" else key.customer_id
        balance, reserved = await self.counters.wallet(wallet_id)
        own, end_user = await self._end_user_limits_in_force(key, end_user_id) if end_user_id and key.end_user_limits \
            else (key.limits, None)
        limits = key_limits.effective(plan.limits, own, policy.document.timezone, self.clock())
        ids = scope_ids(key.customer_id, key.id, key.workspace_id, key.project_id, key.team_id,
                        end_user_id=end_user_id)
        states = tuple(LimitState(s["limit"].label, s["limit"].scope, s["limit"].window, s["limit"].unit,
                                  s["limit"].limit, s["used"], s["ends"])
                       for s in await bucket_states(self.counters, limits, ids, self.clock())
                       if s["limit"].action != "shadow")
        return KeySummary(key.id, key.customer_id, key.plan, policy.document.currency,
                          None if plan.wallet == "none" else balance, reserved, states,
                          tuple(self.models_allowed(policy, plan, key.scopes, key.environment)),
                          end_user_id, bool(end_user and end_user.paused)), None

    async def describe_request(self, api_key: str, request_id: str,
                               wait_ms: int = 0) -> tuple[RequestSummary | None, Decision | None]:
        """One request of the key's customer (GET /v1/requests/{id}, for the key's own holder): what it was
        charged and used, waited for up to `wait_ms` while in progress (policyd/request_lookup.py); another
        customer's, or none, is request_not_found (404), as if it did not exist."""
        found = await self._key_asking(api_key)
        if isinstance(found, Decision):
            return None, found
        key = found[0]
        summary = None
        if 0 < len(request_id) <= request_lookup.REQUEST_ID_LENGTH_MAX and request_id.isprintable():
            summary = await request_lookup.find(self.store, self.counters, key.customer_id, request_id, wait_ms)
        if summary is None:  # a question that found nothing, not recorded (it would be among the customer's requests)
            return None, self._deny({"request_id": new_request_id(), "requested_model": "", "served_model": "",
                                     "owner": _owner_of(key)}, "request_not_found")
        return summary, None

    async def list_requests(self, api_key: str, limit: int, after: str = ""
                            ) -> tuple[tuple[list[RequestSummary], bool] | None, Decision | None]:
        """The key's customer's requests, newest first (GET /v1/requests, for the key's own holder): a page of at
        most `limit`, past the request `after`, and whether more follow; an `after` that is not one of the
        customer's requests is request_not_found (404)."""
        found = await self._key_asking(api_key)
        if isinstance(found, Decision):
            return None, found
        page = await request_lookup.recent(self.store, found[0].customer_id, limit, after)
        if page is None:
            return None, self._deny({"request_id": new_request_id(), "requested_model": "", "served_model": "",
                                     "owner": _owner_of(found[0])}, "request_not_found", param="after")
        return page, None

    async def usage_summary(self, api_key: str, group_by: list[str], since_ms: int, until_ms: int, bucket: str = "",
                            zone_name: str = ""
                            ) -> tuple[tuple[list[own_usage.UsageRow], bool, str] | None, Decision | None]:
        """The key's customer's usage summed over a window, grouped (GET /v1/usage, for the key's own holder): its
        rows, whether more were left out, and the currency of their charges (policyd/own_usage.py). Buckets are
        `zone_name`'s hours, days and months (the policy's time zone unless named)."""
        found = await self._key_asking(api_key)
        if isinstance(found, Decision):
            return None, found
        key, policy, _ = found
        try:
            rows, truncated = await own_usage.summary(self.store, key.customer_id, group_by, since_ms, until_ms,
                                                      bucket, zone_name or policy.document.timezone)
        except ReportError as error:  # a window that begins before the records kept (record retention)
            return None, self._deny({"request_id": new_request_id(), "requested_model": "", "served_model": "",
                                     "owner": _owner_of(key)}, "invalid_request", str(error), param="since")
        return (rows, truncated, policy.document.currency), None

    async def _with_end_user_limits(self, key: KeyRecord, end_user: str) -> tuple[tuple[Limit, ...], EndUserTerms]:
        """The key's own limits and its owners', with those of the end user a request names, where its customer's
        end users have limits of their own (a key without: its `limits` alone, no call here), and the terms the
        authorize script checks them by: read from SQL the first time a request names the end user, then
        remembered, "none" too, until the script finds their stamp changed (`_stale`)."""
        cached = (key.customer_id, end_user)
        found = self._end_user_limits.get(cached)
        if found is None:
            row = await asyncio.to_thread(self.store.owner_limits_of, key.customer_id, "end_user", end_user)
            found = (key_limits.as_limits(row.limits if row else ()),
                     EndUserTerms(key.customer_id, end_user, key_limits.end_user_stamp(row), bool(row and row.paused)))
            if len(self._end_user_limits) >= END_USER_LIMITS_CACHED_MAX:  # the oldest tenth forgotten
                for stale in list(self._end_user_limits)[:END_USER_LIMITS_CACHED_MAX // 10]:
                    del self._end_user_limits[stale]
            self._end_user_limits[cached] = found
        return key.limits + found[0], found[1]

    async def _end_user_limits_in_force(self, key: KeyRecord, end_user: str
                                        ) -> tuple[tuple[Limit, ...], EndUserTerms]:
        """As `_with_end_user_limits`, for a question outside the authorize script: the remembered ones checked
        against their stamp in Redis, read again when it changed."""
        own, terms = await self._with_end_user_limits(key, end_user)
        if await self.counters.stored_end_user_stamp(key.customer_id, end_user) != terms.stamp:
            self._end_user_limits.pop((key.customer_id, end_user), None)
            own, terms = await self._with_end_user_limits(key, end_user)
        return own, terms

    def _stale(self, result: AuthorizeResult, secret_hash: str, end_user: EndUserTerms | None) -> Decision:
        """The operator changed the key's terms, or the end user's own limits, since this process read them: read
        again from SQL (where the change was made first), and the request decided anew (`authorize`)."""
        if result.reason == "end_user" and end_user is not None:
            self._end_user_limits.pop((end_user.customer_id, end_user.end_user_id), None)
        else:
            self.directory.forget(secret_hash)
        return STALE

    async def _key_asking(self, api_key: str) -> tuple[KeyRecord, Policy, Plan] | Decision:
        """The key of a request about the key itself (not a model call), or the denial it gets (recorded)."""
        if not api_key:
            return await self._question_refused(api_key, "missing_api_key")
        if not key_secrets.is_well_formed(api_key):
            return await self._question_refused(api_key, "malformed_api_key")
        key, status = await self._key_in_force(key_secrets.hash_secret(api_key), self.clock())
        if key is None:
            return await self._question_refused(api_key, "invalid_api_key")
        if status in KEY_STATE_DENIALS:
            return await self._question_refused(api_key, KEY_STATE_DENIALS[status])
        policy = self.book.current
        plan = policy.plan(key.plan) if policy else None
        if policy is None or plan is None:
            return await self._question_refused(api_key, "unknown_plan" if policy else "no_policy")
        return key, policy, plan

    async def _question_refused(self, api_key: str, reason: str) -> Decision:
        """A question about a key (GET /v1/key, /v1/models, /v1/requests...) refused for its key: recorded as every
        refusal is, as the key's owner's where the key is one (a paused key's), so that keys tried in vain show."""
        return await self.deny_request(AuthorizeInput(api_key=api_key, endpoint="", model=""), reason, "")

    async def _key_in_force(self, secret_hash: str, at: int) -> tuple[KeyRecord | None, str]:
        """The key a secret opens, under its current terms, and its state (counters.key_status; "unavailable"
        when its terms changed twice while being read)."""
        for _ in range(2):
            key = await self.directory.resolve(secret_hash)
            if key is None:
                return None, "invalid"
            status = await self.counters.key_status(key.customer_id, key.id, secret_hash, at, key.terms)
            if status != "stale":
                return key, status
            self.directory.forget(secret_hash)
        return key, "unavailable"

    @staticmethod
    def models_allowed(policy: Policy, plan: Plan, scopes: tuple[str, ...], environment: str) -> list[tuple[str, str]]:
        """(model, provider) of every model a key of this plan, scopes and environment may use."""
        return [
            (name, price.provider) for name, price in sorted(policy.document.price_table.models.items())
            if not is_model_pattern(name)  # a pattern is no model a client can name
            and policy.model_allowed(plan, name, scopes) and policy.tier_allowed_in(plan, environment, name)
        ]

    def _policy_denial(self, request: AuthorizeInput, scopes: tuple[str, ...], owner: Owner, policy: Policy,
                       plan: Plan) -> tuple[str, str]:
        a = request.attribution
        for claimed, actual, name in (
            (a.customer_id, owner.customer_id, "customer_id"),
            (a.workspace_id, owner.workspace_id, "workspace_id"),
            (a.project_id, owner.project_id, "project_id"),
        ):
            if claimed and actual and claimed != actual or (claimed and not actual and name == "customer_id"):
                return "owner_mismatch", name
        if a.environment and a.environment != owner.environment:
            return "environment_not_allowed", "environment"
        if request.endpoint not in plan.endpoints:
            return "endpoint_not_allowed", "endpoint"
        if request.creates:  # names no model
            return "", ""
        if policy.model(request.model) is None:
            return "unknown_model", "model"
        if not policy.model_allowed(plan, request.model, scopes):
            return "model_not_allowed", "model"
        if not policy.tier_allowed_in(plan, owner.environment, request.model):
            return "environment_not_allowed", "model"
        if not self._input_bounded(policy, plan, request.model, request.shape):
            return "input_unbounded", "model"
        if not self._tools_priced(policy, request.model, request.shape):
            return "tool_not_priced", "tools"  # a container the provider would bill, which policyd could not charge
        if not self._tier_priced(policy, request.model, request.shape):
            asked = request.shape.service_tier  # Anthropic's: fast mode (speed), or a geography (inference_geo)
            return "service_tier_not_priced", "speed" if asked == ANTHROPIC_FAST_MODE else \
                "inference_geo" if request.endpoint == "anthropic_messages" else "service_tier"
        if request.shape.image_model_default and not request.shape.image_model:
            return "image_model_required", "tools"
        image_model = request.shape.image_model  # the image_generation tool's images: at that model's prices
        if image_model and policy.model(image_model) is None:
            return "unknown_model", "tools"
        if image_model and not (policy.model_allowed(plan, image_model, scopes)
                                and policy.tier_allowed_in(plan, owner.environment, image_model)):
            return "model_not_allowed", "tools"
        if request.shape.fallback_models or request.shape.advisor_model:
            return self._other_models_refusal(policy, plan, scopes, owner.environment, request.shape)
        return "", ""

    @staticmethod
    def _other_models_refusal(policy: Policy, plan: Plan, scopes: tuple[str, ...], environment: str,
                              shape: Shape) -> tuple[str, str]:
        """Other models the provider may run for a request, and bill (a server-side fallback, an advisor): the key's
        to use too, as its own model is; the refusal (reason, param) of the first that is not."""
        named = shape.fallbacks_param or ("models" if shape.fallbacks_routed else "fallbacks")
        others = [(m, named) for m in shape.fallback_models] + \
            ([(shape.advisor_model, "tools")] if shape.advisor_model else [])
        for other, param in others:
            if policy.model(other) is None:
                return "unknown_model", param
            if not (policy.model_allowed(plan, other, scopes) and policy.tier_allowed_in(plan, environment, other)):
                return "model_not_allowed", param
        return "", ""

    @staticmethod
    def _input_bounded(policy: Policy, plan: Plan, model: str, shape: Shape) -> bool:
        """Whether a strict plan can bound this request's input on this model: input the request only
        refers to (a previous response, a file, an image URL...) is bounded by the model's context window
        alone, unless the model bills no input tokens (an image model priced by the image)."""
        price = policy.model(model)
        return plan.reservation != "strict" or not shape.unseen_input or bool(price and price.context_window) \
            or bool(price and not price.input)

    @staticmethod
    def _tools_priced(policy: Policy, model: str, shape: Shape) -> bool:
        """Whether the model prices the hosted tools the request may have the provider bill apart: the
        containers it may make, grounding with Google Maps, a router's web search (its cost the router's to say:
        a model priced as reported, its entry's per_web_result or per_web_search bounding the hold)."""
        price = policy.model(model)
        return (not shape.containers or bool(price and shape.container_memory in price.per_container)) \
            and (not shape.maps_grounding or bool(price and price.per_maps_grounding)) \
            and (not (shape.web_results or shape.web_results_per_search) or bool(
                price and price.reported_cost and (price.per_web_result or price.per_web_search)))

    @staticmethod
    def _tier_priced(policy: Policy, model: str, shape: Shape) -> bool:
        """Whether the model prices the processing tier the request asks for (a dearer one charged at the
        standard prices would undercharge; a cheaper one, overcharge): the provider's own default need not."""
        price = policy.model(model)
        return shape.service_tier_implied or bool(price and price.prices_tier(shape.service_tier))

    @staticmethod
    def _may_serve(policy: Policy, plan: Plan, scopes: tuple[str, ...], environment: str, model: str,
                   shape: Shape) -> bool:
        """Whether a model another stands in for (a downgrade, a fallback) may serve this request: the
        checks Authorize makes of the requested model (`_policy_denial`), passed or not."""
        return policy.model_allowed(plan, model, scopes) and policy.tier_allowed_in(plan, environment, model) \
            and Engine._input_bounded(policy, plan, model, shape) and Engine._tools_priced(policy, model, shape) \
            and Engine._tier_priced(policy, model, shape)

    @staticmethod
    def _route_around(policy: Policy, plan: Plan, scopes: tuple[str, ...], environment: str, model: str,
                      shape: Shape, unavailable: frozenset[str]) -> tuple[str, str]:
        """The model to serve: the requested one, or the first fallback the plan allows while the
        requested model's provider is cooling down (429/5xx from every account)."""
        price = policy.model(model)
        if price is None or price.provider not in unavailable:
            return model, ""
        for alternative in plan.fallbacks.get(model, ()):
            alt_price = policy.model(alternative)
            if alt_price is not None and alt_price.provider not in unavailable \
                    and Engine._may_serve(policy, plan, scopes, environment, alternative, shape):
                return alternative, f"{price.provider}_cooling_down"
        return model, ""

    def _within_request_charge(self, request: AuthorizeInput, owner: Owner, policy: Policy, plan: Plan,
                               attempt: _Plan, at: int, own_limits: tuple[Limit, ...],
                               prior_tokens: int, bound: int) -> tuple[_Plan, str, str, str]:
        """A request whose hold passes the most one request may hold (`bound`: the plan's max_request_charge, or
        the lower one its caller set): (the attempt, the denial, its param, its message). With fit_output_cap,
        held with the largest output cap within the bound; else refused, the message saying what it may cost
        and what is allowed."""
        if plan.fit_output_cap and request.endpoint in FITTED_ENDPOINTS and not request.shape.output_cap_fixed \
                and not request.batch:
            cap = self._largest_output_cap(request, owner, policy, plan, attempt, "wallet", bound,
                                           at, own_limits, prior_tokens)
            if cap >= _least_fitted_cap(plan, request):
                fitted = self._attempt(_capped(request, cap), owner, policy, plan, attempt.served_model, at,
                                       skip_label=attempt.skip_label, own_limits=own_limits, prior_tokens=prior_tokens)
                fitted.fallback_reason = attempt.fallback_reason
                return fitted, "", "", ""
        currency = policy.document.currency
        allowed = (f"this API key's plan allows a single request at most {format_amount(bound)} {currency}"
                   if bound == plan.max_request_charge else
                   f"its caller allows it at most {format_amount(bound)} {currency} (x-policyd-max-charge)")
        if request.batch:
            message = (f"A request of this batch may cost up to {format_amount(attempt.request_charge)} {currency}; "
                       f"{allowed}: ask for fewer output tokens, or send less input, in each.")
            return attempt, "request_too_costly", "input_file_id" if request.files else "requests", message
        if request.endpoint == "cached_contents":  # its tokens, kept for as long as it asks to live
            message = (f"This cache may cost up to {format_amount(attempt.charge)} {currency} (its tokens kept for "
                       f"{request.shape.seconds} seconds); {allowed}: ask for a shorter time to live, or cache less.")
            return attempt, "request_too_costly", "ttl", message
        message = (f"This request may cost up to {format_amount(attempt.charge)} {currency} (its input and up to "
                   f"{attempt.output_cap} output tokens); {allowed}: ask for fewer output tokens, or send less "
                   f"input.")
        fields = OUTPUT_CAP_FIELDS.get(request.endpoint, ("",))  # the client's own, where it is one of them
        param = request.shape.output_cap_param if request.shape.output_cap_param in fields else fields[0]
        return attempt, "request_too_costly", param, message

    def _largest_output_cap(self, request: AuthorizeInput, owner: Owner, policy: Policy | None, plan: Plan,
                            reserve: _Plan, label: str, room: int, at: int, own_limits: tuple[Limit, ...],
                            prior_tokens: int) -> int:
        """The largest output cap below the one reserved whose hold in the wallet (`label` "wallet") or in the
        limit `label` is at most `room`, what it could still hold; 0 when not even the plan's least fits."""
        assert policy is not None

        def held(cap: int) -> int:
            attempt = self._attempt(_capped(request, cap), owner, policy, plan, reserve.served_model, at,
                                    skip_label=reserve.skip_label, own_limits=own_limits, prior_tokens=prior_tokens)
            if label == "wallet":
                return attempt.charge
            return next((h.amount for h in attempt.holds if h.label == label), room + 1)

        low, high = _least_fitted_cap(plan, request), reserve.output_cap - 1
        if high < low or held(low) > room:
            return 0
        while low < high:  # held(low) fits; the hold grows with the cap
            middle = (low + high + 1) // 2
            if held(middle) <= room:
                low = middle
            else:
                high = middle - 1
        return low

    def _attempt(self, request: AuthorizeInput, owner: Owner, policy: Policy, plan: Plan, model: str, at: int,
                 skip_label: str, own_limits: tuple[Limit, ...] = (), prior_tokens: int = 0) -> _Plan:
        """What reserving this request on `model` takes: its estimate, charge and the holds of the plan's
        limits, the key's own (`own_limits`) and the operator's caps. `prior_tokens`: the input a
        continuation carries unseen (the previous response's or the conversation's input and output, as
        settled), which an estimating plan reserves beside the visible input (a strict one reserves the
        model's context window for it)."""
        price = policy.model(model)
        assert price is not None, "the model was checked against the price table"
        if request.batch:  # each of a batch's requests held as it would be alone, at the batch tier: their sum
            estimate = _Estimate.total([self._estimate(replace(request, shape=line, batch=()), policy, plan, model,
                                                       price, 0) for line in request.batch])
        else:
            estimate = self._estimate(request, policy, plan, model, price, prior_tokens)
        quantities, cost, charge = estimate.quantities, estimate.cost, estimate.charge
        partition = self.counters.partition_of(owner.customer_id)
        a = request.attribution
        limits = key_limits.with_thread_budget(key_limits.effective(plan.limits, own_limits, policy.document.timezone,
                                                                    at), request.thread_budget)
        holds: list[BucketHold] = []
        by_label: dict[str, tuple[Limit | Cap, int]] = {}
        counts_only: dict[str, tuple[str, ...]] = {}
        if not request.shape.fallback_models:
            for hold, bounding, window_end in self._bounding(policy, owner, a, partition, limits, model, price,
                                                              skip_label, at, charge, quantities, cost):
                holds.append(hold)
                by_label[bounding.label] = (bounding, window_end)
        else:  # the models that may serve it (a fallback the provider may run): a limit or cap on any of them holds
            served_by = tuple(dict.fromkeys((model, *request.shape.fallback_models)))
            bound: dict[tuple[str, str], set[str]] = {}  # (bucket key, label) -> the models of served_by it counts
            for serving in served_by:
                serving_price = price if serving == model else policy.model(serving)
                assert serving_price is not None, "the model was checked against the price table"
                for hold, bounding, window_end in self._bounding(policy, owner, a, partition, limits, serving,
                                                                  serving_price, skip_label, at, charge, quantities,
                                                                  cost):
                    models = bound.setdefault((hold.key, bounding.label), set())
                    if not models:
                        holds.append(hold)
                        by_label[bounding.label] = (bounding, window_end)
                    models.add(serving)
            by_key: dict[str, set[str]] = {}  # a bucket counts a request its limits count (two limits may share one)
            for (key, _), models in bound.items():
                by_key.setdefault(key, set()).update(models)
            counts_only = {key: tuple(m for m in served_by if m in models) for key, models in by_key.items()
                           if len(models) < len(served_by)}
        return _Plan(model, price, estimate.input_tokens, estimate.output_cap, charge, holds, by_label,
                     counts_only=counts_only,
                     likely_input_tokens=estimate.likely_input_tokens, likely_seconds=estimate.likely_seconds,
                     likely_audio_tokens=estimate.likely_audio_tokens, tool_call_cap=estimate.tool_call_cap,
                     skip_label=skip_label, request_charge=estimate.request_charge or charge,
                     search_units=estimate.quantities.search_units, likely_search_units=estimate.likely_search_units)

    @staticmethod
    def _bounding(policy: Policy, owner: Owner, a: Attribution, partition: int, limits: tuple[Limit, ...], model: str,
                  price: ModelPrice, skip_label: str, at: int, charge: int, quantities: Quantities, cost: int
                  ) -> list[tuple[BucketHold, Limit | Cap, int]]:
        """The holds a request served on `model` takes: each limit binding it and each of the operator's caps on the
        model (but the one a downgrade was made for), with the limit and its window's end."""
        buckets = scope_ids(owner.customer_id, owner.api_key_id, owner.workspace_id, owner.project_id, owner.team_id,
                            a.feature, model, a.thread_id, a.end_user_id, a.tags)
        found = []
        for limit in limits:
            scope_id = buckets[limit.scope] if limit.scope != "tag" else limit_scope_id(limit, buckets)
            if not scope_id or limit.label == skip_label or not limit.binds(model, price.tier):
                continue  # a thread limit binds requests that name a thread; one on some models, those served on them
            hold, window = hold_for(limit, partition, scope_id, at // 1000, charge, quantities, cost)
            found.append((hold, limit, window.end))
        for cap in policy.caps_for(model):  # the operator's own, across every customer
            if cap.label != skip_label:
                hold, window = cap_hold(cap, at // 1000, charge, cost, quantities)
                found.append((hold, cap, window.end))
        return found

    def _estimate(self, request: AuthorizeInput, policy: Policy, plan: Plan, model: str, price: ModelPrice,
                  prior_tokens: int) -> "_Estimate":
        """The most one request on `model` may bill (its quantities, cost and charge), and what it likely bills."""
        s = request.shape
        output_cap = s.max_output_tokens or price.default_max_output_tokens or plan.default_max_output_tokens
        if price.max_output_tokens:
            output_cap = min(output_cap, price.max_output_tokens)
        input_tokens = estimate_input_tokens(plan, s.prompt_bytes, s.message_count, s.input_tokens,
                                             price.context_window, s.unseen_input)
        likely = min(input_estimate(s.prompt_bytes, s.message_count, s.input_tokens), input_tokens)
        if plan.reservation == "estimate" and prior_tokens:
            prior = min(prior_tokens, price.context_window) if price.context_window else prior_tokens
            input_tokens, likely = input_tokens + prior, likely + prior
        seconds, likely_seconds, audio_tokens, likely_audio = s.seconds, s.seconds, 0, 0
        speech_output = 0  # audio tokens out of text to speech billed by tokens: every one up to the cap
        image_input = 0  # input tokens an edit's images may be (every one, when they are priced dearer)
        search_units = likely_search_units = 0  # a rerank's, where its model prices them
        if request.endpoint == "audio_speech" and price.prices_output:  # its text's tokens in, not characters
            text_bytes = s.prompt_bytes or s.input_tokens  # a native caller may send the characters alone
            input_tokens = estimate_input_tokens(plan, text_bytes, 1, 0, price.context_window)
            likely = min(input_estimate(text_bytes, 1, 0), input_tokens)
            speech_output = output_cap
        elif request.endpoint in ("embeddings", "audio_speech"):  # no output tokens to cap
            output_cap = 0
        elif request.endpoint == "rerank":  # scores out, no output tokens; billed by search units or by tokens
            output_cap = 0
            if price.per_search_unit:
                search_units = rerank_search_units(s.documents, s.document_bytes, s.document_tokens_max,
                                                   price.context_window)
                likely_search_units = rerank_search_units_likely(s.documents)
        elif request.endpoint == "images":  # no cap to give either: each image bills up to the model's most
            output_cap = (price.output_tokens_per_image or output_cap) * (s.image_count or 1) * max(1, s.image_scale)
            if s.unseen_input and price.image_input_price > price.input:  # input images, at their dearer price
                image_input = input_tokens
        elif request.endpoint == "videos":  # Veo's: its videos' seconds, each as long as asked; no output tokens
            output_cap = 0
            seconds = likely_seconds = s.seconds * max(1, s.image_count)
        elif request.endpoint == "cached_contents":  # an explicit cache: its input written, kept as long as asked
            output_cap = seconds = 0  # (likely_seconds: the time it is to live, for a Settle without its reply)
            if request.cache_update:  # its time to live changed: none written, its tokens kept up to that long more
                input_tokens = likely = 0
        elif request.endpoint == "audio_transcriptions":  # the audio's seconds, or its audio tokens, and text out
            seconds = audio_seconds(plan, s.seconds, s.audio_bytes, price.max_audio_seconds)
            likely_seconds = audio_seconds_likely(s.seconds, s.audio_bytes)
            if not price.per_second:  # billed by audio tokens
                audio_tokens = seconds * AUDIO_TOKENS_PER_SECOND
                input_tokens += audio_tokens
                likely_audio = likely_seconds * AUDIO_TOKENS_PER_SECOND
                likely += likely_audio
        # search tools the request leaves unbounded: each reserved at the plan's default, which the request
        # then carries where it can (Gemini's search takes no bound)
        searches_bound = plan.default_max_tool_calls \
            if s.unbounded_web_search_tools or s.unbounded_file_search or s.web_results_per_search else 0
        tool_call_cap = searches_bound if request.endpoint in TOOL_BOUND_ENDPOINTS or s.web_results_per_search else 0
        # a router's web search: its results, and as many searches (each returns one at least), where the request
        # bounds them (in s.web_searches); its server tool given no bound, the plan's searches of its results each
        # (their total set in the request)
        unbounded_results = searches_bound * s.web_results_per_search
        # a chat model that searches as it will (Perplexity's Sonar Deep Research) is held for the searches its
        # price table entry says; its reasoning, billed beside its output at a price of its own, takes no bound
        # from the request either: held at the output cap
        chat_searches = price.searches_held if request.endpoint == "chat_completions" else 0
        reasoning = output_cap * max(1, s.choices) \
            if request.endpoint == "chat_completions" and price.reasoning_output is not None else 0
        spoken = s.audio_output and price.audio_output_price > price.output
        tier = held_tier(price, s.service_tier, s.geo)
        quantities = Quantities(
            input_tokens=input_tokens,
            # every choice may reach the cap, and all are billed
            output_tokens=output_cap * max(1, s.choices) + reasoning, reasoning_output_tokens=reasoning,
            images=(s.image_count or 1) if request.endpoint == "images" else 0,
            seconds=seconds, web_searches=s.web_searches + s.unbounded_web_search_tools * searches_bound
            + chat_searches + unbounded_results, web_results=s.web_results + unbounded_results,
            search_context_size=s.search_context_size,
            file_searches=s.file_searches + (searches_bound if s.unbounded_file_search else 0), service_tier=tier,
            audio_input_tokens=audio_tokens,
            # a spoken reply: every output token may be audio, at its own price (when the dearer)
            audio_output_tokens=output_cap * max(1, s.choices) if spoken else speech_output,
            image_input_tokens=image_input,
            # a model pricing its images out dearer (Gemini's image models): every output token may be an image's
            image_output_tokens=output_cap * max(1, s.choices) if not spoken and not speech_output
            and price.image_output_price > price.output else 0,
            containers=s.containers, container_memory=s.container_memory, maps_groundings=int(s.maps_grounding),
            search_units=search_units,
            cache_storage_token_seconds=(request.cache_tokens if request.cache_update else input_tokens) * s.seconds
            if request.endpoint == "cached_contents" else 0,
            cache_write_input_tokens=input_tokens if request.endpoint == "cached_contents" else 0,  # all of a cache's
        )
        cost = cost_of(price, quantities)
        # the whole prompt may be written to the cache, at the write price: reserved so if dearer (OpenAI's
        # prompts all may be: a table that prices no write apart needs no second look)
        if s.cache_write and price.prices_cache_writes:
            writes = input_tokens - audio_tokens
            written = replace(quantities, cache_write_input_tokens=writes,
                              cache_write_1h_input_tokens=writes if s.cache_write == "1h" else 0)
            if cost_of(price, written) > cost:
                quantities, cost = written, cost_of(price, written)
        billing = billing_of(plan, request.attribution.feature)
        charge = charge_of(plan, model, quantities, cost, billing)
        if s.image_model:  # the image_generation tool's calls, each at most an image and its partials
            calls = s.image_generation_calls or plan.default_max_tool_calls
            if not s.image_generation_calls and request.endpoint in TOOL_BOUND_ENDPOINTS:
                tool_call_cap = max(tool_call_cap, calls)
            images, images_cost, images_charge = self._image_generation(
                policy, plan, s.image_model, billing, input_tokens=calls * input_tokens,
                output_tokens=calls * (self._tokens_per_image(policy, plan, s.image_model) * max(1, s.image_scale)
                                       + s.partial_images * PARTIAL_IMAGE_OUTPUT_TOKENS), reserve=True)
            quantities, cost, charge = replace(quantities, tool_tokens=images.tokens), cost + images_cost, \
                charge + images_charge
        if s.fallbacks_routed and s.fallback_models:  # a router's: the one that serves is billed, held as the dearest
            return self._dearest_routed(request, policy, plan, prior_tokens, s.max_output_tokens or output_cap,
                                        _Estimate(output_cap, input_tokens, likely, likely_seconds, likely_audio,
                                                  tool_call_cap, quantities, cost, charge,
                                                  likely_search_units=likely_search_units))
        if s.fallback_models or s.advisor_model:  # other models' work the provider may bill beside it
            others, others_cost, others_charge, calls = self._other_models_held(policy, plan, billing, s, input_tokens,
                                                                              output_cap)
            if s.advisor_model and not s.advisor_calls and request.endpoint in TOOL_BOUND_ENDPOINTS:
                tool_call_cap = max(tool_call_cap, calls)
            quantities, cost, charge = replace(quantities, tool_tokens=quantities.tool_tokens + others), \
                cost + others_cost, charge + others_charge
        return _Estimate(output_cap, input_tokens, likely, likely_seconds, likely_audio, tool_call_cap, quantities,
                         cost, charge, likely_search_units=likely_search_units)

    def _dearest_routed(self, request: AuthorizeInput, policy: Policy, plan: Plan, prior_tokens: int, cap: int,
                        own: "_Estimate") -> "_Estimate":
        """A request with a router's fallbacks (OpenRouter's `models`) as the hold of the dearest of it on each model:
        the router bills the one that serves alone. Each fallback is the whole request on that model, its output cap
        the one sent (`cap`: the client's, or the one the proxy writes) within the model's max_output_tokens; the
        output cap and the likely figures stay the model's own."""
        alone = replace(request, shape=replace(request.shape, fallback_models=(), fallbacks_routed=False,
                                               max_output_tokens=cap))
        dearest = own
        for model in request.shape.fallback_models:
            price = policy.model(model)
            assert price is not None, "the fallback was checked against the price table"
            other = self._estimate(alone, policy, plan, model, price, prior_tokens)
            extra_tokens = max(0, other.quantities.tokens - dearest.quantities.tokens)
            dearest = replace(dearest, cost=max(dearest.cost, other.cost), charge=max(dearest.charge, other.charge),
                              quantities=replace(dearest.quantities,
                                                 tool_tokens=dearest.quantities.tool_tokens + extra_tokens))
        return dearest

    @staticmethod
    def _other_models_held(policy: Policy, plan: Plan, billing: str, s: Shape, input_tokens: int,
                           output_cap: int) -> tuple[int, int, int, int]:
        """What other models the provider may run for a request hold (their tokens, cost, charge, and the advisor's
        calls held): each server-side fallback the whole request again (its input and output cap), at its
        prices; each advisor call the conversation so far (the input and the output cap) and its own output, at
        the advisor's prices, for the calls the tool allows (none given: the plan's default_max_tool_calls)."""
        held: list[tuple[str, Quantities]] = [(m, Quantities(input_tokens=input_tokens, output_tokens=output_cap,
                                                             requests=0)) for m in s.fallback_models]
        calls = 0
        if s.advisor_model:
            price = policy.model(s.advisor_model)
            assert price is not None, "the advisor model was checked against the price table"
            calls = s.advisor_calls or plan.default_max_tool_calls
            advice = s.advisor_max_tokens or price.max_output_tokens or price.default_max_output_tokens \
                or plan.default_max_output_tokens
            held.append((s.advisor_model, Quantities(input_tokens=calls * (input_tokens + output_cap),
                                                     output_tokens=calls * advice, requests=0)))
        tokens = cost = charge = 0
        for model, q in held:
            price = policy.model(model)
            assert price is not None, "the model was checked against the price table"
            model_cost = cost_of(price, q)
            tokens, cost, charge = tokens + q.tokens, cost + model_cost, charge + charge_of(plan, model, q, model_cost,
                                                                                            billing)
        return tokens, cost, charge, calls

    @staticmethod
    def _parts_priced(policy: Policy, plan: Plan, served: str, price: ModelPrice, report: UsageReport,
                      quantities: Quantities, billing: str) -> tuple[int, int, dict[str, list[int]], bool]:
        """A report's parts (usage.iterations), each priced by itself at the model that ran it (a long-context
        tier by its own input), beside the rest of the request (its searches, its fee) at the served model's:
        the cost, the charge, the other models' [cost, tokens] (billed by the provider under each), and whether
        the table priced every part's model."""
        rest = replace(quantities, **{name: 0 for name in PART_TOKEN_FIELDS})
        cost = cost_of(price, rest)
        charge = charge_of(plan, served, rest, cost, billing)
        others: dict[str, list[int]] = {}
        every_priced = True
        for part in report.parts:
            model, priced = policy.part_model(served, part.model)
            every_priced = every_priced and priced
            part_price = policy.model(model) if model != served else price
            assert part_price is not None, "part_model names a model the table prices"
            q = Quantities(**{name: getattr(part, name) for name in PART_TOKEN_FIELDS}, requests=0,
                           service_tier=report.service_tier)
            part_cost = cost_of(part_price, q)
            cost, charge = cost + part_cost, charge + charge_of(plan, model, q, part_cost, billing)
            if model != served:
                figures = others.setdefault(model, [0, 0])
                figures[0], figures[1] = figures[0] + part_cost, figures[1] + part.input_tokens + part.output_tokens
        return cost, charge, others, every_priced

    @staticmethod
    def _tokens_per_image(policy: Policy, plan: Plan, image_model: str) -> int:
        """The most output tokens one image of this model bills (as the images endpoint reserves it)."""
        price = policy.model(image_model)
        assert price is not None, "the image model was checked against the price table"
        return price.output_tokens_per_image or price.max_output_tokens or plan.default_max_output_tokens

    @staticmethod
    def _image_generation(policy: Policy, plan: Plan, image_model: str, billing: str, input_tokens: int = 0,
                          cached_input_tokens: int = 0, image_input_tokens: int = 0, output_tokens: int = 0,
                          reserve: bool = False) -> tuple[Quantities, int, int]:
        """The image_generation tool's quantities, cost and charge at its image model's prices (the
        plan's price list for that model, when it has one). Reserved (`reserve`): input at the dearer
        of the model's text and image input prices, since what the tool is given may be either."""
        price = policy.model(image_model)
        assert price is not None, "the image model was checked against the price table"
        if reserve and price.image_input_price > price.input:
            image_input_tokens = input_tokens
        quantities = image_generation_quantities(input_tokens, cached_input_tokens, image_input_tokens, output_tokens)
        cost = cost_of(price, quantities)
        return quantities, cost, charge_of(plan, image_model, quantities, cost, billing)

    @classmethod
    def _images_made(cls, policy: Policy, plan: Plan, record: dict[str, Any], report: UsageReport,
                     image_scale: int = 1) -> tuple[UsageReport, Quantities, int, int]:
        """The image_generation tool's usage at Settle (a report that has some), at the prices of the image
        model the request reserved for: calls reported without tokens are an image at the model's most each
        (of the size and frames held: `image_scale`). Usage of a tool the request reserved no image model
        for (a stored prompt's tools, which the body does not show) cannot be priced: recorded as
        reported, marked, and the rest of the request charged."""
        image_model = record.get("image_model") or ""
        if not image_model or policy.model(image_model) is None:
            return replace(report, error_class=report.error_class or "image_generation_unpriced"), \
                Quantities(requests=0), 0, 0
        made = report.image_generation_output_tokens or \
            report.image_generation_calls * cls._tokens_per_image(policy, plan, image_model) * image_scale
        images, cost, charge = cls._image_generation(
            policy, plan, image_model, record["billing_mode"], report.image_generation_input_tokens,
            report.image_generation_cached_input_tokens, report.image_generation_image_input_tokens, made)
        return replace(report, image_generation_output_tokens=made), images, cost, charge

    async def _reserve(self, request: AuthorizeInput, request_id: str, secret_hash: str, terms: str, owner: Owner,
                       policy: Policy | None, plan: Plan | None, attempt: _Plan, preset: str, at: int,
                       started: int, decision: str = "allow", end_user: EndUserTerms | None = None) -> Any:
        record = self._record(request, request_id, owner, policy, plan, attempt, at, started, decision)
        limit_reasons = {label: limit_reason(limit) for label, (limit, _) in attempt.limits_by_label.items()}
        # the record is encoded once, for the event and for the reservation
        record_json = compact_json.dumps(record)
        wallet = record["wallet_id"]
        fields = {"record": record, "input_tokens_estimate": attempt.likely_input_tokens,
                  "seconds_estimate": attempt.likely_seconds, "audio_tokens_estimate": attempt.likely_audio_tokens}
        extra = f',"conversation":{compact_json.dumps(request.conversation)}' if request.conversation else ""
        if request.conversation:
            fields["conversation"] = request.conversation
        if attempt.tool_call_cap:  # a retry is answered with the same bound
            fields["max_tool_calls"] = attempt.tool_call_cap
            extra += f',"max_tool_calls":{int(attempt.tool_call_cap)}'
        if request.shape.image_model and request.shape.image_scale > 1:  # an image at Settle with no usage: as held
            fields["image_scale"] = request.shape.image_scale
            extra += f',"image_scale":{int(request.shape.image_scale)}'
        if request.endpoint == "videos":  # each video's seconds: the videos its operation made are charged so
            fields["video_seconds"] = request.shape.seconds
            extra += f',"video_seconds":{int(request.shape.seconds)}'
        if request.cache_update:  # a cache's time to live changed: charged past the life charged before
            fields["cache_tokens"], fields["cache_kept_seconds"] = request.cache_tokens, request.cache_kept_seconds
            fields["cache_name"] = request.previous_response
            extra += (f',"cache_tokens":{int(request.cache_tokens)},'
                      f'"cache_kept_seconds":{int(request.cache_kept_seconds)},'
                      f'"cache_name":{compact_json.dumps(request.previous_response)}')
        if request.endpoint == "images":  # the images asked for: charged as held if the client leaves first
            fields["images"] = max(1, request.shape.image_count)
            extra += f',"images":{int(max(1, request.shape.image_count))}'
        if attempt.search_units:  # a rerank's search units: as held if the client leaves first, else the fewest
            fields["search_units"], fields["search_units_likely"] = attempt.search_units, attempt.likely_search_units
            extra += (f',"search_units":{int(attempt.search_units)},'
                      f'"search_units_likely":{int(attempt.likely_search_units)}')
        if request.shape.fallback_models:  # a reply may name one by a name the table does not hold: served as it
            fields["fallbacks"] = list(request.shape.fallback_models)
            extra += f',"fallbacks":{compact_json.dumps(fields["fallbacks"])}'
        web_results = request.shape.web_results + attempt.tool_call_cap * request.shape.web_results_per_search
        if web_results:  # a router's web search results: charged as held when the router says no cost
            fields["web_results"] = web_results
            extra += f',"web_results":{int(web_results)}'
        if request.shape.search_context_size:  # the size it asked its search for: charged at it when none reported
            fields["search_context_size"] = request.shape.search_context_size
            extra += f',"search_context_size":{compact_json.dumps(request.shape.search_context_size)}'
        if request.shape.geo:  # the geography its endpoint runs it in (Vertex AI's regions): charged at its prices
            fields["geo"] = request.shape.geo
            extra += f',"geo":{compact_json.dumps(request.shape.geo)}'
        if request.shape.service_tier and not request.shape.service_tier_implied:
            # the tier it asked for (flex, priority, a batch's): charged at it when no usage says otherwise
            fields["service_tier"] = request.shape.service_tier
            extra += f',"service_tier":{compact_json.dumps(request.shape.service_tier)}'
        if request.charge_held_on_expiry:  # on its way to the provider: its deadline charges it (expire_due)
            fields["charge_held_on_expiry"] = 1
            extra += ',"charge_held_on_expiry":1'
        if request.call_token:  # a retry of this Authorize carries it; another request reusing the id does not
            fields["call_token"] = request.call_token
            extra += f',"call_token":{compact_json.dumps(request.call_token)}'
        facts_json = (f'{{"input_tokens_estimate":{int(attempt.likely_input_tokens)},'
                      f'"seconds_estimate":{int(attempt.likely_seconds)},'
                      f'"audio_tokens_estimate":{int(attempt.likely_audio_tokens)}{extra}}}')
        fields_json = f'{{"record":{record_json},{facts_json[1:]}'
        # the facts beside the record go to SQL with the event too: a rebuild of the counters restores them
        payload = (f'{{"record":{record_json},"limit_reasons":{compact_json.dumps(limit_reasons)},'
                   f'"facts":{facts_json}}}')
        partition = self.counters.partition_of(owner.customer_id)
        try:
            result = await self.counters.authorize(
                partition=partition, request_id=request_id,
                key_id=owner.api_key_id, customer_id=wallet, secret_hash=secret_hash, now_ms=at,
                expires_ms=at + self.reservation_ttl_ms,
                check_wallet=plan is not None and plan.wallet == "required",
                amount=attempt.charge, concurrency_cap=plan.concurrency if plan else 0,
                payload=payload, reservation_fields=fields_json,
                preset_denial=preset, terms=terms, buckets=attempt.holds, end_user=end_user,
            )
            if result.outcome == "allow":
                self.counters.remember(Reservation(request_id, partition, "reserved", result.reserved,
                                                   at + self.reservation_ttl_ms, fields, record_json))
            return result
        except Exception as error:
            if unreachable(error):
                log.error("counters unavailable during authorize of %s: %s", request_id, type(error).__name__)
                return None
            raise

    def _record(self, request: AuthorizeInput, request_id: str, owner: Owner, policy: Policy | None,
                plan: Plan | None, attempt: _Plan, at: int, started: int, decision: str) -> dict[str, Any]:
        a = request.attribution
        record: dict[str, Any] = {
            "request_id": request_id, "created_ms": at, "trace_id": a.trace_id, "traceparent": a.traceparent,
            "customer_id": owner.customer_id, "workspace_id": owner.workspace_id, "project_id": owner.project_id,
            "team_id": owner.team_id, "api_key_id": owner.api_key_id, "plan": owner.plan,
            "wallet_id": redis_keys.wallet_id(owner.customer_id, owner.workspace_id)
            if plan is not None and plan.wallet_scope == "workspace" else owner.customer_id,
            "environment": owner.environment,
            "claimed": {k: v for k, v in (("customer_id", a.customer_id), ("workspace_id", a.workspace_id),
                                           ("project_id", a.project_id), ("environment", a.environment)) if v},
            "end_user_id": a.end_user_id, "agent_id": a.agent_id, "thread_id": a.thread_id, "feature": a.feature,
            "route": a.route, "tags": dict(a.tags), "endpoint": request.endpoint,
            "requested_model": request.model, "primary_model": request.model, "served_model": attempt.served_model,
            "fallback_reason": attempt.fallback_reason,
            "provider": attempt.price.provider, "upstream": attempt.price.upstream, "decision": decision,
            "policy_version": policy.version if policy else 0,
            "price_table_version": policy.document.price_table.version if policy else "",
            "billing_mode": billing_of(plan, a.feature) if plan else "",
            "reservation_mode": plan.reservation if plan else "",
            "currency": policy.document.currency if policy else "",
            "max_output_tokens": attempt.output_cap,
            "holds": _buckets_held(attempt.holds, attempt.counts_only),
            "decision_latency_us": (time.perf_counter_ns() - started) // 1000,
            "client_address": request.client_address, "user_agent": request.user_agent,
        }
        if request.shape.choices > 1:  # only then: a writer from before the column still writes every other record
            record["choices"] = request.shape.choices
        if request.shape.image_model:  # ... and so (its images are priced at that model's prices at Settle)
            record["image_model"] = request.shape.image_model
        if request.shape.containers:  # the containers it may make: the most charged at Settle, and their memory
            record["containers"], record["container_memory"] = request.shape.containers, request.shape.container_memory
        return record

    async def _deny_unowned(self, request: AuthorizeInput, at: int, started: int, base: dict[str, str],
                            reason: str, message: str = "", param: str = "") -> Decision:
        """A denial before any owner is known: recorded in the partition of the request id."""
        await self._record_denial(request, Owner(), None, None, at, started, base, reason, message)
        return self._deny(base | {"owner": Owner()}, reason, message or MESSAGES.get(reason, ""), param)

    async def _record_denial(self, request: AuthorizeInput, owner: Owner, policy: Policy | None, plan: Plan | None,
                             at: int, started: int, base: dict[str, str], reason: str, message: str = "") -> None:
        """Record a denial no counter script made (it moved no counter): in the owner's partition, or the
        request id's when no owner is known."""
        request_id = base["request_id"]
        record = self._record(request, request_id, owner, policy, plan, _Plan.empty(request.model), at, started, "deny")
        record.update(decision="deny", reason=reason, message=message or MESSAGES.get(reason, ""), status="denied")
        await self._emit(self.counters.partition_of(owner.customer_id or request_id), "authorize", request_id, at,
                         {"outcome": "deny", "reason": reason, "label": "", "reserved": "0"},
                         {"record": _truncated(record), "limit_reasons": {}})

    def _deny(self, common: dict[str, Any], reason: str, message: str = "", param: str = "",
              retry_after: int = 0, label: str = "") -> Decision:
        message = message or MESSAGES.get(reason, reason)
        if label and label not in ("wallet", "concurrency"):
            message = f"{message} ({label})"
        return Decision(
            decision="deny", reason=reason, message=message, http_status=reasons.http_status(reason),
            error_type=reasons.error_type(reason), error_param=param, retry_after_seconds=retry_after,
            **common,
        )

    async def _counters_down(self, request: AuthorizeInput, request_id: str, base: dict[str, str], owner: Owner,
                             policy: Policy | None, plan: Plan | None, attempt: _Plan, at: int,
                             started: int) -> Decision:
        """Redis cannot be reached: deny (fail closed, the default) or allow without a reservation
        (fail open). Either way the decision is written to SQL directly, since the stream is away."""
        common = {**base, "owner": owner, "policy_version": policy.version if policy else 0}
        fail_open = self.failure_mode == "open"
        record = self._record(request, request_id, owner, policy, plan, attempt, at, started,
                              "allow" if fail_open else "deny")
        record.update(status="unmetered" if fail_open else "denied", reason="counters_unavailable", holds=[],
                      message="counters unavailable: " + ("allowed without a reservation" if fail_open else "denied"))
        try:
            await asyncio.to_thread(self.store.insert_records, [record])
        except Exception:
            log.exception("could not record %s while the counters are unavailable", request_id)
        if fail_open:
            log.warning("counters unavailable: allowing %s unreserved (fail open)", request_id)
            return Decision(decision="allow", reason="counters_unavailable_fail_open", **common)
        return self._deny(common, "counters_unavailable", retry_after=1)

    async def _emit(self, partition: int, kind: str, request_id: str, at: int, fields: dict[str, str],
                    data: dict[str, Any]) -> None:
        """Append an event that moves no counter (denials before the owner is known, rejections)."""
        body = {"type": kind, "rid": request_id, "at": str(at), **fields,
                "d": json.dumps(data, separators=(",", ":"), default=str)}
        try:
            await self.counters.client.xadd(redis_keys.events(partition), body)
        except Exception as error:
            log.error("stream unavailable (%s): recording %s of %s in SQL directly", type(error).__name__, kind,
                      request_id)
            try:
                if kind == "authorize":
                    await asyncio.to_thread(self.store.insert_records, [data["record"]])
                else:
                    await asyncio.to_thread(self.store.insert_event, {
                        "id": f"direct-{new_request_id()}", "kind": kind, "request_id": request_id,
                        "customer_id": "", "detail": {**fields, **data}, "created_ms": at})
            except Exception:
                log.exception("could not record %s of %s", kind, request_id)

    async def reject(self, request_id: str, partition: int | None, reason: str, message: str,
                      detail: dict[str, Any]) -> PolicydError:
        status = {
            "invalid_usage": "INVALID_ARGUMENT", "invalid_request": "INVALID_ARGUMENT", "unknown_model": "INVALID_ARGUMENT",
            "unknown_request": "NOT_FOUND", "request_denied": "FAILED_PRECONDITION",
            "already_released": "FAILED_PRECONDITION", "already_expired": "FAILED_PRECONDITION",
            "exists_with_different_usage": "ALREADY_EXISTS",
            "currency_mismatch": "INVALID_ARGUMENT",
        }.get(reason, "INVALID_ARGUMENT")
        safe_id = request_id if request_id and len(request_id) <= 128 else ""
        await self._emit(partition if partition is not None else self.counters.partition_of(safe_id), "rejected",
                         safe_id, self.clock(), {"reason": reason, "message": message[:512]}, _truncated(detail))
        return PolicydError(status, reason, message)

    # ------------------------------------------------------------------ settle
    async def settle(self, report: UsageReport, reservation: Reservation | None = None) -> Settlement:
        """`reservation`: when the caller already found it (settle_estimated), so it is not looked up twice."""
        started = time.perf_counter()
        try:
            settlement = await self._settle(report, reservation)
        except PolicydError as error:
            metrics.rejections.labels(error.reason).inc()
            raise
        metrics.settle_seconds.observe(time.perf_counter() - started)
        metrics.settlements.labels(settlement.outcome).inc()
        if settlement.outcome != "exists":
            metrics.charged_nanos.inc(settlement.charge)
        return settlement

    async def _settle(self, report: UsageReport, found: Reservation | None = None) -> Settlement:
        try:
            check_usage(report)
        except Problem as problem:
            raise await self.reject(report.request_id, None, problem.reason, problem.message, asdict(report))
        if report.parts:  # its tokens are its parts' sums
            report = replace(report, **{name: sum(getattr(part, name) for part in report.parts)
                                        for name in PART_TOKEN_FIELDS})
        reservation = found or await self.counters.find_reservation(report.request_id)
        if reservation is None:
            raise await self.missing(report.request_id, "settle", asdict(report))
        r = reservation.record
        if r.get("endpoint") == "audio_speech":  # text to speech makes audio alone: every output token is audio
            report = replace(report, audio_output_tokens=report.output_tokens)
        policy = await self.book.version(int(r["policy_version"]))
        plan = policy.plan(r["plan"]) if policy else None
        served = report.served_model or r["served_model"]
        if policy is not None and served == policy.upstream_name(r["served_model"]):
            served = r["served_model"]  # the model authorized, by the name it was sent upstream with
        asked = served
        if policy is not None and report.reply_model:  # the provider served another model it names: billed as it
            served = policy.served_as(served, report.reply_model, tuple(reservation.fields.get("fallbacks") or ()))
        fell_back = [part.model for part in report.parts if part.kind == "fallback_message" and part.model]
        # the provider served another model than it was sent: a router's fallback, Anthropic's server-side one
        provider_fell_back = served != asked or any(part.kind == "fallback_message" for part in report.parts)
        if policy is not None and fell_back:  # a server-side fallback wrote it: that model, by whichever name it has
            model, priced = policy.part_model(served, fell_back[-1])
            served = model if priced else served
        price = (policy.model(served) if served else _created_at(r.get("provider"))) if policy else None
        if report.reported_cost_currency and report.reported_cost_currency != r.get("currency"):
            raise await self.reject(report.request_id, reservation.partition, "invalid_usage",
                                    f"reported_cost is in {report.reported_cost_currency[:8]!r}, the request's "
                                    f"money in {r.get('currency')!r}", asdict(report))
        if policy is None or plan is None or price is None:
            raise await self.reject(report.request_id, reservation.partition, "unknown_model",
                                     f"model {served!r} is not in price table {r['price_table_version']!r}", asdict(report))
        if geo := reservation.fields.get("geo"):  # the geography its endpoint ran it in, which its reply does not say
            report = replace(report, service_tier=held_tier(price, report.service_tier, str(geo)))
        if not price.prices_tier(report.service_tier):  # served on a tier the table does not price: at the
            # model's own prices, marked (a project's default tier, which no request names)
            report = replace(report, error_class=report.error_class or "service_tier_unpriced")
        # containers: those the request asked the provider to make, at most (one it only reused is no new one)
        if report.containers and report.containers > int(r.get("containers") or 0):
            report = replace(report, containers=int(r.get("containers") or 0))
        if not report.search_units and reservation.fields.get("search_units_likely"):
            # a rerank on a model priced per search unit, its count not reported (Bedrock's rerankers give none):
            # the fewest its documents bill, a search unit a hundred
            report = replace(report, search_units=int(reservation.fields["search_units_likely"]))
        if r.get("endpoint") == "videos" and report.images and not report.seconds:
            # the videos its operation made (Veo's), each as long as asked: their seconds are what is billed
            report = replace(report, seconds=report.images * int(reservation.fields.get("video_seconds") or 0))
        cache = (0, 0)  # an explicit cache made or kept longer: its tokens, and its life from its making
        if r.get("endpoint") == "cached_contents":
            report, cache = _cache_storage(report, reservation)
        if price.per_search_context:  # its search's context size as reported, else as asked, else the default
            report = replace(report, search_context_size=report.search_context_size or str(
                reservation.fields.get("search_context_size") or "") or price.search_context_default)
        quantities = Quantities(
            input_tokens=report.input_tokens, cached_input_tokens=report.cached_input_tokens,
            cache_write_input_tokens=report.cache_write_input_tokens,
            output_tokens=report.output_tokens, images=report.images, seconds=report.seconds,
            requests=report.requests or 1, web_searches=report.web_searches, file_searches=report.file_searches,
            audio_input_tokens=report.audio_input_tokens, audio_output_tokens=report.audio_output_tokens,
            cache_write_1h_input_tokens=report.cache_write_1h_input_tokens, service_tier=report.service_tier,
            image_input_tokens=report.image_input_tokens, image_output_tokens=report.image_output_tokens,
            containers=report.containers, container_memory=r.get("container_memory") or "",
            maps_groundings=report.maps_groundings, search_units=report.search_units,
            search_context_size=report.search_context_size, reasoning_output_tokens=report.reasoning_output_tokens,
            cache_storage_token_seconds=report.cache_storage_token_seconds,
        )
        other_models: dict[str, list[int]] = {}
        if report.parts:  # each part at its own model's prices, the rest (searches, a request's fee) at the served's
            cost, charge, other_models, priced = self._parts_priced(policy, plan, served, price, report, quantities,
                                                                    r["billing_mode"])
            if not priced:  # a part of a model the table does not price for its provider: at the served model's
                report = replace(report, error_class=report.error_class or "part_model_unpriced")
        else:
            cost = cost_of(price, quantities)
            charge = charge_of(plan, served, quantities, cost, r["billing_mode"])
        images_cost = 0
        if report.image_generation_calls or report.image_generation_input_tokens or report.image_generation_output_tokens:
            report, images, images_cost, images_charge = self._images_made(
                policy, plan, r, report, int(reservation.fields.get("image_scale") or 1))
            quantities, cost, charge = replace(quantities, tool_tokens=images.tokens), cost + images_cost, \
                charge + images_charge
        # what the provider says it charged is the cost of a model priced so (a router's routes are priced apart),
        # served on it or sent as it (openrouter/auto's pick of another model of the table)
        if price.reported_cost or (served != r["served_model"] and _reports_cost(policy, r["served_model"])):
            if report.reported_cost is not None:
                cost = report.reported_cost
                charge = charge_of(plan, served, quantities, cost, r["billing_mode"])
            else:  # none said (a stream cut before its usage): its tokens at the table's prices, marked, and a
                # router's web search results as held (its web plugin returns as many as it asks for)
                report = replace(report, error_class=report.error_class or "cost_not_reported")
                if held_results := int(reservation.fields.get("web_results") or 0):
                    quantities = replace(quantities, web_results=held_results)
                    cost += cost_of(price, Quantities(requests=0, web_results=held_results))
                    charge = charge_of(plan, served, quantities, cost, r["billing_mode"])
        numbers = [report.input_tokens, report.cached_input_tokens, report.output_tokens, report.images,
                   report.seconds, report.requests or 1, served, report.cache_write_input_tokens]
        later = [getattr(report, name) for name in LATER_USAGE_FIELDS]
        if any(later):  # only then: a retried Settle fingerprints the same on a replica from before these fields
            numbers += later
        if report.parts:
            numbers.append([list(astuple(part)) for part in report.parts])
        if report.reported_cost is not None:
            numbers.append(["reported_cost", report.reported_cost])
        fingerprint = hashlib.sha256(json.dumps(numbers).encode()).hexdigest()[:32]
        deltas = []
        final_holds = []
        for key, unit, held, *only in r["holds"]:  # a bucket counting only some models' serving: nothing for another's
            actual = amount_for(unit, charge, cost, quantities) if not only or served in only[0] else 0
            deltas.append((key, actual - held, actual))
            final_holds.append([key, unit, actual])
        settlement = {
            "served_model": served, "provider": report.provider or price.provider,
            "input_tokens": report.input_tokens, "cached_input_tokens": report.cached_input_tokens,
            "cache_write_input_tokens": report.cache_write_input_tokens,
            "output_tokens": report.output_tokens, "images": report.images, "seconds": report.seconds,
            "request_count": report.requests or 1, "retries": report.retries,
            "upstream_status": report.upstream_status,
            "error_class": report.error_class, "upstream_latency_ms": report.latency_ms,
            "stream_interrupted": report.stream_interrupted, "cost_nanos": cost, "final_holds": final_holds,
            "provider_account": report.provider_account,
        }
        if report.fallback_reason:  # the proxy's own fallback; otherwise the one decided at Authorize stays
            settlement["fallback_reason"] = report.fallback_reason
        elif provider_fell_back:  # the provider's: it served another model than it was sent, and says so
            settlement["fallback_reason"] = "provider_fallback"
        if report.provider_response_id:  # not a usage number: outside the fingerprint
            settlement["provider_response_id"] = report.provider_response_id
        for name, value in zip(LATER_USAGE_FIELDS, later):
            if value:  # only then: a writer from before the column still writes every other record
                settlement[name] = value
        if r.get("containers"):  # the record held those it might make: now those charged, none included
            settlement["containers"] = report.containers
        if images_cost:  # part of the cost, billed by the provider under the image model (reconciliation)
            settlement["image_generation_cost_nanos"] = images_cost
        if other_models:  # ... and the parts other models ran: billed by the provider under each
            settlement["other_models"] = other_models
            settlement["other_models_cost_nanos"] = sum(figures[0] for figures in other_models.values())
        record_json = reservation.record_json or compact_json.dumps(r)
        payload = (f'{{"record":{record_json},"settlement":{compact_json.dumps(settlement)},'
                   f'"currency":{compact_json.dumps(r["currency"])}}}')
        try:
            result = await self.counters.settle(
                reservation, customer_id=r["wallet_id"], key_id=r["api_key_id"], now_ms=self.clock(),
                fingerprint=fingerprint, charge=charge, payload=payload, bucket_deltas=deltas,
                balance_alerts=plan.balance_alerts,
            )
        except Fenced:
            raise PolicydError("UNAVAILABLE", "rebuilding", "counters are being rebuilt; retry shortly") from None
        if result.outcome in ("settled", "settled_late", "exists", "released"):
            self.counters.forget(report.request_id)
        if result.outcome == "conflict":
            raise await self.reject(report.request_id, reservation.partition, "exists_with_different_usage",
                                     "this request was already settled with other numbers", asdict(report))
        if result.outcome == "released":
            raise await self.reject(report.request_id, reservation.partition, "already_released",
                                     "this request was released; it cannot be settled", asdict(report))
        if result.outcome == "unknown":
            raise await self.missing(report.request_id, "settle", asdict(report))
        context = report.input_tokens + report.output_tokens  # what answering on from here carries back as input
        if report.provider_response_id and r.get("endpoint") == "cached_contents":
            await self._remember_cache(r["customer_id"], report, price, served, *cache,
                                       update="cache_kept_seconds" in reservation.fields)
        elif report.provider_response_id:
            await self.remember_response(r["customer_id"], report.provider_response_id,
                                          report.provider or price.provider, price.upstream, report.provider_account,
                                          context)
            if report.provider_response_id.startswith(GEMINI_UPLOAD_PREFIX):  # its bytes come keyless: as its key's
                await self.counters.upload_begun(report.request_id, report.provider_response_id)
        for file_id in report.provider_file_ids:  # a Veo operation's videos: downloaded by its customer alone
            await self.remember_response(r["customer_id"], file_id, report.provider or price.provider, price.upstream,
                                         report.provider_account)
        if reservation.fields.get("conversation") and result.outcome != "exists":
            await self._grow_conversation(str(reservation.fields["conversation"]), context)
        if reservation.fields.get("cache_name") and result.outcome != "exists":  # after its life is remembered
            await self._end_cache_change(reservation)
        return Settlement(
            outcome=result.outcome, request_id=report.request_id, cost=cost, charge=charge,
            balance_before=result.balance_before, balance_after=result.balance_after, currency=r["currency"],
            price_table_version=r["price_table_version"], served_model=served,
        )

    async def remember_response(self, customer_id: str, response_id: str, provider: str, route: str,
                                 account: str, context_tokens: int = 0, model: str = "", kept_seconds: int = 0) -> None:
        """That the provider stored this response for this customer, on this account: its customer may read,
        delete or cancel it (admit_stored_response), no other may. The charge stands if this fails; the usage
        record keeps the id, from which a rebuild remembers it again. An explicit cache's (its `model`, and the
        seconds of its life charged) is remembered for its life, and a day more."""
        try:
            await self.counters.remember_response(response_id, customer_id, provider, route, account,
                                                  STORED_RESPONSE_HOT_SECONDS + kept_seconds, context_tokens, model,
                                                  kept_seconds)
        except Exception:
            log.exception("could not remember stored response %s of %s", response_id[:64], customer_id)

    async def _remember_cache(self, customer_id: str, report: UsageReport, price: ModelPrice, served: str, tokens: int,
                              lifetime: int, update: bool) -> None:
        """An explicit cache made (its customer's alone to read, use, change and delete; its model, its tokens
        and the life charged remembered), or its time to live changed (the life charged now)."""
        try:
            if update:
                await self.counters.cache_kept(report.provider_response_id, lifetime,
                                               STORED_RESPONSE_HOT_SECONDS + lifetime)
            else:
                await self.remember_response(customer_id, report.provider_response_id,
                                             report.provider or price.provider, price.upstream, report.provider_account,
                                             tokens, served, lifetime)
        except Exception:
            log.exception("could not remember cached content %s of %s", report.provider_response_id[:64], customer_id)

    async def _whose(self, response_id: str) -> str | None:
        """Whose a stored response (a conversation, a kept chat completion) is and where, as remember_response
        was told: from Redis while it is recent, else from the usage record that made it (held in Redis
        again); None when policyd never settled it, or the provider no longer keeps it."""
        whose = await self.counters.stored_response(response_id)
        if whose is not None:
            return whose
        if await self.counters.known_unknown(response_id):  # a client repeating ids nobody made reads no SQL
            return None
        found = await asyncio.to_thread(self.store.stored_response, response_id)
        if found is None:
            await self.counters.note_unknown(response_id)
            return None
        customer, provider, served, account, created_ms, context = found
        if not response_id.startswith((CONVERSATION_ID_PREFIX, *FILE_ID_PREFIXES, CACHED_CONTENT_PREFIX)) and \
                created_ms < self.clock() - STORED_RESPONSE_SECONDS * 1000:
            return None  # a stored response lives 30 days at the provider; a conversation or a file until deleted
        policy = self.book.current
        price = (policy.model(served) if served else _created_at(provider)) if policy else None
        route = price.upstream if price else ""
        model, kept = "", 0
        if response_id.startswith(CACHED_CONTENT_PREFIX):  # its model, and the longest life it was charged
            charged = await asyncio.to_thread(self.store.cache_storage_charged, response_id)
            model, kept = served, charged // max(1, int(context or 0))
        await self.remember_response(customer, response_id, provider, route, account, int(context or 0), model, kept)
        return whose_of(customer, provider, route, account, int(context or 0), model, kept)

    async def _grow_conversation(self, conversation: str, context_tokens: int) -> None:
        """A conversation answered in holds what the answer's input and output were: the next answer carries it."""
        try:
            await self.counters.grow_context(conversation, context_tokens)
        except Exception:
            log.exception("could not note the size of conversation %s", conversation[:64])

    async def _context_of(self, customer_id: str, response_id: str) -> tuple[int, str] | None:
        """The tokens a customer's request that continues this stored response (or answers in this
        conversation, or uses this explicit cache) carries as input unseen, as policyd last settled it, and the
        provider account it is on; None when another customer made it (the request is refused). One policyd
        does not know of (made before it remembered them, or just now and not yet settled) is the provider's to
        find or not: (0, "")."""
        whose = await self._whose(response_id)
        if whose is None:
            return 0, ""
        found = Whose.read(whose)
        return None if found.customer_id != customer_id else (found.context_tokens, found.account)

    async def settle_estimated(self, request_id: str, output_tokens: int, *, interrupted: bool, error_class: str,
                               upstream_status: int = 0, provider: str = "", provider_account: str = "",
                               reported: Tokens | None = None, provider_response_id: str = "",
                               output_as_held: bool = False, reported_cost_currency: str = "") -> Settlement:
        """Charge a request whose provider reported no usage of its whole output (a cut stream, a
        disconnect, a reply without usage): output as counted from what was delivered (at most the
        reserved cap of every choice; all of it, `output_as_held`, for a reply the provider makes whole
        though its client left); input as the provider reported it (`reported`: Anthropic does at a
        stream's start), else as estimated at Authorize."""
        reservation = await self.counters.find_reservation(request_id)
        input_tokens = int(reservation.fields.get("input_tokens_estimate", 0)) if reservation else 0
        seconds = int(reservation.fields.get("seconds_estimate", 0)) if reservation else 0
        audio_tokens = int(reservation.fields.get("audio_tokens_estimate", 0)) if reservation else 0
        if reported is not None and reported.seconds:
            seconds = reported.seconds
        cached = cache_writes = hour_writes = 0
        if reported is not None and reported.input_tokens:
            input_tokens, cached, cache_writes, hour_writes, audio_tokens = (
                reported.input_tokens, reported.cached_input_tokens, reported.cache_write_input_tokens,
                reported.cache_write_1h_input_tokens, reported.audio_input_tokens)
        cap = int(reservation.record["max_output_tokens"]) * int(reservation.record.get("choices") or 1) \
            if reservation else 0
        if interrupted and not output_as_held and reservation is not None:  # what it made and had not shown
            output_tokens = max(output_tokens, await self._output_made_meanwhile(reservation))
        output = cap if output_as_held else min(output_tokens, cap) if cap else output_tokens
        stored = 0  # an explicit cache whose reply was not read: its tokens kept as long as it was asked to live
        if reservation is not None and reservation.record.get("endpoint") == "cached_contents":
            stored, seconds = (int(reservation.fields.get("cache_tokens") or 0) or input_tokens) * seconds, 0
        return await self.settle(UsageReport(
            request_id=request_id, input_tokens=input_tokens, cached_input_tokens=cached,
            cache_write_input_tokens=cache_writes, cache_write_1h_input_tokens=hour_writes,
            # the tier that served it as reported, else the one it was held at (asked for)
            service_tier=(reported.service_tier if reported is not None else "") or
            (str(reservation.fields.get("service_tier") or "") if reservation else ""), seconds=seconds,
            audio_input_tokens=min(audio_tokens, input_tokens),
            output_tokens=output,
            images=int(reservation.fields.get("images") or 0) if output_as_held and reservation else 0,
            # the provider's tool calls it reported before the end (searches it ran are billed, cut or not)
            web_searches=reported.web_searches if reported is not None else 0,
            file_searches=reported.file_searches if reported is not None else 0,
            containers=reported.containers if reported is not None else 0,  # made before the end: billed
            maps_groundings=reported.maps_groundings if reported is not None else 0,
            # a rerank's search units as reported, else as held when the reply was not seen (settle: the fewest)
            search_units=reported.search_units if reported is not None and reported.search_units else
            int(reservation.fields.get("search_units") or 0) if output_as_held and reservation else 0,
            # the search context its search ran with (as held when not reported: _settle), reasoning as reported
            search_context_size=reported.search_context_size if reported is not None else "",
            reasoning_output_tokens=min(reported.reasoning_output_tokens, output) if reported is not None else 0,
            cache_storage_token_seconds=stored,
            # the images the image_generation tool made before the end: its usage when reported, else its calls
            **({name: getattr(reported, name) for name in IMAGE_GENERATION_USAGE} if reported is not None else {}),
            provider=provider, stream_interrupted=interrupted, error_class=error_class, upstream_status=upstream_status,
            provider_account=provider_account, provider_response_id=provider_response_id,
            reply_model=reported.reply_model if reported is not None else "",
            reported_cost=reported.reported_cost if reported is not None else None,
            reported_cost_currency=reported_cost_currency,
        ), reservation)

    async def _output_made_meanwhile(self, reservation: Reservation) -> int:
        """The output a model made between a request's authorization and now (its end) at the model's output
        speed (output_tokens_per_second; 0 when the price table gives none): a reasoning model's thinking,
        which it bills but does not show, in a reply that ended before the provider reported its usage."""
        r = reservation.record
        policy = await self.book.version(int(r["policy_version"]))
        price = policy.model(r["served_model"]) if policy else None
        if price is None or not price.output_tokens_per_second:
            return 0
        return max(self.clock() - int(r["created_ms"]), 0) * price.output_tokens_per_second // 1000

    async def missing(self, request_id: str, action: str, detail: dict[str, Any]) -> PolicydError:
        record = await asyncio.to_thread(self.store.usage_record, request_id)
        if record is not None and record.status == "denied":
            return await self.reject(request_id, None, "request_denied",
                                      f"request {request_id} was denied; there is nothing to {action}", detail)
        return await self.reject(request_id, None, "unknown_request",
                                  f"no reservation for request {request_id}", detail)

    # ------------------------------------------------------------------ release and expiry
    async def release(self, request_id: str, reason: str) -> ReleaseResult:
        if not request_id or len(request_id) > 128:
            raise await self.reject("", None, "invalid_request", "request_id is required", {"reason": reason[:256]})
        reservation = await self.counters.find_reservation(request_id)
        if reservation is None:
            raise await self.missing(request_id, "release", {"reason": reason[:256]})
        try:
            outcome, detail = await self._void(reservation, "released", reason[:256] or "released")
        except Fenced:
            raise PolicydError("UNAVAILABLE", "rebuilding", "counters are being rebuilt; retry shortly") from None
        if outcome == "released":
            metrics.releases.labels(metrics.release_reason(reason)).inc()
            if reservation.fields.get("cache_name"):
                await self._end_cache_change(reservation)
            return ReleaseResult("released", request_id, reservation.amount)
        if outcome == "already" and detail in ("released", "expired"):
            return ReleaseResult(f"already_{detail}", request_id, 0)
        if outcome == "already" and detail == "settled":
            raise await self.reject(request_id, reservation.partition, "already_settled",
                                     "this request was settled; it cannot be released", {"reason": reason[:256]})
        raise await self.missing(request_id, "release", {"reason": reason[:256]})

    async def _void(self, reservation: Reservation, target: str, reason: str) -> tuple[str, str]:
        r = reservation.record
        outcome = await self.counters.release(
            reservation, customer_id=r["wallet_id"], key_id=r["api_key_id"], now_ms=self.clock(), target=target,
            reason=reason, bucket_releases=[(key, -held) for key, _, held, *_ in r["holds"]],
        )
        if target == "released":  # an expired one stays settleable (late): keep its facts until then
            self.counters.forget(reservation.request_id)
        return outcome

    async def expire_due(self) -> int:
        """Void every reservation past its deadline, in every partition; how many were voided."""
        voided = 0
        at = self.clock()
        for partition, (credits, reservations) in (await self.counters.due_everywhere(at, SWEEP_BATCH)).items():
            try:
                voided += await self._expire_partition(partition, at, credits, reservations)
            except Fenced:
                continue  # being rebuilt: the next sweep gets it
        return voided

    async def _expire_partition(self, partition: int, at: int, credits: list[tuple[str, str]],
                                reservations: list[str]) -> int:
        for customer_id, grant_id in credits:
            await self.counters.expire_credit(partition, customer_id, grant_id, at)
        voided = 0
        for request_id in reservations:
            reservation = await self.counters.read_reservation(partition, request_id)
            if reservation is None:
                await self.counters.client.zrem(redis_keys.deadlines(partition), request_id)
                continue
            if reservation.state == "reserved" and reservation.fields.get("charge_held_on_expiry"):
                if at < reservation.expires_ms + self.reservation_ttl_ms:
                    # held one more TTL for a report still on its way (a replica making its settle again while
                    # Redis was away gives up CLOSE_RETRY_SECONDS after the reply's end, before the deadline);
                    # the request itself has ended: its key's concurrency slot is returned now
                    await self.counters.extend_hold(reservation, reservation.record["api_key_id"],
                                                    reservation.expires_ms + self.reservation_ttl_ms)
                    continue
                if await self._charge_unclosed(reservation):
                    voided += 1
                    continue
            outcome, _ = await self._void(reservation, "expired", "deadline")
            if outcome == "expired":
                voided += 1
                metrics.releases.labels("deadline").inc()
        return voided

    async def _charge_unclosed(self, reservation: Reservation) -> bool:
        """A request sent on to the provider whose end nobody reported by its deadline and one more TTL (the
        replica reading its reply was lost, or the gateway's observer could not reach policyd): the provider
        billed it, so it is charged as held (input as estimated, the whole output cap), marked end_unseen,
        instead of released as free. False when it cannot be priced now (it is then expired as before)."""
        log.warning("request %s reached its deadline unsettled; charged as held (usage_estimated:end_unseen)",
                    reservation.request_id)
        try:
            await self.settle_estimated(reservation.request_id, 0, interrupted=True,
                                                     error_class="usage_estimated:end_unseen", output_as_held=True)
        except PolicydError as error:
            log.error("request %s could not be charged at its deadline (%s); expired", reservation.request_id,
                      error.reason)
            return False
        return True

    async def run_sweeper(self, stop: asyncio.Event, interval_ms: int) -> None:
        await every(interval_ms / 1000, stop, self.expire_due, "expiry sweep")


def _clean(text: str, length_max: int) -> str:
    return text[:length_max].encode("utf-8", "replace").decode("utf-8").replace("\x00", "")


def _truncated(data: dict[str, Any], length_max: int = 256) -> dict[str, Any]:
    """Bad input is recorded, but never more of it than a record needs, and always as valid text."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, str):
            out[key] = _clean(value, length_max)
        elif isinstance(value, dict):
            out[key] = {_clean(str(k), 64): _clean(str(v), length_max) for k, v in list(value.items())[:32]}
        else:
            out[key] = value
    return out
