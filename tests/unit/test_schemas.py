"""Request schemas of the HTTP API: what is accepted, and the field each refusal names."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.api.errors import field_path
from service.api.schemas import (
    ConversationCreate,
    FeedbackBatchCreate,
    FeedbackCreate,
    MemoryCreate,
    check_namespace,
)

USER = {"role": "user", "content": "What is the capital of France?"}
ASSISTANT = {"role": "assistant", "content": "Lyon."}


def feedback(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [USER, ASSISTANT], "continuation": "Paris."}
    body.update(overrides)
    return body


def refused_fields(model: type, body: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    return [field_path(error["loc"]) for error in caught.value.errors()]


def test_minimal_feedback_is_accepted_with_defaults() -> None:
    item = FeedbackCreate.model_validate(feedback())
    assert item.target_index is None and item.namespace is None and item.tags is None
    assert [m.role for m in item.messages or []] == ["user", "assistant"]


def test_tool_calls_and_tool_messages_are_accepted() -> None:
    messages = [
        USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "name": "lookup", "content": "Paris"},
    ]
    item = FeedbackCreate.model_validate(feedback(messages=messages))
    assert item.messages is not None and item.messages[1].tool_calls is not None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [USER, {"role": "assistant"}]}, "messages[1]"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]},
            "messages[0]",
        ),
        ({"messages": []}, "messages"),
        ({"continuation": ""}, "continuation"),
        ({"continuation": " \n\t "}, "continuation"),
        ({"continuation": "ok\x00"}, "continuation"),
        ({"continuation": "bad \ud800 surrogate"}, "continuation"),
        ({"target_index": -1}, "target_index"),
        ({"target_index": 10**9}, "target_index"),
        ({"namespace": "../etc"}, "namespace"),
        ({"namespace": "a..b"}, "namespace"),
        ({"namespace": "/abs"}, "namespace"),
        ({"namespace": "x" * 65}, "namespace"),
        ({"namespace": ""}, "namespace"),
        ({"tags": ["ok", ""]}, "tags[1]"),
        ({"conversation_id": 0}, "conversation_id"),
        ({"continuaton": "typo"}, "continuaton"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra"),
    ],
)
def test_bad_feedback_names_the_field(overrides: dict[str, Any], field: str) -> None:
    assert field in refused_fields(FeedbackCreate, feedback(**overrides))


def test_feedback_needs_messages_or_a_conversation() -> None:
    body = feedback()
    del body["messages"]
    refused_fields(FeedbackCreate, body)
    assert FeedbackCreate.model_validate({**body, "conversation_id": 3}).conversation_id == 3


def test_deeply_nested_tool_arguments_are_refused() -> None:
    nested: Any = "leaf"
    for _ in range(40):
        nested = {"k": nested}
    call = {"function": {"name": "f", "arguments": nested}}
    body = feedback(messages=[USER, {"role": "assistant", "content": None, "tool_calls": [call]}])
    assert any(
        f.startswith("messages[1].tool_calls[0].function.arguments")
        for f in refused_fields(FeedbackCreate, body)
    )


def test_batch_errors_name_the_item() -> None:
    body = {"items": [feedback(), feedback(continuation="  ")]}
    assert "items[1].continuation" in refused_fields(FeedbackBatchCreate, body)
    assert "items" in refused_fields(FeedbackBatchCreate, {"items": []})


@pytest.mark.parametrize("name", ["default", "team-a", "A1.b_c-d", "x" * 64])
def test_safe_namespaces(name: str) -> None:
    assert check_namespace(name) == name


@pytest.mark.parametrize("name", ["..", "a..b", ".hidden", "-x", "a/b", "a\\b", "a\x00", "é", "x" * 65, ""])
def test_unsafe_namespaces(name: str) -> None:
    with pytest.raises(ValueError):
        check_namespace(name)


def test_memory_and_conversation_schemas() -> None:
    assert MemoryCreate.model_validate({"content": "The user prefers metric units."}).priority == 0
    assert "content" in refused_fields(MemoryCreate, {"content": "   "})
    assert "priority" in refused_fields(MemoryCreate, {"content": "x", "priority": 10**6})
    assert ConversationCreate.model_validate({"messages": [USER]}).namespace is None
    assert "messages" in refused_fields(ConversationCreate, {"messages": []})


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("body", "items", 3, "target_index"), "items[3].target_index"),
        (("body", "messages", 0, "role"), "messages[0].role"),
        (("query", "limit"), "limit"),
        (("body",), "body"),
        (("header", "Idempotency-Key"), "Idempotency-Key"),
    ],
)
def test_field_path(loc: tuple[str | int, ...], path: str) -> None:
    assert field_path(loc) == path
