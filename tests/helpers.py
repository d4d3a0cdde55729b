"""Small builders shared by the tests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator

from policyd.domain import Attribution, AuthorizeInput, Shape, UsageReport
from policyd.money import parse_amount
from policyd.server import Service


@asynccontextmanager
async def grpc_channel(service: Service) -> AsyncIterator[Any]:
    """The service's gRPC API on a free loopback port, and a channel to it, for as long as the block runs."""
    import grpc

    from policyd.server import make_grpc_server

    server, health = make_grpc_server(service)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(grace=1)


async def new_key(service: Service, customer: str = "acme", plan: str = "pro", environment: str = "production",
                  **owner: str) -> tuple[str, str]:
    created = await service.admin.create_key(label="test", customer_id=customer, environment=environment, plan=plan,
                                             **owner)
    return created.row.id, created.secret


def leave_before_the_reply(base_url: str, key: str, request_id: str, stream: bool = False) -> None:
    """A gpt-4o-mini call (output cap 300) whose client leaves before the reply begins: the mock provider
    stalls (x-mock-scenario: stall) and the openai SDK gives up after 1.5 s."""
    import openai
    import pytest

    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": request_id}],
                                       max_tokens=300, stream=stream, extra_headers={
                                           "x-mock-scenario": "stall", "x-policyd-request-id": request_id})


async def counters_lost_and_rebuilt(service: Service) -> None:
    """Redis loses its data (flushed), its stream groups are made again, and the counters are rebuilt from SQL."""
    await service.counters.client.flushall()
    await service.writer.ensure_groups()
    await service.admin.rebuild()


async def fund(service: Service, customer: str, amount: str, grant_id: str = "", source: str = "purchase") -> None:
    await service.admin.grant_credit(customer, parse_amount(amount), "USD", source, grant_id)


def ask(secret: str, model: str = "gpt-4o-mini", request_id: str = "", endpoint: str = "chat_completions",
        prompt_bytes: int = 400, max_output_tokens: int = 100, choices: int = 0, web_searches: int = 0,
        service_tier: str = "", unseen_input: bool = False, input_tokens: int = 0, service_tier_implied: bool = False,
        **attribution: object) -> AuthorizeInput:
    return AuthorizeInput(
        api_key=secret, endpoint=endpoint, model=model,
        attribution=Attribution(request_id=request_id, **attribution),  # type: ignore[arg-type]
        shape=Shape(prompt_bytes=prompt_bytes, message_count=1, max_output_tokens=max_output_tokens, choices=choices,
                    web_searches=web_searches, service_tier=service_tier, unseen_input=unseen_input,
                    input_tokens=input_tokens, service_tier_implied=service_tier_implied),
    )


def reshaped(request: AuthorizeInput, **shape: Any) -> AuthorizeInput:
    """The request with these fields of its shape (fallbacks, an advisor, ...) changed."""
    return replace(request, shape=replace(request.shape, **shape))


def streamed(client: Any, content: str, model: str = "gpt-4o-mini", **kwargs: Any) -> tuple[Any, list[Any]]:
    """A streamed chat completion through an openai SDK client: the reply's headers and every chunk."""
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=[{"role": "user", "content": content}], stream=True, **kwargs) as response:
        return response.headers, list(response.parse())


def usage(request_id: str, input_tokens: int = 100, output_tokens: int = 50, **extra: object) -> UsageReport:
    return UsageReport(request_id=request_id, input_tokens=input_tokens, output_tokens=output_tokens,
                       **extra)  # type: ignore[arg-type]


def funded_key(admin: Any, customer: str, plan: str = "pro", nanos: int = 10**9) -> Any:
    """Credit and a production key for a customer, over a running policyd's AdminService stub: the
    CreateKeyResponse (its `secret`, its `key`)."""
    from policyd_client.v1 import admin_pb2, types_pb2

    admin.GrantCredit(admin_pb2.GrantCreditRequest(customer_id=customer, source="purchase",
                                                   amount=types_pb2.Money(currency="USD", nanos=nanos)))
    return admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id=customer, plan=plan, environment="production"))


class FundedCustomers:
    """For end-to-end fixtures that hold an AdminService stub as `self.admin`: customers with credit and a key."""

    admin: Any

    def customer(self, customer: str, plan: str = "pro", credit: str = "10") -> str:
        from policyd_client.v1 import admin_pb2, types_pb2

        if credit:
            self.admin.GrantCredit(admin_pb2.GrantCreditRequest(
                customer_id=customer, source="purchase",
                amount=types_pb2.Money(currency="USD", nanos=parse_amount(credit))))
        return self.admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id=customer, plan=plan,
                                                               environment="production")).secret

    def records(self, customer: str) -> list[Any]:
        """The customer's usage records, newest first, once the writer has caught up (Audit drains it)."""
        from policyd_client.v1 import admin_pb2

        self.admin.Audit(admin_pb2.AuditRequest())
        return list(self.admin.ListUsage(admin_pb2.ListUsageRequest(customer_id=customer, limit=100)).records)

    def wallet(self, customer: str) -> Any:
        from policyd_client.v1 import admin_pb2

        return self.admin.GetWallet(admin_pb2.GetWalletRequest(customer_id=customer))

    def wallet_at_rest(self, customer: str, seconds: float = 10.0) -> Any:
        """The wallet once nothing is reserved in it any more (its requests all closed)."""
        import time

        deadline = time.monotonic() + seconds
        while (wallet := self.wallet(customer)).reserved_nanos and time.monotonic() < deadline:
            time.sleep(0.1)
        return wallet


def wav(seconds: int, rate: int = 8000) -> bytes:
    """A RIFF/WAVE file of `seconds` of 16-bit mono silence: its header gives its length exactly."""
    import struct

    data = bytes(2 * rate * seconds)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16) + b"data" + struct.pack("<I", len(data)) + data)


def http_request(method: str, url: str, headers: dict[str, str], body: bytes | None = None,
                 timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request as a client sends it: its status, headers (lower-cased names) and body, refused or not."""
    request = urllib.request.Request(url, method=method, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read()
    except urllib.error.HTTPError as refused:
        return refused.code, {k.lower(): v for k, v in refused.headers.items()}, refused.read()


def begin_gemini_upload(root: str, key: str, size: int, name: str) -> tuple[int, dict[str, str], bytes]:
    """A Gemini upload begun through a gateway at `root`, as Google's SDK begins one (its bytes' URL in the reply)."""
    return http_request("POST", f"{root}/upload/v1beta/files", {
        "x-goog-api-key": key, "content-type": "application/json", "x-goog-upload-protocol": "resumable",
        "x-goog-upload-command": "start", "x-goog-upload-header-content-length": str(size),
        "x-goog-upload-header-content-type": "application/pdf"}, json.dumps({"file": {"displayName": name}}).encode())
