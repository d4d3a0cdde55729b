"""The floors policyd is measured against, as a process of their own (like policyd): a grpc.aio server
whose PolicyService, ext_authz and ext_proc do nothing but answer "allowed" (ext_authz, and ext_proc at
the request headers, set the route header the gateway config routes on, as policyd does).

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


ROUTE = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-policyd-route", value="openai"))
ROUTE_RAW = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-policyd-route", raw_value=b"openai"))  # ext_proc


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request: Any, context: Any) -> Any:
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK),
                                               ok_response=external_auth_pb2.OkHttpResponse(headers=[ROUTE]))


class NoopProcessor(external_processor_pb2_grpc.ExternalProcessorServicer):
    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for request in requests:
            if request.observability_mode:  # the observer filter's messages are read, never answered
                continue
            kind = request.WhichOneof("request")
            if kind == "request_headers":  # routes as policyd does when ext_proc is the only filter
                yield ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=ep.CommonResponse(
                    header_mutation=ep.HeaderMutation(set_headers=[ROUTE_RAW]), clear_route_cache=True)))
            elif kind == "response_headers":
                yield ep.ProcessingResponse(**{kind: ep.HeadersResponse()})
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
