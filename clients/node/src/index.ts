/**
 * policyd's TypeScript/Node client: the PolicyService (Authorize, Settle, Release, DescribeKey, DescribeRequest,
 * ListRequests, SummarizeUsage)
 * with deadlines,
 * retries only where a call is idempotent, and typed errors.
 *
 *   const policy = new PolicyClient("127.0.0.1:50051");
 *   const d = await policy.authorize({ apiKey, endpoint: "chat_completions", model: "gpt-4o",
 *                                      requestId: "req-1", promptBytes: 2048, maxOutputTokens: 512 });
 *   if (!d.allowed) return respond(d.httpStatus, d.errorBody());
 *   ... call the provider with d.upstreamModel, at most d.maxOutputTokens ...
 *   await policy.settle("req-1", { inputTokens: 900, outputTokens: 300 });   // or policy.release("req-1", "provider_error")
 *
 * Money is integer nanos (1e-9 of the currency unit) as `bigint`: never a floating-point number.
 * The types under ./generated are generated from proto/policyd/v1 at build time (`npm run gen`).
 */
import * as path from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import type { ProtoGrpcType } from "./generated/policy";
import type { AuthorizeRequest } from "./generated/policyd/v1/AuthorizeRequest";
import type { AuthorizeResponse__Output } from "./generated/policyd/v1/AuthorizeResponse";
import type { Attribution } from "./generated/policyd/v1/Attribution";
import type { PolicyServiceClient } from "./generated/policyd/v1/PolicyService";
import type { DescribeKeyRequest } from "./generated/policyd/v1/DescribeKeyRequest";
import type { KeySummary__Output } from "./generated/policyd/v1/KeySummary";
import type { DescribeRequestRequest } from "./generated/policyd/v1/DescribeRequestRequest";
import type { RequestSummary__Output } from "./generated/policyd/v1/RequestSummary";
import type { ListRequestsRequest } from "./generated/policyd/v1/ListRequestsRequest";
import type { ListRequestsResponse__Output } from "./generated/policyd/v1/ListRequestsResponse";
import type { UsageSummaryRequest } from "./generated/policyd/v1/UsageSummaryRequest";
import type { UsageSummary__Output } from "./generated/policyd/v1/UsageSummary";
import type { ReleaseRequest } from "./generated/policyd/v1/ReleaseRequest";
import type { ReleaseResponse__Output } from "./generated/policyd/v1/ReleaseResponse";
import type { AwaitResponseRequest } from "./generated/policyd/v1/AwaitResponseRequest";
import type { AwaitResponseResponse__Output } from "./generated/policyd/v1/AwaitResponseResponse";
import type { SettleRequest } from "./generated/policyd/v1/SettleRequest";
import type { SettleResponse__Output } from "./generated/policyd/v1/SettleResponse";

export type { ProtoGrpcType } from "./generated/policy";

export const ENDPOINTS = [
  "chat_completions", "responses", "embeddings", "images", "anthropic_messages", "gemini_generate_content",
  "completions", "audio_speech", "audio_transcriptions", "moderations", "bedrock_converse", "rerank",
  "cohere_chat", "videos", "cached_contents",
] as const;
export type Endpoint = (typeof ENDPOINTS)[number];

export const DEADLINE_MS = 2000;
export const RETRIES = 2;
const RETRY_BACKOFF_MS = 50;

/** The proto loader options the generated types were made with (see package.json "gen"). */
export const LOADER_OPTIONS: protoLoader.Options = { longs: String, enums: String, defaults: true, oneofs: true };

/** The directory holding policyd/v1/*.proto (shipped with this package). */
export const PROTO_DIR = path.resolve(__dirname, "..", "..", "proto");

/** Loads the contract: the generated PolicyService and AdminService constructors and message types. */
export function loadContract(): ProtoGrpcType & { policyd: { v1: Record<string, any> } } {
  const definition = protoLoader.loadSync(["policyd/v1/policy.proto", "policyd/v1/admin.proto"],
    { ...LOADER_OPTIONS, includeDirs: [PROTO_DIR] });
  return grpc.loadPackageDefinition(definition) as unknown as ProtoGrpcType & { policyd: { v1: Record<string, any> } };
}

/** A call policyd refused or could not answer: `code` is the gRPC status, `reason` the machine reason. */
export class PolicydCallError extends Error {
  constructor(readonly code: grpc.status, readonly reason: string, message: string) {
    super(`${reason}: ${message}`);
    this.name = "PolicydCallError";
  }
}

export interface AuthorizeInput {
  apiKey: string;
  endpoint: Endpoint;
  model: string;
  requestId?: string;       // the idempotency key of the whole flow; makes Authorize retryable
  promptBytes?: number;
  messageCount?: number;
  maxOutputTokens?: number;
  inputTokens?: number;     // your own count, if you have one
  choices?: number;         // completions generated (n / candidateCount), each up to maxOutputTokens
  webSearches?: number;     // the most provider-side web searches the request allows (max_uses)
  fileSearches?: number;    // ... file searches (max_tool_calls with a file_search tool)
  unboundedWebSearchTools?: number;  // web search tools given no bound (Anthropic: without max_uses; Responses: 1 without max_tool_calls)
  unboundedFileSearch?: boolean;     // a file_search tool without max_tool_calls: both bounded at the plan's default (Decision.maxToolCalls)
  stream?: boolean;
  unseenInput?: boolean;    // the input includes what the request only refers to (previous_response_id, file_id, an image URL, a server tool)
  seconds?: number;         // speech to text: the audio's seconds, when known exactly (a WAV header)
  audioBytes?: number;      // ... else the audio's size: policyd estimates or bounds its seconds
  cacheWrite?: "" | "5m" | "1h";  // the longest cache the body asks its input written to (Anthropic's cache_control)
  audioOutput?: boolean;    // the reply may be spoken (modalities include "audio"): output reserved at the audio price
  imageCount?: number;      // images asked for (an images request's n): each reserved at the model's most per image
  serviceTier?: string;     // the processing tier asked for (OpenAI's service_tier; Anthropic's "fast_mode", "us")
  serviceTierImplied?: boolean;  // serviceTier is the provider's own default (Anthropic's priority): never refused
  outputCapFixed?: boolean;  // no output cap can be written into the request (a compaction): never fitted
  outputCapParam?: string;  // the field the client gave its cap in, where not its API's first: a refusal names it
  imageModel?: string;      // the Responses API's image_generation tool: the image model that prices its images
  imageModelDefault?: boolean;   // ... the tool names none: Decision.response.imageModel says the one to set
  imageGenerationCalls?: number; // ... its calls' bound (max_tool_calls)
  partialImages?: number;   // ... partial images each streamed call sends
  containers?: number;      // hosted containers the provider may make (code_interpreter "auto", shell)
  containerMemory?: string; // ... the largest memory limit asked ("1g" when none)
  imageScale?: number;      // how many of an image model's most per image one image may bill (size, GIF frames)
  mapsGrounding?: boolean;  // Gemini's googleMaps tool: a grounded prompt billed apart
  documents?: number;       // a rerank: its documents, ...
  documentBytes?: number;   // ... their bytes together, ...
  documentTokensMax?: number;  // ... and the most tokens the provider reads of each (Cohere's max_tokens_per_doc)
  leastOutputCap?: number;  // the least cap the provider accepts (Anthropic's max_tokens past thinking.budget_tokens)
  searchContextSize?: string;  // web_search_options.search_context_size (Perplexity's, OpenAI's search models): a fee by it
  fallbackModels?: string[];   // models the provider may fall back to and bill (Anthropic's fallbacks): the key's too, held
  fallbacksRouted?: boolean;   // ... a router's (OpenRouter's models): the one serving alone billed, the dearest held
  geo?: string;             // where its endpoint runs it, unsaid by the reply ("regional": Vertex AI's regions)
  webResults?: number;      // a router's web search (OpenRouter's): the most results it may return (webSearches: as many)
  webResultsPerSearch?: number;  // ... its server tool given no max_total_results: each search's (set maxToolCalls x it)
  fallbacksParam?: string;  // the field the fallbacks came in, where not the endpoint's own (LiteLLM's "fallbacks")
  advisorModel?: string;       // an advisor tool's model (Anthropic's advisor_*): the key's too, held for its calls
  advisorCalls?: number;       // ... at most this many (its max_uses; 0: the plan's bound, set it as maxToolCalls says)
  advisorMaxTokens?: number;   // ... each writing at most this (its max_tokens; 0: the advisor model's cap)
  countTokens?: boolean;    // a free token count (count_tokens, input_tokens, countTokens): nothing reserved or to settle
  storedResponseId?: string;     // a stored response (or conversation) read, changed or deleted: free, its customer's keys only
  previousResponseId?: string;   // the stored response a Responses API request continues
  creates?: "" | "conversation" | "file"; // POST /v1/conversations, /v1/files: free, settled with the new id (settle extra providerResponseId)
  conversationId?: string;       // the conversation a Responses API request adds to
  fileIds?: string[];            // the files the request's input refers to by id
  chargeHeldOnExpiry?: boolean;  // on its way to the provider: a reservation nobody closes is charged as held at its deadline
  callToken?: string;            // unique to the client's request when its id comes from the client: another reusing it meanwhile is refused
  threadBudgetNanos?: bigint;    // a budget on attribution.threadId's total charge: a request whose hold would pass it is refused
  maxChargeNanos?: bigint;       // the most this one request may hold (beside the plan's max_request_charge)
  attribution?: Omit<Attribution, "requestId">;
}

export interface Decision {
  allowed: boolean;
  decision: "allow" | "deny" | "downgrade";
  reason: string;
  message: string;
  httpStatus: number;
  requestId: string;
  servedModel: string;
  /** The served model as the provider names it: send it upstream (in the body, or the path where the path
   *  names the model) when it differs from the model the request names. Records keep servedModel. */
  upstreamModel: string;
  /** Where a chat completion's output cap goes for the served model's provider: "max_completion_tokens"
   *  (OpenAI's), or "max_tokens" for providers that read only it. */
  outputCapField: string;
  /** The provider reports a stream's usage unasked and refuses stream_options (Mistral's): send a streamed
   *  completion without them, where OpenAI's needs stream_options.include_usage. */
  streamUsageReported: boolean;
  route: string;
  maxOutputTokens: number;
  /** > 0: the bound of the request's unbounded search tools the reservation covers: set it in the request
   *  (the Responses API's max_tool_calls; max_uses on each Anthropic web search tool without one; a router's
   *  web_search tool's max_total_results, this times its max_results). */
  maxToolCalls: number;
  reservedNanos: bigint;
  retryAfterSeconds: number;
  /** The OpenAI-style JSON error body to answer a denied request with. */
  errorBody(): string;
  response: AuthorizeResponse__Output;
}

export interface UsageInput {
  inputTokens?: number;
  outputTokens?: number;
  cachedInputTokens?: number;
  cacheWriteInputTokens?: number;
  images?: number;
  seconds?: number;
  searchUnits?: number;     // a rerank's search units (Cohere's meta.billed_units.search_units)
  searchContextSize?: string;  // the search context its web search ran with (Perplexity's usage.search_context_size)
  webSearches?: number;     // web searches the provider ran (Perplexity's num_search_queries), per_web_search each
  reasoningOutputTokens?: number;  // of outputTokens: reasoning billed at its own price (Perplexity's reasoning_tokens)
  cacheStorageTokenSeconds?: number;  // an explicit cache's tokens x the seconds it lives (Gemini's cachedContents)
  /** The parts a reply bills by themselves, each at the model that ran it (Anthropic's usage.iterations): the
   *  token fields above are then 0 or their sums. */
  parts?: UsagePartInput[];
  /** What the provider's reply says it charged (OpenRouter's usage.cost), in nanos: the cost of a model priced
   *  reported_cost. Left out: nothing said. */
  reportedCostNanos?: bigint;
}

export interface UsagePartInput {
  kind?: string;            // message, compaction, advisor_message, fallback_message
  model?: string;           // the model that ran it ("": the model served)
  inputTokens?: number;     // all its input, cached included
  cachedInputTokens?: number;
  cacheWriteInputTokens?: number;
  cacheWrite_1hInputTokens?: number;
  outputTokens?: number;
}

export interface Settled {
  outcome: "settled" | "exists" | "settled_late";
  costNanos: bigint;
  chargeNanos: bigint;
  balanceBeforeNanos: bigint;
  balanceAfterNanos: bigint;
  response: SettleResponse__Output;
}

export interface LimitState {
  name: string;
  scope: string;
  window: string;
  unit: string;             // money (nanos), tokens, requests
  limit: bigint;
  used: bigint;
  resetsUnix: number;       // the window's end, unix seconds; 0 for total
}

export interface KeySummary {
  keyId: string;
  customerId: string;
  plan: string;
  hasWallet: boolean;
  currency: string;
  balanceNanos: bigint;
  reservedNanos: bigint;    // held for requests in flight
  limits: LimitState[];
  models: { id: string; ownedBy: string }[];  // the models the key may use (for answering GET /v1/models)
  endUserId: string;        // the end user asked about ("": none)
  endUserPaused: boolean;   // that end user paused by the operator: its requests refused (end_user_paused)
}

/** One request of the key's customer, as its holder may see it (GET /v1/requests/{id}): never its cost. */
export interface RequestSummary {
  requestId: string;
  createdUnixMs: number;
  status: "in_progress" | "settled" | "released" | "expired" | "denied" | "unmetered";
  decision: string;
  reason: string;
  endpoint: string;
  requestedModel: string;
  servedModel: string;
  currency: string;
  chargeNanos: bigint;
  heldNanos: bigint;
  refundedNanos: bigint;
  balanceAfterNanos: bigint | null;   // null: no prepaid wallet paid it (postpaid, or not charged yet)
  usageEstimated: boolean;
  response: RequestSummary__Output;  // every field, the usage included
}

function summaryOf(r: RequestSummary__Output): RequestSummary {
  return {
    requestId: r.requestId, createdUnixMs: Number(r.createdUnixMs), status: r.status as RequestSummary["status"],
    decision: r.decision, reason: r.reason, endpoint: r.endpoint, requestedModel: r.requestedModel,
    servedModel: r.servedModel, currency: r.charge?.currency ?? "", chargeNanos: BigInt(r.charge?.nanos ?? "0"),
    heldNanos: BigInt(r.held?.nanos ?? "0"), refundedNanos: BigInt(r.refunded?.nanos ?? "0"),
    balanceAfterNanos: r.hasBalance ? BigInt(r.balanceAfter?.nanos ?? "0") : null,
    usageEstimated: r.usageEstimated, response: r,
  };
}

export interface ClientOptions {
  credentials?: grpc.ChannelCredentials;
  deadlineMs?: number;
  retries?: number;
}

type Unary<Req, Res> = (request: Req, options: grpc.CallOptions, callback: grpc.requestCallback<Res>) => grpc.ClientUnaryCall;

export class PolicyClient {
  private readonly stub: PolicyServiceClient;
  private readonly deadlineMs: number;
  private readonly retries: number;

  constructor(target: string, options: ClientOptions = {}) {
    const contract = loadContract();
    this.stub = new contract.policyd.v1.PolicyService(target, options.credentials ?? grpc.credentials.createInsecure());
    this.deadlineMs = options.deadlineMs ?? DEADLINE_MS;
    this.retries = options.retries ?? RETRIES;
  }

  close(): void {
    this.stub.close();
  }

  async authorize(input: AuthorizeInput): Promise<Decision> {
    if (!(ENDPOINTS as readonly string[]).includes(input.endpoint)) {
      throw new TypeError(`endpoint must be one of ${ENDPOINTS.join(", ")}`);
    }
    const request: AuthorizeRequest = {
      apiKey: input.apiKey,
      endpoint: input.endpoint.toUpperCase() as AuthorizeRequest["endpoint"],
      model: input.model,
      attribution: { ...input.attribution, requestId: input.requestId ?? "" },
      shape: {
        promptBytes: input.promptBytes ?? 0, messageCount: input.messageCount ?? 1,
        maxOutputTokens: input.maxOutputTokens ?? 0, inputTokens: input.inputTokens ?? 0, stream: input.stream ?? false,
        choices: input.choices ?? 0, webSearches: input.webSearches ?? 0, fileSearches: input.fileSearches ?? 0, unseenInput: input.unseenInput ?? false,
        seconds: input.seconds ?? 0, audioBytes: input.audioBytes ?? 0, cacheWrite: input.cacheWrite ?? "",
        audioOutput: input.audioOutput ?? false, unboundedWebSearchTools: input.unboundedWebSearchTools ?? 0,
        unboundedFileSearch: input.unboundedFileSearch ?? false, imageCount: input.imageCount ?? 0,
        serviceTier: input.serviceTier ?? "", serviceTierImplied: input.serviceTierImplied ?? false,
        imageModel: input.imageModel ?? "", imageModelDefault: input.imageModelDefault ?? false,
        imageGenerationCalls: input.imageGenerationCalls ?? 0, partialImages: input.partialImages ?? 0,
        containers: input.containers ?? 0, containerMemory: input.containerMemory ?? "",
        imageScale: input.imageScale ?? 0, mapsGrounding: input.mapsGrounding ?? false,
        outputCapFixed: input.outputCapFixed ?? false,
        outputCapParam: input.outputCapParam ?? "",
        documents: input.documents ?? 0, documentBytes: input.documentBytes ?? 0,
        documentTokensMax: input.documentTokensMax ?? 0, leastOutputCap: input.leastOutputCap ?? 0,
        searchContextSize: input.searchContextSize ?? "",
        fallbackModels: input.fallbackModels ?? [], advisorModel: input.advisorModel ?? "",
        advisorCalls: input.advisorCalls ?? 0, advisorMaxTokens: input.advisorMaxTokens ?? 0,
        fallbacksRouted: input.fallbacksRouted ?? false, geo: input.geo ?? "",
        webResults: input.webResults ?? 0, webResultsPerSearch: input.webResultsPerSearch ?? 0,
        fallbacksParam: input.fallbacksParam ?? "",
      },
      countTokens: input.countTokens ?? false,
      storedResponseId: input.storedResponseId ?? "", previousResponseId: input.previousResponseId ?? "",
      creates: input.creates ?? "", conversationId: input.conversationId ?? "", fileIds: input.fileIds ?? [],
      chargeHeldOnExpiry: input.chargeHeldOnExpiry ?? false, callToken: input.callToken ?? "",
      threadBudget: { nanos: String(input.threadBudgetNanos ?? 0n) },
      maxCharge: { nanos: String(input.maxChargeNanos ?? 0n) },
    };
    const r = await this.call<AuthorizeRequest, AuthorizeResponse__Output>(
      this.stub.authorize.bind(this.stub), request, Boolean(input.requestId));
    const decision = r.decision.toLowerCase() as Decision["decision"];
    return {
      allowed: decision !== "deny", decision, reason: r.reason, message: r.message, httpStatus: r.httpStatus,
      requestId: r.requestId, servedModel: r.servedModel, upstreamModel: r.upstreamModel || r.servedModel,
      outputCapField: r.outputCapField || "max_completion_tokens", streamUsageReported: r.streamUsageReported ?? false,
      route: r.route,
      maxOutputTokens: Number(r.maxOutputTokens), maxToolCalls: Number(r.maxToolCalls ?? 0), reservedNanos: BigInt(r.reserved?.nanos ?? "0"),
      retryAfterSeconds: Number(r.retryAfterSeconds), response: r,
      errorBody: () => JSON.stringify({ error: { type: r.error?.type ?? "", code: r.error?.code ?? "",
                                                 message: r.error?.message ?? "", param: r.error?.param || null } }),
    };
  }

  async settle(requestId: string, usage: UsageInput, extra: Omit<SettleRequest, "requestId" | "usage"> = {}): Promise<Settled> {
    const { reportedCostNanos, ...counted } = usage;
    const sent = reportedCostNanos === undefined ? counted
      : { ...counted, reportedCost: { nanos: String(reportedCostNanos) } };
    const r = await this.call<SettleRequest, SettleResponse__Output>(
      this.stub.settle.bind(this.stub), { requestId, usage: sent, ...extra }, true);
    return {
      outcome: r.outcome.toLowerCase() as Settled["outcome"],
      costNanos: BigInt(r.cost?.nanos ?? "0"), chargeNanos: BigInt(r.charge?.nanos ?? "0"),
      balanceBeforeNanos: BigInt(r.balanceBefore?.nanos ?? "0"), balanceAfterNanos: BigInt(r.balanceAfter?.nanos ?? "0"),
      response: r,
    };
  }

  /** Returns "released", "already_released" or "already_expired". */
  async release(requestId: string, reason = ""): Promise<string> {
    const r = await this.call<ReleaseRequest, ReleaseResponse__Output>(
      this.stub.release.bind(this.stub), { requestId, reason }, true);
    return String(r.outcome).toLowerCase();
  }

  /** A background response (the Responses API's background: true) not ended when its reply did: its hold is
   *  kept until it is settled, by policyd when it follows it (`followed`: providerAccount names an account of
   *  policyd's providers file with a base_url), else by you when it ends. */
  async awaitResponse(requestId: string, providerResponseId: string, providerAccount = ""):
      Promise<{ heldUntilUnixMs: number; followed: boolean }> {
    const r = await this.call<AwaitResponseRequest, AwaitResponseResponse__Output>(
      this.stub.awaitResponse.bind(this.stub), { requestId, providerResponseId, providerAccount }, true);
    return { heldUntilUnixMs: Number(r.heldUntilUnixMs), followed: r.followed };
  }

  /** What a key may still spend (its wallet and the current window of its limits) and the models it may use,
   *  for answering GET /v1/key and GET /v1/models; with an end user of its customer, that end user's limits too. */
  async describeKey(apiKey: string, endUserId = ""): Promise<KeySummary> {
    const r = await this.call<DescribeKeyRequest, KeySummary__Output>(
      this.stub.describeKey.bind(this.stub), { apiKey, endUserId }, true);
    return {
      keyId: r.keyId, customerId: r.customerId, plan: r.plan, hasWallet: r.hasWallet,
      currency: r.balance?.currency ?? "", balanceNanos: BigInt(r.balance?.nanos ?? "0"),
      reservedNanos: BigInt(r.reserved?.nanos ?? "0"),
      limits: r.limits.map((l) => ({ name: l.name, scope: l.scope, window: l.window, unit: l.unit,
                                    limit: BigInt(l.limit), used: BigInt(l.used), resetsUnix: Number(l.resetsUnix) })),
      models: r.models.map((m) => ({ id: m.id, ownedBy: m.ownedBy })),
      endUserId: r.endUserId, endUserPaused: r.endUserPaused,
    };
  }

  /** One request of the key's customer (its charge, usage and status), for answering GET /v1/requests/{id};
   *  one in progress is waited for up to waitMs (at most 20,000) to close. */
  async describeRequest(apiKey: string, requestId: string, waitMs = 0): Promise<RequestSummary> {
    const r = await this.call<DescribeRequestRequest, RequestSummary__Output>(
      this.stub.describeRequest.bind(this.stub), { apiKey, requestId, waitMs }, true, waitMs);
    return summaryOf(r);
  }

  /** The key's customer's requests, newest first, for answering GET /v1/requests: `limit` (1-100, 0: 20) of them
   *  past the request `after` (the last of the page before); `hasMore`: another page follows. */
  async listRequests(apiKey: string, limit = 0, after = ""): Promise<{ requests: RequestSummary[]; hasMore: boolean }> {
    const r = await this.call<ListRequestsRequest, ListRequestsResponse__Output>(
      this.stub.listRequests.bind(this.stub), { apiKey, limit, after }, true);
    return { requests: r.requests.map(summaryOf), hasMore: r.hasMore };
  }

  /** The key's customer's usage summed over a window (the last 30 days unless told), for answering GET /v1/usage:
   *  grouped by up to 3 dimensions (model, feature, thread, key, ...), by hour, day or month if `bucket` (of
   *  `timezone`, an IANA name: the policy's unless told). Each group's counts and tokens, and its charge in
   *  nanos; never what it cost the operator. */
  async usageSummary(apiKey: string, options: { groupBy?: string[]; bucket?: string; sinceUnix?: number;
                                                untilUnix?: number; timezone?: string } = {}
  ): Promise<UsageSummary__Output> {
    return this.call<UsageSummaryRequest, UsageSummary__Output>(this.stub.summarizeUsage.bind(this.stub), {
      apiKey, groupBy: options.groupBy ?? [], bucket: options.bucket ?? "", sinceUnix: options.sinceUnix ?? 0,
      untilUnix: options.untilUnix ?? 0, timezone: options.timezone ?? "" }, true);
  }

  private async call<Req, Res>(method: Unary<Req, Res>, request: Req, idempotent: boolean,
                               waitsMs = 0): Promise<Res> {
    const attempts = idempotent ? this.retries + 1 : 1;
    for (let attempt = 1; ; attempt++) {
      try {
        return await new Promise<Res>((resolve, reject) => {
          method(request, { deadline: new Date(Date.now() + this.deadlineMs + waitsMs) }, (error, response) =>
            error ? reject(error) : resolve(response as Res));
        });
      } catch (caught) {
        const error = caught as grpc.ServiceError;
        if (error.code !== grpc.status.UNAVAILABLE || attempt >= attempts) {
          const reason = String(error.metadata?.get("policyd-reason")[0] ?? "") || grpc.status[error.code]?.toLowerCase() || "error";
          throw new PolicydCallError(error.code, reason, error.details ?? String(error));
        }
        await new Promise((resolve) => setTimeout(resolve, RETRY_BACKOFF_MS * attempt));
      }
    }
  }
}
