"""The composition root of `loraloop serve`: what it runs beside the API: the embedded vLLM (when LORALOOP_VLLM_URLS=embedded),
the reconciler, the job worker and the distillation scheduler loop, built from Settings as the
app's background services (started in that order, stopped in reverse by the app's lifespan).

Also owns the co-located GPU policy (`VllmSleepWindow`). Knows how the pieces connect, not what
they do: training is service.jobs.train's, swapping deploy.hotswap's, the registry
service.adapters.registry's (one per process: service.app.AppResources.adapter_registry).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from deploy.embedded import (
    EmbeddedVllm,
    EmbeddedVllmError,
    free_port,
)
from deploy.vllm_client import VllmClient, VllmError
from service.adapters.reconciler import Reconciler
from service.adapters.registry import EMBEDDED_VLLM, AdapterRegistry
from service.api.readiness import TOKENIZER_FILES, tokenizer_check, vllm_check
from service.app import AppResources, BackgroundService
from service.component_configs import embedded_vllm_config
from service.config import Settings
from service.jobs.distill import DISTILL_JOB_KIND
from service.jobs.scheduler import DistillScheduler
from service.jobs.worker import JobContext, JobHandler, JobOutcome, Worker

logger = logging.getLogger(__name__)

SCHEDULER_TICK_S = 30.0


def uses_embedded_vllm(settings: Settings) -> bool:
    return settings.vllm_urls == [EMBEDDED_VLLM]


def prepare_serving(settings: Settings) -> Settings:
    """Settings ready to serve: the base model on disk (the default real model is fetched into the
    offline cache when missing) and, with the embedded vLLM, a concrete port (0 picks a free one,
    so the proxy and the registry know the URL before vLLM is up)."""
    ensure_base_model(settings)
    if not uses_embedded_vllm(settings):
        return settings
    if settings.vllm_port == 0:
        return settings.model_copy(update={"vllm_port": free_port()})
    return settings


class BaseModelUnavailable(RuntimeError):
    """LORALOOP_BASE_MODEL names no loadable model; start-up stops with this one line."""


def ensure_base_model(settings: Settings) -> Path:
    """The base model folder: fetched when it is the default one and missing; otherwise it must
    exist and hold a model config, or start-up fails with one clear line. A tokenizer is required
    when this process trains (the worker is enabled); an ingest-only process without one accepts
    feedback with the tokenizer-free checks (service.ingest.intake warns)."""
    from service.config import default_base_model

    path = Path(settings.base_model)
    if not path.exists() and path.resolve() == default_base_model().resolve():
        from training.pretrained import DEFAULT_MODEL, model_dir

        logger.info("base model %s absent: fetching the pinned %s (once)", path, DEFAULT_MODEL)
        return model_dir(DEFAULT_MODEL)
    if not (path / "config.json").is_file():
        raise BaseModelUnavailable(
            f"LORALOOP_BASE_MODEL={path}: no model there (no config.json); point it at a model folder "
            f"or unset it to use the default ({default_base_model()}, fetched by `loraloop models fetch`)"
        )
    tokenizer_dir = Path(settings.tokenizer_path)
    has_tokenizer = any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES)
    if not has_tokenizer and settings.worker_enabled:
        raise BaseModelUnavailable(
            f"LORALOOP_TOKENIZER={tokenizer_dir}: no tokenizer files there (the worker needs one to train; "
            "point it at a tokenizer folder, or set LORALOOP_WORKER_ENABLED=false to only ingest)"
        )
    return path


def claim_embedded_port(settings: Settings) -> None:
    """Fail fast before serving (EmbeddedVllmPortInUse, naming the port and the pid) when the
    embedded vLLM's port is served by a process this loraloop did not start; a server recorded by
    an earlier run of this data folder, whose loraloop is gone, is stopped instead. No-op without
    the embedded vLLM. Call after prepare_serving (the port is concrete then)."""
    if uses_embedded_vllm(settings):
        EmbeddedVllm(embedded_vllm_config(settings)).claim_port()


# --- background services -----------------------------------------------------------------------


class EmbeddedVllmService:
    """Starts the embedded vLLM on a thread (the API answers meanwhile: /v1 says 503 until it is
    healthy), keeps trying when a start fails, and calls `on_ready` after every (re)start."""

    name = "vllm"

    def __init__(self, vllm: EmbeddedVllm, *, on_ready: Callable[[], None], retry_s: float = 10.0) -> None:
        self.vllm = vllm
        self.on_ready = on_ready
        self.retry_s = retry_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._start_until_up, name="vllm-start", daemon=True)
        self._thread.start()

    def _start_until_up(self) -> None:
        while not self._stopping.is_set():
            try:
                self.vllm.start(supervise=True)
            except EmbeddedVllmError as error:
                if self._stopping.is_set():
                    return
                logger.error("embedded vLLM did not start (retrying in %.0f s): %s", self.retry_s, error)
                self._stopping.wait(self.retry_s)
                continue
            self.ready.set()
            self.on_ready()
            return

    def readiness(self) -> dict[str, Any]:
        """/readyz's `embedded_vllm` entry: pid, start time, model and state of the server we own."""
        return self.vllm.describe()

    def stop(self) -> None:
        self._stopping.set()
        self.vllm.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


class DistillSchedulerLoop:
    """Calls DistillScheduler.tick() now and every `interval_s` (enqueues due distillation jobs)."""

    name = "scheduler"

    def __init__(self, scheduler: DistillScheduler, interval_s: float = SCHEDULER_TICK_S) -> None:
        self.scheduler = scheduler
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="distill-scheduler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                for due in self.scheduler.tick():
                    logger.info("distillation due: %s", due)
            except Exception:
                logger.exception("distillation scheduler tick failed")
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


# --- co-located GPU ----------------------------------------------------------------------------


class VllmSleepWindow:
    """Co-located GPU policy. By default vLLM and training share the GPU through a bounded split
    (LORALOOP_VLLM_GPU_MEMORY_UTILIZATION, 0.5): both run at once, inference never pauses. With
    LORALOOP_VLLM_SLEEP_FOR_TRAINING=true (for models too large to share) the embedded vLLM starts
    with --enable-sleep-mode and every replica is put to sleep (level 1: weights offloaded to host
    memory, KV cache dropped) while a job trains, and woken before the job evaluates and promotes:
    hot-swapping needs an awake server, and inference answers 503 while it sleeps. The CPU build
    has no sleep mode, so the window is a no-op there."""

    def __init__(self, clients: Sequence[VllmClient], *, enabled: bool) -> None:
        self.clients = list(clients)
        self.enabled = enabled and bool(self.clients)
        self._asleep = False
        self._lock = threading.Lock()

    def sleep(self) -> None:
        with self._lock:
            if not self.enabled or self._asleep:
                return
            for client in self.clients:
                try:
                    client.sleep(level=1)
                except VllmError as error:
                    logger.warning("could not put %s to sleep before training: %s", client, error)
            self._asleep = True

    def wake(self) -> None:
        with self._lock:
            if not self._asleep:
                return
            for client in self.clients:
                try:
                    client.wake_up()
                except VllmError as error:
                    logger.error("could not wake %s after training: %s", client, error)
            self._asleep = False

    def wrap(self, handler: JobHandler) -> JobHandler:
        """A handler that sleeps vLLM while the job reports its `train` phase and wakes it as soon
        as the job reports any later phase (evaluate, publish, promote) or ends."""
        if not self.enabled:
            return handler

        def run(context: JobContext) -> JobOutcome:
            report = context.report_progress

            def report_and_switch(progress: Mapping[str, Any]) -> None:
                if progress.get("phase") == "train":
                    self.sleep()
                elif progress.get("phase") not in (None, "prepare"):
                    self.wake()
                report(progress)

            context.report_progress = report_and_switch  # type: ignore[method-assign]
            try:
                return handler(context)
            finally:
                self.wake()

        return run


# --- the factory the app calls -------------------------------------------------------------------


def requeue_stranded_training(settings: Settings, factory: sessionmaker[Session]) -> list[str]:
    """Every replica answers: jobs waiting for vLLM are due now (service.ingest.intake.wake_waiting)
    and train jobs that died with feedback still pending are re-queued (requeue_stranded)."""
    from service.ingest.intake import requeue_stranded, wake_waiting

    with factory.begin() as session:
        wake_waiting(session)
        return requeue_stranded(session, settings)


def job_handlers(
    settings: Settings, session_factory: sessionmaker[Session], registry: AdapterRegistry
) -> dict[str, JobHandler]:
    from service.jobs.distill import DistillJobHandler
    from service.jobs.train import TrainJobHandler

    online = TrainJobHandler(settings, session_factory, registry)  # its resident base is shared
    return {
        "train": online,
        DISTILL_JOB_KIND: DistillJobHandler(settings, session_factory, registry, online=online),
    }


def build_worker(
    settings: Settings,
    session_factory: sessionmaker[Session],
    registry: AdapterRegistry,
    *,
    metrics: Any | None = None,
    worker_id: str | None = None,
) -> Worker:
    """The job worker of `serve` and of `loraloop worker`, built one way: the train and distill
    handlers, each inside the vLLM sleep window of the registry's replicas."""
    swapper = registry.swapper
    window = VllmSleepWindow(swapper.clients if swapper else [], enabled=settings.vllm_sleep_for_training)
    handlers = job_handlers(settings, session_factory, registry)
    warm_up = [handlers["train"].warm] if settings.worker_warm_start else []
    return Worker(
        settings,
        session_factory,
        {kind: window.wrap(handler) for kind, handler in handlers.items()},
        metrics=metrics,
        worker_id=worker_id,
        warm_up=warm_up,
    )


def background_services(settings: Settings) -> Callable[[AppResources], Sequence[BackgroundService]]:
    """The `background` factory for create_app: what `loraloop serve` runs in-process."""

    def build(resources: AppResources) -> list[BackgroundService]:
        factory = resources.session_factory
        registry = resources.adapter_registry()  # the routes' registry too: one view of vLLM
        swapper = registry.swapper
        services: list[BackgroundService] = []
        if swapper is not None:
            reconciler = Reconciler(
                swapper=swapper,
                desired_state=registry.desired_state,
                session_factory=factory,
                interval_s=settings.reconcile_interval_s,
                ensure_namespace=lambda: registry.ensure_base_version(settings.default_namespace),
                on_all_reachable=lambda: requeue_stranded_training(settings, factory),
            )
            resources.readiness.add(
                "vllm",
                vllm_check(lambda: reconciler.last_round, max_age_s=3 * settings.reconcile_interval_s + 30),
            )
            if uses_embedded_vllm(settings):
                vllm = EmbeddedVllm(embedded_vllm_config(settings), on_restart=reconciler.trigger)
                services.append(EmbeddedVllmService(vllm, on_ready=reconciler.trigger))
            services.append(reconciler)
        if settings.worker_enabled:
            resources.readiness.add("tokenizer", tokenizer_check(Path(settings.tokenizer_path)))
            services.append(build_worker(settings, factory, registry, metrics=resources.metrics))
        if settings.distill_enabled:
            from service.jobs.distill import scheduler_callables

            scheduler = DistillScheduler.from_settings(settings, **scheduler_callables(settings, factory))
            services.append(DistillSchedulerLoop(scheduler))
        if settings.retention_enabled:
            from service.jobs.retention import RetentionLoop

            services.append(RetentionLoop(settings, factory))
        return services

    return build


class ThreadedServer:
    """uvicorn serving `app` on a thread of this process (the demo, the benchmark and the end-to-end
    test drive the daemon from the main thread). `start()` returns once the lifespan ran (background
    services started) and the socket listens; `stop()` runs the shutdown (services stopped)."""

    def __init__(
        self, app: Any, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        import uvicorn

        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(
            app,
            host=host,
            port=self.port,
            log_level=log_level,
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 120.0) -> None:
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the loraloop server exited while starting (see its log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the loraloop server did not start within {timeout_s:g} s")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 120.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
