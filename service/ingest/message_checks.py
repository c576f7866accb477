"""Structural checks on a conversation that no single message can fail on its own.

A context must hold a turn besides system messages, and a tool message must answer a tool call of
an earlier assistant message (by `tool_call_id`, or an id-less call for templates without ids).
Works on messages as stored (OpenAI-shaped dicts) and raises `InvalidField` naming the field in
the request's terms; the caller passes the field prefix. Knows nothing about tokenizers or storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.api.errors import InvalidField


def check_tool_messages(messages: Sequence[dict[str, Any]], *, field: str) -> None:
    """Every `tool` message answers a tool call made earlier in `messages`."""
    call_ids: set[str] = set()
    anonymous_calls = 0
    for index, message in enumerate(messages):
        if message.get("role") == "assistant":
            for call in message.get("tool_calls") or ():
                if call.get("id") is None:
                    anonymous_calls += 1
                else:
                    call_ids.add(call["id"])
        elif message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            where = f"{field}[{index}].tool_call_id"
            if call_id is None:
                if anonymous_calls == 0:
                    raise InvalidField(
                        f"{where}: required: a tool message must name the id of a tool call made by an "
                        "earlier assistant message",
                        field=where,
                    )
            elif call_id not in call_ids:
                raise InvalidField(
                    f"{where}: {call_id!r} matches no tool call of an earlier assistant message", field=where
                )


def check_context(messages: Sequence[dict[str, Any]], target_index: int, *, field: str) -> None:
    """The context `messages[:target_index]` holds a user, assistant or tool turn, not only system
    messages (an empty or out-of-range context is training.render's to refuse)."""
    context = messages[:target_index]
    if 0 < target_index <= len(messages) and all(message.get("role") == "system" for message in context):
        raise InvalidField(
            f"{field}: the context (the messages before target_index {target_index}) holds only system "
            "messages; it needs a user, assistant or tool turn",
            field=field,
        )


def check_conversation(messages: Sequence[dict[str, Any]], *, field: str = "messages") -> None:
    """A logged conversation: a turn besides system messages, and tool messages that answer calls."""
    if all(message.get("role") == "system" for message in messages):
        raise InvalidField(
            f"{field}: holds only system messages; a conversation needs a user, assistant or tool turn",
            field=field,
        )
    check_tool_messages(messages, field=field)
