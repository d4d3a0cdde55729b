"""The floors policyd is measured against, as a process of their own (like policyd): a grpc.aio server
whose PolicyService, ext_authz and ext_proc do nothing but answer "allowed". As policyd does, they set
the headers the gateway config acts on: the route; the observer header (the observer filter reads
every reply, in both shapes); after ext_authz, the rewrite header for the bodies policyd rewrites
(streamed chat completions get include_usage).

    python -m bench.noop_servers PORT
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, AsyncIterator, Callable

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from google.rpc import code_pb2, status_pb2

from policyd.upstream import OBSERVER_HEADER, REWRITE_HEADER, ROUTE_HEADER
from policyd_client.v1 import policy_pb2, policy_pb2_grpc

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


class NoopPolicy(policy_pb2_grpc.PolicyServiceServicer):
    async def Authorize(self, request: Any, context: Any) -> Any:
        return policy_pb2.AuthorizeResponse(decision=policy_pb2.ALLOW, request_id=request.attribution.request_id)

    async def Settle(self, request: Any, context: Any) -> Any:
        return policy_pb2.SettleResponse(outcome=policy_pb2.SETTLED, request_id=request.request_id)


ROUTE = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=ROUTE_HEADER, value="openai"))
ROUTE_RAW = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=ROUTE_HEADER, raw_value=b"openai"))  # ext_proc
STREAM_HEADER = "x-bench-stream"  # the benchmark's streamed requests carry it (what policyd reads in the body)


def observer(stream: bool, raw: bool = False) -> base_pb2.HeaderValueOption:
    """As policyd: streams are read by the observer filter, other replies by the processing filter."""
    value = "read" if stream else "skip"
    header = base_pb2.HeaderValue(key=OBSERVER_HEADER, raw_value=value.encode()) if raw else \
        base_pb2.HeaderValue(key=OBSERVER_HEADER, value=value)
    return base_pb2.HeaderValueOption(header=header)


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request: Any, context: Any) -> Any:
        stream = STREAM_HEADER in request.attributes.request.http.headers
        rewrite = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=REWRITE_HEADER,
                                                                         value="yes" if stream else "no"))
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                               ok_response=external_auth_pb2.OkHttpResponse(
                                                   headers=[ROUTE, observer(True), rewrite]))


class NoopProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            kind = request.WhichOneof("request")
            if request.observability_mode:  # the observer filter's messages are read, never answered,
                message = getattr(request, kind)  # and its stream ends with the response, as policyd's
                if kind == "response_trailers" or (kind.startswith("response") and message.end_of_stream):
                    return
                continue
            if kind == "request_headers":
                names = {h.key for h in request.request_headers.headers.headers}
                if REWRITE_HEADER in names:  # ext_authz decided: nothing to change here, as policyd
                    yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
                    continue
                # routes as policyd does when ext_proc is the only filter; the observer reads every reply
                yield ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=ep.CommonResponse(
                    header_mutation=ep.HeaderMutation(set_headers=[ROUTE_RAW, observer(True, raw=True)]),
                    clear_route_cache=True)))
            elif kind == "response_headers":  # the observer reads the reply, as policyd's does
                yield ep.ProcessingResponse(response_headers=ep.HeadersResponse())
            elif kind in ("request_body", "response_body"):
                yield ep.ProcessingResponse(**{kind: ep.BodyResponse()})
            else:
                yield ep.ProcessingResponse(**{kind: ep.TrailersResponse()})


def run_on(port: int, register: Callable[[grpc.aio.Server], None]) -> None:
    """A grpc.aio server on 127.0.0.1:port with what `register` adds (called in the server's loop),
    on uvloop when it is there, until the process is stopped."""
    async def serve() -> None:
        server = grpc.aio.server()
        register(server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    if uvloop is not None:
        uvloop.install()
    asyncio.run(serve())


def register_noops(server: grpc.aio.Server) -> None:
    policy_pb2_grpc.add_PolicyServiceServicer_to_server(NoopPolicy(), server)
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)


if __name__ == "__main__":
    run_on(int(sys.argv[1]), register_noops)
