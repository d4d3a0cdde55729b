"""Scoped admin credentials: a reseller's credential manages itself and its sub-customers, and every
AdminService call across the boundary fails without revealing or changing anything."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

import grpc
import pytest

from policyd.server import Service, make_grpc_server
from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc, types_pb2
from tests.conftest import SAMPLE_POLICY, make_settings

OPERATOR_TOKEN = "operator-token-for-scope-tests"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


OPERATOR = bearer(OPERATOR_TOKEN)


class World:
    """reseller (with sub-customer sub1) and an unrelated customer other, each with a key and credit."""

    def __init__(self, admin: Any, policy: Any) -> None:
        self.admin = admin
        self.policy = policy

    async def build(self) -> "World":
        a = self.admin
        await a.ApplyPolicy(admin_pb2.ApplyPolicyRequest(yaml=SAMPLE_POLICY), metadata=OPERATOR)
        await a.LinkCustomer(admin_pb2.LinkCustomerRequest(customer_id="sub1", parent_id="reseller"), metadata=OPERATOR)
        self.keys = {}
        for customer in ("reseller", "sub1", "other"):
            await a.GrantCredit(admin_pb2.GrantCreditRequest(customer_id=customer, source="purchase", amount=types_pb2.Money(
                currency="USD", nanos=10**9)), metadata=OPERATOR)
            created = await a.CreateKey(admin_pb2.CreateKeyRequest(customer_id=customer, plan="pro",
                                                                   environment="production"), metadata=OPERATOR)
            self.keys[customer] = created
        reseller = await a.CreateAdminCredential(admin_pb2.CreateAdminCredentialRequest(customer_id="reseller",
                                                                                       label="reseller portal"), metadata=OPERATOR)
        other = await a.CreateAdminCredential(admin_pb2.CreateAdminCredentialRequest(customer_id="other"), metadata=OPERATOR)
        self.reseller, self.reseller_id = bearer(reseller.secret), reseller.credential.id
        self.other, self.other_id = bearer(other.secret), other.credential.id
        assert reseller.secret.startswith("pdadm_") and len(reseller.secret) == 46
        sub = await a.CreateAdminCredential(admin_pb2.CreateAdminCredentialRequest(customer_id="sub1"), metadata=self.reseller)
        self.sub = bearer(sub.secret)
        return self


@pytest.fixture
async def world(backend: dict[str, str]) -> AsyncIterator[World]:
    service = await Service.build(make_settings(backend, admin_token=OPERATOR_TOKEN))
    await service.start()
    server, _ = make_grpc_server(service)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield await World(admin_pb2_grpc.AdminServiceStub(channel), policy_pb2_grpc.PolicyServiceStub(channel)).build()
    await server.stop(grace=1)
    await service.close()


def cross_boundary_calls(w: World) -> dict[str, Any]:
    """One request per AdminService method that reaches outside the reseller's scope (or is operator-only)."""
    other_key = w.keys["other"].key.id
    now = int(time.time() * 1000)
    return {
        "CreateKey": admin_pb2.CreateKeyRequest(customer_id="other", plan="pro", environment="production"),
        "ListKeys": admin_pb2.ListKeysRequest(customer_id="other"),
        "GetKey": admin_pb2.GetKeyRequest(id=other_key),
        "PauseKey": admin_pb2.KeyActionRequest(id=other_key),
        "ResumeKey": admin_pb2.KeyActionRequest(id=other_key),
        "RevokeKey": admin_pb2.KeyActionRequest(id=other_key),
        "RotateKey": admin_pb2.RotateKeyRequest(id=other_key),
        "SetKeyExpiry": admin_pb2.SetKeyExpiryRequest(id=other_key, expires_unix_ms=now + 60_000),
        "SetPlan": admin_pb2.SetPlanRequest(customer_id="reseller", plan="free"),  # plans are the operator's
        "SetKeyLimits": admin_pb2.SetKeyLimitsRequest(id=other_key, limits=[admin_pb2.KeyLimit(
            window="day", unit="money", limit=1)]),
        "SetKeyScopes": admin_pb2.SetKeyScopesRequest(id=other_key, scopes=["gpt-4o-mini"]),
        "SetOwnerLimits": admin_pb2.SetOwnerLimitsRequest(customer_id="other", limits=[admin_pb2.KeyLimit(
            window="day", unit="money", limit=1)]),
        "ListOwnerLimits": admin_pb2.ListOwnerLimitsRequest(customer_id="other"),
        "SetEndUserPaused": admin_pb2.SetEndUserPausedRequest(customer_id="other", end_user_id="eve", paused=False),
        "ResetLimits": admin_pb2.ResetLimitsRequest(key_id=other_key),
        "ApplyPolicy": admin_pb2.ApplyPolicyRequest(yaml=SAMPLE_POLICY),
        "GetPolicy": admin_pb2.GetPolicyRequest(),
        "GrantCredit": admin_pb2.GrantCreditRequest(customer_id="reseller", source="purchase",
                                                    amount=types_pb2.Money(currency="USD", nanos=10**9)),
        "GetWallet": admin_pb2.GetWalletRequest(customer_id="other"),
        "RefundUsage": admin_pb2.RefundUsageRequest(request_id="other-request"),  # credit is the operator's
        "ListUsage": admin_pb2.ListUsageRequest(customer_id="other"),
        "UsageReport": admin_pb2.UsageReportRequest(group_by=["customer"], since_unix_ms=now - 86_400_000,
                                                    until_unix_ms=now + 1, customer_id="other"),
        "ReviewKey": admin_pb2.GetKeyRequest(id=other_key),
        "ExportInvoice": admin_pb2.InvoiceRequest(customer_id="other", period=time.strftime("%Y-%m", time.gmtime())),
        "ClosePeriod": admin_pb2.InvoiceRequest(customer_id="reseller", period="2026-01"),
        "Reconcile": admin_pb2.ReconcileRequest(provider="openai", export=b"date,model,amount\n"),
        "ListCaps": admin_pb2.ListCapsRequest(),
        "ResetCap": admin_pb2.ResetCapRequest(name="openai-day"),  # the operator's caps bind every customer
        "ListEvents": admin_pb2.ListEventsRequest(customer_id="other"),  # the operator's
        "Audit": admin_pb2.AuditRequest(),
        "Rebuild": admin_pb2.RebuildRequest(),
        "CreateAdminCredential": admin_pb2.CreateAdminCredentialRequest(customer_id="other"),
        "ListAdminCredentials": admin_pb2.ListAdminCredentialsRequest(customer_id="other"),
        "RevokeAdminCredential": admin_pb2.RevokeAdminCredentialRequest(id=w.other_id),
        "LinkCustomer": admin_pb2.LinkCustomerRequest(customer_id="other", parent_id="reseller"),
    }


async def test_every_admin_call_across_the_boundary_is_refused(world: World) -> None:
    w = world
    calls = cross_boundary_calls(w)
    methods = {m.name for m in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods}
    assert set(calls) == methods, "every AdminService method must be tried across the boundary"
    before = await w.admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="other"), metadata=OPERATOR)
    for method, request in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(w.admin, method)(request, metadata=w.reseller)
        code = refused.value.code()
        reason = dict(refused.value.trailing_metadata() or ()).get("policyd-reason")
        assert (code, reason) in ((grpc.StatusCode.PERMISSION_DENIED, "out_of_scope"),
                                  (grpc.StatusCode.NOT_FOUND, "unknown_key"),
                                  (grpc.StatusCode.NOT_FOUND, "unknown_credential")), (method, code, reason)
        assert "other" not in (refused.value.details() or "").replace("'other'", "") or method in (
            "CreateKey", "ListKeys", "GetWallet", "ListUsage", "UsageReport", "ExportInvoice",
            "CreateAdminCredential", "ListAdminCredentials", "LinkCustomer", "SetOwnerLimits",
            "ListOwnerLimits", "SetEndUserPaused")  # only the name the caller gave
    # a key of another customer is reported exactly like a key that does not exist
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await w.admin.GetKey(admin_pb2.GetKeyRequest(id="key_0000000000000000"), metadata=w.reseller)
    with pytest.raises(grpc.aio.AioRpcError) as foreign:
        await w.admin.GetKey(admin_pb2.GetKeyRequest(id=w.keys["other"].key.id), metadata=w.reseller)
    assert missing.value.code() == foreign.value.code() == grpc.StatusCode.NOT_FOUND
    assert missing.value.details().replace("key_0000000000000000", "X") == \
        foreign.value.details().replace(w.keys["other"].key.id, "X")
    # nothing of the other customer changed
    key = await w.admin.GetKey(admin_pb2.GetKeyRequest(id=w.keys["other"].key.id), metadata=OPERATOR)
    assert key.state == admin_pb2.ACTIVE
    after = await w.admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="other"), metadata=OPERATOR)
    assert after == before
    decision = await w.policy.Authorize(policy_pb2.AuthorizeRequest(
        api_key=w.keys["other"].secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini"))
    assert decision.decision == policy_pb2.ALLOW
    still = await w.admin.ListAdminCredentials(admin_pb2.ListAdminCredentialsRequest(customer_id="other"), metadata=w.other)
    assert [c.revoked_unix_ms for c in still.credentials] == [0]


async def test_a_reseller_manages_itself_and_its_sub_customers(world: World) -> None:
    w = world
    listed = await w.admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=w.reseller)
    assert {k.owner.customer_id for k in listed.keys} == {"reseller", "sub1"}
    created = await w.admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="sub1", plan="pro", environment="production"),
                                      metadata=w.reseller)
    paused = await w.admin.PauseKey(admin_pb2.KeyActionRequest(id=created.key.id), metadata=w.reseller)
    assert paused.state == admin_pb2.PAUSED
    denied = await w.policy.Authorize(policy_pb2.AuthorizeRequest(
        api_key=created.secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini"))
    assert denied.reason == "key_paused"
    wallet = await w.admin.GetWallet(admin_pb2.GetWalletRequest(customer_id="sub1"), metadata=w.reseller)
    assert wallet.balance_nanos == 10**9
    own = await w.admin.ListUsage(admin_pb2.ListUsageRequest(), metadata=w.reseller)  # its own, by default
    assert {r.owner.customer_id for r in own.records} <= {"reseller"}
    # a brand-new customer may be brought in under the reseller; a known one may not
    await w.admin.LinkCustomer(admin_pb2.LinkCustomerRequest(customer_id="newco", parent_id="sub1"), metadata=w.reseller)
    await w.admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id="newco", plan="pro", environment="production"),
                            metadata=w.reseller)
    creds = await w.admin.ListAdminCredentials(admin_pb2.ListAdminCredentialsRequest(), metadata=w.reseller)
    assert {c.customer_id for c in creds.credentials} == {"reseller", "sub1"}
    # it gives its sub-customers limits (their keys bound), never its own customer, whose plan the operator chose
    # (a day's: a minute's window could end between two requests of a loaded machine)
    budget = admin_pb2.KeyLimit(window="day", unit="requests", limit=1)
    given = await w.admin.SetOwnerLimits(admin_pb2.SetOwnerLimitsRequest(customer_id="sub1", limits=[budget]),
                                         metadata=w.reseller)
    assert (given.scope, given.keys_changed) == ("customer", 2)
    bound = [await w.policy.Authorize(policy_pb2.AuthorizeRequest(
        api_key=w.keys["sub1"].secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini")) for _ in range(2)]
    assert [d.reason for d in bound] == ["", "rate_limit_exceeded"]
    listed = await w.admin.ListOwnerLimits(admin_pb2.ListOwnerLimitsRequest(customer_id="sub1"), metadata=w.sub)
    budget.scope = "customer"
    assert [(o.customer_id, list(o.limits)) for o in listed.owners] == [("sub1", [budget])]
    # and resets their limits' windows (the sub-customer served again), never its own customer's
    await w.policy.Settle(policy_pb2.SettleRequest(request_id=bound[0].request_id, usage=policy_pb2.Usage(
        input_tokens=10, output_tokens=5)))
    reset = await w.admin.ResetLimits(admin_pb2.ResetLimitsRequest(customer_id="sub1", window="day",
                                                                 name="customer-requests-day"),
                                      metadata=w.reseller)
    assert [(r.limit.name, r.forgiven, r.limit.used) for r in reset.limits] == [("customer-requests-day", 1, 0)]
    assert (await w.policy.Authorize(policy_pb2.AuthorizeRequest(
        api_key=w.keys["sub1"].secret, endpoint=types_pb2.CHAT_COMPLETIONS, model="gpt-4o-mini"))).decision == \
        policy_pb2.ALLOW
    for whose, credential in (("reseller", w.reseller), ("sub1", w.sub)):
        for call, request in (("SetOwnerLimits", admin_pb2.SetOwnerLimitsRequest(customer_id=whose, limits=[])),
                              ("SetEndUserPaused", admin_pb2.SetEndUserPausedRequest(customer_id=whose,
                                                                                     end_user_id="eve")),
                              ("ResetLimits", admin_pb2.ResetLimitsRequest(customer_id=whose)),
                              ("ResetLimits", admin_pb2.ResetLimitsRequest(key_id=w.keys[whose].key.id))):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await getattr(w.admin, call)(request, metadata=credential)
            assert (refused.value.code(), dict(refused.value.trailing_metadata())["policyd-reason"]) == \
                (grpc.StatusCode.PERMISSION_DENIED, "out_of_scope"), (call, whose)
    assert all(not c.prefix.endswith(c.id) and len(c.prefix) == 10 for c in creds.credentials)

    # the sub-customer cannot reach up to its reseller
    for call, request in (("GetWallet", admin_pb2.GetWalletRequest(customer_id="reseller")),
                          ("ListKeys", admin_pb2.ListKeysRequest(customer_id="reseller")),
                          ("PauseKey", admin_pb2.KeyActionRequest(id=w.keys["reseller"].key.id))):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await getattr(w.admin, call)(request, metadata=w.sub)
        assert refused.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)

    # revoking a credential shuts it out at once
    await w.admin.RevokeAdminCredential(admin_pb2.RevokeAdminCredentialRequest(id=w.reseller_id), metadata=OPERATOR)
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await w.admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=w.reseller)
    assert gone.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for token in ("pdadm_" + "A" * 40, "pdadm_short", ""):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await w.admin.ListKeys(admin_pb2.ListKeysRequest(), metadata=bearer(token))
        assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_keys_are_listed_a_page_at_a_time_within_the_callers_scope(world: World) -> None:
    """ListKeys pages keys oldest first (a deployment may hold a million): every key once whatever the page size,
    a scoped credential's pages holding its customers' alone (read so, not filtered from every customer's); a
    page token no listing gave is refused."""
    w = world
    for n in range(4):
        for customer in ("sub1", "other"):
            await w.admin.CreateKey(admin_pb2.CreateKeyRequest(customer_id=customer, plan="pro",
                                                               environment="production", label=f"k{n}"),
                                    metadata=OPERATOR)

    async def every(size: int, credential: Any, customer_id: str = "") -> tuple[list[str], int]:
        asked = admin_pb2.ListKeysRequest(customer_id=customer_id, limit=size)
        ids, pages = [], 0
        while True:
            page = await w.admin.ListKeys(asked, metadata=credential)
            assert len(page.keys) <= size
            ids += [(k.owner.customer_id, k.id) for k in page.keys]
            pages += 1
            if not page.next_page_token:
                return ids, pages
            asked.page_token = page.next_page_token

    everything, _ = await every(1000, OPERATOR)
    assert len(everything) == 11 and len(set(everything)) == 11
    for size in (1, 2, 5, 11):
        assert await every(size, OPERATOR) == (everything, -(-11 // size))
    theirs = [k for k in everything if k[0] in ("reseller", "sub1")]
    assert await every(2, w.reseller) == (theirs, 3)  # reseller's 1 and sub1's 5
    assert await every(3, w.reseller, "sub1") == ([k for k in everything if k[0] == "sub1"], 2)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await w.admin.ListKeys(admin_pb2.ListKeysRequest(page_token="not-one"), metadata=OPERATOR)
    assert (refused.value.code(), dict(refused.value.trailing_metadata())["policyd-reason"]) == (
        grpc.StatusCode.INVALID_ARGUMENT, "invalid_request")


async def test_admin_credentials_are_listed_a_page_at_a_time(world: World) -> None:
    """ListAdminCredentials pages (oldest first; limit and page_token): every credential the caller may see once,
    a scoped credential's pages holding its own customers' alone; a token no listing gave is refused."""
    w = world
    for n in range(3):
        await w.admin.CreateAdminCredential(admin_pb2.CreateAdminCredentialRequest(customer_id="sub1", label=f"c{n}"),
                                            metadata=OPERATOR)
    everything = (await w.admin.ListAdminCredentials(admin_pb2.ListAdminCredentialsRequest(),
                                                     metadata=OPERATOR)).credentials
    assert len(everything) == 6
    for caller in (OPERATOR, w.reseller):
        seen, token, pages = [], "", 0
        while True:
            page = await w.admin.ListAdminCredentials(
                admin_pb2.ListAdminCredentialsRequest(limit=2, page_token=token), metadata=caller)
            assert len(page.credentials) <= 2
            seen, token, pages = seen + [c.id for c in page.credentials], page.next_page_token, pages + 1
            if not token:
                break
        expected = [c.id for c in everything if caller is OPERATOR or c.customer_id in ("reseller", "sub1")]
        assert seen == expected and pages == (len(expected) + 1) // 2
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await w.admin.ListAdminCredentials(admin_pb2.ListAdminCredentialsRequest(page_token="nope"),
                                           metadata=OPERATOR)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
