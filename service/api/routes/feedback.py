"""Feedback routes: ingest one item or a batch (idempotent), read one, list a page."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Literal

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool

from memory_store.repositories import FeedbackRepository
from service.api.auth import ensure_may_see
from service.api.deps import (
    AuthenticatedRoute,
    MetricsDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    principal_of,
    require,
)
from service.api.schemas import (
    MAX_ID,
    MAX_PAGE,
    FeedbackAccepted,
    FeedbackBatchAccepted,
    FeedbackBatchCreate,
    FeedbackCreate,
    FeedbackPage,
    FeedbackPublic,
    IdempotencyKeyText,
    Namespace,
    UtcDatetime,
)
from service.ingest.intake import FeedbackValidator, feedback_batch_unit, feedback_unit, pending_state
from service.ingest.writer import DirectFeedbackWriter, FeedbackWriter

router = APIRouter(tags=["feedback"], route_class=AuthenticatedRoute)

PathId = Path(ge=1, le=MAX_ID)

IdempotencyKey = Annotated[
    IdempotencyKeyText | None,
    Header(
        alias="Idempotency-Key",
        description="Replaying a request with the same key answers the same id and stores nothing new.",
    ),
]
REPLAYED_HEADER = "Idempotent-Replayed"


def _validator(request: Request) -> FeedbackValidator:
    return request.app.state.feedback_validator


def _writer(request: Request) -> FeedbackWriter | DirectFeedbackWriter:
    return request.app.state.feedback_writer


@router.post(
    "/feedback",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=FeedbackAccepted,
    dependencies=[require("feedback:write")],
)
async def create_feedback(
    body: FeedbackCreate,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> FeedbackAccepted:
    """Store one improved continuation; training picks it up in the background.

    Answered once the item is committed (with the other requests in flight: `FeedbackWriter`). The
    checks of one item run on the event loop: a few tenths of a millisecond, less than a thread
    hand-off. The hottest route: it reads the app's settings, metrics and the authenticated
    principal from the request itself (each dependency FastAPI solves costs as much as the insert)."""
    state = request.app.state
    unit = feedback_unit(
        body,
        idempotency_key=idempotency_key,
        settings=state.settings,
        validator=_validator(request),
        principal=principal_of(request),
    )
    [accepted] = await _writer(request).submit_async(unit)
    if accepted.created:
        state.metrics.feedback_accepted.labels(namespace=accepted.item.namespace).inc()
    else:
        response.headers[REPLAYED_HEADER] = "true"
    return FeedbackAccepted(id=accepted.item.id, status=accepted.item.status)


@router.post(
    "/feedback:batch",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=FeedbackBatchAccepted,
    dependencies=[require("feedback:write")],
)
async def create_feedback_batch(
    body: FeedbackBatchCreate,
    request: Request,
    settings: SettingsDep,
    metrics: MetricsDep,
    principal: PrincipalDep,
    idempotency_key: IdempotencyKey = None,
) -> FeedbackBatchAccepted:
    """Store many items in one transaction: all of them, or none (errors name `items[i].field`).

    Item `i` is idempotent under its own `idempotency_key`, else under a key derived from the
    header and `i` that no client key can equal (`service.ingest.intake.batch_item_key`).
    """
    check = partial(
        feedback_batch_unit,
        body.items,
        idempotency_key=idempotency_key,
        settings=settings,
        validator=_validator(request),
        principal=principal,
    )
    unit = await run_in_threadpool(check)  # up to max_batch_items checks: off the event loop
    accepted = await _writer(request).submit_async(unit)
    for entry in accepted:
        if entry.created:
            metrics.feedback_accepted.labels(namespace=entry.item.namespace).inc()
    return FeedbackBatchAccepted(
        items=[FeedbackAccepted(id=entry.item.id, status=entry.item.status) for entry in accepted]
    )


@router.get("/feedback/{feedback_id}", response_model=FeedbackPublic, dependencies=[require("feedback:read")])
def read_feedback(
    feedback_id: Annotated[int, PathId], session: SessionDep, principal: PrincipalDep
) -> FeedbackPublic:
    """The item; a pending one says what it waits for (`waiting_for`) and which job takes it."""
    item = FeedbackRepository(session).get(id=feedback_id)
    ensure_may_see(principal, item.namespace, "feedback", feedback_id)
    waiting_for, job_id = pending_state(session, item)
    return FeedbackPublic.model_validate(item).model_copy(update={"waiting_for": waiting_for, "job_id": job_id})


@router.get("/feedback", response_model=FeedbackPage, dependencies=[require("feedback:read")])
def list_feedback(
    session: SessionDep,
    principal: PrincipalDep,
    namespace: Namespace | None = None,
    since: UtcDatetime | None = None,
    status: Literal["pending", "trained", "skipped"] | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="`next_cursor` of the previous page")
    ] = None,
) -> FeedbackPage:
    """Items oldest first; pass `next_cursor` back as `cursor` for the next page (null at the end)."""
    items = FeedbackRepository(session).list(
        namespace=namespace,
        since=since,
        status=status,
        after_id=cursor,
        limit=limit,
        namespace_patterns=principal.namespaces,
    )
    next_cursor = str(items[-1].id) if len(items) == limit else None
    return FeedbackPage(
        items=[FeedbackPublic.model_validate(item) for item in items], next_cursor=next_cursor
    )
