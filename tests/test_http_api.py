"""Reading provider HTTP requests and responses: endpoints, keys, shapes, rewrites, usage."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.gateway_config import render
from policyd import http_api, own_usage
from policyd.domain import IMAGE_SCALE_MAX
from policyd.http_api import (CUSTOMER_KEY_HEADERS, image_scale, parse_call, reply_headers, rewrite_body, upstream_path,
                              without_query_key)
from policyd.usage_capture import Closing, ResponseReader, background_answer, closing, followed_path
from policyd.validation import TAGS_MAX, check_authorize
from tests.conftest import ROOT


def test_shipped_envoy_configs_are_the_rendered_defaults() -> None:
    assert (ROOT / "deploy" / "envoy" / "envoy.yaml").read_text() == render()
    assert (ROOT / "deploy" / "envoy" / "envoy-ext-proc.yaml").read_text() == render(shape="ext_proc")
    filters = render(shape="ext_proc").split("http_filters:")[1]
    assert "name: envoy.filters.http.ext_authz" not in filters and "ExtAuthz" not in filters
    with pytest.raises(ValueError):
        render(shape="ext_authz")
    assert "failure_mode_allow: false" in render() and "failure_mode_allow: true" in render(failure_mode_allow=True)
    # every call to policyd that never reached a replica is made to another (but the observer's stream, which Envoy
    # would keep whole for it); a replica failing its health is set aside (tests/test_gateway_replicas.py)
    for shape in ("ext_authz+ext_proc", "ext_proc"):
        config = render(shape=shape)
        assert config.count("envoy_grpc: {cluster_name: policyd}") - 1 == config.count(
            "retry_on: connect-failure,refused-stream,reset-before-request") >= 1
        observer = config[config.index("name: policyd.observer"):]
        assert "retry_policy" not in observer[:observer.index("observability_mode")]
        policyd_cluster = config[config.index("  - name: policyd\n"):config.index("  - name: openai")]
        assert "grpc_health_check: {}" in policyd_cluster and "consecutive_local_origin_failure: 1" in policyd_cluster
    # Envoy takes no retry or timeout instruction from a client (tests/test_gateway.py)
    from policyd.gateway_config import CLIENT_ROUTER_HEADERS

    removed = re.search(r"request_headers_to_remove: \[([^\]]*)\]", render()).group(1)
    assert {"x-envoy-retry-on", "x-envoy-max-retries", "x-envoy-upstream-rq-per-try-timeout-ms"} <= set(
        CLIENT_ROUTER_HEADERS) <= {name.strip() for name in removed.split(",")}
    # no web origin may call the gateway from a browser unless named (tests/test_gateway.py: one named)
    assert "cors" not in render() and "envoy.filters.http.cors" in render(cors_origins=("*",))
    for origin in ("app.example", "https://app.example/path", "https://a.example, https://b.example"):
        with pytest.raises(ValueError):
            render(cors_origins=(origin,))
    # a reply not streamed may be silent as long as the route waits for it (a reasoning model's): Envoy's idle
    # timeout would otherwise cut it first, while the provider goes on and bills it
    config = render()
    idle = int(re.search(r"stream_idle_timeout: (\d+)s", config).group(1))
    route = int(re.search(r"cluster_header: \S+\n\s+timeout: (\d+)s", config).group(1))
    assert idle >= route >= 600
    from policyd.settings import Settings  # a reply that takes all the route's time is settled before its hold lapses
    assert Settings.model_fields["reservation_ttl_seconds"].default > route


def test_gateway_config_reaches_policyd_by_address_name_or_several_replicas(tmp_path) -> None:
    """Every variant `policyd gateway-config --policyd` renders is a config Envoy accepts: an address
    (STATIC), a name such as a service's (STRICT_DNS: all its addresses), several replicas."""
    import subprocess
    import sys

    from tests.test_gateway import envoy_binary

    variants = {"address": "127.0.0.1:50051", "name": "policyd.internal:50051",
                "replicas": "10.0.0.5:50051,10.0.0.6:50051,[::1]:50051"}
    for name, policyd in variants.items():
        config = subprocess.run([sys.executable, "-m", "policyd.cli", "gateway-config", "--policyd", policyd,
                                 "--shape", "ext_proc"], capture_output=True, text=True, check=True).stdout
        cluster = config[config.index("  - name: policyd\n"):config.index("  - name: openai")]
        assert ("type: STRICT_DNS" in cluster) == (name == "name")
        assert cluster.count("- endpoint:") == len(policyd.split(","))
        (tmp_path / f"{name}.yaml").write_text(config)
        checked = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(tmp_path / f"{name}.yaml")],
                                 capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    with pytest.raises(ValueError):
        render(policyd_host="10.0.0.5", more_policyd=(("policyd.internal", 50051),))
    # a provider's connections close unused past the upstream idle timeout (4 s unless told); an access log if asked
    config = subprocess.run([sys.executable, "-m", "policyd.cli", "gateway-config", "--cluster", "vllm=10.0.0.7:8000",
                             "--cluster", "openai=api.openai.com:443:tls", "--upstream-idle-timeout", "2",
                             "--cluster", "flask_app=models_host:8000:idle=1",  # closes its own after 2 s
                             "--access-log", str(tmp_path / "access.log"), "--trusted-proxies", "2"],
                            capture_output=True, text=True, check=True).stdout
    assert config.count("common_http_protocol_options: {idle_timeout: 2s}") == 2
    # the client's address: behind two proxies of the operator's, the one the first saw; by default the connection's
    assert "xff_num_trusted_hops: 2" in config and "xff_num_trusted_hops: 0" in render()
    flask_app = config[config.index("  - name: flask_app\n"):]
    assert "common_http_protocol_options: {idle_timeout: 1s}" in flask_app and "socket_address: {address: models_host" \
        in flask_app
    assert render().count("common_http_protocol_options: {idle_timeout: 4s}") == 3  # the default clusters
    (tmp_path / "idle.yaml").write_text(config)
    checked = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "idle.yaml")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with pytest.raises(ValueError):
        render(upstream_idle_timeout_seconds=0)


def test_gateway_config_refuses_a_cluster_or_replica_it_cannot_take_in_a_line() -> None:
    """A spec `policyd gateway-config` cannot take is said in one line, nothing printed on its standard output: it
    was a traceback, and a misspelled option (`:tlx`) was taken as plain HTTP to the provider."""
    import subprocess
    import sys

    for args in (["--cluster", "openai"], ["--cluster", "openai=api.openai.com"], ["--cluster", "openai=host:443:tlx"],
                 ["--cluster", "openai=host:https"], ["--cluster", "o p=host:443"], ["--cluster", "g=h:8000:idle=0"],
                 ["--cluster", "a=h:1", "--cluster", "a=h:2"], ["--cluster", "policyd=h:1"],
                 ["--policyd", "policyd.internal"],
                 ["--policyd", "10.0.0.5:50051,10.0.0.6"], ["--route-timeout", "0"], ["--trusted-proxies", "-1"],
                 ["--trusted-proxies", "9"]):
        run = subprocess.run([sys.executable, "-m", "policyd.cli", "gateway-config", *args], capture_output=True,
                             text=True)
        assert (run.returncode, run.stdout) == (1, ""), args
        assert run.stderr.startswith("policyd gateway-config: ") and run.stderr.count("\n") == 1, run.stderr


@pytest.mark.parametrize(
    ("method", "path", "headers", "endpoint", "key"),
    [
        ("POST", "/v1/chat/completions", {"Authorization": "Bearer pdk_a"}, "chat_completions", "pdk_a"),
        ("POST", "/openai/v1/responses", {"authorization": "bearer pdk_b"}, "responses", "pdk_b"),
        ("POST", "/v1/messages", {"x-api-key": "pdk_c"}, "anthropic_messages", "pdk_c"),
        ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", {"x-goog-api-key": "pdk_d"},
         "gemini_generate_content", "pdk_d"),
        ("POST", "/v1/embeddings", {}, "embeddings", ""),
        ("POST", "/v1beta/openai/chat/completions", {"authorization": "Bearer pdk_g"}, "chat_completions", "pdk_g"),
        ("POST", "/v1beta/openai/embeddings", {}, "embeddings", ""),
        ("POST", "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4:rawPredict", {},
         "anthropic_messages", ""),
        ("POST", "/v1/projects/p/locations/global/publishers/google/models/gemini-2.5-flash:streamGenerateContent",
         {}, "gemini_generate_content", ""),
        ("POST", "/v1/images/generations?x=1", {}, "images", ""),
    ],
)
def test_endpoint_and_key(method: str, path: str, headers: dict, endpoint: str, key: str) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    call = parse_call(method, path, headers, body)
    assert (call.endpoint, call.api_key, call.problem) == (endpoint, key, "")


def test_shape_and_attribution() -> None:
    body = json.dumps({"model": "gpt-4o", "max_tokens": 77, "stream": True, "user": "u-9",
                       "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}]})
    call = parse_call("POST", "/v1/chat/completions", {"x-feature": "chat", "x-thread-id": "t", "x-request-id": "r1",
                                                         "x-policyd-tag-team": "search", "x-forwarded-for": "1.2.3.4, 10.0.0.1"},
                      body.encode(), client_address="192.0.2.7")
    assert (call.model, call.max_output_tokens, call.stream, call.message_count) == ("gpt-4o", 77, True, 2)
    assert call.prompt_bytes == len("system".encode()) + len("be brief") + len("user") + len("héllo".encode())
    a = call.attribution
    # x-request-id is a tracing header, passed on to every call an application makes for one request: a tag,
    # never the request's id (which is policyd's own, or the client's x-policyd-request-id / idempotency-key)
    assert (a.feature, a.thread_id, a.request_id, a.tags, a.end_user_id) == (
        "chat", "t", "", {"team": "search", "x-request-id": "r1"}, "u-9")
    assert call.client_address == "192.0.2.7"  # the gateway's (Envoy's) view, never what x-forwarded-for claims
    for said, end_user in (({"safety_identifier": "hashed-7", "user": "u-9"}, "hashed-7"), ({"user": "u-9"}, "u-9"),
                           ({"metadata": {"user_id": "anthropic-3"}}, "anthropic-3"), ({"user": 5, "metadata": []}, "")):
        path = "/v1/messages" if "metadata" in said else "/v1/chat/completions"
        named = parse_call("POST", path, {}, json.dumps({"model": "m", "max_tokens": 5, "messages": [], **said}).encode())
        assert named.attribution.end_user_id == end_user, said
    assert parse_call("POST", "/v1/chat/completions", {"x-end-user-id": "header-1"}, json.dumps(
        {"model": "m", "messages": [], "safety_identifier": "body-1"}).encode()).attribution.end_user_id == "header-1"
    gemini = parse_call("POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", {},
                        b'{"contents": [], "generationConfig": {"maxOutputTokens": 9}}')
    assert (gemini.model, gemini.stream, gemini.max_output_tokens) == ("gemini-2.5-flash", True, 9)


def test_a_routers_models_are_read_as_its_fallbacks_and_sent_as_the_provider_names_them() -> None:
    """OpenRouter's `models` (and gateways of its kind) on chat and text completions, responses, messages: the fallbacks
    besides the request's model, in order, each once; the list's first is the model when the request names none."""
    def parsed(path: str, **body: Any) -> http_api.HttpCall:
        return parse_call("POST", path, {}, json.dumps({"messages": [], "input": "hi", "prompt": "hi",
                                                        **body}).encode())

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
        call = parsed(path, model="a/cheap", models=["a/cheap", "b/dear", "c/other", "b/dear"])
        assert (call.model, call.fallback_models, call.fallbacks_routed, call.problem) == (
            "a/cheap", ("b/dear", "c/other"), True, ""), path
        assert call.authorize_input().shape.fallbacks_routed
        first = parsed(path, models=["b/dear", "a/cheap"])
        assert (first.model, first.fallback_models) == ("b/dear", ("a/cheap",))
    assert parsed("/v1/chat/completions", model="a/cheap", models=[]).fallback_models == ()
    assert not parsed("/v1/chat/completions", model="a/cheap", models=["a/cheap"]).fallbacks_routed
    for models in ("b/dear", ["b/dear", 7], [""], {"b": 1}, [f"m/{n}" for n in range(11)]):
        refused = parsed("/v1/chat/completions", model="a/cheap", models=models)
        assert (refused.problem, refused.problem_param) == ("invalid_request", "models"), models
    assert parsed("/v1/chat/completions", models=[]).problem_param == "model"  # no model at all
    # a router's preset (kept at the router: a model, fallbacks, a system prompt policyd cannot see) is refused
    for path in ("/v1/chat/completions", "/v1/messages"):
        for preset in ({"model": "a/cheap", "preset": "house"}, {"model": "@preset/house"},
                       {"model": "a/cheap@preset/house"}, {"models": ["@preset/house"]},
                       {"model": "a/cheap", "models": ["a/cheap", "b/dear@preset/house"]}):
            refused = parsed(path, **preset)
            assert (refused.problem, refused.problem_param) == ("invalid_request", "preset"), (path, preset)
    # OpenRouter's Messages endpoint takes a router's list or fallbacks ([{"model": ...}]), not both
    both = parsed("/v1/messages", model="a/cheap", models=["b/dear"], fallbacks=[{"model": "c/other"}])
    assert (both.problem, both.problem_param) == ("invalid_request", "models")
    # elsewhere `models` is no router's list: not read
    assert parse_call("POST", "/v1/embeddings", {}, json.dumps(
        {"model": "e", "input": "x", "models": "anything"}).encode()).fallback_models == ()
    # sent with each as the provider names it; the model asked for (served otherwise: a downgrade) as it is sent
    body = {"model": "house", "models": ["house", "alias", "plain"], "messages": []}
    rewritten = rewrite_body(body, "chat_completions", "cheap-2024", "house", 0, True, False,
                             fallback_models=("alias-upstream", "plain"))
    assert rewritten["models"] == ["cheap-2024", "alias-upstream", "plain"] and rewritten["model"] == "cheap-2024"
    assert rewrite_body({"models": ["house", "plain"], "messages": []}, "chat_completions", "house", "house", 0, True,
                        False) is None


def test_a_gateways_fallbacks_of_litellms_kind_are_read_as_a_routers() -> None:
    """LiteLLM's `fallbacks` (names, or {"model": ...}) and `context_window_fallback_dict` on chat and text
    completions and responses: the models it tries in turn when one fails, the one that served billed (a router's);
    its refusals name `fallbacks`; Anthropic's own `fallbacks` stay its own."""
    def parsed(path: str = "/v1/chat/completions", **body: Any) -> http_api.HttpCall:
        return parse_call("POST", path, {}, json.dumps({"model": "a/cheap", "messages": [], "input": "hi",
                                                        "prompt": "hi", **body}).encode())

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        call = parsed(path, fallbacks=["b/dear", {"model": "c/other"}, "a/cheap", "b/dear"],
                      context_window_fallback_dict={"a/cheap": "d/long", "x": "y"})
        shape = call.authorize_input().shape
        assert (call.problem, shape.fallback_models, shape.fallbacks_routed, shape.fallbacks_param) == (
            "", ("b/dear", "c/other", "d/long"), True, "fallbacks"), path
    assert parsed(context_window_fallback_dict={"x": "y"}).fallback_models == ()  # none for the model asked for
    for odd in ({"fallbacks": "b/dear"}, {"fallbacks": [{"model": "b/dear", "messages": []}]}, {"fallbacks": [3]},
                {"fallbacks": [f"m/{n}" for n in range(11)]}, {"fallbacks": ["b"], "models": ["c"]},
                {"context_window_fallback_dict": ["b"]}):
        refused = parsed(**odd)
        assert refused.problem == "invalid_request" and refused.problem_param in (
            "fallbacks", "context_window_fallback_dict"), odd
    anthropic = parse_call("POST", "/v1/messages", {}, json.dumps(
        {"model": "a/cheap", "max_tokens": 5, "messages": [], "fallbacks": [{"model": "b/dear"}]}).encode())
    assert (anthropic.fallback_models, anthropic.fallbacks_routed, anthropic.fallbacks_param) == (
        ("b/dear",), False, "")
    # sent with each as the provider names it
    body = {"model": "house", "messages": [], "fallbacks": ["alias", {"model": "plain"}],
            "context_window_fallback_dict": {"house": "alias"}}
    rewritten = rewrite_body(body, "chat_completions", "house-2024", "house", 0, True, False,
                             fallback_models=("alias-upstream", "plain"))
    assert (rewritten["fallbacks"], rewritten["context_window_fallback_dict"]) == (
        ["alias-upstream", {"model": "plain"}], {"house-2024": "alias-upstream"})


def test_a_routers_web_search_is_read_as_the_results_it_may_bill() -> None:
    """OpenRouter's web search on chat and text completions, responses, messages: the web plugin (or a slug ending
    ":online") one search of its max_results (5 unless told); the web_search server tool its max_total_results (as
    many searches), or given none its results a search, the total then set from the plan's searches; a router's
    tools that bill what no field bounds are refused, its clock is not; malformed bounds are refused."""
    def parsed(path: str = "/v1/chat/completions", model: str = "router/m", **body: Any) -> http_api.HttpCall:
        return parse_call("POST", path, {}, json.dumps({"model": model, "messages": [], "input": "hi", "prompt": "hi",
                                                        **body}).encode())

    def searched(call: http_api.HttpCall) -> tuple[Any, ...]:
        shape = call.authorize_input().shape
        return call.problem, shape.web_searches, shape.web_results, shape.web_results_per_search, shape.unseen_input

    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
        assert searched(parsed(path, plugins=[{"id": "web"}])) == ("", 1, 5, 0, True), path
        assert searched(parsed(path, plugins=[{"id": "web", "max_results": 2}, {"id": "response-healing"}])) == (
            "", 1, 2, 0, True)
        assert searched(parsed(path, model="router/m:online")) == ("", 1, 5, 0, True)
        assert searched(parsed(path, models=["router/m", "router/n:online"])) == ("", 1, 5, 0, True)  # a fallback's
        assert searched(parsed(path, model="router/m:online", plugins=[{"id": "web", "max_results": 3}])) == (
            "", 1, 3, 0, True)  # one search, however many ask for it
        tool = {"type": "openrouter:web_search", "parameters": {"max_results": 4, "max_total_results": 9}}
        assert searched(parsed(path, tools=[tool, {"type": "openrouter:datetime"}])) == ("", 9, 9, 0, True)
        assert searched(parsed(path, tools=[{"type": "openrouter:web_search"}])) == ("", 0, 0, 5, True)
        assert searched(parsed(path, tools=[{"type": "openrouter:web_search", "parameters": {"max_results": 3}}])) == (
            "", 0, 0, 3, True)
        assert searched(parsed(path, plugins=[{"id": "file-parser"}], tools=[{"type": "function"}])) == (
            "", 0, 0, 0, False)
    for tool in ("openrouter:fusion", "openrouter:subagent", "openrouter:image_generation", "openrouter:web_fetch"):
        refused = parsed(tools=[{"type": tool}])
        assert (refused.problem, refused.problem_param) == ("tool_not_priced", "tools"), tool
    for odd in ({"plugins": "web"}, {"plugins": [{"id": 5}]}, {"plugins": [{"id": "web", "max_results": 0}]},
                {"plugins": [{"id": "web", "max_results": 1001}]},
                {"tools": [{"type": "openrouter:web_search", "parameters": {"max_total_results": -1}}]},
                {"tools": [{"type": "openrouter:web_search", "parameters": []}]},
                {"tools": [{"type": "openrouter:web_search"}, {"type": "openrouter:web_search"}]}):
        refused = parsed(**odd)
        assert refused.problem == "invalid_request" and refused.problem_param in ("plugins", "tools"), odd
    # elsewhere no router's field: not read
    assert searched(parse_call("POST", "/v1/embeddings", {}, json.dumps(
        {"model": "e", "input": "x", "plugins": [{"id": "web"}]}).encode()))[1:4] == (0, 0, 0)
    # a server tool given no bound is sent with the plan's searches' results (the decision's bound, times its own)
    body = {"model": "router/m", "messages": [], "tools": [{"type": "function", "function": {"name": "f"}},
                                                           {"type": "openrouter:web_search",
                                                            "parameters": {"max_results": 3, "engine": "exa"}}]}
    rewritten = rewrite_body(body, "chat_completions", "router/m", "router/m", 0, True, False, tool_call_cap=10)
    assert rewritten["tools"] == [body["tools"][0], {"type": "openrouter:web_search", "parameters": {
        "max_results": 3, "engine": "exa", "max_total_results": 30}}]
    bounded = {**body, "tools": [{"type": "openrouter:web_search", "parameters": {"max_total_results": 4}}]}
    assert rewrite_body(bounded, "chat_completions", "router/m", "router/m", 0, True, False, tool_call_cap=10) is None


def test_what_a_routers_reply_says_was_charged_is_read_to_the_nano() -> None:
    """OpenRouter's usage accounting: usage.cost in dollars (a JSON number of many decimals, read as the digits
    written, rounded up to the nano); with the customer's own provider key (is_byok) the provider's charge beside
    the fee (cost_details.upstream_inference_cost); anything else there is read as nothing said."""
    def read(endpoint: str, stream: bool, *parts: str) -> ResponseReader:
        reader = ResponseReader(endpoint, stream)
        for part in parts:
            reader.feed(f"data: {part}\n\n".encode() if stream else part.encode())
        reader.finish()
        return reader

    usage = '"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20'
    whole = read("chat_completions", False, '{"model": "m", "choices": [], "usage": {%s, "cost": 0.0000513579432}}'
                 % usage)
    assert (whole.tokens.input_tokens, whole.tokens.reported_cost) == (12, 51_358)  # 51,357.9432 nanos, up
    streamed = read("chat_completions", True, '{"model": "m", "choices": [{"delta": {"content": "hi"}}]}',
                    '{"model": "m", "choices": [], "usage": {%s, "cost": 1.5e-05}}' % usage)
    assert streamed.tokens.reported_cost == 15_000
    byok = read("chat_completions", False, '{"usage": {%s, "cost": 2.5e-06, "is_byok": true, '
                '"cost_details": {"upstream_inference_cost": 5e-05}}}' % usage)
    assert byok.tokens.reported_cost == 2_500 + 50_000
    not_byok = read("chat_completions", False, '{"usage": {%s, "cost": 2.5e-06, "is_byok": false, '
                    '"cost_details": {"upstream_inference_cost": 5e-05}}}' % usage)
    assert not_byok.tokens.reported_cost == 2_500
    responses = read("responses", False, '{"usage": {"input_tokens": 3, "output_tokens": 4, "cost": "0.000001"}}')
    assert responses.tokens.reported_cost == 1_000
    messages = read("anthropic_messages", False, '{"type": "message", "usage": {"input_tokens": 3, "output_tokens": 4,'
                    ' "cost": 0}}')
    assert messages.tokens.reported_cost == 0  # a free route: said, and nothing
    for odd in ('"x"', "-0.1", "true", "null", "[1]", "1e400", '"NaN"'):
        nothing = read("chat_completions", False, '{"usage": {%s, "cost": %s}}' % (usage, odd))
        assert (nothing.tokens.reported_cost, nothing.tokens.input_tokens) == (None, 12), odd
    assert read("chat_completions", False, '{"usage": {%s}}' % usage).tokens.reported_cost is None


def test_claude_at_a_vertex_regions_endpoint_runs_in_that_geography() -> None:
    """Vertex AI's Claude at a region's or multi-region's endpoint (not the global one) is dearer for the newer models,
    and its reply does not say where it ran: the path says it (Shape.geo). Anthropic's priority tier is none of
    Vertex AI's; Gemini's endpoints are priced alike."""
    body = json.dumps({"anthropic_version": "vertex-2023-10-16", "max_tokens": 5, "messages": []}).encode()
    for location, geo in (("us-east5", "regional"), ("europe-west1", "regional"), ("us", "regional"), ("global", "")):
        call = parse_call("POST", f"/v1/projects/p/locations/{location}/publishers/anthropic/models/"
                          f"claude-sonnet-4-5@20250929:rawPredict", {}, body)
        assert (call.problem, call.geo, call.authorize_input().shape.geo) == ("", geo, geo), location
        if geo:
            assert (call.service_tier, call.service_tier_implied) == ("", False)
    gemini = parse_call("POST", "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:"
                        "generateContent", {}, b'{"contents": []}')
    assert (gemini.problem, gemini.geo) == ("", "")
    direct = parse_call("POST", "/v1/messages", {}, b'{"model": "claude-sonnet-4-5", "max_tokens": 5, "messages": []}')
    assert (direct.geo, direct.service_tier) == ("", "priority")  # Anthropic's own API: its tier, no path geography


def test_a_request_is_named_by_its_own_headers_and_a_tracing_id_never_refuses_it() -> None:
    body = b'{"model": "gpt-4o-mini", "messages": []}'

    def attribution(headers: dict[str, str]) -> Any:
        return parse_call("POST", "/v1/chat/completions", headers, body).attribution

    # an Idempotency-Key of any text names its request too (a digest of it where it is not an id's shape)
    long_key = "retry safely: " + "k" * 200
    digested = attribution({"idempotency-key": long_key}).request_id
    assert digested.startswith("idem_") and len(digested) == 45 and digested == attribution(
        {"idempotency-key": long_key}).request_id != attribution({"idempotency-key": long_key + "!"}).request_id
    check_authorize(parse_call("POST", "/v1/chat/completions", {"idempotency-key": long_key}, body).authorize_input())
    both = attribution({"x-request-id": "trace-1", "idempotency-key": "idem-1"})
    assert (both.request_id, both.tags) == ("idem-1", {"x-request-id": "trace-1"})
    assert attribution({"x-policyd-request-id": "own-1", "idempotency-key": "idem-1"}).request_id == "own-1"
    # a tracing id of any shape (AWS's, with ';'), or of any length, is kept as a tag within the tag's bounds
    aws = attribution({"x-request-id": "Root=1-5759e988-bd862e3f;Sampled=1" + "x" * 300})
    assert (aws.request_id, aws.tags["x-request-id"]) == ("", ("Root=1-5759e988-bd862e3f;Sampled=1" + "x" * 300)[:256])
    check_authorize(parse_call("POST", "/v1/chat/completions", {"x-request-id": "a b;c" * 100}, body).authorize_input())
    # a client's own tag of that name wins; a request at the most tags gets no more
    assert attribution({"x-request-id": "t", "x-policyd-tag-x-request-id": "mine"}).tags == {"x-request-id": "mine"}
    full = {f"x-policyd-tag-t{i}": "v" for i in range(TAGS_MAX)}
    assert "x-request-id" not in attribution({**full, "x-request-id": "t"}).tags


@pytest.mark.parametrize(
    ("path", "body", "problem"),
    [
        ("/v1/chat/completions", b"nope", "invalid_request"),
        ("/v1/chat/completions", b"[]", "invalid_request"),
        ("/v1/chat/completions", b'{"messages": []}', "invalid_request"),
        ("/v1/chat/completions", b"\xff", "invalid_request"),
        ("/v1/chat/completions", b'{"model": 5}', "invalid_request"),
        ("/v1/unknown", b"{}", "unknown_endpoint"),
    ],
)
def test_problems(path: str, body: bytes, problem: str) -> None:
    assert parse_call("POST", path, {}, body).problem == problem


@pytest.mark.parametrize(("path", "body", "choices"), [
    ("/v1/chat/completions", {"model": "m", "messages": [], "n": 3}, 3),
    ("/v1/chat/completions", {"model": "m", "messages": [], "n": 3.0}, 3),  # read as the provider reads it
    ("/v1/chat/completions", {"model": "m", "messages": []}, 0),
    ("/v1beta/models/gemini-2.0-flash:generateContent", {"contents": [], "generationConfig": {"candidateCount": 2}}, 2),
    ("/v1beta/models/gemini-2.0-flash:generateContent", {"contents": [], "generation_config": {"candidate_count": "4"}},
     4),  # Gemini reads snake_case names and counts written as text
    ("/v1/images/generations", {"model": "m", "prompt": "p", "n": 4}, 0),  # images count as images
    ("/v1/completions", {"model": "m", "prompt": "p", "n": 2, "best_of": 5}, 5),  # best_of are all generated
    ("/v1/completions", {"model": "m", "prompt": "p", "n": 3}, 3),
])
def test_choices_are_read_from_n_and_candidate_count(path: str, body: dict, choices: int) -> None:
    call = parse_call("POST", path, {"authorization": "Bearer k"}, json.dumps(body).encode())
    assert not call.problem
    assert call.choices == choices and call.authorize_input().shape.choices == choices


@pytest.mark.parametrize(("path", "body", "param"), [
    # a lax OpenAI-compatible server reads "true" as true: it would stream a reply policyd took for one not
    # streamed (no usage asked for, its events unread: charged as a malformed reply, no output)
    ("/v1/chat/completions", {"model": "m", "messages": [], "stream": "true"}, "stream"),
    ("/v1/chat/completions", {"model": "m", "messages": [], "stream": 1}, "stream"),
    ("/v1/messages", {"model": "m", "messages": [], "max_tokens": 5, "stream": "true"}, "stream"),
    ("/v1/responses", {"model": "m", "input": "hi", "background": "true"}, "background"),  # billed later: refused
    ("/v1/chat/completions", {"model": "m", "messages": [], "store": "yes"}, "store"),
    ("/v1/chat/completions", {"model": "m", "messages": [], "stream": True, "stream_options": "x"},
     "stream_options"),
    ("/v1/chat/completions", {"model": "m", "messages": [], "stream": True,
                              "stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
    ("/v1/chat/completions", {"model": "m", "messages": [], "n": "3"}, "n"),  # 3 choices, held as one
    ("/v1/chat/completions", {"model": "m", "messages": [], "n": 2.5}, "n"),
    ("/v1/chat/completions", {"model": "m", "messages": [], "n": True}, "n"),
    ("/v1/completions", {"model": "m", "prompt": "p", "best_of": "5"}, "best_of"),
    ("/v1/responses", {"model": "m", "input": "hi", "tools": [{"type": "web_search"}], "max_tool_calls": "50"},
     "max_tool_calls"),
    ("/v1/messages", {"model": "m", "messages": [], "max_tokens": 5,
                      "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": "99"}]},
     "tools.max_uses"),
    ("/v1/responses", {"model": "m", "input": "hi", "stream": True,
                       "tools": [{"type": "image_generation", "partial_images": "3"}]}, "tools.partial_images"),
])
def test_a_field_policyd_reads_given_as_another_type_is_refused(path: str, body: dict, param: str) -> None:
    call = parse_call("POST", path, {"authorization": "Bearer k"}, json.dumps(body).encode())
    assert (call.problem, call.problem_param) == ("invalid_request", param)
    assert param.split(".")[-1] in call.problem_message


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": [], "stream": False, "stream_options": None, "n": 1, "store": True},
    {"model": "m", "messages": [], "stream": None, "n": None, "background": None},
    {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": False}, "n": 2.0},
])
def test_fields_of_their_own_types_or_null_are_read(body: dict) -> None:
    assert not parse_call("POST", "/v1/chat/completions", {"authorization": "Bearer k"},
                          json.dumps(body).encode()).problem


@pytest.mark.parametrize("text", [
    '{"model": "m", "messages": [], "max_tokens": 100000, "max_tokens": 10}',  # Python reads 10, others 100000
    '{"model": "gpt-4o", "model": "gpt-4o-mini", "messages": []}',
    '{"model": "m", "messages": [], "stream": true, "stream_options": {"include_usage": false, "include_usage": true}}',
])
def test_a_body_naming_a_field_twice_in_one_object_is_refused(text: str) -> None:
    """Parsers differ on a name given twice (Python's json keeps the last value, others the first): what
    policyd holds for and what the provider serves could differ, so the request goes no further."""
    call = parse_call("POST", "/v1/chat/completions", {"authorization": "Bearer k"}, text.encode())
    assert call.problem == "invalid_request" and "twice" in call.problem_message
    assert call.problem_param in ("max_tokens", "model", "include_usage")
    # the same names in different objects are no problem
    assert not parse_call("POST", "/v1/chat/completions", {"authorization": "Bearer k"},
                          b'{"model": "m", "messages": [{"role": "user", "content": "a"}, '
                          b'{"role": "assistant", "content": "b"}], "max_tokens": 5}').problem


def test_images_asked_for_are_read_as_the_provider_reads_them() -> None:
    def images(n: Any) -> int:
        body = {"model": "gpt-image-1", "prompt": "p", **({"n": n} if n is not None else {})}
        return parse_call("POST", "/v1/images/generations", {}, json.dumps(body).encode()).image_count

    assert (images(None), images(4), images(4.0)) == (1, 4, 4)


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.sampled_from(["/v1/chat/completions", "/v1/messages", "/v1/responses"]))
def test_parse_never_raises_on_random_bytes(body: bytes, path: str) -> None:
    call = parse_call("POST", path, {"authorization": "Bearer x"}, body)
    assert call.problem or call.model


_JSON_KEYS = ["model", "models", "fallbacks", "messages", "input", "tools", "type", "max_tokens", "max_output_tokens",
              "stream", "n", "previous_response_id", "conversation", "prompt", "max_uses", "content", "role",
              "plugins", "id", "parameters", "max_results", "max_total_results", "context_window_fallback_dict"]
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**13), 10**13) | st.floats(allow_nan=False) | st.text(max_size=6)
    | st.sampled_from(["gpt-4o", "advisor_20260301", "web_search", "image_generation", "web", "gpt-4o:online",
                       "openrouter:web_search", "openrouter:fusion", "openrouter:datetime"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_JSON_KEYS), inner, max_size=5),
    max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_JSON_KEYS), _json_values, max_size=7),
       st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses", "/v1/embeddings"]))
def test_parse_never_raises_on_any_json_body(body: dict, path: str) -> None:
    """Any JSON object of the fields policyd reads (a model list, fallbacks, tools, caps of any type) is read or
    refused clearly, never fails; a model read is a name."""
    call = parse_call("POST", path, {"authorization": "Bearer x"}, json.dumps(body).encode())
    assert call.problem or (isinstance(call.model, str) and call.model)
    assert all(isinstance(m, str) and m for m in call.fallback_models)
    # a router's web search read as bounded counts: never more than the request's bounds allow
    assert 0 <= call.web_results <= 2 * http_api.ROUTER_WEB_RESULTS_MAX
    assert 0 <= call.web_results_per_search <= http_api.ROUTER_WEB_RESULTS_MAX


def test_a_compressed_body_is_read_decoded_and_a_bad_one_refused_clearly() -> None:
    import gzip
    import zlib

    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"authorization": "Bearer x", "content-type": "application/json"}

    def parsed(coding: str, data: bytes) -> http_api.HttpCall:
        return parse_call("POST", "/v1/chat/completions", {**headers, "content-encoding": coding}, data)

    for coding, data in (("gzip", gzip.compress(body)), ("x-gzip", gzip.compress(body)), ("GZIP", gzip.compress(body)),
                         ("deflate", zlib.compress(body)), ("deflate", zlib.compress(body)[2:-4]),  # raw deflate too
                         ("identity", body)):
        call = parsed(coding, data)
        assert (call.problem, call.model, call.body_decoded) == ("", "gpt-4o-mini", coding != "identity"), coding
    assert parsed("br", body).problem == "unsupported_content_encoding"
    assert parsed("gzip", b"plain text").problem == "invalid_request"
    assert "ends early" in parsed("gzip", gzip.compress(body)[:-12]).problem_message
    bomb = gzip.compress(b'{"model": "' + b"m" * (http_api.REQUEST_BODY_BYTES_MAX + 1) + b'"}')
    assert len(bomb) < 100_000 and parsed("gzip", bomb).problem == "request_too_large"  # held to the limit decoded
    assert (parsed("gzip", b"").problem, parsed("gzip", b"").body_decoded) == ("invalid_request", False)  # no body
    upload = parse_call("POST", "/v1/files", {**headers, "content-encoding": "br"}, b"\x00")
    assert (upload.problem, upload.creates) == ("", "file")  # never read: on as the client sent it


@settings(max_examples=200)
@given(st.binary(max_size=2000), st.sampled_from(["gzip", "deflate", "br"]))
def test_parse_never_raises_on_random_compressed_bytes(body: bytes, coding: str) -> None:
    call = parse_call("POST", "/v1/chat/completions", {"authorization": "Bearer x", "content-encoding": coding}, body)
    assert call.problem or call.model


@pytest.mark.parametrize(("status", "retry_after", "should_retry"), [
    (429, 0, "false"),  # an empty wallet: waiting does not help
    (429, 86_400, "false"),  # a day's budget
    (429, 1, "true"),  # too many in flight, a minute's rate limit: the SDK waits and tries again
    (429, 60, "true"),
    (403, 0, None),  # the SDKs never retry these anyway
    (503, 0, None),  # ... and always retry these
])
def test_replies_tell_the_openai_sdks_whether_to_retry(status: int, retry_after: int, should_retry: str | None) -> None:
    headers = dict(reply_headers(status, retry_after))
    assert headers.get("x-should-retry") == should_retry
    assert headers["content-type"] == "application/json"
    assert headers.get("retry-after") == (str(retry_after) if retry_after else None)


def test_the_upstream_path_carries_the_served_gemini_model_and_no_customer_key() -> None:
    gemini = "/v1beta/models/gemini-2.5-pro:generateContent"
    assert upstream_path(gemini + "?key=pdk_live_x", "gemini-2.5-flash", "gemini-2.5-pro") \
        == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert upstream_path(gemini, "gemini-2.5-pro", "gemini-2.5-pro") == gemini
    assert upstream_path("/v1/chat/completions?key=k&a=1", "gpt-4o-mini", "gpt-4o") == \
        "/v1/chat/completions?a=1"  # the model of others is in the body
    azure = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    assert upstream_path(azure, "gpt-4o-mini", "gpt-4o") == \
        "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2024-10-21"
    # a provider's name holding what a path segment cannot (a Vertex version, a slash) stays one segment
    vertex = "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-house:rawPredict"
    assert upstream_path(vertex, "claude-sonnet-4@20250514", "claude-house") == \
        "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:rawPredict"
    assert upstream_path(azure, "team/eu 4o", "gpt-4o") == \
        "/openai/deployments/team%2Feu%204o/chat/completions?api-version=2024-10-21"


def test_the_image_generation_tool_is_sent_with_the_model_the_decision_names() -> None:
    """Decision.image_model: set in a tool naming none (the plan's default) and in one naming the table's
    name for a model the provider names otherwise; a tool already naming it is left as it is."""
    def tools(tool: dict) -> list:
        body = {"model": "m", "input": "draw", "tools": [{"type": "web_search"}, tool]}
        rewritten = rewrite_body(body, "responses", "m", "m", 0, True, False, image_model="gpt-image-1")
        return None if rewritten is None else rewritten["tools"]
    assert tools({"type": "image_generation"}) == [{"type": "web_search"}, {"type": "image_generation",
                                                                            "model": "gpt-image-1"}]
    assert tools({"type": "image_generation", "model": "house-image", "quality": "high"})[1] == {
        "type": "image_generation", "model": "gpt-image-1", "quality": "high"}
    assert tools({"type": "image_generation", "model": "gpt-image-1"}) is None


def test_an_azure_stream_needs_an_api_version_that_reports_its_usage() -> None:
    """Azure's api-versions before 2024-09-01-preview refuse stream_options, so a stream would report no
    usage: refused first, with the version to use; later versions, the v1 API and unstreamed calls pass."""
    def problem(path: str, stream: bool = True) -> tuple[str, str]:
        body = json.dumps({"model": "m", "messages": [], "stream": stream}).encode()
        call = parse_call("POST", path, {"api-key": "k"}, body)
        return call.problem, call.problem_param

    chat = "/openai/deployments/gpt-4o/chat/completions?api-version="
    for version in ("2024-06-01", "2024-08-01-preview", "2023-05-15"):
        assert problem(chat + version) == ("invalid_request", "api-version"), version
    legacy = "/openai/deployments/gpt-4o/completions?api-version=2024-02-01"
    assert problem(legacy) == ("invalid_request", "api-version")
    for version in ("2024-09-01-preview", "2024-10-21", "2025-04-01-preview", "latest"):
        assert problem(chat + version) == ("", ""), version
    assert problem(chat + "2024-06-01", stream=False) == ("", "")
    assert problem("/openai/v1/chat/completions") == ("", "")


@pytest.mark.parametrize(("path", "endpoint"), [
    ("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "chat_completions"),
    ("/openai/deployments/gpt-4o/completions?api-version=2024-10-21", "completions"),
    ("/openai/deployments/gpt-4o/embeddings", "embeddings"),
    ("/openai/deployments/gpt-4o/images/generations?api-version=2024-10-21", "images"),
    ("/openai/deployments/v1/completions", "completions"),  # a deployment named like a path segment
])
def test_azure_openai_paths_name_the_deployment_and_its_clients_send_api_key(path: str, endpoint: str) -> None:
    """Azure OpenAI (and the openai SDK's AzureOpenAI client): the deployment in the path is the model,
    whatever the body says, and the key comes as `api-key`."""
    model = path.split("/")[3]
    call = parse_call("POST", path, {"api-key": "pdk_live_azure"}, json.dumps({"model": "other", "prompt": "p"}).encode())
    assert (call.endpoint, call.model, call.model_in_path, call.api_key, call.problem) == (
        endpoint, model, True, "pdk_live_azure", "")
    no_model = parse_call("POST", path, {"api-key": "k"}, json.dumps({"prompt": "p", "input": "i"}).encode())
    assert (no_model.model, no_model.problem) == (model, "")  # curl-style bodies without a model
    responses = parse_call("POST", "/openai/responses?api-version=2025-03-01-preview", {"api-key": "k"},
                           json.dumps({"model": "gpt-4o", "input": "hi"}).encode())
    assert (responses.endpoint, responses.model, responses.model_in_path) == ("responses", "gpt-4o", False)
    assert "api-key" in CUSTOMER_KEY_HEADERS  # so it never goes upstream
    plain = parse_call("POST", "/v1/chat/completions", {"authorization": "Bearer b"}, b'{"model": "m"}')
    assert (plain.model, plain.model_in_path) == ("m", False)


@pytest.mark.parametrize(("path", "endpoint", "model"), [
    ("/v1/messages/count_tokens", "anthropic_messages", "claude-sonnet-4"),
    ("/v1/responses/input_tokens", "responses", "claude-sonnet-4"),
    ("/v1beta/models/gemini-2.5-flash:countTokens?key=pdk_live_q", "gemini_generate_content", "gemini-2.5-flash"),
])
def test_token_counts_are_known_and_marked_free(path: str, endpoint: str, model: str) -> None:
    body = json.dumps({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "hi"}]}).encode()
    call = parse_call("POST", path, {"x-api-key": "k"}, body)
    assert (call.endpoint, call.model, call.count_tokens, call.problem) == (endpoint, model, True, "")
    for model_call in ("/v1/messages", "/v1/responses", "/v1beta/models/gemini-2.5-flash:generateContent"):
        assert not parse_call("POST", model_call, {}, body).count_tokens


IMAGE_URL = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
IMAGE_DATA = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize(("path", "body", "unseen"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, False),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [IMAGE_URL]}]}, True),
    # inline images and documents bill by their pixels and pages, which a few bytes can hold (a plain WebP
    # image, a blank PDF page: a hundred bytes, a thousand tokens and more): their bytes bound nothing
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [IMAGE_DATA]}]}, True),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "file", "file": {
        "filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0="}}]}]}, True),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": "UklGRg==", "format": "wav"}}]}]}, False),  # audio: its bytes bound its seconds
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "see data:image/png;base64,AAAA"}]}, False),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_file", "filename": "a.pdf",
                                                               "file_data": "data:application/pdf;base64,JVBERi0="}]}]},
     True),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "file-abc"}}]}]}, True),
    ("/v1/chat/completions", {"messages": [], "web_search_options": {}}, False),  # empty: no search asked
    ("/v1/chat/completions", {"messages": [], "web_search_options": {"search_context_size": "low"}}, True),
    ("/v1/chat/completions", {"messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]}, False),
    ("/v1/responses", {"input": "go on", "previous_response_id": "resp_123"}, True),
    ("/v1/responses", {"input": "go on", "conversation": "conv_123"}, True),
    ("/v1/responses", {"prompt": {"id": "pmpt_123", "version": "2"}}, True),  # a stored prompt
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image",
                                                               "image_url": "https://example.com/a.png"}]}]}, True),
    ("/v1/responses", {"input": "x", "tools": [{"type": "web_search_preview"}]}, True),
    ("/v1/responses", {"input": [{"role": "assistant", "content": [{"type": "output_text", "text": "t", "annotations": [
        {"type": "url_citation", "url": "https://example.com/cited"}]}]}]}, False),  # an earlier reply's citations
    ("/v1/responses", {"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, True),
    ("/v1/responses", {"input": "x", "tools": [{"type": "mcp", "server_url": "https://mcp.example.com"}]}, True),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "https://example.com/a.png"}}]}]}, True),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}]}, True),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "document", "source": {
        "type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}}]}]}, True),
    ("/v1beta/models/gemini-2.5-flash:generateContent", {"contents": [{"parts": [{"inline_data": {
        "mime_type": "application/pdf", "data": "JVBERi0="}}]}]}, True),
    ("/v1beta/models/gemini-2.5-flash:generateContent", {"contents": [{"parts": [{"inlineData": {
        "mimeType": "image/webp", "data": "UklGRg=="}}]}]}, True),
    ("/v1beta/models/gemini-2.5-flash:generateContent", {"contents": [{"parts": [{"inlineData": {
        "mimeType": "audio/wav", "data": "UklGRg=="}}]}]}, False),
    ("/v1/messages", {"messages": [], "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, True),
    ("/v1/messages", {"messages": [], "tools": [{"type": "bash_20250124", "name": "bash"}]}, False),  # the client runs it
    ("/v1/messages", {"messages": [], "mcp_servers": [{"type": "url", "url": "https://mcp.example.com"}]}, True),
    ("/v1beta/models/gemini-2.5-flash:generateContent", {"contents": [], "cachedContent": "cachedContents/c1"}, True),
    ("/v1beta/models/gemini-2.5-flash:generateContent", {"contents": [{"parts": [{"fileData": {
        "fileUri": "https://generativelanguage.googleapis.com/v1beta/files/f1"}}]}]}, True),
    ("/v1beta/models/gemini-2.5-flash:generateContent", {"contents": [], "tools": [{"googleSearch": {}}]}, True),
    ("/v1/completions", {"prompt": "plain text"}, False),
    ("/v1/responses/input_tokens", {"input": "x", "previous_response_id": "resp_1"}, False),  # a count reserves nothing
])
def test_input_a_request_only_refers_to_is_noticed(path: str, body: dict, unseen: bool) -> None:
    call = parse_call("POST", path, {"authorization": "Bearer k"}, json.dumps({"model": "m", **body}).encode())
    assert not call.problem and call.unseen_input is unseen
    assert call.authorize_input().shape.unseen_input is unseen


def test_a_background_response_is_followed_until_it_ends() -> None:
    """A background response answers at once, queued, with no usage; its tokens are billed as it goes on at
    the provider. It was refused; now its reply (or its stream, cut before the response ended) leaves it to
    policyd to ask the provider for it (Closing poll), where a request not in the background is estimated."""
    body = json.dumps({"model": "o3-deep-research", "input": "research", "background": True}).encode()
    call = parse_call("POST", "/v1/responses", {"authorization": "Bearer k"}, body)
    assert not call.problem and call.background
    foreground = json.dumps({"model": "o3", "input": "x", "background": False}).encode()
    assert not parse_call("POST", "/v1/responses", {"authorization": "Bearer k"}, foreground).background

    def read(stream: bool, *parts: dict[str, Any]) -> ResponseReader:
        reader = ResponseReader("responses", stream)
        for part in parts:
            reader.feed(f"data: {json.dumps(part)}\n\n".encode() if stream else json.dumps(part).encode())
        reader.finish()
        return reader

    queued = read(False, {"id": "resp_1", "object": "response", "status": "queued", "usage": None})
    assert (queued.response_id, queued.response_status) == ("resp_1", "queued")
    assert closing(200, queued, cut=False, background=True) == Closing("poll", "background")
    assert closing(200, queued, cut=False).action == "estimate"  # not in the background: no usage reported
    usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
    done = read(False, {"id": "resp_1", "object": "response", "status": "completed", "usage": usage})
    assert closing(200, done, cut=False, background=True).action == "settle"
    started = {"type": "response.created", "response": {"id": "resp_2", "status": "in_progress"}}
    cut = read(True, started, {"type": "response.output_text.delta", "delta": "half"})
    assert closing(200, cut, cut=True, background=True) == Closing("poll", "background")
    whole = read(True, started, {"type": "response.completed", "response": {"id": "resp_2", "status": "completed",
                                                                             "usage": usage}})
    assert closing(200, whole, cut=True, background=True).action == "settle"  # ended before the cut
    assert closing(500, queued, cut=False, background=True).action == "release"  # the provider refused it
    assert closing(0, read(False), cut=False, background=True).action == "estimate"  # no reply: no id to ask by


def test_a_streamed_image_is_read_to_its_completed_event() -> None:
    """gpt-image-1 with stream: true sends partial images, then image_generation.completed (or
    image_edit.completed) with the usage: settled exactly, even when the client leaves right after it."""
    partial = {"type": "image_generation.partial_image", "b64_json": "iVBORw0KGgo=" * 1000, "partial_image_index": 0}
    done = {"type": "image_generation.completed", "b64_json": "iVBORw0KGgo=" * 1000,
            "usage": {"input_tokens": 20, "output_tokens": 1156, "total_tokens": 1176,
                      "input_tokens_details": {"text_tokens": 20, "image_tokens": 0}}}
    reader = ResponseReader("images", stream=True)
    reader.feed(_sse(partial))
    assert closing(200, reader, cut=True).action == "estimate"  # left before the image was done
    reader.feed(_sse(done))
    assert (reader.tokens.input_tokens, reader.tokens.output_tokens, reader.images, reader.finished) == (
        20, 1156, 1, True)
    assert closing(200, reader, cut=True) == Closing("settle", interrupted=False)
    edited = ResponseReader("images", stream=True)
    edited.feed(_sse({**done, "type": "image_edit.completed"}))
    assert (edited.finished, edited.images, closing(200, edited, cut=False)) == (True, 1, Closing("settle"))


def test_the_image_generation_tool_names_the_image_model_its_images_are_priced_at() -> None:
    """The Responses API's image_generation tool: its image model (whose prices its images are billed at),
    the calls the request allows (max_tool_calls; none: the plan's bound) and, streamed, its partial images.
    A tool naming no model is given the plan's (Decision.image_model); a model that is no name, or two
    tools, are refused with a clear error."""
    tool = {"type": "image_generation", "model": "gpt-image-1", "quality": "low", "partial_images": 2}
    body = {"model": "gpt-4.1-mini", "input": "draw a ledger", "tools": [tool]}

    def parsed(**changes: Any) -> Any:
        return parse_call("POST", "/v1/responses", {"authorization": "Bearer k"}, json.dumps({**body, **changes}).encode())

    call = parsed()
    shape = call.authorize_input().shape
    assert not call.problem and (shape.image_model, shape.image_generation_calls, shape.partial_images) == (
        "gpt-image-1", 0, 0)  # partial images come only in a stream
    shape = parsed(stream=True, max_tool_calls=3).authorize_input().shape
    assert (shape.image_model, shape.image_generation_calls, shape.partial_images) == ("gpt-image-1", 3, 2)
    unnamed = parsed(tools=[{"type": "image_generation"}]).authorize_input().shape  # the plan's is set in it
    assert (unnamed.image_model, unnamed.image_model_default) == ("", True)
    for changes in ({"tools": [tool, tool]}, {"tools": [{"type": "image_generation", "model": 7}]},
                    {"tools": [{"type": "image_generation", "model": ""}]}):
        refused = parsed(**changes)
        assert (refused.problem, refused.problem_param) == ("invalid_request", "tools"), changes
        assert "image_generation" in refused.problem_message
    searched = parsed(tools=[{"type": "web_search"}], max_tool_calls=2)
    assert not searched.problem and searched.authorize_input().shape.image_model == ""


def test_the_image_generation_tools_usage_is_read_apart_from_the_responses() -> None:
    """tool_usage.image_gen: the tool's input (of which cached, of which uncached images) and output, and its
    calls; a stream cut after an image was made still counts that image (its completed event)."""
    image_gen = {"input_tokens": 300, "input_tokens_details": {"image_tokens": 200, "text_tokens": 100},
                 "cached_tokens": 120, "cached_tokens_details": {"cached_image_tokens": 50, "cached_text_tokens": 70},
                 "output_tokens": 4160, "total_tokens": 4460}
    whole = ResponseReader("responses", stream=False)
    whole.feed(json.dumps({"output": [{"type": "image_generation_call", "status": "completed", "result": "iVBOR"},
                                      {"type": "image_generation_call", "status": "failed"}],
                           "usage": {"input_tokens": 9, "output_tokens": 3},
                           "tool_usage": {"image_gen": image_gen, "web_search": {"num_requests": 0}}}).encode())
    whole.finish()
    t = whole.tokens
    assert (t.image_generation_calls, t.image_generation_input_tokens, t.image_generation_cached_input_tokens,
            t.image_generation_image_input_tokens, t.image_generation_output_tokens) == (1, 300, 120, 150, 4160)
    assert (t.input_tokens, t.output_tokens) == (9, 3)  # the model's own, priced at its own prices
    cut = ResponseReader("responses", stream=True)
    cut.feed(_sse({"type": "response.image_generation_call.partial_image", "partial_image_b64": "iVBOR",
                   "partial_image_index": 0, "item_id": "ig_1", "output_index": 0},
                  {"type": "response.image_generation_call.completed", "item_id": "ig_1", "output_index": 0},
                  {"type": "response.output_text.delta", "delta": "here is your ledger"}))
    end = closing(200, cut, cut=True)
    assert end.action == "estimate" and cut.tokens.image_generation_calls == 1
    streamed = ResponseReader("responses", stream=True)  # the completed event counts once with its item
    streamed.feed(_sse({"type": "response.image_generation_call.completed", "item_id": "ig_1", "output_index": 0},
                       {"type": "response.completed", "response": {
                           "output": [{"type": "image_generation_call", "status": "completed", "result": "iVBOR"}],
                           "usage": {"input_tokens": 9, "output_tokens": 3}, "tool_usage": {"image_gen": image_gen}}}))
    assert (streamed.tokens.image_generation_calls, streamed.tokens.image_generation_output_tokens) == (1, 4160)


def test_legacy_completions_are_their_own_family() -> None:
    assert parse_call("POST", "/v1/chat/completions", {}, b'{"model": "m"}').endpoint == "chat_completions"
    text = parse_call("POST", "/openai/v1/completions", {}, json.dumps({"model": "m", "prompt": "abcd"}).encode())
    assert (text.endpoint, text.prompt_bytes, text.input_tokens) == ("completions", 4, 0)
    ids = parse_call("POST", "/v1/completions", {}, json.dumps({"model": "m", "prompt": [1, 2, 3, 4, 5]}).encode())
    assert ids.input_tokens == 5 and ids.authorize_input().shape.input_tokens == 5  # token ids are counted
    batch = parse_call("POST", "/v1/completions", {}, json.dumps({"model": "m", "prompt": [[1, 2], [3]]}).encode())
    assert batch.input_tokens == 3
    for sent, tokens in (([[1, 2, 3], [4, 5]], 5), ([7, 8, 9], 3), (["a", "b"], 0), ("text", 0), ([True, False], 0)):
        embedded = parse_call("POST", "/v1/embeddings", {}, json.dumps({"model": "m", "input": sent}).encode())
        assert (embedded.endpoint, embedded.input_tokens) == ("embeddings", tokens)  # token ids: counted
    assert rewrite_body({"model": "m", "prompt": "p", "stream": True}, "completions", "m", "m", 64, False, True) == {
        "model": "m", "prompt": "p", "stream": True, "max_tokens": 64, "stream_options": {"include_usage": True}}
    reader = ResponseReader("completions", stream=True)
    reader.feed(b'data: {"choices": [{"index": 0, "text": "abcdefgh"}]}\n\n')
    reader.finish()
    assert not reader.found_usage and reader.estimated_output_tokens() == 2  # a cut stream's text counts


def test_a_key_in_the_query_is_read_and_never_sent_upstream() -> None:
    body = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
    call = parse_call("POST", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=pdk_live_abc", {}, body)
    assert (call.api_key, call.key_in_query, call.endpoint, call.stream) == (
        "pdk_live_abc", True, "gemini_generate_content", True)
    assert without_query_key("/v1beta/models/m:streamGenerateContent?alt=sse&key=pdk_live_abc") == \
        "/v1beta/models/m:streamGenerateContent?alt=sse"
    assert without_query_key("/p?k%65y=secret&a=1&key") == "/p?a=1"  # however it is spelled
    assert without_query_key("/p?key=x") == "/p" and without_query_key("/p") == "/p"
    both = parse_call("POST", "/v1/chat/completions?key=other", {"authorization": "Bearer pdk_live_h"}, b"{}")
    assert (both.api_key, both.key_in_query) == ("pdk_live_h", True)  # the header's; the query's is still stripped
    assert not parse_call("POST", "/v1/chat/completions?alt=sse", {}, b"{}").key_in_query


def test_rewrites() -> None:
    body = {"model": "gpt-4o", "messages": [], "stream": True}
    rewritten = rewrite_body(body, "chat_completions", "gpt-4o-mini", "gpt-4o", 256, False, True)
    assert rewritten == {"model": "gpt-4o-mini", "messages": [], "stream": True, "max_completion_tokens": 256,
                         "stream_options": {"include_usage": True}}
    assert rewrite_body({"model": "m", "max_tokens": 5}, "chat_completions", "m", "m", 5, True, False) is None
    assert rewrite_body({"model": "m"}, "anthropic_messages", "m", "m", 64, False, False)["max_tokens"] == 64
    assert rewrite_body({"model": "m"}, "responses", "m", "m", 64, False, False)["max_output_tokens"] == 64


def test_a_chat_completions_cap_goes_where_the_provider_reads_it() -> None:
    """A model whose provider reads only max_tokens (output_cap_field): policyd's cap is written there, and
    a client's max_completion_tokens, which that provider would ignore (leaving the output unbounded and
    the reservation short), is moved there; a client's max_tokens stays. OpenAI's default is untouched."""
    def rewrite(body: dict, cap: int, gave: bool, field: str = "max_tokens") -> dict | None:
        return rewrite_body({"model": "m", "messages": [], **body}, "chat_completions", "m", "m", cap, gave, False,
                            output_cap_field=field)
    assert rewrite({}, 1024, False) == {"model": "m", "messages": [], "max_tokens": 1024}
    assert rewrite({"max_completion_tokens": 50}, 50, True) == {"model": "m", "messages": [], "max_tokens": 50}
    assert rewrite({"max_tokens": 50}, 50, True) is None
    assert rewrite({"max_tokens": 50, "max_completion_tokens": 70}, 70, True) is None  # both: it reads its own
    assert rewrite({}, 1024, False, "max_completion_tokens") == {"model": "m", "messages": [],
                                                                 "max_completion_tokens": 1024}
    assert rewrite({"max_tokens": 50}, 50, True, "") is None  # OpenAI reads either


def _sse(*events: object) -> bytes:
    return b"".join(b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in events)


def test_usage_from_chat_stream_in_odd_chunks() -> None:
    stream = _sse({"choices": [{"delta": {"content": "Hello"}}]},
                  {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 3,
                                            "prompt_tokens_details": {"cached_tokens": 4}}}, b"[DONE]")
    reader = ResponseReader("chat_completions", stream=True)
    for i in range(0, len(stream), 7):
        reader.feed(stream[i:i + 7])
    reader.finish()
    assert reader.found_usage and reader.finished
    assert (reader.tokens.input_tokens, reader.tokens.cached_input_tokens, reader.tokens.output_tokens) == (11, 4, 3)


def test_the_model_a_reply_names_is_read_from_each_apis_replies_and_streams() -> None:
    """The model that served a reply, as the provider names it: a chat completion's or a chunk's `model`,
    the Responses API's response, Anthropic's message (message_start in a stream), Gemini's modelVersion."""
    def read(endpoint: str, stream: bool, *parts: bytes) -> str:
        reader = ResponseReader(endpoint, stream=stream)
        for part in parts:
            reader.feed(part)
        reader.finish()
        return reader.tokens.reply_model

    assert read("chat_completions", False, json.dumps({"model": "gpt-4o-2024-08-06", "choices": []}).encode()) \
        == "gpt-4o-2024-08-06"
    assert read("chat_completions", True, _sse({"model": "served-a", "choices": [{"delta": {"content": "x"}}]},
                                               {"model": "served-b", "choices": []}, b"[DONE]")) == "served-a"
    assert read("responses", True, _sse({"type": "response.created", "response": {"model": "o4-mini"}})) == "o4-mini"
    assert read("anthropic_messages", True, b"event: message_start\n" + _sse({"type": "message_start", "message": {
        "model": "claude-opus-4-1", "usage": {"input_tokens": 3, "output_tokens": 1}}})) == "claude-opus-4-1"
    assert read("anthropic_messages", False, json.dumps({"model": "claude-sonnet-4", "usage": {}}).encode()) \
        == "claude-sonnet-4"
    assert read("gemini_generate_content", False, json.dumps({"modelVersion": "gemini-2.5-pro",
                                                             "usageMetadata": {}}).encode()) == "gemini-2.5-pro"
    assert read("chat_completions", False, json.dumps({"model": 7, "choices": []}).encode()) == ""  # no name


def test_usage_groq_puts_under_x_groq_is_read() -> None:
    """Groq's OpenAI-compatible streams give their usage on the last chunk under `x_groq`: read there (a
    stream otherwise charged as an estimate), whatever the chunk's size."""
    last = {"choices": [{"delta": {}, "finish_reason": "stop"}],
            "x_groq": {"id": "req_1", "usage": {"prompt_tokens": 21, "completion_tokens": 6}}}
    for padding in (0, 5 * 1024 * 1024):  # a chunk too large to hold is read as it passes
        chunk = {**last, "system_fingerprint": "x" * padding}
        reader = ResponseReader("chat_completions", stream=True)
        stream = _sse({"choices": [{"delta": {"content": "fast"}}]}, chunk, b"[DONE]")
        for i in range(0, len(stream), 65536):  # as it arrives, in pieces
            reader.feed(stream[i:i + 65536])
        reader.finish()
        assert reader.found_usage and (reader.tokens.input_tokens, reader.tokens.output_tokens) == (21, 6)
        assert closing(200, reader, cut=False).action == "settle"


def test_usage_from_anthropic_stream_and_bodies() -> None:
    reader = ResponseReader("anthropic_messages", stream=True)
    reader.feed(b"event: message_start\n" + _sse({"type": "message_start", "message": {
        "usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 7,
                  "output_tokens": 1}}}))
    reader.feed(_sse({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "abcd"}}))
    reader.feed(_sse({"type": "message_delta", "usage": {"output_tokens": 9}}))
    reader.finish()
    t = reader.tokens
    assert (t.input_tokens, t.cached_input_tokens, t.cache_write_input_tokens, t.output_tokens) == (32, 5, 7, 9)
    responses = ResponseReader("responses", stream=False)
    responses.feed(json.dumps({"usage": {"input_tokens": 7, "output_tokens": 2,
                                         "input_tokens_details": {"cached_tokens": 1}}}).encode())
    responses.finish()
    assert (responses.tokens.input_tokens, responses.tokens.cached_input_tokens, responses.tokens.output_tokens) == (7, 1, 2)
    gemini = ResponseReader("gemini_generate_content", stream=False)
    gemini.feed(json.dumps({"usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 4}}).encode())
    gemini.finish()
    assert (gemini.tokens.input_tokens, gemini.tokens.output_tokens) == (3, 4)
    thinking = ResponseReader("gemini_generate_content", stream=False)  # thoughts bill as output, tool prompts as input
    thinking.feed(json.dumps({"usageMetadata": {"promptTokenCount": 30, "cachedContentTokenCount": 10,
                                                "toolUsePromptTokenCount": 5, "candidatesTokenCount": 4,
                                                "thoughtsTokenCount": 6, "totalTokenCount": 45}}).encode())
    thinking.finish()
    t = thinking.tokens
    assert (t.input_tokens, t.cached_input_tokens, t.output_tokens) == (35, 10, 10)
    embeddings = ResponseReader("embeddings", stream=False)
    embeddings.feed(b'{"usage": {"prompt_tokens": 8, "total_tokens": 8}}')
    embeddings.finish()
    assert (embeddings.tokens.input_tokens, embeddings.found_usage) == (8, True)


def test_perplexitys_usage_names_its_search_context_sources_searches_and_reasoning() -> None:
    """Perplexity's chat usage (its API's, Sonar Deep Research's): prompt 19 + completion 7,163 = total 7,182;
    the sources it read (citation_tokens), its searches and its reasoning_tokens are beside them, each billed.
    Read alike from a reply, a stream's last chunk, and a stream repeating its usage in every chunk; a server
    whose total holds the reasoning already is not charged it twice; its cost object (dollars) is not read."""
    deep = {"prompt_tokens": 19, "completion_tokens": 7163, "total_tokens": 7182, "citation_tokens": 9422,
            "num_search_queries": 18, "reasoning_tokens": 73997, "search_context_size": "Low",
            "cost": {"request_cost": 0.0, "total_cost": 0.92}}
    sonar = {"prompt_tokens": 9, "completion_tokens": 255, "total_tokens": 264, "search_context_size": "high",
             "cost": {"input_tokens_cost": 0.0, "output_tokens_cost": 0.0, "request_cost": 0.012, "total_cost": 0.012}}
    counted = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 45, "reasoning_tokens": 30}
    expected = {id(deep): (19 + 9422, 7163 + 73997, 73997, 18, "low"), id(sonar): (9, 255, 0, 0, "high"),
                id(counted): (10, 35, 30, 0, "")}
    for usage in (deep, sonar, counted):
        whole = ResponseReader("chat_completions", stream=False)
        whole.feed(json.dumps({"choices": [{"message": {"content": "ok"}}], "usage": usage}).encode())
        last = ResponseReader("chat_completions", stream=True)
        last.feed(_sse({"choices": [{"delta": {"content": "ok"}}]},
                       {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": usage}))
        repeated = ResponseReader("chat_completions", stream=True)
        repeated.feed(_sse(*({"choices": [{"delta": {"content": "ok"}}], "usage": usage} for _ in range(3))))
        for reader in (whole, last, repeated):
            reader.finish()
            t = reader.tokens
            assert (t.input_tokens, t.output_tokens, t.reasoning_output_tokens, t.web_searches,
                    t.search_context_size) == expected[id(usage)], usage


def test_perplexitys_async_chat_is_a_chat_completion_run_as_a_job() -> None:
    """POST /async/chat/completions (and /v1/async/sonar): the chat completion under "request", a background
    chat completion (its reply, the job, is read for its id, never as a stream); its cap and model rewritten
    inside "request"; GET of a job a free read of its own customer's; the account's list not offered; the
    job's answer read as the chat completion it holds once COMPLETED."""
    job = {"request": {"model": "sonar-deep-research", "stream": True,
                       "messages": [{"role": "user", "content": "research"}]}}
    for path in ("/async/chat/completions", "/v1/async/sonar/"):
        call = parse_call("POST", path, {"authorization": "Bearer pdk_x"}, json.dumps(job).encode())
        assert (call.endpoint, call.model, call.background, call.stream, call.stores_reply, call.problem) == (
            "chat_completions", "sonar-deep-research", True, False, True, ""), path
    rewritten = rewrite_body(call.body, "chat_completions", "sonar-deep-research", "sonar-deep-research", 300, False,
                             False, output_cap_field="max_tokens", stream_usage_reported=True)
    assert rewritten == {"request": {**job["request"], "max_tokens": 300}}
    for bad in ({"request": "research"}, {"request": {"messages": []}}):
        refused = parse_call("POST", "/async/chat/completions", {}, json.dumps(bad).encode())
        assert refused.problem == "invalid_request"
    read = parse_call("GET", "/async/chat/completions/job-1", {"authorization": "Bearer pdk_x"}, b"")
    assert (read.endpoint, read.stored_response, read.count_tokens) == ("chat_completions", "job-1", True)
    assert parse_call("GET", "/async/chat/completions", {}, b"").problem == "unknown_endpoint"
    reader = ResponseReader("chat_completions", stream=False, stored=True)
    reader.feed(json.dumps({"id": "job-1", "model": "sonar-deep-research", "status": "CREATED", "response": None}).encode())
    reader.finish()
    assert closing(200, reader, False, background=True) == Closing("poll", "background")
    assert followed_path("chat_completions", "job 1") == ("async/chat/completions/job%201", None)
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "citation_tokens": 30,
             "num_search_queries": 3, "reasoning_tokens": 20}
    answers = {"IN_PROGRESS": None, "COMPLETED": {"object": "chat.completion", "usage": usage,
                                                  "choices": [{"message": {"content": "found"}}]}, "FAILED": None}
    seen = {state: background_answer(200, json.dumps({"id": "job-1", "status": state, "response": answer}).encode(),
                                     "chat_completions") for state, answer in answers.items()}
    assert {state: action for state, (action, _) in seen.items()} == {
        "IN_PROGRESS": "wait", "COMPLETED": "settle", "FAILED": "release"}
    tokens = seen["COMPLETED"][1].tokens
    assert (tokens.input_tokens, tokens.output_tokens, tokens.reasoning_output_tokens, tokens.web_searches) == (
        40, 25, 20, 3)
    assert background_answer(404, b'{"detail": "Request not found"}', "chat_completions")[0] == "gone"
    assert background_answer(200, b"not json", "chat_completions")[0] == "wait"


def test_xais_server_side_searches_are_counted_as_its_usage_counts_them() -> None:
    """xAI's Agent Tools (its Responses API's web_search and x_search tools) bill each search; its usage counts
    them (server_side_tool_usage_details), its output items do not show searches of X. An x_search tool is a
    search tool: left unbounded, bounded at the plan's default like a web search tool, and its results are input
    the body does not carry."""
    usage = {"input_tokens": 3834, "output_tokens": 467, "total_tokens": 4301, "cost_in_usd_ticks": 127344000,
             "server_side_tool_usage_details": {"web_search_calls": 1, "x_search_calls": 2}}
    whole = ResponseReader("responses", stream=False)
    whole.feed(json.dumps({"id": "resp_x", "status": "completed", "output": [
        {"type": "web_search_call", "status": "completed", "action": {"type": "search"}}], "usage": usage}).encode())
    streamed = ResponseReader("responses", stream=True)
    streamed.feed(_sse({"type": "response.completed", "response": {"id": "resp_x", "status": "completed",
                                                                    "output": [], "usage": usage}}))
    chat = ResponseReader("chat_completions", stream=False)
    chat.feed(json.dumps({"choices": [{"message": {"content": "ok"}}], "usage": {
        "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15,
        "server_side_tool_usage_details": {"web_search_calls": 2, "x_search_calls": 1}}}).encode())
    for reader in (whole, streamed, chat):
        reader.finish()
        assert reader.tokens.web_searches == 3
    body = {"model": "grok-4", "input": "what is new on X?", "tools": [{"type": "x_search"}]}
    call = parse_call("POST", "/v1/responses", {}, json.dumps(body).encode())
    assert (call.unbounded_web_search_tools, call.unseen_input) == (1, True)
    bounded = parse_call("POST", "/v1/responses", {}, json.dumps({**body, "max_tool_calls": 4}).encode())
    assert (bounded.unbounded_web_search_tools, bounded.web_searches) == (0, 4)


def test_vertex_ais_gemini_embeddings_are_read_with_their_usage() -> None:
    """Vertex AI's embedContent (its path under a project's location) is an embedding whose reply counts the
    tokens it bills (usageMetadata); the Gemini API's counts none (estimated from its text)."""
    path = "/v1/projects/acme/locations/us-central1/publishers/google/models/gemini-embedding-001:embedContent"
    call = parse_call("POST", path, {}, json.dumps({"content": {"parts": [{"text": "a ledger line"}]}}).encode())
    assert (call.endpoint, call.model, call.problem) == ("embeddings", "gemini-embedding-001", "")
    vertex, gemini = ResponseReader("embeddings", stream=False), ResponseReader("embeddings", stream=False)
    vertex.feed(b'{"embedding": {"values": [0.1]}, "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7}}')
    gemini.feed(b'{"embedding": {"values": [0.1]}}')
    for reader in (vertex, gemini):
        reader.finish()
    assert (vertex.tokens.input_tokens, vertex.found_usage, gemini.found_usage) == (7, True, False)


def test_geminis_explicit_caches_are_made_for_a_time_read_and_changed_by_name() -> None:
    """cachedContents (the Gemini API's; Vertex AI's under a project's location): one made names its model as
    "models/M" (or Vertex AI's path to it) and lives for its ttl, until its expireTime, or an hour; read and
    deleted by name (free, its customer's alone); its time to live changed (PATCH: its model is the cache's, the
    seconds asked from now); the account's list is every customer's (not offered); a generateContent naming one
    uses it (its customer's alone). Its reply gives its tokens, kept from its making to its expiry."""
    made = {"model": "models/gemini-2.5-flash", "contents": [{"role": "user", "parts": [{"text": "the rules"}]}]}
    for path, model, lives, seconds in (
            ("/v1beta/cachedContents", "models/gemini-2.5-flash", {"ttl": "300s"}, 300),
            ("/v1beta/cachedContents", "gemini-2.5-flash", {"ttl": "0.25s"}, 1),
            ("/v1beta/cachedContents", "models/gemini-2.5-flash", {}, 3600),
            ("/v1/projects/acme/locations/us-central1/cachedContents",
             "projects/acme/locations/us-central1/publishers/google/models/gemini-2.5-flash",
             {"expireTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200))}, 7200)):
        call = parse_call("POST", path, {}, json.dumps(dict(made, model=model, **lives)).encode())
        assert (call.endpoint, call.model, call.stores_reply, call.problem, call.max_output_tokens) == (
            "cached_contents", "gemini-2.5-flash", True, "", 0), path
        assert seconds - 1 <= call.seconds <= seconds, (lives, call.seconds)
        assert call.prompt_bytes < len(json.dumps(made)), "its ttl and model are not prompt"
    for bad, param in (({"ttl": "300"}, "ttl"), ({"ttl": "-5s"}, "ttl"), ({"ttl": f"{400 * 86400}s"}, "ttl"),
                       ({"expireTime": "tomorrow"}, "expireTime"),
                       ({"expireTime": "2001-01-01T00:00:00Z"}, "expireTime"),
                       ({"ttl": "60s", "expireTime": "2099-01-01T00:00:00Z"}, "ttl")):
        call = parse_call("POST", "/v1beta/cachedContents", {}, json.dumps(dict(made, **bad)).encode())
        assert (call.problem, call.problem_param) == ("invalid_request", param), bad
    for method in ("GET", "DELETE"):
        for path in ("/v1beta/cachedContents/c-1", "/v1/projects/acme/locations/us-central1/cachedContents/c-1"):
            call = parse_call(method, path, {}, b"")
            assert (call.endpoint, call.stored_response, call.count_tokens, call.problem) == (
                "cached_contents", "cachedContents/c-1", True, ""), (method, path)
    changed = parse_call("PATCH", "/v1beta/cachedContents/c-1?updateMask=ttl", {}, b'{"ttl": "7200s"}')
    assert (changed.endpoint, changed.model, changed.previous_response, changed.stored_response, changed.seconds,
            changed.count_tokens, changed.problem) == ("cached_contents", "", "cachedContents/c-1", "", 7200, False, "")
    assert check_authorize(changed.authorize_input()) is None  # its model is the cache's: found by policyd
    assert parse_call("PATCH", "/v1beta/cachedContents/c-1", {}, b"{}").seconds == 0  # nothing asked: nothing held
    assert parse_call("GET", "/v1beta/cachedContents", {}, b"").problem == "unknown_endpoint"
    for named in ("cachedContents/c-1", "projects/acme/locations/us-central1/cachedContents/c-1"):
        uses = parse_call("POST", "/v1beta/models/gemini-2.5-flash:generateContent", {},
                          json.dumps({"cachedContent": named, "contents": []}).encode())
        assert (uses.previous_response, uses.unseen_input) == ("cachedContents/c-1", True)
    downgraded = rewrite_body({**made, "model": "projects/a/locations/l/publishers/google/models/gemini-2.5-flash"},
                              "cached_contents", "gemini-2.5-flash-001", "gemini-2.5-flash", 0, False, False)
    assert downgraded is not None and downgraded["model"] == \
        "projects/a/locations/l/publishers/google/models/gemini-2.5-flash-001"
    assert rewrite_body({"ttl": "60s"}, "cached_contents", "gemini-2.5-flash-001", "gemini-2.5-flash", 0, False,
                        False) is None  # a change of its time to live names no model to rewrite
    for name in ("cachedContents/c-1", "projects/123/locations/us-central1/cachedContents/c-1"):
        reader = ResponseReader("cached_contents", stream=False, stored=True)
        reader.feed(json.dumps({"name": name, "model": "models/gemini-2.5-flash",
                                "createTime": "2026-12-06T10:00:00.250Z", "expireTime": "2026-12-06T10:10:00.500Z",
                                "usageMetadata": {"totalTokenCount": 4096}}).encode())
        reader.finish()
        assert (reader.response_id, reader.tokens.input_tokens, reader.tokens.cache_storage_token_seconds) == (
            "cachedContents/c-1", 4096, 4096 * 601)  # 600.25 s, rounded up


def test_geminis_file_uploads_are_made_at_google_and_their_files_named_by_id() -> None:
    """Gemini's File API: an upload begun (POST upload/v1beta/files) is a file made at Google, its reply stored
    (its upload id in x-goog-upload-url); its bytes (the same path, its upload id in the query) name that upload,
    policyd's name for it a digest of the id; both stream on unread; a file is read and deleted by its id (free);
    the account's list is refused; a request naming files in its fileData names them by id (a Cloud Storage URI
    or a video's URL is no file of Google's File API)."""
    begun = parse_call("POST", "/upload/v1beta/files", {"x-goog-api-key": "k", "x-goog-upload-command": "start"},
                       b'{"file": {"displayName": "rules"}}')
    assert (begun.endpoint, begun.creates, begun.creates_at, begun.stores_reply, begun.files, begun.problem) == (
        "gemini_generate_content", "file", "google", True, (), "")
    upload_id = "AHxI1nP-" + "x" * 200  # Google's upload ids are longer than the ids policyd keeps
    sent = parse_call("POST", f"/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable",
                      {"x-goog-upload-command": "upload, finalize"}, b"")
    assert (sent.api_key, sent.creates_at, sent.files) == ("", "google", (http_api.gemini_upload_key(upload_id),))
    assert check_authorize(sent.authorize_input()) is None and len(sent.files[0]) <= 200
    assert http_api.streamed_upload("POST", "/upload/v1beta/files?upload_id=u") and \
        http_api.streamed_upload("POST", "/upload/v1beta/files")
    url = f"https://generativelanguage.googleapis.com/upload/v1beta/files?upload_id={upload_id}" \
          "&upload_protocol=resumable"
    assert http_api.gemini_upload_begun({"x-goog-upload-url": url}) == sent.files[0]
    assert http_api.gemini_upload_begun({}) == ""
    assert http_api.gemini_upload_url(url, "http://gateway:8080") == \
        f"http://gateway:8080/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable"
    for method in ("GET", "DELETE"):
        read = parse_call(method, "/v1beta/files/abc-123", {}, b"")
        assert (read.endpoint, read.stored_response, read.count_tokens) == ("gemini_generate_content", "abc-123", True)
    assert parse_call("GET", "/v1beta/files", {}, b"").problem == "unknown_endpoint"
    parts = [{"fileData": {"fileUri": "https://generativelanguage.googleapis.com/v1beta/files/abc-123"}},
             {"file_data": {"file_uri": "files/def-456"}}, {"fileData": {"fileUri": "gs://bucket/files/ghi"}},
             {"fileData": {"fileUri": "https://www.youtube.com/watch?v=files/x"}}, {"text": "compare them"}]
    asking = parse_call("POST", "/v1beta/models/gemini-2.5-flash:generateContent", {},
                        json.dumps({"contents": [{"role": "user", "parts": parts}]}).encode())
    assert (asking.files, asking.unseen_input) == (("abc-123", "def-456"), True)


def test_veos_video_generation_is_an_operation_billed_by_the_seconds_it_makes() -> None:
    """Gemini's models/M:predictLongRunning (Veo): videos (sampleCount, 1 unless told) of durationSeconds (8
    unless told), a background call whose reply names its operation; the operation and its videos' downloads
    are free reads of their own customer's; the operation's answer: running, done with its videos (their files
    read), done with an error, or every video withheld."""
    path = "/v1beta/models/veo-3.0-generate-001:predictLongRunning"
    for parameters, videos, seconds in (({}, 1, 8), ({"durationSeconds": "6", "sampleCount": 2}, 2, 6),
                                        ({"numberOfVideos": 3, "durationSeconds": 4}, 3, 4)):
        call = parse_call("POST", path, {}, json.dumps({"instances": [{"prompt": "a ledger"}],
                                                        "parameters": parameters}).encode())
        assert (call.endpoint, call.model, call.image_count, call.seconds, call.background, call.stores_reply,
                call.problem) == ("videos", "veo-3.0-generate-001", videos, seconds, True, True, ""), parameters
    for bad in ({"sampleCount": 0}, {"sampleCount": 9}, {"durationSeconds": 0}, {"durationSeconds": "long"}):
        assert parse_call("POST", path, {}, json.dumps({"parameters": bad, "instances": []}).encode()).problem == \
            "invalid_request", bad
    name = "models/veo-3.0-generate-001/operations/op-1"
    for read, stored in ((f"/v1beta/{name}", name), ("/v1beta/files/vid-1:download?alt=media", "vid-1")):
        call = parse_call("GET", read, {}, b"")
        assert (call.endpoint, call.stored_response, call.count_tokens, call.problem) == ("videos", stored, True, "")
    reader = ResponseReader("videos", stream=False, stored=True)
    reader.feed(json.dumps({"name": name}).encode())
    reader.finish()
    assert reader.response_id == name and closing(200, reader, False, background=True) == Closing("poll", "background")
    assert followed_path("videos", name) == (name, None)
    on_vertex = "projects/acme/locations/us-central1/publishers/google/models/veo-3.0-generate-001/operations/op-1"
    assert followed_path("videos", on_vertex) == (
        "projects/acme/locations/us-central1/publishers/google/models/veo-3.0-generate-001:fetchPredictOperation",
        json.dumps({"operationName": on_vertex}).encode())
    uri = "https://generativelanguage.googleapis.com/v1beta/files/{}:download?alt=media"
    samples = [{"video": {"uri": uri.format("a1")}}, {"video": {"uri": uri.format("b2")}}]
    answers = {"running": {"name": name}, "done": {"name": name, "done": True, "response": {
                   "generateVideoResponse": {"generatedSamples": samples}}},
               "failed": {"name": name, "done": True, "error": {"code": 13, "message": "no"}},
               "withheld": {"name": name, "done": True, "response": {
                   "generateVideoResponse": {"raiMediaFilteredCount": 2}}}}
    seen = {k: background_answer(200, json.dumps(v).encode(), "videos") for k, v in answers.items()}
    assert {k: action for k, (action, _) in seen.items()} == {
        "running": "wait", "done": "settle", "failed": "release", "withheld": "release"}
    assert (seen["done"][1].images, seen["done"][1].files) == (2, ["a1", "b2"])
    assert background_answer(404, b"{}", "videos")[0] == "gone"


def test_reasoning_reported_beside_the_output_is_charged_as_output() -> None:
    """xAI (and OpenAI-compatible servers following it) report reasoning outside completion_tokens, in the
    total: prompt 10,120 + completion 1,499 + reasoning 2,809 = 14,428. OpenAI counts it inside."""
    beside = {"prompt_tokens": 10120, "completion_tokens": 1499, "total_tokens": 14428,
              "prompt_tokens_details": {"cached_tokens": 128}, "completion_tokens_details": {"reasoning_tokens": 2809}}
    inside = {"prompt_tokens": 2008, "completion_tokens": 266, "total_tokens": 2274,
              "completion_tokens_details": {"reasoning_tokens": 261}}
    for usage, output in ((beside, 1499 + 2809), (inside, 266), ({"prompt_tokens": 5, "completion_tokens": 3}, 3),
                          ({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 6}, 3)):
        whole = ResponseReader("chat_completions", stream=False)
        whole.feed(json.dumps({"choices": [{"message": {"content": "ok"}}], "usage": usage}).encode())
        whole.finish()
        streamed = ResponseReader("chat_completions", stream=True)
        streamed.feed(_sse({"choices": [{"delta": {"content": "ok"}}]}, {"choices": [], "usage": usage}))
        streamed.finish()
        for reader in (whole, streamed):
            assert (reader.tokens.input_tokens, reader.tokens.output_tokens) == (usage["prompt_tokens"], output), usage
    response = ResponseReader("responses", stream=False)
    response.feed(json.dumps({"output": [], "usage": {
        "input_tokens": 40, "output_tokens": 10, "total_tokens": 80,
        "output_tokens_details": {"reasoning_tokens": 30}}}).encode())
    response.finish()
    assert response.tokens.output_tokens == 40


def test_a_compressed_reply_is_read_from_a_decoded_copy() -> None:
    """gzip and deflate (zlib) replies, whole or streamed, in pieces of any size, are read as plain ones; a
    coding policyd cannot decode (br) or a corrupt one is estimated and marked, never raised."""
    import gzip
    import zlib

    reply = json.dumps({"choices": [{"message": {"content": "hello"}}],
                        "usage": {"prompt_tokens": 9, "completion_tokens": 4}}).encode()
    stream = _sse({"choices": [{"delta": {"content": "hi"}}]}, {"choices": [], "usage": {
        "prompt_tokens": 9, "completion_tokens": 4}}) + b"data: [DONE]\n\n"
    for coding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress), ("x-gzip", gzip.compress)):
        for streamed, body in ((False, reply), (True, stream)):
            data = compress(body)
            for size in (1, 7, len(data)):
                reader = ResponseReader("chat_completions", stream=streamed)
                reader.encoded_as(coding)
                for at in range(0, len(data), size):
                    reader.feed(data[at:at + size])
                reader.finish()
                assert (reader.tokens.input_tokens, reader.tokens.output_tokens) == (9, 4), (coding, streamed, size)
                assert closing(200, reader, cut=False).action == "settle"
    brotli = ResponseReader("chat_completions", stream=False)
    brotli.encoded_as("br")
    brotli.feed(b"\x1b\x03\x00" * 40)
    brotli.finish()
    assert closing(200, brotli, cut=False).reason == "usage_estimated:undecodable_reply"
    assert brotli.estimated_output_tokens() == 30  # its bytes on the wire, for want of its text
    corrupt = ResponseReader("chat_completions", stream=False)
    corrupt.encoded_as("gzip")
    corrupt.feed(gzip.compress(reply)[:10] + b"not gzip at all")
    corrupt.finish()
    assert closing(200, corrupt, cut=False).reason == "usage_estimated:malformed_response"
    inflating = ResponseReader("chat_completions", stream=False)  # 64 MiB of spaces from 64 KiB: read as it goes
    inflating.encoded_as("gzip")
    inflating.feed(gzip.compress(b" " * (64 << 20) + reply))
    inflating.finish()
    assert inflating.tokens.output_tokens == 4
    identity = ResponseReader("chat_completions", stream=False)
    identity.encoded_as("identity")
    identity.feed(reply)
    identity.finish()
    assert identity.tokens.output_tokens == 4


def test_a_cut_or_malformed_stream_is_estimated_from_what_was_delivered() -> None:
    reader = ResponseReader("chat_completions", stream=True)
    reader.feed(_sse({"choices": [{"delta": {"content": "x" * 40}}]}) + b"data: {broken\n\n")
    reader.finish()
    assert not reader.found_usage and reader.malformed and not reader.finished
    assert reader.estimated_output_tokens() == 10
    body = ResponseReader("chat_completions", stream=False)
    body.feed(b"<html>oops</html>")
    body.finish()
    assert not body.found_usage and body.malformed


def test_a_cut_stream_or_a_reply_without_usage_counts_every_kind_of_output_delivered() -> None:
    """Tool calls' arguments, reasoning shown and refusals are output the provider bills, as text is: a stream
    cut while a model wrote a tool call (an agent's file edit) is estimated from them, not as nothing."""
    arguments = json.dumps({"path": "a.py", "content": "x" * 400})
    streams = {
        "chat_completions": [{"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {
            "name": "edit", "arguments": arguments[:200]}}]}}]},
            {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": arguments[200:]}}]}}]}],
        "anthropic_messages": [{"type": "content_block_delta", "delta": {"type": "thinking_delta", "thinking": "t" * 40}},
                               {"type": "content_block_start", "content_block": {"type": "tool_use", "input": {}}},
                               {"type": "content_block_delta", "delta": {"type": "input_json_delta",
                                                                         "partial_json": arguments}}],
        "responses": [{"type": "response.function_call_arguments.delta", "delta": arguments}],
        "gemini_generate_content": [{"candidates": [{"content": {"parts": [
            {"functionCall": {"name": "edit", "args": {"path": "a.py", "content": "x" * 400}}}]}}]}],
    }
    for endpoint, events in streams.items():
        cut = ResponseReader(endpoint, stream=True)
        cut.feed(_sse(*events))  # and nothing after: the stream was cut
        assert cut.estimated_output_tokens() >= len(arguments) // 4, endpoint
    replies = {
        "chat_completions": {"choices": [{"message": {"content": None, "tool_calls": [
            {"function": {"name": "edit", "arguments": arguments}}]}}]},
        "anthropic_messages": {"content": [{"type": "thinking", "thinking": "t" * 40},
                                           {"type": "tool_use", "name": "edit", "input": json.loads(arguments)}]},
        "responses": {"output": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": "s" * 40}]},
                                 {"type": "function_call", "name": "edit", "arguments": arguments}]},
    }
    for endpoint, reply in replies.items():
        whole = ResponseReader(endpoint, stream=False)
        whole.feed(json.dumps(reply).encode())
        whole.finish()
        assert not whole.found_usage and whole.estimated_output_tokens() >= len(arguments) // 4, endpoint


@pytest.mark.parametrize("address, host", [("10.0.0.1:5555", "10.0.0.1"), ("[::1]:5555", "::1"), ("::1", "::1"),
                                           ("10.0.0.1", "10.0.0.1"), ("", "")])
def test_the_client_host_is_read_from_envoys_source_address(address: str, host: str) -> None:
    from policyd.ext_proc import _host

    assert _host(address) == host


@pytest.mark.parametrize(("path", "body", "bound"), [
    ("/v1/messages", {"model": "m", "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 4}]}, 4),
    ("/v1/messages", {"model": "m", "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, 0),  # unbounded
    ("/v1/responses", {"model": "m", "tools": [{"type": "web_search"}], "max_tool_calls": 2}, 2),
    ("/v1/responses", {"model": "m", "tools": [{"type": "function", "name": "f"}], "max_tool_calls": 2}, 0),
    ("/v1/messages", {"model": "m", "tools": 5}, 0),  # not a list: nothing to read, nothing raised
])
def test_the_web_searches_a_request_allows_are_read(path: str, body: dict, bound: int) -> None:
    call = parse_call("POST", path, {}, json.dumps(body).encode())
    assert not call.problem and call.authorize_input().shape.web_searches == bound


def test_the_service_tier_asked_for_and_the_one_that_served_are_read() -> None:
    asked = parse_call("POST", "/v1/chat/completions", {}, json.dumps({"model": "m", "service_tier": "flex"}).encode())
    assert asked.authorize_input().shape.service_tier == "flex"
    auto = parse_call("POST", "/v1/chat/completions", {}, json.dumps({"model": "m", "service_tier": "auto"}).encode())
    assert auto.authorize_input().shape.service_tier == ""
    chat = ResponseReader("chat_completions", stream=False)
    chat.feed(json.dumps({"service_tier": "priority", "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode())
    chat.finish()
    assert chat.tokens.service_tier == "priority"
    responses = ResponseReader("responses", stream=True)
    responses.feed(_sse({"type": "response.completed", "response": {"service_tier": "default",
                                                                   "usage": {"input_tokens": 1, "output_tokens": 1}}}))
    assert responses.tokens.service_tier == ""  # the default: the base prices


def test_an_hours_cache_writes_are_read_apart() -> None:
    reader = ResponseReader("anthropic_messages", stream=False)
    reader.feed(json.dumps({"usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 30,
                                      "cache_creation": {"ephemeral_5m_input_tokens": 12, "ephemeral_1h_input_tokens": 18},
                                      "output_tokens": 3}}).encode())
    reader.finish()
    t = reader.tokens
    assert (t.input_tokens, t.cached_input_tokens, t.cache_write_input_tokens, t.cache_write_1h_input_tokens) == (
        45, 5, 30, 18)


def test_audio_tokens_are_read_apart_from_text() -> None:
    reader = ResponseReader("chat_completions", stream=False)
    reader.feed(json.dumps({"usage": {"prompt_tokens": 100, "completion_tokens": 40,
                                      "prompt_tokens_details": {"cached_tokens": 30, "audio_tokens": 90},
                                      "completion_tokens_details": {"audio_tokens": 35, "reasoning_tokens": 0}}}).encode())
    reader.finish()
    t = reader.tokens
    # audio beyond what is not cached cannot be: the cached part keeps its cached price
    assert (t.input_tokens, t.cached_input_tokens, t.audio_input_tokens, t.audio_output_tokens) == (100, 30, 70, 35)


def test_web_searches_are_read_where_providers_report_them() -> None:
    anthropic = ResponseReader("anthropic_messages", stream=False)
    anthropic.feed(json.dumps({"usage": {"input_tokens": 9, "output_tokens": 4,
                                         "server_tool_use": {"web_search_requests": 2}}}).encode())
    anthropic.finish()
    assert anthropic.tokens.web_searches == 2
    responses = ResponseReader("responses", stream=True)
    responses.feed(_sse({"type": "response.completed", "response": {
        "output": [{"type": "web_search_call", "status": "completed"}, {"type": "web_search_call"},
                   {"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
        "usage": {"input_tokens": 5, "output_tokens": 1}}}))
    assert responses.tokens.web_searches == 2 and responses.found_usage
    # opening a page or finding in one is not a billed search; the provider's own count wins when given
    browsing = [{"type": "web_search_call", "action": {"type": "search", "query": "q"}},
                {"type": "web_search_call", "action": {"type": "open_page", "url": "https://example.com"}},
                {"type": "web_search_call", "action": {"type": "find_in_page", "pattern": "p"}}]
    counted = ResponseReader("responses", stream=False)
    counted.feed(json.dumps({"output": browsing, "usage": {"input_tokens": 5, "output_tokens": 1}}).encode())
    counted.finish()
    assert counted.tokens.web_searches == 1
    reported = ResponseReader("responses", stream=False)
    reported.feed(json.dumps({"output": browsing, "usage": {"input_tokens": 5, "output_tokens": 1},
                              "tool_usage": {"web_search": {"num_requests": 0},
                                             "image_gen": {"input_tokens": 0, "output_tokens": 0}}}).encode())
    reported.finish()
    assert reported.tokens.web_searches == 0  # a discounted search is not billed: the provider says so


def test_cache_writes_are_read_where_openai_reports_them() -> None:
    """Explicit prompt caching reports the tokens written to the cache beside those read from it: priced
    at the write price (as input when the table has none), and never counted twice with audio input."""
    chat = ResponseReader("chat_completions", stream=False)
    chat.feed(json.dumps({"usage": {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {
        "cached_tokens": 30, "cache_write_tokens": 60, "audio_tokens": 40}}}).encode())
    chat.finish()
    t = chat.tokens
    assert (t.input_tokens, t.cached_input_tokens, t.cache_write_input_tokens, t.audio_input_tokens) == (100, 30, 60, 10)
    responses = ResponseReader("responses", stream=True)
    responses.feed(_sse({"type": "response.completed", "response": {"output": [], "usage": {
        "input_tokens": 50, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 70}}}}))
    t = responses.tokens
    assert (t.input_tokens, t.cached_input_tokens, t.cache_write_input_tokens) == (50, 10, 40)
    kept = ResponseReader("responses", stream=False)  # written to be kept 12 hours: the long write's price
    kept.feed(json.dumps({"output": [], "usage": {"input_tokens": 500, "output_tokens": 2, "input_tokens_details": {
        "cached_tokens": 0, "cache_write_tokens": 400,
        "cache_write_tokens_details": {"ttl_30m_tokens": 100, "ttl_12h_tokens": 300}}}}).encode())
    kept.finish()
    assert (kept.tokens.cache_write_input_tokens, kept.tokens.cache_write_1h_input_tokens) == (400, 300)


def test_openai_requests_may_write_their_prompt_to_the_cache() -> None:
    """OpenAI writes a prompt to its cache unasked (its implicit breakpoint, kept 30 minutes: the short
    write) or for 12 hours when prompt_cache_options.ttl says so (the long write): held at the write price
    where the table makes writes dearer than input. Anthropic writes only what cache_control marks."""
    def write(path: str, body: dict[str, Any]) -> str:
        return parse_call("POST", path, {"authorization": "Bearer k"}, json.dumps(body).encode()).cache_write

    chat = {"model": "gpt-5.6", "messages": [{"role": "user", "content": "hi"}]}
    assert write("/v1/chat/completions", chat) == "5m"
    assert write("/v1/responses", {"model": "gpt-5.6", "input": "hi", "prompt_cache_options": {"ttl": "12h"}}) == "1h"
    assert write("/v1/responses", {"model": "gpt-5.6", "input": "hi", "prompt_cache_options": {"ttl": "30m"}}) == "5m"
    assert write("/v1/messages", {"model": "claude-sonnet-4", "max_tokens": 5, "messages": chat["messages"]}) == ""
    assert write("/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"}) == ""


def test_a_reply_not_streamed_cut_on_its_way_is_charged_its_output_as_held() -> None:
    """A reply not streamed leaves the provider whole, billed whole: a client that hangs up once its headers
    came (the body, and the usage in it, never read) is charged the output held for it, as a client gone
    before the reply began, not the few bytes that got through. A stream cut is charged what it delivered."""
    reply = json.dumps({"choices": [{"message": {"content": "x" * 400}}],
                        "usage": {"prompt_tokens": 9, "completion_tokens": 100}}).encode()
    cut = ResponseReader("chat_completions", stream=False)
    cut.feed(reply[:40])
    cut.finish()
    end = closing(200, cut, cut=True)
    assert (end.action, end.interrupted, end.output_as_held) == ("estimate", True, True)
    whole = ResponseReader("chat_completions", stream=False)
    whole.feed(reply)
    whole.finish()
    assert closing(200, whole, cut=False).action == "settle"
    stream = ResponseReader("chat_completions", stream=True)
    stream.feed(_sse({"choices": [{"delta": {"content": "x" * 40}}]}))
    assert not closing(200, stream, cut=True).output_as_held


def test_a_stream_cut_before_the_usage_of_its_whole_output_is_estimated_from_what_was_delivered() -> None:
    """Anthropic reports the input and one output token at the start, the output at the end: a cut in
    between is not charged one output token, and its input is the provider's, not an estimate."""
    start = {"type": "message_start", "message": {"usage": {"input_tokens": 20, "cache_read_input_tokens": 5,
                                                            "output_tokens": 1}}}
    delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "x" * 400}}
    cut = ResponseReader("anthropic_messages", stream=True)
    cut.feed(_sse(start, delta, delta))
    end = closing(200, cut, cut=True)
    assert (end.action, end.reason, end.interrupted) == ("estimate", "usage_estimated:stream_cut", True)
    assert cut.estimated_output_tokens() == 200 and (cut.tokens.input_tokens, cut.tokens.cached_input_tokens) == (25, 5)
    whole = ResponseReader("anthropic_messages", stream=True)
    whole.feed(_sse(start, delta, {"type": "message_delta", "usage": {"output_tokens": 180}}))
    assert closing(200, whole, cut=True) == Closing("settle", interrupted=True)  # the usage of it all came first
    assert whole.tokens.output_tokens == 180
    chat = ResponseReader("chat_completions", stream=True)  # OpenAI: the usage chunk is the last word
    chat.feed(_sse({"choices": [{"delta": {"content": "abcd"}}]},
                   {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}}))
    assert closing(200, chat, cut=True) == Closing("settle", interrupted=True)
    gemini = ResponseReader("gemini_generate_content", stream=True)  # running counts, the last one is final
    gemini.feed(_sse({"candidates": [{"content": {"parts": [{"text": "y" * 80}]}}],
                      "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 20}}))
    assert closing(200, gemini, cut=True).action == "estimate" and gemini.estimated_output_tokens() == 20


def test_anthropics_input_counted_again_at_the_end_replaces_the_start_count() -> None:
    """A message_delta's counts are cumulative (the results of a web search add input mid-stream); a count
    it leaves out or gives as null (Anthropic-compatible servers do) keeps the message_start's."""
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": 20, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 8,
        "cache_creation": {"ephemeral_1h_input_tokens": 8}, "output_tokens": 1}}}
    for delta_usage, expected in (
            ({"input_tokens": 10682, "cache_read_input_tokens": 5, "cache_creation_input_tokens": 8,
              "output_tokens": 510, "server_tool_use": {"web_search_requests": 1}}, (10682 + 13, 5, 8, 8)),
            ({"input_tokens": None, "cache_read_input_tokens": None, "output_tokens": 510}, (33, 5, 8, 8)),
            ({"output_tokens": 510}, (33, 5, 8, 8)),
            ({"input_tokens": 40, "output_tokens": 510}, (53, 5, 8, 8)),
            ({"cache_creation_input_tokens": 3, "output_tokens": 510}, (28, 5, 3, 3))):
        reader = ResponseReader("anthropic_messages", stream=True)
        reader.feed(_sse(start, {"type": "message_delta", "usage": delta_usage}, {"type": "message_stop"}))
        reader.finish()
        t = reader.tokens
        assert (t.input_tokens, t.cached_input_tokens, t.cache_write_input_tokens, t.cache_write_1h_input_tokens,
                t.output_tokens) == (*expected, 510), delta_usage


def _anthropic_read(body: dict[str, Any], stream: bool = False, piece: int = 0) -> ResponseReader:
    """An Anthropic reply read whole, or as a stream of message_start, a delta, message_delta (its usage, its
    stop_reason) and message_stop, in pieces of `piece` bytes."""
    reader = ResponseReader("anthropic_messages", stream=stream)
    if stream:
        usage = body["usage"]
        start = {"input_tokens": usage.get("input_tokens", 0), "output_tokens": 1}
        data = b"event: message_start\n" + _sse(
            {"type": "message_start", "message": {"model": body.get("asked", body["model"]), "usage": start}},
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "abcd"}},
            {"type": "message_delta", "delta": {"stop_reason": body["stop_reason"]}, "usage": usage},
            {"type": "message_stop"})
    else:
        data = json.dumps(body).encode()
    for i in range(0, len(data), piece or len(data)):
        reader.feed(data[i:i + (piece or len(data))])
    reader.finish()
    return reader


def _tokens(reader: ResponseReader) -> tuple[int, int, int, int, int]:
    t = reader.tokens
    return t.input_tokens, t.cached_input_tokens, t.cache_write_input_tokens, t.cache_write_1h_input_tokens, \
        t.output_tokens


def test_anthropics_iterations_are_what_it_bills_each_at_the_model_that_ran_it() -> None:
    """Anthropic's usage.iterations, whole or streamed (its final message_delta's): a compaction's tokens, which
    the top-level counts leave out, are billed; an advisor's calls and a server-side fallback's declined
    attempt that wrote something are billed at their own models' prices (parts naming them); an attempt
    declined before it wrote anything is not billed; the model that wrote the reply is the fallback's."""
    compacted = {"model": "claude-sonnet-4", "stop_reason": "end_turn", "usage": {
        "input_tokens": 23000, "output_tokens": 1000, "iterations": [
            {"type": "compaction", "input_tokens": 180000, "output_tokens": 3500, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0},
            {"type": "message", "input_tokens": 23000, "output_tokens": 1000, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0}]}}
    fell_back = {"model": "claude-opus-4-8", "asked": "claude-fable-5", "stop_reason": "end_turn", "usage": {
        "input_tokens": 2, "output_tokens": 13658, "cache_read_input_tokens": 79214, "cache_creation_input_tokens": 0,
        "iterations": [
            {"type": "message", "model": "claude-fable-5", "input_tokens": 2, "output_tokens": 0,
             "cache_read_input_tokens": 70000, "cache_creation_input_tokens": 0},
            {"type": "message", "model": "claude-fable-5", "input_tokens": 2, "output_tokens": 578,
             "cache_read_input_tokens": 72769, "cache_creation_input_tokens": 10421,
             "cache_creation": {"ephemeral_5m_input_tokens": 10421, "ephemeral_1h_input_tokens": 0}},
            {"type": "fallback_message", "model": "claude-opus-4-8", "input_tokens": 2, "output_tokens": 13658,
             "cache_read_input_tokens": 79214, "cache_creation_input_tokens": 0}]}}
    advised = {"model": "claude-sonnet-4", "stop_reason": "end_turn", "usage": {
        "input_tokens": 1200, "output_tokens": 300, "cache_creation_input_tokens": 500,
        "cache_creation": {"ephemeral_1h_input_tokens": 500}, "iterations": [
            {"type": "message", "model": "claude-sonnet-4", "input_tokens": 500, "output_tokens": 100,
             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 500,
             "cache_creation": {"ephemeral_1h_input_tokens": 500}},
            {"type": "advisor_message", "model": "claude-opus-4-8", "input_tokens": 900, "output_tokens": 250,
             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            {"type": "message", "model": "claude-sonnet-4", "input_tokens": 700, "output_tokens": 200,
             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}]}}
    for stream, piece in ((False, 0), (True, 0), (True, 13)):
        reader = _anthropic_read(compacted, stream, piece)
        assert _tokens(reader) == (203000, 0, 0, 0, 4500) and reader.found_usage
        assert [(p.kind, p.model, p.input_tokens, p.output_tokens) for p in reader.tokens.parts] == [
            ("compaction", "", 180000, 3500), ("message", "", 23000, 1000)]
        assert closing(200, reader, cut=False).action == "settle"
        reader = _anthropic_read(fell_back, stream, piece)
        assert [(p.kind, p.model, p.input_tokens, p.cached_input_tokens, p.cache_write_input_tokens, p.output_tokens)
                for p in reader.tokens.parts] == [("message", "claude-fable-5", 83192, 72769, 10421, 578),
                                                  ("fallback_message", "claude-opus-4-8", 79216, 79214, 0, 13658)]
        assert _tokens(reader) == (83192 + 79216, 72769 + 79214, 10421, 0, 578 + 13658)
        assert reader.tokens.reply_model == "claude-opus-4-8"
        reader = _anthropic_read(advised, stream, piece)
        assert [(p.model, p.cache_write_1h_input_tokens) for p in reader.tokens.parts] == [
            ("claude-sonnet-4", 500), ("claude-opus-4-8", 0), ("claude-sonnet-4", 0)]
        assert _tokens(reader) == (2600, 0, 500, 500, 550)
    # a reply too large to hold is read as it passes: its usage, iterations and stop_reason all the same
    large = {**fell_back, "content": [{"type": "text", "text": "x" * (5 * 1024 * 1024)}]}
    assert _tokens(_anthropic_read(large, piece=65536)) == (83192 + 79216, 72769 + 79214, 10421, 0, 578 + 13658)
    # no iterations: the top-level counts, no parts
    plain = _anthropic_read({"model": "claude-sonnet-4", "stop_reason": "end_turn",
                             "usage": {"input_tokens": 12, "output_tokens": 3}})
    assert (_tokens(plain), plain.tokens.parts) == ((12, 0, 0, 0, 3), ())


_COUNT = st.one_of(st.integers(min_value=-5, max_value=10**7), st.none(), st.text(max_size=3), st.floats(0, 10))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "type": st.sampled_from(["message", "compaction", "advisor_message", "fallback_message", "other", 7]),
    "model": st.one_of(st.sampled_from(["", "claude-fable-5", "claude-opus-4-8"]), st.none(), st.integers()),
    "input_tokens": _COUNT, "output_tokens": _COUNT, "cache_read_input_tokens": _COUNT,
    "cache_creation_input_tokens": _COUNT,
    "cache_creation": st.one_of(st.none(), st.fixed_dictionaries({"ephemeral_1h_input_tokens": _COUNT}))}),
    max_size=8), st.sampled_from(["end_turn", "refusal", "max_tokens"]))
def test_whatever_iterations_anthropic_sends_the_usage_read_is_one_a_settle_takes(
        iterations: list[dict[str, Any]], stop: str) -> None:
    """Any usage.iterations (counts missing, negative, of the wrong type): the parts read are billed parts a
    Settle accepts (cached and written within each part's input, an hour's writes within its writes), the
    request's tokens their sums, and a reply that wrote nothing and was refused is billed nothing."""
    from policyd.domain import UsageReport
    from policyd.validation import check_usage

    reader = _anthropic_read({"model": "claude-sonnet-4", "stop_reason": stop, "usage": {
        "input_tokens": 3, "output_tokens": 2, "iterations": iterations}})
    t = reader.tokens
    check_usage(UsageReport(request_id="r", **{name: getattr(t, name) for name in (
        "input_tokens", "cached_input_tokens", "cache_write_input_tokens", "cache_write_1h_input_tokens",
        "output_tokens")}, parts=t.parts))
    if iterations:  # the top-level counts stand only without them
        assert t.input_tokens == sum(p.input_tokens for p in t.parts)
        assert t.output_tokens == sum(p.output_tokens for p in t.parts)
    else:
        assert (t.input_tokens, t.output_tokens, t.parts) == (3, 2, ())
    assert all(p.output_tokens or p.kind != "message" or stop != "refusal" for p in t.parts)
    if stop == "refusal" and not t.output_tokens:
        assert (t.input_tokens, t.parts, reader.found_usage) == (0, (), True)


def test_an_anthropic_refusal_before_any_output_is_billed_nothing() -> None:
    """stop_reason "refusal" with nothing written (Claude's safety classifiers declined the request): Anthropic
    bills nothing, whatever its input; settled at zero (not estimated from the input). A refusal after some
    output is billed as reported, and a server-side fallback whose every attempt declined before writing
    anything is billed nothing either."""
    refused = {"model": "claude-fable-5", "content": [], "stop_reason": "refusal",
               "stop_details": {"type": "refusal", "category": "cyber"},
               "usage": {"input_tokens": 412, "output_tokens": 0, "cache_read_input_tokens": 3000}}
    for stream, piece in ((False, 0), (True, 0), (True, 9)):
        reader = _anthropic_read(refused, stream, piece)
        assert _tokens(reader) == (0, 0, 0, 0, 0) and reader.found_usage
        assert closing(200, reader, cut=False).action == "settle"
        late = _anthropic_read({**refused, "usage": {"input_tokens": 412, "output_tokens": 37}}, stream, piece)
        assert _tokens(late) == (412, 0, 0, 0, 37)
        chain = _anthropic_read({**refused, "usage": {"input_tokens": 412, "output_tokens": 0, "iterations": [
            {"type": "message", "model": "claude-fable-5", "input_tokens": 412, "output_tokens": 0,
             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            {"type": "message", "model": "claude-opus-4-8", "input_tokens": 412, "output_tokens": 0,
             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}]}}, stream, piece)
        assert _tokens(chain) == (0, 0, 0, 0, 0) and chain.tokens.parts == () and chain.found_usage


def test_text_to_speech_counts_the_characters_and_reads_no_audio() -> None:
    body = json.dumps({"model": "tts-1", "voice": "alloy", "input": "héllo wörld"}).encode()
    call = parse_call("POST", "/v1/audio/speech", {"authorization": "Bearer k"}, body)
    assert (call.endpoint, call.input_tokens, call.max_output_tokens, call.problem) == ("audio_speech", 11, 0, "")
    azure = parse_call("POST", "/openai/deployments/tts-hd/audio/speech?api-version=2025-03-01-preview",
                       {"api-key": "k"}, body)
    assert (azure.endpoint, azure.model, azure.input_tokens) == ("audio_speech", "tts-hd", 11)
    for bad in ({"model": "tts-1"}, {"model": "tts-1", "input": ""}, {"model": "tts-1", "input": ["a"]}):
        refused = parse_call("POST", "/v1/audio/speech", {}, json.dumps(bad).encode())
        assert (refused.problem, refused.problem_param) == ("invalid_request", "input")
    assert rewrite_body(json.loads(body), "audio_speech", "tts-1", "tts-1", 0, False, False) is None
    reader = ResponseReader("audio_speech", stream=False, request_input_tokens=11)
    reader.feed(b"ID3" + bytes(10_000_000))  # never buffered
    assert closing(200, reader, cut=True) == Closing("settle", interrupted=True)  # billed whole, even if cut
    reader.finish()
    assert (reader.tokens.input_tokens, reader.found_usage, closing(200, reader, cut=False)) == (
        11, True, Closing("settle"))
    assert closing(500, reader, cut=False).action == "release"


def test_text_to_speech_priced_by_tokens_reads_its_events_usage_or_estimates_its_audio() -> None:
    """A speech reservation with an output cap (its model priced for output, gpt-4o-mini-tts) bills tokens:
    stream_format sse ends with speech.audio.done and its usage (every output token audio); audio bytes
    report none, and are estimated from the characters (7 audio tokens for 5), never buffered."""
    body = {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": "héllo wörld", "stream_format": "sse"}
    call = parse_call("POST", "/v1/audio/speech", {"authorization": "Bearer k"}, json.dumps(body).encode())
    assert (call.endpoint, call.stream, call.input_tokens, call.problem) == ("audio_speech", True, 11, "")
    assert parse_call("POST", "/v1/audio/speech", {}, json.dumps({**body, "stream_format": "audio"}).encode()).stream is False
    assert rewrite_body(body, "audio_speech", "gpt-4o-mini-tts", "gpt-4o-mini-tts", 8000, False, True) is None  # no cap to send
    events = ResponseReader("audio_speech", stream=True, request_input_tokens=11, output_cap=8000)
    events.feed(_sse({"type": "speech.audio.delta", "audio": "SUQz" * 50_000}))
    assert closing(200, events, cut=True).action == "estimate"  # cut before its usage
    assert events.estimated_output_tokens() == 16  # ceil(11 * 7 / 5)
    events.feed(_sse({"type": "speech.audio.done", "usage": {"input_tokens": 4, "output_tokens": 31, "total_tokens": 35}}))
    events.finish()
    assert (events.tokens.input_tokens, events.tokens.output_tokens, events.tokens.audio_output_tokens) == (4, 31, 31)
    assert (events.finished, closing(200, events, cut=False)) == (True, Closing("settle"))
    audio = ResponseReader("audio_speech", stream=False, request_input_tokens=11, output_cap=8000)
    audio.feed(b"ID3" + bytes(10_000_000))
    audio.finish()
    assert (audio.found_usage, audio.tokens.input_tokens, len(audio._buffer)) == (False, 0, 0)
    assert closing(200, audio, cut=False) == Closing("estimate", "usage_estimated:no_usage_reported")
    assert audio.estimated_output_tokens() == 16
    by_characters = ResponseReader("audio_speech", stream=False, request_input_tokens=11)  # no cap: tts-1
    assert (by_characters.found_usage, by_characters.tokens.input_tokens) == (True, 11)


def test_a_gemini_stream_without_sse_is_read_as_the_json_array_it_is() -> None:
    """:streamGenerateContent without alt=sse streams one JSON array, an object at a time (REST clients
    and curl get this): its usage is read as the objects arrive, split anywhere, even inside a character."""
    chunks = [{"candidates": [{"content": {"parts": [{"text": "héllo " * 10}]}}],
               "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 5}},
              {"candidates": [{"content": {"parts": [{"text": "wörld " * 10}]}}],
               "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 30, "thoughtsTokenCount": 8}}]
    body = ("[" + "\n,\r\n".join(json.dumps(c, ensure_ascii=False) for c in chunks) + "]").encode()
    for size in (1, 7, len(body)):
        reader = ResponseReader("gemini_generate_content", stream=True)
        for at in range(0, len(body), size):
            reader.feed(body[at:at + size])
        reader.finish()
        assert (reader.tokens.input_tokens, reader.tokens.output_tokens, reader.found_usage) == (12, 38, True)
        assert reader.finished and not reader.malformed and closing(200, reader, cut=False) == Closing("settle")
    cut = ResponseReader("gemini_generate_content", stream=True)
    cut.feed(body[:len(body) // 2 + 40])  # the first object whole, the second cut
    cut.finish()
    assert cut.malformed and not cut.finished and cut.tokens.output_tokens == 5
    assert closing(200, cut, cut=True).action == "estimate" and cut.estimated_output_tokens() >= 15  # text delivered


def _fed_in_pieces(reader: ResponseReader, raw: bytes, piece: int = 65536) -> ResponseReader:
    for at in range(0, len(raw), piece):
        reader.feed(raw[at:at + piece])
    reader.finish()
    return reader


def test_usage_is_read_from_replies_and_events_too_large_to_hold() -> None:
    """Past the 4 MiB a reply is held whole for, and the 1 MiB a stream event is: the usage, the tier, the
    web searches and the image count still come from the provider, not from an estimate."""
    image = "iVBORw0KGgo" * 200_000  # 2.2 MB of base64
    completed = {"type": "response.completed", "response": {
        "id": "resp_1", "output": [{"type": "image_generation_call", "result": image}, {"type": "web_search_call"},
                                   {"type": "message", "content": [{"type": "output_text", "text": "done"}]}],
        "usage": {"input_tokens": 40, "output_tokens": 1100, "input_tokens_details": {"cached_tokens": 8}},
        "service_tier": "priority"}}
    stream = _sse({"type": "response.output_text.delta", "delta": "done"}) + _sse(completed)
    reader = _fed_in_pieces(ResponseReader("responses", stream=True), stream)
    t = reader.tokens
    assert (t.input_tokens, t.cached_input_tokens, t.output_tokens, t.web_searches, t.service_tier) == (
        40, 8, 1100, 1, "priority")
    assert reader.finished and not reader.malformed and closing(200, reader, cut=False).action == "settle"
    gemini = {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": image}}]}}],
              "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 1290}}
    reader = _fed_in_pieces(ResponseReader("gemini_generate_content", stream=True), _sse(gemini))
    assert (reader.tokens.input_tokens, reader.tokens.output_tokens) == (9, 1290)
    images = {"created": 0, "data": [{"b64_json": image}, {"b64_json": image}],
              "usage": {"input_tokens": 20, "output_tokens": 4000}}
    reader = _fed_in_pieces(ResponseReader("images", stream=False), json.dumps(images).encode())
    assert (reader.images, reader.tokens.input_tokens, reader.tokens.output_tokens, reader.found_usage) == (2, 20, 4000,
                                                                                                            True)
    edited = {**images, "usage": {"input_tokens": 700, "output_tokens": 4000, "input_tokens_details": {
        "text_tokens": 54, "image_tokens": 646, "cached_tokens": 100}}}  # an edit's input images: priced apart
    reader = _fed_in_pieces(ResponseReader("images", stream=False), json.dumps(edited).encode())
    assert (reader.tokens.input_tokens, reader.tokens.cached_input_tokens, reader.tokens.image_input_tokens) == (
        700, 100, 600)  # the image tokens' uncached part (the cached ones are priced as cached)
    anthropic = {"type": "message", "content": [{"type": "text", "text": "x" * 5_000_000}],
                 "usage": {"input_tokens": 10, "output_tokens": 1_250_000, "cache_read_input_tokens": 2}}
    reader = _fed_in_pieces(ResponseReader("anthropic_messages", stream=False), json.dumps(anthropic).encode())
    assert (reader.tokens.input_tokens, reader.tokens.cached_input_tokens, reader.tokens.output_tokens) == (
        12, 2, 1_250_000)
    array = (b"[" + json.dumps(gemini).encode() + b",\r\n" + json.dumps({"candidates": [], "usageMetadata": {
        "promptTokenCount": 9, "candidatesTokenCount": 1300}}).encode() + b"]")  # without alt=sse: one JSON array
    reader = _fed_in_pieces(ResponseReader("gemini_generate_content", stream=True), array)
    assert (reader.tokens.input_tokens, reader.tokens.output_tokens, reader.finished, reader.malformed) == (
        9, 1300, True, False)
    cut = _fed_in_pieces(ResponseReader("responses", stream=True), stream[:len(stream) // 2])  # ends mid-event
    assert cut.malformed and not cut.found_usage


def test_stored_responses_are_named_by_path_and_method_and_their_ids_read_from_replies() -> None:
    for method, path, stored in (("GET", "/v1/responses/resp_1", "resp_1"), ("DELETE", "/v1/responses/resp_1", "resp_1"),
                                 ("GET", "/v1/responses/resp_1/input_items?limit=5", "resp_1"),
                                 ("POST", "/v1/responses/resp_1/cancel", "resp_1"),
                                 ("GET", "/openai/responses/resp_2", "resp_2"),
                                 ("POST", "/v1/responses/resp_1", ""), ("DELETE", "/v1/responses/resp_1/input_items", ""),
                                 ("GET", "/v1/responses/resp_1/cancel", ""), ("POST", "/v1/responses/input_tokens", "")):
        named = http_api.endpoint_of(method, path)
        assert named.stored_response == stored, (method, path)
        assert named.count_tokens == (bool(stored) or path.endswith("input_tokens"))
    call = http_api.parse_call("GET", "/v1/responses/resp_1", {"authorization": "Bearer k"}, b"")
    assert (call.problem, call.endpoint, call.stored_response, call.authorize_input().stored_response) == (
        "", "responses", "resp_1", "resp_1")
    streamed = ResponseReader("responses", stream=True)
    streamed.feed(_sse({"type": "response.created", "response": {"id": "resp_s", "status": "in_progress"}},
                       {"type": "response.completed", "response": {"id": "resp_s", "usage": {"input_tokens": 1}}}))
    whole = ResponseReader("responses", stream=False)
    whole.feed(json.dumps({"id": "resp_w", "output": [{"id": "msg_1"}], "usage": {"input_tokens": 1}}).encode())
    whole.finish()
    chat = ResponseReader("chat_completions", stream=False)
    chat.feed(b'{"id": "chatcmpl-1", "usage": {"prompt_tokens": 1}}')
    chat.finish()
    assert (streamed.response_id, whole.response_id, chat.response_id) == ("resp_s", "resp_w", "")
    # a chat completion sent with store: true is named by its id; its stream's chunks carry the id
    kept = ResponseReader("chat_completions", stream=True, stored=True)
    kept.feed(_sse({"id": "chatcmpl-k", "choices": [{"index": 0, "delta": {"content": "a"}}]}))
    kept.finish()
    assert kept.response_id == "chatcmpl-k"
    for method, path, stored in (("GET", "/v1/chat/completions/chatcmpl-1", "chatcmpl-1"),
                                 ("POST", "/v1/chat/completions/chatcmpl-1", "chatcmpl-1"),
                                 ("DELETE", "/v1/chat/completions/chatcmpl-1", "chatcmpl-1"),
                                 ("GET", "/v1/chat/completions/chatcmpl-1/messages", "chatcmpl-1"),
                                 ("POST", "/v1/chat/completions/chatcmpl-1/messages", "")):
        named = http_api.endpoint_of(method, path)
        assert (named.stored_response, named.family if stored else "") == (stored, "chat_completions" if stored else "")
    body = json.dumps({"model": "m", "messages": [], "store": True}).encode()
    assert http_api.parse_call("POST", "/v1/chat/completions", {}, body).stores_reply
    assert not http_api.parse_call("POST", "/v1/chat/completions", {}, body.replace(b"true", b"false")).stores_reply


def test_conversations_are_named_by_path_and_method_and_their_ids_read_from_replies() -> None:
    """A conversation made (POST /v1/conversations) is settled, not free-passed; one read, changed, deleted,
    or its items, is reached as a stored response is; a response names the conversation it adds to."""
    for method, path, stored in (("GET", "/v1/conversations/conv_1", "conv_1"), ("POST", "/v1/conversations/conv_1", "conv_1"),
                                 ("DELETE", "/v1/conversations/conv_1", "conv_1"),
                                 ("GET", "/v1/conversations/conv_1/items?limit=5", "conv_1"),
                                 ("POST", "/v1/conversations/conv_1/items", "conv_1"),
                                 ("GET", "/v1/conversations/conv_1/items/msg_2", "conv_1"),
                                 ("DELETE", "/v1/conversations/conv_1/items/msg_2", "conv_1"),
                                 ("DELETE", "/v1/conversations/conv_1/items", ""),
                                 ("POST", "/v1/conversations/conv_1/items/msg_2", ""), ("PUT", "/v1/conversations/conv_1", "")):
        assert http_api.endpoint_of(method, path).stored_response == stored, (method, path)
    made = http_api.parse_call("POST", "/v1/conversations", {"authorization": "Bearer k"},
                               b'{"items": [{"type": "message", "role": "user", "content": "hi"}]}')
    asked = made.authorize_input()
    assert (made.problem, made.endpoint, made.count_tokens, asked.creates, asked.model) == (
        "", "responses", False, "conversation", "")
    assert http_api.parse_call("GET", "/v1/conversations", {}, b"").problem == "unknown_endpoint"
    for named in ("conv_9", {"id": "conv_9"}):
        body = json.dumps({"model": "m", "input": "hi", "conversation": named}).encode()
        assert http_api.parse_call("POST", "/v1/responses", {}, body).authorize_input().conversation == "conv_9"
    reply = ResponseReader("responses", stream=False)
    reply.feed(b'{"id": "conv_9", "object": "conversation", "created_at": 1, "metadata": {}}')
    reply.finish()
    assert (reply.response_id, reply.found_usage, reply.tokens.any) == ("conv_9", True, False)
    assert closing(200, reply, cut=False).action == "settle"  # at 0: its reply is all its usage


def test_vertex_ai_paths_name_the_model_and_a_downgrade_rewrites_it() -> None:
    root = "/v1/projects/p/locations/us-east5/publishers"
    claude = parse_call("POST", f"{root}/anthropic/models/claude-opus-4-6:streamRawPredict", {},
                        json.dumps({"anthropic_version": "vertex-2023-10-16", "max_tokens": 9, "stream": True,
                                    "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert (claude.endpoint, claude.model, claude.model_in_path, claude.stream, claude.max_output_tokens,
            claude.problem) == ("anthropic_messages", "claude-opus-4-6", True, True, 9, "")
    gemini = parse_call("POST", f"{root}/google/models/gemini-2.5-pro:streamGenerateContent?alt=sse", {},
                        b'{"contents": []}')
    assert (gemini.endpoint, gemini.model, gemini.stream) == ("gemini_generate_content", "gemini-2.5-pro", True)
    assert upstream_path(f"{root}/google/models/gemini-2.5-pro:generateContent?alt=sse", "gemini-2.5-flash",
                         "gemini-2.5-pro") == f"{root}/google/models/gemini-2.5-flash:generateContent?alt=sse"
    counted = parse_call("POST", f"{root}/google/models/gemini-2.5-pro:countTokens", {}, b'{"contents": []}')
    assert counted.count_tokens
    for mixed in (f"{root}/google/models/gemini-2.5-pro:rawPredict", f"{root}/anthropic/models/claude:generateContent"):
        assert parse_call("POST", mixed, {}, b"{}").problem == "unknown_endpoint"


def test_anthropics_hidden_tool_prompt_counts_as_input() -> None:
    """Anthropic bills a system prompt it adds for tool use (346 tokens) and the definitions of the tools it
    defines itself (bash, computer, text editor: up to 735 tokens each), none of them in the body: they
    count as prompt bytes, so a strict bound holds for a short request with tools."""
    def prompt_bytes(tools: list[Any]) -> int:
        body = {"model": "claude-sonnet-4", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
        call = http_api.parse_call("POST", "/v1/messages", {}, json.dumps({**body, **({"tools": tools} if tools else {})}).encode())
        return call.prompt_bytes

    bare = prompt_bytes([])
    custom = [{"name": "f", "input_schema": {"type": "object"}}]
    with_custom = prompt_bytes(custom)
    assert with_custom - bare >= 346 + http_api._text_bytes({"tools": custom})  # a token is at most a byte
    assert prompt_bytes(custom + [{"type": "bash_20250124", "name": "bash"}]) - with_custom >= 735 + len("bash")
    chat = http_api.parse_call("POST", "/v1/chat/completions", {}, json.dumps(
        {"model": "m", "messages": [], "tools": [{"type": "function", "function": {"name": "f"}}]}).encode())
    assert chat.prompt_bytes == len(b'[{"type":"function","function":{"name":"f"}}]')  # names and all


def test_every_field_a_provider_bills_as_input_counts() -> None:
    """Tool definitions count with their property names (the provider renders them into the prompt), as do
    the legacy functions, a response schema, a prediction and Gemini's snake_case system instruction;
    ids, labels and the caller's metadata do not."""
    def prompt_bytes(path: str, **fields: Any) -> int:
        return parse_call("POST", path, {}, json.dumps({"model": "m", "max_tokens": 5, **fields}).encode()).prompt_bytes

    chat = "/v1/chat/completions"
    bare = prompt_bytes(chat, messages=[{"role": "user", "content": "hi"}])
    name = "customer_billing_address_line_two"
    schema = {"type": "object", "properties": {name: {"type": "string"}}}
    for field, value in (("tools", [{"type": "function", "function": {"name": "f", "parameters": schema}}]),
                         ("functions", [{"name": "f", "parameters": schema}]),
                         ("response_format", {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}),
                         ("prediction", {"type": "content", "content": name})):
        assert prompt_bytes(chat, messages=[{"role": "user", "content": "hi"}], **{field: value}) - bare \
            >= len(name), field
    assert prompt_bytes(chat, messages=[{"role": "user", "content": "hi"}], user="u" * 500, metadata={"k": "v" * 500},
                        prompt_cache_key="c" * 500, safety_identifier="s" * 500, temperature=0.5) == bare
    gemini = "/v1beta/models/gemini-2.5-flash:generateContent"
    assert prompt_bytes(gemini, contents=[], system_instruction={"parts": [{"text": "x" * 900}]}) >= 900
    assert prompt_bytes(gemini, contents=[], systemInstruction={"parts": [{"text": "x" * 900}]}) >= 900


def test_the_output_cap_is_read_where_the_api_reads_it() -> None:
    """A chat completion's larger of max_tokens and max_completion_tokens (OpenAI-compatible providers differ
    on which wins); a cap in a field the API does not read is none, and policyd writes its own where the
    API reads it; a cap the provider would refuse is refused before anything is held."""
    def call(path: str, **fields: Any) -> Any:
        return parse_call("POST", path, {}, json.dumps({"model": "m", "messages": [], **fields}).encode())

    chat = "/v1/chat/completions"
    assert call(chat, max_tokens=10, max_completion_tokens=900).max_output_tokens == 900
    assert call(chat, max_tokens=900, max_completion_tokens=10).max_output_tokens == 900
    assert call(chat, max_tokens=64.0).max_output_tokens == 64
    assert call(chat, max_tokens=None, max_completion_tokens=7).max_output_tokens == 7
    stray = call(chat, max_output_tokens=5)  # not a chat completion's field: no cap
    assert (stray.max_output_tokens, stray.problem) == (0, "")
    body = rewrite_body(stray.body, "chat_completions", "m", "m", 300, False, False)
    assert body["max_completion_tokens"] == 300
    assert call("/v1/responses", max_tokens=5).max_output_tokens == 0
    assert call("/v1/responses", max_output_tokens=5).max_output_tokens == 5
    assert call("/v1/messages", max_output_tokens=5, max_completion_tokens=6).max_output_tokens == 0
    assert call("/v1/messages", max_tokens=5).max_output_tokens == 5
    for bad in ("1000", 0, -1, 1.5, True, [5], 10**12 + 1):  # past any count policyd holds: named as sent
        refused = call(chat, max_tokens=bad)
        assert (refused.problem, refused.problem_param) == ("invalid_request", "max_tokens"), bad
    assert call(chat, max_tokens=10**12).problem == ""
    assert call("/v1/messages", max_tokens=0).problem == "invalid_request"
    huge = parse_call("POST", "/v1beta/models/g:generateContent", {},
                      json.dumps({"contents": [], "generationConfig": {"maxOutputTokens": 10**13}}).encode())
    assert (huge.problem, huge.problem_param) == ("invalid_request", "generationConfig.maxOutputTokens")


def test_gemini_reads_either_name_of_its_generation_config() -> None:
    """Gemini's JSON takes snake_case names and counts written as text: policyd reads the output cap and the
    candidates from either, writes its cap into the config the body gives (a second config would be
    refused by the provider), and refuses a body giving both."""
    path = "/v1beta/models/gemini-2.5-flash:generateContent"

    def call(**fields: Any) -> Any:
        return parse_call("POST", path, {}, json.dumps({"contents": [], **fields}).encode())

    snake = call(generation_config={"max_output_tokens": 40, "candidate_count": "3"})
    assert (snake.max_output_tokens, snake.choices, snake.problem) == (40, 3, "")
    assert call(generationConfig={"maxOutputTokens": "41"}).max_output_tokens == 41
    unset = call(generation_config={"max_output_tokens": 0, "temperature": 0.1})
    assert (unset.max_output_tokens, unset.problem) == (0, "")  # 0 is no cap to Gemini
    body = rewrite_body(unset.body, "gemini_generate_content", "gemini-2.5-flash", "gemini-2.5-flash", 500, False,
                        False, model_in_path=True)
    assert "generationConfig" not in body
    assert body["generation_config"] == {"temperature": 0.1, "maxOutputTokens": 500}
    plain = rewrite_body({"contents": []}, "gemini_generate_content", "g", "g", 500, False, False, model_in_path=True)
    assert plain["generationConfig"] == {"maxOutputTokens": 500}
    both = call(generationConfig={}, generation_config={})
    assert (both.problem, both.problem_param) == ("invalid_request", "generationConfig")
    for bad in ({"maxOutputTokens": -5}, {"max_output_tokens": "many"}, {"candidateCount": 0}):
        assert call(generationConfig=bad).problem == "invalid_request", bad


def test_input_marked_for_the_cache_is_named_with_its_longest_time_to_live() -> None:
    """Anthropic's cache_control on the system, tools, a message's content block or at the top; an hour's
    mark wins over five minutes'; OpenAI-compatible chat messages carry it too."""
    def cache_write(path: str, body: dict[str, Any]) -> str:
        call = http_api.parse_call("POST", path, {}, json.dumps({"model": "m", "max_tokens": 5, **body}).encode())
        return call.authorize_input().shape.cache_write

    ephemeral = {"type": "ephemeral"}
    assert cache_write("/v1/messages", {"messages": [{"role": "user", "content": "hi"}]}) == ""
    assert cache_write("/v1/messages", {"system": [{"type": "text", "text": "s", "cache_control": ephemeral}],
                                        "messages": []}) == "5m"
    assert cache_write("/v1/messages", {"tools": [{"name": "t", "cache_control": {**ephemeral, "ttl": "1h"}}],
                                        "messages": [{"role": "user", "content": [
                                            {"type": "text", "text": "x", "cache_control": ephemeral}]}]}) == "1h"
    assert cache_write("/v1/messages", {"cache_control": ephemeral, "messages": []}) == "5m"
    assert cache_write("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "cache_control": ephemeral}]}]}) == "5m"
    assert cache_write("/v1/messages", {"messages": [{"role": "user", "content": "cache_control"}]}) == ""


def test_a_reply_that_may_be_spoken_is_named() -> None:
    for modalities, spoken in ((["text", "audio"], True), (["text"], False), (None, False), ("audio", False)):
        body = {"model": "gpt-4o-audio-preview", "messages": [], **({"modalities": modalities} if modalities else {})}
        call = http_api.parse_call("POST", "/v1/chat/completions", {}, json.dumps(body).encode())
        assert call.authorize_input().shape.audio_output is spoken, modalities


def test_files_are_named_by_path_and_method_and_their_ids_read_from_requests() -> None:
    for method, path, stored, creates in (("POST", "/v1/files", "", "file"), ("GET", "/v1/files/file-1", "file-1", ""),
                                          ("DELETE", "/v1/files/file-1", "file-1", ""),
                                          ("GET", "/v1/files/file-1/content", "file-1", ""),
                                          ("POST", "/v1/files/file-1", "", ""), ("GET", "/v1/files", "", "")):
        named = http_api.endpoint_of(method, path)
        assert (named.stored_response, named.creates) == (stored, creates), (method, path)
    # Anthropic's Files API: the same paths, its family's (anthropic_messages), made at Anthropic
    anthropic = http_api.parse_call("POST", "/v1/files", {"anthropic-version": "2023-06-01"}, b"x")
    assert (anthropic.problem, anthropic.endpoint, anthropic.creates, anthropic.creates_at) == (
        "", "anthropic_messages", "file", "anthropic")
    for method in ("GET", "DELETE"):
        read = http_api.parse_call(method, "/v1/files/file_011", {"anthropic-version": "2023-06-01"}, b"")
        assert (read.endpoint, read.stored_response, read.creates_at) == ("anthropic_messages", "file_011", "")
    assert http_api.parse_call("GET", "/v1/files", {"anthropic-version": "2023-06-01"}, b"").problem == \
        "unknown_endpoint"  # the account's list: every customer's
    body = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_file", "file_id": "file-a"}, {"type": "input_image", "file_id": "file-b"},
        {"type": "input_file", "file_id": "file-a"}]}]}
    call = http_api.parse_call("POST", "/v1/responses", {}, json.dumps(body).encode())
    assert (call.authorize_input().files, call.unseen_input) == (("file-a", "file-b"), True)
    chat = {"model": "m", "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-c"}}]}]}
    assert http_api.parse_call("POST", "/v1/chat/completions", {}, json.dumps(chat).encode()).files == ("file-c",)
    many = {"model": "m", "input": [{"type": "input_file", "file_id": f"file-{i}"} for i in range(65)]}
    from policyd.validation import Problem, check_authorize
    with pytest.raises(Problem) as refused:
        check_authorize(http_api.parse_call("POST", "/v1/responses", {"authorization": "Bearer k"},
                                            json.dumps(many).encode()).authorize_input())
    assert refused.value.reason == "invalid_request"


def test_the_responses_apis_searches_are_bounded_by_max_tool_calls() -> None:
    def bounds(tools: list[dict[str, Any]], **more: Any) -> tuple[int, int]:
        body = {"model": "m", "input": "x", "tools": tools, **more}
        shape = http_api.parse_call("POST", "/v1/responses", {}, json.dumps(body).encode()).authorize_input().shape
        return shape.web_searches, shape.file_searches

    assert bounds([{"type": "file_search", "vector_store_ids": ["vs"]}], max_tool_calls=3) == (0, 3)
    assert bounds([{"type": "file_search"}, {"type": "web_search"}], max_tool_calls=2) == (2, 2)  # each up to it
    assert bounds([{"type": "file_search"}]) == (0, 0)  # no bound given: the plan's default is set (unbounded_file_search)


def test_the_responses_apis_search_calls_are_counted_streamed_or_not() -> None:
    reply = {"id": "resp_1", "output": [{"type": "file_search_call"}, {"type": "file_search_call"},
                                        {"type": "web_search_call"}, {"type": "message"}],
             "usage": {"input_tokens": 5, "output_tokens": 1}}
    whole = ResponseReader("responses", stream=False)
    whole.feed(json.dumps(reply).encode())
    whole.finish()
    streamed = ResponseReader("responses", stream=True)
    streamed.feed(_sse({"type": "response.completed", "response": reply}))
    streamed.finish()
    for reader in (whole, streamed):
        assert (reader.tokens.file_searches, reader.tokens.web_searches) == (2, 1)
        assert reader.tokens.fields()["file_searches"] == 2  # as Settle names it


def test_cached_input_is_read_as_openai_compatible_providers_report_it() -> None:
    """DeepSeek reports its cache hits as prompt_cache_hit_tokens, Moonshot as cached_tokens beside the
    prompt's: both are cached input, priced as such, as OpenAI's prompt_tokens_details.cached_tokens is."""
    for usage in ({"prompt_tokens": 100, "completion_tokens": 5, "prompt_cache_hit_tokens": 64,
                   "prompt_cache_miss_tokens": 36},
                  {"prompt_tokens": 100, "completion_tokens": 5, "cached_tokens": 64},
                  {"prompt_tokens": 100, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 64}}):
        reader = ResponseReader("chat_completions", stream=False)
        reader.feed(json.dumps({"choices": [], "usage": usage}).encode())
        reader.finish()
        assert (reader.tokens.input_tokens, reader.tokens.cached_input_tokens, reader.tokens.output_tokens) == (100, 64, 5)


def test_search_tools_given_no_bound_are_read_and_bounded_in_the_body() -> None:
    """Which search tools run unbounded (each then bounded at the plan's default and reserved so), and the
    body that carries the bound: max_tool_calls on the Responses API, max_uses on each Anthropic web search
    tool without one. Bounds the client gave stay as they are."""
    def shape(path: str, body: dict[str, Any]) -> Any:
        return http_api.parse_call("POST", path, {}, json.dumps(body).encode()).authorize_input().shape

    web = {"type": "web_search_20250305", "name": "web_search"}
    anthropic = {"model": "m", "max_tokens": 5, "messages": [], "tools": [web, dict(web, max_uses=4), {"name": "f"}]}
    s = shape("/v1/messages", anthropic)
    assert (s.web_searches, s.unbounded_web_search_tools, s.unbounded_file_search) == (4, 1, False)
    rewritten = rewrite_body(anthropic, "anthropic_messages", "m", "m", 5, True, False, tool_call_cap=7)
    assert rewritten["tools"] == [dict(web, max_uses=7), dict(web, max_uses=4), {"name": "f"}]
    assert anthropic["tools"][0] == web  # the client's body itself is not changed
    responses = {"model": "m", "input": "x", "tools": [{"type": "web_search"}, {"type": "file_search"}]}
    s = shape("/v1/responses", responses)
    assert (s.web_searches, s.file_searches, s.unbounded_web_search_tools, s.unbounded_file_search) == (0, 0, 1, True)
    assert rewrite_body(responses, "responses", "m", "m", 5, True, False, tool_call_cap=7)["max_tool_calls"] == 7
    given = dict(responses, max_tool_calls=2)
    s = shape("/v1/responses", given)
    assert (s.web_searches, s.file_searches, s.unbounded_web_search_tools, s.unbounded_file_search) == (2, 2, 0, False)
    assert rewrite_body(given, "responses", "m", "m", 5, True, False) is None
    assert shape("/v1/chat/completions", {"model": "m", "tools": [{"type": "function"}]}).unbounded_web_search_tools == 0


def test_geminis_grounding_searches_are_counted_from_the_reply_and_the_tool_is_reserved() -> None:
    """groundingMetadata's webSearchQueries, in a whole reply or a stream's last object (at least one search
    a grounded candidate); the googleSearch tool takes no bound: it is reserved at the plan's default."""
    grounded = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "groundingMetadata": {
        "webSearchQueries": ["a", "b", "c"]}}, {"content": {"parts": [{"text": "y"}]}, "groundingMetadata": {
            "groundingChunks": [{"web": {"uri": "u"}}]}}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 2}}
    whole = ResponseReader("gemini_generate_content", stream=False)
    whole.feed(json.dumps(grounded).encode())
    whole.finish()
    streamed = ResponseReader("gemini_generate_content", stream=True)
    first = {"candidates": [{"content": {"parts": [{"text": "x"}]}}], "usageMetadata": {"promptTokenCount": 5}}
    streamed.feed(f"data: {json.dumps(first)}\r\n\r\ndata: {json.dumps(grounded)}\r\n\r\n".encode())
    streamed.finish()
    for reader in (whole, streamed):
        assert reader.tokens.web_searches == 4 and reader.tokens.input_tokens == 5
    body = {"contents": [{"parts": [{"text": "q"}]}], "tools": [{"googleSearch": {}}]}
    shape = parse_call("POST", "/v1beta/models/gemini-2.5-flash:generateContent", {},
                       json.dumps(body).encode()).authorize_input().shape
    assert (shape.web_searches, shape.unbounded_web_search_tools) == (0, 1)
    plain = parse_call("POST", "/v1beta/models/gemini-2.5-flash:generateContent", {},
                       json.dumps({"contents": []}).encode()).authorize_input().shape
    assert plain.unbounded_web_search_tools == 0


def test_geminis_tokens_are_read_by_modality() -> None:
    """Gemini reports its tokens by modality: audio in (priced apart on its models; the cached part keeps the
    cached price), audio and images out (each at its own price where the table has one)."""
    reader = ResponseReader("gemini_generate_content", stream=False)
    reader.feed(json.dumps({"usageMetadata": {
        "promptTokenCount": 1000, "cachedContentTokenCount": 300, "candidatesTokenCount": 1400,
        "thoughtsTokenCount": 20,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 200}, {"modality": "AUDIO", "tokenCount": 800}],
        "cacheTokensDetails": [{"modality": "AUDIO", "tokenCount": 300}],
        "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 110}, {"modality": "IMAGE", "tokenCount": 1290}]}}
    ).encode())
    reader.finish()
    t = reader.tokens
    assert (t.input_tokens, t.cached_input_tokens, t.audio_input_tokens) == (1000, 300, 500)
    assert (t.output_tokens, t.image_output_tokens, t.audio_output_tokens) == (1420, 1290, 0)
    spoken = ResponseReader("gemini_generate_content", stream=False)  # a speech model's audio out
    spoken.feed(json.dumps({"usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 700,
                                              "candidatesTokensDetails": [{"modality": "AUDIO", "tokenCount": 700}]}}
                           ).encode())
    spoken.finish()
    assert (spoken.tokens.audio_output_tokens, spoken.tokens.image_output_tokens) == (700, 0)


def test_hosted_containers_a_request_may_make_are_named_and_the_ones_used_are_read() -> None:
    """A code_interpreter tool with an "auto" container, a shell tool in a "container_auto" environment:
    each may make a container the provider bills, by its memory limit (1g when it names none); a container
    named by id was made before. The reply's code_interpreter_call and shell_call items say which ran."""
    def shape(*tools: dict[str, Any]) -> Any:
        body = {"model": "gpt-4.1", "input": "compute", "tools": list(tools)}
        return parse_call("POST", "/v1/responses", {"authorization": "Bearer k"}, json.dumps(body).encode()
                          ).authorize_input().shape

    auto = {"type": "code_interpreter", "container": {"type": "auto"}}
    assert (shape(auto).containers, shape(auto).container_memory) == (1, "1g")
    big = shape({"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "4g"}},
                {"type": "shell", "environment": {"type": "container_auto", "memory_limit": "16g"}})
    assert (big.containers, big.container_memory) == (2, "16g")
    named = shape({"type": "code_interpreter", "container": "cntr_made_before"},
                  {"type": "shell", "environment": {"type": "local"}}, {"type": "web_search"})
    assert (named.containers, named.container_memory) == (0, "")
    whole = ResponseReader("responses", stream=False)
    whole.feed(json.dumps({"output": [
        {"type": "code_interpreter_call", "container_id": "cntr_1", "code": "1"},
        {"type": "code_interpreter_call", "container_id": "cntr_1", "code": "2"},  # the same container, again
        {"type": "shell_call", "environment": {"type": "container_reference", "container_id": "cntr_2"}},
        {"type": "message", "content": []}], "usage": {"input_tokens": 9, "output_tokens": 3}}).encode())
    whole.finish()
    assert whole.tokens.containers == 2
    cut = ResponseReader("responses", stream=True)  # a container made before the stream was cut
    cut.feed(_sse({"type": "response.output_item.added", "output_index": 0,
                   "item": {"type": "code_interpreter_call", "container_id": "cntr_9", "status": "in_progress"}},
                  {"type": "response.output_text.delta", "delta": "the answer is"}))
    assert closing(200, cut, cut=True).action == "estimate" and cut.tokens.containers == 1


def test_an_images_size_and_frames_scale_what_one_image_may_bill() -> None:
    """A model's output_tokens_per_image is the most a standard-size image (up to 1536x1024) bills; a larger
    size bills about by its area, a GIF each of its frames (9 unless it says): images requests, their forms
    and the image_generation tool hold each image so."""
    assert [image_scale(size, None, None) for size in (None, "auto", "1024x1024", "1536x1024", "1536x1025",
                                                       "3840x2160", "2560x1440", "big")] == [1, 1, 1, 1, 2, 6, 3, 1]
    assert (image_scale("1024x1024", "gif", None), image_scale("1024x1024", "gif", 4), image_scale(None, "gif", "12"),
            image_scale("3840x2160", "GIF", 5), image_scale("1024x1024", "png", 5)) == (9, 4, 12, 30, 1)
    assert image_scale("999999x999999", "gif", 10**9) == IMAGE_SCALE_MAX  # held at the most
    drawn = parse_call("POST", "/v1/images/generations", {"authorization": "Bearer k"}, json.dumps(
        {"model": "gpt-image-2", "prompt": "a ledger", "n": 2, "size": "3840x2160"}).encode())
    assert (drawn.authorize_input().shape.image_count, drawn.authorize_input().shape.image_scale) == (2, 6)
    tool = parse_call("POST", "/v1/responses", {"authorization": "Bearer k"}, json.dumps(
        {"model": "gpt-5", "input": "animate a ledger", "tools": [
            {"type": "image_generation", "model": "gpt-image-2", "output_format": "gif", "frame_count": 6}]}).encode())
    assert tool.authorize_input().shape.image_scale == 6


def test_grounding_with_google_maps_is_read_apart_from_searches() -> None:
    """Gemini's googleMaps tool: the request may be billed a grounded prompt (held), the reply says so by
    places among its groundingChunks; grounding by places alone is no Google search."""
    body = {"contents": [{"role": "user", "parts": [{"text": "near me"}]}], "tools": [{"googleMaps": {}}]}
    call = parse_call("POST", "/v1beta/models/gemini-2.5-flash:generateContent", {"x-goog-api-key": "k"},
                      json.dumps(body).encode())
    assert call.authorize_input().shape.maps_grounding and call.unseen_input
    assert not parse_call("POST", "/v1/chat/completions", {"authorization": "Bearer k"}, json.dumps(
        {"model": "m", "messages": [], "tools": [{"googleMaps": {}}]}).encode()).authorize_input().shape.maps_grounding
    places = {"candidates": [{"groundingMetadata": {"groundingChunks": [{"maps": {"placeId": "places/1"}}]}}],
              "usageMetadata": {"promptTokenCount": 9, "candidatesTokenCount": 3}}
    reader = ResponseReader("gemini_generate_content", stream=False)
    reader.feed(json.dumps(places).encode())
    reader.finish()
    assert (reader.tokens.maps_groundings, reader.tokens.web_searches) == (1, 0)
    both = {"candidates": [{"groundingMetadata": {"webSearchQueries": ["a", "b"], "groundingChunks": [
        {"maps": {"placeId": "places/1"}}, {"web": {"uri": "https://example.com"}}]}}]}
    reader = ResponseReader("gemini_generate_content", stream=False)
    reader.feed(json.dumps(both).encode())
    reader.finish()
    assert (reader.tokens.maps_groundings, reader.tokens.web_searches) == (1, 2)


def test_an_image_call_too_large_to_hold_is_still_counted() -> None:
    """A reply past the 4 MiB held whole, with images the image_generation tool made and no tool_usage: each
    image_generation_call item, too large to keep, still leaves its type, so its image is counted (and
    charged at the image model's most); the web search beside it too."""
    image = "iVBORw0KGgo" * 200_000  # 2.2 MB of base64 each
    reply = {"id": "resp_big", "output": [
        {"id": "ig_1", "type": "image_generation_call", "status": "completed", "result": image},
        {"id": "ig_2", "type": "image_generation_call", "status": "completed", "result": image},
        {"type": "web_search_call", "action": {"type": "search"}},
        {"type": "message", "content": [{"type": "output_text", "text": "two ledgers"}]}],
        "usage": {"input_tokens": 30, "output_tokens": 12}}
    t = _fed_in_pieces(ResponseReader("responses", stream=False), json.dumps(reply).encode()).tokens
    assert (t.image_generation_calls, t.web_searches, t.input_tokens, t.output_tokens) == (2, 1, 30, 12)


def test_a_compaction_is_a_response_that_takes_no_output_cap() -> None:
    body = {"model": "gpt-5", "input": [{"role": "user", "content": "compact me"}], "previous_response_id": "resp_1"}
    call = parse_call("POST", "/v1/responses/compact", {"authorization": "Bearer k"}, json.dumps(body).encode())
    assert (call.endpoint, call.compaction, call.keeps_its_cap, call.problem) == ("responses", True, True, "")
    assert call.previous_response == "resp_1" and call.unseen_input  # its history is billed as input
    plain = parse_call("POST", "/v1/responses", {"authorization": "Bearer k"}, json.dumps(body).encode())
    assert (plain.compaction, plain.keeps_its_cap) == (False, False)


def test_a_gemini_generation_config_that_is_no_object_is_refused() -> None:
    """policyd writes the output cap into generationConfig: one that is not an object cannot take it (and
    Google refuses it): a clear error before anything is held."""
    for config in ("0", 5, [1], True):
        body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "generationConfig": config}
        call = parse_call("POST", "/v1beta/models/gemini-2.5-flash:generateContent", {"x-goog-api-key": "k"},
                          json.dumps(body).encode())
        assert (call.problem, call.problem_param) == ("invalid_request", "generationConfig"), config


def test_anthropics_service_tier_is_read_from_its_usage() -> None:
    """Anthropic says the tier that served a message in its usage (standard, priority): a tier the table
    prices apart (service_tiers) is charged at its prices; standard is the model's own."""
    for tier, expected in (("priority", "priority"), ("standard", "")):
        reader = ResponseReader("anthropic_messages", stream=False)
        reader.feed(json.dumps({"type": "message", "usage": {"input_tokens": 9, "output_tokens": 3,
                                                             "service_tier": tier}}).encode())
        reader.finish()
        assert reader.tokens.service_tier == expected
    streamed = ResponseReader("anthropic_messages", stream=True)
    streamed.feed(_sse({"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1,
                                                                        "service_tier": "priority"}}},
                       {"type": "message_delta", "usage": {"output_tokens": 5}}))
    assert (streamed.tokens.service_tier, streamed.tokens.output_tokens) == ("priority", 5)


def test_an_anthropic_request_is_held_at_the_priority_tier_it_may_be_served_at() -> None:
    """Anthropic serves a message at its priority tier when the account has one, unless the request says
    standard_only: held at the priority tier's prices where the table has them (else the model's own)."""
    def tier(**changes: Any) -> str:
        body = {"model": "claude-sonnet-4", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **changes}
        return parse_call("POST", "/v1/messages", {"x-api-key": "k"}, json.dumps(body).encode()).service_tier

    assert (tier(), tier(service_tier="auto"), tier(service_tier="standard_only")) == ("priority", "priority", "")


def test_anthropics_fast_mode_is_a_tier_asked_for_and_read_from_the_usage() -> None:
    """`speed: "fast"` asks for fast mode (its own, dearer prices: refused where the table has none); the
    usage's `speed` says what the message ran at (a fast request may fall back to standard)."""
    body = {"model": "claude-opus-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    fast = parse_call("POST", "/v1/messages", {"x-api-key": "k"}, json.dumps({**body, "speed": "fast"}).encode())
    shape = fast.authorize_input().shape
    assert (shape.service_tier, shape.service_tier_implied) == ("fast_mode", False)
    implied = parse_call("POST", "/v1/messages", {"x-api-key": "k"}, json.dumps(body).encode()).authorize_input().shape
    assert (implied.service_tier, implied.service_tier_implied) == ("priority", True)
    openai_fast = parse_call("POST", "/v1/responses", {}, json.dumps({"model": "m", "input": "x",
                                                                       "service_tier": "fast"}).encode())
    assert (openai_fast.authorize_input().shape.service_tier, openai_fast.service_tier_implied) == ("fast", False)
    for usage, expected in (({"speed": "fast", "service_tier": "standard"}, "fast_mode"),
                            ({"speed": "standard", "service_tier": "standard"}, ""),
                            ({"speed": "standard", "service_tier": "priority"}, "priority")):
        reader = ResponseReader("anthropic_messages", stream=True)
        reader.feed(_sse({"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1,
                                                                          **usage}}},
                         {"type": "message_delta", "usage": {"output_tokens": 5}}))
        assert reader.tokens.service_tier == expected, usage


def test_anthropics_inference_geography_is_a_tier_of_its_own() -> None:
    """`inference_geo: "us"` (US-only inference, priced apart) is the tier "us", or "fast_mode+us" in fast
    mode: asked for (refused where unpriced); "global" is the standard. The usage's inference_geo says
    where the message ran (a workspace's default geography is not in the request), in any event."""
    def tier(**fields: Any) -> tuple[str, bool]:
        body = {"model": "claude-opus-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], **fields}
        call = parse_call("POST", "/v1/messages", {"x-api-key": "k"}, json.dumps(body).encode())
        shape = call.authorize_input().shape
        return shape.service_tier, shape.service_tier_implied

    assert tier(inference_geo="us") == ("us", False)
    assert tier(inference_geo="US", speed="fast") == ("fast_mode+us", False)
    assert tier(inference_geo="global") == ("priority", True)
    for events, expected in (
            (({"input_tokens": 9, "output_tokens": 1, "inference_geo": "us"}, {"output_tokens": 5}), "us"),
            (({"input_tokens": 9, "output_tokens": 1, "speed": "fast"}, {"output_tokens": 5, "inference_geo": "us"}),
             "fast_mode+us"),
            (({"input_tokens": 9, "output_tokens": 1, "service_tier": "priority", "inference_geo": "global"},
              {"output_tokens": 5}), "priority")):
        reader = ResponseReader("anthropic_messages", stream=True)
        reader.feed(_sse({"type": "message_start", "message": {"usage": events[0]}},
                         {"type": "message_delta", "usage": events[1]}))
        assert reader.tokens.service_tier == expected, events
        assert "_geo" not in reader.tokens.fields()


@pytest.mark.parametrize("method,path,streamed", [
    ("POST", "/v1/files", True), ("POST", "/openai/files?api-version=2025-04-01-preview", True),
    ("POST", "/v1/uploads/upload_abc/parts", True), ("POST", "/openai/uploads/upload_abc/parts/", True),
    ("POST", "/v1/uploads", False), ("POST", "/v1/uploads/upload_abc/complete", False),
    ("POST", "/v1/uploads/upload_abc/cancel", False), ("GET", "/v1/uploads/upload_abc/parts", False),
    ("POST", "/v1/chat/completions", False), ("POST", "/v1/files/file-1/content", False),
])
def test_the_gateways_upload_route_matches_what_policyd_streams(method: str, path: str, streamed: bool) -> None:
    """A file's body and an upload's part stream to the provider, never read (policyd decides on their headers
    alone): the gateway's route (UPLOAD_PATH_REGEX, the whole path without its query) and the processing
    filter's test (streamed_upload) name the same requests."""
    assert http_api.streamed_upload(method, path) is streamed
    on_route = method == "POST" and re.fullmatch(http_api.UPLOAD_PATH_REGEX, path.split("?", 1)[0]) is not None
    assert on_route is streamed


def test_the_uploads_api_is_free_and_each_upload_is_its_customers() -> None:
    """OpenAI's Uploads API: an upload made (free, remembered as the customer's), a part added or the upload
    cancelled (its customer's alone), completed into a file (made of the customer's own upload)."""
    auth = {"authorization": "Bearer k", "content-type": "application/json"}
    made = parse_call("POST", "/v1/uploads", auth, b'{"bytes": 4, "filename": "a", "purpose": "batch"}')
    assert (made.problem, made.creates) == ("", "file")
    part = parse_call("POST", "/v1/uploads/upload_1/parts", auth, b"")
    assert (part.problem, part.stored_response) == ("", "upload_1")
    assert parse_call("POST", "/v1/uploads/upload_1/cancel", auth, b"").stored_response == "upload_1"
    done = parse_call("POST", "/v1/uploads/upload_1/complete", auth, b'{"part_ids": ["part_1"]}')
    assert (done.problem, done.creates, done.files) == ("", "file", ("upload_1",))
    reader = ResponseReader("responses", False)
    reader.feed(json.dumps({"id": "upload_1", "object": "upload", "status": "completed",
                            "file": {"id": "file-9", "object": "file"}}).encode())
    reader.finish()
    assert (reader.found_usage, reader.response_id) == (True, "file-9")  # the file made is remembered


def test_a_rerank_is_read_as_rerankers_bill_it() -> None:
    """A rerank (Cohere's v1 and v2, Jina's, Voyage's): its documents, their bytes (an object's fields at most),
    the tokens read of each (v2: max_tokens_per_doc, 4096 unless told), and its input as rerankers count the
    tokens they bill (the query once a document, and the documents); no output cap. An image document is input
    the body does not bound; a rerank without its query or documents is refused, param named."""
    def call(path: str, **body: Any) -> Any:
        return parse_call("POST", path, {"authorization": "Bearer k"}, json.dumps(body).encode())

    documents = ["a ledger", {"text": "a sail", "title": "boats"}]
    v2 = call("/v2/rerank", model="rerank-v3.5", query="ledger", documents=documents, top_n=1)
    as_object = len(json.dumps(documents[1]).encode())
    assert (v2.problem, v2.endpoint, v2.model, v2.documents, v2.document_tokens_max, v2.max_output_tokens) == (
        "", "rerank", "rerank-v3.5", 2, 4096, 0)
    assert (v2.document_bytes, v2.prompt_bytes, v2.unseen_input) == (8 + as_object, 6 * 2 + 8 + as_object, False)
    assert call("/v1/rerank", model="jina", query="q", documents=["a"], max_tokens_per_doc=512).document_tokens_max == 512
    assert call("/v1/rerank", model="voyage", query="q", documents=["a"]).document_tokens_max == 0
    assert call("/v1/rerank", model="jina-m0", query="q", documents=[{"image": "https://example.com/a.png"}]).unseen_input
    shape = call("/v2/rerank", model="rerank-v3.5", query="q", documents=["a", "bc"]).authorize_input().shape
    assert (shape.documents, shape.document_bytes, shape.document_tokens_max) == (2, 3, 4096)
    for body, param in (({"documents": ["a"]}, "query"), ({"query": "q", "documents": []}, "documents"),
                        ({"query": "q", "documents": [7]}, "documents"),
                        ({"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, "max_tokens_per_doc")):
        refused = call("/v2/rerank", model="rerank-v3.5", **body)
        assert (refused.problem, refused.problem_param) == ("invalid_request", param), body


@pytest.mark.parametrize("reply, units, tokens", [
    ({"id": "r", "results": [], "meta": {"api_version": {"version": "2"}, "billed_units": {"search_units": 3}}}, 3, 0),
    ({"model": "jina", "results": [], "usage": {"total_tokens": 42}}, 0, 42),  # Jina's, Voyage's
    ({"id": "r", "results": [], "usage": {"prompt_tokens": 40, "total_tokens": 40}}, 0, 40),  # vLLM's, Together's
    ({"results": [], "meta": {"billed_units": {"total_tokens": 7}}}, 0, 7),  # a compatible server's billed tokens
])
def test_a_reranks_usage_is_read_in_its_providers_units(reply: dict, units: int, tokens: int) -> None:
    reader = ResponseReader("rerank", stream=False)
    reader.feed(json.dumps(reply).encode())
    reader.finish()
    assert (reader.found_usage, reader.tokens.search_units, reader.tokens.input_tokens,
            reader.estimated_output_tokens()) == (True, units, tokens, 0)
    assert closing(200, reader, cut=False).action == "settle"
    uncounted = ResponseReader("rerank", stream=False)
    uncounted.feed(json.dumps({"results": [{"index": 0, "relevance_score": 0.9}], "meta": {}}).encode())
    uncounted.finish()
    assert (uncounted.found_usage, closing(200, uncounted, cut=False).action) == (False, "estimate")


def test_a_stream_of_a_provider_that_reports_its_usage_unasked_goes_without_stream_options() -> None:
    """Mistral's API refuses stream_options (422) and reports a stream's usage unasked: a model priced
    stream_usage: reported is sent without them, the client's taken out; OpenAI's get include_usage set."""
    for endpoint, body in (("chat_completions", {"model": "m", "messages": [], "stream": True}),
                           ("completions", {"model": "m", "prompt": "def f(", "suffix": "", "stream": True})):
        asked = rewrite_body(body, endpoint, "m", "m", 0, True, True)
        assert asked is not None and asked["stream_options"] == {"include_usage": True}
        assert rewrite_body(body, endpoint, "m", "m", 0, True, True, stream_usage_reported=True) is None
        client_asked = {**body, "stream_options": {"include_usage": True}}
        sent = rewrite_body(client_asked, endpoint, "m", "m", 0, True, True, stream_usage_reported=True)
        assert sent is not None and "stream_options" not in sent and sent["model"] == "m"
    fim = parse_call("POST", "/v1/fim/completions", {"authorization": "Bearer k"},
                     json.dumps({"model": "codestral-latest", "prompt": "def f(", "suffix": "return 1",
                                 "max_tokens": 5}).encode())
    assert (fim.problem, fim.endpoint, fim.max_output_tokens, fim.prompt_bytes) == ("", "completions", 5, 14)


def test_a_thinking_claudes_least_output_cap_is_past_its_budget() -> None:
    """Anthropic's max_tokens must pass the thinking budget: the least cap a plan may fit the request to."""
    def least(path: str, **body: Any) -> int:
        return parse_call("POST", path, {"x-api-key": "k", "anthropic-version": "2023-06-01"},
                          json.dumps({"model": "m", "max_tokens": 20_000, "messages": [], **body}).encode()).least_output_cap

    assert least("/v1/messages", thinking={"type": "enabled", "budget_tokens": 10_000}) == 10_001
    assert least("/v1/messages", thinking={"type": "adaptive"}) == least("/v1/messages") == 0
    assert least("/model/m/converse", additionalModelRequestFields={
        "reasoning_config": {"type": "enabled", "budget_tokens": 2_048}}) == 2_049
    assert least("/v1/chat/completions", thinking={"type": "enabled", "budget_tokens": 5}) == 0


@pytest.mark.parametrize("path, endpoint", [
    ("/beta/completions", "completions"),  # DeepSeek's fill-in-the-middle (base_url https://api.deepseek.com/beta)
    ("/beta/chat/completions", "chat_completions"),  # ... and its chat prefix completion
    ("/v1/fim/completions", "completions"),  # Mistral's (Codestral)
])
def test_fill_in_the_middle_paths_are_read_as_completions(path: str, endpoint: str) -> None:
    """Code assistants complete code between a prompt and a suffix on providers' own paths: refused before as
    unknown endpoints; read as the completions they are, their cap and their input (the suffix too) bounded."""
    body = {"model": "deepseek-chat", "prompt": "def f(", "suffix": "    return x", "max_tokens": 64,
            "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "def", "prefix": True}]}
    call = parse_call("POST", path, {"authorization": "Bearer k"}, json.dumps(body).encode())
    assert (call.problem, call.endpoint, call.max_output_tokens) == ("", endpoint, 64)
    assert call.prompt_bytes >= len("def f(") + len("    return x")


def test_imagens_predict_is_read_as_images_and_other_predicts_are_not() -> None:
    """Gemini's and Vertex AI's :predict of Imagen: images, as many as parameters.sampleCount (4 unless told);
    a :predict of another model (Vertex AI's older embeddings) is not read; a sampleCount of no images refused."""
    def call(path: str, **parameters: Any) -> Any:
        return parse_call("POST", path, {"x-goog-api-key": "k"},
                          json.dumps({"instances": [{"prompt": "a ledger"}], "parameters": parameters}).encode())

    vertex = "/v1/projects/p/locations/us-central1/publishers/google/models/{}:predict"
    gemini = call("/v1beta/models/imagen-4.0-generate-001:predict", sampleCount=2)
    assert (gemini.problem, gemini.endpoint, gemini.model, gemini.image_count) == ("", "images", "imagen-4.0-generate-001", 2)
    assert call(vertex.format("imagen-4.0-fast-generate-001")).image_count == 4
    assert call(vertex.format("text-embedding-005")).problem == "unknown_endpoint"
    refused = call("/v1beta/models/imagen-4.0-generate-001:predict", sampleCount=0)
    assert (refused.problem, refused.problem_param) == ("invalid_request", "parameters")


@pytest.mark.parametrize("path, endpoint", [
    ("/chat/completions", "chat_completions"),  # Perplexity's, DeepSeek's (base_url with no /v1)
    ("/models/chat/completions", "chat_completions"),  # Azure AI Foundry's model inference API
    ("/inference/chat/completions", "chat_completions"),  # GitHub Models'
    ("/api/paas/v4/chat/completions", "chat_completions"),  # Zhipu's
    ("/models/embeddings", "embeddings"),
    ("/embeddings", "embeddings"),
    ("/completions", "completions"),
    ("/images/generations", "images"),
    ("/audio/speech", "audio_speech"),
])
def test_openai_compatible_apis_are_read_under_any_prefix(path: str, endpoint: str) -> None:
    """OpenAI-compatible providers serve OpenAI's API under prefixes of their own, or none: a client of
    Perplexity's (base_url https://api.perplexity.ai, no /v1) was refused unknown_endpoint."""
    body = {"model": "m", "messages": [], "input": "hello", "prompt": "p"}
    call = parse_call("POST", path, {"authorization": "Bearer k"}, json.dumps(body).encode())
    assert (call.problem, call.endpoint) == ("", endpoint)
    prefix = path.rsplit("/", 2)[0] if path.count("/") > 2 else ""
    listing = parse_call("GET", f"{prefix}/models", {"authorization": "Bearer k"}, b"")
    one = parse_call("GET", f"{prefix}/models/gpt-4o-mini", {"authorization": "Bearer k"}, b"")
    assert (listing.models_listing, one.models_listing, one.model) == (True, True, "gpt-4o-mini")


def test_claudes_token_count_on_vertex_is_free_and_names_its_model_in_the_body() -> None:
    """Vertex AI counts Claude's tokens at .../publishers/anthropic/models/count-tokens:rawPredict, the model in
    the body: read as the model "count-tokens", it was refused unknown_model (or, were it priced, charged)."""
    call = parse_call("POST", "/v1/projects/p/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict",
                      {"authorization": "Bearer k"}, json.dumps({"model": "claude-sonnet-4@20250514", "messages": [
                          {"role": "user", "content": "hi"}]}).encode())
    assert (call.problem, call.endpoint, call.model, call.count_tokens, call.model_in_path) == (
        "", "anthropic_messages", "claude-sonnet-4@20250514", True, False)


@pytest.mark.parametrize("path, request_id, wait_ms, problem", [
    ("/v1/requests/req_0a1b", "req_0a1b", http_api.REQUEST_LOOKUP_WAIT_SECONDS * 1000, ""),
    ("/v1/requests/req_0a1b/?wait=0", "req_0a1b", 0, ""),
    ("/openai/v1/requests/order-7%2Fkey%3Akey_9?wait=20", "order-7/key:key_9", 20_000, ""),  # another key's id first
    ("/v1/requests/order-7/key:key_9:attempt-2", "order-7/key:key_9:attempt-2", 5000, ""),  # its slashes unescaped
    ("/v1/requests/req_0a1b?wait=21", "req_0a1b", 5000, "invalid_request"),  # past the longest wait
    ("/v1/requests/req_0a1b?wait=1.5", "req_0a1b", 5000, "invalid_request"),
    ("/v1/requests/req_0a1b?wait=%C2%B2", "req_0a1b", 5000, "invalid_request"),  # a digit int() does not read
])
def test_a_request_asked_about_is_named_by_its_path(path: str, request_id: str, wait_ms: int, problem: str) -> None:
    """GET /v1/requests/{id}[?wait=N]: the id as the request's x-policyd-request-id gave it, escaped or not; the
    wait in whole seconds up to request_lookup.WAIT_MS_MAX; Envoy's route for it matches the same paths."""
    call = parse_call("GET", path, {"authorization": "Bearer k"}, b"")
    assert (call.request_lookup, call.lookup_wait_ms, call.problem, call.endpoint) == (request_id, wait_ms, problem, "")
    assert http_api.request_lookup_asked("GET", path) and not http_api.request_lookup_asked("POST", path)
    assert re.fullmatch(http_api.REQUEST_LOOKUP_PATH_REGEX, path.split("?", 1)[0])
    assert parse_call("GET", "/v1/requests/", {"authorization": "Bearer k"}, b"").request_lookup == ""


@pytest.mark.parametrize("path, limit, after, problem", [
    ("/v1/requests", 20, "", ""),
    ("/v1/requests/?limit=100", 100, "", ""),
    ("/openai/v1/requests?limit=5&after=order-7%2Fkey%3Akey_9", 5, "order-7/key:key_9", ""),
    ("/v1/requests?limit=0", 20, "", "invalid_request"),
    ("/v1/requests?limit=101", 20, "", "invalid_request"),
    ("/v1/requests?limit=%C2%B2", 20, "", "invalid_request"),  # a digit int() does not read
    ("/v1/requests?after=", 20, "", "invalid_request"),
])
def test_a_customers_requests_are_listed_by_their_path(path: str, limit: int, after: str, problem: str) -> None:
    """GET /v1/requests[?limit=N&after=ID]: a page of the customer's requests (answered by policyd, no model call)."""
    call = parse_call("GET", path, {"authorization": "Bearer k"}, b"")
    assert (call.request_listing, call.listing_limit, call.listing_after, call.problem, call.endpoint,
            call.request_lookup) == (True, limit, after, problem, "", "")
    assert not parse_call("POST", path, {"authorization": "Bearer k"}, b"{}").request_listing


@pytest.mark.parametrize("path, group_by, bucket, window, problem", [
    ("/v1/usage", (), "", (None, None), ""),
    ("/openai/v1/usage?group_by=model,thread&bucket=day&since=1790000000&until=1790086400", ("model", "thread"), "day",
     (1_790_000_000_000, 1_790_086_400_000), ""),
    ("/v1/usage?group_by=model&group_by=feature", ("model", "feature"), "", (None, None), ""),
    ("/v1/usage?group_by=provider", ("provider",), "", (None, None), "group_by"),  # the operator's own
    ("/v1/usage?group_by=model,model", ("model", "model"), "", (None, None), "group_by"),
    ("/v1/usage?group_by=a,b,c,d", ("a", "b", "c", "d"), "", (None, None), "group_by"),
    ("/v1/usage?bucket=week", (), "week", (None, None), "bucket"),
    ("/v1/usage?since=1.5", (), "", (None, None), "since"),
    ("/v1/usage?since=1790086400&until=1790000000", (), "", (1_790_086_400_000, 1_790_000_000_000), "since"),
    ("/v1/usage?since=1700000000&until=1790000000", (), "", (1_700_000_000_000, 1_790_000_000_000), "since"),
])
def test_a_customers_usage_is_summed_as_its_path_asks(path: str, group_by: tuple[str, ...], bucket: str,
                                                      window: tuple[int | None, int | None], problem: str) -> None:
    """GET /v1/usage[?group_by=...&bucket=...&since=S&until=U]: grouped by the customer's own dimensions, over the
    last 30 days unless told (unix seconds; at most 400 days); answered by policyd (no model call)."""
    call = parse_call("GET", path, {"authorization": "Bearer k"}, b"")
    assert (call.usage_summary, call.usage_group_by, call.usage_bucket, call.problem_param, call.endpoint) == (
        True, group_by, bucket, problem, "")
    assert bool(call.problem) == bool(problem)
    since, until = window
    if until is None and not problem:  # now, and 30 days before it
        assert abs(call.usage_until_ms - time.time() * 1000) < 2_000
        assert call.usage_until_ms - call.usage_since_ms == own_usage.WINDOW_MS_DEFAULT
    elif not problem:
        assert (call.usage_since_ms, call.usage_until_ms) == (since, until)


@pytest.mark.parametrize("headers, budget, problem", [
    ({"x-thread-id": "run-7", "x-policyd-thread-budget": "2.50"}, 2_500_000_000, ""),
    ({"x-thread-id": "run-7", "x-policyd-thread-budget": " 0.000000001 "}, 1, ""),
    ({"x-thread-id": "run-7", "x-policyd-thread-budget": "0"}, 0, "an amount of money more than 0"),
    ({"x-thread-id": "run-7", "x-policyd-thread-budget": "-1"}, 0, "an amount of money more than 0"),
    ({"x-thread-id": "run-7", "x-policyd-thread-budget": "1e400"}, 0, "an amount of money more than 0"),
    ({"x-thread-id": "run-7", "x-policyd-thread-budget": "0.0000000001"}, 0, "an amount of money more than 0"),
    ({"x-policyd-thread-budget": "5"}, 5_000_000_000, "needs the thread it binds"),
])
def test_a_threads_budget_is_read_from_its_header(headers: dict, budget: int, problem: str) -> None:
    """x-policyd-thread-budget: an exact amount of the policy's currency, for the thread x-thread-id names; anything
    else is refused before any hold (400, its param the header)."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    call = parse_call("POST", "/v1/chat/completions", {"authorization": "Bearer k", **headers}, body)
    assert (call.thread_budget, problem in call.problem_message) == (budget, True), call.problem_message
    assert call.problem == ("invalid_request" if problem else "") and call.authorize_input().thread_budget == budget
    if problem:
        assert call.problem_param == "x-policyd-thread-budget"



def test_a_requests_own_bound_is_read_from_its_header() -> None:
    """x-policyd-max-charge: an exact amount of the policy's currency (no thread needed); anything else is refused
    before any hold (400, its param the header)."""
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    call = parse_call("POST", "/v1/chat/completions", {"authorization": "Bearer k", "x-policyd-max-charge": "0.25"}, body)
    assert (call.problem, call.max_charge, call.authorize_input().max_charge) == ("", 250_000_000, 250_000_000)
    for bad in ("0", "-0.5", "cheap", "0.0000000001"):
        call = parse_call("POST", "/v1/chat/completions", {"authorization": "Bearer k", "x-policyd-max-charge": bad},
                          body)
        assert (call.problem, call.problem_param, call.max_charge) == ("invalid_request", "x-policyd-max-charge", 0)
