"""The decision pipeline's own types: what servicers translate protos into and out of."""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from typing import Any

ENDPOINTS = (
    "chat_completions",
    "responses",
    "embeddings",
    "images",
    "anthropic_messages",
    "gemini_generate_content",
    "completions",
    "audio_speech",
    "audio_transcriptions",
    "moderations",
    "bedrock_converse",
    "rerank",
    "cohere_chat",
    "videos",
    "cached_contents",
)


_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}(-.*)?$")


def trace_id_from(traceparent: str) -> str:
    """The trace id of a W3C traceparent ("00-<32 hex trace id>-<16 hex parent id>-<flags>"), or ""."""
    match = _TRACEPARENT.match(traceparent)
    return match.group(1) if match and match.group(1) != "0" * 32 else ""


@dataclass(frozen=True)
class Attribution:
    request_id: str = ""
    trace_id: str = ""
    traceparent: str = ""
    customer_id: str = ""
    workspace_id: str = ""
    project_id: str = ""
    end_user_id: str = ""
    agent_id: str = ""
    thread_id: str = ""
    feature: str = ""
    route: str = ""
    environment: str = ""
    tags: dict[str, str] = field(default_factory=dict)


# what a free call may make for a customer, whose it then is: OpenAI's conversations (POST /v1/conversations)
# and files (POST /v1/files)
# a Gemini upload as policyd knows it (http_api.gemini_upload_key: "gu-" and a digest of its upload id); its bytes
# may come with no key (Google's SDK sends none: the upload id stands for the customer who began it)
GEMINI_UPLOAD_PREFIX = "gu-"


def gemini_upload_named(request: "AuthorizeInput") -> str:
    """The Gemini upload whose bytes a request sends (its one file, a "gu-" name), "" for any other request."""
    upload = request.files[0] if request.creates == "file" and request.creates_at == "google" and \
        len(request.files) == 1 else ""
    return upload if upload.startswith(GEMINI_UPLOAD_PREFIX) else ""


# an explicit cache's name as policyd knows it (Gemini's cachedContents/<id>; Vertex AI's, under its project and
# location, is known by the same last two parts)
CACHED_CONTENT_PREFIX = "cachedContents/"
_CACHED_CONTENT_NAME = re.compile(r"(^|/)cachedContents/(?P<id>[A-Za-z0-9_.-]{1,200})$")


def cached_content_name(named: Any) -> str:
    """An explicit cache's name as policyd knows it ("cachedContents/<id>"), from the Gemini API's name or Vertex
    AI's ("projects/P/locations/L/cachedContents/<id>"); "" when it names none."""
    found = _CACHED_CONTENT_NAME.search(named) if isinstance(named, str) else None
    return CACHED_CONTENT_PREFIX + found["id"] if found else ""

CREATABLE = ("conversation", "file")
# ... the providers it may be made at (AuthorizeInput.creates_at; "" = openai; google: a Gemini upload; anthropic: a
# file of Anthropic's Files API)
CREATED_AT = ("openai", "azure", "google", "anthropic")
# where each API reads a request's output cap, the field a proxy writes policyd's into first (Gemini's is
# in its generation config, under either of its names)
OUTPUT_CAP_FIELDS = {"chat_completions": ("max_completion_tokens", "max_tokens"), "completions": ("max_tokens",),
                     "responses": ("max_output_tokens",), "anthropic_messages": ("max_tokens",),
                     "gemini_generate_content": ("generationConfig.maxOutputTokens",),
                     "bedrock_converse": ("inferenceConfig.maxTokens",), "cohere_chat": ("max_tokens",)}
BEDROCK_LATENCY_OPTIMIZED = "latency_optimized"  # the tier of Bedrock's performanceConfig.latency: optimized


def bedrock_tier(service_tier: object, latency: object = "") -> str:
    """The price table's tier of a Bedrock request or reply, as its body or headers name it: its service tier
    (flex, priority, reserved; default is none), or BEDROCK_LATENCY_OPTIMIZED where its latency is optimized."""
    if latency == "optimized":
        return BEDROCK_LATENCY_OPTIMIZED
    tier = service_tier.strip()[:32] if isinstance(service_tier, str) else ""
    return "" if tier in ("default", "standard") else tier
FILES_PER_REQUEST_MAX = 64  # file ids a request's input may refer to (each checked: whose it is)

@dataclass(frozen=True)
class Shape:
    input_tokens: int = 0
    prompt_bytes: int = 0
    message_count: int = 0
    max_output_tokens: int = 0
    image_count: int = 0
    seconds: int = 0
    stream: bool = False
    choices: int = 0  # completions the provider generates (n / best_of / candidateCount), each up to the cap; 0 = 1
    web_searches: int = 0  # the most server-side web searches the request allows (reserved at their price)
    service_tier: str = ""  # the processing tier asked for (OpenAI's flex, priority); "" = default
    # the tier is the provider's default, not asked for (Anthropic serves at priority when it can): held at
    # its prices where the table has them, never refused for want of them
    service_tier_implied: bool = False
    # the geography the request runs in by its endpoint, which its reply does not say (Vertex AI's regional and
    # multi-region endpoints for Claude: REGIONAL_GEO): held and charged at the tier of it (tier_in_geo) where the
    # model prices one, else as it is, never refused
    geo: str = ""
    unseen_input: bool = False  # input the request only refers to (a previous response, a file, an image URL...)
    audio_bytes: int = 0  # the audio sent, when its seconds are not known (speech to text)
    # the longest cache the input may be written to: the short write, "5m" (Anthropic's cache_control,
    # OpenAI's 30 minutes), or the long one, "1h" (Anthropic's hour, OpenAI's 12 hours); "" = none
    cache_write: str = ""
    audio_output: bool = False  # the reply may be spoken (modalities include "audio"): output at the audio price
    file_searches: int = 0  # the most file searches the request allows (reserved at their price)
    # search tools the provider runs that the request gives no bound for: each is bounded at the plan's
    # default_max_tool_calls, reserved so, and the bound set in the request (Decision.max_tool_calls)
    unbounded_web_search_tools: int = 0  # Anthropic: web search tools without max_uses; Responses: 1 without max_tool_calls
    unbounded_file_search: bool = False  # a file_search tool without max_tool_calls (the Responses API)
    # The Responses API's image_generation tool: its images are billed at the image model's own prices,
    # apart from the response's usage. `image_generation_calls`: the most calls the request allows
    # (max_tool_calls); 0 with an image model = no bound given: the plan's default_max_tool_calls, set in
    # the request. `partial_images`: the partial images each streamed call sends (billed as output too).
    image_model: str = ""
    image_generation_calls: int = 0
    partial_images: int = 0
    image_model_default: bool = False  # the tool names no model: the plan's image_generation_model, set in the request
    # hosted containers the request may have the provider create (a code_interpreter tool with an "auto"
    # container, a shell tool in a "container_auto" environment): how many, and the largest memory limit
    containers: int = 0
    container_memory: str = ""
    # other models the provider may run for it, and bill (RequestShape): Anthropic's server-side fallbacks,
    # each held for the whole request again; its advisor tool's model, held for advisor_calls calls (0: none
    # given, the plan's default_max_tool_calls, set as the tool's max_uses) each reading the input and the output
    # cap and writing up to advisor_max_tokens (0: the advisor model's output cap)
    fallback_models: tuple[str, ...] = ()
    advisor_model: str = ""
    advisor_calls: int = 0
    advisor_max_tokens: int = 0
    # the fallbacks are a router's (OpenRouter's `models`): tried in turn until one serves, and the model that
    # served alone is billed; so the hold is the dearest of the request on each, not their sum
    fallbacks_routed: bool = False
    # the field the request named its fallbacks in, where not its endpoint's own (a router's `models`, Anthropic's
    # `fallbacks`): a gateway of LiteLLM's kind's `fallbacks` beside a chat completion: what a refusal names
    fallbacks_param: str = ""
    # how many of a model's most per image (output_tokens_per_image) one image may bill: its area over the
    # standard sizes' largest (1536x1024), times a GIF's frames; 0 = 1 (images, the image_generation tool)
    image_scale: int = 0
    maps_grounding: bool = False  # Gemini's googleMaps tool: a grounded prompt may be billed (per_maps_grounding)
    output_cap_fixed: bool = False  # no cap can be written into the request (a compaction): never fitted
    # the field the client gave its output cap in, where not its API's first (a chat completion's max_tokens
    # alone): what a refusal of the request's cost names, so the client is pointed at its own field
    output_cap_param: str = ""
    # a rerank: the documents to rank, their bytes together, and the most tokens the provider reads of each
    # (Cohere's max_tokens_per_doc; 0 = no bound): a model priced per search unit is held at the most they may be
    documents: int = 0
    document_bytes: int = 0
    document_tokens_max: int = 0
    # the least output cap the provider accepts for the request (Anthropic's max_tokens must pass its extended
    # thinking's budget_tokens): a cap fitted to the wallet is never below it (0 = none)
    least_output_cap: int = 0
    # the search context size the request asks its web search for (web_search_options.search_context_size:
    # Perplexity's, OpenAI's search models'): a model priced per_search_context is held at its fee
    search_context_size: str = ""
    # a router's web search (OpenRouter's web plugin, one search; its web_search server tool, as many as the model
    # makes): the most results the request allows (its Exa engine bills each, per_web_result; its native engines
    # each search, held as many as results in web_searches), and for a server tool given no max_total_results the
    # results each of its searches returns: the plan's default_max_tool_calls searches held, and their results set
    # in the request as its bound (Decision.max_tool_calls times it)
    web_results: int = 0
    web_results_per_search: int = 0


SEARCH_CONTEXT_LENGTH_MAX = 16  # a search context size's name (Perplexity's and OpenAI's: low, medium, high)
CONTAINER_MEMORY_DEFAULT = "1g"  # OpenAI's, for a container that names no memory_limit
# the processing tier of Anthropic's fast mode (`speed: "fast"`, and a usage's `speed: "fast"`), as the
# price table names it in a model's service_tiers
ANTHROPIC_FAST_MODE = "fast_mode"
IMAGE_SCALE_MAX = 10_000  # the largest image_scale (a request's is held at most so: the provider refuses past it)


REGIONAL_GEO = "regional"  # Vertex AI's endpoints of a region or multi-region (not `global`): Claude's dearer there


def tier_in_geo(tier: str, inference_geo: str) -> str:
    """The tier a request runs on in a geography of its own (Anthropic's `inference_geo: "us"`, priced
    apart): the price table names it "<tier>+<geo>", or "<geo>" on the standard tier; "global" is none."""
    geo = inference_geo.strip().lower()[:16]
    if not geo or geo == "global":
        return tier
    return f"{tier}+{geo}" if tier else geo


@dataclass(frozen=True)
class AuthorizeInput:
    api_key: str
    endpoint: str  # one of ENDPOINTS, or "" when unknown
    model: str
    attribution: Attribution = field(default_factory=Attribution)
    shape: Shape = field(default_factory=Shape)
    client_address: str = ""
    user_agent: str = ""
    count_tokens: bool = False  # the request only counts tokens: free, nothing reserved (Engine.admit_token_count)
    stored_response: str = ""  # the request reads or deletes this stored response (free: Engine.admit_stored_response)
    deletes_stored: bool = False  # ... deletes it (the gateway's DELETE): one policyd waits for is asked for first
    previous_response: str = ""  # the stored response a Responses API request continues (previous_response_id)
    creates: str = ""  # a free call that makes something for the customer (CREATABLE): its id remembered from the reply
    creates_at: str = ""  # ... at this provider ("": openai; azure: an Azure OpenAI client's file or conversation)
    files: tuple[str, ...] = ()  # the files (by id) the request's input refers to: the customer's own, or unknown
    conversation: str = ""  # the conversation a Responses API request adds to (its `conversation`)
    # the request is on its way to the provider, which bills it: a reservation nobody closes is held one TTL
    # past its deadline and then charged as held instead of released (Engine.expire_due)
    charge_held_on_expiry: bool = False
    # unique to the client's request (not to a proxy's retries of its Authorize): another request naming the
    # same request id while this one is in flight is refused (request_in_progress)
    call_token: str = ""
    # a batch (OpenAI's Batch API): each of its requests as it would be sent alone, held at the sum of their
    # worst cases (policyd/batches.py); `shape` is then what the checks of the whole batch read
    batch: tuple[Shape, ...] = ()
    # an explicit cache's time to live changed (endpoint cached_contents, previous_response its name): its
    # tokens, and the seconds of its life charged so far, as policyd remembers them (Engine._cache_update)
    cache_tokens: int = 0
    cache_kept_seconds: int = 0
    # a budget its caller sets on its thread (nanos; 0: none), in this currency ("": the policy's): a limit of the
    # thread's total charge beside the plan's (key_limits.with_thread_budget)
    thread_budget: int = 0
    thread_budget_currency: str = ""
    # the most this request may hold, as its caller bounds it (nanos; 0: none), beside the plan's
    # max_request_charge (the lower binds); in this currency ("": the policy's)
    max_charge: int = 0
    max_charge_currency: str = ""

    @property
    def cache_update(self) -> bool:
        return self.endpoint == "cached_contents" and bool(self.previous_response)


@dataclass(frozen=True)
class Owner:
    customer_id: str = ""
    workspace_id: str = ""
    project_id: str = ""
    team_id: str = ""
    api_key_id: str = ""
    environment: str = ""
    plan: str = ""


@dataclass(frozen=True)
class RateLimit:
    """What the tightest of a request's limits of one unit leaves once the request is held there."""

    unit: str  # requests | tokens | money (a budget, in nanos) | thread_budget (a caller's budget of its thread, in nanos)
    limit: int
    remaining: int
    resets_ms: int  # when its window ends (0: a total, never)


@dataclass(frozen=True)
class Decision:
    decision: str  # allow | deny | downgrade
    request_id: str
    reason: str = ""
    message: str = ""
    http_status: int = 200
    error_type: str = ""
    error_param: str = ""
    retry_after_seconds: int = 0
    owner: Owner = field(default_factory=Owner)
    requested_model: str = ""
    served_model: str = ""
    upstream_model: str = ""  # the served model as the provider names it (its upstream_model, else its name)
    # where a chat completion's output cap goes for the served model's provider ("" = max_completion_tokens)
    output_cap_field: str = ""
    stream_usage_reported: bool = False  # the provider reports a stream's usage unasked, and refuses stream_options
    provider: str = ""
    route: str = ""
    policy_version: int = 0
    price_table_version: str = ""
    currency: str = ""
    reserved: int = 0
    max_output_tokens: int = 0
    reservation_expires_ms: int = 0
    shadow_denials: tuple[str, ...] = ()
    account: str = ""  # the provider account to serve it on ("" = any of the provider's): a stored response's
    rate_limits: tuple[RateLimit, ...] = ()  # allowed: the tightest request and token limit (rate-limit headers)
    # > 0: the bound the reservation covers for the request's unbounded search tools, which the proxy sets in
    # the request (the Responses API's max_tool_calls; max_uses of each Anthropic web search tool without one)
    max_tool_calls: int = 0
    # an image model the request is to name in its image_generation tool, as the provider names it (the plan's,
    # for a tool naming none; or the tool's own, when the price table knows it by another name)
    image_model: str = ""
    # the models the request is to name in its fallbacks and its advisor tool, as the provider names them, where the
    # price table knows one by another name (else none: sent as they are)
    fallback_models: tuple[str, ...] = ()
    advisor_model: str = ""

    @property
    def allowed(self) -> bool:
        return self.decision != "deny"


# the image_generation tool's usage, as UsageReport, the reader's Tokens and the native Usage name it
IMAGE_GENERATION_USAGE = ("image_generation_calls", "image_generation_input_tokens", "image_generation_cached_input_tokens",
                          "image_generation_image_input_tokens", "image_generation_output_tokens")


FALLBACK_MODELS_MAX = 3  # Anthropic's server-side fallbacks a request may name
ROUTED_FALLBACKS_MAX = 10  # a router's fallback models (`models`) a request may name: policyd's bound

# the token fields a UsagePart holds, which a report with parts has as their sums
PART_TOKEN_FIELDS = ("input_tokens", "cached_input_tokens", "cache_write_input_tokens", "cache_write_1h_input_tokens",
                     "output_tokens")
USAGE_PARTS_MAX = 64


@dataclass(frozen=True)
class UsagePart:
    """One part of a reply the provider bills by itself: Anthropic's usage.iterations entry (a sampling, a
    compaction, an advisor tool's call, a server-side fallback's attempt), at the prices of the model that ran
    it ("": the model served) and a long-context tier by its own input."""
    kind: str = ""
    model: str = ""
    input_tokens: int = 0  # all of its input, cached included
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    cache_write_1h_input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class UsageReport:
    request_id: str
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0
    seconds: int = 0
    requests: int = 0
    web_searches: int = 0  # server-side web searches the provider ran (Anthropic's server tool, OpenAI's web_search_call)
    file_searches: int = 0  # file searches the provider ran (the Responses API's file_search tool), priced per call
    audio_input_tokens: int = 0  # the part of input_tokens that was audio (uncached), priced as audio
    audio_output_tokens: int = 0  # the part of output_tokens that was audio
    image_input_tokens: int = 0  # the part of input_tokens that was images (uncached), where priced apart (gpt-image-1)
    image_output_tokens: int = 0  # the part of output_tokens that was images, where priced apart (Gemini's image models)
    containers: int = 0  # hosted containers the response ran code in (code_interpreter, shell), priced each
    maps_groundings: int = 0  # prompts grounded with Google Maps (Gemini's googleMaps tool), priced each
    search_units: int = 0  # a rerank's search units (Cohere's billed_units), priced each (per_search_unit)
    # the search context size its web search ran with (Perplexity's usage.search_context_size): a fee by it
    # (per_search_context); "" = as the request asked, else the price table's default
    search_context_size: str = ""
    reasoning_output_tokens: int = 0  # the part of output_tokens that was reasoning billed apart (Perplexity's)
    # an explicit cache's tokens x the seconds it is set to live (Gemini's cachedContents), at cache_storage
    cache_storage_token_seconds: int = 0
    cache_write_1h_input_tokens: int = 0  # the part of cache_write_input_tokens of the long write (1h; OpenAI's 12h)
    service_tier: str = ""  # the provider's processing tier that served it (its own token prices)
    # the image_generation tool's own usage (the Responses API's tool_usage.image_gen), priced at the
    # reserved image model's prices: its calls, its input (of which cached, of which images uncached), output
    image_generation_calls: int = 0
    image_generation_input_tokens: int = 0
    image_generation_cached_input_tokens: int = 0
    image_generation_image_input_tokens: int = 0
    image_generation_output_tokens: int = 0
    served_model: str = ""
    provider: str = ""
    retries: int = 0
    fallback_reason: str = ""
    upstream_status: int = 0
    error_class: str = ""
    latency_ms: int = 0
    stream_interrupted: bool = False
    provider_account: str = ""
    provider_response_id: str = ""  # the id of a response the provider stored (the Responses API's)
    provider_file_ids: tuple[str, ...] = ()  # files the reply made at the provider (a Veo operation's videos)
    reply_model: str = ""  # the model the provider's reply names: priced as it when the table does and it differs
    parts: tuple[UsagePart, ...] = ()  # the parts it bills by themselves (their sums are the token fields)
    # what the provider's reply says it charged (OpenRouter's usage.cost), nanos; None: nothing said. The request's
    # cost on a model priced reported_cost
    reported_cost: int | None = None
    reported_cost_currency: str = ""  # the currency a native caller gave it in ("": the request's)


@dataclass(frozen=True)
class Settlement:
    outcome: str  # settled | exists | settled_late
    request_id: str
    cost: int
    charge: int
    balance_before: int
    balance_after: int
    currency: str
    price_table_version: str
    served_model: str


@dataclass(frozen=True)
class ReleaseResult:
    outcome: str  # released | already_released | already_expired
    request_id: str
    released: int


class PolicydError(Exception):
    """A call that cannot be carried out; `reason` is the machine reason, `status` the gRPC code name."""

    def __init__(self, status: str, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class LimitState:
    """One limit's current window, as a key's holder may see it."""

    name: str
    scope: str
    window: str
    unit: str
    limit: int  # nanos for money
    used: int
    resets_unix: int  # the window's end, unix seconds; 0 for total


@dataclass(frozen=True)
class KeySummary:
    """What a key may still spend: its wallet (None: the plan draws on none) and its limits."""

    key_id: str
    customer_id: str
    plan: str
    currency: str
    balance: int | None
    reserved: int
    limits: tuple[LimitState, ...]
    models: tuple[tuple[str, str], ...] = ()  # (model, provider) pairs the key may use
    end_user_id: str = ""  # the end user asked about ("": none)
    end_user_paused: bool = False  # that end user paused by the operator: its requests refused (end_user_paused)


@dataclass(frozen=True)
class RequestSummary:
    """One request as its customer may see it (policyd/request_lookup.py): money in nanos of `currency`."""

    request_id: str
    created_ms: int
    status: str  # in_progress | settled | released | expired | denied | unmetered
    decision: str
    reason: str
    message: str
    endpoint: str
    requested_model: str
    served_model: str
    api_key_id: str
    currency: str
    charge: int
    held: int
    refunded: int
    balance_after: int | None  # None: no prepaid wallet paid it (postpaid, or not charged yet)
    usage: dict[str, Any]  # Settle's Usage fields, as charged
    usage_estimated: bool
    error_class: str
    feature: str
    thread_id: str
    end_user_id: str
    agent_id: str
    tags: dict[str, str]
