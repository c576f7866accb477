"""service.ingest.message_checks and the strict schema fields: structural refusals name the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from service.api.errors import InvalidField
from service.api.schemas import FeedbackCreate, check_idempotency_key, check_utc_range
from service.ingest.message_checks import check_context, check_conversation, check_tool_messages

USER = {"role": "user", "content": "weather?"}
SYSTEM = {"role": "system", "content": "be brief"}


def call(call_id: str | None) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "function": {"name": "w"}}]}


def test_tool_message_needs_an_earlier_matching_call() -> None:
    check_tool_messages([USER, call("a"), {"role": "tool", "tool_call_id": "a", "content": "18C"}], field="m")
    check_tool_messages([USER, call(None), {"role": "tool", "content": "18C"}], field="m")
    with pytest.raises(InvalidField) as refused:
        check_tool_messages(
            [USER, call("a"), {"role": "tool", "tool_call_id": "b", "content": "x"}], field="m"
        )
    assert refused.value.field == "m[2].tool_call_id"
    with pytest.raises(InvalidField) as refused:
        check_tool_messages([USER, {"role": "tool", "content": "x"}], field="items[3].messages")
    assert refused.value.field == "items[3].messages[1].tool_call_id"


def test_context_needs_a_turn_besides_system_messages() -> None:
    check_context([SYSTEM, USER], 2, field="messages")
    check_context([SYSTEM], 0, field="messages")  # an empty context is training.render's to refuse
    with pytest.raises(InvalidField, match="only system messages"):
        check_context([SYSTEM, SYSTEM, USER], 2, field="messages")
    with pytest.raises(InvalidField):
        check_conversation([SYSTEM])


@pytest.mark.parametrize("value", [True, "2", 2.0])
def test_target_index_is_a_strict_integer(value: object) -> None:
    with pytest.raises(ValidationError):
        FeedbackCreate.model_validate({"messages": [USER], "continuation": "x", "target_index": value})
    assert FeedbackCreate.model_validate({"messages": [USER], "continuation": "x", "target_index": 1})


def test_utc_range() -> None:
    assert check_utc_range(datetime(2026, 1, 1)) == datetime(2026, 1, 1, tzinfo=UTC)
    tokyo = datetime(2026, 1, 1, 9, tzinfo=timezone(timedelta(hours=9)))
    assert check_utc_range(tokyo) == datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="out of range"):
        check_utc_range(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=23, minutes=59))))


def test_idempotency_keys_refuse_control_characters() -> None:
    assert check_idempotency_key("order-7#0") == "order-7#0"
    for key in ("a\x1f0", "a\n", "a\x7f", "a\x85"):
        with pytest.raises(ValueError, match="control"):
            check_idempotency_key(key)
