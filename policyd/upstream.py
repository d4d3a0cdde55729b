"""What policyd tells Envoy to do with a request, whichever filter asks (ext_authz or ext_proc).

An allowed request leaves for its provider without the customer's key: it is removed, and the
chosen provider account's credential is set in its place (with the OpenAI organization and project the
account bills to, where configured; the ones a client names are its own account's, never sent); the
route header names the Envoy cluster to send it to, the observer header whether the observer filter
reads its response, the usage header whether the gateway keeps a usage event the client did not ask
for from it (policyd/unasked_usage.py), and (after ext_authz) the rewrite header whether the processing
filter rewrites its body. Anything else is answered by Envoy itself (a local reply).
"""

from __future__ import annotations

from dataclasses import dataclass

from policyd import http_api
from policyd.domain import Decision
from policyd.providers import ProviderPool

ROUTE_HEADER = "x-policyd-route"
OBSERVER_HEADER = "x-policyd-observer"
REWRITE_HEADER = "x-policyd-rewrite"  # ext_authz: whether the processing filter rewrites the body
UNASKED_USAGE_HEADER = "x-policyd-unasked-usage"  # strip: the stream's usage event is kept from the client
# the client's address as the gateway's connection manager judged it (the connection's, or the one the operator's
# own proxies saw: gateway_config `trusted_proxies`), set on every request for ext_authz, which is told the
# connection's peer alone (the ext_proc shape reads Envoy's source.address attribute)
CLIENT_ADDRESS_HEADER = "x-policyd-client-address"
# on the gateway's own reply when it gave up on the provider (its route or idle timeout: Envoy's UT, SI)
GATEWAY_TIMEOUT_HEADER = "x-policyd-gateway-timeout"
# on the gateway's own 503 when the provider's connection ended before the reply's headers (Envoy's UC): most often
# a kept-alive connection the provider closed as the gateway sent on it, which says nothing of the account
CONNECTION_ENDED_HEADER = "x-policyd-connection-ended"


@dataclass(frozen=True)
class UpstreamRequest:
    set_headers: list[tuple[str, str]]
    remove_headers: list[str]
    account: str  # the provider account that pays for it ("" when the route carries its own credential)


def upstream_request(decision: Decision, pool: ProviderPool, observed: bool, rewrite: bool | None = None,
                     usage_unasked: bool = False, policyd_headers: tuple[str, ...] = ()) -> UpstreamRequest:
    """`observed`: whether the observer filter reads the response (or the processing filter does);
    `rewrite`, from ext_authz only: whether the processing filter rewrites the body; `usage_unasked`: a
    stream whose client did not ask for the usage policyd asks for (HttpCall.usage_unasked). All always set
    here, so what a client sent under these names never decides them (the route drops them upstream).
    `policyd_headers`: the client's headers named x-policyd-* (its request id and tags among them), removed."""
    account = pool.named(decision.provider, decision.account) if decision.account else pool.pick(decision.provider)
    remove = [*http_api.CUSTOMER_KEY_HEADERS, *http_api.ACCOUNT_REQUEST_HEADERS]
    route = decision.route
    headers: list[tuple[str, str]] = [(OBSERVER_HEADER, "read" if observed else "skip"),
                                      (UNASKED_USAGE_HEADER, "strip" if usage_unasked else "pass")]
    if observed:  # the reply as it is, its usage readable (the openai SDK asks for gzip; providers would send it)
        headers.append(("accept-encoding", "identity"))
    if rewrite is not None:
        headers.append((REWRITE_HEADER, "yes" if rewrite else "no"))
    if account is not None:
        name, value = account.credential_header()
        headers.append((name, value))
        headers.extend(account.account_headers())
        route = account.cluster
    headers.append((ROUTE_HEADER, route))
    set_here = {k for k, _ in headers}
    remove = [h for h in dict.fromkeys([*remove, *policyd_headers]) if h not in set_here]
    return UpstreamRequest(headers, remove, account.name if account else "")
