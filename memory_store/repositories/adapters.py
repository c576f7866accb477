"""Adapters and their versions: the registry's rows, lineage, current pointer, tombstones."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from memory_store.errors import Conflict, NotFound
from memory_store.filters import namespace_matches
from memory_store.models import (
    ADAPTER_VERSION_STATUSES,
    Adapter,
    AdapterVersion,
    utcnow,
)
from memory_store.repositories._common import DEFAULT_PAGE_SIZE, _check_choice, _positive

# statuses from which a version may become current (it must also have files: `path` set)
SERVABLE_STATUSES = ("candidate", "current", "retired")
# statuses whose files retention may delete (never a candidate: it may be promoting right now)
DELETABLE_STATUSES = ("retired", "rejected", "failed")


def files_deleted_message(row: AdapterVersion) -> str:
    assert row.files_deleted_at is not None
    return (
        f"version {row.version} of {row.adapter_name!r} is a tombstone: its weights were deleted by "
        f"retention at {row.files_deleted_at.isoformat(timespec='seconds')} (pin versions to keep them)"
    )


class AdapterRepository:
    """Adapters (one per namespace), their immutable versions and the current-version pointer.

    Version numbers start at 0 (v0 is the zero adapter that stands for the base model). They are
    allocated under a lock on the adapter row (`SELECT ... FOR UPDATE` on PostgreSQL, the write
    lock on SQLite) and backed by unique(adapter_name, version).
    """

    def __init__(self, session: Session) -> None:
        self.session = session

    def ensure_adapter(self, *, name: str, base_model: str | None = None) -> Adapter:
        """The adapter `name`, created when missing (safe when two callers race)."""
        adapter = self.session.get(Adapter, name)
        if adapter is not None:
            if adapter.base_model is None and base_model is not None:
                adapter.base_model = base_model
            return adapter
        try:
            with self.session.begin_nested():
                adapter = Adapter(name=name, base_model=base_model, created_at=utcnow())
                self.session.add(adapter)
        except IntegrityError:
            adapter = self.session.get(Adapter, name, populate_existing=True)
            if adapter is None:
                raise
        return adapter

    def get_adapter(self, *, name: str) -> Adapter:
        adapter = self.session.get(Adapter, name)
        if adapter is None:
            raise NotFound("adapter", name)
        return adapter

    def _lock_adapter(self, name: str) -> Adapter:
        adapter = self.session.scalars(
            select(Adapter)
            .where(Adapter.name == name)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).first()
        if adapter is None:
            raise NotFound("adapter", name)
        return adapter

    def next_version(self, *, name: str) -> int:
        """The next free version number of `name` (locks the adapter row until the caller commits)."""
        self._lock_adapter(name)
        latest = self.session.scalar(
            select(func.max(AdapterVersion.version)).where(AdapterVersion.adapter_name == name)
        )
        return 0 if latest is None else int(latest) + 1

    def add_version(
        self,
        *,
        name: str,
        version: int | None = None,
        status: str = "candidate",
        parent_version: int | None = None,
        training_run_id: int | None = None,
        path: str | None = None,
        sha256: str | None = None,
        metrics: dict[str, Any] | None = None,
        reason: str | None = None,
        feedback_from_id: int | None = None,
        feedback_to_id: int | None = None,
    ) -> AdapterVersion:
        """Record a version (`version=None` allocates the next number). Use `set_current` to serve it.

        Raises `Conflict` when the version number is taken, `NotFound` when the adapter is missing.
        """
        _check_choice("status", status, ADAPTER_VERSION_STATUSES)
        if status == "current":
            raise ValueError("add the version first, then make it current with set_current")
        if version is None:
            version = self.next_version(name=name)
        else:
            self._lock_adapter(name)
        row = AdapterVersion(
            adapter_name=name,
            version=version,
            status=status,
            parent_version=parent_version,
            training_run_id=training_run_id,
            path=path,
            sha256=sha256,
            metrics=metrics,
            reason=reason,
            feedback_from_id=feedback_from_id,
            feedback_to_id=feedback_to_id,
            created_at=utcnow(),
        )
        try:
            with self.session.begin_nested():
                self.session.add(row)
        except IntegrityError as error:
            raise Conflict(f"adapter {name!r} already has version {version}") from error
        return row

    def set_status(
        self, *, name: str, version: int, status: str, reason: str | None = None
    ) -> AdapterVersion:
        """Mark a non-current version candidate/rejected/retired/failed (current: use set_current)."""
        _check_choice("status", status, ADAPTER_VERSION_STATUSES)
        if status == "current":
            raise ValueError("use set_current to make a version current")
        adapter = self._lock_adapter(name)
        row = self.get_version(name=name, version=version)
        if adapter.current_version == version:
            raise Conflict(
                f"version {version} of {name!r} is current; roll back or set another current first"
            )
        if status == "retired" and row.status != "retired":
            row.retired_at = utcnow()
        row.status = status
        if reason is not None:
            row.reason = reason
        self.session.flush()
        return row

    def set_current(self, *, name: str, version: int) -> AdapterVersion:
        """Flip the current pointer to `version` (the previous current becomes `retired`).

        Atomic: the adapter row is locked and both rows change in the caller's transaction. The
        version must have files (`path`) and be a candidate or retired one, else `Conflict`.
        """
        adapter = self._lock_adapter(name)
        row = self.get_version(name=name, version=version)
        if adapter.current_version == version:
            return row
        if row.files_deleted_at is not None:
            raise Conflict(files_deleted_message(row))
        if row.status not in SERVABLE_STATUSES or row.path is None:
            raise Conflict(
                f"version {version} of {name!r} cannot become current "
                f"(status {row.status!r}, path {'set' if row.path else 'missing'})"
            )
        if adapter.current_version is not None:
            previous = self.session.scalars(
                select(AdapterVersion).where(
                    AdapterVersion.adapter_name == name, AdapterVersion.version == adapter.current_version
                )
            ).first()
            if previous is not None:
                previous.status = "retired"
                previous.retired_at = utcnow()
        row.status = "current"
        adapter.current_version = version
        self.session.flush()
        return row

    def current(self, *, name: str) -> AdapterVersion | None:
        adapter = self.session.get(Adapter, name)
        if adapter is None:
            raise NotFound("adapter", name)
        if adapter.current_version is None:
            return None
        return self.get_version(name=name, version=adapter.current_version)

    def current_versions(self) -> list[tuple[str, int, str]]:
        """(adapter, current version, its folder) of every adapter whose current version has files,
        by adapter name: what every vLLM replica must serve."""
        rows = self.session.execute(
            select(AdapterVersion.adapter_name, AdapterVersion.version, AdapterVersion.path)
            .join(Adapter, Adapter.name == AdapterVersion.adapter_name)
            .where(AdapterVersion.version == Adapter.current_version, AdapterVersion.path.is_not(None))
            .order_by(AdapterVersion.adapter_name)
        ).all()
        return [(str(name), int(version), str(path)) for name, version, path in rows]

    def recorded_versions(self, *, name: str, versions: Sequence[int]) -> set[int]:
        """Which of `versions` have a row for adapter `name` (queried 500 at a time)."""
        recorded: set[int] = set()
        wanted = list(versions)
        for start in range(0, len(wanted), 500):
            stmt = select(AdapterVersion.version).where(
                AdapterVersion.adapter_name == name, AdapterVersion.version.in_(wanted[start : start + 500])
            )
            recorded.update(int(v) for v in self.session.scalars(stmt))
        return recorded

    def get_version(self, *, name: str, version: int) -> AdapterVersion:
        row = self.session.scalars(
            select(AdapterVersion).where(
                AdapterVersion.adapter_name == name, AdapterVersion.version == version
            )
        ).first()
        if row is None:
            raise NotFound("adapter version", f"{name}/v{version}")
        return row

    def has_version(self, *, name: str, version: int) -> bool:
        return (
            self.session.scalar(
                select(AdapterVersion.id).where(
                    AdapterVersion.adapter_name == name, AdapterVersion.version == version
                )
            )
            is not None
        )

    def list_versions(
        self,
        *,
        name: str,
        after_version: int | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> Sequence[AdapterVersion]:
        """Versions of `name` by version number (`newest_first`: descending); the next page starts
        after `after_version` in that order. One range of the (adapter_name, version) index."""
        self.get_adapter(name=name)
        stmt = select(AdapterVersion).where(AdapterVersion.adapter_name == name)
        if after_version is not None:
            column = AdapterVersion.version
            stmt = stmt.where(column < after_version if newest_first else column > after_version)
        stmt = stmt.order_by(AdapterVersion.version.desc() if newest_first else AdapterVersion.version)
        if limit is not None:
            stmt = stmt.limit(_positive(limit))
        return self.session.scalars(stmt).all()

    def count_versions(self, *, name: str) -> int:
        return int(
            self.session.scalar(
                select(func.count()).select_from(AdapterVersion).where(AdapterVersion.adapter_name == name)
            )
            or 0
        )

    def list_adapters(
        self,
        *,
        after_name: str | None = None,
        limit: int = DEFAULT_PAGE_SIZE,
        namespace_patterns: Sequence[str] | None = None,
    ) -> Sequence[Adapter]:
        """Adapters by name (without their versions); next page: `after_name=<last name>`."""
        stmt = select(Adapter)
        if namespace_patterns is not None:
            stmt = stmt.where(namespace_matches(Adapter.name, namespace_patterns))
        if after_name is not None:
            stmt = stmt.where(Adapter.name > after_name)
        return self.session.scalars(stmt.order_by(Adapter.name).limit(_positive(limit))).all()

    def list_with_versions(self, *, namespace_patterns: Sequence[str] | None = None) -> Sequence[Adapter]:
        """Every adapter by name (of the matching namespaces), with `.versions` loaded (by version)."""
        stmt = select(Adapter).options(selectinload(Adapter.versions)).order_by(Adapter.name)
        if namespace_patterns is not None:
            stmt = stmt.where(namespace_matches(Adapter.name, namespace_patterns))
        return self.session.scalars(stmt).all()

    def lineage(self, *, name: str) -> list[tuple[int, int | None, str, bool]]:
        """(version, parent_version, status, pinned) of every version of `name`, newest first:
        the few columns retention decides on, without loading the rows' metrics."""
        columns = (
            AdapterVersion.version,
            AdapterVersion.parent_version,
            AdapterVersion.status,
            AdapterVersion.pinned,
        )
        rows = self.session.execute(
            select(*columns)
            .where(AdapterVersion.adapter_name == name)
            .order_by(AdapterVersion.version.desc())
        ).all()
        return [
            (int(version), None if parent is None else int(parent), str(status), bool(pinned))
            for version, parent, status, pinned in rows
        ]

    def versions_with_deletable_files(self, *, name: str) -> Sequence[AdapterVersion]:
        """Versions of `name` retention may delete the files of (retired, rejected or failed, files
        still there, not pinned), by version; which of them go is the caller's policy."""
        return self.session.scalars(
            select(AdapterVersion)
            .where(
                AdapterVersion.adapter_name == name,
                AdapterVersion.status.in_(DELETABLE_STATUSES),
                AdapterVersion.path.is_not(None),
                AdapterVersion.pinned.is_(False),
            )
            .order_by(AdapterVersion.version)
        ).all()

    def tombstones(self) -> list[tuple[str, int]]:
        """(adapter, version) of every version whose files were deleted."""
        rows = self.session.execute(
            select(AdapterVersion.adapter_name, AdapterVersion.version).where(
                AdapterVersion.files_deleted_at.is_not(None)
            )
        ).all()
        return [(str(name), int(version)) for name, version in rows]

    def all_adapters(self) -> Sequence[Adapter]:
        """Every adapter by name (without versions): for whole-store passes such as retention."""
        return self.session.scalars(select(Adapter).order_by(Adapter.name)).all()

    def set_pinned(self, *, name: str, version: int, pinned: bool) -> AdapterVersion:
        """Pin a version (retention never deletes its files) or unpin it. A version whose files are
        already deleted cannot be pinned (`Conflict`)."""
        self._lock_adapter(name)
        row = self.get_version(name=name, version=version)
        if pinned and row.files_deleted_at is not None:
            raise Conflict(files_deleted_message(row))
        row.pinned = pinned
        self.session.flush()
        return row

    def mark_files_deleted(self, *, name: str, version: int) -> AdapterVersion:
        """Turn a version into a tombstone before its folder is deleted: `path` cleared,
        `files_deleted_at` set; row, metrics and lineage stay. Holds the adapter row lock, and
        refuses (`Conflict`) the current version, a pinned one, and one not retired/rejected/failed."""
        adapter = self._lock_adapter(name)
        row = self.get_version(name=name, version=version)
        if adapter.current_version == version or row.pinned or row.status not in DELETABLE_STATUSES:
            raise Conflict(
                f"version {version} of {name!r} must keep its files "
                f"({'current' if adapter.current_version == version else row.status}"
                f"{', pinned' if row.pinned else ''})"
            )
        if row.files_deleted_at is None:
            row.files_deleted_at = utcnow()
        row.path = None
        self.session.flush()
        return row

    def rollback(self, *, name: str, to: int | None = None, reason: str | None = None) -> AdapterVersion:
        """Make an earlier version current again; `to=None` picks the newest retired one before it.

        The version rolled back from becomes `retired` (with `reason` recorded on it when given).
        """
        adapter = self._lock_adapter(name)
        current = adapter.current_version
        if to is None:
            stmt = select(AdapterVersion).where(
                AdapterVersion.adapter_name == name,
                AdapterVersion.status == "retired",
                AdapterVersion.path.is_not(None),
            )
            if current is not None:
                stmt = stmt.where(AdapterVersion.version < current)
            target = self.session.scalars(stmt.order_by(AdapterVersion.version.desc()).limit(1)).first()
            if target is None:
                raise Conflict(f"adapter {name!r} has no earlier version to roll back to")
            to = target.version
        row = self.set_current(name=name, version=to)
        if current is not None and current != to and reason is not None:
            self.get_version(name=name, version=current).reason = reason
            self.session.flush()
        return row
