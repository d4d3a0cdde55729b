"""An in-house OpenAI-compatible gateway with policyd's spend control, in one file.

The proxy itself (`upstream_proxy`) forwards /v1/... to one provider with the gateway's own provider
key and streams the answer back; `PolicydMiddleware` wraps it with Authorize -> upstream call ->
Settle/Release. Run it with:

    POLICYD_ADDRESS=127.0.0.1:50051 UPSTREAM_BASE_URL=https://provider.example/v1 \\
    UPSTREAM_API_KEY=sk-... python examples/gateway/gateway.py --port 8080

and point any OpenAI SDK at http://127.0.0.1:8080/v1 with a policyd customer key.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import httpx
import uvicorn

from policyd.gateway_middleware import PolicydMiddleware
from policyd_client import AsyncPolicyClient

HOP_BY_HOP = {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}


def upstream_proxy(base_url: str, api_key: str) -> Any:
    """A minimal ASGI reverse proxy: /v1/<rest> -> <base_url>/<rest> (other paths at its host), streamed both
    ways."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0))
    base = base_url.rstrip("/")
    origin = "/".join(base.split("/", 3)[:3])  # its scheme and host

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await client.aclose()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]  # /v1<rest> at the base URL; any other path (Gemini's upload/...) at its host
        url = f"{base}{path[3:]}" if path.startswith("/v1") else f"{origin}{path}"
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        headers.append((b"authorization", f"Bearer {api_key}".encode()))
        request = client.build_request(scope["method"], url, headers=headers, content=body,
                                       params=scope.get("query_string", b"").decode())
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError:
            error = b'{"error":{"type":"server_error","code":"upstream_unreachable","message":"the provider could not be reached"}}'
            await send({"type": "http.response.start", "status": 502, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": error})
            return
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    return app


def build_app() -> PolicydMiddleware:
    proxy = upstream_proxy(os.environ["UPSTREAM_BASE_URL"], os.environ.get("UPSTREAM_API_KEY", ""))
    return PolicydMiddleware(proxy, AsyncPolicyClient(os.environ.get("POLICYD_ADDRESS", "127.0.0.1:50051")),
                             background_poll_seconds=float(os.environ.get("BACKGROUND_POLL_SECONDS", "5")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    uvicorn.run(build_app(), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
