"""Memories: the notes nightly distillation bakes into the weights, and their retirement."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from memory_store.errors import NotFound
from memory_store.models import (
    MEMORY_STATES,
    Memory,
    utcnow,
)
from memory_store.repositories._common import DEFAULT_PAGE_SIZE, _check_choice, _page


class MemoryRepository:
    """Namespaced memories; delete is soft (state `retired`), distillation marks them `baked`."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(
        self,
        *,
        namespace: str,
        content: str,
        title: str | None = None,
        priority: int = 0,
        tags: list[Any] | None = None,
        created_by: str | None = None,
    ) -> Memory:
        now = utcnow()
        memory = Memory(
            namespace=namespace,
            content=content,
            title=title,
            priority=priority,
            tags=tags,
            state="active",
            created_at=now,
            updated_at=now,
            created_by=created_by,
        )
        self.session.add(memory)
        self.session.flush()
        return memory

    def get(self, *, id: int, namespace: str | None = None) -> Memory:
        memory = self.session.get(Memory, id)
        if memory is None or (namespace is not None and memory.namespace != namespace):
            raise NotFound("memory", id)
        return memory

    def list(
        self,
        *,
        namespace: str,
        state: str | None = "active",
        after_id: int | None = None,
        limit: int | None = DEFAULT_PAGE_SIZE,
    ) -> Sequence[Memory]:
        """Memories of `namespace` in `state` (None: every state), by id."""
        stmt = select(Memory).where(Memory.namespace == namespace)
        if state is not None:
            _check_choice("state", state, MEMORY_STATES)
            stmt = stmt.where(Memory.state == state)
        return self.session.scalars(_page(stmt, Memory.id, after_id=after_id, limit=limit)).all()

    def delete(self, *, id: int, namespace: str | None = None, retired_by: str | None = None) -> Memory:
        """Retire a memory (kept for history; no longer listed as active). Idempotent."""
        memory = self.get(id=id, namespace=namespace)
        if memory.state != "retired":
            memory.state = "retired"
            memory.retired_by = retired_by
            memory.updated_at = utcnow()
            self.session.flush()
        return memory

    def namespaces_with_active(self) -> list[str]:
        """Namespaces with at least one active memory, by name."""
        stmt = select(Memory.namespace).where(Memory.state == "active").distinct().order_by(Memory.namespace)
        return list(self.session.scalars(stmt))

    def mark_baked(self, *, ids: Iterable[int], version: int) -> int:
        """Mark active memories as baked into adapter `version`; returns how many changed."""
        id_list = sorted(set(ids))
        if not id_list:
            return 0
        result = self.session.execute(
            update(Memory)
            .where(Memory.id.in_(id_list), Memory.state == "active")
            .values(state="baked", baked_in_version=version, updated_at=utcnow())
            .execution_options(synchronize_session="fetch")
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
