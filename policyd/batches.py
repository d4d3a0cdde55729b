"""OpenAI's Batch API: the requests of a file, run by the provider within its completion window, at the
model's `batch` tier prices.

A batch is made (POST /v1/batches) of a file its customer uploaded (purpose batch), which policyd never reads
on its way (uploads stream by). So when a batch is made, policyd reads its input file from the provider
account it was uploaded to (GET <base_url>/files/<id>/content) and holds the batch at the sum of its requests'
worst cases, each held as it would be sent alone, at the model's `batch` tier prices (a table that does not
price the tier refuses batches of the model: service_tier_not_priced). A batch's requests are all for one
model (as OpenAI requires) and are never rewritten: each needs its output cap where the model has no most in
the price table, and a bound on its search tools (max_tool_calls). The batch goes on to the account that has
its file; the provider's reply names it, and from then on it is followed like a background response
(policyd/background.py): policyd asks the provider for it (GET <base_url>/batches/<id>) until it ends, and
settles it with the usage the provider reports for the whole batch (`usage`; ended with none, or gone: charged
as held; failed before any request ran: released). Its hold is kept for its completion window and a margin
(the provider bills what ran before a batch expired). Reading it (GET /v1/batches/<id>) and cancelling it are
for its customer's keys alone; the account-wide list is not offered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from policyd import http_api
from policyd.domain import FILES_PER_REQUEST_MAX, Decision, Shape
from policyd.providers import ProviderPool
from policyd.usage_capture import Tokens, usage_from

if TYPE_CHECKING:
    from policyd.engine import Engine

log = logging.getLogger("policyd.batches")

BATCH_TIER = "batch"  # the price table's service tier a batch's requests are priced at
BATCH_ID_PREFIX = "batch_"
INPUT_BYTES_MAX = 200 * 1024 * 1024  # OpenAI's: a batch's input file is up to 200 MB,
INPUT_REQUESTS_MAX = 50_000  # ... of up to 50,000 requests
READ_TIMEOUT_SECONDS = 60
# how long the gateway waits for a batch's decision (its file read and its requests held), where others get
# ext_authz's 2 s or ext_proc's 5 s message timeout: the batch route's ext_authz timeout, ext_proc's override
DECISION_SECONDS = 90
# a batch's hold is kept for its completion window and this much more: the provider ends one that ran out of
# time (expired, billing what ran) within a while of its window
HOLD_MARGIN_SECONDS = 2 * 3600
# a batch's statuses once it has ended
ENDED_BATCH_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
UNREADABLE = ("batches need the provider account's base_url, where policyd reads the batch's input file to hold its "
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
    """The requests of a batch's input file (JSON lines of custom_id, method, url, body), each understood as the
    gateway understands the same request sent alone, priced at the batch tier."""
    if len(content) > INPUT_BYTES_MAX:
        return BatchInput(problem=f"a batch's input file is at most {INPUT_BYTES_MAX // (1024 * 1024)} MB")
    model, requests, files = "", [], set()
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
        call = http_api.parse_call("POST", url, {"content-type": "application/json"}, json.dumps(item["body"]).encode())
        if call.problem:
            return BatchInput(problem=f"{where}: {call.problem_message}")
        if call.stream or call.background:
            return BatchInput(problem=f"{where}: a batch's requests are neither streamed nor background responses")
        if call.previous_response or call.conversation:
            return BatchInput(problem=f"{where}: a batch's requests do not continue stored responses or conversations")
        if call.unbounded_web_search_tools or call.unbounded_file_search or call.image_model_default or \
                (call.image_model and not call.image_generation_calls):
            return BatchInput(problem=f"{where}: give the request's hosted tools a bound (max_tool_calls, max_uses, "
                                      f"and the image_generation tool's model): a batch's requests are not rewritten")
        if model and call.model != model:
            return BatchInput(problem=f"{where}: a batch's requests are all for one model ({model})")
        model = call.model
        files.update(call.files)
        requests.append(replace(call.authorize_input().shape, service_tier=BATCH_TIER, service_tier_implied=False))
        if len(requests) > INPUT_REQUESTS_MAX:
            return BatchInput(problem=f"a batch holds at most {INPUT_REQUESTS_MAX} requests")
    if not requests:
        return BatchInput(problem="the batch's input file holds no requests")
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


def batch_answer(status: int, body: bytes) -> tuple[str, str, Tokens]:
    """What the provider's answer (HTTP status, body) for a batch asked for says to do: (wait | gone | settle |
    release | held, the batch's status, its usage). Ended with usage: settle; failed or cancelled before it used
    anything: release; ended without usage reported: held (charged as held)."""
    seen = Tokens()
    if status == 404:
        return "gone", "", seen
    try:
        batch = json.loads(body) if status == 200 else None
    except ValueError:
        batch = None
    state = batch.get("status") if isinstance(batch, dict) else None
    if not isinstance(state, str) or state not in ENDED_BATCH_STATUSES:
        return "wait", str(state or "")[:32], seen
    assert isinstance(batch, dict)
    usage = batch.get("usage")
    if isinstance(usage, dict) and usage_from("responses", {"usage": usage}, seen) and seen.any:
        return "settle", state, seen
    if state in ("failed", "cancelled") or (isinstance(usage, dict) and not seen.any):
        return "release", state, seen  # its usage says nothing ran that is billed
    return "held", state, seen


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
        it at; its requests are held as one reservation, on that account."""
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
        policy = self.engine.book.current
        price = policy.model(found.model) if policy else None
        requests = with_output_caps(found.requests, call.endpoint, price.max_output_tokens if price else 0) \
            if price else found.requests
        if requests is None:
            return await self._refuse(call, "each request of a batch of this model needs its output cap (max_tokens, "
                                            "max_completion_tokens, max_output_tokens): a batch's requests are not "
                                            "rewritten, and the model has no most to hold", "input_file_id")
        decision = await self.engine.authorize_for_proxy(replace(
            request, model=found.model, shape=batch_shape(requests), batch=requests,
            files=tuple(sorted({call.batch_file, *found.files}))))
        if decision.allowed and decision.provider != where.provider:
            await self.engine.release(decision.request_id, "batch_file_elsewhere")
            return await self._refuse(call, f"the batch's input file is at {where.provider or 'another provider'}, "
                                            f"not at {found.model}'s provider")
        return replace(decision, account=where.account) if decision.allowed else decision

    async def _refuse(self, call: http_api.HttpCall, message: str, param: str = "input_file_id") -> Decision:
        return await self.engine.deny_request(call.authorize_input(), "invalid_request", message, param)


