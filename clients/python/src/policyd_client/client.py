"""A typed Python client for the PolicyService: what an in-house gateway calls around each model call.

    from policyd_client import PolicyClient

    with PolicyClient("127.0.0.1:50051") as policy:
        decision = policy.authorize(api_key, "chat_completions", "gpt-4o", request_id="req-1",
                                    prompt_bytes=2048, max_output_tokens=512, feature="chat")
        if not decision.allowed:
            ...  # answer decision.http_status with decision.error_body()
        ...     # call the provider with decision.upstream_model, at most decision.max_output_tokens
        policy.settle("req-1", input_tokens=900, output_tokens=300)   # or policy.release("req-1", "provider_error")

`AsyncPolicyClient` is the same over grpc.aio. Every call has a deadline. Calls are retried on
UNAVAILABLE only when they are idempotent: Authorize with a request_id, Settle, Release (all keyed
by request_id). A refused Settle or Release raises `PolicydCallError` with the machine reason.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import grpc

from policyd_client.v1 import policy_pb2, policy_pb2_grpc, types_pb2

# the endpoint families of the contract, by their lower-case names ("chat_completions", ...)
ENDPOINTS = tuple(name.lower() for name in types_pb2.EndpointFamily.keys() if name != "ENDPOINT_FAMILY_UNSPECIFIED")

DEADLINE_SECONDS = 2.0
RETRIES = 2
RETRY_BACKOFF_SECONDS = 0.05


class PolicydCallError(Exception):
    """A call policyd refused or could not answer: `code` is the gRPC status, `reason` the machine reason."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Decision:
    allowed: bool
    decision: str  # allow | deny | downgrade
    reason: str
    message: str
    http_status: int
    request_id: str
    served_model: str
    route: str
    max_output_tokens: int
    reserved_nanos: int
    retry_after_seconds: int
    response: Any  # the full AuthorizeResponse

    @property
    def rate_limits(self) -> list[Any]:
        """What the key's tightest request and token limits leave once this request is held (RateLimit:
        unit, limit, remaining, resets_unix_ms), for a proxy's x-ratelimit-* headers."""
        return list(self.response.rate_limits) if self.response is not None else []

    @property
    def max_tool_calls(self) -> int:
        """> 0: the bound the reservation covers for the request's unbounded search tools, which the proxy
        must set in the request (the Responses API's max_tool_calls; max_uses on each Anthropic web search
        tool that has none)."""
        return int(self.response.max_tool_calls) if self.response is not None else 0

    @property
    def image_model(self) -> str:
        """Set: the image model the proxy must name in the request's image_generation tool, as the provider
        names it (the plan's default, for a tool naming none; or the tool's own, known upstream by another
        name), whose prices its images are charged at."""
        return str(self.response.image_model) if self.response is not None else ""

    @property
    def fallback_models(self) -> tuple[str, ...]:
        """Set: the models the proxy must name in the request's server-side fallbacks (Anthropic's `fallbacks`, in
        order), as the provider names them, where the price table knows one by another name."""
        return tuple(self.response.fallback_models) if self.response is not None else ()

    @property
    def advisor_model(self) -> str:
        """Set: the model the proxy must name in the request's advisor tool, as the provider names it."""
        return str(self.response.advisor_model) if self.response is not None else ""

    @property
    def upstream_model(self) -> str:
        """The served model as the provider names it: what the proxy sends upstream (in the body, or the
        path where the path names the model) when it differs from the model the request names."""
        return str(self.response.upstream_model or self.served_model) if self.response is not None \
            else self.served_model

    @property
    def output_cap_field(self) -> str:
        """Where a chat completion's output cap goes for the served model's provider: max_completion_tokens
        (OpenAI's), or max_tokens for providers that read only it."""
        return str(self.response.output_cap_field or "max_completion_tokens") if self.response is not None \
            else "max_completion_tokens"

    @property
    def stream_usage_reported(self) -> bool:
        """The served model's provider reports a stream's usage unasked and refuses stream_options (Mistral's):
        send a streamed completion without them, where OpenAI's needs stream_options.include_usage."""
        return bool(self.response.stream_usage_reported) if self.response is not None else False

    def error_body(self) -> bytes:
        e = self.response.error
        return json.dumps({"error": {"type": e.type, "code": e.code, "message": e.message,
                                     "param": e.param or None}}).encode()


@dataclass(frozen=True)
class Settled:
    outcome: str  # settled | exists | settled_late
    cost_nanos: int
    charge_nanos: int
    balance_after_nanos: int


def _authorize_request(api_key: str, endpoint: str, model: str, request_id: str, prompt_bytes: int,
                       message_count: int, max_output_tokens: int, stream: bool, **attribution: Any) -> Any:
    """`attribution` holds the Attribution fields (feature, thread_id, tags, ...) and optionally
    input_tokens, image_count, choices (n: completions generated), web_searches, service_tier,
    unseen_input (the input includes what the request only refers to), seconds and audio_bytes (speech to
    text: the audio's seconds when known exactly, else its size), cache_write ("5m" or "1h": the longest
    cache the body asks its input written to, Anthropic's cache_control), audio_output=True (the reply may
    be spoken: modalities include "audio"), unbounded_web_search_tools and unbounded_file_search (search
    tools given no bound: bounded at the plan's default, see Decision.max_tool_calls), image_model,
    image_generation_calls and partial_images (the Responses API's image_generation tool: the image model
    that prices its images, its calls' bound, its partial images a call), containers and container_memory
    (hosted containers the provider may make: code_interpreter, shell), image_scale (the standard image's most
    tokens one image may bill: its size, a GIF's frames), maps_grounding (Gemini's googleMaps tool),
    image_model_default (the image tool names no model: AuthorizeResponse.image_model says the one to set),
    service_tier_implied (service_tier is the provider's default, Anthropic's priority: never refused),
    output_cap_fixed (no output cap can be written into the request, a compaction: never fitted),
    output_cap_param (the field the client gave its cap in, where not its API's first: a refusal names it),
    documents, document_bytes and document_tokens_max (a rerank: its documents, their bytes, the most tokens
    the provider reads of each), least_output_cap (the least cap the provider accepts: Anthropic's max_tokens
    past its thinking budget_tokens; a fitted cap is never below it), search_context_size (the size a chat
    completion asks its web search for, web_search_options.search_context_size: a fee by it where priced),
    client_address, user_agent,
    problem=(code, message, param), count_tokens=True (a free token count: nothing reserved, nothing
    to settle), stored_response_id (a stored response read, deleted or cancelled: free, its customer's
    keys only), previous_response_id (the stored response a Responses API request continues),
    creates="conversation" or "file" (POST /v1/conversations, /v1/files: free, settled with the new id),
    creates_at ("azure" for an Azure OpenAI client's, made on the operator's Azure account; else OpenAI's),
    conversation_id (the conversation a Responses API request adds to) and file_ids (the files its input
    refers to); charge_held_on_expiry=True for a request on its way to the provider (a reservation neither
    settled nor released by its deadline is then charged as held, not released), call_token (unique to the
    client's request, when its request id comes from the client: another request reusing the id while this one
    is in flight is refused), thread_budget_nanos (a budget the caller sets on its thread_id's total charge: a
    request whose hold would pass it is refused, budget_exceeded), max_charge_nanos (the most this one request may
    hold, beside the plan's max_request_charge: past it, request_too_costly)."""
    if endpoint not in ENDPOINTS and "problem" not in attribution and not attribution.get("stored_response_id"):
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}")
    tags = attribution.pop("tags", {})
    client = types_pb2.ClientInfo(address=attribution.pop("client_address", ""),
                                  user_agent=attribution.pop("user_agent", ""))
    problem = attribution.pop("problem", None)
    count_tokens = bool(attribution.pop("count_tokens", False))
    stored_response_id = attribution.pop("stored_response_id", "")
    previous_response_id = attribution.pop("previous_response_id", "")
    creates = attribution.pop("creates", "")
    creates_at = attribution.pop("creates_at", "")
    conversation_id = attribution.pop("conversation_id", "")
    file_ids = list(attribution.pop("file_ids", ()))
    charge_held_on_expiry = bool(attribution.pop("charge_held_on_expiry", False))
    call_token = attribution.pop("call_token", "")
    thread_budget = types_pb2.Money(nanos=attribution.pop("thread_budget_nanos", 0))
    max_charge = types_pb2.Money(nanos=attribution.pop("max_charge_nanos", 0))
    shape = policy_pb2.RequestShape(prompt_bytes=prompt_bytes, message_count=message_count,
                                    max_output_tokens=max_output_tokens, stream=stream,
                                    input_tokens=attribution.pop("input_tokens", 0),
                                    image_count=attribution.pop("image_count", 0),
                                    choices=attribution.pop("choices", 0),
                                    web_searches=attribution.pop("web_searches", 0),
                                    file_searches=attribution.pop("file_searches", 0),
                                    service_tier=attribution.pop("service_tier", ""),
                                    unseen_input=bool(attribution.pop("unseen_input", False)),
                                    seconds=attribution.pop("seconds", 0),
                                    audio_bytes=attribution.pop("audio_bytes", 0),
                                    cache_write=attribution.pop("cache_write", ""),
                                    audio_output=bool(attribution.pop("audio_output", False)),
                                    unbounded_web_search_tools=attribution.pop("unbounded_web_search_tools", 0),
                                    unbounded_file_search=bool(attribution.pop("unbounded_file_search", False)),
                                    image_model=attribution.pop("image_model", ""),
                                    image_generation_calls=attribution.pop("image_generation_calls", 0),
                                    partial_images=attribution.pop("partial_images", 0),
                                    containers=attribution.pop("containers", 0),
                                    container_memory=attribution.pop("container_memory", ""),
                                    image_scale=attribution.pop("image_scale", 0),
                                    maps_grounding=bool(attribution.pop("maps_grounding", False)),
                                    image_model_default=bool(attribution.pop("image_model_default", False)),
                                    service_tier_implied=bool(attribution.pop("service_tier_implied", False)),
                                    output_cap_fixed=bool(attribution.pop("output_cap_fixed", False)),
                                    output_cap_param=attribution.pop("output_cap_param", ""),
                                    documents=attribution.pop("documents", 0),
                                    document_bytes=attribution.pop("document_bytes", 0),
                                    document_tokens_max=attribution.pop("document_tokens_max", 0),
                                    least_output_cap=attribution.pop("least_output_cap", 0),
                                    search_context_size=attribution.pop("search_context_size", ""),
                                    fallback_models=list(attribution.pop("fallback_models", ())),
                                    advisor_model=attribution.pop("advisor_model", ""),
                                    advisor_calls=attribution.pop("advisor_calls", 0),
                                    advisor_max_tokens=attribution.pop("advisor_max_tokens", 0),
                                    fallbacks_routed=bool(attribution.pop("fallbacks_routed", False)),
                                    geo=attribution.pop("geo", ""),
                                    web_results=attribution.pop("web_results", 0),
                                    web_results_per_search=attribution.pop("web_results_per_search", 0),
                                    fallbacks_param=attribution.pop("fallbacks_param", ""))
    request = policy_pb2.AuthorizeRequest(
        api_key=api_key, endpoint=types_pb2.EndpointFamily.Value(endpoint.upper()) if endpoint in ENDPOINTS else 0,
        model=model, attribution=types_pb2.Attribution(request_id=request_id, tags=tags, **attribution),
        shape=shape, client=client, count_tokens=count_tokens, stored_response_id=stored_response_id,
        previous_response_id=previous_response_id, creates=creates, creates_at=creates_at,
        conversation_id=conversation_id,
        file_ids=file_ids, charge_held_on_expiry=charge_held_on_expiry, call_token=call_token,
        thread_budget=thread_budget, max_charge=max_charge)
    if problem is not None:
        code, message, param = problem
        request.problem.CopyFrom(types_pb2.OpenAIError(code=code, message=message, param=param))
    return request


_USAGE_FIELDS = frozenset(policy_pb2.Usage.DESCRIPTOR.fields_by_name)


def _settle_request(request_id: str, input_tokens: int, output_tokens: int, cached_input_tokens: int,
                    **extra: Any) -> Any:
    """`extra` holds further Usage fields (images, cache_write_input_tokens, reported_cost in nanos, ...) and
    SettleRequest fields (served_model, upstream_status, stream_interrupted, usage_estimated, ...)."""
    usage = {name: extra.pop(name) for name in list(extra) if name in _USAGE_FIELDS}
    reported = usage.pop("reported_cost", None)  # what the provider said it charged, nanos (None: nothing said)
    if reported is not None:
        usage["reported_cost"] = reported if isinstance(reported, types_pb2.Money) else types_pb2.Money(nanos=reported)
    if usage.get("parts"):  # UsagePart messages, or their fields (a dict, a dataclass)
        usage["parts"] = [p if isinstance(p, policy_pb2.UsagePart) else policy_pb2.UsagePart(
            **(p if isinstance(p, dict) else asdict(p))) for p in usage["parts"]]
    return policy_pb2.SettleRequest(request_id=request_id, usage=policy_pb2.Usage(
        input_tokens=input_tokens, output_tokens=output_tokens, cached_input_tokens=cached_input_tokens, **usage),
        **extra)


def _released(reply: Any) -> str:
    return policy_pb2.ReleaseOutcome.Name(reply.outcome).lower()


def _decision(r: Any) -> Decision:
    name = policy_pb2.Decision.Name(r.decision).lower()
    return Decision(name != "deny", name, r.reason, r.message, r.http_status, r.request_id, r.served_model,
                    r.route, r.max_output_tokens, r.reserved.nanos, r.retry_after_seconds, r)


def _settled(r: Any) -> Settled:
    return Settled(policy_pb2.SettleOutcome.Name(r.outcome).lower(), r.cost.nanos, r.charge.nanos,
                   r.balance_after.nanos)


def _error(error: grpc.RpcError) -> PolicydCallError:
    reason = dict(error.trailing_metadata() or ()).get("policyd-reason", "") if hasattr(error, "trailing_metadata") else ""
    return PolicydCallError(error.code(), reason or error.code().name.lower(), error.details() or "")


class PolicyClient:
    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None,
                 deadline_seconds: float = DEADLINE_SECONDS, retries: int = RETRIES) -> None:
        self.channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        self.deadline = deadline_seconds
        self.retries = retries

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any, idempotent: bool, waits: float = 0) -> Any:
        for attempt in range(self.retries + 1 if idempotent else 1):
            try:
                return method(request, timeout=self.deadline + waits)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= (self.retries if idempotent else 0):
                    raise _error(error) from None
                time.sleep(RETRY_BACKOFF_SECONDS * (attempt + 1))
        raise AssertionError("unreachable")

    def authorize(self, api_key: str, endpoint: str, model: str, request_id: str = "", prompt_bytes: int = 0,
                  message_count: int = 1, max_output_tokens: int = 0, stream: bool = False, **attribution: Any) -> Decision:
        request = _authorize_request(api_key, endpoint, model, request_id, prompt_bytes, message_count,
                                     max_output_tokens, stream, **attribution)
        return _decision(self._call(self.stub.Authorize, request, idempotent=bool(request_id)))

    def settle(self, request_id: str, input_tokens: int = 0, output_tokens: int = 0, cached_input_tokens: int = 0,
               **extra: Any) -> Settled:
        request = _settle_request(request_id, input_tokens, output_tokens, cached_input_tokens, **extra)
        return _settled(self._call(self.stub.Settle, request, idempotent=True))

    def release(self, request_id: str, reason: str = "") -> str:
        return _released(self._call(self.stub.Release, policy_pb2.ReleaseRequest(request_id=request_id, reason=reason),
                                    idempotent=True))

    def await_response(self, request_id: str, provider_response_id: str, provider_account: str = "") -> Any:
        """A background response not ended when its reply did: its hold kept until it is settled (by policyd when
        it follows it, a policy_pb2.AwaitResponseResponse's `followed`; else by you, when it ends)."""
        return self._call(self.stub.AwaitResponse, policy_pb2.AwaitResponseRequest(
            request_id=request_id, provider_response_id=provider_response_id, provider_account=provider_account),
            idempotent=True)

    def describe_key(self, api_key: str, end_user_id: str = "") -> Any:
        """What a key may still spend (a policy_pb2.KeySummary), for answering the key's holder (GET /v1/key); with
        an end user of its customer, that end user's limits too."""
        return self._call(self.stub.DescribeKey, policy_pb2.DescribeKeyRequest(api_key=api_key,
                                                                                end_user_id=end_user_id),
                          idempotent=True)

    def describe_request(self, api_key: str, request_id: str, wait_ms: int = 0) -> Any:
        """One request of the key's customer (a policy_pb2.RequestSummary: its charge, usage and status), for
        answering the key's holder (GET /v1/requests/{id}); one in progress waited for up to wait_ms to close."""
        return self._call(self.stub.DescribeRequest, policy_pb2.DescribeRequestRequest(
            api_key=api_key, request_id=request_id, wait_ms=wait_ms), idempotent=True, waits=wait_ms / 1000)

    def list_requests(self, api_key: str, limit: int = 0, after: str = "") -> Any:
        """The key's customer's requests, newest first (a policy_pb2.ListRequestsResponse: `requests`, each a
        RequestSummary, and `has_more`), for answering the key's holder (GET /v1/requests); `limit` (1-100, 0: 20)
        of them past the request `after` (the last of the page before)."""
        return self._call(self.stub.ListRequests, policy_pb2.ListRequestsRequest(api_key=api_key, limit=limit,
                                                                                 after=after), idempotent=True)

    def usage_summary(self, api_key: str, group_by: tuple[str, ...] | list[str] = (), bucket: str = "",
                      since_unix: int = 0, until_unix: int = 0, timezone: str = "") -> Any:
        """The key's customer's usage summed over a window (a policy_pb2.UsageSummary: its `groups`, each with its
        counts, tokens and charge), for answering the key's holder (GET /v1/usage); grouped by up to 3 dimensions
        (model, feature, thread, key, ...), by hour, day or month if `bucket` (of `timezone`, an IANA name: the
        policy's unless told); the last 30 days unless told."""
        return self._call(self.stub.SummarizeUsage, policy_pb2.UsageSummaryRequest(
            api_key=api_key, group_by=list(group_by), bucket=bucket, since_unix=since_unix, until_unix=until_unix,
            timezone=timezone), idempotent=True)


class AsyncPolicyClient:
    """The channel is opened on first use, in the event loop that uses it (so the client can be built
    before a server such as uvicorn starts its loop)."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None,
                 deadline_seconds: float = DEADLINE_SECONDS, retries: int = RETRIES) -> None:
        self.target = target
        self.credentials = credentials
        self.channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self.deadline = deadline_seconds
        self.retries = retries

    @property
    def stub(self) -> Any:
        if self._stub is None:
            self.channel = (grpc.aio.secure_channel(self.target, self.credentials) if self.credentials
                            else grpc.aio.insecure_channel(self.target))
            self._stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        return self._stub

    async def __aenter__(self) -> "AsyncPolicyClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel, self._stub = None, None

    async def _call(self, method: Any, request: Any, idempotent: bool, waits: float = 0) -> Any:
        for attempt in range(self.retries + 1 if idempotent else 1):
            try:
                return await method(request, timeout=self.deadline + waits)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt >= (self.retries if idempotent else 0):
                    raise _error(error) from None
                await asyncio.sleep(RETRY_BACKOFF_SECONDS * (attempt + 1))
        raise AssertionError("unreachable")

    async def authorize(self, api_key: str, endpoint: str, model: str, request_id: str = "", prompt_bytes: int = 0,
                        message_count: int = 1, max_output_tokens: int = 0, stream: bool = False,
                        **attribution: Any) -> Decision:
        request = _authorize_request(api_key, endpoint, model, request_id, prompt_bytes, message_count,
                                     max_output_tokens, stream, **attribution)
        return _decision(await self._call(self.stub.Authorize, request, idempotent=bool(request_id)))

    async def settle(self, request_id: str, input_tokens: int = 0, output_tokens: int = 0,
                     cached_input_tokens: int = 0, **extra: Any) -> Settled:
        request = _settle_request(request_id, input_tokens, output_tokens, cached_input_tokens, **extra)
        return _settled(await self._call(self.stub.Settle, request, idempotent=True))

    async def release(self, request_id: str, reason: str = "") -> str:
        return _released(await self._call(self.stub.Release,
                                           policy_pb2.ReleaseRequest(request_id=request_id, reason=reason),
                                           idempotent=True))

    async def await_response(self, request_id: str, provider_response_id: str, provider_account: str = "") -> Any:
        """As PolicyClient.await_response."""
        return await self._call(self.stub.AwaitResponse, policy_pb2.AwaitResponseRequest(
            request_id=request_id, provider_response_id=provider_response_id, provider_account=provider_account),
            idempotent=True)

    async def describe_key(self, api_key: str, end_user_id: str = "") -> Any:
        """As PolicyClient.describe_key."""
        return await self._call(self.stub.DescribeKey, policy_pb2.DescribeKeyRequest(api_key=api_key,
                                                                                      end_user_id=end_user_id),
                                idempotent=True)

    async def describe_request(self, api_key: str, request_id: str, wait_ms: int = 0) -> Any:
        """As PolicyClient.describe_request."""
        return await self._call(self.stub.DescribeRequest, policy_pb2.DescribeRequestRequest(
            api_key=api_key, request_id=request_id, wait_ms=wait_ms), idempotent=True, waits=wait_ms / 1000)

    async def list_requests(self, api_key: str, limit: int = 0, after: str = "") -> Any:
        """As PolicyClient.list_requests."""
        return await self._call(self.stub.ListRequests, policy_pb2.ListRequestsRequest(
            api_key=api_key, limit=limit, after=after), idempotent=True)

    async def usage_summary(self, api_key: str, group_by: tuple[str, ...] | list[str] = (), bucket: str = "",
                            since_unix: int = 0, until_unix: int = 0, timezone: str = "") -> Any:
        """As PolicyClient.usage_summary."""
        return await self._call(self.stub.SummarizeUsage, policy_pb2.UsageSummaryRequest(
            api_key=api_key, group_by=list(group_by), bucket=bucket, since_unix=since_unix, until_unix=until_unix,
            timezone=timezone), idempotent=True)
