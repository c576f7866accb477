"""The job worker: claims jobs from the durable queue and runs the handler of each job's kind.

Owns the claim loop (expired leases requeued first), the heartbeat thread that extends the lease
and publishes the handler's progress into the job row, the outcome (succeeded, retried, failed,
dead after max_attempts; waiting for a dependency without spending an attempt), graceful stop, the job-duration metric
and the warm-up callables run before the first claim (so a job does not pay for loading). A worker that dies mid-job
simply stops heartbeating: the lease expires and the next worker re-runs the job. Knows nothing
about what a job does: handlers are given by kind.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from memory_store.models import Job
from memory_store.queue import JobQueue
from service.api.metrics import ServiceMetrics
from service.config import Settings

__all__ = [
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "JobHandler",
    "JobOutcome",
    "JobWaiting",
    "Worker",
    "default_worker_id",
]

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """Raised by a handler: the job failed; `retryable=False` fails it at once (no retry)."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class JobWaiting(Exception):
    """Raised by a handler: the job cannot finish until a dependency comes back (e.g. no vLLM
    replica answers). The job goes back to the queue for `delay_s` without spending an attempt;
    `payload` (when given) replaces the job's payload so the next run resumes instead of redoing
    work; `waiting_for` names the dependency in the job's progress."""

    def __init__(
        self, reason: str, *, waiting_for: str, delay_s: float, payload: dict[str, Any] | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.waiting_for = waiting_for
        self.delay_s = delay_s
        self.payload = payload


class JobCancelled(Exception):
    """Raised by a handler when `JobContext.should_stop()` turned true (lost lease or worker stop)."""


@dataclass(frozen=True)
class JobOutcome:
    """What a handler returns: the job's `result`, and optionally work to do in the same transaction
    that marks the job succeeded (e.g. enqueue a follow-up job once the job's dedupe key is free)."""

    result: dict[str, Any] = field(default_factory=dict)
    on_complete: Callable[[Session], None] | None = None


@dataclass
class JobContext:
    """One claimed job as its handler sees it."""

    job_id: int
    kind: str
    namespace: str | None
    payload: dict[str, Any]
    attempt: int
    max_attempts: int
    _progress: dict[str, Any] | None = None
    _progress_lock: threading.Lock = field(default_factory=threading.Lock)
    _lease_lost: threading.Event = field(default_factory=threading.Event)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def report_progress(self, progress: Mapping[str, Any]) -> None:
        """Publish progress (JSON-able); the heartbeat writes the latest one into the job row."""
        with self._progress_lock:
            self._progress = dict(progress)

    def take_progress(self) -> dict[str, Any] | None:
        with self._progress_lock:
            progress, self._progress = self._progress, None
            return progress

    def restore_progress(self, progress: dict[str, Any]) -> None:
        """Put back progress a failed heartbeat could not write, unless newer progress came meanwhile."""
        with self._progress_lock:
            if self._progress is None:
                self._progress = progress

    @property
    def lease_lost(self) -> bool:
        return self._lease_lost.is_set()

    def should_stop(self) -> bool:
        """True once the lease is lost (another worker owns the job now) or the worker is stopping."""
        return self._lease_lost.is_set() or self._stopping.is_set()


class JobHandler(Protocol):
    def __call__(self, context: JobContext) -> JobOutcome: ...


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Runs queued jobs one at a time. `run_forever()` blocks (the `loraloop worker` process);
    `start()`/`stop()` run it on a thread beside the API (the app's background seam)."""

    name = "worker"

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        handlers: Mapping[str, JobHandler],
        *,
        worker_id: str | None = None,
        metrics: ServiceMetrics | None = None,
        warm_up: Sequence[Callable[[], None]] = (),
    ) -> None:
        if settings.job_heartbeat_s >= settings.job_lease_s:
            raise ValueError(
                f"LORALOOP_JOB_HEARTBEAT_S ({settings.job_heartbeat_s:g}) must be shorter than "
                f"LORALOOP_JOB_LEASE_S ({settings.job_lease_s:g}): the lease would expire between heartbeats"
            )
        self.settings = settings
        self.session_factory = session_factory
        self.handlers = dict(handlers)
        self.worker_id = worker_id or default_worker_id()
        self.metrics = metrics
        self.warm_up = tuple(warm_up)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._current: JobContext | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, name=f"worker-{self.worker_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = 30.0) -> None:
        """Ask the loop to stop; a running handler sees `should_stop()` and gives its job back."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("worker %s did not stop within %ss", self.worker_id, timeout_s)
            self._thread = None

    def request_stop(self) -> None:
        self._stop.set()
        current = self._current
        if current is not None:
            current._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_forever(self) -> None:
        log.info("worker %s started (kinds: %s)", self.worker_id, ", ".join(sorted(self.handlers)))
        self._warm_up()
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # a store outage must not kill the loop
                log.exception("worker %s: claiming a job failed; retrying", self.worker_id)
                ran = False
            if not ran:
                self._stop.wait(self.settings.worker_poll_s)
        log.info("worker %s stopped", self.worker_id)

    def _warm_up(self) -> None:
        """The `warm_up` callables, in order, before the first claim (a failed one is logged: the
        jobs then load what they need themselves)."""
        for warm in self.warm_up:
            if self._stop.is_set():
                return
            try:
                warm()
            except Exception:
                log.exception("worker %s: warm-up %s failed; jobs will load what they need", self.worker_id,
                              getattr(warm, "__qualname__", warm))

    # --- one job -------------------------------------------------------------------------------
    def claim(self) -> JobContext | None:
        with self.session_factory.begin() as session:
            queue = self._queue(session)
            queue.requeue_expired()
            job = queue.claim(
                worker_id=self.worker_id, kinds=sorted(self.handlers), lease_s=self.settings.job_lease_s
            )
            return None if job is None else _context_of(job)

    def run_once(self) -> bool:
        """Claim one due job and run it to its outcome; False when the queue had nothing due."""
        if self._stop.is_set():
            return False
        context = self.claim()
        if context is None:
            return False
        self._current = context
        if self._stop.is_set():
            context._stopping.set()
        try:
            self._run(context)
        finally:
            self._current = None
        return True

    def _run(self, context: JobContext) -> None:
        log.info(
            "job %d (%s %s) attempt %d/%d started",
            context.job_id,
            context.kind,
            context.namespace or "-",
            context.attempt,
            context.max_attempts,
        )
        started = time.perf_counter()
        done = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat_loop, args=(context, done), daemon=True, name=f"heartbeat-{context.job_id}"
        )
        heartbeat.start()
        status = "failed"
        try:
            handler = self.handlers.get(context.kind)
            if handler is None:
                raise JobFailed(f"no handler for job kind {context.kind!r}", retryable=False)
            outcome = handler(context)
            done.set()
            heartbeat.join()
            status = self._complete(context, outcome)
        except JobWaiting as error:
            done.set()
            heartbeat.join()
            status = self._wait(context, error)
        except JobCancelled as error:
            done.set()
            heartbeat.join()
            status = self._give_back(context, str(error))
        except JobFailed as error:
            done.set()
            heartbeat.join()
            status = self._fail(context, str(error), retryable=error.retryable)
        except Exception as error:  # noqa: BLE001 - any handler bug fails the job, not the worker
            done.set()
            heartbeat.join()
            log.error("job %d raised:\n%s", context.job_id, traceback.format_exc())
            status = self._fail(context, f"{type(error).__name__}: {error}", retryable=True)
        finally:
            done.set()
        seconds = time.perf_counter() - started
        log.info("job %d (%s) %s after %.2fs", context.job_id, context.kind, status, seconds)
        if self.metrics is not None:
            self.metrics.observe_job(context.kind, status, seconds)

    def _heartbeat_loop(self, context: JobContext, done: threading.Event) -> None:
        while not done.wait(self.settings.job_heartbeat_s):
            self._heartbeat(context)

    def _heartbeat(self, context: JobContext) -> None:
        progress = context.take_progress()
        try:
            with self.session_factory.begin() as session:
                held = self._queue(session).heartbeat(
                    job_id=context.job_id,
                    worker_id=self.worker_id,
                    lease_s=self.settings.job_lease_s,
                    progress=progress,
                )
        except Exception:  # retried on the next beat; the lease outlives a few misses
            log.exception("job %d: heartbeat failed", context.job_id)
            if progress is not None:
                context.restore_progress(progress)
            return
        if not held:
            log.warning("job %d: lease lost (expired, cancelled or taken over); stopping it", context.job_id)
            context._lease_lost.set()

    def _complete(self, context: JobContext, outcome: JobOutcome) -> str:
        with self.session_factory.begin() as session:
            queue = self._queue(session)
            if not queue.complete(job_id=context.job_id, worker_id=self.worker_id, result=outcome.result):
                log.warning("job %d finished but its lease was lost: result dropped", context.job_id)
                return "lost"
            if outcome.on_complete is not None:
                outcome.on_complete(session)
        return "succeeded"

    def _fail(self, context: JobContext, error: str, *, retryable: bool) -> str:
        with self.session_factory.begin() as session:
            job = self._queue(session).fail(
                job_id=context.job_id, worker_id=self.worker_id, error=error[:4000], retryable=retryable
            )
            status = "lost" if job is None else job.status
        if status == "queued":
            log.warning("job %d failed (will retry): %s", context.job_id, error)
            return "retried"
        log.error("job %d %s: %s", context.job_id, status, error)
        return status

    def _wait(self, context: JobContext, waiting: JobWaiting) -> str:
        next_try = time.time() + waiting.delay_s
        progress = {
            "phase": "waiting",
            "waiting_for": waiting.waiting_for,
            "reason": waiting.reason,
            "next_try_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(next_try)),
        }
        with self.session_factory.begin() as session:
            job = self._queue(session).wait(
                job_id=context.job_id,
                worker_id=self.worker_id,
                reason=waiting.reason[:4000],
                delay_s=waiting.delay_s,
                payload=waiting.payload,
                progress=progress,
            )
        if job is None:
            return "lost"
        log.warning(
            "job %d waits %.0fs for %s: %s",
            context.job_id,
            waiting.delay_s,
            waiting.waiting_for,
            waiting.reason,
        )
        return "waiting"

    def _give_back(self, context: JobContext, reason: str) -> str:
        if context.lease_lost:
            return "lost"
        return self._fail(context, f"interrupted: {reason}", retryable=True)

    def _queue(self, session: Session) -> JobQueue:
        return JobQueue(session, default_max_attempts=self.settings.job_max_attempts)


def _context_of(job: Job) -> JobContext:
    return JobContext(
        job_id=job.id,
        kind=job.kind,
        namespace=job.namespace,
        payload=dict(job.payload or {}),
        attempt=job.attempts,
        max_attempts=job.max_attempts,
    )
