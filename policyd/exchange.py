"""One proxied request, from its decision to its settle, as the Envoy filters carry it.

The filter that decides (ext_authz, or ext_proc when it is the only one) puts what the rest of the
request needs into Envoy's dynamic metadata; the filters that read the response (ext_proc, and the
observer that reads streams) take it from there. Nothing about a request is kept in one
policyd process between those filters, so each gRPC stream may reach any replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import struct_pb2

from policyd.batches import hold_seconds
from policyd.domain import Decision
from policyd.http_api import HttpCall, body_sent, rewrite_body, upstream_path
from policyd.multipart import MultipartForm
from policyd.usage_capture import BATCHES, ResponseReader

EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"  # where ext_authz's dynamic metadata lands
EXT_PROC_NAMESPACE = "policyd"  # where the deciding ext_proc puts it (its receiving_namespaces)
NAMESPACES = (EXT_AUTHZ_NAMESPACE, EXT_PROC_NAMESPACE)


@dataclass
class Exchange:
    """What policyd knows of one proxied request, from Authorize to Settle."""

    request_id: str
    endpoint: str
    stream: bool
    requested_model: str
    served_model: str
    output_cap: int
    client_gave_cap: bool
    account: str
    upstream_model: str = ""  # the served model as the provider names it ("" = served_model)
    usage_unasked: bool = False  # a stream whose usage event the gateway keeps from its client (unasked_usage)
    output_cap_field: str = ""  # where a chat completion's cap goes ("" = max_completion_tokens; Decision's)
    stream_usage_reported: bool = False  # the provider reports a stream's usage unasked (Decision's)
    model_in_path: bool = False  # the path names the model (Gemini, an Azure deployment)
    input_tokens: int = 0  # the request's own count of its input (token ids; text to speech's characters)
    stored: bool = False  # the provider keeps the reply (a chat completion's store: true): its id is remembered
    tool_call_cap: int = 0  # the bound set for the request's unbounded search tools (Decision.max_tool_calls)
    image_model: str = ""  # the model set in an image_generation tool naming none (Decision.image_model)
    # the models set in Anthropic's fallbacks and advisor tool, as the provider names them (Decision's)
    fallback_models: tuple[str, ...] = ()
    advisor_model: str = ""
    observed: bool = False  # the observer filter reads the response (else the processing filter does)
    free: bool = False  # a token count (free at the provider): its body may be rewritten; nothing to read or settle
    background: bool = False  # a background response: charged once the provider says it ended (Closing poll)
    batch_seconds: int = 0  # a batch made (endpoint "batches"): how long its hold is kept once the provider has it
    status: int = 0
    retry_after: int = 0
    attempts: int = 1  # upstream attempts Envoy made (x-envoy-attempt-count)
    gateway_timed_out: bool = False  # the status is the gateway's own: it gave up on the provider
    closed: bool = False
    # the reply's own headers policyd adds (its request id, the key's rate limits), where one filter both
    # decides and sees the reply (the ext_proc-only shape); not carried in metadata
    reply_headers: tuple[tuple[str, str], ...] = ()
    reader: ResponseReader = field(init=False)

    def __post_init__(self) -> None:
        self.reader = ResponseReader(self.endpoint, self.stream, self.input_tokens, stored=self.stored,
                                     output_cap=self.output_cap)

    @classmethod
    def of(cls, call: HttpCall, decision: Decision, account: str, observed: bool) -> "Exchange":
        """The exchange an allowed request begins."""
        if call.batch:  # a batch made: its reply is read as the batch it names, charged when it ends
            return cls(request_id=decision.request_id, endpoint=BATCHES, stream=False,
                       requested_model=decision.requested_model, served_model=decision.served_model,
                       upstream_model=decision.upstream_model, output_cap=decision.max_output_tokens,
                       client_gave_cap=True, account=account, observed=observed, stored=True,
                       batch_seconds=hold_seconds(call.batch_seconds))
        return cls(request_id=decision.request_id, endpoint=call.endpoint, stream=call.stream,
                   requested_model=decision.requested_model, served_model=decision.served_model,
                   upstream_model=decision.upstream_model,
                   usage_unasked=observed and call.usage_kept_from_client(decision.stream_usage_reported),
                   output_cap_field=decision.output_cap_field, stream_usage_reported=decision.stream_usage_reported,
                   output_cap=decision.max_output_tokens,
                   client_gave_cap=call.keeps_its_cap_under(decision.max_output_tokens),
                   account=account, model_in_path=call.model_in_path, input_tokens=call.input_tokens,
                   observed=observed, stored=call.stores_reply, tool_call_cap=decision.max_tool_calls,
                   image_model=decision.image_model, background=call.background,
                   fallback_models=decision.fallback_models, advisor_model=decision.advisor_model)

    @property
    def sent_model(self) -> str:
        """The model the request goes upstream with: the served one, as the provider names it."""
        return self.upstream_model or self.served_model

    @property
    def model_in_path_changes(self) -> bool:
        """The path names the model: serving another one (or one the provider names otherwise) means
        rewriting the path."""
        return self.model_in_path and self.sent_model != self.requested_model

    def upstream_path(self, path: str) -> str:
        return upstream_path(path, self.sent_model, self.requested_model)

    def rewrite(self, body: Any) -> dict[str, Any] | MultipartForm | None:
        """The request body (parsed) policy requires instead of the client's, or None to send it as it is."""
        if not isinstance(body, (dict, MultipartForm)):
            return None
        return rewrite_body(body, self.endpoint, self.sent_model, self.requested_model, self.output_cap,
                            self.client_gave_cap, self.stream, self.model_in_path, self.tool_call_cap,
                            self.image_model, self.output_cap_field, self.stream_usage_reported,
                            self.fallback_models, self.advisor_model)

    def rewritten(self, body: Any, decoded: bool = False) -> bytes | None:
        """`rewrite`, encoded for the provider (http_api.body_sent; `decoded`: a body the client compressed)."""
        return body_sent(body, self.rewrite(body), decoded)

    def metadata(self, namespace: str, decision: str = "") -> struct_pb2.Struct:
        """Envoy dynamic metadata that `from_metadata` reads back in a later filter."""
        fields: dict[str, Any] = {
            "request_id": self.request_id, "endpoint": self.endpoint, "stream": self.stream,
            "requested_model": self.requested_model, "served_model": self.served_model,
            "max_output_tokens": self.output_cap, "client_gave_cap": self.client_gave_cap, "account": self.account,
            "observed": self.observed, "model_in_path": self.model_in_path, "input_tokens": self.input_tokens,
        }
        if self.upstream_model and self.upstream_model != self.served_model:
            fields["upstream_model"] = self.upstream_model
        if self.output_cap_field:
            fields["output_cap_field"] = self.output_cap_field
        if self.stream_usage_reported:
            fields["stream_usage_reported"] = True
        if self.free:
            fields["free"] = True
        if self.stored:
            fields["stored"] = True
        if self.background:
            fields["background"] = True
        if self.batch_seconds:
            fields["batch_seconds"] = self.batch_seconds
        if self.tool_call_cap:
            fields["max_tool_calls"] = self.tool_call_cap
        if self.image_model:
            fields["image_model"] = self.image_model
        if self.fallback_models:
            fields["fallback_models"] = list(self.fallback_models)
        if self.advisor_model:
            fields["advisor_model"] = self.advisor_model
        if decision:
            fields["decision"] = decision
        out = struct_pb2.Struct()
        out.update(fields if namespace == EXT_AUTHZ_NAMESPACE else {namespace: fields})
        return out

    @classmethod
    def from_metadata(cls, request: Any, namespaces: tuple[str, ...] = NAMESPACES) -> "Exchange | None":
        """The exchange a deciding filter began, or None when none decided this request.

        Only metadata counts: a request id header could come from the client, metadata only from
        Envoy's own filters."""
        filter_metadata = request.metadata_context.filter_metadata
        for namespace in namespaces:
            if namespace in filter_metadata:
                fields = filter_metadata[namespace].fields  # read directly: a Struct of strings, numbers, booleans
                break
        else:
            return None
        request_id = fields["request_id"].string_value if "request_id" in fields else ""
        if not request_id:
            return None

        def text(name: str) -> str:
            return fields[name].string_value if name in fields else ""

        return cls(
            request_id=request_id, endpoint=text("endpoint"),
            stream="stream" in fields and fields["stream"].bool_value,
            requested_model=text("requested_model"), served_model=text("served_model"),
            upstream_model=text("upstream_model"), output_cap_field=text("output_cap_field"),
            stream_usage_reported="stream_usage_reported" in fields and fields["stream_usage_reported"].bool_value,
            output_cap=int(fields["max_output_tokens"].number_value) if "max_output_tokens" in fields else 0,
            client_gave_cap="client_gave_cap" in fields and fields["client_gave_cap"].bool_value,
            account=text("account"),
            # a decision from before the field: Gemini alone named the model in the path
            model_in_path=fields["model_in_path"].bool_value if "model_in_path" in fields else
            text("endpoint") == "gemini_generate_content",
            input_tokens=int(fields["input_tokens"].number_value) if "input_tokens" in fields else 0,
            # a decision from before the field: the observer read streams alone
            observed=fields["observed"].bool_value if "observed" in fields else
            "stream" in fields and fields["stream"].bool_value,
            stored="stored" in fields and fields["stored"].bool_value,
            free="free" in fields and fields["free"].bool_value,
            background="background" in fields and fields["background"].bool_value,
            batch_seconds=int(fields["batch_seconds"].number_value) if "batch_seconds" in fields else 0,
            tool_call_cap=int(fields["max_tool_calls"].number_value) if "max_tool_calls" in fields else 0,
            image_model=text("image_model"), advisor_model=text("advisor_model"),
            fallback_models=tuple(v.string_value for v in fields["fallback_models"].list_value.values)
            if "fallback_models" in fields else (),
        )
