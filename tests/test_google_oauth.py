"""Vertex AI accounts: access tokens minted from a service account's key, against a local token endpoint
that checks each signed assertion as Google's does, and put on the requests the account serves."""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from policyd.google_oauth import CLOUD_PLATFORM_SCOPE, JWT_BEARER_GRANT, REFRESH_BEFORE_SECONDS
from policyd.providers import ProviderPool


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenEndpoint:
    """A local OAuth token endpoint: verifies the JWT bearer assertion's signature with the service
    account's public key and its claims, then answers a new token (or `failing` answers 500)."""

    def __init__(self, public_key: Any, email: str) -> None:
        self.minted: list[dict[str, Any]] = []
        self.failing = False
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["content-length"])).decode())
                header, claims, signature = form["assertion"][0].split(".")
                public_key.verify(_b64(signature), f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
                claims_seen = json.loads(_b64(claims))
                assert form["grant_type"] == [JWT_BEARER_GRANT] and json.loads(_b64(header))["alg"] == "RS256"
                assert (claims_seen["iss"], claims_seen["scope"], claims_seen["aud"]) == (
                    email, CLOUD_PLATFORM_SCOPE, endpoint.url)
                assert claims_seen["exp"] - claims_seen["iat"] == 3600
                if endpoint.failing:
                    self.send_response(500)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                endpoint.minted.append(claims_seen)
                body = json.dumps({"access_token": f"ya29.mock-{len(endpoint.minted)}", "expires_in": 3599,
                                   "token_type": "Bearer"}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def vertex(tmp_path: Path) -> Any:
    """A service account's key file (its token_uri the local endpoint) and a providers file naming it."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    email = "policyd-test@project.iam.gserviceaccount.com"
    endpoint = TokenEndpoint(private_key.public_key(), email)
    key_file = tmp_path / "vertex-sa.json"
    key_file.write_text(json.dumps({
        "type": "service_account", "project_id": "project", "private_key_id": "k1", "client_email": email,
        "private_key": private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()).decode(),
        "token_uri": endpoint.url}))
    providers = tmp_path / "providers.yaml"
    providers.write_text(f"accounts:\n  - {{name: vertex-1, provider: google, cluster: vertex, "
                         f"service_account_file: {key_file}}}\n")
    yield providers, endpoint
    endpoint.close()


async def test_a_vertex_account_mints_its_access_token_and_renews_it_before_it_lapses(vertex: Any) -> None:
    providers, endpoint = vertex
    clock = [1_800_000_000_000]  # unix ms
    pool = ProviderPool.load(str(providers))
    pool.wall_ms = lambda: clock[0]
    (account,) = pool.minting()
    assert account.auth == "bearer"
    await pool.mint_due_tokens()
    assert account.credential_header() == ("authorization", "Bearer ya29.mock-1")
    clock[0] += (3599 - REFRESH_BEFORE_SECONDS - 1) * 1000
    await pool.mint_due_tokens()  # still good for more than the margin: kept
    assert len(endpoint.minted) == 1
    clock[0] += 2000
    await pool.mint_due_tokens()  # within the margin: the next one, before it lapses
    assert account.credential_header() == ("authorization", "Bearer ya29.mock-2")
    assert endpoint.minted[1]["iat"] == clock[0] // 1000


async def test_a_token_endpoint_that_fails_leaves_the_token_in_hand_and_is_tried_again(
        vertex: Any, caplog: pytest.LogCaptureFixture) -> None:
    providers, endpoint = vertex
    clock = [1_800_000_000_000]
    pool = ProviderPool.load(str(providers))
    pool.wall_ms = lambda: clock[0]
    (account,) = pool.minting()
    await pool.mint_due_tokens()
    endpoint.failing = True
    clock[0] += 3400 * 1000
    await pool.mint_due_tokens()
    assert account.credential_header() == ("authorization", "Bearer ya29.mock-1")  # may still be good
    assert "answered 500" in caplog.text and "ya29" not in caplog.text and "PRIVATE" not in caplog.text
    endpoint.failing = False
    await pool.mint_due_tokens()
    assert account.credential_header() == ("authorization", "Bearer ya29.mock-2")


async def test_a_vertex_request_goes_upstream_with_the_minted_token_never_the_customers_key(vertex: Any) -> None:
    from policyd.domain import Decision
    from policyd.ext_authz import AuthorizationServicer
    from tests.test_ext_authz import check_request

    providers, _ = vertex

    class VertexEngine:
        async def authorize_for_proxy(self, request: Any, cooling: Any) -> Any:
            return Decision("allow", "r-1", requested_model=request.model, served_model=request.model,
                            provider="google", route="vertex", max_output_tokens=64)

    pool = ProviderPool.load(str(providers))
    await pool.mint_due_tokens()
    request = check_request()
    http = request.attributes.request.http
    http.path = ("/v1/projects/project/locations/us-central1/publishers/google/models/gemini-2.5-flash"
                 ":generateContent")
    http.raw_body = b'{"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 64}}'
    answer = await AuthorizationServicer(VertexEngine(), pool).Check(request, None)  # type: ignore[arg-type]
    headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
    assert (headers["authorization"], headers["x-policyd-route"]) == ("Bearer ya29.mock-1", "vertex")
    assert "pdk_" not in json.dumps(headers)


def test_a_service_account_key_that_cannot_sign_stops_the_start(tmp_path: Path) -> None:
    key_file = tmp_path / "bad.json"
    key_file.write_text(json.dumps({"type": "service_account", "client_email": "a@b", "private_key": "not a key"}))
    providers = tmp_path / "providers.yaml"
    providers.write_text(f"accounts:\n  - {{name: v, provider: google, service_account_file: {key_file}}}\n")
    with pytest.raises(SystemExit, match="cannot sign"):
        ProviderPool.load(str(providers))
    providers.write_text(f"accounts:\n  - {{name: v, provider: google, api_key: k, service_account_file: {key_file}}}\n")
    with pytest.raises(SystemExit, match="both"):
        ProviderPool.load(str(providers))


@pytest.mark.slow
def test_a_vertex_call_through_the_gateway_carries_the_token_policyd_minted(vertex: Any, tmp_path: Path) -> None:
    """The real parts: `policyd serve` mints the account's token at start, Envoy's ext_authz puts it on a
    Vertex AI request for Gemini, the provider (here a mock that accepts that token alone) answers, and the
    call is settled from its usage."""
    import time
    import urllib.request

    import grpc

    from policyd.gateway_config import Upstream, render
    from policyd.mock_provider import MockProvider
    from policyd_client.v1 import admin_pb2, admin_pb2_grpc
    from tests.helpers import funded_key
    from tests.processes import PolicydProcess
    from tests.servers import free_port
    from tests.test_gateway import FIXTURES, start_envoy

    providers, endpoint = vertex
    providers.write_text(providers.read_text().replace("cluster: vertex", "cluster: google"))
    mock = MockProvider(api_keys=("ya29.mock-1",)).start()
    policyd = PolicydProcess("", f"sqlite:///{tmp_path / 'policyd.db'}", policy=str(FIXTURES / "gateway_policy.yaml"),
                             extra_env={"POLICYD_PROVIDERS_FILE": str(providers)}, cwd=str(tmp_path))
    port = free_port()
    config = tmp_path / "envoy.yaml"
    config.write_text(render(listen_port=port, policyd_port=policyd.port, admin_port=free_port(),
                             upstreams=tuple(Upstream(name, "127.0.0.1", mock.port)
                                             for name in ("openai", "anthropic", "google"))))
    envoy = start_envoy(config, port, tmp_path / "envoy.log")
    try:
        assert len(endpoint.minted) == 1  # at start, before any request
        with grpc.insecure_channel(policyd.address) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            key = funded_key(admin, "vertex-customer", plan="google").secret
            body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "vertex, with a token"}]}],
                               "generationConfig": {"maxOutputTokens": 8}}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/projects/acme/locations/us-central1/publishers/google/models/"
                f"gemini-2.5-flash:generateContent", data=body, method="POST",
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=20) as reply:
                assert reply.status == 200 and json.loads(reply.read())["candidates"]
                request_id = reply.headers["x-policyd-request-id"]
            (sent,) = [r for r in mock.received() if "vertex, with a token" in json.dumps(r["body"])]
            assert sent["credentials"] == {"authorization": "Bearer ya29.mock-1"}
            deadline = time.monotonic() + 10  # settled as the reply ends, a moment after the client has it
            while True:
                admin.Audit(admin_pb2.AuditRequest())
                records = admin.ListUsage(admin_pb2.ListUsageRequest(customer_id="vertex-customer", limit=5)).records
                if [r.status for r in records] != ["reserved"] or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert [(r.request_id, r.status, r.output_tokens) for r in records] == [(request_id, "settled", 8)]
    finally:
        envoy.terminate()
        envoy.wait(timeout=10)
        policyd.stop()
        mock.stop()
