"""Logged conversations: stored with their answers, the drift probes' recent ones, retention."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, exists, func, or_, select
from sqlalchemy.orm import Session

from memory_store.errors import NotFound
from memory_store.models import (
    Conversation,
    FeedbackItem,
    utcnow,
)
from memory_store.repositories._common import DEFAULT_PAGE_SIZE, _page, _positive


class ConversationRepository:
    """Logged conversations (feedback may reference them; distillation reads them)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self,
        *,
        namespace: str,
        messages: list[dict[str, Any]],
        model: str | None = None,
        source: str | None = None,
        created_by: str | None = None,
    ) -> Conversation:
        conversation = Conversation(
            namespace=namespace,
            messages=messages,
            model=model,
            source=source,
            created_at=utcnow(),
            created_by=created_by,
        )
        self.session.add(conversation)
        self.session.flush()
        return conversation

    def get(self, *, id: int, namespace: str | None = None) -> Conversation:
        conversation = self.session.get(Conversation, id)
        if conversation is None or (namespace is not None and conversation.namespace != namespace):
            raise NotFound("conversation", id)
        return conversation

    def list(
        self,
        *,
        namespace: str | None = None,
        since: datetime | None = None,
        after_id: int | None = None,
        limit: int | None = DEFAULT_PAGE_SIZE,
    ) -> Sequence[Conversation]:
        stmt = select(Conversation)
        if namespace is not None:
            stmt = stmt.where(Conversation.namespace == namespace)
        if since is not None:
            stmt = stmt.where(Conversation.created_at >= since)
        return self.session.scalars(_page(stmt, Conversation.id, after_id=after_id, limit=limit)).all()

    def recent(self, *, namespace: str, limit: int) -> Sequence[Conversation]:
        """The `limit` most recent conversations of `namespace`, oldest first (one index range)."""
        rows = self.session.scalars(
            select(Conversation)
            .where(Conversation.namespace == namespace)
            .order_by(Conversation.id.desc())
            .limit(_positive(limit))
        ).all()
        return rows[::-1]

    def namespaces(self) -> list[str]:
        """Every namespace with at least one logged conversation."""
        stmt = select(Conversation.namespace).distinct().order_by(Conversation.namespace)
        return list(self.session.scalars(stmt))

    def _prunable(
        self, namespace: str, before: datetime | None, keep_newest: int | None
    ) -> Select[Any] | None:
        conditions: list[Any] = []
        if before is not None:
            conditions.append(Conversation.created_at < before)
        if keep_newest is not None:
            # the id of the newest conversation beyond the `keep_newest` most recent ones
            threshold = self.session.scalar(
                select(Conversation.id)
                .where(Conversation.namespace == namespace)
                .order_by(Conversation.id.desc())
                .offset(keep_newest)
                .limit(1)
            )
            if threshold is not None:
                conditions.append(Conversation.id <= threshold)
        if not conditions:
            return None
        return select(Conversation.id).where(
            Conversation.namespace == namespace, or_(*conditions), ~_referenced_by_feedback()
        )

    def prunable_ids(
        self, *, namespace: str, before: datetime | None = None, keep_newest: int | None = None, limit: int
    ) -> list[int]:
        """Ids (oldest first, at most `limit`) of `namespace`'s conversations created before `before`
        or beyond its `keep_newest` most recent ones, that no feedback item points at."""
        stmt = self._prunable(namespace, before, keep_newest)
        if stmt is None:
            return []
        return [int(i) for i in self.session.scalars(stmt.order_by(Conversation.id).limit(_positive(limit)))]

    def count_prunable(
        self, *, namespace: str, before: datetime | None = None, keep_newest: int | None = None
    ) -> int:
        """How many conversations `prunable_ids` would return without a limit."""
        stmt = self._prunable(namespace, before, keep_newest)
        if stmt is None:
            return 0
        return int(self.session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)

    def delete_unreferenced(self, *, ids: Iterable[int]) -> int:
        """Delete these conversations, except any a feedback item points at (checked in the same
        statement, so a reference added meanwhile keeps its conversation). Returns how many went."""
        id_list = sorted(set(ids))
        if not id_list:
            return 0
        result = self.session.execute(
            delete(Conversation)
            .where(Conversation.id.in_(id_list), ~_referenced_by_feedback())
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


def _referenced_by_feedback() -> Any:
    return exists().where(FeedbackItem.conversation_id == Conversation.id)
