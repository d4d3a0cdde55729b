"""Machine reasons for denials and errors, with their HTTP status and OpenAI error shape.

One table, so the native API, ext_authz and the CLI all say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reason:
    code: str
    http_status: int
    error_type: str


_REASONS = [
    Reason("missing_api_key", 401, "invalid_request_error"),
    Reason("malformed_api_key", 401, "invalid_request_error"),
    Reason("invalid_api_key", 401, "invalid_request_error"),
    Reason("key_revoked", 401, "invalid_request_error"),
    Reason("key_expired", 401, "invalid_request_error"),
    Reason("key_paused", 403, "permission_error"),
    Reason("end_user_paused", 403, "permission_error"),
    Reason("environment_not_allowed", 403, "permission_error"),
    Reason("owner_mismatch", 403, "permission_error"),
    Reason("model_not_allowed", 403, "permission_error"),
    Reason("endpoint_not_allowed", 403, "permission_error"),
    Reason("unknown_model", 404, "invalid_request_error"),
    Reason("response_not_found", 404, "invalid_request_error"),  # a stored response of another customer, or none
    Reason("conversation_not_found", 404, "invalid_request_error"),  # ... a conversation
    Reason("file_not_found", 404, "invalid_request_error"),  # ... a file
    Reason("batch_not_found", 404, "invalid_request_error"),  # ... a batch
    Reason("cached_content_not_found", 404, "invalid_request_error"),  # ... an explicit cache (Gemini's)
    Reason("request_not_found", 404, "invalid_request_error"),  # a request of another customer's, or none
    Reason("unknown_endpoint", 400, "invalid_request_error"),
    Reason("invalid_request", 400, "invalid_request_error"),
    Reason("invalid_metadata", 400, "invalid_request_error"),
    Reason("request_too_large", 413, "invalid_request_error"),
    Reason("request_headers_too_large", 431, "invalid_request_error"),
    Reason("unsupported_content_encoding", 415, "invalid_request_error"),  # a body compressed in a coding not read
    Reason("input_unbounded", 400, "invalid_request_error"),
    Reason("tool_not_priced", 400, "invalid_request_error"),  # a hosted tool the price table does not price
    Reason("service_tier_not_priced", 400, "invalid_request_error"),  # a processing tier the table does not price
    Reason("image_model_required", 400, "invalid_request_error"),  # an image tool naming no model, no plan default
    Reason("no_policy", 503, "server_error"),
    Reason("unknown_plan", 403, "permission_error"),
    Reason("request_too_costly", 400, "invalid_request_error"),  # past the plan's max_request_charge
    Reason("request_in_progress", 409, "invalid_request_error"),  # its request id names another request in flight
    Reason("insufficient_quota", 429, "insufficient_quota"),
    Reason("budget_exceeded", 429, "budget_exceeded"),
    Reason("rate_limit_exceeded", 429, "rate_limit_exceeded"),
    Reason("concurrency_limit_exceeded", 429, "rate_limit_exceeded"),
    Reason("counters_unavailable", 503, "server_error"),
    # the provider refused the operator's own credentials (its 401 or 403): never the customer's key
    Reason("provider_credentials_refused", 502, "server_error"),
    Reason("unavailable", 503, "server_error"),  # an unexpected error: a store policyd stands on is unreachable
    Reason("internal", 500, "server_error"),  # an unexpected error of any other kind
]
REASONS: dict[str, Reason] = {r.code: r for r in _REASONS}


def http_status(code: str) -> int:
    return REASONS[code].http_status if code in REASONS else 400


def error_type(code: str) -> str:
    return REASONS[code].error_type if code in REASONS else "invalid_request_error"


# What a denial says to a person, by reason (the record keeps it; events do not carry it).
MESSAGES = {
    "missing_api_key": "No API key was provided.",
    "malformed_api_key": "The API key is not in the format of a policyd key.",
    "invalid_api_key": "Incorrect API key provided.",
    "key_revoked": "This API key has been revoked.",
    "key_expired": "This API key has expired.",
    "key_paused": "This API key is paused.",
    "end_user_paused": "The end user this request names is paused by the operator.",
    "environment_not_allowed": "This API key may not be used in this environment.",
    "owner_mismatch": "The request claims an owner that is not the owner of this API key.",
    "model_not_allowed": "This API key may not use the requested model.",
    "endpoint_not_allowed": "This API key may not use this endpoint.",
    "unknown_model": "The requested model does not exist.",
    "image_model_required": "Name the image model of the image_generation tool (tools[].model): its images are "
                            "billed at that model's prices, and this key's plan gives none by default.",
    "tool_not_priced": "The model's price table does not price a hosted tool this request may use (a code "
                       "interpreter or shell container: per_container; grounding with Google Maps: "
                       "per_maps_grounding; a router's web search: reported_cost with per_web_result or "
                       "per_web_search), or a router's tool billing what policyd cannot bound.",
    "service_tier_not_priced": "The model's price table does not price the processing tier this request asks "
                               "for (service_tier, or Anthropic's speed: fast); ask for the standard tier.",
    "response_not_found": "No response with this id was made with this API key's account.",
    "conversation_not_found": "No conversation with this id was made with this API key's account.",
    "file_not_found": "No file with this id was uploaded with this API key's account.",
    "batch_not_found": "No batch with this id was made with this API key's account.",
    "cached_content_not_found": "No cached content with this name was made with this API key's account.",
    "request_not_found": "No request with this id was made with this API key's account.",
    "unknown_plan": "The plan of this API key is not in the active policy.",
    "no_policy": "No policy has been applied yet.",
    "request_too_costly": "This request may cost more than this API key's plan allows a single request: ask for "
                          "fewer output tokens, or send less input.",
    "request_in_progress": "Another request with this request id (x-policyd-request-id or idempotency-key) "
                           "is still in progress: wait for it, or send this one with a new id.",
    "insufficient_quota": "You exceeded your current quota: the prepaid balance cannot cover this request.",
    "budget_exceeded": "A budget limit has been reached.",
    "rate_limit_exceeded": "A rate limit has been reached.",
    "concurrency_limit_exceeded": "Too many requests in flight on this API key.",
    "invalid_request": "The request is invalid.",
    "input_unbounded": "The request refers to input it does not carry (a previous response, a stored prompt, a "
                       "file, an image URL or cached content), and this plan reserves strictly: the model has no "
                       "context_window to bound it. Send the input itself, or ask the operator to set one.",
    "counters_unavailable": "The policy service cannot reach its counters.",
    "provider_credentials_refused": "The model provider refused this gateway's own credentials. This is not a "
                                    "problem with your API key; the gateway's operator must fix it.",
    "unavailable": "The policy service cannot reach a store it needs; try again.",
    "internal": "The policy service failed to decide this request; the details are in its log.",
}


def failure(error: Exception) -> str:
    """The reason an unexpected error is answered with: "unavailable" when a store policyd stands on is
    down or was cut off (the caller may try again), else "internal". Its text is never sent: it may
    hold SQL and data, and may be longer than a caller accepts."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import InterfaceError, OperationalError

    unreachable = (RedisConnectionError, RedisTimeoutError, OperationalError, InterfaceError, ConnectionError)
    return "unavailable" if isinstance(error, unreachable) else "internal"
