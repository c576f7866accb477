"""Job routes: ask for a training run now, and read the durable job queue."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, status

from memory_store.queue import JobQueue
from service.api.auth import ensure_may_see, ensure_may_write
from service.api.deps import AuthenticatedRoute, PrincipalDep, SessionDep, SettingsDep, require
from service.api.schemas import MAX_ID, MAX_PAGE, JobPage, JobPublic, Namespace, TrainJobCreate
from service.ingest.intake import queue_train_job

router = APIRouter(tags=["jobs"], route_class=AuthenticatedRoute)

JobStatus = Literal["queued", "running", "succeeded", "failed", "dead", "cancelled"]


@router.post(
    "/jobs/train",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobPublic,
    dependencies=[require("adapters:write")],
)
def enqueue_training(
    body: TrainJobCreate, session: SessionDep, settings: SettingsDep, principal: PrincipalDep
) -> JobPublic:
    """Queue a training run of a namespace now; answers the queued (or already active) job."""
    namespace = body.namespace or settings.default_namespace
    ensure_may_write(principal, namespace)
    # the active job may be one that feedback queued with the debounce delay: it runs now
    job = queue_train_job(session, settings, namespace, trigger="api", reschedule=True, created_by=principal.label)
    return JobPublic.model_validate(job)


@router.get("/jobs", response_model=JobPage, dependencies=[require("adapters:read")])
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    namespace: Namespace | None = None,
    status: JobStatus | None = None,
    kind: Annotated[str | None, Query(max_length=64, pattern=r"^[a-z_]+$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
    cursor: Annotated[
        int | None, Query(ge=0, le=MAX_ID, description="`next_cursor` of the previous page")
    ] = None,
) -> JobPage:
    jobs = JobQueue(session).list(
        namespace=namespace,
        status=status,
        kind=kind,
        after_id=cursor,
        limit=limit,
        namespace_patterns=principal.namespaces,
    )
    next_cursor = str(jobs[-1].id) if len(jobs) == limit else None
    return JobPage(items=[JobPublic.model_validate(job) for job in jobs], next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobPublic, dependencies=[require("adapters:read")])
def read_job(
    job_id: Annotated[int, Path(ge=1, le=MAX_ID)], session: SessionDep, principal: PrincipalDep
) -> JobPublic:
    job = JobQueue(session).get(job_id=job_id)
    ensure_may_see(principal, job.namespace, "job", job_id)
    return JobPublic.model_validate(job)
