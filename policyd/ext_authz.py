"""Envoy ext_authz (envoy.service.auth.v3.Authorization/Check) over the decision engine.

Allow: the customer's key is replaced by the provider credential of the chosen account, the
route header tells Envoy which cluster to use, and the reservation travels to ext_proc in
dynamic metadata (namespace envoy.filters.http.ext_authz). Deny: an OpenAI-style error body,
with the status (and retry-after) the decision carries. GET /v1/models is answered here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from policyd import background, http_api
from policyd.batches import Batches
from policyd.domain import Decision
from policyd.engine import Engine
from policyd.exchange import EXT_AUTHZ_NAMESPACE, Exchange
from policyd.http_api import REQUEST_ID_HEADER
from policyd.providers import ProviderPool
from policyd.upstream import CLIENT_ADDRESS_HEADER, upstream_request

log = logging.getLogger("policyd.ext_authz")


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def denied(status: int, body: bytes, retry_after: int = 0) -> Any:
    """A reply Envoy sends itself, without calling the upstream (a denial, or an answer policyd owns)."""
    return _denied(status, dict(http_api.reply_headers(status, retry_after)), body)


def _denied(status: int, headers: dict[str, str], body: bytes) -> Any:
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=status), headers=[_header(k, v) for k, v in headers.items()],
            body=body.decode()),
    )


def for_clients_of(path: str, response: Any) -> Any:
    """policyd's own reply as the client of that path reads it: a Bedrock client, in AWS's error shape."""
    if not response.HasField("denied_response") or not http_api.aws_client_path(path):
        return response
    reply = response.denied_response
    return _denied(*http_api.for_aws_clients(reply.status.code, {h.header.key: h.header.value for h in reply.headers},
                                             reply.body.encode()))


def deny_decision(d: Decision, recorded: bool = False) -> Any:
    """A denial as Envoy answers it; one `recorded` (a model call's) names its request, as an allowed one does."""
    body = http_api.error_body(d.error_type, d.reason, d.message, d.error_param)
    headers = dict(http_api.reply_headers(d.http_status, d.retry_after_seconds))
    if recorded and d.request_id:
        headers[http_api.REQUEST_ID_HEADER] = d.request_id
    return _denied(d.http_status, headers, body)


def denied_by_failure(error: Exception) -> Any:
    status, body, _ = http_api.failure_reply(error)
    return denied(status, body)


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, engine: Engine, pool: ProviderPool) -> None:
        self.engine = engine
        self.pool = pool
        self.batches = Batches(engine, pool)

    async def Check(self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext) -> Any:
        try:
            response = await self._check(request)
        except Exception as error:  # answered as the OpenAI error a client reads, not as an empty 503
            log.exception("check failed")
            response = denied_by_failure(error)
        return for_clients_of(request.attributes.request.http.path, response)

    async def _check(self, request: external_auth_pb2.CheckRequest) -> Any:
        http = request.attributes.request.http
        body = http.raw_body or http.body.encode("utf-8", "surrogateescape")
        source = http.headers.get(CLIENT_ADDRESS_HEADER) or request.attributes.source.address.socket_address.address
        call = http_api.parse_call(http.method, http.path, dict(http.headers), body, source)
        if call.models_listing:
            models, denial = await self.engine.models_for(call.api_key)
            if denial is not None:
                return deny_decision(denial)
            return denied(*http_api.models_reply(models, call.listing_shape, call.model))  # Envoy answers it itself
        if call.key_summary:
            summary, denial = await self.engine.key_summary(call.api_key, call.attribution.end_user_id)
            return deny_decision(denial) if summary is None else denied(200, http_api.key_summary_body(summary))
        if call.request_lookup and not call.problem:
            request, denial = await self.engine.describe_request(call.api_key, call.request_lookup,
                                                                 call.lookup_wait_ms)
            return deny_decision(denial) if request is None else denied(200, http_api.request_summary_body(request))
        if call.request_listing and not call.problem:
            page, denial = await self.engine.list_requests(call.api_key, call.listing_limit, call.listing_after)
            return deny_decision(denial) if page is None else denied(200, http_api.request_list_body(*page))
        if call.usage_summary and not call.problem:
            summed, denial = await self.engine.usage_summary(call.api_key, list(call.usage_group_by),
                                                             call.usage_since_ms, call.usage_until_ms, call.usage_bucket,
                                                             call.usage_timezone)
            return deny_decision(denial) if summed is None else denied(200, http_api.usage_summary_body(*summed, call))
        if call.problem:
            decision = await self.engine.deny_request(call.authorize_input(), call.problem, call.problem_message,
                                                      call.problem_param)
            return deny_decision(decision, recorded=True)
        if call.batch:  # a batch made: held at its requests' worst cases (policyd/batches.py)
            decision = await self.batches.authorize(call)
        else:
            decision = await self.engine.authorize_for_proxy(call.authorize_input(), self.pool.cooling_providers())
        if not decision.allowed:
            return deny_decision(decision, recorded=True)
        if call.background and not self.pool.follows(decision.provider, decision.account):
            await self.engine.release(decision.request_id, background.UNFOLLOWABLE_RELEASE)
            return denied(400, http_api.error_body("invalid_request_error", "invalid_request",
                                                   *background.unfollowable(call.endpoint)))
        return self._allow(call, decision)

    def _allow(self, call: http_api.HttpCall, d: Decision) -> Any:
        """The observer filter reads every reply; the processing filter runs only for a body to rewrite.
        A token count goes on with the provider's credential: nothing to read or settle, and nothing to
        rewrite but a model the provider names otherwise (the processing filter then rewrites it alone)."""
        settled = not call.count_tokens
        exchange = Exchange.of(call, d, account="", observed=settled)
        exchange.free = not settled
        # the processing filter rewrites the body, or sends on decoded one the client compressed
        rewrite = exchange.rewrite(call.body) is not None or exchange.model_in_path_changes or call.body_decoded
        upstream = upstream_request(d, self.pool, observed=settled, rewrite=rewrite,
                                    usage_unasked=exchange.usage_unasked, policyd_headers=call.policyd_headers)
        exchange.account = upstream.account
        headers = [_header(k, v) for k, v in upstream.set_headers]
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=headers, headers_to_remove=upstream.remove_headers,
                response_headers_to_add=[_header(k, v) for k, v in (
                    (REQUEST_ID_HEADER, d.request_id),
                    *http_api.rate_limit_headers(d.rate_limits, int(time.time() * 1000)))] if settled else [],
                query_parameters_to_remove=[http_api.QUERY_KEY] if call.key_in_query else []),
            dynamic_metadata=exchange.metadata(EXT_AUTHZ_NAMESPACE, d.decision) if settled or rewrite else None,
        )
