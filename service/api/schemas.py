"""Request and response bodies of the HTTP API (pydantic v2), apart from the ORM tables.

`XCreate` models are what clients send, `XPublic` what the API answers. Limits here are hard
caps that also appear in the OpenAPI schema; the tighter, configurable limits of `Settings`
(messages per item, items per batch) are checked by the routes. Knows nothing about the database.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from training.adapter_store import NAMESPACE_PATTERN, NAMESPACE_RULE, is_valid_namespace

# Hard caps (the configurable limits in Settings are at most these).
MAX_MESSAGES = 4096
MAX_BATCH_ITEMS = 10_000
MAX_TEXT_CHARS = 1_000_000
MAX_SHORT_CHARS = 256
MAX_TAGS = 64
MAX_MEMORIES = 256
MAX_TOOL_CALLS = 128
MAX_JSON_DEPTH = 32
MAX_PAGE = 500
MAX_ID = 2**31 - 1  # ids are 32-bit INTEGER columns: larger values are refused, never sent to SQL


Role = Literal["system", "user", "assistant", "tool"]


def check_text(value: str) -> str:
    """Refuse what no store can hold faithfully: NUL characters and unpaired UTF-16 surrogates."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (unpaired surrogate)") from None
    return value


def check_namespace(value: str) -> str:
    """A namespace is also a folder name and a vLLM adapter name: a safe, short identifier."""
    if not is_valid_namespace(value):
        raise ValueError(NAMESPACE_RULE)
    return value


def _check_json_value(value: Any, depth: int = 0) -> Any:
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError("NaN and Infinity are not JSON numbers")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key)
            _check_json_value(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_json_value(item, depth + 1)
    return value


def check_utc_range(value: datetime) -> datetime:
    """A timestamp as UTC; refuses instants outside years 1-9999 once converted (e.g.
    `0001-01-01T00:00:00+23:59`), which Python cannot represent. Naive values are taken as UTC."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range: must lie between 0001-01-01 and 9999-12-31 in UTC") from None


# The separator of derived batch keys (`<Idempotency-Key>` U+001F `<index>`): a control character,
# which no client key may hold (HTTP header values cannot, and body keys are refused), so a derived
# key can never equal a key a client sends.
DERIVED_KEY_SEPARATOR = "\x1f"


def check_idempotency_key(value: str) -> str:
    """Printable text only: control characters are reserved (see DERIVED_KEY_SEPARATOR)."""
    check_text(value)
    if any(ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0 for char in value):
        raise ValueError("must not contain control characters")
    return value


def _check_continuation(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    return value


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(check_text)]
ShortText = Annotated[str, Field(max_length=MAX_SHORT_CHARS), AfterValidator(check_text)]
# 200, not 256: a batch derives `<key>\x1f<index>` per item and the column holds 256 characters.
IdempotencyKeyText = Annotated[
    str, Field(min_length=1, max_length=200), AfterValidator(check_idempotency_key)
]
UtcDatetime = Annotated[datetime, AfterValidator(check_utc_range)]
Namespace = Annotated[
    str, Field(min_length=1, max_length=64, pattern=NAMESPACE_PATTERN), AfterValidator(check_namespace)
]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(check_text)]
Continuation = Annotated[
    str,
    Field(min_length=1, max_length=MAX_TEXT_CHARS),
    AfterValidator(check_text),
    AfterValidator(_check_continuation),
]
JsonObject = Annotated[dict[str, Any], AfterValidator(_check_json_value)]


class _Strict(BaseModel):
    """Unknown fields are refused: a misspelt field must not silently change what is trained."""

    model_config = ConfigDict(extra="forbid")


# --- messages ------------------------------------------------------------------------------------


class ToolCallFunction(_Strict):
    name: ShortText
    arguments: Annotated[str | dict[str, Any], AfterValidator(_check_json_value)] = "{}"


class ToolCall(_Strict):
    id: ShortText | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class Message(_Strict):
    """One chat message in the OpenAI shape (the shape vLLM's chat endpoint receives)."""

    role: Role
    content: Text | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOL_CALLS)
    tool_call_id: ShortText | None = None
    name: ShortText | None = None
    reasoning_content: Text | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls are only allowed on assistant messages")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only for an assistant message with tool_calls")
        return self


# --- feedback ------------------------------------------------------------------------------------


class FeedbackCreate(_Strict):
    """One improved continuation for one assistant turn (the body of `POST /feedback`).

    `target_index` is the index in `messages` of the assistant turn that `continuation` replaces:
    the context is `messages[:target_index]` (at least one message). `target_index ==
    len(messages)` appends a new assistant turn. When omitted: the last message if it is an
    assistant turn (replace it), else append; the resolved index is what is stored.
    With `conversation_id` and no `messages`, the messages of that logged conversation are used.
    """

    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    target_index: int | None = Field(None, ge=0, le=MAX_MESSAGES, strict=True)
    continuation: Continuation
    namespace: Namespace | None = None
    reason: Text | None = None
    memories: list[Text] | None = Field(None, max_length=MAX_MEMORIES)
    tags: list[Tag] | None = Field(None, max_length=MAX_TAGS)
    conversation_id: int | None = Field(None, ge=1, le=MAX_ID, strict=True)

    @model_validator(mode="after")
    def _has_context(self) -> FeedbackCreate:
        if self.messages is None and self.conversation_id is None:
            raise ValueError("give `messages` or the `conversation_id` of a logged conversation")
        return self


class FeedbackBatchItem(FeedbackCreate):
    """An item of `POST /feedback:batch`; `idempotency_key` overrides the key derived from the header."""

    idempotency_key: IdempotencyKeyText | None = None


class FeedbackBatchCreate(_Strict):
    items: list[FeedbackBatchItem] = Field(min_length=1, max_length=MAX_BATCH_ITEMS)


class FeedbackAccepted(BaseModel):
    id: int
    status: str


class FeedbackBatchAccepted(BaseModel):
    items: list[FeedbackAccepted]


class FeedbackPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    namespace: str
    status: str
    messages: list[dict[str, Any]]
    target_index: int | None
    continuation: str
    reason: str | None
    memories: list[Any] | None
    tags: list[Any] | None
    conversation_id: int | None
    trained_in_version: int | None
    created_at: datetime
    created_by: str | None = None  # label of the token entry that wrote it (never the secret)
    # `GET /feedback/{id}` of a pending item: what it waits for, and the train job that takes it
    waiting_for: str | None = None
    job_id: int | None = None


class FeedbackPage(BaseModel):
    items: list[FeedbackPublic]
    next_cursor: str | None


# --- conversations ------------------------------------------------------------------------------


class ConversationCreate(_Strict):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    namespace: Namespace | None = None
    model: ShortText | None = None
    source: ShortText | None = None


class ConversationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    namespace: str
    messages: list[dict[str, Any]]
    model: str | None
    source: str | None
    created_at: datetime
    created_by: str | None = None  # label of the token entry that wrote it (never the secret)


# --- memories ------------------------------------------------------------------------------------

MemoryState = Literal["active", "retired", "baked"]


class MemoryCreate(_Strict):
    content: Annotated[Text, Field(min_length=1), AfterValidator(_check_continuation)]
    namespace: Namespace | None = None
    title: ShortText | None = None
    priority: int = Field(0, ge=-1000, le=1000, strict=True)
    tags: list[Tag] | None = Field(None, max_length=MAX_TAGS)


class MemoryPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    namespace: str
    content: str
    title: str | None
    priority: int
    tags: list[Any] | None
    state: str
    baked_in_version: int | None
    created_at: datetime
    updated_at: datetime
    created_by: str | None = None  # label of the token entry that wrote it (never the secret)
    retired_by: str | None = None


class MemoryPage(BaseModel):
    items: list[MemoryPublic]
    next_cursor: str | None


# --- adapters ------------------------------------------------------------------------------------


class AdapterVersionPublic(BaseModel):
    version: int
    status: str
    metrics: dict[str, Any]
    parent: int | None
    sha256: str | None
    reason: str | None
    created_at: datetime
    pinned: bool = False
    # set when retention deleted the weights: the version is a tombstone and cannot become current
    files_deleted_at: datetime | None = None


class AdapterVersionDetail(AdapterVersionPublic):
    """One version with its behaviour report (parent's and candidate's answers side by side), read
    from the version folder's `loraloop.json`; None for versions published without one."""

    behaviour_report: dict[str, Any] | None = None


class AdapterPublic(BaseModel):
    name: str
    current: int | None
    base_model: str | None
    created_at: datetime
    versions: list[AdapterVersionPublic]  # the newest `versions_limit`, ascending
    versions_total: int
    # pass as `cursor` to GET /adapters/{name}/versions?order=desc for the older ones (null: none)
    older_versions_cursor: int | None = None


class AdapterList(BaseModel):
    adapters: list[AdapterPublic]
    next_cursor: str | None = None  # `cursor` of the next page of adapters (null at the end)


class AdapterVersionPage(BaseModel):
    versions: list[AdapterVersionPublic]
    total: int
    next_cursor: int | None = None  # `cursor` of the next page (null at the end)


class PinRequest(_Strict):
    pinned: bool = True


class RollbackRequest(_Strict):
    """Make `version` current; without it, the parent of the current version."""

    version: int | None = Field(None, ge=0, le=MAX_ID, strict=True)


# --- jobs ----------------------------------------------------------------------------------------


class TrainJobCreate(_Strict):
    namespace: Namespace | None = None


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    namespace: str | None
    status: str
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    run_after: datetime
    progress: dict[str, Any] | None
    result: dict[str, Any] | None
    error: str | None
    created_at: datetime
    created_by: str | None = None  # label of the token entry that wrote it (never the secret)
    started_at: datetime | None
    finished_at: datetime | None


class JobPage(BaseModel):
    items: list[JobPublic]
    next_cursor: str | None


# --- errors --------------------------------------------------------------------------------------


class FieldErrorPublic(BaseModel):
    field: str
    reason: str


class ErrorDetail(BaseModel):
    type: str
    message: str
    field: str | None = None
    errors: list[FieldErrorPublic] | None = None  # every refusal of a 422 from request validation
    limit_bytes: int | None = None  # 413 only


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer of the loraloop API (service.api.errors builds it)."""

    error: ErrorDetail


# --- health --------------------------------------------------------------------------------------


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    detail: str | None = None


class EmbeddedVllmState(BaseModel):
    """The vLLM server this `loraloop serve` started and owns (LORALOOP_VLLM_URLS=embedded)."""

    url: str
    status: Literal["healthy", "starting", "down"]
    pid: int | None = Field(None, description="vLLM's API server process")
    process_group: int | None = Field(None, description="the group loraloop signals (its guard's pid)")
    instance_id: str | None = None
    started_at: datetime | None = Field(None, description="when the server process was started")
    model: str
    restarts: int


class ComponentHealth(BaseModel):
    """One component of `/readyz` (`database`, later `model`, `vllm`...)."""

    status: Literal["ok", "unavailable"]
    detail: str | None = None
    latency_ms: float | None = None


class Readiness(BaseModel):
    """The body of `/readyz`: `ok` only when every component is."""

    status: Literal["ok", "unavailable"]
    components: dict[str, ComponentHealth]
    embedded_vllm: EmbeddedVllmState | None = None  # the server this process owns, when embedded
