"""Background responses (the Responses API's `background: true`): charged when they end, not when their
reply does.

Their reply comes at once, queued, with no usage; the provider goes on with the response whatever the client
does (it may poll for it, stream it, cancel it, or never come back), and bills all of it. So when a request's
reply (or its cut stream) leaves a background response unfinished, its reservation is kept, its hold standing,
until the provider says it ended: policyd asks the provider for it (GET <base_url>/responses/<id>, with the
account that made it) every `background_poll_seconds`, and settles it with the usage the provider reports, as
any reply's (failed or cancelled with none: released). One replica asks at a time (claim_polls.lua). A
background request on an account without a base_url is refused before the provider (UNFOLLOWABLE). If it
has not ended after `background_response_seconds`, or cannot be asked for (a response the provider no
longer knows), it is charged as held at that deadline, as any request whose end nobody saw
(Engine.expire_due), never released free. Its customer deleting it has it asked for first (ask_now).

Perplexity's async chat completions (a job made of a chat completion, its answer and usage when the job is asked
for: a background chat completion) are followed the same way, at `async/chat/completions/<id>` (COMPLETED: its
answer's usage; FAILED: released).

The gateway's reader leaves such a response here (Closing poll); a native caller does (AwaitResponse), and
settles it itself when policyd cannot follow it (its provider account is the caller's own). Batches are
followed the same way (their ids: policyd/batches.py says what the provider's answer for one means).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from policyd import metrics
from policyd.domain import PolicydError, UsageReport
from policyd.batches import BATCH_ID_PREFIXES, followed_batch
from policyd.providers import ProviderPool
from policyd.usage_capture import background_answer, followed_path

if TYPE_CHECKING:
    from policyd.engine import Engine

log = logging.getLogger("policyd.background")

# a background request whose provider account policyd cannot ask for it (no base_url): refused, released,
# rather than held for hours and charged as held
UNFOLLOWABLE = ("background responses need the provider account's base_url, where policyd asks for them until "
                "they end (their usage comes after the request); ask without background")
UNFOLLOWABLE_JOB = ("async chat completions need the provider account's base_url, where policyd asks for the job "
                    "until it ends (its usage comes after the request); call chat/completions instead")
UNFOLLOWABLE_RELEASE = "background_unfollowable"


UNFOLLOWABLE_OPERATION = ("videos need the provider account's base_url, where policyd asks for their operation "
                          "until it is done (their seconds are billed when it is)")


def unfollowable(endpoint: str) -> tuple[str, str]:
    """The refusal (message, param) of a background request whose account policyd cannot ask for it at: a
    Responses API background response's, an async chat completion's (Perplexity's job; its body's request), a
    Veo operation's."""
    if endpoint == "videos":
        return UNFOLLOWABLE_OPERATION, "model"
    return (UNFOLLOWABLE_JOB, "request") if endpoint == "chat_completions" else (UNFOLLOWABLE, "background")

POLL_BATCH = 50  # background responses claimed a turn, a partition
POLLS_AT_ONCE = 16  # ... asked for at once
POLL_TIMEOUT_SECONDS = 10
REPLY_BYTES_MAX = 32 * 1024 * 1024  # a response's JSON, as the gateway reads at most


class BackgroundResponses:
    def __init__(self, engine: Engine, pool: ProviderPool, wait_seconds: int, poll_seconds: float) -> None:
        self.engine = engine
        self.counters = engine.counters
        self.pool = pool
        self.wait_ms = wait_seconds * 1000
        self.poll_ms = max(1, int(poll_seconds * 1000))

    async def poll_later(self, request_id: str, response_id: str, account: str, hold_seconds: int = 0) -> None:
        """The gateway's: a request whose background response (or batch) the provider has not finished (Closing
        poll); `hold_seconds`: how long it is held at most (0: wait_seconds)."""
        try:
            await self.await_response(request_id, response_id, account, hold_seconds)
        except PolicydError as error:
            log.error("background response %s of request %s: %s", response_id[:64], request_id, error.reason)

    async def await_response(self, request_id: str, response_id: str, account: str,
                             hold_seconds: int = 0) -> tuple[int, bool]:
        """A request whose background response the provider has not finished: its hold is kept (its key's
        concurrency slot returned: the client's request has ended) until it ends, at most wait_seconds (or
        `hold_seconds`: a batch's completion window and a margin), and
        the response is its customer's. Asked for from now on when the account is one policyd can ask at
        (followed); else its caller settles it. Returns (held until, unix ms; followed)."""
        if not request_id or len(request_id) > 128:
            raise await self.engine.reject("", None, "invalid_request", "request_id is required",
                                           {"provider_response_id": response_id[:200]})
        detail = {"provider_response_id": response_id}
        reservation = await self.counters.find_reservation(request_id)
        if reservation is None:
            raise await self.engine.missing(request_id, "await", detail)
        if reservation.state != "reserved":  # closed: what a closed one keeps names no provider
            raise await self._closed(reservation.partition, request_id, reservation.state, detail)
        record = reservation.record
        followed = self.pool.follows(record["provider"], account) if account else False
        at = self.engine.clock()
        until = at + (hold_seconds * 1000 if hold_seconds > 0 else self.wait_ms)
        outcome = await self.counters.extend_hold(
            reservation, record["api_key_id"], until, now_ms=at, background=True,
            poll=(at + self.poll_ms, f"{account}\n{response_id}") if followed else None)
        if outcome == "already":  # closed meanwhile
            found = await self.counters.read_reservation(reservation.partition, request_id)
            raise await self._closed(reservation.partition, request_id, found.state if found else "settled", detail)
        if outcome != "extended":
            raise await self.engine.missing(request_id, "await", detail)
        await self.engine.remember_response(record["customer_id"], response_id, record["provider"],
                                            record["upstream"], account)
        return until, followed

    async def _closed(self, partition: int, request_id: str, state: str, detail: dict[str, str]) -> PolicydError:
        return await self.engine.reject(request_id, partition, f"already_{state}",
                                        f"this request was {state}: its hold cannot be kept", detail)

    async def poll_due(self) -> int:
        """Ask the providers for the background responses due, in every partition (POLLS_AT_ONCE at a time);
        how many are done with (ended, or nothing left to ask)."""
        at = self.engine.clock()
        claimed = [(partition, request_id, poll) for partition in range(self.counters.partitions)
                   for request_id, poll in await self.counters.claim_polls(partition, at, at + self.poll_ms,
                                                                           POLL_BATCH)]
        bound = asyncio.Semaphore(POLLS_AT_ONCE)

        async def one(partition: int, request_id: str, poll: str) -> bool:
            async with bound:
                return await self._turn(partition, request_id, poll)

        return sum(await asyncio.gather(*(one(*c) for c in claimed)))

    async def ask_now(self, customer_id: str, response_id: str) -> None:
        """Its customer deletes a response: one policyd waits for is asked for first (while it is there), so that
        one deleted the moment it ended is charged what it used, not as held (its next turn would find it gone)."""
        partition = self.counters.partition_of(customer_id)
        try:
            polled = await self.counters.polled(partition, response_id)
            if polled is not None:
                await self._turn(partition, *polled)
        except Exception:  # the client's call goes on; the response is asked for at its next turn
            log.exception("asking for background response %s before its customer's call", response_id[:64])

    async def _turn(self, partition: int, request_id: str, poll: str) -> bool:
        """Ask for one background response; whether it is done with (then asked for no more)."""
        try:
            outcome = await self._ask(request_id, poll)
        except Exception:
            log.exception("asking for the background response of request %s", request_id)
            outcome = "failed"  # asked again at its next turn
        metrics.background_polls.labels(outcome).inc()
        if outcome in ("running", "failed"):
            return False
        await self.counters.stop_polling(partition, request_id, poll.partition("\n")[2])
        return True

    async def _ask(self, request_id: str, poll: str) -> str:
        """What was found: running (asked again at its next turn), failed (the same; also an account not this
        process's, left to one that has it), ended (charged or released), gone (charged as held), unreachable
        (its account has no base_url now: held to its deadline), closed (nothing to ask for)."""
        account_name, _, response_id = poll.partition("\n")
        if not response_id:
            return "closed"  # its reservation closed (settled, expired): nothing to ask for
        account = self.pool.account(account_name)
        if account is None:  # not one of this process's accounts: another process's turn will ask for it
            return "failed"
        if not account.base_url:  # its base_url since taken from the configuration
            log.warning("background response %s of request %s: account %r has no base_url to ask it at; "
                        "charged as held at its deadline", response_id[:64], request_id, account_name)
            return "unreachable"
        batch = response_id.startswith(BATCH_ID_PREFIXES)
        if batch:  # the whole batch's usage, at the batch tier
            action, status, report = await followed_batch(account, response_id, request_id)
        else:
            reservation = await self.counters.find_reservation(request_id)
            if reservation is None or reservation.state != "reserved":
                return "closed"  # settled or expired meanwhile: nothing to ask for
            endpoint = str(reservation.record.get("endpoint") or "responses")  # or an async chat job (Perplexity's)
            path, body = followed_path(endpoint, response_id)
            answer = await asyncio.to_thread(account.get, path, REPLY_BYTES_MAX, POLL_TIMEOUT_SECONDS, body)
            action, reader = background_answer(*answer, endpoint)
            status, report = reader.response_status, UsageReport(
                request_id=request_id, **reader.tokens.fields(), images=reader.images, upstream_status=200,
                provider_account=account_name, provider_response_id=response_id,
                provider_file_ids=tuple(reader.files))  # a Veo operation's videos, its customer's
        if action == "wait":
            return "running" if status else "failed"  # asked again at its next turn
        try:
            if action == "settle":
                await self.engine.settle(report)
            elif action == "release":  # ended before it used anything billed
                await self.engine.release(request_id, f"{'batch' if batch else 'background'}_{status}")
            else:  # gone (deleted before it was charged), or ended with no usage: what it used cannot be known
                reason = "background_gone" if action == "gone" else "no_usage_reported"
                await self._charge_as_held(request_id, f"usage_estimated:{reason}", response_id, account_name)
        except PolicydError as error:  # closed meanwhile (a deadline, an operator): nothing more to do
            log.warning("background response %s of request %s: %s", response_id[:64], request_id, error.reason)
        return "gone" if action == "gone" else "ended"

    async def _charge_as_held(self, request_id: str, reason: str, response_id: str, account: str) -> None:
        try:
            await self.engine.settle_estimated(request_id, 0, interrupted=True, error_class=reason,
                                               provider_account=account, provider_response_id=response_id,
                                               output_as_held=True)
        except PolicydError as error:
            log.warning("background response %s of request %s: %s", response_id[:64], request_id, error.reason)

