"""The one place a `train` job is queued (service.ingest.intake.queue_train_job), on the real store:
one active job per namespace, the debounce pushing a queued job back, "run now" pulling it forward,
and a running job left alone."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from memory_store.models import Job, utcnow
from memory_store.queue import JobQueue
from service.config import Settings
from service.ingest.intake import queue_train_job

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
