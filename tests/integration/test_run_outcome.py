"""How a train or distill job's training step ends when it raises (service.jobs.train.training_run_outcome),
checked on the stored training-run row: one mapping shared by the online, KL-distill and bake paths."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from memory_store.models import TrainingRun
from memory_store.repositories import TrainingRunRepository
from service.jobs.train import training_run_outcome
from service.jobs.worker import JobCancelled, JobFailed
from training.distill_teacher import DistillAlignmentError, NothingToDistill
from training.trainer import TrainingBudgetExceeded, TrainingCancelled, TrainingDiverged

pytestmark = pytest.mark.integration


def _start(session_factory: sessionmaker[Session]) -> int:
    with session_factory.begin() as session:
        return TrainingRunRepository(session).start(namespace="default", kind="train").id


def _run(session_factory: sessionmaker[Session], run_id: int) -> TrainingRun:
    with session_factory() as session:
        run = session.get(TrainingRun, run_id)
        session.expunge(run)
        return run


@pytest.mark.parametrize(
    "error",
    [
        TrainingDiverged("nan loss", step=3),
        TrainingBudgetExceeded("600 s"),
        DistillAlignmentError("misaligned"),
    ],
)
def test_divergence_budget_and_fatal_errors_fail_the_job_for_good(db_session_factory, error) -> None:
    run_id = _start(db_session_factory)
    with (
        pytest.raises(JobFailed) as raised,
        training_run_outcome(
            db_session_factory, run_id, fatal=(DistillAlignmentError,), failed_metrics={"new_items": 3}
        ),
    ):
        raise error
    assert raised.value.retryable is False
    run = _run(db_session_factory, run_id)
    assert run.status == "failed"
    assert run.error.startswith(type(error).__name__)
    assert run.metrics["new_items"] == 3


@pytest.mark.parametrize("error", [TrainingCancelled("stop asked"), JobCancelled("lease lost")])
def test_a_cancellation_closes_the_run_as_cancelled(db_session_factory, error) -> None:
    run_id = _start(db_session_factory)
    with pytest.raises(JobCancelled), training_run_outcome(db_session_factory, run_id):
        raise error
    assert _run(db_session_factory, run_id).status == "cancelled"


def test_an_unexpected_error_closes_the_run_and_propagates_for_a_retry(db_session_factory) -> None:
    run_id = _start(db_session_factory)
    with pytest.raises(OSError, match="disk full"), training_run_outcome(db_session_factory, run_id):
        raise OSError("disk full")
    run = _run(db_session_factory, run_id)
    assert (run.status, run.error) == ("failed", "OSError: disk full")


def test_passthrough_errors_leave_the_run_to_the_caller(db_session_factory) -> None:
    run_id = _start(db_session_factory)
    with (
        pytest.raises(NothingToDistill),
        training_run_outcome(db_session_factory, run_id, passthrough=(NothingToDistill,)),
    ):
        raise NothingToDistill("no memories")
    assert _run(db_session_factory, run_id).status == "running"


def test_a_clean_step_leaves_the_run_running(db_session_factory) -> None:
    run_id = _start(db_session_factory)
    with training_run_outcome(db_session_factory, run_id):
        pass
    assert _run(db_session_factory, run_id).status == "running"
