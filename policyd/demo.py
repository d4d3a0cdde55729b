"""`policyd demo`: drive a running gateway (Envoy + policyd) with the official openai SDK.

Two customers: allowed calls, a streamed call, a background response charged when it ended, a model
refused by policy, a thread budget reached, a wallet drained to insufficient_quota, and the usage table
policyd recorded.
"""

from __future__ import annotations

import time
from typing import Any

from policyd.money import format_amount


def _usage_table(records: list[Any]) -> str:
    lines = [f"{'request':28} {'customer':10} {'model':14} {'decision':9} {'status':12} {'in':>5} {'out':>4} "
             f"{'charge USD':>12} {'reason'}"]
    for r in records:
        lines.append(f"{r.request_id[:28]:28} {r.owner.customer_id[:10]:10} {r.served_model[:14]:14} {r.decision:9} "
                     f"{r.status:12} {r.input_tokens:>5} {r.output_tokens:>4} {format_amount(r.charge.nanos):>12} "
                     f"{r.reason}")
    return "\n".join(lines)


def _settled(admin: Any, metadata: list[tuple[str, str]], request_id: str, seconds: float = 20.0) -> int:
    """The charge of a request once settled (a background response's: once policyd found it ended)."""
    from policyd_client.v1 import admin_pb2

    deadline = time.monotonic() + seconds
    while True:
        records = admin.ListUsage(admin_pb2.ListUsageRequest(request_id=request_id, limit=1), metadata=metadata).records
        if records and records[0].status in ("settled", "settled_late"):
            return records[0].charge.nanos
        if time.monotonic() > deadline:
            raise RuntimeError(f"request {request_id} was not settled in {seconds:.0f} s")
        time.sleep(0.2)


def run(base_url: str, key_a: str, key_b: str, admin: Any, metadata: list[tuple[str, str]]) -> int:
    import openai

    from policyd_client.v1 import admin_pb2

    alice = openai.OpenAI(base_url=base_url, api_key=key_a, max_retries=0)
    bob = openai.OpenAI(base_url=base_url, api_key=key_b, max_retries=0)
    print(f"gateway: {base_url}\n")

    reply = alice.chat.completions.create(model="gpt-4o", max_tokens=50, extra_headers={"x-feature": "support"},
                                          messages=[{"role": "user", "content": "Say hello to the finance team."}])
    print(f"alice  gpt-4o          allowed: {reply.choices[0].message.content!r} "
          f"({reply.usage.prompt_tokens} in, {reply.usage.completion_tokens} out)")

    stream = alice.chat.completions.create(model="gpt-4o-mini", stream=True, extra_headers={"x-thread-id": "t-1"},
                                           messages=[{"role": "user", "content": "Stream something."}])
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    print(f"alice  gpt-4o-mini     streamed: {text!r} (usage captured from the stream)")

    raw = alice.responses.with_raw_response.create(model="gpt-4o-mini", input="Research this in the background.",
                                                   background=True)
    queued = raw.parse()
    while (polled := alice.responses.retrieve(queued.id)).status in ("queued", "in_progress"):
        time.sleep(0.2)
    charged = _settled(admin, metadata, raw.headers["x-policyd-request-id"])
    print(f"alice  gpt-4o-mini     background: {queued.status}, then {polled.status} "
          f"({polled.usage.input_tokens} in, {polled.usage.output_tokens} out; charged {format_amount(charged)} "
          f"when it ended)")

    try:
        bob.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "premium please"}])
    except openai.PermissionDeniedError as error:
        print(f"bob    gpt-4o          refused: {error.code} (HTTP {error.status_code})")

    for i in range(200):
        try:
            bob.chat.completions.create(model="gpt-4o-mini", max_tokens=12,
                                        messages=[{"role": "user", "content": f"loop {i} " + "z" * 2000}],
                                        extra_headers={"x-thread-id": "agent-loop"})
        except openai.RateLimitError as error:
            print(f"bob    gpt-4o-mini     after {i} calls: {error.code} (HTTP 429): {error.message}")
            break

    records = admin.ListUsage(admin_pb2.ListUsageRequest(limit=12), metadata=metadata).records
    print("\nlatest usage records (policyd's SQL ledger):\n" + _usage_table(list(records)))
    for customer in ("alice", "bob"):
        w = admin.GetWallet(admin_pb2.GetWalletRequest(customer_id=customer), metadata=metadata)
        print(f"{customer}: balance {format_amount(w.balance_nanos)} {w.currency}, reserved {format_amount(w.reserved_nanos)}")
    return 0
