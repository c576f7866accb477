"""The one place a `train` job is queued (service.ingest.intake.queue_train_job), on the real store:
one active job per namespace, the debounce pushing a queued job back, "run now" pulling it forward,
and a running job left alone."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from memory_store.models import Job, utcnow
from memory_store.queue import JobQueue
from memory_store.repositories import FeedbackRepository, NewFeedback
from service.config import Settings
from service.ingest.intake import enqueue_training, queue_train_job

MESSAGES = [{"role": "user", "content": "Capital of France?"}]

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path) -> Settings:
    return Settings(auth_disabled=True, data_dir=tmp_path, job_max_attempts=4)


def test_one_active_job_per_namespace_and_the_request_moves_it_only_when_asked(
    db_session_factory, tmp_path
) -> None:
    settings = _settings(tmp_path)
    later = utcnow() + timedelta(seconds=30)
    with db_session_factory.begin() as session:
        first = queue_train_job(
            session,
            settings,
            "geo",
            trigger="debounce",
            run_after=later,
            created_by="ops",
            payload={"requeues": 1},
        )
        assert (first.payload, first.created_by, first.max_attempts) == (
            {"namespace": "geo", "trigger": "debounce", "requeues": 1},
            "ops",
            4,
        )
        # a follow-up style request (no reschedule) is absorbed and moves nothing
        same = queue_train_job(
            session, settings, "geo", trigger="follow-up", run_after=later + timedelta(seconds=60)
        )
        assert same.id == first.id and same.run_after == later
        other = queue_train_job(session, settings, "ops", trigger="api")
        assert other.id != first.id
        # "run now" (API, CLI) pulls the queued job forward
        now_job = queue_train_job(session, settings, "geo", trigger="cli", reschedule=True)
        assert now_job.id == first.id and now_job.run_after < later
        first_id = first.id
    with db_session_factory() as session:
        stored = session.get(Job, first_id)
        assert stored.run_after < later  # the move reached the database
        assert session.query(Job).filter(Job.namespace == "geo").count() == 1


def test_a_running_job_is_not_rescheduled_and_a_finished_one_frees_the_namespace(
    db_session_factory, tmp_path
) -> None:
    settings = _settings(tmp_path)
    with db_session_factory.begin() as session:
        job = queue_train_job(session, settings, "geo", trigger="api")
    with db_session_factory.begin() as session:
        claimed = JobQueue(session).claim(worker_id="w", lease_s=60, kinds=["train"])
        assert claimed is not None and claimed.id == job.id
    later = utcnow() + timedelta(seconds=30)
    with db_session_factory.begin() as session:
        absorbed = queue_train_job(
            session, settings, "geo", trigger="debounce", run_after=later, reschedule=True
        )
        assert absorbed.id == job.id and absorbed.status == "running"
        assert absorbed.run_after < later


def test_feedback_pushes_the_queued_job_back_until_the_count_trigger_makes_it_due_now(
    db_session_factory, tmp_path
) -> None:
    # enqueue_training's one-statement path (the pending count decided inside the UPDATE) must
    # behave as the count-then-queue path: debounce after the last item, due now at the trigger
    settings = Settings(auth_disabled=True, data_dir=tmp_path, train_debounce_s=60, train_trigger_count=3)

    def feed(key: str) -> Job:
        with db_session_factory.begin() as session:
            FeedbackRepository(session).add_many(
                items=[
                    NewFeedback(
                        namespace="geo", continuation="Paris.", messages=MESSAGES, idempotency_key=key
                    )
                ]
            )
            enqueue_training(session, {"geo"}, settings)
        with db_session_factory() as session:
            [job] = (
                session.query(Job).filter(Job.namespace == "geo", Job.status.in_(["queued", "running"])).all()
            )
            return job

    before = utcnow()
    first = feed("a")
    assert first.run_after >= before + timedelta(seconds=59)  # debounced
    second = feed("b")
    assert second.id == first.id and second.run_after >= first.run_after  # pushed back, not a new job
    third = feed("c")  # 3 pending: the trigger count
    assert third.id == first.id and third.run_after <= utcnow()
    with db_session_factory.begin() as session:
        assert JobQueue(session).claim(worker_id="w", lease_s=60, kinds=["train"]).id == first.id
    running = feed("d")  # the running job is left alone, and absorbs the new item
    assert running.id == first.id and running.status == "running" and running.run_after == third.run_after
    with db_session_factory.begin() as session:
        queue = JobQueue(session)
        assert not queue.reschedule_queued(dedupe_key="train:geo", run_after=utcnow())
        assert not queue.reschedule_queued(
            dedupe_key="train:nobody", run_after=utcnow(), now_if_pending=("x", 1)
        )
