"""The FastAPI application factory: `create_app(settings)`.

Wires settings, the database engine and session factory, auth tokens, metrics, the body size
limit, CORS (off unless `cors_origins` is set), the error mapping and the routers. On start it
upgrades the database schema, then starts the background services (worker, scheduler, reconciler)
built by the `background` factory it was given; on shutdown it stops them in reverse order.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from memory_store.db import make_engine, make_session_factory, upgrade_database
from service.api.auth import TokenSource
from service.api.body_limit import BodySizeLimitMiddleware
from service.api.errors import install_error_handlers
from service.api.metrics import MetricsMiddleware, ServiceMetrics
from service.api.readiness import ReadinessChecks, database_check
from service.api.routes import api_router
from service.config import Settings
from service.dashboard import router as dashboard_router
from service.inference.proxy import InferenceProxy
from service.inference.routes import router as inference_router
from service.ingest.intake import FeedbackValidator
from service.ingest.writer import DirectFeedbackWriter, FeedbackWriter

if TYPE_CHECKING:
    from service.adapters.registry import AdapterRegistry

logger = logging.getLogger(__name__)


class BackgroundService(Protocol):
    """Something that runs beside the API for the app's lifetime (worker, scheduler, reconciler).

    `start` must return promptly (spawn a thread or task); `stop` must return once it has stopped.
    """

    name: str

    def start(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class AppResources:
    """What the app owns and hands to its background services."""

    settings: Settings
    engine: Engine
    session_factory: sessionmaker[Session]
    metrics: ServiceMetrics
    readiness: ReadinessChecks  # `/readyz` components; background services add theirs
    _registry: AdapterRegistry | None = field(default=None, init=False, repr=False)
    _registry_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def adapter_registry(self) -> AdapterRegistry:
        """The process's one adapter registry and hot-swapper, built on first use (it pulls in
        torch): the routes, the reconciler and the jobs share it, so they share one view of what
        is loaded on each vLLM replica (swaps, drains, previews)."""
        with self._registry_lock:
            if self._registry is None:
                from service.adapters.registry import AdapterRegistry, build_hot_swapper

                self._registry = AdapterRegistry.from_settings(
                    self.settings, self.session_factory, build_hot_swapper(self.settings)
                )
            return self._registry


BackgroundFactory = Callable[[AppResources], Sequence[BackgroundService]]


def create_app(
    settings: Settings,
    *,
    start_background: bool = True,
    background: BackgroundFactory | None = None,
) -> FastAPI:
    """A ready-to-serve app. `background` builds the services started in the lifespan (none if
    omitted); `start_background=False` keeps them off (API-only processes, most tests)."""
    engine = make_engine(
        settings.database_url,
        connect_timeout_s=settings.db_connect_timeout_s,
        pool_size=settings.db_pool_size,
    )
    resources = AppResources(
        settings=settings,
        engine=engine,
        session_factory=make_session_factory(engine),
        metrics=ServiceMetrics(),
        readiness=ReadinessChecks(),
    )
    token_table = TokenSource(settings.auth_tokens, settings.auth_tokens_file)
    validator = FeedbackValidator(settings)
    writer_class = FeedbackWriter if settings.feedback_group_commit else DirectFeedbackWriter
    feedback_writer = writer_class(resources.session_factory, settings)
    resources.readiness.add("database", database_check(engine))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await anyio.to_thread.run_sync(upgrade_database, settings.database_url)
        await anyio.to_thread.run_sync(validator.load)
        started: list[BackgroundService] = []
        try:
            if start_background and background is not None:
                for service in background(resources):
                    logger.info("starting background service %s", service.name)
                    await anyio.to_thread.run_sync(service.start)
                    started.append(service)
            app.state.background_services = started
            yield
        finally:
            for service in reversed(started):
                logger.info("stopping background service %s", service.name)
                await anyio.to_thread.run_sync(service.stop)
            await anyio.to_thread.run_sync(feedback_writer.close)
            await app.state.inference_proxy.aclose()
            engine.dispose()

    app = FastAPI(
        title="loraloop",
        summary="Feedback in, LoRA adapters hot-swapped into vLLM minutes later.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.resources = resources
    app.state.session_factory = resources.session_factory
    # GET/HEAD sessions only read: on SQLite they must not take the write lock (WAL readers run
    # beside the writer instead of queueing behind every feedback insert)
    app.state.read_session_factory = make_session_factory(engine, read_only=True)
    app.state.metrics = resources.metrics
    app.state.token_table = token_table
    app.state.feedback_validator = validator
    app.state.feedback_writer = feedback_writer
    app.state.background_services = []
    app.state.readiness = resources.readiness
    # alias lookups only read: they must not queue behind writers for SQLite's write lock
    app.state.inference_proxy = InferenceProxy.from_settings(settings, app.state.read_session_factory)

    install_error_handlers(app)
    app.include_router(api_router)
    app.include_router(inference_router)
    app.include_router(dashboard_router)
    # Middleware added last runs first: metrics see every answer, the 413 included.
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
        )
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=resources.metrics)
    return app
