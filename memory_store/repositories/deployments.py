"""Deployments: which version each vLLM replica has loaded."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from memory_store.errors import NotFound
from memory_store.models import (
    DEPLOYMENT_STATES,
    Deployment,
    utcnow,
)
from memory_store.repositories._common import _check_choice


class DeploymentRepository:
    """What each vLLM replica serves, one row per (replica_url, served_name)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def upsert(
        self,
        *,
        adapter_name: str,
        version: int,
        replica_url: str,
        served_name: str,
        state: str,
        error: str | None = None,
    ) -> Deployment:
        """Create or update the row of (replica_url, served_name)."""
        _check_choice("state", state, DEPLOYMENT_STATES)
        row = self._find(replica_url, served_name)
        if row is None:
            try:
                with self.session.begin_nested():
                    row = Deployment(
                        adapter_name=adapter_name,
                        version=version,
                        replica_url=replica_url,
                        served_name=served_name,
                        state=state,
                        error=error,
                        updated_at=utcnow(),
                    )
                    self.session.add(row)
                return row
            except IntegrityError:
                row = self._find(replica_url, served_name)
                if row is None:
                    raise
        row.adapter_name = adapter_name
        row.version = version
        row.state = state
        row.error = error
        row.updated_at = utcnow()
        self.session.flush()
        return row

    def _find(self, replica_url: str, served_name: str) -> Deployment | None:
        return self.session.scalars(
            select(Deployment).where(
                Deployment.replica_url == replica_url, Deployment.served_name == served_name
            )
        ).first()

    def get(self, *, id: int) -> Deployment:
        row = self.session.get(Deployment, id)
        if row is None:
            raise NotFound("deployment", id)
        return row

    def list(
        self,
        *,
        adapter_name: str | None = None,
        replica_url: str | None = None,
        state: str | None = None,
    ) -> Sequence[Deployment]:
        stmt = select(Deployment)
        if adapter_name is not None:
            stmt = stmt.where(Deployment.adapter_name == adapter_name)
        if replica_url is not None:
            stmt = stmt.where(Deployment.replica_url == replica_url)
        if state is not None:
            stmt = stmt.where(Deployment.state == state)
        return self.session.scalars(stmt.order_by(Deployment.id)).all()

    def versions_in_states(self, *, adapter_name: str, states: Sequence[str]) -> set[int]:
        """Versions of `adapter_name` that some replica has in one of `states`."""
        return {
            int(v)
            for v in self.session.scalars(
                select(Deployment.version).where(
                    Deployment.adapter_name == adapter_name, Deployment.state.in_(tuple(states))
                )
            )
        }

    def delete(self, *, id: int) -> None:
        self.session.delete(self.get(id=id))
        self.session.flush()
