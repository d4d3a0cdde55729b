"""Batches: many requests run by the provider within a window (a day), at the model's `batch` tier prices.

OpenAI's (POST /v1/batches) are made of a file their customer uploaded (purpose batch), which policyd never
reads on its way (uploads stream by). So when one is made, policyd reads its input file from the provider
account it was uploaded to (GET <base_url>/files/<id>/content); Anthropic's (POST /v1/messages/batches) carry
their requests in their body. A batch is held at the sum of its requests' worst cases, each held as it would
be sent alone, at the model's `batch` tier prices (a table that does not price the tier refuses batches of
the model: service_tier_not_priced). Its requests are all for one model and are never rewritten (nor
downgraded): each needs its output cap where the model has no most in the price table, and a bound on its
search tools. An OpenAI batch goes on to the account that has its file; the provider's reply names the batch,
and from then on it is followed like a background response (policyd/background.py): policyd asks the provider
for it until it ends and settles it with the usage the provider reports for the whole batch (`usage`), or,
where it reports none (Anthropic's; an older API), the usage of each of its requests that ran, summed from
its results (its output file). Gone, or ended with nothing to read: charged as held; ended before any request
ran: released. Its hold is kept for its window and a margin (the provider bills what ran before a batch
expired). Reading, cancelling or deleting it are for its customer's keys alone; the account-wide lists are
not offered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from policyd import http_api
from policyd.domain import CACHED_CONTENT_PREFIX, FILES_PER_REQUEST_MAX, Decision, Shape, UsageReport
from policyd.providers import ANTHROPIC_VERSION, Account, ProviderPool
from policyd.usage_capture import Tokens, usage_from

if TYPE_CHECKING:
    from policyd.engine import Engine

log = logging.getLogger("policyd.batches")

BATCH_TIER = "batch"  # the price table's service tier a batch's requests are priced at
BATCH_ID_PREFIX = "batch_"
INPUT_BYTES_MAX = 200 * 1024 * 1024  # OpenAI's: a batch's input file is up to 200 MB,
INPUT_REQUESTS_MAX = 100_000  # ... of up to 50,000 requests (an Anthropic message batch: 100,000)
MESSAGES_URL = "/v1/messages"  # an Anthropic message batch's requests
MESSAGE_BATCH_ID_PREFIX = "msgbatch_"  # Anthropic's
GEMINI_BATCH_ID_PREFIX = "batches/"  # Gemini's: a batch's name
BATCH_ID_PREFIXES = (BATCH_ID_PREFIX, MESSAGE_BATCH_ID_PREFIX, GEMINI_BATCH_ID_PREFIX)
READ_TIMEOUT_SECONDS = 60
ANSWER_BYTES_MAX = 1024 * 1024  # a batch object
GEMINI_ANSWER_BYTES_MAX = 64 * 1024 * 1024  # ... a Gemini batch's, whose requests' replies it holds inline
# a Gemini batch's states once it has ended (its metadata.state)
ENDED_GEMINI_STATES = frozenset({"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED",
                                 "BATCH_STATE_EXPIRED"})
# how long the gateway waits for a batch's decision (its file read and its requests held), where others get
# ext_authz's 2 s or ext_proc's 5 s message timeout: the batch route's ext_authz timeout, ext_proc's override
DECISION_SECONDS = 90
# a batch's hold is kept for its completion window and this much more: the provider ends one that ran out of
# time (expired, billing what ran) within a while of its window
HOLD_MARGIN_SECONDS = 2 * 3600
# a batch's statuses once it has ended
ENDED_BATCH_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
UNREADABLE = ("batches need the provider account's base_url, where policyd reads a batch's input file to hold its "
              "requests and asks for the batch until it ends")


@dataclass(frozen=True)
class BatchInput:
    """A batch's requests, as its input file gives them, or why they cannot be held."""

    model: str = ""
    requests: tuple[Shape, ...] = ()
    files: tuple[str, ...] = ()  # the files the requests refer to by id
    problem: str = ""  # the message of a file whose requests cannot be held
    param: str = "input_file_id"


def read_requests(url: str, content: bytes) -> BatchInput:
    """The requests of a batch's input file (OpenAI's: JSON lines of custom_id, method, url, body), each
    understood as the gateway understands the same request sent alone, priced at the batch tier."""
    if len(content) > INPUT_BYTES_MAX:
        return BatchInput(problem=f"a batch's input file is at most {INPUT_BYTES_MAX // (1024 * 1024)} MB")
    bodies: list[tuple[str, Any]] = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {number} of the input file"
        try:
            item = json.loads(line)
        except ValueError:
            return BatchInput(problem=f"{where} is not JSON")
        if not isinstance(item, dict) or not isinstance(item.get("body"), dict):
            return BatchInput(problem=f"{where} is not a request (custom_id, method, url, body)")
        if item.get("method") != "POST" or item.get("url") != url:
            return BatchInput(problem=f"{where}: every request of this batch is a POST to {url}")
        bodies.append((where, item["body"]))
    path = url if url.startswith("/v1/") else f"/v1{url}"  # Azure OpenAI names its requests' endpoints without /v1
    return _held(path, bodies, "the batch's input file holds no requests")


def inline_requests(requests: Any, endpoint: str = "anthropic_messages", model: str = "") -> BatchInput:
    """The requests of a batch given in its body, each understood as the same request sent alone, priced at the
    batch tier: an Anthropic message batch's (requests: [{custom_id, params}]), or a Gemini batch's of `model`
    (batch.inputConfig.requests.requests: [{request, metadata}])."""
    gemini = endpoint == "gemini_generate_content"
    param, body, shape = ("batch.inputConfig", "request", "{request, metadata}") if gemini else \
        ("requests", "params", "{custom_id, params}")
    if not isinstance(requests, list):
        return BatchInput(problem=f"requests must be a list of {shape}", param=param)
    bodies: list[tuple[str, Any]] = []
    for number, item in enumerate(requests):
        where = f"requests[{number}]"
        if not isinstance(item, dict) or not isinstance(item.get(body), dict):
            return BatchInput(problem=f"{where} is not a request ({shape[1:-1]})", param=param)
        bodies.append((where, item[body]))
    url = f"/v1beta/models/{urllib.parse.quote(model, safe='')}:generateContent" if gemini else MESSAGES_URL
    return replace(_held(url, bodies, "requests holds no requests"), param=param)


def _held(url: str, bodies: list[tuple[str, Any]], none: str) -> BatchInput:
    """A batch's requests (where each is, its body), each read as the gateway reads the same request alone: one
    model, nothing the gateway would have to rewrite, at the batch tier."""
    model, requests, files = "", [], set()
    headers = {"content-type": "application/json",
               **({"anthropic-version": ANTHROPIC_VERSION} if url == MESSAGES_URL else {})}
    for where, body in bodies:
        call = http_api.parse_call("POST", url, headers, json.dumps(body).encode(), call_token=where)
        if call.problem:
            return BatchInput(problem=f"{where}: {call.problem_message}")
        if call.stream or call.background:
            return BatchInput(problem=f"{where}: a batch's requests are neither streamed nor background responses")
        cache = call.previous_response if call.previous_response.startswith(CACHED_CONTENT_PREFIX) else ""
        if (call.previous_response and not cache) or call.conversation:
            return BatchInput(problem=f"{where}: a batch's requests do not continue stored responses or conversations")
        if call.unbounded_web_search_tools or call.unbounded_file_search or call.image_model_default or \
                (call.image_model and not call.image_generation_calls) or call.web_results_per_search:
            return BatchInput(problem=f"{where}: give the request's hosted tools a bound (max_tool_calls, max_uses, "
                                      f"max_total_results, and the image_generation tool's model): a batch's "
                                      f"requests are not rewritten")
        if model and call.model != model:
            return BatchInput(problem=f"{where}: a batch's requests are all for one model ({model})")
        if call.fallback_models or call.advisor_model:  # other models run beside it (not offered in batches)
            return BatchInput(problem=f"{where}: a batch's requests name no other model (fallbacks, an advisor tool)")
        model = call.model
        files.update(call.files)
        if cache:  # a Gemini request's explicit cache: its customer's alone, as the files its input names
            files.add(cache)
        requests.append(replace(call.authorize_input().shape, service_tier=BATCH_TIER, service_tier_implied=False))
        if len(requests) > INPUT_REQUESTS_MAX:
            return BatchInput(problem=f"a batch holds at most {INPUT_REQUESTS_MAX} requests")
    if not requests:
        return BatchInput(problem=none)
    if len(files) > FILES_PER_REQUEST_MAX:
        return BatchInput(problem=f"a batch's requests refer to at most {FILES_PER_REQUEST_MAX} files by id")
    return BatchInput(model, tuple(requests), tuple(sorted(files)))


def batch_shape(requests: tuple[Shape, ...]) -> Shape:
    """What the checks of a whole batch read (its tier, and whether any request refers to input it does not
    carry, or may have hosted tools billed apart)."""
    containers = max(requests, key=lambda r: r.containers)
    return Shape(service_tier=BATCH_TIER, unseen_input=any(r.unseen_input for r in requests),
                 containers=containers.containers, container_memory=containers.container_memory,
                 maps_grounding=any(r.maps_grounding for r in requests),
                 image_model=next((r.image_model for r in requests if r.image_model), ""))


def with_output_caps(requests: tuple[Shape, ...], endpoint: str, model_most: int) -> tuple[Shape, ...] | None:
    """The requests, each with the output cap it is held at: its own, else the model's most (a batch's requests
    are not rewritten, so none is given the plan's default); None when one has neither."""
    if endpoint == "embeddings":
        return requests
    if any(not r.max_output_tokens for r in requests) and not model_most:
        return None
    return tuple(r if r.max_output_tokens else replace(r, max_output_tokens=model_most) for r in requests)


@dataclass(frozen=True)
class BatchAnswer:
    """What the provider's answer for a batch says to do:

    wait         not ended (or no answer): asked again at its next turn;
    gone         the provider no longer knows it (404): charged as held;
    settle       ended, its usage reported (`tokens`): what ran, at the batch tier;
    read_output  ended, its usage not reported (an API from before batches reported it): summed from the
                 usage of each request in its output file (`output_file`);
    release      ended before any request ran that is billed (failed validating, cancelled at once);
    held         ended with no usage to be read: charged as held.
    """

    action: str
    status: str = ""
    tokens: Tokens = field(default_factory=Tokens)
    output_path: str = ""  # where its requests' results are read (under the account's base_url)
    endpoint: str = ""  # the family of its requests (BATCH_ENDPOINTS)


def batch_answer(status: int, body: bytes) -> BatchAnswer:
    """The provider's answer (HTTP status, body) for a batch asked for, read."""
    if status == 404:
        return BatchAnswer("gone")
    try:
        batch = json.loads(body) if status == 200 else None
    except ValueError:
        batch = None
    if isinstance(batch, dict) and batch.get("type") == "message_batch":
        return _message_batch_answer(batch)
    if isinstance(batch, dict) and str(batch.get("name", "")).startswith(GEMINI_BATCH_ID_PREFIX):
        return _gemini_batch_answer(batch)
    state = batch.get("status") if isinstance(batch, dict) else None
    if not isinstance(batch, dict) or not isinstance(state, str) or state not in ENDED_BATCH_STATUSES:
        return BatchAnswer("wait", str(state or "")[:32])
    seen = Tokens()
    usage = batch.get("usage")
    if isinstance(usage, dict):
        usage_from("responses", {"usage": usage}, seen)
        return BatchAnswer("settle" if seen.any else "release", state, seen)  # zero: nothing billed ran
    output = batch.get("output_file_id")
    if isinstance(output, str) and output:
        return BatchAnswer("read_output", state, output_path=f"files/{urllib.parse.quote(output[:200], safe='')}/content",
                           endpoint=http_api.BATCH_ENDPOINTS.get(str(batch.get("endpoint")), ""))
    counts = batch.get("request_counts")
    ran = counts.get("completed") if isinstance(counts, dict) else None
    if state in ("failed", "cancelled") or ran == 0:
        return BatchAnswer("release", state)  # no output: no request ran
    return BatchAnswer("held", state)


async def followed_batch(account: Account, batch_id: str, request_id: str) -> tuple[str, str, UsageReport]:
    """Ask the provider for a batch policyd follows (policyd/background.py): what to do (BatchAnswer's actions
    but read_output, done here), its status, and the usage to settle it with."""
    if batch_id.startswith(GEMINI_BATCH_ID_PREFIX):  # its name is its path
        path, most = f"batches/{urllib.parse.quote(batch_id[len(GEMINI_BATCH_ID_PREFIX):], safe='')}", \
            GEMINI_ANSWER_BYTES_MAX
    else:
        kind = "messages/batches" if batch_id.startswith(MESSAGE_BATCH_ID_PREFIX) else "batches"
        path, most = f"{kind}/{urllib.parse.quote(batch_id, safe='')}", ANSWER_BYTES_MAX
    batch = batch_answer(*await asyncio.to_thread(account.get, path, most, READ_TIMEOUT_SECONDS))
    action, tokens = batch.action, batch.tokens
    if action == "read_output":  # its usage not reported: its requests' own, from its output file
        read = await asyncio.to_thread(output_usage, account, batch.output_path, batch.endpoint)
        action, tokens = ("wait", tokens) if read is None else ("settle" if read.any else "release", read)
    return action, batch.status, UsageReport(
        request_id=request_id, **{**tokens.fields(), "service_tier": BATCH_TIER}, upstream_status=200,
        provider_account=account.name, provider_response_id=batch_id)


def _message_batch_answer(batch: dict[str, Any]) -> BatchAnswer:
    """An Anthropic message batch: ended once its processing_status says so; its usage is its results' alone."""
    state = batch.get("processing_status")
    if state != "ended":
        return BatchAnswer("wait", str(state or "")[:32])
    counts = batch.get("request_counts")
    if isinstance(counts, dict) and counts.get("succeeded") == 0:
        return BatchAnswer("release", "ended")  # none of its requests ran to a result that is billed
    batch_id = urllib.parse.quote(str(batch.get("id", ""))[:200], safe="")
    return BatchAnswer("read_output", "ended", output_path=f"messages/batches/{batch_id}/results",
                       endpoint="anthropic_messages")


def _gemini_batch_answer(batch: dict[str, Any]) -> BatchAnswer:
    """A Gemini batch: ended once its metadata's state says so; its usage is its inlined replies' (each
    request's usageMetadata, the ones that failed billing nothing)."""
    metadata = batch.get("metadata") if isinstance(batch.get("metadata"), dict) else {}
    state = metadata.get("state")
    if state not in ENDED_GEMINI_STATES:
        return BatchAnswer("wait", str(state or "")[:32])
    output = metadata.get("output") if isinstance(metadata.get("output"), dict) else {}
    inlined = output.get("inlinedResponses") if isinstance(output.get("inlinedResponses"), dict) else {}
    replies = inlined.get("inlinedResponses")
    if not isinstance(replies, list):  # no replies: none ran (failed), or none to read
        return BatchAnswer("release" if state == "BATCH_STATE_FAILED" else "held", state)
    total = Tokens()
    for item in replies:
        seen = Tokens()
        if isinstance(item, dict) and usage_from("gemini_generate_content", item.get("response"), seen):
            _add(total, seen)
    return BatchAnswer("settle" if total.any else "release", state, total)


def _add(total: Tokens, seen: Tokens) -> None:
    """Adds a reply's counts to a batch's."""
    for name in COUNTED:
        setattr(total, name, getattr(total, name) + getattr(seen, name))


def _billed_reply(item: Any) -> Any:
    """The reply of one line of a batch's results that is billed: an OpenAI request's response body (status 200),
    an Anthropic request's message (succeeded); None for one that failed."""
    if not isinstance(item, dict):
        return None
    response, result = item.get("response"), item.get("result")
    if isinstance(response, dict) and response.get("status_code") == 200:
        return response.get("body")
    if isinstance(result, dict) and result.get("type") == "succeeded":
        return result.get("message")
    return None


def output_usage(account: Account, path: str, endpoint: str) -> Tokens | None:
    """The usage of a batch's requests, summed from its results (its output file, a line a request, each reply's
    usage read as the same reply's alone); None when they could not be read (asked again later). Blocking: run
    it on a thread; the results are read a line at a time."""
    total = Tokens()
    try:
        with urllib.request.urlopen(account.request(path), timeout=READ_TIMEOUT_SECONDS) as reply:
            for line in reply:
                try:
                    item = json.loads(line) if line.strip() else None
                except ValueError:
                    continue
                seen = Tokens()
                if usage_from(endpoint, _billed_reply(item), seen):
                    _add(total, seen)
    except (OSError, ValueError):
        return None
    return total


COUNTED = [f.name for f in fields(Tokens) if f.type in ("int", int)]  # a Tokens' counts, which a batch sums


def hold_seconds(completion_window_seconds: int) -> int:
    """How long a batch's hold is kept once the provider has it."""
    return completion_window_seconds + HOLD_MARGIN_SECONDS


class Batches:
    """A batch made through the gateway: its input file read and its requests held (`authorize`)."""

    def __init__(self, engine: Engine, pool: ProviderPool) -> None:
        self.engine = engine
        self.pool = pool

    async def authorize(self, call: http_api.HttpCall) -> Decision:
        """The decision for a batch made: its input file must be its customer's, on an account policyd can read
        it at; its requests are held as one reservation, on that account. An Anthropic message batch's requests
        are in its body: held, on an account policyd can ask for the batch at."""
        if call.batch_inline is not None:
            return await self._authorize_inline(call)
        request = call.authorize_input()
        where = await self.engine.admit_stored_response(replace(request, stored_response=call.batch_file,
                                                                model="", files=()))
        if not where.allowed:  # the key, or a file that is not its customer's
            return where
        account = self.pool.account(where.account)
        if account is None or not account.base_url:
            return await self._refuse(call, UNREADABLE)
        status, content = await asyncio.to_thread(
            account.get, f"files/{urllib.parse.quote(call.batch_file, safe='')}/content", INPUT_BYTES_MAX,
            READ_TIMEOUT_SECONDS)
        if status == 404:
            return await self.engine.deny_request(request, "file_not_found", "", "input_file_id")
        if status != 200:
            log.warning("batch input file %s: its provider answered %s", call.batch_file[:64], status or "nothing")
            return await self.engine.deny_request(request, "unavailable", "the batch's input file could not be read "
                                                  "from its provider: try again", "input_file_id")
        found = await asyncio.to_thread(read_requests, call.batch_url, content)
        if found.problem:
            return await self._refuse(call, found.problem, found.param)
        decision = await self._hold(call, found, (call.batch_file,))
        if decision.allowed and decision.provider != where.provider:
            await self.engine.release(decision.request_id, "batch_file_elsewhere")
            return await self._refuse(call, f"the batch's input file is at {where.provider or 'another provider'}, "
                                            f"not at {found.model}'s provider")
        return replace(decision, account=where.account) if decision.allowed else decision

    async def _authorize_inline(self, call: http_api.HttpCall) -> Decision:
        found = await asyncio.to_thread(inline_requests, call.batch_inline, call.endpoint, call.model)
        if found.problem:
            return await self._refuse(call, found.problem, found.param)
        decision = await self._hold(call, found, call.authorize_input().files)
        if decision.allowed and not self.pool.follows(decision.provider, decision.account):
            await self.engine.release(decision.request_id, "batch_unfollowable")
            return await self._refuse(call, UNREADABLE, "requests")
        return decision

    async def _hold(self, call: http_api.HttpCall, found: BatchInput, files: tuple[str, ...]) -> Decision:
        """The decision on a batch's requests, each held at its output cap (the model's most when it gives none)."""
        policy = self.engine.book.current
        price = policy.model(found.model) if policy else None
        requests = with_output_caps(found.requests, call.endpoint, price.max_output_tokens if price else 0) \
            if price else found.requests
        if requests is None:
            return await self._refuse(call, "each request of a batch of this model needs its output cap (max_tokens, "
                                            "max_completion_tokens, max_output_tokens): a batch's requests are not "
                                            "rewritten, and the model has no most to hold", found.param)
        decision = await self.engine.authorize_for_proxy(replace(
            call.authorize_input(), model=found.model, shape=batch_shape(requests), batch=requests,
            files=tuple(sorted({*files, *found.files}))))
        if decision.allowed and decision.upstream_model != found.model:  # its requests cannot be renamed
            await self.engine.release(decision.request_id, "batch_model_renamed")
            return await self._refuse(call, f"{found.model} is named {decision.upstream_model} at its provider, and "
                                            f"a batch's requests are not rewritten: name it so", found.param)
        return decision

    async def _refuse(self, call: http_api.HttpCall, message: str, param: str = "input_file_id") -> Decision:
        return await self.engine.deny_request(call.authorize_input(), "invalid_request", message, param)


