from policyd_client.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    ALLOW: _ClassVar[Decision]
    DENY: _ClassVar[Decision]
    DOWNGRADE: _ClassVar[Decision]

class SettleOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SETTLE_OUTCOME_UNSPECIFIED: _ClassVar[SettleOutcome]
    SETTLED: _ClassVar[SettleOutcome]
    EXISTS: _ClassVar[SettleOutcome]
    SETTLED_LATE: _ClassVar[SettleOutcome]

class ReleaseOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELEASE_OUTCOME_UNSPECIFIED: _ClassVar[ReleaseOutcome]
    RELEASED: _ClassVar[ReleaseOutcome]
    ALREADY_RELEASED: _ClassVar[ReleaseOutcome]
    ALREADY_EXPIRED: _ClassVar[ReleaseOutcome]
DECISION_UNSPECIFIED: Decision
ALLOW: Decision
DENY: Decision
DOWNGRADE: Decision
SETTLE_OUTCOME_UNSPECIFIED: SettleOutcome
SETTLED: SettleOutcome
EXISTS: SettleOutcome
SETTLED_LATE: SettleOutcome
RELEASE_OUTCOME_UNSPECIFIED: ReleaseOutcome
RELEASED: ReleaseOutcome
ALREADY_RELEASED: ReleaseOutcome
ALREADY_EXPIRED: ReleaseOutcome

class UsageSummaryRequest(_message.Message):
    __slots__ = ("api_key", "group_by", "bucket", "since_unix", "until_unix", "timezone")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    group_by: _containers.RepeatedScalarFieldContainer[str]
    bucket: str
    since_unix: int
    until_unix: int
    timezone: str
    def __init__(self, api_key: _Optional[str] = ..., group_by: _Optional[_Iterable[str]] = ..., bucket: _Optional[str] = ..., since_unix: _Optional[int] = ..., until_unix: _Optional[int] = ..., timezone: _Optional[str] = ...) -> None: ...

class UsageSummary(_message.Message):
    __slots__ = ("currency", "since_unix", "until_unix", "groups", "truncated")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    currency: str
    since_unix: int
    until_unix: int
    groups: _containers.RepeatedCompositeFieldContainer[UsageGroup]
    truncated: bool
    def __init__(self, currency: _Optional[str] = ..., since_unix: _Optional[int] = ..., until_unix: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[UsageGroup, _Mapping]]] = ..., truncated: _Optional[bool] = ...) -> None: ...

class UsageGroup(_message.Message):
    __slots__ = ("group", "bucket", "requests", "allowed", "denied", "downgraded", "failed", "retries", "input_tokens", "cached_input_tokens", "output_tokens", "charge", "refunded", "usage")
    class GroupEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class UsageEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    DOWNGRADED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHARGE_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    group: _containers.ScalarMap[str, str]
    bucket: str
    requests: int
    allowed: int
    denied: int
    downgraded: int
    failed: int
    retries: int
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    charge: _types_pb2.Money
    refunded: _types_pb2.Money
    usage: _containers.ScalarMap[str, int]
    def __init__(self, group: _Optional[_Mapping[str, str]] = ..., bucket: _Optional[str] = ..., requests: _Optional[int] = ..., allowed: _Optional[int] = ..., denied: _Optional[int] = ..., downgraded: _Optional[int] = ..., failed: _Optional[int] = ..., retries: _Optional[int] = ..., input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., charge: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., refunded: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., usage: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListRequestsRequest(_message.Message):
    __slots__ = ("api_key", "limit", "after")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    limit: int
    after: str
    def __init__(self, api_key: _Optional[str] = ..., limit: _Optional[int] = ..., after: _Optional[str] = ...) -> None: ...

class ListRequestsResponse(_message.Message):
    __slots__ = ("requests", "has_more")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[RequestSummary]
    has_more: bool
    def __init__(self, requests: _Optional[_Iterable[_Union[RequestSummary, _Mapping]]] = ..., has_more: _Optional[bool] = ...) -> None: ...

class DescribeRequestRequest(_message.Message):
    __slots__ = ("api_key", "request_id", "wait_ms")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    request_id: str
    wait_ms: int
    def __init__(self, api_key: _Optional[str] = ..., request_id: _Optional[str] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class RequestSummary(_message.Message):
    __slots__ = ("request_id", "created_unix_ms", "status", "decision", "reason", "message", "endpoint", "requested_model", "served_model", "api_key_id", "charge", "held", "refunded", "has_balance", "balance_after", "usage", "usage_estimated", "error_class", "feature", "thread_id", "end_user_id", "agent_id", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CHARGE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FIELD_NUMBER: _ClassVar[int]
    HAS_BALANCE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    created_unix_ms: int
    status: str
    decision: str
    reason: str
    message: str
    endpoint: str
    requested_model: str
    served_model: str
    api_key_id: str
    charge: _types_pb2.Money
    held: _types_pb2.Money
    refunded: _types_pb2.Money
    has_balance: bool
    balance_after: _types_pb2.Money
    usage: Usage
    usage_estimated: bool
    error_class: str
    feature: str
    thread_id: str
    end_user_id: str
    agent_id: str
    tags: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., status: _Optional[str] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., endpoint: _Optional[str] = ..., requested_model: _Optional[str] = ..., served_model: _Optional[str] = ..., api_key_id: _Optional[str] = ..., charge: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., held: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., refunded: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., has_balance: _Optional[bool] = ..., balance_after: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., usage_estimated: _Optional[bool] = ..., error_class: _Optional[str] = ..., feature: _Optional[str] = ..., thread_id: _Optional[str] = ..., end_user_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DescribeKeyRequest(_message.Message):
    __slots__ = ("api_key", "end_user_id")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    end_user_id: str
    def __init__(self, api_key: _Optional[str] = ..., end_user_id: _Optional[str] = ...) -> None: ...

class KeySummary(_message.Message):
    __slots__ = ("key_id", "customer_id", "plan", "has_wallet", "balance", "reserved", "limits", "models", "end_user_id", "end_user_paused")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    HAS_WALLET_FIELD_NUMBER: _ClassVar[int]
    BALANCE_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    END_USER_PAUSED_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    customer_id: str
    plan: str
    has_wallet: bool
    balance: _types_pb2.Money
    reserved: _types_pb2.Money
    limits: _containers.RepeatedCompositeFieldContainer[LimitState]
    models: _containers.RepeatedCompositeFieldContainer[KeyModel]
    end_user_id: str
    end_user_paused: bool
    def __init__(self, key_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., plan: _Optional[str] = ..., has_wallet: _Optional[bool] = ..., balance: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., reserved: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., limits: _Optional[_Iterable[_Union[LimitState, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[KeyModel, _Mapping]]] = ..., end_user_id: _Optional[str] = ..., end_user_paused: _Optional[bool] = ...) -> None: ...

class KeyModel(_message.Message):
    __slots__ = ("id", "owned_by")
    ID_FIELD_NUMBER: _ClassVar[int]
    OWNED_BY_FIELD_NUMBER: _ClassVar[int]
    id: str
    owned_by: str
    def __init__(self, id: _Optional[str] = ..., owned_by: _Optional[str] = ...) -> None: ...

class LimitState(_message.Message):
    __slots__ = ("name", "scope", "window", "unit", "limit", "used", "resets_unix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    RESETS_UNIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    scope: str
    window: str
    unit: str
    limit: int
    used: int
    resets_unix: int
    def __init__(self, name: _Optional[str] = ..., scope: _Optional[str] = ..., window: _Optional[str] = ..., unit: _Optional[str] = ..., limit: _Optional[int] = ..., used: _Optional[int] = ..., resets_unix: _Optional[int] = ...) -> None: ...

class RequestShape(_message.Message):
    __slots__ = ("input_tokens", "prompt_bytes", "message_count", "max_output_tokens", "image_count", "seconds", "stream", "choices", "web_searches", "service_tier", "unseen_input", "audio_bytes", "cache_write", "audio_output", "file_searches", "unbounded_web_search_tools", "unbounded_file_search", "image_model", "image_generation_calls", "partial_images", "containers", "container_memory", "image_scale", "maps_grounding", "image_model_default", "service_tier_implied", "output_cap_fixed", "output_cap_param", "documents", "document_bytes", "document_tokens_max", "least_output_cap", "search_context_size", "fallback_models", "advisor_model", "advisor_calls", "advisor_max_tokens", "fallbacks_routed", "geo", "web_results", "web_results_per_search", "fallbacks_param")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_COUNT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    WEB_SEARCHES_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    UNSEEN_INPUT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FILE_SEARCHES_FIELD_NUMBER: _ClassVar[int]
    UNBOUNDED_WEB_SEARCH_TOOLS_FIELD_NUMBER: _ClassVar[int]
    UNBOUNDED_FILE_SEARCH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_CALLS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_MEMORY_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SCALE_FIELD_NUMBER: _ClassVar[int]
    MAPS_GROUNDING_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MODEL_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_IMPLIED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CAP_FIXED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CAP_PARAM_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_TOKENS_MAX_FIELD_NUMBER: _ClassVar[int]
    LEAST_OUTPUT_CAP_FIELD_NUMBER: _ClassVar[int]
    SEARCH_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MODELS_FIELD_NUMBER: _ClassVar[int]
    ADVISOR_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADVISOR_CALLS_FIELD_NUMBER: _ClassVar[int]
    ADVISOR_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_ROUTED_FIELD_NUMBER: _ClassVar[int]
    GEO_FIELD_NUMBER: _ClassVar[int]
    WEB_RESULTS_FIELD_NUMBER: _ClassVar[int]
    WEB_RESULTS_PER_SEARCH_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_PARAM_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    prompt_bytes: int
    message_count: int
    max_output_tokens: int
    image_count: int
    seconds: int
    stream: bool
    choices: int
    web_searches: int
    service_tier: str
    unseen_input: bool
    audio_bytes: int
    cache_write: str
    audio_output: bool
    file_searches: int
    unbounded_web_search_tools: int
    unbounded_file_search: bool
    image_model: str
    image_generation_calls: int
    partial_images: int
    containers: int
    container_memory: str
    image_scale: int
    maps_grounding: bool
    image_model_default: bool
    service_tier_implied: bool
    output_cap_fixed: bool
    output_cap_param: str
    documents: int
    document_bytes: int
    document_tokens_max: int
    least_output_cap: int
    search_context_size: str
    fallback_models: _containers.RepeatedScalarFieldContainer[str]
    advisor_model: str
    advisor_calls: int
    advisor_max_tokens: int
    fallbacks_routed: bool
    geo: str
    web_results: int
    web_results_per_search: int
    fallbacks_param: str
    def __init__(self, input_tokens: _Optional[int] = ..., prompt_bytes: _Optional[int] = ..., message_count: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., image_count: _Optional[int] = ..., seconds: _Optional[int] = ..., stream: _Optional[bool] = ..., choices: _Optional[int] = ..., web_searches: _Optional[int] = ..., service_tier: _Optional[str] = ..., unseen_input: _Optional[bool] = ..., audio_bytes: _Optional[int] = ..., cache_write: _Optional[str] = ..., audio_output: _Optional[bool] = ..., file_searches: _Optional[int] = ..., unbounded_web_search_tools: _Optional[int] = ..., unbounded_file_search: _Optional[bool] = ..., image_model: _Optional[str] = ..., image_generation_calls: _Optional[int] = ..., partial_images: _Optional[int] = ..., containers: _Optional[int] = ..., container_memory: _Optional[str] = ..., image_scale: _Optional[int] = ..., maps_grounding: _Optional[bool] = ..., image_model_default: _Optional[bool] = ..., service_tier_implied: _Optional[bool] = ..., output_cap_fixed: _Optional[bool] = ..., output_cap_param: _Optional[str] = ..., documents: _Optional[int] = ..., document_bytes: _Optional[int] = ..., document_tokens_max: _Optional[int] = ..., least_output_cap: _Optional[int] = ..., search_context_size: _Optional[str] = ..., fallback_models: _Optional[_Iterable[str]] = ..., advisor_model: _Optional[str] = ..., advisor_calls: _Optional[int] = ..., advisor_max_tokens: _Optional[int] = ..., fallbacks_routed: _Optional[bool] = ..., geo: _Optional[str] = ..., web_results: _Optional[int] = ..., web_results_per_search: _Optional[int] = ..., fallbacks_param: _Optional[str] = ...) -> None: ...

class AuthorizeRequest(_message.Message):
    __slots__ = ("api_key", "endpoint", "model", "attribution", "shape", "client", "problem", "count_tokens", "stored_response_id", "previous_response_id", "creates", "conversation_id", "file_ids", "charge_held_on_expiry", "call_token", "creates_at", "thread_budget", "max_charge")
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    COUNT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STORED_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATES_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_IDS_FIELD_NUMBER: _ClassVar[int]
    CHARGE_HELD_ON_EXPIRY_FIELD_NUMBER: _ClassVar[int]
    CALL_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CREATES_AT_FIELD_NUMBER: _ClassVar[int]
    THREAD_BUDGET_FIELD_NUMBER: _ClassVar[int]
    MAX_CHARGE_FIELD_NUMBER: _ClassVar[int]
    api_key: str
    endpoint: _types_pb2.EndpointFamily
    model: str
    attribution: _types_pb2.Attribution
    shape: RequestShape
    client: _types_pb2.ClientInfo
    problem: _types_pb2.OpenAIError
    count_tokens: bool
    stored_response_id: str
    previous_response_id: str
    creates: str
    conversation_id: str
    file_ids: _containers.RepeatedScalarFieldContainer[str]
    charge_held_on_expiry: bool
    call_token: str
    creates_at: str
    thread_budget: _types_pb2.Money
    max_charge: _types_pb2.Money
    def __init__(self, api_key: _Optional[str] = ..., endpoint: _Optional[_Union[_types_pb2.EndpointFamily, str]] = ..., model: _Optional[str] = ..., attribution: _Optional[_Union[_types_pb2.Attribution, _Mapping]] = ..., shape: _Optional[_Union[RequestShape, _Mapping]] = ..., client: _Optional[_Union[_types_pb2.ClientInfo, _Mapping]] = ..., problem: _Optional[_Union[_types_pb2.OpenAIError, _Mapping]] = ..., count_tokens: _Optional[bool] = ..., stored_response_id: _Optional[str] = ..., previous_response_id: _Optional[str] = ..., creates: _Optional[str] = ..., conversation_id: _Optional[str] = ..., file_ids: _Optional[_Iterable[str]] = ..., charge_held_on_expiry: _Optional[bool] = ..., call_token: _Optional[str] = ..., creates_at: _Optional[str] = ..., thread_budget: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., max_charge: _Optional[_Union[_types_pb2.Money, _Mapping]] = ...) -> None: ...

class AuthorizeResponse(_message.Message):
    __slots__ = ("decision", "reason", "message", "http_status", "error", "retry_after_seconds", "owner", "request_id", "requested_model", "served_model", "provider", "route", "policy_version", "price_table_version", "reserved", "max_output_tokens", "reservation_expires_unix_ms", "shadow_denials", "rate_limits", "max_tool_calls", "image_model", "upstream_model", "output_cap_field", "stream_usage_reported", "fallback_models", "advisor_model")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRICE_TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SHADOW_DENIALS_FIELD_NUMBER: _ClassVar[int]
    RATE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CAP_FIELD_FIELD_NUMBER: _ClassVar[int]
    STREAM_USAGE_REPORTED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_MODELS_FIELD_NUMBER: _ClassVar[int]
    ADVISOR_MODEL_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: str
    message: str
    http_status: int
    error: _types_pb2.OpenAIError
    retry_after_seconds: int
    owner: _types_pb2.Owner
    request_id: str
    requested_model: str
    served_model: str
    provider: str
    route: str
    policy_version: int
    price_table_version: str
    reserved: _types_pb2.Money
    max_output_tokens: int
    reservation_expires_unix_ms: int
    shadow_denials: _containers.RepeatedScalarFieldContainer[str]
    rate_limits: _containers.RepeatedCompositeFieldContainer[RateLimit]
    max_tool_calls: int
    image_model: str
    upstream_model: str
    output_cap_field: str
    stream_usage_reported: bool
    fallback_models: _containers.RepeatedScalarFieldContainer[str]
    advisor_model: str
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., http_status: _Optional[int] = ..., error: _Optional[_Union[_types_pb2.OpenAIError, _Mapping]] = ..., retry_after_seconds: _Optional[int] = ..., owner: _Optional[_Union[_types_pb2.Owner, _Mapping]] = ..., request_id: _Optional[str] = ..., requested_model: _Optional[str] = ..., served_model: _Optional[str] = ..., provider: _Optional[str] = ..., route: _Optional[str] = ..., policy_version: _Optional[int] = ..., price_table_version: _Optional[str] = ..., reserved: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., max_output_tokens: _Optional[int] = ..., reservation_expires_unix_ms: _Optional[int] = ..., shadow_denials: _Optional[_Iterable[str]] = ..., rate_limits: _Optional[_Iterable[_Union[RateLimit, _Mapping]]] = ..., max_tool_calls: _Optional[int] = ..., image_model: _Optional[str] = ..., upstream_model: _Optional[str] = ..., output_cap_field: _Optional[str] = ..., stream_usage_reported: _Optional[bool] = ..., fallback_models: _Optional[_Iterable[str]] = ..., advisor_model: _Optional[str] = ...) -> None: ...

class RateLimit(_message.Message):
    __slots__ = ("unit", "limit", "remaining", "resets_unix_ms")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    RESETS_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    unit: str
    limit: int
    remaining: int
    resets_unix_ms: int
    def __init__(self, unit: _Optional[str] = ..., limit: _Optional[int] = ..., remaining: _Optional[int] = ..., resets_unix_ms: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "cached_input_tokens", "output_tokens", "images", "seconds", "requests", "cache_write_input_tokens", "web_searches", "audio_input_tokens", "audio_output_tokens", "cache_write_1h_input_tokens", "file_searches", "image_input_tokens", "image_generation_calls", "image_generation_input_tokens", "image_generation_cached_input_tokens", "image_generation_image_input_tokens", "image_generation_output_tokens", "image_output_tokens", "containers", "maps_groundings", "search_units", "search_context_size", "reasoning_output_tokens", "cache_storage_token_seconds", "parts", "reported_cost")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEB_SEARCHES_FIELD_NUMBER: _ClassVar[int]
    AUDIO_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_1H_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FILE_SEARCHES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_CALLS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_IMAGE_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    MAPS_GROUNDINGS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_UNITS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    REASONING_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_STORAGE_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_COST_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    images: int
    seconds: int
    requests: int
    cache_write_input_tokens: int
    web_searches: int
    audio_input_tokens: int
    audio_output_tokens: int
    cache_write_1h_input_tokens: int
    file_searches: int
    image_input_tokens: int
    image_generation_calls: int
    image_generation_input_tokens: int
    image_generation_cached_input_tokens: int
    image_generation_image_input_tokens: int
    image_generation_output_tokens: int
    image_output_tokens: int
    containers: int
    maps_groundings: int
    search_units: int
    search_context_size: str
    reasoning_output_tokens: int
    cache_storage_token_seconds: int
    parts: _containers.RepeatedCompositeFieldContainer[UsagePart]
    reported_cost: _types_pb2.Money
    def __init__(self, input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., images: _Optional[int] = ..., seconds: _Optional[int] = ..., requests: _Optional[int] = ..., cache_write_input_tokens: _Optional[int] = ..., web_searches: _Optional[int] = ..., audio_input_tokens: _Optional[int] = ..., audio_output_tokens: _Optional[int] = ..., cache_write_1h_input_tokens: _Optional[int] = ..., file_searches: _Optional[int] = ..., image_input_tokens: _Optional[int] = ..., image_generation_calls: _Optional[int] = ..., image_generation_input_tokens: _Optional[int] = ..., image_generation_cached_input_tokens: _Optional[int] = ..., image_generation_image_input_tokens: _Optional[int] = ..., image_generation_output_tokens: _Optional[int] = ..., image_output_tokens: _Optional[int] = ..., containers: _Optional[int] = ..., maps_groundings: _Optional[int] = ..., search_units: _Optional[int] = ..., search_context_size: _Optional[str] = ..., reasoning_output_tokens: _Optional[int] = ..., cache_storage_token_seconds: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[UsagePart, _Mapping]]] = ..., reported_cost: _Optional[_Union[_types_pb2.Money, _Mapping]] = ...) -> None: ...

class UsagePart(_message.Message):
    __slots__ = ("kind", "model", "input_tokens", "cached_input_tokens", "cache_write_input_tokens", "cache_write_1h_input_tokens", "output_tokens")
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_1H_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    model: str
    input_tokens: int
    cached_input_tokens: int
    cache_write_input_tokens: int
    cache_write_1h_input_tokens: int
    output_tokens: int
    def __init__(self, kind: _Optional[str] = ..., model: _Optional[str] = ..., input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., cache_write_input_tokens: _Optional[int] = ..., cache_write_1h_input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("request_id", "usage", "served_model", "provider", "retries", "fallback_reason", "upstream_status", "error_class", "latency_ms", "stream_interrupted", "provider_account", "usage_estimated", "service_tier", "provider_response_id", "output_as_held", "reply_model", "provider_file_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    USAGE_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_AS_HELD_FIELD_NUMBER: _ClassVar[int]
    REPLY_MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FILE_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    usage: Usage
    served_model: str
    provider: str
    retries: int
    fallback_reason: str
    upstream_status: int
    error_class: str
    latency_ms: int
    stream_interrupted: bool
    provider_account: str
    usage_estimated: bool
    service_tier: str
    provider_response_id: str
    output_as_held: bool
    reply_model: str
    provider_file_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., served_model: _Optional[str] = ..., provider: _Optional[str] = ..., retries: _Optional[int] = ..., fallback_reason: _Optional[str] = ..., upstream_status: _Optional[int] = ..., error_class: _Optional[str] = ..., latency_ms: _Optional[int] = ..., stream_interrupted: _Optional[bool] = ..., provider_account: _Optional[str] = ..., usage_estimated: _Optional[bool] = ..., service_tier: _Optional[str] = ..., provider_response_id: _Optional[str] = ..., output_as_held: _Optional[bool] = ..., reply_model: _Optional[str] = ..., provider_file_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("outcome", "request_id", "cost", "charge", "balance_before", "balance_after", "price_table_version", "served_model")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CHARGE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    PRICE_TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    outcome: SettleOutcome
    request_id: str
    cost: _types_pb2.Money
    charge: _types_pb2.Money
    balance_before: _types_pb2.Money
    balance_after: _types_pb2.Money
    price_table_version: str
    served_model: str
    def __init__(self, outcome: _Optional[_Union[SettleOutcome, str]] = ..., request_id: _Optional[str] = ..., cost: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., charge: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., balance_before: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., balance_after: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., price_table_version: _Optional[str] = ..., served_model: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("outcome", "request_id", "released")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    outcome: ReleaseOutcome
    request_id: str
    released: _types_pb2.Money
    def __init__(self, outcome: _Optional[_Union[ReleaseOutcome, str]] = ..., request_id: _Optional[str] = ..., released: _Optional[_Union[_types_pb2.Money, _Mapping]] = ...) -> None: ...

class AwaitResponseRequest(_message.Message):
    __slots__ = ("request_id", "provider_response_id", "provider_account")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    provider_response_id: str
    provider_account: str
    def __init__(self, request_id: _Optional[str] = ..., provider_response_id: _Optional[str] = ..., provider_account: _Optional[str] = ...) -> None: ...

class AwaitResponseResponse(_message.Message):
    __slots__ = ("request_id", "held_until_unix_ms", "followed")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FOLLOWED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    held_until_unix_ms: int
    followed: bool
    def __init__(self, request_id: _Optional[str] = ..., held_until_unix_ms: _Optional[int] = ..., followed: _Optional[bool] = ...) -> None: ...
