"""The reconciler: a background service that keeps every vLLM replica serving what the registry
says is current. At start-up, every `reconcile_interval_s` and whenever `trigger()` is called
(e.g. the embedded vLLM came back after a crash) it makes sure the default namespace has a
version (v0, the zero adapter, stands for the base model), hands the registry's desired state to
deploy.hotswap.HotSwapper.reconcile (reload missing versions, drain and unload old ones, stay
within max_loras) and records one Deployment row per replica and served name.
Never blocks the API: it runs on its own thread, and an unreachable vLLM or database is logged
and retried on the next round. After a round that reached every replica it calls `on_all_reachable`
(the composition root re-queues training that died while vLLM was away).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from sqlalchemy.orm import Session, sessionmaker

from deploy.hotswap import HotSwapper, ReconcileReport, parse_served_name, served_name
from memory_store.repositories import DeploymentRepository

logger = logging.getLogger(__name__)

DesiredState = Mapping[str, tuple[int, str]]


def deployment_rows(desired: DesiredState, report: ReconcileReport) -> list[dict[str, object]]:
    """The Deployment rows one reconcile round implies (pure): every desired version on every
    replica (`loaded`, or `failed` with the error), and every version it unloaded (`unloaded`)."""
    rows: list[dict[str, object]] = []
    for replica in report.replicas:
        for namespace, (version, _path) in desired.items():
            name = served_name(namespace, version)
            if not replica.reachable:
                state, error = "failed", replica.errors.get("models", "replica unreachable")
            elif name in replica.errors:
                state, error = "failed", replica.errors[name]
            else:
                state, error = "loaded", None
            rows.append(
                {
                    "adapter_name": namespace,
                    "version": version,
                    "replica_url": replica.base_url,
                    "served_name": name,
                    "state": state,
                    "error": error,
                }
            )
        for name in replica.unloaded:
            parsed = parse_served_name(name)
            if parsed is None:
                continue
            rows.append(
                {
                    "adapter_name": parsed[0],
                    "version": parsed[1],
                    "replica_url": replica.base_url,
                    "served_name": name,
                    "state": "unloaded",
                    "error": None,
                }
            )
    return rows


class Reconciler:
    """`start()`/`stop()` for the app's background seam; `reconcile_once()` runs one round now."""

    name = "reconciler"

    def __init__(
        self,
        *,
        swapper: HotSwapper,
        desired_state: Callable[[], DesiredState],
        session_factory: sessionmaker[Session],
        interval_s: float,
        ensure_namespace: Callable[[], object] | None = None,
        on_all_reachable: Callable[[], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.swapper = swapper
        self.desired_state = desired_state
        self.session_factory = session_factory
        self.interval_s = interval_s
        self.ensure_namespace = ensure_namespace
        self.on_all_reachable = on_all_reachable
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.last_report: ReconcileReport | None = None
        self.last_round: tuple[ReconcileReport, float] | None = None  # with its clock time (readiness)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def trigger(self, *_: object) -> None:
        """Run a round as soon as possible (usable as EmbeddedVllm's `on_restart`)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.reconcile_once()
            except Exception:
                logger.exception("reconcile round failed")
            self._wake.wait(self.interval_s)

    def reconcile_once(self) -> ReconcileReport | None:
        """One round; None when the desired state could not be read (database down) or the
        service is stopping."""
        if self.ensure_namespace is not None:
            try:
                self.ensure_namespace()
            except Exception as error:  # noqa: BLE001 - e.g. vLLM still starting: retried next round
                logger.warning("default namespace has no servable version yet: %s", error)
        if self._stop.is_set():
            return None  # stopping: do not start talking to vLLM now
        snapshot = self._clock()  # taken BEFORE the read: a newer concurrent swap wins
        try:
            desired = dict(self.desired_state())
        except Exception as error:  # noqa: BLE001
            logger.warning("reconcile skipped: cannot read the registry: %s", error)
            return None
        report = self.swapper.reconcile(desired, snapshot_time=snapshot)
        self.rounds += 1
        self.last_report = report
        self.last_round = (report, self._clock())
        for replica in report.replicas:
            if not replica.reachable:
                logger.warning("vLLM %s unreachable; reconciling it later", replica.base_url)
            elif replica.loaded or replica.unloaded or replica.errors:
                logger.info(
                    "reconciled %s: loaded %s, unloaded %s, errors %s",
                    replica.base_url,
                    replica.loaded,
                    replica.unloaded,
                    replica.errors,
                )
        self._record(deployment_rows(desired, report))
        if self.on_all_reachable is not None and all(replica.reachable for replica in report.replicas):
            try:
                self.on_all_reachable()
            except Exception as error:  # noqa: BLE001 - e.g. the database is down: next round
                logger.warning("after-round hook failed: %s", error)
        return report

    def _record(self, rows: list[dict[str, object]]) -> None:
        try:
            with self.session_factory.begin() as session:
                repository = DeploymentRepository(session)
                known = {(row.replica_url, row.served_name): row.state for row in repository.list()}
                for row in rows:
                    key = (row["replica_url"], row["served_name"])
                    if row["state"] == "unloaded" and key not in known:
                        continue  # never recorded as loaded (another process's version): nothing to close
                    if known.get(key) == row["state"] and row["error"] is None:
                        continue  # unchanged since the last round
                    repository.upsert(**row)  # type: ignore[arg-type]
        except Exception as error:  # noqa: BLE001 - bookkeeping only; serving is unaffected
            logger.warning("could not record deployments: %s", error)
