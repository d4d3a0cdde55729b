"""The gateway's shapes and the timeouts its Envoy config is rendered with unless told otherwise
(policyd/gateway_config.py renders it). Apart from it so that the command line offers them without loading
what rendering needs."""

SHAPES = ("ext_authz+ext_proc", "ext_proc")
# How long the gateway waits for a provider's reply, and for its next bytes: the openai SDK's own timeout.
# policyd's ext_proc streams live a little longer, to see the reply's end.
ROUTE_TIMEOUT_SECONDS = 600
STREAM_TIMEOUT_MARGIN_SECONDS = 60
# How long a connection to a provider stays open unused: below the 5 s after which uvicorn (vLLM's server) and
# Node.js close theirs. A request after a quiet spell opens a new one (a TCP and TLS handshake).
UPSTREAM_IDLE_TIMEOUT_SECONDS = 4
