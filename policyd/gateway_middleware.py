"""An ASGI middleware that puts policyd around any Python OpenAI-compatible proxy (no Envoy needed).

    from policyd.gateway_middleware import PolicydMiddleware
    from policyd_client import AsyncPolicyClient

    app = PolicydMiddleware(your_proxy_app, AsyncPolicyClient("127.0.0.1:50051"))

Per HTTP request, the same steps as the Envoy filters (ext_authz + ext_proc), over policyd's gRPC API:

1. read the body (at most `body_bytes_max`) and understand it (`http_api.parse_call`); an unusable
   request is answered with an OpenAI-style error, and policyd records the denial;
2. Authorize: a denial is answered with its HTTP status, `retry-after` and OpenAI error body, and
   the proxy never sees the request; policyd unreachable answers 503 (fail closed);
3. the proxy gets the request with the body policy requires (served model, output cap,
   `stream_options.include_usage`), without the customer's key, and with
   `x-policyd-request-id`, `x-policyd-served-model` and `x-policyd-route` headers, and asking for the
   reply as it is (`accept-encoding: identity`; one compressed anyway, gzip or deflate, is read decoded);
4. the response passes through as sent while its usage is read (JSON or SSE), but for the usage event of
   a stream whose client did not ask for it, which policyd asked for and keeps from it (unasked_usage);
   at its end the call is settled with the provider's usage, released on an upstream error, or, when the
   client went away or the stream was cut, charged for what was delivered (`usage_estimated`). The
   settlement runs shielded from the request's cancellation;
5. a background response (the Responses API's `background: true`, or Perplexity's async chat completion, a
   job) not ended when its reply (or its cut stream) did goes on at the provider: its hold is kept (policyd's
   AwaitResponse) and the middleware follows it, asking the proxy for it (`GET .../responses/{id}`, or
   `.../async/chat/completions/{id}`, every `background_poll_seconds`) until it
   ends, then settles it with the usage reported. One the middleware stops following (it stopped, or
   `background_seconds` passed) is charged as held at policyd's deadline, never released free.

Token counts (free at the provider) are checked as model calls are (key, plan, model) and go to the
proxy without the customer's key, with nothing reserved or settled. Other paths that are not model
calls go to the proxy untouched when `strict` is False; by default they are
refused (400, `unknown_endpoint`, recorded), so nothing reaches a provider unmetered. GET /v1/models and
GET /v1/key are answered from policyd's DescribeKey: the models the key may use, what it may still spend.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import asdict
from typing import Any, Awaitable, Callable, MutableMapping

from policyd import http_api, own_usage, request_lookup
from policyd import reasons, unasked_usage
from policyd.domain import KeySummary, LimitState, RateLimit, RequestSummary
from policyd.usage_capture import ResponseReader, background_answer, closing, vertex_operation_read
from policyd_client import AsyncPolicyClient, Decision, PolicydCallError

log = logging.getLogger("policyd.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

ACCOUNT_HEADERS = frozenset(http_api.PROVIDER_ACCOUNT_HEADERS)
STRIPPED_HEADERS = frozenset({*http_api.CUSTOMER_KEY_HEADERS, *http_api.ACCOUNT_REQUEST_HEADERS, "content-length",
                              http_api.REQUEST_ID_HEADER,
                              "x-policyd-served-model", "x-policyd-route", "accept-encoding"})


class PolicydMiddleware:
    def __init__(self, app: ASGIApp, policy: AsyncPolicyClient, *, strict: bool = True,
                 body_bytes_max: int = http_api.REQUEST_BODY_BYTES_MAX, background_poll_seconds: float = 5.0,
                 background_seconds: float = 3 * 3600) -> None:
        self.app = app
        self.policy = policy
        self.strict = strict
        self.body_bytes_max = body_bytes_max
        self.background_poll_seconds = background_poll_seconds
        self.background_seconds = background_seconds
        self._closing: set[asyncio.Task[None]] = set()
        self._following: set[asyncio.Task[None]] = set()  # background responses asked for until they end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path, query = scope.get("method", "GET"), scope.get("path", "/"), scope.get("query_string", b"")
        # a file uploaded goes on as the client sends it, never read (http_api.streamed_upload)
        streamed = http_api.streamed_upload(method, path)
        body, size, complete = (b"", 0, True) if streamed else await self._read_body(receive)
        if not complete:
            return  # the client left before sending its request: nothing was authorized
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        client = scope.get("client") or ("", 0)
        if query:
            path = f"{path}?{query.decode('latin-1')}"
        call = http_api.parse_call(method, path, headers, body, client_address=str(client[0]))
        aws = http_api.aws_client_path(path)  # a Bedrock client: policyd's own replies in AWS's error shape too
        if size > self.body_bytes_max:
            call.problem, call.problem_message, call.problem_param = (
                "request_too_large", f"the request body is larger than {self.body_bytes_max} bytes", "")
        if call.key_summary or call.models_listing:
            await self._describe_key(call, send)
            return
        if call.request_lookup and not call.problem:  # GET /v1/requests/{id}
            await _answered_by_policyd(send, self.policy.describe_request(
                call.api_key, call.request_lookup, call.lookup_wait_ms),
                lambda found: http_api.request_summary_body(_request_summary(found)))
            return
        if call.request_listing and not call.problem:  # GET /v1/requests
            await _answered_by_policyd(send, self.policy.list_requests(
                call.api_key, call.listing_limit, call.listing_after),
                lambda page: http_api.request_list_body([_request_summary(m) for m in page.requests], page.has_more))
            return
        if call.usage_summary and not call.problem:  # GET /v1/usage
            await _answered_by_policyd(send, self.policy.usage_summary(
                call.api_key, call.usage_group_by, call.usage_bucket, call.usage_since_ms // 1000,
                call.usage_until_ms // 1000, call.usage_timezone),
                lambda summed: http_api.usage_summary_body(_usage_rows(summed), summed.truncated, summed.currency, call))
            return
        if not call.endpoint and not self.strict:
            await self.app(scope, _replay(body, receive=receive), send)
            return
        if http_api.batch_made(method, path):  # its input file is read where policyd's provider accounts are
            call.problem, call.problem_message, call.problem_param = (
                "unknown_endpoint", "batches are held by policyd's Envoy gateway, which reads their input file; "
                "this gateway does not offer them", "path")
        if call.problem:
            await self._refuse_unusable(call, send, aws)
            return
        request_id = call.attribution.request_id or f"gw-{uuid.uuid4().hex}"
        try:
            # the request's shape as the Envoy filters give it to the engine, every field of it (fields once
            # listed here one by one fell behind: speech's seconds, Anthropic's implied tier)
            decision = await self.policy.authorize(
                call.api_key, call.endpoint, call.model, request_id=request_id, count_tokens=call.count_tokens,
                stored_response_id=call.stored_response, previous_response_id=call.previous_response,
                creates=call.creates, creates_at=call.creates_at, conversation_id=call.conversation,
                file_ids=list(call.files),
                charge_held_on_expiry=True,  # this proxy sends it on to the provider, which bills it
                call_token=uuid.uuid4().hex,  # the client's id may be reused by another of its requests meanwhile
                thread_budget_nanos=call.thread_budget, max_charge_nanos=call.max_charge,
                client_address=call.client_address, user_agent=call.user_agent[:1024],
                **asdict(call.authorize_input().shape), **_attribution(call))
        except PolicydCallError as error:
            log.error("authorize failed (%s): refusing the request", error.reason)
            await _respond(send, 503, http_api.error_body("server_error", "policy_unavailable",
                                                          http_api.POLICY_UNAVAILABLE_MESSAGE),
                           retry_after=1, aws=aws)
            return
        if not decision.allowed:
            await _respond(send, decision.http_status, decision.error_body(), decision.retry_after_seconds,
                           request_id=decision.request_id, aws=aws)
            return
        if call.count_tokens:  # free: on to the proxy without the customer's key; nothing to read or settle, and
            # nothing to rewrite but a model the provider names otherwise
            renamed = None if call.body is None else http_api.rewrite_body(
                call.body, call.endpoint, decision.upstream_model, call.model, 0, True, False, call.model_in_path)
            body = http_api.body_sent(call.body, renamed, call.body_decoded) or body
            await self.app(_upstream_scope(scope, call, decision, body), _replay(body, receive=receive), send)
            return
        await self._forward(scope, receive, send, call, None if streamed else body, decision)

    async def _describe_key(self, call: http_api.HttpCall, send: Send) -> None:
        """GET /v1/key: what the key may still spend; GET /v1/models: the models it may use; as policyd
        tells them (the provider's own list would show models the key may not use)."""
        try:
            message = await self.policy.describe_key(call.api_key, call.attribution.end_user_id)
        except PolicydCallError as error:
            await _refused_by_policyd(send, error)
            return
        if call.models_listing:
            await _respond(send, *http_api.models_reply([(m.id, m.owned_by) for m in message.models],
                                                        call.listing_shape, call.model))
            return
        await _respond(send, 200, http_api.key_summary_body(KeySummary(
            key_id=message.key_id, customer_id=message.customer_id, plan=message.plan,
            currency=message.balance.currency, balance=message.balance.nanos if message.has_wallet else None,
            reserved=message.reserved.nanos,
            limits=tuple(LimitState(s.name, s.scope, s.window, s.unit, s.limit, s.used, s.resets_unix)
                         for s in message.limits),
            end_user_id=message.end_user_id, end_user_paused=message.end_user_paused)))

    async def _read_body(self, receive: Receive) -> tuple[bytes, int, bool]:
        """(the body, its size, whether it arrived whole); past body_bytes_max only the size is kept."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", size, False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.body_bytes_max:
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), size, True

    async def _refuse_unusable(self, call: http_api.HttpCall, send: Send, aws: bool) -> None:
        """Answer a request no policy could make sense of; policyd records the denial."""
        try:
            decision = await self.policy.authorize(
                call.api_key, call.endpoint, call.model[:256], request_id=call.attribution.request_id,
                client_address=call.client_address, user_agent=call.user_agent[:1024],
                problem=(call.problem, call.problem_message, call.problem_param), **_attribution(call))
            await _respond(send, decision.http_status, decision.error_body(), request_id=decision.request_id, aws=aws)
        except PolicydCallError:
            await _respond(send, reasons.http_status(call.problem), http_api.error_body(
                reasons.error_type(call.problem), call.problem, call.problem_message, call.problem_param), aws=aws)

    async def _forward(self, scope: Scope, receive: Receive, send: Send, call: http_api.HttpCall, body: bytes | None,
                       decision: Decision) -> None:
        """`body`: the request's, as read; None for an upload, which the proxy reads from the client itself."""
        rewritten = None if call.body is None else http_api.rewrite_body(  # a conversation or file made: no body read
            call.body, call.endpoint, decision.upstream_model, call.model, decision.max_output_tokens,
            call.keeps_its_cap_under(decision.max_output_tokens), call.stream, call.model_in_path,
            decision.max_tool_calls, decision.image_model, decision.output_cap_field, decision.stream_usage_reported,
            decision.fallback_models, decision.advisor_model)
        body = http_api.body_sent(call.body, rewritten, call.body_decoded) or body
        exchange = _Exchange(decision.request_id, decision.served_model,
                             ResponseReader(call.endpoint, call.stream, call.input_tokens, stored=call.stores_reply,
                                            output_cap=decision.max_output_tokens))
        exchange.background = call.background

        refused = http_api.credentials_refused_reply()
        unasked: unasked_usage.UnaskedUsage | None = None  # the usage event, kept from a client that did not ask

        async def metered_send(message: Message) -> None:
            nonlocal unasked
            if message["type"] == "http.response.start":
                exchange.status = int(message["status"])
                response_headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                                    for k, v in message.get("headers", [])}
                exchange.reader.encoded_as(response_headers.get("content-encoding", ""))
                exchange.reader.served_on(response_headers.get(http_api.BEDROCK_TIER_HEADER, ""),
                                          response_headers.get(http_api.BEDROCK_LATENCY_HEADER, ""))
                if call.usage_kept_from_client(decision.stream_usage_reported) and unasked_usage.applies(
                        response_headers.get("content-type", ""), response_headers.get("content-encoding", "")):
                    unasked = unasked_usage.UnaskedUsage()
                    message = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                                      if k.decode("latin-1").lower() != "content-length"]}
                kept = [(k, v) for k, v in message.get("headers", []) if k.decode("latin-1").lower() not in ACCOUNT_HEADERS]
                upload = http_api.gemini_upload_begun(response_headers) if call.creates_at == "google" else ""
                if upload:  # a Gemini upload begun: its id remembered, the URL of its bytes made the middleware's own
                    exchange.reader.response_id = upload
                    kept = [(k, _own_upload_url(scope, v) if k.lower() == http_api.GEMINI_UPLOAD_URL_HEADER.encode()
                             else v) for k, v in kept]
                if exchange.status in http_api.CREDENTIAL_REFUSALS:  # the operator's credentials, not the customer's
                    kept = [(k.encode(), v.encode()) for k, v in refused[1]]
                    kept.append((b"content-length", str(len(refused[2])).encode()))
                    message = {**message, "status": refused[0]}
                added = [(http_api.REQUEST_ID_HEADER, decision.request_id), *http_api.rate_limit_headers(
                    (RateLimit(r.unit, r.limit, r.remaining, r.resets_unix_ms) for r in decision.rate_limits),
                    int(time.time() * 1000))]
                message = {**message, "headers": [*kept, *((k.encode(), v.encode()) for k, v in added)]}
                await send(message)
                return
            if message["type"] == "http.response.body":
                sent = message.get("body", b"")
                if exchange.status in http_api.CREDENTIAL_REFUSALS:  # the provider's words stay here
                    message = {**message, "body": b"" if message.get("more_body", False) else refused[2]}
                elif unasked is not None:
                    shown = unasked.feed(sent) + (b"" if message.get("more_body", False) else unasked.finish())
                    message = {**message, "body": shown}
                await send(message)
                exchange.reader.feed(sent)  # counted once delivered, as the provider sent it
                if not message.get("more_body", False):
                    exchange.reader.finish()
                    await self._close_shielded(exchange, cut=False)
                return
            await send(message)

        # the proxy does not read from the client once it has the body, so a client that hangs up is
        # watched for here: the proxy is cancelled (its upstream request with it) and what was delivered is charged
        # (an upload's proxy reads the client itself, and meets its leaving there)
        disconnected = asyncio.Event()
        upstream_scope = exchange.upstream_scope = _upstream_scope(scope, call, decision, body)
        proxied = asyncio.ensure_future(self.app(upstream_scope, receive if body is None else
                                                 _replay(body, disconnected), metered_send))
        watcher = asyncio.ensure_future(
            disconnected.wait() if body is None else _watch_disconnect(receive, disconnected))
        try:
            await asyncio.wait({proxied, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not proxied.done():
                proxied.cancel()
                await asyncio.gather(proxied, return_exceptions=True)
            else:
                proxied.result()  # the proxy's own error propagates
        finally:
            watcher.cancel()
            if not proxied.done():
                proxied.cancel()
            if not exchange.closed:
                # the client went away, the proxy failed, or this request was cancelled: settle what was delivered
                exchange.client_left = disconnected.is_set()
                await self._close_shielded(exchange, cut=True)

    async def _close_shielded(self, exchange: "_Exchange", cut: bool) -> None:
        """Close in a task of its own: cancelling the request (a client gone, a server stopping) cannot
        interrupt a settlement once it started."""
        task = asyncio.create_task(self._close(exchange, cut))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        await asyncio.shield(task)

    async def _close(self, exchange: "_Exchange", cut: bool) -> None:
        if exchange.closed:
            return
        exchange.closed = True
        reader = exchange.reader
        end = closing(exchange.status, reader, cut, client_left=exchange.client_left, background=exchange.background)
        try:
            if end.action == "poll":  # it goes on at the provider: held, and followed to its end
                await self.policy.await_response(exchange.request_id, reader.response_id)
                task = asyncio.create_task(self._follow(exchange, reader.response_id))
                self._following.add(task)
                task.add_done_callback(self._following.discard)
            elif end.action == "release":
                await self.policy.release(exchange.request_id, end.reason)
            elif end.action == "settle":
                await self.policy.settle(
                    exchange.request_id, **reader.tokens.fields(), images=reader.images,
                    served_model=exchange.served_model, upstream_status=exchange.status,
                    stream_interrupted=end.interrupted, provider_response_id=reader.response_id)
            else:  # output from what was delivered (or as held); the rest as the provider reported it before the cut
                await self.policy.settle(
                    exchange.request_id, **{**reader.tokens.fields(), "output_tokens": reader.estimated_output_tokens()},
                    usage_estimated=True, output_as_held=end.output_as_held,
                    stream_interrupted=end.interrupted, error_class=end.reason,
                    upstream_status=exchange.status, provider_response_id=reader.response_id)
        except PolicydCallError as error:
            # policyd refused or could not be reached: the reservation expires and is voided
            log.warning("closing %s: %s", exchange.request_id, error.reason)

    async def _follow(self, exchange: "_Exchange", response_id: str) -> None:
        """Ask the proxy for a background response until it ends, then settle it with the usage it reports
        (failed or cancelled with none: released; gone: charged as held)."""
        deadline = time.monotonic() + self.background_seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(self.background_poll_seconds)
            try:
                status, body = await _asked(self.app, exchange.upstream_scope, response_id, exchange.reader.endpoint)
            except Exception:
                log.exception("asking for background response %s", response_id[:64])
                continue
            action, reader = background_answer(status, body, exchange.reader.endpoint)
            if action == "wait":
                continue  # running, or not answered: asked again
            try:
                if action == "settle":  # (a Veo operation's: its videos, and the files they are downloaded by)
                    await self.policy.settle(exchange.request_id, **reader.tokens.fields(), upstream_status=200,
                                             served_model=exchange.served_model, provider_response_id=response_id,
                                             **({"images": reader.images, "provider_file_ids": reader.files}
                                                if reader.files or reader.images else {}))
                elif action == "release":
                    await self.policy.release(exchange.request_id, f"background_{reader.response_status}")
                else:  # gone before it was charged, or ended with no usage: charged as held
                    reason = "background_gone" if action == "gone" else "no_usage_reported"
                    await self.policy.settle(exchange.request_id, usage_estimated=True, output_as_held=True,
                                             error_class=f"usage_estimated:{reason}", provider_response_id=response_id)
            except PolicydCallError as error:
                log.warning("background response %s of %s: %s", response_id[:64], exchange.request_id, error.reason)
            return
        log.warning("background response %s of %s not ended after %.0f s: policyd charges it as held",
                    response_id[:64], exchange.request_id, self.background_seconds)

    async def aclose(self) -> None:
        """Wait for settlements still running (call at shutdown); stop following background responses (their
        holds stand, charged as held at policyd's deadline)."""
        for task in self._following:
            task.cancel()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class _Exchange:
    def __init__(self, request_id: str, served_model: str, reader: ResponseReader) -> None:
        self.request_id = request_id
        self.served_model = served_model
        self.reader = reader
        self.background = False  # a background response: followed after its reply (PolicydMiddleware._follow)
        self.upstream_scope: Scope = {}
        self.client_left = True  # whether a reply that never began was left by its client (not the proxy's failure)
        self.status = 0
        self.closed = False


def _own_upload_url(scope: Scope, provider_url: bytes) -> bytes:
    """A Gemini upload's URL (the provider's reply names its own host) at the scheme and host the client
    reached the middleware at."""
    host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"host"), "")
    if not host:
        return provider_url
    origin = f"{scope.get('scheme', 'http')}://{host}"
    return http_api.gemini_upload_url(provider_url.decode("latin-1"), origin).encode("latin-1")


async def _asked(app: ASGIApp, scope: Scope, response_id: str, endpoint: str = "") -> tuple[int, bytes]:
    """The proxy's answer (status, body) for GET of the response a request made, with that request's headers
    (its credentials, if the proxy takes any from the client; never the customer's key) and query. A Veo
    operation is read by its name, beside the models/ of the path that made it; on Vertex AI by a POST of its
    name to its model's :fetchPredictOperation."""
    made = scope.get("path", "/")
    method, body = "GET", b""
    if endpoint == "videos" and response_id.startswith("projects/") and "projects/" in made:
        read, body = vertex_operation_read(response_id)
        path, method = made[:made.find("projects/")] + read, "POST"
    elif endpoint == "videos" and "models/" in made:
        path = made[:made.rfind("models/")] + response_id
    else:
        path = f"{made.rstrip('/')}/{response_id}"
    headers = [(k, v) for k, v in scope.get("headers", [])
               if k.decode("latin-1").lower() not in ("content-length", "content-type", "content-encoding")]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    asked = {**scope, "method": method, "path": path, "raw_path": path.encode("latin-1"), "headers": headers}
    status, parts = 0, []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = int(message["status"])
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(asked, receive, send)
    return status, b"".join(parts)


def _upstream_scope(scope: Scope, call: http_api.HttpCall, decision: Decision, body: bytes | None) -> Scope:
    """The request as the proxy gets it: without the customer's key (headers and query), with policyd's
    headers, and the served model (as the provider names it) where the path names it. `body` None: an
    upload's, which goes on as the client sends it (its own length)."""
    kept = STRIPPED_HEADERS if body is not None else STRIPPED_HEADERS - {"content-length"}
    if call.body_decoded:  # a body the client compressed goes on decoded
        kept = kept | {"content-encoding"}
    headers = [(k, v) for k, v in scope.get("headers", []) if k.decode("latin-1").lower() not in kept]
    if body is not None:
        headers.append((b"content-length", str(len(body)).encode()))
    headers += [(http_api.REQUEST_ID_HEADER.encode(), decision.request_id.encode()),
                (b"x-policyd-served-model", decision.served_model.encode()),
                (b"x-policyd-route", decision.route.encode()),
                (b"accept-encoding", b"identity")]  # the reply as it is, its usage readable
    upstream = {**scope, "headers": headers}
    query = scope.get("query_string", b"").decode("latin-1")
    full = f"{scope.get('path', '/')}?{query}" if query else scope.get("path", "/")
    path = http_api.upstream_path(full, decision.upstream_model, call.model)
    if path != full:
        base, _, rest = path.partition("?")
        upstream.update(path=base, raw_path=base.encode("latin-1"), query_string=rest.encode("latin-1"))
    return upstream


def _attribution(call: http_api.HttpCall) -> dict[str, Any]:
    fields = asdict(call.attribution)
    fields.pop("request_id")
    return fields


def _replay(body: bytes, disconnected: asyncio.Event | None = None, receive: Receive | None = None) -> Receive:
    """A receive() that gives the (rewritten) body once; then the client's own messages, or
    http.disconnect once `disconnected` is set."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is not None:
            return await receive()
        assert disconnected is not None
        await disconnected.wait()
        return {"type": "http.disconnect"}

    return replay


async def _watch_disconnect(receive: Receive, disconnected: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    disconnected.set()



async def _answered_by_policyd(send: Send, asking: Awaitable[Any], body: Callable[[Any], bytes]) -> None:
    """A question about the key policyd answers (GET /v1/requests[/{id}], /v1/usage): its answer's body, or its
    refusal."""
    try:
        answer = await asking
    except PolicydCallError as error:
        await _refused_by_policyd(send, error)
        return
    await _respond(send, 200, body(answer))


def _usage_rows(summed: Any) -> list[own_usage.UsageRow]:
    """A policy_pb2.UsageSummary's groups, as the HTTP API's body is made of them."""
    return [own_usage.UsageRow(dict(g.group), g.bucket, {name: getattr(g, name) for name in own_usage.COUNTS},
                               g.charge.nanos, g.refunded.nanos, dict(g.usage)) for g in summed.groups]


def _request_summary(message: Any) -> RequestSummary:
    """A policy_pb2.RequestSummary, as the HTTP API's body is made of it."""
    return RequestSummary(
        request_id=message.request_id, created_ms=message.created_unix_ms, status=message.status,
        decision=message.decision, reason=message.reason, message=message.message, endpoint=message.endpoint,
        requested_model=message.requested_model, served_model=message.served_model,
        api_key_id=message.api_key_id, currency=message.charge.currency, charge=message.charge.nanos,
        held=message.held.nanos, refunded=message.refunded.nanos,
        balance_after=message.balance_after.nanos if message.has_balance else None,
        usage={name: getattr(message.usage, name) for name in (*request_lookup.USAGE_FIELDS, "requests")},
        usage_estimated=message.usage_estimated, error_class=message.error_class, feature=message.feature,
        thread_id=message.thread_id, end_user_id=message.end_user_id, agent_id=message.agent_id,
        tags=dict(message.tags))


async def _refused_by_policyd(send: Send, error: PolicydCallError) -> None:
    """A question about the key (GET /v1/key, /v1/models, /v1/requests[/{id}], /v1/usage) policyd refused: its reason as the
    OpenAI-style error its HTTP status carries."""
    await _respond(send, reasons.http_status(error.reason), http_api.error_body(
        reasons.error_type(error.reason), error.reason, reasons.MESSAGES.get(error.reason, error.reason)))


async def _respond(send: Send, status: int, body: bytes, retry_after: int = 0, request_id: str = "",
                   aws: bool = False) -> None:
    """policyd's own reply; `aws`: to a Bedrock client, in AWS's error shape too."""
    named = dict(http_api.reply_headers(status, retry_after))
    if aws:
        status, named, body = http_api.for_aws_clients(status, named, body)
    headers = [(k.encode(), v.encode()) for k, v in named.items()]
    headers.append((b"content-length", str(len(body)).encode()))
    if request_id:
        headers.append((http_api.REQUEST_ID_HEADER.encode(), request_id.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
