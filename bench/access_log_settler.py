"""The ext_authz-alone shape's settlement, for the benchmark only: Envoy's gRPC access log
(envoy.service.accesslog.v3) streams each finished request here, and this process reports it to
policyd over the native API: a 2xx is settled as an estimate (the access log carries bytes, not
the provider's usage), anything else is released.

It shows what ext_authz alone costs, not a shape policyd ships: without ext_proc nobody reads the
provider's usage (charges are estimates), rewrites the body (downgrades, output caps, stream usage)
or sees a cut stream as it happens.

    python -m bench.access_log_settler PORT POLICYD_ADDRESS
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, AsyncIterator, Callable

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from bench.noop_servers import run_on
from policyd_client.v1 import policy_pb2, policy_pb2_grpc

REQUEST_ID_HEADER = "x-policyd-request-id"
BYTES_PER_TOKEN = 4
REPORTS_IN_FLIGHT_MAX = 256


class Settler(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self.in_flight = asyncio.Semaphore(REPORTS_IN_FLIGHT_MAX)
        self.tasks: set[asyncio.Task[None]] = set()

    async def StreamAccessLogs(self, requests: AsyncIterator[Any], context: Any) -> Any:
        async for message in requests:
            for entry in message.http_logs.log_entry:
                request_id = entry.response.response_headers.get(REQUEST_ID_HEADER, "")  # ext_authz adds it
                if request_id:
                    await self.in_flight.acquire()
                    task = asyncio.create_task(self.report(request_id, entry))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        return als_pb2.StreamAccessLogsResponse()

    async def report(self, request_id: str, entry: Any) -> None:
        try:
            status = entry.response.response_code.value
            if 200 <= status < 300:
                output = entry.response.response_body_bytes // BYTES_PER_TOKEN
                await self.policy.Settle(policy_pb2.SettleRequest(
                    request_id=request_id, usage=policy_pb2.Usage(output_tokens=output), usage_estimated=True,
                    error_class="usage_estimated:access_log", upstream_status=status), timeout=10)
            else:
                await self.policy.Release(policy_pb2.ReleaseRequest(request_id=request_id,
                                                                     reason=f"upstream_{status}"), timeout=10)
        except grpc.aio.AioRpcError:
            pass  # the reservation expires; the benchmark counts records afterwards
        finally:
            self.in_flight.release()


def register(policyd: str) -> Callable[[grpc.aio.Server], None]:
    def add(server: grpc.aio.Server) -> None:
        policy = policy_pb2_grpc.PolicyServiceStub(grpc.aio.insecure_channel(policyd))
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(Settler(policy), server)

    return add


if __name__ == "__main__":
    run_on(int(sys.argv[1]), register(sys.argv[2]))
