"""Retention: what months of history may lose, decided from Settings, applied in bounded batches.

Owns two rules. Proxied conversation logs go by age and by count per namespace, except those a
feedback item points at. Adapter version folders go when nothing can need them any more: never the
current version, v0, a pinned, serving (a deployment row on any replica) or candidate version, the
current's recent ancestors or the newest retired versions (rollback targets), nor one retired less
than the grace period ago; the row stays as a tombstone (metrics, lineage) and a rollback to it is
refused. Feedback items are training data: never deleted here. Knows the store and the adapter
folders; knows nothing about HTTP or vLLM.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from memory_store.errors import Conflict
from memory_store.models import Adapter, AdapterVersion, utcnow
from memory_store.repositories import AdapterRepository, ConversationRepository, DeploymentRepository
from service.config import Settings

__all__ = [
    "SERVING_STATES",
    "PruneReport",
    "RetentionLoop",
    "RetentionPolicy",
    "prune",
]

log = logging.getLogger(__name__)

SERVING_STATES = ("loading", "loaded", "unloading")  # a replica may answer with this version
DELETE_BATCH = 2000  # conversations per transaction: SQLite's write lock is held only briefly


@dataclass(frozen=True)
class RetentionPolicy:
    """The retention settings (0 = no limit for the conversation rules)."""

    conversation_max_age_days: float = 30.0
    conversation_max_per_namespace: int = 100_000
    keep_versions: int = 5
    version_grace_days: float = 7.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return cls(
            conversation_max_age_days=settings.retention_conversation_max_age_days,
            conversation_max_per_namespace=settings.retention_conversation_max_per_namespace,
            keep_versions=settings.retention_keep_versions,
            version_grace_days=settings.retention_version_grace_days,
        )


@dataclass(frozen=True)
class VersionToDelete:
    adapter: str
    version: int
    status: str
    path: str
    bytes: int


@dataclass
class PruneReport:
    """What a prune removed (or, with `dry_run`, would remove)."""

    dry_run: bool
    conversations: dict[str, int] = field(default_factory=dict)  # namespace -> count
    versions: list[VersionToDelete] = field(default_factory=list)
    swept_folders: list[str] = field(default_factory=list)  # tombstones' leftover folders

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "conversations": dict(self.conversations),
            "conversations_total": sum(self.conversations.values()),
            "versions": [vars(v) for v in self.versions],
            "version_bytes_total": sum(v.bytes for v in self.versions),
            "swept_folders": list(self.swept_folders),
        }


# --- conversations -------------------------------------------------------------------------------


def _conversation_limits(policy: RetentionPolicy, now: datetime) -> tuple[datetime | None, int | None]:
    before = (
        now - timedelta(days=policy.conversation_max_age_days) if policy.conversation_max_age_days else None
    )
    keep = policy.conversation_max_per_namespace or None
    return before, keep


def prune_conversations(
    session_factory: sessionmaker[Session], policy: RetentionPolicy, *, now: datetime, dry_run: bool
) -> dict[str, int]:
    """{namespace: conversations deleted (or that would be)}; namespaces with none are left out."""
    before, keep = _conversation_limits(policy, now)
    if before is None and keep is None:
        return {}
    with session_factory() as session:
        namespaces = ConversationRepository(session).namespaces()
    counts: dict[str, int] = {}
    for namespace in namespaces:
        if dry_run:
            with session_factory() as session:
                count = ConversationRepository(session).count_prunable(
                    namespace=namespace, before=before, keep_newest=keep
                )
        else:
            count = 0
            while True:
                with session_factory.begin() as session:
                    repository = ConversationRepository(session)
                    ids = repository.prunable_ids(
                        namespace=namespace, before=before, keep_newest=keep, limit=DELETE_BATCH
                    )
                    deleted = repository.delete_unreferenced(ids=ids)
                count += deleted
                if len(ids) < DELETE_BATCH or deleted == 0:
                    break
        if count:
            counts[namespace] = count
    return counts


# --- adapter versions ----------------------------------------------------------------------------


def _folder_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


def versions_to_keep(session: Session, adapter: Adapter, policy: RetentionPolicy) -> set[int]:
    """Every version of `adapter` whose files must stay (see the module docstring)."""
    rows = AdapterRepository(session).lineage(name=adapter.name)
    parents = {v: p for v, p, _s, _pin in rows}
    keep = {0}
    keep.update(v for v, _p, status, pinned in rows if pinned or status in ("current", "candidate"))
    current = adapter.current_version
    if current is not None:
        keep.add(current)
        ancestor, seen = parents.get(current), set()
        while ancestor is not None and len(seen) < policy.keep_versions and ancestor not in seen:
            seen.add(ancestor)
            keep.add(ancestor)
            ancestor = parents.get(ancestor)
    retired = [v for v, _p, status, _pin in rows if status == "retired"]
    keep.update(retired[: policy.keep_versions])  # rows are newest first: the rollback targets
    deployments = DeploymentRepository(session)
    keep.update(deployments.versions_in_states(adapter_name=adapter.name, states=SERVING_STATES))
    return keep


def _deletable(session: Session, policy: RetentionPolicy, now: datetime) -> list[AdapterVersion]:
    grace_end = now - timedelta(days=policy.version_grace_days)
    found: list[AdapterVersion] = []
    adapters = AdapterRepository(session)
    for adapter in adapters.all_adapters():
        keep = versions_to_keep(session, adapter, policy)
        rows = adapters.versions_with_deletable_files(name=adapter.name)
        for row in rows:
            since = row.retired_at or row.created_at
            if row.version not in keep and since <= grace_end:
                found.append(row)
    return found


def _remove_folder(folder: Path) -> None:
    if not folder.exists():
        return
    trash = folder.with_name(f".deleted-{folder.name}-{os.getpid()}-{threading.get_ident()}")
    folder.rename(trash)  # out of the version namespace first, then delete
    shutil.rmtree(trash, ignore_errors=True)


def prune_versions(
    session_factory: sessionmaker[Session],
    policy: RetentionPolicy,
    adapters_dir: Path,
    *,
    now: datetime,
    dry_run: bool,
) -> tuple[list[VersionToDelete], list[str]]:
    """(versions whose weights were deleted or would be, leftover folders of tombstones swept)."""
    with session_factory() as session:
        planned = [
            VersionToDelete(
                row.adapter_name, row.version, row.status, str(row.path), _folder_bytes(Path(str(row.path)))
            )
            for row in _deletable(session, policy, now)
        ]
        tombstones = AdapterRepository(session).tombstones()
    swept = [
        str(adapters_dir / name / f"v{version}")
        for name, version in tombstones
        if (adapters_dir / name / f"v{version}").exists()
    ]
    if dry_run:
        return planned, swept
    deleted: list[VersionToDelete] = []
    for item in planned:
        try:
            with session_factory.begin() as session:
                # re-checked under the adapter row lock: it may have become current, pinned or
                # served since the plan was read
                keep = versions_to_keep(
                    session, AdapterRepository(session).get_adapter(name=item.adapter), policy
                )
                if item.version in keep:
                    continue
                AdapterRepository(session).mark_files_deleted(name=item.adapter, version=item.version)
        except Conflict as error:
            log.info("retention keeps %s v%d: %s", item.adapter, item.version, error)
            continue
        _remove_folder(Path(item.path))  # after the commit: nothing can load a tombstone
        log.info("retention deleted the weights of %s v%d (%d bytes)", item.adapter, item.version, item.bytes)
        deleted.append(item)
    for folder in swept:
        _remove_folder(Path(folder))
    return deleted, swept


def prune(
    settings: Settings,
    session_factory: sessionmaker[Session],
    *,
    dry_run: bool = False,
    now: datetime | None = None,
    policy: RetentionPolicy | None = None,
) -> PruneReport:
    """Apply both retention rules once (or, with `dry_run`, report what they would delete)."""
    now = now or utcnow()
    policy = policy or RetentionPolicy.from_settings(settings)
    report = PruneReport(dry_run=dry_run)
    report.conversations = prune_conversations(session_factory, policy, now=now, dry_run=dry_run)
    report.versions, report.swept_folders = prune_versions(
        session_factory, policy, settings.adapters_dir, now=now, dry_run=dry_run
    )
    return report


class RetentionLoop:
    """Background service of `loraloop serve`: `prune` every `retention_interval_s`."""

    name = "retention"

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.retention_interval_s):
            self.run_once()

    def run_once(self) -> PruneReport | None:
        try:
            report = prune(self.settings, self.session_factory)
        except Exception:
            log.exception("retention pass failed")
            return None
        if report.conversations or report.versions:
            log.info(
                "retention: %d conversations, %d adapter versions' weights deleted",
                sum(report.conversations.values()),
                len(report.versions),
            )
        return report

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
