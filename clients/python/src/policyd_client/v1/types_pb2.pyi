from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EndpointFamily(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENDPOINT_FAMILY_UNSPECIFIED: _ClassVar[EndpointFamily]
    CHAT_COMPLETIONS: _ClassVar[EndpointFamily]
    RESPONSES: _ClassVar[EndpointFamily]
    EMBEDDINGS: _ClassVar[EndpointFamily]
    IMAGES: _ClassVar[EndpointFamily]
    ANTHROPIC_MESSAGES: _ClassVar[EndpointFamily]
    GEMINI_GENERATE_CONTENT: _ClassVar[EndpointFamily]
    COMPLETIONS: _ClassVar[EndpointFamily]
    AUDIO_SPEECH: _ClassVar[EndpointFamily]
    AUDIO_TRANSCRIPTIONS: _ClassVar[EndpointFamily]
    MODERATIONS: _ClassVar[EndpointFamily]
    BEDROCK_CONVERSE: _ClassVar[EndpointFamily]
    RERANK: _ClassVar[EndpointFamily]
    COHERE_CHAT: _ClassVar[EndpointFamily]
    VIDEOS: _ClassVar[EndpointFamily]
    CACHED_CONTENTS: _ClassVar[EndpointFamily]
ENDPOINT_FAMILY_UNSPECIFIED: EndpointFamily
CHAT_COMPLETIONS: EndpointFamily
RESPONSES: EndpointFamily
EMBEDDINGS: EndpointFamily
IMAGES: EndpointFamily
ANTHROPIC_MESSAGES: EndpointFamily
GEMINI_GENERATE_CONTENT: EndpointFamily
COMPLETIONS: EndpointFamily
AUDIO_SPEECH: EndpointFamily
AUDIO_TRANSCRIPTIONS: EndpointFamily
MODERATIONS: EndpointFamily
BEDROCK_CONVERSE: EndpointFamily
RERANK: EndpointFamily
COHERE_CHAT: EndpointFamily
VIDEOS: EndpointFamily
CACHED_CONTENTS: EndpointFamily

class Money(_message.Message):
    __slots__ = ("currency", "nanos")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    NANOS_FIELD_NUMBER: _ClassVar[int]
    currency: str
    nanos: int
    def __init__(self, currency: _Optional[str] = ..., nanos: _Optional[int] = ...) -> None: ...

class Owner(_message.Message):
    __slots__ = ("customer_id", "workspace_id", "project_id", "team_id", "api_key_id", "environment", "plan")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    workspace_id: str
    project_id: str
    team_id: str
    api_key_id: str
    environment: str
    plan: str
    def __init__(self, customer_id: _Optional[str] = ..., workspace_id: _Optional[str] = ..., project_id: _Optional[str] = ..., team_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., environment: _Optional[str] = ..., plan: _Optional[str] = ...) -> None: ...

class Attribution(_message.Message):
    __slots__ = ("request_id", "trace_id", "traceparent", "customer_id", "workspace_id", "project_id", "end_user_id", "agent_id", "thread_id", "feature", "route", "environment", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    trace_id: str
    traceparent: str
    customer_id: str
    workspace_id: str
    project_id: str
    end_user_id: str
    agent_id: str
    thread_id: str
    feature: str
    route: str
    environment: str
    tags: _containers.ScalarMap[str, str]
    def __init__(self, request_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., traceparent: _Optional[str] = ..., customer_id: _Optional[str] = ..., workspace_id: _Optional[str] = ..., project_id: _Optional[str] = ..., end_user_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., thread_id: _Optional[str] = ..., feature: _Optional[str] = ..., route: _Optional[str] = ..., environment: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("address", "user_agent")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    address: str
    user_agent: str
    def __init__(self, address: _Optional[str] = ..., user_agent: _Optional[str] = ...) -> None: ...

class OpenAIError(_message.Message):
    __slots__ = ("type", "code", "message", "param")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    type: str
    code: str
    message: str
    param: str
    def __init__(self, type: _Optional[str] = ..., code: _Optional[str] = ..., message: _Optional[str] = ..., param: _Optional[str] = ...) -> None: ...
