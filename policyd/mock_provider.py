"""A small OpenAI/Anthropic/Gemini/Bedrock-compatible provider for demos and tests: it answers chat completions,
responses, embeddings, legacy completions, speech, Anthropic messages, Gemini's generateContent (and its
streams, SSE or a JSON array), Bedrock's Converse and InvokeModel (their streams in AWS's event stream
encoding), rerankers (Cohere's, billed in search units; Jina's and Voyage's, in tokens) and token counts
with deterministic usage, streams SSE, and can fail.

The Responses API streams its own events (response.created, items added and done, text deltas, an image
tool's partial images, response.completed with the usage); chat and legacy completions stream chunks.

Scenarios, by the request header `x-mock-scenario`:
    ok (default) | rate_limited (429) | server_error (500) | unavailable (503, retry-after 1 s) | stall (sleeps 30 s) |
    hang_up (the connection closes, no reply) | marked (a 500 carrying the gateway's marks of its own replies) |
    cut (a stream that stops mid-way without usage) | no_usage (a reply without usage) |
    slow (a stream with 200 ms between events, for clients that hang up mid-way) | very_slow (600 ms: a
    stream that outlasts a few seconds) |
    error_midway (an Anthropic stream that ends with an error event and no message_delta) |
    gzip (a JSON reply, or a chat or text completion stream, compressed whatever the request accepts; a JSON
    reply is compressed anyway when the request accepts gzip, as providers do) |
    fragmented (a chat or text completion stream, or a Bedrock one, written a few bytes at a time: its events split across
    reads, as a network may deliver them) | sized (a chat or text completion stream sent whole, with a
    content-length, as a server that buffers its events does)

Models named mistral* or codestral* answer as Mistral's API does: a request naming stream_options or
max_completion_tokens is refused (422, extra_forbidden), and a stream's last chunk carries its usage unasked.
Models named sonar* answer as Perplexity's API does: their usage (a stream's last chunk, unasked) says the
search context size of their request fee and its cost in dollars; sonar-deep-research's also the sources' tokens
it read (citation_tokens), its searches (num_search_queries) and its reasoning_tokens, beside the completion.
Perplexity's async chat completions (/async/chat/completions, /v1/async/sonar): a job made, its answer when
asked for once it has completed (header `x-mock-background-polls`, as for background responses). Veo's
operations (models/M:predictLongRunning) likewise, their videos downloaded from files/F:download.
Gemini's explicit caches (cachedContents, the Gemini API's and Vertex AI's): made (their tokens counted as a
prompt's, usageMetadata.totalTokenCount; kept for their ttl or until their expireTime, an hour unless told),
read, their time to live changed (PATCH), deleted; a generateContent naming one (cachedContent) has its tokens
in its prompt, as cachedContentTokenCount; one naming a cache it does not know is refused (403, as Google does).

Header `x-mock-background-polls`: a background response (background: true) is queued and then in progress
for this many reads of it (default 2) before it is completed, with its usage; cancelled before that, it
reports the input and half the output.

Header `x-mock-reply-model`: the model the reply names (a provider that served another model than it
was sent: a server-side fallback, a router). A chat completion or response with a router's `models` whose
prompt says "fall through" is answered by the first of them other than its `model` (OpenRouter's fallbacks), as is
one with `fallbacks` beside a chat or text completion or a response (a gateway's of LiteLLM's kind).
Models named router/* answer as OpenRouter does: their usage says the cost charged (usage.cost, 13 decimal places;
header `x-mock-byok`: the fee alone, the provider's charge in cost_details.upstream_inference_cost), with $0.004 a
result of its web search: its web plugin's (or an ":online" slug's) max_results (5 unless told), its web_search
server tool's two searches of max_results each (5 unless told) within max_total_results.

Usage it reports: prompt tokens = ceil(UTF-8 bytes of the messages / 4), completion tokens =
min(the request's output cap, 12). `GET /_mock/requests` lists what it received (for tests).
"""

from __future__ import annotations

import base64
import calendar
import collections
import gzip
import itertools
import json
import re
import sys
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from policyd import event_stream
from policyd.audio import wav_seconds
from policyd.multipart import MultipartError, MultipartForm

STORED_RESPONSE_PATH = re.compile(r"/v1/responses/(?P<id>resp_[^/]+)(?P<rest>/input_items|/cancel)?$")
FILE_PATH = re.compile(r"/(v1|openai)/files(/(?P<id>[^/]+)(?P<content>/content)?)?$")
UPLOAD_PATH = re.compile(r"/v1/uploads(/(?P<id>[^/]+)/(?P<verb>parts|complete|cancel))?$")
STORED_CHAT_PATH = re.compile(r"/v1/chat/completions/(?P<id>chatcmpl-[^/]+)(?P<rest>/messages)?$")
MESSAGE_BATCH_PATH = re.compile(r"/v1/messages/batches(/(?P<id>msgbatch_[^/]+)(?P<rest>/results|/cancel)?)?$")
BATCH_PATH = re.compile(r"/(v1|openai)/batches(/(?P<id>batch_[^/]+)(?P<cancel>/cancel)?)?$")
VEO_PATH = re.compile(r"/models/(?P<model>[^/:]+)(?P<verb>:predictLongRunning|:fetchPredictOperation"
                      r"|/operations/(?P<op>[^/]+))$")  # Veo's (Gemini's; Vertex AI's, under a project's location)
VERTEX_LOCATION = re.compile(r"projects/[^/]+/locations/[^/]+/publishers/google/")
VEO_FILE_PATH = re.compile(r"/v1beta/files/(?P<id>[^/:]+):download$")
VIDEO_BYTES = b"\x00\x00\x00\x18ftypmp42 a mock video"
GEMINI_UPLOAD_PATH = re.compile(r"/upload/v1beta/files$")  # Gemini's File API: resumable uploads
GEMINI_FILE_PATH = re.compile(r"/v1beta/files/(?P<id>[^/:]+)$")
CACHED_CONTENTS_PATH = re.compile(r"/v1(beta|beta1)?/(?P<at>projects/[^/]+/locations/[^/]+/)?cachedContents"
                                  r"(/(?P<id>[^/]+))?$")  # Gemini's explicit caches (Vertex AI's: under a location)
ASYNC_CHAT_PATH = re.compile(r"/(async/chat/completions|v1/async/sonar)(/(?P<id>[^/]+))?$")  # Perplexity's jobs
CONVERSATION_PATH = re.compile(r"/v1/conversations(/(?P<id>[^/]+)(?P<items>/items(/(?P<item>[^/]+))?)?)?$")
WORDS = ["policyd", " keeps", " every", " cent", " of", " spend", " exact", " and", " on", " time", ".", " Done"]
COMPLETION_TOKENS_MAX = len(WORDS)
SLOW_FILE_SECONDS = 6
EVENT_GAP_SECONDS = {"slow": 0.2, "very_slow": 0.6}  # between a stream's events, by scenario (else 2 ms)


CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
AUDIO_BYTES_PER_CHARACTER = 64
ACCOUNT_HEADERS = {"openai-organization": "org-operator", "x-ratelimit-remaining-requests": "9999",
                   "anthropic-ratelimit-tokens-remaining": "123456", "x-request-id": "req_mock"}
IMAGE_TOKENS = {"low": 272, "medium": 1056, "high": 4160}  # a square image's output tokens, by quality
GEMINI_IMAGE_TOKENS = 1290  # a 1024x1024 image out of Gemini's image models
CACHE_NOT_FOUND = "CachedContent not found (or permission denied)"  # Google's answer for another's, or none
GEMINI_CACHE_TOKENS_MIN = 256  # the fewest an explicit cache holds (Google's are 1,024 to 4,096: smaller for tests)
GEMINI_PATH = re.compile(r"/models/(?P<model>[^/:]+):(?P<verb>generateContent|streamGenerateContent)$")
GEMINI_BATCH_PATH = re.compile(r"/v1beta/batches/(?P<id>[^/:]+)(?P<cancel>:cancel)?$")
GEMINI_BATCH_MADE_PATH = re.compile(r"/models/(?P<model>[^/:]+):batchGenerateContent$")
AZURE_DATED_PATH = re.compile(r"/openai/(?!v1/)")  # Azure OpenAI's dated API: every request names its api-version
BEDROCK_PATH = re.compile(r"/model/(?P<model>[^/]+)/(?P<verb>converse|converse-stream|invoke|invoke-with-response-stream"
                          r"|count-tokens)$")
VERTEX_ANTHROPIC_PATH = re.compile(r"/publishers/anthropic/models/(?P<model>[^/:]+):(rawPredict|streamRawPredict)$")


def perplexity(model: Any) -> bool:
    """A model of Perplexity's API (Sonar): its usage says its search's context size, the fee it cost and, for Deep
    Research, the sources' tokens it read, the searches it ran and its reasoning, beside its completion_tokens."""
    return str(model).startswith("sonar")


PERPLEXITY_FEES = {"low": "0.005", "medium": "0.008", "high": "0.012"}  # sonar's request fee, by search context
DEEP_RESEARCH_SEARCHES = 7  # searches a Sonar Deep Research reply ran
DEEP_RESEARCH_REASONING_TOKENS = 40  # ... its reasoning, billed beside its completion tokens


def perplexity_usage(body: dict[str, Any], model: str, p_tokens: int, c_tokens: int) -> dict[str, Any]:
    """Perplexity's usage of a reply: Deep Research reads three tokens of sources a prompt token; its cost object
    in dollars as its API gives it (JSON numbers, which a gateway must not price from)."""
    options = body.get("web_search_options") if isinstance(body.get("web_search_options"), dict) else {}
    size = options.get("search_context_size") if options.get("search_context_size") in PERPLEXITY_FEES else "low"
    usage: dict[str, Any] = {"prompt_tokens": p_tokens, "completion_tokens": c_tokens,
                             "total_tokens": p_tokens + c_tokens, "search_context_size": size}
    if "deep-research" in model:
        usage.update(citation_tokens=3 * p_tokens, num_search_queries=DEEP_RESEARCH_SEARCHES,
                     reasoning_tokens=DEEP_RESEARCH_REASONING_TOKENS)
    usage["cost"] = {"input_tokens_cost": round(p_tokens * 1e-6, 6), "output_tokens_cost": round(c_tokens * 1e-6, 6),
                     "request_cost": float(PERPLEXITY_FEES[size]), "total_cost": 0.1}
    return usage


ROUTER_WEB_RESULT_COST = 40_000_000_000  # a router's web search result (Exa's engine, $0.004), in 1e-13 dollars
ROUTER_TOOL_SEARCHES = 2  # the searches a model makes with a router's web_search server tool


def router_web_results(body: dict[str, Any], model: str) -> int:
    """The results a router's web search returned: its web plugin's (or an ":online" slug's) max_results, 5 unless
    told; its web_search server tool's searches of max_results each (5 unless told), within its max_total_results."""
    plugins = [p for p in body.get("plugins") or [] if isinstance(p, dict) and p.get("id") == "web"]
    results = 0
    if plugins or model.endswith(":online"):
        results += max([int(p["max_results"]) for p in plugins if p.get("max_results")] or [5])
    for tool in body.get("tools") or []:
        if isinstance(tool, dict) and tool.get("type") == "openrouter:web_search":
            parameters = tool.get("parameters") or {}
            found = ROUTER_TOOL_SEARCHES * int(parameters.get("max_results") or 5)
            results += min(found, int(parameters.get("max_total_results") or found))
    return results


def router_cost(model: str, usage: dict[str, Any], byok: bool, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A router's usage (OpenRouter's, for models named router/*): beside its tokens, the cost in dollars it
    charged, a decimal of 13 places (the route's own prices, which no price table holds), its web search's results
    too; with the customer's own provider key (BYOK), its fee alone, the provider's charge in
    cost_details.upstream_inference_cost."""
    if not model.startswith("router/"):
        return usage
    charged = usage.get("prompt_tokens", 0) * 12_345_678 + usage.get("completion_tokens", 0) * 45_678_912 \
        + router_web_results(body or {}, model) * ROUTER_WEB_RESULT_COST
    if not byok:
        return {**usage, "cost": float(f"0.{charged:013d}"), "is_byok": False}
    return {**usage, "cost": float(f"0.{charged // 20:013d}"), "is_byok": True,
            "cost_details": {"upstream_inference_cost": float(f"0.{charged:013d}")}}


def mistral(model: Any) -> bool:
    """A model of Mistral's API: it refuses fields it does not know, and a stream reports its usage unasked."""
    return str(model).startswith(("mistral", "codestral"))


RERANK_CONTEXT_TOKENS = 4096  # a Cohere reranker's (rerank-v3.5): its chunks, the query's tokens less


def prompt_tokens(body: dict[str, Any]) -> int:
    counted = body.get("input") if isinstance(body.get("input"), dict) else {}  # Bedrock's count-tokens
    body = counted.get("converse") or body
    text = json.dumps(body.get("messages") or body.get("input") or body.get("prompt") or body.get("contents") or "",
                      ensure_ascii=False)
    return -(-len(text.encode()) // 4)


def output_cap(body: dict[str, Any]) -> int:
    generation = body.get("generationConfig") if isinstance(body.get("generationConfig"), dict) else {}
    inference = body.get("inferenceConfig") if isinstance(body.get("inferenceConfig"), dict) else {}  # Bedrock's
    for value in (body.get("max_completion_tokens"), body.get("max_tokens"), body.get("max_output_tokens"),
                  generation.get("maxOutputTokens"), inference.get("maxTokens")):
        if isinstance(value, int) and value > 0:
            return value
    return COMPLETION_TOKENS_MAX


def bedrock_tier(headers: Any) -> dict[str, str]:
    """The tier Bedrock says an InvokeModel reply ran at (in its headers, as the request asked it)."""
    return {"x-amzn-bedrock-service-tier": headers.get("x-amzn-bedrock-service-tier") or "default",
            "x-amzn-bedrock-performanceconfig-latency":
                headers.get("x-amzn-bedrock-performanceconfig-latency") or "standard"}


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # a gateway may open hundreds of connections at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up mid-reply is what disconnect tests do: not an error worth a traceback."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


def _send_events(h: Any, events: list[dict[str, Any]], named: bool = False, gap_seconds: float = 0.0,
                 cut: bool = False) -> None:
    """A 200 of server-sent events, one chunk an event (OpenAI's audio endpoints stream so); `named`: each with
    an `event:` line of its type (Cohere's), `gap_seconds` apart; `cut`: the connection drops after the last."""
    h.send_response(200)
    h.send_header("content-type", "text/event-stream")
    h.send_header("transfer-encoding", "chunked")
    h.end_headers()
    for event in events:
        chunk = (f"event: {event['type']}\n" if named else "") + f"data: {json.dumps(event)}\n\n"
        h.wfile.write(f"{len(chunk.encode()):x}\r\n".encode() + chunk.encode() + b"\r\n")
        time.sleep(gap_seconds)
    if cut:
        h.close_connection = True
        return
    h.wfile.write(b"0\r\n\r\n")


def anthropic_turn(body: dict[str, Any], model: str, p_tokens: int, c_tokens: int) -> tuple[str, str, int, list[Any]]:
    """How Anthropic ends a message: (the model that wrote it, its stop_reason, the output tokens its top-level
    usage counts, its usage.iterations or []). A prompt saying "refuse this" is refused before any output;
    with `fallbacks` (a server-side fallback), one saying "decline" is declined by the model asked (after
    half its output: "decline midway") and written by the first fallback; a request whose context_management
    compacts (a compact_* edit) is compacted first, the compaction's tokens in its iterations alone."""
    prompt = json.dumps(body.get("messages"))
    fallbacks = [f.get("model") for f in body.get("fallbacks") or [] if isinstance(f, dict) and f.get("model")]
    if "refuse this" in prompt:
        return model, "refusal", 0, []
    if fallbacks and "decline" in prompt:
        declined = c_tokens // 2 if "decline midway" in prompt else 0
        return fallbacks[0], "end_turn", c_tokens, [
            {"type": "message", "model": model, "input_tokens": p_tokens, "output_tokens": declined,
             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            {"type": "fallback_message", "model": fallbacks[0], "input_tokens": p_tokens, "output_tokens": c_tokens,
             "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}]
    edits = (body.get("context_management") or {}).get("edits") or []
    if any(isinstance(e, dict) and str(e.get("type", "")).startswith("compact") for e in edits):
        return model, "end_turn", c_tokens, [
            {"type": "compaction", "input_tokens": 2 * p_tokens, "output_tokens": 50, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0},
            {"type": "message", "input_tokens": p_tokens, "output_tokens": c_tokens, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0}]
    return model, "end_turn", c_tokens, []


def anthropic_speed_and_geo(body: dict[str, Any]) -> dict[str, str]:
    """What Anthropic's usage says of a message's speed and geography (fast mode, US-only inference)."""
    return {"speed": "fast" if body.get("speed") == "fast" else "standard",
            "inference_geo": str(body.get("inference_geo") or "global")}


class MockProvider:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, api_keys: tuple[str, ...] = (),
                 keep_alive_seconds: float | None = None) -> None:
        """`keep_alive_seconds`: a connection unused that long is closed (uvicorn's and Node.js's 5 s); by default
        never."""
        self.api_keys = set(api_keys)
        self.requests: list[dict[str, Any]] = []
        # the last connections ended: (the client's port, who ended it: "client", or "provider" (its keep-alive
        # timeout, a reply it cut or hung up on)); a mock run for days keeps the last 10,000
        self.connections_ended: collections.deque[tuple[int, str]] = collections.deque(maxlen=10_000)
        self.lock = threading.Lock()
        self.stored: dict[str, tuple[dict[str, Any], Any]] = {}  # stored responses: id -> (reply, input)
        self.background: dict[str, int] = {}  # background responses still running: id -> reads before it ends
        self.operations: dict[str, tuple[dict[str, Any], int]] = {}  # Veo's: name -> (done, reads before)
        self.caches: dict[str, dict[str, Any]] = {}  # Gemini's explicit caches: id -> the CachedContent
        self.uploads_begun: dict[str, tuple[dict[str, Any], bytes]] = {}  # Gemini's: upload id -> (file, bytes so far)
        self.gemini_files: dict[str, dict[str, Any]] = {}  # Gemini's files: id -> the File
        # Perplexity's async chat jobs: id -> (the job, its answer, reads before it ends, whether it fails)
        self.jobs: dict[str, tuple[dict[str, Any], dict[str, Any], int, bool]] = {}
        self.response_ids = itertools.count(1)
        self.conversations: dict[str, dict[str, Any]] = {}  # id -> {"metadata": ..., "items": [...]}
        self.files: dict[str, tuple[dict[str, Any], bytes]] = {}  # id -> (the file object, its content)
        self.uploads: dict[str, tuple[dict[str, Any], dict[str, bytes]]] = {}  # id -> (the upload, its parts by id)
        # batches: id -> (the batch, its usage when it ends, reads before it ends; None: it reports no usage)
        self.batches: dict[str, tuple[dict[str, Any], dict[str, Any] | None, int]] = {}
        self.batch_outputs: dict[str, str] = {}  # batch id -> the output file it names once it ends
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = keep_alive_seconds  # waiting for a request past it, the connection is closed

            def handle(self) -> None:
                try:
                    super().handle()
                finally:  # the client ended it when its next request line came empty (its end of the stream)
                    by = "client" if getattr(self, "raw_requestline", None) == b"" else "provider"
                    with provider.lock:
                        provider.connections_ended.append((self.client_address[1], by))

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                if self.path == "/_mock/requests":
                    with provider.lock:
                        self._json(200, provider.requests)
                elif any(part in self.path for part in ("/responses/", "/conversations/", "/chat/completions/", "/files/",
                                                         "/batches/", "/async/sonar/", "/operations/", ":download",
                                                         "/cachedContents/")):
                    provider.handle(self)
                else:
                    self._json(404, {"error": {"type": "not_found", "message": "no such path"}})

            def do_DELETE(self) -> None:
                provider.handle(self)

            def do_PATCH(self) -> None:
                provider.handle(self)

            def do_POST(self) -> None:
                provider.handle(self)

            def read_body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return data
                        data += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _json(self, status: int, payload: Any, extra: dict[str, str] | None = None,
                      content_type: str = "application/json") -> None:
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                # as providers do: a JSON reply compressed when the client accepts gzip (or always: scenario gzip)
                accepted = [c.split(";")[0].strip().lower() for c in self.headers.get("accept-encoding", "").split(",")]
                compressed = "gzip" in accepted or self.headers.get("x-mock-scenario") == "gzip"
                if compressed:
                    data = gzip.compress(data)
                self.send_response(status)
                self.send_header("content-type", content_type)
                if compressed:
                    self.send_header("content-encoding", "gzip")
                self.send_header("content-length", str(len(data)))
                for k, v in ACCOUNT_HEADERS.items():  # what a provider says of the account a request came on
                    self.send_header(k, v)
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = _Server((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "MockProvider":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def received(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.requests)

    def handle(self, h: Any) -> None:
        raw = h.read_body()
        if GEMINI_UPLOAD_PATH.search(h.path.split("?")[0]):  # its bytes are no JSON
            return self._gemini_upload(h, raw)
        audio = b""
        boundary = MultipartForm.boundary_of(h.headers.get("content-type", ""))
        try:
            if boundary is not None:  # speech to text: the fields, and the audio apart
                form = MultipartForm.parse(raw, boundary)
                body = {p.name: p.content.decode("utf-8", "replace") for p in form.parts if p.filename is None}
                sent = form.file("file") or form.file("data")  # an audio file, a file uploaded; an upload's part
                audio = sent.content if sent else b""
                body["file_name"] = (sent.filename or "") if sent else ""
                body["file_bytes"] = len(audio)
                body["images_in"] = sum(1 for p in form.parts if p.filename is not None and p.name in ("image", "image[]"))
                if "n" in body and body["n"].isdigit():
                    body["n"] = int(body["n"])
            else:
                body = json.loads(raw or b"{}")
        except (ValueError, MultipartError):
            return h._json(400, {"error": {"type": "invalid_request_error", "message": "body is not JSON"}})
        scenario = h.headers.get("x-mock-scenario", "ok")
        auth = next((h.headers[k] for k in CREDENTIAL_HEADERS if h.headers.get(k)), "")
        with self.lock:
            self.requests.append({"path": h.path, "body": body, "authorization": auth, "scenario": scenario,
                                  "client_port": h.client_address[1],
                                  "credentials": {k: h.headers[k] for k in CREDENTIAL_HEADERS if h.headers.get(k)},
                                  "policyd_headers": sorted(k.lower() for k in h.headers if k.lower().startswith("x-policyd-")),
                                  "header_names": sorted({k.lower() for k in h.headers}),
                                  "content_length": h.headers.get("content-length"), "bytes": len(raw),
                                  "accept_encoding": h.headers.get("accept-encoding", ""),
                                  "content_encoding": h.headers.get("content-encoding", ""),
                                  "openai_account": {k: h.headers[k] for k in ("openai-organization", "openai-project")
                                                     if h.headers.get(k)}})
        if self.api_keys and auth.removeprefix("Bearer ") not in self.api_keys:
            return h._json(401, {"error": {"type": "invalid_request_error", "code": "invalid_api_key",
                                           "message": "the mock provider did not get its own key"}})
        if scenario == "rate_limited":
            return h._json(429, {"error": {"type": "rate_limit_error", "message": "slow down"}}, {"retry-after": "7"})
        if scenario == "unauthorized":  # OpenAI's answer to a wrong key: the key's ends in the message
            return h._json(401, {"error": {"type": "invalid_request_error", "code": "invalid_api_key", "param": None,
                                           "message": "Incorrect API key provided: sk-proj-Ab12************wxYZ. "
                                                      "You can find your API key at the provider's site."}})
        if scenario == "forbidden":  # a project without access to the model
            return h._json(403, {"error": {"type": "invalid_request_error", "code": "model_not_found", "param": None,
                                           "message": "Project proj_Operator123 does not have access to model x"}})
        if scenario == "server_error":
            return h._json(500, {"error": {"type": "server_error", "message": "boom"}})
        if scenario == "unavailable":  # overloaded for a moment: its account cools down for a second only
            return h._json(503, {"error": {"type": "server_error", "message": "try again"}}, {"retry-after": "1"})
        if scenario == "marked":  # a 500 carrying the gateway's own marks (as another gateway before it may send)
            return h._json(500, {"error": {"type": "server_error", "message": "boom"}},
                           {"x-policyd-gateway-timeout": "yes", "x-policyd-connection-ended": "yes",
                            "retry-after": "1"})  # its account cools a second only
        if scenario == "hang_up":  # the connection closes, no reply: as a provider closing a kept-alive one
            h.close_connection = True
            return None
        if scenario == "stall":
            time.sleep(30)
        route = h.path.split("?")[0].rstrip("/")
        if AZURE_DATED_PATH.match(route) and "api-version=" not in h.path.partition("?")[2]:
            return h._json(404, {"error": {"code": "404", "message": "Resource not found"}})  # Azure's answer
        gemini_file = GEMINI_FILE_PATH.search(route)
        if gemini_file:
            with self.lock:
                found = self.gemini_files.get(gemini_file.group("id"))
                if found is not None and h.command == "DELETE":
                    del self.gemini_files[gemini_file.group("id")]
            if found is None:
                return h._json(403, {"error": {"code": 403, "status": "PERMISSION_DENIED", "message":
                                               "You do not have permission to access the File or it may not exist."}})
            return h._json(200, {} if h.command == "DELETE" else found)
        cached = CACHED_CONTENTS_PATH.search(route)
        if cached:
            return self._cached_content(h, body, cached.group("id"), cached.group("at") or "")
        job = ASYNC_CHAT_PATH.search(route)
        if job:
            return self._async_chat(h, body, job.group("id"))
        veo = VEO_PATH.search(route)
        if veo:
            location = VERTEX_LOCATION.search(route)
            vertex = location.group(0) if location else ""
            if veo.group("verb") == ":fetchPredictOperation":  # Vertex AI's read of an operation: its name in the body
                return self._veo(h, body, veo.group("model"), str(body.get("operationName", "")).rsplit("/", 1)[-1],
                                 scenario, vertex)
            return self._veo(h, body, veo.group("model"), veo.group("op"), scenario, vertex)
        veo_file = VEO_FILE_PATH.search(route)
        if veo_file:
            known = any(veo_file.group("id") in json.dumps(op[0]) for op in self.operations.values())
            if not known:
                return h._json(404, {"error": {"code": 404, "message": "File not found.", "status": "NOT_FOUND"}})
            return h._json(200, VIDEO_BYTES, content_type="video/mp4")
        stored = STORED_RESPONSE_PATH.search(route)
        if stored:
            return self._stored_response(h, stored.group("id"), stored.group("rest") or "", h.command)
        conversation = CONVERSATION_PATH.search(route)
        if conversation:
            return self._conversation(h, body, conversation)
        gemini_batch = GEMINI_BATCH_PATH.search(route)
        gemini_batch_made = GEMINI_BATCH_MADE_PATH.search(route)
        if gemini_batch or gemini_batch_made:
            return self._gemini_batch(h, body, gemini_batch.group("id") if gemini_batch else None,
                                      bool(gemini_batch and gemini_batch.group("cancel")),
                                      gemini_batch_made.group("model") if gemini_batch_made else "")
        message_batch = MESSAGE_BATCH_PATH.search(route)
        if message_batch:
            return self._message_batch(h, body, message_batch.group("id"), message_batch.group("rest") or "")
        batch = BATCH_PATH.search(route)
        if batch:
            return self._batch(h, body, batch.group("id"), bool(batch.group("cancel")))
        upload = UPLOAD_PATH.search(route)
        if upload:
            return self._upload(h, body, audio, upload.group("id"), upload.group("verb"))
        uploaded = FILE_PATH.search(route)
        if uploaded:
            return self._file(h, body, audio, uploaded.group("id"), bool(uploaded.group("content")))
        stored_chat = STORED_CHAT_PATH.search(route)
        if stored_chat:
            return self._stored_chat(h, body, stored_chat.group("id"), stored_chat.group("rest") or "")
        deployment = route.split("/openai/deployments/", 1)[1].split("/", 1)[0] if "/openai/deployments/" in route else ""
        vertex_anthropic = VERTEX_ANTHROPIC_PATH.search(route)  # Vertex AI's Claude: the model in the path
        bedrock = BEDROCK_PATH.search(route)  # Amazon Bedrock: the model in the path (URL-encoded)
        model = deployment or (vertex_anthropic.group("model") if vertex_anthropic else
                               urllib.parse.unquote(bedrock.group("model")) if bedrock else body.get("model", ""))
        model = h.headers.get("x-mock-reply-model") or model  # a provider that served another model than sent
        listed = [m for m in body.get("models") or [] if isinstance(m, str) and m]
        model = model or (listed[0] if listed else "")  # a router's list: its first is the model when none is named
        routed = [m for m in listed if m != model]
        if not route.endswith("/messages"):  # a gateway's of LiteLLM's kind (Anthropic's fallbacks are its own)
            routed += [f if isinstance(f, str) else f.get("model") for f in body.get("fallbacks") or []
                       if isinstance(f, str) or isinstance(f, dict)]
        if routed and "fall through" in json.dumps(body.get("messages", body.get("input"))):
            model = routed[0]  # a router's: the model asked for failed, its first fallback served (and is billed)
        p_tokens = prompt_tokens(body)
        c_tokens = min(output_cap(body), COMPLETION_TOKENS_MAX)
        text = "".join(WORDS[:c_tokens])
        if bedrock and bedrock.group("verb") == "count-tokens":
            return h._json(200, {"inputTokens": p_tokens})
        if bedrock and bedrock.group("verb").startswith("converse"):
            return self._converse(h, body, p_tokens, c_tokens, text, bedrock.group("verb") == "converse-stream", scenario)
        if bedrock and bedrock.group("verb") == "invoke-with-response-stream":
            return self._stream(h, body, model, p_tokens, c_tokens, scenario, anthropic=True, bedrock=True)
        if route.endswith(("/audio/transcriptions", "/audio/translations")):
            return self._speech_to_text(h, body, model, audio, text)
        if route.endswith("/audio/speech"):
            return self._speech(h, body)
        if route.endswith("/v2/chat"):
            return self._cohere_chat(h, body, p_tokens, c_tokens, scenario)
        if route.endswith(("/v1/embed", "/v2/embed")):  # Cohere's: its usage in meta.billed_units
            texts = body.get("texts") if isinstance(body.get("texts"), list) else []
            billed = sum(-(-len(str(t).encode()) // 4) for t in texts)
            return h._json(200, {"id": "embed-mock", "embeddings": {"float": [[0.1, 0.2] for _ in texts]},
                                 "texts": texts, "meta": {"billed_units": {"input_tokens": billed}}})
        if route.endswith(("/v1/rerank", "/v2/rerank")):
            return self._rerank(h, body, model, cohere=route.endswith("/v2/rerank") or model.startswith("rerank-"),
                                usage=scenario != "no_usage")
        if route.endswith("/v1/moderations"):  # free
            return h._json(200, {"id": "modr-mock", "model": model or "omni-moderation-latest",
                                 "results": [{"flagged": False, "categories": {}, "category_scores": {}}]})
        if route.endswith(("/v1/messages/count_tokens", "/models/count-tokens:rawPredict")):  # token counts: what
            # each provider answers (Anthropic's, and Claude's on Vertex AI)
            return h._json(200, {"input_tokens": p_tokens})
        if route.endswith("/v1/responses/input_tokens"):
            return h._json(200, {"object": "response.input_tokens", "input_tokens": p_tokens})
        if route.endswith(":countTokens"):
            return h._json(200, {"totalTokens": p_tokens})
        if route.endswith(":predict"):  # Imagen's: sampleCount images (4 unless told); scenario filtered: one withheld
            count = (body.get("parameters") or {}).get("sampleCount") or 4
            images: list[dict[str, Any]] = [{"mimeType": "image/png", "bytesBase64Encoded": "iVBORw0KGgo="}] * count
            if scenario == "filtered":
                images = [*images[1:], {"raiFilteredReason": "withheld by the mock's safety filter"}]
            return h._json(200, {"predictions": images})
        if route.endswith(":embedContent"):  # Gemini's embeddings: no usage in the reply; Vertex AI's report it
            counted = -(-len(json.dumps(body.get("content") or "").encode()) // 5)  # not policyd's estimate
            vertex_usage = {"usageMetadata": {"promptTokenCount": counted, "totalTokenCount": counted}} \
                if "/publishers/google/" in route else {}
            return h._json(200, {"embedding": {"values": [0.1, 0.2]}, **vertex_usage})
        if route.endswith(":batchEmbedContents"):
            return h._json(200, {"embeddings": [{"values": [0.1, 0.2]} for _ in body.get("requests") or [{}]]})
        gemini = GEMINI_PATH.search(route)
        if gemini and body.get("cachedContent"):  # an explicit cache's tokens are the prompt's first
            cache = self.caches.get(str(body["cachedContent"]).rsplit("/", 1)[-1])
            if cache is None:
                return h._json(403, {"error": {"code": 403, "status": "PERMISSION_DENIED", "message": CACHE_NOT_FOUND}})
            return self._gemini(h, gemini.group("model"), p_tokens, c_tokens, text, gemini.group("verb"),
                                sse="alt=sse" in h.path, cached=cache["usageMetadata"]["totalTokenCount"])
        if gemini:
            grounded = any(isinstance(t, dict) and ("googleSearch" in t or "google_search" in t)
                           for t in body.get("tools") or [])
            return self._gemini(h, gemini.group("model"), p_tokens, c_tokens, text, gemini.group("verb"),
                                sse="alt=sse" in h.path, searches=2 if grounded else 0,
                                maps=any(isinstance(t, dict) and ("googleMaps" in t or "google_maps" in t)
                                         for t in body.get("tools") or []))
        anthropic = route.endswith("/v1/messages") or vertex_anthropic is not None or bedrock is not None
        # text completions (Mistral's fill-in-the-middle answers as a chat completion does)
        legacy = route.endswith("/completions") and not route.endswith(("/chat/completions", "/fim/completions"))
        if route.endswith(("/images/generations", "/images/edits", "/images/variations")):
            # per image; gpt-image models report tokens too (an edit's input images: 323 tokens each)
            n = body.get("n") if isinstance(body.get("n"), int) and body["n"] > 0 else 1
            reply: dict[str, Any] = {"created": 0, "data": [{"b64_json": "iVBORw0KGgo="}] * n}
            if str(model or "dall-e-2").startswith("gpt-image"):
                per_image = IMAGE_TOKENS.get(body.get("quality"), IMAGE_TOKENS["medium"])
                seen = 323 * body.get("images_in", 0)
                reply["usage"] = {"input_tokens": p_tokens + seen, "output_tokens": per_image * n,
                                  "total_tokens": p_tokens + seen + per_image * n,
                                  "input_tokens_details": {"text_tokens": p_tokens, "image_tokens": seen}}
            return h._json(200, reply)
        if route.endswith("/embeddings"):  # a vector of `dimensions` (default 2) for each input
            inputs = body.get("input") if isinstance(body.get("input"), list) and body["input"] else [""]
            size = body["dimensions"] if isinstance(body.get("dimensions"), int) and 0 < body["dimensions"] <= 4096 else 2
            vector = [round(0.0123456789 * (i % 80), 10) for i in range(size)]
            # Voyage's usage gives its total_tokens alone
            used = {"total_tokens": p_tokens} if str(model).startswith("voyage") else \
                {"prompt_tokens": p_tokens, "total_tokens": p_tokens}
            return h._json(200, {"object": "list", "model": model,
                                 "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(len(inputs))],
                                 "usage": used})
        # Mistral's API refuses fields it does not know (422), stream_options and max_completion_tokens among them
        extra = [name for name in ("stream_options", "max_completion_tokens") if name in body] if mistral(model) else []
        if extra:
            return h._json(422, {"object": "error", "message": {"detail": [
                {"type": "extra_forbidden", "loc": ["body", extra[0]], "msg": "Extra inputs are not permitted"}]},
                "type": "invalid_request_error", "param": None, "code": None})
        searches = sum(1 for tool in body.get("tools") or [] if str(tool.get("type", "")).startswith("web_search"))
        if body.get("stream") and not route.endswith("/responses"):
            return self._stream(h, body, model, p_tokens, c_tokens, scenario, anthropic, legacy)
        if anthropic:
            model, stop, c_tokens, iterations = anthropic_turn(body, model, p_tokens, c_tokens)
            text = "".join(WORDS[:c_tokens])
            usage = {"input_tokens": p_tokens, "output_tokens": c_tokens,
                     **({"iterations": iterations} if iterations else {})}
            if "\"ttl\": \"1h\"" in json.dumps(body.get("system")):  # half the prompt written to an hour's cache
                written = p_tokens // 2
                usage.update(input_tokens=p_tokens - written, cache_creation_input_tokens=written,
                             cache_creation={"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": written})
            if searches:  # one search a search tool, as Anthropic reports its server-side tools
                usage["server_tool_use"] = {"web_search_requests": searches}
            usage.update(anthropic_speed_and_geo(body))
            return h._json(200, {"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                                 "content": [{"type": "text", "text": text}] if text else [], "stop_reason": stop,
                                 **({} if scenario == "no_usage" else {"usage": usage})},
                           bedrock_tier(h.headers) if bedrock else None)
        if route.endswith("/responses/compact"):  # the conversation compacted into one encrypted item
            return h._json(200, {"id": f"resp_mock{next(self.response_ids)}", "object": "response.compaction",
                                 "created_at": 0, "output": [{"type": "compaction", "id": "cmp_mock",
                                                              "encrypted_content": "gAAAAB" + "x" * 40}],
                                 "usage": {"input_tokens": p_tokens, "output_tokens": 7, "total_tokens": p_tokens + 7,
                                           "input_tokens_details": {"cached_tokens": 0},
                                           "output_tokens_details": {"reasoning_tokens": 0}}})
        if route.endswith("/responses"):
            reply = self._response(body, model, p_tokens, c_tokens, text, searches, scenario)
            if body.get("store") is not False:
                with self.lock:
                    self.stored[reply["id"]] = (reply, body.get("input"))
                    if body.get("background") is True:
                        self.background[reply["id"]] = int(h.headers.get("x-mock-background-polls", "2"))
            named = body.get("conversation")
            named = named.get("id") if isinstance(named, dict) else named
            if named is not None:  # the exchange is added to the conversation
                with self.lock:
                    if named not in self.conversations:
                        return h._json(404, {"error": {"type": "invalid_request_error", "code": None, "param": None,
                                                       "message": f"Conversation with id '{named}' not found."}})
                    self.conversations[named]["items"] += [
                        self._item({"type": "message", "role": "user", "content": str(body.get("input"))}),
                        self._item({"type": "message", "role": "assistant", "content": text})]
            if body.get("stream"):
                return self._responses_stream(h, reply, WORDS[:c_tokens], scenario)
            if body.get("background") is True:
                return h._json(200, self._unfinished(reply, "queued"))
            return h._json(200, reply)
        usage = {"prompt_tokens": p_tokens, "completion_tokens": c_tokens, "total_tokens": p_tokens + c_tokens}
        usage = router_cost(model, usage, bool(h.headers.get("x-mock-byok")), body)
        if perplexity(model):
            usage = perplexity_usage(body, model, p_tokens, c_tokens)
        if "audio" in (body.get("modalities") or []):  # gpt-4o-audio: half the prompt heard, all but one token spoken
            usage["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": p_tokens // 2}
            usage["completion_tokens_details"] = {"audio_tokens": max(c_tokens - 1, 0)}
        if legacy:
            return h._json(200, {"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": model,
                                 "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                                 **({} if scenario == "no_usage" else {"usage": usage})})
        tier = {"auto": "default", None: "default"}.get(body.get("service_tier"), body.get("service_tier"))
        reply = {"id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model, "service_tier": tier,
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                 **({} if scenario == "no_usage" else {"usage": usage})}
        if body.get("store") is True:  # kept: read, changed, deleted and its messages listed by its id
            with self.lock:
                reply["id"] = f"chatcmpl-mock{next(self.response_ids)}"
                self.stored[reply["id"]] = (reply, body.get("messages"))
        return h._json(200, reply)

    def _response(self, body: dict[str, Any], model: str, p_tokens: int, c_tokens: int, text: str, searches: int,
                  scenario: str) -> dict[str, Any]:
        """A Responses API reply: a call a search tool, code run in a container for a code_interpreter tool
        (a new one for an "auto" container), one image for an image_generation tool (billed apart at the image
        model's prices: tool_usage.image_gen), then the message."""
        usage = {"input_tokens": p_tokens, "output_tokens": c_tokens, "total_tokens": p_tokens + c_tokens}
        tools = body.get("tools") or []
        calls = [{"type": "web_search_call" if str(tool.get("type", "")).startswith("web_search") else
                  "file_search_call", "id": f"call_mock{i}", "status": "completed"}
                 for i, tool in enumerate(tools)
                 if str(tool.get("type", "")).startswith(("web_search", "file_search"))]  # one call a search tool
        reply = {"id": f"resp_mock{next(self.response_ids)}", "object": "response", "created_at": 0, "model": model,
                 "status": "completed", "output": [*calls, {"type": "message", "id": "msg_mock", "status": "completed",
                                                            "role": "assistant", "content": [
                                                                {"type": "output_text", "text": text, "annotations": []}]}],
                 **({} if scenario == "no_usage" else {"usage": usage})}
        for tool in tools:
            if tool.get("type") == "code_interpreter":
                made = tool.get("container") if isinstance(tool.get("container"), str) else \
                    f"cntr_mock{next(self.response_ids)}"
                reply["output"].insert(0, {"type": "code_interpreter_call", "id": "ci_mock", "status": "completed",
                                           "code": "print(6 * 7)", "container_id": made, "outputs": None})
        painter = next((t for t in tools if t.get("type") == "image_generation"), None)
        if painter is not None:
            quality = painter.get("quality") if painter.get("quality") in IMAGE_TOKENS else "medium"
            partials = painter.get("partial_images", 0) if body.get("stream") else 0
            reply["output"].insert(0, {"type": "image_generation_call", "id": "ig_mock", "status": "completed",
                                       "result": "iVBORw0KGgo=", "quality": quality, "size": "1024x1024",
                                       "revised_prompt": text, "partial_images": partials})
            made = IMAGE_TOKENS[quality] + 100 * partials  # each partial image: 100 more image tokens
            reply["tool_usage"] = {"web_search": {"num_requests": searches}, "image_gen": {
                "input_tokens": 40, "input_tokens_details": {"image_tokens": 0, "text_tokens": 40},
                "output_tokens": made, "total_tokens": 40 + made}}
        return reply

    @staticmethod
    def _unfinished(reply: dict[str, Any], status: str) -> dict[str, Any]:
        """A background response not ended yet: no output, no usage."""
        return {**{k: v for k, v in reply.items() if k != "tool_usage"}, "status": status, "output": [], "usage": None,
                "background": True}

    def _responses_stream(self, h: Any, reply: dict[str, Any], words: list[str], scenario: str) -> None:
        """A Responses API stream, as OpenAI sends it: response.created, each output item added and done (the
        image's partial images and its completed event; the message's content part added, its text deltas,
        the text and the part done), then response.completed with the usage. `cut` drops the connection
        half-way through the text, `slow` waits 200 ms a delta."""
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()
        sequence = itertools.count()

        def send(kind: str, **fields: Any) -> None:
            data = json.dumps({"type": kind, "sequence_number": next(sequence), **fields})
            chunk = f"event: {kind}\ndata: {data}\n\n".encode()
            h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            h.wfile.flush()

        started = {k: v for k, v in reply.items() if k not in ("usage", "tool_usage")}
        try:
            send("response.created", response={**started, "status": "in_progress", "output": []})
            for index, item in enumerate(reply["output"]):
                added = {k: v for k, v in item.items() if k not in ("result", "content")}
                if item["type"] == "message":  # its content parts are added one by one (the SDK's stream helper)
                    added["content"] = []
                send("response.output_item.added", output_index=index, item={**added, "status": "in_progress"})
                if item["type"] == "image_generation_call":
                    for partial in range(item.get("partial_images", 0)):
                        send("response.image_generation_call.partial_image", output_index=index, item_id=item["id"],
                             partial_image_index=partial, partial_image_b64="iVBORw0KGgo=")
                    send("response.image_generation_call.completed", output_index=index, item_id=item["id"])
                if item["type"] == "message":
                    part = item["content"][0]
                    send("response.content_part.added", output_index=index, item_id=item["id"], content_index=0,
                         part={**part, "text": ""})
                    for i, word in enumerate(words):
                        if scenario == "cut" and i == len(words) // 2:
                            h.close_connection = True  # the connection drops: no response.completed
                            return
                        send("response.output_text.delta", output_index=index, item_id=item["id"], content_index=0,
                             delta=word, logprobs=[])
                        time.sleep(EVENT_GAP_SECONDS.get(scenario, 0.002))
                    send("response.output_text.done", output_index=index, item_id=item["id"], content_index=0,
                         text=part["text"], logprobs=[])
                    send("response.content_part.done", output_index=index, item_id=item["id"], content_index=0,
                         part=part)
                send("response.output_item.done", output_index=index, item=item)
            send("response.completed", response=reply)
            h.wfile.write(b"0\r\n\r\n")
        except OSError:
            return  # the client (Envoy) hung up

    def _item(self, item: dict[str, Any]) -> dict[str, Any]:
        text = item.get("content")
        content = text if isinstance(text, list) else [{"type": "input_text" if item.get("role") == "user"
                                                         else "output_text", "text": str(text)}]
        return {"type": "message", "id": f"msg_mock{next(self.response_ids)}", "status": "completed",
                "role": item.get("role", "user"), "content": content}

    def _conversation(self, h: Any, body: dict[str, Any], found: Any) -> None:
        """The Conversations API: made, read, changed, deleted; its items listed, added, read, deleted."""
        method, conversation_id, item_id = h.command, found.group("id"), found.group("item")
        with self.lock:
            if conversation_id is None:  # POST /v1/conversations
                conversation_id = f"conv_mock{next(self.response_ids)}"
                self.conversations[conversation_id] = {"metadata": body.get("metadata") or {},
                                                       "items": [self._item(i) for i in body.get("items") or []]}
                return h._json(200, {"id": conversation_id, "object": "conversation", "created_at": 0,
                                     "metadata": self.conversations[conversation_id]["metadata"]})
            held = self.conversations.get(conversation_id)
            if held is None:
                return h._json(404, {"error": {"type": "invalid_request_error", "code": None, "param": None,
                                               "message": f"Conversation with id '{conversation_id}' not found."}})
            summary = {"id": conversation_id, "object": "conversation", "created_at": 0, "metadata": held["metadata"]}
            if found.group("items") is None:
                if method == "DELETE":
                    del self.conversations[conversation_id]
                    return h._json(200, {"id": conversation_id, "object": "conversation.deleted", "deleted": True})
                if method == "POST":
                    held["metadata"] = body.get("metadata") or {}
                    summary["metadata"] = held["metadata"]
                return h._json(200, summary)
            if item_id is not None:
                item = next((i for i in held["items"] if i["id"] == item_id), None)
                if item is None:
                    return h._json(404, {"error": {"type": "invalid_request_error", "message": "no such item"}})
                if method == "DELETE":
                    held["items"].remove(item)
                    return h._json(200, summary)
                return h._json(200, item)
            added = [self._item(i) for i in body.get("items") or []] if method == "POST" else []
            held["items"] += added
            listed = added if method == "POST" else held["items"]
            return h._json(200, {"object": "list", "data": listed, "has_more": False,
                                 "first_id": listed[0]["id"] if listed else None,
                                 "last_id": listed[-1]["id"] if listed else None})

    def _file(self, h: Any, form: dict[str, Any], content: bytes, file_id: str | None, download: bool) -> None:
        """The Files API: uploaded (a form with its purpose and file), read, its content downloaded (a file named
        slow... after SLOW_FILE_SECONDS), deleted."""
        anthropic = bool(h.headers.get("anthropic-version"))  # Anthropic's Files API: its ids and shape
        with self.lock:
            if file_id is None:
                file_id = f"file_mock{next(self.response_ids)}" if anthropic else f"file-mock{next(self.response_ids)}"
                self.files[file_id] = ({"id": file_id, "type": "file", "size_bytes": len(content),
                                        "filename": form.get("file_name") or "upload", "downloadable": False}
                                       if anthropic else
                                       {"id": file_id, "object": "file", "bytes": len(content), "created_at": 0,
                                        "filename": form.get("file_name") or "upload",
                                        "purpose": form.get("purpose", "user_data")}, content)
                return h._json(200, self.files[file_id][0])
            found = self.files.get(file_id)
            if found is not None and h.command == "DELETE":
                del self.files[file_id]
        if found is None:
            return h._json(404, {"error": {"type": "invalid_request_error", "code": None, "param": None,
                                           "message": f"No such File object: {file_id}"}})
        if h.command == "DELETE":
            return h._json(200, {"id": file_id, "object": "file", "deleted": True})
        if download:
            if found[0]["filename"].startswith("slow"):  # a large file, as slow to read as one
                time.sleep(SLOW_FILE_SECONDS)
            return h._json(200, found[1], content_type="application/octet-stream")
        return h._json(200, found[0])

    def _upload(self, h: Any, body: dict[str, Any], data: bytes, upload_id: str | None, verb: str | None) -> None:
        """The Uploads API: an upload made, its parts added (a form's `data`), completed into a file of its
        parts in the order given, or cancelled."""
        with self.lock:
            if upload_id is None:
                upload_id = f"upload_mock{next(self.response_ids)}"
                self.uploads[upload_id] = ({"id": upload_id, "object": "upload", "bytes": body.get("bytes", 0),
                                            "created_at": 0, "expires_at": 3600, "filename": body.get("filename", ""),
                                            "purpose": body.get("purpose", ""), "status": "pending", "file": None}, {})
                return h._json(200, self.uploads[upload_id][0])
            found = self.uploads.get(upload_id)
            if found is None or found[0]["status"] != "pending":
                return h._json(404, {"error": {"type": "invalid_request_error", "code": None, "param": None,
                                               "message": f"No pending upload {upload_id}"}})
            upload, parts = found
            if verb == "parts":
                part_id = f"part_mock{next(self.response_ids)}"
                parts[part_id] = data
                return h._json(200, {"id": part_id, "object": "upload.part", "created_at": 0, "upload_id": upload_id})
            if verb == "cancel":
                upload["status"] = "cancelled"
                return h._json(200, upload)
            content = b"".join(parts[part] for part in body.get("part_ids", []) if part in parts)
            file_id = f"file-mock{next(self.response_ids)}"
            self.files[file_id] = ({"id": file_id, "object": "file", "bytes": len(content), "created_at": 0,
                                    "filename": upload["filename"], "purpose": upload["purpose"]}, content)
            upload.update(status="completed", file=self.files[file_id][0])
            return h._json(200, upload)

    def _batch(self, h: Any, body: dict[str, Any], batch_id: str | None, cancel: bool) -> None:
        """The Batch API: a batch made of an uploaded file's requests (validating), read (in progress for
        `x-mock-batch-polls` reads, 2 by default, then completed with its requests' usage, as the mock bills
        each alone; `x-mock-batch-usage: none` at its making: ended with no usage reported, as older APIs), or
        cancelled (its first half of requests billed)."""
        with self.lock:
            if batch_id is None:
                found = self.files.get(str(body.get("input_file_id")))
                if found is None:
                    return h._json(404, {"error": {"type": "invalid_request_error", "code": None, "param": None,
                                                   "message": "No such File object"}})
                lines = [json.loads(line) for line in found[1].splitlines() if line.strip()]
                usages = [(prompt_tokens(line["body"]), 0 if line["url"].endswith("/embeddings") else
                           min(output_cap(line["body"]), COMPLETION_TOKENS_MAX)) for line in lines]
                batch_id = f"batch_mock{next(self.response_ids)}"
                batch = {"id": batch_id, "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
                         "input_file_id": body.get("input_file_id"), "completion_window": body.get("completion_window"),
                         "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": 0,
                         "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
                         "metadata": body.get("metadata"), "model": lines[0]["body"].get("model") if lines else None,
                         "usage": None}
                cancelled = usages[:len(usages) // 2]
                reported = h.headers.get("x-mock-batch-usage", "usage")
                if reported == "none":  # its usage in an output file alone, as each request's reply
                    output_id = f"file-mock{next(self.response_ids)}"
                    self.files[output_id] = ({"id": output_id, "object": "file", "bytes": 0, "created_at": 0,
                                              "filename": "batch_output.jsonl", "purpose": "batch_output"},
                                             b"".join(self._batch_output(line, use) for line, use in zip(lines, usages)))
                    self.batch_outputs[batch_id] = output_id
                self.batches[batch_id] = (batch, None if reported in ("none", "nothing") else {
                    "all": self._batch_usage(usages), "cancelled": self._batch_usage(cancelled),
                    "counts": (len(usages), len(cancelled))}, int(h.headers.get("x-mock-batch-polls", "2")))
                return h._json(200, batch)
            held = self.batches.get(batch_id)
            if held is None:
                return h._json(404, {"error": {"type": "invalid_request_error", "code": None, "param": None,
                                               "message": f"No batch found with id '{batch_id}'."}})
            batch, usage, reads = held
            if batch["status"] in ("validating", "in_progress") and (cancel or reads <= 0):
                ended = "cancelled" if cancel else "completed"
                done = (usage or {}).get("counts", (0, 0))[1 if cancel else 0]
                done = done if usage else batch["request_counts"]["total"]
                batch = {**batch, "status": ended, "request_counts": {
                    "total": batch["request_counts"]["total"], "completed": done, "failed": 0},
                    "usage": (usage or {}).get("cancelled" if cancel else "all"),
                    "output_file_id": self.batch_outputs.get(batch_id)}
            elif batch["status"] in ("validating", "in_progress"):
                batch = {**batch, "status": "in_progress"}
            self.batches[batch_id] = (batch, usage, reads - 1)
            return h._json(200, batch)

    def _gemini_batch(self, h: Any, body: dict[str, Any], batch_id: str | None, cancel: bool, model: str) -> None:
        """Gemini's batch mode: a batch of the requests inline in its body (pending, then running for
        `x-mock-batch-polls` reads, 2 by default, then succeeded with each request's reply and its usage, as the
        mock bills it alone), read, cancelled (its first half's replies), deleted."""
        with self.lock:
            if batch_id is None:
                config = ((body.get("batch") or {}).get("inputConfig") or {}).get("requests") or {}
                requests = [item["request"] for item in config.get("requests") or []]
                used = [(prompt_tokens(r), min(output_cap(r), COMPLETION_TOKENS_MAX)) for r in requests]
                batch_id = f"mock{next(self.response_ids)}"
                batch = {"name": f"batches/{batch_id}", "metadata": {
                    "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch",
                    "model": f"models/{model}", "displayName": (body.get("batch") or {}).get("displayName", ""),
                    "state": "BATCH_STATE_PENDING", "batchStats": {"requestCount": str(len(used))}}}
                self.batches[batch_id] = (batch, {"used": used}, int(h.headers.get("x-mock-batch-polls", "2")))
                return h._json(200, batch)
            held = self.batches.get(batch_id)
            if held is None:
                return h._json(404, {"error": {"code": 404, "message": "Batch not found.", "status": "NOT_FOUND"}})
            batch, kept, reads = held
            if h.command == "DELETE":
                del self.batches[batch_id]
                return h._json(200, {})
            state = batch["metadata"]["state"]
            if state in ("BATCH_STATE_PENDING", "BATCH_STATE_RUNNING") and (cancel or reads <= 0):
                ran = kept["used"][:len(kept["used"]) // 2] if cancel else kept["used"]
                replies = [{"response": {"candidates": [{"content": {"parts": [{"text": "".join(WORDS[:out])}],
                                                                     "role": "model"}, "finishReason": "STOP"}],
                                         "usageMetadata": {"promptTokenCount": used_in, "candidatesTokenCount": out,
                                                           "totalTokenCount": used_in + out}}}
                           for used_in, out in ran]
                batch = {**batch, "done": True, "metadata": {
                    **batch["metadata"], "state": "BATCH_STATE_CANCELLED" if cancel else "BATCH_STATE_SUCCEEDED",
                    "output": {"inlinedResponses": {"inlinedResponses": replies}}}}
            elif state == "BATCH_STATE_PENDING":
                batch = {**batch, "metadata": {**batch["metadata"], "state": "BATCH_STATE_RUNNING"}}
            self.batches[batch_id] = (batch, kept, reads - 1)
            return h._json(200, batch)

    def _message_batch(self, h: Any, body: dict[str, Any], batch_id: str | None, rest: str) -> None:
        """Anthropic's Message Batches API: a batch of the requests in its body (in progress for `x-mock-batch-polls`
        reads, 2 by default, then ended, every request succeeded), read, its results (each request's message,
        with its usage, as the mock bills it alone), cancelled (its first half succeeded), deleted."""
        with self.lock:
            if batch_id is None:
                requests = body.get("requests") or []
                results = [(r.get("custom_id"), r["params"].get("model"), prompt_tokens(r["params"]),
                            min(output_cap(r["params"]), COMPLETION_TOKENS_MAX)) for r in requests]
                batch_id = f"msgbatch_mock{next(self.response_ids)}"
                batch = {"id": batch_id, "type": "message_batch", "processing_status": "in_progress",
                         "request_counts": {"processing": len(results), "succeeded": 0, "errored": 0, "canceled": 0,
                                            "expired": 0},
                         "ended_at": None, "created_at": "2026-12-06T00:00:00Z", "expires_at": "2026-12-07T00:00:00Z",
                         "cancel_initiated_at": None, "results_url": None}
                self.batches[batch_id] = (batch, {"results": results}, int(h.headers.get("x-mock-batch-polls", "2")))
                return h._json(200, batch)
            held = self.batches.get(batch_id)
            if held is None:
                return h._json(404, {"type": "error", "error": {"type": "not_found_error",
                                                                "message": f"batch {batch_id} not found"}})
            batch, kept, reads = held
            results = kept["results"] if kept else []
            if h.command == "DELETE":
                del self.batches[batch_id]
                return h._json(200, {"id": batch_id, "type": "message_batch_deleted"})
            if batch["processing_status"] == "in_progress" and (rest == "/cancel" or (reads <= 0 and not rest)):
                done = len(results) // 2 if rest == "/cancel" else len(results)
                batch = {**batch, "processing_status": "ended", "ended_at": "2026-12-06T01:00:00Z",
                         "request_counts": {"processing": 0, "succeeded": done, "errored": 0,
                                            "canceled": len(results) - done, "expired": 0},
                         "results_url": f"https://api.example/v1/messages/batches/{batch_id}/results"}
                kept = {"results": results, "succeeded": done}
            self.batches[batch_id] = (batch, kept, reads - 1)
            if rest != "/results":
                return h._json(200, batch)
            if batch["processing_status"] != "ended":
                return h._json(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                                "message": "the batch has not ended"}})
            succeeded = (kept or {}).get("succeeded", 0)
            lines = []
            for n, (custom_id, model, used_in, used_out) in enumerate(results):
                message = {"id": f"msg_{custom_id}", "type": "message", "role": "assistant", "model": model,
                           "content": [{"type": "text", "text": "".join(WORDS[:used_out])}], "stop_reason": "end_turn",
                           "usage": {"input_tokens": used_in, "output_tokens": used_out}}
                lines.append({"custom_id": custom_id, "result": {"type": "succeeded", "message": message}
                              if n < succeeded else {"type": "canceled"}})
            return h._json(200, b"".join(json.dumps(line).encode() + b"\n" for line in lines),
                           content_type="application/binary")

    @staticmethod
    def _batch_output(line: dict[str, Any], used: tuple[int, int]) -> bytes:
        """A request's line of a batch's output file: its reply, with its usage as the endpoint reports it."""
        usage: dict[str, Any] = {"prompt_tokens": used[0], "completion_tokens": used[1],
                                 "total_tokens": sum(used)} if not line["url"].endswith("/responses") else \
            {"input_tokens": used[0], "output_tokens": used[1], "total_tokens": sum(used)}
        if line["url"].endswith("/embeddings"):
            usage = {"prompt_tokens": used[0], "total_tokens": used[0]}
        return json.dumps({"id": f"batch_req_{line['custom_id']}", "custom_id": line["custom_id"], "error": None,
                           "response": {"status_code": 200, "request_id": "req_mock",
                                        "body": {"object": "chat.completion", "model": line["body"].get("model"),
                                                 "usage": usage}}}).encode() + b"\n"

    @staticmethod
    def _batch_usage(usages: list[tuple[int, int]]) -> dict[str, Any]:
        inputs, outputs = sum(u[0] for u in usages), sum(u[1] for u in usages)
        return {"input_tokens": inputs, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": outputs,
                "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": inputs + outputs}

    def _stored_chat(self, h: Any, body: dict[str, Any], completion_id: str, rest: str) -> None:
        """Chat completions kept with store: true: read, their metadata changed, deleted, their messages listed."""
        with self.lock:
            found = self.stored.get(completion_id)
            if found is not None and h.command == "DELETE":
                del self.stored[completion_id]
            if found is not None and h.command == "POST":
                found[0]["metadata"] = body.get("metadata") or {}
        if found is None:
            return h._json(404, {"error": {"type": "invalid_request_error", "code": None, "param": None,
                                           "message": f"Completion with id '{completion_id}' not found."}})
        reply, messages = found
        if h.command == "DELETE":
            return h._json(200, {"object": "chat.completion.deleted", "id": completion_id, "deleted": True})
        if rest == "/messages":
            return h._json(200, {"object": "list", "has_more": False, "data": [
                {"id": f"{completion_id}-{i}", **m} for i, m in enumerate(messages or [])]})
        return h._json(200, reply)

    def _veo(self, h: Any, body: dict[str, Any], model: str, op: str | None, scenario: str, vertex: str = "") -> None:
        """Veo's video generation (Gemini's API): an operation made (POST models/M:predictLongRunning), not done
        for `x-mock-background-polls` reads of it (default 2), then done with parameters.sampleCount videos (1
        unless told), each downloaded from the File API; scenario filtered: one withheld by the safety filter,
        job_failed: done with an error. On Vertex AI (`vertex`: the project's location, publisher google) the
        operation's name starts with it, it is read by POST :fetchPredictOperation, and its videos are in Cloud
        Storage."""
        if op is None:
            parameters = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
            count = parameters.get("sampleCount") or 1
            name = f"{vertex}models/{model}/operations/op-mock-{next(self.response_ids)}"
            made = name.rsplit("/", 1)[1]
            samples = [{"video": {"uri": f"http://127.0.0.1:{self.port}/v1beta/files/vid-{made}-{i}:download?alt=media"}}
                       for i in range(count)]
            done: dict[str, Any] = {"name": name, "done": True, "response": {
                "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
                "generateVideoResponse": {"generatedSamples": samples}}}
            if scenario == "filtered":
                done["response"]["generateVideoResponse"] = {"generatedSamples": samples[1:],
                                                             "raiMediaFilteredCount": 1,
                                                             "raiMediaFilteredReasons": ["withheld by the mock"]}
            if vertex:  # Vertex AI's answer: the videos in Cloud Storage
                kept = len(done["response"]["generateVideoResponse"]["generatedSamples"])
                done["response"] = {"@type": "type.googleapis.com/cloud.ai.large_models.vision.GenerateVideoResponse",
                                    "raiMediaFilteredCount": count - kept,
                                    "videos": [{"gcsUri": f"gs://mock-bucket/{made}-{i}.mp4", "mimeType": "video/mp4"}
                                               for i in range(kept)]}
            if scenario == "job_failed":
                done = {"name": name, "done": True, "error": {"code": 13, "message": "the video could not be made"}}
            with self.lock:
                self.operations[name] = (done, int(h.headers.get("x-mock-background-polls", "2")))
            return h._json(200, {"name": name})
        name = f"{vertex}models/{model}/operations/{op}"
        with self.lock:
            found = self.operations.get(name)
            if found is not None:
                self.operations[name] = (found[0], max(found[1] - 1, 0))
        if found is None:
            return h._json(404, {"error": {"code": 404, "message": "Operation not found.", "status": "NOT_FOUND"}})
        return h._json(200, {"name": name} if found[1] else found[0])

    def _async_chat(self, h: Any, body: dict[str, Any], job_id: str | None) -> None:
        """Perplexity's async chat completions: a job made (POST, its chat completion under "request": CREATED),
        then asked for (GET): IN_PROGRESS for `x-mock-background-polls` reads (default 2), then COMPLETED with the
        chat completion and its usage; one made with scenario job_failed FAILED, with none."""
        if job_id is None:
            request = body.get("request") if isinstance(body.get("request"), dict) else None
            if request is None or not request.get("messages"):
                return h._json(422, {"detail": [{"type": "missing", "loc": ["body", "request"],
                                                  "msg": "Field required"}]})
            model = str(request.get("model"))
            job = {"id": f"job-mock-{next(self.response_ids)}", "model": model, "created_at": 1, "started_at": None,
                   "completed_at": None, "failed_at": None, "response": None, "error_message": None,
                   "status": "CREATED"}
            p_tokens, c_tokens = prompt_tokens(request), min(output_cap(request), COMPLETION_TOKENS_MAX)
            answer = {"id": f"chatcmpl-{job['id']}", "model": model, "created": 2, "object": "chat.completion",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS[:c_tokens])},
                                   "finish_reason": "stop"}],
                      "usage": perplexity_usage(request, model, p_tokens, c_tokens)}
            with self.lock:
                self.jobs[job["id"]] = (job, answer, int(h.headers.get("x-mock-background-polls", "2")),
                                        h.headers.get("x-mock-scenario") == "job_failed")
            return h._json(200, job)
        with self.lock:
            found = self.jobs.get(job_id)
            if found is not None:
                job, answer, running, fails = found
                self.jobs[job_id] = (job, answer, max(running - 1, 0), fails)
        if found is None:
            return h._json(404, {"detail": "Request not found"})
        if running:
            return h._json(200, {**job, "status": "IN_PROGRESS", "started_at": 2})
        if fails:
            return h._json(200, {**job, "status": "FAILED", "failed_at": 3, "error_message": "the research failed"})
        return h._json(200, {**job, "status": "COMPLETED", "started_at": 2, "completed_at": 3, "response": answer})

    def _stored_response(self, h: Any, response_id: str, rest: str, method: str) -> None:
        """The Responses API's stored responses: read, deleted, their input items, cancelled."""
        with self.lock:
            found = self.stored.get(response_id)
            if found is not None and method == "DELETE":
                del self.stored[response_id]
        if found is None:
            return h._json(404, {"error": {"type": "invalid_request_error", "code": None, "param": None,
                                           "message": f"Response with id '{response_id}' not found."}})
        reply, given = found
        with self.lock:
            running = self.background.get(response_id, 0)
            if running and rest == "/cancel":  # ended now: the input, and half the output made so far
                usage = reply.get("usage") or {}
                made = usage.get("output_tokens", 0) // 2
                reply = {**reply, "status": "cancelled", "usage": {
                    "input_tokens": usage.get("input_tokens", 0), "output_tokens": made,
                    "total_tokens": usage.get("input_tokens", 0) + made}}
                self.stored[response_id], self.background[response_id] = (reply, given), 0
                return h._json(200, reply)
            if running and method == "GET" and not rest:
                self.background[response_id] = running - 1
                return h._json(200, self._unfinished(reply, "in_progress"))
        if method == "DELETE":
            return h._json(200, {"id": response_id, "object": "response", "deleted": True})
        if rest == "/input_items":
            return h._json(200, {"object": "list", "data": [{"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": str(given)}]}], "has_more": False})
        return h._json(200, {**reply, "status": "cancelled"} if rest == "/cancel" else reply)

    def _speech_to_text(self, h: Any, form: dict[str, Any], model: str, audio: bytes, text: str) -> None:
        """whisper-1 reports the audio's seconds; gpt-4o(-mini)-transcribe its tokens (10 audio tokens a second,
        the prompt's text tokens; the transcript's out), and streams with stream=true. response_format text,
        srt and vtt answer the transcript alone, with no usage."""
        if not audio:
            return h._json(400, {"error": {"type": "invalid_request_error", "message": "no audio file"}})
        seconds = wav_seconds(audio) or -(-len(audio) // 16_000)
        words = WORDS[:min(3 * seconds, COMPLETION_TOKENS_MAX)]
        transcript = "".join(words).strip()
        response_format = form.get("response_format", "json")
        if response_format in ("text", "srt", "vtt"):
            return h._json(200, transcript.encode(), content_type="text/plain; charset=utf-8")
        if model.startswith("whisper"):
            usage: dict[str, Any] = {"type": "duration", "seconds": seconds}
            if response_format == "verbose_json":
                return h._json(200, {"task": "transcribe", "language": "english", "duration": seconds - 0.25,
                                     "text": transcript, "segments": [], "usage": usage})
            return h._json(200, {"text": transcript, "usage": usage})
        prompt = len(str(form.get("prompt", "")).split())
        usage = {"type": "tokens", "input_tokens": 10 * seconds + prompt, "output_tokens": len(words),
                 "total_tokens": 10 * seconds + prompt + len(words),
                 "input_token_details": {"text_tokens": prompt, "audio_tokens": 10 * seconds}}
        if form.get("stream") != "true":
            return h._json(200, {"text": transcript, "usage": usage})
        events = [{"type": "transcript.text.delta", "delta": word} for word in words]
        _send_events(h, [*events, {"type": "transcript.text.done", "text": transcript, "usage": usage}])

    @staticmethod
    def _cohere_chat(h: Any, body: dict[str, Any], p_tokens: int, c_tokens: int, scenario: str) -> None:
        """Cohere's chat (v2): its reply, or its stream's events (message-start, content-delta ..., message-end
        with the usage: what it bills, billed_units, and what it counted, tokens, which holds its own tokens
        too). Scenario cut: the stream stops mid-way, no message-end."""
        words = WORDS[:c_tokens]
        usage = {"billed_units": {"input_tokens": p_tokens, "output_tokens": c_tokens},
                 "tokens": {"input_tokens": p_tokens + 64, "output_tokens": c_tokens}}
        if not body.get("stream"):
            return h._json(200, {"id": "cohere-mock", "finish_reason": "COMPLETE", "message": {
                "role": "assistant", "content": [{"type": "text", "text": "".join(words)}]}, "usage": usage})
        events: list[dict[str, Any]] = [{"type": "message-start", "id": "cohere-mock"}]
        events += [{"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": w}}}}
                   for w in words]
        if scenario == "cut":
            events = events[:len(events) // 2]
        else:
            events.append({"type": "message-end", "delta": {"finish_reason": "COMPLETE", "usage": usage}})
        _send_events(h, events, named=True, gap_seconds=EVENT_GAP_SECONDS.get(scenario, 0.002),
                     cut=scenario == "cut")

    @staticmethod
    def _rerank(h: Any, body: dict[str, Any], model: str, cohere: bool, usage: bool) -> None:
        """A rerank: Cohere's reply (billed in search units: a query with up to 100 document chunks, a chunk
        RERANK_CONTEXT_TOKENS less the query's tokens, each document read up to max_tokens_per_doc, 4096 by
        default on v2), or Jina's and Voyage's (the tokens read: the query once a document, and the documents).
        A token is 4 bytes here."""
        documents = body.get("documents") if isinstance(body.get("documents"), list) else []
        texts = [d if isinstance(d, str) else json.dumps(d) for d in documents]
        query = -(-len(str(body.get("query", "")).encode()) // 4)
        tokens = [-(-len(t.encode()) // 4) for t in texts]
        ranked = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
        results = [{"index": i, "relevance_score": round(1 / (rank + 1), 6)} for rank, i in enumerate(ranked)]
        if isinstance(body.get("top_n"), int):
            results = results[:body["top_n"]]
        if not cohere:
            reply: dict[str, Any] = {"model": model, "results": results}
            if usage:
                reply["usage"] = {"total_tokens": query * len(texts) + sum(tokens)}
            return h._json(200, reply)
        cap = body.get("max_tokens_per_doc") if isinstance(body.get("max_tokens_per_doc"), int) else 4096
        chunk = max(RERANK_CONTEXT_TOKENS - query - 4, 1)
        chunks = sum(max(1, -(-min(t, cap) // chunk)) for t in tokens)
        reply = {"id": "rerank-mock", "results": results, "meta": {"api_version": {"version": "2"}}}
        if usage:
            reply["meta"]["billed_units"] = {"search_units": -(-chunks // 100)}
        return h._json(200, reply)

    def _speech(self, h: Any, body: dict[str, Any]) -> None:
        """Text to speech: "audio", a few bytes a character; with stream_format sse (gpt-4o-mini-tts), the
        audio in speech.audio.delta events, then speech.audio.done with its usage: the text's tokens in,
        two audio tokens a character out."""
        text = str(body.get("input", ""))
        audio = b"ID3" + bytes(AUDIO_BYTES_PER_CHARACTER * len(text))
        if body.get("stream_format") != "sse":
            return h._json(200, audio, content_type="audio/mpeg")
        text_tokens = -(-len((text + str(body.get("instructions", ""))).encode()) // 4)
        usage = {"input_tokens": text_tokens, "output_tokens": 2 * len(text), "total_tokens": text_tokens + 2 * len(text)}
        events = [{"type": "speech.audio.delta", "audio": base64.b64encode(audio[at:at + 64]).decode()}
                  for at in range(0, len(audio), 64)]
        _send_events(h, [*events, {"type": "speech.audio.done", "usage": usage}])

    def _gemini_upload(self, h: Any, raw: bytes) -> None:
        """Gemini's resumable upload: begun (its reply's x-goog-upload-url, this server's, names the upload), then
        its bytes in parts ("upload"), the last also "finalize": its reply, the file made. An upload the server did
        not begin is not found."""
        command = h.headers.get("x-goog-upload-command", "").replace(" ", "").split(",")
        upload_id = dict(urllib.parse.parse_qsl(h.path.partition("?")[2])).get("upload_id", "")
        with self.lock:
            self.requests.append({"path": h.path, "body": {"upload_command": command, "bytes": len(raw)},
                                  "authorization": next((h.headers[k] for k in CREDENTIAL_HEADERS if h.headers.get(k)),
                                                        ""), "scenario": "ok"})
        if "start" in command:
            made = f"upload-mock-{next(self.response_ids)}-" + "x" * 120  # Google's upload ids are long
            meta = json.loads(raw or b"{}").get("file") or {}
            with self.lock:
                self.uploads_begun[made] = ({"displayName": meta.get("displayName", meta.get("display_name", "")),
                                             "mimeType": h.headers.get("x-goog-upload-header-content-type", "")}, b"")
            return h._json(200, b"", {"x-goog-upload-url": f"http://127.0.0.1:{self.port}/upload/v1beta/files"
                                                           f"?upload_id={made}&upload_protocol=resumable",
                                      "x-goog-upload-status": "active"})
        with self.lock:
            begun = self.uploads_begun.get(upload_id)
            if begun is not None:
                begun = self.uploads_begun[upload_id] = (begun[0], begun[1] + raw)
        if begun is None:
            return h._json(404, {"error": {"code": 404, "status": "NOT_FOUND", "message": "upload not found"}})
        if "finalize" not in command:
            return h._json(200, b"", {"x-goog-upload-status": "active"})
        file_id = f"file-mock-{next(self.response_ids)}"
        made_file = {"name": f"files/{file_id}", **begun[0], "sizeBytes": str(len(begun[1])), "state": "ACTIVE",
                     "uri": f"http://127.0.0.1:{self.port}/v1beta/files/{file_id}"}
        with self.lock:
            self.gemini_files[file_id] = made_file
            del self.uploads_begun[upload_id]
        return h._json(200, {"file": made_file}, {"x-goog-upload-status": "final"})

    def _cached_content(self, h: Any, body: dict[str, Any], cache_id: str | None, location: str) -> None:
        """Gemini's explicit caches: POST makes one (its tokens counted as a prompt's: its contents and system
        instruction), GET reads one, PATCH changes its time to live (ttl from now, or expireTime), DELETE deletes
        it; the list is not offered here."""
        now = time.time()

        def stamp(at: float) -> str:
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at * 1000) % 1000:03d}Z"

        def expiry_seconds(given: dict[str, Any], default: float | None) -> float | None:
            if isinstance(given.get("ttl"), str):
                return now + float(given["ttl"].rstrip("s"))
            if isinstance(given.get("expireTime"), str):
                at = time.strptime(given["expireTime"][:19], "%Y-%m-%dT%H:%M:%S")
                return calendar.timegm(at)
            return default

        if cache_id is None and h.command == "POST":
            model = str(body.get("model", ""))
            tokens = -(-len(json.dumps([body.get("contents"), body.get("systemInstruction")],
                                       ensure_ascii=False).encode()) // 4)
            if tokens < GEMINI_CACHE_TOKENS_MIN:
                return h._json(400, {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message":
                                               f"Cached content is too small. total_token_count={tokens}, "
                                               f"min_total_token_count={GEMINI_CACHE_TOKENS_MIN}"}})
            made = f"cache-mock-{next(self.response_ids)}"
            cache = {"name": f"{location}cachedContents/{made}", "model": model,
                     "displayName": body.get("displayName", ""), "createTime": stamp(now), "updateTime": stamp(now),
                     "expireTime": stamp(expiry_seconds(body, now + 3600) or now),
                     "usageMetadata": {"totalTokenCount": tokens}}
            with self.lock:
                self.caches[made] = cache
            return h._json(200, cache)
        with self.lock:
            cache = self.caches.get(cache_id or "")
            if cache is not None and h.command == "PATCH":
                cache["expireTime"] = stamp(expiry_seconds(body, None) or now)
                cache["updateTime"] = stamp(now)
            if cache is not None and h.command == "DELETE":
                del self.caches[cache_id or ""]
                return h._json(200, {})
        if cache is None:
            return h._json(403 if cache_id else 404, {"error": {"code": 403, "status": "PERMISSION_DENIED",
                                                                "message": CACHE_NOT_FOUND}})
        return h._json(200, cache)

    def _gemini(self, h: Any, model: str, p_tokens: int, c_tokens: int, text: str, verb: str, sse: bool,
                searches: int = 0, maps: bool = False, cached: int = 0) -> None:
        """Gemini's generateContent, and its stream: SSE with alt=sse, else one JSON array sent an object at
        a time; usageMetadata in every object, the counts so far. `searches`: grounding with Google Search
        ran that many queries (groundingMetadata in the last object); `cached`: the tokens of the explicit cache
        it used, part of its prompt (cachedContentTokenCount)."""
        p_tokens += cached
        grounding = {"groundingMetadata": {"webSearchQueries": [f"query {i + 1}" for i in range(searches)],
                                           "groundingChunks": [{"web": {"uri": "https://example.com/a"}}]}} \
            if searches else {}
        if maps:  # grounded with Google Maps: places among its chunks
            grounding = {"groundingMetadata": {"groundingChunks": [
                {"maps": {"uri": "https://maps.google.com/?cid=1", "title": "A ledger shop", "placeId": "places/1"}}]}}

        def reply(part: str, done: int, last: bool) -> dict[str, Any]:
            return {"candidates": [{"content": {"role": "model", "parts": [{"text": part}]},
                                    **({"finishReason": "STOP", **grounding} if last else {})}],
                    "usageMetadata": {"promptTokenCount": p_tokens, "candidatesTokenCount": done,
                                      "totalTokenCount": p_tokens + done,
                                      **({"cachedContentTokenCount": cached} if cached else {})}, "modelVersion": model}

        if verb == "generateContent":
            whole = reply(text, c_tokens, True)
            if "-image" in model:  # an image model: an image beside the text, its tokens by modality
                whole["candidates"][0]["content"]["parts"].append(
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}})
                whole["usageMetadata"].update(
                    candidatesTokenCount=c_tokens + GEMINI_IMAGE_TOKENS,
                    totalTokenCount=p_tokens + c_tokens + GEMINI_IMAGE_TOKENS,
                    candidatesTokensDetails=[{"modality": "TEXT", "tokenCount": c_tokens},
                                             {"modality": "IMAGE", "tokenCount": GEMINI_IMAGE_TOKENS}])
            return h._json(200, whole)
        h.send_response(200)
        h.send_header("content-type", "text/event-stream" if sse else "application/json")
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()
        words = WORDS[:c_tokens]
        pieces = ["".join(words[i:i + 4]) for i in range(0, len(words), 4)] or [""]
        for i, piece in enumerate(pieces):
            event = json.dumps(reply(piece, min(4 * (i + 1), c_tokens), i == len(pieces) - 1))
            data = f"data: {event}\r\n\r\n" if sse else ("[" if i == 0 else "\n,\r\n") + event
            chunk = data.encode()
            h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        if not sse:
            h.wfile.write(b"1\r\n]\r\n")
        h.wfile.write(b"0\r\n\r\n")

    def _converse(self, h: Any, body: dict[str, Any], p_tokens: int, c_tokens: int, text: str, stream: bool,
                  scenario: str) -> None:
        """Bedrock's Converse: its usage counts apart what a cache checkpoint wrote (half the prompt); its
        stream is event stream messages, the usage in the last (metadata), and the tier that served it."""
        usage = {"inputTokens": p_tokens, "outputTokens": c_tokens, "totalTokens": p_tokens + c_tokens}
        if "cachePoint" in json.dumps(body.get("system")):
            written = p_tokens // 2
            usage.update(inputTokens=p_tokens - written, cacheWriteInputTokens=written, cacheReadInputTokens=0)
        asked = body.get("serviceTier") if isinstance(body.get("serviceTier"), dict) else {}
        served = {"serviceTier": {"type": asked.get("type") or "default"},
                  "performanceConfig": body.get("performanceConfig") or {"latency": "standard"}}
        if not stream:
            return h._json(200, {"output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                                 "stopReason": "end_turn", "metrics": {"latencyMs": 1}, **served,
                                 **({} if scenario == "no_usage" else {"usage": usage})})
        self._start_event_stream(h)
        events: list[tuple[str, dict[str, Any]]] = [("messageStart", {"role": "assistant"})]
        events += [("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": word}}) for word in WORDS[:c_tokens]]
        events += [("contentBlockStop", {"contentBlockIndex": 0}), ("messageStop", {"stopReason": "end_turn"})]
        if scenario != "no_usage":
            events.append(("metadata", {"usage": usage, "metrics": {"latencyMs": 1}, **served}))
        for i, (kind, payload) in enumerate(events):
            if scenario == "cut" and i == len(events) // 2:
                h.close_connection = True
                return
            self._send_message(h, kind, payload, scenario)
        h.wfile.write(b"0\r\n\r\n")

    @staticmethod
    def _start_event_stream(h: Any, headers: dict[str, str] | None = None) -> None:
        """A Bedrock stream's reply headers: AWS's event stream encoding, in chunks."""
        h.send_response(200)
        for name, value in (headers or {}).items():
            h.send_header(name, value)
        h.send_header("content-type", "application/vnd.amazon.eventstream")
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()

    @staticmethod
    def _send_message(h: Any, kind: str, payload: dict[str, Any], scenario: str) -> None:
        """One event stream message, as Bedrock sends each event (padded with `p`), in one HTTP chunk, or a
        few bytes at a time (scenario fragmented)."""
        encoded = event_stream.encode({":event-type": kind, ":content-type": "application/json",
                                       ":message-type": "event"}, json.dumps({**payload, "p": "abcdefgh"}).encode())
        size = 5 if scenario == "fragmented" else len(encoded)
        for at in range(0, len(encoded), size):
            piece = encoded[at:at + size]
            h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            h.wfile.flush()
        time.sleep(EVENT_GAP_SECONDS.get(scenario, 0.002))

    def _stream(self, h: Any, body: dict[str, Any], model: str, p_tokens: int, c_tokens: int, scenario: str,
                anthropic: bool, legacy: bool = False, bedrock: bool = False) -> None:
        if bedrock:  # InvokeModelWithResponseStream: each of Anthropic's events in a message of its own, in base64
            self._start_event_stream(h, bedrock_tier(h.headers))
            events = [{"type": "message_start", "message": {"id": "msg_mock", "model": model, "usage": {
                "input_tokens": p_tokens, "output_tokens": 0}}}]
            events += [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}
                       for word in WORDS[:c_tokens]]
            events += [{"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": c_tokens}},
                       {"type": "message_stop", "amazon-bedrock-invocationMetrics": {
                           "inputTokenCount": p_tokens, "outputTokenCount": c_tokens}}]
            for i, event in enumerate(events):
                if scenario == "cut" and i == len(events) // 2:
                    h.close_connection = True
                    return
                self._send_message(h, "chunk", {"bytes": base64.b64encode(json.dumps(event).encode()).decode()}, scenario)
            h.wfile.write(b"0\r\n\r\n")
            return
        # scenario gzip: a chat or text completion stream compressed whatever the request accepts
        compressor = zlib.compressobj(wbits=31) if scenario == "gzip" and not anthropic else None
        # scenario sized: a chat or text completion stream sent whole, with its content-length (a server that
        # buffers its events)
        sized: list[bytes] | None = [] if scenario == "sized" and not anthropic else None
        if sized is None:
            h.send_response(200)
            h.send_header("content-type", "text/event-stream")
            h.send_header("cache-control", "no-cache")
            h.send_header("transfer-encoding", "chunked")
            if compressor is not None:
                h.send_header("content-encoding", "gzip")
            h.end_headers()

        def send(data: str) -> None:
            encoded = data.encode()
            if sized is not None:
                sized.append(encoded)
                return
            if compressor is not None:
                encoded = compressor.compress(encoded) + compressor.flush(zlib.Z_SYNC_FLUSH)
            size = 7 if scenario == "fragmented" else len(encoded)
            for at in range(0, len(encoded), size):
                chunk = encoded[at:at + size]
                h.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                h.wfile.flush()
                if size < len(encoded):
                    time.sleep(0.001)  # a piece a read

        words = WORDS[:c_tokens]
        if anthropic:
            _, stop, c_tokens, iterations = anthropic_turn(body, model, p_tokens, c_tokens)
            words = WORDS[:c_tokens]
            send("event: message_start\ndata: " + json.dumps({"type": "message_start", "message": {
                "id": "msg_mock", "model": model, "usage": {"input_tokens": p_tokens, "output_tokens": 1,
                                                            **anthropic_speed_and_geo(body)}}}) + "\n\n")
            for i, word in enumerate(words):
                if scenario == "cut" and i == len(words) // 2:
                    h.close_connection = True
                    return
                if scenario == "error_midway" and i == len(words) // 2:  # Anthropic's overloaded error, mid-stream
                    send("event: error\ndata: " + json.dumps({"type": "error", "error": {
                        "type": "overloaded_error", "message": "Overloaded"}}) + "\n\n")
                    h.wfile.write(b"0\r\n\r\n")
                    return
                send("event: content_block_delta\ndata: " + json.dumps({"type": "content_block_delta", "index": 0,
                     "delta": {"type": "text_delta", "text": word}}) + "\n\n")
            send("event: message_delta\ndata: " + json.dumps({"type": "message_delta", "delta": {"stop_reason": stop},
                 "usage": {"output_tokens": c_tokens, **({"iterations": iterations} if iterations else {})}}) + "\n\n")
            send("event: message_stop\ndata: {\"type\": \"message_stop\"}\n\n")
            h.wfile.write(b"0\r\n\r\n")
            return
        for i, word in enumerate(words):
            if scenario == "cut" and i == len(words) // 2:
                h.close_connection = True  # the connection drops: no usage, no [DONE]
                return
            chunk = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            if legacy:
                chunk = {"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": model,
                         "choices": [{"index": 0, "text": word, "finish_reason": None, "logprobs": None}]}
            try:
                send(f"data: {json.dumps(chunk)}\n\n")
            except OSError:
                return  # the client (Envoy) hung up
            time.sleep(EVENT_GAP_SECONDS.get(scenario, 0.002))
        last = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        if legacy:
            last = {"id": "cmpl-mock", "object": "text_completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "text": "", "finish_reason": "stop", "logprobs": None}]}
        usage = {"prompt_tokens": p_tokens, "completion_tokens": c_tokens, "total_tokens": p_tokens + c_tokens}
        if mistral(model) and scenario != "no_usage":  # Mistral's streams end with their usage, unasked
            last["usage"] = usage
        if perplexity(model) and scenario != "no_usage":  # Perplexity's too, whatever stream_options say
            last["usage"] = perplexity_usage(body, model, p_tokens, c_tokens)
        send(f"data: {json.dumps(last)}\n\n")
        options = body.get("stream_options") or {}
        if options.get("include_usage") and scenario != "no_usage" and not perplexity(model):
            counted = {"prompt_tokens": p_tokens, "completion_tokens": c_tokens, "total_tokens": p_tokens + c_tokens}
            usage = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                     "usage": router_cost(model, counted, bool(h.headers.get("x-mock-byok")), body)}
            send(f"data: {json.dumps(usage)}\n\n")
        send("data: [DONE]\n\n")
        if sized is not None:
            whole = b"".join(sized)
            h.send_response(200)
            h.send_header("content-type", "text/event-stream")
            h.send_header("content-length", str(len(whole)))
            h.end_headers()
            h.wfile.write(whole)
            return
        if compressor is not None:
            rest = compressor.flush()
            h.wfile.write(f"{len(rest):x}\r\n".encode() + rest + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")
