"""Prometheus metrics of one app instance, in its own `CollectorRegistry`.

`ServiceMetrics` owns the collectors (requests by route template and status, request latency,
feedback accepted, queue depth, job durations); `MetricsMiddleware` records every HTTP request.
The worker observes job durations through `ServiceMetrics.observe_job`. Knows nothing about routes.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
JOB_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "loraloop_http_requests_total",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "loraloop_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.feedback_accepted = Counter(
            "loraloop_feedback_accepted_total",
            "Feedback items stored (idempotent replays are not counted).",
            ["namespace"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "loraloop_job_queue_depth",
            "Jobs waiting or running, by status (read from the store at scrape time).",
            ["status"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "loraloop_job_duration_seconds",
            "Wall time of finished jobs by kind and outcome.",
            ["kind", "status"],
            buckets=JOB_BUCKETS,
            registry=self.registry,
        )

    def observe_job(self, kind: str, status: str, seconds: float) -> None:
        self.job_duration.labels(kind=kind, status=status).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    # Unmatched paths are one label value, so probing random URLs cannot blow up the label set.
    return path if isinstance(path, str) else "<unmatched>"


class MetricsMiddleware:
    """Pure ASGI middleware: counts each request by its route template and final status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = _route_template(scope)
            method = scope.get("method", "GET")
            self.metrics.requests.labels(method=method, route=route, status=str(status)).inc()
            self.metrics.latency.labels(method=method, route=route).observe(time.perf_counter() - started)
