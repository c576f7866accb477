"""Liveness, readiness and Prometheus metrics; the only routes that need no token."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from memory_store.queue import JobQueue
from service.api.deps import PUBLIC, MetricsDep
from service.api.readiness import ReadinessChecks
from service.api.schemas import EmbeddedVllmState, Health, Readiness

router = APIRouter(tags=["health"], dependencies=[PUBLIC])
logger = logging.getLogger(__name__)


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up and answering."""
    return Health(status="ok")


def _embedded_vllm(request: Request) -> EmbeddedVllmState | None:
    """The embedded vLLM's state, when this process runs one (its background service reports it)."""
    for service in request.app.state.background_services:
        readiness = getattr(service, "readiness", None)
        if service.name == "vllm" and callable(readiness):
            return EmbeddedVllmState.model_validate(readiness())
    return None


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(request: Request) -> Response:
    """Ready to do its job: every component ok (200), else 503; `components` says which is not.
    With the embedded vLLM, also which server this process owns: pid, start time, model, state."""
    checks: ReadinessChecks = request.app.state.readiness
    readiness = checks.run().model_copy(update={"embedded_vllm": _embedded_vllm(request)})
    return JSONResponse(readiness.model_dump(mode="json"), status_code=200 if readiness.status == "ok" else 503)


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
