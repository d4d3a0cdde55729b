"""Envoy ext_proc (envoy.service.ext_proc.v3.ExternalProcessor/Process) over the decision engine.

Two ext_proc filters call this service, each with a gRPC stream per HTTP request:
- the processing filter (synchronous): after ext_authz, only for a request whose body policy
  rewrites (served model, output cap, stream usage): its headers and body; in the ext_proc-alone
  shape, every request: its headers and body (the decision is made here) and the response headers
  (the reply's request id and rate-limit headers). Its stream ends (cleanly: Envoy goes on without it)
  as soon as nothing is left for it to do, so that a replica stopping or lost while the reply passes
  cannot fail the request (this filter fails closed);
- the observer filter (Envoy's observability mode: Envoy sends, nothing is answered, nothing
  waits), wherever the deciding filter set the observer header: every allowed request, after
  ext_authz from its request headers on, in the ext_proc-alone shape from its response headers on.
  A stream is one message per provider event; none of them waits for policyd (bench/RESULTS.md).
  (The ext_proc-alone shape once read replies that are not streams in the processing filter, asking
  for their bodies at their headers with a mode_override: Envoy sometimes passed a body that arrived
  with its headers on to the client unsent, and the reply was settled as cut, its output unread.)
Whichever reads the response settles it at its end with the provider's usage; an upstream error
releases the reservation and cools the account down; a response cut or a client gone settles what
was delivered (estimated, marked), and a request cut before its response began is released, when
Envoy closes that stream (the observer's deferred_close_timeout after the cut). The observer learns
the request from the dynamic metadata the deciding filter left (`Exchange.observed` says it reads
the response), so the two streams need not reach the same replica. Gateway configs rendered before
(a processing filter sent every response body, or sent the request and response headers after
ext_authz) get their responses read as they ask.

Two gateway shapes (`policyd gateway-config --shape`):
- ext_authz + ext_proc: ext_authz decided and reserved; its decision arrives here as dynamic
  metadata. Requests ext_authz denied never reach these filters.
- ext_proc alone: no metadata arrives, so the decision is made here, at the request-body phase
  (at the headers when there is no body): a denial is an immediate response, an allow sets the
  provider credential and route as ext_authz would. One gRPC stream per request instead of a
  call and a stream.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import duration_pb2

from policyd import background, batches, http_api, request_lookup
from policyd.batches import Batches
from policyd.domain import Decision, UsageReport
from policyd.engine import Engine
from policyd.exchange import EXT_PROC_NAMESPACE, Exchange
from policyd.http_api import REQUEST_ID_HEADER
from policyd.providers import ProviderPool
from policyd.upstream import CONNECTION_ENDED_HEADER, GATEWAY_TIMEOUT_HEADER, UNASKED_USAGE_HEADER, upstream_request
from policyd.usage_capture import closing

log = logging.getLogger("policyd.ext_proc")

COOLDOWN_STATUSES = {429, 500, 502, 503, 504, 529}  # 529: Anthropic's overloaded_error
ATTRIBUTES_NAMESPACE = "envoy.filters.http.ext_proc"
NONE = processing_mode_pb2.ProcessingMode.NONE
# asked for at the headers of a reply the observer does not read: only a decision an older replica made
# (before every reply was observed) leaves one so; a body that came with its headers may pass unread
READ_BODY_HERE = processing_mode_pb2.ProcessingMode(response_body_mode=processing_mode_pb2.ProcessingMode.STREAMED,
                                                    response_trailer_mode=processing_mode_pb2.ProcessingMode.SEND)


def _headers(message: Any) -> dict[str, str]:
    out = {}
    for h in message.headers.headers:
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


@dataclass
class Arrival:
    """A request no ext_authz decided: what its headers said, until its body arrives."""

    method: str
    path: str
    headers: dict[str, str]
    client_address: str

    @classmethod
    def of(cls, request: Any, headers: dict[str, str]) -> "Arrival":
        """`headers`: the request's (_headers of its request_headers)."""
        address = ""
        attributes = request.attributes.get(ATTRIBUTES_NAMESPACE)
        if attributes is not None and "source.address" in attributes.fields:
            address = _host(attributes.fields["source.address"].string_value)
        return cls(headers.get(":method", ""), headers.get(":path", ""),
                   {k: v for k, v in headers.items() if not k.startswith(":")}, address)


def _host(address: str) -> str:
    """The host of Envoy's source.address: "10.0.0.1:5555" or "[::1]:5555" (a bare host stays as it is)."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                                      append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


def immediate(status: int, body: bytes, retry_after: int = 0, details: str = "") -> Any:
    """A reply Envoy sends itself, without calling the upstream."""
    return _immediate(status, dict(http_api.reply_headers(status, retry_after)), body, details)


def _immediate(status: int, headers: dict[str, str], body: bytes, details: str) -> Any:
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=ep.HeaderMutation(set_headers=[_header(k, v) for k, v in headers.items()]), body=body,
        details=details[:64]))


def for_clients_of(path: str, reply: Any) -> Any:
    """policyd's own reply as the client of that path reads it: a Bedrock client, in AWS's error shape."""
    if not reply.HasField("immediate_response") or not http_api.aws_client_path(path):
        return reply
    answer = reply.immediate_response
    headers = {h.header.key: h.header.raw_value.decode() for h in answer.headers.set_headers}
    return _immediate(*http_api.for_aws_clients(answer.status.code, headers, answer.body), answer.details)


def immediate_denial(d: Decision, recorded: bool = False) -> Any:
    """A denial as Envoy answers it; one `recorded` (a model call's) names its request, as an allowed one does."""
    body = http_api.error_body(d.error_type, d.reason, d.message, d.error_param)
    headers = dict(http_api.reply_headers(d.http_status, d.retry_after_seconds))
    if recorded and d.request_id:
        headers[http_api.REQUEST_ID_HEADER] = d.request_id
    return _immediate(d.http_status, headers, body, f"policyd_{d.reason}")


def immediate_failure(error: Exception) -> Any:
    status, body, reason = http_api.failure_reply(error)
    return immediate(status, body, 0, f"policyd_{reason}")


def _phase(kind: str, common: Any | None = None) -> Any:
    """The reply to a request_headers or request_body message."""
    if kind == "request_headers":
        return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common))
    return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))


class ExternalProcessorServicer(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(self, engine: Engine, pool: ProviderPool) -> None:
        self.engine = engine
        self.pool = pool
        self.batches = Batches(engine, pool)
        self.streams_open = 0  # a shutdown waits for them (server._stop_serving)
        # set when the process stops without waiting any longer for them (its shutdown grace over): their
        # replies go on to clients unread, and are charged as held
        self.abandoning = False

    async def Process(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        self.streams_open += 1
        try:
            messages = requests.__aiter__()
            first = await anext(messages, None)
            if first is None:
                return
            if first.observability_mode:
                await self._observe(first, messages)
                return
            async for reply in self._process(first, messages):
                yield reply
        finally:
            self.streams_open -= 1

    async def _process(self, first: Any, messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The processing filter's stream: one reply to each message, Envoy waiting for it."""
        # configured to send no response body: the observer filter reads streams, and other replies'
        # bodies are asked for at their headers (a config from before the observer sends every body here)
        observer = first.HasField("protocol_config") and first.protocol_config.response_body_mode == NONE
        exchange: Exchange | None = None
        arrival: Arrival | None = None
        decided = False  # by ext_authz (its metadata came) or here
        # ext_authz decided it and the observer filter reads its reply: once the request has gone on past this
        # filter, the observer (after it in the chain) has it and closes it, whatever becomes of this stream
        # (Envoy may end it as the request goes on, before this stream has taken up its next message: a provider
        # unreachable answers at once); until then Envoy waits for this stream, and a request whose stream ends
        # first never reached the provider
        closed_by_observer = False
        gone_on = False  # the reply that lets the request go on is given (or being given)
        content_type = coding = ""  # of a request ext_authz decided, for reading its body
        request = first
        try:
            while request is not None:
                kind = request.WhichOneof("request")
                if kind == "request_headers":
                    exchange = Exchange.from_metadata(request)  # None: no ext_authz decided; this stream decides
                    decided = exchange is not None
                    closed_by_observer = decided and observer and exchange.observed
                    headers = _headers(request.request_headers)
                    content_type = headers.get("content-type", "")
                    coding = headers.get("content-encoding", "").strip().lower()
                    if exchange is None:
                        arrival = Arrival.of(request, headers)
                    if arrival is not None and (request.request_headers.end_of_stream or  # no body, or one
                                                http_api.streamed_upload(arrival.method, arrival.path)):  # unread
                        if http_api.request_lookup_asked(arrival.method, arrival.path):  # it may wait for a request
                            yield ep.ProcessingResponse(override_message_timeout=duration_pb2.Duration(
                                seconds=request_lookup.DECISION_SECONDS))
                        exchange, reply = await self._decide(arrival, b"", kind, observer)
                        decided = True
                        yield reply
                    elif exchange is not None and exchange.model_in_path_changes:  # ext_authz decided another model
                        path = exchange.upstream_path(headers.get(":path", ""))
                        gone_on = request.request_headers.end_of_stream
                        yield _phase(kind, ep.CommonResponse(header_mutation=ep.HeaderMutation(
                            set_headers=[_header(":path", path)])))
                    else:
                        gone_on = request.request_headers.end_of_stream
                        yield _phase(kind)
                elif kind == "request_body":
                    if exchange is None and arrival is not None:
                        if http_api.batch_made(arrival.method, arrival.path):  # its file is read: Envoy waits longer
                            yield ep.ProcessingResponse(override_message_timeout=duration_pb2.Duration(
                                seconds=batches.DECISION_SECONDS))
                        exchange, reply = await self._decide(arrival, request.request_body.body, kind, observer)
                        decided = True
                        yield reply
                    else:
                        reply = self._request_body(exchange, request.request_body, content_type, coding)
                        gone_on = request.request_body.end_of_stream
                        yield reply
                        if exchange is not None and (exchange.free or closed_by_observer):
                            exchange = None  # ext_authz decided: the observer filter reads the reply (open since
                            # the request headers), or a token count leaves nothing to read
                elif kind == "response_headers":
                    mutation = mode = None
                    if exchange is not None:
                        if arrival is not None:  # no ext_authz to tell the client its request id and rate limits
                            mutation = ep.HeaderMutation(set_headers=[_header(k, v) for k, v in exchange.reply_headers])
                            if exchange.usage_unasked:  # for the gateway's Lua filter, which takes it off
                                mutation.set_headers.append(_header(UNASKED_USAGE_HEADER, "strip"))
                        if observer and exchange.observed:  # the observer filter reads the stream and closes it
                            self._response_began(exchange, request.response_headers)
                            exchange = None
                        elif self._read_response(exchange, request):
                            exchange = None
                        elif observer:
                            mode = READ_BODY_HERE
                    yield ep.ProcessingResponse(response_headers=ep.HeadersResponse(
                        response=ep.CommonResponse(header_mutation=mutation) if mutation else None), mode_override=mode)
                elif kind == "response_body":
                    if exchange is not None and self._read_response(exchange, request):
                        exchange = None
                    yield ep.ProcessingResponse(response_body=ep.BodyResponse())
                elif kind == "request_trailers":
                    yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
                elif kind == "response_trailers":
                    if exchange is not None and self._read_response(exchange, request):
                        exchange = None
                    yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
                if decided and exchange is None:
                    # nothing left to do here (the observer reads the reply, or there is none to read): the
                    # stream ends cleanly and Envoy goes on without it, so that this process stopping or
                    # failing mid-reply cannot fail the request (this filter fails closed)
                    return
                request = await anext(messages, None)
        finally:
            if exchange is not None and not exchange.closed and not exchange.free:
                if not closed_by_observer:
                    self._close(exchange, cut=True)  # the client went away, or the stream was cut
                elif not gone_on:  # the client went away while Envoy waited for this stream: nothing was sent
                    self._close(exchange, never_sent=True)

    async def _observe(self, first: Any, messages: AsyncIterator[Any]) -> None:
        """The observer filter's stream: the response as it passes, nothing answered. Returning ends
        the stream (Envoy then sends no more); Envoy closing it before the response's end is a cut."""
        exchange = Exchange.from_metadata(first)
        if exchange is None:
            return  # a reply no allowed request led to (a denial, a local reply): nothing to settle
        try:
            if self._read_response(exchange, first):
                return
            async for request in messages:
                if self._read_response(exchange, request):
                    return
        finally:
            if not exchange.closed:
                # a stream this process stops reading as it shuts down (its grace over) is no cut: Envoy goes on
                # without an observer, the reply goes on to its client, and the provider bills all of it
                self._close(exchange, cut=True, unread=self.abandoning)

    def _response_began(self, exchange: Exchange, message: Any) -> None:
        """The provider's answer, from the response headers. An account that answers 429 or 5xx cools
        down at once (before the client has the answer), so the next request goes elsewhere."""
        headers = _headers(message)
        exchange.status = int(headers.get(":status", "0") or 0)
        exchange.reader.encoded_as(headers.get("content-encoding", ""))
        exchange.reader.served_on(headers.get(http_api.BEDROCK_TIER_HEADER, ""),
                                  headers.get(http_api.BEDROCK_LATENCY_HEADER, ""))
        exchange.gateway_timed_out = headers.get(GATEWAY_TIMEOUT_HEADER) == "yes"
        retry = headers.get("retry-after", "")
        exchange.retry_after = int(retry) if retry.isdigit() else 0
        attempts = headers.get("x-envoy-attempt-count", "1")
        exchange.attempts = min(int(attempts), 100) if attempts.isdigit() and attempts != "0" else 1
        if exchange.stored and exchange.endpoint == "gemini_generate_content":  # a Gemini upload begun: its id
            exchange.reader.response_id = http_api.gemini_upload_begun(headers) or exchange.reader.response_id
        # (a reply the gateway stopped waiting for, or a connection that ended before any reply, says nothing of
        # the account)
        said_by_account = not exchange.gateway_timed_out and headers.get(CONNECTION_ENDED_HEADER) != "yes"
        if exchange.status in COOLDOWN_STATUSES and exchange.account and said_by_account:
            self.pool.cool_down(exchange.account, exchange.retry_after or 30)

    def _read_response(self, exchange: Exchange, request: Any) -> bool:
        """Read one response message; True when the response ended with it (the exchange is closing)."""
        kind = request.WhichOneof("request")
        if kind == "response_body":
            body = request.response_body
            exchange.reader.feed(body.body)
            if not body.end_of_stream:
                return False
            exchange.reader.finish()
        elif kind == "response_headers":
            self._response_began(exchange, request.response_headers)
            # speech is billed by the characters sent: its status is all there is to read, not its audio
            if not request.response_headers.end_of_stream and not exchange.reader.audio:
                return False
        elif kind == "response_trailers":
            exchange.reader.finish()
        else:
            return False
        self._close(exchange)
        return True

    async def _decide(self, arrival: Arrival, body: bytes, kind: str, observer: bool) -> tuple[Exchange | None, Any]:
        """The ext_proc-only shape: authorize here, and either send the request on or answer it."""
        try:
            exchange, reply = await self._decision(arrival, body, kind, observer)
        except Exception as error:  # answered as the OpenAI error a client reads, not as an empty 503
            log.exception("decision failed")
            exchange, reply = None, immediate_failure(error)
        return exchange, for_clients_of(arrival.path, reply)

    async def _decision(self, arrival: Arrival, body: bytes, kind: str, observer: bool) -> tuple[Exchange | None, Any]:
        call = http_api.parse_call(arrival.method, arrival.path, arrival.headers, body, arrival.client_address)
        if call.models_listing:
            models, denial = await self.engine.models_for(call.api_key)
            if denial is not None:
                return None, immediate_denial(denial)
            return None, immediate(*http_api.models_reply(models, call.listing_shape, call.model))
        if call.key_summary:
            summary, denial = await self.engine.key_summary(call.api_key, call.attribution.end_user_id)
            return None, immediate_denial(denial) if summary is None else immediate(200, http_api.key_summary_body(summary))
        if call.request_lookup and not call.problem:
            request, denial = await self.engine.describe_request(call.api_key, call.request_lookup,
                                                                 call.lookup_wait_ms)
            return None, immediate_denial(denial) if request is None else \
                immediate(200, http_api.request_summary_body(request))
        if call.request_listing and not call.problem:
            page, denial = await self.engine.list_requests(call.api_key, call.listing_limit, call.listing_after)
            return None, immediate_denial(denial) if page is None else immediate(200, http_api.request_list_body(*page))
        if call.usage_summary and not call.problem:
            summed, denial = await self.engine.usage_summary(call.api_key, list(call.usage_group_by),
                                                             call.usage_since_ms, call.usage_until_ms, call.usage_bucket,
                                                             call.usage_timezone)
            return None, immediate_denial(denial) if summed is None else \
                immediate(200, http_api.usage_summary_body(*summed, call))
        if call.problem:
            return None, immediate_denial(await self.engine.deny_request(
                call.authorize_input(), call.problem, call.problem_message, call.problem_param), recorded=True)
        if call.batch:  # a batch made: held at its requests' worst cases (policyd/batches.py)
            decision = await self.batches.authorize(call)
        else:
            decision = await self.engine.authorize_for_proxy(call.authorize_input(), self.pool.cooling_providers())
        if not decision.allowed:
            return None, immediate_denial(decision, recorded=True)
        if call.background and not self.pool.follows(decision.provider, decision.account):
            await self.engine.release(decision.request_id, background.UNFOLLOWABLE_RELEASE)
            return None, immediate(400, http_api.error_body("invalid_request_error", "invalid_request",
                                                            *background.unfollowable(call.endpoint)))
        # the observer filter reads every reply (a token count's, free, is not read)
        upstream = upstream_request(decision, self.pool, observed=not call.count_tokens,
                                    usage_unasked=call.usage_kept_from_client(decision.stream_usage_reported),
                                    policyd_headers=call.policyd_headers)
        exchange = Exchange.of(call, decision, upstream.account, observed=observer)
        exchange.reply_headers = ((REQUEST_ID_HEADER, decision.request_id),
                                  *http_api.rate_limit_headers(decision.rate_limits, int(time.time() * 1000)))
        set_headers = [_header(k, v) for k, v in upstream.set_headers]
        path = exchange.upstream_path(arrival.path)  # no customer key in the query; the served model where the path names it
        if path != arrival.path:
            set_headers.append(_header(":path", path))
        # a token count's: its model alone, where the provider names it otherwise; one compressed: decoded
        new_body = exchange.rewritten(call.body, call.body_decoded)
        if new_body is not None:
            set_headers.append(_header("content-length", str(len(new_body))))
        decoded = ["content-encoding"] if call.body_decoded else []
        common = ep.CommonResponse(
            header_mutation=ep.HeaderMutation(set_headers=set_headers,
                                              remove_headers=upstream.remove_headers + decoded),
            body_mutation=ep.BodyMutation(body=new_body) if new_body is not None else None,
            clear_route_cache=True)
        reply = _phase(kind, common)
        # what the observer filter needs to read and settle a stream; the request id for a reply Envoy replaces
        reply.dynamic_metadata.CopyFrom(exchange.metadata(EXT_PROC_NAMESPACE))
        # a token count is free: on with the provider's credential, nothing to read or settle
        return (None if call.count_tokens else exchange), reply

    def _request_body(self, exchange: Exchange | None, body: Any, content_type: str, coding: str = "") -> Any:
        """`coding`: the request's Content-Encoding; a body the client compressed goes on decoded."""
        empty = ep.ProcessingResponse(request_body=ep.BodyResponse())
        if exchange is None:
            return empty
        raw = body.body
        decoded = coding not in ("", "identity")
        if decoded:
            raw = http_api.decoded_body(coding, raw)
            if isinstance(raw, tuple):
                return empty  # ext_authz already refused bodies it cannot read
        data = http_api.parsed_body(content_type, raw)
        if data is None:
            return empty  # ext_authz already refused bodies it cannot read
        new_body = exchange.rewritten(data, decoded)
        if new_body is None:
            return empty
        mutation = ep.HeaderMutation(set_headers=[_header("content-length", str(len(new_body)))],
                                     remove_headers=["content-encoding"] if decoded else [])
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
            header_mutation=mutation, body_mutation=ep.BodyMutation(body=new_body))))

    def _close(self, exchange: Exchange, cut: bool = False, unread: bool = False, never_sent: bool = False) -> None:
        """Settle or release in a task of its own: the reply to Envoy does not wait for it (the client
        gets its last bytes a Redis round trip sooner), and the end or cancellation of this stream
        cannot interrupt it. Audits and shutdown wait for them (Engine.finish_closings). `unread`: the
        reply goes on to its client unread (this process stopped reading it as it shut down). `never_sent`:
        the request ended before the gateway sent it on (released: client_gone)."""
        if exchange.closed:
            return
        exchange.closed = True
        if unread:
            log.warning("request %s: its reply goes on unread as policyd stops; charged as held", exchange.request_id)
        self.engine.close_in_background(lambda: self._settle_or_release(exchange, cut, unread, never_sent),
                                        exchange.request_id)

    async def _settle_or_release(self, exchange: Exchange, cut: bool, unread: bool = False,
                                 never_sent: bool = False) -> None:
        if never_sent:
            await self.engine.release(exchange.request_id, "client_gone")
            return
        status = exchange.status
        reader = exchange.reader
        end = closing(status, reader, cut, gateway_timed_out=exchange.gateway_timed_out, background=exchange.background)
        if unread and end.action == "estimate":  # what is left of it is not seen: the whole output cap, as held
            end = replace(end, reason="usage_estimated:unread_at_shutdown", output_as_held=True)
        if end.action == "poll":
            await self.engine.background.poll_later(exchange.request_id, reader.response_id, exchange.account,
                                                    exchange.batch_seconds)
        elif end.action == "release":
            await self.engine.release(exchange.request_id, end.reason)
        elif end.action == "settle":
            await self.engine.settle(UsageReport(
                request_id=exchange.request_id, **reader.tokens.fields(), images=reader.images,
                served_model=exchange.served_model, upstream_status=status, stream_interrupted=end.interrupted,
                requests=exchange.attempts, retries=exchange.attempts - 1, provider_account=exchange.account,
                provider_response_id=reader.response_id,
            ))
        else:
            await self.engine.settle_estimated(exchange.request_id, reader.estimated_output_tokens(),
                                               interrupted=end.interrupted, error_class=end.reason,
                                               upstream_status=status, provider_account=exchange.account,
                                               reported=reader.tokens, provider_response_id=reader.response_id,
                                               output_as_held=end.output_as_held)
