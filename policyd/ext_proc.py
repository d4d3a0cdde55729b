"""Envoy ext_proc (envoy.service.ext_proc.v3.ExternalProcessor/Process) over the decision engine.

One gRPC stream per HTTP request. The request body is rewritten where policy requires it (served
model, output cap, stream usage); the response is read as it passes (STREAMED), and at its end
the request is settled with the provider's usage. An upstream error releases the reservation; a
stream cut or a client gone settles what was delivered (estimated, marked). Requests ext_authz
denied carry no reservation and are never settled here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

from policyd import http_api
from policyd.domain import PolicydError, UsageReport
from policyd.engine import Engine
from policyd.ext_authz import METADATA_NAMESPACE, REQUEST_ID_HEADER
from policyd.providers import ProviderPool
from policyd.usage_capture import ResponseReader, closing

log = logging.getLogger("policyd.ext_proc")
COOLDOWN_STATUSES = {429, 500, 502, 503, 504}


def _headers(message: Any) -> dict[str, str]:
    out = {}
    for h in message.headers.headers:
        out[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
    return out


@dataclass
class Exchange:
    """What policyd knows of one proxied request, from Authorize to Settle."""

    request_id: str
    endpoint: str
    stream: bool
    requested_model: str
    served_model: str
    output_cap: int
    client_gave_cap: bool
    account: str
    status: int = 0
    retry_after: int = 0
    attempts: int = 1  # upstream attempts Envoy made (x-envoy-attempt-count)
    forwarded: bool = False
    closed: bool = False
    reader: ResponseReader = field(init=False)

    def __post_init__(self) -> None:
        self.reader = ResponseReader(self.endpoint, self.stream)

    @classmethod
    def from_metadata(cls, request: Any, headers: dict[str, str]) -> "Exchange | None":
        fields: dict[str, Any] = {}
        namespace = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        if namespace is not None:
            from google.protobuf.json_format import MessageToDict

            fields = MessageToDict(namespace)
        request_id = fields.get("request_id") or headers.get(REQUEST_ID_HEADER, "")
        if not request_id:
            return None
        return cls(
            request_id=request_id, endpoint=str(fields.get("endpoint", "")), stream=bool(fields.get("stream", False)),
            requested_model=str(fields.get("requested_model", "")), served_model=str(fields.get("served_model", "")),
            output_cap=int(fields.get("max_output_tokens", 0) or 0), client_gave_cap=bool(fields.get("client_gave_cap")),
            account=str(fields.get("account", "")),
        )


class ExternalProcessorServicer(external_processor_pb2_grpc.ExternalProcessorServicer):
    def __init__(self, engine: Engine, pool: ProviderPool) -> None:
        self.engine = engine
        self.pool = pool
        self._closing: set[asyncio.Task[None]] = set()

    async def Process(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        exchange: Exchange | None = None
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "request_headers":
                    exchange = Exchange.from_metadata(request, _headers(request.request_headers))
                    mutation = ep.HeaderMutation(remove_headers=[REQUEST_ID_HEADER])
                    yield ep.ProcessingResponse(request_headers=ep.HeadersResponse(
                        response=ep.CommonResponse(header_mutation=mutation)))
                elif kind == "request_body":
                    yield self._request_body(exchange, request.request_body)
                elif kind == "response_headers":
                    if exchange is not None:
                        headers = _headers(request.response_headers)
                        exchange.status = int(headers.get(":status", "0") or 0)
                        retry = headers.get("retry-after", "")
                        exchange.retry_after = int(retry) if retry.isdigit() else 0
                        attempts = headers.get("x-envoy-attempt-count", "1")
                        exchange.attempts = min(int(attempts), 100) if attempts.isdigit() and attempts != "0" else 1
                        if request.response_headers.end_of_stream:
                            await self._close(exchange)
                    yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
                elif kind == "response_body":
                    if exchange is not None and not exchange.closed:
                        exchange.reader.feed(request.response_body.body)
                        if request.response_body.end_of_stream:
                            exchange.reader.finish()
                            await self._close(exchange)
                    yield ep.ProcessingResponse(response_body=ep.BodyResponse())
                elif kind == "request_trailers":
                    yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
                elif kind == "response_trailers":
                    if exchange is not None and not exchange.closed:
                        exchange.reader.finish()
                        await self._close(exchange)
                    yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
        finally:
            if exchange is not None and not exchange.closed:
                # the client went away, or the stream was cut: settle what was delivered, in a task of
                # its own so the cancellation of this stream cannot interrupt it
                task = asyncio.create_task(self._close(exchange, cut=True))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    def _request_body(self, exchange: Exchange | None, body: Any) -> Any:
        empty = ep.ProcessingResponse(request_body=ep.BodyResponse())
        if exchange is None:
            return empty
        exchange.forwarded = True
        try:
            data = json.loads(body.body) if body.body else None
        except ValueError:
            return empty  # ext_authz already refused bodies that are not JSON
        if not isinstance(data, dict):
            return empty
        rewritten = http_api.rewrite_body(data, exchange.endpoint, exchange.served_model, exchange.requested_model,
                                          exchange.output_cap, exchange.client_gave_cap, exchange.stream)
        if rewritten is None:
            return empty
        new_body = json.dumps(rewritten, separators=(",", ":")).encode()
        mutation = ep.HeaderMutation(set_headers=[base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-length", raw_value=str(len(new_body)).encode()),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)])
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
            header_mutation=mutation, body_mutation=ep.BodyMutation(body=new_body))))

    async def _close(self, exchange: Exchange, cut: bool = False) -> None:
        if exchange.closed:
            return
        exchange.closed = True
        try:
            await self._settle_or_release(exchange, cut)
        except PolicydError as error:
            log.warning("closing %s: %s", exchange.request_id, error)
        except Exception:
            log.exception("closing %s failed; the reservation will expire", exchange.request_id)

    async def _settle_or_release(self, exchange: Exchange, cut: bool) -> None:
        status = exchange.status
        if status in COOLDOWN_STATUSES and exchange.account:
            self.pool.cool_down(exchange.account, exchange.retry_after or 30)
        reader = exchange.reader
        end = closing(status, reader, cut)
        if end.action == "release":
            await self.engine.release(exchange.request_id, end.reason)
        elif end.action == "settle":
            t = reader.tokens
            await self.engine.settle(UsageReport(
                request_id=exchange.request_id, input_tokens=t.input_tokens, cached_input_tokens=t.cached_input_tokens,
                cache_write_input_tokens=t.cache_write_input_tokens, images=reader.images,
                output_tokens=t.output_tokens, served_model=exchange.served_model, upstream_status=status,
                stream_interrupted=end.interrupted, requests=exchange.attempts, retries=exchange.attempts - 1,
                provider_account=exchange.account,
            ))
        else:
            await self.engine.settle_estimated(exchange.request_id, reader.estimated_output_tokens(),
                                               interrupted=end.interrupted, error_class=end.reason,
                                               upstream_status=status, provider_account=exchange.account)
