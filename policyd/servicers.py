"""gRPC servicers: translate protos to the engine's and admin's types and back. Nothing else."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import grpc

from policyd.admin import CREDENTIALS_PAGE_MAX, Admin, page_after, page_of
from policyd.admin_access import AdminAccess, Principal, out_of_scope
from policyd.db import AdminCredentialRow, ApiKeyRow, OwnerLimitsRow
from policyd.policy import Limit
from policyd.domain import (
    CONTAINER_MEMORY_DEFAULT,
    CREATABLE,
    ENDPOINTS,
    FILES_PER_REQUEST_MAX,
    IMAGE_GENERATION_USAGE,
    Attribution,
    AuthorizeInput,
    Decision,
    KeySummary,
    PART_TOKEN_FIELDS,
    ROUTED_FALLBACKS_MAX,
    PolicydError,
    RequestSummary,
    Settlement,
    Shape,
    UsagePart,
    UsageReport,
    trace_id_from,
)
from policyd import limit_resets, own_usage, request_lookup
from policyd.engine import Engine
from policyd.usage_capture import Tokens
from policyd.reasons import failure
from policyd.writer import REFUND_PREFIX
from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2

log = logging.getLogger("policyd.grpc")
T = TypeVar("T")

ENDPOINT_NAMES = {i + 1: name for i, name in enumerate(ENDPOINTS)}  # proto enum value -> name
DECISIONS = {"allow": policy_pb2.ALLOW, "deny": policy_pb2.DENY, "downgrade": policy_pb2.DOWNGRADE}
KEY_STATES = {"active": admin_pb2.ACTIVE, "paused": admin_pb2.PAUSED, "revoked": admin_pb2.REVOKED}
REASON_METADATA = "policyd-reason"
DENIAL_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}  # a denial's HTTP status -> its gRPC status
# what a proxy may report as AuthorizeRequest.problem: it found the HTTP request unusable
PROXY_PROBLEMS = frozenset({"invalid_request", "request_too_large", "request_headers_too_large", "unknown_endpoint",
                            "unsupported_content_encoding"})


async def _call(context: grpc.aio.ServicerContext, action: Callable[[], Awaitable[T]]) -> T:
    """Run an action; a PolicydError becomes its gRPC status with the machine reason in trailing metadata.
    Any other error is logged in full and answered briefly (UNAVAILABLE when a store is unreachable, else
    INTERNAL): its text may hold SQL and data, and may be longer than a client accepts in metadata."""
    try:
        return await action()
    except PolicydError as error:
        context.set_trailing_metadata(((REASON_METADATA, error.reason),))
        await context.abort(getattr(grpc.StatusCode, error.status), f"{error.reason}: {error.message}")
        raise  # unreachable: abort raises
    except Exception as error:
        log.exception("call failed")
        reason = failure(error)
        status = grpc.StatusCode.UNAVAILABLE if reason == "unavailable" else grpc.StatusCode.INTERNAL
        context.set_trailing_metadata(((REASON_METADATA, reason),))
        await context.abort(status, f"{reason}: {type(error).__name__} (the details are in policyd's log)")
        raise  # unreachable: abort raises


def _reported_cost(usage: policy_pb2.Usage) -> int | None:
    """What the provider said it charged (Usage.reported_cost), nanos; None when the caller says nothing."""
    return usage.reported_cost.nanos if usage.HasField("reported_cost") else None


def _money(currency: str, nanos: int) -> types_pb2.Money:
    return types_pb2.Money(currency=currency, nanos=nanos)


def authorize_input(request: policy_pb2.AuthorizeRequest, traceparent: str = "") -> AuthorizeInput:
    """The domain input of an AuthorizeRequest; `traceparent` is the call's gRPC metadata, used when the
    attribution carries none (W3C trace context propagated by the caller's gRPC instrumentation)."""
    a = request.attribution
    s = request.shape
    traceparent = a.traceparent or traceparent
    return AuthorizeInput(
        api_key=request.api_key,
        endpoint=ENDPOINT_NAMES.get(request.endpoint, ""),
        model=request.model,
        attribution=Attribution(
            request_id=a.request_id, trace_id=a.trace_id or trace_id_from(traceparent), traceparent=traceparent,
            customer_id=a.customer_id,
            workspace_id=a.workspace_id, project_id=a.project_id, end_user_id=a.end_user_id, agent_id=a.agent_id,
            thread_id=a.thread_id, feature=a.feature, route=a.route, environment=a.environment, tags=dict(a.tags),
        ),
        shape=Shape(
            input_tokens=s.input_tokens, prompt_bytes=s.prompt_bytes, message_count=s.message_count,
            max_output_tokens=s.max_output_tokens, image_count=s.image_count, seconds=s.seconds, stream=s.stream,
            choices=s.choices, web_searches=s.web_searches, service_tier=s.service_tier, unseen_input=s.unseen_input,
            audio_bytes=s.audio_bytes, cache_write=s.cache_write if s.cache_write in ("5m", "1h") else "",
            audio_output=s.audio_output, file_searches=s.file_searches,
            unbounded_web_search_tools=s.unbounded_web_search_tools, unbounded_file_search=s.unbounded_file_search,
            image_model=s.image_model, image_generation_calls=s.image_generation_calls, partial_images=s.partial_images,
            image_model_default=s.image_model_default, service_tier_implied=s.service_tier_implied,
            containers=s.containers,
            container_memory=s.container_memory or (CONTAINER_MEMORY_DEFAULT if s.containers else ""),
            image_scale=s.image_scale,
            maps_grounding=s.maps_grounding, output_cap_fixed=s.output_cap_fixed,
            output_cap_param=s.output_cap_param, documents=s.documents, document_bytes=s.document_bytes,
            document_tokens_max=s.document_tokens_max, least_output_cap=s.least_output_cap,
            search_context_size=s.search_context_size.strip().lower(),
            fallback_models=tuple(m[:256] for m in s.fallback_models[:ROUTED_FALLBACKS_MAX + 1]),
            advisor_model=s.advisor_model[:256], advisor_calls=s.advisor_calls, advisor_max_tokens=s.advisor_max_tokens,
            fallbacks_routed=s.fallbacks_routed, geo=s.geo.strip().lower()[:16],
            web_results=s.web_results, web_results_per_search=s.web_results_per_search,
            fallbacks_param=s.fallbacks_param[:64],
        ),
        client_address=request.client.address,
        user_agent=request.client.user_agent,
        count_tokens=request.count_tokens,
        stored_response=request.stored_response_id[:256], previous_response=request.previous_response_id[:256],
        creates=request.creates if request.creates in CREATABLE else "", creates_at=request.creates_at[:16],
        conversation=request.conversation_id[:256],
        files=tuple(f[:256] for f in request.file_ids[:FILES_PER_REQUEST_MAX]),
        charge_held_on_expiry=request.charge_held_on_expiry, call_token=request.call_token[:64],
        thread_budget=request.thread_budget.nanos, thread_budget_currency=request.thread_budget.currency[:8],
        max_charge=request.max_charge.nanos, max_charge_currency=request.max_charge.currency[:8],
    )


def settle_response(s: Settlement) -> policy_pb2.SettleResponse:
    outcome = {"settled": policy_pb2.SETTLED, "exists": policy_pb2.EXISTS, "settled_late": policy_pb2.SETTLED_LATE}
    return policy_pb2.SettleResponse(
        outcome=outcome[s.outcome], request_id=s.request_id, cost=_money(s.currency, s.cost),
        charge=_money(s.currency, s.charge), balance_before=_money(s.currency, s.balance_before),
        balance_after=_money(s.currency, s.balance_after), price_table_version=s.price_table_version,
        served_model=s.served_model,
    )


def authorize_response(d: Decision) -> policy_pb2.AuthorizeResponse:
    o = d.owner
    response = policy_pb2.AuthorizeResponse(
        decision=DECISIONS[d.decision], reason=d.reason, message=d.message,
        http_status=d.http_status if d.decision == "deny" else 200,
        retry_after_seconds=d.retry_after_seconds,
        owner=types_pb2.Owner(customer_id=o.customer_id, workspace_id=o.workspace_id, project_id=o.project_id,
                              team_id=o.team_id, api_key_id=o.api_key_id, environment=o.environment, plan=o.plan),
        request_id=d.request_id, requested_model=d.requested_model, served_model=d.served_model,
        provider=d.provider, route=d.route, policy_version=d.policy_version,
        price_table_version=d.price_table_version, reserved=_money(d.currency, d.reserved),
        max_output_tokens=d.max_output_tokens, reservation_expires_unix_ms=d.reservation_expires_ms,
        shadow_denials=list(d.shadow_denials), max_tool_calls=d.max_tool_calls, image_model=d.image_model,
        fallback_models=list(d.fallback_models), advisor_model=d.advisor_model,
        upstream_model=d.upstream_model, output_cap_field=d.output_cap_field or "max_completion_tokens",
        stream_usage_reported=d.stream_usage_reported,
        rate_limits=[policy_pb2.RateLimit(unit=r.unit, limit=r.limit, remaining=r.remaining, resets_unix_ms=r.resets_ms)
                     for r in d.rate_limits],
    )
    if d.decision == "deny":
        response.error.CopyFrom(types_pb2.OpenAIError(type=d.error_type, code=d.reason, message=d.message,
                                                      param=d.error_param))
    return response


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Authorize(self, request: policy_pb2.AuthorizeRequest, context: grpc.aio.ServicerContext) -> Any:
        traceparent = next((v for k, v in context.invocation_metadata() or () if k == "traceparent"), "")
        peer_input = authorize_input(request, str(traceparent))
        if request.HasField("problem"):
            p = request.problem
            reason = p.code if p.code in PROXY_PROBLEMS else "invalid_request"
            return authorize_response(await self.engine.deny_request(peer_input, reason, p.message[:1024], p.param[:256]))
        return authorize_response(await self.engine.authorize(peer_input))

    async def Settle(self, request: policy_pb2.SettleRequest, context: grpc.aio.ServicerContext) -> Any:
        u = request.usage
        if request.usage_estimated:
            s = await _call(context, lambda: self.engine.settle_estimated(
                request.request_id, u.output_tokens, interrupted=request.stream_interrupted,
                error_class=request.error_class or "usage_estimated", upstream_status=request.upstream_status,
                provider=request.provider, provider_account=request.provider_account,
                provider_response_id=request.provider_response_id[:256], output_as_held=request.output_as_held,
                reported_cost_currency=u.reported_cost.currency[:16],
                reported=Tokens(u.input_tokens, u.cached_input_tokens, u.cache_write_input_tokens,
                                cache_write_1h_input_tokens=u.cache_write_1h_input_tokens,
                                service_tier=request.service_tier, seconds=u.seconds,
                                audio_input_tokens=u.audio_input_tokens, web_searches=u.web_searches,
                                file_searches=u.file_searches, containers=u.containers,
                                maps_groundings=u.maps_groundings, search_units=u.search_units,
                                search_context_size=u.search_context_size.strip().lower(),
                                reasoning_output_tokens=u.reasoning_output_tokens, reply_model=request.reply_model,
                                cache_storage_token_seconds=u.cache_storage_token_seconds,
                                reported_cost=_reported_cost(u),
                                **{name: getattr(u, name) for name in IMAGE_GENERATION_USAGE})))
            return settle_response(s)
        report = UsageReport(
            request_id=request.request_id, input_tokens=u.input_tokens, cached_input_tokens=u.cached_input_tokens,
            cache_write_input_tokens=u.cache_write_input_tokens,
            output_tokens=u.output_tokens, images=u.images, seconds=u.seconds, requests=u.requests,
            web_searches=u.web_searches, file_searches=u.file_searches, audio_input_tokens=u.audio_input_tokens,
            audio_output_tokens=u.audio_output_tokens, cache_write_1h_input_tokens=u.cache_write_1h_input_tokens,
            image_input_tokens=u.image_input_tokens, image_output_tokens=u.image_output_tokens, containers=u.containers,
            maps_groundings=u.maps_groundings, search_units=u.search_units,
            search_context_size=u.search_context_size.strip().lower(),
            reasoning_output_tokens=u.reasoning_output_tokens,
            cache_storage_token_seconds=u.cache_storage_token_seconds,
            **{name: getattr(u, name) for name in IMAGE_GENERATION_USAGE},
            served_model=request.served_model, provider=request.provider, retries=request.retries,
            fallback_reason=request.fallback_reason, upstream_status=request.upstream_status,
            error_class=request.error_class, latency_ms=request.latency_ms,
            stream_interrupted=request.stream_interrupted, provider_account=request.provider_account,
            provider_response_id=request.provider_response_id[:256],
            service_tier=request.service_tier, reply_model=request.reply_model,
            provider_file_ids=tuple(request.provider_file_ids),
            reported_cost=_reported_cost(u),
            reported_cost_currency=u.reported_cost.currency[:16],
            parts=tuple(UsagePart(p.kind, p.model, *(getattr(p, name) for name in PART_TOKEN_FIELDS)) for p in u.parts),
        )
        return settle_response(await _call(context, lambda: self.engine.settle(report)))

    async def DescribeKey(self, request: policy_pb2.DescribeKeyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def described() -> KeySummary:
            return _answered(await self.engine.key_summary(request.api_key, request.end_user_id))

        return key_summary_message(await _call(context, described))

    async def DescribeRequest(self, request: policy_pb2.DescribeRequestRequest,
                              context: grpc.aio.ServicerContext) -> Any:
        async def described() -> RequestSummary:
            return _answered(await self.engine.describe_request(request.api_key, request.request_id, request.wait_ms))

        return request_summary_message(await _call(context, described))

    async def ListRequests(self, request: policy_pb2.ListRequestsRequest, context: grpc.aio.ServicerContext) -> Any:
        async def listed() -> tuple[list[RequestSummary], bool]:
            if not 0 <= request.limit <= request_lookup.LISTING_MAX or \
                    len(request.after) > request_lookup.REQUEST_ID_LENGTH_MAX:
                raise PolicydError("INVALID_ARGUMENT", "invalid_request", f"limit is at most "
                                   f"{request_lookup.LISTING_MAX}, after at most "
                                   f"{request_lookup.REQUEST_ID_LENGTH_MAX} characters")
            return _answered(await self.engine.list_requests(request.api_key, request.limit or
                                                             request_lookup.LISTING_DEFAULT, request.after))

        summaries, has_more = await _call(context, listed)
        return policy_pb2.ListRequestsResponse(requests=[request_summary_message(s) for s in summaries],
                                               has_more=has_more)

    async def SummarizeUsage(self, request: policy_pb2.UsageSummaryRequest,
                             context: grpc.aio.ServicerContext) -> Any:
        since_ms, until_ms = own_usage.window(request.since_unix * 1000 or None, request.until_unix * 1000 or None)
        group_by, bucket, zone = list(request.group_by), request.bucket, request.timezone

        async def summed() -> tuple[list[own_usage.UsageRow], bool, str]:
            wrong = own_usage.problem(group_by, since_ms, until_ms, bucket, zone)
            if wrong:
                raise PolicydError("INVALID_ARGUMENT", "invalid_request", wrong[0])
            return _answered(await self.engine.usage_summary(request.api_key, group_by, since_ms, until_ms, bucket,
                                                             zone))

        rows, truncated, currency = await _call(context, summed)
        return policy_pb2.UsageSummary(
            currency=currency, since_unix=since_ms // 1000, until_unix=until_ms // 1000, truncated=truncated,
            groups=[policy_pb2.UsageGroup(group=r.group, bucket=r.bucket, **r.counts, charge=_money(currency, r.charge),
                                          refunded=_money(currency, r.refunded), usage=r.usage) for r in rows])

    async def Release(self, request: policy_pb2.ReleaseRequest, context: grpc.aio.ServicerContext) -> Any:
        r = await _call(context, lambda: self.engine.release(request.request_id, request.reason))
        outcome = {"released": policy_pb2.RELEASED, "already_released": policy_pb2.ALREADY_RELEASED,
                   "already_expired": policy_pb2.ALREADY_EXPIRED}
        currency = self.engine.book.current.document.currency if self.engine.book.current else ""
        return policy_pb2.ReleaseResponse(outcome=outcome[r.outcome], request_id=r.request_id,
                                          released=_money(currency, r.released))


    async def AwaitResponse(self, request: policy_pb2.AwaitResponseRequest, context: grpc.aio.ServicerContext) -> Any:
        async def kept() -> tuple[int, bool]:
            response_id = request.provider_response_id
            if not response_id or len(response_id) > 200 or len(request.provider_account) > 64:
                raise PolicydError("INVALID_ARGUMENT", "invalid_request",
                                   "provider_response_id (at most 200 characters) is required")
            return await self.engine.background.await_response(request.request_id, response_id,
                                                               request.provider_account)

        until, followed = await _call(context, kept)
        return policy_pb2.AwaitResponseResponse(request_id=request.request_id, held_until_unix_ms=until,
                                                followed=followed)


def _answered(found: tuple[Any, Decision | None]) -> Any:
    """An answer about a key (what it may spend, one of its requests), or the refusal it got, raised with the
    gRPC status of its HTTP status."""
    answer, denial = found
    if answer is None:
        assert denial is not None
        raise PolicydError(DENIAL_STATUS.get(denial.http_status, "FAILED_PRECONDITION"), denial.reason, denial.message)
    return answer


def key_summary_message(s: KeySummary) -> policy_pb2.KeySummary:
    return policy_pb2.KeySummary(
        key_id=s.key_id, customer_id=s.customer_id, plan=s.plan, has_wallet=s.balance is not None,
        balance=_money(s.currency, s.balance or 0), reserved=_money(s.currency, s.reserved),
        limits=[policy_pb2.LimitState(name=limit.name, scope=limit.scope, window=limit.window, unit=limit.unit,
                                      limit=limit.limit, used=limit.used, resets_unix=limit.resets_unix)
                for limit in s.limits],
        models=[policy_pb2.KeyModel(id=model, owned_by=owner) for model, owner in s.models],
        end_user_id=s.end_user_id, end_user_paused=s.end_user_paused,
    )


def request_summary_message(s: RequestSummary) -> policy_pb2.RequestSummary:
    return policy_pb2.RequestSummary(
        request_id=s.request_id, created_unix_ms=s.created_ms, status=s.status, decision=s.decision,
        reason=s.reason, message=s.message, endpoint=s.endpoint, requested_model=s.requested_model,
        served_model=s.served_model, api_key_id=s.api_key_id, charge=_money(s.currency, s.charge),
        held=_money(s.currency, s.held), refunded=_money(s.currency, s.refunded),
        has_balance=s.balance_after is not None, balance_after=_money(s.currency, s.balance_after or 0),
        usage=policy_pb2.Usage(**s.usage), usage_estimated=s.usage_estimated, error_class=s.error_class,
        feature=s.feature, thread_id=s.thread_id, end_user_id=s.end_user_id, agent_id=s.agent_id, tags=s.tags,
    )


def api_key_message(row: ApiKeyRow) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(
        id=row.id, label=row.label, prefix=row.prefix,
        owner=types_pb2.Owner(customer_id=row.customer_id, workspace_id=row.workspace_id, project_id=row.project_id,
                              team_id=row.team_id, api_key_id=row.id, environment=row.environment, plan=row.plan),
        state=KEY_STATES[row.status], scopes=list(row.scopes or []), created_unix_ms=row.created_ms,
        rotated_unix_ms=row.rotated_ms, previous_secret_expires_unix_ms=row.previous_expires_ms,
        expires_unix_ms=row.expires_ms or 0,
        limits=[admin_pb2.KeyLimit(**limit) for limit in row.limits or ()],
        owner_limits=[admin_pb2.KeyLimit(**limit) for limit in row.owner_limits or ()],
    )


def owner_limits_message(row: OwnerLimitsRow, keys_changed: int = 0,
                         states: Sequence[dict[str, Any]] = ()) -> admin_pb2.OwnerLimits:
    return admin_pb2.OwnerLimits(
        customer_id=row.customer_id, scope=row.scope, owner_id=row.owner_id,
        limits=[admin_pb2.KeyLimit(**limit) for limit in row.limits], updated_unix_ms=row.updated_ms,
        keys_changed=keys_changed, paused=bool(row.paused),
        current=[limit_state(s["limit"], s["used"], s["ends"]) for s in states])


def limit_state(limit: Limit, used: int, ends: int) -> policy_pb2.LimitState:
    """A limit's current window: what it holds, when it ends (unix s, 0 for total)."""
    return policy_pb2.LimitState(name=limit.label, scope=limit.scope, window=limit.window, unit=limit.unit,
                                 limit=limit.limit, used=used, resets_unix=ends)


def key_limit(message: admin_pb2.KeyLimit) -> dict[str, Any]:
    return {"window": message.window, "unit": message.unit, "limit": message.limit, "timezone": message.timezone,
            "thresholds": list(message.thresholds), "models": list(message.models),
            "until_unix_ms": message.until_unix_ms}


def usage_record_message(r: Any) -> admin_pb2.UsageRecord:
    return admin_pb2.UsageRecord(
        request_id=r.request_id, created_unix_ms=r.created_ms,
        owner=types_pb2.Owner(customer_id=r.customer_id, workspace_id=r.workspace_id, project_id=r.project_id,
                              team_id=r.team_id, api_key_id=r.api_key_id, environment=r.environment, plan=r.plan),
        feature=r.feature, thread_id=r.thread_id, end_user_id=r.end_user_id, endpoint=r.endpoint,
        requested_model=r.requested_model, served_model=r.served_model, decision=r.decision, reason=r.reason,
        status=r.status, input_tokens=r.input_tokens, cached_input_tokens=r.cached_input_tokens,
        output_tokens=r.output_tokens, cost=_money(r.currency, r.cost_nanos), charge=_money(r.currency, r.charge_nanos),
        balance_after=_money(r.currency, r.balance_after_nanos or 0), stream_interrupted=bool(r.stream_interrupted),
        error_class=r.error_class, policy_version=r.policy_version, price_table_version=r.price_table_version,
        trace_id=r.trace_id, traceparent=r.traceparent, agent_id=r.agent_id, tags=r.tags or {},  # the JSON column's object
        balance_before=_money(r.currency, r.balance_before_nanos or 0), provider_account=r.provider_account,
        cache_write_input_tokens=r.cache_write_input_tokens or 0,
        cache_write_1h_input_tokens=r.cache_write_1h_input_tokens or 0, audio_input_tokens=r.audio_input_tokens or 0,
        audio_output_tokens=r.audio_output_tokens or 0, web_searches=r.web_searches or 0, choices=r.choices or 1,
        file_searches=r.file_searches or 0, image_input_tokens=r.image_input_tokens or 0,
        image_output_tokens=r.image_output_tokens or 0, containers=r.containers or 0,
        container_memory=r.container_memory or "", maps_groundings=r.maps_groundings or 0,
        search_units=r.search_units or 0, search_context_size=r.search_context_size or "",
        reasoning_output_tokens=r.reasoning_output_tokens or 0,
        cache_storage_token_seconds=r.cache_storage_token_seconds or 0,
        images=r.images or 0, seconds=r.seconds or 0, refunded_nanos=r.refunded_nanos or 0,
        refunded_unix_ms=r.refunded_ms or 0,
        image_model=r.image_model or "", **{name: getattr(r, name) or 0 for name in IMAGE_GENERATION_USAGE},
        service_tier=r.service_tier or "", provider_response_id=r.provider_response_id or "",
    )


Described = dict[str, Any]  # an admin action's record: customer_id, request_id, and what else it says


def recorded(action: str, describe: Callable[[Any, Any], Described]) -> Callable[[Any], Any]:
    """An AdminService call that changes something, recorded once it is done (ListEvents, admin_action): what
    `describe(request, reply)` says of it (ids, names, amounts: never a secret), and who made it."""
    def wrap(method: Any) -> Any:
        @functools.wraps(method)
        async def call(self: "AdminServicer", request: Any, context: grpc.aio.ServicerContext) -> Any:
            reply = await method(self, request, context)
            principal = await self._principal(context)
            try:
                await self.admin.record_action(action, principal.credential_id or "operator", via="grpc",
                                               **describe(request, reply))
            except Exception:  # the change is made: its caller is told so, and the lost record is logged
                log.exception("admin action %s done but not recorded", action)
            return reply
        return call
    return wrap


def cap_state(cap: Any, used: int, ends: int) -> Any:
    """One of the operator's caps as the AdminService shows it: what its current window holds, when it ends."""
    return admin_pb2.CapState(name=cap.name, provider=cap.provider, models=list(cap.models), window=cap.window,
                              timezone=cap.timezone, unit=cap.unit, limit=cap.limit, used=used, resets_unix=ends,
                              action=cap.action, downgrade_to=cap.downgrade_to)


def _own_limits_refused(doing: str) -> Callable[[], Any]:
    """A scoped credential gives limits to its sub-customers (and their workspaces, projects, teams and end users),
    resets them and pauses their end users, never its own customer's, whose plan the operator chose: it would
    loosen them."""
    async def refuse() -> None:
        raise out_of_scope(f"a scoped admin credential {doing} of its sub-customers, not its own customer's")
    return refuse


def _on_key(request: Any, reply: Any) -> Described:
    return {"customer_id": reply.owner.customer_id, "key_id": reply.id}


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, admin: Admin, token: str = "") -> None:
        self.admin = admin
        self.access = AdminAccess(admin.store, token)

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        """The caller, or UNAUTHENTICATED: the operator's token or a scoped admin credential is required."""
        metadata = dict(context.invocation_metadata() or ())
        principal = await asyncio.to_thread(self.access.resolve, str(metadata.get("authorization", "")))
        if principal is None:
            context.set_trailing_metadata(((REASON_METADATA, "unauthenticated"),))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated: a valid admin token is required")
        assert principal is not None
        return principal

    async def _operator(self, context: grpc.aio.ServicerContext) -> Principal:
        principal = await self._principal(context)
        await _call(context, lambda: asyncio.to_thread(self.access.require_operator, principal))
        return principal

    async def _for_customer(self, context: grpc.aio.ServicerContext, customer_id: str) -> Principal:
        principal = await self._principal(context)
        await _call(context, lambda: asyncio.to_thread(self.access.require_customer, principal, customer_id))
        return principal

    async def _key(self, context: grpc.aio.ServicerContext, key_id: str) -> ApiKeyRow:
        """A key the caller may act on; one outside its scope is reported exactly like a missing one."""
        principal = await self._principal(context)

        async def find() -> ApiKeyRow:
            row = await self.admin.get_key(key_id)
            if not await asyncio.to_thread(self.access.in_scope, principal, row.customer_id):
                raise PolicydError("NOT_FOUND", "unknown_key", f"no key {key_id!r}")
            return row

        return await _call(context, find)

    async def _own_customer(self, context: grpc.aio.ServicerContext, customer_id: str) -> str:
        """The customer a listing is about: as asked (within scope), or a scoped caller's own when empty."""
        principal = await self._principal(context)
        if not customer_id and not principal.operator:
            return principal.customer_id
        if customer_id:
            await _call(context, lambda: asyncio.to_thread(self.access.require_customer, principal, customer_id))
        return customer_id

    @recorded("key_create", lambda q, r: {"customer_id": r.key.owner.customer_id, "key_id": r.key.id,
                                          "plan": r.key.owner.plan})
    async def CreateKey(self, request: admin_pb2.CreateKeyRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._for_customer(context, request.customer_id)
        created = await _call(context, lambda: self.admin.create_key(
            label=request.label, customer_id=request.customer_id, workspace_id=request.workspace_id,
            project_id=request.project_id, team_id=request.team_id, environment=request.environment,
            plan=request.plan, scopes=list(request.scopes), test=request.test, expires_ms=request.expires_unix_ms,
            limits=[key_limit(limit) for limit in request.limits]))
        return admin_pb2.CreateKeyResponse(key=api_key_message(created.row), secret=created.secret)

    async def ListKeys(self, request: admin_pb2.ListKeysRequest, context: grpc.aio.ServicerContext) -> Any:
        principal = await self._principal(context)
        customers: set[str] | None = None  # the operator's: every customer's
        if request.customer_id:
            await _call(context, lambda: asyncio.to_thread(self.access.require_customer, principal, request.customer_id))
            customers = {request.customer_id}
        elif not principal.operator:
            customers = await asyncio.to_thread(self.access.customers_in_scope, principal)
        rows, next_page = await _call(context, lambda: self.admin.keys_page(customers, request.limit,
                                                                             request.page_token))
        return admin_pb2.ListKeysResponse(keys=[api_key_message(r) for r in rows], next_page_token=next_page)

    async def GetKey(self, request: admin_pb2.GetKeyRequest, context: grpc.aio.ServicerContext) -> Any:
        return api_key_message(await self._key(context, request.id))

    @recorded("key_pause", _on_key)
    async def PauseKey(self, request: admin_pb2.KeyActionRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._key(context, request.id)
        return api_key_message(await _call(context, lambda: self.admin.set_state(request.id, "paused")))

    @recorded("key_resume", _on_key)
    async def ResumeKey(self, request: admin_pb2.KeyActionRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._key(context, request.id)
        return api_key_message(await _call(context, lambda: self.admin.set_state(request.id, "active")))

    @recorded("key_revoke", _on_key)
    async def RevokeKey(self, request: admin_pb2.KeyActionRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._key(context, request.id)
        return api_key_message(await _call(context, lambda: self.admin.set_state(request.id, "revoked")))

    @recorded("key_expiry", lambda q, r: {**_on_key(q, r), "expires_unix_ms": q.expires_unix_ms})
    async def SetKeyExpiry(self, request: admin_pb2.SetKeyExpiryRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._key(context, request.id)
        return api_key_message(await _call(context, lambda: self.admin.set_expiry(request.id, request.expires_unix_ms)))

    @recorded("key_limits", _on_key)
    async def SetKeyLimits(self, request: admin_pb2.SetKeyLimitsRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._key(context, request.id)
        return api_key_message(await _call(context, lambda: self.admin.set_limits(
            request.id, [key_limit(limit) for limit in request.limits])))

    @recorded("key_scopes", lambda q, r: {**_on_key(q, r), "scopes": list(q.scopes)})
    async def SetKeyScopes(self, request: admin_pb2.SetKeyScopesRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._key(context, request.id)
        return api_key_message(await _call(context, lambda: self.admin.set_scopes(request.id, list(request.scopes))))

    @recorded("owner_limits", lambda q, r: {"customer_id": q.customer_id, "scope": r.scope, "owner_id": r.owner_id,
                                            "keys": r.keys_changed})
    async def SetOwnerLimits(self, request: admin_pb2.SetOwnerLimitsRequest, context: grpc.aio.ServicerContext) -> Any:
        principal = await self._for_customer(context, request.customer_id)
        if not principal.operator and request.customer_id == principal.customer_id:
            await _call(context, _own_limits_refused("sets the limits"))
        row, changed = await _call(context, lambda: self.admin.set_owner_limits(
            [key_limit(limit) for limit in request.limits], request.customer_id, request.workspace_id,
            request.project_id, request.team_id, request.end_user_id))
        return owner_limits_message(row, changed, await _call(context, lambda: self.admin.owner_limit_states(row)))

    @recorded("end_user_paused", lambda q, r: {"customer_id": q.customer_id, "end_user_id": r.owner_id,
                                               "paused": r.paused, "keys": r.keys_changed})
    async def SetEndUserPaused(self, request: admin_pb2.SetEndUserPausedRequest,
                               context: grpc.aio.ServicerContext) -> Any:
        principal = await self._for_customer(context, request.customer_id)
        if not principal.operator and request.customer_id == principal.customer_id:
            await _call(context, _own_limits_refused("pauses and resumes the end users"))
        row, changed = await _call(context, lambda: self.admin.set_end_user_paused(
            request.customer_id, request.end_user_id, request.paused))
        return owner_limits_message(row, changed, await _call(context, lambda: self.admin.owner_limit_states(row)))

    async def ListOwnerLimits(self, request: admin_pb2.ListOwnerLimitsRequest, context: grpc.aio.ServicerContext) -> Any:
        customer_id = await self._own_customer(context, request.customer_id)
        rows, next_page = await _call(context, lambda: self.admin.owner_limits_page(
            customer_id, request.scope, request.owner_id, request.limit, request.page_token))
        return admin_pb2.ListOwnerLimitsResponse(owners=[
            owner_limits_message(row, states=await _call(context, lambda: self.admin.owner_limit_states(row)))
            for row in rows], next_page_token=next_page)

    @recorded("limit_reset", lambda q, r: {"customer_id": r.customer_id, "scope": r.scope, "owner_id": r.owner_id,
                                           "limits": [m.limit.name for m in r.limits],
                                           "forgiven": [m.forgiven for m in r.limits], "reason": q.reason})
    async def ResetLimits(self, request: admin_pb2.ResetLimitsRequest, context: grpc.aio.ServicerContext) -> Any:
        customer_id = request.customer_id
        if request.key_id:
            customer_id = (await self._key(context, request.key_id)).customer_id
        principal = await self._for_customer(context, customer_id)
        if not principal.operator and customer_id == principal.customer_id:
            await _call(context, _own_limits_refused("resets the limits"))
        named = {field: getattr(request, field) for _, field in limit_resets.NAMED_SCOPES}
        target, resets = await _call(context, lambda: self.admin.reset_limits(
            request.customer_id, unit=request.unit, window=request.window, name=request.name, reason=request.reason,
            **named))
        return admin_pb2.ResetLimitsResponse(
            customer_id=target.customer_id, scope=target.scope, owner_id=target.owner_id,
            limits=[admin_pb2.LimitReset(limit=limit_state(r.limit, r.used, r.ends), before=r.before,
                                         forgiven=r.forgiven) for r in resets])

    @recorded("plan_set", lambda q, r: {"customer_id": q.customer_id, "plan": q.plan, "key_id": q.key_id,
                                        "keys": len(r.keys)})
    async def SetPlan(self, request: admin_pb2.SetPlanRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        moved = await _call(context, lambda: self.admin.set_plan(request.plan, key_id=request.key_id,
                                                                 customer_id=request.customer_id))
        return admin_pb2.SetPlanResponse(keys=[api_key_message(row) for row in moved])

    @recorded("key_rotate", lambda q, r: {"customer_id": r.key.owner.customer_id, "key_id": q.id,
                                          "new_key_id": r.key.id})
    async def RotateKey(self, request: admin_pb2.RotateKeyRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._key(context, request.id)
        grace = request.grace_seconds if request.HasField("grace_seconds") else 86_400
        created = await _call(context, lambda: self.admin.rotate_key(request.id, grace))
        return admin_pb2.CreateKeyResponse(key=api_key_message(created.row), secret=created.secret)

    @recorded("policy_apply", lambda q, r: {"version": r.version, "changed": r.changed, "source": q.source_name,
                                            "dry_run": q.dry_run})
    async def ApplyPolicy(self, request: admin_pb2.ApplyPolicyRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        result = await _call(context, lambda: self.admin.apply_policy(request.yaml, request.source_name, request.dry_run))
        return admin_pb2.ApplyPolicyResponse(version=result.version, changed=result.changed, diff=result.diff,
                                             limits_begun=result.limits_begun, buckets_seeded=result.buckets_seeded)

    async def GetPolicy(self, request: admin_pb2.GetPolicyRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        current = self.admin.book.current
        return admin_pb2.GetPolicyResponse(version=current.version if current else 0,
                                           yaml=current.canonical if current else "")

    @recorded("credit_grant", lambda q, r: {"customer_id": q.customer_id, "workspace_id": q.workspace_id,
                                            "grant_id": r.grant_id, "amount_nanos": q.amount.nanos, "source": q.source,
                                            "exists": r.exists})
    async def GrantCredit(self, request: admin_pb2.GrantCreditRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        grant_id, outcome, (balance, reserved) = await _call(context, lambda: self.admin.grant_credit(
            request.customer_id, request.amount.nanos, request.amount.currency, request.source, request.grant_id,
            request.note, request.expires_unix_ms, request.workspace_id))
        return admin_pb2.GrantCreditResponse(grant_id=grant_id, exists=outcome == "exists", wallet=self._wallet(
            request.customer_id, request.workspace_id, balance, reserved))

    @recorded("usage_refund", lambda q, r: {"customer_id": r.wallet.customer_id, "request_id": q.request_id,
                                            "amount_nanos": r.refunded.nanos})
    async def RefundUsage(self, request: admin_pb2.RefundUsageRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        amount, wallet, (balance, reserved) = await _call(context, lambda: self.admin.refund_usage(
            request.request_id, request.amount.nanos, request.note))
        customer_id, _, workspace_id = wallet.partition("/")
        currency = self.admin.book.current.document.currency if self.admin.book.current else ""
        return admin_pb2.RefundUsageResponse(
            request_id=request.request_id, refunded=_money(currency, amount), grant_id=REFUND_PREFIX + request.request_id,
            wallet=self._wallet(customer_id, workspace_id, balance, reserved))

    def _wallet(self, customer_id: str, workspace_id: str, balance: int, reserved: int) -> admin_pb2.Wallet:
        current = self.admin.book.current
        return admin_pb2.Wallet(customer_id=customer_id, workspace_id=workspace_id,
                                currency=current.document.currency if current else "",
                                balance_nanos=balance, reserved_nanos=reserved, available_nanos=balance - reserved)

    async def GetWallet(self, request: admin_pb2.GetWalletRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._for_customer(context, request.customer_id)
        from policyd.redis_keys import wallet_id

        balance, reserved = await self.admin.counters.wallet(wallet_id(request.customer_id, request.workspace_id))
        return self._wallet(request.customer_id, request.workspace_id, balance, reserved)

    async def ListUsage(self, request: admin_pb2.ListUsageRequest, context: grpc.aio.ServicerContext) -> Any:
        customer_id = await self._own_customer(context, request.customer_id)
        rows, next_page = await _call(context, lambda: self.admin.list_usage(
            customer_id, request.limit, request.request_id, request.api_key_id, request.since_unix_ms,
            request.until_unix_ms, request.page_token))
        # up to USAGE_LIST_MAX messages: built on a thread, not on the loop the decisions wait for
        return await asyncio.to_thread(lambda: admin_pb2.ListUsageResponse(
            records=[usage_record_message(r) for r in rows], next_page_token=next_page))

    async def UsageReport(self, request: admin_pb2.UsageReportRequest, context: grpc.aio.ServicerContext) -> Any:
        customer_id = await self._own_customer(context, request.customer_id)
        from policyd.reports import row_dict

        rows = await _call(context, lambda: self.admin.usage_report(
            list(request.group_by), request.since_unix_ms, request.until_unix_ms, request.bucket, customer_id,
            request.compare_previous, request.timezone))
        current = self.admin.book.current

        def reply() -> admin_pb2.UsageReportResponse:  # as many rows as groups and buckets: on a thread
            out = []
            for row in rows:
                data = row_dict(row)
                out.append(admin_pb2.UsageReportRow(
                    group=row.group, bucket=row.bucket,
                    figures={k: v for k, v in data.items() if k not in row.group and k != "bucket"}))
            return admin_pb2.UsageReportResponse(currency=current.document.currency if current else "", rows=out)

        return await asyncio.to_thread(reply)

    async def ExportInvoice(self, request: admin_pb2.InvoiceRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._for_customer(context, request.customer_id)
        return self._invoice(await _call(context, lambda: self.admin.invoice(
            request.customer_id, request.period, request.lines_by)))

    @recorded("period_close", lambda q, r: {"customer_id": q.customer_id, "period": q.period,
                                            "digest": r.digest})
    async def ClosePeriod(self, request: admin_pb2.InvoiceRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        return self._invoice(await _call(context, lambda: self.admin.invoice(
            request.customer_id, request.period, request.lines_by, close=True)))

    @staticmethod
    def _invoice(invoice: Any) -> admin_pb2.InvoiceResponse:
        from policyd.invoices import to_csv

        return admin_pb2.InvoiceResponse(json=invoice.text, csv=to_csv(invoice), digest=invoice.digest,
                                         closed=invoice.closed)

    async def Reconcile(self, request: admin_pb2.ReconcileRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        result = await _call(context, lambda: self.admin.reconcile(
            request.provider, request.export, request.tolerance_nanos, request.tolerance_bps))
        return admin_pb2.ReconcileResponse(ok=result.ok, basis=result.basis, totals=result.totals(), lines=[
            admin_pb2.ReconcileLine(day=c.day, model=c.model, status=c.status, provider_nanos=c.provider_nanos,
                                    ledger_nanos=c.ledger_nanos, difference_nanos=c.difference_nanos,
                                    provider_tokens=c.provider_tokens, ledger_tokens=c.ledger_tokens,
                                    provider_account=c.account)
            for c in result.comparisons])

    async def ReviewKey(self, request: admin_pb2.GetKeyRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._key(context, request.id)
        review = await _call(context, lambda: self.admin.review_key(request.id))
        return admin_pb2.KeyReview(
            key=api_key_message(review["key"]), allowed_models=review["models"],
            buckets=[admin_pb2.BucketState(**b) for b in review["buckets"]],
            spend_today_nanos=review["spend_today"], spend_month_nanos=review["spend_month"],
            last_used_unix_ms=review["last_used_ms"], requests=review["requests"], denials=review["denials"],
            errors=review["errors"], denials_by_reason=review["denials_by_reason"])

    async def ListCaps(self, request: admin_pb2.ListCapsRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        current = self.admin.book.current
        return admin_pb2.ListCapsResponse(currency=current.document.currency if current else "", caps=[
            cap_state(c, used, ends) for c, used, ends in await _call(context, self.admin.caps)])

    @recorded("cap_reset", lambda q, r: {"cap": r.cap.name, "forgiven": r.forgiven, "reason": q.reason})
    async def ResetCap(self, request: admin_pb2.ResetCapRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        c, before, forgiven, used, ends = await _call(context, lambda: self.admin.reset_cap(request.name,
                                                                                           request.reason))
        return admin_pb2.ResetCapResponse(cap=cap_state(c, used, ends), before=before, forgiven=forgiven)

    async def ListEvents(self, request: admin_pb2.ListEventsRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        rows = await _call(context, lambda: self.admin.list_events(
            request.kind, request.customer_id, request.since_unix_ms, request.until_unix_ms, request.limit))
        return admin_pb2.ListEventsResponse(events=[admin_pb2.Event(
            id=e.id, kind=e.kind, customer_id=e.customer_id, request_id=e.request_id, created_unix_ms=e.created_ms,
            detail_json=json.dumps(e.detail or {}, sort_keys=True)) for e in rows])

    async def Audit(self, request: admin_pb2.AuditRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        result = await _call(context, self.admin.audit)
        return admin_pb2.AuditResponse(ok=result.ok, counters_checked=result.checked, mismatches=[
            admin_pb2.AuditMismatch(counter=c, redis_value=r, ledger_value=l) for c, r, l in result.mismatches])

    @recorded("counters_rebuild", lambda q, r: {"counters_written": r.counters_written})
    async def Rebuild(self, request: admin_pb2.RebuildRequest, context: grpc.aio.ServicerContext) -> Any:
        await self._operator(context)
        return admin_pb2.RebuildResponse(counters_written=await _call(context, self.admin.rebuild))

    @recorded("credential_create", lambda q, r: {"customer_id": r.credential.customer_id,
                                                      "credential_id": r.credential.id})
    async def CreateAdminCredential(self, request: admin_pb2.CreateAdminCredentialRequest,
                                    context: grpc.aio.ServicerContext) -> Any:
        principal = await self._principal(context)
        row, secret = await _call(context, lambda: asyncio.to_thread(
            self.access.create_credential, principal, request.customer_id, request.label))
        return admin_pb2.CreateAdminCredentialResponse(credential=credential_message(row), secret=secret)

    async def ListAdminCredentials(self, request: admin_pb2.ListAdminCredentialsRequest,
                                   context: grpc.aio.ServicerContext) -> Any:
        principal = await self._principal(context)
        count = CREDENTIALS_PAGE_MAX if request.limit <= 0 else min(request.limit, CREDENTIALS_PAGE_MAX)
        rows = await _call(context, lambda: asyncio.to_thread(
            self.access.credentials, principal, request.customer_id, page_after(request.page_token), count + 1))
        rows, next_page = page_of(rows, count, lambda last: f"{last.created_ms}/{last.id}")
        return admin_pb2.ListAdminCredentialsResponse(credentials=[credential_message(r) for r in rows],
                                                      next_page_token=next_page)

    @recorded("credential_revoke", lambda q, r: {"customer_id": r.customer_id, "credential_id": r.id})
    async def RevokeAdminCredential(self, request: admin_pb2.RevokeAdminCredentialRequest,
                                    context: grpc.aio.ServicerContext) -> Any:
        principal = await self._principal(context)
        row = await _call(context, lambda: asyncio.to_thread(self.access.revoke_credential, principal, request.id))
        return credential_message(row)

    @recorded("customer_link", lambda q, r: {"customer_id": q.customer_id, "parent_id": q.parent_id})
    async def LinkCustomer(self, request: admin_pb2.LinkCustomerRequest, context: grpc.aio.ServicerContext) -> Any:
        principal = await self._principal(context)
        await _call(context, lambda: asyncio.to_thread(self.access.link, principal, request.customer_id, request.parent_id))
        return admin_pb2.LinkCustomerResponse(customer_id=request.customer_id, parent_id=request.parent_id)


def credential_message(row: AdminCredentialRow) -> admin_pb2.AdminCredential:
    return admin_pb2.AdminCredential(id=row.id, customer_id=row.customer_id, label=row.label, prefix=row.prefix,
                                     created_unix_ms=row.created_ms, revoked_unix_ms=row.revoked_ms)
