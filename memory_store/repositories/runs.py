"""Training runs: one row per train, distill or bake run, with its metrics and losses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from memory_store.errors import NotFound
from memory_store.models import (
    TRAINING_RUN_KINDS,
    TRAINING_RUN_STATUSES,
    TrainingRun,
    utcnow,
)
from memory_store.repositories._common import DEFAULT_PAGE_SIZE, _check_choice, _page, _positive


class TrainingRunRepository:
    """One row per training/distillation attempt, with its data range, metrics and outcome."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def start(
        self,
        *,
        namespace: str,
        kind: str,
        job_id: int | None = None,
        parent_version: int | None = None,
        feedback_from_id: int | None = None,
        feedback_to_id: int | None = None,
    ) -> TrainingRun:
        _check_choice("kind", kind, TRAINING_RUN_KINDS)
        run = TrainingRun(
            namespace=namespace,
            kind=kind,
            status="running",
            job_id=job_id,
            parent_version=parent_version,
            feedback_from_id=feedback_from_id,
            feedback_to_id=feedback_to_id,
            started_at=utcnow(),
        )
        self.session.add(run)
        self.session.flush()
        return run

    def finish(
        self,
        *,
        id: int,
        status: str,
        version: int | None = None,
        metrics: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> TrainingRun:
        """Record the outcome: succeeded (with `version`), rejected (by the gate), failed, cancelled."""
        _check_choice("status", status, TRAINING_RUN_STATUSES)
        if status == "running":
            raise ValueError("finish needs a final status")
        run = self.get(id=id)
        run.status = status
        run.version = version if version is not None else run.version
        if metrics is not None:
            run.metrics = {**(run.metrics or {}), **metrics}
        run.error = error
        run.finished_at = utcnow()
        self.session.flush()
        return run

    def get(self, *, id: int) -> TrainingRun:
        run = self.session.get(TrainingRun, id)
        if run is None:
            raise NotFound("training run", id)
        return run

    def list(
        self,
        *,
        namespace: str | None = None,
        kind: str | None = None,
        after_id: int | None = None,
        limit: int | None = DEFAULT_PAGE_SIZE,
    ) -> Sequence[TrainingRun]:
        stmt = select(TrainingRun)
        if namespace is not None:
            stmt = stmt.where(TrainingRun.namespace == namespace)
        if kind is not None:
            stmt = stmt.where(TrainingRun.kind == kind)
        return self.session.scalars(_page(stmt, TrainingRun.id, after_id=after_id, limit=limit)).all()

    def recent(self, *, namespace: str, limit: int) -> Sequence[TrainingRun]:
        """The namespace's `limit` most recent runs of any kind, newest first."""
        stmt = select(TrainingRun).where(TrainingRun.namespace == namespace)
        return self.session.scalars(stmt.order_by(TrainingRun.id.desc()).limit(_positive(limit))).all()

    def by_ids(self, ids: Iterable[int]) -> Sequence[TrainingRun]:
        """The runs of these ids (those that exist), by id."""
        wanted = sorted(set(ids))
        if not wanted:
            return []
        return self.session.scalars(
            select(TrainingRun).where(TrainingRun.id.in_(wanted)).order_by(TrainingRun.id)
        ).all()

    def latest(
        self, *, namespace: str, kind: str | None = None, status: str | None = None
    ) -> TrainingRun | None:
        stmt = select(TrainingRun).where(TrainingRun.namespace == namespace)
        if kind is not None:
            stmt = stmt.where(TrainingRun.kind == kind)
        if status is not None:
            stmt = stmt.where(TrainingRun.status == status)
        return self.session.scalars(stmt.order_by(TrainingRun.id.desc()).limit(1)).first()
