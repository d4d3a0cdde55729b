"""Resetting a limit: an operator forgives what the current window of a limit has counted, so an owner its budget or
rate limit stopped (a runaway loop, a support case, a launch day) is served again at once, with no policy or limit
change and nothing else loosened.

A reset names an owner as a limit scopes it (a key; a customer, or one of its workspaces, projects or teams; one of
its end users, features, models or threads) and, to narrow it, a unit, a window or a limit's name. Every limit that
binds that owner's requests (its keys' plans', their own and their owners') in the owner's bucket is reset in its
current window: what the bucket's settled requests put in it (and what an owner's limit was seeded with) is taken
out, in one atomic step (lua/reset_limit.lua); requests in flight keep their holds and settle into the bucket as
usual, so the window counts from the reset what is spent after it. Alerts of the thresholds now below the count
are armed again. Charges, the wallet and the records are unchanged: a reset forgives a count, it gives no money back
(RefundUsage, GrantCredit do).

Each reset is kept in SQL (`limit_resets`: the bucket, what was taken, the moment whose settled requests it
forgave, why), so the audit and a rebuild take it out of what the records imply as the bucket did; a later refund
of a request a reset forgave gives that limit nothing back a second time (the reset's row takes the refund in
instead: Admin.refund_usage). One reset of a customer's limits runs at a time (a claim in Redis): two at once
would each forgive the same requests, the second taking the holds of requests in flight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from policyd import quotas
from policyd.db import ApiKeyRow
from policyd.policy import TAG_NAME_PATTERN, Limit

# an owner scope a reset may name (the field of its call), in the order a call's fields are read
NAMED_SCOPES = (("key", "key_id"), ("workspace", "workspace_id"), ("project", "project_id"), ("team", "team_id"),
                ("end_user", "end_user_id"), ("feature", "feature"), ("model", "model"), ("thread", "thread_id"),
                ("tag", "tag"))
REASON_LENGTH_MAX = 512
CLAIM_SECONDS = 120  # one reset of a customer's limits at a time: the claim lasts at most this, should its maker die
NAMED_ID_LENGTH_MAX = 256  # an end user's, feature's, model's or thread's id, as requests name them
# records are read from this long before their bucket's window began (a replica's clock ahead of another's): the
# bucket key they name decides
WINDOW_START_MARGIN_MS = 300_000


@dataclass(frozen=True)
class Target:
    """The owner whose limits a reset forgives: `scope` as a limit names it, `owner_id` its id within the
    customer ("" for the customer itself)."""

    customer_id: str
    scope: str
    owner_id: str

    def binds(self, key: ApiKeyRow) -> bool:
        """Whether the key's requests count in the owner's buckets: its own key, its workspace's, project's or
        team's keys; every key of the customer for the customer, its end users, features, models and threads."""
        if key.customer_id != self.customer_id or key.status == "revoked":
            return False
        own = {"key": key.id, "workspace": key.workspace_id, "project": key.project_id, "team": key.team_id}
        return self.scope not in own or own[self.scope] == self.owner_id

    def bucket_id(self, limit: Limit) -> str:
        """The id a limit of its scope counts its requests under (quotas.scope_ids); "" for one that does not bind
        them (a tag's limit of another tag, or of values not its)."""
        if self.scope == "tag":
            tag, _, value = self.owner_id.partition("=")
            return quotas.limit_scope_id(limit, quotas.scope_ids(self.customer_id, "", tags={tag: value}))
        named = {dict(NAMED_SCOPES)[self.scope]: self.owner_id} if self.scope != "customer" else {}
        return quotas.scope_ids(**{"customer_id": self.customer_id, "key_id": "", **named})[self.scope]


def target(customer_id: str, **named: str) -> Target:
    """The owner a reset names (at most one of NAMED_SCOPES' fields; none: the customer); ValueError says what is
    wrong."""
    given = [(scope, named.get(field, "")) for scope, field in NAMED_SCOPES if named.get(field, "")]
    if len(given) > 1:
        fields = ", ".join(field for _, field in NAMED_SCOPES)
        raise ValueError(f"name at most one of {fields} (none: the customer)")
    scope, owner_id = given[0] if given else ("customer", "")
    if not customer_id and scope != "key":
        raise ValueError("customer_id is required (or a key_id)")
    if scope == "tag" and not re.match(rf"^{TAG_NAME_PATTERN}=.", owner_id):
        raise ValueError("tag names a tag and its value: <tag>=<value>")
    return Target(customer_id, scope, owner_id)


def matches(limit: Limit, unit: str = "", window: str = "", name: str = "") -> bool:
    """Whether a limit is one a reset narrowed to a unit, a window or a name ("": any) asks for."""
    return (not unit or limit.unit == unit) and (not window or limit.window == window) and \
        (not name or limit.label == name)


@dataclass(frozen=True)
class Reset:
    """One limit's bucket reset: what it held before, what was taken out, what it holds now (the holds of requests
    in flight, and what settled after the reset's moment), and when its window ends (unix s, 0 for total)."""

    limit: Limit
    before: int
    forgiven: int
    used: int
    ends: int
