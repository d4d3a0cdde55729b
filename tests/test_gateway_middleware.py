"""End to end without Envoy: the example in-house gateway (examples/gateway, an ASGI proxy wrapped in
PolicydMiddleware, served by uvicorn), a policyd process, the mock provider, and the official openai
SDK as the client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import grpc
import openai
import pytest

from policyd import event_stream, http_api
from policyd.mock_provider import MockProvider, prompt_tokens
from policyd.money import PRICE_TOKEN_SECONDS, format_amount, parse_amount, price_quantity
from policyd.protobuf_json import timestamp_ms
from policyd_client.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import ROOT
from tests.helpers import FundedCustomers, begin_gemini_upload, http_request, leave_before_the_reply, streamed, wav
from tests.processes import PolicydProcess
from tests.servers import free_port, wait_port
from tests.test_gateway import FIXTURES, an_end_users_budget_as_its_key_asks, asked_with, expected_charge, key_summary

PROVIDER_KEY = "sk-mock-gateway-example"


class ExampleGateway(FundedCustomers):
    def __init__(self, tmp: Path) -> None:
        self.mock = MockProvider(api_keys=(PROVIDER_KEY,)).start()
        self.database = tmp / "policyd.db"
        self.policyd = PolicydProcess("", f"sqlite:///{self.database}", policy=str(FIXTURES / "gateway_policy.yaml"),
                                      cwd=str(tmp))
        self.port = free_port()
        env = {**os.environ, "POLICYD_ADDRESS": self.policyd.address,
               "UPSTREAM_BASE_URL": f"http://127.0.0.1:{self.mock.port}/v1", "UPSTREAM_API_KEY": PROVIDER_KEY,
               "BACKGROUND_POLL_SECONDS": "0.2"}
        self.log = tmp / "gateway.log"
        self.process = subprocess.Popen([sys.executable, str(ROOT / "examples" / "gateway" / "gateway.py"),
                                         "--port", str(self.port)], env=env, cwd=tmp,
                                        stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        wait_port(self.port, timeout=30)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.channel = grpc.insecure_channel(self.policyd.address)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=20)

    def record(self, request_id: str, final: bool = True, seconds: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            audit = self.admin.Audit(admin_pb2.AuditRequest())  # drains the writer first
            with sqlite3.connect(self.database) as db:
                db.row_factory = sqlite3.Row
                row = db.execute("select * from usage_records where request_id = ?", (request_id,)).fetchone()
            # a settlement in flight can show as a passing difference between the counters and the ledger
            if audit.ok and row is not None and (not final or row["status"] != "reserved"):
                return dict(row)
            assert time.monotonic() < deadline, f"{request_id}: {dict(row) if row else 'no record'}; {audit}"
            time.sleep(0.1)

    def received(self, content: str) -> list[dict[str, Any]]:
        return [r for r in self.mock.received() if r["body"].get("messages", [{}])[0].get("content") == content]

    def close(self) -> None:
        self.channel.close()
        self.process.terminate()
        self.process.wait(timeout=10)
        self.policyd.stop()
        self.mock.stop()


@pytest.fixture(scope="module")
def gateway() -> Iterator[ExampleGateway]:
    tmp = Path(tempfile.mkdtemp(prefix="policyd-example-gateway-"))
    gw = ExampleGateway(tmp)
    yield gw
    gw.close()
    shutil.rmtree(tmp, ignore_errors=True)


def test_a_completion_is_charged_exactly_with_attribution_and_trace(gateway: ExampleGateway) -> None:
    key = gateway.customer("mw-plain")
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=[{"role": "user", "content": "middleware: how exact?"}], max_tokens=40,
        extra_headers={"x-feature": "faq", "x-thread-id": "t-mw", "traceparent": trace})
    completion = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["decision"]) == ("settled", "allow")
    assert (record["input_tokens"], record["output_tokens"]) == (completion.usage.prompt_tokens,
                                                                  completion.usage.completion_tokens)
    assert record["charge_nanos"] == expected_charge("gpt-4o", completion.usage.prompt_tokens,
                                                     completion.usage.completion_tokens)
    assert (record["feature"], record["thread_id"]) == ("faq", "t-mw")
    assert (record["traceparent"], record["trace_id"]) == (trace, "4bf92f3577b34da6a3ce929d0e0e4736")
    wallet = gateway.wallet("mw-plain")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("10") - record["charge_nanos"], 0)
    (sent,) = gateway.received("middleware: how exact?")
    assert sent["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert key not in json.dumps(gateway.mock.received())  # the customer's key never reaches the provider


def test_a_reply_in_gzip_is_read_and_passed_on_as_sent(gateway: ExampleGateway) -> None:
    """The proxy is asked for replies as they are (accept-encoding: identity); one that comes compressed
    anyway is read from a decoded copy and charged exactly."""
    client = gateway.client(gateway.customer("mw-gzip"))
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "mw gzip"}], max_tokens=8,
        extra_headers={"x-mock-scenario": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"
    completion = raw.parse()
    (sent,) = gateway.received("mw gzip")
    assert sent["accept_encoding"] == "identity"
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["error_class"]) == ("settled", "")
    assert record["charge_nanos"] == expected_charge("gpt-4o-mini", completion.usage.prompt_tokens,
                                                     completion.usage.completion_tokens)


def test_a_stream_is_charged_from_the_usage_policyd_asked_for(gateway: ExampleGateway) -> None:
    """The middleware asks every stream for its usage, charges it, and keeps the usage event from a client
    that did not ask (every chunk it gets has a choice); a client that asks gets it as sent, and so does one
    whose stream the provider compresses (its events cannot be seen on the way)."""
    client = gateway.client(gateway.customer("mw-stream"))
    messages = [{"role": "user", "content": "middleware stream"}]
    headers, chunks = streamed(client, "middleware stream", extra_headers={"x-mock-scenario": "fragmented"})
    assert all(len(c.choices) == 1 and c.usage is None for c in chunks)  # the client did not ask: the middleware did
    output = sum(1 for c in chunks if c.choices[0].delta.content)  # the mock's output: a token a chunk
    record = gateway.record(headers["x-policyd-request-id"])
    assert record["status"] == "settled" and not record["stream_interrupted"]
    assert (record["input_tokens"], record["output_tokens"]) == (prompt_tokens({"messages": messages}), output)
    assert record["charge_nanos"] == expected_charge("gpt-4o-mini", prompt_tokens({"messages": messages}), output)
    (sent,) = gateway.received("middleware stream")
    assert sent["body"]["stream_options"] == {"include_usage": True}
    assert sent["body"]["max_completion_tokens"] == 1024  # the reserved cap, since the client gave none

    for content, extra in (("middleware stream, asked", {"stream_options": {"include_usage": True}}),
                           ("middleware stream, compressed", {"extra_headers": {"x-mock-scenario": "gzip"}})):
        headers, chunks = streamed(client, content, **extra)
        (usage_event,) = [c for c in chunks if c.usage]
        assert usage_event.choices == []
        assert gateway.record(headers["x-policyd-request-id"])["output_tokens"] == usage_event.usage.completion_tokens


def test_denials_raise_the_sdk_exceptions_and_never_reach_the_provider(gateway: ExampleGateway) -> None:
    before = len(gateway.mock.received())
    with pytest.raises(openai.AuthenticationError) as invalid:
        gateway.client("pdk_live_" + "Q" * 40).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert invalid.value.code == "invalid_api_key"
    free = gateway.client(gateway.customer("mw-free", plan="free"))
    with pytest.raises(openai.PermissionDeniedError) as not_allowed:
        free.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert not_allowed.value.code == "model_not_allowed"
    broke = gateway.client(gateway.customer("mw-broke", credit=""))
    with pytest.raises(openai.RateLimitError) as quota:
        broke.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    assert quota.value.code == "insufficient_quota"
    assert quota.value.response.headers["x-should-retry"] == "false"  # waiting will not fill the wallet
    sdk_defaults = openai.OpenAI(base_url=gateway.base_url, api_key=broke.api_key, timeout=20)  # retries 429s twice
    with pytest.raises(openai.RateLimitError):
        sdk_defaults.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "once"}])
    assert [r.reason for r in gateway.records("mw-broke")] == ["insufficient_quota"] * 2  # one each: no retries
    assert len(gateway.mock.received()) == before


def post(url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_cap_fitted_to_the_wallet_goes_to_the_provider_lowered(gateway: ExampleGateway) -> None:
    """The middleware writes a fitted output cap over the client's larger one, as Envoy does."""
    key = gateway.customer("mw-fitting", plan="fitting", credit="0.005")
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "fit me, middleware"}], max_tokens=30_000)
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert record["status"] == "settled" and 64 <= record["max_output_tokens"] < 30_000
    (sent,) = gateway.received("fit me, middleware")
    assert sent["body"]["max_tokens"] == record["max_output_tokens"] and "max_completion_tokens" not in sent["body"]


def test_a_bedrock_stream_is_charged_its_usage_and_capped_where_converse_reads_it(gateway: ExampleGateway) -> None:
    """Bedrock's ConverseStream through the middleware: its event stream messages, arriving a few bytes at a
    time, pass as sent and its usage is charged exactly; the cap the client left out is set in inferenceConfig."""
    key = gateway.customer("mw-bedrock", plan="bedrock")
    model = "us.anthropic.claude-sonnet-4-20250514-v1:0"
    body = {"messages": [{"role": "user", "content": [{"text": "middleware on bedrock"}]}]}
    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway.port}/model/{urllib.parse.quote(model, safe='')}/converse-stream",
        data=json.dumps(body).encode(), method="POST",
        headers={"authorization": f"Bearer {key}", "content-type": "application/json", "x-mock-scenario": "fragmented"})
    with urllib.request.urlopen(request, timeout=20) as reply:
        request_id, whole = reply.headers["x-policyd-request-id"], reply.read()
    messages = event_stream.Decoder().feed(whole)
    (used,) = [json.loads(m.payload)["usage"] for m in messages if m.headers[":event-type"] == "metadata"]
    record = gateway.record(request_id)
    assert (record["status"], record["error_class"], record["input_tokens"], record["output_tokens"]) == (
        "settled", "", used["inputTokens"], used["outputTokens"])
    assert record["charge_nanos"] == expected_charge(model, used["inputTokens"], used["outputTokens"]) > 0
    (sent,) = [r for r in gateway.mock.received() if "middleware on bedrock" in json.dumps(r["body"])]
    assert sent["body"]["inferenceConfig"] == {"maxTokens": record["max_output_tokens"]} and sent["authorization"] == \
        f"Bearer {PROVIDER_KEY}"
    # refused, a Bedrock client reads AWS's error: an empty wallet is a quota spent, never a 429 to retry
    broke = gateway.customer("mw-bedrock-broke", plan="bedrock", credit="")
    refused = urllib.request.Request(request.full_url, data=json.dumps(body).encode(), method="POST",
                                     headers={"authorization": f"Bearer {broke}", "content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as spent:
        urllib.request.urlopen(refused, timeout=20)
    assert (spent.value.code, spent.value.headers["x-amzn-errortype"]) == (400, "ServiceQuotaExceededException")
    answer = json.loads(spent.value.read())
    assert answer["message"] == answer["error"]["message"] and answer["error"]["code"] == "insufficient_quota"


def test_a_rerank_is_charged_its_search_units_through_the_middleware(gateway: ExampleGateway) -> None:
    """A Cohere rerank through the middleware: charged the search units its reply bills (a long document split
    in chunks makes a second unit of a hundred documents), at the model's per_search_unit."""
    key = gateway.customer("mw-rerank", plan="search")
    body = {"model": "rerank-v3.5", "query": "which ledger?", "documents": ["a ledger"] * 99 + ["z" * 40_000]}
    request = urllib.request.Request(f"http://127.0.0.1:{gateway.port}/v2/rerank", data=json.dumps(body).encode(),
                                     method="POST", headers={"authorization": f"Bearer {key}",
                                                             "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as reply:
        request_id, answer = reply.headers["x-policyd-request-id"], json.loads(reply.read())
    assert answer["meta"]["billed_units"]["search_units"] == 2  # 99 chunks and the long one's 2
    record = gateway.record(request_id)
    cost = 2 * parse_amount("0.002")
    assert (record["status"], record["error_class"], record["search_units"], record["cost_nanos"],
            record["charge_nanos"]) == ("settled", "", 2, cost, cost * 12 // 10)


def test_a_mistral_stream_goes_without_stream_options_and_keeps_its_usage(gateway: ExampleGateway) -> None:
    """Mistral refuses stream_options (422) and reports a stream's usage unasked: through the middleware a
    model priced stream_usage: reported goes without them, is charged its last chunk's usage, and the client
    gets that chunk whole."""
    key = gateway.customer("mw-mistral", plan="mistral")
    with gateway.client(key).chat.completions.with_streaming_response.create(
            model="mistral-small-latest", messages=[{"role": "user", "content": "mw mistral"}], max_tokens=6,
            stream=True) as raw:
        request_id, chunks = raw.headers["x-policyd-request-id"], list(raw.parse())
    (usage,) = [c.usage for c in chunks if c.usage]
    record = gateway.record(request_id)
    assert (record["status"], record["error_class"], record["input_tokens"], record["output_tokens"]) == (
        "settled", "", usage.prompt_tokens, usage.completion_tokens)
    (sent,) = gateway.received("mw mistral")
    assert "stream_options" not in sent["body"] and sent["body"]["max_tokens"] == 6


def test_a_key_in_the_query_is_read_and_never_reaches_the_provider(gateway: ExampleGateway) -> None:
    key = gateway.customer("mw-query-key")
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "mw query key"}],
                       "max_tokens": 16}).encode()
    code, reply = post(f"{gateway.base_url}/chat/completions?trace=on&key={key}", {"content-type": "application/json",
                       "x-policyd-request-id": "mw-query-1"}, body)
    assert code == 200 and reply["usage"]["completion_tokens"] > 0
    (sent,) = gateway.received("mw query key")
    assert sent["path"] == "/v1/chat/completions?trace=on" and key not in json.dumps(sent)
    record = gateway.record("mw-query-1")
    assert (record["status"], record["customer_id"]) == ("settled", "mw-query-key")


def test_a_file_larger_than_any_request_body_policyd_reads_is_uploaded(gateway: ExampleGateway) -> None:
    """An upload is free and never read: the middleware decides on its headers and the proxy streams it on
    (it refused one past 32 MiB, 413, as it does a body it reads); its id stays its customer's."""
    client = gateway.client(gateway.customer("mw-big-file"))
    content = b"0123456789abcdef" * (2 * 1024 * 1024 + 1)  # 32 MiB and a bit
    raw = client.files.with_raw_response.create(file=("input.jsonl", content), purpose="batch")
    uploaded = raw.parse()
    assert uploaded.bytes == len(content) > http_api.REQUEST_BODY_BYTES_MAX
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["charge_nanos"], record["provider_response_id"]) == ("settled", 0, uploaded.id)
    with pytest.raises(openai.NotFoundError):
        gateway.client(gateway.customer("mw-big-file-other")).files.retrieve(uploaded.id)


def test_a_batch_is_refused_clearly_and_recorded(gateway: ExampleGateway) -> None:
    """The middleware does not hold batches (their input file is read where policyd's provider accounts are):
    refused before the proxy, with a reason, recorded; the provider never makes it."""
    client = gateway.client(gateway.customer("mw-batch"))
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id="file-abc", endpoint="/v1/chat/completions", completion_window="24h")
    assert (refused.value.code, refused.value.param) == ("unknown_endpoint", "path")
    assert [r.reason for r in gateway.records("mw-batch")] == ["unknown_endpoint"]


def test_a_request_body_the_client_compressed_is_read_and_sent_on_decoded(gateway: ExampleGateway) -> None:
    """A gzip- or deflate-compressed body is decoded to be decided on and goes on decoded, as through Envoy;
    another coding is refused clearly (415), recorded."""
    import gzip
    import zlib

    key = gateway.customer("mw-compressed")
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "mw compressed"}],
                       "max_tokens": 8}).encode()
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    for n, (coding, data) in enumerate((("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)))):
        code, reply = post(f"{gateway.base_url}/chat/completions",
                           {**headers, "content-encoding": coding, "x-policyd-request-id": f"mw-compressed-{n}"}, data)
        assert code == 200, reply
        record = gateway.record(f"mw-compressed-{n}")
        assert record["charge_nanos"] == expected_charge("gpt-4o-mini", reply["usage"]["prompt_tokens"],
                                                         reply["usage"]["completion_tokens"]) > 0
    assert [r["content_encoding"] for r in gateway.received("mw compressed")] == ["", ""]
    code, reply = post(f"{gateway.base_url}/chat/completions",
                       {**headers, "content-encoding": "br", "x-policyd-request-id": "mw-compressed-br"}, body)
    assert (code, reply["error"]["code"]) == (415, "unsupported_content_encoding")
    assert gateway.record("mw-compressed-br")["reason"] == "unsupported_content_encoding"


def test_unusable_requests_get_clear_errors_a_record_and_move_no_money(gateway: ExampleGateway) -> None:
    key = gateway.customer("mw-bad", credit="1")
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json", "x-policyd-request-id": "mw-bad-1"}
    code, reply = post(f"{gateway.base_url}/chat/completions", auth, b"not json")
    assert (code, reply["error"]["code"]) == (400, "invalid_request")
    record = gateway.record("mw-bad-1")
    assert (record["status"], record["reason"], record["reserved_nanos"]) == ("denied", "invalid_request", 0)
    code, reply = post(f"{gateway.base_url}/batches", {**auth, "x-policyd-request-id": "mw-bad-2"}, b"{}")
    assert (code, reply["error"]["code"]) == (400, "unknown_endpoint")  # strict: nothing unmetered passes
    code, reply = post(f"{gateway.base_url}/chat/completions", {**auth, "x-policyd-request-id": "mw-bad-3"},
                       b'{"model": "gpt-4o-mini", "x": "' + b"a" * (33 * 1024 * 1024) + b'"}')
    assert (code, reply["error"]["code"]) == (413, "request_too_large")
    assert gateway.record("mw-bad-3")["reason"] == "request_too_large"
    wallet = gateway.wallet("mw-bad")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("1"), 0)


def test_a_background_response_is_followed_to_its_end_and_charged_what_it_used(gateway: ExampleGateway) -> None:
    """A background response's reply comes queued, with no usage: the middleware keeps its hold (AwaitResponse)
    and asks the proxy for it until it ends, whether its client polls or never comes back, then charges what
    the provider reports."""
    key = gateway.customer("mw-background")
    client = gateway.client(key)
    raw = client.responses.with_raw_response.create(model="gpt-4o-mini", input="research it in the background",
                                                    background=True, extra_headers={"x-mock-background-polls": "3"})
    queued = raw.parse()
    assert (queued.status, queued.usage) == ("queued", None)
    assert gateway.wallet("mw-background").reserved_nanos > 0  # held while it runs
    record = gateway.record(raw.headers["x-policyd-request-id"], seconds=15)  # once it ended: never polled for
    ended = client.responses.retrieve(queued.id)
    assert ended.status == "completed"
    assert (record["status"], record["error_class"], record["input_tokens"], record["output_tokens"]) == \
        ("settled", "", ended.usage.input_tokens, ended.usage.output_tokens)
    assert gateway.wallet("mw-background").reserved_nanos == 0


def test_a_search_context_fee_is_charged_through_the_middleware(gateway: ExampleGateway) -> None:
    """Perplexity's Sonar: the size its request asks its search for reaches policyd (held at its fee), and the
    size its reply's usage names is charged."""
    key = gateway.customer("mw-sonar", plan="perplexity")
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="sonar", messages=[{"role": "user", "content": "mw sonar"}], max_tokens=8,
        extra_body={"web_search_options": {"search_context_size": "medium"}})
    usage = json.loads(raw.text)["usage"]
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["search_context_size"]) == ("settled", "medium")
    assert record["cost_nanos"] == price_quantity(usage["prompt_tokens"] + usage["completion_tokens"],
                                                  parse_amount("1.00")) + parse_amount("0.008")
    assert record["reserved_nanos"] >= record["cost_nanos"]


def test_an_async_chat_job_is_followed_to_its_end_and_charged_its_answer(gateway: ExampleGateway) -> None:
    """Perplexity's async chat completion (/v1/async/sonar): a job answered at once, CREATED, its chat completion
    under "request". The middleware keeps its hold and asks the proxy for the job until it is COMPLETED, then
    charges its answer's usage: the sources read as input, the searches, the reasoning at its own price."""
    key = gateway.customer("mw-async", plan="perplexity")
    body = {"request": {"model": "sonar-deep-research", "max_tokens": 9,
                        "messages": [{"role": "user", "content": "mw async research"}]}}
    code, made = post(f"{gateway.base_url}/async/sonar", {"authorization": f"Bearer {key}",
                      "content-type": "application/json", "x-mock-background-polls": "2"}, json.dumps(body).encode())
    assert (code, made["status"]) == (200, "CREATED")
    assert gateway.wallet("mw-async").reserved_nanos > 0  # held while it runs
    (record,) = [r for r in gateway.records("mw-async")]
    record = gateway.record(record.request_id, seconds=15)
    usage = gateway.mock.jobs[made["id"]][1]["usage"]
    assert (record["status"], record["error_class"], record["input_tokens"], record["output_tokens"],
            record["reasoning_output_tokens"], record["web_searches"]) == (
        "settled", "", usage["prompt_tokens"] + usage["citation_tokens"],
        usage["completion_tokens"] + usage["reasoning_tokens"], usage["reasoning_tokens"], usage["num_search_queries"])
    assert gateway.wallet("mw-async").reserved_nanos == 0


def test_a_veo_operation_is_followed_and_its_videos_are_its_customers(gateway: ExampleGateway) -> None:
    """Veo's video generation (models/M:predictLongRunning): the middleware keeps the operation's hold and asks
    the proxy for it until it is done, charges the seconds of the videos it made and passes their files to
    policyd, so that its customer, and no other, downloads them through the middleware."""
    key, other = gateway.customer("mw-veo", plan="google", credit="20"), gateway.customer("mw-veo-other",
                                                                                        plan="google")
    root = f"http://127.0.0.1:{gateway.port}/v1beta"
    body = {"instances": [{"prompt": "mw veo"}], "parameters": {"durationSeconds": 4}}
    code, made = post(f"{root}/models/veo-3.0-generate-001:predictLongRunning",
                      {"x-goog-api-key": key, "content-type": "application/json", "x-mock-background-polls": "1"},
                      json.dumps(body).encode())
    assert code == 200 and made["name"].startswith("models/veo-3.0-generate-001/operations/"), made
    (record,) = list(gateway.records("mw-veo"))
    record = gateway.record(record.request_id, seconds=15)
    assert (record["status"], record["images"], record["seconds"], record["cost_nanos"]) == (
        "settled", 1, 4, 4 * parse_amount("0.40"))
    done = gateway.mock.operations[made["name"]][0]
    path = "files/" + done["response"]["generateVideoResponse"]["generatedSamples"][0]["video"]["uri"].split(
        "/files/", 1)[1]
    for who, status in ((key, 200), (other, 404)):
        request = urllib.request.Request(f"{root}/{path}", headers={"x-goog-api-key": who})
        try:
            with urllib.request.urlopen(request, timeout=20) as reply:
                assert (reply.status, reply.read()[4:8]) == (status, b"ftyp")
        except urllib.error.HTTPError as refused:
            assert refused.code == status


def test_an_explicit_cache_is_charged_its_tokens_and_life_and_is_its_customers(gateway: ExampleGateway) -> None:
    """Gemini's explicit caches through the middleware: one made is charged its tokens written and the token-seconds
    it is set to live, as its reply says; its time to live made longer, the time added; it is read and used by its
    own customer's keys alone."""
    key, other = gateway.customer("mw-cache", plan="google", credit="20"), gateway.customer("mw-cache-other",
                                                                                          plan="google")
    root = f"http://127.0.0.1:{gateway.port}/v1beta"

    def call(method: str, path: str, who: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(f"{root}/{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"x-goog-api-key": who, "content-type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=20) as reply:
                return reply.status, json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read() or b"{}")

    def life(cache: dict[str, Any]) -> int:
        return -(-(timestamp_ms(cache["expireTime"]) - timestamp_ms(cache["createTime"])) // 1000)

    code, made = call("POST", "cachedContents", key, {"model": "models/gemini-2.5-flash", "ttl": "300s", "contents": [
        {"role": "user", "parts": [{"text": "A ledger's rules, cached through the middleware. " * 40}]}]})
    assert code == 200, made
    tokens = made["usageMetadata"]["totalTokenCount"]
    (record,) = list(gateway.records("mw-cache"))
    record = gateway.record(record.request_id)
    assert (record["endpoint"], record["input_tokens"], record["cache_storage_token_seconds"],
            record["cost_nanos"]) == ("cached_contents", tokens, tokens * life(made),
                                      price_quantity(tokens, parse_amount("0.30"))
                                      + price_quantity(tokens * life(made), parse_amount("1.00"), PRICE_TOKEN_SECONDS))
    assert call("GET", made["name"], other)[0] == 404
    question = {"cachedContent": made["name"], "contents": [{"role": "user", "parts": [{"text": "Balanced?"}]}]}
    assert call("POST", "models/gemini-2.5-flash:generateContent", other, question)[0] == 404
    code, answer = call("POST", "models/gemini-2.5-flash:generateContent", key, question)
    assert code == 200 and answer["usageMetadata"]["cachedContentTokenCount"] == tokens
    code, changed = call("PATCH", made["name"], key, {"ttl": "900s"})
    assert code == 200
    records = {r.request_id: gateway.record(r.request_id) for r in gateway.records("mw-cache")}
    (longer,) = [r for r in records.values() if r["endpoint"] == "cached_contents" and not r["input_tokens"]]
    assert longer["cache_storage_token_seconds"] == tokens * (life(changed) - life(made)) > 0
    (used,) = [r for r in records.values() if r["endpoint"] == "gemini_generate_content"]
    assert used["cached_input_tokens"] == tokens


def test_a_gemini_upload_goes_through_the_middleware_and_its_file_is_its_customers(gateway: ExampleGateway) -> None:
    """Gemini's File API through the middleware: the URL an upload's bytes go to is made the middleware's own,
    its bytes (sent with no key, as Google's SDK sends them) go on as the customer's who began it, and the file
    made is that customer's alone."""
    key, other = gateway.customer("mw-upload", plan="google"), gateway.customer("mw-upload-other", plan="google")
    root = f"http://127.0.0.1:{gateway.port}"

    call = http_request
    content = b"a ledger's rules, uploaded through the middleware " * 20
    code, headers, _ = begin_gemini_upload(root, key, len(content), "mw rules")
    assert code == 200 and headers["x-goog-upload-url"].startswith(f"{root}/upload/v1beta/files?upload_id="), headers
    code, headers, made = call("POST", headers["x-goog-upload-url"], {"x-goog-upload-command": "upload, finalize",
                                                                     "x-goog-upload-offset": "0"}, content)
    assert (code, headers.get("x-goog-upload-status")) == (200, "final"), made
    name = json.loads(made)["file"]["name"]
    assert call("GET", f"{root}/v1beta/{name}", {"x-goog-api-key": other})[0] == 404
    assert call("GET", f"{root}/v1beta/{name}", {"x-goog-api-key": key})[0] == 200


def test_a_token_count_is_free_but_checked_over_the_native_api(gateway: ExampleGateway) -> None:
    """The middleware asks policyd over gRPC (AuthorizeRequest.count_tokens): a key that may use the
    model counts with an empty wallet, nothing reserved or recorded; a key that may not never reaches the provider."""
    key = gateway.customer("mw-count", credit="")
    body = {"model": "gpt-4o-mini", "input": "mw count me"}
    code, reply = post(f"{gateway.base_url}/responses/input_tokens", {"authorization": f"Bearer {key}",
                       "content-type": "application/json"}, json.dumps(body).encode())
    assert code == 200 and reply["input_tokens"] > 0
    (sent,) = [r for r in gateway.mock.received() if r["body"] == body]
    assert sent["path"] == "/v1/responses/input_tokens" and sent["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert list(gateway.records("mw-count")) == [] and gateway.wallet("mw-count").reserved_nanos == 0
    code, reply = post(f"{gateway.base_url}/responses/input_tokens", {"authorization": "Bearer pdk_live_" + "Q" * 40,
                       "content-type": "application/json"}, json.dumps({**body, "input": "mw count refused"}).encode())
    assert (code, reply["error"]["code"]) == (401, "invalid_api_key")
    assert "mw count refused" not in json.dumps(gateway.mock.received())


def test_input_a_request_only_refers_to_reaches_policyd_over_the_native_api(gateway: ExampleGateway) -> None:
    """RequestShape.unseen_input: a previous response's tokens are billed but not in the body, so a strict
    plan on a model with no context_window refuses the request."""
    key = gateway.customer("mw-unbounded", plan="strict")
    body = {"model": "gpt-4o-mini", "input": "go on", "previous_response_id": "resp_mw_unbounded"}
    code, reply = post(f"{gateway.base_url}/responses", {"authorization": f"Bearer {key}",
                       "content-type": "application/json"}, json.dumps(body).encode())
    assert (code, reply["error"]["code"]) == (400, "input_unbounded")
    assert "resp_mw_unbounded" not in json.dumps(gateway.mock.received())


def test_a_key_asks_what_it_may_still_spend(gateway: ExampleGateway) -> None:
    key = gateway.customer("mw-summary")

    code, answer = key_summary(gateway.base_url, key)
    assert code == 200 and (answer["customer"], answer["plan"], answer["currency"]) == ("mw-summary", "pro", "USD")
    assert answer["wallet"] == {"balance": "10.000000000", "reserved": "0.000000000", "available": "10.000000000"}
    code, error = key_summary(gateway.base_url, "pdk_live_" + "Q" * 40)
    assert (code, error["error"]["code"]) == (401, "invalid_api_key")
    assert "/v1/key" not in json.dumps([r["path"] for r in gateway.mock.received()])
    an_end_users_budget_as_its_key_asks(gateway, "mw-end-user-summary")  # DescribeKey's end_user_id


def test_a_threads_budget_reaches_policyd_over_the_native_api(gateway: ExampleGateway) -> None:
    """x-policyd-thread-budget goes to policyd as AuthorizeRequest.thread_budget, x-policyd-max-charge as max_charge:
    the request that would pass either is refused before the provider; one within them is served."""
    client = gateway.client(gateway.customer("mw-run"))
    ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "mw run step"}], "max_tokens": 8}
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(**ask, extra_headers={"x-thread-id": "mw-run-1",
                                                             "x-policyd-thread-budget": "0.000000001"})
    assert refused.value.code == "budget_exceeded" and "thread-budget" in refused.value.message
    with pytest.raises(openai.BadRequestError) as dear:  # and a bound on the one request (AuthorizeRequest.max_charge)
        client.chat.completions.create(**ask, extra_headers={"x-policyd-max-charge": "0.000000001"})
    assert dear.value.code == "request_too_costly" and "its caller allows it at most" in dear.value.message
    assert not [r for r in gateway.mock.received() if r["body"].get("messages") == ask["messages"]]
    served = client.chat.completions.with_raw_response.create(**ask, extra_headers={
        "x-thread-id": "mw-run-1", "x-policyd-thread-budget": "1.00"})
    assert served.parse().choices and served.headers["x-policyd-thread-budget-limit"] == "1.000000000"
    assert 0 < parse_amount(served.headers["x-policyd-thread-budget-remaining"]) < parse_amount("1.00")


def test_a_customer_asks_what_its_request_was_charged(gateway: ExampleGateway) -> None:
    """GET /v1/requests/{id}, answered from policyd's DescribeRequest: the charge and usage as recorded, for the
    request's own customer alone."""
    key = gateway.customer("mw-asks")
    raw = gateway.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "mw what did this cost"}], max_tokens=8)
    completion, request_id = raw.parse(), raw.headers["x-policyd-request-id"]
    code, asked = asked_with(f"{gateway.base_url}/requests/{urllib.parse.quote(request_id, safe='')}", key)
    record = gateway.record(request_id)
    assert code == 200 and (asked["id"], asked["status"], asked["charge"]) == (
        request_id, "settled", format_amount(record["charge_nanos"]))
    assert (asked["usage"]["input_tokens"], asked["usage"]["output_tokens"]) == (
        completion.usage.prompt_tokens, completion.usage.completion_tokens)
    code, error = asked_with(f"{gateway.base_url}/requests/{request_id}", gateway.customer("mw-asks-stranger"))
    assert (code, error["error"]["code"]) == (404, "request_not_found")
    assert "/requests/" not in json.dumps([r["path"] for r in gateway.mock.received()])
    code, listed = asked_with(f"{gateway.base_url}/requests?limit=1", key)  # GET /v1/requests: ListRequests
    assert code == 200 and [(r["id"], r["charge"]) for r in listed["data"]] == [
        (request_id, format_amount(record["charge_nanos"]))] and listed["has_more"] is False
    code, error = asked_with(f"{gateway.base_url}/requests?after=never-made", key)
    assert (code, error["error"]["code"]) == (404, "request_not_found")
    code, summed = asked_with(f"{gateway.base_url}/usage?group_by=model", key)  # GET /v1/usage: SummarizeUsage
    assert code == 200 and [(r["group"], r["requests"], r["charge"]) for r in summed["data"]] == [
        ({"model": "gpt-4o-mini"}, 1, format_amount(record["charge_nanos"]))]
    code, error = asked_with(f"{gateway.base_url}/usage?group_by=provider", key)
    assert (code, error["error"]["code"], error["error"]["param"]) == (400, "invalid_request", "group_by")
    code, by_day = asked_with(f"{gateway.base_url}/usage?bucket=day&timezone=Pacific/Kiritimati", key)
    assert code == 200 and [r["bucket"] for r in by_day["data"]] == [
        time.strftime("%Y-%m-%d", time.gmtime(time.time() + 14 * 3600))]  # the day there, 14 hours ahead of UTC
    assert not [r for r in gateway.mock.received() if r["path"].rstrip("/").endswith("/requests")]


def test_what_a_provider_says_of_the_operators_account_never_reaches_the_client(gateway: ExampleGateway) -> None:
    raw = gateway.client(gateway.customer("mw-account")).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "whose account?"}], max_tokens=4)
    assert not {k.lower() for k in raw.headers} & {"openai-organization", "x-ratelimit-remaining-requests",
                                                   "anthropic-ratelimit-tokens-remaining"}
    assert raw.headers["x-request-id"] == "req_mock"


def test_text_to_speech_is_charged_by_the_characters_sent(gateway: ExampleGateway) -> None:
    key = gateway.customer("mw-speech")
    text = "Speak every character: ünïcödé."
    raw = gateway.client(key).audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input=text)
    assert raw.parse().content.startswith(b"ID3")
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["endpoint"], record["status"], record["input_tokens"], record["error_class"]) == (
        "audio_speech", "settled", len(text), "")
    assert record["charge_nanos"] == -(-price_quantity(len(text), parse_amount("15.00")) * 12_000 // 10_000)


def test_text_to_speech_priced_by_tokens_is_charged_the_usage_its_events_report(gateway: ExampleGateway) -> None:
    key = gateway.customer("mw-speech-tokens")
    text = "Tokens in, audio tokens out: ünïcödé."
    raw = gateway.client(key).audio.speech.with_raw_response.create(model="gpt-4o-mini-tts", voice="alloy",
                                                                    input=text, stream_format="sse")
    usage = json.loads(raw.parse().content.decode().strip().splitlines()[-1][5:])["usage"]
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["error_class"], record["input_tokens"], record["output_tokens"],
            record["audio_output_tokens"]) == ("settled", "", usage["input_tokens"], usage["output_tokens"],
                                               usage["output_tokens"])
    cost = price_quantity(usage["input_tokens"], parse_amount("0.60")) + \
        price_quantity(usage["output_tokens"], parse_amount("12.00"))
    assert (record["cost_nanos"], record["charge_nanos"]) == (cost, -(-cost * 12_000 // 10_000))
    raw = gateway.client(key).audio.speech.with_raw_response.create(model="gpt-4o-mini-tts", voice="alloy", input=text)
    estimated = gateway.record(raw.headers["x-policyd-request-id"])
    assert (estimated["error_class"], estimated["output_tokens"]) == ("usage_estimated:no_usage_reported",
                                                                      -(-len(text) * 7 // 5))


def test_an_upstream_error_releases_the_hold(gateway: ExampleGateway) -> None:
    key = gateway.customer("mw-500")
    with pytest.raises(openai.InternalServerError):
        gateway.client(key).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "fail"}],
            extra_headers={"x-mock-scenario": "server_error", "x-policyd-request-id": "mw-500-1"})
    record = gateway.record("mw-500-1")
    assert (record["status"], record["close_reason"], record["charge_nanos"]) == ("released", "upstream_500", 0)
    wallet = gateway.wallet("mw-500")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("10"), 0)


def test_a_client_that_hangs_up_mid_stream_is_charged_for_what_it_got(gateway: ExampleGateway) -> None:
    key = gateway.customer("mw-hangup")
    with gateway.client(key).chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "long answer"}], stream=True,
            extra_headers={"x-mock-scenario": "slow", "x-policyd-request-id": "mw-hangup-1"}) as response:
        stream = response.parse()
        first = [next(iter(stream)) for _ in range(2)]
        assert all(c.choices for c in first)
    # leaving the block closes the connection while the provider is still streaming
    record = gateway.record("mw-hangup-1")
    assert record["status"] == "settled" and record["stream_interrupted"]
    assert record["error_class"] == "usage_estimated:stream_cut"
    assert 0 < record["output_tokens"] < 12 and record["charge_nanos"] > 0
    wallet = gateway.wallet("mw-hangup")
    assert wallet.reserved_nanos == 0 and wallet.balance_nanos == parse_amount("10") - record["charge_nanos"]


def test_a_client_that_leaves_before_its_reply_began_is_charged_as_held(gateway: ExampleGateway) -> None:
    """A reply not streamed is made whole by the provider however soon its client leaves: its input as
    estimated and the output held for it are charged."""
    leave_before_the_reply(gateway.base_url, gateway.customer("mw-gone"), "mw-gone-1")
    record = gateway.record("mw-gone-1")
    assert (record["status"], record["error_class"], record["output_tokens"]) == (
        "settled", "usage_estimated:client_gone", 300)
    assert record["charge_nanos"] == record["reserved_nanos"] > 0 and gateway.wallet("mw-gone").reserved_nanos == 0


class DowngradingPolicy:
    """The policy client as the middleware uses it: Authorize answers a downgrade; closings are recorded."""

    def __init__(self) -> None:
        self.settled: list[tuple[str, dict[str, Any]]] = []
        self.asked: list[dict[str, Any]] = []

    async def authorize(self, api_key: str, endpoint: str, model: str, **fields: Any) -> Any:
        from policyd_client import Decision

        self.asked.append(fields)

        return Decision(allowed=True, decision="downgrade", reason="", message="", http_status=200, request_id="r-g",
                        served_model="gemini-2.5-flash", route="google", max_output_tokens=64, reserved_nanos=1,
                        retry_after_seconds=0, response=None)

    async def settle(self, request_id: str, **usage: Any) -> None:
        self.settled.append((request_id, usage))

    async def release(self, request_id: str, reason: str = "") -> None:
        self.settled.append((request_id, {"released": reason}))


async def test_the_middleware_sends_gemini_the_served_model_in_the_path_and_keeps_the_key() -> None:
    from policyd.gateway_middleware import PolicydMiddleware

    seen: list[dict[str, Any]] = []

    async def provider(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)
        body = json.dumps({"candidates": [{"content": {"parts": [{"text": "hi"}]}}],
                           "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    policy = DowngradingPolicy()
    app = PolicydMiddleware(provider, policy)  # type: ignore[arg-type]
    request = json.dumps({"contents": [{"parts": [{"text": "hi"}]}]}).encode()
    messages = [{"type": "http.request", "body": request, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": "POST", "path": "/v1beta/models/gemini-2.5-pro:generateContent",
               "raw_path": b"/v1beta/models/gemini-2.5-pro:generateContent", "query_string": b"alt=json&key=pdk_live_x",
               "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1)}, receive, send)
    (scope,) = seen
    assert scope["path"] == scope["raw_path"].decode() == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert scope["query_string"] == b"alt=json"
    assert sent[0]["status"] == 200
    assert policy.settled and policy.settled[0][0] == "r-g" and policy.settled[0][1]["output_tokens"] == 1
    # sent on to the provider: a reservation this gateway could not close (it crashed) is charged at its deadline
    assert policy.asked[0]["charge_held_on_expiry"] is True
    assert len(policy.asked[0]["call_token"]) == 32  # its own: another request reusing the client's id is refused


async def test_a_proxy_that_fails_before_the_provider_answers_is_released_not_charged() -> None:
    """No reply began because the proxy failed (its upstream unreachable), not because the client left: the
    provider never had the request, so the hold is released (a client gone is charged: the tests above)."""
    from policyd.gateway_middleware import PolicydMiddleware

    async def failing_proxy(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise ConnectionError("the provider could not be reached")

    policy = DowngradingPolicy()
    app = PolicydMiddleware(failing_proxy, policy)  # type: ignore[arg-type]
    messages = [{"type": "http.request", "body": json.dumps({"contents": []}).encode(), "more_body": False}]
    staying = asyncio.Event()  # the client stays: it never says http.disconnect

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await staying.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        pass

    with pytest.raises(ConnectionError):
        await app({"type": "http", "method": "POST", "path": "/v1beta/models/gemini-2.5-pro:generateContent",
                   "raw_path": b"/v1beta/models/gemini-2.5-pro:generateContent", "query_string": b"",
                   "headers": [(b"content-type", b"application/json"), (b"x-goog-api-key", b"pdk_live_x")],
                   "client": ("127.0.0.1", 1)}, receive, send)
    assert policy.settled == [("r-g", {"released": "no_response"})]


def test_large_bodies_both_ways_are_decided_and_charged_from_the_providers_usage(gateway: ExampleGateway) -> None:
    """A request of 6 MiB (past gRPC's default message size, within the body limit) is decided; a reply of
    about 13 MiB (past the 4 MiB a reply is held whole for) is charged from the usage at its end."""
    key = gateway.customer("mw-large", credit="10")
    client = gateway.client(key)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "word " * (6 * 1024 * 1024 // 5)}], max_tokens=4)
    assert gateway.record(raw.headers["x-policyd-request-id"])["status"] == "settled"
    raw = client.embeddings.with_raw_response.create(model="gpt-4o-mini", input=[f"doc {i}" for i in range(700)],
                                                     dimensions=1536, encoding_format="float")
    reply = raw.parse()
    assert len(reply.data) == 700
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["input_tokens"], record["error_class"]) == ("settled", reply.usage.prompt_tokens, "")
    assert record["charge_nanos"] == expected_charge("gpt-4o-mini", reply.usage.prompt_tokens, 0)


def test_models_listing_shows_what_the_key_may_use(gateway: ExampleGateway) -> None:
    """GET /v1/models is answered by policyd, not passed to the provider (whose list shows models the key may
    not use); a key it does not know gets the OpenAI-style 401."""
    free = gateway.client(gateway.customer("mw-models", plan="free"))
    assert sorted((m.id, m.owned_by) for m in free.models.list()) == [("gpt-4o-mini", "openai")]
    pro = gateway.client(gateway.customer("mw-models-pro"))
    assert sorted(m.id for m in pro.models.list()) == ["claude-sonnet-4", "dall-e-2", "gpt-4o", "gpt-4o-mini",
                                                      "gpt-4o-mini-tts", "gpt-image-1", "omni-moderation-latest",
                                                      "tts-1"]
    with pytest.raises(openai.AuthenticationError):
        gateway.client("pdk_live_" + "Q" * 40).models.list()
    assert pro.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError) as missing:
        free.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"
    assert "/v1/models" not in json.dumps([r["path"] for r in gateway.mock.received()])


def test_speech_to_text_is_charged_and_a_downgrade_rewrites_the_form(gateway: ExampleGateway) -> None:
    client = gateway.client(gateway.customer("mw-voice", plan="voice"))
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("a.wav", wav(6)))
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["seconds"], record["charge_nanos"]) == ("settled", 6, 6 * parse_amount("0.0001"))
    thrifty = gateway.client(gateway.customer("mw-voice-thrifty", plan="voice-thrifty"))
    raw = thrifty.audio.transcriptions.with_raw_response.create(model="gpt-4o-transcribe", file=("b.wav", wav(2)))
    assert raw.parse().usage.input_tokens == 20
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["served_model"], record["input_tokens"], record["audio_input_tokens"]) == (
        "gpt-4o-mini-transcribe", 20, 20)
    sent = [r for r in gateway.mock.received() if r["path"].endswith("/audio/transcriptions")][-1]
    assert (sent["body"]["model"], sent["body"]["file_bytes"]) == ("gpt-4o-mini-transcribe", len(wav(2)))

    # the audio's length reaches policyd over the native API (RequestShape.seconds, audio_bytes): a WAV's
    # seconds exactly, a compressed file's bound by its bytes under a strict plan (it was held at nothing)
    strict = gateway.client(gateway.customer("mw-voice-strict", plan="voice-strict"))
    raw = strict.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("long.ogg", bytes(75_000)))
    record = gateway.record(raw.headers["x-policyd-request-id"])
    second = parse_amount("0.0001")
    assert (record["reserved_nanos"], record["seconds"], record["charge_nanos"]) == (100 * second, 5, 5 * second)


def test_a_provider_refusing_the_gateways_credentials_is_not_blamed_on_the_customers_key(gateway: ExampleGateway) -> None:
    key = gateway.customer("mw-upstream-auth", credit="1")
    for scenario in ("unauthorized", "forbidden"):
        with pytest.raises(openai.APIStatusError) as refused:
            gateway.client(key).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                extra_headers={"x-mock-scenario": scenario})
        error = refused.value
        assert (error.status_code, error.code) == (502, "provider_credentials_refused")
        assert "sk-proj" not in error.response.text and "proj_Operator" not in error.response.text
        record = gateway.record(error.response.headers["x-policyd-request-id"])
        assert (record["status"], record["close_reason"]) == ("released", f"upstream_{403 if scenario == 'forbidden' else 401}")
    wallet = gateway.wallet("mw-upstream-auth")
    assert (wallet.balance_nanos, wallet.reserved_nanos) == (parse_amount("1"), 0)


def test_moderations_are_free_but_checked(gateway: ExampleGateway) -> None:
    key = gateway.customer("mw-moderation", credit="")
    assert gateway.client(key).moderations.create(input="fine?").results[0].flagged is False
    with pytest.raises(openai.AuthenticationError):
        gateway.client("pdk_live_" + "Q" * 40).moderations.create(input="fine?")


def test_stored_responses_are_reached_by_their_own_customer_only(gateway: ExampleGateway) -> None:
    mine = gateway.client(gateway.customer("mw-stored"))
    theirs = gateway.client(gateway.customer("mw-stored-other"))
    raw = mine.responses.with_raw_response.create(model="gpt-4o-mini", input="keep it", max_output_tokens=8)
    made = raw.parse()
    gateway.record(raw.headers["x-policyd-request-id"])  # settled: the response is known to be this customer's
    assert mine.responses.retrieve(made.id).id == made.id
    with pytest.raises(openai.NotFoundError) as refused:
        theirs.responses.retrieve(made.id)
    assert refused.value.code == "response_not_found"
    mine.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        mine.responses.retrieve(made.id)


def test_conversations_are_reached_by_their_own_customer_only(gateway: ExampleGateway) -> None:
    mine = gateway.client(gateway.customer("mw-conv"))
    theirs = gateway.client(gateway.customer("mw-conv-other"))
    raw = mine.conversations.with_raw_response.create(metadata={"topic": "t"})
    made = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])  # settled at 0 with the conversation's id
    assert (record["charge_nanos"], record["provider_response_id"]) == (0, made.id)
    mine.responses.create(model="gpt-4o-mini", input="hi", conversation=made.id, max_output_tokens=8)
    assert len(mine.conversations.items.list(made.id).data) == 2
    with pytest.raises(openai.NotFoundError) as refused:
        theirs.conversations.items.list(made.id)
    assert refused.value.code == "conversation_not_found"
    with pytest.raises(openai.NotFoundError) as refused:
        theirs.responses.create(model="gpt-4o-mini", input="hi", conversation=made.id, max_output_tokens=8)
    assert (refused.value.code, refused.value.param) == ("conversation_not_found", "conversation")
    assert mine.conversations.delete(made.id).deleted


def test_replies_carry_the_keys_own_rate_limits(gateway: ExampleGateway) -> None:
    client = gateway.client(gateway.customer("mw-paced", plan="paced"))
    remaining = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
        remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        assert raw.headers["x-ratelimit-limit-requests"] == "3" and raw.headers["x-ratelimit-reset-requests"]
    assert remaining == ["2", "1"]
    budgeted = gateway.client(gateway.customer("mw-budgeted")).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=8)  # pro: premium-day
    held = gateway.record(budgeted.headers["x-policyd-request-id"])["reserved_nanos"]
    assert (budgeted.headers["x-policyd-budget-limit"], budgeted.headers["x-policyd-budget-remaining"]) == (
        "1000.000000000", format_amount(parse_amount("1000") - held)) and budgeted.headers["x-policyd-budget-reset"]


def test_stored_chat_completions_are_reached_by_their_own_customer_only(gateway: ExampleGateway) -> None:
    mine = gateway.client(gateway.customer("mw-stored-chat"))
    theirs = gateway.client(gateway.customer("mw-stored-chat-other"))
    raw = mine.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "keep"}], max_tokens=8, store=True)
    kept = raw.parse()
    assert gateway.record(raw.headers["x-policyd-request-id"])["provider_response_id"] == kept.id
    assert mine.chat.completions.retrieve(kept.id).id == kept.id
    with pytest.raises(openai.NotFoundError) as refused:
        theirs.chat.completions.retrieve(kept.id)
    assert refused.value.code == "response_not_found"


def test_files_are_reached_by_their_own_customer_only(gateway: ExampleGateway) -> None:
    mine = gateway.client(gateway.customer("mw-files"))
    theirs = gateway.client(gateway.customer("mw-files-other"))
    raw = mine.files.with_raw_response.create(file=("a.txt", b"abc"), purpose="user_data")
    uploaded = raw.parse()
    assert gateway.record(raw.headers["x-policyd-request-id"])["provider_response_id"] == uploaded.id
    assert mine.files.content(uploaded.id).read() == b"abc"
    with pytest.raises(openai.NotFoundError) as refused:
        theirs.files.retrieve(uploaded.id)
    assert refused.value.code == "file_not_found"


def test_a_search_tool_given_no_bound_reaches_the_provider_bounded_over_the_native_api(gateway: ExampleGateway) -> None:
    """RequestShape.unbounded_file_search and AuthorizeResponse.max_tool_calls: the gateway sets the bound
    the reservation covers, and the searches run are charged."""
    key = gateway.customer("mw-tools")
    raw = gateway.client(key).responses.with_raw_response.create(
        model="gpt-4o-mini", input="mw search the files", max_output_tokens=8,
        tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}])
    sent = [r for r in gateway.mock.received() if r["body"].get("input") == "mw search the files"]
    assert sent[-1]["body"]["max_tool_calls"] == 10
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["file_searches"]) == ("settled", 1)
    assert record["reserved_nanos"] >= 10 * parse_amount("0.0025")  # the ten searches the bound allows, held


def test_the_image_generation_tool_is_charged_over_the_native_api(gateway: ExampleGateway) -> None:
    """RequestShape.image_model and Usage's image_generation figures: the tool's bound reaches the provider,
    its images are charged at gpt-image-1's prices beside the model's own tokens."""
    key = gateway.customer("mw-image-tool")
    raw = gateway.client(key).responses.with_raw_response.create(
        model="gpt-4o-mini", input="mw draw a ledger", max_output_tokens=8,
        tools=[{"type": "image_generation", "model": "gpt-image-1", "quality": "high"}])
    reply = raw.parse()
    sent = [r for r in gateway.mock.received() if r["body"].get("input") == "mw draw a ledger"]
    assert sent[-1]["body"]["max_tool_calls"] == 10
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["image_model"], record["image_generation_calls"],
            record["image_generation_input_tokens"], record["image_generation_output_tokens"]) == (
        "settled", "gpt-image-1", 1, 40, 4160)
    text = price_quantity(reply.usage.input_tokens, parse_amount("0.15")) + \
        price_quantity(reply.usage.output_tokens, parse_amount("0.60"))
    assert record["cost_nanos"] == text + price_quantity(40, parse_amount("5.00")) + \
        price_quantity(4160, parse_amount("40.00"))


def test_models_the_provider_names_otherwise_reach_it_by_that_name_over_the_native_api(
        gateway: ExampleGateway) -> None:
    """AuthorizeResponse.upstream_model: a price-table entry with `upstream_model` goes upstream by the
    provider's name, the model and an image_generation tool's alike; the record keeps the table's name."""
    client = gateway.client(gateway.customer("mw-house", plan="house"))
    raw = client.chat.completions.with_raw_response.create(
        model="house-fast", messages=[{"role": "user", "content": "mw house"}], max_tokens=8)
    usage = raw.parse().usage
    (sent,) = gateway.received("mw house")
    assert sent["body"]["model"] == "gpt-4o-mini-2024-07-18"
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["served_model"], record["cost_nanos"]) == (
        "settled", "house-fast", price_quantity(usage.prompt_tokens, parse_amount("0.30"))
        + price_quantity(usage.completion_tokens, parse_amount("1.20")))

    raw = client.responses.with_raw_response.create(
        model="house-fast", input="mw house draws", max_output_tokens=8,
        tools=[{"type": "image_generation", "model": "house-image"}])
    raw.parse()
    sent = [r for r in gateway.mock.received() if r["body"].get("input") == "mw house draws"]
    assert (sent[-1]["body"]["model"], sent[-1]["body"]["tools"][0]["model"]) == ("gpt-4o-mini-2024-07-18",
                                                                                  "gpt-image-1")
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["served_model"], record["image_model"], record["image_generation_calls"]) == (
        "settled", "house-fast", "house-image", 1)
    assert record["cost_nanos"] >= price_quantity(record["image_generation_output_tokens"], parse_amount("40.00")) > 0


def test_anthropic_messages_are_served_over_the_native_api(gateway: ExampleGateway) -> None:
    """Anthropic serves a message at its priority tier unless told standard_only, so policyd takes that tier
    as implied (RequestShape.service_tier_implied): never refused where the table does not price it (it was
    refused over the native API, service_tier_not_priced, as if the client had asked for it)."""
    body = {"model": "claude-sonnet-4", "max_tokens": 16, "messages": [{"role": "user", "content": "mw claude"}]}
    code, reply = post(f"{gateway.base_url}/messages", {
        "x-api-key": gateway.customer("mw-claude"), "content-type": "application/json",
        "anthropic-version": "2023-06-01"}, json.dumps(body).encode())
    assert code == 200 and reply["usage"]["output_tokens"] > 0, reply
    (listed,) = gateway.records("mw-claude")
    record = gateway.record(listed.request_id)
    assert (record["status"], record["served_model"], record["output_tokens"]) == (
        "settled", "claude-sonnet-4", reply["usage"]["output_tokens"])


def test_a_replys_parts_and_the_models_named_beside_it_go_over_the_native_api(gateway: ExampleGateway) -> None:
    """Over the native API (Usage.parts, RequestShape.fallback_models): a server-side fallback's declined attempt
    is charged at its own model and the reply at the fallback's; a key may not name a fallback its plan lacks."""
    key = gateway.customer("mw-claude5", plan="house")
    body = {"model": "claude-fable-5", "max_tokens": 16, "fallbacks": [{"model": "claude-opus-4-8"}],
            "messages": [{"role": "user", "content": "mw please decline midway"}]}
    headers = {"x-api-key": key, "content-type": "application/json", "anthropic-version": "2023-06-01"}
    code, reply = post(f"{gateway.base_url}/messages", headers, json.dumps(body).encode())
    assert code == 200, reply
    declined, wrote = reply["usage"]["iterations"]
    (listed,) = gateway.records("mw-claude5")
    record = gateway.record(listed.request_id)
    fable = price_quantity(declined["input_tokens"], parse_amount("10.00")) + \
        price_quantity(declined["output_tokens"], parse_amount("50.00"))
    opus = price_quantity(wrote["input_tokens"], parse_amount("5.00")) + \
        price_quantity(wrote["output_tokens"], parse_amount("25.00"))
    assert (record["served_model"], record["cost_nanos"], record["fallback_reason"]) == (
        "claude-opus-4-8", fable + opus, "provider_fallback")
    aliased = {**body, "fallbacks": [{"model": "house-claude"}],
               "messages": [{"role": "user", "content": "mw aliased please decline midway"}]}
    code, reply = post(f"{gateway.base_url}/messages", headers, json.dumps(aliased).encode())
    assert code == 200, reply
    (sent,) = gateway.received("mw aliased please decline midway")  # as the provider names it (AuthorizeResponse's)
    assert sent["body"]["fallbacks"] == [{"model": "claude-sonnet-4-20250514"}]
    code, refused = post(f"{gateway.base_url}/messages", {**headers, "x-api-key": gateway.customer("mw-claude5-pro")},
                         json.dumps({**body, "model": "claude-sonnet-4"}).encode())
    assert (code, refused["error"]["code"], refused["error"]["param"]) == (403, "model_not_allowed", "fallbacks")
    # a router's fallbacks (`models`, RequestShape.fallbacks_routed): the one that served charged, the dearest held
    routed = {"model": "gpt-4o-mini", "max_tokens": 8, "models": ["gpt-4o"],
              "messages": [{"role": "user", "content": "mw fall through"}]}
    chat = {"content-type": "application/json", "authorization": f"Bearer {gateway.customer('mw-routed')}"}
    code, reply = post(f"{gateway.base_url}/chat/completions", chat, json.dumps(routed).encode())
    assert (code, reply["model"]) == (200, "gpt-4o"), reply
    (listed,) = gateway.records("mw-routed")
    record = gateway.record(listed.request_id)
    usage = reply["usage"]
    held = price_quantity(usage["prompt_tokens"], parse_amount("2.50")) + price_quantity(8, parse_amount("10.00"))
    assert (record["served_model"], record["cost_nanos"]) == ("gpt-4o", price_quantity(
        usage["prompt_tokens"], parse_amount("2.50")) + price_quantity(usage["completion_tokens"], parse_amount("10.00")))
    assert record["reserved_nanos"] >= held  # gpt-4o's hold, not gpt-4o-mini's
    code, refused = post(f"{gateway.base_url}/chat/completions", {
        **chat, "authorization": f"Bearer {gateway.customer('mw-routed-free', plan='free')}"}, json.dumps(routed).encode())
    assert (code, refused["error"]["code"], refused["error"]["param"]) == (403, "model_not_allowed", "models")


def test_a_token_count_names_the_model_as_the_provider_does(gateway: ExampleGateway) -> None:
    counted = {"model": "house-claude", "messages": [{"role": "user", "content": "mw count house"}]}
    code, reply = post(f"{gateway.base_url}/messages/count_tokens", {
        "x-api-key": gateway.customer("mw-count-house", plan="house", credit=""), "content-type": "application/json"},
        json.dumps(counted).encode())
    assert code == 200 and reply["input_tokens"] > 0, reply
    (sent,) = [r for r in gateway.mock.received() if "mw count house" in json.dumps(r["body"])]
    assert sent["body"] == {**counted, "model": "claude-sonnet-4-20250514"}


def test_the_openai_account_a_client_names_is_never_sent_with_the_gateways_key(gateway: ExampleGateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.customer("mw-org"), organization="org-customer",
                           project="proj_customer", max_retries=0, timeout=20)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "mw whose org?"}],
                                   max_tokens=4)
    (sent,) = gateway.received("mw whose org?")
    assert sent["openai_account"] == {}


def test_a_chat_completions_cap_reaches_a_provider_that_reads_max_tokens_alone(gateway: ExampleGateway) -> None:
    """AuthorizeResponse.output_cap_field: the middleware writes the cap where the provider reads it."""
    client = gateway.client(gateway.customer("mw-compat", plan="house"))
    raw = client.chat.completions.with_raw_response.create(
        model="house-compat", messages=[{"role": "user", "content": "mw compat"}], max_completion_tokens=6)
    (sent,) = gateway.received("mw compat")
    assert "max_completion_tokens" not in sent["body"] and sent["body"]["max_tokens"] == 6
    assert gateway.record(raw.headers["x-policyd-request-id"])["output_tokens"] == raw.parse().usage.completion_tokens


def test_a_code_interpreter_container_is_charged_over_the_native_api(gateway: ExampleGateway) -> None:
    """RequestShape.containers / container_memory and Usage.containers: the container is held and charged."""
    key = gateway.customer("mw-containers")
    raw = gateway.client(key).responses.with_raw_response.create(
        model="gpt-4o-mini", input="mw compute", max_output_tokens=8,
        tools=[{"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "4g"}}])
    reply = raw.parse()
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["status"], record["containers"], record["container_memory"]) == ("settled", 1, "4g")
    assert record["cost_nanos"] == price_quantity(reply.usage.input_tokens, parse_amount("0.15")) + \
        price_quantity(reply.usage.output_tokens, parse_amount("0.60")) + parse_amount("0.12")


def test_an_image_tool_naming_no_model_is_given_the_plans_over_the_native_api(gateway: ExampleGateway) -> None:
    """RequestShape.image_model_default and AuthorizeResponse.image_model: the gateway names the plan's image
    model in the tool, and its image is charged at that model's prices."""
    key = gateway.customer("mw-image-default")
    raw = gateway.client(key).responses.with_raw_response.create(
        model="gpt-4o-mini", input="mw draw a default ledger", max_output_tokens=8, max_tool_calls=1,
        tools=[{"type": "image_generation", "quality": "medium"}])
    sent = [r for r in gateway.mock.received() if r["body"].get("input") == "mw draw a default ledger"][-1]
    assert sent["body"]["tools"][0]["model"] == "gpt-image-1"
    record = gateway.record(raw.headers["x-policyd-request-id"])
    assert (record["image_model"], record["image_generation_output_tokens"]) == ("gpt-image-1", 1056)
