"""The provider HTTP APIs as a proxy sees them: which endpoint, which key, which model, how big,
and the rewrites and error bodies policyd needs. Shared by the Envoy filters and gateways.

Known paths (the prefix before /v1 is ignored, so /openai/v1/... works too; OpenAI's chat and text completions,
embeddings, images and audio are read under any prefix, or none, as OpenAI-compatible providers serve them:
Perplexity's /chat/completions, Azure AI Foundry's /models/..., GitHub Models' /inference/..., Gemini's
/v1beta/openai/..., DeepSeek's /beta/...):
    POST .../v1/chat/completions          chat_completions
    POST .../v1/responses                 responses
    POST .../v1/embeddings                embeddings
    POST .../v1/images/generations        images
    POST .../v1/images/edits | .../v1/images/variations
                                          images too, from a multipart/form-data body: the input images
                                          are input the text does not bound (unseen_input)
    POST .../v1/messages                  anthropic_messages
    POST .../v1beta/models/M:generateContent | :streamGenerateContent   gemini_generate_content
    POST .../v1beta/models/M:embedContent | :batchEmbedContents        embeddings (Gemini reports no usage
                                          for them: charged as estimated from the text)
    POST .../v1/completions               completions (legacy text completions)
    POST .../v1/fim/completions           completions too (Mistral's fill-in-the-middle: a prompt and a suffix;
                                          DeepSeek's, .../beta/completions)
    POST .../v1/audio/speech              audio_speech (text to speech: billed by the characters of `input`,
                                          or, a model priced for output, by tokens: `stream_format: sse`
                                          replies end with their usage, audio bytes are estimated)
    POST .../v1/audio/transcriptions | .../v1/audio/translations
                                          audio_transcriptions (speech to text, multipart/form-data: billed by
                                          the audio's seconds or audio tokens; a WAV file's header gives its
                                          seconds, other formats' size bounds them)
    GET  .../v1/models                    the models the key may use (answered by policyd)
    GET  .../v1/key                       what the key may still spend: its wallet, its limits, and those of an
                                          end user x-end-user-id names (answered by policyd)
    GET  .../v1/requests/{id}[?wait=N]    one request of the key's customer: its charge, usage and state (answered
                                          by policyd: policyd/request_lookup.py; one in progress waited for up
                                          to N seconds, 5 unless told, at most 20, to close)
    GET  .../v1/usage[?group_by=model,feature&bucket=day&timezone=Z&since=S&until=U]
                                          the key's customer's usage summed over a window (the last 30 days
                                          unless told; unix seconds), grouped as asked: requests, tokens and
                                          charges, never costs (answered by policyd: policyd/own_usage.py)
    GET  .../v1/requests[?limit=N&after=ID]
                                          the key's customer's requests, newest first, each as above (answered by
                                          policyd: N of them, 20 unless told, at most 100; after: the last id of
                                          the page before)
    GET | DELETE .../v1/responses/{id}, GET .../input_items, POST .../cancel
                                          a response the provider stored, free: only its own customer's
                                          keys reach it, on the account that stored it
    POST .../v1/messages/count_tokens | .../v1/responses/input_tokens | .../models/M:countTokens
                                          token counts: free at the provider, so the key, plan and
                                          model are checked and nothing is reserved or charged
    POST .../v1/moderations               moderations (free too, the same way; the model defaults to
                                          omni-moderation-latest, as OpenAI's does)
    POST .../v2/chat                      cohere_chat (Cohere's chat: its cap in max_tokens, its usage billed_units)
    POST .../v1/embed | .../v2/embed      embeddings (Cohere's: its usage in meta.billed_units)
    POST .../v1/rerank | .../v2/rerank    rerank (Cohere's, Jina's, Voyage's, OpenAI-compatible servers'): a query
                                          and documents; billed in search units or in tokens (pricing.py)
    POST .../v1/batches                   a batch of the requests in a file (held at their worst cases at the
                                          batch tier, its file read from the provider: policyd/batches.py);
                                          GET .../v1/batches/{id}, POST .../cancel: its own customer's alone
    POST .../endpoints/openapi/chat/completions | embeddings   Vertex AI's OpenAI-compatible API: OpenAI's
    POST .../v1beta/models/M:batchGenerateContent   a Gemini batch, its requests inline (the same);
                                          GET | DELETE .../v1beta/batches/{id}, POST ...:cancel: the same
    POST .../v1/messages/batches          an Anthropic message batch, its requests in its body (the same);
                                          GET | DELETE .../{id}, GET .../results, POST .../cancel: the same

Amazon Bedrock's runtime API names the model (its id, an inference profile's, an ARN; URL-encoded) in the path:
    POST .../model/M/converse | converse-stream    bedrock_converse (Converse's bodies and usage; its stream in
                                          AWS's event stream encoding, policyd/event_stream.py)
    POST .../model/M/invoke | invoke-with-response-stream
                                          anthropic_messages: InvokeModel of Anthropic's models (Anthropic's
                                          bodies, `anthropic_version`, and usage; the stream's events each in one
                                          event stream message); other models' own bodies are not read
    POST .../model/M/count-tokens         a token count (free)

Azure OpenAI's paths name the deployment (the model, as policyd's policy names it) in the path:
    POST .../openai/deployments/D/chat/completions | completions | embeddings | images/generations |
                                  audio/speech | audio/transcriptions | audio/translations
    POST .../openai/responses             responses (the model in the body)
and its clients send the key as `api-key`.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Iterable
from urllib.parse import parse_qsl, quote, unquote, unquote_plus, urlsplit

from policyd import own_usage, reasons, request_lookup
from policyd.audio import wav_seconds
from policyd.domain import (ANTHROPIC_FAST_MODE, CACHED_CONTENT_PREFIX, CONTAINER_MEMORY_DEFAULT, GEMINI_UPLOAD_PREFIX,
                            FALLBACK_MODELS_MAX, IMAGE_SCALE_MAX, OUTPUT_CAP_FIELDS, ROUTED_FALLBACKS_MAX,
                            SEARCH_CONTEXT_LENGTH_MAX,
                            Attribution, AuthorizeInput, KeySummary, RateLimit, RequestSummary, Shape, bedrock_tier,
                            REGIONAL_GEO, cached_content_name, tier_in_geo, trace_id_from)
from policyd.money import MONEY_UNITS, QUANTITY_MAX, format_amount, parse_amount
from policyd.multipart import MultipartError, MultipartForm
from policyd.protobuf_json import duration_ms, timestamp_ms
from policyd.validation import REQUEST_ID_PATTERN, STORED_RESPONSE_ID_PATTERN, TAG_VALUE_LENGTH_MAX, TAGS_MAX

# Anthropic accepts requests of up to 32 MB, OpenAI audio files of up to 25 MB (speech to text)
REQUEST_BODY_BYTES_MAX = 32 * 1024 * 1024
REQUEST_HEADERS_BYTES_MAX = 32 * 1024  # names and values, all headers together
REQUEST_HEADERS_COUNT_MAX = 100
JSON_DEPTH_MAX = 64

# OpenAI's API and the OpenAI-compatible ones read under whatever prefix a provider serves them at: OpenAI's /v1,
# none (Perplexity's /chat/completions, DeepSeek's), Gemini's /v1beta/openai, Vertex AI's .../endpoints/openapi,
# Azure AI Foundry's /models, GitHub Models' /inference, Zhipu's /api/paas/v4, DeepSeek's /beta (its
# fill-in-the-middle a text completion with a suffix, its chat prefix completion), Mistral's /v1/fim (Codestral's
# fill-in-the-middle); the Responses API and Anthropic's Messages under /v1, as every provider serves them
_PATHS = [
    (re.compile(r"(^|/)chat/completions/?$"), "chat_completions"),
    (re.compile(r"(^|/)v1/responses/?$"), "responses"),
    (re.compile(r"(^|/)embeddings/?$"), "embeddings"),
    (re.compile(r"(^|/)images/(generations|edits|variations)/?$"), "images"),
    (re.compile(r"(^|/)v1/messages/?$"), "anthropic_messages"),
    (re.compile(r"(^|/)completions/?$"), "completions"),
    (re.compile(r"(^|/)audio/speech/?$"), "audio_speech"),
    (re.compile(r"(^|/)audio/(transcriptions|translations)/?$"), "audio_transcriptions"),
    # rerankers' (Cohere's v1 and v2, Jina's, Voyage's, OpenAI-compatible servers'): a query and documents
    (re.compile(r"(^|/)v[12]/rerank/?$"), "rerank"),
    # Cohere's own API (v2; its OpenAI-compatible one, /compatibility/v1/..., is OpenAI's above)
    (re.compile(r"(^|/)v2/chat/?$"), "cohere_chat"),
    (re.compile(r"(^|/)v[12]/embed/?$"), "embeddings"),
]
_GEMINI = re.compile(r"(^|/)v1(beta)?/models/(?P<model>[^/:]+):(?P<verb>generateContent|streamGenerateContent"
                     r"|countTokens|embedContent|batchEmbedContents|batchGenerateContent|predict"
                     r"|predictLongRunning)$")
# Veo's video generation (Gemini's API): an operation made (models/M:predictLongRunning), then read (GET of its
# name, free, for its own customer's keys alone) until it is done; its videos downloaded from the File API
# (GET files/F:download, free, for the customer whose operation made them)
_GEMINI_OPERATION = re.compile(r"(^|/)v1beta/(?P<name>models/[^/:]+/operations/[A-Za-z0-9_.-]{1,200})/?$")
_GEMINI_FILE_DOWNLOAD = re.compile(r"(^|/)v1beta/files/(?P<id>[A-Za-z0-9_.-]{1,200}):download$")
VIDEO_SECONDS_DEFAULT = 8  # Veo's, for a request that names no durationSeconds
VIDEO_SECONDS_MAX = 60
VIDEOS_MAX = 4
# Gemini's explicit context caches (the Gemini API's cachedContents; Vertex AI's under a project's location): one
# made (POST: its tokens written, at input, and kept for the time it is set to live, at cache_storage); one read
# or deleted (free, for its own customer's keys alone, as requests that use it: cachedContent); the account's list
# of every customer's not offered. Known by "cachedContents/<id>" (Vertex AI's full name ends so).
_CACHED_CONTENTS = re.compile(r"(^|/)v1(alpha|beta|beta1)?/(projects/[^/]+/locations/[^/]+/)?cachedContents/?$")
_CACHED_CONTENT = re.compile(r"(^|/)v1(alpha|beta|beta1)?/(projects/[^/]+/locations/[^/]+/)?cachedContents/"
                             r"(?P<id>[A-Za-z0-9_.-]{1,200})/?$")
CACHE_SECONDS_DEFAULT = 3600  # the time to live of a cache whose request sets none (Google's)
CACHE_SECONDS_MAX = 366 * 86400  # the longest policyd holds one for (Google sets no bound)
# Gemini's batch mode: a batch made (models/M:batchGenerateContent, its requests inline); one read, cancelled or
# deleted (free, for its own customer's keys alone); its id is its name, "batches/<id>"
_GEMINI_BATCH = re.compile(r"(^|/)v1beta/batches/(?P<id>[A-Za-z0-9_.-]{1,200})(?P<rest>:cancel)?$")
_GEMINI_BATCH_METHODS = {"": ("GET", "DELETE"), ":cancel": ("POST",)}
# Vertex AI: Google's and Anthropic's models under a project's location, the model in the path; Gemini's
# bodies and usage, or Anthropic's (rawPredict, streamRawPredict)
_VERTEX = re.compile(r"(^|/)v1(beta1)?/projects/[^/]+/locations/(?P<location>[^/]+)"
                     r"/publishers/(?P<publisher>google|anthropic)/models/(?P<model>[^/:]+)"
                     r":(?P<verb>generateContent|streamGenerateContent|countTokens"
                     r"|rawPredict|streamRawPredict|predict|embedContent|predictLongRunning|fetchPredictOperation)$")
_VERTEX_VERBS = {"google": ("generateContent", "streamGenerateContent", "countTokens", "predict", "embedContent",
                            "predictLongRunning", "fetchPredictOperation"),
                 "anthropic": ("rawPredict", "streamRawPredict")}
_TOKEN_COUNTS = [  # and other calls free at the provider
    (re.compile(r"(^|/)v1/messages/count_tokens/?$"), "anthropic_messages"),
    (re.compile(r"(^|/)v1/responses/input_tokens/?$"), "responses"),
    (re.compile(r"(^|/)v1/moderations/?$"), "moderations"),
]
MODERATION_MODEL_DEFAULT = "omni-moderation-latest"
# streams whose usage comes only when asked for (stream_options.include_usage), which policyd always asks
STREAM_USAGE_ENDPOINTS = frozenset({"chat_completions", "completions"})
_AZURE_OPERATIONS = {"chat/completions": "chat_completions", "completions": "completions",
                     "embeddings": "embeddings", "images/generations": "images", "images/edits": "images",
                     "audio/speech": "audio_speech",
                     "audio/transcriptions": "audio_transcriptions", "audio/translations": "audio_transcriptions"}
_AZURE = re.compile(r"(^|/)openai/deployments/(?P<model>[^/]+)/(?P<operation>chat/completions|completions|embeddings"
                    r"|images/generations|images/edits|audio/speech|audio/transcriptions|audio/translations)/?$")
_AZURE_RESPONSES = re.compile(r"(^|/)openai/responses/?$")
_AZURE_DATED = re.compile(r"(^|/)openai/(?!v1/)[a-z]")  # Azure OpenAI's dated API (/openai/files, not /openai/v1/...)
BEDROCK_VERBS = ("converse", "converse-stream", "invoke", "invoke-with-response-stream", "count-tokens")
_BEDROCK = re.compile(rf"(^|/)model/(?P<model>[^/]+)/(?P<verb>{'|'.join(BEDROCK_VERBS)})/?$")
# a Bedrock runtime path, as a gateway matches it whole (its query too)
BEDROCK_PATH_REGEX = rf".*/model/[^/]+/({'|'.join(BEDROCK_VERBS)})/?([?].*)?"
# Bedrock's own tiers a request may ask for (Converse's serviceTier.type; InvokeModel's header); "default" is none
BEDROCK_TIER_HEADER = "x-amzn-bedrock-service-tier"
BEDROCK_LATENCY_HEADER = "x-amzn-bedrock-performanceconfig-latency"  # InvokeModel's performanceConfig
_COMPACTION = re.compile(r"(^|/)v1/responses/compact/?$")  # the Responses API compacting a conversation
# a response the provider stored: read (GET), deleted (DELETE), its input items (GET), cancelled (POST)
_STORED_RESPONSE_METHODS = {"": ("GET", "DELETE"), "/input_items": ("GET",), "/cancel": ("POST",)}
_STORED_RESPONSE = re.compile(r"(^|/)(v1|openai)/responses/(?P<id>[A-Za-z0-9_.-]{1,200})(?P<rest>/input_items|/cancel)?/?$")
# the Conversations API: one made (POST, free; whose it is, remembered from the reply's id); one read,
# changed or deleted, its items listed, added, read or deleted (free, for its own customer's keys alone)
_CONVERSATIONS = re.compile(r"(^|/)(v1|openai)/conversations/?$")
_CONVERSATION = re.compile(r"(^|/)(v1|openai)/conversations/(?P<id>[A-Za-z0-9_.-]{1,200})"
                           r"(?P<rest>/items(?P<item>/[A-Za-z0-9_.-]{1,200})?)?/?$")
_CONVERSATION_METHODS = {"": ("GET", "POST", "DELETE"), "/items": ("GET", "POST"), "/item": ("GET", "DELETE")}
# OpenAI's files: one uploaded (POST, free; whose it is, remembered from the reply's id); one read, its
# content downloaded, or deleted (free, for its own customer's keys alone); the account-wide list is not offered
_FILES = re.compile(r"(^|/)(v1|openai)/files/?$")
# OpenAI's Uploads API, for files past what one POST /v1/files takes (up to 8 GB, in parts of up to 64 MB): an
# upload made (free, its id remembered as the customer's), its parts added and the upload cancelled (for its
# own customer alone), and completed into a file (the file's id remembered as the customer's)
_UPLOADS = re.compile(r"(^|/)(v1|openai)/uploads/?$")
_UPLOAD = re.compile(r"(^|/)(v1|openai)/uploads/(?P<id>[A-Za-z0-9_.-]{1,200})/(?P<verb>parts|complete|cancel)/?$")
# Gemini's File API (its resumable uploads): an upload begun (POST upload/v1beta/files, free: its upload id,
# which the reply's x-goog-upload-url names, remembered as the customer's, and that URL made the gateway's own);
# its bytes sent there (free; Google's SDK sends them with no key: the upload id is what stands for the customer
# who began it); the file the last part's reply names remembered as the customer's; a file read or deleted
# (GET/DELETE v1beta/files/<id>: free, its customer's alone), and named in a request's fileData (its customer's
# alone); the account's list of files is not offered
_GEMINI_UPLOAD = re.compile(r"(^|/)upload/v1beta/files/?$")
_GEMINI_FILE = re.compile(r"(^|/)v1beta/files/(?P<id>[A-Za-z0-9_.-]{1,200})/?$")
_GEMINI_FILE_URI = re.compile(r'"file_?[uU]ri"\s*:\s*"(?:[^"]*/v1beta/)?files/(?P<id>[A-Za-z0-9_.-]{1,200})"')
GEMINI_UPLOAD_URL_HEADER = "x-goog-upload-url"
# ... a file's body and an upload's part, as the gateway's route matches them (RE2, the whole path without its
# query): their bodies stream to the provider, never read (streamed_upload); Gemini's uploads too
UPLOAD_PATH_REGEX = r"(.*/)?((v1|openai)/(files|uploads/[A-Za-z0-9_.-]+/parts)|upload/v1beta/files)/?"
_FILE = re.compile(r"(^|/)(v1|openai)/files/(?P<id>[A-Za-z0-9_.-]{1,200})(?P<rest>/content)?/?$")
# OpenAI's Batch API: a batch made (POST: held at its requests' worst cases, policyd/batches.py); one read or
# cancelled (free, for its own customer's keys alone); the account-wide list is not offered
_BATCHES = re.compile(r"(^|/)(v1|openai)/batches/?$")
_BATCH = re.compile(r"(^|/)(v1|openai)/batches/(?P<id>[A-Za-z0-9_.-]{1,200})(?P<rest>/cancel)?/?$")
_BATCH_METHODS = {"": ("GET",), "/cancel": ("POST",)}
# Anthropic's Message Batches API: a batch made of the requests in its body (POST), one read, its results
# read, cancelled or deleted (free, for its own customer's keys alone); the account-wide list is not offered
_MESSAGE_BATCHES = re.compile(r"(^|/)v1/messages/batches/?$")
_MESSAGE_BATCH = re.compile(r"(^|/)v1/messages/batches/(?P<id>[A-Za-z0-9_.-]{1,200})(?P<rest>/results|/cancel)?/?$")
_MESSAGE_BATCH_METHODS = {"": ("GET", "DELETE"), "/results": ("GET",), "/cancel": ("POST",)}
# ... a batch made, as the gateway's route matches it (RE2, the whole path): decided on longer (its file is read)
BATCHES_PATH_REGEX = r"(.*/)?((v1|openai)/batches|v1/messages/batches|v1beta/models/[^/:]+:batchGenerateContent)/?"
_FILE_METHODS = {"": ("GET", "DELETE"), "/content": ("GET",)}
# Perplexity's async chat completions (Sonar Deep Research's long runs): a job made of the chat completion under its
# body's "request", whose answer comes later, when the job is asked for (GET of it, free, for its own customer's keys
# alone; the account-wide list is not offered): held until the provider says it ended (policyd/background.py)
_ASYNC_CHAT = re.compile(r"(^|/)(async/chat/completions|v1/async/sonar)/?$")
_ASYNC_CHAT_JOB = re.compile(r"(^|/)(async/chat/completions|v1/async/sonar)/(?P<id>[A-Za-z0-9_.-]{1,200})/?$")
# a chat completion the provider stored (store: true): read, its metadata changed, deleted; its messages read
_STORED_CHAT = re.compile(r"(^|/)v1/chat/completions/(?P<id>[A-Za-z0-9_.-]{1,200})(?P<rest>/messages)?/?$")
_STORED_CHAT_METHODS = {"": ("GET", "POST", "DELETE"), "/messages": ("GET",)}
_MODELS = re.compile(r"(^|/)models/?$")  # under any prefix, as OpenAI's API is read (Gemini's /v1beta too)
_MODEL = re.compile(r"(^|/)models/(?P<model>[A-Za-z0-9_.@-]{1,200})/?$")  # one model: GET (retrieve)
_KEY_SUMMARY = re.compile(r"(^|/)v1/key/?$")
# a request asked about: its id may hold "/" (an id another key's request held first, `<id>/key:<key id>`)
REQUEST_LOOKUP_PATH_REGEX = r"(.*/)?v1/requests/.+"  # Envoy's route (RE2, matching the path without its query)
_REQUEST_LOOKUP = re.compile(r"(^|/)v1/requests/(?P<id>[^?]+?)/?$")
_REQUEST_LISTING = re.compile(r"(^|/)v1/requests/?$")
_USAGE_SUMMARY = re.compile(r"(^|/)v1/usage/?$")
# a budget the caller sets on its thread (x-thread-id): the most its requests together may be charged
THREAD_BUDGET_HEADER = "x-policyd-thread-budget"
BUDGET_HEADER = "x-policyd-budget"  # -limit, -remaining, -reset: the tightest of a request's budgets
# the most one request may hold, as its caller bounds it (beside its plan's max_request_charge)
MAX_CHARGE_HEADER = "x-policyd-max-charge"
REQUEST_LOOKUP_WAIT_SECONDS = 5  # how long GET /v1/requests/{id} waits for one in progress unless told (`wait`)

# header -> attribution field
ATTRIBUTION_HEADERS = {
    "x-trace-id": "trace_id",
    "traceparent": "traceparent",
    "x-customer-id": "customer_id",
    "x-workspace-id": "workspace_id",
    "x-project-id": "project_id",
    "x-end-user-id": "end_user_id",
    "x-agent-id": "agent_id",
    "x-thread-id": "thread_id",
    "x-session-id": "thread_id",
    "x-feature": "feature",
    "x-route": "route",
    "x-environment": "environment",
}
REQUEST_ID_HEADER = "x-policyd-request-id"  # the request id policyd sends back with every reply
IDEMPOTENCY_HEADER = "idempotency-key"  # the other name a client may give its request (one request each)
# A tracing header, not a request's name: an application passes the id of the request it is serving on to every
# call it makes for it (several model calls, an agent's loop), and Envoy makes one up where none came. Taken as
# the request's id, every call after the first was refused as a reuse. Recorded as a tag of this name instead.
CORRELATION_HEADER = "x-request-id"
TAG_HEADER_PREFIX = "x-policyd-tag-"
CUSTOMER_KEY_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")  # api-key: Azure OpenAI's
POLICYD_HEADER_PREFIX = "x-policyd-"
TRACING_HEADERS = ("traceparent", "tracestate", "x-trace-id", CORRELATION_HEADER)  # go on, as tracing means them to
# What a client tells the gateway alone, never sent on to a provider: whom a request is for and what it is part of
# (the operator's customers, their end users, threads and features: nothing a provider reads, and not its to know),
# where it came from (its address, which the gateway adds to x-forwarded-for as a proxy does), a browser's cookies
# for the gateway's own site, and policyd's instructions (its headers, x-policyd-*: the route drops these names; a
# request's tag headers, named by the client, are dropped by policyd's decision, HttpCall.policyd_headers).
GATEWAY_ONLY_HEADERS = ("cookie", *(h for h in ATTRIBUTION_HEADERS if h not in TRACING_HEADERS),
                        "x-forwarded-for", "x-envoy-external-address", REQUEST_ID_HEADER, THREAD_BUDGET_HEADER,
                        MAX_CHARGE_HEADER)
# The OpenAI organization and project a request names (the openai SDK sends them from OPENAI_ORG_ID and
# OPENAI_PROJECT_ID): the client's own account, which the operator's key does not belong to (OpenAI refuses
# it: 401 mismatched_organization). Never sent upstream; an account's own are set from its configuration.
ACCOUNT_REQUEST_HEADERS = ("openai-organization", "openai-project")
# What a provider's reply says of the operator's account, not of the customer's: its organization and project,
# and the account's own rate limits (the customer's are policyd's). Taken out before the reply reaches the client.
PROVIDER_ACCOUNT_HEADERS = (
    "openai-organization", "openai-project", "anthropic-organization-id",
    *(f"x-ratelimit-{kind}-{unit}" for kind in ("limit", "remaining", "reset") for unit in ("requests", "tokens")),
    *(f"anthropic-ratelimit-{unit}-{kind}" for unit in ("requests", "tokens", "input-tokens", "output-tokens")
      for kind in ("limit", "remaining", "reset")),
)


@dataclass
class HttpCall:
    """An HTTP request understood as a model call, or the reason it cannot be."""

    # this request's own, whatever request id its client gave it (AuthorizeInput.call_token)
    call_token: str = field(default_factory=lambda: secrets.token_hex(8))
    endpoint: str = ""
    models_listing: bool = False
    listing_shape: str = "openai"  # ... answered as the client's API lists models: openai | anthropic | gemini
    key_summary: bool = False  # GET /v1/key: answered by policyd
    request_lookup: str = ""  # GET /v1/requests/{id}: the id of the request asked about (answered by policyd)
    lookup_wait_ms: int = 0  # ... how long to wait for it to close
    request_listing: bool = False  # GET /v1/requests: the key's customer's requests (answered by policyd)
    listing_limit: int = 0  # ... how many, newest first
    listing_after: str = ""  # ... after this request (the last of the page before)
    usage_summary: bool = False  # GET /v1/usage: the key's customer's usage, summed (answered by policyd)
    usage_group_by: tuple[str, ...] = ()  # ... grouped by these (own_usage.DIMENSIONS)
    usage_bucket: str = ""  # ... and by hour, day or month
    usage_since_ms: int = 0  # ... over [since, until)
    usage_until_ms: int = 0
    usage_timezone: str = ""  # ... in buckets of this time zone's hours, days and months ("": the policy's)
    api_key: str = ""
    model: str = ""
    model_in_path: bool = False  # the path names the model (Gemini, an Azure deployment): a downgrade rewrites it
    count_tokens: bool = False  # a token count of the endpoint family (free: nothing reserved or charged)
    stored_response: str = ""  # ... or a stored response read, deleted or cancelled (free too), or a conversation
    previous_response: str = ""  # the stored response a Responses API request continues
    creates: str = ""  # POST /v1/conversations, /v1/files: free, settled with the new id (CREATABLE)
    creates_at: str = ""  # ... at Azure OpenAI ("azure") for its clients, else at OpenAI ("")
    files: tuple[str, ...] = ()  # the files (by id) the input refers to
    conversation: str = ""  # the conversation a Responses API request adds to
    stream: bool = False
    body: dict[str, Any] | MultipartForm | None = None  # JSON, or a speech-to-text request's form
    max_output_tokens: int = 0
    output_cap_param: str = ""  # the field the client's cap is in, where not its API's first (Shape's)
    prompt_bytes: int = 0
    message_count: int = 0
    image_count: int = 0
    input_tokens: int = 0  # counted from the request (a prompt of token ids), 0 = estimated
    choices: int = 0  # completions asked for (n, candidateCount); 0 = one
    web_searches: int = 0  # the most provider-side web searches the request allows (0: none, or no bound given)
    service_tier: str = ""  # the processing tier asked for (OpenAI's service_tier); "" = the default
    unseen_input: bool = False  # input billed but not in the body (a previous response, a file, a server tool...)
    seconds: int = 0  # the audio's seconds, when its header tells them (speech to text)
    audio_bytes: int = 0  # the audio's size, when it does not
    cache_write: str = ""  # the longest cache the input may be written to: 5m | 1h (Anthropic's; OpenAI's 30m | 12h) | ""
    audio_output: bool = False  # the reply may be spoken (modalities include "audio")
    file_searches: int = 0  # the most file searches the request allows (0: none, or no bound given)
    unbounded_web_search_tools: int = 0  # web search tools given no bound (policyd sets the plan's)
    unbounded_file_search: bool = False  # a file_search tool given no bound (max_tool_calls)
    image_model: str = ""  # the image_generation tool's model: its images are priced at that model's prices
    image_model_default: bool = False  # the tool names none: the plan's is set in it (Decision.image_model)
    image_generation_calls: int = 0  # the most calls the request allows (max_tool_calls; 0: no bound given)
    partial_images: int = 0  # partial images each streamed image_generation call sends
    # other models the provider may run for it, and bill: Anthropic's server-side fallbacks and its advisor tool's,
    # or a router's fallbacks (`models`: fallbacks_routed, the one that serves alone billed) (Shape's)
    fallback_models: tuple[str, ...] = ()
    fallbacks_routed: bool = False
    fallbacks_param: str = ""  # the field the fallbacks came in, where not the endpoint's own (Shape's)
    advisor_model: str = ""
    advisor_calls: int = 0
    advisor_max_tokens: int = 0
    containers: int = 0  # hosted containers the request may have the provider make (code_interpreter, shell)
    container_memory: str = ""  # ... the largest memory limit they ask for
    image_scale: int = 0  # how many of a model's most per image one image may bill (its size, a GIF's frames)
    maps_grounding: bool = False  # Gemini's googleMaps tool: a grounded prompt is billed apart
    documents: int = 0  # a rerank's documents ...
    document_bytes: int = 0  # ... their bytes together ...
    document_tokens_max: int = 0  # ... and the most tokens the provider reads of each (0: no bound)
    least_output_cap: int = 0  # the least cap the provider accepts (Anthropic's past its thinking budget_tokens)
    search_context_size: str = ""  # web_search_options.search_context_size (Perplexity's, OpenAI's search models)
    web_results: int = 0  # the most results a router's web search may return, where the request bounds them ...
    web_results_per_search: int = 0  # ... its server tool given no bound: each search's (policyd sets the total)
    thread_budget: int = 0  # x-policyd-thread-budget: its caller's budget of the thread's total charge (nanos)
    max_charge: int = 0  # x-policyd-max-charge: the most its caller lets this request hold (nanos)
    stores_reply: bool = False  # a chat completion the provider keeps (store: true): read and deleted by its id
    background: bool = False  # a Responses API background response: it goes on at the provider after its reply
    deletes_stored: bool = False  # DELETE of the stored response (or conversation, file) it names
    batch_file: str = ""  # POST /v1/batches: the input file of the batch made (its requests: policyd/batches.py)
    batch_url: str = ""  # ... the endpoint its requests are for ("/v1/chat/completions")
    batch_seconds: int = 0  # ... the time the provider has to run it (its completion_window)
    batch_inline: list[Any] | None = None  # an Anthropic message batch: its requests, given in its body
    service_tier_implied: bool = False  # the provider's default tier (Anthropic's priority), not one asked for
    geo: str = ""  # the geography the path runs it in (Vertex AI's regional endpoints), priced apart (Shape's)
    compaction: bool = False  # a Responses API compaction (POST /v1/responses/compact): it takes no output cap
    body_decoded: bool = False  # the client compressed its body (Content-Encoding): read, and sent on, decoded
    key_in_query: bool = False  # the query holds a `key` (Gemini's ?key=): never sent upstream
    problem: str = ""  # machine reason when the request is unusable
    problem_message: str = ""
    problem_param: str = ""
    attribution: Attribution = field(default_factory=Attribution)
    policyd_headers: tuple[str, ...] = ()  # the request's headers named x-policyd-*: policyd's, never a provider's
    client_address: str = ""
    user_agent: str = ""

    @property
    def batch(self) -> bool:
        """A batch made: of the requests in a file (OpenAI's), or in its body (Anthropic's); policyd/batches.py."""
        return bool(self.batch_file) or self.batch_inline is not None

    @property
    def usage_unasked(self) -> bool:
        """A streamed chat or text completion whose client did not ask for its usage: policyd asks for it
        (stream_options.include_usage) and keeps the usage event from the client (policyd/unasked_usage.py)."""
        if not self.stream or self.endpoint not in STREAM_USAGE_ENDPOINTS or not isinstance(self.body, dict):
            return False
        options = self.body.get("stream_options")
        return not (isinstance(options, dict) and options.get("include_usage") is True)

    def usage_kept_from_client(self, stream_usage_reported: bool) -> bool:
        """`usage_unasked`, where policyd is the one that asks: not of a provider that reports a stream's usage
        unasked (Decision.stream_usage_reported), whose usage reaches the client as it would without policyd."""
        return self.usage_unasked and not stream_usage_reported

    @property
    def keeps_its_cap(self) -> bool:
        """No output cap is written into the request: it gives one, or takes none (a compaction, whose
        output is its own size: reserved at the model's or plan's default cap)."""
        return self.max_output_tokens > 0 or self.compaction

    def keeps_its_cap_under(self, decided: int) -> bool:
        """`keeps_its_cap`, unless the decision holds a smaller cap than the request gives (a plan that
        fits the cap to what the wallet can hold): then the decision's is written over the request's."""
        return self.keeps_its_cap and not (decided and self.max_output_tokens > decided)

    def authorize_input(self) -> AuthorizeInput:
        return AuthorizeInput(
            api_key=self.api_key, endpoint=self.endpoint, model=self.model, attribution=self.attribution,
            shape=Shape(prompt_bytes=self.prompt_bytes, message_count=self.message_count,
                        max_output_tokens=self.max_output_tokens, image_count=self.image_count, stream=self.stream,
                        choices=self.choices, input_tokens=self.input_tokens, web_searches=self.web_searches,
                        service_tier=self.service_tier, service_tier_implied=self.service_tier_implied, geo=self.geo,
                        unseen_input=self.unseen_input, seconds=self.seconds,
                        audio_bytes=self.audio_bytes, cache_write=self.cache_write, audio_output=self.audio_output,
                        file_searches=self.file_searches, unbounded_web_search_tools=self.unbounded_web_search_tools,
                        unbounded_file_search=self.unbounded_file_search, image_model=self.image_model,
                        image_model_default=self.image_model_default,
                        image_generation_calls=self.image_generation_calls, partial_images=self.partial_images,
                        containers=self.containers, container_memory=self.container_memory,
                        image_scale=self.image_scale, maps_grounding=self.maps_grounding,
                        output_cap_fixed=self.compaction, output_cap_param=self.output_cap_param,
                        documents=self.documents, document_bytes=self.document_bytes,
                        document_tokens_max=self.document_tokens_max, least_output_cap=self.least_output_cap,
                        search_context_size=self.search_context_size, fallback_models=self.fallback_models,
                        advisor_model=self.advisor_model, advisor_calls=self.advisor_calls,
                        advisor_max_tokens=self.advisor_max_tokens, fallbacks_routed=self.fallbacks_routed,
                        web_results=self.web_results, web_results_per_search=self.web_results_per_search,
                        fallbacks_param=self.fallbacks_param),
            client_address=self.client_address, user_agent=self.user_agent, count_tokens=self.count_tokens,
            stored_response=self.stored_response, deletes_stored=self.deletes_stored,
            previous_response=self.previous_response,
            creates=self.creates, creates_at=self.creates_at, conversation=self.conversation, files=self.files,
            charge_held_on_expiry=True,  # the gateway sends it on to the provider
            call_token=self.call_token, thread_budget=self.thread_budget, max_charge=self.max_charge,
        )


@dataclass(frozen=True)
class Endpoint:
    """What a request's method and path say."""

    family: str = ""  # one of ENDPOINTS, "" when unknown
    model: str = ""  # the model the path names (Gemini, an Azure deployment), else ""
    models_listing: bool = False
    key_summary: bool = False
    request_lookup: str = ""
    request_listing: bool = False
    usage_summary: bool = False
    count_tokens: bool = False
    stored_response: str = ""  # the id of a stored response the request reads, deletes or cancels, or a conversation's
    creates: str = ""  # a conversation or a file made (CREATABLE)
    compaction: bool = False  # POST /v1/responses/compact: billed as a response, it takes no output cap
    refers_to: str = ""  # the customer's own upload a file is made of (POST /v1/uploads/{id}/complete)
    batch: bool = False  # POST /v1/batches: a batch made of the requests in a file (policyd/batches.py)
    stream: bool = False  # the path asks for a stream (Bedrock's converse-stream, invoke-with-response-stream)
    bedrock_invoke: bool = False  # Bedrock's InvokeModel: the body is the model's own API's (Anthropic's alone read)
    imagen: bool = False  # Imagen's :predict: its images asked in parameters.sampleCount
    async_chat: bool = False  # Perplexity's async chat completion: a job, its chat completion under "request"
    operation_in_body: bool = False  # Vertex AI's fetchPredictOperation: the operation read is named in the body
    cache_update: bool = False  # an explicit cache's time to live changed (PATCH cachedContents/<id>)
    geo: str = ""  # the geography the path runs the request in, priced apart (Shape.geo)


def endpoint_of(method: str, path: str) -> Endpoint:
    path = path.split("?", 1)[0]
    if method.upper() == "GET" and _MODELS.search(path):
        return Endpoint(models_listing=True)
    one = _MODEL.search(path) if method.upper() == "GET" else None
    if one:
        return Endpoint(model=one.group("model"), models_listing=True)
    if method.upper() == "GET" and _KEY_SUMMARY.search(path):
        return Endpoint(key_summary=True)
    lookup = _REQUEST_LOOKUP.search(path) if method.upper() == "GET" and "requests/" in path else None
    if lookup:
        return Endpoint(request_lookup=unquote(lookup.group("id")))
    if method.upper() == "GET" and _REQUEST_LISTING.search(path):
        return Endpoint(request_listing=True)
    if method.upper() == "GET" and _USAGE_SUMMARY.search(path):
        return Endpoint(usage_summary=True)
    if "async/" in path:  # Perplexity's async chat: before its chat completions' own pattern
        if method.upper() == "POST" and _ASYNC_CHAT.search(path):
            return Endpoint("chat_completions", async_chat=True)
        job = _ASYNC_CHAT_JOB.search(path) if method.upper() == "GET" else None
        if job:
            return Endpoint("chat_completions", count_tokens=True, stored_response=job.group("id"))
        if _ASYNC_CHAT.search(path):  # the account's every job, every customer's: not offered
            return Endpoint()
    azure = _AZURE.search(path)  # first: a deployment may be named like a path segment ("v1")
    if azure:
        return Endpoint(_AZURE_OPERATIONS[azure.group("operation")], azure.group("model"))
    for pattern, name in _PATHS:
        if pattern.search(path):
            return Endpoint(name)
    bedrock = _BEDROCK.search(path) if "model/" in path and method.upper() == "POST" else None
    if bedrock:
        verb, model = bedrock.group("verb"), unquote(bedrock.group("model"))
        if verb.startswith("invoke"):
            return Endpoint("anthropic_messages", model, stream=verb.endswith("stream"), bedrock_invoke=True)
        return Endpoint("bedrock_converse", model, stream=verb.endswith("stream"), count_tokens=verb == "count-tokens")
    if method.upper() == "POST" and _COMPACTION.search(path):
        return Endpoint("responses", compaction=True)
    for pattern, name in _TOKEN_COUNTS:
        if pattern.search(path):
            return Endpoint(name, count_tokens=True)
    vertex = _VERTEX.search(path)
    if vertex:
        publisher, verb = vertex.group("publisher"), vertex.group("verb")
        if verb not in _VERTEX_VERBS[publisher]:
            return Endpoint()
        if verb == "predict":
            return _imagen(vertex.group("model"))
        if verb == "embedContent":  # Vertex AI's Gemini embeddings (their usage in usageMetadata)
            return Endpoint("embeddings", vertex.group("model"))
        if verb == "predictLongRunning":  # Vertex AI's Veo
            return Endpoint("videos", vertex.group("model"))
        if verb == "fetchPredictOperation":  # a Veo operation read (its name in the body): free, its customer's
            return Endpoint("videos", vertex.group("model"), count_tokens=True, operation_in_body=True)
        if publisher == "anthropic" and vertex.group("model") == "count-tokens":  # Claude's token count on Vertex
            return Endpoint("anthropic_messages", count_tokens=True)  # the model in its body
        if publisher == "anthropic":  # Claude at a region's endpoint (or a multi-region's), not the global one
            return Endpoint("anthropic_messages", vertex.group("model"),
                            geo=REGIONAL_GEO if vertex.group("location") != "global" else "")
        return Endpoint("gemini_generate_content", vertex.group("model"), count_tokens=verb == "countTokens")
    gemini = _GEMINI.search(path)
    if gemini:
        if gemini.group("verb") == "predict":
            return _imagen(gemini.group("model"))
        if gemini.group("verb") == "predictLongRunning":
            return Endpoint("videos", gemini.group("model"))
        if gemini.group("verb") in ("embedContent", "batchEmbedContents"):
            return Endpoint("embeddings", gemini.group("model"))
        if gemini.group("verb") == "batchGenerateContent":
            return Endpoint("gemini_generate_content", gemini.group("model"), batch=method.upper() == "POST")
        return Endpoint("gemini_generate_content", gemini.group("model"),
                        count_tokens=gemini.group("verb") == "countTokens")
    if "cachedContents" in path:  # an explicit cache (Gemini's)
        if method.upper() == "POST" and _CACHED_CONTENTS.search(path):
            return Endpoint("cached_contents")
        one = _CACHED_CONTENT.search(path)
        if one and method.upper() in ("GET", "DELETE"):
            return Endpoint("cached_contents", count_tokens=True, stored_response=CACHED_CONTENT_PREFIX + one["id"])
        if one and method.upper() == "PATCH":
            return Endpoint("cached_contents", stored_response=CACHED_CONTENT_PREFIX + one["id"], cache_update=True)
        return Endpoint()  # the account's list: every customer's
    if "files" in path and "v1beta/" in path:  # Gemini's File API
        if method.upper() == "POST" and _GEMINI_UPLOAD.search(path):
            return Endpoint("gemini_generate_content", creates="file")
        one = _GEMINI_FILE.search(path)
        if one and method.upper() in ("GET", "DELETE"):
            return Endpoint("gemini_generate_content", count_tokens=True, stored_response=one["id"])
    if method.upper() == "GET" and "v1beta/" in path:  # a Veo operation read, or its video downloaded
        operation = _GEMINI_OPERATION.search(path)
        if operation:
            return Endpoint("videos", count_tokens=True, stored_response=operation.group("name"))
        download = _GEMINI_FILE_DOWNLOAD.search(path)
        if download:
            return Endpoint("videos", count_tokens=True, stored_response=download.group("id"))
    if _AZURE_RESPONSES.search(path):
        return Endpoint("responses")
    stored = _STORED_RESPONSE.search(path)
    if stored and stored.group("id") != "input_tokens" and \
            method.upper() in _STORED_RESPONSE_METHODS[stored.group("rest") or ""]:
        return Endpoint("responses", count_tokens=True, stored_response=stored.group("id"))
    stored_chat = _STORED_CHAT.search(path)
    if stored_chat and method.upper() in _STORED_CHAT_METHODS[stored_chat.group("rest") or ""]:
        return Endpoint("chat_completions", count_tokens=True, stored_response=stored_chat.group("id"))
    if method.upper() == "POST" and _CONVERSATIONS.search(path):
        return Endpoint("responses", creates="conversation")
    if method.upper() == "POST" and (_FILES.search(path) or _UPLOADS.search(path)):
        return Endpoint("responses", creates="file")
    upload = _UPLOAD.search(path) if method.upper() == "POST" else None
    if upload and upload.group("verb") == "complete":
        return Endpoint("responses", creates="file", refers_to=upload.group("id"))
    if upload:
        return Endpoint("responses", count_tokens=True, stored_response=upload.group("id"))
    if method.upper() == "POST" and _BATCHES.search(path):
        return Endpoint("responses", batch=True)  # the family its requests' file names (parse_call)
    if method.upper() == "POST" and _MESSAGE_BATCHES.search(path):
        return Endpoint("anthropic_messages", batch=True)
    gemini_batch = _GEMINI_BATCH.search(path)
    if gemini_batch and method.upper() in _GEMINI_BATCH_METHODS[gemini_batch.group("rest") or ""]:
        return Endpoint("gemini_generate_content", count_tokens=True, stored_response=f"batches/{gemini_batch.group('id')}")
    message_batch = _MESSAGE_BATCH.search(path)
    if message_batch and method.upper() in _MESSAGE_BATCH_METHODS[message_batch.group("rest") or ""]:
        return Endpoint("anthropic_messages", count_tokens=True, stored_response=message_batch.group("id"))
    batch = _BATCH.search(path)
    if batch and method.upper() in _BATCH_METHODS[batch.group("rest") or ""]:
        return Endpoint("responses", count_tokens=True, stored_response=batch.group("id"))
    stored_file = _FILE.search(path)
    if stored_file and method.upper() in _FILE_METHODS[stored_file.group("rest") or ""]:
        return Endpoint("responses", count_tokens=True, stored_response=stored_file.group("id"))
    conversation = _CONVERSATION.search(path)
    if conversation:
        rest = "/item" if conversation.group("item") else conversation.group("rest") or ""
        if method.upper() in _CONVERSATION_METHODS[rest]:
            return Endpoint("responses", count_tokens=True, stored_response=conversation.group("id"))
    return Endpoint()


def request_lookup_asked(method: str, path: str) -> bool:
    """GET /v1/requests/{id}: answered by policyd after waiting for the request to close (request_lookup)."""
    return method.upper() == "GET" and _REQUEST_LOOKUP.search(path.split("?", 1)[0]) is not None


def batch_made(method: str, path: str) -> bool:
    """POST /v1/batches (decided on longer than other requests: its input file is read, policyd/batches.py),
    Anthropic's POST /v1/messages/batches, or Gemini's POST /v1beta/models/M:batchGenerateContent."""
    path = path.split("?", 1)[0]
    gemini = _GEMINI.search(path)
    return method.upper() == "POST" and (_BATCHES.search(path) or _MESSAGE_BATCHES.search(path) or
                                         gemini is not None and gemini.group("verb") == "batchGenerateContent")


def streamed_upload(method: str, path: str) -> bool:
    """A file uploaded (OpenAI's Files API, up to the provider's 512 MB; a part of an upload, up to 64 MB): free,
    decided on its headers, its body never read, so the gateway streams it to the provider instead of holding
    it (its route: Envoy sends policyd no body, UPLOAD_PATH_REGEX); other bodies are decided on and capped at
    REQUEST_BODY_BYTES_MAX."""
    if method.upper() != "POST":
        return False
    path = path.split("?", 1)[0]
    upload = _UPLOAD.search(path)
    return _FILES.search(path) is not None or upload is not None and upload.group("verb") == "parts" or \
        _GEMINI_UPLOAD.search(path) is not None


QUERY_KEY = "key"  # Gemini's ?key=API_KEY: the customer's key when no header carries one


def query_key(path: str) -> str | None:
    """The `key` of a path's query, None when it has none."""
    _, sep, query = path.partition("?")
    if sep:
        for name, value in parse_qsl(query, keep_blank_values=True):
            if name == QUERY_KEY:
                return value.strip()
    return None


def without_query_key(path: str) -> str:
    """The path as it goes upstream: the customer's `key` taken out of its query, the rest as it was."""
    base, sep, query = path.partition("?")
    if not sep:
        return path
    kept = [part for part in query.split("&") if unquote_plus(part.split("=", 1)[0]) != QUERY_KEY]
    return f"{base}?{'&'.join(kept)}" if kept else base


def upstream_path(path: str, upstream_model: str, requested_model: str) -> str:
    """The path as it goes upstream: the customer's `key` taken out of its query and, where the model
    is in the path (Gemini, Vertex AI, an Azure deployment), the served model as the provider names it in
    place of the requested one (a downgrade, a fallback, a model the price table names otherwise)."""
    path = without_query_key(path)
    if not upstream_model or upstream_model == requested_model:
        return path
    base, sep, query = path.partition("?")
    named = _GEMINI.search(base) or _VERTEX.search(base) or _AZURE.search(base) or _BEDROCK.search(base)
    if named is None:
        return path
    segment = quote(upstream_model, safe="@-._~")  # one path segment, whatever the name holds
    return f"{base[:named.start('model')]}{segment}{base[named.end('model'):]}{sep}{query}"


def customer_key(headers: dict[str, str]) -> str:
    value = headers.get("authorization", "")
    if value[:7].lower() == "bearer ":
        return value[7:].strip()
    return (headers.get("x-api-key") or headers.get("api-key") or headers.get("x-goog-api-key") or "").strip()


def _text_bytes(value: Any, depth: int = 0) -> int:
    """UTF-8 bytes of every string in a JSON value (what the strict input bound counts)."""
    if depth > JSON_DEPTH_MAX:
        return 0
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, list):
        return sum(_text_bytes(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(_text_bytes(v, depth + 1) for k, v in value.items() if k not in ("model", "stream"))
    return 0


# Top-level fields that carry no text the provider bills: the model, switches, ids of stored things (their
# input is counted apart, as unseen), and the caller's own labels. Every other field is prompt.
_NOT_PROMPT_FIELDS = frozenset({"model", "stream", "stream_options", "metadata", "user", "safety_identifier",
                                "prompt_cache_key", "previous_response_id", "conversation", "cachedContent",
                                "cached_content", "labels", "include", "logit_bias", "service_tier", "store",
                                # Bedrock's: Converse's settings and labels, InvokeModel's API version
                                "inferenceConfig", "performanceConfig", "serviceTier", "requestMetadata",
                                "additionalModelResponseFieldPaths", "guardrailConfig", "anthropic_version",
                                # an explicit cache's: its time to live, its name for people, its key
                                "ttl", "expireTime", "expire_time", "displayName", "display_name", "kmsKeyName",
                                "kms_key_name"})
# Fields that hold the prompt's text (messages, instructions, input): the bytes of their strings, as the
# strict bound is proven for (tests/test_estimates.py). Any other object or list (tool definitions,
# legacy functions, a response schema, a prediction, a tool config) is billed as the provider renders
# it, names and all, which is no longer than its JSON: its JSON's bytes are counted.
_PROMPT_TEXT_FIELDS = frozenset({"messages", "input", "prompt", "system", "contents", "instructions", "content",
                                 "requests", "systemInstruction", "system_instruction"})


def _prompt_bytes(data: dict[str, Any]) -> int:
    """The bytes of a body that bound (strict) or estimate the input the provider bills for it."""
    total = 0
    for name, value in data.items():
        if name in _NOT_PROMPT_FIELDS:
            continue
        if name in _PROMPT_TEXT_FIELDS or isinstance(value, str):
            total += _text_bytes(value)
        elif isinstance(value, (dict, list)):
            total += len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    return total


# The output cap each API reads is in the fields domain.OUTPUT_CAP_FIELDS names. A cap in a field the API
# does not read bounds nothing: policyd writes its own where the API reads it. A chat completion may give
# two, and OpenAI-compatible providers differ on which one wins: the larger is reserved.
_GEMINI_GENERATION_CONFIG = ("generationConfig", "generation_config")  # Gemini reads either name of a field
_GEMINI_OUTPUT_CAP = ("maxOutputTokens", "max_output_tokens")


def _generation_config(data: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A Gemini body's generation config ({} when it gives none), and what is wrong with it ("" when
    nothing): the output cap is written into it, so it must be one object, under one of its names."""
    given = [data[k] for k in _GEMINI_GENERATION_CONFIG if data.get(k) is not None]
    if any(not isinstance(config, dict) for config in given):
        return {}, "generationConfig must be an object"
    if len(given) > 1:
        return {}, "a request gives its generation config once, as generationConfig or generation_config"
    return (given[0] if given else {}), ""


def _gemini_field(config: dict[str, Any], *names: str) -> Any:
    return next((config[n] for n in names if config.get(n) is not None), None)


def _gemini_count(value: Any) -> int:
    """A count as Gemini reads it (protobuf's JSON: 3, 3.0 and "3" alike); 0 when it is not one."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return _count(value)


def _output_cap(endpoint: str, data: dict[str, Any], generation: dict[str, Any]) -> tuple[int, str]:
    """(the largest output cap the request gives where its API reads one, 0 for none; the field of a cap the
    API would refuse or read as none, or past any count policyd holds (QUANTITY_MAX), "" when every cap given
    is a count). Gemini reads 0 as no cap."""
    if endpoint == "bedrock_converse":
        given = _dict_of(data, "inferenceConfig").get("maxTokens")
        if given is not None and not 0 < _count(given) <= QUANTITY_MAX:
            return 0, "inferenceConfig.maxTokens"
        return _count(given), ""
    if endpoint == "gemini_generate_content":
        given = _gemini_field(generation, *_GEMINI_OUTPUT_CAP)
        cap = _gemini_count(given)
        usable = cap <= QUANTITY_MAX and (cap or given is None or given in (0, "0"))
        return (cap, "") if usable else (0, "generationConfig.maxOutputTokens")
    cap = 0
    for name in OUTPUT_CAP_FIELDS.get(endpoint, ()):
        given = data.get(name)
        if given is not None and not 0 < _count(given) <= QUANTITY_MAX:
            return 0, name
        cap = max(cap, _count(given))
    return cap, ""


def _dict_of(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    return value if isinstance(value, dict) else {}


def _depth(value: Any, depth: int = 0) -> int:
    if depth > JSON_DEPTH_MAX:
        return depth
    if isinstance(value, dict):
        return max([_depth(v, depth + 1) for v in value.values()] or [depth])
    if isinstance(value, list):
        return max([_depth(v, depth + 1) for v in value] or [depth])
    return depth


class _NamedTwice(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _named_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object of a request body, each of its names given once. Of a name given twice, Python reads the
    last value and some providers' parsers the first: the request policyd held for and the one the provider
    serves could differ (`"max_tokens": 100000, "max_tokens": 10`), so such a body is refused."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _NamedTwice(name)
            seen.add(name)
    return data


_REQUEST_JSON = json.JSONDecoder(object_pairs_hook=_named_once)

# Fields policyd reads to hold and charge a request, and the JSON type each must have. OpenAI refuses
# another type; an OpenAI-compatible server with a lax parser reads "true" as true and "3" as 3, and would
# stream a reply policyd took for one not streamed (asking no usage for it, reading no events), or make
# choices policyd did not hold for: a value of another type is refused here, before the provider.
_FLAG_FIELDS = ("stream", "background", "store")
_COUNT_FIELDS = ("n", "best_of", "max_tool_calls")
_TOOL_COUNT_FIELDS = ("max_uses", "partial_images")


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def _mistyped(data: dict[str, Any]) -> tuple[str, str] | None:
    """(the field, what it must be) of the first field policyd reads whose value is of another type."""
    for name in _FLAG_FIELDS:
        if data.get(name) is not None and not isinstance(data[name], bool):
            return name, "true or false"
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return "stream_options", "an object"
    if options and options.get("include_usage") is not None and not isinstance(options["include_usage"], bool):
        return "stream_options.include_usage", "true or false"
    for name in _COUNT_FIELDS:
        if data.get(name) is not None and not _whole(data[name]):
            return name, "a whole number"
    for tool in _tools(data):
        for name in _TOOL_COUNT_FIELDS:
            if tool.get(name) is not None and not _whole(tool[name]):
                return f"tools.{name}", "a whole number"
    return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _count(value: Any) -> int:
    """A count as a provider reads it: 3 and 3.0 alike (a count policyd cannot read is left to the provider,
    which refuses it)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return _int(value)


def _token_ids(value: Any) -> int:
    """Tokens of an input given as token ids (a list of them, or a list of such lists), which its bytes do
    not bound: counted, not estimated. 0 when the input is text."""
    if not isinstance(value, list) or not value:
        return 0
    if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return len(value)
    if all(isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p) for p in value):
        return sum(len(p) for p in value)
    return 0


def _search_bound(endpoint: str, data: dict[str, Any], kind: str = "web_search") -> int:
    """The most searches of a kind (web_search, file_search) the provider may run for this request, where
    the request bounds them: Anthropic's web search tool's `max_uses`, the Responses API's `max_tool_calls`
    with a search tool (which bounds every tool's calls together: each kind is reserved up to it)."""
    tools = _search_tools(data, kind)
    if not tools:
        return 0
    if endpoint == "anthropic_messages":
        return sum(_count(t.get("max_uses")) for t in tools)
    if endpoint == "responses":
        return _count(data.get("max_tool_calls"))
    return 0


def _tools(data: dict[str, Any]) -> list[dict[str, Any]]:
    listed = data.get("tools")
    return [t for t in listed if isinstance(t, dict)] if isinstance(listed, list) else []


_SEARCH_TOOL_KINDS = {"web_search": ("web_search", "x_search")}  # xAI's searches of X are billed as web searches


def _search_tools(data: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The request's search tools of a kind; web searches are also xAI's searches of X (x_search), billed alike."""
    tools = _tools(data)
    if not tools:
        return tools
    kinds = _SEARCH_TOOL_KINDS.get(kind, (kind,))
    return [t for t in tools if str(t.get("type", "")).startswith(kinds)]


# An image model's output_tokens_per_image is the most one image of the standard sizes bills (up to
# 1536x1024). Larger sizes (newer models draw up to 3840x2160) bill more, about by their area, and a GIF
# bills each of its frames (OpenAI's default: 9).
STANDARD_IMAGE_PIXELS = 1536 * 1024
GIF_FRAMES_DEFAULT = 9


def image_scale(size: Any, output_format: Any, frame_count: Any) -> int:
    """How many of a model's most per image one image of this size and format may bill."""
    scale = 1
    if isinstance(size, str):
        width, _, height = size.strip().lower().partition("x")
        if width.isdigit() and height.isdigit() and len(width) < 7 and len(height) < 7:
            scale = max(1, -(-int(width) * int(height) // STANDARD_IMAGE_PIXELS))
    if isinstance(output_format, str) and output_format.strip().lower() == "gif":
        frames = frame_count if isinstance(frame_count, int) and not isinstance(frame_count, bool) else \
            int(frame_count) if isinstance(frame_count, str) and frame_count.strip().isdigit() else 0
        scale *= min(frames, IMAGE_SCALE_MAX) if frames > 0 else GIF_FRAMES_DEFAULT
    return min(scale, IMAGE_SCALE_MAX)  # past it the provider refuses the request: held as the most


def _new_containers(tools: list[dict[str, Any]]) -> tuple[int, str]:
    """The hosted containers a Responses API request may have the provider make, each billed: one a
    code_interpreter tool given an "auto" container (a container's id names one made before), one a
    shell tool in a "container_auto" environment; and the largest memory limit they ask for."""
    asked = []
    for tool in tools:
        where = tool.get("container") if tool.get("type") == "code_interpreter" else \
            tool.get("environment") if tool.get("type") == "shell" else None
        if isinstance(where, dict) and where.get("type") in ("auto", "container_auto"):
            memory = where.get("memory_limit")
            asked.append(memory[:16] if isinstance(memory, str) and memory else CONTAINER_MEMORY_DEFAULT)
    return len(asked), max(asked, key=_memory_order, default="")


def _memory_order(memory: str) -> tuple[int, str]:
    """A memory limit's size ("64g" > "16g" > "4g" > "1g"); one policyd cannot read sorts last, by name."""
    digits = memory[:-1]
    return (int(digits), memory) if memory[-1:] in ("g", "G") and digits.isdigit() else (-1, memory)


def _unbounded_web_search(tool: dict[str, Any]) -> bool:
    """An Anthropic web search tool given no `max_uses`."""
    return str(tool.get("type", "")).startswith("web_search") and not _count(tool.get("max_uses"))


def _advisor(tool: Any) -> bool:
    """An Anthropic advisor tool (advisor_20260301: another model the request's model consults)."""
    return isinstance(tool, dict) and str(tool.get("type", "")).startswith("advisor")


def _other_models(call: HttpCall, data: dict[str, Any]) -> tuple[str, str] | None:
    """Other models Anthropic may run for a message, and bill beside it: its server-side fallbacks
    (`fallbacks`: [{"model": ...}], up to three) and its advisor tool's (a tool of type advisor_*: its
    `model`, `max_uses`, `max_tokens`). The problem, if any, as (message, param)."""
    fallbacks = data.get("fallbacks")
    if fallbacks is not None:
        if not isinstance(fallbacks, list) or len(fallbacks) > FALLBACK_MODELS_MAX or not all(
                isinstance(f, dict) and isinstance(f.get("model"), str) and f["model"] for f in fallbacks):
            return f"fallbacks must be a list of up to {FALLBACK_MODELS_MAX} {{\"model\": ...}}", "fallbacks"
        call.fallback_models = tuple(f["model"][:256] for f in fallbacks)
    advisors = [t for t in _tools(data) if _advisor(t)]
    if len(advisors) > 1 or (advisors and not (isinstance(advisors[0].get("model"), str) and advisors[0]["model"])):
        return "an advisor tool names its model, and a request has one", "tools"
    if advisors:
        call.advisor_model = advisors[0]["model"][:256]
        call.advisor_calls, call.advisor_max_tokens = _count(advisors[0].get("max_uses")), \
            _count(advisors[0].get("max_tokens"))
    return None


# endpoints where a router (OpenRouter, and gateways of its kind) reads `models`, the fallbacks it tries in turn,
# and its own extras (`plugins`, its `openrouter:*` tools): Anthropic's Messages too (OpenRouter's /v1/messages;
# Anthropic's API refuses the field)
ROUTED_ENDPOINTS = frozenset({"chat_completions", "completions", "responses", "anthropic_messages"})


def _routed_models(call: HttpCall, data: dict[str, Any]) -> tuple[str, str] | None:
    """A router's fallback models (OpenRouter's `models`: tried in turn until one serves, the one that served
    alone billed), besides the request's `model` (the list's first when it names none): up to
    ROUTED_FALLBACKS_MAX, the model itself and repeats once. The problem, if any, as (message, param)."""
    models = data["models"]
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        return "models must be a list of model names", "models"
    others = _routed_fallbacks(data)
    if len(others) > ROUTED_FALLBACKS_MAX:
        return f"models names at most {ROUTED_FALLBACKS_MAX} models besides the request's own", "models"
    call.fallback_models, call.fallbacks_routed = others, bool(others)
    return None


# endpoints where a gateway of LiteLLM's kind reads `fallbacks` (model names, or {"model": ...}) and
# `context_window_fallback_dict` (the model to use instead when a prompt passes the model's window): tried in turn
# when a model fails, the one that served billed. OpenAI's API refuses the fields; Anthropic's `fallbacks` is its own.
LISTED_FALLBACK_ENDPOINTS = frozenset({"chat_completions", "completions", "responses"})


def _listed_fallbacks(call: HttpCall, data: dict[str, Any]) -> tuple[str, str] | None:
    """A gateway's fallbacks of LiteLLM's kind, as a router's (Shape.fallbacks_routed: the one that served billed,
    the dearest held), the refusals naming `fallbacks`. The problem, if any, as (message, param)."""
    listed, window = data.get("fallbacks"), data.get("context_window_fallback_dict")
    if listed is None and window is None:
        return None
    if "models" in data:
        return "a request names its fallbacks once: models or fallbacks", "fallbacks"
    if listed is not None and not (isinstance(listed, list) and all(
            (isinstance(f, str) and f) or (isinstance(f, dict) and set(f) == {"model"} and isinstance(f["model"], str)
                                           and f["model"]) for f in listed)):
        return 'fallbacks must be a list of model names (or {"model": ...}, nothing else)', "fallbacks"
    if window is not None and not (isinstance(window, dict) and all(
            isinstance(m, str) and m for m in window.values())):
        return "context_window_fallback_dict must map models to model names", "context_window_fallback_dict"
    others = _listed_fallback_names(data, call.model)
    if len(others) > ROUTED_FALLBACKS_MAX:
        return f"fallbacks names at most {ROUTED_FALLBACKS_MAX} models besides the request's own", "fallbacks"
    call.fallback_models, call.fallbacks_routed, call.fallbacks_param = others, bool(others), "fallbacks"
    return None


def _listed_fallback_names(data: dict[str, Any], model: str) -> tuple[str, ...]:
    """A gateway's fallbacks of LiteLLM's kind besides `model`, in order: its `fallbacks`, then the model its
    context_window_fallback_dict names for `model` (names alone: what is no name is passed over)."""
    listed, window = data.get("fallbacks"), data.get("context_window_fallback_dict")
    names = [f.get("model") if isinstance(f, dict) else f for f in listed] if isinstance(listed, list) else []
    if isinstance(window, dict) and model in window:
        names.append(window[model])
    return tuple(dict.fromkeys(n[:256] for n in names if isinstance(n, str) and n and n != model))


def _routed_fallbacks(data: dict[str, Any]) -> tuple[str, ...]:
    """A router's list of models (a list of names) as the fallbacks besides the request's model, in order."""
    models, model = data["models"], data.get("model")
    primary = model if isinstance(model, str) and model else models[0] if models and isinstance(models[0], str) else ""
    return tuple(dict.fromkeys(m[:256] for m in models if isinstance(m, str) and m and m != primary))


# A router's web search (OpenRouter's): its web plugin (`plugins: [{"id": "web", "max_results": n}]`, or a model
# slug ending ":online") runs one search of up to n results, ROUTER_WEB_RESULTS_DEFAULT unless told; its web_search
# server tool (`{"type": "openrouter:web_search", "parameters": {"max_results": n, "max_total_results": t}}`) as many
# as the model makes, n results each, t in all. Its Exa engine bills each result, its native engines each search.
ROUTER_WEB_RESULTS_DEFAULT = 5
ROUTER_WEB_RESULTS_MAX = 1_000  # a bound past it is refused: no search returns so many, and it would hold them all
ROUTER_WEB_SEARCH_TOOL = "openrouter:web_search"
ROUTER_ONLINE_SUFFIX = ":online"
# a router's server tools that bill nothing (OpenRouter's clock); any other of its tools (`openrouter:*`: its web
# fetch, image generation, and the tools running other models, fusion, advisor, subagent) bills what no request
# field bounds, and is refused
ROUTER_FREE_TOOLS = frozenset({"openrouter:datetime"})
# a router's preset (OpenRouter's: a `preset` field, or a model "@preset/<slug>", alone or after a model's name) sets
# what the request does not carry, kept at the router: its model or fallbacks, a system prompt, its parameters
ROUTER_PRESET = "@preset/"


def _router_web_search(call: HttpCall, data: dict[str, Any]) -> tuple[str, str, str] | None:
    """A router's web search, its results bounded (Shape.web_results) and as many searches (each returns one at
    least; its native engines bill per search), or for a server tool given no max_total_results its results a
    search (Shape.web_results_per_search: policyd holds the plan's searches and sets their total). The refusal,
    if any, as (reason, message, param): a malformed bound, or a router's tool that bills what policyd cannot bound."""
    plugins = data.get("plugins")
    if plugins is not None and not (isinstance(plugins, list) and all(
            isinstance(p, dict) and isinstance(p.get("id"), str) for p in plugins)):
        return "invalid_request", 'plugins must be a list of {"id": ...}', "plugins"
    web = [p for p in plugins or () if p["id"] == "web"]
    online = any(m.endswith(ROUTER_ONLINE_SUFFIX) for m in (call.model, *call.fallback_models))  # a fallback's too
    if web or online:  # one search, however many ask for it (one model serves)
        asked = [p["max_results"] for p in web if p.get("max_results") is not None]
        if not all(0 < _count(n) <= ROUTER_WEB_RESULTS_MAX for n in asked):
            return "invalid_request", f"the web plugin's max_results must be from 1 to {ROUTER_WEB_RESULTS_MAX}", \
                "plugins"
        call.web_searches += 1
        call.web_results += max((_count(n) for n in asked), default=ROUTER_WEB_RESULTS_DEFAULT)
    routers = [t for t in _tools(data) if str(t.get("type", "")).startswith("openrouter:")
               and t["type"] not in ROUTER_FREE_TOOLS]
    unbounded = [str(t["type"])[:64] for t in routers if t["type"] != ROUTER_WEB_SEARCH_TOOL]
    if unbounded:
        return "tool_not_priced", f"policyd cannot bound what the router bills for its {unbounded[0]} tool", "tools"
    if len(routers) > 1:
        return "invalid_request", f"a request gives one {ROUTER_WEB_SEARCH_TOOL} tool", "tools"
    if routers:
        parameters = routers[0].get("parameters", {})
        bounds = (parameters.get("max_results"), parameters.get("max_total_results")) \
            if isinstance(parameters, dict) else ("", "")
        if not all(n is None or 0 < _count(n) <= ROUTER_WEB_RESULTS_MAX for n in bounds):
            return "invalid_request", f"the {ROUTER_WEB_SEARCH_TOOL} tool's parameters are an object, its " \
                f"max_results and max_total_results from 1 to {ROUTER_WEB_RESULTS_MAX}", "tools"
        each, total = _count(bounds[0]) or ROUTER_WEB_RESULTS_DEFAULT, _count(bounds[1])
        if total:
            call.web_searches, call.web_results = call.web_searches + total, call.web_results + total
        else:
            call.web_results_per_search = each
    call.unseen_input = call.unseen_input or bool(call.web_results or call.web_results_per_search)  # results read in
    return None


def _unbounded_search_tools(endpoint: str, data: dict[str, Any], kind: str = "web_search") -> int:
    """Search tools of a kind the provider runs that the request gives no bound for: on Anthropic's API each
    web search tool without `max_uses`; on the Responses API, 1 when such a tool is given without
    `max_tool_calls`. policyd bounds them (rewrite_body sets the plan's default) and reserves that many.
    Gemini's grounding with Google Search (1 when asked for) takes no bound: the plan's default is
    reserved, and a model billing per grounded prompt (`web_search_unit: request`) needs just one."""
    if endpoint == "gemini_generate_content" and kind == "web_search":  # no bound can be given: reserved alone
        return 1 if any(key in t for t in _tools(data) for key in _GOOGLE_SEARCH_KEYS) else 0
    if endpoint == "anthropic_messages" and kind == "web_search":
        return sum(1 for t in _tools(data) if _unbounded_web_search(t))
    if endpoint == "responses" and _search_tools(data, kind):
        return 0 if _count(data.get("max_tool_calls")) else 1
    return 0


# Azure OpenAI's api-versions before this refuse stream_options, without which a stream reports no usage
AZURE_STREAM_USAGE_SINCE = "2024-09-01-preview"


def _azure_without_stream_usage(path: str) -> bool:
    """Whether an Azure deployment's path asks for an api-version older than AZURE_STREAM_USAGE_SINCE."""
    base, _, query = path.partition("?")
    if not _AZURE.search(base):
        return False
    version = next((v for k, v in parse_qsl(query, keep_blank_values=True) if k == "api-version"), "")
    day = version.strip()[:10]
    return bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", day)) and day < AZURE_STREAM_USAGE_SINCE[:10]


# Input the provider bills that the request only refers to: policyd cannot bound it by the body's bytes.
_STORED_CONTEXT = ("previous_response_id", "conversation", "cachedContent", "cached_content", "mcp_servers",
                   "web_search_options")
_REFERENCE_KEYS = ("file_id", "file_uri", "fileUri", "file_url")
_SERVER_TOOL_TYPES = ("web_search", "file_search", "mcp", "code_interpreter", "web_fetch", "code_execution",
                      "x_search")
_GOOGLE_SEARCH_KEYS = ("googleSearch", "google_search", "googleSearchRetrieval", "google_search_retrieval")
_GOOGLE_MAPS_KEYS = ("googleMaps", "google_maps")
_SERVER_TOOL_KEYS = (*_GOOGLE_SEARCH_KEYS, *_GOOGLE_MAPS_KEYS, "urlContext", "url_context", "codeExecution",
                     "code_execution", "fileSearch")


# Inline media a provider bills by its pixels, pages or frames, which a small file holds many of (a blank
# page, a plain image: a few hundred bytes, a thousand tokens and more): its bytes bound nothing.
_MEDIA_BILLED_BY_CONTENT = ("image/", "application/pdf", "video/")
_MEDIA_BLOCKS = ("image", "document")  # Anthropic's content blocks of such media, whatever their source
_CONVERSE_MEDIA = ("image", "document", "video", "audio")  # Bedrock Converse's content blocks of media


def _billed_by_content(media_type: Any) -> bool:
    return isinstance(media_type, str) and media_type.lower().startswith(_MEDIA_BILLED_BY_CONTENT)


def _refers_to_input(value: Any, depth: int = 0) -> bool:
    """Whether content holds input its bytes do not bound: a file by id or URI, an image or document by URL,
    or an image, a PDF or a video inline (data URLs, file data, Anthropic's image and document blocks,
    Gemini's inlineData)."""
    if depth > JSON_DEPTH_MAX:
        return False
    if isinstance(value, list):
        return any(_refers_to_input(v, depth + 1) for v in value)
    if not isinstance(value, dict):
        return False
    if value.get("type") in _MEDIA_BLOCKS and isinstance(value.get("source"), dict):
        return True
    for name, item in value.items():
        if name == "annotations":  # citations of an earlier reply the client sends back: not input by reference
            continue
        if name in _REFERENCE_KEYS and item:
            return True
        if name in _CONVERSE_MEDIA and isinstance(item, dict) and isinstance(item.get("source"), dict):
            return True
        if name in ("url", "image_url") and isinstance(item, str) and \
                (not item.startswith("data:") or _billed_by_content(item[5:])):
            return True
        if name == "file_data" and item:  # a file inline (OpenAI's chat file parts, the Responses API's input_file)
            return True
        if name in ("inlineData", "inline_data") and isinstance(item, dict) and \
                _billed_by_content(item.get("mimeType", item.get("mime_type"))):
            return True
        if isinstance(item, (dict, list)) and _refers_to_input(item, depth + 1):
            return True
    return False


def _unseen_input(data: dict[str, Any]) -> bool:
    """Whether the provider bills input the body does not carry: a previous response or conversation, a
    stored prompt, cached content, files and URLs, or the results of tools the provider runs itself
    (web search, file search, code execution, MCP servers)."""
    if any(data.get(name) for name in _STORED_CONTEXT) or isinstance(data.get("prompt"), dict):
        return True
    tools = data.get("tools") if isinstance(data.get("tools"), list) else []
    for tool in tools:
        if isinstance(tool, dict) and (str(tool.get("type", "")).startswith(_SERVER_TOOL_TYPES)
                                       or any(key in tool for key in _SERVER_TOOL_KEYS)):
            return True
    content = [data.get(k) for k in ("messages", "input", "contents", "system", "instructions", "systemInstruction")]
    return _refers_to_input(content)


def parse_call(method: str, path: str, headers: dict[str, str], body: bytes, client_address: str = "",
               call_token: str = "") -> HttpCall:
    """Understand one HTTP request. Never raises: problems are reported in `problem`. `call_token`: the token
    it is known by, where it is not one of its own (each drawn from os.urandom, which a thread reading a batch's
    requests would call by the thousand, each call giving up the interpreter lock it then takes straight back,
    so that the event loop waiting for that lock starves)."""
    headers = {k.lower(): v for k, v in headers.items()}
    call = HttpCall(api_key=customer_key(headers), client_address=client_address,
                    user_agent=headers.get("user-agent", ""), **({"call_token": call_token} if call_token else {}))
    in_query = query_key(path)
    call.api_key, call.key_in_query = call.api_key or in_query or "", in_query is not None
    named = endpoint_of(method, path)
    endpoint, path_model, listing = named.family, named.model, named.models_listing
    call.endpoint, call.models_listing, call.count_tokens = endpoint, listing, named.count_tokens
    if listing:
        call.model = path_model  # GET /v1/models/{model}: that one model
    call.key_summary = named.key_summary
    call.stored_response = "" if named.cache_update else named.stored_response
    call.deletes_stored = bool(named.stored_response) and method.upper() == "DELETE"
    call.creates = named.creates
    # Azure OpenAI's clients: its dated API's paths (/openai/files?api-version=...), or its key header
    call.creates_at = "azure" if named.creates and ("api-key" in headers or _AZURE_DATED.search(path)) else ""
    if named.creates and endpoint == "gemini_generate_content":  # a Gemini upload: begun, or its bytes sent
        _gemini_upload(call, path)
    elif endpoint == "responses" and "anthropic-version" in headers and (
            named.creates == "file" or _FILE.search(path.split("?", 1)[0])):  # Anthropic's Files API: its family's
        endpoint = call.endpoint = "anthropic_messages"
        call.creates_at, call.stores_reply = ("anthropic", True) if named.creates else ("", False)
    call.compaction = named.compaction
    if named.refers_to:  # the upload a file is made of: the customer's own, or not found
        call.files = (named.refers_to,)
    call.attribution = _attribution(headers)
    call.policyd_headers = tuple(name for name in headers if name.startswith(POLICYD_HEADER_PREFIX))
    if len(headers) > REQUEST_HEADERS_COUNT_MAX or \
            sum(len(k) + len(v) for k, v in headers.items()) > REQUEST_HEADERS_BYTES_MAX:
        return _problem(call, "request_headers_too_large", f"the request headers are larger than "
                        f"{REQUEST_HEADERS_BYTES_MAX // 1024} KiB or more than {REQUEST_HEADERS_COUNT_MAX} headers")
    if not (listing or call.key_summary or named.request_lookup or named.request_listing or named.usage_summary):
        for header, bound in ((THREAD_BUDGET_HEADER, "thread_budget"), (MAX_CHARGE_HEADER, "max_charge")):
            if header in headers:  # a bound its caller sets: on its thread, on this request
                try:
                    nanos = parse_amount(headers[header])
                except ValueError:
                    nanos = 0
                if nanos <= 0:
                    return _problem(call, "invalid_request", f"{header} is an amount of money more than 0, such as "
                                    f"5.00, not {headers[header][:40]!r}", header)
                setattr(call, bound, nanos)
        if call.thread_budget and not call.attribution.thread_id:
            return _problem(call, "invalid_request", f"{THREAD_BUDGET_HEADER} needs the thread it binds "
                            "(x-thread-id)", THREAD_BUDGET_HEADER)
    if listing:
        call.listing_shape = "anthropic" if "anthropic-version" in headers else \
            "gemini" if "/v1beta/" in path.split("?", 1)[0] or "x-goog-api-key" in headers or call.key_in_query \
            else "openai"
    if listing or call.key_summary:
        return call
    if named.request_lookup:
        return _request_lookup(call, named.request_lookup, path)
    if named.request_listing:
        return _request_listing(call, path)
    if named.usage_summary:
        return _usage_summary(call, path)
    if call.stored_response:  # no body to read: the id is in the path
        return call
    if not endpoint:
        return _problem(call, "unknown_endpoint", f"policyd does not know the endpoint {method} {path[:200]}", "path")
    if len(body) > REQUEST_BODY_BYTES_MAX:
        return _problem(call, "request_too_large", f"the request body is larger than {REQUEST_BODY_BYTES_MAX} bytes")
    if call.creates:  # no model: its items, or its file, go to the provider as they are
        return call
    coding = headers.get("content-encoding", "").strip().lower()
    if coding not in ("", "identity") and body:
        decoded = decoded_body(coding, body)
        if isinstance(decoded, tuple):
            return _problem(call, *decoded)
        body, call.body_decoded = decoded, True
    if endpoint == "audio_transcriptions":
        return _speech_to_text(call, headers.get("content-type", ""), body, path_model)
    if endpoint == "images" and MultipartForm.boundary_of(headers.get("content-type", "")) is not None:
        return _image_form(call, headers["content-type"], body, path_model)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return _problem(call, "invalid_request", "the request body is not valid UTF-8")
    try:
        data = _REQUEST_JSON.decode(text) if text.strip() else None
    except _NamedTwice as twice:
        return _problem(call, "invalid_request", f"the request body names {twice.name!r} twice in one object: "
                        f"providers differ in which of the two they read", twice.name)
    except (ValueError, RecursionError):
        return _problem(call, "invalid_request", "the request body is not valid JSON")
    if not isinstance(data, dict):
        return _problem(call, "invalid_request", "the request body must be a JSON object")
    if _depth(data) > JSON_DEPTH_MAX:
        return _problem(call, "invalid_request", f"the request body nests deeper than {JSON_DEPTH_MAX} levels")
    if mistyped := _mistyped(data):
        return _problem(call, "invalid_request", f"{mistyped[0]} must be {mistyped[1]}", mistyped[0])
    call.body = data
    if named.cache_update:  # an explicit cache's time to live changed: its model and tokens are policyd's to find
        call.previous_response, call.stores_reply = named.stored_response, True
        if problem := _cache_lifetime(call, data, made=False):
            return _problem(call, "invalid_request", *problem)
        return call
    if named.operation_in_body:  # a Vertex AI operation read (Veo's): its name is the stored response read
        name = data.get("operationName")
        if not isinstance(name, str) or not STORED_RESPONSE_ID_PATTERN.match(name):
            return _problem(call, "invalid_request", "operationName must name the operation to read", "operationName")
        call.stored_response = name
        return call
    if named.async_chat:  # the chat completion is the body's "request"; the job's answer comes when asked for
        data = data.get("request")
        if not isinstance(data, dict):
            return _problem(call, "invalid_request", "an async chat completion's request must be the chat completion "
                            "to run, an object", "request")
        if mistyped := _mistyped(data):
            return _problem(call, "invalid_request", f"request.{mistyped[0]} must be {mistyped[1]}",
                            f"request.{mistyped[0]}")
    if named.batch:
        call.model = path_model  # Gemini's: the model its requests are all for
        return _batch(call, data)
    routed = endpoint in ROUTED_ENDPOINTS and "models" in data
    if routed and (problem := _routed_models(call, data)):
        return _problem(call, "invalid_request", *problem)
    model = path_model or data.get("model") or (MODERATION_MODEL_DEFAULT if endpoint == "moderations" else None) \
        or (data["models"][0] if routed and data["models"] else None)  # a router's list: its first when none
    if not isinstance(model, str) or not model:
        return _problem(call, "invalid_request", "you must provide a model parameter", "model")
    if endpoint == "cached_contents":  # "models/M", or Vertex AI's ".../publishers/google/models/M"
        model = _cached_model(model)
    call.model, call.model_in_path = model, bool(path_model)
    # (a job's reply is the job, whatever its request says)
    call.stream = not named.async_chat and (data.get("stream") is True or named.stream
                                            or path.split("?", 1)[0].endswith(":streamGenerateContent"))
    if named.bedrock_invoke and not named.count_tokens and not isinstance(data.get("anthropic_version"), str):
        return _problem(call, "invalid_request", "policyd reads Bedrock's InvokeModel for Anthropic's models (a body "
                        "with anthropic_version); call other models with Converse", "anthropic_version")
    generation, bad_config = _generation_config(data) if endpoint == "gemini_generate_content" else ({}, "")
    if bad_config:
        return _problem(call, "invalid_request", bad_config, "generationConfig")
    for name in ("inferenceConfig", "serviceTier") if endpoint == "bedrock_converse" else ():
        if data.get(name) is not None and not isinstance(data[name], dict):
            return _problem(call, "invalid_request", f"{name} must be an object", name)
    call.max_output_tokens, bad_cap = _output_cap(endpoint, data, generation)
    if bad_cap:
        return _problem(call, "invalid_request", f"{bad_cap} must be a whole number of tokens, from 1 to {QUANTITY_MAX}",
                        bad_cap)
    if endpoint == "chat_completions" and data.get("max_completion_tokens") is None and data.get("max_tokens") is not None:
        call.output_cap_param = "max_tokens"
    call.prompt_bytes = _prompt_bytes(data) + _hidden_prompt_bytes(endpoint, data)
    messages = data.get("messages") or data.get("contents") or data.get("input") or data.get("requests")
    call.message_count = len(messages) if isinstance(messages, list) else 1
    if named.imagen:  # its parameters' sampleCount, 4 unless told
        count = _dict_of(data, "parameters").get("sampleCount")
        call.image_count = _count(count) or IMAGEN_IMAGES_DEFAULT
        if count is not None and not _count(count):
            return _problem(call, "invalid_request", "parameters.sampleCount must be a whole number, at least 1",
                            "parameters")
    elif endpoint == "videos":  # Veo's: sampleCount videos (1 unless told) of durationSeconds (8 unless told)
        if problem := _videos(call, data):
            return _problem(call, "invalid_request", *problem)
    elif endpoint == "cached_contents":  # kept for its ttl, or until its expireTime (an hour unless told)
        if problem := _cache_lifetime(call, data):
            return _problem(call, "invalid_request", *problem)
    elif endpoint == "images":
        call.image_count = _count(data.get("n")) or 1
        call.image_scale = image_scale(data.get("size"), data.get("output_format"), data.get("frame_count"))
    elif endpoint == "chat_completions":  # n choices, each up to the output cap: all of them are billed
        call.choices = _count(data.get("n"))
    elif endpoint == "completions":  # best_of are generated (and billed), n of them returned
        call.choices = max(_count(data.get("n")), _count(data.get("best_of")))
        call.input_tokens = _token_ids(data.get("prompt"))
    elif endpoint == "embeddings":
        call.input_tokens = _token_ids(data.get("input"))
    elif endpoint == "rerank":
        if problem := _rerank(call, data, path):
            return _problem(call, "invalid_request", *problem)
    elif endpoint == "audio_speech":  # billed by the characters of the text: known before the call, exactly
        text = data.get("input")
        if not isinstance(text, str) or not text:
            return _problem(call, "invalid_request", "input must be the text to speak", "input")
        call.input_tokens = len(text)
        call.stream = data.get("stream_format") == "sse"  # its audio in events, and its usage last (gpt-4o-mini-tts)
    elif endpoint == "gemini_generate_content":
        candidates = _gemini_field(generation, "candidateCount", "candidate_count")
        call.choices = _gemini_count(candidates)
        if candidates is not None and not call.choices:
            return _problem(call, "invalid_request", "candidateCount must be a whole number, at least 1",
                            "generationConfig")
    if call.stream and endpoint in ("chat_completions", "completions") and _azure_without_stream_usage(path):
        return _problem(call, "invalid_request", f"a streamed completion on Azure OpenAI needs api-version "
                        f"{AZURE_STREAM_USAGE_SINCE} or later (or the v1 API), which takes stream_options: its "
                        f"usage is what it is charged", "api-version")
    # a background response: its usage comes after its reply, charged when policyd finds it ended (background.py)
    # (or an async chat completion's job: Perplexity's; Veo's operation, whose videos come when it is done)
    call.background = (endpoint == "responses" and data.get("background") is True) or named.async_chat \
        or endpoint == "videos"
    image_tools = [t for t in _tools(data) if t.get("type") == "image_generation"] if endpoint == "responses" else []
    if image_tools:  # its images are billed apart from the reply's usage, at the image model's prices
        if len(image_tools) > 1:
            return _problem(call, "invalid_request", "a request may give one image_generation tool", "tools")
        image_model = image_tools[0].get("model")
        if image_model is not None and (not isinstance(image_model, str) or not image_model):
            return _problem(call, "invalid_request", "the image_generation tool's model must name an image model",
                            "tools")
        call.image_model = (image_model or "")[:256]
        call.image_model_default = image_model is None  # the plan's is set in it
        call.image_generation_calls = _count(data.get("max_tool_calls"))
        call.partial_images = _count(image_tools[0].get("partial_images")) if call.stream else 0
        tool = image_tools[0]
        call.image_scale = image_scale(tool.get("size"), tool.get("output_format"), tool.get("frame_count"))
    if endpoint == "responses":
        call.containers, call.container_memory = _new_containers(_tools(data))
    if endpoint == "responses" and isinstance(data.get("previous_response_id"), str):
        call.previous_response = data["previous_response_id"][:256]
    if endpoint == "gemini_generate_content":  # an explicit cache it uses: its customer's alone, on its account
        call.previous_response = cached_content_name(data.get("cachedContent", data.get("cached_content")))
    conversation = data.get("conversation") if endpoint == "responses" else None
    if isinstance(conversation, dict):  # {"id": "conv_..."}
        conversation = conversation.get("id")
    if isinstance(conversation, str):
        call.conversation = conversation[:256]
    call.web_searches = _search_bound(endpoint, data)
    call.maps_grounding = endpoint == "gemini_generate_content" and \
        any(key in t for t in _tools(data) for key in _GOOGLE_MAPS_KEYS)
    call.file_searches = _search_bound(endpoint, data, "file_search")
    call.unbounded_web_search_tools = _unbounded_search_tools(endpoint, data)
    call.unbounded_file_search = _unbounded_search_tools(endpoint, data, "file_search") > 0
    if endpoint in LISTED_FALLBACK_ENDPOINTS and (problem := _listed_fallbacks(call, data)):
        return _problem(call, "invalid_request", *problem)
    if endpoint in ROUTED_ENDPOINTS and (data.get("preset") is not None or ROUTER_PRESET in model
                                         or any(ROUTER_PRESET in m for m in call.fallback_models)):
        return _problem(call, "invalid_request", "a router's preset sets what policyd cannot see (a model, fallbacks, "
                        "a system prompt): send them in the request itself", "preset")
    if endpoint == "anthropic_messages" and routed and data.get("fallbacks") is not None:
        return _problem(call, "invalid_request", "a request names its fallbacks once: models or fallbacks", "models")
    if endpoint == "anthropic_messages" and (problem := _other_models(call, data)):
        return _problem(call, "invalid_request", *problem)
    if endpoint in ROUTED_ENDPOINTS and (refusal := _router_web_search(call, data)):
        return _problem(call, *refusal)
    call.unseen_input = not call.count_tokens and (call.unseen_input or _unseen_input(data))
    call.files = _file_ids(data) if '"file_id"' in text else ()
    if endpoint == "gemini_generate_content" and ("ileUri" in text or "ile_uri" in text):  # Gemini's files named
        call.files = (*call.files, *dict.fromkeys(m["id"] for m in _GEMINI_FILE_URI.finditer(text)))
    call.cache_write = _cache_write(data) if '"cache_control"' in text else ""
    if endpoint == "bedrock_converse" and '"cachePoint"' in text:  # Converse's cache checkpoints: written to it
        call.cache_write = _cache_write(data, "cachePoint")
    if endpoint in ("chat_completions", "responses"):  # OpenAI writes the prompt to its cache unasked
        call.cache_write = call.cache_write or _openai_cache_write(data)
    if budget := _thinking_budget(endpoint, data):  # max_tokens must pass it: a fitted cap never goes below
        call.least_output_cap = budget + 1
    # a stored chat completion, an async chat's job (Perplexity's), Veo's operation: its reply's id (name) is read
    call.stores_reply = (endpoint == "chat_completions" and (data.get("store") is True or named.async_chat)) \
        or endpoint in ("videos", "cached_contents")
    options = data.get("web_search_options") if endpoint == "chat_completions" else None
    if isinstance(options, dict):  # a fee by its search context size, where priced
        size = options.get("search_context_size")
        call.search_context_size = size.strip().lower()[:SEARCH_CONTEXT_LENGTH_MAX] if isinstance(size, str) else ""
    modalities = data.get("modalities")
    call.audio_output = isinstance(modalities, list) and "audio" in modalities
    tier = data.get("service_tier")
    call.service_tier = tier[:32] if isinstance(tier, str) and tier not in ("auto", "default") else ""
    if named.bedrock_invoke or endpoint == "bedrock_converse":  # Bedrock's tiers: flex, priority, reserved
        asked, latency = (headers.get(BEDROCK_TIER_HEADER, ""), headers.get(BEDROCK_LATENCY_HEADER, "")) \
            if named.bedrock_invoke else (_dict_of(data, "serviceTier").get("type"),  # InvokeModel's in headers
                                          _dict_of(data, "performanceConfig").get("latency"))
        if latency == "optimized" and bedrock_tier(asked):  # latency-optimized inference is a tier of its own
            return _problem(call, "invalid_request", "a request asks for one Bedrock tier: serviceTier or "
                            "latency-optimized inference", "performanceConfig")
        call.service_tier = bedrock_tier(asked, latency)
    elif endpoint == "anthropic_messages":  # Anthropic serves at its priority tier when it can unless told not to
        call.service_tier = "" if tier == "standard_only" else "priority"
        call.service_tier_implied = True
        if data.get("speed") == "fast":  # fast mode: its own, dearer prices
            call.service_tier, call.service_tier_implied = ANTHROPIC_FAST_MODE, False
        geo = data.get("inference_geo")  # a geography of its own (US-only inference): its own prices too
        if isinstance(geo, str) and tier_in_geo("", geo):
            fast = call.service_tier == ANTHROPIC_FAST_MODE
            call.service_tier = tier_in_geo(ANTHROPIC_FAST_MODE if fast else "", geo)
            call.service_tier_implied = False
        elif named.geo:  # Vertex AI's endpoint of a region: its prices (where the model has them), the reply silent
            call.geo = named.geo
            if call.service_tier_implied:  # (Anthropic's priority tier is none of Vertex AI's)
                call.service_tier, call.service_tier_implied = "", False
    if not call.attribution.end_user_id and (end_user := _end_user(data)):
        call.attribution = replace(call.attribution, end_user_id=end_user[:256])
    return call


IMAGEN_IMAGES_DEFAULT = 4  # the images Imagen makes when the request names no sampleCount


def gemini_upload_key(upload_id: str) -> str:
    """The name policyd knows a Gemini upload by (its upload id may be longer than an id policyd keeps)."""
    return GEMINI_UPLOAD_PREFIX + hashlib.sha256(upload_id.encode()).hexdigest()[:48]


def gemini_upload_id(url: str) -> str:
    """The upload id a Gemini upload URL names (its query's upload_id), "" when none."""
    return next((v for k, v in parse_qsl(url.partition("?")[2]) if k == "upload_id"), "")


def _gemini_upload(call: HttpCall, path: str) -> None:
    """A Gemini upload, made at Google and its reply stored: begun (its reply names the upload), or its bytes
    sent to an upload the customer began (its id in the path's query)."""
    call.creates_at, call.stores_reply = "google", True
    upload_id = gemini_upload_id(path)
    if upload_id:
        call.files = (gemini_upload_key(upload_id),)


def gemini_upload_begun(headers: dict[str, str]) -> str:
    """The upload a Gemini upload's beginning made, as policyd knows it (its reply's x-goog-upload-url names
    its upload id), "" for any other reply."""
    upload_id = gemini_upload_id(headers.get(GEMINI_UPLOAD_URL_HEADER, ""))
    return gemini_upload_key(upload_id) if upload_id else ""


def gemini_upload_url(provider_url: str, origin: str) -> str:
    """A Gemini upload URL (the provider's) as the gateway's own: its path and query at `origin` (the scheme
    and host the client reached the gateway at; Envoy's gateway_lua/gemini_upload_url.lua does the same)."""
    split = urlsplit(provider_url)
    return f"{origin}{split.path}" + (f"?{split.query}" if split.query else "")


def _cached_model(named: str) -> str:
    """The model an explicit cache is made for, as its body names it: "models/M", Vertex AI's
    "projects/P/locations/L/publishers/google/models/M", or "M"."""
    return named.rsplit("/models/", 1)[-1].removeprefix("models/")


def _cache_lifetime(call: HttpCall, data: dict[str, Any], made: bool = True) -> tuple[str, str] | None:
    """The seconds an explicit cache is asked to live from now (`seconds`, rounded up): its ttl, or until its
    expireTime; one `made` that gives neither, CACHE_SECONDS_DEFAULT (a change that gives neither changes
    nothing: 0). The refusal (message, param) of one Google would refuse, or longer than policyd holds one for."""
    ttl, expire = data.get("ttl"), data.get("expireTime", data.get("expire_time"))
    if ttl is not None and expire is not None:
        return "a cache's lifetime is given once: ttl or expireTime", "ttl"
    if ttl is not None:
        lives_ms = duration_ms(ttl)
        if lives_ms is None:
            return 'ttl must be a duration in seconds, like "3600s"', "ttl"
    elif expire is not None:
        until = timestamp_ms(expire)
        if until is None:
            return 'expireTime must be a time in RFC 3339, like "2026-12-06T10:00:00Z"', "expireTime"
        lives_ms = until - int(time.time() * 1000)
    elif made:
        lives_ms = CACHE_SECONDS_DEFAULT * 1000
    else:
        return None
    if not 0 < lives_ms <= CACHE_SECONDS_MAX * 1000:
        return (f"a cache lives from 1 second to {CACHE_SECONDS_MAX // 86400} days through policyd",
                "ttl" if ttl is not None else "expireTime")
    call.seconds = -(-lives_ms // 1000)
    return None


def _videos(call: HttpCall, data: dict[str, Any]) -> tuple[str, str] | None:
    """A Veo request's videos (`image_count`) and each one's seconds (`seconds`), from its parameters; the
    refusal (message, param) of a count or a duration Veo would refuse."""
    parameters = _dict_of(data, "parameters")
    count = parameters.get("sampleCount", parameters.get("numberOfVideos"))
    call.image_count = _count(count) if count is not None else 1
    if not 0 < call.image_count <= VIDEOS_MAX:
        return f"parameters.sampleCount must be a whole number from 1 to {VIDEOS_MAX}", "parameters"
    seconds = parameters.get("durationSeconds")
    if isinstance(seconds, str) and seconds.strip().isdigit():  # a number, or its digits
        seconds = int(seconds)
    call.seconds = VIDEO_SECONDS_DEFAULT if seconds is None else _count(seconds)
    if not 0 < call.seconds <= VIDEO_SECONDS_MAX:
        return f"parameters.durationSeconds must be a whole number of seconds from 1 to {VIDEO_SECONDS_MAX}", \
            "parameters"
    return None


def _imagen(model: str) -> Endpoint:
    """`:predict` of Gemini's and Vertex AI's APIs: Imagen's image generation (images, priced per image); the
    other models it serves (Vertex AI's older embeddings) are not read."""
    return Endpoint("images", model, imagen=True) if model.startswith("imagen") else Endpoint()


def _thinking_budget(endpoint: str, data: dict[str, Any]) -> int:
    """The extended thinking budget (budget_tokens) of a Claude request, whose max_tokens must pass it:
    Anthropic's `thinking`, and Bedrock Converse's in additionalModelRequestFields (`thinking`, or Claude 3.7's
    `reasoning_config`); 0 when it thinks without one (adaptive) or not at all."""
    if endpoint == "bedrock_converse":
        fields = _dict_of(data, "additionalModelRequestFields")
        thinking = fields.get("thinking") or fields.get("reasoning_config")
    elif endpoint == "anthropic_messages":
        thinking = data.get("thinking")
    else:
        return 0
    budget = thinking.get("budget_tokens") if isinstance(thinking, dict) and thinking.get("type") == "enabled" else 0
    return budget if isinstance(budget, int) and not isinstance(budget, bool) and 0 < budget <= QUANTITY_MAX else 0


# Cohere's v2 API reads at most this many tokens of each document unless told (max_tokens_per_doc)
RERANK_V2_DOCUMENT_TOKENS_DEFAULT = 4096


def _rerank(call: HttpCall, data: dict[str, Any], path: str) -> tuple[str, str] | None:
    """A rerank's query and documents (texts, or objects: Cohere's v1 fields, Jina's {"text": ...}): its
    input is the query once a document and the documents, as rerankers count the tokens they bill; a
    document that is an image (Jina's {"image": url}) is input the body does not bound. The problem, if any,
    as (message, param)."""
    query, documents = data.get("query"), data.get("documents")
    if not isinstance(query, str) or not query:
        return "query must be the text to rank the documents by", "query"
    if not isinstance(documents, list) or not documents:
        return "documents must be a list of the texts to rank", "documents"
    document_bytes = 0
    for document in documents:
        if isinstance(document, str):
            document_bytes += len(document.encode())
        elif isinstance(document, dict):
            document_bytes += len(json.dumps(document, ensure_ascii=False).encode())  # its fields' text, at most
            call.unseen_input = call.unseen_input or "image" in document
        else:
            return "each document must be a text or an object", "documents"
    cap = data.get("max_tokens_per_doc")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or not 1 <= cap <= QUANTITY_MAX):
        return f"max_tokens_per_doc must be a whole number of tokens, from 1 to {QUANTITY_MAX}", "max_tokens_per_doc"
    call.documents, call.document_bytes = len(documents), document_bytes
    call.document_tokens_max = cap or (RERANK_V2_DOCUMENT_TOKENS_DEFAULT if "/v2/rerank" in path else 0)
    call.prompt_bytes = len(query.encode()) * len(documents) + document_bytes
    call.message_count = len(documents)
    return None


# the endpoints a batch's requests may be for, as its `endpoint` names them: their family
BATCH_ENDPOINTS = {"/v1/chat/completions": "chat_completions", "/v1/responses": "responses",
                   "/v1/embeddings": "embeddings", "/v1/completions": "completions",
                   # as Azure OpenAI's batches name them
                   "/chat/completions": "chat_completions", "/responses": "responses", "/embeddings": "embeddings",
                   "/completions": "completions"}
_COMPLETION_WINDOW = re.compile(r"^(?P<count>[1-9][0-9]{0,3})(?P<unit>[hd])$")  # OpenAI's "24h"; others' "7d"


MESSAGE_BATCH_SECONDS = 24 * 3600  # an Anthropic message batch ends (expires) within a day
GEMINI_BATCH_SECONDS = 48 * 3600  # a Gemini batch not done within two days expires


def _batch(call: HttpCall, data: dict[str, Any]) -> HttpCall:
    """POST /v1/batches: which file, which endpoint, how long; its requests are read from the file
    (policyd/batches.py), which names the model. POST /v1/messages/batches: its requests, read there too."""
    if call.endpoint == "anthropic_messages":
        call.batch_inline, call.batch_seconds = data.get("requests"), MESSAGE_BATCH_SECONDS
        if not isinstance(call.batch_inline, list):
            return _problem(call, "invalid_request", "requests must be a list of {custom_id, params}", "requests")
        return call
    if call.endpoint == "gemini_generate_content":  # its requests inline: batch.inputConfig.requests.requests
        config = _dict_of(_dict_of(data, "batch"), "inputConfig")
        call.batch_inline, call.batch_seconds = _dict_of(config, "requests").get("requests"), GEMINI_BATCH_SECONDS
        if config.get("fileName") is not None:
            return _problem(call, "invalid_request", "policyd does not offer Gemini's File API: give a batch's requests "
                            "inline (inputConfig.requests)", "batch.inputConfig")
        if not isinstance(call.batch_inline, list):
            return _problem(call, "invalid_request", "batch.inputConfig.requests.requests must be a list of "
                            "{request, metadata}", "batch.inputConfig")
        return call
    file_id, url, window = data.get("input_file_id"), data.get("endpoint"), data.get("completion_window")
    if not isinstance(file_id, str) or not 0 < len(file_id) <= 200:
        return _problem(call, "invalid_request", "input_file_id must name the file of the batch's requests",
                        "input_file_id")
    if url not in BATCH_ENDPOINTS:
        return _problem(call, "invalid_request", f"policyd holds batches of {', '.join(BATCH_ENDPOINTS)} requests",
                        "endpoint")
    length = _COMPLETION_WINDOW.match(window) if isinstance(window, str) else None
    if length is None:
        return _problem(call, "invalid_request", "completion_window must be a time such as 24h", "completion_window")
    call.endpoint, call.batch_file, call.batch_url = BATCH_ENDPOINTS[url], file_id, url
    call.batch_seconds = int(length.group("count")) * (3600 if length.group("unit") == "h" else 86400)
    call.files = (file_id,)
    return call


# Input a provider adds to a request and bills, which its body does not carry, as bytes of text (a token is
# at most a byte's worth in a strict bound, about four in an estimate). Anthropic's: the system prompt
# that enables tool use (346 tokens on its current models), and the definition of each tool it defines
# itself (a "type" such as bash_20250124 or computer_20250124: up to 735 tokens).
ANTHROPIC_TOOL_USE_PROMPT_BYTES = 1_400
ANTHROPIC_BUILT_IN_TOOL_BYTES = 3_000


def _hidden_prompt_bytes(endpoint: str, data: dict[str, Any]) -> int:
    if endpoint == "bedrock_converse":  # the model's own tool-use prompt (Anthropic's, on Bedrock too)
        return ANTHROPIC_TOOL_USE_PROMPT_BYTES if _dict_of(data, "toolConfig").get("tools") else 0
    tools = data.get("tools")
    if endpoint != "anthropic_messages" or not isinstance(tools, list) or not tools:
        return 0
    built_in = sum(1 for t in tools if isinstance(t, dict) and isinstance(t.get("type"), str) and t["type"] != "custom")
    return ANTHROPIC_TOOL_USE_PROMPT_BYTES + ANTHROPIC_BUILT_IN_TOOL_BYTES * built_in


def _file_ids(data: Any) -> tuple[str, ...]:
    """The OpenAI files a body's input refers to by id (chat's file parts, the Responses API's input_file
    and input_image), each once, in order."""
    found: dict[str, None] = {}
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            file_id = node.get("file_id")
            if isinstance(file_id, str) and file_id:
                found[file_id[:256]] = None
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return tuple(found)


def _cache_write(data: Any, marker_name: str = "cache_control") -> str:
    """The longest cache a body asks the provider to write its input to: Anthropic's `cache_control`
    ({"type": "ephemeral"}, five minutes, or with "ttl": "1h"), on its system, tools, messages or content
    blocks, or at its top (automatic caching); OpenAI-compatible gateways pass it on in chat messages.
    Bedrock's Converse marks it with checkpoints (`marker_name` "cachePoint": {"type": "default", "ttl": "1h"})."""
    longest = ""
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            marker = node.get(marker_name)
            if isinstance(marker, dict):
                longest = "1h" if marker.get("ttl") == "1h" else longest or "5m"
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return longest


def _openai_cache_write(data: dict[str, Any]) -> str:
    """The cache OpenAI may write a request's prompt to: its implicit breakpoint (and any explicit one)
    keeps it 30 minutes, the short write ("5m", the price of cache_write_input), or 12 hours when
    `prompt_cache_options.ttl` asks so, the long write ("1h", the price of cache_write_1h_input)."""
    options = data.get("prompt_cache_options")
    return "1h" if isinstance(options, dict) and options.get("ttl") == "12h" else "5m"


def _end_user(data: dict[str, Any]) -> str:
    """The end user a body names, as each API lets a client say it: OpenAI's `safety_identifier` (which
    replaces `user`) or `user`, Anthropic's `metadata.user_id`."""
    metadata = data.get("metadata")
    for value in (data.get("safety_identifier"), data.get("user"),
                  metadata.get("user_id") if isinstance(metadata, dict) else None):
        if isinstance(value, str) and value:
            return value
    return ""


def _speech_to_text(call: HttpCall, content_type: str, body: bytes, path_model: str) -> HttpCall:
    """A transcription or translation: a multipart/form-data body with the audio `file` and its fields."""
    boundary = MultipartForm.boundary_of(content_type)
    if boundary is None:
        return _problem(call, "invalid_request", "a speech-to-text request must be multipart/form-data with a "
                        "boundary, the audio in its `file` part")
    try:
        form = MultipartForm.parse(body, boundary)
    except MultipartError as error:
        return _problem(call, "invalid_request", f"the multipart body cannot be read: {error}")
    audio = form.file("file")
    if audio is None or not audio.content:
        return _problem(call, "invalid_request", "the audio must be sent as the `file` part", "file")
    model = path_model or (form.field("model") or "").strip()
    if not model:
        return _problem(call, "invalid_request", "you must provide a model parameter", "model")
    call.body, call.model, call.model_in_path = form, model, bool(path_model)
    call.stream = (form.field("stream") or "").strip().lower() == "true"
    call.prompt_bytes = len((form.field("prompt") or "").encode("utf-8"))
    call.message_count = 1
    call.seconds = wav_seconds(audio.content)
    call.audio_bytes = 0 if call.seconds else len(audio.content)
    return call


IMAGE_FORM_MODEL_DEFAULT = "dall-e-2"  # the model of an image edit or variation that names none, as OpenAI's


def _image_form(call: HttpCall, content_type: str, body: bytes, path_model: str) -> HttpCall:
    """An image edit or variation: a multipart/form-data body with the input image(s), a mask, and fields."""
    try:
        form = MultipartForm.parse(body, MultipartForm.boundary_of(content_type) or "")
    except MultipartError as error:
        return _problem(call, "invalid_request", f"the multipart body cannot be read: {error}")
    images = [p for p in form.parts if p.filename is not None and p.name in ("image", "image[]", "mask")]
    if not any(p.name != "mask" and p.content for p in images):
        return _problem(call, "invalid_request", "the input image must be sent as the `image` part", "image")
    call.body, call.model_in_path = form, bool(path_model)
    call.model = path_model or (form.field("model") or "").strip() or IMAGE_FORM_MODEL_DEFAULT
    n = (form.field("n") or "1").strip()
    if not n.isdigit() or not 1 <= int(n) <= 10:
        return _problem(call, "invalid_request", "n must be a whole number from 1 to 10", "n")
    call.image_count = int(n)
    call.image_scale = image_scale(form.field("size"), form.field("output_format"), form.field("frame_count"))
    call.stream = (form.field("stream") or "").strip().lower() == "true"
    call.prompt_bytes = len((form.field("prompt") or "").encode("utf-8"))
    call.message_count = 1
    call.unseen_input = True  # the input images' tokens (a model priced by them): no text bounds them
    if not call.attribution.end_user_id and form.field("user"):
        call.attribution = replace(call.attribution, end_user_id=(form.field("user") or "")[:256])
    return call


def _attribution(headers: dict[str, str]) -> Attribution:
    values: dict[str, Any] = {}
    for header, name in ATTRIBUTION_HEADERS.items():
        if header in headers and name not in values:
            values[name] = headers[header]
    request_id = headers.get(REQUEST_ID_HEADER) or _idempotent_id(headers.get(IDEMPOTENCY_HEADER, ""))
    if request_id:
        values["request_id"] = request_id
    tags = {k[len(TAG_HEADER_PREFIX):]: v for k, v in headers.items() if k.startswith(TAG_HEADER_PREFIX)}
    correlation = headers.get(CORRELATION_HEADER)
    if correlation and CORRELATION_HEADER not in tags and len(tags) < TAGS_MAX:  # never a reason to refuse
        tags[CORRELATION_HEADER] = correlation[:TAG_VALUE_LENGTH_MAX]
    if not values.get("trace_id") and values.get("traceparent"):
        values["trace_id"] = trace_id_from(values["traceparent"])
    return Attribution(tags=tags, **values)


def _idempotent_id(key: str) -> str:
    """The request id an Idempotency-Key names: the key itself where it is one (1-128 of [A-Za-z0-9._:/=+@-]),
    else a digest of it: clients' keys are any text (Stripe's go to 255 characters), and a key meant to make
    a retry safe must never be why a request is refused."""
    if not key or REQUEST_ID_PATTERN.match(key):
        return key
    return "idem_" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def _request_lookup(call: HttpCall, request_id: str, path: str) -> HttpCall:
    """GET /v1/requests/{id}: the request asked about, and how long to wait for it to close (`wait`, seconds)."""
    call.request_lookup, call.lookup_wait_ms = request_id, REQUEST_LOOKUP_WAIT_SECONDS * 1000
    for name, value in parse_qsl(path.partition("?")[2], keep_blank_values=True):
        if name == "wait":
            if not re.fullmatch(r"[0-9]{1,3}", value) or int(value) * 1000 > request_lookup.WAIT_MS_MAX:
                return _problem(call, "invalid_request", f"wait must be a whole number of seconds from 0 to "
                                f"{request_lookup.WAIT_MS_MAX // 1000}", "wait")
            call.lookup_wait_ms = int(value) * 1000
    return call


def _request_listing(call: HttpCall, path: str) -> HttpCall:
    """GET /v1/requests: how many of the customer's requests (`limit`), after which (`after`)."""
    call.request_listing, call.listing_limit = True, request_lookup.LISTING_DEFAULT
    for name, value in parse_qsl(path.partition("?")[2], keep_blank_values=True):
        if name == "limit":
            if not re.fullmatch(r"[0-9]{1,3}", value) or not 1 <= int(value) <= request_lookup.LISTING_MAX:
                return _problem(call, "invalid_request",
                                f"limit must be a whole number from 1 to {request_lookup.LISTING_MAX}", "limit")
            call.listing_limit = int(value)
        elif name == "after":
            if not 0 < len(value) <= request_lookup.REQUEST_ID_LENGTH_MAX or not value.isprintable():
                return _problem(call, "invalid_request", "after must be the id of a request the page before "
                                "listed", "after")
            call.listing_after = value
    return call


def _usage_summary(call: HttpCall, path: str) -> HttpCall:
    """GET /v1/usage: how to group the customer's usage (`group_by`, `bucket` in `timezone`: the policy's unless
    told) and over which window (`since`, `until`: unix seconds; the last 30 days unless told)."""
    call.usage_summary = True
    since_ms: int | None = None
    until_ms: int | None = None
    for name, value in parse_qsl(path.partition("?")[2], keep_blank_values=True):
        if name == "group_by":
            call.usage_group_by += tuple(d.strip() for d in value.split(",") if d.strip())
        elif name == "bucket":
            call.usage_bucket = value
        elif name == "timezone":
            call.usage_timezone = value
        elif name in ("since", "until"):
            if not re.fullmatch(r"[0-9]{1,12}", value):
                return _problem(call, "invalid_request", f"{name} must be a time in unix seconds", name)
            if name == "since":
                since_ms = int(value) * 1000
            else:
                until_ms = int(value) * 1000
    call.usage_since_ms, call.usage_until_ms = own_usage.window(since_ms, until_ms)
    wrong = own_usage.problem(list(call.usage_group_by), call.usage_since_ms, call.usage_until_ms, call.usage_bucket,
                              call.usage_timezone)
    return _problem(call, "invalid_request", *wrong) if wrong else call


def _problem(call: HttpCall, reason: str, message: str, param: str = "") -> HttpCall:
    call.problem, call.problem_message, call.problem_param = reason, message, param
    return call


RETRY_WORTH_WAITING_SECONDS = 60  # the openai SDKs wait out a retry-after of up to a minute


def rate_limit_headers(rate_limits: Iterable[RateLimit], now_ms: int) -> list[tuple[str, str]]:
    """OpenAI's rate-limit headers of a reply, from the key's own limits (the provider's, which describe the
    operator's account, never reach the client): x-ratelimit-limit-, -remaining- and -reset-requests and
    -tokens, the reset as OpenAI writes it ("1m30s", "250ms"; none for a total that never resets); the tightest
    budget's x-policyd-budget-limit, -remaining and -reset, and a thread budget's x-policyd-thread-budget-limit and
    -remaining (money as exact decimal text)."""
    headers = []
    for r in rate_limits:
        if r.unit == "thread_budget":  # a caller's budget of its thread: what it leaves once this request is held
            headers += [(f"{THREAD_BUDGET_HEADER}-limit", format_amount(r.limit)),
                        (f"{THREAD_BUDGET_HEADER}-remaining", format_amount(r.remaining))]
            continue
        if r.unit == "money":  # the tightest of its budgets: what may still be charged there once this one is held
            headers += [(f"{BUDGET_HEADER}-limit", format_amount(r.limit)),
                        (f"{BUDGET_HEADER}-remaining", format_amount(r.remaining))]
            if r.resets_ms:
                headers.append((f"{BUDGET_HEADER}-reset", _duration(max(r.resets_ms - now_ms, 0))))
            continue
        headers += [(f"x-ratelimit-limit-{r.unit}", str(r.limit)), (f"x-ratelimit-remaining-{r.unit}", str(r.remaining))]
        if r.resets_ms:
            headers.append((f"x-ratelimit-reset-{r.unit}", _duration(max(r.resets_ms - now_ms, 0))))
    return headers


def _duration(ms: int) -> str:
    if ms < 1000:
        return f"{ms}ms"
    seconds = -(-ms // 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes}m{seconds}s" if hours else f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def reply_headers(status: int, retry_after_seconds: int = 0) -> list[tuple[str, str]]:
    """The headers of a JSON reply policyd gives itself (a denial, an answer it owns). The OpenAI SDKs
    retry every 429 on their own (twice, by default) unless told otherwise by `x-should-retry`: a
    429 that a wait of a minute cannot cure (an empty wallet, a day's budget) says false, so the
    client hears at once and is not denied three times; one that a short wait cures says true."""
    headers = [("content-type", "application/json")]
    if retry_after_seconds > 0:
        headers.append(("retry-after", str(retry_after_seconds)))
    if status == 429:
        worth_it = 0 < retry_after_seconds <= RETRY_WORTH_WAITING_SECONDS
        headers.append(("x-should-retry", "true" if worth_it else "false"))
    return headers


# The provider's 401 and 403 are about the operator's credentials (the customer's key never reaches it):
# passed on, they would tell the customer their own key is wrong and show the operator's key's ends
# (OpenAI's "Incorrect API key provided: sk-proj-ab***wxyz"). They are answered with this instead.
CREDENTIAL_REFUSALS = (401, 403)


def credentials_refused_reply() -> tuple[int, list[tuple[str, str]], bytes]:
    """(status, headers, body) that stand for a provider's refusal of the operator's credentials."""
    reason = "provider_credentials_refused"
    return (reasons.http_status(reason), [("content-type", "application/json"), ("x-should-retry", "false")],
            error_body(reasons.error_type(reason), reason, reasons.MESSAGES[reason]))


def failure_reply(error: Exception) -> tuple[int, bytes, str]:
    """(status, OpenAI error body, reason) for an error policyd did not expect: 503 when a store it
    stands on is unreachable, else 500; the error's own text goes to the log, never to the client."""
    reason = reasons.failure(error)
    return reasons.http_status(reason), error_body(reasons.error_type(reason), reason, reasons.MESSAGES[reason]), reason


# AWS's errors as Bedrock's clients read them (boto3, the AWS SDKs): the error's name in a header, its text in the
# body's "message". policyd's own replies to a Bedrock path carry both, beside its error object.
AWS_ERROR_HEADER = "x-amzn-errortype"
AWS_ERROR_NAMES = {400: "ValidationException", 401: "UnrecognizedClientException", 403: "AccessDeniedException",
                   404: "ResourceNotFoundException", 409: "ConflictException", 413: "ValidationException",
                   415: "ValidationException", 429: "ThrottlingException", 503: "ServiceUnavailableException"}
AWS_QUOTA_SPENT = "ServiceQuotaExceededException"


def aws_client_path(path: str) -> bool:
    """A path of Bedrock's runtime API, whose clients read errors in AWS's shape."""
    return _BEDROCK.search(path.split("?", 1)[0]) is not None


def for_aws_clients(status: int, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
    """A reply policyd gives itself, as a Bedrock client reads it. The AWS SDKs retry every 429 (boto3 up to four
    more times, each one denied and recorded again): a 429 no short wait cures (x-should-retry: false: an empty
    wallet, a day's budget) is a 400 ServiceQuotaExceededException, as Bedrock answers a quota spent."""
    try:
        error = json.loads(body) if status >= 400 else None
        message = error["error"]["message"] if error is not None else None
    except (ValueError, TypeError, KeyError):
        error = None
    if error is None:  # not an error policyd made
        return status, headers, body
    if status == 429 and headers.get("x-should-retry") == "false":
        status, name = 400, AWS_QUOTA_SPENT
    else:
        name = AWS_ERROR_NAMES.get(status, "ValidationException" if status < 500 else "InternalServerException")
    return status, {**headers, AWS_ERROR_HEADER: name}, json.dumps({"message": message, **error}).encode()


POLICY_UNAVAILABLE_MESSAGE = "the spend policy service is unavailable; retry later"


def error_body(error_type: str, code: str, message: str, param: str = "") -> bytes:
    """The OpenAI error shape, which the openai SDKs turn into their exception classes."""
    return json.dumps({"error": {"type": error_type, "code": code, "message": message,
                                 "param": param or None}}).encode()


def _async_chat_job(body: dict[str, Any]) -> bool:
    """A body of Perplexity's async chat completions: the chat completion to run is its "request"."""
    return isinstance(body.get("request"), dict) and "messages" not in body


def rewrite_body(call_body: dict[str, Any] | MultipartForm, endpoint: str, upstream_model: str, requested_model: str,
                 output_cap: int, client_gave_cap: bool, stream: bool,
                 model_in_path: bool = False, tool_call_cap: int = 0,
                 image_model: str = "", output_cap_field: str = "",
                 stream_usage_reported: bool = False, fallback_models: tuple[str, ...] = (),
                 advisor_model: str = "") -> dict[str, Any] | MultipartForm | None:
    """The request body policy requires, or None when it stays as it is.

    - the served model as the provider names it (`upstream_model`), where it is not the model the request
      names: a downgrade, a fallback, a model the price table names otherwise (not where the path names the
      model: Gemini, an Azure deployment);
    - the reserved output cap when the client sent none, where the provider reads it (a chat completion's
      `output_cap_field`: max_completion_tokens, or max_tokens for providers that read only it, to which a
      client's max_completion_tokens is moved, since such a provider would ignore it);
    - the reserved bound of search tools the client left unbounded (`tool_call_cap`): the Responses API's
      max_tool_calls, max_uses of each Anthropic web search tool without one;
    - the image model the image_generation tool is to name (`image_model`: the plan's default for a tool
      naming none, or the tool's own as the provider names it); the models Anthropic's `fallbacks` and advisor
      tool are to name (`fallback_models`, `advisor_model`), as the provider names them, and so a router's
      `models` (the request's own model in it as it is sent);
    - stream_options.include_usage for streamed chat and text completions, so usage is always reported;
      or, where the provider reports it unasked and refuses stream_options (`stream_usage_reported`,
      Mistral's), no stream_options at all: the client's are taken out.

    A speech-to-text form changes only by its model; an async chat completion's job (Perplexity's), its request."""
    if endpoint == "chat_completions" and isinstance(call_body, dict) and _async_chat_job(call_body):
        inner = rewrite_body(call_body["request"], endpoint, upstream_model, requested_model, output_cap,
                             client_gave_cap, False, model_in_path, tool_call_cap, image_model, output_cap_field,
                             stream_usage_reported)
        return None if inner is None else {**call_body, "request": inner}
    renamed = bool(upstream_model) and upstream_model != requested_model and not model_in_path
    if isinstance(call_body, MultipartForm):
        return call_body.with_field("model", upstream_model) if renamed else None
    body = dict(call_body)
    changed = False
    if renamed and endpoint == "cached_contents":  # "models/M" (or Vertex AI's path to it): its M renamed
        given = body.get("model")
        if isinstance(given, str) and given.endswith(requested_model):
            body["model"] = given[:len(given) - len(requested_model)] + upstream_model
            changed = True
    elif renamed and endpoint != "gemini_generate_content":
        body["model"] = upstream_model
        changed = True
    if output_cap and endpoint == "chat_completions" and output_cap_field == "max_tokens" and client_gave_cap \
            and body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        del body["max_completion_tokens"]  # a field this provider ignores: its cap moves where it reads one
        body["max_tokens"] = output_cap
        changed = True
    if output_cap and not client_gave_cap:
        clients_caps = [name for name in OUTPUT_CAP_FIELDS.get(endpoint, ()) if body.get(name) is not None]
        for name in clients_caps:  # a larger cap of the client's (a plan fitting the cap to the wallet): lowered
            body[name] = output_cap
        if endpoint == "chat_completions" and output_cap_field == "max_tokens":  # the one field it reads
            body.pop("max_completion_tokens", None)
            body["max_tokens"] = output_cap
        elif endpoint == "chat_completions" and not clients_caps:
            body[output_cap_field or "max_completion_tokens"] = output_cap
        elif endpoint == "completions":
            body["max_tokens"] = output_cap
        elif endpoint == "responses":
            body["max_output_tokens"] = output_cap
        elif endpoint in ("anthropic_messages", "cohere_chat"):
            body["max_tokens"] = output_cap
        elif endpoint == "gemini_generate_content":  # in the config the body gives, under the name it uses
            key = next((k for k in _GEMINI_GENERATION_CONFIG if isinstance(body.get(k), dict)), "generationConfig")
            given = body.get(key) if isinstance(body.get(key), dict) else {}
            generation = {k: v for k, v in given.items() if k not in _GEMINI_OUTPUT_CAP}
            generation["maxOutputTokens"] = output_cap
            body[key] = generation
        elif endpoint == "bedrock_converse":
            body["inferenceConfig"] = {**_dict_of(body, "inferenceConfig"), "maxTokens": output_cap}
        changed = changed or endpoint in OUTPUT_CAP_FIELDS
    if tool_call_cap and endpoint == "responses" and not _count(body.get("max_tool_calls")):
        body["max_tool_calls"] = tool_call_cap
        changed = True
    if image_model and endpoint == "responses" and isinstance(body.get("tools"), list):
        tools = [dict(t, model=image_model) if isinstance(t, dict) and t.get("type") == "image_generation"
                 and t.get("model") != image_model else t for t in body["tools"]]
        if tools != body["tools"]:
            body["tools"] = tools
            changed = True
    if fallback_models and endpoint == "anthropic_messages" and isinstance(body.get("fallbacks"), list) and \
            len(body["fallbacks"]) == len(fallback_models):  # each, in order, as the provider names it
        body["fallbacks"] = [dict(f, model=model) if isinstance(f, dict) else f
                             for f, model in zip(body["fallbacks"], fallback_models)]
        changed = True
    if endpoint in ROUTED_ENDPOINTS and isinstance(body.get("models"), list) and (renamed or fallback_models):
        # a router's list, each as the provider names it, the model asked for as it is sent (a downgrade's too)
        names = dict(zip(_routed_fallbacks(call_body), fallback_models)) | ({requested_model: upstream_model}
                                                                            if renamed else {})
        body["models"] = [names.get(m, m) if isinstance(m, str) else m for m in body["models"]]
        changed = True
    if endpoint in LISTED_FALLBACK_ENDPOINTS and fallback_models and not isinstance(body.get("models"), list) and (
            body.get("fallbacks") is not None or body.get("context_window_fallback_dict") is not None):
        # a gateway's of LiteLLM's kind: each as the provider names it
        names = dict(zip(_listed_fallback_names(call_body, requested_model), fallback_models))
        if isinstance(body.get("fallbacks"), list):
            body["fallbacks"] = [names.get(f, f) if isinstance(f, str) else dict(f, model=names[f["model"]])
                                 if isinstance(f, dict) and isinstance(f.get("model"), str) and f["model"] in names
                                 else f for f in body["fallbacks"]]
        if isinstance(body.get("context_window_fallback_dict"), dict):
            body["context_window_fallback_dict"] = {  # keyed by the model as it is sent
                upstream_model if k == requested_model else k: names.get(v, v) if isinstance(v, str) else v
                for k, v in body["context_window_fallback_dict"].items()}
        changed = True
    if tool_call_cap and endpoint in ROUTED_ENDPOINTS and isinstance(body.get("tools"), list):
        tools = [_router_search_bounded(t, tool_call_cap) for t in body["tools"]]
        if tools != body["tools"]:
            body["tools"] = tools
            changed = True
    if advisor_model and endpoint == "anthropic_messages" and isinstance(body.get("tools"), list):
        body["tools"] = [dict(t, model=advisor_model) if _advisor(t) else t for t in body["tools"]]
        changed = True
    if tool_call_cap and endpoint == "anthropic_messages" and isinstance(body.get("tools"), list):
        tools = [dict(t, max_uses=tool_call_cap) if isinstance(t, dict) and (_unbounded_web_search(t) or (
            _advisor(t) and not _count(t.get("max_uses")))) else t for t in body["tools"]]
        if tools != body["tools"]:
            body["tools"] = tools
            changed = True
    if stream and endpoint in STREAM_USAGE_ENDPOINTS and stream_usage_reported:
        if "stream_options" in body:  # refused by such a provider (422), and its usage comes all the same
            del body["stream_options"]
            changed = True
    elif stream and endpoint in STREAM_USAGE_ENDPOINTS:
        options = body.get("stream_options") if isinstance(body.get("stream_options"), dict) else {}
        if options.get("include_usage") is not True:
            body["stream_options"] = {**options, "include_usage": True}
            changed = True
    return body if changed else None


def _router_search_bounded(tool: Any, searches: int) -> Any:
    """A router's web_search server tool given no max_total_results, given the results of `searches` searches (the
    plan's bound, as held); any other tool as it is."""
    if not isinstance(tool, dict) or tool.get("type") != ROUTER_WEB_SEARCH_TOOL:
        return tool
    parameters = tool.get("parameters") if isinstance(tool.get("parameters"), dict) else {}
    if _count(parameters.get("max_total_results")):
        return tool
    each = _count(parameters.get("max_results")) or ROUTER_WEB_RESULTS_DEFAULT
    return dict(tool, parameters={**parameters, "max_total_results": searches * each})


# codings a client may compress a request body in (zlib's window bits for each: gzip's header, or zlib's)
CONTENT_CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def decoded_body(coding: str, body: bytes) -> bytes | tuple[str, str]:
    """A request body the client compressed (its Content-Encoding), decoded, at most REQUEST_BODY_BYTES_MAX
    bytes of it (a small body may hold a huge one); else (reason, message) of why it cannot be. The provider
    gets it decoded: not every provider reads a compressed request."""
    bits = CONTENT_CODINGS.get(coding)
    if bits is None:
        return ("unsupported_content_encoding", f"request bodies are read as sent or compressed with gzip or "
                f"deflate, not {coding[:64]!r}: send it uncompressed")
    try:
        decoder = zlib.decompressobj(bits if coding != "deflate" or body[:1] == b"\x78" else -15)  # raw deflate too
        decoded = decoder.decompress(body, REQUEST_BODY_BYTES_MAX + 1)
    except zlib.error:
        return "invalid_request", f"the request body is not valid {coding} data"
    if len(decoded) > REQUEST_BODY_BYTES_MAX or decoder.unconsumed_tail:
        return "request_too_large", f"the request body is larger than {REQUEST_BODY_BYTES_MAX} bytes decoded"
    if not decoder.eof:
        return "invalid_request", f"the request body's {coding} data ends early"
    return decoded


def parsed_body(content_type: str, body: bytes) -> dict[str, Any] | MultipartForm | None:
    """A request body as `rewrite_body` takes it: a multipart form, else JSON; None when it is neither."""
    boundary = MultipartForm.boundary_of(content_type)
    try:
        if boundary is not None:
            return MultipartForm.parse(body, boundary)
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):  # MultipartError is a ValueError
        return None
    return data if isinstance(data, dict) else None


def encoded_body(body: dict[str, Any] | MultipartForm) -> bytes:
    """A (rewritten) request body as sent to the provider."""
    if isinstance(body, MultipartForm):
        return body.encoded()
    return json.dumps(body, separators=(",", ":")).encode()


def body_sent(body: Any, rewritten: dict[str, Any] | MultipartForm | None, decoded: bool) -> bytes | None:
    """The bytes the provider gets in place of the client's: the body policy rewrote, else the client's own
    decoded (one it compressed, HttpCall.body_decoded; its Content-Encoding then goes); None to send the
    client's bytes as they are."""
    if rewritten is not None:
        return encoded_body(rewritten)
    return encoded_body(body) if decoded else None


def key_summary_body(summary: KeySummary) -> bytes:
    """GET /v1/key: what the key may still spend, money as exact decimal text of the policy's currency; with an end
    user named (x-end-user-id), `end_user`: its id and whether the operator paused it (its requests refused)."""
    def amount(unit: str, value: int) -> int | str:
        return format_amount(value) if unit in MONEY_UNITS else value

    wallet = None if summary.balance is None else {
        "balance": format_amount(summary.balance), "reserved": format_amount(summary.reserved),
        "available": format_amount(summary.balance - summary.reserved)}
    return json.dumps({
        "object": "key", "id": summary.key_id, "customer": summary.customer_id, "plan": summary.plan,
        "currency": summary.currency, "wallet": wallet,
        "limits": [{"name": s.name, "scope": s.scope, "window": s.window, "unit": s.unit,
                    "limit": amount(s.unit, s.limit), "used": amount(s.unit, s.used),
                    "remaining": amount(s.unit, max(s.limit - s.used, 0)), "resets_at": s.resets_unix or None}
                   for s in summary.limits],
        **({"end_user": {"id": summary.end_user_id, "paused": summary.end_user_paused}} if summary.end_user_id else {}),
    }).encode()


def request_summary_body(summary: RequestSummary) -> bytes:
    """GET /v1/requests/{id}: one request as its customer may see it, money as exact decimal text of the policy's
    currency; its usage's figures that are not zero (its input and output tokens always)."""
    return json.dumps(_request_summary(summary)).encode()


def request_list_body(summaries: list[RequestSummary], has_more: bool) -> bytes:
    """GET /v1/requests: a page of the customer's requests, newest first, each as GET /v1/requests/{id} shows
    it; listed as OpenAI's lists are (`has_more`; `last_id`, the next page's `after`)."""
    return json.dumps({"object": "list", "data": [_request_summary(s) for s in summaries],
                       "first_id": summaries[0].request_id if summaries else None,
                       "last_id": summaries[-1].request_id if summaries else None, "has_more": has_more}).encode()


def usage_summary_body(rows: list[own_usage.UsageRow], truncated: bool, currency: str, call: HttpCall) -> bytes:
    """GET /v1/usage: the customer's usage summed over the window, a row a group (and bucket), money as exact
    decimal text of the policy's currency."""
    return json.dumps({
        "object": "usage", "currency": currency, "since": call.usage_since_ms // 1000,
        "until": call.usage_until_ms // 1000, "group_by": list(call.usage_group_by),
        "bucket": call.usage_bucket or None, "timezone": call.usage_timezone or None, "truncated": truncated,
        "data": [{"group": r.group, "bucket": r.bucket or None, **r.counts, "charge": format_amount(r.charge),
                  "refunded": format_amount(r.refunded), "usage": r.usage} for r in rows],
    }).encode()


def _request_summary(summary: RequestSummary) -> dict[str, Any]:
    usage = {name: value for name, value in summary.usage.items()
             if value or name in ("input_tokens", "cached_input_tokens", "output_tokens")}
    return {
        "object": "request", "id": summary.request_id, "created": summary.created_ms // 1000,
        "status": summary.status, "decision": summary.decision, "reason": summary.reason or None,
        "message": summary.message or None, "endpoint": summary.endpoint, "model": summary.requested_model,
        "served_model": summary.served_model, "key": summary.api_key_id, "currency": summary.currency,
        "charge": format_amount(summary.charge), "held": format_amount(summary.held),
        "refunded": format_amount(summary.refunded),
        "balance_after": None if summary.balance_after is None else format_amount(summary.balance_after),
        "usage": usage, "usage_estimated": summary.usage_estimated, "error_class": summary.error_class or None,
        "feature": summary.feature or None, "thread_id": summary.thread_id or None,
        "end_user_id": summary.end_user_id or None, "agent_id": summary.agent_id or None, "tags": summary.tags,
    }


def models_reply(models: list[tuple[str, str]], shape: str = "openai", model: str = "") -> tuple[int, bytes]:
    """GET /v1/models, or /v1/models/{model} (`model`): the status and body, as the client's API answers.
    A model the key may not use is not found, as the provider says of one that does not exist."""
    if not model:
        return 200, models_listing(models, shape)
    found = [(m, owner) for m, owner in models if m == model.removeprefix("models/")]
    listed = json.loads(models_listing(found, shape))
    entries = listed.get("data", listed.get("models")) or []
    if not entries:
        return 404, error_body("invalid_request_error", "model_not_found",
                               f"The model '{model[:200]}' does not exist or you do not have access to it.", "model")
    return 200, json.dumps(entries[0]).encode()


def models_listing(models: list[tuple[str, str]], shape: str = "openai") -> bytes:
    """GET /v1/models of (model id, provider) pairs, as the client's API lists them: OpenAI's list (every
    model the key may use); Anthropic's (`anthropic-version` sent) and Gemini's (`/v1beta/models`, a
    Gemini key header or `?key=`) of that provider's models alone, the only ones its API can call."""
    if shape == "anthropic":
        ids = [model for model, owner in models if owner == "anthropic"]
        return json.dumps({"data": [{"type": "model", "id": model, "display_name": model,
                                     "created_at": "1970-01-01T00:00:00Z"} for model in ids],
                           "has_more": False, "first_id": ids[0] if ids else None,
                           "last_id": ids[-1] if ids else None}).encode()
    if shape == "gemini":
        return json.dumps({"models": [
            {"name": f"models/{model}", "baseModelId": model, "version": "", "displayName": model,
             "supportedGenerationMethods": ["generateContent", "countTokens"]}
            for model, owner in models if owner == "google"]}).encode()
    return json.dumps({"object": "list", "data": [
        {"id": model, "object": "model", "created": 0, "owned_by": owner} for model, owner in models
    ]}).encode()
