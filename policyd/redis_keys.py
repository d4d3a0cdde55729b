"""Every Redis key policyd uses, built in one place.

All keys of one owner (customer) carry the hash tag of the owner's partition,
``{pN}``, so they live in one Redis Cluster slot and one Lua script can touch
them together; the event stream of that partition carries the same tag, so the
script appends its event atomically with the counter change.

    pd:{pN}:key:<key_id>                key state: status, h:<secret sha256> -> expiry ms
    pd:{pN}:wallet:<wallet_id>          balance, reserved (nanos); wallet id = customer or customer/workspace
    pd:{pN}:resv:<request_id>           one reservation (state, amount, holds)
    pd:{pN}:deadlines                   zset request_id -> expiry ms
    pd:{pN}:inflight:<key_id>           requests in flight on a key
    pd:{pN}:b:<scope>:<id>:<unit>:<window>:<start>   a quota bucket: used, a<pct>
    pd:{pN}:grant:<grant_id>            marker: a credit grant applied once
    pd:{pN}:credits:<customer_id>       zset: expiring grant id -> expiry ms (consumed first)
    pd:{pN}:credit_left:<customer_id>   hash: expiring grant id -> nanos not yet consumed
    pd:{pN}:credit_deadlines            zset: "<customer> <grant id>" -> expiry ms (the sweeper's list)
    pd:{pN}:events                      the partition's event stream (drained to SQL)
    pd:{pN}:gate                        "open" while the partition's counters are whole (written from SQL, kept
                                        since); "rebuilding" while a rebuild rewrites them; "broken" when one
                                        failed; gone when Redis lost them (a restart without persistence, a
                                        flush, an eviction). Every script refuses ("fenced") unless it is open
    pd:{caps}:b:cap:<name>:<unit>:<window>:<start>   an operator's cap (every customer's requests count in it:
                                        scripts touch it beside one partition's keys, so caps need a single Redis)
    pd:resp:<id>                        whose a stored response, conversation or file is (a day; then SQL)
    pd:resp-unknown:<id>                an id SQL did not know a moment ago (a minute)
    pd:rid:<request_id>                 -> partition of the reservation (for Settle/Release)
    pd:policy                           version of the active policy (a change makes replicas reload)
    pd:rebuild                          held by the replica rewriting the counters from SQL (one at a time)
"""

from __future__ import annotations

import zlib

PREFIX = "pd"
STREAM_GROUP = "policyd-writer"


def partition_of(owner_id: str, partitions: int) -> int:
    """The partition of a customer; a workspace wallet id "<customer>/<workspace>" shares its customer's."""
    return zlib.crc32(owner_id.split("/", 1)[0].encode("utf-8")) % partitions


def wallet_id(customer_id: str, workspace_id: str = "") -> str:
    """A customer's wallet is its id; a workspace wallet is "<customer>/<workspace>"."""
    return f"{customer_id}/{workspace_id}" if workspace_id else customer_id


def _tag(partition: int) -> str:
    return f"{PREFIX}:{{p{partition}}}"


def partition_in(key: str) -> int:
    """The partition a key of one is in (its hash tag: "pd:{p3}:..." is partition 3's)."""
    return int(key.split(":", 2)[1].removeprefix("{p").removesuffix("}"))


def key_state(partition: int, key_id: str) -> str:
    return f"{_tag(partition)}:key:{key_id}"


def wallet(partition: int, customer_id: str) -> str:
    return f"{_tag(partition)}:wallet:{customer_id}"


def end_user_terms(partition: int, customer_id: str) -> str:
    """hash end user id -> the stamp of that end user's own limits (key_limits.end_user_stamp), for a customer's
    end users with limits of their own; none there: none. The authorize script compares the stamp a decision was
    made under with it (a change of one end user's limits binds every replica from its next decision)."""
    return f"{_tag(partition)}:end_users:{customer_id}"


def reservation(partition: int, request_id: str) -> str:
    return f"{_tag(partition)}:resv:{request_id}"


def background_polls(partition: int) -> str:
    """zset request id -> when policyd next asks the provider for its background response (policyd/background.py)"""
    return f"{_tag(partition)}:polls"


def polled_response(partition: int, response_id: str) -> str:
    """the request whose background response this is, while policyd asks for it (its client reading or deleting
    it has it asked for first: policyd/background.py)"""
    return f"{_tag(partition)}:polled:{response_id}"


def deadlines(partition: int) -> str:
    return f"{_tag(partition)}:deadlines"


def inflight(partition: int, key_id: str) -> str:
    return f"{_tag(partition)}:inflight:{key_id}"


def bucket(partition: int, scope: str, scope_id: str, unit: str, window: str, start: int) -> str:
    return f"{_tag(partition)}:b:{scope}:{scope_id}:{unit}:{window}:{start}"


CAPS_PREFIX = f"{PREFIX}:{{caps}}:"  # every key of the operator's caps


def cap_bucket(name: str, unit: str, window: str, start: int) -> str:
    """The bucket of an operator's cap: one for every customer, in no partition (a single Redis only)."""
    return f"{CAPS_PREFIX}b:cap:{name}:{unit}:{window}:{start}"


def grant_marker(partition: int, grant_id: str) -> str:
    return f"{_tag(partition)}:grant:{grant_id}"


def expiring_credits(partition: int, customer_id: str) -> str:
    return f"{_tag(partition)}:credits:{customer_id}"


def credit_left(partition: int, customer_id: str) -> str:
    return f"{_tag(partition)}:credit_left:{customer_id}"


def credit_deadlines(partition: int) -> str:
    return f"{_tag(partition)}:credit_deadlines"


def stored_response(response_id: str) -> str:
    """A response the provider stored (its id, as the Responses API gave it): whose it is, and where."""
    return f"{PREFIX}:resp:{response_id}"


def limit_reset(customer_id: str) -> str:
    """The operator's reset of a customer's limits, while it runs: one at a time, so none forgives what another
    forgave already."""
    return f"{PREFIX}:limit_reset:{customer_id}"


POLICY_APPLY = f"{PREFIX}:policy_apply"  # a policy being applied: one at a time (Admin._policy_claimed)


def cap_reset(name: str) -> str:
    """The operator's reset of one of its caps, while it runs: one at a time."""
    return f"{PREFIX}:cap_reset:{name}"


def owner_change(customer_id: str, scope: str, owner_id: str) -> str:
    """A change of one owner's row of limits while it runs (its limits, an end user's pause, a reset's seeds), or of
    one key's (scope "key": any change of the key): one at a time, so none writes the row over another's change."""
    return f"{PREFIX}:owner_change:{scope}:{len(customer_id)}:{customer_id}:{owner_id}"


def cache_change(name: str) -> str:
    """The request changing an explicit cache's time to live (Gemini's PATCH cachedContents/<id>), while it runs:
    one at a time, so each is charged the time past what the one before it was."""
    return f"{PREFIX}:cache_change:{name}"


def upload_began(request_id: str) -> str:
    """The key secret (its hash) a Gemini upload was begun with, until its reply names the upload."""
    return f"{PREFIX}:upload-began:{request_id}"


def gemini_upload(upload: str) -> str:
    """The key secret (its hash) a Gemini upload (its "gu-" name) was begun with: its bytes, which come with no
    key, are sent as that key's."""
    return f"{PREFIX}:upload:{upload}"


def unknown_stored(response_id: str) -> str:
    """An id no usage record names, looked for a moment ago: not looked for in SQL again meanwhile."""
    return f"{PREFIX}:resp-unknown:{response_id}"


def events(partition: int) -> str:
    return f"{_tag(partition)}:events"


def gate(partition: int) -> str:
    return f"{_tag(partition)}:gate"


GATE_OPEN = "open"
GATE_REBUILDING = "rebuilding"
GATE_BROKEN = "broken"  # a rebuild failed halfway: closed until one succeeds
REBUILD_LOCK = f"{PREFIX}:rebuild"


def request_index(request_id: str) -> str:
    return f"{PREFIX}:rid:{request_id}"


POLICY_VERSION = f"{PREFIX}:policy"
COOLDOWNS = f"{PREFIX}:cooldowns"  # provider account -> cooling until (unix ms), shared by every replica
