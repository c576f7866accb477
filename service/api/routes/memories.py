"""Memory routes: add, list (by namespace and state), read and retire namespaced memories."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, status

from memory_store.repositories import MemoryRepository
from service.api.auth import ensure_may_see, ensure_may_write
from service.api.deps import AuthenticatedRoute, PrincipalDep, SessionDep, SettingsDep, require
from service.api.schemas import (
    MAX_ID,
    MAX_PAGE,
    MemoryCreate,
    MemoryPage,
    MemoryPublic,
    MemoryState,
    Namespace,
)

router = APIRouter(tags=["memories"], route_class=AuthenticatedRoute)

MemoryId = Annotated[int, Path(ge=1, le=MAX_ID)]


@router.post(
    "/memories",
    status_code=status.HTTP_201_CREATED,
    response_model=MemoryPublic,
    dependencies=[require("feedback:write")],
)
def create_memory(
    body: MemoryCreate, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> MemoryPublic:
    namespace = body.namespace or settings.default_namespace
    ensure_may_write(principal, namespace)
    memory = MemoryRepository(session).add(
        namespace=namespace,
        content=body.content,
        title=body.title,
        priority=body.priority,
        tags=body.tags,
        created_by=principal.label,
    )
    return MemoryPublic.model_validate(memory)


@router.get("/memories", response_model=MemoryPage, dependencies=[require("feedback:read")])
def list_memories(
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    namespace: Namespace | None = None,
    state: Annotated[MemoryState | None, Query(description="omit for every state")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="`next_cursor` of the previous page")
    ] = None,
) -> MemoryPage:
    """Memories of one namespace (the default one when omitted), oldest first; a namespace outside
    the token's grant lists nothing."""
    namespace = namespace or settings.default_namespace
    if not principal.allows_namespace(namespace):
        return MemoryPage(items=[], next_cursor=None)
    memories = MemoryRepository(session).list(namespace=namespace, state=state, after_id=cursor, limit=limit)
    next_cursor = str(memories[-1].id) if len(memories) == limit else None
    return MemoryPage(items=[MemoryPublic.model_validate(m) for m in memories], next_cursor=next_cursor)


@router.get("/memories/{memory_id}", response_model=MemoryPublic, dependencies=[require("feedback:read")])
def read_memory(memory_id: MemoryId, session: SessionDep, principal: PrincipalDep) -> MemoryPublic:
    memory = MemoryRepository(session).get(id=memory_id)
    ensure_may_see(principal, memory.namespace, "memory", memory_id)
    return MemoryPublic.model_validate(memory)


@router.delete("/memories/{memory_id}", response_model=MemoryPublic, dependencies=[require("feedback:write")])
def delete_memory(memory_id: MemoryId, session: SessionDep, principal: PrincipalDep) -> MemoryPublic:
    """Retire a memory: it stays for history (state `retired`) and is no longer used. Idempotent.
    A memory of a namespace outside the token's grant is not found (404), as on reads."""
    repository = MemoryRepository(session)
    ensure_may_see(principal, repository.get(id=memory_id).namespace, "memory", memory_id)
    return MemoryPublic.model_validate(repository.delete(id=memory_id, retired_by=principal.label))
