"""The ext_proc servicer's two streams, message by message (tests/test_gateway.py runs them through a
real Envoy): the processing filter hands a stream over to the observer filter and reads other
replies itself, and whichever reads the response settles, releases or estimates it."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from redis.exceptions import ConnectionError as RedisConnectionError

from policyd.domain import Decision
from policyd.exchange import EXT_AUTHZ_NAMESPACE, EXT_PROC_NAMESPACE, Exchange
from policyd.ext_proc import ExternalProcessorServicer
from policyd.providers import Account, ProviderPool
from policyd.upstream import OBSERVER_HEADER

NONE = processing_mode_pb2.ProcessingMode.NONE
STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


class RecordingEngine:
    """Records how each request was closed; closings run as Engine's do (in tasks of their own)."""

    def __init__(self) -> None:
        self.closed: list[tuple[str, ...]] = []
        self.tasks: set[asyncio.Task] = set()

    def close_in_background(self, closing: Any, request_id: str) -> None:
        self.tasks.add(asyncio.ensure_future(closing()))

    async def finish(self) -> None:
        await asyncio.gather(*self.tasks)

    async def settle(self, report: Any) -> None:
        self.closed.append(("settle", report.request_id, report.input_tokens, report.output_tokens,
                            report.stream_interrupted))

    async def settle_estimated(self, request_id: str, output_tokens: int, **kwargs: Any) -> None:
        self.closed.append(("estimate", request_id, output_tokens, kwargs["interrupted"], kwargs["error_class"],
                            *(("as held",) if kwargs.get("output_as_held") else ())))

    async def release(self, request_id: str, reason: str) -> None:
        self.closed.append(("release", request_id, reason))

    async def authorize_for_proxy(self, request: Any, cooling: Any) -> Decision:  # the ext_proc shape decides: allowed
        return Decision("allow", "r-1", requested_model="gpt-4o-mini", served_model="gpt-4o-mini", provider="openai",
                        route="openai", max_output_tokens=64)


def exchange(request_id: str = "r-1", stream: bool = True, observed: bool = True) -> Exchange:
    """As ext_authz decides it: the observer filter reads the reply."""
    return Exchange(request_id=request_id, endpoint="chat_completions", stream=stream, requested_model="gpt-4o-mini",
                    served_model="gpt-4o-mini", output_cap=64, client_gave_cap=False, account="openai-1",
                    observed=observed)


def headers(status: str | None = None, **more: str) -> ep.HttpHeaders:
    pairs = ([(":status", status)] if status else [(":method", "POST"), (":path", "/v1/chat/completions")])
    pairs += list(more.items())
    return ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k.replace("_", "-"), raw_value=v.encode()) for k, v in pairs]))


def with_metadata(message: ep.ProcessingRequest, namespace: str = EXT_AUTHZ_NAMESPACE,
                  ex: Exchange | None = None) -> ep.ProcessingRequest:
    metadata = (ex or exchange()).metadata(namespace)
    if namespace == EXT_AUTHZ_NAMESPACE:
        message.metadata_context.filter_metadata[namespace].CopyFrom(metadata)
    else:
        message.metadata_context.filter_metadata[namespace].CopyFrom(metadata.fields[namespace].struct_value)
    return message


REQUEST = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
STREAM_REQUEST = b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'


def after_ext_authz(*tail: ep.ProcessingRequest, response_body_mode: int = NONE,
                    metadata: Exchange | None = None) -> list[ep.ProcessingRequest]:
    """The processing filter's messages after ext_authz allowed r-1: the request headers, with the
    decision's metadata, and the body; then `tail` (the response, which older gateway configs sent it)."""
    first = with_metadata(ep.ProcessingRequest(request_headers=headers()), ex=metadata or exchange())
    first.protocol_config.response_body_mode = response_body_mode
    body = ep.ProcessingRequest(request_body=ep.HttpBody(body=STREAM_REQUEST, end_of_stream=True))
    return [first, body, *tail]


def ext_proc_shape(*tail: ep.ProcessingRequest, stream: bool = True) -> list[ep.ProcessingRequest]:
    """The processing filter's messages when it is the only deciding filter: it decides at the body."""
    first = ep.ProcessingRequest(request_headers=headers(authorization="Bearer pdk_test_" + "a" * 40,
                                                         content_type="application/json"))
    first.protocol_config.response_body_mode = NONE
    body = ep.ProcessingRequest(request_body=ep.HttpBody(body=STREAM_REQUEST if stream else REQUEST,
                                                         end_of_stream=True))
    return [first, body, *tail]


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def body(data: bytes, end: bool = False) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=end), observability_mode=True)


def observed(*messages: ep.ProcessingRequest, namespace: str = EXT_AUTHZ_NAMESPACE,
             ex: Exchange | None = None) -> list[ep.ProcessingRequest]:
    """The observer filter's messages: each carries the decision's metadata and observability_mode."""
    out = []
    for m in messages:
        m.observability_mode = True
        out.append(with_metadata(m, namespace, ex))
    return out


async def run(servicer: ExternalProcessorServicer, messages: list[ep.ProcessingRequest]) -> list[Any]:
    async def stream() -> AsyncIterator[ep.ProcessingRequest]:
        for m in messages:
            yield m

    return [reply async for reply in servicer.Process(stream(), None)]


def servicer() -> tuple[ExternalProcessorServicer, RecordingEngine, ProviderPool]:
    engine = RecordingEngine()
    pool = ProviderPool([Account("openai-1", "openai", "openai", "bearer", "sk-1")])
    return ExternalProcessorServicer(engine, pool), engine, pool  # type: ignore[arg-type]


async def test_after_ext_authz_the_processing_filter_rewrites_the_body_and_the_observer_reads_the_reply() -> None:
    s, engine, _ = servicer()
    replies = await run(s, after_ext_authz())
    await engine.finish()
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body"]
    rewritten = json.loads(replies[1].request_body.response.body_mutation.body)
    assert (rewritten["stream_options"], rewritten["max_completion_tokens"]) == ({"include_usage": True}, 64)
    assert engine.closed == []  # the observer closes it, not this stream's end
    chunk = {"choices": [{"index": 0, "delta": {"content": "hello"}}]}
    replies = await run(s, observed(ep.ProcessingRequest(request_headers=headers()),
                                    ep.ProcessingRequest(response_headers=headers("200")),
                                    body(sse(chunk)[:20]), body(sse(chunk, {"choices": [], "usage": USAGE})[20:]),
                                    body(b"", end=True)))
    await engine.finish()
    assert replies == []  # observability mode: nothing is answered
    assert engine.closed == [("settle", "r-1", 11, 7, False)]


async def test_after_ext_authz_the_observer_reads_replies_that_are_not_streams_too() -> None:
    s, engine, _ = servicer()
    reply = {"choices": [{"index": 0, "message": {"content": "hi"}}], "usage": USAGE}
    data = json.dumps(reply).encode()
    await run(s, observed(ep.ProcessingRequest(request_headers=headers()),
                          ep.ProcessingRequest(response_headers=headers("200")), body(data[:9]), body(data[9:], end=True),
                          ex=exchange(stream=False)))
    await engine.finish()
    assert engine.closed == [("settle", "r-1", 11, 7, False)]


async def test_after_ext_authz_a_client_gone_before_its_reply_began_is_charged_by_the_observer() -> None:
    """The provider has the request and bills it: a stream's input (it stops when its client leaves); a reply
    not streamed, made whole all the same, its input and the output held for it."""
    for stream, held in ((True, ()), (False, ("as held",))):
        s, engine, _ = servicer()  # the observer's stream opens at the request headers; Envoy closes it at the cut
        await run(s, observed(ep.ProcessingRequest(request_headers=headers()), ex=exchange(stream=stream)))
        await engine.finish()
        assert engine.closed == [("estimate", "r-1", 0, True, "usage_estimated:client_gone", *held)]


async def test_an_older_gateway_configs_processing_filter_hands_streams_to_the_observer_and_reads_the_rest() -> None:
    """Its processing filter gets the request headers first; a decision from before the observed
    field (an older replica's ext_authz) had the observer read streams alone."""
    s, engine, _ = servicer()
    for stream in (True, False):
        metadata = exchange(request_id=f"r-{stream}", stream=stream, observed=stream)
        replies = await run(s, after_ext_authz(ep.ProcessingRequest(response_headers=headers("200")),
                                               metadata=metadata))
        await engine.finish()
        if stream:  # the observer reads it: the processing filter's stream ends after the body, Envoy goes on
            assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body"]
            continue
        assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body", "response_headers"]
        assert replies[2].HasField("mode_override")  # a reply that is not a stream: its body, please
    # the reply that is not a stream began, then its stream was cut (this one read it): made whole by the
    # provider, it is charged its output as held; the stream is the observer's
    assert engine.closed == [("estimate", "r-False", 0, True, "usage_estimated:stream_cut", "as held")]
    raw = exchange(stream=True).metadata(EXT_AUTHZ_NAMESPACE)
    del raw.fields["observed"]
    old = ep.ProcessingRequest(request_headers=headers())
    old.metadata_context.filter_metadata[EXT_AUTHZ_NAMESPACE].CopyFrom(raw)
    assert Exchange.from_metadata(old).observed  # a stream: the observer read it


async def test_the_processing_filters_stream_ends_once_it_has_nothing_left_to_do() -> None:
    """Ended cleanly, Envoy goes on without it (ext_proc's protocol), so the reply's fate no longer hangs on
    the replica: this filter fails closed, and a stream it kept open to the reply's end failed the reply
    when its replica stopped or was lost mid-way (tests/test_replica_stops.py)."""
    s, engine, _ = servicer()
    more = ep.ProcessingRequest(response_trailers=ep.HttpTrailers())  # answered only if the stream went on
    replies = await run(s, after_ext_authz(more))  # ext_authz decided; the observer reads the reply
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body"]
    replies = await run(s, ext_proc_shape(ep.ProcessingRequest(response_headers=headers("200")), more))
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body", "response_headers"]
    await engine.finish()
    assert engine.closed == []  # the observer's to close
    assert s.streams_open == 0  # counted while open, for a shutdown to wait for


async def test_a_processing_stream_envoy_ends_as_the_request_goes_on_leaves_its_reply_to_the_observer() -> None:
    """Envoy ends the processing filter's stream when the request is done with it; a provider it cannot reach (its
    connection refused) ends it before this stream has taken up its next message, and grpc closes the stream at
    the reply it last gave. That counted as a client gone: the request was charged as held (seen through the
    gateway: a third of the requests to a provider down, kept-alive, charged), and the observer, reading the
    provider's 503, found it settled. The observer, after this filter in the chain, has every request that went on
    past it, and is the one to close it."""
    s, engine, _ = servicer()
    messages = after_ext_authz()

    async def stream() -> AsyncIterator[ep.ProcessingRequest]:
        for m in messages:
            yield m
        await asyncio.Event().wait()  # the stream stays open until Envoy ends it

    replies = s.Process(stream(), None)
    assert (await anext(replies)).WhichOneof("response") == "request_headers"
    assert (await anext(replies)).WhichOneof("response") == "request_body"
    await replies.aclose()  # Envoy ended it while the body's reply was its last
    for _ in range(3):  # the loop finalizes the inner generator the stream was reading
        await asyncio.sleep(0)
    await engine.finish()
    assert engine.closed == [] and s.streams_open == 0
    await run(s, observed(ep.ProcessingRequest(request_headers=headers()),
                          ep.ProcessingRequest(response_headers=headers("503"))))
    await engine.finish()
    assert engine.closed == [("release", "r-1", "upstream_503")]
    # until the body's reply lets the request go on, Envoy waits for this stream, and the observer (after it) has
    # not seen the request: one whose client went away then never reached the provider, and is released at once
    s, engine, _ = servicer()
    await run(s, after_ext_authz()[:1])  # the stream ends before the body's message
    await engine.finish()
    assert engine.closed == [("release", "r-1", "client_gone")]


async def test_the_observer_learns_the_request_from_the_deciding_ext_proc_namespace() -> None:
    s, engine, _ = servicer()
    await run(s, observed(ep.ProcessingRequest(response_headers=headers("200")),
                          body(sse({"choices": [], "usage": USAGE}), end=True), namespace=EXT_PROC_NAMESPACE))
    await engine.finish()
    assert engine.closed == [("settle", "r-1", 11, 7, False)]
    # a reply no allowed request led to (a local reply) carries no decision: nothing is closed
    await run(s, [ep.ProcessingRequest(response_headers=headers("403"), observability_mode=True)])
    await engine.finish()
    assert len(engine.closed) == 1


async def test_a_response_cut_before_its_end_is_estimated_when_envoy_closes_the_observer() -> None:
    s, engine, _ = servicer()
    chunk = {"choices": [{"index": 0, "delta": {"content": "12345678"}}]}
    await run(s, observed(ep.ProcessingRequest(response_headers=headers("200")), body(sse(chunk, chunk)[:-14])))
    await engine.finish()
    assert engine.closed == [("estimate", "r-1", 4, True, "usage_estimated:stream_cut")]  # 16 bytes delivered


async def test_a_reply_left_unread_as_policyd_stops_is_charged_as_held_not_as_cut() -> None:
    """Past its shutdown grace a replica stops reading the streams still open; Envoy's observer goes on
    without it and the reply reaches its client whole, so what was delivered so far is not what it costs."""
    s, engine, _ = servicer()
    s.abandoning = True
    chunk = {"choices": [{"index": 0, "delta": {"content": "12345678"}}]}
    await run(s, observed(ep.ProcessingRequest(response_headers=headers("200")), body(sse(chunk, chunk)[:-14])))
    await run(s, observed(ep.ProcessingRequest(request_headers=headers()), ex=exchange("r-2")))  # reply not begun
    await run(s, observed(ep.ProcessingRequest(response_headers=headers("503")), ex=exchange("r-3")))  # it failed
    # the provider's usage of the whole reply came before the end: exact, as for a cut after it
    await run(s, observed(ep.ProcessingRequest(response_headers=headers("200")),
                          body(sse({"choices": [], "usage": USAGE})[:-14]), ex=exchange("r-4")))
    await engine.finish()
    assert sorted(engine.closed) == [
        ("estimate", "r-1", 4, True, "usage_estimated:unread_at_shutdown", "as held"),
        ("estimate", "r-2", 0, True, "usage_estimated:unread_at_shutdown", "as held"),
        ("release", "r-3", "upstream_503"),
        ("settle", "r-4", 11, 7, True)]


async def test_an_upstream_error_is_released_and_cools_the_account_down_before_the_client_sees_it() -> None:
    s, engine, pool = servicer()  # ext_proc shape: the processing filter sees the response headers
    await run(s, ext_proc_shape(ep.ProcessingRequest(response_headers=headers("429", retry_after="7"))))
    assert pool.cooling_providers() == {"openai"}  # at the processing filter, synchronously
    await run(s, observed(ep.ProcessingRequest(response_headers=headers("429")), body(b'{"error": {}}', end=True),
                          namespace=EXT_PROC_NAMESPACE))
    await engine.finish()
    assert engine.closed == [("release", "r-1", "upstream_429")]
    s, engine, pool = servicer()  # after ext_authz: the observer, as soon as the headers pass
    await run(s, observed(ep.ProcessingRequest(request_headers=headers()),
                          ep.ProcessingRequest(response_headers=headers("503")), body(b'{"error": {}}', end=True)))
    await engine.finish()
    assert pool.cooling_providers() == {"openai"} and engine.closed == [("release", "r-1", "upstream_503")]
    s, engine, pool = servicer()  # Anthropic's 529 (overloaded_error): its accounts cool, a plan's fallbacks serve
    await run(s, observed(ep.ProcessingRequest(request_headers=headers()),
                          ep.ProcessingRequest(response_headers=headers("529")), body(b'{"error": {}}', end=True)))
    await engine.finish()
    assert pool.cooling_providers() == {"openai"} and engine.closed == [("release", "r-1", "upstream_529")]


async def test_a_reply_the_gateway_stopped_waiting_for_is_charged_as_held_and_cools_no_account() -> None:
    """Envoy's own 504 for its route timeout (marked by the gateway config's local reply): the provider goes
    on and bills the request, so it is charged as held; the account did nothing wrong and is not cooled."""
    s, engine, pool = servicer()
    await run(s, observed(ep.ProcessingRequest(request_headers=headers()),
                          ep.ProcessingRequest(response_headers=headers("504", **{"x-policyd-gateway-timeout": "yes"})),
                          body(b"upstream request timeout", end=True), ex=exchange(stream=False)))
    await engine.finish()
    assert engine.closed == [("estimate", "r-1", 0, True, "usage_estimated:gateway_timeout", "as held")]
    assert pool.cooling_providers() == set()
    s, engine, pool = servicer()  # the provider's own 504: released, its account cooled down
    await run(s, observed(ep.ProcessingRequest(request_headers=headers()),
                          ep.ProcessingRequest(response_headers=headers("504")), body(b"{}", end=True),
                          ex=exchange(stream=False)))
    await engine.finish()
    assert engine.closed == [("release", "r-1", "upstream_504")] and pool.cooling_providers() == {"openai"}


async def test_in_the_ext_proc_shape_a_client_gone_before_its_response_began_is_charged_by_the_processing_filter(
        ) -> None:
    s, engine, _ = servicer()
    replies = await run(s, ext_proc_shape())
    await engine.finish()
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body"]
    assert engine.closed == [("estimate", "r-1", 0, True, "usage_estimated:client_gone")]  # a stream: its input


async def test_in_the_ext_proc_shape_every_reply_is_handed_to_the_observer() -> None:
    """The processing stream decides and reads the response headers; it asks for no body (a mode_override
    for a body that came with its headers was at times passed on by Envoy unsent, and the reply settled as
    cut): the observer filter reads every reply, a stream or not, from the metadata the decision left."""
    s, engine, _ = servicer()
    for stream in (False, True):
        replies = await run(s, ext_proc_shape(ep.ProcessingRequest(response_headers=headers("200")), stream=stream))
        assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body", "response_headers"]
        assert not replies[2].HasField("mode_override")
        metadata = replies[1].dynamic_metadata.fields[EXT_PROC_NAMESPACE].struct_value
        assert metadata.fields["observed"].bool_value
        observer_header = [h.header for h in replies[1].request_body.response.header_mutation.set_headers
                           if h.header.key == OBSERVER_HEADER]
        assert [h.raw_value or h.value.encode() for h in observer_header] == [b"read"]
    await engine.finish()
    assert engine.closed == []  # neither stream's end closes them: the observer's does
    reply = {"choices": [{"index": 0, "message": {"content": "hi"}}], "usage": USAGE}
    data = json.dumps(reply).encode()
    await run(s, observed(ep.ProcessingRequest(response_headers=headers("200")), body(data[:9]), body(data[9:], end=True),
                          namespace=EXT_PROC_NAMESPACE, ex=exchange(stream=False)))
    await engine.finish()
    assert engine.closed == [("settle", "r-1", 11, 7, False)]


async def test_a_processing_filter_sent_response_bodies_reads_and_settles_them_itself() -> None:  # a gateway config rendered before the observer filter existed
    s, engine, _ = servicer()
    replies = await run(s, after_ext_authz(
        ep.ProcessingRequest(response_headers=headers("200")),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=sse({"choices": [], "usage": USAGE}))),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=b"", end_of_stream=True)), response_body_mode=STREAMED))
    await engine.finish()
    assert [r.WhichOneof("response") for r in replies][-2:] == ["response_body", "response_body"]
    assert engine.closed == [("settle", "r-1", 11, 7, False)]


class FailingEngine(RecordingEngine):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def authorize_for_proxy(self, request: Any, cooling: Any) -> Decision:
        raise self.error


@pytest.mark.parametrize(("error", "status", "reason"), [
    (RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."), 503, "unavailable"),
    (RuntimeError("SELECT * FROM api_keys WHERE secret_hash = 'abc' " + "x" * 40_000), 500, "internal"),
])
async def test_in_the_ext_proc_shape_an_unexpected_error_is_answered_as_an_openai_error(
        error: Exception, status: int, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    engine = FailingEngine(error)
    s = ExternalProcessorServicer(engine, ProviderPool([]))  # type: ignore[arg-type]
    replies = await run(s, ext_proc_shape())
    await engine.finish()
    answer = replies[-1].immediate_response
    assert answer.status.code == status
    body = json.loads(answer.body)["error"]
    assert (body["type"], body["code"]) == ("server_error", reason)
    assert "SELECT" not in answer.body.decode() and "111" not in answer.body.decode()  # the error's text stays in the log
    assert answer.details == f"policyd_{reason}"
    assert engine.closed == []  # nothing reserved, nothing to close
    assert any(r.exc_info and r.exc_info[1] is error for r in caplog.records)


GEMINI_PATH = "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"


def gemini_downgrade() -> Exchange:
    return Exchange(request_id="r-1", endpoint="gemini_generate_content", stream=True,
                    requested_model="gemini-2.5-pro", served_model="gemini-2.5-flash", output_cap=64,
                    client_gave_cap=True, account="google-1", model_in_path=True, observed=True)


def paths_set(reply: Any) -> list[str]:
    common = reply.request_headers.response if reply.HasField("request_headers") else reply.request_body.response
    return [h.header.raw_value.decode() for h in common.header_mutation.set_headers if h.header.key == ":path"]


async def test_after_ext_authz_a_gemini_request_served_by_another_model_has_that_model_in_its_path() -> None:
    s, _, _ = servicer()
    first = with_metadata(ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":path", raw_value=GEMINI_PATH.encode())]))), ex=gemini_downgrade())
    first.protocol_config.response_body_mode = NONE
    replies = await run(s, [first, ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"contents": []}',
                                                                                end_of_stream=True))])
    assert paths_set(replies[0]) == ["/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"]
    # the model it was asked for: the path stays as it came
    same = with_metadata(ep.ProcessingRequest(request_headers=headers()), ex=exchange())
    assert paths_set((await run(s, [same]))[0]) == []


class DowngradingEngine(RecordingEngine):
    async def authorize_for_proxy(self, request: Any, cooling: Any) -> Decision:
        return Decision("downgrade", "r-1", requested_model=request.model, served_model="gemini-2.5-flash",
                        provider="google", route="google", max_output_tokens=64)


async def test_in_the_ext_proc_shape_the_served_model_and_no_customer_key_go_upstream_in_the_path() -> None:
    engine = DowngradingEngine()
    s = ExternalProcessorServicer(engine, ProviderPool([Account("google-1", "google", "google", "x-goog-api-key",  # type: ignore[arg-type]
                                                                "g-1")]))
    first = ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":method", raw_value=b"POST"),
        base_pb2.HeaderValue(key=":path", raw_value=(GEMINI_PATH + "&key=pdk_test_" + "a" * 40).encode())])))
    first.protocol_config.response_body_mode = NONE
    body = ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"contents": []}', end_of_stream=True))
    replies = await run(s, [first, body])
    assert paths_set(replies[1]) == ["/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"]


@pytest.mark.parametrize("base_url", ["", "https://provider.example/v1"])
async def test_in_the_ext_proc_shape_a_background_response_policyd_cannot_follow_is_refused(base_url: str) -> None:
    """As in the two-filter shape (tests/test_ext_authz.py): refused, released, unless its account has a base_url."""
    engine = RecordingEngine()
    pool = ProviderPool([Account("openai-1", "openai", "openai", "bearer", "sk-1", base_url=base_url)])
    s = ExternalProcessorServicer(engine, pool)  # type: ignore[arg-type]
    messages = ext_proc_shape(stream=False)
    messages[0].request_headers.headers.headers[1].raw_value = b"/v1/responses"
    messages[1].request_body.body = b'{"model": "gpt-4o-mini", "input": "research", "background": true}'
    replies = await run(s, messages)
    await engine.finish()
    if base_url:
        assert replies[-1].WhichOneof("response") == "request_body"  # on to the provider
        assert not [c for c in engine.closed if c[0] == "release"]
        return
    answer = replies[-1].immediate_response
    error = json.loads(answer.body)["error"]
    assert (answer.status.code, error["code"], error["param"]) == (400, "invalid_request", "background")
    assert engine.closed == [("release", "r-1", "background_unfollowable")]
