"""The declared policy: price table, plans, model allowlists and limits.

Loaded from YAML strictly: unknown fields are rejected, every error names the
file and line, and references (plans, models) are checked before anything is
applied. A policy is applied whole or not at all; each applied policy gets a
version that is stamped on every decision.
"""

from __future__ import annotations

import difflib
from decimal import Decimal
import fnmatch
import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, field_validator, model_validator

from policyd.domain import ENDPOINTS, SEARCH_CONTEXT_LENGTH_MAX
from policyd.money import MONEY_UNITS, QUANTITY_MAX, MoneyError, format_amount, parse_amount

ENVIRONMENTS = ("development", "staging", "production", "batch", "evaluation", "customer-facing")
ENDPOINT_NAMES = ENDPOINTS
POLICY_BYTES_MAX = 1_000_000
LIMITS_PER_PLAN_MAX = 32
LIMIT_MODELS_MAX = 8  # the model patterns one limit names
# a request tag's name, as a limit of scope tag, a report's dimension (tag:<name>) and a reset name it
TAG_NAME_PATTERN = r"[A-Za-z0-9_.-]{1,64}"
TAG_SCOPE_PREFIX = "tag:"  # a tag limit's scope key, "tag:<name>" (Limit.scope_key): its ids' entry, its records' value
LIMIT_TAG_VALUES_MAX = 64  # the values of its tag a limit of scope tag binds
LIMIT_NAME_LENGTH_MAX = 320
BALANCE_ALERTS_MAX = 8


class PolicyError(ValueError):
    """A policy that cannot be applied; `str()` names the file and line."""


CONTAINER_MEMORY_LENGTH_MAX = 16


def _named_amounts(value: Any, what: str, length_max: int, example: str, lowercase: bool = False) -> Any:
    """Amounts by name (a container's memory limit, a search context size), each name 1-`length_max`
    characters (lowercase where told), each amount in nanos."""
    if not isinstance(value, dict):
        return value
    for name in value:
        if not isinstance(name, str) or not 0 < len(name) <= length_max or (
                lowercase and name != name.strip().lower()):
            raise ValueError(f"{what} of 1-{length_max}{' lowercase' if lowercase else ''} characters, like {example}")
    return {name: _nanos(amount) for name, amount in value.items()}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _nanos(value: Any) -> int:
    try:
        nanos = parse_amount(value)
    except MoneyError as error:
        raise ValueError(str(error)) from None
    if nanos < 0:
        raise ValueError("a price or amount must not be negative")
    return nanos


# the prices written as amounts
_AMOUNTS = ("input", "cached_input", "cache_write_input", "cache_write_1h_input", "output", "per_image", "per_request",
            "per_second", "per_web_search", "per_web_result", "per_file_search", "per_maps_grounding",
            "per_search_unit", "audio_input", "audio_output", "image_input", "image_output", "reasoning_output",
            "cache_storage")


# Processing tiers (OpenAI's service_tier, Anthropic's, and Anthropic's fast mode, `speed: "fast"`): the
# standard tier is a model's own prices; OpenAI renamed its "priority" tier "fast" and takes either name.
# Anthropic's fast mode is a tier of its own name, ANTHROPIC_FAST_MODE (its priority tier is another thing).
STANDARD_SERVICE_TIERS = frozenset({"", "auto", "default", "standard", "standard_only"})
SERVICE_TIER_ALIASES = {"fast": "priority", "priority": "fast"}


class Prices(_Strict):
    """Prices in nanos: per 1M tokens (input, cached input, output), per image, per request, per second."""

    input: int = 0
    cached_input: int | None = None  # None = same as input
    cache_write_input: int | None = None  # input written to the provider's cache; None = same as input
    # written to be kept long (Anthropic's hour, OpenAI's 12 hours); None = as cache_write_input
    cache_write_1h_input: int | None = None
    output: int = 0
    per_image: int = 0
    per_request: int = 0
    per_second: int = 0
    per_web_search: int = 0  # a web search the provider runs for the request (its server-side tool)
    # what per_web_search is charged for: each search ("search"), or a request that searched at all, once
    # ("request": Gemini 2.x's grounding with Google Search, billed per grounded prompt)
    web_search_unit: Literal["search", "request"] = "search"
    # a result of a router's web search (OpenRouter's web plugin and web_search server tool, Exa's engine: billed
    # per result; its native engines per search, per_web_search): bounds the hold of a model priced as reported
    per_web_result: int = 0
    per_file_search: int = 0  # a file search the provider runs (the Responses API's file_search tool call)
    per_maps_grounding: int = 0  # a prompt grounded with Google Maps (Gemini's googleMaps tool): unpriced = refused
    per_search_unit: int = 0  # a rerank's search unit: a query with up to 100 document chunks (Cohere's, Bedrock's)
    audio_input: int | None = None  # per 1M audio input tokens (gpt-4o-audio, realtime); None = as input
    audio_output: int | None = None  # per 1M audio output tokens; None = as output
    image_input: int | None = None  # per 1M image input tokens (gpt-image-1's edits); None = as input
    image_output: int | None = None  # per 1M image output tokens (Gemini's image models); None = as output
    # per 1M tokens of reasoning a provider bills beside the output, at a price of its own (Perplexity's
    # usage.reasoning_tokens, Sonar Deep Research's: in neither completion_tokens nor total_tokens); None = as output
    reasoning_output: int | None = None
    # per 1M token-hours an explicit cache is kept (Gemini's cachedContents: its tokens for the time it is set
    # to live, beside its tokens written at `input`)
    cache_storage: int = 0
    # A fee a request by the search context size its web search ran with (Perplexity's Sonar models, whose
    # usage says search_context_size; OpenAI's search models): {"low": "0.005", "medium": "0.008", "high":
    # "0.012"}; a request naming none pays `search_context_default`'s, one naming a size not priced the dearest
    per_search_context: dict[str, int] = Field({}, max_length=8)
    search_context_default: str = Field("", max_length=SEARCH_CONTEXT_LENGTH_MAX)
    # a hosted container the provider creates for the request, by its memory limit (OpenAI's code_interpreter
    # and shell tools: {"1g": "0.03", "4g": "0.12", ...}); a request asking for an unpriced one is refused
    per_container: dict[str, int] = Field({}, max_length=16)
    # A long-context tier (Anthropic's and Gemini's): a request whose input passes `long_context_above`
    # tokens (cached and cache writes included) has all its tokens priced at `long_context`'s prices
    long_context_above: int = Field(0, ge=0, le=QUANTITY_MAX)
    long_context: Prices | None = None
    # token prices of a provider's processing tiers (OpenAI's service_tier "flex", "priority"); others: these
    service_tiers: dict[str, Prices] = Field({}, max_length=16)

    @model_validator(mode="after")
    def _tier(self) -> "Prices":
        if (self.long_context is None) != (self.long_context_above == 0):
            raise ValueError("long_context and long_context_above (input tokens) go together")
        if self.long_context is not None and self.long_context.long_context is not None:
            raise ValueError("a long_context tier has no tier of its own")
        if bool(self.per_search_context) != bool(self.search_context_default) or (
                self.per_search_context and self.search_context_default not in self.per_search_context):
            raise ValueError("per_search_context needs search_context_default, one of its sizes (what a request "
                             "naming none is billed)")
        for name, tier in self.service_tiers.items():
            if tier.service_tiers or not 0 < len(name) <= 32:
                raise ValueError(f"service tier {name!r}: a name of 1-32 characters, with no tiers of its own")
        return self

    def tier_prices(self, service_tier: str) -> "Prices | None":
        """A processing tier's prices, by its name or the name it also goes by (OpenAI's "fast", which is
        its "priority"); None when the table does not price it."""
        if not service_tier:
            return None
        found = self.service_tiers.get(service_tier)
        alias = SERVICE_TIER_ALIASES.get(service_tier)
        return found if found is not None or alias is None else self.service_tiers.get(alias)

    def prices_tier(self, service_tier: str) -> bool:
        """Whether a request on this tier can be priced: the standard tier always, any other when priced."""
        return service_tier in STANDARD_SERVICE_TIERS or self.tier_prices(service_tier) is not None

    def for_input(self, input_tokens: int, service_tier: str = "") -> "Prices":
        """The token prices of a request with this many input tokens on this processing tier: the service
        tier's (when priced), then the long-context tier's past its threshold."""
        prices = self.tier_prices(service_tier) or self
        if prices.long_context is not None and input_tokens > prices.long_context_above:
            return prices.long_context
        return prices

    @field_validator(*_AMOUNTS, mode="before")
    @classmethod
    def _money(cls, value: Any) -> Any:
        return None if value is None else _nanos(value)

    @field_serializer(*_AMOUNTS)
    def _render(self, value: int | None) -> str | None:
        return None if value is None else format_amount(value)

    @field_validator("per_container", mode="before")
    @classmethod
    def _container_prices(cls, value: Any) -> Any:
        return _named_amounts(value, "per_container: a memory limit", CONTAINER_MEMORY_LENGTH_MAX, "1g")

    @field_validator("per_search_context", mode="before")
    @classmethod
    def _search_context_fees(cls, value: Any) -> Any:
        return _named_amounts(value, "per_search_context: a size", SEARCH_CONTEXT_LENGTH_MAX, "low", lowercase=True)

    @field_serializer("per_container", "per_search_context")
    def _render_named_amounts(self, value: dict[str, int]) -> dict[str, str]:
        return {name: format_amount(amount) for name, amount in value.items()}

    def search_context_fee(self, size: str) -> int:
        """The fee of a request whose web search ran with this search context size: its price; the default
        size's for a request naming none; the dearest for a size the table does not price (never less than
        the provider may bill)."""
        fees = self.per_search_context
        if not fees:
            return 0
        return fees.get(size or self.search_context_default, max(fees.values()))

    @property
    def cached_input_price(self) -> int:
        return self.input if self.cached_input is None else self.cached_input

    @property
    def cache_write_input_price(self) -> int:
        return self.input if self.cache_write_input is None else self.cache_write_input

    @property
    def cache_write_1h_input_price(self) -> int:
        return self.cache_write_input_price if self.cache_write_1h_input is None else self.cache_write_1h_input

    @property
    def audio_input_price(self) -> int:
        return self.input if self.audio_input is None else self.audio_input

    @property
    def audio_output_price(self) -> int:
        return self.output if self.audio_output is None else self.audio_output

    @property
    def image_input_price(self) -> int:
        return self.input if self.image_input is None else self.image_input

    @property
    def image_output_price(self) -> int:
        return self.output if self.image_output is None else self.image_output

    @property
    def reasoning_output_price(self) -> int:
        return self.output if self.reasoning_output is None else self.reasoning_output

    @property
    def prices_cache_writes(self) -> bool:
        """Whether a cache write may cost other than input here (a write price, or tiers that may have one)."""
        return self.cache_write_input is not None or self.cache_write_1h_input is not None \
            or self.long_context is not None or bool(self.service_tiers)

    @property
    def prices_output(self) -> bool:
        """Priced for output tokens. Text to speech so priced is billed by tokens (gpt-4o-mini-tts: its
        text in, its audio out), otherwise by the characters of its input (tts-1)."""
        return self.output > 0 or bool(self.audio_output)


class ModelPrice(Prices):
    """A model of the price table: what the provider charges us, and where it is served."""

    provider: str = Field(min_length=1, max_length=64)
    route: str = Field("", max_length=128)  # upstream cluster; defaults to the provider
    tier: str = Field("", max_length=64)
    # the name the provider knows the model by, when the price table names it otherwise (a name customers
    # see, a dated snapshot, an Azure deployment): requests for this model go upstream with it in their
    # body or path; records, limits and reports keep the table's name ("" = the table's name)
    upstream_model: str = Field("", max_length=256, pattern=r"^[^\s]*$")
    # where a chat completion's output cap goes for the model's provider: OpenAI's max_completion_tokens, or
    # max_tokens for OpenAI-compatible providers that read only it (Mistral, DeepSeek, Together, Ollama, ...):
    # a cap in a field the provider ignores bounds nothing, and the reservation would not hold
    output_cap_field: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    # the provider reports what it charged for each request in its reply (a router's: OpenRouter's usage.cost, whose
    # routes to one model are priced apart): that is the request's cost, not its tokens at these prices, which
    # bound its hold (give the dearest route's) and price a reply that reports none (marked cost_not_reported)
    reported_cost: bool = False
    # how a stream's usage comes from the model's provider: "asked" (OpenAI's: only with
    # stream_options.include_usage, which policyd then sets), or "reported" (Mistral's: always, in the last
    # chunk, and the provider refuses stream_options: policyd sets none and takes the client's out)
    stream_usage: Literal["asked", "reported"] = "asked"
    # the most input tokens one request can carry (0 = not given): bounds a strict plan's reservation,
    # and is the bound of input a request only refers to (a previous response, a file, an image URL)
    context_window: int = Field(0, ge=0, le=QUANTITY_MAX)
    # the output cap of a request that gives none, instead of the plan's (0 = the plan's): a reasoning
    # model spends its hidden reasoning from the same cap, and a small one leaves it nothing to answer with
    default_max_output_tokens: int = Field(0, ge=0, le=1_000_000)
    # the most output tokens one image bills, for image models priced by tokens (gpt-image-1: 6240, a
    # high-quality 1024x1536): an images request reserves this many a requested image
    output_tokens_per_image: int = Field(0, ge=0, le=1_000_000)
    # the most output tokens the model makes in one reply (0 = not given): a client's larger cap is refused
    # or cut by the provider, so no more is reserved; the cap policyd gives itself is no larger either
    max_output_tokens: int = Field(0, ge=0, le=QUANTITY_MAX)
    # the longest audio the model takes in one request, in seconds (0 = not given): bounds a strict plan's
    # reservation for speech to text in a compressed format, whose bytes alone bound it loosely
    max_audio_seconds: int = Field(0, ge=0, le=QUANTITY_MAX)
    # how fast the model makes output, in tokens a second (0 = not given), for a reply that ends before
    # the provider reported its usage (a stream cut, a client gone): a reasoning model thinks without
    # showing anything and bills that thinking, so such a request is charged at least this many output
    # tokens a second from its authorization to its end (at most its cap), not only the text it showed
    output_tokens_per_second: int = Field(0, ge=0, le=1_000_000)
    # the web searches a chat completion on the model is held for, the model searching as it will, bounded by no
    # request field (Perplexity's Sonar Deep Research: tens a request, billed per_web_search each); 0 = none
    searches_held: int = Field(0, ge=0, le=10_000)

    @property
    def upstream(self) -> str:
        return self.route or self.provider


def is_model_pattern(name: str) -> bool:
    """A price table entry that prices every model its glob matches ("ft:gpt-4o-mini-2024-07-18:*": every
    fine-tune of a base model, whose names a provider makes as customers train them)."""
    return any(c in name for c in "*?[")


class PriceTable(_Strict):
    version: str = Field(min_length=1, max_length=64)
    models: dict[str, ModelPrice] = Field(min_length=1)

    @model_validator(mode="after")
    def _patterns(self) -> "PriceTable":
        for name, price in self.models.items():
            if is_model_pattern(name) and price.upstream_model:
                raise ValueError(f"model {name!r}: a pattern prices many models, each sent by its own name: it takes "
                                 "no upstream_model")
        return self


@functools.lru_cache(maxsize=256)
def time_zone(name: str) -> ZoneInfo:
    """An IANA time zone ("Europe/Paris"); ValueError for a name the time zone database does not hold."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'Europe/Paris')") from None


def _time_zone_name(value: str) -> str:
    if value:
        time_zone(value)
    return value


class Limit(_Strict):
    # a key's or owner's limit on some models is named for them (key_limits._limit): longer than a plan's need be
    name: str = Field("", max_length=LIMIT_NAME_LENGTH_MAX)
    # each counted within one customer: a limit of a plan binds each of its customers apart
    scope: Literal["key", "customer", "workspace", "project", "team", "feature", "model", "thread", "end_user", "tag"]
    # scope tag: the request tag (x-policyd-tag-<name>, Attribution.tags) each value of which counts apart (a cost
    # center, a product, a tenant of the customer's own), and the values it binds (() = every value); a request
    # without that tag, or with a value not listed, is not bound
    tag: str = Field("", pattern=rf"^(?:{TAG_NAME_PATTERN})?$")
    tag_values: tuple[str, ...] = Field((), max_length=LIMIT_TAG_VALUES_MAX)
    window: Literal["minute", "hour", "day", "month", "total"]
    # days and months from local midnight in this IANA time zone ("" = UTC); the policy's `timezone` by default
    timezone: str = Field("", max_length=64)
    # money: what customers are charged; cost: what the provider bills (before markup, discount or promo)
    unit: Literal["money", "cost", "tokens", "requests"]
    limit: int
    action: Literal["block", "downgrade", "shadow"] = "block"
    downgrade_to: str = ""
    thresholds: tuple[int, ...] = (50, 80)  # percent; an alert event once per crossing
    # only requests served on these models count: exact names, globs or tiers ("tier:premium"); () = every request.
    # A limit on some models counts in a bucket of its own (quotas.hold_for), beside the scope's other limits.
    models: tuple[str, ...] = Field((), max_length=LIMIT_MODELS_MAX)
    # a key's or owner's: binds until then (unix ms; 0: for good), a budget raised for a while, then the plan's again
    # (key_limits.effective)
    until_unix_ms: int = Field(0, ge=0)
    # a plan's: what a window leaves unused is carried into the next (its bucket starts below zero: rollover.py), at
    # most `rollover_max` (0: one window's limit), so a team that spends 60 of 100 this month may spend 140 the next
    rollover: bool = False
    rollover_max: int = 0

    def binds(self, model: str, tier: str) -> bool:
        """Whether a request served on this model counts against the limit."""
        return not self.models or _matches(self.models, model, tier)

    @model_validator(mode="before")
    @classmethod
    def _limit_value(cls, data: Any) -> Any:
        if isinstance(data, dict) and "limit" in data:
            data = dict(data)
            for name in ("limit", "rollover_max"):
                if name not in data:
                    continue
                if data.get("unit") in MONEY_UNITS:
                    data[name] = _nanos(data[name])
                elif isinstance(data[name], bool) or not isinstance(data[name], int):
                    raise ValueError(f"{name} must be a whole number for tokens and requests")
        return data

    @model_validator(mode="after")
    def _check(self) -> "Limit":
        if not 0 <= self.limit <= QUANTITY_MAX and self.unit not in MONEY_UNITS:
            raise ValueError("limit out of range")
        if self.action == "downgrade" and not self.downgrade_to:
            raise ValueError("action 'downgrade' needs downgrade_to: a cheaper model")
        if self.action != "downgrade" and self.downgrade_to:
            raise ValueError("downgrade_to is only for action 'downgrade'")
        for t in self.thresholds:
            if not 0 < t <= 100:
                raise ValueError("thresholds are percentages between 1 and 100")
        if self.timezone and self.window not in ("day", "month"):
            raise ValueError("timezone is for day and month windows")
        if self.rollover and self.window not in ("hour", "day", "month"):
            raise ValueError("rollover carries what an hour, a day or a month leaves unused into the next")
        if self.rollover_max and not self.rollover or self.rollover_max < 0:
            raise ValueError("rollover_max bounds what rollover carries (0: one window's limit)")
        if (self.scope == "tag") != bool(self.tag):
            raise ValueError("scope tag names its tag (tag: <name>), and only it does")
        if self.tag_values and not self.tag or not all(0 < len(v) <= 256 for v in self.tag_values):
            raise ValueError("tag_values are values of the limit's tag (1-256 characters each)")
        _time_zone_name(self.timezone)
        return self

    @field_serializer("limit", "rollover_max")
    def _render(self, value: int) -> int | str:
        return format_amount(value) if self.unit in MONEY_UNITS else value

    @property
    def label(self) -> str:
        return self.name or f"{self.scope_key}:{self.unit}:{self.window}"

    @property
    def scope_key(self) -> str:
        """What names its scope's buckets: the scope, a tag limit's "tag:<name>" (quotas.scope_ids' entries)."""
        return TAG_SCOPE_PREFIX + self.tag if self.scope == "tag" else self.scope


class Cap(Limit):
    """The operator's own cap on what all customers together may spend on a provider, on some models, or in
    all, whatever each one's wallet and plan would allow: one counter every request it covers counts in,
    on every replica (a provider's daily bill, a premium model's hourly spend)."""

    scope: Literal["all"] = "all"
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    provider: str = Field("", max_length=64)  # the requests served by this provider ("" = any)
    models: tuple[str, ...] = ()  # ... on these models: exact names, globs or tiers ("tier:premium"); () = any

    def covers(self, model: str, price: "ModelPrice") -> bool:
        return (not self.provider or price.provider == self.provider) and self.binds(model, price.tier)

    @model_validator(mode="after")
    def _no_rollover(self) -> "Cap":
        if self.rollover:
            raise ValueError("a cap carries nothing over (rollover is a plan's limits')")
        return self


class Plan(_Strict):
    extends: str = ""
    models: tuple[str, ...] = ()  # exact names, globs ("gpt-4o*") or tiers ("tier:low-cost")
    endpoints: tuple[str, ...] = ENDPOINT_NAMES
    environments: dict[str, tuple[str, ...]] | None = None  # env -> tiers it may use ("*" = all)
    default_max_output_tokens: int = Field(1024, ge=1, le=1_000_000)
    # the most calls of the search tools a provider runs (web search, file search) when a request gives no
    # bound of its own: set in the request (max_tool_calls, or max_uses) and reserved at their price
    default_max_tool_calls: int = Field(10, ge=1, le=10_000)
    # the image model an image_generation tool that names none is given (written into the request, its images
    # priced at its prices); "" = such a tool is refused: the provider's own default could not be priced
    image_generation_model: str = Field("", max_length=256)
    reservation: Literal["estimate", "strict"] = "estimate"
    billing: Literal["standard", "at_cost", "free"] = "standard"
    markup_bps: int = Field(0, ge=-10_000, le=1_000_000)  # charge = cost * (10000 + markup_bps) / 10000; < 0 = discount
    price_list: dict[str, Prices] = {}  # the plan's own customer prices for some models (instead of cost + markup)
    wallet: Literal["required", "none"] = "required"
    wallet_scope: Literal["customer", "workspace"] = "customer"  # workspace: each workspace has its own wallet
    concurrency: int = Field(0, ge=0, le=100_000)  # in-flight requests per key, 0 = no cap
    critical_features: tuple[str, ...] = ()  # never downgraded: blocked instead
    promo_features: tuple[str, ...] = ()  # charged 0 (billing "promo"); the provider cost is still recorded
    fallbacks: dict[str, tuple[str, ...]] = {}  # model -> models to serve while its provider cools down
    limits: tuple[Limit, ...] = Field((), max_length=LIMITS_PER_PLAN_MAX)
    # a request whose whole output cap the wallet or a limit cannot hold is served with the largest cap they
    # can (written into the request), when that is at least fit_output_cap_min tokens, rather than refused
    fit_output_cap: bool = False
    fit_output_cap_min: int = Field(256, ge=1, le=1_000_000)
    # the most one request may hold (its worst case, what the wallet reserves for it), in the policy's
    # currency; 0 = no bound. Past it: refused (request_too_costly), or its output cap fitted to it
    max_request_charge: int = 0

    @field_validator("max_request_charge", mode="before")
    @classmethod
    def _max_request_charge(cls, value: Any) -> Any:
        return 0 if value in (None, 0, "", "0") else _nanos(value)

    @field_serializer("max_request_charge")
    def _render_max_request_charge(self, value: int) -> str | int:
        return format_amount(value) if value else 0
    # amounts of the wallet's balance (the policy's currency) whose crossing by a charge is an alert: a
    # prepaid customer told to top up before requests are refused (once a crossing: a grant re-arms it)
    balance_alerts: tuple[int, ...] = Field((), max_length=BALANCE_ALERTS_MAX)

    @field_validator("balance_alerts", mode="before")
    @classmethod
    def _balance_alerts(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ValueError("balance_alerts is a list of amounts, such as [\"5.00\", \"1.00\"]")
        amounts = [_nanos(v) for v in value]
        if any(a <= 0 for a in amounts) or len(set(amounts)) != len(amounts):
            raise ValueError("balance_alerts are distinct amounts above 0")
        return tuple(sorted(amounts, reverse=True))

    @field_serializer("balance_alerts")
    def _render_balance_alerts(self, value: tuple[int, ...]) -> list[str]:
        return [format_amount(v) for v in value]

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if name not in ENDPOINT_NAMES:
                raise ValueError(f"unknown endpoint family {name!r} (known: {', '.join(ENDPOINT_NAMES)})")
        return value

    @field_validator("limits")
    @classmethod
    def _unique_labels(cls, value: tuple[Limit, ...]) -> tuple[Limit, ...]:
        labels = [limit.label for limit in value]
        for label in labels:
            if labels.count(label) > 1:
                raise ValueError(f"two limits are named {label!r}: give each a distinct name")
        return value

    @field_validator("environments")
    @classmethod
    def _environments(cls, value: dict[str, tuple[str, ...]] | None) -> dict[str, tuple[str, ...]] | None:
        for env in value or {}:
            if env not in ENVIRONMENTS:
                raise ValueError(f"unknown environment {env!r} (known: {', '.join(ENVIRONMENTS)})")
        return value


class PolicyDocument(_Strict):
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")
    timezone: str = Field("", max_length=64)  # where day and month limits start, unless a limit names its own
    price_table: PriceTable
    plans: dict[str, Plan] = Field(min_length=1)
    caps: tuple[Cap, ...] = Field((), max_length=LIMITS_PER_PLAN_MAX)  # the operator's, across every customer

    @field_validator("timezone")
    @classmethod
    def _time_zone(cls, value: str) -> str:
        return _time_zone_name(value)

    @model_validator(mode="before")
    @classmethod
    def _limits_in_the_policy_time_zone(cls, data: Any) -> Any:
        """Day and month limits that name no time zone start at midnight in the policy's."""
        if not isinstance(data, dict) or not data.get("timezone") or not isinstance(data.get("plans"), dict):
            return data

        def localised(limits: Any) -> Any:
            if not isinstance(limits, list):
                return limits
            return [{**limit, "timezone": data["timezone"]} if isinstance(limit, dict) and not limit.get("timezone")
                    and limit.get("window") in ("day", "month") else limit for limit in limits]

        plans = {name: {**plan, "limits": localised(plan["limits"])} if isinstance(plan, dict) and "limits" in plan
                 else plan for name, plan in data["plans"].items()}
        return {**data, "plans": plans, **({"caps": localised(data["caps"])} if "caps" in data else {})}

    def names_a_model(self, pattern: str) -> bool:
        """Whether a model pattern (an exact name, a glob, a tier) names a model of the price table."""
        if pattern.startswith("tier:"):
            return any(price.tier == pattern[5:] for price in self.price_table.models.values())
        return any(fnmatch.fnmatchcase(m, pattern) for m in self.price_table.models)

    @model_validator(mode="after")
    def _references(self) -> "PolicyDocument":
        for name, plan in self.plans.items():
            named = [limit.downgrade_to for limit in plan.limits if limit.downgrade_to] + \
                [m for model, alternatives in plan.fallbacks.items() for m in (model, *alternatives)] + \
                list(plan.price_list) + ([plan.image_generation_model] if plan.image_generation_model else [])
            for model in named:
                if is_model_pattern(model):
                    raise ValueError(f"plan {name!r}: {model!r} is a pattern: name a model of the price table")
            if plan.extends and plan.extends not in self.plans:
                raise ValueError(f"plan {name!r} extends unknown plan {plan.extends!r}")
            for limit in plan.limits:
                if limit.downgrade_to and limit.downgrade_to not in self.price_table.models:
                    raise ValueError(f"plan {name!r}: downgrade_to {limit.downgrade_to!r} is not in the price table")
                if limit.until_unix_ms:
                    raise ValueError(f"plan {name!r}: limit {limit.label!r}: until_unix_ms is for a key's or an "
                                     "owner's limit (SetKeyLimits, SetOwnerLimits)")
                for pattern in limit.models:
                    if not self.names_a_model(pattern):
                        raise ValueError(f"plan {name!r}: limit {limit.label!r}: model {pattern!r} matches nothing in "
                                         "the price table")
            for model, alternatives in plan.fallbacks.items():
                for name_ in (model, *alternatives):
                    if name_ not in self.price_table.models:
                        raise ValueError(f"plan {name!r}: fallback model {name_!r} is not in the price table")
            for model in plan.price_list:
                if model not in self.price_table.models:
                    raise ValueError(f"plan {name!r}: price_list model {model!r} is not in the price table")
            if plan.image_generation_model and plan.image_generation_model not in self.price_table.models:
                raise ValueError(f"plan {name!r}: image_generation_model {plan.image_generation_model!r} is not in "
                                 "the price table")
            for pattern in plan.models:
                if not pattern.startswith("tier:") and not self.names_a_model(pattern):
                    raise ValueError(f"plan {name!r}: model {pattern!r} matches nothing in the price table")
        names = [cap.name for cap in self.caps]
        plan_labels = {limit.label for plan in self.plans.values() for limit in plan.limits}
        for cap in self.caps:
            if names.count(cap.name) > 1 or cap.name in plan_labels:
                raise ValueError(f"cap {cap.name!r}: another cap or a plan's limit has that name; give each its own")
            if not any(cap.covers(m, price) for m, price in self.price_table.models.items()):
                raise ValueError(f"cap {cap.name!r}: its provider and models match nothing in the price table")
            if cap.downgrade_to and cap.downgrade_to not in self.price_table.models:
                raise ValueError(f"cap {cap.name!r}: downgrade_to {cap.downgrade_to!r} is not in the price table")
            if cap.downgrade_to and is_model_pattern(cap.downgrade_to):
                raise ValueError(f"cap {cap.name!r}: {cap.downgrade_to!r} is a pattern: name a model of the price "
                                 "table")
        return self


MATCHED_NAMES_MAX = 10_000  # model names a policy remembers the pattern entry of (others are matched anew)


def _matches(patterns: tuple[str, ...], model: str, tier: str) -> bool:
    """Whether a model is named by any of these patterns: exact names, globs ("gpt-4o*"), tiers ("tier:premium")."""
    return any((p == f"tier:{tier}" and tier) or (not p.startswith("tier:") and fnmatch.fnmatchcase(model, p))
               for p in patterns)


@dataclass(frozen=True)
class Policy:
    """An applied policy: the document, its version, and the canonical text it was hashed from."""

    version: int
    document: PolicyDocument
    canonical: str
    # the pattern entry each model name not in the table resolved to ("" = none), up to MATCHED_NAMES_MAX names
    _matched: dict[str, str] = field(default_factory=dict, compare=False, repr=False)
    # the price table's pattern entries, the most specific first (the most characters not wildcards)
    _patterns: tuple[str, ...] = field(default=(), init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        models = self.document.price_table.models
        patterns = sorted((name for name in models if is_model_pattern(name)),
                          key=lambda n: (-sum(c not in "*?[]" for c in n), n))
        object.__setattr__(self, "_patterns", tuple(patterns))
        if not patterns:  # every model is its own entry or none: `model` is the table's lookup (the hot path's)
            object.__setattr__(self, "model", models.get)

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.canonical.encode()).hexdigest()

    def plan(self, name: str) -> Plan | None:
        return self.document.plans.get(name)

    def model(self, name: str) -> ModelPrice | None:
        """The price of a model: its own entry, else the most specific pattern entry matching its name (a
        pattern itself names no model)."""
        models = self.document.price_table.models
        price = models.get(name)
        if is_model_pattern(name):
            return None
        if price is not None:
            return price
        pattern = self._matched.get(name)
        if pattern is None:
            pattern = next((p for p in self._patterns if fnmatch.fnmatchcase(name, p)), "")
            if len(self._matched) < MATCHED_NAMES_MAX:
                self._matched[name] = pattern
        return models[pattern] if pattern else None

    def upstream_name(self, name: str) -> str:
        """The name a request for this model carries to the provider: its `upstream_model`, else its own."""
        price = self.model(name)
        return price.upstream_model if price is not None and price.upstream_model else name

    def served_as(self, sent: str, reply_model: str, fallbacks: tuple[str, ...] = ()) -> str:
        """The model a provider's reply names, when that is not `sent` (the model authorized, or the name it
        went upstream with) and the table prices it by that name for the same provider: a provider that
        served another model bills that one. A fallback the request named (`fallbacks`: the provider's to serve
        instead) by any name of it too: its upstream name (which it went upstream with) or a dated snapshot of
        either, unless a name of `sent` is the longer match. Else `sent`: a name the table does not hold (the
        dated snapshot an alias resolved to; a name that is only some entry's upstream_model, which other aliases
        may resolve to as well), or another provider's entry (an Azure deployment's reply naming OpenAI's model)."""
        if not reply_model or reply_model == sent or reply_model == self.upstream_name(sent):
            return sent
        price, sent_price = self.model(reply_model), self.model(sent)
        if price is not None and sent_price is not None and price.provider == sent_price.provider:
            return reply_model
        named = [(len(name), model != sent, model) for model in (sent, *fallbacks)
                 for name in (model, self.upstream_name(model)) if reply_model.startswith(name + "-")
                 or (reply_model == name and model != sent)]
        return max(named)[2] if named else sent

    def part_model(self, served: str, name: str) -> tuple[str, bool]:
        """The model a part of a reply ran on (an Anthropic usage.iterations entry names it) as the table prices
        it, and whether it does: `served` for none, the served model, its upstream name or a dated snapshot of
        either; a model the table holds for the same provider, by its name, as its upstream name, or as a
        dated snapshot of either (the longest such name); else `served`, False (priced at its prices)."""
        upstream = self.upstream_name(served)
        if not name or name in (served, upstream) or name.startswith((served + "-", upstream + "-")):
            return served, True
        served_price = self.model(served)
        provider = served_price.provider if served_price is not None else ""
        matches = [(name == known, len(known), known == model, model)
                   for model, price in self.document.price_table.models.items()
                   if price.provider == provider and not is_model_pattern(model)
                   for known in {model, price.upstream_model} - {""} if name == known or name.startswith(known + "-")]
        if matches:  # its exact name first, then the longest; an entry's own name before an upstream name
            return max(matches, key=lambda m: (m[0], m[1], m[2], m[3]))[3], True
        pattern_price = self.model(name)  # a pattern entry's
        if pattern_price is not None and pattern_price.provider == provider:
            return name, True
        return served, False

    def model_allowed(self, plan: Plan, model: str, scopes: tuple[str, ...] = ()) -> bool:
        price = self.model(model)
        tier = price.tier if price else ""
        return _matches(plan.models, model, tier) and (not scopes or _matches(scopes, model, tier))

    def caps_for(self, model: str) -> list[Cap]:
        """The operator's caps a request served on `model` counts in."""
        price = self.model(model)
        return [cap for cap in self.document.caps if price is not None and cap.covers(model, price)]

    def tier_allowed_in(self, plan: Plan, environment: str, model: str) -> bool:
        if plan.environments is None:
            return True
        tiers = plan.environments.get(environment)
        if tiers is None:
            return False
        price = self.model(model)
        return "*" in tiers or (price is not None and price.tier in tiers)


class _ExactLoader(yaml.SafeLoader):
    """YAML numbers with a fraction (2.50) are read as exact decimals from their text, never as floats."""


_ExactLoader.add_constructor(
    "tag:yaml.org,2002:float",
    lambda loader, node: Decimal(loader.construct_scalar(node).replace("_", "")),
)


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    node = value
                    line = key.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _resolve_extends(raw: dict[str, Any]) -> dict[str, Any]:
    """Plans may extend another plan: its fields are the defaults of the child."""
    plans = raw.get("plans")
    if not isinstance(plans, dict):
        return raw
    resolved: dict[str, Any] = {}

    def resolve(name: str, seen: tuple[str, ...]) -> Any:
        if name in resolved:
            return resolved[name]
        body = plans[name]
        if not isinstance(body, dict) or not body.get("extends"):
            resolved[name] = body
            return body
        parent = body["extends"]
        if parent not in plans:
            resolved[name] = body  # reported by validation with its line
            return body
        if parent in seen:
            raise PolicyError(f"plans extend each other in a cycle: {' -> '.join(seen + (parent,))}")
        merged = {**resolve(parent, seen + (parent,)), **body}
        resolved[name] = merged
        return merged

    for name in plans:
        resolve(name, (name,))
    return {**raw, "plans": resolved}


def parse_policy(text: str, source: str = "policy.yaml") -> PolicyDocument:
    """Parse and validate a policy document; raise PolicyError naming the file and line."""
    if len(text.encode("utf-8", "surrogatepass")) > POLICY_BYTES_MAX:
        raise PolicyError(f"{source}: larger than {POLICY_BYTES_MAX} bytes")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.load(text, Loader=_ExactLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise PolicyError(f"{source}{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}:1: a policy is a mapping with price_table and plans")
    try:
        return PolicyDocument.model_validate(_resolve_extends(raw))
    except ValidationError as error:
        messages = []
        for item in error.errors():
            loc = tuple(item["loc"])
            line = _line_of(root, loc)
            path = ".".join(str(p) for p in loc) or "(document)"
            message = item["msg"].removeprefix("Value error, ")
            messages.append(f"{source}:{line}: {path}: {message}")
        raise PolicyError("\n".join(messages)) from None


def canonical_text(document: PolicyDocument) -> str:
    """A stable rendering (sorted keys, amounts as nanos) used for versions and diffs."""
    data = json.loads(document.model_dump_json())
    if not data["caps"]:  # as policies without caps always read: their versions' digests stay the same
        del data["caps"]
    for plan in data["plans"].values():  # so too plans' limits on every model and for good, as they read before
        for limit in plan["limits"]:
            for name in ("models", "until_unix_ms", "tag", "tag_values"):
                if not limit[name]:
                    del limit[name]
    for limit in [limit for plan in data["plans"].values() for limit in plan["limits"]] + data.get("caps", []):
        if not limit["rollover"]:  # ... and limits carrying nothing over
            del limit["rollover"], limit["rollover_max"]
        for name in ("tag", "tag_values"):  # ... and limits of no tag (a cap's)
            if name in limit and not limit[name]:
                del limit[name]
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False)


def diff(old: str, new: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), "active", "proposed"
        )
    )
