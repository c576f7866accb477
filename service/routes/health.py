"""Liveness, readiness and Prometheus metrics; the only routes that need no token."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from memory_store.queue import JobQueue
from service.deps import PUBLIC, MetricsDep
from service.schemas import Health

router = APIRouter(tags=["health"], dependencies=[PUBLIC])
logger = logging.getLogger(__name__)


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up and answering."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
def readyz(request: Request) -> Response:
    """Ready to take traffic: the database answers a query (503 otherwise, quickly)."""
    try:
        with request.app.state.session_factory() as session:
            session.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to reach the store means "not ready"
        logger.warning("readiness check failed: %s", type(exc).__name__)
        return JSONResponse(
            Health(status="unavailable", detail="database unreachable").model_dump(), status_code=503
        )
    return JSONResponse(Health(status="ok").model_dump())


@router.get("/metrics", response_class=Response)
def metrics(request: Request, service_metrics: MetricsDep) -> Response:
    """Prometheus text format; the queue depth gauge is read from the store at scrape time."""
    try:
        with request.app.state.session_factory() as session:
            depth = JobQueue(session).depth()
        for status in ("queued", "running"):
            service_metrics.queue_depth.labels(status=status).set(depth.get(status, 0))
    except Exception as exc:  # noqa: BLE001 - the scrape still answers, with the last known depth
        logger.warning("queue depth unavailable for /metrics: %s", type(exc).__name__)
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)
