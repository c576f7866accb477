"""The adapter registry: immutable version folders (training.adapter_store) joined to their database
rows (memory_store), and the only path by which a version becomes current.

Every version that becomes current is verified against its recorded sha256, loaded on every vLLM
replica (deploy.hotswap) and only then made current in the database; a failure leaves the current
version unchanged. Publishing holds the adapter row lock while the folder is renamed into place, so a
folder without a row can only be left by a crash, and the next publish removes it. Knows nothing
about HTTP, the queue or how adapters are trained.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from deploy.hotswap import HotSwapper, SwapFailed, served_name
from deploy.vllm_client import VllmClient, VllmError, VllmUnavailable
from memory_store.errors import Conflict, NotFound
from memory_store.repositories import SERVABLE_STATUSES, AdapterRepository, files_deleted_message
from service.component_configs import train_config
from service.config import Settings
from training.adapter_store import AdapterIntegrityError, AdapterStore, AdapterStoreError

__all__ = [
    "AdapterRegistry",
    "CurrentAdapter",
    "PromotionFailed",
    "StaleParent",
    "build_hot_swapper",
    "replicas_unreachable",
    "served_name",
    "vllm_base_urls",
]

log = logging.getLogger(__name__)

EMBEDDED_VLLM = "embedded"


class PromotionFailed(Exception):
    """A version could not become current (bad files, or a replica refused it); current is unchanged."""

    def __init__(self, namespace: str, version: int, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(f"adapter {namespace!r} v{version} not promoted: {reason}")
        self.namespace = namespace
        self.version = version
        self.reason = reason
        self.unreachable = unreachable  # only because no replica answered: the version is fine


class StaleParent(PromotionFailed):
    """The candidate was trained from a version that is no longer current (another run or a rollback
    changed it meanwhile): promoting it would silently drop that change."""


@dataclass(frozen=True)
class CurrentAdapter:
    """The version a namespace serves now, with its folder."""

    namespace: str
    version: int
    path: Path


def vllm_base_urls(settings: Settings) -> list[str]:
    """The replicas' base URLs; `embedded` stands for the local server on `vllm_port`."""
    return [
        f"http://127.0.0.1:{settings.vllm_port}" if url == EMBEDDED_VLLM else url.rstrip("/")
        for url in settings.vllm_urls
    ]


def build_hot_swapper(settings: Settings) -> HotSwapper | None:
    """One HotSwapper over every configured replica, or None when no vLLM is configured."""
    urls = vllm_base_urls(settings)
    if not urls:
        return None
    clients = [VllmClient(url, timeout=settings.vllm_timeout_s, retries=settings.vllm_retries) for url in urls]
    return HotSwapper(clients, drain_s=settings.swap_drain_s, max_loras=settings.vllm_max_loras)


def replicas_unreachable(error: VllmError) -> bool:
    """Whether a failed swap failed only because replicas could not be reached (not a refusal)."""
    if isinstance(error, SwapFailed):
        return bool(error.errors) and all(isinstance(e, VllmUnavailable) for e in error.errors.values())
    return isinstance(error, VllmUnavailable)


class AdapterRegistry:
    """Versions of every namespace's adapter: publish, promote, roll back, and the desired state."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        store: AdapterStore,
        swapper: HotSwapper | None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.store = store
        self.swapper = swapper
        self._state_lock = threading.Lock()
        self._namespace_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    @classmethod
    def from_settings(
        cls, settings: Settings, session_factory: sessionmaker[Session], swapper: HotSwapper | None = None
    ) -> AdapterRegistry:
        return cls(settings, session_factory, AdapterStore(settings.adapters_dir), swapper)

    def _namespace_lock(self, namespace: str) -> threading.Lock:
        with self._state_lock:
            return self._namespace_locks[namespace]

    # --- reading -------------------------------------------------------------------------------
    def current(self, namespace: str) -> CurrentAdapter | None:
        with self.session_factory() as session:
            try:
                row = AdapterRepository(session).current(name=namespace)
            except NotFound:
                return None
            if row is None or row.path is None:
                return None
            return CurrentAdapter(namespace, row.version, Path(row.path))

    def desired_state(self) -> dict[str, tuple[int, str]]:
        """{namespace: (current version, its folder)} for every namespace with a current version:
        what every vLLM replica must serve (the reconciler's input)."""
        with self.session_factory() as session:
            rows = AdapterRepository(session).current_versions()
        return {name: (version, path) for name, version, path in rows}

    def ensure_base_version(self, namespace: str) -> CurrentAdapter:
        """The namespace's current version, creating and promoting v0 (a zero adapter, identical to
        the base model) when the namespace has none yet, so agents always address an adapter."""
        current = self.current(namespace)
        if current is not None:
            return current
        with self._namespace_lock(namespace):
            current = self.current(namespace)
            if current is not None:
                return current
            with self.session_factory.begin() as session:
                repository = AdapterRepository(session)
                repository.ensure_adapter(name=namespace, base_model=str(self.settings.base_model))
                has_v0 = repository.has_version(name=namespace, version=0)
            if not has_v0:
                self._publish_zero_adapter(namespace)
            with self.session_factory() as session:
                row = AdapterRepository(session).get_version(name=namespace, version=0)
                status = row.status
            if status not in SERVABLE_STATUSES:
                raise PromotionFailed(namespace, 0, f"v0 is {status}: {row.reason}")
            # a replica outage must not brand v0 failed: the namespace would never get a current version
            self._activate(namespace, 0, mark_failed=False, reason=None)
        current = self.current(namespace)
        assert current is not None
        return current

    def training_parent(self, namespace: str) -> CurrentAdapter:
        """The version a new run of `namespace` trains from: the current one, else v0. When v0
        cannot be loaded only because no replica answers, v0 is returned without being current
        (training needs no vLLM; the candidate is promoted once a replica answers)."""
        current = self.current(namespace)
        if current is not None:
            return current
        try:
            return self.ensure_base_version(namespace)
        except PromotionFailed as error:
            if not error.unreachable:
                raise
            with self.session_factory() as session:
                row = AdapterRepository(session).get_version(name=namespace, version=0)
                path = row.path
            if path is None:
                raise
            log.warning("%s: v0 not served yet (%s); training from it anyway", namespace, error.reason)
            return CurrentAdapter(namespace, 0, Path(path))

    def _publish_zero_adapter(self, namespace: str) -> None:
        base_model = self.settings.base_model
        lora_config = train_config(self.settings).lora_config(base_model)
        with self.session_factory.begin() as session:
            repository = AdapterRepository(session)
            repository.next_version(name=namespace)  # holds the adapter row lock until commit
            if repository.has_version(name=namespace, version=0):
                return  # another process published it meanwhile
            self._remove_orphan_folders(session, namespace)
            published = self.store.write_zero_adapter(namespace, base_model=base_model, lora_config=lora_config)
            repository.add_version(
                name=namespace,
                version=0,
                status="candidate",
                path=str(published.path),
                sha256=published.sha256,
                metrics={},
                reason="zero adapter: identical to the base model",
            )
        log.info("published v0 (zero adapter) of %s", namespace)

    # --- publishing ------------------------------------------------------------------------------
    def publish_candidate(
        self,
        namespace: str,
        src_dir: Path,
        *,
        parent_version: int | None,
        training_run_id: int | None,
        metrics: Mapping[str, Any],
        feedback_from_id: int | None = None,
        feedback_to_id: int | None = None,
        status: str = "candidate",
        reason: str | None = None,
        extra_metadata: Mapping[str, Any] | None = None,
    ) -> int:
        """Copy the peft files of `src_dir` into the next version folder and record the version row
        (`candidate`, or `rejected` with `reason`) in one transaction. Returns the version number."""
        if status not in ("candidate", "rejected"):
            raise ValueError(f"a new version is a candidate or rejected, not {status!r}")
        with self.session_factory.begin() as session:
            repository = AdapterRepository(session)
            repository.ensure_adapter(name=namespace, base_model=str(self.settings.base_model))
            version = repository.next_version(name=namespace)  # locks the adapter row until commit
            self._remove_orphan_folders(session, namespace)
            metadata = {
                "base_model": str(self.settings.base_model),
                "parent_version": parent_version,
                "training_run_id": training_run_id,
                "feedback_from_id": feedback_from_id,
                "feedback_to_id": feedback_to_id,
                "metrics": dict(metrics),
                "status_at_publish": status,
                **dict(extra_metadata or {}),
            }
            if reason is not None:
                metadata["reason"] = reason
            published = self.store.publish(namespace, version, Path(src_dir), metadata)
            repository.add_version(
                name=namespace,
                version=version,
                status=status,
                parent_version=parent_version,
                training_run_id=training_run_id,
                path=str(published.path),
                sha256=published.sha256,
                metrics=dict(metrics),
                reason=reason,
                feedback_from_id=feedback_from_id,
                feedback_to_id=feedback_to_id,
            )
        log.info("published %s v%d (%s)", namespace, version, status)
        return version

    def _remove_orphan_folders(self, session: Session, namespace: str) -> list[int]:
        """Delete version folders that have no row: left by a publish whose transaction never
        committed (crash between rename and commit). The caller holds the adapter row lock, so no
        other publish of this namespace is in flight."""
        on_disk = self.store.versions(namespace)
        # only the folders present are asked about: bounded by retention
        recorded = AdapterRepository(session).recorded_versions(name=namespace, versions=on_disk)
        orphans = [v for v in on_disk if v not in recorded]
        for version in orphans:
            folder = self.store.path(namespace, version)
            trash = folder.with_name(f".orphan-v{version}-{id(self)}")
            folder.rename(trash)  # out of the version namespace first, then delete
            shutil.rmtree(trash, ignore_errors=True)
            log.warning("removed %s: a version folder without a registry row (crashed publish)", folder)
        return orphans

    # --- making a version current ------------------------------------------------------------------
    def promote(self, namespace: str, version: int, *, expected_parent: int | None = None) -> CurrentAdapter:
        """Verify, load on every replica, then make `version` current. On failure the version is
        marked `failed` with the reason and PromotionFailed is raised (current unchanged).

        With `expected_parent`, a namespace whose current version is no longer that parent raises
        StaleParent and the version is marked `rejected` instead (it lacks the newer change)."""
        with self._namespace_lock(namespace):
            if expected_parent is not None:
                current = self.current(namespace)
                # no current version yet: a candidate trained from v0 (the base) is not stale
                unserved_base = current is None and expected_parent == 0
                if not unserved_base and (current is None or current.version != expected_parent):
                    now = "none" if current is None else f"v{current.version}"
                    reason = f"stale: trained from v{expected_parent} but {now} became current meanwhile"
                    with self.session_factory.begin() as session:
                        AdapterRepository(session).set_status(
                            name=namespace, version=version, status="rejected", reason=reason
                        )
                    raise StaleParent(namespace, version, reason)
            return self._activate(namespace, version, mark_failed=True, reason=None)

    def preview(self, namespace: str, version: int, *, reload: bool = False) -> str:
        """Serve `version` under its own name (`<namespace>-v<N>`) for a while without making it
        current, so an operator can ask it (an older version, a rejected candidate): any version
        whose files are kept, verified before it is loaded (hotswap.HotSwapper.preview: it
        drains like a retired version). Returns the served name. Conflict for a tombstone or a
        version without files; PromotionFailed when its files are corrupt or a replica refuses."""
        with self.session_factory() as session:
            row = AdapterRepository(session).get_version(name=namespace, version=version)
            if row.files_deleted_at is not None:
                raise Conflict(files_deleted_message(row))
            path, sha256, status = row.path, row.sha256, row.status
        if path is None or sha256 is None:
            raise Conflict(f"version {version} of {namespace!r} has no files (status {status!r})")
        name = served_name(namespace, version)
        if self.swapper is None:
            return name
        if reload or not self.swapper.serving(name):
            try:
                self.store.verify(namespace, version, sha256)
            except (AdapterIntegrityError, AdapterStoreError) as error:
                raise PromotionFailed(namespace, version, f"integrity check failed: {error}") from error
        try:
            return self.swapper.preview(namespace, version, path, reload=reload)
        except VllmError as error:
            raise PromotionFailed(
                namespace, version, f"could not load it: {error}", unreachable=replicas_unreachable(error)
            ) from error

    def rollback(self, namespace: str, to: int | None = None, *, reason: str = "rolled back") -> CurrentAdapter:
        """Make an earlier version current again (default: the newest retired one before the
        current) through the same verify + swap + flip path. A failure leaves current unchanged; the
        target is marked `failed` only when its files are corrupt (a replica outage is not its fault)."""
        with self._namespace_lock(namespace):
            target = self._rollback_target(namespace, to)
            return self._activate(namespace, target, mark_failed=False, reason=reason)

    def _rollback_target(self, namespace: str, to: int | None) -> int:
        # The repository's own choice of target, computed in a transaction that is then discarded:
        # the pointer only flips once the files are verified and loaded everywhere.
        session = self.session_factory()
        try:
            return AdapterRepository(session).rollback(name=namespace, to=to).version
        finally:
            session.rollback()
            session.close()

    def _activate(self, namespace: str, version: int, *, mark_failed: bool, reason: str | None) -> CurrentAdapter:
        with self.session_factory() as session:
            repository = AdapterRepository(session)
            adapter = repository.get_adapter(name=namespace)
            row = repository.get_version(name=namespace, version=version)
            path, sha256, status = row.path, row.sha256, row.status
            already_current = adapter.current_version == version
            if row.files_deleted_at is not None:
                raise Conflict(files_deleted_message(row))
        if path is None or sha256 is None or status not in SERVABLE_STATUSES:
            raise Conflict(
                f"version {version} of {namespace!r} cannot become current (status {status!r}, "
                f"files {'recorded' if path and sha256 else 'missing'})"
            )
        try:
            self.store.verify(namespace, version, sha256)
        except (AdapterIntegrityError, AdapterStoreError) as error:
            self._mark_failed(namespace, version, f"integrity check failed: {error}", already_current)
            raise PromotionFailed(namespace, version, f"integrity check failed: {error}") from error
        if self.swapper is not None:
            try:
                self.swapper.swap(namespace, version, path)
            except VllmError as error:
                # an unreachable replica says nothing about the version: it stays a candidate and
                # the job's retry (or a later promote) tries again once vLLM is back
                unreachable = replicas_unreachable(error)
                if mark_failed and not unreachable:
                    self._mark_failed(namespace, version, f"hot-swap failed: {error}", already_current)
                raise PromotionFailed(
                    namespace, version, f"hot-swap failed: {error}", unreachable=unreachable
                ) from error
        with self.session_factory.begin() as session:
            repository = AdapterRepository(session)
            if reason is None:
                repository.set_current(name=namespace, version=version)
            else:
                repository.rollback(name=namespace, to=version, reason=reason)
        log.info("%s: v%d is current", namespace, version)
        return CurrentAdapter(namespace, version, Path(path))

    def _mark_failed(self, namespace: str, version: int, reason: str, already_current: bool) -> None:
        log.error("%s v%d: %s", namespace, version, reason)
        if already_current:
            return  # the serving version's row keeps `current`; the error is raised to the caller
        try:
            with self.session_factory.begin() as session:
                AdapterRepository(session).set_status(name=namespace, version=version, status="failed", reason=reason)
        except (Conflict, NotFound) as error:
            log.warning("could not mark %s v%d failed: %s", namespace, version, error)

