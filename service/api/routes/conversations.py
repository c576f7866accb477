"""Conversation routes: log a conversation (feedback can then point at it by id), read it back."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from memory_store.repositories import ConversationRepository
from service.api.auth import ensure_may_see, ensure_may_write
from service.api.deps import AuthenticatedRoute, PrincipalDep, SessionDep, SettingsDep, require
from service.api.errors import InvalidField
from service.api.schemas import MAX_ID, ConversationCreate, ConversationPublic
from service.ingest.intake import message_dicts
from service.ingest.message_checks import check_conversation

router = APIRouter(tags=["conversations"], route_class=AuthenticatedRoute)


@router.post(
    "/conversations",
    status_code=status.HTTP_201_CREATED,
    response_model=ConversationPublic,
    dependencies=[require("feedback:write")],
)
def create_conversation(
    body: ConversationCreate, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> ConversationPublic:
    namespace = body.namespace or settings.default_namespace
    ensure_may_write(principal, namespace)
    if len(body.messages) > settings.max_messages:
        raise InvalidField(
            f"at most {settings.max_messages} messages per conversation (LORALOOP_MAX_MESSAGES)",
            field="messages",
        )
    messages = message_dicts(body.messages)
    check_conversation(messages)
    conversation = ConversationRepository(session).add(
        namespace=namespace,
        messages=messages,
        model=body.model,
        source=body.source,
        created_by=principal.label,
    )
    return ConversationPublic.model_validate(conversation)


@router.get(
    "/conversations/{conversation_id}",
    response_model=ConversationPublic,
    dependencies=[require("feedback:read")],
)
def read_conversation(
    conversation_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, principal: PrincipalDep
) -> ConversationPublic:
    conversation = ConversationRepository(session).get(id=conversation_id)
    ensure_may_see(principal, conversation.namespace, "conversation", conversation_id)
    return ConversationPublic.model_validate(conversation)
