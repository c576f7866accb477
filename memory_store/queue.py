"""The durable job queue: enqueue with dedupe, leased claims, heartbeats, retries, dead letters.

Like the repositories, `JobQueue` wraps a Session it is given and the caller commits. Commit right
after `claim`, `heartbeat`, `complete` and `fail` (one short transaction each:
`with factory.begin() as session: job = JobQueue(session).claim(...)`); never keep that session
open while the job runs. Claims are exclusive: PostgreSQL uses `SELECT ... FOR UPDATE SKIP LOCKED`;
SQLite sessions begin with `BEGIN IMMEDIATE` (one writer at a time). A job whose lease expired
(crashed worker) is claimed again, each claim counting an attempt; after `max_attempts` it goes to
`dead`. A job that only waits for a dependency (`wait`) goes back to the queue without counting an
attempt. It knows nothing about what a job does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any

from sqlalchemy import Integer, Select, Update, bindparam, case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from memory_store.errors import NotFound
from memory_store.filters import namespace_matches
from memory_store.models import JOB_ACTIVE_STATUSES, JOB_STATUSES, FeedbackItem, Job, utcnow

DEFAULT_LEASE_S = 60.0
TERMINAL_STATUSES = ("succeeded", "failed", "dead", "cancelled")


# built once: constructing a statement costs more than executing it (the hot path of ingestion)
_RESCHEDULE_QUEUED = (
    update(Job)
    .where(Job.dedupe_key == bindparam("key"), Job.status == "queued")
    .values(run_after=bindparam("due_at", type_=Job.__table__.c.run_after.type))
    .execution_options(synchronize_session=False)
)


@lru_cache(maxsize=1)
def _reschedule_queued_by_pending() -> Update:
    run_after_type = Job.__table__.c.run_after.type
    pending = (
        select(FeedbackItem.id)
        .where(FeedbackItem.status == "pending", FeedbackItem.namespace == bindparam("pending_namespace"))
        .limit(bindparam("pending_count", type_=Integer()))
        .subquery()
    )
    reached = select(func.count()).select_from(pending).scalar_subquery() >= bindparam("pending_count")
    due = case(
        (reached, bindparam("now", type_=run_after_type)), else_=bindparam("due_at", type_=run_after_type)
    )
    return (
        update(Job)
        .where(Job.dedupe_key == bindparam("key"), Job.status == "queued")
        .values(run_after=due)
        .execution_options(synchronize_session=False)
    )


class JobQueue:
    """Jobs in the database, safe for many workers in many processes on one database."""

    def __init__(
        self,
        session: Session,
        *,
        default_max_attempts: int = 3,
        backoff_base_s: float = 5.0,
        backoff_max_s: float = 300.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if default_max_attempts < 1:
            raise ValueError("default_max_attempts must be >= 1")
        self.session = session
        self.default_max_attempts = default_max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock

    # --- producers ---------------------------------------------------------------------------------

    def enqueue(
        self,
        *,
        kind: str,
        namespace: str | None = None,
        payload: dict[str, Any] | None = None,
        dedupe_key: str | None = None,
        run_after: datetime | None = None,
        max_attempts: int | None = None,
        created_by: str | None = None,
    ) -> Job:
        """Add a job; with `dedupe_key`, return the queued/running job of that key if there is one
        (two racing producers get the same job: a partial unique index decides)."""
        attempts_allowed = self.default_max_attempts if max_attempts is None else max_attempts
        if attempts_allowed < 1:
            raise ValueError("max_attempts must be >= 1")
        if dedupe_key is not None:
            existing = self.active_job(dedupe_key=dedupe_key)
            if existing is not None:
                return existing
        now = self._clock()
        job = Job(
            kind=kind,
            namespace=namespace,
            status="queued",
            payload=payload or {},
            attempts=0,
            max_attempts=attempts_allowed,
            run_after=run_after or now,
            dedupe_key=dedupe_key,
            created_at=now,
            created_by=created_by,
        )
        if dedupe_key is None:
            self.session.add(job)
            self.session.flush()
            return job
        try:
            with self.session.begin_nested():
                self.session.add(job)
        except IntegrityError:
            existing = self.active_job(dedupe_key=dedupe_key)
            if existing is None:
                raise
            return existing
        return job

    def reschedule(self, *, job_id: int, run_after: datetime) -> bool:
        """Move a still-queued job's start to `run_after` (debouncing producers); False when it was
        already claimed or finished (then the caller's change rides on the next run)."""
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(run_after=run_after)
            .execution_options(synchronize_session=False)
        )
        return result.rowcount == 1

    def reschedule_queued(
        self, *, dedupe_key: str, run_after: datetime, now_if_pending: tuple[str, int] | None = None
    ) -> bool:
        """`reschedule` of the queued job holding `dedupe_key` to `run_after`, in one statement;
        with `now_if_pending=(namespace, n)`, to now instead when `namespace` holds at least `n`
        pending feedback items, decided in the same statement. False when no job of that key is
        queued (none, or it runs already)."""
        if now_if_pending is None:
            result = self.session.execute(_RESCHEDULE_QUEUED, {"key": dedupe_key, "due_at": run_after})
        else:
            namespace, count = now_if_pending
            result = self.session.execute(
                _reschedule_queued_by_pending(),
                {
                    "key": dedupe_key,
                    "due_at": run_after,
                    "now": self._clock(),
                    "pending_namespace": namespace,
                    "pending_count": max(count, 0),
                },
            )
        return result.rowcount == 1

    def cancel(self, *, job_id: int) -> Job:
        """Cancel a queued or running job (a running worker sees a lost lease on its next heartbeat).
        A finished job is returned unchanged."""
        job = self.session.scalars(select(Job).where(Job.id == job_id).with_for_update()).first()
        if job is None:
            raise NotFound("job", job_id)
        if job.status in JOB_ACTIVE_STATUSES:
            job.status = "cancelled"
            job.lease_expires_at = None
            job.finished_at = self._clock()
            self.session.flush()
        return job

    # --- workers -----------------------------------------------------------------------------------

    def claim(
        self, *, worker_id: str, kinds: Sequence[str] | None = None, lease_s: float = DEFAULT_LEASE_S
    ) -> Job | None:
        """Lease the oldest due job (expired leases are requeued first), or None when there is none."""
        now = self._clock()
        self._requeue_expired(now)
        stmt = select(Job).where(Job.status == "queued", Job.run_after <= now)
        if kinds:
            stmt = stmt.where(Job.kind.in_(list(kinds)))
        job = self.session.scalars(self._skip_locked(stmt.order_by(Job.id).limit(1))).first()
        if job is None:
            return None
        job.status = "running"
        job.attempts += 1
        job.lease_owner = worker_id
        job.lease_expires_at = now + timedelta(seconds=lease_s)
        job.heartbeat_at = now
        job.started_at = now
        job.finished_at = None
        self.session.flush()
        return job

    def heartbeat(
        self,
        *,
        job_id: int,
        worker_id: str,
        lease_s: float = DEFAULT_LEASE_S,
        progress: dict[str, Any] | None = None,
    ) -> bool:
        """Extend the lease; False when this worker no longer holds it (then stop working on the job)."""
        now = self._clock()
        values: dict[str, Any] = {"lease_expires_at": now + timedelta(seconds=lease_s), "heartbeat_at": now}
        if progress is not None:
            values["progress"] = progress
        return self._update_owned(job_id, worker_id, values)

    def complete(self, *, job_id: int, worker_id: str, result: dict[str, Any] | None = None) -> bool:
        """Mark the job succeeded; False (and no change) when the lease was lost."""
        values = {
            "status": "succeeded",
            "result": result,
            "lease_expires_at": None,
            "finished_at": self._clock(),
            "error": None,
        }
        return self._update_owned(job_id, worker_id, values)

    def _update_owned(self, job_id: int, worker_id: str, values: dict[str, Any]) -> bool:
        result = self.session.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == "running")
            .values(**values)
            .execution_options(synchronize_session="fetch")
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def fail(self, *, job_id: int, worker_id: str, error: str, retryable: bool = True) -> Job | None:
        """Record a failure: requeue after an exponential backoff, or `dead` once the attempts are
        used up, or `failed` at once when not retryable. None (and no change) when the lease was lost."""
        stmt = select(Job).where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == "running")
        job = self.session.scalars(stmt.with_for_update()).first()
        if job is None:
            return None
        now = self._clock()
        job.error = error
        job.lease_expires_at = None
        if not retryable:
            job.status = "failed"
            job.finished_at = now
        elif job.attempts >= job.max_attempts:
            job.status = "dead"
            job.finished_at = now
        else:
            job.status = "queued"
            job.lease_owner = None
            job.run_after = now + timedelta(seconds=self.backoff_s(job.attempts))
        self.session.flush()
        return job

    def wait(
        self,
        *,
        job_id: int,
        worker_id: str,
        reason: str,
        delay_s: float,
        payload: dict[str, Any] | None = None,
        progress: dict[str, Any] | None = None,
    ) -> Job | None:
        """Put a running job back to wait for a dependency (e.g. an unreachable vLLM): queued again
        after `delay_s`, with `reason` as its error and `progress` saying what it waits for. The run
        does not count as an attempt (the job did nothing wrong), so waiting never makes it dead.
        `payload` replaces the job's payload (what the next run resumes from). None (and no change)
        when the lease was lost."""
        stmt = select(Job).where(Job.id == job_id, Job.lease_owner == worker_id, Job.status == "running")
        job = self.session.scalars(stmt.with_for_update()).first()
        if job is None:
            return None
        now = self._clock()
        job.status = "queued"
        job.attempts = max(job.attempts - 1, 0)
        job.lease_owner = None
        job.lease_expires_at = None
        job.error = reason
        job.run_after = now + timedelta(seconds=max(delay_s, 0.0))
        if payload is not None:
            job.payload = dict(payload)
        if progress is not None:
            job.progress = dict(progress)
        self.session.flush()
        return job

    def backoff_s(self, attempts: int) -> float:
        """Delay before the retry that follows attempt number `attempts`: base * 2^(attempts-1), capped."""
        return float(min(self.backoff_base_s * 2 ** max(attempts - 1, 0), self.backoff_max_s))

    def requeue_expired(self) -> int:
        """Put running jobs whose lease expired back in the queue (or `dead`); returns how many."""
        return self._requeue_expired(self._clock())

    def _requeue_expired(self, now: datetime) -> int:
        stmt = select(Job).where(Job.status == "running", Job.lease_expires_at < now).order_by(Job.id)
        expired = self.session.scalars(self._skip_locked(stmt)).all()
        for job in expired:
            job.lease_owner = None
            job.lease_expires_at = None
            if job.attempts >= job.max_attempts:
                job.status = "dead"
                job.error = f"lease expired on attempt {job.attempts} of {job.max_attempts}"
                job.finished_at = now
            else:
                job.status = "queued"
                job.run_after = now
        if expired:
            self.session.flush()
        return len(expired)

    # --- readers -----------------------------------------------------------------------------------

    def get(self, *, job_id: int) -> Job:
        job = self.session.get(Job, job_id)
        if job is None:
            raise NotFound("job", job_id)
        return job

    def list(
        self,
        *,
        namespace: str | None = None,
        status: str | None = None,
        kind: str | None = None,
        after_id: int | None = None,
        limit: int = 100,
        namespace_patterns: Sequence[str] | None = None,
    ) -> Sequence[Job]:
        """Jobs by id ascending; next page: `after_id=<last id>`. `namespace_patterns` (None: any)
        keeps the jobs of matching namespaces (and drops those of no namespace)."""
        stmt = select(Job)
        if namespace is not None:
            stmt = stmt.where(Job.namespace == namespace)
        if namespace_patterns is not None:
            stmt = stmt.where(namespace_matches(Job.namespace, namespace_patterns))
        if status is not None:
            if status not in JOB_STATUSES:
                raise ValueError(f"status must be one of {', '.join(JOB_STATUSES)}; got {status!r}")
            stmt = stmt.where(Job.status == status)
        if kind is not None:
            stmt = stmt.where(Job.kind == kind)
        if after_id is not None:
            stmt = stmt.where(Job.id > after_id)
        return self.session.scalars(stmt.order_by(Job.id).limit(limit)).all()

    def depth(self, *, kind: str | None = None) -> dict[str, int]:
        """{"queued": n, "running": m}: the jobs waiting (due or not) and the jobs being worked on."""
        stmt = (
            select(Job.status, func.count()).where(Job.status.in_(JOB_ACTIVE_STATUSES)).group_by(Job.status)
        )
        if kind is not None:
            stmt = stmt.where(Job.kind == kind)
        counts = dict.fromkeys(JOB_ACTIVE_STATUSES, 0)
        counts.update({status: int(count) for status, count in self.session.execute(stmt).all()})
        return counts

    def status_counts(self) -> dict[str, int]:
        """{status: count} over all jobs (every status present, 0 when none)."""
        rows = self.session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        counts = dict.fromkeys(JOB_STATUSES, 0)
        counts.update({status: int(count) for status, count in rows})
        return counts

    def newest(self, *, kind: str, namespace: str) -> Job | None:
        """The namespace's most recent job of `kind` (any status)."""
        stmt = (
            select(Job).where(Job.namespace == namespace, Job.kind == kind).order_by(Job.id.desc()).limit(1)
        )
        return self.session.scalars(stmt).first()

    def recent(self, *, limit: int) -> Sequence[Job]:
        """The `limit` most recent jobs of any kind and namespace, newest first."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        return self.session.scalars(select(Job).order_by(Job.id.desc()).limit(limit)).all()

    def dead_namespaces(self, *, kind: str, finished_before: datetime, limit: int = 50) -> list[str]:
        """Namespaces with a `dead` job of `kind` that finished before `finished_before`, oldest
        deaths first (the candidates for a re-queue once the cause is gone)."""
        stmt = (
            select(Job.namespace, func.min(Job.finished_at))
            .where(
                Job.status == "dead",
                Job.kind == kind,
                Job.namespace.is_not(None),
                Job.finished_at < finished_before,
            )
            .group_by(Job.namespace)
            .order_by(func.min(Job.finished_at))
            .limit(limit)
        )
        return [str(namespace) for namespace, _ in self.session.execute(stmt).all()]

    def active_job(self, *, dedupe_key: str) -> Job | None:
        """The queued or running job holding `dedupe_key`, if any."""
        stmt = select(Job).where(Job.dedupe_key == dedupe_key, Job.status.in_(JOB_ACTIVE_STATUSES))
        return self.session.scalars(stmt).first()

    def _skip_locked(self, stmt: Select[Any]) -> Select[Any]:
        if self.session.get_bind().dialect.name == "postgresql":
            return stmt.with_for_update(skip_locked=True)
        return stmt
