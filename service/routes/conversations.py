"""Conversation routes: log a conversation (feedback can then point at it by id), read it back."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from memory_store.repositories import ConversationRepository
from service.deps import AuthenticatedRoute, SessionDep, SettingsDep, require
from service.errors import InvalidField
from service.feedback_intake import message_dicts
from service.message_checks import check_conversation
from service.schemas import MAX_ID, ConversationCreate, ConversationPublic

router = APIRouter(tags=["conversations"], route_class=AuthenticatedRoute)


@router.post(
    "/conversations",
    status_code=status.HTTP_201_CREATED,
    response_model=ConversationPublic,
    dependencies=[require("feedback:write")],
)
def create_conversation(
    body: ConversationCreate, session: SessionDep, settings: SettingsDep
) -> ConversationPublic:
    if len(body.messages) > settings.max_messages:
        raise InvalidField(
            f"at most {settings.max_messages} messages per conversation (LORALOOP_MAX_MESSAGES)",
            field="messages",
        )
    messages = message_dicts(body.messages)
    check_conversation(messages)
    conversation = ConversationRepository(session).add(
        namespace=body.namespace or settings.default_namespace,
        messages=messages,
        model=body.model,
        source=body.source,
    )
    return ConversationPublic.model_validate(conversation)


@router.get(
    "/conversations/{conversation_id}",
    response_model=ConversationPublic,
    dependencies=[require("feedback:read")],
)
def read_conversation(
    conversation_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep
) -> ConversationPublic:
    return ConversationPublic.model_validate(ConversationRepository(session).get(id=conversation_id))
