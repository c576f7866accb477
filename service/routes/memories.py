"""Memory routes: add, list (by namespace and state), read and retire namespaced memories."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from memory_store.repositories import MemoryRepository
from service.deps import AuthenticatedRoute, SessionDep, SettingsDep, require
from service.schemas import MAX_ID, MAX_PAGE, MemoryCreate, MemoryPage, MemoryPublic, MemoryState, Namespace

router = APIRouter(tags=["memories"], route_class=AuthenticatedRoute)

MemoryId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.post(
    "/memories",
    status_code=status.HTTP_201_CREATED,
    response_model=MemoryPublic,
    dependencies=[require("feedback:write")],
)
def create_memory(body: MemoryCreate, session: SessionDep, settings: SettingsDep) -> MemoryPublic:
    memory = MemoryRepository(session).add(
        namespace=body.namespace or settings.default_namespace,
        content=body.content,
        title=body.title,
        priority=body.priority,
        tags=body.tags,
    )
    return MemoryPublic.model_validate(memory)


@router.get("/memories", response_model=MemoryPage, dependencies=[require("feedback:read")])
def list_memories(
    session: SessionDep,
    settings: SettingsDep,
    namespace: Namespace | None = None,
    state: Annotated[MemoryState | None, Query(description="omit for every state")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="`next_cursor` of the previous page")
    ] = None,
) -> MemoryPage:
    """Memories of one namespace (the default one when omitted), oldest first."""
    memories = MemoryRepository(session).list(
        namespace=namespace or settings.default_namespace, state=state, after_id=cursor, limit=limit
    )
    next_cursor = str(memories[-1].id) if len(memories) == limit else None
    return MemoryPage(items=[MemoryPublic.model_validate(m) for m in memories], next_cursor=next_cursor)


@router.get("/memories/{memory_id}", response_model=MemoryPublic, dependencies=[require("feedback:read")])
def read_memory(memory_id: MemoryId, session: SessionDep) -> MemoryPublic:
    return MemoryPublic.model_validate(MemoryRepository(session).get(id=memory_id))


@router.delete("/memories/{memory_id}", response_model=MemoryPublic, dependencies=[require("feedback:write")])
def delete_memory(memory_id: MemoryId, session: SessionDep) -> MemoryPublic:
    """Retire a memory: it stays for history (state `retired`) and is no longer used. Idempotent."""
    return MemoryPublic.model_validate(MemoryRepository(session).delete(id=memory_id))
