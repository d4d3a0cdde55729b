from policyd_client.v1 import policy_pb2 as _policy_pb2
from policyd_client.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATE_UNSPECIFIED: _ClassVar[KeyState]
    ACTIVE: _ClassVar[KeyState]
    PAUSED: _ClassVar[KeyState]
    REVOKED: _ClassVar[KeyState]
KEY_STATE_UNSPECIFIED: KeyState
ACTIVE: KeyState
PAUSED: KeyState
REVOKED: KeyState

class AdminCredential(_message.Message):
    __slots__ = ("id", "customer_id", "label", "prefix", "created_unix_ms", "revoked_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    customer_id: str
    label: str
    prefix: str
    created_unix_ms: int
    revoked_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., customer_id: _Optional[str] = ..., label: _Optional[str] = ..., prefix: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., revoked_unix_ms: _Optional[int] = ...) -> None: ...

class CreateAdminCredentialRequest(_message.Message):
    __slots__ = ("customer_id", "label")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    label: str
    def __init__(self, customer_id: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class CreateAdminCredentialResponse(_message.Message):
    __slots__ = ("credential", "secret")
    CREDENTIAL_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    credential: AdminCredential
    secret: str
    def __init__(self, credential: _Optional[_Union[AdminCredential, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListAdminCredentialsRequest(_message.Message):
    __slots__ = ("customer_id", "limit", "page_token")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    limit: int
    page_token: str
    def __init__(self, customer_id: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAdminCredentialsResponse(_message.Message):
    __slots__ = ("credentials", "next_page_token")
    CREDENTIALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    credentials: _containers.RepeatedCompositeFieldContainer[AdminCredential]
    next_page_token: str
    def __init__(self, credentials: _Optional[_Iterable[_Union[AdminCredential, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RevokeAdminCredentialRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class LinkCustomerRequest(_message.Message):
    __slots__ = ("customer_id", "parent_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    parent_id: str
    def __init__(self, customer_id: _Optional[str] = ..., parent_id: _Optional[str] = ...) -> None: ...

class LinkCustomerResponse(_message.Message):
    __slots__ = ("customer_id", "parent_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    parent_id: str
    def __init__(self, customer_id: _Optional[str] = ..., parent_id: _Optional[str] = ...) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "label", "prefix", "owner", "state", "scopes", "created_unix_ms", "rotated_unix_ms", "previous_secret_expires_unix_ms", "expires_unix_ms", "limits", "owner_limits")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ROTATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SECRET_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    OWNER_LIMITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    label: str
    prefix: str
    owner: _types_pb2.Owner
    state: KeyState
    scopes: _containers.RepeatedScalarFieldContainer[str]
    created_unix_ms: int
    rotated_unix_ms: int
    previous_secret_expires_unix_ms: int
    expires_unix_ms: int
    limits: _containers.RepeatedCompositeFieldContainer[KeyLimit]
    owner_limits: _containers.RepeatedCompositeFieldContainer[KeyLimit]
    def __init__(self, id: _Optional[str] = ..., label: _Optional[str] = ..., prefix: _Optional[str] = ..., owner: _Optional[_Union[_types_pb2.Owner, _Mapping]] = ..., state: _Optional[_Union[KeyState, str]] = ..., scopes: _Optional[_Iterable[str]] = ..., created_unix_ms: _Optional[int] = ..., rotated_unix_ms: _Optional[int] = ..., previous_secret_expires_unix_ms: _Optional[int] = ..., expires_unix_ms: _Optional[int] = ..., limits: _Optional[_Iterable[_Union[KeyLimit, _Mapping]]] = ..., owner_limits: _Optional[_Iterable[_Union[KeyLimit, _Mapping]]] = ...) -> None: ...

class KeyLimit(_message.Message):
    __slots__ = ("window", "unit", "limit", "timezone", "scope", "thresholds", "models", "until_unix_ms")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    window: str
    unit: str
    limit: int
    timezone: str
    scope: str
    thresholds: _containers.RepeatedScalarFieldContainer[int]
    models: _containers.RepeatedScalarFieldContainer[str]
    until_unix_ms: int
    def __init__(self, window: _Optional[str] = ..., unit: _Optional[str] = ..., limit: _Optional[int] = ..., timezone: _Optional[str] = ..., scope: _Optional[str] = ..., thresholds: _Optional[_Iterable[int]] = ..., models: _Optional[_Iterable[str]] = ..., until_unix_ms: _Optional[int] = ...) -> None: ...

class SetOwnerLimitsRequest(_message.Message):
    __slots__ = ("customer_id", "workspace_id", "project_id", "team_id", "limits", "end_user_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    workspace_id: str
    project_id: str
    team_id: str
    limits: _containers.RepeatedCompositeFieldContainer[KeyLimit]
    end_user_id: str
    def __init__(self, customer_id: _Optional[str] = ..., workspace_id: _Optional[str] = ..., project_id: _Optional[str] = ..., team_id: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[KeyLimit, _Mapping]]] = ..., end_user_id: _Optional[str] = ...) -> None: ...

class OwnerLimits(_message.Message):
    __slots__ = ("customer_id", "scope", "owner_id", "limits", "updated_unix_ms", "keys_changed", "current", "paused")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KEYS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    scope: str
    owner_id: str
    limits: _containers.RepeatedCompositeFieldContainer[KeyLimit]
    updated_unix_ms: int
    keys_changed: int
    current: _containers.RepeatedCompositeFieldContainer[_policy_pb2.LimitState]
    paused: bool
    def __init__(self, customer_id: _Optional[str] = ..., scope: _Optional[str] = ..., owner_id: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[KeyLimit, _Mapping]]] = ..., updated_unix_ms: _Optional[int] = ..., keys_changed: _Optional[int] = ..., current: _Optional[_Iterable[_Union[_policy_pb2.LimitState, _Mapping]]] = ..., paused: _Optional[bool] = ...) -> None: ...

class SetEndUserPausedRequest(_message.Message):
    __slots__ = ("customer_id", "end_user_id", "paused")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    end_user_id: str
    paused: bool
    def __init__(self, customer_id: _Optional[str] = ..., end_user_id: _Optional[str] = ..., paused: _Optional[bool] = ...) -> None: ...

class ListOwnerLimitsRequest(_message.Message):
    __slots__ = ("customer_id", "limit", "page_token", "scope", "owner_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    limit: int
    page_token: str
    scope: str
    owner_id: str
    def __init__(self, customer_id: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ..., scope: _Optional[str] = ..., owner_id: _Optional[str] = ...) -> None: ...

class ListOwnerLimitsResponse(_message.Message):
    __slots__ = ("owners", "next_page_token")
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    owners: _containers.RepeatedCompositeFieldContainer[OwnerLimits]
    next_page_token: str
    def __init__(self, owners: _Optional[_Iterable[_Union[OwnerLimits, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ResetLimitsRequest(_message.Message):
    __slots__ = ("customer_id", "key_id", "workspace_id", "project_id", "team_id", "end_user_id", "feature", "model", "thread_id", "unit", "window", "name", "reason", "tag")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    key_id: str
    workspace_id: str
    project_id: str
    team_id: str
    end_user_id: str
    feature: str
    model: str
    thread_id: str
    unit: str
    window: str
    name: str
    reason: str
    tag: str
    def __init__(self, customer_id: _Optional[str] = ..., key_id: _Optional[str] = ..., workspace_id: _Optional[str] = ..., project_id: _Optional[str] = ..., team_id: _Optional[str] = ..., end_user_id: _Optional[str] = ..., feature: _Optional[str] = ..., model: _Optional[str] = ..., thread_id: _Optional[str] = ..., unit: _Optional[str] = ..., window: _Optional[str] = ..., name: _Optional[str] = ..., reason: _Optional[str] = ..., tag: _Optional[str] = ...) -> None: ...

class LimitReset(_message.Message):
    __slots__ = ("limit", "before", "forgiven")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    FORGIVEN_FIELD_NUMBER: _ClassVar[int]
    limit: _policy_pb2.LimitState
    before: int
    forgiven: int
    def __init__(self, limit: _Optional[_Union[_policy_pb2.LimitState, _Mapping]] = ..., before: _Optional[int] = ..., forgiven: _Optional[int] = ...) -> None: ...

class ResetLimitsResponse(_message.Message):
    __slots__ = ("limits", "customer_id", "scope", "owner_id")
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    limits: _containers.RepeatedCompositeFieldContainer[LimitReset]
    customer_id: str
    scope: str
    owner_id: str
    def __init__(self, limits: _Optional[_Iterable[_Union[LimitReset, _Mapping]]] = ..., customer_id: _Optional[str] = ..., scope: _Optional[str] = ..., owner_id: _Optional[str] = ...) -> None: ...

class SetKeyScopesRequest(_message.Message):
    __slots__ = ("id", "scopes")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    id: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class SetKeyLimitsRequest(_message.Message):
    __slots__ = ("id", "limits")
    ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    limits: _containers.RepeatedCompositeFieldContainer[KeyLimit]
    def __init__(self, id: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[KeyLimit, _Mapping]]] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("label", "customer_id", "workspace_id", "project_id", "team_id", "environment", "plan", "scopes", "test", "expires_unix_ms", "limits")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_ID_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TEST_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    label: str
    customer_id: str
    workspace_id: str
    project_id: str
    team_id: str
    environment: str
    plan: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    test: bool
    expires_unix_ms: int
    limits: _containers.RepeatedCompositeFieldContainer[KeyLimit]
    def __init__(self, label: _Optional[str] = ..., customer_id: _Optional[str] = ..., workspace_id: _Optional[str] = ..., project_id: _Optional[str] = ..., team_id: _Optional[str] = ..., environment: _Optional[str] = ..., plan: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., test: _Optional[bool] = ..., expires_unix_ms: _Optional[int] = ..., limits: _Optional[_Iterable[_Union[KeyLimit, _Mapping]]] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    secret: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("customer_id", "limit", "page_token")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    limit: int
    page_token: str
    def __init__(self, customer_id: _Optional[str] = ..., limit: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class KeyActionRequest(_message.Message):
    __slots__ = ("id", "reason")
    ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    id: str
    reason: str
    def __init__(self, id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetKeyExpiryRequest(_message.Message):
    __slots__ = ("id", "expires_unix_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    expires_unix_ms: int
    def __init__(self, id: _Optional[str] = ..., expires_unix_ms: _Optional[int] = ...) -> None: ...

class SetPlanRequest(_message.Message):
    __slots__ = ("key_id", "customer_id", "plan")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    customer_id: str
    plan: str
    def __init__(self, key_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., plan: _Optional[str] = ...) -> None: ...

class SetPlanResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("id", "grace_seconds")
    ID_FIELD_NUMBER: _ClassVar[int]
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    id: str
    grace_seconds: int
    def __init__(self, id: _Optional[str] = ..., grace_seconds: _Optional[int] = ...) -> None: ...

class ApplyPolicyRequest(_message.Message):
    __slots__ = ("yaml", "source_name", "dry_run")
    YAML_FIELD_NUMBER: _ClassVar[int]
    SOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    yaml: str
    source_name: str
    dry_run: bool
    def __init__(self, yaml: _Optional[str] = ..., source_name: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyPolicyResponse(_message.Message):
    __slots__ = ("version", "changed", "diff", "limits_begun", "buckets_seeded")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    DIFF_FIELD_NUMBER: _ClassVar[int]
    LIMITS_BEGUN_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_SEEDED_FIELD_NUMBER: _ClassVar[int]
    version: int
    changed: bool
    diff: str
    limits_begun: int
    buckets_seeded: int
    def __init__(self, version: _Optional[int] = ..., changed: _Optional[bool] = ..., diff: _Optional[str] = ..., limits_begun: _Optional[int] = ..., buckets_seeded: _Optional[int] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("version", "yaml")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    YAML_FIELD_NUMBER: _ClassVar[int]
    version: int
    yaml: str
    def __init__(self, version: _Optional[int] = ..., yaml: _Optional[str] = ...) -> None: ...

class GrantCreditRequest(_message.Message):
    __slots__ = ("customer_id", "amount", "source", "grant_id", "note", "expires_unix_ms", "workspace_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    amount: _types_pb2.Money
    source: str
    grant_id: str
    note: str
    expires_unix_ms: int
    workspace_id: str
    def __init__(self, customer_id: _Optional[str] = ..., amount: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., source: _Optional[str] = ..., grant_id: _Optional[str] = ..., note: _Optional[str] = ..., expires_unix_ms: _Optional[int] = ..., workspace_id: _Optional[str] = ...) -> None: ...

class GrantCreditResponse(_message.Message):
    __slots__ = ("grant_id", "wallet", "exists")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    WALLET_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    wallet: Wallet
    exists: bool
    def __init__(self, grant_id: _Optional[str] = ..., wallet: _Optional[_Union[Wallet, _Mapping]] = ..., exists: _Optional[bool] = ...) -> None: ...

class RefundUsageRequest(_message.Message):
    __slots__ = ("request_id", "amount", "note")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    amount: _types_pb2.Money
    note: str
    def __init__(self, request_id: _Optional[str] = ..., amount: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., note: _Optional[str] = ...) -> None: ...

class RefundUsageResponse(_message.Message):
    __slots__ = ("request_id", "refunded", "grant_id", "wallet")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    WALLET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    refunded: _types_pb2.Money
    grant_id: str
    wallet: Wallet
    def __init__(self, request_id: _Optional[str] = ..., refunded: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., grant_id: _Optional[str] = ..., wallet: _Optional[_Union[Wallet, _Mapping]] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ("kind", "customer_id", "since_unix_ms", "until_unix_ms", "limit")
    KIND_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    customer_id: str
    since_unix_ms: int
    until_unix_ms: int
    limit: int
    def __init__(self, kind: _Optional[str] = ..., customer_id: _Optional[str] = ..., since_unix_ms: _Optional[int] = ..., until_unix_ms: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("id", "kind", "customer_id", "request_id", "created_unix_ms", "detail_json")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    customer_id: str
    request_id: str
    created_unix_ms: int
    detail_json: str
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., customer_id: _Optional[str] = ..., request_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., detail_json: _Optional[str] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class GetWalletRequest(_message.Message):
    __slots__ = ("customer_id", "workspace_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    workspace_id: str
    def __init__(self, customer_id: _Optional[str] = ..., workspace_id: _Optional[str] = ...) -> None: ...

class Wallet(_message.Message):
    __slots__ = ("customer_id", "currency", "balance_nanos", "reserved_nanos", "available_nanos", "workspace_id")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    BALANCE_NANOS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_NANOS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_NANOS_FIELD_NUMBER: _ClassVar[int]
    WORKSPACE_ID_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    currency: str
    balance_nanos: int
    reserved_nanos: int
    available_nanos: int
    workspace_id: str
    def __init__(self, customer_id: _Optional[str] = ..., currency: _Optional[str] = ..., balance_nanos: _Optional[int] = ..., reserved_nanos: _Optional[int] = ..., available_nanos: _Optional[int] = ..., workspace_id: _Optional[str] = ...) -> None: ...

class ListUsageRequest(_message.Message):
    __slots__ = ("customer_id", "limit", "request_id", "api_key_id", "since_unix_ms", "until_unix_ms", "page_token")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    limit: int
    request_id: str
    api_key_id: str
    since_unix_ms: int
    until_unix_ms: int
    page_token: str
    def __init__(self, customer_id: _Optional[str] = ..., limit: _Optional[int] = ..., request_id: _Optional[str] = ..., api_key_id: _Optional[str] = ..., since_unix_ms: _Optional[int] = ..., until_unix_ms: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("request_id", "created_unix_ms", "owner", "feature", "thread_id", "end_user_id", "endpoint", "requested_model", "served_model", "decision", "reason", "status", "input_tokens", "cached_input_tokens", "output_tokens", "cost", "charge", "balance_after", "stream_interrupted", "error_class", "policy_version", "price_table_version", "trace_id", "traceparent", "agent_id", "tags", "balance_before", "provider_account", "cache_write_input_tokens", "cache_write_1h_input_tokens", "audio_input_tokens", "audio_output_tokens", "web_searches", "choices", "service_tier", "provider_response_id", "file_searches", "image_input_tokens", "image_model", "image_generation_calls", "image_generation_input_tokens", "image_generation_cached_input_tokens", "image_generation_image_input_tokens", "image_generation_output_tokens", "image_output_tokens", "containers", "container_memory", "maps_groundings", "images", "seconds", "refunded_nanos", "refunded_unix_ms", "search_units", "search_context_size", "reasoning_output_tokens", "cache_storage_token_seconds")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    THREAD_ID_FIELD_NUMBER: _ClassVar[int]
    END_USER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CHARGE_FIELD_NUMBER: _ClassVar[int]
    BALANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    STREAM_INTERRUPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_CLASS_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PRICE_TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    BALANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_1H_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AUDIO_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WEB_SEARCHES_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_RESPONSE_ID_FIELD_NUMBER: _ClassVar[int]
    FILE_SEARCHES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_CALLS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_IMAGE_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_GENERATION_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    CONTAINER_MEMORY_FIELD_NUMBER: _ClassVar[int]
    MAPS_GROUNDINGS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_NANOS_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_UNITS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    REASONING_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_STORAGE_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    created_unix_ms: int
    owner: _types_pb2.Owner
    feature: str
    thread_id: str
    end_user_id: str
    endpoint: str
    requested_model: str
    served_model: str
    decision: str
    reason: str
    status: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    cost: _types_pb2.Money
    charge: _types_pb2.Money
    balance_after: _types_pb2.Money
    stream_interrupted: bool
    error_class: str
    policy_version: int
    price_table_version: str
    trace_id: str
    traceparent: str
    agent_id: str
    tags: _containers.ScalarMap[str, str]
    balance_before: _types_pb2.Money
    provider_account: str
    cache_write_input_tokens: int
    cache_write_1h_input_tokens: int
    audio_input_tokens: int
    audio_output_tokens: int
    web_searches: int
    choices: int
    service_tier: str
    provider_response_id: str
    file_searches: int
    image_input_tokens: int
    image_model: str
    image_generation_calls: int
    image_generation_input_tokens: int
    image_generation_cached_input_tokens: int
    image_generation_image_input_tokens: int
    image_generation_output_tokens: int
    image_output_tokens: int
    containers: int
    container_memory: str
    maps_groundings: int
    images: int
    seconds: int
    refunded_nanos: int
    refunded_unix_ms: int
    search_units: int
    search_context_size: str
    reasoning_output_tokens: int
    cache_storage_token_seconds: int
    def __init__(self, request_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., owner: _Optional[_Union[_types_pb2.Owner, _Mapping]] = ..., feature: _Optional[str] = ..., thread_id: _Optional[str] = ..., end_user_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., requested_model: _Optional[str] = ..., served_model: _Optional[str] = ..., decision: _Optional[str] = ..., reason: _Optional[str] = ..., status: _Optional[str] = ..., input_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cost: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., charge: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., balance_after: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., stream_interrupted: _Optional[bool] = ..., error_class: _Optional[str] = ..., policy_version: _Optional[int] = ..., price_table_version: _Optional[str] = ..., trace_id: _Optional[str] = ..., traceparent: _Optional[str] = ..., agent_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., balance_before: _Optional[_Union[_types_pb2.Money, _Mapping]] = ..., provider_account: _Optional[str] = ..., cache_write_input_tokens: _Optional[int] = ..., cache_write_1h_input_tokens: _Optional[int] = ..., audio_input_tokens: _Optional[int] = ..., audio_output_tokens: _Optional[int] = ..., web_searches: _Optional[int] = ..., choices: _Optional[int] = ..., service_tier: _Optional[str] = ..., provider_response_id: _Optional[str] = ..., file_searches: _Optional[int] = ..., image_input_tokens: _Optional[int] = ..., image_model: _Optional[str] = ..., image_generation_calls: _Optional[int] = ..., image_generation_input_tokens: _Optional[int] = ..., image_generation_cached_input_tokens: _Optional[int] = ..., image_generation_image_input_tokens: _Optional[int] = ..., image_generation_output_tokens: _Optional[int] = ..., image_output_tokens: _Optional[int] = ..., containers: _Optional[int] = ..., container_memory: _Optional[str] = ..., maps_groundings: _Optional[int] = ..., images: _Optional[int] = ..., seconds: _Optional[int] = ..., refunded_nanos: _Optional[int] = ..., refunded_unix_ms: _Optional[int] = ..., search_units: _Optional[int] = ..., search_context_size: _Optional[str] = ..., reasoning_output_tokens: _Optional[int] = ..., cache_storage_token_seconds: _Optional[int] = ...) -> None: ...

class ListUsageResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[UsageRecord]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[UsageRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UsageReportRequest(_message.Message):
    __slots__ = ("group_by", "since_unix_ms", "until_unix_ms", "bucket", "customer_id", "compare_previous", "timezone")
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    COMPARE_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    group_by: _containers.RepeatedScalarFieldContainer[str]
    since_unix_ms: int
    until_unix_ms: int
    bucket: str
    customer_id: str
    compare_previous: bool
    timezone: str
    def __init__(self, group_by: _Optional[_Iterable[str]] = ..., since_unix_ms: _Optional[int] = ..., until_unix_ms: _Optional[int] = ..., bucket: _Optional[str] = ..., customer_id: _Optional[str] = ..., compare_previous: _Optional[bool] = ..., timezone: _Optional[str] = ...) -> None: ...

class UsageReportRow(_message.Message):
    __slots__ = ("group", "bucket", "figures")
    class GroupEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class FiguresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    group: _containers.ScalarMap[str, str]
    bucket: str
    figures: _containers.ScalarMap[str, int]
    def __init__(self, group: _Optional[_Mapping[str, str]] = ..., bucket: _Optional[str] = ..., figures: _Optional[_Mapping[str, int]] = ...) -> None: ...

class UsageReportResponse(_message.Message):
    __slots__ = ("currency", "rows")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    currency: str
    rows: _containers.RepeatedCompositeFieldContainer[UsageReportRow]
    def __init__(self, currency: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[UsageReportRow, _Mapping]]] = ...) -> None: ...

class BucketState(_message.Message):
    __slots__ = ("label", "unit", "window", "used", "limit", "scope", "thresholds", "action")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    label: str
    unit: str
    window: str
    used: int
    limit: int
    scope: str
    thresholds: _containers.RepeatedScalarFieldContainer[int]
    action: str
    def __init__(self, label: _Optional[str] = ..., unit: _Optional[str] = ..., window: _Optional[str] = ..., used: _Optional[int] = ..., limit: _Optional[int] = ..., scope: _Optional[str] = ..., thresholds: _Optional[_Iterable[int]] = ..., action: _Optional[str] = ...) -> None: ...

class KeyReview(_message.Message):
    __slots__ = ("key", "allowed_models", "buckets", "spend_today_nanos", "spend_month_nanos", "last_used_unix_ms", "requests", "denials", "errors", "denials_by_reason")
    class DenialsByReasonEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KEY_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_MODELS_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    SPEND_TODAY_NANOS_FIELD_NUMBER: _ClassVar[int]
    SPEND_MONTH_NANOS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DENIALS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    DENIALS_BY_REASON_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    allowed_models: _containers.RepeatedScalarFieldContainer[str]
    buckets: _containers.RepeatedCompositeFieldContainer[BucketState]
    spend_today_nanos: int
    spend_month_nanos: int
    last_used_unix_ms: int
    requests: int
    denials: int
    errors: int
    denials_by_reason: _containers.ScalarMap[str, int]
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., allowed_models: _Optional[_Iterable[str]] = ..., buckets: _Optional[_Iterable[_Union[BucketState, _Mapping]]] = ..., spend_today_nanos: _Optional[int] = ..., spend_month_nanos: _Optional[int] = ..., last_used_unix_ms: _Optional[int] = ..., requests: _Optional[int] = ..., denials: _Optional[int] = ..., errors: _Optional[int] = ..., denials_by_reason: _Optional[_Mapping[str, int]] = ...) -> None: ...

class InvoiceRequest(_message.Message):
    __slots__ = ("customer_id", "period", "lines_by")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    LINES_BY_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    period: str
    lines_by: str
    def __init__(self, customer_id: _Optional[str] = ..., period: _Optional[str] = ..., lines_by: _Optional[str] = ...) -> None: ...

class InvoiceResponse(_message.Message):
    __slots__ = ("json", "csv", "digest", "closed")
    JSON_FIELD_NUMBER: _ClassVar[int]
    CSV_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    json: str
    csv: str
    digest: str
    closed: bool
    def __init__(self, json: _Optional[str] = ..., csv: _Optional[str] = ..., digest: _Optional[str] = ..., closed: _Optional[bool] = ...) -> None: ...

class ReconcileRequest(_message.Message):
    __slots__ = ("provider", "export", "tolerance_nanos", "tolerance_bps")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_NANOS_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_BPS_FIELD_NUMBER: _ClassVar[int]
    provider: str
    export: bytes
    tolerance_nanos: int
    tolerance_bps: int
    def __init__(self, provider: _Optional[str] = ..., export: _Optional[bytes] = ..., tolerance_nanos: _Optional[int] = ..., tolerance_bps: _Optional[int] = ...) -> None: ...

class ReconcileLine(_message.Message):
    __slots__ = ("day", "model", "status", "provider_nanos", "ledger_nanos", "difference_nanos", "provider_tokens", "ledger_tokens", "provider_account")
    DAY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_NANOS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_NANOS_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCE_NANOS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    day: str
    model: str
    status: str
    provider_nanos: int
    ledger_nanos: int
    difference_nanos: int
    provider_tokens: int
    ledger_tokens: int
    provider_account: str
    def __init__(self, day: _Optional[str] = ..., model: _Optional[str] = ..., status: _Optional[str] = ..., provider_nanos: _Optional[int] = ..., ledger_nanos: _Optional[int] = ..., difference_nanos: _Optional[int] = ..., provider_tokens: _Optional[int] = ..., ledger_tokens: _Optional[int] = ..., provider_account: _Optional[str] = ...) -> None: ...

class ReconcileResponse(_message.Message):
    __slots__ = ("ok", "basis", "lines", "totals")
    class TotalsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    OK_FIELD_NUMBER: _ClassVar[int]
    BASIS_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    basis: str
    lines: _containers.RepeatedCompositeFieldContainer[ReconcileLine]
    totals: _containers.ScalarMap[str, int]
    def __init__(self, ok: _Optional[bool] = ..., basis: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[ReconcileLine, _Mapping]]] = ..., totals: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListCapsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CapState(_message.Message):
    __slots__ = ("name", "provider", "models", "window", "timezone", "unit", "limit", "used", "resets_unix", "action", "downgrade_to")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    TIMEZONE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    RESETS_UNIX_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DOWNGRADE_TO_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider: str
    models: _containers.RepeatedScalarFieldContainer[str]
    window: str
    timezone: str
    unit: str
    limit: int
    used: int
    resets_unix: int
    action: str
    downgrade_to: str
    def __init__(self, name: _Optional[str] = ..., provider: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., window: _Optional[str] = ..., timezone: _Optional[str] = ..., unit: _Optional[str] = ..., limit: _Optional[int] = ..., used: _Optional[int] = ..., resets_unix: _Optional[int] = ..., action: _Optional[str] = ..., downgrade_to: _Optional[str] = ...) -> None: ...

class ListCapsResponse(_message.Message):
    __slots__ = ("currency", "caps")
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    CAPS_FIELD_NUMBER: _ClassVar[int]
    currency: str
    caps: _containers.RepeatedCompositeFieldContainer[CapState]
    def __init__(self, currency: _Optional[str] = ..., caps: _Optional[_Iterable[_Union[CapState, _Mapping]]] = ...) -> None: ...

class ResetCapRequest(_message.Message):
    __slots__ = ("name", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResetCapResponse(_message.Message):
    __slots__ = ("cap", "before", "forgiven")
    CAP_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    FORGIVEN_FIELD_NUMBER: _ClassVar[int]
    cap: CapState
    before: int
    forgiven: int
    def __init__(self, cap: _Optional[_Union[CapState, _Mapping]] = ..., before: _Optional[int] = ..., forgiven: _Optional[int] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AuditMismatch(_message.Message):
    __slots__ = ("counter", "redis_value", "ledger_value")
    COUNTER_FIELD_NUMBER: _ClassVar[int]
    REDIS_VALUE_FIELD_NUMBER: _ClassVar[int]
    LEDGER_VALUE_FIELD_NUMBER: _ClassVar[int]
    counter: str
    redis_value: int
    ledger_value: int
    def __init__(self, counter: _Optional[str] = ..., redis_value: _Optional[int] = ..., ledger_value: _Optional[int] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("ok", "counters_checked", "mismatches")
    OK_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    counters_checked: int
    mismatches: _containers.RepeatedCompositeFieldContainer[AuditMismatch]
    def __init__(self, ok: _Optional[bool] = ..., counters_checked: _Optional[int] = ..., mismatches: _Optional[_Iterable[_Union[AuditMismatch, _Mapping]]] = ...) -> None: ...

class RebuildRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RebuildResponse(_message.Message):
    __slots__ = ("counters_written",)
    COUNTERS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    counters_written: int
    def __init__(self, counters_written: _Optional[int] = ...) -> None: ...
