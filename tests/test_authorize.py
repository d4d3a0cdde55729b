"""Authorize: keys, plans, model allowlists, attribution and the records every decision leaves."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from policyd.server import Service
from tests.helpers import ask, counters_lost_and_rebuilt, fund, new_key


async def record(service: Service, request_id: str):
    await service.writer.drain()
    return service.store.usage_record(request_id)


async def test_allow_resolves_owner_and_stamps_policy_version(service: Service) -> None:
    key_id, secret = await new_key(service, workspace_id="ws1", project_id="proj1")
    await fund(service, "acme", "10")
    decision = await service.engine.authorize(ask(secret, request_id="r1", feature="chat", thread_id="t1"))
    assert decision.decision == "allow", decision
    assert decision.owner.customer_id == "acme"
    assert decision.owner.workspace_id == "ws1"
    assert decision.owner.api_key_id == key_id
    assert decision.served_model == "gpt-4o-mini"
    assert decision.provider == "openai"
    assert decision.policy_version == service.book.current.version == 1
    assert decision.price_table_version == "2026-11-01"
    assert decision.reserved > 0
    row = await record(service, "r1")
    assert row.decision == "allow" and row.status == "reserved"
    assert (row.customer_id, row.workspace_id, row.project_id, row.api_key_id) == ("acme", "ws1", "proj1", key_id)
    assert (row.feature, row.thread_id, row.policy_version) == ("chat", "t1", 1)
    assert row.reserved_nanos == decision.reserved


@pytest.mark.parametrize(
    ("api_key", "reason", "status"),
    [
        ("", "missing_api_key", 401),
        ("sk-not-ours", "malformed_api_key", 401),
        ("pdk_live_" + "A" * 40, "invalid_api_key", 401),
    ],
)
async def test_bad_keys_are_denied_and_recorded(service: Service, api_key: str, reason: str, status: int) -> None:
    decision = await service.engine.authorize(ask(api_key, request_id=f"bad-{reason}", client_address="203.0.113.9",
                                                   ) if False else ask(api_key, request_id=f"bad-{reason}"))
    assert (decision.decision, decision.reason, decision.http_status) == ("deny", reason, status)
    row = await record(service, f"bad-{reason}")
    assert row is not None and row.decision == "deny" and row.reason == reason and row.status == "denied"


async def test_paused_resumed_revoked_key(service: Service) -> None:
    key_id, secret = await new_key(service)
    await fund(service, "acme", "10")
    await service.admin.set_state(key_id, "paused")
    paused = await service.engine.authorize(ask(secret, request_id="p1"))
    assert (paused.reason, paused.http_status) == ("key_paused", 403)
    await service.admin.set_state(key_id, "active")
    assert (await service.engine.authorize(ask(secret, request_id="p2"))).decision == "allow"
    await service.admin.set_state(key_id, "revoked")
    revoked = await service.engine.authorize(ask(secret, request_id="p3"))
    assert (revoked.reason, revoked.http_status) == ("key_revoked", 401)
    with pytest.raises(Exception, match="key_revoked"):
        await service.admin.set_state(key_id, "active")
    assert (await record(service, "p3")).reason == "key_revoked"


async def test_a_key_ends_when_it_expires_until_given_a_later_end(service: Service) -> None:
    start = service.engine.clock()
    created = await service.admin.create_key(label="trial", customer_id="acme", environment="production", plan="pro",
                                             expires_ms=start + 60_000)
    key_id, secret = created.row.id, created.secret
    await fund(service, "acme", "10")
    clock = [start]
    service.engine.clock = lambda: clock[0]
    assert (await service.engine.authorize(ask(secret, request_id="e1"))).decision == "allow"
    clock[0] = start + 60_000  # its end
    expired = await service.engine.authorize(ask(secret, request_id="e2"))
    assert (expired.decision, expired.reason, expired.http_status, expired.error_type) == (
        "deny", "key_expired", 401, "invalid_request_error")
    assert expired.message == "This API key has expired."
    assert (await service.engine.models_for(secret))[1].reason == "key_expired"
    assert (await record(service, "e2")).reason == "key_expired"
    assert await service.counters.wallet("acme") == (10_000_000_000, (await record(service, "e1")).reserved_nanos)
    # the rotated secret ends with the key; a rebuild of Redis from SQL keeps the end
    await service.admin.rotate_key(key_id, grace_seconds=0)
    await service.writer.drain()
    await counters_lost_and_rebuilt(service)
    rotated = await service.admin.get_key(key_id)
    assert rotated.expires_ms == start + 60_000
    # a later end brings it back; 0 means it never ends
    await service.admin.set_expiry(key_id, start + 3_600_000)
    secret = (await service.admin.rotate_key(key_id, grace_seconds=0)).secret
    assert (await service.engine.authorize(ask(secret, request_id="e3"))).decision == "allow"
    clock[0] = start + 3_600_000
    assert (await service.engine.authorize(ask(secret, request_id="e4"))).reason == "key_expired"
    await service.admin.set_expiry(key_id, 0)
    clock[0] = start + 10 * 365 * 86_400_000
    assert (await service.engine.authorize(ask(secret, request_id="e5"))).decision == "allow"
    with pytest.raises(Exception, match="in the future"):
        await service.admin.set_expiry(key_id, start - 1)
    await service.admin.set_state(key_id, "revoked")  # revoked outranks expired, for good
    with pytest.raises(Exception, match="key_revoked"):
        await service.admin.set_expiry(key_id, 0)


async def test_paused_key_wins_over_policy_denial(service: Service) -> None:
    key_id, secret = await new_key(service, plan="free")
    await service.admin.set_state(key_id, "paused")
    decision = await service.engine.authorize(ask(secret, model="gpt-4o"))
    assert decision.reason == "key_paused"


async def test_rotation_grace_period_both_secrets_same_key(service: Service) -> None:
    key_id, old = await new_key(service)
    await fund(service, "acme", "10")
    rotated = await service.admin.rotate_key(key_id, grace_seconds=3600)
    new = rotated.secret
    assert new != old
    a = await service.engine.authorize(ask(old, request_id="old-1"))
    b = await service.engine.authorize(ask(new, request_id="new-1"))
    assert a.decision == b.decision == "allow"
    assert a.owner.api_key_id == b.owner.api_key_id == key_id
    await service.admin.rotate_key(key_id, grace_seconds=0)
    assert (await service.engine.authorize(ask(new, request_id="new-2"))).reason == "invalid_api_key"
    assert (await service.engine.authorize(ask(old, request_id="old-2"))).reason == "invalid_api_key"


async def test_model_allowlist_and_tiers(service: Service) -> None:
    _, free_secret = await new_key(service, customer="free-co", plan="free")
    denied = await service.engine.authorize(ask(free_secret, model="gpt-4o"))
    assert (denied.reason, denied.http_status, denied.error_param) == ("model_not_allowed", 403, "model")
    unknown = await service.engine.authorize(ask(free_secret, model="gpt-9"))
    assert unknown.reason == "unknown_model"
    endpoint = await service.engine.authorize(ask(free_secret, endpoint="images", model="gpt-4o-mini"))
    assert endpoint.reason == "endpoint_not_allowed"
    no_endpoint = await service.engine.authorize(ask(free_secret, endpoint=""))
    assert no_endpoint.reason == "unknown_endpoint" and no_endpoint.http_status == 400


async def test_staging_keys_never_reach_premium(service: Service) -> None:
    await fund(service, "acme", "10")
    _, staging = await new_key(service, environment="staging")
    assert (await service.engine.authorize(ask(staging, model="gpt-4o"))).reason == "environment_not_allowed"
    assert (await service.engine.authorize(ask(staging, model="gpt-4o-mini"))).decision == "allow"
    _, batch = await new_key(service, environment="batch")  # not listed for the plan at all
    assert (await service.engine.authorize(ask(batch, model="gpt-4o-mini"))).reason == "environment_not_allowed"


async def test_wrong_environment_claim_is_denied(service: Service) -> None:
    await fund(service, "acme", "10")
    _, secret = await new_key(service, environment="staging")
    decision = await service.engine.authorize(ask(secret, environment="production", request_id="env-1"))
    assert decision.reason == "environment_not_allowed"
    assert (await record(service, "env-1")).claimed == {"environment": "production"}


async def test_spoofed_owner_is_denied_and_recorded(service: Service) -> None:
    await fund(service, "acme", "10")
    await fund(service, "globex", "10")
    key_id, secret = await new_key(service, customer="acme", workspace_id="ws-a")
    spoof = await service.engine.authorize(ask(secret, customer_id="globex", request_id="spoof-1"))
    assert (spoof.reason, spoof.http_status) == ("owner_mismatch", 403)
    assert spoof.owner.customer_id == "acme"  # never moved to the claimed owner
    row = await record(service, "spoof-1")
    assert (row.customer_id, row.claimed["customer_id"], row.reason) == ("acme", "globex", "owner_mismatch")
    ws = await service.engine.authorize(ask(secret, workspace_id="ws-b"))
    assert ws.reason == "owner_mismatch"
    same = await service.engine.authorize(ask(secret, customer_id="acme", workspace_id="ws-a"))
    assert same.decision == "allow"
    balance, _ = await service.counters.wallet("globex")
    assert balance == 10_000_000_000  # nothing reserved against the claimed customer


@pytest.mark.parametrize(
    ("attribution", "param"),
    [
        ({"feature": "x" * 300}, "feature"),
        ({"thread_id": "bad\nline"}, "thread_id"),
        ({"tags": {f"k{i}": "v" for i in range(40)}}, "tags"),
        ({"request_id": "has spaces"}, "request_id"),
        ({"end_user_id": "user-\udcff"}, "end_user_id"),  # a header byte that was not UTF-8 (surrogateescape)
        ({"feature": "caf\ufffd"}, "feature"),  # already replaced on the way in
        ({"tags": {"team": "a\ud800b"}}, "tag team"),
    ],
)
async def test_invalid_metadata(service: Service, attribution: dict, param: str) -> None:
    _, secret = await new_key(service)
    await fund(service, "acme", "10")
    decision = await service.engine.authorize(ask(secret, **attribution))
    assert (decision.decision, decision.reason, decision.http_status, decision.error_param) == (
        "deny", "invalid_metadata", 400, param)
    row = await record(service, decision.request_id)
    assert row is not None and row.reason == "invalid_metadata"
    assert await service.counters.wallet("acme") == (10_000_000_000, 0)


async def test_decision_record_keeps_client_origin(service: Service) -> None:
    from policyd.domain import AuthorizeInput, Shape

    _, secret = await new_key(service)
    await fund(service, "acme", "1")
    request = AuthorizeInput(api_key=secret, endpoint="chat_completions", model="gpt-4o-mini",
                             shape=Shape(prompt_bytes=10), client_address="198.51.100.7", user_agent="curl/8.0")
    decision = await service.engine.authorize(request)
    row = await record(service, decision.request_id)
    assert (row.client_address, row.user_agent) == ("198.51.100.7", "curl/8.0")
    assert row.decision_latency_us > 0


async def test_unknown_plan_after_policy_change_is_refused(service: Service) -> None:
    with pytest.raises(Exception, match="unknown_plan"):
        await service.admin.create_key(label="x", customer_id="acme", environment="production", plan="gold")


async def test_a_token_count_checks_key_plan_and_model_and_moves_nothing(service: Service) -> None:
    """Token counts are free at the provider: allowed for a key that may use the model (even with an
    empty wallet), without a reservation, a limit's count or a record; denied and recorded otherwise."""
    key_id, secret = await new_key(service, plan="free")  # no credit at all; 20 requests a minute
    counts = [await service.engine.admit_token_count(ask(secret, request_id=f"count-{i}")) for i in range(25)]
    assert {(c.decision, c.reserved, c.provider, c.owner.customer_id) for c in counts} == {("allow", 0, "openai", "acme")}
    assert await service.counters.wallet("acme") == (0, 0)
    assert await record(service, "count-0") is None  # nothing to settle, nothing recorded
    await fund(service, "acme", "1")
    assert (await service.engine.authorize(ask(secret, request_id="after-counts"))).decision == "allow"  # rpm untouched

    for request, reason in ((ask(secret, request_id="count-premium", model="gpt-4o"), "model_not_allowed"),
                            (ask(secret, request_id="count-endpoint", model="claude-sonnet-4",
                                 endpoint="anthropic_messages"), "endpoint_not_allowed"),
                            (ask(secret, request_id="count-unknown", model="no-such-model"), "unknown_model"),
                            (ask("pdk_live_" + "A" * 40, request_id="count-bad-key"), "invalid_api_key")):
        denied = await service.engine.admit_token_count(request)
        assert (denied.decision, denied.reason) == ("deny", reason)
        row = await record(service, request.attribution.request_id)
        assert (row.decision, row.reason, row.status, row.reserved_nanos) == ("deny", reason, "denied", 0)
    assert (await record(service, "count-premium")).customer_id == "acme"  # the owner is known: attributed
    await service.admin.set_state(key_id, "paused")
    paused = await service.engine.admit_token_count(ask(secret, request_id="count-paused"))
    assert (paused.reason, paused.http_status) == ("key_paused", 403)
    assert (await record(service, "count-paused")).customer_id == "acme"
    await service.admin.set_state(key_id, "revoked")
    assert (await service.engine.admit_token_count(ask(secret))).reason == "key_revoked"


async def test_a_plan_change_binds_the_next_decision_even_where_the_old_plan_is_cached(service: Service) -> None:
    """Moving a key (or a customer's keys) to another plan: a replica that read the key before the change
    still holds the old plan in memory; the authorize script sees the key's new terms in Redis, and the
    decision is made again under the new plan."""
    from policyd import keys as key_secrets
    from policyd.domain import PolicydError

    key_id, secret = await new_key(service, plan="free", customer="upgrader")
    await fund(service, "upgrader", "10")
    assert (await service.engine.authorize(ask(secret, model="gpt-4o"))).reason == "model_not_allowed"
    secret_hash = key_secrets.hash_secret(secret)
    before = await service.engine.directory.resolve(secret_hash)  # what another replica still holds
    moved = await service.admin.set_plan("pro", key_id=key_id)
    assert [(row.id, row.plan) for row in moved] == [(key_id, "pro")]
    service.engine.directory.remember(secret_hash, before)
    upgraded = await service.engine.authorize(ask(secret, model="gpt-4o", request_id="after-upgrade"))
    assert (upgraded.decision, upgraded.owner.plan) == ("allow", "pro")
    await service.writer.drain()
    assert service.store.usage_record("after-upgrade").plan == "pro"

    service.engine.directory.remember(secret_hash, before)  # the same for the listing and token counts
    assert ("gpt-4o", "openai") in (await service.engine.models_for(secret))[0]
    service.engine.directory.remember(secret_hash, before)
    assert (await service.engine.admit_token_count(ask(secret, model="gpt-4o"))).decision == "allow"

    _, second = await new_key(service, plan="pro", customer="upgrader")
    revoked_id, _ = await new_key(service, plan="pro", customer="upgrader")
    await service.admin.set_state(revoked_id, "revoked")
    cached = await service.engine.directory.resolve(key_secrets.hash_secret(second))
    moved = await service.admin.set_plan("free", customer_id="upgrader")  # every key of the customer, back down
    assert sorted(row.plan for row in moved) == ["free", "free"] and revoked_id not in {row.id for row in moved}
    assert (await service.admin.get_key(revoked_id)).plan == "pro"
    service.engine.directory.remember(key_secrets.hash_secret(second), cached)
    assert (await service.engine.authorize(ask(second, model="gpt-4o"))).reason == "model_not_allowed"
    for bad, reason in (({"key_id": key_id, "customer_id": "upgrader"}, "invalid_request"),
                        ({"key_id": key_id, "plan": "no-such-plan"}, "unknown_plan"),
                        ({"key_id": revoked_id}, "key_revoked"), ({"customer_id": "nobody"}, "unknown_customer")):
        with pytest.raises(PolicydError) as error:
            await service.admin.set_plan(bad.pop("plan", "pro"), **bad)
        assert error.value.reason == reason
    assert (await service.admin.audit()).ok


async def test_a_key_with_limits_of_its_own(service: Service) -> None:
    """A key's own budget binds beside its plan's; its own limit of a plan's key-scope bucket replaces the
    plan's; a change binds a replica that still holds the key's old terms; none: the plan's alone."""
    from policyd import keys as key_secrets
    from policyd.domain import PolicydError
    from policyd.money import parse_amount

    capped_id, capped = await new_key(service, plan="free", customer="limited")  # free: 20 requests a minute a key
    _, plain = await new_key(service, plan="free", customer="limited")
    await fund(service, "limited", "10")
    await service.admin.set_limits(capped_id, [{"window": "minute", "unit": "requests", "limit": 2},
                                               {"window": "month", "unit": "money", "limit": parse_amount("5")}])
    decisions = [await service.engine.authorize(ask(capped, prompt_bytes=10, max_output_tokens=5)) for _ in range(3)]
    assert [d.decision for d in decisions] == ["allow", "allow", "deny"]
    assert (decisions[2].reason, decisions[2].message.endswith("(key-requests-minute)")) == ("rate_limit_exceeded", True)
    assert all([(await service.engine.authorize(ask(plain, prompt_bytes=10, max_output_tokens=5))).decision == "allow"
                for _ in range(5)])  # the plan's 20 a minute for the other key

    held = await service.engine.directory.resolve(key_secrets.hash_secret(capped))  # another replica's copy
    row = await service.admin.set_limits(capped_id, [{"window": "day", "unit": "money", "limit": 1}])  # a nano a day
    assert row.limits == [{"window": "day", "unit": "money", "limit": 1, "timezone": ""}]
    service.engine.directory.remember(key_secrets.hash_secret(capped), held)
    broke = await service.engine.authorize(ask(capped, prompt_bytes=10, max_output_tokens=5, request_id="own-day"))
    assert (broke.reason, broke.message.endswith("(key-money-day)")) == ("budget_exceeded", True)
    await service.admin.set_limits(capped_id, [])
    assert (await service.engine.authorize(ask(capped, prompt_bytes=10, max_output_tokens=5))).decision == "allow"
    review = await service.admin.review_key(capped_id)
    assert {b["label"] for b in review["buckets"]} == {"key-rpm"}  # the plan's again

    for bad in ([{"window": "week", "unit": "money", "limit": 1}], [{"window": "day", "unit": "coins", "limit": 1}],
                [{"window": "day", "unit": "money", "limit": -1}], [{"window": "hour", "unit": "money", "limit": 1,
                                                                       "timezone": "Europe/Paris"}],
                [{"window": "day", "unit": "money", "limit": 1}] * 2):
        with pytest.raises(PolicydError) as error:
            await service.admin.set_limits(capped_id, bad)
        assert error.value.reason == "invalid_limit"
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    assert service.store.usage_record("own-day").reason == "budget_exceeded"


async def test_a_limit_on_some_models_binds_the_requests_served_on_them_alone(service: Service) -> None:
    """A key's limit on some models (KeyLimit.models) counts the requests served on them in a bucket of its own:
    past it those are refused, naming it, while the key's other models are served; however many are held at once
    on a strict plan, charged and held never pass it. A plan's limit on a tier downgrades its requests once spent,
    and the cheaper model's requests do not count in it. An owner's limit on a model set mid-month starts from what
    was served on it that month. Models the price table does not know are refused; the audit and a rebuild agree."""
    import yaml

    from policyd.domain import PolicydError
    from tests.conftest import SAMPLE_POLICY
    from tests.helpers import usage

    key_id, secret = await new_key(service, customer="per-model")
    await fund(service, "per-model", "10")
    probe = await service.engine.authorize(ask(secret, model="gpt-4o", request_id="probe", max_output_tokens=50))
    await service.engine.release("probe", "test")
    budget = 3 * probe.reserved + probe.reserved // 2  # three holds fit, a fourth does not
    row = await service.admin.set_limits(key_id, [{"window": "day", "unit": "money", "limit": budget,
                                                   "models": ["gpt-4o", "gpt-4o"]}])
    assert row.limits == [{"window": "day", "unit": "money", "limit": budget, "timezone": "", "models": ["gpt-4o"]}]
    held = await asyncio.gather(*(service.engine.authorize(ask(secret, model="gpt-4o", request_id=f"m-{n}",
                                                               max_output_tokens=50)) for n in range(8)))
    allowed = [d for d in held if d.decision == "allow"]
    refused = [d for d in held if d.decision == "deny"]
    assert len(allowed) == 3 and sum(d.reserved for d in allowed) <= budget
    assert {(d.reason, d.message.endswith("(key-money-day[gpt-4o])")) for d in refused} == {("budget_exceeded", True)}
    for n in range(4):  # the key's other models are not bound by it
        assert (await service.engine.authorize(ask(secret, model="gpt-4o-mini", request_id=f"mini-{n}",
                                                   max_output_tokens=50))).decision == "allow"
    review = await service.admin.review_key(key_id)
    assert [(b["label"], b["used"]) for b in review["buckets"] if b["label"].startswith("key-money")] == [
        ("key-money-day[gpt-4o]", sum(d.reserved for d in allowed))]

    _, owned = await new_key(service, customer="owner-model")
    await fund(service, "owner-model", "10")
    assert (await service.engine.authorize(ask(owned, model="gpt-4o", request_id="own-before"))).decision == "allow"
    before = (await service.engine.settle(usage("own-before"))).charge
    assert (await service.engine.authorize(ask(owned, request_id="own-mini"))).decision == "allow"
    await service.engine.settle(usage("own-mini"))  # served on another model: not counted
    given, _ = await service.admin.set_owner_limits([{"window": "month", "unit": "money", "limit": 10**9,
                                                      "models": ["gpt-4o"]}], "owner-model")
    # set mid-month, it starts from what was served on its models this month (its seed)
    assert list(given.seeds.values()) == [before] == [s["used"] for s in await service.admin.owner_limit_states(given)]

    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["plans"]["pro"]["limits"].append({"name": "premium-only-day", "scope": "customer", "window": "day",
                                          "unit": "money", "limit": "0.000001", "models": ["tier:premium"],
                                          "action": "downgrade", "downgrade_to": "gpt-4o-mini"})
    await service.admin.apply_policy(yaml.safe_dump(doc), "per-model.yaml")
    _, other = await new_key(service, customer="per-tier")
    await fund(service, "per-tier", "10")
    downgraded = await service.engine.authorize(ask(other, model="claude-sonnet-4", request_id="tier-1"))
    assert (downgraded.decision, downgraded.served_model) == ("downgrade", "gpt-4o-mini")
    await service.engine.settle(usage("tier-1"))
    premium = [k async for k in service.counters.client.scan_iter(match="*:b:customer:per-tier:m=*")]
    assert [int(await service.counters.client.hget(k, "used") or 0) for k in premium] in ([], [0])  # mini's not in it

    for bad in ([{"window": "day", "unit": "money", "limit": 1, "models": ["gpt-5-nowhere"]}],
                [{"window": "day", "unit": "money", "limit": 1, "models": ["a", "b", "c", "d", "e"]}],
                [{"window": "day", "unit": "money", "limit": 1, "models": "gpt-4o"}],
                [{"window": "day", "unit": "money", "limit": 1, "models": ["gpt-4o"]},
                 {"window": "day", "unit": "money", "limit": 2, "models": ["gpt-4o"]}]):
        with pytest.raises(PolicydError) as error:
            await service.admin.set_limits(key_id, bad)
        assert error.value.reason == "invalid_limit", bad
    doc["plans"]["pro"]["limits"][-1]["models"] = ["tier:nowhere"]
    with pytest.raises(PolicydError) as error:
        await service.admin.apply_policy(yaml.safe_dump(doc), "bad.yaml")
    assert error.value.reason == "invalid_policy" and "matches nothing" in str(error.value)
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok
    rebuilt = await service.admin.review_key(key_id)  # the bucket rebuilt from the records, as it was
    assert [(b["label"], b["used"]) for b in rebuilt["buckets"] if b["label"].startswith("key-money")] == [
        ("key-money-day[gpt-4o]", sum(d.reserved for d in allowed))]


async def test_an_end_users_own_limits_bind_the_requests_naming_it(service: Service) -> None:
    """Admin.set_owner_limits for one end user of a customer: the requests naming it, of any of the customer's
    keys (one made later, one a replica still holds the old terms of), count in its bucket against its own limit,
    in place of the plan's end_user limit of that bucket, which binds the customer's other end users as before;
    past it they are refused, naming it; a reset forgives it; taken off, the plan's binds again."""
    import yaml

    from policyd import keys as key_secrets
    from policyd.domain import PolicydError
    from tests.conftest import SAMPLE_POLICY
    from tests.helpers import usage

    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["plans"]["free"]["limits"].append({"name": "end-user-day", "scope": "end_user", "window": "day",
                                           "unit": "requests", "limit": 3})
    await service.admin.apply_policy(yaml.safe_dump(doc), "end-users.yaml")
    _, first = await new_key(service, plan="free", customer="app")
    _, second = await new_key(service, plan="free", customer="app")
    await fund(service, "app", "10")
    held = await service.engine.directory.resolve(key_secrets.hash_secret(second))  # another replica's copy
    row, changed = await service.admin.set_owner_limits([{"window": "day", "unit": "requests", "limit": 2}], "app",
                                                        end_user_id="alice@example.com")
    assert (row.scope, row.owner_id, changed) == ("end_user", "alice@example.com", 2)
    service.engine.directory.remember(key_secrets.hash_secret(second), held)
    _, later = await new_key(service, plan="free", customer="app")

    async def asked(secret: str, end_user: str, n: int) -> Any:
        return await service.engine.authorize(ask(secret, request_id=f"{end_user}-{n}", end_user_id=end_user,
                                                  prompt_bytes=10, max_output_tokens=5))

    alice = [await asked(secret, "alice@example.com", n) for n, secret in enumerate((first, second, later))]
    assert [d.decision for d in alice] == ["allow", "allow", "deny"]
    assert (alice[2].reason, alice[2].message.endswith("(end_user-requests-day)")) == ("rate_limit_exceeded", True)
    carol = [await asked(secret, "carol", n) for n, secret in enumerate((first, second, later, first))]
    assert [d.decision for d in carol] == ["allow", "allow", "allow", "deny"]  # the plan's 3, as before
    assert carol[3].message.endswith("(end-user-day)")
    assert all([(await service.engine.authorize(ask(first, prompt_bytes=10, max_output_tokens=5))).decision
                == "allow" for _ in range(4)])  # naming no end user: not bound by either
    listed = {(r.scope, r.owner_id): r for r in await service.admin.owner_limits("app")}
    state = (await service.admin.owner_limit_states(listed[("end_user", "alice@example.com")]))[0]
    assert (state["limit"].label, state["used"]) == ("end_user-requests-day", 2)

    for d in alice[:2]:
        await service.engine.settle(usage(d.request_id))
    _, (reset,) = await service.admin.reset_limits("app", end_user_id="alice@example.com")
    assert (reset.limit.label, reset.forgiven, reset.used) == ("end_user-requests-day", 2, 0)
    assert (await asked(first, "alice@example.com", 10)).decision == "allow"
    await service.admin.set_owner_limits([], "app", end_user_id="alice@example.com")
    assert (await service.admin.get_key((await service.admin.list_keys("app"))[0].id)).end_user_limits == ""
    assert [(await asked(first, "alice@example.com", n)).decision for n in (11, 12, 13)] == [
        "allow", "allow", "deny"]  # the plan's 3 a day again: her bucket kept what it counted (1 since the reset)

    for owner in ({"end_user_id": "x" * 129}, {"end_user_id": "bad\nid"},
                  {"end_user_id": "alice", "team_id": "t"}):
        with pytest.raises(PolicydError) as error:
            await service.admin.set_owner_limits([{"window": "day", "unit": "requests", "limit": 1}], "app", **owner)
        assert error.value.reason == "invalid_request", owner
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok


async def test_a_change_of_one_end_users_limits_binds_at_the_next_decision_and_changes_no_key(
        service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """An end user's own limits are checked by their stamp in Redis: a change of one end user's binds at the next
    decision naming it, on a replica that remembered the older ones too, without changing any key (but the first
    end user's and the last's, which start and stop their customer's keys reading end users') or making a replica
    read another end user's again; no change reads all of a customer's owners' rows (a customer may have any
    number of end users with limits of their own); several changes at once end with the last in SQL binding; the
    stamps are rebuilt with the counters, so a replica's remembered ones are checked as before."""
    import yaml

    from policyd import key_limits, redis_keys
    from policyd.db import OwnerLimitsRow
    from tests.conftest import SAMPLE_POLICY
    from tests.helpers import usage

    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["plans"]["free"]["limits"] = [{"name": "end-user-day", "scope": "end_user", "window": "day",
                                       "unit": "requests", "limit": 5}]  # the key's per-minute limit aside
    await service.admin.apply_policy(yaml.safe_dump(doc), "end-users.yaml")
    _, first = await new_key(service, plan="free", customer="app")
    _, second = await new_key(service, plan="free", customer="app")
    await fund(service, "app", "10")

    reads: list[str] = []
    one_owner, every_customers_owners = service.store.owner_limits_of, service.store.owner_limits

    def every_owner(customer_id: str = "") -> list[OwnerLimitsRow]:
        assert not customer_id, "all of a customer's owners' rows read"
        return every_customers_owners()  # a rebuild's, and the audit's

    def counted(customer_id: str, scope: str, owner_id: str) -> OwnerLimitsRow | None:
        reads.append(owner_id)
        return one_owner(customer_id, scope, owner_id)

    monkeypatch.setattr(service.store, "owner_limits", every_owner)
    monkeypatch.setattr(service.store, "owner_limits_of", counted)
    engine, admin = service.engine, service.admin
    n = iter(range(1000))
    allowed: list[str] = []

    async def asked(end_user: str, secret: str = first) -> str:
        decision = await engine.authorize(ask(secret, request_id=f"{end_user}-{next(n)}", end_user_id=end_user,
                                              prompt_bytes=10, max_output_tokens=5))
        allowed.extend([decision.request_id] if decision.decision == "allow" else [])
        return decision.decision if decision.decision == "allow" else decision.reason

    def limit(count: int) -> list[dict[str, object]]:
        return [{"window": "day", "unit": "requests", "limit": count}]

    assert (await admin.set_owner_limits(limit(3), "app", end_user_id="alice"))[1] == 2  # the first: keys read them
    assert [await asked("alice"), await asked("alice", second)] == ["allow", "allow"]
    for user in ("bob", "carol", "dave"):
        assert (await admin.set_owner_limits(limit(1), "app", end_user_id=user))[1] == 0  # no key changed
    reads.clear()
    assert [await asked("bob"), await asked("bob"), await asked("alice")] == ["allow", "rate_limit_exceeded", "allow"]
    assert reads.count("alice") == 0  # remembered: bob's, carol's and dave's made no replica read hers again
    assert reads.count("bob") == 1
    assert await asked("alice") == "rate_limit_exceeded"  # 3 a day: her own, not the plan's 5

    # lowered, then raised: this replica remembered 3; each change binds its next decision
    assert (await admin.set_owner_limits(limit(2), "app", end_user_id="bob"))[1] == 0
    assert await asked("bob") == "allow"
    assert (await admin.set_owner_limits(limit(4), "app", end_user_id="alice"))[1] == 0
    assert [await asked("alice", second), await asked("alice")] == ["allow", "rate_limit_exceeded"]
    assert (await admin.set_owner_limits([], "app", end_user_id="alice"))[1] == 0  # others still have some
    assert [await asked("alice"), await asked("alice")] == ["allow", "rate_limit_exceeded"]  # the plan's 5: 4 used
    assert await asked("erin") == "allow"  # none of her own: the plan's

    # several changes of one end user at once: the stamp in Redis is the one of what SQL holds, which binds
    await asyncio.gather(*(admin.set_owner_limits(limit(count), "app", end_user_id="carol") for count in (7, 8, 9)))
    held = one_owner("app", "end_user", "carol")
    terms = redis_keys.end_user_terms(service.counters.partition_of("app"), "app")
    assert (await service.counters.client.hget(terms, "carol")).decode() == key_limits.end_user_stamp(held)
    assert [await asked("carol") for _ in range(held.limits[0]["limit"])].count("allow") == held.limits[0]["limit"]
    assert await asked("carol") == "rate_limit_exceeded"

    # the counters lost: rebuilt, stamps with them; this replica's remembered ones still bind, and are still checked
    await service.writer.drain()
    await counters_lost_and_rebuilt(service)
    assert [await asked("bob"), await asked("dave")] == ["rate_limit_exceeded", "allow"]
    assert (await admin.set_owner_limits(limit(3), "app", end_user_id="bob"))[1] == 0
    assert [await asked("bob"), await asked("bob")] == ["allow", "rate_limit_exceeded"]
    for request_id in allowed:
        await engine.settle(usage(request_id))
    _, (reset,) = await admin.reset_limits("app", end_user_id="bob", reason="ticket 7")  # of his alone
    assert (reset.limit.label, reset.forgiven) == ("end_user-requests-day", 3)
    assert [await asked("bob"), await asked("bob", second)] == ["allow", "allow"]
    for user in ("bob", "carol", "dave"):  # the last: the keys stop reading end users'
        changed = (await admin.set_owner_limits([], "app", end_user_id=user))[1]
    assert changed == 2 and await service.counters.client.hlen(terms) == 0
    assert [await asked("erin") for _ in range(5)].count("allow") == 4  # the plan's 5: one asked before
    await service.writer.drain()
    assert (await admin.audit()).ok


async def test_an_end_user_paused_is_refused_from_every_key_until_resumed(service: Service) -> None:
    """Admin.set_end_user_paused: the requests naming a paused end user, of any key of its customer, are refused
    (end_user_paused, 403, param user; recorded, nothing held) from the next decision, on a replica that remembered
    it unpaused too; its other end users are served; its own limits are kept (and may change) while paused and bind
    once resumed; an end user with no limits paused and resumed leaves no row; a pause outlives the counters' loss.
    The key's holder asking of the end user (GET /v1/key with x-end-user-id) is told it is paused, and when resumed."""
    import yaml

    from policyd.domain import PolicydError
    from tests.conftest import SAMPLE_POLICY

    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["plans"]["free"]["limits"] = [{"name": "end-user-day", "scope": "end_user", "window": "day",
                                       "unit": "requests", "limit": 5}]
    await service.admin.apply_policy(yaml.safe_dump(doc), "end-users.yaml")
    _, first = await new_key(service, plan="free", customer="app")
    _, second = await new_key(service, plan="free", customer="app")
    await fund(service, "app", "10")
    admin, n = service.admin, iter(range(1000))

    async def asked(end_user: str, secret: str = first) -> Any:
        return await service.engine.authorize(ask(secret, request_id=f"{end_user}-{next(n)}", end_user_id=end_user,
                                                  prompt_bytes=10, max_output_tokens=5))

    def limit(count: int) -> list[dict[str, object]]:
        return [{"window": "day", "unit": "requests", "limit": count}]

    assert (await admin.set_owner_limits(limit(3), "app", end_user_id="alice"))[1] == 2
    assert [(await asked(user)).decision for user in ("alice", "dave")] == ["allow", "allow"]  # both remembered
    row, changed = await admin.set_end_user_paused("app", "alice", True)
    assert (row.paused, row.limits[0]["limit"], changed) == (True, 3, 0)  # her limits kept
    refused = [await asked("alice"), await asked("alice", second)]
    assert {(d.decision, d.reason, d.http_status, d.error_param) for d in refused} == {
        ("deny", "end_user_paused", 403, "user")}
    assert (await asked("bob")).decision == "allow"

    async def paused_as_the_key_asks(end_user: str) -> tuple[str, bool]:  # GET /v1/key with x-end-user-id
        summary, denial = await service.engine.key_summary(second, end_user)
        assert denial is None
        return summary.end_user_id, summary.end_user_paused

    assert [await paused_as_the_key_asks(user) for user in ("alice", "bob")] == [("alice", True), ("bob", False)]
    assert (await service.engine.key_summary(second))[0].end_user_id == ""
    assert (await admin.set_owner_limits(limit(4), "app", end_user_id="alice"))[1] == 0  # a change of her limits
    assert (await asked("alice")).reason == "end_user_paused"  # ... leaves her paused
    listed = {r.owner_id: r for r in await admin.owner_limits("app")}
    assert (listed["alice"].paused, listed["alice"].limits[0]["limit"]) == (True, 4)
    await admin.set_end_user_paused("app", "alice", False)
    assert await paused_as_the_key_asks("alice") == ("alice", False)  # resumed, on a replica that remembered her paused
    assert [(await asked("alice")).decision for _ in range(4)] == ["allow", "allow", "allow", "deny"]  # her 4

    _, solo = await new_key(service, plan="free", customer="solo")
    await fund(service, "solo", "1")
    assert (await admin.set_end_user_paused("solo", "carol", True))[1] == 1  # the first: its key reads end users'
    assert (await asked("carol", solo)).reason == "end_user_paused"
    assert (await admin.set_end_user_paused("solo", "carol", False))[1] == 1  # no row left: its key reads none
    assert await admin.owner_limits("solo") == [] and (await asked("carol", solo)).decision == "allow"

    await admin.set_end_user_paused("app", "dave", True)  # this replica remembered him unpaused
    await service.writer.drain()
    await counters_lost_and_rebuilt(service)
    assert (await asked("dave")).reason == "end_user_paused"
    with pytest.raises(PolicydError) as error:
        await admin.set_end_user_paused("app", "", True)
    assert error.value.reason == "invalid_request"
    await service.writer.drain()
    denied = [service.store.usage_record(d.request_id) for d in refused]
    assert {(r.decision, r.reason, r.reserved_nanos, r.charge_nanos, r.end_user_id) for r in denied} == {
        ("deny", "end_user_paused", 0, 0, "alice")}
    assert (await admin.audit()).ok


async def test_a_key_asks_what_an_end_user_of_its_customer_may_still_spend(service: Service) -> None:
    """GET /v1/key naming an end user (x-end-user-id; DescribeKey's end_user_id): the limits binding that end
    user's requests are listed beside the key's, with what the end user used: the plan's end_user limits, or its
    own in their place, as a replica that remembered older ones has them checked against their stamp; an end user
    id no request could name is refused (invalid_metadata), nothing moved."""
    import yaml

    from tests.conftest import SAMPLE_POLICY

    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["plans"]["free"]["limits"].append({"name": "end-user-day", "scope": "end_user", "window": "day",
                                           "unit": "requests", "limit": 5})
    await service.admin.apply_policy(yaml.safe_dump(doc), "end-users.yaml")
    _, secret = await new_key(service, plan="free", customer="shop")
    await fund(service, "shop", "10")

    async def states(end_user: str = "") -> dict[str, tuple[str, int, int]]:
        summary, denial = await service.engine.key_summary(secret, end_user)
        assert denial is None, denial
        return {s.name: (s.scope, s.limit, s.used) for s in summary.limits}

    for n in range(2):
        assert (await service.engine.authorize(ask(secret, request_id=f"carol-{n}", end_user_id="carol",
                                                   prompt_bytes=10, max_output_tokens=5))).decision == "allow"
    assert "end-user-day" not in await states()  # naming none: the key's limits alone
    assert (await states("carol"))["end-user-day"] == ("end_user", 5, 2)
    assert (await states("dan"))["end-user-day"] == ("end_user", 5, 0)
    assert (await states("carol"))["key-rpm"] == ("key", 20, 2)  # the key's own, as before

    await service.admin.set_owner_limits([{"window": "day", "unit": "requests", "limit": 3}], "shop",
                                         end_user_id="carol")  # in place of the plan's, its bucket the same
    listed = await states("carol")
    assert (listed["end_user-requests-day"], "end-user-day" in listed) == (("end_user", 3, 2), False)
    assert (await states("dan"))["end-user-day"] == ("end_user", 5, 0)
    await service.admin.set_owner_limits([{"window": "day", "unit": "requests", "limit": 4}], "shop",
                                         end_user_id="carol")  # this replica remembered 3
    assert (await states("carol"))["end_user-requests-day"] == ("end_user", 4, 2)

    wallet = await service.counters.wallet("shop")
    for bad in ("x" * 300, "bad\nid"):
        summary, denial = await service.engine.key_summary(secret, bad)
        assert (summary, denial.reason, denial.error_param) == (None, "invalid_metadata", "end_user_id")
    assert await service.counters.wallet("shop") == wallet


async def test_owners_with_limits_of_their_own_are_listed_a_page_at_a_time(service: Service) -> None:
    """A customer may give thousands of its end users limits of their own: ListOwnerLimits pages them (every
    owner once, in order, whatever the page size), narrowed to a customer, a scope or one owner; a page token
    that no listing gave, an unknown scope and an owner named without its scope are refused."""
    from policyd.domain import PolicydError

    day = [{"window": "day", "unit": "requests", "limit": 5}]
    await new_key(service, plan="free", customer="many")
    await new_key(service, plan="free", customer="other")
    await service.admin.set_owner_limits(day, "many")
    await service.admin.set_owner_limits(day, "many", team_id="red")
    users = [f"user-{n:02d}" for n in range(11)]
    for user in reversed(users):
        await service.admin.set_owner_limits(day, "many", end_user_id=user)
    await service.admin.set_owner_limits(day, "other", end_user_id="user-00")
    every = [("many", "customer", "")] + [("many", "end_user", u) for u in users] + [("many", "team", "red"),
                                                                                     ("other", "end_user", "user-00")]

    async def pages(size: int, **narrowed: str) -> tuple[list[tuple[str, str, str]], int]:
        listed, token, count = [], "", 0
        while True:
            rows, token = await service.admin.owner_limits_page(limit=size, page_token=token, **narrowed)
            assert len(rows) <= size and (rows or not token)
            listed += [(r.customer_id, r.scope, r.owner_id) for r in rows]
            count += 1
            if not token:
                return listed, count

    for size in (1, 3, 14, 1000):
        assert await pages(size) == (every, -(-len(every) // size))  # a full last page says it is the last
    assert (await pages(4, customer_id="many", scope="end_user"))[0] == [e for e in every[1:12]]
    assert (await pages(50, scope="end_user", owner_id="user-00"))[0] == [every[1], every[-1]]
    assert (await pages(50, customer_id="many", scope="end_user", owner_id="user-07"))[0] == [every[8]]
    assert (await pages(50, customer_id="many", scope="end_user", owner_id="x" * 300))[0] == []
    for bad in ({"page_token": "not-a-token"}, {"page_token": "WzFd"}, {"scope": "galaxy"},
                {"owner_id": "user-00"}, {"scope": "customer", "owner_id": "many"}):
        with pytest.raises(PolicydError) as refused:
            await service.admin.owner_limits_page(**bad)
        assert refused.value.reason == "invalid_request", bad


async def test_a_limit_given_for_a_while_binds_until_then_and_the_plans_again_after(service: Service) -> None:
    """A key's or an owner's limit with until_unix_ms binds until then (here a tiny budget: refused), then no more:
    the plan's limits of its bucket bind again; one already past is refused when given, as is one in a plan."""
    import time

    import yaml

    from policyd.domain import PolicydError
    from tests.conftest import SAMPLE_POLICY

    now = int(time.time() * 1000)
    key_id, secret = await new_key(service, customer="for-a-while")
    await fund(service, "for-a-while", "10")
    row = await service.admin.set_limits(key_id, [{"window": "month", "unit": "money", "limit": 1,
                                                   "until_unix_ms": now + 60_000}])
    assert row.limits[0]["until_unix_ms"] == now + 60_000
    _, other = await new_key(service, customer="owned-a-while")
    await fund(service, "owned-a-while", "10")
    await service.admin.set_owner_limits([{"window": "day", "unit": "requests", "limit": 0,
                                           "until_unix_ms": now + 60_000}], "owned-a-while")
    service.engine.clock = lambda: now + 1_000
    refused = await service.engine.authorize(ask(secret, request_id="while-1"))
    assert (refused.reason, refused.message.endswith("(key-money-month)")) == ("budget_exceeded", True)
    assert (await service.engine.authorize(ask(other, request_id="while-2"))).reason == "rate_limit_exceeded"
    service.engine.clock = lambda: now + 61_000  # past it: the plan's limits alone
    assert (await service.engine.authorize(ask(secret, request_id="after-1"))).decision == "allow"
    assert (await service.engine.authorize(ask(other, request_id="after-2"))).decision == "allow"
    with pytest.raises(PolicydError) as error:
        await service.admin.set_limits(key_id, [{"window": "month", "unit": "money", "limit": 1,
                                                 "until_unix_ms": now - 1}])
    assert error.value.reason == "invalid_limit"
    doc = yaml.safe_load(SAMPLE_POLICY)
    doc["plans"]["pro"]["limits"][0]["until_unix_ms"] = now + 60_000
    with pytest.raises(PolicydError) as error:
        await service.admin.apply_policy(yaml.safe_dump(doc), "until.yaml")
    assert error.value.reason == "invalid_policy" and "until_unix_ms" in str(error.value)


async def test_an_owners_limits_bind_every_key_of_theirs(service: Service) -> None:
    """Admin.set_owner_limits: a customer's limits bind its every key together, one made later too, and a replica
    still holding a key's old terms; a workspace's bind its keys alone; another customer is not bound; an owner's
    limit of a plan's bucket replaces the plan's (the pro plan's customer day budget, which would downgrade: now
    refused), keeping what the bucket counted; none: the plans' alone again; bad calls are refused."""
    from policyd import keys as key_secrets
    from policyd.domain import PolicydError

    first_id, first = await new_key(service, plan="free", customer="owned")
    _, second = await new_key(service, plan="free", customer="owned")
    await new_key(service, plan="free", customer="owned", workspace_id="w1")
    _, stranger = await new_key(service, plan="free", customer="stranger")
    for customer in ("owned", "stranger"):
        await fund(service, customer, "10")
    held = await service.engine.directory.resolve(key_secrets.hash_secret(second))  # another replica's copy

    row, changed = await service.admin.set_owner_limits([{"window": "minute", "unit": "requests", "limit": 3}], "owned")
    assert (row.scope, row.owner_id, changed) == ("customer", "", 3)
    service.engine.directory.remember(key_secrets.hash_secret(second), held)
    _, later = await new_key(service, plan="free", customer="owned")
    decisions = [await service.engine.authorize(ask(secret, prompt_bytes=10, max_output_tokens=5))
                 for secret in (first, second, first, later, second)]
    assert [d.decision for d in decisions] == ["allow", "allow", "allow", "deny", "deny"]
    assert (decisions[3].reason, decisions[3].message.endswith("(customer-requests-minute)")) == \
        ("rate_limit_exceeded", True)
    assert all([(await service.engine.authorize(ask(stranger, prompt_bytes=10, max_output_tokens=5))).decision
                == "allow" for _ in range(4)])
    assert (await service.admin.get_key(first_id)).owner_limits == [
        {"window": "minute", "unit": "requests", "limit": 3, "timezone": "", "scope": "customer"}]
    review = await service.admin.review_key(first_id)
    assert {(b["label"], b["used"]) for b in review["buckets"]} >= {("customer-requests-minute", 3)}

    _, in_w2 = await new_key(service, plan="free", customer="split", workspace_id="w2")
    _, in_w3 = await new_key(service, plan="free", customer="split", workspace_id="w3")
    await fund(service, "split", "10")
    await service.admin.set_owner_limits([{"window": "day", "unit": "money", "limit": 1}], "split", workspace_id="w2")
    refused = await service.engine.authorize(ask(in_w2, prompt_bytes=10, max_output_tokens=5, request_id="w2-day"))
    assert (refused.reason, refused.message.endswith("(workspace-money-day)")) == ("budget_exceeded", True)
    assert (await service.engine.authorize(ask(in_w3, prompt_bytes=10, max_output_tokens=5))).decision == "allow"

    _, pro = await new_key(service, plan="pro", customer="premium")
    await fund(service, "premium", "10")
    spent = await service.engine.authorize(ask(pro, model="gpt-4o", prompt_bytes=10, max_output_tokens=5))
    assert spent.decision == "allow"  # counted in the plan's customer day bucket (premium-day)
    await service.admin.set_owner_limits([{"window": "day", "unit": "money", "limit": spent.reserved + 1}],
                                         "premium")
    over = await service.engine.authorize(ask(pro, model="gpt-4o", prompt_bytes=10, max_output_tokens=5))
    assert (over.decision, over.reason, over.message.endswith("(customer-money-day)")) == \
        ("deny", "budget_exceeded", True)  # the plan's would have downgraded; the bucket kept what it counted

    await service.admin.set_owner_limits([], "owned")
    assert await service.admin.owner_limits("owned") == []
    assert (await service.admin.get_key(first_id)).owner_limits == []
    assert (await service.engine.authorize(ask(later, prompt_bytes=10, max_output_tokens=5))).decision == "allow"
    listed = await service.admin.owner_limits("split")
    assert [(r.scope, r.owner_id, r.limits[0]["limit"]) for r in listed] == [("workspace", "w2", 1)]
    assert [(r.customer_id, r.scope) for r in await service.admin.owner_limits()] == [
        ("premium", "customer"), ("split", "workspace")]  # every customer's ("owned" has none now)
    allowed_in_w3 = (await service.admin.owner_limit_states(listed[0]))[0]
    assert (allowed_in_w3["limit"].label, allowed_in_w3["used"], allowed_in_w3["ends"] > 0) == (
        "workspace-money-day", 0, True)  # w2's bucket: w3's request is not in it, w2's was refused
    premium = (await service.admin.owner_limit_states((await service.admin.owner_limits("premium"))[0]))[0]
    assert premium["used"] == spent.reserved  # the bucket the plan's limit counted in

    for limits, owner, reason in (([], {"customer_id": ""}, "invalid_request"),
                                  ([], {"customer_id": "owned", "workspace_id": "w", "team_id": "t"}, "invalid_request"),
                                  ([], {"customer_id": "owned", "team_id": "a b"}, "invalid_request"),
                                  ([{"window": "week", "unit": "money", "limit": 1}], {"customer_id": "owned"},
                                   "invalid_limit"),
                                  ([{"window": "day", "unit": "money", "limit": -1}], {"customer_id": "owned"},
                                   "invalid_limit")):
        with pytest.raises(PolicydError) as error:
            await service.admin.set_owner_limits(limits, **owner)
        assert error.value.reason == reason
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    assert service.store.usage_record("w2-day").reason == "budget_exceeded"


async def test_an_owners_budget_set_mid_window_counts_what_was_used_before_it(service: Service) -> None:
    """An owner's money or request limit whose bucket no plan counted in yet starts from what the owner had used in
    its window before (settled charges less refunds, open holds; requests settled or open), not from nothing: a
    budget set mid-month counts the month's spend. The audit and a rebuild agree (the seed is kept with the
    limit); taken off, the bucket holds what its records imply again."""
    from tests.helpers import usage

    _, first = await new_key(service, plan="free", customer="midmonth")
    _, second = await new_key(service, plan="free", customer="midmonth")
    await fund(service, "midmonth", "10")
    spent = 0
    for n, secret in enumerate((first, second, first)):
        assert (await service.engine.authorize(ask(secret, request_id=f"mid-{n}"))).decision == "allow"
        spent += (await service.engine.settle(usage(f"mid-{n}"))).charge
    released = await service.engine.authorize(ask(first, request_id="mid-released"))
    await service.engine.release("mid-released", "upstream_503")  # holds nothing
    held = await service.engine.authorize(ask(second, request_id="mid-open"))  # open: holds its worst case
    await service.engine.authorize(ask("pdk_live_" + "Q" * 40))  # denied: nothing
    budget = spent + held.reserved + held.reserved + held.reserved // 2  # one more hold fits, a second does not
    row, _ = await service.admin.set_owner_limits([{"window": "month", "unit": "money", "limit": budget},
                                                   {"window": "day", "unit": "requests", "limit": 6}], "midmonth")
    assert sorted(row.seeds.values()) == [4, spent + held.reserved] and released.reserved > 0
    states = {s["limit"].unit: s["used"] for s in await service.admin.owner_limit_states(row)}
    assert states == {"money": spent + held.reserved, "requests": 4}
    assert (await service.engine.authorize(ask(first, request_id="mid-next"))).decision == "allow"
    refused = await service.engine.authorize(ask(first, request_id="mid-over"))
    assert (refused.reason, refused.message.endswith("(customer-money-month)")) == ("budget_exceeded", True)
    await service.engine.settle(usage("mid-open"))
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok
    again = {s["limit"].unit: s["used"] for s in await service.admin.owner_limit_states(row)}
    assert again["money"] > spent and again["requests"] == 5  # the seed and the requests after it
    assert (await service.engine.authorize(ask(second, request_id="mid-after"))).reason == "budget_exceeded"
    await service.admin.set_owner_limits([], "midmonth")  # taken off: the bucket holds what its records imply
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    (bucket,) = [k async for k in service.counters.client.scan_iter(match="*:b:customer:midmonth:money:month*")]
    bucket = bucket.decode() if isinstance(bucket, bytes) else bucket
    assert int(await service.counters.client.hget(bucket, "used")) == service.store.held_by_bucket()[bucket] > 0


async def test_questions_about_a_key_refused_for_their_key_are_recorded(service: Service) -> None:
    """GET /v1/key, /v1/models, /v1/requests[/{id}] with a key that cannot be used: refused as a model call would
    be, and recorded as every refusal is (a paused key's as its customer's), nothing moved; a question that
    found nothing (request_not_found) is not a refusal of the key and leaves no record among the customer's."""
    key_id, secret = await new_key(service, customer="asker")
    await fund(service, "asker", "1")
    await service.admin.set_state(key_id, "paused")
    refusals = [(await service.engine.key_summary(secret))[1],
                (await service.engine.models_for("pdk_live_" + "Q" * 40))[1],
                (await service.engine.describe_request("", "req_1"))[1],
                (await service.engine.list_requests("not-a-key", 5))[1]]
    assert [d.reason for d in refusals] == ["key_paused", "invalid_api_key", "missing_api_key", "malformed_api_key"]
    await service.admin.set_state(key_id, "active")
    assert (await service.engine.describe_request(secret, "never-made"))[1].reason == "request_not_found"
    assert (await service.engine.list_requests(secret, 5, "never-made"))[1].error_param == "after"
    await service.writer.drain()
    for denial in refusals:
        row = service.store.usage_record(denial.request_id)
        assert (row.decision, row.reason, row.charge_nanos, row.endpoint) == ("deny", denial.reason, 0, "")
    assert [r.reason for r in service.store.latest_usage("asker", 10)] == ["key_paused"]
    assert await service.counters.wallet("asker") == (1_000_000_000, 0)


async def test_a_threads_budget_set_by_its_caller(service: Service) -> None:
    """AuthorizeInput.thread_budget: the thread's requests that name it hold their worst case in the thread's one
    total, beside the wallet and the plan's limits; a request that would take it past the budget is refused
    (budget_exceeded); a settled request counts its charge; another thread is not bound; the audit agrees; a
    budget in another currency, or with no thread, is refused (invalid_request)."""
    from dataclasses import replace

    from policyd.domain import PolicydError
    from tests.helpers import usage

    _, secret = await new_key(service, customer="runner")
    await fund(service, "runner", "10")

    def step(request_id: str, budget: int, thread: str = "run-1", currency: str = "") -> object:
        return replace(ask(secret, request_id=request_id, thread_id=thread, prompt_bytes=40, max_output_tokens=20),
                       thread_budget=budget, thread_budget_currency=currency)

    first = await service.engine.authorize(step("tb-1", 10**9))
    assert first.decision == "allow"
    budget = 2 * first.reserved + first.reserved // 2  # two holds fit, a third does not
    second = await service.engine.authorize(step("tb-2", budget))
    third = await service.engine.authorize(step("tb-3", budget))
    assert (second.decision, third.decision, third.reason, third.http_status) == ("allow", "deny", "budget_exceeded", 429)
    (left,) = [r for r in second.rate_limits if r.unit == "thread_budget"]  # what the budget leaves once it is held
    assert (left.limit, left.remaining, left.resets_ms) == (budget, budget - first.reserved - second.reserved, 0)
    assert third.message.endswith("(thread-budget)")
    assert (await service.engine.authorize(step("tb-other", budget, thread="run-2"))).decision == "allow"
    settled = await service.engine.settle(usage("tb-1", input_tokens=5, output_tokens=2))  # charged less than held
    fourth = await service.engine.authorize(step("tb-4", budget))
    assert fourth.decision == "allow" and settled.charge < first.reserved  # the room the settle gave back
    for bad in (step("tb-eur", budget, currency="EUR"), step("tb-nothread", budget, thread="")):
        refused = await service.engine.authorize(bad)
        assert (refused.reason, refused.error_param) == ("invalid_request", "thread_budget"), refused
    with pytest.raises(PolicydError):  # nothing to settle: refused before any hold
        await service.engine.settle(usage("tb-eur"))
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    assert service.store.usage_record("tb-3").reason == "budget_exceeded"
    # Redis loses its data: the rebuild from the records gives the thread's total back, so the budget still binds
    await counters_lost_and_rebuilt(service)
    assert (await service.admin.audit()).ok
    assert (await service.engine.authorize(step("tb-5", budget))).reason == "budget_exceeded"
    # kept THREAD_BUDGET_IDLE_SECONDS after the thread's last request (each renews it), then forgotten: the audit
    # passes over it, and the run taken up again starts its budget anew
    from policyd.quotas import THREAD_BUDGET_IDLE_SECONDS

    def bucket(thread: str) -> Any:
        return service.counters.client.scan_iter(match=f"*:b:thread_budget:runner/{thread}:*")

    (other,) = [key async for key in bucket("run-2")]
    await service.counters.client.expire(other, 5)
    assert (await service.engine.authorize(step("tb-6", budget, thread="run-2"))).decision == "allow"
    assert THREAD_BUDGET_IDLE_SECONDS - 5 < await service.counters.client.ttl(other) <= THREAD_BUDGET_IDLE_SECONDS
    (spent,) = [key async for key in bucket("run-1")]
    assert 0 < await service.counters.client.ttl(spent) <= THREAD_BUDGET_IDLE_SECONDS  # written again so too
    await service.counters.client.delete(spent)  # its idle time ran out
    await service.writer.drain()
    assert (await service.admin.audit()).ok
    assert (await service.engine.authorize(step("tb-7", budget))).decision == "allow"


async def test_a_caller_bounds_what_one_request_may_hold(service: Service) -> None:
    """AuthorizeInput.max_charge: a request whose hold passes it is refused (request_too_costly) and recorded,
    nothing held; one within it is held as ever; in another currency, or not more than 0: invalid_request."""
    from dataclasses import replace

    _, secret = await new_key(service, customer="bounded")
    await fund(service, "bounded", "10")
    plain = await service.engine.authorize(ask(secret, request_id="mc-plain", max_output_tokens=2000))
    assert plain.decision == "allow"
    over = await service.engine.authorize(replace(ask(secret, request_id="mc-over", max_output_tokens=2000),
                                                  max_charge=plain.reserved - 1))
    assert (over.reason, over.http_status, over.error_param) == ("request_too_costly", 400, "max_completion_tokens")
    within = await service.engine.authorize(replace(ask(secret, request_id="mc-within", max_output_tokens=2000),
                                                    max_charge=plain.reserved))
    assert within.decision == "allow" and within.reserved == plain.reserved
    for bad, param in ((replace(ask(secret, request_id="mc-eur"), max_charge=10**9, max_charge_currency="EUR"),
                        "max_charge"), (replace(ask(secret, request_id="mc-neg"), max_charge=-1), "max_charge")):
        refused = await service.engine.authorize(bad)
        assert (refused.reason, refused.error_param) == ("invalid_request", param), refused
    await service.writer.drain()
    assert service.store.usage_record("mc-over").reason == "request_too_costly"
    assert (await service.counters.wallet("bounded"))[1] == plain.reserved + within.reserved


async def test_a_keys_models_narrow_and_widen_back_from_the_next_decision(service: Service) -> None:
    from policyd import keys as key_secrets
    from policyd.domain import PolicydError

    key_id, secret = await new_key(service, customer="narrowed")
    await fund(service, "narrowed", "10")
    held = await service.engine.directory.resolve(key_secrets.hash_secret(secret))  # another replica's copy
    row = await service.admin.set_scopes(key_id, ["gpt-4o-mini", "gpt-4o-mini"])
    assert row.scopes == ["gpt-4o-mini"]
    service.engine.directory.remember(key_secrets.hash_secret(secret), held)
    assert (await service.engine.authorize(ask(secret, model="gpt-4o"))).reason == "model_not_allowed"
    assert [m for m, _ in (await service.engine.models_for(secret))[0]] == ["gpt-4o-mini"]
    await service.admin.set_scopes(key_id, [])
    assert (await service.engine.authorize(ask(secret, model="gpt-4o"))).decision == "allow"
    with pytest.raises(PolicydError) as error:
        await service.admin.set_scopes(key_id, [""])
    assert error.value.reason == "invalid_request"
