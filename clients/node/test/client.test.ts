// The client against a live policyd. The caller (tests/test_client_packages.py) starts policyd and
// passes POLICYD_ADDRESS and POLICYD_TEST_KEY: a key of customer POLICYD_TEST_CUSTOMER on the sample
// "free" plan (gpt-4o-mini allowed, gpt-4o not) with credit.
import { test } from "node:test";
import * as assert from "node:assert/strict";
import * as grpc from "@grpc/grpc-js";

import { loadContract, PolicyClient, PolicydCallError } from "../src/index";

const address = process.env.POLICYD_ADDRESS ?? "";
const apiKey = process.env.POLICYD_TEST_KEY ?? "";
const customer = process.env.POLICYD_TEST_CUSTOMER ?? "";
assert.ok(address && apiKey && customer, "POLICYD_ADDRESS, POLICYD_TEST_KEY and POLICYD_TEST_CUSTOMER must be set");

function walletNanos(): Promise<bigint> {
  const contract = loadContract();
  const admin = new contract.policyd.v1.AdminService(address, grpc.credentials.createInsecure());
  return new Promise((resolve, reject) =>
    admin.GetWallet({ customerId: customer }, (error: Error | null, wallet: any) => {
      admin.close();
      error ? reject(error) : resolve(BigInt(wallet.balanceNanos));
    }));
}

test("authorize then settle charges exactly once, in integer nanos", async () => {
  const policy = new PolicyClient(address);
  try {
    const before = await walletNanos();
    const d = await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o-mini", requestId: "node-1",
                                       promptBytes: 400, attribution: { feature: "node-tests", threadId: "t-node" } });
    assert.equal(d.allowed, true);
    assert.equal(d.decision, "allow");
    assert.equal(d.servedModel, "gpt-4o-mini");
    assert.equal(d.upstreamModel, "gpt-4o-mini");
    assert.equal(d.outputCapField, "max_completion_tokens");
    assert.ok(d.reservedNanos > 0n);
    const s = await policy.settle("node-1", { inputTokens: 120, outputTokens: 40 });
    assert.equal(s.outcome, "settled");
    assert.ok(s.chargeNanos > 0n);
    assert.equal(s.balanceBeforeNanos - s.chargeNanos, s.balanceAfterNanos);
    assert.equal(await walletNanos(), before - s.chargeNanos);
    const again = await policy.settle("node-1", { inputTokens: 120, outputTokens: 40 });
    assert.equal(again.outcome, "exists");
    assert.equal(again.chargeNanos, s.chargeNanos);
    assert.equal(await walletNanos(), before - s.chargeNanos);
    await assert.rejects(policy.settle("node-1", { inputTokens: 121, outputTokens: 40 }),
      (e: unknown) => e instanceof PolicydCallError && e.reason === "exists_with_different_usage");
  } finally {
    policy.close();
  }
});

test("the request's shape reaches policyd: a tier asked for is priced or refused, an implied one never refused", async () => {
  const policy = new PolicyClient(address);
  try {
    const flex = await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o-mini", serviceTier: "flex" });
    assert.equal(flex.allowed, false);
    assert.equal(flex.reason, "service_tier_not_priced");
    const implied = await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o-mini",
                                             requestId: "node-implied", serviceTier: "priority", serviceTierImplied: true });
    assert.equal(implied.allowed, true);
    assert.equal(await policy.release("node-implied", "provider_error"), "released");
    // a router's web search: a model whose cost is not the router's to say refuses it
    for (const shape of [{ webResults: 5, webSearches: 1 }, { webResultsPerSearch: 5 }]) {
      const searched = await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o-mini", ...shape });
      assert.equal(searched.allowed, false);
      assert.equal(searched.reason, "tool_not_priced");
    }
  } finally {
    policy.close();
  }
});

test("deny paths answer with the HTTP status and an OpenAI-style error body", async () => {
  const policy = new PolicyClient(address);
  try {
    const before = await walletNanos();
    const model = await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o" });
    assert.equal(model.allowed, false);
    assert.equal(model.httpStatus, 403);
    assert.equal(JSON.parse(model.errorBody()).error.code, "model_not_allowed");
    const key = await policy.authorize({ apiKey: "pdk_live_" + "x".repeat(40), endpoint: "chat_completions", model: "gpt-4o-mini" });
    assert.equal(key.allowed, false);
    assert.equal(key.httpStatus, 401);
    assert.equal(key.reason, "invalid_api_key");
    assert.equal(await walletNanos(), before);
    await assert.rejects(policy.authorize({ apiKey, endpoint: "telepathy" as never, model: "gpt-4o-mini" }), TypeError);
  } finally {
    policy.close();
  }
});

test("a thread's budget, and a request's own bound, refuse the request that would pass them", async () => {
  const policy = new PolicyClient(address);
  try {
    const input = { apiKey, endpoint: "chat_completions" as const, model: "gpt-4o-mini", promptBytes: 80,
                    attribution: { threadId: "node-run" } };
    const first = await policy.authorize({ ...input, requestId: "node-run-1", threadBudgetNanos: 10_000_000n });
    assert.equal(first.allowed, true);
    const tight = await policy.authorize({ ...input, requestId: "node-run-2", threadBudgetNanos: first.reservedNanos });
    assert.equal(tight.allowed, false);  // the first one's hold already takes the whole budget
    assert.equal(tight.reason, "budget_exceeded");
    await policy.release("node-run-1");
    const dear = await policy.authorize({ ...input, requestId: "node-dear", maxChargeNanos: 1n });  // one nano
    assert.equal(dear.allowed, false);
    assert.equal(dear.reason, "request_too_costly");
  } finally {
    policy.close();
  }
});

test("a search tool given no bound is bounded at the plan's default, and reserved so", async () => {
  const policy = new PolicyClient(address);
  try {
    const plain = await policy.authorize({ apiKey, endpoint: "responses", model: "gpt-4o-mini", requestId: "node-tools-0" });
    const d = await policy.authorize({ apiKey, endpoint: "responses", model: "gpt-4o-mini", requestId: "node-tools-1",
                                       unboundedWebSearchTools: 1 });
    assert.equal(plain.maxToolCalls, 0);
    assert.equal(d.allowed, true);
    assert.equal(d.maxToolCalls, 10);  // the sample plans' default_max_tool_calls
    assert.ok(d.reservedNanos >= plain.reservedNanos);
    assert.equal(await policy.release("node-tools-0"), "released");
    assert.equal(await policy.release("node-tools-1"), "released");
  } finally {
    policy.close();
  }
});

test("release returns the hold, once", async () => {
  const policy = new PolicyClient(address);
  try {
    const before = await walletNanos();
    const d = await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o-mini", requestId: "node-2" });
    assert.equal(d.allowed, true);
    assert.equal(await policy.release("node-2", "provider_error"), "released");
    assert.equal(await policy.release("node-2"), "already_released");
    assert.equal(await walletNanos(), before);
    await assert.rejects(policy.settle("node-unknown", { inputTokens: 1 }),
      (e: unknown) => e instanceof PolicydCallError && e.code === grpc.status.NOT_FOUND && e.reason === "unknown_request");
  } finally {
    policy.close();
  }
});

test("a background response's hold is kept until the caller settles it", async () => {
  const policy = new PolicyClient(address);
  try {
    const d = await policy.authorize({ apiKey, endpoint: "responses", model: "gpt-4o-mini", requestId: "node-bg" });
    assert.equal(d.allowed, true);
    const kept = await policy.awaitResponse("node-bg", "resp_node");
    assert.equal(kept.followed, false);  // its account is the caller's own: the caller settles it
    assert.ok(kept.heldUntilUnixMs > Date.now() + 600_000);
    const s = await policy.settle("node-bg", { inputTokens: 20, outputTokens: 10 });
    assert.equal(s.outcome, "settled");
    await assert.rejects(policy.awaitResponse("node-bg", "resp_node"),
      (e: unknown) => e instanceof PolicydCallError && e.reason === "already_settled");
  } finally {
    policy.close();
  }
});

test("a key is described: its wallet and the current window of its limits", async () => {
  const policy = new PolicyClient(address);
  try {
    const summary = await policy.describeKey(apiKey);
    assert.equal(summary.customerId, customer);
    assert.equal(summary.plan, "free");
    assert.equal(summary.balanceNanos, await walletNanos());
    const rpm = summary.limits.find((l) => l.name === "key-rpm");
    assert.ok(rpm && rpm.unit === "requests" && rpm.limit === 20n && rpm.resetsUnix > 0);
    assert.ok(summary.models.some((m) => m.id === "gpt-4o-mini" && m.ownedBy === "openai"));
    assert.ok(!summary.models.some((m) => m.id === "gpt-4o"));  // premium: not the free plan's
    assert.equal(summary.endUserId, "");
    const named = await policy.describeKey(apiKey, "node-user");
    assert.deepEqual([named.endUserId, named.endUserPaused], ["node-user", false]);
    await assert.rejects(policy.describeKey("pdk_live_" + "Q".repeat(40)),
      (e: unknown) => e instanceof PolicydCallError && e.code === grpc.status.UNAUTHENTICATED && e.reason === "invalid_api_key");
  } finally {
    policy.close();
  }
});

test("a request is described: in progress while held, then what it was charged", async () => {
  const policy = new PolicyClient(address);
  try {
    const held = await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o-mini",
                                          requestId: "node-asked", promptBytes: 80 });
    const running = await policy.describeRequest(apiKey, "node-asked");
    assert.equal(running.status, "in_progress");
    assert.equal(running.heldNanos, held.reservedNanos);
    assert.equal(running.balanceAfterNanos, null);
    const waiting = policy.describeRequest(apiKey, "node-asked", 10000);  // waits for the request to close
    const settled = await policy.settle("node-asked", { inputTokens: 20, outputTokens: 5 });
    const asked = await waiting;
    assert.equal(asked.status, "settled");
    assert.equal(asked.chargeNanos, settled.chargeNanos);
    assert.equal(asked.balanceAfterNanos, settled.balanceAfterNanos);
    assert.equal(Number(asked.response.usage?.outputTokens), 5);
    await assert.rejects(policy.describeRequest(apiKey, "node-never-made"),
      (e: unknown) => e instanceof PolicydCallError && e.code === grpc.status.NOT_FOUND && e.reason === "request_not_found");
    await new Promise((resolve) => setTimeout(resolve, 5));  // a later millisecond: listed first
    await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o-mini", requestId: "node-newer",
                             promptBytes: 80 });
    let listed = await policy.listRequests(apiKey, 1);
    for (let tries = 0; listed.requests[0]?.requestId !== "node-newer" && tries < 50; tries++) {  // being written
      await new Promise((resolve) => setTimeout(resolve, 100));
      listed = await policy.listRequests(apiKey, 1);
    }
    assert.equal(listed.requests[0].requestId, "node-newer");  // newest first
    assert.equal(listed.hasMore, true);
    const older = await policy.listRequests(apiKey, 1, "node-newer");  // the next page
    assert.equal(older.requests[0].requestId, "node-asked");
    assert.equal(older.requests[0].chargeNanos, settled.chargeNanos);
    await assert.rejects(policy.listRequests(apiKey, 1, "node-never-made"),
      (e: unknown) => e instanceof PolicydCallError && e.code === grpc.status.NOT_FOUND && e.reason === "request_not_found");
    const summed = await policy.usageSummary(apiKey, { groupBy: ["model"] });  // the last 30 days, by model
    const mini = summed.groups.find((g) => g.group["model"] === "gpt-4o-mini");
    assert.ok(mini && BigInt(mini.charge?.nanos ?? "0") >= settled.chargeNanos && Number(mini.requests) >= 2);
    assert.equal(summed.currency, "USD");
    await assert.rejects(policy.usageSummary(apiKey, { groupBy: ["provider"] }),
      (e: unknown) => e instanceof PolicydCallError && e.code === grpc.status.INVALID_ARGUMENT);
    const today = new Date(Date.now() + 14 * 3600_000).toISOString().slice(0, 10);  // Kiribati's day
    const byDay = await policy.usageSummary(apiKey, { bucket: "day", timezone: "Pacific/Kiritimati" });
    assert.deepEqual([...new Set(byDay.groups.map((g) => g.bucket))], [today]);
    await assert.rejects(policy.usageSummary(apiKey, { bucket: "day", timezone: "Mars/Olympus_Mons" }),
      (e: unknown) => e instanceof PolicydCallError && e.code === grpc.status.INVALID_ARGUMENT);
  } finally {
    policy.close();
  }
});

test("a reply's parts are settled each at its model; a fallback the key may not use is refused", async () => {
  const policy = new PolicyClient(address);
  try {
    const refused = await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o-mini",
                                             fallbackModels: ["gpt-4o"] });  // not the free plan's
    assert.equal(refused.reason, "model_not_allowed");
    assert.equal(JSON.parse(refused.errorBody()).error.param, "fallbacks");
    const d = await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o-mini", requestId: "node-parts",
                                       promptBytes: 400 });
    assert.equal(d.allowed, true);
    const parts = [{ kind: "compaction", inputTokens: 300, outputTokens: 20 }, { kind: "message", inputTokens: 100, outputTokens: 40 }];
    await assert.rejects(policy.settle("node-parts", { inputTokens: 100, outputTokens: 40, parts }),  // not their sums
      (e: unknown) => e instanceof PolicydCallError && e.reason === "invalid_usage");
    const s = await policy.settle("node-parts", { parts });
    const whole = await policy.settle("node-parts", { inputTokens: 400, outputTokens: 60, parts });  // the sums: the same
    assert.equal(s.outcome, "settled");
    assert.equal(whole.outcome, "exists");
    assert.ok(s.chargeNanos > 0n);
  } finally {
    policy.close();
  }
});

test("an unreachable server is a clear error", async () => {
  const policy = new PolicyClient("127.0.0.1:1", { deadlineMs: 500, retries: 1 });
  try {
    await assert.rejects(policy.settle("x", { inputTokens: 1 }), (e: unknown) =>
      e instanceof PolicydCallError && [grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED].includes(e.code));
  } finally {
    policy.close();
  }
});
