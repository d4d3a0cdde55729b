"""Limits on everything that comes from outside, and the checks that enforce them."""

from __future__ import annotations

import re

from policyd.domain import (CREATABLE, CREATED_AT, ENDPOINTS, FILES_PER_REQUEST_MAX, IMAGE_SCALE_MAX,
                            FALLBACK_MODELS_MAX, PART_TOKEN_FIELDS, ROUTED_FALLBACKS_MAX, SEARCH_CONTEXT_LENGTH_MAX,
                            USAGE_PARTS_MAX, AuthorizeInput, UsageReport)
from policyd.money import AMOUNT_MAX, QUANTITY_MAX, TOKEN_SECONDS_MAX
from policyd.policy import CONTAINER_MEMORY_LENGTH_MAX

REQUEST_ID_LENGTH_MAX = 128
FIELD_LENGTH_MAX = 256
MODEL_NAME_LENGTH_MAX = 256
TAGS_MAX = 32
TAG_KEY_LENGTH_MAX = 64
TAG_VALUE_LENGTH_MAX = 256
USER_AGENT_LENGTH_MAX = 1024
SERVICE_TIER_LENGTH_MAX = 32
SEARCH_TOOLS_MAX = 128  # unbounded search tools a request may list (each reserved at the plan's bound)
TOOL_CALLS_MAX = 10_000  # the most hosted tool calls a request may allow (max_tool_calls)
PARTIAL_IMAGES_MAX = 16  # partial images a streamed image_generation call may send (OpenAI takes 0-3)
REQUEST_ID_PATTERN = re.compile(rf"^[A-Za-z0-9._:/=+@-]{{1,{REQUEST_ID_LENGTH_MAX}}}$")
STORED_RESPONSE_ID_LENGTH_MAX = 200
PROVIDER_FILES_MAX = 16  # files one reply made at the provider (a Veo operation's videos: 4 at most)
# an id from a URL path (a Gemini batch's is its name: batches/<id>)
# (a Gemini batch's name, "batches/<id>"; an explicit cache's, "cachedContents/<id>"; a Veo operation's,
# "models/<model>/operations/<id>", on Vertex AI
# "projects/<p>/locations/<l>/publishers/google/models/<model>/operations/<id>")
STORED_RESPONSE_ID_PATTERN = re.compile(
    r"^(batches/|cachedContents/|(projects/[A-Za-z0-9_.-]{1,64}/locations/[A-Za-z0-9_.-]{1,64}/publishers/google/)?"
    rf"models/[A-Za-z0-9_.-]{{1,128}}/operations/)?[A-Za-z0-9_.-]{{1,{STORED_RESPONSE_ID_LENGTH_MAX}}}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_UTF8 = re.compile("[\ufffd\ud800-\udfff]")  # a replacement character, or a lone surrogate

_ATTRIBUTION_FIELDS = (
    "trace_id", "traceparent", "customer_id", "workspace_id", "project_id", "end_user_id",
    "agent_id", "thread_id", "feature", "route", "environment",
)


class Problem(Exception):
    def __init__(self, reason: str, message: str, param: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.param = param


def _text_field(name: str, value: str, length_max: int) -> None:
    if not value:
        return
    if len(value) > length_max:
        raise Problem("invalid_metadata", f"{name} is longer than {length_max} characters", name)
    if _CONTROL.search(value):
        raise Problem("invalid_metadata", f"{name} contains control characters", name)
    if _NOT_UTF8.search(value):
        raise Problem("invalid_metadata", f"{name} is not valid UTF-8", name)


def check_end_user(end_user_id: str) -> None:
    """Raise Problem for an end user id no request could name (a question about one: GET /v1/key)."""
    _text_field("end_user_id", end_user_id, FIELD_LENGTH_MAX)


def check_authorize(request: AuthorizeInput) -> None:
    """Raise Problem for input that no policy could make sense of."""
    a = request.attribution
    if a.request_id and not REQUEST_ID_PATTERN.match(a.request_id):
        raise Problem("invalid_metadata", "request_id must be 1-128 characters of [A-Za-z0-9._:/=+@-]", "request_id")
    for name in _ATTRIBUTION_FIELDS:
        _text_field(name, getattr(a, name), FIELD_LENGTH_MAX)
    if len(a.tags) > TAGS_MAX:
        raise Problem("invalid_metadata", f"at most {TAGS_MAX} tags", "tags")
    for key, value in a.tags.items():
        _text_field("tag name", key, TAG_KEY_LENGTH_MAX)
        _text_field(f"tag {key}", value, TAG_VALUE_LENGTH_MAX)
    _text_field("user_agent", request.user_agent, USER_AGENT_LENGTH_MAX)
    _text_field("client address", request.client_address, FIELD_LENGTH_MAX)
    if request.thread_budget or request.thread_budget_currency:
        if not 0 < request.thread_budget <= AMOUNT_MAX:
            raise Problem("invalid_request", f"thread_budget must be more than 0 and at most {AMOUNT_MAX} nanos",
                          "thread_budget")
        if not a.thread_id:
            raise Problem("invalid_request", "a thread budget needs the thread it binds (thread_id, x-thread-id)",
                          "thread_budget")
        _text_field("thread_budget currency", request.thread_budget_currency, 8)
    if request.max_charge or request.max_charge_currency:
        if not 0 < request.max_charge <= AMOUNT_MAX:
            raise Problem("invalid_request", f"max_charge must be more than 0 and at most {AMOUNT_MAX} nanos",
                          "max_charge")
        _text_field("max_charge currency", request.max_charge_currency, 8)
    if request.endpoint not in ENDPOINTS:
        raise Problem("unknown_endpoint", "unknown or missing endpoint family", "endpoint")
    if request.stored_response:  # a stored response's id, from a URL path: names no model
        _text_field("stored_response", request.stored_response, STORED_RESPONSE_ID_LENGTH_MAX)
        if not STORED_RESPONSE_ID_PATTERN.match(request.stored_response):
            raise Problem("invalid_request", "a stored response's id is 1-200 characters of [A-Za-z0-9_.-]",
                          "stored_response_id")
        return
    _text_field("conversation", request.conversation, STORED_RESPONSE_ID_LENGTH_MAX)
    if len(request.files) > FILES_PER_REQUEST_MAX:
        raise Problem("invalid_request", f"at most {FILES_PER_REQUEST_MAX} files by id in one request", "file_id")
    for file_id in request.files:
        _text_field("file_id", file_id, STORED_RESPONSE_ID_LENGTH_MAX)
    if request.creates:  # names no model
        if request.creates not in CREATABLE:
            raise Problem("invalid_request", f"creates is one of {', '.join(CREATABLE)}", "creates")
        if request.creates_at and request.creates_at not in CREATED_AT:
            raise Problem("invalid_request", f"creates_at is one of {', '.join(CREATED_AT)}", "creates_at")
        return
    if not request.model and not request.cache_update:  # (a cache's model is policyd's to find: Engine)
        raise Problem("invalid_request", "model is required", "model")
    _text_field("previous_response_id", request.previous_response, STORED_RESPONSE_ID_LENGTH_MAX)
    _text_field("model", request.model, MODEL_NAME_LENGTH_MAX)
    _text_field("service_tier", request.shape.service_tier, SERVICE_TIER_LENGTH_MAX)
    s = request.shape
    for name in ("input_tokens", "prompt_bytes", "message_count", "max_output_tokens", "image_count", "seconds",
                 "choices", "web_searches", "file_searches", "documents", "document_bytes", "document_tokens_max",
                 "least_output_cap"):
        value = getattr(s, name)
        if value < 0 or value > QUANTITY_MAX:
            raise Problem("invalid_request", f"{name} must be between 0 and {QUANTITY_MAX}", name)
    if not 0 <= s.unbounded_web_search_tools <= SEARCH_TOOLS_MAX:
        raise Problem("invalid_request", f"unbounded_web_search_tools must be between 0 and {SEARCH_TOOLS_MAX}",
                      "unbounded_web_search_tools")
    _text_field("image_model", s.image_model, MODEL_NAME_LENGTH_MAX)
    if not 0 <= s.image_generation_calls <= TOOL_CALLS_MAX:
        raise Problem("invalid_request", f"image_generation_calls must be between 0 and {TOOL_CALLS_MAX}",
                      "image_generation_calls")
    if not 0 <= s.partial_images <= PARTIAL_IMAGES_MAX:
        raise Problem("invalid_request", f"partial_images must be between 0 and {PARTIAL_IMAGES_MAX}", "partial_images")
    if not 0 <= s.image_scale <= IMAGE_SCALE_MAX:
        raise Problem("invalid_request", f"image_scale must be between 0 and {IMAGE_SCALE_MAX}", "image_scale")
    if not 0 <= s.containers <= SEARCH_TOOLS_MAX:
        raise Problem("invalid_request", f"containers must be between 0 and {SEARCH_TOOLS_MAX}", "containers")
    _text_field("container_memory", s.container_memory, CONTAINER_MEMORY_LENGTH_MAX)
    _text_field("search_context_size", s.search_context_size, SEARCH_CONTEXT_LENGTH_MAX)
    _text_field("geo", s.geo, SEARCH_CONTEXT_LENGTH_MAX)
    most = ROUTED_FALLBACKS_MAX if s.fallbacks_routed else FALLBACK_MODELS_MAX
    if len(s.fallback_models) > most or not all(s.fallback_models):
        raise Problem("invalid_request", f"fallbacks name at most {most} models", "fallbacks")
    for name in s.fallback_models:
        _text_field("fallbacks", name, MODEL_NAME_LENGTH_MAX)
    _text_field("advisor_model", s.advisor_model, MODEL_NAME_LENGTH_MAX)
    if not 0 <= s.advisor_calls <= TOOL_CALLS_MAX or not 0 <= s.advisor_max_tokens <= QUANTITY_MAX:
        raise Problem("invalid_request", f"advisor_calls must be between 0 and {TOOL_CALLS_MAX}, advisor_max_tokens "
                      f"between 0 and {QUANTITY_MAX}", "tools")
    if (s.image_generation_calls or s.partial_images) and not (s.image_model or s.image_model_default):
        raise Problem("invalid_request", "image_generation_calls and partial_images need the image_model that makes "
                      "the images", "image_model")


def check_usage(report: UsageReport) -> None:
    if not report.request_id or not REQUEST_ID_PATTERN.match(report.request_id):
        raise Problem("invalid_request", "request_id is required (1-128 characters of [A-Za-z0-9._:/=+@-])", "request_id")
    for name in ("input_tokens", "cached_input_tokens", "cache_write_input_tokens", "output_tokens", "images", "seconds",
                 "requests", "retries", "latency_ms", "web_searches", "audio_input_tokens", "audio_output_tokens",
                 "cache_write_1h_input_tokens", "file_searches", "image_input_tokens", "image_output_tokens",
                 "containers", "maps_groundings", "search_units", "reasoning_output_tokens", "image_generation_calls",
                 "image_generation_input_tokens", "image_generation_cached_input_tokens",
                 "image_generation_image_input_tokens", "image_generation_output_tokens"):
        value = getattr(report, name)
        if value < 0 or value > QUANTITY_MAX:
            raise Problem("invalid_usage", f"{name} must be between 0 and {QUANTITY_MAX}", name)
    if report.reported_cost is not None and not 0 <= report.reported_cost <= AMOUNT_MAX:
        raise Problem("invalid_usage", f"reported_cost must be between 0 and {AMOUNT_MAX} nanos", "reported_cost")
    if not 0 <= report.cache_storage_token_seconds <= TOKEN_SECONDS_MAX:
        raise Problem("invalid_usage", f"cache_storage_token_seconds must be between 0 and {TOKEN_SECONDS_MAX}",
                      "cache_storage_token_seconds")
    if report.cached_input_tokens + report.cache_write_input_tokens + report.audio_input_tokens + \
            report.image_input_tokens > report.input_tokens:
        raise Problem("invalid_usage", "cached_input_tokens + cache_write_input_tokens + audio_input_tokens + "
                      "image_input_tokens cannot exceed input_tokens", "cached_input_tokens")
    if report.cache_write_1h_input_tokens > report.cache_write_input_tokens:
        raise Problem("invalid_usage", "cache_write_1h_input_tokens cannot exceed cache_write_input_tokens",
                      "cache_write_1h_input_tokens")
    if report.audio_output_tokens + report.image_output_tokens + report.reasoning_output_tokens > report.output_tokens:
        raise Problem("invalid_usage", "audio_output_tokens + image_output_tokens + reasoning_output_tokens cannot "
                      "exceed output_tokens", "audio_output_tokens")
    if report.image_generation_cached_input_tokens + report.image_generation_image_input_tokens > \
            report.image_generation_input_tokens:
        raise Problem("invalid_usage", "image_generation_cached_input_tokens + image_generation_image_input_tokens "
                      "cannot exceed image_generation_input_tokens", "image_generation_cached_input_tokens")
    _text_field("service_tier", report.service_tier, SERVICE_TIER_LENGTH_MAX)
    _text_field("search_context_size", report.search_context_size, SEARCH_CONTEXT_LENGTH_MAX)
    if len(report.provider_file_ids) > PROVIDER_FILES_MAX or not all(
            STORED_RESPONSE_ID_PATTERN.match(f) for f in report.provider_file_ids):
        raise Problem("invalid_usage", f"provider_file_ids are at most {PROVIDER_FILES_MAX} ids of 1-200 characters of "
                      "[A-Za-z0-9_.-]", "provider_file_ids")
    for name in ("served_model", "provider", "fallback_reason", "error_class", "provider_account", "reply_model"):
        _text_field(name, getattr(report, name), FIELD_LENGTH_MAX)
    if report.parts:
        _check_parts(report)


def _check_parts(report: UsageReport) -> None:
    """A report's parts (UsagePart): each a part's tokens, the report's token fields 0 or their sums, and no
    tokens of its that parts do not hold (audio, images, reasoning priced apart)."""
    if len(report.parts) > USAGE_PARTS_MAX:
        raise Problem("invalid_usage", f"parts are at most {USAGE_PARTS_MAX}", "parts")
    for part in report.parts:
        for name in PART_TOKEN_FIELDS:
            if not 0 <= getattr(part, name) <= QUANTITY_MAX:
                raise Problem("invalid_usage", f"a part's {name} must be between 0 and {QUANTITY_MAX}", "parts")
        if part.cached_input_tokens + part.cache_write_input_tokens > part.input_tokens \
                or part.cache_write_1h_input_tokens > part.cache_write_input_tokens:
            raise Problem("invalid_usage", "a part's cached_input_tokens + cache_write_input_tokens cannot exceed its "
                          "input_tokens, nor its cache_write_1h_input_tokens its cache_write_input_tokens", "parts")
        _text_field("parts", part.model, MODEL_NAME_LENGTH_MAX)
        _text_field("parts", part.kind, FIELD_LENGTH_MAX)
    for name in PART_TOKEN_FIELDS:
        given = getattr(report, name)
        if given and given != sum(getattr(part, name) for part in report.parts):
            raise Problem("invalid_usage", f"{name} must be 0 or the sum of the parts' (a report with parts has "
                          "their tokens)", name)
    for name in ("audio_input_tokens", "audio_output_tokens", "image_input_tokens", "image_output_tokens",
                 "reasoning_output_tokens"):
        if getattr(report, name):
            raise Problem("invalid_usage", f"{name} cannot be given with parts (a part holds text tokens)", name)
