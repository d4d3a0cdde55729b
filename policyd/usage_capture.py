"""Reading actual usage out of provider responses: a JSON body, or the events of an SSE stream.

Chat completions, responses, embeddings, Anthropic messages and Gemini each report usage in
their own shape; a stream reports it in its last events. When a stream is cut, or a provider
sends no usage, what was delivered is counted so the request can still be charged (as an
estimate, marked as such).
"""

from __future__ import annotations

import base64
import json
import re
import urllib.parse
import zlib
from dataclasses import dataclass, fields as dataclass_fields
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from policyd import event_stream
from policyd.domain import (ANTHROPIC_FAST_MODE, SEARCH_CONTEXT_LENGTH_MAX, USAGE_PARTS_MAX, UsagePart, bedrock_tier,
                            cached_content_name, tier_in_geo)
from policyd.json_fields import ObjectFields
from policyd.money import MoneyError, parse_external_amount
from policyd.protobuf_json import timestamp_ms
from policyd.pricing import speech_audio_tokens_likely

RESPONSE_BUFFER_BYTES_MAX = 4 * 1024 * 1024  # a non-streamed body is buffered up to this; past it, read as it passes
# the fields of a non-streamed reply, or of a stream event, that usage is read from, when it is too large
# to hold: OpenAI's, Anthropic's and Gemini's usage, the tier that served it, the Responses API's output
# items (its web searches); an event's type, the response or message it carries
_USAGE_FIELDS = [("usage",), ("usageMetadata",), ("service_tier",), ("type",), ("stop_reason",), ("response", "usage"),
                 ("response", "service_tier"), ("message", "usage"), ("id",), ("response", "id"), ("tool_usage",),
                 ("response", "tool_usage"), ("x_groq", "usage")]
_USAGE_ITEMS = [("output",), ("response", "output")]
# the event that ends a stream, where the provider names one: a client gone after it got everything
_LAST_EVENTS = frozenset({"response.completed", "message_stop", "transcript.text.done", "speech.audio.done",
                          "image_generation.completed", "image_edit.completed", "message-end"})
SSE_LINE_BYTES_MAX = 1024 * 1024  # an SSE line, or an object of a JSON-array stream
_DECODER = json.JSONDecoder()
ESTIMATE_BYTES_PER_TOKEN = 4


@dataclass
class Tokens:
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_input_tokens: int = 0
    output_tokens: int = 0
    web_searches: int = 0  # the provider's server-side searches (priced per search)
    file_searches: int = 0  # ... of files (the Responses API's file_search_call items, priced per call)
    audio_input_tokens: int = 0  # of input_tokens, uncached
    audio_output_tokens: int = 0  # of output_tokens
    image_input_tokens: int = 0  # of input_tokens, uncached (gpt-image-1's input images)
    image_output_tokens: int = 0  # of output_tokens (Gemini's images out)
    containers: int = 0  # hosted containers the response ran code in (code_interpreter_call, shell_call items)
    maps_groundings: int = 0  # a Gemini reply grounded with Google Maps (its groundingChunks' maps): billed once
    search_units: int = 0  # a rerank's search units (Cohere's meta.billed_units)
    search_context_size: str = ""  # the search context its web search ran with (Perplexity's: a fee by its size)
    reasoning_output_tokens: int = 0  # of output_tokens: reasoning billed beside the output (Perplexity's)
    cache_storage_token_seconds: int = 0  # an explicit cache's tokens x the seconds it lives (Gemini's)
    cache_write_1h_input_tokens: int = 0  # of cache_write_input_tokens (Anthropic's hour, OpenAI's 12 hours)
    service_tier: str = ""  # the processing tier that served it, as the provider says (OpenAI's service_tier)
    seconds: int = 0  # audio seconds billed (speech to text priced by the second)
    # the Responses API's image_generation tool: its calls, and its usage as tool_usage.image_gen reports it
    image_generation_calls: int = 0
    image_generation_input_tokens: int = 0
    image_generation_cached_input_tokens: int = 0
    image_generation_image_input_tokens: int = 0  # of image_generation_input_tokens, uncached
    image_generation_output_tokens: int = 0
    reply_model: str = ""  # the model the reply names (its "model", Gemini's modelVersion): the one that served it
    # the parts it bills by themselves (Anthropic's usage.iterations): the token fields above are their sums
    parts: tuple[UsagePart, ...] = ()
    reported_cost: int | None = None  # what the reply says was charged, nanos (OpenRouter's usage.cost)
    # what Anthropic's usage has said of its tier so far (a stream's events say it in parts): service_tier
    _tier: str = ""
    _fast: bool = False  # speed: fast
    _geo: str = ""  # inference_geo
    _stop: str = ""  # Anthropic's stop_reason, as its reply or its stream's message_delta gives it
    # Anthropic's refusal before any output (stop_reason "refusal", nothing written): billed nothing, whatever
    # its input was
    _refused: bool = False

    @property
    def any(self) -> bool:
        return bool(self.input_tokens or self.output_tokens or self.seconds or self.search_units or self._refused)

    def fields(self) -> dict[str, Any]:
        """The usage as UsageReport and the native API's Settle name it (the same names, one to one)."""
        return {f.name: getattr(self, f.name) for f in dataclass_fields(self) if not f.name.startswith("_")}


def _list(value: Any) -> list[Any]:
    """A reply's array, or none: what a provider sent in its place is read as nothing, never fails."""
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _n(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _seconds(value: Any) -> int:
    """Seconds as a provider reports them (3, 9.02, "9.02"), rounded up; 0 when not a duration."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    try:
        seconds = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return 0
    if not seconds.is_finite() or seconds <= 0 or seconds > 10**9:
        return 0
    return int(seconds.to_integral_value(rounding=ROUND_CEILING))


def _speech_to_text_usage(data: dict[str, Any], seen: Tokens) -> bool:
    """A transcription's usage: its audio's seconds (whisper-1: {"type": "duration"}, or verbose_json's
    `duration`), or its tokens (gpt-4o-transcribe: audio and text in, text out)."""
    usage = data.get("usage")
    if isinstance(usage, dict) and usage.get("type") == "duration":
        seen.seconds = _seconds(usage.get("seconds"))
        return True
    if isinstance(usage, dict) and ("input_tokens" in usage or "output_tokens" in usage):
        details = _dict(usage.get("input_token_details"))
        seen.input_tokens = _n(usage.get("input_tokens"))
        seen.audio_input_tokens = min(_n(details.get("audio_tokens")), seen.input_tokens)
        seen.output_tokens = _n(usage.get("output_tokens"))
        return True
    if "duration" in data:
        seen.seconds = _seconds(data.get("duration"))
        return True
    return False


def _maps_grounded(data: dict[str, Any]) -> int:
    """1 when a Gemini reply was grounded with Google Maps (a groundingChunk of a place): billed per prompt."""
    for candidate in _list(data.get("candidates")):
        grounding = candidate.get("groundingMetadata") if isinstance(candidate, dict) else None
        chunks = grounding.get("groundingChunks") if isinstance(grounding, dict) else None
        if isinstance(chunks, list) and any(isinstance(c, dict) and "maps" in c for c in chunks):
            return 1
    return 0


def _grounding_searches(data: dict[str, Any]) -> int:
    """Google searches behind a Gemini reply (grounding with Google Search): each candidate grounded by a
    search counts its `webSearchQueries`, at least one; one grounded by Google Maps alone (places, no
    queries) is not a search. A stream carries them in its last objects: the largest count seen is kept."""
    searches = 0
    for candidate in _list(data.get("candidates")):
        grounding = candidate.get("groundingMetadata") if isinstance(candidate, dict) else None
        if isinstance(grounding, dict) and grounding:
            queries = grounding.get("webSearchQueries")
            chunks = _list(grounding.get("groundingChunks"))
            if not queries and chunks and all(isinstance(c, dict) and "maps" in c for c in chunks):
                continue
            searches += max(len(queries) if isinstance(queries, list) else 0, 1)
    return searches


def _modality(usage: dict[str, Any], details: str, modality: str) -> int:
    """Gemini's tokens of one modality in a list of {modality, tokenCount} (promptTokensDetails, ...)."""
    parts = _list(usage.get(details))
    return sum(_n(p.get("tokenCount")) for p in parts if isinstance(p, dict) and p.get("modality") == modality)


def _containers_used(items: list[Any]) -> set[str]:
    """The hosted containers Responses API items ran code in: a code_interpreter_call's container_id, a
    shell_call's environment's."""
    used = set()
    for item in items:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "code_interpreter_call":
            found = item.get("container_id")
        elif item.get("type") == "shell_call" and isinstance(item.get("environment"), dict):
            found = item["environment"].get("container_id")
        else:
            continue
        if isinstance(found, str) and found:
            used.add(found[:256])
    return used


def _billable_searches(response: dict[str, Any], output: list[dict[str, Any]]) -> int:
    """The Responses API's billed web searches: its `tool_usage.web_search.num_requests` when it reports
    it, xAI's server-side searches (of the web and of X) when its usage counts them, else its web_search_call
    items that searched (opening a page or finding in one is not billed)."""
    if (xai := _xai_searches(_dict(response.get("usage")))) is not None:
        return xai
    tool_usage = _dict(response.get("tool_usage"))
    web_search = tool_usage.get("web_search") if isinstance(tool_usage.get("web_search"), dict) else None
    if web_search is not None and "num_requests" in web_search:
        return _n(web_search.get("num_requests"))
    return sum(1 for item in output if item.get("type") == "web_search_call"
               and _dict(item.get("action")).get("type", "search") == "search")


def _xai_searches(usage: dict[str, Any]) -> int | None:
    """The searches xAI's server-side tools ran, as its usage counts them (server_side_tool_usage_details: its
    web_search and x_search tools' calls, billed each); None where a usage counts none."""
    details = usage.get("server_side_tool_usage_details")
    if not isinstance(details, dict):
        return None
    return _n(details.get("web_search_calls")) + _n(details.get("x_search_calls"))


def _image_generation_usage(response: dict[str, Any], output: list[dict[str, Any]], seen: Tokens) -> None:
    """The image_generation tool's calls (its items, or the completed events a stream counted) and its
    usage, which the Responses API reports apart from the response's (`tool_usage.image_gen`)."""
    seen.image_generation_calls = max(seen.image_generation_calls, sum(
        1 for item in output if item.get("type") == "image_generation_call" and item.get("status") != "failed"))
    tool_usage = _dict(response.get("tool_usage"))
    usage = _dict(tool_usage.get("image_gen"))
    details = _dict(usage.get("input_tokens_details"))
    cached = _dict(usage.get("cached_tokens_details"))
    seen.image_generation_input_tokens = _n(usage.get("input_tokens"))
    seen.image_generation_cached_input_tokens = min(_n(usage.get("cached_tokens")), seen.image_generation_input_tokens)
    uncached_images = _n(details.get("image_tokens")) - _n(cached.get("cached_image_tokens"))
    seen.image_generation_image_input_tokens = min(max(uncached_images, 0), seen.image_generation_input_tokens
                                                   - seen.image_generation_cached_input_tokens)
    seen.image_generation_output_tokens = _n(usage.get("output_tokens"))


def _dollars(value: Any) -> int | None:
    """An amount a reply states in dollars (a JSON number, or a decimal string), as nanos rounded up by money's one
    rule; None for anything else, or a negative amount. A number is read as the shortest decimal that is it (the
    digits written, for any amount of up to 15 significant digits): never through binary fractions."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        nanos = parse_external_amount(repr(value) if isinstance(value, float) else value)
    except MoneyError:
        return None
    return nanos if nanos >= 0 else None


def _reported_cost(usage: dict[str, Any], seen: Tokens) -> None:
    """What a router's usage says was charged (OpenRouter's usage accounting: `cost`, and with the customer's
    own provider key, `is_byok`, the provider's charge beside its fee in cost_details.upstream_inference_cost)."""
    if "cost" not in usage:
        return
    cost = _dollars(usage["cost"])
    upstream = _dollars(_dict(usage.get("cost_details")).get("upstream_inference_cost")) \
        if usage.get("is_byok") is True else 0
    if cost is not None and upstream is not None:
        seen.reported_cost = cost + upstream


def usage_from(endpoint: str, data: Any, seen: Tokens) -> bool:
    """Update `seen` from one JSON object (a whole body or one stream event); True if it held usage."""
    if not isinstance(data, dict):
        return False
    if endpoint == "audio_transcriptions":
        return _speech_to_text_usage(data, seen)
    if endpoint == "audio_speech":  # text to speech billed by tokens: its text in, its audio out (speech.audio.done)
        usage = data.get("usage")
        if not isinstance(usage, dict):
            return False
        seen.input_tokens = _n(usage.get("input_tokens"))
        seen.output_tokens = seen.audio_output_tokens = _n(usage.get("output_tokens"))
        return True
    if endpoint == "cached_contents":
        return _cached_content_usage(data, seen)
    response = _dict(data.get("response"))
    if not seen.reply_model:  # the body's, a chunk's, the Responses API's response, Anthropic's message_start
        named = data.get("model") or response.get("model") or _dict(data.get("message")).get("model") \
            or data.get("modelVersion")
        if isinstance(named, str):
            seen.reply_model = named[:256]
    if endpoint == "rerank":
        return _rerank_usage(data, seen)
    if endpoint == "cohere_chat":  # what Cohere bills (billed_units), else what it counted; a stream's at its end
        usage = _dict(data.get("usage")) or _dict(_dict(data.get("delta")).get("usage"))
        counted = _dict(usage.get("billed_units")) or _dict(usage.get("tokens"))
        if not counted:
            return False
        seen.input_tokens, seen.output_tokens = _n(counted.get("input_tokens")), _n(counted.get("output_tokens"))
        return True
    served_by = data.get("service_tier") or response.get("service_tier")  # chat's, the Responses API's
    if isinstance(served_by, str) and served_by:
        seen.service_tier = "" if served_by == "default" else served_by[:32]
    if endpoint == "anthropic_messages":
        message = data.get("message") if isinstance(data.get("message"), dict) else data
        usage = message.get("usage") if isinstance(message.get("usage"), dict) else data.get("usage")
        if not isinstance(usage, dict):
            return False
        # the tier that served it, as its usage says: service_tier (standard, priority, batch), fast mode
        # (speed: fast, at its own prices: not standard), the geography (inference_geo: us, priced apart)
        tier, speed, geo = usage.get("service_tier"), usage.get("speed"), usage.get("inference_geo")
        if isinstance(tier, str) and tier:
            seen._tier = "" if tier == "standard" else tier[:32]
        if isinstance(speed, str) and speed:
            seen._fast = speed == "fast"
        if isinstance(geo, str) and geo:
            seen._geo = geo
        seen.service_tier = tier_in_geo(ANTHROPIC_FAST_MODE if seen._fast else seen._tier, seen._geo)
        # message_start counts the input; a message_delta may count it again, cumulative (grown by server
        # tools' results), and an Anthropic-compatible server may leave a count out or null there: each
        # count given replaces the one before, one not given keeps it
        if any(usage.get(k) is not None for k in ("input_tokens", "cache_read_input_tokens",
                                                   "cache_creation_input_tokens")):
            uncached = seen.input_tokens - seen.cached_input_tokens - seen.cache_write_input_tokens
            if usage.get("input_tokens") is not None:
                uncached = _n(usage["input_tokens"])
            if usage.get("cache_read_input_tokens") is not None:
                seen.cached_input_tokens = _n(usage["cache_read_input_tokens"])
            if usage.get("cache_creation_input_tokens") is not None:
                seen.cache_write_input_tokens = _n(usage["cache_creation_input_tokens"])
            split = usage.get("cache_creation")
            long_writes = _n(split.get("ephemeral_1h_input_tokens")) if isinstance(split, dict) \
                else seen.cache_write_1h_input_tokens
            seen.cache_write_1h_input_tokens = min(long_writes, seen.cache_write_input_tokens)
            seen.input_tokens = uncached + seen.cached_input_tokens + seen.cache_write_input_tokens
        if "output_tokens" in usage:  # cumulative in deltas; a message_delta's is the whole output's (message_start
            # counts 1 before anything is written: a refusal before any output ends with 0)
            seen.output_tokens = _n(usage.get("output_tokens")) if data.get("type") == "message_delta" \
                else max(seen.output_tokens, _n(usage.get("output_tokens")))
        _reported_cost(usage, seen)
        tools = _dict(usage.get("server_tool_use"))
        seen.web_searches = max(seen.web_searches, _n(tools.get("web_search_requests")))
        stop = message.get("stop_reason") or _dict(data.get("delta")).get("stop_reason")
        if isinstance(stop, str) and stop:
            seen._stop = stop
        iterations = usage.get("iterations")
        if isinstance(iterations, list) and any(isinstance(entry, dict) for entry in iterations):
            _anthropic_parts(iterations, seen)
        # a refusal before any output is billed nothing (with a server-side fallback: every attempt declined so)
        seen._refused = seen._stop == "refusal" and not seen.output_tokens
        if seen._refused:
            seen.input_tokens = seen.cached_input_tokens = seen.cache_write_input_tokens = 0
            seen.cache_write_1h_input_tokens, seen.parts = 0, ()
        return True
    if endpoint == "bedrock_converse":  # a whole reply, or a stream's metadata event ({"metadata": {...}})
        event = _dict(data.get("metadata")) or data
        tier, latency = _dict(event.get("serviceTier")).get("type"), _dict(event.get("performanceConfig")).get("latency")
        if tier or latency:  # the tier that served it
            seen.service_tier = bedrock_tier(tier, latency)
        usage = event.get("usage")
        if not isinstance(usage, dict):
            return False
        # its input counts neither what was read from the cache nor what was written to it
        read, written = _n(usage.get("cacheReadInputTokens")), _n(usage.get("cacheWriteInputTokens"))
        seen.input_tokens = _n(usage.get("inputTokens")) + read + written
        seen.cached_input_tokens, seen.cache_write_input_tokens = read, written
        kept_long = sum(_n(d.get("inputTokens")) for d in _list(usage.get("cacheDetails"))
                        if isinstance(d, dict) and d.get("ttl") == "1h")
        seen.cache_write_1h_input_tokens = min(kept_long, written)
        seen.output_tokens = _n(usage.get("outputTokens"))
        return True
    if endpoint == "gemini_generate_content":
        seen.web_searches = max(seen.web_searches, _grounding_searches(data))
        seen.maps_groundings = max(seen.maps_groundings, _maps_grounded(data))
        usage = data.get("usageMetadata")
        if not isinstance(usage, dict):
            return False
        # the prompts of tool use are counted apart from the prompt, and billed as input
        seen.input_tokens = _n(usage.get("promptTokenCount")) + _n(usage.get("toolUsePromptTokenCount"))
        seen.cached_input_tokens = min(_n(usage.get("cachedContentTokenCount")), seen.input_tokens)
        seen.output_tokens = _n(usage.get("candidatesTokenCount")) + _n(usage.get("thoughtsTokenCount"))
        # by modality: audio in (priced apart on Gemini's models), audio and images out
        heard = _modality(usage, "promptTokensDetails", "AUDIO") + _modality(usage, "toolUsePromptTokensDetails", "AUDIO")
        seen.audio_input_tokens = min(max(heard - _modality(usage, "cacheTokensDetails", "AUDIO"), 0),
                                      seen.input_tokens - seen.cached_input_tokens)
        seen.audio_output_tokens = min(_modality(usage, "candidatesTokensDetails", "AUDIO"), seen.output_tokens)
        seen.image_output_tokens = min(_modality(usage, "candidatesTokensDetails", "IMAGE"),
                                       seen.output_tokens - seen.audio_output_tokens)
        return True
    if endpoint == "responses" and isinstance(data.get("response"), dict):
        data = data["response"]  # response.completed / response.incomplete events
    usage = data.get("usage")
    if not isinstance(usage, dict) and endpoint in ("chat_completions", "completions"):
        usage = _dict(data.get("x_groq")).get("usage")  # Groq's streams put it there (its OpenAI-compatible API)
    if endpoint == "embeddings" and isinstance(data.get("usageMetadata"), dict):  # Vertex AI's Gemini embeddings
        seen.input_tokens = _n(data["usageMetadata"].get("promptTokenCount"))
        return True
    billed = _dict(_dict(data.get("meta")).get("billed_units")) if endpoint == "embeddings" else {}
    if not isinstance(usage, dict) and billed:  # Cohere's embed: the tokens it bills, in its meta
        seen.input_tokens = _n(billed.get("input_tokens"))
        return True
    if not isinstance(usage, dict):
        return False
    _reported_cost(usage, seen)
    if endpoint == "images":  # token-priced image models (gpt-image-1): text and images in, image tokens out
        details = _dict(usage.get("input_tokens_details"))
        seen.input_tokens = _n(usage.get("input_tokens"))
        seen.cached_input_tokens = min(_n(details.get("cached_tokens")), seen.input_tokens)
        seen.image_input_tokens = min(_n(details.get("image_tokens")), seen.input_tokens - seen.cached_input_tokens)
        seen.output_tokens = _n(usage.get("output_tokens"))
        return True
    if endpoint == "responses":
        details = _dict(usage.get("input_tokens_details"))
        seen.input_tokens = _n(usage.get("input_tokens"))
        seen.cached_input_tokens = min(_n(details.get("cached_tokens")), seen.input_tokens)
        seen.cache_write_input_tokens = min(_n(details.get("cache_write_tokens")),
                                            seen.input_tokens - seen.cached_input_tokens)
        kept = _dict(details.get("cache_write_tokens_details"))  # kept 12 hours: the long write's price
        seen.cache_write_1h_input_tokens = min(_n(kept.get("ttl_12h_tokens")), seen.cache_write_input_tokens)
        seen.output_tokens = _billed_output(usage, "input_tokens", "output_tokens")
        output = [item for item in _list(data.get("output")) if isinstance(item, dict)]
        seen.web_searches = _billable_searches(data, output)
        seen.file_searches = sum(1 for item in output if item.get("type") == "file_search_call")
        _image_generation_usage(data, output, seen)
        seen.containers = max(seen.containers, len(_containers_used(output)))
        return True
    if endpoint == "embeddings":  # input alone: Voyage's usage, and other servers', gives only its total_tokens
        seen.input_tokens = _n(usage.get("prompt_tokens")) or _n(usage.get("total_tokens"))
        return True
    details = _dict(usage.get("prompt_tokens_details"))
    out_details = usage.get("completion_tokens_details") if isinstance(usage.get("completion_tokens_details"), dict) \
        else {}
    # Perplexity's sources read for the answer (citation_tokens: Sonar Deep Research's) are input it bills, in
    # neither prompt_tokens nor total_tokens
    seen.input_tokens = _n(usage.get("prompt_tokens")) + _n(usage.get("citation_tokens"))
    # cached input as OpenAI reports it, or as OpenAI-compatible providers do: DeepSeek's cache hits,
    # Moonshot's cached_tokens beside the prompt's
    cached = _n(details.get("cached_tokens")) or _n(usage.get("prompt_cache_hit_tokens")) or _n(usage.get("cached_tokens"))
    seen.cached_input_tokens = min(cached, seen.input_tokens)
    seen.cache_write_input_tokens = min(_n(details.get("cache_write_tokens")), seen.input_tokens - seen.cached_input_tokens)
    # audio (gpt-4o-audio): its own price; the cached part, if any, stays at the cached price
    seen.audio_input_tokens = min(_n(details.get("audio_tokens")),
                                  seen.input_tokens - seen.cached_input_tokens - seen.cache_write_input_tokens)
    seen.output_tokens = _billed_output(usage, "prompt_tokens", "completion_tokens")
    seen.audio_output_tokens = min(_n(out_details.get("audio_tokens")), seen.output_tokens)
    _search_and_reasoning_usage(usage, seen)
    return True


def _anthropic_parts(iterations: list[Any], seen: Tokens) -> None:
    """Anthropic's usage.iterations: what it bills, each sampling by itself at the prices of the model that
    ran it. The top-level counts leave some of them out (a compaction's; an advisor tool's calls, run by the
    advisor's model; a server-side fallback's declined attempts, each billed at its own model's prices when
    it wrote anything: one declined before any output is not billed), so the request's tokens are the
    iterations' sums."""
    entries = [e for e in iterations if isinstance(e, dict)][:USAGE_PARTS_MAX]
    fell_back = any(e.get("type") == "fallback_message" for e in entries)
    parts = []
    for entry in entries:
        kind = entry.get("type") if isinstance(entry.get("type"), str) else ""
        if kind == "message" and not _n(entry.get("output_tokens")) and (fell_back or seen._stop == "refusal"):
            continue  # an attempt declined before it wrote anything
        read, written = _n(entry.get("cache_read_input_tokens")), _n(entry.get("cache_creation_input_tokens"))
        split = entry.get("cache_creation")
        long_writes = min(_n(split.get("ephemeral_1h_input_tokens")), written) if isinstance(split, dict) else 0
        model = entry.get("model") if isinstance(entry.get("model"), str) else ""
        parts.append(UsagePart(kind=kind[:32], model=model[:256],
                               input_tokens=_n(entry.get("input_tokens")) + read + written, cached_input_tokens=read,
                               cache_write_input_tokens=written, cache_write_1h_input_tokens=long_writes,
                               output_tokens=_n(entry.get("output_tokens"))))
    seen.parts = tuple(parts)
    served = [p.model for p in parts if p.kind == "fallback_message" and p.model]
    if served:  # the model that wrote the reply (a stream's message_start names the one asked for)
        seen.reply_model = served[-1]
    seen.input_tokens = sum(p.input_tokens for p in parts)
    seen.cached_input_tokens = sum(p.cached_input_tokens for p in parts)
    seen.cache_write_input_tokens = sum(p.cache_write_input_tokens for p in parts)
    seen.cache_write_1h_input_tokens = sum(p.cache_write_1h_input_tokens for p in parts)
    seen.output_tokens = sum(p.output_tokens for p in parts)


def _search_and_reasoning_usage(usage: dict[str, Any], seen: Tokens) -> None:
    """What a chat usage says beside OpenAI's fields: the search context size the search ran with (Perplexity's:
    a fee each request by it), the searches run (Sonar Deep Research's num_search_queries, xAI's server-side
    tools' calls: billed each), and Perplexity's reasoning_tokens, billed at their own price, in neither
    completion_tokens nor total_tokens (where a total holds them, they are in the output already). Read the
    same from every chunk of a stream that repeats them."""
    size = usage.get("search_context_size")
    if isinstance(size, str) and size.strip():
        seen.search_context_size = size.strip().lower()[:SEARCH_CONTEXT_LENGTH_MAX]
    seen.web_searches = max(seen.web_searches, _n(usage.get("num_search_queries")), _xai_searches(usage) or 0)
    reasoning = _n(usage.get("reasoning_tokens"))
    if reasoning:
        seen.output_tokens = max(seen.output_tokens, _n(usage.get("completion_tokens")) + reasoning)
        seen.reasoning_output_tokens = min(reasoning, seen.output_tokens - seen.audio_output_tokens)


def _cached_content_usage(data: dict[str, Any], seen: Tokens) -> bool:
    """An explicit cache made, or its time to live changed (Gemini's CachedContent): its tokens
    (usageMetadata.totalTokenCount, written as input when made) kept from its making (createTime) to its expiry
    (expireTime), in whole seconds rounded up."""
    usage = data.get("usageMetadata")
    if not isinstance(usage, dict):
        return False
    seen.input_tokens = _n(usage.get("totalTokenCount"))
    made, ends = timestamp_ms(data.get("createTime")), timestamp_ms(data.get("expireTime"))
    if made is not None and ends is not None and ends > made:
        seen.cache_storage_token_seconds = seen.input_tokens * -(-(ends - made) // 1000)
    return True


def _rerank_usage(data: dict[str, Any], seen: Tokens) -> bool:
    """A rerank's usage: Cohere's billed units (search units; tokens where a model bills those), or the
    tokens read, as Jina, Voyage and OpenAI-compatible servers (vLLM, Together) report them: the query
    once a document, and the documents."""
    meta = _dict(data.get("meta"))
    billed, usage = _dict(meta.get("billed_units")), _dict(data.get("usage"))
    seen.search_units = _n(billed.get("search_units"))
    seen.input_tokens = (_n(usage.get("prompt_tokens")) or _n(usage.get("total_tokens"))
                         or _n(billed.get("input_tokens")) or _n(billed.get("total_tokens"))
                         or _n(_dict(meta.get("tokens")).get("input_tokens")))
    return bool(seen.search_units or seen.input_tokens)


def _billed_output(usage: dict[str, Any], input_name: str, output_name: str) -> int:
    """The output tokens a usage bills. OpenAI counts reasoning in its output; xAI, and OpenAI-compatible
    servers that follow it, report reasoning beside the output (`completion_tokens_details.reasoning_tokens`)
    and in the total: what the total holds past input and output is that output too."""
    output = _n(usage.get(output_name))
    return max(output, _n(usage.get("total_tokens")) - _n(usage.get(input_name)))


def _bytes(texts: list[Any]) -> int:
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts if isinstance(t, str))


def _json_text(value: Any) -> str | None:
    """A tool call's arguments given as an object (Anthropic's tool_use input, Gemini's functionCall): the
    provider generated its JSON."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else None


def _chat_generated(part: dict[str, Any]) -> list[Any]:
    """What a chat completion's message (or a stream's delta) says the model generated: its text, its
    refusal, its reasoning where shown (DeepSeek's reasoning_content, others' reasoning) and its tool calls'
    arguments."""
    texts = [part.get("content"), part.get("refusal"), part.get("reasoning_content"), part.get("reasoning")]
    calls = [_dict(c).get("function") for c in _list(part.get("tool_calls"))] + [part.get("function_call")]
    return texts + [_dict(f).get("arguments") for f in calls]


def _anthropic_generated(block: dict[str, Any]) -> list[Any]:
    """A content block (or a stream's delta): text, thinking, a tool call's input (whole or in parts)."""
    return [block.get("text"), block.get("thinking"), block.get("partial_json"), _json_text(block.get("input"))]


def _gemini_generated(candidate: dict[str, Any]) -> list[Any]:
    """A candidate's parts: text (thoughts included) and function calls."""
    parts = [p for p in _list(_dict(candidate.get("content")).get("parts")) if isinstance(p, dict)]
    return [p.get("text") for p in parts] + [_json_text(p.get("functionCall")) for p in parts]


def _converse_generated(block: dict[str, Any]) -> list[Any]:
    """A Converse content block (or a stream's delta): text, reasoning, a tool call's input (whole or in parts)."""
    reasoning = _dict(block.get("reasoningContent"))
    tool = _dict(block.get("toolUse")).get("input")
    return [block.get("text"), _dict(reasoning.get("reasoningText")).get("text"), reasoning.get("text"),
            tool if isinstance(tool, str) else _json_text(tool)]


def _delivered_text(endpoint: str, data: Any) -> int:
    """Bytes of what the model generated in one stream event, of every kind the provider bills as output
    (text, reasoning shown, refusals, tool calls' arguments), for estimating a cut stream."""
    if not isinstance(data, dict):
        return 0
    texts: list[Any] = []
    for choice in _list(data.get("choices")):
        if isinstance(choice, dict):
            texts += _chat_generated(_dict(choice.get("delta"))) + [choice.get("text")]  # text: a legacy completion's
    delta = data.get("delta")
    if isinstance(delta, str):  # the Responses API's deltas: output text, reasoning, a function call's arguments
        texts.append(delta)
    elif isinstance(delta, dict):  # Anthropic's content_block_delta
        texts += _anthropic_generated(delta)
    if data.get("type") == "content_block_start":  # a tool call's input given whole at its start
        texts.append(_json_text(_dict(data.get("content_block")).get("input") or None))
    for candidate in _list(data.get("candidates")):
        if isinstance(candidate, dict):
            texts += _gemini_generated(candidate)
    if isinstance(data.get("contentBlockDelta"), dict):  # Bedrock's ConverseStream
        texts += _converse_generated(_dict(data["contentBlockDelta"].get("delta")))
    if endpoint == "cohere_chat" and isinstance(delta, dict):  # Cohere's content-delta, tool-call-delta
        texts += _cohere_generated(_dict(delta.get("message")))
    return _bytes(texts)


def _cohere_generated(message: dict[str, Any]) -> list[Any]:
    """What Cohere's chat generated in a message, or a stream event's delta of one: text, tool calls' arguments,
    its tool plan."""
    content = message.get("content")
    parts = content if isinstance(content, list) else [content]
    calls = message.get("tool_calls")
    calls = calls if isinstance(calls, list) else [calls]
    return [_dict(p).get("text") for p in parts] + [_dict(_dict(c).get("function")).get("arguments") for c in calls] \
        + [message.get("tool_plan")]


def _reply_text(data: Any) -> int:
    """Bytes of what the model generated in a whole (non-streamed) reply, of every kind the provider bills
    as output, for estimating one without usage."""
    if not isinstance(data, dict):
        return 0
    texts: list[Any] = [data.get("text")]  # a transcription's
    for choice in _list(data.get("choices")):
        if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
            texts += _chat_generated(choice["message"])
        elif isinstance(choice, dict):  # a legacy completion
            texts.append(choice.get("text"))
    for item in _list(data.get("output")):  # responses: messages, reasoning, function and tool calls
        if isinstance(item, dict):
            parts = [p for p in _list(item.get("content")) + _list(item.get("summary")) if isinstance(p, dict)]
            texts += [p.get("text") for p in parts] + [p.get("refusal") for p in parts]
            texts += [item.get("arguments"), item.get("input")]
    for block in _list(data.get("content")):  # anthropic
        if isinstance(block, dict):
            texts += _anthropic_generated(block)
    for candidate in _list(data.get("candidates")):  # gemini
        if isinstance(candidate, dict):
            texts += _gemini_generated(candidate)
    for block in _list(_dict(_dict(data.get("output")).get("message")).get("content")):  # Bedrock's Converse
        if isinstance(block, dict):
            texts += _converse_generated(block)
    if "finish_reason" in data and isinstance(data.get("message"), dict):  # Cohere's chat
        texts += _cohere_generated(data["message"])
    return _bytes(texts)


# A reply in a content coding is read from a decoded copy (the client gets the bytes as sent). policyd asks
# providers for replies as they are (accept-encoding: identity); gzip and deflate are read if one compresses
# anyway. Others (br, zstd) cannot be read here: such a reply is estimated (undecodable_reply), its bytes
# on the wire taken for delivered text.
_ZLIB_CODINGS = ("gzip", "x-gzip", "deflate")
_ZLIB_AUTO_HEADER = 32 + zlib.MAX_WBITS  # a gzip or zlib stream, told apart by its header
DECODED_PIECE_BYTES = 1 << 20  # decoded a piece at a time: a small reply that inflates hugely is read as it goes


class ResponseReader:
    """Feeds on response body chunks as they pass; knows the usage at the end, or an estimate."""

    def __init__(self, endpoint: str, stream: bool, request_input_tokens: int = 0, stored: bool = False,
                 output_cap: int = 0) -> None:
        """`request_input_tokens`: the request's own count of its input (HttpCall.input_tokens). Text to
        speech is billed by the characters sent and its reply (audio) reports nothing: that count is its
        usage, whole from the start, and the audio is passed over unread. Unless it was reserved an
        output cap (`output_cap`, Engine._attempt: its model is priced for output): then it is billed by
        tokens, which its events report last (stream_format sse, `speech.audio.done`); audio bytes
        report none, and its audio tokens are estimated from its characters. `stored`: the provider keeps
        the reply (a chat completion sent with store: true), so its id is read as a Responses API's is."""
        self.endpoint = endpoint
        self.stream = stream
        self.tokens = Tokens()
        self.found_usage = False
        # the usage seen counts the whole output: OpenAI's usage chunk, Anthropic's message_delta, a
        # Responses API completion. Anthropic's message_start and Gemini's running counts do not.
        self.output_final = False
        self.speech_tokens = endpoint == "audio_speech" and output_cap > 0
        self._speech_characters = request_input_tokens if self.speech_tokens else 0
        self.audio = endpoint == "audio_speech" and not self.speech_tokens
        # passed over unread: speech billed by characters, and audio bytes (no usage in them)
        self._unread = self.audio or (self.speech_tokens and not stream)
        if self.audio:
            self.tokens.input_tokens = request_input_tokens
            self.found_usage = self.output_final = True
        self.delivered_bytes = 0
        self._containers: set[str] = set()  # the hosted containers a stream's items ran code in
        self.images = 0  # images in an images reply (priced per image); videos a Veo operation made
        self.files: list[str] = []  # the File API ids a Veo operation's videos are downloaded by
        self.response_id = ""  # the id of the response the provider stored (the Responses API's, a stored chat's)
        self.response_status = ""  # a Responses API response's last status seen (queued, in_progress, completed...)
        self.stored = stored or endpoint == "responses"
        self.malformed = False
        self.finished = False  # the provider said the stream is complete ([DONE], message_stop, ...)
        # Gemini's stream without alt=sse is one JSON array whose objects arrive one by one, not SSE
        self._array: bool | None = None  # decided by the stream's first byte
        # Bedrock's streams are in AWS's event stream encoding, whose first byte (of a length) is 0
        self._messages: event_stream.Decoder | None = None
        self._buffer = bytearray()
        self._large: ObjectFields | None = None  # a reply, or a stream's event, too large to hold: read as it passes
        self._decoder: Any = None  # a zlib decompressor, for a reply in gzip or deflate
        self.undecodable = False  # a reply in a coding policyd cannot decode: estimated

    def encoded_as(self, content_encoding: str) -> None:
        """The reply's content-encoding, from its headers (before its body)."""
        codings = [c.strip().lower() for c in content_encoding.split(",")]
        codings = [c for c in codings if c and c != "identity"]
        if not codings or self._unread:
            return
        if len(codings) == 1 and codings[0] in _ZLIB_CODINGS:
            self._decoder = zlib.decompressobj(_ZLIB_AUTO_HEADER)
        else:
            self.undecodable = True

    def served_on(self, tier: str, latency: str = "") -> None:
        """The tier a reply's headers say served it, where its body names none (Bedrock's InvokeModel:
        x-amzn-bedrock-service-tier, x-amzn-bedrock-performanceconfig-latency)."""
        if tier.strip() or latency.strip():
            self.tokens._tier = self.tokens.service_tier = bedrock_tier(tier, latency.strip())

    def feed(self, chunk: bytes) -> None:
        if not chunk or self._unread:
            return
        if self.undecodable:
            self.delivered_bytes += len(chunk)
            return
        if self._decoder is None:
            self._feed(chunk)
            return
        try:
            while chunk:
                piece = self._decoder.decompress(chunk, DECODED_PIECE_BYTES)
                chunk = self._decoder.unconsumed_tail
                self._feed(piece)
        except zlib.error:
            self.malformed, self._decoder, self._unread = True, None, True

    def _feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if not self.stream:
            if self._large is None and len(self._buffer) + len(chunk) > RESPONSE_BUFFER_BYTES_MAX:
                self._large = ObjectFields(_USAGE_FIELDS, _USAGE_ITEMS)
                self._large.feed(bytes(self._buffer))
                self._buffer = bytearray()
            if self._large is not None:
                self._large.feed(chunk)
            else:
                self._buffer += chunk
            return
        if self._messages is not None or (self._array is None and not self._buffer and chunk[:1] == b"\x00"):
            self._event_stream(chunk)
            return
        if self._large is not None and self._array:  # an object of a JSON-array stream too large to hold
            self._large.feed(chunk)
            if self._large.rest is None and not self._large.broken:
                return
            chunk = self._large.rest or b""
            self._large_event_ended()
        elif self._large is not None:  # an event too large to hold, read as it passes until its line ends
            newline = chunk.find(b"\n")
            self._large.feed(chunk if newline < 0 else chunk[:newline].rstrip(b"\r"))
            if newline < 0:
                return
            self._large_event_ended()
            chunk = chunk[newline + 1:]
        self._buffer += chunk
        if self._array is None and self._buffer.strip():
            self._array = self._buffer.lstrip()[:1] == b"["
        if self._array:
            self._array_items()
            return
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                if len(self._buffer) > SSE_LINE_BYTES_MAX:
                    if self._buffer.startswith(b"data:"):
                        self._large = ObjectFields(_USAGE_FIELDS, _USAGE_ITEMS)
                        self._large.feed(bytes(self._buffer[5:]).lstrip(b" "))
                    else:
                        self.malformed = True
                    self._buffer.clear()
                return
            line = bytes(self._buffer[:newline]).rstrip(b"\r")
            del self._buffer[: newline + 1]
            self._line(line)

    def _event_stream(self, chunk: bytes) -> None:
        """Bedrock's messages, each one event: ConverseStream's (read as {event type: payload}), or one of the
        model's own API's events (InvokeModelWithResponseStream's `chunk`: Anthropic's, base64 in `bytes`)."""
        if self._messages is None:
            self._messages = event_stream.Decoder()
        if self.malformed:
            return
        try:
            messages = self._messages.feed(chunk)
        except event_stream.EventStreamError:
            self.malformed = True
            return
        for message in messages:
            if message.headers.get(":message-type") != "event":  # the provider's error, mid-stream: no usage in it
                continue
            kind = message.headers.get(":event-type", "")
            try:
                data = json.loads(message.payload)
                if kind == "chunk":
                    data = json.loads(base64.b64decode(_dict(data).get("bytes", ""), validate=True))
            except (ValueError, RecursionError):  # binascii.Error is a ValueError
                self.malformed = True
                continue
            self._event(data if kind == "chunk" else {kind: data})
            if kind == "metadata":  # ConverseStream's last event, after messageStop: the usage
                self.finished = True

    def _large_event_ended(self) -> None:
        large, self._large = self._large, None
        large.end()
        if large.broken:
            self.malformed = True
        else:
            self._event(large.as_object())

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            if line.startswith(b"event:") and b"message_stop" in line:
                self.finished = True
            return
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.finished = True
            return
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):
            self.malformed = True
            return
        self._event(data)

    def _array_items(self) -> None:
        """Read the objects of a JSON-array stream that have arrived whole; keep the rest for later."""
        text = bytes(self._buffer).decode("utf-8", "surrogateescape")  # a character cut in two stays in the rest
        at = 0
        while True:
            while at < len(text) and text[at] in " \t\r\n,[]":
                self.finished = self.finished or text[at] == "]"
                at += 1
            if at >= len(text):
                break
            try:
                data, at = _DECODER.raw_decode(text, at)
            except (ValueError, RecursionError):
                break  # not whole yet
            self._event(data)
        del self._buffer[:len(text[:at].encode("utf-8", "surrogateescape"))]
        if len(self._buffer) > SSE_LINE_BYTES_MAX:  # an object too large to hold: read on as it passes
            self._large = ObjectFields(_USAGE_FIELDS, _USAGE_ITEMS, stop_at_end=True)
            self._large.feed(bytes(self._buffer))
            self._buffer.clear()
            if self._large.rest is not None or self._large.broken:
                rest = self._large.rest or b""
                self._large_event_ended()
                self._buffer += rest
                self._array_items()

    def _response_id(self, data: Any) -> None:
        """The id of a reply the provider stored: a whole reply's `id`, a Responses API event's `response.id`,
        a stored chat completion's chunk's `id`."""
        if not self.stored or self.response_id or not isinstance(data, dict):
            return
        response = data.get("response") if isinstance(data.get("response"), dict) else \
            data if not self.stream or self.endpoint != "responses" else {}
        made = response.get("file") if response.get("object") == "upload" else None
        found = made.get("id") if isinstance(made, dict) else response.get("id")  # an upload completed: its file
        if found is None and self.endpoint in (BATCHES, "videos"):  # a Gemini batch, a Veo operation: named instead
            found = response.get("name")
        if self.endpoint == "cached_contents":  # an explicit cache: "cachedContents/<id>" (Vertex AI's ends so)
            found = cached_content_name(response.get("name")) or None
        if self.endpoint == "gemini_generate_content" and isinstance(response.get("file"), dict):
            named = response["file"].get("name")  # a Gemini file uploaded: "files/<id>", known by its id
            found = named.removeprefix("files/") if isinstance(named, str) else None
        if isinstance(found, str) and 0 < len(found) <= 200:
            self.response_id = found

    def _response_status(self, data: Any) -> None:
        """A Responses API response's status: a whole reply's, or the one a stream's event carries."""
        if self.endpoint != "responses" or not isinstance(data, dict):
            return
        response = data.get("response") if self.stream else data
        status = response.get("status") if isinstance(response, dict) else None
        if isinstance(status, str) and status:
            self.response_status = status[:32]

    def _event(self, data: Any) -> None:
        """One event of a stream (an SSE data line, an object of a JSON-array stream)."""
        self._response_id(data)
        self._response_status(data)
        if usage_from(self.endpoint, data, self.tokens):
            self.found_usage = self.found_usage or self.tokens.any
            if self.endpoint == "anthropic_messages":
                self.output_final = self.output_final or (isinstance(data, dict) and data.get("type") == "message_delta")
            elif self.endpoint != "gemini_generate_content":
                self.output_final = True
        self.delivered_bytes += _delivered_text(self.endpoint, data)
        kind = data.get("type") if isinstance(data, dict) else None
        if not isinstance(kind, str):  # an event names its kind in text; anything else is no event policyd reads
            return
        if kind in ("response.output_item.added", "response.output_item.done"):
            self._containers |= _containers_used([data.get("item")])  # a container made: billed, whether the stream ends
            self.tokens.containers = max(self.tokens.containers, len(self._containers))
        if kind == "response.image_generation_call.completed":
            self.tokens.image_generation_calls += 1  # an image made: billed, whether the stream ends or not
        if kind in _LAST_EVENTS:
            self.finished = True
            if self.endpoint == "images":  # a streamed image's last event: one image made (its usage in it)
                self.images += 1

    def finish(self) -> None:
        """The body ended: parse what was buffered."""
        if self._unread:
            self.finished = True
            return
        if self.undecodable:
            return
        if self._decoder is not None:
            try:
                self._feed(self._decoder.flush())
            except zlib.error:
                self.malformed = True
                return
        if self.stream:
            if self._large is not None:
                self._large_event_ended()
            if self._array and self._buffer.strip():
                self.malformed = True  # an object the stream never finished
            elif self._buffer:
                self._line(bytes(self._buffer).rstrip(b"\r\n"))
            self._buffer.clear()
            return
        if self._large is not None:
            self._large.end()
            if self._large.broken:
                self.malformed = True
                return
            data = self._large.as_object()
        else:
            try:
                data = json.loads(bytes(self._buffer)) if self._buffer else None
            except (ValueError, RecursionError):
                if self.endpoint == "audio_transcriptions":  # a transcript as text, srt or vtt: no usage in it
                    self.delivered_bytes, self.finished = len(self._buffer), True
                    return
                self.malformed = True
                return
        self.found_usage = usage_from(self.endpoint, data, self.tokens) and self.tokens.any
        if self.endpoint == "responses" and isinstance(data, dict) and \
                data.get("object") in ("conversation", "file", "upload"):
            self.found_usage = True  # a conversation made, a file uploaded, cost nothing: the reply is all the usage
        self._response_id(data)
        self._response_status(data)
        self.delivered_bytes = _reply_text(data)
        if self.endpoint == "images" and isinstance(data, dict) and isinstance(data.get("data"), list):
            self.images = len(data["data"])
            self.found_usage = True
        elif self.endpoint == "images" and isinstance(data, dict) and isinstance(data.get("predictions"), list):
            # Imagen's: the images it made (one its safety filter withheld, named by raiFilteredReason, is not billed)
            self.images = sum(1 for p in data["predictions"] if isinstance(p, dict) and "bytesBase64Encoded" in p)
            self.found_usage = True
        self.finished = True

    def estimated_output_tokens(self) -> int:
        """Output tokens from the text delivered (text to speech's audio tokens: from its characters), or
        as many as the provider had counted when more."""
        if self.speech_tokens:
            return max(speech_audio_tokens_likely(self._speech_characters), self.tokens.output_tokens)
        return max(-(-self.delivered_bytes // ESTIMATE_BYTES_PER_TOKEN), self.tokens.output_tokens)


@dataclass(frozen=True)
class Closing:
    """How a proxied call ends, whichever proxy carried it (Envoy's ext_proc, the ASGI middleware):

    release   the provider failed (upstream_<status>, the gateway's own answer for it included): nothing
              is charged;
    settle    the provider's own usage (`interrupted` when the client left after the usage was reported);
    estimate  no final usage from the provider: input as the provider reported it (Anthropic does at the
              stream's start), else as estimated at Authorize; output from what was delivered, or, for a
              reply not streamed, which the provider makes whole, that its client left before it began or
              that was cut on its way (`output_as_held`), the output cap held for it;
    poll      a background response (the Responses API's background: true) the provider has not finished:
              it goes on at the provider whatever the client does, and is charged when policyd, asking the
              provider for it, finds it ended (policyd/background.py).
    """

    action: str  # release | settle | estimate | poll
    reason: str = ""  # the release reason, or the estimate's error class
    interrupted: bool = False
    output_as_held: bool = False


BATCHES = "batches"  # what a proxy reads a batch made as (its reply: the batch, named; policyd/batches.py)
# a Responses API response's statuses once it has ended (queued and in_progress: not yet)
ENDED_RESPONSE_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled"})


# an async chat job's statuses once it has ended (Perplexity's; CREATED and IN_PROGRESS: not yet)
ENDED_JOB_STATUSES = frozenset({"COMPLETED", "FAILED"})


def vertex_operation_read(name: str) -> tuple[str, bytes]:
    """How a Vertex AI operation (Veo's, `projects/.../models/<model>/operations/<id>`) is read: a POST of its
    name to its model's `:fetchPredictOperation` (the path from `projects/` on, and the body)."""
    model = name.split("/operations/", 1)[0]
    return f"{urllib.parse.quote(model, safe='/')}:fetchPredictOperation", json.dumps({"operationName": name}).encode()


def followed_path(endpoint: str, response_id: str) -> tuple[str, bytes | None]:
    """Where a background response is asked for, under its provider's base_url, and the body of a read the
    provider takes as a POST: the Responses API's `responses/<id>`; an async chat completion's job (a
    background chat completion: Perplexity's), `async/chat/completions/<id>`; a Veo operation, its name
    (Gemini's `models/<model>/operations/<id>`), or on Vertex AI its model's `:fetchPredictOperation`, the
    operation named in the body."""
    if endpoint == "videos" and response_id.startswith("projects/"):
        return vertex_operation_read(response_id)
    if endpoint == "videos":
        return urllib.parse.quote(response_id, safe="/"), None
    quoted = urllib.parse.quote(response_id, safe="")
    return (f"async/chat/completions/{quoted}" if endpoint == "chat_completions" else f"responses/{quoted}"), None


def background_answer(status: int, body: bytes, endpoint: str = "responses") -> tuple[str, ResponseReader]:
    """What the provider's answer (HTTP status, body) for a background response asked for says to do, and
    the body read: wait (running, or no answer: ask again), held (gone, 404: what it used cannot be known;
    ended with no usage reported: charged as held), settle (ended: its usage), release (failed or cancelled
    before it used anything billed). `endpoint` chat_completions: an async chat completion's job (Perplexity's),
    whose chat completion, once COMPLETED, is its `response`."""
    if endpoint == "chat_completions":
        return _job_answer(status, body)
    if endpoint == "videos":
        return _operation_answer(status, body)
    reader = ResponseReader("responses", stream=False, stored=True)
    reader.feed(body)
    reader.finish()
    if status == 404:
        return "gone", reader
    if status != 200 or reader.response_status not in ENDED_RESPONSE_STATUSES:
        return "wait", reader
    if reader.found_usage:
        return "settle", reader
    return ("release" if reader.response_status in ("failed", "cancelled") else "held"), reader


def _answered_object(status: int, body: bytes) -> dict[str, Any]:
    """A provider's 200 answer as the JSON object it is; {} for another status or a body that is none."""
    if status != 200:
        return {}
    try:
        found = json.loads(body)
    except (ValueError, RecursionError):
        return {}
    return found if isinstance(found, dict) else {}


def _job_answer(status: int, body: bytes) -> tuple[str, ResponseReader]:
    """An async chat completion's job, as background_answer reads it: its chat completion read once it is
    COMPLETED; FAILED, released (the job billed nothing, or its failure is the provider's)."""
    reader = ResponseReader("chat_completions", stream=False)
    job = _answered_object(status, body)
    state = job.get("status") if isinstance(job.get("status"), str) else ""
    reader.response_status = state.lower()[:32]
    if isinstance(job.get("response"), dict):
        reader.feed(json.dumps(job["response"]).encode())
    reader.finish()
    if status == 404:
        return "gone", reader
    if status != 200 or state not in ENDED_JOB_STATUSES:
        return "wait", reader
    if reader.found_usage:
        return "settle", reader
    return ("release" if state == "FAILED" else "held"), reader


_FILE_ID = re.compile(r"/files/(?P<id>[A-Za-z0-9_.-]{1,200})(:download)?(\?|$)")  # a video's, in its uri


def _operation_answer(status: int, body: bytes) -> tuple[str, ResponseReader]:
    """A Veo operation (Gemini's, Vertex AI's), as background_answer reads it: done with its videos (`images`:
    those made, billed by their seconds; `files`: the File API's ids Gemini's are downloaded by; Vertex AI's are
    in the caller's Cloud Storage, or inline), done with an error, or every video withheld by its safety filter
    (nothing billed: released), or not done yet."""
    reader = ResponseReader("videos", stream=False)
    operation = _answered_object(status, body)
    if status == 404:
        return "gone", reader
    if status != 200 or operation.get("done") is not True:
        reader.response_status = "running" if status == 200 else ""
        return "wait", reader
    if operation.get("error") is not None:
        reader.response_status = "failed"
        return "release", reader
    response = _dict(operation.get("response"))
    made = _dict(response.get("generateVideoResponse")).get("generatedSamples")
    videos = [_dict(_dict(sample).get("video")) for sample in _list(made)] + \
        [_dict(video) for video in _list(response.get("videos"))]  # Vertex AI's: in GCS, or inline
    videos = [video for video in videos if video]
    reader.images = len(videos)
    reader.files = [found.group("id") for video in videos if isinstance(video.get("uri"), str)
                    and (found := _FILE_ID.search(video["uri"]))]
    reader.response_status = "completed" if videos else "filtered"
    return ("settle" if videos else "release"), reader


def closing(status: int, reader: ResponseReader, cut: bool, client_left: bool = True,
            gateway_timed_out: bool = False, background: bool = False) -> Closing:
    """`status` is the provider's HTTP status (0: no answer), `cut` whether the response ended early,
    `client_left` whether no answer came because the client left (a proxy that failed before it reached
    the provider: released), `gateway_timed_out` whether the status is the gateway's own for giving up
    on the provider (its route or idle timeout), `background` whether the request asked for a background
    response (it goes on at the provider after its reply, or its stream, ends)."""
    if status >= 400 and gateway_timed_out:
        # the provider has the request and goes on with it, as for a client gone: charged as held
        return Closing("estimate", "usage_estimated:gateway_timeout", interrupted=True,
                       output_as_held=not reader.stream)
    if status >= 400:
        return Closing("release", f"upstream_{status}")
    if status == 0 and not client_left:
        return Closing("release", "no_response")
    if status == 0:
        # the client left before the reply began (a provider that failed or timed out is answered for by the
        # gateway, with a status). The provider has the request and bills it: a stream stops when its client
        # leaves (its input is charged), a reply not streamed is made whole all the same (OpenAI goes on
        # with it), so its output is charged as held, the most it could be: leaving early saves nothing
        return Closing("estimate", "usage_estimated:client_gone", interrupted=True, output_as_held=not reader.stream)
    if reader.endpoint == BATCHES and status == 200:
        # a batch made (its reply names it, validating): charged when the provider says it ended; a reply that
        # names none is charged as held, as any reply whose usage cannot be known (the batch may run)
        return Closing("poll", "batch") if reader.response_id else \
            Closing("estimate", "usage_estimated:no_batch_id", output_as_held=True)
    if background and reader.response_id and reader.response_status not in ENDED_RESPONSE_STATUSES:
        # queued, or its stream cut before it ended: the provider goes on with it, and bills all of it
        return Closing("poll", "background")
    # the provider's own usage is exact: when the response ended, when the client hung up only after the
    # provider's last event ([DONE], message_stop), or when a cut came after the usage of the whole output
    complete = not cut or reader.finished
    # Anthropic's message_start counts no output: its stream is whole only with its message_delta (an error
    # event mid-way ends it without one), and is otherwise estimated from what was delivered, like a cut one
    counted = reader.output_final or not (reader.stream and reader.endpoint == "anthropic_messages")
    if reader.found_usage and (reader.output_final or (complete and counted)):
        return Closing("settle", interrupted=not complete)
    reason = "stream_cut" if cut else "undecodable_reply" if reader.undecodable else \
        "malformed_response" if reader.malformed else "no_usage_reported"
    # a reply not streamed is whole before its first byte leaves the provider, which bills all of it: cut on
    # its way (a client that hangs up once the headers came), its output is charged as held, as for a client
    # gone before it began, not as the few bytes that got through
    return Closing("estimate", f"usage_estimated:{reason}", interrupted=cut,
                   output_as_held=cut and not reader.stream)
