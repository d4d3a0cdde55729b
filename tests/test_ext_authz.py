"""The ext_authz servicer's Check, called directly (tests/test_gateway.py runs it through a real Envoy)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError

from policyd.ext_authz import AuthorizationServicer
from policyd.providers import ProviderPool


class FailingEngine:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.asked = 0

    async def authorize_for_proxy(self, request: Any, cooling: Any) -> Any:
        self.asked += 1
        raise self.error


def check_request() -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "POST", "/v1/chat/completions"
    http.headers.update({"authorization": "Bearer pdk_test_" + "a" * 40, "content-type": "application/json"})
    http.raw_body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    return request


@pytest.mark.parametrize(("error", "status", "reason"), [
    (RedisTimeoutError("Timeout reading from 10.0.0.7:6379"), 503, "unavailable"),
    (OperationalError("SELECT secret_hash FROM api_keys", {}, Exception("server closed the connection")), 503,
     "unavailable"),
    (KeyError("pdk_test_" + "a" * 40), 500, "internal"),
])
async def test_an_unexpected_error_is_denied_with_an_openai_error_and_logged(
        error: Exception, status: int, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = FailingEngine(error)
    servicer = AuthorizationServicer(engine, ProviderPool([]))  # type: ignore[arg-type]
    answer = await servicer.Check(check_request(), None)
    assert engine.asked == 1
    assert answer.status.code == code_pb2.PERMISSION_DENIED and not answer.HasField("ok_response")
    assert answer.denied_response.status.code == status
    error_body = json.loads(answer.denied_response.body)["error"]
    assert (error_body["type"], error_body["code"]) == ("server_error", reason)
    assert "secret_hash" not in answer.denied_response.body and "pdk_test_" not in answer.denied_response.body
    assert {h.header.key for h in answer.denied_response.headers} >= {"content-type"}
    assert any(r.exc_info and r.exc_info[1] is error for r in caplog.records)


class DowngradingEngine:
    async def authorize_for_proxy(self, request: Any, cooling: Any) -> Any:
        from policyd.domain import Decision

        return Decision("downgrade", "r-1", requested_model=request.model, served_model="gemini-2.5-flash",
                        provider="google", route="google", max_output_tokens=64)


async def test_a_gemini_request_served_by_another_model_goes_through_the_processing_filter() -> None:
    """Gemini names the model in the path, which only the processing filter can rewrite."""
    from policyd.providers import Account

    request = check_request()
    http = request.attributes.request.http
    http.path = "/v1beta/models/gemini-2.5-pro:generateContent"
    http.raw_body = b'{"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 64}}'
    pool = ProviderPool([Account("google-1", "google", "google", "x-goog-api-key", "g-1")])
    answer = await AuthorizationServicer(DowngradingEngine(), pool).Check(request, None)  # type: ignore[arg-type]
    headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
    assert headers["x-policyd-rewrite"] == "yes"  # the body needs nothing; the path does


async def test_an_azure_account_sends_its_key_as_api_key_and_the_customers_never_goes_upstream(tmp_path: Any) -> None:
    """Azure OpenAI: an account of provider `azure` authenticates with `api-key` unless told otherwise;
    the customer's `api-key` is removed; a deployment served in place of another goes through the
    processing filter, which rewrites the path."""
    from policyd.domain import Decision

    class AzureEngine:
        async def authorize_for_proxy(self, request: Any, cooling: Any) -> Any:
            return Decision("downgrade", "r-1", requested_model=request.model, served_model="gpt-4o-mini",
                            provider="azure", route="azure", max_output_tokens=64)

    providers = tmp_path / "providers.yaml"
    providers.write_text("accounts:\n  - {name: azure-east, provider: azure, cluster: azure-east, api_key: az-secret}\n")
    pool = ProviderPool.load(str(providers))
    request = check_request()
    http = request.attributes.request.http
    http.path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    http.headers.pop("authorization")
    http.headers["api-key"] = "pdk_test_" + "a" * 40
    http.raw_body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}'
    answer = await AuthorizationServicer(AzureEngine(), pool).Check(request, None)  # type: ignore[arg-type]
    headers = {h.header.key: h.header.value for h in answer.ok_response.headers}
    assert (headers["api-key"], headers["x-policyd-route"]) == ("az-secret", "azure-east")
    assert "authorization" not in headers and "api-key" not in answer.ok_response.headers_to_remove
    assert "authorization" in answer.ok_response.headers_to_remove
    assert headers["x-policyd-rewrite"] == "yes"  # the path names gpt-4o: the processing filter rewrites it
    metadata = answer.dynamic_metadata.fields
    assert metadata["model_in_path"].bool_value and metadata["requested_model"].string_value == "gpt-4o"


JOBS = {"background": ("/v1/responses", b'{"model": "gpt-4o-mini", "input": "research", "background": true}'),
        "request": ("/async/chat/completions",  # Perplexity's async chat completion: a job
                    b'{"request": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "research"}]}}')}


@pytest.mark.parametrize("param", JOBS)
@pytest.mark.parametrize("base_url", ["", "https://provider.example/v1"])
async def test_a_background_response_policyd_cannot_follow_is_refused_and_released(base_url: str, param: str) -> None:
    """A background response (or an async chat completion's job) is charged when policyd, asking its provider
    for it, finds it ended: on an account without a base_url to ask at, it is refused before the provider (400,
    param background, or request for a job) and its hold released, rather than held for hours and charged as
    held."""
    from policyd.domain import Decision
    from policyd.providers import Account

    class Releasing:
        released: list[tuple[str, str]] = []

        async def authorize_for_proxy(self, request: Any, cooling: Any) -> Any:
            return Decision("allow", "r-bg", requested_model=request.model, served_model="gpt-4o-mini",
                            provider="openai", route="openai", max_output_tokens=64)

        async def release(self, request_id: str, reason: str) -> None:
            self.released.append((request_id, reason))

    request = check_request()
    http = request.attributes.request.http
    http.path, http.raw_body = JOBS[param]
    engine = Releasing()
    engine.released = []
    pool = ProviderPool([Account("openai-1", "openai", "openai", "bearer", "sk-1", base_url=base_url)])
    answer = await AuthorizationServicer(engine, pool).Check(request, None)  # type: ignore[arg-type]
    if base_url:
        assert answer.HasField("ok_response") and engine.released == []
        assert answer.dynamic_metadata.fields["background"].bool_value  # the reply's reader knows to follow it
        return
    assert answer.denied_response.status.code == 400
    error = json.loads(answer.denied_response.body)["error"]
    assert (error["code"], error["param"]) == ("invalid_request", param) and "base_url" in error["message"]
    assert engine.released == [("r-bg", "background_unfollowable")]
