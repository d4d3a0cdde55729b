"""The Envoy configuration that makes a stock Envoy a policyd gateway.

`deploy/envoy/envoy.yaml` is this rendered with the defaults (a test keeps them equal); the
demo and the end-to-end tests render it with their own ports.

    policyd gateway-config --listen-port 10000 --policyd 127.0.0.1:50051 \\
        --cluster openai=api.openai.com:443:tls [--shape ext_proc] > envoy.yaml

Two shapes keep the same guarantees (see policyd/ext_proc.py):
- `ext_authz+ext_proc` (the default): ext_authz decides and reserves; ext_proc runs only for a body
  policy rewrites; an ext_proc filter in observability mode (`policyd.observer`) reads and settles
  every reply. A request waits for one call (ext_authz's), and for two messages more when rewritten.
- `ext_proc`: one ext_proc stream decides at the request-body phase, reserves and rewrites; the
  observer reads and settles every reply (bench/RESULTS.md measures both shapes).
No event of a stream waits for policyd on its way out.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources

from policyd.exchange import EXT_AUTHZ_NAMESPACE, EXT_PROC_NAMESPACE
from policyd.gateway_defaults import (ROUTE_TIMEOUT_SECONDS, SHAPES, STREAM_TIMEOUT_MARGIN_SECONDS,
                                      UPSTREAM_IDLE_TIMEOUT_SECONDS)
from policyd.batches import DECISION_SECONDS
from policyd import request_lookup
from policyd.http_api import (AWS_ERROR_HEADER, BEDROCK_PATH_REGEX, CREDENTIAL_REFUSALS, GATEWAY_ONLY_HEADERS,
                              POLICY_UNAVAILABLE_MESSAGE, PROVIDER_ACCOUNT_HEADERS, REQUEST_BODY_BYTES_MAX,
                              REQUEST_HEADERS_BYTES_MAX, REQUEST_ID_HEADER, UPLOAD_PATH_REGEX, BATCHES_PATH_REGEX,
                              REQUEST_LOOKUP_PATH_REGEX, credentials_refused_reply)
from policyd.http_api import REQUEST_HEADERS_COUNT_MAX as HEADERS_COUNT_MAX
from policyd.upstream import (CLIENT_ADDRESS_HEADER, CONNECTION_ENDED_HEADER, GATEWAY_TIMEOUT_HEADER, OBSERVER_HEADER,
                              REWRITE_HEADER, ROUTE_HEADER, UNASKED_USAGE_HEADER)


@dataclass(frozen=True)
class Upstream:
    name: str  # the Envoy cluster name, as routes and provider accounts name it
    host: str
    port: int
    tls: bool = False
    idle_timeout_seconds: int = 0  # how long a connection to it may stay unused; 0: the gateway's (render's)


_CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\]")  # a name, an address


def host_and_port(address: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 address in brackets) as the host (without them) and the port, or a ValueError that says
    what is wrong."""
    host, _, port = address.strip().rpartition(":")
    if not _HOST.fullmatch(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"an address is HOST:PORT (an IPv6 address in brackets), not {address!r}")
    return host.strip("[]"), int(port)


def parse_upstream(spec: str) -> Upstream:
    """A provider's cluster as `policyd gateway-config --cluster` takes it: NAME=HOST:PORT[:tls][:idle=SECONDS]
    (`idle`: how long a connection to it may stay unused, where the provider closes its own sooner than the
    gateway's --upstream-idle-timeout: gunicorn after 2 s), or a ValueError that says what is wrong."""
    name, equals, rest = spec.partition("=")
    if not equals or not _CLUSTER_NAME.fullmatch(name):
        raise ValueError(f"a cluster is NAME=HOST:PORT[:tls][:idle=SECONDS], its name letters, digits, _ . -; "
                         f"not {spec!r}")
    address, *options = re.split(r":(?=tls$|tls:|idle=)", rest)
    host, port = host_and_port(address)
    tls, idle = False, 0
    for option in options:
        if option == "tls" and not tls and not idle:
            tls = True
        elif option.startswith("idle=") and option[5:].isdigit() and int(option[5:]) > 0 and not idle:
            idle = int(option[5:])
        else:
            raise ValueError(f"a cluster's options are tls and idle=SECONDS (a whole number, at least 1), in that "
                             f"order; not {option!r} in {spec!r}")
    return Upstream(name, host, port, tls=tls, idle_timeout_seconds=idle)


# Envoy's own limits on request headers: a backstop at twice policyd's (http_api.REQUEST_HEADERS_*_MAX).
# Past these Envoy's codec drops the connection; below them policyd answers 431 with a JSON error and a record.
REQUEST_HEADERS_KB_MAX = 2 * REQUEST_HEADERS_BYTES_MAX // 1024
REQUEST_HEADERS_COUNT_MAX = 2 * HEADERS_COUNT_MAX

# Requests an Envoy may hold in flight to a provider cluster, and gRPC streams to policyd (an allowed
# request holds the processing filter's stream for its whole life, a streamed one the observer's
# too, a cut one 2 s more). Envoy's default circuit breakers cap each at 1,024 and answer 503 past
# that: a few hundred long model streams at once would hit it.
IN_FLIGHT_MAX = 100_000
CIRCUIT_BREAKERS = f"""    circuit_breakers:  # Envoy's default caps each at 1,024: more long model streams at once would get 503
      thresholds: [{{max_connections: {IN_FLIGHT_MAX}, max_pending_requests: {IN_FLIGHT_MAX}, max_requests: {IN_FLIGHT_MAX}}}]
"""

# Each policyd replica's gRPC health, checked every second: one that fails it twice (gone, or stopping: its health
# turns NOT_SERVING as it drains), or whose connection is refused, gets no new request until it passes again, so a
# replica lost or restarted fails no request while another serves (with fewer than half the replicas healthy,
# Envoy sends to all: its panic mode).
POLICYD_REPLICA_HEALTH = """    health_checks:
    - timeout: 1s
      interval: 1s
      no_traffic_interval: 1s
      unhealthy_threshold: 2
      healthy_threshold: 1
      grpc_health_check: {}
    outlier_detection:  # a replica whose connection is refused is set aside at once (2 s, longer if again)
      split_external_local_origin_errors: true
      consecutive_local_origin_failure: 1
      enforcing_consecutive_local_origin_failure: 100
      enforcing_consecutive_5xx: 0  # policyd's own errors (its Redis unreachable) say no replica is better
      enforcing_consecutive_gateway_failure: 0
      enforcing_success_rate: 0
      enforcing_local_origin_success_rate: 0
      interval: 1s
      base_ejection_time: 2s
      max_ejection_percent: 50
"""

# A call to policyd that never reached a replica (its connection refused or reset before the call was sent) is
# made again, to a replica it has not tried: policyd never saw it, so nothing is held twice. Not the observer's
# stream: Envoy keeps what a stream retried sends, which for the observer is the whole reply (one that meets a
# replica just lost, before Envoy set it aside, is charged as held at its deadline).
POLICYD_RETRY = """retry_policy:
  retry_on: connect-failure,refused-stream,reset-before-request
  num_retries: 2
  retry_host_predicate:
  - name: envoy.retry_host_predicates.previous_hosts
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
  host_selection_retry_max_attempts: 5
"""

DEFAULT_UPSTREAMS = (
    Upstream("openai", "127.0.0.1", 8080),
    Upstream("anthropic", "127.0.0.1", 8080),
    Upstream("google", "127.0.0.1", 8080),
)


def _discovery(host: str) -> str:
    """STATIC for an IP address; STRICT_DNS for a name (every address it resolves to is an endpoint,
    so a headless service spreads the streams over all its replicas)."""
    return "STATIC" if host.replace(".", "").isdigit() or ":" in host else "STRICT_DNS"


def _cluster(u: Upstream, idle_timeout_seconds: int) -> str:
    """A provider's cluster. Its connections close after `idle_timeout_seconds` unused (the upstream's own, where
    it has one): before the provider closes them (uvicorn, vLLM's server, and Node.js close a kept-alive connection
    after 5 s), so that the gateway never sends a request on a connection the provider is closing (a 503 that never
    reached it)."""
    idle_timeout_seconds = u.idle_timeout_seconds or idle_timeout_seconds
    address = _discovery(u.host)
    tls = f"""
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {u.host}""" if u.tls else ""
    return f"""  - name: {u.name}
    type: {address}
    connect_timeout: 2s
{CIRCUIT_BREAKERS}    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {{idle_timeout: {idle_timeout_seconds}s}}
        explicit_http_config: {{http_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {u.name}
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: {u.host}, port_value: {u.port}}}{tls}
"""


# a file uploaded (http_api.streamed_upload): its own route, so that its body streams to the provider
UPLOAD_MATCH = f'{{safe_regex: {{regex: "{UPLOAD_PATH_REGEX}"}}, headers: [{{name: ":method", string_match: {{exact: POST}}}}]}}'

# a batch made (http_api.BATCHES_PATH_REGEX): its own route, so that ext_authz waits while policyd reads its input
# file from the provider and holds its requests (policyd/batches.py), which a 2 s decision cannot
BATCHES_MATCH = f'{{safe_regex: {{regex: "{BATCHES_PATH_REGEX}"}}, headers: [{{name: ":method", string_match: {{exact: POST}}}}]}}'

# a request asked about (GET /v1/requests/{id}): its own route, so that ext_authz waits while policyd waits for the
# request to close (policyd/request_lookup.py)
REQUEST_LOOKUP_MATCH = f'{{safe_regex: {{regex: "{REQUEST_LOOKUP_PATH_REGEX}"}}, headers: [{{name: ":method", string_match: {{exact: GET}}}}]}}'


def _route(match: str, route_timeout_seconds: int, filters: str = "") -> str:
    return f"""\
              - match: {match}
                route:
                  cluster_header: {ROUTE_HEADER}
                  timeout: {route_timeout_seconds}s
                # policyd's own headers, the router's instructions no client may give (CLIENT_ROUTER_HEADERS), and what
                # a client tells the gateway alone (GATEWAY_ONLY_HEADERS: whom a request is for, its address, cookies)
                request_headers_to_remove: [{ROUTE_HEADER}, {OBSERVER_HEADER}, {REWRITE_HEADER}, {UNASKED_USAGE_HEADER}, {CLIENT_ADDRESS_HEADER}, {", ".join(CLIENT_ROUTER_HEADERS)},
                                            {", ".join(GATEWAY_ONLY_HEADERS)}]
                # the operator's account; policyd's marks (the gateway's own replies get theirs after this)
                response_headers_to_remove: [{", ".join(PROVIDER_ACCOUNT_HEADERS)}, {UNASKED_USAGE_HEADER},
                                             {GATEWAY_TIMEOUT_HEADER}, {CONNECTION_ENDED_HEADER}]
{filters}"""


def _upload_filters(shape: str) -> str:
    """An upload's route: the deciding filter sends policyd its headers alone, so that Envoy streams the body
    to the provider instead of holding it whole (the file is never read: it is free, and its own up to the
    provider's limit; held, a body past REQUEST_BODY_BYTES_MAX would be refused, 413)."""
    if shape == "ext_proc":
        return """\
                typed_per_filter_config:
                  envoy.filters.http.ext_proc:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute
                    overrides:
                      processing_mode:
                        request_header_mode: SEND
                        response_header_mode: SEND
                        request_body_mode: NONE
                        response_body_mode: NONE
                        request_trailer_mode: SKIP
                        response_trailer_mode: SKIP
"""
    return """\
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings: {disable_request_body_buffering: true}
"""


def _slow_decision_route(shape: str, match: str, decision_seconds: int, route_timeout_seconds: int) -> str:
    """The route of requests whose decision takes longer than others', where ext_authz waits `decision_seconds`
    for it (the ext_proc shape needs none: policyd extends the message's timeout there)."""
    if shape == "ext_proc":
        return ""
    return _route(match, route_timeout_seconds, f"""\
                typed_per_filter_config:
                  envoy.filters.http.ext_authz:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute
                    check_settings:
                      grpc_service:
                        envoy_grpc: {{cluster_name: policyd}}
                        timeout: {decision_seconds}s
{_indented(POLICYD_RETRY, 24)}""")


def _ext_authz_filter(fail_open: str, body_bytes_max: int) -> str:
    return f"""          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              grpc_service:
                envoy_grpc: {{cluster_name: policyd}}
                timeout: 2s
{_indented(POLICYD_RETRY, 16)}              with_request_body:
                max_request_bytes: {body_bytes_max}
                allow_partial_message: false
                pack_as_bytes: true
              failure_mode_allow: {fail_open}
              status_on_error: {{code: ServiceUnavailable}}
              clear_route_cache: true
"""


def _indented(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line if line.strip() else line for line in text.splitlines(True))


def _processing_config(fail_open: str, response_header_mode: str, more: str, stream_seconds: int,
                       decides: bool = False) -> str:
    """The processing ext_proc filter's typed_config (not indented): the request headers and body,
    answered; `more` its shape's own fields; `stream_seconds` the longest its stream lives (a request's).
    Where it `decides` (the ext_proc shape), policyd extends one message's timeout for a batch's decision
    (batches.DECISION_SECONDS: its input file is read)."""
    max_message_timeout = f"\nmax_message_timeout: {DECISION_SECONDS}s" if decides else ""
    return f""""@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
grpc_service:
  envoy_grpc: {{cluster_name: policyd}}
  timeout: {stream_seconds}s
{_indented(POLICYD_RETRY, 2)}failure_mode_allow: {fail_open}
status_on_error: {{code: ServiceUnavailable}}
message_timeout: 5s{max_message_timeout}
processing_mode:
  request_header_mode: SEND
  response_header_mode: {response_header_mode}
  request_body_mode: BUFFERED
  response_body_mode: NONE
  request_trailer_mode: SKIP
  response_trailer_mode: SKIP
{more}"""


def _ext_proc_filter(fail_open: str, shape: str, stream_seconds: int) -> str:
    if shape == "ext_proc":  # decides at the request body; the observer reads the reply
        return "          - name: envoy.filters.http.ext_proc\n            typed_config:\n" + _indented(
            _processing_config(fail_open, "SEND", f"""\
request_attributes: [source.address]  # the client's address, for the decision made here
metadata_options:
  receiving_namespaces:
    untyped: [{EXT_PROC_NAMESPACE}]
""", stream_seconds, decides=True), 14)
    # after ext_authz: only requests whose body policy rewrites (ext_authz sets the rewrite header): the
    # request headers (with ext_authz's decision in their metadata) and the body; the observer reads the
    # reply. (Sent the body alone, with the headers skipped, Envoy 1.40 lost bodies under load.)
    return _unless_header(REWRITE_HEADER, "yes", "envoy.filters.http.ext_proc", _indented(
        _processing_config(fail_open, "SKIP", f"""\
metadata_options:
  forwarding_namespaces:
    untyped: [{EXT_AUTHZ_NAMESPACE}]
""", stream_seconds), 18))


def _unless_header(header: str, value: str, name: str, config: str, on_response: bool = False,
                   value_match: str = "") -> str:
    """`config` (an http filter's typed_config, indented for extension_config) run only for requests whose
    `header` is `value` (or matches `value_match`, a StringMatcher): Envoy skips the filter for the rest (a
    matcher on request headers; on the response's headers with `on_response`, for a filter that acts on the
    response alone)."""
    input_type = "HttpResponseHeaderMatchInput" if on_response else "HttpRequestHeaderMatchInput"
    return f"""          - name: {name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher
              xds_matcher:
                matcher_list:
                  matchers:
                  - predicate:
                      not_matcher:
                        single_predicate:
                          input:
                            name: {name}-header
                            typed_config:
                              "@type": type.googleapis.com/envoy.type.matcher.v3.{input_type}
                              header_name: {header}
                          value_match: {value_match or f'{{exact: "{value}"}}'}
                    on_match:
                      action:
                        name: skip
                        typed_config:
                          "@type": type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter
              extension_config:
                name: {name}
                typed_config:
{config}"""


# Instructions Envoy's router takes from a request it counts as internal (a client whose address, or whose
# own x-forwarded-for, falls in an internal range: RFC 1918's where a config names none, in some Envoy
# versions). From a client they would have one request reach the provider several times, each attempt billed
# and one charged (x-envoy-retry-on with retriable status 200), or cut a reply short: removed at the route,
# before the router reads them, whatever Envoy counts as internal.
CLIENT_ROUTER_HEADERS = ("x-envoy-retry-on", "x-envoy-retry-grpc-on", "x-envoy-max-retries",
                         "x-envoy-retriable-status-codes", "x-envoy-retriable-header-names",
                         "x-envoy-upstream-rq-timeout-ms", "x-envoy-upstream-rq-per-try-timeout-ms",
                         "x-envoy-hedge-on-per-try-timeout", "x-envoy-upstream-stream-duration-ms",
                         "x-envoy-upstream-rq-timeout-alt-response", "x-envoy-expected-rq-timeout-ms")


# A browser's cross-origin call: the headers it may send (the key as a bearer token, the provider APIs' own,
# the SDKs' x-stainless-*, policyd's attribution headers: any, "*", with authorization named, as the Fetch
# standard asks) and read (any: the request id, rate limits, retry-after). No cookies: a key is sent as a header.
CORS_ALLOW_HEADERS = "authorization, *"
CORS_ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_MAX_AGE_SECONDS = 600


def _client_address_filter() -> str:
    """ext_authz is told the connection's peer alone: the client's address as the connection manager judged it
    (behind the operator's own proxies, the one the first of them saw) goes to policyd in a header of its own,
    set over anything a client sent under that name (and taken off before the provider)."""
    return f"""\
          - name: envoy.filters.http.header_mutation
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
              mutations:
                request_mutations:
                - append:
                    header: {{key: {CLIENT_ADDRESS_HEADER}, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}}
                    append_action: OVERWRITE_IF_EXISTS_OR_ADD
"""


def _cors_filter(origins: tuple[str, ...]) -> str:
    """Envoy's CORS filter, first in the chain: it answers a browser's preflight (OPTIONS) from an allowed
    origin itself, so the preflight, which carries no key, never reaches policyd, and it marks every reply to
    such an origin as readable by it, policyd's refusals included (a browser app then reads the error's body:
    insufficient_quota, a rate limit). None when no origin is allowed."""
    if not origins:
        return ""
    return """          - name: envoy.filters.http.cors
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors
"""


def _cors_policy(origins: tuple[str, ...]) -> str:
    if not origins:
        return ""
    matches = "".join("\n                  - " + ("{safe_regex: {regex: \".*\"}}" if origin == "*" else
                                               f"{{exact: {json.dumps(origin)}}}") for origin in origins)
    return f"""
              typed_per_filter_config:
                envoy.filters.http.cors:
                  "@type": type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy
                  allow_origin_string_match:{matches}
                  allow_methods: "{CORS_ALLOW_METHODS}"
                  allow_headers: "{CORS_ALLOW_HEADERS}"
                  expose_headers: "*"
                  max_age: "{CORS_MAX_AGE_SECONDS}\""""


def _credentials_refused_filter(shape: str) -> str:
    """The provider's 401 or 403 (its refusal of the operator's credentials: the customer's key never
    reaches it) replaced by policyd's 502 `provider_credentials_refused`, so the customer is not told
    their own key is wrong, nor shown the ends of the operator's. First in the chain, so the filters
    after it (the observer) see the provider's own status and release the hold. Envoy's own replies
    (policyd's denials among them) pass unchanged."""
    status, headers, body = credentials_refused_reply()
    statuses = "".join(f"""
                            - single_predicate:
                                input:
                                  name: status
                                  typed_config:
                                    "@type": type.googleapis.com/envoy.type.matcher.v3.HttpResponseStatusCodeMatchInput
                                value_match: {{exact: "{code}"}}""" for code in CREDENTIAL_REFUSALS)
    namespace = EXT_PROC_NAMESPACE if shape == "ext_proc" else EXT_AUTHZ_NAMESPACE
    headers = [*headers, (REQUEST_ID_HEADER, f"%DYNAMIC_METADATA({namespace}:request_id)%")]  # the deciding filter's
    added = "".join(f"""
                          - header: {{key: {name}, value: "{value}"}}
                            append_action: OVERWRITE_IF_EXISTS_OR_ADD""" for name, value in headers)
    return f"""          - name: envoy.filters.http.custom_response
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.custom_response.v3.CustomResponse
              custom_response_matcher:
                matcher_list:
                  matchers:
                  - predicate:
                      and_matcher:
                        predicate:
                        - single_predicate:
                            input:
                              name: local_reply
                              typed_config:
                                "@type": type.googleapis.com/envoy.type.matcher.v3.HttpResponseLocalReplyMatchInput
                            value_match: {{exact: "false"}}
                        - or_matcher:
                            predicate:{statuses}
                    on_match:
                      action:
                        name: provider_credentials_refused
                        typed_config:
                          "@type": type.googleapis.com/envoy.extensions.http.custom_response.local_response_policy.v3.LocalResponsePolicy
                          body: {{inline_string: {json.dumps(body.decode())}}}
                          status_code: {status}
                          response_headers_to_add:{added}
"""


def _observer_filter(shape: str, stream_seconds: int) -> str:
    """The response as it passes, sent to policyd with no reply awaited (observability mode): how every
    allowed request's reply is settled, in both shapes. (The ext_proc shape once had the processing
    filter ask for other replies' bodies at their headers, a mode_override: Envoy at times passed a body
    that came with its headers on unsent, and the reply was settled as cut.) It runs only where the
    deciding filter set the observer header to `read`; it never holds or fails a request. After
    ext_authz it opens at the request headers, so a request whose client left before its reply began is
    charged (usage_estimated:client_gone) when Envoy closes the stream (deferred_close_timeout after the
    cut); in the ext_proc shape the processing filter sees that. A reply cut mid-way is settled the same way."""
    namespace, request_headers = (EXT_PROC_NAMESPACE, "SKIP") if shape == "ext_proc" else (EXT_AUTHZ_NAMESPACE, "SEND")
    return _unless_header(OBSERVER_HEADER, "read", "policyd.observer", f"""\
                  "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
                  grpc_service:
                    envoy_grpc: {{cluster_name: policyd}}
                    timeout: {stream_seconds}s
                  observability_mode: true  # no retry_policy: Envoy would keep the whole reply for a retry
                  deferred_close_timeout: 2s
                  failure_mode_allow: true
                  processing_mode:
                    request_header_mode: {request_headers}
                    response_header_mode: SEND
                    request_body_mode: NONE
                    response_body_mode: STREAMED
                    request_trailer_mode: SKIP
                    response_trailer_mode: SEND
                  metadata_options:
                    forwarding_namespaces:
                      untyped: [{namespace}]
""")


def _unasked_usage_filter(shape: str) -> str:
    """Envoy's Lua filter that keeps a stream's usage event from a client that did not ask for it (policyd
    asks every streamed chat and text completion for its usage; policyd/unasked_usage.py), for the requests
    the deciding filter marked so (`x-policyd-unasked-usage: strip`); Envoy skips it for the rest. Before the
    processing filter and the observer in the chain, so that on the way back the observer reads the
    provider's own bytes first, and the processing filter's wait for its answer on the response headers
    (the ext_proc shape) comes before the script reads the body (after it, Envoy 1.40 cut such streams after
    their first piece). After ext_authz the mark is a request header; in the ext_proc shape, whose decision
    comes after this filter, the processing filter puts it on the response headers, and the script takes it
    off (a Lua filter run for every response cost Envoy about 0.1 ms of CPU a request). What a client (or a
    provider, on its reply) sent under that name is dropped first, so the mark alone decides."""
    return _unless_header(UNASKED_USAGE_HEADER, "strip", "policyd.unasked_usage", _lua_config("unasked_usage.lua"),
                          on_response=shape == "ext_proc")


def _lua_config(script: str) -> str:
    """Envoy's Lua filter's typed_config running a script of gateway_lua/ (indented for _unless_header)."""
    source = resources.files("policyd").joinpath("gateway_lua", script).read_text()
    config = f"""\
"@type": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua
default_source_code:
  inline_string: |
{_indented(source, 4)}"""
    return _indented(config, 18)


# a Gemini upload begun, or its bytes sent (http_api's _GEMINI_UPLOAD: a path holding this)
GEMINI_UPLOAD_PATH_MATCH = '{contains: "upload/v1beta/files"}'


def _gemini_upload_url_filter() -> str:
    """Envoy's Lua filter that makes the URL a Gemini upload's bytes go to (its beginning's reply names Google's
    host) the gateway's own, where the client reached it (gateway_lua/gemini_upload_url.lua); Envoy skips it for
    every other path."""
    return _unless_header(":path", "", "policyd.gemini_upload_url", _lua_config("gemini_upload_url.lua"),
                          value_match=GEMINI_UPLOAD_PATH_MATCH)


# What Envoy's access log says of a request: why it ended so (its response flags and code details: UAEX, a
# decision that failed or timed out; UC/UF, the provider's connection reset or refused), never a secret (no
# header of a credential, and the path without its query, where a key may be).
ACCESS_LOG_FIELDS = {
    "start_time": "%START_TIME%", "method": "%REQ(:METHOD)%", "path": "%REQ_WITHOUT_QUERY(:PATH)%",
    "request_id": f"%RESP({REQUEST_ID_HEADER})%", "status": "%RESPONSE_CODE%", "flags": "%RESPONSE_FLAGS%",
    "details": "%RESPONSE_CODE_DETAILS%", "upstream": "%UPSTREAM_HOST%",
    "upstream_failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%", "duration_ms": "%DURATION%",
}


def _access_log(path: str) -> str:
    if not path:
        return ""
    fields = "".join(f"\n                  {name}: \"{value}\"" for name, value in ACCESS_LOG_FIELDS.items())
    return f"""          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {json.dumps(path)}
              log_format:
                json_format:{fields}
                formatters:
                - name: envoy.formatter.req_without_query
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.formatter.req_without_query.v3.ReqWithoutQuery
"""


# policyd unreachable, or too slow for its filter's timeout: Envoy's code details, never those of policyd's own replies
_POLICYD_UNREACHABLE = ("extension_filter: {name: envoy.access_loggers.extension_filters.cel, typed_config: {"
                        '"@type": type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter, '
                        "expression: \"response.code_details == 'ext_authz_error' || "
                        "response.code_details.startsWith('ext_proc_error')\"}}")
_BODY_TOO_LARGE = ("status_code_filter: {comparison: {op: EQ, value: {default_value: 413, "
                   "runtime_key: policyd.body_too_large}}}")
_HEADERS_TOO_LARGE = ("status_code_filter: {comparison: {op: EQ, value: {default_value: 431, "
                      "runtime_key: policyd.headers_too_large}}}")
# Envoy's access log filter, error type, code, message, AWS error name, headers added
GatewayReply = tuple[str, str, str, str, str, tuple[tuple[str, str], ...]]


def gateway_replies(body_bytes_max: int) -> tuple[GatewayReply, ...]:
    """The replies the gateway makes itself, in the OpenAI error shape every client of it reads (Envoy's own are
    empty or plain text: the openai SDKs then say only "Error code: 503"), and in AWS's on a Bedrock path, as
    policyd's own denials are (http_api.for_aws_clients); `body_bytes_max` the largest body it takes. Envoy uses
    the first that matches a reply, and leaves policyd's own replies as they are. A reply the gateway gave up
    waiting for, or whose provider connection ended before its headers, is marked for policyd's observer
    (ext_proc._response_began, usage_capture.closing)."""
    return (
        # policyd unreachable, or too slow for the filter's timeout (fail closed): nothing was sent, nothing spent
        (_POLICYD_UNREACHABLE, "server_error", "policy_unavailable", POLICY_UNAVAILABLE_MESSAGE,
         "ServiceUnavailableException", (("retry-after", "1"),)),
        # the gateway gave up on the provider (its route or idle timeout), which goes on and bills: charged as held,
        # so not to be tried again by itself (the openai and Anthropic SDKs retry a 504 twice unless told, each
        # attempt as long and charged again)
        ("response_flag_filter: {flags: [UT, SI]}", "server_error", "upstream_timeout",
         "the gateway stopped waiting for the provider: %LOCAL_REPLY_BODY%", "ServiceUnavailableException",
         ((GATEWAY_TIMEOUT_HEADER, "yes"), ("x-should-retry", "false"))),
        # the provider's connection ended before the reply's headers: not the account's answer
        ("response_flag_filter: {flags: [UC]}", "server_error", "upstream_unavailable",
         "the provider could not be reached: %LOCAL_REPLY_BODY%", "ServiceUnavailableException",
         ((CONNECTION_ENDED_HEADER, "yes"),)),
        ("response_flag_filter: {flags: [UF, UH, UO, URX, NC, UPE, LR, DF, DO, OM]}", "server_error",
         "upstream_unavailable", "the provider could not be reached: %LOCAL_REPLY_BODY%", "ServiceUnavailableException",
         ()),
        (_BODY_TOO_LARGE, "invalid_request_error", "request_too_large",
         f"The request body is larger than this gateway accepts ({body_bytes_max} bytes).", "ValidationException",
         ()),
        (_HEADERS_TOO_LARGE, "invalid_request_error", "request_headers_too_large",
         f"The request headers are larger than this gateway accepts ({REQUEST_HEADERS_KB_MAX} KiB, "
         f"{REQUEST_HEADERS_COUNT_MAX} headers).", "ValidationException", ()),
    )


def _local_reply_mappers(body_bytes_max: int) -> str:
    """The gateway's own replies as the connection manager's local reply mappers, each first for a Bedrock path."""
    bedrock_path = ('header_filter: {header: {name: ":path", string_match: {safe_regex: {regex: "'
                    + BEDROCK_PATH_REGEX + '"}}}}')
    mappers = []
    for filter_, error_type, code, message, aws_name, headers in gateway_replies(body_bytes_max):
        message = json.dumps(message)
        error = f"error: {{type: {error_type}, code: {code}, message: {message}, param: null}}"
        for aws in (True, False):
            added = (*headers, (AWS_ERROR_HEADER, aws_name)) if aws else headers
            mapper = "            - filter:\n"
            mapper += f"                and_filter: {{filters: [{{{bedrock_path}}}, {{{filter_}}}]}}\n" if aws else \
                f"                {filter_}\n"
            if added:
                mapper += "              headers_to_add:\n" + "".join(
                    f'              - header: {{key: {key}, value: "{value}"}}\n'
                    "                append_action: OVERWRITE_IF_EXISTS_OR_ADD\n" for key, value in added)
            mapper += ("              body_format_override:\n"
                       f"                json_format: {{{f'message: {message}, ' if aws else ''}{error}}}\n"
                       "                content_type: application/json\n")
            mappers.append(mapper)
    return "".join(mappers)


TRUSTED_PROXIES_MAX = 8


def render(listen_host: str = "127.0.0.1", listen_port: int = 10000, policyd_host: str = "127.0.0.1",
           policyd_port: int = 50051, admin_port: int = 9901, upstreams: tuple[Upstream, ...] = DEFAULT_UPSTREAMS,
           failure_mode_allow: bool = False, body_bytes_max: int = REQUEST_BODY_BYTES_MAX,
           shape: str = SHAPES[0], more_policyd: tuple[tuple[str, int], ...] = (),
           route_timeout_seconds: int = ROUTE_TIMEOUT_SECONDS, cors_origins: tuple[str, ...] = (),
           access_log_path: str = "", upstream_idle_timeout_seconds: int = UPSTREAM_IDLE_TIMEOUT_SECONDS,
           trusted_proxies: int = 0) -> str:
    """`more_policyd`: further (host, port) replicas beside policyd_host:policyd_port; Envoy spreads
    each request's streams over all of them (a name that resolves to several addresses does too).
    `route_timeout_seconds`: how long the gateway waits for a reply, and for its next bytes (policyd's
    reservations must outlast it: POLICYD_RESERVATION_TTL_SECONDS). `cors_origins`: the web origins
    (`https://app.example`, or `*` for any) whose pages may call the gateway from a browser; none by default.
    `access_log_path`: a file where Envoy writes a JSON line a request (`_access_log`); none by default.
    `upstream_idle_timeout_seconds`: how long a connection to a provider may stay unused (`_cluster`).
    `trusted_proxies`: the proxies of the operator's own before the gateway (a load balancer: 1), each adding the
    address it was called from to x-forwarded-for; the client's address is the one the first of them saw, or the
    connection's with none. What a client writes in x-forwarded-for itself is never taken as its address."""
    if route_timeout_seconds < 1:
        raise ValueError("the route timeout is at least a second")
    if not 0 <= trusted_proxies <= TRUSTED_PROXIES_MAX:
        raise ValueError(f"the trusted proxies before the gateway are 0 to {TRUSTED_PROXIES_MAX}")
    for origin in cors_origins:
        if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d+)?", origin):
            raise ValueError(f"a CORS origin is a scheme and host (https://app.example[:port]) or *, not {origin!r}")
    stream_seconds = route_timeout_seconds + STREAM_TIMEOUT_MARGIN_SECONDS
    if shape not in SHAPES:
        raise ValueError(f"unknown gateway shape {shape!r}; one of {', '.join(SHAPES)}")
    replicas = ((policyd_host, policyd_port), *more_policyd)
    if len({_discovery(host) for host, _ in replicas}) > 1:
        raise ValueError("policyd replicas are either all IP addresses or all names")
    policyd_endpoints = "".join(f"""
        - endpoint:
            address:
              socket_address: {{address: {host}, port_value: {port}}}""" for host, port in replicas)
    fail_open = "true" if failure_mode_allow else "false"
    if upstream_idle_timeout_seconds < 1:
        raise ValueError("the upstream idle timeout is at least a second")
    names = [u.name for u in upstreams]
    if len(set(names)) < len(names) or "policyd" in names:
        raise ValueError("each provider cluster has a name of its own, not policyd (the gateway's own cluster)")
    clusters = "".join(_cluster(u, upstream_idle_timeout_seconds) for u in upstreams)
    filters = (_client_address_filter() if shape != "ext_proc" else "") + \
        _cors_filter(cors_origins) + _credentials_refused_filter(shape) + \
        (_ext_authz_filter(fail_open, body_bytes_max) if shape != "ext_proc" else "") + \
        _unasked_usage_filter(shape) + _gemini_upload_url_filter() + \
        _ext_proc_filter(fail_open, shape, stream_seconds) + \
        _observer_filter(shape, stream_seconds)
    # ext_proc buffers the body it decides on within the connection's buffer limit (past it: 413)
    buffer_limit = f"\n    per_connection_buffer_limit_bytes: {body_bytes_max}" if shape == "ext_proc" else ""
    routes = _route(UPLOAD_MATCH, route_timeout_seconds, _upload_filters(shape)) + \
        _slow_decision_route(shape, BATCHES_MATCH, DECISION_SECONDS, route_timeout_seconds) + \
        _slow_decision_route(shape, REQUEST_LOOKUP_MATCH, request_lookup.DECISION_SECONDS, route_timeout_seconds) + \
        _route('{prefix: "/"}', route_timeout_seconds)
    title = ("ext_authz decides and reserves, ext_proc rewrites, policyd.observer settles"
             if shape != "ext_proc" else "ext_proc decides, reserves and rewrites, policyd.observer settles")
    return f"""# Envoy as a policyd gateway: {title}.
# Rendered by policyd/gateway_config.py (the tests check this file equals its defaults).
# Fail closed by default: when policyd cannot be reached, requests get 503 and nothing is spent.
# To fail open (serve unmetered while policyd is down), set failure_mode_allow: true on its filters.
admin:
  address:
    socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}
static_resources:
  listeners:
  - name: gateway
    address:
      socket_address: {{address: {listen_host}, port_value: {listen_port}}}{buffer_limit}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          stream_idle_timeout: {route_timeout_seconds}s  # a reply not streamed may think as long as the route waits
          # the client's address (policyd records it) is the connection's, or the one the operator's own proxies saw:
          # never what a client wrote in x-forwarded-for; a client's x-request-id (its tracing id) is kept as sent
          use_remote_address: true
          xff_num_trusted_hops: {trusted_proxies}
          preserve_external_request_id: true
{_access_log(access_log_path)}          max_request_headers_kb: {REQUEST_HEADERS_KB_MAX}
          common_http_protocol_options: {{max_headers_count: {REQUEST_HEADERS_COUNT_MAX}}}
          route_config:
            name: providers
            virtual_hosts:
            - name: providers
              domains: ["*"]
              include_attempt_count_in_response: true{_cors_policy(cors_origins)}
              routes:
{routes}          local_reply_config:
            mappers:
{_local_reply_mappers(body_bytes_max)}          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: policyd
    type: {_discovery(policyd_host)}
    connect_timeout: 1s
{CIRCUIT_BREAKERS}    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
{POLICYD_REPLICA_HEALTH}    load_assignment:
      cluster_name: policyd
      endpoints:
      - lb_endpoints:{policyd_endpoints}
{clusters}"""
